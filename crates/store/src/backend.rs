//! Where a store's objects live: the small interface every store operation goes through, and its
//! local-folder implementation.
//!
//! A store is a set of immutable objects named by keys (`packs/<id>.pack`,
//! `manifests/<name>/<N>.manifest`, `claims/<name>/<N>.<nonce>`, `retired/<id>.pack`, the marker).
//! The interface is what an object store gives: read whole or by range, write-and-commit (an
//! object is visible whole or not at all), list by prefix, delete, move. The folder backend maps
//! keys to files beneath its root; an object-store backend (S3, in the appliance's
//! `fleetboot::s3` module) maps them to object names beneath its prefix. Neither knows what the
//! objects mean: that is the store's.

use super::fsutil::{sync_dir, write_atomic};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One object, as a listing finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key, relative to the store (`packs/….pack`).
    pub key: String,
    pub size: u64,
    /// When it was written (or, for a moved object, moved).
    pub modified: SystemTime,
}

/// The objects of a store, wherever they are kept. Keys are `/`-separated relative names made
/// by the store only; errors of kind `NotFound` mean the object is absent.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Where `key` is (a path, or an `s3://` address), for messages.
    fn locate(&self, key: &str) -> PathBuf;
    /// The local folder holding the objects as files, if they are (packs can then be served
    /// from open files by `sendfile`).
    fn folder(&self) -> Option<&Path> {
        None
    }
    /// The whole object, or `None` if there is none.
    fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>>;
    /// Exactly `len` bytes at `offset` (`UnexpectedEof` if the object is shorter).
    fn read_at(&self, key: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Writes `bytes` as `key`, replacing what is there; visible whole or not at all, and
    /// durable once this returns.
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()>;
    /// Publishes the complete local file `file` (synced, in the store's staging folder) as `key`;
    /// the file is moved or copied, never visible in part.
    fn put_file(&self, key: &str, file: &Path) -> io::Result<()>;
    /// Every object whose key starts with `prefix` (a folder-like prefix ending in `/`).
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>>;
    /// Removes `key`; an absent object is not an error.
    fn delete(&self, key: &str) -> io::Result<()>;
    /// Moves `from` to `to`, stamping it with the present time (gc's retirement stamp).
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// A URL that lets whoever holds it GET `key` directly for `ttl`, where the backend has
    /// such URLs (an object store's presigned URLs); `None` where it has not.
    fn presign(&self, key: &str, ttl: std::time::Duration) -> Option<io::Result<String>> {
        let _ = (key, ttl);
        None
    }
}

/// Objects as files beneath a local folder, each written by temp file, fsync and rename.
#[derive(Clone, Debug)]
pub struct Folder {
    root: PathBuf,
}

impl Folder {
    pub fn new(root: impl Into<PathBuf>) -> Folder {
        Folder { root: root.into() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Creates the folder that will hold `path`, making the new entry durable in its parent.
    fn ensure_parent(&self, path: &Path) -> io::Result<()> {
        let Some(dir) = path.parent() else {
            return Ok(());
        };
        if dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        match dir.parent() {
            Some(up) => sync_dir(up),
            None => Ok(()),
        }
    }
}

impl Backend for Folder {
    fn locate(&self, key: &str) -> PathBuf {
        self.path(key)
    }

    fn folder(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.path(key)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_at(&self, key: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let file = File::open(self.path(key))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(key);
        self.ensure_parent(&path)?;
        match write_atomic(&self.tmp_dir(), &path, bytes) {
            // The staging folder is made by a writer's lock; a folder used as a plain backend
            // (a mirror, a test) may not have one yet.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.tmp_dir().is_dir() => {
                fs::create_dir_all(self.tmp_dir())?;
                write_atomic(&self.tmp_dir(), &path, bytes)
            }
            other => other,
        }
    }

    fn put_file(&self, key: &str, file: &Path) -> io::Result<()> {
        let path = self.path(key);
        self.ensure_parent(&path)?;
        fs::rename(file, &path)?;
        sync_dir(path.parent().unwrap_or(&self.root))
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        walk(&self.path(prefix), prefix, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        }
        let Some(dir) = path.parent() else {
            return Ok(());
        };
        sync_dir(dir)?;
        // A per-name folder of manifests left empty goes too (`image rm` of a name's last
        // version); claims' folders stay, as a writer may be about to add one.
        if key.starts_with("manifests/")
            && dir.parent().is_some_and(|up| up != self.root)
            && fs::remove_dir(dir).is_ok()
        {
            if let Some(up) = dir.parent() {
                sync_dir(up)?;
            }
        }
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (self.path(from), self.path(to));
        self.ensure_parent(&to)?;
        // Setting times needs ownership, not write access: packs may be read-only. The stamp
        // goes first, so a crash cannot leave the moved file with its old time.
        File::open(&from)?.set_modified(SystemTime::now())?;
        fs::rename(&from, &to)?;
        for dir in [from.parent(), to.parent()].into_iter().flatten() {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

/// Files beneath `dir` (whose key prefix is `prefix`), recursively. Entries that vanish during
/// the walk (readers take no lock) are skipped.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<ObjectInfo>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // Followed, as the store always did: a symlinked folder or pack is listed.
        let meta = match fs::metadata(entry.path()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            other => other?,
        };
        let key = format!("{prefix}{name}");
        if meta.is_dir() {
            walk(&entry.path(), &format!("{key}/"), out)?;
        } else if meta.is_file() {
            out.push(ObjectInfo {
                key,
                size: meta.len(),
                modified: meta.modified()?,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_objects_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let b = Folder::new(dir.path());
        assert_eq!(b.get("manifests/a/1.manifest").unwrap(), None);
        b.put("manifests/a/1.manifest", b"one").unwrap();
        b.put("manifests/b/2.manifest", b"two").unwrap();
        assert_eq!(b.get("manifests/a/1.manifest").unwrap().unwrap(), b"one");
        assert_eq!(b.read_at("manifests/b/2.manifest", 1, 2).unwrap(), b"wo");
        let e = b.read_at("manifests/b/2.manifest", 2, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let keys: Vec<String> = b
            .list("manifests/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["manifests/a/1.manifest", "manifests/b/2.manifest"]);
        b.rename("manifests/a/1.manifest", "retired/x").unwrap();
        assert_eq!(b.get("retired/x").unwrap().unwrap(), b"one");
        b.delete("manifests/b/2.manifest").unwrap();
        b.delete("manifests/b/2.manifest").unwrap();
        assert!(b.list("manifests/").unwrap().is_empty());
        // The per-name folders went with their last object; the top folder stays.
        assert!(!dir.path().join("manifests/b").exists());
        assert!(dir.path().join("manifests").is_dir());
    }
}
