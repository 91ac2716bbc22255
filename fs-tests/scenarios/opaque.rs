//! Opaque directories: rmdir + mkdir over a lower dir, opaque dirs inside lower layers.

use crate::dsl::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("rmdir_then_mkdir_hides_lower_children")
            .lower(Layer::new().file("d/a", "a"))
            .lower(Layer::new().file("d/b", "b"))
            .ops([
                unlink("d/a"),
                unlink("d/b"),
                rmdir("d"),
                mkdir("d"),
                readdir("d"),
                stat("d/a"),
                write("d/c", "c"),
                readdir("d"),
            ]),
        Scenario::new("lower_opaque_dir_hides_deeper")
            .lower(Layer::new().opaque_dir("d").file("d/top", "t"))
            .lower(Layer::new().file("d/bottom", "b").file("other", "o"))
            .ops([
                readdir("d"),
                stat("d/bottom"),
                read("d/top"),
                listxattr("d"),
            ]),
        Scenario::new("opaque_in_middle_layer")
            .lower(Layer::new().file("d/x", "x"))
            .lower(Layer::new().opaque_dir("d").file("d/y", "y"))
            .lower(Layer::new().file("d/z", "z"))
            .ops([readdir("d"), stat("d/z"), read("d/y")]),
        Scenario::new("create_in_lower_opaque_dir")
            .lower(Layer::new().opaque_dir("d").file("d/top", "t"))
            .lower(Layer::new().file("d/bottom", "b"))
            .ops([
                write("d/new", "n"),
                readdir("d"),
                stat("d/bottom"),
                getxattr("d", "trusted.overlay.opaque"),
            ]),
        Scenario::new("rmdir_lower_opaque_dir_with_hidden_children")
            .lower(Layer::new().opaque_dir("d"))
            .lower(Layer::new().file("d/hidden", "h"))
            .ops([
                readdir("d"),
                rmdir("d"),
                stat("d"),
                mkdir("d"),
                readdir("d"),
            ]),
        Scenario::new("mkdir_over_lower_whiteout_is_opaque")
            .lower(Layer::new().whiteout("d"))
            .lower(Layer::new().file("d/a", "a"))
            .ops([mkdir("d"), write("d/n", "n"), readdir("d"), stat("d/a")]),
        Scenario::new("mkdir_new_dir_opacity")
            .lower(Layer::new().file("x", "x"))
            .ops([mkdir("n"), mkdir("n/m"), readdir("n"), stat("n")]),
        Scenario::new("opaque_dir_chmod_and_xattr")
            .lower(Layer::new().opaque_dir("d").file("d/t", "t"))
            .lower(Layer::new().file("d/b", "b"))
            .ops([
                chmod("d", 0o750),
                setxattr("d", "user.k", "v"),
                readdir("d"),
                stat("d"),
                listxattr("d"),
            ]),
    ]
}
