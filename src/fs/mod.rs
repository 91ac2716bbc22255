//! The filesystem engine: the merged view of one upper and N lower layers with kernel OverlayFS
//! semantics. Methods take plain values and return `Result<_, Errno>`; the fuser adapter in
//! `fuse.rs` only translates. Nothing here panics on a request.
//!
//! Concurrency: nodes and handles live in `DashMap`s; each node has its own small lock. There
//! is no global lock on any path. The kernel serialises directory operations on the same names
//! (VFS i_rwsem), which this code relies on exactly as kernel overlayfs does.

pub(crate) mod acl;
mod copyup;
mod dir;
mod file;
pub mod fuse;
mod index;
mod links;
mod node;
mod partial;
pub mod snapshot;
pub use partial::MapDirs;

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::RwLock;

use crate::layer::{self, EntryKind, Layer, RelPath, XattrNames};
use crate::sys::{self, Errno, Result, Stat};
pub use node::{Hardlink, IoMode, Layout, LowerRef, Node};

pub const ROOT_INO: u64 = 1;

/// A fuse-overlayfs style id mapping: `VIEW:LAYER:LEN` ranges. Empty = identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap(pub Vec<(u32, u32, u32)>);

/// The id the kernel's overflow uid/gid: shown for layer ids outside every range.
const OVERFLOW_ID: u32 = 65534;

impl IdMap {
    /// Layer id -> id shown in the mount.
    pub fn to_view(&self, id: u32) -> u32 {
        if self.0.is_empty() {
            return id;
        }
        self.0
            .iter()
            .find(|(_, l, n)| id >= *l && id - l < *n)
            .map_or(OVERFLOW_ID, |(v, l, _)| v + (id - l))
    }

    /// Id given by a caller -> id stored in the layer (unmapped ids are stored as they are).
    pub fn to_layer(&self, id: u32) -> u32 {
        self.0
            .iter()
            .find(|(v, _, n)| id >= *v && id - v < *n)
            .map_or(id, |(v, l, _)| l + (id - v))
    }
}

/// An O_PATH directory fd, shared by the node cache and the operation using it.
type DirFd = Arc<OwnedFd>;

/// What a mount serves and how. Built from the command line (see `options.rs`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Lower layers, topmost first.
    pub lowers: Vec<PathBuf>,
    /// Upper layer; `None` makes a read-only mount.
    pub upper: Option<PathBuf>,
    /// Work dir on the upper's filesystem (temporary files for atomic copy-up and whiteouts).
    pub work: Option<PathBuf>,
    /// Use `user.overlay.*` xattrs instead of `trusted.overlay.*` (rootless layers).
    pub userxattr: bool,
    /// POSIX ACLs as kernel overlayfs has them: the kernel checks permissions with them, new
    /// objects get the umask or their directory's default ACL here. Off (`noacl`): ACLs
    /// are kept as plain xattrs, the kernel applies the umask and checks mode bits only.
    pub acl: bool,
    /// Report every file as owned by this uid / gid.
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
    /// fuse-overlayfs `uidmapping=` / `gidmapping=`: ids in the layers are shown shifted.
    pub uid_map: IdMap,
    pub gid_map: IdMap,
    /// `volatile` / `fsync=0`: skip fsync (data may be lost on a crash, like kernel `volatile`).
    pub fsync: bool,
    /// How long the kernel may cache entries and attributes. All changes go through this
    /// daemon, so caching is coherent; only out-of-band changes to layers need a short TTL.
    pub ttl: Duration,
    /// Block size of dirty tracking (a volume setting; the page size by default).
    pub block_size: u64,
    /// Volume mode: block-level copy-up into partial files, with block maps kept here.
    pub maps: Option<partial::MapDirs>,
    /// Hard-linked lower files share one copy through `workdir/index` (kernel `index=on`).
    /// Off in volume mode: index entries would link into layers that a snapshot freezes.
    pub index: bool,
    /// FUSE passthrough for files opened read-only (kernel >= 6.9): reads bypass the daemon.
    /// On by default only for read-only mounts: the kernel fails (EIO) a write open of an
    /// inode that has passthrough opens, and a passthrough reader would not follow copy-up.
    pub passthrough: bool,
    /// Volume mode: the change times to show for objects of the frozen layers whose own
    /// ctime a squash moved (see `volume::ctimes`); replaced by `Overlay::set_ctimes`.
    pub ctimes: Arc<crate::volume::ctimes::Ctimes>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lowers: Vec::new(),
            upper: None,
            work: None,
            userxattr: false,
            acl: true,
            squash_uid: None,
            squash_gid: None,
            uid_map: IdMap::default(),
            gid_map: IdMap::default(),
            fsync: true,
            ttl: Duration::from_secs(1),
            block_size: 4096,
            index: true,
            maps: None,
            passthrough: true,
            ctimes: Arc::default(),
        }
    }
}

