//! `cargo xtask setup`: installs the Debian packages the tests and benchmarks use.
//!
//! Idempotent: packages already present are skipped, so every task can call it cheaply.

use crate::util::{self, have};
use anyhow::Result;
use std::process::Command;

/// Debian packages, each with the command that shows it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("e2fsprogs", "mkfs.ext4"),
    ("zstd", "zstd"),
    ("util-linux", "mount"),
    // Images as operators have them: qcow2 made by qemu-img, raw compressed by xz and gzip.
    ("qemu-utils", "qemu-img"),
    ("xz-utils", "xz"),
    ("gzip", "gzip"),
    // The cloud-init seed partition's tests read it back with real tools.
    ("fdisk", "sfdisk"),
    ("mtools", "mtype"),
    // Real network peers for the appliance's tests: udhcpc, a site DHCP server, curl's TFTP.
    ("iproute2", "ip"),
    ("busybox-static", "busybox"),
    ("dnsmasq-base", "dnsmasq"),
    ("curl", "curl"),
    // The DHCP flood test's load generator (ISC's perfdhcp).
    ("kea-admin", "perfdhcp"),
    // A real browser for the dashboard test.
    ("chromium", "chromium"),
    // BMCs: OpenIPMI's emulator and the IPMI client the appliance runs; VMs behind them;
    // openssl makes the Redfish emulator's certificate; python3-venv holds that emulator.
    ("openipmi", "ipmi_sim"),
    ("ipmitool", "ipmitool"),
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("openssl", "openssl"),
    ("python3-venv", "/usr/share/doc/python3-venv/copyright"),
    // The appliance's systemd unit is checked by systemd's own verifier.
    ("systemd", "systemd-analyze"),
];

/// Packages only the store benchmark needs (the anchors and the image builder).
pub const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("casync", "casync"),
    ("wimtools", "wimlib-imagex"),
    ("zstd", "zstd"),
    ("e2fsprogs", "mkfs.ext4"),
    ("squashfs-tools", "mksquashfs"),
    ("time", "/usr/bin/time"),
];

/// Packages only the serve benchmark needs: the other servers and the load generators. atftpd
/// is not here: it conflicts with tftpd-hpa, so `bench serve` unpacks it beside itself.
pub const SERVE_BENCH_PACKAGES: &[(&str, &str)] = &[
    ("kea-admin", "perfdhcp"),
    ("kea-dhcp4-server", "kea-dhcp4"),
    ("dnsmasq-base", "dnsmasq"),
    ("tftpd-hpa", "in.tftpd"),
    ("atftp", "atftp"),
    ("wrk", "wrk"),
    ("nginx-light", "nginx"),
    ("curl", "curl"),
    ("sqlite3", "sqlite3"),
    ("iproute2", "ip"),
];

pub fn run() -> Result<()> {
    apt_install(PACKAGES)?;
    redfish_emulator()?;
    rustup_components()
}

/// sushy-tools (OpenStack's Redfish emulator, from PyPI, at the version the lab's driver
/// configuration is written for) in a virtualenv under target/.
fn redfish_emulator() -> Result<()> {
    use fleetboot_lab::bmc::{sushy_venv, SUSHY_TOOLS_VERSION};
    let venv = sushy_venv();
    if venv.join("bin/sushy-emulator").is_file() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(&venv);
    util::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    util::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("sushy-tools=={SUSHY_TOOLS_VERSION}")),
    )
}

/// Installs the packages in `wanted` whose command (or, given as an absolute path, file) is
/// missing.
pub fn apt_install(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    util::run(Command::new("apt-get").arg("update").arg("-q"))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn rustup_components() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let present = |tool: &str| {
        Command::new(&cargo)
            .args([tool, "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if present("fmt") && present("clippy") {
        return Ok(());
    }
    util::run(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))
}
