//! Open files, data I/O, attributes and xattrs.
//!
//! Opening for write (or with O_TRUNC) copies the file up first; writes always go to the upper
//! through the daemon (never passthrough), so a later dirty-block tracker sees every one.

use std::ffi::CStr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};

use super::acl;
use super::dir::Creator;
use super::{Attr, Handle, IoMode, Node, Overlay};
use crate::sys::{self, Errno, Result};

/// A time to set: a value, "now", or leave unchanged.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Omit,
    Now,
    At(SystemTime),
}

impl SetTime {
    fn timespec(self) -> libc::timespec {
        match self {
            SetTime::Omit => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            SetTime::Now => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            SetTime::At(t) => {
                let (sec, nsec) = match t.duration_since(SystemTime::UNIX_EPOCH) {
                    Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                    Err(e) => {
                        let d = e.duration();
                        let (s, n) = (d.as_secs() as i64, d.subsec_nanos() as i64);
                        if n == 0 {
                            (-s, 0)
                        } else {
                            (-s - 1, 1_000_000_000 - n)
                        }
                    }
                };
                libc::timespec {
                    tv_sec: sec,
                    tv_nsec: nsec,
                }
            }
        }
    }
}

/// Attribute changes of one setattr call.
#[derive(Debug, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: SetTime,
    pub mtime: SetTime,
}

impl SetAttr {
    /// Changes nothing: what the kernel sends for `chown(f, -1, -1)`, which only moves the
    /// ctime (FUSE sends no ctime unless it caches writes).
    fn only_ctime(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && matches!((self.atime, self.mtime), (SetTime::Omit, SetTime::Omit))
    }
}

/// Who makes a change that may clear set-ID bits (see [`Overlay::clear_set_id`]), as the
/// kernel describes the caller of a request.
pub struct Caller {
    /// The caller's filesystem gid.
    pub gid: u32,
    /// The calling thread, whose supplementary groups count too.
    pub pid: u32,
    /// Whether the caller may keep set-ID bits (CAP_FSETID).
    pub fsetid: bool,
}

impl Caller {
    /// Whether the caller is in group `gid` (its filesystem gid or a supplementary group).
    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || sys::supplementary_groups(self.pid).is_ok_and(|g| g.contains(&gid))
    }
}

/// An open file: the handle number, the I/O mode the kernel must use, and the real fd.
pub type Opened = (u64, IoMode, Arc<OwnedFd>);

