//! Hard-linked lower files, as kernel overlayfs does them with `index=on`.
//!
//! A lower file with several names is copied up once, into `workdir/index/<hex of its
//! origin>`; each name that needs an upper object becomes a hard link to that copy. A name
//! removed before any copy-up still moves the data to the index first, so the other names
//! keep it. The link count of the merged view is kept in the index file's `overlay.nlink`,
//! in the kernel's format, relative to the index file's own link count (`U-1`: one less than
//! the index copy has, i.e. every name is linked to it). Relative to the upper, not to a lower
//! object: after layers rotate, the names of one identity can sit on different lower objects
//! with different link counts, while the index copy's count changes exactly with the names
//! linked to it. Values relative to the lower (`L+N`, older layervol and some kernel paths)
//! are still read.

use std::ffi::{CStr, CString};
use std::os::fd::AsFd;
use std::sync::Arc;

use super::{Found, Hardlink, Node, Overlay};
use crate::layer::RelPath;
use crate::sys::{self, Errno, Result};

fn hex(b: &[u8]) -> CString {
    let s: String = b.iter().map(|x| format!("{x:02x}")).collect();
    CString::new(s).expect("hex has no NUL")
}

/// Parses the kernel's `overlay.nlink` value ("L+1", "U-2", ...).
fn parse_nlink(v: &[u8], lower: u32, upper: u32) -> Option<u32> {
    let s = std::str::from_utf8(v).ok()?;
    let (base, adj) = match s.split_at_checked(1)? {
        ("L", a) => (lower, a),
        ("U", a) => (upper, a),
        _ => return None,
    };
    let adj: i64 = adj.parse().ok()?;
    u32::try_from(base as i64 + adj).ok()
}

