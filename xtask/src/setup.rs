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
];

/// Packages only the store benchmark needs (the anchors and the image builder).
pub const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("casync", "casync"),
    ("wimtools", "wimlib-imagex"),
    ("zstd", "zstd"),
    ("e2fsprogs", "mkfs.ext4"),
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
    rustup_components()
}

/// Installs the packages in `wanted` whose command is missing.
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
