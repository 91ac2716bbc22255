//! Observation, normalisation and comparison of trees.
//!
//! A [`Tree`] is everything observable below a directory: for each path its type, permission
//! bits, owner, nlink, size (not for directories), rdev, mtime class, file contents, symlink
//! target, xattrs (as listed by `llistxattr` and read with `lgetxattr`), the `d_type` its
//! parent's readdir reported, and its inode number (kept only to derive identity relations,
//! never compared as a value: the two sides have different inode numbers by construction).
//!
//! What is deliberately not compared, and why:
//! - atime and ctime: they depend on relatime heuristics and on when copy-up happened.
//!   Scenarios that set times read them back with explicit ops instead.
//! - Directory `st_size`: an ext4 implementation detail of whichever layer holds the dir
//!   (overlayfs passes it through; it depends on the history of the directory's entries).
//! - Raw inode numbers: replaced by identity relations ([`link_groups`], [`ino_stability`]).
//! - mtimes are classified ([`TimeClass`]): a value set by the layer builder or by a utimens
//!   op (all below [`RECENT_THRESHOLD`]) must match exactly; a time the filesystem set to
//!   "now" only has to be "now" on both sides.
//!
//! Layer directories (the upper after unmount, and lower layers) are additionally
//! normalised by [`normalise_layer`], see there.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use crate::sys;

/// Times below this are deterministic (set by the builder or a scenario); at or above it
/// they are "now".
pub const RECENT_THRESHOLD: i64 = 1_500_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileType {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
    /// A 0/0 character device in a layer directory (only produced by [`normalise_layer`]).
    Whiteout,
    Unknown,
}

impl FileType {
    pub fn from_mode(mode: u32) -> FileType {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => FileType::Dir,
            libc::S_IFREG => FileType::File,
            libc::S_IFLNK => FileType::Symlink,
            libc::S_IFIFO => FileType::Fifo,
            libc::S_IFSOCK => FileType::Socket,
            libc::S_IFCHR => FileType::CharDev,
            libc::S_IFBLK => FileType::BlockDev,
            _ => FileType::Unknown,
        }
    }

    /// From a dirent `d_type`; `None` for `DT_UNKNOWN`.
    pub fn from_dtype(t: u8) -> Option<FileType> {
        Some(match t {
            libc::DT_DIR => FileType::Dir,
            libc::DT_REG => FileType::File,
            libc::DT_LNK => FileType::Symlink,
            libc::DT_FIFO => FileType::Fifo,
            libc::DT_SOCK => FileType::Socket,
            libc::DT_CHR => FileType::CharDev,
            libc::DT_BLK => FileType::BlockDev,
            _ => return None,
        })
    }
}

/// An mtime, classified (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeClass {
    Fixed(i64, i64),
    Recent,
}

impl TimeClass {
    pub fn new(sec: i64, nsec: i64) -> TimeClass {
        if sec < RECENT_THRESHOLD {
            TimeClass::Fixed(sec, nsec)
        } else {
            TimeClass::Recent
        }
    }
}

impl fmt::Display for TimeClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimeClass::Fixed(s, ns) => write!(f, "{s}.{ns:09}"),
            TimeClass::Recent => write!(f, "now"),
        }
    }
}

/// The comparable part of a `struct stat`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub ftype: FileType,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    /// `None` for directories (see the module doc).
    pub size: Option<u64>,
    /// Device numbers of character and block devices.
    pub rdev: Option<(u32, u32)>,
    pub mtime: TimeClass,
}

impl Meta {
    pub fn from_stat(st: &libc::stat) -> Meta {
        let ftype = FileType::from_mode(st.st_mode);
        Meta {
            ftype,
            perm: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: st.st_nlink,
            size: (ftype != FileType::Dir).then_some(st.st_size as u64),
            rdev: matches!(ftype, FileType::CharDev | FileType::BlockDev)
                .then(|| (sys::major(st.st_rdev), sys::minor(st.st_rdev))),
            mtime: TimeClass::new(st.st_mtime, st.st_mtime_nsec),
        }
    }
}

