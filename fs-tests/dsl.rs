//! The vocabulary scenarios are written in: short constructors for every [`Op`], plus the
//! builder types. Scenario modules `use crate::dsl::*;` and read like a list of calls.

pub use crate::layer::{Layer, pattern};
pub use crate::ops::{Op, Slot};
pub use crate::scenario::Scenario;

pub use libc::{
    F_RDLCK, F_UNLCK, F_WRLCK, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, LOCK_EX, LOCK_NB,
    LOCK_SH, LOCK_UN, O_APPEND, O_CREAT, O_DIRECTORY, O_EXCL, O_NOFOLLOW, O_PATH, O_RDONLY, O_RDWR,
    O_TRUNC, O_WRONLY, R_OK, RENAME_EXCHANGE, RENAME_NOREPLACE, S_IFCHR, W_OK, X_OK,
};

/// `F_RDLCK` etc. are `c_int` in libc but `short` in `struct flock`.
pub const RDLCK: i16 = F_RDLCK as i16;
pub const WRLCK: i16 = F_WRLCK as i16;
pub const UNLCK: i16 = F_UNLCK as i16;

fn s(p: &str) -> String {
    p.to_string()
}

pub fn mkdir(p: &str) -> Op {
    Op::Mkdir(s(p), 0o755)
}
pub fn mkdir_mode(p: &str, mode: u32) -> Op {
    Op::Mkdir(s(p), mode)
}
pub fn rmdir(p: &str) -> Op {
    Op::Rmdir(s(p))
}
pub fn unlink(p: &str) -> Op {
    Op::Unlink(s(p))
}
pub fn symlink(target: &str, link: &str) -> Op {
    Op::Symlink(s(target), s(link))
}
pub fn link(existing: &str, new: &str) -> Op {
    Op::Link(s(existing), s(new))
}
pub fn rename(from: &str, to: &str) -> Op {
    Op::Rename(s(from), s(to), 0)
}
pub fn rename_noreplace(from: &str, to: &str) -> Op {
    Op::Rename(s(from), s(to), RENAME_NOREPLACE)
}
pub fn exchange(a: &str, b: &str) -> Op {
    Op::Rename(s(a), s(b), RENAME_EXCHANGE)
}
pub fn renameat2(from: &str, to: &str, flags: u32) -> Op {
    Op::Rename(s(from), s(to), flags)
}
/// `mknod(path, mode, makedev(major, minor))`; `mode` includes the `S_IFxxx` type bits.
pub fn mknod(p: &str, mode: u32, major: u32, minor: u32) -> Op {
    Op::Mknod(s(p), mode, (major, minor))
}
pub fn mkfifo(p: &str) -> Op {
    Op::Mknod(s(p), libc::S_IFIFO | 0o644, (0, 0))
}
pub fn mksock(p: &str) -> Op {
    Op::Mknod(s(p), libc::S_IFSOCK | 0o755, (0, 0))
}
pub fn mkchr(p: &str, major: u32, minor: u32) -> Op {
    Op::Mknod(s(p), libc::S_IFCHR | 0o600, (major, minor))
}
pub fn mkblk(p: &str, major: u32, minor: u32) -> Op {
    Op::Mknod(s(p), libc::S_IFBLK | 0o600, (major, minor))
}
pub fn create(p: &str, mode: u32) -> Op {
    Op::Create(s(p), mode)
}
pub fn write(p: &str, data: impl AsRef<[u8]>) -> Op {
    Op::WriteFile(s(p), data.as_ref().to_vec())
}
pub fn append(p: &str, data: impl AsRef<[u8]>) -> Op {
    Op::Append(s(p), data.as_ref().to_vec())
}
pub fn write_at(p: &str, off: u64, data: impl AsRef<[u8]>) -> Op {
    Op::WriteAt(s(p), off, data.as_ref().to_vec())
}
pub fn read(p: &str) -> Op {
    Op::ReadFile(s(p))
}
pub fn truncate(p: &str, len: u64) -> Op {
    Op::Truncate(s(p), len)
}
pub fn stat(p: &str) -> Op {
    Op::Stat(s(p))
}
pub fn lstat(p: &str) -> Op {
    Op::Lstat(s(p))
}
pub fn chmod(p: &str, mode: u32) -> Op {
    Op::Chmod(s(p), mode)
}
/// `op` as an unprivileged process with these ids would make it.
pub fn as_user(uid: u32, gid: u32, op: Op) -> Op {
    Op::AsUser(uid, gid, Box::new(op))
}
pub fn chown(p: &str, uid: u32, gid: u32) -> Op {
    Op::Chown(s(p), uid, gid)
}
/// utimens with whole seconds (atime, mtime); keep them below 1.5e9 so they count as fixed.
pub fn utimens(p: &str, atime: i64, mtime: i64) -> Op {
    Op::Utimens(s(p), (atime, 0), (mtime, 0))
}
pub fn utimens_ns(p: &str, atime: (i64, i64), mtime: (i64, i64)) -> Op {
    Op::Utimens(s(p), atime, mtime)
}
pub fn mtime(p: &str) -> Op {
    Op::Mtime(s(p))
}
pub fn atime(p: &str) -> Op {
    Op::Atime(s(p))
}
pub fn access(p: &str, mode: i32) -> Op {
    Op::Access(s(p), mode)
}
pub fn readlink(p: &str) -> Op {
    Op::Readlink(s(p))
}
pub fn readdir(p: &str) -> Op {
    Op::Readdir(s(p))
}
pub fn statfs(p: &str) -> Op {
    Op::Statfs(s(p))
}
pub fn setxattr(p: &str, name: &str, value: impl AsRef<[u8]>) -> Op {
    Op::SetXattr(s(p), s(name), value.as_ref().to_vec(), 0)
}
pub fn setxattr_flags(p: &str, name: &str, value: impl AsRef<[u8]>, flags: i32) -> Op {
    Op::SetXattr(s(p), s(name), value.as_ref().to_vec(), flags)
}
pub fn getxattr(p: &str, name: &str) -> Op {
    Op::GetXattr(s(p), s(name))
}
pub fn listxattr(p: &str) -> Op {
    Op::ListXattr(s(p))
}
pub fn removexattr(p: &str, name: &str) -> Op {
    Op::RemoveXattr(s(p), s(name))
}
pub fn open(slot: Slot, p: &str, flags: i32) -> Op {
    Op::Open(slot, s(p), flags, 0o644)
}
pub fn open_mode(slot: Slot, p: &str, flags: i32, mode: u32) -> Op {
    Op::Open(slot, s(p), flags, mode)
}
pub fn close(slot: Slot) -> Op {
    Op::Close(slot)
}
pub fn fread(slot: Slot) -> Op {
    Op::Read(slot)
}
pub fn fwrite(slot: Slot, data: impl AsRef<[u8]>) -> Op {
    Op::Write(slot, data.as_ref().to_vec())
}
pub fn pread(slot: Slot, off: u64, len: usize) -> Op {
    Op::Pread(slot, off, len)
}
pub fn pwrite(slot: Slot, off: u64, data: impl AsRef<[u8]>) -> Op {
    Op::Pwrite(slot, off, data.as_ref().to_vec())
}
pub fn copy_range(from: Slot, off_in: u64, to: Slot, off_out: u64, len: usize) -> Op {
    Op::CopyRange(from, off_in, to, off_out, len)
}
pub fn ftruncate(slot: Slot, len: u64) -> Op {
    Op::Ftruncate(slot, len)
}
pub fn fallocate(slot: Slot, mode: i32, off: u64, len: u64) -> Op {
    Op::Fallocate(slot, mode, off, len)
}
pub fn fsync(slot: Slot) -> Op {
    Op::Fsync(slot)
}
pub fn fdatasync(slot: Slot) -> Op {
    Op::Fdatasync(slot)
}
pub fn fstat(slot: Slot) -> Op {
    Op::Fstat(slot)
}
pub fn fchmod(slot: Slot, mode: u32) -> Op {
    Op::Fchmod(slot, mode)
}
pub fn flock(slot: Slot, op: i32) -> Op {
    Op::Flock(slot, op)
}
pub fn ofd_lock(slot: Slot, kind: i16, start: u64, len: u64) -> Op {
    Op::OfdLock(slot, kind, start, len)
}
pub fn ofd_getlk(slot: Slot, kind: i16, start: u64, len: u64) -> Op {
    Op::OfdGetLock(slot, kind, start, len)
}
pub fn mmap_read(slot: Slot, off: u64, len: usize) -> Op {
    Op::MmapRead(slot, off, len)
}
pub fn mmap_write(slot: Slot, off: u64, data: impl AsRef<[u8]>) -> Op {
    Op::MmapWrite(slot, off, data.as_ref().to_vec())
}
pub fn ino(label: &str, p: &str) -> Op {
    Op::Ino(s(label), s(p))
}
pub fn fino(label: &str, slot: Slot) -> Op {
    Op::Fino(s(label), slot)
}
pub fn checkpoint() -> Op {
    Op::Checkpoint
}
pub fn remount() -> Op {
    Op::Remount
}
pub fn rotate() -> Op {
    Op::Rotate
}

/// The xattr form (`system.posix_acl_access` / `system.posix_acl_default`) of a POSIX ACL
/// written as `setfacl` short text, entries in canonical order: `"u::rw,u:1000:r,g::-,m::rw,o::-"`.
pub fn acl(text: &str) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for entry in text.split(',') {
        let mut parts = entry.split(':');
        let (tag, id, perms) = match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(i), Some(p)) => (t, i, p),
            _ => panic!("ACL entry {entry:?} is not tag:id:perms"),
        };
        let tag: u16 = match (tag, id.is_empty()) {
            ("u", true) => 0x01,
            ("u", false) => 0x02,
            ("g", true) => 0x04,
            ("g", false) => 0x08,
            ("m", true) => 0x10,
            ("o", true) => 0x20,
            _ => panic!("ACL entry {entry:?}: unknown tag"),
        };
        let perm = perms.chars().fold(0u16, |p, c| match c {
            'r' => p | 4,
            'w' => p | 2,
            'x' => p | 1,
            '-' => p,
            _ => panic!("ACL entry {entry:?}: bad permission {c:?}"),
        });
        let id = if id.is_empty() {
            u32::MAX
        } else {
            id.parse().expect("numeric id")
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}
