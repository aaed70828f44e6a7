//! `cargo xtask e2e`: the whole chain in a real VM, through its own firmware's PXE.
//!
//! In the switch namespace of a network lab this task creates (`fleetboot-lab`) — a bridge holding
//! the appliance's address and a tap device for QEMU — `fleetboot serve` runs in full DHCP mode (router advertisements on), and a
//! QEMU VM (SeaBIOS + the iPXE ROM of its virtio NIC, TCG) with a blank disk network-boots:
//! 1. `demo@1` is assigned: the VM gets the agent, is imaged, reboots, boots its disk and prints
//!    `demo@1`'s marker; the disk reads back identical to `fleetboot image export demo@1`;
//! 2. `demo@2` (a small change) is assigned: the VM is reimaged — reusing far more from its disk
//!    than it fetches — and prints `demo@2`'s marker;
//! 3. it boots once more: straight to its disk, no agent.
//!
//! It ends with one summary line (times per phase, bytes fetched and reused).
//!
//! Then the same again under UEFI: OVMF (NIC ROM removed, so its own PXE fetches snponly.efi over
//! TFTP, then iPXE takes over) with an NVMe disk; its local boot is iPXE chaining
//! `fleetboot-localboot.efi`, a standalone GRUB that chainloads the disk's `\EFI\BOOT\BOOTX64.EFI`.
//! `--bios-only` skips the UEFI run.
//!
//! Then the BIOS machine is retired (`fleetboot host retire`): its next boot wipes its disk and
//! powers it off, and the disk's first and last 16 MiB must read as zeros.
//!
//! Last, a machine the YAML does not list (`unknown_hosts: discover`), with an NVMe and a virtio
//! disk of different sizes and serials and its own SMBIOS identity, network-boots: the agent
//! inspects it and powers it off, and `fleetboot host show --json` must list what QEMU gave it.
//! A discovery rule then enrols it, its group's disk hints picking the NVMe disk: it is installed
//! there and boots it. Listed by hand and retired, it has both disks wiped.

use crate::initramfs::Arch;
use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use fleetboot_lab::{Daemon, Host, Lab};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:e2:e0:01";
const SERVER: &str = "10.77.0.1";

pub fn run(args: &[&str]) -> Result<()> {
    let uefi = match args {
        [] => true,
        ["--bios-only"] => false,
        ["--os", "debian"] => return crate::e2e_debian::run(true),
        ["--os", "debian", "--bios-only"] => return crate::e2e_debian::run(false),
        ["--http-boot"] => return crate::e2e_http_boot::run(),
        ["--secure-boot"] => return crate::e2e_secure_boot::run(),
        ["--arch", "arm64"] => return crate::e2e_arm64::run(),
        _ => bail!(
            "usage: cargo xtask e2e [--os debian] [--bios-only] | --http-boot | --secure-boot \
             | --arch arm64"
        ),
    };
    let started = Instant::now();
    let (fleetboot, boot) = prepare()?;

    let work = root().join("target/e2e");
    let store = demo_store(&fleetboot, &work, 2)?;

    let net = vm_network("e2e")?;
    let mut lab = Rig {
        ns: net.switch().clone(),
        work: work.clone(),
        boot: boot.clone(),
        fleetboot: fleetboot.clone(),
        store,
        assigned: vec![(Firmware::Bios, "demo@1"), (Firmware::Uefi, "demo@1")],
        server: None,
        unknown: Unknown::Unlisted,
    };
    lab.write_config()?;
    lab.server = Some(serve(&lab.ns, &fleetboot, &work)?);
    let mut summary = vec![lab.scenario(Firmware::Bios)?];
    if uefi {
        summary.push(lab.scenario(Firmware::Uefi)?);
    }
    summary.push(lab.retire(Firmware::Bios)?);
    summary.push(lab.unknown_machine()?);
    println!(
        "e2e: PASS in {:.0} s — {}",
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
    Ok(())
}

/// BIOS: SeaBIOS, then the iPXE ROM of the virtio NIC (the iPXE branch of the boot decision).
/// UEFI: OVMF with the NIC's ROM removed, so its own PXE fetches snponly.efi over TFTP first.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Firmware {
    Bios,
    Uefi,
}

