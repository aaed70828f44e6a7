//! `store gc`: remove data no visible image uses.
//!
//! Under the writers' lock: a pack no manifest refers to is deleted; a pack of which less than half
//! is still used is rewritten — its live frames copied as they are into a new pack, every manifest
//! that used it rewritten (atomically) to point there, and only then the old pack deleted. A crash
//! at any step leaves every visible image whole. gc refuses to run while any manifest is unreadable,
//! since it could not know what that image uses.

use super::fsutil::{sync_dir, write_atomic};
use super::pack::{PackWriter, PACK_HEADER_BYTES};
use super::{IoContext, Store, StoreError};
use fleetboot_image::PackId;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;

/// What gc did.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub packs_removed: usize,
    pub packs_rewritten: usize,
    pub manifests_rewritten: usize,
    pub bytes_freed: u64,
}

/// Share of a pack's frames that must still be used for it to be kept as is.
const LIVE_FRACTION_MIN: f64 = 0.5;

impl Store {
    /// Frees the space of data no image uses.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _lock = self.lock_for_write()?;
        let manifests = self.all_manifests()?;
        // pack -> live frames (offset -> stored length)
        let mut live: HashMap<PackId, BTreeMap<u64, u32>> = HashMap::new();
        for (_, m) in &manifests {
            for e in &m.entries {
                live.entry(m.packs[e.pack as usize])
                    .or_default()
                    .insert(e.frame_offset, e.frame_stored);
            }
        }
        let mut report = GcReport::default();
        for (pack, len) in self.packs()? {
            let path = self.pack_path(&pack);
            let Some(frames) = live.get(&pack) else {
                fs::remove_file(&path).at(&path)?;
                report.packs_removed += 1;
                report.bytes_freed += len;
                continue;
            };
            let live_bytes: u64 = frames.values().map(|&n| u64::from(n)).sum();
            let payload = len.saturating_sub(PACK_HEADER_BYTES).max(1);
            if live_bytes as f64 / payload as f64 >= LIVE_FRACTION_MIN {
                continue;
            }
            // Copy the live frames into a new pack.
            let old = File::open(&path).at(&path)?;
            let mut new = PackWriter::create(self)?;
            let mut moved: HashMap<u64, u64> = HashMap::new();
            for (&offset, &stored) in frames {
                let mut buf = vec![0u8; stored as usize];
                old.read_exact_at(&mut buf, offset).at(&path)?;
                moved.insert(offset, new.append(&buf).at(&self.tmp_dir())?);
            }
            let new_len = new.len();
            let new_id = new.finish(self)?;
            // Point every manifest that used the old pack at the new one.
            for (v, m) in &manifests {
                let Some(index) = m.packs.iter().position(|p| *p == pack) else {
                    continue;
                };
                let mut m = m.clone();
                m.packs[index] = new_id;
                for e in m.entries.iter_mut().filter(|e| e.pack as usize == index) {
                    e.frame_offset = moved[&e.frame_offset];
                }
                write_atomic(&self.tmp_dir(), &v.path, &m.encode()).at(&v.path)?;
                report.manifests_rewritten += 1;
            }
            fs::remove_file(&path).at(&path)?;
            report.packs_rewritten += 1;
            report.bytes_freed += len.saturating_sub(new_len);
        }
        let dir = self.packs_dir();
        sync_dir(&dir).at(&dir)?;
        Ok(report)
    }
}
