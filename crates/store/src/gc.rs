//! `store gc`: remove data no visible image uses.
//!
//! Under the writers' lock: a pack no manifest refers to is retired; a pack of which less than half
//! is still used is rewritten — its live frames copied as they are into a new pack, every manifest
//! that used it rewritten (atomically) to point there, and only then the old pack retired. A crash
//! at any step leaves every visible image whole. gc refuses to run while any manifest is unreadable,
//! since it could not know what that image uses.
//!
//! Readers take no lock: an install, an export or a `verify` that loaded a manifest before gc may
//! still read the packs it names. So gc never deletes a pack it takes out of use: it moves it to
//! `retired/` (same file, so open handles and `open_pack` keep working) and a later gc deletes it
//! once the grace period has passed — long enough for any install in flight to finish.

use super::fsutil::{sync_dir, write_atomic};
use super::pack::{PackWriter, PACK_HEADER_BYTES};
use super::{IoContext, Store, StoreError};
use fleetboot_image::PackId;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// What gc did.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Packs no image uses any more, retired.
    pub packs_removed: usize,
    /// Packs mostly unused, their live frames copied to a new pack and the old one retired.
    pub packs_rewritten: usize,
    pub manifests_rewritten: usize,
    /// Bytes of the packs retired now (freed by a gc after the grace period).
    pub bytes_retired: u64,
    /// Retired packs deleted now (their grace period was over).
    pub retired_deleted: usize,
    /// Bytes freed now: retired packs deleted.
    pub bytes_freed: u64,
    /// Retired packs still in their grace period, and their bytes.
    pub retired_waiting: usize,
    pub bytes_waiting: u64,
}

/// How long a retired pack stays readable: an install's token lives 4 hours by default
/// (`install_token_ttl`), so no install that began before gc can still need it after that.
pub const GRACE_DEFAULT: Duration = Duration::from_secs(4 * 3600);

/// Share of a pack's frames that must still be used for it to be kept as is.
const LIVE_FRACTION_MIN: f64 = 0.5;

impl Store {
    /// Frees the space of data no image uses, with the default grace period.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        self.gc_with_grace(GRACE_DEFAULT)
    }

    /// Retires packs no image uses (and rewrites mostly unused ones), and deletes packs retired
    /// more than `grace` ago. `grace` zero frees everything at once (no reader may be running).
    pub fn gc_with_grace(&self, grace: Duration) -> Result<GcReport, StoreError> {
        let _lock = self.lock_for_write()?;
        let mut report = GcReport::default();
        // First what earlier runs retired: the grace period is counted from the retirement.
        let now = SystemTime::now();
        for (id, len, retired_at) in self.retired_packs()? {
            let age = now.duration_since(retired_at).unwrap_or_default();
            if age >= grace {
                let path = self.retired_pack_path(&id);
                fs::remove_file(&path).at(&path)?;
                report.retired_deleted += 1;
                report.bytes_freed += len;
            } else {
                report.retired_waiting += 1;
                report.bytes_waiting += len;
            }
        }
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
        let retire = |pack: &PackId, len: u64, report: &mut GcReport| {
            self.retire(pack)?;
            report.bytes_retired += len;
            if grace.is_zero() {
                let path = self.retired_pack_path(pack);
                fs::remove_file(&path).at(&path)?;
                report.retired_deleted += 1;
                report.bytes_freed += len;
            } else {
                report.retired_waiting += 1;
                report.bytes_waiting += len;
            }
            Ok::<(), StoreError>(())
        };
        for (pack, len) in self.packs()? {
            let path = self.pack_path(&pack);
            let Some(frames) = live.get(&pack) else {
                retire(&pack, len, &mut report)?;
                report.packs_removed += 1;
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
            retire(&pack, len, &mut report)?;
            report.packs_rewritten += 1;
        }
        for dir in [self.packs_dir(), self.retired_dir()] {
            sync_dir(&dir).at(&dir)?;
        }
        Ok(report)
    }

    /// Moves a pack from `packs/` to `retired/`, stamped with the time of its retirement (its
    /// modification time, set before the move so a crash cannot leave an old stamp behind).
    fn retire(&self, pack: &PackId) -> Result<(), StoreError> {
        let from = self.pack_path(pack);
        let to = self.retired_pack_path(pack);
        let dir = self.retired_dir();
        fs::create_dir_all(&dir).at(&dir)?;
        stamp_now(&from).at(&from)?;
        fs::rename(&from, &to).at(&to)
    }
}

fn stamp_now(path: &Path) -> std::io::Result<()> {
    // Setting times needs ownership, not write access: packs may be read-only.
    File::open(path)?.set_modified(SystemTime::now())
}
