//! Install console logs: one file per install, `STATE_DIR/logs/MAC/INSTANCE.log` (the install's
//! cloud-init instance-id names it), appended by the agent as it runs. An append carries the
//! byte offset it starts at, so a retried chunk is taken once and a gap is refused with the
//! length the appliance holds (the agent resends from there). Each log is bounded, and each host
//! keeps its newest [`KEEP_PER_HOST`] logs: a failed install's log stays until newer installs
//! push it out.

use crate::mac::Mac;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The most one install's log may hold; past it the rest is dropped (with a marker).
pub const LOG_MAX: u64 = 16 << 20;
/// Logs kept per host, newest first.
pub const KEEP_PER_HOST: usize = 10;

/// Why an append was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the chunk starts at byte {offset}, past the {length} bytes held")]
    Gap { offset: u64, length: u64 },
    #[error("install log {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// One install's log, as listed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LogEntry {
    pub instance: String,
    /// Unix seconds of its last append.
    pub modified: i64,
    pub bytes: u64,
}

/// The logs of every host under one folder; appends are serialised.
pub struct InstallLogs {
    dir: PathBuf,
    lock: Mutex<()>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |error| LogError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// An instance-id as a file name: only what `fleetboot-<hex>` holds.
fn safe(instance: &str) -> bool {
    !instance.is_empty()
        && instance.len() <= 64
        && instance
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl InstallLogs {
    pub fn new(state_dir: &Path) -> InstallLogs {
        InstallLogs {
            dir: state_dir.join("logs"),
            lock: Mutex::new(()),
        }
    }

    fn host_dir(&self, mac: Mac) -> PathBuf {
        self.dir.join(mac.to_string().replace(':', "-"))
    }

    /// Appends `bytes`, which start at byte `offset` of the install's log; returns the log's
    /// length after it. What the log already holds is skipped (a retry); a start past its end
    /// is a [`LogError::Gap`].
    pub fn append(
        &self,
        mac: Mac,
        instance: &str,
        offset: u64,
        bytes: &[u8],
    ) -> Result<u64, LogError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.host_dir(mac);
        let path = dir.join(format!("{instance}.log"));
        if !safe(instance) {
            return Err(LogError::Io {
                path,
                error: std::io::Error::other("not an instance-id"),
            });
        }
        let length = std::fs::metadata(&path).map_or(0, |m| m.len());
        if offset > length {
            return Err(LogError::Gap { offset, length });
        }
        if length == 0 {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            self.prune(&dir);
        }
        let new = bytes.get((length - offset) as usize..).unwrap_or_default();
        let room = LOG_MAX.saturating_sub(length) as usize;
        if new.is_empty() || room == 0 {
            return Ok(length);
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        if new.len() > room {
            let marker = b"\n[fleetboot: the install log reached its limit; the rest is dropped]\n";
            let keep = room.saturating_sub(marker.len());
            f.write_all(&new[..keep]).map_err(io(&path))?;
            f.write_all(&marker[..marker.len().min(room)])
                .map_err(io(&path))?;
        } else {
            f.write_all(new).map_err(io(&path))?;
        }
        Ok(std::fs::metadata(&path).map_or(length, |m| m.len()))
    }

    /// Keeps the newest `KEEP_PER_HOST - 1` logs of a host about to start another.
    fn prune(&self, dir: &Path) {
        let mut logs = list_dir(dir);
        for old in logs.drain(..).skip(KEEP_PER_HOST - 1) {
            let _ = std::fs::remove_file(dir.join(format!("{}.log", old.instance)));
        }
    }

    /// A host's logs, newest first.
    pub fn list(&self, mac: Mac) -> Vec<LogEntry> {
        list_dir(&self.host_dir(mac))
    }

    /// One install's log (`None`: the newest), with its entry.
    pub fn read(
        &self,
        mac: Mac,
        instance: Option<&str>,
    ) -> Result<Option<(LogEntry, Vec<u8>)>, LogError> {
        let entries = self.list(mac);
        let Some(entry) = (match instance {
            Some(i) => entries.into_iter().find(|e| e.instance == i),
            None => entries.into_iter().next(),
        }) else {
            return Ok(None);
        };
        let path = self.host_dir(mac).join(format!("{}.log", entry.instance));
        let text = std::fs::read(&path).map_err(io(&path))?;
        Ok(Some((entry, text)))
    }
}

fn list_dir(dir: &Path) -> Vec<LogEntry> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(SystemTime, LogEntry)> = read
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let instance = name.strip_suffix(".log")?.to_string();
            let meta = e.metadata().ok()?;
            let modified = meta.modified().ok()?;
            let unix = modified
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            Some((
                modified,
                LogEntry {
                    instance,
                    modified: unix,
                    bytes: meta.len(),
                },
            ))
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.instance.cmp(&a.1.instance)));
    out.into_iter().map(|(_, e)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_by_offset_once_and_refuses_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let logs = InstallLogs::new(dir.path());
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        assert_eq!(logs.append(mac, "fleetboot-aa", 0, b"one\n").unwrap(), 4);
        // A retried chunk, and one overlapping what is held: each byte is taken once.
        assert_eq!(logs.append(mac, "fleetboot-aa", 0, b"one\n").unwrap(), 4);
        assert_eq!(logs.append(mac, "fleetboot-aa", 2, b"e\ntwo\n").unwrap(), 8);
        assert!(matches!(
            logs.append(mac, "fleetboot-aa", 20, b"x"),
            Err(LogError::Gap { length: 8, .. })
        ));
        let (entry, text) = logs.read(mac, None).unwrap().unwrap();
        assert_eq!(text, b"one\ntwo\n");
        assert_eq!((entry.instance.as_str(), entry.bytes), ("fleetboot-aa", 8));
        assert!(logs.append(mac, "../../etc/x", 0, b"x").is_err());
        assert!(logs.read(mac, Some("fleetboot-zz")).unwrap().is_none());
    }

    #[test]
    fn each_host_keeps_its_newest_logs() {
        let dir = tempfile::tempdir().unwrap();
        let logs = InstallLogs::new(dir.path());
        let mac: Mac = "52:54:00:00:00:02".parse().unwrap();
        for i in 0..KEEP_PER_HOST + 3 {
            logs.append(mac, &format!("fleetboot-{i:02}"), 0, b"x\n")
                .unwrap();
            // mtimes one apart, so "newest" is well defined on any filesystem.
            let path = dir
                .path()
                .join(format!("logs/52-54-00-00-00-02/fleetboot-{i:02}.log"));
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i as u64);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let list = logs.list(mac);
        assert_eq!(list.len(), KEEP_PER_HOST);
        assert_eq!(
            list[0].instance,
            format!("fleetboot-{:02}", KEEP_PER_HOST + 2)
        );
        assert!(!list.iter().any(|e| e.instance == "fleetboot-00"));
    }

    #[test]
    fn a_log_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let logs = InstallLogs::new(dir.path());
        let mac: Mac = "52:54:00:00:00:03".parse().unwrap();
        let big = vec![b'a'; (LOG_MAX as usize) - 10];
        let len = logs.append(mac, "fleetboot-big", 0, &big).unwrap();
        let len = logs
            .append(mac, "fleetboot-big", len, &[b'b'; 100])
            .unwrap();
        assert_eq!(len, LOG_MAX);
        assert_eq!(
            logs.append(mac, "fleetboot-big", len, b"more").unwrap(),
            LOG_MAX
        );
    }
}
