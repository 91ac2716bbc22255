//! A scenario (layers + ops), how it is run on both sides, and how the runs are compared.
//!
//! Each side (the kernel oracle, then the implementation under test) gets its own copy of
//! the layers, is mounted, runs every op, and records:
//! - the outcome of every op (value or errno);
//! - a snapshot of the merged view at every `checkpoint`, around every `remount`/`rotate`,
//!   and at the end;
//! - inode identity: hard-link groups inside every snapshot, the equivalence relation of
//!   the labels recorded by `ino` ops, and which paths kept their inode across each
//!   remount/rotation;
//! - after the final unmount (work dir deleted): every layer directory (upper and lowers,
//!   normalised by [`observe::normalise_layer`]) and the view a read-only kernel overlay
//!   gives of "upper on top of the lowers" (which compares what redirects mean rather than
//!   how they are spelled, and checks the upper is one the kernel understands).
//!
//! In [`Mode::Volume`] the implementation side is a layervol volume (see [`crate::volume`]):
//! rotations are live snapshots there, layer directories are not compared, and the final
//! "view" is the volume mounted again.
//!
//! Inode stability across a remount or rotation is compared one way only: where the kernel
//! keeps a path's inode, the implementation must keep it too (it may be more stable than
//! the kernel, e.g. for copied-up files after a rotation).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::harness::{self, Impl, Mount, MountVia, Stack};
use crate::layer::Layer;
use crate::observe::{self, Tree};
use crate::ops::{Exec, Label, Op, Outcome};
use crate::volume::{self, Volume};

/// How the implementation side of a scenario is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Overlay mode: the implementation mounts the scenario's layers like `mount -t
    /// overlay`; rotations unmount, move the upper into the lowers and mount again.
    #[default]
    Overlay,
    /// Volume mode ([`crate::volume`]): a layervol volume whose base layer is the merged
    /// view of the scenario's layers; [`Op::Rotate`] is a live snapshot on the volume (and
    /// still a rotation on the kernel oracle, mounted with `index=off`); layer directories
    /// are not compared.
    Volume,
}

/// A named list of ops over a stack of lower layers.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    /// Lower layers, top first.
    pub layers: Vec<Layer>,
    pub ops: Vec<Op>,
    pub via: MountVia,
    pub mode: Mode,
}

impl Scenario {
    pub fn new(name: &str) -> Scenario {
        Scenario {
            name: name.to_string(),
            layers: Vec::new(),
            ops: Vec::new(),
            via: MountVia::Direct,
            mode: Mode::Overlay,
        }
    }

    /// Adds a lower layer below the ones already added (the first call is the top layer).
    pub fn lower(mut self, layer: Layer) -> Scenario {
        self.layers.push(layer);
        self
    }

    pub fn ops(mut self, ops: impl IntoIterator<Item = Op>) -> Scenario {
        self.ops.extend(ops);
        self
    }

    /// The rotation variant: the same ops with up to `max` rotations (upper becomes a lower
    /// layer, see [`Op::Rotate`]) spread evenly over the points where no file is open.
    /// `None` if there is no such point.
    pub fn rotated(&self, max: usize) -> Option<Scenario> {
        let mut open = std::collections::BTreeSet::new();
        let mut points = Vec::new();
        for (i, op) in self.ops.iter().enumerate() {
            match op {
                Op::Open(slot, ..) => {
                    open.insert(*slot);
                }
                Op::Close(slot) => {
                    open.remove(slot);
                }
                _ => {}
            }
            let last = i + 1 == self.ops.len();
            let next_is_control = matches!(
                self.ops.get(i + 1),
                Some(Op::Rotate | Op::Remount | Op::Checkpoint | Op::Snapshot)
            );
            if open.is_empty() && !last && !next_is_control {
                points.push(i);
            }
        }
        if points.is_empty() {
            return None;
        }
        let n = points.len().min(max);
        let chosen: Vec<usize> = (0..n)
            .map(|k| points[(2 * k + 1) * points.len() / (2 * n)])
            .collect();
        let mut ops = Vec::new();
        for (i, op) in self.ops.iter().enumerate() {
            ops.push(op.clone());
            if chosen.contains(&i) {
                ops.push(Op::Rotate);
            }
        }
        Some(Scenario {
            name: self.name.clone(),
            layers: self.layers.clone(),
            ops,
            via: self.via,
            mode: self.mode,
        })
    }

