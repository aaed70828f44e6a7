//! Fuzz target `disk_image`: see `fleetboot::fuzz` for what it checks beyond "never panics".
//!
//! Run with `cargo xtask fuzz --target disk_image` (libFuzzer where a nightly toolchain and
//! cargo-fuzz are present), or `cargo +nightly fuzz run disk_image` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fleetboot::fuzz::disk_image(data);
});
