//! Creating an image on a destination: the pull-verify-write pipeline.
//!
//! Given a manifest, a [`FrameSource`] (pack files on a local disk, or HTTP range requests for the
//! agent) and a [`Target`] (a file or a block device), [`restore`] fetches every frame the image
//! needs exactly once, decompresses it, checks each chunk's BLAKE3 against its id, and only then
//! writes the chunk at every image offset that uses it. Zero runs are handed to the target, which
//! knows the cheapest way to make them read back as zeros.
//!
//! Frames are fetched and verified by several worker threads while the calling thread writes, so
//! fetching, decompression, hashing and writing overlap; at most `frames_in_flight` decompressed
//! frames wait in memory, whatever the image size.
//!
//! Invariant: no byte reaches the target before the chunk holding it has been verified.

use crate::id::{ChunkId, PackId};
use crate::manifest::{Entry, Manifest};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

/// Where frames come from: a range of bytes of a pack file.
pub trait FrameSource: Sync {
    /// Reads exactly `len` bytes at `offset` of pack `pack`.
    fn read(&self, pack: &PackId, offset: u64, len: u32) -> io::Result<Vec<u8>>;
}

/// Where the image is written.
pub trait Target {
    /// Writes `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `offset .. offset + len` read back as zeros.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

/// Chunks the destination already has (found on its disk and verified): [`restore_with`] writes
/// these without fetching them.
pub trait LocalChunks: Sync {
    /// The verified bytes of chunk `id`, if present.
    fn get(&self, id: &ChunkId) -> Option<&[u8]>;
}

/// No local chunks.
pub struct NoLocalChunks;

impl LocalChunks for NoLocalChunks {
    fn get(&self, _id: &ChunkId) -> Option<&[u8]> {
        None
    }
}

/// Tuning for [`restore`].
#[derive(Clone, Copy, Debug)]
pub struct RestoreOptions {
    /// Worker threads fetching, decompressing and verifying frames.
    pub threads: usize,
    /// Verified frames that may wait for the writer (bounds memory).
    pub frames_in_flight: usize,
    /// Times a frame is fetched when what arrives does not verify (a flipped bit on the wire)
    /// before the restore stops.
    pub fetch_attempts: u32,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        RestoreOptions {
            threads: threads.clamp(2, 8),
            frames_in_flight: 8,
            fetch_attempts: 3,
        }
    }
}

/// What a restore moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Frames fetched from the source.
    pub frames_fetched: u64,
    /// Stored (compressed) bytes fetched from the source.
    pub bytes_fetched: u64,
    /// Verified chunk bytes written to the target (counting every use).
    pub bytes_written: u64,
    /// Bytes of zero runs.
    pub zero_bytes: u64,
    /// Chunk bytes written from local chunks instead of fetched (counting every use).
    pub bytes_reused: u64,
}

/// Why a restore stopped. Nothing unverified was written in any case.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot read pack {pack} at offset {offset}: {error}")]
    Source {
        pack: PackId,
        offset: u64,
        error: io::Error,
    },
    #[error("frame at offset {offset} of pack {pack} is damaged: {reason}")]
    FrameInvalid {
        pack: PackId,
        offset: u64,
        reason: String,
    },
    #[error("chunk {id} is damaged (its bytes hash to {actual}; frame at offset {offset} of pack {pack})")]
    ChunkInvalid {
        id: ChunkId,
        actual: ChunkId,
        pack: PackId,
        offset: u64,
    },
    #[error("cannot write the target at offset {offset}: {error}")]
    Write { offset: u64, error: io::Error },
}

/// A frame to fetch and the entries of the image it holds.
struct FramePlan {
    pack: u32,
    offset: u64,
    stored: u32,
    raw: u32,
    zstd: bool,
    entries: Vec<u32>,
}

/// The most zeros asked of a target at once.
pub const ZERO_STEP_BYTES: u64 = 64 << 20;

/// Recreates the image described by `manifest` on `target`. `progress` is called with the number
/// of image bytes done so far (zero runs count once they are handed to the target).
pub fn restore(
    manifest: &Manifest,
    source: &dyn FrameSource,
    target: &mut dyn Target,
    options: RestoreOptions,
    progress: &dyn Fn(u64),
) -> Result<RestoreReport, RestoreError> {
    restore_with(manifest, source, &NoLocalChunks, target, options, progress)
}