    /// The volume variant: the ops of the rotation variant (or the plain ops when there is
    /// no point to rotate at), run in [`Mode::Volume`], where each rotation is a live
    /// snapshot on the volume; plus up to `open_max` [`Op::Snapshot`]s spread over the
    /// points where files are open (there the kernel cannot rotate; it does nothing).
    pub fn volume(&self, max: usize, open_max: usize) -> Scenario {
        let base = self.rotated(max).unwrap_or_else(|| self.clone());
        let mut open = std::collections::BTreeSet::new();
        let mut points = Vec::new();
        for (i, op) in base.ops.iter().enumerate() {
            match op {
                Op::Open(slot, ..) => {
                    open.insert(*slot);
                }
                Op::Close(slot) => {
                    open.remove(slot);
                }
                _ => {}
            }
            let next_is_control = matches!(
                base.ops.get(i + 1),
                None | Some(Op::Rotate | Op::Remount | Op::Checkpoint | Op::Snapshot)
            );
            if !open.is_empty() && !next_is_control {
                points.push(i);
            }
        }
        let n = points.len().min(open_max);
        let chosen: Vec<usize> = (0..n)
            .map(|k| points[(2 * k + 1) * points.len() / (2 * n)])
            .collect();
        let mut ops = Vec::new();
        for (i, op) in base.ops.iter().enumerate() {
            ops.push(op.clone());
            if chosen.contains(&i) {
                ops.push(Op::Snapshot);
            }
        }
        Scenario {
            ops,
            mode: Mode::Volume,
            via: MountVia::Direct,
            ..base
        }
    }

    /// Mount the implementation with `mount -t fuse.layervol` instead of running it directly.
    pub fn via_helper(mut self) -> Scenario {
        self.via = MountVia::Helper;
        self
    }
}

/// Suite-wide settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub imp: Impl,
    /// Where scenario directories are created.
    pub tmp: PathBuf,
    /// Keep the directories of failed scenarios.
    pub keep: bool,
    /// Print every op with both outcomes, also for passing scenarios.
    pub trace: bool,
}

/// Everything one side observed.
#[derive(Default)]
struct SideRun {
    /// `None`: not run (a fatal error happened before).
    outcomes: Vec<Option<Outcome>>,
    /// (description, merged view).
    snapshots: Vec<(String, Tree)>,
    /// (op index of the remount/rotate, path -> inode kept).
    stability: Vec<(usize, BTreeMap<String, bool>)>,
    labels: BTreeMap<String, Label>,
    /// (layer name, normalised tree) after the final unmount (overlay mode only).
    layers: Vec<(String, Tree)>,
    /// View of the final layers: a read-only kernel overlay of them; in volume mode, the
    /// volume mounted again and the kernel's stack mounted again (with its index).
    view: Option<Result<Tree, String>>,
    /// Paths whose st_ino changed across a live snapshot at a rotation point (volumes
    /// only; at other snapshots the kernel comparison already requires stability).
    unstable: Vec<String>,
    /// Failures of `layervol verify VOL` after each live snapshot and after the final
    /// unmount (volumes only).
    verify: Vec<String>,
    /// An error that stopped the run (mount failure, daemon death, ...).
    fatal: Option<String>,
    /// Tail of the daemon log, for reports.
    log: String,
}

/// What one side of a scenario mounts.
#[derive(Clone, Debug)]
enum Side {
    /// Kernel overlayfs with these options over the scenario's layers (the oracle).
    Kernel(String),
    /// The implementation under test over the scenario's layers (overlay mode).
    Overlay(Impl, MountVia),
    /// A layervol volume imported from the merged view of the layers ([`crate::volume`]).
    Volume,
    /// Kernel overlayfs with these options over a flattened copy of the merged view of the
    /// layers (`FS_TESTS_IMPL=kernel` in volume mode, see [`crate::volume`]).
    FlatKernel(String),
}

