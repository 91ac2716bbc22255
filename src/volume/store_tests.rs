//! Tests of the volume store, import, seal and verify on real directories (tempfile).
//! Some need root (chown to other users, `trusted.*` xattrs, device nodes): they check
//! `geteuid()` and fail loudly rather than pass silently when it is not 0.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::blockmap::{self, BlockMap, Source};
use super::manifest::{EntryKind, MANIFEST_FILE, Manifest};
use super::meta;
use super::scan::Problem;
use super::store::{LOST_DIR, LayerState, VOLUME_FILE, Volume, XattrNamespace};
use super::{CreateOptions, MapId, VolumeError};
use crate::sys;

fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (chown, trusted.* xattrs, mknod); run the suite as root like CI does"
    );
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn dir_fd(p: &Path) -> fs::File {
    fs::File::open(p).unwrap()
}

fn set_xattr(p: &Path, key: &str, value: &[u8]) {
    let parent = dir_fd(p.parent().unwrap());
    let name = c(p.file_name().unwrap().to_str().unwrap());
    sys::setxattr(parent.as_fd(), &name, &c(key), value, 0).unwrap();
}

fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let (parent, name) = match p.file_name() {
        Some(n) => (
            p.parent().unwrap().to_path_buf(),
            CString::new(n.as_bytes()).unwrap(),
        ),
        None => (p.to_path_buf(), c(".")),
    };
    let d = dir_fd(&parent);
    sys::listxattr(d.as_fd(), &name)
        .unwrap()
        .into_iter()
        .map(|k| {
            let v = sys::getxattr(d.as_fd(), &name, &k).unwrap().unwrap();
            (k.to_bytes().to_vec(), v)
        })
        .collect()
}

/// Everything observable about a tree that an import must preserve, keyed by relative path.
/// Hard links show as the first path of their inode group.
fn describe(root: &Path, map_key: &dyn Fn(&[u8]) -> Vec<u8>) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let content = if ft.is_file() {
            format!("data={:?}", fs::read(&p).unwrap())
        } else if ft.is_symlink() {
            format!("link={:?}", fs::read_link(&p).unwrap())
        } else {
            format!("rdev={}", md.rdev())
        };
        let link = if !ft.is_dir() && md.nlink() > 1 {
            let first = inodes
                .entry((md.dev(), md.ino()))
                .or_insert_with(|| rel.clone());
            format!("group={first:?}")
        } else {
            String::new()
        };
        let xa: BTreeMap<Vec<u8>, Vec<u8>> = if ft.is_symlink() {
            BTreeMap::new()
        } else {
            xattrs(&p)
                .into_iter()
                .map(|(k, v)| (map_key(&k), v))
                .collect()
        };
        let mtime = if ft.is_symlink() {
            String::new()
        } else {
            format!("{}.{}", md.mtime(), md.mtime_nsec())
        };
        out.insert(
            rel.clone(),
            format!(
                "mode={:o} owner={}:{} {content} {link} mtime={mtime} xattrs={xa:?}",
                md.mode(),
                md.uid(),
                md.gid()
            ),
        );
        if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    out
}

/// A source directory using every feature an import must preserve.
fn rich_source(dir: &Path) {
    fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    fs::write(dir.join("plain.txt"), b"hello world").unwrap();
    fs::write(dir.join("sub/deeper/empty"), b"").unwrap();
    // A sparse file: 4 KiB of data, a 1 MiB hole, 4 KiB of data, and a hole at the end.
    let sparse = fs::File::create(dir.join("sparse.img")).unwrap();
    sparse.write_all_at(&[1u8; 4096], 0).unwrap();
    sparse.write_all_at(&[2u8; 4096], 1 << 20).unwrap();
    sparse.set_len(3 << 20).unwrap();
    // Hard links, one across directories.
    fs::write(dir.join("linked"), b"shared inode").unwrap();
    fs::hard_link(dir.join("linked"), dir.join("sub/linked2")).unwrap();
    fs::hard_link(dir.join("linked"), dir.join("linked3")).unwrap();
    // Symlinks: relative, absolute pointing out, dangling.
    std::os::unix::fs::symlink("plain.txt", dir.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", dir.join("sub/dangling")).unwrap();
    // Special files.
    let fifo = c(dir.join("fifo").to_str().unwrap());
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let dev = c(dir.join("null-dev").to_str().unwrap());
    assert_eq!(
        unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) },
        0
    );
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    // Owners, set-id bits, odd modes, xattrs (user, trusted, and overlay ones to escape).
    let suid = dir.join("suid-bin");
    fs::write(&suid, b"#!/bin/true\n").unwrap();
    std::os::unix::fs::chown(&suid, Some(1234), Some(5678)).unwrap();
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::lchown(dir.join("rel-link"), Some(42), Some(43)).unwrap();
    set_xattr(&dir.join("plain.txt"), "user.color", b"blue");
    set_xattr(&dir.join("plain.txt"), "trusted.secret", b"\x00\x01binary");
    set_xattr(&dir.join("sub"), "trusted.overlay.opaque", b"y");
    fs::set_permissions(dir.join("sub/deeper"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o751)).unwrap();
    std::os::unix::fs::chown(dir, Some(7), Some(8)).unwrap();
    // Times last (creating entries above changed the dirs' mtimes).
    for p in ["plain.txt", "sub", "sub/deeper", ""] {
        let t = c(dir.join(p).to_str().unwrap());
        let ts = [
            libc::timespec {
                tv_sec: 1_000_000,
                tv_nsec: 5,
            },
            libc::timespec {
                tv_sec: 2_000_000,
                tv_nsec: 7,
            },
        ];
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, t.as_ptr(), ts.as_ptr(), 0) },
            0
        );
    }
}

