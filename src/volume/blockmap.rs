//! Partial files: a file copied up block by block, and its block map.
//!
//! Writing into a file that a lower layer holds does not copy the whole file. The upper gets a
//! *partial file*: a sparse regular file of the file's logical size whose bytes are meaningful
//! only in the blocks written in this epoch ("present" blocks), plus a `BlockMap` recording
//! which blocks are present, the CRC32C of each, the logical size and the *below limit*.
//!
//! # Semantics
//!
//! A byte at offset `o < size` of the file reads from:
//! - this layer's data file if its block is present (`Source::Here`);
//! - otherwise the layer below at the same offset if `o < below_limit` (`Source::Below`);
//! - otherwise zeros (`Source::Zero`).
//!
//! `below_limit` starts as the size of the file below at copy-up and only ever shrinks (a
//! truncate lowers it to the new size). That is what keeps truncate-then-extend correct: bytes
//! past a truncation never reappear from below. Invariant: `below_limit <= size`, and every
//! present block starts below `size`. The layer below may itself be partial: the engine
//! resolves `Below` spans with the lower layer's own map, down to a whole file.
//!
//! A present block is always *complete* in the data file: before a write that covers a block
//! only partly, the engine fills the rest of that block (`write_fill`). Bytes of the data file
//! outside present blocks are unspecified (normally holes; after a crash they may hold an
//! unrecorded write) and are never read. A block's CRC32C covers all `block_size` bytes of the
//! block, bytes past the logical size counted as zeros, so extending a file never changes a
//! CRC and shrinking it changes at most the new last block's.
//!
//! A partial file with no present block is a metadata-only copy-up (kernel `metacopy`).
//!
//! # On-disk form, and why
//!
//! - The data file sits in the layer tree at the file's path, with the file's owner, mode,
//!   times and xattrs, and `st_size` equal to the logical size: to every tool it looks like
//!   the file with holes where the lower data shows through.
//! - It carries the marker xattr `trusted.layervol.partial` (`user.layervol.partial` on a
//!   `userxattr` volume) whose value is `1:<map id>`, 32 hex digits of a random 128-bit id.
//!   The xattr belongs to the inode, so renames and hard links need no bookkeeping, and
//!   `cp -a`, `rsync -X` and `tar --xattrs` carry it. It is outside `trusted.overlay.*`, so
//!   kernel overlayfs ignores it (and shows the holes: layers with partial files are layervol
//!   layers; squash/export turns them back into whole files).
//! - The map itself is a sidecar `<map id>.lvmap` in the layer's `maps/` directory, next to
//!   (not inside) the layer tree, written atomically (temp, fsync, rename). Not an xattr: a
//!   1 GiB file rewritten with 4 KiB blocks needs 1 MiB of CRCs, past every filesystem's xattr
//!   limit (ext4: one block). Not a dotfile next to the data file: that would show up in the
//!   kernel overlay view and need renaming with the file and per-link copies for hard links.
//!   Keyed by a random id rather than the inode number: inode numbers are reused after a
//!   delete and change when a layer is copied or replicated, while an id is never reused, so a
//!   stale sidecar can never attach itself to a new file (it is merely an orphan; `scan`
//!   reports orphans and `Volume::collect_orphan_maps` removes them).
//! - Sidecar encoding (little-endian), version 1.0:
//!
//!   ```text
//!   0   8  magic "LVBLKMAP"
//!   8   2  major version (1)     10  2  minor version (0)
//!   12  4  header length (80; a newer minor may extend the header, older readers skip it)
//!   16 16  map id                32  4  block size        36  4  flags (0; unknown bits rejected)
//!   40  8  logical size          48  8  below limit
//!   56  8  extent count E        64  8  present block count B      72  8  reserved (0)
//!   80     E x (start u64, end u64): present extents, sorted, disjoint, non-adjacent
//!          B x u32: CRC32C of each present block, ascending block order
//!   end-4  u32 CRC32C of every preceding byte (the map's checksum, recorded in the manifest)
//!   ```
//!
//!   Binary rather than JSON: 4 bytes per block instead of ~11, exact lengths checked before
//!   any allocation, and one checksum over everything.
//!
//! This module never writes into a file it was not handed, never reads a block it does not
//! need, and never panics on a damaged map (decoding returns `MapDecodeError`).

use std::ffi::CStr;
use std::fs;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use super::error::{Result, VolumeError, io};
use super::extents::{ExtentError, ExtentSet, blocks_of_bytes};
use super::{MapId, check_block_size, meta};
use crate::sys::{self, Errno};

pub const MAP_MAGIC: [u8; 8] = *b"LVBLKMAP";
pub const MAP_VERSION_MAJOR: u16 = 1;
pub const MAP_VERSION_MINOR: u16 = 0;
const HEADER_LEN_V1: usize = 80;
/// Suffix of a block-map sidecar file in a layer's `maps/` directory.
pub const MAP_FILE_SUFFIX: &str = ".lvmap";

/// The marker xattr of a partial file, per xattr namespace.
pub const MARKER_TRUSTED: &CStr = c"trusted.layervol.partial";
pub const MARKER_USER: &CStr = c"user.layervol.partial";
/// layervol's private xattr namespaces: the engine must hide these from the merged view and
/// refuse to let users set them, exactly like `trusted.overlay.*`.
pub const PRIVATE_XATTR_PREFIXES: [&str; 2] = ["trusted.layervol.", "user.layervol."];

/// The marker xattr name for a volume's namespace.
pub fn marker_xattr(userxattr: bool) -> &'static CStr {
    if userxattr {
        MARKER_USER
    } else {
        MARKER_TRUSTED
    }
}

/// The marker value naming map `id`: `1:<32 hex digits>`.
pub fn encode_marker(id: MapId) -> Vec<u8> {
    format!("1:{id}").into_bytes()
}

pub fn decode_marker(value: &[u8]) -> Result<MapId, MapDecodeError> {
    let bad = || MapDecodeError::BadMarker {
        value: String::from_utf8_lossy(value).into_owned(),
    };
    let s = std::str::from_utf8(value).map_err(|_| bad())?;
    let hex = s.strip_prefix("1:").ok_or_else(bad)?;
    hex.parse().map_err(|_| bad())
}

/// The map id named by `dir/name`'s marker, `None` for a whole file. A malformed marker is
/// `EUCLEAN` ("structure needs cleaning"); `scan` reports it in detail.
pub fn read_marker(dir: BorrowedFd, name: &CStr, userxattr: bool) -> sys::Result<Option<MapId>> {
    match sys::getxattr(dir, name, marker_xattr(userxattr))? {
        None => Ok(None),
        Some(v) => decode_marker(&v).map(Some).map_err(|_| Errno::EUCLEAN),
    }
}

/// Marks `dir/name` as the partial file of map `id`. Set it on the file in the work dir before
/// the copy-up rename, so that the file never appears in the layer unmarked.
pub fn write_marker(dir: BorrowedFd, name: &CStr, id: MapId, userxattr: bool) -> sys::Result<()> {
    sys::setxattr(dir, name, marker_xattr(userxattr), &encode_marker(id), 0)
}

/// Where the bytes of a span come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// This layer's data file, same offset.
    Here,
    /// The layer below, same offset (resolve with its own map if it is partial too).
    Below,
    /// Zeros: a hole past the below limit.
    Zero,
}

/// A byte range of the file and where its bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSpan {
    pub range: Range<u64>,
    pub source: Source,
}

fn push_span(out: &mut Vec<ReadSpan>, range: Range<u64>, source: Source) {
    if range.start >= range.end {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.source == source
        && last.range.end == range.start
    {
        last.range.end = range.end;
        return;
    }
    out.push(ReadSpan { range, source });
}

/// A problem `BlockMap::verify` found in a data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The data file's size is not the map's logical size.
    SizeMismatch { map_size: u64, file_size: u64 },
    /// A present block's content does not match its recorded CRC32C.
    BlockCrc {
        block: u64,
        expected: u32,
        actual: u32,
    },
}

/// What `BlockMap::recover` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// `(map size, file size)` when they differed; the file's size was taken.
    pub size_changed: Option<(u64, u64)>,
    /// Blocks past the recorded size that the data file holds and that were adopted.
    pub adopted: ExtentSet,
    /// Present blocks whose CRC was recomputed because it no longer matched the data.
    pub recomputed: Vec<u64>,
}