/// Runs the scenario on both sides and compares; `Err` carries the full report.
pub fn run(s: &Scenario, cfg: &Config) -> Result<(), String> {
    let dir = cfg.tmp.join(s.name.replace("::", "."));
    harness::remove_tree(&dir)?;
    let (oracle_side, cand_side) = match (s.mode, cfg.imp) {
        (Mode::Overlay, imp) => (
            Side::Kernel(harness::KERNEL_OPTIONS.to_string()),
            Side::Overlay(imp, s.via),
        ),
        (Mode::Volume, Impl::Layervol) => (
            Side::Kernel(harness::VOLUME_KERNEL_OPTIONS.to_string()),
            Side::Volume,
        ),
        (Mode::Volume, Impl::Kernel) => (
            Side::Kernel(harness::VOLUME_KERNEL_OPTIONS.to_string()),
            Side::FlatKernel(harness::kernel2_volume_options()),
        ),
        (Mode::Volume, Impl::FuseOverlayfs) => {
            return Err("volume mode is layervol's own: nothing to run on fuse-overlayfs".into());
        }
    };
    let oracle = run_side(s, &oracle_side, &dir.join("kernel"));
    let cand = run_side(s, &cand_side, &dir.join(cfg.imp.name()));
    if let Some(f) = &oracle.fatal {
        return Err(format!(
            "scenario {}: the kernel oracle itself failed: {f}\n(kept {})",
            s.name,
            dir.display()
        ));
    }
    if cfg.trace {
        eprintln!("{}", trace(s, &oracle, &cand, cfg.imp.name()));
    }
    let diffs = compare(s, &oracle, &cand, ("kernel", cfg.imp.name()));
    if diffs.is_empty() {
        harness::remove_tree(&dir)?;
        return Ok(());
    }
    let mut msg = report(s, cfg.imp.name(), &diffs, &cand);
    if cfg.keep {
        let _ = write!(msg, "\nscenario directories kept in {}", dir.display());
    } else {
        harness::remove_tree(&dir)?;
    }
    Err(msg)
}

/// Runs the scenario on one side. Never panics on filesystem misbehaviour: failures are
/// recorded in the returned [`SideRun`].
fn run_side(s: &Scenario, side: &Side, dir: &Path) -> SideRun {
    let mut run = SideRun {
        outcomes: vec![None; s.ops.len()],
        ..SideRun::default()
    };
    if let Err(e) = drive(s, side, dir, &mut run) {
        run.fatal = Some(e);
    }
    run
}

