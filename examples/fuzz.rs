//! The stable-toolchain fuzz runner behind `cargo xtask fuzz` (see `fleetboot::fuzz`):
//!
//! ```text
//! fuzz run TARGET SECONDS [--crashes DIR] [--seed N]   mutate the target's seeds for SECONDS
//! fuzz seeds TARGET DIR                                 write the target's seeds (a libFuzzer corpus)
//! fuzz list                                             the targets' names, one a line
//! ```
//!
//! `run` ends with one line, `fuzz-result: {json}` (target, executions, seconds, crashes), and
//! exits 1 if any input crashed the target; the first crashing inputs are written to DIR.

use anyhow::{bail, Context, Result};
use fleetboot::fuzz::{self, Budget};
use std::path::PathBuf;
use std::time::Duration;

fn main() {
    if let Err(e) = run() {
        eprintln!("fuzz: error: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let target = |name: &str| {
        fuzz::target(name).with_context(|| {
            let names: Vec<&str> = fuzz::TARGETS.iter().map(|t| t.name).collect();
            format!("no fuzz target {name:?} (there are {})", names.join(", "))
        })
    };
    match args.as_slice() {
        ["list"] => {
            for t in fuzz::TARGETS {
                println!("{}", t.name);
            }
            Ok(())
        }
        ["seeds", name, dir] => {
            let t = target(name)?;
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {dir:?}"))?;
            for (i, seed) in (t.seeds)().iter().enumerate() {
                let path = dir.join(format!("seed-{i}"));
                std::fs::write(&path, seed).with_context(|| format!("cannot write {path:?}"))?;
            }
            Ok(())
        }
        ["run", name, seconds, rest @ ..] => {
            let t = target(name)?;
            let seconds: u64 = seconds.parse().context("SECONDS must be a whole number")?;
            let (mut crashes_dir, mut seed) = (None, 0x5eed_u64);
            let mut rest = rest.iter();
            while let Some(flag) = rest.next() {
                match (*flag, rest.next()) {
                    ("--crashes", Some(dir)) => crashes_dir = Some(PathBuf::from(dir)),
                    ("--seed", Some(n)) => seed = n.parse().context("--seed takes a number")?,
                    _ => bail!("unknown argument {flag:?}"),
                }
            }
            // Crashes are counted and kept; the default hook would print each one.
            std::panic::set_hook(Box::new(|_| {}));
            let r = fuzz::run(t, Budget::Time(Duration::from_secs(seconds)), seed);
            let _ = std::panic::take_hook();
            if let Some(dir) = &crashes_dir {
                if !r.crashes.is_empty() {
                    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {dir:?}"))?;
                }
                for (i, (input, why)) in r.crashes.iter().enumerate() {
                    let path = dir.join(format!("crash-{i}"));
                    std::fs::write(&path, input).with_context(|| format!("cannot write {path:?}"))?;
                    eprintln!("fuzz: {name}: {} crashed it: {why}", path.display());
                }
            }
            println!(
                "fuzz-result: {}",
                serde_json::json!({
                    "target": name,
                    "engine": "stable",
                    "executions": r.executions,
                    "seconds": r.elapsed.as_secs_f64(),
                    "crashes": r.crash_count,
                })
            );
            if r.crash_count > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        _ => bail!("usage: fuzz run TARGET SECONDS [--crashes DIR] [--seed N] | fuzz seeds TARGET DIR | fuzz list"),
    }
}
