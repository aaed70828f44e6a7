//! `cargo xtask e2e`: the agent in a real VM.
//!
//! So far (the PXE half of the chain is the next step): in a network namespace this task creates
//! — a bridge holding the appliance's address and a tap device for QEMU — `fleetboot serve` runs,
//! and a QEMU VM (TCG) with a blank virtio disk boots the agent's kernel and initramfs directly,
//! with the command line the iPXE script would give it. The agent loads its drivers, brings up
//! the NIC, installs `demo@1` on the disk and reboots; the disk must read back identical to
//! `fleetboot image export demo@1`. Then `demo@2` is assigned and the VM runs again: the agent must
//! reuse far more from the disk than it fetches, and the disk must equal `demo@2`. Last, the
//! appliance must send the installed host to its local disk.

use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:e2:e0:01";
const SERVER: &str = "10.77.0.1";
const VM_IP: &str = "10.77.0.50";

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

    let work = root().join("target/e2e");
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(work.join("tree/etc"))?;
    let store = work.join("store");
    for (version, motd) in [
        (1, "demo image, version 1\n"),
        (2, "demo image, version 2\n"),
    ] {
        fs::write(work.join("tree/etc/motd"), motd)?;
        fs::write(
            work.join("tree/etc/payload"),
            format!("{version}").repeat(300_000),
        )?;
        let img = work.join(format!("demo-{version}.img"));
        util::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "root_owner=0:0", "-U", "clear", "-d"])
                .arg(work.join("tree"))
                .arg(&img)
                .arg("64M"),
        )?;
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
    let first = boot_vm(&ns, &boot, &disk, &work.join("vm-1.log"))?;
    let install_1 = t1.elapsed();
    check_disk(&fleetboot, &store, "demo@1", &disk, &work)?;

    write_config(&work, &boot, "demo@2")?;
    util::run(Command::new("kill").args(["-HUP", &server.0.id().to_string()]))?;
    std::thread::sleep(Duration::from_millis(300));
    let t2 = Instant::now();
    let second = boot_vm(&ns, &boot, &disk, &work.join("vm-2.log"))?;
    let install_2 = t2.elapsed();
    check_disk(&fleetboot, &store, "demo@2", &disk, &work)?;
    let (fetched, reused) = figures(&second)?;
    if reused < 4 * fetched {
        bail!("the reimage fetched {fetched} bytes and reused only {reused}");
    }

    let script = script(&ns)?;
    if script.contains("fleetboot.token=") || !script.contains("sanboot") {
        bail!("an installed host should boot its local disk, got:\n{script}");
    }
    let (f1, _) = figures(&first)?;
    println!(
        "e2e: PASS in {:.0} s — install demo@1 {:.1} s (fetched {f1} bytes), reinstall demo@2 {:.1} s \
         (fetched {fetched}, reused {reused}), then local boot",
        started.elapsed().as_secs_f64(),
        install_1.as_secs_f64(),
        install_2.as_secs_f64()
    );
    Ok(())
}

fn write_config(work: &Path, boot: &Path, image: &str) -> Result<()> {
    fs::write(
        work.join("fleetboot.yaml"),
        format!(
            "interface: br0\nhttp_port: 8080\nboot_dir: {}\nstore: store\nstate_dir: state\ndhcp: {{ mode: off }}\n\
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

fn script(ns: &Netns) -> Result<String> {
    let out = ns
        .cmd("curl")
        .args(["-sf", &format!("http://{SERVER}:8080/boot/{MAC}.ipxe")])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Boots the agent as iPXE would (its script's command line), until the VM reboots.
fn boot_vm(ns: &Netns, boot: &Path, disk: &Path, log: &Path) -> Result<String> {
    let script = script(ns)?;
    let token = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fleetboot.token="))
        .with_context(|| format!("the script does not boot the agent:\n{script}"))?;
    let append = format!(
        "console=ttyS0 quiet fleetboot.url=http://{SERVER}:8080 fleetboot.mac={MAC} fleetboot.token={token} \
         fleetboot.ip={VM_IP} fleetboot.netmask=255.255.255.0 fleetboot.on_failure=poweroff"
    );
    let status = ns
        .cmd("timeout")
        .arg("300")
        .args([
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-m",
            "512",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(boot.join("fleetboot-vmlinuz"))
        .arg("-initrd")
        .arg(boot.join("fleetboot-initrd.img"))
        .args(["-append", &append])
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={MAC}")])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(log)?)
        .stderr(Stdio::null())
        .status()?;
    let text = fs::read_to_string(log).unwrap_or_default();
    let console: String = text
        .lines()
        .filter(|l| l.contains("fleetboot-agent"))
        .map(|l| format!("{l}\n"))
        .collect();
    print!("{console}");
    if !status.success() || !text.contains("installed; rebooting") {
        bail!(
            "the VM did not install ({status}); console in {}",
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
