//! FUSE over io_uring (Linux 6.14+; the `fuse` module's `enable_uring` parameter must be on).
//!
//! After `FUSE_INIT` has negotiated `FUSE_OVER_IO_URING`, the kernel keeps one request
//! queue per possible CPU and sends each request to the queue of the CPU the caller runs on.
//! A server thread of that queue, pinned to that CPU, has registered ring entries (a header
//! buffer and a payload buffer each) with `IORING_OP_URING_CMD`; the kernel copies the request
//! into a free entry and completes that thread's command, the thread serves it and commits the
//! reply with the same SQE that fetches its next request. The server thread so runs on the
//! caller's CPU, where the caller is about to sleep, instead of being woken on another CPU,
//! which is much of what a FUSE request costs on a small virtual machine. (The reply still
//! wakes the caller with a plain wakeup, which may move it to an idle CPU: Linux 6.18 has
//! no "wake on the current CPU" for ring requests.)
//!
//! Forgets, interrupts and anything sent before every queue has an entry still come through
//! `/dev/fuse`: the session's ordinary event loops keep running beside the rings.
//!
//! The request handed to the parser is laid out as `/dev/fuse` delivers it (in header, the
//! operation's own header, then the payload) without copying the payload: each entry's
//! payload buffer has headroom before it, and the two headers are copied there.

use std::alloc::Layout;
use std::io;
use std::io::IoSlice;
use std::mem::size_of;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::thread::JoinHandle;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use zerocopy::FromBytes;
use zerocopy::IntoBytes;

use crate::Filesystem;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::ll::fuse_abi::fuse_in_header;
use crate::ll::fuse_abi::fuse_out_header;
use crate::reply::ReplyEmpty;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `FUSE_IO_URING_CMD_REGISTER` (uapi `enum fuse_uring_cmd`)
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `FUSE_URING_IOV_SEGS`: the header buffer and the payload buffer
const IOV_SEGS: u32 = 2;
/// `FUSE_URING_IN_OUT_HEADER_SZ`, `FUSE_URING_OP_IN_OUT_SZ`
const IN_OUT_SZ: usize = 128;
const OP_IN_OUT_SZ: usize = 128;
/// Room before an entry's payload for the in header and the operation's header.
const HEADROOM: usize = 256;

/// uapi `struct fuse_uring_ent_in_out`
#[repr(C)]
#[derive(Clone, Copy)]
struct EntInOut {
    flags: u64,
    /// The request's id, to be given back with its reply.
    commit_id: u64,
    /// Bytes of the payload buffer the request (or its reply) uses.
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// uapi `struct fuse_uring_req_header`: the header buffer of a ring entry
#[repr(C)]
struct ReqHeader {
    /// `struct fuse_in_header` of a request, `struct fuse_out_header` of its reply
    in_out: [u8; IN_OUT_SZ],
    /// The operation's own header (`in_args[0]`)
    op_in: [u8; OP_IN_OUT_SZ],
    ring_ent_in_out: EntInOut,
}

/// uapi `struct fuse_uring_cmd_req`, in the SQE's command area
#[repr(C)]
struct CmdReq {
    flags: u64,
    commit_id: u64,
    qid: u16,
    padding: [u8; 6],
}

/// A ring thread's ring and entry, made before `FUSE_INIT` is answered: once the kernel has
/// been told that io_uring is used, it holds every request until each CPU queue has an entry,
/// so nothing that can fail may stand between that answer and the registrations.
pub(crate) struct PreparedRing {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    entry: Entry,
}

impl std::fmt::Debug for PreparedRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedRing(queue {})", self.qid)
    }
}

/// Rings for `threads_per_queue` threads per possible CPU, each entry with a payload buffer
/// of `payload_size` bytes (at least what the kernel may send or accept in one request).
pub(crate) fn prepare(
    payload_size: usize,
    threads_per_queue: usize,
) -> io::Result<Vec<PreparedRing>> {
    let mut rings = Vec::new();
    for qid in 0..possible_cpus()? {
        for _ in 0..threads_per_queue {
            // Disabled until its thread enables it: a single-issuer ring belongs to the task
            // that enables it.
            let ring = IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_r_disabled()
                .build(4)?;
            rings.push(PreparedRing {
                qid,
                ring,
                entry: Entry::new(payload_size)?,
            });
        }
    }
    Ok(rings)
}

