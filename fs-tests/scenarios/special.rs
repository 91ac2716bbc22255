//! mknod of fifos, sockets and devices (as root), including the forbidden 0/0 device.

use crate::dsl::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("mkfifo_and_socket")
            .lower(Layer::new().dir("d"))
            .ops([
                mkfifo("d/p"),
                mksock("d/s"),
                lstat("d/p"),
                lstat("d/s"),
                readdir("d"),
                mkfifo("d/p"),
            ]),
        Scenario::new("char_and_block_devices")
            .lower(Layer::new().dir("dev"))
            .ops([
                mkchr("dev/null", 1, 3),
                mkblk("dev/loop", 7, 0),
                lstat("dev/null"),
                lstat("dev/loop"),
                readdir("dev"),
            ]),
        Scenario::new("open_char_device")
            .lower(Layer::new().chardev("lower_null", 1, 3))
            .ops([
                mkchr("null", 1, 3),
                open(1, "null", O_RDWR),
                fwrite(1, "discarded"),
                fread(1),
                close(1),
                read("lower_null"),
            ]),
        Scenario::new("whiteout_device_is_forbidden")
            .lower(Layer::new().file("a", "a"))
            .ops([
                mknod("wh", S_IFCHR, 0, 0),
                lstat("wh"),
                mknod("a", S_IFCHR, 0, 0),
                readdir(""),
            ]),
        Scenario::new("mknod_over_whiteout")
            .lower(Layer::new().file("a", "a").dir("d"))
            .ops([
                unlink("a"),
                mkfifo("a"),
                lstat("a"),
                rmdir("d"),
                mksock("d"),
                lstat("d"),
                readdir(""),
            ]),
        Scenario::new("special_copy_up_keeps_type")
            .lower(Layer::new().fifo("p").chardev("c", 4, 64).owner("c", 3, 4))
            .ops([
                chown("p", 1, 2),
                lstat("p"),
                chmod("c", 0o660),
                lstat("c"),
                setxattr("p", "trusted.t", "v"),
                listxattr("p"),
            ]),
    ]
}
