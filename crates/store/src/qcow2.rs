//! Reading a qcow2 image (versions 2 and 3, clusters plain or compressed with zlib or zstd) as the
//! disk it describes, for import: which ranges hold data and which read as zeros come from its
//! cluster tables, so an image that is mostly empty is read as such and no raw copy is written.
//!
//! Refused with the reason: a backing file, encryption, an external data file, extended L2
//! entries (subclusters), a version or an incompatible feature this reader does not know, an image
//! marked corrupt, and tables or clusters that point past the end of the file (truncated).
//! Layout as in QEMU's docs/interop/qcow2.txt.
//!
//! Why our own reader (docs/benchmarks.md, "Importing qcow2", has the measurements): the qcow2
//! crates checked either refuse zstd-compressed clusters (imago 0.2, which is otherwise the best
//! kept) or are unmaintained and read holes as data (qcow 1.2); `qemu-img convert` needs a raw
//! copy of the whole disk in a temporary file. Read-only access to the tables is a few hundred
//! lines.

use super::source::{Source, Span};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Offset bits of an L1 or standard L2 entry (9..=55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;

/// Incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// The largest L1 table accepted (entries): 32 M entries map 2 EiB with 64 KiB clusters, and a
/// damaged header cannot make the reader allocate more than 256 MiB.
const L1_ENTRIES_MAX: u64 = 32 << 20;

/// How clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    Zlib,
    Zstd,
}

/// What a guest cluster is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cluster {
    /// Unallocated or marked zero: reads as zeros.
    Zero,
    /// Stored as is at this offset of the file.
    Data(u64),
    /// Compressed: at most `len` bytes from `offset`.
    Compressed { offset: u64, len: u64 },
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: File,
    file_len: u64,
    size: u64,
    cluster_bits: u32,
    compression: Compression,
    l1: Vec<u64>,
    /// The L2 table last read, by its L1 index.
    l2: Option<(usize, Vec<u64>)>,
    /// The compressed cluster last decompressed, by guest cluster index.
    unpacked: Option<(u64, Vec<u8>)>,
}

