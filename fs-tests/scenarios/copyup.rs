//! Copy-up of data: write, append, truncate, O_TRUNC, and what copy-up must preserve
//! (owner, mode, times, xattrs, parents' times) or must not do (copy up on read).

use crate::dsl::*;

/// A lower file with non-default owner, mode and xattrs, in a lower dir.
fn rich_lower() -> Layer {
    Layer::new()
        .file("d/f", "0123456789")
        .owner("d/f", 1000, 2000)
        .mode("d/f", 0o640)
        .xattr("d/f", "user.color", "blue")
        .xattr("d/f", "trusted.secret", "s3")
        .owner("d", 1001, 1001)
        .mode("d", 0o751)
}

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("write_keeps_owner_mode_xattrs")
            .lower(rich_lower())
            .ops([
                ino("before", "d/f"),
                write_at("d/f", 2, "AB"),
                read("d/f"),
                stat("d/f"),
                stat("d"),
                listxattr("d/f"),
                getxattr("d/f", "user.color"),
                getxattr("d/f", "trusted.secret"),
                ino("after", "d/f"),
            ]),
        Scenario::new("append_copies_up").lower(rich_lower()).ops([
            append("d/f", "+tail"),
            read("d/f"),
            stat("d/f"),
        ]),
        Scenario::new("truncate_copies_up")
            .lower(rich_lower())
            .ops([
                truncate("d/f", 3),
                read("d/f"),
                stat("d/f"),
                truncate("d/f", 0),
                stat("d/f"),
            ]),
        Scenario::new("open_o_trunc_copies_up")
            .lower(rich_lower())
            .ops([
                open(1, "d/f", O_WRONLY | O_TRUNC),
                fstat(1),
                fwrite(1, "new"),
                close(1),
                read("d/f"),
                stat("d/f"),
                listxattr("d/f"),
            ]),
        Scenario::new("read_does_not_copy_up")
            .lower(rich_lower())
            .ops([
                read("d/f"),
                open(1, "d/f", O_RDONLY),
                pread(1, 3, 4),
                close(1),
                stat("d/f"),
                readdir("d"),
            ]),
        Scenario::new("open_for_write_without_writing")
            .lower(rich_lower())
            .ops([open(1, "d/f", O_RDWR), close(1), stat("d/f"), mtime("d/f")]),
        Scenario::new("copy_up_keeps_file_mtime_until_written")
            .lower(rich_lower())
            .ops([
                mtime("d/f"),
                chmod("d/f", 0o600),
                mtime("d/f"),
                write_at("d/f", 0, "x"),
                mtime("d/f"),
            ]),
        Scenario::new("copy_up_keeps_parents_times")
            .lower(Layer::new().file("a/b/c/f", "deep"))
            .lower(Layer::new().file("a/b/other", "o"))
            .ops([
                mtime("a"),
                mtime("a/b"),
                mtime("a/b/c"),
                chmod("a/b/c/f", 0o600),
                mtime("a"),
                mtime("a/b"),
                mtime("a/b/c"),
                readdir("a/b"),
            ]),
        Scenario::new("open_fd_before_copy_up_sees_new_data")
            .lower(Layer::new().file("f", "old contents"))
            .ops([
                open(1, "f", O_RDONLY),
                pread(1, 0, 100),
                write("f", "new contents!"),
                pread(1, 0, 100),
                fstat(1),
                close(1),
            ]),
        Scenario::new("copy_up_empty_file")
            .lower(Layer::new().file("e", "").mode("e", 0o600))
            .ops([append("e", ""), stat("e"), write_at("e", 5, "x"), read("e")]),
        Scenario::new("copy_up_setuid_file")
            .lower(
                Layer::new()
                    .file("s", "binary")
                    .mode("s", 0o6755)
                    .owner("s", 1000, 1000),
            )
            .ops([
                write_at("s", 0, "B"),
                stat("s"),
                chown("s", 1000, 1000),
                stat("s"),
            ]),
        Scenario::new("large_file_write_in_middle")
            .lower(Layer::new().file("big", pattern(4 << 20, 7)))
            .ops([
                ino("before", "big"),
                write_at("big", (2 << 20) + 3, "MIDDLE-WRITE"),
                stat("big"),
                open(1, "big", O_RDONLY),
                pread(1, (2 << 20) - 5, 32),
                pread(1, (4 << 20) - 8, 100),
                close(1),
                ino("after", "big"),
            ]),
        Scenario::new("copy_up_file_from_bottom_of_three")
            .lower(Layer::new().dir("d"))
            .lower(Layer::new().file("d/other", "o"))
            .lower(
                Layer::new()
                    .file("d/f", "bottom")
                    .xattr("d/f", "user.a", "1"),
            )
            .ops([
                append("d/f", "+"),
                read("d/f"),
                listxattr("d/f"),
                readdir("d"),
            ]),
        // Data ops on a file that a metadata change or a write copied up just before (in
        // volume mode: a partial file whose holes read from below). Long enough that the
        // rotation/volume variants keep the first two ops in one epoch.
        Scenario::new("metadata_copy_up_then_o_trunc")
            .lower(Layer::new().file("f", "0123456789"))
            .ops([
                chmod("f", 0o600),
                write("f", "x"),
                read("f"),
                stat("f"),
                append("f", "y"),
                read("f"),
                stat("f"),
                read("f"),
            ]),
        Scenario::new("write_copy_up_then_truncate_path")
            .lower(Layer::new().file("f", "0123456789"))
            .ops([
                append("f", "+"),
                truncate("f", 3),
                read("f"),
                truncate("f", 20),
                read("f"),
                stat("f"),
                read("f"),
                stat("f"),
            ]),
        Scenario::new("rename_then_truncate_to_empty")
            .lower(Layer::new().file("f", "0123456789"))
            .ops([
                rename("f", "g"),
                write("g", ""),
                stat("g"),
                read("g"),
                append("g", "z"),
                read("g"),
                stat("g"),
                read("g"),
            ]),
        Scenario::new("copy_up_in_renamed_parent")
            .lower(Layer::new().file("d/f", "f").file("d/g", "g"))
            .ops([
                rename("d", "e"),
                write_at("e/f", 0, "F"),
                read("e/f"),
                read("e/g"),
                readdir("e"),
            ]),
    ]
}
