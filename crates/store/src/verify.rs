//! `store verify`: re-hash every chunk every visible image uses, and check every manifest.
//!
//! Each frame is read once, decompressed, and every chunk any manifest places in it is hashed and
//! compared with its id. Damage is reported by chunk and by the images it affects; pack files no
//! manifest refers to (left by an interrupted writer before gc) are listed but are not damage.
//!
//! verify takes no lock, so gc may run beside it: a pack gc retired is read from `retired/`, and a
//! pack that is gone altogether is damage only if a manifest visible after the pass still names
//! it (otherwise a writer changed the store under verify, which is not damage).

use super::pack::{PACK_HEADER_BYTES, PACK_MAGIC};
use super::{Store, StoreError};
use fleetboot_image::{ChunkId, PackId};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// What verify found.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub images_checked: usize,
    pub frames_checked: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// `NAME@N` and why it cannot be exported intact.
    pub damaged_images: BTreeMap<String, Vec<String>>,
    /// Damaged chunk ids and what is wrong with each.
    pub damaged_chunks: BTreeMap<String, String>,
    pub unreferenced_packs: Vec<String>,
}

impl VerifyReport {
    /// True when every image can be exported intact.
    pub fn ok(&self) -> bool {
        self.damaged_images.is_empty() && self.damaged_chunks.is_empty()
    }
}

/// A frame as the manifests describe it.
struct FrameCheck {
    pack: PackId,
    offset: u64,
    stored: u32,
    raw: u32,
    zstd: bool,
    /// chunk offset -> (id, size)
    chunks: BTreeMap<u32, (ChunkId, u32)>,
    /// Images using the frame.
    users: BTreeSet<String>,
}

impl Store {
    /// Checks the whole store; the report says what is damaged.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let mut frames: HashMap<(PackId, u64), FrameCheck> = HashMap::new();
        for v in self.versions()? {
            let label = format!("{}@{}", v.name, v.version);
            report.images_checked += 1;
            let m = match self.load_manifest(&v) {
                Ok(m) => m,
                // Removed (by `image rm`) since the listing: not damage, not checked.
                Err(StoreError::Io { error, .. })
                    if error.kind() == std::io::ErrorKind::NotFound =>
                {
                    report.images_checked -= 1;
                    continue;
                }
                Err(e) => {
                    report
                        .damaged_images
                        .entry(label)
                        .or_default()
                        .push(e.to_string());
                    continue;
                }
            };
            if m.meta.name != v.name || m.meta.version != v.version {
                report
                    .damaged_images
                    .entry(label.clone())
                    .or_default()
                    .push(format!(
                        "manifest describes {}@{}",
                        m.meta.name, m.meta.version
                    ));
            }
            for e in &m.entries {
                let pack = m.packs[e.pack as usize];
                let f = frames
                    .entry((pack, e.frame_offset))
                    .or_insert_with(|| FrameCheck {
                        pack,
                        offset: e.frame_offset,
                        stored: e.frame_stored,
                        raw: e.frame_raw,
                        zstd: e.is_zstd(),
                        chunks: BTreeMap::new(),
                        users: BTreeSet::new(),
                    });
                if (f.stored, f.raw, f.zstd) != (e.frame_stored, e.frame_raw, e.is_zstd()) {
                    report
                        .damaged_images
                        .entry(label.clone())
                        .or_default()
                        .push(format!(
                            "frame at {} of pack {pack} is described differently by another image",
                            e.frame_offset
                        ));
                }
                f.chunks.insert(e.chunk_offset, (e.id, e.size));
                f.users.insert(label.clone());
            }
        }

        let mut packs: HashMap<PackId, u64> = self.packs()?.into_iter().collect();
        let referenced: BTreeSet<PackId> = frames.keys().map(|(p, _)| *p).collect();
        report.unreferenced_packs = packs
            .keys()
            .filter(|p| !referenced.contains(p))
            .map(|p| p.to_string())
            .collect();
        report.unreferenced_packs.sort();
        // Packs gc retired after this pass loaded its manifests are still readable.
        for (id, len, _) in self.retired_packs()? {
            packs.entry(id).or_insert(len);
        }

