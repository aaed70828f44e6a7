//! Helpers the black-box tests share: deterministic synthetic disk images.
#![allow(dead_code)]

pub const BLOCK: usize = 4096;

/// A tiny deterministic generator (xorshift64*), so failures reproduce from the printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A disk-like image: zero runs, random blocks, text-like (compressible) blocks and blocks
/// repeated inside the image; `tail` extra bytes make the size not a multiple of 4096.
pub fn synthetic_image(seed: u64, blocks: usize, tail: usize) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut img = vec![0u8; blocks * BLOCK + tail];
    for b in 0..blocks {
        let block = &mut img[b * BLOCK..(b + 1) * BLOCK];
        match rng.below(10) {
            0..=3 => {} // zero
            4..=5 => rng.fill(block),
            6..=7 => {
                let line = format!(
                    "line {} of a config file with key=value{}\n",
                    rng.below(50),
                    b % 7
                );
                for (i, byte) in block.iter_mut().enumerate() {
                    *byte = line.as_bytes()[i % line.len()];
                }
            }
            _ if b > 0 => {
                let from = rng.below(b as u64) as usize;
                let src = img[from * BLOCK..(from + 1) * BLOCK].to_vec();
                img[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&src);
            }
            _ => {}
        }
    }
    for byte in img[blocks * BLOCK..].iter_mut() {
        *byte = rng.below(256) as u8;
    }
    img
}

/// `base` with a few blocks changed, as a next version of an OS image would be.
pub fn next_version(base: &[u8], seed: u64, changes: usize) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut img = base.to_vec();
    let blocks = img.len() / BLOCK;
    for _ in 0..changes {
        let b = rng.below(blocks as u64) as usize;
        rng.fill(&mut img[b * BLOCK..(b + 1) * BLOCK]);
    }
    img
}
