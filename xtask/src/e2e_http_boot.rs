//! `cargo xtask e2e --http-boot`: UEFI HTTP boot end to end, with no TFTP server anywhere.
//!
//! An OVMF VM whose PXE boot entries are switched off (so its firmware goes straight to its
//! `UEFI HTTPv4` entry) network-boots against `fleetboot serve` with `tftp: { enabled: false }`:
//! the firmware's DHCP gets the loader's http:// URL (option 60 `HTTPClient`), fetches iPXE over
//! HTTP, iPXE fetches its script, the agent installs `demo@1`, and the VM's next boot — HTTP boot
//! again, the script now saying local disk — boots the disk and prints the image's marker.
//!
//! Twice: with the appliance as the network's DHCP server (full mode), and beside dnsmasq as the
//! site's DHCP server, the appliance answering ProxyDHCP only. In each, nothing may listen on UDP
//! 69 in the appliance's namespace, the firmware must show it booted over HTTP and never tried
//! PXE, and the disk must read back as the image with the host's seed.

use crate::e2e::{self, Firmware};
use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use fleetboot_lab::{Daemon, Host};
use std::fs;
use std::path::Path;
use std::time::Instant;

const MAC: &str = "52:54:00:e2:e0:05";
const HOSTNAME: &str = "e2e-http-boot";

pub fn run() -> Result<()> {
    let started = Instant::now();
    let (fleetboot, boot) = e2e::prepare()?;
    let work = root().join("target/e2e-http-boot");
    let store = e2e::demo_store(&fleetboot, &work, 1)?;
    let mut net = e2e::vm_network("httpb")?;
    let site = net.host("site", "52:54:00:e2:e1:fe", Some("10.77.0.2/24"))?;
    let ns = net.switch().clone();
    let mut summary = Vec::new();
    for mode in ["full", "proxy"] {
        let t = Instant::now();
        install_over_http(&ns, &site, &fleetboot, &boot, &store, mode)?;
        summary.push(format!(
            "{mode} DHCP: HTTP boot + install + local boot {:.1} s",
            t.elapsed().as_secs_f64()
        ));
    }
    println!(
        "e2e --http-boot: PASS in {:.0} s — {}",
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
    Ok(())
}

/// One install through UEFI HTTP boot with the appliance in DHCP `mode` (`full` or `proxy`, the
/// latter beside dnsmasq in `site`), TFTP off, `store` in the work folder beside it; a fresh
/// disk and fleet state each time.
fn install_over_http(
    ns: &Host,
    site: &Host,
    fleetboot: &Path,
    boot: &Path,
    store: &Path,
    mode: &str,
) -> Result<()> {
    let work = store.parent().context("the store's folder")?;
    let dhcp = match mode {
        "full" => "{ mode: full, range: [10.77.0.100, 10.77.0.150], router: 10.77.0.1 }",
        _ => "{ mode: proxy }",
    };
    fs::write(
        work.join("fleetboot.yaml"),
        format!(
            "interface: br0\nhttp_port: 8080\nboot_dir: {}\nstore: store\nstate_dir: state-{mode}\n\
             router_advertisements: true\ntftp: {{ enabled: false }}\ndhcp: {dhcp}\n\
             hosts:\n  \"{MAC}\": {{ image: demo@1, hostname: {HOSTNAME} }}\n",
            boot.display()
        ),
    )?;
    // The site's own DHCP server, addresses only: the appliance adds the boot information.
    let _site_dhcp = match mode {
        "proxy" => Some(Daemon::start(
            site.cmd("dnsmasq").args([
                "--no-daemon",
                "--port=0",
                "--no-ping",
                "--leasefile-ro",
                "--interface=eth0",
                "--bind-interfaces",
                "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,1h",
                "--log-dhcp",
            ]),
            &work.join("dnsmasq.log"),
        )?),
        _ => None,
    };
    let server = e2e::serve(ns, fleetboot, work)?;
    let sockets = util::output(ns.cmd("ss").args(["-H", "-uln"]))?;
    if sockets.contains(":69 ") {
        bail!("{mode}: something listens on UDP 69 with TFTP off:\n{sockets}");
    }

    let disk = work.join(format!("disk-{mode}.img"));
    fs::File::create(&disk)?.set_len(256 << 20)?;
    let mut qemu = ns.cmd("timeout");
    qemu.arg("400");
    e2e::vm_args(&mut qemu, Firmware::Uefi, MAC, work, &disk, 1024, true)?;
    // No PXE entries: the firmware's first network entry is UEFI HTTPv4.
    qemu.args(["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]);
    let log = work.join(format!("vm-{mode}.log"));
    let console = e2e::run_boot(&mut qemu, &log, "demo@1", true)?;
    if !console.contains("HTTP Boot over IPv4") || console.contains("PXE over IPv4") {
        bail!(
            "{mode}: the firmware did not boot over HTTP alone; console in {}",
            log.display()
        );
    }
    e2e::check_disk(fleetboot, store, "demo@1", &disk, work, HOSTNAME)?;
    server.stop()?;
    Ok(())
}
