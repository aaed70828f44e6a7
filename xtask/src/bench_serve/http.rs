//! HTTP: range reads of a store pack with wrk, fleetboot and nginx (sendfile on) side by side,
//! for 1 MiB ranges (what agents fetch) and 64 KiB ranges (per-request overhead), in rounds,
//! with each server's CPU time per GB served. A second, identical nginx (the twin) runs in the
//! same turns as a control: twin ÷ nginx is the spread this machine gives two equal servers, the
//! yardstick for reading fleetboot ÷ nginx.

use super::*;

/// The ranges read, as `first-last` of the pack: 1 MiB and 64 KiB.
pub(super) const HTTP_RANGES: [(u64, u64); 2] = [
    (1 << 20, (2 << 20) - 1),
    (1 << 20, (1 << 20) + (64 << 10) - 1),
];
/// nginx listens here, its twin (the control) on TWIN_PORT, fleetboot on HTTP_PORT; all three
/// run through every round.
const NGINX_PORT: u16 = 8081;
const TWIN_PORT: u16 = 8082;
/// The control's name in runs and reports.
const TWIN: &str = "nginx twin";

/// One server's best wrk run for one range size in one round.
pub(super) struct HttpRun {
    pub(super) server: String,
    pub(super) round: usize,
    pub(super) range_bytes: u64,
    pub(super) requests_per_s: f64,
    /// Bytes per second, as wrk reports them.
    pub(super) bytes_per_s: f64,
    /// The server's CPU time (all its processes) per GB of range data served in that run.
    pub(super) cpu_s_per_gb: f64,
    /// wrk's `Socket errors:` line, if any.
    pub(super) errors: Option<String>,
}

pub(super) fn bench_http(
    net: &Net,
    fleetboot: &Path,
    files: &Files,
    options: &Options,
) -> Result<Vec<HttpRun>> {
    let work = &files.work;
    let pack = fs::read(files.store.join(&files.pack))?;
    let fleetboot_daemon = net.start(
        net.srv(fleetboot)
            .arg("serve")
            .arg("--config")
            .arg(&files.files_config),
        &work.join("fleetboot-http.log"),
        false,
        HTTP_PORT,
    )?;
    let nginx_daemon = start_nginx(net, files, "nginx", NGINX_PORT)?;
    let twin_daemon = start_nginx(net, files, "nginx-twin", TWIN_PORT)?;
    let servers = [
        ("fleetboot", &fleetboot_daemon, HTTP_PORT),
        ("nginx", &nginx_daemon, NGINX_PORT),
        (TWIN, &twin_daemon, TWIN_PORT),
    ];
    for (name, _, port) in servers {
        for range in HTTP_RANGES {
            let url = format!("http://{SRV_IP}:{port}/store/{}", files.pack);
            let expected = &pack[range.0 as usize..=range.1 as usize];
            check_range(net, &url, range, expected, work, name)?;
        }
    }
    let mut runs = Vec::new();
    for round in 1..=options.rounds {
        // Each round another server goes first, so that none always runs on a machine just
        // warmed (or tired) by another.
        let mut order = servers;
        order.rotate_left((round - 1) % servers.len());
        for range in HTTP_RANGES {
            // The servers take turns (A B C A B C A B C), so a passing disturbance of the
            // machine touches all alike; each keeps its best.
            let mut best: Vec<Option<HttpRun>> = order.iter().map(|_| None).collect();
            for _ in 0..options.repeat {
                for (i, (name, daemon, port)) in order.iter().enumerate() {
                    let url = format!("http://{SRV_IP}:{port}/store/{}", files.pack);
                    let run = daemon
                        .explain(undisturbed(|| wrk(net, &url, range, daemon, options, name)))?;
                    if best[i]
                        .as_ref()
                        .is_none_or(|b| run.requests_per_s > b.requests_per_s)
                    {
                        best[i] = Some(run);
                    }
                }
            }
            runs.extend(
                best.into_iter()
                    .flatten()
                    .map(|run| HttpRun { round, ..run }),
            );
        }
    }
    fleetboot_daemon.stop()?;
    nginx_daemon.stop()?;
    twin_daemon.stop()?;
    Ok(runs)
}

