//! `cargo xtask bench store`: fleetboot's combined image store against casync, WIM (wimlib, LZX),
//! zstd and squashfs (xz, 1 MiB blocks, the three trees in one), on three related real Debian disk
//! images (built and cached by `os_images`); then the fleetboot store after `store compact --all`
//! against them: its size, the pass's time and peak memory, delta fetches and export after it.
//!
//! For each tool, from an empty store directory: store the three images (timed, all three together),
//! measure the store, then export or extract image B (timed). fleetboot's and the other tools' exported
//! B is compared byte for byte with `b.img`; any difference fails the benchmark. A table of the results,
//! fleetboot's ratio to each tool and the issue's targets is printed and written to
//! `target/bench/store/results.md`.
//!
//! Store sizes are apparent sizes: the sum of the lengths of the regular files under the tool's
//! directory, its indexes and manifests included (casync's `.caibx` files, fleetboot's manifests).
//! MB are 10^6 bytes. Times are wall-clock, taken after a `sync` so one tool's write-back does not
//! land in the next one's time, with the images and trees already in the page cache.

use crate::os_images::{self, OsImage};
use crate::util::{root, show};
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: cargo xtask bench store [--variants] [--runs N] [-- IMPORT-OPTION...]

  --runs N          run each tool N times (default 3) and keep its best import and export times
  --qcow2-only      only the qcow2 rows: importing image B from qcow2 vs raw vs qemu-img + raw

  IMPORT-OPTION...  appended to every `fleetboot image import`, e.g. -- --frame-size 262144
  --variants        also run fleetboot with each of --frame-size 65536, 262144, 1048576 and
                    --chunker fastcdc (added to the import options), one fresh store each
";

/// The import options `--variants` tries, one fresh store each.
const VARIANTS: &[&[&str]] = &[
    &["--frame-size", "65536"],
    &["--frame-size", "262144"],
    &["--frame-size", "1048576"],
    &["--chunker", "fastcdc"],
];

/// Each tool's results.
struct Measured {
    /// The tool, as the table shows it.
    tool: String,
    store_bytes: u64,
    /// Storing A, B and C, together.
    import: Duration,
    /// Exporting (or extracting) B.
    export: Duration,
    /// fleetboot only: what a machine holding A fetches to become B, and to become C.
    fetch_a_to_b: Option<u64>,
    fetch_a_to_c: Option<u64>,
}

/// `fleetboot store compact --all` on the main store, and the store after it.
struct Compacted {
    /// The store after compaction and `gc --grace 0s`.
    store_bytes: u64,
    took: Duration,
    /// Peak resident memory of the pass (GNU time's %M).
    peak_rss_kib: u64,
    fetch_a_to_b: u64,
    fetch_a_to_c: u64,
    /// Exporting B afterwards, each run.
    exports: Vec<Duration>,
    /// Where the bytes are after it: packs, manifests (format 2), id tables.
    pack_bytes: u64,
    manifest_bytes: u64,
    id_table_bytes: u64,
}

struct Options {
    variants: bool,
    qcow2_only: bool,
    runs: usize,
    import_args: Vec<String>,
}

