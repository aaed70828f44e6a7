//! `cargo xtask s3`: the store on a real distributed S3 store — three Garage nodes in network
//! namespaces (tests/s3.rs). Garage is not packaged by Debian; it is built once with
//! `cargo install garage` into target/tools/garage (about half an hour on 2 cores), which is why
//! this test has its own command instead of running in CI's `cargo xtask test`.

use crate::util::{root, run};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::Command;

/// The Garage release the test is pinned to, and the features it needs (no metrics, no K2V).
const GARAGE_VERSION: &str = "2.5.0";
const GARAGE_FEATURES: &str = "bundled-libs,sqlite,lmdb";

/// Garage's binary, installed if missing.
pub fn garage() -> Result<PathBuf> {
    let dir = root().join("target/tools/garage");
    let bin = dir.join("bin/garage");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: building Garage {GARAGE_VERSION} into {} (once)",
        dir.display()
    );
    run(Command::new(env!("CARGO")).args([
        "install",
        "--locked",
        "garage",
        "--version",
        GARAGE_VERSION,
        "--no-default-features",
        "--features",
        GARAGE_FEATURES,
        "--root",
        &dir.to_string_lossy(),
    ]))?;
    Ok(bin)
}

pub fn run_task(args: &[&str]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask s3");
    }
    let bin = garage()?;
    // The host-mode agent the install test runs (the host's target: no initramfs needed).
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["build", "-p", "fleetboot-agent"]))?;
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .env("FLEETBOOT_GARAGE", &bin)
        .env(
            "FLEETBOOT_AGENT",
            root().join("target/debug/fleetboot-agent"),
        )
        .args([
            "test",
            "--test",
            "s3",
            "--",
            "--ignored",
            "--test-threads",
            "1",
        ]))
}