/// Why a block map (sidecar or marker) could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapDecodeError {
    #[error("too short ({len} bytes) to be a block map")]
    TooShort { len: usize },
    #[error("bad magic {found:02x?}: not a layervol block map")]
    BadMagic { found: [u8; 8] },
    #[error(
        "format version {major}.{minor} is not supported (this build reads {}.x); upgrade layervol",
        MAP_VERSION_MAJOR
    )]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("length is {len} bytes but the header describes {expected}")]
    LengthMismatch { len: usize, expected: u128 },
    #[error("header field {field} has the invalid value {value}")]
    BadField { field: &'static str, value: u64 },
    #[error("present extents are invalid: {0}")]
    Extents(#[from] ExtentError),
    #[error("present block {block} lies at or past the logical size {size}")]
    BlockBeyondSize { block: u64, size: u64 },
    #[error("below limit {below_limit} exceeds the logical size {size}")]
    BelowLimitBeyondSize { below_limit: u64, size: u64 },
    #[error("marker xattr value {value:?} is malformed (expected \"1:<32 hex digits>\")")]
    BadMarker { value: String },
}

/// CRC32C per block, stored in fixed chunks so that a dense file costs 4 bytes per block and
/// a sparse one does not allocate for the blocks it lacks. Which entries are meaningful is
/// decided by the map's `present` set, never by this table.
#[derive(Debug, Clone, Default)]
struct CrcTable {
    chunks: std::collections::BTreeMap<u64, Box<[u32; CRC_CHUNK as usize]>>,
}

const CRC_CHUNK: u64 = 64;

impl CrcTable {
    fn get(&self, block: u64) -> u32 {
        self.chunks
            .get(&(block / CRC_CHUNK))
            .map_or(0, |c| c[(block % CRC_CHUNK) as usize])
    }

    fn set(&mut self, block: u64, crc: u32) {
        self.chunks
            .entry(block / CRC_CHUNK)
            .or_insert_with(|| Box::new([0; CRC_CHUNK as usize]))[(block % CRC_CHUNK) as usize] =
            crc;
    }

    /// Drops every entry for blocks `>= first`.
    fn truncate(&mut self, first: u64) {
        let chunk = first / CRC_CHUNK;
        let keep = (first % CRC_CHUNK) as usize;
        let _ = self.chunks.split_off(&(chunk + u64::from(keep > 0)));
        if keep > 0
            && let Some(c) = self.chunks.get_mut(&chunk)
        {
            c[keep..].fill(0);
        }
    }
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// CRC32C of a block whose first bytes are `content` and the rest (up to `block_size`) zeros.
pub fn block_crc(content: &[u8], block_size: u32) -> u32 {
    let mut crc = crc32c::crc32c(content);
    let mut pad = (block_size as usize).saturating_sub(content.len());
    while pad > 0 {
        let n = pad.min(ZEROS.len());
        crc = crc32c::crc32c_append(crc, &ZEROS[..n]);
        pad -= n;
    }
    crc
}

/// The block map of one partial file. Pure data: the methods that touch the data file take
/// its fd and return `sys::Result` for the engine.
///
/// Callers serialise access per file (the engine holds the inode's lock around a write and
/// its `record_write`).
#[derive(Debug, Clone)]
pub struct BlockMap {
    id: MapId,
    block_size: u32,
    size: u64,
    below_limit: u64,
    present: ExtentSet,
    crcs: CrcTable,
}

impl PartialEq for BlockMap {
    fn eq(&self, o: &Self) -> bool {
        self.id == o.id
            && self.block_size == o.block_size
            && self.size == o.size
            && self.below_limit == o.below_limit
            && self.present == o.present
            && self
                .present
                .blocks()
                .all(|b| self.crcs.get(b) == o.crcs.get(b))
    }
}

impl Eq for BlockMap {}

impl BlockMap {
    /// The map of a fresh partial file over a lower file of `size_below` bytes: same logical
    /// size, nothing present, everything reads from below.
    pub fn new(id: MapId, block_size: u32, size_below: u64) -> Result<Self> {
        let block_size = check_block_size(u64::from(block_size))?;
        Ok(BlockMap {
            id,
            block_size,
            size: size_below,
            below_limit: size_below,
            present: ExtentSet::new(),
            crcs: CrcTable::default(),
        })
    }

    pub fn id(&self) -> MapId {
        self.id
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    fn bs(&self) -> u64 {
        u64::from(self.block_size)
    }

    /// Logical size in bytes (the file's `st_size`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes below this offset that are not present here read from the layer below.
    pub fn below_limit(&self) -> u64 {
        self.below_limit
    }

    /// Present blocks: exactly the blocks written in this layer's epoch.
    pub fn present(&self) -> &ExtentSet {
        &self.present
    }

    /// Number of blocks of the file (`ceil(size / block_size)`).
    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(self.bs())
    }

    /// Bytes this layer holds: present blocks, the last one clipped to the logical size.
    pub fn present_bytes(&self) -> u64 {
        let bs = self.bs();
        let mut n = self.present.len_bytes(bs);
        let last = self.present.end();
        if last > 0 && last.saturating_mul(bs) > self.size {
            n -= last * bs - self.size;
        }
        n
    }

    /// CRC32C of a present block; `None` if the block is not present.
    pub fn crc(&self, block: u64) -> Option<u32> {
        self.present.contains(block).then(|| self.crcs.get(block))
    }

    /// True if no byte reads from below any more: the file is whole in this layer.
    pub fn is_complete(&self) -> bool {
        self.below_limit == 0
            || self
                .present
                .contains_range(0..self.below_limit.div_ceil(self.bs()))
    }

    /// Where each byte of `[offset, offset + len)` comes from, clipped to the logical size;
    /// adjacent spans of the same source are merged. O(extents in the range).
    pub fn read_plan(&self, offset: u64, len: u64) -> Vec<ReadSpan> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        if offset >= end {
            return out;
        }
        let bs = self.bs();
        let mut pos = offset;
        for ext in self
            .present
            .intersection(blocks_of_bytes(offset, end - offset, bs))
        {
            let here = (ext.start * bs).max(offset)..ext.end.saturating_mul(bs).min(end);
            self.push_absent(&mut out, pos..here.start);
            pos = here.end;
            push_span(&mut out, here, Source::Here);
        }
        self.push_absent(&mut out, pos..end);
        out
    }

    fn push_absent(&self, out: &mut Vec<ReadSpan>, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let split = self.below_limit.clamp(r.start, r.end);
        push_span(out, r.start..split, Source::Below);
        push_span(out, split..r.end, Source::Zero);
    }

    /// What the engine must put into the data file *before* writing `[offset, offset + len)`
    /// so that every block the write touches is complete: for the first and last touched
    /// blocks, if not present, the parts the write does not cover, up to the new end of file.
    /// `Below` spans are copied from the layer below, `Zero` spans are written as zeros.
    pub fn write_fill(&self, offset: u64, len: u64) -> Vec<ReadSpan> {
        let mut out = Vec::new();
        if len == 0 {
            return out;
        }
        let bs = self.bs();
        let wend = offset.saturating_add(len);
        let new_size = self.size.max(wend);
        let blocks = blocks_of_bytes(offset, len, bs);
        let mut edge = vec![blocks.start];
        if blocks.end - 1 != blocks.start {
            edge.push(blocks.end - 1);
        }
        for b in edge {
            if self.present.contains(b) {
                continue;
            }
            let blk = b * bs..(b * bs).saturating_add(bs).min(new_size);
            for piece in [blk.start..offset.min(blk.end), wend.max(blk.start)..blk.end] {
                self.push_absent(&mut out, piece);
            }
        }
        out
    }

    /// Records that `data` was just written at `offset` into the data file `fd` (after the
    /// fill from `write_fill`): the touched blocks become present with fresh CRCs and the size
    /// grows if the write ended past it. Blocks the write covers entirely are checksummed from
    /// `data`; the (at most two) partly covered ones are read back from `fd`.
    pub fn record_write(&mut self, fd: BorrowedFd, offset: u64, data: &[u8]) -> sys::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        self.size = self.size.max(end);
        let bs = self.bs();
        let blocks = blocks_of_bytes(offset, end - offset, bs);
        let mut buf = Vec::new();
        for b in blocks.clone() {
            let blk = b * bs..(b * bs).saturating_add(bs).min(self.size);
            let crc = if blk.start >= offset && blk.end <= end {
                let s = (blk.start - offset) as usize;
                block_crc(
                    &data[s..s + (blk.end - blk.start) as usize],
                    self.block_size,
                )
            } else {
                self.read_block_crc(fd, b, &mut buf)?
            };
            self.crcs.set(b, crc);
        }
        self.present.insert(blocks);
        Ok(())
    }

    /// Records that `[offset, offset + len)` (clipped to the size) was zeroed in the data file
    /// (`fallocate` punch-hole or zero-range, after `write_fill`): the touched blocks become
    /// present; whole ones get the zero block's CRC without reading.
    pub fn record_zeroed(&mut self, fd: BorrowedFd, offset: u64, len: u64) -> sys::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let bs = self.bs();
        let zero_crc = block_crc(&[], self.block_size);
        let blocks = blocks_of_bytes(offset, end - offset, bs);
        let mut buf = Vec::new();
        for b in blocks.clone() {
            let blk = b * bs..(b * bs).saturating_add(bs).min(self.size);
            let crc = if blk.start >= offset && blk.end <= end {
                zero_crc
            } else {
                self.read_block_crc(fd, b, &mut buf)?
            };
            self.crcs.set(b, crc);
        }
        self.present.insert(blocks);
        Ok(())
    }

    /// Marks `first_block..` present with CRCs computed from `blocks`, which holds whole
    /// blocks (the last may be short if it ends at the logical size). For copy-up code that
    /// already has the data in hand.
    pub fn record_blocks(&mut self, first_block: u64, blocks: &[u8]) {
        let bs = self.block_size as usize;
        let mut n = 0u64;
        for (i, chunk) in blocks.chunks(bs).enumerate() {
            self.crcs
                .set(first_block + i as u64, block_crc(chunk, self.block_size));
            n += 1;
        }
        let end_block = first_block.saturating_add(n);
        let end_byte = end_block
            .saturating_mul(self.bs())
            .min(first_block.saturating_mul(self.bs()) + blocks.len() as u64);
        self.size = self.size.max(end_byte);
        self.present.insert(first_block..end_block);
    }

    /// Changes the logical size (truncate or extend; the engine `ftruncate`s the data file to
    /// the same size). Shrinking drops present blocks past the end and lowers the below limit,
    /// so the dropped range never reads from below again; growing only moves the size (the
    /// new bytes read as zeros). Returns the present block whose CRC must be refreshed
    /// because its tail was cut off (`refresh_crc`), if any; `truncate_file` does all of it.
    #[must_use = "a present block cut by the truncate needs refresh_crc"]
    pub fn truncate(&mut self, new_size: u64) -> Option<u64> {
        if new_size >= self.size {
            self.size = new_size;
            return None;
        }
        let bs = self.bs();
        let keep_blocks = new_size.div_ceil(bs);
        self.present.truncate(keep_blocks);
        self.crcs.truncate(keep_blocks);
        self.below_limit = self.below_limit.min(new_size);
        self.size = new_size;
        let last = new_size / bs;
        (!new_size.is_multiple_of(bs) && self.present.contains(last)).then_some(last)
    }

    /// `ftruncate`s the data file and updates the map, refreshing a cut block's CRC.
    pub fn truncate_file(&mut self, fd: BorrowedFd, new_size: u64) -> sys::Result<()> {
        sys::ftruncate(fd, new_size)?;
        if let Some(b) = self.truncate(new_size) {
            self.refresh_crc(fd, b)?;
        }
        Ok(())
    }

    /// Recomputes the CRC of present block `block` from the data file.
    pub fn refresh_crc(&mut self, fd: BorrowedFd, block: u64) -> sys::Result<()> {
        if self.present.contains(block) {
            let crc = self.read_block_crc(fd, block, &mut Vec::new())?;
            self.crcs.set(block, crc);
        }
        Ok(())
    }

    /// Reads block `block` (clipped to the logical size) and returns its CRC. A data file
    /// shorter than the map claims is `EIO`: the map and the file disagree.
    fn read_block_crc(&self, fd: BorrowedFd, block: u64, buf: &mut Vec<u8>) -> sys::Result<u32> {
        let bs = self.bs();
        let start = block * bs;
        let want = (start + bs).min(self.size).saturating_sub(start) as usize;
        buf.resize(want, 0);
        let got = sys::pread_full(fd, buf, start)?;
        if got < want {
            return Err(Errno::EIO);
        }
        Ok(block_crc(buf, self.block_size))
    }

    /// After a crash, reconciles the map of an *active* layer's partial file with its data
    /// file: takes the file's size, adopts whole blocks past the recorded size that the file
    /// holds data for (writes that were not yet recorded; they extend the file, so nothing
    /// below shows through there), and recomputes CRCs that no longer match (a torn or
    /// unrecorded overwrite of a present block). Unrecorded writes into blocks that were not
    /// present and lie below the recorded size are lost (those offsets keep reading from
    /// below), as unsynced writes may be. Never call this on a frozen layer: there a mismatch
    /// is damage, for `verify` to report.
    pub fn recover(&mut self, fd: BorrowedFd) -> sys::Result<Recovery> {
        let file_size = sys::fstat(fd)?.st_size as u64;
        let mut rec = Recovery::default();
        if file_size != self.size {
            rec.size_changed = Some((self.size, file_size));
            let old = self.size;
            let cut = self.truncate(file_size);
            if let Some(b) = cut {
                rec.recomputed.push(b);
            }
            if file_size > old {
                let bs = self.bs();
                let first = old.div_ceil(bs);
                for r in data_extents(fd, first * bs, file_size)? {
                    rec.adopted
                        .insert(blocks_of_bytes(r.start, r.end - r.start, bs));
                }
                rec.adopted.remove(0..first);
            }
        }
        let adopted: Vec<Range<u64>> = rec.adopted.iter().collect();
        for r in adopted {
            self.present.insert(r);
        }
        let mut buf = Vec::new();
        let extents: Vec<Range<u64>> = self.present.iter().collect();
        for b in extents.into_iter().flatten() {
            let crc = self.read_block_crc(fd, b, &mut buf)?;
            let adopted = rec.adopted.contains(b);
            if self.crcs.get(b) != crc || adopted {
                if !adopted && !rec.recomputed.contains(&b) {
                    rec.recomputed.push(b);
                }
                self.crcs.set(b, crc);
            }
        }
        rec.recomputed.sort_unstable();
        Ok(rec)
    }

    /// Checks the data file against the map: its size, and the CRC of every present block.
    /// Reads only present blocks, in large sequential chunks.
    pub fn verify(&self, fd: BorrowedFd) -> sys::Result<Vec<Damage>> {
        let mut out = Vec::new();
        let file_size = sys::fstat(fd)?.st_size as u64;
        if file_size != self.size {
            out.push(Damage::SizeMismatch {
                map_size: self.size,
                file_size,
            });
        }
        let bs = self.bs();
        let per_read = (1u64 << 20).max(bs) / bs;
        let mut buf = Vec::new();
        for ext in self.present.iter() {
            let mut b = ext.start;
            while b < ext.end {
                let n = per_read.min(ext.end - b);
                let start = b * bs;
                let len = ((b + n) * bs).min(self.size).saturating_sub(start) as usize;
                buf.resize(len, 0);
                let got = sys::pread_full(fd, &mut buf, start)?;
                buf[got..].fill(0); // a short file reads as zeros; the size finding says why
                for (i, chunk) in buf.chunks(bs as usize).enumerate() {
                    let block = b + i as u64;
                    let actual = block_crc(chunk, self.block_size);
                    let expected = self.crcs.get(block);
                    if actual != expected {
                        out.push(Damage::BlockCrc {
                            block,
                            expected,
                            actual,
                        });
                    }
                }
                b += n;
            }
        }
        Ok(out)
    }

    /// The length of `encode`'s result, without encoding.
    pub fn encoded_len(&self) -> u64 {
        let e = self.present.extent_count() as u64;
        HEADER_LEN_V1 as u64 + e * 16 + self.present.count_blocks() * 4 + 4
    }

    /// The sidecar encoding (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let e = self.present.extent_count();
        let nb = self.present.count_blocks() as usize;
        let mut v = Vec::with_capacity(HEADER_LEN_V1 + e * 16 + nb * 4 + 4);
        v.extend_from_slice(&MAP_MAGIC);
        v.extend_from_slice(&MAP_VERSION_MAJOR.to_le_bytes());
        v.extend_from_slice(&MAP_VERSION_MINOR.to_le_bytes());
        v.extend_from_slice(&(HEADER_LEN_V1 as u32).to_le_bytes());
        v.extend_from_slice(&self.id.0);
        v.extend_from_slice(&self.block_size.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes()); // flags
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.below_limit.to_le_bytes());
        v.extend_from_slice(&(e as u64).to_le_bytes());
        v.extend_from_slice(&(nb as u64).to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes()); // reserved
        debug_assert_eq!(v.len(), HEADER_LEN_V1);
        for r in self.present.iter() {
            v.extend_from_slice(&r.start.to_le_bytes());
            v.extend_from_slice(&r.end.to_le_bytes());
        }
        for b in self.present.blocks() {
            v.extend_from_slice(&self.crcs.get(b).to_le_bytes());
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// The map's checksum: the trailer of its encoding, as recorded in manifests.
    pub fn checksum(&self) -> u32 {
        let v = self.encode();
        u32::from_le_bytes(v[v.len() - 4..].try_into().expect("4 bytes"))
    }

    /// Decodes and validates a sidecar. Returns the map and its checksum.
    pub fn decode(bytes: &[u8]) -> Result<(BlockMap, u32), MapDecodeError> {
        use MapDecodeError as E;
        let len = bytes.len();
        if len < 16 {
            return Err(E::TooShort { len });
        }
        let magic: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
        if magic != MAP_MAGIC {
            return Err(E::BadMagic { found: magic });
        }
        let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().expect("2"));
        let (major, minor) = (u16_at(8), u16_at(10));
        if major != MAP_VERSION_MAJOR {
            return Err(E::UnsupportedVersion { major, minor });
        }
        if len < HEADER_LEN_V1 + 4 {
            return Err(E::TooShort { len });
        }
        let stored = u32::from_le_bytes(bytes[len - 4..].try_into().expect("4"));
        let computed = crc32c::crc32c(&bytes[..len - 4]);
        if stored != computed {
            return Err(E::ChecksumMismatch { stored, computed });
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8"));
        let header_len = u32_at(12) as usize;
        if header_len < HEADER_LEN_V1 || header_len > len - 4 {
            return Err(E::BadField {
                field: "header length",
                value: header_len as u64,
            });
        }
        let id = MapId(bytes[16..32].try_into().expect("16"));
        let block_size = u32_at(32);
        if check_block_size(u64::from(block_size)).is_err() {
            return Err(E::BadField {
                field: "block size",
                value: u64::from(block_size),
            });
        }
        let flags = u32_at(36);
        if flags != 0 {
            return Err(E::BadField {
                field: "flags",
                value: u64::from(flags),
            });
        }
        let size = u64_at(40);
        let below_limit = u64_at(48);
        let extents = u64_at(56);
        let nblocks = u64_at(64);
        let expected = header_len as u128 + extents as u128 * 16 + nblocks as u128 * 4 + 4;
        if expected != len as u128 {
            return Err(E::LengthMismatch { len, expected });
        }
        if below_limit > size {
            return Err(E::BelowLimitBeyondSize { below_limit, size });
        }
        let mut pos = header_len;
        let mut ranges = Vec::with_capacity(extents as usize);
        for _ in 0..extents {
            ranges.push(u64_at(pos)..u64_at(pos + 8));
            pos += 16;
        }
        let present = ExtentSet::try_from_ranges(ranges)?;
        if present.count_blocks() != nblocks {
            return Err(E::BadField {
                field: "present block count",
                value: nblocks,
            });
        }
        let bs = u64::from(block_size);
        if present.end() > size.div_ceil(bs) {
            return Err(E::BlockBeyondSize {
                block: present.end() - 1,
                size,
            });
        }
        let mut crcs = CrcTable::default();
        for b in present.blocks() {
            crcs.set(b, u32_at(pos));
            pos += 4;
        }
        let map = BlockMap {
            id,
            block_size,
            size,
            below_limit,
            present,
            crcs,
        };
        Ok((map, stored))
    }
}