/// `None` when help was asked for.
fn parse(args: &[&str]) -> Option<Options> {
    let mut options = Options {
        variants: false,
        qcow2_only: false,
        runs: 3,
        import_args: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(&arg) = args.next() {
        match arg {
            "-h" | "--help" => return None,
            "--variants" => options.variants = true,
            "--qcow2-only" => options.qcow2_only = true,
            "--runs" => options.runs = args.next()?.parse().ok().filter(|&n| n > 0)?,
            // Everything else goes to fleetboot, with or without a `--` before it.
            "--" => {}
            other => options.import_args.push(other.to_string()),
        }
    }
    Some(options)
}

pub fn run(args: &[&str]) -> Result<()> {
    let Some(options) = parse(args) else {
        print!("{USAGE}");
        return Ok(());
    };
    crate::setup::apt_install(crate::setup::BENCH_PACKAGES)?;

    let dir = root().join("target/bench/store");
    let images = os_images::build(&dir)?;
    if images.iter().map(|i| i.name).ne(["a", "b", "c"]) {
        bail!("expected images a, b and c");
    }
    let fleetboot = build_fleetboot()?;
    let qcow2 = |dir: &Path| {
        crate::bench_qcow2::run(
            &fleetboot,
            &images[1].image,
            &dir.join("qcow2"),
            options.runs,
        )
    };
    if options.qcow2_only {
        let report = qcow2(&dir)?;
        println!("\n{report}");
        let results = dir.join("results-qcow2.md");
        fs::write(&results, &report)?;
        eprintln!("bench: wrote {}", results.display());
        return Ok(());
    }

    let work = dir.join("work");
    fresh_dir(&work)?;
    let out = work.join("out-b.img");
    eprintln!("bench: reading the images and trees once, so every tool starts with them cached");
    for image in &images {
        warm(&image.image)?;
        warm(&image.tree)?;
    }

    let main_store = work.join("fleetboot");
    let runs = options.runs;
    let main = best_of(runs, || {
        bench_fleetboot(
            &fleetboot,
            &images,
            &main_store,
            "fleetboot",
            &options.import_args,
            &out,
        )
    })?;
    let (stats, _) =
        timed(fleetboot_cmd(&fleetboot, &main_store).args(["store", "stats", "--json"]))?;
    let casync = best_of(runs, || bench_casync(&images, &work, &out))?;
    let wim = best_of(runs, || bench_wim(&images, &work))?;
    let zstd = best_of(runs, || bench_zstd(&images, &work, &out))?;
    let squashfs = best_of(runs, || bench_squashfs(&images, &work))?;
    let compacted = bench_compaction(&fleetboot, &main_store, &images, &out, runs)?;

    let mut variants = Vec::new();
    if options.variants {
        for (i, variant) in VARIANTS.iter().enumerate() {
            if options.import_args.iter().any(|a| a == variant[0]) {
                eprintln!(
                    "bench: skipping variant {}: the import options already set {}",
                    variant.join(" "),
                    variant[0]
                );
                continue;
            }
            let mut import_args = options.import_args.clone();
            import_args.extend(variant.iter().map(|a| a.to_string()));
            variants.push(best_of(runs, || {
                bench_fleetboot(
                    &fleetboot,
                    &images,
                    &work.join(format!("fleetboot-variant-{i}")),
                    &format!("fleetboot {}", variant.join(" ")),
                    &import_args,
                    &out,
                )
            })?);
        }
    }

    let report = report(
        &images,
        &options,
        &main,
        [&casync, &wim, &zstd, &squashfs],
        &compacted,
        &variants,
        &stats,
    )? + "\n"
        + &qcow2(&dir)?;
    println!("\n{report}");
    let results = dir.join("results.md");
    fs::write(&results, &report).with_context(|| format!("cannot write {}", results.display()))?;
    eprintln!("bench: wrote {}", results.display());
    Ok(())
}

/// `cargo build --release -p fleetboot`; returns the binary.
fn build_fleetboot() -> Result<PathBuf> {
    crate::util::build_release(&["fleetboot"])
}

fn fleetboot_cmd(bin: &Path, store: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--store").arg(store);
    cmd
}

/// fleetboot: import a, b, c (with `import_args`), diff a→b, export b.
fn bench_fleetboot(
    bin: &Path,
    images: &[OsImage],
    store: &Path,
    label: &str,
    import_args: &[String],
    out: &Path,
) -> Result<Measured> {
    eprintln!("bench: {label}");
    fresh_dir(store)?;
    settle()?;
    let mut import = Duration::ZERO;
    for image in images {
        let (printed, took) = timed(
            fleetboot_cmd(bin, store)
                .args(["image", "import", image.name])
                .arg(&image.image)
                .args(import_args),
        )?;
        let printed = printed.trim();
        if !printed.starts_with(&format!("{}@", image.name)) {
            bail!(
                "fleetboot image import printed {printed:?}, expected {}@N",
                image.name
            );
        }
        eprintln!("bench: {printed} in {:.2} s", took.as_secs_f64());
        import += took;
    }
    let store_bytes = tree_bytes(store)?;

    let fetch = fetch_bytes(bin, store, "a", "b")?;

    remove_if_present(out)?;
    settle()?;
    let (_, export) = timed(
        fleetboot_cmd(bin, store)
            .args(["image", "export", "b"])
            .arg(out),
    )?;
    check_identical(&images[1].image, out, label)?;
    remove_if_present(out)?;

    Ok(Measured {
        tool: label.to_string(),
        store_bytes,
        import,
        export,
        fetch_a_to_b: Some(fetch),
        fetch_a_to_c: Some(fetch_bytes(bin, store, "a", "c")?),
    })
}

/// What a machine holding `from` fetches to become `to` (`image diff --json`).
fn fetch_bytes(bin: &Path, store: &Path, from: &str, to: &str) -> Result<u64> {
    let (json, _) = timed(fleetboot_cmd(bin, store).args(["image", "diff", from, to, "--json"]))?;
    let diff: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("fleetboot image diff --json printed no JSON: {json:?}"))?;
    diff.get("fetch_bytes")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("no fetch_bytes in fleetboot image diff --json: {json}"))
}

