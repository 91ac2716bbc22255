//! The operations a scenario performs, and their execution against one mount.
//!
//! Every [`Op`] maps to one (or, for the whole-file helpers, a few) system calls made
//! directly through libc; its [`Outcome`] (a value or the errno) is recorded and compared
//! with the other mount's. Paths are relative to the mount root. Open files live in numbered
//! slots so that a scenario can interleave calls on several descriptors.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::observe::{FileType, Meta, TimeClass, show_bytes};
use crate::sys::{self, Errno, SysResult};

/// A numbered open-file slot.
pub type Slot = u8;

/// `(seconds, nanoseconds)`.
pub type Time = (i64, i64);

#[derive(Clone, Debug)]
pub enum Op {
    // --- namespace ---
    Mkdir(String, u32),
    Rmdir(String),
    Unlink(String),
    /// `Symlink(target, linkpath)`.
    Symlink(String, String),
    Link(String, String),
    /// `renameat2(old, new, flags)`; flags 0 is plain rename.
    Rename(String, String, u32),
    /// `mknod(path, S_IFxxx | perm, makedev(major, minor))`.
    Mknod(String, u32, (u32, u32)),
    // --- whole-file helpers ---
    /// `open(O_CREAT|O_EXCL|O_WRONLY, mode)` + close.
    Create(String, u32),
    /// `open(O_WRONLY|O_CREAT|O_TRUNC, 0644)`, write, close.
    WriteFile(String, Vec<u8>),
    /// `open(O_WRONLY|O_APPEND)`, write, close.
    Append(String, Vec<u8>),
    /// `open(O_WRONLY)`, pwrite, close.
    WriteAt(String, u64, Vec<u8>),
    /// `open(O_RDONLY)`, read to EOF, close.
    ReadFile(String),
    Truncate(String, u64),
    // --- metadata ---
    Stat(String),
    Lstat(String),
    Chmod(String, u32),
    /// `lchown`.
    Chown(String, u32, u32),
    /// `utimensat(AT_SYMLINK_NOFOLLOW)` with explicit atime, mtime.
    Utimens(String, Time, Time),
    /// The exact mtime (lstat).
    Mtime(String),
    /// The exact atime (lstat); only meaningful right after a utimens.
    Atime(String),
    Access(String, i32),
    Readlink(String),
    /// Names, d_types and whether each entry's d_ino equals its st_ino.
    Readdir(String),
    /// Only the success and `f_namelen` are compared (sizes and free space differ).
    Statfs(String),
    // --- xattrs (never following symlinks) ---
    SetXattr(String, String, Vec<u8>, i32),
    GetXattr(String, String),
    ListXattr(String),
    RemoveXattr(String, String),
    // --- open files ---
    Open(Slot, String, i32, u32),
    Close(Slot),
    /// Reads from the current offset to EOF.
    Read(Slot),
    /// Writes at the current offset.
    Write(Slot, Vec<u8>),
    Pread(Slot, u64, usize),
    Pwrite(Slot, u64, Vec<u8>),
    /// `copy_file_range(in, &off_in, out, &off_out, len, 0)`: the bytes copied.
    CopyRange(Slot, u64, Slot, u64, usize),
    Ftruncate(Slot, u64),
    Fallocate(Slot, i32, u64, u64),
    Fsync(Slot),
    Fdatasync(Slot),
    Fstat(Slot),
    Fchmod(Slot, u32),
    Flock(Slot, i32),
    /// `F_OFD_SETLK` with `(l_type, start, len)`.
    OfdLock(Slot, i16, u64, u64),
    /// `F_OFD_GETLK`: the conflicting lock, if any.
    OfdGetLock(Slot, i16, u64, u64),
    MmapRead(Slot, u64, usize),
    MmapWrite(Slot, u64, Vec<u8>),
    // --- inode identity ---
    /// Records `lstat(path).st_ino` under a label; labels are compared as an equivalence
    /// relation ("same inode as"), never by value.
    Ino(String, String),
    /// Records `fstat(slot).st_ino` under a label.
    Fino(String, Slot),
    // --- credentials ---
    /// Runs the op with this thread's filesystem uid and gid switched to `(uid, gid)`, which
    /// also drops its filesystem capabilities (CAP_FSETID among them), as an unprivileged
    /// process would run it.
    AsUser(u32, u32, Box<Op>),
    // --- control (executed by the scenario runner) ---
    /// Snapshots the whole merged view for comparison.
    Checkpoint,
    /// Closes all slots, unmounts, remounts the same stack.
    Remount,
    /// Closes all slots, unmounts, turns the upper into the top lower layer, mounts with a
    /// new empty upper and a fresh work dir. On a volume: a live snapshot instead (slots
    /// are closed too, so that both sides run the same calls).
    Rotate,
    /// A live snapshot with the open slots kept open (volume variants only, where files
    /// are open and the kernel cannot rotate). A live snapshot must be invisible, so every
    /// other side does nothing but look at the merged view, like the volume does around
    /// the snapshot.
    Snapshot,
}

