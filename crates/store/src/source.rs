//! What an import reads: the disk an image file describes, as runs of data and runs of zeros.
//!
//! Told apart by their first bytes: a raw image (file or block device; holes found with
//! SEEK_DATA/SEEK_HOLE), a qcow2 image (`qcow2.rs`: holes and zero clusters from its tables), or a
//! raw image compressed with xz, zstd or gzip (decompressed as a stream, so its size is known only
//! at its end). Other disk formats (VMDK, VHD(X), VDI) are named and refused. No format writes a
//! raw copy anywhere: the import reads the disk once, in order.

use super::qcow2::{is_qcow2, Qcow2};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// A run of the disk, from the position asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    /// This many bytes read as zeros (holes, unallocated or zero clusters).
    Zero(u64),
    /// This many bytes of data follow (they may still hold zeros; `u64::MAX`: up to the end).
    Data(u64),
}

/// A disk image being read for import, front to back.
pub trait Source: Send {
    /// The disk's size, if known before reading it all (a compressed stream's is not).
    fn size(&self) -> Option<u64>;
    /// The run starting at `pos`; `None` at the end of the disk.
    fn span(&mut self, pos: u64) -> io::Result<Option<Span>>;
    /// Fills `buf` with the disk's bytes from `pos` (positions only grow, data runs are read in
    /// order); fewer bytes only at the end of the disk.
    fn read(&mut self, pos: u64, buf: &mut [u8]) -> io::Result<usize>;
}

/// The formats an import accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Xz,
    Zstd,
    Gzip,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Xz => "raw, xz-compressed",
            Format::Zstd => "raw, zstd-compressed",
            Format::Gzip => "raw, gzip-compressed",
        }
    }
}

/// Why an image file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Qcow2(#[from] super::qcow2::Qcow2Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Opens `file` (of `len` bytes; a block device is always raw) as the disk it describes.
pub fn open(
    file: File,
    len: u64,
    block_device: bool,
) -> Result<(Box<dyn Source>, Format), SourceError> {
    let mut head = [0u8; 512];
    let got = if block_device {
        0
    } else {
        read_head(&file, &mut head)?
    };
    let head = &head[..got];
    if is_qcow2(head) {
        return Ok((Box::new(Qcow2::open(file)?), Format::Qcow2));
    }
    // Streams read from the file's position.
    let mut file = file;
    if !block_device {
        io::Seek::rewind(&mut file)?;
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        let reader = liblzma::read::XzDecoder::new_multi_decoder(io::BufReader::new(file));
        return Ok((Box::new(Stream::new(reader, "xz")), Format::Xz));
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let reader = zstd::stream::read::Decoder::new(file)?;
        return Ok((Box::new(Stream::new(reader, "zstd")), Format::Zstd));
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        let reader = flate2::read::MultiGzDecoder::new(io::BufReader::new(file));
        return Ok((Box::new(Stream::new(reader, "gzip")), Format::Gzip));
    }
    if let Some(other) = other_format(head) {
        return Err(SourceError::Refused(format!(
            "is a {other} image; convert it first (`qemu-img convert -O qcow2 IN OUT`)"
        )));
    }
    Ok((Box::new(RawFile { file, len }), Format::Raw))
}

/// Disk formats import does not read, by their first bytes.
fn other_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"KDMV") {
        Some("VMDK")
    } else if head.starts_with(b"vhdxfile") {
        Some("VHDX")
    } else if head.starts_with(b"conectix") {
        Some("VHD (dynamic)")
    } else if head.len() >= 68 && head[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        Some("VDI")
    } else if is_qcow2(head) {
        Some("qcow2")
    } else {
        None
    }
}

fn read_head(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// A raw image: a file (holes skipped) or a block device.
struct RawFile {
    file: File,
    len: u64,
}

impl Source for RawFile {
    fn size(&self) -> Option<u64> {
        Some(self.len)
    }

    fn span(&mut self, pos: u64) -> io::Result<Option<Span>> {
        if pos >= self.len {
            return Ok(None);
        }
        let block = fleetboot_image::BLOCK_BYTES as u64;
        let data_start = match seek(&self.file, pos, libc::SEEK_DATA)? {
            Some(d) => (d / block * block).clamp(pos, self.len),
            None => self.len,
        };
        if data_start > pos {
            return Ok(Some(Span::Zero(data_start - pos)));
        }
        let data_end = match seek(&self.file, pos, libc::SEEK_HOLE)? {
            Some(h) => h
                .div_ceil(block)
                .saturating_mul(block)
                .clamp(pos + 1, self.len),
            None => self.len,
        };
        Ok(Some(Span::Data(data_end - pos)))
    }

    fn read(&mut self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(pos)) as usize;
        self.file.read_exact_at(&mut buf[..n], pos)?;
        Ok(n)
    }
}

/// `lseek` with SEEK_DATA / SEEK_HOLE. `None` when there is no data after `pos` (ENXIO); where
/// the filesystem or device cannot tell, everything is data.
fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(pos).map_err(io::Error::other)?;
    // SAFETY: lseek on a file descriptor we own; it does not touch memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) if whence == libc::SEEK_DATA => Ok(None),
        Some(libc::ENXIO) => Ok(Some(pos)),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if whence == libc::SEEK_DATA => Ok(Some(pos)),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
        _ => Err(err),
    }
}

/// A compressed raw image, decompressed in order; all of it is "data" (the chunker still finds
/// its zero runs), and its size is where it ends.
struct Stream<R> {
    reader: R,
    /// The compression, for messages.
    kind: &'static str,
    at: u64,
    ended: bool,
}

impl<R: Read + Send> Stream<R> {
    fn new(reader: R, kind: &'static str) -> Stream<R> {
        Stream {
            reader,
            kind,
            at: 0,
            ended: false,
        }
    }
}

impl<R: Read + Send> Source for Stream<R> {
    fn size(&self) -> Option<u64> {
        None
    }

    fn span(&mut self, _pos: u64) -> io::Result<Option<Span>> {
        Ok((!self.ended).then_some(Span::Data(u64::MAX)))
    }

    fn read(&mut self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        if pos != self.at {
            return Err(io::Error::other("a compressed image is read in order"));
        }
        let mut got = 0;
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) => {
                    self.ended = true;
                    break;
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("the compressed image is damaged or cut short: {e}"),
                    ))
                }
            }
        }
        // A compressed qcow2 (or VMDK…) is not a compressed raw disk: its container's bytes
        // would become the disk.
        if pos == 0 {
            if let Some(inner) = other_format(&buf[..got.min(512)]) {
                return Err(io::Error::other(format!(
                    "holds a {inner} image compressed with {}; decompress it first and import \
                     the {inner} file",
                    self.kind
                )));
            }
        }
        self.at += got as u64;
        Ok(got)
    }
}
