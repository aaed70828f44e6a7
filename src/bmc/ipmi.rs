//! IPMI 2.0 over LAN (RMCP+, `lanplus`) through Debian's `ipmitool`, as Ironic drives BMCs: a
//! well-tested client for the many vendor quirks of IPMI, rather than our own RMCP+ code. The
//! password goes through the environment (`-E`), never the command line (which `ps` shows).
//! ipmitool can exit 0 while the BMC refused a request (ipmi_sim answers `chassis bootdev`
//! with completion code 0xcc), so what a call changed is read back.

use super::{Bmc, BmcError, PowerAction, PowerState};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A call that has not finished by then is killed (ipmitool's own retries end sooner).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn fail(bmc: &Bmc, message: impl Into<String>) -> BmcError {
    BmcError::Ipmi {
        address: bmc.address.clone(),
        message: message.into(),
    }
}

/// Runs `ipmitool … ARGS` against the BMC; its standard output, or why it failed.
fn ipmitool(bmc: &Bmc, args: &[&str]) -> Result<String, BmcError> {
    let password = bmc.password()?;
    let port = bmc.port.unwrap_or(623).to_string();
    let mut cmd = Command::new("ipmitool");
    cmd.args(["-I", "lanplus", "-H", &bmc.address, "-p", &port])
        .args(["-U", &bmc.username, "-E"])
        // Per try: 3 s, 2 retries: an unreachable BMC is reported in ~10 s.
        .args(["-N", "3", "-R", "2"]);
    if let Some(cs) = bmc.cipher_suite {
        cmd.args(["-C", &cs.to_string()]);
    }
    cmd.args(args)
        .env("IPMI_PASSWORD", password.expose())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        fail(
            bmc,
            format!("cannot run ipmitool (Debian package ipmitool): {e}"),
        )
    })?;
    // Both pipes drained while waiting, so a chatty ipmitool never blocks on a full pipe.
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > CALL_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(
                    bmc,
                    format!("no answer in {} s", CALL_TIMEOUT.as_secs()),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(fail(bmc, format!("cannot wait for ipmitool: {e}"))),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if !status.success() {
        let why = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(fail(
            bmc,
            format!(
                "`ipmitool {}` failed: {}",
                args.join(" "),
                if why.is_empty() {
                    status.to_string()
                } else {
                    why
                }
            ),
        ));
    }
    Ok(stdout)
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

pub(super) fn power_state(bmc: &Bmc) -> Result<PowerState, BmcError> {
    let out = ipmitool(bmc, &["chassis", "power", "status"])?;
    parse_power(&out).ok_or_else(|| fail(bmc, format!("unexpected answer {:?}", out.trim())))
}

/// `Chassis Power is on` / `… off`.
fn parse_power(out: &str) -> Option<PowerState> {
    let line = out.lines().find(|l| l.contains("Chassis Power is"))?;
    match line.rsplit(' ').next()?.trim() {
        "on" => Some(PowerState::On),
        "off" => Some(PowerState::Off),
        _ => None,
    }
}

pub(super) fn power(bmc: &Bmc, action: PowerAction) -> Result<(), BmcError> {
    let word = match action {
        PowerAction::On => "on",
        PowerAction::Off => "off",
        PowerAction::Cycle => "cycle",
    };
    ipmitool(bmc, &["chassis", "power", word])?;
    Ok(())
}

pub(super) fn pxe_next_boot(bmc: &Bmc) -> Result<(), BmcError> {
    // One-shot unless `options=persistent` is given: the boot after next uses the usual order.
    ipmitool(bmc, &["chassis", "bootdev", "pxe"])?;
    let back = ipmitool(bmc, &["chassis", "bootparam", "get", "5"])?;
    if boot_device_is_pxe(&back) {
        Ok(())
    } else {
        Err(fail(
            bmc,
            "the BMC did not take PXE as the next boot device (boot parameter 5 reads back \
             otherwise)",
        ))
    }
}

/// Whether `chassis bootparam get 5` says the boot device is forced to PXE.
fn boot_device_is_pxe(out: &str) -> bool {
    out.lines()
        .any(|l| l.contains("Boot Device Selector") && l.contains("Force PXE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ipmitool_answers() {
        assert_eq!(parse_power("Chassis Power is on\n"), Some(PowerState::On));
        assert_eq!(parse_power("Chassis Power is off\n"), Some(PowerState::Off));
        assert_eq!(parse_power("Unable to get Chassis Power Status\n"), None);
        let pxe =
            " Boot Flags :\n   - Boot Flag Invalid\n   - Options apply to only next boot\n   \
                   - Boot Device Selector : Force PXE\n";
        assert!(boot_device_is_pxe(pxe));
        assert!(!boot_device_is_pxe(
            "   - Boot Device Selector : No override\n"
        ));
    }
}
