//! The installed OS's cloud-init seed (NoCloud): a small FAT partition labelled `CIDATA` at the
//! end of the disk holding `meta-data`, `user-data` and `network-config`, which cloud-init finds
//! on every distribution.
//!
//! On a GPT disk the image's backup header sits at the image's end, not the disk's: it moves to
//! the disk's last sector first (as growpart would), then the seed takes the last 4 MiB before
//! the backup entries, so the OS's last partition can still grow into everything between. On an
//! MBR disk it takes a free primary slot at the disk's end. A disk without room is refused with
//! the reason, before anything is written; the partition table is written only after the seed's
//! filesystem, and both GPT copies are checked (CRCs) when read and rewritten whole.
//!
//! The seed is not part of the image: it is rewritten at every install (after the image read
//! back as written), and delta reimages never look at it. What was written is read back
//! from the medium and checked — both GPT copies, the entry, and the files through the FAT
//! filesystem — before the install is reported done. An image without a partition table (a bare
//! filesystem, a test pattern) has no place for a seed: it is skipped, and said so.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Cursor, Write};
use std::os::unix::fs::FileExt;

/// The seed partition's size.
pub const SEED_BYTES: u64 = 4 << 20;
/// Partitions start on 1 MiB boundaries.
const ALIGN_BYTES: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// "Microsoft basic data", the type cloud-init and every OS mount FAT partitions from.
const BASIC_DATA: [u8; 16] = guid("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");

/// The three NoCloud files.
pub struct SeedFiles<'a> {
    pub meta_data: &'a [u8],
    pub user_data: &'a [u8],
    pub network_config: &'a [u8],
}

/// Where the seed went.
#[derive(Debug, PartialEq, Eq)]
pub struct Placed {
    pub offset: u64,
    pub len: u64,
    /// The GPT backup header moved from the image's end to the disk's.
    pub moved_backup: bool,
}

/// What became of the seed.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Written(Placed),
    /// Sector 0 holds no partition table: nothing was written.
    NoPartitionTable,
}

/// Whether sector 0 is an MBR partition table (GPT's protective one included): the boot
/// signature, every entry's status 0x00 or 0x80, at least one entry in use. A FAT or NTFS boot
/// sector has the signature too, but code where the entries would be.
pub fn is_partition_table(mbr: &[u8; 512]) -> bool {
    mbr[510..512] == [0x55, 0xaa]
        && mbr_entries(mbr).all(|e| e[0] == 0 || e[0] == 0x80)
        && mbr_entries(mbr).any(|e| e[4] != 0)
}

/// The MBR's four 16-byte partition entries.
fn mbr_entries(mbr: &[u8; 512]) -> impl Iterator<Item = &[u8]> {
    mbr[446..510].chunks_exact(16)
}

/// Whether the MBR is GPT's protective one (an entry of type 0xEE).
fn is_protective(mbr: &[u8; 512]) -> bool {
    mbr_entries(mbr).any(|e| e[4] == 0xee)
}

/// Writes the seed after an image of `image_len` bytes on a disk of `disk_len`, or says there
/// is no partition table to add it to.
pub fn install(
    disk: &File,
    disk_len: u64,
    image_len: u64,
    files: &SeedFiles<'_>,
) -> Result<Outcome> {
    let mut mbr = [0u8; 512];
    disk.read_exact_at(&mut mbr, 0)
        .context("reading the partition table")?;
    if !is_partition_table(&mbr) {
        return Ok(Outcome::NoPartitionTable);
    }
    write(disk, disk_len, image_len, files).map(Outcome::Written)
}