/// Heap memory the kernel reads and writes between an SQE and its CQE, so never behind a
/// Rust reference while the entry is in the kernel.
struct RawBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl RawBuf {
    fn zeroed(size: usize, align: usize) -> io::Result<RawBuf> {
        let layout = Layout::from_size_align(size, align).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (every caller asks for more than 0 bytes).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(RawBuf { ptr, layout })
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

// SAFETY: the buffers are plain heap memory owned by the entry, used by one thread at a time.
unsafe impl Send for RawBuf {}

/// One ring entry's buffers.
struct Entry {
    header: RawBuf,
    /// `HEADROOM` bytes, then the payload buffer the kernel knows.
    payload: RawBuf,
    payload_size: usize,
}

impl Entry {
    fn new(payload_size: usize) -> io::Result<Entry> {
        Ok(Entry {
            header: RawBuf::zeroed(size_of::<ReqHeader>(), 8)?,
            payload: RawBuf::zeroed(HEADROOM + payload_size, 4096)?,
            payload_size,
        })
    }

    fn header(&self) -> *mut ReqHeader {
        self.header.ptr.cast()
    }

    fn payload(&self) -> *mut u8 {
        // SAFETY: the allocation is HEADROOM + payload_size bytes.
        unsafe { self.payload.ptr.add(HEADROOM) }
    }
}

/// Where a reply to a ring request is written; shared by the reply objects of the request.
#[derive(Clone)]
pub(crate) struct RingReply {
    slot: Arc<Slot>,
    channel: ChannelSender,
}

impl std::fmt::Debug for RingReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingReply")
    }
}

struct Slot {
    state: Mutex<SlotState>,
    sent: Condvar,
}

struct SlotState {
    /// The entry's payload buffer, for a reply that may be written there at once.
    payload: *mut u8,
    payload_size: usize,
    /// Whether the request being served has payload bytes in that buffer still: the reply
    /// then waits in `staging` until the request is done with.
    staged: bool,
    staging: Vec<u8>,
    /// The request's id (its reply's `unique`).
    unique: u64,
    out_header: [u8; size_of::<fuse_out_header>()],
    /// Payload bytes of the reply, once sent.
    sent: Option<usize>,
    /// The ring thread waits for a reply sent from another thread (a filesystem that keeps
    /// the reply object past its method): only then is it woken (a futex call otherwise
    /// spent on every request).
    waiting: bool,
}

// SAFETY: `payload` points into the ring entry owned by the ring thread, which only touches
// it while it holds this state's lock or while no request of the entry is being served.
unsafe impl Send for SlotState {}

impl SlotState {
    /// Copies the reply: its header to `out_header`, its payload to the entry's payload buffer
    /// (or to `staging`).
    fn fill(&mut self, data: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = data.iter().map(|s| s.len()).sum();
        let header_len = self.out_header.len();
        let Some(payload_len) = total.checked_sub(header_len) else {
            return Err(io::Error::other("reply shorter than its header"));
        };
        if payload_len > self.payload_size {
            return Err(io::Error::other(format!(
                "reply of {payload_len} bytes, ring payload buffer {}",
                self.payload_size
            )));
        }
        self.staging.clear();
        let mut at = 0;
        for s in data {
            let mut s: &[u8] = s;
            if at < header_len {
                let n = s.len().min(header_len - at);
                self.out_header[at..at + n].copy_from_slice(&s[..n]);
                at += n;
                s = &s[n..];
            }
            if s.is_empty() {
                continue;
            }
            if self.staged {
                self.staging.extend_from_slice(s);
            } else {
                // SAFETY: the request has no bytes in the payload buffer (not `staged`), the
                // ring thread waits for this reply before using the entry again, and the
                // range is within the buffer (payload_len <= payload_size, checked above).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        s.as_ptr(),
                        self.payload.add(at - header_len),
                        s.len(),
                    )
                };
            }
            at += s.len();
        }
        Ok(payload_len)
    }

    /// Answers the request with `errno` (0: success) and no payload.
    fn answer(&mut self, errno: i32) {
        let h = fuse_out_header {
            len: size_of::<fuse_out_header>() as u32,
            error: -errno,
            unique: self.unique,
        };
        self.out_header.copy_from_slice(h.as_bytes());
        self.staging.clear();
        self.sent = Some(0);
    }
}

