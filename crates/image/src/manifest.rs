//! An image's descriptive data (its manifest) and its binary encoding, format versions 1 and 2.
//!
//! A manifest holds everything needed to recreate the image from pack files by range reads, with
//! no other lookup: the metadata, the pack list, the offset table (one [`Entry`] per distinct chunk
//! the image uses: its id and where its bytes lie) and the map ([`Extent`]s) from image offsets to
//! entries or zero runs. The exact layout is documented in docs/store-format.md; keep them in step.
//!
//! Decoding checks everything it can before anything trusts the data: magic, version, the body's
//! BLAKE3, every length, every index, and that the map covers the image exactly once.
//!
//! Format 1 carries every chunk's id. Format 2 (what `store compact` writes) names a chunk by its
//! row in its pack's id table ([`crate::id_table`]), kept once per store, and keeps each table's
//! BLAKE3: so it is read with [`Manifest::decode_with`], given a way to fetch tables. An agent only
//! ever sees format 1: the appliance expands format 2 before serving it.

use crate::id::{ChunkId, PackId};
use crate::id_table::{IdTable, TableIndex};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// First bytes of every manifest file.
pub const MAGIC: [u8; 8] = *b"FBMANIFS";
/// The manifest format version [`Manifest::encode`] writes: every id in the manifest.
pub const FORMAT_VERSION: u32 = 1;
/// The format version [`Manifest::encode_with_tables`] writes: ids by row of their pack's id table.
pub const FORMAT_VERSION_TABLES: u32 = 2;
/// Size of the fixed header before the compressed body.
pub const HEADER_BYTES: usize = 64;
/// Entry flag: the frame holding the chunk is one zstd frame (else stored raw).
pub const FLAG_ZSTD: u32 = 1;
/// Extent entry index marking a run of zero bytes.
const ZERO_RUN: u32 = u32::MAX;
const ENTRY_BYTES: usize = 64;
const EXTENT_BYTES: usize = 12;
/// Upper bound on a decoded body, so a hostile header cannot make us allocate without limit.
/// At 4 KiB chunks it is reached near 108 GiB of distinct data: [`Manifest::check_encodable`]
/// refuses such an image at import, before anything is written.
pub const BODY_RAW_BYTES_MAX: u64 = 2 << 30;
/// Largest raw frame (the import's `--frame-size` is at most this).
pub const FRAME_RAW_BYTES_MAX: u32 = 64 << 20;
/// Largest stored frame: a zstd frame of [`FRAME_RAW_BYTES_MAX`] bytes can grow a little.
pub const FRAME_STORED_BYTES_MAX: u32 = FRAME_RAW_BYTES_MAX + (FRAME_RAW_BYTES_MAX >> 7) + 4096;

/// The metadata part of the descriptive data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Image name (`[A-Za-z0-9._-]`, see the store's naming rules).
    pub name: String,
    /// Version number, 1, 2, ... per name.
    pub version: u32,
    /// Logical size of the image in bytes.
    pub size: u64,
    /// BLAKE3 of the whole image, hex.
    pub digest: String,
    /// When the image was imported, RFC 3339 UTC.
    pub created: String,
    /// Where it came from (the imported file's path).
    pub source: String,
    /// How the image was cut into chunks, e.g. `blocks` or `fastcdc`.
    pub chunking: String,
}

/// One row of the offset table: a distinct chunk of the image and where its bytes are stored.
///
/// Chunks are stored in frames (a group of chunks compressed together); a frame is fetched whole
/// by the range `frame_offset .. frame_offset + frame_stored` of the pack, decompressed, and the
/// chunk is the slice `chunk_offset .. chunk_offset + size` of the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// BLAKE3 of the chunk's raw bytes.
    pub id: ChunkId,
    /// Index into [`Manifest::packs`].
    pub pack: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Byte offset of the frame in the pack file.
    pub frame_offset: u64,
    /// Stored (compressed) length of the frame.
    pub frame_stored: u32,
    /// Raw (decompressed) length of the frame.
    pub frame_raw: u32,
    /// Offset of the chunk within the decompressed frame.
    pub chunk_offset: u32,
    /// Raw length of the chunk.
    pub size: u32,
}

