//! Volume mode end to end, on real FUSE mounts: create, mount, live snapshots with open files
//! and a writer running, status, remount, verify (and damage it must report). Needs root and
//! /dev/fuse; fails (never skips) without them.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

mod common;

use common::{BIN, VolDir as Vol};

/// The volume most tests start from: `a` and `d/x` in its base layer.
fn vol() -> Vol {
    Vol::new(|src| {
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("a"), b"base a\n").unwrap();
        std::fs::write(src.join("d/x"), b"x").unwrap();
    })
}

#[test]
fn live_snapshot_freezes_the_active_layer_and_open_files_follow() {
    let v = vol();
    v.mount();
    std::fs::write(v.p("m/new"), b"epoch2").unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(v.p("m/a"))
        .unwrap();
    f.write_all(b"+before\n").unwrap();

    let snap = v.json(&["snapshot", "m", "--json"]);
    let frozen = snap["frozen_epoch"].as_u64().unwrap();
    assert_eq!(snap["active_epoch"].as_u64().unwrap(), frozen + 1);
    assert!(snap["dirty_bytes"].as_u64().unwrap() >= 4096, "{snap}");

    // The open fd keeps working; its next write lands in the new layer, never the frozen one.
    f.write_all(b"+after\n").unwrap();
    drop(f);
    std::fs::remove_file(v.p("m/d/x")).unwrap();
    let tree = |e: u64, rel: &str| v.p(&format!("vol/layers/{e}/tree/{rel}"));
    assert_eq!(
        std::fs::read(tree(frozen, "a")).unwrap(),
        b"base a\n+before\n"
    );
    assert_eq!(std::fs::read(tree(frozen, "new")).unwrap(), b"epoch2");
    assert_eq!(
        std::fs::read(tree(frozen + 1, "a")).unwrap(),
        b"base a\n+before\n+after\n"
    );
    assert_eq!(
        std::fs::read(v.p("m/a")).unwrap(),
        b"base a\n+before\n+after\n"
    );
    assert!(!v.p("m/d/x").exists());
    assert!(
        tree(frozen, "d/x").symlink_metadata().is_err(),
        "the whiteout goes to the new layer, not the frozen one"
    );

    let st = v.json(&["status", "m", "--json"]);
    assert_eq!(st["active_epoch"].as_u64().unwrap(), frozen + 1);
    assert_eq!(
        st["last_snapshot"]["frozen_epoch"].as_u64().unwrap(),
        frozen
    );
    let states: Vec<_> = st["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states.last().unwrap(), "active");
    assert!(states[..states.len() - 1].iter().all(|s| s == "frozen"));

    // Remount: the same view from the layers on disk.
    v.umount();
    v.mount();
    assert_eq!(
        std::fs::read(v.p("m/a")).unwrap(),
        b"base a\n+before\n+after\n"
    );
    assert_eq!(std::fs::read(v.p("m/new")).unwrap(), b"epoch2");
    assert!(!v.p("m/d/x").exists());
    v.umount();
    v.ok(&["verify", "vol"]);
}

#[test]
fn snapshots_with_a_writer_running_lose_nothing() {
    let v = vol();
    v.mount();
    let path = v.p("m/log");
    let writer = std::thread::spawn(move || {
        let f = std::fs::File::create(&path).unwrap();
        for i in 0u64..2000 {
            f.write_all_at(&i.to_le_bytes(), i * 8).unwrap();
        }
    });
    let mut epochs = Vec::new();
    for _ in 0..5 {
        let s = v.json(&["snapshot", "m", "--json"]);
        assert!(s["barrier_micros"].as_u64().unwrap() < 2_000_000);
        epochs.push(s["frozen_epoch"].as_u64().unwrap());
    }
    writer.join().unwrap();
    let data = std::fs::read(v.p("m/log")).unwrap();
    assert_eq!(data.len(), 2000 * 8);
    for (i, c) in data.chunks(8).enumerate() {
        assert_eq!(
            u64::from_le_bytes(c.try_into().unwrap()),
            i as u64,
            "record {i}"
        );
    }
    assert!(epochs.windows(2).all(|w| w[1] == w[0] + 1));
    v.umount();
    v.ok(&["verify", "vol"]);
}

#[test]
fn verify_reports_damage_in_a_frozen_layer() {
    let v = vol();
    v.mount();
    std::fs::write(v.p("m/f"), vec![7u8; 10000]).unwrap();
    let frozen = v.json(&["snapshot", "m", "--json"])["frozen_epoch"]
        .as_u64()
        .unwrap();
    v.umount();
    v.ok(&["verify", "vol"]);
    // Flip one byte of a frozen file behind layervol's back.
    let victim = v.p(&format!("vol/layers/{frozen}/tree/f"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.write_all_at(b"X", 5000).unwrap();
    drop(f);
    let out = v.run(&["verify", "vol"]);
    assert!(!out.status.success(), "verify accepted a damaged layer");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("epoch {frozen}")), "{text}");
}

#[test]
fn bad_volume_commands_are_clear() {
    let v = vol();
    let out = v.run(&["snapshot", "m"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no layervol volume is mounted"));
    let out = v.run(&["mount", "vol", "m", "-o", "lowerdir=/x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set by the volume"));
    let out = v.run(&["volume", "create", "vol"]);
    assert!(!out.status.success(), "create over an existing volume");
    let out = v.run(&["volume", "create", "v2", "--block-size", "3K"]);
    assert!(
        !out.status.success(),
        "a block size that is not a power of two"
    );
}

/// A deterministic pseudo-random generator (xorshift): tests must be reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn block_level_copy_up_matches_a_model_across_snapshots() {
    let v = vol();
    let mut rng = Rng(0x5eed);
    let mut model: Vec<u8> = (0..(4 << 20)).map(|_| rng.next() as u8).collect();
    std::fs::write(v.p("big"), &model).unwrap();
    // Re-create the volume with the big file in its base layer.
    std::fs::remove_dir_all(v.p("vol")).unwrap();
    std::fs::rename(v.p("big"), v.p("src/big")).unwrap();
    v.ok(&["volume", "create", "vol", "--from", "src"]);
    v.mount();
    let path = v.p("m/big");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let check = |model: &[u8], what: &str| {
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{what}: read: {e}"));
        assert_eq!(got.len(), model.len(), "{what}: size");
        assert!(got == model, "{what}: contents differ");
    };
    for round in 0..4 {
        for _ in 0..60 {
            let off = rng.below(model.len() as u64 + 10_000);
            let len = 1 + rng.below(9000) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            f.write_all_at(&data, off).unwrap();
            let end = off as usize + len;
            if end > model.len() {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
        }
        // truncate down then extend: the cut bytes must read as zeros, not from below
        let cut = model.len() as u64 - rng.below(100_000);
        f.set_len(cut).unwrap();
        model.truncate(cut as usize);
        f.set_len(cut + 5000).unwrap();
        model.resize(cut as usize + 5000, 0);
        let mut a = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        a.write_all(b"appended").unwrap();
        model.extend_from_slice(b"appended");
        drop(a);
        check(&model, &format!("round {round} before snapshot"));
        v.json(&["snapshot", "m", "--json"]);
        check(&model, &format!("round {round} after snapshot"));
    }
    drop(f);
    v.umount();
    v.mount();
    check(&model, "after remount");
    v.umount();
    v.ok(&["verify", "vol"]);
}

#[test]
fn a_snapshot_holds_only_the_written_blocks() {
    let v = vol();
    std::fs::remove_dir_all(v.p("vol")).unwrap();
    let big = std::fs::File::create(v.p("src/big")).unwrap();
    big.set_len(64 << 20).unwrap();
    big.write_all_at(b"x", (64 << 20) - 1).unwrap();
    drop(big);
    v.ok(&["volume", "create", "vol", "--from", "src"]);
    v.mount();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(v.p("m/big"))
        .unwrap();
    let mut rng = Rng(7);
    let mut blocks = std::collections::BTreeSet::new();
    while blocks.len() < 200 {
        blocks.insert(rng.below((64 << 20) / 4096));
    }
    for b in &blocks {
        f.write_all_at(&[0xab; 4096], b * 4096).unwrap();
    }
    drop(f);
    let s = v.json(&["snapshot", "m", "--json"]);
    let written = 200 * 4096;
    assert_eq!(s["dirty_bytes"].as_u64().unwrap(), written, "{s}");
    let frozen = s["frozen_epoch"].as_u64().unwrap();
    let held = allocated(&v.p(&format!("vol/layers/{frozen}/tree/big")));
    assert!(
        held <= written * 12 / 10,
        "the layer holds {held} bytes for {written} bytes written"
    );
    // Status counts what each layer holds, not the sizes its partial files show.
    let st = v.json(&["status", "m", "--json"]);
    let layer = |e: u64| {
        st["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["epoch"].as_u64() == Some(e))
            .unwrap_or_else(|| panic!("no layer {e} in {st}"))
            .clone()
    };
    let l = layer(frozen);
    assert_eq!(l["data_bytes"].as_u64().unwrap(), written, "{l}");
    assert_eq!(l["blocks"].as_u64().unwrap(), 200, "{l}");
    assert_eq!(l["partial_files"].as_u64().unwrap(), 1, "{l}");
    let a = layer(frozen + 1);
    assert_eq!(a["data_bytes"].as_u64().unwrap(), 0, "{a}");
    let text = v.ok(&["status", "m"]);
    assert!(text.contains("800.0 KiB"), "{text}");
    v.umount();
    v.ok(&["verify", "vol"]);
}

#[test]
fn periodic_snapshots() {
    let v = vol();
    v.ok(&["mount", "vol", "m", "-o", "snapshot_interval=0.2"]);
    std::fs::write(v.p("m/f"), b"1").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let st = v.json(&["status", "m", "--json"]);
    assert!(
        st["active_epoch"].as_u64().unwrap() >= 4,
        "no periodic snapshots: {st}"
    );
    assert_eq!(std::fs::read(v.p("m/f")).unwrap(), b"1");
    v.umount();
    v.ok(&["verify", "vol"]);
}

/// A directory reached through an absolute redirect whose path crosses another redirected
/// directory in a middle layer: the lookup below that layer must follow the inner redirect
/// too (kernel `ovl_lookup` does), or files of the bottom layer vanish after a remount.
#[test]
fn redirect_through_a_renamed_parent_in_a_middle_layer() {
    let v = vol();
    std::fs::remove_dir_all(v.p("vol")).unwrap();
    std::fs::create_dir_all(v.p("src/p/q/r")).unwrap();
    std::fs::write(v.p("src/p/q/r/file"), b"deep").unwrap();
    v.ok(&["volume", "create", "vol", "--from", "src"]);
    v.mount();
    std::fs::rename(v.p("m/p/q"), v.p("m/s")).unwrap();
    std::fs::write(v.p("m/s/r/new"), b"n").unwrap();
    v.json(&["snapshot", "m", "--json"]);
    std::fs::rename(v.p("m/s/r"), v.p("m/t")).unwrap();
    assert_eq!(std::fs::read(v.p("m/t/file")).unwrap(), b"deep");
    v.umount();
    v.mount();
    assert_eq!(
        std::fs::read(v.p("m/t/file")).unwrap(),
        b"deep",
        "after remount"
    );
    assert_eq!(std::fs::read(v.p("m/t/new")).unwrap(), b"n");
    v.umount();
}

#[test]
fn squash_keeps_a_pinned_layer_and_the_view() {
    let v = vol();
    v.mount();
    for i in 0..3 {
        std::fs::write(v.p(&format!("m/f{i}")), format!("{i}")).unwrap();
        v.json(&["snapshot", "m", "--json"]);
    }
    v.umount();
    // layers 1 (base) .. 4 frozen, 5 active; pin 3
    v.ok(&["volume", "pin", "vol", "3"]);
    let out = v.run(&["volume", "pin", "vol", "5"]);
    assert!(!out.status.success(), "the active layer cannot be pinned");
    v.ok(&["volume", "squash", "vol"]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v.p("vol/volume.json")).unwrap()).unwrap();
    let epochs: Vec<u64> = meta["body"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, vec![3, 4, 5], "squash stops at the pinned layer");
    v.mount();
    for i in 0..3 {
        assert_eq!(
            std::fs::read_to_string(v.p(&format!("m/f{i}"))).unwrap(),
            format!("{i}")
        );
    }
    assert_eq!(std::fs::read(v.p("m/a")).unwrap(), b"base a\n");
    v.umount();
    v.ok(&["verify", "vol"]);
}

/// `layervol snapshot m` in a loop on another thread until `finish`, which returns how many
/// ran. Not through a second `Vol`: dropping it would unmount.
struct SnapshotLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl SnapshotLoop {
    fn start(v: &Vol) -> SnapshotLoop {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, root) = (stop.clone(), v.root.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(BIN)
                    .current_dir(&root)
                    .env("LAYERVOL_RUN_DIR", root.join("run"))
                    .args(["snapshot", "m"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                n += 1;
            }
            n
        });
        SnapshotLoop { stop, thread }
    }

    fn finish(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn frozen_layers(st: &serde_json::Value) -> Vec<u64> {
    st["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["state"] == "frozen")
        .map(|l| l["epoch"].as_u64().unwrap())
        .collect()
}

/// Layer directories on disk (`vol/layers/*`), which a squash must have cleaned up.
fn layer_dirs(v: &Vol) -> usize {
    std::fs::read_dir(v.p("vol/layers")).unwrap().count()
}

#[test]
fn online_squash_with_a_writer_and_open_files() {
    const BLOCKS: u64 = 256;
    let v = vol();
    v.ok(&["mount", "vol", "m", "-o", "max_layers=0"]);
    let mut model = vec![0u8; (BLOCKS * 4096) as usize];
    for (i, b) in model.iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    std::fs::write(v.p("m/data"), &model).unwrap();
    std::fs::create_dir(v.p("m/d/sub")).unwrap();
    v.ok(&["snapshot", "m"]);
    let ino = |rel: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(v.p(rel)).unwrap().ino()
    };
    let inos_before = [ino("m/d"), ino("m/d/sub"), ino("m/data"), ino("m/a")];
    // Held across every squash: a reader opened before, and a directory (like a cwd).
    let reader = std::fs::File::open(v.p("m/data")).unwrap();
    let dir = std::fs::File::open(v.p("m/d")).unwrap();

    let path = v.p("m/data");
    let writer = std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut m = model;
        for i in 0u64..3000 {
            let blk = (i * 37) % BLOCKS;
            let fill = vec![(i % 251) as u8; 4096];
            f.write_all_at(&fill, blk * 4096).unwrap();
            m[(blk * 4096) as usize..((blk + 1) * 4096) as usize].copy_from_slice(&fill);
        }
        f.sync_all().unwrap();
        m
    });
    // Snapshots also run concurrently with the squashes: layers frozen while a squash is
    // being built must be taken care of when it commits.
    let snapper = SnapshotLoop::start(&v);
    let mut squashes = 0;
    for round in 0..8 {
        v.ok(&["snapshot", "m"]);
        if round % 2 == 1 {
            let out = v.ok(&["squash", "m"]);
            assert!(out.contains("online"), "{out}");
            squashes += 1;
        }
    }
    let model = writer.join().unwrap();
    assert!(snapper.finish() > 0);
    // A last squash after the writer: every frozen layer becomes one.
    v.ok(&["snapshot", "m"]);
    v.ok(&["squash", "m"]);
    assert!(squashes >= 4);

    assert_eq!(std::fs::read(v.p("m/data")).unwrap(), model);
    let mut seen = vec![0u8; model.len()];
    reader.read_exact_at(&mut seen, 0).unwrap();
    assert!(seen == model, "a reader opened before the squashes");
    // The directory fd still resolves names (as a process's cwd would).
    let sub =
        nix::sys::stat::fstatat(&dir, "sub", nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).unwrap();
    assert_eq!(sub.st_ino, inos_before[1]);
    let inos_after = [ino("m/d"), ino("m/d/sub"), ino("m/data"), ino("m/a")];
    assert_eq!(
        inos_before, inos_after,
        "st_ino kept across online squashes"
    );

    let st = v.json(&["status", "m", "--json"]);
    assert_eq!(frozen_layers(&st).len(), 1, "{st}");
    assert!(st["last_squash"]["finish_error"].is_null(), "{st}");
    assert_eq!(
        layer_dirs(&v),
        st["layers"].as_array().unwrap().len(),
        "replaced layer directories are removed"
    );
    drop((reader, dir));
    v.umount();
    v.ok(&["verify", "vol"]);
    v.mount();
    assert_eq!(std::fs::read(v.p("m/data")).unwrap(), model);
    assert!(v.p("m/d/sub").is_dir());
    v.umount();
    assert!(
        !v.p("vol/work/ghosts").exists(),
        "kept inodes go at the next mount"
    );
}

#[test]
fn a_mount_keeps_its_layer_count_bounded_by_itself() {
    let v = vol();
    v.ok(&["mount", "vol", "m", "-o", "max_layers=3"]);
    for i in 0..12 {
        std::fs::write(v.p(&format!("m/f{i}")), format!("file {i}")).unwrap();
        let mut a = std::fs::OpenOptions::new()
            .append(true)
            .open(v.p("m/a"))
            .unwrap();
        writeln!(a, "line {i}").unwrap();
        drop(a);
        v.ok(&["snapshot", "m"]);
    }
    // The squash runs in the background after a snapshot: wait for the bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let st = loop {
        let st = v.json(&["status", "m", "--json"]);
        if frozen_layers(&st).len() <= 3 && !st["last_squash"].is_null() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "more than 3 frozen layers: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(st["max_layers"], 3);
    let mut want = String::from("base a\n");
    for i in 0..12 {
        assert_eq!(
            std::fs::read_to_string(v.p(&format!("m/f{i}"))).unwrap(),
            format!("file {i}")
        );
        want += &format!("line {i}\n");
    }
    assert_eq!(std::fs::read_to_string(v.p("m/a")).unwrap(), want);
    // `squash VOL` finds the mount of the volume and squashes online.
    let out = v.ok(&["squash", "vol"]);
    assert!(out.contains("online"), "{out}");
    let st = v.json(&["status", "m", "--json"]);
    assert_eq!(frozen_layers(&st).len(), 1, "{st}");
    assert_eq!(std::fs::read_to_string(v.p("m/a")).unwrap(), want);
    v.umount();
    v.ok(&["verify", "vol"]);
}

/// Scattered written blocks read slowly (one read each, as scattered on disk as in the
/// file): the daemon folds them into the base when reading them costs an eighth of it,
/// counting extents, not just bytes. Here 1 MiB of contiguous writes is cheap and stays
/// partial; 1 MiB in 256 scattered blocks is folded (by bytes alone it would not be).
#[test]
fn scattered_written_blocks_are_folded_into_the_base() {
    const MIB: usize = 1 << 20;
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 251) as u8).collect();
    let v = Vol::new(|src| std::fs::write(src.join("big"), &data).unwrap());
    let mut model = data.clone();
    v.mount();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(v.p("m/big"))
        .unwrap();
    // Contiguous: 1 MiB in one extent, over two snapshots.
    for half in 0..2 {
        let off = 4 * MIB + half * MIB / 2;
        model[off..off + MIB / 2].fill(0xAA);
        f.write_all_at(&model[off..off + MIB / 2], off as u64)
            .unwrap();
        v.ok(&["snapshot", "m"]);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let st = v.json(&["status", "m", "--json"]);
    assert!(
        st["last_squash"].is_null(),
        "contiguous blocks folded: {st}"
    );
    assert_eq!(frozen_layers(&st).len(), 3, "{st}");
    // Scattered: every fourth block, 256 blocks in 256 extents.
    for i in 0..256 {
        let off = 8 * MIB + i * 16384;
        model[off..off + 4096].fill(0x55);
        f.write_all_at(&model[off..off + 4096], off as u64).unwrap();
        if i == 127 {
            v.ok(&["snapshot", "m"]);
        }
    }
    v.ok(&["snapshot", "m"]);
    drop(f);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let st = loop {
        let st = v.json(&["status", "m", "--json"]);
        if frozen_layers(&st).len() == 1 && st["squash_running"] == false {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "scattered blocks not folded: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(st["layers"][0]["partial_files"], 0, "{st}");
    assert!(std::fs::read(v.p("m/big")).unwrap() == model);
    v.umount();
    v.ok(&["verify", "vol"]);
    v.mount();
    assert!(std::fs::read(v.p("m/big")).unwrap() == model);
    v.umount();
}

/// A squash takes objects over by hard link or re-creates them, which moves their own
/// ctime; the mount keeps showing the ctime they had (POSIX: nothing changed them).
#[test]
fn a_squash_leaves_change_times_as_they_were() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let v = vol();
    v.mount();
    std::fs::create_dir_all(v.p("m/dir/sub")).unwrap();
    std::fs::write(v.p("m/dir/f"), b"f").unwrap();
    std::fs::hard_link(v.p("m/dir/f"), v.p("m/f-link")).unwrap();
    std::os::unix::fs::symlink("dir/f", v.p("m/sym")).unwrap();
    nix::unistd::mkfifo(
        &v.p("m/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    v.ok(&["snapshot", "m"]);
    std::fs::write(v.p("m/later"), b"later").unwrap();
    v.ok(&["snapshot", "m"]);
    let names = [
        "a", "d", "d/x", "dir", "dir/sub", "dir/f", "f-link", "sym", "fifo", "later",
    ];
    let ctimes = || -> Vec<(i64, i64)> {
        names
            .iter()
            .map(|n| {
                let m = std::fs::symlink_metadata(v.p(&format!("m/{n}"))).unwrap();
                (m.ctime(), m.ctime_nsec())
            })
            .collect()
    };
    let before = ctimes();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = v.ok(&["squash", "vol"]);
    assert!(out.contains("online"), "{out}");
    // Past the kernel's attribute cache.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(ctimes(), before, "after an online squash");
    v.umount();
    v.mount();
    assert_eq!(ctimes(), before, "after a remount");
    std::fs::write(v.p("m/newer"), b"n").unwrap();
    v.ok(&["snapshot", "m"]);
    v.umount();
    v.ok(&["squash", "vol"]);
    v.ok(&["verify", "vol"]);
    v.mount();
    assert_eq!(ctimes(), before, "after an offline squash");
    // A real change still moves it.
    std::fs::set_permissions(v.p("m/dir/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let m = std::fs::symlink_metadata(v.p("m/dir/f")).unwrap();
    assert!((m.ctime(), m.ctime_nsec()) > before[5]);
    v.umount();
    // A damaged table is reported by verify and refused by mount, not read wrong.
    let tables: Vec<_> = std::fs::read_dir(v.p("vol/layers"))
        .unwrap()
        .map(|e| e.unwrap().path().join("ctimes"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(tables.len(), 1, "{tables:?}");
    let mut b = std::fs::read(&tables[0]).unwrap();
    b[12] ^= 0x40;
    std::fs::write(&tables[0], &b).unwrap();
    let out = v.run(&["verify", "vol"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("change-time table") && text.contains("checksum"),
        "{text}"
    );
    let out = v.run(&["mount", "vol", "m"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ctimes"));
}

#[test]
fn online_squash_respects_a_pin_made_while_mounted() {
    let v = vol();
    v.ok(&["mount", "vol", "m", "-o", "max_layers=0"]);
    let mut epochs = Vec::new();
    for i in 0..4 {
        std::fs::write(v.p(&format!("m/f{i}")), format!("{i}")).unwrap();
        epochs.push(
            v.json(&["snapshot", "m", "--json"])["frozen_epoch"]
                .as_u64()
                .unwrap(),
        );
    }
    let pinned = epochs[1];
    v.ok(&["volume", "pin", "m", &pinned.to_string()]);
    v.ok(&["squash", "m"]);
    let st = v.json(&["status", "m", "--json"]);
    let frozen = frozen_layers(&st);
    assert!(frozen.contains(&pinned), "pinned layer kept: {st}");
    assert_eq!(frozen.first(), Some(&pinned), "{st}");
    for i in 0..4 {
        assert_eq!(
            std::fs::read_to_string(v.p(&format!("m/f{i}"))).unwrap(),
            i.to_string()
        );
    }
    v.ok(&["volume", "unpin", "m", &pinned.to_string()]);
    v.ok(&["squash", "m"]);
    let st = v.json(&["status", "m", "--json"]);
    assert_eq!(frozen_layers(&st).len(), 1, "{st}");
    v.umount();
    v.ok(&["verify", "vol"]);
}

#[test]
fn a_full_disk_during_snapshot_or_squash_leaves_the_volume_as_it_was() {
    assert!(nix::unistd::geteuid().is_root());
    let t = tempfile::tempdir().unwrap();
    let root = t.path().to_path_buf();
    let _tmpfs = common::Tmpfs::mount(&root, "48m");
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::create_dir(root.join("m")).unwrap();
    let base: Vec<u8> = (0..8 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(root.join("src/big"), &base).unwrap();
    let v = Vol::at(root.clone());
    v.ok(&["volume", "create", "vol", "--from", "src"]);
    v.ok(&["mount", "vol", "m", "-o", "max_layers=0"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(v.p("m/big"))
        .unwrap();
    let mut want = base.clone();
    for (i, blk) in [3u64, 40, 700, 1500].iter().enumerate() {
        let data = vec![i as u8 + 1; 4096];
        f.write_all_at(&data, blk * 4096).unwrap();
        want[(blk * 4096) as usize..((blk + 1) * 4096) as usize].copy_from_slice(&data);
        v.ok(&["snapshot", "m"]);
    }
    f.sync_all().unwrap();
    let before = v.json(&["status", "m", "--json"]);
    // Fill the disk.
    let filler = v.p("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    for args in [["snapshot", "m"], ["squash", "m"]] {
        let out = v.run(&args);
        assert!(!out.status.success(), "{args:?} on a full disk succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unchanged") && err.contains("No space left"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read(v.p("m/big")).unwrap(), want);
    }
    let after = v.json(&["status", "m", "--json"]);
    assert_eq!(before["layers"], after["layers"], "layers unchanged");
    assert_eq!(before["active_epoch"], after["active_epoch"]);
    // With space again both work, and nothing was lost.
    std::fs::remove_file(&filler).unwrap();
    v.ok(&["snapshot", "m"]);
    v.ok(&["squash", "m"]);
    assert_eq!(std::fs::read(v.p("m/big")).unwrap(), want);
    drop(f);
    v.umount();
    v.ok(&["verify", "vol"]);
}

/// Whatever step of a snapshot runs out of space (here tmpfs inodes: 0, 1, 2... free), with
/// open partial files whose block maps changed, the snapshot either works or fails with
/// nothing changed: the mount goes on (fsync works: it is not left failed), nothing is lost.
#[test]
fn a_snapshot_short_of_space_at_any_step_changes_nothing() {
    assert!(nix::unistd::geteuid().is_root());
    let t = tempfile::tempdir().unwrap();
    let root = t.path().to_path_buf();
    let _tmpfs = common::Tmpfs::mount(&root, "64m,nr_inodes=2000");
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::create_dir(root.join("m")).unwrap();
    // Six files, so that the block maps a freeze writes need more than one inode.
    const FILES: usize = 6;
    let mut want: Vec<Vec<u8>> = (0..FILES)
        .map(|n| (0..512 << 10).map(|i| ((i + n) % 251) as u8).collect())
        .collect();
    for (n, w) in want.iter().enumerate() {
        std::fs::write(root.join(format!("src/f{n}")), w).unwrap();
    }
    let v = Vol::at(root.clone());
    v.ok(&["volume", "create", "vol", "--from", "src"]);
    v.ok(&["mount", "vol", "m", "-o", "max_layers=0"]);
    let files: Vec<std::fs::File> = (0..FILES)
        .map(|n| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(v.p(&format!("m/f{n}")))
                .unwrap()
        })
        .collect();
    let write_blocks = |want: &mut Vec<Vec<u8>>, blk: usize| {
        let data = vec![blk as u8 + 1; 4096];
        for (f, w) in files.iter().zip(want.iter_mut()) {
            f.write_all_at(&data, (blk * 4096) as u64).unwrap();
            w[blk * 4096..(blk + 1) * 4096].copy_from_slice(&data);
        }
    };
    let check = |want: &Vec<Vec<u8>>| {
        for (n, w) in want.iter().enumerate() {
            assert!(
                std::fs::read(v.p(&format!("m/f{n}"))).unwrap() == *w,
                "f{n}"
            );
        }
    };
    write_blocks(&mut want, 0); // the partial files exist from here on
    for f in &files {
        f.sync_all().unwrap();
    }
    let epoch = v.json(&["status", "m", "--json"])["active_epoch"].clone();
    // Leaves `k` free inodes; returns the files that take the others.
    let fill = root.join("fill");
    std::fs::create_dir(&fill).unwrap();
    let take_all_but = |k: usize| {
        let mut fillers = Vec::new();
        while std::fs::File::create(fill.join(fillers.len().to_string())).is_ok() {
            fillers.push(fill.join(fillers.len().to_string()));
        }
        for p in fillers.drain(fillers.len() - k..) {
            std::fs::remove_file(p).unwrap();
        }
        fillers
    };
    // Each k three times: a failed attempt may leave directories the next one reuses, which
    // moves the step that runs out of space.
    let mut failures = 0;
    for attempt in 0..90 {
        let k = attempt / 3;
        write_blocks(&mut want, attempt + 1);
        let fillers = take_all_but(k);
        let out = v.run(&["snapshot", "m"]);
        for p in fillers {
            std::fs::remove_file(p).unwrap();
        }
        if out.status.success() {
            break;
        }
        failures += 1;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No space left"), "{k} free inodes: {err}");
        for f in &files {
            f.sync_all()
                .unwrap_or_else(|e| panic!("fsync after a snapshot failed with {k} free: {e}"));
        }
        assert_eq!(v.json(&["status", "m", "--json"])["active_epoch"], epoch);
        check(&want);
    }
    assert!(
        failures > 1,
        "a snapshot found enough space with {failures} free inodes"
    );
    assert_ne!(
        v.json(&["status", "m", "--json"])["active_epoch"],
        epoch,
        "no snapshot worked with 30 free inodes"
    );
    write_blocks(&mut want, 91);
    for f in &files {
        f.sync_all().unwrap();
    }
    v.ok(&["snapshot", "m"]);
    check(&want);
    drop(files);
    v.umount();
    v.ok(&["verify", "vol"]);
    v.ok(&["mount", "vol", "m"]);
    check(&want);
    v.umount();
}

#[test]
fn st_ino_survives_squash_and_remount() {
    use std::os::unix::fs::MetadataExt;
    let v = vol();
    let paths = ["m/d", "m/d/x", "m/a", "m/new", "m/new/f", "m"];
    let inos = |v: &Vol| -> Vec<u64> {
        paths
            .iter()
            .map(|p| std::fs::symlink_metadata(v.p(p)).unwrap().ino())
            .collect()
    };
    v.ok(&["mount", "vol", "m", "-o", "max_layers=0"]);
    std::fs::create_dir(v.p("m/new")).unwrap();
    std::fs::write(v.p("m/new/f"), b"new").unwrap();
    let mut a = std::fs::OpenOptions::new()
        .append(true)
        .open(v.p("m/a"))
        .unwrap();
    a.write_all(b"+1\n").unwrap();
    v.ok(&["snapshot", "m"]);
    a.write_all(b"+2\n").unwrap();
    std::fs::write(v.p("m/d/x"), b"y").unwrap();
    drop(a);
    v.ok(&["snapshot", "m"]);
    let before = inos(&v);
    // Online: every frozen layer (the base too) becomes one; directories, and `a` made
    // whole, are new inodes on disk.
    v.ok(&["squash", "m"]);
    assert_eq!(inos(&v), before, "while mounted");
    v.umount();
    v.mount();
    assert_eq!(inos(&v), before, "after a remount");
    assert_eq!(std::fs::read(v.p("m/a")).unwrap(), b"base a\n+1\n+2\n");
    // Offline, again.
    v.ok(&["snapshot", "m"]);
    v.umount();
    v.ok(&["squash", "vol"]);
    v.mount();
    assert_eq!(inos(&v), before, "after an offline squash");
    v.umount();
    v.ok(&["verify", "vol"]);
    assert!(v.p("vol/reserved").is_dir(), "identity inodes kept");
}

#[test]
fn an_offline_squash_frees_the_reserved_inodes_of_deleted_objects() {
    use std::os::unix::fs::MetadataExt;
    let v = vol();
    let reserved = |v: &Vol| std::fs::read_dir(v.p("vol/reserved")).map_or(0, |d| d.count());
    let ino = |v: &Vol, p: &str| std::fs::symlink_metadata(v.p(p)).unwrap().ino();
    v.ok(&["mount", "vol", "m", "-o", "max_layers=0"]);
    std::fs::create_dir_all(v.p("m/gone/sub")).unwrap();
    std::fs::write(v.p("m/gone/sub/f"), b"f").unwrap();
    std::fs::write(v.p("m/d/x"), b"y").unwrap();
    v.ok(&["snapshot", "m"]);
    // Every directory of the merged layer is re-created: their identities are reserved.
    v.ok(&["squash", "m"]);
    let kept = reserved(&v);
    assert!(kept >= 3, "{kept} reserved inodes");
    let inos = (ino(&v, "m/d"), ino(&v, "m/d/x"));
    std::fs::remove_dir_all(v.p("m/gone")).unwrap();
    v.ok(&["snapshot", "m"]);
    v.umount();
    let out = v.ok(&["squash", "vol"]);
    assert!(
        reserved(&v) <= kept - 2,
        "{out}: {} of {kept} left",
        reserved(&v)
    );
    assert!(!out.contains(" 0 reserved inodes freed"), "{out}");
    // What still exists keeps its st_ino.
    v.mount();
    assert_eq!((ino(&v, "m/d"), ino(&v, "m/d/x")), inos);
    assert_eq!(std::fs::read(v.p("m/d/x")).unwrap(), b"y");
    v.umount();
    v.ok(&["verify", "vol"]);
}

/// Snapshots do not pile up work dirs: a mount keeps the one it started with and the next
/// mount's is ready; those prepared for epochs that froze since are removed.
#[test]
fn an_online_squash_frees_the_reserved_inodes_of_deleted_objects_the_mount_let_go() {
    use std::os::unix::fs::MetadataExt;
    let v = vol();
    // Inode numbers of the reserved identities (what the mount shows as st_ino).
    let reserved = |v: &Vol| -> std::collections::HashSet<u64> {
        std::fs::read_dir(v.p("vol/reserved")).map_or_else(
            |_| Default::default(),
            |d| d.map(|e| e.unwrap().metadata().unwrap().ino()).collect(),
        )
    };
    let ino = |v: &Vol, p: &str| std::fs::symlink_metadata(v.p(p)).unwrap().ino();
    let squash = |v: &Vol| -> u64 {
        std::fs::write(v.p("m/tick"), b"t").unwrap();
        v.ok(&["snapshot", "m"]);
        let out = v.ok(&["squash", "m"]);
        let freed = out
            .split("; ")
            .find_map(|p| p.strip_suffix(" reserved inodes freed"));
        freed.unwrap_or_else(|| panic!("{out}")).parse().unwrap()
    };
    v.ok(&["mount", "vol", "m", "-o", "max_layers=0"]);
    std::fs::create_dir_all(v.p("m/gone/sub")).unwrap();
    std::fs::write(v.p("m/gone/sub/f"), b"f").unwrap();
    std::fs::write(v.p("m/d/x"), b"y").unwrap();
    v.ok(&["snapshot", "m"]);
    // Every directory of the merged layer is re-created: their identities are reserved.
    squash(&v);
    let gone = [ino(&v, "m/gone"), ino(&v, "m/gone/sub")];
    let kept = reserved(&v);
    assert!(
        gone.iter().all(|i| kept.contains(i)),
        "{gone:?} in {kept:?}"
    );
    let inos = (ino(&v, "m/d"), ino(&v, "m/d/x"));
    // Deleted, but still open: the mount still identifies them by their numbers.
    let open = std::fs::File::open(v.p("m/gone/sub")).unwrap();
    std::fs::remove_dir_all(v.p("m/gone")).unwrap();
    squash(&v);
    let left = reserved(&v);
    assert!(
        gone.iter().all(|i| left.contains(i)),
        "{gone:?} in {left:?}"
    );
    // Let go (closed, and the kernel made to forget them): freed by the next squash.
    drop(open);
    std::fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
    let freed = squash(&v);
    assert!(freed >= 2, "{freed} freed");
    let left = reserved(&v);
    assert!(
        gone.iter().all(|i| !left.contains(i)),
        "{gone:?} in {left:?}"
    );
    // What still exists keeps its st_ino, mounted and after a remount.
    assert_eq!((ino(&v, "m/d"), ino(&v, "m/d/x")), inos);
    v.umount();
    v.mount();
    assert_eq!((ino(&v, "m/d"), ino(&v, "m/d/x")), inos);
    assert_eq!(std::fs::read(v.p("m/d/x")).unwrap(), b"y");
    v.umount();
    v.ok(&["verify", "vol"]);
}

#[test]
fn snapshots_leave_no_work_dirs_behind() {
    let v = vol();
    v.mount();
    let work_dirs = || std::fs::read_dir(v.p("vol/work")).unwrap().count();
    for i in 0..5 {
        std::fs::write(v.p("m/a"), format!("{i}")).unwrap();
        v.ok(&["snapshot", "m"]);
        assert!(
            work_dirs() <= 2,
            "after snapshot {i}: {} work dirs",
            work_dirs()
        );
    }
    v.umount();
    v.ok(&["verify", "vol"]);
    v.mount();
    assert_eq!(work_dirs(), 1);
    assert_eq!(std::fs::read(v.p("m/a")).unwrap(), b"4");
    v.umount();
}

/// Every operation sees one layer stack: a snapshot or a squash switch falling between the
/// moment an operation looked a node up and the moment it used the node's layers must not
/// show it a directory in the new, empty upper (ENOENT) or make it leave out a whiteout
/// (a removed tree comes back). Snapshots run back to back, with squashes, while directory
/// trees are made, opened, listed and removed; afterwards, and after a remount, nothing of
/// them is left.
#[test]
fn operations_racing_snapshots_and_squashes_see_one_stack() {
    let v = vol();
    v.ok(&["mount", "vol", "m", "-o", "max_layers=3"]);
    let snapshots = SnapshotLoop::start(&v);
    let t0 = std::time::Instant::now();
    let mut rounds = 0;
    while rounds < 300 || (rounds < 3000 && t0.elapsed() < std::time::Duration::from_secs(20)) {
        let mut p = v.p("m/d/t");
        let mut made = Vec::new();
        for level in 0..6 {
            std::fs::create_dir(&p)
                .unwrap_or_else(|e| panic!("round {rounds}: mkdir {level}: {e}"));
            std::fs::File::open(&p).unwrap_or_else(|e| panic!("round {rounds}: open {level}: {e}"));
            std::fs::write(p.join("f"), b"f").unwrap();
            made.push(p.clone());
            p = p.join("s");
        }
        for (level, p) in made.iter().enumerate().rev() {
            let names: Vec<_> = std::fs::read_dir(p)
                .unwrap_or_else(|e| panic!("round {rounds}: readdir {level}: {e}"))
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["f"], "round {rounds}: level {level}");
            std::fs::remove_file(p.join("f")).unwrap();
            std::fs::remove_dir(p).unwrap_or_else(|e| panic!("round {rounds}: rmdir {level}: {e}"));
        }
        rounds += 1;
    }
    let n = snapshots.finish();
    assert!(n > 20, "only {n} snapshots ran beside {rounds} rounds");
    let left = |v: &Vol| std::fs::read_dir(v.p("m/d")).unwrap().count();
    assert_eq!(left(&v), 1, "d/ should hold only x");
    v.umount();
    v.ok(&["verify", "vol"]);
    v.mount();
    assert_eq!(left(&v), 1, "d/ should hold only x after a remount");
    v.umount();
}

/// Found with fio writing into a 1 GiB file while snapshots ran: the automatic squash folded
/// the written blocks into a new base file and removed the old one, whose last descriptor
/// was in the chain of the live partial file; the next snapshot closed it under its barrier,
/// and on this machine's `discard` mount freeing 1 GiB took seconds, writers paused
/// meanwhile (4-7 s). Closing what may be the last descriptor of a removed file is now left
/// to a background thread.
#[test]
fn a_snapshot_does_not_free_a_removed_layer_file_under_its_barrier() {
    const MIB: usize = 1 << 20;
    const GIB: usize = 1 << 30;
    let v = Vol::new(|src| {
        let f = std::fs::File::create(src.join("big")).unwrap();
        let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
        for i in 0..GIB / MIB {
            f.write_all_at(&chunk, (i * MIB) as u64).unwrap();
        }
    });
    v.mount();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(v.p("m/big"))
        .unwrap();
    // Enough scattered blocks (16 KiB of read cost each) for the fold: more than an eighth
    // of the base's 1 GiB, over two snapshots.
    let block = [0x5au8; 4096];
    for i in 0..9000u64 {
        f.write_all_at(&block, i * 65536).unwrap();
        if i == 4500 {
            v.ok(&["snapshot", "m"]);
        }
    }
    v.ok(&["snapshot", "m"]);
    // While the fold is built: the live partial file's chain reaches the old base.
    f.write_all_at(&block, 12345 * 4096).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let st = v.json(&["status", "m", "--json"]);
        if frozen_layers(&st).len() == 1 && st["squash_running"] == false {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no fold: {st}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    f.write_all_at(&block, 23456 * 4096).unwrap();
    let s = v.json(&["snapshot", "m", "--json"]);
    // The part of the barrier that takes the maps is in memory: microseconds. (Before:
    // 0.47 s in this test, up to 7 s with a writer saturating the disk.)
    let maps_ms = s["barrier_maps_micros"].as_u64().unwrap() / 1000;
    assert!(
        maps_ms < 50,
        "maps taken in {maps_ms} ms under the barrier: {s}"
    );
    drop(f);
    v.umount();
    v.ok(&["verify", "vol"]);
}

/// Found by pjdfstest (link/00, volume mounted with snapshots every second and squash on):
/// an online squash takes objects over by hard link, so from the link until the old layer
/// directories are removed an object of a frozen layer had twice its names (`lstat` showed
/// nlink 6 for a fifo with 3 names). The mount shows the count the object had before.
#[test]
fn an_online_squash_leaves_link_counts_as_they_were() {
    let v = vol();
    v.mount();
    std::fs::write(v.p("m/f"), b"f").unwrap();
    for n in ["f2", "f3"] {
        std::fs::hard_link(v.p("m/f"), v.p(&format!("m/{n}"))).unwrap();
    }
    std::fs::write(v.p("m/single"), b"s").unwrap();
    v.ok(&["snapshot", "m"]);
    std::fs::write(v.p("m/other"), b"o").unwrap();
    v.ok(&["snapshot", "m"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, f, single) = (stop.clone(), v.p("m/f"), v.p("m/single"));
        std::thread::spawn(move || {
            use std::os::unix::fs::MetadataExt;
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen.insert((
                    std::fs::symlink_metadata(&f).unwrap().nlink(),
                    std::fs::symlink_metadata(&single).unwrap().nlink(),
                ));
            }
            seen
        })
    };
    v.ok(&["squash", "m"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    let r = &v.json(&["status", "m", "--json"])["last_squash"];
    assert!(
        r["linked_objects"].as_u64().unwrap() > 0,
        "nothing taken over by link: {r}"
    );
    assert_eq!(seen, [(3, 1)].into(), "link counts seen during the squash");
    v.umount();
}

/// `volume create --from`, `verify`, `export` and an offline `squash` read and copy whole
/// trees, which takes minutes for gigabytes: on a terminal they show what they have done so
/// far (entries, bytes, rate) and draw the final counts before clearing the line. Off a
/// terminal they print nothing extra.
#[test]
fn long_volume_commands_show_progress_on_a_terminal() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..40 {
        std::fs::write(src.join(format!("sub/f{i}")), vec![i as u8; 30_000]).unwrap();
    }
    let vol = t.path().join("vol");
    let out_dir = t.path().join("exported");
    // What `layervol ARGS` draws on a terminal (`script` gives it one).
    let on_terminal = |args: String| -> String {
        let typescript = t.path().join("typescript");
        let out = Command::new("script")
            .args(["-qec", &format!("{BIN} {args}")])
            .arg(&typescript)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args}: {out:?}");
        String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned()
    };
    // 42 entries: the root, `sub` and 40 files; 1 200 000 bytes of data.
    let shown = on_terminal(format!(
        "volume create {} --from {}",
        vol.display(),
        src.display()
    ));
    assert!(
        shown.contains("checksumming: 42 entries, 1.14 MiB"),
        "no final counts drawn:\n{shown}"
    );
    let shown = on_terminal(format!(
        "volume export {} {}",
        vol.display(),
        out_dir.display()
    ));
    assert!(
        shown.contains("copying: 42 entries, 1.14 MiB"),
        "no final counts drawn:\n{shown}"
    );
    let plain = Command::new(BIN)
        .args(["verify"])
        .arg(&vol)
        .output()
        .unwrap();
    assert!(plain.status.success(), "{plain:?}");
    assert!(
        plain.stderr.is_empty(),
        "progress off a terminal: {}",
        String::from_utf8_lossy(&plain.stderr)
    );
}
