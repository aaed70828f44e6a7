//! Power and the next boot device through a host's BMC: IPMI 2.0 over LAN (`ipmi.rs`, Debian's
//! `ipmitool` as a subprocess, as Ironic does) or Redfish over HTTPS (`redfish.rs`).
//!
//! What it owns: a resolved `bmc:` setting ([`Bmc`]), the password read only when a call needs
//! it (never kept in the configuration, never printed: [`Secret`]), the three operations every
//! flow is built from (power state, power action, PXE on the next boot only) with each answer
//! read back rather than trusted, and [`for_each`], which runs one operation on many hosts in
//! parallel with a limit, one host's failure never stopping the others.

mod ipmi;
mod redfish;

use crate::mac::Mac;
use serde::Serialize;
use std::path::PathBuf;

/// Which protocol the BMC speaks (`bmc.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BmcKind {
    Ipmi,
    Redfish,
}

impl std::fmt::Display for BmcKind {
    /// As `bmc.type` writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BmcKind::Ipmi => "ipmi",
            BmcKind::Redfish => "redfish",
        })
    }
}

/// Where the BMC password comes from: a file (its first line) or an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    File(PathBuf),
    Env(String),
}

/// A host's BMC, with its group's and the defaults' keys applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bmc {
    pub kind: BmcKind,
    /// Host name or address.
    pub address: String,
    /// 623 (IPMI) or 443 (Redfish) unless given.
    pub port: Option<u16>,
    pub username: String,
    pub password: PasswordSource,
    /// IPMI: the RMCP+ cipher suite (`ipmitool -C`); ipmitool's default when absent.
    pub cipher_suite: Option<u8>,
    /// Redfish: the system's id under `/redfish/v1/Systems/`; the only one when absent.
    pub system: Option<String>,
    /// Redfish: a PEM file of the certificates to trust (a BMC's own CA or self-signed
    /// certificate); Mozilla's roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Redfish: check the certificate (on unless `tls_verify: false`).
    pub tls_verify: bool,
}

/// A password: shown as `***` by `Debug`, so it cannot reach a log by accident.
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A machine's power.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PowerState::On => "on",
            PowerState::Off => "off",
        })
    }
}

/// What to do to a machine's power.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    On,
    /// Hard off, as the power button held down.
    Off,
    /// Off and on again (a machine that is off is switched on).
    Cycle,
}

/// Why a BMC call failed; names the BMC, never the password.
#[derive(Debug, thiserror::Error)]
pub enum BmcError {
    #[error("no bmc is configured for this host")]
    NotConfigured,
    #[error("BMC password: {0}")]
    Password(String),
    #[error("IPMI BMC {address}: {message}")]
    Ipmi { address: String, message: String },
    #[error("Redfish BMC {address}: {message}")]
    Redfish { address: String, message: String },
}

impl Bmc {
    /// Reads the password now (a file's first line, or the variable), so a changed file is
    /// used by the next call and the configuration never holds it.
    pub fn password(&self) -> Result<Secret, BmcError> {
        let text = match &self.password {
            PasswordSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| BmcError::Password(format!("{}: {e}", path.display())))?,
            PasswordSource::Env(name) => std::env::var(name).map_err(|_| {
                BmcError::Password(format!("the environment variable {name} is not set"))
            })?,
        };
        let line = text.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            return Err(BmcError::Password(match &self.password {
                PasswordSource::File(p) => format!("{} is empty", p.display()),
                PasswordSource::Env(n) => format!("{n} is empty"),
            }));
        }
        Ok(Secret(line))
    }

    /// The machine's power as the BMC reports it.
    pub fn power_state(&self) -> Result<PowerState, BmcError> {
        match self.kind {
            BmcKind::Ipmi => ipmi::power_state(self),
            BmcKind::Redfish => redfish::power_state(self),
        }
    }

    /// Switches the power; `Cycle` on a machine that is off switches it on (BMCs refuse a
    /// cycle in that state).
    pub fn power(&self, action: PowerAction) -> Result<(), BmcError> {
        let action = match action {
            PowerAction::Cycle if self.power_state()? == PowerState::Off => PowerAction::On,
            a => a,
        };
        match self.kind {
            BmcKind::Ipmi => ipmi::power(self, action),
            BmcKind::Redfish => redfish::power(self, action),
        }
    }

    /// The next boot (only that one) from the network, read back from the BMC.
    pub fn pxe_next_boot(&self) -> Result<(), BmcError> {
        match self.kind {
            BmcKind::Ipmi => ipmi::pxe_next_boot(self),
            BmcKind::Redfish => redfish::pxe_next_boot(self),
        }
    }

    /// Boots the machine from the network once: PXE on the next boot, then a power cycle (or
    /// on, if it was off). What `reimage --reboot` does to each host.
    pub fn boot_from_network(&self) -> Result<(), BmcError> {
        self.pxe_next_boot()?;
        self.power(PowerAction::Cycle)
    }
}

