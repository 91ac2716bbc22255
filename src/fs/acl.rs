//! POSIX ACLs of new objects. The kernel leaves the umask and a directory's default ACL to a
//! FUSE server that negotiates FUSE_POSIX_ACL with FUSE_DONT_MASK: this is what kernel
//! overlayfs and the upper's filesystem do at create time (`posix_acl_create` and
//! `posix_acl_create_masq` in fs/posix_acl.c), on the xattr form of an ACL
//! (`posix_acl_xattr_header`: a little-endian version 2, then 8-byte entries of tag, perm,
//! id).

use std::ffi::CStr;

pub const ACCESS: &CStr = c"system.posix_acl_access";
pub const DEFAULT: &CStr = c"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// Whether `key` names one of the two ACL xattrs.
pub fn is_acl_key(key: &CStr) -> bool {
    key == ACCESS || key == DEFAULT
}

/// What a new object gets from its parent's default ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inherited {
    /// The mode to create it with (type bits kept).
    pub mode: u32,
    /// Its access ACL, when the mode alone cannot say it (named entries or a mask).
    pub access: Option<Vec<u8>>,
    /// Its default ACL (directories only): the parent's.
    pub default: Option<Vec<u8>>,
}

/// The mode and ACLs of a new object (not a symlink: those have neither) of `mode` made by a
/// caller with `umask` in a directory whose default ACL is `parent_default` (its xattr value,
/// if it has one). Without a default ACL the umask applies; with one the umask is ignored and
/// the ACL masks the mode. Bits other than the permissions are kept. A default ACL that does
/// not parse is treated as absent (the upper's filesystem would not have stored it).
pub fn inherit(parent_default: Option<&[u8]>, mode: u32, umask: u32, is_dir: bool) -> Inherited {
    let Some(default) = parent_default.filter(|d| parse(d).is_some_and(|e| !e.is_empty())) else {
        return Inherited {
            mode: mode & !(umask & 0o777),
            access: None,
            default: None,
        };
    };
    let mut entries = parse(default).expect("checked above");
    let (perm_bits, not_equiv) = create_masq(&mut entries, mode & 0o777);
    Inherited {
        mode: (mode & !0o777) | perm_bits,
        access: not_equiv.then(|| serialize(&entries)),
        default: is_dir.then(|| default.to_vec()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

fn parse(value: &[u8]) -> Option<Vec<Entry>> {
    let (header, body) = value.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*header) != VERSION || body.len() % 8 != 0 {
        return None;
    }
    let entries: Vec<Entry> = body
        .chunks_exact(8)
        .map(|c| Entry {
            tag: u16::from_le_bytes([c[0], c[1]]),
            perm: u16::from_le_bytes([c[2], c[3]]),
            id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    let known = USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER;
    entries
        .iter()
        .all(|e| e.tag & known == e.tag && e.tag.count_ones() == 1)
        .then_some(entries)
}

fn serialize(entries: &[Entry]) -> Vec<u8> {
    let mut out = VERSION.to_le_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.to_le_bytes());
    }
    out
}

/// `posix_acl_create_masq`: masks the ACL's entries with the requested permission bits and
/// the bits with the ACL. Returns the resulting bits and whether the ACL says more than they
/// do.
fn create_masq(entries: &mut [Entry], mut mode: u32) -> (u32, bool) {
    let mut not_equiv = false;
    let mut group_obj = None;
    let mut mask_obj = None;
    for (i, e) in entries.iter_mut().enumerate() {
        match e.tag {
            USER_OBJ => {
                e.perm &= ((mode >> 6) & 7) as u16;
                mode &= ((e.perm as u32) << 6) | !0o700;
            }
            USER | GROUP => not_equiv = true,
            GROUP_OBJ => group_obj = Some(i),
            OTHER => {
                e.perm &= (mode & 7) as u16;
                mode &= (e.perm as u32) | !0o007;
            }
            MASK => {
                mask_obj = Some(i);
                not_equiv = true;
            }
            _ => {}
        }
    }
    if let Some(i) = mask_obj.or(group_obj) {
        let e = &mut entries[i];
        e.perm &= ((mode >> 3) & 7) as u16;
        mode &= ((e.perm as u32) << 3) | !0o070;
    }
    (mode & 0o777, not_equiv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        serialize(
            &entries
                .iter()
                .map(|&(tag, perm, id)| Entry { tag, perm, id })
                .collect::<Vec<_>>(),
        )
    }

    const NO_ID: u32 = u32::MAX;

    #[test]
    fn without_a_default_acl_the_umask_applies() {
        let got = inherit(None, libc::S_IFREG | 0o4666, 0o022, false);
        assert_eq!(got.mode, libc::S_IFREG | 0o4644);
        assert_eq!((got.access, got.default), (None, None));
        let got = inherit(None, 0o777, 0o077, true);
        assert_eq!((got.mode, got.default), (0o700, None));
    }

    #[test]
    fn a_minimal_default_acl_masks_the_mode_and_ignores_the_umask() {
        let d = acl(&[
            (USER_OBJ, 7, NO_ID),
            (GROUP_OBJ, 5, NO_ID),
            (OTHER, 0, NO_ID),
        ]);
        let got = inherit(Some(&d), libc::S_IFREG | 0o666, 0o077, false);
        assert_eq!(got.mode, libc::S_IFREG | 0o640);
        assert_eq!(got.access, None, "equivalent to the mode: no access ACL");
        let got = inherit(Some(&d), libc::S_IFDIR | 0o777, 0o077, true);
        assert_eq!(got.mode, libc::S_IFDIR | 0o750);
        assert_eq!(got.default.as_deref(), Some(&d[..]));
    }

    /// The kernel is the oracle: objects made by the upper's filesystem in a directory with
    /// a default ACL get the mode and access ACL `inherit` computes, for every permission
    /// mode and a few ACLs (this process's umask is 0 in the daemon; here it is whatever the
    /// test runner has, and a default ACL makes the kernel ignore it).
    #[test]
    fn inherit_matches_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::File::open(dir.path()).unwrap();
        let defaults = [
            acl(&[
                (USER_OBJ, 7, NO_ID),
                (USER, 6, 1000),
                (GROUP_OBJ, 5, NO_ID),
                (GROUP, 3, 2000),
                (MASK, 7, NO_ID),
                (OTHER, 1, NO_ID),
            ]),
            acl(&[
                (USER_OBJ, 6, NO_ID),
                (USER, 7, 1000),
                (GROUP_OBJ, 0, NO_ID),
                (MASK, 5, NO_ID),
                (OTHER, 4, NO_ID),
            ]),
            acl(&[
                (USER_OBJ, 5, NO_ID),
                (GROUP_OBJ, 3, NO_ID),
                (OTHER, 6, NO_ID),
            ]),
        ];
        for (n, d) in defaults.iter().enumerate() {
            let parent = format!("p{n}");
            std::fs::create_dir(dir.path().join(&parent)).unwrap();
            let pc = std::ffi::CString::new(parent.clone()).unwrap();
            if crate::sys::setxattr(root.as_fd(), &pc, DEFAULT, d, 0)
                == Err(crate::sys::Errno::EOPNOTSUPP)
            {
                eprintln!("no ACLs on {}: skipped", dir.path().display());
                return;
            }
            let pfd = std::fs::File::open(dir.path().join(&parent)).unwrap();
            for perm in 0..=0o777u32 {
                for (kind, is_dir) in [(libc::S_IFREG, false), (libc::S_IFDIR, true)] {
                    let name = std::ffi::CString::new(format!("{perm:o}{is_dir}")).unwrap();
                    if is_dir {
                        crate::sys::mkdirat(pfd.as_fd(), &name, perm).unwrap();
                    } else {
                        crate::sys::mknodat(pfd.as_fd(), &name, kind | perm, 0).unwrap();
                    }
                    let st = crate::sys::fstatat(pfd.as_fd(), &name).unwrap();
                    let got = inherit(Some(d), kind | perm, 0o022, is_dir);
                    assert_eq!(got.mode, st.st_mode, "acl {n}, mode {perm:o}, dir {is_dir}");
                    let access = crate::sys::getxattr(pfd.as_fd(), &name, ACCESS).unwrap();
                    assert_eq!(got.access, access, "acl {n}, mode {perm:o}, dir {is_dir}");
                    let default = crate::sys::getxattr(pfd.as_fd(), &name, DEFAULT).unwrap();
                    assert_eq!(got.default, default, "acl {n}, mode {perm:o}, dir {is_dir}");
                }
            }
        }
    }
}