/// The image's own bytes a seed written by an earlier install replaced, as `(offset, bytes)`,
/// read from the seed partition the disk's table names now. Nothing (never an error) when there
/// is no such seed or it does not read: the bytes are a hint, every chunk built from them is
/// hashed before it is used.
pub fn undo_records(disk: &File, disk_len: u64) -> Vec<(u64, Vec<u8>)> {
    let read = || -> Result<Vec<(u64, Vec<u8>)>> {
        let (start, sectors) = find_seed(disk, disk_len)?;
        if sectors * SECTOR > 4 * SEED_BYTES {
            bail!("the seed partition is larger than any fleetboot writes");
        }
        let mut fat = vec![0u8; (sectors * SECTOR) as usize];
        disk.read_exact_at(&mut fat, start * SECTOR)?;
        let fs = fatfs::FileSystem::new(Cursor::new(fat), fatfs::FsOptions::new())?;
        let mut raw = Vec::new();
        let file = fs.root_dir().open_file(UNDO_FILE)?;
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, UNDO_MAX_BYTES as u64),
            &mut raw,
        )?;
        let mut records = Vec::new();
        let mut rest = raw.as_slice();
        while rest.len() >= 12 {
            let offset = le64(&rest[..8]);
            let len = le32(&rest[8..12]) as usize;
            let bytes = rest.get(12..12 + len).context("a truncated undo record")?;
            records.push((offset, bytes.to_vec()));
            rest = &rest[12 + len..];
        }
        Ok(records)
    };
    read().unwrap_or_default()
}

/// The seed partition the disk's table names (`cidata` on GPT, FAT LBA on MBR): first sector
/// and length in sectors.
fn find_seed(disk: &File, disk_len: u64) -> Result<(u64, u64)> {
    let mut mbr = [0u8; 512];
    disk.read_exact_at(&mut mbr, 0)?;
    if !is_partition_table(&mbr) {
        bail!("no partition table");
    }
    if is_protective(&mbr) {
        let h = read_header(disk, 1)?;
        let table = read_entries(disk, &h)?;
        let name: Vec<u8> = "cidata".encode_utf16().flat_map(u16::to_le_bytes).collect();
        for e in table.chunks_exact(h.entry_size as usize) {
            if e[..16] == BASIC_DATA && e[56..56 + name.len()] == name[..] {
                let (first, last) = (le64(&e[32..40]), le64(&e[40..48]));
                if first <= last && (last + 1) * SECTOR <= disk_len {
                    return Ok((first, last - first + 1));
                }
            }
        }
    } else {
        for e in mbr_entries(&mbr) {
            let (first, count) = (u64::from(le32(&e[8..12])), u64::from(le32(&e[12..16])));
            if e[4] == 0x0c && count == SEED_BYTES / SECTOR && (first + count) * SECTOR <= disk_len
            {
                return Ok((first, count));
            }
        }
    }
    bail!("no seed partition")
}

/// Checks what [`install`] wrote as the medium now holds it: the partition table (on GPT both
/// copies, their checksums, the backup at the disk's last sector) names the seed where it was
/// placed, and its filesystem, labelled CIDATA, holds exactly `files`.
pub fn verify(disk: &File, disk_len: u64, placed: &Placed, files: &SeedFiles<'_>) -> Result<()> {
    let mut mbr = [0u8; 512];
    disk.read_exact_at(&mut mbr, 0)
        .context("reading the partition table back")?;
    let start = placed.offset / SECTOR;
    let sectors = placed.len / SECTOR;
    if is_protective(&mbr) {
        let last_lba = disk_len / SECTOR - 1;
        let primary = read_header(disk, 1)?;
        if primary.u64(32) != last_lba {
            bail!("the GPT's backup header is not at the disk's last sector");
        }
        let table = read_entries(disk, &primary)?;
        if read_entries(disk, &read_header(disk, last_lba)?)? != table {
            bail!("the GPT's backup entries differ from its primary ones");
        }
        let named = table.chunks_exact(primary.entry_size as usize).any(|e| {
            e[..16] == BASIC_DATA
                && le64(&e[32..40]) == start
                && le64(&e[40..48]) == start + sectors - 1
        });
        if !named {
            bail!("the GPT does not name the seed partition where it was written");
        }
    } else if !mbr_entries(&mbr).any(|e| {
        e[4] == 0x0c
            && u64::from(le32(&e[8..12])) == start
            && u64::from(le32(&e[12..16])) == sectors
    }) {
        bail!("the MBR does not name the seed partition where it was written");
    }
    let mut fat = vec![0u8; placed.len as usize];
    disk.read_exact_at(&mut fat, placed.offset)
        .context("reading the seed back")?;
    let fs = fatfs::FileSystem::new(Cursor::new(fat), fatfs::FsOptions::new())
        .context("the seed does not read back as a FAT filesystem")?;
    if fs.volume_label().trim_end() != "CIDATA" {
        bail!("the seed reads back labelled {:?}", fs.volume_label());
    }
    for (name, want) in [
        ("meta-data", files.meta_data),
        ("user-data", files.user_data),
        ("network-config", files.network_config),
    ] {
        let mut got = Vec::new();
        fs.root_dir()
            .open_file(name)
            .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut got))
            .with_context(|| format!("reading {name} back from the seed"))?;
        if got != want {
            bail!("{name} reads back from the seed different from what was written");
        }
    }
    Ok(())
}

