//! The agent API's wire types (JSON), shared by the appliance and the agent so the two cannot
//! drift apart, and the kernel command-line keys the boot script hands the agent.
//!
//! ```text
//! GET  /api/agent/{mac}/assignment   -> Assignment     (Authorization: Bearer <install token>)
//! POST /api/agent/{mac}/progress     <- Progress
//! POST /api/agent/{mac}/done         <- InstallReport
//! POST /api/agent/{mac}/failed       <- Failed
//! POST /api/agent/{mac}/inventory    <- Inventory      (inspection: the machine as it is)
//! POST /api/agent/{mac}/wiped        <- WipeReport     (a retired machine's disks wiped)
//! GET  /store/manifests/…, /store/packs/…               (the same bearer token, unless the
//!                                                        appliance has `store_access: open`)
//! ```

use serde::{Deserialize, Serialize};
use std::fmt;

/// The identity of one stored image version: its name, its version number (never reused for
/// other content) and the BLAKE3 of its whole content. What a host has installed is matched by
/// `digest`; `name@version` is for people.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageId {
    pub name: String,
    pub version: u32,
    /// BLAKE3 of the whole image, hex.
    pub digest: String,
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// What the agent is to install, and where to find it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub mac: String,
    pub image: ImageId,
    pub size: u64,
    /// The manifest (descriptive data); then the packs by range: `{packs_url}/{id}.pack`.
    pub manifest_url: String,
    pub packs_url: String,
    /// `auto`, a path, `/dev/disk/by-id/…`, a serial or a WWN (ignored when `disk_hints`).
    pub disk: String,
    /// Root device hints: the one disk they all hold for.
    #[serde(default)]
    pub disk_hints: Option<crate::hints::DiskHints>,
    pub hostname: Option<String>,
    /// The image last verified on this disk (or being written over it), if it is still in the
    /// store: a hint of where chunks may already lie. The agent hashes every chunk it reuses,
    /// so a stale hint costs time, never correctness.
    #[serde(default)]
    pub installed_manifest_url: Option<String>,
    /// cloud-init's NoCloud documents, to be written as a `cidata` partition after the image
    /// is verified; `None`: write nothing (`cloud_init: off`).
    #[serde(default)]
    pub seed: Option<Seed>,
    /// `store_access: direct`: the manifest URLs above and these pack URLs (by pack id) are
    /// presigned URLs of the object store, fetched without the install token (which the object
    /// store would refuse beside its own signature). Packs missing here, or whose URL fails
    /// (retired by gc since): `packs_url`. Agents older than these fields cannot install with
    /// `store_access: direct`.
    #[serde(default)]
    pub pack_urls: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub presigned: bool,
    /// BLAKE3 (hex) of the manifest file as the appliance read it: the agent trusts a manifest
    /// it fetched (from the appliance, a mirror or the object store) only if it hashes to this.
    /// `None` from an older appliance.
    #[serde(default)]
    pub manifest_hash: Option<String>,
}

/// The three NoCloud documents of one install.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seed {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// Bytes written so far, of the image's size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// What an install did: sent as `done`, printed by the agent as one JSON line, kept by the
/// appliance with the host. Tests, the end-to-end run and the benchmarks read this structure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstallReport {
    pub image: ImageId,
    /// The disk (or file) written.
    pub target: String,
    /// BLAKE3 of what the agent read back from the disk (bypassing the page cache).
    pub digest: String,
    pub bytes_fetched: u64,
    pub bytes_reused: u64,
    pub seconds: f64,
    /// Where the cloud-init seed went, or why there is none.
    #[serde(default)]
    pub seed: Option<String>,
}

/// The install failed; nothing was reported done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub reason: String,
}

/// A machine as the agent found it (inspection of an unknown machine, and before an install).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub system: SystemInfo,
    /// Logical CPUs.
    pub cpus: u32,
    pub cpu_model: Option<String>,
    pub memory_bytes: u64,
    pub disks: Vec<DiskInfo>,
    pub nics: Vec<NicInfo>,
    /// The BMC's LAN address, where the kernel's IPMI driver finds one.
    pub bmc_address: Option<String>,
    /// The BMC's own MAC address (its LAN channel's), with the address.
    #[serde(default)]
    pub bmc_mac: Option<String>,
}

/// What the firmware says of the machine (DMI/SMBIOS).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemInfo {
    pub vendor: Option<String>,
    pub product: Option<String>,
    pub serial: Option<String>,
    pub uuid: Option<String>,
}

/// One disk (loop, RAM, optical, md, dm and nbd devices left out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The kernel's name: `sda`, `vda`, `nvme0n1`.
    pub name: String,
    pub size_bytes: u64,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub rotational: bool,
    pub removable: bool,
    /// As udev's `/dev/disk/by-path/` names it, e.g. `pci-0000:00:04.0`,
    /// `pci-0000:00:05.0-nvme-1`.
    pub by_path: Option<String>,
}

/// One network interface (loopback and virtual ones left out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    pub name: String,
    pub mac: String,
    pub driver: Option<String>,
    /// Carrier seen.
    pub link: bool,
    pub speed_mbps: Option<u32>,
}

