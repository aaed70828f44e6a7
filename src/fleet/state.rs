//! The fleet's observed state, in SQLite: hosts, DHCP leases and an event log.
//!
//! The configuration says what each host *should* run; this says what it *does*: when it was
//! seen, what is installed (image and digest), whether it is imaging and how far, whether a
//! reimage was requested.
//!
//! The rule that keeps a half-written disk from ever being booted: from the moment an agent is
//! handed an install token ([`FleetState::start_install`]) the host's disk is unknown —
//! `installed` is cleared — until the agent's verified `done` ([`FleetState::installed`]). A
//! failed or interrupted install leaves it unknown, so the next boot runs the agent again. `fleetboot serve`, `fleetboot host list` and `fleetboot reimage` all
//! work on the same database (WAL mode, so the CLI can read while the appliance writes).

use crate::mac::Mac;
use fleetboot_image::api::{ImageId, InstallReport};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// File name of the database inside `state_dir`.
pub const DB_FILE: &str = "fleet.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hosts (
    mac TEXT PRIMARY KEY,
    ip TEXT,
    arch TEXT,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    assigned TEXT,
    installed TEXT,
    installed_digest TEXT,
    status TEXT NOT NULL DEFAULT 'discovered',
    progress_pct INTEGER NOT NULL DEFAULT 0,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    detail TEXT,
    reimage INTEGER NOT NULL DEFAULT 0,
    token TEXT,
    assigned_digest TEXT,
    hint TEXT,
    hint_digest TEXT,
    token_ip TEXT,
    token_expires INTEGER,
    report TEXT,
    instance_id TEXT,
    retire TEXT
);
CREATE TABLE IF NOT EXISTS leases (
    ip TEXT PRIMARY KEY,
    mac TEXT NOT NULL UNIQUE,
    expires INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inventory (
    mac TEXT PRIMARY KEY,
    json TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS power (
    mac TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    mac TEXT,
    kind TEXT NOT NULL,
    detail TEXT
);
";

/// Schema version kept in `PRAGMA user_version`; [`migrate`] brings older files up to it.
const SCHEMA_VERSION: i64 = 4;

/// Where a host is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostStatus {
    /// Seen on the network, nothing done yet (or inspected: see its inventory).
    Discovered,
    /// Handed the agent to report its inventory (`unknown_hosts: discover`).
    Inspecting,
    /// Retired: handed the agent to wipe its disks.
    Wiping,
    /// Retired and its disks wiped; it boots nothing until a reimage is requested.
    Retired,
    /// Handed the agent; not reported yet.
    Booting,
    /// The agent reports progress.
    Imaging,
    /// The agent reported done; the next boot goes to the local disk.
    Installed,
    /// The agent reported a failure (see `detail`).
    Failed,
}

impl HostStatus {
    /// The status as shown and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Discovered => "discovered",
            HostStatus::Inspecting => "inspecting",
            HostStatus::Wiping => "wiping",
            HostStatus::Retired => "retired",
            HostStatus::Booting => "booting",
            HostStatus::Imaging => "imaging",
            HostStatus::Installed => "installed",
            HostStatus::Failed => "failed",
        }
    }
    fn parse(s: &str) -> HostStatus {
        match s {
            "booting" => HostStatus::Booting,
            "inspecting" => HostStatus::Inspecting,
            "wiping" => HostStatus::Wiping,
            "retired" => HostStatus::Retired,
            "imaging" => HostStatus::Imaging,
            "installed" => HostStatus::Installed,
            "failed" => HostStatus::Failed,
            _ => HostStatus::Discovered,
        }
    }
}

/// One host as recorded.
#[derive(Clone, Debug, Serialize)]
pub struct HostRecord {
    pub mac: Mac,
    pub ip: Option<String>,
    pub arch: Option<String>,
    /// Unix seconds.
    pub first_seen: i64,
    pub last_seen: i64,
    /// The image it was last sent to install.
    pub assigned: Option<ImageId>,
    /// The image on its disk, as the agent verified it; `None` while an install is under way or
    /// after one that did not finish (the disk is unknown).
    pub installed: Option<ImageId>,
    /// The image last verified on the disk, kept through failed installs: where the agent may
    /// find chunks to reuse (it hashes each before use).
    pub hint: Option<ImageId>,
    /// The last install's report.
    pub report: Option<InstallReport>,
    pub status: HostStatus,
    pub progress_pct: u8,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Failure reason, or other detail of the status.
    pub detail: Option<String>,
    /// A reimage was requested: the next boot installs even if the image is unchanged.
    pub reimage: bool,
    #[serde(skip)]
    pub token: Option<Token>,
    /// The installed OS's cloud-init instance: new at every install, so cloud-init runs again on
    /// the first boot after a reimage (NoCloud `instance-id`).
    pub instance_id: Option<String>,
    /// A retirement was requested: the next boot wipes its disks (`quick` or `secure`).
    pub retire: Option<String>,
}

