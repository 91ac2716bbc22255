//! The volume subcommands: `volume create`, `mount`, `snapshot`, `status`, `verify`.
//!
//! `mount` runs the same engine and daemon as overlay mode, with the layers the volume lists,
//! plus a control socket that takes live snapshots (`fs::snapshot`) and answers status.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;

use crate::cli::{Cmd, ExportArgs, SquashArgs, VolumeCmd};
use crate::control::{self, Request};
use crate::daemon;
use crate::fs::Overlay;
use crate::options;
use crate::volume::{CreateOptions, Volume};

pub fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Volume(VolumeCmd::Create {
            vol,
            from,
            block_size,
        }) => {
            let bs = parse_size(&block_size)?;
            let opts = CreateOptions {
                block_size: u32::try_from(bs).context("block size too large")?,
                from: from.as_deref(),
                ..CreateOptions::default()
            };
            let v = with_progress(|| Volume::create_with(&vol, &opts))
                .with_context(|| format!("cannot create volume `{}`", vol.display()))?;
            println!(
                "created volume {} (id {}, block size {}, {} layer(s), active epoch {})",
                vol.display(),
                v.id(),
                v.block_size(),
                v.layers().len(),
                v.active_epoch()
            );
            Ok(())
        }
        Cmd::Volume(VolumeCmd::Squash(args)) | Cmd::Squash(args) => squash_cmd(args),
        Cmd::Volume(VolumeCmd::Pin { vol, epoch }) => pin_cmd(&vol, epoch, true),
        Cmd::Volume(VolumeCmd::Unpin { vol, epoch }) => pin_cmd(&vol, epoch, false),
        Cmd::Volume(VolumeCmd::Export(args)) | Cmd::Export(args) => export_cmd(args),
        Cmd::Mount {
            vol,
            mountpoint,
            options,
            foreground,
            debug,
        } => mount(&vol, &mountpoint, &options, foreground, debug),
        Cmd::Snapshot { mountpoint, json } => {
            let r = control::call(&mountpoint, &Request::Snapshot)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "snapshot: epoch {} frozen, epoch {} active; writers paused {} us; {} dirty bytes in {} file(s)",
                    r["frozen_epoch"],
                    r["active_epoch"],
                    r["barrier_micros"],
                    r["dirty_bytes"],
                    r["dirty_files"]
                );
            }
            Ok(())
        }
        Cmd::Status { mountpoint, json } => {
            quiet_on_closed_pipe();
            let r = control::call(&mountpoint, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_status(&r);
            }
            Ok(())
        }
        Cmd::Verify { vol, json } => {
            quiet_on_closed_pipe();
            verify(&vol, json)
        }
    }
}

/// Runs `work` while a line on stderr (a terminal only) shows what the volume code counts
/// (`volume::progress`): entries and bytes copied, then read to checksum, and the rate.
fn with_progress<T>(work: impl FnOnce() -> T) -> T {
    use crate::volume::progress::{self, Phase};
    use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
    let bar = ProgressBar::new_spinner();
    if bar.is_hidden() {
        return work();
    }
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("template"));
    progress::reset();
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut since = (Phase::Idle, 0u64, Instant::now());
    let shown = bar.clone();
    let mut show = move || {
        let (phase, entries, bytes) = progress::now();
        if phase != since.0 {
            since = (phase, bytes, Instant::now());
        }
        let secs = since.2.elapsed().as_secs_f64();
        let rate = if secs > 0.5 {
            let n = bytes.saturating_sub(since.1);
            format!(", {}/s", HumanBytes((n as f64 / secs) as u64))
        } else {
            String::new()
        };
        let what = match phase {
            Phase::Idle => "starting".to_string(),
            Phase::Copy => format!("copying: {entries} entries, {}", HumanBytes(bytes)),
            Phase::Checksum => format!("checksumming: {entries} entries, {}", HumanBytes(bytes)),
        };
        shown.set_message(format!("{what}{rate}"));
        shown.tick();
    };
    let r = std::thread::scope(|s| {
        let drawer = s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                show();
                std::thread::sleep(Duration::from_millis(200));
            }
            show // the last counts are drawn once more below
        });
        /// Ends the drawing also when `work` panics (the scope waits for the drawer).
        struct Done<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let r = {
            let _done = Done(&done);
            work()
        };
        drawer.join().expect("progress drawer")();
        r
    });
    bar.finish_and_clear();
    r
}

