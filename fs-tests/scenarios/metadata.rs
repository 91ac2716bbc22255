//! Metadata-only changes on lower files and directories: chmod, chown, utimens, access.

use crate::dsl::*;

fn lower() -> Layer {
    Layer::new()
        .file("f", "data")
        .owner("f", 1000, 1000)
        .xattr("f", "user.keep", "me")
        .file("d/inner", "i")
        .mode("d", 0o755)
        .symlink("l", "f")
        .fifo("p")
}

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("chmod_lower_file").lower(lower()).ops([
            ino("before", "f"),
            chmod("f", 0o600),
            stat("f"),
            mtime("f"),
            read("f"),
            listxattr("f"),
            ino("after", "f"),
        ]),
        Scenario::new("chown_lower_file").lower(lower()).ops([
            chown("f", 1234, 5678),
            stat("f"),
            chown("f", 0, 0),
            stat("f"),
            read("f"),
        ]),
        Scenario::new("utimens_lower_file").lower(lower()).ops([
            utimens("f", 1_100_000_000, 1_200_000_000),
            mtime("f"),
            atime("f"),
            utimens_ns("f", (1_100_000_001, 5), (1_200_000_002, 999_999_999)),
            mtime("f"),
            atime("f"),
            read("f"),
        ]),
        Scenario::new("chmod_lower_dir")
            .lower(lower())
            .lower(Layer::new().file("d/bottom", "b"))
            .ops([chmod("d", 0o700), stat("d"), readdir("d"), read("d/bottom")]),
        Scenario::new("chown_lower_dir").lower(lower()).ops([
            chown("d", 42, 43),
            stat("d"),
            readdir("d"),
            stat("d/inner"),
        ]),
        Scenario::new("utimens_lower_dir").lower(lower()).ops([
            utimens("d", 1_111_111_111, 1_222_222_222),
            mtime("d"),
            atime("d"),
            readdir("d"),
        ]),
        Scenario::new("chmod_follows_symlink_lchown_does_not")
            .lower(lower())
            .ops([
                chmod("l", 0o604),
                stat("f"),
                lstat("l"),
                chown("l", 77, 77),
                lstat("l"),
                stat("f"),
                readlink("l"),
            ]),
        Scenario::new("fchmod_via_readonly_fd").lower(lower()).ops([
            open(1, "f", O_RDONLY),
            fchmod(1, 0o612),
            fstat(1),
            close(1),
            stat("f"),
        ]),
        Scenario::new("special_mode_bits").lower(lower()).ops([
            chmod("f", 0o4755),
            stat("f"),
            chmod("f", 0o2755),
            stat("f"),
            chmod("d", 0o1777),
            stat("d"),
        ]),
        Scenario::new("chmod_lower_fifo").lower(lower()).ops([
            chmod("p", 0o600),
            lstat("p"),
            readdir(""),
        ]),
        Scenario::new("access_checks")
            .lower(
                lower()
                    .file("x", "")
                    .mode("x", 0o755)
                    .file("nox", "")
                    .mode("nox", 0o644),
            )
            .ops([
                access("x", X_OK),
                access("nox", X_OK),
                access("nox", R_OK | W_OK),
                access("missing", R_OK),
                access("d", X_OK),
            ]),
        Scenario::new("new_entries_modes_with_umask")
            .lower(lower())
            .ops([
                mkdir_mode("d/m777", 0o777),
                mkdir_mode("d/m700", 0o700),
                create("d/c666", 0o666),
                create("d/c4755", 0o4755),
                open_mode(1, "d/o640", O_WRONLY | O_CREAT, 0o640),
                close(1),
                mknod("d/fifo", libc::S_IFIFO | 0o666, 0, 0),
                stat("d/m777"),
                stat("d/m700"),
                stat("d/c666"),
                stat("d/c4755"),
                stat("d/o640"),
                lstat("d/fifo"),
            ]),
        Scenario::new("metadata_then_data").lower(lower()).ops([
            chmod("f", 0o611),
            chown("f", 5, 6),
            append("f", "++"),
            stat("f"),
            read("f"),
        ]),
    ]
}