impl Firmware {
    fn mac(self) -> &'static str {
        match self {
            Firmware::Bios => MAC,
            Firmware::Uefi => "52:54:00:e2:e0:02",
        }
    }
}

/// The run's state: the switch namespace (where the appliance and the VMs' tap live), files, and
/// what each VM is assigned.
struct Rig {
    ns: Host,
    work: PathBuf,
    boot: PathBuf,
    fleetboot: PathBuf,
    store: PathBuf,
    assigned: Vec<(Firmware, &'static str)>,
    server: Option<Daemon>,
    /// Where the machine nobody listed is in its life.
    unknown: Unknown,
}

/// The machine nobody listed: not in the YAML, then enrolled by a rule, then listed by hand.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unknown {
    Unlisted,
    Ruled,
    Listed,
}

const UNKNOWN: &str = "52:54:00:e2:e0:99";
/// The unknown machine's BMC (ipmi_sim beside it, linked to its IPMI system interface).
const UNKNOWN_BMC: &str = "10.77.0.200";
/// Where that BMC listens for the VM's `ipmi-bmc-extern` link.
const UNKNOWN_BMC_VM_PORT: u16 = 9002;

impl Rig {
    fn write_config(&self) -> Result<()> {
        let hosts: String = self
            .assigned
            .iter()
            .map(|(fw, image)| {
                // The disk by what it is (root device hints): virtio reports itself rotational,
                // NVMe not.
                let rotational = *fw == Firmware::Bios;
                format!(
                    "  \"{}\": {{ image: {image}, hostname: e2e-{fw:?}, \
                     disk: {{ size: \"<=1G\", rotational: {rotational} }} }}\n",
                    fw.mac()
                )
            })
            .collect::<String>()
            + if self.unknown == Unknown::Listed {
                "  \"52:54:00:e2:e0:99\": { image: demo@1, group: lab }\n"
            } else {
                ""
            };
        // The lab group's disk hints pick the unknown machine's NVMe disk; its rule enrols it.
        let rules = match self.unknown {
            Unknown::Unlisted => "",
            _ => {
                "groups:\n  lab: { disk: { rotational: false, size: \">=400M\" } }\n\
                  rules:\n  - { match: { product: \"Rack Server 9000\", memory: \">=512M\" }, \
                  image: demo@1, group: lab }\n"
            }
        };
        fs::write(
            self.work.join("fleetboot.yaml"),
            format!(
                "interface: br0\nhttp_port: 8080\nboot_dir: {}\nstore: store\nstate_dir: state\n\
                 router_advertisements: true\nboot_files: {{ uefi: snponly.efi }}\n\
                 dhcp: {{ mode: full, range: [10.77.0.100, 10.77.0.150], router: 10.77.0.1 }}\n\
                 unknown_hosts: discover\n{rules}hosts:\n{hosts}",
                self.boot.display()
            ),
        )?;
        Ok(())
    }