/// An open file or directory.
#[derive(Debug)]
pub struct Handle {
    pub node: Arc<Node>,
    /// The real file. Replaced when the file is copied up after the open (readers then see
    /// later writes, like with kernel overlayfs) and, for writers, after a freeze (their next
    /// write must land in the new upper, never in a frozen layer).
    file: RwLock<Arc<OwnedFd>>,
    /// `Node::generation` when `file` was opened.
    generation: AtomicU64,
    /// `file` is a partial file (volume mode): reads and writes go through its block map.
    partial: std::sync::atomic::AtomicBool,
    /// For a frozen partial `file`: its map and the data below, resolved at the first read.
    chain: parking_lot::Mutex<Option<Arc<partial::FrozenChain>>>,
    /// Prefetching ahead of a sequential reader of a partial file.
    ra: partial::ReadAhead,
    /// Snapshot epoch when `file` was opened.
    epoch: AtomicU64,
    pub flags: i32,
    pub io: parking_lot::Mutex<IoMode>,
    /// Directories: the merged listing, taken at the first readdir.
    pub entries: parking_lot::Mutex<Option<Arc<Vec<dir::DirEntry>>>>,
}

impl Handle {
    pub fn fd(&self) -> Arc<OwnedFd> {
        self.file.read().clone()
    }

    /// Whether dropping the handle may close the last descriptor of a removed file (its own,
    /// or one of a frozen chain's layers that a squash removed): that close frees the data,
    /// in the closing thread. Also when that cannot be told.
    pub fn may_free_data(&self) -> bool {
        self.chain.lock().is_some()
            || sys::fstat(self.fd().as_fd()).map_or(true, |st| st.st_nlink == 0)
    }
}

/// The layer stack. Replaced as a whole when a live snapshot freezes the upper or a squash
/// replaces frozen layers (`restack`).
#[derive(Debug)]
pub struct Layers {
    /// The snapshot epoch this stack belongs to.
    pub epoch: u64,
    pub upper: Option<Arc<Layer>>,
    /// Lower layers with their stable ids (`LowerRef::layer`), bottom first. The stack order
    /// is by id, highest on top, so a frozen upper (the next id) slides in on top and a squash
    /// drops ids or gives one a new directory, without renumbering anything.
    pub lowers: Vec<(usize, Arc<Layer>)>,
}

impl Layers {
    /// The lower layer with stable id `id`, if it is still in the stack.
    pub fn lower(&self, id: usize) -> Option<&Arc<Layer>> {
        self.lowers
            .binary_search_by_key(&id, |(i, _)| *i)
            .ok()
            .map(|k| &self.lowers[k].1)
    }

    /// The id a newly frozen layer gets: above every id ever used (a squash keeps the top
    /// id of its range, so the highest id never goes away).
    fn next_id(&self) -> usize {
        self.lowers.last().map_or(0, |(i, _)| i + 1)
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Layer>> {
        self.lowers.iter().map(|(_, l)| l).chain(self.upper.iter())
    }
}

/// A change of the layer stack, in order; `Overlay::refresh` replays them on each node.
#[derive(Debug, Clone, Copy)]
enum StackEvent {
    /// The upper of snapshot epoch `epoch` became the lower layer `id`.
    Freeze { id: usize, epoch: u64 },
    /// Lower layers were replaced (squash): every lower reference is looked up again.
    Restack,
}

pub struct Overlay {
    pub cfg: Config,
    layers: parking_lot::RwLock<Arc<Layers>>,
    /// `workdir/work`, like the kernel.
    work: Option<Layer>,
    /// `workdir/index`: copies of hard-linked lower files (see `index.rs`).
    index: Option<Layer>,
    /// Snapshot epoch: number of freezes since mount.
    epoch: AtomicU64,
    /// Stack generation: the number of stack changes since mount (freezes and restacks).
    generation: AtomicU64,
    /// Stack history: event `k` took the stack from generation `k` to `k + 1`.
    events: parking_lot::RwLock<Vec<StackEvent>>,
    /// Stable inode numbers that a re-resolved object now has, mapped to the number of the
    /// live node the kernel knows it by (a squash re-creates directories as new inodes).
    aliases: DashMap<u64, u64>,
    /// Objects of squashed-away layers kept only so that their inode numbers, still the
    /// identity of a live node (or alias), are not reused; removed when that node goes.
    ghosts: DashMap<u64, PathBuf>,
    /// After a restack, until `settle_all` ran: the nodes the kernel knew before it, by
    /// (parent inode, name), so that a lookup of one of them finds it (and its alias)
    /// instead of making a second node for the same object.
    unsettled: parking_lot::RwLock<std::collections::HashMap<(u64, CString), Arc<Node>>>,
    /// Held shared by every operation for as long as it uses the layer stack (`stable`),
    /// exclusively by a freeze or a restack while it changes the stack.
    barrier: parking_lot::RwLock<()>,
    /// A freeze's commit in progress (fsyncs wait for it) or failed.
    commit: CommitGate,
    /// Blocks written in the current epoch, per inode (exact, extent-based).
    dirty: DashMap<u64, crate::volume::ExtentSet>,
    /// Block maps of frozen layers' partial files, by id (immutable once frozen).
    frozen_maps: DashMap<crate::volume::MapId, Arc<crate::volume::BlockMap>>,
    /// Nodes whose upper partial file has a live map (`Node::partial`).
    live_partials: DashMap<u64, ()>,
    x: XattrNames,
    /// All layers on one filesystem: real inode numbers are unique and used as they are.
    samefs: bool,
    /// Distinct st_dev of the layers, upper first: the index is the xino fsid.
    devs: Vec<u64>,
    nodes: DashMap<u64, Arc<Node>>,
    handles: DashMap<u64, Arc<Handle>>,
    next_fh: AtomicU64,
    tmp_seq: AtomicU64,
    /// This process's id, part of every temporary name (taken once: `getpid` is a system
    /// call each time, and the engine is made in the process that serves it).
    pid: u32,
    /// Tells the kernel to drop cached attributes of an inode whose attributes changed as a
    /// side effect it cannot know about (a directory copied up becomes a merged directory).
    invalidate: std::sync::OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    /// See `Config::ctimes`: by real inode number.
    ctimes: parking_lot::RwLock<Arc<crate::volume::ctimes::Ctimes>>,
    /// Link counts of frozen objects an online squash hard-linked, by real inode number,
    /// until it removed the old layers (`note_nlink`).
    nlinks: parking_lot::RwLock<std::collections::HashMap<u64, u64>>,
}

/// See `Overlay::freeze` and `Overlay::wait_commit`.
#[derive(Default)]
struct CommitGate {
    pending: parking_lot::Mutex<bool>,
    done: parking_lot::Condvar,
    failed: std::sync::atomic::AtomicBool,
}

/// Result of resolving one name in a directory.
struct Found {
    st: Stat,
    ino: u64,
    upper: bool,
    lower: Option<LowerRef>,
    lower_dirs: Vec<LowerRef>,
    /// Hard-linked lower file: (identity, index copy exists, merged link count).
    hardlink: Option<(Hardlink, bool, u32)>,
    /// Whether a lower layer shows this very name in the parent (what `lower_has` tells),
    /// when the lookup of the lower layers made here already found out; `None` when it did
    /// not look there under this name (opaque, redirected, or an upper non-directory).
    lower_has: Option<bool>,
}

/// What resolving a name found, beyond the node: kept by an operation that goes on to
/// change the name, so it need not ask the layers again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    /// The upper holds the object under this name (not a whiteout).
    pub upper: bool,
    /// See `Found::lower_has`.
    pub lower_has: Option<bool>,
}

