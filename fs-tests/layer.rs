//! A small builder for lower layers.
//!
//! A [`Layer`] is a list of entries (paths relative to the layer root) that is materialised
//! twice per scenario, once for each mount, so that both mounts start from byte-identical
//! layers. Besides ordinary files it can express the OverlayFS on-disk vocabulary directly:
//! whiteouts (0/0 character devices), opaque directories (`trusted.overlay.opaque=y`), xattr
//! whiteouts (`trusted.overlay.whiteout` inside an `opaque=x` directory) and redirects.
//!
//! Timestamps: after everything is created, every path of the layer gets a fixed, distinct
//! mtime/atime far in the past (see [`FIXED_TIME_BASE`]), so that "copy-up preserves
//! times" is observable and deterministic, and so that "a time the filesystem set to now"
//! can be told apart from "a time that came from a layer or from a utimens call".

use std::path::Path;

use crate::sys;

/// Every timestamp set by the builder (or by a scenario's utimens) lies below this value;
/// any time at or above [`crate::observe::RECENT_THRESHOLD`] is "now-ish".
pub const FIXED_TIME_BASE: i64 = 1_000_000_000;

#[derive(Clone, Debug)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    HardLink(String),
    Fifo,
    Socket,
    CharDev(u32, u32),
    Whiteout,
}

#[derive(Clone, Debug)]
struct Entry {
    path: String,
    kind: Kind,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Description of one lower layer.
#[derive(Clone, Debug, Default)]
pub struct Layer {
    entries: Vec<Entry>,
}

impl Layer {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(mut self, path: &str, kind: Kind) -> Self {
        assert!(
            !path.starts_with('/') && !path.is_empty(),
            "layer paths are relative: {path:?}"
        );
        self.entries.push(Entry {
            path: path.to_string(),
            kind,
            mode: None,
            owner: None,
            xattrs: Vec::new(),
        });
        self
    }

    /// The last entry declared at `path`; an implicit parent directory of a declared entry
    /// is declared on demand (so that its mode, owner or xattrs can be set).
    fn entry(&mut self, path: &str) -> &mut Entry {
        if !self.entries.iter().any(|e| e.path == path) {
            let prefix = format!("{path}/");
            assert!(
                self.entries.iter().any(|e| e.path.starts_with(&prefix)),
                "layer has no entry {path:?} (declare it first)"
            );
            *self = std::mem::take(self).dir(path);
        }
        self.entries
            .iter_mut()
            .rev()
            .find(|e| e.path == path)
            .expect("just declared")
    }

    /// A directory (parents are created implicitly with mode 0755).
    pub fn dir(self, path: &str) -> Self {
        self.push(path, Kind::Dir)
    }

    pub fn file(self, path: &str, contents: impl AsRef<[u8]>) -> Self {
        self.push(path, Kind::File(contents.as_ref().to_vec()))
    }

    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.push(path, Kind::Symlink(target.to_string()))
    }

    /// A hard link `path` to the already declared `existing` of the same layer.
    pub fn hardlink(self, path: &str, existing: &str) -> Self {
        self.push(path, Kind::HardLink(existing.to_string()))
    }

    pub fn fifo(self, path: &str) -> Self {
        self.push(path, Kind::Fifo)
    }

    pub fn socket(self, path: &str) -> Self {
        self.push(path, Kind::Socket)
    }

    pub fn chardev(self, path: &str, major: u32, minor: u32) -> Self {
        self.push(path, Kind::CharDev(major, minor))
    }

    /// A whiteout: a 0/0 character device hiding `path` in the layers below.
    pub fn whiteout(self, path: &str) -> Self {
        self.push(path, Kind::Whiteout)
    }

    /// An xattr whiteout: an empty file carrying `trusted.overlay.whiteout`; the kernel only
    /// honours it when the parent directory is marked `trusted.overlay.opaque=x`, which this
    /// call does not do (see [`Layer::xwhiteout_parent`]).
    pub fn xwhiteout(self, path: &str) -> Self {
        self.file(path, "")
            .xattr(path, "trusted.overlay.whiteout", "")
    }

    /// Marks an already declared directory as "may contain xattr whiteouts" (`opaque=x`).
    pub fn xwhiteout_parent(self, path: &str) -> Self {
        self.xattr(path, "trusted.overlay.opaque", "x")
    }