/// Compacts `store` (every pack), frees the old packs, and measures the store after it: its
/// size, the pass's time and peak memory, the delta fetches and exporting B (`runs` times).
fn bench_compaction(
    bin: &Path,
    store: &Path,
    images: &[OsImage],
    out: &Path,
    runs: usize,
) -> Result<Compacted> {
    eprintln!("bench: fleetboot store compact --all");
    settle()?;
    let rss = store.with_extension("compact-rss");
    let (_, took) = timed(
        Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o"])
            .arg(&rss)
            .arg(bin)
            .arg("--store")
            .arg(store)
            .args(["store", "compact", "--all"]),
    )?;
    let peak_rss_kib = fs::read_to_string(&rss)?
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .context("GNU time wrote no peak memory")?;
    timed(fleetboot_cmd(bin, store).args(["store", "gc", "--grace", "0s"]))?;
    let store_bytes = tree_bytes(store)?;
    let (stats, _) = timed(fleetboot_cmd(bin, store).args(["store", "stats", "--json"]))?;
    let stats: serde_json::Value = serde_json::from_str(&stats).context("store stats --json")?;
    let field = |k: &str| {
        stats[k]
            .as_u64()
            .with_context(|| format!("stats without {k}"))
    };
    let (pack_bytes, manifest_bytes, id_table_bytes) = (
        field("pack_bytes")?,
        field("manifest_bytes")?,
        field("id_table_bytes")?,
    );
    let mut exports = Vec::new();
    for _ in 0..runs.max(1) {
        remove_if_present(out)?;
        settle()?;
        let (_, export) = timed(
            fleetboot_cmd(bin, store)
                .args(["image", "export", "b"])
                .arg(out),
        )?;
        check_identical(&images[1].image, out, "fleetboot after compaction")?;
        exports.push(export);
    }
    remove_if_present(out)?;
    Ok(Compacted {
        store_bytes,
        took,
        peak_rss_kib,
        fetch_a_to_b: fetch_bytes(bin, store, "a", "b")?,
        fetch_a_to_c: fetch_bytes(bin, store, "a", "c")?,
        exports,
        pack_bytes,
        manifest_bytes,
        id_table_bytes,
    })
}

/// squashfs: one filesystem of the three trees (xz, 1 MiB blocks): file-level dedup and strong
/// compression, no block-level random access, no deltas.
fn bench_squashfs(images: &[OsImage], work: &Path) -> Result<Measured> {
    eprintln!("bench: squashfs");
    let dir = work.join("squashfs");
    fresh_dir(&dir)?;
    let fs_file = dir.join("trees.sqsh");
    settle()?;
    let (_, import) = timed(
        Command::new("mksquashfs")
            .args(images.iter().map(|i| &i.tree))
            .arg(&fs_file)
            .args([
                "-comp",
                "xz",
                "-b",
                "1M",
                "-noappend",
                "-quiet",
                "-no-progress",
            ]),
    )?;
    let store_bytes = tree_bytes(&dir)?;
    let out = work.join("out-b-squashfs");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    let tree_b = images[1]
        .tree
        .file_name()
        .context("tree B has no name")?
        .to_string_lossy()
        .into_owned();
    settle()?;
    let (_, export) = timed(
        Command::new("unsquashfs")
            .args(["-q", "-n", "-d"])
            .arg(&out)
            .arg(&fs_file)
            .arg(&tree_b),
    )?;
    if !out.join(&tree_b).join("usr/sbin/sshd").is_file() {
        bail!("unsquashfs of B left no usr/sbin/sshd in {}", out.display());
    }
    fs::remove_dir_all(&out).with_context(|| format!("cannot remove {}", out.display()))?;
    Ok(Measured {
        tool: "squashfs (xz, 1 MiB)".into(),
        store_bytes,
        import,
        export,
        fetch_a_to_b: None,
        fetch_a_to_c: None,
    })
}

