//! Power through real BMC emulations, with the `fleetboot` binary as an operator runs it, in a
//! network namespace lab: OpenIPMI's `ipmi_sim` (IPMI 2.0 over LAN, talked to by ipmitool) and
//! sushy-tools' Redfish emulator (HTTPS, basic auth, its own certificate trusted through
//! `ca_file`), each driving a real QEMU VM through the lab's chassis script — power on, off,
//! cycle, status, PXE on the next boot only; an unreachable BMC, a host without one, a wrong
//! password and an untrusted certificate each reported for that host alone, the password never
//! printed; a command naming no host does nothing.

use fleetboot_lab::bmc::{self, BmcLogin, Chassis};
use fleetboot_lab::{can_run, Host, Lab};
use std::path::Path;
use std::process::Command;

const IPMI_MAC: &str = "52:54:00:b3:00:01";
const REDFISH_MAC: &str = "52:54:00:b3:00:02";
const DEAD_MAC: &str = "52:54:00:b3:00:03";
const NO_BMC_MAC: &str = "52:54:00:b3:00:04";
const WRONG_PW_MAC: &str = "52:54:00:b3:00:05";
const UNTRUSTED_MAC: &str = "52:54:00:b3:00:06";
const IPMI_PASSWORD: &str = "ipmi-pw-Zq81";
const REDFISH_PASSWORD: &str = "redfish-pw-Xk27";

fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIP: {program} is missing (`cargo xtask setup` installs it)");
    }
    found
}

/// A VM with no disk and no NIC: the firmware runs and finds nothing to boot, which is all a
/// power test needs. Each start records its boot device.
fn start_script(dir: &Path) -> String {
    format!(
        "#!/bin/bash\necho \"$1\" >{dir}/last-boot\n\
         exec qemu-system-x86_64 -nodefaults -display none -machine pc -m 32 \
         -serial file:{dir}/serial.log\n",
        dir = dir.display()
    )
}

struct Run {
    ok: bool,
    out: String,
}

fn fleetboot(admin: &Host, config: &Path, args: &[&str]) -> Run {
    let out = admin
        .cmd(env!("CARGO_BIN_EXE_fleetboot"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains(IPMI_PASSWORD) && !text.contains(REDFISH_PASSWORD),
        "a password was printed:\n{text}"
    );
    Run {
        ok: out.status.success(),
        out: text,
    }
}

/// The line of `out` about `mac`.
fn line<'a>(out: &'a str, mac: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(mac))
        .unwrap_or_else(|| panic!("no line for {mac} in:\n{out}"))
}

