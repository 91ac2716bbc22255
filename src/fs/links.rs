//! Hard-linked lower files in volume mode.
//!
//! Volume mode has no `workdir/index` (see `index.rs`): a snapshot freezes the upper, and an
//! index entry would have to follow its copy into the frozen layer and be searched for in
//! every layer above each lower name. Instead, copying up a lower file with several names
//! makes every name of it that the merged view shows a hard link to the one upper copy, in
//! the same atomic step: the names are linked to the copy while it is still in the work dir
//! (each link shows the same object the lower one did), then the copy is renamed into place.
//! The upper then holds an ordinary hard link, which snapshots freeze, squash keeps and
//! kernel overlayfs mounts like any other: the names share data, attributes and link count,
//! as with kernel overlayfs `index=on`.
//!
//! The names come from the lower layer's hard-link groups (`Layer::link_groups`, one walk of
//! the layer on first use). A name is linked when the merged view shows that very lower
//! object at the same path. Names that a directory rename moves (a redirect) would not be
//! found there, so before a directory with lower parts moves, the hard-linked lower files
//! in it are copied up (which links all their names) first.

use std::ffi::{CStr, CString};
use std::os::fd::AsFd;
use std::sync::Arc;

use super::{Node, Overlay, ROOT_INO};
use crate::layer::RelPath;
use crate::sys::{self, Errno, Result};

/// Another merged name of a node's lower object: (merged parent directory, name).
pub(super) type Sibling = (Arc<Node>, CString);

impl Overlay {
    /// The other names of `node`'s lower object that the merged view shows, when that object
    /// has several links and the engine has no index to share it through (volume mode).
    pub(super) fn lower_siblings(&self, node: &Node) -> Result<Vec<Sibling>> {
        if node.is_dir() || node.hardlink.is_some() || self.has_index() {
            return Ok(Vec::new());
        }
        let Some(lr) = node.layout().lower.clone() else {
            return Ok(Vec::new());
        };
        let l = self.lower(lr.layer)?;
        let st = l.stat(&lr.path)?;
        if st.st_nlink < 2 {
            return Ok(Vec::new());
        }
        let Some(paths) = l.link_groups().get(&st.st_ino) else {
            return Ok(Vec::new());
        };
        // The node's own name: any name of the object (the lookup just used).
        let (own_parent, own_name) = {
            let s = node.state.lock();
            (s.parent.as_ref().map(|p| p.ino), s.name.clone())
        };
        let mut out = Vec::new();
        for p in paths {
            let Some((dir, name)) = p.split_last() else {
                continue;
            };
            let Ok(parent) = self.merged_dir(&dir) else {
                continue;
            };
            if own_parent == Some(parent.ino) && name == own_name {
                continue;
            }
            let same = |f: &super::Found| {
                !f.upper
                    && f.lower
                        .as_ref()
                        .is_some_and(|o| o.layer == lr.layer && o.path == *p)
            };
            if self.resolve(&parent, &name).is_ok_and(|f| same(&f)) {
                out.push((parent, name));
            }
        }
        Ok(out)
    }

    /// Before a name of `node` is removed (unlink, or a rename over it): its other names
    /// must keep the object, with one link less. Overlay mode moves a hard-linked lower file
    /// to the index; without one, a copy-up links the other names to one upper object.
    pub(super) fn keep_other_names(&self, node: &Arc<Node>) -> Result<()> {
        self.ensure_index(node)?;
        if !node.is_dir() && !node.has_upper() && !self.lower_siblings(node)?.is_empty() {
            self.copy_up(node, true)?;
        }
        Ok(())
    }

    /// Before directory `dir` moves: copies up the hard-linked lower files below it, whose
    /// names `lower_siblings` could no longer find at their lower paths afterwards.
    pub(super) fn before_dir_moves(&self, dir: &Arc<Node>) -> Result<()> {
        if !dir.is_dir() || self.has_index() || self.upper().is_err() {
            return Ok(());
        }
        let Some(merged) = dir.path() else {
            return Ok(());
        };
        let lower_dirs = dir.layout().lower_dirs.clone();
        for lr in lower_dirs {
            let l = self.lower(lr.layer)?;
            for p in l.link_groups().values().flatten() {
                let Some(rel) = below(p, &lr.path) else {
                    continue;
                };
                let Some((mdir, name)) = join(&merged, rel).split_last() else {
                    continue;
                };
                let Ok(parent) = self.merged_dir(&mdir) else {
                    continue;
                };
                let Ok((node, _)) = self.lookup_node(&parent, &name) else {
                    continue;
                };
                let same = node
                    .layout()
                    .lower
                    .as_ref()
                    .is_some_and(|o| o.layer == lr.layer && o.path == *p);
                if same && !node.is_dir() && !node.has_upper() {
                    self.copy_up(&node, true)?;
                }
            }
        }
        Ok(())
    }

    /// The merged directory at `rel`, looked up from the root.
    fn merged_dir(&self, rel: &RelPath) -> Result<Arc<Node>> {
        let mut cur = self.node(ROOT_INO)?;
        for comp in rel
            .as_bytes()
            .split(|c| *c == b'/')
            .filter(|c| !c.is_empty())
        {
            let name = CString::new(comp).map_err(|_| Errno::EINVAL)?;
            let (n, _) = self.lookup_node(&cur, &name)?;
            if !n.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            cur = n;
        }
        Ok(cur)
    }

    /// Links the copy `tmp` (in the work dir) at every sibling name, copying up their
    /// directories first. Like copy-up, this leaves the directories' times alone.
    pub(super) fn link_siblings(&self, tmp: &CStr, siblings: &[Sibling]) -> Result<()> {
        let work = self.work()?.root.as_fd();
        for (parent, name) in siblings {
            self.copy_up(parent, true)?;
            let d = self.upper_dir(parent)?;
            let pst = sys::fstat(d.as_fd())?;
            sys::linkat(work, tmp, d.as_fd(), name)?;
            sys::utimensat(d.as_fd(), sys::dot(), &sys::times_of(&pst))?;
        }
        Ok(())
    }
}

/// `p` relative to `dir` if it lies below it.
fn below<'a>(p: &'a RelPath, dir: &RelPath) -> Option<&'a [u8]> {
    if dir.is_root() {
        return Some(p.as_bytes());
    }
    p.as_bytes()
        .strip_prefix(dir.as_bytes())?
        .strip_prefix(b"/")
}

/// `base` joined with the relative path `rel` (`/`-separated components).
fn join(base: &RelPath, rel: &[u8]) -> RelPath {
    rel.split(|c| *c == b'/')
        .filter(|c| !c.is_empty())
        .filter_map(|c| CString::new(c).ok())
        .fold(base.clone(), |acc, c| acc.join(&c))
}