/// An install token and what it is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub secret: String,
    /// The only address the token is handed to and accepted from.
    pub ip: IpAddr,
    /// Unix seconds after which it is refused.
    pub expires: i64,
}

/// One line of the event log.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Its place in the log (ids only grow).
    #[serde(skip)]
    pub id: i64,
    pub ts: i64,
    pub mac: Option<String>,
    pub kind: String,
    pub detail: Option<String>,
}

/// A write the DHCP service hands to its write-behind thread (see [`FleetState::apply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Seen {
        mac: Mac,
        ip: Option<Ipv4Addr>,
        arch: Option<&'static str>,
    },
    SaveLease {
        mac: Mac,
        ip: Ipv4Addr,
        expires: i64,
    },
    DropLease {
        mac: Mac,
    },
}

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {error}")]
    Db {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("cannot create {path}: {error}")]
    Dir {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Bounds on what unauthenticated traffic can make the database hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Events kept; older ones are pruned as new ones arrive.
    pub events_max: u64,
    /// Hosts kept; past it the longest-unseen hosts that hold nothing worth keeping (no install,
    /// no token, no reimage request) are dropped.
    pub hosts_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            events_max: 100_000,
            hosts_max: 20_000,
        }
    }
}

/// The open database.
pub struct FleetState {
    path: PathBuf,
    db: Connection,
    limits: Limits,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl FleetState {
    /// Opens (creating if needed) the database in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<FleetState, StateError> {
        std::fs::create_dir_all(state_dir).map_err(|error| StateError::Dir {
            path: state_dir.to_path_buf(),
            error,
        })?;
        let path = state_dir.join(DB_FILE);
        let db = Connection::open(&path).map_err(|error| StateError::Db {
            path: path.clone(),
            error,
        })?;
        let state = FleetState {
            path,
            db,
            limits: Limits::default(),
        };
        state.wrap(|db| {
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", "NORMAL")?;
            // The CLI and the appliance share the file: wait for the other's write, briefly.
            db.busy_timeout(std::time::Duration::from_secs(2))?;
            db.execute_batch(SCHEMA)?;
            migrate(db)
        })?;
        Ok(state)
    }

    /// The same database with other bounds (tests).
    pub fn with_limits(mut self, limits: Limits) -> FleetState {
        self.limits = limits;
        self
    }

    fn wrap<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StateError> {
        f(&self.db).map_err(|error| StateError::Db {
            path: self.path.clone(),
            error,
        })
    }

    /// Records that `mac` was seen (DHCP or HTTP), creating the host if new.
    pub fn seen(
        &self,
        mac: Mac,
        ip: Option<Ipv4Addr>,
        arch: Option<&'static str>,
    ) -> Result<(), StateError> {
        self.apply(&[Write::Seen { mac, ip, arch }])
    }

    /// The record of `mac`, if it was ever seen.
    pub fn host(&self, mac: Mac) -> Result<Option<HostRecord>, StateError> {
        self.wrap(|db| {
            db.query_row(
                &format!("{SELECT_HOST} WHERE mac = ?1"),
                params![mac.to_string()],
                row_to_host,
            )
            .optional()
        })
    }

