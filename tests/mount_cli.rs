//! The mount command as users run it: option handling, errors before mounting, read-only
//! mounts, id mapping, daemon lifetime. Real FUSE mounts: needs root and /dev/fuse, and fails
//! (never skips) without them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_layervol");

struct Stack {
    _t: tempfile::TempDir,
    root: PathBuf,
}

impl Stack {
    fn new() -> Stack {
        assert!(
            nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists(),
            "these tests mount FUSE filesystems: run them as root on a machine with /dev/fuse"
        );
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        for d in ["l1", "l2", "u", "w", "m"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        std::fs::write(root.join("l1/a"), b"top").unwrap();
        std::fs::write(root.join("l2/a"), b"bottom").unwrap();
        std::fs::write(root.join("l2/b"), b"b").unwrap();
        Stack { _t: t, root }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn mount(&self, opts: &str) -> std::process::Output {
        Command::new(BIN)
            .current_dir(&self.root)
            .args(["-o", opts, "m"])
            .output()
            .unwrap()
    }

    fn mount_ok(&self, opts: &str) {
        let out = self.mount(opts);
        assert!(
            out.status.success(),
            "mount -o {opts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `layervol -f -o OPTS m` logging every request it serves to the returned file, once
    /// the mount is listed.
    fn mount_logging_requests(&self, opts: &str) -> (std::process::Child, PathBuf) {
        let log = self.p("daemon.log");
        let child = Command::new(BIN)
            .current_dir(&self.root)
            .env("LAYERVOL_LOG", "fuser::request=debug")
            .args(["-f", "-o", opts, "m"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.wait_mounted();
        (child, log)
    }

    /// `layervol -f -o OPTS m`, once the mount is listed.
    fn mount_foreground(&self, opts: &str) -> std::process::Child {
        let child = Command::new(BIN)
            .current_dir(&self.root)
            .args(["-f", "-o", opts, "m"])
            .spawn()
            .unwrap();
        self.wait_mounted();
        child
    }

    /// Waits until the mount is listed (a foreground daemon mounts after it starts).
    fn wait_mounted(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.mounted() {
            assert!(std::time::Instant::now() < deadline, "no mount after 10 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn mounted(&self) -> bool {
        let mnt = self.p("m");
        std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(mnt.to_str().unwrap()))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.mounted() {
            let _ = Command::new("umount").arg(self.p("m")).status();
        }
    }
}

fn umount(s: &Stack) {
    let st = Command::new("umount").arg(s.p("m")).status().unwrap();
    assert!(st.success());
    assert!(!s.mounted());
}

#[test]
fn relative_layers_and_precedence() {
    let s = Stack::new();
    let out = s.mount("lowerdir=l1:l2,upperdir=u,workdir=w");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.mounted(), "the command returns once the mount is ready");
    assert_eq!(std::fs::read(s.p("m/a")).unwrap(), b"top");
    assert_eq!(std::fs::read(s.p("m/b")).unwrap(), b"b");
    std::fs::write(s.p("m/new"), b"n").unwrap();
    assert_eq!(std::fs::read(s.p("u/new")).unwrap(), b"n");
    umount(&s);
}

#[test]
fn bad_input_is_refused_before_mounting() {
    let s = Stack::new();
    std::fs::create_dir(s.p("l1/inner")).unwrap();
    let cases = [
        ("lowerdir=l1,bogus_option", "unknown mount option"),
        ("lowerdir=missing", "lowerdir"),
        ("upperdir=u,workdir=w", "no lowerdir"),
        ("lowerdir=l1,upperdir=u", "workdir"),
        ("lowerdir=l1,upperdir=l1/inner,workdir=w", "overlap"),
        ("lowerdir=l1,upperdir=u,workdir=/dev/shm", "same filesystem"),
        ("lowerdir=l1,uidmapping=0:1000", "uidmapping"),
        ("lowerdir=l1,xino=bogus", "expected off, auto or on"),
    ];
    for (opts, want) in cases {
        let out = s.mount(opts);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{opts}: accepted");
        assert!(
            err.contains(want),
            "{opts}: error `{err}` does not mention `{want}`"
        );
        assert!(!s.mounted(), "{opts}: mounted anyway");
    }
}

#[test]
fn no_upper_is_read_only() {
    let s = Stack::new();
    let out = s.mount("lowerdir=l1:l2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(s.p("m/a")).unwrap(), b"top");
    let e = std::fs::write(s.p("m/x"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    umount(&s);
}

#[test]
fn uid_and_gid_mapping() {
    let s = Stack::new();
    nix::unistd::chown(&s.p("l2/b"), Some(1000.into()), Some(1000.into())).unwrap();
    let out =
        s.mount("lowerdir=l1:l2,upperdir=u,workdir=w,uidmapping=0:1000:10,gidmapping=0:1000:10");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::metadata(s.p("m/b")).unwrap();
    assert_eq!((md.uid(), md.gid()), (0, 0), "layer 1000 is shown as 0");
    // a file owned by 0 in the layer is outside the mapping: overflow id
    assert_eq!(std::fs::metadata(s.p("m/a")).unwrap().uid(), 65534);
    nix::unistd::chown(&s.p("m/b"), Some(3.into()), Some(4.into())).unwrap();
    let up = std::fs::metadata(s.p("u/b")).unwrap();
    assert_eq!(
        (up.uid(), up.gid()),
        (1003, 1004),
        "view 3:4 is stored as 1003:1004"
    );
    umount(&s);
}

#[test]
fn squash_to_uid() {
    let s = Stack::new();
    let out = s.mount("lowerdir=l1:l2,upperdir=u,workdir=w,squash_to_uid=7,squash_to_gid=8");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::metadata(s.p("m/a")).unwrap();
    assert_eq!((md.uid(), md.gid()), (7, 8));
    umount(&s);
}

#[test]
fn foreground_daemon_ends_on_fusermount_u() {
    let s = Stack::new();
    let mut child = s.mount_foreground("lowerdir=l1,upperdir=u,workdir=w");
    // The mount is listed before the FUSE handshake ends; the first request waits for it.
    // (Unmounted during the handshake, the daemon rightly reports that the mount failed.)
    std::fs::read_dir(s.p("m")).unwrap();
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(s.p("m"))
        .status()
        .unwrap();
    assert!(st.success());
    let code = child.wait().unwrap();
    assert!(code.success(), "daemon exit: {code:?}");
}

#[test]
fn full_upper_fails_cleanly_and_loses_nothing() {
    let s = Stack::new();
    // upper and work on a tiny tmpfs: copy-up of a 2 MiB lower file cannot fit
    let small = s.p("small");
    std::fs::create_dir(&small).unwrap();
    let _tmpfs = common::Tmpfs::mount(&small, "1m");
    std::fs::create_dir(small.join("u")).unwrap();
    std::fs::create_dir(small.join("w")).unwrap();
    let big: Vec<u8> = (0..2 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(s.p("l1/big"), &big).unwrap();
    let out = s.mount("lowerdir=l1,upperdir=small/u,workdir=small/w");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let e = std::fs::OpenOptions::new()
        .append(true)
        .open(s.p("m/big"))
        .unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "copy-up on a full disk: {e}"
    );
    assert_eq!(
        std::fs::read(s.p("m/big")).unwrap(),
        big,
        "the file is intact"
    );
    // new data that does not fit: ENOSPC from write or close, never a silent loss
    let r = std::fs::write(s.p("m/new"), &big);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    umount(&s);
    let left: Vec<_> = std::fs::read_dir(small.join("w/work")).unwrap().collect();
    assert!(
        left.is_empty(),
        "copy-up leftovers in the work dir: {left:?}"
    );
    assert!(
        !small.join("u/big").exists(),
        "no partial copy-up in the upper"
    );
}

/// An upper written by kernel overlayfs: directories renamed within their parent carry
/// relative redirects, and the parent itself was renamed. layervol must show the same view.
#[test]
fn kernel_written_relative_redirects() {
    let s = Stack::new();
    std::fs::create_dir_all(s.p("l2/p/x")).unwrap();
    std::fs::write(s.p("l2/p/x/file"), b"deep").unwrap();
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={}:{},upperdir={},workdir={},redirect_dir=on",
            s.p("l1").display(),
            s.p("l2").display(),
            s.p("u").display(),
            s.p("w").display()
        ))
        .arg(s.p("m"))
        .status()
        .unwrap();
    assert!(st.success(), "kernel overlay mount");
    std::fs::rename(s.p("m/p"), s.p("m/q")).unwrap();
    std::fs::rename(s.p("m/q/x"), s.p("m/q/y")).unwrap();
    umount(&s);
    // the kernel wrote a relative redirect on q/y
    let out = Command::new("getfattr")
        .args(["-n", "trusted.overlay.redirect", "--only-values"])
        .arg(s.p("u/q/y"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"x", "kernel redirect format changed?");
    std::fs::remove_dir_all(s.p("w")).unwrap();
    std::fs::create_dir(s.p("w")).unwrap();
    let out = s.mount("lowerdir=l1:l2,upperdir=u,workdir=w");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(s.p("m/q/y/file")).unwrap(), b"deep");
    assert!(!s.p("m/p").exists());
    umount(&s);
}

/// The pids of running layervol daemons whose command line contains `needle`.
fn daemons_with(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("layervol") && cmd.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Unmounting and mounting again at once, as tools that rotate layers do: the new mount must
/// survive the old daemon's exit. (The old daemon, slow to exit, used to unmount the
/// mountpoint once more on its way out, taking the new mount with it.) The old daemon is
/// stopped across the umount and the new mount to make it slow.
#[test]
fn remount_while_the_old_daemon_exits_stays_mounted() {
    let s = Stack::new();
    let tag = format!("fsname=remount-race-{}", std::process::id());
    let opts = format!("lowerdir=l1:l2,upperdir=u,workdir=w,{tag}");
    s.mount_ok(&opts);
    let old = daemons_with(&tag);
    assert_eq!(old.len(), 1, "one daemon: {old:?}");
    let old = nix::unistd::Pid::from_raw(old[0]);
    nix::sys::signal::kill(old, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // umount(8) would stat the mountpoint first and wait for the stopped daemon.
    nix::mount::umount2(&s.p("m"), nix::mount::MntFlags::empty()).unwrap();
    let out = s.mount(&opts);
    nix::sys::signal::kill(old, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while daemons_with(&tag).contains(&old.as_raw()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the old daemon did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(s.mounted(), "the old daemon's exit unmounted the new mount");
    assert_eq!(std::fs::read(s.p("m/a")).unwrap(), b"top");
    umount(&s);
}

/// Like kernel overlayfs, a finished mount does not keep its layers busy: the filesystem a
/// layer lives on can be unmounted right after the overlay was, even while the daemon is
/// still on its way out (stopped here across both unmounts to make that certain).
#[test]
fn layers_are_not_busy_after_umount() {
    let s = Stack::new();
    let fsdir = s.p("fs");
    std::fs::create_dir(&fsdir).unwrap();
    let tmpfs = common::Tmpfs::mount(&fsdir, "16m");
    for d in ["l", "u", "w"] {
        std::fs::create_dir(fsdir.join(d)).unwrap();
    }
    std::fs::write(fsdir.join("l/f"), b"x").unwrap();
    let tag = format!("fsname=busy-layers-{}", std::process::id());
    s.mount_ok(&format!("lowerdir=fs/l,upperdir=fs/u,workdir=fs/w,{tag}"));
    std::fs::write(s.p("m/g"), b"y").unwrap();
    assert_eq!(std::fs::read(s.p("m/f")).unwrap(), b"x");
    let daemon = daemons_with(&tag);
    assert_eq!(daemon.len(), 1, "one daemon: {daemon:?}");
    let daemon = nix::unistd::Pid::from_raw(daemon[0]);
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGSTOP).unwrap();
    nix::mount::umount2(&s.p("m"), nix::mount::MntFlags::empty()).unwrap();
    let layers = nix::mount::umount2(&fsdir, nix::mount::MntFlags::empty());
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(layers, Ok(()), "umount of the layers' filesystem");
    std::mem::forget(tmpfs);
}

/// SIGTERM (and SIGINT, SIGHUP) unmount the filesystem and end the daemon cleanly, as with
/// libfuse filesystems: no dead mount is left behind.
#[test]
fn sigterm_unmounts_and_ends_the_daemon() {
    let s = Stack::new();
    let mut child = s.mount_foreground("lowerdir=l1,upperdir=u,workdir=w");
    assert_eq!(std::fs::read(s.p("m/a")).unwrap(), b"top");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let code = child.wait().unwrap();
    assert!(code.success(), "daemon exit: {code:?}");
    assert!(!s.mounted(), "still mounted after SIGTERM");
}

/// `chown(f, -1, -1)` changes nothing but the ctime, as on kernel overlayfs (which copies
/// up and chowns the upper): on a lower file and on an upper one.
#[test]
fn chown_to_the_same_ids_moves_ctime() {
    use std::os::unix::fs::MetadataExt;
    let s = Stack::new();
    s.mount_ok("lowerdir=l1,upperdir=u,workdir=w");
    std::fs::write(s.p("m/new"), b"n").unwrap();
    for name in ["m/a", "m/new"] {
        let p = s.p(name);
        let before = std::fs::symlink_metadata(&p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::os::unix::fs::lchown(&p, None, None).unwrap();
        let after = std::fs::symlink_metadata(&p).unwrap();
        assert!(
            (after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec()),
            "{name}: ctime did not move"
        );
        assert_eq!(after.ino(), before.ino(), "{name}");
    }
    umount(&s);
}

/// `openat(dir, name, flags, 0o644)`, panicking with the errno.
fn open_at(dir: &std::os::fd::OwnedFd, name: &std::ffi::CStr, flags: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            0o644,
        )
    };
    assert!(
        fd >= 0,
        "openat {name:?}: {}",
        std::io::Error::last_os_error()
    );
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Directories deeper than PATH_MAX below the mount, reached through directory fds as a
/// shell with a deep working directory reaches them (pjdfstest mkdir/03, rmdir/03): read,
/// copy-up of the whole chain, mkdir and rmdir there.
#[test]
fn directories_deeper_than_path_max() {
    use std::ffi::CString;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, OwnedFd};
    let s = Stack::new();
    let names: Vec<CString> = (0..24)
        .map(|i| CString::new(format!("{i:02}{}", "d".repeat(240))).unwrap())
        .collect();
    let dir_flags = libc::O_RDONLY | libc::O_DIRECTORY;
    let walk = |top: &str| {
        let mut d = OwnedFd::from(std::fs::File::open(s.p(top)).unwrap());
        for n in &names {
            d = open_at(&d, n, dir_flags);
        }
        d
    };
    let read_leaf = |d: &OwnedFd| {
        let mut text = String::new();
        std::fs::File::from(open_at(d, c"leaf", libc::O_RDONLY))
            .read_to_string(&mut text)
            .unwrap();
        text
    };
    let mut d = OwnedFd::from(std::fs::File::open(s.p("l1")).unwrap());
    for n in &names {
        assert_eq!(
            unsafe { libc::mkdirat(d.as_raw_fd(), n.as_ptr(), 0o755) },
            0
        );
        d = open_at(&d, n, dir_flags);
    }
    std::fs::File::from(open_at(&d, c"leaf", libc::O_WRONLY | libc::O_CREAT))
        .write_all(b"deep")
        .unwrap();
    assert!(names.iter().map(|n| n.count_bytes() + 1).sum::<usize>() > libc::PATH_MAX as usize);

    s.mount_ok("lowerdir=l1:l2,upperdir=u,workdir=w");
    let d = walk("m");
    assert_eq!(read_leaf(&d), "deep");
    std::fs::File::from(open_at(&d, c"leaf", libc::O_WRONLY | libc::O_APPEND))
        .write_all(b"+more")
        .unwrap();
    assert_eq!(read_leaf(&d), "deep+more");
    assert_eq!(
        unsafe { libc::mkdirat(d.as_raw_fd(), c"new".as_ptr(), 0o755) },
        0
    );
    open_at(&d, c"new", dir_flags);
    let rc = unsafe { libc::unlinkat(d.as_raw_fd(), c"new".as_ptr(), libc::AT_REMOVEDIR) };
    assert_eq!(rc, 0, "rmdir: {}", std::io::Error::last_os_error());
    let fd = unsafe { libc::openat(d.as_raw_fd(), c"new".as_ptr(), dir_flags) };
    assert_eq!(fd, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOENT)
    );
    drop(d);
    umount(&s);
    assert_eq!(read_leaf(&walk("u")), "deep+more");
    assert_eq!(read_leaf(&walk("l1")), "deep");
}

/// Voluntary context switches of a daemon's threads, by thread name: a thread that serves
/// requests sleeps between them.
fn thread_sleeps(pid: i32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        out.push((comm.trim().to_string(), n));
    }
    out
}

/// With the kernel's FUSE-over-io_uring on (tools/setup.sh turns it on), requests are served
/// by the per-CPU ring threads, two per possible CPU, and not by the /dev/fuse workers;
/// `io_uring=off`, or a kernel without it, leaves everything to the /dev/fuse workers.
#[test]
fn requests_go_over_io_uring_when_the_kernel_offers_it() {
    let offered = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y");
    let cpus = {
        let p = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
        let last = p.trim().rsplit(['-', ',']).next().unwrap();
        last.parse::<usize>().unwrap() + 1
    };
    for (opt, rings) in [("io_uring=on", offered), ("io_uring=off", false)] {
        let s = Stack::new();
        let tag = format!("fsname=uring-{}-{opt}", std::process::id());
        s.mount_ok(&format!("lowerdir=l1:l2,upperdir=u,workdir=w,{opt},{tag}"));
        let pid = daemons_with(&tag);
        assert_eq!(pid.len(), 1, "one daemon: {pid:?}");
        let before = thread_sleeps(pid[0]);
        for i in 0..200 {
            let f = s.p(&format!("m/f{i}"));
            std::fs::write(&f, format!("{i}")).unwrap();
            assert_eq!(std::fs::read_to_string(&f).unwrap(), format!("{i}"));
        }
        assert_eq!(std::fs::read(s.p("m/a")).unwrap(), b"top");
        let after = thread_sleeps(pid[0]);
        let served = |prefix: &str| -> (usize, u64) {
            let mine = |v: &[(String, u64)]| -> (usize, u64) {
                let t: Vec<u64> = v
                    .iter()
                    .filter(|(c, _)| c.starts_with(prefix))
                    .map(|(_, n)| *n)
                    .collect();
                (t.len(), t.iter().sum())
            };
            let (n, a) = mine(&after);
            (n, a - mine(&before).1)
        };
        let (ring_threads, ring_sleeps) = served("fuser-ring-");
        let (_, dev_sleeps) = served("fuser-");
        let dev_sleeps = dev_sleeps - ring_sleeps;
        // 200 files written and read back: over 1000 requests.
        if rings {
            assert_eq!(ring_threads, 2 * cpus, "{opt}: ring threads {after:?}");
            assert!(
                ring_sleeps >= 600,
                "{opt}: ring threads slept {ring_sleeps} times"
            );
            assert!(
                dev_sleeps < 100,
                "{opt}: /dev/fuse workers slept {dev_sleeps} times"
            );
        } else {
            assert_eq!(ring_threads, 0, "{opt}: ring threads {after:?}");
            assert!(
                dev_sleeps >= 600,
                "{opt}: /dev/fuse workers slept {dev_sleeps} times"
            );
        }
        umount(&s);
    }
}

/// The read-ahead of a block device (or of a partition's disk), from sysfs.
fn device_read_ahead_kb(dev: u64) -> Option<u64> {
    let (ma, mi) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    [
        format!("/sys/class/bdi/{ma}:{mi}/read_ahead_kb"),
        format!("/sys/dev/block/{ma}:{mi}/../queue/read_ahead_kb"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
}

/// The mount reads ahead as far as its layers' device does (kernel overlayfs reads lower files
/// with the lower device's read-ahead; a FUSE mount starts at 128 KiB).
#[test]
fn the_mount_reads_ahead_like_its_layers() {
    let s = Stack::new();
    s.mount_ok("lowerdir=l1:l2,upperdir=u,workdir=w");
    let mnt = std::fs::metadata(s.p("m")).unwrap().dev();
    let ours = device_read_ahead_kb(mnt).expect("a FUSE mount has a bdi");
    match device_read_ahead_kb(std::fs::metadata(s.p("l1")).unwrap().dev()) {
        Some(layers) => assert_eq!(ours, layers, "read_ahead_kb of the mount and of the layers"),
        // Layers on a filesystem without a block device (tmpfs): the kernel's default.
        None => assert_eq!(ours, 128),
    }
    umount(&s);
}

/// The daemon clears set-ID bits itself (FUSE_HANDLE_KILLPRIV_V2), so the kernel does not ask
/// it for security.capability before every write (it did: one GETXATTR per write() call,
/// doubling the requests of small writes). What set-ID bits a write, truncate or chown leaves
/// is checked against kernel overlayfs by fs-tests' `setid` scenarios.
#[test]
fn writes_do_not_ask_for_security_capability_each_time() {
    let s = Stack::new();
    let (mut child, log) = s.mount_logging_requests("lowerdir=l1:l2,upperdir=u,workdir=w");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.p("m/a"))
            .unwrap();
        for i in 0..100u64 {
            f.write_at(b"x", i).unwrap();
        }
    }
    umount(&s);
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert!(
        count(" WRITE ") >= 100,
        "the log shows every request:\n{log}"
    );
    let asked = count("GETXATTR name \"security.capability\"");
    assert!(
        asked <= 2,
        "{asked} GETXATTR of security.capability for 100 writes"
    );
}

/// `cat PATH` as uid 1000 (no supplementary groups): whether it could read the file.
fn readable_by_user_1000(path: &Path) -> bool {
    Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "cat"])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("setpriv (util-linux)")
        .success()
}

/// The xattr form of a POSIX ACL: `(tag, perm, id)` entries in canonical order.
fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    acl
}

/// `path`'s directory, open, and its name in it (for the `*at` calls of `layervol::sys`).
fn dir_and_name(path: &Path) -> (std::fs::File, std::ffi::CString) {
    let dir = std::fs::File::open(path.parent().unwrap()).unwrap();
    let name = path.file_name().unwrap().as_encoded_bytes();
    (dir, std::ffi::CString::new(name).unwrap())
}

fn set_acl(path: &Path, acl: &[u8]) {
    use std::os::fd::AsFd;
    let (dir, name) = dir_and_name(path);
    layervol::sys::setxattr(dir.as_fd(), &name, c"system.posix_acl_access", acl, 0)
        .unwrap_or_else(|e| panic!("setxattr {}: {e:?}", path.display()));
}

fn get_acl(path: &Path) -> Vec<u8> {
    use std::os::fd::AsFd;
    let (dir, name) = dir_and_name(path);
    layervol::sys::getxattr(dir.as_fd(), &name, c"system.posix_acl_access")
        .unwrap_or_else(|e| panic!("getxattr {}: {e:?}", path.display()))
        .unwrap_or_else(|| panic!("{} has no ACL", path.display()))
}

/// A stack that uid 1000 can reach, with `l1/secret`: root's, mode 0600.
fn stack_with_a_secret() -> (Stack, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let s = Stack::new();
    std::fs::set_permissions(&s.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = s.p("l1/secret");
    std::fs::write(&secret, b"s").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    (s, secret)
}

/// With `uidmapping=`/`gidmapping=`, the ids named in ACLs are shown and stored mapped like
/// owners, so the kernel's permission checks (in mount ids) find the right user.
#[test]
fn acl_ids_are_mapped_like_owners() {
    let (s, secret) = stack_with_a_secret();
    let with = |u: u32, g: u32| {
        acl_bytes(&[
            (1, 6, u32::MAX),
            (2, 4, u),
            (4, 0, u32::MAX),
            (8, 4, g),
            (16, 4, u32::MAX),
            (32, 0, u32::MAX),
        ])
    };
    // Layer ids 101000 / 102000 are mount ids 1000 / 2000.
    set_acl(&secret, &with(101_000, 102_000));
    s.mount_ok(
        "lowerdir=l1:l2,upperdir=u,workdir=w,uidmapping=0:100000:65536,gidmapping=0:100000:65536",
    );
    assert_eq!(get_acl(&s.p("m/secret")), with(1000, 2000));
    assert!(
        readable_by_user_1000(&s.p("m/secret")),
        "the ACL names mount uid 1000"
    );
    set_acl(&s.p("m/secret"), &with(1001, 2001));
    assert_eq!(
        get_acl(&s.p("u/secret")),
        with(101_001, 102_001),
        "stored in layer ids"
    );
    assert!(!readable_by_user_1000(&s.p("m/secret")));
    umount(&s);
}

/// POSIX ACLs take part in permission checks, as under kernel overlayfs; `noacl` (as in
/// fuse-overlayfs) leaves them to mode bits and keeps ACLs as plain xattrs, and then the
/// kernel does not ask for the mount root's ACL on every path walk of a caller who does not
/// own it (which it does with ACLs on: the root inode cannot cache them).
#[test]
fn acls_grant_access_unless_noacl() {
    let (s, secret) = stack_with_a_secret();
    // u::rw, u:1000:r, g::-, m::r, o::-
    let acl = acl_bytes(&[
        (1, 6, u32::MAX),
        (2, 4, 1000),
        (4, 0, u32::MAX),
        (16, 4, u32::MAX),
        (32, 0, u32::MAX),
    ]);
    set_acl(&secret, &acl);

    s.mount_ok("lowerdir=l1:l2,upperdir=u,workdir=w");
    assert!(
        readable_by_user_1000(&s.p("m/secret")),
        "the ACL grants read"
    );
    umount(&s);

    let (mut child, log) = s.mount_logging_requests("lowerdir=l1:l2,upperdir=u,workdir=w,noacl");
    assert!(
        !readable_by_user_1000(&s.p("m/secret")),
        "noacl: mode 0600 decides"
    );
    for _ in 0..10 {
        assert!(readable_by_user_1000(&s.p("m/b")));
    }
    assert_eq!(
        get_acl(&s.p("m/secret")),
        acl,
        "noacl: the ACL is still there"
    );
    umount(&s);
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    let asked = log
        .lines()
        .filter(|l| l.contains("GETXATTR name \"system.posix_acl_access\""))
        .count();
    assert!(
        asked <= 1,
        "noacl: {asked} GETXATTR of system.posix_acl_access (only the one above expected)"
    );
}

/// copy_file_range within the mount is served by the daemon in one request (the kernel then
/// sends no READ or WRITE for it): `cp` copies files this way.
#[test]
fn copy_file_range_is_one_request() {
    use std::os::fd::AsFd;
    let s = Stack::new();
    std::fs::write(s.p("l2/big"), vec![7u8; 300_000]).unwrap();
    let (mut child, log) = s.mount_logging_requests("lowerdir=l1:l2,upperdir=u,workdir=w");
    let src = std::fs::File::open(s.p("m/big")).unwrap();
    let dst = std::fs::File::create(s.p("m/copy")).unwrap();
    let n = layervol::sys::copy_file_range(src.as_fd(), 0, dst.as_fd(), 0, 300_000).unwrap();
    assert_eq!(n, 300_000);
    drop((src, dst));
    assert_eq!(std::fs::read(s.p("m/copy")).unwrap(), vec![7u8; 300_000]);
    umount(&s);
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count(" COPY_FILE_RANGE "), 1, "{log}");
    assert_eq!(count(" WRITE "), 0, "no data through the daemon");
}

/// The kernel never caches the ACLs of a FUSE mount's root inode (it exists before FUSE_INIT
/// grants ACLs), so layervol attaches a directory below it: a user who does not own the
/// mount's root walks through it from the kernel's caches, one GETXATTR per directory the
/// first time and none after (with the view at the FUSE root: one more on every walk).
#[test]
fn non_owners_walk_through_the_root_from_the_cache() {
    use std::os::unix::fs::PermissionsExt;
    let s = Stack::new();
    std::fs::set_permissions(&s.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(s.p("l2/d/e")).unwrap();
    std::fs::write(s.p("l2/d/e/f"), b"f").unwrap();
    // Long attribute timeouts: a permission check that refreshes expired attributes also
    // drops the cached ACL, which a slow machine would count as more reads.
    let (mut child, log) =
        s.mount_logging_requests("lowerdir=l1:l2,upperdir=u,workdir=w,timeout=3600");
    let walks = Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c"])
        .arg(r#"for i in $(seq 20); do stat -c %s "$1" || exit 1; done"#)
        .arg("sh")
        .arg(s.p("m/d/e/f"))
        .output()
        .expect("setpriv (util-linux)");
    assert!(walks.status.success(), "{walks:?}");
    assert_eq!(String::from_utf8_lossy(&walks.stdout), "1\n".repeat(20));
    let served = std::fs::read_to_string(&log).unwrap();
    // The mount's root is the view below the FUSE root.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = info
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f[4] == s.p("m").to_str().unwrap())
        .map(|f| f[3].to_string());
    umount(&s);
    child.wait().unwrap();
    let acl_reads = served
        .lines()
        .filter(|l| l.contains(" GETXATTR ") && l.contains("posix_acl_access"))
        .count();
    assert!(
        acl_reads <= 3,
        "{acl_reads} ACL reads for 20 walks:\n{served}"
    );
    assert_eq!(root.as_deref(), Some("/view"));
}

/// A user without the privilege to create filesystems mounts through fusermount3 (the view
/// is then the FUSE root) and unmounts with `fusermount3 -u`.
#[test]
fn an_unprivileged_user_mounts_through_fusermount3() {
    use std::os::unix::fs::PermissionsExt;
    let s = Stack::new();
    std::fs::set_permissions(&s.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["l1", "l2", "u", "w", "m", "l1/a", "l2/a", "l2/b"] {
        nix::unistd::chown(&s.p(d), Some(1000.into()), Some(1000.into())).unwrap();
    }
    let as_user = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .args(args)
            .current_dir(&s.root)
            .output()
            .expect("setpriv (util-linux)")
    };
    let out = as_user(&[
        BIN,
        "-o",
        "lowerdir=l1:l2,upperdir=u,workdir=w,userxattr",
        "m",
    ]);
    assert!(out.status.success(), "{out:?}");
    let cat = as_user(&["cat", "m/a", "m/b"]);
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "topb", "{cat:?}");
    assert!(as_user(&["sh", "-c", "echo new > m/b"]).status.success());
    assert_eq!(std::fs::read(s.p("u/b")).unwrap(), b"new\n");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(s.p("m").to_str().unwrap()))
        .expect("mounted");
    assert!(
        line.contains(" / ") && line.contains("user_id=1000"),
        "{line}"
    );
    let out = as_user(&["fusermount3", "-u", "m"]);
    assert!(out.status.success(), "{out:?}");
}