/// The seed's record of the image's own bytes it overwrote (the partition-table sectors), so the
/// next install can still reuse the chunks holding them: `[offset u64][len u32][bytes]`…,
/// little-endian.
const UNDO_FILE: &str = "fleetboot-undo";
/// Bounds of what an undo record is trusted to hold.
const UNDO_MAX_BYTES: usize = 1 << 20;

/// A FAT filesystem labelled CIDATA holding the files (and `undo`, if any), `SEED_BYTES` long.
pub fn fat_image(files: &SeedFiles<'_>, undo: &[u8]) -> Result<Vec<u8>> {
    let mut disk = Cursor::new(vec![0u8; SEED_BYTES as usize]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(*b"CIDATA     ")
            .fat_type(fatfs::FatType::Fat12),
    )
    .context("formatting the seed filesystem")?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())
            .context("opening the seed filesystem")?;
        let root = fs.root_dir();
        for (name, data) in [
            ("meta-data", files.meta_data),
            ("user-data", files.user_data),
            ("network-config", files.network_config),
        ] {
            let mut f = root
                .create_file(name)
                .with_context(|| format!("creating {name} in the seed"))?;
            f.write_all(data)
                .with_context(|| format!("writing {name} in the seed"))?;
        }
        if !undo.is_empty() {
            root.create_file(UNDO_FILE)
                .and_then(|mut f| f.write_all(undo))
                .context("writing the undo record in the seed")?;
        }
    }
    Ok(disk.into_inner())
}

/// Writes the seed to `disk` (`disk_len` bytes; the image occupies its first `image_len`).
fn write(disk: &File, disk_len: u64, image_len: u64, files: &SeedFiles<'_>) -> Result<Placed> {
    let mut mbr = [0u8; 512];
    disk.read_exact_at(&mut mbr, 0)
        .context("reading the partition table")?;
    if mbr[510..512] != [0x55, 0xaa] {
        bail!("the image has no partition table: no room for the cloud-init seed");
    }
    let protective = is_protective(&mbr);
    // Every range of the image the table writes below may change, as the image has it.
    let mut changed = vec![(0, SECTOR)];
    if protective {
        let primary = read_header(disk, 1)?;
        let table_len = u64::from(primary.entries) * u64::from(primary.entry_size);
        changed.push((SECTOR, SECTOR));
        changed.push((primary.entries_lba * SECTOR, table_len));
        changed.push((primary.u64(32) * SECTOR, SECTOR));
    }
    let mut undo = Vec::new();
    for (offset, len) in changed {
        let len = len.min(image_len.saturating_sub(offset));
        if len == 0 {
            continue;
        }
        let mut bytes = vec![0u8; len as usize];
        disk.read_exact_at(&mut bytes, offset)
            .context("reading the image's partition table")?;
        undo.extend_from_slice(&offset.to_le_bytes());
        undo.extend_from_slice(&(len as u32).to_le_bytes());
        undo.extend_from_slice(&bytes);
    }
    let fat = fat_image(files, &undo)?;
    if protective {
        let placed = gpt_add(disk, disk_len, image_len, &fat)?;
        // The protective MBR covers the whole disk (as far as 32 bits can say).
        for i in 0..4 {
            let e = &mut mbr[446 + i * 16..462 + i * 16];
            if e[4] == 0xee {
                let sectors = (disk_len / SECTOR - 1).min(u64::from(u32::MAX)) as u32;
                e[12..16].copy_from_slice(&sectors.to_le_bytes());
            }
        }
        disk.write_all_at(&mbr, 0)
            .context("writing the protective MBR")?;
        Ok(placed)
    } else {
        mbr_add(disk, disk_len, &fat, &mut mbr)
    }
}

