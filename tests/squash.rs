//! Squash end to end: layers written by the real engine through a FUSE mount (block copy-ups
//! into partial files, renames with redirects, whiteouts, opaque directories, live
//! snapshots), squashed with the library, then mounted again by layervol and, for a
//! kernel-compatible squash, by kernel overlayfs. The view must not change. Needs root and
//! /dev/fuse; fails (never skips) without them.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use layervol::volume::Volume;
use layervol::volume::squash::{self, SquashOptions};

mod common;

use common::VolDir as Vol;

/// The volume the tests squash: big files to write blocks into, nested directories, a hard
/// link and a symlink in its base layer.
fn vol() -> Vol {
    Vol::new(|src| {
        std::fs::create_dir_all(src.join("d/sub/deeper")).unwrap();
        std::fs::write(src.join("big1"), pattern(1 << 20, 1)).unwrap();
        std::fs::write(src.join("big2"), pattern(300_000, 2)).unwrap();
        std::fs::write(src.join("d/x"), b"x").unwrap();
        std::fs::write(src.join("d/sub/y"), b"y in sub").unwrap();
        std::fs::write(src.join("d/sub/deeper/z"), pattern(20_000, 3)).unwrap();
        std::fs::write(src.join("d/h1"), b"hard linked").unwrap();
        std::fs::hard_link(src.join("d/h1"), src.join("d/h2")).unwrap();
        std::os::unix::fs::symlink("d/x", src.join("s")).unwrap();
    })
}

fn snapshot(v: &Vol) {
    v.ok(&["snapshot", "m", "--json"]);
}

/// Opens the volume once the daemon of the last mount has exited (it holds the volume lock
/// until then; `umount` returns before).
fn open_after_umount(p: &Path) -> Volume {
    for _ in 0..500 {
        match Volume::open(p) {
            Err(layervol::volume::VolumeError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r.unwrap(),
        }
    }
    panic!("the volume stayed locked 5 s after umount")
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn write_at(p: &Path, off: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, off).unwrap();
}

/// Everything observable but atime and link counts, per path.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut groups: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let content = if ft.is_file() {
            let d = std::fs::read(&p).unwrap();
            format!("{} bytes crc {:08x}", d.len(), crc32c::crc32c(&d))
        } else if ft.is_symlink() {
            format!("-> {:?}", std::fs::read_link(&p).unwrap())
        } else if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                let n = e.unwrap().file_name();
                let n = n.to_str().unwrap();
                stack.push(if rel.is_empty() {
                    n.to_string()
                } else {
                    format!("{rel}/{n}")
                });
            }
            "dir".into()
        } else {
            format!("rdev {}", md.rdev())
        };
        let mut xattrs = Vec::new();
        if let Ok(names) = xattr_names(&p) {
            xattrs = names;
        }
        if !ft.is_dir() {
            groups
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(rel.clone());
        }
        let perm = if ft.is_symlink() {
            0
        } else {
            md.permissions().mode() & 0o7777
        };
        out.insert(
            rel,
            format!(
                "{content} mode {perm:o} {}:{} mtime {}.{} xattrs {xattrs:?}",
                md.uid(),
                md.gid(),
                md.mtime(),
                md.mtime_nsec()
            ),
        );
    }
    for names in groups.values().filter(|g| g.len() > 1) {
        for n in names {
            let others: Vec<&String> = names.iter().filter(|o| *o != n).collect();
            out.get_mut(n)
                .unwrap()
                .push_str(&format!(" links {others:?}"));
        }
    }
    out
}

fn xattr_names(p: &Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    for k in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|k| !k.is_empty())
    {
        let kc = std::ffi::CString::new(k).unwrap();
        let mut v = vec![0u8; 4096];
        let m = unsafe { libc::lgetxattr(c.as_ptr(), kc.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.push((String::from_utf8_lossy(k).into_owned(), v));
        }
    }
    out.sort();
    Ok(out)
}