impl RingReply {
    pub(crate) fn channel(&self) -> &ChannelSender {
        &self.channel
    }

    /// Writes the reply where the kernel takes it from; a reply that cannot be (longer than
    /// the buffer) is answered with EIO instead, so that the entry always comes back.
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let mut st = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.sent.is_some() {
            return Err(io::Error::other("a second reply to one ring request"));
        }
        let res = st.fill(data);
        match &res {
            Ok(n) => st.sent = Some(*n),
            Err(_) => st.answer(libc::EIO),
        }
        if st.waiting {
            self.slot.sent.notify_one();
        }
        res.map(|_| ())
    }
}

/// Starts a thread per prepared ring, pinned to its queue's CPU. They end when the
/// connection ends (the kernel cancels their commands).
pub(crate) fn start<FS: Filesystem>(
    rings: Vec<PreparedRing>,
    dev: &Channel,
    event_loop: impl Fn(String) -> SessionEventLoop<FS>,
) -> io::Result<Vec<JoinHandle<io::Result<()>>>> {
    let mut threads = Vec::new();
    for (i, prepared) in rings.into_iter().enumerate() {
        let name = format!("fuser-ring-{}.{i}", prepared.qid);
        let se = event_loop(name.clone());
        let dev = dev.clone();
        threads.push(std::thread::Builder::new().name(name).spawn(move || {
            let res = serve_queue(prepared, &dev, &se);
            if let Err(e) = &res {
                error!("{}: {e}", se.thread_name);
            }
            res
        })?);
    }
    Ok(threads)
}

/// `num_possible_cpus()`: the kernel makes a queue for each, and uses the rings only once
/// every queue has an entry.
fn possible_cpus() -> io::Result<u16> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n: u32 = 0;
    for range in text.trim().split(',') {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        let (a, b): (u32, u32) = (
            a.parse().map_err(io::Error::other)?,
            b.parse().map_err(io::Error::other)?,
        );
        n = n.max(b + 1).max(a + 1);
    }
    u16::try_from(n).map_err(io::Error::other)
}

fn pin_to_cpu(cpu: u16) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity get a valid
    // pointer to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(usize::from(cpu), &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn uring_cmd(dev_fd: i32, op: u32, qid: u16, commit_id: u64, entry: &Entry) -> squeue::Entry128 {
    let req = CmdReq {
        flags: 0,
        commit_id,
        qid,
        padding: [0; 6],
    };
    let mut cmd = [0u8; 80];
    // SAFETY: CmdReq is plain old data of 24 bytes.
    let bytes: &[u8] =
        unsafe { std::slice::from_raw_parts((&req as *const CmdReq).cast(), size_of::<CmdReq>()) };
    cmd[..bytes.len()].copy_from_slice(bytes);
    let mut builder = opcode::UringCmd80::new(types::Fd(dev_fd), op).cmd(cmd);
    if op == CMD_REGISTER {
        // The iovecs are read while the SQE is submitted; they live in the entry's headroom
        // start, which no request uses before the registration has completed.
        let iov = entry.payload.ptr.cast::<libc::iovec>();
        // SAFETY: the headroom has room for two iovecs (HEADROOM >= 32) and is ours until the
        // kernel has taken the registration.
        unsafe {
            iov.write(libc::iovec {
                iov_base: entry.header.ptr.cast(),
                iov_len: size_of::<ReqHeader>(),
            });
            iov.add(1).write(libc::iovec {
                iov_base: entry.payload().cast(),
                iov_len: entry.payload_size,
            });
        }
        builder = builder.addr(Some(iov as u64));
    }
    let sqe = builder.build().user_data(0);
    with_len(sqe, if op == CMD_REGISTER { IOV_SEGS } else { 0 })
}

