//! Crash consistency: the daemon is killed with SIGKILL at random points of a workload that
//! writes, fsyncs and snapshots (and squashes online, with a low layer bound). After a remount every write acknowledged by fsync is there,
//! `verify` is clean, and no half-made snapshot is visible. Needs root and /dev/fuse.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_layervol");
const RECORD: usize = 512;

fn run(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .current_dir(root)
        .env("LAYERVOL_RUN_DIR", root.join("run"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = run(root, args);
    assert!(
        out.status.success(),
        "layervol {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The daemon serving `mnt`, found by its command line.
fn daemon_pid(vol: &Path, mnt: &Path) -> i32 {
    let want = format!("mount\0{}\0{}\0", vol.display(), mnt.display());
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(&want)
        {
            return pid;
        }
    }
    panic!("no daemon for {}", mnt.display());
}

fn record(round: u64, i: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    r[..16].copy_from_slice(&[round.to_le_bytes(), i.to_le_bytes()].concat());
    for (k, b) in r[16..].iter_mut().enumerate() {
        *b = (round * 31 + i * 7 + k as u64) as u8;
    }
    r
}

#[test]
fn sigkill_at_random_points_loses_no_fsynced_write() {
    assert!(
        nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists(),
        "this test mounts FUSE filesystems: run it as root on a machine with /dev/fuse"
    );
    let t = tempfile::tempdir().unwrap();
    let root = t.path().to_path_buf();
    let (vol, mnt): (PathBuf, PathBuf) = (root.join("vol"), root.join("m"));
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    // a lower file the workload rewrites in place: block-level copy-up under fire
    std::fs::write(root.join("src/base"), vec![0u8; 1 << 20]).unwrap();
    ok(
        &root,
        &["volume", "create", vol.to_str().unwrap(), "--from", "src"],
    );
    let (vs, ms) = (vol.to_str().unwrap(), mnt.to_str().unwrap());

    let mut durable: Vec<u64> = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..20u64 {
        // A low layer bound: the mount squashes online all the time, so kills land in
        // squashes too.
        ok(&root, &["mount", vs, ms, "-o", "max_layers=3"]);
        let pid = daemon_pid(&vol, &mnt);
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (acked, stop, path, base) = (
                acked.clone(),
                stop.clone(),
                mnt.join(format!("log{round}")),
                mnt.join("base"),
            );
            std::thread::spawn(move || {
                let Ok(f) = std::fs::File::create(&path) else {
                    return;
                };
                let b = std::fs::OpenOptions::new().write(true).open(&base);
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if f.write_all_at(&record(round, i), i * RECORD as u64)
                        .is_err()
                    {
                        return;
                    }
                    if let Ok(b) = &b {
                        let _ = b.write_all_at(&record(round, i), (i * 4096) % (1 << 20));
                    }
                    if i % 8 == 7 {
                        if f.sync_all().is_err() {
                            return;
                        }
                        acked.store(i + 1, Ordering::Release);
                    }
                }
            })
        };
        let snapper = {
            let (stop, root, ms) = (stop.clone(), root.clone(), ms.to_string());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = run(&root, &["snapshot", &ms]);
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(20 + seed % 80));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
        stop.store(true, Ordering::Relaxed);
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        writer.join().unwrap();
        snapper.join().unwrap();
        durable.push(acked.load(Ordering::Acquire));
        // wait until the killed daemon is gone (it holds the volume lock)
        while Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    ok(&root, &["mount", vs, ms, "-o", "max_layers=3"]);
    for (round, n) in durable.iter().enumerate() {
        let data = std::fs::read(mnt.join(format!("log{round}"))).unwrap_or_default();
        for i in 0..*n {
            let at = (i as usize) * RECORD;
            assert_eq!(
                data.get(at..at + RECORD),
                Some(&record(round as u64, i)[..]),
                "round {round}: fsynced record {i} of {n} lost"
            );
        }
    }
    assert!(
        durable.iter().filter(|n| **n > 0).count() >= 10,
        "the workload barely ran: {durable:?}"
    );
    // A kill often lands before a squash commits, so the stack left by the rounds depends on
    // timing; one snapshot on a mount that runs on must bring it under the bound by itself.
    ok(&root, &["snapshot", ms]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let st: serde_json::Value =
            serde_json::from_str(&ok(&root, &["status", ms, "--json"])).unwrap();
        if st["squash_running"] == false {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the squash did not end: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("umount").arg(&mnt).status();
    let out = ok(&root, &["verify", vs, "--json"]);
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["sound"], true, "{out}");
    // Hundreds of snapshots were taken: the online squashes keep the stack small.
    let layers = rep["layers_checked"].as_u64().unwrap();
    eprintln!("{layers} layers after the crash rounds");
    assert!(
        layers <= 6,
        "{layers} layers: the online squashes did not keep up"
    );
    // Orphan block maps (a partial file deleted or superseded before a crash) are the only
    // findings allowed: garbage, not damage.
    for p in rep["problems"].as_array().unwrap() {
        assert_eq!(p["warning"], true, "damage after crashes: {p}");
    }
}
