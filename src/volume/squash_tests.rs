//! Tests of squash and export on real volumes (tempfile directories on the test machine's
//! filesystem). They need root (trusted.* xattrs, mknod, chown, open_by_handle_at, overlay
//! mounts) and fail loudly without it.
//!
//! The central check is model-based: a generator applies random operations to an in-memory
//! model of the merged view and writes the same operations into the layers in overlay format
//! (whiteouts, xattr whiteouts, opaque dirs, absolute and relative redirects, partial files
//! made with the `BlockMap` API over `layervol.below` handles, metadata-only copy-ups, hard
//! links, symlinks, fifos, devices, xattrs). The merged view is then observed four ways:
//! the model, a small reference merger reading the layer trees, the real engine
//! (`fs::Overlay`, in process), and (for kernel-compatible results) a kernel overlay mount.
//! All must agree before a squash, after it, and in an export.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, CString};
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::blockmap::{self, BlockMap, MapStore, Source};
use super::manifest::Manifest;
use super::meta;
use super::squash::{self, SquashOptions, below_xattr};
use super::store::{LayerState, Volume};
use super::{MapId, VolumeError};
use crate::sys;

fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (trusted.* xattrs, mknod, open_by_handle_at, overlay mounts); run the suite as root like CI does"
    );
}

fn c(s: &[u8]) -> CString {
    CString::new(s).unwrap()
}

fn join(p: &str, n: &str) -> String {
    if p.is_empty() {
        n.to_string()
    } else {
        format!("{p}/{n}")
    }
}

fn parent_of(p: &str) -> (&str, &str) {
    match p.rfind('/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => ("", p),
    }
}

fn under(p: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() {
        p.to_path_buf()
    } else {
        p.join(rel)
    }
}

/// (parent dir fd, name) of a path, for the `sys` xattr calls.
fn at(p: &Path) -> (fs::File, CString) {
    match p.file_name() {
        Some(n) => (
            fs::File::open(p.parent().unwrap()).unwrap(),
            c(n.as_bytes()),
        ),
        None => (fs::File::open(p).unwrap(), c(b".")),
    }
}

fn lxattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let (d, n) = at(p);
    sys::listxattr(d.as_fd(), &n)
        .unwrap()
        .into_iter()
        .filter_map(|k| {
            let v = sys::getxattr(d.as_fd(), &n, &k).unwrap()?;
            Some((k.to_bytes().to_vec(), v))
        })
        .collect()
}

fn getx(p: &Path, key: &CStr) -> Option<Vec<u8>> {
    let (d, n) = at(p);
    sys::getxattr(d.as_fd(), &n, key).unwrap()
}

fn setx(p: &Path, key: &[u8], v: &[u8]) {
    let (d, n) = at(p);
    sys::setxattr(d.as_fd(), &n, &c(key), v, 0).unwrap();
}

fn set_mtime(p: &Path, t: i64) {
    let (d, n) = at(p);
    let ts = [
        libc::timespec {
            tv_sec: 1_600_000_000,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: t,
            tv_nsec: 12345,
        },
    ];
    sys::utimensat(d.as_fd(), &n, &ts).unwrap();
}

fn mknod(p: &Path, mode: u32, rdev: u64) {
    let cp = c(p.as_os_str().as_bytes());
    assert_eq!(
        unsafe { libc::mknod(cp.as_ptr(), mode, rdev) },
        0,
        "mknod {}",
        p.display()
    );
}

// ---------------------------------------------------------------------------------------
// Views: what a merged view shows, path -> object

#[derive(Debug, Clone, PartialEq, Eq)]
struct Obj {
    /// Type and content: "dir", "file <bytes>", "link <target>", "fifo", "chr <rdev>"...
    what: String,
    data: Vec<u8>,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The other names of this file's hard link group in the view.
    links: Vec<String>,
}

type View = BTreeMap<String, Obj>;

fn obj_from_stat(st: &libc::stat, what: &str, data: Vec<u8>) -> Obj {
    Obj {
        what: what.to_string(),
        data,
        perm: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: (st.st_mtime, st.st_mtime_nsec),
        xattrs: BTreeMap::new(),
        links: Vec::new(),
    }
}

fn kind_name(mode: u32, rdev: u64) -> String {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "dir".into(),
        libc::S_IFREG => "file".into(),
        libc::S_IFLNK => "symlink".into(),
        libc::S_IFIFO => "fifo".into(),
        libc::S_IFSOCK => "socket".into(),
        libc::S_IFCHR => format!("chr {rdev}"),
        libc::S_IFBLK => format!("blk {rdev}"),
        m => format!("type {m:o}"),
    }
}

/// Fills `links` from an identity per non-directory path.
fn set_links(view: &mut View, ids: &BTreeMap<String, (u64, u64)>) {
    let mut groups: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    for (p, id) in ids {
        groups.entry(*id).or_default().push(p.clone());
    }
    for (p, id) in ids {
        let g = &groups[id];
        if g.len() > 1 {
            view.get_mut(p).unwrap().links = g.iter().filter(|q| *q != p).cloned().collect();
        }
    }
}

/// A plain directory tree (an export, a kernel overlay mount).
fn describe_tree(root: &Path) -> View {
    let mut view = View::new();
    let mut ids = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let p = under(root, &rel);
        let md = match fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(e) => {
                // Listed but not found: show it as such (a kernel overlay view can do this).
                let mut o = obj_from_stat(
                    &unsafe { std::mem::zeroed() },
                    "listed, lookup fails",
                    Vec::new(),
                );
                o.data = e.to_string().into_bytes();
                view.insert(rel, o);
                continue;
            }
        };
        let st = stat_of(&p);
        let ft = md.file_type();
        let data = if ft.is_file() {
            fs::read(&p).unwrap()
        } else if ft.is_symlink() {
            fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()
        } else {
            Vec::new()
        };
        let mut o = obj_from_stat(&st, &kind_name(st.st_mode, st.st_rdev), data);
        o.xattrs = lxattrs(&p);
        if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(join(&rel, e.unwrap().file_name().to_str().unwrap()));
            }
        } else {
            ids.insert(rel.clone(), (md.dev(), md.ino()));
        }
        view.insert(rel, o);
    }
    set_links(&mut view, &ids);
    view
}

fn stat_of(p: &Path) -> libc::stat {
    let (d, n) = at(p);
    sys::fstatat(d.as_fd(), &n).unwrap()
}

/// The view the real engine serves for the volume (in process, no FUSE mount).
fn engine_view(vol: &Volume) -> View {
    use crate::fs::{Config, MapDirs, Overlay, ROOT_INO};
    let cfg = Config {
        lowers: vol.lower_dirs(),
        upper: Some(vol.upper_dir()),
        work: Some(vol.work_dir()),
        userxattr: vol.userxattr(),
        block_size: u64::from(vol.block_size()),
        index: false,
        maps: Some(MapDirs {
            layers: vol.path().join("layers"),
        }),
        passthrough: false,
        ..Config::default()
    };
    let ov = Overlay::new(cfg).unwrap();
    let mut view = View::new();
    let mut ids = BTreeMap::new();
    let root = ov.getattr(ROOT_INO, None).unwrap();
    let mut stack = vec![(String::new(), ROOT_INO, root)];
    while let Some((rel, ino, st)) = stack.pop() {
        let fmt = st.st_mode & libc::S_IFMT;
        let data = match fmt {
            libc::S_IFREG => {
                let (fh, _, _) = ov.open(ino, libc::O_RDONLY).unwrap();
                let mut out = Vec::new();
                loop {
                    let b = ov.read(fh, out.len() as u64, 1 << 20).unwrap();
                    if b.is_empty() {
                        break;
                    }
                    out.extend(b);
                }
                ov.release(fh);
                out
            }
            libc::S_IFLNK => ov.readlink(ino).unwrap(),
            _ => Vec::new(),
        };
        let mut o = obj_from_stat(&st, &kind_name(st.st_mode, st.st_rdev), data);
        let names = ov.listxattr(ino).unwrap();
        for k in names.split(|b| *b == 0).filter(|k| !k.is_empty()) {
            let v = ov.getxattr(ino, &c(k)).unwrap();
            o.xattrs.insert(k.to_vec(), v);
        }
        if fmt == libc::S_IFDIR {
            let node = ov.node(ino).unwrap();
            for e in ov.list_dir(&node).unwrap() {
                let (n, a) = ov.lookup(ino, &e.name).unwrap();
                stack.push((join(&rel, e.name.to_str().unwrap()), n.ino, a));
            }
        } else {
            ids.insert(rel.clone(), (0, ino));
        }
        view.insert(rel, o);
    }
    set_links(&mut view, &ids);
    view
}

// ---------------------------------------------------------------------------------------
// A small reference merger: kernel overlay rules over the layer trees, read with std::fs

struct RefMerger {
    /// Layer trees and block maps, topmost first.
    layers: Vec<(PathBuf, MapStore)>,
    prefix: &'static str,
    userxattr: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RKind {
    Whiteout,
    Dir,
    Other,
}

impl RefMerger {
    fn new(vol: &Volume) -> Self {
        RefMerger {
            layers: vol
                .layers()
                .iter()
                .rev()
                .map(|l| (vol.tree_dir(l.epoch), vol.maps(l.epoch)))
                .collect(),
            prefix: if vol.userxattr() {
                "user.overlay."
            } else {
                "trusted.overlay."
            },
            userxattr: vol.userxattr(),
        }
    }

    fn p(&self, li: usize, path: &str) -> PathBuf {
        under(&self.layers[li].0, path)
    }

    fn key(&self, k: &str) -> CString {
        c(format!("{}{k}", self.prefix).as_bytes())
    }

    fn kind(&self, li: usize, path: &str) -> Option<RKind> {
        let p = self.p(li, path);
        let md = fs::symlink_metadata(&p).ok()?;
        let ft = md.file_type();
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() && md.rdev() == 0 {
            return Some(RKind::Whiteout);
        }
        if ft.is_file() && md.len() == 0 && getx(&p, &self.key("whiteout")).is_some() {
            return Some(RKind::Whiteout);
        }
        Some(if ft.is_dir() {
            RKind::Dir
        } else {
            RKind::Other
        })
    }