/// The io-uring crate's URING_CMD builder has no `len`; the registration wants the number of
/// iovecs there (`sqe->len`, bytes 24..28 of the SQE).
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const _: () = assert!(size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is a repr(C) 128-byte SQE (checked above), plain old data.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above; any bit pattern of an SQE is a valid Entry128.
    unsafe { std::mem::transmute(raw) }
}

fn serve_queue<FS: Filesystem>(
    prepared: PreparedRing,
    dev: &Channel,
    se: &SessionEventLoop<FS>,
) -> io::Result<()> {
    let PreparedRing {
        qid,
        mut ring,
        entry,
    } = prepared;
    if let Err(e) = pin_to_cpu(qid) {
        warn!("{}: cannot pin to CPU {qid}: {e}", se.thread_name);
    }
    ring.submitter().register_enable_rings()?;
    let dev_fd = dev.as_fd().as_raw_fd();
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState {
            payload: entry.payload(),
            payload_size: entry.payload_size,
            staged: false,
            staging: Vec::new(),
            unique: 0,
            out_header: [0; size_of::<fuse_out_header>()],
            sent: None,
            waiting: false,
        }),
        sent: Condvar::new(),
    });
    let mut next = uring_cmd(dev_fd, CMD_REGISTER, qid, 0, &entry);
    let mut registered = false;
    loop {
        // SAFETY: the SQE's buffers (the entry) outlive the command: the entry is dropped
        // only once the kernel has completed the command (or leaked, see below).
        unsafe { ring.submission().push(&next) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        // Pushed once: an interrupted wait has submitted it already (or submits it next time).
        let cqe = loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    // The command may still be in the kernel, which would write into the
                    // entry's buffers after they were freed: they are left to the process.
                    std::mem::forget(entry);
                    return Err(e);
                }
            }
            if let Some(cqe) = ring.completion().next() {
                break cqe;
            }
        };
        let res = cqe.result();
        if res == -libc::EAGAIN && !registered {
            // The kernel has not taken the INIT reply in yet.
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        registered = true;
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            return match -res {
                // The connection ended (unmount, abort) or the ring is being torn down.
                libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => {
                    debug!("{}: ring ended: {e}", se.thread_name);
                    Ok(())
                }
                _ => Err(e),
            };
        }
        let commit_id = serve_request(&entry, &slot, dev, se);
        next = uring_cmd(dev_fd, CMD_COMMIT_AND_FETCH, qid, commit_id, &entry);
    }
}

