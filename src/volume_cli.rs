//! The volume subcommands: `volume create`, `mount`, `snapshot`, `status`, `verify`.
//!
//! `mount` runs the same engine and daemon as overlay mode, with the layers the volume lists,
//! plus a control socket that takes live snapshots (`fs::snapshot`) and answers status.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;

use crate::cli::{Cmd, VolumeCmd};
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
            let v = Volume::create_with(&vol, &opts)
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
        Cmd::Volume(VolumeCmd::Squash {
            vol,
            from,
            through,
            kernel_compatible,
        }) => {
            let mut v = open_waiting(&vol).with_context(|| {
                format!("cannot open volume `{}` (is it mounted?)", vol.display())
            })?;
            let opts = crate::volume::squash::SquashOptions {
                from,
                through,
                kernel_compatible,
            };
            let t0 = Instant::now();
            let st = crate::volume::squash::squash(&mut v, &opts).with_context(|| {
                format!(
                    "squash of `{}` failed; the volume is unchanged",
                    vol.display()
                )
            })?;
            println!(
                "squashed epochs {:?} into epoch {} ({} entries, {} linked, {} copied) in {:.2} s",
                st.merged_epochs,
                st.epoch,
                st.entries,
                st.linked_objects,
                st.copied_files,
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Volume(VolumeCmd::Pin { vol, epoch }) => {
            let mut v = open_waiting(&vol).with_context(|| {
                format!("cannot open volume `{}` (is it mounted?)", vol.display())
            })?;
            v.pin(epoch)?;
            println!("layer {epoch} of {} pinned", vol.display());
            Ok(())
        }
        Cmd::Volume(VolumeCmd::Unpin { vol, epoch }) => {
            let mut v = open_waiting(&vol).with_context(|| {
                format!("cannot open volume `{}` (is it mounted?)", vol.display())
            })?;
            v.unpin(epoch)?;
            println!("layer {epoch} of {} unpinned", vol.display());
            Ok(())
        }
        Cmd::Volume(VolumeCmd::Export { vol, dir, epoch }) => {
            let st = match epoch {
                Some(e) => {
                    let v = Volume::open_read_only(&vol)?;
                    crate::volume::squash::export_frozen(&v, e, &dir, false)?
                }
                None => {
                    let v = open_waiting(&vol).with_context(|| {
                        format!(
                            "cannot open volume `{}` (mounted? export a frozen epoch with --epoch)",
                            vol.display()
                        )
                    })?;
                    crate::volume::squash::export(&v, &dir, false)?
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
            let r = control::call(&mountpoint, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_status(&r);
            }
            Ok(())
        }
        Cmd::Verify { vol, json } => verify(&vol, json),
    }
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
    if plan.read_only {
        // Read-only: the active layer is shown too, as the top lower layer.
        plan.cfg.lowers.insert(0, vol.upper_dir());
        plan.cfg.upper = None;
        plan.cfg.work = None;
    }
    if plan.fsname == "layervol" {
        plan.fsname = format!("layervol:{}", vol.path().display());
    }
    let interval = plan.snapshot_interval;
    let mnt = daemon::mountpoint(&cwd.join(mnt))?;
    let vol = Arc::new(Mutex::new(vol));
    let after: daemon::AfterMount = Box::new(move |fs: &Arc<Overlay>, mnt: &Path| {
        let last: Arc<Mutex<Option<LastSnapshot>>> = Arc::default();
        let snap = {
            let (fs, vol, last) = (fs.clone(), vol.clone(), last.clone());
            move || snapshot(&fs, &vol, &last)
        };
        let snap = Arc::new(snap);
        {
            let (fs, vol, last, snap) = (fs.clone(), vol.clone(), last.clone(), snap.clone());
            control::serve(mnt, move |req| match req {
                Request::Snapshot => snap(),
                Request::Status => status(&fs, &vol, &last),
            })?;
        }
        if let Some(every) = interval {
            std::thread::Builder::new()
                .name("snapshot-timer".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        if let Err(e) = snap() {
                            tracing::error!("periodic snapshot failed: {e:#}");
                        }
                    }
                })?;
        }
        Ok(())
    });
    daemon::mount(plan, &mnt, foreground, debug, Some(after))
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
    // The next layer's directories (and their fsyncs) are made before writers are blocked.
    v.prepare_freeze()
        .context("cannot prepare the next layer")?;
    let mut done = None;
    let stats = fs
        .freeze(|| {
            let f = v.freeze_active().map_err(std::io::Error::other)?;
            done = Some(f);
            Ok(v.upper_dir())
        })
        .context("snapshot failed; the volume is unchanged")?;
    let f = done.context("freeze did not run")?;
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
        "flush_micros": stats.flush_micros,
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

/// Entries, data bytes and allocated blocks of one layer tree.
fn layer_usage(tree: &Path) -> (u64, u64, u64) {
    let (mut entries, mut bytes, mut blocks) = (0, 0, 0);
    let mut stack = vec![tree.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            entries += 1;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                bytes += md.size();
                blocks += md.blocks();
            }
        }
    }
    (entries, bytes, blocks)
}

fn status(
    fs: &Overlay,
    vol: &Mutex<Volume>,
    last: &Mutex<Option<LastSnapshot>>,
) -> anyhow::Result<serde_json::Value> {
    let v = vol.lock();
    let layers: Vec<_> = v
        .layers()
        .iter()
        .map(|l| {
            let (entries, data_bytes, blocks) = layer_usage(&v.tree_dir(l.epoch));
            json!({
                "epoch": l.epoch,
                "state": l.state.to_string(),
                "pinned": l.pinned,
                "entries": entries,
                "data_bytes": data_bytes,
                "allocated_bytes": blocks * 512,
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

fn print_status(r: &serde_json::Value) {
    println!(
        "volume {} (block size {}), active epoch {}",
        r["volume"].as_str().unwrap_or("?"),
        r["block_size"],
        r["active_epoch"]
    );
    println!("  epoch  state   pinned  entries  data bytes");
    for l in r["layers"].as_array().into_iter().flatten() {
        println!(
            "  {:>5}  {:<6}  {:<6}  {:>7}  {:>10}",
            l["epoch"],
            l["state"].as_str().unwrap_or("?"),
            l["pinned"],
            l["entries"],
            l["data_bytes"]
        );
    }
    println!(
        "  dirty in the active epoch: {} bytes in {} file(s); open handles: {}",
        r["dirty_bytes"], r["dirty_files"], r["open_handles"]
    );
    match r["last_snapshot"].as_object() {
        Some(s) => println!(
            "  last snapshot: epoch {} at {} (unix), took {} us, writers paused {} us",
            s["frozen_epoch"], s["unix_secs"], s["total_micros"], s["barrier_micros"]
        ),
        None => println!("  no snapshot since mount"),
    }
}

fn verify(vol: &Path, json: bool) -> anyhow::Result<()> {
    let v = Volume::open_read_only(vol)
        .with_context(|| format!("cannot open volume `{}`", vol.display()))?;
    let rep = v.verify()?;
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
    }
    if !rep.is_sound() {
        bail!("volume `{}` has damage (see above)", vol.display());
    }
    Ok(())
}
