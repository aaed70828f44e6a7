//! `cargo xtask e2e --arch arm64`: an ARM64 server, end to end, in `qemu-system-aarch64` (TCG)
//! with AAVMF (Debian's `qemu-efi-aarch64`).
//!
//! The VM's own UEFI PXE (option 93 = 11) is answered with Debian's signed chain for ARM64 —
//! shim (`shimaa64.efi`), which fetches the signed network GRUB (`grubaa64.efi`), which reads its
//! per-MAC configuration from the appliance — since Debian has no ARM64 iPXE. GRUB's `${grub_cpu}`
//! picks the ARM64 agent (`fleetboot-vmlinuz-arm64`, `fleetboot-initrd-arm64.img`, beside the
//! x86-64 ones in `boot/`), which installs the ARM64 demo image `demo@1` on the VM's NVMe disk;
//! the machine reboots, GRUB chainloads the disk's `\EFI\BOOT\BOOTAA64.EFI` (its own shim), and
//! the disk boots and prints `demo@1`'s marker, all with Secure Boot off. Then, with Secure Boot
//! on (AAVMF's variables with Microsoft's keys enrolled), `demo@2` is reimaged the same way under
//! the kernel's lockdown, reusing what it can from the disk, and the disk boots through its own
//! shim. Each disk must read back as its image, with the host's seed.
//!
//! Under TCG (one vCPU, on a 2-core machine) each network boot (install, reboot, disk boot) takes about a minute.

use crate::e2e;
use crate::initramfs::Arch;
use crate::util::root;
use anyhow::{bail, Result};
use fleetboot_lab::Host;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const MAC: &str = "52:54:00:e2:e0:0a";
const HOSTNAME: &str = "e2e-arm64";
const AAVMF: &str = "/usr/share/AAVMF";

pub fn run() -> Result<()> {
    let started = Instant::now();
    crate::setup::apt_install(&[
        ("qemu-system-arm", "qemu-system-aarch64"),
        ("qemu-efi-aarch64", "/usr/share/AAVMF/AAVMF_CODE.fd"),
    ])?;
    let (fleetboot, boot) = e2e::prepare()?;
    crate::initramfs::build_for(&boot, Arch::Arm64)?;
    crate::boot_assets::install_arm64(&boot)?;
    let work = root().join("target/e2e-arm64");
    let store = e2e::demo_store_for(&fleetboot, &work, 2, Arch::Arm64)?;
    let net = e2e::vm_network("arm64")?;
    let ns = net.switch().clone();
    write_config(&work, &boot, "demo@1")?;
    let server = e2e::serve(&ns, &fleetboot, &work)?;
    let disk = work.join("disk.img");
    fs::File::create(&disk)?.set_len(256 << 20)?;

    let mut summary = Vec::new();
    // The same chain with Secure Boot off, then on (AAVMF's variables with Microsoft's keys).
    for (image, what, secure_boot) in [
        ("demo@1", "install", false),
        ("demo@2", "reimage (Secure Boot on) to", true),
    ] {
        write_config(&work, &boot, image)?;
        e2e::reread_config(&server)?;
        let t = Instant::now();
        let console = install(&ns, &work, &disk, image, secure_boot)?;
        e2e::check_disk(&fleetboot, &store, image, &disk, &work, HOSTNAME)?;
        let (fetched, reused) = crate::util::install_figures(&console)?;
        if image == "demo@2" && reused < 4 * fetched {
            bail!("the reimage fetched {fetched} bytes and reused only {reused}");
        }
        summary.push(format!(
            "{what} {image} + boot {:.1} s (fetched {fetched} B, reused {reused} B)",
            t.elapsed().as_secs_f64()
        ));
    }
    server.stop()?;
    println!(
        "e2e --arch arm64: PASS in {:.0} s — {}",
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
    Ok(())
}

fn write_config(work: &Path, boot: &Path, image: &str) -> Result<()> {
    fs::write(
        work.join("fleetboot.yaml"),
        format!(
            "interface: br0\nhttp_port: 8080\nboot_dir: {}\nstore: store\nstate_dir: state\n\
             dhcp: {{ mode: full, range: [10.77.0.100, 10.77.0.150], router: 10.77.0.1 }}\n\
             hosts:\n  \"{MAC}\": {{ image: {image}, hostname: {HOSTNAME} }}\n",
            boot.display()
        ),
    )?;
    Ok(())
}

/// One network boot of the ARM64 VM: the agent installs `image`, the machine reboots into the
/// signed chain again, which boots the disk. Returns the console.
fn install(ns: &Host, work: &Path, disk: &Path, image: &str, secure_boot: bool) -> Result<String> {
    let log = work.join(format!("vm-{}.log", image.replace('@', "-")));
    let mut qemu = ns.cmd("timeout");
    qemu.arg("1200");
    vm_args(&mut qemu, work, disk, secure_boot)?;
    let console = e2e::run_boot(&mut qemu, &log, image, true)?;
    let kernel_says = if secure_boot {
        "secureboot: Secure boot enabled"
    } else {
        "secureboot: Secure boot disabled"
    };
    for wanted in [
        // The firmware says which architecture it is (option 93 = 11) by what it is sent.
        "NBP filename is shimaa64.efi",
        "fleetboot: installing on",
        kernel_says,
        "fleetboot: booting the local disk",
    ] {
        if !console.contains(wanted) {
            bail!(
                "{image}: the console has no {wanted:?}; console in {}",
                log.display()
            );
        }
    }
    Ok(console)
}

/// `qemu-system-aarch64` and its arguments: the `virt` machine under TCG, AAVMF (its variables
/// kept in `work`; with `secure_boot`, from `AAVMF_VARS.ms.fd`: Microsoft's keys enrolled,
/// Secure Boot on), the NIC first in the boot order and an NVMe disk second, the serial console
/// (PL011) on stdout.
fn vm_args(qemu: &mut Command, work: &Path, disk: &Path, secure_boot: bool) -> Result<()> {
    let (template, kind) = if secure_boot {
        ("AAVMF_VARS.ms.fd", "ms-")
    } else {
        ("AAVMF_VARS.fd", "")
    };
    let vars = work.join(format!("AAVMF_VARS-{kind}{}.fd", MAC.replace(':', "")));
    if !vars.exists() {
        fs::copy(format!("{AAVMF}/{template}"), &vars)?;
    }
    qemu.args(["qemu-system-aarch64", "-machine", "virt", "-accel", "tcg"])
        // `max` with QEMU's cheap pointer authentication: Debian's kernel runs on any ARMv8.
        .args(["-cpu", "max,pauth-impdef=on", "-smp", "1", "-m", "1024"])
        .arg("-nographic")
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,readonly=on,file={AAVMF}/AAVMF_CODE.fd"
        ))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={MAC},romfile=,bootindex=1"),
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
        .args([
            "-device",
            "nvme,drive=d0,serial=fleetboot-arm64,bootindex=2",
        ]);
    Ok(())
}
