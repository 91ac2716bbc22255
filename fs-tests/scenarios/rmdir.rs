//! rmdir of merged directories: ENOTEMPTY when lower entries are still visible, success
//! when only whiteouts remain.

use crate::dsl::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("nonempty_merged_dir")
            .lower(Layer::new().dir("d"))
            .lower(Layer::new().file("d/only_in_bottom", "b"))
            .ops([rmdir("d"), readdir("d"), stat("d")]),
        Scenario::new("dir_with_only_whiteouts")
            .lower(Layer::new().file("d/a", "a"))
            .lower(Layer::new().file("d/b", "b").file("d/sub/c", "c"))
            .ops([
                unlink("d/a"),
                unlink("d/b"),
                rmdir("d"),
                unlink("d/sub/c"),
                rmdir("d/sub"),
                readdir("d"),
                rmdir("d"),
                stat("d"),
                readdir(""),
            ]),
        Scenario::new("dir_emptied_by_lower_whiteouts")
            .lower(Layer::new().dir("d").whiteout("d/a"))
            .lower(Layer::new().file("d/a", "a"))
            .ops([readdir("d"), rmdir("d"), stat("d")]),
        Scenario::new("rmdir_then_mkdir_then_rmdir")
            .lower(Layer::new().file("d/a", "a"))
            .ops([
                unlink("d/a"),
                rmdir("d"),
                mkdir("d"),
                readdir("d"),
                rmdir("d"),
                mkdir("d"),
                write("d/x", "x"),
                rmdir("d"),
                readdir("d"),
            ]),
        // The emptiness check reads the upper's character devices as whiteouts only when
        // they are 0/0 ones: a real device beside the whiteouts keeps the directory.
        Scenario::new("device_beside_whiteouts")
            .lower(Layer::new().file("d/a", "a").file("d/b", "b"))
            .ops([
                unlink("d/a"),
                mknod("d/c", libc::S_IFCHR | 0o644, 1, 3),
                unlink("d/b"),
                rmdir("d"),
                readdir("d"),
                unlink("d/c"),
                rmdir("d"),
                stat("d"),
                readdir(""),
            ]),
        Scenario::new("rmdir_errors")
            .lower(Layer::new().file("f", "f").dir("d").symlink("l", "d"))
            .ops([
                rmdir("missing"),
                rmdir("f"),
                rmdir("d/."),
                rmdir("l"),
                rmdir("d/.."),
                rmdir(""),
            ]),
        Scenario::new("rmdir_upper_dir_with_upper_children")
            .lower(Layer::new().file("x", "x"))
            .ops([
                mkdir("n"),
                write("n/f", "f"),
                rmdir("n"),
                unlink("n/f"),
                rmdir("n"),
                stat("n"),
            ]),
    ]
}
