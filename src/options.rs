//! Mount options, in the forms `mount -t overlay`, fuse-overlayfs and mount.fuse3 use.
//!
//! Everything is checked before mounting: a bad option, a missing or unsuitable directory
//! gives an error that names it, and nothing is mounted.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::fs::Config;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OptionError {
    #[error("unknown mount option `{0}` (see `layervol --help` for the accepted options)")]
    Unknown(String),
    #[error("mount option `{opt}` has a bad value `{value}`: {why}")]
    BadValue {
        opt: String,
        value: String,
        why: String,
    },
    #[error("no lowerdir given: use -o lowerdir=DIR[:DIR...][,upperdir=DIR,workdir=DIR]")]
    NoLower,
    #[error("upperdir given without workdir: both are needed for a writable mount")]
    NoWorkdir,
    #[error("{what} `{path}`: {why}")]
    BadDir {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("workdir `{work}` must be on the same filesystem as upperdir `{upper}`")]
    WorkdirOtherFs { upper: PathBuf, work: PathBuf },
    #[error("{a} `{pa}` and {b} `{pb}` overlap: one is inside the other")]
    Overlap {
        a: &'static str,
        pa: PathBuf,
        b: &'static str,
        pb: PathBuf,
    },
}

/// A parsed mount request.
#[derive(Debug, Clone)]
pub struct MountPlan {
    pub cfg: Config,
    pub read_only: bool,
    pub allow_other: bool,
    pub threads: usize,
    /// Serve requests over io_uring rings, one queue per CPU, when the kernel offers it
    /// (`io_uring=on|off`, default off; Linux 6.14+ with the `fuse` module's `enable_uring`).
    /// Off by default: it speeds up metadata by a third but halves cold sequential reads
    /// (readahead READs no longer overlap; see the README's benchmark).
    pub io_uring: bool,
    pub debug: bool,
    /// Generic mount flags passed to the kernel (nodev, nosuid, noexec, ...).
    pub kernel_flags: Vec<fuser::MountOption>,
    pub fsname: String,
    /// Accepted for compatibility but without effect here; reported as warnings.
    pub ignored: Vec<String>,
    /// Volume mode: take a live snapshot this often.
    pub snapshot_interval: Option<Duration>,
    /// Volume mode: squash in the background whenever a snapshot leaves more frozen layers
    /// than this (`max_layers=N`, default 16; 0 turns it off).
    pub max_layers: usize,
}

/// Default bound of a mounted volume's frozen layers.
pub const DEFAULT_MAX_LAYERS: usize = 16;

/// Splits on `sep` unless escaped with a backslash; removes the escapes.
pub fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                if n != sep {
                    out.last_mut().expect("non-empty").push('\\');
                }
                out.last_mut().expect("non-empty").push(n);
            }
        } else if c == sep {
            out.push(String::new());
        } else {
            out.last_mut().expect("non-empty").push(c);
        }
    }
    out
}

fn parse_id(opt: &str, v: &str) -> Result<u32, OptionError> {
    v.parse().map_err(|_| OptionError::BadValue {
        opt: opt.into(),
        value: v.into(),
        why: "expected a numeric id".into(),
    })
}

/// `VIEW:LAYER:LEN[:VIEW:LAYER:LEN...]` (fuse-overlayfs also separates triples with `,`,
/// which a mount option string cannot carry; `:` throughout is what podman passes).
fn parse_idmap(opt: &str, v: &str) -> Result<crate::fs::IdMap, OptionError> {
    let bad = |why: &str| OptionError::BadValue {
        opt: opt.into(),
        value: v.into(),
        why: why.into(),
    };
    let nums: Vec<u32> = v
        .split(':')
        .map(|n| {
            n.parse::<u32>()
                .map_err(|_| bad("expected numbers VIEW:LAYER:LEN"))
        })
        .collect::<Result<_, _>>()?;
    if nums.is_empty() || !nums.len().is_multiple_of(3) {
        return Err(bad("expected triples VIEW:LAYER:LEN"));
    }
    let ranges: Vec<(u32, u32, u32)> = nums.chunks(3).map(|c| (c[0], c[1], c[2])).collect();
    if ranges
        .iter()
        .any(|(v, l, n)| *n == 0 || v.checked_add(*n).is_none() || l.checked_add(*n).is_none())
    {
        return Err(bad("a range is empty or overflows"));
    }
    Ok(crate::fs::IdMap(ranges))
}

