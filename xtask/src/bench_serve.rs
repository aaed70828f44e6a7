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
//! server, and the issue's targets with PASS or MISS, are printed and written to
//! `target/bench/serve/results.md`.

use crate::util::{root, show};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: cargo xtask bench serve [--clients N] [--runs N] [--repeat N] [--quick]

  --clients N   DHCP clients (MACs in perfdhcp's list and in fleetboot's hosts), default 1000
  --runs N      TFTP downloads per server and client, the best kept (default 3)
  --repeat N    perfdhcp runs (10 s, each on a freshly started server) and wrk runs (5 s) per
                server, the best kept (default 2)
  --quick       short runs for trying the benchmark out (3 s of perfdhcp, 2 s of wrk, one of
                each, one download); its figures are not the ones to quote
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
/// The range read over HTTP (1 MiB), as `first-last`.
const RANGE: (u64, u64) = (1 << 20, (2 << 20) - 1);

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
        repeat: 2,
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
    remove_stale_namespaces();
    let net = Net::new()?;
    let dhcp = bench_dhcp(&net, &fleetboot, &files, &options)?;
    let tftp = bench_tftp(&net, &fleetboot, &atftpd, &files, &options)?;
    let http = bench_http(&net, &fleetboot, &files, &options)?;
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

// ---------------------------------------------------------------------------------------------
// Installing the servers and clients without starting any of them as a service.