    /// Kernel lookup of `name` below a directory whose lower stack is `stack`. Returns the
    /// objects found (topmost first) and whether the name was deleted.
    fn lookup(&self, stack: &[(usize, String)], name: &str) -> (Vec<(usize, String)>, bool) {
        let mut target: Result<String, String> = Err(name.to_string()); // Ok = absolute
        let mut hits: Vec<(usize, String)> = Vec::new();
        let mut is_dir = false;
        let mut order: Vec<(usize, String)> = stack.to_vec();
        let mut i = 0;
        while i < order.len() {
            let (li, base) = order[i].clone();
            i += 1;
            let path = match &target {
                Ok(abs) => abs.clone(),
                Err(n) => join(&base, n),
            };
            // Intermediate components of an absolute name must be plain directories here.
            if target.is_ok() {
                let comps: Vec<&str> = path.split('/').collect();
                let mut ok = true;
                for k in 1..comps.len() {
                    let pre = comps[..k].join("/");
                    match self.kind(li, &pre) {
                        None => {
                            ok = false;
                            break;
                        }
                        Some(RKind::Dir) => {}
                        Some(_) => {
                            let deleted = hits.is_empty();
                            return (hits, deleted);
                        }
                    }
                }
                if !ok {
                    continue;
                }
            }
            match self.kind(li, &path) {
                None => continue,
                Some(RKind::Whiteout) => {
                    let deleted = hits.is_empty();
                    return (hits, deleted);
                }
                Some(RKind::Other) => {
                    if !is_dir {
                        hits.push((li, path));
                    }
                    return (hits, false);
                }
                Some(RKind::Dir) => {
                    is_dir = true;
                    let p = self.p(li, &path);
                    hits.push((li, path.clone()));
                    if getx(&p, &self.key("opaque")).as_deref() == Some(b"y") {
                        return (hits, false);
                    }
                    if let Some(r) = getx(&p, &self.key("redirect")) {
                        let r = String::from_utf8(r).unwrap();
                        if let Some(abs) = r.strip_prefix('/') {
                            target = Ok(abs.to_string());
                            // Continue in every layer below, from the roots.
                            order = (li + 1..self.layers.len())
                                .map(|l| (l, String::new()))
                                .collect();
                            i = 0;
                        } else {
                            target = Err(r);
                        }
                    }
                }
            }
        }
        (hits, false)
    }

    fn view(&self) -> View {
        let mut view = View::new();
        let mut ids = BTreeMap::new();
        let root_stack: Vec<(usize, String)> =
            (0..self.layers.len()).map(|l| (l, String::new())).collect();
        view.insert(String::new(), self.obj(0, ""));
        let mut todo = vec![(String::new(), root_stack)];
        while let Some((vpath, stack)) = todo.pop() {
            let mut names = BTreeSet::new();
            for (li, p) in &stack {
                for e in fs::read_dir(self.p(*li, p)).unwrap() {
                    names.insert(e.unwrap().file_name().to_str().unwrap().to_string());
                }
            }
            for n in names {
                let (hits, _) = self.lookup(&stack, &n);
                let Some((li, path)) = hits.first().cloned() else {
                    continue;
                };
                let child = join(&vpath, &n);
                let o = self.obj(li, &path);
                if o.what == "dir" {
                    todo.push((child.clone(), hits.clone()));
                } else {
                    let md = fs::symlink_metadata(self.p(li, &path)).unwrap();
                    ids.insert(child.clone(), (li as u64, md.ino()));
                }
                view.insert(child, o);
            }
        }
        set_links(&mut view, &ids);
        view
    }

    fn obj(&self, li: usize, path: &str) -> Obj {
        let p = self.p(li, path);
        let st = stat_of(&p);
        let fmt = st.st_mode & libc::S_IFMT;
        let data = match fmt {
            libc::S_IFREG => self.content(li, path),
            libc::S_IFLNK => fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec(),
            _ => Vec::new(),
        };
        let mut o = obj_from_stat(&st, &kind_name(st.st_mode, st.st_rdev), data);
        for (k, v) in lxattrs(&p) {
            if k.starts_with(b"trusted.layervol.") || k.starts_with(b"user.layervol.") {
                continue;
            }
            match k.strip_prefix(self.prefix.as_bytes()) {
                None => {
                    o.xattrs.insert(k, v);
                }
                Some(rest) => {
                    if let Some(inner) = rest.strip_prefix(b"overlay.") {
                        let mut vk = self.prefix.as_bytes().to_vec();
                        vk.extend_from_slice(inner);
                        o.xattrs.insert(vk, v);
                    }
                }
            }
        }
        o
    }

    /// The content of the file at `path` in layer `li`; for a partial file, its own blocks
    /// over what its `layervol.below` handle names (found by inode in the layer trees).
    fn content(&self, li: usize, path: &str) -> Vec<u8> {
        let p = self.p(li, path);
        let data = fs::read(&p).unwrap();
        let Some(m) = getx(&p, blockmap::marker_xattr(self.userxattr)) else {
            return data;
        };
        let map = self.layers[li]
            .1
            .load(blockmap::decode_marker(&m).unwrap())
            .unwrap();
        let below = match getx(&p, below_xattr(self.userxattr)) {
            None => Vec::new(),
            Some(fb) => {
                let mount = fs::File::open(&self.layers[0].0).unwrap();
                let fd = crate::layer::open_by_fb(&fb, mount.as_fd(), libc::O_PATH).unwrap();
                let st = sys::fstat(fd.as_fd()).unwrap();
                let (lj, pj) = self.find_inode((st.st_dev, st.st_ino));
                self.content(lj, &pj)
            }
        };
        let bs = u64::from(map.block_size());
        (0..map.size())
            .map(|o| {
                if map.present().contains(o / bs) {
                    data[o as usize]
                } else if o < map.below_limit() {
                    below.get(o as usize).copied().unwrap_or(0)
                } else {
                    0
                }
            })
            .collect()
    }

    /// Where an inode of some layer is (a full walk: test volumes are small).
    fn find_inode(&self, key: (u64, u64)) -> (usize, String) {
        for li in 0..self.layers.len() {
            let mut stack = vec![String::new()];
            while let Some(rel) = stack.pop() {
                for e in fs::read_dir(self.p(li, &rel)).unwrap() {
                    let e = e.unwrap();
                    let q = join(&rel, e.file_name().to_str().unwrap());
                    let md = fs::symlink_metadata(self.p(li, &q)).unwrap();
                    if (md.dev(), md.ino()) == key {
                        return (li, q);
                    }
                    if md.is_dir() {
                        stack.push(q);
                    }
                }
            }
        }
        panic!("inode {key:?} is in no layer")
    }
}

// ---------------------------------------------------------------------------------------
// The generator: a model of the view, and the same operations written into the layers

#[derive(Debug, Clone, PartialEq, Eq)]
enum MKind {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Fifo,
    Chr(u64),
}

#[derive(Debug, Clone)]
struct MNode {
    kind: MKind,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    /// View names.
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Layer (index from the bottom) and path of the topmost object.
    src: usize,
    src_path: String,
    /// Hard link group (names of one inode of layer `src`).
    group: Option<u64>,
}

impl MNode {
    fn expected(&self) -> Obj {
        let (what, data) = match &self.kind {
            MKind::Dir => ("dir".to_string(), Vec::new()),
            MKind::File(d) => ("file".to_string(), d.clone()),
            MKind::Symlink(t) => ("symlink".to_string(), t.clone()),
            MKind::Fifo => ("fifo".to_string(), Vec::new()),
            MKind::Chr(r) => (format!("chr {r}"), Vec::new()),
        };
        let is_link = matches!(self.kind, MKind::Symlink(_));
        Obj {
            what,
            data,
            perm: if is_link { 0o777 } else { self.perm },
            uid: self.uid,
            gid: self.gid,
            mtime: (self.mtime, 12345),
            xattrs: self.xattrs.clone(),
            links: Vec::new(),
        }
    }
}

const NAMES: [&str; 6] = ["a", "b", "c", "dd", "e", "f"];
const IDS: [u32; 3] = [0, 1000, 4242];

struct Gen {
    _t: tempfile::TempDir,
    root: PathBuf,
    vol: Volume,
    view: BTreeMap<String, MNode>,
    /// Index of the active layer (epoch - 1).
    layer: usize,
    /// The layer that stays active at the end (no xattr whiteouts there: the kernel reads
    /// them only in lower layers).
    last_layer: usize,
    clock: i64,
    next_group: u64,
    /// View dirs that are (or are under) a renamed directory: renaming below them would need
    /// redirects of intermediate components, which the engine does not follow.
    redirected: BTreeSet<String>,
    partials: u64,
    log: Vec<String>,
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 97) as u8).wrapping_mul(31) | 1)
        .collect()
}

impl Gen {
    fn new(last_layer: usize) -> Gen {
        require_root();
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        let vol = Volume::create(&root.join("vol"), 512, None).unwrap();
        let tree = vol.upper_dir();
        set_mtime(&tree, 1_700_000_000);
        let md = fs::metadata(&tree).unwrap();
        let mut view = BTreeMap::new();
        view.insert(
            String::new(),
            MNode {
                kind: MKind::Dir,
                perm: md.permissions().mode() & 0o7777,
                uid: 0,
                gid: 0,
                mtime: 1_700_000_000,
                xattrs: BTreeMap::new(),
                src: 0,
                src_path: String::new(),
                group: None,
            },
        );
        Gen {
            _t: t,
            root,
            vol,
            view,
            layer: 0,
            last_layer,
            clock: 1_700_000_100,
            next_group: 1,
            redirected: BTreeSet::new(),
            partials: 0,
            log: Vec::new(),
        }
    }

    fn tree(&self) -> PathBuf {
        self.vol.upper_dir()
    }

    fn lp(&self, path: &str) -> PathBuf {
        under(&self.tree(), path)
    }

    fn tick(&mut self) -> i64 {
        self.clock += 7;
        self.clock
    }

    fn in_layer(&self, path: &str) -> Option<fs::Metadata> {
        fs::symlink_metadata(self.lp(path)).ok()
    }

    fn stored_key(&self, view_key: &[u8]) -> Vec<u8> {
        match view_key.strip_prefix(b"trusted.overlay.") {
            Some(rest) => [b"trusted.overlay.overlay.".as_slice(), rest].concat(),
            None => view_key.to_vec(),
        }
    }

