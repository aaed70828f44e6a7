//! fleetboot: a bare-metal provisioning appliance.
//!
//! This crate is the appliance. Its modules:
//! - [`store`]: the combined image store (import, export, list, verify, gc, stats).
//! - [`cli`]: the command line, the only place that reads flags and the environment.

pub mod cli;
pub mod store;