fn overlay_escape(k: &[u8]) -> Vec<u8> {
    match k.strip_prefix(b"trusted.overlay.") {
        Some(rest) => [&b"trusted.overlay.overlay."[..], rest].concat(),
        None => k.to_vec(),
    }
}

#[test]
fn create_empty_volume_layout() {
    let t = tempfile::tempdir().unwrap();
    let vp = t.path().join("vol");
    let v = Volume::create(&vp, 4096, None).unwrap();
    assert_eq!(v.active_epoch(), 1);
    assert_eq!(v.layers().len(), 1);
    assert_eq!(v.layers()[0].state, LayerState::Active);
    assert_eq!(v.layers()[0].parent_epoch, None);
    assert_eq!(v.block_size(), 4096);
    assert_eq!(v.xattr_namespace(), XattrNamespace::Trusted);
    assert!(v.lower_dirs().is_empty());
    assert_eq!(v.upper_dir(), vp.join("layers/1/tree"));
    assert_eq!(v.work_dir(), vp.join("work/1"));
    assert!(v.upper_dir().is_dir() && v.work_dir().is_dir());
    assert!(vp.join("layers/1/maps").is_dir());
    assert_eq!(fs::metadata(v.upper_dir()).unwrap().mode() & 0o7777, 0o755);
    let id = v.id();
    drop(v);
    // volume.json is a readable, checksummed envelope.
    let text = fs::read_to_string(vp.join(VOLUME_FILE)).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["format"], "layervol.volume");
    assert_eq!(j["version"], "1.0");
    assert_eq!(j["body"]["layers"][0]["state"], "active");
    let v = Volume::open(&vp).unwrap();
    assert_eq!(v.id(), id);
    assert!(!v.is_read_only());
    // An existing empty directory is fine too; block size is checked.
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    Volume::create(&empty, 512, None).unwrap();
    let e = Volume::create(&t.path().join("bs"), 1000, None).unwrap_err();
    assert!(
        matches!(
            e,
            VolumeError::InvalidBlockSize {
                block_size: 1000,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn create_from_imports_faithfully() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    rich_source(&src);
    let vp = t.path().join("vol");
    let v = Volume::create(&vp, 4096, Some(&src)).unwrap();
    assert_eq!(v.active_epoch(), 2);
    assert_eq!(v.layers()[0].state, LayerState::Frozen);
    assert_eq!(v.layers()[1].parent_epoch, Some(1));
    assert_eq!(v.lower_dirs(), vec![vp.join("layers/1/tree")]);
    let base = v.tree_dir(1);
    let want = describe(&src, &overlay_escape);
    let got = describe(&base, &|k| k.to_vec());
    for (p, w) in &want {
        assert_eq!(got.get(p), Some(w), "entry {p:?} differs");
    }
    assert_eq!(got.len(), want.len());
    // Holes stayed holes.
    let sb = fs::metadata(base.join("sparse.img")).unwrap();
    assert_eq!(sb.len(), 3 << 20);
    assert!(
        sb.blocks() * 512 < 1 << 20,
        "sparse file was filled: {} blocks",
        sb.blocks()
    );
    // The new active root has the base root's attributes (the merged root shows the upper's).
    let r1 = fs::metadata(&base).unwrap();
    let r2 = fs::metadata(v.upper_dir()).unwrap();
    assert_eq!(
        (r2.mode(), r2.uid(), r2.gid()),
        (r1.mode(), r1.uid(), r1.gid())
    );
    assert!(fs::read_dir(v.upper_dir()).unwrap().next().is_none());
    // The base is sealed and verifies clean.
    let m = Manifest::load(&v.layer_dir(1)).unwrap();
    assert_eq!(m.epoch, 1);
    assert_eq!(m.parent_epoch, None);
    assert_eq!(m.volume_id, v.id());
    assert_eq!(m.entry_count as usize, want.len());
    assert_eq!(m.partial_files, 0);
    // Data bytes count each inode once: "shared inode" once, not three times.
    let expected_bytes = 11 + (3 << 20) + 12 + 12;
    assert_eq!(m.data_bytes, expected_bytes);
    let rep = v.verify().unwrap();
    assert!(rep.is_sound(), "{:?}", rep.problems().collect::<Vec<_>>());
    assert_eq!(rep.layers.len(), 1);
    assert!(rep.strays.is_empty(), "{:?}", rep.strays);
    assert!(rep.leftovers.is_empty(), "{:?}", rep.leftovers);
}

#[test]
fn import_refuses_what_a_layer_cannot_hold() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let wh = c(src.join("gone").to_str().unwrap());
    assert_eq!(
        unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR | 0o600, 0) },
        0
    );
    let e = Volume::create(&t.path().join("v1"), 4096, Some(&src)).unwrap_err();
    assert!(
        matches!(&e, VolumeError::Unrepresentable { path, .. } if path.ends_with("gone")),
        "{e}"
    );
    assert!(e.to_string().contains("whiteout"), "{e}");
    // A failed create leaves nothing behind: a new target is removed, an empty one emptied.
    assert!(!t.path().join("v1").exists());
    fs::create_dir(t.path().join("v0")).unwrap();
    assert!(Volume::create(&t.path().join("v0"), 4096, Some(&src)).is_err());
    assert!(fs::read_dir(t.path().join("v0")).unwrap().next().is_none());
    fs::remove_file(src.join("gone")).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    set_xattr(&src.join("f"), "trusted.layervol.partial", b"1:00");
    let e = Volume::create(&t.path().join("v2"), 4096, Some(&src)).unwrap_err();
    assert!(e.to_string().contains("private namespace"), "{e}");
}

