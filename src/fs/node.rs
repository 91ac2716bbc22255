//! Inodes of the merged view.
//!
//! A node is identified by its stable inode number, which is also its FUSE node id (fuser
//! replies use `attr.ino` as the node id). The number is the real inode number of the object's
//! *origin*: the lower object it was copied up from, or the object itself when it was created in
//! the upper. It therefore survives copy-up, remounts and rotating the upper into the lowers, and
//! hard links share one node.
//!
//! A node records where it is in the merged tree (parent node + name; the upper object, when
//! there is one, is always at that merged position) and its `Layout`: where its lower objects
//! are. Lower layers are read-only, so a layout only changes when a live snapshot freezes the
//! upper into a new lower layer or a squash replaces lower layers; nodes then catch up lazily
//! (`Overlay::refresh`), so neither costs anything per node.

use std::ffi::{CStr, CString};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::layer::RelPath;

/// An object in one lower layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerRef {
    pub layer: usize,
    pub path: RelPath,
}

#[derive(Debug)]
pub struct NodeState {
    /// Merged location. `None` for the root and for nodes whose last name was removed.
    pub parent: Option<Arc<Node>>,
    pub name: CString,
    /// The object exists in the upper layer at the merged location.
    pub upper: bool,
    /// All names of the node are gone (it may still be open).
    pub unlinked: bool,
    /// Other names of a hard-linked file that the kernel knows (it may use any of them
    /// without a new lookup); one takes over when the current name is removed.
    pub others: Vec<(Arc<Node>, CString)>,
    /// Hard-linked lower file: a copy exists in the index (`workdir/index`).
    pub indexed: bool,
    /// Hard-linked lower file: its link count in the merged view.
    pub merged_nlink: u32,
    /// The inode number a lookup now finds for this object, if not `ino` (see
    /// `Overlay::aliases`).
    pub alias: Option<u64>,
}

/// A lower file with several names. Like kernel overlayfs with `index=on`, its copy-up goes
/// to `workdir/index/<hex of its origin>` and every name copied up is a hard link to that
/// file, so the names keep sharing data and inode number.
#[derive(Debug, Clone)]
pub struct Hardlink {
    pub index: std::ffi::CString,
    pub lower_nlink: u32,
}

#[derive(Debug)]
pub struct Node {
    pub ino: u64,
    /// `S_IFMT` bits: the type never changes for a node.
    pub fmt: u32,
    layout: parking_lot::RwLock<Arc<Layout>>,
    /// The stack generation `layout` and `state.upper` are valid for (`Overlay::refresh`).
    pub layout_gen: AtomicU64,
    /// Bumped by every copy-up: open handles compare it to follow the file to its new copy.
    pub generation: AtomicU64,
    pub hardlink: Option<Hardlink>,
    pub state: Mutex<NodeState>,
    /// Kernel lookup count: the node leaves the table when it drops to zero.
    pub lookups: AtomicU64,
    /// Serialises copy-up of this node.
    pub copy_up_lock: Mutex<()>,
    /// The live block map of this file's upper partial file (volume mode).
    pub partial: Mutex<Option<super::partial::PartialState>>,
    /// Cached O_PATH fd of this directory in the upper (see `Layout::lower_fds`).
    pub upper_fd: Mutex<Option<(u64, Arc<std::os::fd::OwnedFd>)>>,
    /// Open handles by kernel I/O mode. The kernel refuses (EIO) to have one inode open in
    /// passthrough and page-cached mode at once, so every open picks a compatible mode.
    pub io: Mutex<IoCounts>,
}

/// Where a node's lower objects are.
#[derive(Debug, Default)]
pub struct Layout {
    /// Non-directories: the topmost lower object, if the object is (or was copied up from) one.
    pub lower: Option<LowerRef>,
    /// Directories: the lower directories merged below this one, topmost first.
    pub lower_dirs: Vec<LowerRef>,
    /// Cached O_PATH fds of `lower_dirs`: lookups and opens below a directory then need no
    /// path walk. An fd follows its directory through renames, exactly as the node does.
    pub lower_fds: Vec<std::sync::OnceLock<Arc<std::os::fd::OwnedFd>>>,
}

impl Layout {
    pub fn new(lower: Option<LowerRef>, lower_dirs: Vec<LowerRef>) -> Layout {
        let lower_fds = lower_dirs
            .iter()
            .map(|_| std::sync::OnceLock::new())
            .collect();
        Layout {
            lower,
            lower_dirs,
            lower_fds,
        }
    }
}

#[derive(Debug, Default)]
pub struct IoCounts {
    pub passthrough: u32,
    pub cached: u32,
}

/// How the kernel does I/O on one open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// Data goes straight to the real file, without the daemon (read-only opens).
    Passthrough,
    /// Through the daemon and the kernel page cache.
    Cached,
    /// Through the daemon, bypassing the page cache: compatible with passthrough opens.
    Direct,
}

