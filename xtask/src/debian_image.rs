//! `cargo xtask images --os debian`: a Debian 12 cloud image as operators get one — GPT, a BIOS
//! boot partition, an EFI system partition with GRUB as `\EFI\BOOT\BOOTX64.EFI`, ext4 root last
//! (so growpart can grow it), the Debian cloud kernel, systemd, cloud-init (NoCloud), OpenSSH,
//! cloud-guest-utils; no SSH host keys and an empty machine-id, so every machine installed from it
//! becomes itself on its first boot. Two versions: 2 is 1 plus one package, for the delta
//! reimage. Output: `target/os-images/debian-rN/debian-{1,2}.qcow2` (N: the recipe) (zlib-compressed clusters, as
//! Debian publishes them), cached: a stage is rebuilt only when its output is missing.
//!
//! Made from Debian's packages only (debootstrap, then apt in the chroot), without mounting any
//! filesystem but the chroot's /proc: the root filesystem is `mkfs.ext4 -d`, the ESP is made by
//! mtools, and GRUB's images come from the image's own `grub-mkimage`: `core.img` goes into the
//! BIOS boot partition and `boot.img` into the MBR, patched as `grub-bios-setup` would patch them
//! (which cannot work on an image file: it probes the host's devices). This host kernel has no
//! vfat and shows no partitions of loop devices, so none of that is used.

use crate::os_images::{apt_get, remove_stale_tree, ProcMount, MIRROR, POLICY_RC_D, SUITE};
use crate::util::{self, root, run};
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The disk the image describes, and its layout (MiB): BIOS boot 1–4, ESP 4–128, root to the end.
const DISK_MIB: u64 = 2048;
const BIOS_START_MIB: u64 = 1;
const ESP_START_MIB: u64 = 4;
const ROOT_START_MIB: u64 = 128;
/// The root filesystem's UUID: fixed, so both versions' GRUB and fstab name the same one.
const ROOT_UUID: &str = "8a1c3e0a-5f0b-4d3e-9b1e-f1eeb0070001";

/// Bumped whenever what the image holds or how it is configured changes: the cache is kept per
/// recipe, so a changed recipe is built afresh.
const RECIPE: u32 = 3;

/// What the image holds beyond minbase.
const PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "cloud-init",
    "cloud-guest-utils",
    "openssh-server",
    "sudo",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
    "iproute2",
    "initramfs-tools",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
];
/// Version 2 adds one package: the reimage moves what it changed.
const V2_PACKAGES: &[&str] = &["tree"];

/// GRUB's modules built into both loaders (no module is loaded from disk later).
const GRUB_MODULES: &[&str] = &[
    "part_gpt",
    "part_msdos",
    "ext2",
    "fat",
    "search",
    "search_fs_uuid",
    "normal",
    "linux",
    "configfile",
    "echo",
    "test",
    "serial",
    "terminal",
    "gzio",
    "boot",
    "ls",
    "cat",
];

/// Host tools the build runs (package, command).
pub const HOST_PACKAGES: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("e2fsprogs", "mkfs.ext4"),
    ("dosfstools", "mkfs.fat"),
    ("mtools", "mcopy"),
    ("fdisk", "sfdisk"),
    ("qemu-utils", "qemu-img"),
];

/// The two versions' qcow2 files, built if missing.
pub fn build() -> Result<[PathBuf; 2]> {
    crate::setup::apt_install(HOST_PACKAGES)?;
    let dir = root().join(format!("target/os-images/debian-r{RECIPE}"));
    fs::create_dir_all(&dir)?;
    let tree1 = dir.join("tree-1");
    let tree2 = dir.join("tree-2");
    if !tree1.is_dir() {
        build_tree(&dir, &tree1, None, PACKAGES)?;
    }
    if !tree2.is_dir() {
        build_tree(&dir, &tree2, Some(&tree1), V2_PACKAGES)?;
    }
    let mut out = Vec::new();
    for (version, tree) in [(1, &tree1), (2, &tree2)] {
        let qcow2 = dir.join(format!("debian-{version}.qcow2"));
        if !qcow2.is_file() {
            make_disk(&dir, tree, &qcow2)?;
        }
        eprintln!("images: {}", qcow2.display());
        out.push(qcow2);
    }
    Ok([out[0].clone(), out[1].clone()])
}

