//! The store in a real distributed S3 store: three Garage nodes in network namespaces,
//! replication factor 3. Two "appliances" (two staging folders, as two machines would have)
//! share the bucket: every store command works on it as on a folder, concurrent imports never
//! take the same version, gc's retired packs stay readable, and a storage node killed mid-way
//! loses nothing.
//!
//! Needs root and the Garage binary: run by `cargo xtask s3`, which installs Garage and sets
//! `FLEETBOOT_GARAGE`; ignored by the plain test run (building Garage takes longer than CI has).

mod common;

use common::{next_version, synthetic_image};
use fleetboot_lab::garage::{garage_bin, Garage};
use fleetboot_lab::{Host, Lab};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const STORE: &str = "s3://fleetboot/site-a";

/// A machine running fleetboot commands against the bucket, with its own staging folder.
struct Appliance<'a> {
    host: &'a Host,
    env: Vec<(&'static str, String)>,
    staging: PathBuf,
}

impl Appliance<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.host.cmd(env!("CARGO_BIN_EXE_fleetboot"));
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.env("FLEETBOOT_STORE", STORE)
            .env("FLEETBOOT_S3_STAGING", &self.staging)
            .args(args)
            .stdin(Stdio::null());
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run fleetboot")
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "fleetboot {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn export(&self, image: &str, out: &Path) -> Vec<u8> {
        let _ = std::fs::remove_file(out);
        self.ok(&[
            "image",
            "export",
            image,
            &out.to_string_lossy(),
            "--check-digest",
        ]);
        std::fs::read(out).expect("read export")
    }
}

#[test]
#[ignore = "needs Garage (FLEETBOOT_GARAGE) and root: cargo xtask s3"]
fn the_store_works_the_same_in_a_three_node_garage() {
    let bin = garage_bin().expect("FLEETBOOT_GARAGE names the garage binary");
    assert!(
        fleetboot_lab::is_root(),
        "the S3 test makes namespaces: run as root"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let mut lab = Lab::new("s3").expect("lab");
    let mut garage = Garage::start(&mut lab, &bin, 79, dir.path()).expect("garage cluster");
    let client = lab
        .host("cl", "02:00:00:79:00:10", Some("10.79.0.10/24"))
        .expect("client host");

    let a = synthetic_image(101, 3000, 100);
    let b = next_version(&a, 102, 200);
    let c = next_version(&b, 103, 200);
    let file = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).expect("write image");
        p
    };
    let (pa, pb, pc) = (file("a.img", &a), file("b.img", &b), file("c.img", &c));
    let one = Appliance {
        host: &client,
        env: garage.env(0),
        staging: dir.path().join("staging-1"),
    };
    let two = Appliance {
        host: &client,
        env: garage.env(0),
        staging: dir.path().join("staging-2"),
    };

    // A store that is not there yet: a clear error naming it.
    let out = two.run(&["image", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("s3://fleetboot/site-a"), "{err}");

    assert_eq!(
        one.ok(&["image", "import", "os", &pa.to_string_lossy()])
            .trim(),
        "os@1"
    );
    // Two importers on two machines at once: both land, under different numbers.
    let mut first = one.cmd(&["image", "import", "os", &pb.to_string_lossy()]);
    let mut second = two.cmd(&["image", "import", "os", &pc.to_string_lossy()]);
    let (first, second) = (
        first.stdout(Stdio::piped()).spawn().expect("import 1"),
        second.stdout(Stdio::piped()).spawn().expect("import 2"),
    );
    let (first, second) = (
        first.wait_with_output().expect("import 1"),
        second.wait_with_output().expect("import 2"),
    );
    assert!(first.status.success() && second.status.success());
    let (vb, vc) = (
        String::from_utf8_lossy(&first.stdout).trim().to_string(),
        String::from_utf8_lossy(&second.stdout).trim().to_string(),
    );
    let mut got = [vb.clone(), vc.clone()];
    got.sort();
    assert_eq!(
        got,
        ["os@2", "os@3"],
        "two importers took distinct versions"
    );

    // Read from the other appliance: list, show, diff, export, verify.
    let list = two.ok(&["image", "list"]);
    for v in ["@1", "@2", "@3"] {
        assert!(list.contains(v), "{list}");
    }
    assert!(two.ok(&["image", "show", "os@1"]).contains("os"));
    let diff = two.ok(&["image", "diff", "os@1", &vb]);
    assert!(!diff.trim().is_empty());
    let out = dir.path().join("out.img");
    assert!(two.export("os@1", &out) == a, "os@1 exports as imported");
    assert!(two.export(&vb, &out) == b);
    assert!(one.export(&vc, &out) == c);
    let verify = two.ok(&["store", "verify"]);
    assert!(!verify.contains("damaged"), "{verify}");

    // rm and gc: nothing os@2/os@3 use goes, and what went is kept for the grace period.
    one.ok(&["image", "rm", "os@1"]);
    let gc = one.ok(&["store", "gc"]);
    assert!(two.export(&vb, &out) == b, "after gc: {gc}");
    assert!(
        two.run(&["image", "export", "os@1", "/dev/null"])
            .status
            .code()
            != Some(0)
    );
    let verify = two.ok(&["store", "verify"]);
    assert!(!verify.contains("damaged"), "{verify}");

    // One storage node dies: reads and writes go on (replication 3, quorum 2).
    garage.kill(2);
    assert!(two.export(&vc, &out) == c, "an export with a node down");
    let d = next_version(&c, 104, 50);
    let pd = file("d.img", &d);
    assert_eq!(
        two.ok(&["image", "import", "os", &pd.to_string_lossy()])
            .trim(),
        "os@4"
    );
    assert!(one.export("os@4", &out) == d);
}

