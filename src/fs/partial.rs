//! Block-level copy-up (volume mode): partial files in the upper.
//!
//! Opening a lower file for writing does not copy its data: the upper gets a *partial file*
//! (see `volume::blockmap`): a sparse file of the same size, marked with its block map's id,
//! whose `layervol.below` xattr names (as a file handle) the object it was copied from. Each
//! write first completes the blocks it touches only partly (from below), then writes, then
//! records the blocks as present with their CRC32C. A read takes each span from the topmost
//! level that has it, following `below` down to a whole file. So a snapshot's layer holds the
//! blocks written in its epoch and nothing else.
//!
//! Maps of the active layer are live in their node (`Node::partial`) and written to the
//! layer's `maps/` on fsync, release and freeze; maps of frozen layers are immutable and
//! cached by id.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use super::{Node, Overlay};
use crate::layer;
use crate::sys::{self, Errno, Result};
use crate::volume::MapId;
use crate::volume::blockmap::{self, BlockMap, CLUSTER_GAP, MapStore, Source, will_need};
use crate::volume::meta;

/// The live map of an active layer's partial file.
#[derive(Debug)]
pub struct PartialState {
    pub map: BlockMap,
    /// Changed since it was last stored.
    pub dirty: bool,
    /// The data below the partial file, topmost first.
    pub below: Arc<Vec<Level>>,
}

/// One level of a file's data: a readable fd and, for a partial file, its map.
#[derive(Debug)]
pub struct Level {
    fd: OwnedFd,
    map: Option<Arc<BlockMap>>,
}

/// A frozen partial file's map and the levels below it, resolved once per open handle.
#[derive(Debug)]
pub struct FrozenChain {
    map: Arc<BlockMap>,
    below: Vec<Level>,
}

/// Our own readahead for a handle reading a partial file sequentially (see `prefetch`).
#[derive(Debug, Default)]
pub struct ReadAhead {
    /// End of the last read: the next read is sequential if it starts here.
    seq_end: std::sync::atomic::AtomicU64,
    /// Blocks of the chain's partial levels are prefetched up to here.
    prefetched: std::sync::atomic::AtomicU64,
    /// The access time was brought up to date (see `touch_atime`).
    atime_done: std::sync::atomic::AtomicBool,
}

/// How far ahead of a sequential reader the partial levels are prefetched.
const LOOKAHEAD: u64 = 8 << 20;

/// Where volume mode keeps block maps.
#[derive(Debug, Clone)]
pub struct MapDirs {
    /// `VOL/layers`: every layer's `maps/` is below it.
    pub layers: PathBuf,
}

fn below_key(userxattr: bool) -> CString {
    let p = if userxattr { "user" } else { "trusted" };
    CString::new(format!("{p}.layervol.below")).expect("no NUL")
}

impl blockmap::ChainLevel for Level {
    fn data(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    fn map(&self) -> Option<&BlockMap> {
        self.map.as_deref()
    }
}

impl Overlay {
    pub(super) fn partial_enabled(&self) -> bool {
        self.cfg.maps.is_some()
    }

    /// The `maps/` of the active layer (next to its tree).
    fn active_maps(&self) -> Result<MapStore> {
        let up = self.upper()?;
        let parent = up.path.parent().ok_or(Errno::EIO)?;
        Ok(MapStore::new(parent.join("maps")))
    }

    /// A frozen layer's map, found by id in the volume's layers.
    fn find_map(&self, id: MapId) -> Result<Arc<BlockMap>> {
        if let Some(m) = self.frozen_maps.get(&id) {
            return Ok(m.clone());
        }
        let dirs = self.cfg.maps.as_ref().ok_or(Errno::EIO)?;
        for e in std::fs::read_dir(&dirs.layers)
            .map_err(|_| Errno::EIO)?
            .flatten()
        {
            let store = MapStore::new(e.path().join("maps"));
            if store.path_of(id).exists() {
                let m = Arc::new(store.load(id).map_err(|_| Errno::EIO)?);
                self.frozen_maps.insert(id, m.clone());
                return Ok(m);
            }
        }
        tracing::error!("block map {id} not found in any layer");
        Err(Errno::EIO)
    }