impl Overlay {
    /// Recognises a hard-linked lower file (or the upper link of one) and its index state.
    pub(super) fn detect_hardlink(
        &self,
        parent: &Node,
        name: &CStr,
        f: &Found,
    ) -> Result<Option<(Hardlink, bool, u32)>> {
        let Some(ix) = &self.index else {
            return Ok(None);
        };
        if sys::is_dir(&f.st) || f.st.st_nlink < 2 {
            return Ok(None);
        }
        let (fb, lower_nlink) = if f.upper {
            let path = parent.path().ok_or(Errno::ENOENT)?;
            let d = self.upper()?.dir(&path)?;
            let Some(fb) = sys::getxattr(d.as_fd(), name, &self.x.origin)? else {
                return Ok(None);
            };
            // The merged link count is kept relative to the link count of the lower object
            // the index copy was made from: the one under this name when it has this
            // identity (a copy of a copy names the first object as its origin, whose count
            // may differ), else the origin itself.
            let below = self
                .lookup_lower(parent, name, None, None)
                .ok()
                .and_then(|lf| lf.nondir)
                .and_then(|lr| self.lower_identity(&lr).ok().flatten())
                .filter(|(key, _)| *key == fb)
                .map(|(_, nlink)| nlink);
            let nlink = below.or_else(|| self.origin_nlink(&fb)).unwrap_or(1);
            (fb, nlink)
        } else {
            let lr = f.lower.as_ref().ok_or(Errno::EIO)?;
            match self.lower_identity(lr)? {
                Some(id) => id,
                None => return Ok(None),
            }
        };
        let index = hex(&fb);
        let root = ix.dir(&RelPath::root())?;
        let (indexed, upper_nlink, stored) = match sys::fstatat(root.as_fd(), &index) {
            Ok(st) => {
                if f.upper && st.st_ino != f.st.st_ino {
                    // An upper file with this origin that is not our copy: not a hard link.
                    return Ok(None);
                }
                let stored = sys::getxattr(root.as_fd(), &index, &self.nlink_key())?;
                (true, st.st_nlink as u32, stored)
            }
            Err(Errno::ENOENT) if !f.upper => (false, 0, None),
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let merged = stored
            .and_then(|v| parse_nlink(&v, lower_nlink, upper_nlink))
            .unwrap_or(lower_nlink);
        Ok(Some((Hardlink { index, lower_nlink }, indexed, merged)))
    }

    /// The identity (its origin, or its own file handle) and link count of a lower object;
    /// `None` if the filesystem gives it no file handle.
    fn lower_identity(&self, lr: &crate::fs::LowerRef) -> Result<Option<(Vec<u8>, u32)>> {
        let l = self.lower(lr.layer)?;
        let (d, n) = l.parent_of(&lr.path)?;
        let st = sys::fstatat(d.as_fd(), &n)?;
        let fb = match self.identity_origin(d.as_fd(), &n, &st, false) {
            Some((fb, _)) => fb,
            None => match l.origin(d.as_fd(), &n) {
                Ok(fb) => fb,
                Err(_) => return Ok(None),
            },
        };
        Ok(Some((fb, st.st_nlink as u32)))
    }

    /// Hard-linked lower files are shared through `workdir/index` (overlay mode).
    pub(super) fn has_index(&self) -> bool {
        self.index.is_some()
    }

    fn nlink_key(&self) -> CString {
        CString::new(format!("{}nlink", self.x.prefix)).expect("no NUL")
    }

    fn origin_nlink(&self, fb: &[u8]) -> Option<u32> {
        for (_, l) in self.layers().lowers.iter() {
            if let Ok(fd) = crate::layer::decode_origin(fb, l.root_rd.as_fd()) {
                return sys::fstat(fd.as_fd()).ok().map(|st| st.st_nlink as u32);
            }
        }
        None
    }

    /// Makes sure the index holds the copy of a hard-linked lower file.
    pub(super) fn ensure_index(&self, node: &Arc<Node>) -> Result<()> {
        let Some(hl) = &node.hardlink else {
            return Ok(());
        };
        if node.state.lock().indexed {
            return Ok(());
        }
        let ix = self.index.as_ref().ok_or(Errno::EROFS)?;
        let tmp = self.make_copy(node, true)?;
        let work = self.work()?.root.as_fd();
        let root = ix.dir(&RelPath::root())?;
        match sys::renameat2(work, &tmp, root.as_fd(), &hl.index, libc::RENAME_NOREPLACE) {
            Ok(()) => {}
            // Made already (by an earlier mount): use it.
            Err(Errno::EEXIST) => super::copyup::remove_tree(work, &tmp)?,
            Err(e) => {
                let _ = super::copyup::remove_tree(work, &tmp);
                return Err(e);
            }
        }
        node.state.lock().indexed = true;
        self.store_nlink(node)
    }

    /// Records a change of the merged link count of a hard-linked lower file, after the
    /// upper operation that made it.
    pub(super) fn nlink_changed(&self, node: &Node, delta: i32) -> Result<()> {
        if node.hardlink.is_none() {
            return Ok(());
        }
        {
            let mut s = node.state.lock();
            s.merged_nlink = (s.merged_nlink as i64 + delta as i64).max(0) as u32;
        }
        self.store_nlink(node)
    }

    /// Stores the merged link count in the index copy, relative to its own link count (see
    /// the module doc). Call after each change of either: the index copy made, a name linked
    /// to it, a link, unlink or rename. Nothing to do before the index copy exists.
    pub(super) fn store_nlink(&self, node: &Node) -> Result<()> {
        let (Some(hl), Some(ix)) = (&node.hardlink, &self.index) else {
            return Ok(());
        };
        let root = ix.dir(&RelPath::root())?;
        let upper = match sys::fstatat(root.as_fd(), &hl.index) {
            Ok(st) => st.st_nlink as i64,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        let merged = node.state.lock().merged_nlink as i64;
        let v = format!("U{:+}", merged - upper);
        match sys::setxattr(root.as_fd(), &hl.index, &self.nlink_key(), v.as_bytes(), 0) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The index copy's name in `workdir/index`, for linking it into the upper.
    pub(super) fn index_dir(&self) -> Result<std::os::fd::OwnedFd> {
        self.index
            .as_ref()
            .ok_or(Errno::EROFS)?
            .dir(&RelPath::root())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nlink_formats() {
        assert_eq!(parse_nlink(b"L+1", 3, 9), Some(4));
        assert_eq!(parse_nlink(b"L-2", 3, 9), Some(1));
        assert_eq!(parse_nlink(b"U+0", 3, 2), Some(2));
        assert_eq!(parse_nlink(b"X+0", 3, 2), None);
        assert_eq!(hex(&[0, 0xfb, 0x1d]).as_bytes(), b"00fb1d");
    }
}
