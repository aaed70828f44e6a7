//! Fuzz targets: the parsers that read bytes from the network or from disk, each with a property
//! beyond "does not panic", seed inputs, and a small mutation engine for the stable toolchain.
//!
//! - `dhcp_packet`: any datagram through the DHCP server's whole handler (`dhcp::fuzz`).
//! - `tftp_request`: any datagram parsed as a TFTP request and its file resolved beneath a boot
//!   folder holding a symlink that leads out: what would be served lies inside the folder.
//! - `http_range`: any `Range` value against any file length: the range given lies in the file.
//! - `disk_image`: any bytes as an image file to import (qcow2, compressed streams, raw): read
//!   as the disk it describes, runs that move forward and reads that stay in bounds, or refused.
//! - `manifest_decode`: any bytes as a manifest file, or as a manifest's body in an intact
//!   container (so mutations reach the body decoder past the checksum): refused, or decoded into
//!   one that encodes and decodes back to itself.
//!
//! `fuzz/` runs the same targets under libFuzzer (coverage-guided, nightly); `cargo xtask fuzz`
//! runs libFuzzer where it can and this module's engine otherwise (`examples/fuzz.rs`), and the
//! tests below run every target for a fixed number of inputs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A fuzz target: a name, the function that must never panic (it says whether the input was
/// accepted: got past the parser, which the stable engine uses to stay near valid inputs), and
/// inputs to start from.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> bool,
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    Target {
        name: "dhcp_packet",
        run: dhcp_packet,
        seeds: dhcp_seeds,
    },
    Target {
        name: "tftp_request",
        run: tftp_request,
        seeds: tftp_seeds,
    },
    Target {
        name: "http_range",
        run: http_range,
        seeds: range_seeds,
    },
    Target {
        name: "disk_image",
        run: disk_image,
        seeds: disk_image_seeds,
    },
    Target {
        name: "manifest_decode",
        run: manifest_decode,
        seeds: manifest_seeds,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

pub fn dhcp_packet(data: &[u8]) -> bool {
    crate::dhcp::fuzz::handle_datagram(data) > 0
}

/// A boot folder with a file, a subfolder and a symlink to a file outside it.
fn boot_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("fleetboot-fuzz-tftp-{}", std::process::id()));
        let root = base.join("boot");
        let _ = std::fs::create_dir_all(root.join("efi"));
        let _ = std::fs::write(root.join("undionly.kpxe"), b"loader");
        let _ = std::fs::write(root.join("efi/ipxe.efi"), b"loader");
        let _ = std::fs::write(base.join("secret"), b"outside");
        let _ = std::os::unix::fs::symlink(base.join("secret"), root.join("escape"));
        let _ = std::os::unix::fs::symlink("../secret", root.join("efi/up"));
        root.canonicalize().unwrap_or(root)
    })
}

pub fn tftp_request(data: &[u8]) -> bool {
    let root = boot_dir();
    let (parsed, path) = crate::tftp::fuzz_request(data, root);
    if let Some(path) = path {
        assert!(
            path.starts_with(root),
            "{path:?} would be served from outside {root:?}"
        );
    }
    parsed
}

/// The first 8 bytes are the file's length, the rest the header's value.
pub fn http_range(data: &[u8]) -> bool {
    let Some((len, value)) = data.split_first_chunk::<8>() else {
        return false;
    };
    let len = u64::from_le_bytes(*len) >> (len[7] % 64);
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    let Some((first, last)) = crate::http::packs::parse_range(value, len) else {
        return false;
    };
    assert!(
        first <= last && last < len,
        "{value:?} against {len} bytes gave {first}-{last}"
    );
    true
}

/// An image file in memory (a memfd), as `image import` would open it.
fn memfd(data: &[u8]) -> Option<std::fs::File> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a valid C string; the descriptor is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"fleetboot-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(data).ok()?;
    // Streams are read from the file's position, as from a freshly opened file.
    std::io::Seek::rewind(&mut file).ok()?;
    Some(file)
}

/// Reads at most this much of a fuzzed image's data.
const DISK_READ_MAX: u64 = 16 << 20;

