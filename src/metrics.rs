//! Counters of what the services did, rendered in the Prometheus text format at `/metrics`.

use crate::fleet::HostRecord;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every counter of the appliance.
#[derive(Default)]
pub struct Metrics {
    pub dhcp_received: Counter,
    pub dhcp_answered: Counter,
    /// Packets that could not be decoded or made no sense.
    pub dhcp_dropped: Counter,
    /// Well-formed requests we chose not to answer (unknown host, not for us).
    pub dhcp_ignored: Counter,
    pub tftp_transfers: Counter,
    pub tftp_refused: Counter,
    pub http_scripts: Counter,
    pub installs_done: Counter,
    pub installs_failed: Counter,
    /// Bookkeeping writes to SQLite that failed (logged; the boot went on).
    pub state_errors: Counter,
}

impl Metrics {
    /// The Prometheus text exposition of the counters and of the hosts by status.
    pub fn render(&self, hosts: &[HostRecord]) -> String {
        let mut s = String::new();
        let counters = [
            (
                "fleetboot_dhcp_received_total",
                "DHCP packets received",
                &self.dhcp_received,
            ),
            (
                "fleetboot_dhcp_answered_total",
                "DHCP answers sent",
                &self.dhcp_answered,
            ),
            (
                "fleetboot_dhcp_dropped_total",
                "DHCP packets dropped as malformed",
                &self.dhcp_dropped,
            ),
            (
                "fleetboot_dhcp_ignored_total",
                "DHCP requests not answered by policy",
                &self.dhcp_ignored,
            ),
            (
                "fleetboot_tftp_transfers_total",
                "TFTP read requests served",
                &self.tftp_transfers,
            ),
            (
                "fleetboot_tftp_refused_total",
                "TFTP requests refused",
                &self.tftp_refused,
            ),
            (
                "fleetboot_http_scripts_total",
                "iPXE scripts served",
                &self.http_scripts,
            ),
            (
                "fleetboot_installs_done_total",
                "images installed",
                &self.installs_done,
            ),
            (
                "fleetboot_installs_failed_total",
                "installs that failed",
                &self.installs_failed,
            ),
            (
                "fleetboot_state_errors_total",
                "bookkeeping writes to the state database that failed",
                &self.state_errors,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                s,
                "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        let _ = writeln!(
            s,
            "# HELP fleetboot_hosts Hosts by status.\n# TYPE fleetboot_hosts gauge"
        );
        for status in ["discovered", "booting", "imaging", "installed", "failed"] {
            let n = hosts.iter().filter(|h| h.status.as_str() == status).count();
            let _ = writeln!(s, "fleetboot_hosts{{status=\"{status}\"}} {n}");
        }
        s
    }
}
