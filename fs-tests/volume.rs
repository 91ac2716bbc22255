//! Volume mode: the implementation side of the `volume::...` trials.
//!
//! A volume variant runs a scenario's ops on a layervol *volume* (`layervol volume create`,
//! `layervol mount`) instead of an overlay mount, takes live snapshots (`layervol snapshot
//! MNT`, no unmount) where the rotation variant rotates, and compares it with kernel
//! overlayfs (the oracle, mounted with [`crate::harness::VOLUME_KERNEL_OPTIONS`])
//! rotating its upper into its lowers at the same points.
//!
//! - Same starting view: a volume has one base layer, a scenario a stack of lower layers
//!   (whiteouts, opaque dirs, redirects). The base is imported from the merged view of the
//!   stack: a read-only kernel overlay of it is mounted and `layervol volume create VOL
//!   --from VIEW` copies it ([`Volume::import`]).
//! - Snapshots: every `Op::Rotate` is `layervol snapshot MNT --json` on the volume (its
//!   JSON must report the next epochs) and a rotation on the kernel; both close the open
//!   files first, and rotation points have none anyway. `Op::Snapshot` (inserted where
//!   files *are* open, where the kernel cannot rotate) is a live snapshot with the files
//!   kept open, and nothing on the kernel: a live snapshot must be invisible, so open
//!   descriptors must keep working and every path must keep its `st_ino`. `Op::Remount`
//!   unmounts the volume and mounts it again (see [`crate::ops::Op`]).
//! - Squash: every second snapshot is followed by `layervol squash MNT` (online, merging
//!   every frozen layer, with the scenario's files still open at `Op::Snapshot` points);
//!   a squash must not change anything observable either.
//! - `layervol verify VOL` must succeed after every live snapshot (the volume still
//!   mounted: it checks the frozen layers) and after the final unmount (all layers).
//! - Persistence: after the final unmount the volume and the kernel's stack are mounted
//!   again (the kernel with its work dir, whose index keeps lower hard links); the views
//!   must be equal.
//! - Not compared: the layer directories. A volume's layers hold partial files (sparse
//!   files with a `trusted.layervol.partial` block map, whose holes read from the layers
//!   below) under `VOL/layers/<epoch>/tree`, so they differ from the kernel's upper dirs by
//!   design; only merged views are compared, and `trusted.layervol.*` xattrs are ignored in
//!   them.
//! - Differences that come from the setup, not from the filesystem, are normalised:
//!   - the base layer is *flattened*: a directory merged from several lowers on the kernel
//!     is a plain directory in the volume, and overlayfs reports `nlink = 1` for merged
//!     directories only ([`crate::observe::align_volume_meta`]);
//!   - a volume's new active layer (at creation and at every snapshot) gets the root
//!     attributes of the layer below, while a kernel rotation starts from a fresh upper
//!     dir; the kernel side does the same with [`Stack::inherit_root_attrs`].
//!
//! With `FS_TESTS_IMPL=kernel` the candidate of a volume variant is a second kernel
//! overlay over a flattened copy of the lowers ([`flatten`], the kernel analogue of the
//! import) with the same options, rotating at the snapshot points. This validates the
//! volume-mode comparisons and normalisations themselves without layervol.

use std::cell::Cell;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::harness::{self, Impl, Mount, Stack};

fn layervol_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_layervol"))
}

/// A layervol volume of one scenario side.
pub struct Volume {
    /// The volume directory.
    pub path: PathBuf,
    mnt: PathBuf,
    /// `LAYERVOL_RUN_DIR`: the control sockets of this scenario's mounts.
    run_dir: PathBuf,
    /// `run_dir` is a fallback outside the scenario dir, removed on drop.
    own_run_dir: bool,
    /// Daemon log.
    log: PathBuf,
    /// The epoch the next snapshot must freeze.
    next_frozen: Cell<u64>,
}

/// Layers for a read-only kernel view: overlayfs without upper needs at least two lowers,
/// so a single layer gets an empty one below it (which changes nothing in the view).
fn view_layers(stack: &Stack) -> Result<Vec<PathBuf>, String> {
    let mut layers = stack.lowers.clone();
    if layers.len() < 2 {
        let empty = stack.dir.join("empty-layer");
        std::fs::create_dir_all(&empty).map_err(|e| format!("mkdir empty layer: {e}"))?;
        layers.push(empty);
    }
    Ok(layers)
}

/// Room for `/<16 hex digits>.sock` in a Unix socket path (`sun_path` is 108 bytes).
const MAX_RUN_DIR_LEN: usize = 108 - 1 - 22;

/// Fallback run dirs (when the scenario's own would make socket paths too long).
static FALLBACK_RUN_DIRS: AtomicUsize = AtomicUsize::new(0);

/// The scenario's `LAYERVOL_RUN_DIR`: `DIR/run`, or a short directory under the system
/// temp dir when that path would not fit a Unix socket address (the second value says
/// whether it is such a fallback, which [`Volume`] removes when dropped).
fn run_dir(dir: &Path) -> (PathBuf, bool) {
    let own = dir.join("run");
    if own.as_os_str().len() <= MAX_RUN_DIR_LEN {
        return (own, false);
    }
    let n = FALLBACK_RUN_DIRS.fetch_add(1, Ordering::Relaxed);
    let short = std::env::temp_dir().join(format!("fs-tests-run.{}.{n}", std::process::id()));
    (short, true)
}

impl Drop for Volume {
    fn drop(&mut self) {
        if self.own_run_dir {
            let _ = harness::remove_tree(&self.run_dir);
        }
    }
}

