//! Mounting and serving: validate everything, fork, mount in the child, and let the parent
//! return only once the kernel has completed the FUSE handshake (the mount is usable) or the
//! child reported why it could not mount.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::cli::Cli;
use crate::fs::Overlay;
use crate::fs::fuse::{FuseAdapter, NodeIds};
use crate::options::{self, MountPlan};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(cmd) = cli.cmd {
        return crate::volume_cli::run(cmd);
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let opts = split_options(&cli.options);
    let mut plan = options::parse(&opts, &cwd)?;
    if let Some(src) = cli.source()
        && plan.fsname == "layervol"
    {
        plan.fsname = src.to_string();
    }
    if cli.single_thread {
        plan.threads = 1;
    }
    let mnt = mountpoint(&cwd.join(cli.mountpoint()))?;
    mount(plan, &mnt, cli.foreground, cli.debug, None)
}

pub fn split_options(opts: &[String]) -> Vec<String> {
    opts.iter()
        .flat_map(|o| options::split_escaped(o, ','))
        .collect()
}

pub fn mountpoint(p: &Path) -> anyhow::Result<std::path::PathBuf> {
    let mnt = p
        .canonicalize()
        .with_context(|| format!("mountpoint `{}` cannot be used", p.display()))?;
    if !mnt.is_dir() {
        bail!("mountpoint `{}` is not a directory", mnt.display());
    }
    Ok(mnt)
}

/// Extra work a volume mount does once the filesystem is up (control socket, periodic
/// snapshots). Runs in the daemon process.
pub type AfterMount = Box<dyn FnOnce(&Arc<Overlay>, &Path) -> anyhow::Result<()>>;

/// Mounts `plan` on `mnt`: in the foreground, or daemonised with the command returning once
/// the mount is ready.
pub fn mount(
    plan: MountPlan,
    mnt: &Path,
    foreground: bool,
    debug: bool,
    after: Option<AfterMount>,
) -> anyhow::Result<()> {
    for w in &plan.ignored {
        eprintln!(
            "layervol: warning: option `{w}` is accepted for compatibility and has no effect"
        );
    }
    let debug = debug || plan.debug;
    if foreground || debug {
        init_tracing(debug);
        return serve(&plan, mnt, after, || {});
    }

    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: no threads exist yet in this process (nothing above spawns one), so the child
    // may do anything after fork.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(w);
            let mut msg = Vec::new();
            std::fs::File::from(r).read_to_end(&mut msg)?;
            match msg.split_first() {
                Some((b'1', _)) => Ok(()),
                Some((_, m)) => bail!("{}", String::from_utf8_lossy(m)),
                None => bail!("the mount daemon exited before the mount was ready"),
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(r);
            let _ = nix::unistd::setsid();
            let _ = std::env::set_current_dir("/");
            init_tracing(false);
            let mut report = Some(std::fs::File::from(w));
            let res = serve(&plan, mnt, after, || {
                // Closing the pipe lets the parent return.
                if let Some(mut r) = report.take() {
                    let _ = r.write_all(b"1");
                }
                detach_stdio(mnt);
            });
            match res {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    if let Some(mut r) = report.take() {
                        let _ = r.write_all(format!("E{e:#}").as_bytes());
                    }
                    tracing::error!("{e:#}");
                    std::process::exit(1);
                }
            }
        }
    }
}

