//! Walking a layer tree: the facts a manifest records, and the checks `verify` makes.
//!
//! `scan_tree` visits every object of a layer tree through directory fds (never following a
//! symlink, never leaving the tree), classifies it, checksums whole files' data and xattrs,
//! and resolves partial files to their block maps. `verify_layer` compares a fresh scan with
//! the layer's manifest and, for partial files, checks every present block against its CRC.
//!
//! Read-only: nothing here writes to a layer. Damage is never an `Err`: it is a `Problem` in
//! the report, so one bad file does not hide the others. `Err` means the scan itself could
//! not proceed (the tree cannot be opened or listed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CStr;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use super::blockmap::{self, Damage, MapStore};
use super::error::{Result, VolumeError, errno_io};
use super::manifest::{Entry, EntryKind, LayerIdentity, LayerPath, Manifest};
use super::{MapId, VolumeId};
use crate::sys::{self, Stat};

/// Something wrong with a layer. Everything but `OrphanMap` is damage.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The manifest is missing or unreadable (the message says why).
    ManifestUnreadable { error: String },
    /// A manifest header field differs from what the volume expects.
    ManifestMismatch {
        field: &'static str,
        expected: String,
        found: String,
    },
    /// An object the manifest lists is gone.
    EntryMissing { path: LayerPath },
    /// An object exists that the manifest does not list.
    EntryUnexpected { path: LayerPath },
    /// An object's type, mode, owner, xattrs, size or link target changed.
    EntryChanged {
        path: LayerPath,
        field: &'static str,
        expected: String,
        found: String,
    },
    /// A whole file's data does not match its CRC32C.
    DataCrcMismatch {
        path: LayerPath,
        expected: u32,
        found: u32,
    },
    /// A partial file's marker xattr is unreadable.
    BadMarker { path: LayerPath, value: String },
    /// A partial-file marker on something that is not a regular file.
    MarkerOnNonFile { path: LayerPath },
    /// A partial file's block map is missing or damaged.
    MapUnreadable {
        path: LayerPath,
        map: MapId,
        error: String,
    },
    /// A block map is not the one the manifest recorded.
    MapChecksumMismatch {
        path: LayerPath,
        map: MapId,
        expected: u32,
        found: u32,
    },
    /// A block map's block size is not the volume's.
    MapBlockSize {
        path: LayerPath,
        map: MapId,
        expected: u32,
        found: u32,
    },
    /// A partial file's size differs from its map's logical size.
    PartialSizeMismatch {
        path: LayerPath,
        map_size: u64,
        file_size: u64,
    },
    /// A present block of a partial file does not match its CRC32C.
    BlockCrcMismatch {
        path: LayerPath,
        map: MapId,
        block: u64,
        expected: u32,
        found: u32,
    },
    /// An object could not be read (the message says why).
    Unreadable { path: LayerPath, error: String },
    /// The layer's table of change times (`ctimes`) is unreadable or damaged.
    CtimesUnreadable { error: String },
    /// A block map no partial file refers to: garbage, not damage (a partial file deleted
    /// in its epoch). `Volume::collect_orphan_maps` removes these.
    OrphanMap { map: MapId },
}

