//! Atomic file creation: write to a temp file in the store's `tmp/`, fsync, rename, fsync the folder.
//!
//! A file made this way is either absent or complete at its final name, whatever moment a crash
//! or `kill -9` strikes. Temp files left by a crash are removed by the next writer (under the
//! store lock), never read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other temp file of this or another process has.
pub fn unique_name(suffix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos}-{n}{suffix}", std::process::id())
}

/// A file being written in a temp folder; removed on drop unless [`TempFile::persist`] ran.
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// Creates a new temp file in `dir`.
    pub fn create_in(dir: &Path, suffix: &str) -> io::Result<TempFile> {
        let path = dir.join(unique_name(suffix));
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempFile {
            path,
            file: Some(file),
        })
    }

    /// The open file.
    pub fn file(&mut self) -> &mut File {
        self.file
            .as_mut()
            .expect("temp file is open until persisted")
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes the data to stable storage, then renames the file to `dest` and syncs its folder.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        let file = self.file.take().expect("temp file is open until persisted");
        file.sync_all()?;
        drop(file);
        fs::rename(&self.path, dest)?;
        self.path = PathBuf::new();
        match dest.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
            _ => sync_dir(Path::new(".")),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` to `dest` atomically, staging it in `tmp_dir` (same filesystem).
pub fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = TempFile::create_in(tmp_dir, ".tmp")?;
    tmp.file().write_all(bytes)?;
    tmp.persist(dest)
}

/// Makes a rename or unlink in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