/// Installs the benchmark's packages with a `policy-rc.d` that forbids starting services (so
/// kea, nginx and tftpd-hpa are never started on the machine's interfaces by their packages), and
/// disables their units afterwards where systemd runs.
fn install_packages() -> Result<()> {
    let missing: Vec<&str> = crate::setup::SERVE_BENCH_PACKAGES
        .iter()
        .filter(|(_, cmd)| !crate::util::have(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    {
        let _no_services = PolicyRcD::install()?;
        crate::setup::apt_install(crate::setup::SERVE_BENCH_PACKAGES)?;
    }
    if Path::new("/run/systemd/system").is_dir() {
        // Packages enable their units for the next boot even when policy-rc.d kept them from
        // starting now: disable those of the packages just installed (and only those).
        let units = [
            ("kea-dhcp4-server", "kea-dhcp4-server"),
            ("nginx-light", "nginx"),
            ("tftpd-hpa", "tftpd-hpa"),
        ];
        for (pkg, unit) in units {
            if missing.contains(&pkg) {
                let _ = Command::new("systemctl")
                    .args(["disable", "--now", "--quiet", unit])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    Ok(())
}

/// A `/usr/sbin/policy-rc.d` that answers 101 (action forbidden) while it lives, unless the
/// machine already has one (containers do); removed on drop if this created it.
struct PolicyRcD {
    created: Option<PathBuf>,
}

impl PolicyRcD {
    fn install() -> Result<PolicyRcD> {
        let path = PathBuf::from("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Ok(PolicyRcD { created: None });
        }
        fs::write(
            &path,
            "#!/bin/sh\n# cargo xtask bench serve: no service starts\nexit 101\n",
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", path.display()))?;
        Ok(PolicyRcD {
            created: Some(path),
        })
    }
}

impl Drop for PolicyRcD {
    fn drop(&mut self) {
        if let Some(path) = &self.created {
            let _ = fs::remove_file(path);
        }
    }
}

/// atftpd: Debian's `atftpd` conflicts with `tftpd-hpa`, so unless it is installed its package
/// is downloaded (`apt-get download`) and unpacked beside the benchmark; returns the binary.
fn atftpd_binary(dir: &Path) -> Result<PathBuf> {
    if crate::util::have("atftpd") {
        return Ok(PathBuf::from("atftpd"));
    }
    let unpacked = dir.join("atftpd/root");
    let bin = unpacked.join("usr/sbin/atftpd");
    if bin.is_file() {
        return Ok(bin);
    }
    let download = dir.join("atftpd/deb");
    fresh_dir(&download)?;
    crate::util::run(
        Command::new("apt-get")
            .args(["download", "-q", "atftpd"])
            .current_dir(&download),
    )?;
    let deb = fs::read_dir(&download)
        .with_context(|| format!("cannot list {}", download.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| {
            format!(
                "apt-get download atftpd left no .deb in {}",
                download.display()
            )
        })?;
    crate::util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    if !bin.is_file() {
        bail!("{} holds no usr/sbin/atftpd", deb.display());
    }
    Ok(bin)
}

/// `cargo build --release -p fleetboot`; returns the binary.
fn build_fleetboot() -> Result<PathBuf> {
    crate::util::build_release(&["fleetboot"])
}

// ---------------------------------------------------------------------------------------------
// The files every server is given.

/// The benchmark's files, all under `work`.
struct Files {
    work: PathBuf,
    /// The boot folder (TFTP), holding [`TFTP_FILE`].
    boot: PathBuf,
    /// fleetboot's store, holding one image of incompressible data.
    store: PathBuf,
    /// The store's pack file, as a path under the store (`packs/ID.pack`).
    pack: String,
    /// perfdhcp's MACs, one a line.
    macs: PathBuf,
    /// fleetboot's configuration for the DHCP run (full mode, every MAC a host).
    dhcp_config: PathBuf,
    /// fleetboot's configuration for TFTP and HTTP (DHCP off).
    files_config: PathBuf,
}

fn make_files(fleetboot: &Path, work: &Path, clients: usize) -> Result<Files> {
    let boot = work.join("boot");
    fs::create_dir_all(&boot).with_context(|| format!("cannot create {}", boot.display()))?;
    write_random(&boot.join(TFTP_FILE), TFTP_BYTES, 1)?;

    let store = work.join("store");
    let image = work.join("data.img");
    write_random(&image, PACK_SOURCE_BYTES, 2)?;
    crate::util::run(
        Command::new(fleetboot)
            .arg("--store")
            .arg(&store)
            .args(["image", "import", "data"])
            .arg(&image)
            .stdout(Stdio::null()),
    )?;
    fs::remove_file(&image).with_context(|| format!("cannot remove {}", image.display()))?;
    let packs = store.join("packs");
    let mut largest: Option<(u64, String)> = None;
    for entry in fs::read_dir(&packs).with_context(|| format!("cannot list {}", packs.display()))? {
        let entry = entry?;
        let len = entry.metadata()?.len();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".pack") && largest.as_ref().is_none_or(|(l, _)| len > *l) {
            largest = Some((len, name));
        }
    }
    let Some((len, pack)) = largest else {
        bail!(
            "fleetboot image import left no pack file in {}",
            packs.display()
        );
    };
    if len <= RANGE.1 {
        bail!("the pack file {pack} holds {len} bytes, too few for the range read");
    }

    let macs = work.join("macs.txt");
    let mut list = String::new();
    let mut hosts = String::new();
    for i in 1..=clients {
        let mac = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        );
        writeln!(list, "{mac}")?;
        writeln!(hosts, "  \"{mac}\": {{}}")?;
    }
    fs::write(&macs, list).with_context(|| format!("cannot write {}", macs.display()))?;

    let common = format!(
        "interface: {SRV_IF}\nhttp_port: {HTTP_PORT}\nboot_dir: {}\nstore: {}\nunknown_hosts: ignore\n",
        boot.display(),
        store.display()
    );
    let dhcp_config = work.join("fleetboot-dhcp.yaml");
    fs::write(
        &dhcp_config,
        format!(
            "{common}state_dir: {}\ndhcp: {{ mode: full, range: [{}, {}] }}\nhosts:\n{hosts}",
            work.join("state-dhcp").display(),
            POOL[0],
            POOL[1]
        ),
    )
    .with_context(|| format!("cannot write {}", dhcp_config.display()))?;
    let files_config = work.join("fleetboot-files.yaml");
    fs::write(
        &files_config,
        format!(
            "{common}state_dir: {}\ndhcp: {{ mode: off }}\nadmin_token: {BENCH_TOKEN}\n",
            work.join("state-files").display()
        ),
    )
    .with_context(|| format!("cannot write {}", files_config.display()))?;

    Ok(Files {
        work: work.to_path_buf(),
        boot,
        store,
        pack: format!("packs/{pack}"),
        macs,
        dhcp_config,
        files_config,
    })
}

/// Writes `len` bytes that do not compress (xorshift64*, from `seed`).
fn write_random(path: &Path, len: usize, seed: u64) -> Result<()> {
    let mut file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let n = left.min(buf.len());
        file.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The network: two namespaces joined by a veth pair, and the daemons started in them.

/// A server namespace and a client namespace joined by a veth pair (as docs/benchmark-method.md says: no
/// bridge between them). Everything in them is killed and both are deleted on drop.
struct Net {
    srv: String,
    cli: String,
}

/// Names start with this and end with the benchmark's process id, so that namespaces left by a
/// benchmark that was killed can be told from those of one still running.
const NS_PREFIX: &str = "fbbench-";

impl Net {
    fn new() -> Result<Net> {
        let pid = std::process::id();
        let net = Net {
            srv: format!("{NS_PREFIX}srv-{pid}"),
            cli: format!("{NS_PREFIX}cli-{pid}"),
        };
        eprintln!("bench: namespaces {} and {}", net.srv, net.cli);
        quiet(Command::new("ip").args(["netns", "add", &net.srv]))?;
        quiet(Command::new("ip").args(["netns", "add", &net.cli]))?;
        quiet(Command::new("ip").args([
            "-n", &net.srv, "link", "add", SRV_IF, "type", "veth", "peer", "name", CLI_IF, "netns",
            &net.cli,
        ]))?;
        for (ns, ifname, ip) in [(&net.srv, SRV_IF, SRV_IP), (&net.cli, CLI_IF, CLI_IP)] {
            quiet(Command::new("ip").args([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/{PREFIX}"),
                "dev",
                ifname,
            ]))?;
            quiet(Command::new("ip").args(["-n", ns, "link", "set", ifname, "up"]))?;
            quiet(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
        }
        Ok(net)
    }

    /// `program` run inside the server namespace.
    fn srv(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(&self.srv, program)
    }

    /// `program` run inside the client namespace.
    fn cli(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(&self.cli, program)
    }

    /// Starts a server in the server namespace, its output to `log`, and waits until it
    /// listens on `port` (`udp` or `tcp`).
    fn start(&self, cmd: &mut Command, log: &Path, udp: bool, port: u16) -> Result<Daemon> {
        // `ip netns exec NS PROGRAM ...`: name it by its program.
        let name = cmd
            .get_args()
            .nth(3)
            .map(|p| {
                let p = Path::new(p);
                p.file_name()
                    .unwrap_or(p.as_os_str())
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        eprintln!("$ {}", show(cmd));
        let file =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", show(cmd)))?;
        let mut daemon = Daemon {
            name,
            child,
            log: log.to_path_buf(),
        };
        let until = Instant::now() + Duration::from_secs(15);
        let proto = if udp { "-lnu" } else { "-lnt" };
        loop {
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on port {port}:\n{}",
                    daemon.name,
                    daemon.log_tail()
                );
            }
            let out = self
                .srv("ss")
                .args(["-H", proto, &format!("sport = :{port}")])
                .output()
                .context("cannot run ss")?;
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                // Listening; give it a moment to finish starting (kea opens its raw socket next).
                std::thread::sleep(Duration::from_millis(300));
                return Ok(daemon);
            }
            if Instant::now() > until {
                bail!(
                    "{} does not listen on port {port} after 15 s:\n{}",
                    daemon.name,
                    daemon.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        remove_namespace(&self.srv);
        remove_namespace(&self.cli);
    }
}

fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Kills whatever still runs in `ns` (it would keep the namespace alive) and deletes it.
fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Removes the namespaces of earlier benchmarks that were killed before they could clean up
/// (those whose process is gone); a benchmark still running keeps its own.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = ns.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid = rest.rsplit('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            eprintln!("bench: removing namespace {ns}, left by an earlier run");
            remove_namespace(ns);
        }
    }
}

/// A server started by the benchmark; stopped (SIGTERM, then SIGKILL) on drop.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// CPU time the process (all its threads) has used so far.
    fn cpu(&self) -> Result<Duration> {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        // Fields after the command name (which may hold spaces, inside parentheses).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; in
        // clock ticks, 100 a second on Linux.
        let ticks = |i: usize| fields.get(i).and_then(|t| t.parse::<u64>().ok());
        let (Some(user), Some(system)) = (ticks(11), ticks(12)) else {
            bail!("cannot read the CPU times in {path}: {stat:?}");
        };
        Ok(Duration::from_millis((user + system) * 10))
    }

    /// `result`, with a word on the server when it failed because the server had exited.
    fn explain<T>(&self, result: Result<T>) -> Result<T> {
        let alive = fs::metadata(format!("/proc/{}", self.child.id())).is_ok()
            && !fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
                .unwrap_or_default()
                .contains(") Z ");
        result.with_context(|| {
            if alive {
                format!("{} was still running", self.name)
            } else {
                format!(
                    "{} had exited (killed from outside the benchmark?); its log ends:\n{}",
                    self.name,
                    self.log_tail()
                )
            }
        })
    }

    /// The last lines of its log, for error messages.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops it and checks that it was still running (a server that died mid-run spoils the
    /// figure).
    fn stop(mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}) during the benchmark:\n{}",
                self.name,
                self.log_tail()
            );
        }
        self.terminate();
        Ok(())
    }

    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

// ---------------------------------------------------------------------------------------------
// DHCP.

/// A DHCP server as the report names it.
struct DhcpServer {
    label: &'static str,
    /// Names its logs.
    slug: &'static str,
    /// The reference figure for it.
    reference: &'static str,
}

/// One DHCP server's perfdhcp run.
struct DhcpRun {
    server: &'static DhcpServer,
    /// 4-way exchanges per second.
    rate: f64,
    /// DISCOVER-OFFER and REQUEST-ACK drops ratios, in percent.
    drops: [f64; 2],
    /// CPU the server used during the run.
    cpu: Duration,
    /// The run's length.
    period: Duration,
    /// Leases in its lease database on disk after the run (`None`: it keeps none).
    leases_on_disk: Option<u64>,
    /// fleetboot only: its DHCP counters from /metrics after the run.
    metrics: String,
}

const FLEETBOOT_DHCP: DhcpServer = DhcpServer {
    label: "fleetboot (full mode, SQLite)",
    slug: "fleetboot",
    reference: "",
};
const KEA: DhcpServer = DhcpServer {
    label: "kea-dhcp4 (memfile, persist true)",
    slug: "kea",
    reference: REF_KEA,
};
const DNSMASQ: DhcpServer = DhcpServer {
    label: "dnsmasq --no-ping (lease file)",
    slug: "dnsmasq",
    reference: REF_DNSMASQ,
};
const DNSMASQ_RO: DhcpServer = DhcpServer {
    label: "dnsmasq --no-ping --leasefile-ro",
    slug: "dnsmasq-ro",
    reference: REF_DNSMASQ_RO,
};

/// Each server `options.repeat` times, each time started afresh on an empty lease database;
/// the run with the best rate is kept.
fn bench_dhcp(
    net: &Net,
    fleetboot: &Path,
    files: &Files,
    options: &Options,
) -> Result<Vec<DhcpRun>> {
    let work = &files.work;
    let mut runs = Vec::new();

    // fleetboot: full mode, every MAC a known host, leases in SQLite.
    runs.push(best_rate(options.repeat, || {
        let state = work.join("state-dhcp");
        fresh_dir(&state)?;
        let daemon = net.start(
            net.srv(fleetboot)
                .arg("serve")
                .arg("--config")
                .arg(&files.dhcp_config),
            &work.join("fleetboot-dhcp.log"),
            true,
            67,
        )?;
        let mut run = daemon.explain(perfdhcp(net, &daemon, files, options, &FLEETBOOT_DHCP))?;
        // Let the write-behind thread commit the last leases before counting them.
        std::thread::sleep(Duration::from_secs(1));
        let metrics = net
            .cli("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{SRV_IP}:{HTTP_PORT}/metrics"))
            .output()
            .context("cannot run curl")?;
        run.metrics = String::from_utf8_lossy(&metrics.stdout)
            .lines()
            .filter(|l| l.starts_with("fleetboot_dhcp_"))
            .map(|l| format!("{l}\n"))
            .collect();
        daemon.stop()?;
        run.leases_on_disk = Some(sqlite_count(&state.join("fleet.sqlite"), "leases")?);
        Ok(run)
    })?);

    // kea-dhcp4: memfile, persisted.
    let kea_leases = work.join("kea-leases4.csv");
    let kea_config = work.join("kea-dhcp4.json");
    let kea = serde_json::json!({
        "Dhcp4": {
            "interfaces-config": { "interfaces": [SRV_IF] },
            "lease-database": { "type": "memfile", "persist": true, "name": kea_leases },
            "valid-lifetime": 3600,
            "subnet4": [{
                "id": 1,
                "subnet": format!("10.88.0.0/{PREFIX}"),
                "pools": [{ "pool": format!("{} - {}", POOL[0], POOL[1]) }]
            }],
            // Warnings only: Kea logs every lease at INFO, which no other server here does.
            "loggers": [{
                "name": "kea-dhcp4",
                "output_options": [{ "output": "stdout" }],
                "severity": "WARN"
            }]
        }
    });
    fs::write(&kea_config, serde_json::to_string_pretty(&kea)?)
        .with_context(|| format!("cannot write {}", kea_config.display()))?;
    runs.push(best_rate(options.repeat, || {
        remove_if_present(&kea_leases)?;
        let daemon = net.start(
            net.srv("kea-dhcp4")
                .arg("-c")
                .arg(&kea_config)
                .env("KEA_LOCKFILE_DIR", work)
                .env("KEA_PIDFILE_DIR", work),
            &work.join("kea-dhcp4.log"),
            true,
            67,
        )?;
        let mut run = daemon.explain(perfdhcp(net, &daemon, files, options, &KEA))?;
        daemon.stop()?;
        run.leases_on_disk = Some(kea_lease_count(&kea_leases)?);
        Ok(run)
    })?);

    // dnsmasq: with a lease file, then with --leasefile-ro.
    for server in [&DNSMASQ, &DNSMASQ_RO] {
        let read_only = std::ptr::eq(server, &DNSMASQ_RO);
        let leases = work.join("dnsmasq.leases");
        runs.push(best_rate(options.repeat, || {
            remove_if_present(&leases)?;
            let mut cmd = net.srv("dnsmasq");
            cmd.args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--no-ping",
                "--quiet-dhcp",
                "--bind-interfaces",
                &format!("--interface={SRV_IF}"),
                &format!("--dhcp-range={},{},255.255.0.0,1h", POOL[0], POOL[1]),
                "--dhcp-lease-max=100000",
            ]);
            if read_only {
                cmd.arg("--leasefile-ro");
            } else {
                cmd.arg(format!("--dhcp-leasefile={}", leases.display()));
            }
            let log = work.join(format!("{}.log", server.slug));
            let daemon = net.start(&mut cmd, &log, true, 67)?;
            let mut run = daemon.explain(perfdhcp(net, &daemon, files, options, server))?;
            daemon.stop()?;
            if !read_only {
                let text = fs::read_to_string(&leases)
                    .with_context(|| format!("cannot read {}", leases.display()))?;
                run.leases_on_disk = Some(text.lines().count() as u64);
            }
            Ok(run)
        })?);
    }
    Ok(runs)
}