/// An nginx on `port` with its own folder `work/NAME` and log `work/NAME.log`.
fn start_nginx(net: &Net, files: &Files, name: &str, port: u16) -> Result<Daemon> {
    let nginx_dir = files.work.join(name);
    fresh_dir(&nginx_dir)?;
    let mut cmd = net.srv("nginx");
    crate::nginx::configure(
        &mut cmd,
        &nginx_dir,
        &format!("{SRV_IP}:{port}"),
        &files.store,
        1024,
    )?;
    net.start(
        &mut cmd,
        &files.work.join(format!("{name}.log")),
        false,
        port,
    )
}

/// Fetches the range once with curl and checks the status (206) and the bytes.
pub(super) fn check_range(
    net: &Net,
    url: &str,
    range: (u64, u64),
    expected: &[u8],
    work: &Path,
    server: &str,
) -> Result<()> {
    let out = work.join("range.out");
    remove_if_present(&out)?;
    let mut cmd = net.cli("curl");
    // The token wrk sends too: the store is served to token holders (nginx ignores it).
    cmd.args(["-sS", "--max-time", "10", "-w", "%{http_code}", "-r"])
        .arg(format!("{}-{}", range.0, range.1))
        .args(["-H", &format!("Authorization: Bearer {BENCH_TOKEN}")])
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
            range.0,
            range.1,
            got.len()
        );
    }
    remove_if_present(&out)
}

/// The admin token of the benchmark's appliance.
pub(super) const BENCH_TOKEN: &str = "bench-token";

fn wrk(
    net: &Net,
    url: &str,
    range: (u64, u64),
    daemon: &Daemon,
    options: &Options,
    server: &str,
) -> Result<HttpRun> {
    let range_bytes = range.1 - range.0 + 1;
    eprintln!("bench: HTTP: {server}, {} KiB ranges", range_bytes >> 10);
    let seconds = options.wrk_duration();
    let mut cmd = net.cli("wrk");
    // The store is served to token holders: every request carries one (nginx ignores it), so
    // fleetboot's check is part of what is measured.
    cmd.args(["-c", "50", "-t", "2", "-d", seconds, "-H"])
        .arg(format!("Range: bytes={}-{}", range.0, range.1))
        .arg("-H")
        .arg(format!("Authorization: Bearer {BENCH_TOKEN}"))
        .arg(url);
    wait_until_idle()?;
    eprintln!("$ {}", show(&cmd));
    let cpu_before = daemon.cpu_with_children()?;
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    let cpu = daemon.cpu_with_children()?.saturating_sub(cpu_before);
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
    // `N requests in 5.00s, …`: the range data served is N × the range.
    let requests: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    let gb = requests * range_bytes as f64 / 1e9;
    let errors = text
        .lines()
        .find(|l| l.contains("Socket errors"))
        .map(|l| l.trim().to_string());
    eprintln!(
        "bench: {server}: {requests_per_s:.0} requests/s, {:.0} MB/s, {:.2} CPU s/GB",
        bytes_per_s / 1e6,
        cpu.as_secs_f64() / gb.max(1e-9)
    );
    Ok(HttpRun {
        server: server.to_string(),
        round: 0,
        range_bytes,
        requests_per_s,
        bytes_per_s,
        cpu_s_per_gb: cpu.as_secs_f64() / gb.max(1e-9),
        errors,
    })
}