#[test]
fn create_refuses_bad_targets() {
    let t = tempfile::tempdir().unwrap();
    let full = t.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("x"), b"").unwrap();
    let e = Volume::create(&full, 4096, None).unwrap_err();
    assert!(matches!(e, VolumeError::TargetNotEmpty { .. }), "{e}");
    let file = t.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        Volume::create(&file, 4096, None),
        Err(VolumeError::TargetNotEmpty { .. })
    ));
    // A volume inside the directory it imports would copy itself forever.
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let e = Volume::create(&src.join("vol"), 4096, Some(&src)).unwrap_err();
    assert!(
        e.to_string().contains("inside the directory it imports"),
        "{e}"
    );
    let e = Volume::create(&t.path().join("v"), 4096, Some(&file)).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
}

#[test]
fn open_validates_and_locks() {
    let t = tempfile::tempdir().unwrap();
    let e = Volume::open(t.path()).unwrap_err();
    assert!(matches!(e, VolumeError::NotAVolume { .. }), "{e}");
    assert!(
        !t.path().join("lock").exists(),
        "open must not litter a non-volume"
    );
    let vp = t.path().join("vol");
    let mut v = Volume::create(&vp, 4096, None).unwrap();
    // The creator holds the lock: a second writer is refused, readers are not.
    let e = Volume::open(&vp).unwrap_err();
    assert!(matches!(e, VolumeError::Locked { .. }), "{e}");
    assert!(e.to_string().contains("in use"), "{e}");
    let mut ro = Volume::open_read_only(&vp).unwrap();
    assert!(ro.is_read_only());
    assert!(matches!(
        ro.freeze_active(),
        Err(VolumeError::ReadOnly { .. })
    ));
    assert!(matches!(ro.pin(1), Err(VolumeError::ReadOnly { .. })));
    assert!(matches!(ro.seal(1), Err(VolumeError::ReadOnly { .. })));
    v.freeze_active().unwrap();
    drop(v);
    let _w = Volume::open(&vp).unwrap();
    // The lock is released when the handle goes away.
    drop(_w);
    Volume::open(&vp).unwrap();
}

fn rewrite_volume_json(vp: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let text = fs::read_to_string(vp.join(VOLUME_FILE)).unwrap();
    let env: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut body = env["body"].clone();
    edit(&mut body);
    let bytes = meta::encode_envelope(
        "layervol.volume",
        meta::Version { major: 1, minor: 0 },
        &body,
        true,
    );
    fs::write(vp.join(VOLUME_FILE), bytes).unwrap();
}

#[test]
fn open_detects_damaged_or_inconsistent_metadata() {
    let t = tempfile::tempdir().unwrap();
    let vp = t.path().join("vol");
    let mut v = Volume::create(&vp, 4096, None).unwrap();
    v.freeze_active().unwrap();
    drop(v);
    let good = fs::read(vp.join(VOLUME_FILE)).unwrap();
    // A flipped digit.
    let text = String::from_utf8(good.clone()).unwrap();
    let bad = text.replacen("\"block_size\": 4096", "\"block_size\": 4097", 1);
    assert_ne!(bad, text);
    fs::write(vp.join(VOLUME_FILE), bad).unwrap();
    let e = Volume::open(&vp).unwrap_err();
    assert!(matches!(e, VolumeError::ChecksumMismatch { .. }), "{e}");
    // A newer major version (2 is the layout with squashed layer directories).
    let newer = text.replacen("\"version\": \"1.0\"", "\"version\": \"3.0\"", 1);
    fs::write(vp.join(VOLUME_FILE), newer).unwrap();
    let e = Volume::open_read_only(&vp).unwrap_err();
    assert!(matches!(e, VolumeError::UnsupportedVersion { .. }), "{e}");
    assert!(e.to_string().contains("upgrade layervol"), "{e}");
    // Structurally wrong but correctly checksummed bodies.
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &str); 5] = [
        (|b| b["layers"][1]["state"] = "frozen".into(), "not active"),
        (
            |b| b["layers"][0]["state"] = "active".into(),
            "not the newest",
        ),
        (|b| b["layers"][1]["parent_epoch"] = 7.into(), "parent"),
        (
            |b| b["layers"][1]["pinned"] = true.into(),
            "pinned but not frozen",
        ),
        (|b| b["layers"] = serde_json::json!([]), "no layer"),
    ];
    for (edit, msg) in cases {
        fs::write(vp.join(VOLUME_FILE), &good).unwrap();
        rewrite_volume_json(&vp, edit);
        let e = Volume::open(&vp).unwrap_err();
        assert!(matches!(e, VolumeError::Inconsistent { .. }), "{e}");
        assert!(e.to_string().contains(msg), "{e} should mention {msg}");
    }
    // A listed layer whose directory vanished.
    fs::write(vp.join(VOLUME_FILE), &good).unwrap();
    fs::remove_dir_all(vp.join("layers/1/maps")).unwrap();
    let e = Volume::open(&vp).unwrap_err();
    assert!(e.to_string().contains("layers/1/maps is missing"), "{e}");
}

