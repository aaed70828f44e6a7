//! `cargo xtask fuzz`: every fuzz target (`fleetboot::fuzz`: the DHCP handler, the TFTP request
//! parser and file resolution, the HTTP Range parser, the manifest decoder) for a set time each,
//! reporting executions and crashes.
//!
//! Engines: libFuzzer through cargo-fuzz (coverage-guided; needs a nightly toolchain, and installs
//! cargo-fuzz from crates.io if that is missing), or the stable toolchain's mutation engine
//! (`examples/fuzz.rs`: blind mutations of the targets' seeds). `--engine auto` (the default)
//! takes libFuzzer where a nightly toolchain is installed. libFuzzer starts from the targets'
//! seeds and keeps its corpus in fuzz/corpus/TARGET; crashing inputs go to fuzz/artifacts/TARGET
//! (libFuzzer) or target/fuzz-crashes/TARGET (stable). Exits non-zero if any target crashed.

use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use std::process::Command;

const USAGE: &str =
    "usage: cargo xtask fuzz [--seconds N] [--target NAME]... [--engine auto|libfuzzer|stable]";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Engine {
    LibFuzzer,
    Stable,
}

struct Outcome {
    target: String,
    engine: Engine,
    executions: u64,
    seconds: f64,
    crashes: u64,
}

pub fn run(args: &[&str]) -> Result<()> {
    let (mut seconds, mut targets, mut engine) = (60u64, Vec::new(), "auto");
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (*flag, it.next()) {
            ("--seconds", Some(n)) => seconds = n.parse().context("--seconds takes a number")?,
            ("--target", Some(t)) => targets.push(t.to_string()),
            ("--engine", Some(e)) => engine = e,
            _ => bail!("{USAGE}"),
        }
    }
    let engine = match engine {
        "libfuzzer" => Engine::LibFuzzer,
        "stable" => Engine::Stable,
        "auto" if nightly_present() => Engine::LibFuzzer,
        "auto" => {
            eprintln!("fuzz: no nightly toolchain: the stable engine runs (blind mutations, no coverage guidance)");
            Engine::Stable
        }
        other => bail!("unknown engine {other:?}\n{USAGE}"),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(Command::new(&cargo).current_dir(root()).args([
        "build",
        "--release",
        "--example",
        "fuzz",
    ]))?;
    let runner = root().join("target/release/examples/fuzz");
    if targets.is_empty() {
        let out = Command::new(&runner).arg("list").output()?;
        targets = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
    }
    if engine == Engine::LibFuzzer {
        ensure_cargo_fuzz()?;
    }
    let mut outcomes = Vec::new();
    for t in &targets {
        outcomes.push(match engine {
            Engine::Stable => run_stable(&runner, t, seconds)?,
            Engine::LibFuzzer => run_libfuzzer(&runner, t, seconds)?,
        });
    }
    println!("\n| target | engine | executions | seconds | executions/s | crashes |");
    println!("|---|---|---:|---:|---:|---:|");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {} |",
            o.target,
            match o.engine {
                Engine::LibFuzzer => "libFuzzer",
                Engine::Stable => "stable",
            },
            o.executions,
            o.seconds,
            o.executions as f64 / o.seconds.max(0.001),
            o.crashes
        );
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crashes > 0)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!("crashes in {}", crashed.join(", "));
    }
    Ok(())
}

fn nightly_present() -> bool {
    Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        util::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

fn run_stable(runner: &std::path::Path, target: &str, seconds: u64) -> Result<Outcome> {
    let crashes = root().join("target/fuzz-crashes").join(target);
    let mut cmd = Command::new(runner);
    cmd.args(["run", target, &seconds.to_string(), "--crashes"])
        .arg(&crashes);
    eprintln!("$ {}", util::show(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", runner.display()))?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("fuzz-result: "))
        .with_context(|| format!("no result from the fuzz runner ({}):\n{text}", out.status))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    Ok(Outcome {
        target: target.to_string(),
        engine: Engine::Stable,
        executions: v["executions"].as_u64().unwrap_or(0),
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
        crashes: v["crashes"].as_u64().unwrap_or(0),
    })
}

fn run_libfuzzer(runner: &std::path::Path, target: &str, seconds: u64) -> Result<Outcome> {
    let corpus = root().join("fuzz/corpus").join(target);
    util::run(Command::new(runner).args(["seeds", target]).arg(&corpus))?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["+nightly", "fuzz", "run", "-O", target])
        .arg(&corpus)
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-print_final_stats=1",
        ]);
    eprintln!("$ {}", util::show(&cmd));
    let started = std::time::Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", util::show(&cmd)))?;
    let elapsed = started.elapsed().as_secs_f64();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let log = root().join("target").join(format!("fuzz-{target}.log"));
    std::fs::write(&log, &text).with_context(|| format!("cannot write {}", log.display()))?;
    let executions = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok());
    let seconds_run = text
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("Done ")?;
            let (_, secs) = rest.split_once(" runs in ")?;
            secs.split_whitespace().next()?.parse::<f64>().ok()
        })
        .unwrap_or(elapsed);
    let crashes = text.matches("Test unit written to").count() as u64;
    if crashes == 0 && !out.status.success() {
        bail!(
            "cargo fuzz run {target} failed ({}), see {}",
            out.status,
            log.display()
        );
    }
    let Some(executions) = executions else {
        bail!(
            "no executions count in libFuzzer's output, see {}",
            log.display()
        );
    };
    for l in text.lines().filter(|l| l.contains("Test unit written to")) {
        eprintln!("fuzz: {target}: {l}");
    }
    Ok(Outcome {
        target: target.to_string(),
        engine: Engine::LibFuzzer,
        executions,
        seconds: seconds_run,
        crashes,
    })
}
