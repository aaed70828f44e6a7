//! `cargo xtask test`: everything CI runs — formatting, lints, the end-to-end VM runs (`e2e` with
//! the demo disks, `e2e --http-boot` with no TFTP, `e2e --secure-boot`, `e2e --arch arm64` under
//! TCG, then `e2e --os debian` with a real Debian),
//! unit and integration tests.
//!
//! Ends with one plain line `tests: N passed, M failed`, summed over every test binary, so the
//! closing line of a run speaks for all of it (cargo's own last line is that of its last binary).

use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

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
    // The agent in real VMs: the demo disks, then a real Debian up as itself (each counted as one
    // test in the summary line).
    crate::e2e::run(&[])?;
    crate::e2e::run(&["--http-boot"])?;
    crate::e2e::run(&["--secure-boot"])?;
    crate::e2e::run(&["--arch", "arm64"])?;
    crate::e2e::run(&["--os", "debian"])?;
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root)
        .args(["test", "--workspace"])
        .args(extra)
        .stdout(Stdio::piped());
    eprintln!("$ {}", util::show(&cmd));
    let mut child = cmd.spawn().context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    const E2E_RUNS: u64 = 5;
    let (mut passed, mut failed) = (E2E_RUNS, 0u64); // the e2e runs above passed
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read cargo test's output")?;
        writeln!(out, "{line}")?;
        if let Some((p, f)) = parse_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait().context("cargo test did not finish")?;
    writeln!(out, "tests: {passed} passed, {failed} failed")?;
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if passed <= E2E_RUNS {
        bail!("no test ran");
    }
    Ok(())
}

/// Reads `test result: ok. 11 passed; 0 failed; ...`.
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let mut passed = None;
    let mut failed = None;
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        match words.as_slice() {
            [.., n, "passed"] => passed = n.parse().ok(),
            [n, "failed"] => failed = n.parse().ok(),
            _ => {}
        }
    }
    Some((passed?, failed?))
}

#[cfg(test)]
mod tests {
    use super::parse_result;

    #[test]
    fn reads_cargo_test_summaries() {
        assert_eq!(
            parse_result("test result: ok. 11 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 7.09s"),
            Some((11, 0))
        );
        assert_eq!(
            parse_result("test result: FAILED. 8 passed; 3 failed; 0 ignored"),
            Some((8, 3))
        );
        assert_eq!(parse_result("running 3 tests"), None);
    }
}