impl fmt::Display for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {:04o} {}:{} nlink={}",
            self.ftype, self.perm, self.uid, self.gid, self.nlink
        )?;
        if let Some(s) = self.size {
            write!(f, " size={s}")?;
        }
        if let Some((ma, mi)) = self.rdev {
            write!(f, " rdev={ma}:{mi}")?;
        }
        write!(f, " mtime={}", self.mtime)
    }
}

/// One path of a tree.
#[derive(Clone, Debug)]
pub struct Node {
    pub meta: Meta,
    /// Contents of regular files.
    pub content: Option<Vec<u8>>,
    /// Target of symlinks.
    pub target: Option<String>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// What the parent directory's readdir said (`None`: DT_UNKNOWN, or the root).
    pub dtype: Option<FileType>,
    /// Only used to derive identity relations.
    pub ino: u64,
}

/// Everything observable below a directory. Paths are relative, the root is `""`.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub nodes: BTreeMap<String, Node>,
    /// Calls that failed while walking (e.g. "readdir d: EIO").
    pub errors: Vec<String>,
}

/// Walks `root` without following symlinks and records everything (see the module doc).
pub fn snapshot(root: &Path) -> Tree {
    let mut tree = Tree::default();
    walk(root, "", None, &mut tree);
    tree
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

fn walk(root: &Path, rel: &str, dtype: Option<FileType>, tree: &mut Tree) {
    let path = root.join(rel);
    let shown = if rel.is_empty() { "/" } else { rel };
    let st = match sys::lstat(&path) {
        Ok(st) => st,
        Err(e) => {
            tree.errors.push(format!("lstat {shown}: {e}"));
            return;
        }
    };
    let meta = Meta::from_stat(&st);
    let mut node = Node {
        content: None,
        target: None,
        xattrs: BTreeMap::new(),
        dtype,
        ino: st.st_ino,
        meta,
    };
    match node.meta.ftype {
        FileType::File => match std::fs::read(&path) {
            Ok(data) => node.content = Some(data),
            Err(e) => tree.errors.push(format!("read {shown}: {e}")),
        },
        FileType::Symlink => match sys::readlink(&path) {
            Ok(t) => node.target = Some(String::from_utf8_lossy(&t).into_owned()),
            Err(e) => tree.errors.push(format!("readlink {shown}: {e}")),
        },
        _ => {}
    }
    match sys::llistxattr(&path) {
        Ok(names) => {
            for name in names {
                match sys::lgetxattr(&path, &name) {
                    Ok(v) => {
                        node.xattrs.insert(name, v);
                    }
                    Err(e) => tree.errors.push(format!("getxattr {shown} {name}: {e}")),
                }
            }
        }
        Err(e) => tree.errors.push(format!("listxattr {shown}: {e}")),
    }
    let is_dir = node.meta.ftype == FileType::Dir;
    tree.nodes.insert(rel.to_string(), node);
    if !is_dir {
        return;
    }
    match sys::read_dir(&path) {
        Ok(mut entries) => {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            for e in entries {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let name = String::from_utf8_lossy(&e.name).into_owned();
                walk(
                    root,
                    &join(rel, &name),
                    FileType::from_dtype(e.d_type),
                    tree,
                );
            }
        }
        Err(e) => tree.errors.push(format!("readdir {shown}: {e}")),
    }
}

/// Overlay-private xattrs whose values are bookkeeping of one particular filesystem
/// instance (file handles of lower inodes, uuids, cached link counts, "this dir may contain
/// copied-up entries" hints). They legitimately differ between the kernel and layervol.
const BOOKKEEPING_XATTRS: &[&str] = &[
    "trusted.overlay.origin",
    "trusted.overlay.impure",
    "trusted.overlay.nlink",
    "trusted.overlay.uuid",
    "trusted.overlay.upper",
    "trusted.overlay.index",
];

/// Normalises a layer directory (an upper after unmount, or a lower layer):
/// - whiteouts (0/0 character devices) become [`FileType::Whiteout`] with mode, owner,
///   times and link count dropped: the format defines a whiteout by its device number only,
///   and the kernel shares one whiteout inode between many names (so they are also left
///   out of hard-link groups);
/// - bookkeeping xattrs ([`BOOKKEEPING_XATTRS`]) are dropped, the redirect xattr is kept as
///   "present" only (its value is a path that may legitimately be absolute or relative; what
///   it means is checked by looking at the layers through a kernel mount instead);
///   the opaque xattr and any other xattr is compared by value;
/// - the xattrs of the layer root are dropped (the kernel stamps uuid/origin/impure there).
pub fn normalise_layer(mut tree: Tree) -> Tree {
    for (path, node) in tree.nodes.iter_mut() {
        if node.meta.ftype == FileType::CharDev && node.meta.rdev == Some((0, 0)) {
            node.meta = Meta {
                ftype: FileType::Whiteout,
                perm: 0,
                uid: 0,
                gid: 0,
                nlink: 0,
                size: None,
                rdev: None,
                mtime: TimeClass::Recent,
            };
            node.dtype = node.dtype.map(|_| FileType::Whiteout);
        }
        if path.is_empty() {
            node.xattrs.clear();
            continue;
        }
        node.xattrs
            .retain(|name, _| !BOOKKEEPING_XATTRS.contains(&name.as_str()));
        if let Some(v) = node.xattrs.get_mut("trusted.overlay.redirect") {
            *v = b"<present>".to_vec();
        }
    }
    tree
}

/// Xattrs of layervol's own on-disk format (e.g. `trusted.layervol.partial` on partial
/// files). They belong to the layer format, like `trusted.overlay.*`; volume-mode views
/// ignore them.
pub const LAYERVOL_XATTR_PREFIX: &str = "trusted.layervol.";

/// Volume mode: `b`'s view of a directory's link count adjusted to the oracle's `a`.
/// Overlayfs reports `nlink = 1` for a merged directory (one present in several layers)
/// instead of counting subdirectories. A volume's base layer is the *flattened* merged view
/// of the scenario's lowers, so a directory merged from several lowers on the kernel is a
/// plain directory in the volume, with its real link count. The other way round, copying
/// up a lower hard-linked file links all its names into the upper (`src/fs/links.rs`), so
/// their directories become merged in the volume where the kernel (which finds them through
/// its index) leaves them lower. Where either side says 1 for a directory, any count is
/// accepted; elsewhere directory link counts are compared.
pub fn align_volume_meta(a: &Meta, b: &Meta) -> Meta {
    let mut b = b.clone();
    if a.ftype == FileType::Dir && b.ftype == FileType::Dir && (a.nlink == 1 || b.nlink == 1) {
        b.nlink = a.nlink;
    }
    b
}

/// Volume mode: `b` with [`align_volume_meta`] applied per path against the oracle's `a`
/// and [`LAYERVOL_XATTR_PREFIX`] xattrs dropped.
pub fn align_volume_tree(a: &Tree, b: &Tree) -> Tree {
    let mut b = b.clone();
    for (path, node) in b.nodes.iter_mut() {
        if let Some(x) = a.nodes.get(path) {
            node.meta = align_volume_meta(&x.meta, &node.meta);
        }
        node.xattrs
            .retain(|name, _| !name.starts_with(LAYERVOL_XATTR_PREFIX));
    }
    b
}

/// Groups of paths sharing an inode (hard links), for non-directories. Whiteouts are left
/// out (see [`normalise_layer`]).
pub fn link_groups(tree: &Tree) -> BTreeSet<Vec<String>> {
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (path, node) in &tree.nodes {
        if !matches!(node.meta.ftype, FileType::Dir | FileType::Whiteout) {
            by_ino.entry(node.ino).or_default().push(path.clone());
        }
    }
    by_ino.into_values().filter(|g| g.len() > 1).collect()
}

/// For each path present in both trees: did its inode number stay the same?
pub fn ino_stability(before: &Tree, after: &Tree) -> BTreeMap<String, bool> {
    before
        .nodes
        .iter()
        .filter_map(|(p, n)| after.nodes.get(p).map(|m| (p.clone(), n.ino == m.ino)))
        .collect()
}

/// Renders bytes for a report: printable text as a quoted string, otherwise a summary.
pub fn show_bytes(b: &[u8]) -> String {
    const MAX: usize = 48;
    let printable = b
        .iter()
        .all(|c| c.is_ascii_graphic() || *c == b' ' || *c == b'\n');
    if printable && b.len() <= MAX {
        format!("{:?}", String::from_utf8_lossy(b))
    } else if printable {
        format!(
            "{:?}... ({} bytes)",
            String::from_utf8_lossy(&b[..MAX]),
            b.len()
        )
    } else {
        let head: Vec<String> = b.iter().take(8).map(|c| format!("{c:02x}")).collect();
        format!("<{} bytes: {}...>", b.len(), head.join(" "))
    }
}

fn show_path(p: &str) -> &str {
    if p.is_empty() { "/" } else { p }
}

/// Describes how two contents differ (lengths and the first differing offset).
pub fn content_diff(a: &[u8], b: &[u8]) -> String {
    let first = a.iter().zip(b).position(|(x, y)| x != y);
    match first {
        Some(off) => format!(
            "first difference at offset {off} (lengths {} vs {}); {} vs {}",
            a.len(),
            b.len(),
            show_bytes(&a[off..(off + 16).min(a.len())]),
            show_bytes(&b[off..(off + 16).min(b.len())])
        ),
        None => format!(
            "one is a prefix of the other (lengths {} vs {})",
            a.len(),
            b.len()
        ),
    }
}

/// All differences between two trees, one line each, prefixed with `ctx`.
/// `names` are the names of the two sides (oracle first).
pub fn diff_trees(ctx: &str, a: &Tree, b: &Tree, names: (&str, &str)) -> Vec<String> {
    let (na, nb) = names;
    let mut out = Vec::new();
    let paths: BTreeSet<&String> = a.nodes.keys().chain(b.nodes.keys()).collect();
    for p in paths {
        let sp = show_path(p);
        let (x, y) = match (a.nodes.get(p), b.nodes.get(p)) {
            (Some(x), Some(y)) => (x, y),
            (Some(x), None) => {
                out.push(format!("{ctx}: {sp:?} only in {na} ({})", x.meta));
                continue;
            }
            (None, Some(y)) => {
                out.push(format!("{ctx}: {sp:?} only in {nb} ({})", y.meta));
                continue;
            }
            (None, None) => unreachable!(),
        };
        if x.meta != y.meta {
            out.push(format!(
                "{ctx}: {sp:?} metadata: {na}=[{}] {nb}=[{}]",
                x.meta, y.meta
            ));
        }
        if x.content != y.content {
            let detail = match (&x.content, &y.content) {
                (Some(c), Some(d)) => content_diff(c, d),
                _ => "readable on one side only".to_string(),
            };
            out.push(format!("{ctx}: {sp:?} contents differ: {detail}"));
        }
        if x.target != y.target {
            out.push(format!(
                "{ctx}: {sp:?} symlink target: {na}={:?} {nb}={:?}",
                x.target, y.target
            ));
        }
        if x.dtype != y.dtype {
            out.push(format!(
                "{ctx}: {sp:?} readdir d_type: {na}={:?} {nb}={:?}",
                x.dtype, y.dtype
            ));
        }
        let names: BTreeSet<&String> = x.xattrs.keys().chain(y.xattrs.keys()).collect();
        for n in names {
            let (u, v) = (x.xattrs.get(n), y.xattrs.get(n));
            if u != v {
                let show = |o: Option<&Vec<u8>>| o.map_or("absent".to_string(), |v| show_bytes(v));
                out.push(format!(
                    "{ctx}: {sp:?} xattr {n}: {na}={} {nb}={}",
                    show(u),
                    show(v)
                ));
            }
        }
    }
    if a.errors != b.errors {
        out.push(format!(
            "{ctx}: walk errors: {na}={:?} {nb}={:?}",
            a.errors, b.errors
        ));
    }
    let (ga, gb) = (link_groups(a), link_groups(b));
    for g in ga.difference(&gb) {
        out.push(format!("{ctx}: {g:?} share an inode in {na} only"));
    }
    for g in gb.difference(&ga) {
        out.push(format!("{ctx}: {g:?} share an inode in {nb} only"));
    }
    out
}
