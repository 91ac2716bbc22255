//! On-disk format of a layer: the kernel OverlayFS format.
//!
//! A layer is a plain directory tree. Whiteouts are 0/0 character devices (or, in lowers, a
//! zero-size file carrying `overlay.whiteout`); opaque directories carry `overlay.opaque=y`;
//! renamed directories carry `overlay.redirect`; copied-up objects carry `overlay.origin`, a
//! kernel `struct ovl_fb` naming the lower object. The xattr prefix is `trusted.overlay.` or,
//! with `userxattr`, `user.overlay.`. Everything here must stay readable and writable by kernel
//! overlayfs: an upper written by layervol mounts under `mount -t overlay` with the same view.
//!
//! This module never follows a symlink and never resolves a path outside its layer root.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, Errno, Result, Stat};

/// Names of the overlay private xattrs under the configured prefix.
#[derive(Debug, Clone)]
pub struct XattrNames {
    pub prefix: &'static str,
    pub opaque: CString,
    pub redirect: CString,
    pub origin: CString,
    pub whiteout: CString,
    pub impure: CString,
}

impl XattrNames {
    pub fn new(user: bool) -> Self {
        let prefix = if user {
            "user.overlay."
        } else {
            "trusted.overlay."
        };
        let n = |s: &str| CString::new(format!("{prefix}{s}")).expect("no NUL");
        XattrNames {
            prefix,
            opaque: n("opaque"),
            redirect: n("redirect"),
            origin: n("origin"),
            whiteout: n("whiteout"),
            impure: n("impure"),
        }
    }

    /// True for xattrs in the overlay namespace (`<prefix>` below).
    pub fn is_private(&self, key: &[u8]) -> bool {
        key.starts_with(self.prefix.as_bytes())
    }

    /// The name under which an xattr of the merged view is stored in a layer. Like the kernel
    /// (6.7+), overlay xattrs set by users are escaped: `trusted.overlay.X` is stored as
    /// `trusted.overlay.overlay.X`, so they can never be mistaken for format xattrs.
    pub fn to_layer(&self, key: &CStr) -> CString {
        match key.to_bytes().strip_prefix(self.prefix.as_bytes()) {
            Some(rest) => {
                let mut v = format!("{}overlay.", self.prefix).into_bytes();
                v.extend_from_slice(rest);
                CString::new(v).expect("no NUL")
            }
            None => key.to_owned(),
        }
    }

    /// The name a layer xattr has in the merged view; `None` for the format's own xattrs
    /// (overlay's, and layervol's partial-file markers).
    pub fn to_view(&self, key: &CStr) -> Option<CString> {
        let b = key.to_bytes();
        if b.starts_with(b"trusted.layervol.") || b.starts_with(b"user.layervol.") {
            return None;
        }
        let Some(rest) = b.strip_prefix(self.prefix.as_bytes()) else {
            return Some(key.to_owned());
        };
        let inner = rest.strip_prefix(b"overlay.")?;
        let mut v = self.prefix.as_bytes().to_vec();
        v.extend_from_slice(inner);
        CString::new(v).ok()
    }
}

/// A private, detached clone of the mount `dir` is on, rooted at `dir`
/// (`open_tree(OPEN_TREE_CLONE)`), as kernel overlayfs clones its layers' mounts: what is
/// opened through it keeps only the clone busy, so the caller's mount can be unmounted as
/// soon as `umount` of the layervol mount has returned, even while the daemon is still on
/// its way out (tools that rotate layers unmount the layers' filesystems right away).
/// `None` without the privilege (CAP_SYS_ADMIN) or on kernels before 5.2.
pub fn clone_mount(dir: &Path) -> Option<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes()).ok()?;
    crate::sys::open_tree(
        libc::AT_FDCWD,
        &c,
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
    )
    .ok()
}

