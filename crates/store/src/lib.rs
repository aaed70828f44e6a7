//! The combined image store: many disk images, one copy of the data they have in common.
//!
//! On disk (docs/store-format.md has the byte layout):
//! ```text
//! STORE/fleetboot-store          marker + format version; a folder without it is not written into
//! STORE/lock                     writers (import, rm, gc) hold an exclusive lock on it
//! STORE/packs/<id>.pack          immutable pack files: zstd frames of chunks, appended once
//! STORE/manifests/<name>/<N>.manifest   descriptive data of image NAME@N
//! STORE/versions/<name>          the last version number issued for NAME (never reused)
//! STORE/retired/<id>.pack        packs gc took out of use, still readable by installs that
//!                                began before it; deleted by a gc after the grace period
//! STORE/tmp/                     files being written; renamed into place only when complete
//! ```
//! Invariants: a pack or manifest is visible only when complete (temp + fsync + rename); packs are
//! never modified, only created and (by gc, once nothing refers to them) deleted; a manifest never
//! refers to a pack that is not visible; nothing is served or written out without its BLAKE3 check.

mod chunker;
mod fsutil;
mod gc;
pub mod import;
mod name;
mod pack;
mod pack_files;
mod qcow2;
mod report;
mod restore;
pub mod source;
mod verify;

pub use chunker::Chunking;
pub use gc::GcReport;
pub use import::{ImportOptions, ImportReport};
pub use name::{validate_name, ImageRef, NameError};
pub use pack_files::{PackFiles, BUFFERS_KEPT_MAX};
pub use report::{DiffReport, ImageSummary, StoreStats};
pub use restore::{ExportOptions, ExportReport};
pub use verify::VerifyReport;

use fleetboot_image::{Manifest, ManifestError, PackId};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Contents of the marker file that makes a folder a store.
const MARKER: &str = "fleetboot store, format 1\n";
const MARKER_FILE: &str = "fleetboot-store";

/// Errors of the store, each naming what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{0}: not a fleetboot store (the folder is not empty and has no {MARKER_FILE} file)")]
    NotAStore(PathBuf),
    #[error("no store at {0} (import an image first, or give --store / FLEETBOOT_STORE)")]
    NoStore(PathBuf),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("no image named {0:?} in the store")]
    UnknownImage(String),
    #[error("image {name} has no version {version} (it has {have})")]
    UnknownVersion {
        name: String,
        version: u32,
        have: String,
    },
    #[error("{path}: {what}")]
    BadInput { path: PathBuf, what: String },
    #[error("manifest {path}: {error}")]
    Manifest { path: PathBuf, error: ManifestError },
    #[error(transparent)]
    Restore(#[from] fleetboot_image::RestoreError),
    #[error("{path} exists (give --force to overwrite it)")]
    OutputExists { path: PathBuf },
}

/// Attaches the path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|error| StoreError::Io {
            path: path.to_path_buf(),
            error,
        })
    }
}

/// A handle on a store folder.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// An exclusive writer's lock on the store; released on drop (or when the process dies).
pub struct WriteLock {
    _file: File,
}

/// One stored image version, as found on disk.
#[derive(Clone, Debug)]
pub struct VersionPath {
    pub name: String,
    pub version: u32,
    pub path: PathBuf,
}