    /// Owner, xattrs, mode, mtime of the model node onto the layer object at `path`.
    fn apply_meta(&self, path: &str) {
        let n = &self.view[path];
        let p = self.lp(path);
        let (d, name) = at(&p);
        sys::fchownat(d.as_fd(), &name, n.uid, n.gid).unwrap();
        for (k, v) in &n.xattrs {
            setx(&p, &self.stored_key(k), v);
        }
        if !matches!(n.kind, MKind::Symlink(_)) {
            sys::fchmodat(d.as_fd(), &name, n.perm).unwrap();
        }
        set_mtime(&p, n.mtime);
    }

    fn remove_in_layer(&self, path: &str) {
        if let Some(md) = self.in_layer(path) {
            if md.is_dir() {
                fs::remove_dir_all(self.lp(path)).unwrap();
            } else {
                fs::remove_file(self.lp(path)).unwrap();
            }
        }
    }

    /// Copies up the directory `path` and its ancestors into this layer (plain dirs).
    fn ensure_dir(&mut self, path: &str) {
        let mut pre = String::new();
        let comps: Vec<String> = if path.is_empty() {
            Vec::new()
        } else {
            path.split('/').map(str::to_string).collect()
        };
        for comp in comps {
            pre = join(&pre, &comp);
            if self.in_layer(&pre).is_some() {
                continue;
            }
            fs::create_dir(self.lp(&pre)).unwrap();
            self.apply_meta(&pre);
            let l = self.layer;
            let n = self.view.get_mut(&pre).unwrap();
            n.src = l;
            n.src_path = pre.clone();
        }
    }

    /// Puts a whiteout at `path` (nothing at the bottom layer).
    fn whiteout(&mut self, path: &str, xattr_style: bool) {
        self.remove_in_layer(path);
        if self.layer == 0 {
            return;
        }
        let (parent, _) = parent_of(path);
        let parent = parent.to_string();
        self.ensure_dir(&parent);
        let xattr_ok = xattr_style
            && !parent.is_empty()
            && self.layer != self.last_layer
            && getx(&self.lp(&parent), c"trusted.overlay.opaque").is_none();
        if xattr_ok {
            fs::write(self.lp(path), b"").unwrap();
            setx(&self.lp(path), b"trusted.overlay.whiteout", b"y");
            setx(&self.lp(&parent), b"trusted.overlay.opaque", b"x");
        } else {
            mknod(&self.lp(path), libc::S_IFCHR, 0);
        }
    }

    fn remove_model(&mut self, path: &str) {
        let keys: Vec<String> = self
            .view
            .keys()
            .filter(|k| *k == path || k.starts_with(&format!("{path}/")))
            .cloned()
            .collect();
        for k in keys {
            self.view.remove(&k);
            self.redirected.remove(&k);
        }
    }

