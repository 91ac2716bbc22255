//! Volume mode: the on-disk building blocks of a managed volume.
//!
//! - `extents`: `ExtentSet`, sorted coalesced block ranges (present and dirty blocks)
//! - `blockmap`: partial files: the block map of a file copied up block by block, its binary
//!   sidecar encoding, the `layervol.partial` marker xattr, read and write planning, verify
//! - `manifest`: the versioned, checksummed manifest of a frozen layer
//! - `store`: the volume directory (`volume.json`, layer dirs, work dirs), create/import,
//!   open with validation, freeze, pin, seal, verify
//! - `meta`: the checksummed JSON envelope and the atomic-replace write every metadata file uses
//! - `scan`: walking a layer tree to build or check its manifest
//! - `import`: the faithful copy of a directory into a base layer
//! - `squash`: merging frozen layers into one (crash-safe, view-preserving), making the
//!   stack kernel-mountable, and exporting the merged view as a plain tree
//!
//! What this subsystem must never do: write into a frozen layer (the only exceptions are
//! `store`'s seal, which adds `manifest.json` next to the tree, and orphan-map collection);
//! follow a symlink inside a layer; leave a metadata file half written (every metadata update
//! is write-temp, fsync, rename, fsync-dir, so a crash leaves the old or the new state); or
//! panic on damaged input (damage is an error or a verify finding).
//!
//! It does not serve requests: the FUSE engine (`fs`) plugs these pieces in.

pub mod blockmap;
pub mod ctimes;
mod error;
pub mod extents;
mod import;
pub mod manifest;
pub mod meta;
pub mod progress;
pub mod scan;
pub mod squash;
#[cfg(test)]
mod squash_tests;
pub mod store;
#[cfg(test)]
mod store_tests;

use std::fmt;
use std::str::FromStr;

pub use blockmap::{BlockMap, MapDecodeError, MapStore, ReadSpan, Source};
pub use error::{Result, VolumeError};
pub use extents::ExtentSet;
pub use manifest::Manifest;
pub use store::{CreateOptions, Freeze, LayerRecord, LayerState, Volume};

/// Default block size: the page size, so that mmap writes dirty whole blocks.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;

/// Checks that `block_size` is usable: a power of two in `MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE`.
pub fn check_block_size(block_size: u64) -> Result<u32> {
    if block_size.is_power_of_two()
        && (MIN_BLOCK_SIZE as u64..=MAX_BLOCK_SIZE as u64).contains(&block_size)
    {
        Ok(block_size as u32)
    } else {
        Err(VolumeError::InvalidBlockSize {
            block_size,
            min: MIN_BLOCK_SIZE,
            max: MAX_BLOCK_SIZE,
        })
    }
}

macro_rules! id128 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// A fresh random id (getrandom(2)); ids are never reused, so a stale reference
            /// can never name a newer object.
            pub fn random() -> std::io::Result<Self> {
                random_bytes().map($name)
            }

            pub fn to_hex(&self) -> String {
                self.0.iter().map(|b| format!("{b:02x}")).collect()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = String;
            /// Exactly 32 lowercase hex digits.
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                parse_hex16(s).map($name).ok_or_else(|| {
                    format!("{:?} is not a {}: expected 32 lowercase hex digits", s, stringify!($name))
                })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id128!(
    /// Identity of a volume; layers and manifests carry it so that a layer of another volume
    /// is never stacked by mistake.
    VolumeId
);
id128!(
    /// Identity of one partial file's block map (see `blockmap`): named by the file's marker
    /// xattr, so it follows the inode through renames and hard links.
    MapId
);

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn random_bytes() -> std::io::Result<[u8; 16]> {
    let mut buf = [0u8; 16];
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(buf)
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_roundtrip_and_differ() {
        let a = MapId::random().unwrap();
        let b = MapId::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 32);
        assert_eq!(a.to_hex().parse::<MapId>().unwrap(), a);
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<MapId>(&j).unwrap(), a);
        assert!("00".parse::<MapId>().is_err());
        assert!("0123456789ABCDEF0123456789abcdef".parse::<MapId>().is_err());
        assert!(
            "0123456789abcdeg0123456789abcdef"
                .parse::<VolumeId>()
                .is_err()
        );
        assert_eq!(
            "000102030405060708090a0b0c0d0e0f"
                .parse::<VolumeId>()
                .unwrap()
                .0,
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
        );
    }

    #[test]
    fn block_size_limits() {
        assert_eq!(check_block_size(4096).unwrap(), 4096);
        assert_eq!(check_block_size(512).unwrap(), 512);
        assert_eq!(check_block_size(16 << 20).unwrap(), 16 << 20);
        for bad in [0, 1, 256, 4095, 6000, 32 << 20, u64::MAX] {
            let e = check_block_size(bad).unwrap_err();
            assert!(
                matches!(e, VolumeError::InvalidBlockSize { block_size, .. } if block_size == bad)
            );
            assert!(e.to_string().contains("power of two"), "{e}");
        }
    }
}
