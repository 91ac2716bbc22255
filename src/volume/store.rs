//! The volume directory: layout, metadata, and the operations that change them.
//!
//! ```text
//! VOL/volume.json              the volume's state (the only source of truth; see below)
//! VOL/lock                     flock(2)ed by whoever may change the volume (a mount, squash)
//! VOL/layers/<epoch>/tree/     the layer itself, in kernel overlay format (+ partial files)
//! VOL/layers/<epoch>/maps/     block maps of the partial files in tree/ (`blockmap`)
//! VOL/layers/<epoch>/manifest.json   written when a frozen layer is sealed (`manifest`)
//! VOL/work/<epoch>/            overlay work dir of the active layer
//! ```
//!
//! A layer that squash rewrote lives in `layers/<epoch>.<16 hex digits>/` instead, recorded in
//! its `LayerRecord::dir`: the new directory is built next to the old one and `volume.json`
//! switches between them in one atomic write (`commit_squash`). Such a `volume.json` is
//! written as format 2.0 so that builds which do not know `dir` refuse it.
//!
//! Why this shape:
//! - Everything about one layer lives under `layers/<epoch>/`, so a layer moves as one
//!   directory: a replica receives it into a staging dir and commits it with one rename, and
//!   squash replaces layers the same way. The tree is a subdirectory, not the epoch dir
//!   itself, so that maps and manifest sit next to it without appearing in the merged view
//!   or in a kernel overlay mount of the tree.
//! - One work dir per epoch: the engine's work dir also holds the hard-link index, whose
//!   entries are links to upper inodes. After a freeze those inodes belong to a frozen layer;
//!   a fresh work dir for the new epoch guarantees no write can reach them through the index.
//! - `volume.json` records the layers (epoch, parent, state, pin) and the active layer. There
//!   is no `active` symlink: two sources of truth could disagree after a crash. Directories
//!   it does not list are not part of the volume (leftovers of a crash; `Volume::verify`
//!   reports them and `freeze_active` reuses an empty one).
//!
//! Crash safety: every change is prepared first (new directories made and fsynced), then
//! committed by atomically replacing `volume.json` (`meta::write_atomic`). A crash leaves
//! either the old state or the new one, plus at most unlisted leftovers that are harmless.
//!
//! Concurrency: `Volume::open` takes an exclusive `flock` on `VOL/lock` for as long as the
//! `Volume` lives; only such a handle can change the volume. `open_read_only` takes no lock,
//! for status and verify while a mount runs (it sees a consistent `volume.json`, since that
//! file is only ever replaced whole).
//!
//! This module never writes into a frozen layer's tree and never deletes a listed layer.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::blockmap::MapStore;
use super::error::{Result, VolumeError, errno_io, io};
use super::import;
use super::manifest::{LayerIdentity, MANIFEST_FILE, Manifest};
use super::meta::{self, Version, crash_point};
use super::scan::{self, LayerLocation, LayerReport, Problem};
use super::{DEFAULT_BLOCK_SIZE, MapId, VolumeId, check_block_size, now_unix_secs};
use crate::sys;

pub const VOLUME_FILE: &str = "volume.json";
pub const VOLUME_FORMAT: &str = "layervol.volume";
pub const VOLUME_VERSION: Version = Version { major: 1, minor: 0 };
/// Written instead of `VOLUME_VERSION` once a layer lives in a directory not named after its
/// epoch (`LayerRecord::dir`, after a squash): a reader that ignored `dir` would stack the
/// wrong directories, so older builds must refuse such a volume instead of misreading it.
pub const VOLUME_VERSION_DIRS: Version = Version { major: 2, minor: 0 };
pub const LOCK_FILE: &str = "lock";
pub const LAYERS_DIR: &str = "layers";
pub const WORK_DIR: &str = "work";
pub const TREE_DIR: &str = "tree";
pub const MAPS_DIR: &str = "maps";
/// Data a crashed mount left in a layer directory `volume.json` never listed (moved aside,
/// never thrown away; see `clear_unlisted_layer`).
pub const LOST_DIR: &str = "lost+found";

/// Whether a layer still takes writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerState {
    /// The writable upper; exactly one, the newest.
    Active,
    /// Read-only forever (a snapshot).
    Frozen,
}

impl fmt::Display for LayerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerState::Active => "active",
            LayerState::Frozen => "frozen",
        })
    }
}

/// One layer as `volume.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub epoch: u64,
    /// The layer directly below, `None` for the bottom one.
    pub parent_epoch: Option<u64>,
    pub state: LayerState,
    /// A pinned layer is kept as a layer: squash must not merge it away (a snapshot a user
    /// asked to keep, or one a replica has not acknowledged). Only frozen layers are pinned.
    #[serde(default)]
    pub pinned: bool,
    pub created_unix_secs: u64,
    #[serde(default)]
    pub frozen_unix_secs: Option<u64>,
    /// The layer's directory under `layers/` when it is not the epoch number: a layer that
    /// squash rewrote lives in `<epoch>.<16 hex digits>`, so that the new directory can be
    /// prepared next to the old one and `volume.json` switches between them atomically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// True if `name` may name the directory of layer `epoch`: the epoch itself, or the epoch, a
