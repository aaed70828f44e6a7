//! `cargo xtask bench deploy`: the agent against the usual ways of writing an image, on the
//! store benchmark's Debian images A and B (2 GiB ext4 each), over loopback HTTP:
//!
//! - full deploy of B to a fresh file: `fleetboot-agent deploy` vs `curl URL | zstd -d | dd` of
//!   B's `.zst` (what image2disk-style tools do) vs `casync extract`;
//! - delta deploy of B onto a file holding A: the agent vs `casync extract --seed=A.img`.
//!
//! Every result is compared byte for byte with B. Times include syncing the output.

use crate::bench_store::{check_identical, fresh_dir, mb, secs, settle, timed, warm};
use crate::os_images;
use crate::util::root;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:be:9c:01";
const PORT: u16 = 18_730;
/// Runs of each measurement; the best is kept (a 2-core machine jitters by ±20 %).
const RUNS: usize = 3;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(dir: &Path, image: &str) -> Result<()> {
    let yaml = format!(
        "interface: lo\naddress: 127.0.0.1\nhttp_port: {PORT}\nboot_dir: boot\nstore: store\nstate_dir: state\n\
         dhcp: {{ mode: off }}\ntftp: {{ port: {} }}\nhosts:\n  \"{MAC}\": {{ image: {image} }}\n",
        PORT + 1
    );
    fs::write(dir.join("fleetboot.yaml"), yaml)?;
    Ok(())
}

/// Waits until the appliance answers, or fails.
fn wait_http(url: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", url])
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the appliance did not answer at {url}")
}

/// Runs the agent; returns (time, bytes fetched, bytes reused).
fn agent(bin: &Path, target: &Path) -> Result<(Duration, u64, u64)> {
    let (out, took) = timed(
        Command::new(bin)
            .args([
                "deploy",
                "--server",
                &format!("http://127.0.0.1:{PORT}"),
                "--mac",
                MAC,
                "--target",
            ])
            .arg(target),
    )?;
    let (fetched, reused) = crate::util::install_figures(&out)?;
    Ok((took, fetched, reused))
}

fn sh(script: &str) -> Result<Duration> {
    let (_, took) = timed(Command::new("bash").args(["-o", "pipefail", "-c", script]))?;
    Ok(took)
}

