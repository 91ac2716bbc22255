//! Importing a directory as a volume's base layer, and copying a layer root's attributes.
//!
//! `import_tree` copies a plain directory into an empty layer tree faithfully or fails with a
//! clear error: data (holes preserved), types (dirs, files, symlinks, fifos, sockets,
//! devices), hard links (one inode per source inode), owner, mode (set-id bits included),
//! xattrs (ACLs and capabilities included) and times. Like `cp -a`, but strict: what cannot
//! be preserved is an error, not a warning, because a volume's base must be the directory.
//!
//! The copy is made in the layer's format: an xattr of the source in the overlay namespace
//! (`trusted.overlay.X`) is stored escaped (`trusted.overlay.overlay.X`) exactly as the
//! engine stores such user xattrs, so the merged view shows the source unchanged. What the
//! format cannot hold is refused: a 0/0 character device (it would read as a whiteout) and
//! an xattr in layervol's private namespace.
//!
//! Reads the source only through directory fds without following symlinks; writes only
//! below the destination root.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::blockmap::{PRIVATE_XATTR_PREFIXES, data_extents};
use super::error::{Result, VolumeError, errno_io};
use crate::sys::{self, Errno, Stat};

/// What an import copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportStats {
    pub entries: u64,
    pub data_bytes: u64,
    pub hard_links: u64,
}

/// The overlay xattr prefix of a volume.
fn overlay_prefix(userxattr: bool) -> &'static str {
    if userxattr {
        "user.overlay."
    } else {
        "trusted.overlay."
    }
}

fn is_private_layervol(key: &[u8]) -> bool {
    PRIVATE_XATTR_PREFIXES
        .iter()
        .any(|p| key.starts_with(p.as_bytes()))
}

pub(crate) fn open_dir(p: &Path) -> Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| errno_io("open directory", p)(Errno::EINVAL))?;
    // SAFETY: open(2) of a NUL-terminated path; the returned fd is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno_io("open directory", p)(Errno::last()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

struct Importer {
    src_root: PathBuf,
    dst_root_path: PathBuf,
    dst_root: OwnedFd,
    overlay_prefix: &'static str,
    /// (dev, ino) of a multiply-linked source object -> destination path of its first copy.
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: ImportStats,
}

/// Copies the contents and attributes of directory `src` into the empty directory `dst`.
pub(crate) fn import_tree(src: &Path, dst: &Path, userxattr: bool) -> Result<ImportStats> {
    let sroot = open_dir(src)?;
    let droot = open_dir(dst)?;
    super::progress::start(super::progress::Phase::Copy);
    let mut imp = Importer {
        src_root: src.to_path_buf(),
        dst_root_path: dst.to_path_buf(),
        dst_root: open_dir(dst)?,
        overlay_prefix: overlay_prefix(userxattr),
        links: HashMap::new(),
        stats: ImportStats::default(),
    };
    imp.copy_dir(sroot.as_fd(), droot.as_fd(), &[])?;
    let st = sys::fstat(sroot.as_fd()).map_err(errno_io("stat", src))?;
    imp.copy_attrs(
        sroot.as_fd(),
        sys::dot(),
        droot.as_fd(),
        sys::dot(),
        &st,
        &[],
    )?;
    Ok(imp.stats)
}

fn join(parent: &[u8], name: &CStr) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name.to_bytes());
    p
}

fn rel_path(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(rel))
    }
}

impl Importer {
    fn src(&self, rel: &[u8]) -> PathBuf {
        rel_path(&self.src_root, rel)
    }

    fn dst(&self, rel: &[u8]) -> PathBuf {
        rel_path(&self.dst_root_path, rel)
    }

