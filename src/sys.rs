//! Thin, safe wrappers over the `*at` system calls the engine needs.
//!
//! Every call takes a directory fd plus a single name (never a path with `/`), and never follows
//! a symlink in the last component. Directories are reached with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_SYMLINKS)` from a layer root (see `layer::Layer::dir`), so no operation can escape
//! a layer through a symlink, even one planted concurrently.
//!
//! Extended attributes have no `*at` form; they go through `/proc/self/fd/<dirfd>/<name>` with
//! the `l*xattr` calls, which resolves the directory through the (safe) fd and does not follow
//! the last component.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

pub use nix::errno::Errno;

pub type Result<T> = std::result::Result<T, Errno>;
pub type Stat = libc::stat;

fn check(ret: libc::c_int) -> Result<libc::c_int> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn check_size(ret: libc::ssize_t) -> Result<usize> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret as usize)
    }
}

/// A name as the kernel wants it: no NUL inside. A name containing NUL cannot come from the
/// kernel, so this only fails on corrupt input.
pub fn cname(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

pub fn dot() -> &'static CStr {
    c"."
}

pub fn fstatat(dir: BorrowedFd, name: &CStr) -> Result<Stat> {
    let mut st = std::mem::MaybeUninit::<Stat>::uninit();
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

/// The device of the filesystem at `path`, from cached attributes (`AT_STATX_DONT_SYNC`):
/// never a request to a FUSE server. A daemon asking about its own mount must not: while
/// the request waits (the daemon stopped, or not serving yet) the lookup holds the mount
/// busy, and `umount` fails.
pub fn dev_no_sync(path: &std::path::Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    check(unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            0,
            &mut stx,
        )
    })?;
    Ok(libc::makedev(stx.stx_dev_major, stx.stx_dev_minor))
}

/// The supplementary groups of thread `tid` (from /proc: `Groups:` of its status).
pub fn supplementary_groups(tid: u32) -> Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .ok_or(Errno::EIO)?;
    Ok(line
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect())
}

/// O_LARGEFILE as the kernel sets it in every open's flags on 64-bit architectures (and so in
/// the flags of FUSE CREATE and OPEN requests); the libc crate defines O_LARGEFILE as 0 there.
#[cfg(target_arch = "aarch64")]
pub const O_LARGEFILE_KERNEL: i32 = 0o400000;
#[cfg(not(target_arch = "aarch64"))]
pub const O_LARGEFILE_KERNEL: i32 = 0o100000;

/// The read-ahead, in KiB, of the block device `dev` (a whole disk, or a partition: its
/// disk's), from sysfs; None for filesystems without one (tmpfs, ...).
pub fn device_read_ahead_kb(dev: u64) -> Option<u64> {
    let (ma, mi) = (libc::major(dev), libc::minor(dev));
    [
        format!("/sys/class/bdi/{ma}:{mi}/read_ahead_kb"),
        format!("/sys/dev/block/{ma}:{mi}/../queue/read_ahead_kb"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
}

/// "MAJOR:MINOR" of the FUSE filesystem mounted last on `mnt`, from /proc/self/mountinfo:
/// no request to a FUSE server (see `dev_no_sync`).
pub fn fuse_mount_device(mnt: &std::path::Path) -> Option<String> {
    fuse_mount_device_in(&std::fs::read_to_string("/proc/self/mountinfo").ok()?, mnt)
}

fn fuse_mount_device_in(mountinfo: &str, mnt: &std::path::Path) -> Option<String> {
    // mountinfo escapes space, tab, newline and backslash as octal.
    let mut want = String::new();
    for c in mnt.to_str()?.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => want.push_str(&format!("\\{:03o}", c as u32)),
            c => want.push(c),
        }
    }
    mountinfo
        .lines()
        // The last mount on that point is the one on top.
        .rev()
        .find_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            let f: Vec<&str> = mount.split(' ').collect();
            let dev = f.get(2).copied();
            (f.get(4) == Some(&want.as_str()) && fs.starts_with("fuse")).then_some(dev)?
        })
        .map(|d| d.to_string())
}

