//! `cargo xtask test`: everything CI runs — formatting, lints, unit and integration tests.

use crate::util::{self, root};
use anyhow::Result;
use std::process::Command;

pub fn run(extra: &[&str]) -> Result<()> {
    crate::setup::run()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = root();
    util::run(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]),
    )?;
    util::run(Command::new(&cargo).current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    util::run(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["test", "--workspace"])
            .args(extra),
    )
}
