//! Following hosts through an install they were just sent to (`reimage --reboot`): reads the
//! events recorded after a mark — the agent booted, the install finished or failed — and each
//! host's progress, until every host has an outcome or the time is up. Reads only SQLite, so
//! it works beside a running `serve` from the command line.

use super::{FleetState, StateError};
use crate::mac::Mac;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What happened to a followed host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The agent was handed to it (the image it installs).
    AgentBooted(String),
    /// Its install reached this percentage (reported in steps of at least 10).
    Progress(u8),
    /// Installed and verified (the image).
    Installed(String),
    /// The install failed (the reason).
    Failed(String),
    /// No outcome within the time given.
    TimedOut,
}

impl Step {
    /// Whether this ends the host's follow.
    pub fn is_final(&self) -> bool {
        matches!(self, Step::Installed(_) | Step::Failed(_) | Step::TimedOut)
    }
}

/// Follows `macs` from the event `mark` (taken before they were sent) until each has an
/// outcome or `timeout` passes, calling `report` at every step. Returns each host's last step.
pub fn follow(
    fleet: &FleetState,
    mark: i64,
    macs: &[Mac],
    timeout: Duration,
    poll: Duration,
    mut report: impl FnMut(Mac, &Step),
) -> Result<BTreeMap<Mac, Step>, StateError> {
    let started = Instant::now();
    let mut last: BTreeMap<Mac, Step> = BTreeMap::new();
    let mut shown_pct: BTreeMap<Mac, u8> = BTreeMap::new();
    // Each host's newest event read: ids only grow, so pruning cannot hide a later one.
    let mut read_to: BTreeMap<Mac, i64> = BTreeMap::new();
    loop {
        for &mac in macs {
            if last.get(&mac).is_some_and(Step::is_final) {
                continue;
            }
            let from = read_to.get(&mac).copied().unwrap_or(mark);
            for e in fleet.events_after(from, mac)? {
                read_to.insert(mac, e.id);
                let detail = e.detail.clone().unwrap_or_default();
                let step = match e.kind.as_str() {
                    "agent-booted" => Step::AgentBooted(detail),
                    "installed" => Step::Installed(detail),
                    "failed" => Step::Failed(detail),
                    _ => continue,
                };
                report(mac, &step);
                let done = step.is_final();
                last.insert(mac, step);
                if done {
                    break;
                }
            }
            if last.get(&mac).is_some_and(Step::is_final) {
                continue;
            }
            if let Some(record) = fleet.host(mac)? {
                let pct = record.progress_pct;
                let shown = shown_pct.get(&mac).copied().unwrap_or(0);
                if matches!(
                    last.get(&mac),
                    Some(Step::AgentBooted(_)) | Some(Step::Progress(_))
                ) && pct < 100
                    && pct >= shown + 10
                {
                    let step = Step::Progress(pct);
                    report(mac, &step);
                    shown_pct.insert(mac, pct);
                    last.insert(mac, step);
                }
            }
        }
        if macs.iter().all(|m| last.get(m).is_some_and(Step::is_final)) {
            return Ok(last);
        }
        if started.elapsed() > timeout {
            for &mac in macs {
                if !last.get(&mac).is_some_and(Step::is_final) {
                    report(mac, &Step::TimedOut);
                    last.insert(mac, Step::TimedOut);
                }
            }
            return Ok(last);
        }
        std::thread::sleep(poll);
    }
}
