//! BMCs for lab VMs: a [`Chassis`] (a QEMU VM that a script starts and stops, with a one-shot
//! boot device for its next start) and two real BMC emulators that drive it over the network —
//! OpenIPMI's `ipmi_sim` (IPMI 2.0 over LAN, its `chassis_control` program) and sushy-tools'
//! Redfish emulator (HTTPS with basic auth, its fake driver's power and boot methods replaced
//! by calls to the same script). Each runs inside a lab host's namespace.

use crate::{Daemon, Host, LabError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CHASSIS_CONTROL: &str = include_str!("../bmc/chassis-control");
const SUSHY_CONFIG: &str = include_str!("../bmc/sushy-config.py");
/// The Redfish emulator's version: its configuration replaces methods of this version's driver.
pub const SUSHY_TOOLS_VERSION: &str = "2.2.0";

fn io(what: String) -> impl FnOnce(std::io::Error) -> LabError {
    move |error| LabError::Io { what, error }
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).map_err(io(format!("cannot write {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(io(format!("cannot make {} executable", path.display())))
}

/// A VM's power and boot device, kept in a folder: `start` (the VM's command, given `pxe` or
/// `disk`), `pid`, `boot` (the pending one-shot device), `starts` (the device of every start),
/// `vm.log`. The VM is stopped when the chassis is dropped.
pub struct Chassis {
    dir: PathBuf,
}

impl Chassis {
    /// A chassis in `dir` whose VM is started by `start_script` (a bash script ending in
    /// `exec qemu-system-…`; `$1` is the boot device of this start, `pxe` or `disk`). Off.
    pub fn new(dir: &Path, start_script: &str) -> Result<Chassis> {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        write_executable(&dir.join("chassis-control"), CHASSIS_CONTROL)?;
        write_executable(&dir.join("start"), start_script)?;
        Ok(Chassis {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The program an emulator runs, and its first argument.
    pub fn control(&self) -> (PathBuf, &Path) {
        (self.dir.join("chassis-control"), &self.dir)
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let (program, dir) = self.control();
        let out = Command::new(&program)
            .arg(dir)
            .args(args)
            .output()
            .map_err(io(format!("cannot run {}", program.display())))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether the VM runs.
    pub fn powered(&self) -> Result<bool> {
        Ok(self.run(&["get", "power"])?.contains("power:1"))
    }

    /// Starts (`true`) or stops the VM by hand, as a person at the machine would.
    pub fn set_power(&self, on: bool) -> Result<()> {
        self.run(&["set", "power", if on { "1" } else { "0" }])
            .map(drop)
    }

    /// The boot device of every start so far, oldest first.
    pub fn starts(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("starts"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits until the VM's power is `on`, for up to `secs`.
    pub fn wait_power(&self, on: bool, secs: u64) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(secs);
        while self.powered()? != on {
            if Instant::now() > until {
                return Err(LabError::Daemon(format!(
                    "the VM in {} is not {} after {secs} s",
                    self.dir.display(),
                    if on { "on" } else { "off" }
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Chassis {
    fn drop(&mut self) {
        let _ = self.set_power(false);
    }
}

/// Where a BMC emulator listens and who may log in.
#[derive(Clone, Debug)]
pub struct BmcLogin {
    pub address: String,
    pub port: u16,
    pub username: String,
    pub password: String,
}

/// The MAC address the lab's BMCs give as their LAN side's (Get LAN Configuration Parameters).
pub const BMC_LAN_MAC: &str = "02:00:00:00:06:23";

/// OpenIPMI's `ipmi_sim` serving IPMI 2.0 over LAN, inside `host`'s namespace: power and boot
/// device for `chassis` (through its program), and with `vm_port` the system interface of a
/// QEMU VM that runs in the same namespace with [`qemu_bmc_args`]. Asked in-band for its LAN
/// configuration it gives `login.address` and [`BMC_LAN_MAC`].
/// Talk to it with `ipmitool -I lanplus -C 3` (it offers cipher suites 0-14 only).
pub fn ipmi_sim(
    host: &Host,
    chassis: Option<&Chassis>,
    login: &BmcLogin,
    vm_port: Option<u16>,
    dir: &Path,
) -> Result<Daemon> {
    std::fs::create_dir_all(dir.join("state"))
        .map_err(io(format!("cannot create {}", dir.display())))?;
    // ipmi_sim asks this program for the LAN parameters a real BMC takes from its own NIC.
    let lan_control = dir.join("lan-control");
    write_executable(
        &lan_control,
        &format!(
            "#!/bin/sh\n\
             # lan-control DEVICE get PARAM... (ipmi_sim's lan_config_program)\n\
             [ \"$2\" = get ] || exit 1\n\
             shift 2\n\
             for p in \"$@\"; do\n\
             \x20 case $p in\n\
             \x20   ip_addr) echo \"ip_addr:{addr}\" ;;\n\
             \x20   ip_addr_src) echo \"ip_addr_src:static\" ;;\n\
             \x20   mac_addr) echo \"mac_addr:{BMC_LAN_MAC}\" ;;\n\
             \x20   subnet_mask) echo \"subnet_mask:255.255.255.0\" ;;\n\
             \x20   *_mac_addr) echo \"$p:00:00:00:00:00:00\" ;;\n\
             \x20   *) echo \"$p:0.0.0.0\" ;;\n\
             \x20 esac\n\
             done\n",
            addr = login.address
        ),
    )?;
    let chassis_line = chassis
        .map(|c| {
            let (program, chassis_dir) = c.control();
            format!(
                "chassis_control \"{} {}\"\n",
                program.display(),
                chassis_dir.display()
            )
        })
        .unwrap_or_default();
    let vm_line = vm_port
        .map(|p| format!("serial 15 127.0.0.1 {p} codec VM\n"))
        .unwrap_or_default();
    let lan = format!(
        "name \"fleetboot-lab\"\n\
         set_working_mc 0x20\n\
         startlan 1\n\
         \x20 addr {addr} {port}\n\
         \x20 priv_limit admin\n\
         \x20 allowed_auths_callback none md2 md5 straight\n\
         \x20 allowed_auths_user none md2 md5 straight\n\
         \x20 allowed_auths_operator none md2 md5 straight\n\
         \x20 allowed_auths_admin none md2 md5 straight\n\
         \x20 guid a123456789abcdefa123456789abcdef\n\
         \x20 lan_config_program \"{lan_control} eth0\"\n\
         endlan\n\
         {chassis_line}\
         {vm_line}\
         user 2 true \"{user}\" \"{password}\" admin 10 none md2 md5 straight\n",
        addr = login.address,
        port = login.port,
        lan_control = lan_control.display(),
        user = login.username,
        password = login.password,
    );
    // The BMC management controller alone: power and boot options need no sensors.
    let emu = "mc_setbmc 0x20\n\
               mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\n\
               sel_enable 0x20 1000 0x0a\n\
               mc_enable 0x20\n";
    let (lan_path, emu_path) = (dir.join("lan.conf"), dir.join("bmc.emu"));
    std::fs::write(&lan_path, lan).map_err(io(format!("cannot write {}", lan_path.display())))?;
    std::fs::write(&emu_path, emu).map_err(io(format!("cannot write {}", emu_path.display())))?;
    let state = dir.join("state");
    let mut daemon = host.spawn(
        "ipmi_sim",
        &[
            "-c",
            &lan_path.to_string_lossy(),
            "-f",
            &emu_path.to_string_lossy(),
            "-s",
            &state.to_string_lossy(),
            "-n",
        ],
        &dir.join("ipmi_sim.log"),
    )?;
    host.wait_listening(login.port, true, 10, &mut daemon)?;
    Ok(daemon)
}

/// QEMU arguments giving a VM a BMC: an IPMI KCS system interface (ACPI IPI0001, SMBIOS type
/// 38, as servers have) linked to the `ipmi_sim` that listens on `port` ([`ipmi_sim`]'s
/// `vm_port`) in the VM's namespace.
pub fn qemu_bmc_args(port: u16) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=ipmi0,host=127.0.0.1,port={port},reconnect=10"),
        "-device".into(),
        "ipmi-bmc-extern,chardev=ipmi0,id=bmc0".into(),
        "-device".into(),
        "isa-ipmi-kcs,bmc=bmc0".into(),
    ]
}

/// Where the Redfish emulator is installed (`cargo xtask setup` makes this virtualenv).
pub fn sushy_venv() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join(format!("lab-tools/sushy-tools-{SUSHY_TOOLS_VERSION}"))
}

/// Whether the Redfish emulator is installed.
pub fn have_sushy() -> bool {
    sushy_venv().join("bin/sushy-emulator").is_file()
}

/// The Redfish emulator serving one system (`uuid`, `mac`) over HTTPS for a chassis, inside
/// `host`'s namespace, with basic auth for `login`. Its certificate is made here for
/// `login.address`, signed by a CA made here too, whose PEM file is returned for a client to
/// trust.
pub fn sushy(
    host: &Host,
    chassis: &Chassis,
    login: &BmcLogin,
    system: (&str, &str),
    dir: &Path,
) -> Result<(Daemon, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let venv = sushy_venv();
    // A site CA and the BMC's certificate signed by it, as operators run BMCs with their own
    // CA (rustls refuses a self-signed CA certificate used as a server's own).
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("cert.csr"),
    );
    let ext = dir.join("cert.ext");
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=IP:{}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth\n",
            login.address
        ),
    )
    .map_err(io(format!("cannot write {}", ext.display())))?;
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    crate::run(
        Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args([
                "-days",
                "2",
                "-subj",
                "/CN=fleetboot-lab CA",
                "-keyout",
                &p(&ca_key),
                "-out",
                &p(&ca),
            ]),
    )?;
    crate::run(Command::new("openssl").arg("req").args(ec).args([
        "-subj",
        "/CN=fleetboot-lab BMC",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ]))?;
    crate::run(Command::new("openssl").args([
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]))?;
    // bcrypt is all the emulator's htpasswd reader takes; cost 4 keeps a request fast.
    let htpasswd = dir.join("htpasswd");
    let hash = Command::new(venv.join("bin/python3"))
        .args([
            "-c",
            "import bcrypt, sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(4)).decode())",
            &login.password,
        ])
        .output()
        .map_err(io("cannot run the emulator's python".into()))?;
    let hash = String::from_utf8_lossy(&hash.stdout).trim().to_string();
    std::fs::write(&htpasswd, format!("{}:{hash}\n", login.username))
        .map_err(io(format!("cannot write {}", htpasswd.display())))?;
    let config = dir.join("sushy-config.py");
    std::fs::write(&config, SUSHY_CONFIG)
        .map_err(io(format!("cannot write {}", config.display())))?;
    let (program, chassis_dir) = chassis.control();
    let mut cmd = host.cmd("env");
    cmd.arg(format!("LAB_CHASSIS_CONTROL={}", program.display()))
        .arg(format!("LAB_CHASSIS_DIR={}", chassis_dir.display()))
        .arg(format!("LAB_LISTEN_IP={}", login.address))
        .arg(format!("LAB_LISTEN_PORT={}", login.port))
        .arg(format!("LAB_TLS_CERT={}", cert.display()))
        .arg(format!("LAB_TLS_KEY={}", key.display()))
        .arg(format!("LAB_HTPASSWD={}", htpasswd.display()))
        .arg(format!("LAB_SYSTEM_UUID={}", system.0))
        .arg(format!("LAB_SYSTEM_MAC={}", system.1))
        .arg(venv.join("bin/sushy-emulator"))
        .arg("--config")
        .arg(&config);
    let mut daemon = Daemon::start(&mut cmd, &dir.join("sushy.log"))?;
    host.wait_listening(login.port, false, 30, &mut daemon)?;
    Ok((daemon, ca))
}
