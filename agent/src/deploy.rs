//! One install, start to finish: assignment → descriptive data → chunks already on the disk →
//! fetch, verify, write the rest → sync → read back and check every chunk → cloud-init seed
//! (written, read back, checked) → report.
//!
//! Any failure is reported to the appliance as `failed` with its reason; `done` is sent only
//! after the disk has read back as the image, chunk by chunk, and the seed checked.

use crate::client::Client;
use crate::disk::Disk;
use crate::source::HttpPacks;
use anyhow::{bail, Context, Result};
use fleetboot_image::api::InstallReport;
use fleetboot_image::{restore_with, ChunkId, LocalChunks, Manifest, RestoreOptions};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What to install where.
pub struct Settings {
    pub server: String,
    pub mac: String,
    pub token: Option<String>,
    /// The disk; `None`: the one the assignment's `disk` names (`auto`, a path, a serial, a WWN).
    pub target: Option<PathBuf>,
}

/// Installs the host's assigned image on the target and reports the outcome.
pub fn deploy(s: &Settings) -> Result<InstallReport> {
    let client = Client::new(&s.server, &s.mac, s.token.clone())?;
    crate::console::send_to(&client.server, &client.mac, client.token());
    // A panic must become a `failed` report: as process 1 an unwinding agent is a kernel panic,
    // and the appliance would never hear why.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| install(&client, s)))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            Err(anyhow::anyhow!(
                "the agent failed unexpectedly (panic: {what})"
            ))
        });
    if let Err(e) = &result {
        // In the install's log before the report ends the install (and voids the token).
        crate::console::say(&format!("FAILED: {e:#}"));
        crate::console::send();
        client.failed(&format!("{e:#}"));
    }
    result
}

fn install(client: &Client, s: &Settings) -> Result<InstallReport> {
    let started = Instant::now();
    let a = client.assignment()?;
    let target = match (&s.target, &a.disk_hints) {
        (Some(t), _) => t.clone(),
        (None, Some(hints)) => crate::disk::choose_by_hints(hints, a.size)?,
        (None, None) => crate::disk::choose(&a.disk, a.size)?,
    };
    eprintln!(
        "fleetboot-agent: installing {} ({} bytes) on {}",
        a.image,
        a.size,
        target.display()
    );
    let with_token = !a.presigned;
    let manifest_bytes = client.fetch_as(&a.manifest_url, with_token)?;
    // Tied to the appliance: the file hashes to what the appliance read from its store. Then
    // reading back every chunk proves the disk holds the image; otherwise (an older appliance, or
    // a manifest gc rewrote since) only the whole image's digest, read back, does.
    let manifest_trusted =
        a.manifest_hash.as_deref() == Some(blake3::hash(&manifest_bytes).to_hex().as_str());
    let manifest = Manifest::decode(&manifest_bytes).context("the image's manifest")?;
    if manifest.meta.size != a.size || manifest.meta.digest != a.image.digest {
        bail!(
            "the manifest does not describe the assigned image {}",
            a.image
        );
    }
    let mut disk = Disk::open(&target, a.size)?;
    let old = a
        .installed_manifest_url
        .as_deref()
        .and_then(|url| client.fetch_as(url, with_token).ok())
        .and_then(|bytes| Manifest::decode(&bytes).ok());
    let scan_started = Instant::now();
    // The seed an earlier install added changed the image's partition-table sectors; with the
    // image's own bytes put back, the chunks holding them are reused, not fetched.
    let undo = disk.seed_undo();
    let local = chunks_on_disk(&manifest, old.as_ref(), &disk, &undo)?;
    eprintln!(
        "fleetboot-agent: {} chunks ({} bytes) already on the disk, found in {:.1} s",
        local.chunks.len(),
        local.bytes,
        scan_started.elapsed().as_secs_f64()
    );
    // From here until the image is whole the disk boots nothing (its boot area is written last).
    disk.hold_boot_area(a.size)?;
    let source = HttpPacks::new(&a.packs_url, client.token()).with_presigned(a.pack_urls.clone());
    let total = a.size;
    let last = std::cell::Cell::new(Instant::now() - Duration::from_secs(2));
    let progress = |done: u64| {
        if last.get().elapsed() >= Duration::from_secs(1) || done == total {
            last.set(Instant::now());
            eprintln!(
                "fleetboot-agent: {done} of {total} bytes ({}%)",
                done * 100 / total.max(1)
            );
            client.progress(done, total);
        }
    };
    let report = restore_with(
        &manifest,
        &source,
        &local,
        &mut disk,
        RestoreOptions::default(),
        &progress,
    )
    .context("writing the image")?;
    disk.sync()?;
    disk.release_boot_area()?;
    if disk.zeros_found > 0 {
        eprintln!(
            "fleetboot-agent: {} bytes of zero runs already read as zeros on the disk (left alone)",
            disk.zeros_found
        );
    }
    let read_back = if manifest_trusted {
        disk.verify(&manifest)
            .context("checking the image as written")
            .map(|()| manifest.meta.digest.clone())
    } else {
        eprintln!(
            "fleetboot-agent: the manifest is not the one the appliance read; checking the whole \
             image's digest"
        );
        disk.digest_of(&manifest).and_then(|digest| {
            if digest != a.image.digest {
                bail!(
                    "the disk reads back with BLAKE3 {digest}, not the image's {}",
                    a.image.digest
                );
            }
            Ok(digest)
        })
    };
    let digest = match read_back {
        Ok(digest) => digest,
        Err(e) => {
            // What the disk holds is not the image: it must not boot either.
            if let Err(clear) = disk.clear_boot_area(a.size) {
                eprintln!("fleetboot-agent: {clear:#}");
            }
            return Err(e);
        }
    };
    let seed = match &a.seed {
        None => None,
        Some(docs) => {
            let files = crate::seed::SeedFiles {
                meta_data: docs.meta_data.as_bytes(),
                user_data: docs.user_data.as_bytes(),
                network_config: docs.network_config.as_bytes(),
            };
            let said = match disk.write_seed(a.size, &files)? {
                None => "none: the image has no partition table".to_string(),
                Some(p) => format!(
                    "cidata partition at byte {} ({} bytes){}",
                    p.offset,
                    p.len,
                    if p.moved_backup {
                        "; GPT backup moved to the disk's end"
                    } else {
                        ""
                    }
                ),
            };
            eprintln!("fleetboot-agent: cloud-init seed: {said}");
            Some(said)
        }
    };
    let report = InstallReport {
        image: a.image,
        target: target.display().to_string(),
        digest,
        bytes_fetched: source.fetched.load(Ordering::Relaxed),
        bytes_reused: report.bytes_reused,
        seconds: started.elapsed().as_secs_f64(),
        seed,
    };
    crate::console::say(&format!(
        "{} verified on {}; reporting done",
        report.image, report.target
    ));
    crate::console::send();
    client.done(&report)?;
    Ok(report)
}

