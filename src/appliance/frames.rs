//! Frames of a store kept in object storage, served to agents from a local read-through cache:
//! a hundred agents installing one image make one GET per frame to the object store, not a
//! hundred.
//!
//! Only whole frames that a manifest names are served (agents ask for exactly those), so every
//! frame is verified when it arrives from the object store — decompressed and each of its chunks
//! hashed against the manifest — before it is cached or sent; a damaged object is never passed
//! on. The cache is bounded in bytes and evicts the least recently used frame; concurrent
//! requests for a frame not yet cached wait for one fetch.

use crate::store::Store;
use bytes::Bytes;
use fleetboot_image::{ChunkId, Manifest, PackId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// What a frame must be, from the manifests.
#[derive(Clone, Debug)]
struct FrameInfo {
    stored: u32,
    raw: u32,
    zstd: bool,
    /// (offset in the raw frame, size, id) of each chunk.
    chunks: Vec<(u32, u32, ChunkId)>,
}

type Key = (PackId, u64);

/// Reloads of the manifests, at most one per this.
const RELOAD_INTERVAL_MIN: Duration = Duration::from_secs(2);
/// How long the frames of a manifest served to an agent stay servable: an install token's
/// default lifetime, the longest an install lasts.
const LEARNED_FOR: Duration = Duration::from_secs(4 * 3600);
/// One fetch of a frame from the object store, which every request for it awaits.
type Fetch = OnceCell<Result<Bytes, String>>;

/// Why a frame was not served.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("no image names a frame of {len} bytes at {offset} of pack {pack}")]
    Unknown { pack: PackId, offset: u64, len: u64 },
    #[error("{0}")]
    Store(String),
    #[error("frame at {offset} of pack {pack} is damaged in the store: {why}")]
    Damaged {
        pack: PackId,
        offset: u64,
        why: String,
    },
}

/// Cached frames, least recently used first out.
#[derive(Default)]
struct Lru {
    frames: HashMap<Key, (Bytes, u64)>,
    by_use: BTreeMap<u64, Key>,
    bytes: u64,
    tick: u64,
}

/// The cache of one appliance.
pub struct FrameCache {
    bytes_max: u64,
    lru: Mutex<Lru>,
    fetches: std::sync::atomic::AtomicU64,
    /// Frames being fetched: later requests wait on the same cell.
    inflight: Mutex<HashMap<Key, Arc<Fetch>>>,
    /// Frames the manifests name: read again when asked for one it does not know, at most
    /// once per `RELOAD_INTERVAL_MIN` (an unknown frame asked for again and again must not
    /// make the appliance read every manifest each time), one reload at a time.
    index: Mutex<HashMap<Key, FrameInfo>>,
    reloaded: tokio::sync::Mutex<Option<Instant>>,
    /// Frames of manifests served to agents, kept for `LEARNED_FOR` even if gc rewrites the
    /// manifest and a reload no longer finds them (the install that got it may still ask).
    learned: Mutex<HashMap<Key, (FrameInfo, Instant)>>,
}

/// Counters for the metrics page and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Frames held, and their bytes.
    pub frames: usize,
    pub bytes: u64,
    /// Frames read from the object store since the start.
    pub fetches: u64,
}

impl CacheStats {
    /// Prometheus text lines.
    pub fn render(&self) -> String {
        format!(
            "# HELP fleetboot_frame_cache_frames Verified frames held in memory.\n\
             # TYPE fleetboot_frame_cache_frames gauge\nfleetboot_frame_cache_frames {}\n\
             # HELP fleetboot_frame_cache_bytes Bytes of the frames held.\n\
             # TYPE fleetboot_frame_cache_bytes gauge\nfleetboot_frame_cache_bytes {}\n\
             # HELP fleetboot_frame_fetches_total Frames read from the object store.\n\
             # TYPE fleetboot_frame_fetches_total counter\nfleetboot_frame_fetches_total {}\n",
            self.frames, self.bytes, self.fetches
        )
    }
}

impl FrameCache {
    pub fn new(bytes_max: u64) -> FrameCache {
        FrameCache {
            bytes_max,
            lru: Mutex::default(),
            fetches: Default::default(),
            inflight: Mutex::default(),
            index: Mutex::default(),
            reloaded: tokio::sync::Mutex::new(None),
            learned: Mutex::default(),
        }
    }