impl Entry {
    /// Whether the frame is zstd-compressed.
    pub fn is_zstd(&self) -> bool {
        self.flags & FLAG_ZSTD != 0
    }
}

/// One piece of the map from image offsets to content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index into [`Manifest::entries`], or `None` for a run of zeros (recorded, not stored).
    pub entry: Option<u32>,
}

/// The descriptive data of one image version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub meta: Metadata,
    /// Pack files the entries point into.
    pub packs: Vec<PackId>,
    /// The offset table.
    pub entries: Vec<Entry>,
    /// The map: contiguous, in order, covering `0 .. meta.size`.
    pub extents: Vec<Extent>,
}

/// Why bytes are not a usable manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a fleetboot manifest (bad magic)")]
    NotAManifest,
    #[error("manifest format version {0} is not supported (this build reads versions 1 and 2)")]
    UnsupportedVersion(u32),
    #[error("the id table of pack {pack} is not usable: {why}")]
    IdTable { pack: PackId, why: String },
    #[error(
        "this manifest is format 2 (ids in the store's id tables): only an appliance reads it; \
         fetch it through the appliance, which serves it as format 1"
    )]
    NeedsIdTables,
    #[error("manifest is truncated")]
    Truncated,
    #[error("manifest checksum mismatch: the file is damaged")]
    Checksum,
    #[error("manifest is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "the image needs a manifest of {body} bytes ({entries} distinct chunks, {extents} map \
         extents); format 1 holds at most {BODY_RAW_BYTES_MAX}: import it with a larger \
         --chunk-size (fewer, larger chunks)"
    )]
    TooLarge {
        body: u64,
        entries: u64,
        extents: u64,
    },
}

fn corrupt(msg: impl Into<String>) -> ManifestError {
    ManifestError::Corrupt(msg.into())
}

