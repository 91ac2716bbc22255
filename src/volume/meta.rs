//! Metadata files: the atomic-replace write and the checksummed JSON envelope.
//!
//! Owns the two rules every metadata file of a volume follows:
//!
//! 1. **Atomic replace.** A file is written under a temporary name in its own directory,
//!    fsynced, renamed over the real name, and (unless the caller batches it) the directory is
//!    fsynced. A crash at any point leaves either the complete old file or the complete new one;
//!    at worst a stray `.<name>.tmp.*` that `remove_stale_temps` cleans up.
//! 2. **Envelope.** JSON metadata (`volume.json`, `manifest.json`) is
//!    `{"format": F, "version": "MAJOR.MINOR", "body_crc32c": C, "body": {...}}`, where `C` is
//!    the CRC32C of the exact bytes of `body` as stored. Decoding checks the format name, refuses
//!    an unknown major version (a newer minor only adds fields, which older readers ignore) and
//!    checks the CRC over the raw body bytes, so a flipped bit in a stored number is caught
//!    instead of silently changing the volume. The body is still plain JSON: `jq .body` reads it.
//!
//! Never writes in place, never leaves a file that a reader could see half written.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::error::{Result, VolumeError, io};

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Marks temporary names made by `write_atomic`: `.<name>.tmp.<pid>.<seq>`.
const TMP_INFIX: &str = ".tmp.";

/// Writes `bytes` to `dir/name` atomically (see the module doc). `sync_dir: false` lets a
/// caller that writes many files in one directory fsync it once with `sync_dir`.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], sync_dir_after: bool) -> Result<()> {
    stage(dir, name, bytes)?.commit_with(sync_dir_after)
}

/// A file written and fsynced under a temporary name, waiting to replace `dst` (see
/// `stage`). Dropped without `commit`, it is removed.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    dst: PathBuf,
    /// Written by `stage_unsynced` or `reserve`: fsynced at commit, before the rename.
    unsynced: Option<File>,
    /// Made by `reserve`: the space allocated for `fill`.
    reserved: u64,
    done: bool,
}

/// The first half of `write_atomic`: writes and fsyncs `bytes` under a temporary name in
/// `dir`. The slow and fallible part (space, data fsync) is done; `Staged::commit` is a
/// rename and a directory fsync.
pub fn stage(dir: &Path, name: &str, bytes: &[u8]) -> Result<Staged> {
    stage_with(dir, name, bytes, true)
}

/// `stage` without the data fsync, for a caller that must not wait for the disk now: the
/// file and its space are taken (a full disk fails here), the fsync runs at `commit`.
pub fn stage_unsynced(dir: &Path, name: &str, bytes: &[u8]) -> Result<Staged> {
    stage_with(dir, name, bytes, false)
}

fn stage_with(dir: &Path, name: &str, bytes: &[u8], sync: bool) -> Result<Staged> {
    let mut s = temp_for(dir, name, |f, tmp| {
        (&*f).write_all(bytes).map_err(io("write", tmp))
    })?;
    if sync {
        let f = s.unsynced.take().expect("made by temp_for");
        f.sync_all().map_err(io("fsync", &s.tmp))?;
    }
    Ok(s)
}

/// Takes a temporary file for `dir/name` and `len` bytes of space for it, to be written by
/// `Staged::fill` later: for a caller that must not touch the disk at the moment it knows the
/// contents (a freeze's barrier), yet must fail before it if there is no room.
pub fn reserve(dir: &Path, name: &str, len: u64) -> Result<Staged> {
    let mut s = temp_for(dir, name, |f, tmp| {
        use std::os::fd::AsFd;
        match crate::sys::fallocate(f.as_fd(), 0, 0, len) {
            Ok(()) => Ok(()),
            // No fallocate here: writing zeros takes the space as well.
            Err(crate::sys::Errno::EOPNOTSUPP) => (&*f)
                .write_all(&vec![0; len as usize])
                .map_err(io("write", tmp)),
            Err(e) => Err(io("allocate space for", tmp)(e.into())),
        }
    })?;
    s.reserved = len;
    Ok(s)
}