/// The agent binary (built by `cargo xtask s3`, which names it in `FLEETBOOT_AGENT`).
fn agent_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("FLEETBOOT_AGENT").expect("FLEETBOOT_AGENT names the agent"))
}

#[test]
#[ignore = "needs Garage (FLEETBOOT_GARAGE), the agent (FLEETBOOT_AGENT) and root: cargo xtask s3"]
fn an_agent_installs_through_a_second_appliance_while_a_node_dies_and_gc_runs() {
    let bin = garage_bin().expect("FLEETBOOT_GARAGE names the garage binary");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut lab = Lab::new("s3i").expect("lab");
    let mut garage = Garage::start(&mut lab, &bin, 80, dir.path()).expect("garage cluster");
    let client = lab
        .host("cl", "02:00:00:80:00:10", Some("10.80.0.10/24"))
        .expect("client host");
    let app = lab
        .host("app2", "02:00:00:80:00:20", Some("10.80.0.20/24"))
        .expect("appliance host");
    const MAC: &str = "52:54:00:80:00:30";
    let machine = lab
        .host("m1", MAC, Some("10.80.0.30/24"))
        .expect("machine host");
    // A link slow enough that the install is still running when the node dies and gc runs.
    let tc = machine
        .cmd("tc")
        .args(["qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "40mbit"])
        .args(["burst", "64kb", "latency", "100ms"])
        .status()
        .expect("tc");
    assert!(tc.success());

    // Appliance 1 imports two versions; the second shares most of its data with the first.
    let a = synthetic_image(201, 16384, 0);
    let b = next_version(&a, 202, 2000);
    let (pa, pb) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&pa, &a).expect("write a");
    std::fs::write(&pb, &b).expect("write b");
    let one = Appliance {
        host: &client,
        env: garage.env(0),
        staging: dir.path().join("staging-1"),
    };
    one.ok(&["image", "import", "os", &pa.to_string_lossy()]);
    one.ok(&["image", "import", "os", &pb.to_string_lossy()]);

    // Appliance 2 serves the same bucket to its own network, with its own state.
    let work = dir.path().join("app2");
    std::fs::create_dir_all(work.join("boot")).expect("boot dir");
    let config = work.join("fleetboot.yaml");
    std::fs::write(
        &config,
        format!(
            "interface: eth0\naddress: 10.80.0.20\nhttp_port: 8080\nboot_dir: {boot}\n\
             store: {STORE}\nstate_dir: {state}\ndhcp: {{ mode: off }}\ntftp: {{ port: 6969 }}\n\
             hosts:\n  \"{MAC}\": {{ image: os@2 }}\n",
            boot = work.join("boot").display(),
            state = work.join("state").display()
        ),
    )
    .expect("config");
    let mut serve = app.cmd(env!("CARGO_BIN_EXE_fleetboot"));
    serve
        .envs(garage.env(0))
        .env("FLEETBOOT_S3_STAGING", work.join("staging"))
        .args(["serve", "--config"])
        .arg(&config);
    let mut appliance =
        fleetboot_lab::Daemon::start(&mut serve, &work.join("serve.log")).expect("serve");
    app.wait_listening(8080, false, 20, &mut appliance)
        .expect("appliance 2 listens");

    let target = dir.path().join("disk.img");
    let agent = machine
        .cmd(agent_bin())
        .args(["deploy", "--server", "http://10.80.0.20:8080", "--mac", MAC, "--target"])
        .arg(&target)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // Mid-install: a storage node dies, and appliance 1 removes os@1 and collects garbage
    // (rewriting packs os@2 shares with it, so the manifest the agent follows changes under it).
    garage.kill(2);
    one.ok(&["image", "rm", "os@1"]);
    let gc = one.ok(&["store", "gc"]);
    let out = agent.wait_with_output().expect("agent");
    assert!(
        out.status.success(),
        "the install failed:\n{}\n{}\nappliance:\n{}\ngc: {gc}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        appliance.log_tail()
    );
    let disk = std::fs::read(&target).expect("installed disk");
    assert!(disk[..b.len()] == b[..], "the disk holds os@2 byte for byte");
    // And the store, on the surviving nodes, is whole.
    let verify = one.ok(&["store", "verify"]);
    assert!(!verify.contains("damaged"), "{verify}");
    assert!(one.export("os@2", &dir.path().join("out.img")) == b);
}