/// [`restore`], taking every chunk `local` has from there instead of fetching its frame. A frame
/// is fetched only if some chunk the image needs from it is not local.
pub fn restore_with(
    manifest: &Manifest,
    source: &dyn FrameSource,
    local: &dyn LocalChunks,
    target: &mut dyn Target,
    options: RestoreOptions,
    progress: &dyn Fn(u64),
) -> Result<RestoreReport, RestoreError> {
    let (frames, uses) = plan(manifest, local);
    let mut report = RestoreReport::default();
    let mut done = 0u64;
    // Zero runs in bounded steps, with progress after each: one request for 1.6 GiB of zeros
    // put a whole disk's worth of Write Zeroes commands in flight at once, which a slow device
    // (QEMU's NVMe, some real ones) does not finish before the kernel's command timeout.
    for x in manifest.extents.iter().filter(|x| x.entry.is_none()) {
        let mut at = x.offset;
        while at < x.offset + x.len {
            let n = (x.offset + x.len - at).min(ZERO_STEP_BYTES);
            target
                .zero(at, n)
                .map_err(|error| RestoreError::Write { offset: at, error })?;
            at += n;
            done += n;
            progress(done);
        }
        report.zero_bytes += x.len;
    }
    // Local chunks first: verified when they were read, written at every use.
    for (e, offsets) in &uses {
        let entry = &manifest.entries[*e as usize];
        let Some(chunk) = local.get(&entry.id) else {
            continue;
        };
        for &offset in offsets {
            target
                .write_at(offset, chunk)
                .map_err(|error| RestoreError::Write { offset, error })?;
            report.bytes_reused += chunk.len() as u64;
            done += chunk.len() as u64;
        }
    }
    progress(done);

    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let threads = options.threads.max(1);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel(options.frames_in_flight.max(1));
        for _ in 0..threads {
            let tx = tx.clone();
            let (frames, next, stop) = (&frames, &next, &stop);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= frames.len() || stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut result = fetch_and_verify(manifest, source, &frames[i]);
                for _ in 1..options.fetch_attempts {
                    match &result {
                        Err(
                            RestoreError::FrameInvalid { .. } | RestoreError::ChunkInvalid { .. },
                        ) => {
                            result = fetch_and_verify(manifest, source, &frames[i]);
                        }
                        _ => break,
                    }
                }
                let result = result.map(|data| (i, data));
                if tx.send(result).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let result = (|| {
            for received in &rx {
                let (i, data) = received?;
                let frame = &frames[i];
                report.frames_fetched += 1;
                report.bytes_fetched += u64::from(frame.stored);
                // Every (image offset, chunk) of this frame, in offset order, written in runs:
                // neighbouring chunks of a frame are usually neighbours on the disk too, and one
                // write of a run costs far less than one write per 4 KiB chunk.
                let mut pieces: Vec<(u64, &[u8])> = Vec::new();
                for &e in &frame.entries {
                    let entry = &manifest.entries[e as usize];
                    let start = entry.chunk_offset as usize;
                    let chunk = &data[start..start + entry.size as usize];
                    pieces.extend(uses[&e].iter().map(|&offset| (offset, chunk)));
                }
                pieces.sort_unstable_by_key(|p| p.0);
                let written = write_runs(target, &pieces)?;
                report.bytes_written += written;
                done += written;
                progress(done);
            }
            Ok(())
        })();
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        drop(rx);
        result
    })?;
    Ok(report)
}

/// Writes `pieces` (sorted by offset), joining neighbours into one write; returns the bytes.
fn write_runs(target: &mut dyn Target, pieces: &[(u64, &[u8])]) -> Result<u64, RestoreError> {
    const RUN_BYTES_MAX: usize = 8 << 20;
    let mut written = 0u64;
    let mut run: Vec<u8> = Vec::new();
    let mut run_start = 0u64;
    let mut flush = |run: &mut Vec<u8>, at: u64| -> Result<(), RestoreError> {
        if !run.is_empty() {
            target
                .write_at(at, run)
                .map_err(|error| RestoreError::Write { offset: at, error })?;
            written += run.len() as u64;
            run.clear();
        }
        Ok(())
    };
    for &(offset, chunk) in pieces {
        let contiguous = !run.is_empty() && run_start + run.len() as u64 == offset;
        if !contiguous || run.len() + chunk.len() > RUN_BYTES_MAX {
            flush(&mut run, run_start)?;
            run_start = offset;
        }
        run.extend_from_slice(chunk);
    }
    flush(&mut run, run_start)?;
    Ok(written)
}