/// dot and 16 lowercase hex digits (a layer rewritten by squash). Anything else (a path, `..`)
/// is refused, so `volume.json` can never point outside `layers/`.
pub fn is_layer_dir_name(epoch: u64, name: &str) -> bool {
    let e = epoch.to_string();
    match name.strip_prefix(e.as_str()) {
        Some("") => true,
        Some(rest) => rest.strip_prefix('.').is_some_and(|h| {
            h.len() == 16
                && h.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        }),
        None => false,
    }
}

/// The epoch whose layer directory `name` may be (see `is_layer_dir_name`), if any.
pub fn layer_dir_epoch(name: &str) -> Option<u64> {
    let e = name.split('.').next()?.parse().ok()?;
    is_layer_dir_name(e, name).then_some(e)
}

/// True for the directory of a layer a squash (re)built: `<epoch>.<16 hex>`, listed once
/// the squash commits.
pub fn is_squash_dir_name(name: &str) -> bool {
    name.contains('.') && layer_dir_epoch(name).is_some()
}

/// The namespace of the volume's private xattrs (overlay format and partial-file markers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XattrNamespace {
    /// `trusted.overlay.*`, `trusted.layervol.*`: needs CAP_SYS_ADMIN, like kernel overlayfs.
    Trusted,
    /// `user.overlay.*`, `user.layervol.*`: rootless volumes (kernel `userxattr`).
    User,
}

/// The body of `volume.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VolumeMeta {
    id: VolumeId,
    block_size: u32,
    created_unix_secs: u64,
    xattr_namespace: XattrNamespace,
    /// Oldest first; the last is the active layer.
    layers: Vec<LayerRecord>,
}

/// Options of `Volume::create_with`.
#[derive(Debug, Clone)]
pub struct CreateOptions<'a> {
    /// Block size for dirty tracking and partial files (default 4096). Fixed for the volume's
    /// life.
    pub block_size: u32,
    /// Import this directory as the base layer (epoch 1, frozen and sealed).
    pub from: Option<&'a Path>,
    /// Use `user.*` xattrs for the private ones (rootless volumes).
    pub userxattr: bool,
}

impl Default for CreateOptions<'_> {
    fn default() -> Self {
        CreateOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            from: None,
            userxattr: false,
        }
    }
}

/// What `freeze_active` did.
/// A freeze prepared by `Volume::stage_freeze`, committed by `Volume::commit_freeze`.
#[derive(Debug)]
pub struct StagedFreeze {
    pub frozen_epoch: u64,
    pub active_epoch: u64,
    meta: VolumeMeta,
    staged: meta::Staged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freeze {
    /// The layer that was active and is now frozen.
    pub frozen_epoch: u64,
    /// The new, empty active layer.
    pub active_epoch: u64,
}

/// The result of `Volume::verify`.
#[derive(Debug, Default)]
pub struct VolumeReport {
    /// One report per frozen layer, oldest first.
    pub layers: Vec<LayerReport>,
    /// Entries under `layers/` or `work/` not named after a listed epoch that nothing
    /// accounts for (crash leftovers).
    pub strays: Vec<PathBuf>,
    /// What the next mount removes: the layer directories a committed squash replaced (its
    /// journal names them), an unfinished squash's build, work dirs of older epochs.
    pub leftovers: Vec<PathBuf>,
}

impl VolumeReport {
    /// True if no layer has damage (warnings and strays are not damage).
    pub fn is_sound(&self) -> bool {
        self.layers.iter().all(LayerReport::is_sound)
    }

    /// Every problem with its epoch.
    pub fn problems(&self) -> impl Iterator<Item = (u64, &Problem)> {
        self.layers
            .iter()
            .flat_map(|l| l.problems.iter().map(move |p| (l.epoch, p)))
    }
}

/// An opened volume. See the module doc for the layout and the locking rules.
#[derive(Debug)]
pub struct Volume {
    root: PathBuf,
    meta: VolumeMeta,
    /// The held `flock`; `None` for a read-only handle.
    lock: Option<File>,
}

fn mkdir(p: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(p)
        .map_err(io("create directory", p))
}

fn is_empty_dir(p: &Path) -> Result<bool> {
    Ok(fs::read_dir(p).map_err(io("list", p))?.next().is_none())
}

fn take_lock(root: &Path) -> Result<File> {
    let path = root.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io("open lock file", &path))?;
    // SAFETY: flock on a valid fd.
    let r = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(VolumeError::Locked {
                path: root.to_path_buf(),
            });
        }
        return Err(io("lock", &path)(e));
    }
    Ok(f)
}

impl Volume {
    /// Creates a volume at `path` (a new directory, or an existing empty one) with the given
    /// block size, importing `from` as the base layer if given. See `create_with`.
    pub fn create(path: &Path, block_size: u32, from: Option<&Path>) -> Result<Volume> {
        Volume::create_with(
            path,
            &CreateOptions {
                block_size,
                from,
                ..CreateOptions::default()
            },
        )
    }

