//! Fuzz target `dhcp_packet`: any datagram through the DHCP server's handler (validation,
//! decoding, the boot decision, the lease pool, building and encoding the answer) must never
//! panic (`fleetboot::fuzz`).
//!
//! Run with `cargo xtask fuzz --target dhcp_packet` (libFuzzer where a nightly toolchain and
//! cargo-fuzz are present), or `cargo +nightly fuzz run dhcp_packet` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fleetboot::fuzz::dhcp_packet(data);
});
