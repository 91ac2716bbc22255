//! Change times a squash could not keep.
//!
//! A squash takes objects over into the merged layer by hard link, and re-creates
//! directories and assembled files as new inodes: either way the object's `st_ctime` becomes
//! the time of the squash (a link changes it, and no call sets it), although nothing the
//! mount shows changed. Tools that watch ctime (incremental backups, `find -cnewer`) would see
//! every object of the merged layers as changed, and POSIX says an unsuccessful call leaves
//! ctime alone (pjdfstest checks it: with an automatic squash in between it failed).
//!
//! So a squash records, for each object of the new layer it links or re-creates, the ctime
//! the mount showed for it: `layers/<dir>/ctimes`, keyed by inode number
//! (the layers of a volume share one filesystem, and a frozen layer's objects never change,
//! so an inode named there keeps its number while the layer exists). The engine reports that
//! time for the inode (`Overlay::set_ctimes`), from the tables of the layers mounted.
//!
//! Format: `LVCTIME1`, then per entry inode (u64), seconds (i64), nanoseconds (u32), all
//! little-endian, sorted by inode, then the CRC32C of everything before it (u32).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{Result, VolumeError, io};
use super::store::{LayerState, Volume};

pub const CTIMES_FILE: &str = "ctimes";
const MAGIC: &[u8; 8] = b"LVCTIME1";
const ENTRY: usize = 20;

/// Inode number -> the change time (seconds, nanoseconds) the mount reports for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ctimes(HashMap<u64, (i64, i64)>);

impl Ctimes {
    pub fn get(&self, ino: u64) -> Option<(i64, i64)> {
        self.0.get(&ino).copied()
    }

    pub fn insert(&mut self, ino: u64, ctime: (i64, i64)) {
        self.0.insert(ino, ctime);
    }

    pub fn extend(&mut self, other: &Ctimes) {
        self.0.extend(other.0.iter().map(|(k, v)| (*k, *v)));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The table of the layer directory `dir` (empty if it has none).
    pub fn load(dir: &Path) -> Result<Ctimes> {
        let path = dir.join(CTIMES_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ctimes::default()),
            Err(e) => return Err(io("read", &path)(e)),
        };
        let bad = |reason: &str| VolumeError::Malformed {
            path: path.clone(),
            kind: "ctime table",
            reason: reason.to_string(),
        };
        if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad("no LVCTIME1 header"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(VolumeError::ChecksumMismatch {
                path,
                stored,
                computed,
            });
        }
        let entries = &body[MAGIC.len()..];
        if entries.len() % ENTRY != 0 {
            return Err(bad("truncated entry"));
        }
        let mut map = HashMap::with_capacity(entries.len() / ENTRY);
        for e in entries.chunks_exact(ENTRY) {
            let ino = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            let sec = i64::from_le_bytes(e[8..16].try_into().expect("8 bytes"));
            let nsec = u32::from_le_bytes(e[16..].try_into().expect("4 bytes"));
            map.insert(ino, (sec, i64::from(nsec)));
        }
        Ok(Ctimes(map))
    }

    /// The tables of every frozen layer of `vol`: what a mount of it shows.
    pub fn of_frozen_layers(vol: &Volume) -> Result<Ctimes> {
        Ctimes::of_layer_dirs(
            vol.layers()
                .iter()
                .filter(|l| l.state == LayerState::Frozen)
                .map(|l| vol.layer_dir(l.epoch)),
        )
    }

    /// The tables of the layer directories `dirs`, together.
    pub fn of_layer_dirs(dirs: impl IntoIterator<Item = PathBuf>) -> Result<Ctimes> {
        let mut all = Ctimes::default();
        for d in dirs {
            all.extend(&Ctimes::load(&d)?);
        }
        Ok(all)
    }

    /// Writes the table into the layer directory `dir` (durable once the directory is
    /// synced: the squash syncs the filesystem before its commit). Writes nothing if empty.
    pub fn write(&self, dir: &Path) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut entries: Vec<_> = self.0.iter().collect();
        entries.sort();
        let mut buf = Vec::with_capacity(MAGIC.len() + entries.len() * ENTRY + 4);
        buf.extend_from_slice(MAGIC);
        for (ino, (sec, nsec)) in entries {
            buf.extend_from_slice(&ino.to_le_bytes());
            buf.extend_from_slice(&sec.to_le_bytes());
            buf.extend_from_slice(&(*nsec as u32).to_le_bytes());
        }
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        let path = dir.join(CTIMES_FILE);
        let mut f = std::fs::File::create(&path).map_err(io("create", &path))?;
        f.write_all(&buf)
            .and_then(|()| f.sync_all())
            .map_err(io("write", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_reads_back_and_damage_is_reported() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(Ctimes::load(t.path()).unwrap(), Ctimes::default());
        let mut c = Ctimes::default();
        c.insert(12, (1_700_000_000, 999_999_999));
        c.insert(7, (-5, 0));
        c.write(t.path()).unwrap();
        assert_eq!(Ctimes::load(t.path()).unwrap(), c);
        let p = t.path().join(CTIMES_FILE);
        let mut b = std::fs::read(&p).unwrap();
        b[10] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(Ctimes::load(t.path()).is_err());
    }
}
