//! Squash and export: merging frozen layers into one, and writing the merged view out.
//!
//! Owns three operations on a volume that no mount uses (the caller holds the volume lock):
//!
//! - **Squash** (`squash_offline`, `squash`): frozen layers `first..=last` become one frozen
//!   layer with epoch `last`, built next to them in `layers/<last>.<16 hex>` and switched in
//!   by one atomic `volume.json` replacement (`Volume::commit_squash`). The merged view of
//!   the volume is the same before and after.
//! - **Export** (`export`, `export_frozen`): the merged view written as a plain directory
//!   tree: no whiteouts, no overlay or layervol format xattrs, no partial files.
//! - **Kernel-compatible squash** (`SquashOptions::kernel_compatible`): afterwards no layer
//!   of the volume holds a partial file, so `mount -t overlay -o lowerdir=<frozen trees,
//!   newest first>,upperdir=<active tree>,workdir=<empty dir>` shows the volume's view.
//!
//! # Semantics of the merge
//!
//! Lookups in the range follow kernel overlayfs (`ovl_lookup`): the topmost entry of a name
//! wins; a whiteout (0/0 char device, or an `overlay.whiteout` file as the engine reads them)
//! deletes it; a non-directory hides everything below; a directory merges with directories
//! of the same name below until an opaque one (`overlay.opaque=y`), a non-directory or a
//! whiteout stops it; a redirect (`overlay.redirect`) makes the lookup continue below at
//! another name (relative: in the parent's lower directories) or path (absolute: from the
//! layer roots, even out of an opaque parent). The merged layer then holds, per name, what
//! the range shows, and tells the layers below the range exactly what the range told them:
//!
//! - a whiteout is kept where the lookup would otherwise continue below the range, dropped
//!   when the range includes the bottom layer or its directory is opaque in the result;
//! - a merged directory is opaque where the range stopped the lookup, and carries a
//!   redirect where the range redirected it and the lookup continues below (relative if it
//!   was a relative rename, absolute otherwise); at the bottom it carries neither;
//! - a partial file (see `blockmap`) whose data chain ends inside the range, or any partial
//!   file when the range includes the bottom layer (or `kernel_compatible`), becomes a whole
//!   file; one whose chain continues below the range stays partial with the merged map:
//!   present blocks = union of the present blocks of its levels in the range (their content
//!   assembled through the chain), below limit = the smallest below limit among them,
//!   `layervol.below` = the handle of the first level below the range. A partial file whose
//!   chain leaves the range right below it is taken over unchanged.
//!
//! The data below a partial file is found through its `layervol.below` file handle, exactly
//! as the engine reads it (`open_by_handle_at`, hence CAP_DAC_READ_SEARCH, i.e. root). A
//! partial file without `below` reads zeros below its present blocks, as in the engine.
//!
//! Everything else is taken over by **hard link** into the merged layer: whole files,
//! symlinks, devices, fifos, sockets keep their inode (no data is copied, and hard links of a
//! layer stay hard links); owners, modes, times and xattrs come with the inode. Directories
//! are new inodes with the attributes of the topmost directory; assembled files are new
//! inodes with the attributes of their topmost level (minus layervol's markers). A link that
//! the filesystem refuses (EMLINK, EPERM) falls back to a copy.
//!
//! Each new layer is sealed as it is built: its manifest is made during the walk, the data
//! CRC of a file taken over by link coming from its old layer's manifest (the data is not
//! read again, and damage since that seal stays detectable), the others' from the bytes
//! written. It is exactly what `Manifest::build` would compute (tests check it).
//!
//! # Handles from above, and crash safety
//!
//! Partial files above the range name their data by file handle. A handle to an object that
//! keeps its inode (hard-linked) stays valid; one to an object the squash re-created (an
//! assembled or merged partial file) must be repointed to its successor. Frozen layers above
//! the range are never written: one holding such a partial file is rebuilt like a one-layer
//! squash (`layers/<epoch>.<16 hex>`, everything hard-linked but the repointed partial
//! files) and switched in by the same commit. The active layer is writable and is repointed
//! in place after the commit.
//!
//! Order: (1) build every new layer directory completely, with its manifest, and a journal
//! (`squash-pending.json` in the merged layer's directory: old directories to remove, handles
//! to repoint); (2) `syncfs`; (3) commit `volume.json` (the single commit point); (4) repoint
//! the active layer's partial files, `syncfs`; (5) remove the old directories; (6) remove the
//! journal. A crash before (3) leaves the old volume and unlisted new directories, which the
//! next `Volume::open` removes. A crash after (3) leaves the new volume, whose journal is live (its
//! directory is listed): `Volume::open` finishes (4)-(6) before anything else touches the
//! volume (`finish_pending`). Until then the old directories still exist, so every handle
//! still resolves and the view is right at every instant.
//!
//! What this module never does: write into a listed frozen layer's directory (new layers are
//! built beside the old ones), delete a directory `volume.json` lists, follow a symlink in a
//! layer, or leave the view of the volume different from what it was.
//!
//! Not implemented: kernel `metacopy` files (`overlay.metacopy`; the engine writes partial
//! files instead) are taken over like whole files; `index=on` state in work dirs is ignored
//! (the engine runs volumes with `index=off`). `st_ino` of directories and of assembled
//! files changes across a squash (new inodes); files taken over by link keep theirs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::blockmap::{self, BlockMap, MapStore};
use super::ctimes::Ctimes;
use super::error::{Result, VolumeError, errno_io, io};
use super::extents::ExtentSet;
use super::import::open_dir;
use super::manifest::{Entry, EntryKind, LayerPath, Manifest};
use super::meta::{self, Version, crash_point};
use super::scan;
use super::store::{
    LAYERS_DIR, LayerState, MAPS_DIR, TREE_DIR, Volume, is_squash_dir_name, layer_dir_epoch,
};
use super::{MapId, now_unix_secs};
use crate::fs::acl;
use crate::layer::{self, EntryKind as LKind, RelPath, XattrNames};
use crate::sys::{self, Errno, Stat};

/// The xattr naming (as a kernel `struct ovl_fb`) the file a partial file was copied from.
pub const BELOW_TRUSTED: &CStr = c"trusted.layervol.below";
pub const BELOW_USER: &CStr = c"user.layervol.below";

/// The `layervol.below` xattr name for a volume's namespace.
pub fn below_xattr(userxattr: bool) -> &'static CStr {
    if userxattr { BELOW_USER } else { BELOW_TRUSTED }
}

/// The journal of a committed squash, in the merged layer's directory.
pub const JOURNAL_FILE: &str = "squash-pending.json";
const JOURNAL_FORMAT: &str = "layervol.squash-journal";
const JOURNAL_VERSION: Version = Version { major: 1, minor: 0 };

/// Data is assembled and copied in pieces of this size.
const CHUNK: u64 = 1 << 20;
/// Longest chain of partial files followed (the engine's limit too).
const MAX_CHAIN: usize = 4096;

/// What to squash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SquashOptions {
    /// The lowest layer of the range; `None`: the bottom layer of the volume.
    pub from: Option<u64>,
    /// The highest layer of the range (it gives the merged layer its epoch); `None`: the
    /// newest frozen layer, or the first pinned layer at or above `from` if there is one.
    pub through: Option<u64>,
    /// Leave no partial file anywhere in the volume: assemble them in the merged layer, in
    /// every other frozen layer (rebuilt) and in the active layer (in place, view-neutral),
    /// so that kernel overlayfs can mount the layer trees.
    pub kernel_compatible: bool,
}

/// What a squash did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SquashStats {
    /// Epoch of the merged layer (0 if there was nothing to do).
    pub epoch: u64,
    /// The layers merged, oldest first.
    pub merged_epochs: Vec<u64>,
    /// Frozen layers outside the range that were rebuilt (repointed or, kernel-compatible,
    /// assembled).
    pub rewritten_epochs: Vec<u64>,
    /// Objects in the new layer trees (roots included).
    pub entries: u64,
    /// Objects taken over by hard link (no data copied).
    pub linked_objects: u64,
    /// Whole files copied because the filesystem refused a link.
    pub copied_files: u64,
    /// Partial files that became whole files.
    pub assembled_files: u64,
    /// Partial files that stay partial with a merged or repointed map.
    pub merged_partials: u64,
    pub whiteouts_kept: u64,
    pub whiteouts_dropped: u64,
    /// Data bytes written into the new layers (assembled and copied files).
    pub written_bytes: u64,
    /// Partial files of the active layer assembled in place (kernel-compatible).
    pub active_assembled_files: u64,
    /// Partial files of the active layer repointed to a new inode below.
    pub relinked_partials: u64,
    /// Old layer directories removed.
    pub removed_dirs: u64,
    /// Reserved identity inodes freed (nothing names them any more; offline only).
    pub freed_reserved: u64,
    pub elapsed_micros: u64,
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Objects written (the root included; each hard link counts).
    pub entries: u64,
    /// Extra names of files that were hard links in the view.
    pub hard_links: u64,
    /// Partial files assembled.
    pub assembled_files: u64,
    /// Data bytes written.
    pub written_bytes: u64,
    pub elapsed_micros: u64,
}

/// What `finish_pending` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinishStats {
    pub relinked_partials: u64,
    pub removed_dirs: u64,
    /// Inodes kept for a live mount (`finish_online`).
    pub ghosts: u64,
}

/// Under `work/`: inodes of removed layers that a mount still identifies objects by. Only
/// the mount that made them refers to them; `remove_stale_work_dirs` removes them with the
/// other work dirs at the next mount.
pub const GHOSTS_DIR: &str = "ghosts";

/// Under the volume: inodes of removed layers that identify objects of the listed ones
/// (their `overlay.origin` names them; see `Builder::keep_identity`). Kept while something
/// names them, so that their numbers are never reused; files are emptied once nothing reads
/// them, and a squash frees those nothing names any more (`gc_reserved`).
pub const RESERVED_DIR: &str = "reserved";

/// Where the removal of a replaced layer directory keeps inodes instead of freeing them.
struct Keep<'a> {
    /// Identity inodes (dev, ino): moved to `reserved`.
    reserve: &'a HashSet<(u64, u64)>,
    reserved: PathBuf,
    /// Regular files moved to `reserved` are emptied right away (nothing can read them).
    empty_files: bool,
    /// A mount's live inodes: moved to `ghosts` (see `LiveInodes`).
    live: Option<(&'a dyn LiveInodes, PathBuf)>,
}