#[test]
fn freeze_stacks_layers_newest_first() {
    let t = tempfile::tempdir().unwrap();
    let vp = t.path().join("vol");
    let mut v = Volume::create(&vp, 4096, None).unwrap();
    fs::write(v.upper_dir().join("a"), b"epoch 1").unwrap();
    fs::set_permissions(v.upper_dir(), fs::Permissions::from_mode(0o710)).unwrap();
    set_xattr(&v.upper_dir(), "user.keep", b"me");
    set_xattr(&v.upper_dir(), "trusted.overlay.impure", b"y");
    let f = v.freeze_active().unwrap();
    assert_eq!((f.frozen_epoch, f.active_epoch), (1, 2));
    assert_eq!(v.upper_dir(), vp.join("layers/2/tree"));
    assert_eq!(v.work_dir(), vp.join("work/2"));
    assert!(v.work_dir().is_dir());
    assert!(fs::read_dir(v.upper_dir()).unwrap().next().is_none());
    // Root attributes follow; overlay format xattrs do not.
    assert_eq!(fs::metadata(v.upper_dir()).unwrap().mode() & 0o7777, 0o710);
    let xa = xattrs(&v.upper_dir());
    assert_eq!(xa.get(&b"user.keep"[..]), Some(&b"me".to_vec()));
    assert!(!xa.contains_key(&b"trusted.overlay.impure"[..]));
    fs::write(v.upper_dir().join("b"), b"epoch 2").unwrap();
    v.freeze_active().unwrap();
    assert_eq!(v.lower_dirs(), vec![v.tree_dir(2), v.tree_dir(1)]);
    assert_eq!(v.lower_epochs(), vec![2, 1]);
    assert_eq!(v.unsealed_epochs(), vec![1, 2]);
    // Old work dirs go when asked; the active one stays.
    let mut removed = v.remove_stale_work_dirs().unwrap();
    removed.sort();
    assert_eq!(removed, vec![vp.join("work/1"), vp.join("work/2")]);
    assert!(!vp.join("work/1").exists() && v.work_dir().is_dir());
    drop(v);
    let v = Volume::open(&vp).unwrap();
    let states: Vec<_> = v
        .layers()
        .iter()
        .map(|l| (l.epoch, l.parent_epoch, l.state))
        .collect();
    assert_eq!(
        states,
        vec![
            (1, None, LayerState::Frozen),
            (2, Some(1), LayerState::Frozen),
            (3, Some(2), LayerState::Active)
        ]
    );
    assert!(v.layers()[0].frozen_unix_secs.is_some());
    assert_eq!(fs::read(v.tree_dir(1).join("a")).unwrap(), b"epoch 1");
}

#[test]
fn freeze_is_atomic_at_every_crash_point() {
    // Count the crash points a freeze passes.
    let t = tempfile::tempdir().unwrap();
    let mut v = Volume::create(&t.path().join("count"), 4096, None).unwrap();
    meta::arm_crash(None);
    v.freeze_active().unwrap();
    let points = meta::crash_points_seen();
    assert!(points >= 3, "freeze passes {points} crash points");
    for k in 0..points {
        let vp = t.path().join(format!("vol{k}"));
        let mut v = Volume::create(&vp, 4096, None).unwrap();
        fs::write(v.upper_dir().join("a"), b"data of epoch 1").unwrap();
        meta::arm_crash(Some(k));
        let r = v.freeze_active();
        meta::arm_crash(None);
        assert!(r.is_err(), "crash point {k} was not reached");
        drop(v); // the "process" dies: its lock goes away
        let mut v = Volume::open(&vp).unwrap();
        let before = match v.active_epoch() {
            1 => {
                assert_eq!(v.layers().len(), 1);
                assert_eq!(v.layers()[0].state, LayerState::Active);
                1
            }
            2 => {
                assert_eq!(v.layers()[0].state, LayerState::Frozen);
                assert_eq!(v.layers()[1].state, LayerState::Active);
                2
            }
            e => panic!("crash point {k}: impossible active epoch {e}"),
        };
        let temps = fs::read_dir(&vp)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp.")
            })
            .count();
        assert_eq!(
            temps, 0,
            "crash point {k}: open must remove stale temporaries"
        );
        // The volume carries on: the next freeze works on either state.
        let f = v.freeze_active().unwrap();
        assert_eq!(f.frozen_epoch, before);
        assert_eq!(
            fs::read(v.tree_dir(1).join("a")).unwrap(),
            b"data of epoch 1"
        );
        v.remove_stale_work_dirs().unwrap();
        drop(v);
        let ro = Volume::open_read_only(&vp).unwrap();
        assert_eq!(ro.active_epoch(), before + 1);
        let rep = ro.verify().unwrap();
        assert!(
            rep.strays.is_empty() && rep.leftovers.is_empty(),
            "crash point {k}: strays {:?}, leftovers {:?}",
            rep.strays,
            rep.leftovers
        );
    }
}