impl Volume {
    /// Creates `stack.dir/vol` whose base layer is the merged view of the stack's lower
    /// layers (imported from a read-only kernel overlay of them).
    pub fn import(stack: &Stack) -> Result<Volume, String> {
        let (run_dir, own_run_dir) = run_dir(&stack.dir);
        std::fs::create_dir_all(&run_dir).map_err(|e| format!("mkdir run dir: {e}"))?;
        let vol = Volume {
            own_run_dir,
            path: stack.dir.join("vol"),
            mnt: stack.mnt.clone(),
            run_dir,
            log: stack.dir.join("mnt.log"),
            next_frozen: Cell::new(2),
        };
        let view_dir = stack.dir.join("base-view");
        let view = Mount::kernel_view(&view_layers(stack)?, &view_dir)?;
        let created = vol.command(&[
            OsStr::new("volume"),
            OsStr::new("create"),
            vol.path.as_os_str(),
            OsStr::new("--from"),
            view_dir.as_os_str(),
        ]);
        view.unmount()?;
        created?;
        Ok(vol)
    }

    /// Runs `layervol ARGS` to completion; `Err` carries its exit status and output.
    fn command(&self, args: &[&OsStr]) -> Result<String, String> {
        let out = Command::new(layervol_bin())
            .args(args)
            .env("LAYERVOL_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("spawn layervol {args:?}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "layervol {args:?} exited with {}:\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                stdout
            ))
        }
    }

    /// `layervol mount VOL MNT`.
    pub fn mount(&self) -> Result<Mount, String> {
        let mut cmd = Command::new(layervol_bin());
        cmd.arg("mount");
        if let Some(extra) = harness::layervol_extra_options() {
            cmd.arg("-o").arg(extra);
        }
        cmd.arg(&self.path)
            .arg(&self.mnt)
            .env("LAYERVOL_RUN_DIR", &self.run_dir);
        Mount::spawn(Impl::Layervol, cmd, &self.mnt, self.log.clone())
    }

    /// A live snapshot of the mounted volume (`layervol snapshot MNT --json`); checks that
    /// it froze the expected epoch and started the next one.
    pub fn snapshot(&self, mount: &Mount) -> Result<(), String> {
        let out = self
            .command(&[
                OsStr::new("snapshot"),
                self.mnt.as_os_str(),
                OsStr::new("--json"),
            ])
            .map_err(|e| format!("live snapshot failed: {e}\n{}", mount.log_tail()))?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| format!("layervol snapshot --json printed no JSON ({e}): {out}"))?;
        let want = self.next_frozen.get();
        let (frozen, active) = (v["frozen_epoch"].as_u64(), v["active_epoch"].as_u64());
        if frozen != Some(want) || active != Some(want + 1) {
            return Err(format!(
                "layervol snapshot: expected epoch {want} frozen and {} active, got {out}",
                want + 1
            ));
        }
        self.next_frozen.set(want + 1);
        if !mount.daemon_alive() {
            return Err(format!(
                "daemon died during a live snapshot\n{}",
                mount.log_tail()
            ));
        }
        // Every second snapshot, squash every frozen layer online (open files and all):
        // the view must not change, and between squashes partial files chain across layers.
        if want % 2 == 1 {
            self.command(&[OsStr::new("squash"), self.mnt.as_os_str()])
                .map_err(|e| format!("online squash failed: {e}\n{}", mount.log_tail()))?;
            if !mount.daemon_alive() {
                return Err(format!(
                    "daemon died during an online squash\n{}",
                    mount.log_tail()
                ));
            }
        }
        Ok(())
    }

    /// `layervol verify VOL` right after the live snapshot at op `i` (the frozen layer is
    /// sealed before the snapshot returns, so it must verify while the volume stays
    /// mounted). Damage stays, so only the first failure is recorded in `problems`.
    pub fn verify_after_snapshot(&self, i: usize, problems: &mut Vec<String>) {
        if problems.is_empty()
            && let Err(e) = self.verify()
        {
            problems.push(format!("after the live snapshot at op #{i}: {e}"));
        }
    }

    /// `layervol verify VOL`: checks the frozen layers (all of them when unmounted).
    pub fn verify(&self) -> Result<(), String> {
        self.command(&[OsStr::new("verify"), self.path.as_os_str()])
            .map(drop)
    }
}

/// The kernel analogue of [`Volume::import`] (`FS_TESTS_IMPL=kernel`): copies the merged
/// view of the stack's lowers (a read-only kernel overlay of them) into one layer `base`,
/// which replaces them (`cp -a`, failing on xattrs it cannot copy).
pub fn flatten(stack: &mut Stack) -> Result<(), String> {
    let view_dir = stack.dir.join("base-view");
    let base = stack.dir.join("base");
    std::fs::create_dir_all(&base).map_err(|e| format!("mkdir base: {e}"))?;
    let view = Mount::kernel_view(&view_layers(stack)?, &view_dir)?;
    let copied = Command::new("cp")
        .args(["-dR", "--preserve=mode,ownership,timestamps,links,xattr"])
        .arg(view_dir.join("."))
        .arg(&base)
        .stdin(Stdio::null())
        .output();
    view.unmount()?;
    let out = copied.map_err(|e| format!("spawn cp: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cp -a {} {}: {}",
            view_dir.display(),
            base.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    for lower in std::mem::replace(&mut stack.lowers, vec![base]) {
        harness::remove_tree(&lower)?;
    }
    Ok(())
}
