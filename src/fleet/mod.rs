//! The fleet: which machines exist, what each should run, what each runs now.
//!
//! - [`state`]: the observed state in SQLite — hosts, leases, events.
//! - [`reimage_targets`]: the hosts a reimage request names; [`with_bmcs`]: each with its BMC.
//! - [`follow`]: hosts followed through the install they were just sent to.
//! - [`logs`]: every install's console log, one file each.
//!
//! The boot decision itself lives in the appliance core (`crate::appliance`).

pub mod follow;
pub mod logs;
pub mod state;

pub use state::{FleetState, HostRecord, HostStatus, StateError, Token, Write};

use crate::config::Config;
use crate::mac::Mac;

/// What BMC calls said of hosts' power, as `FleetState::set_power` records it: the state, or
/// why the BMC could not be asked (hosts without a BMC are left out).
pub fn power_records(
    results: &[(Mac, Result<crate::bmc::PowerState, crate::bmc::BmcError>)],
) -> Vec<(Mac, String)> {
    results
        .iter()
        .filter(|(_, r)| !matches!(r, Err(crate::bmc::BmcError::NotConfigured)))
        .map(|(mac, r)| {
            let state = match r {
                Ok(s) => s.to_string(),
                Err(e) => format!("error: {e}"),
            };
            (*mac, state)
        })
        .collect()
}

/// How each host's disks are wiped when it is retired (`quick` or `secure`, its `wipe:`).
pub fn wipe_modes(config: &Config, macs: &[Mac]) -> Vec<&'static str> {
    macs.iter()
        .map(|m| match config.hosts.get(m).map(|h| h.wipe) {
            Some(crate::config::WipeMode::Secure) => "secure",
            _ => "quick",
        })
        .collect()
}

/// Hosts, each with its BMC (`None`: it has none).
pub type HostBmcs = Vec<(Mac, Option<crate::bmc::Bmc>)>;

/// Each host with its BMC from the configuration.
pub fn with_bmcs(config: &Config, macs: &[Mac]) -> HostBmcs {
    macs.iter()
        .map(|m| (*m, config.hosts.get(m).and_then(|h| h.bmc.clone())))
        .collect()
}

/// The hosts a reimage request names: MACs from the configuration, or every host of a group.
pub fn reimage_targets(
    config: &Config,
    macs: &[String],
    group: Option<&str>,
) -> Result<Vec<Mac>, String> {
    let mut out = Vec::new();
    for m in macs {
        let mac: Mac = m.parse().map_err(|e| format!("{e}"))?;
        if let Some(site) = config.other_sites.get(&mac) {
            return Err(format!(
                "host {mac} is site {site:?}'s in {}: this appliance (FLEETBOOT_SITE) serves \
                 another site; ask that site's appliance",
                config.path.display()
            ));
        }
        if !config.hosts.contains_key(&mac) {
            return Err(format!("host {mac} is not in {}", config.path.display()));
        }
        out.push(mac);
    }
    if let Some(g) = group {
        if !config.groups.contains_key(g) {
            return Err(format!("no group {g:?} in {}", config.path.display()));
        }
        out.extend(
            config
                .hosts
                .values()
                .filter(|h| h.group.as_deref() == Some(g))
                .map(|h| h.mac),
        );
    }
    if out.is_empty() {
        return Err("name at least one MAC or a group with hosts".into());
    }
    out.sort();
    out.dedup();
    Ok(out)
}
