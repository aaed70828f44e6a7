//! `store compact`: rewrite cold packs smaller, keeping every frame one range request away.
//!
//! Imports compress fast (zstd level 6, frames of the chunks one import saw first, in its order).
//! Compaction is the background pass of a log-structured store: it takes the packs older than a
//! given age (or all), and writes their live chunks again —
//! - **regrouped by use:** chunks used by the same set of images sit together, in the order the
//!   first of those images uses them. A machine moving from one image to another then fetches
//!   whole frames of chunks it needs and no frame of chunks it has (an import's frames mix
//!   chunks that only some later images share);
//! - **in bigger frames at a high zstd level** (16 MiB and level 19 by default): frames never
//!   cross a group, so the bigger frame costs a delta fetch only at each group's end.
//!
//! - **with ids once per store:** each new pack gets an id table, and the manifests it rewrites
//!   are format 2, naming chunks by table row instead of repeating 32-byte ids in every image.
//!
//! Every chunk is hashed against its id as it is copied: nothing unverified is written.
//!
//! Crash safety and concurrency, like gc: the new packs are written into a staging folder of
//! their own (`tmp/compact/`), then put in place (an object store uploads them), each with its id
//! table, all without the writers' lock, so imports, `rm` and gc go on while the slow part runs
//! — uploads of gigabytes included. A gc in that window sees packs no manifest names and retires
//! them, as it would an interrupted import's. The lock is taken only to publish: every new pack is
//! checked to be in `packs/` (one a gc retired meanwhile is put back; one it already deleted, with
//! no grace, ends the pass with nothing changed), then each manifest naming a compacted pack is
//! re-read and rewritten atomically to name the new frames (the same image, the same digest),
//! and last the old packs — when no manifest names them any more — are retired (readable for gc's
//! grace period, so installs and exports that loaded a manifest before go on). A kill at any
//! point leaves every image whole: before the manifests are rewritten they name only the old
//! packs; after, only packs that are visible. Staged packs of an interrupted run are removed by
//! the next one; published but unnamed ones by gc.

use super::id_tables::TableCache;
use super::import::Loc;
use super::pack::{PackWriter, PACK_HEADER_BYTES};
use super::{IoContext, Store, StoreError};
use fleetboot_image::id_table::{IdTable, TableIndex};
use fleetboot_image::manifest::FLAG_ZSTD;
use fleetboot_image::{ChunkId, FrameSource, Manifest, PackId};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Tuning of a compaction.
#[derive(Clone, Copy, Debug)]
pub struct CompactOptions {
    /// Only packs older than this (by their modification time); `None`: every pack.
    pub older_than: Option<Duration>,
    pub zstd_level: i32,
    /// Raw bytes of chunks per frame at most (a frame also ends where its group of chunks does).
    pub frame_bytes: usize,
    /// Compression worker threads.
    pub threads: usize,
    /// A new pack is closed and another started past this size.
    pub pack_bytes_max: u64,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            older_than: None,
            zstd_level: 19,
            frame_bytes: 16 << 20,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            pack_bytes_max: 1 << 30,
        }
    }
}

/// What a compaction did.
#[derive(Debug, Default, Serialize)]
pub struct CompactReport {
    /// Packs rewritten and retired, and their bytes.
    pub packs_compacted: usize,
    pub bytes_before: u64,
    /// Packs written, and their bytes.
    pub packs_written: usize,
    pub bytes_after: u64,
    /// Distinct chunks moved, their raw bytes, and the frames they now sit in.
    pub chunks: usize,
    pub raw_bytes: u64,
    pub frames: usize,
    pub manifests_rewritten: usize,
    /// Bytes of the manifests rewritten, before and after (format 2), and of the new id tables.
    pub manifest_bytes_before: u64,
    pub manifest_bytes_after: u64,
    pub id_table_bytes: u64,
    /// Packs left as they were: younger than `older_than`, or named again by an image that
    /// appeared while the pass ran.
    pub packs_kept: usize,
    /// The rewritten packs would not have been smaller than the old ones: nothing was changed.
    pub no_gain: bool,
    /// Seconds spent writing the new packs (no lock held) and publishing them (under the lock).
    pub write_secs: f64,
    pub publish_secs: f64,
}

