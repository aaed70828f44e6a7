//! The combined image store: many disk images, one copy of the data they have in common.
//!
//! The store's objects (docs/store-format.md has the byte layout), in a local folder or, through
//! the [`Backend`] interface, in an object store:
//! ```text
//! fleetboot-store                 marker + format version; a folder without it is not written into
//! packs/<id>.pack                 immutable packs: zstd frames of chunks, written once
//! manifests/<name>/<N>.manifest   descriptive data of image NAME@N
//! claims/<name>/<N>.<nonce>       version numbers issued for NAME (never reused)
//! retired/<id>.pack               packs gc took out of use, still readable by installs that
//!                                 began before it; deleted by a gc after the grace period
//! versions/<name>                 (stores made before claims) the last version issued
//! ```
//! and, in the local folder (the store's own, or an object store's staging folder):
//! ```text
//! lock                            writers (import, rm, gc) hold an exclusive lock on it
//! tmp/                            files being written; published only when complete
//! compact.lock, tmp/compact/      `store compact`'s own lock and its staged packs
//! ```
//! Invariants: a pack or manifest is visible only when complete (temp + fsync + rename, or one
//! object PUT); packs are never modified, only created and (by gc, once nothing refers to them
//! for the grace period) deleted; a manifest never refers to a pack that is not visible; nothing
//! is served or written out without its BLAKE3 check.

mod backend;
mod chunker;
mod compact;
mod fsutil;
mod gc;
mod id_tables;
pub mod import;
mod name;
mod pack;
mod pack_files;
mod qcow2;
mod report;
mod restore;
pub mod source;
mod verify;

pub use backend::{Backend, Folder, ObjectInfo};
pub use chunker::Chunking;
pub use compact::{CompactOptions, CompactReport};
pub use gc::GcReport;
pub use import::{ImportOptions, ImportReport};
pub use name::{validate_name, ImageRef, NameError};
pub use pack_files::{PackFiles, BUFFERS_KEPT_MAX};
pub use report::{DiffReport, ImageSummary, StoreStats};
pub use restore::{ExportOptions, ExportReport};
pub use verify::VerifyReport;

use fleetboot_image::{FrameSource, Manifest, ManifestError, PackId};
use pack::LocalPacks;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// A handle on a store: its objects (in a folder or an object store) and the local folder where
/// writers take their lock and stage what they write.
#[derive(Clone, Debug)]
pub struct Store {
    /// The store folder itself, or (object-store backends) the local staging folder.
    root: PathBuf,
    backend: Arc<dyn Backend>,
    /// Id tables read so far (immutable, and checked against each manifest's digest on use).
    id_tables: id_tables::IdTableCache,
}

/// An exclusive writer's lock on the store; released on drop (or when the process dies).
pub struct WriteLock {
    _file: File,
}

/// A manifest as agents are served it ([`Store::served_manifest`]).
pub struct ServedManifest {
    pub manifest: Manifest,
    /// Format 1 bytes: the file, or the expansion of a format 2 file.
    pub bytes: Vec<u8>,
    /// The file is format 2: only an appliance (which reads the id tables) can serve it, not a
    /// mirror of the store's files nor a presigned URL of the object.
    pub expanded: bool,
}

/// One stored image version, as a listing found it.
#[derive(Clone, Debug)]
pub struct VersionPath {
    pub name: String,
    pub version: u32,
    /// The key of its manifest.
    pub key: String,
    /// Where its manifest is (a file, or an `s3://` address), for messages.
    pub path: PathBuf,
    /// The manifest's length and modification time (to know an unchanged manifest).
    pub size: u64,
    pub modified: SystemTime,
}

/// How many times an import tries to claim a version number that other importers also want.
const CLAIM_TRIES: u32 = 32;

impl Store {
    /// The store in the local folder `root`; nothing is touched until it is used.
    pub fn new(root: impl Into<PathBuf>) -> Store {
        let root = root.into();
        Store {
            backend: Arc::new(Folder::new(root.clone())),
            root,
            id_tables: Default::default(),
        }
    }

