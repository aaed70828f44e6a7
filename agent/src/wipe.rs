//! Wiping a disk when its machine is retired (`fleetboot host retire`), then checking it.
//!
//! - quick (MAAS's "quick erase"): the whole device discarded where it supports discard
//!   (BLKDISCARD), and in every case the first and last 16 MiB and the first and last MiB of every
//!   partition made zero (BLKZEROOUT; a punched hole in a file) — partition tables, boot loaders,
//!   filesystem and RAID superblocks — so nothing on it is found or booted again.
//! - secure: the device's own secure discard (BLKSECDISCARD) over all of it; a disk without
//!   it fails the wipe with that reason, never a quieter erase in its place.
//!
//! Afterwards the zeroed areas are read back, bypassing the page cache: a wipe is reported only
//! once they read as zeros.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blksecdiscard, nix::request_code_none!(0x12, 125), [u64; 2]);
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

const EDGE: u64 = 16 << 20;
const PART_EDGE: u64 = 1 << 20;

/// How thoroughly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Quick,
    Secure,
}

/// What was done to one disk.
#[derive(Debug)]
pub struct Wiped {
    pub bytes: u64,
    /// `discard + zeroed`, `zeroed`, `secure discard`.
    pub how: String,
}

/// Wipes `path` (a block device, or a file standing for one) and checks it.
pub fn wipe(path: &Path, partitions: &[(u64, u64)], mode: Mode) -> Result<Wiped> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .or_else(|_| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
        })
        .with_context(|| format!("cannot open {} to wipe it", path.display()))?;
    let device = file.metadata()?.file_type().is_block_device();
    let bytes = if device {
        let mut n = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 we own.
        unsafe { blkgetsize64(std::os::fd::AsRawFd::as_raw_fd(&file), &mut n) }
            .with_context(|| format!("cannot read the size of {}", path.display()))?;
        n
    } else {
        file.metadata()?.len()
    };
    let how = match mode {
        Mode::Secure => {
            if !device {
                bail!("{}: a secure erase needs a block device", path.display());
            }
            range(&file, blksecdiscard, 0, bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{}: the drive offers no secure erase (BLKSECDISCARD: {e}); nothing was \
                     erased in its place",
                    path.display()
                )
            })?;
            "secure discard".to_string()
        }
        Mode::Quick => {
            let discarded = device && range(&file, blkdiscard, 0, bytes).is_ok();
            let mut areas = vec![
                (0, EDGE.min(bytes)),
                (bytes.saturating_sub(EDGE), EDGE.min(bytes)),
            ];
            for &(start, len) in partitions {
                areas.push((start, PART_EDGE.min(len)));
                areas.push(((start + len).saturating_sub(PART_EDGE), PART_EDGE.min(len)));
            }
            for &(start, len) in &areas {
                zero(&file, device, start, len.min(bytes.saturating_sub(start)))
                    .with_context(|| format!("cannot zero {} at byte {start}", path.display()))?;
            }
            file.sync_all()?;
            for &(start, len) in &areas {
                check_zero(&file, start, len.min(bytes.saturating_sub(start)))
                    .with_context(|| format!("{}: the wipe did not hold", path.display()))?;
            }
            if discarded {
                "discard + zeroed"
            } else {
                "zeroed"
            }
            .to_string()
        }
    };
    Ok(Wiped { bytes, how })
}

type RangeIoctl = unsafe fn(i32, *const [u64; 2]) -> nix::Result<i32>;

fn range(file: &File, op: RangeIoctl, start: u64, len: u64) -> nix::Result<i32> {
    let r = [start, len];
    // SAFETY: the ioctl reads a [u64; 2] (start, length) we own for the call.
    unsafe { op(std::os::fd::AsRawFd::as_raw_fd(file), &r) }
}

