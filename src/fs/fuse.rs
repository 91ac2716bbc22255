//! The fuser adapter: translates FUSE requests to `Overlay` calls and results to replies.
//! No filesystem logic lives here.

use std::ffi::{CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use fuser::{
    AccessFlags, BackingId, BsdFileFlags, CopyFileRangeFlags, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use tracing::{debug, warn};

use super::dir::{Creator, NewKind};
use super::file::{Caller, SetAttr, SetTime};
use super::{Attr, IoMode, Overlay, ROOT_INO};
use crate::sys::Errno;

pub struct FuseAdapter {
    fs: Arc<Overlay>,
    ids: NodeIds,
    ttl: Duration,
    passthrough: std::sync::atomic::AtomicBool,
    /// Passthrough backing ids, kept until release (dropping one closes it in the kernel).
    backing: DashMap<u64, BackingId>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Overlay>, ids: NodeIds) -> Self {
        FuseAdapter {
            ids,
            ttl: fs.cfg.ttl,
            passthrough: fs.cfg.passthrough.into(),
            fs,
            backing: DashMap::new(),
        }
    }
}

fn err(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e as i32)
}

/// The creator of a new object as the kernel describes the caller.
fn creator(req: &Request, umask: u32) -> Creator {
    Creator {
        uid: req.uid(),
        gid: req.gid(),
        umask,
    }
}

fn cstr(name: &OsStr) -> Result<CString, fuser::Errno> {
    CString::new(name.as_bytes()).map_err(|_| fuser::Errno::EINVAL)
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs((-sec) as u64) + Duration::from_nanos(nsec as u64)
    }
}

