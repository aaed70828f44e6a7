//! `cargo xtask bench fleet`: a rack installing at once. N host-mode agents, each in its own
//! network namespace behind one bridge, every link shaped with `tc` to a rate (1 Gbit/s; the
//! appliance's link too), all install the store benchmark's Debian image B (2 GiB ext4) to
//! sparse files at once — once from the appliance, once with the same agents fetching the same
//! manifest and packs from nginx (`store_url`), in the same run.
//!
//! Reported per N and server: time until every agent is done, the server link's utilisation
//! (range data served ÷ (link rate × time)), the server's CPU time and peak memory (resident
//! high-water mark; nginx: master and workers), and how busy this machine's cores were. Every
//! agent verifies its file (every chunk read back) before it reports done; the first and last
//! are also compared byte for byte with B.
//!
//! Then, in the same network, N curl clients ask for the same frames as the agents and throw
//! them away: what the server does for a rack whose machines each have their own CPU, where
//! here N agents share this machine's few cores.

use crate::bench_store::{check_identical, fresh_dir, settle};
use crate::os_images;
use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use fleetboot_lab::{Daemon, Host, Lab};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: cargo xtask bench fleet [--agents 10,50,100] [--rate-mbit 1000] [--rounds 2]

  --agents N,...   fleets installing at once, one after the other (default 10,50,100)
  --rate-mbit R    every link's rate, the appliance's too (default 1000)
  --rounds R       every fleet R times from each server; which goes first alternates from
                   round to round (default 2: each goes first once per fleet size)

Needs free disk for the largest fleet: N x image B's data (about 0.3 GB each).
";

const SERVER_IP: &str = "10.66.0.1";
const HTTP_PORT: u16 = 8080;
const NGINX_PORT: u16 = 8081;
/// The fetch-only clients' token for the appliance's store (nginx asks for none).
const ADMIN_TOKEN: &str = "fleet-bench-token";

struct Options {
    agents: Vec<usize>,
    rate_mbit: u64,
    rounds: usize,
}

