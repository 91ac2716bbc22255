//! Thin, errno-preserving wrappers over the libc calls the suite needs.
//!
//! Every wrapper returns `Result<_, Errno>` so that the exact errno of each call can be
//! recorded and compared between the two mounts. Nothing here follows symlinks unless the
//! name says so (`stat` follows, `lstat` and the `l*xattr` calls do not).

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub use nix::errno::Errno;

pub type SysResult<T> = Result<T, Errno>;

/// Converts a path to a C string. Paths in this suite never contain NUL bytes.
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path contains a NUL byte")
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("string contains a NUL byte")
}

/// Turns a `-1`-on-error return value into a `Result`.
fn check<T: Copy + PartialEq + From<i8>>(ret: T) -> SysResult<T> {
    if ret == T::from(-1) {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

pub fn lstat(p: &Path) -> SysResult<libc::stat> {
    let c = cpath(p);
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::lstat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn stat(p: &Path) -> SysResult<libc::stat> {
    let c = cpath(p);
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::stat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn fstat(fd: &OwnedFd) -> SysResult<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `open(2)`; `O_CLOEXEC` is always added so that daemons spawned by other test threads
/// never inherit (and pin) a file of another mount.
pub fn open(p: &Path, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    let c = cpath(p);
    let fd = check(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdir(p: &Path, mode: u32) -> SysResult<()> {
    let c = cpath(p);
    check(unsafe { libc::mkdir(c.as_ptr(), mode) }).map(drop)
}

pub fn rmdir(p: &Path) -> SysResult<()> {
    let c = cpath(p);
    check(unsafe { libc::rmdir(c.as_ptr()) }).map(drop)
}

pub fn unlink(p: &Path) -> SysResult<()> {
    let c = cpath(p);
    check(unsafe { libc::unlink(c.as_ptr()) }).map(drop)
}

pub fn symlink(target: &str, link: &Path) -> SysResult<()> {
    let t = cstr(target);
    let l = cpath(link);
    check(unsafe { libc::symlink(t.as_ptr(), l.as_ptr()) }).map(drop)
}

pub fn link(old: &Path, new: &Path) -> SysResult<()> {
    let o = cpath(old);
    let n = cpath(new);
    check(unsafe { libc::link(o.as_ptr(), n.as_ptr()) }).map(drop)
}

pub fn renameat2(old: &Path, new: &Path, flags: u32) -> SysResult<()> {
    let o = cpath(old);
    let n = cpath(new);
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            o.as_ptr(),
            libc::AT_FDCWD,
            n.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn mknod(p: &Path, mode: u32, dev: libc::dev_t) -> SysResult<()> {
    let c = cpath(p);
    check(unsafe { libc::mknod(c.as_ptr(), mode, dev) }).map(drop)
}

pub fn readlink(p: &Path) -> SysResult<Vec<u8>> {
    let c = cpath(p);
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = check(unsafe { libc::readlink(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn chmod(p: &Path, mode: u32) -> SysResult<()> {
    let c = cpath(p);
    check(unsafe { libc::chmod(c.as_ptr(), mode) }).map(drop)
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> SysResult<()> {
    let c = cpath(p);
    check(unsafe { libc::lchown(c.as_ptr(), uid, gid) }).map(drop)
}

pub fn truncate(p: &Path, len: u64) -> SysResult<()> {
    let c = cpath(p);
    check(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) }).map(drop)
}

pub fn access(p: &Path, mode: i32) -> SysResult<()> {
    let c = cpath(p);
    check(unsafe { libc::access(c.as_ptr(), mode) }).map(drop)
}

/// `utimensat(2)` with `AT_SYMLINK_NOFOLLOW`; times are `(seconds, nanoseconds)`.
pub fn lutimens(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> SysResult<()> {
    let c = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn statfs(p: &Path) -> SysResult<libc::statfs> {
    let c = cpath(p);
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statfs(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> SysResult<()> {
    let c = cpath(p);
    let n = cstr(name);
    check(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn lgetxattr(p: &Path, name: &str) -> SysResult<Vec<u8>> {
    let c = cpath(p);
    let n = cstr(name);
    let mut buf = vec![0u8; 65536];
    let len = check(unsafe {
        libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(len as usize);
    Ok(buf)
}

pub fn lremovexattr(p: &Path, name: &str) -> SysResult<()> {
    let c = cpath(p);
    let n = cstr(name);
    check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }).map(drop)
}

/// `llistxattr(2)`, names sorted.
pub fn llistxattr(p: &Path) -> SysResult<Vec<String>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 65536];
    let len = check(unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(len as usize);
    let mut names: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// One raw directory entry as returned by `getdents`.
#[derive(Clone, Debug)]
pub struct RawDirent {
    pub name: Vec<u8>,
    pub d_type: u8,
    pub d_ino: u64,
}

/// Reads a whole directory with `opendir`/`readdir` (so `d_type` and `d_ino` are the ones the
/// filesystem returned, not values recomputed by a `stat`).
pub fn read_dir(p: &Path) -> SysResult<Vec<RawDirent>> {
    let c = cpath(p);
    let dir = unsafe { libc::opendir(c.as_ptr()) };
    if dir.is_null() {
        return Err(Errno::last());
    }
    let mut out = Vec::new();
    let result = loop {
        Errno::clear();
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let e = Errno::last();
            break if e as i32 == 0 { Ok(()) } else { Err(e) };
        }
        let ent = unsafe { &*ent };
        let name = unsafe { CStr::from_ptr(ent.d_name.as_ptr()) };
        out.push(RawDirent {
            name: name.to_bytes().to_vec(),
            d_type: ent.d_type,
            d_ino: ent.d_ino,
        });
    };
    unsafe { libc::closedir(dir) };
    result.map(|()| out)
}

pub fn pread(fd: &OwnedFd, off: u64, len: usize) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0usize;
    while done < len {
        let n = check(unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    buf.truncate(done);
    Ok(buf)
}

pub fn copy_file_range(
    fin: &OwnedFd,
    off_in: u64,
    fout: &OwnedFd,
    off_out: u64,
    len: usize,
) -> SysResult<usize> {
    let mut off_in = off_in as libc::loff_t;
    let mut off_out = off_out as libc::loff_t;
    // SAFETY: plain syscall on valid fds and offsets that live across the call.
    let n = check(unsafe {
        libc::copy_file_range(
            fin.as_raw_fd(),
            &mut off_in,
            fout.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    })?;
    Ok(n as usize)
}

pub fn pwrite(fd: &OwnedFd, off: u64, data: &[u8]) -> SysResult<usize> {
    let mut done = 0usize;
    while done < data.len() {
        let n = check(unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
                (off + done as u64) as libc::off_t,
            )
        })?;
        done += n as usize;
    }
    Ok(done)
}

/// `write(2)` at the current file offset (honours `O_APPEND`).
pub fn write_all(fd: &OwnedFd, data: &[u8]) -> SysResult<usize> {
    let mut done = 0usize;
    while done < data.len() {
        let n = check(unsafe {
            libc::write(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
            )
        })?;
        done += n as usize;
    }
    Ok(done)
}

/// Reads from the current offset until EOF.
pub fn read_to_end(fd: &OwnedFd) -> SysResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = check(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

pub fn ftruncate(fd: &OwnedFd, len: u64) -> SysResult<()> {
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

pub fn fallocate(fd: &OwnedFd, mode: i32, off: u64, len: u64) -> SysResult<()> {
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
        .map(drop)
}

pub fn fsync(fd: &OwnedFd) -> SysResult<()> {
    check(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

pub fn fdatasync(fd: &OwnedFd) -> SysResult<()> {
    check(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
}

pub fn fchmod(fd: &OwnedFd, mode: u32) -> SysResult<()> {
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub fn flock(fd: &OwnedFd, op: i32) -> SysResult<()> {
    check(unsafe { libc::flock(fd.as_raw_fd(), op) }).map(drop)
}

/// Builds a `struct flock` for an open-file-description lock request.
fn flock_struct(kind: i16, start: u64, len: u64) -> libc::flock {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    fl
}

/// `fcntl(F_OFD_SETLK)`: OFD locks conflict between two opens of the same process, so a
/// single-threaded scenario can observe lock conflicts.
pub fn ofd_setlk(fd: &OwnedFd, kind: i16, start: u64, len: u64) -> SysResult<()> {
    let fl = flock_struct(kind, start, len);
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) }).map(drop)
}

/// `fcntl(F_OFD_GETLK)`: returns the type of the conflicting lock (`F_UNLCK` if none) and
/// its range.
pub fn ofd_getlk(fd: &OwnedFd, kind: i16, start: u64, len: u64) -> SysResult<(i16, i64, i64)> {
    let mut fl = flock_struct(kind, start, len);
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) })?;
    Ok((fl.l_type, fl.l_start, fl.l_len))
}

/// Maps `len` bytes at `off` shared and read-only, copies them out, unmaps.
pub fn mmap_read(fd: &OwnedFd, off: u64, len: usize) -> SysResult<Vec<u8>> {
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    let data = unsafe { std::slice::from_raw_parts(p as *const u8, len) }.to_vec();
    unsafe { libc::munmap(p, len) };
    Ok(data)
}

/// Maps the range shared read-write, stores `data`, `msync(MS_SYNC)`s and unmaps.
/// `off` must be page aligned and the range must lie inside the file.
pub fn mmap_write(fd: &OwnedFd, off: u64, data: &[u8]) -> SysResult<()> {
    let len = data.len();
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p as *mut u8, len) };
    let r = check(unsafe { libc::msync(p, len, libc::MS_SYNC) });
    unsafe { libc::munmap(p, len) };
    r.map(drop)
}

/// `mount(2)` of a kernel overlay (or any fs) with a data string.
pub fn mount(source: &str, target: &Path, fstype: &str, flags: u64, data: &str) -> SysResult<()> {
    let s = cstr(source);
    let t = cpath(target);
    let f = cstr(fstype);
    let d = cstr(data);
    check(unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            flags as libc::c_ulong,
            d.as_ptr().cast(),
        )
    })
    .map(drop)
}

pub fn umount2(target: &Path, flags: i32) -> SysResult<()> {
    let t = cpath(target);
    check(unsafe { libc::umount2(t.as_ptr(), flags) }).map(drop)
}

pub fn geteuid() -> u32 {
    unsafe { libc::geteuid() }
}

pub fn set_umask(mask: u32) {
    unsafe { libc::umask(mask) };
}

pub fn major(dev: u64) -> u32 {
    libc::major(dev)
}

pub fn minor(dev: u64) -> u32 {
    libc::minor(dev)
}

pub fn makedev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor)
}

/// This thread's filesystem uid and gid switched to a user's until dropped. Going from fsuid 0
/// to another drops the thread's filesystem capabilities (CAP_FSETID, CAP_DAC_OVERRIDE, ...)
/// and going back restores them; other threads keep their credentials.
pub struct FsCreds(());

impl FsCreds {
    pub fn switch(uid: u32, gid: u32) -> FsCreds {
        // Group first: once the fsuid is not 0 the thread may no longer pick any group.
        unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
        }
        assert_eq!(
            unsafe { libc::setfsuid(u32::MAX) },
            uid as i32,
            "setfsuid({uid})"
        );
        FsCreds(())
    }
}

impl Drop for FsCreds {
    fn drop(&mut self) {
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
        }
    }
}