/// The observable result of one op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Err(Errno),
    Count(u64),
    Data(Vec<u8>),
    Meta(Meta),
    Time(TimeClass),
    Names(Vec<String>),
    Entries(Vec<DirEntry>),
    Text(String),
}

/// One readdir entry as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub dtype: Option<FileType>,
    /// `d_ino == lstat(entry).st_ino` (always true for "." and "..", which are not checked).
    pub ino_consistent: bool,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => write!(f, "Ok"),
            Outcome::Err(e) => write!(f, "Err({e:?})"),
            Outcome::Count(n) => write!(f, "{n}"),
            Outcome::Data(d) => write!(f, "{}", show_bytes(d)),
            Outcome::Meta(m) => write!(f, "[{m}]"),
            Outcome::Time(t) => write!(f, "{t}"),
            Outcome::Names(n) => write!(f, "{n:?}"),
            Outcome::Text(t) => write!(f, "{t}"),
            Outcome::Entries(es) => {
                let items: Vec<String> = es
                    .iter()
                    .map(|e| {
                        let t = e.dtype.map_or("?".to_string(), |t| format!("{t:?}"));
                        let ino = if e.ino_consistent {
                            ""
                        } else {
                            " d_ino!=st_ino"
                        };
                        format!("{}:{t}{ino}", e.name)
                    })
                    .collect();
                write!(f, "[{}]", items.join(", "))
            }
        }
    }
}

