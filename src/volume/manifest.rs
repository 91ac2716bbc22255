//! The manifest of a frozen layer: what the layer is and what it holds, checksummed.
//!
//! One `manifest.json` per frozen layer, next to its tree (`layers/<epoch>/manifest.json`),
//! written once when the layer is sealed and never changed after. It records the volume id,
//! the epoch and its parent, the block size, totals, and one entry per object of the layer
//! tree (sorted by path): type and mode, owner, a CRC32C over its xattrs, and its content
//! check: the CRC32C of a whole file's data, the map id and map checksum of a partial file
//! (whose per-block CRCs live in the map), the target of a symlink. That is enough for
//! `verify` to detect any change at rest to the tree, the data, a block map or the manifest
//! itself, and for a replica to prove it holds exactly epoch N (equal manifests).
//!
//! Encoding: the checksummed JSON envelope of `meta` (format `layervol.manifest`, version
//! 1.0); a reader refuses another major version and ignores fields a newer minor adds. Paths
//! are layer-relative byte strings, stored as text with `%XX` escapes for `%`, control
//! characters and bytes that are not UTF-8 (see `LayerPath`), so every name round-trips.
//!
//! This module never writes anywhere but the manifest file, and only atomically.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::blockmap::MapStore;
use super::error::{Result, VolumeError};
use super::meta::{self, Version};
use super::{MapId, VolumeId, check_block_size};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_FORMAT: &str = "layervol.manifest";
pub const MANIFEST_VERSION: Version = Version { major: 1, minor: 0 };

/// The manifest of one frozen layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub volume_id: VolumeId,
    pub epoch: u64,
    /// The epoch of the layer directly below, `None` for the base layer.
    pub parent_epoch: Option<u64>,
    pub created_unix_secs: u64,
    pub block_size: u32,
    /// Number of entries (every object in the tree, the root included).
    pub entry_count: u64,
    /// Data bytes held by the layer: whole files' sizes plus partial files' present bytes,
    /// each hard-linked inode counted once.
    pub data_bytes: u64,
    /// Data blocks held by the layer (same counting as `data_bytes`, in blocks).
    pub block_count: u64,
    /// Number of partial files (distinct block maps).
    pub partial_files: u64,
    /// Every object of the layer tree, sorted by path bytes.
    pub entries: Vec<Entry>,
}

/// What the manifest needs to know about a layer besides its tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerIdentity {
    pub volume_id: VolumeId,
    pub epoch: u64,
    pub parent_epoch: Option<u64>,
    pub block_size: u32,
    /// The volume stores its private xattrs under `user.` instead of `trusted.`.
    pub userxattr: bool,
}

/// One object of a layer tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Layer-relative path; empty for the layer root.
    pub path: LayerPath,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// CRC32C over the object's xattrs (see `scan::xattrs_crc`); 0 when it has none.
    pub xattrs_crc32c: u32,
    #[serde(flatten)]
    pub kind: EntryKind,
}

/// Type-specific content check of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntryKind {
    Dir,
    /// A whole regular file: its size and the CRC32C of its data.
    File {
        size: u64,
        crc32c: u32,
    },
    /// A partial file: its logical size, its block map and that map's checksum. The data is
    /// checked block by block against the CRCs in the map.
    Partial {
        size: u64,
        map: MapId,
        map_crc32c: u32,
        present_blocks: u64,
    },
    Symlink {
        target: LayerPath,
    },
    /// An overlay whiteout (0/0 character device).
    Whiteout,
    /// A character or block device (type in `mode`).
    Device {
        rdev: u64,
    },
    Fifo,
    Socket,
}