#[test]
fn crashed_create_is_not_a_volume() {
    let t = tempfile::tempdir().unwrap();
    let vp = t.path().join("vol");
    meta::arm_crash(Some(0)); // before volume.json is renamed into place
    assert!(Volume::create(&vp, 4096, None).is_err());
    meta::arm_crash(None);
    assert!(matches!(
        Volume::open(&vp),
        Err(VolumeError::NotAVolume { .. })
    ));
    let e = Volume::create(&vp, 4096, None).unwrap_err();
    assert!(e.to_string().contains("crashed `volume create`"), "{e}");
}

#[test]
fn unlisted_leftovers_are_reported_reused_or_moved_aside() {
    let t = tempfile::tempdir().unwrap();
    let vp = t.path().join("vol");
    let mut v = Volume::create(&vp, 4096, None).unwrap();
    meta::arm_crash(Some(0)); // freeze dies just before its commit
    assert!(v.freeze_active().is_err());
    meta::arm_crash(None);
    drop(v);
    let ro = Volume::open_read_only(&vp).unwrap();
    let mut strays = ro.verify().unwrap().strays;
    strays.sort();
    assert_eq!(strays, vec![vp.join("layers/2"), vp.join("work/2")]);
    // An empty skeleton is reused.
    let mut v = Volume::open(&vp).unwrap();
    assert_eq!(v.freeze_active().unwrap().active_epoch, 2);
    // Data in an unlisted layer dir (writes of a mount that died between a live snapshot's
    // switch and its commit) is never thrown away: it moves to lost+found, and the freeze
    // goes on.
    meta::arm_crash(Some(0));
    assert!(v.freeze_active().is_err());
    meta::arm_crash(None);
    drop(v);
    fs::write(vp.join("layers/3/tree/unacknowledged"), b"?").unwrap();
    let mut v = Volume::open(&vp).unwrap();
    assert_eq!(v.freeze_active().unwrap().active_epoch, 3);
    assert!(
        v.upper_dir().read_dir().unwrap().next().is_none(),
        "fresh layer 3"
    );
    let lost: Vec<_> = fs::read_dir(vp.join(LOST_DIR)).unwrap().flatten().collect();
    assert_eq!(lost.len(), 1);
    assert_eq!(
        fs::read(lost[0].path().join("tree/unacknowledged")).unwrap(),
        b"?"
    );
    // What was moved aside is not a stray of the volume's layers.
    assert!(v.verify().unwrap().strays.is_empty());
    // Again, twice for the same epoch within a second: lost+found exists already, and
    // nothing is overwritten.
    for n in 0..2 {
        meta::arm_crash(Some(0));
        assert!(v.freeze_active().is_err());
        meta::arm_crash(None);
        drop(v);
        fs::write(vp.join("layers/4/tree/unacknowledged"), b"!").unwrap();
        v = Volume::open(&vp).unwrap();
        v.prepare_freeze().unwrap();
        assert_eq!(fs::read_dir(vp.join(LOST_DIR)).unwrap().count(), 2 + n);
    }
    assert_eq!(v.freeze_active().unwrap().active_epoch, 4);
}

