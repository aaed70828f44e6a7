//! `image import` of images as operators have them, through the binary: qcow2 (versions 2 and 3,
//! plain, zlib- and zstd-compressed clusters, small clusters) and raw compressed with xz, zstd or
//! gzip store exactly what the raw image stores (same digest and size, nothing new in the store);
//! qcow2 images that cannot be read (backing file, encryption, external data file, an unknown
//! version, truncated), a cut compressed stream and other disk formats are refused with the reason,
//! leaving nothing in the store. The images are made by the real tools: qemu-img (qemu-utils),
//! xz, zstd and gzip.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fleetboot"))
            .env("FLEETBOOT_STORE", self.path("store"))
            .stdin(Stdio::null())
            .args(args)
            .output()
            .expect("run fleetboot")
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "fleetboot {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// (digest, size) of an image.
    fn identity(&self, image: &str) -> (String, u64) {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["image", "show", image, "--json"])).unwrap();
        let meta = &v["metadata"];
        (
            meta["digest"].as_str().unwrap().to_string(),
            meta["size"].as_u64().unwrap(),
        )
    }
    fn export(&self, image: &str) -> Vec<u8> {
        let out = self.path("export.img");
        let _ = fs::remove_file(&out);
        self.ok(&["image", "export", image, out.to_str().unwrap()]);
        fs::read(&out).unwrap()
    }
    fn pack_bytes(&self) -> u64 {
        fs::read_dir(self.path("store/packs"))
            .map(|d| d.map(|e| e.unwrap().metadata().unwrap().len()).sum())
            .unwrap_or(0)
    }
}

fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("SKIP: {tool} is missing (`cargo xtask setup` installs it)");
    }
    found
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("run a tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates a LUKS-encrypted qcow2 at `path`. qemu-img times its key derivation by the thread's
/// CPU time, which this kernel counts in ticks: a first round shorter than a tick reads as zero
/// and qemu-img gives up ("Unable to get accurate CPU usage"). That is asked again, a few times.
fn luks_qcow2(path: &Path) {
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=pass",
    ])
    .args(["-o", "encrypt.format=luks,encrypt.key-secret=s0"])
    .arg(path)
    .arg("4M");
    for _ in 0..10 {
        let out = cmd.output().expect("run qemu-img");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return;
        }
        assert!(
            err.contains("Unable to get accurate CPU usage"),
            "{cmd:?}: {err}"
        );
        let _ = fs::remove_file(path);
    }
    panic!("{cmd:?}: qemu-img could not time its key derivation in 10 tries");
}

/// Runs `tool ARGS < input > output`.
fn pipe(tool: &str, args: &[&str], input: &Path, output: &Path) {
    let out = Command::new(tool)
        .args(args)
        .stdin(fs::File::open(input).unwrap())
        .stdout(fs::File::create(output).unwrap())
        .status()
        .unwrap();
    assert!(out.success(), "{tool} {args:?}");
}

/// A sparse raw disk of 9 MiB + 12 KiB: data (some compressible, some not), zero blocks written
/// out, a hole of several MiB, and a tail that is not a whole cluster.
fn raw_disk(path: &Path) -> Vec<u8> {
    let size = (9 << 20) + (12 << 10);
    let mut img = vec![0u8; size];
    let mut x = 0x1234_5678_9abc_def1u64;
    for (b, block) in img.chunks_mut(4096).enumerate() {
        let kind = if (600..2000).contains(&b) { 9 } else { b % 7 };
        match kind {
            0 | 1 => {
                for byte in block.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *byte = x as u8;
                }
            }
            2 | 3 => {
                let line = format!("block {b} of a text file\n");
                for (i, byte) in block.iter_mut().enumerate() {
                    *byte = line.as_bytes()[i % line.len()];
                }
            }
            _ => {} // zeros: written (4..=6) or a hole (9)
        }
    }
    let f = fs::File::create(path).unwrap();
    f.set_len(size as u64).unwrap();
    use std::os::unix::fs::FileExt;
    for (b, block) in img.chunks(4096).enumerate() {
        if !(600..2000).contains(&b) {
            f.write_all_at(block, (b * 4096) as u64).unwrap();
        }
    }
    img
}

