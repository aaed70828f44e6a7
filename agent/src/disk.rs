//! The disk being written: a block device (or, on a host, a regular file), with the cheapest way
//! to make a range read back as zeros (BLKZEROOUT on a device, a punched hole in a file), reads
//! for the delta, and a read-back digest of what ended up on it.

use anyhow::{bail, Context, Result};
use fleetboot_image::Target;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// An open target.
pub struct Disk {
    pub path: PathBuf,
    file: File,
    is_device: bool,
}

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

    /// Reads `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Flushes everything to the medium.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", self.path.display()))
    }

    /// BLAKE3 of the first `size` bytes as they read back now.
    pub fn digest(&self, size: u64) -> Result<String> {
        let mut hasher = blake3::Hasher::new();
        let mut reader = (&self.file).take(size);
        let mut f = &self.file;
        f.seek(SeekFrom::Start(0))?;
        let mut buf = vec![0u8; 4 << 20];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        if total != size {
            bail!("{} ends after {total} of {size} bytes", self.path.display());
        }
        Ok(hasher.finalize().to_hex().to_string())
    }
}

impl Target for Disk {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
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
