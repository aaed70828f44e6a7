//! The network lab that fleetboot's integration tests, its VM end-to-end run (`cargo xtask e2e`)
//! and its service benchmarks (`cargo xtask bench serve`) share: network namespaces this process
//! creates — a switch namespace holding a bridge, hosts plugged into it by veth pairs, tap
//! devices for VMs, or two namespaces joined by one veth — commands and daemons run inside them,
//! and their removal. Nothing here touches the machine's own interfaces.
//!
//! Namespace names are `fb-{lab}-{name}-{pid}-{n}`: a lab left behind by a process that was
//! killed is recognised (its pid is gone) and removed by the next lab made.

pub mod bmc;
pub mod garage;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// What went wrong setting up or running the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{0}")]
    Daemon(String),
}

pub type Result<T> = std::result::Result<T, LabError>;

static LABS: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "fb-";

/// Whether this process may create namespaces (it runs as root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether lab tests can run here; says why not (tests skip; CI runs as root).
pub fn can_run() -> bool {
    let root = is_root();
    if !root {
        eprintln!("SKIP: network-namespace tests need root (CI runs them as root)");
    }
    root
}

/// Runs `ip ARGS…`, failing with its error output.
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// Runs a command to completion, failing with its error output.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|error| LabError::Io {
        what: format!("cannot run {}", show(cmd)),
        error,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: show(cmd),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A command as a shell would show it.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A lab: its namespaces, removed (with whatever still runs in them) on drop.
pub struct Lab {
    name: String,
    tag: String,
    switch: Option<Host>,
    namespaces: Vec<String>,
    ports: usize,
}

/// A namespace of the lab and its one interface: a host (a veth plugged into the switch), the
/// switch itself (its bridge, `br0`), or one end of a linked pair.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub ifname: String,
    /// The switch namespace and the host's port in it (a host plugged into a switch).
    plug: Option<(String, String)>,
}

impl Lab {
    /// A lab named `name` (it names the namespaces) with a switch: a namespace holding a bridge.
    pub fn new(name: &str) -> Result<Lab> {
        let mut lab = Lab::empty(name);
        let ns = lab.add_namespace("sw")?;
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        lab.switch = Some(Host {
            ns,
            ifname: "br0".into(),
            plug: None,
        });
        Ok(lab)
    }

    /// Two namespaces joined by one veth, no switch between them (the shortest path, for
    /// benchmarks): `(name, interface, address/prefix)` for each end.
    pub fn linked(
        name: &str,
        a: (&str, &str, &str),
        b: (&str, &str, &str),
    ) -> Result<(Lab, Host, Host)> {
        let mut lab = Lab::empty(name);
        let (na, nb) = (lab.add_namespace(a.0)?, lab.add_namespace(b.0)?);
        ip(&[
            "-n", &na, "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns", &nb,
        ])?;
        let mut ends = Vec::new();
        for (ns, (_, ifname, addr)) in [(na, a), (nb, b)] {
            ip(&["-n", &ns, "addr", "add", addr, "dev", ifname])?;
            ip(&["-n", &ns, "link", "set", ifname, "up"])?;
            ends.push(Host {
                ns,
                ifname: ifname.to_string(),
                plug: None,
            });
        }
        let b = ends.pop().expect("two ends");
        let a = ends.pop().expect("two ends");
        Ok((lab, a, b))
    }

    fn empty(name: &str) -> Lab {
        remove_stale_namespaces();
        Lab {
            name: name.to_string(),
            tag: format!(
                "{}-{}",
                std::process::id(),
                LABS.fetch_add(1, Ordering::Relaxed)
            ),
            switch: None,
            namespaces: Vec::new(),
            ports: 0,
        }
    }

    fn add_namespace(&mut self, what: &str) -> Result<String> {
        let ns = format!("{PREFIX}{}-{what}-{}", self.name, self.tag);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // No duplicate address detection: link-local IPv6 addresses usable at once.
        for key in [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ] {
            run(Command::new("ip").args(["netns", "exec", &ns, "sysctl", "-q", "-w", key]))?;
        }
        Ok(ns)
    }