    fn marker_of(&self, fd: BorrowedFd) -> Result<Option<MapId>> {
        match sys::fgetxattr(fd, blockmap::marker_xattr(self.cfg.userxattr))? {
            None => Ok(None),
            Some(v) => blockmap::decode_marker(&v)
                .map(Some)
                .map_err(|_| Errno::EUCLEAN),
        }
    }

    /// True if the open file is a partial file.
    pub(super) fn is_partial(&self, fd: BorrowedFd) -> Result<bool> {
        Ok(self.partial_enabled() && self.marker_of(fd)?.is_some())
    }

    /// The levels of data below a partial file (not including it).
    fn chain_below(&self, fd: BorrowedFd) -> Result<Vec<Level>> {
        let mut levels = Vec::new();
        let key = below_key(self.cfg.userxattr);
        let mut cur = sys::fgetxattr(fd, &key)?;
        while let Some(fb) = cur.take() {
            if levels.len() > 4096 {
                return Err(Errno::ELOOP);
            }
            // Any layer root serves as mount fd: a volume's layers share one filesystem.
            let layers = self.layers();
            let mount = layers
                .upper
                .as_ref()
                .or(layers.lowers.first().map(|(_, l)| l))
                .ok_or(Errno::EIO)?;
            let lfd = layer::open_by_fb(&fb, mount.root_rd.as_fd(), libc::O_RDONLY)?;
            let map = match self.marker_of(lfd.as_fd())? {
                Some(id) => {
                    cur = sys::fgetxattr(lfd.as_fd(), &key)?;
                    Some(self.find_map(id)?)
                }
                None => None,
            };
            levels.push(Level { fd: lfd, map });
        }
        Ok(levels)
    }

