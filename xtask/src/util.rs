//! Small helpers shared by the tasks: running commands loudly, finding the workspace root.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// Runs `cmd`, echoing it first; fails with the command line if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` with `input` on its stdin, echoing it first; fails if it exits non-zero.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<()> {
    use std::io::Write;
    eprintln!("$ {} <<< {input:?}", show(cmd));
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns what it printed; fails with the command line and its stderr if it
/// exits non-zero.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}: {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line of `cmd`, for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Whether an executable named `name` is on PATH, or (an absolute `name`) that file exists.
pub fn have(name: &str) -> bool {
    // An absolute path: a file a package installs (headers, not a command).
    if Path::new(name).is_absolute() {
        return Path::new(name).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(name).is_file()))
        .unwrap_or(false)
}

/// `cargo build --release -p P...` in the workspace; returns the path of the first package's binary.
pub fn build_release(packages: &[&str]) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).args(["build", "--release"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    run(&mut cmd)?;
    let bin = root()
        .join("target/release")
        .join(packages.first().copied().unwrap_or("fleetboot"));
    if !bin.is_file() {
        bail!("{} is missing after the build", bin.display());
    }
    Ok(bin)
}

/// (bytes fetched, bytes reused) from the agent's install report: the one line of its output
/// (stdout on a host, the console in a VM) that starts with `fleetboot-report: ` and carries
/// the report as JSON.
pub fn install_figures(output: &str) -> Result<(u64, u64)> {
    let json = output
        .lines()
        .find_map(|l| {
            l.trim_end_matches('\r')
                .split_once("fleetboot-report: ")
                .map(|x| x.1)
        })
        .context("no install report (fleetboot-report: {...}) in the agent's output")?;
    let report: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("bad install report {json:?}"))?;
    let field = |key: &str| {
        report[key]
            .as_u64()
            .with_context(|| format!("no {key} in the install report {json}"))
    };
    Ok((field("bytes_fetched")?, field("bytes_reused")?))
}
