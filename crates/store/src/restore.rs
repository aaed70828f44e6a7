//! `image export`: recreate an image byte for byte in a file or on a block device.
//!
//! This is the agent's code path ([`fleetboot_image::restore`]) with the store's own pack files as
//! the frame source. A file is written under a temp name beside the destination and renamed only
//! once every chunk has been verified and written, so a failed export leaves no partial file.

use super::fsutil::TempFile;
use super::{ImageRef, IoContext, Store, StoreError};
use fleetboot_image::{restore, RestoreOptions, RestoreReport, Target};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// What an export did.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub image: ImageRef,
    pub size: u64,
    pub digest: String,
    pub restore: RestoreReport,
    /// Whether the written bytes were read back and their BLAKE3 matched the image's digest.
    pub digest_checked: bool,
    pub elapsed: Duration,
}

/// Options for [`Store::export`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ExportOptions {
    /// Replace an existing file.
    pub force: bool,
    /// Read the result back and check it against the image's whole-image BLAKE3.
    pub check_digest: bool,
}

/// A target whose unwritten ranges already read as zeros (a new sparse file).
struct SparseFile<'a>(&'a File);

impl Target for SparseFile<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }
    fn zero(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A block device: zero runs must be written.
struct Device<'a>(&'a File);

impl Target for Device<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; (1 << 20).min(len as usize)];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.0.write_all_at(&zeros[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}

impl Store {
    /// Writes the image `r` names to `out` (a file path, or an existing block device).
    pub fn export(
        &self,
        r: &ImageRef,
        out: &Path,
        options: ExportOptions,
        progress: &dyn Fn(u64, u64),
    ) -> Result<ExportReport, StoreError> {
        let started = Instant::now();
        let (v, manifest) = self.manifest(r)?;
        let size = manifest.meta.size;
        let source = self.frames();
        let show = |done| progress(done, size);
        let is_device = fs::metadata(out).is_ok_and(|m| m.file_type().is_block_device());
        let report = if is_device {
            let dev = OpenOptions::new()
                .write(true)
                .read(true)
                .open(out)
                .at(out)?;
            let capacity = io::Seek::seek(&mut &dev, io::SeekFrom::End(0)).at(out)?;
            if capacity < size {
                return Err(StoreError::BadInput {
                    path: out.to_path_buf(),
                    what: format!("device holds {capacity} bytes; the image needs {size}"),
                });
            }
            let report = restore(
                &manifest,
                source.as_ref(),
                &mut Device(&dev),
                RestoreOptions::default(),
                &show,
            )?;
            dev.sync_all().at(out)?;
            report
        } else {
            if out.is_dir() {
                return Err(StoreError::BadInput {
                    path: out.to_path_buf(),
                    what: "is a directory".into(),
                });
            }
            if out.exists() && !options.force {
                return Err(StoreError::OutputExists {
                    path: out.to_path_buf(),
                });
            }
            let parent = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let mut tmp = TempFile::create_in(parent, ".fleetboot-partial").at(parent)?;
            tmp.file().set_len(size).at(out)?;
            let report = restore(
                &manifest,
                source.as_ref(),
                &mut SparseFile(tmp.file()),
                RestoreOptions::default(),
                &show,
            )?;
            if options.check_digest {
                check_digest(tmp.file(), &manifest.meta.digest).at(out)?;
            }
            tmp.persist(out).at(out)?;
            report
        };
        if options.check_digest && is_device {
            let dev = File::open(out).at(out)?;
            check_digest(&dev, &manifest.meta.digest).at(out)?;
        }
        Ok(ExportReport {
            image: ImageRef {
                name: v.name,
                version: Some(v.version),
            },
            size,
            digest: manifest.meta.digest,
            restore: report,
            digest_checked: options.check_digest,
            elapsed: started.elapsed(),
        })
    }
}

/// Reads `file` from the start and compares its BLAKE3 with `expected` (hex).
fn check_digest(file: &File, expected: &str) -> io::Result<()> {
    let mut hasher = blake3::Hasher::new();
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let actual = hasher.finalize().to_hex();
    if actual.as_str() != expected {
        return Err(io::Error::other(format!(
            "read back with BLAKE3 {actual}, but the image's digest is {expected}"
        )));
    }
    Ok(())
}