    /// An opaque directory (`trusted.overlay.opaque=y`): hides everything below it.
    pub fn opaque_dir(self, path: &str) -> Self {
        self.dir(path).xattr(path, "trusted.overlay.opaque", "y")
    }

    /// Sets `trusted.overlay.redirect` on an already declared directory.
    pub fn redirect(self, path: &str, target: &str) -> Self {
        self.xattr(path, "trusted.overlay.redirect", target)
    }

    pub fn xattr(mut self, path: &str, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.entry(path)
            .xattrs
            .push((name.to_string(), value.as_ref().to_vec()));
        self
    }

    pub fn mode(mut self, path: &str, mode: u32) -> Self {
        self.entry(path).mode = Some(mode);
        self
    }

    pub fn owner(mut self, path: &str, uid: u32, gid: u32) -> Self {
        self.entry(path).owner = Some((uid, gid));
        self
    }

    /// Materialises the layer into the (existing, empty) directory `root`. `index` (the
    /// position of the layer in the stack) only seeds the fixed timestamps.
    pub fn build(&self, root: &Path, index: usize) -> Result<(), String> {
        for e in &self.entries {
            build_entry(root, e)
                .map_err(|err| format!("building layer entry {:?}: {err}", e.path))?;
        }
        set_fixed_times(root, index)
    }
}

fn build_entry(root: &Path, e: &Entry) -> Result<(), String> {
    let p = root.join(&e.path);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|err| err.to_string())?;
    }
    let err = |x: sys::Errno| format!("{x}");
    match &e.kind {
        Kind::Dir => match sys::mkdir(&p, 0o755) {
            Ok(()) | Err(sys::Errno::EEXIST) => {}
            Err(x) => return Err(err(x)),
        },
        Kind::File(data) => std::fs::write(&p, data).map_err(|x| x.to_string())?,
        Kind::Symlink(target) => sys::symlink(target, &p).map_err(err)?,
        Kind::HardLink(existing) => sys::link(&root.join(existing), &p).map_err(err)?,
        Kind::Fifo => sys::mknod(&p, libc::S_IFIFO | 0o644, 0).map_err(err)?,
        Kind::Socket => sys::mknod(&p, libc::S_IFSOCK | 0o755, 0).map_err(err)?,
        Kind::CharDev(ma, mi) => {
            sys::mknod(&p, libc::S_IFCHR | 0o644, sys::makedev(*ma, *mi)).map_err(err)?
        }
        Kind::Whiteout => sys::mknod(&p, libc::S_IFCHR, sys::makedev(0, 0)).map_err(err)?,
    }
    let is_symlink = matches!(e.kind, Kind::Symlink(_));
    if !is_symlink && !matches!(e.kind, Kind::Whiteout | Kind::HardLink(_)) {
        let default = if matches!(e.kind, Kind::Dir) {
            0o755
        } else {
            0o644
        };
        sys::chmod(&p, e.mode.unwrap_or(default)).map_err(err)?;
    } else if let Some(m) = e.mode {
        sys::chmod(&p, m).map_err(err)?;
    }
    for (name, value) in &e.xattrs {
        sys::lsetxattr(&p, name, value, 0).map_err(|x| format!("setxattr {name}: {x}"))?;
    }
    if let Some((uid, gid)) = e.owner {
        sys::lchown(&p, uid, gid).map_err(err)?;
    }
    Ok(())
}

/// Gives every path of the layer (root included) a distinct fixed atime/mtime.
fn set_fixed_times(root: &Path, index: usize) -> Result<(), String> {
    let mut paths = Vec::new();
    collect_paths(root, &mut paths).map_err(|e| format!("walking layer: {e}"))?;
    paths.sort();
    for (i, p) in paths.iter().enumerate() {
        let sec = FIXED_TIME_BASE + (index as i64) * 100_000 + (i as i64) * 10;
        let t = (sec, ((i as i64) * 1_001) % 1_000_000_000);
        sys::lutimens(p, t, t).map_err(|e| format!("utimens {}: {e}", p.display()))?;
    }
    Ok(())
}

fn collect_paths(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    out.push(dir.to_path_buf());
    for ent in std::fs::read_dir(dir)? {
        let ent = ent?;
        if ent.file_type()?.is_dir() {
            collect_paths(&ent.path(), out)?;
        } else {
            out.push(ent.path());
        }
    }
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift), for large files.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
