//! `cargo xtask initramfs`: the agent's boot files — Debian's kernel and a small initramfs whose
//! `/init` is the static agent, with the driver modules a server needs for its NIC and disk.
//!
//! Output, in `boot/`: `fleetboot-vmlinuz` and `fleetboot-initrd.img` (the names the iPXE script
//! uses). The kernel package comes from `apt-get download` of what `linux-image-amd64` depends on;
//! `depmod` makes the module index the package does not ship.
//!
//! `--arch arm64`: the same for ARM64 servers, beside them (`fleetboot-vmlinuz-arm64`,
//! `fleetboot-initrd-arm64.img`): Debian's arm64 kernel (dpkg learns the foreign architecture to
//! download it) and the agent cross-built for `aarch64-unknown-linux-musl` with Debian's
//! `gcc-aarch64-linux-gnu` as C compiler (zstd) and linker.

use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Drivers for the NICs and disk controllers servers have (their dependencies come along).
const MODULES: &[&str] = &[
    // virtual machines
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    // NICs
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "i40e",
    "ice",
    "mlx5_core",
    "bnxt_en",
    "tg3",
    "r8169",
    // disks
    "ahci",
    "ata_piix",
    "nvme",
    "megaraid_sas",
    "mpt3sas",
    "sd_mod",
    // the BMC's system interface and its device node (inspection asks the BMC its address)
    "ipmi_si",
    "ipmi_devintf",
];

/// A CPU architecture the agent's boot files are built for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Debian's name for it.
    fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
    fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
        }
    }
    /// What the file names in `boot/` end with (before `.img`).
    pub fn suffix(self) -> &'static str {
        match self {
            Arch::Amd64 => "",
            Arch::Arm64 => "-arm64",
        }
    }
    fn strip(self) -> &'static str {
        match self {
            Arch::Amd64 => "strip",
            Arch::Arm64 => "aarch64-linux-gnu-strip",
        }
    }
}

pub fn run(args: &[&str]) -> Result<()> {
    let arch = match args {
        [] | ["--arch", "amd64"] => Arch::Amd64,
        ["--arch", "arm64"] => Arch::Arm64,
        _ => bail!("usage: cargo xtask initramfs [--arch amd64|arm64]"),
    };
    build_for(&root().join("boot"), arch).map(|_| ())
}

/// Builds the x86-64 kernel and initramfs into `boot_dir`; returns (kernel, initramfs).
pub fn build(boot_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    build_for(boot_dir, Arch::Amd64)
}