impl Problem {
    /// True for findings that do not mean damage.
    pub fn is_warning(&self) -> bool {
        matches!(self, Problem::OrphanMap { .. })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Problem::*;
        match self {
            ManifestUnreadable { error } => write!(f, "manifest unreadable: {error}"),
            ManifestMismatch {
                field,
                expected,
                found,
            } => write!(f, "manifest {field} is {found}, expected {expected}"),
            EntryMissing { path } => write!(f, "{path}: missing (listed in the manifest)"),
            EntryUnexpected { path } => write!(f, "{path}: not listed in the manifest"),
            EntryChanged {
                path,
                field,
                expected,
                found,
            } => write!(f, "{path}: {field} is {found}, manifest says {expected}"),
            DataCrcMismatch {
                path,
                expected,
                found,
            } => write!(
                f,
                "{path}: data CRC32C is {found:08x}, manifest says {expected:08x}: the data is damaged"
            ),
            BadMarker { path, value } => {
                write!(f, "{path}: malformed partial-file marker {value:?}")
            }
            MarkerOnNonFile { path } => {
                write!(
                    f,
                    "{path}: carries a partial-file marker but is not a regular file"
                )
            }
            MapUnreadable { path, map, error } => {
                write!(f, "{path}: block map {map} unreadable: {error}")
            }
            MapChecksumMismatch {
                path,
                map,
                expected,
                found,
            } => write!(
                f,
                "{path}: block map {map} has checksum {found:08x}, manifest says {expected:08x}"
            ),
            MapBlockSize {
                path,
                map,
                expected,
                found,
            } => write!(
                f,
                "{path}: block map {map} uses {found}-byte blocks, the volume {expected}"
            ),
            PartialSizeMismatch {
                path,
                map_size,
                file_size,
            } => write!(
                f,
                "{path}: partial file is {file_size} bytes but its block map says {map_size}"
            ),
            BlockCrcMismatch {
                path,
                map,
                block,
                expected,
                found,
            } => write!(
                f,
                "{path}: block {block} has CRC32C {found:08x}, block map {map} says {expected:08x}: the data is damaged"
            ),
            Unreadable { path, error } => write!(f, "{path}: cannot read: {error}"),
            CtimesUnreadable { error } => write!(f, "change-time table: {error}"),
            OrphanMap { map } => write!(f, "block map {map} is not used by any file (garbage)"),
        }
    }
}

/// What `scan_tree` found.
#[derive(Debug, Default)]
pub struct TreeScan {
    /// Every object, sorted by path.
    pub entries: Vec<Entry>,
    pub data_bytes: u64,
    pub block_count: u64,
    /// Maps named by partial files' markers.
    pub referenced_maps: BTreeSet<MapId>,
    pub problems: Vec<Problem>,
}

/// The result of verifying one layer.
#[derive(Debug, Default)]
pub struct LayerReport {
    pub epoch: u64,
    pub entries_checked: u64,
    pub data_bytes_checked: u64,
    pub problems: Vec<Problem>,
}

impl LayerReport {
    /// True if nothing but warnings was found.
    pub fn is_sound(&self) -> bool {
        self.problems.iter().all(Problem::is_warning)
    }
}

/// CRC32C over an object's xattrs: for each name in byte order, the name, a NUL, the value's
/// length as u32 little-endian, the value. 0 when there are none.
///
/// Xattrs holding file handles (`overlay.origin`, `layervol.below`) are left out: a handle
/// names an inode of this filesystem, so a copy of the layer elsewhere (a replica) cannot
/// reproduce it, and a squash repoints `below` without changing what the layer holds.
pub fn xattrs_crc(dir: BorrowedFd, name: &CStr) -> sys::Result<u32> {
    let mut names = sys::listxattr(dir, name)?;
    names.sort();
    let mut crc = 0u32;
    for n in names {
        if is_handle_xattr(n.as_bytes()) {
            continue;
        }
        // An xattr removed between list and get is simply absent.
        let Some(v) = sys::getxattr(dir, name, &n)? else {
            continue;
        };
        crc = crc32c::crc32c_append(crc, n.as_bytes_with_nul());
        crc = crc32c::crc32c_append(crc, &(v.len() as u32).to_le_bytes());
        crc = crc32c::crc32c_append(crc, &v);
    }
    Ok(crc)
}

/// True for the xattrs whose value is a file handle (see `xattrs_crc`).
fn is_handle_xattr(name: &[u8]) -> bool {
    const HANDLES: [&[u8]; 4] = [
        b"trusted.overlay.origin",
        b"user.overlay.origin",
        b"trusted.layervol.below",
        b"user.layervol.below",
    ];
    HANDLES.contains(&name)
}

