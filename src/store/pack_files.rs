//! Pack files kept open for serving by range (packs are immutable, so a handle stays valid),
//! and the read buffers the HTTP side circulates.

use super::Store;
use fleetboot_image::PackId;
use std::collections::HashMap;
use std::fs::File;
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
        let path = store.pack_path(id);
        let file = File::open(&path).ok()?;
        let len = file.metadata().ok()?.len();
        let entry = Arc::new((file, len));
        if files.len() > FILES_KEPT_MAX {
            files.clear();
        }
        files.insert(*id, entry.clone());
        Some(entry)
    }
}
