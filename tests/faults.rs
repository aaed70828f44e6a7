//! Faults end to end, with real processes on a namespaced network: `fleetboot serve` in one
//! namespace, the agent (`fleetboot-agent deploy`, the program that is `/init` on a machine; here
//! writing to a file) in another, the appliance's link shaped to 64 Mbit/s so an install takes
//! seconds and a fault can land in the middle of it:
//! - the appliance is killed (-9) and started again 20 s later: the agent waits and finishes;
//! - the machine's cable is pulled for 20 s: the same;
//! - a pack is damaged while the machine installs from it: the agent reports `failed` with the
//!   reason, the host is not shown installed, and its next boot runs the agent again.
//!
//! Every test checks that the disk reads back identical to the image. The agent binary is the
//! workspace's (`cargo test --workspace` builds it beside `fleetboot`).

use fleetboot_lab::{can_run, Daemon, Host, Lab};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:fa:00:01";
const SERVER_IP: &str = "10.78.0.1";
const IMAGE_BYTES: usize = 48 << 20;
/// How long the appliance is down, or the cable out.
const OUTAGE: Duration = Duration::from_secs(20);
/// The appliance's link: 48 MiB take about 6 s.
const LINK_RATE: &str = "64mbit";

/// `len` bytes that compress to nothing and share nothing (xorshift).
fn random(mut x: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn agent_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_fleetboot")).with_file_name("fleetboot-agent");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo test --workspace`, or `cargo build -p fleetboot-agent` first",
        bin.display()
    );
    bin
}

/// An appliance with one image assigned to MAC, and the machine, on one switch.
/// Fields drop in order: the appliance, then the namespaces, then the files.
struct Rig {
    serve: Option<Daemon>,
    _lab: Lab,
    server: Host,
    machine: Host,
    starts: usize,
    image: Vec<u8>,
    config: PathBuf,
    dir: tempfile::TempDir,
}