/// Data (non-hole) byte ranges of `fd` within `[from, to)`, by `SEEK_DATA`/`SEEK_HOLE`. A
/// filesystem without hole reporting reports the whole range as data, which is still correct.
pub fn data_extents(fd: BorrowedFd, from: u64, to: u64) -> sys::Result<Vec<Range<u64>>> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        let data = match sys::lseek(fd, pos as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) => {
                out.push(pos..to);
                break;
            }
            Err(e) => return Err(e),
        };
        if data >= to {
            break;
        }
        let hole = (sys::lseek(fd, data as i64, libc::SEEK_HOLE)? as u64).min(to);
        out.push(data..hole);
        pos = hole;
    }
    Ok(out)
}

/// The block-map sidecars of one layer: a directory of `<map id>.lvmap` files.
#[derive(Debug, Clone)]
pub struct MapStore {
    dir: PathBuf,
}

impl MapStore {
    /// A store over `dir` (no I/O; the directory is made by `store::Volume`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        MapStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, id: MapId) -> PathBuf {
        self.dir.join(format!("{id}{MAP_FILE_SUFFIX}"))
    }

    /// Loads map `id`; checks that the sidecar really is map `id`.
    pub fn load(&self, id: MapId) -> Result<BlockMap> {
        self.load_with_checksum(id).map(|(m, _)| m)
    }

    /// Loads map `id` and returns its checksum too (for manifests).
    pub fn load_with_checksum(&self, id: MapId) -> Result<(BlockMap, u32)> {
        let path = self.path_of(id);
        let bytes = fs::read(&path).map_err(io("read block map", &path))?;
        let (map, crc) = BlockMap::decode(&bytes).map_err(|source| VolumeError::BadBlockMap {
            path: path.clone(),
            source,
        })?;
        if map.id != id {
            return Err(VolumeError::MapIdMismatch {
                path,
                expected: id,
                found: map.id,
            });
        }
        Ok((map, crc))
    }

    /// Stores `map` atomically (temp, fsync, rename) and returns its checksum. The rename is
    /// made durable by `sync`, once per batch: call it before reporting an fsync or a freeze
    /// as done.
    pub fn store(&self, map: &BlockMap) -> Result<u32> {
        let bytes = map.encode();
        let name = format!("{}{MAP_FILE_SUFFIX}", map.id);
        meta::write_atomic(&self.dir, &name, &bytes, false)?;
        Ok(u32::from_le_bytes(
            bytes[bytes.len() - 4..].try_into().expect("4 bytes"),
        ))
    }

    /// Writes `map` under a temporary name without waiting for the disk (see
    /// `meta::stage_unsynced`): `Staged::commit_in_batch` fsyncs and renames it into place.
    pub fn stage_unsynced(&self, map: &BlockMap) -> Result<meta::Staged> {
        let name = format!("{}{MAP_FILE_SUFFIX}", map.id);
        meta::stage_unsynced(&self.dir, &name, &map.encode())
    }

    /// Takes a temporary file and `len` bytes of space for map `id` (see `meta::reserve`),
    /// to be written by `fill` and made durable by `Staged::commit_in_batch`.
    pub fn reserve(&self, id: MapId, len: u64) -> Result<meta::Staged> {
        meta::reserve(&self.dir, &format!("{id}{MAP_FILE_SUFFIX}"), len)
    }

    /// `reserve` for a map not known yet: `Staged::retarget` names it.
    pub fn reserve_spare(&self, len: u64) -> Result<meta::Staged> {
        meta::reserve(&self.dir, "spare", len)
    }

    /// Writes `map` into the space `reserve` took for it: false (nothing written) if it
    /// does not fit.
    pub fn fill(staged: &mut meta::Staged, map: &BlockMap) -> Result<bool> {
        if map.encoded_len() > staged.reserved() {
            return Ok(false);
        }
        staged.fill(&map.encode())?;
        Ok(true)
    }

    /// fsyncs the directory: makes every stored map's rename durable.
    pub fn sync(&self) -> Result<()> {
        meta::sync_dir(&self.dir)
    }

    /// Removes map `id`; a missing map is not an error.
    pub fn remove(&self, id: MapId) -> Result<()> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove block map", &path)(e)),
        }
    }

    /// Ids of all stored maps, sorted. Names that are not `<id>.lvmap` (temporaries, strays)
    /// are skipped.
    pub fn list(&self) -> Result<Vec<MapId>> {
        let mut ids = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(io("list block maps in", &self.dir))?;
        for ent in rd {
            let ent = ent.map_err(io("list block maps in", &self.dir))?;
            let name = ent.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|s| s.strip_suffix(MAP_FILE_SUFFIX))
                .and_then(|s| s.parse::<MapId>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// One level of a file's data chain, topmost first: a readable file and, for a partial
/// file, its block map (whole files have none). The engine and squash read chains alike.
pub trait ChainLevel {
    fn data(&self) -> BorrowedFd<'_>;
    fn map(&self) -> Option<&BlockMap>;
}

/// Spans of one source less than this apart are read (or prefetched) with one call.
pub const CLUSTER_GAP: u64 = 32 << 10;

/// Reads `buf.len()` bytes at `off` through `levels` (zeros past every level's data).
pub fn read_chain<L: ChainLevel>(levels: &[L], off: u64, buf: &mut [u8]) -> sys::Result<()> {
    let end = off + buf.len() as u64;
    let plan = resolve_chain(levels, off..end);
    read_resolved(levels, &plan, off, buf)
}

/// Reads through one partial file's map: its own blocks from `fd`, the rest from `below`.
pub fn read_mapped<L: ChainLevel>(
    map: &BlockMap,
    fd: BorrowedFd,
    below: &[L],
    off: u64,
    buf: &mut [u8],
) -> sys::Result<()> {
    struct Top<'a>(BorrowedFd<'a>, &'a BlockMap);
    impl ChainLevel for Top<'_> {
        fn data(&self) -> BorrowedFd<'_> {
            self.0
        }
        fn map(&self) -> Option<&BlockMap> {
            Some(self.1)
        }
    }
    let top = Top(fd, map);
    let levels: Vec<&dyn ChainLevel> = std::iter::once(&top as &dyn ChainLevel)
        .chain(below.iter().map(|l| l as &dyn ChainLevel))
        .collect();
    read_chain(&levels, off, buf)
}

