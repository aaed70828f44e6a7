//! `cargo xtask boot-assets [DIR]`: puts the iPXE boot loaders from Debian's `ipxe` package into
//! the boot folder (default `boot/`), checked against the pinned version's SHA-256 sums.
//!
//! Called by whatever needs the loaders (the demo, the end-to-end test), so nobody has to remember
//! it. A Debian update that changes a binary fails here loudly instead of booting something new.
//! Also builds `fleetboot-localboot.efi` (UEFI local boot) from Debian's GRUB, and puts Debian's
//! signed chain for Secure Boot beside them: `shimx64.efi` (shim-signed, signed by Microsoft)
//! and `grubx64.efi` (grub-efi-amd64-signed's network GRUB, signed by Debian, the name shim
//! fetches). Those two are not pinned: apt has checked the packages' signatures, and a shim update
//! is often a revocation that firmware will soon enforce; their versions and sums are recorded.

use crate::initramfs::Arch;
use crate::util::root;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Debian package version the sums below belong to.
pub const IPXE_VERSION: &str = "1.0.0+git-20190125.36a4c85-5.1";

/// (file in the boot folder, where Debian installs it, SHA-256)
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "undionly.kpxe",
        "/usr/lib/ipxe/undionly.kpxe",
        "f09cfbe9bbd39c3f5eb9cdf7386b520a4f5858bbc4438960c5b870c7a8930a7f",
    ),
    (
        "ipxe.efi",
        "/boot/ipxe.efi",
        "67c7f1f8e062968209ca055283ca782f21faf6a18f55dd19848601bbaf8ed7aa",
    ),
    (
        "snponly.efi",
        "/usr/lib/ipxe/snponly.efi",
        "18fc84b69172b9f7d1e6b5274c81121dde429fdacfdc984747f687cfb4f8090b",
    ),
];

pub fn run(args: &[&str]) -> Result<()> {
    let (arm64, args) = match args {
        ["--arch", "arm64", rest @ ..] => (true, rest),
        ["--arch", "amd64", rest @ ..] => (false, rest),
        rest => (false, rest),
    };
    let dir = match args {
        [] => root().join("boot"),
        [d] => PathBuf::from(d),
        _ => bail!("usage: cargo xtask boot-assets [--arch amd64|arm64] [DIR]"),
    };
    if arm64 {
        install_arm64(&dir)
    } else {
        install(&dir)
    }
}

/// Puts Debian's signed chain for ARM64 into `dir`: `shimaa64.efi` (what DHCP names for UEFI
/// ARM64) and `grubaa64.efi` (the signed network GRUB, under the name shim fetches), recorded in
/// `ASSETS-arm64.sha256`. There is no ARM64 iPXE in Debian: ARM64 machines boot this chain with
/// Secure Boot on or off.
pub fn install_arm64(dir: &Path) -> Result<()> {
    let chain = signed_chain_for(Arch::Arm64)?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut record = format!("# ARM64 signed chain: {}\n", chain.versions);
    for (name, source) in [
        ("shimaa64.efi", &chain.shim),
        ("grubaa64.efi", &chain.grub_net),
    ] {
        let dest = dir.join(name);
        fs::copy(source, &dest)
            .with_context(|| format!("cannot copy {} to {}", source.display(), dest.display()))?;
        record.push_str(&format!("{}  {name}\n", sha256_of(&dest)?));
    }
    fs::write(dir.join("ASSETS-arm64.sha256"), record)?;
    eprintln!(
        "boot assets: the ARM64 signed chain ({}) in {}",
        chain.versions,
        dir.display()
    );
    Ok(())
}

/// Installs the loaders into `dir` (idempotent).
pub fn install(dir: &Path) -> Result<()> {
    crate::setup::apt_install(&[("ipxe", "/usr/lib/ipxe/undionly.kpxe")])?;
    let version = String::from_utf8(
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Version}", "ipxe"])
            .output()
            .context("cannot run dpkg-query")?
            .stdout,
    )?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut record =
        format!("# iPXE boot loaders from Debian's ipxe {version} (pinned: {IPXE_VERSION})\n");
    for (name, source, sha256) in ASSETS {
        let actual = sha256_of(Path::new(source))?;
        if actual != *sha256 {
            bail!(
                "{source} (ipxe {version}) has SHA-256 {actual}, not the pinned {sha256} of ipxe {IPXE_VERSION}: \
                 check the new binary and update xtask/src/boot_assets.rs"
            );
        }
        let dest = dir.join(name);
        fs::copy(source, &dest)
            .with_context(|| format!("cannot copy {source} to {}", dest.display()))?;
        record.push_str(&format!("{sha256}  {name}\n"));
    }
    let chain = signed_chain()?;
    for (name, source) in [
        ("shimx64.efi", &chain.shim),
        ("grubx64.efi", &chain.grub_net),
    ] {
        let dest = dir.join(name);
        fs::copy(source, &dest)
            .with_context(|| format!("cannot copy {} to {}", source.display(), dest.display()))?;
        record.push_str(&format!("{}  {name}\n", sha256_of(&dest)?));
    }
    record.push_str(&format!("# signed chain: {}\n", chain.versions));
    fs::write(dir.join("ASSETS.sha256"), record)?;
    local_boot_efi(dir)?;
    eprintln!(
        "boot assets: iPXE {version} loaders and the signed chain ({}) in {}",
        chain.versions,
        dir.display()
    );
    Ok(())
}