fn flag_names(flags: i32) -> String {
    let mut parts = vec![
        match flags & libc::O_ACCMODE {
            libc::O_RDONLY => "O_RDONLY",
            libc::O_WRONLY => "O_WRONLY",
            _ => "O_RDWR",
        }
        .to_string(),
    ];
    for (bit, name) in [
        (libc::O_CREAT, "O_CREAT"),
        (libc::O_EXCL, "O_EXCL"),
        (libc::O_TRUNC, "O_TRUNC"),
        (libc::O_APPEND, "O_APPEND"),
        (libc::O_DIRECTORY, "O_DIRECTORY"),
        (libc::O_NOFOLLOW, "O_NOFOLLOW"),
        (libc::O_PATH, "O_PATH"),
    ] {
        if flags & bit != 0 {
            parts.push(name.to_string());
        }
    }
    parts.join("|")
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = |d: &[u8]| show_bytes(d);
        match self {
            Op::Mkdir(p, m) => write!(f, "mkdir({p:?}, {m:o})"),
            Op::Rmdir(p) => write!(f, "rmdir({p:?})"),
            Op::Unlink(p) => write!(f, "unlink({p:?})"),
            Op::Symlink(t, l) => write!(f, "symlink({t:?}, {l:?})"),
            Op::Link(a, c) => write!(f, "link({a:?}, {c:?})"),
            Op::Rename(a, c, 0) => write!(f, "rename({a:?}, {c:?})"),
            Op::Rename(a, c, fl) => {
                let name = match *fl {
                    libc::RENAME_NOREPLACE => "RENAME_NOREPLACE".to_string(),
                    libc::RENAME_EXCHANGE => "RENAME_EXCHANGE".to_string(),
                    libc::RENAME_WHITEOUT => "RENAME_WHITEOUT".to_string(),
                    other => format!("{other:#x}"),
                };
                write!(f, "renameat2({a:?}, {c:?}, {name})")
            }
            Op::Mknod(p, m, (ma, mi)) => write!(f, "mknod({p:?}, {m:o}, {ma}:{mi})"),
            Op::Create(p, m) => write!(f, "create({p:?}, {m:o})"),
            Op::WriteFile(p, d) => write!(f, "write_file({p:?}, {})", b(d)),
            Op::Append(p, d) => write!(f, "append({p:?}, {})", b(d)),
            Op::WriteAt(p, o, d) => write!(f, "write_at({p:?}, {o}, {})", b(d)),
            Op::ReadFile(p) => write!(f, "read_file({p:?})"),
            Op::Truncate(p, l) => write!(f, "truncate({p:?}, {l})"),
            Op::Stat(p) => write!(f, "stat({p:?})"),
            Op::Lstat(p) => write!(f, "lstat({p:?})"),
            Op::Chmod(p, m) => write!(f, "chmod({p:?}, {m:o})"),
            Op::Chown(p, u, g) => write!(f, "lchown({p:?}, {u}, {g})"),
            Op::Utimens(p, a, m) => write!(f, "utimens({p:?}, {a:?}, {m:?})"),
            Op::Mtime(p) => write!(f, "mtime({p:?})"),
            Op::Atime(p) => write!(f, "atime({p:?})"),
            Op::Access(p, m) => write!(f, "access({p:?}, {m})"),
            Op::Readlink(p) => write!(f, "readlink({p:?})"),
            Op::Readdir(p) => write!(f, "readdir({p:?})"),
            Op::Statfs(p) => write!(f, "statfs({p:?})"),
            Op::SetXattr(p, n, v, fl) => write!(f, "lsetxattr({p:?}, {n:?}, {}, {fl})", b(v)),
            Op::GetXattr(p, n) => write!(f, "lgetxattr({p:?}, {n:?})"),
            Op::ListXattr(p) => write!(f, "llistxattr({p:?})"),
            Op::RemoveXattr(p, n) => write!(f, "lremovexattr({p:?}, {n:?})"),
            Op::Open(s, p, fl, m) => write!(f, "fd{s} = open({p:?}, {}, {m:o})", flag_names(*fl)),
            Op::Close(s) => write!(f, "close(fd{s})"),
            Op::AsUser(u, g, op) => write!(f, "as {u}:{g}: {op}"),
            Op::Read(s) => write!(f, "read(fd{s})"),
            Op::Write(s, d) => write!(f, "write(fd{s}, {})", b(d)),
            Op::Pread(s, o, l) => write!(f, "pread(fd{s}, {o}, {l})"),
            Op::Pwrite(s, o, d) => write!(f, "pwrite(fd{s}, {o}, {})", b(d)),
            Op::CopyRange(a, oa, z, oz, l) => {
                write!(f, "copy_file_range(fd{a}, {oa}, fd{z}, {oz}, {l})")
            }
            Op::Ftruncate(s, l) => write!(f, "ftruncate(fd{s}, {l})"),
            Op::Fallocate(s, m, o, l) => write!(f, "fallocate(fd{s}, {m:#x}, {o}, {l})"),
            Op::Fsync(s) => write!(f, "fsync(fd{s})"),
            Op::Fdatasync(s) => write!(f, "fdatasync(fd{s})"),
            Op::Fstat(s) => write!(f, "fstat(fd{s})"),
            Op::Fchmod(s, m) => write!(f, "fchmod(fd{s}, {m:o})"),
            Op::Flock(s, o) => write!(f, "flock(fd{s}, {o:#x})"),
            Op::OfdLock(s, t, o, l) => write!(f, "F_OFD_SETLK(fd{s}, type={t}, {o}, {l})"),
            Op::OfdGetLock(s, t, o, l) => write!(f, "F_OFD_GETLK(fd{s}, type={t}, {o}, {l})"),
            Op::MmapRead(s, o, l) => write!(f, "mmap_read(fd{s}, {o}, {l})"),
            Op::MmapWrite(s, o, d) => write!(f, "mmap_write+msync(fd{s}, {o}, {})", b(d)),
            Op::Ino(l, p) => write!(f, "ino[{l}] = lstat({p:?}).st_ino"),
            Op::Fino(l, s) => write!(f, "ino[{l}] = fstat(fd{s}).st_ino"),
            Op::Checkpoint => write!(f, "checkpoint"),
            Op::Remount => write!(f, "remount"),
            Op::Rotate => write!(
                f,
                "rotate (upper becomes a lower layer; volume: live snapshot)"
            ),
            Op::Snapshot => write!(f, "live snapshot with files open (volume only)"),
        }
    }
}

/// An inode number recorded under a label, and the mount epoch (number of remounts and
/// rotations before it) it was recorded in.
#[derive(Clone, Copy, Debug)]
pub struct Label {
    pub ino: u64,
    pub epoch: usize,
}

/// Executes ops against one mounted tree.
pub struct Exec {
    root: PathBuf,
    fds: BTreeMap<Slot, OwnedFd>,
    /// Inode numbers recorded by [`Op::Ino`] / [`Op::Fino`], with the epoch they were
    /// recorded in.
    pub labels: BTreeMap<String, Label>,
    /// Number of remounts/rotations so far (maintained by the scenario runner).
    pub epoch: usize,
}

fn unit(r: SysResult<()>) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Err(e),
    }
}

