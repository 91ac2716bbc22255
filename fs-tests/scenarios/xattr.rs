//! Extended attributes: user.* and trusted.* on files, dirs and symlinks, flags and
//! errors, and the overlay-private trusted.overlay.* namespace, which the merged view hides.

use crate::dsl::*;
use libc::{XATTR_CREATE, XATTR_REPLACE};

fn lower() -> Layer {
    Layer::new()
        .file("f", "f")
        .xattr("f", "user.one", "1")
        .xattr("f", "trusted.two", "2")
        .file("d/g", "g")
        .xattr("d", "user.dir", "D")
        .opaque_dir("o")
        .file("o/x", "x")
        .dir("r")
        .redirect("r", "/elsewhere")
}

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("read_lower_xattrs").lower(lower()).ops([
            listxattr("f"),
            getxattr("f", "user.one"),
            getxattr("f", "trusted.two"),
            getxattr("f", "user.missing"),
            listxattr("d"),
        ]),
        Scenario::new("user_xattr_lifecycle").lower(lower()).ops([
            setxattr("f", "user.new", "value"),
            listxattr("f"),
            getxattr("f", "user.new"),
            setxattr("f", "user.one", "changed"),
            getxattr("f", "user.one"),
            removexattr("f", "user.one"),
            getxattr("f", "user.one"),
            listxattr("f"),
            read("f"),
        ]),
        Scenario::new("trusted_xattr_lifecycle")
            .lower(lower())
            .ops([
                setxattr("f", "trusted.new", "t"),
                removexattr("f", "trusted.two"),
                listxattr("f"),
                getxattr("f", "trusted.new"),
            ]),
        Scenario::new("xattr_on_lower_dir")
            .lower(lower())
            .lower(Layer::new().file("d/bottom", "b"))
            .ops([
                setxattr("d", "user.more", "m"),
                removexattr("d", "user.dir"),
                listxattr("d"),
                readdir("d"),
            ]),
        Scenario::new("create_and_replace_flags")
            .lower(lower())
            .ops([
                setxattr_flags("f", "user.one", "x", XATTR_CREATE),
                setxattr_flags("f", "user.absent", "x", XATTR_REPLACE),
                setxattr_flags("f", "user.fresh", "x", XATTR_CREATE),
                setxattr_flags("f", "user.fresh", "y", XATTR_REPLACE),
                getxattr("f", "user.fresh"),
                removexattr("f", "user.never"),
            ]),
        Scenario::new("overlay_private_xattrs_hidden")
            .lower(lower())
            .ops([
                listxattr("o"),
                getxattr("o", "trusted.overlay.opaque"),
                listxattr("r"),
                getxattr("r", "trusted.overlay.redirect"),
                append("f", "+"),
                listxattr("f"),
                getxattr("f", "trusted.overlay.origin"),
                setxattr("f", "trusted.overlay.opaque", "y"),
                removexattr("o", "trusted.overlay.opaque"),
                listxattr(""),
            ]),
        Scenario::new("large_and_binary_values")
            .lower(lower())
            .ops([
                setxattr("f", "user.big", pattern(2000, 3)),
                getxattr("f", "user.big"),
                setxattr("f", "user.bin", [0u8, 1, 2, 255, 0]),
                getxattr("f", "user.bin"),
                setxattr("f", "user.empty", ""),
                getxattr("f", "user.empty"),
                listxattr("f"),
            ]),
        Scenario::new("xattrs_follow_renamed_dir")
            .lower(lower())
            .ops([
                rename("d", "e"),
                listxattr("e"),
                getxattr("e", "user.dir"),
                setxattr("e/g", "user.g", "1"),
                listxattr("e/g"),
            ]),
        Scenario::new("xattr_on_new_file_and_symlink")
            .lower(lower())
            .ops([
                write("n", "n"),
                setxattr("n", "user.n", "1"),
                symlink("n", "ln"),
                setxattr("ln", "user.l", "1"),
                setxattr("ln", "trusted.l", "1"),
                listxattr("ln"),
                listxattr("n"),
            ]),
    ]
}
