//! `cargo xtask images`: the demo disk images the end-to-end test installs — small disks bootable
//! by BIOS and by UEFI with Secure Boot on or off, made without mounting anything: an MBR, one
//! FAT16 partition with SYSLINUX for BIOS and Debian's signed chain for UEFI (shim as
//! `\EFI\BOOT\BOOTX64.EFI`, the signed GRUB beside it, its config in `\EFI\debian\grub.cfg`),
//! the same Debian (signed) kernel as the agent's and a tiny initramfs (busybox) whose `/init`
//! prints `FLEETBOOT-MARKER <name>` on the serial console and powers off.

use crate::initramfs::Arch;
use crate::util::{self, root};
use anyhow::{Context, Result};
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Size of each demo disk and of its partition (starting at 1 MiB).
const DISK_BYTES: u64 = 48 << 20;
const PART_OFFSET: u64 = 1 << 20;

pub const PACKAGES: &[(&str, &str)] = &[
    ("syslinux", "syslinux"),
    ("syslinux-common", "/usr/lib/syslinux/mbr/mbr.bin"),
    ("mtools", "mcopy"),
    ("dosfstools", "mkfs.fat"),
    ("fdisk", "sfdisk"),
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
];

pub fn run(args: &[&str]) -> Result<()> {
    match args {
        [] => {}
        ["--os", "debian"] => return crate::debian_image::build().map(|_| ()),
        _ => anyhow::bail!("usage: cargo xtask images [--os debian]"),
    }
    let dir = root().join("images/out");
    for (name, extra) in [("demo@1", ""), ("demo@2", "second version\n")] {
        let img = build(&dir, name, extra)?;
        eprintln!("images: {}", img.display());
    }
    Ok(())
}

/// Builds the demo image `name` (its marker) into `dir`; `extra` adds a file so versions differ.
pub fn build(dir: &Path, name: &str, extra: &str) -> Result<PathBuf> {
    build_for(dir, name, extra, Arch::Amd64)
}