pub fn disk_image(data: &[u8]) -> bool {
    use crate::store::source::{self, Span};
    let Some(file) = memfd(data) else {
        return false;
    };
    let Ok((mut disk, _)) = source::open(file, data.len() as u64, false) else {
        return false;
    };
    let mut buf = vec![0u8; 64 << 10];
    let (mut pos, mut read) = (0u64, 0u64);
    for _ in 0..10_000 {
        let span = match disk.span(pos) {
            Ok(Some(span)) => span,
            Ok(None) | Err(_) => break,
        };
        match span {
            Span::Zero(n) => {
                assert!(n > 0, "an empty zero run at {pos}");
                pos = pos.saturating_add(n);
            }
            Span::Data(n) => {
                assert!(n > 0, "an empty data run at {pos}");
                let want = n.min(buf.len() as u64) as usize;
                let got = match disk.read(pos, &mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(got) => got,
                };
                assert!(got <= want, "read {got} bytes into {want}");
                pos += got as u64;
                read += got as u64;
                if read > DISK_READ_MAX {
                    break;
                }
            }
        }
        if let Some(size) = disk.size() {
            assert!(pos <= size, "ran to {pos} past the disk's {size} bytes");
        }
    }
    true
}

/// The first byte says what the rest is: odd, a body to wrap in an intact container (of format 1,
/// or of format 2 if bit 1 is set too); even, a file. Format 2's id tables are refused here (a
/// fuzzer cannot forge a table's BLAKE3): what is reached is its body decoder, inline ids.
pub fn manifest_decode(data: &[u8]) -> bool {
    use fleetboot_image::manifest::FORMAT_VERSION_TABLES;
    use fleetboot_image::Manifest;
    let decoded = match data.split_first() {
        Some((mode, body)) if mode % 4 == 3 => Manifest::decode_with(
            &Manifest::container_versioned(body, FORMAT_VERSION_TABLES),
            &mut |_| Err("no tables here".into()),
        ),
        Some((mode, body)) if mode % 2 == 1 => Manifest::decode(&Manifest::container(body)),
        Some((_, file)) => Manifest::decode(file),
        None => return false,
    };
    let Ok(m) = decoded else {
        return false;
    };
    let again = fleetboot_image::Manifest::decode(&m.encode())
        .expect("a decoded manifest encodes into one that decodes");
    assert!(again == m, "the manifest changed through encode and decode");
    true
}

fn dhcp_seeds() -> Vec<Vec<u8>> {
    use crate::dhcp::packet::sample_discover as discover;
    vec![
        discover(
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            &[b"\x3c\x09PXEClient", b"\x5d\x02\x00\x07"],
        ),
        discover(
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            &[
                b"\x35\x01\x03",
                b"\x32\x04\x0a\x09\x00\x05",
                b"\x36\x04\x0a\x09\x00\x01",
            ],
        ),
        discover(
            [0x52, 0x54, 0, 0, 0, 1],
            &[
                b"\x4d\x04iPXE",
                b"\x61\x11\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10",
            ],
        ),
    ]
}

