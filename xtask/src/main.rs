//! `cargo xtask`: the project's automation, in Rust (one file per task).
//!
//! Everything a fresh Debian machine needs is installed from here, so no step lives in someone's memory.

mod bench_deploy;
mod bench_fleet;
mod bench_qcow2;
mod bench_serve;
mod bench_store;
mod boot_assets;
mod debian_image;
mod demo;
mod e2e;
mod e2e_arm64;
mod e2e_debian;
mod e2e_http_boot;
mod e2e_secure_boot;
mod fuzz;
mod images;
mod initramfs;
mod nginx;
mod os_images;
mod s3;
mod setup;
mod test;
mod util;

use anyhow::{bail, Result};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  test          fmt, clippy, unit and integration tests (what CI runs)
  demo          the main job: import a demo image, show the store, export it back
  setup         install the Debian packages and Rust targets the project needs
  boot-assets   copy the pinned iPXE boot loaders from Debian's ipxe package into boot/
  e2e           the agent in a QEMU VM: install, reinstall moving only what changed, local boot
                (--os debian: a real Debian installed, up as itself over SSH, reimaged; --bios-only;
                --http-boot: UEFI HTTP boot with TFTP off, full and proxy DHCP;
                --secure-boot: OVMF with Secure Boot on, through shim and signed GRUB)
  images        the demo disk images (bootable, print a marker) into images/out
                (--os debian: a Debian 12 cloud image, versions 1 and 2, as qcow2, cached)
  initramfs     the agent's kernel and initramfs (Debian's kernel, static agent as /init) in boot/
                (--arch arm64: the ARM64 ones beside them)
  s3            the store in a three-node Garage cluster (S3, replication 3): every store
                command, concurrent imports from two appliances, a node killed mid-way
                (builds Garage once with cargo install, about 30 min)
  bench deploy  the agent vs curl | zstd -d | dd and casync, full and delta, on images A and B
  bench store   build three related Debian disk images and compare fleetboot's store
                with casync, WIM (wimlib) and zstd on them; imports from qcow2 vs raw
                (--qcow2-only for those rows alone)
  bench serve   DHCP, TFTP and HTTP in network namespaces: fleetboot against kea-dhcp4,
                dnsmasq, tftpd-hpa, atftpd and nginx (--only dhcp|tftp|http, --clients N,
                --runs N, --repeat N, --rounds N, --quick)
  bench fleet   N agents in their own namespaces, links shaped to 1 Gbit/s, installing image B
                at once from the appliance and from nginx (--agents 10,50,100, --rate-mbit R)
  bench         bench store, then bench serve
  fuzz          every fuzz target for a set time, executions and crashes
                (--seconds N, --target NAME, --engine auto|libfuzzer|stable)
";

fn main() {
    if let Err(err) = run() {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["test", rest @ ..] => test::run(rest),
        ["demo"] => demo::run(),
        ["setup"] => setup::run(),
        ["boot-assets", rest @ ..] => boot_assets::run(rest),
        ["initramfs", rest @ ..] => initramfs::run(rest),
        ["e2e", rest @ ..] => e2e::run(rest),
        ["fuzz", rest @ ..] => fuzz::run(rest),
        ["images", rest @ ..] => images::run(rest),
        ["s3", rest @ ..] => s3::run_task(rest),
        ["bench", "store", rest @ ..] => bench_store::run(rest),
        ["bench", "deploy", rest @ ..] => bench_deploy::run(rest),
        ["bench", "serve", rest @ ..] => bench_serve::run(rest),
        ["bench", "fleet", rest @ ..] => bench_fleet::run(rest),
        ["bench"] => {
            bench_store::run(&[])?;
            bench_serve::run(&[])
        }
        ["help" | "--help" | "-h"] | [] => {
            print!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown task {:?}\n\n{USAGE}", args.join(" ")),
    }
}