fn value<T>(r: SysResult<T>, f: impl FnOnce(T) -> Outcome) -> Outcome {
    match r {
        Ok(v) => f(v),
        Err(e) => Outcome::Err(e),
    }
}

impl Exec {
    pub fn new(root: &Path) -> Exec {
        Exec {
            root: root.to_path_buf(),
            fds: BTreeMap::new(),
            labels: BTreeMap::new(),
            epoch: 0,
        }
    }

    pub fn close_all(&mut self) {
        self.fds.clear();
    }

    fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// Runs `f` on the descriptor in `slot`; a slot whose open failed (or that was closed)
    /// behaves like a closed descriptor: EBADF.
    fn with_fd<T>(&self, slot: Slot, f: impl FnOnce(&OwnedFd) -> SysResult<T>) -> SysResult<T> {
        self.fds.get(&slot).map_or(Err(Errno::EBADF), f)
    }

    /// Runs `f` on a fresh descriptor opened with `flags` (closed afterwards).
    fn with_file(
        &self,
        rel: &str,
        flags: i32,
        f: impl FnOnce(&OwnedFd) -> SysResult<()>,
    ) -> Outcome {
        unit(sys::open(&self.p(rel), flags, 0o644).and_then(|fd| f(&fd)))
    }

    fn readdir(&self, rel: &str) -> SysResult<Vec<DirEntry>> {
        let dir = self.p(rel);
        let mut out: Vec<DirEntry> = sys::read_dir(&dir)?
            .into_iter()
            .map(|e| {
                let name = String::from_utf8_lossy(&e.name).into_owned();
                let dot = name == "." || name == "..";
                let ino_consistent =
                    dot || sys::lstat(&dir.join(&name)).is_ok_and(|st| st.st_ino == e.d_ino);
                DirEntry {
                    dtype: FileType::from_dtype(e.d_type),
                    name,
                    ino_consistent,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Runs one (non-control) op.
    pub fn apply(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Mkdir(p, m) => unit(sys::mkdir(&self.p(p), *m)),
            Op::Rmdir(p) => unit(sys::rmdir(&self.p(p))),
            Op::Unlink(p) => unit(sys::unlink(&self.p(p))),
            Op::Symlink(t, l) => unit(sys::symlink(t, &self.p(l))),
            Op::Link(a, b) => unit(sys::link(&self.p(a), &self.p(b))),
            Op::Rename(a, b, fl) => unit(sys::renameat2(&self.p(a), &self.p(b), *fl)),
            Op::Mknod(p, m, (ma, mi)) => unit(sys::mknod(&self.p(p), *m, sys::makedev(*ma, *mi))),
            Op::Create(p, m) => unit(
                sys::open(
                    &self.p(p),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    *m,
                )
                .map(drop),
            ),
            Op::WriteFile(p, d) => {
                self.with_file(p, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, |fd| {
                    sys::write_all(fd, d).map(drop)
                })
            }
            Op::Append(p, d) => self.with_file(p, libc::O_WRONLY | libc::O_APPEND, |fd| {
                sys::write_all(fd, d).map(drop)
            }),
            Op::WriteAt(p, o, d) => {
                self.with_file(p, libc::O_WRONLY, |fd| sys::pwrite(fd, *o, d).map(drop))
            }
            Op::ReadFile(p) => value(
                sys::open(&self.p(p), libc::O_RDONLY, 0).and_then(|fd| sys::read_to_end(&fd)),
                Outcome::Data,
            ),
            Op::Truncate(p, l) => unit(sys::truncate(&self.p(p), *l)),
            Op::Stat(p) => value(sys::stat(&self.p(p)), |st| {
                Outcome::Meta(Meta::from_stat(&st))
            }),
            Op::Lstat(p) => value(sys::lstat(&self.p(p)), |st| {
                Outcome::Meta(Meta::from_stat(&st))
            }),
            Op::Chmod(p, m) => unit(sys::chmod(&self.p(p), *m)),
            Op::Chown(p, u, g) => unit(sys::lchown(&self.p(p), *u, *g)),
            Op::Utimens(p, a, m) => unit(sys::lutimens(&self.p(p), *a, *m)),
            Op::Mtime(p) => value(sys::lstat(&self.p(p)), |st| {
                Outcome::Time(TimeClass::new(st.st_mtime, st.st_mtime_nsec))
            }),
            Op::Atime(p) => value(sys::lstat(&self.p(p)), |st| {
                Outcome::Time(TimeClass::new(st.st_atime, st.st_atime_nsec))
            }),
            Op::Access(p, m) => unit(sys::access(&self.p(p), *m)),
            Op::Readlink(p) => value(sys::readlink(&self.p(p)), Outcome::Data),
            Op::Readdir(p) => value(self.readdir(p), Outcome::Entries),
            Op::Statfs(p) => value(sys::statfs(&self.p(p)), |s| {
                Outcome::Text(format!("namelen={}", s.f_namelen))
            }),
            Op::SetXattr(p, n, v, fl) => unit(sys::lsetxattr(&self.p(p), n, v, *fl)),
            Op::GetXattr(p, n) => value(sys::lgetxattr(&self.p(p), n), Outcome::Data),
            Op::ListXattr(p) => value(sys::llistxattr(&self.p(p)), Outcome::Names),
            Op::RemoveXattr(p, n) => unit(sys::lremovexattr(&self.p(p), n)),
            Op::Open(s, p, fl, m) => match sys::open(&self.p(p), *fl, *m) {
                Ok(fd) => {
                    self.fds.insert(*s, fd);
                    Outcome::Ok
                }
                Err(e) => Outcome::Err(e),
            },
            Op::Close(s) => match self.fds.remove(s) {
                Some(_) => Outcome::Ok,
                None => Outcome::Err(Errno::EBADF),
            },
            Op::Read(s) => value(self.with_fd(*s, sys::read_to_end), Outcome::Data),
            Op::Write(s, d) => value(self.with_fd(*s, |fd| sys::write_all(fd, d)), |n| {
                Outcome::Count(n as u64)
            }),
            Op::Pread(s, o, l) => {
                value(self.with_fd(*s, |fd| sys::pread(fd, *o, *l)), Outcome::Data)
            }
            Op::Pwrite(s, o, d) => value(self.with_fd(*s, |fd| sys::pwrite(fd, *o, d)), |n| {
                Outcome::Count(n as u64)
            }),
            Op::CopyRange(a, oa, z, oz, l) => value(
                self.with_fd(*a, |fin| {
                    self.with_fd(*z, |fout| sys::copy_file_range(fin, *oa, fout, *oz, *l))
                }),
                |n| Outcome::Count(n as u64),
            ),
            Op::Ftruncate(s, l) => unit(self.with_fd(*s, |fd| sys::ftruncate(fd, *l))),
            Op::Fallocate(s, m, o, l) => {
                unit(self.with_fd(*s, |fd| sys::fallocate(fd, *m, *o, *l)))
            }
            Op::Fsync(s) => unit(self.with_fd(*s, sys::fsync)),
            Op::Fdatasync(s) => unit(self.with_fd(*s, sys::fdatasync)),
            Op::Fstat(s) => value(self.with_fd(*s, sys::fstat), |st| {
                Outcome::Meta(Meta::from_stat(&st))
            }),
            Op::Fchmod(s, m) => unit(self.with_fd(*s, |fd| sys::fchmod(fd, *m))),
            Op::Flock(s, o) => unit(self.with_fd(*s, |fd| sys::flock(fd, *o))),
            Op::OfdLock(s, t, o, l) => unit(self.with_fd(*s, |fd| sys::ofd_setlk(fd, *t, *o, *l))),
            Op::OfdGetLock(s, t, o, l) => value(
                self.with_fd(*s, |fd| sys::ofd_getlk(fd, *t, *o, *l)),
                |(t, o, l)| Outcome::Text(format!("type={t} start={o} len={l}")),
            ),
            Op::MmapRead(s, o, l) => value(
                self.with_fd(*s, |fd| sys::mmap_read(fd, *o, *l)),
                Outcome::Data,
            ),
            Op::MmapWrite(s, o, d) => unit(self.with_fd(*s, |fd| sys::mmap_write(fd, *o, d))),
            Op::Ino(label, p) => match sys::lstat(&self.p(p)) {
                Ok(st) => {
                    self.labels.insert(
                        label.clone(),
                        Label {
                            ino: st.st_ino,
                            epoch: self.epoch,
                        },
                    );
                    Outcome::Ok
                }
                Err(e) => Outcome::Err(e),
            },
            Op::Fino(label, s) => match self.with_fd(*s, sys::fstat) {
                Ok(st) => {
                    self.labels.insert(
                        label.clone(),
                        Label {
                            ino: st.st_ino,
                            epoch: self.epoch,
                        },
                    );
                    Outcome::Ok
                }
                Err(e) => Outcome::Err(e),
            },
            Op::AsUser(uid, gid, op) => {
                let _as = sys::FsCreds::switch(*uid, *gid);
                self.apply(op)
            }
            Op::Checkpoint | Op::Remount | Op::Rotate | Op::Snapshot => {
                unreachable!("control ops are run by the scenario runner")
            }
        }
    }
}