    /// Retires the machine: its next boot wipes its disk and powers it off; the disk's edges
    /// must read as zeros and the host show `retired`. Returns the summary.
    fn retire(&self, fw: Firmware) -> Result<String> {
        let name = format!("{fw:?}").to_lowercase();
        util::run(Command::new(&self.fleetboot).current_dir(&self.work).args([
            "host",
            "retire",
            "--config",
            "fleetboot.yaml",
            fw.mac(),
        ]))?;
        let disk = self.work.join(format!("disk-{name}.img"));
        let log = self.work.join(format!("vm-{name}-retire.log"));
        let mut qemu = self.ns.cmd("timeout");
        qemu.arg("300");
        vm_args(&mut qemu, fw, fw.mac(), &self.work, &disk, 1024, true)?;
        let (_, took) = run_until_off(&mut qemu, &log, "disks wiped; powering off")?;
        if !edges_zero(&disk)? {
            bail!("{name}: the wiped disk's first or last 16 MiB is not zero");
        }
        let hosts = util::output(Command::new(&self.fleetboot).current_dir(&self.work).args([
            "host",
            "list",
            "--config",
            "fleetboot.yaml",
            "--json",
        ]))?;
        let hosts: serde_json::Value = serde_json::from_str(&hosts)?;
        let retired = hosts
            .as_array()
            .and_then(|h| h.iter().find(|h| h["mac"] == fw.mac()))
            .is_some_and(|h| h["status"] == "retired");
        if !retired {
            bail!("{name}: the host does not show retired");
        }
        Ok(format!(
            "{name} retired: disk wiped and checked, powered off in {:.1} s",
            took.as_secs_f64()
        ))
    }

