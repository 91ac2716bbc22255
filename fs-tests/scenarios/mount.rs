//! Mount forms, remounts and rotations.
//!
//! A remount must keep the view and the inode numbers. A rotation (unmount, the upper
//! becomes the top lower layer, new empty upper and work dir, mount) must keep the view;
//! inode numbers must stay stable wherever the kernel keeps them (checked automatically
//! by the runner around every rotation).

use crate::dsl::*;

fn lower() -> [Layer; 2] {
    [
        Layer::new()
            .file("a", "A")
            .file("d/top", "t")
            .file("links/x", "x")
            .hardlink("links/y", "links/x"),
        Layer::new()
            .file("b", "B")
            .file("d/bottom", "b")
            .file("gone", "g")
            .file("olddir/child", "c"),
    ]
}

fn sc(name: &str) -> Scenario {
    let [top, bottom] = lower();
    Scenario::new(name).lower(top).lower(bottom)
}

/// A mix of copy-ups, creations, deletions and renames.
fn churn() -> Vec<Op> {
    vec![
        append("a", "+a"),
        chmod("b", 0o600),
        write("new", "N"),
        mkdir("newdir"),
        write("newdir/f", "f"),
        unlink("gone"),
        unlink("olddir/child"),
        rmdir("olddir"),
        mkdir("olddir"),
        rename("d", "renamed"),
        append("links/x", "!"),
        link("a", "a_link"),
    ]
}

pub fn scenarios() -> Vec<Scenario> {
    vec![
        sc("helper_mount_basic").via_helper().ops([
            readdir(""),
            read("a"),
            write("n", "n"),
            rename("d", "e"),
            readdir("e"),
        ]),
        sc("helper_mount_churn").via_helper().ops(churn()),
        sc("helper_mount_remount")
            .via_helper()
            .ops(
                churn()
                    .into_iter()
                    .chain([remount(), readdir(""), read("renamed/bottom")]),
            ),
        sc("remount_keeps_view_and_inodes").ops(churn().into_iter().chain([
            ino("a", "a"),
            ino("new", "new"),
            ino("renamed", "renamed"),
            remount(),
            ino("a_re", "a"),
            ino("new_re", "new"),
            ino("renamed_re", "renamed"),
            readdir("renamed"),
            stat("a_link"),
        ])),
        sc("remount_twice").ops([
            write("x", "1"),
            remount(),
            append("x", "2"),
            remount(),
            read("x"),
        ]),
        sc("rotate_basic").ops([
            write("n1", "one"),
            append("a", "+"),
            rotate(),
            write("n2", "two"),
            append("a", "+"),
            read("n1"),
            rotate(),
            readdir(""),
            read("a"),
        ]),
        sc("rotate_after_churn").ops(churn().into_iter().chain([
            rotate(),
            readdir(""),
            readdir("renamed"),
            readdir("olddir"),
            read("a_link"),
            stat("links/y"),
        ])),
        // A link made in a layer rotated down, written through one name: after a remount
        // the merged link count must not depend on which name is looked up first (the
        // copy names the first lower object as its origin, whose own count is 1).
        sc("rotate_link_write_then_lookup_order").ops([
            link("a", "f"),
            rotate(),
            write("f", ""),
            remount(),
            stat("f"),
            stat("a"),
        ]),
        // Both names of a link made in a layer rotated down, each renamed in a later layer
        // (unionmount-testsuite rename-mass-5): after a remount, removing one name must
        // leave the other with its data and a link count of one.
        sc("rotate_links_renamed_in_later_layers").ops([
            link("a", "h"),
            rotate(),
            rename("h", "h2"),
            rotate(),
            rename("h2", "h3"),
            rename("a", "a2"),
            remount(),
            stat("a2"),
            stat("h3"),
            unlink("h3"),
            stat("a2"),
            read("a2"),
            remount(),
            stat("a2"),
            read("a2"),
        ]),
        sc("rotate_whiteouts_then_recreate").ops([
            unlink("b"),
            unlink("d/top"),
            rotate(),
            stat("b"),
            readdir("d"),
            write("b", "back"),
            write("d/top", "back"),
            rotate(),
            read("b"),
            readdir("d"),
        ]),
        sc("rotate_renamed_merged_dir").ops([
            rename("d", "m"),
            rotate(),
            readdir("m"),
            read("m/bottom"),
            append("m/top", "+"),
            rename("m", "d"),
            rotate(),
            readdir("d"),
            read("d/top"),
        ]),
        sc("rotate_opaque_dir").ops([
            unlink("olddir/child"),
            rmdir("olddir"),
            mkdir("olddir"),
            write("olddir/new", "n"),
            rotate(),
            readdir("olddir"),
            stat("olddir/child"),
            rmdir("olddir"),
            unlink("olddir/new"),
            rmdir("olddir"),
            readdir(""),
        ]),
        sc("rotate_hardlinks").ops([
            append("links/x", "1"),
            link("b", "b2"),
            rotate(),
            stat("links/x"),
            stat("links/y"),
            append("links/y", "2"),
            read("links/x"),
            stat("b2"),
            append("b", "3"),
            read("b2"),
        ]),
        sc("rotate_three_times_with_changes").ops([
            write("f", "1"),
            rotate(),
            append("f", "2"),
            mkdir("g"),
            rotate(),
            append("f", "3"),
            rename("g", "h"),
            write("h/x", "x"),
            rotate(),
            read("f"),
            readdir("h"),
            unlink("f"),
            readdir(""),
        ]),
        sc("helper_mount_rotate").via_helper().ops([
            append("a", "+"),
            rotate(),
            append("a", "+"),
            read("a"),
        ]),
    ]
}