/// What the lower layers show under one name.
struct LowerFound {
    /// The topmost lower non-directory, if that is what the name is.
    nondir: Option<LowerRef>,
    /// The lower directories merged under the name, topmost first.
    dirs: Vec<LowerRef>,
    /// Stat and stable inode number of the topmost object.
    top: Option<(Stat, u64)>,
}

/// Attributes of a node as reported to the kernel.
pub type Attr = Stat;

/// Opens the upper and work directories. In overlay mode both are reached through one
/// private clone of the mount they share (renames between them must stay on one mount), like
/// the lower layers; a volume reopens its upper by path at every snapshot, so it uses the
/// mount as it is.
fn open_upper_and_work(cfg: &Config) -> std::io::Result<(Option<Layer>, Option<Layer>)> {
    let (Some(u), Some(w)) = (&cfg.upper, &cfg.work) else {
        return Ok((cfg.upper.as_deref().map(Layer::open).transpose()?, None));
    };
    if cfg.maps.is_none() {
        let common: PathBuf = u
            .components()
            .zip(w.components())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a)
            .collect();
        let id = crate::layer::mount_id(&common);
        if id.is_some()
            && id == crate::layer::mount_id(u)
            && id == crate::layer::mount_id(w)
            && let Some(clone) = crate::layer::clone_mount(&common)
        {
            let within = |p: &Path| -> std::io::Result<Layer> {
                let rel = p.strip_prefix(&common).map_err(std::io::Error::other)?;
                let rel = if rel.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    rel
                };
                Layer::open_in(Some(clone.as_fd()), rel, p)
            };
            return Ok((Some(within(u)?), Some(within(w)?)));
        }
    }
    Ok((Some(Layer::open(u)?), Some(Layer::open(w)?)))
}