    /// The life of a machine nobody listed (two disks, its own SMBIOS identity): inspected
    /// and powered off; enrolled by a discovery rule whose group's disk hints pick its NVMe
    /// disk, installed there and booted; then listed by hand and retired: both disks wiped.
    /// Returns the summary.
    fn unknown_machine(&mut self) -> Result<String> {
        let (nvme, virtio) = (
            self.work.join("unknown-nvme.img"),
            self.work.join("unknown-virtio.img"),
        );
        fs::File::create(&nvme)?.set_len(512 << 20)?;
        fs::File::create(&virtio)?.set_len(256 << 20)?;
        // Its BMC: the inspection must find the BMC's LAN address through the kernel's driver.
        fleetboot_lab::ip(&[
            "-n",
            &self.ns.ns,
            "addr",
            "add",
            &format!("{UNKNOWN_BMC}/24"),
            "dev",
            "br0",
        ])?;
        let _bmc = fleetboot_lab::bmc::ipmi_sim(
            &self.ns,
            None,
            &fleetboot_lab::bmc::BmcLogin {
                address: UNKNOWN_BMC.into(),
                port: 623,
                username: "admin".into(),
                password: "lab-only-password".into(),
            },
            Some(UNKNOWN_BMC_VM_PORT),
            &self.work.join("unknown-bmc"),
        )?;
        // Runs the machine until it powers itself off; its console must show `expect`.
        let run = |label: &str, expect: &str| -> Result<(String, Duration)> {
            let log = self.work.join(format!("vm-unknown-{label}.log"));
            let mut qemu = self.ns.cmd("timeout");
            qemu.args([
                "300",
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-smp",
                "2",
                "-m",
                "768",
            ])
            .arg("-nographic")
            .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={UNKNOWN},bootindex=1"),
            ])
            .args([
                "-smbios",
                "type=1,manufacturer=Fleetboot Lab,product=Rack Server 9000,serial=LAB-0099",
            ])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=none,id=d0", nvme.display()))
            .args(["-device", "nvme,drive=d0,serial=FB-NVME-1,bootindex=2"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=d1",
                virtio.display()
            ))
            .args([
                "-device",
                "virtio-blk-pci,drive=d1,serial=FB-VIRTIO-2,bootindex=3",
            ])
            .args(fleetboot_lab::bmc::qemu_bmc_args(UNKNOWN_BMC_VM_PORT));
            run_until_off(&mut qemu, &log, expect)
        };
        let show = || -> Result<serde_json::Value> {
            let out = util::output(Command::new(&self.fleetboot).current_dir(&self.work).args([
                "host",
                "show",
                "--config",
                "fleetboot.yaml",
                "--json",
                UNKNOWN,
            ]))?;
            serde_json::from_str(&out).context("host show --json")
        };

        // 1. Inspected.
        let (_, inspected) = run("inspect", "inspected; powering off")?;
        let v = show()?;
        let inv = &v["inventory"];
        let disk = |serial: &str| {
            inv["disks"]
                .as_array()
                .and_then(|d| d.iter().find(|d| d["serial"] == serial))
                .cloned()
                .unwrap_or_default()
        };
        let (n, d) = (disk("FB-NVME-1"), disk("FB-VIRTIO-2"));
        let checks = [
            (inv["system"]["vendor"] == "Fleetboot Lab", "SMBIOS vendor"),
            (
                inv["system"]["product"] == "Rack Server 9000",
                "SMBIOS product",
            ),
            (inv["system"]["serial"] == "LAB-0099", "SMBIOS serial"),
            (inv["cpus"] == 2, "2 CPUs"),
            (
                inv["memory_bytes"].as_u64().unwrap_or(0) > 512 << 20,
                "memory over 512 MiB",
            ),
            (n["size_bytes"] == 512u64 << 20, "the NVMe disk's size"),
            (
                n["by_path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("pci-") && p.ends_with("-nvme-1")),
                "the NVMe disk's by-path",
            ),
            (d["size_bytes"] == 256u64 << 20, "the virtio disk's size"),
            (d["name"] == "vda", "the virtio disk's name"),
            (
                inv["nics"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|n| n["mac"] == UNKNOWN && n["link"] == true)),
                "its NIC, link up",
            ),
            (
                inv["bmc_address"] == UNKNOWN_BMC
                    && inv["bmc_mac"] == fleetboot_lab::bmc::BMC_LAN_MAC,
                "its BMC's LAN address and MAC (in-band, /dev/ipmi0)",
            ),
            (
                v["enrol"].as_str().is_some_and(|l| {
                    l.contains(UNKNOWN) && l.contains(&format!("BMC {UNKNOWN_BMC}"))
                }),
                "the enrol line",
            ),
        ];
        for (ok, what) in checks {
            if !ok {
                bail!("the unknown machine's inventory lacks {what}:\n{v}");
            }
        }
        println!("e2e: the unknown machine was inspected: {inv}");

        // 2. A rule enrols it: its group's hints pick the NVMe disk.
        self.unknown = Unknown::Ruled;
        self.reload()?;
        let v = show()?;
        if v["rule"]["image"] != "demo@1" || v["disk_pick"] != "nvme0n1" {
            bail!("the rule and the disk hints do not pick demo@1 on nvme0n1:\n{v}");
        }
        let (console, installed) = run("install", "FLEETBOOT-MARKER demo@1")?;
        if !console.contains("installing demo@1") || !console.contains("on /dev/nvme0n1") {
            bail!("the unknown machine was not installed on its NVMe disk by the rule");
        }

        // 3. Listed by hand, then retired: every fixed disk wiped.
        self.unknown = Unknown::Listed;
        self.reload()?;
        util::run(Command::new(&self.fleetboot).current_dir(&self.work).args([
            "host",
            "retire",
            "--config",
            "fleetboot.yaml",
            UNKNOWN,
        ]))?;
        let (console, wiped) = run("retire", "disks wiped; powering off")?;
        for (path, name) in [(&nvme, "nvme0n1"), (&virtio, "vda")] {
            if !edges_zero(path)? || !console.contains(&format!("wiped {name}")) {
                bail!("the retired machine's {name} was not wiped");
            }
        }
        Ok(format!(
            "unknown machine: inspected {:.1} s (2 disks, serials, SMBIOS, BMC address), installed by rule on \
             the disk its hints pick {:.1} s, retired with both disks wiped {:.1} s",
            inspected.as_secs_f64(),
            installed.as_secs_f64(),
            wiped.as_secs_f64()
        ))
    }

    /// Writes the configuration and has the appliance read it again.
    fn reload(&self) -> Result<()> {
        self.write_config()?;
        match &self.server {
            Some(server) => reread_config(server),
            None => Ok(()),
        }
    }

    fn assign(&mut self, fw: Firmware, image: &'static str) -> Result<()> {
        for a in self.assigned.iter_mut().filter(|a| a.0 == fw) {
            a.1 = image;
        }
        self.reload()
    }

    /// Install demo@1, reimage to demo@2, boot locally; returns the phase summary.
    fn scenario(&mut self, fw: Firmware) -> Result<String> {
        let name = format!("{fw:?}").to_lowercase();
        let disk = self.work.join(format!("disk-{name}.img"));
        fs::File::create(&disk)?.set_len(256 << 20)?;
        let t1 = Instant::now();
        let first = boot_vm(
            &self.ns,
            fw,
            &self.work,
            &disk,
            &self.work.join(format!("vm-{name}-1.log")),
            "demo@1",
            true,
        )?;
        let install_1 = t1.elapsed();
        let hostname = format!("e2e-{fw:?}");
        let (fleetboot, store, work) = (
            self.fleetboot.clone(),
            self.store.clone(),
            self.work.clone(),
        );
        let check = |image| check_disk(&fleetboot, &store, image, &disk, &work, &hostname);
        let first_instance = check("demo@1")?;
        // The install's console log reached the appliance: the agent's lines and the kernel's.
        let log = util::output(Command::new(&self.fleetboot).current_dir(&self.work).args([
            "host",
            "log",
            "--config",
            "fleetboot.yaml",
            fw.mac(),
        ]))?;
        for wanted in ["fleetboot-agent: installing demo@1", "Linux version"] {
            if !log.contains(wanted) {
                bail!("{name}: the install log has no {wanted:?}:\n{log}");
            }
        }

        self.assign(fw, "demo@2")?;
        let t2 = Instant::now();
        let second = boot_vm(
            &self.ns,
            fw,
            &self.work,
            &disk,
            &self.work.join(format!("vm-{name}-2.log")),
            "demo@2",
            true,
        )?;
        let install_2 = t2.elapsed();
        if check("demo@2")? == first_instance {
            bail!("{name}: the reimage kept the instance-id {first_instance}: cloud-init would not run again");
        }
        let (fetched, reused) = figures(&second)?;
        if reused < 4 * fetched {
            bail!("{name}: the reimage fetched {fetched} bytes and reused only {reused}");
        }

        let t3 = Instant::now();
        boot_vm(
            &self.ns,
            fw,
            &self.work,
            &disk,
            &self.work.join(format!("vm-{name}-3.log")),
            "demo@2",
            false,
        )?;
        let local = t3.elapsed();
        // The agent without an address on its command line (another boot path than our iPXE
        // script): it asks DHCP itself. BIOS only: a direct kernel boot, as a boot loader would.
        let mut fallback = String::new();
        if fw == Firmware::Bios {
            util::run(Command::new(&self.fleetboot).current_dir(&self.work).args([
                "reimage",
                "--config",
                "fleetboot.yaml",
                fw.mac(),
            ]))?;
            let t4 = Instant::now();
            let log = self.work.join(format!("vm-{name}-dhcp.log"));
            agent_without_address(&self.ns, &self.boot, &disk, &log, fw.mac())?;
            check("demo@2")?;
            fallback = format!(
                ", agent with its own DHCP {:.1} s",
                t4.elapsed().as_secs_f64()
            );
        }
        let (f1, _) = figures(&first)?;
        Ok(format!(
            "{name}: PXE + install demo@1 + its first boot {:.1} s (fetched {f1} B), reimage to demo@2 + boot \
             {:.1} s (fetched {fetched} B, reused {reused} B), local boot {:.1} s{fallback}",
            install_1.as_secs_f64(),
            install_2.as_secs_f64(),
            local.as_secs_f64()
        ))
    }
}