/// Options that are flags: a value is an error (kernel overlayfs and mount(8) refuse one).
const FLAGS: &[&str] = &[
    "userxattr",
    "acl",
    "noacl",
    "squash_to_root",
    "volatile",
    "allow_other",
    "allow_root",
    "debug",
    "default_permissions",
    "ro",
    "rw",
    "nodev",
    "dev",
    "nosuid",
    "suid",
    "noexec",
    "exec",
    "noatime",
    "sync",
    "dirsync",
    "static_nlink",
    "atime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "async",
    "auto_unmount",
];

/// What an option accepted for compatibility (and without effect here) takes.
#[derive(Clone, Copy)]
enum Takes {
    Flag,
    OneOf(&'static [&'static str]),
    Number,
    Text,
    /// mount(8)'s own options, which it may pass on with or without a value.
    Anything,
}

/// The options accepted for compatibility and what each takes, as kernel overlayfs
/// (fs/overlayfs/params.c), fuse-overlayfs and mount(8) define them.
fn compat_value(k: &str) -> Option<Takes> {
    const ON_OFF: &[&str] = &["on", "off"];
    Some(match k {
        "redirect_dir" => Takes::OneOf(&["on", "follow", "nofollow", "off"]),
        "index" | "metacopy" | "nfs_export" => Takes::OneOf(ON_OFF),
        "xino" => Takes::OneOf(&["off", "auto", "on"]),
        "uuid" => Takes::OneOf(&["off", "null", "auto", "on"]),
        "verity" => Takes::OneOf(&["off", "on", "require"]),
        "fast_ino" | "writeback" | "noxattrs" | "xattr_permissions" | "blksize" | "max_read" => {
            Takes::Number
        }
        "subtype" | "context" | "fscontext" | "defcontext" | "rootcontext" | "plugins" => {
            Takes::Text
        }
        "auto" | "noauto" | "user" | "nouser" | "users" | "defaults" | "_netdev" | "nofail" => {
            Takes::Anything
        }
        _ if FLAGS.contains(&k) => Takes::Flag,
        _ => return None,
    })
}

fn check_compat_value(k: &str, v: Option<&str>, takes: Takes) -> Result<(), OptionError> {
    let bad = |why: String| OptionError::BadValue {
        opt: k.into(),
        value: v.unwrap_or_default().into(),
        why,
    };
    match (takes, v) {
        (Takes::Anything, _) | (Takes::Flag, None) => Ok(()),
        (Takes::Flag, Some(_)) => Err(bad("takes no value".into())),
        (Takes::OneOf(_) | Takes::Number | Takes::Text, None) => Err(bad("needs a value".into())),
        (Takes::OneOf(ok), Some(v)) if ok.contains(&v) => Ok(()),
        (Takes::OneOf(ok), Some(_)) => Err(bad(match ok.split_last() {
            Some((last, rest)) => format!("expected {} or {last}", rest.join(", ")),
            None => "expected nothing".into(),
        })),
        (Takes::Number, Some(v)) if v.parse::<u64>().is_ok() => Ok(()),
        (Takes::Number, Some(_)) => Err(bad("expected a number".into())),
        (Takes::Text, Some(_)) => Ok(()),
    }
}

fn parse_onoff(opt: &str, v: &str) -> Result<bool, OptionError> {
    match v {
        "on" | "1" | "yes" | "true" => Ok(true),
        "off" | "0" | "no" | "false" => Ok(false),
        _ => Err(OptionError::BadValue {
            opt: opt.into(),
            value: v.into(),
            why: "expected on or off".into(),
        }),
    }
}

fn resolve_dir(what: &'static str, p: &str, cwd: &Path) -> Result<PathBuf, OptionError> {
    let bad = |why: String| OptionError::BadDir {
        what,
        path: PathBuf::from(p),
        why,
    };
    if p.is_empty() {
        return Err(bad("empty path".into()));
    }
    let abs = cwd.join(p);
    let canon = abs
        .canonicalize()
        .map_err(|e| bad(format!("cannot be used: {e}")))?;
    let md = std::fs::metadata(&canon).map_err(|e| bad(e.to_string()))?;
    if !md.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    std::fs::read_dir(&canon).map_err(|e| bad(format!("is not readable: {e}")))?;
    Ok(canon)
}

/// Parses `-o` options (already split on commas) into a mount plan.
pub fn parse(opts: &[String], cwd: &Path) -> Result<MountPlan, OptionError> {
    parse_inner(opts, cwd, false)
}