/// Builds `arch`'s kernel and initramfs into `boot_dir`; returns (kernel, initramfs).
pub fn build_for(boot_dir: &Path, arch: Arch) -> Result<(PathBuf, PathBuf)> {
    crate::setup::apt_install(&[
        ("cpio", "cpio"),
        ("kmod", "depmod"),
        ("musl-tools", "musl-gcc"),
    ])?;
    if arch == Arch::Arm64 {
        crate::setup::apt_install(&[
            ("gcc-aarch64-linux-gnu", "aarch64-linux-gnu-gcc"),
            ("binutils-aarch64-linux-gnu", "aarch64-linux-gnu-strip"),
            // The cross compiler's C library headers (zstd's C needs them): only a Recommends
            // of gcc-aarch64-linux-gnu, which apt_install does not take.
            (
                "libc6-dev-arm64-cross",
                "/usr/aarch64-linux-gnu/include/bits/libc-header-start.h",
            ),
        ])?;
    }
    let work = root().join("target/initramfs");
    fs::create_dir_all(&work)?;
    let (kernel, modules_dir, version) = kernel(&work, arch)?;
    let agent = agent(arch)?;

    let tree = work.join(format!("tree-{}", arch.debian()));
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    for d in ["dev", "proc", "sys", "tmp", "run"] {
        fs::create_dir_all(tree.join(d))?;
    }
    fs::copy(&agent, tree.join("init"))?;
    util::run(Command::new(arch.strip()).arg(tree.join("init")))?;

    // The modules, their dependencies, and an index of just those.
    let deps_text = fs::read_to_string(modules_dir.join("modules.dep"))?;
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for line in deps_text.lines() {
        let Some((file, deps)) = line.split_once(':') else {
            continue;
        };
        let name = file
            .rsplit('/')
            .next()
            .unwrap_or(file)
            .trim_end_matches(".ko")
            .replace('-', "_");
        if MODULES.contains(&name.as_str()) {
            wanted.insert(file.to_string());
            wanted.extend(deps.split_whitespace().map(str::to_string));
        }
    }
    let dest = tree.join("lib/modules").join(&version);
    for file in &wanted {
        let to = dest.join(file);
        fs::create_dir_all(to.parent().context("module path")?)?;
        fs::copy(modules_dir.join(file), &to).with_context(|| format!("module {file}"))?;
    }
    let names: BTreeSet<String> = wanted
        .iter()
        .map(|f| {
            f.rsplit('/')
                .next()
                .unwrap_or(f)
                .trim_end_matches(".ko")
                .replace('-', "_")
        })
        .collect();
    let dep: String = deps_text
        .lines()
        .filter(|l| l.split_once(':').is_some_and(|(f, _)| wanted.contains(f)))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(dest.join("modules.dep"), dep)?;
    let alias: String = fs::read_to_string(modules_dir.join("modules.alias"))?
        .lines()
        .filter(|l| {
            l.rsplit(' ')
                .next()
                .is_some_and(|m| names.contains(&m.replace('-', "_")))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(dest.join("modules.alias"), alias)?;

    // newc cpio (what the kernel unpacks), gzip-compressed.
    fs::create_dir_all(boot_dir)?;
    let initrd = boot_dir.join(format!("fleetboot-initrd{}.img", arch.suffix()));
    let list = Command::new("sh")
        .current_dir(&tree)
        .arg("-c")
        .arg(format!(
            "find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 --reproducible | gzip -9 -n > {}",
            initrd.display()
        ))
        .status()
        .context("cannot run cpio")?;
    if !list.success() {
        bail!("building the initramfs failed");
    }
    let vmlinuz = boot_dir.join(format!("fleetboot-vmlinuz{}", arch.suffix()));
    fs::copy(&kernel, &vmlinuz)?;
    eprintln!(
        "initramfs: kernel {version}, {} modules, {} bytes -> {}",
        wanted.len(),
        fs::metadata(&initrd)?.len(),
        initrd.display()
    );
    Ok((vmlinuz, initrd))
}

/// The kernel image for `arch` and its version (downloaded and unpacked once).
pub fn kernel_image(arch: Arch) -> Result<(PathBuf, String)> {
    let work = root().join("target/initramfs");
    fs::create_dir_all(&work)?;
    let (kernel, _, version) = kernel(&work, arch)?;
    Ok((kernel, version))
}

/// Has dpkg (and so apt, after its next update) know `arch`'s packages, if it is foreign here.
pub fn add_architecture(arch: Arch) -> Result<()> {
    if arch != Arch::Amd64 {
        util::run(Command::new("dpkg").args(["--add-architecture", arch.debian()]))?;
    }
    Ok(())
}

/// Downloads and unpacks the kernel `linux-image-ARCH` points to (once); returns its image, its
/// module folder (with `depmod`'s index) and its version.
fn kernel(work: &Path, arch: Arch) -> Result<(PathBuf, PathBuf, String)> {
    let meta = match arch {
        Arch::Amd64 => "linux-image-amd64".to_string(),
        Arch::Arm64 => "linux-image-arm64:arm64".to_string(),
    };
    let depends = || -> Result<String> {
        let out = Command::new("apt-cache")
            .args(["depends", &meta])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut text = depends()?;
    if !text.contains("Depends: linux-image-") {
        // A fresh machine may not have the package lists yet, nor know the foreign architecture.
        add_architecture(arch)?;
        util::run(Command::new("apt-get").args(["update", "-q"]))?;
        text = depends()?;
    }
    let Some(pkg) = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
    else {
        bail!("cannot tell which kernel {meta} means (run apt-get update?)");
    };
    let version = pkg
        .trim_start_matches("linux-image-")
        .trim_end_matches(&format!(":{}", arch.debian()))
        .to_string();
    let unpacked = work.join(format!("kernel-{version}"));
    if !unpacked.join("done").exists() {
        let debs = work.join("debs");
        fs::create_dir_all(&debs)?;
        util::run(
            Command::new("apt-get")
                .current_dir(&debs)
                .args(["download", pkg]),
        )?;
        let deb = fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy()
                        .starts_with(&format!("linux-image-{version}_"))
                })
            })
            .context("the kernel package did not arrive")?;
        if unpacked.exists() {
            fs::remove_dir_all(&unpacked)?;
        }
        util::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
        util::run(
            Command::new("depmod")
                .arg("-b")
                .arg(&unpacked)
                .arg(&version),
        )?;
        fs::File::create(unpacked.join("done"))?.write_all(b"ok\n")?;
    }
    Ok((
        unpacked.join(format!("boot/vmlinuz-{version}")),
        unpacked.join(format!("lib/modules/{version}")),
        version,
    ))
}

/// Builds the static agent for `arch`.
fn agent(arch: Arch) -> Result<PathBuf> {
    let target = arch.rust_target();
    if util::have("rustup") {
        util::run(Command::new("rustup").args(["target", "add", target]))?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(root()).args([
        "build",
        "--release",
        "--target",
        target,
        "-p",
        "fleetboot-agent",
    ]);
    if arch == Arch::Arm64 {
        // Debian's cross compiler compiles zstd's C and links the static binary (musl's own
        // start files come with Rust's target).
        build
            .env("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc")
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER",
                "aarch64-linux-gnu-gcc",
            );
    }
    util::run(&mut build)?;
    Ok(root().join(format!("target/{target}/release/fleetboot-agent")))
}
