//! The qcow2 rows of `cargo xtask bench store` (alone: `cargo xtask bench store --qcow2-only`):
//! importing a disk from qcow2 (plain, zlib and zstd clusters, made from the raw image by
//! `qemu-img convert`) against importing the same disk raw, and against what an operator would do
//! without a qcow2 reader: `qemu-img convert -O raw` to a temporary file, then a raw import. Every
//! import goes into a fresh store after a `sync`; each case runs `runs` times and the table shows
//! the median and the spread (min–max). Every store must end up holding the same image: the same
//! digest and size as the raw import, or the benchmark fails.

use crate::bench_store::{fresh_dir, remove_if_present, settle, timed};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The qcow2 flavours: name and `qemu-img convert` options.
const FLAVOURS: &[(&str, &[&str])] = &[
    ("qcow2", &[]),
    ("qcow2 zlib", &["-c"]),
    ("qcow2 zstd", &["-c", "-o", "compression_type=zstd"]),
];

/// Times in seconds, sorted.
struct Spread(Vec<f64>);

impl Spread {
    fn median(&self) -> f64 {
        self.0[self.0.len() / 2]
    }
    fn show(&self) -> String {
        format!(
            "{:.2} s ({:.2}–{:.2})",
            self.median(),
            self.0[0],
            self.0[self.0.len() - 1]
        )
    }
}

/// Runs the comparison on `raw` in `work`; returns the report section (markdown).
pub fn run(fleetboot: &Path, raw: &Path, work: &Path, runs: usize) -> Result<String> {
    fresh_dir(work)?;
    let store = work.join("store");
    let import = |file: &Path| -> Result<(Duration, String)> {
        fresh_dir(&store)?;
        settle()?;
        let (_, took) = timed(
            Command::new(fleetboot)
                .arg("--store")
                .arg(&store)
                .args(["image", "import", "disk"])
                .arg(file),
        )?;
        let (shown, _) = timed(
            Command::new(fleetboot)
                .arg("--store")
                .arg(&store)
                .args(["image", "show", "disk@1", "--json"]),
        )?;
        let v: serde_json::Value = serde_json::from_str(&shown).context("image show --json")?;
        let meta = &v["metadata"];
        Ok((took, format!("{} {}", meta["digest"], meta["size"])))
    };
    let spread = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        Spread(times)
    };

    let mut raw_times = Vec::new();
    let mut want = String::new();
    for _ in 0..runs {
        let (took, identity) = import(raw)?;
        raw_times.push(took.as_secs_f64());
        want = identity;
    }
    let raw_spread = spread(raw_times);

    let mut s = String::new();
    writeln!(
        s,
        "### Importing from qcow2 ({} runs each; median, min–max)\n",
        runs
    )?;
    writeln!(
        s,
        "The same 2 GiB disk ({}), raw: {}. Targets: a qcow2 import ≤ 1.2 × the raw import, and \
         faster than `qemu-img convert -O raw` + a raw import.\n",
        raw.display(),
        raw_spread.show()
    )?;
    writeln!(
        s,
        "| source | file MB | import | ÷ raw | convert + raw import | import ÷ that |"
    )?;
    writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    let mut missed = Vec::new();
    for (name, options) in FLAVOURS {
        let qcow2 = work.join(format!("{}.qcow2", name.replace(' ', "-")));
        remove_if_present(&qcow2)?;
        let mut convert = Command::new("qemu-img");
        convert
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .args(*options)
            .arg(raw)
            .arg(&qcow2);
        timed(&mut convert)?;
        let file_mb = std::fs::metadata(&qcow2)?.len() as f64 / 1e6;
        let (mut direct, mut via_raw) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (took, identity) = import(&qcow2)?;
            if identity != want {
                bail!("{name}: the store holds {identity}, the raw import {want}");
            }
            direct.push(took.as_secs_f64());
            let tmp = work.join("converted.raw");
            remove_if_present(&tmp)?;
            settle()?;
            let (_, converted) = timed(
                Command::new("qemu-img")
                    .args(["convert", "-q", "-O", "raw"])
                    .arg(&qcow2)
                    .arg(&tmp),
            )?;
            let (took, identity) = import(&tmp)?;
            if identity != want {
                bail!("{name} via qemu-img: the store holds {identity}, the raw import {want}");
            }
            via_raw.push((converted + took).as_secs_f64());
            remove_if_present(&tmp)?;
        }
        let (direct, via_raw) = (spread(direct), spread(via_raw));
        let ratio = direct.median() / raw_spread.median();
        let vs = direct.median() / via_raw.median();
        if ratio > 1.2 {
            missed.push(format!("{name}: {ratio:.2} × raw"));
        }
        if vs >= 1.0 {
            missed.push(format!("{name}: {vs:.2} × convert + import"));
        }
        writeln!(
            s,
            "| {name} | {file_mb:.0} | {} | {ratio:.2} | {} | {vs:.2} |",
            direct.show(),
            via_raw.show()
        )?;
        remove_if_present(&qcow2)?;
    }
    writeln!(
        s,
        "\nEvery import above holds the same image as the raw import (digest and size checked). \
         Targets {}.",
        if missed.is_empty() {
            "met".to_string()
        } else {
            format!("missed: {}", missed.join("; "))
        }
    )?;
    Ok(s)
}
