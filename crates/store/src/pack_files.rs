//! Pack files kept open for serving by range (packs are immutable, so a handle stays valid),
//! and the read buffers the HTTP side circulates.
//!
//! A handle outlives gc's moves (a retired pack is the same file), but would keep a deleted
//! pack's space allocated: `drop_deleted` (run periodically by `serve`) lets those go.

use super::Store;
use fleetboot_image::PackId;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

/// Buffers kept for reuse.
pub const BUFFERS_KEPT_MAX: usize = 64;
/// Open files kept; past it the cache starts over.
const FILES_KEPT_MAX: usize = 4096;

/// Open pack files, by id, and the read buffers in circulation.
#[derive(Default)]
pub struct PackFiles {
    files: Mutex<HashMap<PackId, Arc<(File, u64)>>>,
    pub buffers: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl PackFiles {
    /// The open pack `id` and its length, opening it on first use.
    pub fn get(&self, store: &Store, id: &PackId) -> Option<Arc<(File, u64)>> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(id) {
            return Some(f.clone());
        }
        let file = store.open_pack(id).ok()?;
        let len = file.metadata().ok()?.len();
        let entry = Arc::new((file, len));
        if files.len() > FILES_KEPT_MAX {
            files.clear();
        }
        files.insert(*id, entry.clone());
        Some(entry)
    }

    /// Closes the kept handles of packs deleted since they were opened (no link left), so their
    /// space is freed once the requests still reading them finish. Returns how many.
    pub fn drop_deleted(&self) -> usize {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let before = files.len();
        files.retain(|_, f| f.0.metadata().is_ok_and(|m| m.nlink() > 0));
        before - files.len()
    }

    /// How many pack files are held open.
    pub fn open_count(&self) -> usize {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