/// casync: a chunk store plus one `.caibx` index per image.
fn bench_casync(images: &[OsImage], work: &Path, out: &Path) -> Result<Measured> {
    eprintln!("bench: casync");
    let dir = work.join("casync");
    fresh_dir(&dir)?;
    let mut store_arg = OsString::from("--store=");
    store_arg.push(dir.join("store"));
    let index = |name: &str| dir.join(format!("{name}.caibx"));

    settle()?;
    let mut import = Duration::ZERO;
    for image in images {
        let (_, took) = timed(
            Command::new("casync")
                .arg("make")
                .arg(&store_arg)
                .arg(index(image.name))
                .arg(&image.image),
        )?;
        import += took;
    }
    let store_bytes = tree_bytes(&dir)?;

    remove_if_present(out)?;
    settle()?;
    let (_, export) = timed(
        Command::new("casync")
            .arg("extract")
            .arg(&store_arg)
            .arg(index("b"))
            .arg(out),
    )?;
    check_identical(&images[1].image, out, "casync")?;
    remove_if_present(out)?;

    Ok(Measured {
        tool: "casync".into(),
        store_bytes,
        import,
        export,
        fetch_a_to_b: None,
        fetch_a_to_c: None,
    })
}

/// WIM: one archive of the three trees (not images: WIM stores files), wimlib's default LZX.
fn bench_wim(images: &[OsImage], work: &Path) -> Result<Measured> {
    eprintln!("bench: WIM");
    let dir = work.join("wim");
    fresh_dir(&dir)?;
    let wim = dir.join("store.wim");

    settle()?;
    let mut import = Duration::ZERO;
    for (i, image) in images.iter().enumerate() {
        let verb = if i == 0 { "capture" } else { "append" };
        let (_, took) = timed(
            Command::new("wimlib-imagex")
                .arg(verb)
                .arg(&image.tree)
                .arg(&wim)
                .arg(image.name.to_uppercase()),
        )?;
        import += took;
    }
    let store_bytes = tree_bytes(&dir)?;

    let out = work.join("out-b");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    settle()?;
    let (_, export) = timed(
        Command::new("wimlib-imagex")
            .arg("apply")
            .arg(&wim)
            .arg("2")
            .arg(&out),
    )?;
    if !out.join("usr/sbin/sshd").is_file() {
        bail!(
            "wimlib-imagex apply of B left no usr/sbin/sshd in {}",
            out.display()
        );
    }
    fs::remove_dir_all(&out).with_context(|| format!("cannot remove {}", out.display()))?;

    Ok(Measured {
        tool: "WIM (LZX)".into(),
        store_bytes,
        import,
        export,
        fetch_a_to_b: None,
        fetch_a_to_c: None,
    })
}

/// zstd: each image compressed on its own, `-T0 -3`.
fn bench_zstd(images: &[OsImage], work: &Path, out: &Path) -> Result<Measured> {
    eprintln!("bench: zstd");
    let dir = work.join("zstd");
    fresh_dir(&dir)?;
    let compressed = |name: &str| dir.join(format!("{name}.img.zst"));

    settle()?;
    let mut import = Duration::ZERO;
    for image in images {
        let (_, took) = timed(
            Command::new("zstd")
                .args(["-q", "-T0", "-3"])
                .arg(&image.image)
                .arg("-o")
                .arg(compressed(image.name)),
        )?;
        import += took;
    }
    let store_bytes = tree_bytes(&dir)?;

    remove_if_present(out)?;
    settle()?;
    let (_, export) = timed(
        Command::new("zstd")
            .args(["-q", "-d", "-f"])
            .arg(compressed("b"))
            .arg("-o")
            .arg(out),
    )?;
    check_identical(&images[1].image, out, "zstd")?;
    remove_if_present(out)?;

    Ok(Measured {
        tool: "zstd -T0 -3".into(),
        store_bytes,
        import,
        export,
        fetch_a_to_b: None,
        fetch_a_to_c: None,
    })
}

