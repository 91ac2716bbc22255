//! Set-user-ID and set-group-ID bits cleared by writes, truncates and chown, as the kernel
//! clears them: by an unprivileged writer (no CAP_FSETID) on write, truncate and open with
//! O_TRUNC; by anyone on chown. Root's writes keep them.

use crate::dsl::*;

/// Files of user 1000: `s` with both bits and group execute (a write clears both), `g` with
/// set-group-ID but no group execute (a mandatory-locking mark, not a privilege) in a group
/// the user is not in, `k` as `s` but left to root's writes.
fn lower() -> Layer {
    Layer::new()
        .file("s", "setid data")
        .owner("s", 1000, 1000)
        .mode("s", 0o6777)
        .file("g", "setgid data")
        .owner("g", 1000, 2000)
        .mode("g", 0o2766)
        .file("k", "kept data")
        .owner("k", 1000, 1000)
        .mode("k", 0o6777)
}

const U: u32 = 1000;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("unprivileged_write_clears_set_id")
            .lower(lower())
            .ops([
                as_user(U, U, write_at("s", 0, "S")),
                stat("s"),
                as_user(U, U, write_at("g", 0, "G")),
                stat("g"),
                write_at("k", 0, "K"),
                stat("k"),
                read("s"),
            ]),
        Scenario::new("unprivileged_fd_writes_clear_set_id")
            .lower(lower())
            .ops([
                as_user(U, U, open(1, "s", O_WRONLY)),
                as_user(U, U, fwrite(1, "one")),
                fstat(1),
                chmod("s", 0o6777),
                // Set again after the first write: the next write clears them again.
                as_user(U, U, pwrite(1, 8, "two")),
                fstat(1),
                stat("s"),
                close(1),
                open(2, "k", O_RDWR),
                pwrite(2, 0, "root"),
                fstat(2),
                close(2),
            ]),
        Scenario::new("unprivileged_truncate_clears_set_id")
            .lower(lower())
            .ops([
                as_user(U, U, truncate("s", 3)),
                stat("s"),
                truncate("k", 3),
                stat("k"),
                as_user(U, U, open(1, "g", O_WRONLY)),
                as_user(U, U, ftruncate(1, 100)),
                fstat(1),
                close(1),
            ]),
        Scenario::new("unprivileged_open_with_o_trunc_clears_set_id")
            .lower(lower())
            .ops([
                as_user(U, U, open(1, "s", O_WRONLY | O_TRUNC)),
                fstat(1),
                close(1),
                stat("s"),
                open(2, "k", O_WRONLY | O_TRUNC),
                close(2),
                stat("k"),
            ]),
        Scenario::new("chown_clears_set_id").lower(lower()).ops([
            chown("s", 1000, 1000),
            stat("s"),
            chown("k", 1001, 1001),
            stat("k"),
            chown("g", 1000, 2000),
            stat("g"),
        ]),
        Scenario::new("unprivileged_chown_clears_set_id")
            .lower(lower())
            .ops([
                // The owner gives the file to a group of theirs (here their fsgid).
                as_user(U, U, chown("s", U, U)),
                stat("s"),
                as_user(U, U, chown("g", u32::MAX, U)),
                stat("g"),
                chmod("g", 0o2766),
                as_user(U, U, chown("g", U, u32::MAX)),
                stat("g"),
                as_user(1001, 1001, chown("k", u32::MAX, u32::MAX)),
                stat("k"),
            ]),
        Scenario::new("unprivileged_fallocate_clears_set_id")
            .lower(lower())
            .ops([
                as_user(U, U, open(1, "s", O_RDWR)),
                as_user(U, U, fallocate(1, 0, 0, 65536)),
                fstat(1),
                close(1),
                stat("s"),
            ]),
    ]
}