fn tftp_seeds() -> Vec<Vec<u8>> {
    [
        &b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001468\x00tsize\x000\x00"[..],
        b"\x00\x01efi/ipxe.efi\x00netascii\x00windowsize\x0016\x00timeout\x002\x00",
        b"\x00\x01escape\x00octet\x00",
        b"\x00\x01efi/up\x00octet\x00",
        b"\x00\x01/../secret\x00octet\x00",
        b"\x00\x02undionly.kpxe\x00octet\x00",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

fn range_seeds() -> Vec<Vec<u8>> {
    [
        "bytes=0-9",
        "bytes=90-",
        "bytes=-10",
        "bytes=5-1",
        "bytes=0-1,3-4",
    ]
    .iter()
    .map(|v| {
        let mut s = 100u64.to_le_bytes().to_vec();
        s.extend_from_slice(v.as_bytes());
        s
    })
    .collect()
}

/// A small qcow2 image (512-byte clusters, 8 of them): a plain data cluster, a zero cluster, a
/// compressed one (zlib, or zstd with the compression-type header field), the rest unallocated;
/// and the disk compressed as xz, zstd and gzip streams.
fn disk_image_seeds() -> Vec<Vec<u8>> {
    use std::io::Write;
    let cluster: Vec<u8> = (0..512u32).map(|i| (i * 7 % 251) as u8).collect();
    let qcow2 = |zstd: bool| {
        let mut f = vec![0u8; 3072];
        let put32 =
            |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_be_bytes());
        f[..4].copy_from_slice(b"QFI\xfb");
        put32(&mut f, 4, 3); // version
        put32(&mut f, 20, 9); // cluster_bits
        put64(&mut f, 24, 4096); // size
        put32(&mut f, 36, 1); // l1_size
        put64(&mut f, 40, 512); // l1_table_offset
        put32(&mut f, 96, 4); // refcount_order
        put32(&mut f, 100, if zstd { 112 } else { 104 }); // header_length
        if zstd {
            put64(&mut f, 72, 1 << 3); // incompatible: compression type
            f[104] = 1;
        }
        put64(&mut f, 512, 1024 | 1 << 63); // L1 -> L2 at 1024
        put64(&mut f, 1024, 1536 | 1 << 63); // cluster 0: data at 1536
        put64(&mut f, 1032, 1); // cluster 1: zero
        let packed = if zstd {
            zstd::bulk::compress(&cluster, 3).unwrap_or_default()
        } else {
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            let _ = e.write_all(&cluster);
            e.finish().unwrap_or_default()
        };
        put64(&mut f, 1040, 1 << 62 | 2560); // cluster 2: compressed at 2560 (one sector)
        f[1536..2048].copy_from_slice(&cluster);
        f.truncate(2560);
        f.extend_from_slice(&packed);
        f.resize(3072, 0);
        f
    };
    let disk = [cluster.clone(), vec![0; 512], cluster.clone()].concat();
    let gzip = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = e.write_all(&disk);
        e.finish().unwrap_or_default()
    };
    let xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        let _ = e.write_all(&disk);
        e.finish().unwrap_or_default()
    };
    vec![
        qcow2(false),
        qcow2(true),
        zstd::bulk::compress(&disk, 3).unwrap_or_default(),
        gzip,
        xz,
        disk,
    ]
}