    fn dirs(&self) -> Vec<String> {
        self.view
            .iter()
            .filter(|(_, n)| n.kind == MKind::Dir)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn files(&self) -> Vec<String> {
        self.view
            .iter()
            .filter(|(_, n)| matches!(n.kind, MKind::File(_)))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn nonroot(&self) -> Vec<String> {
        self.view
            .keys()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect()
    }

    fn pick(v: &[String], i: u16) -> Option<String> {
        (!v.is_empty()).then(|| v[i as usize % v.len()].clone())
    }

    /// A new name in directory `dir`, or None if taken.
    fn new_name(&self, dir: &str, n: u16) -> Option<String> {
        let p = join(dir, NAMES[n as usize % NAMES.len()]);
        (!self.view.contains_key(&p)).then_some(p)
    }

    fn new_node(&mut self, kind: MKind, path: &str, seed: u16) -> MNode {
        MNode {
            kind,
            perm: [0o644, 0o600, 0o755, 0o4711][seed as usize % 4],
            uid: IDS[seed as usize % 3],
            gid: IDS[(seed as usize / 3) % 3],
            mtime: self.tick(),
            xattrs: if seed.is_multiple_of(5) {
                [(b"user.origin".to_vec(), path.to_string().into_bytes())].into()
            } else {
                BTreeMap::new()
            },
            src: self.layer,
            src_path: path.to_string(),
            group: None,
        }
    }

    /// Writes the model's file `path` into this layer as a whole file (new object).
    fn create_entry(&mut self, path: &str) {
        let (parent, _) = parent_of(path);
        let parent = parent.to_string();
        self.ensure_dir(&parent);
        self.remove_in_layer(path);
        let p = self.lp(path);
        match self.view[path].kind.clone() {
            MKind::File(d) => fs::write(&p, d).unwrap(),
            MKind::Dir => fs::create_dir(&p).unwrap(),
            MKind::Symlink(t) => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&t), &p).unwrap()
            }
            MKind::Fifo => mknod(&p, libc::S_IFIFO | 0o600, 0),
            MKind::Chr(r) => mknod(&p, libc::S_IFCHR | 0o600, r),
        }
        self.apply_meta(path);
    }

    /// The partial file of `path` in this layer (made by a metadata-only block copy-up if
    /// the file lives below), or None if this layer holds it whole.
    fn partial_of(&mut self, path: &str) -> Option<(fs::File, BlockMap)> {
        let n = self.view[path].clone();
        let MKind::File(data) = &n.kind else {
            panic!("not a file")
        };
        let maps = self.vol.maps(self.vol.active_epoch());
        if n.src == self.layer {
            let m = getx(&self.lp(path), blockmap::marker_xattr(false))?;
            let map = maps.load(blockmap::decode_marker(&m).unwrap()).unwrap();
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.lp(path))
                .unwrap();
            return Some((f, map));
        }
        let (parent, _) = parent_of(path);
        let parent = parent.to_string();
        self.ensure_dir(&parent);
        self.remove_in_layer(path);
        let below = under(&self.vol.tree_dir(n.src as u64 + 1), &n.src_path);
        let (bd, bn) = at(&below);
        let mount = fs::File::open(self.vol.path()).unwrap();
        let fb = crate::layer::encode_origin(bd.as_fd(), &bn, mount.as_fd()).unwrap();
        let id = MapId::random().unwrap();
        let map = BlockMap::new(id, self.vol.block_size(), data.len() as u64).unwrap();
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.lp(path))
            .unwrap();
        f.set_len(data.len() as u64).unwrap();
        maps.store(&map).unwrap();
        let p = self.lp(path);
        setx(&p, below_xattr(false).to_bytes(), &fb);
        setx(
            &p,
            blockmap::marker_xattr(false).to_bytes(),
            &blockmap::encode_marker(id),
        );
        let l = self.layer;
        let node = self.view.get_mut(path).unwrap();
        node.src = l;
        node.src_path = path.to_string();
        node.group = None;
        self.apply_meta(path);
        self.partials += 1;
        Some((f, map))
    }

    /// The names sharing `path`'s inode in this layer (itself included).
    fn group_of(&self, path: &str) -> Vec<String> {
        let n = &self.view[path];
        match n.group {
            Some(g) if n.src == self.layer => self
                .view
                .iter()
                .filter(|(_, m)| m.group == Some(g) && m.src == self.layer)
                .map(|(k, _)| k.clone())
                .collect(),
            _ => vec![path.to_string()],
        }
    }

    fn set_content(&mut self, path: &str, data: Vec<u8>, mtime: i64) {
        for q in self.group_of(path) {
            let n = self.view.get_mut(&q).unwrap();
            n.kind = MKind::File(data.clone());
            n.mtime = mtime;
        }
    }

    /// One operation; `k` picks the kind, the others pick targets and values.
    fn op(&mut self, k: u8, a: u16, b: u16, v: u16, x: u8) {
        match k % 12 {
            0 | 1 => {
                // New file (sizes around block boundaries of 512).
                let Some(dir) = Self::pick(&self.dirs(), a) else {
                    return;
                };
                let Some(p) = self.new_name(&dir, b) else {
                    return;
                };
                let len = [0, 1, 511, 512, 513, 1500, 2048, 3000][v as usize % 8];
                let node = self.new_node(MKind::File(content(len, x)), &p, v);
                self.view.insert(p.clone(), node);
                self.create_entry(&p);
                self.log.push(format!("L{} file {p} {len}", self.layer));
            }
            2 => {
                let Some(dir) = Self::pick(&self.dirs(), a) else {
                    return;
                };
                let Some(p) = self.new_name(&dir, b) else {
                    return;
                };
                let node = self.new_node(MKind::Dir, &p, v);
                self.view.insert(p.clone(), node);
                let whiteout_here = self.in_layer(&p).is_some_and(|m| !m.is_dir());
                self.create_entry(&p);
                if whiteout_here {
                    // Like the kernel: a directory made over a whiteout is opaque.
                    setx(&self.lp(&p), b"trusted.overlay.opaque", b"y");
                }
                self.log.push(format!("L{} mkdir {p}", self.layer));
            }
            3 => {
                let Some(dir) = Self::pick(&self.dirs(), a) else {
                    return;
                };
                let Some(p) = self.new_name(&dir, b) else {
                    return;
                };
                let kind = match x % 3 {
                    0 => MKind::Symlink(format!("../target-{v}").into_bytes()),
                    1 => MKind::Fifo,
                    _ => MKind::Chr(libc::makedev(1, 3 + u32::from(x % 2))),
                };
                let mut node = self.new_node(kind, &p, v);
                // user.* xattrs exist only on files and directories.
                node.xattrs.clear();
                self.view.insert(p.clone(), node);
                self.create_entry(&p);
                self.log.push(format!("L{} special {p}", self.layer));
            }
            4 => {
                let Some(p) = Self::pick(&self.nonroot(), a) else {
                    return;
                };
                self.remove_model(&p);
                self.whiteout(&p, x.is_multiple_of(2));
                self.log.push(format!("L{} delete {p}", self.layer));
            }
            5 => {
                // Replace a directory by an empty opaque one.
                let dirs: Vec<String> = self.dirs().into_iter().filter(|d| !d.is_empty()).collect();
                let Some(p) = Self::pick(&dirs, a) else {
                    return;
                };
                let keep = self.view[&p].clone();
                self.remove_model(&p);
                self.remove_in_layer(&p);
                let node = MNode {
                    mtime: self.tick(),
                    src: self.layer,
                    src_path: p.clone(),
                    ..keep
                };
                self.view.insert(p.clone(), node);
                self.create_entry(&p);
                setx(&self.lp(&p), b"trusted.overlay.opaque", b"y");
                self.log.push(format!("L{} opaque {p}", self.layer));
            }
            6 => {
                // Rename a directory that lives below (redirect), abs or relative.
                let cand: Vec<String> = self
                    .dirs()
                    .into_iter()
                    .filter(|d| {
                        !d.is_empty()
                            && self.in_layer(d).is_none()
                            && !self
                                .redirected
                                .iter()
                                .any(|r| d.starts_with(&format!("{r}/")))
                    })
                    .collect();
                let Some(d) = Self::pick(&cand, a) else {
                    return;
                };
                let relative = x.is_multiple_of(2);
                let dest_dir = if relative {
                    parent_of(&d).0.to_string()
                } else {
                    let Some(dd) = Self::pick(&self.dirs(), b) else {
                        return;
                    };
                    dd
                };
                if dest_dir == d || dest_dir.starts_with(&format!("{d}/")) {
                    return;
                }
                let Some(e) = self.new_name(&dest_dir, v) else {
                    return;
                };
                let node = self.view[&d].clone();
                let rel_ok = relative && node.src_path == d;
                let redirect = if rel_ok {
                    parent_of(&d).1.as_bytes().to_vec()
                } else {
                    format!("/{}", node.src_path).into_bytes()
                };
                // Move the model subtree.
                let moved: Vec<(String, MNode)> = self
                    .view
                    .iter()
                    .filter(|(k, _)| **k == d || k.starts_with(&format!("{d}/")))
                    .map(|(k, n)| (k.clone(), n.clone()))
                    .collect();
                let moved_redirects: Vec<String> = self
                    .redirected
                    .iter()
                    .filter(|k| **k == d || k.starts_with(&format!("{d}/")))
                    .cloned()
                    .collect();
                self.remove_model(&d);
                for (k, n) in moved {
                    self.view.insert(format!("{e}{}", &k[d.len()..]), n);
                }
                for k in moved_redirects {
                    self.redirected.insert(format!("{e}{}", &k[d.len()..]));
                }
                self.redirected.insert(e.clone());
                let (ep, _) = parent_of(&e);
                let ep = ep.to_string();
                self.ensure_dir(&ep);
                // A whiteout of an older `e` goes: the redirect decides what lies below.
                self.remove_in_layer(&e);
                fs::create_dir(self.lp(&e)).unwrap();
                self.apply_meta(&e);
                setx(&self.lp(&e), b"trusted.overlay.redirect", &redirect);
                let l = self.layer;
                let n = self.view.get_mut(&e).unwrap();
                n.src = l;
                n.src_path = e.clone();
                self.whiteout(&d, false);
                self.log.push(format!(
                    "L{} rename {d} -> {e} ({})",
                    self.layer,
                    String::from_utf8_lossy(&redirect)
                ));
            }
            7 | 8 => {
                // Write into a file: a block copy-up if it lives below.
                let Some(p) = Self::pick(&self.files(), a) else {
                    return;
                };
                let MKind::File(old) = self.view[&p].kind.clone() else {
                    unreachable!()
                };
                let off = u64::from(b) % (old.len() as u64 + 700);
                let len = 1 + u64::from(v) % 900;
                let data: Vec<u8> = (0..len).map(|i| x.wrapping_add(i as u8) | 0x80).collect();
                let mut new = old.clone();
                let end = (off + len) as usize;
                if new.len() < end {
                    new.resize(end, 0);
                }
                new[off as usize..end].copy_from_slice(&data);
                match self.partial_of(&p) {
                    Some((f, mut map)) => {
                        for s in map.write_fill(off, len) {
                            let r = s.range.start as usize..s.range.end as usize;
                            let fill = match s.source {
                                Source::Below => old[r].to_vec(),
                                _ => vec![0; r.len()],
                            };
                            f.write_all_at(&fill, s.range.start).unwrap();
                        }
                        f.write_all_at(&data, off).unwrap();
                        map.record_write(f.as_fd(), off, &data).unwrap();
                        self.vol.maps(self.vol.active_epoch()).store(&map).unwrap();
                    }
                    None => {
                        let f = fs::OpenOptions::new()
                            .write(true)
                            .open(self.lp(&p))
                            .unwrap();
                        f.write_all_at(&data, off).unwrap();
                    }
                }
                let t = self.tick();
                self.set_content(&p, new, t);
                set_mtime(&self.lp(&p), t);
                self.log
                    .push(format!("L{} write {p} {off}+{len}", self.layer));
            }
            9 => {
                // Truncate (below limit shrinks in a partial file).
                let Some(p) = Self::pick(&self.files(), a) else {
                    return;
                };
                let MKind::File(old) = self.view[&p].kind.clone() else {
                    unreachable!()
                };
                let size = u64::from(b) % (old.len() as u64 + 600);
                let mut new = old.clone();
                new.resize(size as usize, 0);
                match self.partial_of(&p) {
                    Some((f, mut map)) => {
                        map.truncate_file(f.as_fd(), size).unwrap();
                        self.vol.maps(self.vol.active_epoch()).store(&map).unwrap();
                    }
                    None => {
                        let f = fs::OpenOptions::new()
                            .write(true)
                            .open(self.lp(&p))
                            .unwrap();
                        f.set_len(size).unwrap();
                    }
                }
                let t = self.tick();
                self.set_content(&p, new, t);
                set_mtime(&self.lp(&p), t);
                self.log
                    .push(format!("L{} truncate {p} {size}", self.layer));
            }
            10 => {
                // Metadata change: a metadata-only copy-up for files below.
                let Some(p) = Self::pick(&self.nonroot(), a) else {
                    return;
                };
                let n = self.view[&p].clone();
                match &n.kind {
                    MKind::File(_) => {
                        if n.src != self.layer {
                            self.partial_of(&p);
                        }
                    }
                    MKind::Dir => self.ensure_dir(&p),
                    _ => {
                        if n.src != self.layer {
                            let l = self.layer;
                            let m = self.view.get_mut(&p).unwrap();
                            m.src = l;
                            m.src_path = p.clone();
                            m.group = None;
                            self.create_entry(&p);
                        }
                    }
                }
                let t = self.tick();
                let is_special = !matches!(n.kind, MKind::File(_) | MKind::Dir);
                for q in if is_special {
                    vec![p.clone()]
                } else {
                    self.group_of(&p)
                } {
                    let m = self.view.get_mut(&q).unwrap();
                    m.mtime = t;
                    match x % 4 {
                        0 if !matches!(m.kind, MKind::Symlink(_)) => {
                            m.perm = [0o640, 0o700, 0o2755][v as usize % 3]
                        }
                        1 => m.uid = IDS[v as usize % 3],
                        2 if !is_special => {
                            let key = if v.is_multiple_of(2) {
                                "user.k"
                            } else {
                                "trusted.overlay.userkey"
                            };
                            m.xattrs
                                .insert(key.as_bytes().to_vec(), format!("v{v}").into_bytes());
                        }
                        _ => {}
                    }
                }
                self.apply_meta(&p);
                self.log.push(format!("L{} meta {p}", self.layer));
            }
            _ => {
                // Hard link to a file of this layer.
                let here: Vec<String> = self
                    .files()
                    .into_iter()
                    .filter(|f| self.view[f].src == self.layer)
                    .collect();
                let Some(p) = Self::pick(&here, a) else {
                    return;
                };
                let Some(dir) = Self::pick(&self.dirs(), b) else {
                    return;
                };
                let Some(q) = self.new_name(&dir, v) else {
                    return;
                };
                let (qp, _) = parent_of(&q);
                let qp = qp.to_string();
                self.ensure_dir(&qp);
                self.remove_in_layer(&q);
                fs::hard_link(self.lp(&p), self.lp(&q)).unwrap();
                let g = match self.view[&p].group {
                    Some(g) => g,
                    None => {
                        self.next_group += 1;
                        self.next_group
                    }
                };
                self.view.get_mut(&p).unwrap().group = Some(g);
                let mut n = self.view[&p].clone();
                n.src_path = q.clone();
                self.view.insert(q.clone(), n);
                // The parent's mtime changed with the new name; the model keeps dir times,
                // restored at the end of the layer.
                self.log.push(format!("L{} link {p} -> {q}", self.layer));
            }
        }
    }

    /// Restores the model's times of every directory of this layer (entries changed them).
    fn finish_layer(&mut self) {
        let dirs = self.dirs();
        for d in dirs {
            if self.in_layer(&d).is_some_and(|m| m.is_dir()) {
                set_mtime(&self.lp(&d), self.view[&d].mtime);
            }
        }
    }

    fn freeze(&mut self) {
        self.finish_layer();
        let f = self.vol.freeze_active().unwrap();
        self.layer = f.active_epoch as usize - 1;
        self.log.push(format!("freeze {}", f.frozen_epoch));
    }

    fn expected(&self) -> View {
        let mut view: View = self
            .view
            .iter()
            .map(|(k, n)| (k.clone(), n.expected()))
            .collect();
        let ids: BTreeMap<String, (u64, u64)> = self
            .view
            .iter()
            .filter(|(_, n)| n.kind != MKind::Dir)
            .map(|(k, n)| {
                let id = match n.group {
                    Some(g) => (1 << 40, g),
                    None => (2 << 40, view.keys().position(|q| q == k).unwrap() as u64),
                };
                (k.clone(), id)
            })
            .collect();
        set_links(&mut view, &ids);
        view
    }
}

/// Differences between two views, for a readable failure.
fn diff(a: &View, b: &View) -> String {
    let mut out = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push_str(&format!("only in left: {k:?} {}\n", v.what)),
            Some(w) if w != v => out.push_str(&format!(
                "differs: {k:?}\n  left:  {}\n  right: {}\n",
                short(v),
                short(w)
            )),
            _ => {}
        }
    }
    for (k, w) in b {
        if !a.contains_key(k) {
            out.push_str(&format!("only in right: {k:?} {}\n", w.what));
        }
    }
    out
}

