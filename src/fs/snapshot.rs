//! Live snapshots, engine side: freeze the upper into a new lower layer without unmounting.
//!
//! `freeze` holds the write barrier (every operation that changes the upper holds it shared),
//! flushes the upper, and swaps the layer stack: the upper becomes the topmost lower layer
//! (its directory fd follows the rename the caller did on disk) and an empty directory
//! becomes the upper. Nothing per node happens here: each node catches up lazily in
//! `refresh` the next time it is used, so a freeze costs O(1) whatever the volume size.
//! Open handles follow on their next write (copy-up into the new upper, then reopen) or read
//! (reopen when the file was copied up again).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use super::{Layers, Layout, LowerRef, Node, Overlay, StackEvent};
use crate::layer::{Layer, RelPath};
use crate::sys::Errno;

/// How long a freeze or restack waits for operations in flight before it gives way.
const BARRIER_PATIENCE: std::time::Duration = std::time::Duration::from_millis(5);
/// Attempts before it waits without giving way (about four seconds).
const BARRIER_TRIES: u32 = 400;

thread_local! {
    /// The barriers (of all mounts in this process) this thread holds shared, by address.
    static HELD: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A shared hold of the barrier (see `Overlay::stable`); `None` when the thread held it
/// already.
pub(super) struct Stable<'a>(Option<parking_lot::RwLockReadGuard<'a, ()>>);

impl Drop for Stable<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            let key = std::ptr::from_ref(parking_lot::RwLockReadGuard::rwlock(&g)) as usize;
            HELD.with(|h| {
                let mut h = h.borrow_mut();
                if let Some(i) = h.iter().rposition(|k| *k == key) {
                    h.swap_remove(i);
                }
            });
        }
    }
}

/// What one freeze did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FreezeStats {
    /// The epoch the frozen layer holds (the number of freezes so far, counted from 1).
    pub epoch: u64,
    /// Stable id of the frozen layer in the stack.
    pub layer_id: usize,
    /// Time the write barrier was held (writers were blocked).
    pub barrier_micros: u64,
    /// Of which waiting for the operations in flight to end,
    pub barrier_wait_micros: u64,
    /// copying the root's attributes to the next upper (`under_barrier`),
    pub barrier_attrs_micros: u64,
    /// and taking the open partial files' block maps,
    pub barrier_maps_micros: u64,
    /// of which this many were written under the barrier (no space reserved, or outgrown).
    pub maps_written_under_barrier: u64,
    /// Time of the flush before the barrier.
    pub flush_micros: u64,
    /// Time of the flush and commit after the barrier (fsyncs waited for it).
    pub commit_micros: u64,
    /// Blocks written in the frozen epoch, in bytes, and the files they belong to.
    pub dirty_bytes: u64,
    pub dirty_files: u64,
}