impl Store {
    /// A store at `root`; nothing is touched until it is used.
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    fn packs_dir(&self) -> PathBuf {
        self.root.join("packs")
    }
    fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }
    fn versions_dir(&self) -> PathBuf {
        self.root.join("versions")
    }
    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    fn retired_dir(&self) -> PathBuf {
        self.root.join("retired")
    }
    /// The path of a pack file.
    pub fn pack_path(&self, id: &PackId) -> PathBuf {
        self.packs_dir().join(id.file_name())
    }
    /// Where a pack that gc retired waits out its grace period.
    pub fn retired_pack_path(&self, id: &PackId) -> PathBuf {
        self.retired_dir().join(id.file_name())
    }

    /// Opens pack `id` for reading: from `packs/`, or from `retired/` if gc has taken it out of
    /// use since the reader loaded its manifest (readers take no lock; a retired pack stays
    /// readable for the grace period, so an install or export that began before gc finishes).
    pub fn open_pack(&self, id: &PackId) -> io::Result<File> {
        match File::open(self.pack_path(id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                File::open(self.retired_pack_path(id)).map_err(|_| e)
            }
            other => other,
        }
    }
    /// The path of the manifest of `name@version` (the name must be valid).
    pub fn manifest_path(&self, name: &str, version: u32) -> PathBuf {
        self.manifests_dir()
            .join(name)
            .join(format!("{version}.manifest"))
    }

    /// Fails unless the folder is an existing store (for commands that only read).
    fn check_exists(&self) -> Result<(), StoreError> {
        if self.root.join(MARKER_FILE).is_file() {
            Ok(())
        } else if self.root.is_dir() && !is_empty_dir(&self.root)? {
            Err(StoreError::NotAStore(self.root.clone()))
        } else {
            Err(StoreError::NoStore(self.root.clone()))
        }
    }

    /// Creates the store if the folder is missing or empty, then takes the writers' lock and
    /// removes temp files that a crashed writer left behind. Creation happens under the lock, so
    /// two first imports at once cannot trip over each other.
    pub fn lock_for_write(&self) -> Result<WriteLock, StoreError> {
        if !self.root.join(MARKER_FILE).is_file()
            && self.root.is_dir()
            && !is_empty_dir(&self.root)?
        {
            return Err(StoreError::NotAStore(self.root.clone()));
        }
        fs::create_dir_all(&self.root).at(&self.root)?;
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?;
        file.lock().at(&path)?;
        for dir in [
            self.packs_dir(),
            self.manifests_dir(),
            self.versions_dir(),
            self.tmp_dir(),
            self.retired_dir(),
        ] {
            fs::create_dir_all(&dir).at(&dir)?;
        }
        let marker = self.root.join(MARKER_FILE);
        if !marker.is_file() {
            // The marker goes last and atomically: a store is complete once it is there.
            fsutil::write_atomic(&self.tmp_dir(), &marker, MARKER.as_bytes()).at(&marker)?;
        }
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).at(&tmp)? {
            let entry = entry.at(&tmp)?;
            let _ = fs::remove_file(entry.path());
        }
        Ok(WriteLock { _file: file })
    }

    /// Every stored image version, sorted by name then version.
    pub fn versions(&self) -> Result<Vec<VersionPath>, StoreError> {
        self.check_exists()?;
        let dir = self.manifests_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_name(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            // Readers take no lock: `image rm` may remove the name's folder since the listing.
            let versions = match fs::read_dir(entry.path()) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                other => other.at(&entry.path())?,
            };
            for v in versions {
                let v = v.at(&entry.path())?;
                let file = v.file_name().to_string_lossy().into_owned();
                let Some(Ok(version)) = file.strip_suffix(".manifest").map(str::parse::<u32>)
                else {
                    continue;
                };
                out.push(VersionPath {
                    name: name.clone(),
                    version,
                    path: v.path(),
                });
            }
        }
        out.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
        Ok(out)
    }

    /// The versions of one image, oldest first.
    fn versions_of(&self, name: &str) -> Result<Vec<VersionPath>, StoreError> {
        validate_name(name)?;
        Ok(self
            .versions()?
            .into_iter()
            .filter(|v| v.name == name)
            .collect())
    }

    /// Finds the version `r` names (the latest if it names none).
    pub fn resolve(&self, r: &ImageRef) -> Result<VersionPath, StoreError> {
        let versions = self.versions_of(&r.name)?;
        let Some(latest) = versions.last() else {
            return Err(StoreError::UnknownImage(r.name.clone()));
        };
        match r.version {
            None => Ok(latest.clone()),
            Some(want) => versions
                .iter()
                .find(|v| v.version == want)
                .cloned()
                .ok_or_else(|| StoreError::UnknownVersion {
                    name: r.name.clone(),
                    version: want,
                    have: versions
                        .iter()
                        .map(|v| format!("@{}", v.version))
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
        }
    }

    /// Reads and validates a manifest file.
    pub fn load_manifest(&self, path: &Path) -> Result<Manifest, StoreError> {
        let bytes = fs::read(path).at(path)?;
        Manifest::decode(&bytes).map_err(|error| StoreError::Manifest {
            path: path.to_path_buf(),
            error,
        })
    }

    /// The manifest of the image `r` names.
    pub fn manifest(&self, r: &ImageRef) -> Result<(VersionPath, Manifest), StoreError> {
        let v = self.resolve(r)?;
        let m = self.load_manifest(&v.path)?;
        Ok((v, m))
    }

    /// Every image version with its manifest (fails on the first unreadable one).
    pub fn all_manifests(&self) -> Result<Vec<(VersionPath, Manifest)>, StoreError> {
        self.versions()?
            .into_iter()
            .map(|v| self.load_manifest(&v.path).map(|m| (v, m)))
            .collect()
    }

    /// Pack files present in `packs/`, with their sizes.
    pub fn packs(&self) -> Result<Vec<(PackId, u64)>, StoreError> {
        self.check_exists()?;
        pack_files_in(&self.packs_dir())
    }

    /// Packs gc retired, with their sizes and when they were retired (a store made before
    /// `retired/` existed has none).
    pub fn retired_packs(&self) -> Result<Vec<(PackId, u64, SystemTime)>, StoreError> {
        self.check_exists()?;
        let dir = self.retired_dir();
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (id, len) in pack_files_in(&dir)? {
            let path = self.retired_pack_path(&id);
            let when = fs::metadata(&path).and_then(|m| m.modified()).at(&path)?;
            out.push((id, len, when));
        }
        Ok(out)
    }

    /// Issues the next version number of `name` (the caller holds the writers' lock): one more
    /// than any version ever issued for it, so `rm x@3` followed by an import gives x@4, never a
    /// second, different x@3 that hosts which installed the first would be taken to have. The
    /// counter is written (atomically) before the manifest appears; a crash in between only
    /// skips a number.
    pub(crate) fn issue_version(&self, name: &str) -> Result<u32, StoreError> {
        validate_name(name)?;
        let path = self.versions_dir().join(name);
        let issued = match fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse::<u32>()
                .map_err(|_| StoreError::BadInput {
                    path: path.clone(),
                    what: format!("version counter holds {:?}, not a number", text.trim()),
                })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).at(&path),
        };
        // Stores made before the counter existed: continue after what is there.
        let present = self.versions_of(name)?.last().map_or(0, |v| v.version);
        let next = issued
            .max(present)
            .checked_add(1)
            .ok_or_else(|| StoreError::BadInput {
                path: path.clone(),
                what: "no version numbers left".into(),
            })?;
        let dir = self.versions_dir();
        fs::create_dir_all(&dir).at(&dir)?;
        fsutil::write_atomic(&self.tmp_dir(), &path, format!("{next}\n").as_bytes()).at(&path)?;
        Ok(next)
    }

    /// Removes an image version, or every version of a name; returns what was removed.
    /// The data they used is freed by `gc`.
    pub fn remove(&self, r: &ImageRef) -> Result<Vec<ImageRef>, StoreError> {
        let _lock = self.lock_for_write()?;
        let doomed = match r.version {
            Some(_) => vec![self.resolve(r)?],
            None => {
                let all = self.versions_of(&r.name)?;
                if all.is_empty() {
                    return Err(StoreError::UnknownImage(r.name.clone()));
                }
                all
            }
        };
        let mut removed = Vec::new();
        for v in &doomed {
            fs::remove_file(&v.path).at(&v.path)?;
            removed.push(ImageRef {
                name: v.name.clone(),
                version: Some(v.version),
            });
        }
        let dir = self.manifests_dir().join(&r.name);
        fsutil::sync_dir(&dir).at(&dir)?;
        if fs::read_dir(&dir).at(&dir)?.next().is_none() {
            fs::remove_dir(&dir).at(&dir)?;
        }
        Ok(removed)
    }
}

/// Whether `dir` holds nothing but what a store's creation makes before its marker (a store
/// being created by another process, or whose creation was interrupted).
fn is_empty_dir(dir: &Path) -> Result<bool, StoreError> {
    for entry in fs::read_dir(dir).at(dir)? {
        let name = entry.at(dir)?.file_name();
        if !matches!(
            name.to_str(),
            Some("lock" | "packs" | "manifests" | "versions" | "tmp" | "retired")
        ) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `*.pack` files in `dir`, with their sizes, sorted.
fn pack_files_in(dir: &Path) -> Result<Vec<(PackId, u64)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(Ok(id)) = file.strip_suffix(".pack").map(str::parse::<PackId>) else {
            continue;
        };
        match entry.metadata() {
            Ok(m) => out.push((id, m.len())),
            // Moved or deleted by a gc since the listing: readers take no lock.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).at(&entry.path()),
        }
    }
    out.sort();
    Ok(out)
}