fn parse(args: &[&str]) -> Result<Option<Options>> {
    let mut o = Options {
        agents: vec![10, 50, 100],
        rate_mbit: 1000,
        rounds: 2,
    };
    let mut args = args.iter();
    while let Some(&arg) = args.next() {
        match arg {
            "-h" | "--help" => return Ok(None),
            "--agents" => {
                let list = args.next().context("--agents needs a list")?;
                o.agents = list
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .ok()
                    .filter(|v: &Vec<usize>| v.iter().all(|&n| (1..=1000).contains(&n)))
                    .with_context(|| format!("--agents {list}: numbers from 1 to 1000\n{USAGE}"))?;
            }
            "--rate-mbit" => {
                o.rate_mbit = args
                    .next()
                    .and_then(|r| r.parse().ok())
                    .filter(|&r: &u64| r > 0)
                    .with_context(|| format!("--rate-mbit needs a positive number\n{USAGE}"))?;
            }
            "--rounds" => {
                o.rounds = args
                    .next()
                    .and_then(|r| r.parse().ok())
                    .filter(|r: &usize| (1..=20).contains(r))
                    .with_context(|| format!("--rounds needs a number from 1 to 20\n{USAGE}"))?;
            }
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    Ok(Some(o))
}

/// One fleet's install from one server.
struct FleetRun {
    agents: usize,
    server: &'static str,
    /// Whether this server went first in its pair.
    first: bool,
    took: Duration,
    /// Range data the agents fetched (their own count).
    fetched: u64,
    cpu: Duration,
    peak_rss: u64,
    /// The agents' own CPU time, all together.
    agents_cpu: Duration,
    /// The share of this machine's CPU time that was busy during the run (agents, server and
    /// kernel together): near 1, the simulated machines were bound by the cores they share.
    machine_busy: f64,
    /// The same frames fetched by curl clients that do nothing else.
    fetch: FetchRun,
}

/// N curl clients fetching an image's frames at once.
struct FetchRun {
    took: Duration,
    fetched: u64,
    cpu: Duration,
    machine_busy: f64,
}

pub fn run(args: &[&str]) -> Result<()> {
    let Some(options) = parse(args)? else {
        print!("{USAGE}");
        return Ok(());
    };
    crate::setup::apt_install(crate::setup::BENCH_PACKAGES)?;
    crate::setup::apt_install(&[("nginx-light", "nginx"), ("iproute2", "tc")])?;
    let images = os_images::build(&root().join("target/bench/store"))?;
    let b = &images[1];
    let fleetboot = util::build_release(&["fleetboot", "fleetboot-agent"])?;
    let agent = root().join("target/release/fleetboot-agent");

    let dir = root().join("target/bench/fleet");
    fresh_dir(&dir)?;
    fs::create_dir_all(dir.join("boot"))?;
    util::run(
        Command::new(&fleetboot)
            .arg("--store")
            .arg(dir.join("store"))
            .args(["image", "import", "debian"])
            .arg(&b.image),
    )?;
    check_room(
        &dir,
        &b.image,
        options.agents.iter().max().copied().unwrap_or(1),
    )?;

    let mut runs = Vec::new();
    for (k, &n) in options.agents.iter().enumerate() {
        for round in 0..options.rounds {
            // Which server goes first alternates: in every pair of the runs so far the first
            // was the slower, whichever server it was.
            let order = if (k + round) % 2 == 0 {
                ["fleetboot", "nginx"]
            } else {
                ["nginx", "fleetboot"]
            };
            for server in order {
                let mut run = fleet(&dir, &fleetboot, &agent, &b.image, n, server, &options)?;
                run.first = server == order[0];
                runs.push(run);
            }
        }
    }
    let report = report(&runs, &options);
    println!("\n{report}");
    fs::write(dir.join("results.md"), &report)?;
    eprintln!("bench: wrote {}", dir.join("results.md").display());
    Ok(())
}

/// Fails early when the largest fleet's files would not fit.
fn check_room(dir: &Path, image: &Path, agents: usize) -> Result<()> {
    let used = |p: &Path| -> Result<u64> {
        let out = util::output(Command::new("du").args(["-B1", "-s"]).arg(p))?;
        out.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .context("cannot read du's answer")
    };
    let need = used(image)? * agents as u64 * 11 / 10;
    let out = util::output(Command::new("df").args(["-B1", "--output=avail"]).arg(dir))?;
    let free: u64 = out
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .context("cannot read df's answer")?;
    if need > free {
        bail!(
            "{agents} agents need about {} GB of free disk under {}, {} GB are free: give \
             --agents a smaller fleet",
            need / 1_000_000_000,
            dir.display(),
            free / 1_000_000_000
        );
    }
    Ok(())
}

/// `tc`: the egress of `ifname` in namespace `ns` at the rate.
fn shape(ns: &str, ifname: &str, rate_mbit: u64) -> Result<()> {
    util::run(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "tc",
        "qdisc",
        "add",
        "dev",
        ifname,
        "root",
        "tbf",
        "rate",
        &format!("{rate_mbit}mbit"),
        "burst",
        "1mb",
        "latency",
        "20ms",
    ]))
}

fn mac(i: usize) -> String {
    format!("52:54:00:f1:{:02x}:{:02x}", (i + 1) >> 8, (i + 1) & 0xff)
}

