//! Command line. The bare form is the one mount helpers use:
//! `layervol [SOURCE] MOUNTPOINT -o lowerdir=...,upperdir=...,workdir=...`.

use std::path::PathBuf;

use clap::Parser;

const AFTER_HELP: &str = "\
Mount options (-o, comma-separated; `\\,` and `\\:` escape):
  lowerdir=L1[:L2...]   read-only layers, leftmost on top (relative paths: from the cwd)
  upperdir=DIR          writable layer (needs workdir); without it the mount is read-only
  workdir=DIR           empty dir on the upper's filesystem, for atomic copy-up
  userxattr             use user.overlay.* xattrs (rootless layers)
  squash_to_root | squash_to_uid=N | squash_to_gid=N
                        report every file as owned by this user / group
  volatile | fsync=0    do not fsync (faster; data may be lost on a crash)
  timeout=SECS          kernel entry/attribute cache time (default 1)
  passthrough=on|off    FUSE passthrough for read-only opens (default: on for read-only
                        mounts; on a writable mount a write open of a file that is open
                        read-only elsewhere then fails with EIO, a kernel limitation)
  threads=N             worker threads (default 2 x CPUs, at least 4)
  allow_other           let other users in (default when mounted by root)
  ro, nodev, nosuid, noexec, noatime, sync, dirsync   as for any mount
  Accepted for compatibility with mount -t overlay / fuse-overlayfs, and without effect:
  redirect_dir, index, xino, metacopy (layervol behaves as with redirect_dir=on,index=on,
  xino=on), default_permissions (always on), context=..., uidmapping=, gidmapping=, ...

Examples:
  layervol -o lowerdir=/l1:/l2,upperdir=/u,workdir=/w /mnt
  mount -t fuse.layervol layervol /mnt -o lowerdir=/l,upperdir=/u,workdir=/w
  umount /mnt            (or fusermount3 -u /mnt) stops the daemon";

/// layervol: a layered volume filesystem with OverlayFS semantics (FUSE).
///
/// Mounts the merged view of read-only lower layers and one writable upper layer, exactly
/// like `mount -t overlay` and fuse-overlayfs. Returns once the mount is ready; the daemon
/// keeps serving in the background until the filesystem is unmounted.
#[derive(Debug, Parser)]
#[command(name = "layervol", version, after_help = AFTER_HELP)]
pub struct Cli {
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

impl Cli {
    pub fn mountpoint(&self) -> PathBuf {
        PathBuf::from(self.args.last().expect("clap requires one"))
    }

    pub fn source(&self) -> Option<&str> {
        (self.args.len() == 2).then(|| self.args[0].as_str())
    }
}