/// CRC32C of a whole file's data, read in 1 MiB chunks.
fn file_crc(fd: BorrowedFd) -> sys::Result<(u32, u64)> {
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0u32;
    let mut off = 0u64;
    loop {
        let n = sys::pread_full(fd, &mut buf, off)?;
        if n == 0 {
            return Ok((crc, off));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        super::progress::bytes(n as u64);
        off += n as u64;
    }
}

struct Scanner<'a> {
    maps: &'a MapStore,
    block_size: u32,
    userxattr: bool,
    /// Verify mode: check partial files' blocks against their maps.
    verify_blocks: bool,
    out: TreeScan,
    /// Hard-linked inodes already seen: their content check, so data is read and counted once.
    seen: HashMap<(u64, u64), EntryKind>,
    /// Per map: where it was first seen (hard links share a map; two inodes must not).
    map_owner: HashMap<MapId, (u64, u64)>,
}

/// Scans the layer tree at `tree`. `verify_blocks` also checks every present block of every
/// partial file (verify); without it only the maps' presence and headers are checked (seal).
pub fn scan_tree(
    tree: &Path,
    maps: &MapStore,
    block_size: u32,
    userxattr: bool,
    verify_blocks: bool,
) -> Result<TreeScan> {
    let root = super::import::open_dir(tree)?;
    super::progress::start(super::progress::Phase::Checksum);
    let mut s = Scanner {
        maps,
        block_size,
        userxattr,
        verify_blocks,
        out: TreeScan::default(),
        seen: HashMap::new(),
        map_owner: HashMap::new(),
    };
    let st = sys::fstat(root.as_fd()).map_err(errno_io("stat", tree))?;
    s.visit(root.as_fd(), sys::dot(), &[], &st);
    s.walk_dir(root.as_fd(), tree, &[])?;
    s.out.entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(s.out)
}

fn join(parent: &[u8], name: &CStr) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name.to_bytes());
    p
}