#[allow(clippy::too_many_arguments)]
fn fleet(
    dir: &Path,
    fleetboot: &Path,
    agent: &Path,
    image: &Path,
    n: usize,
    server: &'static str,
    options: &Options,
) -> Result<FleetRun> {
    eprintln!("bench: fleet of {n} from {server}");
    let mut lab = Lab::new("fleet")?;
    let app = lab.host("app", "52:54:00:f1:00:00", Some(&format!("{SERVER_IP}/16")))?;
    shape(&app.ns, &app.ifname, options.rate_mbit)?;
    let mut hosts: Vec<Host> = Vec::new();
    for i in 0..n {
        let addr = format!("10.66.{}.{}/16", 1 + i / 250, 1 + i % 250);
        let host = lab.host(&format!("a{i}"), &mac(i), Some(&addr))?;
        let (switch, port) = host.port().context("a plugged host")?;
        shape(switch, port, options.rate_mbit)?;
        hosts.push(host);
    }

    let work = dir.join(format!("{server}-{n}"));
    fresh_dir(&work)?;
    let mut yaml = format!(
        "interface: {}\naddress: {SERVER_IP}\nhttp_port: {HTTP_PORT}\nboot_dir: {}\nstore: {}\n\
         state_dir: {}\ndhcp: {{ mode: off }}\ntftp: {{ port: 6969 }}\n\
         admin_token: {ADMIN_TOKEN}\nhosts:\n",
        app.ifname,
        dir.join("boot").display(),
        dir.join("store").display(),
        work.join("state").display()
    );
    for i in 0..n {
        writeln!(yaml, "  \"{}\": {{ image: debian }}", mac(i))?;
    }
    if server == "nginx" {
        writeln!(yaml, "store_url: http://{SERVER_IP}:{NGINX_PORT}/store")?;
    }
    let config = work.join("fleetboot.yaml");
    fs::write(&config, yaml)?;
    let mut appliance = Daemon::start(
        app.cmd(fleetboot).args(["serve", "--config"]).arg(&config),
        &work.join("serve.log"),
    )?;
    app.wait_listening(HTTP_PORT, false, 15, &mut appliance)?;
    let nginx = if server == "nginx" {
        Some(start_nginx(&app, &work, &dir.join("store"))?)
    } else {
        None
    };
    let measured = nginx.as_ref().unwrap_or(&appliance);
    settle()?;
    let cpu_before = measured.cpu_with_children()?;
    let machine_before = machine_cpu()?;
    let agents_cpu_before = fleetboot_lab::waited_children_cpu()?;

    let out_dir = work.join("disks");
    fs::create_dir_all(&out_dir)?;
    let started = Instant::now();
    let mut children: Vec<(usize, Child)> = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let log = fs::File::create(work.join(format!("agent-{i}.err")))?;
        let child = host
            .cmd(agent)
            .args([
                "deploy",
                "--server",
                &format!("http://{SERVER_IP}:{HTTP_PORT}"),
                "--mac",
                &mac(i),
                "--target",
            ])
            .arg(out_dir.join(format!("{i}.img")))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot start an agent")?;
        children.push((i, child));
    }
    let mut fetched = 0;
    let mut failed = Vec::new();
    for (i, child) in children {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        match (out.status.success(), util::install_figures(&text)) {
            (true, Ok((f, _))) => fetched += f,
            _ => failed.push(i),
        }
    }
    let took = started.elapsed();
    let agents_cpu = fleetboot_lab::waited_children_cpu()?.saturating_sub(agents_cpu_before);
    let cpu = measured.cpu_with_children()?.saturating_sub(cpu_before);
    let machine_busy = machine_cpu()?.busy_since(&machine_before);
    let peak_rss = peak_rss(measured)?;
    if !failed.is_empty() {
        bail!(
            "{} of {n} agents failed (from {server}), e.g. agent {}: see {}",
            failed.len(),
            failed[0],
            work.join(format!("agent-{}.err", failed[0])).display()
        );
    }
    for i in [0, n - 1] {
        check_identical(image, &out_dir.join(format!("{i}.img")), "fleetboot-agent")?;
    }
    fs::remove_dir_all(&out_dir)?;

    settle()?;
    let base = match server {
        "nginx" => format!("http://{SERVER_IP}:{NGINX_PORT}/store/packs"),
        _ => format!("http://{SERVER_IP}:{HTTP_PORT}/store/packs"),
    };
    let fetch = fetch_only(&hosts, measured, &frames_of(dir)?, &base, &work)?;
    drop(nginx);
    drop(appliance);
    drop(lab);
    let run = FleetRun {
        agents: n,
        server,
        first: false,
        took,
        fetched,
        cpu,
        peak_rss,
        agents_cpu,
        machine_busy,
        fetch,
    };
    eprintln!(
        "bench: {n} agents from {server}: {:.1} s, link {:.2}, CPU {:.1} s, peak {} MB, \
         agents' CPU {:.1} s (demand {:.2}), machine busy {:.2}",
        took.as_secs_f64(),
        utilisation(&run, options),
        cpu.as_secs_f64(),
        peak_rss / 1_000_000,
        agents_cpu.as_secs_f64(),
        cpu_demand(&run, options),
        machine_busy
    );
    eprintln!(
        "bench: {n} fetch-only clients from {server}: {:.1} s, link {:.2}, CPU {:.1} s, \
         machine busy {:.2}",
        run.fetch.took.as_secs_f64(),
        link_share(run.fetch.fetched, run.fetch.took, options),
        run.fetch.cpu.as_secs_f64(),
        run.fetch.machine_busy
    );
    Ok(run)
}

/// The frames a fresh install of the benchmark's image fetches: (pack file, offset, length),
/// each once.
fn frames_of(dir: &Path) -> Result<Vec<(String, u64, u32)>> {
    let path = dir.join("store/manifests/debian/1.manifest");
    let manifest = fleetboot_image::Manifest::decode(
        &fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}", path.display()))?;
    let mut frames: Vec<(String, u64, u32)> = manifest
        .entries
        .iter()
        .map(|e| {
            (
                manifest.packs[e.pack as usize].file_name(),
                e.frame_offset,
                e.frame_stored,
            )
        })
        .collect();
    frames.sort();
    frames.dedup();
    Ok(frames)
}