/// `open_tree(2)`: an fd of the mount at `path` (relative to `dir`), or with
/// `OPEN_TREE_CLONE` a detached clone of it rooted there.
pub fn open_tree(dir: RawFd, path: &CStr, flags: libc::c_uint) -> Result<OwnedFd> {
    // SAFETY: plain syscall with a NUL-terminated path.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, dir, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub fn fstat(fd: BorrowedFd) -> Result<Stat> {
    let mut st = std::mem::MaybeUninit::<Stat>::uninit();
    check(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

/// `openat` relative to `dir`, never following a symlink in the last component.
pub fn openat(dir: BorrowedFd, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the directory `rel` (relative, `/`-separated, may be empty, never `..`) below
/// `root`, treating `root` as `/` and refusing every symlink on the way.
///
/// A tree below a layer root can be deeper than the kernel takes in one path (`PATH_MAX`
/// bytes with the terminating NUL; a mount's user reaches such a directory through a working
/// directory or a directory fd): such a path is resolved a run of whole components at a
/// time, each from the directory the previous run reached, with the same refusals.
pub fn open_dir_in_root(root: BorrowedFd, rel: &CStr) -> Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    const MAX: usize = libc::PATH_MAX as usize - 1;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    if rel.is_empty() {
        return openat2(root, dot(), how);
    }
    if rel.count_bytes() <= MAX {
        return openat2(root, rel, how);
    }
    let mut dir: Option<OwnedFd> = None;
    let mut rest = rel.to_bytes();
    while !rest.is_empty() {
        let cut = if rest.len() <= MAX {
            rest.len()
        } else {
            match rest[..=MAX].iter().rposition(|&b| b == b'/') {
                Some(i) if i > 0 => i,
                _ => return Err(Errno::ENAMETOOLONG),
            }
        };
        let run = CString::new(&rest[..cut]).map_err(|_| Errno::EINVAL)?;
        let from = dir.as_ref().map_or(root, |d| d.as_fd());
        dir = Some(openat2(from, run.as_c_str(), how)?);
        rest = rest[cut..].strip_prefix(b"/").unwrap_or(&rest[cut..]);
    }
    dir.ok_or(Errno::EINVAL)
}

pub fn mkdirat(dir: BorrowedFd, name: &CStr, mode: u32) -> Result<()> {
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd, name: &CStr) -> Result<()> {
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub fn linkat(odir: BorrowedFd, oname: &CStr, ndir: BorrowedFd, nname: &CStr) -> Result<()> {
    check(unsafe {
        libc::linkat(
            odir.as_raw_fd(),
            oname.as_ptr(),
            ndir.as_raw_fd(),
            nname.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd, name: &CStr, is_dir: bool) -> Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    odir: BorrowedFd,
    oname: &CStr,
    ndir: BorrowedFd,
    nname: &CStr,
    flags: u32,
) -> Result<()> {
    check(unsafe {
        libc::renameat2(
            odir.as_raw_fd(),
            oname.as_ptr(),
            ndir.as_raw_fd(),
            nname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn readlinkat(dir: BorrowedFd, name: &CStr) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = check_size(unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn fchownat(dir: BorrowedFd, name: &CStr, uid: u32, gid: u32) -> Result<()> {
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn fchown(fd: BorrowedFd, uid: u32, gid: u32) -> Result<()> {
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd, mode: u32) -> Result<()> {
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode & 0o7777) }).map(drop)
}

/// chmod never applies to symlinks (Linux has no lchmod); callers check the type first.
pub fn fchmodat(dir: BorrowedFd, name: &CStr, mode: u32) -> Result<()> {
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode & 0o7777, 0) }).map(drop)
}

pub fn utimensat(dir: BorrowedFd, name: &CStr, times: &[libc::timespec; 2]) -> Result<()> {
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn pread(fd: BorrowedFd, buf: &mut [u8], off: u64) -> Result<usize> {
    check_size(unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            off as libc::off_t,
        )
    })
}

pub fn pwrite(fd: BorrowedFd, buf: &[u8], off: u64) -> Result<usize> {
    check_size(unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            off as libc::off_t,
        )
    })
}

/// Reads until `buf` is full or EOF (a short read from a regular file only means EOF, but a
/// signal can interrupt a large read).
pub fn pread_full(fd: BorrowedFd, buf: &mut [u8], off: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match pread(fd, &mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `data` at `off` (retrying short writes and EINTR).
pub fn pwrite_all(fd: BorrowedFd, mut data: &[u8], mut off: u64) -> Result<()> {
    while !data.is_empty() {
        match pwrite(fd, data, off) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => {
                data = &data[n..];
                off += n as u64;
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn ftruncate(fd: BorrowedFd, len: u64) -> Result<()> {
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

pub fn fsync(fd: BorrowedFd, datasync: bool) -> Result<()> {
    let r = if datasync {
        unsafe { libc::fdatasync(fd.as_raw_fd()) }
    } else {
        unsafe { libc::fsync(fd.as_raw_fd()) }
    };
    check(r).map(drop)
}

pub fn syncfs(fd: BorrowedFd) -> Result<()> {
    check(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

pub fn fallocate(fd: BorrowedFd, mode: i32, off: u64, len: u64) -> Result<()> {
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
        .map(drop)
}

pub fn lseek(fd: BorrowedFd, off: i64, whence: i32) -> Result<i64> {
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

pub fn fstatvfs(fd: BorrowedFd) -> Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

/// One `copy_file_range` of up to `len` bytes from `src` at `off_in` to `dst` at `off_out`;
/// the bytes copied (0 at the end of `src`).
pub fn copy_file_range(
    src: BorrowedFd,
    off_in: u64,
    dst: BorrowedFd,
    off_out: u64,
    len: usize,
) -> Result<usize> {
    let mut off_in = off_in as libc::loff_t;
    let mut off_out = off_out as libc::loff_t;
    // SAFETY: plain syscall on valid fds and offsets that live across the call.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    };
    if n < 0 {
        return Err(Errno::last());
    }
    Ok(n as usize)
}

/// Copies `len` bytes from `src` to `dst` at the same offsets, in kernel space when it can.
pub fn copy_range(src: BorrowedFd, dst: BorrowedFd, len: u64) -> Result<()> {
    let mut off = 0;
    while off < len {
        let chunk = (len - off).min(1 << 30) as usize;
        match copy_file_range(src, off, dst, off, chunk) {
            Ok(0) => break, // source shrank: nothing more to copy
            Ok(n) => off += n as u64,
            Err(Errno::EINTR) => continue,
            Err(Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL) => {
                return copy_range_userspace(src, dst, off, len);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_range_userspace(src: BorrowedFd, dst: BorrowedFd, mut off: u64, len: u64) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while off < len {
        let want = ((len - off) as usize).min(buf.len());
        let n = pread_full(src, &mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            done += pwrite(dst, &buf[done..n], off + done as u64)?;
        }
        off += n as u64;
    }
    Ok(())
}

fn proc_path(dir: BorrowedFd, name: &CStr) -> CString {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    CString::new(p).expect("no NUL: built from a CStr")
}

/// The `*xattrat` system calls (Linux 6.13): xattrs of `dir/name` without building a
/// `/proc/self/fd` path, which costs a procfs walk per call. Older kernels answer ENOSYS
/// once; from then on the path form is used.
mod xattrat {
    use std::sync::atomic::{AtomicBool, Ordering};

    // The same numbers on every architecture (the unified syscall table).
    pub const SETXATTRAT: libc::c_long = 463;
    pub const GETXATTRAT: libc::c_long = 464;
    pub const LISTXATTRAT: libc::c_long = 465;
    pub const REMOVEXATTRAT: libc::c_long = 466;

    /// `struct xattr_args` of <linux/xattr.h>.
    #[repr(C)]
    pub struct Args {
        pub value: u64,
        pub size: u32,
        pub flags: u32,
    }

    /// `dir/name` without following a symlink; an empty name is `dir` itself.
    pub fn flags(name: &std::ffi::CStr) -> libc::c_int {
        if name.is_empty() {
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH
        } else {
            libc::AT_SYMLINK_NOFOLLOW
        }
    }

    static MISSING: AtomicBool = AtomicBool::new(false);

    /// Tests: behave as on a kernel without the calls.
    #[cfg(test)]
    pub fn pretend_missing(missing: bool) {
        MISSING.store(missing, Ordering::Relaxed);
    }

    /// Runs `call` unless the kernel lacks the calls; `None` means "use the path form".
    pub fn run(call: impl FnOnce() -> libc::c_long) -> Option<libc::c_long> {
        if MISSING.load(Ordering::Relaxed) {
            return None;
        }
        let r = call();
        if r < 0 && super::Errno::last() == super::Errno::ENOSYS {
            MISSING.store(true, Ordering::Relaxed);
            return None;
        }
        Some(r)
    }
}

/// Value of xattr `key` on `dir/name`, or `None` if it is not set. An empty name (the fd
/// itself) needs an fd that is not O_PATH; an O_PATH directory is `dir/.`.
pub fn getxattr(dir: BorrowedFd, name: &CStr, key: &CStr) -> Result<Option<Vec<u8>>> {
    let mut path = None;
    xattr_value(|buf| {
        let at = || unsafe {
            let mut args = xattrat::Args {
                value: buf.as_mut_ptr() as u64,
                size: buf.len() as u32,
                flags: 0,
            };
            libc::syscall(
                xattrat::GETXATTRAT,
                dir.as_raw_fd(),
                name.as_ptr(),
                xattrat::flags(name),
                key.as_ptr(),
                &mut args as *mut xattrat::Args,
                std::mem::size_of::<xattrat::Args>(),
            )
        };
        if let Some(r) = xattrat::run(at) {
            return r as libc::ssize_t;
        }
        let path = path.get_or_insert_with(|| proc_path(dir, name));
        unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                key.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    })
}

/// Runs a `*getxattr` call with a buffer that grows until the value fits; `None` if the
/// attribute is not set.
fn xattr_value(mut get: impl FnMut(&mut [u8]) -> libc::ssize_t) -> Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    loop {
        let n = get(&mut buf);
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        match Errno::last() {
            Errno::ENODATA => return Ok(None),
            Errno::ERANGE if buf.len() < (64 << 10) * 16 => {
                let len = buf.len() * 4;
                buf.resize(len, 0);
            }
            e => return Err(e),
        }
    }
}

pub fn setxattr(dir: BorrowedFd, name: &CStr, key: &CStr, value: &[u8], flags: i32) -> Result<()> {
    let at = || unsafe {
        let args = xattrat::Args {
            value: value.as_ptr() as u64,
            size: value.len() as u32,
            flags: flags as u32,
        };
        libc::syscall(
            xattrat::SETXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            xattrat::flags(name),
            key.as_ptr(),
            &args as *const xattrat::Args,
            std::mem::size_of::<xattrat::Args>(),
        )
    };
    if let Some(r) = xattrat::run(at) {
        return check(r as libc::c_int).map(drop);
    }
    let path = proc_path(dir, name);
    check(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(dir: BorrowedFd, name: &CStr, key: &CStr) -> Result<()> {
    let at = || unsafe {
        libc::syscall(
            xattrat::REMOVEXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            xattrat::flags(name),
            key.as_ptr(),
        )
    };
    if let Some(r) = xattrat::run(at) {
        return check(r as libc::c_int).map(drop);
    }
    let path = proc_path(dir, name);
    check(unsafe { libc::lremovexattr(path.as_ptr(), key.as_ptr()) }).map(drop)
}

/// All xattr names of `dir/name`.
pub fn listxattr(dir: BorrowedFd, name: &CStr) -> Result<Vec<CString>> {
    let mut path = None;
    let mut list = |buf: &mut [u8]| -> libc::ssize_t {
        let at = || unsafe {
            libc::syscall(
                xattrat::LISTXATTRAT,
                dir.as_raw_fd(),
                name.as_ptr(),
                xattrat::flags(name),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if let Some(r) = xattrat::run(at) {
            return r as libc::ssize_t;
        }
        let path = path.get_or_insert_with(|| proc_path(dir, name));
        unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    };
    let mut buf = vec![0u8; 1024];
    let n = loop {
        let n = list(&mut buf);
        if n >= 0 {
            break n as usize;
        }
        match Errno::last() {
            Errno::ERANGE => {
                let need = list(&mut []);
                buf.resize(check_size(need)?.max(buf.len() * 2), 0);
            }
            Errno::ENOTSUP => return Ok(Vec::new()),
            e => return Err(e),
        }
    };
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| CString::new(s).expect("split at NUL"))
        .collect())
}

/// Reads a whole directory (by an O_PATH or regular fd of it) as (name, d_ino, d_type).
pub fn read_dir(dir: BorrowedFd) -> Result<Vec<(CString, u64, u8)>> {
    let fd = openat(dir, dot(), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let raw: RawFd = {
        use std::os::fd::IntoRawFd;
        fd.into_raw_fd()
    };
    let dp = unsafe { libc::fdopendir(raw) };
    if dp.is_null() {
        let e = Errno::last();
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut out = Vec::new();
    loop {
        Errno::clear();
        let ent = unsafe { libc::readdir64(dp) };
        if ent.is_null() {
            let e = Errno::last_raw();
            unsafe { libc::closedir(dp) };
            if e != 0 {
                return Err(Errno::from_raw(e));
            }
            return Ok(out);
        }
        let ent = unsafe { &*ent };
        let name = unsafe { CStr::from_ptr(ent.d_name.as_ptr()) };
        let b = name.to_bytes();
        if b == b"." || b == b".." {
            continue;
        }
        out.push((name.to_owned(), ent.d_ino, ent.d_type));
    }
}

pub fn is_whiteout(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

pub fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Value of xattr `key` of an open (non-O_PATH) file, or `None` if it is not set.
pub fn fgetxattr(fd: BorrowedFd, key: &CStr) -> Result<Option<Vec<u8>>> {
    xattr_value(|buf| unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            key.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

/// (atime, mtime) of a stat, as `utimensat` takes them: to give an object another's times.
pub fn times_of(st: &Stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

/// Drops `v` on a background thread. Closing the last descriptor of a removed file frees its
/// blocks in the closing thread, synchronously (seconds for a 1 GiB file on a filesystem
/// mounted with `discard`): code that must not stall, under the snapshot barrier or serving
/// a request, hands over what may hold the last descriptor of a file of a layer that a squash
/// removed.
pub fn drop_later<T: Send + 'static>(v: T) {
    type Doomed = Box<dyn Send>;
    static CLOSER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Doomed>>> =
        std::sync::OnceLock::new();
    let tx = CLOSER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Doomed>();
        std::thread::Builder::new()
            .name("closer".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    // Without the thread (it could not be started), here and now.
    if let Some(tx) = tx {
        let _ = tx.send(Box::new(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The newest FUSE mount on the path, found with mountinfo's escapes; not a mount of
    /// another type there, nor one on a longer path.
    #[test]
    fn fuse_mount_device_reads_mountinfo() {
        let info = "\
24 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 24 0:40 / /mnt/a\\040b rw - fuse layervol rw,user_id=0
41 40 0:41 / /mnt/a\\040b rw - fuse layervol rw,user_id=0
42 41 0:42 / /mnt/a\\040b rw - tmpfs tmpfs rw
43 24 0:43 / /mnt/a\\040b/c rw - fuse.other x rw
";
        let p = std::path::Path::new;
        assert_eq!(
            fuse_mount_device_in(info, p("/mnt/a b")).as_deref(),
            Some("0:41")
        );
        assert_eq!(
            fuse_mount_device_in(info, p("/mnt/a b/c")).as_deref(),
            Some("0:43")
        );
        assert_eq!(fuse_mount_device_in(info, p("/mnt/a")), None);
    }

    /// The `*xattrat` calls and the `/proc/self/fd` path form they replace behave alike,
    /// on a name in a directory and on the directory itself (empty name).
    #[test]
    fn xattr_calls_with_and_without_xattrat() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let dir = std::fs::File::open(t.path()).unwrap();
        let key = c"user.layervol-test";
        for missing in [false, true] {
            xattrat::pretend_missing(missing);
            for name in [c"f", c""] {
                let _ = removexattr(dir.as_fd(), name, key);
                assert_eq!(
                    getxattr(dir.as_fd(), name, key),
                    Ok(None),
                    "{missing} {name:?}"
                );
                let big = vec![7u8; 1000]; // more than the first buffer
                setxattr(dir.as_fd(), name, key, &big, libc::XATTR_CREATE).unwrap();
                assert_eq!(
                    setxattr(dir.as_fd(), name, key, b"v", libc::XATTR_CREATE),
                    Err(Errno::EEXIST)
                );
                assert_eq!(getxattr(dir.as_fd(), name, key), Ok(Some(big)));
                assert!(
                    listxattr(dir.as_fd(), name)
                        .unwrap()
                        .iter()
                        .any(|k| **k == *key)
                );
                removexattr(dir.as_fd(), name, key).unwrap();
                assert_eq!(removexattr(dir.as_fd(), name, key), Err(Errno::ENODATA));
                assert_eq!(getxattr(dir.as_fd(), c"missing", key), Err(Errno::ENOENT));
            }
        }
        xattrat::pretend_missing(false);
    }

    /// A directory deeper than `PATH_MAX` below the root is reached, and still no symlink is
    /// followed on the way (a symlinked component deep down is refused, not resolved).
    #[test]
    fn open_dir_in_root_below_path_max() {
        let t = tempfile::tempdir().unwrap();
        let root = std::fs::File::open(t.path()).unwrap();
        let names: Vec<CString> = (0..36)
            .map(|i| CString::new(format!("{i:02}{}", "d".repeat(240))).unwrap())
            .collect();
        let mut d = openat(root.as_fd(), c".", libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
        for n in &names {
            mkdirat(d.as_fd(), n, 0o755).unwrap();
            d = openat(d.as_fd(), n, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
        }
        let rel = |k: usize| {
            let parts: Vec<&[u8]> = names[..k].iter().map(|n| n.to_bytes()).collect();
            CString::new(parts.join(&b'/')).unwrap()
        };
        assert!(rel(36).count_bytes() > 2 * libc::PATH_MAX as usize);
        let got = open_dir_in_root(root.as_fd(), &rel(36)).unwrap();
        assert_eq!(
            fstat(got.as_fd()).unwrap().st_ino,
            fstat(d.as_fd()).unwrap().st_ino
        );
        // A symlink to the root in place of component 34: refused.
        let p33 = open_dir_in_root(root.as_fd(), &rel(33)).unwrap();
        let moved = CString::new("moved").unwrap();
        renameat2(p33.as_fd(), &names[33], p33.as_fd(), &moved, 0).unwrap();
        symlinkat(c"/", p33.as_fd(), &names[33]).unwrap();
        assert_eq!(
            open_dir_in_root(root.as_fd(), &rel(36)).unwrap_err(),
            Errno::ELOOP
        );
    }

    #[test]
    fn drop_later_drops_on_another_thread() {
        struct Probe(std::sync::mpsc::Sender<Option<String>>);
        impl Drop for Probe {
            fn drop(&mut self) {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = self.0.send(name);
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        drop_later(Probe(tx));
        let on = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("dropped");
        assert_eq!(on.as_deref(), Some("closer"));
    }
}