impl Overlay {
    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.get(&fh).map(|h| h.clone()).ok_or(Errno::EBADF)
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.insert(fh, Arc::new(h));
        fh
    }

    /// Opens `ino`. Returns the handle number, the I/O mode the kernel must use, and the real
    /// fd (for a passthrough backing).
    pub fn open(&self, ino: u64, flags: i32) -> Result<Opened> {
        let _s = self.stable();
        let node = self.node(ino)?;
        let acc = flags & libc::O_ACCMODE;
        let writes = acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            if self.read_only() {
                return Err(Errno::EROFS);
            }
            self.copy_up(&node, flags & libc::O_TRUNC == 0)?;
        }
        let oflags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
        let (fd, partial) = self.open_handle_fd(&node, oflags)?;
        if partial
            && flags & libc::O_TRUNC != 0
            && let Some(mut g) = self.live_partial(&node, fd.as_fd())?
            && let Some(ps) = g.as_mut()
        {
            // The data file was cut by the open; the map must agree (nothing reads from below).
            ps.map.truncate_file(fd.as_fd(), 0)?;
            ps.dirty = true;
        }
        Ok(self.add_open(node, flags, fd, partial, writes))
    }

    /// Creates and opens a regular file (a FUSE create). The fd that made the file is the
    /// handle's: no second open of the new file. Returns the node with one kernel lookup, its
    /// attributes and what `open` returns.
    pub fn create_open(
        &self,
        parent: u64,
        name: &CStr,
        mode: u32,
        flags: i32,
        who: Creator,
    ) -> Result<(Arc<Node>, Attr, Opened)> {
        let _s = self.stable();
        // A new file is empty and in the upper: nothing to truncate or copy up.
        let flags = flags & !libc::O_TRUNC;
        let oflags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
        let (node, st, fd) = self.make_entry(
            parent,
            name,
            super::dir::NewKind::File { mode },
            who,
            Some(oflags),
        )?;
        let fd = match fd {
            Some(fd) => fd,
            None => match self.open_handle_fd(&node, oflags) {
                Ok((fd, _)) => fd,
                Err(e) => {
                    // The file stays, as with kernel overlayfs; the kernel has no entry.
                    self.forget(node.ino, 1);
                    return Err(e);
                }
            },
        };
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let opened = self.add_open(node.clone(), flags, fd, false, writes);
        Ok((node, st, opened))
    }

    fn add_open(
        &self,
        node: Arc<Node>,
        flags: i32,
        fd: OwnedFd,
        partial: bool,
        writes: bool,
    ) -> Opened {
        let fd = Arc::new(fd);
        let regular = node.fmt == libc::S_IFREG;
        let mode = node.start_io(writes, self.cfg.passthrough && regular && !partial);
        let fh = self.add_handle(Handle {
            partial: partial.into(),
            chain: Mutex::new(None),
            ra: Default::default(),
            generation: node.generation.load(Ordering::Acquire).into(),
            epoch: self.epoch().into(),
            node,
            file: RwLock::new(fd.clone()),
            flags,
            io: Mutex::new(mode),
            entries: Mutex::new(None),
        });
        (fh, mode, fd)
    }

    /// Flags to reopen a handle's file with: as opened, minus one-time effects.
    fn reopen_flags(flags: i32) -> i32 {
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_NOFOLLOW)
    }

    /// The kernel refused a passthrough backing: serve this handle through the daemon.
    pub fn passthrough_refused(&self, fh: u64) -> Result<IoMode> {
        let h = self.handle(fh)?;
        let mut m = h.io.lock();
        h.node.end_io(*m);
        *m = h.node.start_io(true, false);
        Ok(*m)
    }

    fn open_object(&self, node: &Node, oflags: i32) -> Result<OwnedFd> {
        let (d, n) = self.locate(node)?;
        sys::openat(d.as_fd(), &n, oflags, 0)
    }

    /// Opens the fd of a handle, and tells whether it is a partial file. A partial file is
    /// never opened O_APPEND (its end is the map's logical size, which the daemon applies)
    /// nor write-only.
    fn open_handle_fd(&self, node: &Node, oflags: i32) -> Result<(OwnedFd, bool)> {
        let fd = self.open_object(node, oflags)?;
        if node.fmt != libc::S_IFREG || !self.partial_enabled() || !self.is_partial(fd.as_fd())? {
            return Ok((fd, false));
        }
        // Writes read back partly written blocks (CRCs), so a writer needs a readable fd.
        let acc = oflags & libc::O_ACCMODE;
        if oflags & libc::O_APPEND == 0 && acc != libc::O_WRONLY {
            return Ok((fd, true));
        }
        let acc = if acc == libc::O_RDONLY {
            acc
        } else {
            libc::O_RDWR
        };
        let flags = (oflags & !(libc::O_APPEND | libc::O_ACCMODE)) | acc;
        Ok((self.open_object(node, flags)?, true))
    }

    fn set_handle_fd(h: &Handle, (fd, partial): (OwnedFd, bool)) {
        // The old fd and chain may be the last of a file a squash removed: closed elsewhere.
        sys::drop_later(h.chain.lock().take());
        sys::drop_later(std::mem::replace(&mut *h.file.write(), Arc::new(fd)));
        h.partial.store(partial, Ordering::Release);
    }

    /// The fd to read through. A handle opened on a lower file follows the file to the upper
    /// once it is copied up, as kernel overlayfs does.
    pub(super) fn read_fd(&self, h: &Handle) -> Result<Arc<OwnedFd>> {
        self.refresh(&h.node);
        let generation = h.node.generation.load(Ordering::Acquire);
        if h.generation.load(Ordering::Acquire) != generation
            && let Ok(opened) = self.open_handle_fd(&h.node, Self::reopen_flags(h.flags))
        {
            Self::set_handle_fd(h, opened);
            h.generation.store(generation, Ordering::Release);
        }
        Ok(h.fd())
    }

    /// The fd to write through: never a file of a frozen layer.
    fn write_fd(&self, h: &Handle) -> Result<Arc<OwnedFd>> {
        let epoch = self.epoch();
        if h.epoch.load(Ordering::Acquire) != epoch && h.node.path().is_none() {
            // Open but unlinked: the file is in no layer, so writing it cannot change a
            // frozen one. Keep writing where it is.
            h.epoch.store(epoch, Ordering::Release);
            return Ok(h.fd());
        }
        if h.epoch.load(Ordering::Acquire) != epoch {
            self.refresh(&h.node);
            self.copy_up(&h.node, true)?;
            Self::set_handle_fd(
                h,
                self.open_handle_fd(&h.node, Self::reopen_flags(h.flags))?,
            );
            h.generation
                .store(h.node.generation.load(Ordering::Acquire), Ordering::Release);
            h.epoch.store(epoch, Ordering::Release);
        }
        self.read_fd(h)
    }

    pub fn read(&self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let n = self.read_into(fh, off, size, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads into `buf` (grown to `size` if shorter; a caller that keeps it across reads
    /// saves zeroing a new buffer each time). Returns the bytes read, short at end of file.
    pub fn read_into(&self, fh: u64, off: u64, size: u32, buf: &mut Vec<u8>) -> Result<usize> {
        let _s = self.stable();
        let h = self.handle(fh)?;
        let fd = self.read_fd(&h)?;
        if buf.len() < size as usize {
            buf.resize(size as usize, 0);
        }
        let buf = &mut buf[..size as usize];
        if h.partial.load(Ordering::Acquire) {
            return self.read_partial(&h.node, fd.as_fd(), &h.chain, &h.ra, off, buf);
        }
        sys::pread_full(fd.as_fd(), buf, off)
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> Result<u32> {
        let _s = self.stable();
        let h = self.handle(fh)?;
        let fd = self.write_fd(&h)?;
        if h.partial.load(Ordering::Acquire)
            && let Some(mut g) = self.live_partial(&h.node, fd.as_fd())?
            && let Some(ps) = g.as_mut()
        {
            let append = h.flags & libc::O_APPEND != 0;
            let at = self.write_partial(ps, fd.as_fd(), off, append, data)?;
            drop(g);
            self.mark_dirty(h.node.ino, at, data.len() as u64);
            return Ok(data.len() as u32);
        }
        let mut done = 0;
        while done < data.len() {
            match sys::pwrite(fd.as_fd(), &data[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::EINTR) => continue,
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        // O_APPEND writes land at the end whatever the offset says.
        let at = if h.flags & libc::O_APPEND != 0 {
            sys::fstat(fd.as_fd())?.st_size as u64 - done as u64
        } else {
            off
        };
        self.mark_dirty(h.node.ino, at, done as u64);
        Ok(done as u32)
    }

    /// FUSE copy_file_range: up to `len` bytes of handle `fh_in` at `off_in` to `fh_out` at
    /// `off_out`, copied by the kernel between the layers' files (no data through the
    /// daemon). EXDEV where that cannot be done here (a partial file of a volume, layers on
    /// filesystems that cannot copy between them): the kernel then copies with READ and WRITE.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u32> {
        let _s = self.stable();
        let (hi, ho) = (self.handle(fh_in)?, self.handle(fh_out)?);
        let fi = self.read_fd(&hi)?;
        let fo = self.write_fd(&ho)?;
        if hi.partial.load(Ordering::Acquire) || ho.partial.load(Ordering::Acquire) {
            return Err(Errno::EXDEV);
        }
        // The reply counts in 32 bits.
        let len = len.min(1 << 30) as usize;
        match sys::copy_file_range(fi.as_fd(), off_in, fo.as_fd(), off_out, len) {
            Ok(n) => {
                self.mark_dirty(ho.node.ino, off_out, n as u64);
                Ok(n as u32)
            }
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => Err(Errno::EXDEV),
            Err(e) => Err(e),
        }
    }

    fn mark_dirty(&self, ino: u64, off: u64, len: u64) {
        if len > 0 {
            let r = crate::volume::extents::blocks_of_bytes(off, len, self.cfg.block_size);
            self.dirty.entry(ino).or_default().insert(r);
        }
    }

    /// A truncate drops the blocks past the end and changes the (new) last block.
    fn mark_truncated(&self, ino: u64, size: u64) {
        let bs = self.cfg.block_size;
        let mut e = self.dirty.entry(ino).or_default();
        e.truncate(size.div_ceil(bs));
        if !size.is_multiple_of(bs) {
            e.insert_block(size / bs);
        }
    }

    /// Dirty bytes and files of the current epoch.
    pub fn dirty_stats(&self) -> (u64, u64) {
        let bs = self.cfg.block_size;
        let bytes = self.dirty.iter().map(|e| e.len_bytes(bs)).sum();
        (bytes, self.dirty.len() as u64)
    }

    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    pub fn release(&self, fh: u64) {
        if let Some((_, h)) = self.handles.remove(&fh) {
            h.node.end_io(*h.io.lock());
            if h.partial.load(Ordering::Acquire)
                && let Err(e) = self.store_partial(&h.node)
            {
                tracing::error!("storing the block map of inode {}: {e}", h.node.ino);
            }
            // No lock lives on the fd: the kernel keeps file locks. The last descriptor of a
            // removed file goes to the closer thread (see `sys::drop_later`); any other closes
            // here, at once: a handover per release cost a thread wakeup per closed file
            // (daemon CPU for reading every file of a 4290-file tree: 0.80-0.83 s with the
            // handover, 0.64-0.65 s without).
            // A directory's fd frees no data.
            if !h.node.is_dir() && h.may_free_data() {
                sys::drop_later(h);
            } else {
                drop(h);
            }
        }
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        // A write to a new upper is durable only once the snapshot that made it is.
        self.wait_commit()?;
        let h = self.handle(fh)?;
        if h.partial.load(Ordering::Acquire) {
            // The map must be durable with the data it describes.
            self.store_partial(&h.node)?;
        }
        if !self.cfg.fsync {
            return Ok(());
        }
        match sys::fsync(h.fd().as_fd(), datasync) {
            // Directories and read-only lower files: nothing of ours to flush.
            Err(Errno::EBADF | Errno::EINVAL | Errno::EROFS) => Ok(()),
            r => r,
        }
    }

    pub fn fallocate(&self, fh: u64, mode: i32, off: u64, len: u64) -> Result<()> {
        let _s = self.stable();
        let h = self.handle(fh)?;
        let fd = self.write_fd(&h)?;
        if h.partial.load(Ordering::Acquire)
            && let Some(mut g) = self.live_partial(&h.node, fd.as_fd())?
            && let Some(ps) = g.as_mut()
        {
            // In a partial file, bytes that become zeros must be recorded as written zeros
            // (a hole would show the layer below).
            let size = ps.map.size();
            let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
            let end = off.saturating_add(len);
            let zero = match mode & !libc::FALLOC_FL_KEEP_SIZE {
                0 if keep || end <= size => None,
                0 => Some(size..end),
                libc::FALLOC_FL_PUNCH_HOLE if keep => Some(off..end.min(size)),
                libc::FALLOC_FL_ZERO_RANGE if keep => Some(off..end.min(size)),
                libc::FALLOC_FL_ZERO_RANGE => Some(off..end),
                _ => return Err(Errno::EOPNOTSUPP),
            };
            if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 {
                sys::fallocate(fd.as_fd(), mode, off, len)?;
            }
            if let Some(r) = zero {
                let chunk = vec![0u8; 1 << 20];
                let mut at = r.start;
                while at < r.end {
                    let n = (r.end - at).min(chunk.len() as u64) as usize;
                    self.write_partial(ps, fd.as_fd(), at, false, &chunk[..n])?;
                    at += n as u64;
                }
            }
            drop(g);
            self.mark_dirty(h.node.ino, off, len);
            return Ok(());
        }
        sys::fallocate(fd.as_fd(), mode, off, len)?;
        self.mark_dirty(h.node.ino, off, len);
        Ok(())
    }

    pub fn lseek(&self, fh: u64, off: i64, whence: i32) -> Result<i64> {
        let _s = self.stable();
        let h = self.handle(fh)?;
        let fd = self.read_fd(&h)?;
        if h.partial.load(Ordering::Acquire) && matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE)
        {
            // The holes of a partial file are data below: report it as all data.
            let size = sys::fstat(fd.as_fd())?.st_size;
            return match (whence, off < size) {
                (_, false) => Err(Errno::ENXIO),
                (libc::SEEK_DATA, true) => Ok(off.max(0)),
                _ => Ok(size),
            };
        }
        sys::lseek(fd.as_fd(), off, whence)
    }

    pub fn setattr(&self, ino: u64, fh: Option<u64>, a: SetAttr) -> Result<Attr> {
        let _s = self.stable();
        let node = self.node(ino)?;
        if self.read_only() {
            return Err(Errno::EROFS);
        }
        let a = SetAttr {
            uid: a.uid.map(|u| self.cfg.uid_map.to_layer(u)),
            gid: a.gid.map(|g| self.cfg.gid_map.to_layer(g)),
            ..a
        };
        let handle = fh.and_then(|fh| self.handles.get(&fh).map(|h| h.clone()));
        if node.path().is_none() && handle.is_some() {
            // Open but unlinked: in no layer any more; change the open file itself.
            return self.setattr_unlinked(&node, handle, a);
        }
        let truncating_to_zero = a.size == Some(0);
        self.copy_up(&node, !truncating_to_zero)?;
        if let Some(size) = a.size {
            if node.is_dir() {
                return Err(Errno::EISDIR);
            }
            self.mark_truncated(node.ino, size);
            let fd = match handle
                .as_ref()
                .filter(|h| h.flags & libc::O_ACCMODE != libc::O_RDONLY)
            {
                Some(h) => self.write_fd(h)?,
                // A partial file's map reads back the new last block: O_RDWR.
                None => Arc::new(self.open_object(&node, libc::O_RDWR)?),
            };
            match self.live_partial(&node, fd.as_fd())? {
                Some(mut g) if g.is_some() => {
                    let ps = g.as_mut().expect("checked");
                    ps.map.truncate_file(fd.as_fd(), size)?;
                    ps.dirty = true;
                }
                _ => sys::ftruncate(fd.as_fd(), size)?,
            }
        }
        if a.uid.is_some()
            || a.gid.is_some()
            || a.mode.is_some()
            || !matches!((a.atime, a.mtime), (SetTime::Omit, SetTime::Omit))
        {
            let (d, n) = match self.locate(&node) {
                Ok(x) => x,
                Err(Errno::ENOENT) => return self.setattr_unlinked(&node, handle, a),
                Err(e) => return Err(e),
            };
            if a.uid.is_some() || a.gid.is_some() {
                sys::fchownat(
                    d.as_fd(),
                    &n,
                    a.uid.unwrap_or(u32::MAX),
                    a.gid.unwrap_or(u32::MAX),
                )?;
            }
            if let Some(mode) = a.mode {
                if node.fmt == libc::S_IFLNK {
                    return Err(Errno::EOPNOTSUPP);
                }
                sys::fchmodat(d.as_fd(), &n, mode)?;
            }
            if !matches!((a.atime, a.mtime), (SetTime::Omit, SetTime::Omit)) {
                sys::utimensat(d.as_fd(), &n, &[a.atime.timespec(), a.mtime.timespec()])?;
            }
        } else if a.only_ctime() {
            // Nothing else to change: what the kernel does for `chown(f, -1, -1)` on the
            // upper (after the copy-up above), which moves ctime like on any filesystem.
            let (d, n) = self.locate(&node)?;
            sys::fchownat(d.as_fd(), &n, u32::MAX, u32::MAX)?;
        }
        self.getattr(ino, fh)
    }

    /// Clears set-ID bits of a regular file as the kernel does when `caller` writes to it,
    /// truncates it or changes its owner: set-user-ID always; set-group-ID when group
    /// execute is set (without it the bit marks mandatory locking, not a privilege) or when
    /// a caller without CAP_FSETID is not in the file's group. The kernel leaves this to the
    /// filesystem with FUSE_HANDLE_KILLPRIV_V2; the daemon itself keeps the bits when it
    /// writes (it has CAP_FSETID).
    pub fn clear_set_id(&self, ino: u64, fh: Option<u64>, caller: &Caller) -> Result<()> {
        let st = self.getattr(ino, fh)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(());
        }
        let mut mode = st.st_mode & 0o7777;
        mode &= !libc::S_ISUID;
        if mode & libc::S_ISGID != 0
            && (mode & libc::S_IXGRP != 0 || !(caller.fsetid || caller.in_group(st.st_gid)))
        {
            mode &= !libc::S_ISGID;
        }
        if mode == st.st_mode & 0o7777 {
            return Ok(());
        }
        let a = SetAttr {
            mode: Some(mode),
            uid: None,
            gid: None,
            size: None,
            atime: SetTime::Omit,
            mtime: SetTime::Omit,
        };
        self.setattr(ino, fh, a).map(drop)
    }

    /// setattr on an open file whose names are all gone: act on the open fd.
    fn setattr_unlinked(
        &self,
        node: &Node,
        handle: Option<Arc<Handle>>,
        a: SetAttr,
    ) -> Result<Attr> {
        let fd = match handle {
            Some(h) => h.fd(),
            None => self.any_handle_fd(node).ok_or(Errno::ENOENT)?,
        };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&*fd);
        if let Some(size) = a.size {
            sys::ftruncate(fd.as_fd(), size)?;
        }
        if a.uid.is_some() || a.gid.is_some() || a.only_ctime() {
            let r =
                unsafe { libc::fchown(raw, a.uid.unwrap_or(u32::MAX), a.gid.unwrap_or(u32::MAX)) };
            if r < 0 {
                return Err(Errno::last());
            }
        }
        if let Some(mode) = a.mode
            && unsafe { libc::fchmod(raw, mode & 0o7777) } < 0
        {
            return Err(Errno::last());
        }
        if !matches!((a.atime, a.mtime), (SetTime::Omit, SetTime::Omit)) {
            let ts = [a.atime.timespec(), a.mtime.timespec()];
            if unsafe { libc::futimens(raw, ts.as_ptr()) } < 0 {
                return Err(Errno::last());
            }
        }
        Ok(self.finish_attr(node, sys::fstat(fd.as_fd())?))
    }

    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let _s = self.stable();
        let node = self.node(ino)?;
        if !node.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let fd = self.open_object(&node, libc::O_PATH | libc::O_DIRECTORY)?;
        Ok(self.add_handle(Handle {
            node,
            file: RwLock::new(Arc::new(fd)),
            generation: 0.into(),
            epoch: self.epoch().into(),
            partial: false.into(),
            chain: Mutex::new(None),
            ra: Default::default(),
            flags: libc::O_RDONLY,
            io: Mutex::new(IoMode::Direct),
            entries: Mutex::new(None),
        }))
    }

    /// The merged listing of an open directory, taken at offset 0 and kept for the handle's
    /// later calls so that offsets stay consistent while the directory changes.
    pub fn dir_entries(
        &self,
        fh: u64,
        offset: u64,
    ) -> Result<(
        Arc<Node>,
        Arc<Vec<super::dir::DirEntry>>,
        super::dir::Resolved,
    )> {
        let _s = self.stable();
        let h = self.handle(fh)?;
        let mut e = h.entries.lock();
        let mut resolved = super::dir::Resolved::default();
        if offset == 0 || e.is_none() {
            let (entries, r) = self.list_dir_resolved(&h.node)?;
            *e = Some(Arc::new(entries));
            resolved = r;
        }
        Ok((h.node.clone(), e.clone().expect("set above"), resolved))
    }

    /// Lookup of a readdirplus entry: counts one kernel reference like `lookup`. `resolved`:
    /// what the listing taken in the same request resolved.
    pub fn lookup_child(
        &self,
        dir: &Arc<Node>,
        name: &CStr,
        resolved: &mut super::dir::Resolved,
    ) -> Result<(Arc<Node>, Attr)> {
        let _s = self.stable();
        self.refresh(dir);
        let found = self.take_resolved(resolved, name);
        let (n, st, _) = self.lookup_found(dir, name, found)?;
        n.add_lookup(1);
        Ok((n, st))
    }

    pub fn getxattr(&self, ino: u64, key: &CStr) -> Result<Vec<u8>> {
        if is_layervol_key(key) {
            return Err(Errno::ENODATA);
        }
        let _s = self.stable();
        let node = self.node(ino)?;
        let (d, n) = self.locate(&node)?;
        match sys::getxattr(d.as_fd(), &n, &self.x.to_layer(key)) {
            // ACL entries name layer ids, which the mount shows mapped like owners.
            Ok(Some(v)) if acl::is_acl_key(key) && self.maps_ids() => Ok(acl::map_ids(
                &v,
                |u| self.cfg.uid_map.to_view(u),
                |g| self.cfg.gid_map.to_view(g),
            )
            .unwrap_or(v)),
            Ok(v) => v.ok_or(Errno::ENODATA),
            // The kernel checks permissions with the ACLs it gets here: a layer without ACLs
            // has none (as under kernel overlayfs), it must not fail the check.
            Err(Errno::EOPNOTSUPP) if acl::is_acl_key(key) => Err(Errno::ENODATA),
            Err(e) => Err(e),
        }
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let _s = self.stable();
        let node = self.node(ino)?;
        let (d, n) = self.locate(&node)?;
        let mut out = Vec::new();
        for k in sys::listxattr(d.as_fd(), &n)? {
            if let Some(k) = self.x.to_view(&k) {
                out.extend_from_slice(k.to_bytes_with_nul());
            }
        }
        Ok(out)
    }

    /// Sets xattr `key`; `acl_kill_sgid` (the access ACL, set by a caller outside the file's
    /// group without CAP_FSETID) first clears set-group-ID, which the upper's filesystem keeps
    /// for us, as kernel overlayfs does before it sets the ACL with the mounter's rights.
    pub fn setxattr(
        &self,
        ino: u64,
        key: &CStr,
        value: &[u8],
        flags: i32,
        acl_kill_sgid: bool,
    ) -> Result<()> {
        if is_layervol_key(key) {
            return Err(Errno::EPERM);
        }
        let key = &self.x.to_layer(key);
        let _s = self.stable();
        let node = self.node(ino)?;
        if self.read_only() {
            return Err(Errno::EROFS);
        }
        self.copy_up(&node, true)?;
        let (d, n) = self.locate(&node)?;
        let mapped;
        let value = if acl::is_acl_key(key) && self.maps_ids() {
            mapped = acl::map_ids(
                value,
                |u| self.cfg.uid_map.to_layer(u),
                |g| self.cfg.gid_map.to_layer(g),
            );
            mapped.as_deref().unwrap_or(value)
        } else {
            value
        };
        if acl_kill_sgid && key.as_c_str() == acl::ACCESS {
            let st = sys::fstatat(d.as_fd(), &n)?;
            if st.st_mode & libc::S_ISGID != 0 {
                sys::fchmodat(d.as_fd(), &n, st.st_mode & 0o7777 & !libc::S_ISGID)?;
            }
        }
        sys::setxattr(d.as_fd(), &n, key, value, flags)
    }

    pub fn removexattr(&self, ino: u64, key: &CStr) -> Result<()> {
        if is_layervol_key(key) {
            return Err(Errno::ENODATA);
        }
        let key = &self.x.to_layer(key);
        let _s = self.stable();
        let node = self.node(ino)?;
        if self.read_only() {
            return Err(Errno::EROFS);
        }
        // Removing an xattr that is not there must not copy the file up.
        let (d, n) = self.locate(&node)?;
        if sys::getxattr(d.as_fd(), &n, key)?.is_none() {
            return Err(Errno::ENODATA);
        }
        self.copy_up(&node, true)?;
        let (d, n) = self.locate(&node)?;
        sys::removexattr(d.as_fd(), &n, key)
    }
}

