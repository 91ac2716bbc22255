//! Mounting: layer stacks on disk, the kernel oracle, the implementation under test, guards.
//!
//! A [`Stack`] is the set of directories of one side of a scenario (lower layers, upper,
//! work dir, mount point). A [`Mount`] is a live mount of a stack; dropping it without
//! [`Mount::unmount`] (e.g. when a scenario panics) aborts the FUSE connection and lazily
//! unmounts, so that a failing scenario never leaves a mount behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use crate::layer::Layer;
use crate::sys;

/// Options of the kernel oracle.
///
/// `redirect_dir=on` (renaming lower/merged directories works instead of EXDEV), `index=on`
/// (hard links survive copy-up), `metacopy=off` (metadata changes copy up data too, as
/// layervol's overlay mode does). `xino=on` is accepted by 6.18 but is a no-op here: all
/// layers live in one temp dir on one filesystem, where overlayfs already reports the real,
/// unique inode numbers (it logs "xino=on is useless"); it is kept so the option set matches
/// what layervol promises. `nfs_export` is left off: it is not needed for st_ino stability
/// and it forbids some configurations for no benefit here.
pub const KERNEL_OPTIONS: &str = "redirect_dir=on,index=on,xino=on,metacopy=off";

/// Options of the kernel oracle of the volume variants (`volume::...`): the same as
/// [`KERNEL_OPTIONS`]. Volume mode keeps lower hard links across copy-up too (it links every
/// name to the one upper copy, see `src/fs/links.rs`), as the kernel does with `index=on`.
pub const VOLUME_KERNEL_OPTIONS: &str = KERNEL_OPTIONS;

/// How long mounting may take before the scenario fails.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// Consecutive FUSE mounts that hung (did not return within [`MOUNT_TIMEOUT`]). Once
/// [`MAX_STUCK_MOUNTS`] is reached, further mounts fail at once instead of costing the
/// timeout each: a binary that never daemonises must not turn the suite into an hour-long
/// run.
static STUCK_MOUNTS: AtomicUsize = AtomicUsize::new(0);
const MAX_STUCK_MOUNTS: usize = 4;

/// Which filesystem is compared against the kernel oracle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// The layervol binary under test (`FS_TESTS_IMPL=layervol`, the default).
    Layervol,
    /// A second kernel overlay mount: validates the suite itself (must pass 100 %).
    Kernel,
    /// fuse-overlayfs: a known FUSE overlay, to sanity-check the FUSE plumbing.
    FuseOverlayfs,
}

