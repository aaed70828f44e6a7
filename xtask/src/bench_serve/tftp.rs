//! TFTP: timed downloads from fleetboot, tftpd-hpa and atftpd.

use super::*;

/// One TFTP server's best download times.
pub(super) struct TftpRun {
    pub(super) server: String,
    /// `curl --tftp-blksize 1468`.
    pub(super) curl: Duration,
    /// `atftp --option "blksize 1468" --option "windowsize 16"`.
    pub(super) atftp: Duration,
    pub(super) reference: &'static str,
}

pub(super) fn bench_tftp(
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
pub(super) fn tftp_downloads(
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
pub(super) fn timed_download(
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

pub(super) fn best_time(
    runs: usize,
    mut once: impl FnMut() -> Result<Duration>,
) -> Result<Duration> {
    let mut best = undisturbed(&mut once)?;
    for _ in 1..runs {
        best = best.min(undisturbed(&mut once)?);
    }
    Ok(best)
}