fn kind(fmt: u32) -> FileType {
    match fmt & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr(st: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> SetTime {
    match t {
        None => SetTime::Omit,
        Some(TimeOrNow::Now) => SetTime::Now,
        Some(TimeOrNow::SpecificTime(t)) => SetTime::At(t),
    }
}

macro_rules! tri {
    ($reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(e.into()),
        }
    };
}

/// Either error type of a request, so one closure can `?` engine and fuser errors alike.
struct ErrWrap(fuser::Errno);
impl From<Errno> for ErrWrap {
    fn from(e: Errno) -> Self {
        ErrWrap(err(e))
    }
}
impl From<fuser::Errno> for ErrWrap {
    fn from(e: fuser::Errno) -> Self {
        ErrWrap(e)
    }
}

/// Runs `f`, mapping both error types to a FUSE errno.
fn run<T>(f: impl FnOnce() -> Result<T, ErrWrap>) -> Result<T, fuser::Errno> {
    f().map_err(|e| e.0)
}

/// The FUSE root's node id.
const FUSE_ROOT_ID: u64 = 1;
/// The engine's name for the shell (the FUSE root below the view): no node has it.
const SHELL: u64 = u64::MAX;

/// How the kernel's node ids map to the engine's inodes: one to one, except the overlay's
/// root, whose node id is `view`. That is `FUSE_ROOT_ID`, or `mount::VIEW_NODE` when the
/// FUSE root is the shell that `mount` attaches the view from (the engine calls it `SHELL`).
#[derive(Clone, Copy, Debug)]
pub struct NodeIds {
    view: u64,
}

impl NodeIds {
    /// The view is the FUSE root.
    pub const AT_ROOT: NodeIds = NodeIds { view: FUSE_ROOT_ID };
    /// The FUSE root is the shell; the view's node id is `mount::VIEW_NODE`.
    pub const BELOW_SHELL: NodeIds = NodeIds {
        view: crate::mount::VIEW_NODE,
    };

    /// The engine's inode for the kernel's node id `n`.
    fn engine(self, n: u64) -> u64 {
        match n {
            n if n == self.view => ROOT_INO,
            FUSE_ROOT_ID => SHELL,
            n => n,
        }
    }

    /// The kernel's node id for the engine's inode `ino`.
    pub fn kernel(self, ino: u64) -> u64 {
        if ino == ROOT_INO { self.view } else { ino }
    }
}

impl FuseAdapter {
    /// The engine's inode for the kernel's node id `n`.
    fn ino(&self, n: INodeNo) -> u64 {
        self.ids.engine(n.0)
    }

    /// Attributes of the shell: a directory only its owner (the daemon) may enter.
    fn shell_attr(&self) -> Result<Attr, Errno> {
        let mut st = self.fs.getattr(ROOT_INO, None)?;
        st.st_ino = FUSE_ROOT_ID;
        st.st_mode = libc::S_IFDIR | 0o700;
        st.st_uid = nix::unistd::geteuid().as_raw();
        st.st_gid = nix::unistd::getegid().as_raw();
        st.st_nlink = 2;
        Ok(st)
    }

    /// Cache times for an entry. A file with several names is never cached: the daemon only
    /// learns which name an operation uses from the lookup that precedes it.
    fn ttl_for(&self, st: &Attr) -> Duration {
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR && st.st_nlink > 1 {
            Duration::ZERO
        } else {
            self.ttl
        }
    }

    fn entry(&self, reply: ReplyEntry, st: &Attr) {
        let ttl = self.ttl_for(st);
        reply.entry(&ttl, &attr(st), Generation(0));
    }

    /// Clears set-ID bits as `req`'s caller changes the file (FUSE_HANDLE_KILLPRIV_V2);
    /// `fsetid`: whether the caller may keep them.
    fn clear_set_id(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: Option<FileHandle>,
        fsetid: bool,
    ) -> Result<(), fuser::Errno> {
        let caller = Caller {
            gid: req.gid(),
            pid: req.pid(),
            fsetid,
        };
        self.fs
            .clear_set_id(self.ino(ino), fh.map(|f| f.0), &caller)
            .map_err(err)
    }

    fn create_kind(
        &self,
        reply: ReplyEntry,
        parent: INodeNo,
        name: &OsStr,
        req: &Request,
        kind: NewKind,
        umask: u32,
    ) {
        let r = run(|| {
            let name = cstr(name)?;
            Ok(self
                .fs
                .create_entry(self.ino(parent), &name, kind, creator(req, umask))?)
        });
        match r {
            Ok((_, st)) => self.entry(reply, &st),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_SPLICE_READ
            | InitFlags::FUSE_SPLICE_WRITE
            | InitFlags::FUSE_SPLICE_MOVE
            // Set-ID bits are cleared here (write, truncate, chown, open with O_TRUNC): the
            // kernel then stops asking for security.capability before every write.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            // The extended SETXATTR says when setting an ACL must clear set-group-ID.
            | InitFlags::FUSE_SETXATTR_EXT
            // POSIX ACLs as kernel overlayfs has them (unless `noacl`): the kernel checks
            // permissions with the ACLs (and caches them, except the root's: see the README),
            // and leaves the umask and default ACLs of new objects to us.
            | if self.fs.cfg.acl {
                InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK
            } else {
                InitFlags::empty()
            };
        let _ = config.add_capabilities(want & config.capabilities());
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        if self.passthrough.load(std::sync::atomic::Ordering::Relaxed) {
            let ok = config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                warn!("FUSE passthrough unavailable: reads go through the daemon");
                self.passthrough
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = tri!(reply, cstr(name));
        if self.ino(parent) == SHELL {
            // The mount attaches the view from here (`mount::Detached::attach`).
            return match self.fs.getattr(ROOT_INO, None) {
                Ok(st) if name.as_c_str() == crate::mount::VIEW_NAME => reply.entry_for_node(
                    INodeNo(self.ids.view),
                    &self.ttl,
                    &attr(&st),
                    Generation(0),
                ),
                Ok(_) => reply.error(fuser::Errno::ENOENT),
                Err(e) => reply.error(err(e)),
            };
        }
        match self.fs.lookup(self.ino(parent), &name) {
            Ok((_, st)) => self.entry(reply, &st),
            // A negative entry (node id 0) lets the kernel cache "no such name": every create
            // goes through the kernel, which replaces it, so it cannot go stale.
            Err(Errno::ENOENT) if !self.ttl.is_zero() => {
                let mut none: Attr = unsafe { std::mem::zeroed() };
                none.st_ino = 0;
                reply.entry(&self.ttl, &attr(&none), Generation(0));
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(self.ino(ino), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = match self.ino(ino) {
            SHELL => self.shell_attr(),
            ino => self.fs.getattr(ino, fh.map(|f| f.0)),
        };
        match st {
            Ok(st) => reply.attr(&self.ttl_for(&st), &attr(&st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        kill_suidgid: bool,
        reply: ReplyAttr,
    ) {
        if kill_suidgid {
            // Asked for every truncate by a caller without CAP_FSETID and for every owner
            // change, privileged or not (then root is taken as privileged).
            let fsetid = size.is_none() && req.uid() == 0;
            tri!(reply, self.clear_set_id(req, ino, fh, fsetid));
        }
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        match self.fs.setattr(self.ino(ino), fh.map(|f| f.0), a) {
            Ok(st) => reply.attr(&self.ttl_for(&st), &attr(&st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(self.ino(ino)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = if mode & libc::S_IFMT == libc::S_IFREG {
            NewKind::File { mode }
        } else {
            NewKind::Node {
                mode,
                rdev: rdev as u64,
            }
        };
        self.create_kind(reply, parent, name, req, kind, umask);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.create_kind(reply, parent, name, req, NewKind::Dir { mode }, umask);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = tri!(reply, cstr(name));
        match self.fs.unlink(self.ino(parent), &name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = tri!(reply, cstr(name));
        match self.fs.rmdir(self.ino(parent), &name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = tri!(reply, cstr(target.as_os_str()));
        self.create_kind(
            reply,
            parent,
            link_name,
            req,
            NewKind::Symlink { target: &target },
            0,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = run(|| {
            let (a, b) = (cstr(name)?, cstr(newname)?);
            Ok(self
                .fs
                .rename(self.ino(parent), &a, self.ino(newparent), &b, flags.bits())?)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let target = tri!(reply, self.fs.node(self.ino(ino)).map_err(err));
        self.create_kind(reply, newparent, newname, req, NewKind::Link { target }, 0);
    }

    fn open(
        &self,
        req: &Request,
        ino: INodeNo,
        flags: OpenFlags,
        kill_suidgid: bool,
        reply: ReplyOpen,
    ) {
        let (fh, mut mode, fd) = match self.fs.open(self.ino(ino), flags.0) {
            Ok(x) => x,
            Err(e) => return reply.error(err(e)),
        };
        if kill_suidgid && let Err(e) = self.clear_set_id(req, ino, Some(FileHandle(fh)), false) {
            self.fs.release(fh);
            return reply.error(e);
        }
        if mode == IoMode::Passthrough {
            let backing = if self.passthrough.load(std::sync::atomic::Ordering::Relaxed) {
                reply.open_backing(&*fd)
            } else {
                Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
            };
            match backing {
                Ok(id) => {
                    // No FOPEN_KEEP_CACHE: the kernel refuses it with passthrough (EIO).
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                    self.backing.insert(fh, id);
                    return;
                }
                Err(e) => {
                    debug!("passthrough refused ({e}); serving reads");
                    mode = tri!(reply, self.fs.passthrough_refused(fh).map_err(err));
                }
            }
        }
        reply.opened(FileHandle(fh), open_flags(mode));
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        thread_local! {
            /// Each worker's read buffer, kept: a new one per request costs zeroing it.
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| match self.fs.read_into(fh.0, offset, size, buf) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(err(e)),
        })
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            tri!(reply, self.clear_set_id(req, ino, Some(fh), false));
        }
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        if !flags.is_empty() {
            return reply.error(fuser::Errno::EINVAL);
        }
        match (self.fs).copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.backing.remove(&fh.0);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(self.ino(ino)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (node, entries, _) = tri!(reply, self.fs.dir_entries(fh.0, offset).map_err(err));
        let parent = node.parent().map_or(self.ino(ino), |p| p.ino);
        let dots = [(self.ino(ino), c"."), (parent, c"..")];
        let total = entries.len() as u64 + 2;
        for off in offset..total {
            let full = if off < 2 {
                let (i, n) = dots[off as usize];
                reply.add(
                    INodeNo(i),
                    off + 1,
                    FileType::Directory,
                    OsStr::from_bytes(n.to_bytes()),
                )
            } else {
                let e = &entries[(off - 2) as usize];
                reply.add(
                    INodeNo(e.ino),
                    off + 1,
                    kind(e.fmt),
                    OsStr::from_bytes(e.name.to_bytes()),
                )
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (node, entries, mut resolved) =
            tri!(reply, self.fs.dir_entries(fh.0, offset).map_err(err));
        let total = entries.len() as u64 + 2;
        for off in offset..total {
            if off < 2 {
                // "." and ".." carry no lookup reference, and the kernel takes only their
                // inode number and type (`fuse_direntplus_link` skips them before it reads
                // any attribute): nothing is looked up for them.
                let mut st: Attr = unsafe { std::mem::zeroed() };
                st.st_mode = libc::S_IFDIR;
                st.st_ino = if off == 0 {
                    self.ino(ino)
                } else {
                    node.parent().map_or(self.ino(ino), |p| p.ino)
                };
                let name: &CStr = if off == 0 { c"." } else { c".." };
                let a = attr(&st);
                if reply.add(
                    a.ino,
                    off + 1,
                    OsStr::from_bytes(name.to_bytes()),
                    &Duration::ZERO,
                    &a,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            let e = &entries[(off - 2) as usize];
            let (n, st) = match self.fs.lookup_child(&node, &e.name, &mut resolved) {
                Ok(x) => x,
                // Gone since the listing was taken: skip it.
                Err(_) => continue,
            };
            if reply.add(
                INodeNo(n.ino),
                off + 1,
                OsStr::from_bytes(e.name.to_bytes()),
                &self.ttl_for(&st),
                &attr(&st),
                Generation(0),
            ) {
                // Not sent: give the reference back.
                self.fs.forget(n.ino, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsyncdir() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        acl_kill_sgid: bool,
        reply: ReplyEmpty,
    ) {
        let name = tri!(reply, cstr(name));
        match self
            .fs
            .setxattr(self.ino(ino), &name, value, flags, acl_kill_sgid)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = tri!(reply, cstr(name));
        let value = match self.ino(ino) {
            SHELL => Err(Errno::ENODATA),
            ino => self.fs.getxattr(ino, &name),
        };
        xattr_reply(reply, size, value);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, size, self.fs.listxattr(self.ino(ino)));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = tri!(reply, cstr(name));
        match self.fs.removexattr(self.ino(ino), &name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        // Set for O_TRUNC, but a created file has no set-ID bits to lose.
        _kill_suidgid: bool,
        reply: ReplyCreate,
    ) {
        let r = run(|| {
            let name = cstr(name)?;
            let (_, st, (fh, mut mode, _)) =
                self.fs
                    .create_open(self.ino(parent), &name, mode, flags, creator(req, umask))?;
            if mode == IoMode::Passthrough {
                // A create reply cannot carry a passthrough backing.
                mode = self.fs.passthrough_refused(fh)?;
            }
            Ok((fh, st, mode))
        });
        match r {
            Ok((fh, st, mode)) => reply.created(
                &self.ttl,
                &attr(&st),
                Generation(0),
                FileHandle(fh),
                open_flags(mode),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fs.fallocate(fh.0, mode, offset, length) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }
}

fn open_flags(mode: IoMode) -> FopenFlags {
    // FLUSH has nothing to do here (no write-back cache, locks are the kernel's): skip it.
    FopenFlags::FOPEN_NOFLUSH
        | match mode {
            // Only this daemon changes the layers, so cached pages stay valid across opens.
            IoMode::Cached => FopenFlags::FOPEN_KEEP_CACHE,
            IoMode::Direct | IoMode::Passthrough => FopenFlags::FOPEN_DIRECT_IO,
        }
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, Errno>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(fuser::Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(err(e)),
    }
}