impl Impl {
    pub fn from_env() -> Result<Impl, String> {
        match std::env::var("FS_TESTS_IMPL").as_deref() {
            Err(_) | Ok("") | Ok("layervol") => Ok(Impl::Layervol),
            Ok("kernel") => Ok(Impl::Kernel),
            Ok("fuse-overlayfs") => Ok(Impl::FuseOverlayfs),
            Ok(other) => Err(format!(
                "FS_TESTS_IMPL={other:?}: expected layervol, kernel or fuse-overlayfs"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Impl::Layervol => "layervol",
            Impl::Kernel => "kernel2",
            Impl::FuseOverlayfs => "fuse-overlayfs",
        }
    }
}

/// How the implementation is mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MountVia {
    /// `layervol -o lowerdir=..,upperdir=..,workdir=.. MNT`.
    #[default]
    Direct,
    /// Through the mount helper of fuse3, which runs `layervol layervol MNT -o OPTS`:
    /// `mount -t fuse.layervol layervol MNT -o OPTS` when the binary is what the default
    /// PATH finds (mount(8) drops PATH before running helpers), otherwise
    /// `mount.fuse3 layervol MNT -o rw,OPTS -t fuse.layervol` (exactly what mount(8) runs)
    /// with the binary's directory in PATH.
    Helper,
}

/// The directories of one side of a scenario.
#[derive(Debug)]
pub struct Stack {
    pub dir: PathBuf,
    /// Lower layers, top first (the order of `lowerdir=`).
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub mnt: PathBuf,
    rotations: usize,
    /// Give every new upper the attributes of the root of the layer below it (set for the
    /// kernel side of volume variants, see [`Stack::inherit_root_attrs`]).
    pub inherit_root: bool,
}

impl Stack {
    /// Creates `dir` and builds the lower layers (top first) plus empty upper/work/mnt.
    pub fn create(dir: &Path, layers: &[Layer]) -> Result<Stack, String> {
        let mk = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
            sys::chmod(p, 0o755).map_err(|e| format!("chmod {}: {e}", p.display()))
        };
        mk(dir)?;
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("canonicalize {}: {e}", dir.display()))?;
        let mut lowers = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let p = dir.join(format!("lower{}", i + 1));
            mk(&p)?;
            layer.build(&p, i + 1)?;
            lowers.push(p);
        }
        let stack = Stack {
            upper: dir.join("upper"),
            work: dir.join("work"),
            mnt: dir.join("mnt"),
            lowers,
            dir,
            rotations: 0,
            inherit_root: false,
        };
        for p in [&stack.upper, &stack.work, &stack.mnt] {
            mk(p)?;
        }
        Ok(stack)
    }

    fn options(&self) -> String {
        let lowers: Vec<String> = self
            .lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            self.upper.display(),
            self.work.display()
        )
    }

    /// Deletes the work dir and recreates it empty (a new upper needs a fresh work dir).
    /// The work dir is private scratch space of whichever filesystem ran and is never
    /// compared.
    pub fn reset_work(&self) -> Result<(), String> {
        remove_tree(&self.work)?;
        std::fs::create_dir(&self.work).map_err(|e| format!("mkdir work: {e}"))
    }

    /// Rotation (stack must be unmounted): the upper becomes the top lower layer, a new
    /// empty upper and a fresh work dir take its place.
    /// The kernel's hard-link index (`work/index`) holds entries.
    pub fn has_index(&self) -> bool {
        std::fs::read_dir(self.work.join("index")).is_ok_and(|mut d| d.next().is_some())
    }

    pub fn rotate(&mut self) -> Result<(), String> {
        self.rotations += 1;
        let frozen = self.dir.join(format!("frozen{}", self.rotations));
        std::fs::rename(&self.upper, &frozen).map_err(|e| format!("rotate upper: {e}"))?;
        self.lowers.insert(0, frozen);
        std::fs::create_dir(&self.upper).map_err(|e| format!("mkdir upper: {e}"))?;
        sys::chmod(&self.upper, 0o755).map_err(|e| format!("chmod upper: {e}"))?;
        if self.inherit_root {
            self.inherit_root_attrs()?;
        }
        self.reset_work()
    }

    /// Gives the (empty) upper's root the mode, owner, xattrs (but `trusted.overlay.*`) and
    /// times of the top lower layer's root, as a layervol volume does for each new active
    /// layer (the import and every snapshot). Kernel overlayfs shows the upper root's
    /// attributes as the merged root's; without this the kernel side of a volume variant
    /// would show the time the harness created the upper dir.
    pub fn inherit_root_attrs(&self) -> Result<(), String> {
        let from = &self.lowers[0];
        let to = &self.upper;
        let st = sys::lstat(from).map_err(|e| format!("stat {}: {e}", from.display()))?;
        sys::lchown(to, st.st_uid, st.st_gid).map_err(|e| format!("chown upper: {e}"))?;
        let names = sys::llistxattr(from).map_err(|e| format!("listxattr: {e}"))?;
        for name in names.iter().filter(|n| !n.starts_with("trusted.overlay.")) {
            let v = sys::lgetxattr(from, name).map_err(|e| format!("getxattr {name}: {e}"))?;
            sys::lsetxattr(to, name, &v, 0).map_err(|e| format!("setxattr {name}: {e}"))?;
        }
        sys::chmod(to, st.st_mode & 0o7777).map_err(|e| format!("chmod upper: {e}"))?;
        sys::lutimens(
            to,
            (st.st_atime, st.st_atime_nsec),
            (st.st_mtime, st.st_mtime_nsec),
        )
        .map_err(|e| format!("utimens upper: {e}"))
    }

    /// Layer directory names (relative to the stack dir), top first, for reports.
    pub fn layer_names(&self) -> Vec<String> {
        self.lowers
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }
}

