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

/// Tuning for [`restore`].
#[derive(Clone, Copy, Debug)]
pub struct RestoreOptions {
    /// Worker threads fetching, decompressing and verifying frames.
    pub threads: usize,
    /// Verified frames that may wait for the writer (bounds memory).
    pub frames_in_flight: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        RestoreOptions {
            threads: threads.clamp(2, 8),
            frames_in_flight: 8,
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

/// Recreates the image described by `manifest` on `target`. `progress` is called with the number
/// of image bytes done so far (zero runs count once they are handed to the target).
pub fn restore(
    manifest: &Manifest,
    source: &dyn FrameSource,
    target: &mut dyn Target,
    options: RestoreOptions,
    progress: &dyn Fn(u64),
) -> Result<RestoreReport, RestoreError> {
    let (frames, uses) = plan(manifest);
    let mut report = RestoreReport::default();
    let mut done = 0u64;
    for x in manifest.extents.iter().filter(|x| x.entry.is_none()) {
        target
            .zero(x.offset, x.len)
            .map_err(|error| RestoreError::Write {
                offset: x.offset,
                error,
            })?;
        report.zero_bytes += x.len;
        done += x.len;
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
                let result = fetch_and_verify(manifest, source, &frames[i]).map(|data| (i, data));
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
                for &e in &frame.entries {
                    let entry = &manifest.entries[e as usize];
                    let start = entry.chunk_offset as usize;
                    let chunk = &data[start..start + entry.size as usize];
                    for &offset in &uses[&e] {
                        target
                            .write_at(offset, chunk)
                            .map_err(|error| RestoreError::Write { offset, error })?;
                        report.bytes_written += chunk.len() as u64;
                        done += chunk.len() as u64;
                    }
                }
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

/// Orders the frames by the first image offset that needs them, and lists each entry's uses.
fn plan(manifest: &Manifest) -> (Vec<FramePlan>, HashMap<u32, Vec<u64>>) {
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