#[test]
fn pin_and_unpin_persist() {
    let t = tempfile::tempdir().unwrap();
    let vp = t.path().join("vol");
    let mut v = Volume::create(&vp, 4096, None).unwrap();
    v.freeze_active().unwrap();
    v.freeze_active().unwrap();
    v.pin(1).unwrap();
    v.pin(1).unwrap();
    assert!(v.layer(1).unwrap().pinned);
    assert!(!v.layer(2).unwrap().pinned);
    let e = v.pin(3).unwrap_err();
    assert!(
        matches!(
            e,
            VolumeError::NotFrozen {
                epoch: 3,
                state: LayerState::Active,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("only a frozen layer can be pinned"),
        "{e}"
    );
    assert!(matches!(
        v.pin(9),
        Err(VolumeError::NoSuchEpoch { epoch: 9, .. })
    ));
    drop(v);
    let mut v = Volume::open(&vp).unwrap();
    assert!(v.layer(1).unwrap().pinned);
    v.unpin(1).unwrap();
    drop(v);
    assert!(!Volume::open(&vp).unwrap().layer(1).unwrap().pinned);
}

/// Makes `name` in layer `epoch` a partial file over `below`, with `writes` applied the way
/// the engine applies them (fill, write, record), its map stored and its marker set.
fn make_partial(
    v: &Volume,
    epoch: u64,
    name: &str,
    below: &[u8],
    writes: &[(u64, &[u8])],
) -> BlockMap {
    let tree = v.tree_dir(epoch);
    let id = MapId::random().unwrap();
    let mut map = BlockMap::new(id, v.block_size(), below.len() as u64).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(tree.join(name))
        .unwrap();
    f.set_len(below.len() as u64).unwrap();
    for (off, data) in writes {
        for s in map.write_fill(*off, data.len() as u64) {
            let r = s.range.start as usize..s.range.end as usize;
            let fill = match s.source {
                Source::Below => below[r].to_vec(),
                _ => vec![0; r.len()],
            };
            f.write_all_at(&fill, s.range.start).unwrap();
        }
        f.write_all_at(data, *off).unwrap();
        map.record_write(f.as_fd(), *off, data).unwrap();
    }
    let maps = v.maps(epoch);
    maps.store(&map).unwrap();
    maps.sync().unwrap();
    blockmap::write_marker(dir_fd(&tree).as_fd(), &c(name), id, v.userxattr()).unwrap();
    map
}

struct Sealed {
    _t: tempfile::TempDir,
    vp: PathBuf,
    v: Volume,
    map: BlockMap,
    manifest: Manifest,
}

fn base_content() -> Vec<u8> {
    (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect()
}

/// A volume with base layer 1 (imported) and frozen, sealed layer 2 holding a partial file,
/// a new file, a directory and a whiteout; active layer 3.
fn sealed_volume() -> Sealed {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big.bin"), base_content()).unwrap();
    fs::write(src.join("keep.txt"), b"kept").unwrap();
    fs::write(src.join("doomed.txt"), b"doomed").unwrap();
    let vp = t.path().join("vol");
    let mut v = Volume::create(&vp, 4096, Some(&src)).unwrap();
    let map = make_partial(
        &v,
        2,
        "big.bin",
        &base_content(),
        &[(4096 + 10, b"PATCH"), (3 * 4096 + 50, b"tail")],
    );
    fs::write(v.upper_dir().join("new.txt"), b"new in epoch 2").unwrap();
    fs::create_dir(v.upper_dir().join("d")).unwrap();
    let wh = c(v.upper_dir().join("doomed.txt").to_str().unwrap());
    assert_eq!(unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR, 0) }, 0);
    assert_eq!(v.freeze_active().unwrap().frozen_epoch, 2);
    assert_eq!(v.unsealed_epochs(), vec![2]);
    let manifest = v.seal(2).unwrap();
    assert!(v.unsealed_epochs().is_empty());
    Sealed {
        _t: t,
        vp,
        v,
        map,
        manifest,
    }
}

#[test]
fn seal_records_partial_files_and_verify_is_clean() {
    let s = sealed_volume();
    let m = &s.manifest;
    assert_eq!((m.epoch, m.parent_epoch), (2, Some(1)));
    assert_eq!(m.volume_id, s.v.id());
    assert_eq!(m.partial_files, 1);
    let big = m
        .entries
        .iter()
        .find(|e| e.path.as_bytes() == b"big.bin")
        .unwrap();
    assert_eq!(
        big.kind,
        EntryKind::Partial {
            size: 3 * 4096 + 100,
            map: s.map.id(),
            map_crc32c: s.map.checksum(),
            present_blocks: 2,
        }
    );
    let wh = m
        .entries
        .iter()
        .find(|e| e.path.as_bytes() == b"doomed.txt")
        .unwrap();
    assert_eq!(wh.kind, EntryKind::Whiteout);
    assert_eq!(m.data_bytes, 14 + s.map.present_bytes());
    assert_eq!(s.map.present_bytes(), 4096 + 100);
    assert_eq!(m.block_count, 1 + 2);
    assert_eq!(m.entry_count, 5); // root, big.bin, d, doomed.txt, new.txt
    // The partial file reads as base data with the patches applied.
    let plan = s.map.read_plan(0, u64::MAX);
    assert_eq!(plan.iter().filter(|p| p.source == Source::Here).count(), 2);
    // Seal is idempotent: the manifest file is not rewritten.
    let before = fs::read(s.v.layer_dir(2).join(MANIFEST_FILE)).unwrap();
    assert_eq!(s.v.seal(2).unwrap(), s.manifest);
    assert_eq!(
        fs::read(s.v.layer_dir(2).join(MANIFEST_FILE)).unwrap(),
        before
    );
    // Sealing the active layer is refused.
    assert!(matches!(s.v.seal(3), Err(VolumeError::NotFrozen { .. })));
    let rep = s.v.verify().unwrap();
    assert!(rep.is_sound(), "{:?}", rep.problems().collect::<Vec<_>>());
    assert_eq!(rep.problems().count(), 0);
    assert_eq!(
        rep.layers.iter().map(|l| l.epoch).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

fn flip_byte(p: &Path, off: u64) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], off).unwrap();
}

type Damage = fn(&Sealed);
type Expect = fn(&[(u64, Problem)]) -> bool;

