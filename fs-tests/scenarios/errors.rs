//! Error paths (ENOENT, EEXIST, ENOTDIR, EISDIR, EINVAL, ENAMETOOLONG), long names and
//! deep paths.

use crate::dsl::*;

fn lower() -> Layer {
    Layer::new()
        .file("f", "f")
        .file("d/g", "g")
        .symlink("l", "f")
        .dir("e")
}

/// `d0/d1/.../d{n-1}`.
fn deep(n: usize) -> String {
    (0..n)
        .map(|i| format!("d{i}"))
        .collect::<Vec<_>>()
        .join("/")
}

pub fn scenarios() -> Vec<Scenario> {
    let long255 = "n".repeat(255);
    let long256 = "n".repeat(256);
    let deep_lower = deep(20);
    vec![
        Scenario::new("enoent").lower(lower()).ops([
            stat("missing"),
            lstat("missing/x"),
            read("missing"),
            unlink("missing"),
            rmdir("missing"),
            readlink("missing"),
            chmod("missing", 0o600),
            getxattr("missing", "user.x"),
            write("missing_dir/x", "x"),
            mkdir("missing_dir/x"),
            rename("missing", "x"),
            rename("f", "missing_dir/f"),
            symlink("t", "missing_dir/l"),
            readdir("missing"),
        ]),
        Scenario::new("eexist").lower(lower()).ops([
            mkdir("f"),
            mkdir("d"),
            mkdir("l"),
            create("f", 0o644),
            create("d", 0o644),
            symlink("x", "f"),
            symlink("x", "d"),
            link("f", "d"),
            mkfifo("e"),
            open(1, "l", O_WRONLY | O_CREAT | O_EXCL),
        ]),
        Scenario::new("enotdir").lower(lower()).ops([
            stat("f/x"),
            mkdir("f/x"),
            write("f/x", "x"),
            rmdir("f"),
            open(1, "f", O_RDONLY | O_DIRECTORY),
            readdir("f"),
            rename("d", "f"),
            rename("e", "l"),
            unlink("f/"),
        ]),
        Scenario::new("eisdir").lower(lower()).ops([
            open(1, "d", O_WRONLY),
            open(2, "d", O_RDWR),
            write("d", "x"),
            unlink("d"),
            unlink("e"),
            rename("f", "d"),
            read("d"),
            truncate("d", 0),
        ]),
        Scenario::new("einval").lower(lower()).ops([
            readlink("f"),
            readlink("d"),
            rename("d", "d/sub"),
            rename("e", "e/e2"),
            rmdir("e/."),
            renameat2("f", "g", RENAME_NOREPLACE | RENAME_EXCHANGE),
        ]),
        Scenario::new("long_names").lower(lower()).ops([
            write(&long255, "ok"),
            read(&long255),
            write(&long256, "too long"),
            mkdir(&format!("d/{long255}")),
            mkdir(&format!("d/{long256}")),
            rename("f", &long256),
            rename("f", &format!("e/{long255}")),
            symlink("x", &long256),
            link(&long255, &format!("e/{long256}")),
            stat(&long256),
            setxattr(&long255, &format!("user.{}", "x".repeat(250)), "v"),
            setxattr(&long255, &format!("user.{}", "x".repeat(251)), "v"),
            readdir(""),
            readdir("e"),
        ]),
        Scenario::new("long_names_in_lower")
            .lower(
                Layer::new()
                    .file(&"a".repeat(255), "long a")
                    .file(&format!("d/{}", "b".repeat(255)), "long b"),
            )
            .ops([
                read(&"a".repeat(255)),
                unlink(&"a".repeat(255)),
                rename(&format!("d/{}", "b".repeat(255)), &"c".repeat(255)),
                readdir(""),
                readdir("d"),
            ]),
        Scenario::new("deep_paths_created").lower(lower()).ops([
            mkdir(&deep(1)),
            mkdir(&deep(2)),
            mkdir(&deep(3)),
            mkdir(&deep(4)),
            mkdir(&deep(5)),
            mkdir(&deep(6)),
            mkdir(&deep(7)),
            mkdir(&deep(8)),
            write(&format!("{}/leaf", deep(8)), "leaf"),
            read(&format!("{}/leaf", deep(8))),
            rename("d0", "moved"),
            read(&format!("moved/{}/leaf", &deep(8)[3..])),
        ]),
        Scenario::new("deep_lower_path_copy_up")
            .lower(Layer::new().file(&format!("{deep_lower}/leaf"), "deep leaf"))
            .lower(Layer::new().file(&format!("{}/side", deep(10)), "side"))
            .ops([
                append(&format!("{deep_lower}/leaf"), "+"),
                read(&format!("{deep_lower}/leaf")),
                readdir(&deep(10)),
                stat(&deep(19)),
                mtime(&deep(5)),
            ]),
    ]
}
