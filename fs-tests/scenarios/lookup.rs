//! Merged lookup and readdir over one to three lower layers.

use crate::dsl::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("single_lower")
            .lower(Layer::new().file("a", "A").dir("d").file("d/b", "B"))
            .ops([stat("a"), read("a"), readdir(""), readdir("d"), read("d/b")]),
        Scenario::new("top_layer_wins")
            .lower(Layer::new().file("a", "top a"))
            .lower(Layer::new().file("a", "bottom a").file("b", "bottom b"))
            .ops([read("a"), stat("a"), read("b"), readdir("")]),
        Scenario::new("three_lowers_merge_dirs")
            .lower(Layer::new().file("d/x", "1x").file("d/same", "top"))
            .lower(Layer::new().file("d/y", "2y").file("d/same", "middle"))
            .lower(
                Layer::new()
                    .file("d/z", "3z")
                    .file("d/same", "bottom")
                    .file("only3", "3"),
            )
            .ops([
                readdir("d"),
                read("d/x"),
                read("d/y"),
                read("d/z"),
                read("d/same"),
                stat("d"),
                read("only3"),
                readdir(""),
            ]),
        Scenario::new("dir_over_file_and_file_over_dir")
            .lower(
                Layer::new()
                    .dir("x")
                    .file("x/in", "in x")
                    .file("y", "file y"),
            )
            .lower(Layer::new().file("x", "file x").file("y/in", "hidden"))
            .ops([
                lstat("x"),
                readdir("x"),
                read("x/in"),
                lstat("y"),
                read("y"),
                stat("y/in"),
                readdir(""),
            ]),
        Scenario::new("nested_merged_dirs")
            .lower(Layer::new().file("a/b/c/top", "t").file("a/t1", "t1"))
            .lower(
                Layer::new()
                    .file("a/b/c/bottom", "b")
                    .file("a/b/b2", "b2")
                    .file("a/b1", "b1"),
            )
            .ops([
                readdir("a"),
                readdir("a/b"),
                readdir("a/b/c"),
                read("a/b/c/top"),
                read("a/b/c/bottom"),
                stat("a/b"),
            ]),
        Scenario::new("dir_nlink_merged_vs_single_layer")
            .lower(
                Layer::new()
                    .dir("merged/s1")
                    .dir("single/s1")
                    .dir("single/s2"),
            )
            .lower(Layer::new().dir("merged/s2").dir("bottom_only/s"))
            .ops([
                stat("merged"),
                stat("single"),
                stat("bottom_only"),
                stat(""),
            ]),
        Scenario::new("modes_owners_of_lower_entries")
            .lower(
                Layer::new()
                    .file("suid", "s")
                    .mode("suid", 0o4755)
                    .file("sgid", "g")
                    .mode("sgid", 0o2711)
                    .file("sticky_dir/f", "")
                    .mode("sticky_dir", 0o1777)
                    .file("owned", "o")
                    .owner("owned", 1000, 2000)
                    .mode("owned", 0o640)
                    .dir("private")
                    .mode("private", 0o700)
                    .owner("private", 33, 33)
                    .file("none", "")
                    .mode("none", 0),
            )
            .ops([
                stat("suid"),
                stat("sgid"),
                stat("sticky_dir"),
                stat("owned"),
                stat("private"),
                stat("none"),
                read("none"),
                access("none", R_OK),
                access("suid", X_OK),
                access("owned", X_OK),
            ]),
        Scenario::new("special_files_in_lower")
            .lower(
                Layer::new()
                    .fifo("fifo")
                    .socket("sock")
                    .chardev("null", 1, 3),
            )
            .ops([lstat("fifo"), lstat("sock"), lstat("null"), readdir("")]),
        Scenario::new("ino_stable_across_lookups")
            .lower(Layer::new().file("a", "A").dir("d").file("d/f", "F"))
            .lower(Layer::new().file("b", "B").dir("d").file("d/g", "G"))
            .ops([
                ino("a1", "a"),
                ino("b1", "b"),
                ino("d1", "d"),
                ino("df1", "d/f"),
                readdir("d"),
                readdir(""),
                ino("a2", "a"),
                ino("b2", "b"),
                ino("d2", "d"),
                ino("df2", "d/f"),
            ]),
        Scenario::new("readdir_after_creating_in_merged_dir")
            .lower(Layer::new().file("d/l1", "1"))
            .lower(Layer::new().file("d/l2", "2"))
            .ops([
                write("d/new", "n"),
                mkdir("d/newdir"),
                symlink("l1", "d/newlink"),
                readdir("d"),
                readdir("d/newdir"),
                readdir(""),
            ]),
        Scenario::new("empty_lower_and_root")
            .lower(Layer::new())
            .ops([
                stat(""),
                readdir(""),
                statfs(""),
                write("x", "x"),
                readdir(""),
            ]),
        Scenario::new("mtime_of_lower_entries")
            .lower(Layer::new().file("d/f", "f"))
            .lower(Layer::new().file("d/g", "g").file("h", "h"))
            .ops([
                mtime("d/f"),
                mtime("d/g"),
                mtime("h"),
                mtime("d"),
                read("h"),
                mtime("h"),
            ]),
    ]
}
