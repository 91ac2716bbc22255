//! fs-tests: the differential conformance suite of layervol.
//!
//! Every scenario builds the same lower layers twice, mounts one copy with kernel OverlayFS
//! (the oracle, see [`harness::KERNEL_OPTIONS`]) and the other with the implementation
//! under test, runs the same list of operations on both through plain system calls, and
//! requires everything observable to be equal:
//! - the result or errno of every call ([`ops`]);
//! - the merged tree at checkpoints and at the end: names, types, permission bits,
//!   owners, nlink, sizes, rdev, symlink targets, contents, xattrs, readdir d_type
//!   ([`observe`]);
//! - inode identity, never inode values: hard links share an inode, labelled inodes are
//!   equal exactly when the kernel's are (e.g. "same inode before and after copy-up"), and
//!   paths that keep their inode across a remount or a rotation on the kernel keep it on
//!   the implementation ([`scenario`]);
//! - after unmounting: the upper directory and the lower layers on disk, normalised
//!   (work dir ignored; bookkeeping xattrs such as `trusted.overlay.origin`/`impure`/
//!   `nlink`/`uuid` and the upper root's xattrs ignored; whiteouts compared as "whiteout";
//!   the opaque xattr compared by value; redirects by presence), plus the view a read-only
//!   kernel overlay gives of those layers, which compares what redirects mean rather than
//!   how they are spelled and proves the upper is in the kernel's format;
//! - timestamps only where they are deterministic: times that come from the layers or from
//!   a scenario's utimens must be equal to the nanosecond, times set to "now" by the
//!   filesystem must be "now" on both sides; atime/ctime and directory sizes are ignored
//!   (see [`observe`] for why).
//!
//! Trials: `GROUP::NAME` for the hand-written scenarios ([`scenarios`]); `rotated::GROUP::NAME`
//! for their rotation variants (the same ops with up to three rotations inserted: unmount,
//! the upper becomes the top lower layer, new empty upper and work dir, mount again; the
//! `mount` group rotates explicitly and has no variant); `random::*` for the proptest
//! trials ([`random`]). A remount keeps the work dir (the kernel keeps its hard-link index
//! there); a rotation starts a fresh one, as a new upper needs.
//!
//! Volume mode ([`volume`]): `volume::GROUP::NAME` (every group but `mount`) and
//! `volume::random::ops` run on a layervol *volume* whose base layer is imported from the
//! merged view of the scenario's lowers, with a live snapshot (`layervol snapshot`, no
//! unmount) wherever the rotation variant rotates, plus up to two live snapshots where
//! files are open (the kernel does nothing there: a snapshot must be invisible). The oracle
//! is kernel overlayfs with the same options as in overlay mode, rotating at the same
//! points. Compared: the result of every call, the merged views, inode identity
//! and stability, `layervol verify` after every snapshot and at the end, and the view of the
//! volume mounted again. The upper/layer directories are *not* compared in volume mode: a
//! volume's layers hold partial files (block-level copy-up) and differ from the kernel's
//! upper dirs by design.
//!
//! Environment:
//! - `FS_TESTS_IMPL`: `layervol` (default), `kernel` (a second kernel overlay: validates
//!   the suite, must pass 100 %; in volume mode it runs over a flattened copy of the
//!   lowers, see [`volume`]), `fuse-overlayfs` (a reference FUSE overlay; the volume trials
//!   are ignored);
//! - `FS_TESTS_SHOW_KNOWN`: print the differences of known deviations and bugs too.
//! - `FS_TESTS_PROPTEST_CASES` (default 32) and `FS_TESTS_SEED` (default fixed) for the
//!   randomized trials ([`random`]);
//! - `FS_TESTS_TMPDIR` (default /tmp), `FS_TESTS_KEEP=1` keeps the directories of failed
//!   scenarios, `FS_TESTS_TIMEOUT` (seconds, default 120) aborts a hung FUSE mount,
//!   `FS_TESTS_TRACE=1` prints every op with both outcomes (use with `--test-threads=1`),
//!   `FS_TESTS_KERNEL2_OPTIONS` overrides the options of the second kernel mount,
//!   `FS_TESTS_LAYERVOL_OPTIONS` adds options to every layervol mount (e.g. `io_uring=on`).
//!
//! Run: `cargo test --release --test fs-tests [-- FILTER] [--list]`, as root.

mod dsl;
mod harness;
mod layer;
mod observe;
mod ops;
mod random;
mod scenario;
mod scenarios;
mod sys;
mod volume;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};

use crate::harness::Impl;
use crate::scenario::{Config, Mode, Scenario};

/// Rotations inserted into each scenario's rotation variant (`rotated::...`); the volume
/// variant (`volume::...`) takes live snapshots at the same points.
const ROTATIONS: usize = 3;

/// Extra live snapshots of a volume variant at points where files are open (the kernel
/// cannot rotate there and does nothing; see [`ops::Op::Snapshot`]).
const OPEN_SNAPSHOTS: usize = 2;