    pub fn stats(&self) -> CacheStats {
        let lru = self.lru.lock().unwrap_or_else(|p| p.into_inner());
        CacheStats {
            frames: lru.frames.len(),
            bytes: lru.bytes,
            fetches: self.fetches.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The frame of `len` bytes at `offset` of `pack`, verified.
    pub async fn get(
        &self,
        store: &Store,
        pack: PackId,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, FrameError> {
        let key = (pack, offset);
        if let Some(b) = self.cached(&key) {
            if b.len() as u64 == len {
                return Ok(b);
            }
        }
        let info = match self.info(&key) {
            Some(info) => info,
            None => self
                .reload_for(store, &key)
                .await?
                .ok_or(FrameError::Unknown { pack, offset, len })?,
        };
        if u64::from(info.stored) != len {
            return Err(FrameError::Unknown { pack, offset, len });
        }
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let result = cell
            .get_or_init(|| async {
                // Fetched and cached by another request since this one looked.
                if let Some(b) = self.cached(&key) {
                    return Ok(b);
                }
                let s = store.clone();
                self.fetches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let fetched = tokio::task::spawn_blocking(move || {
                    let stored = s
                        .frames()
                        .read(&pack, offset, info.stored)
                        .map_err(|e| format!("pack {pack} at {offset}: {e}"))?;
                    check(&stored, &info)
                        .map_err(|why| FrameError::Damaged { pack, offset, why }.to_string())?;
                    Ok(Bytes::from(stored))
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                if let Ok(b) = &fetched {
                    self.insert(key, b.clone());
                }
                fetched
            })
            .await
            .clone();
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        result.map_err(FrameError::Store)
    }

    /// Learns the frames of a manifest being served: whatever gc does to the store after, the
    /// agent that got it can fetch what it names (for `LEARNED_FOR`).
    pub fn learn(&self, m: &Manifest) {
        let mut frames = HashMap::new();
        add_frames(&mut frames, m);
        let now = Instant::now();
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        learned.retain(|_, (_, at)| now.duration_since(*at) < LEARNED_FOR);
        learned.extend(frames.into_iter().map(|(k, f)| (k, (f, now))));
    }

    fn info(&self, key: &Key) -> Option<FrameInfo> {
        if let Some(f) = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Some(f.clone());
        }
        let learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        learned.get(key).map(|(f, _)| f.clone())
    }

    /// Reads the manifests again (a frame of an image imported since), unless another request
    /// just did; what `key` is then, if anything.
    async fn reload_for(&self, store: &Store, key: &Key) -> Result<Option<FrameInfo>, FrameError> {
        let mut last = self.reloaded.lock().await;
        if let Some(info) = self.info(key) {
            return Ok(Some(info));
        }
        if last.is_some_and(|at| at.elapsed() < RELOAD_INTERVAL_MIN) {
            return Ok(None);
        }
        *last = Some(Instant::now());
        let s = store.clone();
        let fresh = tokio::task::spawn_blocking(move || read_index(&s))
            .await
            .map_err(|e| FrameError::Store(e.to_string()))?
            .map_err(|e| FrameError::Store(e.to_string()))?;
        // Replaced, not merged: frames no manifest names any more go (those an agent was
        // given are in `learned`).
        *self.index.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(self.info(key))
    }

    fn cached(&self, key: &Key) -> Option<Bytes> {
        let mut lru = self.lru.lock().unwrap_or_else(|p| p.into_inner());
        lru.tick += 1;
        let tick = lru.tick;
        let (bytes, old) = {
            let (b, used) = lru.frames.get_mut(key)?;
            let old = std::mem::replace(used, tick);
            (b.clone(), old)
        };
        lru.by_use.remove(&old);
        lru.by_use.insert(tick, *key);
        Some(bytes)
    }

    fn insert(&self, key: Key, bytes: Bytes) {
        let len = bytes.len() as u64;
        if len > self.bytes_max {
            return;
        }
        let mut lru = self.lru.lock().unwrap_or_else(|p| p.into_inner());
        if lru.frames.contains_key(&key) {
            return;
        }
        while lru.bytes + len > self.bytes_max {
            let Some((_, old)) = lru.by_use.pop_first() else {
                break;
            };
            if let Some((b, _)) = lru.frames.remove(&old) {
                lru.bytes -= b.len() as u64;
            }
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.frames.insert(key, (bytes, tick));
        lru.by_use.insert(tick, key);
        lru.bytes += len;
    }
}

/// Every frame the store's manifests name.
fn read_index(store: &Store) -> Result<HashMap<Key, FrameInfo>, crate::store::StoreError> {
    let mut frames = HashMap::new();
    for (_, m) in store.all_manifests()? {
        add_frames(&mut frames, &m);
    }
    Ok(frames)
}

/// Adds the frames `m` names to `frames`.
fn add_frames(frames: &mut HashMap<Key, FrameInfo>, m: &Manifest) {
    for e in &m.entries {
        let f = frames
            .entry((m.packs[e.pack as usize], e.frame_offset))
            .or_insert_with(|| FrameInfo {
                stored: e.frame_stored,
                raw: e.frame_raw,
                zstd: e.is_zstd(),
                chunks: Vec::new(),
            });
        if !f.chunks.iter().any(|c| c.0 == e.chunk_offset) {
            f.chunks.push((e.chunk_offset, e.size, e.id));
        }
    }
}

/// Checks a frame as stored against what the manifests say it holds.
fn check(stored: &[u8], info: &FrameInfo) -> Result<(), String> {
    let raw;
    let data: &[u8] = if info.zstd {
        raw = zstd::bulk::decompress(stored, info.raw as usize)
            .map_err(|_| "does not decompress".to_string())?;
        &raw
    } else {
        stored
    };
    if data.len() != info.raw as usize {
        return Err(format!("holds {} bytes, not {}", data.len(), info.raw));
    }
    for &(at, size, id) in &info.chunks {
        let chunk = data
            .get(at as usize..(at + size) as usize)
            .ok_or("a chunk lies beyond the frame")?;
        if ChunkId::of(chunk) != id {
            return Err(format!("chunk {id} does not match its hash"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appliance::test_backend::Remote;
    use crate::store::Backend;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_are_verified_cached_once_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let reads = Arc::new(AtomicUsize::new(0));
        let store = Store::with_backend(
            dir.path().join("staging"),
            Arc::new(Remote::new(&root).counting_reads(reads.clone())),
        );
        // 16 MiB: text (compressible) and pseudo-random blocks.
        let mut img = vec![0u8; 16 << 20];
        let mut x = 7u64;
        for (i, b) in img.chunks_mut(4096).enumerate() {
            if i % 3 == 0 {
                b.iter_mut().for_each(|c| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *c = x as u8;
                });
            } else {
                let line = format!("line {i} key=value\n");
                b.iter_mut()
                    .enumerate()
                    .for_each(|(j, c)| *c = line.as_bytes()[j % line.len()]);
            }
        }
        let path = dir.path().join("a.img");
        std::fs::write(&path, &img).unwrap();
        let opts = crate::store::ImportOptions::default();
        crate::store::import::import(&store, "a", &path, &opts, &|_, _| {}).unwrap();
        let (_, m) = store.manifest(&"a".parse().unwrap()).unwrap();
        let mut frames: Vec<(PackId, u64, u32)> = m
            .entries
            .iter()
            .map(|e| (m.packs[e.pack as usize], e.frame_offset, e.frame_stored))
            .collect();
        frames.sort();
        frames.dedup();
        assert!(
            frames.len() >= 3,
            "the image spans several frames: {}",
            frames.len()
        );
        let total: u64 = frames.iter().map(|f| u64::from(f.2)).sum();

        let cache = Arc::new(FrameCache::new(total));
        // Twenty requests for one frame at once: one read of the object store.
        let (pack, offset, len) = frames[0];
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (cache, store) = (cache.clone(), store.clone());
            tasks.push(tokio::spawn(async move {
                cache.get(&store, pack, offset, u64::from(len)).await
            }));
        }
        let want = crate::store::Folder::new(&root)
            .read_at(&Store::pack_key(&pack), offset, len as usize)
            .unwrap();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), want);
        }
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats().fetches, 1);

        // Every frame, twice: read once each, then from the cache.
        for _ in 0..2 {
            for &(p, o, l) in &frames {
                cache.get(&store, p, o, u64::from(l)).await.unwrap();
            }
        }
        assert_eq!(reads.load(Ordering::Relaxed), frames.len());
        assert_eq!(cache.stats().bytes, total);

        // Not a frame a manifest names: refused, nothing read.
        let e = cache.get(&store, pack, offset + 1, 10).await.unwrap_err();
        assert!(matches!(e, FrameError::Unknown { .. }), "{e}");
        let e = cache.get(&store, pack, offset, u64::from(len) - 1).await;
        assert!(matches!(e, Err(FrameError::Unknown { .. })));
        assert_eq!(reads.load(Ordering::Relaxed), frames.len());

        // A smaller cache stays within its bound; a frame damaged in the store is never served.
        let small = FrameCache::new(u64::from(frames[1].2) + u64::from(frames[2].2));
        for &(p, o, l) in &frames[1..] {
            small.get(&store, p, o, u64::from(l)).await.unwrap();
            assert!(small.stats().bytes <= u64::from(frames[1].2) + u64::from(frames[2].2));
        }
        let (p, o, l) = frames[0];
        let file = root.join(Store::pack_key(&p));
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[o as usize + l as usize / 2] ^= 0x55;
        std::fs::write(&file, &bytes).unwrap();
        let e = small.get(&store, p, o, u64::from(l)).await.unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(small.cached(&(p, o)).is_none());
    }
}