/// Every host fetches `frames` from `base` with curl (Range requests on kept-alive
/// connections, two at a time as the agent's workers on 2 cores), discarding them.
fn fetch_only(
    hosts: &[Host],
    server: &Daemon,
    frames: &[(String, u64, u32)],
    base: &str,
    work: &Path,
) -> Result<FetchRun> {
    let mut config = String::new();
    for (i, (pack, offset, len)) in frames.iter().enumerate() {
        if i > 0 {
            config.push_str("next\n");
        }
        writeln!(
            config,
            "url = \"{base}/{pack}\"\nrange = \"{offset}-{}\"\noutput = \"/dev/null\"\n\
             header = \"Authorization: Bearer {ADMIN_TOKEN}\"\n\
             write-out = \"%{{http_code}} %{{size_download}}\\n\"",
            offset + u64::from(*len) - 1
        )?;
    }
    let config_path = work.join("fetch.curl");
    fs::write(&config_path, config)?;
    let expected: u64 = frames.iter().map(|f| u64::from(f.2)).sum();
    let cpu_before = server.cpu_with_children()?;
    let machine_before = machine_cpu()?;
    let started = Instant::now();
    let children = hosts
        .iter()
        .map(|h| {
            h.cmd("curl")
                .args(["-s", "--parallel", "--parallel-max", "2", "-K"])
                .arg(&config_path)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start curl")
        })
        .collect::<Result<Vec<Child>>>()?;
    // Every client waited for before any is judged: none is left running.
    let outputs: Vec<std::io::Result<std::process::Output>> =
        children.into_iter().map(|c| c.wait_with_output()).collect();
    let took = started.elapsed();
    let mut fetched = 0;
    for (i, out) in outputs.into_iter().enumerate() {
        let out = out?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut got = 0u64;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("206", n)) => got += n.trim().parse::<u64>().unwrap_or(0),
                _ => bail!("fetch-only client {i}: a frame request answered {line:?}"),
            }
        }
        if !out.status.success() || got != expected {
            bail!(
                "fetch-only client {i}: got {got} of {expected} bytes ({})",
                out.status
            );
        }
        fetched += got;
    }
    Ok(FetchRun {
        took,
        fetched,
        cpu: server.cpu_with_children()?.saturating_sub(cpu_before),
        machine_busy: machine_cpu()?.busy_since(&machine_before),
    })
}

fn start_nginx(app: &Host, work: &Path, store: &Path) -> Result<Daemon> {
    let mut cmd = app.cmd("nginx");
    crate::nginx::configure(
        &mut cmd,
        &work.join("nginx"),
        &format!("{SERVER_IP}:{NGINX_PORT}"),
        store,
        4096,
    )?;
    let mut daemon = Daemon::start(&mut cmd, &work.join("nginx.log"))?;
    app.wait_listening(NGINX_PORT, false, 15, &mut daemon)?;
    Ok(daemon)
}

/// The resident high-water mark of a server (and its worker processes), in bytes.
fn peak_rss(daemon: &Daemon) -> Result<u64> {
    let hwm = |pid: u32| -> u64 {
        fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024
    };
    let me = daemon.pid();
    let total = hwm(me)
        + fleetboot_lab::children_of(me)
            .into_iter()
            .map(hwm)
            .sum::<u64>();
    Ok(total)
}

fn utilisation(run: &FleetRun, options: &Options) -> f64 {
    link_share(run.fetched, run.took, options)
}

/// The agents' CPU time ÷ what this machine's cores give in the time the link needs for their
/// data: above 1, no server can bring the agents to the link rate here, since the simulated
/// machines share these cores (a rack's machines each have their own).
fn cpu_demand(run: &FleetRun, options: &Options) -> f64 {
    let core_seconds = cores() as f64 * link_seconds(run.fetched, options);
    run.agents_cpu.as_secs_f64() / core_seconds.max(f64::MIN_POSITIVE)
}

/// `bytes` in `took` as a share of the link rate.
fn link_share(bytes: u64, took: Duration, options: &Options) -> f64 {
    link_seconds(bytes, options) / took.as_secs_f64()
}