/// Parses the options of `layervol mount VOL`: the volume supplies the layers.
pub fn parse_volume(opts: &[String], cwd: &Path) -> Result<MountPlan, OptionError> {
    parse_inner(opts, cwd, true)
}

fn parse_inner(opts: &[String], cwd: &Path, volume: bool) -> Result<MountPlan, OptionError> {
    use fuser::MountOption as M;
    let mut snapshot_interval = None;
    let mut max_layers = DEFAULT_MAX_LAYERS;
    let mut cfg = Config::default();
    let mut lower = None;
    let mut upper = None;
    let mut work = None;
    let mut plan_ro = false;
    let mut allow_other = nix::unistd::geteuid().is_root();
    let mut threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get() * 2)
        .max(4);
    let mut debug = false;
    let mut kernel_flags = Vec::new();
    let mut fsname = "layervol".to_string();
    let mut ignored = Vec::new();
    let mut passthrough = None;
    let mut io_uring = false;

    for opt in opts.iter().filter(|o| !o.is_empty()) {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        let val = || -> Result<&str, OptionError> {
            v.ok_or_else(|| OptionError::BadValue {
                opt: k.into(),
                value: String::new(),
                why: "needs a value".into(),
            })
        };
        if FLAGS.contains(&k) && v.is_some() {
            return Err(OptionError::BadValue {
                opt: k.into(),
                value: v.unwrap_or_default().into(),
                why: "takes no value".into(),
            });
        }
        match k {
            "lowerdir" | "upperdir" | "workdir" if volume => {
                return Err(OptionError::BadValue {
                    opt: k.into(),
                    value: v.unwrap_or_default().into(),
                    why: "a volume's layers are set by the volume, not by options".into(),
                });
            }
            "snapshot_interval" if volume => {
                let secs: f64 = val()?.parse().map_err(|_| OptionError::BadValue {
                    opt: k.into(),
                    value: val().unwrap_or_default().into(),
                    why: "expected seconds".into(),
                })?;
                if !(0.1..=31_536_000.0).contains(&secs) {
                    return Err(OptionError::BadValue {
                        opt: k.into(),
                        value: val().unwrap_or_default().into(),
                        why: "between 0.1 s and a year".into(),
                    });
                }
                snapshot_interval = Some(Duration::from_secs_f64(secs));
            }
            "max_layers" if volume => {
                max_layers = match val()?.parse::<usize>() {
                    Ok(n) if n == 0 || n >= 2 => n,
                    _ => {
                        return Err(OptionError::BadValue {
                            opt: k.into(),
                            value: val().unwrap_or_default().into(),
                            why: "expected 0 (no automatic squash) or a number of layers >= 2"
                                .into(),
                        });
                    }
                };
            }
            "lowerdir" => lower = Some(val()?.to_string()),
            "upperdir" => upper = Some(val()?.to_string()),
            "workdir" => work = Some(val()?.to_string()),
            "userxattr" => cfg.userxattr = true,
            "acl" => cfg.acl = true,
            "noacl" => cfg.acl = false,
            "squash_to_root" => {
                cfg.squash_uid = Some(0);
                cfg.squash_gid = Some(0);
            }
            "squash_to_uid" => cfg.squash_uid = Some(parse_id(k, val()?)?),
            "squash_to_gid" => cfg.squash_gid = Some(parse_id(k, val()?)?),
            "uidmapping" => cfg.uid_map = parse_idmap(k, val()?)?,
            "gidmapping" => cfg.gid_map = parse_idmap(k, val()?)?,
            "volatile" => cfg.fsync = false,
            "fsync" => cfg.fsync = parse_onoff(k, val()?)?,
            "passthrough" => passthrough = Some(parse_onoff(k, val()?)?),
            "io_uring" => io_uring = parse_onoff(k, val()?)?,
            "timeout" => {
                let secs: f64 = val()?.parse().map_err(|_| OptionError::BadValue {
                    opt: k.into(),
                    value: val().unwrap_or_default().into(),
                    why: "expected seconds".into(),
                })?;
                cfg.ttl = Duration::from_secs_f64(secs.clamp(0.0, 86400.0));
            }
            "threads" | "threaded" | "max_idle_threads" => {
                let n: usize = val()?.parse().map_err(|_| OptionError::BadValue {
                    opt: k.into(),
                    value: val().unwrap_or_default().into(),
                    why: "expected a number".into(),
                })?;
                if k != "max_idle_threads" && n > 0 {
                    threads = n.min(256);
                }
            }
            "allow_other" | "allow_root" => allow_other = true,
            "debug" => debug = true,
            "fsname" | "source" => fsname = val()?.to_string(),
            // Always on: the kernel checks permissions with the caller's credentials, as with
            // kernel overlayfs.
            "default_permissions" => {}
            "ro" => plan_ro = true,
            "rw" => plan_ro = false,
            "nodev" => kernel_flags.push(M::NoDev),
            "dev" => kernel_flags.push(M::Dev),
            "nosuid" => kernel_flags.push(M::NoSuid),
            "suid" => kernel_flags.push(M::Suid),
            "noexec" => kernel_flags.push(M::NoExec),
            "exec" => kernel_flags.push(M::Exec),
            "noatime" => kernel_flags.push(M::NoAtime),
            "sync" => kernel_flags.push(M::Sync),
            "dirsync" => kernel_flags.push(M::DirSync),
            // Kernel overlay features that layervol always provides (redirect_dir, index,
            // xino, metacopy) or that have no meaning for it; the value is checked, then
            // accepted.
            _ if let Some(takes) = compat_value(k) => {
                check_compat_value(k, v, takes)?;
                ignored.push(opt.clone());
            }
            _ if k.starts_with("x-") => {}
            _ => return Err(OptionError::Unknown(opt.clone())),
        }
    }
    if !volume {
        let lower = lower.ok_or(OptionError::NoLower)?;
        for l in split_escaped(&lower, ':') {
            if l.is_empty() {
                // `::` separates data-only lowers in the kernel; not supported here.
                return Err(OptionError::BadValue {
                    opt: "lowerdir".into(),
                    value: lower.clone(),
                    why: "empty layer (data-only layers `::` are not supported)".into(),
                });
            }
            cfg.lowers.push(resolve_dir("lowerdir", &l, cwd)?);
        }
        match (upper, work) {
            (Some(u), Some(w)) if !plan_ro => {
                let u = resolve_dir("upperdir", &u, cwd)?;
                let w = resolve_dir("workdir", &w, cwd)?;
                let (mu, mw) = (std::fs::metadata(&u), std::fs::metadata(&w));
                if let (Ok(mu), Ok(mw)) = (mu, mw)
                    && mu.dev() != mw.dev()
                {
                    return Err(OptionError::WorkdirOtherFs { upper: u, work: w });
                }
                if let Err(e) = nix::unistd::access(&u, nix::unistd::AccessFlags::W_OK) {
                    return Err(OptionError::BadDir {
                        what: "upperdir",
                        path: u,
                        why: format!("is not writable: {e}"),
                    });
                }
                if u.starts_with(&w) || w.starts_with(&u) {
                    return Err(OptionError::Overlap {
                        a: "upperdir",
                        pa: u,
                        b: "workdir",
                        pb: w,
                    });
                }
                for l in &cfg.lowers {
                    if u.starts_with(l) || l.starts_with(&u) {
                        return Err(OptionError::Overlap {
                            a: "upperdir",
                            pa: u,
                            b: "lowerdir",
                            pb: l.clone(),
                        });
                    }
                }
                cfg.upper = Some(u);
                cfg.work = Some(w);
            }
            (Some(_), None) if !plan_ro => return Err(OptionError::NoWorkdir),
            (None, Some(_)) => ignored.push("workdir (no upperdir)".into()),
            _ => plan_ro = true,
        }
    }
    // Like `mount -t overlay`: devices and set-id files work unless the caller says nodev /
    // nosuid (FUSE mounts default to nodev,nosuid; only root may lift that).
    if nix::unistd::geteuid().is_root() {
        if !kernel_flags.contains(&M::NoDev) && !kernel_flags.contains(&M::Dev) {
            kernel_flags.push(M::Dev);
        }
        if !kernel_flags.contains(&M::NoSuid) && !kernel_flags.contains(&M::Suid) {
            kernel_flags.push(M::Suid);
        }
    }
    let read_only = plan_ro || (!volume && cfg.upper.is_none());
    // The kernel cannot mix passthrough and daemon-served opens of one inode: a write open
    // while a passthrough read open exists fails with EIO. Only a read-only mount is safe.
    cfg.passthrough = passthrough.unwrap_or(read_only);
    Ok(MountPlan {
        read_only,
        cfg,
        allow_other,
        threads,
        io_uring,
        debug,
        kernel_flags,
        fsname,
        ignored,
        snapshot_interval,
        max_layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Vec<String> {
        split_escaped(s, ',')
    }

    #[test]
    fn idmaps() {
        let m = parse_idmap("uidmapping", "0:1000:1:1:100000:65536").unwrap();
        assert_eq!(m.to_view(1000), 0);
        assert_eq!(m.to_view(100_004), 5);
        assert_eq!(m.to_view(7), 65534);
        assert_eq!(m.to_layer(0), 1000);
        assert_eq!(m.to_layer(5), 100_004);
        assert!(parse_idmap("uidmapping", "0:1000").is_err());
        assert!(parse_idmap("uidmapping", "0:1000:0").is_err());
    }

    #[test]
    fn escapes() {
        assert_eq!(split_escaped(r"a\:b:c", ':'), vec!["a:b", "c"]);
        assert_eq!(split_escaped(r"a\\b", ':'), vec![r"a\\b"]);
    }

    #[test]
    fn full_form_and_relative_paths() {
        let t = tempfile::tempdir().unwrap();
        for d in ["l1", "l2", "u", "w"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        let p = parse(
            &opts("lowerdir=l1:l2,upperdir=u,workdir=w,volatile"),
            t.path(),
        )
        .unwrap();
        assert_eq!(p.cfg.lowers.len(), 2);
        assert!(p.cfg.lowers[0].ends_with("l1"));
        assert!(p.cfg.upper.unwrap().ends_with("u"));
        assert!(!p.cfg.fsync);
        assert!(!p.read_only);
    }

    #[test]
    fn errors_are_specific() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("l")).unwrap();
        std::fs::create_dir(t.path().join("l/u")).unwrap();
        std::fs::create_dir(t.path().join("w")).unwrap();
        assert!(matches!(
            parse(&opts("upperdir=x"), t.path()),
            Err(OptionError::NoLower)
        ));
        assert!(matches!(
            parse(&opts("lowerdir=l,bogus"), t.path()),
            Err(OptionError::Unknown(_))
        ));
        assert!(matches!(
            parse(&opts("lowerdir=missing"), t.path()),
            Err(OptionError::BadDir { .. })
        ));
        assert!(matches!(
            parse(&opts("lowerdir=l,upperdir=l/u,workdir=w"), t.path()),
            Err(OptionError::Overlap { .. })
        ));
        assert!(matches!(
            parse(&opts("lowerdir=l,upperdir=w"), t.path()),
            Err(OptionError::NoWorkdir)
        ));
        assert!(parse(&opts("lowerdir=l"), t.path()).unwrap().read_only);
    }

    /// Options accepted for compatibility take the values kernel overlayfs, fuse-overlayfs
    /// and mount(8) give them: a typo is an error there, so it is one here.
    #[test]
    fn compatibility_options_check_their_values() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("l")).unwrap();
        let good = [
            "redirect_dir=nofollow",
            "index=off",
            "xino=auto",
            "metacopy=on",
            "nfs_export=off",
            "uuid=null",
            "verity=require",
            "writeback=1",
            "fast_ino=0",
            "noxattrs=2",
            "xattr_permissions=1",
            "static_nlink",
            "relatime",
            "context=system_u:object_r:container_file_t:s0",
            "max_read=131072",
            "x-systemd.automount",
        ];
        for o in good {
            let p = parse(&opts(&format!("lowerdir=l,{o}")), t.path());
            assert!(p.is_ok(), "{o}: {:?}", p.err());
        }
        let bad = [
            ("xino=bogus", "off, auto or on"),
            ("redirect_dir=yes", "on, follow, nofollow or off"),
            ("index", "needs a value"),
            ("uuid=", "off, null, auto or on"),
            ("writeback=on", "a number"),
            ("static_nlink=1", "takes no value"),
            ("noatime=1", "takes no value"),
            ("context", "needs a value"),
        ];
        for (o, why) in bad {
            match parse(&opts(&format!("lowerdir=l,{o}")), t.path()) {
                Err(e @ OptionError::BadValue { .. }) => {
                    assert!(e.to_string().contains(why), "{o}: `{e}` lacks `{why}`")
                }
                other => panic!("{o}: {:?}", other.map(|p| p.ignored)),
            }
        }
    }
}