fn serve(
    plan: &MountPlan,
    mnt: &Path,
    after: Option<AfterMount>,
    on_ready: impl FnOnce(),
) -> anyhow::Result<()> {
    // The kernel applied the caller's umask already; ours must not apply a second one.
    unsafe { libc::umask(0) };
    raise_nofile();
    // Blocked in every thread (they inherit the mask): `unmount_on_signal` waits for them.
    let signals = stop_signals();
    signals.thread_block().context("cannot block signals")?;
    let fs = Arc::new(Overlay::new(plan.cfg.clone()).context("cannot open the layers")?);
    let mut config = fuser::Config::default();
    let mut mo = vec![
        fuser::MountOption::FSName(plan.fsname.clone()),
        fuser::MountOption::Subtype("layervol".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if plan.read_only {
        mo.push(fuser::MountOption::RO);
    }
    mo.extend(plan.kernel_flags.iter().cloned());
    config.mount_options = mo;
    if plan.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(plan.threads);
    config.clone_fd = plan.threads > 1;
    // Two threads per CPU queue: one may block on the disk while the other serves.
    config.io_uring_threads = plan.io_uring.then_some(2);
    // The view one directory below the FUSE root (see `mount`), or, for a caller who may
    // not create filesystems, at the FUSE root through fusermount3.
    let detached = crate::mount::create(&config.mount_options, plan.allow_other)
        .context("cannot create the FUSE filesystem")?;
    let ids = if detached.is_some() {
        NodeIds::BELOW_SHELL
    } else {
        NodeIds::AT_ROOT
    };
    let adapter = FuseAdapter::new(fs.clone(), ids);
    let (session, detached) = match detached {
        Some((dev, d)) => {
            let acl = config.acl;
            let session =
                fuser::Session::from_fd(adapter, dev, acl, config).context("FUSE handshake")?;
            (session, Some(d))
        }
        None => {
            let session = fuser::Session::new(adapter, mnt, &config)
                .with_context(|| format!("cannot mount on `{}`", mnt.display()))?;
            (session, None)
        }
    };
    let notifier = session.notifier();
    fs.set_invalidator(Box::new(move |ino| {
        // Attributes only (offset -1): never touches page cache, so it cannot deadlock
        // against the request that triggered it.
        let _ = notifier.inval_inode(fuser::INodeNo(ids.kernel(ino)), -1, 0);
    }));
    // fuser unmounts the mountpoint when its session ends, also when the session ended
    // because the filesystem was unmounted: `umount` returns before this daemon has exited,
    // so by then a new mount may be there, and it would go. The session runs with that
    // guard forgotten instead: the kernel ends it on unmount, and a signal unmounts this
    // mount only (`unmount_on_signal`).
    let mut bg = session.spawn().context("cannot start the FUSE session")?;
    let session_thread = std::mem::replace(&mut bg.guard, std::thread::spawn(|| Ok(())));
    std::mem::forget(bg);
    if let Some(d) = detached {
        d.attach(mnt)?;
    }
    read_ahead_like_the_layers(plan, mnt);
    if let Some(after) = after {
        after(&fs, mnt)?;
    }
    on_ready();
    unmount_on_signal(signals, mnt.to_path_buf())?;
    let ran = session_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the FUSE session thread panicked"))?
        .context("FUSE session ended with an error");
    // Unmounted: no inode number is in use any more.
    fs.drop_ghosts();
    ran
}

/// SIGINT, SIGTERM and SIGHUP end the daemon by unmounting its filesystem, as with libfuse.
fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Waits for one of `signals` (blocked in every thread) and unmounts `mnt` if this daemon's
/// filesystem is still the one mounted there; the session then ends like on `umount`.
fn unmount_on_signal(signals: nix::sys::signal::SigSet, mnt: PathBuf) -> anyhow::Result<()> {
    // Our device, compared before unmounting, so that a mount stacked over ours, or made
    // after ours went, is never touched.
    let ours = crate::sys::dev_no_sync(&mnt).ok();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let Ok(sig) = signals.wait() else { continue };
                let top = crate::sys::dev_no_sync(&mnt).ok();
                if ours.is_none() || top != ours {
                    tracing::warn!("{sig}: `{}` is not our mount any more", mnt.display());
                    continue;
                }
                tracing::info!("{sig}: unmounting `{}`", mnt.display());
                if let Err(e) = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH) {
                    tracing::error!("{sig}: cannot unmount `{}`: {e}", mnt.display());
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Leaves the caller's terminal: stdin and stdout go to /dev/null, stderr (the log) to
/// `control::log_path`, a new file at each mount (/dev/null if it cannot be made).
fn detach_stdio(mnt: &Path) {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let path = crate::control::log_path(mnt);
    let _ = path.parent().map(std::fs::create_dir_all);
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path);
    for (fd, f) in [
        (0, null.as_ref().ok()),
        (1, null.as_ref().ok()),
        (2, log.as_ref().ok().or(null.as_ref().ok())),
    ] {
        if let Some(f) = f {
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
}

/// Gives the mount the read-ahead of its layers' devices (the largest). Kernel overlayfs reads
/// a lower file through the lower filesystem, with its device's read-ahead (8 MiB on this
/// project's test machines); a FUSE mount starts with 128 KiB, so a sequential reader waited
/// for a READ request every 128 KiB. Needs root (sysfs); left as it is otherwise.
fn read_ahead_like_the_layers(plan: &MountPlan, mnt: &Path) {
    use std::os::unix::fs::MetadataExt;
    let layers = plan.cfg.lowers.iter().chain(plan.cfg.upper.iter());
    let want = layers
        .filter_map(|p| std::fs::metadata(p).ok())
        .filter_map(|m| crate::sys::device_read_ahead_kb(m.dev()))
        .max();
    let (Some(want), Some(ours)) = (want, crate::sys::fuse_mount_device(mnt)) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{ours}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, want.to_string()) {
        tracing::debug!("cannot set {knob} to {want}: {e}");
    }
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn init_tracing(debug: bool) {
    let filter = if debug { "debug" } else { "warn" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LAYERVOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