/// The time `bytes` take at the link rate.
fn link_seconds(bytes: u64, options: &Options) -> f64 {
    bytes as f64 * 8.0 / (options.rate_mbit as f64 * 1e6)
}

/// This machine's cores, which the agents, the server and the kernel share.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn report(runs: &[FleetRun], options: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Fleet benchmark: agents installing at once (`cargo xtask bench fleet`)\n\n\
         Image B (2 GiB ext4, Debian) to sparse files; every link {} Mbit/s (tbf), the server's \
         too. Utilisation: the range data the agents fetched ÷ (link rate × time until the last \
         agent is done). Server CPU and peak memory: fleetboot serve, or nginx (master and \
         workers) serving the store folder through `store_url`. Every agent verified its file; \
         the first and last were compared byte for byte with B. Machine CPU busy: the share of \
         this machine's CPU time (all {} cores) not idle during the run: agents, server and \
         kernel together. The agents' sparse files are on this machine's disk. Agents' CPU: \
         their user and system time, all together; CPU demand: that ÷ (the cores × the time \
         the link needs for their data). Above 1, the agents cannot reach the link rate on this \
         machine whichever server they fetch from.\n",
        options.rate_mbit,
        cores(),
    );
    let _ = writeln!(
        s,
        "| agents | server | first in its pair | all done (s) | data fetched (GB) | link utilisation | server CPU (s) | server peak memory (MB) | agents' CPU (s) | CPU demand | machine CPU busy |"
    );
    let _ = writeln!(s, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.1} | {} | {:.1} | {:.2} | {:.2} |",
            r.agents,
            r.server,
            if r.first { "yes" } else { "" },
            r.took.as_secs_f64(),
            r.fetched as f64 / 1e9,
            utilisation(r, options),
            r.cpu.as_secs_f64(),
            r.peak_rss / 1_000_000,
            r.agents_cpu.as_secs_f64(),
            cpu_demand(r, options),
            r.machine_busy
        );
    }
    let _ = writeln!(
        s,
        "\nFetch only: in the same network, N curl clients ask for the same frames as the agents \
         (Range requests, two at a time per client) and discard them; nothing is decompressed, \
         hashed or written. What the server does for a rack whose machines each have their own \
         CPU.\n"
    );
    let _ = writeln!(
        s,
        "| clients | server | all done (s) | data fetched (GB) | link utilisation | server CPU (s) | machine CPU busy |"
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|");
    for r in runs {
        let f = &r.fetch;
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} |",
            r.agents,
            r.server,
            f.took.as_secs_f64(),
            f.fetched as f64 / 1e9,
            link_share(f.fetched, f.took, options),
            f.cpu.as_secs_f64(),
            f.machine_busy
        );
    }
    let _ = writeln!(
        s,
        "\nfleetboot's time ÷ nginx's, pair by pair (below 1: fleetboot was faster):\n"
    );
    let _ = writeln!(s, "| agents | agents installing | fetch-only clients |");
    let _ = writeln!(s, "|---:|---|---|");
    for &n in &options.agents {
        let ratios = |took: &dyn Fn(&FleetRun) -> Duration| -> String {
            runs.chunks(2)
                .filter(|pair| pair.len() == 2 && pair[0].agents == n)
                .filter_map(|pair| {
                    let fb = pair.iter().find(|r| r.server == "fleetboot")?;
                    let ng = pair.iter().find(|r| r.server == "nginx")?;
                    Some(format!(
                        "{:.2}",
                        took(fb).as_secs_f64() / took(ng).as_secs_f64()
                    ))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "| {n} | {} | {} |",
            ratios(&|r| r.took),
            ratios(&|r| r.fetch.took)
        );
    }
    s
}

/// The machine's CPU time from /proc/stat, in ticks: all, and idle (waiting for I/O included).
struct MachineCpu {
    total: u64,
    idle: u64,
}

impl MachineCpu {
    fn busy_since(&self, before: &MachineCpu) -> f64 {
        let total = self.total.saturating_sub(before.total).max(1);
        let idle = self.idle.saturating_sub(before.idle);
        1.0 - idle as f64 / total as f64
    }
}

fn machine_cpu() -> Result<MachineCpu> {
    let stat = fs::read_to_string("/proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    if ticks.len() < 5 {
        bail!("/proc/stat's cpu line has {} fields", ticks.len());
    }
    // user nice system idle iowait irq softirq steal (guest time is counted in user already).
    Ok(MachineCpu {
        total: ticks.iter().take(8).sum(),
        idle: ticks[3] + ticks[4],
    })
}