    /// A store whose objects `backend` keeps; `staging` is a local folder for the writers'
    /// lock and for packs being written before they are published.
    pub fn with_backend(staging: impl Into<PathBuf>, backend: Arc<dyn Backend>) -> Store {
        Store {
            root: staging.into(),
            backend,
            id_tables: Default::default(),
        }
    }

    /// The store folder (or, for an object store, the local staging folder).
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Where the store is, for messages: its folder or its `s3://` address.
    pub fn location(&self) -> PathBuf {
        self.backend.locate("")
    }
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }
    /// Whether the objects are files in a local folder (packs can be served from open files).
    pub fn is_local(&self) -> bool {
        self.backend.folder().is_some()
    }
    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    /// The key of a pack.
    pub fn pack_key(id: &PackId) -> String {
        format!("packs/{}", id.file_name())
    }
    /// The key of a pack gc retired.
    pub fn retired_key(id: &PackId) -> String {
        format!("retired/{}", id.file_name())
    }
    /// The key of the manifest of `name@version`.
    pub fn manifest_key(name: &str, version: u32) -> String {
        format!("manifests/{name}/{version}.manifest")
    }
    /// The path of a pack file (of a folder store).
    pub fn pack_path(&self, id: &PackId) -> PathBuf {
        self.root.join(Self::pack_key(id))
    }
    /// Where a pack that gc retired waits out its grace period (in a folder store).
    pub fn retired_pack_path(&self, id: &PackId) -> PathBuf {
        self.root.join(Self::retired_key(id))
    }

    /// Opens pack `id` of a folder store for reading: from `packs/`, or from `retired/` if gc
    /// has taken it out of use since the reader loaded its manifest (readers take no lock; a
    /// retired pack stays readable for the grace period, so an install or export that began
    /// before gc finishes).
    pub fn open_pack(&self, id: &PackId) -> io::Result<File> {
        if !self.is_local() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the store is not a local folder",
            ));
        }
        match File::open(self.pack_path(id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                File::open(self.retired_pack_path(id)).map_err(|_| e)
            }
            other => other,
        }
    }

    /// Reads frames of the store's packs (retired ones too), keeping local packs open.
    pub fn frames(&self) -> Box<dyn FrameSource + Send + '_> {
        if self.is_local() {
            Box::new(LocalPacks::new(self))
        } else {
            Box::new(BackendPacks(self))
        }
    }

    /// The path of the manifest of `name@version` (the name must be valid).
    pub fn manifest_path(&self, name: &str, version: u32) -> PathBuf {
        self.backend.locate(&Self::manifest_key(name, version))
    }

    /// Fails unless the store exists (for commands that only read).
    fn check_exists(&self) -> Result<(), StoreError> {
        if self
            .backend
            .get(MARKER_FILE)
            .at(&self.location())?
            .is_some()
        {
            Ok(())
        } else if self.is_local() && self.root.is_dir() && !is_empty_dir(&self.root)? {
            Err(StoreError::NotAStore(self.root.clone()))
        } else {
            Err(StoreError::NoStore(self.location()))
        }
    }

    /// Creates the store if the folder is missing or empty, then takes the writers' lock and
    /// removes temp files that a crashed writer left behind. Creation happens under the lock, so
    /// two first imports at once cannot trip over each other. (The lock is local: writers on
    /// other machines sharing an object store do not take it; see `issue_version` and gc.)
    pub fn lock_for_write(&self) -> Result<WriteLock, StoreError> {
        let local = self.is_local();
        if local
            && !self.root.join(MARKER_FILE).is_file()
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
        let mut dirs = vec![self.tmp_dir()];
        if local {
            dirs.extend(["packs", "manifests", "claims", "retired"].map(|d| self.root.join(d)));
        }
        for dir in dirs {
            fs::create_dir_all(&dir).at(&dir)?;
        }
        if self
            .backend
            .get(MARKER_FILE)
            .at(&self.location())?
            .is_none()
        {
            // The marker goes last and atomically: a store is complete once it is there.
            self.backend
                .put(MARKER_FILE, MARKER.as_bytes())
                .at(&self.backend.locate(MARKER_FILE))?;
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
        let prefix = "manifests/";
        let mut out = Vec::new();
        for o in self.backend.list(prefix).at(&self.backend.locate(prefix))? {
            let Some((name, file)) = o.key[prefix.len()..].split_once('/') else {
                continue;
            };
            let Some(Ok(version)) = file.strip_suffix(".manifest").map(str::parse::<u32>) else {
                continue;
            };
            if validate_name(name).is_err() {
                continue;
            }
            out.push(VersionPath {
                name: name.to_string(),
                version,
                path: self.backend.locate(&o.key),
                key: o.key,
                size: o.size,
                modified: o.modified,
            });
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
        Store::resolve_in(&self.versions_of(&r.name)?, r)
    }

    /// Finds the version `r` names in a listing made by [`Store::versions`] (sorted by name,
    /// then version): for a caller that keeps the listing of an object store for a moment.
    pub fn resolve_in(versions: &[VersionPath], r: &ImageRef) -> Result<VersionPath, StoreError> {
        validate_name(&r.name)?;
        let versions: Vec<&VersionPath> = versions.iter().filter(|v| v.name == r.name).collect();
        let Some(latest) = versions.last().copied() else {
            return Err(StoreError::UnknownImage(r.name.clone()));
        };
        match r.version {
            None => Ok(latest.clone()),
            Some(want) => versions
                .iter()
                .find(|v| v.version == want)
                .map(|v| (*v).clone())
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

    /// Reads and validates the manifest of a listed version (`NotFound` if it was removed since).
    pub fn load_manifest(&self, v: &VersionPath) -> Result<Manifest, StoreError> {
        let bytes = self.manifest_file(v)?;
        self.decode_manifest(&bytes)
            .map_err(|error| StoreError::Manifest {
                path: v.path.clone(),
                error,
            })
    }

    /// A listed version's manifest, and its bytes as agents are served them: the file itself in
    /// format 1, or a format 2 file expanded to format 1 (agents read no id tables). The
    /// expansion is deterministic (per build: appliances of one version serve the same bytes);
    /// their BLAKE3 is what an agent checks the manifest it fetches against.
    pub fn served_manifest(&self, v: &VersionPath) -> Result<ServedManifest, StoreError> {
        let bytes = self.manifest_file(v)?;
        let manifest = self.decode_to_serve(&bytes, &v.path)?;
        let expanded =
            Manifest::format_of(&bytes) != Some(fleetboot_image::manifest::FORMAT_VERSION);
        let bytes = if expanded { manifest.encode() } else { bytes };
        Ok(ServedManifest {
            manifest,
            bytes,
            expanded,
        })
    }

    /// The bytes agents are served for the manifest at `key` ([`Store::served_manifest`]);
    /// `None` if there is none. A format 1 file is not decoded here.
    pub fn served_manifest_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let at = self.backend.locate(key);
        let Some(bytes) = self.backend.get(key).at(&at)? else {
            return Ok(None);
        };
        if Manifest::format_of(&bytes) == Some(fleetboot_image::manifest::FORMAT_VERSION) {
            return Ok(Some(bytes));
        }
        Ok(Some(self.decode_to_serve(&bytes, &at)?.encode()))
    }

    /// Decodes manifest file bytes (of `path`) that will be served as format 1: either format,
    /// and within format 1's size limit.
    fn decode_to_serve(&self, bytes: &[u8], path: &Path) -> Result<Manifest, StoreError> {
        self.decode_manifest(bytes)
            .and_then(|m| m.check_encodable().map(|()| m))
            .map_err(|error| StoreError::Manifest {
                path: path.to_path_buf(),
                error,
            })
    }

    /// The file bytes of a listed version's manifest.
    fn manifest_file(&self, v: &VersionPath) -> Result<Vec<u8>, StoreError> {
        self.backend
            .get(&v.key)
            .at(&v.path)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
            .at(&v.path)
    }

    /// The manifest of the image `r` names.
    pub fn manifest(&self, r: &ImageRef) -> Result<(VersionPath, Manifest), StoreError> {
        let v = self.resolve(r)?;
        let m = self.load_manifest(&v)?;
        Ok((v, m))
    }

    /// Every image version with its manifest (fails on the first unreadable one).
    pub fn all_manifests(&self) -> Result<Vec<(VersionPath, Manifest)>, StoreError> {
        self.versions()?
            .into_iter()
            .map(|v| self.load_manifest(&v).map(|m| (v, m)))
            .collect()
    }

    /// Packs in `packs/`, with their sizes, sorted.
    pub fn packs(&self) -> Result<Vec<(PackId, u64)>, StoreError> {
        self.check_exists()?;
        Ok(self
            .pack_objects("packs/")?
            .into_iter()
            .map(|(id, o)| (id, o.size))
            .collect())
    }

    /// Packs gc retired, with their sizes and when they were retired.
    pub fn retired_packs(&self) -> Result<Vec<(PackId, u64, SystemTime)>, StoreError> {
        self.check_exists()?;
        Ok(self
            .pack_objects("retired/")?
            .into_iter()
            .map(|(id, o)| (id, o.size, o.modified))
            .collect())
    }

    /// `<id>.pack` objects directly under `prefix`, sorted by id.
    fn pack_objects(&self, prefix: &str) -> Result<Vec<(PackId, ObjectInfo)>, StoreError> {
        self.objects_by_pack(prefix, ".pack")
    }

    /// `<pack-id><suffix>` objects directly under `prefix` (packs, id tables), sorted by id.
    fn objects_by_pack(
        &self,
        prefix: &str,
        suffix: &str,
    ) -> Result<Vec<(PackId, ObjectInfo)>, StoreError> {
        let mut out: Vec<(PackId, ObjectInfo)> = self
            .backend
            .list(prefix)
            .at(&self.backend.locate(prefix))?
            .into_iter()
            .filter_map(|o| {
                let id = o.key[prefix.len()..]
                    .strip_suffix(suffix)?
                    .parse::<PackId>()
                    .ok()?;
                Some((id, o))
            })
            .collect();
        out.sort_by_key(|a| a.0);
        Ok(out)
    }

    /// Issues the next version number of `name`: one more than any version ever issued for it,
    /// so `rm x@3` followed by an import gives x@4, never a second, different x@3 that hosts
    /// which installed the first would be taken to have.
    ///
    /// The number is claimed by writing `claims/NAME/N.NONCE` and listing the claims of N: a
    /// claimant that sees only its own claim has N; one that sees another withdraws and tries
    /// again. On a store with read-after-write consistency (a folder, S3, Garage) two importers
    /// anywhere never both win N: of two claims, the one written second is listed after the
    /// other was written, so its writer sees the first. The claims stay as the record of issued
    /// numbers; a crash between claim and manifest only skips a number.
    pub(crate) fn issue_version(&self, name: &str) -> Result<u32, StoreError> {
        validate_name(name)?;
        let prefix = format!("claims/{name}/");
        let at = self.backend.locate(&prefix);
        // Stores made before claims: a counter file, and the manifests present.
        let legacy_key = format!("versions/{name}");
        let legacy = match self.backend.get(&legacy_key) {
            Ok(Some(text)) => {
                let text = String::from_utf8_lossy(&text);
                text.trim()
                    .parse::<u32>()
                    .map_err(|_| StoreError::BadInput {
                        path: self.backend.locate(&legacy_key),
                        what: format!("version counter holds {:?}, not a number", text.trim()),
                    })?
            }
            Ok(None) => 0,
            Err(e) => return Err(e).at(&self.backend.locate(&legacy_key)),
        };
        let claimed = |list: &[ObjectInfo]| -> Vec<(u32, String)> {
            list.iter()
                .filter_map(|o| {
                    let (n, nonce) = o.key[prefix.len()..].split_once('.')?;
                    Some((n.parse().ok()?, nonce.to_string()))
                })
                .collect()
        };
        for attempt in 0..CLAIM_TRIES {
            let claims = claimed(&self.backend.list(&prefix).at(&at)?);
            let present = self.versions_of(name)?.last().map_or(0, |v| v.version);
            let issued = claims.iter().map(|c| c.0).max().unwrap_or(0);
            let next = issued
                .max(legacy)
                .max(present)
                .checked_add(1)
                .ok_or_else(|| StoreError::BadInput {
                    path: at.clone(),
                    what: "no version numbers left".into(),
                })?;
            let nonce = blake3::hash(
                format!("{}{}", fsutil::unique_name(""), self.location().display()).as_bytes(),
            )
            .to_hex()[..16]
                .to_string();
            let key = format!("{prefix}{next}.{nonce}");
            self.backend.put(&key, b"").at(&self.backend.locate(&key))?;
            let rivals = claimed(&self.backend.list(&prefix).at(&at)?)
                .into_iter()
                .any(|(n, other)| n == next && other != nonce);
            if !rivals {
                return Ok(next);
            }
            self.backend.delete(&key).at(&self.backend.locate(&key))?;
            // Another importer wants the same number: back off a little, differently each time.
            let jitter = u64::from(blake3::hash(nonce.as_bytes()).as_bytes()[0]);
            std::thread::sleep(std::time::Duration::from_millis(
                (10 + jitter) * u64::from(attempt + 1),
            ));
        }
        Err(StoreError::BadInput {
            path: at,
            what: format!("could not claim a version number in {CLAIM_TRIES} tries"),
        })
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
            self.backend.delete(&v.key).at(&v.path)?;
            removed.push(ImageRef {
                name: v.name.clone(),
                version: Some(v.version),
            });
        }
        Ok(removed)
    }
}

/// Frames read through the backend, from `packs/` or else `retired/`.
struct BackendPacks<'a>(&'a Store);

