//! The disk being written: a block device (or, on a host, a regular file), with the cheapest way
//! to make a range read back as zeros (BLKZEROOUT on a device, a punched hole in a file), reads
//! for the delta, and the read-back check of what ended up on it.

use anyhow::{bail, Context, Result};
use fleetboot_image::Target;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
nix::ioctl_none!(blkrrpart, 0x12, 95);

/// A disk as /sys describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Kernel name (`vda`, `nvme0n1`).
    pub name: String,
    pub bytes: u64,
    pub removable: bool,
    /// Serial numbers and WWNs the kernel reports, trimmed.
    pub ids: Vec<String>,
}

/// Finds the disk `spec` names: `auto` (the one non-removable disk, which must hold `size`
/// bytes), a path (which must be an existing block device), or a serial number or WWN as /sys
/// reports them, matched exactly.
pub fn choose(spec: &str, size: u64) -> Result<PathBuf> {
    if spec.starts_with('/') {
        let meta = std::fs::metadata(spec)
            .with_context(|| format!("disk {spec} does not exist (no such block device)"))?;
        if !meta.file_type().is_block_device() {
            bail!("disk {spec} is not a block device");
        }
        return Ok(PathBuf::from(spec));
    }
    let name = pick(spec, size, &scan()?)?;
    Ok(PathBuf::from(format!("/dev/{name}")))
}

/// The one disk the root device hints pick, which must hold `size` bytes.
pub fn choose_by_hints(hints: &fleetboot_image::hints::DiskHints, size: u64) -> Result<PathBuf> {
    let disks = crate::inventory::disks(std::path::Path::new("/"));
    let disk = hints.pick(&disks).map_err(anyhow::Error::msg)?;
    if disk.size_bytes < size {
        bail!(
            "the disk the hints pick, {} ({} bytes), is smaller than the image ({size} bytes)",
            disk.name,
            disk.size_bytes
        );
    }
    Ok(PathBuf::from(format!("/dev/{}", disk.name)))
}

/// The machine's disks, as the inventory lists them (loop, RAM, optical, floppy, md, dm and nbd
/// devices are not install targets).
fn scan() -> Result<Vec<DiskInfo>> {
    let disks = crate::inventory::disks(std::path::Path::new("/"));
    if disks.is_empty() && std::fs::read_dir("/sys/block").is_err() {
        bail!("cannot list /sys/block");
    }
    Ok(disks
        .into_iter()
        .map(|d| DiskInfo {
            bytes: d.size_bytes,
            removable: d.removable,
            ids: [d.serial, d.wwn].into_iter().flatten().collect(),
            name: d.name,
        })
        .collect())
}