impl Scanner<'_> {
    /// Visits the children of `dir`. Only a root that cannot be listed is an error; a
    /// subdirectory that cannot be listed is a finding.
    fn walk_dir(&mut self, dir: BorrowedFd, tree: &Path, rel: &[u8]) -> Result<()> {
        let mut names = match sys::read_dir(dir) {
            Ok(n) => n,
            Err(e) if rel.is_empty() => return Err(errno_io("list", tree)(e)),
            Err(e) => {
                self.problem_unreadable(rel, "list directory", e);
                return Ok(());
            }
        };
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, _, _) in names {
            let path = join(rel, &name);
            let st = match sys::fstatat(dir, &name) {
                Ok(st) => st,
                Err(e) => {
                    self.problem_unreadable(&path, "stat", e);
                    continue;
                }
            };
            self.visit(dir, &name, &path, &st);
            if sys::is_dir(&st) {
                match sys::openat(dir, &name, libc::O_RDONLY | libc::O_DIRECTORY, 0) {
                    Ok(sub) => self.walk_dir(sub.as_fd(), tree, &path)?,
                    Err(e) => self.problem_unreadable(&path, "open directory", e),
                }
            }
        }
        Ok(())
    }

    fn problem_unreadable(&mut self, path: &[u8], op: &str, e: sys::Errno) {
        self.out.problems.push(Problem::Unreadable {
            path: LayerPath(path.to_vec()),
            error: format!("{op}: {e}"),
        });
    }

    /// Records one object.
    fn visit(&mut self, dir: BorrowedFd, name: &CStr, path: &[u8], st: &Stat) {
        super::progress::entry();
        let lp = LayerPath(path.to_vec());
        let xattrs_crc32c = match xattrs_crc(dir, name) {
            Ok(c) => c,
            Err(e) => {
                self.problem_unreadable(path, "read xattrs", e);
                0
            }
        };
        let marker = match sys::getxattr(dir, name, blockmap::marker_xattr(self.userxattr)) {
            Ok(m) => m,
            Err(e) => {
                self.problem_unreadable(path, "read marker", e);
                None
            }
        };
        let fmt = st.st_mode & libc::S_IFMT;
        if marker.is_some() && fmt != libc::S_IFREG {
            self.out
                .problems
                .push(Problem::MarkerOnNonFile { path: lp.clone() });
        }
        let kind = match fmt {
            libc::S_IFDIR => Some(EntryKind::Dir),
            libc::S_IFREG => self.regular(dir, name, &lp, st, marker.as_deref()),
            libc::S_IFLNK => match sys::readlinkat(dir, name) {
                Ok(t) => Some(EntryKind::Symlink {
                    target: LayerPath(t),
                }),
                Err(e) => {
                    self.problem_unreadable(path, "read link", e);
                    None
                }
            },
            libc::S_IFCHR if st.st_rdev == 0 => Some(EntryKind::Whiteout),
            libc::S_IFCHR | libc::S_IFBLK => Some(EntryKind::Device { rdev: st.st_rdev }),
            libc::S_IFIFO => Some(EntryKind::Fifo),
            libc::S_IFSOCK => Some(EntryKind::Socket),
            _ => {
                self.out.problems.push(Problem::Unreadable {
                    path: lp.clone(),
                    error: format!("unknown file type {:o}", st.st_mode),
                });
                None
            }
        };
        if let Some(kind) = kind {
            self.out.entries.push(Entry {
                path: lp,
                mode: st.st_mode,
                uid: st.st_uid,
                gid: st.st_gid,
                xattrs_crc32c,
                kind,
            });
        }
    }

    fn regular(
        &mut self,
        dir: BorrowedFd,
        name: &CStr,
        lp: &LayerPath,
        st: &Stat,
        marker: Option<&[u8]>,
    ) -> Option<EntryKind> {
        let key = (st.st_dev, st.st_ino);
        if st.st_nlink > 1
            && let Some(k) = self.seen.get(&key)
        {
            return Some(k.clone());
        }
        let fd = match sys::openat(dir, name, libc::O_RDONLY, 0) {
            Ok(fd) => fd,
            Err(e) => {
                self.problem_unreadable(&lp.0, "open", e);
                return None;
            }
        };
        let bs = u64::from(self.block_size);
        let kind = match marker {
            None => match file_crc(fd.as_fd()) {
                Ok((crc32c, size)) => {
                    self.out.data_bytes += size;
                    self.out.block_count += size.div_ceil(bs);
                    EntryKind::File { size, crc32c }
                }
                Err(e) => {
                    self.problem_unreadable(&lp.0, "read", e);
                    return None;
                }
            },
            Some(v) => self.partial(fd.as_fd(), lp, st, key, v)?,
        };
        if st.st_nlink > 1 {
            self.seen.insert(key, kind.clone());
        }
        Some(kind)
    }

    fn partial(
        &mut self,
        fd: BorrowedFd,
        lp: &LayerPath,
        st: &Stat,
        key: (u64, u64),
        marker: &[u8],
    ) -> Option<EntryKind> {
        let map_id = match blockmap::decode_marker(marker) {
            Ok(id) => id,
            Err(_) => {
                self.out.problems.push(Problem::BadMarker {
                    path: lp.clone(),
                    value: String::from_utf8_lossy(marker).into_owned(),
                });
                return None;
            }
        };
        self.out.referenced_maps.insert(map_id);
        if let Some(owner) = self.map_owner.insert(map_id, key)
            && owner != key
        {
            self.out.problems.push(Problem::MapUnreadable {
                path: lp.clone(),
                map: map_id,
                error: "another inode of the layer names the same block map".into(),
            });
        }
        let (map, map_crc32c) = match self.maps.load_with_checksum(map_id) {
            Ok(x) => x,
            Err(e) => {
                self.out.problems.push(Problem::MapUnreadable {
                    path: lp.clone(),
                    map: map_id,
                    error: e.to_string(),
                });
                return None;
            }
        };
        if map.block_size() != self.block_size {
            self.out.problems.push(Problem::MapBlockSize {
                path: lp.clone(),
                map: map_id,
                expected: self.block_size,
                found: map.block_size(),
            });
        }
        let file_size = st.st_size as u64;
        if file_size != map.size() {
            self.out.problems.push(Problem::PartialSizeMismatch {
                path: lp.clone(),
                map_size: map.size(),
                file_size,
            });
        }
        if self.verify_blocks {
            match map.verify(fd) {
                Ok(damage) => {
                    for d in damage {
                        if let Damage::BlockCrc {
                            block,
                            expected,
                            actual,
                        } = d
                        {
                            self.out.problems.push(Problem::BlockCrcMismatch {
                                path: lp.clone(),
                                map: map_id,
                                block,
                                expected,
                                found: actual,
                            });
                        }
                        // A size mismatch was reported above.
                    }
                }
                Err(e) => self.problem_unreadable(&lp.0, "read blocks", e),
            }
        }
        self.out.data_bytes += map.present_bytes();
        self.out.block_count += map.present().count_blocks();
        Some(EntryKind::Partial {
            size: map.size(),
            map: map_id,
            map_crc32c,
            present_blocks: map.present().count_blocks(),
        })
    }
}