/// A GPT header as read from the disk.
struct Header {
    raw: [u8; 512],
    size: usize,
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
}

impl Header {
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.raw[at..at + 4].try_into().expect("4 bytes"))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.raw[at..at + 8].try_into().expect("8 bytes"))
    }
    fn set_u32(&mut self, at: usize, v: u32) {
        self.raw[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn set_u64(&mut self, at: usize, v: u64) {
        self.raw[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    /// Recomputes the header's CRC32 over its `size` bytes.
    fn seal(&mut self) {
        self.set_u32(16, 0);
        let crc = crc32(&self.raw[..self.size]);
        self.set_u32(16, crc);
    }
}

fn read_header(disk: &File, lba: u64) -> Result<Header> {
    let mut raw = [0u8; 512];
    disk.read_exact_at(&mut raw, lba * SECTOR)
        .context("reading the GPT header")?;
    let mut h = Header {
        raw,
        size: 0,
        entries_lba: 0,
        entries: 0,
        entry_size: 0,
    };
    if &h.raw[..8] != b"EFI PART" {
        bail!("no GPT header at sector {lba}");
    }
    let size = h.u32(12) as usize;
    if !(92..=512).contains(&size) {
        bail!("the GPT header at sector {lba} has a size of {size}");
    }
    h.size = size;
    let stored = h.u32(16);
    let mut check = h.raw;
    check[16..20].fill(0);
    if crc32(&check[..size]) != stored {
        bail!("the GPT header at sector {lba} fails its checksum");
    }
    h.entries_lba = h.u64(72);
    h.entries = h.u32(80);
    h.entry_size = h.u32(84);
    if h.entry_size < 128 || h.entry_size > 4096 || h.entries == 0 || h.entries > 4096 {
        bail!(
            "the GPT header at sector {lba} describes {} entries of {} bytes",
            h.entries,
            h.entry_size
        );
    }
    Ok(h)
}

/// The entries `h` describes, checked against its CRC.
fn read_entries(disk: &File, h: &Header) -> Result<Vec<u8>> {
    let len = u64::from(h.entries) * u64::from(h.entry_size);
    let mut table = vec![0u8; len as usize];
    disk.read_exact_at(&mut table, h.entries_lba * SECTOR)
        .context("reading the GPT entries")?;
    if crc32(&table) != h.u32(88) {
        bail!("the GPT entries fail their checksum");
    }
    Ok(table)
}

fn gpt_add(disk: &File, disk_len: u64, image_len: u64, fat: &[u8]) -> Result<Placed> {
    let mut primary = read_header(disk, 1)?;
    let mut table = read_entries(disk, &primary)?;
    let table_len = table.len() as u64;
    let last_lba = disk_len / SECTOR - 1;
    let table_sectors = table_len.div_ceil(SECTOR);
    let backup_entries = last_lba - table_sectors;
    let last_usable = backup_entries - 1;
    let mut used_end = 0u64; // first sector past every partition
    let mut free = None;
    for i in 0..primary.entries as usize {
        let e = &table[i * primary.entry_size as usize..][..primary.entry_size as usize];
        if e[..16].iter().all(|&b| b == 0) {
            free = free.or(Some(i));
            continue;
        }
        let (first, last) = (le64(&e[32..40]), le64(&e[40..48]));
        if first > last {
            bail!("GPT entry {} ends before it starts", i + 1);
        }
        used_end = used_end.max(last + 1);
    }
    let Some(slot) = free else {
        bail!("the GPT has no free entry for the cloud-init seed");
    };
    let seed_sectors = fat.len() as u64 / SECTOR;
    let start = seed_start(last_usable + 1, seed_sectors, used_end, disk_len)?;
    // The filesystem first: until the table names it, nothing refers to these sectors.
    disk.write_all_at(fat, start * SECTOR)
        .context("writing the seed filesystem")?;
    let e = &mut table[slot * primary.entry_size as usize..][..primary.entry_size as usize];
    e.fill(0);
    e[..16].copy_from_slice(&BASIC_DATA);
    e[16..32].copy_from_slice(&random_guid());
    e[32..40].copy_from_slice(&start.to_le_bytes());
    e[40..48].copy_from_slice(&(start + seed_sectors - 1).to_le_bytes());
    for (i, unit) in "cidata".encode_utf16().enumerate() {
        e[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
    }
    let entries_crc = crc32(&table);
    let old_backup = primary.u64(32);
    let moved = old_backup != last_lba;
    // Backup first, primary last: the primary is what firmware and kernels trust.
    let mut backup = Header {
        raw: primary.raw,
        size: primary.size,
        entries_lba: backup_entries,
        entries: primary.entries,
        entry_size: primary.entry_size,
    };
    for h in [&mut primary, &mut backup] {
        h.set_u64(48, last_usable);
        h.set_u32(88, entries_crc);
    }
    backup.set_u64(24, last_lba);
    backup.set_u64(32, 1);
    backup.set_u64(72, backup_entries);
    backup.seal();
    disk.write_all_at(&table, backup_entries * SECTOR)
        .context("writing the backup GPT entries")?;
    disk.write_all_at(&backup.raw, last_lba * SECTOR)
        .context("writing the backup GPT header")?;
    primary.set_u64(32, last_lba);
    primary.seal();
    disk.write_all_at(&table, primary.entries_lba * SECTOR)
        .context("writing the GPT entries")?;
    disk.write_all_at(&primary.raw, SECTOR)
        .context("writing the GPT header")?;
    if moved && old_backup < start && old_backup * SECTOR >= image_len.saturating_sub(SECTOR) {
        // The image's old backup header, now in free space: no tool should find it.
        disk.write_all_at(&[0u8; 512], old_backup * SECTOR)
            .context("clearing the old backup GPT header")?;
    }
    Ok(Placed {
        offset: start * SECTOR,
        len: fat.len() as u64,
        moved_backup: moved,
    })
}

fn mbr_add(disk: &File, disk_len: u64, fat: &[u8], mbr: &mut [u8; 512]) -> Result<Placed> {
    let mut used_end = 0u64;
    let mut free = None;
    for i in 0..4 {
        let e = &mbr[446 + i * 16..462 + i * 16];
        if e[4] == 0 {
            free = free.or(Some(i));
            continue;
        }
        let (first, count) = (u64::from(le32(&e[8..12])), u64::from(le32(&e[12..16])));
        used_end = used_end.max(first + count);
    }
    let Some(slot) = free else {
        bail!("the MBR has no free primary slot for the cloud-init seed");
    };
    let sectors = (disk_len / SECTOR).min(u64::from(u32::MAX));
    let seed_sectors = fat.len() as u64 / SECTOR;
    let start = seed_start(sectors, seed_sectors, used_end, disk_len)?;
    disk.write_all_at(fat, start * SECTOR)
        .context("writing the seed filesystem")?;
    let e = &mut mbr[446 + slot * 16..462 + slot * 16];
    e.fill(0);
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: past what CHS can say
    e[4] = 0x0c; // FAT (LBA)
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&(start as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(seed_sectors as u32).to_le_bytes());
    disk.write_all_at(mbr, 0).context("writing the MBR")?;
    Ok(Placed {
        offset: start * SECTOR,
        len: fat.len() as u64,
        moved_backup: false,
    })
}

/// The seed's first sector: aligned, ending at or before `end` (exclusive), and past `used_end`
/// (every partition's end); a disk without that room is refused.
fn seed_start(end: u64, seed_sectors: u64, used_end: u64, disk_len: u64) -> Result<u64> {
    let start = end
        .checked_sub(seed_sectors)
        .map(|s| s * SECTOR / ALIGN_BYTES * ALIGN_BYTES / SECTOR)
        .filter(|&s| s >= used_end);
    start.with_context(|| {
        format!(
            "no room for the cloud-init seed: the disk ({disk_len} bytes) has no free {} MiB \
             after the image's partitions",
            SEED_BYTES >> 20
        )
    })
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// CRC-32 (IEEE, reflected), as GPT uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A GUID from its text form, in GPT's byte order (the first three fields little-endian).
const fn guid(s: &str) -> [u8; 16] {
    let b = s.as_bytes();
    // Positions of the 16 bytes' high nibbles in the text, in GPT byte order.
    const AT: [usize; 16] = [6, 4, 2, 0, 11, 9, 16, 14, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = hex(b[AT[i]]) << 4 | hex(b[AT[i] + 1]);
        i += 1;
    }
    out
}

const fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// A random (version 4) GUID for the new partition.
fn random_guid() -> [u8; 16] {
    let mut g = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|f| f.read_exact_at(&mut g, 0))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        g.copy_from_slice(&t.to_le_bytes());
    }
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn files() -> SeedFiles<'static> {
        SeedFiles {
            meta_data: b"{\"instance-id\": \"fleetboot-1\", \"local-hostname\": \"web-01\"}\n",
            user_data: b"#cloud-config\nruncmd: [[touch, /x]]\n",
            network_config: b"{\"version\": 2}\n",
        }
    }

    fn tools_present() -> bool {
        let present = ["sfdisk", "mtype"]
            .iter()
            .all(|t| Command::new(t).arg("--version").output().is_ok());
        if !present {
            eprintln!("SKIP: sfdisk and mtools are needed (cargo xtask setup installs them)");
        }
        present
    }

    fn open_rw(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    /// An image of 64 MiB partitioned by sfdisk (`label` gpt or dos, one partition filling it),
    /// on a 256 MiB disk file.
    fn disk(label: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        let mut sfdisk = Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel"])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        sfdisk
            .stdin
            .take()
            .unwrap()
            .write_all(format!("label: {label}\n,,L\n").as_bytes())
            .unwrap();
        assert!(sfdisk.wait().unwrap().success());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        (dir, path)
    }

    /// `mtype` reads a file from the FAT filesystem at `offset` of `image`.
    fn mtype(image: &std::path::Path, offset: u64, name: &str) -> String {
        let out = Command::new("mtype")
            .arg("-i")
            .arg(format!("{}@@{offset}", image.display()))
            .arg(format!("::{name}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn gpt_backup_moves_to_the_disk_end_and_the_seed_takes_its_last_mib() {
        if !tools_present() {
            return;
        }
        let (_dir, path) = disk("gpt");
        let f = open_rw(&path);
        let placed = write(&f, 256 << 20, 64 << 20, &files()).unwrap();
        assert!(placed.moved_backup);
        assert_eq!(
            placed.offset + placed.len,
            (256 << 20) - (1 << 20),
            "last aligned MiB"
        );
        // sfdisk sees a clean GPT whose backup is at the disk's end, and the seed partition.
        let verify = Command::new("sfdisk")
            .arg("--verify")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&verify.stdout).to_string()
            + &String::from_utf8_lossy(&verify.stderr);
        assert!(
            verify.status.success()
                && text.contains("No errors detected")
                && !text.contains("mismatch"),
            "{text}"
        );
        let json = Command::new("sfdisk")
            .arg("--json")
            .arg(&path)
            .output()
            .unwrap();
        let table: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        let parts = table["partitiontable"]["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1]["name"], "cidata");
        assert_eq!(parts[1]["start"], placed.offset / 512);
        assert_eq!(
            table["partitiontable"]["lastlba"],
            (256u64 << 20) / 512 - 34
        );
        assert_eq!(
            mtype(&path, placed.offset, "user-data"),
            "#cloud-config\nruncmd: [[touch, /x]]\n"
        );
        assert!(mtype(&path, placed.offset, "meta-data").contains("web-01"));
        let label = Command::new("mlabel")
            .args(["-s", "-i"])
            .arg(format!("{}@@{}", path.display(), placed.offset))
            .arg("::")
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&label.stdout).contains("CIDATA"));
    }

    #[test]
    fn mbr_takes_a_free_slot_and_a_full_disk_is_refused_untouched() {
        if !tools_present() {
            return;
        }
        let (_dir, path) = disk("dos");
        let f = open_rw(&path);
        let placed = write(&f, 256 << 20, 64 << 20, &files()).unwrap();
        let json = Command::new("sfdisk")
            .arg("--json")
            .arg(&path)
            .output()
            .unwrap();
        let table: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        let parts = table["partitiontable"]["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1]["start"], placed.offset / 512);
        assert_eq!(
            mtype(&path, placed.offset, "network-config"),
            "{\"version\": 2}\n"
        );

        // A disk the image fills: refused, and not one byte changed.
        let (_dir2, full) = disk("gpt");
        let f = open_rw(&full);
        f.set_len(64 << 20).unwrap();
        let before = std::fs::read(&full).unwrap();
        let err = write(&f, 64 << 20, 64 << 20, &files())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no room"), "{err}");
        assert_eq!(std::fs::read(&full).unwrap(), before);
    }

    #[test]
    fn what_is_written_is_checked_and_a_bare_filesystem_gets_no_seed() {
        if !tools_present() {
            return;
        }
        let (_dir, path) = disk("gpt");
        let f = open_rw(&path);
        let Outcome::Written(placed) = install(&f, 256 << 20, 64 << 20, &files()).unwrap() else {
            panic!("a GPT disk takes the seed");
        };
        verify(&f, 256 << 20, &placed, &files()).unwrap();
        // Other files than were meant: refused.
        let other = SeedFiles {
            user_data: b"#cloud-config\n{}\n",
            ..files()
        };
        let err = verify(&f, 256 << 20, &placed, &other).unwrap_err();
        assert!(err.to_string().contains("user-data"), "{err:#}");
        // A damaged backup table: refused.
        let last = (256u64 << 20) / 512 - 1;
        f.write_all_at(&[0xff; 4], (last - 32) * 512).unwrap();
        let err = verify(&f, 256 << 20, &placed, &files()).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err:#}");

        // A filesystem written to the whole disk has a boot signature but no table.
        let fat = fat_image(&files(), &[]).unwrap();
        let sector: [u8; 512] = fat[..512].try_into().unwrap();
        assert_eq!(&sector[510..], &[0x55, 0xaa]);
        assert!(!is_partition_table(&sector));
        let bare = tempfile::NamedTempFile::new().unwrap();
        bare.as_file().write_all_at(&fat, 0).unwrap();
        bare.as_file().set_len(16 << 20).unwrap();
        assert_eq!(
            install(bare.as_file(), 16 << 20, fat.len() as u64, &files()).unwrap(),
            Outcome::NoPartitionTable
        );
        assert_eq!(std::fs::read(bare.path()).unwrap()[..fat.len()], fat[..]);
    }

    #[test]
    fn crc_and_guid_match_their_definitions() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(
            guid("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
            [
                0xa2, 0xa0, 0xd0, 0xeb, 0xe5, 0xb9, 0x33, 0x44, 0x87, 0xc0, 0x68, 0xb6, 0xb7, 0x26,
                0x99, 0xc7
            ]
        );
    }
}