fn drive(s: &Scenario, side: &Side, dir: &Path, run: &mut SideRun) -> Result<(), String> {
    let mut stack = Stack::create(dir, &s.layers)?;
    let vol = match side {
        Side::Volume => Some(Volume::import(&stack)?),
        Side::FlatKernel(_) => {
            volume::flatten(&mut stack)?;
            None
        }
        _ => None,
    };
    if s.mode == Mode::Volume && vol.is_none() {
        stack.inherit_root = true;
        stack.inherit_root_attrs()?;
    }
    let mount_it = |stack: &Stack| match (side, &vol) {
        (Side::Kernel(opts) | Side::FlatKernel(opts), _) => Mount::kernel(stack, opts),
        (Side::Overlay(imp, via), _) => Mount::new(*imp, *via, stack),
        (Side::Volume, Some(vol)) => vol.mount(),
        (Side::Volume, None) => unreachable!("a volume side has a volume"),
    };
    // The oracle of a volume stands for a volume's live snapshot, which changes nothing in
    // the view. A kernel rotation does that too, except that it leaves the hard-link index
    // behind in the old work dir, which breaks the hard links the kernel copied up: while
    // the index holds any, the kernel remounts instead (the snapshot still happens on the
    // volume).
    let volume_mode = s.mode == Mode::Volume;
    let mut mount = mount_it(&stack)?;
    let mut exec = Exec::new(&stack.mnt);
    for (i, op) in s.ops.iter().enumerate() {
        match op {
            Op::Checkpoint => {
                run.snapshots.push((
                    format!("checkpoint at op #{i}"),
                    observe::snapshot(&stack.mnt),
                ));
            }
            Op::Snapshot => {
                let before = observe::snapshot(&stack.mnt);
                if let Some(vol) = &vol {
                    vol.snapshot(&mount)?;
                    vol.verify_after_snapshot(i, &mut run.verify);
                }
                let after = observe::snapshot(&stack.mnt);
                run.stability
                    .push((i, observe::ino_stability(&before, &after)));
                run.snapshots
                    .push((format!("merged view before op #{i} ({op})"), before));
                run.snapshots
                    .push((format!("merged view after op #{i} ({op})"), after));
            }
            Op::Remount | Op::Rotate => {
                exec.close_all();
                let before = observe::snapshot(&stack.mnt);
                run.log = mount.log_tail();
                match (op, &vol) {
                    // A volume takes a live snapshot where the kernel rotates: no unmount.
                    (Op::Rotate, Some(vol)) => {
                        vol.snapshot(&mount)?;
                        vol.verify_after_snapshot(i, &mut run.verify);
                    }
                    _ => {
                        mount.unmount()?;
                        // A remount keeps the work dir (the kernel's index of hard links
                        // lives there); a rotation starts a fresh one.
                        if matches!(op, Op::Rotate) && !(volume_mode && stack.has_index()) {
                            stack.rotate()?;
                        }
                        mount = mount_it(&stack)?;
                    }
                }
                exec.epoch += 1;
                let after = observe::snapshot(&stack.mnt);
                let stability = observe::ino_stability(&before, &after);
                if vol.is_some() && matches!(op, Op::Rotate) {
                    // The kernel's rotation is a remount and may renumber; a live snapshot
                    // must not (the design promises st_ino stable across snapshots).
                    for (path, _) in stability.iter().filter(|(_, kept)| !**kept) {
                        run.unstable.push(format!(
                            "op #{i} {op}: {:?} changed its st_ino across the live snapshot",
                            if path.is_empty() { "/" } else { path }
                        ));
                    }
                }
                run.stability.push((i, stability));
                run.snapshots
                    .push((format!("merged view before op #{i} ({op})"), before));
                run.snapshots
                    .push((format!("merged view after op #{i} ({op})"), after));
            }
            _ => {
                run.outcomes[i] = Some(exec.apply(op));
                continue;
            }
        }
        run.outcomes[i] = Some(Outcome::Ok);
    }
    run.snapshots.push((
        "final merged view".to_string(),
        observe::snapshot(&stack.mnt),
    ));
    exec.close_all();
    run.labels = std::mem::take(&mut exec.labels);
    run.log = mount.log_tail();
    mount.unmount()?;
    if let Some(vol) = &vol {
        if let Err(e) = vol.verify() {
            run.verify.push(format!("after the final unmount: {e}"));
        }
        run.view = Some(vol.mount().and_then(|m| {
            let tree = observe::snapshot(m.path());
            m.unmount().map(|()| tree)
        }));
        return Ok(());
    }
    if s.mode == Mode::Volume {
        // The volume is mounted again, so the kernel is too: a read-only view of its layers
        // would drop the hard-link index (in the work dir), which the volume's layers do not
        // need (their hard links are real ones, `src/fs/links.rs`).
        run.view = Some(mount_it(&stack).and_then(|m| {
            let tree = observe::snapshot(&stack.mnt);
            m.unmount().map(|()| tree)
        }));
        return Ok(());
    }
    // The work dir is not compared, and the kernel's index/ in it holds extra hard links
    // that would inflate st_nlink of upper files.
    harness::remove_tree(&stack.work)?;

    let mut layers = vec![stack.upper.clone()];
    layers.extend(stack.lowers.iter().cloned());
    if s.mode == Mode::Overlay {
        let mut names = vec!["upper".to_string()];
        names.extend(stack.layer_names());
        for (name, path) in names.iter().zip(&layers) {
            run.layers.push((
                name.clone(),
                observe::normalise_layer(observe::snapshot(path)),
            ));
        }
    }
    run.view = Some(
        Mount::kernel_view(&layers, &dir.join("view")).and_then(|m| {
            let tree = observe::snapshot(m.path());
            m.unmount().map(|()| tree)
        }),
    );
    Ok(())
}

/// Every difference between the oracle run `a` and the candidate run `b`.
fn compare(s: &Scenario, a: &SideRun, b: &SideRun, names: (&str, &str)) -> Vec<String> {
    let (na, nb) = names;
    let mut out = Vec::new();
    if let Some(f) = &b.fatal {
        out.push(format!("{nb} run aborted: {f}"));
    }
    let volume = s.mode == Mode::Volume;
    for (i, (x, y)) in a.outcomes.iter().zip(&b.outcomes).enumerate() {
        let y = match (x, y) {
            (Some(Outcome::Meta(m)), Some(Outcome::Meta(n))) if volume => {
                Some(Outcome::Meta(observe::align_volume_meta(m, n)))
            }
            _ => y.clone(),
        };
        if let (Some(x), Some(y)) = (x, y)
            && *x != y
        {
            out.push(format!("op #{i} {}: {na}={x} {nb}={y}", s.ops[i]));
        }
    }
    let complete = b.fatal.is_none();
    if complete && a.snapshots.len() != b.snapshots.len() {
        out.push(format!(
            "snapshot count: {na}={} {nb}={}",
            a.snapshots.len(),
            b.snapshots.len()
        ));
    }
    let align = |x: &Tree, y: &Tree| {
        if volume {
            observe::align_volume_tree(x, y)
        } else {
            y.clone()
        }
    };
    for ((ctx, x), (_, y)) in a.snapshots.iter().zip(&b.snapshots) {
        out.extend(observe::diff_trees(ctx, x, &align(x, y), names));
    }
    for ((i, x), (_, y)) in a.stability.iter().zip(&b.stability) {
        for (path, kept) in x {
            if *kept && y.get(path) == Some(&false) {
                out.push(format!(
                    "op #{i} {}: {path:?} kept its st_ino in {na} but not in {nb}",
                    s.ops[*i]
                ));
            }
        }
    }
    out.extend(compare_labels(&a.labels, &b.labels, names, complete));
    out.extend(b.unstable.iter().cloned());
    for e in &b.verify {
        out.push(format!("layervol verify reports damage {e}"));
    }
    if complete {
        for ((name, x), (_, y)) in a.layers.iter().zip(&b.layers) {
            out.extend(observe::diff_trees(
                &format!("layer dir {name}"),
                x,
                y,
                names,
            ));
        }
        let ctx = match s.mode {
            Mode::Overlay => "kernel read-only view of the final layers",
            Mode::Volume => "view of the final layers (both mounted again)",
        };
        match (&a.view, &b.view) {
            (Some(Ok(x)), Some(Ok(y))) => {
                out.extend(observe::diff_trees(ctx, x, &align(x, y), names))
            }
            (Some(Ok(_)), Some(Err(e))) => out.push(format!("{ctx}: failed for {nb}: {e}")),
            (Some(Err(e)), _) => out.push(format!("{ctx}: failed for {na}: {e}")),
            _ => {}
        }
    }
    out
}