/// What `verify_layer` checks a layer against.
#[derive(Debug, Clone)]
pub struct LayerLocation {
    pub epoch: u64,
    /// The directory holding `manifest.json`.
    pub layer_dir: PathBuf,
    pub tree: PathBuf,
    pub maps: MapStore,
}

/// Verifies one frozen layer: its manifest (checksum, header against `id`), every object of
/// its tree against the manifest, every whole file's data CRC, every partial file's map
/// checksum and every present block's CRC, and reports orphan maps.
pub fn verify_layer(loc: &LayerLocation, id: &LayerIdentity) -> Result<LayerReport> {
    let mut rep = LayerReport {
        epoch: loc.epoch,
        ..LayerReport::default()
    };
    let manifest = match Manifest::load(&loc.layer_dir) {
        Ok(m) => Some(m),
        Err(VolumeError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            rep.problems.push(Problem::ManifestUnreadable {
                error: "no manifest.json: the layer was frozen but never sealed (`Volume::seal` writes it; a mount seals its frozen layers)".into(),
            });
            None
        }
        Err(e) => {
            rep.problems.push(Problem::ManifestUnreadable {
                error: e.to_string(),
            });
            None
        }
    };
    let scan = scan_tree(&loc.tree, &loc.maps, id.block_size, id.userxattr, true)?;
    rep.entries_checked = scan.entries.len() as u64;
    rep.data_bytes_checked = scan.data_bytes;
    rep.problems.extend(scan.problems.iter().cloned());
    if let Some(m) = &manifest {
        check_header(m, id, &scan, &mut rep.problems);
        compare_entries(&m.entries, &scan.entries, &mut rep.problems);
    }
    match loc.maps.list() {
        Ok(ids) => rep.problems.extend(
            ids.into_iter()
                .filter(|i| !scan.referenced_maps.contains(i))
                .map(|map| Problem::OrphanMap { map }),
        ),
        Err(e) => rep.problems.push(Problem::Unreadable {
            path: LayerPath(b"maps".to_vec()),
            error: e.to_string(),
        }),
    }
    Ok(rep)
}

fn check_header(m: &Manifest, id: &LayerIdentity, scan: &TreeScan, out: &mut Vec<Problem>) {
    let mut check = |field: &'static str, expected: String, found: String| {
        if expected != found {
            out.push(Problem::ManifestMismatch {
                field,
                expected,
                found,
            });
        }
    };
    let vid = |v: VolumeId| v.to_hex();
    check("volume_id", vid(id.volume_id), vid(m.volume_id));
    check("epoch", id.epoch.to_string(), m.epoch.to_string());
    check(
        "parent_epoch",
        format!("{:?}", id.parent_epoch),
        format!("{:?}", m.parent_epoch),
    );
    check(
        "block_size",
        id.block_size.to_string(),
        m.block_size.to_string(),
    );
    check(
        "data_bytes",
        scan.data_bytes.to_string(),
        m.data_bytes.to_string(),
    );
    check(
        "block_count",
        scan.block_count.to_string(),
        m.block_count.to_string(),
    );
    check(
        "partial_files",
        scan.referenced_maps.len().to_string(),
        m.partial_files.to_string(),
    );
}