/// The results as markdown: the images, the comparison, the targets, the variants, fleetboot's stats.
fn report(
    images: &[OsImage],
    options: &Options,
    fleetboot: &Measured,
    [casync, wim, zstd, squashfs]: [&Measured; 4],
    compacted: &Compacted,
    variants: &[Measured],
    stats: &str,
) -> Result<String> {
    let mut s = String::new();
    writeln!(
        s,
        "## Store benchmark: three related Debian bookworm images"
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "A = `debootstrap --variant=minbase bookworm`; B = A + openssh-server, curl, python3-minimal; \
         C = B + less, vim-tiny, iproute2, procps + the pending security updates. Each is a 2 GiB ext4 \
         image made with `mkfs.ext4 -d`."
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "| image | size (MB) | allocated (MB) | files in the tree (MB) |"
    )?;
    writeln!(s, "|---|---:|---:|---:|")?;
    for image in images {
        let meta = fs::metadata(&image.image)
            .with_context(|| format!("cannot stat {}", image.image.display()))?;
        writeln!(
            s,
            "| {} | {} | {} | {} |",
            image.name.to_uppercase(),
            mb(meta.len()),
            mb(allocated_bytes(&meta)),
            mb(tree_bytes(&image.tree)?)
        )?;
    }
    writeln!(s)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let import_options = if options.import_args.is_empty() {
        "none".to_string()
    } else {
        format!("`{}`", options.import_args.join(" "))
    };
    writeln!(
        s,
        "{cores} cores. Store size: the sum of the file lengths in the store directory, indexes and \
         manifests included; MB = 10^6 bytes. Import: all three images, wall-clock; WIM captures the \
         trees, the others the images. Export: image B to a file (WIM: to a directory). Times: \
         best of {runs} runs, each from an empty store. fleetboot import options: {import_options}.",
        runs = options.runs
    )?;
    writeln!(s)?;

    writeln!(
        s,
        "| tool | store (MB) | import A+B+C (s) | export B (s) | fleetboot / it: store | import | export |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|")?;
    writeln!(
        s,
        "| {} | {} | {} | {} | | | |",
        fleetboot.tool,
        mb(fleetboot.store_bytes),
        secs(fleetboot.import),
        secs(fleetboot.export)
    )?;
    for anchor in [casync, wim, zstd, squashfs] {
        writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |",
            anchor.tool,
            mb(anchor.store_bytes),
            secs(anchor.import),
            secs(anchor.export),
            fleetboot.store_bytes as f64 / anchor.store_bytes as f64,
            fleetboot.import.as_secs_f64() / anchor.import.as_secs_f64(),
            fleetboot.export.as_secs_f64() / anchor.export.as_secs_f64()
        )?;
    }
    writeln!(s)?;
    if let Some(fetch) = fleetboot.fetch_a_to_b {
        writeln!(
            s,
            "fleetboot: a machine holding A fetches {} MB to become B (`image diff a b`).",
            mb(fetch)
        )?;
        writeln!(s)?;
    }

    let export_bound = zstd.export.mul_f64(1.5);
    let targets = [
        (
            "store ≤ WIM LZX",
            fleetboot.store_bytes <= wim.store_bytes,
            format!("{} MB", mb(fleetboot.store_bytes)),
            format!("{} MB", mb(wim.store_bytes)),
        ),
        (
            "store ≤ 80 MB (aim)",
            fleetboot.store_bytes <= 80_000_000,
            format!("{} MB", mb(fleetboot.store_bytes)),
            "80.0 MB".to_string(),
        ),
        (
            "import ≤ zstd -T0 -3",
            fleetboot.import <= zstd.import,
            format!("{} s", secs(fleetboot.import)),
            format!("{} s", secs(zstd.import)),
        ),
        (
            "export B ≤ 1.5 × zstd -d",
            fleetboot.export <= export_bound,
            format!("{} s", secs(fleetboot.export)),
            format!("{} s", secs(export_bound)),
        ),
    ];
    targets_table(&mut s, &targets)?;

    compaction_report(&mut s, fleetboot, compacted, [casync, wim, zstd, squashfs])?;

    if !variants.is_empty() {
        writeln!(s)?;
        writeln!(s, "### fleetboot variants")?;
        writeln!(s)?;
        writeln!(
            s,
            "Each from an empty store, with the import options above plus the ones named."
        )?;
        writeln!(s)?;
        writeln!(
            s,
            "| fleetboot | store (MB) | import A+B+C (s) | export B (s) | fetch A→B (MB) |"
        )?;
        writeln!(s, "|---|---:|---:|---:|---:|")?;
        for run in std::iter::once(fleetboot).chain(variants) {
            writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                run.tool,
                mb(run.store_bytes),
                secs(run.import),
                secs(run.export),
                run.fetch_a_to_b.map_or_else(|| "?".to_string(), mb)
            )?;
        }
    }

    writeln!(s)?;
    writeln!(
        s,
        "`fleetboot store stats --json` after importing A, B and C:"
    )?;
    writeln!(s)?;
    writeln!(s, "```json\n{}\n```", stats.trim())?;
    Ok(s)
}