/// A tree: debootstrap (or a copy of `base`) plus `packages`, configured as a cloud image.
fn build_tree(dir: &Path, tree: &Path, base: Option<&Path>, packages: &[&str]) -> Result<()> {
    let started = Instant::now();
    let tmp = dir.join(format!(
        "{}.tmp",
        tree.file_name().and_then(|n| n.to_str()).unwrap_or("tree")
    ));
    remove_stale_tree(&tmp)?;
    match base {
        None => {
            eprintln!("images: debootstrap of Debian {SUITE} (takes a few minutes)");
            run(Command::new("debootstrap")
                .args(["--variant=minbase", SUITE])
                .arg(&tmp)
                .arg(MIRROR))?;
        }
        Some(base) => run(Command::new("cp").arg("-a").arg(base).arg(&tmp))?,
    }
    let policy = tmp.join("usr/sbin/policy-rc.d");
    fs::write(&policy, POLICY_RC_D)?;
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o755))?;
    {
        let _proc = ProcMount::new(&tmp)?;
        apt_get(&tmp, &["-o", "Acquire::Languages=none", "update"])?;
        let mut install = vec!["install", "--no-install-recommends"];
        install.extend_from_slice(packages);
        apt_get(&tmp, &install)?;
        apt_get(&tmp, &["clean"])?;
    }
    fs::remove_file(&policy)?;
    configure(&tmp)?;
    fs::rename(&tmp, tree)?;
    eprintln!(
        "images: tree {} built in {:.0} s",
        tree.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What makes the tree a cloud image: the root by UUID, GRUB's menu, cloud-init reading NoCloud
/// only, and nothing one machine must not share with another.
fn configure(tree: &Path) -> Result<()> {
    let write = |rel: &str, text: &str| -> Result<()> {
        let path = tree.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    write(
        "etc/fstab",
        &format!("UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"),
    )?;
    let cmdline = format!("root=UUID={ROOT_UUID} ro console=tty0 console=ttyS0,115200");
    write(
        "boot/grub/grub.cfg",
        &format!(
            "serial --unit=0 --speed=115200\nterminal_input console serial\nterminal_output console serial\n\
             set timeout=1\nmenuentry 'Debian GNU/Linux 12' {{\n  search --no-floppy --fs-uuid --set=root {ROOT_UUID}\n  \
             linux /vmlinuz {cmdline}\n  initrd /initrd.img\n}}\n"
        ),
    )?;
    // Its detection script reads a datasource_list on one line only. C.UTF-8 is built into the
    // C library: minbase has no locales to generate (Debian's locale-gen takes no arguments, so
    // cloud-init's default en_US.UTF-8 would fail its locale module).
    write(
        "etc/cloud/cloud.cfg.d/90_fleetboot.cfg",
        "datasource_list: [ NoCloud, None ]\nlocale: C.UTF-8\n",
    )?;
    write(
        "etc/network/interfaces",
        "auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/*\n",
    )?;
    write("etc/hostname", "")?;
    write("etc/machine-id", "")?;
    let _ = fs::remove_file(tree.join("var/lib/dbus/machine-id"));
    for entry in fs::read_dir(tree.join("etc/ssh"))? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ssh_host_"))
        {
            fs::remove_file(&path)?;
        }
    }
    for link in ["vmlinuz", "initrd.img"] {
        if fs::symlink_metadata(tree.join(link)).is_err() {
            bail!("the tree has no /{link} (did the kernel install?)");
        }
    }
    Ok(())
}

/// The GPT disk of `tree`, as a compressed qcow2 at `out`.
fn make_disk(dir: &Path, tree: &Path, out: &Path) -> Result<()> {
    let started = Instant::now();
    let work = dir.join("disk.work");
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(&work)?;
    let raw = work.join("disk.raw");
    fs::File::create(&raw)?.set_len(DISK_MIB << 20)?;
    let sectors = |mib: u64| mib << 11;
    // sfdisk stops the last partition before the backup GPT.
    util::run_with_input(
        Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&raw),
        &format!(
            "label: gpt\n\
             start={}, size={}, type=21686148-6449-6E6F-744E-656564454649, name=bios\n\
             start={}, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC3B9, name=esp\n\
             start={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n",
            sectors(BIOS_START_MIB),
            sectors(ESP_START_MIB - BIOS_START_MIB),
            sectors(ESP_START_MIB),
            sectors(ROOT_START_MIB - ESP_START_MIB),
            sectors(ROOT_START_MIB),
        ),
    )?;
    let disk = fs::OpenOptions::new().read(true).write(true).open(&raw)?;

    // Root: the tree as ext4, copied in sparse.
    let root_len = (DISK_MIB - ROOT_START_MIB - 1) << 20;
    let root_img = work.join("root.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-U", ROOT_UUID, "-E"])
        .arg(format!("hash_seed={ROOT_UUID}"))
        .arg("-d")
        .arg(tree)
        .arg(&root_img)
        .arg(format!("{}k", root_len >> 10)))?;
    copy_sparse(&root_img, &disk, ROOT_START_MIB << 20)?;

    // GRUB, from the image's own packages: the early config finds the root and reads its menu.
    let early = "/tmp/fleetboot-early.cfg";
    fs::write(
        tree.join(early.trim_start_matches('/')),
        format!(
            "search --no-floppy --fs-uuid --set=root {ROOT_UUID}\nset prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n"
        ),
    )?;
    for (format, output) in [
        ("i386-pc", "/tmp/fleetboot-core.img"),
        ("x86_64-efi", "/tmp/fleetboot-bootx64.efi"),
    ] {
        run(Command::new("chroot")
            .arg(tree)
            .args([
                "grub-mkimage",
                "-O",
                format,
                "-o",
                output,
                "-c",
                early,
                "-p",
                "/boot/grub",
            ])
            .args(GRUB_MODULES)
            .args(if format == "i386-pc" {
                &["biosdisk"][..]
            } else {
                &[][..]
            }))?;
    }
    let take = |rel: &str| -> Result<Vec<u8>> {
        let path = tree.join(rel.trim_start_matches('/'));
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        fs::remove_file(&path)?;
        Ok(bytes)
    };
    let core = take("/tmp/fleetboot-core.img")?;
    let efi = take("/tmp/fleetboot-bootx64.efi")?;
    let _ = fs::remove_file(tree.join(early.trim_start_matches('/')));
    let boot = fs::read(tree.join("usr/lib/grub/i386-pc/boot.img"))?;
    let (mbr_code, core) = bios_boot(&boot, &core, sectors(BIOS_START_MIB))?;
    if core.len() as u64 > (ESP_START_MIB - BIOS_START_MIB) << 20 {
        bail!(
            "GRUB's core.img ({} bytes) does not fit its partition",
            core.len()
        );
    }
    disk.write_all_at(&mbr_code, 0)?;
    disk.write_all_at(&core, BIOS_START_MIB << 20)?;

    // ESP: FAT32 with the removable-media path UEFI firmware boots without NVRAM entries.
    let esp = work.join("esp.fat");
    fs::File::create(&esp)?.set_len((ROOT_START_MIB - ESP_START_MIB) << 20)?;
    run(Command::new("mkfs.fat")
        .args(["-F", "32", "-n", "EFI"])
        .arg(&esp))?;
    let efi_file = work.join("BOOTX64.EFI");
    fs::write(&efi_file, &efi)?;
    run(Command::new("mmd")
        .arg("-i")
        .arg(&esp)
        .args(["::EFI", "::EFI/BOOT"]))?;
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&esp)
        .arg(&efi_file)
        .arg("::EFI/BOOT/BOOTX64.EFI"))?;
    copy_sparse(&esp, &disk, ESP_START_MIB << 20)?;
    disk.sync_all()?;
    drop(disk);
    run(Command::new("sfdisk").arg("--verify").arg(&raw))?;

    let tmp = PathBuf::from(format!("{}.tmp", out.display()));
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&tmp))?;
    fs::rename(&tmp, out)?;
    fs::remove_dir_all(&work)?;
    eprintln!(
        "images: {} made in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// GRUB's BIOS boot code for a disk whose `core.img` starts at sector `core_lba`: the MBR's
/// first 440 bytes (`boot.img` told where core.img is, the boot-drive check turned off as for
/// a hard disk) and core.img with its first blocklist pointing at the rest of itself.
fn bios_boot(boot: &[u8], core: &[u8], core_lba: u64) -> Result<(Vec<u8>, Vec<u8>)> {
    // Offsets from GRUB's i386/pc/boot.h; the blocklist ends core.img's first sector.
    const KERNEL_SECTOR: usize = 0x5c;
    const DRIVE_CHECK: usize = 0x66;
    const BLOCKLIST: usize = 512 - 12;
    if boot.len() != 512 || core.len() < 1024 {
        bail!(
            "unexpected GRUB images (boot.img {} bytes, core.img {})",
            boot.len(),
            core.len()
        );
    }
    let mut mbr = boot[..440].to_vec();
    mbr[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    mbr[DRIVE_CHECK..DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    // Whole sectors: the loader reads sectors.
    let mut core = core.to_vec();
    core.resize(core.len().div_ceil(512) * 512, 0);
    let rest = u16::from_le_bytes([core[BLOCKLIST + 8], core[BLOCKLIST + 9]]);
    if u64::from(rest) != (core.len() / 512 - 1) as u64 {
        bail!(
            "core.img's blocklist says {rest} sectors follow; it has {}",
            core.len() / 512 - 1
        );
    }
    core[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    Ok((mbr, core))
}

/// Copies `from` into `to` at `offset`, leaving its all-zero 64 KiB blocks unwritten (holes).
fn copy_sparse(from: &Path, to: &fs::File, offset: u64) -> Result<()> {
    use std::io::Read;
    let mut f = fs::File::open(from)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            to.write_all_at(&buf[..n], offset + at)?;
        }
        at += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bios_boot_code_points_at_core_img() {
        let mut boot = vec![0u8; 512];
        boot[0x66..0x68].copy_from_slice(&[0xeb, 0x05]);
        boot[510..].copy_from_slice(&[0x55, 0xaa]);
        let mut core = vec![0u8; 3 * 512 + 100];
        core[500..508].copy_from_slice(&2u64.to_le_bytes());
        core[508..510].copy_from_slice(&3u16.to_le_bytes());
        core[510..512].copy_from_slice(&0x0820u16.to_le_bytes());
        let (mbr, core2) = bios_boot(&boot, &core, 2048).unwrap();
        assert_eq!(mbr.len(), 440, "the partition table is left alone");
        assert_eq!(&mbr[0x5c..0x64], &2048u64.to_le_bytes());
        assert_eq!(&mbr[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(&core2[500..508], &2049u64.to_le_bytes());
        assert_eq!(&core2[508..512], &core[508..512]);
        assert_eq!(core2.len(), 4 * 512, "padded to whole sectors");
        // A core.img whose blocklist disagrees with its length is refused.
        core[508..510].copy_from_slice(&9u16.to_le_bytes());
        assert!(bios_boot(&boot, &core, 2048).is_err());
    }
}