    /// Every host, by MAC.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StateError> {
        self.wrap(|db| {
            let mut stmt = db.prepare(&format!("{SELECT_HOST} ORDER BY mac"))?;
            let rows = stmt.query_map([], row_to_host)?;
            rows.collect()
        })
    }

    /// Marks hosts for reinstall at their next boot; returns how many were marked.
    pub fn request_reimage(&self, macs: &[Mac]) -> Result<usize, StateError> {
        let t = now();
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            let mut n = 0;
            for mac in macs {
                // A host never seen has no record, and gets none here: it installs at its first
                // boot anyway, and must not show as seen (discovered) before it boots.
                tx.execute(
                    "UPDATE hosts SET reimage = 1, retire = NULL WHERE mac = ?1",
                    params![mac.to_string()],
                )?;
                tx.execute(
                    "INSERT INTO events (ts, mac, kind, detail) VALUES (?1, ?2, 'reimage-requested', NULL)",
                    params![t, mac.to_string()],
                )?;
                n += 1;
            }
            tx.commit()?;
            Ok(n)
        })
    }

    /// The agent was handed to `mac` to install `image` with `token`. From here until a verified
    /// `done` the disk is unknown: what was installed becomes only a hint for chunk reuse. A
    /// reimage request is fulfilled here, so one made while this install runs is kept for the
    /// next boot (the install may have begun before what the request is for).
    pub fn start_install(
        &self,
        mac: Mac,
        image: &ImageId,
        token: &Token,
    ) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO hosts (mac, first_seen, last_seen) VALUES (?1, ?2, ?2) ON CONFLICT(mac) DO NOTHING",
                params![mac.to_string(), t],
            )?;
            tx.execute(
                "UPDATE hosts SET assigned = ?2, assigned_digest = ?3, token = ?4, token_ip = ?5,
                    token_expires = ?6, status = 'booting', progress_pct = 0, bytes_done = 0,
                    bytes_total = 0, detail = NULL, reimage = 0,
                    hint = COALESCE(installed, hint),
                    hint_digest = CASE WHEN installed IS NULL THEN hint_digest ELSE installed_digest END,
                    installed = NULL, installed_digest = NULL, last_seen = ?7,
                    instance_id = 'fleetboot-' || lower(hex(randomblob(8)))
                 WHERE mac = ?1",
                params![
                    mac.to_string(),
                    image.to_string(),
                    image.digest,
                    token.secret,
                    token.ip.to_string(),
                    token.expires,
                    t
                ],
            )?;
            log(&tx, t, Some(mac), "agent-booted", Some(&image.to_string()), self.limits.events_max)?;
            tx.commit()
        })
    }

    /// Progress reported by the agent.
    pub fn progress(&self, mac: Mac, done: u64, total: u64) -> Result<(), StateError> {
        let pct = (done.min(total).saturating_mul(100))
            .checked_div(total)
            .unwrap_or(0) as i64;
        self.wrap(|db| {
            db.execute(
                "UPDATE hosts SET status = 'imaging', bytes_done = ?2, bytes_total = ?3, progress_pct = ?4,
                    last_seen = ?5 WHERE mac = ?1",
                params![mac.to_string(), done as i64, total as i64, pct, now()],
            )?;
            Ok(())
        })
    }

    /// The agent installed the image its report names, read back with that image's digest
    /// (the caller checked it): boots go to the local disk now.
    pub fn installed(&self, mac: Mac, report: &InstallReport) -> Result<(), StateError> {
        let t = now();
        let json = serde_json::to_string(report).unwrap_or_default();
        let image = report.image.to_string();
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            tx.execute(
                "UPDATE hosts SET status = 'installed', installed = ?2, installed_digest = ?3,
                    hint = ?2, hint_digest = ?3, progress_pct = 100, token = NULL,
                    token_ip = NULL, token_expires = NULL, detail = ?4, report = ?5, last_seen = ?6
                 WHERE mac = ?1",
                params![
                    mac.to_string(),
                    image,
                    report.image.digest,
                    format!(
                        "fetched {} bytes, reused {} bytes",
                        report.bytes_fetched, report.bytes_reused
                    ),
                    json,
                    t
                ],
            )?;
            log(
                &tx,
                t,
                Some(mac),
                "installed",
                Some(&image),
                self.limits.events_max,
            )?;
            tx.commit()
        })
    }

    /// The install failed: the reason is kept and shown; the disk stays unknown, so the next
    /// boot runs the agent again.
    pub fn failed(&self, mac: Mac, reason: &str) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            tx.execute(
                "UPDATE hosts SET status = 'failed', detail = ?2, token = NULL, token_ip = NULL,
                    token_expires = NULL, installed = NULL, installed_digest = NULL, last_seen = ?3
                 WHERE mac = ?1",
                params![mac.to_string(), reason, t],
            )?;
            log(
                &tx,
                t,
                Some(mac),
                "failed",
                Some(reason),
                self.limits.events_max,
            )?;
            tx.commit()
        })
    }

    /// Hosts holding an install token that has not expired, with it (loaded at start, so an
    /// appliance restarted mid-install keeps accepting its agents).
    pub fn live_tokens(&self) -> Result<Vec<(Mac, Token)>, StateError> {
        self.live_tokens_where("status NOT IN ('inspecting', 'wiping')")
    }

    /// Hosts holding a live token for a trip that installs nothing (inspecting, wiping).
    pub fn live_trip_tokens(&self) -> Result<Vec<(Mac, Token)>, StateError> {
        self.live_tokens_where("status IN ('inspecting', 'wiping')")
    }

    fn live_tokens_where(&self, filter: &str) -> Result<Vec<(Mac, Token)>, StateError> {
        let t = now();
        self.wrap(|db| {
            let mut stmt = db.prepare(&format!(
                "SELECT mac, token, token_ip, token_expires FROM hosts
                 WHERE token IS NOT NULL AND token_expires > ?1 AND {filter}"
            ))?;
            let rows = stmt.query_map(params![t], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (mac, secret, ip, expires) = row?;
                if let (Ok(mac), Some(Ok(ip))) = (mac.parse(), ip.map(|i| i.parse())) {
                    out.push((
                        mac,
                        Token {
                            secret,
                            ip,
                            expires,
                        },
                    ));
                }
            }
            Ok(out)
        })
    }

    /// Leases that have not expired, for the DHCP pool at start.
    pub fn leases(&self) -> Result<Vec<(Mac, Ipv4Addr, i64)>, StateError> {
        let t = now();
        self.wrap(|db| {
            let mut stmt = db.prepare("SELECT mac, ip, expires FROM leases WHERE expires > ?1")?;
            let rows = stmt.query_map(params![t], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (mac, ip, expires) = row?;
                if let (Ok(mac), Ok(ip)) = (mac.parse(), ip.parse()) {
                    out.push((mac, ip, expires));
                }
            }
            Ok(out)
        })
    }

    /// Applies a batch of writes in one transaction (the DHCP hot path: one commit for many
    /// leases instead of one each).
    pub fn apply(&self, writes: &[Write]) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            for w in writes {
                match w {
                    Write::Seen { mac, ip, arch } => {
                        tx.prepare_cached(
                            "INSERT INTO hosts (mac, ip, arch, first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, ?4)
                             ON CONFLICT(mac) DO UPDATE SET last_seen = ?4,
                                ip = COALESCE(?2, ip), arch = COALESCE(?3, arch)",
                        )?
                        .execute(params![mac.to_string(), ip.map(|i| i.to_string()), arch, t])?;
                    }
                    Write::SaveLease { mac, ip, expires } => {
                        tx.prepare_cached("DELETE FROM leases WHERE mac = ?1 OR ip = ?2")?
                            .execute(params![mac.to_string(), ip.to_string()])?;
                        tx.prepare_cached("INSERT INTO leases (ip, mac, expires) VALUES (?1, ?2, ?3)")?
                            .execute(params![ip.to_string(), mac.to_string(), expires])?;
                    }
                    Write::DropLease { mac } => {
                        tx.prepare_cached("DELETE FROM leases WHERE mac = ?1")?
                            .execute(params![mac.to_string()])?;
                    }
                }
            }
            if writes.iter().any(|w| matches!(w, Write::Seen { .. })) {
                prune_hosts(&tx, self.limits.hosts_max)?;
            }
            tx.commit()
        })
    }

    /// Appends to the event log.
    pub fn event(
        &self,
        mac: Option<Mac>,
        kind: &str,
        detail: Option<&str>,
    ) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| log(db, t, mac, kind, detail, self.limits.events_max))
    }

    /// Marks hosts to be retired at their next boot: their disks wiped (`how`: `quick` or
    /// `secure`), then off. Returns how many were marked.
    pub fn request_retire(&self, macs: &[Mac], how: &[&str]) -> Result<usize, StateError> {
        let t = now();
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            for (mac, how) in macs.iter().zip(how) {
                tx.execute(
                    "INSERT INTO hosts (mac, first_seen, last_seen, retire) VALUES (?1, ?2, ?2, ?3)
                     ON CONFLICT(mac) DO UPDATE SET retire = ?3, reimage = 0",
                    params![mac.to_string(), t, how],
                )?;
                log(
                    &tx,
                    t,
                    Some(*mac),
                    "retire-requested",
                    Some(how),
                    self.limits.events_max,
                )?;
            }
            tx.commit()?;
            Ok(macs.len())
        })
    }

    /// `mac`'s disks were wiped (`summary` says how): retired, nothing on its disk any more. A
    /// reimage requested while the wipe ran (it cancels the retirement) is kept: the next boot
    /// installs.
    pub fn wiped(&self, mac: Mac, summary: &str) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            tx.execute(
                "UPDATE hosts SET status = 'retired', retire = NULL, detail = ?2,
                    token = NULL, token_ip = NULL, token_expires = NULL, installed = NULL,
                    installed_digest = NULL, hint = NULL, hint_digest = NULL, last_seen = ?3
                 WHERE mac = ?1",
                params![mac.to_string(), summary, t],
            )?;
            log(
                &tx,
                t,
                Some(mac),
                "wiped",
                Some(summary),
                self.limits.events_max,
            )?;
            tx.commit()
        })
    }

    /// The agent was handed to `mac` for a trip that installs nothing — `Inspecting` (report
    /// the machine) or `Wiping` (a retired host's disks) — with `token`.
    pub fn start_trip(
        &self,
        mac: Mac,
        token: &Token,
        status: HostStatus,
    ) -> Result<(), StateError> {
        let t = now();
        let what = match status {
            HostStatus::Wiping => "wipe",
            _ => "inspect",
        };
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            tx.execute(
                "UPDATE hosts SET token = ?2, token_ip = ?3, token_expires = ?4,
                    status = ?6, detail = NULL, last_seen = ?5,
                    instance_id = 'fleetboot-' || lower(hex(randomblob(8)))
                 WHERE mac = ?1",
                params![
                    mac.to_string(),
                    token.secret,
                    token.ip.to_string(),
                    token.expires,
                    t,
                    status.as_str()
                ],
            )?;
            log(
                &tx,
                t,
                Some(mac),
                "agent-booted",
                Some(what),
                self.limits.events_max,
            )?;
            tx.commit()
        })
    }

    /// Keeps `mac`'s inventory (JSON, as the agent reported it) and ends the inspection.
    pub fn save_inventory(&self, mac: Mac, json: &str) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO inventory (mac, json, at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(mac) DO UPDATE SET json = ?2, at = ?3",
                params![mac.to_string(), json, t],
            )?;
            tx.execute(
                "UPDATE hosts SET token = NULL, token_ip = NULL, token_expires = NULL,
                    status = 'discovered', detail = 'inspected', last_seen = ?2 WHERE mac = ?1",
                params![mac.to_string(), t],
            )?;
            log(&tx, t, Some(mac), "inspected", None, self.limits.events_max)?;
            tx.commit()
        })
    }

    /// Every inventory kept (JSON), by host.
    pub fn inventories(&self) -> Result<std::collections::HashMap<Mac, String>, StateError> {
        self.wrap(|db| {
            let mut stmt = db.prepare("SELECT mac, json FROM inventory")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = std::collections::HashMap::new();
            for row in rows {
                let (mac, json) = row?;
                if let Ok(mac) = mac.parse() {
                    out.insert(mac, json);
                }
            }
            Ok(out)
        })
    }

    /// `mac`'s inventory (JSON) and when it was reported.
    pub fn inventory(&self, mac: Mac) -> Result<Option<(String, i64)>, StateError> {
        self.wrap(|db| {
            db.query_row(
                "SELECT json, at FROM inventory WHERE mac = ?1",
                params![mac.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    /// Records what hosts' BMCs last said of their power (`on`, `off`, or why the BMC could
    /// not be asked).
    pub fn set_power(&self, states: &[(Mac, String)]) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| {
            let tx = db.unchecked_transaction()?;
            for (mac, state) in states {
                tx.execute(
                    "INSERT INTO power (mac, state, at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(mac) DO UPDATE SET state = ?2, at = ?3",
                    params![mac.to_string(), state, t],
                )?;
            }
            tx.commit()
        })
    }

    /// Each host's last recorded power state and when (Unix seconds).
    pub fn power(&self) -> Result<std::collections::HashMap<Mac, (String, i64)>, StateError> {
        self.wrap(|db| {
            let mut stmt = db.prepare("SELECT mac, state, at FROM power")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
            })?;
            let mut out = std::collections::HashMap::new();
            for row in rows {
                let (mac, state, at) = row?;
                if let Ok(mac) = mac.parse() {
                    out.insert(mac, (state, at));
                }
            }
            Ok(out)
        })
    }

    /// The id of the newest event (0 when there is none): a mark to read later events from.
    pub fn event_mark(&self) -> Result<i64, StateError> {
        self.wrap(|db| db.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0)))
    }

    /// `mac`'s events after `mark` (see [`FleetState::event_mark`]), oldest first.
    pub fn events_after(&self, mark: i64, mac: Mac) -> Result<Vec<Event>, StateError> {
        self.wrap(|db| {
            let mut stmt = db.prepare(
                "SELECT id, ts, mac, kind, detail FROM events WHERE id > ?1 AND mac = ?2 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![mark, mac.to_string()], row_to_event)?;
            rows.collect()
        })
    }

    /// The newest `limit` events, newest first.
    pub fn events(&self, limit: usize) -> Result<Vec<Event>, StateError> {
        self.wrap(|db| {
            let mut stmt = db.prepare(
                "SELECT id, ts, mac, kind, detail FROM events ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit as i64], row_to_event)?;
            rows.collect()
        })
    }
}

/// An event from `SELECT id, ts, mac, kind, detail`.
fn row_to_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        id: r.get(0)?,
        ts: r.get(1)?,
        mac: r.get(2)?,
        kind: r.get(3)?,
        detail: r.get(4)?,
    })
}

