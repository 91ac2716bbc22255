//! Command line. The bare form is the one mount helpers use:
//! `layervol [SOURCE] MOUNTPOINT -o lowerdir=...,upperdir=...,workdir=...`; the subcommands
//! manage volumes (snapshots and more).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
Mount options (-o, comma-separated; `\\,` and `\\:` escape):
  lowerdir=L1[:L2...]   read-only layers, leftmost on top (relative paths: from the cwd)
  upperdir=DIR          writable layer (needs workdir); without it the mount is read-only
  workdir=DIR           empty dir on the upper's filesystem, for atomic copy-up
  userxattr             use user.overlay.* xattrs (rootless layers)
  noacl                 POSIX ACLs are kept as xattrs but play no part in permission checks,
                        and the kernel applies the umask to new objects (as fuse-overlayfs's
                        noacl).
                        With ACLs (the default, as kernel overlayfs), every path walk through
                        the mount's root by a user who does not own it asks the daemon for
                        the root's ACL (the kernel cannot cache the FUSE root's ACLs)
  squash_to_root | squash_to_uid=N | squash_to_gid=N
                        report every file as owned by this user / group
  uidmapping=V:L:N[:...] | gidmapping=V:L:N[:...]
                        ids L..L+N in the layers are shown as V..V+N (fuse-overlayfs form)
  volatile | fsync=0    do not fsync (faster; data may be lost on a crash)
  timeout=SECS          kernel entry/attribute cache time (default 1)
  passthrough=on|off    FUSE passthrough for read-only opens (default: on for read-only
                        mounts; on a writable mount a write open of a file that is open
                        read-only elsewhere then fails with EIO, a kernel limitation)
  threads=N             /dev/fuse worker threads (default 2 x CPUs, at least 4)
  io_uring=on|off       serve requests over per-CPU io_uring queues, two threads per CPU,
                        when the kernel offers it (default off; Linux 6.14+ with
                        /sys/module/fuse/parameters/enable_uring set, as tools/setup.sh does):
                        metadata-heavy work about a third faster, cold sequential reads of
                        large files up to 2x slower
  allow_other           let other users in (default when mounted by root)
  ro, nodev, nosuid, noexec, noatime, sync, dirsync   as for any mount
  Accepted for compatibility with mount -t overlay / fuse-overlayfs (with the values those
  take, e.g. xino=off|auto|on), and without effect:
  redirect_dir, index, xino, metacopy (layervol behaves as with redirect_dir=on,index=on,
  xino=on), default_permissions (always on), context=..., ...
  Volume mounts (`layervol mount VOL MNT`) also take snapshot_interval=SECS and max_layers=N.

Examples:
  layervol -o lowerdir=/l1:/l2,upperdir=/u,workdir=/w /mnt
  mount -t fuse.layervol layervol /mnt -o lowerdir=/l,upperdir=/u,workdir=/w
  umount /mnt            (or fusermount3 -u /mnt) stops the daemon

The daemon's log (warnings, errors) goes to /run/layervol/<hash of the mount point>.log,
beside its control socket (LAYERVOL_RUN_DIR moves both); -f keeps it on stderr.";