/// The disk `spec` names among `disks`. Ambiguity is decided before size: with two candidates
/// for `auto`, a small internal disk must not make the other (a USB stick claiming to be fixed,
/// a SAN LUN) the silent choice.
pub fn pick(spec: &str, size: u64, disks: &[DiskInfo]) -> Result<String> {
    let listing = || {
        disks
            .iter()
            .map(|d| {
                format!(
                    "{} ({} bytes{})",
                    d.name,
                    d.bytes,
                    if d.removable { ", removable" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let candidates: Vec<&DiskInfo> = if spec == "auto" {
        disks.iter().filter(|d| !d.removable).collect()
    } else {
        disks
            .iter()
            .filter(|d| d.ids.iter().any(|id| id == spec))
            .collect()
    };
    let disk = match candidates.as_slice() {
        [one] => *one,
        [] if spec == "auto" => bail!(
            "no disk matching auto: no non-removable disk (found: {})",
            listing()
        ),
        [] => bail!("no disk with serial or WWN {spec:?} (found: {})", listing()),
        _ => bail!(
            "several disks match {spec:?} ({}): name one with `disk:` in the configuration",
            candidates
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if disk.bytes < size {
        bail!(
            "disk {} holds {} bytes; the image needs {size}: refusing a disk too small",
            disk.name,
            disk.bytes
        );
    }
    Ok(disk.name.clone())
}

/// An open target.
pub struct Disk {
    pub path: PathBuf,
    file: File,
    is_device: bool,
    /// Bytes of zero runs the device already read as zeros (left alone).
    pub zeros_found: u64,
    /// Those ranges, in order: the read-back reads them again (a device that trims without
    /// guaranteeing zeros may not keep them), where BLKZEROOUT's ranges are taken as zeros.
    left_alone: Vec<(u64, u64)>,
    scratch: Vec<u8>,
    /// The image's first bytes while [`Disk::hold_boot_area`] holds them back.
    held: Option<Vec<u8>>,
}

/// Bytes at the start of the disk held back while an image is written: the boot code, the MBR
/// or a GPT's protective MBR and its primary table.
pub const BOOT_AREA: u64 = 1 << 20;

/// Bytes read at a time when checking whether a range already reads as zeros.
const ZERO_CHECK_BYTES: usize = 1 << 20;

impl Disk {
    /// Opens `path` to hold an image of `size` bytes: an existing block device at least that big,
    /// or a regular file (created or grown as needed). Anything else is refused — a mistyped
    /// device name must not end up as a file in a tmpfs under /dev.
    pub fn open(path: &Path, size: u64) -> Result<Disk> {
        let meta = std::fs::metadata(path);
        let is_device = meta.as_ref().is_ok_and(|m| m.file_type().is_block_device());
        if let Ok(m) = &meta {
            if !is_device && !m.is_file() {
                bail!(
                    "{} is neither a block device nor a regular file",
                    path.display()
                );
            }
        } else if path.starts_with("/dev") {
            bail!("no disk {} (not a block device)", path.display());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!is_device)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut disk = Disk {
            path: path.to_path_buf(),
            file,
            is_device,
            zeros_found: 0,
            left_alone: Vec::new(),
            scratch: Vec::new(),
            held: None,
        };
        let capacity = disk.capacity()?;
        if is_device && capacity < size {
            bail!(
                "disk {} holds {capacity} bytes; the image needs {size}: refusing a disk too small",
                path.display()
            );
        }
        if !is_device && capacity < size {
            disk.file
                .set_len(size)
                .with_context(|| format!("cannot grow {}", path.display()))?;
        }
        Ok(disk)
    }

    pub fn capacity(&mut self) -> Result<u64> {
        self.file
            .seek(SeekFrom::End(0))
            .with_context(|| format!("cannot find the size of {}", self.path.display()))
    }

    /// Makes the disk unbootable until the image is whole: its first [`BOOT_AREA`] bytes (boot
    /// code, MBR or protective MBR, primary GPT) are zeroed now, and the image's own are kept in
    /// memory until [`Disk::release_boot_area`] writes them, last. An install cut short at any
    /// point leaves a disk no firmware boots (it goes on to its next boot entry), never a partly
    /// written one that looks whole. Call it after the chunks already on the disk were read.
    pub fn hold_boot_area(&mut self, image_size: u64) -> Result<()> {
        self.clear_boot_area(image_size)?;
        self.held = Some(vec![0u8; BOOT_AREA.min(image_size) as usize]);
        Ok(())
    }

    /// Zeroes the disk's boot area (up to `image_size` bytes of it) and syncs: the disk boots
    /// nothing. Also for an image that did not read back as written.
    pub fn clear_boot_area(&mut self, image_size: u64) -> Result<()> {
        let len = BOOT_AREA.min(image_size) as usize;
        self.file
            .write_all_at(&vec![0u8; len], 0)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("cannot clear the boot area of {}", self.path.display()))
    }

    /// Writes the held boot area, once everything else is written, and syncs.
    pub fn release_boot_area(&mut self) -> Result<()> {
        if let Some(held) = self.held.take() {
            self.file.write_all_at(&held, 0).with_context(|| {
                format!("cannot write the boot area of {}", self.path.display())
            })?;
            self.sync()?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Drops the (clean, just synced) cached pages of the target, so the read-back reads
    /// what the disk holds, not what the page cache remembers of the writes.
    fn drop_cache(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        self.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", self.path.display()))?;
        // SAFETY: an advisory call on a descriptor we own; offset 0, length 0 = the whole file.
        let r =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            bail!(
                "cannot drop the cached pages of {}: {}",
                self.path.display(),
                io::Error::from_raw_os_error(r)
            );
        }
        Ok(())
    }

    /// Writes cloud-init's seed after the image (`image_len` bytes), then reads it back from
    /// the medium and checks it. `None`: the image has no partition table to add it to.
    pub fn write_seed(
        &mut self,
        image_len: u64,
        files: &crate::seed::SeedFiles<'_>,
    ) -> Result<Option<crate::seed::Placed>> {
        use crate::seed::{self, Outcome};
        let disk_len = self.capacity()?;
        let placed = match seed::install(&self.file, disk_len, image_len, files)
            .context("writing the cloud-init seed")?
        {
            Outcome::NoPartitionTable => return Ok(None),
            Outcome::Written(placed) => placed,
        };
        self.drop_cache()?;
        seed::verify(&self.file, disk_len, &placed, files)
            .context("checking the cloud-init seed as written")?;
        self.sync()?;
        Ok(Some(placed))
    }

    /// The image bytes an earlier install's seed replaced (see [`crate::seed::undo_records`]).
    pub fn seed_undo(&mut self) -> Vec<(u64, Vec<u8>)> {
        match self.capacity() {
            Ok(len) => crate::seed::undo_records(&self.file, len),
            Err(_) => Vec::new(),
        }
    }

    /// Flushes everything to the medium and, on a device, has the kernel re-read its partition
    /// table (the new image brings its own).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", self.path.display()))?;
        if self.is_device {
            use std::os::fd::AsRawFd;
            // SAFETY: BLKRRPART takes no argument. A busy or partitionless device refuses it,
            // which does not make the written image wrong: say so and go on.
            if let Err(e) = unsafe { blkrrpart(self.file.as_raw_fd()) } {
                eprintln!(
                    "fleetboot-agent: {} keeps its old partition table until reboot ({e})",
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    /// Checks that the image reads back from the medium as the manifest describes it, byte for
    /// byte (the manifest must be the image's: its file hashed to what the appliance read, the
    /// assignment's `manifest_hash`; otherwise [`Disk::digest_of`]): every data extent read and
    /// hashed to its chunk's id; the zero runs left alone because they read as zeros read again
    /// and checked to be zeros; the other zero runs — made zero by BLKZEROOUT or a punched hole,
    /// which guarantee it — not read. The manifest's map is
    /// contiguous over the whole image (its decoder checks), so this covers every byte.
    ///
    /// Hashing the whole image instead (its BLAKE3) proves no more about the disk but hashes
    /// every zero too: BLAKE3 mixes each 1 KiB chunk's position into its hash, so a zero run's
    /// hash cannot be reused. For the 2 GiB Debian image holding 285 MB that was 7 × the work,
    /// and for a 100 GiB disk image it is minutes. Two threads, each with half the data.
    pub fn verify(&self, manifest: &fleetboot_image::Manifest) -> Result<()> {
        self.drop_cache()?;
        // What each extent costs to check: its data, or the part of a zero run left alone
        // (on a new device, most of the image).
        let read = |x: &fleetboot_image::Extent| match x.entry {
            Some(_) => x.len,
            None => self
                .left_alone_within(x.offset, x.offset + x.len)
                .map(|(from, to)| to - from)
                .sum(),
        };
        let total: u64 = manifest.extents.iter().map(read).sum();
        let mut seen = 0;
        let split = manifest
            .extents
            .iter()
            .position(|x| {
                seen += read(x);
                seen > total / 2
            })
            .unwrap_or(manifest.extents.len());
        let (first, second) = manifest.extents.split_at(split);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| self.check_extents(manifest, first));
            let b = self.check_extents(manifest, second);
            (a.join().expect("read-back thread"), b)
        });
        a.and(b)
    }

    /// Reads back `extents` of the image and checks them (see [`Disk::verify`]).
    fn check_extents(
        &self,
        manifest: &fleetboot_image::Manifest,
        extents: &[fleetboot_image::Extent],
    ) -> Result<()> {
        const READ_BYTES: u64 = 4 << 20;
        let mut buf = Vec::new();
        let mut i = 0;
        while i < extents.len() {
            let x = &extents[i];
            if x.entry.is_none() {
                self.check_zeros(x.offset, x.offset + x.len, &mut buf)?;
                i += 1;
                continue;
            }
            // A run of data extents read at once, then each hashed.
            let mut end = i + 1;
            while end < extents.len()
                && extents[end].entry.is_some()
                && extents[end].offset + extents[end].len - x.offset <= READ_BYTES
            {
                end += 1;
            }
            let last = &extents[end - 1];
            let len = (last.offset + last.len - x.offset) as usize;
            buf.resize(len, 0);
            self.file
                .read_exact_at(&mut buf[..len], x.offset)
                .with_context(|| format!("cannot read back {}", self.path.display()))?;
            for y in &extents[i..end] {
                let at = (y.offset - x.offset) as usize;
                let id = manifest.entries[y.entry.unwrap_or_default() as usize].id;
                if fleetboot_image::ChunkId::of(&buf[at..at + y.len as usize]) != id {
                    bail!(
                        "{} does not read back as the image: bytes {}..{} are not chunk {id}",
                        self.path.display(),
                        y.offset,
                        y.offset + y.len
                    );
                }
            }
            i = end;
        }
        Ok(())
    }

    /// Checks that the left-alone parts of the zero run `lo .. hi` still read as zeros.
    fn check_zeros(&self, lo: u64, hi: u64, buf: &mut Vec<u8>) -> Result<()> {
        for (from, to) in self.left_alone_within(lo, hi) {
            if !zeros_at(&self.file, buf, from, to - from)
                .with_context(|| format!("cannot read back {}", self.path.display()))?
            {
                bail!(
                    "{} does not read back as the image: bytes {from}..{to} should read as zeros",
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    /// BLAKE3 of the whole image as it reads back now, for a manifest the agent cannot tie to
    /// the appliance (see [`Disk::verify`]): its data extents read from the disk, its zero
    /// runs — made zero by BLKZEROOUT or a punched hole, which guarantee it — hashed as zeros
    /// without reading them (reading 2 GiB of holes took 4 s), except the ranges left alone
    /// because they read as zeros, which are read again. Two threads, one per half of the
    /// BLAKE3 tree.
    pub fn digest_of(&self, manifest: &fleetboot_image::Manifest) -> Result<String> {
        use blake3::hazmat::{left_subtree_len, merge_subtrees_root, HasherExt, Mode};
        self.drop_cache()?;
        let size = manifest.meta.size;
        if size <= blake3::CHUNK_LEN as u64 {
            return Ok(self
                .hash_range(manifest, 0, size)?
                .finalize()
                .to_hex()
                .to_string());
        }
        let split = left_subtree_len(size);
        let (left, right) = std::thread::scope(|s| {
            let left = s.spawn(|| self.hash_range(manifest, 0, split));
            let right = self.hash_range(manifest, split, size);
            (left.join().expect("digest thread"), right)
        });
        let (left, right) = (left?, right?);
        Ok(merge_subtrees_root(
            &left.finalize_non_root(),
            &right.finalize_non_root(),
            Mode::Hash,
        )
        .to_hex()
        .to_string())
    }

    /// Hashes `lo .. hi` of the image (a BLAKE3 subtree when `lo` > 0).
    fn hash_range(
        &self,
        manifest: &fleetboot_image::Manifest,
        lo: u64,
        hi: u64,
    ) -> io::Result<blake3::Hasher> {
        use blake3::hazmat::HasherExt;
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        const READ_BYTES: u64 = 4 << 20;
        let mut hasher = blake3::Hasher::new();
        if lo > 0 {
            hasher.set_input_offset(lo);
        }
        let mut buf = vec![0u8; READ_BYTES as usize];
        for x in &manifest.extents {
            let (start, end) = (x.offset.max(lo), (x.offset + x.len).min(hi));
            if start >= end {
                continue;
            }
            let mut at = start;
            while at < end {
                let read = x.entry.is_some() || self.was_left_alone(at);
                let n = (end - at).min(if read { READ_BYTES } else { ZEROS.len() as u64 });
                // A piece is all read or all taken as zeros.
                let n = self.next_boundary(at).map_or(n, |b| n.min(b - at)) as usize;
                if read {
                    self.file.read_exact_at(&mut buf[..n], at)?;
                    hasher.update(&buf[..n]);
                } else {
                    hasher.update(&ZEROS[..n]);
                }
                at += n as u64;
            }
        }
        Ok(hasher)
    }

    /// Whether `offset .. offset + len` of a file lies in a hole (reads as zeros without being
    /// stored). A device, or a filesystem that cannot say: false.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        use nix::unistd::{lseek, Whence};
        if self.is_device {
            return false;
        }
        match lseek(&self.file, offset as i64, Whence::SeekData) {
            Ok(data) => data as u64 >= offset + len,
            // ENXIO: no data after `offset` at all.
            Err(nix::errno::Errno::ENXIO) => true,
            Err(_) => false,
        }
    }
}

/// Whether `offset .. offset + len` of `file` reads as zeros, read through `buf` in steps of
/// [`ZERO_CHECK_BYTES`] (stops at the first other byte).
fn zeros_at(file: &File, buf: &mut Vec<u8>, offset: u64, len: u64) -> io::Result<bool> {
    buf.resize(ZERO_CHECK_BYTES, 0);
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(ZERO_CHECK_BYTES as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        if !is_zero(&buf[..n]) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Whether every byte of `data` is zero (a loop the compiler vectorises).
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(64);
    let whole = words
        .by_ref()
        .all(|w| w.iter().fold(0, |acc, &b| acc | b) == 0);
    whole && words.remainder().iter().all(|&b| b == 0)
}

impl Disk {
    /// Whether `at` lies in a range left alone because it read as zeros.
    fn was_left_alone(&self, at: u64) -> bool {
        let i = self.left_alone.partition_point(|r| r.1 <= at);
        self.left_alone.get(i).is_some_and(|r| r.0 <= at)
    }

    /// The parts of `lo .. hi` in ranges left alone, in order.
    fn left_alone_within(&self, lo: u64, hi: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self.left_alone.partition_point(|r| r.1 <= lo);
        self.left_alone[first..]
            .iter()
            .take_while(move |r| r.0 < hi)
            .map(move |r| (r.0.max(lo), r.1.min(hi)))
    }

    /// The first start or end of a left-alone range after `at`.
    fn next_boundary(&self, at: u64) -> Option<u64> {
        let i = self.left_alone.partition_point(|r| r.1 <= at);
        let r = self.left_alone.get(i)?;
        Some(if r.0 > at { r.0 } else { r.1 })
    }

    /// Whether `offset .. offset + len` reads as zeros now (stops at the first other byte).
    fn reads_as_zeros(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        zeros_at(&self.file, &mut self.scratch, offset, len)
    }
}

impl Target for Disk {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if let Some(held) = &mut self.held {
            let end = held.len() as u64;
            if offset < end {
                // The part in the boot area waits in memory; the rest goes to the disk.
                let n = ((end - offset) as usize).min(data.len());
                held[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
                if n == data.len() {
                    return Ok(());
                }
                return self.file.write_all_at(&data[n..], end);
            }
        }
        self.file.write_all_at(data, offset)
    }

    /// A range the device already reads as zeros is left alone: reading is cheaper than
    /// writing zeros, and on a new or trimmed disk most of it does (the restore asks in bounded
    /// steps, so a check stops early on a disk that holds data). Otherwise BLKZEROOUT (a punched
    /// hole in a file), or zeros written when neither is available.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // In a held boot area the zeros wait in memory (the disk's are zero already).
        let (offset, len) = match &mut self.held {
            Some(held) if offset < held.len() as u64 => {
                let end = held.len() as u64;
                let stop = (offset + len).min(end);
                held[offset as usize..stop as usize].fill(0);
                if offset + len <= end {
                    return Ok(());
                }
                (end, offset + len - end)
            }
            _ => (offset, len),
        };
        // A read error here is no reason to fail: BLKZEROOUT may well mend those sectors.
        if self.is_device && self.reads_as_zeros(offset, len).unwrap_or(false) {
            self.zeros_found += len;
            match self.left_alone.last_mut() {
                Some(last) if last.1 == offset => last.1 = offset + len,
                _ => self.left_alone.push((offset, offset + len)),
            }
            return Ok(());
        }
        let done = if self.is_device {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads a [u64; 2] (start, length) we own for the call.
            unsafe { blkzeroout(self.file.as_raw_fd(), &range) }.is_ok()
        } else {
            use nix::fcntl::{fallocate, FallocateFlags};
            fallocate(
                &self.file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .is_ok()
        };
        if done {
            return Ok(());
        }
        // The device or filesystem cannot do it for us: write the zeros.
        let zeros = vec![0u8; (1 << 20).min(len as usize)];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While the boot area is held, the disk's first MiB reads as zeros whatever is written
    /// there — an old boot sector is gone at once, the new one waits — and the release writes
    /// it, with writes and zeros that cross its end split between memory and disk.
    #[test]
    fn the_boot_area_is_cleared_first_and_written_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let size = 3 * BOOT_AREA;
        let mut old = vec![0x11u8; size as usize];
        old[510..512].copy_from_slice(&[0x55, 0xaa]);
        std::fs::write(&path, &old).unwrap();
        let mut disk = Disk::open(&path, size).unwrap();
        disk.hold_boot_area(size).unwrap();
        let on_disk = |from: u64, len: usize| disk_bytes(&path, from, len);
        assert!(on_disk(0, BOOT_AREA as usize).iter().all(|&b| b == 0));

        let mut image = vec![0u8; size as usize];
        image[..512].fill(0xb0);
        image[510..512].copy_from_slice(&[0x55, 0xaa]);
        disk.write_at(0, &image[..512]).unwrap();
        // A write across the boot area's end: its head waits, its tail is on the disk now.
        let across = BOOT_AREA - 100;
        image[across as usize..across as usize + 300].fill(0xc3);
        disk.write_at(across, &image[across as usize..across as usize + 300])
            .unwrap();
        // Zeros across it too (the old 0x11 bytes beyond the end must go).
        let zeros_at = BOOT_AREA - 4096;
        disk.zero(zeros_at + 512, 8192).unwrap();
        image[(zeros_at + 512) as usize..(zeros_at + 512 + 8192) as usize].fill(0);
        let written = (zeros_at + 512 + 8192) as usize;
        let held = on_disk(0, BOOT_AREA as usize);
        assert!(held.iter().all(|&b| b == 0), "held");
        let tail = on_disk(BOOT_AREA, written - BOOT_AREA as usize);
        assert!(
            tail == image[BOOT_AREA as usize..written],
            "the tails are on the disk"
        );
        assert_eq!(on_disk(written as u64, 1), [0x11], "untouched beyond");

        disk.release_boot_area().unwrap();
        assert!(on_disk(0, written) == image[..written], "released");
        // Released: writes go straight to the disk again.
        disk.write_at(0, &[9u8; 4]).unwrap();
        assert_eq!(on_disk(0, 4), [9u8; 4]);
    }

    fn disk_bytes(path: &Path, from: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, from)
            .unwrap();
        buf
    }

    /// A manifest of `pieces` (data, or `None` for a zero run of that many bytes) and the
    /// image's bytes. Packs and frames are not needed to check a read-back.
    fn manifest_of(pieces: &[(Option<Vec<u8>>, u64)]) -> (fleetboot_image::Manifest, Vec<u8>) {
        use fleetboot_image::{ChunkId, Entry, Extent, Manifest, Metadata};
        let (mut entries, mut extents, mut image) = (Vec::new(), Vec::new(), Vec::new());
        for (data, len) in pieces {
            let offset = image.len() as u64;
            let entry = data.as_ref().map(|d| {
                entries.push(Entry {
                    id: ChunkId::of(d),
                    pack: 0,
                    flags: 0,
                    frame_offset: 0,
                    frame_stored: d.len() as u32,
                    frame_raw: d.len() as u32,
                    chunk_offset: 0,
                    size: d.len() as u32,
                });
                image.extend_from_slice(d);
                entries.len() as u32 - 1
            });
            if entry.is_none() {
                image.resize(image.len() + *len as usize, 0);
            }
            extents.push(Extent {
                offset,
                len: *len,
                entry,
            });
        }
        let meta = Metadata {
            name: "t".into(),
            version: 1,
            size: image.len() as u64,
            digest: blake3::hash(&image).to_hex().to_string(),
            created: String::new(),
            source: String::new(),
            chunking: String::new(),
        };
        let manifest = Manifest {
            meta,
            packs: Vec::new(),
            entries,
            extents,
        };
        (manifest, image)
    }

    fn written(disk: &mut Disk, m: &fleetboot_image::Manifest, image: &[u8]) {
        for x in &m.extents {
            let (lo, hi) = (x.offset as usize, (x.offset + x.len) as usize);
            match x.entry {
                Some(_) => disk.write_at(x.offset, &image[lo..hi]).unwrap(),
                None => disk.zero(x.offset, x.len).unwrap(),
            }
        }
        disk.sync().unwrap();
    }

    #[test]
    fn the_read_back_passes_the_image_and_names_the_bytes_that_differ() {
        let a: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        let b: Vec<u8> = (0..9000u32).map(|i| (i * 13 + 1) as u8).collect();
        let (m, image) = manifest_of(&[
            (Some(a.clone()), a.len() as u64),
            (None, 3 << 20),
            (Some(b.clone()), b.len() as u64),
            (Some(a.clone()), a.len() as u64),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        // Data where the zero run goes: the punched hole must clear it.
        std::fs::write(&path, vec![0x5a; image.len()]).unwrap();
        let mut disk = Disk::open(&path, image.len() as u64).unwrap();
        written(&mut disk, &m, &image);
        disk.verify(&m).expect("the image as written reads back");
        assert_eq!(std::fs::read(&path).unwrap(), image);
        assert!(
            disk.is_hole(a.len() as u64 + 8192, 1 << 20),
            "the zero run is a hole"
        );
        assert!(!disk.is_hole(0, 1), "the data is not");

        // One byte of the last chunk changed behind the agent's back.
        let at = (a.len() + (3 << 20) + b.len() + 100) as u64;
        disk.file.write_all_at(&[0xff], at).unwrap();
        let e = format!("{:#}", disk.verify(&m).unwrap_err());
        let lo = a.len() + (3 << 20) + b.len();
        assert!(
            e.contains(&format!("bytes {lo}..{}", lo + a.len())),
            "the error names the chunk's bytes: {e}"
        );
    }

    fn disk(name: &str, gib: u64, removable: bool, ids: &[&str]) -> DiskInfo {
        DiskInfo {
            name: name.into(),
            bytes: gib << 30,
            removable,
            ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Issue 8, item 13: ambiguity is decided first, serials and WWNs match exactly.
    #[test]
    fn disk_choice_refuses_ambiguity_before_size_and_matches_ids_exactly() {
        let small_internal = disk("sda", 8, false, &["S1", "naa.5000c500a1b2c3d4"]);
        let big_second = disk("sdb", 500, false, &["S12"]);
        let usb = disk("sdc", 64, true, &["USB1"]);
        let both = [small_internal.clone(), big_second.clone(), usb.clone()];
        let err = pick("auto", 20 << 30, &both).unwrap_err().to_string();
        assert!(err.contains("several disks"), "{err}");
        let err = pick("auto", 20 << 30, &[small_internal.clone(), usb.clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("too small"), "{err}");
        assert_eq!(
            pick("auto", 4 << 30, &[small_internal.clone(), usb]).unwrap(),
            "sda"
        );
        assert_eq!(pick("S1", 1, &both).unwrap(), "sda", "not S12");
        assert_eq!(pick("S12", 1, &both).unwrap(), "sdb");
        assert_eq!(pick("naa.5000c500a1b2c3d4", 1, &both).unwrap(), "sda");
        for partial in ["S", "5000c500", "naa."] {
            assert!(pick(partial, 1, &both).is_err(), "{partial} matched");
        }
        assert!(pick("S12", 600 << 30, &both)
            .unwrap_err()
            .to_string()
            .contains("too small"));
    }

    /// Issue 9: zero runs a device already reads as zeros are left alone (a fresh disk is not
    /// written 1.6 GiB of zeros); the others are zeroed. A real block device: a loop device.
    #[test]
    fn zero_runs_the_device_already_holds_are_left_alone() {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n");
        if !root {
            eprintln!("SKIP: needs root for a loop device (CI runs as root)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("disk.bin");
        let mut bytes = vec![0u8; 8 << 20];
        bytes[..4 << 20].fill(0xa5);
        std::fs::write(&backing, &bytes).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let result = std::panic::catch_unwind(|| {
            let mut disk = Disk::open(Path::new(&dev), 8 << 20).unwrap();
            disk.zero(0, 4 << 20).unwrap();
            disk.zero(4 << 20, 4 << 20).unwrap();
            disk.sync().unwrap();
            let found = disk.zeros_found;
            let mut back = vec![1u8; 8 << 20];
            disk.drop_cache().unwrap();
            disk.file.read_exact_at(&mut back, 0).unwrap();
            let (m, _) = manifest_of(&[(None, 4 << 20), (None, 4 << 20)]);
            let clean = disk.verify(&m).map_err(|e| format!("{e:#}"));
            // The half left alone changes behind the agent (a device that trims without
            // guaranteeing zeros): the read-back reads it again and says so.
            disk.file.write_all_at(&[1], 6 << 20).unwrap();
            disk.sync().unwrap();
            let changed = disk.verify(&m).map_err(|e| format!("{e:#}"));
            (found, back.iter().all(|&b| b == 0), clean, changed)
        });
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        let (found, all_zero, clean, changed) = result.unwrap();
        assert_eq!(found, 4 << 20, "the half that read as zeros was left alone");
        assert!(all_zero, "the other half was zeroed");
        assert_eq!(clean, Ok(()), "the zeros read back");
        let e = changed.unwrap_err();
        assert!(e.contains("should read as zeros"), "{e}");
    }

    #[test]
    fn a_target_path_that_is_not_a_block_device_is_refused() {
        let err = choose("/nonexistent/disk", 1).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = choose("/proc/version", 1).unwrap_err().to_string();
        assert!(err.contains("not a block device"), "{err}");
    }
}
