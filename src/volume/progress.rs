//! Counters of the long volume operations (importing a tree, building a merged tree for an
//! export or a squash, checksumming a layer to seal or verify it), bumped by the loops that do
//! the work and read by a command that shows how far it got (`volume create --from`, `verify`,
//! `export`, an offline `squash`). Process-wide relaxed atomics: bumping one costs nothing
//! next to the work it counts, and a daemon that squashes and seals layers in the background
//! never reads them.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// What the counted work is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// Copying a tree into a layer (`entries` made, `bytes` of file data copied).
    Copy,
    /// Reading a layer's files to checksum them (`entries` seen, `bytes` read).
    Checksum,
}

static PHASE: AtomicU8 = AtomicU8::new(0);
static ENTRIES: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// Starts counting `phase` from zero; the counts go on if it is the phase already counted
/// (verify checksums one layer after the other).
pub fn start(phase: Phase) {
    if PHASE.swap(phase as u8, Ordering::Relaxed) != phase as u8 {
        ENTRIES.store(0, Ordering::Relaxed);
        BYTES.store(0, Ordering::Relaxed);
    }
}

/// Back to idle, counts at zero (before an operation whose progress is shown).
pub fn reset() {
    PHASE.store(Phase::Idle as u8, Ordering::Relaxed);
    ENTRIES.store(0, Ordering::Relaxed);
    BYTES.store(0, Ordering::Relaxed);
}

pub fn entry() {
    ENTRIES.fetch_add(1, Ordering::Relaxed);
}

pub fn bytes(n: u64) {
    BYTES.fetch_add(n, Ordering::Relaxed);
}

/// The phase and its counts (entries, bytes) so far.
pub fn now() -> (Phase, u64, u64) {
    let phase = match PHASE.load(Ordering::Relaxed) {
        1 => Phase::Copy,
        2 => Phase::Checksum,
        _ => Phase::Idle,
    };
    (
        phase,
        ENTRIES.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}
