//! Whiteouts: deleting lower entries, recreating them, whiteouts inside lower layers
//! (character-device and xattr whiteouts).

use crate::dsl::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("delete_lower_file")
            .lower(Layer::new().file("a", "A").file("b", "B"))
            .ops([
                unlink("a"),
                stat("a"),
                read("a"),
                readdir(""),
                unlink("a"),
                read("b"),
            ]),
        Scenario::new("delete_file_present_in_two_lowers")
            .lower(Layer::new().file("a", "top"))
            .lower(Layer::new().file("a", "bottom"))
            .ops([unlink("a"), stat("a"), readdir("")]),
        Scenario::new("delete_lower_empty_dir")
            .lower(Layer::new().dir("d").dir("e"))
            .ops([rmdir("d"), stat("d"), readdir(""), rmdir("d")]),
        Scenario::new("recreate_file_after_delete")
            .lower(Layer::new().file("a", "old").xattr("a", "user.old", "1"))
            .ops([
                unlink("a"),
                write("a", "new"),
                read("a"),
                stat("a"),
                listxattr("a"),
                readdir(""),
            ]),
        Scenario::new("recreate_as_dir_after_delete_file")
            .lower(Layer::new().file("a", "file"))
            .ops([
                unlink("a"),
                mkdir("a"),
                stat("a"),
                readdir("a"),
                write("a/f", "f"),
            ]),
        Scenario::new("recreate_as_file_after_delete_dir")
            .lower(Layer::new().dir("d"))
            .lower(Layer::new().file("d/deep", "x"))
            .ops([
                unlink("d/deep"),
                rmdir("d"),
                write("d", "now a file"),
                stat("d"),
                read("d"),
                stat("d/deep"),
            ]),
        Scenario::new("delete_merged_dir_recursively")
            .lower(Layer::new().file("d/x", "x").file("d/sub/y", "y"))
            .lower(Layer::new().file("d/z", "z").file("d/sub/w", "w"))
            .ops([
                unlink("d/x"),
                unlink("d/z"),
                unlink("d/sub/y"),
                unlink("d/sub/w"),
                readdir("d/sub"),
                rmdir("d/sub"),
                readdir("d"),
                rmdir("d"),
                stat("d"),
                readdir(""),
            ]),
        Scenario::new("lower_chardev_whiteout_hides_file")
            .lower(Layer::new().whiteout("a").file("b", "top b"))
            .lower(Layer::new().file("a", "hidden").file("b", "bottom b"))
            .ops([stat("a"), read("a"), readdir(""), read("b")]),
        Scenario::new("lower_whiteout_hides_dir")
            .lower(Layer::new().whiteout("d"))
            .lower(Layer::new().file("d/f", "hidden"))
            .ops([
                stat("d"),
                stat("d/f"),
                readdir(""),
                mkdir("d"),
                readdir("d"),
            ]),
        Scenario::new("create_over_lower_whiteout")
            .lower(Layer::new().whiteout("a"))
            .lower(Layer::new().file("a", "hidden"))
            .ops([create("a", 0o600), stat("a"), read("a"), readdir("")]),
        Scenario::new("lower_xattr_whiteout")
            .lower(
                Layer::new()
                    .dir("d")
                    .xwhiteout_parent("d")
                    .xwhiteout("d/gone")
                    .file("d/top", "t"),
            )
            .lower(Layer::new().file("d/gone", "hidden").file("d/kept", "k"))
            .ops([
                readdir("d"),
                stat("d/gone"),
                read("d/kept"),
                write("d/gone", "back"),
                readdir("d"),
            ]),
        Scenario::new("unlink_pure_upper_file_leaves_no_whiteout")
            .lower(Layer::new().file("lower", "l"))
            .ops([write("new", "n"), unlink("new"), stat("new"), readdir("")]),
        Scenario::new("delete_many_readdir_hides_all")
            .lower(
                Layer::new()
                    .file("d/a", "")
                    .file("d/b", "")
                    .file("d/c", "")
                    .file("d/keep", ""),
            )
            .lower(Layer::new().file("d/e", "").file("d/f", ""))
            .ops([
                unlink("d/a"),
                unlink("d/b"),
                unlink("d/c"),
                unlink("d/e"),
                readdir("d"),
                checkpoint(),
                unlink("d/f"),
                unlink("d/keep"),
                readdir("d"),
            ]),
        Scenario::new("delete_lower_symlink_and_special")
            .lower(Layer::new().symlink("l", "a").fifo("p").file("a", "A"))
            .ops([unlink("l"), unlink("p"), readdir(""), read("a")]),
    ]
}
