//! Importing a disk image: read → cut → hash → dedup → compress → pack → manifest.
//!
//! The image is raw, qcow2, or raw compressed with xz, zstd or gzip (`source.rs` tells them apart
//! and reads the disk they describe). The pipeline, with bounded channels between stages so memory
//! stays bounded whatever the size:
//! ```text
//!  main thread: read segments (holes and zero clusters skipped) → cut into zero runs and
//!               chunks → BLAKE3 each chunk → look it up (store index, then this image) → new
//!               chunks appended to the current frame
//!      ├──> two digest threads: BLAKE3 of the whole image, zero runs included, one per half of
//!      │    the BLAKE3 tree
//!      └──> compression workers (one per core): zstd each frame
//!              └──> writer thread: frames in order → pack file(s) in tmp/
//! ```
//! Then, still under the store lock: the packs are synced and renamed into `packs/`, and the
//! manifest is written and renamed last, which is the moment the image becomes visible. An error
//! or a crash before that leaves only temp files, which the next writer removes.

use super::chunker::{Chunking, Piece};
use super::pack::PackWriter;
use super::source::{self, Format, Source, Span};
use super::{validate_name, ImageRef, IoContext, Store, StoreError};
use fleetboot_image::manifest::FLAG_ZSTD;
use fleetboot_image::{ChunkId, Entry, Extent, Manifest, Metadata, PackId};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Tuning of an import. The defaults were chosen by `cargo xtask bench store` (docs/benchmarks.md).
#[derive(Clone, Copy, Debug)]
pub struct ImportOptions {
    pub chunking: Chunking,
    /// Raw bytes of chunks compressed together in one zstd frame (the unit a machine fetches).
    pub frame_bytes: usize,
    pub zstd_level: i32,
    /// Compression worker threads.
    pub threads: usize,
    /// Bytes read at a time; also the span no chunk crosses.
    pub segment_bytes: usize,
    /// A pack is closed and another started past this size.
    pub pack_bytes_max: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            chunking: Chunking::default(),
            frame_bytes: 4 << 20,
            zstd_level: 6,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            segment_bytes: 4 << 20,
            pack_bytes_max: 1 << 30,
        }
    }
}

/// What an import did.
#[derive(Clone, Debug)]
pub struct ImportReport {
    pub image: ImageRef,
    /// What the file was: raw, qcow2, or raw compressed with xz, zstd or gzip.
    pub format: &'static str,
    pub size: u64,
    pub data_bytes: u64,
    /// Chunks in the image (each distinct chunk counted once).
    pub chunks: u64,
    /// Chunks the store did not have before.
    pub new_chunks: u64,
    pub new_raw_bytes: u64,
    /// Bytes added to pack files.
    pub new_stored_bytes: u64,
    pub digest: String,
    pub elapsed: Duration,
}

/// Where a chunk's bytes lie in the store (also what `store compact` moves).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Loc {
    pub(crate) pack: PackId,
    pub(crate) flags: u32,
    pub(crate) frame_offset: u64,
    pub(crate) frame_stored: u32,
    pub(crate) frame_raw: u32,
    pub(crate) chunk_offset: u32,
    pub(crate) size: u32,
}

impl Loc {
    /// Where `m`'s entry `e` says its chunk lies.
    pub(crate) fn of(m: &Manifest, e: &Entry) -> Loc {
        Loc {
            pack: m.packs[e.pack as usize],
            flags: e.flags,
            frame_offset: e.frame_offset,
            frame_stored: e.frame_stored,
            frame_raw: e.frame_raw,
            chunk_offset: e.chunk_offset,
            size: e.size,
        }
    }
}

/// An offset-table row of the image being imported.
enum Row {
    Stored(ChunkId, Loc),
    /// In frame number `frame` of this import, not yet written.
    New {
        id: ChunkId,
        frame: u32,
        chunk_offset: u32,
        size: u32,
    },
}