/// The compaction's section: the store after it against every anchor, the pass itself, the
/// delta fetches and exports after it, and the compaction issue's targets.
fn compaction_report(
    s: &mut String,
    fleetboot: &Measured,
    c: &Compacted,
    [casync, wim, zstd, squashfs]: [&Measured; 4],
) -> Result<()> {
    writeln!(s)?;
    writeln!(s, "### After `fleetboot store compact --all`")?;
    writeln!(s)?;
    writeln!(
        s,
        "The main store above, compacted (chunks regrouped by the images using them, 16 MiB frames, \
         zstd 19), then `store gc --grace 0s`. Export B: each of {} runs (not the best).",
        c.exports.len()
    )?;
    writeln!(s)?;
    writeln!(s, "| store | MB | compacted / it |")?;
    writeln!(s, "|---|---:|---:|")?;
    writeln!(s, "| fleetboot, compacted | {} | |", mb(c.store_bytes))?;
    for other in [fleetboot, squashfs, wim, casync] {
        writeln!(
            s,
            "| {} | {} | {:.2} |",
            other.tool,
            mb(other.store_bytes),
            c.store_bytes as f64 / other.store_bytes as f64
        )?;
    }
    writeln!(s)?;
    let exports: Vec<String> = c.exports.iter().map(|d| secs(*d)).collect();
    let slowest = c.exports.iter().max().copied().unwrap_or_default();
    let before_b = fleetboot.fetch_a_to_b.unwrap_or(0);
    let before_c = fleetboot.fetch_a_to_c.unwrap_or(0);
    writeln!(
        s,
        "Compaction: {} s, peak memory {:.0} MiB. Fetch A→B: {} MB before, {} MB after; A→C: {} MB \
         before, {} MB after. Export B after: {} s.",
        secs(c.took),
        c.peak_rss_kib as f64 / 1024.0,
        mb(before_b),
        mb(c.fetch_a_to_b),
        mb(before_c),
        mb(c.fetch_a_to_c),
        exports.join(", ")
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "Where the compacted store's bytes are: packs {} MB, manifests (format 2: ids by row of \
         the packs' id tables) {} MB, id tables (each id once per store) {} MB.",
        mb(c.pack_bytes),
        mb(c.manifest_bytes),
        mb(c.id_table_bytes)
    )?;
    writeln!(s)?;
    let export_bound = zstd.export.mul_f64(1.5);
    let targets = [
        (
            "store ≤ 72 MB",
            c.store_bytes <= 72_000_000,
            format!("{} MB", mb(c.store_bytes)),
            "72.0 MB".to_string(),
        ),
        (
            "store ≤ squashfs-xz",
            c.store_bytes <= squashfs.store_bytes,
            format!("{} MB", mb(c.store_bytes)),
            format!("{} MB", mb(squashfs.store_bytes)),
        ),
        (
            "store ≤ 65 MB (moonshot)",
            c.store_bytes <= 65_000_000,
            format!("{} MB", mb(c.store_bytes)),
            "65.0 MB".to_string(),
        ),
        (
            "fetch A→B ≤ 1.1 × before",
            c.fetch_a_to_b * 10 <= before_b * 11,
            format!("{} MB", mb(c.fetch_a_to_b)),
            format!("{} MB", mb(before_b * 11 / 10)),
        ),
        (
            "fetch A→C ≤ 1.1 × before",
            c.fetch_a_to_c * 10 <= before_c * 11,
            format!("{} MB", mb(c.fetch_a_to_c)),
            format!("{} MB", mb(before_c * 11 / 10)),
        ),
        (
            "export B (slowest run) ≤ 1.5 × zstd -d",
            slowest <= export_bound,
            format!("{} s", secs(slowest)),
            format!("{} s", secs(export_bound)),
        ),
    ];
    targets_table(s, &targets)?;
    Ok(())
}

