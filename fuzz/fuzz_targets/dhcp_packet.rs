//! Fuzz target: any datagram through the DHCP server's handler (validation, decoding, the boot
//! decision, the lease pool, building and encoding the answer) must never panic.
//!
//! Run with `cargo fuzz run dhcp_packet` from the repository root (see README).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fleetboot::dhcp::fuzz::handle_datagram(data);
});
