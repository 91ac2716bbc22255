//! Copy-up: making a lower object (and its parent directories) exist in the upper layer.
//!
//! Atomic like the kernel's: the copy is built under a temporary name in the work dir (data,
//! owner, mode, xattrs, `overlay.origin`, times) and renamed into place, so a crash leaves
//! either the lower object visible or the complete copy, never a partial one.

use std::ffi::{CStr, CString};
use std::os::fd::AsFd;
use std::sync::Arc;

use super::{Node, Overlay};
use crate::sys::{self, Errno, Result};

impl Overlay {
    /// Makes `node` exist in the upper layer. `data`: copy the file contents too (a file about
    /// to be truncated to zero does not need them).
    pub(super) fn copy_up(&self, node: &Arc<Node>, data: bool) -> Result<()> {
        if node.has_upper() {
            return Ok(());
        }
        self.upper()?;
        let _g = node.copy_up_lock.lock();
        if node.has_upper() {
            return Ok(());
        }
        let parent = node.parent().ok_or(Errno::ENOENT)?;
        self.copy_up(&parent, true)?;
        let path = node.path().ok_or(Errno::ENOENT)?;
        let (_, name) = path.split_last().ok_or(Errno::EINVAL)?;
        let updir = self.upper_dir(&parent)?;
        // Like the kernel, copy-up does not change the parent's times.
        let pst = sys::fstat(updir.as_fd())?;
        if let Some(hl) = &node.hardlink {
            // A hard-linked lower file: every name links the one index copy.
            self.ensure_index(node)?;
            sys::linkat(self.index_dir()?.as_fd(), &hl.index, updir.as_fd(), &name)?;
            self.store_nlink(node)?;
        } else {
            // Without an index, the other names of a hard-linked file link the copy before
            // it is renamed into place (`links.rs`).
            let siblings = self.lower_siblings(node)?;
            let work = self.work()?.root.as_fd();
            let partial = data && node.fmt == libc::S_IFREG && self.partial_enabled();
            let (tmp, ps) = if partial {
                // Volume mode: copy the metadata only; writes fill in blocks (`partial.rs`).
                let (tmp, ps) = self.make_partial_copy(node)?;
                (tmp, Some(ps))
            } else {
                (self.make_copy(node, data)?, None)
            };
            let placed = self.link_siblings(&tmp, &siblings).and_then(|()| {
                sys::renameat2(work, &tmp, updir.as_fd(), &name, libc::RENAME_NOREPLACE)
            });
            if let Err(e) = placed {
                let _ = remove_tree(work, &tmp);
                return Err(e);
            }
            if let Some(ps) = ps {
                *node.partial.lock() = Some(ps);
                self.live_partials.insert(node.ino, ());
            }
        }
        sys::utimensat(updir.as_fd(), sys::dot(), &sys::times_of(&pst))?;
        node.set_upper();
        node.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if node.is_dir() {
            // It is a merged directory now: the kernel's cached link count is stale.
            self.invalidate_attr(node.ino);
        }
        Ok(())
    }

    /// Builds a complete copy of the node's lower object under a temporary name in the work
    /// dir: data, owner, mode, xattrs, `overlay.origin`, times. Returns the name.
    pub(super) fn make_copy(&self, node: &Node, data: bool) -> Result<CString> {
        let lay = node.layout();
        let src = if node.is_dir() {
            lay.lower_dirs.first()
        } else {
            lay.lower.as_ref()
        }
        .ok_or(Errno::EIO)?;
        let lower = self.lower(src.layer)?;
        let (ldir, lname) = lower.parent_of(&src.path)?;
        let st = sys::fstatat(ldir.as_fd(), &lname)?;
        let wdir = self.work()?.root.as_fd();
        let tmp = self.tmp_name();
        let fmt = st.st_mode & libc::S_IFMT;
        let made = (|| -> Result<()> {
            match fmt {
                libc::S_IFDIR => sys::mkdirat(wdir, &tmp, 0o700)?,
                libc::S_IFREG => {
                    let out = sys::openat(
                        wdir,
                        &tmp,
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                        0o600,
                    )?;
                    if data && st.st_size > 0 {
                        let inp = sys::openat(ldir.as_fd(), &lname, libc::O_RDONLY, 0)?;
                        sys::copy_range(inp.as_fd(), out.as_fd(), st.st_size as u64)?;
                        if self.cfg.fsync {
                            sys::fsync(out.as_fd(), false)?;
                        }
                    }
                }
                libc::S_IFLNK => {
                    let target = sys::readlinkat(ldir.as_fd(), &lname)?;
                    let target = CString::new(target).map_err(|_| Errno::EIO)?;
                    sys::symlinkat(&target, wdir, &tmp)?;
                }
                _ => sys::mknodat(wdir, &tmp, st.st_mode, st.st_rdev)?,
            }
            sys::fchownat(wdir, &tmp, st.st_uid, st.st_gid)?;
            if fmt != libc::S_IFLNK {
                sys::fchmodat(wdir, &tmp, st.st_mode)?;
            }
            self.copy_xattrs(ldir.as_fd(), &lname, wdir, &tmp)?;
            // Keep the lower copy's own origin when it is the object's identity, otherwise
            // the lower object itself is the origin (`identity_origin`).
            let inherited = self
                .identity_origin(ldir.as_fd(), &lname, &st, false)
                .map(|(o, _)| o);
            let origin = match inherited {
                Some(o) => Some(o),
                None => lower.origin(ldir.as_fd(), &lname).ok(),
            };
            if let Some(o) = origin {
                sys::setxattr(wdir, &tmp, &self.x.origin, &o, 0)?;
            }
            let times = sys::times_of(&st);
            sys::utimensat(wdir, &tmp, &times)
        })();
        if let Err(e) = made {
            let _ = remove_tree(wdir, &tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    fn copy_xattrs(
        &self,
        sdir: std::os::fd::BorrowedFd,
        sname: &CStr,
        ddir: std::os::fd::BorrowedFd,
        dname: &CStr,
    ) -> Result<()> {
        for key in sys::listxattr(sdir, sname)? {
            // Format xattrs are not copied; escaped user overlay xattrs are user data.
            if self.x.to_view(&key).is_none() {
                continue;
            }
            if let Some(v) = sys::getxattr(sdir, sname, &key)? {
                match sys::setxattr(ddir, dname, &key, &v, 0) {
                    // Like the kernel: xattrs the upper cannot hold are skipped.
                    Err(Errno::EOPNOTSUPP) => {}
                    r => r?,
                }
            }
        }
        Ok(())
    }
}

/// Removes `dir/name` and everything below it (used on objects moved into the work dir).
pub(super) fn remove_tree(dir: std::os::fd::BorrowedFd, name: &CStr) -> Result<()> {
    let st = match sys::fstatat(dir, name) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if sys::is_dir(&st) {
        let d = sys::openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        for (child, _, _) in sys::read_dir(d.as_fd())? {
            remove_tree(d.as_fd(), &child)?;
        }
        sys::unlinkat(dir, name, true)
    } else {
        sys::unlinkat(dir, name, false)
    }
}
