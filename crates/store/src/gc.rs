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
//! `retired/` (in a folder the same file, so open handles and `open_pack` keep working) and a later
//! gc deletes it once the grace period has passed — long enough for any install in flight to
//! finish — unless a manifest names it again by then, in which case it goes back to `packs/`.
//!
//! In an object store shared by several appliances the writers' lock is only local, so an import
//! elsewhere may reuse a pack while gc retires it; the check before deleting (and readers falling
//! back to `retired/`) keep that image whole, provided the import finishes within the grace period.

use super::id_tables::TableCache;
use super::pack::{PackWriter, PACK_HEADER_BYTES};
use super::{IoContext, Store, StoreError};
use fleetboot_image::{ChunkId, PackId};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
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
    /// Retired packs an image named again, put back in use (object stores only: an importer
    /// elsewhere reused their data while gc retired them).
    pub packs_restored: usize,
    /// Retired packs deleted now (their grace period was over).
    pub retired_deleted: usize,
    /// Bytes freed now: retired packs deleted.
    pub bytes_freed: u64,
    /// Id tables left without their pack (by a crash), deleted after the grace period.
    pub id_tables_deleted: usize,
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
        let b = self.backend();
        let mut manifests = self.all_manifests()?;
        // pack -> live frames (offset -> stored length)
        let mut live: HashMap<PackId, BTreeMap<u64, u32>> = HashMap::new();
        for (_, m) in &manifests {
            for e in &m.entries {
                live.entry(m.packs[e.pack as usize])
                    .or_default()
                    .insert(e.frame_offset, e.frame_stored);
            }
        }
        // First what earlier runs retired: the grace period is counted from the retirement.
        let now = SystemTime::now();
        for (id, len, retired_at) in self.retired_packs()? {
            let key = Store::retired_key(&id);
            if live.contains_key(&id) {
                // An importer elsewhere (object stores have no store-wide lock) reused data of
                // this pack while gc retired it: its manifest names it, so it goes back.
                self.restore_pack(&id).at(&b.locate(&key))?;
                report.packs_restored += 1;
                continue;
            }
            let age = now.duration_since(retired_at).unwrap_or_default();
            if age >= grace {
                self.delete_retired_pack(&id).at(&b.locate(&key))?;
                report.retired_deleted += 1;
                report.bytes_freed += len;
            } else {
                report.retired_waiting += 1;
                report.bytes_waiting += len;
            }
        }
        let retire = |pack: &PackId, len: u64, report: &mut GcReport| {
            self.retire_pack(pack)
                .at(&b.locate(&Store::pack_key(pack)))?;
            report.bytes_retired += len;
            if grace.is_zero() {
                self.delete_retired_pack(pack)
                    .at(&b.locate(&Store::retired_key(pack)))?;
                report.retired_deleted += 1;
                report.bytes_freed += len;
            } else {
                report.retired_waiting += 1;
                report.bytes_waiting += len;
            }
            Ok::<(), StoreError>(())
        };
        let source = self.frames();
        let mut tables = TableCache::new();
        for (pack, len) in self.packs()? {
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
            let at = b.locate(&Store::pack_key(&pack));
            let mut new = PackWriter::create(self)?;
            let mut moved: HashMap<u64, u64> = HashMap::new();
            for (&offset, &stored) in frames {
                let buf = source.read(&pack, offset, stored).at(&at)?;
                moved.insert(offset, new.append(&buf).at(self.root())?);
            }
            let new_id = new.finish(self)?;
            // A pack with an id table (compacted) gets one again, so its manifests stay format 2.
            let table_at = b.locate(&Store::id_table_key(&pack));
            if self.read_id_table(&pack).at(&table_at)?.is_some() {
                let mut rows: Vec<(u64, u32, ChunkId)> = manifests
                    .iter()
                    .flat_map(|(_, m)| {
                        let index = m.packs.iter().position(|p| *p == pack);
                        m.entries
                            .iter()
                            .filter(move |e| Some(e.pack as usize) == index)
                            .map(|e| (moved[&e.frame_offset], e.chunk_offset, e.id))
                    })
                    .collect();
                rows.sort();
                rows.dedup_by_key(|r| r.2);
                self.put_id_table(new_id, rows.into_iter().map(|r| r.2).collect())?;
            }
            // Point every manifest that used the old pack at the new one (in memory too: a
            // later rewrite of another pack it names starts from this).
            for (v, m) in manifests.iter_mut() {
                let Some(index) = m.packs.iter().position(|p| *p == pack) else {
                    continue;
                };
                // Removed since the listing (by `image rm` on another appliance sharing an
                // object store): not brought back.
                if b.get(&v.key).at(&v.path)?.is_none() {
                    continue;
                }
                m.packs[index] = new_id;
                for e in m.entries.iter_mut().filter(|e| e.pack as usize == index) {
                    e.frame_offset = moved[&e.frame_offset];
                }
                b.put(&v.key, &self.encode_manifest(m, &mut tables)?)
                    .at(&v.path)?;
                report.manifests_rewritten += 1;
            }
            retire(&pack, len, &mut report)?;
            report.packs_rewritten += 1;
        }
        report.id_tables_deleted = self.delete_orphan_id_tables(grace)?;
        Ok(report)
    }
}