/// Creates the temporary file for `dir/name` (`.<name>.tmp.<pid>.<seq>`) and lets `init`
/// write it; removes it again if that fails. The file stays open in `unsynced`.
fn temp_for(
    dir: &Path,
    name: &str,
    init: impl FnOnce(&File, &Path) -> Result<()>,
) -> Result<Staged> {
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}{TMP_INFIX}{}.{seq}", std::process::id()));
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    // From here on, dropping the result removes the file.
    let s = Staged {
        dst: dir.join(name),
        unsynced: Some(f),
        reserved: 0,
        done: false,
        tmp,
    };
    init(s.unsynced.as_ref().expect("just made"), &s.tmp)?;
    Ok(s)
}

impl Staged {
    /// The space `reserve` took.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Makes `dst` (in the same directory) the name the file will take at commit.
    pub fn retarget(&mut self, dst: PathBuf) {
        assert_eq!(
            dst.parent(),
            self.dst.parent(),
            "retarget within the directory"
        );
        self.dst = dst;
    }

    /// Writes the contents of a file made by `reserve`, into its reserved space (so it
    /// needs no new space); `bytes` must fit in it.
    pub fn fill(&mut self, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let f = self.unsynced.as_ref().expect("fill: made by reserve");
        assert!(
            bytes.len() as u64 <= self.reserved,
            "fill: past the reserved space"
        );
        f.write_all_at(bytes, 0).map_err(io("write", &self.tmp))?;
        f.set_len(bytes.len() as u64)
            .map_err(io("truncate", &self.tmp))
    }

    /// Renames the staged file into place and fsyncs its directory.
    pub fn commit(self) -> Result<()> {
        self.commit_with(true)
    }

    /// Renames the staged file into place without fsyncing the directory: for a caller that
    /// makes a batch of renames durable at once (`sync_dir`, `syncfs`).
    pub fn commit_in_batch(self) -> Result<()> {
        self.commit_with(false)
    }

