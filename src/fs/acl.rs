//! POSIX ACLs in their xattr form (`posix_acl_xattr_header`: a little-endian version 2, then
//! 8-byte entries of tag, perm, id): what new objects inherit, and the ids of ACL entries
//! mapped between layers and mount (`uidmapping=`). The kernel leaves the umask and a
//! directory's default ACL to a FUSE server that negotiates FUSE_POSIX_ACL with
//! FUSE_DONT_MASK; `inherit` does what kernel overlayfs and the upper's filesystem do at
//! create time (`posix_acl_create` and `posix_acl_create_masq` in fs/posix_acl.c).

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
    let parsed = parent_default.and_then(|d| Some((d, parse(d).filter(|e| !e.is_empty())?)));
    let Some((default, mut entries)) = parsed else {
        return Inherited {
            mode: mode & !(umask & 0o777),
            access: None,
            default: None,
        };
    };
    let (perm_bits, not_equiv) = create_masq(&mut entries, mode & 0o777);
    Inherited {
        mode: (mode & !0o777) | perm_bits,
        access: not_equiv.then(|| serialize(&entries)),
        default: is_dir.then(|| default.to_vec()),
    }
}

/// `value` (an ACL xattr) with the ids of its named entries mapped by `uid` and `gid` (the
/// id mappings between layers and mount); `None` if it does not parse, to be passed as it is.
pub fn map_ids(
    value: &[u8],
    uid: impl Fn(u32) -> u32,
    gid: impl Fn(u32) -> u32,
) -> Option<Vec<u8>> {
    let mut entries = parse(value)?;
    for e in &mut entries {
        match e.tag {
            USER => e.id = uid(e.id),
            GROUP => e.id = gid(e.id),
            _ => {}
        }
    }
    Some(serialize(&entries))
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

    /// An ACL with every kind of entry, naming `user` and `group`.
    fn with_named(user: u32, group: u32) -> Vec<u8> {
        acl(&[
            (USER_OBJ, 7, NO_ID),
            (USER, 6, user),
            (GROUP_OBJ, 5, NO_ID),
            (GROUP, 3, group),
            (MASK, 7, NO_ID),
            (OTHER, 1, NO_ID),
        ])
    }

    #[test]
    fn map_ids_maps_named_entries_only() {
        let mapped = map_ids(&with_named(1000, 2000), |u| u + 1, |g| g + 2).unwrap();
        assert_eq!(mapped, with_named(1001, 2002));
        assert_eq!(map_ids(b"junk", |u| u, |g| g), None);
    }

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

    /// Makes a directory `name` in `root` with default ACL `default`, creates an object of
    /// `perm` in it (a directory if `is_dir`) and compares what the kernel's filesystem gave
    /// it with `inherit`. `None`: this filesystem has no ACLs.
    fn kernel_agrees(
        root: &std::fs::File,
        name: &str,
        default: &[u8],
        perm: u32,
        is_dir: bool,
    ) -> Option<Result<(), String>> {
        use crate::sys;
        let pc = std::ffi::CString::new(name).unwrap();
        sys::mkdirat(root.as_fd(), &pc, 0o755).unwrap();
        if sys::setxattr(root.as_fd(), &pc, DEFAULT, default, 0) == Err(sys::Errno::EOPNOTSUPP) {
            return None;
        }
        let pfd = sys::openat(root.as_fd(), &pc, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
        let obj = c"o";
        let kind = if is_dir {
            sys::mkdirat(pfd.as_fd(), obj, perm).unwrap();
            libc::S_IFDIR
        } else {
            sys::mknodat(pfd.as_fd(), obj, libc::S_IFREG | perm, 0).unwrap();
            libc::S_IFREG
        };
        let st = sys::fstatat(pfd.as_fd(), obj).unwrap();
        let got = inherit(Some(default), kind | perm, 0o022, is_dir);
        let kernel = Inherited {
            mode: st.st_mode,
            access: sys::getxattr(pfd.as_fd(), obj, ACCESS).unwrap(),
            default: sys::getxattr(pfd.as_fd(), obj, DEFAULT).unwrap(),
        };
        Some(if got == kernel {
            Ok(())
        } else {
            Err(format!(
                "mode {perm:o}, dir {is_dir}: computed {got:?}, kernel {kernel:?}"
            ))
        })
    }

    /// The kernel is the oracle: objects made by the upper's filesystem in a directory with
    /// a default ACL get the mode and access ACL `inherit` computes, for every permission
    /// mode and a few ACLs (a default ACL makes the kernel ignore the umask).
    #[test]
    fn inherit_matches_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::File::open(dir.path()).unwrap();
        let defaults = [
            with_named(1000, 2000),
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
            for perm in 0..=0o777u32 {
                for is_dir in [false, true] {
                    let name = format!("p{n}-{perm:o}-{is_dir}");
                    match kernel_agrees(&root, &name, d, perm, is_dir) {
                        None => return eprintln!("no ACLs on {}: skipped", dir.path().display()),
                        Some(r) => r.unwrap(),
                    }
                }
            }
        }
    }

    /// Any valid default ACL (named entries in id order, a mask whenever there are any) and
    /// any mode, set-ID and sticky bits included: `inherit` agrees with the kernel.
    #[test]
    fn inherit_matches_the_kernel_for_any_acl() {
        use proptest::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::File::open(dir.path()).unwrap();
        let case = std::cell::Cell::new(0u32);
        let named = || proptest::collection::btree_map(1000u32..1010, 0u16..8, 0..3);
        let strategy = (
            (0u16..8, 0u16..8, 0u16..8, proptest::option::of(0u16..8)),
            (named(), named()),
            (0u32..=0o7777, any::<bool>()),
        );
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(400));
        runner
            .run(
                &strategy,
                |((uo, go, o, mask), (users, groups), (perm, is_dir))| {
                    let mut e = vec![(USER_OBJ, uo, NO_ID)];
                    e.extend(users.iter().map(|(&id, &p)| (USER, p, id)));
                    e.push((GROUP_OBJ, go, NO_ID));
                    e.extend(groups.iter().map(|(&id, &p)| (GROUP, p, id)));
                    let needs_mask = !users.is_empty() || !groups.is_empty();
                    if let Some(m) = mask.or(needs_mask.then_some(7)) {
                        e.push((MASK, m, NO_ID));
                    }
                    e.push((OTHER, o, NO_ID));
                    // mkdir keeps only the permission and sticky bits.
                    let perm = if is_dir { perm & 0o1777 } else { perm };
                    case.set(case.get() + 1);
                    match kernel_agrees(&root, &format!("c{}", case.get()), &acl(&e), perm, is_dir)
                    {
                        None => Ok(()),
                        Some(r) => r.map_err(|m| TestCaseError::fail(format!("{e:?}: {m}"))),
                    }
                },
            )
            .unwrap();
    }
}