/// The id of the mount `path` is on.
pub fn mount_id(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_MNT_ID, &mut stx) };
    (r == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

/// One layer directory, opened once. All access goes through `root`.
#[derive(Debug)]
pub struct Layer {
    pub path: PathBuf,
    pub root: OwnedFd,
    /// A readable fd of the root: `open_by_handle_at` and ioctls refuse O_PATH fds.
    pub root_rd: OwnedFd,
    pub dev: u64,
    /// Names of the multiply-linked non-directories, by inode number (`link_groups`).
    links: std::sync::OnceLock<LinkGroups>,
    /// The UUID of the layer's filesystem, as `origin` puts it in an `overlay.origin`
    /// (asked once: it cannot change while the filesystem is mounted).
    uuid: std::sync::OnceLock<[u8; 16]>,
}

/// Every name of each non-directory with several links in a layer, by inode number.
pub type LinkGroups = std::collections::HashMap<u64, Vec<RelPath>>;

impl Layer {
    pub fn open(path: &Path) -> std::io::Result<Layer> {
        Self::open_in(None, path, path)
    }

    /// Opens `rel` below `dir` (or `rel` itself without `dir`) as the layer known as `path`;
    /// below a mount clone (`clone_mount`) it stays on the clone.
    pub fn open_in(dir: Option<BorrowedFd>, rel: &Path, path: &Path) -> std::io::Result<Layer> {
        let c = CString::new(rel.as_os_str().as_bytes())?;
        let fd = unsafe {
            match dir {
                Some(d) => libc::openat(
                    d.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                ),
                None => libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                ),
            }
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Self::from_root(unsafe { OwnedFd::from_raw_fd(fd) }, path)
    }

    /// A layer read through a private clone of its mount (`clone_mount`), or opened as it is
    /// when no clone can be made.
    pub fn open_cloned(path: &Path) -> std::io::Result<Layer> {
        match clone_mount(path) {
            Some(root) => Self::from_root(root, path),
            None => Self::open(path),
        }
    }

    /// The directory `name` of this layer (made if missing, mode 0700) as a layer of its own,
    /// on the same mount.
    pub fn subdir(&self, name: &CStr) -> std::io::Result<Layer> {
        match sys::mkdirat(self.root.as_fd(), name, 0o700) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let rel = Path::new(std::ffi::OsStr::from_bytes(name.to_bytes()));
        Self::open_in(Some(self.root.as_fd()), rel, &self.path.join(rel))
    }

    fn from_root(root: OwnedFd, path: &Path) -> std::io::Result<Layer> {
        let st = sys::fstat(root.as_fd())?;
        let root_rd = sys::openat(
            root.as_fd(),
            sys::dot(),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        Ok(Layer {
            path: path.to_path_buf(),
            root,
            root_rd,
            dev: st.st_dev,
            links: std::sync::OnceLock::new(),
            uuid: std::sync::OnceLock::new(),
        })
    }

    /// The names of every multiply-linked non-directory of the layer, found by one walk of
    /// the whole tree on first use and kept: call it only on layers nothing writes to (the
    /// lower layers). Directories that cannot be read are skipped.
    pub fn link_groups(&self) -> &LinkGroups {
        self.links.get_or_init(|| {
            let mut groups = LinkGroups::new();
            let started = std::time::Instant::now();
            collect_links(self.root.as_fd(), &RelPath::root(), &mut groups);
            groups.retain(|_, names| names.len() > 1);
            tracing::debug!(
                layer = %self.path.display(),
                inodes = groups.len(),
                ms = started.elapsed().as_millis() as u64,
                "hard-link groups of a layer"
            );
            groups
        })
    }

    /// Opens directory `rel` (layer-relative, `/`-separated, "" for the root).
    pub fn dir(&self, rel: &RelPath) -> Result<OwnedFd> {
        sys::open_dir_in_root(self.root.as_fd(), rel.as_cstr())
    }

    /// The directory holding `rel` and the last component of `rel` (`.` for the root).
    pub fn parent_of(&self, rel: &RelPath) -> Result<(OwnedFd, CString)> {
        match rel.split_last() {
            None => Ok((self.dir(rel)?, sys::dot().to_owned())),
            Some((parent, name)) => Ok((self.dir(&parent)?, name)),
        }
    }

    /// `encode_origin` of `dir/name`, an object of this layer.
    pub fn origin(&self, dir: BorrowedFd, name: &CStr) -> Result<Vec<u8>> {
        encode_origin_in(dir, name, || {
            *self
                .uuid
                .get_or_init(|| fs_uuid(self.root_rd.as_fd()).unwrap_or([0; 16]))
        })
    }

    pub fn stat(&self, rel: &RelPath) -> Result<Stat> {
        let (d, n) = self.parent_of(rel)?;
        sys::fstatat(d.as_fd(), &n)
    }
}

fn collect_links(dir: BorrowedFd, rel: &RelPath, groups: &mut LinkGroups) {
    let Ok(entries) = sys::read_dir(dir) else {
        return;
    };
    for (name, _, dtype) in entries {
        let st = match dtype {
            libc::DT_DIR => None,
            _ => match sys::fstatat(dir, &name) {
                Ok(st) => Some(st),
                Err(_) => continue,
            },
        };
        match st {
            Some(st) if !sys::is_dir(&st) => {
                if st.st_nlink > 1 {
                    groups.entry(st.st_ino).or_default().push(rel.join(&name));
                }
            }
            _ => {
                let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
                if let Ok(d) = sys::openat(dir, &name, flags, 0) {
                    collect_links(d.as_fd(), &rel.join(&name), groups);
                }
            }
        }
    }
}

/// A path relative to a layer root: components joined by `/`, no leading `/`, "" for the root.
/// Built only from names the kernel gave us or that we read from a layer, never from `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RelPath(CString);

impl RelPath {
    pub fn root() -> Self {
        RelPath(CString::default())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn join(&self, name: &CStr) -> Self {
        if self.is_root() {
            return RelPath(name.to_owned());
        }
        let mut v = self.0.as_bytes().to_vec();
        v.push(b'/');
        v.extend_from_slice(name.to_bytes());
        RelPath(CString::new(v).expect("no NUL"))
    }

    pub fn split_last(&self) -> Option<(RelPath, CString)> {
        if self.is_root() {
            return None;
        }
        let b = self.0.as_bytes();
        Some(match b.iter().rposition(|c| *c == b'/') {
            Some(i) => (
                RelPath(CString::new(&b[..i]).expect("no NUL")),
                CString::new(&b[i + 1..]).expect("no NUL"),
            ),
            None => (RelPath::root(), self.0.clone()),
        })
    }

    pub fn as_cstr(&self) -> &CStr {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Parses an absolute redirect (`/a/b`) into a layer path, refusing `.`/`..` components.
    pub fn from_redirect(abs: &[u8]) -> Option<RelPath> {
        let trimmed = abs.strip_prefix(b"/")?;
        let mut out = RelPath::root();
        for comp in trimmed.split(|c| *c == b'/').filter(|c| !c.is_empty()) {
            if comp == b"." || comp == b".." || comp.contains(&0) {
                return None;
            }
            out = out.join(&CString::new(comp).ok()?);
        }
        Some(out)
    }
}

/// What an entry in one layer means for the merged view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Whiteout,
    Dir,
    Other,
}

pub fn classify(st: &Stat) -> EntryKind {
    if sys::is_whiteout(st) {
        EntryKind::Whiteout
    } else if sys::is_dir(st) {
        EntryKind::Dir
    } else {
        EntryKind::Other
    }
}

/// Like `classify`, but also recognises xattr whiteouts (zero-size regular files carrying
/// `overlay.whiteout`), which the kernel reads in lower layers.
pub fn classify_lower(
    dir: BorrowedFd,
    name: &CStr,
    st: &Stat,
    x: &XattrNames,
) -> Result<EntryKind> {
    let k = classify(st);
    if k == EntryKind::Other
        && st.st_mode & libc::S_IFMT == libc::S_IFREG
        && st.st_size == 0
        && sys::getxattr(dir, name, &x.whiteout)?.is_some()
    {
        return Ok(EntryKind::Whiteout);
    }
    Ok(k)
}

pub fn is_opaque(dir: BorrowedFd, name: &CStr, x: &XattrNames) -> Result<bool> {
    Ok(matches!(
        sys::getxattr(dir, name, &x.opaque)?.as_deref(),
        Some(b"y")
    ))
}

/// The redirect of a directory, resolved to a layer path. A relative redirect names a sibling
/// in the same parent (`parent` is the path this directory was found under).
pub fn redirect(
    dir: BorrowedFd,
    name: &CStr,
    parent: &RelPath,
    x: &XattrNames,
) -> Result<Option<RelPath>> {
    let Some(v) = sys::getxattr(dir, name, &x.redirect)? else {
        return Ok(None);
    };
    if v.starts_with(b"/") {
        return Ok(RelPath::from_redirect(&v));
    }
    Ok(relative_redirect_name(&v).map(|n| parent.join(&n)))
}

/// The new name a relative redirect (a plain name) gives; `None` if the value is not one.
pub fn relative_redirect_name(v: &[u8]) -> Option<CString> {
    if v.is_empty() || v.contains(&b'/') || v == b"." || v == b".." || v.contains(&0) {
        return None;
    }
    CString::new(v).ok()
}

/// Kernel `struct ovl_fb` header: version, magic, len, flags, type, uuid[16], then the handle.
const OVL_FB_HEADER: usize = 21;
const OVL_FH_MAGIC: u8 = 0xfb;

/// Encodes the identity of a lower object as the kernel's `overlay.origin` value.
pub fn encode_origin(dir: BorrowedFd, name: &CStr, layer_root: BorrowedFd) -> Result<Vec<u8>> {
    encode_origin_in(dir, name, || fs_uuid(layer_root).unwrap_or([0; 16]))
}

/// `encode_origin`, with the UUID of the object's filesystem from `uuid` (asked only once
/// the handle is made).
fn encode_origin_in(
    dir: BorrowedFd,
    name: &CStr,
    uuid: impl FnOnce() -> [u8; 16],
) -> Result<Vec<u8>> {
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        data: [u8; 128],
    }
    let mut h = Handle {
        bytes: 128,
        kind: 0,
        data: [0; 128],
    };
    let mut mount_id = 0;
    let r = unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            name.as_ptr(),
            (&mut h as *mut Handle).cast(),
            &mut mount_id,
            0,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    let uuid = uuid();
    let n = h.bytes as usize;
    let mut out = Vec::with_capacity(OVL_FB_HEADER + n);
    out.push(0); // version
    out.push(OVL_FH_MAGIC);
    out.push((OVL_FB_HEADER + n) as u8);
    out.push(if cfg!(target_endian = "big") { 1 } else { 0 });
    out.push(h.kind as u8);
    out.extend_from_slice(&uuid);
    out.extend_from_slice(&h.data[..n]);
    Ok(out)
}

/// Opens (O_PATH) the object an `overlay.origin` value names, through any fd on its filesystem.
pub fn decode_origin(fb: &[u8], mount_fd: BorrowedFd) -> Result<OwnedFd> {
    open_by_fb(fb, mount_fd, libc::O_PATH)
}

/// Opens the object a `struct ovl_fb` names with `flags` (e.g. O_RDONLY to read it).
pub fn open_by_fb(fb: &[u8], mount_fd: BorrowedFd, flags: i32) -> Result<OwnedFd> {
    if fb.len() < OVL_FB_HEADER || fb[1] != OVL_FH_MAGIC || fb[2] as usize != fb.len() {
        return Err(Errno::EINVAL);
    }
    let data = &fb[OVL_FB_HEADER..];
    let mut buf = vec![0u8; 8 + data.len()];
    buf[..4].copy_from_slice(&(data.len() as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&(fb[4] as i32).to_ne_bytes());
    buf[8..].copy_from_slice(data);
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            flags | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The filesystem UUID (`FS_IOC_GETFSUUID`), as the kernel stores it in `ovl_fb.uuid`.
fn fs_uuid(f: BorrowedFd) -> Option<[u8; 16]> {
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    let mut u = FsUuid2 {
        len: 16,
        uuid: [0; 16],
    };
    // _IOR(0x15, 0, struct fsuuid2)
    const FS_IOC_GETFSUUID: libc::c_ulong = 0x8011_1500;
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFSUUID, &mut u) };
    (r == 0 && u.len == 16).then_some(u.uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relpath_join_split() {
        let p = RelPath::root().join(c"a").join(c"b");
        assert_eq!(p.as_bytes(), b"a/b");
        let (parent, name) = p.split_last().unwrap();
        assert_eq!(parent.as_bytes(), b"a");
        assert_eq!(name.as_bytes(), b"b");
        assert!(RelPath::root().split_last().is_none());
    }

    #[test]
    fn redirect_refuses_dotdot() {
        assert!(RelPath::from_redirect(b"/a/../b").is_none());
        assert!(RelPath::from_redirect(b"a").is_none());
        assert_eq!(
            RelPath::from_redirect(b"/a//b/").unwrap().as_bytes(),
            b"a/b"
        );
    }

    #[test]
    fn private_xattrs_are_escaped() {
        let x = XattrNames::new(false);
        assert!(x.is_private(b"trusted.overlay.opaque"));
        assert!(!x.is_private(b"user.overlay.opaque"));
        assert!(XattrNames::new(true).is_private(b"user.overlay.opaque"));
        assert_eq!(
            x.to_layer(c"trusted.overlay.opaque").as_bytes(),
            b"trusted.overlay.overlay.opaque"
        );
        assert_eq!(x.to_layer(c"user.a").as_bytes(), b"user.a");
        assert_eq!(
            x.to_view(c"trusted.overlay.overlay.opaque")
                .unwrap()
                .as_bytes(),
            b"trusted.overlay.opaque"
        );
        assert!(x.to_view(c"trusted.overlay.origin").is_none());
        assert_eq!(x.to_view(c"user.a").unwrap().as_bytes(), b"user.a");
    }
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    /// The origin we write must name the same object when decoded (needs root for
    /// open_by_handle_at).
    #[test]
    fn origin_roundtrip() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let l = Layer::open(t.path()).unwrap();
        let fb = encode_origin(l.root.as_fd(), c"f", l.root_rd.as_fd()).unwrap();
        assert_eq!(fb[2] as usize, fb.len());
        let fd = decode_origin(&fb, l.root_rd.as_fd()).unwrap();
        let st = sys::fstat(fd.as_fd()).unwrap();
        let want = std::fs::metadata(t.path().join("f")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(st.st_ino, want.ino());
    }
}
