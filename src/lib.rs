//! fleetboot: a bare-metal provisioning appliance.
//!
//! This crate is the appliance. Its modules:
//! - [`store`]: the combined image store (import, export, list, verify, gc, stats).
//! - [`config`]: the YAML configuration of `fleetboot serve`.
//! - [`mac`]: Ethernet addresses.
//! - [`cli`]: the command line, the only place that reads flags and the environment.

pub mod cli;
pub mod config;
pub mod mac;
pub mod store;