/// wrk's `2.41GB` and the like, in bytes (wrk's units are powers of 1024).
pub(super) fn wrk_bytes(text: &str) -> Option<f64> {
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

/// `server`'s ratio to nginx (requests/s) for one range size, in each round.
pub(super) fn ratios(runs: &[HttpRun], server: &str, range_bytes: u64) -> Vec<f64> {
    let of = |server: &str, round: usize| {
        runs.iter()
            .find(|r| r.server == server && r.round == round && r.range_bytes == range_bytes)
            .map(|r| r.requests_per_s)
    };
    let rounds = runs.iter().map(|r| r.round).max().unwrap_or(0);
    (1..=rounds)
        .filter_map(|round| Some(of(server, round)? / of("nginx", round)?))
        .collect()
}

/// The HTTP section of the report; returns its targets (name, met, have, bound).
pub(super) fn http_report(
    s: &mut String,
    options: &Options,
    runs: &[HttpRun],
) -> Result<Vec<(String, bool, String, String)>> {
    writeln!(s, "### HTTP")?;
    writeln!(s)?;
    writeln!(
        s,
        "`wrk -c 50 -t 2 -d {} -H \"Range: bytes=…\"` on a store pack file \
         (`/store/packs/ID.pack`, {} MiB of incompressible data), 1 MiB and 64 KiB ranges; nginx \
         (sendfile on, tcp_nopush on) serves the same store folder, and so does a second, identical \
         nginx (the twin), the control: twin ÷ nginx is what two equal servers measure against each \
         other here. All three servers run through the whole benchmark; each figure is the best of \
         {} wrk runs, the servers taking turns; {} rounds in a row, another server going first in \
         each round. CPU: the server's CPU time (nginx: master and workers) per GB of range data \
         served. MB = 10^6 bytes.",
        options.wrk_duration(),
        PACK_SOURCE_BYTES >> 20,
        options.repeat,
        options.rounds,
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "| round | range | fleetboot req/s | nginx req/s | fleetboot ÷ nginx | twin ÷ nginx | fleetboot MB/s | fleetboot CPU s/GB | nginx CPU s/GB |"
    )?;
    writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for round in 1..=options.rounds {
        for range in HTTP_RANGES {
            let bytes = range.1 - range.0 + 1;
            let find = |server: &str| {
                runs.iter()
                    .find(|r| r.server == server && r.round == round && r.range_bytes == bytes)
            };
            let (Some(f), Some(n)) = (find("fleetboot"), find("nginx")) else {
                continue;
            };
            let twin = find(TWIN).map_or("–".to_string(), |t| {
                format!("{:.2}", t.requests_per_s / n.requests_per_s)
            });
            writeln!(
                s,
                "| {round} | {} KiB | {:.0} | {:.0} | {:.2} | {twin} | {:.0} | {:.3} | {:.3} |",
                bytes >> 10,
                f.requests_per_s,
                n.requests_per_s,
                f.requests_per_s / n.requests_per_s,
                f.bytes_per_s / 1e6,
                f.cpu_s_per_gb,
                n.cpu_s_per_gb,
            )?;
        }
    }
    for run in runs {
        if let Some(errors) = &run.errors {
            writeln!(s)?;
            writeln!(
                s,
                "wrk against {} (round {}, {} KiB): {errors}",
                run.server,
                run.round,
                run.range_bytes >> 10
            )?;
        }
    }
    writeln!(s)?;
    let spread = |r: &[f64]| {
        r.iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
    };
    let mut targets = Vec::new();
    for (range, bound) in [(HTTP_RANGES[0], 1.0), (HTTP_RANGES[1], 0.9)] {
        let bytes = range.1 - range.0 + 1;
        let r = ratios(runs, "fleetboot", bytes);
        let (lo, hi) = spread(&r);
        let met = r.iter().filter(|&&x| x >= bound).count();
        let (twin_lo, twin_hi) = spread(&ratios(runs, TWIN, bytes));
        writeln!(
            s,
            "{} KiB ranges over {} rounds: fleetboot ÷ nginx {:.2} – {:.2} ({} of {} rounds ≥ {bound}); \
             the control, twin ÷ nginx: {twin_lo:.2} – {twin_hi:.2}.",
            bytes >> 10,
            r.len(),
            lo,
            hi,
            met,
            r.len()
        )?;
        targets.push((
            format!(
                "HTTP {} KiB ranges ≥ {bound} × nginx, every round",
                bytes >> 10
            ),
            !r.is_empty() && met == r.len(),
            format!("{lo:.2} – {hi:.2}"),
            format!("{bound:.2}"),
        ));
    }
    writeln!(s)?;
    Ok(targets)
}
