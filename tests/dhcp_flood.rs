//! The DHCP server under a flood, with real processes on a namespaced network: ISC's `perfdhcp`
//! (Debian's kea-admin) sends at twice the DORA rate the server was just measured at, for 60 s,
//! from 10,000 random MACs of which half are known hosts and half are not. The server must stay
//! up, keep answering known hosts, keep its memory bounded (the peak is reported), and a real
//! client (busybox udhcpc) must get a lease within 2 s once the flood stops.
//!
//! perfdhcp runs single-threaded (its threads would otherwise take the server's cores) and acts as
//! a relay agent in the server's subnet (docs/benchmark-method.md).

use fleetboot_lab::{can_run, Host, Lab};
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const MACS: usize = 10_000;
const FLOOD: Duration = Duration::from_secs(60);
const CLIENT_MAC: &str = "52:54:00:f1:00:01";
const SERVER_IP: &str = "10.79.0.1";
/// What the server's resident memory may reach, peak, in this test (a debug build): the leases
/// of 5,000 hosts and the bounded caches are a few MB (about 20 MB in all, measured); a leak of
/// 200 bytes for each of the flood's packets (a million or more) would exceed it.
const PEAK_RSS_MAX_KB: u64 = 256 * 1024;

fn have_perfdhcp() -> bool {
    let found = Command::new("perfdhcp").arg("-v").output().is_ok();
    if !found {
        eprintln!(
            "SKIP: perfdhcp is missing (Debian package kea-admin; `cargo xtask setup` installs it)"
        );
    }
    found
}

/// Deterministic pseudo-random MACs (xorshift), locally administered, unicast.
fn macs(count: usize, mut x: u64) -> Vec<String> {
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                (b[0] & 0xfc) | 0x02,
                b[1],
                b[2],
                b[3],
                b[4],
                b[5]
            )
        })
        .collect()
}

/// Runs perfdhcp from `host` against the server for `seconds` at `rate` exchanges/s.
fn perfdhcp(host: &Host, macs: &Path, rate: u64, seconds: u64, clients: usize) -> (f64, String) {
    let out: Output = host
        .cmd("perfdhcp")
        .args(["-4", "-g", "single", "-l", &host.ifname])
        .args(["-r", &rate.to_string(), "-p", &seconds.to_string()])
        .args(["-R", &clients.to_string(), "-M"])
        .arg(macs)
        // Sent to the server by unicast: with no server named perfdhcp broadcasts every frame,
        // and the bridge floods them to the real client's link too, where busybox udhcpc (its
        // raw socket has no filter) drowns in them and misses the server's answers.
        .arg(SERVER_IP)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // perfdhcp exits 3 when packets were dropped: a result, not a failure.
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "perfdhcp failed ({}):\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Rate:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no `Rate:` in perfdhcp's output:\n{text}"));
    (rate, text)
}

/// `(received, sent)` of an exchange in perfdhcp's statistics (0 = DISCOVER-OFFER,
/// 1 = REQUEST-ACK).
fn received(text: &str, exchange: usize) -> u64 {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("received packets:"))
        .filter_map(|n| n.trim().parse().ok())
        .nth(exchange)
        .unwrap_or(0)
}

/// (current, peak) resident memory of a process, in KiB.
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One DHCP exchange by busybox udhcpc, bounded by its own timers: 2 DISCOVERs 1 s apart, then
/// it gives up (`-n`). Returns whether it got a lease, and how long it took.
fn udhcpc(host: &Host) -> (bool, Duration) {
    let started = Instant::now();
    let ok = host
        .cmd("busybox")
        .args(["udhcpc", "-i", &host.ifname, "-f", "-q", "-n"])
        .args(["-t", "2", "-T", "1", "-A", "1", "-s", "/bin/true"])
        .output()
        .unwrap()
        .status
        .success();
    (ok, started.elapsed())
}

