//! Mounting the FUSE filesystem with the view one directory below the FUSE root.
//!
//! The kernel makes a FUSE mount's root inode before FUSE_INIT has granted POSIX ACLs, so it
//! never caches that inode's ACLs (`ACL_DONT_CACHE` for the inode's lifetime; neither an
//! invalidation nor a synchronous INIT changes that on Linux 6.18). Every path walk through
//! the root by a caller who does not own it then costs a GETXATTR round trip: a `stat` of an
//! absolute path took 29-52 us against 2-3 us on kernel overlayfs.
//!
//! So the filesystem is created detached (`fsopen`, `fsconfig`, `fsmount`). Its root is a
//! *shell*: a directory with one entry, [`VIEW_NAME`], which is the overlay's root. What gets
//! attached on the mountpoint is a clone of the detached mount rooted at that entry
//! (`open_tree(OPEN_TREE_CLONE)`, `move_mount`), and the detached mount is closed. The shell
//! is then reachable from nowhere, every inode a walk meets was made after INIT, and
//! `umount MNT` removes the only mount of the filesystem, which ends the session as before.
//! /proc/self/mountinfo shows the mount's root as `/view`.
//!
//! A caller without the privilege to create a filesystem (an unprivileged user, whose mount
//! goes through fusermount3) gets the view at the FUSE root, as before: [`create`] says so.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::Context;
use fuser::MountOption;

/// The shell's one entry: the overlay's root.
pub const VIEW_NAME: &CStr = c"view";

/// The kernel's node id of the view's root when the shell is the FUSE root. No inode number
/// of the engine is this large (the engine's root is 1, other nodes are layer inode numbers,
/// with a layer index in the top byte when the layers are on several filesystems).
pub const VIEW_NODE: u64 = u64::MAX - 1;

/// A FUSE filesystem created but not attached anywhere yet.
pub struct Detached {
    mount: OwnedFd,
}

/// Creates the filesystem with the shell as its root, and returns the session's /dev/fuse
/// (the kernel has queued FUSE_INIT on it) with the filesystem. `Ok(None)`: this process may
/// not create filesystems (`fsopen` answers EPERM), so the caller mounts the old way.
pub fn create(
    options: &[MountOption],
    allow_other: bool,
) -> anyhow::Result<Option<(OwnedFd, Detached)>> {
    let fs = match sys_fsopen(c"fuse") {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Ok(None),
        Err(e) => return Err(e).context("fsopen(\"fuse\")"),
    };
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context("cannot open /dev/fuse")?;
    let dev = OwnedFd::from(dev);
    let fsc = FsContext(fs);
    fsc.set("fd", &dev.as_raw_fd().to_string())?;
    // Only the daemon walks through the shell (to clone the view's mount).
    fsc.set("rootmode", "40700")?;
    fsc.set("user_id", &nix::unistd::getuid().to_string())?;
    fsc.set("group_id", &nix::unistd::getgid().to_string())?;
    if allow_other {
        fsc.flag("allow_other")?;
    }
    let mut attrs = libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOSUID;
    for o in options {
        match o {
            MountOption::FSName(name) => fsc.set("source", name)?,
            MountOption::Subtype(t) => fsc.set("subtype", t)?,
            MountOption::DefaultPermissions => fsc.flag("default_permissions")?,
            MountOption::RO => {
                fsc.flag("ro")?;
                attrs |= libc::MOUNT_ATTR_RDONLY;
            }
            MountOption::Sync => fsc.flag("sync")?,
            MountOption::DirSync => fsc.flag("dirsync")?,
            MountOption::Dev => attrs &= !libc::MOUNT_ATTR_NODEV,
            MountOption::NoDev => attrs |= libc::MOUNT_ATTR_NODEV,
            MountOption::Suid => attrs &= !libc::MOUNT_ATTR_NOSUID,
            MountOption::NoSuid => attrs |= libc::MOUNT_ATTR_NOSUID,
            MountOption::NoExec => attrs |= libc::MOUNT_ATTR_NOEXEC,
            MountOption::Exec => attrs &= !libc::MOUNT_ATTR_NOEXEC,
            MountOption::NoAtime => attrs |= libc::MOUNT_ATTR_NOATIME,
            MountOption::Atime | MountOption::RW | MountOption::Async => {}
            MountOption::AutoUnmount | MountOption::CUSTOM(_) => {
                anyhow::bail!("mount option {o:?} is not supported")
            }
        }
    }
    fsc.create()?;
    let mount = sys_fsmount(&fsc.0, attrs).context("fsmount")?;
    Ok(Some((dev, Detached { mount })))
}

impl Detached {
    /// Attaches the view on `mnt`. The session must be serving: the kernel looks the view
    /// up in the shell. On error the filesystem goes with `self` and the session ends.
    pub fn attach(self, mnt: &Path) -> anyhow::Result<()> {
        let view = crate::sys::open_tree(
            self.mount.as_raw_fd(),
            VIEW_NAME,
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
        .context("cannot open the view of the new filesystem")?;
        let to = CString::new(mnt.as_os_str().as_bytes())?;
        // SAFETY: plain syscall on valid fds and NUL-terminated strings.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                view.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("cannot attach the mount on `{}`", mnt.display()));
        }
        Ok(())
    }
}

/// An fsopen context: its messages explain a refused parameter.
struct FsContext(OwnedFd);

impl FsContext {
    fn set(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let (k, v) = (CString::new(key)?, CString::new(value)?);
        self.config(libc::FSCONFIG_SET_STRING, Some(&k), v.as_ptr().cast())
            .with_context(|| format!("mount option {key}={value}"))
    }

    fn flag(&self, key: &str) -> anyhow::Result<()> {
        let k = CString::new(key)?;
        self.config(libc::FSCONFIG_SET_FLAG, Some(&k), std::ptr::null())
            .with_context(|| format!("mount option {key}"))
    }

    fn create(&self) -> anyhow::Result<()> {
        self.config(libc::FSCONFIG_CMD_CREATE, None, std::ptr::null())
            .context("FSCONFIG_CMD_CREATE")
    }

    fn config(
        &self,
        cmd: libc::c_uint,
        key: Option<&CStr>,
        value: *const libc::c_void,
    ) -> io::Result<()> {
        let key = key.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: plain syscall; `key` and `value` are NUL-terminated strings or null.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.0.as_raw_fd(),
                cmd,
                key,
                value,
                0 as libc::c_int,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            let why = self.messages();
            return Err(if why.is_empty() {
                e
            } else {
                io::Error::new(e.kind(), format!("{e}: {why}"))
            });
        }
        Ok(())
    }

    /// The kernel's messages about this context ("e fuse: ..." lines).
    fn messages(&self) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.push(
                String::from_utf8_lossy(&buf[..n as usize])
                    .trim()
                    .to_string(),
            );
        }
        out.join("; ")
    }
}

fn sys_fsopen(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with a NUL-terminated string.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), libc::FSOPEN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn sys_fsmount(fs: &OwnedFd, attrs: u64) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall on a valid fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            attrs as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
