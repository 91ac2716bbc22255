//! Hard links (across copy-up: kernel index=on semantics) and symlinks (never followed
//! inside a layer; resolved by the VFS in the merged view).

use crate::dsl::*;

fn hardlinked() -> Layer {
    Layer::new()
        .file("a", "shared")
        .hardlink("b", "a")
        .hardlink("d/c", "a")
        .file("solo", "solo")
}

pub fn hardlinks() -> Vec<Scenario> {
    vec![
        Scenario::new("lower_hardlinks_share_ino")
            .lower(hardlinked())
            .ops([
                ino("a", "a"),
                ino("b", "b"),
                ino("c", "d/c"),
                ino("solo", "solo"),
                stat("a"),
                stat("d/c"),
            ]),
        Scenario::new("link_to_lower_file")
            .lower(hardlinked())
            .ops([
                ino("solo", "solo"),
                link("solo", "solo2"),
                ino("solo2", "solo2"),
                stat("solo"),
                stat("solo2"),
                read("solo2"),
                readdir(""),
            ]),
        Scenario::new("write_via_one_name_visible_via_other")
            .lower(hardlinked())
            .ops([
                ino("a", "a"),
                append("a", "+more"),
                read("b"),
                read("d/c"),
                stat("b"),
                ino("a_after", "a"),
                ino("b_after", "b"),
                ino("c_after", "d/c"),
            ]),
        Scenario::new("nlink_after_copy_up")
            .lower(hardlinked())
            .ops([
                chmod("b", 0o600),
                stat("a"),
                stat("b"),
                stat("d/c"),
                chown("d/c", 9, 9),
                stat("a"),
            ]),
        Scenario::new("unlink_one_lower_link")
            .lower(hardlinked())
            .ops([
                unlink("a"),
                stat("b"),
                read("b"),
                unlink("b"),
                stat("d/c"),
                append("d/c", "!"),
                read("d/c"),
            ]),
        Scenario::new("link_then_write_new_link")
            .lower(hardlinked())
            .ops([
                link("solo", "d/solo_link"),
                write_at("d/solo_link", 0, "S"),
                read("solo"),
                stat("solo"),
                ino("x", "solo"),
                ino("y", "d/solo_link"),
            ]),
        Scenario::new("link_to_upper_file")
            .lower(hardlinked())
            .ops([
                write("n", "n"),
                link("n", "n2"),
                stat("n"),
                append("n2", "2"),
                read("n"),
                unlink("n"),
                stat("n2"),
            ]),
        // A directory holding names of a lower hard link moves (a redirect) before the
        // file is written through a name outside it, and the other way round.
        Scenario::new("write_after_moving_a_dir_with_a_link")
            .lower(hardlinked())
            .ops([
                ino("c", "d/c"),
                rename("d", "moved"),
                append("a", "+a"),
                read("moved/c"),
                stat("moved/c"),
                ino("c_after", "moved/c"),
                rename("moved", "d"),
                append("d/c", "+c"),
                read("b"),
                stat("b"),
                unlink("d/c"),
                stat("a"),
            ]),
        Scenario::new("link_errors").lower(hardlinked()).ops([
            link("d", "d2"),
            link("a", "b"),
            link("missing", "x"),
            link("a", "missing_dir/x"),
        ]),
        Scenario::new("link_to_lower_symlink")
            .lower(Layer::new().symlink("l", "target").file("target", "t"))
            .ops([
                link("l", "l2"),
                lstat("l2"),
                readlink("l2"),
                read("l2"),
                ino("l", "l"),
                ino("l2", "l2"),
            ]),
        Scenario::new("hardlinks_survive_remount")
            .lower(hardlinked())
            .ops([
                append("a", "1"),
                link("solo", "solo2"),
                ino("a", "a"),
                ino("solo", "solo"),
                remount(),
                ino("a_re", "a"),
                ino("b_re", "b"),
                ino("solo_re", "solo"),
                ino("solo2_re", "solo2"),
                stat("b"),
                read("b"),
            ]),
    ]
}

pub fn symlinks() -> Vec<Scenario> {
    vec![
        Scenario::new("create_symlink")
            .lower(Layer::new().file("f", "f"))
            .ops([
                symlink("f", "l"),
                readlink("l"),
                lstat("l"),
                read("l"),
                symlink("nowhere", "dangling"),
                stat("dangling"),
                lstat("dangling"),
                readdir(""),
            ]),
        Scenario::new("readlink_lower")
            .lower(
                Layer::new()
                    .symlink("rel", "../x/y")
                    .symlink("abs", "/abs/path")
                    .symlink("long", &"z".repeat(200)),
            )
            .ops([
                readlink("rel"),
                readlink("abs"),
                readlink("long"),
                lstat("long"),
            ]),
        Scenario::new("relative_symlink_resolves_in_merged_view")
            .lower(Layer::new().symlink("a/up", "../b").file("a/own", "own"))
            .lower(Layer::new().file("b/file", "from bottom b"))
            .ops([
                read("a/up/file"),
                readdir("a/up"),
                stat("a/up"),
                write("a/up/new", "n"),
                readdir("b"),
            ]),
        Scenario::new("absolute_symlink_goes_to_host_path")
            .lower(
                Layer::new()
                    .symlink("null", "/dev/null")
                    .symlink("esc", "../../../../../../../../.."),
            )
            .ops([
                readlink("null"),
                stat("null"),
                readlink("esc"),
                stat("esc"),
                lstat("esc"),
            ]),
        Scenario::new("lchown_symlink_copies_up_link_not_target")
            .lower(
                Layer::new()
                    .symlink("dir/ln", "../target")
                    .file("target", "t")
                    .owner("target", 5, 5),
            )
            .ops([
                chown("dir/ln", 1000, 1000),
                lstat("dir/ln"),
                stat("target"),
                readlink("dir/ln"),
                setxattr("dir/ln", "trusted.mark", "m"),
                listxattr("dir/ln"),
                listxattr("target"),
                setxattr("dir/ln", "user.nope", "x"),
            ]),
        Scenario::new("symlink_over_whiteout")
            .lower(Layer::new().file("a", "a"))
            .ops([
                unlink("a"),
                symlink("elsewhere", "a"),
                readlink("a"),
                lstat("a"),
            ]),
        Scenario::new("nofollow_and_chains")
            .lower(
                Layer::new()
                    .symlink("l1", "l2")
                    .symlink("l2", "f")
                    .file("f", "end")
                    .symlink("loop", "loop"),
            )
            .ops([
                read("l1"),
                open(1, "l1", O_RDONLY | O_NOFOLLOW),
                stat("loop"),
                open(2, "l1", O_RDONLY | O_PATH | O_NOFOLLOW),
                fstat(2),
                close(2),
            ]),
        Scenario::new("o_creat_through_dangling_symlink")
            .lower(Layer::new().symlink("dl", "created_by_open").dir("d"))
            .ops([
                open(1, "dl", O_WRONLY | O_CREAT),
                fwrite(1, "via link"),
                close(1),
                read("created_by_open"),
                lstat("dl"),
            ]),
    ]
}