/// Serves the request in `entry` and leaves its reply there (EIO for a request that cannot
/// be parsed); returns the id to commit it with.
fn serve_request<FS: Filesystem>(
    entry: &Entry,
    slot: &Arc<Slot>,
    dev: &Channel,
    se: &SessionEventLoop<FS>,
) -> u64 {
    let hdr = entry.header();
    // SAFETY: the kernel has completed the command: the buffers are ours until the next SQE.
    let h: ReqHeader = unsafe { std::ptr::read(hdr) };
    let ent = h.ring_ent_in_out;
    {
        let mut st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        st.unique = ent.commit_id;
        st.staged = ent.payload_sz > 0;
        st.sent = None;
    }
    match request_bytes(entry, &h) {
        Ok(data) => {
            let reply = RingReply {
                slot: slot.clone(),
                channel: dev.sender(),
            };
            dispatch(se, data, reply, slot);
        }
        Err(e) => {
            error!("{}: {e}", se.thread_name);
            slot.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .answer(libc::EIO);
        }
    }
    let mut st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
    while st.sent.is_none() {
        st.waiting = true;
        st = slot.sent.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.waiting = false;
    let len = st.sent.take().unwrap_or(0);
    // SAFETY: the request is done with (dispatched and dropped): its bytes may be
    // overwritten; the header buffer is ours until the commit is submitted; `len` is within
    // the payload buffer (checked by `fill`).
    unsafe {
        if st.staged {
            std::ptr::copy_nonoverlapping(st.staging.as_ptr(), st.payload, len);
        }
        std::ptr::copy_nonoverlapping(
            st.out_header.as_ptr(),
            std::ptr::addr_of_mut!((*hdr).in_out).cast::<u8>(),
            st.out_header.len(),
        );
        std::ptr::addr_of_mut!((*hdr).ring_ent_in_out.payload_sz).write(len as u32);
    }
    ent.commit_id
}

/// The request as `/dev/fuse` would deliver it, laid out in the entry's headroom and payload.
fn request_bytes<'a>(entry: &'a Entry, h: &ReqHeader) -> io::Result<&'a [u8]> {
    let in_header = fuse_in_header::read_from_prefix(&h.in_out[..])
        .map_err(|_| io::Error::other("in header"))?
        .0;
    let payload_len = h.ring_ent_in_out.payload_sz as usize;
    if payload_len > entry.payload_size {
        return Err(io::Error::other(
            "ring request larger than its payload buffer",
        ));
    }
    // `len` covers every argument as on /dev/fuse: the operation's header is what is not in
    // the payload (none for operations that only pass names).
    let op_len = (in_header.len as usize)
        .checked_sub(size_of::<fuse_in_header>() + payload_len)
        .filter(|&n| n <= OP_IN_OUT_SZ)
        .ok_or_else(|| {
            io::Error::other(format!(
                "ring request of length {} with {payload_len} payload bytes",
                in_header.len
            ))
        })?;
    let head = size_of::<fuse_in_header>() + op_len;
    // SAFETY: head <= HEADROOM (op_len <= OP_IN_OUT_SZ); the headroom is ours, and the
    // request bytes (headroom tail plus payload) are not written until the request is done.
    unsafe {
        let start = entry.payload().sub(head);
        std::ptr::copy_nonoverlapping(h.in_out.as_ptr(), start, size_of::<fuse_in_header>());
        std::ptr::copy_nonoverlapping(
            h.op_in.as_ptr(),
            start.add(size_of::<fuse_in_header>()),
            op_len,
        );
        Ok(std::slice::from_raw_parts(start, head + payload_len))
    }
}

