//! File I/O through descriptors: truncate/ftruncate, fallocate, fsync, flock and OFD locks,
//! mmap (read, and MAP_SHARED write + msync), files kept open after unlink, large writes.

use crate::dsl::*;

fn lower() -> Layer {
    Layer::new()
        .file("f", "0123456789")
        .file("page", pattern(3 * 4096, 11))
        .file("d/g", "g")
}

pub fn scenarios() -> Vec<Scenario> {
    vec![
        // copy_file_range between lower and new files: into a new file, into a lower file
        // (copied up), past the source's end (short), within one file, into O_APPEND (EBADF),
        // from a write-only descriptor (EBADF); then a snapshot or rotation, and more.
        Scenario::new("copy_file_range").lower(lower()).ops([
            open(1, "page", O_RDONLY),
            open_mode(2, "new", O_RDWR | O_CREAT, 0o644),
            copy_range(1, 100, 2, 0, 5000),
            fstat(2),
            pread(2, 0, 8000),
            open(3, "f", O_RDWR),
            copy_range(1, 0, 3, 4, 3),
            pread(3, 0, 100),
            copy_range(1, 12_000, 2, 10_000, 4096),
            copy_range(2, 0, 2, 6000, 100),
            pread(2, 5900, 300),
            open(4, "d/g", O_WRONLY | O_APPEND),
            copy_range(1, 0, 4, 0, 10),
            copy_range(4, 0, 2, 0, 1),
            checkpoint(),
            rotate(),
            read("new"),
            read("f"),
            read("d/g"),
        ]),
        Scenario::new("truncate_grow_and_shrink")
            .lower(lower())
            .ops([
                truncate("f", 10_000),
                stat("f"),
                read("f"),
                truncate("f", 4),
                read("f"),
                truncate("missing", 1),
            ]),
        Scenario::new("ftruncate").lower(lower()).ops([
            open(1, "f", O_RDWR),
            ftruncate(1, 5),
            fstat(1),
            pread(1, 0, 100),
            ftruncate(1, 8192),
            fstat(1),
            close(1),
            read("f"),
            open(2, "f", O_RDONLY),
            ftruncate(2, 1),
            close(2),
        ]),
        Scenario::new("fallocate_modes").lower(lower()).ops([
            open(1, "page", O_RDWR),
            fallocate(1, 0, 0, 20_000),
            fstat(1),
            fallocate(1, FALLOC_FL_KEEP_SIZE, 0, 40_000),
            fstat(1),
            fallocate(1, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 4096),
            pread(1, 4090, 16),
            pread(1, 8190, 8),
            fstat(1),
            close(1),
        ]),
        Scenario::new("fsync_and_fdatasync").lower(lower()).ops([
            open(1, "f", O_RDWR),
            pwrite(1, 3, "xyz"),
            fsync(1),
            fdatasync(1),
            close(1),
            open(2, "d/g", O_RDONLY),
            fsync(2),
            close(2),
            read("f"),
        ]),
        Scenario::new("flock_conflicts").lower(lower()).ops([
            open(1, "f", O_RDONLY),
            open(2, "f", O_RDONLY),
            flock(1, LOCK_EX | LOCK_NB),
            flock(2, LOCK_EX | LOCK_NB),
            flock(2, LOCK_SH | LOCK_NB),
            flock(1, LOCK_UN),
            flock(2, LOCK_SH | LOCK_NB),
            flock(1, LOCK_SH | LOCK_NB),
            close(1),
            close(2),
        ]),
        Scenario::new("ofd_lock_conflicts").lower(lower()).ops([
            open(1, "f", O_RDWR),
            open(2, "f", O_RDWR),
            ofd_lock(1, WRLCK, 0, 5),
            ofd_getlk(2, WRLCK, 0, 10),
            ofd_lock(2, WRLCK, 3, 2),
            ofd_lock(2, WRLCK, 5, 5),
            ofd_lock(1, UNLCK, 0, 5),
            ofd_lock(2, RDLCK, 0, 5),
            ofd_getlk(1, RDLCK, 0, 5),
            ofd_getlk(1, WRLCK, 0, 5),
            close(1),
            close(2),
        ]),
        Scenario::new("mmap_read_lower").lower(lower()).ops([
            open(1, "page", O_RDONLY),
            mmap_read(1, 4096, 4096),
            mmap_read(1, 0, 100),
            close(1),
            stat("page"),
        ]),
        Scenario::new("mmap_shared_write_copies_up")
            .lower(lower())
            .ops([
                ino("before", "page"),
                open(1, "page", O_RDWR),
                mmap_write(1, 4096, "written through a shared mapping"),
                pread(1, 4090, 40),
                close(1),
                read("page"),
                stat("page"),
                ino("after", "page"),
            ]),
        Scenario::new("mmap_write_then_read_via_other_fd")
            .lower(lower())
            .ops([
                open(1, "page", O_RDWR),
                open(2, "page", O_RDONLY),
                mmap_write(1, 0, "ZZZZ"),
                pread(2, 0, 8),
                mmap_read(2, 0, 8),
                close(1),
                close(2),
            ]),
        // Writes through write-only descriptors reach readers whose pages and mappings are
        // cached, appends included,
        // and a file written that way reads back through a new descriptor. (Copied up first,
        // and kept open so that no rotation undoes it: kernel overlayfs keeps a mapping made
        // before a copy-up on the lower file.)
        Scenario::new("write_only_writes_reach_cached_readers")
            .lower(lower())
            .ops([
                open(9, "page", O_RDWR),
                open(1, "page", O_RDONLY),
                pread(1, 0, 16),
                mmap_read(1, 4096, 8),
                open(2, "page", O_WRONLY),
                pwrite(2, 2, "NEW"),
                pwrite(2, 4096, "MAPPED"),
                pread(1, 0, 16),
                mmap_read(1, 4096, 8),
                open(3, "page", O_WRONLY | O_APPEND),
                pwrite(3, 0, "TAIL"),
                fstat(1),
                pread(1, 3 * 4096 - 2, 10),
                open_mode(4, "fresh", O_WRONLY | O_CREAT | O_EXCL, 0o644),
                pwrite(4, 0, "made write-only"),
                pwrite(4, 5000, "past a hole"),
                open(5, "fresh", O_RDONLY),
                pread(5, 0, 6000),
                fstat(5),
                close(2),
                close(3),
                close(4),
                close(9),
                read("page"),
                read("fresh"),
            ]),
        Scenario::new("open_unlinked_lower_file_readable")
            .lower(lower())
            .ops([
                ino("path", "f"),
                open(1, "f", O_RDONLY),
                fino("fd", 1),
                unlink("f"),
                fino("fd_after_unlink", 1),
                stat("f"),
                pread(1, 0, 100),
                fstat(1),
                close(1),
                readdir(""),
            ]),
        Scenario::new("open_unlinked_upper_file_read_write")
            .lower(lower())
            .ops([
                open_mode(1, "tmp", O_RDWR | O_CREAT | O_EXCL, 0o600),
                pwrite(1, 0, "before unlink"),
                unlink("tmp"),
                pwrite(1, 7, "AFTER"),
                pread(1, 0, 100),
                fstat(1),
                ftruncate(1, 3),
                pread(1, 0, 100),
                close(1),
                stat("tmp"),
            ]),
        Scenario::new("open_unlinked_copied_up_file_writable")
            .lower(lower())
            .ops([
                open(1, "d/g", O_RDWR),
                unlink("d/g"),
                pwrite(1, 1, "-still-writable"),
                pread(1, 0, 100),
                fstat(1),
                close(1),
                readdir("d"),
            ]),
        Scenario::new("two_fds_coherent").lower(lower()).ops([
            open(1, "f", O_RDONLY),
            open(2, "f", O_WRONLY),
            pwrite(2, 0, "AB"),
            pread(1, 0, 4),
            open(3, "f", O_RDONLY),
            pread(3, 0, 4),
            close(1),
            close(2),
            close(3),
        ]),
        Scenario::new("append_mode_fd").lower(lower()).ops([
            open(1, "f", O_WRONLY | O_APPEND),
            fwrite(1, "+1"),
            pwrite(1, 0, "+2"),
            fwrite(1, "+3"),
            close(1),
            read("f"),
        ]),
        Scenario::new("sparse_write_beyond_eof")
            .lower(lower())
            .ops([
                write_at("f", 100_000, "far"),
                stat("f"),
                open(1, "f", O_RDONLY),
                pread(1, 99_990, 20),
                close(1),
            ]),
        Scenario::new("large_new_file").lower(lower()).ops([
            write("big", pattern(3 << 20, 5)),
            stat("big"),
            open(1, "big", O_RDWR),
            pwrite(1, 1 << 20, pattern(100_000, 6)),
            fsync(1),
            pread(1, (1 << 20) - 10, 30),
            close(1),
        ]),
        Scenario::new("statfs_root_and_subdir").lower(lower()).ops([
            statfs(""),
            statfs("d"),
            statfs("f"),
            statfs("missing"),
        ]),
        Scenario::new("open_directory_flags").lower(lower()).ops([
            open(1, "d", O_RDONLY | O_DIRECTORY),
            fstat(1),
            close(1),
            open(2, "f", O_RDONLY | O_DIRECTORY),
            open(3, "d", O_RDWR),
            open(4, "d", O_WRONLY),
        ]),
    ]
}