/// Three epochs of changes through the mount, two live snapshots; returns the view, with
/// the volume unmounted.
fn write_history(v: &Vol) -> BTreeMap<String, String> {
    v.mount();
    let m = |r: &str| v.p(&format!("m/{r}"));
    // Epoch 2: block copy-ups, a directory rename, deletes, a metadata-only copy-up.
    write_at(&m("big1"), 100_000, &[7; 4096]);
    write_at(&m("big2"), 299_990, b"appended beyond the end");
    std::fs::create_dir(m("n")).unwrap();
    std::fs::write(m("n/f"), b"new in 2").unwrap();
    std::fs::rename(m("d/sub"), m("d/moved")).unwrap();
    std::fs::remove_file(m("d/x")).unwrap();
    std::fs::set_permissions(m("big2"), std::fs::Permissions::from_mode(0o640)).unwrap();
    // A write through one name of a hard-linked base file: every name shows it.
    let h_ino = std::fs::metadata(m("d/h1")).unwrap().ino();
    write_at(&m("d/h2"), 0, b"HARD");
    assert_eq!(std::fs::read(m("d/h1")).unwrap(), b"HARD linked");
    snapshot(v);
    // Epoch 3: a copy-up over a partial file, rename of a partial file, an opaque dir,
    // truncate.
    write_at(&m("big1"), 0, b"epoch three at the start");
    write_at(&m("d/moved/deeper/z"), 5_000, &[3; 100]);
    std::fs::rename(m("big2"), m("big2-renamed")).unwrap();
    std::fs::remove_dir_all(m("n")).unwrap();
    std::fs::create_dir(m("n")).unwrap();
    std::fs::write(m("n/g"), b"in the new n").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(m("big1"))
        .unwrap()
        .set_len(500_000)
        .unwrap();
    // Through the other name, now over a frozen partial file.
    write_at(&m("d/h1"), 5, b"LINKED");
    assert_eq!(std::fs::read(m("d/h2")).unwrap(), b"HARD LINKED");
    for h in ["d/h1", "d/h2"] {
        assert_eq!(std::fs::metadata(m(h)).unwrap().ino(), h_ino, "{h}: st_ino");
    }
    snapshot(v);
    // Epoch 4 (stays active): a copy-up over the chain, new hard links.
    write_at(&m("big1"), 200_000, &[4; 10_000]);
    write_at(&m("big2-renamed"), 4096, b"active write");
    std::fs::write(m("d/moved/new"), b"active file").unwrap();
    std::fs::hard_link(m("d/moved/new"), m("new-link")).unwrap();
    std::fs::hard_link(m("d/h1"), m("h3")).unwrap();
    std::fs::remove_file(m("d/h2")).unwrap();
    assert_eq!(std::fs::metadata(m("h3")).unwrap().nlink(), 2);
    let view = describe(&v.p("m"));
    v.umount();
    // The mount saw what a remount sees.
    v.mount();
    assert_eq!(describe(&v.p("m")), view, "remount changed the view");
    v.umount();
    view
}

fn assert_same(what: &str, want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) {
    let mut diffs = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => diffs.push(format!("missing {k}: {w}")),
            Some(g) if g != w => diffs.push(format!("{k}:\n  want {w}\n  got  {g}")),
            _ => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            diffs.push(format!("unexpected {k}: {g}"));
        }
    }
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

#[test]
fn squash_of_engine_written_layers_keeps_the_view() {
    let v = vol();
    let view = write_history(&v);
    let mut vol = open_after_umount(&v.p("vol"));
    assert_eq!(vol.layers().len(), 4);
    let s = squash::squash_offline(&mut vol, None).unwrap();
    eprintln!("{s:?}");
    assert_eq!(s.merged_epochs, vec![1, 2, 3]);
    assert!(s.assembled_files >= 2, "{s:?}");
    assert!(s.relinked_partials >= 2, "{s:?}");
    drop(vol);
    v.ok(&["verify", "vol"]);
    v.mount();
    assert_same("layervol mount after squash", &view, &describe(&v.p("m")));
    // The volume keeps working: a write and a snapshot on top of the merged layer.
    write_at(&v.p("m/big1"), 300_000, b"after squash");
    snapshot(&v);
    v.umount();
    v.ok(&["verify", "vol"]);
}

#[test]
fn kernel_compatible_squash_of_engine_written_layers_mounts_under_overlayfs() {
    let v = vol();
    let view = write_history(&v);
    let mut vol = open_after_umount(&v.p("vol"));
    let s = squash::squash(
        &mut vol,
        &SquashOptions {
            kernel_compatible: true,
            ..SquashOptions::default()
        },
    )
    .unwrap();
    eprintln!("{s:?}");
    assert!(s.active_assembled_files >= 2, "{s:?}");
    let lowers: Vec<String> = vol
        .lower_dirs()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let upper = vol.upper_dir();
    drop(vol);
    let work = v.p("vol-kwork");
    std::fs::create_dir(&work).unwrap();
    std::fs::create_dir(v.p("k")).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(v.p("k"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t overlay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kernel = describe(&v.p("k"));
    assert!(
        Command::new("umount")
            .arg(v.p("k"))
            .status()
            .unwrap()
            .success()
    );
    assert_same(
        "kernel overlay mount after a kernel-compatible squash",
        &view,
        &kernel,
    );
    v.ok(&["verify", "vol"]);
    v.mount();
    assert_same(
        "layervol mount after a kernel-compatible squash",
        &view,
        &describe(&v.p("m")),
    );
    v.umount();
}