#[test]
fn verify_reports_each_kind_of_damage() {
    let cases: Vec<(&str, Damage, Expect)> = vec![
        (
            "a flipped bit in a present block",
            |s| flip_byte(&s.v.tree_dir(2).join("big.bin"), 4096 + 3000),
            |p| matches!(p, [(2, Problem::BlockCrcMismatch { block: 1, .. })]),
        ),
        (
            "a flipped bit in the last, partly used present block",
            |s| flip_byte(&s.v.tree_dir(2).join("big.bin"), 3 * 4096 + 99),
            |p| matches!(p, [(2, Problem::BlockCrcMismatch { block: 3, .. })]),
        ),
        (
            "a flipped bit in a whole file of the base layer",
            |s| flip_byte(&s.v.tree_dir(1).join("keep.txt"), 1),
            |p| matches!(p, [(1, Problem::DataCrcMismatch { .. })]),
        ),
        (
            "a flipped bit in a whole file of a snapshot",
            |s| flip_byte(&s.v.tree_dir(2).join("new.txt"), 0),
            |p| matches!(p, [(2, Problem::DataCrcMismatch { .. })]),
        ),
        (
            "a changed mode",
            |s| {
                fs::set_permissions(
                    s.v.tree_dir(2).join("new.txt"),
                    fs::Permissions::from_mode(0o600),
                )
                .unwrap()
            },
            |p| matches!(p, [(2, Problem::EntryChanged { field: "mode", .. })]),
        ),
        (
            "a changed owner",
            |s| std::os::unix::fs::chown(s.v.tree_dir(2).join("d"), Some(99), None).unwrap(),
            |p| matches!(p, [(2, Problem::EntryChanged { field: "owner", .. })]),
        ),
        (
            "an added xattr (an opaque flag appearing)",
            |s| set_xattr(&s.v.tree_dir(2).join("d"), "trusted.overlay.opaque", b"y"),
            |p| {
                matches!(
                    p,
                    [(
                        2,
                        Problem::EntryChanged {
                            field: "xattrs",
                            ..
                        }
                    )]
                )
            },
        ),
        (
            "a deleted file",
            |s| fs::remove_file(s.v.tree_dir(2).join("new.txt")).unwrap(),
            |p| {
                p.iter().any(|x| matches!(x, (2, Problem::EntryMissing { path }) if path.as_bytes() == b"new.txt"))
                    && p.iter().all(|x| matches!(x.1, Problem::EntryMissing { .. } | Problem::ManifestMismatch { .. }))
            },
        ),
        (
            "an added file",
            |s| fs::write(s.v.tree_dir(2).join("d/extra"), b"").unwrap(),
            |p| matches!(p, [(2, Problem::EntryUnexpected { path })] if path.as_bytes() == b"d/extra"),
        ),
        (
            "a damaged block map",
            |s| flip_byte(&s.v.maps(2).path_of(s.map.id()), 90),
            |p| {
                p.iter().any(|x| matches!(x, (2, Problem::MapUnreadable { error, .. }) if error.contains("checksum")))
            },
        ),
        (
            "a deleted block map",
            |s| fs::remove_file(s.v.maps(2).path_of(s.map.id())).unwrap(),
            |p| {
                p.iter()
                    .any(|x| matches!(x, (2, Problem::MapUnreadable { .. })))
            },
        ),
        (
            "a block map replaced by another valid one",
            |s| {
                let mut m = s.map.clone();
                m.record_blocks(0, &base_content()[..4096]);
                s.v.maps(2).store(&m).unwrap();
            },
            |p| {
                p.iter()
                    .any(|x| matches!(x, (2, Problem::MapChecksumMismatch { .. })))
            },
        ),
        (
            "a truncated partial file",
            |s| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(s.v.tree_dir(2).join("big.bin"))
                    .unwrap()
                    .set_len(4096)
                    .unwrap()
            },
            |p| {
                p.iter().any(|x| {
                    matches!(
                        x,
                        (
                            2,
                            Problem::PartialSizeMismatch {
                                map_size: 12388,
                                file_size: 4096,
                                ..
                            }
                        )
                    )
                })
            },
        ),
        (
            "a changed number in the manifest",
            |s| {
                let p = s.v.layer_dir(2).join(MANIFEST_FILE);
                let t = fs::read_to_string(&p)
                    .unwrap()
                    .replacen("\"epoch\":2", "\"epoch\":1", 1);
                fs::write(&p, t).unwrap();
            },
            |p| matches!(p, [(2, Problem::ManifestUnreadable { error })] if error.contains("checksum")),
        ),
        (
            "a missing manifest",
            |s| fs::remove_file(s.v.layer_dir(2).join(MANIFEST_FILE)).unwrap(),
            |p| matches!(p, [(2, Problem::ManifestUnreadable { error })] if error.contains("never sealed")),
        ),
        (
            "another layer's manifest",
            |s| {
                fs::copy(
                    s.v.layer_dir(1).join(MANIFEST_FILE),
                    s.v.layer_dir(2).join(MANIFEST_FILE),
                )
                .unwrap();
            },
            |p| {
                p.iter()
                    .any(|x| matches!(x, (2, Problem::ManifestMismatch { field: "epoch", .. })))
                    && p.iter().any(|x| {
                        matches!(
                            x,
                            (
                                2,
                                Problem::ManifestMismatch {
                                    field: "parent_epoch",
                                    ..
                                }
                            )
                        )
                    })
            },
        ),
        (
            "a malformed partial-file marker",
            |s| {
                set_xattr(
                    &s.v.tree_dir(2).join("big.bin"),
                    "trusted.layervol.partial",
                    b"garbage",
                )
            },
            |p| {
                p.iter()
                    .any(|x| matches!(x, (2, Problem::BadMarker { .. })))
            },
        ),
    ];
    for (what, damage, expect) in cases {
        let s = sealed_volume();
        damage(&s);
        let rep = s.v.verify().unwrap();
        let problems: Vec<(u64, Problem)> = rep.problems().map(|(e, p)| (e, p.clone())).collect();
        assert!(!rep.is_sound(), "{what}: not detected");
        assert!(
            expect(&problems),
            "{what}: unexpected findings {problems:#?}"
        );
        for (_, p) in &problems {
            assert!(!p.to_string().is_empty());
        }
    }
}

#[test]
fn bytes_outside_present_blocks_are_not_damage() {
    let s = sealed_volume();
    // Block 0 of the partial file is not present: its bytes are never read.
    flip_byte(&s.v.tree_dir(2).join("big.bin"), 10);
    let rep = s.v.verify().unwrap();
    assert!(rep.is_sound());
    assert_eq!(rep.problems().count(), 0);
}

