//! The DHCP service: full mode (addresses and boot information), ProxyDHCP (boot information
//! only, ports 67 and 4011, beside the site's server) or off.
//!
//! - [`packet`]: validation, decoding and the facts a request carries; building replies.
//! - [`leases`]: the address pool of full mode.
//! - [`server`]: the sockets (bound to the configured interface) and the answer to each request.
//!
//! Every packet that cannot be decoded or makes no sense is dropped, counted and logged at debug
//! level; only socket failures stop the service.

pub mod fuzz;
pub mod leases;
pub mod packet;
pub mod server;

pub use server::{DhcpServer, DhcpSockets};