#[test]
fn power_and_next_boot_through_ipmi_and_redfish_emulators() {
    if !can_run()
        || !have("ipmi_sim")
        || !have("ipmitool")
        || !have("qemu-system-x86_64")
        || !have("openssl")
    {
        return;
    }
    if !bmc::have_sushy() {
        eprintln!(
            "SKIP: the Redfish emulator is missing ({}; `cargo xtask setup` installs it)",
            bmc::sushy_venv().display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut lab = Lab::new("bmc").expect("a network lab");
    let admin = lab
        .host("badm", "52:54:00:b3:00:fe", Some("10.81.0.2/24"))
        .unwrap();
    let ipmi_host = lab
        .host("bipmi", "52:54:00:b3:00:fd", Some("10.81.0.11/24"))
        .unwrap();
    let rf_host = lab
        .host("brf", "52:54:00:b3:00:fc", Some("10.81.0.12/24"))
        .unwrap();

    let ipmi_vm = Chassis::new(&d.join("vm-ipmi"), &start_script(&d.join("vm-ipmi"))).unwrap();
    let rf_vm = Chassis::new(&d.join("vm-rf"), &start_script(&d.join("vm-rf"))).unwrap();
    let ipmi_login = BmcLogin {
        address: "10.81.0.11".into(),
        port: 623,
        username: "admin".into(),
        password: IPMI_PASSWORD.into(),
    };
    let _ipmi_sim = bmc::ipmi_sim(
        &ipmi_host,
        Some(&ipmi_vm),
        &ipmi_login,
        None,
        &d.join("ipmi"),
    )
    .unwrap();
    let rf_login = BmcLogin {
        address: "10.81.0.12".into(),
        port: 8443,
        username: "root".into(),
        password: REDFISH_PASSWORD.into(),
    };
    let (_sushy, cert) = bmc::sushy(
        &rf_host,
        &rf_vm,
        &rf_login,
        ("8a1c3e0a-5f0b-4d3e-9b1e-f1eeb00b0002", REDFISH_MAC),
        &d.join("redfish"),
    )
    .unwrap();

    std::fs::write(d.join("ipmi.pw"), format!("{IPMI_PASSWORD}\n")).unwrap();
    std::fs::write(d.join("wrong.pw"), "not-the-password\n").unwrap();
    std::fs::copy(&cert, d.join("bmc-ca.pem")).unwrap();
    let config = d.join("fleetboot.yaml");
    std::fs::write(
        &config,
        format!(
            "interface: eth0\nhttp_port: 8080\nboot_dir: boot\nstore: store\nstate_dir: state\n\
             dhcp: {{ mode: off }}\n\
             groups:\n\
             \x20 rack:\n\
             \x20   bmc: {{ type: ipmi, username: admin, password_file: ipmi.pw, cipher_suite: 3 }}\n\
             hosts:\n\
             \x20 \"{IPMI_MAC}\": {{ group: rack, bmc: {{ address: 10.81.0.11 }} }}\n\
             \x20 \"{DEAD_MAC}\": {{ group: rack, bmc: {{ address: 10.81.0.99 }} }}\n\
             \x20 \"{WRONG_PW_MAC}\": {{ group: rack, bmc: {{ address: 10.81.0.11, password_file: wrong.pw }} }}\n\
             \x20 \"{REDFISH_MAC}\":\n\
             \x20   bmc: {{ type: redfish, address: 10.81.0.12, port: 8443, username: root,\n\
             \x20           password_env: FB_TEST_REDFISH_PW, ca_file: bmc-ca.pem }}\n\
             \x20 \"{UNTRUSTED_MAC}\":\n\
             \x20   bmc: {{ type: redfish, address: 10.81.0.12, port: 8443, username: root,\n\
             \x20           password_env: FB_TEST_REDFISH_PW }}\n\
             \x20 \"{NO_BMC_MAC}\": {{}}\n"
        ),
    )
    .unwrap();
    std::env::set_var("FB_TEST_REDFISH_PW", REDFISH_PASSWORD);
    let run = |args: &[&str]| fleetboot(&admin, &config, args);

    // Both machines are off; status says so through both protocols.
    let r = run(&["power", "status", IPMI_MAC, REDFISH_MAC]);
    assert!(r.ok, "{}", r.out);
    assert!(line(&r.out, IPMI_MAC).ends_with("off"), "{}", r.out);
    assert!(line(&r.out, REDFISH_MAC).ends_with("off"), "{}", r.out);

    // On: the VMs really run.
    let r = run(&["power", "on", IPMI_MAC, REDFISH_MAC]);
    assert!(r.ok, "{}", r.out);
    ipmi_vm.wait_power(true, 10).unwrap();
    rf_vm.wait_power(true, 10).unwrap();
    let r = run(&["power", "status", IPMI_MAC, REDFISH_MAC]);
    assert!(line(&r.out, IPMI_MAC).ends_with("on"), "{}", r.out);
    assert!(line(&r.out, REDFISH_MAC).ends_with("on"), "{}", r.out);
    // What the BMCs said is recorded: `host list` shows it.
    let r = run(&["host", "list", "--json"]);
    let hosts: serde_json::Value = serde_json::from_str(&r.out).expect(&r.out);
    let power = |mac: &str| {
        hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["mac"] == mac)
            .map(|h| h["power"].clone())
            .unwrap()
    };
    assert_eq!(power(IPMI_MAC), "on");
    assert_eq!(power(REDFISH_MAC), "on");
    assert_eq!(power(NO_BMC_MAC), serde_json::Value::Null);

    // Every kind of trouble is that host's alone; the others are answered.
    let r = run(&[
        "power",
        "status",
        IPMI_MAC,
        DEAD_MAC,
        NO_BMC_MAC,
        WRONG_PW_MAC,
        UNTRUSTED_MAC,
        REDFISH_MAC,
    ]);
    assert!(!r.ok, "failures make the command fail:\n{}", r.out);
    assert!(line(&r.out, IPMI_MAC).ends_with("on"), "{}", r.out);
    assert!(line(&r.out, REDFISH_MAC).ends_with("on"), "{}", r.out);
    assert!(
        line(&r.out, DEAD_MAC).contains("IPMI BMC 10.81.0.99"),
        "{}",
        r.out
    );
    assert!(
        line(&r.out, NO_BMC_MAC).contains("no bmc is configured"),
        "{}",
        r.out
    );
    assert!(line(&r.out, WRONG_PW_MAC).contains("error"), "{}", r.out);
    assert!(
        line(&r.out, UNTRUSTED_MAC).contains("ca_file"),
        "an untrusted certificate is refused and says what to do:\n{}",
        r.out
    );

    // Cycle: the same VM process does not survive it (a new start).
    let starts = (ipmi_vm.starts().len(), rf_vm.starts().len());
    let r = run(&["power", "cycle", IPMI_MAC, REDFISH_MAC]);
    assert!(r.ok, "{}", r.out);
    ipmi_vm.wait_power(true, 10).unwrap();
    rf_vm.wait_power(true, 10).unwrap();
    assert_eq!(ipmi_vm.starts().len(), starts.0 + 1);
    assert_eq!(rf_vm.starts().len(), starts.1 + 1);
    assert_eq!(ipmi_vm.starts().last().map(String::as_str), Some("disk"));

    // reimage --reboot: PXE on the next boot, power cycled; with no appliance running, nothing
    // reports, so it times out and says so.
    let r = run(&[
        "reimage",
        IPMI_MAC,
        REDFISH_MAC,
        "--reboot",
        "--timeout",
        "2s",
    ]);
    assert!(!r.ok, "{}", r.out);
    assert!(r.out.contains("booting from the network"), "{}", r.out);
    assert!(r.out.contains("no outcome after 2s"), "{}", r.out);
    ipmi_vm.wait_power(true, 10).unwrap();
    rf_vm.wait_power(true, 10).unwrap();
    assert_eq!(ipmi_vm.starts().last().map(String::as_str), Some("pxe"));
    assert_eq!(rf_vm.starts().last().map(String::as_str), Some("pxe"));
    // The override was for that boot only.
    let r = run(&["power", "cycle", IPMI_MAC, REDFISH_MAC]);
    assert!(r.ok, "{}", r.out);
    ipmi_vm.wait_power(true, 10).unwrap();
    rf_vm.wait_power(true, 10).unwrap();
    assert_eq!(ipmi_vm.starts().last().map(String::as_str), Some("disk"));
    assert_eq!(rf_vm.starts().last().map(String::as_str), Some("disk"));

    // Off.
    let r = run(&["power", "off", "--group", "rack"]);
    assert!(
        !r.ok,
        "the group holds the dead and the wrong-password BMCs"
    );
    assert!(line(&r.out, IPMI_MAC).ends_with("powered off"), "{}", r.out);
    ipmi_vm.wait_power(false, 10).unwrap();
    assert!(
        rf_vm.powered().unwrap(),
        "a host outside the group is left alone"
    );
    let r = run(&["power", "off", REDFISH_MAC]);
    assert!(r.ok, "{}", r.out);
    rf_vm.wait_power(false, 10).unwrap();

    // No host named: nothing is done, never "every host".
    rf_vm.set_power(true).unwrap();
    // The chassis starts the VM in the background: wait until it runs, or the check below
    // could see a start still under way (it failed a CI run so) rather than a refusal.
    rf_vm.wait_power(true, 10).unwrap();
    let r = run(&["power", "off"]);
    assert!(!r.ok);
    assert!(
        r.out.contains("name at least one MAC or a group"),
        "{}",
        r.out
    );
    assert!(rf_vm.powered().unwrap());

    // The appliance asks every BMC for its host's power (the VM turned on by hand above is
    // seen), and the dashboard shows it, in a real browser.
    std::fs::create_dir_all(d.join("boot")).unwrap();
    let mut serve = admin
        .spawn(
            env!("CARGO_BIN_EXE_fleetboot"),
            &["serve", "--config", config.to_str().unwrap()],
            &d.join("serve.log"),
        )
        .unwrap();
    serve.wait_for("serving HTTP", 20).unwrap();
    let row = |dom: &str, mac: &str| -> String {
        dom.split("<tr")
            .find(|r| r.contains(mac))
            .unwrap_or_default()
            .to_string()
    };
    let started = std::time::Instant::now();
    let dom = loop {
        let dom = dashboard(&admin, d);
        let (ipmi_row, rf_row) = (row(&dom, IPMI_MAC), row(&dom, REDFISH_MAC));
        if ipmi_row.contains(">off<") && rf_row.contains(">on<") {
            break dom;
        }
        assert!(
            started.elapsed().as_secs() < 60,
            "the dashboard shows no fresh power states:\n{dom}\n{}",
            serve.log_text()
        );
        std::thread::sleep(std::time::Duration::from_secs(2));
    };
    assert!(row(&dom, DEAD_MAC).contains(">unknown<"), "{dom}");
    assert!(!dom.contains(IPMI_PASSWORD) && !dom.contains(REDFISH_PASSWORD));
}

/// The dashboard's DOM as headless Chromium renders it.
fn dashboard(admin: &Host, dir: &Path) -> String {
    let out = admin
        .cmd("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--timeout=5000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .args(["--dump-dom", "http://10.81.0.2:8080/"])
        .output()
        .expect("chromium (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
