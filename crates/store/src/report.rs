//! Read-only views of the store: `image list`, `store stats` and `image diff`.
//!
//! Stored bytes are attributed to chunks in proportion to their share of the frame that holds
//! them (frames are compressed as a whole), so per-image figures add up to the packs' size.

use super::{ImageRef, Store, StoreError};
use fleetboot_image::{ChunkId, Manifest, PackId};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// One line of `image list`.
#[derive(Debug, Serialize)]
pub struct ImageSummary {
    pub name: String,
    pub versions: Vec<u32>,
    /// Logical size of the latest version.
    pub size: u64,
    /// Stored bytes no other image uses (freed if this image is removed and gc runs).
    pub only_bytes: u64,
    /// Stored bytes this image shares with other images.
    pub shared_bytes: u64,
}

/// `store stats`.
#[derive(Debug, Serialize)]
pub struct StoreStats {
    pub images: usize,
    pub versions: usize,
    /// Sum of the logical sizes of all versions.
    pub logical_bytes: u64,
    /// Of those, bytes that are not zero runs.
    pub data_bytes: u64,
    pub unique_chunks: u64,
    /// Raw bytes of the distinct chunks.
    pub unique_bytes: u64,
    pub pack_files: usize,
    pub pack_bytes: u64,
    pub manifest_bytes: u64,
    /// Id tables of compacted packs (`packs/<id>.ids`), which format 2 manifests name ids by.
    pub id_table_files: usize,
    pub id_table_bytes: u64,
    /// pack_bytes + manifest_bytes + id_table_bytes.
    pub stored_bytes: u64,
    /// Packs gc retired that wait out their grace period (not counted in stored_bytes).
    pub retired_packs: usize,
    pub retired_bytes: u64,
    /// data_bytes / unique_bytes.
    pub dedup_ratio: f64,
    /// unique_bytes / pack_bytes.
    pub compression_ratio: f64,
    /// logical_bytes / stored_bytes.
    pub total_ratio: f64,
}

/// `image diff FROM TO`: what a machine holding FROM must fetch to hold TO.
#[derive(Debug, Serialize)]
pub struct DiffReport {
    pub from: String,
    pub to: String,
    /// Data bytes of TO that FROM does not hold at the same place.
    pub changed_bytes: u64,
    /// Data bytes of TO that FROM already holds at the same place.
    pub reused_bytes: u64,
    /// Data bytes of TO whose chunks FROM holds elsewhere on the disk (copied locally).
    pub moved_bytes: u64,
    /// Frames to fetch, and their stored bytes, when chunks FROM holds anywhere are reused:
    /// what crosses the network.
    pub fetch_frames: u64,
    pub fetch_bytes: u64,
    /// Stored bytes to fetch when only chunks FROM holds at the same place are reused.
    pub in_place_fetch_bytes: u64,
}

type ChunkKey = (PackId, u64, u32);

fn chunk_keys(m: &Manifest) -> impl Iterator<Item = (ChunkKey, u64)> + '_ {
    m.entries.iter().map(|e| {
        let share = u64::from(e.frame_stored) * u64::from(e.size) / u64::from(e.frame_raw.max(1));
        (
            (m.packs[e.pack as usize], e.frame_offset, e.chunk_offset),
            share,
        )
    })
}

impl Store {
    /// One summary per image name.
    pub fn list(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let all = self.all_manifests()?;
        let mut users: HashMap<ChunkKey, (u64, HashSet<&str>)> = HashMap::new();
        for (v, m) in &all {
            for (key, share) in chunk_keys(m) {
                users
                    .entry(key)
                    .or_insert((share, HashSet::new()))
                    .1
                    .insert(&v.name);
            }
        }
        let mut out: BTreeMap<&str, ImageSummary> = BTreeMap::new();
        for (v, m) in &all {
            let s = out.entry(&v.name).or_insert_with(|| ImageSummary {
                name: v.name.clone(),
                versions: Vec::new(),
                size: 0,
                only_bytes: 0,
                shared_bytes: 0,
            });
            s.versions.push(v.version);
            s.size = m.meta.size;
        }
        for (share, names) in users.values() {
            for name in names {
                let s = out.get_mut(name).expect("every user is listed");
                if names.len() == 1 {
                    s.only_bytes += share;
                } else {
                    s.shared_bytes += share;
                }
            }
        }
        Ok(out.into_values().collect())
    }

