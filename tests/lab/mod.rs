//! A network lab for tests: a "switch" namespace holding a bridge, and hosts (namespaces) each
//! plugged into it by a veth pair. Everything lives in namespaces this test creates and removes;
//! nothing touches the machine's own interfaces.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether we may create namespaces (root). Tests skip with a message otherwise; CI is root.
pub fn can_run() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        eprintln!("SKIP: network-namespace tests need root (CI runs them as root)");
    }
    root
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run a command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A lab: the switch and its hosts; torn down on drop.
pub struct Lab {
    pub id: String,
    switch: String,
    hosts: Vec<String>,
}

/// A host of the lab: its namespace, its interface name (inside it) and its port on the switch.
#[derive(Clone)]
pub struct Host {
    pub ns: String,
    pub ifname: String,
    pub switch: String,
    pub port: String,
}

impl Lab {
    pub fn new() -> Lab {
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("fbsw{id}");
        sh(&["ip", "netns", "add", &switch]);
        sh(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &switch, "link", "set", "br0", "up"]);
        Lab {
            id,
            switch,
            hosts: Vec::new(),
        }
    }

    /// Adds a host named `name` with `mac` and, optionally, an address like `10.77.0.1/24`.
    pub fn host(&mut self, name: &str, mac: &str, addr: Option<&str>) -> Host {
        let ns = format!("fb{name}{}", self.id);
        let n = self.hosts.len();
        // Each host has its own namespace, so every host's interface can be eth0.
        let inside = "eth0".to_string();
        let outside = format!("p{n}x{}", self.id);
        sh(&["ip", "netns", "add", &ns]);
        self.hosts.push(ns.clone());
        // No duplicate address detection: link-local IPv6 addresses usable at once.
        for key in [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ] {
            sh(&["ip", "netns", "exec", &ns, "sysctl", "-q", "-w", key]);
        }
        sh(&[
            "ip",
            "-n",
            &self.switch,
            "link",
            "add",
            &outside,
            "type",
            "veth",
            "peer",
            "name",
            &inside,
            "netns",
            &ns,
        ]);
        sh(&[
            "ip",
            "-n",
            &self.switch,
            "link",
            "set",
            &outside,
            "master",
            "br0",
            "up",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", &inside, "address", mac]);
        sh(&["ip", "-n", &ns, "link", "set", &inside, "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        if let Some(a) = addr {
            sh(&["ip", "-n", &ns, "addr", "add", a, "dev", &inside]);
        }
        Host {
            ns,
            ifname: inside,
            switch: self.switch.clone(),
            port: outside,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            // Processes still inside would keep the namespace alive: end them first.
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Host {
    /// Unplugs (`false`) or plugs back (`true`) the host's cable: its port on the switch goes
    /// down, so the host's link loses carrier, as when a cable or a switch port fails.
    pub fn plug(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        sh(&["ip", "-n", &self.switch, "link", "set", &self.port, state]);
    }

    /// A command run inside this host's namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Starts a long-running process inside the namespace, output to `log`.
    pub fn spawn(&self, program: &str, args: &[&str], log: &Path) -> Daemon {
        let file = std::fs::File::create(log).expect("log file");
        let child = self
            .cmd(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn in namespace");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }
}

/// A process in a namespace; killed on drop.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Waits until the log contains `text` (or fails the test after `secs` seconds).
    pub fn wait_for(&mut self, text: &str, secs: u64) {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(text) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("process exited ({status}) before logging {text:?}:\n{log}");
            }
            assert!(
                Instant::now() < until,
                "no {text:?} in the log after {secs} s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL (as a crash or `kill -9` would) and reaps it.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on a thread that has entered namespace `ns`, so sockets it makes live there.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the namespace");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file we hold open; it affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}
