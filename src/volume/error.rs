//! The one error type of the volume subsystem.
//!
//! Every variant names what failed and on what (a path, an epoch, a map id) and its message
//! says what to do about it. Hot-path block-map operations on an open file descriptor return
//! `sys::Result` (an errno) instead, because the engine answers FUSE requests with errnos;
//! `VolumeError::errno` maps the other way for the engine's adapter.

use std::io;
use std::path::PathBuf;

use super::blockmap::MapDecodeError;
use super::{LayerState, MapId};
use crate::sys::Errno;

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path} is not a layervol volume (no volume.json); create one with `layervol volume create`"
    )]
    NotAVolume { path: PathBuf },

    #[error(
        "cannot create a volume at {path}: it exists and is not an empty directory; choose a new path or remove it (a crashed `volume create` leaves a directory without volume.json)"
    )]
    TargetNotEmpty { path: PathBuf },

    #[error(
        "{path}: {kind} format version {found} is not supported (this build reads major version {supported}); upgrade layervol, or the file is damaged"
    )]
    UnsupportedVersion {
        path: PathBuf,
        kind: &'static str,
        found: String,
        supported: u32,
    },

    #[error(
        "{path}: checksum mismatch (stored {stored:08x}, computed {computed:08x}): the file is damaged; restore the volume from a replica or backup"
    )]
    ChecksumMismatch {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },

    #[error(
        "{path}: malformed {kind}: {reason}; the file is damaged or was not written by layervol"
    )]
    Malformed {
        path: PathBuf,
        kind: &'static str,
        reason: String,
    },

    #[error(
        "{path}: damaged block map: {source}; run `layervol verify` to see what else is affected"
    )]
    BadBlockMap {
        path: PathBuf,
        #[source]
        source: MapDecodeError,
    },

    #[error(
        "{path}: holds block map {found}, but map {expected} was asked for: the sidecar was renamed or overwritten; run `layervol verify`"
    )]
    MapIdMismatch {
        path: PathBuf,
        expected: MapId,
        found: MapId,
    },

    #[error(
        "invalid block size {block_size}: it must be a power of two from {min} to {max} bytes (default 4096)"
    )]
    InvalidBlockSize { block_size: u64, min: u32, max: u32 },

    #[error(
        "{path}: block size {found} differs from the volume's {expected}; the layer does not belong to this volume"
    )]
    BlockSizeMismatch {
        path: PathBuf,
        expected: u32,
        found: u32,
    },

    #[error("volume {path} has no layer with epoch {epoch}; `layervol status` lists the layers")]
    NoSuchEpoch { path: PathBuf, epoch: u64 },

    #[error("layer {epoch} of {path} is {state}: only a frozen layer can be {action}")]
    NotFrozen {
        path: PathBuf,
        epoch: u64,
        state: LayerState,
        action: &'static str,
    },

    #[error(
        "volume {path} is in use by another process (its lock is held); unmount it or wait for the other layervol command to finish"
    )]
    Locked { path: PathBuf },

    #[error("volume {path} was opened read-only; open it with `Volume::open` to {action}")]
    ReadOnly { path: PathBuf, action: &'static str },

    #[error("cannot import {path}: {reason}")]
    Unrepresentable { path: PathBuf, reason: String },

    #[error(
        "volume {path} is inconsistent: {reason}; run `layervol verify` and restore from a replica if it reports damage"
    )]
    Inconsistent { path: PathBuf, reason: String },

    #[error("cannot squash volume {path}: {reason}")]
    SquashRefused { path: PathBuf, reason: String },
}

impl VolumeError {
    /// The errno the engine should answer a request with when this error stops it.
    pub fn errno(&self) -> Errno {
        match self {
            VolumeError::Io { source, .. } => source
                .raw_os_error()
                .map(Errno::from_raw)
                .unwrap_or(Errno::EIO),
            VolumeError::Locked { .. } => Errno::EBUSY,
            VolumeError::ReadOnly { .. } => Errno::EROFS,
            VolumeError::NoSuchEpoch { .. } | VolumeError::NotAVolume { .. } => Errno::ENOENT,
            VolumeError::InvalidBlockSize { .. } => Errno::EINVAL,
            _ => Errno::EIO,
        }
    }
}

/// `map_err` helper: an errno from `sys` becomes `VolumeError::Io` naming the operation and
/// the path it was applied to.
pub(crate) fn errno_io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(Errno) -> VolumeError {
    let path = path.into();
    move |e| VolumeError::Io {
        op,
        path,
        source: io::Error::from_raw_os_error(e as i32),
    }
}

/// `map_err` helper for `std::io` errors.
pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> VolumeError {
    let path = path.into();
    move |source| VolumeError::Io { op, path, source }
}
