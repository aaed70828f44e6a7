//! `fleetboot host show` and `fleetboot host log` through the binary, against a state folder
//! written by the appliance's own code (an inspected unknown machine, a known host with a BMC,
//! an install's log).

use fleetboot::fleet::logs::InstallLogs;
use fleetboot::fleet::FleetState;
use fleetboot_image::api::{DiskInfo, Inventory, SystemInfo};
use std::process::Command;

const KNOWN: &str = "52:54:00:c1:00:01";
const UNKNOWN: &str = "52:54:00:c1:00:99";

fn fleetboot(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    fleetboot_with(config, args, &[])
}

/// [`fleetboot`] with more environment variables.
fn fleetboot_with(config: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetboot"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("FB_TEST_BMC_PW", "pw-never-shown")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("pw-never-shown"), "{text}");
    (out.status.success(), text)
}

#[test]
fn host_show_prints_the_inventory_and_how_to_enrol_and_host_log_the_install() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetboot.yaml");
    std::fs::write(
        &config,
        format!(
            "interface: lo\nstore: store\nstate_dir: state\nunknown_hosts: discover\n\
             groups:\n  db: {{ image: debian@2 }}\n\
             rules:\n  - {{ match: {{ product: \"PowerEdge R650\", memory: \">=256G\" }}, group: db }}\n\
             hosts:\n  \
             \"{KNOWN}\": {{ bmc: {{ type: ipmi, address: 10.0.0.5, username: admin, \
             password_env: FB_TEST_BMC_PW }}, disk: {{ size: \">=500G\", rotational: false }} }}\n"
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let fleet = FleetState::open(&state).unwrap();
    let unknown = UNKNOWN.parse().unwrap();
    fleet.seen(unknown, None, None).unwrap();
    let inv = Inventory {
        system: SystemInfo {
            vendor: Some("Dell Inc.".into()),
            product: Some("PowerEdge R650".into()),
            serial: Some("ABC1234".into()),
            uuid: None,
        },
        cpus: 64,
        cpu_model: Some("Xeon Gold".into()),
        memory_bytes: 256 << 30,
        disks: vec![DiskInfo {
            name: "nvme0n1".into(),
            size_bytes: 960 << 30,
            serial: Some("S5XNNA0R".into()),
            by_path: Some("pci-0000:00:05.0-nvme-1".into()),
            ..Default::default()
        }],
        nics: vec![],
        bmc_address: Some("10.1.2.3".into()),
        bmc_mac: Some("02:00:00:00:06:23".into()),
    };
    fleet
        .save_inventory(unknown, &serde_json::to_string(&inv).unwrap())
        .unwrap();

    let (ok, out) = fleetboot(&config, &["host", "show", UNKNOWN]);
    assert!(ok, "{out}");
    for wanted in [
        "status discovered (inspected)",
        "Dell Inc. PowerEdge R650 serial ABC1234",
        "64 CPUs (Xeon Gold), 256.0 GiB memory",
        "disk nvme0n1 960.0 GiB",
        "serial S5XNNA0R",
        "by-path pci-0000:00:05.0-nvme-1",
        "matches rule 1 (line 8, group db): installs debian@2 at its next boot",
        "BMC found by the machine at 10.1.2.3 (02:00:00:00:06:23)",
        "to enrol it",
        &format!("\"{UNKNOWN}\": {{ image: IMAGE, hostname: HOSTNAME }}"),
        "serial ABC1234, BMC 10.1.2.3",
    ] {
        assert!(out.contains(wanted), "no {wanted:?} in:\n{out}");
    }
    let (ok, out) = fleetboot(&config, &["host", "show", UNKNOWN, "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["inventory"]["disks"][0]["serial"], "S5XNNA0R");
    assert_eq!(v["host"]["status"], "discovered");
    assert_eq!(v["rule"]["image"], "debian@2");

    // The known host's disk hints, checked against its inventory: one disk of two matches.
    let known_mac = KNOWN.parse().unwrap();
    fleet.seen(known_mac, None, None).unwrap();
    let mut two = inv.clone();
    two.disks.push(DiskInfo {
        name: "sda".into(),
        size_bytes: 4000 << 30,
        rotational: true,
        ..Default::default()
    });
    fleet
        .save_inventory(known_mac, &serde_json::to_string(&two).unwrap())
        .unwrap();
    let (ok, out) = fleetboot(&config, &["host", "show", KNOWN]);
    assert!(ok, "{out}");
    assert!(out.contains("pick nvme0n1"), "{out}");
    assert!(out.contains("bmc ipmi 10.0.0.5 as admin"), "{out}");
    assert!(!out.contains("to enrol"), "{out}");
    let (ok, out) = fleetboot(&config, &["host", "show", "52:54:00:c1:00:77"]);
    assert!(!ok && out.contains("no host 52:54:00:c1:00:77"), "{out}");

    // An install's log, as the agent appended it.
    let logs = InstallLogs::new(&state);
    let known = KNOWN.parse().unwrap();
    let (ok, out) = fleetboot(&config, &["host", "log", KNOWN]);
    assert!(!ok && out.contains("no install log"), "{out}");
    logs.append(
        known,
        "fleetboot-0123abcd",
        0,
        b"fleetboot-agent: installing os@1\n",
    )
    .unwrap();
    let (ok, out) = fleetboot(&config, &["host", "log", KNOWN]);
    assert!(ok, "{out}");
    assert_eq!(out, "fleetboot-agent: installing os@1\n");
    let (ok, out) = fleetboot(&config, &["host", "log", KNOWN, "--list"]);
    assert!(
        ok && out.starts_with("fleetboot-0123abcd  ") && out.contains("33 bytes"),
        "{out}"
    );
}

/// Two appliances share one file, one per provisioning network: each, told its site by
/// `FLEETBOOT_SITE`, lists its own hosts (and the state of its own SQLite), not the other's.
#[test]
fn appliances_sharing_one_file_each_list_their_own_site() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetboot.yaml");
    std::fs::write(
        &config,
        "interface: lo\nstore: store\nstate_dir: state\n\
         groups:\n  rack-a: { image: debian, site: a }\n  rack-b: { image: debian, site: b }\n\
         hosts:\n  \"52:54:00:5a:00:01\": { group: rack-a }\n  \
         \"52:54:00:5b:00:01\": { group: rack-b }\n",
    )
    .unwrap();
    let list = |site: &str| {
        let (ok, text) = fleetboot_with(&config, &["host", "list"], &[("FLEETBOOT_SITE", site)]);
        assert!(ok, "{text}");
        text
    };
    let a = list("a");
    assert!(
        a.contains("52:54:00:5a:00:01") && !a.contains("52:54:00:5b:00:01"),
        "{a}"
    );
    let b = list("b");
    assert!(
        b.contains("52:54:00:5b:00:01") && !b.contains("52:54:00:5a:00:01"),
        "{b}"
    );
    // Another site's host is named as such, not as unknown; a site the file does not name is
    // an error, not an empty list.
    for args in [
        &["host", "show", "52:54:00:5b:00:01"][..],
        &["reimage", "52:54:00:5b:00:01"],
    ] {
        let (ok, text) = fleetboot_with(&config, args, &[("FLEETBOOT_SITE", "a")]);
        assert!(!ok && text.contains("is site \"b\"'s"), "{args:?}: {text}");
    }
    let (ok, text) = fleetboot_with(&config, &["host", "list"], &[("FLEETBOOT_SITE", "c")]);
    assert!(!ok && text.contains("it names a, b"), "{text}");
}

/// The shipped systemd unit is one systemd accepts, and starts what exists: checked by
/// `systemd-analyze verify` with its binary path pointed at the one built here.
#[test]
fn the_systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/fleetboot.service"
    ))
    .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/fleetboot serve"),
        "{unit}"
    );
    assert!(
        unit.contains("ExecStartPre=/usr/local/bin/fleetboot check"),
        "{unit}"
    );
    let here = unit.replace("/usr/local/bin/fleetboot", env!("CARGO_BIN_EXE_fleetboot"));
    let path = dir.path().join("fleetboot.service");
    std::fs::write(&path, &here).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd; cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A typo is caught: the check is not a formality.
    std::fs::write(
        &path,
        here.replace("[Service]", "[Service]\nExecStrat=/bin/true"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("ExecStrat"), "{said}");
}
