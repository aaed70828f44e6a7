//! `cargo xtask e2e --os debian`: a real Debian, installed by PXE, coming up as itself.
//!
//! The Debian 12 cloud image of `cargo xtask images --os debian` is imported from its qcow2
//! (versions 1 and 2) into a fresh store, and `fleetboot serve` (full DHCP) assigns it to two VMs
//! with 4 GiB disks: one BIOS (virtio disk, blank, address reserved in DHCP), one UEFI (NVMe
//! disk full of old data, so every zero run of the image must be zeroed on it; a static address
//! from the YAML's `network`). Each VM network-boots, the agent installs
//! debian@1 and adds the cloud-init seed, the VM reboots into Debian from its disk, and the test
//! checks from outside, over SSH from the lab's switch namespace with the key the YAML gives:
//! the hostname is the YAML's, a `runcmd` of the YAML's `user_data` ran, the root filesystem
//! grew to ≥ 90 % of the disk, and (across the two VMs) the SSH host keys differ. Then debian@2
//! is assigned and `fleetboot reimage MAC --reboot` takes the running machine to it through its
//! BMC with no hand on it — PXE on the next boot only, power cycle, followed until installed —
//! the agent reimages it moving only what changed, and it comes up as itself again with version
//! 2's package and a new instance-id.
//!
//! Each VM sits behind a real BMC emulation (the lab's chassis script starts and stops it):
//! the BIOS one behind OpenIPMI's `ipmi_sim` (IPMI over LAN), the UEFI one behind sushy-tools'
//! Redfish emulator (HTTPS, its certificate checked against the lab CA's). Their boot order is
//! disk first, as a server's is after its install: a blank disk falls through to the network,
//! and only the BMC's one-time override sends an installed machine back to PXE. They are
//! powered on and off with `fleetboot power`.

use crate::e2e::{prepare, serve, vm_args, vm_network, Firmware};
use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use fleetboot_lab::bmc::{self, BmcLogin, Chassis};
use fleetboot_lab::{Daemon, Host};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 4 << 30;
const MEMORY_MIB: u32 = 2048;
/// The installed OS's default user (Debian's cloud-init configuration).
const USER: &str = "debian";
/// Both BMC emulators listen on the appliance's address: IPMI on UDP 623, Redfish on this port.
const BMC_ADDRESS: &str = "10.77.0.1";
const REDFISH_PORT: u16 = 8443;
const BMC_USER: &str = "admin";
const BMC_PASSWORD: &str = "e2e-bmc-Pw91";

struct Machine {
    fw: Firmware,
    mac: &'static str,
    hostname: &'static str,
    address: &'static str,
    /// `network` in the YAML (a static address in the installed OS) rather than DHCP.
    static_address: bool,
    /// The disk starts full of old data (a used server's), not zeros: the agent must zero every
    /// zero run of the image on it (on NVMe: Write Zeroes, in bounded steps).
    used_disk: bool,
}

const MACHINES: [Machine; 2] = [
    Machine {
        fw: Firmware::Bios,
        mac: "52:54:00:e2:d0:01",
        hostname: "deb-bios",
        address: "10.77.0.61",
        static_address: false,
        used_disk: false,
    },
    Machine {
        fw: Firmware::Uefi,
        mac: "52:54:00:e2:d0:02",
        hostname: "deb-uefi",
        address: "10.77.0.62",
        static_address: true,
        used_disk: true,
    },
];

pub fn run(uefi: bool) -> Result<()> {
    let started = Instant::now();
    let (fleetboot, boot) = prepare()?;
    let images = crate::debian_image::build()?;

    let work = root().join("target/e2e-debian");
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(&work)?;
    let store = work.join("store");
    for qcow2 in &images {
        util::run(
            Command::new(&fleetboot)
                .arg("--store")
                .arg(&store)
                .args(["image", "import", "debian"])
                .arg(qcow2),
        )?;
    }
    let key = work.join("id_ed25519");
    util::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "e2e@fleetboot", "-f"])
            .arg(&key),
    )?;
    let public = fs::read_to_string(key.with_extension("pub"))?
        .trim()
        .to_string();

    let net = vm_network("e2edeb")?;
    let ns = net.switch().clone();
    let machines: Vec<&Machine> = MACHINES
        .iter()
        .filter(|m| uefi || m.fw == Firmware::Bios)
        .collect();
    let mut vms = Vec::new();
    let mut bmc_ca = None;
    for m in &machines {
        let (vm, ca) = Vm::new(&ns, &work, m)?;
        bmc_ca = bmc_ca.or(ca);
        vms.push(vm);
    }
    fs::write(work.join("bmc.pw"), format!("{BMC_PASSWORD}\n"))?;
    let mut rig = Rig {
        ns: ns.clone(),
        work: work.clone(),
        key,
        public,
        boot,
        fleetboot: fleetboot.clone(),
        bmc_ca,
        versions: machines.iter().map(|m| (m.mac, 1)).collect(),
        server: None,
    };
    rig.write_config()?;
    rig.server = Some(serve(&ns, &fleetboot, &work)?);

    let mut summary = Vec::new();
    let mut host_keys = Vec::new();
    for (m, vm) in machines.iter().zip(&vms) {
        let (line, host_key) = rig.scenario(m, vm)?;
        summary.push(line);
        host_keys.push(host_key);
    }
    if host_keys.len() == 2 && host_keys[0] == host_keys[1] {
        bail!(
            "the two machines have the same SSH host key: {}",
            host_keys[0]
        );
    }
    println!(
        "e2e --os debian: PASS in {:.0} s — {}",
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
    Ok(())
}