impl Manifest {
    /// Builds the manifest of a layer by scanning its tree (reads all whole-file data once).
    /// Fails if the tree is inconsistent (a partial file without a readable map, a map of the
    /// wrong size or block size): a layer is sealed only if it is sound.
    pub fn build(tree: &Path, maps: &MapStore, id: LayerIdentity) -> Result<Manifest> {
        let scan = super::scan::scan_tree(tree, maps, id.block_size, id.userxattr, false)?;
        if let Some(first) = scan.problems.first() {
            return Err(VolumeError::Inconsistent {
                path: tree.to_path_buf(),
                reason: format!(
                    "cannot seal layer {}: {first} ({} problem(s) in all)",
                    id.epoch,
                    scan.problems.len()
                ),
            });
        }
        Ok(Manifest {
            volume_id: id.volume_id,
            epoch: id.epoch,
            parent_epoch: id.parent_epoch,
            created_unix_secs: super::now_unix_secs(),
            block_size: id.block_size,
            entry_count: scan.entries.len() as u64,
            data_bytes: scan.data_bytes,
            block_count: scan.block_count,
            partial_files: scan.referenced_maps.len() as u64,
            entries: scan.entries,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        meta::encode_envelope(MANIFEST_FORMAT, MANIFEST_VERSION, self, false)
    }

    /// Decodes and validates a manifest read from `path` (named in errors).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let (m, _): (Manifest, _) = meta::decode_envelope(
            path,
            bytes,
            MANIFEST_FORMAT,
            "layer manifest",
            MANIFEST_VERSION.major,
        )?;
        m.validate(path)?;
        Ok(m)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let malformed = |reason: String| VolumeError::Malformed {
            path: path.to_path_buf(),
            kind: "layer manifest",
            reason,
        };
        check_block_size(u64::from(self.block_size)).map_err(|e| malformed(e.to_string()))?;
        if self.entry_count != self.entries.len() as u64 {
            return Err(malformed(format!(
                "entry_count is {} but {} entries are listed",
                self.entry_count,
                self.entries.len()
            )));
        }
        if let Some(w) = self.entries.windows(2).find(|w| w[0].path >= w[1].path) {
            return Err(malformed(format!(
                "entries are not sorted by unique path ({} then {})",
                w[0].path, w[1].path
            )));
        }
        if self.parent_epoch.is_some_and(|p| p >= self.epoch) {
            return Err(malformed(format!(
                "parent epoch {:?} is not below epoch {}",
                self.parent_epoch, self.epoch
            )));
        }
        Ok(())
    }

    /// Writes `layer_dir/manifest.json` atomically (temp, fsync, rename, fsync dir).
    pub fn write(&self, layer_dir: &Path) -> Result<()> {
        meta::write_atomic(layer_dir, MANIFEST_FILE, &self.encode(), true)
    }

    /// Loads `layer_dir/manifest.json`. A missing manifest is `VolumeError::Io` (NotFound).
    pub fn load(layer_dir: &Path) -> Result<Manifest> {
        let path = layer_dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(super::error::io("read manifest", &path))?;
        Manifest::decode(&path, &bytes)
    }

    /// Loads the manifest if there is one.
    pub fn load_optional(layer_dir: &Path) -> Result<Option<Manifest>> {
        let path = layer_dir.join(MANIFEST_FILE);
        match meta::read_optional(&path)? {
            None => Ok(None),
            Some(bytes) => Manifest::decode(&path, &bytes).map(Some),
        }
    }
}

/// A layer-relative path as raw bytes (`a/b/c`, empty for the root). Serialized as text:
/// valid UTF-8 stays readable; `%`, control characters and non-UTF-8 bytes become `%XX`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LayerPath(pub Vec<u8>);

impl LayerPath {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn escape(&self) -> String {
        let mut out = String::with_capacity(self.0.len());
        let pct = |out: &mut String, b: u8| out.push_str(&format!("%{b:02X}"));
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '%' || c.is_control() {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        pct(&mut out, b);
                    }
                } else {
                    out.push(c);
                }
            }
            for b in chunk.invalid() {
                pct(&mut out, *b);
            }
        }
        out
    }

    pub fn unescape(s: &str) -> Option<LayerPath> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                if !hex
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
                {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        Some(LayerPath(out))
    }
}

impl fmt::Display for LayerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("/")
        } else {
            write!(f, "/{}", self.escape())
        }
    }
}

impl fmt::Debug for LayerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.escape())
    }
}

impl Serialize for LayerPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.escape())
    }
}