/// Chunks of the new image found on the disk, verified, by id.
pub struct Stash {
    chunks: HashMap<ChunkId, Vec<u8>>,
    bytes: u64,
}

impl LocalChunks for Stash {
    fn get(&self, id: &ChunkId) -> Option<&[u8]> {
        self.chunks.get(id).map(Vec::as_slice)
    }
}

/// Reads the chunks the new image needs from where the disk should have them: where the
/// installed image (`old`) put them, or — with no such record — where the new image puts them.
/// `undo` puts back the image's own bytes where a seed changed them. Every chunk is hashed before
/// it is kept, so a disk changed since is never trusted. Held in
/// memory (they will be overwritten), up to half the memory available.
fn chunks_on_disk(
    new: &Manifest,
    old: Option<&Manifest>,
    disk: &Disk,
    undo: &[(u64, Vec<u8>)],
) -> Result<Stash> {
    let needed: HashSet<ChunkId> = new.entries.iter().map(|e| e.id).collect();
    let source = old.unwrap_or(new);
    let mut candidates: Vec<(u64, u64, ChunkId)> = source
        .extents
        .iter()
        .filter_map(|x| {
            x.entry
                .map(|e| (x.offset, x.len, source.entries[e as usize].id))
        })
        .filter(|(_, _, id)| needed.contains(id))
        .collect();
    candidates.sort_by_key(|c| c.0);
    let cap = memory_available().map_or(1 << 30, |m| m / 2);
    let mut stash = Stash {
        chunks: HashMap::new(),
        bytes: 0,
    };
    for (offset, len, id) in candidates {
        if stash.chunks.contains_key(&id) {
            continue;
        }
        if stash.bytes + len > cap {
            eprintln!("fleetboot-agent: memory for reused chunks is full; fetching the rest");
            break;
        }
        // Most of a new disk holds no data yet: a hole is not read, zeros are not hashed (a chunk
        // of zeros, if an image holds one, is fetched instead).
        let undone = undo
            .iter()
            .any(|(at, bytes)| *at < offset + len && offset < at + bytes.len() as u64);
        if !undone && disk.is_hole(offset, len) {
            continue;
        }
        let Ok(mut data) = disk.read_at(offset, len as usize) else {
            continue;
        };
        for (at, bytes) in undo {
            let from = offset.max(*at);
            let to = (offset + len).min(at + bytes.len() as u64);
            if from < to {
                data[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
            }
        }
        if !crate::disk::is_zero(&data) && ChunkId::of(&data) == id {
            stash.bytes += len;
            stash.chunks.insert(id, data);
        }
    }
    Ok(stash)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