fn sha256_of(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run sha256sum on {}", path.display()))?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Builds `fleetboot-localboot.efi`: a standalone GRUB (Debian's grub-efi-amd64-bin) that finds
/// the disk holding `\EFI\BOOT\BOOTX64.EFI` and chainloads it. Under UEFI, iPXE's `exit` leaves
/// OVMF in its setup menu (docs/firmware.md); this is how the local-disk script boots the disk.
fn local_boot_efi(dir: &Path) -> Result<()> {
    crate::setup::apt_install(&[
        ("grub-efi-amd64-bin", "/usr/lib/grub/x86_64-efi/chain.mod"),
        ("grub-common", "grub-mkstandalone"),
    ])?;
    let cfg = dir.join(".localboot-grub.cfg");
    fs::write(
        &cfg,
        // The modules are loaded by hand: without them `search` finds no device.
        "insmod part_msdos\ninsmod part_gpt\ninsmod fat\ninsmod search_fs_file\ninsmod chain\n\
         search --no-floppy --file /EFI/BOOT/BOOTX64.EFI --set=root\n\
         chainloader /EFI/BOOT/BOOTX64.EFI\nboot\n",
    )?;
    let out = dir.join("fleetboot-localboot.efi");
    let status = Command::new("grub-mkstandalone")
        .args(["-O", "x86_64-efi", "--locales=", "--fonts=", "--themes="])
        .arg("-o")
        .arg(&out)
        .arg(format!("boot/grub/grub.cfg={}", cfg.display()))
        .status()
        .context("cannot run grub-mkstandalone")?;
    fs::remove_file(&cfg)?;
    if !status.success() {
        bail!("grub-mkstandalone failed");
    }
    Ok(())
}

/// Debian's signed UEFI boot chain, unpacked from its packages.
pub struct SignedChain {
    /// shim, signed by Microsoft's UEFI CA; carries Debian's CA for what it loads.
    pub shim: PathBuf,
    /// GRUB for network boot (TFTP; config from `/grub/grub.cfg` on its server), signed by Debian.
    pub grub_net: PathBuf,
    /// GRUB for a disk (config from `/EFI/debian/grub.cfg` beside it), signed by Debian.
    pub grub: PathBuf,
    /// The packages' versions, for the record.
    pub versions: String,
}

/// Debian's signed packages for `arch`: the shim, then GRUB.
fn signed_packages(arch: Arch) -> [&'static str; 2] {
    match arch {
        Arch::Amd64 => ["shim-signed", "grub-efi-amd64-signed"],
        Arch::Arm64 => ["shim-signed:arm64", "grub-efi-arm64-signed:arm64"],
    }
}

/// `shim-signed VERSION, grub-efi-amd64-signed VERSION` as apt would download them now.
fn candidates(arch: Arch) -> Result<String> {
    let mut versions = Vec::new();
    for pkg in signed_packages(arch) {
        let out = Command::new("apt-cache").args(["policy", pkg]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(version) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate: "))
            .filter(|v| *v != "(none)")
        else {
            bail!("apt knows no {pkg} (run apt-get update?)");
        };
        versions.push(format!("{pkg} {version}"));
    }
    Ok(versions.join(", "))
}

/// Downloads and unpacks `shim-signed` and `grub-efi-amd64-signed` (x86-64) or their arm64
/// builds into `target/signed-boot[-arm64]`: once, and again whenever apt's candidate versions
/// change (a shim update is often a revocation). Downloaded, not installed: installing them
/// would set up this machine's own boot.
pub fn signed_chain() -> Result<SignedChain> {
    signed_chain_for(Arch::Amd64)
}

/// [`signed_chain`] for `arch` (ARM64: dpkg learns the architecture first).
pub fn signed_chain_for(arch: Arch) -> Result<SignedChain> {
    let work = root().join(format!("target/signed-boot{}", arch.suffix()));
    let unpacked = work.join("root");
    let done = work.join("versions");
    let packages = signed_packages(arch);
    // Unknown before the first `apt-get update`: asked again after the download below.
    let wanted = candidates(arch).ok();
    let have = fs::read_to_string(&done).unwrap_or_default();
    if have.is_empty() || wanted.as_ref().is_some_and(|w| *w != have) {
        let debs = work.join("debs");
        if debs.exists() {
            fs::remove_dir_all(&debs)?;
        }
        fs::create_dir_all(&debs)?;
        let download = || {
            Command::new("apt-get")
                .current_dir(&debs)
                .arg("download")
                .args(packages)
                .status()
        };
        if !download().context("cannot run apt-get download")?.success() {
            // A fresh machine may not have the package lists yet, nor know the architecture.
            crate::initramfs::add_architecture(arch)?;
            crate::util::run(Command::new("apt-get").args(["update", "-q"]))?;
            if !download()?.success() {
                bail!("apt-get download {} failed", packages.join(" "));
            }
        }
        if unpacked.exists() {
            fs::remove_dir_all(&unpacked)?;
        }
        for deb in fs::read_dir(&debs)?.flatten().map(|e| e.path()) {
            crate::util::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
        }
        let versions = match wanted {
            Some(w) => w,
            None => candidates(arch)?,
        };
        fs::write(&done, versions)?;
    }
    let (shim, grub_dir, efi) = match arch {
        Arch::Amd64 => ("shimx64", "x86_64-efi-signed", "x64"),
        Arch::Arm64 => ("shimaa64", "arm64-efi-signed", "aa64"),
    };
    let chain = SignedChain {
        shim: unpacked.join(format!("usr/lib/shim/{shim}.efi.signed")),
        grub_net: unpacked.join(format!("usr/lib/grub/{grub_dir}/grubnet{efi}.efi.signed")),
        grub: unpacked.join(format!("usr/lib/grub/{grub_dir}/grub{efi}.efi.signed")),
        versions: fs::read_to_string(&done)?,
    };
    for f in [&chain.shim, &chain.grub_net, &chain.grub] {
        if !f.is_file() {
            bail!("{} is missing from Debian's signed packages", f.display());
        }
    }
    Ok(chain)
}
