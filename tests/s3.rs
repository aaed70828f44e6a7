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
    assert!(list.contains("1,2,3"), "{list}");
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

/// Garage, appliance 1 (commands) with two versions of an image imported, appliance 2 serving
/// the bucket to its own network, and a machine there assigned `os@2`, on a slow link.
struct InstallRig {
    dir: tempfile::TempDir,
    _lab: Lab,
    garage: Garage,
    client: Host,
    machine: Host,
    appliance: fleetboot_lab::Daemon,
    config: PathBuf,
    net: u8,
    b: Vec<u8>,
}

const MAC: &str = "52:54:00:80:00:30";

impl InstallRig {
    fn start(net: u8, store_access: &str) -> InstallRig {
        let bin = garage_bin().expect("FLEETBOOT_GARAGE names the garage binary");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut lab = Lab::new(&format!("s3-{net}")).expect("lab");
        let garage = Garage::start(&mut lab, &bin, net, dir.path()).expect("garage cluster");
        let addr = |n: u8| format!("10.{net}.0.{n}");
        let mut host = |name: &str, mac: String, n: u8| {
            lab.host(name, &mac, Some(&format!("{}/24", addr(n))))
                .expect("lab host")
        };
        let client = host("cl", format!("02:00:00:{net:02x}:00:10"), 10);
        let app = host("app2", format!("02:00:00:{net:02x}:00:20"), 20);
        let machine = host("m1", MAC.to_string(), 30);
        // A link slow enough that the install is still running when a node dies or gc runs,
        // shaped where data enters the machine: its port on the switch.
        let (switch, port) = machine.port().expect("a plugged host");
        let tc = Command::new("ip")
            .args(["netns", "exec", switch, "tc", "qdisc", "add", "dev", port])
            .args([
                "root", "tbf", "rate", "40mbit", "burst", "64kb", "latency", "100ms",
            ])
            .status()
            .expect("tc");
        assert!(tc.success());

        // Appliance 1 imports two versions; the second keeps only the first tenth of the first
        // (gc works by frame: a frame with one chunk in use is kept), so removing the first
        // leaves its pack mostly unused and gc rewrites it, and the manifest of the second,
        // while the machine installs the second.
        let a = synthetic_image(201, 16384, 0);
        let keep = 1600 * common::BLOCK;
        let mut b = a.clone();
        // The rest: new data every other block (nothing in common with `a`), zeros between.
        for (i, block) in b[keep..].chunks_mut(common::BLOCK).enumerate() {
            if i % 2 == 0 {
                common::Rng(202 + i as u64).fill(block);
            } else {
                block.fill(0);
            }
        }
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
                "interface: eth0\naddress: {}\nhttp_port: 8080\nboot_dir: {boot}\n\
                 store: {STORE}\nstore_access: {store_access}\nstate_dir: {state}\n\
                 dhcp: {{ mode: off }}\ntftp: {{ port: 6969 }}\n\
                 hosts:\n  \"{MAC}\": {{ image: os@2 }}\n",
                addr(20),
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
        InstallRig {
            dir,
            _lab: lab,
            garage,
            client,
            machine,
            appliance,
            config,
            net,
            b,
        }
    }

