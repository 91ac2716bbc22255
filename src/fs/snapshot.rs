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

use super::{Layers, Layout, LowerRef, Node, Overlay};
use crate::layer::{Layer, RelPath};
use crate::sys::Errno;

/// What one freeze did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FreezeStats {
    /// The epoch the frozen layer holds (the number of freezes so far, counted from 1).
    pub epoch: u64,
    /// Stable id of the frozen layer in the stack.
    pub layer_id: usize,
    /// Time the write barrier was held (writers were blocked).
    pub barrier_micros: u64,
    /// Time of the flush before the barrier.
    pub flush_micros: u64,
    /// Blocks written in the frozen epoch, in bytes, and the files they belong to.
    pub dirty_bytes: u64,
    pub dirty_files: u64,
}

impl Overlay {
    /// Freezes the upper. Under the write barrier, after flushing the upper, `prepare` makes
    /// the frozen state durable (e.g. commits the volume's layer list) and returns the empty
    /// directory that becomes the new upper; then the stack is swapped. The old upper's
    /// directory fd stays valid wherever the directory is.
    pub fn freeze(
        &self,
        prepare: impl FnOnce() -> std::io::Result<std::path::PathBuf>,
    ) -> std::io::Result<FreezeStats> {
        let t0 = Instant::now();
        // Flush most dirty data before blocking writers, so the barrier stays short.
        self.syncfs().map_err(std::io::Error::from)?;
        let flush = t0.elapsed();
        let t1 = Instant::now();
        let _barrier = self.barrier.write();
        self.store_all_partials().map_err(std::io::Error::from)?;
        self.syncfs().map_err(std::io::Error::from)?;
        let next_upper = Arc::new(Layer::open(&prepare()?)?);
        let epoch = self.epoch.load(Ordering::Acquire);
        let (dirty_bytes, dirty_files) = self.dirty_stats();
        self.dirty.clear();
        let layer_id = {
            let mut layers = self.layers.write();
            let old = layers
                .upper
                .clone()
                .ok_or(std::io::Error::from(Errno::EROFS))?;
            let mut lowers = layers.lowers.clone();
            lowers.push(old);
            let id = lowers.len() - 1;
            *layers = Arc::new(Layers {
                epoch: epoch + 1,
                upper: Some(next_upper),
                lowers,
            });
            self.freezes.write().push((epoch, id));
            id
        };
        self.epoch.store(epoch + 1, Ordering::Release);
        let held = t1.elapsed();
        Ok(FreezeStats {
            epoch: epoch + 1,
            layer_id,
            barrier_micros: held.as_micros() as u64,
            flush_micros: flush.as_micros() as u64,
            dirty_bytes,
            dirty_files,
        })
    }

    /// Shared side of the write barrier: held by every operation that changes the upper.
    pub(super) fn writing(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.barrier.read()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Brings a node's layout up to the current epoch: an object that was in the upper at a
    /// freeze is now in that freeze's layer, at the path it had then.
    pub(super) fn refresh(&self, node: &Arc<Node>) {
        let cur = self.epoch.load(Ordering::Acquire);
        if node.epoch.load(Ordering::Acquire) == cur {
            return;
        }
        let parent = node.parent();
        if let Some(p) = &parent {
            self.refresh(p);
        }
        let freezes = self.freezes.read().clone();
        let mut st = node.state.lock();
        let since = node.epoch.load(Ordering::Acquire);
        if since == cur {
            return;
        }
        let is_root = parent.is_none() && !st.unlinked && node.ino == super::ROOT_INO;
        for (before, id) in freezes.iter().filter(|(b, _)| *b >= since) {
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
                        .find(|l| l.layer == *id)
                        .map(|l| l.path.join(&st.name))
                })
            };
            let Some(path) = path else {
                // Unlinked before the freeze: only open handles still reach it.
                st.upper = false;
                continue;
            };
            let old = node.layout();
            let frozen = LowerRef { layer: *id, path };
            let layout = if node.is_dir() {
                let mut dirs = vec![frozen];
                dirs.extend(old.lower_dirs.iter().cloned());
                let l = Layout::new(None, dirs);
                // The cached upper fd is the frozen directory now.
                if let Some((e, fd)) = node.upper_fd.lock().take()
                    && e == *before
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
        node.epoch.store(cur, Ordering::Release);
    }
}
