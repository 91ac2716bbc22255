//! Namespace operations of the merged view: readdir, create, unlink, rmdir, rename, link.
//!
//! Removing a name that a lower layer also has leaves a whiteout; a directory made over a
//! whiteout is opaque; a directory with lower parts that moves gets an absolute
//! `overlay.redirect` to its lower path (like `redirect_dir=on`), so rename never fails with
//! EXDEV. Every step that changes what the merged view shows is a single rename in the upper.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::acl;
use super::copyup::remove_tree;
use super::{Attr, Found, Node, Overlay, Seen};
use crate::layer::{self, EntryKind};
use crate::sys::{self, Errno, Result};

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: CString,
    pub ino: u64,
    /// `S_IFMT` bits.
    pub fmt: u32,
}

/// Who creates: the caller's filesystem ids and umask (applied here, not by the kernel: a
/// default ACL of the directory replaces it).
#[derive(Debug, Clone, Copy)]
pub struct Creator {
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
}

impl Creator {
    /// Root with no umask (tests, internal callers).
    pub const ROOT: Creator = Creator {
        uid: 0,
        gid: 0,
        umask: 0,
    };
}

/// What to create.
pub enum NewKind<'a> {
    File { mode: u32 },
    Dir { mode: u32 },
    Node { mode: u32, rdev: u64 },
    Symlink { target: &'a CStr },
    Link { target: Arc<Node> },
}