/// Appends an event and prunes the log to its newest `events_max`.
fn log(
    db: &Connection,
    t: i64,
    mac: Option<Mac>,
    kind: &str,
    detail: Option<&str>,
    events_max: u64,
) -> rusqlite::Result<()> {
    db.execute(
        "INSERT INTO events (ts, mac, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![t, mac.map(|m| m.to_string()), kind, detail],
    )?;
    prune_events(db, events_max)
}

/// Keeps the newest `max` events (ids grow with time; the range delete uses the primary key).
fn prune_events(db: &Connection, max: u64) -> rusqlite::Result<()> {
    db.prepare_cached("DELETE FROM events WHERE id <= last_insert_rowid() - ?1")?
        .execute(params![max as i64])?;
    Ok(())
}

/// Keeps at most `max` hosts, dropping the longest-unseen ones that hold nothing worth keeping.
fn prune_hosts(db: &Connection, max: u64) -> rusqlite::Result<()> {
    let count: i64 = db
        .prepare_cached("SELECT COUNT(*) FROM hosts")?
        .query_row([], |r| r.get(0))?;
    let excess = count - max as i64;
    if excess > 0 {
        db.prepare_cached(
            "DELETE FROM hosts WHERE mac IN (SELECT mac FROM hosts
                WHERE installed IS NULL AND hint IS NULL AND token IS NULL AND reimage = 0
                AND retire IS NULL AND status NOT IN ('retired', 'wiping', 'inspecting')
                ORDER BY last_seen LIMIT ?1)",
        )?
        .execute(params![excess])?;
        // What was learnt of those machines goes with them: an inventory is up to the request
        // limit in size, and a flood of made-up MACs must not grow the database without end.
        // (Power records are kept: only hosts with a BMC in the configuration have one.)
        db.prepare_cached("DELETE FROM inventory WHERE mac NOT IN (SELECT mac FROM hosts)")?
            .execute([])?;
    }
    Ok(())
}

