//! The fleet's observed state, in SQLite: hosts, DHCP leases and an event log.
//!
//! The configuration says what each host *should* run; this says what it *does*: when it was
//! seen, what is installed (image and digest), whether it is imaging and how far, whether a
//! reimage was requested. `fleetboot serve`, `fleetboot host list` and `fleetboot reimage` all
//! work on the same database (WAL mode, so the CLI can read while the appliance writes).

use crate::mac::Mac;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::net::Ipv4Addr;
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
    token TEXT
);
CREATE TABLE IF NOT EXISTS leases (
    ip TEXT PRIMARY KEY,
    mac TEXT NOT NULL UNIQUE,
    expires INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    mac TEXT,
    kind TEXT NOT NULL,
    detail TEXT
);
";

/// Where a host is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostStatus {
    /// Seen on the network, nothing done yet.
    Discovered,
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
            HostStatus::Booting => "booting",
            HostStatus::Imaging => "imaging",
            HostStatus::Installed => "installed",
            HostStatus::Failed => "failed",
        }
    }
    fn parse(s: &str) -> HostStatus {
        match s {
            "booting" => HostStatus::Booting,
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
    /// The image it was last sent to install (`NAME@N`).
    pub assigned: Option<String>,
    /// The image on its disk (`NAME@N`) and its BLAKE3, as the agent verified them.
    pub installed: Option<String>,
    pub installed_digest: Option<String>,
    pub status: HostStatus,
    pub progress_pct: u8,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Failure reason, or other detail of the status.
    pub detail: Option<String>,
    /// A reimage was requested: the next boot installs even if the image is unchanged.
    pub reimage: bool,
    #[serde(skip)]
    pub token: Option<String>,
}

/// One line of the event log.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
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

/// The open database.
pub struct FleetState {
    path: PathBuf,
    db: Connection,
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
        let state = FleetState { path, db };
        state.wrap(|db| {
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", "NORMAL")?;
            db.execute_batch(SCHEMA)
        })?;
        Ok(state)
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
                tx.execute(
                    "INSERT INTO hosts (mac, first_seen, last_seen, reimage) VALUES (?1, ?2, ?2, 1)
                     ON CONFLICT(mac) DO UPDATE SET reimage = 1",
                    params![mac.to_string(), t],
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

    /// The agent was handed to `mac` to install `image`, with this one-time token.
    pub fn start_install(&self, mac: Mac, image: &str, token: &str) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| {
            db.execute(
                "INSERT INTO hosts (mac, first_seen, last_seen) VALUES (?1, ?2, ?2) ON CONFLICT(mac) DO NOTHING",
                params![mac.to_string(), t],
            )?;
            db.execute(
                "UPDATE hosts SET assigned = ?2, token = ?3, status = 'booting', progress_pct = 0,
                    bytes_done = 0, bytes_total = 0, detail = NULL, last_seen = ?4 WHERE mac = ?1",
                params![mac.to_string(), image, token, t],
            )?;
            log(db, t, mac, "agent-booted", Some(image))
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

    /// The agent installed `image` (verified digest `digest`): boots go to the local disk now.
    pub fn installed(
        &self,
        mac: Mac,
        image: &str,
        digest: &str,
        detail: &str,
    ) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| {
            db.execute(
                "UPDATE hosts SET status = 'installed', installed = ?2, installed_digest = ?3,
                    progress_pct = 100, reimage = 0, token = NULL, detail = ?4, last_seen = ?5 WHERE mac = ?1",
                params![mac.to_string(), image, digest, detail, t],
            )?;
            log(db, t, mac, "installed", Some(&format!("{image} {detail}")))
        })
    }

    /// The agent failed: the reason is kept and shown.
    pub fn failed(&self, mac: Mac, reason: &str) -> Result<(), StateError> {
        let t = now();
        self.wrap(|db| {
            db.execute(
                "UPDATE hosts SET status = 'failed', detail = ?2, token = NULL, last_seen = ?3 WHERE mac = ?1",
                params![mac.to_string(), reason, t],
            )?;
            log(db, t, mac, "failed", Some(reason))
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
        self.wrap(|db| {
            db.execute(
                "INSERT INTO events (ts, mac, kind, detail) VALUES (?1, ?2, ?3, ?4)",
                params![t, mac.map(|m| m.to_string()), kind, detail],
            )?;
            Ok(())
        })
    }

    /// The newest `limit` events, newest first.
    pub fn events(&self, limit: usize) -> Result<Vec<Event>, StateError> {
        self.wrap(|db| {
            let mut stmt =
                db.prepare("SELECT ts, mac, kind, detail FROM events ORDER BY id DESC LIMIT ?1")?;
            let rows = stmt.query_map(params![limit as i64], |r| {
                Ok(Event {
                    ts: r.get(0)?,
                    mac: r.get(1)?,
                    kind: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }
}

fn log(
    db: &Connection,
    t: i64,
    mac: Mac,
    kind: &str,
    detail: Option<&str>,
) -> rusqlite::Result<()> {
    db.execute(
        "INSERT INTO events (ts, mac, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![t, mac.to_string(), kind, detail],
    )?;
    Ok(())
}

const SELECT_HOST: &str = "SELECT mac, ip, arch, first_seen, last_seen, assigned, installed,
    installed_digest, status, progress_pct, bytes_done, bytes_total, detail, reimage, token FROM hosts";

fn row_to_host(r: &rusqlite::Row<'_>) -> rusqlite::Result<HostRecord> {
    let mac: String = r.get(0)?;
    let status: String = r.get(8)?;
    Ok(HostRecord {
        mac: mac.parse().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
        ip: r.get(1)?,
        arch: r.get(2)?,
        first_seen: r.get(3)?,
        last_seen: r.get(4)?,
        assigned: r.get(5)?,
        installed: r.get(6)?,
        installed_digest: r.get(7)?,
        status: HostStatus::parse(&status),
        progress_pct: r.get::<_, i64>(9)?.clamp(0, 100) as u8,
        bytes_done: r.get::<_, i64>(10)?.max(0) as u64,
        bytes_total: r.get::<_, i64>(11)?.max(0) as u64,
        detail: r.get(12)?,
        reimage: r.get::<_, i64>(13)? != 0,
        token: r.get(14)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

        s.start_install(mac, "web@2", "tok").unwrap();
        s.progress(mac, 50, 200).unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!(
            (h.status, h.progress_pct, h.token.as_deref()),
            (HostStatus::Imaging, 25, Some("tok"))
        );

        s.installed(mac, "web@2", "abc", "fetched 1 MiB").unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!(
            (h.status, h.installed.as_deref(), h.token),
            (HostStatus::Installed, Some("web@2"), None)
        );
        assert!(!h.reimage);

        assert_eq!(s.request_reimage(&[mac]).unwrap(), 1);
        assert!(s.host(mac).unwrap().unwrap().reimage);
        s.failed(mac, "no disk matching auto").unwrap();
        let h = s.host(mac).unwrap().unwrap();
        assert_eq!(
            (h.status, h.detail.as_deref()),
            (HostStatus::Failed, Some("no disk matching auto"))
        );
        let kinds: Vec<String> = s.events(10).unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            ["failed", "reimage-requested", "installed", "agent-booted"]
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