    fn commit_with(mut self, sync_dir_after: bool) -> Result<()> {
        if let Some(f) = self.unsynced.take() {
            f.sync_all().map_err(io("fsync", &self.tmp))?;
        }
        if let Err(e) = crash_point("write_atomic:before-rename") {
            // A crash leaves the temporary file behind: so does its simulation.
            self.done = true;
            return Err(e);
        }
        fs::rename(&self.tmp, &self.dst).map_err(io("rename into place", &self.dst))?;
        self.done = true;
        crash_point("write_atomic:before-dir-fsync")?;
        if sync_dir_after {
            sync_dir(self.dst.parent().unwrap_or(Path::new(".")))?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// fsyncs a directory, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

/// Removes temporary files a crashed `write_atomic` left in `dir`. Only for a caller that
/// knows no other writer is active in `dir` (it holds the volume lock).
pub fn remove_stale_temps(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io("list", dir)(e)),
    };
    for ent in rd {
        let ent = ent.map_err(io("list", dir))?;
        let name = ent.file_name();
        let s = name.to_string_lossy();
        if s.starts_with('.') && s.contains(TMP_INFIX) {
            fs::remove_file(ent.path()).map_err(io("remove stale temporary", ent.path()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// A `MAJOR.MINOR` format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Encodes `body` in the envelope. `pretty` for small files people read (`volume.json`).
pub fn encode_envelope<T: Serialize>(
    format: &str,
    version: Version,
    body: &T,
    pretty: bool,
) -> Vec<u8> {
    // Serializing our own plain structs (strings, integers, vectors) cannot fail.
    let body = if pretty {
        serde_json::to_string_pretty(body)
    } else {
        serde_json::to_string(body)
    }
    .expect("serializing plain metadata structs cannot fail");
    // Indent the body under its key. serde_json escapes newlines inside strings, so every
    // raw newline is formatting. The CRC covers the body exactly as stored.
    let body = if pretty {
        body.replace('\n', "\n  ")
    } else {
        body
    };
    let crc = crc32c::crc32c(body.as_bytes());
    let format = serde_json::to_string(format).expect("a string serializes");
    let (nl, ind, colon) = if pretty {
        ("\n", "  ", ": ")
    } else {
        ("", "", ":")
    };
    format!(
        "{{{nl}{ind}\"format\"{colon}{format},{nl}{ind}\"version\"{colon}\"{version}\",{nl}{ind}\"body_crc32c\"{colon}{crc},{nl}{ind}\"body\"{colon}{body}{nl}}}\n"
    )
    .into_bytes()
}

#[derive(serde::Deserialize)]
struct RawEnvelope<'a> {
    format: String,
    version: String,
    body_crc32c: u32,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// Decodes an envelope read from `path` (the path only names it in errors). `kind` is a
/// human name for messages ("volume metadata", "layer manifest").
pub fn decode_envelope<T: DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
    format: &str,
    kind: &'static str,
    supported_major: u32,
) -> Result<(T, Version)> {
    let malformed = |reason: String| VolumeError::Malformed {
        path: path.to_path_buf(),
        kind,
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| malformed(format!("not UTF-8: {e}")))?;
    let env: RawEnvelope = serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
    if env.format != format {
        return Err(malformed(format!(
            "format is {:?}, expected {format:?}",
            env.format
        )));
    }
    let version = parse_version(&env.version)
        .ok_or_else(|| malformed(format!("version {:?} is not MAJOR.MINOR", env.version)))?;
    if version.major != supported_major {
        return Err(VolumeError::UnsupportedVersion {
            path: path.to_path_buf(),
            kind,
            found: env.version,
            supported: supported_major,
        });
    }
    let computed = crc32c::crc32c(env.body.get().as_bytes());
    if computed != env.body_crc32c {
        return Err(VolumeError::ChecksumMismatch {
            path: path.to_path_buf(),
            stored: env.body_crc32c,
            computed,
        });
    }
    let body = serde_json::from_str(env.body.get()).map_err(|e| malformed(e.to_string()))?;
    Ok((body, version))
}

fn parse_version(s: &str) -> Option<Version> {
    let (a, b) = s.split_once('.')?;
    let num = |x: &str| {
        if x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            x.parse().ok()
        }
    };
    Some(Version {
        major: num(a)?,
        minor: num(b)?,
    })
}

/// Reads a whole metadata file; a missing file is `Ok(None)`.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

// Crash injection for tests: `arm_crash(n)` makes the n-th crash point reached on this thread
// (0-based) fail as if the process had died there: the step's effects so far stay on disk and
// nothing is cleaned up. Without `cfg(test)` the points compile to nothing.
#[cfg(test)]
thread_local! {
    static CRASH_COUNTDOWN: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
    static CRASH_POINTS_SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
pub(crate) fn arm_crash(after_points: Option<u32>) {
    CRASH_COUNTDOWN.with(|c| c.set(after_points));
    CRASH_POINTS_SEEN.with(|c| c.set(0));
}

/// Number of crash points passed since the last `arm_crash`.
#[cfg(test)]
pub(crate) fn crash_points_seen() -> u32 {
    CRASH_POINTS_SEEN.with(|c| c.get())
}

#[cfg(test)]
pub(crate) fn crash_point(at: &'static str) -> Result<()> {
    CRASH_POINTS_SEEN.with(|c| c.set(c.get() + 1));
    CRASH_COUNTDOWN.with(|c| match c.get() {
        Some(0) => {
            c.set(None);
            Err(VolumeError::Io {
                op: "simulate a crash",
                path: at.into(),
                source: std::io::Error::other("simulated crash"),
            })
        }
        Some(n) => {
            c.set(Some(n - 1));
            Ok(())
        }
        None => Ok(()),
    })
}

/// True for the error a simulated crash returns: callers skip the cleanup a real process
/// death would not have done.
#[cfg(test)]
pub(crate) fn is_simulated_crash(e: &VolumeError) -> bool {
    matches!(
        e,
        VolumeError::Io {
            op: "simulate a crash",
            ..
        }
    )
}

#[cfg(not(test))]
pub(crate) fn is_simulated_crash(_: &VolumeError) -> bool {
    false
}

#[cfg(not(test))]
#[inline(always)]
pub(crate) fn crash_point(_at: &'static str) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Body {
        name: String,
        n: u64,
    }

    const V: Version = Version { major: 1, minor: 0 };

    #[test]
    fn envelope_roundtrip_pretty_and_compact() {
        let b = Body {
            name: "a \"quoted\" é".into(),
            n: 42,
        };
        for pretty in [false, true] {
            let bytes = encode_envelope("t.x", V, &b, pretty);
            let (got, v): (Body, _) =
                decode_envelope(Path::new("f"), &bytes, "t.x", "test", 1).unwrap();
            assert_eq!(got, b);
            assert_eq!(v, V);
            // It is plain JSON.
            let val: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(val["body"]["n"], 42);
        }
    }

    #[test]
    fn envelope_detects_flipped_digit() {
        let bytes = encode_envelope(
            "t.x",
            V,
            &Body {
                name: "x".into(),
                n: 42,
            },
            true,
        );
        let text = String::from_utf8(bytes).unwrap().replace("42", "43");
        let e =
            decode_envelope::<Body>(Path::new("f"), text.as_bytes(), "t.x", "test", 1).unwrap_err();
        assert!(matches!(e, VolumeError::ChecksumMismatch { .. }), "{e}");
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    #[test]
    fn envelope_rejects_other_major_and_format_and_garbage() {
        let b = Body {
            name: "x".into(),
            n: 1,
        };
        let newer_minor = encode_envelope("t.x", Version { major: 1, minor: 7 }, &b, false);
        assert!(decode_envelope::<Body>(Path::new("f"), &newer_minor, "t.x", "test", 1).is_ok());
        let major2 = encode_envelope("t.x", Version { major: 2, minor: 0 }, &b, false);
        let e = decode_envelope::<Body>(Path::new("f"), &major2, "t.x", "test", 1).unwrap_err();
        assert!(
            matches!(&e, VolumeError::UnsupportedVersion { found, supported: 1, .. } if found == "2.0"),
            "{e}"
        );
        let e =
            decode_envelope::<Body>(Path::new("f"), &newer_minor, "t.y", "test", 1).unwrap_err();
        assert!(matches!(e, VolumeError::Malformed { .. }), "{e}");
        for junk in [&b""[..], b"{", b"[]", b"\xff\xfe", b"{\"format\":\"t.x\"}"] {
            let e = decode_envelope::<Body>(Path::new("f"), junk, "t.x", "test", 1).unwrap_err();
            assert!(matches!(e, VolumeError::Malformed { .. }), "{junk:?}: {e}");
        }
        let bad_version = String::from_utf8(newer_minor)
            .unwrap()
            .replace("1.7", "1.x");
        assert!(matches!(
            decode_envelope::<Body>(Path::new("f"), bad_version.as_bytes(), "t.x", "test", 1),
            Err(VolumeError::Malformed { .. })
        ));
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        write_atomic(d.path(), "f.json", b"one", true).unwrap();
        write_atomic(d.path(), "f.json", b"two", false).unwrap();
        assert_eq!(fs::read(d.path().join("f.json")).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
    }

    #[test]
    fn crash_before_rename_keeps_old_content() {
        let d = tempfile::tempdir().unwrap();
        write_atomic(d.path(), "f.json", b"old", true).unwrap();
        arm_crash(Some(0));
        assert!(write_atomic(d.path(), "f.json", b"new", true).is_err());
        arm_crash(None);
        assert_eq!(fs::read(d.path().join("f.json")).unwrap(), b"old");
        // The crash left its temporary behind; cleanup removes exactly that.
        assert_eq!(remove_stale_temps(d.path()).unwrap(), 1);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        // Crash after the rename: the new content is complete.
        arm_crash(Some(1));
        assert!(write_atomic(d.path(), "f.json", b"new", true).is_err());
        arm_crash(None);
        assert_eq!(fs::read(d.path().join("f.json")).unwrap(), b"new");
    }
}