    /// The switch namespace, as a host whose interface is the bridge (a server can live there,
    /// beside the tap devices of VMs).
    pub fn switch(&self) -> &Host {
        self.switch
            .as_ref()
            .expect("a lab made by Lab::new has a switch")
    }

    /// Plugs a new host named `name` into the switch: its own namespace, interface `eth0` with
    /// `mac` and, optionally, an address like `10.77.0.1/24`.
    pub fn host(&mut self, name: &str, mac: &str, addr: Option<&str>) -> Result<Host> {
        let switch = self.switch().ns.clone();
        let ns = self.add_namespace(name)?;
        self.ports += 1;
        let port = format!("p{}", self.ports);
        ip(&[
            "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ])?;
        ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "address", mac])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        if let Some(a) = addr {
            ip(&["-n", &ns, "addr", "add", a, "dev", "eth0"])?;
        }
        Ok(Host {
            ns,
            ifname: "eth0".into(),
            plug: Some((switch, port)),
        })
    }

    /// Adds a tap device `name` on the switch's bridge, for a VM started in the switch namespace.
    pub fn tap(&self, name: &str) -> Result<()> {
        let ns = &self.switch().ns;
        ip(&["-n", ns, "tuntap", "add", "dev", name, "mode", "tap"])?;
        ip(&["-n", ns, "link", "set", name, "master", "br0"])?;
        ip(&["-n", ns, "link", "set", name, "up"])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            remove_namespace(ns);
        }
    }
}

/// Kills whatever still runs in `ns` (it would keep the namespace alive) and deletes it.
fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Removes the namespaces of labs whose process is gone (killed before it could clean up).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        if !ns.starts_with(PREFIX) {
            continue;
        }
        // fb-{lab}-{name}-{pid}-{n}
        let mut parts = ns.rsplit('-');
        let (_, pid) = (parts.next(), parts.next().unwrap_or(""));
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            eprintln!("lab: removing namespace {ns}, left by a process that is gone");
            remove_namespace(ns);
        }
    }
}

impl Host {
    /// The switch namespace and this host's port in it (`None`: not plugged into a switch).
    pub fn port(&self) -> Option<(&str, &str)> {
        self.plug
            .as_ref()
            .map(|(ns, port)| (ns.as_str(), port.as_str()))
    }

    /// A command run inside this host's namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Unplugs (`false`) or plugs back (`true`) the host's cable: its port on the switch goes
    /// down, so the host's link loses carrier, as when a cable or a switch port fails.
    pub fn plug(&self, up: bool) -> Result<()> {
        let (switch, port) = self
            .plug
            .as_ref()
            .ok_or_else(|| LabError::Daemon(format!("{} is not plugged into a switch", self.ns)))?;
        ip(&[
            "-n",
            switch,
            "link",
            "set",
            port,
            if up { "up" } else { "down" },
        ])
    }

    /// Starts `program ARGS…` inside the namespace, its output to `log`.
    pub fn spawn(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        log: &Path,
    ) -> Result<Daemon> {
        let mut cmd = self.cmd(program);
        cmd.args(args);
        Daemon::start(&mut cmd, log)
    }