/// A table of targets: (what, met, fleetboot's figure, the bound).
fn targets_table(s: &mut String, targets: &[(&str, bool, String, String)]) -> Result<()> {
    writeln!(s, "| target | fleetboot | bound | result |")?;
    writeln!(s, "|---|---:|---:|---|")?;
    for (target, met, have, bound) in targets {
        let result = if *met { "PASS" } else { "MISS" };
        writeln!(s, "| {target} | {have} | {bound} | {result} |")?;
    }
    Ok(())
}

pub(crate) fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Runs `cmd` with its output captured; fails with that output if it exits non-zero.
/// Returns what it printed on stdout and how long it took.
pub(crate) fn timed(cmd: &mut Command) -> Result<(String, Duration)> {
    eprintln!("$ {}", show(cmd));
    let started = Instant::now();
    let output = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    let took = started.elapsed();
    if !output.status.success() {
        bail!(
            "{} failed: {}\n{}{}",
            show(cmd),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((String::from_utf8_lossy(&output.stdout).into_owned(), took))
}

/// Flushes dirty pages, so the next timing does not pay for the previous tool's writes.
pub(crate) fn settle() -> Result<()> {
    let status = Command::new("sync").status().context("cannot run sync")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    Ok(())
}

/// Fails unless `actual` holds exactly the bytes of `expected`; compares as a stream.
pub(crate) fn check_identical(expected: &Path, actual: &Path, tool: &str) -> Result<()> {
    let open = |path: &Path| {
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))
    };
    let (mut want, mut have) = (open(expected)?, open(actual)?);
    let (want_len, have_len) = (want.metadata()?.len(), have.metadata()?.len());
    if want_len != have_len {
        bail!(
            "{tool}: {} holds {have_len} bytes, {} holds {want_len}: the export is wrong",
            actual.display(),
            expected.display()
        );
    }
    let mut want_buf = vec![0u8; 1 << 20];
    let mut have_buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut want, &mut want_buf)
            .with_context(|| format!("cannot read {}", expected.display()))?;
        let m = read_full(&mut have, &mut have_buf)
            .with_context(|| format!("cannot read {}", actual.display()))?;
        if want_buf[..n] != have_buf[..m] {
            let at = want_buf[..n]
                .iter()
                .zip(&have_buf[..m])
                .position(|(a, b)| a != b)
                .unwrap_or(n.min(m));
            bail!(
                "{tool}: {} differs from {} at byte {}: the export is wrong",
                actual.display(),
                expected.display(),
                offset + at as u64
            );
        }
        if n == 0 {
            eprintln!(
                "bench: {tool}: exported B is identical to {}",
                expected.display()
            );
            return Ok(());
        }
        offset += n as u64;
    }
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_full(file: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Reads every regular file under `path` once (device nodes and symlinks are skipped).
pub(crate) fn warm(path: &Path) -> Result<()> {
    let meta =
        fs::symlink_metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    if meta.is_dir() {
        for entry in
            fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
        {
            warm(&entry?.path())?;
        }
    } else if meta.is_file() {
        let mut file =
            fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        while read_full(&mut file, &mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?
            > 0
        {}
    }
    Ok(())
}

/// The apparent size of `path`: the lengths of the regular files under it, summed.
fn tree_bytes(path: &Path) -> Result<u64> {
    let meta =
        fs::symlink_metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    if meta.is_dir() {
        let mut total = 0;
        for entry in
            fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
        {
            total += tree_bytes(&entry?.path())?;
        }
        Ok(total)
    } else if meta.is_file() {
        Ok(meta.len())
    } else {
        Ok(0)
    }
}

/// The bytes a file occupies on disk (its holes excluded).
fn allocated_bytes(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

/// Makes `dir` an empty directory.
/// Runs a tool's benchmark `runs` times (each from an empty store) and keeps its best times: a
/// single run on a 2-core machine jitters by ±20 %, which is more than some of the margins.
fn best_of(runs: usize, mut bench: impl FnMut() -> Result<Measured>) -> Result<Measured> {
    let mut best = bench()?;
    for _ in 1..runs {
        let next = bench()?;
        if next.store_bytes != best.store_bytes {
            eprintln!(
                "bench: {}: store size differs between runs ({} vs {} bytes)",
                best.tool, best.store_bytes, next.store_bytes
            );
        }
        best.import = best.import.min(next.import);
        best.export = best.export.min(next.export);
    }
    Ok(best)
}

pub(crate) fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}