/// Orders the frames by the first image offset that needs them (skipping chunks `local` has),
/// and lists each entry's uses.
fn plan(manifest: &Manifest, local: &dyn LocalChunks) -> (Vec<FramePlan>, HashMap<u32, Vec<u64>>) {
    let mut frames: Vec<FramePlan> = Vec::new();
    let mut frame_of: HashMap<(u32, u64), usize> = HashMap::new();
    let mut uses: HashMap<u32, Vec<u64>> = HashMap::new();
    for x in &manifest.extents {
        let Some(e) = x.entry else { continue };
        let offsets = uses.entry(e).or_default();
        offsets.push(x.offset);
        if offsets.len() > 1 {
            continue;
        }
        let entry: &Entry = &manifest.entries[e as usize];
        if local.get(&entry.id).is_some() {
            continue;
        }
        let i = *frame_of
            .entry((entry.pack, entry.frame_offset))
            .or_insert_with(|| {
                frames.push(FramePlan {
                    pack: entry.pack,
                    offset: entry.frame_offset,
                    stored: entry.frame_stored,
                    raw: entry.frame_raw,
                    zstd: entry.is_zstd(),
                    entries: Vec::new(),
                });
                frames.len() - 1
            });
        frames[i].entries.push(e);
    }
    (frames, uses)
}

