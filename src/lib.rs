//! layervol: a FUSE layered volume filesystem with OverlayFS semantics.
//!
//! - `layer`: the on-disk format of a layer (kernel OverlayFS format)
//! - `fs`: the engine (merged view, copy-up, whiteouts, redirects) and its fuser adapter
//! - `options`: mount options and their validation
//! - `daemon`: mounting, daemonising, serving
//! - `sys`: safe wrappers over the `*at` system calls
//! - `volume`: volume mode's on-disk building blocks (extents, partial files, manifests, store)

pub mod cli;
pub mod control;
pub mod daemon;
pub mod fs;
pub mod layer;
pub mod mount;
pub mod options;
pub mod sys;
pub mod volume;
pub mod volume_cli;
