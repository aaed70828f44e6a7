//! Fuzz target `tftp_request`: see `fleetboot::fuzz` for what it checks beyond "never panics".
//!
//! Run with `cargo xtask fuzz --target tftp_request` (libFuzzer where a nightly toolchain and cargo-fuzz
//! are present), or `cargo +nightly fuzz run tftp_request` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fleetboot::fuzz::tftp_request(data);
});
