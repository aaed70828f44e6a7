//! Images as the configuration names them (`NAME` or `NAME@N`), resolved to their identity
//! (name, version, digest). The digest is read from the manifest once per manifest file (by
//! path, length and modification time), not on every boot.

use crate::store::{ImageRef, Store, StoreError, VersionPath};
use fleetboot_image::api::ImageId;
use fleetboot_image::PackId;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Resolved images, by manifest file.
#[derive(Default)]
pub struct ImageCatalog {
    cache: Mutex<HashMap<PathBuf, Cached>>,
    /// Held while a manifest is read and decoded: a rack booting at once would otherwise decode
    /// the same multi-megabyte manifest on every blocking thread at the same moment (measured:
    /// 150 MB of peak memory for 30 agents, most of it kept by the allocator).
    loading: Mutex<()>,
}

#[derive(Clone)]
struct Cached {
    len: u64,
    modified: Option<SystemTime>,
    id: ImageId,
    size: u64,
    packs: Arc<Vec<PackId>>,
}

/// Entries kept; past it the cache starts over.
const CACHED_MAX: usize = 4096;

/// An image resolved: its identity, size, manifest file and the packs it names.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub id: ImageId,
    pub size: u64,
    pub version: VersionPath,
    pub packs: Arc<Vec<PackId>>,
}

impl ImageCatalog {
    /// The image `r` names now (its latest version if it names none).
    pub fn resolve(&self, store: &Store, r: &ImageRef) -> Result<Resolved, StoreError> {
        let version = store.resolve(r)?;
        let (len, modified) = (version.size, Some(version.modified));
        let cached = |version: &VersionPath| {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let c = cache.get(&version.path)?;
            (c.len == len && c.modified == modified).then(|| Resolved {
                id: c.id.clone(),
                size: c.size,
                version: version.clone(),
                packs: c.packs.clone(),
            })
        };
        if let Some(r) = cached(&version) {
            return Ok(r);
        }
        let _loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        // Loaded by the thread this one waited for.
        if let Some(r) = cached(&version) {
            return Ok(r);
        }
        let m = store.load_manifest(&version)?;
        let id = ImageId {
            name: m.meta.name.clone(),
            version: version.version,
            digest: m.meta.digest.clone(),
        };
        let packs = Arc::new(m.packs.clone());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHED_MAX {
            cache.clear();
        }
        cache.insert(
            version.path.clone(),
            Cached {
                len,
                modified,
                id: id.clone(),
                size: m.meta.size,
                packs: packs.clone(),
            },
        );
        Ok(Resolved {
            id,
            size: m.meta.size,
            version,
            packs,
        })
    }

    /// The stored image that is exactly `id` (same name, version and digest), if it is still
    /// in the store.
    pub fn find(&self, store: &Store, id: &ImageId) -> Option<Resolved> {
        let r = ImageRef {
            name: id.name.clone(),
            version: Some(id.version),
        };
        self.resolve(store, &r).ok().filter(|x| x.id == *id)
    }
}