impl<'de> Deserialize<'de> for LayerPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        LayerPath::unescape(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("bad %-escape in path {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let e = |p: &str, kind| Entry {
            path: LayerPath(p.as_bytes().to_vec()),
            mode: 0o100644,
            uid: 1,
            gid: 2,
            xattrs_crc32c: 0,
            kind,
        };
        let entries = vec![
            e("", EntryKind::Dir),
            e(
                "a",
                EntryKind::File {
                    size: 5,
                    crc32c: 77,
                },
            ),
            e(
                "b",
                EntryKind::Partial {
                    size: 1 << 40,
                    map: MapId([7; 16]),
                    map_crc32c: 0xdead_beef,
                    present_blocks: 3,
                },
            ),
            e(
                "c",
                EntryKind::Symlink {
                    target: LayerPath(b"../x%\xff".to_vec()),
                },
            ),
            e("d", EntryKind::Whiteout),
            e("e", EntryKind::Device { rdev: 0x0103 }),
            e("f", EntryKind::Fifo),
        ];
        Manifest {
            volume_id: VolumeId([1; 16]),
            epoch: 4,
            parent_epoch: Some(3),
            created_unix_secs: 1_700_000_000,
            block_size: 4096,
            entry_count: entries.len() as u64,
            data_bytes: 5 + 3 * 4096,
            block_count: 4,
            partial_files: 1,
            entries,
        }
    }

    #[test]
    fn roundtrip_through_a_file() {
        let d = tempfile::tempdir().unwrap();
        let m = sample();
        m.write(d.path()).unwrap();
        assert_eq!(Manifest::load(d.path()).unwrap(), m);
        assert_eq!(Manifest::load_optional(d.path()).unwrap(), Some(m.clone()));
        let text = std::fs::read_to_string(d.path().join(MANIFEST_FILE)).unwrap();
        assert!(text.contains("\"kind\":\"partial\""), "{text}");
        assert!(text.contains("\"target\":\"../x%25%FF\""), "{text}");
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::load_optional(empty.path()).unwrap(), None);
        let e = Manifest::load(empty.path()).unwrap_err();
        assert!(
            matches!(&e, VolumeError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(e.to_string().contains("manifest.json"), "{e}");
    }

    #[test]
    fn rejects_unknown_major_and_damage() {
        let p = Path::new("layers/4/manifest.json");
        let m = sample();
        let v2 = meta::encode_envelope(MANIFEST_FORMAT, Version { major: 2, minor: 0 }, &m, false);
        let e = Manifest::decode(p, &v2).unwrap_err();
        assert!(
            matches!(&e, VolumeError::UnsupportedVersion { found, kind: "layer manifest", .. } if found == "2.0"),
            "{e}"
        );
        assert!(e.to_string().contains("layers/4/manifest.json"), "{e}");
        // A newer minor with an unknown field is read.
        let mut val = serde_json::to_value(&m).unwrap();
        val["future_field"] = serde_json::json!({"x": 1});
        let v11 =
            meta::encode_envelope(MANIFEST_FORMAT, Version { major: 1, minor: 1 }, &val, false);
        assert_eq!(Manifest::decode(p, &v11).unwrap(), m);
        // A changed number is a checksum mismatch, not a silently different manifest.
        let text = String::from_utf8(m.encode())
            .unwrap()
            .replace("\"epoch\":4", "\"epoch\":5");
        let e = Manifest::decode(p, text.as_bytes()).unwrap_err();
        assert!(matches!(e, VolumeError::ChecksumMismatch { .. }), "{e}");
        // A volume.json is not a manifest.
        let other = meta::encode_envelope("layervol.volume", MANIFEST_VERSION, &m, false);
        assert!(matches!(
            Manifest::decode(p, &other),
            Err(VolumeError::Malformed { .. })
        ));
    }

    #[test]
    fn validates_structure() {
        let p = Path::new("m");
        let mut m = sample();
        m.entry_count += 1;
        let e = Manifest::decode(p, &m.encode()).unwrap_err();
        assert!(e.to_string().contains("entry_count"), "{e}");
        let mut m = sample();
        m.entries.swap(1, 2);
        let e = Manifest::decode(p, &m.encode()).unwrap_err();
        assert!(e.to_string().contains("sorted"), "{e}");
        let mut m = sample();
        m.block_size = 3000;
        assert!(Manifest::decode(p, &m.encode()).is_err());
        let mut m = sample();
        m.parent_epoch = Some(4);
        assert!(Manifest::decode(p, &m.encode()).is_err());
    }

    #[test]
    fn path_escaping_examples() {
        let cases: [(&[u8], &str); 5] = [
            (b"", ""),
            (b"a/b c", "a/b c"),
            ("caf\u{e9}/\u{1F600}".as_bytes(), "caf\u{e9}/\u{1F600}"),
            (b"50%", "50%25"),
            (b"x\n\x7f\xff\xc3", "x%0A%7F%FF%C3"),
        ];
        for (raw, text) in cases {
            let p = LayerPath(raw.to_vec());
            assert_eq!(p.escape(), text);
            assert_eq!(LayerPath::unescape(text), Some(p));
        }
        for bad in ["%", "%4", "%zz", "%4a", "a%"] {
            assert_eq!(LayerPath::unescape(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn path_escaping_roundtrips(raw in proptest::collection::vec(any::<u8>(), 0..40)) {
            let p = LayerPath(raw);
            let s = p.escape();
            prop_assert!(!s.chars().any(|c| c.is_control()));
            prop_assert_eq!(LayerPath::unescape(&s), Some(p.clone()));
            let j = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(serde_json::from_str::<LayerPath>(&j).unwrap(), p);
        }
    }
}