impl Rig {
    fn new(seed: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let image = random(seed, IMAGE_BYTES);
        let raw = dir.path().join("os.img");
        std::fs::write(&raw, &image).unwrap();
        let store = fleetboot::store::Store::new(dir.path().join("store"));
        // 1 MiB frames: the install is many requests, so faults land between and during them.
        let options = fleetboot::store::ImportOptions {
            frame_bytes: 1 << 20,
            ..Default::default()
        };
        fleetboot::store::import::import(&store, "os", &raw, &options, &|_, _| {}).unwrap();
        std::fs::remove_file(&raw).unwrap();
        std::fs::create_dir_all(dir.path().join("boot")).unwrap();
        let config = dir.path().join("fleetboot.yaml");
        std::fs::write(
            &config,
            format!(
                "interface: eth0\nhttp_port: 8080\nboot_dir: boot\nstore: store\nstate_dir: state\n\
                 dhcp: {{ mode: off }}\nhosts:\n  \"{MAC}\": {{ image: os }}\n"
            ),
        )
        .unwrap();
        let mut lab = Lab::new("faults").expect("a network lab");
        let server = lab
            .host(
                "fsrv",
                "52:54:00:fa:00:fe",
                Some(&format!("{SERVER_IP}/24")),
            )
            .expect("a lab host");
        let machine = lab
            .host("fm", MAC, Some("10.78.0.20/24"))
            .expect("a lab host");
        let tc = server
            .cmd("tc")
            .args([
                "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", LINK_RATE,
            ])
            .args(["burst", "64kb", "latency", "50ms"])
            .status()
            .unwrap();
        assert!(tc.success(), "tc could not shape the appliance's link");
        let mut rig = Rig {
            dir,
            image,
            config,
            server,
            machine,
            serve: None,
            starts: 0,
            _lab: lab,
        };
        rig.start_appliance();
        rig
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_appliance(&mut self) {
        self.starts += 1;
        let log = self.path(&format!("serve-{}.log", self.starts));
        let mut d = self
            .server
            .spawn(
                env!("CARGO_BIN_EXE_fleetboot"),
                &["serve", "--config", self.config.to_str().unwrap()],
                &log,
            )
            .expect("a daemon in the lab");
        d.wait_for("serving TFTP", 20).unwrap();
        self.serve = Some(d);
    }

    /// Starts the agent on the machine, as its boot would: no token, it fetches its script.
    fn boot_agent(&self, run: &str) -> Agent {
        let log = self.path(&format!("agent-{run}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .machine
            .cmd(agent_bin().to_str().unwrap())
            .args(["deploy", "--server", &format!("http://{SERVER_IP}:8080")])
            .args(["--mac", MAC, "--target"])
            .arg(self.path("disk.img"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Agent { child, log }
    }

    /// Waits until the agent has written `fraction` of the image to the disk.
    fn wait_written(&self, agent: &mut Agent, fraction: f64) {
        let until = Instant::now() + Duration::from_secs(120);
        let want = (IMAGE_BYTES as f64 * fraction) as u64;
        loop {
            let written = std::fs::metadata(self.path("disk.img")).map_or(0, |m| m.blocks() * 512);
            if written >= want {
                return;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "the agent ended ({status}) after {written} bytes:\n{}",
                    agent.log_text()
                );
            }
            assert!(
                Instant::now() < until,
                "only {written} bytes written after 120 s:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(self.path("disk.img")).unwrap()
    }

    /// The host as `fleetboot host list --json` shows it.
    fn host(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_fleetboot"))
            .args(["host", "list", "--json", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["mac"] == MAC)
            .cloned()
            .expect("the host is listed")
    }

    fn assert_installed(&self, agent_log: &str) {
        assert!(
            self.disk() == self.image,
            "the disk reads back identical to the image"
        );
        let h = self.host();
        assert_eq!(h["status"], "installed", "{h}\n{agent_log}");
        assert_eq!(h["installed"]["name"], "os", "{h}");
        assert_eq!(h["pending"], false, "{h}");
    }
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the agent to end (it retries for minutes, so this bounds the test).
    fn finish(&mut self) -> ExitStatus {
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("the agent did not finish in 300 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_appliance_killed_mid_install_and_back_20_s_later_the_install_finishes() {
    if !can_run() {
        return;
    }
    let mut rig = Rig::new(81);
    let mut agent = rig.boot_agent("1");
    rig.wait_written(&mut agent, 0.25);
    rig.serve.as_mut().unwrap().kill_9();
    let down = Instant::now();
    std::thread::sleep(OUTAGE);
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent waits for the appliance:\n{}",
        agent.log_text()
    );
    rig.start_appliance();
    let status = agent.finish();
    let log = agent.log_text();
    assert!(status.success(), "the install finished:\n{log}");
    assert!(log.contains("retrying"), "the agent saw the outage:\n{log}");
    eprintln!(
        "appliance down {:?}; install finished {:?} after it went down",
        OUTAGE,
        down.elapsed()
    );
    rig.assert_installed(&log);
}

#[test]
fn the_machine_cut_off_for_20_s_mid_install_finishes() {
    if !can_run() {
        return;
    }
    let rig = Rig::new(82);
    let mut agent = rig.boot_agent("1");
    rig.wait_written(&mut agent, 0.25);
    rig.machine.plug(false).expect("the switch port");
    let before = std::fs::metadata(rig.path("disk.img")).unwrap().blocks();
    std::thread::sleep(OUTAGE);
    let during = std::fs::metadata(rig.path("disk.img")).unwrap().blocks();
    rig.machine.plug(true).expect("the switch port");
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent waits for its link:\n{}",
        agent.log_text()
    );
    // At most what was in flight lands while the cable is out (a frame per worker, 1 MiB each).
    assert!(
        (during - before) * 512 <= 16 << 20,
        "the cut stopped the transfer: {} bytes written while cut off",
        (during - before) * 512
    );
    let status = agent.finish();
    let log = agent.log_text();
    assert!(status.success(), "the install finished:\n{log}");
    rig.assert_installed(&log);
}

#[test]
fn a_pack_damaged_during_the_install_fails_it_and_the_next_boot_runs_the_agent_again() {
    if !can_run() {
        return;
    }
    let rig = Rig::new(83);
    // The frame holding the image's last bytes: the agent fetches it last.
    let store = fleetboot::store::Store::new(rig.path("store"));
    let (_, m) = store.manifest(&"os".parse().unwrap()).unwrap();
    let last = m
        .extents
        .iter()
        .rev()
        .find_map(|x| x.entry)
        .expect("the image has data");
    let e = &m.entries[last as usize];
    let pack = store.pack_path(&m.packs[e.pack as usize]);
    let at = e.frame_offset + u64::from(e.frame_stored) / 2;

    let mut agent = rig.boot_agent("1");
    rig.wait_written(&mut agent, 0.1);
    // Damaged in place (the appliance holds the pack open): a flipped byte, as a bad disk would.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&pack)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5a], at).unwrap();
    let status = agent.finish();
    let log = agent.log_text();
    assert!(!status.success(), "the install failed:\n{log}");
    assert!(log.contains("damaged"), "the agent says why:\n{log}");
    let h = rig.host();
    assert_eq!(h["status"], "failed", "{h}");
    assert!(h["installed"].is_null(), "not shown installed: {h}");
    assert!(
        h["detail"].as_str().unwrap_or_default().contains("damaged"),
        "the reason is kept: {h}"
    );
    assert_eq!(h["pending"], true, "{h}");
    // The half-written disk boots nothing: its boot area is written last, so it is still zero
    // (the image's own first bytes are random).
    let disk = rig.disk();
    assert!(rig.image[..512].iter().any(|&b| b != 0));
    assert!(
        disk[..1 << 20].iter().all(|&b| b == 0),
        "a failed install leaves no boot sector or partition table"
    );

    // The pack is mended (restored from a backup); the next boot runs the agent, which installs.
    file.write_all_at(&byte, at).unwrap();
    let mut agent = rig.boot_agent("2");
    let status = agent.finish();
    let log = agent.log_text();
    assert!(
        status.success(),
        "the next boot ran the agent and installed:\n{log}"
    );
    rig.assert_installed(&log);
}
