//! `cargo xtask initramfs`: the agent's boot files — Debian's kernel and a small initramfs whose
//! `/init` is the static agent, with the driver modules a server needs for its NIC and disk.
//!
//! Output, in `boot/`: `fleetboot-vmlinuz` and `fleetboot-initrd.img` (the names the iPXE script
//! uses). The kernel package comes from `apt-get download` of what `linux-image-amd64` depends on;
//! `depmod` makes the module index the package does not ship.

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

pub fn run(_args: &[&str]) -> Result<()> {
    build(&root().join("boot")).map(|_| ())
}

/// Builds the kernel and initramfs into `boot_dir`; returns (kernel, initramfs).
pub fn build(boot_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    crate::setup::apt_install(&[
        ("cpio", "cpio"),
        ("kmod", "depmod"),
        ("musl-tools", "musl-gcc"),
    ])?;
    let work = root().join("target/initramfs");
    fs::create_dir_all(&work)?;
    let (kernel, modules_dir, version) = kernel(&work)?;
    let agent = agent()?;

    let tree = work.join("tree");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    for d in ["dev", "proc", "sys", "tmp", "run"] {
        fs::create_dir_all(tree.join(d))?;
    }
    fs::copy(&agent, tree.join("init"))?;
    util::run(Command::new("strip").arg(tree.join("init")))?;

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
    let initrd = boot_dir.join("fleetboot-initrd.img");
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
    let vmlinuz = boot_dir.join("fleetboot-vmlinuz");
    fs::copy(&kernel, &vmlinuz)?;
    eprintln!(
        "initramfs: kernel {version}, {} modules, {} bytes -> {}",
        wanted.len(),
        fs::metadata(&initrd)?.len(),
        initrd.display()
    );
    Ok((vmlinuz, initrd))
}

/// The kernel image and its version (downloaded and unpacked once).
pub fn kernel_image() -> Result<(PathBuf, String)> {
    let work = root().join("target/initramfs");
    fs::create_dir_all(&work)?;
    let (kernel, _, version) = kernel(&work)?;
    Ok((kernel, version))
}

/// Downloads and unpacks the kernel `linux-image-amd64` points to (once); returns its image, its
/// module folder (with `depmod`'s index) and its version.
fn kernel(work: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let depends = || -> Result<String> {
        let out = Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut text = depends()?;
    if !text.contains("Depends: linux-image-") {
        // A fresh machine may not have the package lists yet.
        util::run(Command::new("apt-get").args(["update", "-q"]))?;
        text = depends()?;
    }
    let Some(pkg) = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
    else {
        bail!("cannot tell which kernel linux-image-amd64 means (run apt-get update?)");
    };
    let version = pkg.trim_start_matches("linux-image-").to_string();
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
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(pkg))
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

/// Builds the static agent.
fn agent() -> Result<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    if util::have("rustup") {
        util::run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(Command::new(cargo).current_dir(root()).args([
        "build",
        "--release",
        "--target",
        TARGET,
        "-p",
        "fleetboot-agent",
    ]))?;
    Ok(root().join(format!("target/{TARGET}/release/fleetboot-agent")))
}