        let source = self.frames();
        let mut bad_headers = BTreeSet::new();
        let vanished: Mutex<BTreeSet<PackId>> = Mutex::new(BTreeSet::new());
        for p in &referenced {
            let header = source.read(p, 0, PACK_HEADER_BYTES as u32);
            let gone = matches!(&header, Err(e) if e.kind() == std::io::ErrorKind::NotFound);
            if !packs.contains_key(p) || gone {
                // Missing, or deleted by a gc since the listing: decided after the pass.
                vanished
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(*p);
            } else if !header.is_ok_and(|h| h[..8] == PACK_MAGIC) {
                bad_headers.insert(*p);
            }
        }

        let frames: Vec<FrameCheck> = frames.into_values().collect();
        let next = AtomicUsize::new(0);
        let damage: Mutex<Vec<(usize, ChunkId, String)>> = Mutex::new(Vec::new());
        let counts: Mutex<(u64, u64, u64)> = Mutex::new((0, 0, 0));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = frames.get(i) else { break };
                    let bad = |why: String| {
                        let mut d = damage.lock().unwrap_or_else(|p| p.into_inner());
                        for (id, _) in f.chunks.values() {
                            d.push((i, *id, why.clone()));
                        }
                    };
                    let Some(&pack_len) = packs.get(&f.pack) else {
                        bad(format!("pack {} is missing", f.pack));
                        continue;
                    };
                    if bad_headers.contains(&f.pack) {
                        bad(format!("pack {} has a damaged header", f.pack));
                        continue;
                    }
                    if f.offset + u64::from(f.stored) > pack_len {
                        bad(format!(
                            "pack {} ends before the frame at {} (truncated)",
                            f.pack, f.offset
                        ));
                        continue;
                    }
                    let stored = match source.read(&f.pack, f.offset, f.stored) {
                        Ok(stored) => stored,
                        Err(e) => {
                            if e.kind() == std::io::ErrorKind::NotFound {
                                vanished
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(f.pack);
                            }
                            bad(format!("pack {} at {}: {e}", f.pack, f.offset));
                            continue;
                        }
                    };
                    let data = if f.zstd {
                        match zstd::bulk::decompress(&stored, f.raw as usize) {
                            Ok(d) if d.len() == f.raw as usize => d,
                            Ok(_) | Err(_) => {
                                bad(format!(
                                    "frame at {} of pack {} does not decompress",
                                    f.offset, f.pack
                                ));
                                continue;
                            }
                        }
                    } else {
                        stored
                    };
                    let mut chunks = 0;
                    for (&at, &(id, size)) in &f.chunks {
                        let actual = ChunkId::of(&data[at as usize..(at + size) as usize]);
                        chunks += 1;
                        if actual != id {
                            damage.lock().unwrap_or_else(|p| p.into_inner()).push((
                                i,
                                id,
                                format!(
                                    "hashes to {actual} (frame at {} of pack {})",
                                    f.offset, f.pack
                                ),
                            ));
                        }
                    }
                    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                    c.0 += 1;
                    c.1 += chunks;
                    c.2 += u64::from(f.raw);
                });
            }
        });
        let (frames_checked, chunks_checked, bytes_checked) =
            counts.into_inner().unwrap_or_else(|p| p.into_inner());
        report.frames_checked = frames_checked;
        report.chunks_checked = chunks_checked;
        report.bytes_checked = bytes_checked;
        let mut damage = damage.into_inner().unwrap_or_else(|p| p.into_inner());
        let vanished = vanished.into_inner().unwrap_or_else(|p| p.into_inner());
        if !vanished.is_empty() {
            let named_now = self.packs_named_now()?;
            damage.retain(|(i, _, _)| {
                let pack = frames[*i].pack;
                !vanished.contains(&pack) || named_now.contains(&pack)
            });
        }
        for (i, id, why) in damage {
            for user in &frames[i].users {
                report
                    .damaged_images
                    .entry(user.clone())
                    .or_default()
                    .push(format!("chunk {id} is damaged"));
            }
            report.damaged_chunks.insert(id.to_string(), why);
        }
        for reasons in report.damaged_images.values_mut() {
            reasons.sort();
            reasons.dedup();
        }
        Ok(report)
    }
}

impl Store {
    /// Packs that the manifests visible now name (unreadable manifests name none: they are
    /// reported as damaged on their own).
    fn packs_named_now(&self) -> Result<BTreeSet<PackId>, StoreError> {
        let mut named = BTreeSet::new();
        for v in self.versions()? {
            if let Ok(m) = self.load_manifest(&v) {
                named.extend(m.packs.iter().copied());
            }
        }
        Ok(named)
    }
}