/// Runs `once` `repeat` times and keeps the run with the best rate.
fn best_rate(repeat: usize, mut once: impl FnMut() -> Result<DhcpRun>) -> Result<DhcpRun> {
    let mut best = undisturbed(&mut once)?;
    for _ in 1..repeat {
        let next = undisturbed(&mut once)?;
        if next.rate > best.rate {
            best = next;
        }
    }
    Ok(best)
}

/// Runs perfdhcp from the client namespace against whatever serves DHCP now.
fn perfdhcp(
    net: &Net,
    daemon: &Daemon,
    files: &Files,
    options: &Options,
    server: &'static DhcpServer,
) -> Result<DhcpRun> {
    eprintln!("bench: DHCP: {}", server.label);
    let mut cmd = net.cli("perfdhcp");
    cmd.args([
        "-4",
        "-g",
        "single",
        "-l",
        CLI_IF,
        "-r",
        "40000",
        "-p",
        &options.dhcp_seconds().to_string(),
        "-R",
        &options.clients.to_string(),
        "-M",
    ])
    .arg(&files.macs);
    wait_until_idle()?;
    eprintln!("$ {}", show(&cmd));
    let cpu_before = daemon.cpu()?;
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    let took = started.elapsed();
    let cpu = daemon.cpu()?.saturating_sub(cpu_before);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = files.work.join(format!("perfdhcp-{}.log", server.slug));
    fs::write(
        &log,
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    )
    .with_context(|| format!("cannot write {}", log.display()))?;
    // perfdhcp exits 3 when packets were dropped, which is a result, not a failure.
    if !matches!(out.status.code(), Some(0 | 3)) {
        bail!(
            "{} failed: {}\n{text}{}",
            show(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Rate:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse::<f64>().ok())
        .with_context(|| {
            format!(
                "no `Rate: N 4-way exchanges/second` in perfdhcp's output (see {})",
                log.display()
            )
        })?;
    let drops: Vec<f64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("drops ratio:"))
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|r| r.parse::<f64>().ok())
        .collect();
    let [discover, request] = drops[..] else {
        bail!(
            "expected two `drops ratio:` lines in perfdhcp's output, found {} (see {})",
            drops.len(),
            log.display()
        );
    };
    eprintln!(
        "bench: {}: {rate:.0} DORA/s, drops {discover} % and {request} %",
        server.label
    );
    Ok(DhcpRun {
        server,
        rate,
        drops: [discover, request],
        cpu,
        period: took,
        leases_on_disk: None,
        metrics: String::new(),
    })
}