/// Decompressed old frames kept for the chunks that follow (bounded in bytes).
const FRAME_CACHE_BYTES: usize = 128 << 20;
/// The compaction's own lock (one pass at a time) and staging folder, in the store's local folder.
pub(crate) const COMPACT_LOCK: &str = "compact.lock";
const STAGING: &str = "tmp/compact";

impl Store {
    /// Rewrites the packs `options` selects: regrouped, in bigger frames, compressed harder.
    pub fn compact(&self, options: &CompactOptions) -> Result<CompactReport, StoreError> {
        // Never into a folder that is not a store (nor make one out of an empty folder).
        self.check_exists()?;
        // One compaction at a time (its staging folder is its own); writers are not held up.
        let own_lock = self.root().join(COMPACT_LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&own_lock)
            .at(&own_lock)?;
        lock.lock().at(&own_lock)?;
        let staging = self.root().join(STAGING);
        if staging.exists() {
            fs::remove_dir_all(&staging).at(&staging)?;
        }
        fs::create_dir_all(&staging).at(&staging)?;
        let result = self.compact_staged(options, &staging);
        // Staged packs are either published now or of no use (on success and on failure).
        let _ = fs::remove_dir_all(&staging);
        result
    }

    fn compact_staged(
        &self,
        options: &CompactOptions,
        staging: &Path,
    ) -> Result<CompactReport, StoreError> {
        let started = Instant::now();
        let mut report = CompactReport::default();
        let (cold, groups) = self.plan_compaction(options, &mut report)?;
        let (writers, moved) = if groups.is_empty() {
            (Vec::new(), HashMap::new())
        } else {
            self.write_compacted(&groups, staging, options, &mut report)?
        };
        report.write_secs = started.elapsed().as_secs_f64();
        // What the store would hold after — the new packs, their id tables, the manifests in
        // format 2 — against what it holds: the cold packs and the manifests as they are. (Ids
        // stored once count too: incompressible data still gains by them.)
        let mut tables = TableCache::new();
        for (w, ids) in &writers {
            let bytes = IdTable {
                pack: w.id(),
                ids: ids.clone(),
            }
            .encode();
            report.id_table_bytes += bytes.len() as u64;
            tables.insert(w.id(), TableIndex::of_bytes(&bytes, &w.id()).ok());
        }
        let cold_set: HashSet<PackId> = cold.iter().map(|c| c.0).collect();
        let (mut manifests_now, mut manifests_after) = (0u64, 0u64);
        for (v, mut m) in self.present_manifests()? {
            if repoint(&mut m, &cold_set, &moved) {
                manifests_now += v.size;
                manifests_after += self.encode_manifest(&m, &mut tables)?.len() as u64;
            }
        }
        // The cold packs' own tables (an earlier compaction's) are retired with them.
        let tables_now: u64 = {
            let sizes = self.id_table_sizes()?;
            cold.iter().filter_map(|c| sizes.get(&c.0)).sum()
        };
        let old_bytes: u64 = cold.iter().map(|c| c.1).sum::<u64>() + manifests_now + tables_now;
        let new_bytes: u64 = writers.iter().map(|w| w.0.len()).sum::<u64>()
            + report.id_table_bytes
            + manifests_after;
        if writers.is_empty() || new_bytes >= old_bytes {
            // Nothing to gain (already compacted): the store stays as is.
            report.packs_kept += cold.len();
            report.no_gain = !writers.is_empty();
            report.id_table_bytes = 0;
            return Ok(report);
        }

        // The new packs go in place (an object store uploads them) without the lock, each with
        // its id table before any manifest names the pack by it.
        let mut new_packs = Vec::with_capacity(writers.len());
        for (w, ids) in writers {
            report.bytes_after += w.len();
            let pack = w.finish(self)?;
            self.put_id_table(pack, ids)?;
            new_packs.push(pack);
            report.packs_written += 1;
        }
        report.write_secs = started.elapsed().as_secs_f64();

        let started = Instant::now();
        // Publishing: the new packs checked in place, then the manifests, then the old packs.
        let _lock = self.lock_for_write()?;
        // Only the cold packs still in `packs/`: gc may have rewritten or retired some while
        // the new packs were written (their manifests name gc's packs now, left as they are).
        let present = self.keep_published(&new_packs)?;
        let cold: Vec<(PackId, u64)> = cold
            .into_iter()
            .filter(|c| present.contains(&c.0))
            .collect();
        let cold_set: HashSet<PackId> = cold.iter().map(|c| c.0).collect();
        // The manifests as they are now: images may have come or gone while the packs were
        // written (an import reusing chunks of a cold pack is repointed like the rest).
        let b = self.backend();
        let mut still_named: HashSet<PackId> = HashSet::new();
        for (v, mut m) in self.present_manifests()? {
            if repoint(&mut m, &cold_set, &moved) {
                // Removed since (by `image rm` on another appliance sharing an object store):
                // not brought back.
                if b.get(&v.key).at(&v.path)?.is_none() {
                    continue;
                }
                // Format 2 where the packs have id tables (the new ones all do).
                let bytes = self.encode_manifest(&m, &mut tables)?;
                b.put(&v.key, &bytes).at(&v.path)?;
                report.manifests_rewritten += 1;
                report.manifest_bytes_before += v.size;
                report.manifest_bytes_after += bytes.len() as u64;
            }
            still_named.extend(m.packs.iter().copied());
        }
        for (pack, len) in &cold {
            if still_named.contains(pack) {
                report.packs_kept += 1;
                continue;
            }
            match self.retire_pack(pack) {
                Ok(()) => {}
                // Retired since the listing (by a gc elsewhere): nothing left to do.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).at(&b.locate(&Store::pack_key(pack))),
            }
            report.packs_compacted += 1;
            report.bytes_before += len;
        }
        report.publish_secs = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Makes sure every pack in `new` is in `packs/` (the caller holds the writers' lock): one
    /// a gc retired since it was put there (no manifest named it yet) is put back; one already
    /// deleted (a gc with no grace) is an error, before any manifest names it. Returns the packs
    /// in `packs/` then.
    fn keep_published(&self, new: &[PackId]) -> Result<HashSet<PackId>, StoreError> {
        let mut present: HashSet<PackId> = self.packs()?.into_iter().map(|p| p.0).collect();
        let missing: Vec<PackId> = new
            .iter()
            .filter(|p| !present.contains(p))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(present);
        }
        let retired: HashSet<PackId> = self.retired_packs()?.into_iter().map(|p| p.0).collect();
        let b = self.backend();
        for pack in missing {
            let at = b.locate(&Store::pack_key(&pack));
            if !retired.contains(&pack) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "this new pack was deleted (by a gc with no grace period?) before compaction \
                     could publish it; no image was changed: run the compaction again",
                ))
                .at(&at);
            }
            self.restore_pack(&pack).at(&at)?;
            present.insert(pack);
        }
        Ok(present)
    }

    /// Every image version with its manifest, skipping those removed between the listing and
    /// the reading (an `image rm` beside the pass).
    fn present_manifests(&self) -> Result<Vec<(super::VersionPath, Manifest)>, StoreError> {
        let mut out = Vec::new();
        for v in self.versions()? {
            match self.load_manifest(&v) {
                Ok(m) => out.push((v, m)),
                Err(StoreError::Io { error, .. })
                    if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Picks the cold packs and orders their live chunks: grouped by the set of images using
    /// them, each group in the order its first image uses them. Returns the cold packs (with
    /// their sizes) and the groups of chunks in their new order, with where each is now.
    #[allow(clippy::type_complexity)]
    fn plan_compaction(
        &self,
        options: &CompactOptions,
        report: &mut CompactReport,
    ) -> Result<(Vec<(PackId, u64)>, Vec<Vec<(ChunkId, Loc)>>), StoreError> {
        let now = SystemTime::now();
        let mut cold = Vec::new();
        for (id, o) in self.pack_objects("packs/")? {
            let age = now.duration_since(o.modified).unwrap_or_default();
            if options.older_than.is_none_or(|min| age >= min) {
                cold.push((id, o.size));
            } else {
                report.packs_kept += 1;
            }
        }
        let cold_set: HashSet<PackId> = cold.iter().map(|c| c.0).collect();
        let manifests = self.present_manifests()?;
        // chunk -> (where it is, the images using it)
        let mut users: HashMap<ChunkId, (Loc, Vec<u32>)> = HashMap::new();
        for (i, (_, m)) in manifests.iter().enumerate() {
            for e in &m.entries {
                let pack = m.packs[e.pack as usize];
                if !cold_set.contains(&pack) {
                    continue;
                }
                let (_, images) = users
                    .entry(e.id)
                    .or_insert_with(|| (Loc::of(m, e), Vec::new()));
                if images.last() != Some(&(i as u32)) {
                    images.push(i as u32);
                }
            }
        }
        // Groups keyed by their images, so a group's key sorts by the first image using it;
        // within a group, first use in image order (the first image's map order).
        let mut groups: BTreeMap<Vec<u32>, Vec<(ChunkId, Loc)>> = BTreeMap::new();
        let mut placed: HashSet<ChunkId> = HashSet::new();
        for (_, m) in &manifests {
            for x in &m.extents {
                let Some(e) = x.entry else { continue };
                let id = m.entries[e as usize].id;
                let Some((loc, images)) = users.get(&id) else {
                    continue;
                };
                if placed.insert(id) {
                    groups.entry(images.clone()).or_default().push((id, *loc));
                }
            }
        }
        Ok((cold, groups.into_values().collect()))
    }

    /// Copies the planned chunks (verified) into new frames, compressed by worker threads, and
    /// appends them to new packs in `staging`. Returns the packs (each with the ids of its chunks,
    /// in its order: its id table) and every chunk's new place.
    #[allow(clippy::type_complexity)]
    fn write_compacted(
        &self,
        groups: &[Vec<(ChunkId, Loc)>],
        staging: &Path,
        options: &CompactOptions,
        report: &mut CompactReport,
    ) -> Result<(Vec<(PackWriter, Vec<ChunkId>)>, HashMap<ChunkId, Loc>), StoreError> {
        // Frames: runs of a group up to `frame_bytes`; a group's end ends its last frame.
        let mut frames: Vec<&[(ChunkId, Loc)]> = Vec::new();
        for group in groups {
            let mut rest = group.as_slice();
            while !rest.is_empty() {
                let mut raw = 0usize;
                let n = rest
                    .iter()
                    .take_while(|(_, loc)| {
                        raw += loc.size as usize;
                        raw <= options.frame_bytes
                    })
                    .count()
                    .max(1);
                let (frame, after) = rest.split_at(n);
                frames.push(frame);
                rest = after;
            }
        }
        report.chunks = groups.iter().map(Vec::len).sum();
        report.frames = frames.len();
        report.raw_bytes = groups.iter().flatten().map(|c| u64::from(c.1.size)).sum();

        let source = self.frames();
        let threads = options.threads.max(1);
        let level = options.zstd_level;
        // The window spans the whole frame ([`frame_compressor`]), within what every decoder
        // accepts by default (2^27).
        let window_log = (usize::BITS
            - options
                .frame_bytes
                .max(1024)
                .next_power_of_two()
                .leading_zeros()
            - 1)
        .clamp(10, 27);
        let frames = &frames;
        std::thread::scope(|s| {
            let (work_tx, work_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(threads);
            let work_rx = Arc::new(Mutex::new(work_rx));
            let (done_tx, done_rx) = mpsc::sync_channel::<Result<Compressed, String>>(threads);
            for _ in 0..threads {
                let work_rx = work_rx.clone();
                let done_tx = done_tx.clone();
                s.spawn(move || {
                    // One context per worker, for every frame it compresses.
                    let mut zstd = None;
                    loop {
                        let job = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((seq, raw)) = job else { return };
                        let raw_len = raw.len() as u32;
                        // A panic here would otherwise end the process at the scope's end; it
                        // becomes the pass's error instead, and the writer stops everything.
                        // (The worker then stops: its context is never used again.)
                        let compress = std::panic::AssertUnwindSafe(|| {
                            let z = match &mut zstd {
                                Some(z) => z,
                                None => zstd.insert(frame_compressor(level, window_log)?),
                            };
                            z.compress(&raw)
                        });
                        let done = match std::panic::catch_unwind(compress) {
                            Ok(Ok(z)) if z.len() < raw.len() => Ok((z, FLAG_ZSTD)),
                            Ok(_) => Ok((raw, 0)),
                            Err(_) => Err(format!("a compression worker failed on frame {seq}")),
                        }
                        .map(|(bytes, flags)| Compressed {
                            seq,
                            bytes,
                            raw_len,
                            flags,
                        });
                        let failed = done.is_err();
                        if done_tx.send(done).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            drop((done_tx, work_rx));
            // The reader: builds each frame's raw bytes from the old frames, checking every chunk.
            let source = &source;
            let reader = s.spawn(move || -> Result<(), StoreError> {
                let mut cache = FrameCache::default();
                for (seq, frame) in frames.iter().enumerate() {
                    let mut buf = Vec::new();
                    for (id, loc) in frame.iter() {
                        let data = cache.get(self, source.as_ref(), loc)?;
                        let at = loc.chunk_offset as usize;
                        let chunk = data
                            .get(at..at + loc.size as usize)
                            .ok_or_else(|| bad(self, loc, "the chunk lies past its frame"))?;
                        if ChunkId(*blake3::hash(chunk).as_bytes()) != *id {
                            return Err(bad(self, loc, "a chunk does not match its id"));
                        }
                        buf.extend_from_slice(chunk);
                    }
                    if work_tx.send((seq, buf)).is_err() {
                        break;
                    }
                }
                Ok(())
            });
            // This thread: appends the frames in order and records where each chunk went.
            // `move`: a write error drops the receiver, which stops the workers, then the reader.
            let written = (move || {
                let mut writers: Vec<(PackWriter, Vec<ChunkId>)> = Vec::new();
                let mut moved: HashMap<ChunkId, Loc> = HashMap::new();
                let mut waiting: BTreeMap<usize, Compressed> = BTreeMap::new();
                let mut next = 0usize;
                for c in done_rx.iter() {
                    let c = c.map_err(|what| StoreError::BadInput {
                        path: self.root().to_path_buf(),
                        what,
                    })?;
                    waiting.insert(c.seq, c);
                    while let Some(c) = waiting.remove(&next) {
                        let full = writers.last().is_none_or(|(w, _)| {
                            w.len() + c.bytes.len() as u64 > options.pack_bytes_max
                                && w.len() > PACK_HEADER_BYTES
                        });
                        if full {
                            writers.push((PackWriter::create_in(self, staging)?, Vec::new()));
                        }
                        let (w, ids) = writers.last_mut().expect("a pack was just ensured");
                        let offset = w.append(&c.bytes).at(staging)?;
                        let mut chunk_offset = 0u32;
                        for (id, old) in frames[next] {
                            let new = Loc {
                                pack: w.id(),
                                flags: c.flags,
                                frame_offset: offset,
                                frame_stored: c.bytes.len() as u32,
                                frame_raw: c.raw_len,
                                chunk_offset,
                                size: old.size,
                            };
                            moved.insert(*id, new);
                            ids.push(*id);
                            chunk_offset += old.size;
                        }
                        next += 1;
                    }
                }
                if next != frames.len() {
                    // The reader stopped early: its error says why.
                    return Ok(None);
                }
                Ok::<_, StoreError>(Some((writers, moved)))
            })();
            let read = reader.join().unwrap_or_else(|_| {
                Err(StoreError::BadInput {
                    path: self.root().to_path_buf(),
                    what: "the compaction's reader thread failed".into(),
                })
            });
            match (written?, read) {
                (_, Err(e)) => Err(e),
                (Some(done), Ok(())) => Ok(done),
                (None, Ok(())) => Err(StoreError::BadInput {
                    path: self.root().to_path_buf(),
                    what: "the compaction's workers stopped early".into(),
                }),
            }
        })
    }
}

/// A compression context for compacted frames: the window spans the whole frame (level 19's own
/// is 8 MiB), with long-distance matching, so repeats anywhere in a frame are found.
fn frame_compressor(
    level: i32,
    window_log: u32,
) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    let mut z = zstd::bulk::Compressor::new(level)?;
    z.set_parameter(zstd::zstd_safe::CParameter::WindowLog(window_log))?;
    z.set_parameter(zstd::zstd_safe::CParameter::EnableLongDistanceMatching(
        true,
    ))?;
    Ok(z)
}

/// A frame compressed by a worker: its place in the sequence, its bytes and how to read them.
struct Compressed {
    seq: usize,
    bytes: Vec<u8>,
    raw_len: u32,
    flags: u32,
}

/// Decompressed old frames kept for the chunks that follow, least recently read dropped first
/// (bounded in bytes: [`FRAME_CACHE_BYTES`]).
#[derive(Default)]
struct FrameCache {
    frames: VecDeque<((PackId, u64), Vec<u8>)>,
    bytes: usize,
}

impl FrameCache {
    fn get(
        &mut self,
        store: &Store,
        source: &(dyn FrameSource + Send + '_),
        loc: &Loc,
    ) -> Result<&[u8], StoreError> {
        let key = (loc.pack, loc.frame_offset);
        // The frame just read is the likeliest: search from the newest.
        match self.frames.iter().rposition(|(k, _)| *k == key) {
            Some(i) => {
                let hit = self.frames.remove(i).expect("the position was just found");
                self.frames.push_back(hit);
            }
            None => {
                let data = read_frame(store, source, loc)?;
                self.bytes += data.len();
                self.frames.push_back((key, data));
                while self.bytes > FRAME_CACHE_BYTES && self.frames.len() > 1 {
                    if let Some((_, old)) = self.frames.pop_front() {
                        self.bytes -= old.len();
                    }
                }
            }
        }
        Ok(&self.frames.back().expect("the frame was just cached").1)
    }
}

/// Points `m`'s entries held in `cold` packs at the new places `moved` gives their chunks, and
/// lists only the packs the entries then use. Returns whether any entry moved.
fn repoint(m: &mut Manifest, cold: &HashSet<PackId>, moved: &HashMap<ChunkId, Loc>) -> bool {
    let old_packs = std::mem::take(&mut m.packs);
    let mut index: HashMap<PackId, u32> = HashMap::new();
    let mut changed = false;
    for e in m.entries.iter_mut() {
        let old = old_packs[e.pack as usize];
        let pack = match moved.get(&e.id) {
            Some(new) if cold.contains(&old) => {
                e.flags = new.flags;
                e.frame_offset = new.frame_offset;
                e.frame_stored = new.frame_stored;
                e.frame_raw = new.frame_raw;
                e.chunk_offset = new.chunk_offset;
                changed = true;
                new.pack
            }
            _ => old,
        };
        e.pack = *index.entry(pack).or_insert_with(|| {
            m.packs.push(pack);
            (m.packs.len() - 1) as u32
        });
    }
    changed
}

/// Reads and decompresses the old frame `loc` names.
fn read_frame(
    store: &Store,
    source: &(dyn FrameSource + Send + '_),
    loc: &Loc,
) -> Result<Vec<u8>, StoreError> {
    let at = store.backend().locate(&Store::pack_key(&loc.pack));
    let stored = source
        .read(&loc.pack, loc.frame_offset, loc.frame_stored)
        .at(&at)?;
    if loc.flags & FLAG_ZSTD == 0 {
        return Ok(stored);
    }
    let data = zstd::bulk::decompress(&stored, loc.frame_raw as usize)
        .map_err(|e| bad(store, loc, &format!("the frame does not decompress: {e}")))?;
    if data.len() != loc.frame_raw as usize {
        return Err(bad(store, loc, "the frame decompresses to another length"));
    }
    Ok(data)
}

fn bad(store: &Store, loc: &Loc, what: &str) -> StoreError {
    StoreError::BadInput {
        path: store.backend().locate(&Store::pack_key(&loc.pack)),
        what: format!(
            "frame at {}: {what} (run `fleetboot store verify`)",
            loc.frame_offset
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new pack that a gc retired between its upload and the publishing is put back (with its
    /// id table); one a gc already deleted stops the pass before any manifest names it.
    #[test]
    fn published_packs_are_kept_or_the_pass_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        drop(store.lock_for_write().unwrap());
        let mut w = PackWriter::create(&store).unwrap();
        w.append(b"a frame").unwrap();
        let pack = w.finish(&store).unwrap();
        store.put_id_table(pack, vec![ChunkId([7; 32])]).unwrap();
        let in_packs =
            || -> Vec<PackId> { store.packs().unwrap().into_iter().map(|p| p.0).collect() };
        let table = || {
            store
                .backend()
                .get(&Store::id_table_key(&pack))
                .unwrap()
                .is_some()
        };

        let present = store.keep_published(&[pack]).unwrap();
        assert_eq!(present, HashSet::from([pack]));
        assert_eq!(in_packs(), vec![pack]);

        store.retire_pack(&pack).unwrap();
        assert!(in_packs().is_empty() && !table());
        // The set returned counts the pack put back, as the publishing then relies on.
        let present = store.keep_published(&[pack]).unwrap();
        assert_eq!(present, HashSet::from([pack]));
        assert_eq!(in_packs(), vec![pack]);
        assert!(table(), "the id table came back with its pack");

        store.retire_pack(&pack).unwrap();
        store.delete_retired_pack(&pack).unwrap();
        let err = store.keep_published(&[pack]).unwrap_err().to_string();
        assert!(
            err.contains("was deleted") && err.contains(&pack.to_string()),
            "{err}"
        );
    }
}