fn dispatch<FS: Filesystem>(se: &SessionEventLoop<FS>, data: &[u8], reply: RingReply, slot: &Slot) {
    let Some(req) = RequestWithSender::with_sender(ReplySender::Ring(reply), data) else {
        slot.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .answer(libc::EIO);
        return;
    };
    match req.request.operation() {
        Ok(Operation::Destroy(_)) => req.reply::<ReplyEmpty>().ok(),
        // Never sent through the rings (they have no reply); answered so that the entry
        // comes back if one ever is.
        Ok(Operation::Forget(_) | Operation::BatchForget(_)) => {
            req.dispatch(se);
            slot.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .answer(0);
        }
        _ => req.dispatch(se),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::fs::File;

    use super::*;
    use crate::Errno;
    use crate::FileHandle;
    use crate::INodeNo;
    use crate::LockOwner;
    use crate::OpenFlags;
    use crate::ReplyData;
    use crate::ReplyEntry;
    use crate::ReplyWrite;
    use crate::Request;
    use crate::SessionACL;
    use crate::WriteFlags;
    use crate::dev_fuse::DevFuse;
    use crate::session::FilesystemHolder;

    const LOOKUP: u32 = 1;
    const READ: u32 = 15;
    const WRITE: u32 = 16;
    const FLUSH: u32 = 25;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Answers LOOKUP of "a" with EEXIST (anything else ENOENT), READ with `pattern(size)`,
    /// WRITE with the size written if the data is `pattern(len)` (and checks the data again
    /// after replying), EINVAL if not.
    struct Probe;

    impl Filesystem for Probe {
        /// Replies from another thread, later.
        fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                reply.error(Errno::EBADF);
            });
        }

        fn lookup(&self, _: &Request, _: INodeNo, name: &OsStr, reply: ReplyEntry) {
            reply.error(if name == "a" {
                Errno::EEXIST
            } else {
                Errno::ENOENT
            });
        }

        fn read(
            &self,
            _: &Request,
            _: INodeNo,
            _: FileHandle,
            _: u64,
            size: u32,
            _: OpenFlags,
            _: Option<LockOwner>,
            reply: ReplyData,
        ) {
            reply.data(&pattern(size as usize));
        }

        fn write(
            &self,
            _: &Request,
            _: INodeNo,
            _: FileHandle,
            _: u64,
            data: &[u8],
            _: WriteFlags,
            _: OpenFlags,
            _: Option<LockOwner>,
            reply: ReplyWrite,
        ) {
            if data == pattern(data.len()) {
                reply.written(data.len() as u32);
                // A filesystem may still look at the request after replying.
                assert!(
                    data == pattern(data.len()),
                    "the reply overwrote the request"
                );
            } else {
                reply.error(Errno::EINVAL);
            }
        }
    }

    struct Rig {
        entry: Entry,
        slot: Arc<Slot>,
        dev: Channel,
        se: SessionEventLoop<Probe>,
    }

    impl Rig {
        fn new(payload_size: usize) -> Rig {
            let entry = Entry::new(payload_size).unwrap();
            let slot = Arc::new(Slot {
                state: Mutex::new(SlotState {
                    payload: entry.payload(),
                    payload_size,
                    staged: false,
                    staging: Vec::new(),
                    unique: 0,
                    out_header: [0; size_of::<fuse_out_header>()],
                    sent: None,
                    waiting: false,
                }),
                sent: Condvar::new(),
            });
            // Replies go to the ring entry; the device is only there for backing files.
            let dev = Channel::new(Arc::new(DevFuse(File::open("/dev/null").unwrap())));
            let se = SessionEventLoop {
                thread_name: "test".into(),
                ch: dev.clone(),
                filesystem: Arc::new(FilesystemHolder { fs: Some(Probe) }),
                allowed: SessionACL::All,
                session_owner: nix::unistd::geteuid(),
            };
            Rig {
                entry,
                slot,
                dev,
                se,
            }
        }

        /// Puts a request in the entry as the kernel does (`len` as given, for bad ones), serves
        /// it, and returns the reply's header (len, error, unique) and payload.
        fn serve(
            &self,
            len: Option<u32>,
            opcode: u32,
            op: &[u8],
            payload: &[u8],
        ) -> (u32, i32, u64, Vec<u8>) {
            let unique: u64 = 0x1234_5678;
            let mut h = Vec::new();
            let len =
                len.unwrap_or((size_of::<fuse_in_header>() + op.len() + payload.len()) as u32);
            h.extend_from_slice(&len.to_ne_bytes());
            h.extend_from_slice(&opcode.to_ne_bytes());
            h.extend_from_slice(&unique.to_ne_bytes());
            h.extend_from_slice(&1u64.to_ne_bytes()); // nodeid
            h.extend_from_slice(&[0; 16]); // uid, gid, pid, padding
            let hdr = self.entry.header();
            // SAFETY: the test plays the kernel: nothing else uses the entry.
            unsafe {
                // Stale bytes where the kernel writes nothing, as it may leave them.
                std::ptr::write_bytes(hdr.cast::<u8>(), 0xa5, size_of::<ReqHeader>());
                let base = hdr.cast::<u8>();
                std::ptr::copy_nonoverlapping(h.as_ptr(), base, h.len());
                std::ptr::copy_nonoverlapping(op.as_ptr(), base.add(IN_OUT_SZ), op.len());
                std::ptr::copy_nonoverlapping(
                    payload.as_ptr(),
                    self.entry.payload(),
                    payload.len(),
                );
                std::ptr::addr_of_mut!((*hdr).ring_ent_in_out).write(EntInOut {
                    flags: 0,
                    commit_id: unique,
                    payload_sz: payload.len() as u32,
                    padding: 0,
                    reserved: 0,
                });
            }
            let commit = serve_request(&self.entry, &self.slot, &self.dev, &self.se);
            assert_eq!(commit, unique);
            // SAFETY: as above.
            unsafe {
                let out = std::ptr::read(hdr);
                let n = out.ring_ent_in_out.payload_sz as usize;
                let word =
                    |at: usize| u32::from_ne_bytes(out.in_out[at..at + 4].try_into().unwrap());
                let data = std::slice::from_raw_parts(self.entry.payload(), n).to_vec();
                (
                    word(0),
                    word(4) as i32,
                    u64::from_ne_bytes(out.in_out[8..16].try_into().unwrap()),
                    data,
                )
            }
        }
    }

    /// `fuse_read_in` / `fuse_write_in`: fh, offset, size, flags, lock_owner, flags, padding
    fn rw_in(size: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&7u64.to_ne_bytes());
        v.extend_from_slice(&0u64.to_ne_bytes());
        v.extend_from_slice(&size.to_ne_bytes());
        v.extend_from_slice(&[0; 20]);
        v
    }

    #[test]
    fn a_name_in_the_payload_reaches_the_filesystem() {
        let rig = Rig::new(64 << 10);
        let (len, err, unique, data) = rig.serve(None, LOOKUP, &[], b"a\0");
        assert_eq!(
            (len, err, unique, data.len()),
            (16, -libc::EEXIST, 0x1234_5678, 0)
        );
        let (_, err, _, _) = rig.serve(None, LOOKUP, &[], b"b\0");
        assert_eq!(err, -libc::ENOENT);
    }

    #[test]
    fn write_data_is_read_in_place_and_the_reply_follows_it() {
        let rig = Rig::new(64 << 10);
        let data = pattern(60_000);
        let (len, err, _, out) = rig.serve(None, WRITE, &rw_in(60_000), &data);
        assert_eq!(err, 0);
        // fuse_write_out: size, padding
        assert_eq!(len, 16 + 8);
        assert_eq!(out.len(), 8);
        assert_eq!(u32::from_ne_bytes(out[..4].try_into().unwrap()), 60_000);
    }

    #[test]
    fn read_data_goes_to_the_payload_buffer() {
        let rig = Rig::new(64 << 10);
        let (len, err, _, out) = rig.serve(None, READ, &rw_in(50_000), &[]);
        assert_eq!((len, err), (16 + 50_000, 0));
        assert!(out == pattern(50_000), "read reply payload differs");
    }

    #[test]
    fn a_reply_sent_later_from_another_thread_is_waited_for() {
        let rig = Rig::new(16 << 10);
        // fuse_flush_in: fh, unused, padding, lock_owner
        let (len, err, _, _) = rig.serve(None, FLUSH, &[0; 24], &[]);
        assert_eq!((len, err), (16, -libc::EBADF));
        let (_, err, _, out) = rig.serve(None, READ, &rw_in(10), &[]);
        assert_eq!((err, out), (0, pattern(10)));
    }

    #[test]
    fn what_cannot_be_served_is_answered_with_eio() {
        let rig = Rig::new(16 << 10);
        // A reply longer than the payload buffer.
        let (len, err, unique, out) = rig.serve(None, READ, &rw_in(20_000), &[]);
        assert_eq!(
            (len, err, unique, out.len()),
            (16, -libc::EIO, 0x1234_5678, 0)
        );
        // A length that does not cover the payload.
        let (_, err, _, _) = rig.serve(Some(41), LOOKUP, &[], b"a\0");
        assert_eq!(err, -libc::EIO);
        // The entry serves the next request as usual.
        let (_, err, _, out) = rig.serve(None, READ, &rw_in(100), &[]);
        assert_eq!((err, out), (0, pattern(100)));
    }
}
