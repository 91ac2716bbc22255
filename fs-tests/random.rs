//! Randomized differential trials (proptest).
//!
//! A generated sequence of ~20 namespace and data ops over a small set of names (so that
//! ops collide: rename over existing names, unlink of copied-up files, rmdir of merged dirs,
//! links to lower files, ...) runs on both mounts from the same two lower layers, and goes
//! through the same comparison as a hand-written scenario. A failing sequence is shrunk to
//! a minimal one, which the failure message shows as a ready-to-read op list.
//!
//! `volume::random::ops` runs the same kind of sequences in volume mode: its "rotations"
//! are live snapshots on the volume (rotations on the kernel oracle), its remounts remount
//! the volume.
//!
//! `FS_TESTS_PROPTEST_CASES` (default 32) sets the number of cases per trial and
//! `FS_TESTS_SEED` (default [`DEFAULT_SEED`]) the seed; the run is deterministic for a
//! given seed.

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, RngSeed, TestError, TestRunner};

use crate::dsl::*;
use crate::scenario::{self, Config, Mode};

pub const DEFAULT_SEED: u64 = 0x1a7e_5eed;

/// The name space ops draw from. Several exist in the lower layers below.
const NAMES: &[&str] = &["a", "b", "c", "d", "d/a", "d/b", "e", "e/a", "f"];

/// One randomized trial.
pub struct RandomTrial {
    name: &'static str,
    /// Include remounts and rotations in the generated sequences.
    rotation: bool,
    /// Run in volume mode ([`crate::volume`]): every rotation is a live snapshot on the
    /// volume (and a rotation on the kernel oracle).
    volume: bool,
}

pub fn trials() -> Vec<RandomTrial> {
    vec![
        RandomTrial {
            name: "random::ops",
            rotation: false,
            volume: false,
        },
        RandomTrial {
            name: "random::ops_with_rotation",
            rotation: true,
            volume: false,
        },
        RandomTrial {
            name: "volume::random::ops",
            rotation: true,
            volume: true,
        },
    ]
}

fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The two lower layers every random case starts from.
fn base_layers() -> [Layer; 2] {
    let top = Layer::new()
        .file("a", "top a\n")
        .xattr("a", "user.k", "lower")
        .dir("d")
        .file("d/a", "top d/a\n")
        .symlink("c", "a")
        .whiteout("f");
    let bottom = Layer::new()
        .file("a", "bottom a (hidden)\n")
        .file("b", "bottom b\n")
        .hardlink("e2", "b")
        .dir("d")
        .file("d/b", "bottom d/b\n")
        .dir("e")
        .file("e/a", "bottom e/a\n")
        .file("f", "whited out\n");
    [top, bottom]
}

fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(NAMES)
}

fn data() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["", "x", "hello\n", "0123456789abcdef"][..])
}

fn op_strategy(rotation: bool) -> BoxedStrategy<Op> {
    let modes = prop::sample::select(&[0o600u32, 0o644, 0o755, 0o700][..]);
    let basic = prop_oneof![
        4 => (name(), data()).prop_map(|(p, d)| write(p, d)),
        2 => (name(), data()).prop_map(|(p, d)| append(p, d)),
        2 => (name(), 0u64..20).prop_map(|(p, l)| truncate(p, l)),
        3 => name().prop_map(unlink),
        3 => name().prop_map(mkdir),
        2 => name().prop_map(rmdir),
        4 => (name(), name()).prop_map(|(a, b)| rename(a, b)),
        2 => (name(), name()).prop_map(|(a, b)| link(a, b)),
        1 => name().prop_map(|p| symlink("target", p)),
        2 => (name(), modes).prop_map(|(p, m)| chmod(p, m)),
        2 => (name(), data()).prop_map(|(p, v)| setxattr(p, "user.k", v)),
        1 => name().prop_map(|p| create(p, 0o640)),
        2 => name().prop_map(read),
        2 => name().prop_map(lstat),
        1 => prop::sample::select(&["", "d", "e"][..]).prop_map(readdir),
    ];
    if rotation {
        prop_oneof![
            20 => basic,
            1 => Just(remount()),
            2 => Just(rotate()),
        ]
        .boxed()
    } else {
        basic.boxed()
    }
}

impl RandomTrial {
    pub fn name(&self) -> String {
        self.name.to_string()
    }

    pub fn mode(&self) -> Mode {
        if self.volume {
            Mode::Volume
        } else {
            Mode::Overlay
        }
    }

    pub fn run(&self, cfg: &Config) -> Result<(), String> {
        let cases = env_u64("FS_TESTS_PROPTEST_CASES", 32) as u32;
        let seed = env_u64("FS_TESTS_SEED", DEFAULT_SEED);
        let pt = PtConfig {
            cases,
            failure_persistence: None,
            max_shrink_iters: 256,
            max_shrink_time: 30_000,
            rng_algorithm: RngAlgorithm::ChaCha,
            rng_seed: RngSeed::Fixed(seed),
            ..PtConfig::default()
        };
        let mut runner = TestRunner::new(pt);
        let strategy = prop::collection::vec(op_strategy(self.rotation), 1..=30);
        let [top, bottom] = base_layers();
        let result = runner.run(&strategy, |ops| {
            let mut s = Scenario::new(self.name)
                .lower(top.clone())
                .lower(bottom.clone())
                .ops(ops);
            s.mode = self.mode();
            scenario::run(&s, cfg).map_err(TestCaseError::fail)
        });
        match result {
            Ok(()) => Ok(()),
            Err(TestError::Fail(reason, _)) => Err(format!(
                "minimal failing sequence (FS_TESTS_SEED={seed}, {cases} cases):\n{reason}"
            )),
            Err(TestError::Abort(reason)) => Err(format!("proptest aborted: {reason}")),
        }
    }
}