/// A compressed frame on its way to the writer.
struct Compressed {
    seq: u32,
    raw: u32,
    flags: u32,
    bytes: Vec<u8>,
}

/// Where the writer put a frame.
#[derive(Clone, Copy)]
struct FrameLoc {
    pack: PackId,
    offset: u64,
    stored: u32,
    raw: u32,
    flags: u32,
}

/// The largest disk an import takes: its digest covers every byte, zeros included (hashed at a
/// few GB/s), so a thin image claiming petabytes would hold the writers' lock for days.
pub const DISK_BYTES_MAX: u64 = 16 << 40;

/// Imports the disk image at `path` (raw, qcow2, or raw compressed) as the next version of
/// `name`.
pub fn import(
    store: &Store,
    name: &str,
    path: &Path,
    options: &ImportOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<ImportReport, StoreError> {
    validate_name(name)?;
    let started = Instant::now();
    let (mut source, format) = open_image(path)?;
    let known_size = source.size();
    if let Some(size) = known_size.filter(|&n| n > DISK_BYTES_MAX) {
        return Err(StoreError::BadInput {
            path: path.to_path_buf(),
            what: format!(
                "describes a disk of {size} bytes, more than import takes ({DISK_BYTES_MAX}): \
                 every byte, zero or not, is hashed into the image's digest"
            ),
        });
    }
    let _lock = store.lock_for_write()?;
    let index = load_index(store)?;

    let failed = AtomicBool::new(false);
    let (work_tx, work_rx) = mpsc::sync_channel::<(u32, Vec<u8>)>(options.threads * 2);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::sync_channel::<Compressed>(options.threads * 2);
    let digest = match known_size {
        Some(size) => DigestSplit::new(size),
        None => DigestSplit::unsplit(),
    };
    let (left_tx, left_rx) = mpsc::sync_channel::<DigestInput>(DIGEST_QUEUE_MAX);
    let (right_tx, right_rx) = mpsc::sync_channel::<DigestInput>(DIGEST_QUEUE_MAX);

    let (scan, written, halves) = std::thread::scope(|s| {
        let left = s.spawn(move || digest_part(left_rx, 0));
        let right = s.spawn(move || digest_part(right_rx, digest.right_offset()));
        for _ in 0..options.threads.max(1) {
            let (work_rx, done_tx, failed) = (&work_rx, done_tx.clone(), &failed);
            s.spawn(move || compress_worker(work_rx, done_tx, failed, options.zstd_level));
        }
        drop(done_tx);
        let writer = s.spawn(|| write_frames(store, done_rx, options.pack_bytes_max, &failed));
        let digest_tx = DigestSender {
            split: digest,
            left: left_tx,
            right: right_tx,
        };
        let scan = scan_image(
            source.as_mut(),
            path,
            options,
            &index,
            &work_tx,
            &digest_tx,
            &failed,
            progress,
        );
        drop(work_tx);
        drop(digest_tx);
        let written = writer.join().expect("writer thread panicked");
        let left = left.join().expect("digest thread panicked");
        let right = right.join().expect("digest thread panicked");
        (scan, written, (left, right))
    });
    let (frames, packs) = written?;
    let scan = scan?;
    // Only a whole disk has a digest (halves of a disk read in part would not merge).
    let digest = digest.finish(halves.0, halves.1);
    let size = scan.size;
    if size == 0 {
        return Err(StoreError::BadInput {
            path: path.to_path_buf(),
            what: format!("holds an empty disk ({})", format.name()),
        });
    }

    // The descriptive data, checked before anything becomes visible: a manifest past the
    // format's limit would be refused by every reader.
    let mut manifest = scan.to_manifest(
        &frames,
        Metadata {
            name: name.to_string(),
            version: 0,
            size,
            digest: digest.clone(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            source: fs::canonicalize(path)
                .unwrap_or_else(|_| path.to_path_buf())
                .display()
                .to_string(),
            chunking: options.chunking.describe(),
        },
    );
    manifest
        .check_encodable()
        .map_err(|e| StoreError::BadInput {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;

    // Commit: packs first, the manifest last — its publication is the moment of visibility.
    let mut new_stored_bytes = 0;
    for pack in packs {
        new_stored_bytes += pack.len();
        pack.finish(store)?;
    }
    let version = store.issue_version(name)?;
    manifest.meta.version = version;
    let key = Store::manifest_key(name, version);
    store
        .backend()
        .put(&key, &manifest.encode())
        .at(&store.backend().locate(&key))?;

    let new_sizes: Vec<u64> = scan
        .rows
        .iter()
        .filter_map(|r| match r {
            Row::New { size, .. } => Some(u64::from(*size)),
            Row::Stored(..) => None,
        })
        .collect();
    Ok(ImportReport {
        image: ImageRef {
            name: name.to_string(),
            version: Some(version),
        },
        format: format.name(),
        size,
        data_bytes: manifest.data_bytes(),
        chunks: scan.rows.len() as u64,
        new_chunks: new_sizes.len() as u64,
        new_raw_bytes: new_sizes.iter().sum(),
        new_stored_bytes,
        digest,
        elapsed: started.elapsed(),
    })
}

/// Opens the image as the disk it describes; refuses what is not a non-empty file or block
/// device, and formats that cannot be read (with the reason).
fn open_image(path: &Path) -> Result<(Box<dyn Source>, Format), StoreError> {
    let bad = |what: &str| StoreError::BadInput {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    let meta = fs::metadata(path).at(path)?;
    if meta.is_dir() {
        return Err(bad("is a directory, not a disk image"));
    }
    let is_block = meta.file_type().is_block_device();
    if !meta.is_file() && !is_block {
        return Err(bad("is not a regular file or block device"));
    }
    let mut file = File::open(path).at(path)?;
    let size = if is_block {
        file.seek(SeekFrom::End(0)).at(path)?
    } else {
        meta.len()
    };
    if size == 0 {
        return Err(bad("is empty"));
    }
    source::open(file, size, is_block).map_err(|e| bad(&e.to_string()))
}

/// Every chunk the store's visible images use, and where it lies.
fn load_index(store: &Store) -> Result<HashMap<ChunkId, Loc>, StoreError> {
    let mut index = HashMap::new();
    for (_, m) in store.all_manifests()? {
        for e in &m.entries {
            index.entry(e.id).or_insert(Loc::of(&m, e));
        }
    }
    Ok(index)
}

/// What the scan of the image produced: the offset table and map, with new chunks pointing at
/// frame numbers that the writer resolves.
struct Scan {
    rows: Vec<Row>,
    /// (length, row) pieces; `None` is a zero run.
    map: Vec<(u64, Option<u32>)>,
    /// The disk's size, as read.
    size: u64,
}

impl Scan {
    fn push_zero(&mut self, len: u64) {
        match self.map.last_mut() {
            Some((n, None)) => *n += len,
            _ => self.map.push((len, None)),
        }
    }

    fn to_manifest(&self, frames: &[FrameLoc], meta: Metadata) -> Manifest {
        let mut packs: Vec<PackId> = Vec::new();
        let mut pack_index: HashMap<PackId, u32> = HashMap::new();
        let mut pack_no = |p: PackId| {
            *pack_index.entry(p).or_insert_with(|| {
                packs.push(p);
                (packs.len() - 1) as u32
            })
        };
        let entries = self
            .rows
            .iter()
            .map(|row| match *row {
                Row::Stored(id, l) => Entry {
                    id,
                    pack: pack_no(l.pack),
                    flags: l.flags,
                    frame_offset: l.frame_offset,
                    frame_stored: l.frame_stored,
                    frame_raw: l.frame_raw,
                    chunk_offset: l.chunk_offset,
                    size: l.size,
                },
                Row::New {
                    id,
                    frame,
                    chunk_offset,
                    size,
                } => {
                    let f = frames[frame as usize];
                    Entry {
                        id,
                        pack: pack_no(f.pack),
                        flags: f.flags,
                        frame_offset: f.offset,
                        frame_stored: f.stored,
                        frame_raw: f.raw,
                        chunk_offset,
                        size,
                    }
                }
            })
            .collect();
        let mut offset = 0;
        let extents = self
            .map
            .iter()
            .map(|&(len, entry)| {
                let x = Extent { offset, len, entry };
                offset += len;
                x
            })
            .collect();
        Manifest {
            meta,
            packs,
            entries,
            extents,
        }
    }
}

/// Data or zero runs waiting for a digest thread; bounds the memory held by data buffers.
const DIGEST_QUEUE_MAX: usize = 16;

/// The whole-image BLAKE3 is computed by two threads, one per half of the BLAKE3 tree: the
/// left subtree (`0 .. left_len`) and the right one. Most of an image is zero runs, which must be
/// hashed too, so this halves the digest's share of the import's wall time.
#[derive(Clone, Copy)]
struct DigestSplit {
    size: u64,
    /// Where the right subtree starts (`size` when the image is too small to split).
    left_len: u64,
}

impl DigestSplit {
    /// One thread hashes it all: for a disk whose size is known only at its end (a stream).
    fn unsplit() -> DigestSplit {
        DigestSplit {
            size: u64::MAX,
            left_len: u64::MAX,
        }
    }

    fn new(size: u64) -> DigestSplit {
        let left_len = if size > blake3::CHUNK_LEN as u64 {
            blake3::hazmat::left_subtree_len(size)
        } else {
            size
        };
        DigestSplit { size, left_len }
    }

    /// Where the right half starts (it gets nothing when the disk is not split).
    fn right_offset(self) -> u64 {
        if self.left_len == self.size {
            0
        } else {
            self.left_len
        }
    }

    fn finish(self, left: blake3::Hasher, right: blake3::Hasher) -> String {
        use blake3::hazmat::{merge_subtrees_root, HasherExt, Mode};
        if self.left_len == self.size {
            return left.finalize().to_hex().to_string();
        }
        merge_subtrees_root(
            &left.finalize_non_root(),
            &right.finalize_non_root(),
            Mode::Hash,
        )
        .to_hex()
        .to_string()
    }
}

enum DigestInput {
    Data(Arc<Vec<u8>>, std::ops::Range<usize>),
    Zeros(u64),
}

/// Routes the image's bytes, in order, to the digest thread of the half they belong to.
struct DigestSender {
    split: DigestSplit,
    left: mpsc::SyncSender<DigestInput>,
    right: mpsc::SyncSender<DigestInput>,
}

impl DigestSender {
    fn zeros(&self, at: u64, len: u64) {
        let cut = self.split.left_len.clamp(at, at + len);
        if cut > at {
            let _ = self.left.send(DigestInput::Zeros(cut - at));
        }
        if at + len > cut {
            let _ = self.right.send(DigestInput::Zeros(at + len - cut));
        }
    }

    fn data(&self, at: u64, buf: Arc<Vec<u8>>) {
        let len = buf.len() as u64;
        let cut = (self.split.left_len.clamp(at, at + len) - at) as usize;
        if cut > 0 {
            let _ = self.left.send(DigestInput::Data(buf.clone(), 0..cut));
        }
        if cut < buf.len() {
            let end = buf.len();
            let _ = self.right.send(DigestInput::Data(buf, cut..end));
        }
    }
}

/// Hashes one half of the image, starting at `offset`.
fn digest_part(rx: mpsc::Receiver<DigestInput>, offset: u64) -> blake3::Hasher {
    use blake3::hazmat::HasherExt;
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut hasher = blake3::Hasher::new();
    if offset > 0 {
        hasher.set_input_offset(offset);
    }
    for input in rx {
        match input {
            DigestInput::Data(buf, range) => {
                hasher.update(&buf[range]);
            }
            DigestInput::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(ZEROS.len() as u64) as usize;
                    hasher.update(&ZEROS[..k]);
                    n -= k as u64;
                }
            }
        }
    }
    hasher
}

/// Reads the image, cuts and dedups it, and hands new frames to the compressors.
#[allow(clippy::too_many_arguments)]
fn scan_image(
    source: &mut dyn Source,
    path: &Path,
    options: &ImportOptions,
    index: &HashMap<ChunkId, Loc>,
    work_tx: &mpsc::SyncSender<(u32, Vec<u8>)>,
    digest_tx: &DigestSender,
    failed: &AtomicBool,
    progress: &dyn Fn(u64, u64),
) -> Result<Scan, StoreError> {
    let mut scan = Scan {
        rows: Vec::new(),
        map: Vec::new(),
        size: 0,
    };
    let mut row_of: HashMap<ChunkId, u32> = HashMap::new();
    let mut frame: Vec<u8> = Vec::with_capacity(options.frame_bytes);
    let mut frame_seq: u32 = 0;
    let mut pieces = Vec::new();
    let mut buffers = BufferPool::default();
    let aborted = || StoreError::Io {
        path: path.to_path_buf(),
        error: io::Error::other("import aborted: writing the pack failed"),
    };
    let total = source.size().unwrap_or(0);
    let seg = options.segment_bytes as u64;
    let mut pos = 0u64;
    'disk: while let Some(span) = source.span(pos).at(path)? {
        let data_end = match span {
            Span::Zero(len) => {
                scan.push_zero(len);
                digest_tx.zeros(pos, len);
                pos += len;
                progress(pos, total);
                continue;
            }
            Span::Data(len) => pos.saturating_add(len),
        };
        while pos < data_end {
            if failed.load(Ordering::Relaxed) {
                return Err(aborted());
            }
            let end = data_end.min((pos / seg + 1) * seg);
            let mut buf = buffers.take((end - pos) as usize);
            let got = {
                let b = Arc::get_mut(&mut buf).expect("a free buffer");
                let got = source.read(pos, b).at(path)?;
                b.truncate(got);
                got
            };
            if got == 0 {
                break 'disk;
            }
            pieces.clear();
            options.chunking.cut(&buf, &mut pieces);
            for piece in &pieces {
                let range = match piece {
                    Piece::Zero(n) => {
                        scan.push_zero(*n as u64);
                        continue;
                    }
                    Piece::Data(r) => r.clone(),
                };
                let chunk = &buf[range];
                let id = ChunkId::of(chunk);
                let row = match row_of.get(&id) {
                    Some(&row) => row,
                    None => {
                        let row = scan.rows.len() as u32;
                        if let Some(loc) = index.get(&id) {
                            scan.rows.push(Row::Stored(id, *loc));
                        } else {
                            if !frame.is_empty() && frame.len() + chunk.len() > options.frame_bytes
                            {
                                let full = std::mem::replace(
                                    &mut frame,
                                    Vec::with_capacity(options.frame_bytes),
                                );
                                work_tx.send((frame_seq, full)).map_err(|_| aborted())?;
                                frame_seq += 1;
                            }
                            scan.rows.push(Row::New {
                                id,
                                frame: frame_seq,
                                chunk_offset: frame.len() as u32,
                                size: chunk.len() as u32,
                            });
                            frame.extend_from_slice(chunk);
                        }
                        row_of.insert(id, row);
                        row
                    }
                };
                scan.map.push((chunk.len() as u64, Some(row)));
            }
            digest_tx.data(pos, buf.clone());
            buffers.give_back(buf);
            pos += got as u64;
            progress(pos, total);
            if (got as u64) < end - (pos - got as u64) {
                break 'disk; // the disk ended inside this read
            }
        }
    }
    if let Some(size) = source.size() {
        if pos != size {
            return Err(StoreError::BadInput {
                path: path.to_path_buf(),
                what: format!("the disk ended at byte {pos} of {size}"),
            });
        }
    }
    scan.size = pos;
    if !frame.is_empty() {
        work_tx.send((frame_seq, frame)).map_err(|_| aborted())?;
    }
    Ok(scan)
}

/// Read buffers, reused once the digest threads have dropped them: fresh 4 MiB allocations
/// cost a page fault per 4 KiB on every segment read.
#[derive(Default)]
struct BufferPool {
    free: Vec<Arc<Vec<u8>>>,
}

impl BufferPool {
    /// A buffer of `len` bytes that no one else holds.
    fn take(&mut self, len: usize) -> Arc<Vec<u8>> {
        let mut buf = match self.free.iter().position(|b| Arc::strong_count(b) == 1) {
            Some(i) => self.free.swap_remove(i),
            None => Arc::new(Vec::new()),
        };
        Arc::get_mut(&mut buf).expect("unshared").resize(len, 0);
        buf
    }

    /// Keeps `buf` for reuse once its other holders are done. The digest queues hold at most
    /// `2 * DIGEST_QUEUE_MAX` buffers, so the pool never needs more than that and one spare.
    fn give_back(&mut self, buf: Arc<Vec<u8>>) {
        if self.free.len() <= 2 * DIGEST_QUEUE_MAX {
            self.free.push(buf);
        }
    }
}

/// Compresses frames until the work channel closes. After a failure it keeps draining (without
/// compressing) so the scanner never blocks on a full channel.
fn compress_worker(
    work: &Mutex<mpsc::Receiver<(u32, Vec<u8>)>>,
    done: mpsc::SyncSender<Compressed>,
    failed: &AtomicBool,
    level: i32,
) {
    loop {
        let next = work.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((seq, raw)) = next else { return };
        if failed.load(Ordering::Relaxed) {
            continue;
        }
        let compressed = match zstd::bulk::compress(&raw, level) {
            Ok(c) if c.len() < raw.len() => Compressed {
                seq,
                raw: raw.len() as u32,
                flags: FLAG_ZSTD,
                bytes: c,
            },
            _ => Compressed {
                seq,
                raw: raw.len() as u32,
                flags: 0,
                bytes: raw,
            },
        };
        if done.send(compressed).is_err() {
            failed.store(true, Ordering::Relaxed);
        }
    }
}

/// Appends frames to packs in sequence order; returns where each frame went and the packs.
fn write_frames(
    store: &Store,
    done: mpsc::Receiver<Compressed>,
    pack_bytes_max: u64,
    failed: &AtomicBool,
) -> Result<(Vec<FrameLoc>, Vec<PackWriter>), StoreError> {
    let result = (|| {
        let mut locs: Vec<FrameLoc> = Vec::new();
        let mut packs: Vec<PackWriter> = Vec::new();
        let mut waiting: BTreeMap<u32, Compressed> = BTreeMap::new();
        for c in done {
            waiting.insert(c.seq, c);
            while let Some(c) = waiting.remove(&(locs.len() as u32)) {
                let need_new = packs.last().is_none_or(|p| {
                    p.len() + c.bytes.len() as u64 > pack_bytes_max && p.len() > 16
                });
                if need_new {
                    packs.push(PackWriter::create(store)?);
                }
                let pack = packs.last_mut().expect("a pack was just ensured");
                let offset = pack.append(&c.bytes).at(&store.tmp_dir())?;
                locs.push(FrameLoc {
                    pack: pack.id(),
                    offset,
                    stored: c.bytes.len() as u32,
                    raw: c.raw,
                    flags: c.flags,
                });
            }
        }
        Ok((locs, packs))
    })();
    if result.is_err() {
        failed.store(true, Ordering::Relaxed);
    }
    result
}