const SELECT_HOST: &str = "SELECT mac, ip, arch, first_seen, last_seen, assigned, assigned_digest,
    installed, installed_digest, hint, hint_digest, status, progress_pct, bytes_done, bytes_total,
    detail, reimage, token, token_ip, token_expires, report, instance_id, retire FROM hosts";

/// An image identity from its two columns (`NAME@N`, digest); `None` if either is missing or
/// the name does not parse (a row written by hand).
fn image_id(display: Option<String>, digest: Option<String>) -> Option<ImageId> {
    let r: crate::store::ImageRef = display?.parse().ok()?;
    Some(ImageId {
        name: r.name,
        version: r.version?,
        digest: digest?,
    })
}

fn row_to_host(r: &rusqlite::Row<'_>) -> rusqlite::Result<HostRecord> {
    let mac: String = r.get(0)?;
    let status: String = r.get(11)?;
    let token = match (
        r.get::<_, Option<String>>(17)?,
        r.get::<_, Option<String>>(18)?,
        r.get::<_, Option<i64>>(19)?,
    ) {
        (Some(secret), Some(ip), Some(expires)) => ip.parse().ok().map(|ip| Token {
            secret,
            ip,
            expires,
        }),
        _ => None,
    };
    Ok(HostRecord {
        mac: mac.parse().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
        ip: r.get(1)?,
        arch: r.get(2)?,
        first_seen: r.get(3)?,
        last_seen: r.get(4)?,
        assigned: image_id(r.get(5)?, r.get(6)?),
        installed: image_id(r.get(7)?, r.get(8)?),
        hint: image_id(r.get(9)?, r.get(10)?),
        status: HostStatus::parse(&status),
        progress_pct: r.get::<_, i64>(12)?.clamp(0, 100) as u8,
        bytes_done: r.get::<_, i64>(13)?.max(0) as u64,
        bytes_total: r.get::<_, i64>(14)?.max(0) as u64,
        detail: r.get(15)?,
        reimage: r.get::<_, i64>(16)? != 0,
        token,
        report: r
            .get::<_, Option<String>>(20)?
            .and_then(|j| serde_json::from_str(&j).ok()),
        instance_id: r.get(21)?,
        retire: r.get(22)?,
    })
}