/// Runs `op` for every host, at most `parallel` at once, and returns the results in the hosts'
/// order. A host without a BMC gets [`BmcError::NotConfigured`]; one host's failure (or a BMC
/// that does not answer) never stops the others.
pub fn for_each<T: Send>(
    hosts: &[(Mac, Option<Bmc>)],
    parallel: usize,
    op: impl Fn(&Bmc) -> Result<T, BmcError> + Sync,
) -> Vec<(Mac, Result<T, BmcError>)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<T, BmcError>>>> =
        Mutex::new((0..hosts.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..parallel.clamp(1, hosts.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((_, bmc)) = hosts.get(i) else { break };
                let r = match bmc {
                    Some(b) => op(b),
                    None => Err(BmcError::NotConfigured),
                };
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    hosts
        .iter()
        .map(|(mac, _)| *mac)
        .zip(results.into_inner().unwrap_or_else(|p| p.into_inner()))
        .map(|(mac, r)| (mac, r.unwrap_or(Err(BmcError::NotConfigured))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bmc(password: PasswordSource) -> Bmc {
        Bmc {
            kind: BmcKind::Ipmi,
            address: "192.0.2.1".into(),
            port: None,
            username: "admin".into(),
            password,
            cipher_suite: None,
            system: None,
            ca_file: None,
            tls_verify: true,
        }
    }

    #[test]
    fn the_password_is_read_at_use_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "hunter2\n").unwrap();
        let secret = bmc(PasswordSource::File(file.clone())).password().unwrap();
        assert_eq!(secret.expose(), "hunter2");
        assert_eq!(format!("{secret:?}"), "***");
        std::fs::write(&file, "").unwrap();
        let err = bmc(PasswordSource::File(file)).password().unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        let err = bmc(PasswordSource::Env("FLEETBOOT_TEST_NO_SUCH_VAR".into()))
            .password()
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("FLEETBOOT_TEST_NO_SUCH_VAR is not set"));
    }

    #[test]
    fn for_each_keeps_the_order_and_goes_on_past_failures() {
        let hosts: Vec<(Mac, Option<Bmc>)> = (0..7u8)
            .map(|i| {
                let mac: Mac = format!("52:54:00:00:00:{i:02x}").parse().unwrap();
                let b = (i != 3).then(|| {
                    let mut b = bmc(PasswordSource::Env("X".into()));
                    b.address = i.to_string();
                    b
                });
                (mac, b)
            })
            .collect();
        let results = for_each(&hosts, 3, |b| {
            if b.address == "5" {
                return Err(BmcError::Ipmi {
                    address: b.address.clone(),
                    message: "no answer".into(),
                });
            }
            Ok(b.address.clone())
        });
        assert_eq!(results.len(), 7);
        for (i, (mac, r)) in results.iter().enumerate() {
            assert_eq!(*mac, hosts[i].0);
            match i {
                3 => assert!(matches!(r, Err(BmcError::NotConfigured))),
                5 => assert!(r.is_err()),
                _ => assert_eq!(r.as_ref().unwrap(), &i.to_string()),
            }
        }
    }
}
