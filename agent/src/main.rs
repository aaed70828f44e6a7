//! fleetboot-agent: creates an image on a machine's disk.
//!
//! ```text
//! fleetboot-agent deploy --server URL --mac MAC --target FILE_OR_DEVICE [--token TOKEN]
//! fleetboot-agent inspect --server URL --mac MAC [--token TOKEN]
//! fleetboot-agent wipe --target DEVICE_OR_FILE [--secure]
//! ```
//! On a host (benchmarks, tests): asks the appliance for the MAC's boot script as iPXE would —
//! which hands out the per-boot token — then installs the assigned image on the target.
//! As `/init` of the initramfs (process 1) it reads the same settings from the kernel command
//! line (`fleetboot.url=`, `fleetboot.mac=`, `fleetboot.token=`, `fleetboot.ip=` …), see [`init`].

mod client;
mod console;
mod deploy;
mod dhcp;
mod disk;
mod init;
mod inventory;
mod ipmi;
mod modules;
mod netconf;
mod seed;
mod source;
mod wipe;

use anyhow::{bail, Context, Result};

const USAGE: &str =
    "usage: fleetboot-agent deploy --server URL --mac MAC --target FILE_OR_DEVICE [--token TOKEN]\n\
     \x20      fleetboot-agent inspect --server URL --mac MAC [--token TOKEN]\n\
     \x20      fleetboot-agent wipe --target DEVICE_OR_FILE [--secure]";

fn main() {
    if std::process::id() == 1 {
        init::run();
    }
    if let Err(err) = run() {
        eprintln!("fleetboot-agent: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        // One disk, as a retired machine's agent wipes each of its own (its partitions from
        // sysfs when it is a block device).
        Some("wipe") => {
            let (target, secure) = match &args[1..] {
                [flag, t] if flag == "--target" => (t, false),
                [flag, t, s] if flag == "--target" && s == "--secure" => (t, true),
                _ => bail!("{USAGE}"),
            };
            let path = std::path::Path::new(target);
            let name = std::fs::canonicalize(path)?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mode = if secure {
                wipe::Mode::Secure
            } else {
                wipe::Mode::Quick
            };
            let w = wipe::wipe(path, &wipe::partitions(&name), mode)?;
            println!("wiped {target} ({} bytes): {}", w.bytes, w.how);
            Ok(())
        }
        Some(command @ ("deploy" | "inspect")) => {
            let mut server = None;
            let mut mac = None;
            let mut target = None;
            let mut token = None;
            let mut it = args[1..].iter();
            while let Some(flag) = it.next() {
                let value = it
                    .next()
                    .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
                match flag.as_str() {
                    "--server" => server = Some(value.trim_end_matches('/').to_string()),
                    "--mac" => mac = Some(value.to_lowercase()),
                    "--target" => target = Some(value.clone()),
                    "--token" => token = Some(value.clone()),
                    other => bail!("unknown option {other}\n{USAGE}"),
                }
            }
            if command == "inspect" {
                let (Some(server), Some(mac)) = (server, mac) else {
                    bail!("{USAGE}");
                };
                // This host as it is: what the machine's agent reports under discover.
                let client = client::Client::for_errand(
                    &server,
                    &mac,
                    token,
                    fleetboot_image::api::AgentMode::Inspect,
                )?;
                let mut inv = inventory::collect(std::path::Path::new("/"));
                ipmi::fill(&mut inv, None);
                client.inventory(&inv)?;
                println!("{}", serde_json::to_string(&inv)?);
                return Ok(());
            }
            let (Some(server), Some(mac), Some(target)) = (server, mac, target) else {
                bail!("{USAGE}");
            };
            console::capture(false);
            let report = deploy::deploy(&deploy::Settings {
                server,
                mac,
                token,
                target: Some(target.into()),
            });
            console::finish();
            let report = report?;
            println!(
                "{}{}",
                fleetboot_image::api::REPORT_PREFIX,
                serde_json::to_string(&report)?
            );
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}
