//! `cargo xtask bench serve`: fleetboot's DHCP, TFTP and HTTP services against the usual servers,
//! in one run, on a veth pair between two network namespaces the benchmark creates and removes.
//!
//! The way of measuring follows docs/benchmark-method.md:
//!
//! - DHCP: full DORA exchanges per second with ISC's `perfdhcp`, single-threaded, acting as a relay
//!   agent (`-4 -g single -l IFACE -r 40000 -p 10 -R N -M macs.txt`), against fleetboot (full mode,
//!   every MAC of `macs.txt` a known host, leases in SQLite), kea-dhcp4 (memfile, persist true) and
//!   dnsmasq (`--no-ping`, lease file; and with `--leasefile-ro`), one at a time.
//! - TFTP: a 32 MiB file, fleetboot against tftpd-hpa with `curl --tftp-blksize 1468` and with
//!   `atftp --option "blksize 1468" --option "windowsize 16"`; atftpd, which honours windowsize,
//!   is the reference for what a windowed server reaches here. Best of N downloads, each checked
//!   byte for byte.
//! - HTTP: 1 MiB range reads of a store pack file, `wrk -c 50 -t 2`, fleetboot against nginx serving
//!   the same store directory.
//!
//! The servers run in the server namespace, the clients (`ip netns exec`) in the client one; no
//! server is ever started on the machine's own interfaces, and the Debian packages are installed
//! with their services kept from starting. A table per service with fleetboot's ratio to each
//! server, and the targets with PASS or MISS, are printed and written to
//! `target/bench/serve/results.md`.

use crate::util::{root, show};
use anyhow::{bail, Context, Result};
use fleetboot_lab::{Daemon, Host, Lab};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod dhcp;
mod files;
mod http;
mod install;
mod measure;
mod net;
mod report;
mod tftp;

use dhcp::*;
use files::*;
use http::*;
use install::*;
use measure::*;
use net::*;
use report::*;
use tftp::*;

const USAGE: &str =
    "usage: cargo xtask bench serve [--only dhcp|tftp|http] [--clients N] [--runs N]
                               [--repeat N] [--rounds N] [--quick]

  --only S      one service only
  --clients N   DHCP clients (MACs in perfdhcp's list and in fleetboot's hosts), default 1000
  --runs N      TFTP downloads per server and client, the best kept (default 3)
  --repeat N    perfdhcp runs (10 s, each on a freshly started server) and wrk runs (5 s) per
                server, the best kept (default 3)
  --rounds N    HTTP rounds in a row (each: both range sizes, both servers), default 3: the
                report gives every round and the spread
  --quick       short runs for trying the benchmark out (3 s of perfdhcp, 2 s of wrk, one of
                each, one download, one round); its figures are not the ones to quote
";

/// The server's and the client's ends of the veth pair, and their addresses (a /16, so that the
/// pool holds many more addresses than there are clients).
const SRV_IF: &str = "srv0";
const CLI_IF: &str = "cli0";
const SRV_IP: &str = "10.88.0.1";
const CLI_IP: &str = "10.88.0.2";
const PREFIX: u8 = 16;
/// The address pool every DHCP server hands out from.
const POOL: [&str; 2] = ["10.88.1.1", "10.88.200.254"];

const HTTP_PORT: u16 = 8080;
/// The file fetched over TFTP, in the boot folder.
const TFTP_FILE: &str = "big.bin";
const TFTP_BYTES: usize = 32 << 20;
/// The size of the incompressible image whose pack file is read over HTTP.
const PACK_SOURCE_BYTES: usize = 40 << 20;

/// What docs/benchmark-method.md measured here for the other servers, for the reader to check the set-up against.
const REF_KEA: &str = "23,000–27,000/s";
const REF_DNSMASQ: &str = "8,700–12,000/s";
const REF_DNSMASQ_RO: &str = "~14,500/s";
const REF_TFTPD_CURL: &str = "curl 1.35–1.5 s, atftp no gain";
const REF_ATFTPD_WINDOW: &str = "atftp 0.13–0.14 s";