/// Removes the tree `p` bottom up, except the objects `keep` names that the removal would
/// free: they move (a directory after its children went). Counts the ghosts made.
fn remove_keeping(p: &Path, keep: &Keep, ghosts: &mut u64) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mkdir = |d: &Path| match std::fs::create_dir(d) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    };
    let kept = |path: &Path, md: &std::fs::Metadata, ghosts: &mut u64| -> std::io::Result<bool> {
        let frees = md.is_dir() || md.nlink() == 1;
        if !frees {
            return Ok(false);
        }
        let name = format!("{:x}-{:x}", md.dev(), md.ino());
        if keep.reserve.contains(&(md.dev(), md.ino())) {
            mkdir(&keep.reserved)?;
            let at = keep.reserved.join(name);
            std::fs::rename(path, &at)?;
            if keep.empty_files && md.is_file() {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&at)?
                    .set_len(0)?;
            }
            return Ok(true);
        }
        let st = stat_of(md);
        match &keep.live {
            Some((live, dir)) if live.in_use(&st) => {
                mkdir(dir)?;
                let at = dir.join(name);
                std::fs::rename(path, &at)?;
                if live.kept(&st, at) {
                    *ghosts += 1;
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let md = std::fs::symlink_metadata(p)?;
    if !md.is_dir() {
        if !kept(p, &md, ghosts)? {
            std::fs::remove_file(p)?;
        }
        return Ok(());
    }
    for e in std::fs::read_dir(p)? {
        remove_keeping(&e?.path(), keep, ghosts)?;
    }
    if !kept(p, &md, ghosts)? {
        std::fs::remove_dir(p)?;
    }
    Ok(())
}

/// Empties the reserved files that `open` does not report as in use (their data is not
/// needed: only their inode numbers are). Returns how many.
pub fn empty_reserved(vol: &Volume, open: &dyn Fn(u64, u64) -> bool) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let d = vol.path().join(RESERVED_DIR);
    let Ok(rd) = std::fs::read_dir(&d) else {
        return Ok(0);
    };
    let mut n = 0;
    for e in rd.flatten() {
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        if md.is_file() && md.len() > 0 && !open(md.dev(), md.ino()) {
            std::fs::OpenOptions::new()
                .write(true)
                .open(e.path())
                .and_then(|f| f.set_len(0))
                .map_err(io("empty reserved file", e.path()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Frees the reserved identity inodes that no object of the volume names as its origin any
/// more (their objects were deleted since). Returns how many it freed.
///
/// Offline (`live` is `None`): needs the volume lock (no mount runs, so no kernel knows the
/// numbers either) and reads the origin of every object of every layer.
///
/// Mounted, after an online squash (the caller holds the mount's squash lock, so frozen
/// layers do not change): reads the frozen layers only, and keeps the inodes the mount
/// still identifies objects by. The active layer, which changes meanwhile, need not be read:
/// an object there names a reserved identity only if a frozen object names it too. It got
/// its origin by a copy-up of a frozen object the view showed, and frozen objects only go
/// away in a squash of frozen layers, which keeps every object the frozen stack shows (the
/// active layer's whiteouts and renames are not part of it), re-created objects naming the
/// same identity.
pub fn gc_reserved(vol: &Volume, live: Option<&dyn LiveInodes>) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    if live.is_none() {
        vol.require_lock("free reserved inodes")?;
    }
    let dir = vol.path().join(RESERVED_DIR);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut unused: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for e in rd {
        let p = e.map_err(io("list", &dir))?.path();
        let md = p.symlink_metadata().map_err(io("stat", &p))?;
        unused.insert((md.dev(), md.ino()), p);
    }
    if unused.is_empty() {
        return Ok(0);
    }
    let key = XattrNames::new(vol.userxattr()).origin;
    let mount = open_dir(vol.path())?;
    let mut named = |dir: BorrowedFd, name: &CStr, at: &dyn Fn() -> PathBuf| -> Result<()> {
        if let Some(fb) =
            sys::getxattr(dir, name, &key).map_err(errno_io("read the origin of", at()))?
            && let Ok(fd) = layer::decode_origin(&fb, mount.as_fd())
            && let Ok(st) = sys::fstat(fd.as_fd())
        {
            unused.remove(&(st.st_dev, st.st_ino));
        }
        Ok(())
    };
    for l in vol.layers() {
        if live.is_some() && l.state != LayerState::Frozen {
            continue;
        }
        let tree = vol.tree_dir(l.epoch);
        // The root too: a squash re-creates it like any directory.
        named(open_dir(&tree)?.as_fd(), sys::dot(), &|| tree.clone())?;
        for_each_entry(&tree, &mut |dir, name, path, _| {
            named(dir, name, &|| {
                tree.join(std::ffi::OsStr::from_bytes(path.as_bytes()))
            })
        })?;
    }
    let mut freed = 0;
    for p in unused.into_values() {
        let md = p.symlink_metadata();
        if let (Some(live), Ok(md)) = (live, &md)
            && live.in_use(&stat_of(md))
        {
            continue;
        }
        let r = match md {
            Ok(md) if md.is_dir() => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        r.map_err(io("free reserved inode", &p))?;
        freed += 1;
    }
    Ok(freed)
}

fn stat_of(md: &std::fs::Metadata) -> Stat {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: `stat` is plain data; all-zero is a valid value.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    st.st_dev = md.dev();
    st.st_ino = md.ino();
    st.st_mode = md.mode();
    st.st_nlink = md.nlink() as _;
    st
}

/// Squashes the frozen layers from the bottom up to `through` (default: every frozen layer,
/// stopping at the first pinned one) into one frozen layer. See the module doc.
pub fn squash_offline(vol: &mut Volume, through: Option<u64>) -> Result<SquashStats> {
    squash(
        vol,
        &SquashOptions {
            through,
            ..SquashOptions::default()
        },
    )
}

/// Squashes the frozen layers `opts.from..=opts.through` into one (see `SquashOptions` and
/// the module doc). Needs the volume lock (`Volume::open`), so the volume is not mounted.
/// Returns without change if the range is a single layer and nothing else is asked.
pub fn squash(vol: &mut Volume, opts: &SquashOptions) -> Result<SquashStats> {
    if vol.is_read_only() {
        return Err(VolumeError::ReadOnly {
            path: vol.path().to_path_buf(),
            action: "squash it",
        });
    }
    finish_pending(vol)?;
    let Some(p) = prepare(vol, opts)? else {
        return Ok(SquashStats::default());
    };
    commit(vol, &p)?;
    let mut stats = p.stats.clone();
    if let Some(f) = finish_pending(vol)? {
        stats.relinked_partials = f.relinked_partials;
        stats.removed_dirs = f.removed_dirs;
    }
    // Committed: a failure to free reserved inodes is only a leftover for the next squash.
    stats.freed_reserved = gc_reserved(vol, None).unwrap_or_else(|e| {
        tracing::warn!("freeing reserved inodes: {e}");
        0
    });
    Ok(p.done(stats))
}

/// A squash whose layers are built, sealed, journaled and flushed, not yet committed.
/// Nothing the volume lists has changed: `abandon` (or the next `finish_pending` or
/// `Volume::open`) leaves the volume as it was.
#[derive(Debug)]
pub struct Prepared {
    first: u64,
    last: u64,
    /// Directory name of the merged layer (it holds the journal).
    name: String,
    /// Frozen layers above the range rebuilt with repointed partial files: (epoch, name).
    rewritten: Vec<(u64, String)>,
    /// Old handle -> new handle of every object the squash re-created.
    relink: HashMap<FhKey, Vec<u8>>,
    /// The directory names the commit replaces.
    replaced: Vec<String>,
    /// Inodes of the replaced layers that identify objects of the new ones (kept).
    reserve: HashSet<(u64, u64)>,
    /// Frozen layers when the build started.
    known: Vec<u64>,
    kernel_compatible: bool,
    pub stats: SquashStats,
    t0: Instant,
}

impl Prepared {
    /// The change-time tables of the frozen layers as `commit` will list them (the merged
    /// and rebuilt layers instead of those they replace): what the mount shows afterwards,
    /// read before the switch so that the switch itself only swaps it in.
    pub fn ctimes_after(&self, vol: &Volume) -> Result<Ctimes> {
        let layers = vol.path().join(LAYERS_DIR);
        let kept = vol
            .layers()
            .iter()
            .filter(|l| l.state == LayerState::Frozen)
            .map(|l| vol.layer_dir_name(l.epoch))
            .filter(|d| !self.replaced.contains(d));
        let new =
            std::iter::once(self.name.clone()).chain(self.rewritten.iter().map(|(_, n)| n.clone()));
        Ctimes::of_layer_dirs(kept.chain(new).map(|d| layers.join(d)))
    }

    /// The layer tree directories the commit replaces: `(old tree, new tree or None)`. The
    /// merged layer takes the place of the top of the range; the others of it go.
    pub fn tree_changes(&self, vol: &Volume) -> Vec<(PathBuf, Option<PathBuf>)> {
        let tree = |name: &str| vol.path().join(LAYERS_DIR).join(name).join(TREE_DIR);
        let mut out: Vec<(PathBuf, Option<PathBuf>)> = self
            .stats
            .merged_epochs
            .iter()
            .map(|e| {
                let new = (*e == self.last).then(|| tree(&self.name));
                (vol.tree_dir(*e), new)
            })
            .collect();
        out.extend(
            self.rewritten
                .iter()
                .map(|(e, name)| (vol.tree_dir(*e), Some(tree(name)))),
        );
        out
    }

    /// Epoch of the merged layer.
    pub fn last_epoch(&self) -> u64 {
        self.last
    }

    /// Removes what the build made (the volume never listed it).
    pub fn abandon(self, vol: &Volume) {
        let dirs = std::iter::once(&self.name).chain(self.rewritten.iter().map(|(_, n)| n));
        for d in dirs {
            let _ = std::fs::remove_dir_all(vol.path().join(LAYERS_DIR).join(d));
        }
    }

    fn journal(&self) -> Journal {
        Journal {
            remove: self.replaced.clone(),
            reserve: self
                .reserve
                .iter()
                .map(|(d, i)| format!("{d}:{i}"))
                .collect(),
            relink: self
                .relink
                .iter()
                .filter(|_| !self.kernel_compatible)
                .map(|(k, v)| RelinkEntry {
                    old: hex(&k.0),
                    new_fb: hex(v),
                })
                .collect(),
        }
    }

    fn done(&self, mut stats: SquashStats) -> SquashStats {
        stats.epoch = self.last;
        stats.elapsed_micros = self.t0.elapsed().as_micros() as u64;
        tracing::info!(
            epoch = self.last,
            merged = ?stats.merged_epochs,
            rewritten = ?stats.rewritten_epochs,
            micros = stats.elapsed_micros,
            "squashed"
        );
        stats
    }
}

/// Builds the squash of `opts` beside the listed layers (steps (1)-(2) of the module doc).
/// `None` if there is nothing to do. Needs the volume lock.
pub fn prepare(vol: &mut Volume, opts: &SquashOptions) -> Result<Option<Prepared>> {
    if vol.is_read_only() {
        return Err(VolumeError::ReadOnly {
            path: vol.path().to_path_buf(),
            action: "squash it",
        });
    }
    let assembled = if opts.kernel_compatible {
        assemble_active(vol)?
    } else {
        0
    };
    let mut p = build(vol, opts, None)?;
    if let Some(p) = &mut p {
        p.stats.active_assembled_files = assembled;
    }
    Ok(p)
}

/// The build of a squash while the volume is mounted, without its lock: `vol` is a
/// read-only handle opened now, so the mount goes on taking snapshots meanwhile. Only frozen
/// layers are read and only new directories written; `complete_online` (with the lock)
/// then takes care of the layers frozen since. Not kernel-compatible (that rewrites the
/// active layer).
///
/// `shown` hears, before the build hard-links an object of a mounted layer (which moves its
/// ctime, and adds its names in the merged layer to its link count until the old layers
/// are removed), the change time the mount shows for it (see `ctimes`) and its link count,
/// so that the mount goes on showing them; it may hear an inode more than once, the first
/// time with the right values.
pub fn prepare_online(
    vol: &Volume,
    opts: &SquashOptions,
    shown: &CtimeObserver<'_>,
) -> Result<Option<Prepared>> {
    if opts.kernel_compatible {
        return Err(VolumeError::SquashRefused {
            path: vol.path().to_path_buf(),
            reason: "a kernel-compatible squash rewrites the active layer: unmount first".into(),
        });
    }
    build(vol, opts, Some(shown))
}

/// See `prepare_online`: inode number, change time (seconds, nanoseconds), link count.
pub type CtimeObserver<'a> = dyn Fn(u64, (i64, i64), u64) + Sync + 'a;

/// With the volume lock, after `prepare_online`: layers frozen during the build whose
/// partial files name data the squash re-created are rebuilt like the other layers above
/// the range, and the journal is rewritten to include them.
pub fn complete_online(vol: &Volume, p: &mut Prepared, shown: &CtimeObserver<'_>) -> Result<()> {
    let late: Vec<_> = vol
        .layers()
        .iter()
        .filter(|l| l.state == LayerState::Frozen && !p.known.contains(&l.epoch))
        .cloned()
        .collect();
    let mut changed = false;
    for l in late {
        if p.relink.is_empty() || vol.maps(l.epoch).list()?.is_empty() {
            continue;
        }
        if !points_into(vol, &vol.tree_dir(l.epoch), &p.relink)? {
            continue;
        }
        let name = fresh_dir_name(vol, l.epoch)?;
        let out = build_layer(
            vol,
            &[l.epoch],
            false,
            false,
            &p.relink,
            &name,
            l.epoch,
            l.parent_epoch,
            &mut p.stats,
            &mut p.reserve,
            Some(shown),
        );
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_dir_all(vol.path().join(LAYERS_DIR).join(&name));
                return Err(e);
            }
        };
        p.relink.extend(out);
        p.replaced.push(vol.layer_dir_name(l.epoch));
        p.rewritten.push((l.epoch, name));
        p.stats.rewritten_epochs.push(l.epoch);
        changed = true;
    }
    if changed {
        write_journal(vol, p)?;
    }
    Ok(())
}

fn write_journal(vol: &Volume, p: &Prepared) -> Result<()> {
    let jdir = vol.path().join(LAYERS_DIR).join(&p.name);
    meta::write_atomic(
        &jdir,
        JOURNAL_FILE,
        &meta::encode_envelope(JOURNAL_FORMAT, JOURNAL_VERSION, &p.journal(), false),
        true,
    )?;
    crash_point("squash:journal-written")?;
    let root = open_dir(vol.path())?;
    sys::syncfs(root.as_fd()).map_err(errno_io("flush (syncfs) the filesystem of", vol.path()))?;
    crash_point("squash:synced")
}

fn build(
    vol: &Volume,
    opts: &SquashOptions,
    shown: Option<&CtimeObserver<'_>>,
) -> Result<Option<Prepared>> {
    let t0 = Instant::now();
    let (lo, hi) = plan_range(vol, opts)?;
    let layers = vol.layers().to_vec();
    let mut stats = SquashStats::default();
    if lo == hi && !opts.kernel_compatible {
        return Ok(None);
    }
    let kc = opts.kernel_compatible;
    let mut p = Prepared {
        first: layers[lo].epoch,
        last: layers[hi].epoch,
        name: String::new(),
        rewritten: Vec::new(),
        relink: HashMap::new(),
        replaced: layers[lo..=hi]
            .iter()
            .map(|l| vol.layer_dir_name(l.epoch))
            .collect(),
        reserve: HashSet::new(),
        known: layers
            .iter()
            .filter(|l| l.state == LayerState::Frozen)
            .map(|l| l.epoch)
            .collect(),
        kernel_compatible: kc,
        stats: SquashStats::default(),
        t0,
    };
    let mut staged: Vec<PathBuf> = Vec::new();
    let built = (|| -> Result<()> {
        // The merged layer.
        p.name = fresh_dir_name(vol, p.last)?;
        staged.push(vol.path().join(LAYERS_DIR).join(&p.name));
        let srcs: Vec<u64> = layers[lo..=hi].iter().rev().map(|l| l.epoch).collect();
        let out = build_layer(
            vol,
            &srcs,
            lo == 0,
            kc,
            &p.relink,
            &p.name,
            p.last,
            layers[lo].parent_epoch,
            &mut stats,
            &mut p.reserve,
            shown,
        )?;
        p.relink.extend(out);
        // Frozen layers outside the range, bottom up.
        for (i, l) in layers.iter().enumerate() {
            if l.state != LayerState::Frozen || (lo..=hi).contains(&i) {
                continue;
            }
            let maps_in_use = !vol.maps(l.epoch).list()?.is_empty();
            let need = maps_in_use
                && if kc {
                    true
                } else {
                    i > hi
                        && !p.relink.is_empty()
                        && points_into(vol, &vol.tree_dir(l.epoch), &p.relink)?
                };
            if !need {
                continue;
            }
            let name = fresh_dir_name(vol, l.epoch)?;
            staged.push(vol.path().join(LAYERS_DIR).join(&name));
            let out = build_layer(
                vol,
                &[l.epoch],
                i == 0,
                kc,
                &p.relink,
                &name,
                l.epoch,
                l.parent_epoch,
                &mut stats,
                &mut p.reserve,
                shown,
            )?;
            p.relink.extend(out);
            p.replaced.push(vol.layer_dir_name(l.epoch));
            p.rewritten.push((l.epoch, name));
            stats.rewritten_epochs.push(l.epoch);
        }
        // The journal: what to do once the commit made the new directories the volume's.
        write_journal(vol, &p)
    })();
    if let Err(e) = built {
        if !meta::is_simulated_crash(&e) {
            for d in &staged {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        return Err(e);
    }
    stats.merged_epochs = layers[lo..=hi].iter().map(|l| l.epoch).collect();
    p.stats = stats;
    if kc {
        p.relink.clear();
    }
    Ok(Some(p))
}

/// Step (3): the one atomic `volume.json` replacement that makes the squash the volume's.
pub fn commit(vol: &mut Volume, p: &Prepared) -> Result<()> {
    vol.commit_squash(p.first, p.last, &p.name, &p.rewritten)?;
    crash_point("squash:committed")
}

/// Step (4) while mounted, under the engine's write barrier (no partial file is being made):
/// repoints the active layer's partial files whose data below the squash re-created. Not
/// flushed: `finish_online` flushes before anything old is removed.
pub fn relink_active(vol: &Volume, p: &Prepared) -> Result<u64> {
    if p.relink.is_empty() {
        return Ok(0);
    }
    relink_tree(vol, &vol.upper_dir(), &p.relink)
}

/// Where a mounted volume's engine says which inodes must outlive their layer (see
/// `finish_online`).
pub trait LiveInodes {
    /// The inode's number identifies an object the mount still shows.
    fn in_use(&self, st: &Stat) -> bool;
    /// `st` was kept, moved to `at`: the engine removes it once the number is free.
    fn kept(&self, st: &Stat, at: PathBuf) -> bool;
}

/// Steps (4)-(6) for a mounted volume, after `commit` and the engine's switch to the new
/// layers (with `relink_active` under its barrier): flushes, then removes the replaced
/// directories, except inodes the mount still identifies objects by: those move to
/// `work/ghosts/` until the mount lets them go (a reused inode number would give a new
/// object the identity of a live one). Also finishes a squash of this mount that an error
/// interrupted. The mount's own work dir is left alone.
pub fn finish_online(vol: &Volume, live: &dyn LiveInodes) -> Result<Option<FinishStats>> {
    finish_journals(vol, Some(live))
}
/// Writes the merged view of the whole volume (frozen layers and the active one) into `dir`
/// as a plain tree: data (holes kept), types, hard links, owners, modes, times and xattrs;
/// no whiteouts, no overlay or layervol format xattrs, no partial files. `dir` must not
/// exist or be empty.
///
/// Needs the volume lock (`Volume::open`): the active layer must not change under the copy,
/// so the volume must not be mounted. To export a mounted volume, take a live snapshot and
/// use `export_frozen` on a read-only handle.
///
/// `kernel_compatible`: xattrs of the view in the overlay namespace (`trusted.overlay.X`, set
/// by users) are written escaped (`trusted.overlay.overlay.X`), as a layer stores them, so
/// that the tree used as an overlayfs layer shows them unchanged. Without it they are written
/// as the view shows them, like `cp -a` from the mount would.
pub fn export(vol: &Volume, dir: &Path, kernel_compatible: bool) -> Result<ExportStats> {
    if vol.is_read_only() {
        return Err(VolumeError::ReadOnly {
            path: vol.path().to_path_buf(),
            action: "export the active layer (or use export_frozen)",
        });
    }
    let epochs: Vec<u64> = vol.layers().iter().rev().map(|l| l.epoch).collect();
    export_layers(vol, &epochs, dir, kernel_compatible)
}

/// Like `export`, but of the frozen layers up to epoch `through` only: the view as of that
/// snapshot. Works on a read-only handle while the volume is mounted (frozen layers never
/// change; a squash cannot run while the mount holds the lock).
pub fn export_frozen(
    vol: &Volume,
    through: u64,
    dir: &Path,
    kernel_compatible: bool,
) -> Result<ExportStats> {
    let rec = vol.layer(through).ok_or_else(|| VolumeError::NoSuchEpoch {
        path: vol.path().to_path_buf(),
        epoch: through,
    })?;
    if rec.state != LayerState::Frozen {
        return Err(VolumeError::NotFrozen {
            path: vol.path().to_path_buf(),
            epoch: through,
            state: rec.state,
            action: "exported alone",
        });
    }
    let epochs: Vec<u64> = vol
        .layers()
        .iter()
        .rev()
        .filter(|l| l.state == LayerState::Frozen && l.epoch <= through)
        .map(|l| l.epoch)
        .collect();
    export_layers(vol, &epochs, dir, kernel_compatible)
}

fn export_layers(vol: &Volume, epochs: &[u64], dir: &Path, escaped: bool) -> Result<ExportStats> {
    let t0 = Instant::now();
    match std::fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => {
            if std::fs::read_dir(dir)
                .map_err(io("list", dir))?
                .next()
                .is_some()
            {
                return Err(VolumeError::TargetNotEmpty {
                    path: dir.to_path_buf(),
                });
            }
        }
        Ok(_) => {
            return Err(VolumeError::TargetNotEmpty {
                path: dir.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir).map_err(io("create directory", dir))?;
        }
        Err(e) => return Err(io("stat", dir)(e)),
    }
    let mut b = Builder::new(vol, epochs, true, Output::Plain { escaped }, dir, None)?;
    b.run()?;
    let root = open_dir(dir)?;
    sys::syncfs(root.as_fd()).map_err(errno_io("flush (syncfs) the filesystem of", dir))?;
    Ok(ExportStats {
        entries: b.stats.entries,
        hard_links: b.stats.hard_links,
        assembled_files: b.stats.assembled_files,
        written_bytes: b.stats.written_bytes,
        elapsed_micros: t0.elapsed().as_micros() as u64,
    })
}

/// Finishes a squash that committed but did not complete (see the module doc): repoints the
/// active layer's partial files, removes the replaced layer directories, removes the journal;
/// and removes the directories of a squash that never committed. Idempotent; `None` if no
/// journal was found. `Volume::open` calls it; a read-only handle does nothing.
pub fn finish_pending(vol: &Volume) -> Result<Option<FinishStats>> {
    if vol.is_read_only() {
        return Ok(None);
    }
    let done = finish_journals(vol, None)?;
    // Only now: a committed squash's directories are listed, an uncommitted one's are not
    // referenced by anything.
    remove_staging_strays(vol)?;
    // No mount runs (the caller holds the lock): nothing reads a reserved file.
    empty_reserved(vol, &|_, _| false)?;
    Ok(done)
}

fn finish_journals(vol: &Volume, live: Option<&dyn LiveInodes>) -> Result<Option<FinishStats>> {
    let mut done: Option<FinishStats> = None;
    for l in vol.layers() {
        let dir = vol.layer_dir(l.epoch);
        let Some(bytes) = meta::read_optional(&dir.join(JOURNAL_FILE))? else {
            continue;
        };
        let (journal, _): (Journal, _) = meta::decode_envelope(
            &dir.join(JOURNAL_FILE),
            &bytes,
            JOURNAL_FORMAT,
            "squash journal",
            JOURNAL_VERSION.major,
        )?;
        let f = done.get_or_insert_with(FinishStats::default);
        let reserve: HashSet<(u64, u64)> = journal
            .reserve
            .iter()
            .filter_map(|r| {
                let (d, i) = r.split_once(':')?;
                Some((d.parse().ok()?, i.parse().ok()?))
            })
            .collect();
        let mut relink = HashMap::new();
        for r in &journal.relink {
            match (unhex(&r.old), unhex(&r.new_fb)) {
                (Some(k), Some(v)) => relink.insert(FhKey(k), v),
                _ => {
                    return Err(VolumeError::Malformed {
                        path: dir.join(JOURNAL_FILE),
                        kind: "squash journal",
                        reason: "a handle is not hex".into(),
                    });
                }
            };
        }
        if !relink.is_empty() {
            f.relinked_partials += relink_tree(vol, &vol.upper_dir(), &relink)?;
            let root = open_dir(vol.path())?;
            sys::syncfs(root.as_fd())
                .map_err(errno_io("flush (syncfs) the filesystem of", vol.path()))?;
        }
        crash_point("squash:relinked")?;
        let layers_dir = vol.path().join(LAYERS_DIR);
        for name in &journal.remove {
            let listed = vol
                .layers()
                .iter()
                .any(|l| vol.layer_dir_name(l.epoch) == *name);
            let plausible = layer_dir_epoch(name).is_some();
            if listed || !plausible {
                return Err(VolumeError::Inconsistent {
                    path: vol.path().to_path_buf(),
                    reason: format!(
                        "the squash journal in {} names {name:?} for removal, which is {}",
                        dir.display(),
                        if listed {
                            "a listed layer"
                        } else {
                            "not a layer directory name"
                        }
                    ),
                });
            }
            let p = layers_dir.join(name);
            let keep = Keep {
                reserve: &reserve,
                reserved: vol.path().join(RESERVED_DIR),
                empty_files: live.is_none(),
                live: live.map(|l| (l, vol.path().join(super::store::WORK_DIR).join(GHOSTS_DIR))),
            };
            let r = remove_keeping(&p, &keep, &mut f.ghosts);
            match r {
                Ok(()) => f.removed_dirs += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove replaced layer directory", &p)(e)),
            }
            crash_point("squash:removed-old-dir")?;
        }
        meta::sync_dir(&layers_dir)?;
        if live.is_none() {
            // Work dirs of the merged-away epochs (and of older freezes) are unused: the
            // lock is held and no mount runs.
            vol.remove_stale_work_dirs()?;
        }
        std::fs::remove_file(dir.join(JOURNAL_FILE))
            .map_err(io("remove squash journal", dir.join(JOURNAL_FILE)))?;
        meta::sync_dir(&dir)?;
    }
    Ok(done)
}

/// Names of the layer directories that committed squashes replaced and their journals still
/// have to remove (the mount's squash, or the next `Volume::open`, does).
pub fn pending_removals(vol: &Volume) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    for l in vol.layers() {
        let path = vol.layer_dir(l.epoch).join(JOURNAL_FILE);
        let Some(bytes) = meta::read_optional(&path)? else {
            continue;
        };
        let (journal, _): (Journal, _) = meta::decode_envelope(
            &path,
            &bytes,
            JOURNAL_FORMAT,
            "squash journal",
            JOURNAL_VERSION.major,
        )?;
        out.extend(journal.remove);
    }
    Ok(out)
}

/// Makes every partial file of the active layer whole, in place: fills the blocks it does
/// not hold with the data below (or zeros past its below limit), keeps its times, then drops
/// the marker (the switch, one atomic xattr removal) and the `below` xattr. Every step leaves
/// the view unchanged, so a crash anywhere is harmless. Returns the number of files.
pub fn assemble_active(vol: &Volume) -> Result<u64> {
    if vol.is_read_only() {
        return Err(VolumeError::ReadOnly {
            path: vol.path().to_path_buf(),
            action: "assemble the active layer's partial files",
        });
    }
    let tree = vol.upper_dir();
    let maps = vol.maps(vol.active_epoch());
    let mut r = ChainReader::new(vol)?;
    let mut seen = HashSet::new();
    let mut done_maps = Vec::new();
    let mut n = 0;
    let userxattr = vol.userxattr();
    for_each_file(&tree, &mut |dir, name, path, st| {
        if !seen.insert((st.st_dev, st.st_ino)) {
            return Ok(());
        }
        let p = || tree.join(std::ffi::OsStr::from_bytes(path.as_bytes()));
        let Some(id) = blockmap::read_marker(dir, name, userxattr)
            .map_err(errno_io("read the partial-file marker of", p()))?
        else {
            // A crash between dropping the marker and `below` leaves a stray `below`.
            return match sys::removexattr(dir, name, below_xattr(userxattr)) {
                Ok(()) | Err(Errno::ENODATA) => Ok(()),
                Err(e) => Err(errno_io("remove layervol.below of", p())(e)),
            };
        };
        let fd = sys::openat(dir, name, libc::O_RDWR, 0).map_err(errno_io("open", p()))?;
        let mut map = maps.load(id)?;
        // What the engine would do at the next mount: trust the data file over a map a
        // crash left behind.
        map.recover(fd.as_fd())
            .map_err(errno_io("reconcile the block map of", p()))?;
        let below = r.chain_below(fd.as_fd(), &p())?;
        let bs = u64::from(map.block_size());
        let size = map.size();
        for gap in map.present().gaps(0..map.block_count()) {
            let start = gap.start * bs;
            let end = (gap.end * bs).min(size);
            let split = map.below_limit().clamp(start, end);
            let mut off = start;
            let mut buf = Vec::new();
            while off < split {
                let len = (split - off).min(CHUNK);
                buf.resize(len as usize, 0);
                blockmap::read_chain(&below, off, &mut buf).map_err(errno_io("read below", p()))?;
                write_or_punch(fd.as_fd(), &buf, off).map_err(errno_io("write", p()))?;
                off += len;
            }
            if split < end {
                zero_range(fd.as_fd(), split, end - split).map_err(errno_io("zero", p()))?;
            }
        }
        sys::fsync(fd.as_fd(), false).map_err(errno_io("fsync", p()))?;
        let times = sys::times_of(st);
        // SAFETY: futimens on a valid fd with two timespecs.
        if unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) } < 0 {
            return Err(errno_io("set times of", p())(Errno::last()));
        }
        crash_point("assemble-active:before-unmark")?;
        sys::removexattr(dir, name, blockmap::marker_xattr(userxattr))
            .map_err(errno_io("remove the partial-file marker of", p()))?;
        match sys::removexattr(dir, name, below_xattr(userxattr)) {
            Ok(()) | Err(Errno::ENODATA) => {}
            Err(e) => return Err(errno_io("remove layervol.below of", p())(e)),
        }
        done_maps.push(id);
        n += 1;
        Ok(())
    })?;
    for id in done_maps {
        maps.remove(id)?;
    }
    maps.sync()?;
    Ok(n)
}

// Test hook: make every hard link fail as if the filesystem refused it (EMLINK), so the
// copy fallback and the repointing of handles to copied files are exercised.
#[cfg(test)]
thread_local! {
    static REFUSE_LINKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
pub(crate) fn refuse_links(on: bool) {
    REFUSE_LINKS.with(|c| c.set(on));
}

#[cfg(test)]
fn links_refused() -> bool {
    REFUSE_LINKS.with(|c| c.get())
}

#[cfg(not(test))]
#[inline(always)]
fn links_refused() -> bool {
    false
}

// ---------------------------------------------------------------------------------------
// Planning

/// The range as indices into `vol.layers()`.
fn plan_range(vol: &Volume, opts: &SquashOptions) -> Result<(usize, usize)> {
    let layers = vol.layers();
    let refuse = |reason: String| VolumeError::SquashRefused {
        path: vol.path().to_path_buf(),
        reason,
    };
    let frozen = layers
        .iter()
        .take_while(|l| l.state == LayerState::Frozen)
        .count();
    if frozen == 0 {
        return Err(refuse(
            "it has no frozen layer; take a snapshot first".into(),
        ));
    }
    let index_of =
        |e: u64, what: &str| -> Result<usize> {
            let i = layers.iter().position(|l| l.epoch == e).ok_or_else(|| {
                VolumeError::NoSuchEpoch {
                    path: vol.path().to_path_buf(),
                    epoch: e,
                }
            })?;
            if i >= frozen {
                return Err(refuse(format!(
                    "{what} layer {e} is the active layer; only frozen layers are squashed"
                )));
            }
            Ok(i)
        };
    let lo = match opts.from {
        None => 0,
        Some(e) => index_of(e, "the first")?,
    };
    let hi = match opts.through {
        Some(e) => index_of(e, "the last")?,
        None => (lo..frozen)
            .find(|&i| layers[i].pinned)
            .unwrap_or(frozen - 1),
    };
    if hi < lo {
        return Err(refuse(format!(
            "layer {} is below layer {}",
            layers[hi].epoch, layers[lo].epoch
        )));
    }
    if let Some(p) = layers[lo..hi].iter().find(|l| l.pinned) {
        return Err(refuse(format!(
            "layer {} is pinned and only the top of a squashed range may be; squash up to it, or unpin it",
            p.epoch
        )));
    }
    Ok((lo, hi))
}

/// `<epoch>.<16 hex>`, not in use.
fn fresh_dir_name(vol: &Volume, epoch: u64) -> Result<String> {
    loop {
        let r = MapId::random().map_err(io("get random bytes for", vol.path()))?;
        let name = format!("{epoch}.{}", &r.to_hex()[..16]);
        if !vol.path().join(LAYERS_DIR).join(&name).exists() {
            return Ok(name);
        }
    }
}

/// Removes unlisted `<epoch>.<16 hex>` directories: layers a squash built but never
/// committed. Only after `finish_pending`, so none of them is still referenced.
fn remove_staging_strays(vol: &Volume) -> Result<()> {
    let d = vol.path().join(LAYERS_DIR);
    for e in std::fs::read_dir(&d).map_err(io("list", &d))? {
        let e = e.map_err(io("list", &d))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let staging = is_squash_dir_name(name);
        let listed = vol
            .layers()
            .iter()
            .any(|l| vol.layer_dir_name(l.epoch) == name);
        if staging && !listed {
            std::fs::remove_dir_all(e.path()).map_err(io("remove unfinished squash", e.path()))?;
        }
    }
    Ok(())
}

/// True if some partial file in `tree` names a file in `relink` as its data below.
fn points_into(vol: &Volume, tree: &Path, relink: &HashMap<FhKey, Vec<u8>>) -> Result<bool> {
    let userxattr = vol.userxattr();
    let mut found = false;
    for_each_file(tree, &mut |dir, name, path, _| {
        let p = || tree.join(std::ffi::OsStr::from_bytes(path.as_bytes()));
        if found
            || blockmap::read_marker(dir, name, userxattr)
                .map_err(errno_io("read the partial-file marker of", p()))?
                .is_none()
        {
            return Ok(());
        }
        if let Some(fb) = sys::getxattr(dir, name, below_xattr(userxattr))
            .map_err(errno_io("read layervol.below of", p()))?
        {
            found = fh_key(&fb).is_some_and(|k| relink.contains_key(&k));
        }
        Ok(())
    })?;
    Ok(found)
}

/// Repoints every partial file of `tree` whose `below` is a key of `relink`. Returns how many.
fn relink_tree(vol: &Volume, tree: &Path, relink: &HashMap<FhKey, Vec<u8>>) -> Result<u64> {
    let userxattr = vol.userxattr();
    let key = below_xattr(userxattr);
    let mut n = 0;
    for_each_file(tree, &mut |dir, name, path, _| {
        let p = || tree.join(std::ffi::OsStr::from_bytes(path.as_bytes()));
        // Names of one inode share the xattr: the second finds it repointed already.
        let Some(fb) =
            sys::getxattr(dir, name, key).map_err(errno_io("read layervol.below of", p()))?
        else {
            return Ok(());
        };
        if let Some(new) = fh_key(&fb).and_then(|k| relink.get(&k)) {
            sys::setxattr(dir, name, key, new, 0)
                .map_err(errno_io("repoint layervol.below of", p()))?;
            n += 1;
        }
        Ok(())
    })?;
    Ok(n)
}

/// Calls `f(dir, name, layer path, stat)` for every regular file of a tree.
fn for_each_file(
    tree: &Path,
    f: &mut dyn FnMut(BorrowedFd, &CStr, &RelPath, &Stat) -> Result<()>,
) -> Result<()> {
    for_each_entry(tree, &mut |dir, name, path, st| {
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            f(dir, name, path, st)?;
        }
        Ok(())
    })
}

/// Calls `f(dir, name, layer path, stat)` for every entry of a tree (not the root).
/// Directories are reached from the root without following symlinks, one open at a time (a
/// tree of any shape costs a few file descriptors).
fn for_each_entry(
    tree: &Path,
    f: &mut dyn FnMut(BorrowedFd, &CStr, &RelPath, &Stat) -> Result<()>,
) -> Result<()> {
    let root = open_dir(tree)?;
    let mut stack = vec![RelPath::root()];
    while let Some(rel) = stack.pop() {
        let p = || tree.join(std::ffi::OsStr::from_bytes(rel.as_bytes()));
        let dir = sys::open_dir_in_root(root.as_fd(), rel.as_cstr())
            .map_err(errno_io("open directory", p()))?;
        for (name, _, _) in sys::read_dir(dir.as_fd()).map_err(errno_io("list", p()))? {
            let st = sys::fstatat(dir.as_fd(), &name).map_err(errno_io("stat in", p()))?;
            let path = rel.join(&name);
            f(dir.as_fd(), &name, &path, &st)?;
            if sys::is_dir(&st) {
                stack.push(path);
            }
        }
    }
    Ok(())
}

/// Builds layer `name` from `srcs` (epochs, topmost first), writes its manifest, and returns
/// the handles of files it re-created (old -> new).
#[allow(clippy::too_many_arguments)]
fn build_layer(
    vol: &Volume,
    srcs: &[u64],
    bottom: bool,
    force_whole: bool,
    relink_in: &HashMap<FhKey, Vec<u8>>,
    name: &str,
    epoch: u64,
    parent_epoch: Option<u64>,
    stats: &mut SquashStats,
    reserve: &mut HashSet<(u64, u64)>,
    shown: Option<&CtimeObserver<'_>>,
) -> Result<HashMap<FhKey, Vec<u8>>> {
    let dir = vol.path().join(LAYERS_DIR).join(name);
    for d in [dir.clone(), dir.join(TREE_DIR), dir.join(MAPS_DIR)] {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&d)
            .map_err(io("create directory", &d))?;
    }
    crash_point("squash:layer-dir-made")?;
    let mut b = Builder::new(
        vol,
        srcs,
        bottom,
        Output::Layer { force_whole },
        &dir.join(TREE_DIR),
        Some(MapStore::new(dir.join(MAPS_DIR))),
    )?;
    b.relink_in = relink_in.clone();
    b.shown = shown;
    b.run()?;
    crash_point("squash:tree-built")?;
    let mut entries = std::mem::take(&mut b.entries);
    entries.sort_by(|a, c| a.path.cmp(&c.path));
    let m = Manifest {
        volume_id: vol.id(),
        epoch,
        parent_epoch,
        created_unix_secs: now_unix_secs(),
        block_size: vol.block_size(),
        entry_count: entries.len() as u64,
        data_bytes: b.data_bytes,
        block_count: b.block_count,
        partial_files: b.maps_used.len() as u64,
        entries,
    };
    m.write(&dir)?;
    b.ctimes_out.write(&dir)?;
    let s = &b.stats;
    stats.entries += s.entries;
    stats.linked_objects += s.linked;
    stats.copied_files += s.copied;
    stats.assembled_files += s.assembled_files;
    stats.merged_partials += s.merged_partials;
    stats.whiteouts_kept += s.whiteouts_kept;
    stats.whiteouts_dropped += s.whiteouts_dropped;
    stats.written_bytes += s.written_bytes;
    reserve.extend(b.reserve.drain());
    Ok(b.relink_out.drain().collect())
}

// ---------------------------------------------------------------------------------------
// File handles

/// The filesystem-local identity in a `struct ovl_fb`: handle type and handle bytes (the
/// header's uuid and flags are left out, so two encodings of one inode always match).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FhKey(Vec<u8>);

fn fh_key(fb: &[u8]) -> Option<FhKey> {
    const HDR: usize = 21;
    if fb.len() <= HDR || fb[1] != 0xfb || fb[2] as usize != fb.len() {
        return None;
    }
    let mut k = vec![fb[4]];
    k.extend_from_slice(&fb[HDR..]);
    Some(FhKey(k))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    /// Directories under `layers/` that the commit replaced.
    remove: Vec<String>,
    /// `dev:ino` of inodes in them to keep in `reserved/` rather than free (identities).
    #[serde(default)]
    reserve: Vec<String>,
    /// Partial files of the active layer whose `below` is `old` must name `new_fb`.
    relink: Vec<RelinkEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RelinkEntry {
    old: String,
    new_fb: String,
}

// ---------------------------------------------------------------------------------------
// Reading through partial files

/// One level of a file's data: a readable fd and, for a partial file, its map.
struct Level {
    fd: OwnedFd,
    map: Option<Arc<BlockMap>>,
    key: (u64, u64),
    /// This level's `layervol.below` (the handle of the next level).
    below_fb: Option<Vec<u8>>,
}

/// Follows `layervol.below` handles, finding maps in any layer of the volume.
struct ChainReader {
    mount: OwnedFd,
    userxattr: bool,
    stores: Vec<MapStore>,
    maps: HashMap<MapId, Arc<BlockMap>>,
}

impl ChainReader {
    fn new(vol: &Volume) -> Result<Self> {
        Ok(ChainReader {
            mount: open_dir(vol.path())?,
            userxattr: vol.userxattr(),
            stores: vol.layers().iter().map(|l| vol.maps(l.epoch)).collect(),
            maps: HashMap::new(),
        })
    }

    fn find_map(&mut self, id: MapId, what: &Path) -> Result<Arc<BlockMap>> {
        if let Some(m) = self.maps.get(&id) {
            return Ok(m.clone());
        }
        for s in &self.stores {
            if s.path_of(id).exists() {
                let m = Arc::new(s.load(id)?);
                self.maps.insert(id, m.clone());
                return Ok(m);
            }
        }
        Err(VolumeError::Inconsistent {
            path: what.to_path_buf(),
            reason: format!("block map {id} of a file below it is in no layer of the volume"),
        })
    }

    /// The levels below the partial file open at `fd` (not including it), topmost first.
    fn chain_below(&mut self, fd: BorrowedFd, what: &Path) -> Result<Vec<Level>> {
        let key = below_xattr(self.userxattr);
        let mut cur = sys::fgetxattr(fd, key).map_err(errno_io("read layervol.below of", what))?;
        let mut levels = Vec::new();
        while let Some(fb) = cur.take() {
            if levels.len() >= MAX_CHAIN {
                return Err(VolumeError::Inconsistent {
                    path: what.to_path_buf(),
                    reason: format!("its chain of partial files is longer than {MAX_CHAIN}"),
                });
            }
            let lfd = layer::open_by_fb(&fb, self.mount.as_fd(), libc::O_RDONLY).map_err(|e| {
                match e {
                    Errno::ESTALE | Errno::ENOENT => VolumeError::Inconsistent {
                        path: what.to_path_buf(),
                        reason: "the file its data lies on (layervol.below) no longer exists".into(),
                    },
                    Errno::EPERM => VolumeError::Io {
                        op: "open by handle (needs CAP_DAC_READ_SEARCH: run as root) the file below",
                        path: what.to_path_buf(),
                        source: std::io::Error::from_raw_os_error(e as i32),
                    },
                    e => errno_io("open by handle the file below", what)(e),
                }
            })?;
            let st = sys::fstat(lfd.as_fd()).map_err(errno_io("stat the file below", what))?;
            let marker = sys::fgetxattr(lfd.as_fd(), blockmap::marker_xattr(self.userxattr))
                .map_err(errno_io("read the marker of the file below", what))?;
            let map = match marker {
                None => None,
                Some(v) => {
                    let id =
                        blockmap::decode_marker(&v).map_err(|source| VolumeError::BadBlockMap {
                            path: what.to_path_buf(),
                            source,
                        })?;
                    cur = sys::fgetxattr(lfd.as_fd(), key)
                        .map_err(errno_io("read layervol.below below", what))?;
                    Some(self.find_map(id, what)?)
                }
            };
            let below_fb = if map.is_some() { cur.clone() } else { None };
            levels.push(Level {
                fd: lfd,
                map,
                key: (st.st_dev, st.st_ino),
                below_fb,
            });
        }
        Ok(levels)
    }
}

impl blockmap::ChainLevel for Level {
    fn data(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    fn map(&self) -> Option<&BlockMap> {
        self.map.as_deref()
    }
}

/// Writes `buf` at `off`, or makes the range a hole if `buf` is all zeros.
fn write_or_punch(fd: BorrowedFd, buf: &[u8], off: u64) -> sys::Result<()> {
    if buf.iter().all(|b| *b == 0) {
        zero_range(fd, off, buf.len() as u64)
    } else {
        sys::pwrite_all(fd, buf, off)
    }
}

/// Makes `[off, off + len)` read as zeros: a hole if the filesystem can punch one.
fn zero_range(fd: BorrowedFd, off: u64, len: u64) -> sys::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match sys::fallocate(
        fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => {
            let zeros = vec![0u8; len.min(CHUNK) as usize];
            let mut pos = off;
            while pos < off + len {
                let n = (off + len - pos).min(CHUNK) as usize;
                sys::pwrite_all(fd, &zeros[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------------
// The builder: one walk of the merged view of `srcs`, writing a layer or a plain tree

#[derive(Debug, Clone, Copy)]
enum Output {
    /// A layer of the volume: objects taken over by hard link, overlay format kept.
    Layer { force_whole: bool },
    /// A plain tree: everything copied, format xattrs dropped; `escaped` keeps user xattrs
    /// of the overlay namespace escaped.
    Plain { escaped: bool },
}

struct Src {
    tree: PathBuf,
    /// O_PATH fd of the tree root.
    root: Rc<OwnedFd>,
    maps: MapStore,
    manifest: Option<Manifest>,
    /// The active layer: its maps may lag behind a crash (`BlockMap::recover`).
    active: bool,
}

#[derive(Debug, Default)]
struct BuildStats {
    entries: u64,
    linked: u64,
    copied: u64,
    hard_links: u64,
    assembled_files: u64,
    merged_partials: u64,
    whiteouts_kept: u64,
    whiteouts_dropped: u64,
    written_bytes: u64,
}

/// Where the first name of a source inode went.
struct Placed {
    out: RelPath,
    kind: EntryKind,
}

/// The name being looked up, kernel style: one component in the parent's lower directories,
/// or an absolute path from each layer root (after an absolute redirect).
#[derive(Debug, Clone, PartialEq, Eq)]
enum LName {
    Single(CString),
    Abs(Vec<CString>),
}

struct Lookup {
    name: LName,
    is_dir: bool,
    stop: bool,
}

struct Hit {
    src: usize,
    dir: Rc<OwnedFd>,
    name: CString,
    path: RelPath,
    st: Stat,
}

enum Step {
    Found(Hit),
    Whiteout,
    Nothing,
}

struct StackDir {
    src: usize,
    path: RelPath,
    fd: Rc<OwnedFd>,
}

/// See `Squasher::dir_finish`.
struct DirFinish {
    rel: RelPath,
    times: [libc::timespec; 2],
    default_acl: Option<Vec<u8>>,
}

struct DirJob {
    out: RelPath,
    /// The directory's lower stack: where it was found in each source, topmost first.
    stack: Vec<(usize, RelPath)>,
    /// The lookup of its children continues below the sources (in the parent's lowers).
    continues: bool,
}

struct Builder<'a> {
    srcs: Vec<Src>,
    /// Nothing lies below the sources.
    bottom: bool,
    out: Output,
    x: XattrNames,
    userxattr: bool,
    block_size: u32,
    out_path: PathBuf,
    out_root: OwnedFd,
    out_maps: Option<MapStore>,
    chains: ChainReader,
    /// Regular files of the sources (for chains leaving them), built on first need.
    src_inodes: Option<HashSet<(u64, u64)>>,
    /// Handles to repoint in `below` of partial files taken over (old -> new).
    relink_in: HashMap<FhKey, Vec<u8>>,
    /// Files re-created here (old -> new handle).
    relink_out: HashMap<FhKey, Vec<u8>>,
    /// Identity objects of what was re-created here (see `keep_identity`).
    reserve: HashSet<(u64, u64)>,
    placed: HashMap<(u64, u64), Placed>,
    entries: Vec<Entry>,
    counted: HashSet<(u64, u64)>,
    data_bytes: u64,
    block_count: u64,
    maps_used: BTreeSet<MapId>,
    /// What directories get after their entries: times (creating entries changes them) and
    /// default ACLs (which entries created before would inherit).
    dir_finish: Vec<DirFinish>,
    /// The change times the sources' objects show (their layers' tables, see `ctimes`).
    ctimes_in: Ctimes,
    /// The change times the output's objects must show.
    ctimes_out: Ctimes,
    /// Hears the change times of mounted objects before they are linked.
    shown: Option<&'a CtimeObserver<'a>>,
    stats: BuildStats,
}

fn parse_redirect(v: &[u8]) -> Option<LName> {
    if v.starts_with(b"/") {
        let r = RelPath::from_redirect(v)?;
        let comps = if r.is_root() {
            Vec::new()
        } else {
            r.as_bytes()
                .split(|c| *c == b'/')
                .map(|c| CString::new(c).expect("no NUL"))
                .collect()
        };
        return Some(LName::Abs(comps));
    }
    if v.is_empty() || v.contains(&b'/') || v == b"." || v == b".." || v.contains(&0) {
        return None;
    }
    Some(LName::Single(CString::new(v).expect("checked")))
}

impl<'a> Builder<'a> {
    fn new(
        vol: &Volume,
        epochs: &[u64],
        bottom: bool,
        out: Output,
        out_path: &Path,
        out_maps: Option<MapStore>,
    ) -> Result<Builder<'a>> {
        let active = vol.active_epoch();
        let mut srcs = Vec::new();
        let mut ctimes_in = Ctimes::default();
        for &e in epochs {
            if matches!(out, Output::Layer { .. }) {
                ctimes_in.extend(&Ctimes::load(&vol.layer_dir(e))?);
            }
            let tree = vol.tree_dir(e);
            let root = sys::openat(
                open_dir(&tree)?.as_fd(),
                sys::dot(),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )
            .map_err(errno_io("open", &tree))?;
            let manifest = match out {
                Output::Layer { .. } => Manifest::load_optional(&vol.layer_dir(e))?,
                Output::Plain { .. } => None,
            };
            srcs.push(Src {
                tree,
                root: Rc::new(root),
                maps: vol.maps(e),
                manifest,
                active: e == active,
            });
        }
        let out_dir = open_dir(out_path)?;
        let out_root = sys::openat(
            out_dir.as_fd(),
            sys::dot(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(errno_io("open", out_path))?;
        super::progress::start(super::progress::Phase::Copy);
        Ok(Builder {
            srcs,
            bottom,
            out,
            x: XattrNames::new(vol.userxattr()),
            userxattr: vol.userxattr(),
            block_size: vol.block_size(),
            out_path: out_path.to_path_buf(),
            out_root,
            out_maps,
            chains: ChainReader::new(vol)?,
            src_inodes: None,
            relink_in: HashMap::new(),
            relink_out: HashMap::new(),
            reserve: HashSet::new(),
            placed: HashMap::new(),
            entries: Vec::new(),
            counted: HashSet::new(),
            data_bytes: 0,
            block_count: 0,
            maps_used: BTreeSet::new(),
            dir_finish: Vec::new(),
            ctimes_in,
            ctimes_out: Ctimes::default(),
            shown: None,
            stats: BuildStats::default(),
        })
    }

    fn is_layer(&self) -> bool {
        matches!(self.out, Output::Layer { .. })
    }

    fn src_path(&self, h: &Hit) -> PathBuf {
        let s = &self.srcs[h.src];
        if h.path.is_root() {
            s.tree.clone()
        } else {
            s.tree.join(std::ffi::OsStr::from_bytes(h.path.as_bytes()))
        }
    }

    fn out_file(&self, rel: &RelPath) -> PathBuf {
        if rel.is_root() {
            self.out_path.clone()
        } else {
            self.out_path
                .join(std::ffi::OsStr::from_bytes(rel.as_bytes()))
        }
    }

    fn run(&mut self) -> Result<()> {
        // The root: attributes of the topmost root; every source takes part.
        let top_root = Hit {
            src: 0,
            dir: self.srcs[0].root.clone(),
            name: sys::dot().to_owned(),
            path: RelPath::root(),
            st: sys::fstat(self.srcs[0].root.as_fd())
                .map_err(errno_io("stat", &self.srcs[0].tree))?,
        };
        let out_root = sys::openat(
            self.out_root.as_fd(),
            sys::dot(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(errno_io("open", &self.out_path))?;
        self.copy_attrs(&top_root, out_root.as_fd(), sys::dot(), &RelPath::root())?;
        self.finish_later(&top_root, &RelPath::root())?;
        self.record(
            out_root.as_fd(),
            sys::dot(),
            &RelPath::root(),
            EntryKind::Dir,
            Some(&top_root.st),
        )?;
        let mut queue = vec![DirJob {
            out: RelPath::root(),
            stack: (0..self.srcs.len()).map(|i| (i, RelPath::root())).collect(),
            continues: !self.bottom,
        }];
        while let Some(job) = queue.pop() {
            self.process_dir(job, &mut queue)?;
        }
        // Where the manifest has each path, if a default ACL changes an entry's xattrs.
        let mut entry_of: Option<HashMap<Vec<u8>, usize>> = None;
        for DirFinish {
            rel,
            times,
            default_acl,
        } in std::mem::take(&mut self.dir_finish)
        {
            let d = sys::open_dir_in_root(self.out_root.as_fd(), rel.as_cstr())
                .map_err(errno_io("open", self.out_file(&rel)))?;
            if let Some(v) = default_acl {
                sys::setxattr(d.as_fd(), sys::dot(), acl::DEFAULT, &v, 0)
                    .map_err(errno_io("set the default ACL of", self.out_file(&rel)))?;
                let entry_of = entry_of.get_or_insert_with(|| {
                    (self.entries.iter().enumerate())
                        .map(|(i, e)| (e.path.0.clone(), i))
                        .collect()
                });
                if let Some(&i) = entry_of.get(rel.as_bytes()) {
                    self.entries[i].xattrs_crc32c = scan::xattrs_crc(d.as_fd(), sys::dot())
                        .map_err(errno_io("read xattrs of", self.out_file(&rel)))?;
                }
            }
            sys::utimensat(d.as_fd(), sys::dot(), &times)
                .map_err(errno_io("set times of", self.out_file(&rel)))?;
        }
        Ok(())
    }

    /// Queues what directory `top` gets once its entries exist (see `dir_finish`).
    fn finish_later(&mut self, top: &Hit, rel: &RelPath) -> Result<()> {
        let default_acl = match sys::getxattr(top.dir.as_fd(), &top.name, acl::DEFAULT) {
            Ok(v) => v,
            Err(Errno::EOPNOTSUPP) => None,
            Err(e) => return Err(errno_io("read the default ACL of", self.src_path(top))(e)),
        };
        self.dir_finish.push(DirFinish {
            rel: rel.clone(),
            times: sys::times_of(&top.st),
            default_acl,
        });
        Ok(())
    }

    fn process_dir(&mut self, job: DirJob, queue: &mut Vec<DirJob>) -> Result<()> {
        let out_dir = sys::open_dir_in_root(self.out_root.as_fd(), job.out.as_cstr())
            .map_err(errno_io("open", self.out_file(&job.out)))?;
        let mut stack = Vec::new();
        let mut names = BTreeSet::new();
        for (src, path) in &job.stack {
            let s = &self.srcs[*src];
            let where_ = || s.tree.join(std::ffi::OsStr::from_bytes(path.as_bytes()));
            let fd = sys::open_dir_in_root(s.root.as_fd(), path.as_cstr())
                .map_err(errno_io("open directory", where_()))?;
            for (n, _, _) in sys::read_dir(fd.as_fd()).map_err(errno_io("list", where_()))? {
                names.insert(n);
            }
            stack.push(StackDir {
                src: *src,
                path: path.clone(),
                fd: Rc::new(fd),
            });
        }
        for name in names {
            let (hits, d) = self.lookup(&stack, &name)?;
            let out_rel = job.out.join(&name);
            let Some(top) = hits.first() else {
                if d.stop {
                    // Deleted in the sources.
                    if self.is_layer() && job.continues {
                        sys::mknodat(out_dir.as_fd(), &name, libc::S_IFCHR, 0)
                            .map_err(errno_io("create whiteout", self.out_file(&out_rel)))?;
                        self.record(out_dir.as_fd(), &name, &out_rel, EntryKind::Whiteout, None)?;
                        self.stats.whiteouts_kept += 1;
                    } else {
                        self.stats.whiteouts_dropped += 1;
                    }
                }
                continue;
            };
            if sys::is_dir(&top.st) {
                let continues = !d.stop
                    && match d.name {
                        LName::Abs(_) => !self.bottom,
                        LName::Single(_) => job.continues,
                    };
                let opaque = self.is_layer() && !continues && job.continues;
                let redirect = match (&d.name, continues && self.is_layer()) {
                    (_, false) => None,
                    (LName::Abs(c), true) => {
                        let mut v = Vec::new();
                        for comp in c {
                            v.push(b'/');
                            v.extend_from_slice(comp.to_bytes());
                        }
                        Some(v)
                    }
                    (LName::Single(n), true) if n.as_c_str() != name.as_c_str() => {
                        Some(n.to_bytes().to_vec())
                    }
                    _ => None,
                };
                self.make_dir(top, out_dir.as_fd(), &name, &out_rel, opaque, redirect)?;
                queue.push(DirJob {
                    out: out_rel,
                    stack: hits.iter().map(|h| (h.src, h.path.clone())).collect(),
                    continues,
                });
            } else {
                self.place(top, out_dir.as_fd(), &name, &out_rel)?;
            }
        }
        Ok(())
    }

    // --- lookup (kernel `ovl_lookup` over the sources) ---

    fn lookup(&mut self, stack: &[StackDir], name: &CStr) -> Result<(Vec<Hit>, Lookup)> {
        let mut d = Lookup {
            name: LName::Single(name.to_owned()),
            is_dir: false,
            stop: false,
        };
        let mut hits = Vec::new();
        let mut next_in_stack = 0;
        // Once the name is absolute, the lookup goes on in every source below, from the root.
        let mut next_src: Option<usize> = None;
        loop {
            let (src, step) = match next_src {
                None => {
                    let Some(sd) = stack.get(next_in_stack) else {
                        break;
                    };
                    next_in_stack += 1;
                    (sd.src, self.lookup_layer(sd.src, Some(sd), &mut d)?)
                }
                Some(j) => {
                    if j >= self.srcs.len() {
                        break;
                    }
                    next_src = Some(j + 1);
                    (j, self.lookup_layer(j, None, &mut d)?)
                }
            };
            if let Step::Found(h) = step {
                hits.push(h);
            }
            if d.stop {
                break;
            }
            if next_src.is_none() && matches!(d.name, LName::Abs(_)) {
                next_src = Some(src + 1);
            }
        }
        Ok((hits, d))
    }

    fn lookup_layer(&mut self, src: usize, sd: Option<&StackDir>, d: &mut Lookup) -> Result<Step> {
        match d.name.clone() {
            LName::Single(n) => {
                let sd = sd.expect("a single-name lookup walks the parent's stack");
                self.lookup_one(src, &sd.fd, &sd.path, &n, true, 0, 1, d)
            }
            LName::Abs(comps) => {
                if comps.is_empty() {
                    // A redirect to the root names nothing a directory can merge with.
                    d.stop = true;
                    return Ok(Step::Nothing);
                }
                let mut cur = (self.srcs[src].root.clone(), RelPath::root());
                for (k, c) in comps.iter().enumerate() {
                    let last = k + 1 == comps.len();
                    match self.lookup_one(src, &cur.0, &cur.1, c, last, k, comps.len(), d)? {
                        Step::Found(h) if last => return Ok(Step::Found(h)),
                        Step::Found(h) => {
                            let fd = sys::openat(
                                h.dir.as_fd(),
                                &h.name,
                                libc::O_PATH | libc::O_DIRECTORY,
                                0,
                            )
                            .map_err(errno_io("open directory", self.src_path(&h)))?;
                            cur = (Rc::new(fd), h.path);
                        }
                        Step::Whiteout if last => return Ok(Step::Whiteout),
                        _ => return Ok(Step::Nothing),
                    }
                }
                Ok(Step::Nothing)
            }
        }
    }

    /// One component: `ovl_lookup_single`. `k` of `n` is its position in an absolute walk.
    #[allow(clippy::too_many_arguments)]
    fn lookup_one(
        &mut self,
        src: usize,
        dir: &Rc<OwnedFd>,
        dir_path: &RelPath,
        name: &CStr,
        last: bool,
        k: usize,
        n: usize,
        d: &mut Lookup,
    ) -> Result<Step> {
        let path = dir_path.join(name);
        let where_ = || {
            self.srcs[src]
                .tree
                .join(std::ffi::OsStr::from_bytes(path.as_bytes()))
        };
        let st = match sys::fstatat(dir.as_fd(), name) {
            Ok(st) => st,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ENAMETOOLONG) => return Ok(Step::Nothing),
            Err(e) => return Err(errno_io("stat", where_())(e)),
        };
        let kind = layer::classify_lower(dir.as_fd(), name, &st, &self.x)
            .map_err(errno_io("read overlay xattrs of", where_()))?;
        let hit = Hit {
            src,
            dir: dir.clone(),
            name: name.to_owned(),
            path: path.clone(),
            st,
        };
        match kind {
            LKind::Whiteout => {
                d.stop = true;
                Ok(if last { Step::Whiteout } else { Step::Nothing })
            }
            LKind::Other => {
                d.stop = true;
                if d.is_dir || !last {
                    return Ok(Step::Nothing);
                }
                Ok(Step::Found(hit))
            }
            LKind::Dir => {
                if last {
                    d.is_dir = true;
                }
                if layer::is_opaque(dir.as_fd(), name, &self.x)
                    .map_err(errno_io("read overlay xattrs of", where_()))?
                {
                    d.stop = true;
                    return Ok(Step::Found(hit));
                }
                let v = sys::getxattr(dir.as_fd(), name, &self.x.redirect)
                    .map_err(errno_io("read overlay xattrs of", where_()))?;
                match v.as_deref().and_then(parse_redirect) {
                    None => {}
                    Some(LName::Abs(mut r)) => {
                        // The rest of the path being walked follows the redirect.
                        if let LName::Abs(cur) = &d.name {
                            let tail = cur.len() - (n - k - 1);
                            r.extend_from_slice(&cur[tail..]);
                        }
                        d.name = LName::Abs(r);
                        // An absolute redirect below an opaque ancestor still continues.
                        d.stop = false;
                    }
                    Some(LName::Single(r)) => match &mut d.name {
                        LName::Single(s) => *s = r,
                        LName::Abs(cur) => {
                            let at = cur.len() - (n - k);
                            cur[at] = r;
                        }
                    },
                }
                Ok(Step::Found(hit))
            }
        }
    }

    // --- output ---

    /// The change time the mount shows for the source object `st`.
    fn shown_ctime(&self, st: &Stat) -> (i64, i64) {
        self.ctimes_in
            .get(st.st_ino)
            .unwrap_or((st.st_ctime, st.st_ctime_nsec))
    }

    /// Records the manifest entry of `out_dir/name` and the change time the mount showed
    /// for it (`src`, the object it shows) in the output's ctime table (layer output only).
    fn record(
        &mut self,
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
        kind: EntryKind,
        src: Option<&Stat>,
    ) -> Result<()> {
        self.stats.entries += 1;
        super::progress::entry();
        if !self.is_layer() {
            return Ok(());
        }
        let st = sys::fstatat(out_dir, name).map_err(errno_io("stat", self.out_file(rel)))?;
        // The first name of an inode is placed before it is linked anywhere; another name
        // may be looked up after that link moved the source's ctime.
        if let Some(src) = src
            && self.ctimes_out.get(st.st_ino).is_none()
        {
            let shown = self.shown_ctime(src);
            self.ctimes_out.insert(st.st_ino, shown);
        }
        let xattrs_crc32c = scan::xattrs_crc(out_dir, name)
            .map_err(errno_io("read xattrs of", self.out_file(rel)))?;
        // Data is counted once per inode; partial files' by `count_partial`.
        if let EntryKind::File { size, .. } = &kind
            && self.counted.insert((st.st_dev, st.st_ino))
        {
            self.data_bytes += size;
            self.block_count += size.div_ceil(u64::from(self.block_size));
        }
        self.entries.push(Entry {
            path: LayerPath(rel.as_bytes().to_vec()),
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            xattrs_crc32c,
            kind,
        });
        Ok(())
    }

    /// Adds a partial file's present data to the totals (once per map).
    fn count_partial(&mut self, map: &BlockMap) {
        if self.maps_used.insert(map.id()) {
            self.data_bytes += map.present_bytes();
            self.block_count += map.present().count_blocks();
        }
    }

    fn make_dir(
        &mut self,
        top: &Hit,
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
        opaque: bool,
        redirect: Option<Vec<u8>>,
    ) -> Result<()> {
        sys::mkdirat(out_dir, name, 0o700)
            .map_err(errno_io("create directory", self.out_file(rel)))?;
        self.copy_attrs(top, out_dir, name, rel)?;
        if self.is_layer() && !self.reserve_origin(top)? {
            self.name_origin(top, out_dir, name, rel)?;
        }
        let p = || self.out_file(rel);
        if opaque {
            sys::setxattr(out_dir, name, &self.x.opaque, b"y", 0)
                .map_err(errno_io("mark opaque", p()))?;
        }
        if let Some(r) = redirect {
            sys::setxattr(out_dir, name, &self.x.redirect, &r, 0)
                .map_err(errno_io("set the redirect of", p()))?;
        }
        self.finish_later(top, rel)?;
        self.record(out_dir, name, rel, EntryKind::Dir, Some(&top.st))
    }

    /// Places the non-directory `h` at `out_dir/name`.
    fn place(&mut self, h: &Hit, out_dir: BorrowedFd, name: &CStr, rel: &RelPath) -> Result<()> {
        let key = (h.st.st_dev, h.st.st_ino);
        if let Some(p) = self.placed.get(&key) {
            // Another name of an inode already placed: a hard link in the result too.
            let (first, kind) = (p.out.clone(), p.kind.clone());
            let (pd, pn) = match first.split_last() {
                Some((parent, n)) => (
                    sys::open_dir_in_root(self.out_root.as_fd(), parent.as_cstr())
                        .map_err(errno_io("open", self.out_file(&parent)))?,
                    n,
                ),
                None => unreachable!("the root is a directory"),
            };
            sys::linkat(pd.as_fd(), &pn, out_dir, name)
                .map_err(errno_io("hard-link", self.out_file(rel)))?;
            self.stats.hard_links += 1;
            return self.record(out_dir, name, rel, kind, Some(&h.st));
        }
        // Taken over by link or re-created: either way the object's identity (its origin,
        // when that lies in the range) must outlive the range.
        let has_origin = self.reserve_origin(h)?;
        let fmt = h.st.st_mode & libc::S_IFMT;
        let kind = if fmt == libc::S_IFREG {
            let marker = blockmap::read_marker(h.dir.as_fd(), &h.name, self.userxattr).map_err(
                errno_io("read the partial-file marker of", self.src_path(h)),
            )?;
            match marker {
                None => self.place_whole(h, out_dir, name, rel)?,
                Some(id) => self.place_partial(h, id, out_dir, name, rel)?,
            }
        } else {
            self.place_special(h, out_dir, name, rel)?
        };
        if !has_origin && self.is_layer() {
            let out = sys::fstatat(out_dir, name).map_err(errno_io("stat", self.out_file(rel)))?;
            if (out.st_dev, out.st_ino) != key {
                self.name_origin(h, out_dir, name, rel)?;
            }
        }
        self.placed.insert(
            key,
            Placed {
                out: rel.clone(),
                kind: kind.clone(),
            },
        );
        self.record(out_dir, name, rel, kind, Some(&h.st))
    }

    /// Tries to take `h` over by hard link (layer output only). `false` if the filesystem
    /// refuses (the caller copies).
    fn try_link(
        &mut self,
        h: &Hit,
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
    ) -> Result<bool> {
        if !self.is_layer() || links_refused() {
            return Ok(false);
        }
        if let Some(f) = self.shown {
            f(h.st.st_ino, self.shown_ctime(&h.st), h.st.st_nlink);
        }
        match sys::linkat(h.dir.as_fd(), &h.name, out_dir, name) {
            Ok(()) => {
                self.stats.linked += 1;
                Ok(true)
            }
            Err(Errno::EMLINK | Errno::EPERM | Errno::EXDEV) => Ok(false),
            Err(e) => Err(errno_io("hard-link", self.out_file(rel))(e)),
        }
    }

    /// Notes that the file `h` was re-created at `out_dir/name` (a new inode): partial files
    /// above that read through `h` must be repointed.
    /// `out_dir/name` re-creates the object `h` shows as a new inode, and `h` has no
    /// origin. A mount identifies an object (its `st_ino`) by its `overlay.origin` if it has
    /// one, else by its own inode (see `Overlay::ino_of`): the new object gets `h` itself as
    /// origin, and `h` is recorded so that the squash keeps its inode (`reserved/`) instead
    /// of freeing it. (With an origin, `reserve_origin` kept what it names, and the new
    /// object has the same origin: copied with the xattrs.) So `st_ino` survives squash and
    /// remount, and no later object can get the same inode number.
    fn name_origin(
        &mut self,
        h: &Hit,
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
    ) -> Result<()> {
        let fb = layer::encode_origin(h.dir.as_fd(), &h.name, self.chains.mount.as_fd())
            .map_err(errno_io("get the file handle of", self.src_path(h)))?;
        sys::setxattr(out_dir, name, &self.x.origin, &fb, 0)
            .map_err(errno_io("set the origin of", self.out_file(rel)))?;
        self.reserve.insert((h.st.st_dev, h.st.st_ino));
        Ok(())
    }

    /// Records the object `h`'s origin names, if any (see `name_origin`). True if `h` has
    /// an origin.
    fn reserve_origin(&mut self, h: &Hit) -> Result<bool> {
        if !self.is_layer() {
            return Ok(false);
        }
        let Some(fb) = sys::getxattr(h.dir.as_fd(), &h.name, &self.x.origin)
            .map_err(errno_io("read the origin of", self.src_path(h)))?
        else {
            return Ok(false);
        };
        // It names an object that may lie in the range: kept if so.
        if let Ok(fd) = layer::decode_origin(&fb, self.chains.mount.as_fd())
            && let Ok(st) = sys::fstat(fd.as_fd())
        {
            self.reserve.insert((st.st_dev, st.st_ino));
        }
        Ok(true)
    }

    fn note_recreated(
        &mut self,
        h: &Hit,
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
    ) -> Result<()> {
        if !self.is_layer() {
            return Ok(());
        }
        let old = layer::encode_origin(h.dir.as_fd(), &h.name, self.chains.mount.as_fd())
            .map_err(errno_io("get the file handle of", self.src_path(h)))?;
        let new = layer::encode_origin(out_dir, name, self.chains.mount.as_fd())
            .map_err(errno_io("get the file handle of", self.out_file(rel)))?;
        if let Some(k) = fh_key(&old) {
            self.relink_out.insert(k, new);
        }
        Ok(())
    }

    fn place_whole(
        &mut self,
        h: &Hit,
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
    ) -> Result<EntryKind> {
        let size = h.st.st_size as u64;
        if self.try_link(h, out_dir, name, rel)? {
            let crc32c = self.whole_crc(h)?;
            return Ok(EntryKind::File { size, crc32c });
        }
        let src = sys::openat(h.dir.as_fd(), &h.name, libc::O_RDONLY, 0)
            .map_err(errno_io("open", self.src_path(h)))?;
        let levels = [Level {
            fd: src,
            map: None,
            key: (h.st.st_dev, h.st.st_ino),
            below_fb: None,
        }];
        let crc32c = self.write_whole(&levels, size, out_dir, name, rel)?;
        self.copy_attrs(h, out_dir, name, rel)?;
        self.set_times(h, out_dir, name, rel)?;
        if self.is_layer() {
            self.stats.copied += 1;
            self.note_recreated(h, out_dir, name, rel)?;
        }
        Ok(EntryKind::File { size, crc32c })
    }

    /// The CRC32C of a whole file taken over by link: from its layer's manifest when that
    /// still describes it (so damage since the seal stays detectable), else read.
    fn whole_crc(&self, h: &Hit) -> Result<u32> {
        if let Some(m) = &self.srcs[h.src].manifest
            && let Ok(i) = m
                .entries
                .binary_search_by(|e| e.path.as_bytes().cmp(h.path.as_bytes()))
        {
            let e = &m.entries[i];
            if let EntryKind::File { size, crc32c } = e.kind
                && size == h.st.st_size as u64
                && (e.mode, e.uid, e.gid) == (h.st.st_mode, h.st.st_uid, h.st.st_gid)
            {
                return Ok(crc32c);
            }
        }
        let fd = sys::openat(h.dir.as_fd(), &h.name, libc::O_RDONLY, 0)
            .map_err(errno_io("open", self.src_path(h)))?;
        let mut buf = vec![0u8; CHUNK as usize];
        let mut crc = 0u32;
        let mut off = 0u64;
        loop {
            let n = sys::pread_full(fd.as_fd(), &mut buf, off)
                .map_err(errno_io("read", self.src_path(h)))?;
            if n == 0 {
                return Ok(crc);
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            off += n as u64;
        }
    }

    /// Creates `out_dir/name` with `size` bytes read through `levels` (holes for zero
    /// pieces). Returns the CRC32C of the content.
    fn write_whole(
        &mut self,
        levels: &[Level],
        size: u64,
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
    ) -> Result<u32> {
        let out_p = self.out_file(rel);
        let p = || out_p.clone();
        let fd = sys::openat(
            out_dir,
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .map_err(errno_io("create", p()))?;
        let mut crc = 0u32;
        let mut buf = Vec::new();
        let mut off = 0;
        while off < size {
            let n = (size - off).min(CHUNK);
            buf.resize(n as usize, 0);
            blockmap::read_chain(levels, off, &mut buf)
                .map_err(errno_io("read the data of", p()))?;
            crc = crc32c::crc32c_append(crc, &buf);
            if buf.iter().any(|b| *b != 0) {
                sys::pwrite_all(fd.as_fd(), &buf, off).map_err(errno_io("write", p()))?;
                self.stats.written_bytes += n;
            }
            super::progress::bytes(n);
            off += n;
        }
        sys::ftruncate(fd.as_fd(), size).map_err(errno_io("set the size of", p()))?;
        Ok(crc)
    }

    fn src_inodes(&mut self) -> Result<&HashSet<(u64, u64)>> {
        if self.src_inodes.is_none() {
            let mut set = HashSet::new();
            for s in &self.srcs {
                for_each_file(&s.tree, &mut |_, _, _, st| {
                    set.insert((st.st_dev, st.st_ino));
                    Ok(())
                })?;
            }
            self.src_inodes = Some(set);
        }
        Ok(self.src_inodes.as_ref().expect("just built"))
    }

    fn place_partial(
        &mut self,
        h: &Hit,
        id: MapId,
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
    ) -> Result<EntryKind> {
        let sp = self.src_path(h);
        let fd = sys::openat(h.dir.as_fd(), &h.name, libc::O_RDONLY, 0)
            .map_err(errno_io("open", &sp))?;
        let mut map = self.srcs[h.src].maps.load(id)?;
        if self.srcs[h.src].active {
            map.recover(fd.as_fd())
                .map_err(errno_io("reconcile the block map of", &sp))?;
        }
        let below_fb = sys::fgetxattr(fd.as_fd(), below_xattr(self.userxattr))
            .map_err(errno_io("read layervol.below of", &sp))?;
        let below = self.chains.chain_below(fd.as_fd(), &sp)?;
        let map = Arc::new(map);
        let mut levels = vec![Level {
            fd,
            map: Some(map.clone()),
            key: (h.st.st_dev, h.st.st_ino),
            below_fb,
        }];
        levels.extend(below);
        // How many levels lie in the sources: a prefix of the chain.
        let inside = if self.bottom {
            levels.len()
        } else {
            let set = self.src_inodes()?;
            1 + levels[1..]
                .iter()
                .take_while(|l| set.contains(&l.key))
                .count()
        };
        let force_whole = match self.out {
            Output::Layer { force_whole } => force_whole,
            Output::Plain { .. } => true,
        };
        let bs = u64::from(self.block_size);
        let size = map.size();
        if !force_whole && inside < levels.len() {
            // The chain continues below the sources: stay partial over that level.
            let mut present = ExtentSet::new();
            let mut below_limit = size;
            for l in &levels[..inside] {
                let m = l
                    .map
                    .as_ref()
                    .expect("every level above another is partial");
                present.union_with(m.present());
                below_limit = below_limit.min(m.below_limit());
            }
            present.truncate(size.div_ceil(bs));
            let old_below = levels[inside - 1].below_fb.clone().unwrap_or_default();
            let (new_below, repointed) =
                match fh_key(&old_below).and_then(|k| self.relink_in.get(&k)) {
                    Some(n) => (n.clone(), true),
                    None => (old_below, false),
                };
            if !present.contains_range(0..below_limit.div_ceil(bs)) {
                if inside == 1 && !repointed && self.try_link(h, out_dir, name, rel)? {
                    // Taken over unchanged: same inode, same map.
                    let maps = self.out_maps.as_ref().expect("layer output has maps");
                    let map_crc32c = maps.store(&map)?;
                    self.count_partial(&map);
                    return Ok(EntryKind::Partial {
                        size,
                        map: map.id(),
                        map_crc32c,
                        present_blocks: map.present().count_blocks(),
                    });
                }
                return self.write_partial(
                    h,
                    &levels,
                    present,
                    below_limit,
                    &new_below,
                    out_dir,
                    name,
                    rel,
                );
            }
        }
        let crc32c = self.write_whole(&levels, size, out_dir, name, rel)?;
        self.copy_attrs(h, out_dir, name, rel)?;
        self.set_times(h, out_dir, name, rel)?;
        self.stats.assembled_files += 1;
        self.note_recreated(h, out_dir, name, rel)?;
        Ok(EntryKind::File { size, crc32c })
    }

    /// Writes a partial file with the merged map (see the module doc).
    #[allow(clippy::too_many_arguments)]
    fn write_partial(
        &mut self,
        h: &Hit,
        levels: &[Level],
        present: ExtentSet,
        below_limit: u64,
        below_fb: &[u8],
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
    ) -> Result<EntryKind> {
        let out_p = self.out_file(rel);
        let p = || out_p.clone();
        let size = levels[0].map.as_ref().expect("partial").size();
        let bs = u64::from(self.block_size);
        let id = MapId::random().map_err(io("get random bytes for", p()))?;
        let mut map = BlockMap::new(id, self.block_size, below_limit)?;
        let _ = map.truncate(size); // grows: nothing is cut
        let fd = sys::openat(
            out_dir,
            name,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .map_err(errno_io("create", p()))?;
        sys::ftruncate(fd.as_fd(), size).map_err(errno_io("set the size of", p()))?;
        let per = (CHUNK / bs).max(1);
        let mut buf = Vec::new();
        for ext in present.iter() {
            let mut b = ext.start;
            while b < ext.end {
                let n = per.min(ext.end - b);
                let start = b * bs;
                let end = ((b + n) * bs).min(size);
                buf.resize((end - start) as usize, 0);
                blockmap::read_chain(levels, start, &mut buf)
                    .map_err(errno_io("read the data of", p()))?;
                sys::pwrite_all(fd.as_fd(), &buf, start).map_err(errno_io("write", p()))?;
                self.stats.written_bytes += end - start;
                super::progress::bytes(end - start);
                map.record_blocks(b, &buf);
                b += n;
            }
        }
        drop(fd);
        self.copy_attrs(h, out_dir, name, rel)?;
        let maps = self.out_maps.as_ref().expect("layer output has maps");
        let map_crc32c = maps.store(&map)?;
        blockmap::write_marker(out_dir, name, id, self.userxattr)
            .map_err(errno_io("mark as partial", p()))?;
        if !below_fb.is_empty() {
            sys::setxattr(out_dir, name, below_xattr(self.userxattr), below_fb, 0)
                .map_err(errno_io("set layervol.below of", p()))?;
        }
        self.set_times(h, out_dir, name, rel)?;
        self.count_partial(&map);
        self.stats.merged_partials += 1;
        self.note_recreated(h, out_dir, name, rel)?;
        Ok(EntryKind::Partial {
            size,
            map: id,
            map_crc32c,
            present_blocks: map.present().count_blocks(),
        })
    }

    fn place_special(
        &mut self,
        h: &Hit,
        out_dir: BorrowedFd,
        name: &CStr,
        rel: &RelPath,
    ) -> Result<EntryKind> {
        let fmt = h.st.st_mode & libc::S_IFMT;
        let out_p = self.out_file(rel);
        let p = || out_p.clone();
        let target = if fmt == libc::S_IFLNK {
            Some(
                sys::readlinkat(h.dir.as_fd(), &h.name)
                    .map_err(errno_io("read link", self.src_path(h)))?,
            )
        } else {
            None
        };
        let kind = match fmt {
            libc::S_IFLNK => EntryKind::Symlink {
                target: LayerPath(target.clone().unwrap_or_default()),
            },
            libc::S_IFCHR | libc::S_IFBLK => EntryKind::Device { rdev: h.st.st_rdev },
            libc::S_IFIFO => EntryKind::Fifo,
            libc::S_IFSOCK => EntryKind::Socket,
            _ => {
                return Err(VolumeError::Unrepresentable {
                    path: self.src_path(h),
                    reason: format!("unknown file type {:o}", h.st.st_mode),
                });
            }
        };
        if self.try_link(h, out_dir, name, rel)? {
            return Ok(kind);
        }
        match &target {
            Some(t) => {
                let t = CString::new(t.clone())
                    .map_err(|_| errno_io("read link", self.src_path(h))(Errno::EINVAL))?;
                sys::symlinkat(&t, out_dir, name).map_err(errno_io("create", p()))?;
            }
            None => sys::mknodat(out_dir, name, fmt | 0o600, h.st.st_rdev)
                .map_err(errno_io("create", p()))?,
        }
        self.copy_attrs(h, out_dir, name, rel)?;
        self.set_times(h, out_dir, name, rel)?;
        Ok(kind)
    }

    fn set_times(&self, h: &Hit, out_dir: BorrowedFd, name: &CStr, rel: &RelPath) -> Result<()> {
        sys::utimensat(out_dir, name, &sys::times_of(&h.st))
            .map_err(errno_io("set times of", self.out_file(rel)))
    }

    /// Owner, xattrs (filtered for the output), mode; times are the caller's (directories
    /// get theirs at the very end). chown first: it clears set-id bits and capabilities.
    fn copy_attrs(&self, h: &Hit, out_dir: BorrowedFd, name: &CStr, rel: &RelPath) -> Result<()> {
        let p = || self.out_file(rel);
        let now = sys::fstatat(out_dir, name).map_err(errno_io("stat", p()))?;
        if (now.st_uid, now.st_gid) != (h.st.st_uid, h.st.st_gid) {
            sys::fchownat(out_dir, name, h.st.st_uid, h.st.st_gid)
                .map_err(errno_io("give its owner to", p()))?;
        }
        let is_dir = sys::is_dir(&h.st);
        let prefix = self.x.prefix.as_bytes();
        let keys = sys::listxattr(h.dir.as_fd(), &h.name)
            .map_err(errno_io("list xattrs of", self.src_path(h)))?;
        for key in keys {
            let k = key.to_bytes();
            if is_dir && key.as_c_str() == acl::DEFAULT {
                continue; // set after the entries (`dir_finish`)
            }
            if blockmap::PRIVATE_XATTR_PREFIXES
                .iter()
                .any(|pre| k.starts_with(pre.as_bytes()))
            {
                continue;
            }
            let stored: CString = match k.strip_prefix(prefix) {
                None => key.clone(),
                Some(rest) => match (rest.strip_prefix(b"overlay."), self.out) {
                    // A user's xattr of the overlay namespace, escaped in layers.
                    (Some(_), Output::Layer { .. })
                    | (Some(_), Output::Plain { escaped: true }) => key.clone(),
                    (Some(inner), Output::Plain { escaped: false }) => {
                        let mut v = prefix.to_vec();
                        v.extend_from_slice(inner);
                        CString::new(v).expect("from a CStr")
                    }
                    // Format xattrs: recomputed (opaque, redirect) or kept (origin, impure,
                    // nlink...) in a layer; never in a plain tree.
                    (None, Output::Layer { .. }) => {
                        if is_dir && (rest == b"opaque" || rest == b"redirect") {
                            continue;
                        }
                        key.clone()
                    }
                    (None, Output::Plain { .. }) => continue,
                },
            };
            let Some(v) = sys::getxattr(h.dir.as_fd(), &h.name, &key)
                .map_err(errno_io("read xattrs of", self.src_path(h)))?
            else {
                continue;
            };
            sys::setxattr(out_dir, name, &stored, &v, 0).map_err(errno_io("set xattrs of", p()))?;
        }
        if h.st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            sys::fchmodat(out_dir, name, h.st.st_mode & 0o7777).map_err(errno_io("chmod", p()))?;
        }
        Ok(())
    }
}