#[test]
fn qcow2_and_compressed_raw_import_as_the_raw_image_does() {
    if !["qemu-img", "xz", "zstd", "gzip"].iter().all(|t| have(t)) {
        return;
    }
    let env = Env::new();
    let raw = env.path("disk.raw");
    let disk = raw_disk(&raw);
    let raw_s = raw.to_str().unwrap();
    env.ok(&["image", "import", "raw", raw_s]);
    let want = env.identity("raw");
    assert_eq!(want.1, disk.len() as u64);
    let packs = env.pack_bytes();

    let qcow2 = |name: &str, extra: &[&str]| {
        let out = env.path(name);
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .args(extra)
            .arg(&raw)
            .arg(&out));
        out
    };
    let stream = |name: &str, tool: &str, args: &[&str]| {
        let out = env.path(name);
        pipe(tool, args, &raw, &out);
        out
    };
    let variants = [
        ("qcow2-v2", qcow2("v2.qcow2", &["-o", "compat=0.10"])),
        ("qcow2-v3", qcow2("v3.qcow2", &["-o", "compat=1.1"])),
        (
            "qcow2-small-clusters",
            qcow2("small.qcow2", &["-o", "compat=1.1,cluster_size=4096"]),
        ),
        (
            "qcow2-zlib",
            qcow2("zlib.qcow2", &["-c", "-o", "compat=1.1"]),
        ),
        (
            "qcow2-v2-zlib",
            qcow2("v2zlib.qcow2", &["-c", "-o", "compat=0.10"]),
        ),
        (
            "qcow2-zstd",
            qcow2(
                "zstd.qcow2",
                &["-c", "-o", "compat=1.1,compression_type=zstd"],
            ),
        ),
        ("xz", stream("disk.raw.xz", "xz", &["-c", "-T1"])),
        ("zstd", stream("disk.raw.zst", "zstd", &["-q", "-c"])),
        ("gzip", stream("disk.raw.gz", "gzip", &["-c"])),
    ];
    for (name, file) in &variants {
        env.ok(&["image", "import", name, file.to_str().unwrap()]);
        assert_eq!(
            env.identity(name),
            want,
            "{name}: same digest and size as raw"
        );
        assert_eq!(env.export(name), disk, "{name}: exports byte for byte");
        assert_eq!(env.pack_bytes(), packs, "{name}: stores nothing new");
    }
    env.ok(&["store", "verify"]);
}

#[test]
fn unreadable_images_are_refused_with_the_reason_and_leave_nothing() {
    if !["qemu-img", "xz"].iter().all(|t| have(t)) {
        return;
    }
    let env = Env::new();
    let raw = env.path("disk.raw");
    raw_disk(&raw);
    let img = |name: &str| env.path(name);
    let qemu_img = |args: &[&str]| sh(Command::new("qemu-img").args(args));

    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img("base.qcow2").to_str().unwrap(),
        "4M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        img("child.qcow2").to_str().unwrap(),
    ]);
    luks_qcow2(&img("encrypted.qcow2"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", img("external.data").display()),
        img("external.qcow2").to_str().unwrap(),
        "4M",
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img("whole.qcow2").to_str().unwrap(),
    ]);
    let whole = fs::read(img("whole.qcow2")).unwrap();
    fs::write(img("truncated.qcow2"), &whole[..whole.len() / 2]).unwrap();
    let mut v9 = whole.clone();
    v9[7] = 9;
    fs::write(img("version9.qcow2"), v9).unwrap();
    // A thin image claiming a petabyte: 16 MB of tables, nothing else.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img("huge.qcow2").to_str().unwrap(),
        "1P",
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        raw.to_str().unwrap(),
        img("disk.vmdk").to_str().unwrap(),
    ]);
    pipe("xz", &["-c", "-T1"], &raw, &img("disk.raw.xz"));
    pipe(
        "xz",
        &["-c", "-T1"],
        &img("whole.qcow2"),
        &img("disk.qcow2.xz"),
    );
    let xz = fs::read(img("disk.raw.xz")).unwrap();
    fs::write(img("cut.raw.xz"), &xz[..xz.len() / 2]).unwrap();

    for (file, reason) in [
        ("child.qcow2", "backing file"),
        ("encrypted.qcow2", "encrypted"),
        ("external.qcow2", "external data file"),
        ("truncated.qcow2", "truncated"),
        ("version9.qcow2", "version 9 is not supported"),
        ("disk.vmdk", "is a VMDK image"),
        ("cut.raw.xz", "cut short"),
        ("disk.qcow2.xz", "holds a qcow2 image compressed with xz"),
        ("huge.qcow2", "more than import takes"),
    ] {
        let path = img(file);
        let out = env.run(&["image", "import", "bad", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was imported");
        assert!(
            err.contains(file),
            "{file}: the error names the file: {err}"
        );
        assert!(
            err.contains(reason),
            "{file}: the error says {reason:?}: {err}"
        );
        let list = env.run(&["image", "list", "--json"]);
        let text = String::from_utf8_lossy(&list.stdout);
        assert!(!text.contains("\"bad\""), "{file}: nothing visible: {text}");
        assert_eq!(env.pack_bytes(), 0, "{file}: no pack left behind");
    }
}
