//! The appliance core: the state every front-end shares and the whole boot policy.
//!
//! DHCP, TFTP and HTTP are front-ends: they receive, call the core, send and log. The core owns
//! - the configuration in force (replaced whole on reload), the store, the fleet state (SQLite),
//!   the counters;
//! - [`policy`]: the boot decision as pure, table-tested functions;
//! - [`AppState::boot_plan`] (`boot.rs`): what a host's iPXE script does, with the install token
//!   it carries, recorded before it is handed out;
//! - the install tokens (`tokens.rs`): bound to one MAC, to the address DHCP gave that MAC, and
//!   to a lifetime; checked on every agent call and store read;
//! - the addresses DHCP saw for each MAC;
//! - the images the configuration names, resolved to their identity (`images.rs`);
//! - what each host's installed OS is told about itself (`cloudinit.rs`: NoCloud documents).

mod boot;
pub mod cloudinit;
pub mod frames;
mod images;
pub mod policy;
#[cfg(test)]
mod test_backend;
mod tokens;

pub use boot::{now as boot_now, random_token, BootError, BootPlan};
pub use images::ImageCatalog;
pub use policy::{dhcp_boot, script_plan, DhcpBoot, Firmware, ScriptPlan};
pub use tokens::{canonical, same_secret, AccessError, Tokens};

use crate::config::Config;
use crate::fleet::{FleetState, StateError};
use crate::mac::Mac;
use crate::metrics::Metrics;
use crate::store::{PackFiles, Store};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, RwLock};

/// Addresses remembered from DHCP; past this many the oldest knowledge is dropped (a flood of
/// made-up MACs cannot grow it without bound; a real host is seen again at its next request).
const ADDRESSES_MAX: usize = 65_536;

/// The addresses DHCP saw, both ways, so that an address has one holder.
#[derive(Default)]
struct Addresses {
    by_mac: HashMap<Mac, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, Mac>,
}

/// Everything the front-ends share.
pub struct AppState {
    /// The configuration in force; replaced whole on reload.
    pub config: RwLock<Arc<Config>>,
    pub store: Store,
    fleet: Mutex<FleetState>,
    pub metrics: Arc<Metrics>,
    /// How machines reach the appliance, e.g. `http://10.0.0.1:80`.
    pub base_url: String,
    /// Bearer token of the admin API (`None`: the admin API answers 403).
    pub admin_token: Option<String>,
    /// Pack files kept open for range reads.
    pub packs: PackFiles,
    /// Verified frames of a store in object storage (unused for a local store).
    pub frames: frames::FrameCache,
    /// Live install tokens.
    pub tokens: Tokens,
    /// Images resolved to their identity, cached by manifest file.
    pub images: ImageCatalog,
    /// The address DHCP gave (full mode) or saw (proxy mode) for each MAC.
    addresses: Mutex<Addresses>,
    /// Bytes of pack data the HTTP side may hold in memory at once.
    pub http_buffer_budget: Arc<tokio::sync::Semaphore>,
    /// Every install's console log, as its agent sends it.
    pub logs: crate::fleet::logs::InstallLogs,
}

impl AppState {
    /// The state for `config`: its store, its fleet database (opened here, live install tokens
    /// loaded from it), fresh counters. `base_url` is how machines reach the appliance; no
    /// `admin_token`: the admin API is off.
    pub fn new(
        config: Config,
        base_url: String,
        admin_token: Option<String>,
    ) -> anyhow::Result<Arc<AppState>> {
        let fleet = FleetState::open(&config.state_dir)?;
        let frame_cache_bytes = config.frame_cache_bytes;
        let tokens = Tokens::default();
        for (mac, token) in fleet.live_tokens()? {
            tokens.insert(mac, token);
        }
        for (mac, token) in fleet.live_trip_tokens()? {
            tokens.insert_trip(mac, token);
        }
        let http = config.http.clone();
        let logs = crate::fleet::logs::InstallLogs::new(&config.state_dir);
        Ok(Arc::new(AppState {
            logs,
            store: crate::s3::open_store(&config.store)?,
            config: RwLock::new(Arc::new(config)),
            fleet: Mutex::new(fleet),
            metrics: Arc::new(Metrics::default()),
            base_url,
            admin_token,
            packs: PackFiles::default(),
            frames: frames::FrameCache::new(frame_cache_bytes),
            tokens,
            images: ImageCatalog::default(),
            addresses: Mutex::new(Addresses::default()),
            http_buffer_budget: Arc::new(tokio::sync::Semaphore::new(
                crate::http::limits::HttpLimits::from_config(&http).buffered_bytes_max,
            )),
        }))
    }

    /// `mac`'s inventory, if it was inspected (blocking: SQLite).
    pub fn inventory(&self, mac: Mac) -> Option<fleetboot_image::api::Inventory> {
        let json = self.fleet().inventory(mac).ok()??.0;
        serde_json::from_str(&json).ok()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The fleet database. Blocking: call it from a thread, or from async code through
    /// `spawn_blocking`.
    pub fn fleet(&self) -> std::sync::MutexGuard<'_, FleetState> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// DHCP gave `mac` the address `ip` (full mode), or `mac` asked for it (proxy mode).
    pub fn note_address(&self, mac: Mac, ip: Ipv4Addr) {
        let mut a = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        if a.by_mac.len() >= ADDRESSES_MAX && !a.by_mac.contains_key(&mac) {
            a.by_mac.clear();
            a.by_ip.clear();
        }
        // An address belongs to one machine at a time: a lease handed to another MAC (the
        // first's expired) moves it, so what is bound to the address follows the new holder.
        if let Some(old) = a.by_ip.insert(ip, mac) {
            if old != mac {
                a.by_mac.remove(&old);
            }
        }
        if let Some(previous) = a.by_mac.insert(mac, ip) {
            if previous != ip {
                a.by_ip.remove(&previous);
            }
        }
    }

    /// The address DHCP knows for `mac`, if any.
    pub fn address_of(&self, mac: Mac) -> Option<Ipv4Addr> {
        self.addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_mac
            .get(&mac)
            .copied()
    }

    /// Runs bookkeeping that must not stop a boot: a failure is logged and counted.
    pub fn bookkeeping(&self, what: &str, result: Result<(), StateError>) {
        if let Err(e) = result {
            self.metrics.state_errors.inc();
            tracing::warn!("{what} not recorded: {e}");
        }
    }
}