#[test]
fn orphan_maps_are_warnings_and_can_be_collected() {
    let s = sealed_volume();
    let mut orphan = BlockMap::new(MapId::random().unwrap(), 4096, 10).unwrap();
    orphan.record_blocks(0, b"0123456789");
    s.v.maps(2).store(&orphan).unwrap();
    let rep = s.v.verify().unwrap();
    assert!(rep.is_sound());
    let problems: Vec<_> = rep.problems().map(|(e, p)| (e, p.clone())).collect();
    assert_eq!(problems, vec![(2, Problem::OrphanMap { map: orphan.id() })]);
    assert!(problems[0].1.is_warning());
    assert!(matches!(
        s.v.collect_orphan_maps(3),
        Err(VolumeError::NotFrozen { .. })
    ));
    assert_eq!(s.v.collect_orphan_maps(2).unwrap(), vec![orphan.id()]);
    assert_eq!(s.v.maps(2).list().unwrap(), vec![s.map.id()]);
    assert_eq!(s.v.verify().unwrap().problems().count(), 0);
    let _ = &s.vp;
}

#[test]
fn hard_linked_partial_file_shares_one_map() {
    // Keep the temp dir alive: `..` would drop (and delete) it.
    let Sealed {
        v: mut w,
        _t: _keep,
        ..
    } = sealed_volume();
    // Layer 3 (active): a partial file with a second name, then freeze and seal.
    let map = make_partial(&w, 3, "p", &[5u8; 9000], &[(100, b"x")]);
    fs::hard_link(w.upper_dir().join("p"), w.upper_dir().join("p2")).unwrap();
    w.freeze_active().unwrap();
    let m = w.seal(3).unwrap();
    assert_eq!(m.partial_files, 1);
    assert_eq!(
        m.data_bytes, 4096,
        "one present block, counted once for two names"
    );
    let kinds: Vec<_> = m
        .entries
        .iter()
        .filter(|e| e.path.as_bytes().starts_with(b"p"))
        .map(|e| e.kind.clone())
        .collect();
    assert_eq!(kinds.len(), 2);
    assert_eq!(kinds[0], kinds[1]);
    assert!(matches!(kinds[0], EntryKind::Partial { map: id, .. } if id == map.id()));
    assert!(w.verify().unwrap().is_sound());
    assert_eq!(w.lower_epochs(), vec![3, 2, 1]);
}

#[test]
fn seal_refuses_an_unsound_layer() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let mut v = Volume::create(&t.path().join("vol"), 4096, None).unwrap();
    let map = make_partial(&v, 1, "f", &[1u8; 5000], &[(0, b"abc")]);
    fs::remove_file(v.maps(1).path_of(map.id())).unwrap();
    v.freeze_active().unwrap();
    let e = v.seal(1).unwrap_err();
    assert!(matches!(e, VolumeError::Inconsistent { .. }), "{e}");
    assert!(e.to_string().contains("cannot seal layer 1"), "{e}");
    assert!(e.to_string().contains("block map"), "{e}");
    assert_eq!(v.unsealed_epochs(), vec![1]);
}

#[test]
fn userxattr_volume_uses_user_namespace() {
    let t = tempfile::tempdir().unwrap();
    let vp = t.path().join("vol");
    let v = Volume::create_with(
        &vp,
        &CreateOptions {
            userxattr: true,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    assert!(v.userxattr());
    assert_eq!(v.xattr_namespace(), XattrNamespace::User);
    let map = make_partial(&v, 1, "f", &[1u8; 5000], &[(10, b"abc")]);
    let tree = dir_fd(&v.tree_dir(1));
    assert_eq!(
        blockmap::read_marker(tree.as_fd(), c"f", true).unwrap(),
        Some(map.id())
    );
    assert_eq!(
        blockmap::read_marker(tree.as_fd(), c"f", false).unwrap(),
        None
    );
    drop(v);
    let mut v = Volume::open(&vp).unwrap();
    assert!(v.userxattr());
    v.freeze_active().unwrap();
    let m = v.seal(1).unwrap();
    assert_eq!(m.partial_files, 1);
    // What was moved aside is not a stray of the volume's layers.
    assert!(v.verify().unwrap().strays.is_empty());
}

/// A freeze copies the root's attributes to the next layer before its barrier and again
/// under it if the root changed: the second copy must follow every change, a removed xattr
/// and a new mode included, and the stamp must tell a changed root from an unchanged one.
#[test]
fn root_attrs_copied_again_follow_the_root() {
    use super::import::{RootStamp, copy_root_attrs};
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    set_xattr(&a, "user.keep", b"1");
    set_xattr(&a, "user.gone", b"2");
    fs::set_permissions(&a, fs::Permissions::from_mode(0o751)).unwrap();
    let stamp = copy_root_attrs(&a, &b, false).unwrap();
    assert_eq!(xattrs(&b), xattrs(&a));
    assert_eq!(RootStamp::now(&a).unwrap(), stamp, "nothing changed");

    let parent = dir_fd(t.path());
    sys::removexattr(parent.as_fd(), &c("a"), &c("user.gone")).unwrap();
    fs::set_permissions(&a, fs::Permissions::from_mode(0o700)).unwrap();
    assert_ne!(RootStamp::now(&a).unwrap(), stamp, "the root changed");
    copy_root_attrs(&a, &b, false).unwrap();
    assert_eq!(xattrs(&b), xattrs(&a));
    let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
    assert_eq!(mb.mode() & 0o7777, 0o700);
    assert_eq!((mb.mtime(), mb.mtime_nsec()), (ma.mtime(), ma.mtime_nsec()));
}