/// Removes a directory tree, failing loudly (never follows into a mount: callers unmount
/// first).
pub fn remove_tree(p: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("rm -r {}: {e}", p.display())),
    }
}

/// A live mount.
pub struct Mount {
    imp: Option<Impl>,
    mnt: PathBuf,
    log: Option<PathBuf>,
    /// Daemon processes serving a FUSE mount (found by their command line).
    daemons: Vec<i32>,
    /// FUSE connection number (`/sys/fs/fuse/connections/N`), for aborting a hung daemon.
    fuse_conn: Option<u32>,
    mounted: bool,
    _watchdog: Option<Watchdog>,
}

/// More mount options for every layervol mount, overlay and volume
/// (`FS_TESTS_LAYERVOL_OPTIONS`, e.g. `io_uring=on`): the suite against another configuration.
pub fn layervol_extra_options() -> Option<String> {
    std::env::var("FS_TESTS_LAYERVOL_OPTIONS")
        .ok()
        .filter(|o| !o.is_empty())
}

/// Options of the second kernel mount when `FS_TESTS_IMPL=kernel`: [`KERNEL_OPTIONS`]
/// unless `FS_TESTS_KERNEL2_OPTIONS` overrides them. Mounting the "candidate" with other
/// options (e.g. `redirect_dir=off,index=off`) shows which scenarios depend on which kernel
/// feature, and proves the comparisons are not vacuous.
pub fn kernel2_options() -> String {
    std::env::var("FS_TESTS_KERNEL2_OPTIONS").unwrap_or_else(|_| KERNEL_OPTIONS.to_string())
}

/// Options of the second kernel mount of a volume variant when `FS_TESTS_IMPL=kernel`:
/// [`VOLUME_KERNEL_OPTIONS`] unless `FS_TESTS_KERNEL2_OPTIONS` overrides them.
pub fn kernel2_volume_options() -> String {
    std::env::var("FS_TESTS_KERNEL2_OPTIONS").unwrap_or_else(|_| VOLUME_KERNEL_OPTIONS.to_string())
}

