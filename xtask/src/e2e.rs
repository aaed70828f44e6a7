//! `cargo xtask e2e`: the whole chain in a real VM, through its own firmware's PXE.
//!
//! In a network namespace this task creates — a bridge holding the appliance's address and a tap
//! device for QEMU — `fleetboot serve` runs in full DHCP mode (router advertisements on), and a
//! QEMU VM (SeaBIOS + the iPXE ROM of its virtio NIC, TCG) with a blank disk network-boots:
//! 1. `demo@1` is assigned: the VM gets the agent, is imaged, reboots, boots its disk and prints
//!    `demo@1`'s marker; the disk reads back identical to `fleetboot image export demo@1`;
//! 2. `demo@2` (a small change) is assigned: the VM is reimaged — reusing far more from its disk
//!    than it fetches — and prints `demo@2`'s marker;
//! 3. it boots once more: straight to its disk, no agent.
//!
//! It ends with one summary line (times per phase, bytes fetched and reused).

use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:e2:e0:01";
const SERVER: &str = "10.77.0.1";

/// The namespace, deleted (with what runs in it) on drop.
struct Netns(String);

impl Netns {
    fn create() -> Result<Netns> {
        let name = format!("fbe2e{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ns = Netns(name);
        for args in [
            vec!["netns", "add", &ns.0],
            vec!["-n", &ns.0, "link", "add", "br0", "type", "bridge"],
            vec!["-n", &ns.0, "addr", "add", "10.77.0.1/24", "dev", "br0"],
            vec!["-n", &ns.0, "link", "set", "br0", "up"],
            vec!["-n", &ns.0, "link", "set", "lo", "up"],
            vec!["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"],
            vec!["-n", &ns.0, "link", "set", "tap0", "master", "br0"],
            vec!["-n", &ns.0, "link", "set", "tap0", "up"],
        ] {
            util::run(Command::new("ip").args(&args))?;
        }
        Ok(ns)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(_args: &[&str]) -> Result<()> {
    crate::setup::apt_install(&[
        ("qemu-system-x86", "qemu-system-x86_64"),
        ("e2fsprogs", "mkfs.ext4"),
    ])?;
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(Command::new(&cargo).current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "fleetboot",
    ]))?;
    let fleetboot = root().join("target/release/fleetboot");
    let boot = root().join("boot");
    crate::initramfs::build(&boot)?;
    crate::boot_assets::install(&boot)?;

    let work = root().join("target/e2e");
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(&work)?;
    let store = work.join("store");
    for (name, extra) in [("demo@1", ""), ("demo@2", "second version\n")] {
        let img = crate::images::build(&work, name, extra)?;
        util::run(
            Command::new(&fleetboot)
                .arg("--store")
                .arg(&store)
                .args(["image", "import", "demo"])
                .arg(&img),
        )?;
    }

    let ns = Netns::create()?;
    write_config(&work, &boot, "demo@1")?;
    let log = fs::File::create(work.join("serve.log"))?;
    let server = Daemon(
        ns.cmd(fleetboot.to_str().context("path")?)
            .current_dir(&work)
            .args(["serve", "--config", "fleetboot.yaml"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    wait_http(&ns)?;

    let disk = work.join("disk.img");
    fs::File::create(&disk)?.set_len(256 << 20)?;
    let t1 = Instant::now();
    let first = boot_vm(&ns, &disk, &work.join("vm-1.log"), "demo@1", true)?;
    let install_1 = t1.elapsed();
    check_disk(&fleetboot, &store, "demo@1", &disk, &work)?;

    write_config(&work, &boot, "demo@2")?;
    util::run(Command::new("kill").args(["-HUP", &server.0.id().to_string()]))?;
    std::thread::sleep(Duration::from_millis(300));
    let t2 = Instant::now();
    let second = boot_vm(&ns, &disk, &work.join("vm-2.log"), "demo@2", true)?;
    let install_2 = t2.elapsed();
    check_disk(&fleetboot, &store, "demo@2", &disk, &work)?;
    let (fetched, reused) = figures(&second)?;
    if reused < 4 * fetched {
        bail!("the reimage fetched {fetched} bytes and reused only {reused}");
    }

    let t3 = Instant::now();
    boot_vm(&ns, &disk, &work.join("vm-3.log"), "demo@2", false)?;
    let local = t3.elapsed();
    let (f1, _) = figures(&first)?;
    println!(
        "e2e: PASS in {:.0} s — PXE + install demo@1 + boot it {:.1} s (fetched {f1} bytes), reimage to demo@2 \
         + boot it {:.1} s (fetched {fetched}, reused {reused}), local boot {:.1} s",
        started.elapsed().as_secs_f64(),
        install_1.as_secs_f64(),
        install_2.as_secs_f64(),
        local.as_secs_f64()
    );
    Ok(())
}

fn write_config(work: &Path, boot: &Path, image: &str) -> Result<()> {
    fs::write(
        work.join("fleetboot.yaml"),
        format!(
            "interface: br0\nhttp_port: 8080\nboot_dir: {}\nstore: store\nstate_dir: state\nrouter_advertisements: true\n\
             dhcp: {{ mode: full, range: [10.77.0.100, 10.77.0.150], router: 10.77.0.1 }}\n\
             hosts:\n  \"{MAC}\": {{ image: {image}, hostname: e2e-01 }}\n",
            boot.display()
        ),
    )?;
    Ok(())
}

fn wait_http(ns: &Netns) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let ok = ns
            .cmd("curl")
            .args([
                "-sf",
                "-o",
                "/dev/null",
                &format!("http://{SERVER}:8080/metrics"),
            ])
            .status()?;
        if ok.success() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("fleetboot serve did not answer")
}

/// Powers the VM on: it network-boots (NIC first, disk second) and runs until it powers off —
/// which the demo image does once it has printed its marker. Returns the serial console.
fn boot_vm(
    ns: &Netns,
    disk: &Path,
    log: &Path,
    marker: &str,
    expect_agent: bool,
) -> Result<String> {
    let status = ns
        .cmd("timeout")
        .arg("400")
        .args([
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-m",
            "768",
            "-nographic",
        ])
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={MAC},bootindex=1"),
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
        .args(["-device", "virtio-blk-pci,drive=d0,bootindex=2"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(log)?)
        .stderr(Stdio::null())
        .status()?;
    let text = String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned();
    let console: String = text
        .lines()
        .filter(|l| l.contains("fleetboot-agent") || l.contains("FLEETBOOT-MARKER"))
        .map(|l| {
            format!(
                "{}\n",
                l.trim_start_matches(|c: char| c.is_control() || c == '[' || c == '?')
            )
        })
        .collect();
    print!("{console}");
    let agent_ran = text.contains("fleetboot-agent: starting");
    if !status.success() {
        bail!(
            "the VM did not power off by itself ({status}); console in {}",
            log.display()
        );
    }
    if expect_agent && !text.contains("installed; rebooting") {
        bail!("the agent did not install; console in {}", log.display());
    }
    if !expect_agent && agent_ran {
        bail!(
            "the agent ran although the host was installed; console in {}",
            log.display()
        );
    }
    if !text.contains(&format!("FLEETBOOT-MARKER {marker}")) {
        bail!(
            "the VM did not boot {marker} from its disk; console in {}",
            log.display()
        );
    }
    Ok(text)
}

fn check_disk(fleetboot: &Path, store: &Path, image: &str, disk: &Path, work: &Path) -> Result<()> {
    let exported: PathBuf = work.join("expected.img");
    let _ = fs::remove_file(&exported);
    util::run(
        Command::new(fleetboot)
            .arg("--store")
            .arg(store)
            .args(["image", "export", image])
            .arg(&exported),
    )?;
    let want = fs::read(&exported)?;
    let got = fs::read(disk)?;
    if got.len() < want.len() || got[..want.len()] != want[..] {
        bail!("the VM's disk does not read back as {image}");
    }
    eprintln!("e2e: the VM's disk reads back identical to {image}");
    Ok(())
}

/// (fetched, reused) from the agent's console line.
fn figures(console: &str) -> Result<(u64, u64)> {
    let line = console
        .lines()
        .find(|l| l.contains(" written to "))
        .context("no install report on the console")?;
    let num = |key: &str| -> Result<u64> {
        let at = line
            .find(key)
            .with_context(|| format!("no {key:?} in {line:?}"))?;
        Ok(line[..at].split_whitespace().last().unwrap_or("").parse()?)
    };
    Ok((num(" bytes, reused")?, num(" bytes, digest")?))
}