impl<T: ChainLevel + ?Sized> ChainLevel for &T {
    fn data(&self) -> BorrowedFd<'_> {
        (**self).data()
    }
    fn map(&self) -> Option<&BlockMap> {
        (**self).map()
    }
}

/// Which level of a chain supplies each byte of a range: `(Some(level index), span)` or
/// `(None, span)` for zeros. The spans are disjoint and cover the range.
///
/// Resolved once for the whole chain, top-down, so that each byte is read exactly once from
/// the level that holds it however deep the chain is (reading level by level, each through
/// the next, copied every byte once per level: a 16-level chain read at half the speed of a
/// single level).
fn resolve_chain<L: ChainLevel>(
    levels: &[L],
    range: Range<u64>,
) -> Vec<(Option<usize>, Range<u64>)> {
    let mut out = Vec::new();
    let mut pending = vec![range];
    for (i, level) in levels.iter().enumerate() {
        if pending.is_empty() {
            break;
        }
        let Some(map) = level.map() else {
            // A whole file: it has every byte (zeros past its end, as a short read gives).
            out.extend(pending.drain(..).map(|r| (Some(i), r)));
            break;
        };
        let mut next: Vec<Range<u64>> = Vec::new();
        for r in pending.drain(..) {
            let mut pos = r.start;
            for span in map.read_plan(r.start, r.end - r.start) {
                pos = span.range.end;
                match span.source {
                    Source::Here => out.push((Some(i), span.range)),
                    Source::Zero => out.push((None, span.range)),
                    Source::Below => match next.last_mut() {
                        Some(last) if last.end == span.range.start => {
                            *last = last.start..span.range.end
                        }
                        _ => next.push(span.range),
                    },
                }
            }
            // Past this level's logical size.
            if pos < r.end {
                out.push((None, pos..r.end));
            }
        }
        pending = next;
    }
    // Past the bottom of the chain.
    out.extend(pending.into_iter().map(|r| (None, r)));
    out
}

