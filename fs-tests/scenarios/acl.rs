//! POSIX ACLs: permission checks that follow the ACLs of lower and upper objects (and their
//! changes: setfacl, chmod's mask update, removal), default ACLs inherited by new objects
//! (also over a whiteout, where the object is built in the work dir), the umask they replace,
//! and set-group-ID cleared by an access ACL set from outside the file's group.

use crate::dsl::*;

const ACCESS: &str = "system.posix_acl_access";
const DEFAULT: &str = "system.posix_acl_default";

/// User 1000 reaches `f` (root's, 0600) and `d` (root's, 0700) only through named entries;
/// `shared` is a directory whose default ACL new objects inherit; `g2` is user 1000's file in
/// group 2000 with set-group-ID.
fn lower() -> Layer {
    Layer::new()
        .file("f", "secret")
        .mode("f", 0o600)
        .xattr("f", ACCESS, acl("u::rw,u:1000:rw,g::-,m::rw,o::-"))
        .file("d/g", "inside")
        .mode("d", 0o700)
        .xattr("d", ACCESS, acl("u::rwx,u:1000:rx,g::-,m::rx,o::-"))
        .file("shared/old", "old")
        .dir("shared/olddir")
        .file("shared/olddir/x", "x")
        .xattr(
            "shared",
            DEFAULT,
            acl("u::rwx,u:1000:rwx,g::rx,g:2000:r,m::rwx,o::-"),
        )
        .file("plain", "plain")
        .mode("plain", 0o600)
        .file("g2", "setgid")
        .owner("g2", 1000, 2000)
}

const U: u32 = 1000;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("named_entries_grant_access")
            .lower(lower())
            .ops([
                as_user(U, U, read("f")),
                as_user(2000, 2000, read("f")),
                as_user(U, U, write_at("f", 0, "S")),
                as_user(U, U, readdir("d")),
                as_user(U, U, read("d/g")),
                as_user(U, U, create("d/new", 0o644)),
                as_user(2000, 2000, readdir("d")),
                read("f"),
            ]),
        Scenario::new("setfacl_and_removal_change_access")
            .lower(lower())
            .ops([
                as_user(U, U, read("plain")),
                setxattr("plain", ACCESS, acl("u::rw,u:1000:r,g::-,m::r,o::-")),
                stat("plain"),
                as_user(U, U, read("plain")),
                as_user(U, U, write_at("plain", 0, "P")),
                getxattr("plain", ACCESS),
                removexattr("f", ACCESS),
                stat("f"),
                as_user(U, U, read("f")),
                setxattr("d", ACCESS, acl("u::rwx,u:1000:rwx,g::-,m::rwx,o::-")),
                as_user(U, U, create("d/mine", 0o600)),
                lstat("d/mine"),
            ]),
        Scenario::new("chmod_masks_named_entries")
            .lower(lower())
            .ops([
                as_user(U, U, read("f")),
                chmod("f", 0o600),
                getxattr("f", ACCESS),
                as_user(U, U, read("f")),
                chmod("f", 0o640),
                getxattr("f", ACCESS),
                as_user(U, U, read("f")),
                as_user(U, U, write_at("f", 0, "W")),
            ]),
        Scenario::new("default_acl_is_inherited")
            .lower(lower())
            .ops([
                create("shared/file", 0o666),
                stat("shared/file"),
                getxattr("shared/file", ACCESS),
                mkdir_mode("shared/sub", 0o777),
                stat("shared/sub"),
                getxattr("shared/sub", ACCESS),
                getxattr("shared/sub", DEFAULT),
                create("shared/sub/deeper", 0o640),
                stat("shared/sub/deeper"),
                mkfifo("shared/fifo"),
                stat("shared/fifo"),
                symlink("old", "shared/link"),
                lstat("shared/link"),
                as_user(U, U, write("shared/byuser", "u")),
                stat("shared/byuser"),
                // Outside the directory the umask applies as before.
                create("outside", 0o666),
                stat("outside"),
            ]),
        Scenario::new("default_acl_over_a_whiteout")
            .lower(lower())
            .ops([
                unlink("shared/old"),
                create("shared/old", 0o666),
                stat("shared/old"),
                getxattr("shared/old", ACCESS),
                unlink("shared/olddir/x"),
                rmdir("shared/olddir"),
                mkdir_mode("shared/olddir", 0o755),
                stat("shared/olddir"),
                getxattr("shared/olddir", ACCESS),
                getxattr("shared/olddir", DEFAULT),
                readdir("shared/olddir"),
            ]),
        // ACLs follow their objects through copy-up of hard links, renames of directories
        // (a redirect) and a rename over a lower file.
        Scenario::new("acls_through_links_and_renames")
            .lower(lower().hardlink("f2", "f").file("shared/sub/x", "x"))
            .ops([
                chmod("f2", 0o640),
                getxattr("f", ACCESS),
                as_user(U, U, read("f")),
                as_user(U, U, write_at("f", 0, "W")),
                rename("shared", "moved"),
                create("moved/new", 0o666),
                stat("moved/new"),
                getxattr("moved/new", ACCESS),
                getxattr("moved/sub", DEFAULT),
                rename("moved/new", "moved/sub/x"),
                getxattr("moved/sub/x", ACCESS),
                mkdir_mode("moved/sub/deeper", 0o777),
                stat("moved/sub/deeper"),
                getxattr("moved/sub/deeper", DEFAULT),
            ]),
        Scenario::new("access_acl_from_outside_the_group_clears_set_group_id")
            .lower(lower())
            .ops([
                // The layer's chown to 1000:2000 cleared the bit: set it again.
                chmod("g2", 0o2770),
                as_user(U, U, setxattr("g2", ACCESS, acl("u::rwx,g::rx,o::-"))),
                stat("g2"),
                chmod("g2", 0o2770),
                // In the group: the bit stays.
                as_user(U, 2000, setxattr("g2", ACCESS, acl("u::rw,g::r,o::-"))),
                stat("g2"),
                // Root may keep it.
                chmod("g2", 0o2770),
                setxattr("g2", ACCESS, acl("u::rw,g::-,o::-")),
                stat("g2"),
            ]),
    ]
}