/// Manifests of two small images, as an import writes them.
fn manifest_seeds() -> Vec<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("fleetboot-fuzz-store-{}", std::process::id()));
    let store = crate::store::Store::new(dir.join("store"));
    let mut seeds = Vec::new();
    for (i, image) in [
        [
            vec![0u8; 8192],
            vec![7u8; 8192],
            (0..20_000u32).map(|i| i as u8).collect(),
        ]
        .concat(),
        (0..40_000u32).map(|i| (i * 7 / 3) as u8).collect(),
    ]
    .iter()
    .enumerate()
    {
        let raw = dir.join(format!("seed{i}.img"));
        let _ = std::fs::create_dir_all(&dir);
        if std::fs::write(&raw, image).is_err() {
            continue;
        }
        let options = crate::store::ImportOptions {
            frame_bytes: 16 << 10,
            ..Default::default()
        };
        let imported = crate::store::import::import(&store, "seed", &raw, &options, &|_, _| {});
        if let Ok((version, m)) = imported.and_then(|r| store.manifest(&r.image)) {
            if let Ok(file) = std::fs::read(&version.path) {
                if let Some(body) = fleetboot_image::Manifest::body_of(&file) {
                    seeds.push([&[1u8][..], &body].concat());
                }
                seeds.push([&[0u8][..], &file].concat());
            }
            // Its format 2 body, naming its first pack's chunks through an id table.
            if let Some(&pack) = m.packs.first() {
                use fleetboot_image::id_table::{IdTable, TableIndex};
                let ids = m.entries.iter().filter(|e| e.pack == 0).map(|e| e.id);
                let table = IdTable {
                    pack,
                    ids: ids.collect(),
                };
                if let Ok(index) = TableIndex::of_bytes(&table.encode(), &pack) {
                    let file = m.encode_with_tables(&[(pack, index)].into_iter().collect());
                    if let Some(body) = fleetboot_image::Manifest::body_of(&file) {
                        seeds.push([&[3u8][..], &body].concat());
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    seeds
}

/// How long a run lasts.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    Time(Duration),
    Executions(u64),
}

/// What a run of the stable engine did.
#[derive(Debug, Default)]
pub struct Report {
    pub executions: u64,
    /// Inputs the target accepted (got past its parser).
    pub accepted: u64,
    pub elapsed: Duration,
    /// Inputs that panicked, with the panic's message (the first few of them).
    pub crashes: Vec<(Vec<u8>, String)>,
    pub crash_count: u64,
}

/// Crashing inputs kept per run.
const CRASHES_KEPT: usize = 16;
/// Inputs are kept below this size.
const INPUT_BYTES_MAX: usize = 4096;
/// Mutated inputs kept to mutate further (a random walk away from the seeds).
const POOL_MAX: usize = 256;

/// Runs `target` on mutations of its seeds until `budget` is spent. Deterministic for a `seed`.
/// Blind (no coverage feedback): libFuzzer, through `fuzz/`, goes deeper where it can run.
/// Panics are caught and counted; the panic hook still reports each (a runner may quiet it).
pub fn run(target: &Target, budget: Budget, seed: u64) -> Report {
    let seeds = (target.seeds)();
    let mut pool: Vec<Vec<u8>> = seeds.clone();
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let mut rng = Rng(seed | 1);
    let mut report = Report::default();
    let start = Instant::now();
    loop {
        let done = match budget {
            Budget::Executions(n) => report.executions >= n,
            Budget::Time(t) => report.executions % 256 == 0 && start.elapsed() >= t,
        };
        if done {
            break;
        }
        let input = if rng.below(16) == 0 {
            let len = rng.below(600) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            // A quarter from the seeds themselves, the rest from the walk.
            let from = |rng: &mut Rng| {
                if rng.below(4) == 0 && !seeds.is_empty() {
                    rng.below(seeds.len() as u64) as usize
                } else {
                    rng.below(pool.len() as u64) as usize
                }
            };
            let (a, b) = (from(&mut rng), from(&mut rng));
            mutate(&pool[a], &pool[b], &mut rng)
        };
        report.executions += 1;
        let accepted = match catch_unwind(AssertUnwindSafe(|| (target.run)(&input))) {
            Ok(accepted) => accepted,
            Err(panic) => {
                report.crash_count += 1;
                if report.crashes.len() < CRASHES_KEPT {
                    let why = (panic.downcast_ref::<String>().map(String::as_str))
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic without a message")
                        .to_string();
                    report.crashes.push((input, why));
                }
                continue;
            }
        };
        // Only accepted inputs are walked on: the walk stays where the parser lets it in.
        if accepted {
            report.accepted += 1;
        }
        if accepted && rng.below(2) == 0 {
            if pool.len() < POOL_MAX {
                pool.push(input);
            } else {
                // Keep the seeds, replace a walked input.
                let at = seeds.len() + rng.below((POOL_MAX - seeds.len()) as u64) as usize;
                pool[at] = input;
            }
        }
    }
    report.elapsed = start.elapsed();
    report
}

/// One to four edits of `base`: bit flips, random or boundary bytes, inserted, removed or
/// repeated runs, a splice with `other`, a cut.
fn mutate(base: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut p = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = |rng: &mut Rng, p: &Vec<u8>| rng.below(p.len() as u64 + 1) as usize;
        match rng.below(8) {
            0 if !p.is_empty() => {
                let i = rng.below(p.len() as u64) as usize;
                p[i] ^= 1 << rng.below(8);
            }
            1 if !p.is_empty() => {
                let i = rng.below(p.len() as u64) as usize;
                p[i] = rng.next() as u8;
            }
            2 if !p.is_empty() => {
                let i = rng.below(p.len() as u64) as usize;
                p[i] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5) as usize];
            }
            3 => {
                let i = at(rng, &p);
                let n = 1 + rng.below(16) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                p.splice(i..i, bytes);
            }
            4 if !p.is_empty() => {
                let i = rng.below(p.len() as u64) as usize;
                let n = (1 + rng.below(16) as usize).min(p.len() - i);
                p.drain(i..i + n);
            }
            5 if !p.is_empty() => {
                let i = rng.below(p.len() as u64) as usize;
                let n = (1 + rng.below(32) as usize).min(p.len() - i);
                let run = p[i..i + n].to_vec();
                let j = at(rng, &p);
                p.splice(j..j, run);
            }
            6 if !other.is_empty() => {
                let i = at(rng, &p);
                let j = rng.below(other.len() as u64) as usize;
                p.truncate(i);
                p.extend_from_slice(&other[j..]);
            }
            _ => {
                let i = at(rng, &p);
                p.truncate(i);
            }
        }
    }
    p.truncate(INPUT_BYTES_MAX);
    p
}