    /// The live map of the node's upper partial file, loading it (and reconciling it with
    /// its data file after a crash) on first use.
    pub(super) fn live_partial<'a>(
        &self,
        node: &'a Node,
        fd: BorrowedFd,
    ) -> Result<Option<parking_lot::MutexGuard<'a, Option<PartialState>>>> {
        let mut g = node.partial.lock();
        if g.is_none() {
            let Some(id) = self.marker_of(fd)? else {
                return Ok(None);
            };
            let mut map = self.active_maps()?.load(id).map_err(|_| Errno::EIO)?;
            let rec = map.recover(fd)?;
            let dirty = rec.size_changed.is_some() || !rec.recomputed.is_empty();
            *g = Some(PartialState {
                map,
                dirty,
                below: Arc::new(self.chain_below(fd)?),
            });
            self.live_partials.insert(node.ino, ());
        }
        Ok(Some(g))
    }

    /// Copy-up of a regular file as a partial file: metadata only, no data.
    pub(super) fn make_partial_copy(&self, node: &Node) -> Result<(CString, PartialState)> {
        let lay = node.layout();
        let src = lay.lower.as_ref().ok_or(Errno::EIO)?;
        let lower = self.lower(src.layer)?;
        let (ldir, lname) = lower.parent_of(&src.path)?;
        let st = sys::fstatat(ldir.as_fd(), &lname)?;
        let tmp = self.make_copy(node, false)?;
        let wdir = self.work()?.root.as_fd();
        let made = (|| -> Result<PartialState> {
            let f = sys::openat(wdir, &tmp, libc::O_WRONLY, 0)?;
            sys::ftruncate(f.as_fd(), st.st_size as u64)?;
            // The truncate stamped "now": a copy-up keeps the file's times.
            let times = sys::times_of(&st);
            sys::utimensat(wdir, &tmp, &times)?;
            let below = lower.origin(ldir.as_fd(), &lname)?;
            sys::setxattr(wdir, &tmp, &below_key(self.cfg.userxattr), &below, 0)?;
            let id = MapId::random().map_err(|_| Errno::EIO)?;
            let map = BlockMap::new(id, self.cfg.block_size as u32, st.st_size as u64)
                .map_err(|_| Errno::EINVAL)?;
            self.active_maps()?.store(&map).map_err(|e| e.errno())?;
            blockmap::write_marker(wdir, &tmp, id, self.cfg.userxattr)?;
            let lfd = sys::openat(ldir.as_fd(), &lname, libc::O_RDONLY, 0)?;
            let mut below = Vec::new();
            let lmap = match self.marker_of(lfd.as_fd())? {
                Some(id) => Some(self.find_map(id)?),
                None => None,
            };
            let deeper = if lmap.is_some() {
                self.chain_below(lfd.as_fd())?
            } else {
                Vec::new()
            };
            below.push(Level { fd: lfd, map: lmap });
            below.extend(deeper);
            Ok(PartialState {
                map,
                dirty: false,
                below: Arc::new(below),
            })
        })();
        match made {
            Ok(ps) => Ok((tmp, ps)),
            Err(e) => {
                let _ = super::copyup::remove_tree(wdir, &tmp);
                Err(e)
            }
        }
    }

    /// Prefetches the blocks the partial levels (`top` and the partial files below it) hold
    /// in `from..to`. Their written blocks are scattered, so a sequential read of the file
    /// would otherwise fetch them one small synchronous read at a time; the kernel's
    /// readahead serves the whole file at the bottom of the chain.
    fn prefetch(top: (BorrowedFd, &BlockMap), below: &[Level], from: u64, to: u64) {
        let levels = std::iter::once(top).chain(
            below
                .iter()
                .filter_map(|l| l.map.as_deref().map(|m| (l.fd.as_fd(), m))),
        );
        for (fd, map) in levels {
            let mut cluster: Option<(u64, u64)> = None;
            for span in map.read_plan(from, to.saturating_sub(from)) {
                if span.source != Source::Here {
                    continue;
                }
                let r = span.range;
                cluster = match cluster {
                    Some((s, e)) if r.start <= e + CLUSTER_GAP => Some((s, r.end)),
                    Some((s, e)) => {
                        will_need(fd, s, e);
                        Some((r.start, r.end))
                    }
                    None => Some((r.start, r.end)),
                };
            }
            if let Some((s, e)) = cluster {
                will_need(fd, s, e);
            }
        }
    }

    /// Starts `prefetch` ahead of a sequential reader.
    fn read_ahead(
        ra: &ReadAhead,
        top: (BorrowedFd, &BlockMap),
        below: &[Level],
        off: u64,
        len: u64,
    ) {
        use std::sync::atomic::Ordering::AcqRel;
        let end = off + len;
        if ra.seq_end.swap(end, AcqRel) != off {
            return;
        }
        let done = ra.prefetched.load(std::sync::atomic::Ordering::Acquire);
        if end + LOOKAHEAD / 2 <= done {
            return;
        }
        let to = end + LOOKAHEAD;
        ra.prefetched
            .store(to, std::sync::atomic::Ordering::Release);
        Self::prefetch(top, below, done.max(off), to);
    }

    /// Reading a partial file may read none of its own blocks, so the filesystem would not
    /// update its access time: do it as `relatime` does (when the access time is not after
    /// the modification or change time, or is a day old), once per handle.
    fn touch_atime(ra: &ReadAhead, fd: BorrowedFd) {
        use std::sync::atomic::Ordering::AcqRel;
        if ra.atime_done.swap(true, AcqRel) {
            return;
        }
        let Ok(st) = sys::fstat(fd) else { return };
        let t = |s: i64, ns: i64| (s, ns);
        let atime = t(st.st_atime, st.st_atime_nsec);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let stale = atime <= t(st.st_mtime, st.st_mtime_nsec)
            || atime <= t(st.st_ctime, st.st_ctime_nsec)
            || now - st.st_atime >= 24 * 3600;
        if stale {
            let times = [
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
            ];
            // SAFETY: a valid fd and two timespecs.
            unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) };
        }
    }

    /// A read from a partial file (live or frozen) into `buf`, every byte of which it writes
    /// up to the file's size. Returns how many that is.
    pub(super) fn read_partial(
        &self,
        node: &Node,
        fd: BorrowedFd,
        cache: &parking_lot::Mutex<Option<Arc<FrozenChain>>>,
        ra: &ReadAhead,
        off: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let size = buf.len() as u64;
        // A live map (the active layer's file, or an open unlinked one) is the truth.
        let live = if node.partial.lock().is_some() || node.has_upper() {
            self.live_partial(node, fd)?
        } else {
            None
        };
        if let Some(g) = live
            && let Some(ps) = g.as_ref()
        {
            let n = (ps.map.size().saturating_sub(off)).min(size) as usize;
            Self::touch_atime(ra, fd);
            Self::read_ahead(ra, (fd, &ps.map), &ps.below, off, n as u64);
            blockmap::read_mapped(&ps.map, fd, &ps.below, off, &mut buf[..n])?;
            return Ok(n);
        }
        // A frozen partial file (the node lives in a lower layer now): immutable, so its
        // chain is resolved once per handle.
        let chain = {
            let mut c = cache.lock();
            match &*c {
                Some(ch) => ch.clone(),
                None => {
                    let id = self.marker_of(fd)?.ok_or(Errno::EIO)?;
                    let ch = Arc::new(FrozenChain {
                        map: self.find_map(id)?,
                        below: self.chain_below(fd)?,
                    });
                    *c = Some(ch.clone());
                    ch
                }
            }
        };
        let n = (chain.map.size().saturating_sub(off)).min(size) as usize;
        Self::touch_atime(ra, fd);
        Self::read_ahead(ra, (fd, &chain.map), &chain.below, off, n as u64);
        blockmap::read_mapped(&chain.map, fd, &chain.below, off, &mut buf[..n])?;
        Ok(n)
    }

    /// A write into the node's upper partial file. Returns the offset written at.
    pub(super) fn write_partial(
        &self,
        ps: &mut PartialState,
        fd: BorrowedFd,
        off: u64,
        append: bool,
        data: &[u8],
    ) -> Result<u64> {
        let at = if append { ps.map.size() } else { off };
        for span in ps.map.write_fill(at, data.len() as u64) {
            let r = span.range;
            let mut fill = vec![0u8; (r.end - r.start) as usize];
            if span.source == Source::Below {
                blockmap::read_chain(&ps.below, r.start, &mut fill)?;
            }
            sys::pwrite_all(fd, &fill, r.start)?;
        }
        sys::pwrite_all(fd, data, at)?;
        ps.map.record_write(fd, at, data)?;
        ps.dirty = true;
        Ok(at)
    }

    /// Writes the node's map if it changed.
    pub(super) fn store_partial(&self, node: &Node) -> Result<()> {
        if node.path().is_none() {
            // Open but unlinked: the file is in no layer, its map describes nothing to keep.
            return Ok(());
        }
        let mut g = node.partial.lock();
        if let Some(ps) = g.as_mut()
            && ps.dirty
        {
            self.active_maps()?.store(&ps.map).map_err(|e| e.errno())?;
            ps.dirty = false;
        }
        Ok(())
    }

    /// The open partial files of the active layer (not the unlinked ones: they are in no
    /// layer); forgets the ones no longer known.
    fn live_partial_nodes(&self) -> Vec<Arc<Node>> {
        let mut live = Vec::new();
        let inos: Vec<u64> = self.live_partials.iter().map(|e| *e.key()).collect();
        for ino in inos {
            match self.nodes.get(&ino).map(|n| n.clone()) {
                None => {
                    self.live_partials.remove(&ino);
                }
                // Open but unlinked: it stays live, outside every layer.
                Some(n) if n.path().is_none() => {}
                Some(n) => live.push(n),
            }
        }
        live
    }

    /// Before a freeze's barrier: a temporary file and space for the map of each open
    /// partial file, as large as the map is now plus room for the writes until the barrier,
    /// so that the barrier itself need not touch the disk (`take_all_partials`). A full disk
    /// fails the freeze here, with nothing changed.
    /// A few spare reservations (`None`) serve the files that become partial in between.
    pub(super) fn reserve_partial_maps(
        &self,
    ) -> std::io::Result<Vec<(Option<MapId>, meta::Staged)>> {
        let store = self.active_maps()?;
        let mut out = Vec::new();
        for _ in 0..SPARE_MAPS {
            let spare = store.reserve_spare(MAP_SLACK);
            out.push((None, spare.map_err(std::io::Error::other)?));
        }
        for n in self.live_partial_nodes() {
            let Some((id, len)) = n
                .partial
                .lock()
                .as_ref()
                .map(|ps| (ps.map.id(), ps.map.encoded_len()))
            else {
                continue;
            };
            let room = len + len / 4 + MAP_SLACK;
            out.push((
                Some(id),
                store.reserve(id, room).map_err(std::io::Error::other)?,
            ));
        }
        Ok(out)
    }

    /// Under a freeze's barrier: every live map is taken from its node (the files belong
    /// to the frozen layer now, their next write copies them up again) and put in the
    /// frozen-map cache, so the new upper can read through them at once. The maps changed
    /// since they were last stored go to the space `reserve_partial_maps` took for them,
    /// written after the barrier by `store_frozen`; one that outgrew its space (or has none)
    /// is written now to a temporary file, without an fsync, which takes its space (a full
    /// disk fails the freeze here, with nothing changed). O(open partial files).
    pub(super) fn take_all_partials(
        &self,
        mut reserved: Vec<(Option<MapId>, meta::Staged)>,
    ) -> std::io::Result<Vec<FrozenMap>> {
        let store = self.active_maps()?;
        let live = self.live_partial_nodes();
        let mut out = Vec::new();
        // Each dirty map gets a reservation keyed by its id (its own if large enough, else
        // a spare), or is written now; unneeded reservations become spares.
        for n in &live {
            let g = n.partial.lock();
            let Some(ps) = g.as_ref() else { continue };
            let (id, len) = (ps.map.id(), ps.map.encoded_len());
            let own = reserved.iter().position(|(r, _)| *r == Some(id));
            if let Some(i) = own
                && (!ps.dirty || len > reserved[i].1.reserved())
            {
                reserved[i].0 = None;
            }
            if !ps.dirty || reserved.iter().any(|(r, _)| *r == Some(id)) {
                continue;
            }
            match reserved
                .iter()
                .position(|(r, s)| r.is_none() && len <= s.reserved())
            {
                Some(i) => {
                    reserved[i].0 = Some(id);
                    reserved[i].1.retarget(store.path_of(id));
                }
                None => out.push(FrozenMap::Written(
                    store
                        .stage_unsynced(&ps.map)
                        .map_err(std::io::Error::other)?,
                )),
            }
        }
        for n in live {
            if let Some(ps) = n.partial.lock().take() {
                let id = ps.map.id();
                let map = Arc::new(ps.map);
                // Its levels may hold the last fd of a file a squash removed: not closed here.
                sys::drop_later(ps.below);
                if let Some(i) = reserved.iter().position(|(r, _)| *r == Some(id)) {
                    let (_, space) = reserved.swap_remove(i);
                    out.push(FrozenMap::Reserved(space, map.clone()));
                }
                self.frozen_maps.insert(id, map);
            }
            self.live_partials.remove(&n.ino);
        }
        // The reservations not used are removed after the barrier.
        out.extend(reserved.into_iter().map(|(_, s)| FrozenMap::Unused(s)));
        Ok(out)
    }

    /// Stores the maps `take_all_partials` took (each written if not yet, fsynced, then
    /// renamed into place); the freeze's flush makes the renames durable.
    pub(super) fn store_frozen(maps: Vec<FrozenMap>) -> std::io::Result<()> {
        for m in maps {
            let staged = match m {
                FrozenMap::Written(s) => s,
                FrozenMap::Reserved(mut s, map) => {
                    let written = MapStore::fill(&mut s, &map).map_err(std::io::Error::other)?;
                    debug_assert!(written, "checked under the barrier");
                    s
                }
                FrozenMap::Unused(s) => {
                    drop(s);
                    continue;
                }
            };
            staged.commit_in_batch().map_err(std::io::Error::other)?;
        }
        Ok(())
    }
}