/// Why a qcow2 image is refused.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("{0}")]
    Unsupported(String),
    #[error("damaged or truncated qcow2 image: {0}")]
    Damaged(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether `head` (the file's first bytes) starts like a qcow2 image.
pub fn is_qcow2(head: &[u8]) -> bool {
    head.starts_with(&MAGIC)
}

impl Qcow2 {
    /// Opens and checks the image: header, features, L1 table.
    pub fn open(file: File) -> Result<Qcow2, Qcow2Error> {
        let damaged = |what: &str| Qcow2Error::Damaged(what.to_string());
        let unsupported = |what: String| Qcow2Error::Unsupported(what);
        let file_len = file.metadata()?.len();
        let mut h = [0u8; 112];
        let got = read_up_to(&file, &mut h, 0)?;
        if got < 72 || !is_qcow2(&h) {
            return Err(damaged("the header is cut short"));
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!(
                "qcow2 version {version} is not supported (versions 2 and 3 are)"
            )));
        }
        if be64(&h, 8) != 0 {
            return Err(unsupported(
                "the image has a backing file; import a standalone image \
                 (`qemu-img convert -O qcow2` flattens it)"
                    .into(),
            ));
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(damaged("the cluster size is out of range"));
        }
        let size = be64(&h, 24);
        if be32(&h, 32) != 0 {
            return Err(unsupported(
                "the image is encrypted; decrypt it first (`qemu-img convert`)".into(),
            ));
        }
        let l1_size = u64::from(be32(&h, 36));
        let l1_offset = be64(&h, 40);
        let mut compression = Compression::Zlib;
        if version == 3 {
            if got < 104 {
                return Err(damaged("the version 3 header is cut short"));
            }
            let incompat = be64(&h, 72);
            let header_len = be32(&h, 100);
            if incompat & INCOMPAT_CORRUPT != 0 {
                return Err(unsupported(
                    "the image is marked corrupt; repair it first (`qemu-img check -r all`)".into(),
                ));
            }
            if incompat & INCOMPAT_DATA_FILE != 0 {
                return Err(unsupported(
                    "the image keeps its data in an external data file; import that raw file, \
                     or convert the image to a standalone one"
                        .into(),
                ));
            }
            if incompat & INCOMPAT_EXTL2 != 0 {
                return Err(unsupported(
                    "the image uses extended L2 entries (subclusters), which are not supported; \
                     `qemu-img convert -O qcow2` rewrites it without"
                        .into(),
                ));
            }
            let known = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION;
            if incompat & !known != 0 {
                return Err(unsupported(format!(
                    "the image needs qcow2 features this reader does not know (bits {:#x})",
                    incompat & !known
                )));
            }
            if incompat & INCOMPAT_COMPRESSION != 0 {
                if header_len <= 104 || got < 105 {
                    return Err(damaged("the compression type is missing from the header"));
                }
                compression = match h[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    other => {
                        return Err(unsupported(format!(
                            "compression type {other} is not supported (zlib and zstd are)"
                        )))
                    }
                };
            }
        }
        let cluster = 1u64 << cluster_bits;
        let l2_entries = cluster / 8;
        let needed = size.div_ceil(cluster).div_ceil(l2_entries);
        if l1_size < needed || l1_size > L1_ENTRIES_MAX {
            return Err(damaged("the L1 table does not match the disk size"));
        }
        if !l1_offset.is_multiple_of(cluster) || l1_offset.saturating_add(l1_size * 8) > file_len {
            return Err(damaged("the L1 table lies outside the file"));
        }
        let mut raw = vec![0u8; (l1_size * 8) as usize];
        file.read_exact_at(&mut raw, l1_offset)?;
        let l1 = raw.chunks_exact(8).map(|e| be64(e, 0)).collect();
        Ok(Qcow2 {
            file,
            file_len,
            size,
            cluster_bits,
            compression,
            l1,
            l2: None,
            unpacked: None,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// What guest cluster `index` is.
    fn cluster(&mut self, index: u64) -> Result<Cluster, Qcow2Error> {
        let per_l2 = self.cluster_size() / 8;
        let l1_index = (index / per_l2) as usize;
        let l2_offset = self.l1.get(l1_index).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Cluster::Zero);
        }
        if self.l2.as_ref().map(|(i, _)| *i) != Some(l1_index) {
            if !l2_offset.is_multiple_of(self.cluster_size())
                || l2_offset + self.cluster_size() > self.file_len
            {
                return Err(Qcow2Error::Damaged(format!(
                    "an L2 table at {l2_offset} lies outside the file"
                )));
            }
            let mut raw = vec![0u8; self.cluster_size() as usize];
            self.file.read_exact_at(&mut raw, l2_offset)?;
            self.l2 = Some((l1_index, raw.chunks_exact(8).map(|e| be64(e, 0)).collect()));
        }
        let entry = self
            .l2
            .as_ref()
            .map_or(0, |(_, t)| t[(index % per_l2) as usize]);
        if entry & L2_COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let offset = entry & ((1 << x) - 1);
            let sectors = (entry >> x) & ((1 << (self.cluster_bits - 8)) - 1);
            let len = (sectors + 1) * 512 - (offset & 511);
            if offset >= self.file_len {
                return Err(Qcow2Error::Damaged(format!(
                    "a compressed cluster at {offset} lies outside the file"
                )));
            }
            // The length is an upper bound that may run past the file's end by design.
            let len = len.min(self.file_len - offset);
            return Ok(Cluster::Compressed { offset, len });
        }
        let offset = entry & OFFSET_MASK;
        if entry & L2_ZERO != 0 || offset == 0 {
            return Ok(Cluster::Zero);
        }
        // The file may end inside the last cluster when the disk does too.
        let needed = self
            .cluster_size()
            .min(self.size - (index << self.cluster_bits));
        if !offset.is_multiple_of(self.cluster_size()) || offset + needed > self.file_len {
            return Err(Qcow2Error::Damaged(format!(
                "a data cluster at {offset} lies outside the file"
            )));
        }
        Ok(Cluster::Data(offset))
    }

    /// Decompresses guest cluster `index` (cached: reads go through a cluster in pieces).
    fn unpack(&mut self, index: u64, offset: u64, len: u64) -> Result<&[u8], Qcow2Error> {
        if self.unpacked.as_ref().map(|(i, _)| *i) != Some(index) {
            let mut packed = vec![0u8; len as usize];
            self.file.read_exact_at(&mut packed, offset)?;
            let mut out = vec![0u8; self.cluster_size() as usize];
            let bad = |why: String| {
                Qcow2Error::Damaged(format!("the compressed cluster at {offset}: {why}"))
            };
            match self.compression {
                Compression::Zlib => {
                    // Raw deflate (no zlib header); the input may run past the stream's end.
                    let mut d = flate2::Decompress::new(false);
                    d.decompress(&packed, &mut out, flate2::FlushDecompress::Finish)
                        .map_err(|e| bad(e.to_string()))?;
                    if d.total_out() != out.len() as u64 {
                        return Err(bad("it holds less than a cluster".into()));
                    }
                }
                Compression::Zstd => {
                    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
                    let mut d = Decoder::new().map_err(|e| bad(e.to_string()))?;
                    let mut input = InBuffer::around(&packed);
                    let mut output = OutBuffer::around(&mut out[..]);
                    // Until the cluster is full: what follows the frame is padding.
                    while output.pos() < output.capacity() && input.pos() < input.src.len() {
                        d.run(&mut input, &mut output)
                            .map_err(|e| bad(e.to_string()))?;
                    }
                    if output.pos() != output.capacity() {
                        return Err(bad("it holds less than a cluster".into()));
                    }
                }
            }
            self.unpacked = Some((index, out));
        }
        Ok(self
            .unpacked
            .as_ref()
            .map_or(&[][..], |(_, d)| d.as_slice()))
    }
}