    /// Waits until something in the namespace listens on `port` (UDP or TCP), for up to `secs`.
    pub fn wait_listening(
        &self,
        port: u16,
        udp: bool,
        secs: u64,
        daemon: &mut Daemon,
    ) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(secs);
        let proto = if udp { "-lnu" } else { "-lnt" };
        loop {
            daemon.check_running(&format!("listening on port {port}"))?;
            let out = self
                .cmd("ss")
                .args(["-H", proto, &format!("sport = :{port}")])
                .output()
                .map_err(|error| LabError::Io {
                    what: "cannot run ss".into(),
                    error,
                })?;
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(LabError::Daemon(format!(
                    "{} does not listen on port {port} after {secs} s:\n{}",
                    daemon.name,
                    daemon.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A process started in the lab, its output in a log; stopped (SIGTERM, then SIGKILL after 5 s)
/// on drop.
pub struct Daemon {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` (already in its namespace), its output to `log`.
    pub fn start(cmd: &mut Command, log: &Path) -> Result<Daemon> {
        // `ip netns exec NS PROGRAM ...`: named by its program.
        let name = cmd
            .get_args()
            .nth(3)
            .or(Some(cmd.get_program()))
            .map(|p| {
                let p = Path::new(p);
                p.file_name()
                    .unwrap_or(p.as_os_str())
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        let io = |what: String| move |error| LabError::Io { what, error };
        let file =
            std::fs::File::create(log).map_err(io(format!("cannot create {}", log.display())))?;
        let out = file
            .try_clone()
            .map_err(io("cannot share the log".into()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(file)
            .spawn()
            .map_err(io(format!("cannot start {}", show(cmd))))?;
        Ok(Daemon {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn check_running(&mut self, waiting_for: &str) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(LabError::Daemon(format!(
                "{} exited ({status}) before {waiting_for}:\n{}",
                self.name,
                self.log_tail()
            ))),
            Err(e) => Err(LabError::Io {
                what: format!("cannot check on {}", self.name),
                error: e,
            }),
        }
    }

    /// Waits until its log contains `text`, for up to `secs`.
    pub fn wait_for(&mut self, text: &str, secs: u64) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.log_text().contains(text) {
                return Ok(());
            }
            self.check_running(&format!("logging {text:?}"))?;
            if Instant::now() > until {
                return Err(LabError::Daemon(format!(
                    "no {text:?} in the log of {} after {secs} s:\n{}",
                    self.name,
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// CPU time the process (all its threads) has used so far.
    pub fn cpu(&self) -> Result<Duration> {
        cpu_of(self.child.id())
    }

    /// CPU time the process and its children (a server's worker processes) have used so far.
    pub fn cpu_with_children(&self) -> Result<Duration> {
        let mut total = self.cpu()?;
        for child in children_of(self.child.id()) {
            total += cpu_of(child).unwrap_or_default();
        }
        Ok(total)
    }

    /// Kills it with SIGKILL (as a crash or `kill -9` would) and reaps it.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it, failing if it had already exited (a server that died mid-run spoils a figure).
    pub fn stop(mut self) -> Result<()> {
        self.check_running("it was stopped")?;
        self.terminate();
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    pub fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_9();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
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

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces, inside
/// parentheses): the state is field 0, the parent 1, utime and stime 11 and 12.
fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|error| LabError::Io {
        what: format!("cannot read {path}"),
        error,
    })?;
    Ok(stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// CPU time process `pid` (all its threads) has used so far (clock ticks: 100 a second).
fn cpu_of(pid: u32) -> Result<Duration> {
    // utime and stime: the 14th and 15th fields of /proc/PID/stat.
    cpu_fields(pid, 11)
}

/// User plus system time from two neighbouring fields of `/proc/PID/stat` (counted after the
/// command's name), in clock ticks of 10 ms.
fn cpu_fields(pid: u32, user: usize) -> Result<Duration> {
    let fields = stat_fields(pid)?;
    let ticks = |i: usize| fields.get(i).and_then(|t| t.parse::<u64>().ok());
    match (ticks(user), ticks(user + 1)) {
        (Some(user), Some(system)) => Ok(Duration::from_millis((user + system) * 10)),
        _ => Err(LabError::Daemon(format!(
            "cannot read the CPU times of process {pid}: {fields:?}"
        ))),
    }
}

/// The CPU time (user and system) of this process's children that were waited for, and of
/// theirs (`cutime` and `cstime`): what a set of finished commands used.
pub fn waited_children_cpu() -> Result<Duration> {
    // cutime and cstime: the 16th and 17th fields of /proc/PID/stat.
    cpu_fields(std::process::id(), 13)
}

/// The processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&p| {
            stat_fields(p)
                .ok()
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}
