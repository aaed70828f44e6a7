//! fleetboot: a bare-metal provisioning appliance.
//!
//! This crate is the appliance. Its modules:
//! - [`appliance`]: the core the front-ends call: shared state, the boot policy, install tokens.
//! - [`store`]: the combined image store (import, export, list, verify, gc, stats).
//! - [`config`]: the YAML configuration of `fleetboot serve`.
//! - [`dhcp`]: full DHCP and ProxyDHCP on one interface.
//! - [`fleet`]: the fleet's observed state (SQLite).
//! - [`http`]: iPXE scripts, boot files, the store by range, agent and admin APIs, metrics.
//! - [`mac`]: Ethernet addresses.
//! - [`metrics`]: counters for `/metrics`.
//! - [`net`]: interface addresses.
//! - [`ra`]: optional IPv6 router advertisements (iPXE stops waiting for IPv6 at once).
//! - [`serve`]: `fleetboot serve`, wiring the services together and reloading the configuration.
//! - [`bootfiles`]: resolving client-supplied names beneath `boot_dir` (TFTP and HTTP).
//! - [`tftp`]: TFTP of `boot_dir`, read-only, beneath its root.
//! - [`cli`]: the command line, the only place that reads flags and the environment.

pub mod appliance;
pub mod bmc;
pub mod bootfiles;
pub mod cli;
pub mod config;
pub mod dhcp;
pub mod fleet;
pub mod fuzz;
pub mod grub;
pub mod http;
pub mod mac;
pub mod metrics;
pub mod net;
pub mod ra;
pub mod rules;
pub mod s3;
pub mod serve;
/// The combined image store, its own crate (`crates/store`): it knows no network and no hosts.
pub use fleetboot_store as store;
pub mod tftp;