struct Options {
    clients: usize,
    /// TFTP downloads per server and client.
    runs: usize,
    /// perfdhcp and wrk runs per server.
    repeat: usize,
    /// HTTP rounds in a row.
    rounds: usize,
    /// One service only: "dhcp", "tftp" or "http".
    only: Option<String>,
    quick: bool,
}

impl Options {
    /// perfdhcp's `-p`.
    fn dhcp_seconds(&self) -> u64 {
        if self.quick {
            3
        } else {
            10
        }
    }

    /// wrk's `-d`.
    fn wrk_duration(&self) -> &'static str {
        if self.quick {
            "2s"
        } else {
            "5s"
        }
    }
}

/// `None` when help was asked for.
fn parse(args: &[&str]) -> Result<Option<Options>> {
    let mut options = Options {
        clients: 1000,
        runs: 3,
        repeat: 3,
        rounds: 3,
        only: None,
        quick: false,
    };
    let mut args = args.iter();
    while let Some(&arg) = args.next() {
        let mut number = |name: &str| -> Result<usize> {
            args.next()
                .and_then(|n| n.parse().ok())
                .filter(|&n: &usize| n > 0)
                .with_context(|| format!("{name} needs a positive number\n\n{USAGE}"))
        };
        match arg {
            "-h" | "--help" => return Ok(None),
            "--clients" => options.clients = number("--clients")?,
            "--runs" => options.runs = number("--runs")?,
            "--repeat" => options.repeat = number("--repeat")?,
            "--rounds" => options.rounds = number("--rounds")?,
            "--only" => match args.next() {
                Some(&s @ ("dhcp" | "tftp" | "http")) => options.only = Some(s.to_string()),
                _ => bail!("--only takes dhcp, tftp or http\n\n{USAGE}"),
            },
            "--quick" => options.quick = true,
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    if options.clients > 50_000 {
        bail!(
            "--clients {}: the pool holds 51,000 addresses",
            options.clients
        );
    }
    if options.quick {
        options.runs = 1;
        options.repeat = 1;
        options.rounds = 1;
    }
    Ok(Some(options))
}

pub fn run(args: &[&str]) -> Result<()> {
    let Some(options) = parse(args)? else {
        print!("{USAGE}");
        return Ok(());
    };
    let dir = root().join("target/bench/serve");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    install_packages()?;
    let atftpd = atftpd_binary(&dir)?;
    let fleetboot = build_fleetboot()?;

    let work = dir.join("work");
    fresh_dir(&work)?;
    let files = make_files(&fleetboot, &work, options.clients)?;

    let loadavg_before = loadavg()?;
    let net = Net::new()?;
    let wants = |s: &str| options.only.as_deref().is_none_or(|o| o == s);
    let dhcp = if wants("dhcp") {
        bench_dhcp(&net, &fleetboot, &files, &options)?
    } else {
        Vec::new()
    };
    let tftp = if wants("tftp") {
        bench_tftp(&net, &fleetboot, &atftpd, &files, &options)?
    } else {
        Vec::new()
    };
    let http = if wants("http") {
        bench_http(&net, &fleetboot, &files, &options)?
    } else {
        Vec::new()
    };
    drop(net);
    let machine = Machine {
        loadavg_before,
        loadavg_after: loadavg()?,
        measurements: MEASUREMENTS.load(Ordering::Relaxed),
        started_busy: STARTED_BUSY.load(Ordering::Relaxed),
        repeated: REPEATED.load(Ordering::Relaxed),
        kept_disturbed: KEPT_DISTURBED.load(Ordering::Relaxed),
    };

    let report = report(&options, &machine, &dhcp, &tftp, &http)?;
    println!("\n{report}");
    let results = dir.join("results.md");
    fs::write(&results, &report).with_context(|| format!("cannot write {}", results.display()))?;
    eprintln!("bench: wrote {}", results.display());
    Ok(())
}

// Small helpers.

/// Makes `dir` an empty directory.
fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}
