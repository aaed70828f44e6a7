//! `cargo xtask e2e --secure-boot`: UEFI with Secure Boot on, end to end, through Debian's signed
//! chain.
//!
//! OVMF's build with Microsoft's keys enrolled (`OVMF_CODE_4M.ms.fd` / `OVMF_VARS_4M.ms.fd`, Secure
//! Boot on) network-boots against `fleetboot serve`:
//! 1. the host without `secure_boot`: DHCP names the unsigned iPXE, and the firmware must refuse
//!    it (so this test could fail);
//! 2. `secure_boot: true`: the firmware loads Debian's Microsoft-signed shim over TFTP, shim the
//!    Debian-signed network GRUB, GRUB its per-MAC configuration from the appliance and the
//!    Debian-signed kernel with the agent's initramfs; the agent installs `demo@1` under the
//!    kernel's lockdown, the machine reboots, GRUB chainloads the disk's own shim, and the disk
//!    boots through the signed chain and prints `demo@1`'s marker;
//! 3. `demo@2` assigned: reimaged the same way, reusing what it can from the disk.
//!
//! Each disk must read back as its image, with the host's cloud-init seed.

use crate::e2e;
use crate::util::{self, root};
use anyhow::{bail, Result};
use fleetboot_lab::Host;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const MAC: &str = "52:54:00:e2:e0:08";
const HOSTNAME: &str = "e2e-secure-boot";

pub fn run() -> Result<()> {
    let started = Instant::now();
    let (fleetboot, boot) = e2e::prepare()?;
    let work = root().join("target/e2e-secure-boot");
    let store = e2e::demo_store(&fleetboot, &work, 2)?;
    let net = e2e::vm_network("sboot")?;
    let ns = net.switch().clone();
    write_config(&work, &boot, "demo@1", false)?;
    let server = e2e::serve(&ns, &fleetboot, &work)?;
    let disk = work.join("disk.img");
    fs::File::create(&disk)?.set_len(256 << 20)?;

    let t = Instant::now();
    unsigned_ipxe_refused(&ns, &work, &disk)?;
    let mut summary = vec![format!(
        "unsigned iPXE refused ({:.1} s)",
        t.elapsed().as_secs_f64()
    )];
    // Install, then reimage: each boots its disk through the disk's own shim.
    for (image, what) in [("demo@1", "install"), ("demo@2", "reimage to")] {
        write_config(&work, &boot, image, true)?;
        e2e::reread_config(&server)?;
        let t = Instant::now();
        let console = signed_install(&ns, &work, &disk, image)?;
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
        "e2e --secure-boot: PASS in {:.0} s — {}",
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
    Ok(())
}

fn write_config(work: &Path, boot: &Path, image: &str, secure_boot: bool) -> Result<()> {
    fs::write(
        work.join("fleetboot.yaml"),
        format!(
            "interface: br0\nhttp_port: 8080\nboot_dir: {}\nstore: store\nstate_dir: state\n\
             router_advertisements: true\n\
             dhcp: {{ mode: full, range: [10.77.0.100, 10.77.0.150], router: 10.77.0.1 }}\n\
             hosts:\n  \"{MAC}\": {{ image: {image}, hostname: {HOSTNAME}, \
             secure_boot: {secure_boot} }}\n",
            boot.display()
        ),
    )?;
    Ok(())
}

/// The host is not marked `secure_boot`: DHCP names iPXE, which is not signed; the firmware
/// must refuse to start it. The VM is stopped once it has (it would go on to its other entries).
fn unsigned_ipxe_refused(ns: &Host, work: &Path, disk: &Path) -> Result<()> {
    let log = work.join("vm-refused.log");
    let mut qemu = ns.cmd("timeout");
    qemu.arg("120");
    e2e::secure_boot_vm_args(&mut qemu, MAC, work, disk)?;
    let mut vm = qemu
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(Stdio::null())
        .spawn()?;
    // OVMF says which entry it failed to load and why.
    let refused = |console: &str| {
        console.lines().any(|l| {
            l.contains("failed to load") && l.contains("PXEv4") && l.contains("Access Denied")
        })
    };
    let read = || -> Result<String> { Ok(String::from_utf8_lossy(&fs::read(&log)?).into_owned()) };
    while vm.try_wait()?.is_none() {
        if refused(&read()?) {
            // SIGTERM to `timeout`, which passes it on to QEMU.
            util::run(Command::new("kill").arg(vm.id().to_string()))?;
            vm.wait()?;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let console = read()?;
    let offered = console.contains("NBP filename is ipxe.efi");
    if !offered || !refused(&console) || console.contains("iPXE initialising") {
        bail!(
            "the firmware did not refuse the unsigned iPXE it was offered (offered: {offered}); \
             console in {}",
            log.display()
        );
    }
    eprintln!("e2e --secure-boot: the firmware refused the unsigned iPXE");
    Ok(())
}

/// One network boot through the signed chain: the agent installs `image` with Secure Boot on
/// and the kernel locked down, then the disk boots through its own shim. Returns the console.
fn signed_install(ns: &Host, work: &Path, disk: &Path, image: &str) -> Result<String> {
    let log = work.join(format!("vm-{}.log", image.replace('@', "-")));
    let mut qemu = ns.cmd("timeout");
    qemu.arg("400");
    e2e::secure_boot_vm_args(&mut qemu, MAC, work, disk)?;
    let console = e2e::run_boot(&mut qemu, &log, image, true)?;
    for wanted in [
        "NBP filename is shimx64.efi",
        "secureboot: Secure boot enabled",
        "Kernel is locked down",
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