    fn one(&self) -> Appliance<'_> {
        Appliance {
            host: &self.client,
            env: self.garage.env(0),
            staging: self.dir.path().join("staging-1"),
        }
    }

    /// Asks appliance 2 (its state, through the command line) to install the machine again.
    fn reimage(&self) {
        let mut c = self.client.cmd(env!("CARGO_BIN_EXE_fleetboot"));
        c.envs(self.garage.env(0))
            .args(["reimage", MAC, "--config"])
            .arg(&self.config);
        let out = c.output().expect("reimage");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn agent(&self) -> std::process::Child {
        self.machine
            .cmd(agent_bin())
            .args([
                "deploy",
                "--server",
                &format!("http://{}:8080", self.app_addr()),
            ])
            .args(["--mac", MAC, "--target"])
            .arg(self.dir.path().join("disk.img"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent")
    }

    fn app_addr(&self) -> String {
        format!("10.{}.0.20", self.net)
    }

    /// Waits for the agent and checks the disk holds `os@2`.
    fn installed(&mut self, agent: std::process::Child, what: &str) {
        let out = agent.wait_with_output().expect("agent");
        assert!(
            out.status.success(),
            "the install failed:\n{}\n{}\nappliance:\n{}\n{what}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.appliance.log_tail()
        );
        let disk = std::fs::read(self.dir.path().join("disk.img")).expect("installed disk");
        assert!(
            disk[..self.b.len()] == self.b[..],
            "the disk holds os@2 byte for byte"
        );
    }

    /// The appliance's metrics line `name`.
    fn metric(&self, name: &str) -> u64 {
        let out = self
            .client
            .cmd("curl")
            .args(["-sf", &format!("http://{}:8080/metrics", self.app_addr())])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics"))
    }
}

#[test]
#[ignore = "needs Garage (FLEETBOOT_GARAGE), the agent (FLEETBOOT_AGENT) and root: cargo xtask s3"]
fn an_agent_installs_through_a_second_appliance_while_a_node_dies_and_gc_runs() {
    let mut rig = InstallRig::start(80, "token");
    let mut agent = rig.agent();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        agent.try_wait().expect("agent").is_none(),
        "the install is still running when the node dies"
    );
    // Mid-install: a storage node dies, and appliance 1 removes os@1 and collects garbage
    // (rewriting packs os@2 shares with it, so the manifest the agent follows changes under it).
    rig.garage.kill(2);
    let one = rig.one();
    one.ok(&["image", "rm", "os@1"]);
    let gc = one.ok(&["store", "gc"]);
    assert!(
        gc.contains("rewrote 1 pack(s) and 1 manifest(s)"),
        "gc rewrote os@2's manifest under the install: {gc}"
    );
    assert!(
        agent.try_wait().expect("agent").is_none(),
        "the install is still running after gc"
    );
    rig.installed(agent, &format!("gc: {gc}"));
    // Appliance 2 read each frame from the object store once at most.
    let fetches = rig.metric("fleetboot_frame_fetches_total");
    assert!(fetches > 0, "the install came through the frame cache");
    // And the store, on the surviving nodes, is whole.
    let one = rig.one();
    let verify = one.ok(&["store", "verify"]);
    assert!(!verify.contains("damaged"), "{verify}");
    assert!(one.export("os@2", &rig.dir.path().join("out.img")) == rig.b);
    // Installs of the same image come from the cache: the second fetches only the frames gc
    // moved to a new pack (new places), the third nothing at all.
    let mut seen = vec![fetches];
    for n in ["second", "third"] {
        std::fs::remove_file(rig.dir.path().join("disk.img")).expect("rm disk");
        rig.reimage();
        let agent = rig.agent();
        rig.installed(agent, &format!("{n} install"));
        seen.push(rig.metric("fleetboot_frame_fetches_total"));
    }
    assert!(
        seen[1] - seen[0] < seen[0],
        "frame fetches by install: {seen:?}"
    );
    assert_eq!(seen[2], seen[1], "frame fetches by install: {seen:?}");
}

#[test]
#[ignore = "needs Garage (FLEETBOOT_GARAGE), the agent (FLEETBOOT_AGENT) and root: cargo xtask s3"]
fn with_store_access_direct_the_agent_reads_the_object_store_itself() {
    let mut rig = InstallRig::start(81, "direct");
    let agent = rig.agent();
    rig.installed(agent, "direct");
    assert_eq!(
        rig.metric("fleetboot_frame_fetches_total"),
        0,
        "no frame came through appliance 2"
    );
    // Compacted by appliance 1: the manifests are format 2 (ids in the packs' id tables), which
    // no presigned URL can expand; appliance 2 serves them expanded, the packs still presigned.
    let report = rig.one().ok(&["store", "compact", "--all", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&report).expect("compaction report");
    assert!(
        report["manifests_rewritten"].as_u64().unwrap_or(0) >= 1,
        "{report}"
    );
    std::fs::remove_file(rig.dir.path().join("disk.img")).expect("a fresh disk");
    rig.reimage();
    let agent = rig.agent();
    rig.installed(agent, "direct, after compaction");
    assert_eq!(
        rig.metric("fleetboot_frame_fetches_total"),
        0,
        "no frame came through appliance 2 after compaction either"
    );
}