/// A machine's VM behind its BMC emulator: the chassis holds the VM's power and console
/// (`vm.log`, appended at every start).
struct Vm {
    chassis: Chassis,
    _bmc: Daemon,
}

impl Vm {
    /// The disk (blank or used), the chassis whose start script runs QEMU with the disk first
    /// (or the NIC first when the BMC asked for PXE), and its BMC: IPMI for BIOS, Redfish for
    /// UEFI (then also the CA to trust, as PEM).
    fn new(ns: &Host, work: &Path, m: &Machine) -> Result<(Vm, Option<PathBuf>)> {
        let name = format!("{:?}", m.fw).to_lowercase();
        let disk = work.join(format!("disk-{name}.img"));
        fs::File::create(&disk)?.set_len(DISK_BYTES)?;
        if m.used_disk {
            fill(&disk)?;
        }
        let qemu = |network_first| -> Result<String> {
            let mut c = Command::new("exec");
            vm_args(&mut c, m.fw, m.mac, work, &disk, MEMORY_MIB, network_first)?;
            Ok(c.get_args()
                .map(|a| shell_quote(&a.to_string_lossy()))
                .collect::<Vec<_>>()
                .join(" "))
        };
        let script = format!(
            "#!/bin/bash\n# $1: pxe (the BMC's one-time override) or disk.\n\
             if [ \"$1\" = pxe ]; then\n  exec {}\nfi\nexec {}\n",
            qemu(true)?,
            qemu(false)?
        );
        let dir = work.join(format!("bmc-{name}"));
        let chassis = Chassis::new(&dir.join("chassis"), &script)?;
        let mut login = BmcLogin {
            address: BMC_ADDRESS.into(),
            port: 623,
            username: BMC_USER.into(),
            password: BMC_PASSWORD.into(),
        };
        let (daemon, ca) = match m.fw {
            Firmware::Bios => (bmc::ipmi_sim(ns, Some(&chassis), &login, None, &dir)?, None),
            Firmware::Uefi => {
                login.port = REDFISH_PORT;
                let system = ("8a1c3e0a-5f0b-4d3e-9b1e-f1eeb00e2e02", m.mac);
                let (d, ca) = bmc::sushy(ns, &chassis, &login, system, &dir)?;
                (d, Some(ca))
            }
        };
        Ok((
            Vm {
                chassis,
                _bmc: daemon,
            },
            ca,
        ))
    }

    fn log(&self) -> PathBuf {
        self.chassis.dir().join("vm.log")
    }