/// What every VM run needs: QEMU, its firmware and ROMs, an SSH client (installed if missing);
/// the appliance built; `boot/` holding the agent's kernel and initramfs and the iPXE loaders.
/// Returns the appliance binary and `boot/`.
pub(crate) fn prepare() -> Result<(PathBuf, PathBuf)> {
    crate::setup::apt_install(&[
        ("qemu-system-x86", "qemu-system-x86_64"),
        ("ipxe-qemu", "/usr/lib/ipxe/qemu/efi-virtio.rom"),
        ("ovmf", "/usr/share/OVMF/OVMF_CODE_4M.fd"),
        ("openssh-client", "ssh"),
    ])?;
    let fleetboot = util::build_release(&["fleetboot"])?;
    let boot = root().join("boot");
    crate::initramfs::build(&boot)?;
    crate::boot_assets::install(&boot)?;
    Ok((fleetboot, boot))
}

/// Empties `work` and imports the first `versions` demo images into `work/store` as `demo@1`,
/// `demo@2` (a small change). Returns the store.
pub(crate) fn demo_store(fleetboot: &Path, work: &Path, versions: usize) -> Result<PathBuf> {
    demo_store_for(fleetboot, work, versions, Arch::Amd64)
}

/// [`demo_store`] with the demo images built for `arch`.
pub(crate) fn demo_store_for(
    fleetboot: &Path,
    work: &Path,
    versions: usize,
    arch: Arch,
) -> Result<PathBuf> {
    if work.exists() {
        fs::remove_dir_all(work)?;
    }
    fs::create_dir_all(work)?;
    let store = work.join("store");
    for (name, extra) in [("demo@1", ""), ("demo@2", "second version\n")]
        .into_iter()
        .take(versions)
    {
        let img = crate::images::build_for(work, name, extra, arch)?;
        util::run(
            Command::new(fleetboot)
                .arg("--store")
                .arg(&store)
                .args(["image", "import", "demo"])
                .arg(&img),
        )?;
    }
    Ok(store)
}