/// Rows of `table` in the SQLite database at `db` (with the sqlite3 shell).
fn sqlite_count(db: &Path, table: &str) -> Result<u64> {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(format!("SELECT count(*) FROM {table}"))
        .output()
        .context("cannot run sqlite3")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| {
        format!(
            "sqlite3 {} printed {text:?}: {}",
            db.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Distinct addresses in Kea's memfile (a CSV log: the first field is the address).
fn kea_lease_count(path: &Path) -> Result<u64> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let addresses: std::collections::HashSet<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .collect();
    Ok(addresses.len() as u64)
}

// ---------------------------------------------------------------------------------------------
// TFTP.

/// One TFTP server's best download times.
struct TftpRun {
    server: String,
    /// `curl --tftp-blksize 1468`.
    curl: Duration,
    /// `atftp --option "blksize 1468" --option "windowsize 16"`.
    atftp: Duration,
    reference: &'static str,
}

fn bench_tftp(
    net: &Net,
    fleetboot: &Path,
    atftpd: &Path,
    files: &Files,
    options: &Options,
) -> Result<Vec<TftpRun>> {
    let work = &files.work;
    let mut runs = Vec::new();

    let daemon = net.start(
        net.srv(fleetboot)
            .arg("serve")
            .arg("--config")
            .arg(&files.files_config),
        &work.join("fleetboot-files.log"),
        true,
        69,
    )?;
    let run = daemon.explain(tftp_downloads(net, files, options, "fleetboot", ""))?;
    daemon.stop()?;
    runs.push(run);

    let daemon = net.start(
        net.srv("in.tftpd")
            .args([
                "--foreground",
                "--address",
                &format!("{SRV_IP}:69"),
                "--secure",
            ])
            .arg(&files.boot),
        &work.join("tftpd-hpa.log"),
        true,
        69,
    )?;
    let run = daemon.explain(tftp_downloads(
        net,
        files,
        options,
        "tftpd-hpa",
        REF_TFTPD_CURL,
    ))?;
    daemon.stop()?;
    runs.push(run);

    let daemon = net.start(
        net.srv(atftpd)
            .args([
                "--daemon",
                "--no-fork",
                "--bind-address",
                SRV_IP,
                "--port",
                "69",
                "--user",
                "root",
                "--group",
                "root",
                "--logfile",
                "-",
            ])
            .arg(&files.boot),
        &work.join("atftpd.log"),
        true,
        69,
    )?;
    let mut run = daemon.explain(tftp_downloads(net, files, options, "atftpd", ""))?;
    run.reference = REF_ATFTPD_WINDOW;
    daemon.stop()?;
    runs.push(run);
    Ok(runs)
}

/// Best-of-N downloads of [`TFTP_FILE`] with curl and with atftp, each checked.
fn tftp_downloads(
    net: &Net,
    files: &Files,
    options: &Options,
    server: &str,
    reference: &'static str,
) -> Result<TftpRun> {
    eprintln!("bench: TFTP: {server}");
    let expected = fs::read(files.boot.join(TFTP_FILE))?;
    let out = files.work.join("tftp.out");
    let url = format!("tftp://{SRV_IP}/{TFTP_FILE}");
    let curl = best_time(options.runs, || {
        let mut cmd = net.cli("curl");
        cmd.args(["-sS", "--max-time", "60", "--tftp-blksize", "1468", "-o"])
            .arg(&out)
            .arg(&url);
        timed_download(&mut cmd, &out, &expected, server)
    })?;
    let atftp = best_time(options.runs, || {
        let mut cmd = net.cli("atftp");
        cmd.args([
            "--option",
            "blksize 1468",
            "--option",
            "windowsize 16",
            "-g",
            "-r",
            TFTP_FILE,
            "-l",
        ])
        .arg(&out)
        .arg(SRV_IP);
        timed_download(&mut cmd, &out, &expected, server)
    })?;
    remove_if_present(&out)?;
    Ok(TftpRun {
        server: server.to_string(),
        curl,
        atftp,
        reference,
    })
}

/// Runs a download, times it, and checks that `out` then holds exactly `expected`.
fn timed_download(
    cmd: &mut Command,
    out: &Path,
    expected: &[u8],
    server: &str,
) -> Result<Duration> {
    remove_if_present(out)?;
    wait_until_idle()?;
    eprintln!("$ {}", show(cmd));
    let started = Instant::now();
    let result = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    let took = started.elapsed();
    if !result.status.success() {
        bail!(
            "{} failed against {server}: {}\n{}{}",
            show(cmd),
            result.status,
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let got = fs::read(out).with_context(|| format!("{} left no {}", show(cmd), out.display()))?;
    if got != expected {
        bail!(
            "{} against {server}: got {} bytes that differ from the {} of the file",
            show(cmd),
            got.len(),
            expected.len()
        );
    }
    eprintln!("bench: {server}: {:.3} s", took.as_secs_f64());
    Ok(took)
}

fn best_time(runs: usize, mut once: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let mut best = undisturbed(&mut once)?;
    for _ in 1..runs {
        best = best.min(undisturbed(&mut once)?);
    }
    Ok(best)
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// One HTTP server's wrk run.
struct HttpRun {
    server: String,
    requests_per_s: f64,
    /// Bytes per second, as wrk reports them.
    bytes_per_s: f64,
    /// wrk's `Socket errors:` line, if any.
    errors: Option<String>,
}

fn bench_http(
    net: &Net,
    fleetboot: &Path,
    files: &Files,
    options: &Options,
) -> Result<Vec<HttpRun>> {
    let work = &files.work;
    let url = format!("http://{SRV_IP}:{HTTP_PORT}/store/{}", files.pack);
    let pack = fs::read(files.store.join(&files.pack))?;
    let expected = &pack[RANGE.0 as usize..=RANGE.1 as usize];
    let mut runs = Vec::new();

    let daemon = net.start(
        net.srv(fleetboot)
            .arg("serve")
            .arg("--config")
            .arg(&files.files_config),
        &work.join("fleetboot-http.log"),
        false,
        HTTP_PORT,
    )?;
    check_range(net, &url, expected, work, "fleetboot")?;
    runs.push(daemon.explain(best_wrk(net, &url, options, "fleetboot"))?);
    daemon.stop()?;

    let nginx_dir = work.join("nginx");
    fresh_dir(&nginx_dir)?;
    let conf = nginx_dir.join("nginx.conf");
    let d = nginx_dir.display();
    fs::write(
        &conf,
        format!(
            "user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {SRV_IP}:{HTTP_PORT};
        location /store/ {{ alias {}/; }}
    }}
}}
",
            files.store.display()
        ),
    )
    .with_context(|| format!("cannot write {}", conf.display()))?;
    let daemon = net.start(
        net.srv("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&nginx_dir)
            .arg("-e")
            .arg(nginx_dir.join("error.log"))
            .args(["-g", "daemon off;"]),
        &work.join("nginx.log"),
        false,
        HTTP_PORT,
    )?;
    check_range(net, &url, expected, work, "nginx")?;
    runs.push(daemon.explain(best_wrk(net, &url, options, "nginx"))?);
    daemon.stop()?;
    Ok(runs)
}

/// Fetches the range once with curl and checks the status (206) and the bytes.
fn check_range(net: &Net, url: &str, expected: &[u8], work: &Path, server: &str) -> Result<()> {
    let out = work.join("range.out");
    remove_if_present(&out)?;
    let mut cmd = net.cli("curl");
    cmd.args(["-sS", "--max-time", "10", "-w", "%{http_code}", "-r"])
        .arg(format!("{}-{}", RANGE.0, RANGE.1))
        .arg("-o")
        .arg(&out)
        .arg(url);
    let result = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    let code = String::from_utf8_lossy(&result.stdout).trim().to_string();
    if !result.status.success() || code != "206" {
        bail!(
            "{} against {server}: status {code:?}, {}",
            show(&cmd),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let got = fs::read(&out).with_context(|| format!("cannot read {}", out.display()))?;
    if got != expected {
        bail!(
            "{server} answered the range {}-{} with {} bytes that are not the pack's",
            RANGE.0,
            RANGE.1,
            got.len()
        );
    }
    remove_if_present(&out)
}

/// `options.repeat` wrk runs against one server; the best is kept.
fn best_wrk(net: &Net, url: &str, options: &Options, server: &str) -> Result<HttpRun> {
    let mut best = undisturbed(|| wrk(net, url, options, server))?;
    for _ in 1..options.repeat {
        let next = undisturbed(|| wrk(net, url, options, server))?;
        if next.requests_per_s > best.requests_per_s {
            best = next;
        }
    }
    Ok(best)
}

/// The admin token of the benchmark's appliance.
const BENCH_TOKEN: &str = "bench-token";

fn wrk(net: &Net, url: &str, options: &Options, server: &str) -> Result<HttpRun> {
    eprintln!("bench: HTTP: {server}");
    let seconds = options.wrk_duration();
    let mut cmd = net.cli("wrk");
    // The store is served to token holders: every request carries one (nginx ignores it), so
    // fleetboot's check is part of what is measured.
    cmd.args(["-c", "50", "-t", "2", "-d", seconds, "-H"])
        .arg(format!("Range: bytes={}-{}", RANGE.0, RANGE.1))
        .arg("-H")
        .arg(format!("Authorization: Bearer {BENCH_TOKEN}"))
        .arg(url);
    wait_until_idle()?;
    eprintln!("$ {}", show(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{} failed: {}\n{text}{}",
            show(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx or 3xx")) {
        bail!("wrk against {server}: {}\n{text}", line.trim());
    }
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(str::trim)
            .with_context(|| format!("no `{key}` in wrk's output:\n{text}"))
    };
    let requests_per_s: f64 = value("Requests/sec:")?
        .parse()
        .with_context(|| format!("cannot read wrk's Requests/sec:\n{text}"))?;
    let bytes_per_s = wrk_bytes(value("Transfer/sec:")?)
        .with_context(|| format!("cannot read wrk's Transfer/sec:\n{text}"))?;
    let errors = text
        .lines()
        .find(|l| l.contains("Socket errors"))
        .map(|l| l.trim().to_string());
    eprintln!(
        "bench: {server}: {requests_per_s:.0} requests/s, {:.0} MB/s",
        bytes_per_s / 1e6
    );
    Ok(HttpRun {
        server: server.to_string(),
        requests_per_s,
        bytes_per_s,
        errors,
    })
}

/// wrk's `2.41GB` and the like, in bytes (wrk's units are powers of 1024).
fn wrk_bytes(text: &str) -> Option<f64> {
    let units = [
        ("GB", 1u64 << 30),
        ("MB", 1 << 20),
        ("KB", 1 << 10),
        ("B", 1),
    ];
    units.iter().find_map(|(unit, scale)| {
        text.strip_suffix(unit)
            .and_then(|n| n.trim().parse::<f64>().ok())
            .map(|n| n * *scale as f64)
    })
}

// ---------------------------------------------------------------------------------------------
// The report.

/// How the machine was during the benchmark: other work on the CPUs shifts every figure here,
/// and lock-step TFTP even gets faster on a busy machine (no core sleeps between two blocks).
struct Machine {
    loadavg_before: String,
    loadavg_after: String,
    /// Timed measurements (perfdhcp runs, downloads, wrk runs), repeated ones included.
    measurements: usize,
    /// Those that started with other work on the CPUs (the waiting budget spent).
    started_busy: usize,
    /// Those measured again because other work showed up right after them.
    repeated: usize,
    /// Those kept although other work showed up right after them (the last try).
    kept_disturbed: usize,
}

static MEASUREMENTS: AtomicUsize = AtomicUsize::new(0);
static STARTED_BUSY: AtomicUsize = AtomicUsize::new(0);
static REPEATED: AtomicUsize = AtomicUsize::new(0);
static KEPT_DISTURBED: AtomicUsize = AtomicUsize::new(0);
/// Milliseconds waited so far for the machine to fall idle.
static WAITED_MS: AtomicUsize = AtomicUsize::new(0);

/// How long the whole benchmark may wait for the machine to fall idle; once spent, every
/// measurement starts at once and none is repeated.
const WAIT_BUDGET: Duration = Duration::from_secs(60);
/// Idle: at most this share of all CPUs busy over [`IDLE_SAMPLE`] (the servers under test idle
/// meanwhile).
const IDLE_BUSY: f64 = 0.1;
const IDLE_SAMPLE: Duration = Duration::from_millis(300);
/// Tries of one measurement when other work keeps showing up right after it.
const TRIES: usize = 3;

fn budget_left() -> bool {
    (WAITED_MS.load(Ordering::Relaxed) as u128) < WAIT_BUDGET.as_millis()
}

/// The share of all CPUs busy over the next [`IDLE_SAMPLE`].
fn busy_share() -> Result<f64> {
    let (busy0, total0) = cpu_ticks()?;
    std::thread::sleep(IDLE_SAMPLE);
    let (busy1, total1) = cpu_ticks()?;
    Ok((busy1 - busy0) as f64 / (total1 - total0).max(1) as f64)
}

/// Called right before each timed measurement: waits until the CPUs are idle of other work,
/// while the benchmark's waiting budget lasts, and counts the measurement.
fn wait_until_idle() -> Result<()> {
    MEASUREMENTS.fetch_add(1, Ordering::Relaxed);
    let mut told = false;
    loop {
        let started = Instant::now();
        let busy = busy_share()?;
        if busy <= IDLE_BUSY {
            return Ok(());
        }
        if !budget_left() {
            eprintln!(
                "bench: warning: the CPUs are {:.0} % busy with other work and the waiting budget \
                 ({} s) is spent: measuring anyway",
                busy * 100.0,
                WAIT_BUDGET.as_secs()
            );
            STARTED_BUSY.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if !told {
            eprintln!(
                "bench: the CPUs are {:.0} % busy with other work: waiting for them to fall idle",
                busy * 100.0
            );
            told = true;
        }
        WAITED_MS.fetch_add(started.elapsed().as_millis() as usize, Ordering::Relaxed);
    }
}

/// Runs a measurement (which calls [`wait_until_idle`] right before its timed part) and checks
/// that the CPUs are still idle right after it: other work that started meanwhile (a compiler,
/// say) slows the servers, and speeds lock-step TFTP up by keeping the cores awake, so such a
/// measurement is made again, up to [`TRIES`] times while the waiting budget lasts.
fn undisturbed<T>(mut once: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 1;
    loop {
        let value = once()?;
        let started = Instant::now();
        let busy = busy_share()?;
        if busy <= IDLE_BUSY {
            return Ok(value);
        }
        if tries == TRIES || !budget_left() {
            eprintln!(
                "bench: warning: the CPUs were {:.0} % busy with other work right after the \
                 measurement; keeping it",
                busy * 100.0
            );
            KEPT_DISTURBED.fetch_add(1, Ordering::Relaxed);
            return Ok(value);
        }
        eprintln!(
            "bench: the CPUs were {:.0} % busy with other work right after the measurement: \
             measuring again",
            busy * 100.0
        );
        REPEATED.fetch_add(1, Ordering::Relaxed);
        WAITED_MS.fetch_add(started.elapsed().as_millis() as usize, Ordering::Relaxed);
        tries += 1;
    }
}

/// The first three fields of /proc/loadavg.
fn loadavg() -> Result<String> {
    let text = fs::read_to_string("/proc/loadavg").context("cannot read /proc/loadavg")?;
    Ok(text
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "))
}

/// Busy and total CPU ticks of all CPUs, from the first line of /proc/stat.
fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    if ticks.len() < 5 {
        bail!("cannot read the CPU times in /proc/stat");
    }
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let total: u64 = ticks.iter().take(8).sum();
    Ok((total - ticks[3] - ticks[4], total))
}

fn report(
    options: &Options,
    machine: &Machine,
    dhcp: &[DhcpRun],
    tftp: &[TftpRun],
    http: &[HttpRun],
) -> Result<String> {
    let mut s = String::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    writeln!(
        s,
        "## Serve benchmark: DHCP, TFTP and HTTP against the usual servers"
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "{cores} cores; load average {} before, {} after. Servers in one network namespace, clients \
         in another, joined by a veth pair; every server in the same run, one at a time, measured \
         as docs/benchmark-method.md says.{}",
        machine.loadavg_before,
        machine.loadavg_after,
        if options.quick {
            " **Quick run: short periods, one run each; not figures to quote.**"
        } else {
            ""
        }
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "Other work on the CPUs slows the servers, and speeds lock-step TFTP up by keeping the \
         cores awake, so each measurement started only once the CPUs were idle of other work \
         (≤ {:.0} % busy over {} ms) and was made again (up to {TRIES} times) when they were busy \
         right after it, within a waiting budget of {} s. {} measurements: {} made again, {} \
         started on a busy machine, {} kept although the machine was busy right after.{}",
        IDLE_BUSY * 100.0,
        IDLE_SAMPLE.as_millis(),
        WAIT_BUDGET.as_secs(),
        machine.measurements,
        machine.repeated,
        machine.started_busy,
        machine.kept_disturbed,
        if machine.started_busy + machine.kept_disturbed > 0 {
            " **Some figures were taken on a busy machine: run it again on a quiet one.**"
        } else {
            ""
        }
    )?;
    writeln!(s)?;

    let fleetboot_dhcp = &dhcp[0];
    writeln!(s, "### DHCP")?;
    writeln!(s)?;
    writeln!(
        s,
        "`perfdhcp -4 -g single -l {CLI_IF} -r 40000 -p {} -R {n} -M macs.txt`: {n} MACs, every one \
         a known host of fleetboot's, relayed from {CLI_IP} (giaddr); pool {} – {} in \
         10.88.0.0/{PREFIX}. Best of {} runs, each on a freshly started server with an empty lease \
         database; all lease databases in the same folder on the same disk. Server CPU: what the \
         server process used during the run. Leases on disk: read back after the run (Kea: distinct \
         addresses in its CSV).",
        options.dhcp_seconds(),
        POOL[0],
        POOL[1],
        options.repeat,
        n = options.clients
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "| server | DORA/s | drops DISCOVER-OFFER | drops REQUEST-ACK | server CPU | leases on disk | reference (docs/benchmark-method.md) | fleetboot ÷ it |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---|---:|")?;
    for (i, run) in dhcp.iter().enumerate() {
        writeln!(
            s,
            "| {} | {:.0} | {:.1} % | {:.1} % | {:.0} % of a core | {} | {} | {} |",
            run.server.label,
            run.rate,
            run.drops[0],
            run.drops[1],
            100.0 * run.cpu.as_secs_f64() / run.period.as_secs_f64(),
            run.leases_on_disk
                .map_or_else(|| "none (read-only)".to_string(), |n| n.to_string()),
            run.server.reference,
            if i == 0 {
                String::new()
            } else {
                format!("{:.2}", fleetboot_dhcp.rate / run.rate)
            }
        )?;
    }
    writeln!(s)?;
    writeln!(
        s,
        "dnsmasq rewrites and fsyncs its whole lease file after every change; Kea's memfile appends \
         without fsync and fleetboot's SQLite (WAL, synchronous=NORMAL) syncs only at checkpoints, \
         so dnsmasq's lease-file figure depends on the disk's fsync far more than the others'."
    )?;
    writeln!(s)?;
    if !fleetboot_dhcp.metrics.is_empty() {
        writeln!(s, "fleetboot's DHCP counters after its best run:")?;
        writeln!(s)?;
        writeln!(s, "```\n{}```", fleetboot_dhcp.metrics)?;
        writeln!(s)?;
    }

    let fleetboot_tftp = &tftp[0];
    writeln!(s, "### TFTP")?;
    writeln!(s)?;
    writeln!(
        s,
        "A {} MiB file, best of {} downloads each, every download checked byte for byte. curl: \
         `curl --tftp-blksize 1468`; atftp: `atftp --option \"blksize 1468\" --option \"windowsize 16\"` \
         (tftpd-hpa does not grant windowsize; atftpd does). Ratios are speed ratios (its time ÷ \
         fleetboot's): above 1, fleetboot is faster.",
        TFTP_BYTES >> 20,
        options.runs
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "| server | curl blksize 1468 (s) | atftp windowsize 16 (s) | reference (docs/benchmark-method.md) | fleetboot speed ÷ its: curl | atftp |"
    )?;
    writeln!(s, "|---|---:|---:|---|---:|---:|")?;
    for (i, run) in tftp.iter().enumerate() {
        let ratio = |theirs: Duration, ours: Duration| {
            if i == 0 {
                String::new()
            } else {
                format!("{:.2}", theirs.as_secs_f64() / ours.as_secs_f64())
            }
        };
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            run.server,
            secs(run.curl),
            secs(run.atftp),
            run.reference,
            ratio(run.curl, fleetboot_tftp.curl),
            ratio(run.atftp, fleetboot_tftp.atftp),
        )?;
    }
    writeln!(s)?;

    let fleetboot_http = &http[0];
    writeln!(s, "### HTTP")?;
    writeln!(s)?;
    writeln!(
        s,
        "`wrk -c 50 -t 2 -d {} -H \"Range: bytes={}-{}\"` on a store pack file \
         (`/store/packs/ID.pack`, {} MiB of incompressible data); nginx (sendfile on) serves the \
         same store folder. Best of {} runs. MB = 10^6 bytes.",
        options.wrk_duration(),
        RANGE.0,
        RANGE.1,
        PACK_SOURCE_BYTES >> 20,
        options.repeat
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "| server | requests/s | transfer (MB/s) | fleetboot ÷ it |"
    )?;
    writeln!(s, "|---|---:|---:|---:|")?;
    for (i, run) in http.iter().enumerate() {
        writeln!(
            s,
            "| {} | {:.0} | {:.0} | {} |",
            run.server,
            run.requests_per_s,
            run.bytes_per_s / 1e6,
            if i == 0 {
                String::new()
            } else {
                format!("{:.2}", fleetboot_http.requests_per_s / run.requests_per_s)
            }
        )?;
    }
    for run in http {
        if let Some(errors) = &run.errors {
            writeln!(s)?;
            writeln!(s, "wrk against {}: {errors}", run.server)?;
        }
    }
    writeln!(s)?;

    let kea = dhcp
        .iter()
        .find(|r| std::ptr::eq(r.server, &KEA))
        .context("no kea-dhcp4 run")?;
    let tftpd = tftp
        .iter()
        .find(|r| r.server == "tftpd-hpa")
        .context("no tftpd-hpa run")?;
    let nginx = http
        .iter()
        .find(|r| r.server == "nginx")
        .context("no nginx run")?;
    let window_bound = tftpd.atftp.div_f64(1.5);
    let persisted = fleetboot_dhcp.leases_on_disk.unwrap_or(0) > 0;
    let targets = [
        (
            "DHCP ≥ kea-dhcp4, leases persisted",
            fleetboot_dhcp.rate >= kea.rate && persisted,
            format!(
                "{:.0}/s{}",
                fleetboot_dhcp.rate,
                if persisted { "" } else { ", no lease on disk" }
            ),
            format!("{:.0}/s", kea.rate),
        ),
        (
            "TFTP ≥ tftpd-hpa, curl blksize 1468",
            fleetboot_tftp.curl <= tftpd.curl,
            format!("{} s", secs(fleetboot_tftp.curl)),
            format!("{} s", secs(tftpd.curl)),
        ),
        (
            "TFTP ≥ 1.5 × tftpd-hpa, atftp windowsize 16",
            fleetboot_tftp.atftp <= window_bound,
            format!("{} s", secs(fleetboot_tftp.atftp)),
            format!("{} s", secs(window_bound)),
        ),
        (
            "HTTP range reads ≥ 0.9 × nginx",
            fleetboot_http.requests_per_s >= 0.9 * nginx.requests_per_s,
            format!("{:.0}/s", fleetboot_http.requests_per_s),
            format!("{:.0}/s", 0.9 * nginx.requests_per_s),
        ),
    ];
    writeln!(s, "### Targets")?;
    writeln!(s)?;
    writeln!(s, "| target | fleetboot | bound | result |")?;
    writeln!(s, "|---|---:|---:|---|")?;
    for (target, met, have, bound) in targets {
        let result = if met { "PASS" } else { "MISS" };
        writeln!(s, "| {target} | {have} | {bound} | {result} |")?;
    }
    Ok(s)
}

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// Runs `cmd` with its output captured; fails with its stderr if it exits non-zero.
fn quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}\n{}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

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