fn compare_entries(expected: &[Entry], found: &[Entry], out: &mut Vec<Problem>) {
    let want: BTreeMap<&LayerPath, &Entry> = expected.iter().map(|e| (&e.path, e)).collect();
    let have: BTreeMap<&LayerPath, &Entry> = found.iter().map(|e| (&e.path, e)).collect();
    for (p, w) in &want {
        let Some(h) = have.get(p) else {
            out.push(Problem::EntryMissing { path: (*p).clone() });
            continue;
        };
        compare_entry(w, h, out);
    }
    for p in have.keys().filter(|p| !want.contains_key(*p)) {
        out.push(Problem::EntryUnexpected { path: (*p).clone() });
    }
}

fn changed(
    out: &mut Vec<Problem>,
    path: &LayerPath,
    field: &'static str,
    expected: String,
    found: String,
) {
    if expected != found {
        out.push(Problem::EntryChanged {
            path: path.clone(),
            field,
            expected,
            found,
        });
    }
}

fn compare_entry(w: &Entry, h: &Entry, out: &mut Vec<Problem>) {
    let p = &w.path;
    changed(
        out,
        p,
        "mode",
        format!("{:o}", w.mode),
        format!("{:o}", h.mode),
    );
    changed(
        out,
        p,
        "owner",
        format!("{}:{}", w.uid, w.gid),
        format!("{}:{}", h.uid, h.gid),
    );
    changed(
        out,
        p,
        "xattrs",
        format!("{:08x}", w.xattrs_crc32c),
        format!("{:08x}", h.xattrs_crc32c),
    );
    use EntryKind as K;
    match (&w.kind, &h.kind) {
        (
            K::File {
                size: ws,
                crc32c: wc,
            },
            K::File {
                size: hs,
                crc32c: hc,
            },
        ) => {
            changed(out, p, "size", ws.to_string(), hs.to_string());
            if ws == hs && wc != hc {
                out.push(Problem::DataCrcMismatch {
                    path: p.clone(),
                    expected: *wc,
                    found: *hc,
                });
            }
        }
        (
            K::Partial {
                size: ws,
                map: wm,
                map_crc32c: wc,
                present_blocks: wp,
            },
            K::Partial {
                size: hs,
                map: hm,
                map_crc32c: hc,
                present_blocks: hp,
            },
        ) => {
            changed(out, p, "size", ws.to_string(), hs.to_string());
            changed(out, p, "block map", wm.to_hex(), hm.to_hex());
            changed(out, p, "present blocks", wp.to_string(), hp.to_string());
            if wm == hm && wc != hc {
                out.push(Problem::MapChecksumMismatch {
                    path: p.clone(),
                    map: *wm,
                    expected: *wc,
                    found: *hc,
                });
            }
        }
        (a, b) if a != b => changed(out, p, "content", format!("{a:?}"), format!("{b:?}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn xattr_crc_leaves_out_file_handles() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let dir = crate::volume::import::open_dir(d.path()).unwrap();
        let crc = || xattrs_crc(dir.as_fd(), c"f").unwrap();
        let set = |n: &CStr, v: &[u8]| sys::setxattr(dir.as_fd(), c"f", n, v, 0).unwrap();
        set(c"user.kept", b"1");
        let with_user = crc();
        assert_ne!(with_user, 0);
        // A handle (host-local) changes nothing: a replica or a squash may hold another one.
        set(c"user.layervol.below", b"handle-1");
        set(c"user.overlay.origin", b"handle-2");
        assert_eq!(crc(), with_user);
        set(c"user.layervol.below", b"handle-3");
        assert_eq!(crc(), with_user);
        // Any other xattr counts.
        set(c"user.kept", b"2");
        assert_ne!(crc(), with_user);
    }
}
