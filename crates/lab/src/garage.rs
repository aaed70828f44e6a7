//! A real distributed S3 store for tests: three Garage nodes, each in its own namespace on the
//! lab's switch, replication factor 3, one bucket and one access key. Clients run in a namespace
//! on the same switch (`Garage::client`) and reach node 1's S3 endpoint.
//!
//! Garage is not a Debian package: `cargo xtask s3` installs it with `cargo install garage` into
//! `target/tools/garage` and names the binary in `FLEETBOOT_GARAGE`.

use super::{Daemon, Host, Lab, LabError, Result};
use std::path::{Path, PathBuf};

/// The bucket made for the store.
pub const BUCKET: &str = "fleetboot";
/// The access key (Garage's key ids are `GK` + hex; imported, so fixed).
pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
/// The region Garage answers as.
pub const REGION: &str = "garage";
const S3_PORT: u16 = 3900;
const RPC_PORT: u16 = 3901;

/// The Garage binary named by `FLEETBOOT_GARAGE`, if it is there.
pub fn garage_bin() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("FLEETBOOT_GARAGE")?);
    path.is_file().then_some(path)
}

/// One node: its namespace, address, configuration and process.
pub struct Node {
    pub host: Host,
    pub addr: String,
    config: PathBuf,
    pub daemon: Option<Daemon>,
}

/// A running three-node cluster.
pub struct Garage {
    bin: PathBuf,
    pub nodes: Vec<Node>,
}

impl Garage {
    /// Starts three nodes at `10.N.0.1..3` (`net` is the second octet) on `lab`'s switch, their
    /// data under `dir`; connects them, applies a layout with replication factor 3 and makes the
    /// bucket and key.
    pub fn start(lab: &mut Lab, bin: &Path, net: u8, dir: &Path) -> Result<Garage> {
        let io = |what: String| move |error| LabError::Io { what, error };
        let mut nodes = Vec::new();
        for n in 1..=3u8 {
            let addr = format!("10.{net}.0.{n}");
            let host = lab.host(
                &format!("g{n}"),
                &format!("02:00:00:{net:02x}:00:{n:02x}"),
                Some(&format!("{addr}/24")),
            )?;
            let root = dir.join(format!("g{n}"));
            std::fs::create_dir_all(&root).map_err(io(format!("{}", root.display())))?;
            let config = root.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{root}/meta\"\n\
                     data_dir = \"{root}/data\"\n\
                     db_engine = \"sqlite\"\n\
                     replication_factor = 3\n\
                     consistency_mode = \"consistent\"\n\
                     rpc_bind_addr = \"0.0.0.0:{RPC_PORT}\"\n\
                     rpc_public_addr = \"{addr}:{RPC_PORT}\"\n\
                     rpc_secret = \"{SECRET}\"\n\
                     [s3_api]\n\
                     s3_region = \"{REGION}\"\n\
                     api_bind_addr = \"0.0.0.0:{S3_PORT}\"\n",
                    root = root.display()
                ),
            )
            .map_err(io(format!("{}", config.display())))?;
            let mut daemon = host.spawn(
                bin,
                &["-c", &config.to_string_lossy(), "server"],
                &root.join("garage.log"),
            )?;
            host.wait_listening(S3_PORT, false, 30, &mut daemon)?;
            nodes.push(Node {
                host,
                addr,
                config,
                daemon: Some(daemon),
            });
        }
        let g = Garage {
            bin: bin.to_path_buf(),
            nodes,
        };
        let mut ids = Vec::new();
        for i in 0..3 {
            let id = g.cli(i, &["node", "id", "-q"])?;
            ids.push(id.trim().to_string());
        }
        for id in &ids[1..] {
            g.cli(0, &["node", "connect", id])?;
        }
        for id in &ids {
            let short = id.split('@').next().unwrap_or(id);
            g.retry(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short])?;
        }
        g.cli(0, &["layout", "apply", "--version", "1"])?;
        g.retry(0, &["bucket", "create", BUCKET])?;
        g.cli(
            0,
            &["key", "import", "--yes", "-n", "fleetboot", KEY_ID, SECRET],
        )?;
        g.cli(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", KEY_ID,
            ],
        )?;
        Ok(g)
    }

    /// Runs `garage ARGS…` against node `i`; its output.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let node = &self.nodes[i];
        let mut cmd = node.host.cmd(&self.bin);
        cmd.arg("-c").arg(&node.config).args(args);
        let out = cmd.output().map_err(|error| LabError::Io {
            what: format!("cannot run {}", super::show(&cmd)),
            error,
        })?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: super::show(&cmd),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`Garage::cli`], tried for up to 30 s (nodes learn of each other in the background).
    fn retry(&self, i: usize, args: &[&str]) -> Result<String> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match self.cli(i, args) {
                Err(_) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// The S3 endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}:{S3_PORT}", self.nodes[i].addr)
    }

    /// The environment an S3 client needs to use the bucket through node `i`.
    pub fn env(&self, i: usize) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint(i)),
            ("AWS_REGION", REGION.into()),
            ("AWS_ACCESS_KEY_ID", KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Stops node `i` at once (SIGKILL), as a crashed or unplugged storage server.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut d) = self.nodes[i].daemon.take() {
            d.kill_9();
        }
    }
}