impl Manifest {
    /// Bytes of the image that are not zero runs.
    pub fn data_bytes(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.entry.is_some())
            .map(|e| e.len)
            .sum()
    }

    /// Encodes the manifest (header + zstd-compressed body).
    /// Fails if the encoded body would pass [`BODY_RAW_BYTES_MAX`] (decoders refuse it), with
    /// what to do about it.
    pub fn check_encodable(&self) -> Result<(), ManifestError> {
        let body = self.body_bytes();
        if body > BODY_RAW_BYTES_MAX {
            return Err(ManifestError::TooLarge {
                body,
                entries: self.entries.len() as u64,
                extents: self.extents.len() as u64,
            });
        }
        Ok(())
    }

    /// Length of the encoded body, before compression.
    pub fn body_bytes(&self) -> u64 {
        let meta = serde_json::to_vec(&self.meta).map_or(0, |m| m.len() as u64);
        32 + meta
            + self.packs.len() as u64 * 16
            + self.entries.len() as u64 * ENTRY_BYTES as u64
            + self.extents.len() as u64 * EXTENT_BYTES as u64
    }

    pub fn encode(&self) -> Vec<u8> {
        let meta = serde_json::to_vec(&self.meta).expect("metadata serializes");
        let mut body = Vec::with_capacity(
            16 + meta.len()
                + self.packs.len() * 16
                + self.entries.len() * ENTRY_BYTES
                + self.extents.len() * EXTENT_BYTES,
        );
        body.extend_from_slice(&len_u32(meta.len()).to_le_bytes());
        body.extend_from_slice(&meta);
        body.extend_from_slice(&len_u32(self.packs.len()).to_le_bytes());
        for p in &self.packs {
            body.extend_from_slice(&p.0);
        }
        // The tables are stored column by column, integer columns as wrapping deltas from the
        // previous row: consecutive chunks share frames and sizes and follow each other, so the
        // columns compress to almost nothing and the ids (incompressible) are most of the size.
        let es = &self.entries;
        body.extend_from_slice(&len_u32(es.len()).to_le_bytes());
        for e in es {
            body.extend_from_slice(&e.id.0);
        }
        put_deltas_u32(&mut body, es.iter().map(|e| e.pack));
        self.put_entry_columns(&mut body);
        self.put_extents(&mut body);
        Self::container(&body)
    }

    /// Encodes the manifest in format 2 where it can: the entries of each pack `tables` indexes
    /// (every one of them found in it) are named by their row in that pack's id table; the others
    /// carry their ids. With no table to use, it is format 1 ([`Manifest::encode`]).
    pub fn encode_with_tables(&self, tables: &HashMap<PackId, TableIndex>) -> Vec<u8> {
        let es = &self.entries;
        // A pack's table is used only if it holds every chunk the image takes from that pack.
        let usable: Vec<Option<&TableIndex>> = (0..self.packs.len())
            .map(|p| {
                let t = tables.get(&self.packs[p])?;
                es.iter()
                    .filter(|e| e.pack as usize == p)
                    .all(|e| t.rows.contains_key(&e.id))
                    .then_some(t)
            })
            .collect();
        if usable.iter().all(Option::is_none) {
            return self.encode();
        }
        let meta = serde_json::to_vec(&self.meta).expect("metadata serializes");
        let mut body = Vec::with_capacity(
            16 + meta.len() + self.packs.len() * 48 + es.len() * 36 + self.extents.len() * 12,
        );
        body.extend_from_slice(&len_u32(meta.len()).to_le_bytes());
        body.extend_from_slice(&meta);
        body.extend_from_slice(&len_u32(self.packs.len()).to_le_bytes());
        for p in &self.packs {
            body.extend_from_slice(&p.0);
        }
        for t in &usable {
            body.extend_from_slice(&t.map_or([0; 32], |t| t.digest));
        }
        let mut inline: Vec<&ChunkId> = Vec::new();
        let rows: Vec<u32> = es
            .iter()
            .map(|e| match usable[e.pack as usize] {
                Some(t) => t.rows[&e.id],
                None => {
                    inline.push(&e.id);
                    len_u32(inline.len() - 1)
                }
            })
            .collect();
        body.extend_from_slice(&len_u32(es.len()).to_le_bytes());
        put_deltas_u32(&mut body, es.iter().map(|e| e.pack));
        put_deltas_u32(&mut body, rows.into_iter());
        self.put_entry_columns(&mut body);
        body.extend_from_slice(&len_u32(inline.len()).to_le_bytes());
        for id in inline {
            body.extend_from_slice(&id.0);
        }
        self.put_extents(&mut body);
        Self::container_versioned(&body, FORMAT_VERSION_TABLES)
    }

    /// The entries' columns after the pack (and, in format 2, the row): the same in both formats.
    fn put_entry_columns(&self, body: &mut Vec<u8>) {
        let es = &self.entries;
        put_deltas_u32(body, es.iter().map(|e| e.flags));
        put_deltas_u64(body, es.iter().map(|e| e.frame_offset));
        put_deltas_u32(body, es.iter().map(|e| e.frame_stored));
        put_deltas_u32(body, es.iter().map(|e| e.frame_raw));
        put_deltas_u32(body, es.iter().map(|e| e.chunk_offset));
        put_deltas_u32(body, es.iter().map(|e| e.size));
    }

    /// The map: the same in both formats.
    fn put_extents(&self, body: &mut Vec<u8>) {
        let xs = &self.extents;
        body.extend_from_slice(&(xs.len() as u64).to_le_bytes());
        put_deltas_u32(body, xs.iter().map(|x| x.entry.unwrap_or(ZERO_RUN)));
        put_deltas_u64(body, xs.iter().map(|x| x.len));
    }

    /// The format version of manifest file bytes, if they start like one.
    pub fn format_of(bytes: &[u8]) -> Option<u32> {
        if bytes.get(..MAGIC.len())? != MAGIC {
            return None;
        }
        Some(u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?))
    }

    /// A format 1 manifest file holding `body` (compressed, its length and checksum in the
    /// header). Also used by the fuzz target to reach the body decoder with any body.
    pub fn container(body: &[u8]) -> Vec<u8> {
        Self::container_versioned(body, FORMAT_VERSION)
    }

    /// A manifest file of format `version` holding `body` (the fuzz target reaches format 2's
    /// body decoder through it).
    pub fn container_versioned(body: &[u8], version: u32) -> Vec<u8> {
        let stored = zstd::bulk::compress(body, 3).expect("in-memory zstd compression");
        let mut out = Vec::with_capacity(HEADER_BYTES + stored.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(stored.len() as u64).to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(blake3::hash(&stored).as_bytes());
        out.extend_from_slice(&stored);
        out
    }

    /// Decodes and validates a manifest of format 1: what an agent reads (format 2 is refused,
    /// saying where to get it as format 1).
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if Self::format_of(bytes) == Some(FORMAT_VERSION_TABLES) {
            return Err(ManifestError::NeedsIdTables);
        }
        Self::decode_with(bytes, &mut |_| {
            Err("not reached: format 1 has no tables".into())
        })
    }

    /// Decodes and validates a manifest of either format; `table` gives the file bytes of a
    /// pack's id table (each is checked against the BLAKE3 the manifest keeps for it).
    pub fn decode_with(
        bytes: &[u8],
        table: &mut dyn FnMut(&PackId) -> Result<Vec<u8>, String>,
    ) -> Result<Manifest, ManifestError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(ManifestError::NotAManifest);
        }
        if bytes.len() < HEADER_BYTES {
            return Err(ManifestError::Truncated);
        }
        let mut h = Reader::new(&bytes[8..HEADER_BYTES]);
        let version = h.u32()?;
        if version != FORMAT_VERSION && version != FORMAT_VERSION_TABLES {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let _flags = h.u32()?;
        let stored_len = h.u64()?;
        let raw_len = h.u64()?;
        let digest = h.take(32)?;
        let stored = &bytes[HEADER_BYTES..];
        if (stored.len() as u64) < stored_len {
            return Err(ManifestError::Truncated);
        }
        if stored.len() as u64 != stored_len {
            return Err(corrupt("trailing bytes after the body"));
        }
        if blake3::hash(stored).as_bytes() != digest {
            return Err(ManifestError::Checksum);
        }
        if raw_len > BODY_RAW_BYTES_MAX {
            return Err(corrupt(format!(
                "body of {raw_len} bytes is over the limit"
            )));
        }
        let body = zstd::bulk::decompress(stored, raw_len as usize)
            .map_err(|e| corrupt(format!("body does not decompress: {e}")))?;
        if body.len() as u64 != raw_len {
            return Err(corrupt("body length differs from the header"));
        }
        Self::decode_body(&body, version, table)
    }

    /// The body of a manifest file whose container is intact (for the fuzz target's seeds).
    pub fn body_of(bytes: &[u8]) -> Option<Vec<u8>> {
        let raw_len = u64::from_le_bytes(bytes.get(24..32)?.try_into().ok()?);
        zstd::bulk::decompress(
            bytes.get(HEADER_BYTES..)?,
            raw_len.min(BODY_RAW_BYTES_MAX) as usize,
        )
        .ok()
    }

    fn decode_body(
        body: &[u8],
        version: u32,
        table: &mut dyn FnMut(&PackId) -> Result<Vec<u8>, String>,
    ) -> Result<Manifest, ManifestError> {
        let tables_used = version == FORMAT_VERSION_TABLES;
        let mut r = Reader::new(body);
        let meta_len = r.u32()? as usize;
        let meta: Metadata = serde_json::from_slice(r.take(meta_len)?)
            .map_err(|e| corrupt(format!("metadata: {e}")))?;

        let pack_count = r.u32()? as usize;
        let mut packs = Vec::with_capacity(pack_count.min(r.remaining() / 16));
        for _ in 0..pack_count {
            let mut id = [0u8; 16];
            id.copy_from_slice(r.take(16)?);
            packs.push(PackId(id));
        }
        // Format 2: each pack's id table digest (zero: that pack's ids are in the manifest).
        let digests = if tables_used {
            // A pack listed twice would have its table fetched and held twice.
            let distinct: std::collections::HashSet<&PackId> = packs.iter().collect();
            if distinct.len() != packs.len() {
                return Err(corrupt("a pack is listed twice"));
            }
            r.take(pack_count * 32)?
        } else {
            &[][..]
        };

        let entry_count = r.u32()? as usize;
        let row_bytes = if tables_used {
            ENTRY_BYTES - 28
        } else {
            ENTRY_BYTES
        };
        if entry_count > r.remaining() / row_bytes {
            return Err(ManifestError::Truncated);
        }
        let v1_ids = if tables_used {
            &[][..]
        } else {
            r.take(entry_count * 32)?
        };
        let pack = r.deltas_u32(entry_count)?;
        let row = if tables_used {
            r.deltas_u32(entry_count)?
        } else {
            Vec::new()
        };
        let flags = r.deltas_u32(entry_count)?;
        let frame_offset = r.deltas_u64(entry_count)?;
        let frame_stored = r.deltas_u32(entry_count)?;
        let frame_raw = r.deltas_u32(entry_count)?;
        let chunk_offset = r.deltas_u32(entry_count)?;
        let size = r.deltas_u32(entry_count)?;
        let inline = if tables_used {
            let n = r.u32()? as usize;
            if n > r.remaining() / 32 {
                return Err(ManifestError::Truncated);
            }
            r.take(n * 32)?
        } else {
            v1_ids
        };
        // Format 2's tables, fetched and checked on first use.
        let mut loaded: HashMap<u32, Vec<ChunkId>> = HashMap::new();
        let mut entries = Vec::with_capacity(entry_count);
        for i in 0..entry_count {
            if pack[i] as usize >= packs.len() {
                return Err(corrupt(format!(
                    "entry {i} names pack {} of {}",
                    pack[i],
                    packs.len()
                )));
            }
            let p = pack[i] as usize;
            let id = if !tables_used {
                chunk_id_at(inline, i)
            } else if digests[p * 32..p * 32 + 32] == [0; 32] {
                chunk_id_at(inline, row[i] as usize)
            } else {
                let ids = match loaded.entry(pack[i]) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(load_table(&packs[p], &digests[p * 32..p * 32 + 32], table)?)
                    }
                };
                ids.get(row[i] as usize).copied()
            }
            .ok_or_else(|| corrupt(format!("entry {i} names a row past its id list")))?;
            let e = Entry {
                id,
                pack: pack[i],
                flags: flags[i],
                frame_offset: frame_offset[i],
                frame_stored: frame_stored[i],
                frame_raw: frame_raw[i],
                chunk_offset: chunk_offset[i],
                size: size[i],
            };
            if e.size == 0 || u64::from(e.chunk_offset) + u64::from(e.size) > u64::from(e.frame_raw)
            {
                return Err(corrupt(format!("entry {i} lies outside its frame")));
            }
            if e.frame_stored == 0
                || e.frame_raw > FRAME_RAW_BYTES_MAX
                || e.frame_stored > FRAME_STORED_BYTES_MAX
                || (!e.is_zstd() && e.frame_stored != e.frame_raw)
                || e.flags & !FLAG_ZSTD != 0
            {
                return Err(corrupt(format!(
                    "entry {i}: frame of {} stored / {} raw bytes, flags {:#x}, is out of bounds",
                    e.frame_stored, e.frame_raw, e.flags
                )));
            }
            entries.push(e);
        }
        // Entries in one frame must agree on what the frame is: a reader fetches it once.
        let mut frames: std::collections::HashMap<(u32, u64), (u32, u32, u32)> =
            std::collections::HashMap::with_capacity(entries.len() / 8);
        for (i, e) in entries.iter().enumerate() {
            let shape = (e.frame_stored, e.frame_raw, e.flags);
            if *frames.entry((e.pack, e.frame_offset)).or_insert(shape) != shape {
                return Err(corrupt(format!(
                    "entry {i} disagrees with another entry on the size of frame {} of pack {}",
                    e.frame_offset, e.pack
                )));
            }
        }

        let extent_count = r.u64()?;
        if extent_count > (r.remaining() / EXTENT_BYTES) as u64 {
            return Err(ManifestError::Truncated);
        }
        let extent_count = extent_count as usize;
        let extent_entry = r.deltas_u32(extent_count)?;
        let extent_len = r.deltas_u64(extent_count)?;
        let mut extents = Vec::with_capacity(extent_count);
        let mut offset = 0u64;
        for i in 0..extent_count {
            let len = extent_len[i];
            let entry = (extent_entry[i] != ZERO_RUN).then_some(extent_entry[i]);
            if len == 0 {
                return Err(corrupt(format!("extent {i} is empty")));
            }
            if let Some(e) = entry {
                let Some(row) = entries.get(e as usize) else {
                    return Err(corrupt(format!(
                        "extent {i} names entry {e} of {}",
                        entries.len()
                    )));
                };
                if u64::from(row.size) != len {
                    return Err(corrupt(format!("extent {i} length differs from its chunk")));
                }
            }
            extents.push(Extent { offset, len, entry });
            offset = offset
                .checked_add(len)
                .ok_or_else(|| corrupt("extents overflow"))?;
        }
        if r.remaining() != 0 {
            return Err(corrupt("trailing bytes in the body"));
        }
        if offset != meta.size {
            return Err(corrupt(format!(
                "the map covers {offset} bytes but the image is {} bytes",
                meta.size
            )));
        }
        Ok(Manifest {
            meta,
            packs,
            entries,
            extents,
        })
    }
}