impl Overlay {
    pub fn new(cfg: Config) -> std::io::Result<Overlay> {
        // Lower layers are read through private clones of their mounts (see `clone_mount`).
        // `cfg.lowers` is top first; ids count from the bottom.
        let lowers = cfg
            .lowers
            .iter()
            .rev()
            .enumerate()
            .map(|(i, p)| Ok((i, Arc::new(Layer::open_cloned(p)?))))
            .collect::<std::io::Result<Vec<_>>>()?;
        let (upper, work_base) = open_upper_and_work(&cfg)?;
        let upper = upper.map(Arc::new);
        let work = match (&work_base, &upper) {
            // Like the kernel: temporary objects live in workdir/work.
            (Some(wl), Some(_)) => Some(wl.subdir(c"work")?),
            _ => None,
        };
        let index = match (&work_base, &work) {
            (Some(wl), Some(_)) if cfg.index => Some(wl.subdir(c"index")?),
            _ => None,
        };
        let mut devs: Vec<u64> = Vec::new();
        for l in upper.iter().chain(lowers.iter().map(|(_, l)| l)) {
            if !devs.contains(&l.dev) {
                devs.push(l.dev);
            }
        }
        let samefs = devs.len() <= 1;
        let root_lowers = (0..lowers.len())
            .rev()
            .map(|i| LowerRef {
                layer: i,
                path: RelPath::root(),
            })
            .collect();
        let root = Node::new(
            ROOT_INO,
            libc::S_IFDIR,
            None,
            c"",
            upper.is_some(),
            None,
            root_lowers,
            None,
            0,
        );
        root.add_lookup(1);
        let nodes = DashMap::new();
        nodes.insert(ROOT_INO, Arc::new(root));
        let cfg_ctimes = cfg.ctimes.clone();
        Ok(Overlay {
            x: XattrNames::new(cfg.userxattr),
            cfg,
            layers: parking_lot::RwLock::new(Arc::new(Layers {
                epoch: 0,
                upper,
                lowers,
            })),
            work,
            index,
            epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            events: parking_lot::RwLock::new(Vec::new()),
            aliases: DashMap::new(),
            ghosts: DashMap::new(),
            unsettled: parking_lot::RwLock::new(std::collections::HashMap::new()),
            barrier: parking_lot::RwLock::new(()),
            commit: CommitGate::default(),
            dirty: DashMap::new(),
            frozen_maps: DashMap::new(),
            live_partials: DashMap::new(),
            samefs,
            devs,
            nodes,
            handles: DashMap::new(),
            next_fh: AtomicU64::new(1),
            tmp_seq: AtomicU64::new(0),
            pid: std::process::id(),
            invalidate: std::sync::OnceLock::new(),
            ctimes: parking_lot::RwLock::new(cfg_ctimes),
            nlinks: Default::default(),
        })
    }

    /// The change times of the frozen layers mounted now (after a squash switched them).
    /// Every inode the table names lives in one of those layers, so no other object of the
    /// filesystem can have its number.
    pub fn set_ctimes(&self, c: Arc<crate::volume::ctimes::Ctimes>) {
        *self.ctimes.write() = c;
    }

    /// A change time to show for the object of a mounted frozen layer with inode `ino`
    /// until the next `set_ctimes`, unless one is known (an online squash is about to
    /// hard-link the object, which moves its own ctime).
    pub fn note_ctime(&self, ino: u64, ctime: (i64, i64)) {
        let mut c = self.ctimes.write();
        if c.get(ino).is_none() {
            Arc::make_mut(&mut c).insert(ino, ctime);
        }
    }

    /// The link count to show for the object of a mounted frozen layer with inode `ino`, as
    /// it was before an online squash hard-links it into the merged layer (which adds its
    /// names there to the count until the old layers are removed): the first one noted.
    pub fn note_nlink(&self, ino: u64, nlink: u64) {
        self.nlinks.write().entry(ino).or_insert(nlink);
    }

    /// The squash that noted link counts removed the old layers: real counts are right.
    pub fn clear_nlinks(&self) {
        self.nlinks.write().clear();
    }

    /// Installs the kernel cache invalidation callback (set once the session exists).
    pub fn set_invalidator(&self, f: Box<dyn Fn(u64) + Send + Sync>) {
        let _ = self.invalidate.set(f);
    }

    fn invalidate_attr(&self, ino: u64) {
        if let Some(f) = self.invalidate.get() {
            f(ino);
        }
    }

    /// Whether ids in the layers and ids in the mount differ (`uidmapping=`, `gidmapping=`).
    fn maps_ids(&self) -> bool {
        !self.cfg.uid_map.0.is_empty() || !self.cfg.gid_map.0.is_empty()
    }

    pub fn read_only(&self) -> bool {
        self.layers.read().upper.is_none()
    }

    pub fn layers(&self) -> Arc<Layers> {
        self.layers.read().clone()
    }

    /// The lower layer with stable id `id`. ESTALE if a squash replaced it and the caller
    /// holds a reference it could not re-resolve (an unlinked node's lower object).
    fn lower(&self, id: usize) -> Result<Arc<Layer>> {
        self.layers.read().lower(id).cloned().ok_or(Errno::ESTALE)
    }

    pub fn node(&self, ino: u64) -> Result<Arc<Node>> {
        let n = self
            .nodes
            .get(&ino)
            .map(|n| n.clone())
            .ok_or(Errno::ESTALE)?;
        let _s = self.stable();
        self.refresh(&n);
        Ok(n)
    }

    fn upper(&self) -> Result<Arc<Layer>> {
        self.layers.read().upper.clone().ok_or(Errno::EROFS)
    }

    fn work(&self) -> Result<&Layer> {
        self.work.as_ref().ok_or(Errno::EROFS)
    }

