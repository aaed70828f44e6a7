//! Fuzz target `http_range`: see `fleetboot::fuzz` for what it checks beyond "never panics".
//!
//! Run with `cargo xtask fuzz --target http_range` (libFuzzer where a nightly toolchain and cargo-fuzz
//! are present), or `cargo +nightly fuzz run http_range` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fleetboot::fuzz::http_range(data);
});