fn zero(file: &File, device: bool, start: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    if device {
        range(file, crate::disk::blkzeroout, start, len)?;
    } else {
        nix::fcntl::fallocate(
            file,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            start as i64,
            len as i64,
        )?;
    }
    Ok(())
}

/// Reads `len` bytes at `start` back and fails on the first non-zero byte.
fn check_zero(file: &File, start: u64, len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    // Aligned for O_DIRECT.
    let buf = AlignedBuf::new(1 << 20);
    let mut at = start;
    while at < start + len {
        let n = (start + len - at).min(1 << 20) as usize;
        file.read_exact_at(&mut buf.0[..n], at)?;
        if let Some(i) = buf.0[..n].iter().position(|&b| b != 0) {
            bail!("byte {} is not zero after the wipe", at + i as u64);
        }
        at += n as u64;
    }
    Ok(())
}

/// A buffer on a 4 KiB boundary, as O_DIRECT reads need.
struct AlignedBuf(&'static mut [u8], std::alloc::Layout);

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("a valid layout");
        // SAFETY: a non-zero layout; zeroed memory is a valid [u8]; freed in Drop.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf(unsafe { std::slice::from_raw_parts_mut(ptr, len) }, layout)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.0.as_mut_ptr(), self.1) }
    }
}

/// Wipes every fixed (non-removable) disk of this machine, each checked; the first failure ends
/// the wipe with its reason.
pub fn all_disks(mode: Mode) -> Result<fleetboot_image::api::WipeReport> {
    let mut report = fleetboot_image::api::WipeReport::default();
    for d in crate::inventory::disks(Path::new("/")) {
        if d.removable {
            continue;
        }
        // Network storage (an iSCSI session, a Fibre Channel port) may be shared: never this
        // machine's to erase.
        let real = std::fs::canonicalize(Path::new("/sys/block").join(&d.name)).unwrap_or_default();
        let path = real.to_string_lossy();
        if path.contains("/session") || path.contains("/rport-") {
            eprintln!("fleetboot-agent: {} left alone: network storage", d.name);
            continue;
        }
        let w = wipe(&Path::new("/dev").join(&d.name), &partitions(&d.name), mode)?;
        eprintln!(
            "fleetboot-agent: wiped {} ({} bytes): {}",
            d.name, w.bytes, w.how
        );
        report.disks.push(fleetboot_image::api::WipedDisk {
            name: d.name,
            bytes: w.bytes,
            how: w.how,
        });
    }
    if report.disks.is_empty() {
        bail!("no fixed disk to wipe");
    }
    Ok(report)
}

/// The partitions of block device `name` as (start, length) in bytes, from sysfs.
pub fn partitions(name: &str) -> Vec<(u64, u64)> {
    let dir = Path::new("/sys/block").join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(name))
        .filter_map(|e| {
            let read = |f: &str| -> Option<u64> {
                std::fs::read_to_string(e.path().join(f))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            Some((read("start")? * 512, read("size")? * 512))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_quick_wipe_zeroes_the_edges_and_partition_ends_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let size = 64u64 << 20;
        let f = File::create(&path).unwrap();
        let pattern = vec![0xa5u8; 1 << 20];
        for i in 0..64 {
            f.write_all_at(&pattern, i << 20).unwrap();
        }
        let part = (20u64 << 20, 10u64 << 20);
        let w = wipe(&path, &[part], Mode::Quick).unwrap();
        assert_eq!((w.bytes, w.how.as_str()), (size, "zeroed"));
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, size);
        let zero = |a: u64, b: u64| data[a as usize..b as usize].iter().all(|&x| x == 0);
        assert!(zero(0, 16 << 20) && zero(size - (16 << 20), size));
        assert!(zero(20 << 20, 21 << 20) && zero(29 << 20, 30 << 20));
        assert!(!zero(22 << 20, 23 << 20), "a quick wipe leaves the middle");
        assert!(
            wipe(&path, &[], Mode::Secure).is_err(),
            "no secure erase on a file"
        );
    }
}