/// Has `fleetboot serve` read its configuration again (SIGHUP), and gives it the moment it takes.
pub(crate) fn reread_config(server: &Daemon) -> Result<()> {
    util::run(Command::new("kill").args(["-HUP", &server.pid().to_string()]))?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// The VMs' network: a lab whose switch holds the appliance's address and the tap QEMU uses.
pub(crate) fn vm_network(name: &str) -> Result<Lab> {
    let net = Lab::new(name)?;
    fleetboot_lab::ip(&[
        "-n",
        &net.switch().ns,
        "addr",
        "add",
        &format!("{SERVER}/24"),
        "dev",
        "br0",
    ])?;
    net.tap("tap0")?;
    Ok(net)
}

/// `fleetboot serve` with `work/fleetboot.yaml` in the switch namespace, once it answers HTTP.
pub(crate) fn serve(ns: &Host, fleetboot: &Path, work: &Path) -> Result<Daemon> {
    let server = Daemon::start(
        ns.cmd(fleetboot)
            .current_dir(work)
            .args(["serve", "--config", "fleetboot.yaml"]),
        &work.join("serve.log"),
    )?;
    wait_http(ns)?;
    Ok(server)
}

fn wait_http(ns: &Host) -> Result<()> {
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

/// Runs the VM `qemu` starts until it powers itself off; its console (in `log`) must show
/// `expect`. Returns the console and how long it ran.
fn run_until_off(qemu: &mut Command, log: &Path, expect: &str) -> Result<(String, Duration)> {
    let started = Instant::now();
    let status = qemu
        .stdin(Stdio::null())
        .stdout(fs::File::create(log)?)
        .stderr(Stdio::null())
        .status()?;
    let console = String::from_utf8_lossy(&fs::read(log)?).into_owned();
    if !status.success() || !console.contains(expect) {
        bail!(
            "the VM did not show {expect:?} and power off ({status}); console in {}",
            log.display()
        );
    }
    Ok((console, started.elapsed()))
}

/// Whether a wiped disk's first and last 16 MiB read as zeros.
fn edges_zero(disk: &Path) -> Result<bool> {
    let data = fs::read(disk)?;
    let edge = (16 << 20).min(data.len());
    Ok(data[..edge].iter().all(|&b| b == 0) && data[data.len() - edge..].iter().all(|&b| b == 0))
}

/// Powers the VM on: it network-boots (NIC first, disk second) and runs until it powers off —
/// which the demo image does once it has printed its marker. Returns the serial console.
fn boot_vm(
    ns: &Host,
    fw: Firmware,
    work: &Path,
    disk: &Path,
    log: &Path,
    marker: &str,
    expect_agent: bool,
) -> Result<String> {
    let mut qemu = ns.cmd("timeout");
    qemu.arg("400");
    vm_args(&mut qemu, fw, fw.mac(), work, disk, 1024, true)?;
    run_boot(&mut qemu, log, marker, expect_agent)
}

/// Runs the VM `qemu` starts until it powers itself off; its console (in `log`) must show the
/// agent installing (`expect_agent`) or not running at all, then `marker` booted from the disk.
/// Returns the serial console.
pub(crate) fn run_boot(
    qemu: &mut Command,
    log: &Path,
    marker: &str,
    expect_agent: bool,
) -> Result<String> {
    let status = qemu
        .stdin(Stdio::null())
        .stdout(fs::File::create(log)?)
        .stderr(Stdio::null())
        .status()?;
    let text = String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned();
    // The agent's lines and the installed image's marker, without the firmware's terminal codes.
    let console: String = text
        .lines()
        .filter_map(|l| {
            let at = l
                .find("fleetboot-agent")
                .or_else(|| l.find("FLEETBOOT-MARKER"))?;
            Some(format!("vm: {}\n", &l[at..]))
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

/// Appends `qemu-system-x86_64` and its arguments to `qemu`: a TCG VM network-booting through
/// SeaBIOS and the NIC's iPXE ROM, or through OVMF's own PXE (ROM removed; its variables kept
/// in `work`) with the disk on NVMe, the serial console on stdout. `network_first`: the NIC
/// before the disk in the boot order; else the disk first (a blank disk falls through to the
/// NIC), as a server's order is after its install.
pub(crate) fn vm_args(
    qemu: &mut Command,
    fw: Firmware,
    mac: &str,
    work: &Path,
    disk: &Path,
    memory_mib: u32,
    network_first: bool,
) -> Result<()> {
    vm_args_with(qemu, fw, false, mac, work, disk, memory_mib, network_first)
}

/// [`vm_args`] for a UEFI VM with Secure Boot on: OVMF's build with Microsoft's keys enrolled
/// (`OVMF_CODE_4M.ms.fd`, `OVMF_VARS_4M.ms.fd`), which needs SMM and secure flash.
pub(crate) fn secure_boot_vm_args(
    qemu: &mut Command,
    mac: &str,
    work: &Path,
    disk: &Path,
) -> Result<()> {
    vm_args_with(qemu, Firmware::Uefi, true, mac, work, disk, 1024, true)
}

#[allow(clippy::too_many_arguments)]
fn vm_args_with(
    qemu: &mut Command,
    fw: Firmware,
    secure_boot: bool,
    mac: &str,
    work: &Path,
    disk: &Path,
    memory_mib: u32,
    network_first: bool,
) -> Result<()> {
    let (nic_index, disk_index) = if network_first { (1, 2) } else { (2, 1) };
    qemu.args(["qemu-system-x86_64", "-accel", "tcg", "-smp", "1", "-m"])
        .arg(memory_mib.to_string())
        .arg("-nographic")
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
    match fw {
        Firmware::Bios => {
            qemu.args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={mac},bootindex={nic_index}"),
            ]);
        }
        Firmware::Uefi => {
            let (code, vars, kind) = if secure_boot {
                ("OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd", "ms-")
            } else {
                ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "")
            };
            let own_vars = work.join(format!("OVMF_VARS-{kind}{}.fd", mac.replace(':', "")));
            if !own_vars.exists() {
                fs::copy(format!("/usr/share/OVMF/{vars}"), &own_vars)?;
            }
            if secure_boot {
                qemu.args(["-machine", "q35,smm=on"])
                    .args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
            } else {
                qemu.args(["-machine", "q35"]);
            }
            qemu.arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/{code}"
                ))
                .arg("-drive")
                .arg(format!("if=pflash,format=raw,file={}", own_vars.display()))
                .args(["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"])
                .args([
                    "-device",
                    &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=,bootindex={nic_index}"),
                ]);
        }
    }
    // BIOS: a virtio disk; UEFI: NVMe (OVMF then hands GRUB the disk to search).
    let disk_device = match fw {
        Firmware::Bios => format!("virtio-blk-pci,drive=d0,bootindex={disk_index}"),
        Firmware::Uefi => format!("nvme,drive=d0,serial=fleetboot-e2e,bootindex={disk_index}"),
    };
    qemu.arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
        .args(["-device", &disk_device]);
    Ok(())
}

