//! rename and renameat2: files and directories, lower, merged and upper, over existing
//! names and whiteouts, RENAME_NOREPLACE and RENAME_EXCHANGE. Directory renames must never
//! fail with EXDEV (kernel: redirect_dir=on).

use crate::dsl::*;

fn files() -> Layer {
    Layer::new()
        .file("a", "A")
        .file("b", "B")
        .file("d1/x", "X")
        .dir("d2")
        .xattr("a", "user.a", "1")
}

/// `d` is merged from both layers; `e` exists only in the bottom layer.
fn dirs() -> [Layer; 2] {
    [
        Layer::new()
            .file("d/top", "t")
            .file("d/sub/deep", "deep")
            .dir("empty"),
        Layer::new()
            .file("d/bottom", "b")
            .file("e/only", "o")
            .file("file", "f"),
    ]
}

fn with_dirs(name: &str) -> Scenario {
    let [top, bottom] = dirs();
    Scenario::new(name).lower(top).lower(bottom)
}

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("lower_file_within_dir").lower(files()).ops([
            ino("before", "a"),
            rename("a", "c"),
            stat("a"),
            read("c"),
            listxattr("c"),
            readdir(""),
            ino("after", "c"),
        ]),
        Scenario::new("lower_file_between_dirs")
            .lower(files())
            .ops([
                rename("d1/x", "d2/x"),
                readdir("d1"),
                readdir("d2"),
                read("d2/x"),
            ]),
        Scenario::new("lower_file_over_lower_file")
            .lower(files())
            .ops([
                ino("a", "a"),
                ino("b_before", "b"),
                rename("a", "b"),
                read("b"),
                stat("a"),
                ino("b_after", "b"),
                readdir(""),
            ]),
        Scenario::new("lower_file_over_upper_file")
            .lower(files())
            .ops([
                write("new", "N"),
                rename("a", "new"),
                read("new"),
                stat("a"),
            ]),
        Scenario::new("upper_file_over_lower_file")
            .lower(files())
            .ops([
                write("new", "N"),
                rename("new", "a"),
                read("a"),
                stat("new"),
                readdir(""),
            ]),
        Scenario::new("onto_whiteouted_name").lower(files()).ops([
            unlink("b"),
            rename("a", "b"),
            read("b"),
            stat("a"),
            readdir(""),
        ]),
        Scenario::new("lower_dir")
            .lower(Layer::new().file("e/only", "o").file("e/sub/s", "s"))
            .ops([
                ino("before", "e"),
                rename("e", "moved"),
                readdir("moved"),
                read("moved/only"),
                read("moved/sub/s"),
                stat("e"),
                ino("after", "moved"),
                readdir(""),
            ]),
        with_dirs("merged_dir_no_exdev").ops([
            ino("before", "d"),
            rename("d", "m"),
            readdir("m"),
            read("m/top"),
            read("m/bottom"),
            read("m/sub/deep"),
            stat("d"),
            ino("after", "m"),
        ]),
        with_dirs("renamed_dir_children_writable").ops([
            rename("d", "m"),
            append("m/bottom", "+"),
            unlink("m/top"),
            write("m/new", "n"),
            readdir("m"),
            read("m/bottom"),
        ]),
        with_dirs("rename_dir_back").ops([
            rename("d", "m"),
            checkpoint(),
            rename("m", "d"),
            readdir("d"),
            read("d/bottom"),
            stat("m"),
        ]),
        with_dirs("rename_dir_then_mkdir_old_name").ops([
            rename("d", "m"),
            mkdir("d"),
            readdir("d"),
            readdir("m"),
        ]),
        with_dirs("rename_subdir_out_of_merged_dir").ops([
            rename("d/sub", "sub"),
            readdir("d"),
            read("sub/deep"),
            rename("sub", "d/sub2"),
            readdir("d/sub2"),
        ]),
        with_dirs("dir_over_empty_dir").ops([rename("e", "empty"), readdir("empty"), stat("e")]),
        with_dirs("dir_over_nonempty_dir").ops([
            rename("empty", "d"),
            rename("e", "d"),
            readdir("d"),
        ]),
        with_dirs("file_over_dir_and_dir_over_file").ops([
            rename("file", "empty"),
            rename("empty", "file"),
            rename("d", "d/sub/inside"),
            rename("", "x"),
        ]),
        with_dirs("dir_onto_whiteouted_dir").ops([
            rmdir("empty"),
            rename("e", "empty"),
            readdir("empty"),
            readdir(""),
        ]),
        Scenario::new("same_name_and_hardlink_noop")
            .lower(files().hardlink("a2", "a"))
            .ops([
                rename("a", "a"),
                rename("a", "a2"),
                readdir(""),
                read("a"),
                read("a2"),
            ]),
        Scenario::new("noreplace").lower(files()).ops([
            rename_noreplace("a", "b"),
            read("b"),
            rename_noreplace("a", "c"),
            read("c"),
            stat("a"),
        ]),
        Scenario::new("exchange_files").lower(files()).ops([
            ino("a", "a"),
            ino("b", "b"),
            exchange("a", "b"),
            read("a"),
            read("b"),
            listxattr("b"),
            ino("a_after", "a"),
            ino("b_after", "b"),
        ]),
        with_dirs("exchange_file_and_merged_dir").ops([
            exchange("file", "d"),
            readdir("file"),
            read("d"),
            read("file/bottom"),
        ]),
        Scenario::new("exchange_with_missing")
            .lower(files())
            .ops([exchange("a", "missing"), read("a")]),
        Scenario::new("pure_upper_dir").lower(files()).ops([
            mkdir("n"),
            write("n/f", "f"),
            rename("n", "m"),
            readdir("m"),
            read("m/f"),
        ]),
        Scenario::new("rename_symlink_and_fifo")
            .lower(files().symlink("l", "a").fifo("p"))
            .ops([
                rename("l", "l2"),
                readlink("l2"),
                read("l2"),
                rename("p", "d2/p"),
                lstat("d2/p"),
            ]),
        Scenario::new("rename_chain").lower(files()).ops([
            rename("a", "t"),
            rename("b", "a"),
            rename("t", "b"),
            read("a"),
            read("b"),
            readdir(""),
        ]),
    ]
}