    /// Whole-store figures.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let all = self.all_manifests()?;
        let packs = self.packs()?;
        let mut unique: HashSet<ChunkId> = HashSet::new();
        let mut unique_bytes = 0;
        let (mut logical_bytes, mut data_bytes, mut manifest_bytes) = (0, 0, 0);
        for (v, m) in &all {
            logical_bytes += m.meta.size;
            data_bytes += m.data_bytes();
            manifest_bytes += v.size;
            for e in &m.entries {
                if unique.insert(e.id) {
                    unique_bytes += u64::from(e.size);
                }
            }
        }
        let pack_bytes: u64 = packs.iter().map(|(_, n)| n).sum();
        let retired = self.retired_packs()?;
        let tables = self.id_table_sizes()?;
        let (id_table_files, id_table_bytes) = (tables.len(), tables.values().sum::<u64>());
        let stored_bytes = pack_bytes + manifest_bytes + id_table_bytes;
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let names: HashSet<&str> = all.iter().map(|(v, _)| v.name.as_str()).collect();
        Ok(StoreStats {
            images: names.len(),
            versions: all.len(),
            logical_bytes,
            data_bytes,
            unique_chunks: unique.len() as u64,
            unique_bytes,
            pack_files: packs.len(),
            pack_bytes,
            manifest_bytes,
            id_table_files,
            id_table_bytes,
            stored_bytes,
            retired_packs: retired.len(),
            retired_bytes: retired.iter().map(|(_, n, _)| n).sum(),
            dedup_ratio: ratio(data_bytes, unique_bytes),
            compression_ratio: ratio(unique_bytes, pack_bytes),
            total_ratio: ratio(logical_bytes, stored_bytes),
        })
    }

    /// What reimaging a machine from `from` to `to` moves, chunk by chunk at each offset — the
    /// same test the agent makes against the disk.
    pub fn diff(&self, from: &ImageRef, to: &ImageRef) -> Result<DiffReport, StoreError> {
        let (fv, fm) = self.manifest(from)?;
        let (tv, tm) = self.manifest(to)?;
        let held: HashMap<u64, ChunkId> = fm
            .extents
            .iter()
            .filter_map(|x| x.entry.map(|e| (x.offset, fm.entries[e as usize].id)))
            .collect();
        let anywhere: HashSet<ChunkId> = fm.entries.iter().map(|e| e.id).collect();
        let mut frames: HashSet<(u32, u64)> = HashSet::new();
        let mut in_place_frames: HashSet<(u32, u64)> = HashSet::new();
        let mut report = DiffReport {
            from: format!("{}@{}", fv.name, fv.version),
            to: format!("{}@{}", tv.name, tv.version),
            changed_bytes: 0,
            reused_bytes: 0,
            moved_bytes: 0,
            fetch_frames: 0,
            fetch_bytes: 0,
            in_place_fetch_bytes: 0,
        };
        for x in &tm.extents {
            let Some(e) = x.entry else { continue };
            let entry = &tm.entries[e as usize];
            if held.get(&x.offset) == Some(&entry.id) {
                report.reused_bytes += x.len;
                continue;
            }
            report.changed_bytes += x.len;
            let frame = (entry.pack, entry.frame_offset);
            if in_place_frames.insert(frame) {
                report.in_place_fetch_bytes += u64::from(entry.frame_stored);
            }
            if anywhere.contains(&entry.id) {
                report.moved_bytes += x.len;
            } else if frames.insert(frame) {
                report.fetch_frames += 1;
                report.fetch_bytes += u64::from(entry.frame_stored);
            }
        }
        Ok(report)
    }
}