fn short(o: &Obj) -> String {
    format!(
        "{} len={} crc={:08x} perm={:o} {}:{} mtime={:?} xattrs={:?} links={:?}",
        o.what,
        o.data.len(),
        crc32c::crc32c(&o.data),
        o.perm,
        o.uid,
        o.gid,
        o.mtime,
        o.xattrs
            .iter()
            .map(|(k, v)| (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned()
            ))
            .collect::<Vec<_>>(),
        o.links
    )
}

fn assert_views(what: &str, want: &View, got: &View, log: &[String]) {
    if want != got {
        panic!(
            "{what}: views differ\n{}\noperations:\n{}",
            diff(want, got),
            log.join("\n")
        );
    }
}

/// Mounts kernel overlayfs read-only over every layer tree of the volume (the active one on
/// top, as a lower) and returns its view. An empty bottom layer is added because a mount
/// without upper needs two lowers.
fn kernel_view(vol: &Volume, scratch: &Path) -> View {
    let empty = scratch.join("empty");
    let mnt = scratch.join("mnt");
    fs::create_dir_all(&empty).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    let mut lowers: Vec<String> = vol
        .layers()
        .iter()
        .rev()
        .map(|l| vol.tree_dir(l.epoch).display().to_string())
        .collect();
    lowers.push(empty.display().to_string());
    let out = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("ro,lowerdir={}", lowers.join(":")))
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kernel overlay mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = describe_tree(&mnt);
    let u = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(u.success());
    without_leaked_whiteouts(v)
}

/// Kernel quirk: readdir of a directory that is not merged (it exists in one layer only)
/// reads the real directory, so a whiteout in it is listed, though lookup says ENOENT. Such
/// whiteouts are legal (a layer may hold a whiteout for a name nothing below has); the view
/// does not contain those names.
fn without_leaked_whiteouts(mut v: View) -> View {
    v.retain(|_, o| o.what != "listed, lookup fails");
    v
}

/// True if some layer of the volume holds a partial file (or a stray layervol xattr).
fn has_layervol_xattrs(vol: &Volume) -> bool {
    vol.layers().iter().any(|l| {
        let tree = vol.tree_dir(l.epoch);
        let mut stack = vec![tree.clone()];
        while let Some(p) = stack.pop() {
            for e in fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                let q = e.path();
                if lxattrs(&q)
                    .keys()
                    .any(|k| k.starts_with(b"trusted.layervol."))
                {
                    return true;
                }
                if e.file_type().unwrap().is_dir() {
                    stack.push(q);
                }
            }
        }
        false
    })
}

/// Checks a volume after a squash: verify is clean, no strays, every manifest is exactly
/// what a fresh seal computes.
fn check_volume(vol: &Volume, what: &str) {
    let rep = vol.verify().unwrap();
    let problems: Vec<String> = rep
        .problems()
        .filter(|(_, p)| !p.is_warning())
        // Layers the test left unsealed on purpose.
        .filter(|(e, p)| {
            !matches!(p, super::scan::Problem::ManifestUnreadable { .. })
                || vol.layer_dir(*e).join("manifest.json").exists()
        })
        .map(|(e, p)| format!("layer {e}: {p}"))
        .collect();
    assert!(problems.is_empty(), "{what}: verify found {problems:?}");
    assert!(rep.strays.is_empty(), "{what}: strays {:?}", rep.strays);
    assert!(
        rep.leftovers.is_empty(),
        "{what}: leftovers {:?}",
        rep.leftovers
    );
    for l in vol
        .layers()
        .iter()
        .filter(|l| l.state == LayerState::Frozen)
    {
        let Some(m) = Manifest::load_optional(&vol.layer_dir(l.epoch)).unwrap() else {
            continue;
        };
        let fresh = Manifest::build(
            &vol.tree_dir(l.epoch),
            &vol.maps(l.epoch),
            super::manifest::LayerIdentity {
                volume_id: vol.id(),
                epoch: l.epoch,
                parent_epoch: l.parent_epoch,
                block_size: vol.block_size(),
                userxattr: vol.userxattr(),
            },
        )
        .unwrap();
        assert_eq!(
            m.entries, fresh.entries,
            "{what}: manifest entries of layer {}",
            l.epoch
        );
        assert_eq!(
            (m.data_bytes, m.block_count, m.partial_files, m.entry_count),
            (
                fresh.data_bytes,
                fresh.block_count,
                fresh.partial_files,
                fresh.entry_count
            ),
            "{what}: manifest totals of layer {}",
            l.epoch
        );
        assert_eq!(m.parent_epoch, l.parent_epoch);
    }
}

// ---------------------------------------------------------------------------------------
// The model-based property test

/// One generator operation: (kind, target, target, value, value).
type Op = (u8, u16, u16, u16, u8);
type Ops = Vec<Op>;

fn layer_ops() -> impl Strategy<Value = Ops> {
    proptest::collection::vec(any::<Op>(), 0..20)
}

#[derive(Debug, Clone)]
struct Plan {
    layers: Vec<Ops>,
    seal_mask: u8,
    pin: Option<u8>,
    from: u8,
    through: u8,
    kernel_compatible: bool,
    second: bool,
    /// Make the squash copy instead of hard-linking (as if the filesystem refused links).
    refuse_links: bool,
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        proptest::collection::vec(layer_ops(), 2..7),
        any::<u8>(),
        proptest::option::weighted(0.2, any::<u8>()),
        any::<u8>(),
        any::<u8>(),
        any::<bool>(),
        any::<bool>(),
        proptest::bool::weighted(0.15),
    )
        .prop_map(
            |(layers, seal_mask, pin, from, through, kernel_compatible, second, refuse_links)| {
                Plan {
                    layers,
                    seal_mask,
                    pin,
                    from,
                    through,
                    kernel_compatible,
                    second,
                    refuse_links,
                }
            },
        )
}

/// Builds the volume of `plan`: every layer but the last frozen.
fn build(plan: &Plan) -> Gen {
    let n = plan.layers.len();
    let mut g = Gen::new(n - 1);
    for (i, ops) in plan.layers.iter().enumerate() {
        for &(k, a, b, v, x) in ops {
            g.op(k, a, b, v, x);
        }
        if i + 1 < n {
            g.freeze();
            if plan.seal_mask & (1 << i) != 0 {
                g.vol.seal(i as u64 + 1).unwrap();
            }
        } else {
            g.finish_layer();
        }
    }
    g
}

fn run_plan(plan: &Plan) {
    let mut g = build(plan);
    let want = g.expected();
    let log = g.log.clone();
    assert_views(
        "reference merger",
        &want,
        &RefMerger::new(&g.vol).view(),
        &log,
    );
    assert_views("engine before", &want, &engine_view(&g.vol), &log);
    if g.partials == 0 {
        assert_views(
            "kernel before",
            &want,
            &kernel_view(&g.vol, &g.root.join("k0")),
            &log,
        );
    }
    let frozen: Vec<u64> = g
        .vol
        .layers()
        .iter()
        .filter(|l| l.state == LayerState::Frozen)
        .map(|l| l.epoch)
        .collect();
    if let Some(p) = plan.pin {
        g.vol.pin(frozen[p as usize % frozen.len()]).unwrap();
    }
    // Export (plain and escaped) of the view before squashing.
    let ex = g.root.join("export");
    let st = squash::export(&g.vol, &ex, plan.kernel_compatible).unwrap();
    let mut plain = describe_tree(&ex);
    if plan.kernel_compatible {
        // Escaped in the tree, as a layer stores them; the view shows them unescaped.
        for o in plain.values_mut() {
            o.xattrs = std::mem::take(&mut o.xattrs)
                .into_iter()
                .map(|(k, v)| match k.strip_prefix(b"trusted.overlay.overlay.") {
                    Some(r) => ([b"trusted.overlay.".as_slice(), r].concat(), v),
                    None => (k, v),
                })
                .collect();
        }
    }
    assert_views("export", &want, &plain, &log);
    assert_eq!(st.entries as usize, want.len());
    // Squash some range: mostly from the bottom, mostly more than one layer.
    let n = frozen.len();
    let lo = if plan.from.is_multiple_of(3) {
        plan.from as usize / 3 % n
    } else {
        0
    };
    let hi = (lo + 1 + plan.through as usize % n).min(n - 1);
    let opts = SquashOptions {
        from: (lo > 0 || plan.from.is_multiple_of(2)).then_some(frozen[lo]),
        through: (!plan.through.is_multiple_of(5)).then_some(frozen[hi]),
        kernel_compatible: plan.kernel_compatible,
    };
    squash::refuse_links(plan.refuse_links);
    let r = squash::squash(&mut g.vol, &opts);
    squash::refuse_links(false);
    match r {
        Ok(s) => {
            assert!(s.merged_epochs.is_empty() || s.merged_epochs.last() == Some(&s.epoch));
            if std::env::var_os("SQUASH_DEBUG").is_some() {
                eprintln!(
                    "STATS partials={} kc={} {s:?}",
                    g.partials, plan.kernel_compatible
                );
            }
        }
        Err(VolumeError::SquashRefused { reason, .. }) => {
            assert!(reason.contains("pinned"), "{reason}");
            return;
        }
        Err(e) => panic!("squash {opts:?}: {e}\n{}", log.join("\n")),
    }
    let what = format!("after squash {opts:?}");
    check_volume(&g.vol, &what);
    assert_views(
        &format!("reference merger {what}"),
        &want,
        &RefMerger::new(&g.vol).view(),
        &log,
    );
    assert_views(&format!("engine {what}"), &want, &engine_view(&g.vol), &log);
    if plan.kernel_compatible {
        assert!(!has_layervol_xattrs(&g.vol), "{what}: partial files remain");
        assert_views(
            &format!("kernel {what}"),
            &want,
            &kernel_view(&g.vol, &g.root.join("k1")),
            &log,
        );
    }
    // Reopen (validates volume.json), squash everything that can be.
    let vp = g.vol.path().to_path_buf();
    let dummy = Volume::open_read_only(&vp).unwrap();
    drop(std::mem::replace(&mut g.vol, dummy));
    g.vol = open_locked(&vp);
    if plan.second {
        if let Some(p) = g.vol.layers().iter().find(|l| l.pinned).map(|l| l.epoch) {
            g.vol.unpin(p).unwrap();
        }
        squash::squash_offline(&mut g.vol, None).unwrap();
        let frozen_left = g
            .vol
            .layers()
            .iter()
            .filter(|l| l.state == LayerState::Frozen)
            .count();
        assert_eq!(frozen_left, 1, "everything frozen is one layer now");
        check_volume(&g.vol, "after the second squash");
        assert_views(
            "engine after the second squash",
            &want,
            &engine_view(&g.vol),
            &log,
        );
        assert_views(
            "reference after the second squash",
            &want,
            &RefMerger::new(&g.vol).view(),
            &log,
        );
    }
}