/// A whiteout made in place in `updir` got the directory's default ACL (as an access ACL)
/// from the upper's filesystem; kernel overlayfs makes the whiteouts of removals in its work
/// dir, without one. (Renames leave theirs with RENAME_WHITEOUT in place, in both.)
fn strip_inherited_acl(updir: BorrowedFd, name: &CStr) -> Result<()> {
    match sys::getxattr(updir, c".", acl::DEFAULT) {
        Ok(Some(_)) => match sys::removexattr(updir, name, acl::ACCESS) {
            Ok(()) | Err(Errno::ENODATA) => Ok(()),
            Err(e) => Err(e),
        },
        Ok(None) | Err(Errno::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes `dir/name`, a directory (open as `own`) that held only `names` when the caller
/// looked: without reading it again. Whatever else is found there goes with `remove_tree`.
fn remove_emptied(dir: BorrowedFd, name: &CStr, own: BorrowedFd, names: &[CString]) -> Result<()> {
    for n in names {
        match sys::unlinkat(own, n, false) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(_) => return remove_tree(dir, name),
        }
    }
    match sys::unlinkat(dir, name, true) {
        Err(Errno::ENOTEMPTY | Errno::EEXIST) => remove_tree(dir, name),
        r => r,
    }
}

impl NewKind<'_> {
    /// The mode of the kinds that have one of their own (not symlinks, not links).
    fn mode_mut(&mut self) -> Option<&mut u32> {
        match self {
            NewKind::File { mode } | NewKind::Dir { mode } | NewKind::Node { mode, .. } => {
                Some(mode)
            }
            NewKind::Symlink { .. } | NewKind::Link { .. } => None,
        }
    }
}

fn dtype_fmt(t: u8) -> u32 {
    match t {
        libc::DT_DIR => libc::S_IFDIR,
        libc::DT_REG => libc::S_IFREG,
        libc::DT_LNK => libc::S_IFLNK,
        libc::DT_CHR => libc::S_IFCHR,
        libc::DT_BLK => libc::S_IFBLK,
        libc::DT_FIFO => libc::S_IFIFO,
        libc::DT_SOCK => libc::S_IFSOCK,
        _ => 0,
    }
}

/// What a listing resolved to number its directories, handed to the lookups of the same
/// READDIRPLUS request so that they need not ask the layers again. Valid only for the stack
/// generation it was found in; directories only (a file's link count and index state can
/// change through its other names while the request runs).
#[derive(Default)]
pub struct Resolved {
    generation: u64,
    found: HashMap<CString, Found>,
}

impl Resolved {
    fn keep(&mut self, name: &CStr, f: Found) {
        if sys::is_dir(&f.st) {
            self.found.insert(name.to_owned(), f);
        }
    }
}

impl Overlay {
    /// The merged listing of a directory (without `.` and `..`).
    pub fn list_dir(&self, node: &Arc<Node>) -> Result<Vec<DirEntry>> {
        self.list_dir_resolved(node).map(|(entries, _)| entries)
    }

    /// What the listing resolved on the way (see `Resolved`) for a lookup that comes right
    /// after it, in the same request: the resolve of `name` unless the stack changed since.
    pub(super) fn take_resolved(&self, r: &mut Resolved, name: &CStr) -> Option<Found> {
        let f = r.found.remove(name)?;
        (r.generation == self.generation.load(Ordering::Acquire)).then_some(f)
    }

    /// `list_dir`, with what it resolved.
    pub(super) fn list_dir_resolved(&self, node: &Arc<Node>) -> Result<(Vec<DirEntry>, Resolved)> {
        let _s = self.stable();
        self.refresh(node);
        let mut resolved = Resolved {
            generation: self.generation.load(Ordering::Acquire),
            found: HashMap::new(),
        };
        let mut seen: HashSet<CString> = HashSet::new();
        let mut out = Vec::new();
        let mut upper_names = Vec::new();
        if node.has_upper() {
            let d = self.upper_dir(node)?;
            for (name, ino, t) in sys::read_dir(d.as_fd())? {
                if t == libc::DT_CHR || t == libc::DT_UNKNOWN {
                    let st = sys::fstatat(d.as_fd(), &name)?;
                    if sys::is_whiteout(&st) {
                        seen.insert(name);
                        continue;
                    }
                }
                seen.insert(name.clone());
                upper_names.push((name, ino, dtype_fmt(t)));
            }
        }
        let mut lower_names = HashSet::new();
        let lay = node.layout();
        for (k, lr) in lay.lower_dirs.iter().enumerate() {
            let l = self.lower(lr.layer)?;
            let d = self.lower_dir(&lay, k)?;
            for (name, ino, t) in sys::read_dir(d.as_fd())? {
                if seen.contains(&name) {
                    lower_names.insert(name);
                    continue;
                }
                seen.insert(name.clone());
                if t == libc::DT_CHR || t == libc::DT_REG || t == libc::DT_UNKNOWN {
                    let st = sys::fstatat(d.as_fd(), &name)?;
                    if layer::classify_lower(d.as_fd(), &name, &st, &self.x)? == EntryKind::Whiteout
                    {
                        continue;
                    }
                }
                let fmt = dtype_fmt(t);
                let ino = if fmt == libc::S_IFDIR {
                    // A lower directory may merge with others: ask the resolver.
                    match self.resolve(node, &name) {
                        Ok(f) => {
                            let ino = f.ino;
                            resolved.keep(&name, f);
                            ino
                        }
                        Err(_) => continue,
                    }
                } else {
                    self.map_ino(l.dev, ino)
                };
                out.push(DirEntry { name, ino, fmt });
            }
        }
        let upper_dev = self.upper().map_or(0, |u| u.dev);
        let impure = node.has_upper() && {
            let d = self.upper_dir(node)?;
            sys::getxattr(d.as_fd(), sys::dot(), &self.x.impure)?.is_some()
        };
        let mut merged: Vec<DirEntry> = Vec::with_capacity(upper_names.len() + out.len());
        for (name, ino, fmt) in upper_names {
            // Entries that also exist below, and copied-up or moved ones, carry their origin's
            // inode number: resolve them exactly. Plain upper entries use d_ino.
            let ino = if impure || lower_names.contains(&name) {
                match self.resolve(node, &name) {
                    Ok(f) => {
                        let ino = f.ino;
                        resolved.keep(&name, f);
                        ino
                    }
                    Err(_) => continue,
                }
            } else {
                self.map_ino(upper_dev, ino)
            };
            merged.push(DirEntry { name, ino, fmt });
        }
        merged.extend(out);
        for e in &mut merged {
            self.settle(node.ino, &e.name);
            e.ino = self.known_ino(e.ino);
        }
        Ok((merged, resolved))
    }

    /// True when a lower layer shows `name` in `parent`, so removing it needs a whiteout.
    /// `seen`: what the lookup of the name found, which may know already.
    fn lower_has(&self, parent: &Node, name: &CStr, seen: &Seen) -> Result<bool> {
        if let Some(known) = seen.lower_has {
            return Ok(known);
        }
        if parent.layout().lower_dirs.is_empty() {
            return Ok(false);
        }
        let found = self.lookup_lower(parent, name, None, None)?;
        Ok(found.nondir.is_some() || !found.dirs.is_empty())
    }

    fn is_empty_dir(&self, node: &Arc<Node>) -> Result<bool> {
        Ok(self.check_empty(node)?.is_some())
    }

    /// Whether the merged directory is empty (`list_dir` would list nothing), and if so the
    /// whiteouts its upper holds, which removing it must remove too. Like kernel overlayfs'
    /// `ovl_check_empty_dir`, it reads each layer's directory once and asks nothing about the
    /// names every whiteout hides (an `rm -rf` checks a directory full of them); the first
    /// entry that may be visible ends the scan, and `list_dir` has the last word on it.
    fn check_empty(&self, node: &Arc<Node>) -> Result<Option<Vec<CString>>> {
        let _s = self.stable();
        self.refresh(node);
        let mut seen: HashSet<CString> = HashSet::new();
        let mut whiteouts = Vec::new();
        let decide = || -> Result<Option<Vec<CString>>> {
            // A name the full merge may still hide (by an error resolving it): rare, and
            // only on the way to ENOTEMPTY, so the whiteouts are not gathered.
            Ok(self.list_dir(node)?.is_empty().then(Vec::new))
        };
        if node.has_upper() {
            let d = self.upper_dir(node)?;
            for (name, _, t) in sys::read_dir(d.as_fd())? {
                if (t == libc::DT_CHR || t == libc::DT_UNKNOWN)
                    && sys::is_whiteout(&sys::fstatat(d.as_fd(), &name)?)
                {
                    seen.insert(name.clone());
                    whiteouts.push(name);
                    continue;
                }
                return decide();
            }
        }
        let lay = node.layout();
        for k in 0..lay.lower_dirs.len() {
            let d = self.lower_dir(&lay, k)?;
            for (name, _, t) in sys::read_dir(d.as_fd())? {
                if !seen.insert(name.clone()) {
                    continue;
                }
                if t == libc::DT_CHR || t == libc::DT_REG || t == libc::DT_UNKNOWN {
                    let st = sys::fstatat(d.as_fd(), &name)?;
                    if layer::classify_lower(d.as_fd(), &name, &st, &self.x)? == EntryKind::Whiteout
                    {
                        continue;
                    }
                }
                return decide();
            }
        }
        Ok(Some(whiteouts))
    }

    /// Creates `name` in `parent` for `who`. Returns the new node with one kernel lookup.
    pub fn create_entry(
        &self,
        parent_ino: u64,
        name: &CStr,
        kind: NewKind,
        who: Creator,
    ) -> Result<(Arc<Node>, Attr)> {
        self.make_entry(parent_ino, name, kind, who, None)
            .map(|(n, st, _)| (n, st))
    }

    /// `create_entry`; for a regular file with `open` flags, also the fd that created it, opened
    /// with those flags (a FUSE create needs no second open of the new file).
    pub(super) fn make_entry(
        &self,
        parent_ino: u64,
        name: &CStr,
        mut kind: NewKind,
        who: Creator,
        open: Option<i32>,
    ) -> Result<(Arc<Node>, Attr, Option<OwnedFd>)> {
        let _s = self.stable();
        let parent = self.node(parent_ino)?;
        if !parent.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if name.to_bytes().len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        if let NewKind::Link { target } = &kind {
            // The caller found the target before this hold: bring it up to the stack.
            self.refresh(target);
        }
        match self.resolve(&parent, name) {
            Ok(_) => return Err(Errno::EEXIST),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        if let NewKind::Node { mode, rdev: 0 } = &kind
            && mode & libc::S_IFMT == libc::S_IFCHR
        {
            // A 0/0 character device is a whiteout: the kernel refuses to create one.
            return Err(Errno::EPERM);
        }
        if let NewKind::Link { target } = &kind {
            if target.is_dir() {
                return Err(Errno::EPERM);
            }
            self.copy_up(target, true)?;
        }
        self.copy_up(&parent, true)?;
        let updir = self.upper_dir(&parent)?;
        let pst = sys::fstat(updir.as_fd())?;
        let (uid, gid) = (
            self.cfg.uid_map.to_layer(who.uid),
            self.cfg.gid_map.to_layer(who.gid),
        );
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            gid
        };
        let is_dir = matches!(kind, NewKind::Dir { .. });
        // The umask, or the parent's default ACL (FUSE_DONT_MASK): made in place, the object
        // gets the ACLs from the upper's filesystem; made in the work dir, from us below.
        let inherited = match kind.mode_mut() {
            Some(mode) if self.cfg.acl => {
                let parent_default = match sys::getxattr(updir.as_fd(), c".", acl::DEFAULT) {
                    Ok(v) => v,
                    Err(Errno::EOPNOTSUPP) => None,
                    Err(e) => return Err(e),
                };
                let i = acl::inherit(parent_default.as_deref(), *mode, who.umask, is_dir);
                *mode = i.mode;
                Some(i)
            }
            // `noacl`: the kernel applied the umask.
            _ => None,
        };
        // The name is free in the merged view, so the upper holds nothing there or a whiteout:
        // the object is made in place, and only if that finds something the upper is looked at.
        // Over a whiteout the object is built in the work dir and swapped in atomically.
        let work = self.work()?.root.as_fd();
        let (over_whiteout, dir, tmp, made) =
            match self.make_object(updir.as_fd(), name, &kind, open) {
                Err(Errno::EEXIST) => match sys::fstatat(updir.as_fd(), name) {
                    Ok(st) if sys::is_whiteout(&st) => {
                        let tmp = self.tmp_name();
                        let made = self.make_object(work, &tmp, &kind, open);
                        (true, work, tmp, made)
                    }
                    Ok(_) | Err(Errno::ENOENT) => return Err(Errno::EEXIST),
                    Err(e) => return Err(e),
                },
                made => (false, updir.as_fd(), name.to_owned(), made),
            };
        // Only what this call made is removed on a failure (never a whiteout found there).
        let created = made.is_ok();
        // The object's stat, while nothing changed it since (see `known` below).
        let mut fresh = None;
        let res = made.and_then(|fd| {
            if matches!(kind, NewKind::Link { .. }) {
                return Ok(fd);
            }
            let st = match &fd {
                Some(fd) => sys::fstat(fd.as_fd())?,
                None => sys::fstatat(dir, &tmp)?,
            };
            let chown = st.st_uid != uid || st.st_gid != gid;
            if chown {
                match &fd {
                    Some(fd) => sys::fchown(fd.as_fd(), uid, gid)?,
                    None => sys::fchownat(dir, &tmp, uid, gid)?,
                }
            }
            // The mode is final (umask or default ACL applied above; ours is 0), but set-id
            // rules may have changed it, and chown clears set-id bits: the mode goes on after
            // the owner where it differs.
            let want = match &kind {
                NewKind::File { mode } | NewKind::Node { mode, .. } => Some(*mode & 0o7777),
                NewKind::Dir { mode } => Some(
                    (*mode & 0o7777)
                        | if pst.st_mode & libc::S_ISGID != 0 {
                            libc::S_ISGID
                        } else {
                            0
                        },
                ),
                NewKind::Symlink { .. } | NewKind::Link { .. } => None,
            };
            let chmod = want.is_some_and(|want| chown || st.st_mode & 0o7777 != want);
            if let Some(want) = want
                && chmod
            {
                match &fd {
                    Some(fd) => sys::fchmod(fd.as_fd(), want)?,
                    None => sys::fchmodat(dir, &tmp, want)?,
                }
            }
            if over_whiteout && let Some(i) = &inherited {
                for (key, value) in [(acl::ACCESS, &i.access), (acl::DEFAULT, &i.default)] {
                    if let Some(value) = value {
                        sys::setxattr(dir, &tmp, key, value, 0)?;
                    }
                }
            }
            // Like the kernel: a new directory in a merged directory is opaque, so it never
            // merges with something a lower layer could show under its name.
            let opaque = is_dir && (over_whiteout || !parent.layout().lower_dirs.is_empty());
            if opaque {
                sys::setxattr(dir, &tmp, &self.x.opaque, b"y", 0)?;
            }
            if !(chown || chmod || over_whiteout || opaque) {
                fresh = Some(st);
            }
            Ok(fd)
        });
        let fd = match res {
            Ok(fd) => fd,
            Err(e) => {
                if created {
                    let _ = remove_tree(dir, &tmp);
                }
                return Err(e);
            }
        };
        if over_whiteout {
            let r = if is_dir {
                sys::renameat2(work, &tmp, updir.as_fd(), name, libc::RENAME_EXCHANGE)
                    .and_then(|_| sys::unlinkat(work, &tmp, false))
            } else {
                sys::renameat2(work, &tmp, updir.as_fd(), name, 0)
            };
            if let Err(e) = r {
                let _ = remove_tree(work, &tmp);
                return Err(e);
            }
        }
        // What a lookup would find is known while nothing changed the object since its stat
        // (an attribute or xattr set, or the rename over a whiteout, moves its ctime): a new
        // object in the upper, its own identity (no origin), nothing below it (a parent
        // with lower parts makes a new directory opaque, so that case is not known here).
        let known = fresh.map(|st| Found {
            st,
            ino: self.map_ino(st.st_dev, st.st_ino),
            upper: true,
            lower: None,
            lower_dirs: Vec::new(),
            hardlink: None,
            lower_has: None,
        });
        let (node, mut st, _) = self.lookup_found(&parent, name, known)?;
        if node.hardlink.is_some() && matches!(kind, NewKind::Link { .. }) {
            self.nlink_changed(&node, 1)?;
            st.st_nlink += 1;
        }
        node.add_lookup(1);
        Ok((node, st, fd))
    }

    /// Makes the object of `kind` at `dir`/`name` (nothing else: owner and mode are the
    /// caller's); an error means nothing was made. A regular file with `open` flags comes
    /// with its fd opened with them, if they are plain enough that opening cannot fail once
    /// the file exists (else the caller opens it: e.g. O_DIRECT refused by the upper's
    /// filesystem leaves the empty file, as with kernel overlayfs).
    fn make_object(
        &self,
        dir: BorrowedFd,
        name: &CStr,
        kind: &NewKind,
        open: Option<i32>,
    ) -> Result<Option<OwnedFd>> {
        const PLAIN: i32 =
            libc::O_ACCMODE | libc::O_APPEND | sys::O_LARGEFILE_KERNEL | libc::O_CLOEXEC;
        match kind {
            NewKind::File { mode } => {
                let open = open.filter(|f| f & !PLAIN == 0);
                let flags = open.unwrap_or(libc::O_WRONLY) | libc::O_CREAT | libc::O_EXCL;
                let fd = sys::openat(dir, name, flags, *mode & 0o7777)?;
                return Ok(open.map(|_| fd));
            }
            NewKind::Dir { mode } => sys::mkdirat(dir, name, *mode & 0o7777)?,
            NewKind::Node { mode, rdev } => sys::mknodat(dir, name, *mode, *rdev)?,
            NewKind::Symlink { target } => sys::symlinkat(target, dir, name)?,
            NewKind::Link { target } => {
                let (tdir, tname) = self.locate(target)?;
                sys::linkat(tdir.as_fd(), &tname, dir, name)?;
            }
        }
        Ok(None)
    }

    pub fn unlink(&self, parent_ino: u64, name: &CStr) -> Result<()> {
        self.remove(parent_ino, name, false)
    }

    pub fn rmdir(&self, parent_ino: u64, name: &CStr) -> Result<()> {
        self.remove(parent_ino, name, true)
    }

    fn remove(&self, parent_ino: u64, name: &CStr, want_dir: bool) -> Result<()> {
        let _s = self.stable();
        let parent = self.node(parent_ino)?;
        let (node, _, seen) = self.lookup_seen(&parent, name)?;
        match (want_dir, node.is_dir()) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            _ => {}
        }
        // A directory's upper whiteouts, as the emptiness check found them.
        let whiteouts = if want_dir {
            self.check_empty(&node)?.ok_or(Errno::ENOTEMPTY)?
        } else {
            Vec::new()
        };
        self.upper()?;
        let had_upper = node.has_upper();
        self.keep_other_names(&node)?;
        // A name the upper does not hold comes from a lower layer: no need to look there.
        let whiteout = !seen.upper || self.lower_has(&parent, name, &seen)?;
        self.copy_up(&parent, true)?;
        let updir = self.upper_dir(&parent)?;
        // The lookup saw whether the upper holds the name, unless the node's upper changed
        // since (a copy-up that keeps its other names) or the node's upper object is not
        // under this name (a lower name of an object copied up under another).
        let in_upper = if had_upper == seen.upper && node.has_upper() == had_upper {
            seen.upper
        } else {
            match sys::fstatat(updir.as_fd(), name) {
                Ok(st) => !sys::is_whiteout(&st),
                Err(Errno::ENOENT) => false,
                Err(e) => return Err(e),
            }
        };
        if in_upper {
            if whiteout || want_dir {
                // One rename takes the object out of the view (leaving a whiteout if a lower
                // has the name); a directory's leftover whiteouts are then removed at leisure.
                let work = self.work()?.root.as_fd();
                let tmp = self.tmp_name();
                let flags = if whiteout { libc::RENAME_WHITEOUT } else { 0 };
                // The directory's own fd follows it into the work dir.
                let own = if want_dir {
                    Some(self.upper_dir(&node)?)
                } else {
                    None
                };
                sys::renameat2(updir.as_fd(), name, work, &tmp, flags)?;
                match own {
                    Some(d) => remove_emptied(work, &tmp, d.as_fd(), &whiteouts)?,
                    // The node's type is the object's: no directory.
                    None => sys::unlinkat(work, &tmp, false)?,
                }
            } else {
                sys::unlinkat(updir.as_fd(), name, false)?;
            }
        } else {
            sys::mknodat(updir.as_fd(), name, libc::S_IFCHR, 0)?;
        }
        if self.cfg.acl && (whiteout || !in_upper) {
            strip_inherited_acl(updir.as_fd(), name)?;
        }
        node.unlink_name(&parent, name);
        self.nlink_changed(&node, -1)?;
        Ok(())
    }

    pub fn rename(
        &self,
        parent_ino: u64,
        name: &CStr,
        newparent_ino: u64,
        newname: &CStr,
        flags: u32,
    ) -> Result<()> {
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0 || (exchange && noreplace)
        {
            return Err(Errno::EINVAL);
        }
        let _s = self.stable();
        let p = self.node(parent_ino)?;
        let q = self.node(newparent_ino)?;
        let (s, _, s_seen) = self.lookup_seen(&p, name)?;
        let t = match self.lookup_node(&q, newname) {
            Ok((t, _)) => Some(t),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if noreplace && t.is_some() {
            return Err(Errno::EEXIST);
        }
        if exchange && t.is_none() {
            return Err(Errno::ENOENT);
        }
        if let Some(t) = &t {
            if Arc::ptr_eq(t, &s) {
                return Ok(());
            }
            if !exchange {
                match (s.is_dir(), t.is_dir()) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !self.is_empty_dir(t)? => return Err(Errno::ENOTEMPTY),
                    _ => {}
                }
            }
        }
        self.upper()?;
        let same_place = Arc::ptr_eq(&p, &q) && name == newname;
        if same_place {
            return Ok(());
        }
        self.before_dir_moves(&s)?;
        if exchange && let Some(t) = &t {
            self.before_dir_moves(t)?;
        }
        self.copy_up(&s, true)?;
        self.copy_up(&q, true)?;
        if let Some(t) = &t {
            if exchange {
                self.copy_up(t, true)?;
            } else if t.is_dir() && t.has_upper() {
                self.clear_dir(t)?;
            } else {
                self.keep_other_names(t)?;
            }
        }
        let pdir = self.upper_dir(&p)?;
        let qdir = self.upper_dir(&q)?;
        self.prepare_move(&s, &pdir, name, &q, Arc::ptr_eq(&p, &q))?;
        if exchange && let Some(t) = &t {
            self.prepare_move(t, &qdir, newname, &p, Arc::ptr_eq(&p, &q))?;
        }
        let need_whiteout = !exchange && self.lower_has(&p, name, &s_seen)?;
        let onto_whiteout = t.is_none()
            && sys::fstatat(qdir.as_fd(), newname).is_ok_and(|st| sys::is_whiteout(&st));
        if onto_whiteout {
            // Swap with the whiteout (a directory cannot replace a device node), then keep
            // it at the old name only if a lower layer has that name.
            sys::renameat2(
                pdir.as_fd(),
                name,
                qdir.as_fd(),
                newname,
                libc::RENAME_EXCHANGE,
            )?;
            if !need_whiteout {
                sys::unlinkat(pdir.as_fd(), name, false)?;
            }
        } else {
            let rflags = if exchange {
                libc::RENAME_EXCHANGE
            } else if need_whiteout {
                libc::RENAME_WHITEOUT
            } else {
                0
            };
            sys::renameat2(pdir.as_fd(), name, qdir.as_fd(), newname, rflags)?;
        }
        s.rename_name(&p, name, q.clone(), newname);
        if let Some(t) = t {
            if exchange {
                t.rename_name(&q, newname, p.clone(), name);
            } else {
                t.unlink_name(&q, newname);
                self.nlink_changed(&t, -1)?;
            }
        }
        Ok(())
    }

    /// Before `node` moves from `dir/name` into `dest`: a directory with lower parts gets a
    /// redirect to its lower path; a pure upper directory moving into a merged directory
    /// becomes opaque so it does not merge with what the lower has under the new name.
    fn prepare_move(
        &self,
        node: &Arc<Node>,
        dir: &std::os::fd::OwnedFd,
        name: &CStr,
        dest: &Arc<Node>,
        _same_dir: bool,
    ) -> Result<()> {
        if !node.is_dir() {
            if node.layout().lower.is_some() {
                self.set_impure(dest)?;
            }
            return Ok(());
        }
        match node.layout().lower_dirs.first() {
            Some(lr) => {
                let mut v = b"/".to_vec();
                v.extend_from_slice(lr.path.as_bytes());
                sys::setxattr(dir.as_fd(), name, &self.x.redirect, &v, 0)?;
                self.set_impure(dest)?;
            }
            None => {
                if !dest.layout().lower_dirs.is_empty() {
                    sys::setxattr(dir.as_fd(), name, &self.x.opaque, b"y", 0)?;
                }
            }
        }
        Ok(())
    }

    /// Marks an upper directory as holding entries with origins or redirects (the kernel uses
    /// it to report d_ino consistently).
    fn set_impure(&self, dir: &Arc<Node>) -> Result<()> {
        let path = dir.path().ok_or(Errno::ENOENT)?;
        let (d, n) = self.upper()?.parent_of(&path)?;
        match sys::setxattr(d.as_fd(), &n, &self.x.impure, b"y", 0) {
            Ok(()) | Err(Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Empties the upper of a merged-empty directory (it may still hold whiteouts), so that a
    /// rename can replace it: an empty opaque directory is swapped in atomically.
    fn clear_dir(&self, node: &Arc<Node>) -> Result<()> {
        let path = node.path().ok_or(Errno::ENOENT)?;
        let (pd, name) = self.upper()?.parent_of(&path)?;
        let d = sys::openat(pd.as_fd(), &name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        if sys::read_dir(d.as_fd())?.is_empty() {
            return Ok(());
        }
        let work = self.work()?.root.as_fd();
        let tmp = self.tmp_name();
        let st = sys::fstat(d.as_fd())?;
        sys::mkdirat(work, &tmp, 0o700)?;
        let r = (|| {
            sys::fchownat(work, &tmp, st.st_uid, st.st_gid)?;
            sys::fchmodat(work, &tmp, st.st_mode)?;
            sys::setxattr(work, &tmp, &self.x.opaque, b"y", 0)?;
            sys::renameat2(work, &tmp, pd.as_fd(), &name, libc::RENAME_EXCHANGE)
        })();
        let cleanup = remove_tree(work, &tmp);
        r?;
        cleanup
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::ROOT_INO;

    /// A link that fails (here: its target vanished from the upper behind the mount's back)
    /// onto a name whose lower object was deleted must leave the whiteout: found by review,
    /// the cleanup of a failed in-place creation removed what it found at the name. Needs
    /// root (trusted.* xattrs, whiteout devices).
    #[test]
    fn a_failed_link_over_a_whiteout_keeps_the_whiteout() {
        let t = tempfile::tempdir().unwrap();
        let ov = crate::fs::test_overlay(t.path(), |lower| {
            std::fs::write(lower.join("b"), b"lower b").unwrap();
        });
        let upper = t.path().join("upper");
        let (a, b) = (c"a", c"b");
        ov.unlink(ROOT_INO, b).unwrap();
        assert_eq!(ov.lookup(ROOT_INO, b).err(), Some(Errno::ENOENT));
        let (target, _) = ov
            .create_entry(ROOT_INO, a, NewKind::File { mode: 0o644 }, Creator::ROOT)
            .unwrap();
        std::fs::remove_file(upper.join("a")).unwrap();
        let r = ov.create_entry(ROOT_INO, b, NewKind::Link { target }, Creator::ROOT);
        assert!(r.is_err(), "linked a file that is gone: {r:?}");
        assert_eq!(
            ov.lookup(ROOT_INO, b).err(),
            Some(Errno::ENOENT),
            "the deleted lower file came back"
        );
    }
}