/// Boots the agent's kernel directly with the script's command line minus iPXE's address: the
/// agent must get one by DHCP, reinstall and reboot.
fn agent_without_address(ns: &Host, boot: &Path, disk: &Path, log: &Path, mac: &str) -> Result<()> {
    // No token either: the agent fetches its script itself, from the address DHCP gave it (a
    // token is handed only to that address).
    let append = format!(
        "console=ttyS0 quiet fleetboot.url=http://{SERVER}:8080 fleetboot.mac={mac} \
         fleetboot.on_failure=poweroff"
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
            "1024",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(boot.join("fleetboot-vmlinuz"))
        .arg("-initrd")
        .arg(boot.join("fleetboot-initrd.img"))
        .args(["-append", &append])
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(log)?)
        .stderr(Stdio::null())
        .status()?;
    let text = String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned();
    for l in text
        .lines()
        .filter_map(|l| l.find("fleetboot-agent").map(|at| &l[at..]))
    {
        println!("vm: {l}");
    }
    if !status.success() || !text.contains("asking DHCP") || !text.contains("installed; rebooting")
    {
        bail!(
            "the agent did not install with its own DHCP ({status}); console in {}",
            log.display()
        );
    }
    Ok(())
}

/// Checks the VM's disk: the image, byte for byte, but for the MBR slots past the image's one
/// partition, where the seed is added: a FAT (LBA) partition past the image whose `meta-data`
/// names `hostname`. Returns the seed's instance-id.
pub(crate) fn check_disk(
    fleetboot: &Path,
    store: &Path,
    image: &str,
    disk: &Path,
    work: &Path,
    hostname: &str,
) -> Result<String> {
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
    // The demo images use the first slot (bytes 446..462); the seed takes the second.
    let same = |r: std::ops::Range<usize>| got.get(r.clone()) == want.get(r);
    if got.len() < want.len() || !same(0..462) || !same(478..want.len()) {
        bail!("the VM's disk does not read back as {image}");
    }
    let slot = &got[462..478];
    let start = u64::from(u32::from_le_bytes([slot[8], slot[9], slot[10], slot[11]])) * 512;
    if slot[4] != 0x0c || start < want.len() as u64 {
        bail!("the VM's disk has no cloud-init seed partition past {image}");
    }
    let meta = util::output(
        Command::new("mtype")
            .arg("-i")
            .arg(format!("{}@@{start}", disk.display()))
            .arg("::meta-data"),
    )?;
    let meta: serde_json::Value =
        serde_json::from_str(&meta).with_context(|| format!("the seed's meta-data: {meta:?}"))?;
    if meta["local-hostname"] != hostname {
        bail!(
            "the seed names the host {}, not {hostname}",
            meta["local-hostname"]
        );
    }
    eprintln!("e2e: the VM's disk reads back identical to {image}, with its seed for {hostname}");
    Ok(meta["instance-id"].as_str().unwrap_or_default().to_string())
}

/// (fetched, reused) from the agent's install report on the console.
fn figures(console: &str) -> Result<(u64, u64)> {
    crate::util::install_figures(console)
}