proptest! {
    // SQUASH_CASES=N runs more cases (48 by default, a few seconds).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("SQUASH_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        max_shrink_iters: 400,
        ..ProptestConfig::default()
    })]

    #[test]
    fn squash_and_export_preserve_the_merged_view(p in plan()) {
        run_plan(&p);
    }
}

// ---------------------------------------------------------------------------------------
// Hand-written cases

/// Runs ops given as (kind, a, b, v, x) per layer and returns the generator.
fn scenario(layers: &[&[Op]]) -> Gen {
    let plan = Plan {
        layers: layers.iter().map(|l| l.to_vec()).collect(),
        seal_mask: 0xff,
        pin: None,
        from: 0,
        through: 0,
        kernel_compatible: false,
        second: false,
        refuse_links: false,
    };
    build(&plan)
}

/// A volume written by hand: base files, a hard link, a symlink, a fifo, a device; a partial
/// file chain over epochs 2 and 3, a whiteout, an opaque dir and a renamed dir (redirect);
/// active layer 4 with a partial file over the chain. Layers 1 and 2 are sealed.
struct Hand {
    _t: tempfile::TempDir,
    vol: Volume,
}

fn block(n: usize, b: u8) -> Vec<u8> {
    vec![b; n]
}

/// Makes `rel` in the active layer a partial file over `below` (a path in a frozen layer)
/// whose content as read through its chain is `below_content`, applies `writes` the way the
/// engine does (fill, write, record), and returns the new content.
fn hand_partial(
    vol: &Volume,
    rel: &str,
    below: &Path,
    below_content: &[u8],
    writes: &[(u64, &[u8])],
) -> Vec<u8> {
    let tree = vol.upper_dir();
    let id = MapId::random().unwrap();
    let mut map = BlockMap::new(id, vol.block_size(), below_content.len() as u64).unwrap();
    let p = tree.join(rel);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(below_content.len() as u64).unwrap();
    let mut now = below_content.to_vec();
    for (off, data) in writes {
        for s in map.write_fill(*off, data.len() as u64) {
            let r = s.range.start as usize..s.range.end as usize;
            let fill = match s.source {
                Source::Below => below_content[r].to_vec(),
                _ => vec![0; r.len()],
            };
            f.write_all_at(&fill, s.range.start).unwrap();
        }
        f.write_all_at(data, *off).unwrap();
        map.record_write(f.as_fd(), *off, data).unwrap();
        let end = *off as usize + data.len();
        if now.len() < end {
            now.resize(end, 0);
        }
        now[*off as usize..end].copy_from_slice(data);
    }
    let maps = vol.maps(vol.active_epoch());
    maps.store(&map).unwrap();
    let (bd, bn) = at(below);
    let mount = fs::File::open(vol.path()).unwrap();
    let fb = crate::layer::encode_origin(bd.as_fd(), &bn, mount.as_fd()).unwrap();
    setx(&p, b"trusted.layervol.below", &fb);
    setx(
        &p,
        b"trusted.layervol.partial",
        &blockmap::encode_marker(id),
    );
    now
}