/// [`build`] for `arch`. The ARM64 image has no SYSLINUX (UEFI only): its loader is
/// `\EFI\BOOT\BOOTAA64.EFI` (the arm64 shim), its kernel and busybox are Debian's arm64 ones and
/// its console is the PL011 (`ttyAMA0`).
pub fn build_for(dir: &Path, name: &str, extra: &str, arch: Arch) -> Result<PathBuf> {
    crate::setup::apt_install(PACKAGES)?;
    let (kernel, _) = crate::initramfs::kernel_image(arch)?;
    let work = dir.join(format!("{}.work", name.replace('@', "-")));
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(work.join("initrd/bin"))?;
    fs::create_dir_all(work.join("initrd/dev"))?;
    fs::create_dir_all(work.join("initrd/proc"))?;
    fs::copy(busybox(arch)?, work.join("initrd/bin/busybox"))?;
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         echo \"FLEETBOOT-MARKER {name} booted from $(/bin/busybox cat /proc/cmdline | /bin/busybox cut -d' ' -f1)\"\n\
         /bin/busybox poweroff -f\n"
    );
    fs::write(work.join("initrd/init"), init)?;
    util::run(
        Command::new("chmod")
            .arg("755")
            .arg(work.join("initrd/init")),
    )?;
    let initrd = work.join("initrd.img");
    util::run(Command::new("sh").current_dir(work.join("initrd")).arg("-c").arg(format!(
        "find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 --reproducible | gzip -9 -n > {}",
        initrd.display()
    )))?;

    // The FAT partition, with SYSLINUX, the kernel and the initramfs.
    let part = work.join("part.img");
    fs::File::create(&part)?.set_len(DISK_BYTES - PART_OFFSET)?;
    util::run(
        Command::new("mkfs.fat")
            .args(["-F", "16", "-n", "DEMO", "-i", "12345678"])
            .arg(&part),
    )?;
    if arch == Arch::Amd64 {
        util::run(Command::new("syslinux").arg("--install").arg(&part))?;
    }
    let cfg = work.join("syslinux.cfg");
    fs::write(
        &cfg,
        "SERIAL 0 115200\nDEFAULT demo\nPROMPT 0\nTIMEOUT 0\nLABEL demo\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND root=disk console=ttyS0 quiet\n",
    )?;
    let note = work.join("version.txt");
    fs::write(&note, format!("{name}\n{extra}"))?;
    // UEFI: the same partition carries the signed chain as a removable disk's loader: shim as
    // \EFI\BOOT\BOOTX64.EFI loads grubx64.efi from beside it, which reads \EFI\debian\grub.cfg
    // and boots the kernel shim has checked (Secure Boot on); with it off, the same chain runs.
    let chain = crate::boot_assets::signed_chain_for(arch)?;
    let (console, loader, grub) = match arch {
        Arch::Amd64 => ("ttyS0", "BOOTX64.EFI", "grubx64.efi"),
        Arch::Arm64 => ("ttyAMA0", "BOOTAA64.EFI", "grubaa64.efi"),
    };
    let grub_cfg = work.join("grub.cfg");
    fs::write(
        &grub_cfg,
        format!("set timeout=0\nlinux /vmlinuz root=disk console={console} quiet\ninitrd /initrd.img\nboot\n"),
    )?;
    util::run(Command::new("mmd").arg("-i").arg(&part).args([
        "::EFI",
        "::EFI/BOOT",
        "::EFI/debian",
    ]))?;
    for (from, to) in [
        (&chain.shim, format!("::EFI/BOOT/{loader}")),
        (&chain.grub, format!("::EFI/BOOT/{grub}")),
        (&grub_cfg, "::EFI/debian/grub.cfg".to_string()),
    ] {
        util::run(Command::new("mcopy").arg("-i").arg(&part).arg(from).arg(to))?;
    }
    for f in [&kernel, &initrd, &cfg, &note] {
        let dest = match f.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.starts_with("vmlinuz") => "::vmlinuz".to_string(),
            Some(n) => format!("::{n}"),
            None => continue,
        };
        util::run(Command::new("mcopy").arg("-i").arg(&part).arg(f).arg(dest))?;
    }

    // The disk: MBR boot code, one bootable FAT16 (LBA) partition at 1 MiB, the partition data.
    let disk = dir.join(format!("{}.img", name.replace('@', "-")));
    fs::create_dir_all(dir)?;
    let _ = fs::remove_file(&disk);
    fs::File::create(&disk)?.set_len(DISK_BYTES)?;
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    sfdisk
        .stdin
        .take()
        .context("sfdisk stdin")?
        .write_all(b"label: dos\nlabel-id: 0x12345678\nstart=2048, type=e, bootable\n")?;
    if !sfdisk.wait()?.success() {
        anyhow::bail!("sfdisk failed on {}", disk.display());
    }
    let mbr = fs::read("/usr/lib/syslinux/mbr/mbr.bin")?;
    let mut f = fs::OpenOptions::new().write(true).open(&disk)?;
    f.write_all(&mbr[..440.min(mbr.len())])?;
    f.seek(SeekFrom::Start(PART_OFFSET))?;
    f.write_all(&fs::read(&part)?)?;
    f.sync_all()?;
    fs::remove_dir_all(&work)?;
    Ok(disk)
}

/// A static busybox for `arch`: this machine's own, or Debian's arm64 build, downloaded and
/// unpacked once into `target/busybox-arm64`.
fn busybox(arch: Arch) -> Result<PathBuf> {
    if arch == Arch::Amd64 {
        return Ok(PathBuf::from("/bin/busybox"));
    }
    let work = root().join("target/busybox-arm64");
    // Debian 12 ships it in /bin, later releases in /usr/bin.
    let unpacked = || {
        ["root/bin/busybox", "root/usr/bin/busybox"]
            .map(|p| work.join(p))
            .into_iter()
            .find(|p| p.is_file())
    };
    if unpacked().is_none() {
        let debs = work.join("debs");
        fs::create_dir_all(&debs)?;
        let download = || {
            Command::new("apt-get")
                .current_dir(&debs)
                .args(["download", "busybox-static:arm64"])
                .status()
        };
        if !download()?.success() {
            crate::initramfs::add_architecture(arch)?;
            util::run(Command::new("apt-get").args(["update", "-q"]))?;
            if !download()?.success() {
                anyhow::bail!("apt-get download busybox-static:arm64 failed");
            }
        }
        for deb in fs::read_dir(&debs)?.flatten().map(|e| e.path()) {
            util::run(
                Command::new("dpkg")
                    .arg("-x")
                    .arg(&deb)
                    .arg(work.join("root")),
            )?;
        }
    }
    unpacked().context("busybox-static:arm64 has no busybox in bin/ or usr/bin/")
}