/// Fills `buf` (at file offset `off`) from a plan of `resolve_chain`, reading each span
/// straight into place.
///
/// I/O pattern (measured with a cold cache, see README): a whole file's spans less than
/// `CLUSTER_GAP` apart are read with one call, so that the data below scattered written
/// blocks is read sequentially and the kernel's readahead keeps working; what such a call
/// reads over belongs to other levels and is written over afterwards. A partial file's own
/// spans are read exactly (reading through its holes would only cost page-cache work), after
/// a prefetch of all of them, so that scattered blocks are fetched in parallel rather than
/// one by one.
fn read_resolved<L: ChainLevel>(
    levels: &[L],
    plan: &[(Option<usize>, Range<u64>)],
    off: u64,
    buf: &mut [u8],
) -> sys::Result<()> {
    let at = |r: &Range<u64>| (r.start - off) as usize..(r.end - off) as usize;
    let mut by_level: Vec<Vec<Range<u64>>> = vec![Vec::new(); levels.len()];
    let mut zeros = Vec::new();
    for (src, r) in plan {
        match src {
            Some(i) => by_level[*i].push(r.clone()),
            None => zeros.push(r.clone()),
        }
    }
    let read_level = |buf: &mut [u8], i: usize, spans: &mut Vec<Range<u64>>| {
        spans.sort_by_key(|r| r.start);
        let fd = levels[i].data();
        let whole = levels[i].map().is_none();
        let gap = if whole { CLUSTER_GAP } else { 0 };
        let mut clusters: Vec<Range<u64>> = Vec::new();
        for r in spans.iter() {
            match clusters.last_mut() {
                Some(c) if r.start <= c.end + gap => c.end = r.end,
                _ => clusters.push(r.clone()),
            }
        }
        if !whole && clusters.len() > 1 {
            for c in &clusters {
                will_need(fd, c.start, c.end);
            }
        }
        for c in &clusters {
            let piece = &mut buf[at(c)];
            let n = sys::pread_full(fd, piece, c.start)?;
            piece[n..].fill(0);
        }
        Ok(())
    };
    // Whole files first: they may read over other levels' spans. Then zeros and partial
    // files' blocks, which are disjoint.
    for (i, spans) in by_level.iter_mut().enumerate() {
        if levels[i].map().is_none() && !spans.is_empty() {
            read_level(buf, i, spans)?;
        }
    }
    for r in &zeros {
        buf[at(r)].fill(0);
    }
    for (i, spans) in by_level.iter_mut().enumerate() {
        if levels[i].map().is_some() && !spans.is_empty() {
            read_level(buf, i, spans)?;
        }
    }
    Ok(())
}