/// Fails loudly when the suite cannot run for real: it needs root (mounting, mknod,
/// trusted.* xattrs, chown) and /dev/fuse.
fn preflight() -> Result<(), String> {
    let mut problems = Vec::new();
    if sys::geteuid() != 0 {
        problems.push("must run as root (mount, mknod, trusted.* xattrs, chown)".to_string());
    }
    if !Path::new("/dev/fuse").exists() {
        problems.push("/dev/fuse is missing".to_string());
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("overlay"))
    {
        problems.push("kernel overlayfs is not available (modprobe overlay)".to_string());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Scenarios where layervol knowingly differs from the kernel, each with the reason. They
/// still run: a known deviation that starts to match the kernel fails the trial, so this list
/// can only shrink. Only layervol runs are affected (`FS_TESTS_IMPL=kernel` must pass all).
const KNOWN_DEVIATIONS: &[(&str, &str)] = &[];

/// Known layervol bugs, each with what is wrong. They run like the known deviations (a bug
/// that gets fixed fails its trial until it is removed from here), but unlike those they are
/// defects to fix, listed in the issue notes.
const KNOWN_BUGS: &[(&str, &str)] = &[];

/// The reason a trial is expected to fail, for layervol runs only.
fn known_for(name: &str, imp: &Impl) -> Option<&'static str> {
    KNOWN_DEVIATIONS
        .iter()
        .chain(KNOWN_BUGS)
        .find(|(n, _)| *n == name)
        .filter(|_| matches!(imp, Impl::Layervol))
        .map(|(_, why)| *why)
}

/// A trial's verdict: a known deviation or bug must still fail (so the lists only shrink).
fn expect(name: &str, known: Option<&str>, r: Result<(), String>) -> Result<(), Failed> {
    match (r, known) {
        (r, None) => r.map_err(Failed::from),
        (Err(e), Some(why)) => {
            eprintln!("known deviation or bug {name}: {why}");
            if std::env::var_os("FS_TESTS_SHOW_KNOWN").is_some() {
                eprintln!("{e}");
            }
            Ok(())
        }
        (Ok(()), Some(_)) => Err(Failed::from(format!(
            "{name} now matches the kernel: remove it from KNOWN_DEVIATIONS / KNOWN_BUGS"
        ))),
    }
}

fn main() {
    let args = Arguments::from_args();
    sys::set_umask(0o022);
    let imp = Impl::from_env().unwrap_or_else(|e| {
        eprintln!("fs-tests: {e}");
        std::process::exit(2);
    });
    if !args.list
        && let Err(e) = preflight()
    {
        eprintln!(
            "\nfs-tests: CANNOT RUN: {e}\nfs-tests: this suite must run as root on a machine with FUSE and overlayfs; refusing to skip.\n"
        );
        std::process::exit(1);
    }
    let base = std::env::var_os("FS_TESTS_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let run_dir = base.join(format!("fs-tests.{}", std::process::id()));
    let cfg = Arc::new(Config {
        imp,
        tmp: run_dir.clone(),
        keep: std::env::var("FS_TESTS_KEEP").is_ok_and(|v| v == "1"),
        trace: std::env::var("FS_TESTS_TRACE").is_ok_and(|v| v == "1"),
    });

    let mut trials = Vec::new();
    let mut add = |s: Scenario| {
        let cfg = Arc::clone(&cfg);
        let known = known_for(&s.name, &cfg.imp);
        // Volume mode is layervol's own: fuse-overlayfs has nothing to run.
        let ignored = s.mode == Mode::Volume && cfg.imp == Impl::FuseOverlayfs;
        trials.push(
            Trial::test(s.name.clone(), move || {
                expect(&s.name, known, scenario::run(&s, &cfg))
            })
            .with_ignored_flag(ignored),
        );
    };
    let mut rotated = Vec::new();
    let mut volume = Vec::new();
    for (group, list) in scenarios::all() {
        for mut s in list {
            s.name = format!("{group}::{}", s.name);
            if group != "mount" {
                if let Some(mut r) = s.rotated(ROTATIONS) {
                    r.name = format!("rotated::{}", s.name);
                    rotated.push(r);
                }
                let mut v = s.volume(ROTATIONS, OPEN_SNAPSHOTS);
                v.name = format!("volume::{}", s.name);
                volume.push(v);
            }
            add(s);
        }
    }
    rotated.into_iter().for_each(&mut add);
    volume.into_iter().for_each(&mut add);
    for t in random::trials() {
        let cfg = Arc::clone(&cfg);
        let ignored = t.mode() == Mode::Volume && cfg.imp == Impl::FuseOverlayfs;
        let known = known_for(&t.name(), &cfg.imp);
        trials.push(
            Trial::test(t.name(), move || expect(&t.name(), known, t.run(&cfg)))
                .with_ignored_flag(ignored),
        );
    }

    let conclusion = libtest_mimic::run(&args, trials);
    if !cfg.keep || !conclusion.has_failed() {
        let _ = harness::remove_tree(&run_dir);
    }
    conclusion.exit();
}
