//! Fuzz target `manifest_decode`: see `fleetboot::fuzz` for what it checks beyond "never panics".
//!
//! Run with `cargo xtask fuzz --target manifest_decode` (libFuzzer where a nightly toolchain and cargo-fuzz
//! are present), or `cargo +nightly fuzz run manifest_decode` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fleetboot::fuzz::manifest_decode(data);
});