/// layervol: a layered volume filesystem with OverlayFS semantics (FUSE).
///
/// Mounts the merged view of read-only lower layers and one writable upper layer, exactly
/// like `mount -t overlay` and fuse-overlayfs. Returns once the mount is ready; the daemon
/// keeps serving in the background until the filesystem is unmounted.
#[derive(Debug, Parser)]
#[command(
    name = "layervol",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,

    /// [SOURCE] MOUNTPOINT. SOURCE (as passed by mount.fuse3) names the mount in /proc/mounts.
    #[arg(num_args = 1..=2, value_name = "[SOURCE] MOUNTPOINT", required = true)]
    pub args: Vec<String>,

    /// Mount options (see below). May be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,

    /// Stay in the foreground.
    #[arg(short = 'f', long)]
    pub foreground: bool,

    /// Debug logging (implies --foreground).
    #[arg(short = 'd', long)]
    pub debug: bool,

    /// Single-threaded (accepted for FUSE compatibility; uses one worker thread).
    #[arg(short = 's')]
    pub single_thread: bool,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Mount a volume (same daemon behaviour and -o options as overlay mode, plus
    /// snapshot_interval=SECS for periodic live snapshots and max_layers=N, the number of
    /// frozen layers above which the mount squashes by itself: default 16, 0 = never).
    Mount {
        /// The volume directory.
        vol: PathBuf,
        /// Where to mount it.
        mountpoint: PathBuf,
        /// Mount options (see `layervol --help`); layer options are not allowed here.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Stay in the foreground.
        #[arg(short = 'f', long)]
        foreground: bool,
        /// Debug logging (implies --foreground).
        #[arg(short = 'd', long)]
        debug: bool,
    },
    /// Take a live snapshot of a mounted volume: the active layer becomes read-only layer N
    /// and an empty one starts, without unmounting; writers pause only for the flip.
    Snapshot {
        mountpoint: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the layers, dirty bytes and snapshot times of a mounted volume.
    Status {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Merge frozen layers into one, online (VOL mounted: give the volume or its mountpoint)
    /// or offline. Whiteouts, opaque dirs and redirects are applied, partial files merged or
    /// made whole; the view does not change. A mount also squashes by itself whenever it has
    /// more than max_layers frozen layers (-o max_layers=N, default 16).
    Squash(SquashArgs),
    /// Write the merged view of a volume as a plain directory tree.
    Export(ExportArgs),
    /// Check every manifest, block map and block CRC of a volume; exits non-zero on damage.
    Verify {
        vol: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume: a layer stack with an empty active layer on top.
    Create {
        /// The volume directory (created; must not exist or be empty).
        vol: PathBuf,
        /// Import this directory as the base layer (modes, owners, xattrs, links kept).
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        /// Block size of dirty tracking and partial files: 4K (default), 64K, 1M, ...
        #[arg(long, value_name = "SIZE", default_value = "4K")]
        block_size: String,
    },
    /// Same as `layervol squash`.
    Squash(SquashArgs),
    /// Pin a frozen layer: squash keeps it as a layer (until unpinned, e.g. until a replica
    /// acknowledged it). VOL may be mounted.
    Pin {
        /// The volume directory, or the mountpoint of a mounted volume.
        vol: PathBuf,
        epoch: u64,
    },
    /// Unpin a frozen layer. VOL may be mounted.
    Unpin { vol: PathBuf, epoch: u64 },
    /// Same as `layervol export`.
    Export(ExportArgs),
}

#[derive(Debug, clap::Args)]
pub struct SquashArgs {
    /// The volume directory, or the mountpoint of a mounted volume. A mounted volume is
    /// squashed online, in use: readers and writers go on (writers pause once, briefly).
    pub vol: PathBuf,
    /// Lowest layer of the range (default: the bottom layer).
    #[arg(long, value_name = "EPOCH")]
    pub from: Option<u64>,
    /// Highest layer of the range (default: the newest frozen layer, or the first pinned).
    #[arg(long, value_name = "EPOCH")]
    pub through: Option<u64>,
    /// Leave no partial file anywhere, so that `mount -t overlay` can mount the layers
    /// (offline only: it rewrites the active layer).
    #[arg(long)]
    pub kernel_compatible: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The volume directory.
    pub vol: PathBuf,
    /// Destination directory (created; must not exist or be empty).
    pub dir: PathBuf,
    /// Export the view as of this frozen epoch (works while the volume is mounted).
    #[arg(long, value_name = "EPOCH")]
    pub epoch: Option<u64>,
}

impl Cli {
    pub fn mountpoint(&self) -> PathBuf {
        PathBuf::from(self.args.last().expect("clap requires one"))
    }

    pub fn source(&self) -> Option<&str> {
        (self.args.len() == 2).then(|| self.args[0].as_str())
    }
}