/// Asks the kernel to start reading `start..end` of `fd` into the page cache (advice only).
pub fn will_need(fd: BorrowedFd, start: u64, end: u64) {
    // SAFETY: a plain syscall on a valid fd; it only gives advice.
    unsafe {
        libc::posix_fadvise(
            fd.as_raw_fd(),
            start as libc::off_t,
            end.saturating_sub(start) as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    const BS: u32 = 4096;

    fn id(n: u8) -> MapId {
        MapId([n; 16])
    }

    fn spans(m: &BlockMap, off: u64, len: u64) -> Vec<(u64, u64, Source)> {
        m.read_plan(off, len)
            .into_iter()
            .map(|s| (s.range.start, s.range.end, s.source))
            .collect()
    }

    /// A partial file on disk plus the bytes of the file below, driven the way the engine
    /// will drive it: fill, write, record.
    struct Fixture {
        _dir: tempfile::TempDir,
        data: fs::File,
        below: Vec<u8>,
        map: BlockMap,
    }

    impl Fixture {
        fn new(below: Vec<u8>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let data = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("data"))
                .unwrap();
            data.set_len(below.len() as u64).unwrap();
            let map = BlockMap::new(id(1), BS, below.len() as u64).unwrap();
            Fixture {
                _dir: dir,
                data,
                below,
                map,
            }
        }

        fn write(&mut self, off: u64, bytes: &[u8]) {
            for s in self.map.write_fill(off, bytes.len() as u64) {
                let n = (s.range.end - s.range.start) as usize;
                let fill = match s.source {
                    Source::Below => {
                        self.below[s.range.start as usize..s.range.end as usize].to_vec()
                    }
                    Source::Zero => vec![0; n],
                    Source::Here => panic!("write_fill never asks to copy from here"),
                };
                self.data.write_all_at(&fill, s.range.start).unwrap();
            }
            self.data.write_all_at(bytes, off).unwrap();
            self.map
                .record_write(self.data.as_fd(), off, bytes)
                .unwrap();
        }

        /// Assembles the whole file from the read plan.
        fn read_all(&self) -> Vec<u8> {
            let mut out = Vec::new();
            for s in self.map.read_plan(0, u64::MAX) {
                let n = (s.range.end - s.range.start) as usize;
                match s.source {
                    Source::Here => {
                        let mut b = vec![0; n];
                        self.data.read_exact_at(&mut b, s.range.start).unwrap();
                        out.extend(b);
                    }
                    Source::Below => out.extend_from_slice(
                        &self.below[s.range.start as usize..s.range.end as usize],
                    ),
                    Source::Zero => out.extend(std::iter::repeat_n(0, n)),
                }
            }
            out
        }
    }

    #[test]
    fn fresh_map_reads_everything_from_below() {
        let m = BlockMap::new(id(1), BS, 10_000).unwrap();
        assert_eq!(spans(&m, 0, 1 << 20), vec![(0, 10_000, Source::Below)]);
        assert_eq!(spans(&m, 9_999, 5), vec![(9_999, 10_000, Source::Below)]);
        assert!(spans(&m, 10_000, 5).is_empty());
        assert!(spans(&m, 0, 0).is_empty());
        assert_eq!(m.present_bytes(), 0);
        assert_eq!(m.block_count(), 3);
        assert!(!m.is_complete());
        assert!(BlockMap::new(id(1), 1000, 0).is_err());
    }

    #[test]
    fn partial_write_fills_block_edges_from_below() {
        let below: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = Fixture::new(below.clone());
        // 10 bytes in the middle of block 1: the rest of block 1 comes from below first.
        assert_eq!(
            f.map
                .write_fill(5_000, 10)
                .into_iter()
                .map(|s| (s.range.start, s.range.end, s.source))
                .collect::<Vec<_>>(),
            vec![(4096, 5000, Source::Below), (5010, 8192, Source::Below)]
        );
        f.write(5_000, &[0xAA; 10]);
        assert_eq!(f.map.present().iter().collect::<Vec<_>>(), vec![1..2]);
        assert_eq!(
            spans(&f.map, 0, u64::MAX),
            vec![
                (0, 4096, Source::Below),
                (4096, 8192, Source::Here),
                (8192, 10_000, Source::Below)
            ]
        );
        let mut want = below.clone();
        want[5_000..5_010].fill(0xAA);
        assert_eq!(f.read_all(), want);
        assert!(f.map.verify(f.data.as_fd()).unwrap().is_empty());
        // A second write into the now-present block needs no fill.
        assert!(f.map.write_fill(4_100, 3).is_empty());
    }

    #[test]
    fn last_partial_block_and_extension() {
        let below = vec![7u8; 10_000];
        let mut f = Fixture::new(below);
        // Append past the end: the block holding the old end is filled up to the old end.
        assert_eq!(
            f.map
                .write_fill(10_000, 100)
                .into_iter()
                .map(|s| (s.range.start, s.range.end, s.source))
                .collect::<Vec<_>>(),
            vec![(8192, 10_000, Source::Below)]
        );
        f.write(10_000, &[1; 100]);
        assert_eq!(f.map.size(), 10_100);
        assert_eq!(f.map.below_limit(), 10_000);
        // A write far past the end leaves a hole that reads as zeros, not from below.
        f.write(20_000, &[2; 10]);
        assert_eq!(f.map.size(), 20_010);
        let all = f.read_all();
        assert_eq!(all.len(), 20_010);
        assert!(all[..10_000].iter().all(|b| *b == 7));
        assert!(all[10_000..10_100].iter().all(|b| *b == 1));
        assert!(all[10_100..20_000].iter().all(|b| *b == 0));
        assert!(all[20_000..].iter().all(|b| *b == 2));
        assert_eq!(
            spans(&f.map, 0, u64::MAX),
            vec![
                (0, 8192, Source::Below),
                (8192, 12288, Source::Here),
                (12288, 16384, Source::Zero),
                (16384, 20_010, Source::Here)
            ]
        );
        assert!(f.map.verify(f.data.as_fd()).unwrap().is_empty());
    }

    #[test]
    fn truncate_then_extend_never_shows_old_lower_data() {
        let below = vec![9u8; 3 * 4096];
        let mut f = Fixture::new(below);
        f.write(0, &[1; 4096]);
        f.write(4096 + 100, &[2; 10]); // block 1 present
        // Shrink into the middle of block 1: its CRC must be refreshed (tail cut off).
        let cut = f.map.truncate(4096 + 50);
        assert_eq!(cut, Some(1));
        f.data.set_len(4096 + 50).unwrap();
        f.map.refresh_crc(f.data.as_fd(), 1).unwrap();
        assert_eq!(f.map.below_limit(), 4096 + 50);
        assert!(f.map.verify(f.data.as_fd()).unwrap().is_empty());
        // Extend again: the bytes past the cut are zeros, never lower data.
        f.map.truncate_file(f.data.as_fd(), 3 * 4096).unwrap();
        let all = f.read_all();
        assert_eq!(all.len(), 3 * 4096);
        assert!(all[..4096].iter().all(|b| *b == 1));
        assert!(all[4096..4096 + 50].iter().all(|b| *b == 9));
        assert!(
            all[4096 + 50..].iter().all(|b| *b == 0),
            "no lower data past the truncate"
        );
        // Extending does not change CRCs (padding counts as zeros).
        assert!(f.map.verify(f.data.as_fd()).unwrap().is_empty());
        // Shrink to a block boundary: nothing to refresh, blocks past it dropped.
        assert_eq!(f.map.truncate(4096), None);
        f.data.set_len(4096).unwrap();
        assert_eq!(f.map.present().iter().collect::<Vec<_>>(), vec![0..1]);
        // Shrink to zero: nothing left, nothing from below.
        f.map.truncate_file(f.data.as_fd(), 0).unwrap();
        assert!(f.map.present().is_empty());
        assert_eq!(f.map.below_limit(), 0);
        assert!(f.map.is_complete());
        f.map.truncate_file(f.data.as_fd(), 100).unwrap();
        assert_eq!(f.read_all(), vec![0; 100]);
    }

    #[test]
    fn truncate_shrink_of_absent_block_keeps_below_prefix() {
        let below: Vec<u8> = (0..12_288u32).map(|i| (i % 200) as u8 + 1).collect();
        let mut f = Fixture::new(below.clone());
        assert_eq!(f.map.truncate(9_000), None); // block 2 not present: nothing to refresh
        f.data.set_len(9_000).unwrap();
        f.map.truncate_file(f.data.as_fd(), 12_288).unwrap();
        let all = f.read_all();
        assert_eq!(&all[..9_000], &below[..9_000]);
        assert!(all[9_000..].iter().all(|b| *b == 0));
        // A write into block 2 now fills 8192..9000 from below, and zeros after.
        let fill: Vec<_> = f
            .map
            .write_fill(10_000, 1)
            .into_iter()
            .map(|s| (s.range.start, s.range.end, s.source))
            .collect();
        assert_eq!(
            fill,
            vec![
                (8192, 9000, Source::Below),
                (9000, 10_000, Source::Zero),
                (10_001, 12_288, Source::Zero)
            ]
        );
    }

    #[test]
    fn zeroed_range_marks_blocks_present() {
        let below = vec![5u8; 4 * 4096];
        let mut f = Fixture::new(below);
        for s in f.map.write_fill(100, 3 * 4096) {
            let n = (s.range.end - s.range.start) as usize;
            let fill = match s.source {
                Source::Below => vec![5u8; n],
                _ => vec![0; n],
            };
            f.data.write_all_at(&fill, s.range.start).unwrap();
        }
        f.data.write_all_at(&vec![0; 3 * 4096], 100).unwrap();
        f.map.record_zeroed(f.data.as_fd(), 100, 3 * 4096).unwrap();
        assert_eq!(f.map.present().iter().collect::<Vec<_>>(), vec![0..4]);
        let all = f.read_all();
        assert!(all[..100].iter().all(|b| *b == 5));
        assert!(all[100..100 + 3 * 4096].iter().all(|b| *b == 0));
        assert!(all[100 + 3 * 4096..].iter().all(|b| *b == 5));
        assert!(f.map.verify(f.data.as_fd()).unwrap().is_empty());
    }

    #[test]
    fn corrupt_data_is_detected() {
        let mut f = Fixture::new(vec![3u8; 5 * 4096]);
        f.write(4096, &[1; 2 * 4096]);
        f.write(4 * 4096, &[2; 100]);
        assert!(f.map.verify(f.data.as_fd()).unwrap().is_empty());
        // Flip one byte in block 2.
        f.data.write_all_at(&[0xFF], 2 * 4096 + 17).unwrap();
        let d = f.map.verify(f.data.as_fd()).unwrap();
        assert_eq!(d.len(), 1);
        assert!(
            matches!(d[0], Damage::BlockCrc { block: 2, expected, actual } if expected != actual)
        );
        // Bytes outside present blocks are not checked (they are never read).
        f.data.write_all_at(&[0xFF], 17).unwrap();
        assert_eq!(f.map.verify(f.data.as_fd()).unwrap().len(), 1);
        // A truncated data file is a size finding plus the blocks it lost.
        f.data.set_len(4 * 4096).unwrap();
        let d = f.map.verify(f.data.as_fd()).unwrap();
        assert!(d.contains(&Damage::SizeMismatch {
            map_size: 5 * 4096,
            file_size: 4 * 4096
        }));
        assert!(
            d.iter()
                .any(|x| matches!(x, Damage::BlockCrc { block: 4, .. }))
        );
    }

    #[test]
    fn encode_decode_roundtrip() {
        let mut f = Fixture::new(vec![1u8; 100_000]);
        f.write(0, &[2; 5000]);
        f.write(50_000, &[3; 20_000]);
        f.write(99_990, &[4; 30]);
        let bytes = f.map.encode();
        assert_eq!(&bytes[..8], b"LVBLKMAP");
        let (back, crc) = BlockMap::decode(&bytes).unwrap();
        assert_eq!(back, f.map);
        assert_eq!(crc, f.map.checksum());
        assert_eq!(back.encode(), bytes);
        for b in f.map.present().blocks() {
            assert_eq!(back.crc(b), f.map.crc(b));
        }
        assert_eq!(back.crc(3), None);
        // The empty map too.
        let m = BlockMap::new(id(9), 512, 0).unwrap();
        assert_eq!(BlockMap::decode(&m.encode()).unwrap().0, m);
    }

    #[test]
    fn decode_rejects_damage() {
        let mut f = Fixture::new(vec![1u8; 50_000]);
        f.write(4096, &[2; 9000]);
        let good = f.map.encode();
        // Every single-byte flip is caught (magic, version, checksum or field checks).
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(
                BlockMap::decode(&bad).is_err(),
                "flip at byte {i} undetected"
            );
        }
        // Every truncation too.
        for n in 0..good.len() {
            assert!(
                BlockMap::decode(&good[..n]).is_err(),
                "truncation to {n} undetected"
            );
        }
        assert!(matches!(
            BlockMap::decode(b"not a map at all, really"),
            Err(MapDecodeError::BadMagic { .. })
        ));
        let mut v2 = good.clone();
        v2[8] = 2;
        assert_eq!(
            BlockMap::decode(&v2).unwrap_err(),
            MapDecodeError::UnsupportedVersion { major: 2, minor: 0 }
        );
    }

    /// Re-seals a hand-edited encoding so that the field checks (not the checksum) are tested.
    fn reseal(mut v: Vec<u8>) -> Vec<u8> {
        let n = v.len();
        let crc = crc32c::crc32c(&v[..n - 4]);
        v[n - 4..].copy_from_slice(&crc.to_le_bytes());
        v
    }

    #[test]
    fn decode_checks_invariants_behind_a_valid_checksum() {
        let mut f = Fixture::new(vec![1u8; 50_000]);
        f.write(4096, &[2; 9000]);
        let good = f.map.encode();
        // below limit > size
        let mut v = good.clone();
        v[48..56].copy_from_slice(&60_000u64.to_le_bytes());
        assert!(matches!(
            BlockMap::decode(&reseal(v)),
            Err(MapDecodeError::BelowLimitBeyondSize { .. })
        ));
        // size shrunk below the present blocks
        let mut v = good.clone();
        v[40..48].copy_from_slice(&5000u64.to_le_bytes());
        v[48..56].copy_from_slice(&5000u64.to_le_bytes());
        assert!(matches!(
            BlockMap::decode(&reseal(v)),
            Err(MapDecodeError::BlockBeyondSize { .. })
        ));
        // bad block size, unknown flag
        let mut v = good.clone();
        v[32..36].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            BlockMap::decode(&reseal(v)),
            Err(MapDecodeError::BadField {
                field: "block size",
                ..
            })
        ));
        let mut v = good.clone();
        v[36] = 1;
        assert!(matches!(
            BlockMap::decode(&reseal(v)),
            Err(MapDecodeError::BadField { field: "flags", .. })
        ));
        // a huge extent count is a length mismatch, checked before allocating
        let mut v = good.clone();
        v[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            BlockMap::decode(&reseal(v)),
            Err(MapDecodeError::LengthMismatch { .. })
        ));
        // a newer minor with a longer header is still read
        let mut v = good[..HEADER_LEN_V1].to_vec();
        v[10] = 3;
        v[12..16].copy_from_slice(&(HEADER_LEN_V1 as u32 + 8).to_le_bytes());
        v.extend_from_slice(&[0xEE; 8]);
        v.extend_from_slice(&good[HEADER_LEN_V1..]);
        let (m, _) = BlockMap::decode(&reseal(v)).unwrap();
        assert_eq!(m, f.map);
    }

    #[test]
    fn marker_roundtrip_and_rejects() {
        let i = MapId::random().unwrap();
        assert_eq!(decode_marker(&encode_marker(i)).unwrap(), i);
        for bad in [
            &b""[..],
            b"1:",
            b"2:00000000000000000000000000000000",
            b"1:xyz",
            b"\xff",
        ] {
            assert!(decode_marker(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn marker_xattr_on_a_real_file() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), b"x").unwrap();
        let dir = fs::File::open(d.path()).unwrap();
        let i = MapId::random().unwrap();
        assert_eq!(read_marker(dir.as_fd(), c"f", true).unwrap(), None);
        // user.* works for any owner on filesystems with user xattrs (tmpfs >= 6.6, ext4).
        match write_marker(dir.as_fd(), c"f", i, true) {
            Ok(()) => assert_eq!(read_marker(dir.as_fd(), c"f", true).unwrap(), Some(i)),
            Err(Errno::EOPNOTSUPP) => eprintln!("no user xattrs on the temp dir's filesystem"),
            Err(e) => panic!("setting the marker failed: {e}"),
        }
    }

    #[test]
    fn map_store_roundtrip_list_remove() {
        let d = tempfile::tempdir().unwrap();
        let st = MapStore::new(d.path());
        let mut f = Fixture::new(vec![0u8; 9000]);
        f.write(0, b"hello");
        let crc = st.store(&f.map).unwrap();
        st.sync().unwrap();
        assert_eq!(crc, f.map.checksum());
        let other = BlockMap::new(id(2), BS, 1).unwrap();
        st.store(&other).unwrap();
        fs::write(d.path().join("junk.txt"), b"").unwrap();
        assert_eq!(st.list().unwrap(), vec![id(1), id(2)]);
        let (back, c) = st.load_with_checksum(id(1)).unwrap();
        assert_eq!(back, f.map);
        assert_eq!(c, crc);
        // A sidecar renamed to another id is caught.
        fs::copy(st.path_of(id(2)), st.path_of(id(3))).unwrap();
        let e = st.load(id(3)).unwrap_err();
        assert!(matches!(e, VolumeError::MapIdMismatch { .. }), "{e}");
        // A damaged one names its path.
        fs::write(st.path_of(id(2)), b"LVBLKMAP\x01\x00garbage").unwrap();
        let e = st.load(id(2)).unwrap_err();
        assert!(matches!(&e, VolumeError::BadBlockMap { path, .. } if path == &st.path_of(id(2))));
        st.remove(id(1)).unwrap();
        st.remove(id(1)).unwrap();
        assert!(matches!(st.load(id(1)), Err(VolumeError::Io { .. })));
    }

    #[test]
    fn recover_reconciles_with_data_file() {
        let mut f = Fixture::new(vec![4u8; 8192]);
        f.write(0, &[1; 4096]);
        let stored = f.map.clone();
        // Unrecorded: overwrite of block 0 and an append of two blocks.
        f.data.write_all_at(&[9; 10], 0).unwrap();
        f.data.write_all_at(&[8; 8192], 8192).unwrap();
        let mut m = stored.clone();
        let r = m.recover(f.data.as_fd()).unwrap();
        assert_eq!(r.size_changed, Some((8192, 16384)));
        assert_eq!(r.adopted.iter().collect::<Vec<_>>(), vec![2..4]);
        assert_eq!(r.recomputed, vec![0]);
        assert!(m.verify(f.data.as_fd()).unwrap().is_empty());
        f.map = m;
        let all = f.read_all();
        assert_eq!(&all[..10], &[9; 10]);
        assert!(all[4096..8192].iter().all(|b| *b == 4));
        assert!(all[8192..].iter().all(|b| *b == 8));
        // A shrunk file: the map follows.
        f.data.set_len(100).unwrap();
        let r = f.map.recover(f.data.as_fd()).unwrap();
        assert_eq!(r.size_changed, Some((16384, 100)));
        assert_eq!(f.map.below_limit(), 100);
        assert!(f.map.verify(f.data.as_fd()).unwrap().is_empty());
    }

    #[test]
    fn record_blocks_from_memory() {
        let mut m = BlockMap::new(id(1), 512, 2000).unwrap();
        let data = vec![6u8; 512 + 200];
        m.record_blocks(2, &data); // blocks 2 and 3, the last ends at 1024 + 712 = 1736
        assert_eq!(m.present().iter().collect::<Vec<_>>(), vec![2..4]);
        assert_eq!(m.crc(2), Some(block_crc(&[6; 512], 512)));
        assert_eq!(m.crc(3), Some(block_crc(&[6; 200], 512)));
        assert_eq!(m.size(), 2000);
    }

    #[test]
    fn block_crc_pads_with_zeros() {
        let mut full = vec![0u8; 4096];
        full[..3].copy_from_slice(b"abc");
        assert_eq!(block_crc(b"abc", 4096), crc32c::crc32c(&full));
        let big = vec![0u8; 1 << 20];
        assert_eq!(block_crc(&[], 1 << 20), crc32c::crc32c(&big));
    }

    #[test]
    fn big_sequential_write_is_one_extent_and_small_map() {
        let mut m = BlockMap::new(id(1), BS, 1 << 30).unwrap();
        // Record 1 GiB as 256 KiB chunks of (logically) zero data.
        let chunk = vec![0u8; 256 << 10];
        for i in 0..(1u64 << 30) / chunk.len() as u64 {
            m.record_blocks(i * 64, &chunk);
        }
        assert_eq!(m.present().extent_count(), 1);
        assert!(m.is_complete());
        assert_eq!(m.present_bytes(), 1 << 30);
        assert_eq!(m.encode().len(), HEADER_LEN_V1 + 16 + 262_144 * 4 + 4);
        assert_eq!(spans(&m, 0, u64::MAX), vec![(0, 1 << 30, Source::Here)]);
    }

    // Property test: random writes, truncates and zeroings on a real sparse file, checked
    // against a plain byte-vector model of the file; read_plan must assemble the model
    // exactly, for the whole file and for random windows, and verify must stay clean.
    #[derive(Debug, Clone)]
    enum Op {
        Write { off: u64, len: u64, byte: u8 },
        Truncate(u64),
        Zero { off: u64, len: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..12_000, 1u64..3_000, 1u8..255)
                .prop_map(|(off, len, byte)| Op::Write { off, len, byte }),
            2 => (0u64..12_000).prop_map(Op::Truncate),
            1 => (0u64..12_000, 1u64..3_000).prop_map(|(off, len)| Op::Zero { off, len }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn read_plan_matches_model(
            below_len in 0usize..9_000,
            ops in proptest::collection::vec(op(), 0..25),
            windows in proptest::collection::vec((0u64..13_000, 0u64..6_000), 1..8),
        ) {
            let below: Vec<u8> = (0..below_len).map(|i| (i % 97) as u8 + 100).collect();
            let mut f = Fixture { map: BlockMap::new(id(1), 512, below_len as u64).unwrap(), ..Fixture::new(below.clone()) };
            let mut model = below.clone();
            for o in &ops {
                match *o {
                    Op::Write { off, len, byte } => {
                        let data = vec![byte; len as usize];
                        f.write(off, &data);
                        let end = (off + len) as usize;
                        if model.len() < end { model.resize(end, 0); }
                        model[off as usize..end].fill(byte);
                    }
                    Op::Truncate(n) => {
                        f.map.truncate_file(f.data.as_fd(), n).unwrap();
                        model.resize(n as usize, 0);
                    }
                    Op::Zero { off, len } => {
                        let end = (off + len).min(f.map.size());
                        if off < end {
                            for s in f.map.write_fill(off, end - off) {
                                let n = (s.range.end - s.range.start) as usize;
                                let fill = match s.source {
                                    Source::Below => below[s.range.start as usize..s.range.end as usize].to_vec(),
                                    _ => vec![0; n],
                                };
                                f.data.write_all_at(&fill, s.range.start).unwrap();
                            }
                            f.data.write_all_at(&vec![0; (end - off) as usize], off).unwrap();
                            f.map.record_zeroed(f.data.as_fd(), off, end - off).unwrap();
                            model[off as usize..end as usize].fill(0);
                        }
                    }
                }
                prop_assert_eq!(f.map.size(), model.len() as u64);
                prop_assert!(f.map.below_limit() <= f.map.size());
            }
            prop_assert_eq!(f.read_all(), model.clone());
            prop_assert!(f.map.verify(f.data.as_fd()).unwrap().is_empty());
            for (off, len) in windows {
                let plan = f.map.read_plan(off, len);
                // Spans are contiguous, ordered, clipped, non-empty, merged.
                let end = off.saturating_add(len).min(model.len() as u64);
                let mut pos = off;
                for (i, s) in plan.iter().enumerate() {
                    prop_assert_eq!(s.range.start, pos);
                    prop_assert!(s.range.start < s.range.end);
                    if i > 0 { prop_assert_ne!(plan[i - 1].source, s.source); }
                    if s.source == Source::Below { prop_assert!(s.range.end <= f.map.below_limit()); }
                    pos = s.range.end;
                }
                prop_assert_eq!(pos, end.max(off).min(if off >= end { off } else { end }));
                let assembled: Vec<u8> = plan.iter().flat_map(|s| {
                    let n = (s.range.end - s.range.start) as usize;
                    match s.source {
                        Source::Here => { let mut b = vec![0; n]; f.data.read_exact_at(&mut b, s.range.start).unwrap(); b }
                        Source::Below => below[s.range.start as usize..s.range.end as usize].to_vec(),
                        Source::Zero => vec![0; n],
                    }
                }).collect();
                let want = if off >= end { Vec::new() } else { model[off as usize..end as usize].to_vec() };
                prop_assert_eq!(assembled, want);
            }
            let (back, _) = BlockMap::decode(&f.map.encode()).unwrap();
            prop_assert_eq!(back, f.map.clone());
        }

        /// A chain of partial files over a whole file reads what writes and truncates, level
        /// by level, left: every byte from the topmost level that has it, zeros past each
        /// level's data (whole files' reads over other levels' spans are written over).
        #[test]
        fn read_chain_matches_model(
            base_len in 0usize..120_000,
            levels in proptest::collection::vec(
                proptest::collection::vec((0u64..130_000, 1u64..3_000, 1u8..255, any::<bool>()), 0..10),
                0..6),
            windows in proptest::collection::vec((0u64..140_000, 0u64..70_000), 1..6),
        ) {
            struct L(fs::File, Option<BlockMap>);
            impl ChainLevel for L {
                fn data(&self) -> BorrowedFd<'_> { self.0.as_fd() }
                fn map(&self) -> Option<&BlockMap> { self.1.as_ref() }
            }
            let dir = tempfile::tempdir().unwrap();
            let base: Vec<u8> = (0..base_len).map(|i| (i % 89) as u8 + 1).collect();
            std::fs::write(dir.path().join("base"), &base).unwrap();
            let mut chain = vec![L(fs::File::open(dir.path().join("base")).unwrap(), None)];
            let mut model = base;
            let mut fixtures = Vec::new();
            for (n, ops) in levels.iter().enumerate() {
                let mut f = Fixture { map: BlockMap::new(id(n as u8), 512, model.len() as u64).unwrap(), ..Fixture::new(model.clone()) };
                for &(off, len, byte, truncate) in ops {
                    if truncate {
                        let n = off.min(model.len() as u64 + 5_000);
                        f.map.truncate_file(f.data.as_fd(), n).unwrap();
                        model.resize(n as usize, 0);
                    } else {
                        f.write(off, &vec![byte; len as usize]);
                        let end = (off + len) as usize;
                        if model.len() < end { model.resize(end, 0); }
                        model[off as usize..end].fill(byte);
                    }
                }
                fixtures.push(f);
            }
            for f in fixtures {
                chain.insert(0, L(f.data, Some(f.map)));
                drop(f._dir);
            }
            for (off, len) in windows {
                let mut buf = vec![0xEEu8; len as usize];
                read_chain(&chain, off, &mut buf).unwrap();
                let want: Vec<u8> = (off..off + len).map(|o| model.get(o as usize).copied().unwrap_or(0)).collect();
                prop_assert_eq!(buf, want);
            }
        }
    }
}
