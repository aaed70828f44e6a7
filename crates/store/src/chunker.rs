//! Cutting image bytes into chunks.
//!
//! Every segment is first split into runs of all-zero 4 KiB blocks (recorded, never stored) and
//! runs of data. Data runs are then cut by one of two rules:
//! - [`Chunking::Blocks`]: cut points only on 4 KiB block boundaries. Filesystems (ext4, XFS, FAT
//!   with 4 KiB clusters) place file data on those boundaries, so two images holding the same file
//!   hold the same blocks even when the file moved: block-aligned cuts find that sharing where
//!   free-floating cuts straddle it. With `avg_bytes` = 4096 every block is a chunk (the finest
//!   dedup, the largest offset table); larger averages cut content-defined on block hashes.
//! - [`Chunking::FastCdc`]: FastCDC 2020 cut points anywhere, for data that shifts by amounts that
//!   are not whole blocks (archives, streams).
//!
//! Chunks never span a segment boundary; segments start on fixed multiples of their size, so the
//! same bytes at the same place are always cut the same way.

use fleetboot_image::BLOCK_BYTES;
use std::ops::Range;

/// How data runs are cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// Cut points on 4 KiB boundaries, `avg_bytes` (a multiple of 4096) on average.
    Blocks { avg_bytes: u32 },
    /// FastCDC 2020 with these sizes in bytes.
    FastCdc { min: u32, avg: u32, max: u32 },
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking::Blocks {
            avg_bytes: BLOCK_BYTES as u32,
        }
    }
}

/// A piece of a segment: a zero run, or one chunk of data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Zero(usize),
    Data(Range<usize>),
}

impl Chunking {
    /// FastCDC with sizes around `avg` (min = avg/4, max = avg*4).
    pub fn fastcdc(avg: u32) -> Chunking {
        Chunking::FastCdc {
            min: (avg / 4).max(64),
            avg,
            max: avg.saturating_mul(4),
        }
    }

    /// How this chunking is recorded in a manifest's metadata.
    pub fn describe(&self) -> String {
        match self {
            Chunking::Blocks { avg_bytes } => format!("blocks/{avg_bytes}"),
            Chunking::FastCdc { min, avg, max } => format!("fastcdc/{min}/{avg}/{max}"),
        }
    }

    /// Appends the pieces of `data` to `out`, in order, covering it exactly.
    pub fn cut(&self, data: &[u8], out: &mut Vec<Piece>) {
        let mut start = 0;
        while start < data.len() {
            let zero = is_zero(block_at(data, start));
            let mut end = start;
            while end < data.len() && is_zero(block_at(data, end)) == zero {
                end = (end + BLOCK_BYTES).min(data.len());
            }
            if zero {
                out.push(Piece::Zero(end - start));
            } else {
                self.cut_data(data, start..end, out);
            }
            start = end;
        }
    }

    fn cut_data(&self, data: &[u8], run: Range<usize>, out: &mut Vec<Piece>) {
        match *self {
            Chunking::Blocks { avg_bytes } => {
                let avg_blocks = (avg_bytes as usize / BLOCK_BYTES).max(1);
                let max = avg_blocks * 4 * BLOCK_BYTES;
                let mut chunk_start = run.start;
                let mut at = run.start;
                while at < run.end {
                    let block = block_at(data, at);
                    at += block.len();
                    let cut = avg_blocks == 1
                        || block_hash(block).is_multiple_of(avg_blocks as u64)
                        || at - chunk_start >= max
                        || at == run.end;
                    if cut {
                        out.push(Piece::Data(chunk_start..at));
                        chunk_start = at;
                    }
                }
            }
            Chunking::FastCdc { min, avg, max } => {
                let run_data = &data[run.clone()];
                for c in fastcdc::v2020::FastCDC::new(run_data, min, avg, max) {
                    let s = run.start + c.offset;
                    out.push(Piece::Data(s..s + c.length));
                }
            }
        }
    }
}

/// The block starting at `at` (shorter at the end of `data`).
fn block_at(data: &[u8], at: usize) -> &[u8] {
    &data[at..(at + BLOCK_BYTES).min(data.len())]
}

/// Whether every byte of `block` is zero. Runs over every byte imported: a branch-free OR that
/// the compiler vectorizes, over a 4 KiB block at most.
pub fn is_zero(block: &[u8]) -> bool {
    block.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// A cheap 64-bit hash of a block, for content-defined cuts (not an id: ids are BLAKE3).
fn block_hash(block: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in block.chunks_exact(8) {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(a)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (h >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(c: Chunking, data: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        c.cut(data, &mut out);
        out
    }

    #[test]
    fn blocks_split_zero_runs_from_data_blocks() {
        let mut data = vec![0u8; 5 * BLOCK_BYTES + 100];
        data[BLOCK_BYTES + 7] = 1;
        data[2 * BLOCK_BYTES] = 2;
        data[5 * BLOCK_BYTES + 99] = 3;
        let p = pieces(Chunking::default(), &data);
        let b = BLOCK_BYTES;
        assert_eq!(
            p,
            vec![
                Piece::Zero(b),
                Piece::Data(b..2 * b),
                Piece::Data(2 * b..3 * b),
                Piece::Zero(2 * b),
                Piece::Data(5 * b..5 * b + 100),
            ]
        );
    }

    #[test]
    fn cuts_cover_data_exactly_for_every_rule() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for c in [
            Chunking::default(),
            Chunking::Blocks { avg_bytes: 16384 },
            Chunking::fastcdc(8192),
        ] {
            let mut at = 0;
            for p in pieces(c, &data) {
                match p {
                    Piece::Zero(n) => at += n,
                    Piece::Data(r) => {
                        assert_eq!(r.start, at, "{c:?}");
                        assert!(!r.is_empty());
                        at = r.end;
                    }
                }
            }
            assert_eq!(at, data.len(), "{c:?}");
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut b = [0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[0u8; 5]));
        assert!(!is_zero(&[0, 0, 9]));
    }
}