impl FrameSource for BackendPacks<'_> {
    fn read(&self, pack: &PackId, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let b = self.0.backend();
        match b.read_at(&Store::pack_key(pack), offset, len as usize) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => b
                .read_at(&Store::retired_key(pack), offset, len as usize)
                .map_err(|_| e),
            other => other,
        }
    }
}

/// Whether `dir` holds nothing but what a store's creation makes before its marker (a store
/// being created by another process, or whose creation was interrupted).
fn is_empty_dir(dir: &Path) -> Result<bool, StoreError> {
    for entry in fs::read_dir(dir).at(dir)? {
        let name = entry.at(dir)?.file_name();
        if !matches!(
            name.to_str(),
            Some(
                "lock"
                    | "packs"
                    | "manifests"
                    | "versions"
                    | "claims"
                    | "tmp"
                    | "retired"
                    | compact::COMPACT_LOCK
            )
        ) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Importers on several machines share no lock: only the claims keep their version numbers
    /// apart. Eight writers at once, none holding the lock, five numbers each: all distinct.
    #[test]
    fn claims_keep_concurrent_writers_apart_without_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        drop(store.lock_for_write().unwrap());
        let mut issued: Vec<u32> = std::thread::scope(|s| {
            let writers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..5)
                            .map(|_| store.issue_version("os").unwrap())
                            .collect::<Vec<u32>>()
                    })
                })
                .collect();
            writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        issued.sort_unstable();
        let n = issued.len();
        issued.dedup();
        assert_eq!(issued.len(), n, "a version number was issued twice");
        // And a number once issued stays issued: the next is past all of them.
        assert!(store.issue_version("os").unwrap() > *issued.last().unwrap());
    }
}