/// A report piped into e.g. `head` ends quietly when the reader goes, as other tools do
/// (Rust ignores SIGPIPE, so `println!` would panic). Only for commands that change nothing.
fn quiet_on_closed_pipe() {
    // SAFETY: restoring the default disposition of a signal has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Where a command given a volume or a mountpoint acts.
enum Target {
    /// A mounted volume: through its daemon's control socket at this mountpoint.
    Mounted(std::path::PathBuf),
    /// The volume directory itself (not mounted).
    Offline(std::path::PathBuf),
}

/// `path` is a mountpoint with a live control socket, or a volume that is mounted (found in
/// /proc/self/mountinfo by the mount's source, `layervol:<volume>`), or a volume.
fn target(path: &Path) -> Target {
    if let Ok(c) = path.canonicalize() {
        if std::os::unix::net::UnixStream::connect(control::socket_path(&c)).is_ok() {
            return Target::Mounted(c);
        }
        if let Some(m) = mount_of(&c) {
            return Target::Mounted(m);
        }
    }
    Target::Offline(path.to_path_buf())
}

/// The mountpoint of the layervol mount of volume `vol` (canonical), if mounted.
fn mount_of(vol: &Path) -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = format!("layervol:{}", vol.display());
    info.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mut post = post.split(' ');
        let (fstype, source) = (post.next()?, post.next()?);
        let mnt = pre.split(' ').nth(4)?;
        (fstype.starts_with("fuse") && unescape_mountinfo(source) == want)
            .then(|| std::path::PathBuf::from(unescape_mountinfo(mnt)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn squash_cmd(args: SquashArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    match target(&args.vol) {
        Target::Mounted(mnt) => {
            if args.kernel_compatible {
                bail!(
                    "--kernel-compatible rewrites the active layer: unmount `{}` first",
                    mnt.display()
                );
            }
            let r = control::call(
                &mnt,
                &Request::Squash {
                    from: args.from,
                    through: args.through,
                },
            )?;
            if r["merged_epochs"].as_array().is_none_or(|a| a.is_empty()) {
                println!("nothing to squash: the range is a single layer");
            } else {
                println!(
                    "squashed epochs {} into epoch {} online ({} entries, {} linked, {} copied; {} reserved inodes freed; writers paused {} us) in {:.2} s",
                    r["merged_epochs"],
                    r["epoch"],
                    r["entries"],
                    r["linked_objects"],
                    r["copied_files"],
                    r["freed_reserved"],
                    r["barrier_micros"],
                    t0.elapsed().as_secs_f64()
                );
            }
            if let Some(e) = r["finish_error"].as_str() {
                eprintln!("layervol: {e}");
            }
            Ok(())
        }
        Target::Offline(vol) => {
            let mut v = open_waiting(&vol).with_context(|| {
                format!("cannot open volume `{}` (is it mounted?)", vol.display())
            })?;
            let opts = crate::volume::squash::SquashOptions {
                from: args.from,
                through: args.through,
                kernel_compatible: args.kernel_compatible,
            };
            let st = with_progress(|| crate::volume::squash::squash(&mut v, &opts)).with_context(
                || {
                    format!(
                        "squash of `{}` failed; the volume is unchanged",
                        vol.display()
                    )
                },
            )?;
            if st.merged_epochs.is_empty() {
                println!("nothing to squash: the range is a single layer");
                return Ok(());
            }
            println!(
                "squashed epochs {:?} into epoch {} ({} entries, {} linked, {} copied; {} reserved inodes freed) in {:.2} s",
                st.merged_epochs,
                st.epoch,
                st.entries,
                st.linked_objects,
                st.copied_files,
                st.freed_reserved,
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

fn pin_cmd(vol: &Path, epoch: u64, pin: bool) -> anyhow::Result<()> {
    let what = if pin { "pinned" } else { "unpinned" };
    match target(vol) {
        Target::Mounted(mnt) => {
            let req = if pin {
                Request::Pin { epoch }
            } else {
                Request::Unpin { epoch }
            };
            control::call(&mnt, &req)?;
        }
        Target::Offline(vol) => {
            let mut v = open_waiting(&vol)
                .with_context(|| format!("cannot open volume `{}`", vol.display()))?;
            if pin {
                v.pin(epoch)?;
            } else {
                v.unpin(epoch)?;
            }
        }
    }
    println!("layer {epoch} of {} {what}", vol.display());
    Ok(())
}

fn export_cmd(args: ExportArgs) -> anyhow::Result<()> {
    let ExportArgs { vol, dir, epoch } = args;
    let st = match epoch {
        Some(e) => {
            let v = Volume::open_read_only(&vol)?;
            with_progress(|| crate::volume::squash::export_frozen(&v, e, &dir, false))?
        }
        None => {
            let v = open_waiting(&vol).with_context(|| {
                format!(
                    "cannot open volume `{}` (mounted? export a frozen epoch with --epoch)",
                    vol.display()
                )
            })?;
            with_progress(|| crate::volume::squash::export(&v, &dir, false))?
        }
    };
    println!(
        "exported {} entries ({} bytes) to {}",
        st.entries,
        st.written_bytes,
        dir.display()
    );
    Ok(())
}

/// "4K", "64k", "1M", "4096".
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad size `{s}`: expected e.g. 4K, 64K, 1M or bytes"))?;
    Ok(n * mul)
}

#[derive(Debug, Default, Clone, Serialize)]
struct LastSnapshot {
    unix_secs: u64,
    total_micros: u64,
    barrier_micros: u64,
    frozen_epoch: u64,
}

fn mount(
    vol_path: &Path,
    mnt: &Path,
    opts: &[String],
    foreground: bool,
    debug: bool,
) -> anyhow::Result<()> {
    let cwd = std::env::current_dir()?;
    let vol = open_waiting(&cwd.join(vol_path))
        .with_context(|| format!("cannot open volume `{}`", vol_path.display()))?;
    vol.remove_stale_work_dirs()?;
    let recovered = recover_active(&vol)?;
    if recovered > 0 {
        eprintln!(
            "layervol: reconciled {recovered} partial file(s) with writes a crash left unrecorded"
        );
    }
    // A crash between a freeze and its seal leaves a frozen layer without manifest.
    for e in vol.unsealed_epochs() {
        vol.seal(e)
            .with_context(|| format!("cannot seal layer {e} of `{}`", vol_path.display()))?;
    }
    let mut plan = options::parse_volume(&daemon::split_options(opts), &cwd)?;
    plan.cfg.lowers = vol.lower_dirs();
    plan.cfg.upper = Some(vol.upper_dir());
    plan.cfg.work = Some(vol.work_dir());
    plan.cfg.userxattr = vol.userxattr();
    plan.cfg.block_size = vol.block_size() as u64;
    plan.cfg.index = false;
    plan.cfg.maps = Some(crate::fs::MapDirs {
        layers: vol.path().join("layers"),
    });
    plan.cfg.ctimes = Arc::new(
        crate::volume::ctimes::Ctimes::of_frozen_layers(&vol)
            .with_context(|| format!("cannot mount `{}`", vol_path.display()))?,
    );
    if plan.read_only {
        // Read-only: the active layer is shown too, as the top lower layer.
        plan.cfg.lowers.insert(0, vol.upper_dir());
        plan.cfg.upper = None;
        plan.cfg.work = None;
    }
    if plan.fsname == "layervol" {
        // Canonical: `layervol squash VOL` finds the mount by it (`mount_of`).
        let canon = vol
            .path()
            .canonicalize()
            .unwrap_or_else(|_| vol.path().to_path_buf());
        plan.fsname = format!("layervol:{}", canon.display());
    }
    let interval = plan.snapshot_interval;
    let max_layers = plan.max_layers;
    let mnt = daemon::mountpoint(&cwd.join(mnt))?;
    let vol = Arc::new(Mutex::new(vol));
    let after: daemon::AfterMount = Box::new(move |fs: &Arc<Overlay>, mnt: &Path| {
        let d = Arc::new(Daemon {
            fs: fs.clone(),
            vol,
            last: Mutex::default(),
            last_squash: Mutex::default(),
            squash_lock: Mutex::new(()),
            max_layers,
            auto_running: Default::default(),
            sealed: Mutex::default(),
        });
        {
            let d = d.clone();
            control::serve(mnt, move |req| match req {
                Request::Snapshot => d.snapshot(),
                Request::Status => d.status(),
                Request::Squash { from, through } => {
                    d.squash(&crate::volume::squash::SquashOptions {
                        from,
                        through,
                        kernel_compatible: false,
                    })
                }
                Request::Pin { epoch } => {
                    d.vol.lock().pin(epoch)?;
                    Ok(json!({ "epoch": epoch, "pinned": true }))
                }
                Request::Unpin { epoch } => {
                    d.vol.lock().unpin(epoch)?;
                    Ok(json!({ "epoch": epoch, "pinned": false }))
                }
            })?;
        }
        if let Some(every) = interval {
            std::thread::Builder::new()
                .name("snapshot-timer".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        if let Err(e) = d.snapshot() {
                            tracing::error!("periodic snapshot failed: {e:#}");
                        }
                    }
                })?;
        }
        Ok(())
    });
    daemon::mount(plan, &mnt, foreground, debug, Some(after))
}

/// The volume side of a mounted volume's daemon: snapshots, squashes, status.
struct Daemon {
    fs: Arc<Overlay>,
    vol: Arc<Mutex<Volume>>,
    last: Mutex<Option<LastSnapshot>>,
    last_squash: Mutex<Option<serde_json::Value>>,
    /// One squash at a time (a requested one and the automatic one).
    squash_lock: Mutex<()>,
    /// Squash by itself above this many frozen layers (0: never).
    max_layers: usize,
    /// The automatic squash thread runs.
    auto_running: std::sync::atomic::AtomicBool,
    /// What the manifests of sealed layers say, by layer directory.
    sealed: Mutex<std::collections::HashMap<std::path::PathBuf, SealedStats>>,
}

/// How long a squash waits after switching the engine to the new layers before removing
/// the old ones: operations that started before the switch finish with the old objects.
const SQUASH_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// (dev, ino) of every file this process has open.
fn open_inodes() -> std::collections::HashSet<(u64, u64)> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

/// The engine's live inodes, for `squash::finish_online`.
struct EngineInodes<'a>(&'a Overlay);

impl crate::volume::squash::LiveInodes for EngineInodes<'_> {
    fn in_use(&self, st: &crate::sys::Stat) -> bool {
        self.0.identity_in_use(st.st_dev, st.st_ino)
    }
    fn kept(&self, st: &crate::sys::Stat, at: std::path::PathBuf) -> bool {
        self.0.keep_ghost(st.st_dev, st.st_ino, at)
    }
}

impl Daemon {
    fn snapshot(self: &Arc<Self>) -> anyhow::Result<serde_json::Value> {
        let r = snapshot(&self.fs, &self.vol, &self.last)?;
        self.maybe_squash();
        Ok(r)
    }

    fn status(&self) -> anyhow::Result<serde_json::Value> {
        let mut r = status(&self.fs, &self.vol, &self.last, &|dir| {
            self.sealed_stats(dir)
        })?;
        r["max_layers"] = json!(self.max_layers);
        r["ghost_inodes"] = json!(self.fs.ghost_count());
        r["last_squash"] = json!(*self.last_squash.lock());
        r["squash_running"] = json!(
            self.squash_lock.is_locked()
                || self.auto_running.load(std::sync::atomic::Ordering::Acquire)
        );
        Ok(r)
    }

    /// What a sealed layer's manifest says (cached: a sealed layer never changes); `None`
    /// if the layer has no readable manifest.
    fn sealed_stats(&self, dir: &Path) -> Option<SealedStats> {
        if let Some(st) = self.sealed.lock().get(dir) {
            return Some(*st);
        }
        let m = crate::volume::manifest::Manifest::load_optional(dir).ok()??;
        let maps = crate::volume::blockmap::MapStore::new(dir.join(crate::volume::store::MAPS_DIR));
        let st = SealedStats::of(&m, &maps);
        self.sealed.lock().insert(dir.to_path_buf(), st);
        Some(st)
    }

    /// Starts a background squash if the mount has more frozen layers than `max_layers`:
    /// the layers above the bottom one, up to the newest (or the first pinned), become one.
    /// The bottom layer (usually the big base) is left alone, so the cost of a squash is
    /// the data written since it, not the volume's size. The thread goes on while
    /// snapshots taken meanwhile exceed the bound again.
    fn maybe_squash(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.max_layers == 0 || self.auto_range().is_none() {
            return;
        }
        if self.auto_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let d = self.clone();
        let spawned = std::thread::Builder::new()
            .name("auto-squash".into())
            .spawn(move || {
                loop {
                    while let Some((from, through)) = d.auto_range() {
                        let opts = crate::volume::squash::SquashOptions {
                            from: Some(from),
                            through: Some(through),
                            kernel_compatible: false,
                        };
                        if let Err(e) = d.squash(&opts) {
                            tracing::error!(
                                "automatic squash of epochs {from}..={through} failed: {e:#}"
                            );
                            break;
                        }
                    }
                    d.auto_running.store(false, Ordering::Release);
                    // A snapshot that saw this thread running left the check to it.
                    if d.auto_range().is_none() || d.auto_running.swap(true, Ordering::AcqRel) {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            self.auto_running.store(false, Ordering::Release);
            tracing::error!("cannot start the squash thread: {e}");
        }
    }

    /// What the automatic squash merges now, if anything: when there are more than
    /// `max_layers` frozen layers, or when reading the partial files above the bottom layer
    /// costs an eighth of reading its data (and at least `FOLD_MIN`): reading a file through
    /// its written blocks then costs enough that it is worth making it whole again, by
    /// folding everything into the bottom layer.
    ///
    /// The cost of a partial file is its present bytes plus `EXTENT_COST` per extent: each
    /// extent is a read of its own, and scattered blocks are as far apart on disk as in the
    /// file (ext4 places a sparse file's blocks at their offsets). Counting bytes alone let a
    /// file carry an eighth of its size in scattered blocks, which reads at 0.56-0.66 of the
    /// whole file; bounded by cost, at 0.90 (README, "Volume mode"). Amortised, a fold
    /// rewrites at most eight times the cost of what was written since the last one.
    fn auto_range(&self) -> Option<(u64, u64)> {
        const FOLD_MIN: u64 = 4 << 20;
        /// What a scattered extent costs beyond its bytes, in bytes read in sequence: on this
        /// machine a scattered 4 KiB block cost about 20 KiB (`bench-partial-read.py 1 2047`;
        /// the disk does 88k random 4 KiB reads/s with `fio` at depth 64, ~1 GB/s in sequence).
        const EXTENT_COST: u64 = 16 << 10;
        let v = self.vol.lock();
        let frozen: Vec<_> = v
            .layers()
            .iter()
            .take_while(|l| l.state == crate::volume::LayerState::Frozen)
            .collect();
        if frozen.len() < 2 {
            return None;
        }
        {
            let live: std::collections::HashSet<_> =
                frozen.iter().map(|l| v.layer_dir(l.epoch)).collect();
            self.sealed.lock().retain(|d, _| live.contains(d));
        }
        let stats = |epoch: u64| self.sealed_stats(&v.layer_dir(epoch)).unwrap_or_default();
        let base = stats(frozen[0].epoch).data_bytes;
        let above: u64 = frozen[1..]
            .iter()
            .map(|l| {
                let st = stats(l.epoch);
                st.partial_bytes + st.partial_extents.saturating_mul(EXTENT_COST)
            })
            .sum();
        let fold = above >= FOLD_MIN && above.saturating_mul(8) >= base;
        if frozen.len() <= self.max_layers && !fold {
            return None;
        }
        auto_squash_range(v.layers(), fold)
    }

    /// Squashes frozen layers while mounted: builds the merged layer beside the old ones
    /// (readers and writers go on; snapshots wait), then under the write barrier commits
    /// it and repoints the active layer's partial files, and switches the engine to it; the
    /// old layers go after a grace period (inodes the mount still identifies objects by are
    /// kept until the kernel forgets them).
    fn squash(
        &self,
        opts: &crate::volume::squash::SquashOptions,
    ) -> anyhow::Result<serde_json::Value> {
        use crate::volume::squash;
        let _one = self.squash_lock.lock();
        let t0 = Instant::now();
        // Built from a read-only handle, without the volume lock: snapshots go on.
        let path = self.vol.lock().path().to_path_buf();
        let ro = Volume::open_read_only(&path)?;
        // Objects the build hard-links keep showing their change time (see `ctimes`) and,
        // until the old layers are removed, their link count.
        let shown = |ino, ctime, nlink| {
            self.fs.note_ctime(ino, ctime);
            self.fs.note_nlink(ino, nlink);
        };
        let Some(mut p) = squash::prepare_online(&ro, opts, &shown)
            .context("squash failed; the volume is unchanged")?
        else {
            return Ok(json!({ "merged_epochs": [] }));
        };
        let build_micros = t0.elapsed().as_micros() as u64;
        let t1 = Instant::now();
        let mut v = self.vol.lock();
        let ctimes = squash::complete_online(&v, &mut p, &shown).and_then(|()| p.ctimes_after(&v));
        let ctimes = match ctimes {
            Ok(c) => Arc::new(c),
            Err(e) => {
                p.abandon(&v);
                return Err(
                    anyhow::Error::from(e).context("squash failed; the volume is unchanged")
                );
            }
        };
        let changes = p.tree_changes(&v);
        let mut relinked = Ok(0);
        let rs = self.fs.restack(&changes, || {
            squash::commit(&mut v, &p).map_err(std::io::Error::other)?;
            // Committed: from here the engine switches whatever happens.
            relinked = squash::relink_active(&v, &p);
            self.fs.set_ctimes(ctimes);
            Ok(())
        });
        let rs = match rs {
            Ok(rs) => rs,
            Err(e) => {
                p.abandon(&v);
                return Err(
                    anyhow::Error::from(e).context("squash failed; the volume is unchanged")
                );
            }
        };
        let locked_micros = t1.elapsed().as_micros() as u64;
        let mut finish_error = None;
        let mut removed = 0;
        let mut ghosts = 0;
        let mut freed_reserved = 0;
        match &relinked {
            Err(e) => {
                finish_error = Some(format!(
                    "repointing the active layer failed ({e:#}); the old layers are removed at the next mount"
                ));
            }
            Ok(_) => {
                drop(v);
                self.fs.settle_all();
                std::thread::sleep(SQUASH_GRACE);
                // Without the volume lock (a read-only handle): removing big old layers and
                // flushing must not hold up snapshots.
                let finished = Volume::open_read_only(&path).and_then(|ro| {
                    let f = squash::finish_online(&ro, &EngineInodes(&self.fs))?;
                    // Reserved files keep their data while this process reads them.
                    let open = open_inodes();
                    squash::empty_reserved(&ro, &|d, i| open.contains(&(d, i)))?;
                    // Only a leftover for the next squash if it fails.
                    let freed = squash::gc_reserved(&ro, Some(&EngineInodes(&self.fs)))
                        .unwrap_or_else(|e| {
                            tracing::warn!("freeing reserved inodes: {e}");
                            0
                        });
                    Ok((f, freed))
                });
                match finished {
                    Ok((f, freed)) => {
                        self.fs.clear_nlinks();
                        let f = f.unwrap_or_default();
                        removed = f.removed_dirs;
                        ghosts = f.ghosts;
                        freed_reserved = freed;
                    }
                    Err(e) => {
                        finish_error = Some(format!(
                            "removing the old layers failed ({e:#}); they are removed at the next mount"
                        ));
                    }
                }
            }
        }
        let st = &p.stats;
        let r = json!({
            "epoch": p.last_epoch(),
            "merged_epochs": st.merged_epochs,
            "rewritten_epochs": st.rewritten_epochs,
            "entries": st.entries,
            "linked_objects": st.linked_objects,
            "copied_files": st.copied_files,
            "assembled_files": st.assembled_files,
            "merged_partials": st.merged_partials,
            "written_bytes": st.written_bytes,
            "relinked_partials": relinked.as_ref().map_or(0, |n| *n),
            "barrier_micros": rs.barrier_micros,
            "removed_dirs": removed,
            "ghost_inodes": ghosts,
            "freed_reserved": freed_reserved,
            "lower_layers": rs.lower_layers,
            "build_micros": build_micros,
            "locked_micros": locked_micros,
            "total_micros": t0.elapsed().as_micros() as u64,
            "finish_error": finish_error,
        });
        tracing::info!("online squash: {r}");
        *self.last_squash.lock() = Some(r.clone());
        Ok(r)
    }
}

/// The range of an automatic squash: from the second frozen layer (the bottom one with
/// `fold`) up to the newest one, stopping at (and including) the first pinned layer; a
/// pinned layer at the start moves the range above it.
fn auto_squash_range(layers: &[crate::volume::LayerRecord], fold: bool) -> Option<(u64, u64)> {
    use crate::volume::LayerState;
    let frozen: Vec<_> = layers
        .iter()
        .take_while(|l| l.state == LayerState::Frozen)
        .collect();
    let mut lo = usize::from(!fold);
    loop {
        while lo < frozen.len() && frozen[lo].pinned {
            lo += 1;
        }
        if lo + 1 >= frozen.len() {
            return None;
        }
        let hi = (lo + 1..frozen.len())
            .find(|&i| frozen[i].pinned)
            .unwrap_or(frozen.len() - 1);
        if hi > lo {
            return Some((frozen[lo].epoch, frozen[hi].epoch));
        }
        lo = hi + 1;
    }
}

/// Opens a volume for writing. `umount` returns before the daemon has exited and released
/// the volume lock, so a mount right after an unmount waits a little for it.
fn open_waiting(path: &Path) -> crate::volume::Result<Volume> {
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Volume::open(path) {
            Err(crate::volume::VolumeError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn snapshot(
    fs: &Overlay,
    vol: &Mutex<Volume>,
    last: &Mutex<Option<LastSnapshot>>,
) -> anyhow::Result<serde_json::Value> {
    let t0 = Instant::now();
    let mut v = vol.lock();
    // The next layer's directories and the next volume.json (and their fsyncs) are made
    // before writers are blocked; the commit is a rename after they run again.
    let staged = v
        .stage_freeze()
        .context("cannot prepare the next layer; the volume is unchanged")?;
    let next = v.tree_dir(staged.active_epoch);
    // The new layer's root takes the attributes the root has at the barrier: copied just
    // before it, and again under it only if they changed meanwhile.
    let root_attrs = v.next_root_attrs();
    let copied = std::cell::Cell::new(None);
    let mut done = None;
    let stats = fs
        .freeze(
            &next,
            || {
                copied.set(Some(root_attrs.copy().map_err(std::io::Error::other)?));
                Ok(())
            },
            || {
                let c = copied.get().expect("copied before the barrier");
                root_attrs.refresh(c).map_err(std::io::Error::other)
            },
            || {
                done = Some(v.commit_freeze(staged).map_err(std::io::Error::other)?);
                Ok(())
            },
        )
        .context("snapshot failed")?;
    let f = done.context("freeze did not run")?;
    if let Err(e) = v.remove_frozen_work_dir(f.frozen_epoch, fs.cfg.work.as_deref()) {
        tracing::warn!("{e:#}");
    }
    // The manifest reads the whole frozen layer: write it outside the barrier.
    let seal_error = v.seal(f.frozen_epoch).err().map(|e| {
        tracing::error!("sealing epoch {}: {e:#}", f.frozen_epoch);
        format!("{e:#}")
    });
    let total = t0.elapsed().as_micros() as u64;
    *last.lock() = Some(LastSnapshot {
        unix_secs: now_secs(),
        total_micros: total,
        barrier_micros: stats.barrier_micros,
        frozen_epoch: f.frozen_epoch,
    });
    Ok(json!({
        "frozen_epoch": f.frozen_epoch,
        "active_epoch": f.active_epoch,
        "barrier_micros": stats.barrier_micros,
        "barrier_wait_micros": stats.barrier_wait_micros,
        "barrier_attrs_micros": stats.barrier_attrs_micros,
        "barrier_maps_micros": stats.barrier_maps_micros,
        "maps_written_under_barrier": stats.maps_written_under_barrier,
        "flush_micros": stats.flush_micros,
        "commit_micros": stats.commit_micros,
        "total_micros": total,
        "dirty_bytes": stats.dirty_bytes,
        "dirty_files": stats.dirty_files,
        "seal_error": seal_error,
    }))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// After a crash, the maps of the active layer's partial files may lag behind their data
/// (writes after the last fsync). Reconciles every one before the layer can be frozen.
fn recover_active(vol: &Volume) -> anyhow::Result<usize> {
    use crate::volume::blockmap;
    use std::os::fd::AsFd;
    let store = vol.maps(vol.active_epoch());
    let mut fixed = 0;
    let mut stack = vec![vol.upper_dir()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let md = e.path().symlink_metadata()?;
            if md.is_dir() {
                stack.push(e.path());
                continue;
            }
            if !md.is_file() {
                continue;
            }
            let f = std::fs::OpenOptions::new().read(true).open(e.path())?;
            let Some(v) =
                crate::sys::fgetxattr(f.as_fd(), blockmap::marker_xattr(vol.userxattr()))?
            else {
                continue;
            };
            let id = blockmap::decode_marker(&v)
                .with_context(|| format!("bad partial-file marker on {}", e.path().display()))?;
            let mut map = store.load(id)?;
            let rec = map.recover(f.as_fd())?;
            if rec.size_changed.is_some() || !rec.adopted.is_empty() || !rec.recomputed.is_empty() {
                store.store(&map)?;
                fixed += 1;
            }
        }
    }
    Ok(fixed)
}

/// What `status` reports of a sealed layer, from its manifest.
#[derive(Debug, Clone, Copy, Default)]
struct SealedStats {
    entries: u64,
    /// Whole files' sizes plus partial files' present bytes (hard links counted once).
    data_bytes: u64,
    blocks: u64,
    partial_files: u64,
    /// The part of `data_bytes` in partial files.
    partial_bytes: u64,
    /// The extents of present blocks of those partial files (their block maps).
    partial_extents: u64,
}

impl SealedStats {
    /// From a layer's manifest and its block maps (a map that cannot be read counts as one
    /// extent per block, the most it can have).
    fn of(
        m: &crate::volume::manifest::Manifest,
        maps: &crate::volume::blockmap::MapStore,
    ) -> SealedStats {
        use crate::volume::manifest::EntryKind;
        let mut seen = std::collections::HashSet::new();
        let (mut partial_bytes, mut partial_extents) = (0, 0);
        for e in &m.entries {
            // Hard links name one map: count it once.
            if let EntryKind::Partial {
                map,
                present_blocks,
                ..
            } = e.kind
                && seen.insert(map)
            {
                partial_bytes += present_blocks * m.block_size as u64;
                partial_extents += match maps.load(map) {
                    Ok(bm) => bm.present().extent_count() as u64,
                    Err(_) => present_blocks,
                };
            }
        }
        SealedStats {
            entries: m.entry_count,
            data_bytes: m.data_bytes,
            blocks: m.block_count,
            partial_files: m.partial_files,
            partial_bytes,
            partial_extents,
        }
    }
}

/// What `status` reports of the active layer, from its tree: entries (the root included, as
/// in a manifest), data bytes (whole files' sizes plus the space partial files take; hard
/// links counted once), partial files.
fn active_usage(tree: &Path, userxattr: bool) -> (u64, u64, u64) {
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;
    let (mut entries, mut bytes, mut partial) = (1, 0, 0);
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(d) = stack.pop() {
        let (Ok(rd), Ok(dfd)) = (std::fs::read_dir(&d), std::fs::File::open(&d)) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            entries += 1;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() && (md.nlink() == 1 || seen.insert(md.ino())) {
                let is_partial = std::ffi::CString::new(e.file_name().as_bytes())
                    .ok()
                    .and_then(|n| {
                        crate::volume::blockmap::read_marker(dfd.as_fd(), &n, userxattr).ok()
                    })
                    .flatten()
                    .is_some();
                if is_partial {
                    partial += 1;
                    bytes += md.blocks() * 512;
                } else {
                    bytes += md.size();
                }
            }
        }
    }
    (entries, bytes, partial)
}

fn status(
    fs: &Overlay,
    vol: &Mutex<Volume>,
    last: &Mutex<Option<LastSnapshot>>,
    sealed: &dyn Fn(&Path) -> Option<SealedStats>,
) -> anyhow::Result<serde_json::Value> {
    let v = vol.lock();
    let bs = v.block_size() as u64;
    let layers: Vec<_> = v
        .layers()
        .iter()
        .map(|l| {
            let st = match l.state {
                crate::volume::LayerState::Frozen => sealed(&v.layer_dir(l.epoch)),
                _ => None,
            }
            .unwrap_or_else(|| {
                let (entries, data_bytes, partial_files) =
                    active_usage(&v.tree_dir(l.epoch), v.userxattr());
                SealedStats {
                    entries,
                    data_bytes,
                    blocks: data_bytes.div_ceil(bs),
                    partial_files,
                    partial_bytes: 0,
                    partial_extents: 0,
                }
            });
            json!({
                "epoch": l.epoch,
                "state": l.state.to_string(),
                "pinned": l.pinned,
                "entries": st.entries,
                "data_bytes": st.data_bytes,
                "blocks": st.blocks,
                "partial_files": st.partial_files,
                "created_unix_secs": l.created_unix_secs,
                "frozen_unix_secs": l.frozen_unix_secs,
            })
        })
        .collect();
    let (dirty_bytes, dirty_files) = fs.dirty_stats();
    Ok(json!({
        "volume": v.path(),
        "volume_id": v.id().to_string(),
        "block_size": v.block_size(),
        "active_epoch": v.active_epoch(),
        "layers": layers,
        "dirty_bytes": dirty_bytes,
        "dirty_files": dirty_files,
        "open_handles": fs.open_handles(),
        "last_snapshot": *last.lock(),
    }))
}

/// `1.5 GiB`-style, exact below 1 KiB.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// `2026-12-01T05:59:01Z` from seconds since the epoch.
fn utc_time(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn print_status(r: &serde_json::Value) {
    println!(
        "volume {} (block size {}), active epoch {}",
        r["volume"].as_str().unwrap_or("?"),
        r["block_size"],
        r["active_epoch"]
    );
    println!("  epoch  state   pinned  entries  data bytes  blocks  partial files");
    for l in r["layers"].as_array().into_iter().flatten() {
        println!(
            "  {:>5}  {:<6}  {:<6}  {:>7}  {:>10}  {:>6}  {:>13}",
            l["epoch"].as_u64().unwrap_or(0),
            l["state"].as_str().unwrap_or("?"),
            l["pinned"].as_bool().unwrap_or(false),
            l["entries"].as_u64().unwrap_or(0),
            human_bytes(l["data_bytes"].as_u64().unwrap_or(0)),
            l["blocks"].as_u64().unwrap_or(0),
            l["partial_files"].as_u64().unwrap_or(0)
        );
    }
    println!(
        "  dirty in the active epoch: {} in {} file(s); open handles: {}",
        human_bytes(r["dirty_bytes"].as_u64().unwrap_or(0)),
        r["dirty_files"],
        r["open_handles"]
    );
    match r["last_snapshot"].as_object() {
        Some(s) => println!(
            "  last snapshot: epoch {} at {}, took {:.1} ms, writers paused {:.2} ms",
            s["frozen_epoch"],
            utc_time(s["unix_secs"].as_u64().unwrap_or(0)),
            s["total_micros"].as_u64().unwrap_or(0) as f64 / 1e3,
            s["barrier_micros"].as_u64().unwrap_or(0) as f64 / 1e3
        ),
        None => println!("  no snapshot since mount"),
    }
}

fn verify(vol: &Path, json: bool) -> anyhow::Result<()> {
    let v = Volume::open_read_only(vol)
        .with_context(|| format!("cannot open volume `{}`", vol.display()))?;
    let rep = with_progress(|| v.verify())?;
    let problems: Vec<_> = rep
        .problems()
        .map(|(epoch, p)| json!({"epoch": epoch, "problem": p.to_string(), "warning": p.is_warning()}))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "sound": rep.is_sound(),
                "layers_checked": rep.layers.len(),
                "problems": problems,
                "strays": rep.strays,
                "removed_at_next_mount": rep.leftovers,
            }))?
        );
    } else {
        for l in &rep.layers {
            println!(
                "epoch {}: {} entries, {} data bytes checked, {} problem(s)",
                l.epoch,
                l.entries_checked,
                l.data_bytes_checked,
                l.problems.len()
            );
        }
        for (epoch, p) in rep.problems() {
            println!("  epoch {epoch}: {p}");
        }
        for s in &rep.strays {
            println!("  stray (not listed in volume.json): {}", s.display());
        }
        if !rep.leftovers.is_empty() {
            println!(
                "  {} directories no longer used (squashed away or an unfinished squash's), removed at the next mount:",
                rep.leftovers.len()
            );
            for s in &rep.leftovers {
                println!("    {}", s.display());
            }
        }
    }
    if !rep.is_sound() {
        bail!("volume `{}` has damage (see above)", vol.display());
    }
    Ok(())
}