/// The `i`th 32-byte id of a column of ids, if there is one.
fn chunk_id_at(ids: &[u8], i: usize) -> Option<ChunkId> {
    let bytes = ids.get(i.checked_mul(32)?..i.checked_mul(32)? + 32)?;
    let mut id = [0u8; 32];
    id.copy_from_slice(bytes);
    Some(ChunkId(id))
}

/// Fetches a pack's id table and checks it is the one the manifest names.
fn load_table(
    pack: &PackId,
    digest: &[u8],
    table: &mut dyn FnMut(&PackId) -> Result<Vec<u8>, String>,
) -> Result<Vec<ChunkId>, ManifestError> {
    let unusable = |why: String| ManifestError::IdTable { pack: *pack, why };
    let bytes = table(pack).map_err(unusable)?;
    if blake3::hash(&bytes).as_bytes() != digest {
        return Err(unusable(
            "it is not the table this manifest was written with (checksum mismatch)".into(),
        ));
    }
    IdTable::decode(&bytes, pack).map(|t| t.ids)
}

/// Appends a column of u32s as wrapping deltas from the previous value (the first from 0).
fn put_deltas_u32(out: &mut Vec<u8>, values: impl Iterator<Item = u32>) {
    let mut prev = 0u32;
    for v in values {
        out.extend_from_slice(&v.wrapping_sub(prev).to_le_bytes());
        prev = v;
    }
}