/// Room left in a map's reserved space for the writes between the reservation and the
/// barrier (each random 4 KiB write adds at most 20 bytes: an extent and a CRC).
const MAP_SLACK: u64 = 64 << 10;

/// Spare reservations of `MAP_SLACK` each, for the maps of files that become partial between
/// the reservation and the barrier.
const SPARE_MAPS: usize = 2;

/// A block map a freeze took, on its way to the frozen layer's `maps/`.
pub(super) enum FrozenMap {
    /// Written to a temporary file under the barrier.
    Written(meta::Staged),
    /// To be written into the space reserved for it.
    Reserved(meta::Staged, Arc<BlockMap>),
    /// A reservation the map did not need (clean, or it outgrew it): removed when dropped.
    Unused(meta::Staged),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Config, MapDirs, ROOT_INO};
    use crate::volume::Volume;

    /// A freeze takes each open partial file's map into the space reserved before its
    /// barrier when it fits (a file that became partial after the reservation: into a
    /// spare), and writes a map that outgrew it under the barrier; either way the stored map
    /// is the one taken. Needs root (trusted.* xattrs).
    #[test]
    fn a_freeze_stores_maps_in_their_reserved_space_or_beside_it() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for name in ["fits", "grows", "late"] {
            let f = std::fs::File::create(src.join(name)).unwrap();
            f.set_len(64 << 20).unwrap();
        }
        let vol = Volume::create(&t.path().join("vol"), 4096, Some(&src)).unwrap();
        let ov = Overlay::new(Config {
            lowers: vol.lower_dirs(),
            upper: Some(vol.upper_dir()),
            work: Some(vol.work_dir()),
            block_size: 4096,
            index: false,
            maps: Some(MapDirs {
                layers: vol.path().join("layers"),
            }),
            passthrough: false,
            ..Config::default()
        })
        .unwrap();
        let block = vec![7u8; 4096];
        let open = |name: &str| {
            let (node, _) = ov.lookup(ROOT_INO, &CString::new(name).unwrap()).unwrap();
            ov.open(node.ino, libc::O_WRONLY).unwrap().0
        };
        let (fits, grows) = (open("fits"), open("grows"));
        ov.write(fits, 0, &block).unwrap();
        ov.write(grows, 0, &block).unwrap();
        let reserved = ov.reserve_partial_maps().unwrap();
        assert_eq!(reserved.len(), 2 + SPARE_MAPS);
        ov.write(fits, 2 * 4096, &block).unwrap();
        // Opened for writing (copied up as a partial file) after the reservation.
        let late = open("late");
        ov.write(late, 0, &block).unwrap();
        // Non-adjacent blocks: 20 bytes of map each, well past the reserved slack.
        for i in 0..(MAP_SLACK / 20 + 1000) {
            ov.write(grows, (2 * i + 4) * 4096, &block).unwrap();
        }
        let taken = ov.take_all_partials(reserved).unwrap();
        let kinds: Vec<&str> = taken
            .iter()
            .map(|m| match m {
                FrozenMap::Written(_) => "written",
                FrozenMap::Reserved(..) => "reserved",
                FrozenMap::Unused(_) => "unused",
            })
            .collect();
        let mut sorted = kinds.clone();
        sorted.sort();
        // fits and late (a spare) reserved, grows written; grows' own reservation (too
        // small) and the other spare unused.
        assert_eq!(
            sorted,
            ["reserved", "reserved", "unused", "unused", "written"],
            "{kinds:?}"
        );
        let store = ov.active_maps().unwrap();
        Overlay::store_frozen(taken).unwrap();
        let frozen: Vec<Arc<BlockMap>> = ov.frozen_maps.iter().map(|e| e.value().clone()).collect();
        assert_eq!(frozen.len(), 3);
        for m in frozen {
            assert_eq!(store.load(m.id()).unwrap(), *m);
        }
        // Nothing else is left in maps/: no temporary file of either path.
        let mut names: Vec<String> =
            std::fs::read_dir(vol.upper_dir().parent().unwrap().join("maps"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names
                .iter()
                .all(|n| n.ends_with(".lvmap") && !n.starts_with('.'))
        );
    }
}