fn hand_volume() -> Hand {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let mut vol = Volume::create(&t.path().join("vol"), 4096, None).unwrap();
    // Layer 1: base.
    let u = vol.upper_dir();
    fs::create_dir_all(u.join("d/sub")).unwrap();
    fs::create_dir_all(u.join("op/old")).unwrap();
    fs::create_dir_all(u.join("ren/x")).unwrap();
    fs::write(u.join("big"), content(5 * 4096 + 100, 1)).unwrap();
    fs::write(u.join("d/f"), b"base f").unwrap();
    fs::write(u.join("d/gone"), b"deleted in 2").unwrap();
    fs::write(u.join("op/old/x"), b"hidden by opaque").unwrap();
    fs::write(u.join("ren/x/y"), b"moved along").unwrap();
    fs::hard_link(u.join("d/f"), u.join("d/f2")).unwrap();
    std::os::unix::fs::symlink("d/f", u.join("sym")).unwrap();
    mknod(&u.join("fifo"), libc::S_IFIFO | 0o644, 0);
    mknod(&u.join("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3));
    setx(&u.join("d/f"), b"user.tag", b"base");
    vol.freeze_active().unwrap();
    vol.seal(1).unwrap();
    // Layer 2: partial write to big, whiteout, opaque dir, rename ren -> moved.
    let below = vol.tree_dir(1).join("big");
    let big = content(5 * 4096 + 100, 1);
    let big = hand_partial(
        &vol,
        "big",
        &below,
        &big,
        &[(4096 + 10, b"EPOCH2"), (5 * 4096, &block(100, 2))],
    );
    let u = vol.upper_dir();
    fs::create_dir(u.join("d")).unwrap();
    mknod(&u.join("d/gone"), libc::S_IFCHR, 0);
    fs::create_dir(u.join("op")).unwrap();
    setx(&u.join("op"), b"trusted.overlay.opaque", b"y");
    fs::write(u.join("op/new"), b"in opaque").unwrap();
    fs::create_dir(u.join("moved")).unwrap();
    setx(&u.join("moved"), b"trusted.overlay.redirect", b"/ren");
    mknod(&u.join("ren"), libc::S_IFCHR, 0);
    vol.freeze_active().unwrap();
    vol.seal(2).unwrap();
    // Layer 3: another partial write over the partial file of 2, a file in the moved dir.
    let below = vol.tree_dir(2).join("big");
    let big = hand_partial(
        &vol,
        "big",
        &below,
        &big,
        &[(0, b"EPOCH3"), (3 * 4096, &block(4096, 3))],
    );
    let u = vol.upper_dir();
    fs::create_dir(u.join("moved")).unwrap();
    fs::write(u.join("moved/z"), b"new in 3").unwrap();
    vol.freeze_active().unwrap();
    // Layer 4 (active): a partial file over layer 3's.
    let below = vol.tree_dir(3).join("big");
    hand_partial(&vol, "big", &below, &big, &[(2 * 4096 + 1, b"ACTIVE")]);
    Hand { _t: t, vol }
}

#[test]
fn squash_of_hand_built_layers_keeps_the_view_and_links_unchanged_files() {
    let mut h = hand_volume();
    let before = engine_view(&h.vol);
    assert_views("reference", &before, &RefMerger::new(&h.vol).view(), &[]);
    let f_ino = fs::metadata(h.vol.tree_dir(1).join("d/f")).unwrap().ino();
    let s = squash::squash_offline(&mut h.vol, None).unwrap();
    assert_eq!(s.epoch, 3);
    assert_eq!(s.merged_epochs, vec![1, 2, 3]);
    assert_eq!(s.assembled_files, 1, "{s:?}");
    assert_eq!(
        s.whiteouts_kept, 0,
        "merging into the bottom drops whiteouts: {s:?}"
    );
    assert!(s.whiteouts_dropped >= 2, "{s:?}");
    assert_eq!(
        s.relinked_partials, 1,
        "the active partial file was repointed: {s:?}"
    );
    assert_eq!(s.removed_dirs, 3);
    // The layout: one frozen layer 3 in a fresh directory, the active layer on it.
    let l: Vec<_> = h
        .vol
        .layers()
        .iter()
        .map(|l| (l.epoch, l.parent_epoch, l.state))
        .collect();
    assert_eq!(
        l,
        vec![
            (3, None, LayerState::Frozen),
            (4, Some(3), LayerState::Active)
        ]
    );
    let dir = h.vol.layers()[0].dir.clone().unwrap();
    assert!(dir.starts_with("3."), "{dir}");
    let vj = fs::read_to_string(h.vol.path().join("volume.json")).unwrap();
    assert!(vj.contains("\"version\": \"2.0\""), "{vj}");
    for old in ["1", "2", "3"] {
        assert!(!h.vol.path().join("layers").join(old).exists());
    }
    // Unchanged objects are the same inodes (taken over by link), hard links stay links.
    let t = h.vol.tree_dir(3);
    assert_eq!(fs::metadata(t.join("d/f")).unwrap().ino(), f_ino);
    assert_eq!(fs::metadata(t.join("d/f2")).unwrap().ino(), f_ino);
    // No overlay format left where nothing lies below.
    assert!(getx(&t.join("op"), c"trusted.overlay.opaque").is_none());
    assert!(getx(&t.join("moved"), c"trusted.overlay.redirect").is_none());
    assert!(!t.join("ren").exists() && !t.join("d/gone").exists());
    assert!(getx(&t.join("big"), c"trusted.layervol.partial").is_none());
    check_volume(&h.vol, "hand squash");
    assert_views("engine after", &before, &engine_view(&h.vol), &[]);
    // The volume reopens (format 2.0) and a second squash has nothing to do.
    let vp = h.vol.path().to_path_buf();
    drop(std::mem::replace(
        &mut h.vol,
        Volume::open_read_only(&vp).unwrap(),
    ));
    let mut v = open_locked(&vp);
    let s = squash::squash_offline(&mut v, None).unwrap();
    assert!(s.merged_epochs.is_empty());
}

#[test]
fn squash_above_the_bottom_keeps_whiteouts_opaque_redirects_and_merges_maps() {
    let mut h = hand_volume();
    let before = engine_view(&h.vol);
    let s = squash::squash(
        &mut h.vol,
        &SquashOptions {
            from: Some(2),
            through: Some(3),
            kernel_compatible: false,
        },
    )
    .unwrap();
    assert_eq!(s.merged_epochs, vec![2, 3]);
    assert_eq!(s.merged_partials, 1, "{s:?}");
    assert_eq!(s.assembled_files, 0, "{s:?}");
    assert_eq!(s.whiteouts_kept, 2, "{s:?}");
    let t = h.vol.tree_dir(3);
    assert_eq!(
        getx(&t.join("op"), c"trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        getx(&t.join("moved"), c"trusted.overlay.redirect").as_deref(),
        Some(&b"/ren"[..])
    );
    // The merged map: union of epochs 2 and 3, reading the rest from layer 1.
    let id = blockmap::decode_marker(&getx(&t.join("big"), c"trusted.layervol.partial").unwrap())
        .unwrap();
    let map = h.vol.maps(3).load(id).unwrap();
    assert_eq!(
        map.present().iter().collect::<Vec<_>>(),
        vec![0..2, 3..4, 5..6]
    );
    assert_eq!(map.below_limit(), 5 * 4096 + 100);
    let l: Vec<_> = h
        .vol
        .layers()
        .iter()
        .map(|l| (l.epoch, l.parent_epoch))
        .collect();
    assert_eq!(l, vec![(1, None), (3, Some(1)), (4, Some(3))]);
    check_volume(&h.vol, "squash 2..3");
    assert_views("engine after", &before, &engine_view(&h.vol), &[]);
    assert_views(
        "reference after",
        &before,
        &RefMerger::new(&h.vol).view(),
        &[],
    );
}

#[test]
fn pinned_layers_bound_the_range() {
    let mut h = hand_volume();
    h.vol.pin(2).unwrap();
    // Default: up to the first pinned layer, which is kept as the top.
    let e = squash::squash_offline(&mut h.vol, Some(3)).unwrap_err();
    assert!(
        matches!(&e, VolumeError::SquashRefused { reason, .. } if reason.contains("layer 2 is pinned")),
        "{e}"
    );
    let before = engine_view(&h.vol);
    let s = squash::squash_offline(&mut h.vol, None).unwrap();
    assert_eq!(s.merged_epochs, vec![1, 2]);
    assert!(h.vol.layer(2).unwrap().pinned);
    // Layer 3 reads through layer 2's partial file, which was re-created: layer 3 was
    // rebuilt (never written in place) with its handle repointed.
    assert_eq!(s.rewritten_epochs, vec![3], "{s:?}");
    assert!(h.vol.layer(3).unwrap().dir.is_some());
    check_volume(&h.vol, "pinned");
    assert_views("engine after", &before, &engine_view(&h.vol), &[]);
    // Errors name what to do.
    let e = squash::squash(
        &mut h.vol,
        &SquashOptions {
            through: Some(4),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("active"), "{e}");
    let e = squash::squash(
        &mut h.vol,
        &SquashOptions {
            through: Some(9),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, VolumeError::NoSuchEpoch { epoch: 9, .. }),
        "{e}"
    );
    let ro = Volume::open_read_only(h.vol.path()).unwrap();
    let mut ro = ro;
    assert!(matches!(
        squash::squash_offline(&mut ro, None),
        Err(VolumeError::ReadOnly { .. })
    ));
}

#[test]
fn export_writes_a_plain_tree_of_the_whole_view() {
    let h = hand_volume();
    let view = engine_view(&h.vol);
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let s = squash::export(&h.vol, &out, false).unwrap();
    assert_eq!(s.assembled_files, 1);
    assert_eq!(s.hard_links, 1);
    assert_views("export", &view, &describe_tree(&out), &[]);
    // Nothing of the overlay format is left.
    let mut stack = vec![out.clone()];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            use std::os::unix::fs::FileTypeExt;
            assert!(
                !(md.file_type().is_char_device() && md.rdev() == 0),
                "whiteout {:?}",
                e.path()
            );
            assert!(
                !lxattrs(&e.path())
                    .keys()
                    .any(|k| k.starts_with(b"trusted.overlay.")
                        || k.starts_with(b"trusted.layervol.")),
                "format xattr on {:?}",
                e.path()
            );
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    // Not into a non-empty dir; not without the lock.
    assert!(matches!(
        squash::export(&h.vol, &out, false),
        Err(VolumeError::TargetNotEmpty { .. })
    ));
    let ro = Volume::open_read_only(h.vol.path()).unwrap();
    assert!(matches!(
        squash::export(&ro, &t.path().join("x"), false),
        Err(VolumeError::ReadOnly { .. })
    ));
    // A snapshot of a mounted volume can be exported from a read-only handle.
    let out2 = t.path().join("snap2");
    squash::export_frozen(&ro, 2, &out2, false).unwrap();
    let v2 = describe_tree(&out2);
    assert!(
        v2.contains_key("moved/x/y") && !v2.contains_key("moved/z") && !v2.contains_key("d/gone")
    );
}

/// The kernel is the oracle: after a kernel-compatible squash, `mount -t overlay` with the
/// frozen trees as lowers and the active tree as upper shows the volume's view.
#[test]
fn kernel_compatible_squash_mounts_under_kernel_overlayfs() {
    let mut h = hand_volume();
    // Something for the kernel's own lookup rules below the active layer too.
    let u = h.vol.upper_dir();
    fs::write(u.join("active.txt"), b"written in 4").unwrap();
    mknod(&u.join("fifo"), libc::S_IFCHR, 0);
    let before = engine_view(&h.vol);
    // With a pinned middle layer, the layers above the range are rebuilt without partials.
    h.vol.pin(2).unwrap();
    let s = squash::squash(
        &mut h.vol,
        &SquashOptions {
            kernel_compatible: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.merged_epochs, vec![1, 2]);
    assert_eq!(s.rewritten_epochs, vec![3]);
    assert_eq!(s.active_assembled_files, 1);
    assert!(!has_layervol_xattrs(&h.vol));
    check_volume(&h.vol, "kernel-compatible");
    assert_views("engine after", &before, &engine_view(&h.vol), &[]);
    // The mount of the brief: lowerdir=<frozen trees newest first>,upperdir=<active>.
    let t = tempfile::tempdir_in(h.vol.path()).unwrap();
    let (work, mnt) = (t.path().join("work"), t.path().join("mnt"));
    fs::create_dir(&work).unwrap();
    fs::create_dir(&mnt).unwrap();
    let lowers: Vec<String> = h
        .vol
        .lower_dirs()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        h.vol.upper_dir().display(),
        work.display()
    );
    let out = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kv = without_leaked_whiteouts(describe_tree(&mnt));
    let u = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(u.success());
    assert_views("kernel overlay mount", &before, &kv, &[]);
}

#[test]
fn squash_is_atomic_at_every_crash_point() {
    for kc in [false, true] {
        // Count the crash points of one squash of the scenario.
        let mut h = hand_volume();
        h.vol.pin(2).unwrap();
        let opts = SquashOptions {
            kernel_compatible: kc,
            ..Default::default()
        };
        meta::arm_crash(None);
        squash::squash(&mut h.vol, &opts).unwrap();
        let points = meta::crash_points_seen();
        assert!(points >= 10, "a squash passes {points} crash points");
        eprintln!("kernel-compatible {kc}: crashing at each of {points} points");
        for k in 0..points {
            let mut h = hand_volume();
            h.vol.pin(2).unwrap();
            let before_layers = h.vol.layers().to_vec();
            let view = engine_view(&h.vol);
            meta::arm_crash(Some(k));
            let r = squash::squash(&mut h.vol, &opts);
            meta::arm_crash(None);
            assert!(r.is_err(), "crash point {k} (kc {kc}) was not reached");
            let vp = h.vol.path().to_path_buf();
            drop(std::mem::replace(
                &mut h.vol,
                Volume::open_read_only(&vp).unwrap(),
            ));
            // Readers (no lock) see old or new, and the same view.
            let ro = Volume::open_read_only(&vp).unwrap();
            let old = ro.layers() == before_layers.as_slice();
            let new = ro.layers().iter().map(|l| l.epoch).collect::<Vec<_>>() == vec![2, 3, 4];
            assert!(
                old || new,
                "crash point {k} (kc {kc}): layers {:?}",
                ro.layers()
            );
            assert_views(
                &format!("crash point {k} kc {kc}, read-only"),
                &view,
                &engine_view(&ro),
                &[],
            );
            // verify accounts for what the crash left: the next open removes it.
            let rep = ro.verify().unwrap();
            assert!(
                rep.strays.is_empty(),
                "crash point {k} kc {kc}: strays {:?} (leftovers {:?})",
                rep.strays,
                rep.leftovers
            );
            // Opening finishes a committed squash; the view is the same.
            let mut v = open_locked(&vp);
            assert_views(
                &format!("crash point {k} kc {kc}, reopened"),
                &view,
                &engine_view(&v),
                &[],
            );
            // Either way nothing is left over (an uncommitted squash's directories are gone).
            check_volume(&v, &format!("crash point {k} kc {kc}, reopened"));
            // And the squash can be (re)done to the end.
            squash::squash(&mut v, &opts).unwrap();
            let e: Vec<u64> = v.layers().iter().map(|l| l.epoch).collect();
            assert_eq!(e, vec![2, 3, 4], "crash point {k} kc {kc}");
            check_volume(&v, &format!("crash point {k} kc {kc}, redone"));
            assert_views(
                &format!("crash point {k} kc {kc}, redone"),
                &view,
                &engine_view(&v),
                &[],
            );
        }
    }
}

#[test]
fn a_damaged_source_manifest_stops_the_squash() {
    let mut h = hand_volume();
    let m = h.vol.layer_dir(2).join("manifest.json");
    let text = fs::read_to_string(&m)
        .unwrap()
        .replacen("\"epoch\":2", "\"epoch\":7", 1);
    fs::write(&m, text).unwrap();
    let e = squash::squash_offline(&mut h.vol, None).unwrap_err();
    assert!(matches!(e, VolumeError::ChecksumMismatch { .. }), "{e}");
    // Nothing changed, nothing left behind.
    assert_eq!(h.vol.layers().len(), 4);
    let names: Vec<String> = fs::read_dir(h.vol.path().join("layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

/// `Volume::open`, retried while another test's child process (mount, umount) still holds
/// a copy of the lock's open file between its fork and exec: flock belongs to the open
/// file, and O_CLOEXEC only closes it at exec.
fn open_locked(vp: &Path) -> Volume {
    for _ in 0..200 {
        match Volume::open(vp) {
            Err(VolumeError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r.unwrap(),
        }
    }
    Volume::open(vp).unwrap()
}

/// A rough figure for the report: N layers of M small files each, a third of them rewritten
/// per layer (partial files), squashed into one.
#[test]
fn squash_timing_figure() {
    require_root();
    const N: usize = 10;
    const M: usize = 1000;
    let t = tempfile::tempdir().unwrap();
    let mut vol = Volume::create(&t.path().join("vol"), 4096, None).unwrap();
    let mut now: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..M {
        let d = vol.upper_dir().join(format!("d{}", i % 20));
        fs::create_dir_all(&d).unwrap();
        let rel = format!("d{}/f{i}", i % 20);
        now.insert(rel.clone(), content(8192 + i, i as u8));
        fs::write(vol.upper_dir().join(&rel), &now[&rel]).unwrap();
    }
    vol.freeze_active().unwrap();
    vol.seal(1).unwrap();
    for layer in 1..N {
        for i in 0..M {
            let rel = format!("d{}/n{layer}-{i}", i % 20);
            fs::create_dir_all(vol.upper_dir().join(format!("d{}", i % 20))).unwrap();
            fs::write(vol.upper_dir().join(&rel), content(100 + i, layer as u8)).unwrap();
        }
        for i in (0..M).step_by(3) {
            let rel = format!("d{}/f{i}", i % 20);
            let below = RefBelow::find(&vol, &rel);
            let new = hand_partial(
                &vol,
                &rel,
                &below,
                &now[&rel],
                &[(4096, &block(100, layer as u8))],
            );
            now.insert(rel, new);
        }
        let e = vol.freeze_active().unwrap().frozen_epoch;
        vol.seal(e).unwrap();
    }
    let files: usize = M + (N - 1) * M;
    let before = engine_view(&vol);
    let t0 = std::time::Instant::now();
    let s = squash::squash_offline(&mut vol, None).unwrap();
    let took = t0.elapsed();
    eprintln!(
        "squash of {N} layers x {M} new files ({files} files in the view, {} partial files assembled): {:.0} ms ({} us/file); {s:?}",
        s.assembled_files,
        took.as_secs_f64() * 1000.0,
        took.as_micros() as usize / files
    );
    assert_views("timing volume", &before, &engine_view(&vol), &[]);
}

/// The topmost object of a path in the frozen layers (the generator-free helper of the
/// timing test: no renames there, so the path is the same in every layer).
struct RefBelow;

impl RefBelow {
    fn find(vol: &Volume, rel: &str) -> PathBuf {
        for l in vol
            .layers()
            .iter()
            .rev()
            .filter(|l| l.state == LayerState::Frozen)
        {
            let p = vol.tree_dir(l.epoch).join(rel);
            if fs::symlink_metadata(&p).is_ok() {
                return p;
            }
        }
        panic!("{rel} is in no frozen layer")
    }
}

#[test]
fn generator_scenarios_cover_the_tricky_cases() {
    // A relative rename, a hard-linked partial file, a rename then a write below it.
    let g = scenario(&[
        &[
            (0, 0, 0, 3, 1),
            (2, 0, 1, 0, 0),
            (0, 1, 2, 5, 2),
            (11, 0, 0, 4, 0),
        ],
        &[(6, 0, 0, 2, 0), (7, 0, 100, 50, 3), (10, 1, 0, 1, 2)],
        &[(7, 1, 700, 300, 9), (9, 0, 400, 0, 0), (4, 2, 0, 0, 1)],
    ]);
    let want = g.expected();
    assert_views("reference", &want, &RefMerger::new(&g.vol).view(), &g.log);
    assert_views("engine", &want, &engine_view(&g.vol), &g.log);
    for plan in [
        Plan {
            layers: vec![],
            seal_mask: 0,
            pin: None,
            from: 0,
            through: 0,
            kernel_compatible: false,
            second: true,
            refuse_links: false,
        },
        Plan {
            layers: vec![],
            seal_mask: 0,
            pin: None,
            from: 1,
            through: 0,
            kernel_compatible: true,
            second: false,
            refuse_links: true,
        },
    ] {
        let p = Plan {
            layers: vec![
                vec![
                    (0, 0, 0, 3, 1),
                    (2, 0, 1, 0, 0),
                    (0, 1, 2, 5, 2),
                    (11, 0, 0, 4, 0),
                ],
                vec![(6, 0, 0, 2, 0), (7, 0, 100, 50, 3), (10, 1, 0, 1, 2)],
                vec![(7, 1, 700, 300, 9), (9, 0, 400, 0, 0), (4, 2, 0, 0, 1)],
                vec![(8, 2, 5, 5, 5)],
            ],
            ..plan
        };
        run_plan(&p);
    }
}

#[test]
fn refused_links_fall_back_to_copies_and_repoint_handles() {
    let mut h = hand_volume();
    // The active layer's partial file reads through a whole file of the range too.
    fs::create_dir(h.vol.upper_dir().join("d")).unwrap();
    let base = h.vol.tree_dir(1).join("d/f");
    hand_partial(&h.vol, "d/f", &base, b"base f", &[(2, b"XY")]);
    let before = engine_view(&h.vol);
    squash::refuse_links(true);
    let r = squash::squash_offline(&mut h.vol, None);
    squash::refuse_links(false);
    let s = r.unwrap();
    assert!(s.copied_files >= 3, "{s:?}");
    assert_eq!(s.linked_objects, 0, "{s:?}");
    assert_eq!(
        s.relinked_partials, 2,
        "both active partial files were repointed: {s:?}"
    );
    check_volume(&h.vol, "copies");
    assert_views("engine after copies", &before, &engine_view(&h.vol), &[]);
    // Hard links of the source are hard links of the copy.
    let t = h.vol.tree_dir(3);
    assert_eq!(
        fs::metadata(t.join("d/f")).unwrap().ino(),
        fs::metadata(t.join("d/f2")).unwrap().ino()
    );
}

#[test]
fn userxattr_volumes_squash_in_the_user_namespace() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let mut vol = Volume::create_with(
        &t.path().join("vol"),
        &super::CreateOptions {
            block_size: 4096,
            from: None,
            userxattr: true,
        },
    )
    .unwrap();
    let u = vol.upper_dir();
    fs::create_dir_all(u.join("d/old")).unwrap();
    fs::write(u.join("d/old/x"), b"x").unwrap();
    fs::write(u.join("f"), content(10_000, 7)).unwrap();
    fs::write(u.join("gone"), b"gone").unwrap();
    vol.freeze_active().unwrap();
    let u = vol.upper_dir();
    fs::create_dir(u.join("d")).unwrap();
    setx(&u.join("d"), b"user.overlay.opaque", b"y");
    mknod(&u.join("gone"), libc::S_IFCHR, 0);
    // A partial file in the user namespace.
    let below = vol.tree_dir(1).join("f");
    let id = MapId::random().unwrap();
    let mut map = BlockMap::new(id, 4096, 10_000).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(u.join("f"))
        .unwrap();
    f.set_len(10_000).unwrap();
    f.write_all_at(&block(4096, 9), 4096).unwrap();
    map.record_write(f.as_fd(), 4096, &block(4096, 9)).unwrap();
    vol.maps(2).store(&map).unwrap();
    let (bd, bn) = at(&below);
    let mount = fs::File::open(vol.path()).unwrap();
    let fb = crate::layer::encode_origin(bd.as_fd(), &bn, mount.as_fd()).unwrap();
    setx(&u.join("f"), b"user.layervol.below", &fb);
    setx(
        &u.join("f"),
        b"user.layervol.partial",
        &blockmap::encode_marker(id),
    );
    vol.freeze_active().unwrap();
    let before = engine_view(&vol);
    assert!(
        before.contains_key("f") && !before.contains_key("gone") && !before.contains_key("d/old")
    );
    let s = squash::squash_offline(&mut vol, None).unwrap();
    assert_eq!(s.assembled_files, 1);
    let t2 = vol.tree_dir(2);
    // Only its identity (the original as origin, kept in reserved/) stays; no marker.
    let left = lxattrs(&t2.join("f"));
    assert_eq!(
        left.keys().map(|k| k.as_slice()).collect::<Vec<_>>(),
        [b"user.overlay.origin".as_slice()],
        "{left:?}"
    );
    assert!(!t2.join("gone").exists());
    check_volume(&vol, "userxattr");
    assert_views("engine after (userxattr)", &before, &engine_view(&vol), &[]);
}

/// Every object below `dir`: inode number -> (path, ctime).
fn ctimes_below(dir: &Path, out: &mut BTreeMap<u64, (PathBuf, (i64, i64))>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        out.insert(m.ino(), (p.clone(), (m.ctime(), m.ctime_nsec())));
        if m.is_dir() {
            ctimes_below(&p, out);
        }
    }
}

/// An online squash tells, before it hard-links an object of a mounted layer (which moves
/// the object's own ctime), the change time the mount shows for it; the new layer's table
/// says the same (see `ctimes`).
#[test]
fn an_online_squash_tells_the_change_times_of_what_it_links() {
    let h = hand_volume();
    let mut before = BTreeMap::new();
    for e in [1, 2, 3] {
        ctimes_below(&h.vol.tree_dir(e), &mut before);
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    let ro = Volume::open_read_only(h.vol.path()).unwrap();
    let heard = std::sync::Mutex::new(BTreeMap::new());
    let p = squash::prepare_online(&ro, &SquashOptions::default(), &|ino, ctime, _nlink| {
        heard.lock().unwrap().entry(ino).or_insert(ctime);
    })
    .unwrap()
    .expect("something to squash");
    let heard = heard.into_inner().unwrap();
    drop(p);
    // The merged layer, not switched in: the one directory with a table.
    let built: Vec<PathBuf> = fs::read_dir(ro.path().join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join(super::ctimes::CTIMES_FILE).exists())
        .collect();
    assert_eq!(built.len(), 1, "{built:?}");
    let table = super::ctimes::Ctimes::load(&built[0]).unwrap();
    let mut moved = 0;
    for (ino, (path, was)) in &before {
        let now = fs::symlink_metadata(path).unwrap();
        if (now.ctime(), now.ctime_nsec()) != *was {
            moved += 1;
            assert_eq!(heard.get(ino), Some(was), "{}", path.display());
            assert_eq!(table.get(*ino), Some(*was), "{}", path.display());
        }
    }
    assert!(moved >= 4, "only {moved} objects linked");
}
