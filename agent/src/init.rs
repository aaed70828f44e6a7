//! The agent as `/init` of its initramfs: mount the kernel's file systems, read the command line,
//! load the drivers the hardware asks for, bring up the NIC iPXE booted from, install, reboot.
//!
//! Every step prints a line on the console, and every failure says what was missing ("no NIC with
//! MAC …", "no disk matching …"). A failed install is reported to the appliance and the machine
//! then stays put (or powers off with `fleetboot.on_failure=poweroff`): it never reboots into a
//! half-written disk as if it were done.

use crate::{deploy, modules, netconf};
use anyhow::{bail, Context, Result};
use fleetboot_image::api::{cmdline, AgentMode};
use nix::mount::{mount, MsFlags};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// Settings from the kernel command line (`fleetboot.KEY=VALUE`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub values: HashMap<String, String>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let values = text
            .split_whitespace()
            .filter(|w| w.starts_with("fleetboot."))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Cmdline { values }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn need(&self, key: &str) -> Result<&str> {
        self.get(key)
            .with_context(|| format!("no {key}= on the kernel command line"))
    }
}

fn say(msg: &str) {
    println!("fleetboot-agent: {msg}");
}

/// Runs as process 1; never returns.
pub fn run() -> ! {
    let result = setup_and_install();
    let poweroff = std::fs::read_to_string("/proc/cmdline")
        .map(|c| Cmdline::parse(&c).get(cmdline::ON_FAILURE) == Some("poweroff"))
        .unwrap_or(false);
    match result {
        Ok(Done::Installed) => {
            say("installed; rebooting into it");
            nix::unistd::sync();
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        }
        Ok(Done::Inspected) => {
            say("inspected; powering off");
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        }
        Ok(Done::Wiped) => {
            say("disks wiped; powering off");
            nix::unistd::sync();
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        }
        Err(e) => {
            say(&format!("FAILED: {e:#}"));
            nix::unistd::sync();
            if poweroff {
                say("powering off");
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            }
            say("stopped; the disk was not reported installed");
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// What the agent did, and so what comes next.
enum Done {
    /// Installed: reboot into it.
    Installed,
    /// Inspected: power off (the machine waits for its enrolment).
    Inspected,
    /// Retired, its disks wiped: power off.
    Wiped,
}

fn setup_and_install() -> Result<Done> {
    mount_filesystems()?;
    crate::console::capture(true);
    let cmdline = Cmdline::parse(
        &std::fs::read_to_string("/proc/cmdline").context("cannot read /proc/cmdline")?,
    );
    say(&format!("starting (kernel {})", kernel_release()));
    let url = cmdline
        .need(cmdline::URL)?
        .trim_end_matches('/')
        .to_string();
    let mac = cmdline.need(cmdline::MAC)?.to_lowercase();
    // Without a token (booted by other means than the script) the agent fetches its script
    // itself once the network is up; the appliance hands it only to the host's DHCP address.
    let token = cmdline.get(cmdline::TOKEN).map(str::to_string);

    let loaded =
        modules::load_for_hardware(Path::new("/lib/modules").join(kernel_release()).as_path())?;
    say(&format!("loaded {} driver modules", loaded.len()));

    let ifname = netconf::wait_for_nic(&mac, Duration::from_secs(15))?;
    netconf::link_up(&ifname)?;
    let (ip, netmask, gateway) = match cmdline.get(cmdline::IP) {
        Some(ip) => (
            ip.to_string(),
            cmdline
                .get(cmdline::NETMASK)
                .unwrap_or("255.255.255.0")
                .to_string(),
            cmdline.get(cmdline::GATEWAY).map(str::to_string),
        ),
        None => {
            say(&format!(
                "no fleetboot.ip= on the command line: asking DHCP on {ifname}"
            ));
            let bytes: Vec<u8> = mac
                .split(':')
                .filter_map(|b| u8::from_str_radix(b, 16).ok())
                .collect();
            let mac_bytes: [u8; 6] = bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("bad fleetboot.mac {mac}"))?;
            let lease = crate::dhcp::lease(&ifname, mac_bytes, Duration::from_secs(60))?;
            (
                lease.ip.to_string(),
                lease.netmask.to_string(),
                lease.gateway.map(|g| g.to_string()),
            )
        }
    };
    netconf::configure(&ifname, &ip, &netmask, gateway.as_deref())?;
    say(&format!("{ifname} ({mac}) up as {ip}/{netmask}"));

    // What the agent is here for. A mode it does not know is refused, never taken for an
    // install, and the appliance is told so when the token allows.
    let agent_mode =
        match AgentMode::from_values(cmdline.get(cmdline::MODE), cmdline.get(cmdline::WIPE)) {
            Ok(m) => m,
            Err(e) => {
                if let Some(token) = &token {
                    if let Ok(client) = crate::client::Client::new(&url, &mac, Some(token.clone()))
                    {
                        client.failed(&e.to_string());
                    }
                }
                return Err(e.into());
            }
        };
    if let AgentMode::Wipe { secure } = agent_mode {
        let token = token.context("a wipe needs fleetboot.token= (the appliance's script)")?;
        let client = crate::client::Client::new(&url, &mac, Some(token.clone()))?;
        crate::console::send_to(&url, &mac, &token);
        let mode = if secure {
            crate::wipe::Mode::Secure
        } else {
            crate::wipe::Mode::Quick
        };
        say(&format!("retired: wiping every fixed disk ({mode:?})"));
        match crate::wipe::all_disks(mode) {
            Ok(report) => {
                crate::console::send();
                client.wiped(&report)?;
                return Ok(Done::Wiped);
            }
            Err(e) => {
                crate::console::say(&format!("FAILED: {e:#}"));
                crate::console::send();
                client.failed(&format!("wipe: {e:#}"));
                return Err(e);
            }
        }
    }
    if agent_mode == AgentMode::Inspect {
        let token = token.context("inspection needs fleetboot.token= (the appliance's script)")?;
        let client = crate::client::Client::new(&url, &mac, Some(token.clone()))?;
        crate::console::send_to(&url, &mac, &token);
        let mut inv = crate::inventory::collect(Path::new("/"));
        let modules_dir = Path::new("/lib/modules").join(kernel_release());
        crate::ipmi::fill(&mut inv, Some(&modules_dir));
        say(&format!(
            "inventory: {} {}, {} CPUs, {} bytes of memory, {} disks, {} NICs",
            inv.system.vendor.as_deref().unwrap_or("?"),
            inv.system.product.as_deref().unwrap_or("?"),
            inv.cpus,
            inv.memory_bytes,
            inv.disks.len(),
            inv.nics.len()
        ));
        crate::console::send();
        client.inventory(&inv)?;
        return Ok(Done::Inspected);
    }

    let report = deploy::deploy(&deploy::Settings {
        server: url,
        mac,
        token,
        target: None,
    })?;
    say(&format!(
        "installed {} on {}: fetched {} bytes, reused {} bytes",
        report.image, report.target, report.bytes_fetched, report.bytes_reused
    ));
    println!(
        "{}{}",
        fleetboot_image::api::REPORT_PREFIX,
        serde_json::to_string(&report)?
    );
    Ok(Done::Installed)
}

fn mount_filesystems() -> Result<()> {
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(
            Some(src),
            target,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        ) {
            if e != nix::errno::Errno::EBUSY {
                bail!("cannot mount {fstype} on {target}: {e}");
            }
        }
    }
    Ok(())
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_settings_from_the_command_line() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=x initrd=fleetboot-initrd.img console=ttyS0 fleetboot.url=http://10.0.0.1:8080 \
             fleetboot.mac=52:54:00:12:34:56 fleetboot.token=abc fleetboot.ip=10.0.0.105 fleetboot.gateway=",
        );
        assert_eq!(c.get(cmdline::URL), Some("http://10.0.0.1:8080"));
        assert_eq!(c.get(cmdline::MAC), Some("52:54:00:12:34:56"));
        assert_eq!(c.get(cmdline::IP), Some("10.0.0.105"));
        assert_eq!(
            c.get(cmdline::GATEWAY),
            None,
            "empty (iPXE had none) counts as absent"
        );
        assert!(c
            .need("fleetboot.disk")
            .unwrap_err()
            .to_string()
            .contains("fleetboot.disk="));
    }
}
