//! Images as the configuration names them (`NAME` or `NAME@N`), resolved to their identity
//! (name, version, digest). The digest is read from the manifest once per manifest file (by
//! path, length and modification time), not on every boot. On an object store the listing of
//! versions is kept for [`LISTING_FRESH`] too: a rack booting at once would otherwise list the
//! bucket (and read its marker) several times per machine.

use crate::store::{ImageRef, Store, StoreError, VersionPath};
use fleetboot_image::api::ImageId;
use fleetboot_image::PackId;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How long an object store's listing of versions is used before it is listed again: how long
/// a new import (or a removed one) may go unseen by boots.
pub const LISTING_FRESH: Duration = Duration::from_secs(2);

/// Resolved images, by manifest file.
pub struct ImageCatalog {
    cache: Mutex<HashMap<PathBuf, Cached>>,
    /// Held while a manifest is read and decoded: a rack booting at once would otherwise decode
    /// the same multi-megabyte manifest on every blocking thread at the same moment (measured:
    /// 150 MB of peak memory for 30 agents, most of it kept by the allocator).
    loading: Mutex<()>,
    /// An object store's listing, and when it was made; held while it is remade, so a burst
    /// of boots lists the bucket once.
    listing: Mutex<Option<Listing>>,
    /// [`LISTING_FRESH`], but for tests.
    listing_fresh: Duration,
}

impl Default for ImageCatalog {
    fn default() -> Self {
        ImageCatalog {
            cache: Default::default(),
            loading: Default::default(),
            listing: Default::default(),
            listing_fresh: LISTING_FRESH,
        }
    }
}

struct Listing {
    store: PathBuf,
    made: Instant,
    /// The versions, or why the store could not be listed (kept as long: when the object
    /// store is down, a rack's boots must not each wait out its timeouts one after another).
    versions: Result<Arc<Vec<VersionPath>>, String>,
}

#[derive(Clone)]
struct Cached {
    len: u64,
    modified: Option<SystemTime>,
    id: ImageId,
    size: u64,
    packs: Arc<Vec<PackId>>,
    manifest_hash: Arc<str>,
    manifest_expanded: bool,
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
    /// BLAKE3 (hex) of the manifest as agents are served it.
    pub manifest_hash: Arc<str>,
    /// The manifest is stored in format 2: agents fetch it from an appliance, which expands it.
    pub manifest_expanded: bool,
}

impl ImageCatalog {
    /// The image `r` names now (its latest version if it names none).
    pub fn resolve(&self, store: &Store, r: &ImageRef) -> Result<Resolved, StoreError> {
        let version = if store.is_local() {
            store.resolve(r)?
        } else {
            Store::resolve_in(&self.listing(store)?, r)?
        };
        let (len, modified) = (version.size, Some(version.modified));
        let cached = |version: &VersionPath| {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let c = cache.get(&version.path)?;
            (c.len == len && c.modified == modified).then(|| Resolved {
                id: c.id.clone(),
                size: c.size,
                version: version.clone(),
                packs: c.packs.clone(),
                manifest_hash: c.manifest_hash.clone(),
                manifest_expanded: c.manifest_expanded,
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
        let served = store.served_manifest(&version)?;
        let m = served.manifest;
        let manifest_hash: Arc<str> = blake3::hash(&served.bytes).to_hex().to_string().into();
        let expanded = served.expanded;
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
                manifest_hash: manifest_hash.clone(),
                manifest_expanded: expanded,
            },
        );
        Ok(Resolved {
            id,
            size: m.meta.size,
            version,
            packs,
            manifest_hash,
            manifest_expanded: expanded,
        })
    }

    /// The versions in an object store, listed at most [`LISTING_FRESH`] ago.
    fn listing(&self, store: &Store) -> Result<Arc<Vec<VersionPath>>, StoreError> {
        let mut listing = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        let location = store.location();
        if let Some(l) = listing.as_ref() {
            if l.store == location && l.made.elapsed() < self.listing_fresh {
                return l.versions.clone().map_err(|e| StoreError::BadInput {
                    path: l.store.clone(),
                    what: format!("could not be listed a moment ago: {e}"),
                });
            }
        }
        let result = store.versions().map(Arc::new);
        *listing = Some(Listing {
            store: location,
            made: Instant::now(),
            versions: result.as_ref().map(Arc::clone).map_err(|e| e.to_string()),
        });
        result
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appliance::test_backend::Remote;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn an_object_stores_listing_is_kept_for_a_moment_and_then_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let lists = Arc::new(AtomicUsize::new(0));
        let store = Store::with_backend(
            dir.path().join("staging"),
            Arc::new(Remote::new(&dir.path().join("store")).counting_lists(lists.clone())),
        );
        let path = dir.path().join("a.img");
        let import = |fill: u8| {
            std::fs::write(&path, vec![fill; 1 << 20]).unwrap();
            let opts = crate::store::ImportOptions::default();
            crate::store::import::import(&store, "os", &path, &opts, &|_, _| {}).unwrap();
        };
        import(1);
        let os: ImageRef = "os".parse().unwrap();

        let kept = ImageCatalog {
            listing_fresh: Duration::from_secs(3600),
            ..Default::default()
        };
        let before = lists.load(Ordering::Relaxed);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| assert_eq!(kept.resolve(&store, &os).unwrap().id.version, 1));
            }
        });
        assert_eq!(
            lists.load(Ordering::Relaxed) - before,
            1,
            "sixteen boots at once list the bucket once"
        );
        import(2);
        assert_eq!(
            kept.resolve(&store, &os).unwrap().id.version,
            1,
            "the kept listing is used while it is fresh"
        );

        let fresh = ImageCatalog {
            listing_fresh: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(fresh.resolve(&store, &os).unwrap().id.version, 2);
        let before = lists.load(Ordering::Relaxed);
        let unknown: ImageRef = "other".parse().unwrap();
        assert!(matches!(
            fresh.resolve(&store, &unknown),
            Err(StoreError::UnknownImage(_))
        ));
        assert_eq!(
            lists.load(Ordering::Relaxed) - before,
            1,
            "listed again once stale"
        );

        // A store that cannot be listed (here: no store there at all, its marker missing) fails
        // every resolve, but is asked once while the failure is fresh.
        let gets = Arc::new(AtomicUsize::new(0));
        let broken = Store::with_backend(
            dir.path().join("staging2"),
            Arc::new(Remote::new(&dir.path().join("nothing")).counting_gets(gets.clone())),
        );
        let first = format!("{}", kept.resolve(&broken, &os).unwrap_err());
        for _ in 0..4 {
            let again = format!("{}", kept.resolve(&broken, &os).unwrap_err());
            assert!(again.contains(&first), "{again}");
        }
        assert_eq!(
            gets.load(Ordering::Relaxed),
            1,
            "one attempt for five boots"
        );
    }
}