impl Source for Qcow2 {
    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    /// Runs of clusters of one kind: zero (unallocated or zero) or data (plain or compressed).
    fn span(&mut self, pos: u64) -> io::Result<Option<Span>> {
        if pos >= self.size {
            return Ok(None);
        }
        let cs = self.cluster_size();
        let first = pos >> self.cluster_bits;
        let zero = self.cluster(first).map_err(io::Error::other)? == Cluster::Zero;
        let mut end = (first + 1).saturating_mul(cs);
        // Bounded, so that a span costs at most one L2 table's worth of lookups past `pos`.
        let limit = pos.saturating_add(cs * (cs / 8)).min(self.size);
        while end < limit {
            let is_zero = self
                .cluster(end >> self.cluster_bits)
                .map_err(io::Error::other)?
                == Cluster::Zero;
            if is_zero != zero {
                break;
            }
            end = end.saturating_add(cs);
        }
        let len = end.min(self.size) - pos;
        Ok(Some(if zero {
            Span::Zero(len)
        } else {
            Span::Data(len)
        }))
    }

    fn read(&mut self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let len = (buf.len() as u64).min(self.size.saturating_sub(pos)) as usize;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < len {
            let at = pos + done as u64;
            let index = at >> self.cluster_bits;
            let within = at % cs;
            let n = ((cs - within) as usize).min(len - done);
            let out = &mut buf[done..done + n];
            match self.cluster(index).map_err(io::Error::other)? {
                Cluster::Zero => out.fill(0),
                Cluster::Data(offset) => self.file.read_exact_at(out, offset + within)?,
                Cluster::Compressed { offset, len } => {
                    let data = self.unpack(index, offset, len).map_err(io::Error::other)?;
                    out.copy_from_slice(&data[within as usize..within as usize + n]);
                }
            }
            done += n;
        }
        Ok(len)
    }
}

/// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}