/// layervol's own xattrs (partial-file markers) are never visible or settable in the view.
fn is_layervol_key(key: &CStr) -> bool {
    let b = key.to_bytes();
    crate::volume::blockmap::PRIVATE_XATTR_PREFIXES
        .iter()
        .any(|p| b.starts_with(p.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::Creator;
    use crate::fs::ROOT_INO;
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    /// An inotify fd watching `path` for `mask`.
    fn watch(path: &std::path::Path, mask: u32) -> OwnedFd {
        // SAFETY: a plain syscall; its fd, checked, is owned from here on.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK) };
        assert!(
            raw >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a new fd nothing else owns.
        let ino = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = CString::new(path.as_os_str().as_bytes()).unwrap();
        assert!(
            // SAFETY: a valid inotify fd and a NUL-terminated path.
            unsafe { libc::inotify_add_watch(ino.as_raw_fd(), path.as_ptr(), mask) } >= 0
        );
        ino
    }

    /// Reads the pending inotify events of `fd` (non-blocking) and returns their masks.
    fn events(fd: &OwnedFd) -> Vec<u32> {
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a buffer of ours, of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let mut out = Vec::new();
        let mut at = 0;
        while n > 0 && at < n as usize {
            // SAFETY: the kernel wrote whole `inotify_event`s (plus their names) up to `n`.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            out.push(ev.mask);
            at += std::mem::size_of::<libc::inotify_event>() + ev.len as usize;
        }
        out
    }

    /// A released handle of a file that still has a name is closed before `release` returns
    /// (the closer thread is for the last descriptor of a removed file, whose close frees
    /// its data); one of a removed file is handed over. Needs root (overlay xattrs).
    #[test]
    fn a_release_closes_at_once_unless_the_file_was_removed() {
        let t = tempfile::tempdir().unwrap();
        let ov = crate::fs::test_overlay(t.path(), |_| {});
        let (_, _, (fh, _, fd)) = ov
            .create_open(ROOT_INO, c"a", 0o644, libc::O_RDWR, Creator::ROOT)
            .unwrap();
        drop(fd);
        let h = ov.handle(fh).unwrap();
        assert!(!h.may_free_data(), "a linked file");
        drop(h);
        let ino = watch(&t.path().join("upper/a"), libc::IN_CLOSE);
        ov.release(fh);
        assert!(
            events(&ino).iter().any(|m| m & libc::IN_CLOSE != 0),
            "release returned before the file was closed"
        );

        let (_, _, (fh, _, fd)) = ov
            .create_open(ROOT_INO, c"b", 0o644, libc::O_RDWR, Creator::ROOT)
            .unwrap();
        drop(fd);
        ov.unlink(ROOT_INO, c"b").unwrap();
        assert!(ov.handle(fh).unwrap().may_free_data(), "a removed file");
        ov.release(fh);
    }

    /// A FUSE create keeps the fd that made the file as the handle's, with the flags the
    /// kernel sends (O_LARGEFILE set): the file is opened once, and not closed. Needs root.
    #[test]
    fn create_open_opens_the_new_file_once() {
        let t = tempfile::tempdir().unwrap();
        let ov = crate::fs::test_overlay(t.path(), |_| {});
        let ino = watch(&t.path().join("upper"), libc::IN_OPEN | libc::IN_CLOSE);
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | crate::sys::O_LARGEFILE_KERNEL;
        let (_, _, (fh, _, fd)) = ov
            .create_open(ROOT_INO, c"new", 0o644, flags, Creator::ROOT)
            .unwrap();
        drop(fd);
        let ev = events(&ino);
        let opens = ev.iter().filter(|m| *m & libc::IN_OPEN != 0).count();
        let closes = ev.iter().filter(|m| *m & libc::IN_CLOSE != 0).count();
        assert_eq!((opens, closes), (1, 0), "inotify events {ev:x?}");
        ov.release(fh);
    }
}