/// How long a FUSE mount may live before the watchdog aborts it (`FS_TESTS_TIMEOUT`
/// seconds, default 120): a hung daemon then turns into ENOTCONN errors in the report
/// instead of a hung test run.
pub fn fuse_timeout() -> Duration {
    static T: OnceLock<Duration> = OnceLock::new();
    *T.get_or_init(|| {
        let secs = std::env::var("FS_TESTS_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120);
        Duration::from_secs(secs)
    })
}

impl Mount {
    /// Mounts `stack` with kernel overlayfs and `options` (normally [`KERNEL_OPTIONS`]).
    pub fn kernel(stack: &Stack, options: &str) -> Result<Mount, String> {
        let opts = format!("{},{options}", stack.options());
        sys::mount("overlay", &stack.mnt, "overlay", 0, &opts).map_err(|e| {
            format!(
                "mount -t overlay -o {opts} {}: {e} (see dmesg)",
                stack.mnt.display()
            )
        })?;
        Ok(Mount {
            imp: Some(Impl::Kernel),
            mnt: stack.mnt.clone(),
            log: None,
            daemons: Vec::new(),
            fuse_conn: None,
            mounted: true,
            _watchdog: None,
        })
    }

    /// A read-only kernel overlay of `layers` (top first) without upper: used to look at an
    /// upper dir "through the kernel's eyes" (redirects, opaque dirs and whiteouts applied).
    pub fn kernel_view(layers: &[PathBuf], mnt: &Path) -> Result<Mount, String> {
        std::fs::create_dir_all(mnt).map_err(|e| e.to_string())?;
        let lowers: Vec<String> = layers.iter().map(|p| p.display().to_string()).collect();
        let opts = format!("lowerdir={},redirect_dir=follow", lowers.join(":"));
        sys::mount("overlay", mnt, "overlay", libc::MS_RDONLY, &opts)
            .map_err(|e| format!("mount -t overlay -o ro,{opts}: {e}"))?;
        Ok(Mount {
            imp: None,
            mnt: mnt.to_path_buf(),
            log: None,
            daemons: Vec::new(),
            fuse_conn: None,
            mounted: true,
            _watchdog: None,
        })
    }

    /// Mounts `stack` with `imp`.
    pub fn new(imp: Impl, via: MountVia, stack: &Stack) -> Result<Mount, String> {
        match imp {
            Impl::Kernel => Mount::kernel(stack, &kernel2_options()),
            Impl::Layervol | Impl::FuseOverlayfs => Mount::fuse(imp, via, stack),
        }
    }

    fn fuse(imp: Impl, via: MountVia, stack: &Stack) -> Result<Mount, String> {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_layervol"));
        let mut opts = stack.options();
        if imp == Impl::Layervol
            && let Some(extra) = layervol_extra_options()
        {
            opts = format!("{opts},{extra}");
        }
        let cmd = match (imp, via) {
            (Impl::FuseOverlayfs, _) => {
                let mut c = Command::new("fuse-overlayfs");
                c.arg("-o").arg(&opts).arg(&stack.mnt);
                c
            }
            (_, MountVia::Direct) => {
                let mut c = Command::new(&bin);
                c.arg("-o").arg(&opts).arg(&stack.mnt);
                c
            }
            (_, MountVia::Helper) if in_default_path(&bin) => {
                let mut c = Command::new("mount");
                c.args(["-t", "fuse.layervol", "layervol"])
                    .arg(&stack.mnt)
                    .arg("-o")
                    .arg(&opts);
                c
            }
            (_, MountVia::Helper) => {
                // mount(8) runs its helper without PATH, so the binary would only be found in
                // the shell's default PATH. Run the helper as mount(8) does, with a PATH that
                // holds the binary's directory.
                let bin_dir = bin.parent().expect("binary has a parent dir");
                let path = format!(
                    "{}:{}",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                );
                let mut c = Command::new("mount.fuse3");
                c.arg("layervol")
                    .arg(&stack.mnt)
                    .arg("-o")
                    .arg(format!("rw,{opts}"))
                    .args(["-t", "fuse.layervol"])
                    .env("PATH", path);
                c
            }
        };
        let log = stack.dir.join(format!(
            "{}.log",
            stack.mnt.file_name().unwrap().to_string_lossy()
        ));
        Mount::spawn(imp, cmd, &stack.mnt, log)
    }

    /// Runs `cmd`, which must mount a FUSE filesystem at `mnt` and return once the mount
    /// is ready (daemonising); its output goes to `log`.
    pub fn spawn(imp: Impl, mut cmd: Command, mnt: &Path, log: PathBuf) -> Result<Mount, String> {
        let stuck = STUCK_MOUNTS.load(Ordering::Relaxed);
        if stuck >= MAX_STUCK_MOUNTS {
            return Err(format!(
                "not attempted: the previous {stuck} mounts of {} all hung (see the first failures)",
                imp.name()
            ));
        }
        // Output goes to a file, not a pipe: a daemon that keeps the inherited descriptors
        // open would otherwise make reading its output block forever.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let what = format!("{cmd:?}");
        let mut child = cmd.spawn().map_err(|e| format!("spawn {what}: {e}"))?;
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            if Instant::now() > deadline {
                STUCK_MOUNTS.fetch_add(1, Ordering::Relaxed);
                let _ = child.kill();
                let _ = child.wait();
                let _ = sys::umount2(mnt, libc::MNT_DETACH);
                return Err(format!(
                    "{what} did not return within {MOUNT_TIMEOUT:?} (it must daemonise once the mount is ready)\n{}",
                    log_tail(&log)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mounted = is_mounted(mnt);
        if !status.success() || !mounted {
            if mounted {
                let _ = sys::umount2(mnt, libc::MNT_DETACH);
            }
            return Err(format!(
                "{what} exited with {status}, mounted: {mounted}\n{}",
                log_tail(&log)
            ));
        }
        STUCK_MOUNTS.store(0, Ordering::Relaxed);
        let fuse_conn = sys::stat(mnt).ok().map(|st| sys::minor(st.st_dev));
        Ok(Mount {
            imp: Some(imp),
            daemons: find_daemons(mnt),
            mnt: mnt.to_path_buf(),
            log: Some(log),
            fuse_conn,
            mounted: true,
            _watchdog: Some(watchdog(fuse_conn, fuse_timeout())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Whether every daemon process found at mount time is still alive.
    pub fn daemon_alive(&self) -> bool {
        self.daemons.iter().all(|pid| process_alive(*pid))
    }

    /// The tail of the daemon's log (FUSE implementations only).
    pub fn log_tail(&self) -> String {
        self.log.as_deref().map(log_tail).unwrap_or_default()
    }

    /// Unmounts (retrying briefly on EBUSY) and, for FUSE, waits for the daemon to exit so
    /// that everything it wrote to the upper dir is on disk before the upper is inspected.
    pub fn unmount(mut self) -> Result<(), String> {
        if !self.daemon_alive() {
            return Err(format!(
                "{} daemon died while mounted\n{}",
                self.imp.map_or("?", Impl::name),
                self.log_tail()
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match sys::umount2(&self.mnt, 0) {
                Ok(()) => break,
                Err(sys::Errno::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(format!("umount {}: {e}", self.mnt.display())),
            }
        }
        self.mounted = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.daemons.iter().any(|pid| !process_gone(*pid)) {
            if Instant::now() > deadline {
                return Err(format!(
                    "daemon {:?} still running 10 s after umount\n{}",
                    self.daemons,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Aborts the FUSE connection: every pending and future request fails with ENOTCONN.
    pub fn abort(&self) {
        if let Some(conn) = self.fuse_conn {
            let _ = std::fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
        }
    }
}

/// Starts a thread that aborts FUSE connection `conn` unless the returned guard is dropped
/// within `timeout`.
fn watchdog(conn: Option<u32>, timeout: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout)
            && let Some(conn) = conn
        {
            eprintln!("fs-tests: watchdog: aborting FUSE connection {conn} after {timeout:?}");
            let _ = std::fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
        }
    });
    Watchdog { _tx: tx }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            self.abort();
            if sys::umount2(&self.mnt, 0).is_err() {
                let _ = sys::umount2(&self.mnt, libc::MNT_DETACH);
            }
        }
    }
}

/// Dropping the guard disarms the watchdog.
pub struct Watchdog {
    _tx: mpsc::Sender<()>,
}

/// Whether `layervol` in the default PATH of `sh` (which mount helpers get) is `bin`.
fn in_default_path(bin: &Path) -> bool {
    let Ok(bin) = bin.canonicalize() else {
        return false;
    };
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .find_map(|d| Path::new(d).join("layervol").canonicalize().ok())
    .is_some_and(|found| found == bin)
}

fn is_mounted(mnt: &Path) -> bool {
    let target = mnt.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m) == target))
        })
        .unwrap_or(false)
}

/// Undoes the octal escaping of mountinfo (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Processes (other than us) having `mnt` as one of their arguments: the FUSE daemon.
fn find_daemons(mnt: &Path) -> Vec<i32> {
    let target = mnt.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for ent in rd.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(ent.path().join("cmdline"))
            && cmdline.split(|b| *b == 0).any(|arg| arg == target)
            && process_alive(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Whether a process has released everything it held (files, locks): it no longer exists,
/// or it is a zombie without other threads. A multithreaded daemon's main thread turns
/// zombie while its other threads still run their exit, and the process keeps its open
/// files (e.g. a volume's lock) until the last thread is gone.
fn process_gone(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    let only_leader = tasks
        .flatten()
        .all(|t| t.file_name().to_str() == Some(pid.to_string().as_str()));
    only_leader && !process_alive(pid)
}

/// Alive = exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

fn log_tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(20);
    if lines.is_empty() {
        format!("(log {} is empty)", log.display())
    } else {
        format!(
            "last lines of {}:\n  {}",
            log.display(),
            lines[start..].join("\n  ")
        )
    }
}