impl Node {
    #[allow(clippy::too_many_arguments)] // each is a distinct, named fact found by lookup
    pub fn new(
        ino: u64,
        fmt: u32,
        parent: Option<Arc<Node>>,
        name: &CStr,
        upper: bool,
        lower: Option<LowerRef>,
        lower_dirs: Vec<LowerRef>,
        hardlink: Option<(Hardlink, bool, u32)>,
        layout_gen: u64,
    ) -> Node {
        let (indexed, merged_nlink) = hardlink.as_ref().map_or((false, 0), |h| (h.1, h.2));
        Node {
            partial: Mutex::new(None),
            upper_fd: Mutex::new(None),
            layout: parking_lot::RwLock::new(Arc::new(Layout::new(lower, lower_dirs))),
            layout_gen: AtomicU64::new(layout_gen),
            generation: AtomicU64::new(0),
            ino,
            fmt,
            hardlink: hardlink.map(|h| h.0),
            state: Mutex::new(NodeState {
                parent,
                name: name.to_owned(),
                upper,
                unlinked: false,
                others: Vec::new(),
                indexed,
                merged_nlink,
                alias: None,
            }),
            lookups: AtomicU64::new(0),
            copy_up_lock: Mutex::new(()),
            io: Mutex::new(IoCounts::default()),
        }
    }

    pub fn layout(&self) -> Arc<Layout> {
        self.layout.read().clone()
    }

    pub fn set_layout(&self, l: Layout) {
        *self.layout.write() = Arc::new(l);
    }

    pub fn is_dir(&self) -> bool {
        self.fmt == libc::S_IFDIR
    }

    pub fn has_upper(&self) -> bool {
        self.state.lock().upper
    }

    pub fn set_upper(&self) {
        self.state.lock().upper = true;
    }

    pub fn parent(&self) -> Option<Arc<Node>> {
        self.state.lock().parent.clone()
    }

    /// The merged path of this node: also its path in the upper layer. `None` once unlinked.
    pub fn path(&self) -> Option<RelPath> {
        let mut names: Vec<CString> = Vec::new();
        let mut cur = {
            let s = self.state.lock();
            if s.unlinked {
                return None;
            }
            match &s.parent {
                None => return Some(RelPath::root()),
                Some(p) => {
                    names.push(s.name.clone());
                    p.clone()
                }
            }
        };
        loop {
            let next = {
                let s = cur.state.lock();
                if s.unlinked {
                    return None;
                }
                match &s.parent {
                    None => break,
                    Some(p) => {
                        names.push(s.name.clone());
                        p.clone()
                    }
                }
            };
            cur = next;
        }
        let mut p = RelPath::root();
        for n in names.iter().rev() {
            p = p.join(n);
        }
        Some(p)
    }

    /// The kernel reached this node through `parent/name`: that becomes its current name;
    /// a hard-linked file remembers the previous one too.
    pub fn set_location(&self, parent: Arc<Node>, name: &CStr) {
        let mut s = self.state.lock();
        let same = |p: &Arc<Node>, n: &CStr| Arc::ptr_eq(p, &parent) && n == name;
        if let Some(old) = s.parent.clone()
            && !s.unlinked
            && self.fmt != libc::S_IFDIR
            && !same(&old, &s.name)
        {
            let old_name = s.name.clone();
            s.others.push((old, old_name));
        }
        s.others.retain(|(p, n)| !same(p, n));
        s.parent = Some(parent);
        s.name = name.to_owned();
        s.unlinked = false;
    }

    /// `from_parent/from` was renamed to `parent/name`.
    pub fn rename_name(
        &self,
        from_parent: &Arc<Node>,
        from: &CStr,
        parent: Arc<Node>,
        name: &CStr,
    ) {
        let mut s = self.state.lock();
        let is_from = |p: &Arc<Node>, n: &CStr| Arc::ptr_eq(p, from_parent) && n == from;
        s.others.retain(|(p, n)| !is_from(p, n));
        s.parent = Some(parent);
        s.name = name.to_owned();
        s.unlinked = false;
    }

    /// The name `parent/name` of this node was removed. Another known name takes over; with
    /// none left the node is unlinked (it may still be open).
    pub fn unlink_name(&self, parent: &Arc<Node>, name: &CStr) {
        let mut s = self.state.lock();
        let is = |p: &Arc<Node>, n: &CStr| Arc::ptr_eq(p, parent) && n == name;
        s.others.retain(|(p, n)| !is(p, n));
        let current = s.parent.as_ref().is_some_and(|p| is(p, &s.name));
        if current || self.fmt == libc::S_IFDIR {
            match s.others.pop() {
                Some((p, n)) if self.fmt != libc::S_IFDIR => {
                    s.parent = Some(p);
                    s.name = n;
                }
                _ => {
                    s.unlinked = true;
                    s.parent = None;
                }
            }
        }
    }

    /// Chooses the I/O mode of a new open and counts it.
    pub fn start_io(&self, writes: bool, passthrough_ok: bool) -> IoMode {
        let mut io = self.io.lock();
        if !writes && passthrough_ok && io.cached == 0 {
            io.passthrough += 1;
            IoMode::Passthrough
        } else if io.passthrough > 0 {
            IoMode::Direct
        } else {
            io.cached += 1;
            IoMode::Cached
        }
    }

    pub fn end_io(&self, mode: IoMode) {
        let mut io = self.io.lock();
        match mode {
            IoMode::Passthrough => io.passthrough = io.passthrough.saturating_sub(1),
            IoMode::Cached => io.cached = io.cached.saturating_sub(1),
            IoMode::Direct => {}
        }
    }

    pub fn add_lookup(&self, n: u64) {
        self.lookups.fetch_add(n, Ordering::Relaxed);
    }

    /// Drops `n` kernel references; true when none are left.
    pub fn forget(&self, n: u64) -> bool {
        let prev = self
            .lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            })
            .unwrap_or(0);
        prev <= n
    }
}