/// Brings a database written by an older fleetboot up to [`SCHEMA_VERSION`].
fn migrate(db: &Connection) -> rusqlite::Result<()> {
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let mut have = std::collections::HashSet::new();
    {
        let mut stmt = db.prepare("PRAGMA table_info(hosts)")?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
        for n in names {
            have.insert(n?);
        }
    }
    let tx = db.unchecked_transaction()?;
    for (column, kind) in [
        ("assigned_digest", "TEXT"),
        ("hint", "TEXT"),
        ("hint_digest", "TEXT"),
        ("token_ip", "TEXT"),
        ("token_expires", "INTEGER"),
        ("report", "TEXT"),
        ("instance_id", "TEXT"),
        ("retire", "TEXT"),
    ] {
        if !have.contains(column) {
            tx.execute_batch(&format!("ALTER TABLE hosts ADD COLUMN {column} {kind}"))?;
        }
    }
    // Version 1 kept `installed` through failed and interrupted installs: such a disk is unknown.
    // Its tokens were bound to no address: they are void. (Version 2 added no more than columns.)
    if version < 2 {
        tx.execute_batch(
            "UPDATE hosts SET hint = installed, hint_digest = installed_digest
                WHERE installed IS NOT NULL;
             UPDATE hosts SET installed = NULL, installed_digest = NULL
                WHERE status IN ('booting', 'imaging', 'failed');
             UPDATE hosts SET token = NULL WHERE token_ip IS NULL;",
        )?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(version: u32, digest: &str) -> ImageId {
        ImageId {
            name: "web".into(),
            version,
            digest: digest.into(),
        }
    }

    fn report(image: ImageId) -> InstallReport {
        InstallReport {
            digest: image.digest.clone(),
            image,
            target: "/dev/vda".into(),
            bytes_fetched: 1,
            bytes_reused: 2,
            seconds: 0.5,
            seed: None,
        }
    }

    /// Issue 8, item 11: traffic from unknown machines cannot grow the tables without bound.
    #[test]
    fn events_and_discovered_hosts_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = FleetState::open(dir.path()).unwrap().with_limits(Limits {
            events_max: 50,
            hosts_max: 20,
        });
        let keep: Mac = "52:54:00:00:00:01".parse().unwrap();
        let token = Token {
            secret: "t".into(),
            ip: "10.0.0.5".parse().unwrap(),
            expires: i64::MAX,
        };
        s.seen(keep, None, None).unwrap();
        s.start_install(keep, &web(1, "d1"), &token).unwrap();
        let inspected: Mac = "52:54:00:00:00:02".parse().unwrap();
        s.seen(inspected, None, None).unwrap();
        s.save_inventory(inspected, "{\"cpus\": 2}").unwrap();
        // Seen longest ago, so the first to go (hosts seen in the same second tie).
        s.db.execute(
            "UPDATE hosts SET last_seen = 0 WHERE mac = ?1",
            [inspected.to_string()],
        )
        .unwrap();
        for i in 0..500u32 {
            let mac = Mac([0x02, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            s.apply(&[Write::Seen {
                mac,
                ip: None,
                arch: None,
            }])
            .unwrap();
            s.event(Some(mac), "dhcp", None).unwrap();
        }
        assert_eq!(s.hosts().unwrap().len(), 20);
        assert!(
            s.host(keep).unwrap().is_some(),
            "a host mid-install is kept"
        );
        assert!(
            s.inventories().unwrap().is_empty(),
            "a dropped host's inventory goes with it"
        );
        let n: i64 =
            s.db.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
                .unwrap();
        assert_eq!(n, 50);
        assert_eq!(
            s.events(1).unwrap()[0].mac.as_deref(),
            Some("02:00:00:00:01:f3")
        );
    }

    /// A database written by the previous version: a host that was imaging (its disk half
    /// written) must not keep `installed`; an installed one keeps it.
    #[test]
    fn an_older_database_is_migrated_without_trusting_unfinished_installs() {
        let dir = tempfile::tempdir().unwrap();
        let db = Connection::open(dir.path().join(DB_FILE)).unwrap();
        db.execute_batch(
            "CREATE TABLE hosts (mac TEXT PRIMARY KEY, ip TEXT, arch TEXT, first_seen INTEGER NOT NULL,
                last_seen INTEGER NOT NULL, assigned TEXT, installed TEXT, installed_digest TEXT,
                status TEXT NOT NULL DEFAULT 'discovered', progress_pct INTEGER NOT NULL DEFAULT 0,
                bytes_done INTEGER NOT NULL DEFAULT 0, bytes_total INTEGER NOT NULL DEFAULT 0,
                detail TEXT, reimage INTEGER NOT NULL DEFAULT 0, token TEXT);
             INSERT INTO hosts (mac, first_seen, last_seen, assigned, installed, installed_digest, status, token)
                VALUES ('52:54:00:00:00:01', 1, 1, 'web@2', 'web@1', 'd1', 'imaging', 'old'),
                       ('52:54:00:00:00:02', 1, 1, 'web@1', 'web@1', 'd1', 'installed', NULL);",
        )
        .unwrap();
        drop(db);
        let s = FleetState::open(dir.path()).unwrap();
        let imaging = s
            .host("52:54:00:00:00:01".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (imaging.installed, imaging.hint),
            (None, Some(web(1, "d1")))
        );
        assert_eq!(imaging.token, None, "a token bound to no address is void");
        let done = s
            .host("52:54:00:00:00:02".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(done.installed, Some(web(1, "d1")));
    }

    /// A request made while the agent runs is for what comes after: neither the install's
    /// `done` nor the wipe's report swallows it.
    #[test]
    fn a_reimage_asked_during_an_install_or_a_wipe_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = FleetState::open(dir.path()).unwrap();
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        let token = Token {
            secret: "tok".into(),
            ip: "10.0.0.5".parse().unwrap(),
            expires: i64::MAX,
        };
        s.request_reimage(&[mac]).unwrap();
        s.start_install(mac, &web(1, "d1"), &token).unwrap();
        assert!(
            !s.host(mac).unwrap().unwrap().reimage,
            "fulfilled by the start"
        );
        s.request_reimage(&[mac]).unwrap();
        s.installed(mac, &report(web(1, "d1"))).unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!((h.status, h.reimage), (HostStatus::Installed, true));

        s.request_retire(&[mac], &["quick"]).unwrap();
        assert!(
            !s.host(mac).unwrap().unwrap().reimage,
            "a retirement cancels it"
        );
        s.start_trip(mac, &token, HostStatus::Wiping).unwrap();
        s.request_reimage(&[mac]).unwrap();
        s.wiped(mac, "zeroed").unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!(
            (h.status, h.reimage, h.retire),
            (HostStatus::Retired, true, None)
        );
    }

    #[test]
    fn a_host_goes_from_discovered_to_installed_and_back_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let s = FleetState::open(dir.path()).unwrap();
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        assert!(s.host(mac).unwrap().is_none());
        s.seen(mac, Some(Ipv4Addr::new(10, 0, 0, 5)), Some("bios"))
            .unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!(
            (h.status, h.ip.as_deref(), h.arch.as_deref()),
            (HostStatus::Discovered, Some("10.0.0.5"), Some("bios"))
        );

        let token = Token {
            secret: "tok".into(),
            ip: "10.0.0.5".parse().unwrap(),
            expires: i64::MAX,
        };
        s.start_install(mac, &web(2, "d2"), &token).unwrap();
        s.progress(mac, 50, 200).unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!(
            (h.status, h.progress_pct, h.token.as_ref()),
            (HostStatus::Imaging, 25, Some(&token))
        );
        assert_eq!(s.live_tokens().unwrap(), vec![(mac, token.clone())]);

        s.installed(mac, &report(web(2, "d2"))).unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!(
            (h.status, h.installed.as_ref(), h.token),
            (HostStatus::Installed, Some(&web(2, "d2")), None)
        );
        assert_eq!(h.report, Some(report(web(2, "d2"))));
        assert!(!h.reimage);
        assert!(s.live_tokens().unwrap().is_empty());

        // From the moment an agent holds a token the disk is unknown; a failure leaves it so,
        // and the last verified image stays only as a hint for chunk reuse.
        s.start_install(mac, &web(3, "d3"), &token).unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!((h.installed, h.hint.as_ref()), (None, Some(&web(2, "d2"))));
        s.failed(mac, "damaged pack").unwrap();
        s.start_install(mac, &web(2, "d2"), &token).unwrap();
        s.failed(mac, "power cut").unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!((h.installed, h.hint.as_ref()), (None, Some(&web(2, "d2"))));
        s.start_install(mac, &web(2, "d2"), &token).unwrap();
        s.installed(mac, &report(web(2, "d2"))).unwrap();

        assert_eq!(s.request_reimage(&[mac]).unwrap(), 1);
        assert!(s.host(mac).unwrap().unwrap().reimage);
        // A host never seen is not made seen by a request (it installs at its first boot).
        let never_seen: Mac = "52:54:00:00:00:99".parse().unwrap();
        assert_eq!(s.request_reimage(&[never_seen]).unwrap(), 1);
        assert!(s.host(never_seen).unwrap().is_none());
        s.failed(mac, "no disk matching auto").unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!(
            (h.status, h.detail.as_deref()),
            (HostStatus::Failed, Some("no disk matching auto"))
        );
        let kinds: Vec<String> = s.events(10).unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds[..5],
            [
                "failed",
                "reimage-requested",
                "reimage-requested",
                "installed",
                "agent-booted"
            ]
        );

        // Batched writes (the DHCP path): hosts and leases in one transaction.
        let other_mac: Mac = "52:54:00:00:00:02".parse().unwrap();
        let ip = Ipv4Addr::new(10, 0, 0, 9);
        s.apply(&[
            Write::Seen {
                mac: other_mac,
                ip: None,
                arch: Some("uefi-x64"),
            },
            Write::SaveLease {
                mac: other_mac,
                ip,
                expires: i64::MAX,
            },
            Write::SaveLease {
                mac,
                ip,
                expires: i64::MAX,
            },
        ])
        .unwrap();
        assert_eq!(
            s.leases().unwrap(),
            vec![(mac, ip, i64::MAX)],
            "an address has one holder"
        );
        s.apply(&[Write::DropLease { mac }]).unwrap();
        assert!(s.leases().unwrap().is_empty());
        assert_eq!(
            s.host(other_mac).unwrap().unwrap().arch.as_deref(),
            Some("uefi-x64")
        );

        // A second handle (the CLI) sees the same state.
        let other = FleetState::open(dir.path()).unwrap();
        assert_eq!(other.hosts().unwrap().len(), 2);
    }
}
