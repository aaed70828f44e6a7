//! What a host's iPXE script does, decided and recorded: the agent with an install token, or the
//! local disk. The HTTP front-end only renders the plan as iPXE text.
//!
//! Rules:
//! - the image is compared by digest with what a *verified* install put on the disk
//!   ([`super::policy::script_plan`]); an install that did not finish left the disk unknown;
//! - a token is handed only to the address DHCP gave the host (where DHCP has seen it; else to
//!   the first address that asks, and only that one afterwards), and is recorded — the disk
//!   marked unknown — before the script leaves;
//! - a second fetch of the script while an install runs (a firmware retry, a power cut, a
//!   curious neighbour) gets the same token back from the same address, and disturbs nothing;
//! - the local-disk answer never fails because bookkeeping could not be written.

use super::policy::{script_plan, ScriptPlan};
use super::AppState;
use crate::config::UnknownHosts;
use crate::fleet::{StateError, Token};
use crate::mac::Mac;
use crate::store::{ImageRef, StoreError};
use fleetboot_image::api::{AgentMode, ImageId};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the script does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootPlan {
    /// Boot the agent, which installs `image` using `token`.
    Agent { image: ImageId, token: String },
    /// Boot the agent to report the machine's inventory and power off (an unknown machine
    /// under `unknown_hosts: discover`, not inspected yet).
    Inspect { token: String },
    /// Boot the agent to wipe every fixed disk and power off (`fleetboot host retire`).
    Wipe { token: String, secure: bool },
    /// Boot the local disk.
    LocalDisk,
}

impl BootPlan {
    /// The agent's token and what it is booted for; `None`: the local disk.
    pub fn agent_mode(&self) -> Option<(&str, AgentMode)> {
        match self {
            BootPlan::Agent { token, .. } => Some((token, AgentMode::Install)),
            BootPlan::Inspect { token } => Some((token, AgentMode::Inspect)),
            BootPlan::Wipe { token, secure } => Some((token, AgentMode::Wipe { secure: *secure })),
            BootPlan::LocalDisk => None,
        }
    }
}