/// A retired machine's disks, wiped and checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WipeReport {
    pub disks: Vec<WipedDisk>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WipedDisk {
    pub name: String,
    pub bytes: u64,
    /// `discard + zeroed`, `zeroed` or `secure discard`.
    pub how: String,
}

/// Kernel command-line keys of the agent (the boot script writes them, `/init` reads them).
pub mod cmdline {
    pub const URL: &str = "fleetboot.url";
    pub const MAC: &str = "fleetboot.mac";
    pub const TOKEN: &str = "fleetboot.token";
    pub const IP: &str = "fleetboot.ip";
    pub const NETMASK: &str = "fleetboot.netmask";
    pub const GATEWAY: &str = "fleetboot.gateway";
    pub const ON_FAILURE: &str = "fleetboot.on_failure";
    /// `inspect`: report the machine's inventory and power off, install nothing; `wipe`: wipe
    /// every fixed disk (the machine is retired) and power off.
    pub const MODE: &str = "fleetboot.mode";
    /// With `mode=wipe`: `secure` for the drives' own secure erase (default quick).
    pub const WIPE: &str = "fleetboot.wipe";
}

/// What the agent is booted for. The boot script says it on the kernel command line
/// ([`cmdline::MODE`], and [`cmdline::WIPE`] for a wipe); an install carries no mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentMode {
    /// Install the assigned image and boot it.
    Install,
    /// Report the machine's inventory and power off, installing nothing.
    Inspect,
    /// Wipe every fixed disk (the machine is retired) and power off; `secure`: with the
    /// drives' own secure erase rather than discard and zeroes.
    Wipe { secure: bool },
}

/// A mode the agent does not know. The agent refuses it rather than take it for an install: a
/// script from a newer appliance must never lead to writing a disk it was not meant to.
#[derive(Debug, thiserror::Error)]
#[error("unknown agent mode {mode}={value} (this agent knows inspect, wipe, and {wipe}=secure)", mode = cmdline::MODE, wipe = cmdline::WIPE)]
pub struct UnknownMode {
    pub value: String,
}

impl AgentMode {
    /// The mode that `fleetboot.mode` and `fleetboot.wipe` (their values, absent or empty when
    /// not given) say.
    pub fn from_values(mode: Option<&str>, wipe: Option<&str>) -> Result<AgentMode, UnknownMode> {
        let unknown = |value: &str| UnknownMode {
            value: value.to_string(),
        };
        match (mode.unwrap_or(""), wipe.unwrap_or("")) {
            ("", _) => Ok(AgentMode::Install),
            ("inspect", _) => Ok(AgentMode::Inspect),
            ("wipe", "") => Ok(AgentMode::Wipe { secure: false }),
            ("wipe", "secure") => Ok(AgentMode::Wipe { secure: true }),
            ("wipe", other) => Err(unknown(&format!("wipe {}={other}", cmdline::WIPE))),
            (other, _) => Err(unknown(other)),
        }
    }

    /// The mode a kernel command line (or an iPXE script's `kernel` line) says.
    pub fn from_words(text: &str) -> Result<AgentMode, UnknownMode> {
        let value = |key: &str| {
            let key = format!("{key}=");
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(key.as_str()))
        };
        AgentMode::from_values(value(cmdline::MODE), value(cmdline::WIPE))
    }

    /// The kernel parameters that say this mode, each after a space (none for an install).
    pub fn params(self) -> String {
        match self {
            AgentMode::Install => String::new(),
            AgentMode::Inspect => format!(" {}=inspect", cmdline::MODE),
            AgentMode::Wipe { secure: false } => format!(" {}=wipe", cmdline::MODE),
            AgentMode::Wipe { secure: true } => {
                format!(" {}=wipe {}=secure", cmdline::MODE, cmdline::WIPE)
            }
        }
    }
}

impl fmt::Display for AgentMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AgentMode::Install => "install",
            AgentMode::Inspect => "inspect",
            AgentMode::Wipe { secure: false } => "wipe",
            AgentMode::Wipe { secure: true } => "wipe (secure erase)",
        })
    }
}

/// Prefix of the one console line that carries the agent's [`InstallReport`] as JSON.
pub const REPORT_PREFIX: &str = "fleetboot-report: ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_agent_mode_reads_back_from_its_own_params() {
        for mode in [
            AgentMode::Install,
            AgentMode::Inspect,
            AgentMode::Wipe { secure: false },
            AgentMode::Wipe { secure: true },
        ] {
            let line = format!("console=ttyS0 {}=x{} quiet", cmdline::URL, mode.params());
            assert_eq!(AgentMode::from_words(&line).unwrap(), mode, "{line}");
        }
    }

    #[test]
    fn an_unknown_mode_is_refused_never_taken_for_an_install() {
        for line in [
            "fleetboot.mode=reinstall",
            "fleetboot.mode=wipe fleetboot.wipe=sekure",
        ] {
            let e = AgentMode::from_words(line).unwrap_err();
            assert!(e.to_string().contains("unknown agent mode"), "{e}");
        }
        // An empty value is no mode, as the agent reads any empty key.
        assert_eq!(
            AgentMode::from_words("fleetboot.mode= x").unwrap(),
            AgentMode::Install
        );
    }
}