pub fn run(_args: &[&str]) -> Result<()> {
    crate::setup::apt_install(crate::setup::BENCH_PACKAGES)?;
    let base = root().join("target/bench/store");
    let images = os_images::build(&base)?;
    let (a, b) = (&images[0], &images[1]);
    let fleetboot = crate::util::build_release(&["fleetboot", "fleetboot-agent"])?;
    let agent_bin = root().join("target/release/fleetboot-agent");

    let dir = root().join("target/bench/deploy");
    fresh_dir(&dir)?;
    fs::create_dir_all(dir.join("boot"))?;
    let store = dir.join("store");
    for (name, img) in [("a", &a.image), ("b", &b.image)] {
        crate::util::run(
            Command::new(&fleetboot)
                .arg("--store")
                .arg(&store)
                .args(["image", "import", name])
                .arg(img),
        )?;
    }
    // The anchors' inputs: B as .zst served by the same appliance, a casync store of A and B.
    let zst = dir.join("boot/b.img.zst");
    crate::util::run(
        Command::new("zstd")
            .args(["-q", "-T0", "-3"])
            .arg(&b.image)
            .arg("-o")
            .arg(&zst),
    )?;
    let castore = dir.join("casync");
    for (name, img) in [("a", &a.image), ("b", &b.image)] {
        crate::util::run(
            Command::new("casync")
                .arg("make")
                .arg(format!("--store={}", castore.display()))
                .arg(dir.join(format!("{name}.caibx")))
                .arg(img),
        )?;
    }
    for img in [&a.image, &b.image] {
        warm(img)?;
    }

    config(&dir, "b")?;
    let log = fs::File::create(dir.join("serve.log"))?;
    let _server = Server(
        Command::new(&fleetboot)
            .current_dir(&dir)
            .args(["serve", "--config", "fleetboot.yaml"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start fleetboot serve")?,
    );
    let url = format!("http://127.0.0.1:{PORT}");
    wait_http(&format!("{url}/metrics"))?;
    let out = dir.join("out.img");

    // Full deploy of B, best of RUNS each.
    let reimage = || -> Result<()> {
        crate::util::run(Command::new(&fleetboot).current_dir(&dir).args([
            "reimage",
            "--config",
            "fleetboot.yaml",
            MAC,
        ]))
    };
    let (mut agent_full, mut agent_full_fetched) = (Duration::MAX, 0);
    for i in 0..RUNS {
        let _ = fs::remove_file(&out);
        if i > 0 {
            reimage()?;
        }
        settle()?;
        let (t, fetched, _) = agent(&agent_bin, &out)?;
        check_identical(&b.image, &out, "fleetboot-agent")?;
        if t < agent_full {
            (agent_full, agent_full_fetched) = (t, fetched);
        }
    }
    let mut curl_full = Duration::MAX;
    for _ in 0..RUNS {
        let _ = fs::remove_file(&out);
        settle()?;
        curl_full = curl_full.min(sh(&format!(
            "curl -sf {url}/boot/b.img.zst | zstd -q -d | dd of={} bs=4M conv=fsync status=none",
            out.display()
        ))?);
        check_identical(&b.image, &out, "curl | zstd -d | dd")?;
    }
    let mut casync_full = Duration::MAX;
    for _ in 0..RUNS {
        let _ = fs::remove_file(&out);
        settle()?;
        casync_full = casync_full.min(sh(&format!(
            "casync extract --store={} {} {} && sync",
            castore.display(),
            dir.join("b.caibx").display(),
            out.display()
        ))?);
        check_identical(&b.image, &out, "casync extract")?;
    }

    // Delta: the target holds A (installed by the agent, so the appliance knows it), then B.
    let (mut agent_delta, mut delta_fetched, mut delta_reused) = (Duration::MAX, 0, 0);
    let _ = fs::remove_file(&out);
    for _ in 0..RUNS {
        config(&dir, "a")?;
        reload(&_server)?;
        agent(&agent_bin, &out)?;
        check_identical(&a.image, &out, "fleetboot-agent (A)")?;
        config(&dir, "b")?;
        reload(&_server)?;
        settle()?;
        let (t, fetched, reused) = agent(&agent_bin, &out)?;
        check_identical(&b.image, &out, "fleetboot-agent (A -> B)")?;
        if t < agent_delta {
            (agent_delta, delta_fetched, delta_reused) = (t, fetched, reused);
        }
    }
    // casync writes a new file, taking what it can from the seed.
    let mut casync_delta = Duration::MAX;
    for _ in 0..RUNS {
        let _ = fs::remove_file(&out);
        settle()?;
        casync_delta = casync_delta.min(sh(&format!(
            "casync extract --store={} --seed={} {} {} && sync",
            castore.display(),
            a.image.display(),
            dir.join("b.caibx").display(),
            out.display()
        ))?);
        check_identical(&b.image, &out, "casync extract --seed")?;
    }
    fs::remove_file(&out)?;

    let mut s = String::new();
    writeln!(
        s,
        "## Deploy benchmark: image B (2 GiB ext4, Debian) over loopback HTTP\n"
    )?;
    writeln!(s, "Times include syncing the target; best of {RUNS} runs; every result compared byte for byte with B. MB = 10^6 bytes.\n")?;
    writeln!(
        s,
        "| full deploy of B | time (s) | fetched (MB) | fleetboot-agent is faster by |"
    )?;
    writeln!(s, "|---|---:|---:|---:|")?;
    writeln!(
        s,
        "| fleetboot-agent | {} | {} | |",
        secs(agent_full),
        mb(agent_full_fetched)
    )?;
    let ratio = |t: Duration, f: Duration| format!("{:.2} ×", t.as_secs_f64() / f.as_secs_f64());
    writeln!(
        s,
        "| curl \\| zstd -d \\| dd | {} | {} | {} |",
        secs(curl_full),
        mb(fs::metadata(&zst)?.len()),
        ratio(curl_full, agent_full)
    )?;
    writeln!(
        s,
        "| casync extract | {} | | {} |",
        secs(casync_full),
        ratio(casync_full, agent_full)
    )?;
    writeln!(
        s,
        "\n| delta deploy of B onto A | time (s) | fetched (MB) | reused from the disk (MB) |"
    )?;
    writeln!(s, "|---|---:|---:|---:|")?;
    writeln!(
        s,
        "| fleetboot-agent | {} | {} | {} |",
        secs(agent_delta),
        mb(delta_fetched),
        mb(delta_reused)
    )?;
    writeln!(
        s,
        "| casync extract --seed=A | {} | | |",
        secs(casync_delta)
    )?;
    let pass = |ok: bool| if ok { "PASS" } else { "MISS" };
    writeln!(
        s,
        "\n| target | fleetboot | bound | result |\n|---|---:|---:|---|"
    )?;
    writeln!(
        s,
        "| full deploy ≥ 2 × faster than curl \\| zstd \\| dd | {} s | {:.2} s | {} |",
        secs(agent_full),
        curl_full.as_secs_f64() / 2.0,
        pass(agent_full * 2 <= curl_full)
    )?;
    writeln!(
        s,
        "| delta ≤ 0.25 × casync --seed | {} s | {:.2} s | {} |",
        secs(agent_delta),
        casync_delta.as_secs_f64() / 4.0,
        pass(agent_delta * 4 <= casync_delta)
    )?;
    writeln!(
        s,
        "| delta fetches ≤ 30 MB | {} MB | 30 MB | {} |",
        mb(delta_fetched),
        pass(delta_fetched <= 30_000_000)
    )?;
    println!("\n{s}");
    fs::write(dir.join("results.md"), &s)?;
    eprintln!("bench: wrote {}", dir.join("results.md").display());
    Ok(())
}

/// Makes the appliance take the new configuration now (it also polls the file each second).
fn reload(server: &Server) -> Result<()> {
    crate::util::run(Command::new("kill").args(["-HUP", &server.0.id().to_string()]))?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}