/// Appends a column of u64s as wrapping deltas from the previous value (the first from 0).
fn put_deltas_u64(out: &mut Vec<u8>, values: impl Iterator<Item = u64>) {
    let mut prev = 0u64;
    for v in values {
        out.extend_from_slice(&v.wrapping_sub(prev).to_le_bytes());
        prev = v;
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("manifest table larger than u32::MAX rows")
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        if self.buf.len() < n {
            return Err(ManifestError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, ManifestError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A column of `n` u32 deltas, summed back into values.
    fn deltas_u32(&mut self, n: usize) -> Result<Vec<u32>, ManifestError> {
        let mut prev = 0u32;
        (0..n)
            .map(|_| {
                prev = prev.wrapping_add(self.u32()?);
                Ok(prev)
            })
            .collect()
    }
    /// A column of `n` u64 deltas, summed back into values.
    fn deltas_u64(&mut self, n: usize) -> Result<Vec<u64>, ManifestError> {
        let mut prev = 0u64;
        (0..n)
            .map(|_| {
                prev = prev.wrapping_add(self.u64()?);
                Ok(prev)
            })
            .collect()
    }
    fn u64(&mut self) -> Result<u64, ManifestError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let entry = |n: u8, off: u32| Entry {
            id: ChunkId::of(&[n]),
            pack: 0,
            flags: FLAG_ZSTD,
            frame_offset: 16,
            frame_stored: 100,
            frame_raw: 8192,
            chunk_offset: off,
            size: 4096,
        };
        Manifest {
            meta: Metadata {
                name: "demo".into(),
                version: 3,
                size: 4096 * 4,
                digest: "00".repeat(32),
                created: "2026-11-25T00:00:00Z".into(),
                source: "/tmp/demo.img".into(),
                chunking: "blocks".into(),
            },
            packs: vec![PackId([7; 16])],
            entries: vec![entry(1, 0), entry(2, 4096)],
            extents: vec![
                Extent {
                    offset: 0,
                    len: 4096,
                    entry: Some(0),
                },
                Extent {
                    offset: 4096,
                    len: 4096,
                    entry: None,
                },
                Extent {
                    offset: 8192,
                    len: 4096,
                    entry: Some(1),
                },
                Extent {
                    offset: 12288,
                    len: 4096,
                    entry: Some(0),
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.data_bytes(), 3 * 4096);
    }

    /// Format 2: ids by row of an id table, each table checked against the manifest's digest;
    /// a pack without a table keeps its ids inline.
    #[test]
    fn format_2_names_ids_by_table_row() {
        let mut m = sample();
        // A second pack, without a table: its chunk stays inline.
        m.packs.push(PackId([8; 16]));
        m.entries[1].pack = 1;
        let table = IdTable {
            pack: m.packs[0],
            // Rows in another order than the entries, and a chunk no entry uses.
            ids: vec![ChunkId::of(b"other"), m.entries[0].id],
        };
        let table_bytes = table.encode();
        let tables = HashMap::from([(
            m.packs[0],
            TableIndex::of_bytes(&table_bytes, &m.packs[0]).unwrap(),
        )]);
        let bytes = m.encode_with_tables(&tables);
        assert_eq!(Manifest::format_of(&bytes), Some(FORMAT_VERSION_TABLES));
        let mut asked = Vec::new();
        let back = Manifest::decode_with(&bytes, &mut |p| {
            asked.push(*p);
            Ok(table_bytes.clone())
        })
        .unwrap();
        assert_eq!(back, m);
        assert_eq!(
            asked,
            vec![m.packs[0]],
            "only the table in use is fetched, once"
        );
        // An agent's decode refuses it, saying what to do.
        let err = Manifest::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("through the appliance"), "{err}");
        // Another table under the same name is refused by its digest.
        let forged = IdTable {
            pack: m.packs[0],
            ids: vec![ChunkId::of(b"other"), ChunkId::of(b"forged")],
        };
        let err = Manifest::decode_with(&bytes, &mut |_| Ok(forged.encode())).unwrap_err();
        assert!(matches!(err, ManifestError::IdTable { .. }), "{err}");
        // A table that lacks a chunk of the image is not used: the ids stay inline (format 1).
        let partial = HashMap::from([(
            m.packs[0],
            TableIndex::of_bytes(&forged.encode(), &m.packs[0]).unwrap(),
        )]);
        let bytes = m.encode_with_tables(&partial);
        assert_eq!(Manifest::format_of(&bytes), Some(FORMAT_VERSION));
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        // A pack listed twice (its table would be fetched and held twice) is refused.
        let mut twice = m.clone();
        twice.packs[1] = twice.packs[0];
        let bytes = twice.encode_with_tables(&tables);
        let err = Manifest::decode_with(&bytes, &mut |_| Ok(table_bytes.clone())).unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
    }

    #[test]
    fn rejects_foreign_truncated_and_damaged_bytes() {
        let bytes = sample().encode();
        assert!(matches!(
            Manifest::decode(b"#!/bin/sh\n"),
            Err(ManifestError::NotAManifest)
        ));
        assert!(matches!(
            Manifest::decode(&bytes[..40]),
            Err(ManifestError::Truncated)
        ));
        assert!(matches!(
            Manifest::decode(&bytes[..bytes.len() - 1]),
            Err(ManifestError::Truncated)
        ));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            Manifest::decode(&flipped),
            Err(ManifestError::Checksum)
        ));
        let mut newer = bytes;
        newer[8] = 3;
        assert!(matches!(
            Manifest::decode(&newer),
            Err(ManifestError::UnsupportedVersion(3))
        ));
    }

    /// Issue 8, item 14: inconsistent or out-of-bounds frames are refused by decode (the agent
    /// validates every manifest it receives this way), never left to panic a reader.
    #[test]
    fn rejects_inconsistent_and_oversized_frames() {
        type Damage = Box<dyn Fn(&mut Manifest)>;
        let bad: Vec<(&str, Damage)> = vec![
            (
                "frame sizes disagree",
                Box::new(|m| m.entries[1].frame_stored = 99),
            ),
            (
                "raw sizes disagree",
                Box::new(|m| m.entries[1].frame_raw = 4096 * 3),
            ),
            (
                "stored size 0",
                Box::new(|m| {
                    for e in &mut m.entries {
                        e.frame_stored = 0;
                    }
                }),
            ),
            (
                "raw past the limit",
                Box::new(|m| {
                    for e in &mut m.entries {
                        e.frame_raw = FRAME_RAW_BYTES_MAX + 1;
                    }
                }),
            ),
            (
                "stored past the limit",
                Box::new(|m| {
                    for e in &mut m.entries {
                        e.frame_stored = u32::MAX;
                    }
                }),
            ),
            (
                "raw frame stored at another size",
                Box::new(|m| {
                    for e in &mut m.entries {
                        e.flags = 0;
                    }
                }),
            ),
            (
                "unknown flag",
                Box::new(|m| {
                    for e in &mut m.entries {
                        e.flags |= 0x80;
                    }
                }),
            ),
        ];
        for (what, damage) in bad {
            let mut m = sample();
            damage(&mut m);
            assert!(
                matches!(
                    Manifest::decode(&m.encode()),
                    Err(ManifestError::Corrupt(_))
                ),
                "{what} was accepted"
            );
        }
    }

    /// Issue 8, item 16: an image whose manifest would pass the format's limit is refused
    /// before it is written (decoders would refuse it, and gc with them).
    #[test]
    fn a_manifest_past_the_body_limit_is_refused_before_it_is_written() {
        let mut m = sample();
        assert!(m.check_encodable().is_ok());
        let n = (BODY_RAW_BYTES_MAX / ENTRY_BYTES as u64) as usize + 1;
        m.entries = vec![m.entries[0]; n];
        let e = m.check_encodable().unwrap_err();
        assert!(matches!(e, ManifestError::TooLarge { .. }));
        assert!(e.to_string().contains("--chunk-size"), "{e}");
    }

    #[test]
    fn rejects_a_map_that_does_not_cover_the_image() {
        let mut m = sample();
        m.meta.size += 1;
        assert!(matches!(
            Manifest::decode(&m.encode()),
            Err(ManifestError::Corrupt(_))
        ));
        let mut m = sample();
        m.extents[0].entry = Some(9);
        assert!(matches!(
            Manifest::decode(&m.encode()),
            Err(ManifestError::Corrupt(_))
        ));
    }
}