/// Why a host gets no script.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("unknown host {0}")]
    UnknownHost(Mac),
    #[error("host {mac}: image {image}: {error}")]
    Image {
        mac: Mac,
        image: ImageRef,
        error: Box<StoreError>,
    },
    #[error("the install script of {mac} goes only to {leased} (its DHCP address, or its running install's); {peer} asked")]
    WrongAddress {
        mac: Mac,
        leased: IpAddr,
        peer: IpAddr,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no randomness for a token: {0}")]
    Random(std::io::Error),
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl AppState {
    /// Decides what `mac` boots, asked from `peer`. Blocking (SQLite, the store): call it from
    /// `spawn_blocking`.
    pub fn boot_plan(&self, mac: Mac, peer: IpAddr) -> Result<BootPlan, BootError> {
        let peer = super::tokens::canonical(peer);
        let config = self.config();
        use crate::fleet::HostStatus;
        // Retirement comes first, before anything about images: a host retired (and perhaps
        // since removed from the YAML, or its image deleted) is wiped all the same.
        {
            let fleet = self.fleet();
            let record = fleet.host(mac).ok().flatten();
            if let Some(how) = record.as_ref().and_then(|r| r.retire.clone()) {
                let secure = how == "secure";
                let token = self.side_trip(
                    mac,
                    peer,
                    record.as_ref(),
                    &fleet,
                    &config,
                    HostStatus::Wiping,
                )?;
                tracing::info!(%mac, %peer, wipe = %how, "booting the agent to wipe a retired host");
                return Ok(BootPlan::Wipe { token, secure });
            }
            // Retired: nothing boots on it until a reimage is asked for.
            if record
                .as_ref()
                .is_some_and(|r| r.status == HostStatus::Retired && !r.reimage)
            {
                return Ok(BootPlan::LocalDisk);
            }
        }
        let wanted: Option<ImageRef> = match config.hosts.get(&mac) {
            Some(h) => h.image.clone(),
            None => match &config.unknown_hosts {
                UnknownHosts::Ignore => return Err(BootError::UnknownHost(mac)),
                // Inspected, and a rule matches what it is: the rule's image.
                UnknownHosts::Discover => {
                    let inventory = self.inventory(mac);
                    config
                        .rule_for(mac, inventory.as_ref())
                        .and_then(|_| config.host_for(mac, inventory.as_ref()).image)
                }
                UnknownHosts::Install(image) => Some(image.clone()),
            },
        };
        let assigned = match &wanted {
            Some(r) => Some(
                self.images
                    .resolve(&self.store, r)
                    .map_err(|error| BootError::Image {
                        mac,
                        image: r.clone(),
                        error: Box::new(error),
                    })?
                    .id,
            ),
            None => None,
        };
        let fleet = self.fleet();
        self.bookkeeping("host seen", fleet.seen(mac, None, None));
        let record = match fleet.host(mac) {
            Ok(r) => r,
            // The disk is unknown without the record: only a host with nothing to install can
            // go on (to its local disk).
            Err(e) if assigned.is_none() => {
                self.bookkeeping("host record read", Err(e));
                None
            }
            Err(e) => return Err(e.into()),
        };
        // An unknown machine not inspected yet, that DHCP has given an address (a made-up MAC
        // asking over HTTP gets no token).
        let inspect = !config.hosts.contains_key(&mac)
            && config.unknown_hosts == UnknownHosts::Discover
            && self.address_of(mac).is_some()
            && matches!(fleet.inventory(mac), Ok(None));
        if inspect {
            let token = self.side_trip(
                mac,
                peer,
                record.as_ref(),
                &fleet,
                &config,
                HostStatus::Inspecting,
            )?;
            tracing::info!(%mac, %peer, "booting the agent to inspect an unknown machine");
            return Ok(BootPlan::Inspect { token });
        }
        let plan = script_plan(
            assigned.as_ref(),
            record.as_ref().and_then(|r| r.installed.as_ref()),
            record.as_ref().is_some_and(|r| r.reimage),
        );
        let image = match plan {
            ScriptPlan::LocalDisk => {
                let detail = assigned.as_ref().map(ToString::to_string);
                self.bookkeeping(
                    "local boot",
                    fleet.event(Some(mac), "local-boot", detail.as_deref()),
                );
                return Ok(BootPlan::LocalDisk);
            }
            ScriptPlan::Agent { image } => image,
        };
        self.check_address(mac, peer, record.as_ref())?;
        let t = now();
        // The same install, asked again from its address: the same token, nothing reset — unless
        // a reimage was asked for since it began: that one starts afresh.
        let running = record
            .as_ref()
            .filter(|r| r.assigned.as_ref() == Some(&image) && !r.reimage);
        if let Some(token) = self.tokens.live(mac, t) {
            if running.is_some() && token.ip == peer {
                return Ok(BootPlan::Agent {
                    image,
                    token: token.secret,
                });
            }
        }
        let token = Token {
            secret: random_token().map_err(BootError::Random)?,
            ip: peer,
            expires: t.saturating_add(config.install_token_ttl.as_secs() as i64),
        };
        fleet.start_install(mac, &image, &token)?;
        self.tokens.insert(mac, token.clone());
        tracing::info!(%mac, %image, %peer, "booting the agent");
        Ok(BootPlan::Agent {
            image,
            token: token.secret,
        })
    }
}

impl AppState {
    /// A token goes only to the address DHCP gave the host; where DHCP has not seen it (no
    /// DHCP, or the appliance restarted), to the address of the host's live token, else to the
    /// one its record holds. Without the token's address, another machine could ask for the
    /// script of a host that is installing, void its token, and report the install done.
    fn check_address(
        &self,
        mac: Mac,
        peer: IpAddr,
        record: Option<&crate::fleet::HostRecord>,
    ) -> Result<(), BootError> {
        let leased = self
            .address_of(mac)
            .map(IpAddr::V4)
            .or_else(|| self.tokens.live(mac, now()).map(|t| t.ip))
            .or_else(|| record?.ip.as_deref()?.parse().ok());
        match leased {
            Some(leased) if leased != peer => Err(BootError::WrongAddress { mac, leased, peer }),
            _ => Ok(()),
        }
    }

    /// The token for a trip of the agent that installs nothing (`Inspecting` or `Wiping`),
    /// bound to the host's address like an install's; the same one again if the host asks
    /// again from its address while the trip runs.
    fn side_trip(
        &self,
        mac: Mac,
        peer: IpAddr,
        record: Option<&crate::fleet::HostRecord>,
        fleet: &crate::fleet::FleetState,
        config: &crate::config::Config,
        status: crate::fleet::HostStatus,
    ) -> Result<String, BootError> {
        self.check_address(mac, peer, record)?;
        let t = now();
        if let Some(token) = self.tokens.live(mac, t) {
            if record.is_some_and(|r| r.status == status) && token.ip == peer {
                return Ok(token.secret);
            }
        }
        let token = Token {
            secret: random_token().map_err(BootError::Random)?,
            ip: peer,
            expires: t.saturating_add(config.install_token_ttl.as_secs() as i64),
        };
        fleet.start_trip(mac, &token, status)?;
        self.tokens.insert_trip(mac, token.clone());
        Ok(token.secret)
    }
}

/// A random token (hex of 16 bytes from the kernel's CSPRNG).
pub fn random_token() -> std::io::Result<String> {
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
