//! The network: two namespaces joined by a veth pair (fleetboot-lab), and the daemons started in them.

use super::*;

/// A server namespace and a client namespace joined by a veth pair (as docs/benchmark-method.md says: no
/// bridge between them). Everything in them is killed and both are deleted on drop.
/// The two namespaces, server and client, joined by one veth (no bridge between them).
pub(super) struct Net {
    pub(super) _lab: Lab,
    pub(super) srv: Host,
    pub(super) cli: Host,
}

impl Net {
    pub(super) fn new() -> Result<Net> {
        let (lab, srv, cli) = Lab::linked(
            "bench",
            ("srv", SRV_IF, &format!("{SRV_IP}/{PREFIX}")),
            ("cli", CLI_IF, &format!("{CLI_IP}/{PREFIX}")),
        )?;
        eprintln!("bench: namespaces {} and {}", srv.ns, cli.ns);
        Ok(Net {
            _lab: lab,
            srv,
            cli,
        })
    }

    /// `program` run inside the server namespace.
    pub(super) fn srv(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.srv.cmd(program)
    }

    /// `program` run inside the client namespace.
    pub(super) fn cli(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.cli.cmd(program)
    }

    /// Starts a server in the server namespace, its output to `log`, and waits until it
    /// listens on `port` (`udp` or `tcp`).
    pub(super) fn start(
        &self,
        cmd: &mut Command,
        log: &Path,
        udp: bool,
        port: u16,
    ) -> Result<Daemon> {
        eprintln!("$ {}", show(cmd));
        let mut daemon = Daemon::start(cmd, log)?;
        self.srv.wait_listening(port, udp, 15, &mut daemon)?;
        // Listening; give it a moment to finish starting (kea opens its raw socket next).
        std::thread::sleep(Duration::from_millis(300));
        Ok(daemon)
    }
}

/// Says, when a measurement failed, whether its server had exited under it.
pub(super) trait Explain {
    fn explain<T>(&self, result: Result<T>) -> Result<T>;
}

impl Explain for Daemon {
    fn explain<T>(&self, result: Result<T>) -> Result<T> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let alive = !stat.is_empty() && !stat.contains(") Z ");
        result.with_context(|| {
            if alive {
                format!("{} was still running", self.name)
            } else {
                format!(
                    "{} had exited (killed from outside the benchmark?); its log ends:\n{}",
                    self.name,
                    self.log_tail()
                )
            }
        })
    }
}