impl Overlay {
    /// Freezes the upper. Before writers are blocked, the data is flushed, space is
    /// reserved for the block maps of the open partial files and `before_barrier` runs
    /// (e.g. a first copy of the root's attributes, as late as possible so that they rarely
    /// change before the barrier). Writers are blocked only while those maps are taken from
    /// their nodes (in memory; a map that outgrew its reserved space is written to a
    /// temporary file), `under_barrier` runs (e.g. the next upper's root gets the root's
    /// attributes, if they changed since they were copied) and the stack is swapped:
    /// `next_upper` (an empty directory) becomes the upper, the old upper the topmost lower
    /// layer (its directory fd stays valid wherever the directory is). Then the taken maps
    /// are stored, the frozen layer is flushed and `commit` makes the switch
    /// durable (the volume's atomic metadata commit, staged before); until it has, every
    /// fsync waits, so that no write to the new upper is acknowledged before the new upper
    /// is the volume's. A failure before the swap changes nothing; a failed commit after it
    /// leaves the mount failed (fsync and further snapshots return EIO).
    pub fn freeze(
        &self,
        next_upper: &std::path::Path,
        before_barrier: impl FnOnce() -> std::io::Result<()>,
        under_barrier: impl FnOnce() -> std::io::Result<()>,
        commit: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<FreezeStats> {
        if self.commit.failed.load(Ordering::Acquire) {
            return Err(std::io::Error::other(
                "an earlier snapshot failed to commit: remount the volume",
            ));
        }
        let t0 = Instant::now();
        // Flush most dirty data before blocking writers, so the barrier stays short.
        self.syncfs().map_err(std::io::Error::from)?;
        let next_upper = Arc::new(Layer::open(next_upper)?);
        let reserved = self.reserve_partial_maps()?;
        before_barrier()?;
        let flush = t0.elapsed();
        let (barrier, t1) = self.exclusive();
        let t_locked = t1.elapsed();
        under_barrier()?;
        let t_attrs = t1.elapsed();
        // Last before the swap: it fails (e.g. on a full disk) before it takes anything.
        let staged_maps = self.take_all_partials(reserved)?;
        let maps_written_under_barrier = staged_maps
            .iter()
            .filter(|m| matches!(m, super::partial::FrozenMap::Written(_)))
            .count() as u64;
        let t_maps = t1.elapsed();
        let epoch = self.epoch.load(Ordering::Acquire);
        let (dirty_bytes, dirty_files) = self.dirty_stats();
        self.dirty.clear();
        let layer_id = {
            let mut layers = self.layers.write();
            let old = layers
                .upper
                .clone()
                .ok_or(std::io::Error::from(Errno::EROFS))?;
            let id = layers.next_id();
            let mut lowers = layers.lowers.clone();
            lowers.push((id, old));
            *layers = Arc::new(Layers {
                epoch: epoch + 1,
                upper: Some(next_upper),
                lowers,
            });
            self.push_event(StackEvent::Freeze { id, epoch });
            id
        };
        self.epoch.store(epoch + 1, Ordering::Release);
        *self.commit.pending.lock() = true;
        drop(barrier);
        let held = t1.elapsed();
        let t2 = Instant::now();
        let committed = Self::store_frozen(staged_maps)
            .and_then(|()| self.syncfs().map_err(std::io::Error::from))
            .and_then(|()| commit());
        if committed.is_err() {
            self.commit.failed.store(true, Ordering::Release);
        }
        *self.commit.pending.lock() = false;
        self.commit.done.notify_all();
        committed?;
        Ok(FreezeStats {
            commit_micros: t2.elapsed().as_micros() as u64,
            epoch: epoch + 1,
            layer_id,
            barrier_micros: held.as_micros() as u64,
            barrier_wait_micros: t_locked.as_micros() as u64,
            barrier_attrs_micros: (t_attrs - t_locked).as_micros() as u64,
            barrier_maps_micros: (t_maps - t_attrs).as_micros() as u64,
            maps_written_under_barrier,
            flush_micros: flush.as_micros() as u64,
            dirty_bytes,
            dirty_files,
        })
    }

    /// Waits until no freeze is committing (see `freeze`); EIO if one failed to.
    pub(super) fn wait_commit(&self) -> crate::sys::Result<()> {
        let mut pending = self.commit.pending.lock();
        while *pending {
            self.commit.done.wait(&mut pending);
        }
        if self.commit.failed.load(Ordering::Acquire) {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// Shared side of the barrier: holds the layer stack still for the calling operation (a
    /// freeze or a restack takes the barrier exclusively, so it waits until the operation
    /// ends). Every operation that looks at a node's layers holds it from its first look to
    /// its last use: a node's layout is brought up to the stack in `refresh`, and a switch
    /// between that and the use would send the operation to the new, empty upper (ENOENT)
    /// or let it decide on the old stack (e.g. leave out a whiteout that the frozen layer
    /// now needs, so that a removed directory comes back).
    ///
    /// Re-entrant within a thread (operations call one another), unlike parking_lot's read
    /// lock, which makes a nested reader wait behind a queued writer: a deadlock.
    pub(super) fn stable(&self) -> Stable<'_> {
        if self.holds_stable() {
            return Stable(None);
        }
        let guard = self.barrier.read();
        HELD.with(|h| h.borrow_mut().push(self.barrier_key()));
        Stable(Some(guard))
    }

    /// The barrier, exclusively, for a freeze or a restack, and when the attempt that got it
    /// began (writers are paused from then on). While a writer waits, parking_lot queues new
    /// readers behind it, so one long operation (an fallocate zero-filling a partial file, the
    /// listing of a huge directory, a read from a slow lower layer) would hold up all the
    /// others: after `BARRIER_PATIENCE` the attempt gives way, lets them run, and tries again;
    /// it waits without giving way only after `BARRIER_TRIES`.
    fn exclusive(&self) -> (parking_lot::RwLockWriteGuard<'_, ()>, Instant) {
        for _ in 0..BARRIER_TRIES {
            let t = Instant::now();
            if let Some(g) = self.barrier.try_write_for(BARRIER_PATIENCE) {
                return (g, t);
            }
            std::thread::sleep(BARRIER_PATIENCE);
        }
        let t = Instant::now();
        (self.barrier.write(), t)
    }

    fn barrier_key(&self) -> usize {
        std::ptr::from_ref(&self.barrier) as usize
    }

    /// True if this thread holds `stable`.
    pub(super) fn holds_stable(&self) -> bool {
        HELD.with(|h| h.borrow().contains(&self.barrier_key()))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Records a stack change (the caller holds the stack's write lock).
    fn push_event(&self, e: StackEvent) {
        let mut events = self.events.write();
        events.push(e);
        self.generation
            .store(events.len() as u64, Ordering::Release);
    }

    /// Replaces lower layers, e.g. after a squash merged several into one. `changes` names
    /// lower layers by directory: `Some(dir)` keeps the layer's id (its place in the stack)
    /// with a new directory showing the same view, `None` drops it. Under the write barrier,
    /// `commit` makes the change durable, then the stack is swapped. Like a freeze this
    /// costs O(1): each node looks its lower objects up again the next time it is used.
    pub fn restack(
        &self,
        changes: &[(PathBuf, Option<PathBuf>)],
        commit: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<RestackStats> {
        // The nodes the kernel knows now, by location: see `Overlay::unsettled`.
        let known: std::collections::HashMap<(u64, CString), Arc<Node>> = self
            .nodes
            .iter()
            .filter_map(|n| {
                let st = n.state.lock();
                let p = st.parent.as_ref().filter(|_| !st.unlinked)?;
                Some(((p.ino, st.name.clone()), n.clone()))
            })
            .collect();
        self.unsettled.write().extend(known);
        // Open the new directories before blocking writers.
        let mut opened = Vec::new();
        for (old, new) in changes {
            let l = new.as_deref().map(Layer::open).transpose()?.map(Arc::new);
            opened.push((old.clone(), l));
        }
        let (_barrier, t) = self.exclusive();
        commit()?;
        let mut layers = self.layers.write();
        let mut lowers = Vec::with_capacity(layers.lowers.len());
        let mut dropped = 0;
        for (id, l) in &layers.lowers {
            match opened.iter().find(|(p, _)| *p == l.path) {
                None => lowers.push((*id, l.clone())),
                Some((_, Some(new))) => lowers.push((*id, new.clone())),
                Some((_, None)) => dropped += 1,
            }
        }
        *layers = Arc::new(Layers {
            epoch: layers.epoch,
            upper: layers.upper.clone(),
            lowers,
        });
        self.push_event(StackEvent::Restack);
        Ok(RestackStats {
            barrier_micros: t.elapsed().as_micros() as u64,
            dropped_layers: dropped,
            lower_layers: layers.lowers.len(),
        })
    }

    /// Brings the node the kernel knew at `parent/name` before a restack up to date, so
    /// that its alias is known before a lookup or listing reports an inode number.
    pub(super) fn settle(&self, parent: u64, name: &CStr) {
        if self.unsettled.read().is_empty() {
            return;
        }
        let n = self.unsettled.write().remove(&(parent, name.to_owned()));
        if let Some(n) = n {
            self.refresh(&n);
        }
    }

    /// Settles every node known before the last restack (see `settle`); called in the
    /// background after `restack`. Returns how many.
    pub fn settle_all(&self) -> usize {
        let nodes: Vec<Arc<Node>> = self.unsettled.read().values().cloned().collect();
        for n in &nodes {
            let _s = self.stable();
            self.refresh(n);
        }
        self.unsettled.write().clear();
        nodes.len()
    }

    /// True if `(dev, ino)`, a real inode, is the identity of a live node or alias: the
    /// inode must then not be freed (its number could be reused by a new object).
    pub fn identity_in_use(&self, dev: u64, ino: u64) -> bool {
        let v = self.map_ino(dev, ino);
        self.nodes.contains_key(&v) || self.aliases.contains_key(&v)
    }

    /// Keeps `path` (see `Overlay::ghosts`) until the node or alias with the identity of
    /// `(dev, ino)` goes away. Returns false (and keeps nothing) if it went already.
    pub fn keep_ghost(&self, dev: u64, ino: u64, path: PathBuf) -> bool {
        let v = self.map_ino(dev, ino);
        self.ghosts.insert(v, path);
        if self.identity_in_use(dev, ino) {
            return true;
        }
        self.release_ghost(v);
        false
    }

    /// Removes every ghost (at unmount: no node is left).
    pub fn drop_ghosts(&self) {
        let all: Vec<u64> = self.ghosts.iter().map(|g| *g.key()).collect();
        for ino in all {
            if let Some((_, p)) = self.ghosts.remove(&ino) {
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
    }

    /// Ghosts kept now.
    pub fn ghost_count(&self) -> usize {
        self.ghosts.len()
    }

    pub(super) fn release_ghost(&self, ino: u64) {
        if self.nodes.contains_key(&ino) || self.aliases.contains_key(&ino) {
            return;
        }
        if let Some((_, p)) = self.ghosts.remove(&ino) {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            if let Err(e) = r {
                tracing::warn!("cannot remove {}: {e}", p.display());
            }
        }
    }

    /// A node left the table: its alias and the ghosts of its identities go too.
    pub(super) fn node_gone(&self, node: &Node) {
        let alias = node.state.lock().alias.take();
        if let Some(a) = alias {
            self.aliases.remove_if(&a, |_, v| *v == node.ino);
            self.release_ghost(a);
        }
        self.release_ghost(node.ino);
    }

    /// The inode number the kernel knows the object found with stable number `ino` by.
    pub(super) fn known_ino(&self, ino: u64) -> u64 {
        if self.aliases.is_empty() {
            return ino;
        }
        self.aliases.get(&ino).map_or(ino, |v| *v)
    }

    /// Brings a node's layout up to the current stack generation. After freezes only: an
    /// object that was in the upper at a freeze is now in that freeze's layer, at the path it
    /// had then. After a restack: the node is looked up again by its merged location.
    pub(super) fn refresh(&self, node: &Arc<Node>) {
        debug_assert!(self.holds_stable(), "refresh outside `stable`");
        let cur = self.generation.load(Ordering::Acquire);
        if node.layout_gen.load(Ordering::Acquire) == cur {
            return;
        }
        let parent = node.parent();
        if let Some(p) = &parent {
            self.refresh(p);
        }
        let since = node.layout_gen.load(Ordering::Acquire);
        let events: Vec<StackEvent> = {
            let ev = self.events.read();
            ev.get(since as usize..cur as usize)
                .map(|e| e.to_vec())
                .unwrap_or_default()
        };
        if events.iter().any(|e| matches!(e, StackEvent::Restack)) {
            self.relookup(node, parent.as_ref(), cur);
            return;
        }
        let mut st = node.state.lock();
        if node.layout_gen.load(Ordering::Acquire) == cur {
            return;
        }
        let is_root = parent.is_none() && !st.unlinked && node.ino == super::ROOT_INO;
        for e in &events {
            let StackEvent::Freeze { id, epoch: before } = *e else {
                continue;
            };
            if !st.upper {
                continue;
            }
            // Where the object froze: its parent's frozen directory, plus its name.
            let path = if is_root {
                Some(RelPath::root())
            } else {
                parent.as_ref().and_then(|p| {
                    p.layout()
                        .lower_dirs
                        .iter()
                        .find(|l| l.layer == id)
                        .map(|l| l.path.join(&st.name))
                })
            };
            let Some(path) = path else {
                // Unlinked before the freeze: only open handles still reach it.
                st.upper = false;
                continue;
            };
            let old = node.layout();
            let frozen = LowerRef { layer: id, path };
            let layout = if node.is_dir() {
                let mut dirs = vec![frozen];
                dirs.extend(old.lower_dirs.iter().cloned());
                let l = Layout::new(None, dirs);
                // The cached upper fd is the frozen directory now.
                if let Some((e, fd)) = node.upper_fd.lock().take()
                    && e == before
                {
                    let _ = l.lower_fds[0].set(fd);
                }
                for (i, fd) in old.lower_fds.iter().enumerate() {
                    if let Some(fd) = fd.get() {
                        let _ = l.lower_fds[i + 1].set(fd.clone());
                    }
                }
                l
            } else {
                Layout::new(Some(frozen), Vec::new())
            };
            node.set_layout(layout);
            // The root always has an upper: the new, empty upper root.
            st.upper = is_root;
        }
        node.layout_gen.store(cur, Ordering::Release);
    }

    /// Looks a node's lower objects (and whether it has an upper) up again at its merged
    /// location, keeping its inode number: the kernel knows the node by it.
    fn relookup(&self, node: &Arc<Node>, parent: Option<&Arc<Node>>, cur: u64) {
        let (name, unlinked) = {
            let st = node.state.lock();
            (st.name.clone(), st.unlinked)
        };
        let found = match parent {
            _ if unlinked => None,
            None if node.ino == super::ROOT_INO => {
                let layers = self.layers();
                let dirs = layers
                    .lowers
                    .iter()
                    .rev()
                    .map(|(id, _)| LowerRef {
                        layer: *id,
                        path: RelPath::root(),
                    })
                    .collect();
                node.set_layout(Layout::new(None, dirs));
                None
            }
            None => None,
            Some(p) => match self.resolve(p, &name) {
                Ok(f) => Some(f),
                Err(e) => {
                    // The view is the same after a restack, so this is a race with a
                    // change of the name (which sets the layout itself) or an I/O error.
                    tracing::debug!("re-resolving inode {} after a restack: {e}", node.ino);
                    None
                }
            },
        };
        let mut st = node.state.lock();
        if node.layout_gen.load(Ordering::Acquire) == cur {
            // Another thread brought it up to date first, and an operation may have changed
            // it since (e.g. copied it up): what this one found is older.
            return;
        }
        if let Some(f) = found {
            st.upper = f.upper;
            node.set_layout(Layout::new(f.lower, f.lower_dirs));
            if !f.upper && !node.is_dir() {
                // Open handles reopen the object: its old inode may be in a removed layer.
                node.generation.fetch_add(1, Ordering::AcqRel);
            }
            let alias = (f.ino != node.ino).then_some(f.ino);
            if st.alias != alias {
                if let Some(a) = st.alias.take() {
                    self.aliases.remove_if(&a, |_, v| *v == node.ino);
                }
                if let Some(a) = alias {
                    self.aliases.insert(a, node.ino);
                }
                st.alias = alias;
            }
        }
        node.layout_gen.store(cur, Ordering::Release);
    }
}

/// What one restack did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestackStats {
    /// Time the write barrier was held (writers were blocked), including the commit.
    pub barrier_micros: u64,
    pub dropped_layers: usize,
    /// Lower layers in the stack afterwards.
    pub lower_layers: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A freeze waiting for one long operation does not hold up the others for its length:
    /// it gives way after `BARRIER_PATIENCE` and tries again (found by review: with a plain
    /// write lock, every new operation queued behind the waiting freeze).
    #[test]
    fn a_waiting_freeze_gives_way_to_other_operations() {
        let t = tempfile::tempdir().unwrap();
        let ov = crate::fs::test_overlay(t.path(), |_| {});
        let long = Duration::from_millis(600);
        std::thread::scope(|s| {
            let (held_tx, held_rx) = std::sync::mpsc::channel();
            let ov = &ov;
            s.spawn(move || {
                let _s = ov.stable();
                held_tx.send(()).unwrap();
                std::thread::sleep(long);
            });
            held_rx.recv().unwrap();
            let freeze = s.spawn(move || {
                let (_g, _) = ov.exclusive();
            });
            std::thread::sleep(Duration::from_millis(20));
            // Short operations meanwhile: none waits for the long one.
            let mut worst = Duration::ZERO;
            for _ in 0..20 {
                let t0 = Instant::now();
                drop(ov.stable());
                worst = worst.max(t0.elapsed());
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(worst < long / 3, "an operation waited {worst:?}");
            freeze.join().unwrap();
        });
    }
}
