//! Helpers shared by the integration tests (each test crate uses a part of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of `size` (e.g. "1m") mounted on `dir` (which must exist): a small filesystem to
/// fill up. Unmounted (lazily, with any mount below it) when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.0)
            .status();
    }
}

/// A volume `vol` in a temporary directory, with `src/` (what it was created from) and `m/`
/// (its mountpoint), and the layervol CLI run there (`LAYERVOL_RUN_DIR` inside it). Unmounts
/// `m` (and `k`, a kernel mount some tests make) when dropped.
pub struct VolDir {
    _t: Option<tempfile::TempDir>,
    pub root: PathBuf,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_layervol");

impl VolDir {
    /// Creates the volume from a `src/` that `fill` writes.
    pub fn new(fill: impl FnOnce(&Path)) -> VolDir {
        assert!(
            nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists(),
            "these tests mount FUSE filesystems: run them as root on a machine with /dev/fuse"
        );
        let t = tempfile::tempdir().unwrap();
        let mut v = VolDir::at(t.path().to_path_buf());
        v._t = Some(t);
        fill(&v.p("src"));
        v.ok(&["volume", "create", "vol", "--from", "src"]);
        v
    }

    /// The same layout in `root` (kept when dropped), without a volume yet.
    pub fn at(root: PathBuf) -> VolDir {
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::create_dir_all(root.join("m")).unwrap();
        VolDir { _t: None, root }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .current_dir(&self.root)
            .env("LAYERVOL_RUN_DIR", self.root.join("run"))
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "layervol {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    pub fn mount(&self) {
        self.ok(&["mount", "vol", "m"]);
    }

    pub fn umount(&self) {
        assert!(
            Command::new("umount")
                .arg(self.p("m"))
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for VolDir {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        for m in [self.p("m"), self.p("k")] {
            if mounts.lines().any(|l| l.split(' ').nth(1) == m.to_str()) {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}