    fn copy_dir(&mut self, sdir: BorrowedFd, ddir: BorrowedFd, rel: &[u8]) -> Result<()> {
        let mut names = sys::read_dir(sdir).map_err(errno_io("list", self.src(rel)))?;
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, _, _) in names {
            let path = join(rel, &name);
            let st = sys::fstatat(sdir, &name).map_err(errno_io("stat", self.src(&path)))?;
            self.copy_entry(sdir, ddir, &name, &path, &st)?;
        }
        Ok(())
    }

    fn copy_entry(
        &mut self,
        sdir: BorrowedFd,
        ddir: BorrowedFd,
        name: &CStr,
        path: &[u8],
        st: &Stat,
    ) -> Result<()> {
        let fmt = st.st_mode & libc::S_IFMT;
        self.stats.entries += 1;
        super::progress::entry();
        if fmt != libc::S_IFDIR && st.st_nlink > 1 {
            if let Some(first) = self.links.get(&(st.st_dev, st.st_ino)) {
                let first = first.clone();
                self.link_to(&first, ddir, name, path)?;
                self.stats.hard_links += 1;
                return Ok(());
            }
            self.links.insert((st.st_dev, st.st_ino), path.to_vec());
        }
        let create = |e| errno_io("create", self.dst(path))(e);
        match fmt {
            libc::S_IFDIR => {
                sys::mkdirat(ddir, name, 0o700).map_err(create)?;
                let s = sys::openat(sdir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                    .map_err(errno_io("open directory", self.src(path)))?;
                let d = sys::openat(ddir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                    .map_err(errno_io("open directory", self.dst(path)))?;
                self.copy_dir(s.as_fd(), d.as_fd(), path)?;
            }
            libc::S_IFREG => {
                let s = sys::openat(sdir, name, libc::O_RDONLY, 0)
                    .map_err(errno_io("open", self.src(path)))?;
                let d = sys::openat(
                    ddir,
                    name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )
                .map_err(create)?;
                let n = copy_data(s.as_fd(), d.as_fd(), st.st_size as u64)
                    .map_err(errno_io("copy data of", self.src(path)))?;
                self.stats.data_bytes += n;
            }
            libc::S_IFLNK => {
                let target =
                    sys::readlinkat(sdir, name).map_err(errno_io("read link", self.src(path)))?;
                let target = CString::new(target).map_err(|_| VolumeError::Unrepresentable {
                    path: self.src(path),
                    reason: "symlink target contains NUL".into(),
                })?;
                sys::symlinkat(&target, ddir, name).map_err(create)?;
            }
            libc::S_IFCHR if st.st_rdev == 0 => {
                return Err(VolumeError::Unrepresentable {
                    path: self.src(path),
                    reason: "it is a 0/0 character device, which a layer can only hold as a whiteout (is the source an overlay upper layer? import the merged view instead)".into(),
                });
            }
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK => {
                sys::mknodat(ddir, name, fmt | 0o600, st.st_rdev).map_err(create)?;
            }
            _ => {
                return Err(VolumeError::Unrepresentable {
                    path: self.src(path),
                    reason: format!("unknown file type {:o}", st.st_mode),
                });
            }
        }
        self.copy_attrs(sdir, name, ddir, name, st, path)
    }

    fn link_to(&self, first: &[u8], ddir: BorrowedFd, name: &CStr, path: &[u8]) -> Result<()> {
        let (parent, fname) = match first.iter().rposition(|b| *b == b'/') {
            Some(i) => (&first[..i], &first[i + 1..]),
            None => (&[][..], first),
        };
        let pc =
            CString::new(parent).map_err(|_| errno_io("link", self.dst(path))(Errno::EINVAL))?;
        let fc =
            CString::new(fname).map_err(|_| errno_io("link", self.dst(path))(Errno::EINVAL))?;
        let pdir = sys::open_dir_in_root(self.dst_root.as_fd(), &pc)
            .map_err(errno_io("open directory", self.dst(parent)))?;
        sys::linkat(pdir.as_fd(), &fc, ddir, name).map_err(errno_io("hard-link", self.dst(path)))
    }

    /// Owner, xattrs, mode, times, in the order that keeps each: chown clears set-id bits and
    /// file capabilities, so it comes first; mode after xattrs (ACLs also set mode bits);
    /// times last, after everything that changes ctime/mtime.
    fn copy_attrs(
        &self,
        sdir: BorrowedFd,
        sname: &CStr,
        ddir: BorrowedFd,
        dname: &CStr,
        st: &Stat,
        path: &[u8],
    ) -> Result<()> {
        let dst = || self.dst(path);
        let now = sys::fstatat(ddir, dname).map_err(errno_io("stat", dst()))?;
        if (now.st_uid, now.st_gid) != (st.st_uid, st.st_gid) {
            sys::fchownat(ddir, dname, st.st_uid, st.st_gid).map_err(|e| {
                VolumeError::Unrepresentable {
                    path: self.src(path),
                    reason: format!(
                        "cannot give the copy owner {}:{}: {e} (run as root to import files of other users)",
                        st.st_uid, st.st_gid
                    ),
                }
            })?;
        }
        let keys =
            sys::listxattr(sdir, sname).map_err(errno_io("list xattrs of", self.src(path)))?;
        for key in keys {
            let k = key.to_bytes();
            if is_private_layervol(k) {
                return Err(VolumeError::Unrepresentable {
                    path: self.src(path),
                    reason: format!(
                        "it carries xattr {}, which is in layervol's private namespace",
                        key.to_string_lossy()
                    ),
                });
            }
            let Some(value) = sys::getxattr(sdir, sname, &key)
                .map_err(errno_io("read xattrs of", self.src(path)))?
            else {
                continue;
            };
            let stored = match k.strip_prefix(self.overlay_prefix.as_bytes()) {
                Some(rest) => {
                    let mut v = format!("{}overlay.", self.overlay_prefix).into_bytes();
                    v.extend_from_slice(rest);
                    CString::new(v).expect("built from a CStr")
                }
                None => key.clone(),
            };
            sys::setxattr(ddir, dname, &stored, &value, 0).map_err(|e| {
                VolumeError::Unrepresentable {
                    path: self.src(path),
                    reason: format!(
                        "cannot copy xattr {}: {e} (trusted.* and security.* need root; the volume's filesystem must support xattrs)",
                        key.to_string_lossy()
                    ),
                }
            })?;
        }
        let fmt = st.st_mode & libc::S_IFMT;
        if fmt != libc::S_IFLNK {
            sys::fchmodat(ddir, dname, st.st_mode & 0o7777).map_err(errno_io("chmod", dst()))?;
        }
        let times = sys::times_of(st);
        sys::utimensat(ddir, dname, &times).map_err(errno_io("set times of", dst()))
    }
}

/// Copies `size` bytes of `src` to `dst`, data extents only, so holes stay holes. Returns the
/// bytes of data copied.
fn copy_data(src: BorrowedFd, dst: BorrowedFd, size: u64) -> sys::Result<u64> {
    let mut copied = 0;
    for r in data_extents(src, 0, size)? {
        copy_range_at(src, dst, r.start, r.end - r.start)?;
        copied += r.end - r.start;
    }
    sys::ftruncate(dst, size)?;
    Ok(copied)
}

/// Copies `[off, off + len)` between two files at the same offsets, in the kernel when it can.
fn copy_range_at(src: BorrowedFd, dst: BorrowedFd, off: u64, len: u64) -> sys::Result<()> {
    use std::os::fd::AsRawFd;
    let mut pos = off;
    let end = off + len;
    while pos < end {
        let mut a = pos as libc::loff_t;
        let mut b = pos as libc::loff_t;
        let chunk = (end - pos).min(1 << 30) as usize;
        // SAFETY: copy_file_range on two valid fds with offsets we own.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut a, dst.as_raw_fd(), &mut b, chunk, 0)
        };
        if n > 0 {
            super::progress::bytes(n as u64);
        }
        if n < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL => {
                    return copy_userspace(src, dst, pos, end);
                }
                e => return Err(e),
            }
        }
        if n == 0 {
            break; // the source shrank under us; ftruncate restores the recorded size
        }
        pos += n as u64;
    }
    Ok(())
}