    /// Creates a volume. With `from`, the directory is copied faithfully (see `import`) into
    /// frozen, sealed layer 1 and the active layer is 2; without, the active layer is 1 and
    /// the volume is empty. All data is flushed (`syncfs`) before `volume.json` is written,
    /// which is the commit point: a crash before it leaves a directory that is not a volume.
    /// The returned handle holds the volume's lock.
    ///
    /// On failure the target is put back as it was (removed if this call made it, emptied if
    /// it was an empty directory), so the command can simply be retried.
    pub fn create_with(path: &Path, opts: &CreateOptions) -> Result<Volume> {
        let block_size = check_block_size(u64::from(opts.block_size))?;
        let existed = match fs::symlink_metadata(path) {
            Ok(md) if md.is_dir() && is_empty_dir(path)? => true,
            Ok(_) => {
                return Err(VolumeError::TargetNotEmpty {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                mkdir(path, 0o755)?;
                false
            }
            Err(e) => return Err(io("stat", path)(e)),
        };
        let made = Volume::create_in(path, opts, block_size);
        if let Err(e) = &made
            && !meta::is_simulated_crash(e)
        {
            // Best effort: the error being reported matters more than a cleanup failure.
            if existed {
                if let Ok(rd) = fs::read_dir(path) {
                    for ent in rd.flatten() {
                        let p = ent.path();
                        let _ = if p.is_dir() && !p.is_symlink() {
                            fs::remove_dir_all(&p)
                        } else {
                            fs::remove_file(&p)
                        };
                    }
                }
            } else {
                let _ = fs::remove_dir_all(path);
            }
        }
        made
    }

    /// `create_with` after the target directory exists and is empty.
    fn create_in(path: &Path, opts: &CreateOptions, block_size: u32) -> Result<Volume> {
        if let Some(src) = opts.from {
            let s = fs::canonicalize(src).map_err(io("resolve", src))?;
            let d = fs::canonicalize(path).map_err(io("resolve", path))?;
            if !s.is_dir() {
                return Err(VolumeError::Unrepresentable {
                    path: src.to_path_buf(),
                    reason: "it is not a directory".into(),
                });
            }
            if d.starts_with(&s) {
                return Err(VolumeError::Unrepresentable {
                    path: src.to_path_buf(),
                    reason: format!(
                        "the volume {} would be inside the directory it imports; put the volume elsewhere",
                        path.display()
                    ),
                });
            }
        }
        let lock = take_lock(path)?;
        let userxattr = opts.userxattr;
        let now = now_unix_secs();
        let id = VolumeId::random().map_err(io("get random bytes for", path))?;
        mkdir(&path.join(LAYERS_DIR), 0o755)?;
        mkdir(&path.join(WORK_DIR), 0o755)?;
        let mut layers = Vec::new();
        let vol_path = path.to_path_buf();
        let mut vol = Volume {
            root: vol_path,
            meta: VolumeMeta {
                id,
                block_size,
                created_unix_secs: now,
                xattr_namespace: if userxattr {
                    XattrNamespace::User
                } else {
                    XattrNamespace::Trusted
                },
                layers: Vec::new(),
            },
            lock: Some(lock),
        };
        let active = if let Some(src) = opts.from {
            vol.make_layer_dirs(1)?;
            import::import_tree(src, &vol.tree_dir(1), userxattr)?;
            let base = LayerRecord {
                epoch: 1,
                parent_epoch: None,
                state: LayerState::Frozen,
                pinned: false,
                created_unix_secs: now,
                frozen_unix_secs: Some(now),
                dir: None,
            };
            let manifest = Manifest::build(&vol.tree_dir(1), &vol.maps(1), vol.identity(&base))?;
            manifest.write(&vol.layer_dir(1))?;
            layers.push(base);
            vol.make_layer_dirs(2)?;
            import::copy_root_attrs(&vol.tree_dir(1), &vol.tree_dir(2), userxattr)?;
            2
        } else {
            vol.make_layer_dirs(1)?;
            fs::set_permissions(
                vol.tree_dir(1),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .map_err(io("chmod", vol.tree_dir(1)))?;
            1
        };
        mkdir(&vol.work_dir_of(active), 0o700)?;
        layers.push(LayerRecord {
            epoch: active,
            parent_epoch: (active > 1).then_some(active - 1),
            state: LayerState::Active,
            pinned: false,
            created_unix_secs: now,
            frozen_unix_secs: None,
            dir: None,
        });
        let root = File::open(path).map_err(io("open", path))?;
        sys::syncfs(root.as_fd()).map_err(errno_io("flush (syncfs) the filesystem of", path))?;
        let meta = VolumeMeta {
            layers,
            ..vol.meta.clone()
        };
        vol.commit(meta)?;
        Ok(vol)
    }

    /// Opens a volume for changing it (mounting, freezing, pinning, sealing): takes its lock
    /// (`VolumeError::Locked` if another process holds it), validates `volume.json` and the
    /// layout, removes temporaries a crash left behind (`meta::remove_stale_temps`) next to
    /// `volume.json`, manifests and block maps, and finishes a squash that a crash interrupted
    /// after its commit (`squash::finish_pending`).
    pub fn open(path: &Path) -> Result<Volume> {
        if !path.join(VOLUME_FILE).exists() {
            return Err(VolumeError::NotAVolume {
                path: path.to_path_buf(),
            });
        }
        let lock = take_lock(path)?;
        let vol = Volume::load(path, Some(lock))?;
        meta::remove_stale_temps(path)?;
        for l in &vol.meta.layers {
            meta::remove_stale_temps(&vol.layer_dir(l.epoch))?;
            meta::remove_stale_temps(vol.maps(l.epoch).dir())?;
        }
        // A squash that committed but crashed before it finished left work to do (repoint
        // partial files of the active layer, remove the replaced layer directories); it must
        // be done before anything writes to the volume again.
        super::squash::finish_pending(&vol)?;
        Ok(vol)
    }

    /// Opens a volume without its lock, for reading (status, verify, export). Changes through
    /// this handle fail with `VolumeError::ReadOnly`.
    pub fn open_read_only(path: &Path) -> Result<Volume> {
        Volume::load(path, None)
    }

    fn load(path: &Path, lock: Option<File>) -> Result<Volume> {
        let vf = path.join(VOLUME_FILE);
        let bytes = meta::read_optional(&vf)?.ok_or_else(|| VolumeError::NotAVolume {
            path: path.to_path_buf(),
        })?;
        let decode = |major| {
            meta::decode_envelope::<VolumeMeta>(
                &vf,
                &bytes,
                VOLUME_FORMAT,
                "volume metadata",
                major,
            )
        };
        let (meta, _) = match decode(VOLUME_VERSION_DIRS.major) {
            Err(VolumeError::UnsupportedVersion { found, .. })
                if found.split('.').next() == Some(&VOLUME_VERSION.major.to_string()) =>
            {
                decode(VOLUME_VERSION.major)?
            }
            r => r?,
        };
        let vol = Volume {
            root: path.to_path_buf(),
            meta,
            lock,
        };
        vol.validate()?;
        Ok(vol)
    }

    /// Checks the invariants of `volume.json` and that every listed directory exists.
    fn validate(&self) -> Result<()> {
        let bad = |reason: String| VolumeError::Inconsistent {
            path: self.root.clone(),
            reason,
        };
        check_block_size(u64::from(self.meta.block_size))?;
        let layers = &self.meta.layers;
        let Some(last) = layers.last() else {
            return Err(bad("volume.json lists no layer".into()));
        };
        if last.state != LayerState::Active {
            return Err(bad(format!(
                "the newest layer {} is {}, not active",
                last.epoch, last.state
            )));
        }
        let mut prev: Option<u64> = None;
        for l in layers {
            if prev.is_some_and(|p| l.epoch <= p) {
                return Err(bad(format!(
                    "layer epochs are not increasing ({} after {})",
                    l.epoch,
                    prev.unwrap_or(0)
                )));
            }
            if l.parent_epoch != prev {
                return Err(bad(format!(
                    "layer {} names parent {:?} but sits on {:?}",
                    l.epoch, l.parent_epoch, prev
                )));
            }
            if l.epoch != last.epoch && l.state == LayerState::Active {
                return Err(bad(format!(
                    "layer {} is active but is not the newest",
                    l.epoch
                )));
            }
            if l.pinned && l.state != LayerState::Frozen {
                return Err(bad(format!("layer {} is pinned but not frozen", l.epoch)));
            }
            if let Some(d) = &l.dir
                && !is_layer_dir_name(l.epoch, d)
            {
                return Err(bad(format!(
                    "layer {} names the directory {d:?}, which is not `<epoch>` or `<epoch>.<16 hex digits>`",
                    l.epoch
                )));
            }
            for d in [
                self.tree_dir(l.epoch),
                self.maps(l.epoch).dir().to_path_buf(),
            ] {
                if !d.is_dir() {
                    return Err(bad(format!(
                        "layer {} is listed but {} is missing",
                        l.epoch,
                        d.display()
                    )));
                }
            }
            prev = Some(l.epoch);
        }
        // Only a writer uses the work dir. A reader (no lock) may also have read
        // `volume.json` just before a snapshot committed and removed the one it names.
        let work = self.work_dir();
        if self.lock.is_some() && !work.is_dir() {
            return Err(bad(format!("the work dir {} is missing", work.display())));
        }
        Ok(())
    }

    /// Replaces `volume.json` with `new` (the commit point of every change).
    fn commit(&mut self, new: VolumeMeta) -> Result<()> {
        self.stage_meta(&new)?.commit()?;
        self.meta = new;
        Ok(())
    }

    fn stage_meta(&self, new: &VolumeMeta) -> Result<meta::Staged> {
        let version = if new.layers.iter().any(|l| l.dir.is_some()) {
            VOLUME_VERSION_DIRS
        } else {
            VOLUME_VERSION
        };
        let bytes = meta::encode_envelope(VOLUME_FORMAT, version, new, true);
        meta::stage(&self.root, VOLUME_FILE, &bytes)
    }

    pub(crate) fn require_lock(&self, action: &'static str) -> Result<()> {
        if self.lock.is_none() {
            return Err(VolumeError::ReadOnly {
                path: self.root.clone(),
                action,
            });
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn id(&self) -> VolumeId {
        self.meta.id
    }

    pub fn block_size(&self) -> u32 {
        self.meta.block_size
    }

    pub fn created_unix_secs(&self) -> u64 {
        self.meta.created_unix_secs
    }

    pub fn xattr_namespace(&self) -> XattrNamespace {
        self.meta.xattr_namespace
    }

    /// True if the volume's private xattrs are `user.*` (the engine's `userxattr`).
    pub fn userxattr(&self) -> bool {
        self.meta.xattr_namespace == XattrNamespace::User
    }

    pub fn is_read_only(&self) -> bool {
        self.lock.is_none()
    }

    /// All layers, oldest first; the last is the active one.
    pub fn layers(&self) -> &[LayerRecord] {
        &self.meta.layers
    }

    pub fn layer(&self, epoch: u64) -> Option<&LayerRecord> {
        self.meta.layers.iter().find(|l| l.epoch == epoch)
    }

    pub fn active_epoch(&self) -> u64 {
        // `validate` guarantees a last layer and that it is active.
        self.meta.layers.last().map_or(0, |l| l.epoch)
    }

    /// `VOL/layers/<epoch>`: the tree, its maps and its manifest.
    pub fn layer_dir(&self, epoch: u64) -> PathBuf {
        self.root.join(LAYERS_DIR).join(self.layer_dir_name(epoch))
    }

    /// The name of layer `epoch`'s directory under `layers/`: `LayerRecord::dir` if set,
    /// else the epoch number (also for an epoch the volume does not list).
    pub fn layer_dir_name(&self, epoch: u64) -> String {
        self.layer(epoch)
            .and_then(|l| l.dir.clone())
            .unwrap_or_else(|| epoch.to_string())
    }

    /// `VOL/layers/<epoch>/tree`: the layer in kernel overlay format.
    pub fn tree_dir(&self, epoch: u64) -> PathBuf {
        self.layer_dir(epoch).join(TREE_DIR)
    }

    /// The block maps of layer `epoch`.
    pub fn maps(&self, epoch: u64) -> MapStore {
        MapStore::new(self.layer_dir(epoch).join(MAPS_DIR))
    }

    /// Frozen layer trees, newest first: the engine's `lowerdir` order.
    pub fn lower_dirs(&self) -> Vec<PathBuf> {
        self.meta
            .layers
            .iter()
            .rev()
            .filter(|l| l.state == LayerState::Frozen)
            .map(|l| self.tree_dir(l.epoch))
            .collect()
    }

    /// Frozen layers' epochs, newest first (same order as `lower_dirs`).
    pub fn lower_epochs(&self) -> Vec<u64> {
        self.meta
            .layers
            .iter()
            .rev()
            .filter(|l| l.state == LayerState::Frozen)
            .map(|l| l.epoch)
            .collect()
    }

    /// The active layer's tree: the engine's `upperdir`.
    pub fn upper_dir(&self) -> PathBuf {
        self.tree_dir(self.active_epoch())
    }

    /// The active epoch's work dir: the engine's `workdir`.
    pub fn work_dir(&self) -> PathBuf {
        self.work_dir_of(self.active_epoch())
    }

    fn work_dir_of(&self, epoch: u64) -> PathBuf {
        self.root.join(WORK_DIR).join(epoch.to_string())
    }

    fn identity(&self, l: &LayerRecord) -> LayerIdentity {
        LayerIdentity {
            volume_id: self.meta.id,
            epoch: l.epoch,
            parent_epoch: l.parent_epoch,
            block_size: self.meta.block_size,
            userxattr: self.userxattr(),
        }
    }

    fn record(&self, epoch: u64) -> Result<&LayerRecord> {
        self.layer(epoch).ok_or_else(|| VolumeError::NoSuchEpoch {
            path: self.root.clone(),
            epoch,
        })
    }

    fn make_layer_dirs(&self, epoch: u64) -> Result<()> {
        let dir = self.layer_dir(epoch);
        mkdir(&dir, 0o755)?;
        mkdir(&dir.join(TREE_DIR), 0o755)?;
        mkdir(&dir.join(MAPS_DIR), 0o755)?;
        meta::sync_dir(&dir)?;
        meta::sync_dir(&self.root.join(LAYERS_DIR))
    }

    /// Makes room for a new layer `epoch` that `volume.json` does not list: an empty
    /// skeleton left by a crashed freeze is removed. One holding data is what a mount wrote
    /// between a live snapshot's switch and its commit before it died (no fsync of it was
    /// acknowledged: fsyncs wait for the commit), or something put there by hand: it is never
    /// thrown away, but moved to `VOL/lost+found/`, and the freeze goes on.
    fn clear_unlisted_layer(&self, epoch: u64) -> Result<()> {
        let dir = self.layer_dir(epoch);
        if fs::symlink_metadata(&dir).is_err() {
            return Ok(());
        }
        let skeleton = dir.is_dir()
            && fs::read_dir(&dir).map_err(io("list", &dir))?.all(|e| {
                e.is_ok_and(|e| {
                    (e.file_name() == TREE_DIR || e.file_name() == MAPS_DIR)
                        && is_empty_dir(&e.path()).unwrap_or(false)
                })
            });
        if !skeleton {
            let lost = self.root.join(LOST_DIR);
            if !lost.is_dir() {
                mkdir(&lost, 0o700)?;
            }
            let stem = format!("layer-{epoch}.{}", now_unix_secs());
            let to = (0..)
                .map(|n| match n {
                    0 => lost.join(&stem),
                    n => lost.join(format!("{stem}.{n}")),
                })
                .find(|p| !p.exists())
                .expect("an unused name");
            fs::rename(&dir, &to).map_err(io("move aside leftover", &dir))?;
            meta::sync_dir(&lost)?;
            meta::sync_dir(&self.root.join(LAYERS_DIR))?;
            tracing::warn!(
                "{} held data that volume.json does not list (a mount that died during a \
                 snapshot wrote it, unacknowledged); moved to {}",
                dir.display(),
                to.display()
            );
            return Ok(());
        }
        fs::remove_dir_all(&dir).map_err(io("remove leftover", &dir))
    }

    /// Makes the empty directories of the next layer ahead of `freeze_active`, so that a live
    /// snapshot does this (and its fsyncs) before it blocks writers. Idempotent; what it
    /// makes is an unlisted empty skeleton until the freeze commits.
    pub fn prepare_freeze(&self) -> Result<()> {
        self.require_lock("prepare a freeze")?;
        let m = self.active_epoch() + 1;
        if self.freeze_prepared(m)? {
            return Ok(());
        }
        self.clear_unlisted_layer(m)?;
        self.make_layer_dirs(m)?;
        let work = self.work_dir_of(m);
        if work.exists() {
            fs::remove_dir_all(&work).map_err(io("remove leftover", &work))?;
        }
        mkdir(&work, 0o700)?;
        meta::sync_dir(&self.root.join(WORK_DIR))
    }

    /// True if `layers/<m>` is an empty skeleton and `work/<m>` an empty dir, as
    /// `prepare_freeze` leaves them.
    fn freeze_prepared(&self, m: u64) -> Result<bool> {
        let dir = self.layer_dir(m);
        let work = self.work_dir_of(m);
        if !dir.is_dir() || !work.is_dir() || !is_empty_dir(&work).unwrap_or(false) {
            return Ok(false);
        }
        let mut names = Vec::new();
        for e in fs::read_dir(&dir).map_err(io("list", &dir))? {
            let e = e.map_err(io("list", &dir))?;
            if !is_empty_dir(&e.path()).unwrap_or(false) {
                return Ok(false);
            }
            names.push(e.file_name());
        }
        names.sort();
        Ok(names == [MAPS_DIR, TREE_DIR].map(std::ffi::OsString::from))
    }

    /// Freezes the active layer and starts an empty one: the metadata step of a live
    /// snapshot. Prepares `layers/<N+1>` (its root with the attributes of the current upper
    /// root) and `work/<N+1>`, then commits `volume.json` with N frozen and N+1 active.
    ///
    /// The engine must have stopped writes to layer N and flushed its data and block maps
    /// (`MapStore::store` + `sync`) before, and switches its upper and work dir to the new
    /// paths after; the new layer is not sealed here (`seal` reads the whole layer).
    pub fn freeze_active(&mut self) -> Result<Freeze> {
        let staged = self.stage_freeze()?;
        self.set_next_root_attrs()?;
        meta::sync_dir(&self.tree_dir(staged.active_epoch))?;
        self.commit_freeze(staged)
    }

    /// First half of `freeze_active`, before the engine blocks writers: makes layer N+1's
    /// directories (unless `prepare_freeze` did) and writes the next `volume.json` (layer N
    /// frozen, N+1 active) under a temporary name, fsynced. Everything that can fail for
    /// lack of space happens here; dropping the result leaves the volume as it was.
    pub fn stage_freeze(&mut self) -> Result<StagedFreeze> {
        self.require_lock("freeze the active layer")?;
        let n = self.active_epoch();
        let m = n + 1;
        self.prepare_freeze()?;
        let now = now_unix_secs();
        let mut new = self.meta.clone();
        if let Some(l) = new.layers.last_mut() {
            l.state = LayerState::Frozen;
            l.frozen_unix_secs = Some(now);
        }
        new.layers.push(LayerRecord {
            epoch: m,
            parent_epoch: Some(n),
            state: LayerState::Active,
            pinned: false,
            created_unix_secs: now,
            frozen_unix_secs: None,
            dir: None,
        });
        let staged = self.stage_meta(&new)?;
        Ok(StagedFreeze {
            frozen_epoch: n,
            active_epoch: m,
            meta: new,
            staged,
        })
    }

    /// The next layer's root gets the attributes of the active layer's root (as they are
    /// now: under the engine's barrier). Made durable by the flush before `commit_freeze`.
    pub fn set_next_root_attrs(&self) -> Result<()> {
        self.next_root_attrs().copy().map(drop)
    }

    /// `set_next_root_attrs` as a task that does not borrow the volume.
    pub fn next_root_attrs(&self) -> NextRootAttrs {
        let n = self.active_epoch();
        NextRootAttrs {
            cur: self.tree_dir(n),
            next: self.tree_dir(n + 1),
            userxattr: self.userxattr(),
        }
    }

    /// Second half: the atomic switch (a rename and a directory fsync). The engine has
    /// switched to layer N+1 and flushed layer N (data, block maps) and N+1's root before.
    pub fn commit_freeze(&mut self, f: StagedFreeze) -> Result<Freeze> {
        crash_point("freeze:before-commit")?;
        f.staged.commit()?;
        self.meta = f.meta;
        Ok(Freeze {
            frozen_epoch: f.frozen_epoch,
            active_epoch: f.active_epoch,
        })
    }

    /// The metadata step of a squash: in one atomic `volume.json` replacement, frozen layers
    /// `first..=last` become one layer with epoch `last` (parent: `first`'s parent; pin and
    /// times: `last`'s) stored in `layers/<merged_dir>`, and each `(epoch, dir)` of `rewritten`
    /// (a frozen layer outside the range that squash rebuilt) moves to `layers/<dir>`.
    ///
    /// The caller has prepared every new directory completely (tree, maps, manifest) and made
    /// it durable; the old directories stay until the caller removes them after this returns.
    /// A pinned layer may only be the top of the range (its view is kept, under its epoch).
    pub(crate) fn commit_squash(
        &mut self,
        first: u64,
        last: u64,
        merged_dir: &str,
        rewritten: &[(u64, String)],
    ) -> Result<()> {
        self.require_lock("squash layers")?;
        let refuse = |reason: String| VolumeError::SquashRefused {
            path: self.root.clone(),
            reason,
        };
        let lo = self
            .meta
            .layers
            .iter()
            .position(|l| l.epoch == first)
            .ok_or_else(|| refuse(format!("it has no layer {first}")))?;
        let hi = self
            .meta
            .layers
            .iter()
            .position(|l| l.epoch == last)
            .ok_or_else(|| refuse(format!("it has no layer {last}")))?;
        if lo > hi {
            return Err(refuse(format!("layer {first} is above layer {last}")));
        }
        for l in &self.meta.layers[lo..=hi] {
            if l.state != LayerState::Frozen {
                return Err(refuse(format!("layer {} is {}", l.epoch, l.state)));
            }
            if l.pinned && l.epoch != last {
                return Err(refuse(format!(
                    "layer {} is pinned and only the top of a squashed range may be; unpin it or squash up to it",
                    l.epoch
                )));
            }
        }
        let mut dirs = vec![(last, merged_dir.to_string())];
        for (e, d) in rewritten {
            let rec = self.record(*e)?;
            if rec.state != LayerState::Frozen || (first..=last).contains(e) {
                return Err(refuse(format!(
                    "layer {e} cannot be rewritten: it is {} or inside the squashed range",
                    rec.state
                )));
            }
            dirs.push((*e, d.clone()));
        }
        for (e, d) in &dirs {
            if !is_layer_dir_name(*e, d) || self.layer_dir_name(*e) == *d {
                return Err(refuse(format!(
                    "{d:?} is not a fresh directory name for layer {e}"
                )));
            }
            let base = self.root.join(LAYERS_DIR).join(d);
            for sub in [TREE_DIR, MAPS_DIR] {
                if !base.join(sub).is_dir() {
                    return Err(refuse(format!("{} is missing", base.join(sub).display())));
                }
            }
        }
        let mut new = self.meta.clone();
        let top = new.layers[hi].clone();
        let merged = LayerRecord {
            parent_epoch: new.layers[lo].parent_epoch,
            dir: Some(merged_dir.to_string()),
            ..top
        };
        new.layers.splice(lo..=hi, [merged]);
        for (e, d) in rewritten {
            if let Some(l) = new.layers.iter_mut().find(|l| l.epoch == *e) {
                l.dir = Some(d.clone());
            }
        }
        crash_point("squash:before-commit")?;
        self.commit(new)
    }

    /// After a freeze committed: removes the work dir prepared for the epoch that froze,
    /// unless it is `in_use` (the mount's own, kept until it ends): no mount uses it any more
    /// (the next one starts with the active epoch's), and every snapshot would leave one.
    pub fn remove_frozen_work_dir(&self, frozen: u64, in_use: Option<&Path>) -> Result<()> {
        self.require_lock("remove a work dir")?;
        let p = self.work_dir_of(frozen);
        if frozen >= self.active_epoch() || in_use == Some(p.as_path()) {
            return Ok(());
        }
        match fs::remove_dir_all(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io("remove the work dir", &p)(e))
            }
            _ => Ok(()),
        }
    }

    /// Removes work dirs of epochs other than the active one (left by freezes). Call when no
    /// mount uses them: at mount time, or after the engine switched to the new work dir.
    pub fn remove_stale_work_dirs(&self) -> Result<Vec<PathBuf>> {
        self.require_lock("remove stale work dirs")?;
        let active = self.work_dir();
        let base = self.root.join(WORK_DIR);
        let mut removed = Vec::new();
        for e in fs::read_dir(&base).map_err(io("list", &base))? {
            let p = e.map_err(io("list", &base))?.path();
            if p != active {
                fs::remove_dir_all(&p).map_err(io("remove stale work dir", &p))?;
                removed.push(p);
            }
        }
        Ok(removed)
    }

    /// Writes the manifest of frozen layer `epoch` if it has none, and returns it. Reads the
    /// whole layer (CRC of every whole file). Idempotent: an existing valid manifest is
    /// returned unchanged, never rewritten.
    pub fn seal(&self, epoch: u64) -> Result<Manifest> {
        self.require_lock("seal a layer")?;
        let rec = self.record(epoch)?;
        if rec.state != LayerState::Frozen {
            return Err(VolumeError::NotFrozen {
                path: self.root.clone(),
                epoch,
                state: rec.state,
                action: "sealed",
            });
        }
        if let Some(m) = Manifest::load_optional(&self.layer_dir(epoch))? {
            return Ok(m);
        }
        let m = Manifest::build(&self.tree_dir(epoch), &self.maps(epoch), self.identity(rec))?;
        m.write(&self.layer_dir(epoch))?;
        Ok(m)
    }

    /// Frozen layers without a manifest yet (frozen by a snapshot, not sealed before a crash
    /// or unmount), oldest first.
    pub fn unsealed_epochs(&self) -> Vec<u64> {
        self.meta
            .layers
            .iter()
            .filter(|l| l.state == LayerState::Frozen)
            .filter(|l| !self.layer_dir(l.epoch).join(MANIFEST_FILE).exists())
            .map(|l| l.epoch)
            .collect()
    }

    /// Pins frozen layer `epoch` (squash keeps it). No-op if already pinned.
    pub fn pin(&mut self, epoch: u64) -> Result<()> {
        self.set_pinned(epoch, true)
    }

    /// Unpins layer `epoch`. No-op if not pinned.
    pub fn unpin(&mut self, epoch: u64) -> Result<()> {
        self.set_pinned(epoch, false)
    }

    fn set_pinned(&mut self, epoch: u64, pinned: bool) -> Result<()> {
        self.require_lock(if pinned {
            "pin a layer"
        } else {
            "unpin a layer"
        })?;
        let rec = self.record(epoch)?;
        if rec.state != LayerState::Frozen {
            return Err(VolumeError::NotFrozen {
                path: self.root.clone(),
                epoch,
                state: rec.state,
                action: if pinned { "pinned" } else { "unpinned" },
            });
        }
        if rec.pinned == pinned {
            return Ok(());
        }
        let mut new = self.meta.clone();
        for l in &mut new.layers {
            if l.epoch == epoch {
                l.pinned = pinned;
            }
        }
        self.commit(new)
    }

    /// Removes the block maps of frozen layer `epoch` that no file refers to, and returns
    /// their ids. Never on the active layer: there a map is briefly unreferenced during
    /// every block copy-up (the map is stored before the marked file is renamed into place).
    pub fn collect_orphan_maps(&self, epoch: u64) -> Result<Vec<MapId>> {
        self.require_lock("collect orphan block maps")?;
        let rec = self.record(epoch)?;
        if rec.state != LayerState::Frozen {
            return Err(VolumeError::NotFrozen {
                path: self.root.clone(),
                epoch,
                state: rec.state,
                action: "cleaned of orphan block maps",
            });
        }
        let maps = self.maps(epoch);
        let scan = scan::scan_tree(
            &self.tree_dir(epoch),
            &maps,
            self.block_size(),
            self.userxattr(),
            false,
        )?;
        let mut removed = Vec::new();
        for id in maps.list()? {
            if !scan.referenced_maps.contains(&id) {
                maps.remove(id)?;
                removed.push(id);
            }
        }
        if !removed.is_empty() {
            maps.sync()?;
        }
        Ok(removed)
    }

    /// Verifies every frozen layer (manifest, tree, data CRCs, block maps, block CRCs) and
    /// lists unlisted leftovers. Reads all frozen data. Works on a read-only handle.
    pub fn verify(&self) -> Result<VolumeReport> {
        let mut rep = VolumeReport::default();
        for l in self
            .meta
            .layers
            .iter()
            .filter(|l| l.state == LayerState::Frozen)
        {
            let loc = LayerLocation {
                epoch: l.epoch,
                layer_dir: self.layer_dir(l.epoch),
                tree: self.tree_dir(l.epoch),
                maps: self.maps(l.epoch),
            };
            let mut r = scan::verify_layer(&loc, &self.identity(l))?;
            if let Err(e) = super::ctimes::Ctimes::load(&loc.layer_dir) {
                r.problems.push(scan::Problem::CtimesUnreadable {
                    error: e.to_string(),
                });
            }
            rep.layers.push(r);
        }
        // Work dirs of older, listed epochs are not strays: a running mount keeps using the
        // one it started with until `remove_stale_work_dirs` at the next mount.
        let listed_work = |name: &str| {
            name.parse::<u64>()
                .is_ok_and(|e| e.to_string() == name && self.layer(e).is_some())
        };
        let listed_layer = |name: &str| {
            self.meta
                .layers
                .iter()
                .any(|l| self.layer_dir_name(l.epoch) == name)
        };
        let replaced = super::squash::pending_removals(self)?;
        for sub in [LAYERS_DIR, WORK_DIR] {
            let d = self.root.join(sub);
            for e in fs::read_dir(&d).map_err(io("list", &d))? {
                let e = e.map_err(io("list", &d))?;
                let name = e.file_name();
                let name = name.to_string_lossy();
                let (listed, leftover) = if sub == LAYERS_DIR {
                    (
                        listed_layer(&name),
                        replaced.contains(name.as_ref()) || is_squash_dir_name(&name),
                    )
                } else {
                    // That of an older epoch (a squash merged it away; a running mount may
                    // still use it) goes at the next mount; a newer one (a freeze that did
                    // not commit) is reused by the next freeze (see `Volume::freeze_active`).
                    let older = name
                        .parse::<u64>()
                        .is_ok_and(|e| e.to_string() == name && e < self.active_epoch());
                    (listed_work(&name), older)
                };
                if !listed {
                    if leftover {
                        rep.leftovers.push(e.path());
                    } else {
                        rep.strays.push(e.path());
                    }
                }
            }
        }
        rep.strays.sort();
        rep.leftovers.sort();
        Ok(rep)
    }
}

/// Copies the active layer's root attributes to the next layer's root (see
/// `Volume::next_root_attrs`). A freeze copies them before it blocks writers and, under its
/// barrier, again only if the root changed meanwhile.
pub struct NextRootAttrs {
    cur: PathBuf,
    next: PathBuf,
    userxattr: bool,
}

impl NextRootAttrs {
    /// Copies them; returns what they were copied from.
    pub fn copy(&self) -> Result<import::RootStamp> {
        import::copy_root_attrs(&self.cur, &self.next, self.userxattr)
    }

    /// Copies them again unless the active root is still as `copied` describes.
    pub fn refresh(&self, copied: import::RootStamp) -> Result<()> {
        if import::RootStamp::now(&self.cur)? != copied {
            self.copy()?;
        }
        Ok(())
    }
}