/// Fetches one frame, decompresses it and checks every chunk of it the image uses.
fn fetch_and_verify(
    manifest: &Manifest,
    source: &dyn FrameSource,
    frame: &FramePlan,
) -> Result<Vec<u8>, RestoreError> {
    let pack = manifest.packs[frame.pack as usize];
    let invalid = |reason: String| RestoreError::FrameInvalid {
        pack,
        offset: frame.offset,
        reason,
    };
    let stored = source
        .read(&pack, frame.offset, frame.stored)
        .map_err(|error| RestoreError::Source {
            pack,
            offset: frame.offset,
            error,
        })?;
    if stored.len() != frame.stored as usize {
        return Err(invalid(format!(
            "read {} bytes, expected {}",
            stored.len(),
            frame.stored
        )));
    }
    let data = if frame.zstd {
        zstd::bulk::decompress(&stored, frame.raw as usize)
            .map_err(|e| invalid(format!("does not decompress: {e}")))?
    } else {
        stored
    };
    if data.len() != frame.raw as usize {
        return Err(invalid(format!(
            "holds {} bytes, expected {}",
            data.len(),
            frame.raw
        )));
    }
    for &e in &frame.entries {
        let entry = &manifest.entries[e as usize];
        let start = entry.chunk_offset as usize;
        let actual = ChunkId::of(&data[start..start + entry.size as usize]);
        if actual != entry.id {
            return Err(RestoreError::ChunkInvalid {
                id: entry.id,
                actual,
                pack,
                offset: frame.offset,
            });
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Extent, Metadata, FLAG_ZSTD};
    use std::sync::atomic::AtomicU64;

    /// One pack in memory, counting the reads.
    struct MemPack {
        bytes: Vec<u8>,
        reads: AtomicU64,
    }

    impl FrameSource for MemPack {
        fn read(&self, _pack: &PackId, offset: u64, len: u32) -> io::Result<Vec<u8>> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Ok(self.bytes[offset as usize..offset as usize + len as usize].to_vec())
        }
    }

    struct MemDisk(Vec<u8>);

    impl Target for MemDisk {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.0[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    /// A long zero run is asked of the target in bounded steps, with progress after each.
    #[test]
    fn zero_runs_go_to_the_target_in_bounded_steps() {
        struct Zeros(Vec<(u64, u64)>);
        impl Target for Zeros {
            fn write_at(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
                Ok(())
            }
            fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
                self.0.push((offset, len));
                Ok(())
            }
        }
        let (mut manifest, source, _, _) = fixture();
        let len = 3 * ZERO_STEP_BYTES + 4096;
        let start = manifest.meta.size;
        manifest.extents.push(Extent {
            offset: start,
            len,
            entry: None,
        });
        manifest.meta.size += len;
        let mut target = Zeros(Vec::new());
        let reports = std::sync::Mutex::new(Vec::new());
        restore(
            &manifest,
            &source,
            &mut target,
            RestoreOptions::default(),
            &|d| reports.lock().unwrap().push(d),
        )
        .unwrap();
        assert!(target.0.iter().all(|&(_, n)| n <= ZERO_STEP_BYTES));
        let long: Vec<_> = target.0.iter().filter(|z| z.0 >= start).collect();
        assert_eq!(long.len(), 4, "{long:?}");
        assert_eq!(long.iter().map(|z| z.1).sum::<u64>(), len);
        assert!(
            reports.lock().unwrap().len() >= 5,
            "progress after every step"
        );
    }

    /// Four 4 KiB chunks a, b, c, d in two frames [a b] [c d]; image = a 0 b c a d.
    fn fixture() -> (Manifest, MemPack, Vec<u8>, Vec<Vec<u8>>) {
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 4096]).collect();
        let mut pack = vec![0u8; 16];
        let mut entries = Vec::new();
        for pair in [[0usize, 1], [2, 3]] {
            let raw: Vec<u8> = pair.iter().flat_map(|&i| chunks[i].clone()).collect();
            let z = zstd::bulk::compress(&raw, 3).unwrap();
            let offset = pack.len() as u64;
            pack.extend_from_slice(&z);
            for (k, &i) in pair.iter().enumerate() {
                entries.push(Entry {
                    id: ChunkId::of(&chunks[i]),
                    pack: 0,
                    flags: FLAG_ZSTD,
                    frame_offset: offset,
                    frame_stored: z.len() as u32,
                    frame_raw: raw.len() as u32,
                    chunk_offset: (k * 4096) as u32,
                    size: 4096,
                });
            }
        }
        let order: [Option<u32>; 6] = [Some(0), None, Some(1), Some(2), Some(0), Some(3)];
        let mut image = Vec::new();
        let extents = order
            .iter()
            .enumerate()
            .map(|(i, e)| {
                match e {
                    Some(e) => image.extend_from_slice(&chunks[*e as usize]),
                    None => image.extend_from_slice(&[0u8; 4096]),
                }
                Extent {
                    offset: i as u64 * 4096,
                    len: 4096,
                    entry: *e,
                }
            })
            .collect();
        let manifest = Manifest {
            meta: Metadata {
                name: "t".into(),
                version: 1,
                size: image.len() as u64,
                digest: blake3::hash(&image).to_hex().to_string(),
                created: String::new(),
                source: String::new(),
                chunking: "blocks/4096".into(),
            },
            packs: vec![PackId([1; 16])],
            entries,
            extents,
        };
        let source = MemPack {
            bytes: pack,
            reads: AtomicU64::new(0),
        };
        (manifest, source, image, chunks)
    }

    #[test]
    fn restores_byte_for_byte_fetching_each_frame_once() {
        let (m, source, image, _) = fixture();
        let mut disk = MemDisk(vec![0xee; image.len()]);
        let r = restore(&m, &source, &mut disk, RestoreOptions::default(), &|_| {}).unwrap();
        assert_eq!(disk.0, image);
        assert_eq!(
            (r.frames_fetched, source.reads.load(Ordering::Relaxed)),
            (2, 2)
        );
        assert_eq!(
            (r.bytes_written, r.zero_bytes, r.bytes_reused),
            (5 * 4096, 4096, 0)
        );
    }

    struct Have(HashMap<ChunkId, Vec<u8>>);
    impl LocalChunks for Have {
        fn get(&self, id: &ChunkId) -> Option<&[u8]> {
            self.0.get(id).map(Vec::as_slice)
        }
    }

    #[test]
    fn local_chunks_save_their_frames() {
        let (m, source, image, chunks) = fixture();
        // c and d are local: their frame is never fetched; a and b still are.
        let local = Have(
            chunks[2..]
                .iter()
                .map(|c| (ChunkId::of(c), c.clone()))
                .collect(),
        );
        let mut disk = MemDisk(vec![0xee; image.len()]);
        let r = restore_with(
            &m,
            &source,
            &local,
            &mut disk,
            RestoreOptions::default(),
            &|_| {},
        )
        .unwrap();
        assert_eq!(disk.0, image);
        assert_eq!(source.reads.load(Ordering::Relaxed), 1);
        assert_eq!(r.bytes_reused, 2 * 4096);
    }

    #[test]
    fn a_damaged_frame_writes_nothing_of_its_chunks() {
        let (m, mut source, image, chunks) = fixture();
        let second = m.entries[2].frame_offset as usize;
        // Replace the second frame by a valid zstd frame of other bytes: it decompresses, but the
        // chunks do not hash to their ids.
        let other = zstd::bulk::compress(&vec![9u8; 8192], 3).unwrap();
        let mut m = m;
        for e in m
            .entries
            .iter_mut()
            .filter(|e| e.frame_offset as usize == second)
        {
            e.frame_stored = other.len() as u32;
        }
        source.bytes.truncate(second);
        source.bytes.extend_from_slice(&other);
        let mut disk = MemDisk(vec![0xee; image.len()]);
        let err = restore(&m, &source, &mut disk, RestoreOptions::default(), &|_| {}).unwrap_err();
        assert!(matches!(err, RestoreError::ChunkInvalid { .. }), "{err}");
        // Fetched again before giving up: 3 attempts for the bad frame, 1 for the good one.
        assert_eq!(source.reads.load(Ordering::Relaxed), 4);
        for (i, block) in disk.0.chunks(4096).enumerate() {
            assert!(
                block != chunks[2].as_slice() && block != chunks[3].as_slice(),
                "block {i} was written"
            );
            assert!(!block.contains(&9), "unverified bytes reached the disk");
        }
    }
}