/// Compares the "same inode" relation over the recorded labels. Within one mount epoch the
/// relation must be identical. Across a remount or rotation it is compared one way: labels
/// the kernel reports as the same inode must be the same on the implementation, which may
/// keep inode numbers stable where the kernel does not (e.g. copied-up files after a
/// rotation).
fn compare_labels(
    a: &BTreeMap<String, Label>,
    b: &BTreeMap<String, Label>,
    (na, nb): (&str, &str),
    complete: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if complete {
        for l in a.keys().filter(|l| !b.contains_key(*l)) {
            out.push(format!("ino label {l:?} recorded in {na} only"));
        }
        for l in b.keys().filter(|l| !a.contains_key(*l)) {
            out.push(format!("ino label {l:?} recorded in {nb} only"));
        }
    }
    let common: Vec<&String> = a.keys().filter(|l| b.contains_key(*l)).collect();
    for (i, l1) in common.iter().enumerate() {
        for l2 in &common[i + 1..] {
            let same_a = a[*l1].ino == a[*l2].ino;
            let same_b = b[*l1].ino == b[*l2].ino;
            let same_epoch = a[*l1].epoch == a[*l2].epoch;
            if same_a != same_b && (same_epoch || same_a) {
                let say = |same: bool| {
                    if same {
                        "same inode"
                    } else {
                        "different inodes"
                    }
                };
                out.push(format!(
                    "ino labels {l1:?} and {l2:?}: {na}: {}, {nb}: {}",
                    say(same_a),
                    say(same_b)
                ));
            }
        }
    }
    out
}

/// Every op with both outcomes, one line each (`FS_TESTS_TRACE=1`).
fn trace(s: &Scenario, a: &SideRun, b: &SideRun, nb: &str) -> String {
    let mut msg = format!("trace of {}:\n", s.name);
    for (i, op) in s.ops.iter().enumerate() {
        let show = |o: &Option<Outcome>| o.as_ref().map_or("-".to_string(), |o| o.to_string());
        let (x, y) = (show(&a.outcomes[i]), show(&b.outcomes[i]));
        if x == y {
            let _ = writeln!(msg, "  #{i} {op} -> {x}");
        } else {
            let _ = writeln!(msg, "  #{i} {op} -> kernel={x} {nb}={y}");
        }
    }
    msg
}

const MAX_REPORTED: usize = 60;

fn report(s: &Scenario, nb: &str, diffs: &[String], cand: &SideRun) -> String {
    let mut msg = format!(
        "scenario {}: {} difference(s) between kernel overlayfs (oracle) and {nb}:\n",
        s.name,
        diffs.len()
    );
    for d in diffs.iter().take(MAX_REPORTED) {
        let _ = writeln!(msg, "  - {d}");
    }
    if diffs.len() > MAX_REPORTED {
        let _ = writeln!(msg, "  ... and {} more", diffs.len() - MAX_REPORTED);
    }
    let _ = writeln!(msg, "ops:");
    for (i, op) in s.ops.iter().enumerate() {
        let _ = writeln!(msg, "  #{i} {op}");
    }
    if !cand.log.is_empty() {
        let _ = writeln!(msg, "{nb} {}", cand.log);
    }
    msg
}