    fn tmp_name(&self) -> CString {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("#lv{:x}.{n:x}", self.pid)).expect("no NUL")
    }

    /// Stable inode number of an object found in a layer (see `node.rs`): its origin's, if it
    /// was copied up and the origin is its identity (`identity_origin`), else its own.
    fn ino_of(&self, dir: BorrowedFd, name: &CStr, st: &Stat, upper: bool) -> u64 {
        match self.identity_origin(dir, name, st, upper) {
            Some((_, ino)) => ino,
            None => self.map_ino(st.st_dev, st.st_ino),
        }
    }

    /// The origin of `dir/name` (its file handle and inode number) if that is the object's
    /// identity: always in the upper, and for directories (they have no hard links). In a
    /// lower layer (an old upper rotated down) with an index, only if neither the origin
    /// nor the object has another name: a hard link made or copied up through the index
    /// of an earlier mount is broken once that index is left behind (as with kernel
    /// overlayfs, which does not follow a lower layer's origins at all), and two different
    /// files must never share a node. Volume mode has no index: its copy-up links every
    /// name of the origin to the copy (`links.rs`), so the origin stays the identity.
    pub(super) fn identity_origin(
        &self,
        dir: BorrowedFd,
        name: &CStr,
        st: &Stat,
        upper: bool,
    ) -> Option<(Vec<u8>, u64)> {
        let fb = sys::getxattr(dir, name, &self.x.origin).ok().flatten()?;
        let (ino, nlink) = self.origin_ino(&fb)?;
        let trusted =
            upper || sys::is_dir(st) || !self.has_index() || (nlink <= 1 && st.st_nlink <= 1);
        trusted.then_some((fb, ino))
    }

    pub(super) fn origin_ino(&self, fb: &[u8]) -> Option<(u64, u64)> {
        let layers = self.layers();
        for l in layers.all() {
            if let Ok(fd) = layer::decode_origin(fb, l.root_rd.as_fd()) {
                let st = sys::fstat(fd.as_fd()).ok()?;
                return Some((self.map_ino(st.st_dev, st.st_ino), st.st_nlink as u64));
            }
        }
        None
    }

    fn map_ino(&self, dev: u64, ino: u64) -> u64 {
        if self.samefs {
            return ino;
        }
        let fsid = self.devs.iter().position(|d| *d == dev).unwrap_or(0) as u64;
        ino | (fsid << 56)
    }

    /// Where the node's current object lives: (dir fd, name). A directory is given as its
    /// own fd and `.`.
    fn locate(&self, node: &Node) -> Result<(DirFd, CString)> {
        if node.is_dir() {
            if node.has_upper() {
                return Ok((self.upper_dir(node)?, sys::dot().to_owned()));
            }
            let lay = node.layout();
            if lay.lower_dirs.is_empty() {
                return Err(Errno::ENOENT);
            }
            return Ok((self.lower_dir(&lay, 0)?, sys::dot().to_owned()));
        }
        let (parent, name) = {
            let s = node.state.lock();
            if s.unlinked {
                return Err(Errno::ENOENT);
            }
            (s.parent.clone().ok_or(Errno::ENOENT)?, s.name.clone())
        };
        if node.has_upper() {
            return Ok((self.upper_dir(&parent)?, name));
        }
        if let (Some(hl), true) = (&node.hardlink, node.state.lock().indexed) {
            let ix = self.index.as_ref().ok_or(Errno::EIO)?;
            return Ok((Arc::new(ix.dir(&RelPath::root())?), hl.index.clone()));
        }
        let lay = node.layout();
        let lr = lay.lower.as_ref().ok_or(Errno::ENOENT)?;
        // Usually the lower file sits in the parent's lower directory of the same layer.
        let play = parent.layout();
        if let Some(k) = play.lower_dirs.iter().position(|p| p.layer == lr.layer)
            && play.lower_dirs[k].path.join(&name) == lr.path
        {
            return Ok((self.lower_dir(&play, k)?, name));
        }
        let (d, n) = self.lower(lr.layer)?.parent_of(&lr.path)?;
        Ok((Arc::new(d), n))
    }

    /// Upper directory fd of `node`, which must already be copied up. The cache is tagged
    /// with the epoch of the stack it was opened in: an fd of an upper that a snapshot froze
    /// is never handed out as the current upper.
    fn upper_dir(&self, node: &Node) -> Result<DirFd> {
        let layers = self.layers();
        let mut cached = node.upper_fd.lock();
        if let Some((epoch, fd)) = &*cached
            && *epoch == layers.epoch
        {
            return Ok(fd.clone());
        }
        let up = layers.upper.as_ref().ok_or(Errno::EROFS)?;
        let fd = Arc::new(up.dir(&node.path().ok_or(Errno::ENOENT)?)?);
        *cached = Some((layers.epoch, fd.clone()));
        Ok(fd)
    }

    /// The fd of `lay.lower_dirs[k]`.
    fn lower_dir(&self, lay: &Layout, k: usize) -> Result<DirFd> {
        if let Some(fd) = lay.lower_fds[k].get() {
            return Ok(fd.clone());
        }
        let lr = &lay.lower_dirs[k];
        let fd = Arc::new(self.lower(lr.layer)?.dir(&lr.path)?);
        Ok(lay.lower_fds[k].get_or_init(|| fd).clone())
    }

    /// Looks in the lower layers below `parent` for `name`. `redirect` is an absolute layer
    /// path set by a redirect above, which replaces the parent-relative path.
    fn lookup_lower(
        &self,
        parent: &Node,
        name: &CStr,
        mut redirect: Option<RelPath>,
        upper_is_dir: Option<bool>,
    ) -> Result<LowerFound> {
        let mut dirs = Vec::new();
        let mut nondir = None;
        let mut top: Option<(Stat, u64)> = None;
        let play = parent.layout();
        let layers = self.layers();
        let mut pdirs = play.lower_dirs.iter().enumerate().peekable();
        // Top of the stack first: the highest id.
        for (j, l) in layers.lowers.iter().rev().map(|(j, l)| (*j, l)) {
            let (path, cached) = match &redirect {
                Some(r) => (r.clone(), None),
                None => {
                    while pdirs.peek().is_some_and(|(_, p)| p.layer > j) {
                        pdirs.next();
                    }
                    match pdirs.peek() {
                        Some((k, p)) if p.layer == j => (p.path.join(name), Some(*k)),
                        _ => continue,
                    }
                }
            };
            let (d, n) = match cached {
                Some(k) => (self.lower_dir(&play, k)?, name.to_owned()),
                None => match l.parent_of(&path) {
                    Ok((d, n)) => (Arc::new(d), n),
                    Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => {
                        // Not in this layer, but a directory on the way may be redirected.
                        redirect = Some(self.translate_redirect(l, &path)?);
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            let st = match sys::fstatat(d.as_fd(), &n) {
                Ok(st) => st,
                Err(Errno::ENOENT | Errno::ENOTDIR) => {
                    if redirect.is_some() {
                        redirect = Some(self.translate_redirect(l, &path)?);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            match layer::classify_lower(d.as_fd(), &n, &st, &self.x)? {
                EntryKind::Whiteout => break,
                EntryKind::Dir => {
                    if upper_is_dir == Some(false) || nondir.is_some() {
                        break;
                    }
                    if top.is_none() {
                        top = Some((st, self.ino_of(d.as_fd(), &n, &st, false)));
                    }
                    let (ppath, _) = path.split_last().unwrap_or_default();
                    let opaque = layer::is_opaque(d.as_fd(), &n, &self.x)?;
                    if let Some(r) = layer::redirect(d.as_fd(), &n, &ppath, &self.x)? {
                        redirect = Some(r);
                    } else if redirect.is_some() {
                        // Below an absolute redirect the same path is followed, except where
                        // a directory on it was itself redirected in this layer.
                        redirect = Some(self.translate_redirect(l, &path)?);
                    }
                    dirs.push(LowerRef { layer: j, path });
                    if opaque {
                        break;
                    }
                }
                EntryKind::Other => {
                    if upper_is_dir.is_none() && dirs.is_empty() {
                        top = Some((st, self.ino_of(d.as_fd(), &n, &st, false)));
                        nondir = Some(LowerRef { layer: j, path });
                    }
                    break;
                }
            }
        }
        Ok(LowerFound { nondir, dirs, top })
    }

    /// The path that `path` (absolute, in layer `l`) continues as in the layers below `l`:
    /// each directory on it that carries a redirect in `l` substitutes its target, as
    /// kernel overlayfs does when it walks an absolute redirect component by component.
    fn translate_redirect(&self, l: &Layer, path: &RelPath) -> Result<RelPath> {
        let mut out = RelPath::root();
        let mut walked = RelPath::root();
        for comp in path
            .as_bytes()
            .split(|c| *c == b'/')
            .filter(|c| !c.is_empty())
        {
            let name = CString::new(comp).map_err(|_| Errno::EINVAL)?;
            walked = walked.join(&name);
            out = out.join(&name);
            let Ok((d, n)) = l.parent_of(&walked) else {
                continue;
            };
            let parent = out.split_last().map(|(p, _)| p).unwrap_or_default();
            if let Ok(Some(r)) = layer::redirect(d.as_fd(), &n, &parent, &self.x) {
                out = r;
            }
        }
        Ok(out)
    }

    /// Resolves `name` in directory `parent` in the merged view.
    fn resolve(&self, parent: &Node, name: &CStr) -> Result<Found> {
        if name.to_bytes().len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let mut upper_st = None;
        let mut redirect = None;
        let mut stop_lower = false;
        let mut upper_ino = 0;
        // A relative redirect (kernel: a directory renamed within its parent) renames the
        // entry in the parent's lower directories, whatever path the parent has.
        let mut lower_name = name.to_owned();
        if parent.has_upper() {
            let d = self.upper_dir(parent)?;
            match sys::fstatat(d.as_fd(), name) {
                Ok(st) => match layer::classify(&st) {
                    EntryKind::Whiteout => return Err(Errno::ENOENT),
                    EntryKind::Dir => {
                        if layer::is_opaque(d.as_fd(), name, &self.x)? {
                            stop_lower = true;
                        }
                        match sys::getxattr(d.as_fd(), name, &self.x.redirect)? {
                            Some(v) if v.starts_with(b"/") => {
                                redirect = RelPath::from_redirect(&v);
                                if redirect.as_ref().is_none_or(|r| r.is_root()) {
                                    stop_lower = true;
                                }
                            }
                            Some(v) => match layer::relative_redirect_name(&v) {
                                Some(n) => lower_name = n,
                                None => stop_lower = true,
                            },
                            None => {}
                        }
                        upper_ino = self.ino_of(d.as_fd(), name, &st, true);
                        upper_st = Some(st);
                    }
                    EntryKind::Other => {
                        upper_ino = self.ino_of(d.as_fd(), name, &st, true);
                        upper_st = Some(st);
                        stop_lower = true;
                    }
                },
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        let redirected = redirect.is_some();
        let LowerFound {
            nondir: lower,
            dirs: lower_dirs,
            top: ltop,
        } = if stop_lower || parent.layout().lower_dirs.is_empty() && redirect.is_none() {
            LowerFound {
                nondir: None,
                dirs: Vec::new(),
                top: None,
            }
        } else {
            self.lookup_lower(
                parent,
                &lower_name,
                redirect,
                upper_st.map(|s| sys::is_dir(&s)),
            )?
        };
        // The lookup above went through the parent's lower directories under `name` itself
        // unless a redirect sent it elsewhere: whatever it found there, a lower layer shows
        // the name. (Finding nothing under an upper directory proves nothing: it stops at
        // a lower non-directory without recording it.)
        let lower_has = if parent.layout().lower_dirs.is_empty() {
            Some(false)
        } else if !stop_lower
            && !redirected
            && lower_name.as_c_str() == name
            && (lower.is_some() || !lower_dirs.is_empty())
        {
            Some(true)
        } else {
            None
        };
        match upper_st {
            Some(st) => {
                // A merged directory keeps the inode number of its topmost lower directory
                // unless the upper names its own origin.
                let ino = match (&ltop, sys::is_dir(&st)) {
                    (Some((_, lino)), true) if upper_ino == self.map_ino(st.st_dev, st.st_ino) => {
                        *lino
                    }
                    _ => upper_ino,
                };
                let mut f = Found {
                    st,
                    ino,
                    upper: true,
                    lower,
                    lower_dirs,
                    hardlink: None,
                    lower_has,
                };
                f.hardlink = self.detect_hardlink(parent, name, &f)?;
                Ok(f)
            }
            None => {
                let (st, ino) = ltop.ok_or(Errno::ENOENT)?;
                let mut f = Found {
                    st,
                    ino,
                    upper: false,
                    lower,
                    lower_dirs,
                    hardlink: None,
                    lower_has,
                };
                f.hardlink = self.detect_hardlink(parent, name, &f)?;
                Ok(f)
            }
        }
    }

    /// Resolves `name` and returns its node (creating or refreshing the table entry), without
    /// touching the kernel lookup count.
    fn lookup_node(&self, parent: &Arc<Node>, name: &CStr) -> Result<(Arc<Node>, Stat)> {
        self.lookup_seen(parent, name).map(|(n, st, _)| (n, st))
    }

    /// `lookup_node`, also telling what the resolve saw of the name in the layers.
    fn lookup_seen(&self, parent: &Arc<Node>, name: &CStr) -> Result<(Arc<Node>, Stat, Seen)> {
        self.lookup_found(parent, name, None)
    }

    /// `lookup_seen`, with the name resolved already (`found`) or not.
    fn lookup_found(
        &self,
        parent: &Arc<Node>,
        name: &CStr,
        found: Option<Found>,
    ) -> Result<(Arc<Node>, Stat, Seen)> {
        self.settle(parent.ino, name);
        let f = match found {
            Some(f) => f,
            None => self.resolve(parent, name)?,
        };
        let seen = Seen {
            upper: f.upper,
            lower_has: f.lower_has,
        };
        let fmt = f.st.st_mode & libc::S_IFMT;
        let ino = if f.ino == ROOT_INO {
            f.st.st_ino
        } else {
            self.known_ino(f.ino)
        };
        let node = match self.nodes.entry(ino) {
            dashmap::Entry::Occupied(mut e) => {
                let n = e.get().clone();
                self.refresh(&n);
                if n.fmt == fmt {
                    // Same object (or a hard link to it): follow it to the name just used.
                    // The kernel resolves the names of multiply-linked files before each use
                    // (their entries are not cached, see `Attr` TTLs in the adapter), so the
                    // next open or setattr acts on this name, as with kernel overlayfs.
                    if let Some((_, indexed, _)) = &f.hardlink {
                        let mut st = n.state.lock();
                        st.parent = Some(parent.clone());
                        st.name = name.to_owned();
                        st.unlinked = false;
                        st.upper = f.upper;
                        st.indexed |= *indexed;
                    } else if f.upper || !n.has_upper() {
                        n.set_location(parent.clone(), name);
                        if f.upper {
                            n.set_upper();
                        }
                    }
                    n
                } else {
                    // The real inode number was reused by a different object.
                    let fresh = Arc::new(Node::new(
                        ino,
                        fmt,
                        Some(parent.clone()),
                        name,
                        f.upper,
                        f.lower,
                        f.lower_dirs,
                        f.hardlink,
                        self.generation.load(Ordering::Acquire),
                    ));
                    fresh.add_lookup(n.lookups.load(Ordering::Relaxed));
                    e.insert(fresh.clone());
                    fresh
                }
            }
            dashmap::Entry::Vacant(e) => {
                let n = Arc::new(Node::new(
                    ino,
                    fmt,
                    Some(parent.clone()),
                    name,
                    f.upper,
                    f.lower,
                    f.lower_dirs,
                    f.hardlink,
                    self.generation.load(Ordering::Acquire),
                ));
                e.insert(n.clone());
                n
            }
        };
        if !f.upper && (node.has_upper() || node.state.lock().indexed) {
            // A lower-only name of a hard link already copied up: the node's object is the
            // upper (or index) copy.
            let st = self.stat_node(&node)?;
            return Ok((node, st, seen));
        }
        let st = self.finish_attr(&node, f.st);
        Ok((node, st, seen))
    }

    /// Lookup on behalf of the kernel: counts one reference.
    pub fn lookup(&self, parent: u64, name: &CStr) -> Result<(Arc<Node>, Attr)> {
        let _s = self.stable();
        let p = self.node(parent)?;
        if !p.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let (n, st) = self.lookup_node(&p, name)?;
        n.add_lookup(1);
        Ok((n, st))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        if let Some(node) = self.nodes.get(&ino).map(|e| e.clone())
            && node.forget(n)
            && self
                .nodes
                .remove_if(&ino, |_, v| {
                    Arc::ptr_eq(v, &node) && v.lookups.load(Ordering::Acquire) == 0
                })
                .is_some()
        {
            self.node_gone(&node);
        }
    }

    /// Adjusts a real stat to what the merged view reports.
    fn finish_attr(&self, node: &Node, mut st: Stat) -> Attr {
        {
            let c = self.ctimes.read();
            if !c.is_empty()
                && let Some((sec, nsec)) = c.get(st.st_ino)
            {
                st.st_ctime = sec;
                st.st_ctime_nsec = nsec;
            }
        }
        if !node.is_dir() {
            let n = self.nlinks.read();
            if let Some(&nlink) = n.get(&st.st_ino) {
                st.st_nlink = nlink as _;
            }
        }
        st.st_ino = node.ino;
        if node.is_dir() && (node.layout().lower_dirs.len() + usize::from(node.has_upper())) > 1 {
            // Like the kernel: a merged directory's link count is unknown.
            st.st_nlink = 1;
        }
        if node.hardlink.is_some() {
            st.st_nlink = node.state.lock().merged_nlink as _;
        }
        st.st_uid = self.cfg.uid_map.to_view(st.st_uid);
        st.st_gid = self.cfg.gid_map.to_view(st.st_gid);
        if let Some(u) = self.cfg.squash_uid {
            st.st_uid = u;
        }
        if let Some(g) = self.cfg.squash_gid {
            st.st_gid = g;
        }
        st
    }

    fn any_handle_fd(&self, node: &Node) -> Option<Arc<OwnedFd>> {
        self.handles
            .iter()
            .find(|h| h.node.ino == node.ino)
            .map(|h| h.fd())
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr> {
        let _s = self.stable();
        let node = self.node(ino)?;
        if let Some(h) = fh.and_then(|fh| self.handles.get(&fh).map(|h| h.clone()))
            && !node.is_dir()
        {
            return Ok(self.finish_attr(&node, sys::fstat(self.read_fd(&h)?.as_fd())?));
        }
        self.stat_node(&node)
    }

    fn stat_node(&self, node: &Node) -> Result<Attr> {
        match self.locate(node) {
            Ok((d, n)) => Ok(self.finish_attr(node, sys::fstatat(d.as_fd(), &n)?)),
            Err(Errno::ENOENT) => {
                // Open but unlinked: the open file still answers.
                let fd = self.any_handle_fd(node).ok_or(Errno::ENOENT)?;
                Ok(self.finish_attr(node, sys::fstat(fd.as_fd())?))
            }
            Err(e) => Err(e),
        }
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let _s = self.stable();
        let node = self.node(ino)?;
        let (d, n) = self.locate(&node)?;
        sys::readlinkat(d.as_fd(), &n)
    }

    pub fn statfs(&self) -> Result<libc::statvfs> {
        let layers = self.layers();
        let l = layers
            .upper
            .as_ref()
            .or(layers.lowers.last().map(|(_, l)| l))
            .ok_or(Errno::EIO)?;
        let mut st = sys::fstatvfs(l.root.as_fd())?;
        st.f_namemax = 255;
        Ok(st)
    }

    /// fsyncdir: flushes the upper (after a pending snapshot commit).
    pub fn fsyncdir(&self) -> Result<()> {
        self.wait_commit()?;
        self.syncfs()
    }

    pub fn syncfs(&self) -> Result<()> {
        if let Some(u) = &self.layers().upper
            && self.cfg.fsync
        {
            sys::syncfs(u.root_rd.as_fd())?;
        }
        Ok(())
    }
}

/// An overlay-mode engine (no mount) over fresh `lower`, `upper` and `work` directories in
/// `root`, the lower filled by `fill` first. For unit tests of the engine.
#[cfg(test)]
pub(crate) fn test_overlay(root: &Path, fill: impl FnOnce(&Path)) -> Overlay {
    let [lower, upper, work] = ["lower", "upper", "work"].map(|d| root.join(d));
    for d in [&lower, &upper, &work] {
        std::fs::create_dir(d).unwrap();
    }
    fill(&lower);
    Overlay::new(Config {
        lowers: vec![lower],
        upper: Some(upper),
        work: Some(work),
        ..Config::default()
    })
    .unwrap()
}
