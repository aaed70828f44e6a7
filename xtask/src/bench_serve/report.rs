//! The report: a table per service with fleetboot's ratio to each server, and the targets with PASS or MISS.

use super::*;

pub(super) fn report(
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

    let mut targets: Vec<(String, bool, String, String)> = Vec::new();
    if let Some(fleetboot_dhcp) = dhcp.first() {
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
        let kea = dhcp
            .iter()
            .find(|r| std::ptr::eq(r.server, &KEA))
            .context("no kea-dhcp4 run")?;
        let persisted = fleetboot_dhcp.leases_on_disk.unwrap_or(0) > 0;
        targets.push((
            "DHCP ≥ kea-dhcp4, leases persisted".into(),
            fleetboot_dhcp.rate >= kea.rate && persisted,
            format!(
                "{:.0}/s{}",
                fleetboot_dhcp.rate,
                if persisted { "" } else { ", no lease on disk" }
            ),
            format!("{:.0}/s", kea.rate),
        ));
    }

    if let Some(fleetboot_tftp) = tftp.first() {
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
        let tftpd = tftp
            .iter()
            .find(|r| r.server == "tftpd-hpa")
            .context("no tftpd-hpa run")?;
        let window_bound = tftpd.atftp.div_f64(1.5);
        targets.push((
            "TFTP ≥ tftpd-hpa, curl blksize 1468".into(),
            fleetboot_tftp.curl <= tftpd.curl,
            format!("{} s", secs(fleetboot_tftp.curl)),
            format!("{} s", secs(tftpd.curl)),
        ));
        targets.push((
            "TFTP ≥ 1.5 × tftpd-hpa, atftp windowsize 16".into(),
            fleetboot_tftp.atftp <= window_bound,
            format!("{} s", secs(fleetboot_tftp.atftp)),
            format!("{} s", secs(window_bound)),
        ));
    }

    if !http.is_empty() {
        targets.extend(http_report(&mut s, options, http)?);
    }

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

pub(super) fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}