/// xorshift64: fast, and a run reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_seeds_that_pass() {
        for t in TARGETS {
            let seeds = (t.seeds)();
            assert!(!seeds.is_empty(), "{} has no seeds", t.name);
            for s in &seeds {
                (t.run)(s);
            }
        }
    }

    /// The hand-made seeds are what they claim: each reads as the same 1.5 KiB disk (a cluster,
    /// zeros, the cluster again), the qcow2 ones with a compressed cluster (zlib, zstd) and a
    /// zero cluster, then unallocated space to 4 KiB.
    #[test]
    fn the_disk_image_seeds_read_as_their_disk() {
        use crate::store::source::{self, Format};
        let seeds = disk_image_seeds();
        let want = seeds.last().expect("the raw disk").clone();
        let formats = [
            Format::Qcow2,
            Format::Qcow2,
            Format::Zstd,
            Format::Gzip,
            Format::Xz,
            Format::Raw,
        ];
        for (seed, format) in seeds.iter().zip(formats) {
            let file = memfd(seed).expect("a memfd");
            let (mut disk, got) = source::open(file, seed.len() as u64, false).expect("opens");
            assert_eq!(got, format);
            let mut buf = vec![0u8; 8192];
            let n = disk.read(0, &mut buf).expect("reads");
            let len = if format == Format::Qcow2 {
                4096
            } else {
                want.len()
            };
            assert_eq!(n, len, "{format:?}");
            assert_eq!(&buf[..want.len()], &want[..], "{format:?}");
            assert!(buf[want.len()..n].iter().all(|&b| b == 0), "{format:?}");
        }
    }

    /// The engine finds a planted bug, so a run without crashes means something.
    #[test]
    fn the_engine_finds_a_planted_crash() {
        fn planted(data: &[u8]) -> bool {
            assert!(
                !(data.len() > 3 && data[0] == 0 && data[1] == 1 && data[3] == b'y'),
                "planted"
            );
            data.first() == Some(&0)
        }
        fn seeds() -> Vec<Vec<u8>> {
            vec![b"\x00\x02xyz".to_vec()]
        }
        let t = Target {
            name: "planted",
            run: planted,
            seeds,
        };
        let r = run(&t, Budget::Executions(100_000), 7);
        assert!(r.crash_count > 0, "{r:?}");
        assert!(r.crashes[0].1.contains("planted"), "{:?}", r.crashes[0].1);
    }

    /// Each target, 20,000 inputs (libFuzzer and `cargo xtask fuzz` go further).
    #[test]
    fn no_target_crashes_on_mutated_inputs() {
        for t in TARGETS {
            let r = run(t, Budget::Executions(20_000), 0x9e37_79b9);
            // Mutations must reach past the parsers, not only be refused at the door (≥ 1 %).
            assert!(
                r.accepted >= 200,
                "{}: only {} of 20,000 inputs accepted",
                t.name,
                r.accepted
            );
            assert!(
                r.crash_count == 0,
                "{}: {} crash(es), first: {:?}",
                t.name,
                r.crash_count,
                r.crashes.first()
            );
        }
    }
}