#[test]
fn a_dhcp_flood_of_known_and_unknown_macs_leaves_the_server_answering() {
    if !can_run() || !have_perfdhcp() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let all = macs(MACS, 0x5eed_f100d);
    let (known, _unknown) = all.split_at(MACS / 2);
    let mut hosts = format!("  \"{CLIENT_MAC}\": {{}}\n");
    for mac in known {
        writeln!(hosts, "  \"{mac}\": {{}}").unwrap();
    }
    std::fs::create_dir_all(dir.path().join("boot")).unwrap();
    let config = dir.path().join("fleetboot.yaml");
    std::fs::write(
        &config,
        format!(
            "interface: eth0\nhttp_port: 8080\nboot_dir: boot\nstore: store\nstate_dir: state\n\
             unknown_hosts: ignore\n\
             dhcp: {{ mode: full, range: [10.79.1.1, 10.79.200.254] }}\nhosts:\n{hosts}"
        ),
    )
    .unwrap();
    let known_list = dir.path().join("known.txt");
    std::fs::write(&known_list, known.join("\n") + "\n").unwrap();
    let all_list = dir.path().join("all.txt");
    std::fs::write(&all_list, all.join("\n") + "\n").unwrap();

    let mut lab = Lab::new("flood").expect("a network lab");
    let server = lab
        .host(
            "dsrv",
            "52:54:00:f1:00:fe",
            Some(&format!("{SERVER_IP}/16")),
        )
        .expect("a lab host");
    let perf = lab
        .host("dperf", "52:54:00:f1:00:fd", Some("10.79.0.2/16"))
        .expect("a lab host");
    let client = lab.host("dcli", CLIENT_MAC, None).expect("a lab host");
    let mut daemon = server
        .spawn(
            env!("CARGO_BIN_EXE_fleetboot"),
            &["serve", "--config", config.to_str().unwrap()],
            &dir.path().join("serve.log"),
        )
        .expect("a daemon in the lab");
    daemon.wait_for("serving DHCP", 20).unwrap();
    let pid = daemon.pid();

    // The rate this server reaches here and now, known hosts only.
    let (measured, text) = perfdhcp(&perf, &known_list, 40_000, 5, known.len());
    assert!(measured > 0.0, "no exchange completed:\n{text}");
    let flood_rate = (measured * 2.0).ceil() as u64;

    // The flood, with the server's memory sampled and a real client halfway through.
    let sampler_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = sampler_stop.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push(rss_kb(pid).0);
                std::thread::sleep(Duration::from_millis(500));
            }
            samples
        })
    };
    let flood = {
        let (perf, all_list) = (perf.clone(), all_list.clone());
        std::thread::spawn(move || perfdhcp(&perf, &all_list, flood_rate, FLOOD.as_secs(), MACS))
    };
    std::thread::sleep(FLOOD / 2);
    // Mid-flood, a known host asks like any DHCP client, retrying as clients do.
    let mid = (1..=5).find_map(|attempt| {
        let (ok, took) = udhcpc(&client);
        ok.then_some((attempt, took))
    });
    let (flood_rate_done, flood_text) = flood.join().unwrap();
    sampler_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.join().unwrap();

    assert!(
        daemon.alive(),
        "the server survived the flood:\n{}",
        daemon.log_text()
    );
    let acks = received(&flood_text, 1);
    assert!(
        acks > 0,
        "known hosts got leases during the flood:\n{flood_text}"
    );
    let Some((mid_attempt, mid_took)) = mid else {
        panic!("a real client got a lease during the flood (5 tries of 2 DISCOVERs)");
    };
    let (after_ok, after_took) = udhcpc(&client);
    assert!(
        after_ok,
        "a real client got a lease within its 2 s (2 DISCOVERs, 1 s apart) after the flood"
    );
    let (rss, peak) = rss_kb(pid);
    let first = samples.first().copied().unwrap_or(0);
    eprintln!(
        "DHCP flood: measured {measured:.0} DORA/s; flood at {flood_rate}/s for {FLOOD:?} from \
         {MACS} MACs (half unknown): {flood_rate_done:.0} DORA/s completed, {acks} ACKs; \
         server RSS {first} KiB at the start, {rss} KiB after, peak {peak} KiB; \
         client lease during it at try {mid_attempt} in {mid_took:?}, after it in {after_took:?}"
    );
    assert!(
        peak <= PEAK_RSS_MAX_KB,
        "server memory peaked at {peak} KiB (samples: {samples:?})"
    );
    assert!(
        !daemon.log_text().contains("panicked"),
        "{}",
        daemon.log_text()
    );
}