fn copy_userspace(src: BorrowedFd, dst: BorrowedFd, mut pos: u64, end: u64) -> sys::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let n = sys::pread_full(src, &mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            done += sys::pwrite(dst, &buf[done..n], pos + done as u64)?;
        }
        super::progress::bytes(n as u64);
        pos += n as u64;
    }
    Ok(())
}

/// Gives the root of a new layer tree the attributes of the root of the layer below: owner,
/// mode, times and user-visible xattrs (not overlay or layervol format xattrs). The merged
/// root takes its attributes from the topmost layer, as in kernel overlayfs, so a fresh
/// empty upper must not change them.
pub(crate) fn copy_root_attrs(from: &Path, to: &Path, userxattr: bool) -> Result<RootStamp> {
    let s = open_dir(from)?;
    let d = open_dir(to)?;
    let dot = sys::dot();
    let st = sys::fstat(s.as_fd()).map_err(errno_io("stat", from))?;
    let dst = sys::fstat(d.as_fd()).map_err(errno_io("stat", to))?;
    // Only what differs is written: a freeze copies the attributes again under its barrier
    // when the root changed, where each write may wait for the filesystem's journal.
    let chowned = (st.st_uid, st.st_gid) != (dst.st_uid, dst.st_gid);
    if chowned {
        sys::fchownat(d.as_fd(), dot, st.st_uid, st.st_gid).map_err(errno_io("chown", to))?;
    }
    let prefix = overlay_prefix(userxattr).as_bytes();
    let copied = |k: &[u8]| {
        let format_xattr = k
            .strip_prefix(prefix)
            .is_some_and(|rest| !rest.starts_with(b"overlay."));
        !format_xattr && !is_private_layervol(k)
    };
    let keys = sys::listxattr(s.as_fd(), dot).map_err(errno_io("list xattrs of", from))?;
    // Copied earlier and removed from the source since.
    for key in sys::listxattr(d.as_fd(), dot).map_err(errno_io("list xattrs of", to))? {
        if copied(key.to_bytes()) && !keys.contains(&key) {
            sys::removexattr(d.as_fd(), dot, &key).map_err(errno_io("remove xattrs of", to))?;
        }
    }
    for key in keys {
        if !copied(key.to_bytes()) {
            continue;
        }
        let v = sys::getxattr(s.as_fd(), dot, &key).map_err(errno_io("read xattrs of", from))?;
        if let Some(v) = v
            && sys::getxattr(d.as_fd(), dot, &key)
                .map_err(errno_io("read xattrs of", to))?
                .as_ref()
                != Some(&v)
        {
            sys::setxattr(d.as_fd(), dot, &key, &v, 0).map_err(errno_io("set xattrs of", to))?;
        }
    }
    // After a chown, which may have cleared set-id bits.
    if chowned || (st.st_mode ^ dst.st_mode) & 0o7777 != 0 {
        sys::fchmodat(d.as_fd(), dot, st.st_mode & 0o7777).map_err(errno_io("chmod", to))?;
    }
    let times = sys::times_of(&st);
    let same =
        |a: &libc::timespec, b: &libc::timespec| (a.tv_sec, a.tv_nsec) == (b.tv_sec, b.tv_nsec);
    let had = sys::times_of(&dst);
    if !same(&times[0], &had[0]) || !same(&times[1], &had[1]) {
        sys::utimensat(d.as_fd(), dot, &times).map_err(errno_io("set times of", to))?;
    }
    Ok(RootStamp::of(&st))
}

/// What `copy_root_attrs` copied from, as far as a change of the source root would show:
/// every attribute change moves its ctime (and owner, mode and mtime are compared as well,
/// against a coarse clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootStamp([i64; 7]);

impl RootStamp {
    fn of(st: &libc::stat) -> Self {
        RootStamp([
            st.st_ctime,
            st.st_ctime_nsec,
            st.st_mtime,
            st.st_mtime_nsec,
            st.st_mode as i64,
            st.st_uid as i64,
            st.st_gid as i64,
        ])
    }

    /// The stamp of directory `dir` now.
    pub fn now(dir: &Path) -> Result<Self> {
        let s = open_dir(dir)?;
        Ok(Self::of(
            &sys::fstat(s.as_fd()).map_err(errno_io("stat", dir))?,
        ))
    }
}