    fn log_len(&self) -> usize {
        fs::metadata(self.log()).map_or(0, |m| m.len() as usize)
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

struct Rig {
    ns: Host,
    work: PathBuf,
    key: PathBuf,
    public: String,
    boot: PathBuf,
    fleetboot: PathBuf,
    /// The CA the Redfish emulator's certificate is signed by.
    bmc_ca: Option<PathBuf>,
    /// Each machine's assigned version of `debian`.
    versions: Vec<(&'static str, u32)>,
    server: Option<Daemon>,
}

impl Rig {
    fn write_config(&self) -> Result<()> {
        let mut hosts = String::new();
        for (mac, version) in &self.versions {
            let m = MACHINES
                .iter()
                .find(|m| m.mac == *mac)
                .context("a machine of the rig")?;
            let network = if m.static_address {
                format!(
                    ", network: {{ address: {}/24, gateway: 10.77.0.1, dns: [10.77.0.1] }}",
                    m.address
                )
            } else {
                String::new()
            };
            let bmc = match (m.fw, &self.bmc_ca) {
                (Firmware::Bios, _) => format!(
                    "{{ type: ipmi, address: {BMC_ADDRESS}, username: {BMC_USER}, \
                     password_file: bmc.pw, cipher_suite: 3 }}"
                ),
                (Firmware::Uefi, Some(ca)) => format!(
                    "{{ type: redfish, address: {BMC_ADDRESS}, port: {REDFISH_PORT}, \
                     username: {BMC_USER}, password_file: bmc.pw, ca_file: {} }}",
                    ca.display()
                ),
                (Firmware::Uefi, None) => bail!("the Redfish emulator's CA is missing"),
            };
            hosts += &format!(
                "  \"{mac}\": {{ image: debian@{version}, hostname: {}, ip: {}{network},\n\
                 \x20   bmc: {bmc} }}\n",
                m.hostname, m.address
            );
        }
        fs::write(
            self.work.join("fleetboot.yaml"),
            format!(
                "interface: br0\nhttp_port: 8080\nboot_dir: {}\nstore: store\nstate_dir: state\n\
                 router_advertisements: true\nboot_files: {{ uefi: snponly.efi }}\n\
                 dhcp: {{ mode: full, range: [10.77.0.100, 10.77.0.150], router: 10.77.0.1 }}\n\
                 defaults:\n  ssh_authorized_keys: [\"{}\"]\n  user_data: |\n    #cloud-config\n    runcmd:\n      \
                 - [sh, -c, 'echo \"ran on $(hostname)\" > /var/lib/fleetboot-runcmd']\n\
                 hosts:\n{hosts}",
                self.boot.display(),
                self.public
            ),
        )?;
        Ok(())
    }

    /// Runs `fleetboot --config … ARGS` in the lab (where the BMCs are), printing its output.
    fn fleetboot(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.ns.cmd(&self.fleetboot);
        cmd.arg("--config")
            .arg(self.work.join("fleetboot.yaml"))
            .args(args);
        println!("e2e: $ fleetboot {}", args.join(" "));
        let out = cmd.output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines() {
            println!("e2e:   {line}");
        }
        if !out.status.success() {
            bail!("`fleetboot {}` failed ({})", args.join(" "), out.status);
        }
        Ok(text)
    }

    fn assign(&mut self, mac: &str, version: u32) -> Result<()> {
        for v in self.versions.iter_mut().filter(|v| v.0 == mac) {
            v.1 = version;
        }
        self.write_config()?;
        if let Some(server) = &self.server {
            util::run(Command::new("kill").args(["-HUP", &server.pid().to_string()]))?;
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// Install debian@1, check the machine from outside, reimage to debian@2, check again.
    /// Returns the summary line and the machine's SSH host key.
    fn scenario(&mut self, m: &Machine, vm: &Vm) -> Result<(String, String)> {
        let name = format!("{:?}", m.fw).to_lowercase();
        let t1 = Instant::now();
        self.fleetboot(&["power", "on", m.mac])?;
        wait_console(vm, 0, "installed; rebooting", 900)?;
        let installed_1 = t1.elapsed();
        let ssh = Ssh {
            ns: self.ns.clone(),
            key: self.key.clone(),
            address: m.address,
        };
        ssh.wait_up(900)?;
        let up_1 = t1.elapsed();
        let first = self.check(&ssh, m, 1)?;
        // What an operator would see logging in.
        let login = ssh.run(
            "echo \"$(whoami)@$(hostname): $(. /etc/os-release; echo $PRETTY_NAME), \
             kernel $(uname -r), root $(df -h --output=size / | tail -1 | tr -d ' ')\"",
        )?;
        println!(
            "e2e: $ ip netns exec {} ssh -i {} {USER}@{}\ne2e: {}",
            self.ns.ns,
            self.key.display(),
            m.address,
            login.trim()
        );

        self.assign(m.mac, 2)?;
        let mark = vm.log_len();
        let t2 = Instant::now();
        // No hand on the machine: its BMC boots it from the network once, and the command
        // follows the install to its end.
        let out = self.fleetboot(&["reimage", m.mac, "--reboot", "--timeout", "20m"])?;
        if !out.contains(&format!("{}: installed debian@2", m.mac)) {
            bail!("{name}: `reimage --reboot` did not report debian@2 installed:\n{out}");
        }
        let installed_2 = t2.elapsed();
        if vm.chassis.starts().last().map(String::as_str) != Some("pxe") {
            bail!("{name}: the BMC did not start the VM from the network");
        }
        // The agent prints its report on the console just after the appliance recorded it.
        wait_console(vm, mark, "installed; rebooting", 60)?;
        let after = fs::read(vm.log()).unwrap_or_default();
        let (fetched, reused) = util::install_figures(&String::from_utf8_lossy(
            after.get(mark..).unwrap_or_default(),
        ))?;
        if reused < 4 * fetched {
            bail!(
                "{name}: the reimage to debian@2 fetched {fetched} bytes and reused only {reused}"
            );
        }
        // Wait for the new system, not the old one still shutting down.
        std::thread::sleep(Duration::from_secs(5));
        ssh.wait_up(900)?;
        let up_2 = t2.elapsed();
        let second = self.check(&ssh, m, 2)?;
        if second.instance_id == first.instance_id {
            bail!("{name}: the reimage kept instance-id {}", first.instance_id);
        }
        self.fleetboot(&["power", "off", m.mac])?;
        vm.chassis.wait_power(false, 30)?;
        Ok((
            format!(
                "{name}: install {:.0} s, up with SSH {:.0} s (root {:.1} of {:.1} GiB); \
                 reimage to debian@2 {:.0} s (fetched {fetched} B, reused {reused} B), up {:.0} s",
                installed_1.as_secs_f64(),
                up_1.as_secs_f64(),
                first.root_bytes as f64 / (1u64 << 30) as f64,
                DISK_BYTES as f64 / (1u64 << 30) as f64,
                installed_2.as_secs_f64(),
                up_2.as_secs_f64()
            ),
            first.host_key,
        ))
    }

    /// What the installed machine says of itself, checked against the YAML.
    fn check(&self, ssh: &Ssh, m: &Machine, version: u32) -> Result<Seen> {
        // It exits non-zero when a module failed: the output says which.
        let status = ssh.run("cloud-init status --wait --long || true")?;
        if !status.contains("status: done") {
            bail!(
                "cloud-init did not finish cleanly on {}:\n{status}",
                m.hostname
            );
        }
        let hostname = ssh.run("hostname")?.trim().to_string();
        if hostname != m.hostname {
            bail!(
                "the machine calls itself {hostname:?}, not {:?}",
                m.hostname
            );
        }
        let ran = ssh.run("cat /var/lib/fleetboot-runcmd")?;
        if ran.trim() != format!("ran on {}", m.hostname) {
            bail!("the user data's runcmd did not run as expected: {ran:?}");
        }
        let root_bytes: u64 = ssh
            .run("df -B1 --output=size / | tail -1")?
            .trim()
            .parse()
            .context("df's size of /")?;
        if root_bytes * 10 < DISK_BYTES * 9 {
            bail!(
                "the root filesystem is {root_bytes} bytes: it did not grow to the {DISK_BYTES}-byte disk"
            );
        }
        let has_tree = ssh.run("dpkg-query -W -f '${Status}' tree 2>/dev/null || true")?;
        if has_tree.contains("ok installed") != (version == 2) {
            bail!("debian@{version} is not what runs (package tree: {has_tree:?})");
        }
        let instance_id = ssh
            .run("cat /var/lib/cloud/data/instance-id")?
            .trim()
            .to_string();
        let host_key = ssh.run("cat /etc/ssh/ssh_host_ed25519_key.pub")?;
        let host_key = host_key
            .split_whitespace()
            .nth(1)
            .context("no SSH host key")?
            .to_string();
        eprintln!(
            "e2e: {} is up as itself: debian@{version}, instance {instance_id}, root {root_bytes} bytes",
            m.hostname
        );
        Ok(Seen {
            instance_id,
            host_key,
            root_bytes,
        })
    }
}

struct Seen {
    instance_id: String,
    host_key: String,
    root_bytes: u64,
}

/// SSH from the switch namespace as the OS's default user, with the key the YAML gave it.
struct Ssh {
    ns: Host,
    key: PathBuf,
    address: &'static str,
}

impl Ssh {
    fn command(&self, remote: &str) -> Command {
        let mut c = self.ns.cmd("ssh");
        c.arg("-i")
            .arg(&self.key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "BatchMode=yes",
            ])
            .arg(format!("{USER}@{}", self.address))
            .arg(remote);
        c
    }

    fn run(&self, remote: &str) -> Result<String> {
        util::output(&mut self.command(remote))
    }

    /// Until a login with the key works (the machine is up and cloud-init put the key in place).
    fn wait_up(&self, secs: u64) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if self
                .command("true")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("no SSH login to {} within {secs} s", self.address);
            }
            std::thread::sleep(Duration::from_secs(3));
        }
    }
}

/// Waits until the console, past byte `from`, shows `text`.
fn wait_console(vm: &Vm, from: usize, text: &str, secs: u64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(secs);
    let log = vm.log();
    loop {
        let seen = fs::read(&log).unwrap_or_default();
        if seen
            .get(from..)
            .is_some_and(|s| String::from_utf8_lossy(s).contains(text))
        {
            return Ok(());
        }
        if !vm.chassis.powered()? {
            bail!(
                "the VM stopped before {text:?}; console in {}",
                log.display()
            );
        }
        if Instant::now() > until {
            bail!(
                "no {text:?} on the console within {secs} s; console in {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Fills `disk` with a non-zero pattern, as a disk that held another system.
fn fill(disk: &std::path::Path) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::OpenOptions::new().write(true).open(disk)?);
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 | 1).collect();
    for _ in 0..DISK_BYTES >> 20 {
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}
