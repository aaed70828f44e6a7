//! HTTP: range reads with wrk from fleetboot and nginx.

use super::*;

/// One HTTP server's wrk run.
pub(super) struct HttpRun {
    pub(super) server: String,
    pub(super) requests_per_s: f64,
    /// Bytes per second, as wrk reports them.
    pub(super) bytes_per_s: f64,
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
pub(super) fn check_range(
    net: &Net,
    url: &str,
    expected: &[u8],
    work: &Path,
    server: &str,
) -> Result<()> {
    let out = work.join("range.out");
    remove_if_present(&out)?;
    let mut cmd = net.cli("curl");
    // The token wrk sends too: the store is served to token holders (nginx ignores it).
    cmd.args(["-sS", "--max-time", "10", "-w", "%{http_code}", "-r"])
        .arg(format!("{}-{}", RANGE.0, RANGE.1))
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
            RANGE.0,
            RANGE.1,
            got.len()
        );
    }
    remove_if_present(&out)
}

/// `options.repeat` wrk runs against one server; the best is kept.
pub(super) fn best_wrk(net: &Net, url: &str, options: &Options, server: &str) -> Result<HttpRun> {
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
pub(super) const BENCH_TOKEN: &str = "bench-token";

pub(super) fn wrk(net: &Net, url: &str, options: &Options, server: &str) -> Result<HttpRun> {
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
