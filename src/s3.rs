//! The store in an S3-compatible object store (`store: s3://bucket/prefix`): the store crate's
//! [`Backend`] over the `object_store` crate, kept out of the store crate so that it stays free of
//! network code; and [`open_store`], which picks the backend a store location names.
//!
//! Endpoint, region and credentials come from the environment, as every S3 tool reads them:
//! `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, and
//! `AWS_ALLOW_HTTP=true` for an endpoint without TLS. Objects are written whole by one PUT (or a
//! multipart upload, completed only when every part is in), so a reader never sees a part of one.
//! Writers stage packs in a local folder (`FLEETBOOT_S3_STAGING`, else the user's cache folder)
//! that also holds their local lock.

use crate::store::{Backend, ObjectInfo, Store};
use anyhow::{bail, Context, Result};
use futures_lite::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, ObjectStoreExt};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;

/// Parts of a multipart upload (packs are written in parts of this size).
const PART_BYTES: usize = 16 << 20;

/// Opens the store at `location`: an `s3://bucket/prefix` address, or a local folder.
pub fn open_store(location: &Path) -> Result<Store> {
    let text = location.to_string_lossy();
    if !text.starts_with("s3://") {
        return Ok(Store::new(location));
    }
    let backend = S3Backend::from_url(&text)?;
    let staging = match std::env::var_os("FLEETBOOT_S3_STAGING") {
        Some(dir) => PathBuf::from(dir),
        None => cache_dir()
            .join("fleetboot/s3")
            .join(backend.staging_name()),
    };
    Ok(Store::with_backend(staging, Arc::new(backend)))
}

/// `$XDG_CACHE_HOME`, else `~/.cache`, else `/var/cache`.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache"),
        None => PathBuf::from("/var/cache"),
    }
}

/// A store's objects under `prefix` in one bucket.
#[derive(Debug)]
pub struct S3Backend {
    bucket: String,
    prefix: String,
    client: Arc<AmazonS3>,
}

/// The runtime the S3 client's requests run on, shared by every backend and never dropped:
/// store calls come from plain threads and from the appliance's runtime alike, and block on it.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .expect("the S3 client's runtime starts")
    })
}

/// Runs `f` on the S3 runtime and waits for it (safe from inside another runtime too).
fn block<T: Send + 'static>(
    f: impl Future<Output = io::Result<T>> + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    runtime().spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .map_err(|_| io::Error::other("the S3 request was dropped"))?
}

/// An object store error as an I/O error; a missing object is `NotFound`.
fn io_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e => io::Error::other(e),
    }
}

impl S3Backend {
    /// The backend for `s3://bucket/prefix`, configured from the environment.
    pub fn from_url(url: &str) -> Result<S3Backend> {
        let rest = url.strip_prefix("s3://").context("not an s3:// address")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            bail!("{url}: no bucket named (s3://BUCKET/PREFIX)");
        }
        if prefix.split('/').any(|p| p == "." || p == "..") {
            bail!("{url}: the prefix may not hold . or .. parts");
        }
        let client = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .with_context(|| {
                format!(
                    "{url}: the S3 client could not be set up (AWS_ENDPOINT_URL, AWS_REGION, \
                     AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are read from the environment)"
                )
            })?;
        Ok(S3Backend {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            client: Arc::new(client),
        })
    }

    /// A folder name for this store's local staging folder.
    fn staging_name(&self) -> String {
        let prefix = self.prefix.replace('/', "_");
        if prefix.is_empty() {
            self.bucket.clone()
        } else {
            format!("{}_{prefix}", self.bucket)
        }
    }

    fn object(&self, key: &str) -> ObjectPath {
        let key = key.trim_end_matches('/');
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else if key.is_empty() {
            ObjectPath::from(self.prefix.as_str())
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// The store key of an object listed under the prefix.
    fn key_of(&self, object: &ObjectPath) -> Option<String> {
        let full = object.as_ref();
        if self.prefix.is_empty() {
            return Some(full.to_string());
        }
        // Compared as object_store encodes it (a prefix may hold characters it escapes).
        let prefix = ObjectPath::from(self.prefix.as_str());
        full.strip_prefix(prefix.as_ref())?
            .strip_prefix('/')
            .map(str::to_string)
    }
}

impl Backend for S3Backend {
    fn locate(&self, key: &str) -> PathBuf {
        let mut at = format!("s3://{}", self.bucket);
        for part in [self.prefix.as_str(), key] {
            if !part.is_empty() {
                at.push('/');
                at.push_str(part);
            }
        }
        PathBuf::from(at)
    }

    fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        let (client, path) = (self.client.clone(), self.object(key));
        block(async move {
            match client.get(&path).await {
                Ok(r) => Ok(Some(r.bytes().await.map_err(io_error)?.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(io_error(e)),
            }
        })
    }

    fn read_at(&self, key: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let (client, path) = (self.client.clone(), self.object(key));
        let range = offset..offset + len as u64;
        let bytes = block(async move { client.get_range(&path, range).await.map_err(io_error) })?;
        if bytes.len() < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the object ends before the range",
            ));
        }
        Ok(bytes.to_vec())
    }

    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let (client, path) = (self.client.clone(), self.object(key));
        let payload = object_store::PutPayload::from(bytes.to_vec());
        block(async move {
            client.put(&path, payload).await.map_err(io_error)?;
            Ok(())
        })
    }

    fn put_file(&self, key: &str, file: &Path) -> io::Result<()> {
        let (client, path, src) = (self.client.clone(), self.object(key), file.to_path_buf());
        block(async move {
            let mut from = tokio::fs::File::open(&src).await?;
            // One PUT when small, else a multipart upload completed only once every part is in.
            let mut to = BufWriter::with_capacity(client, path, PART_BYTES);
            if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
                let _ = to.abort().await;
                return Err(e);
            }
            to.shutdown().await
        })?;
        std::fs::remove_file(file)
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        let client = self.client.clone();
        let path = self.object(prefix);
        let listed: Vec<object_store::ObjectMeta> = block(async move {
            let mut out = Vec::new();
            let mut stream = client.list(Some(&path));
            while let Some(meta) = stream.next().await {
                out.push(meta.map_err(io_error)?);
            }
            Ok(out)
        })?;
        let mut out: Vec<ObjectInfo> = listed
            .into_iter()
            .filter_map(|m| {
                Some(ObjectInfo {
                    key: self.key_of(&m.location)?,
                    size: m.size,
                    modified: SystemTime::from(m.last_modified),
                })
            })
            .filter(|o| o.key.starts_with(prefix))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let (client, path) = (self.client.clone(), self.object(key));
        block(async move {
            match client.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(io_error(e)),
            }
        })
    }

    fn presign(&self, key: &str, ttl: std::time::Duration) -> Option<io::Result<String>> {
        let (client, path) = (self.client.clone(), self.object(key));
        Some(block(async move {
            let url = client
                .signed_url(axum::http::Method::GET, &path, ttl)
                .await
                .map_err(io_error)?;
            Ok(url.to_string())
        }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        // A server-side copy (a new object, stamped now) and the delete of the old one.
        let (client, from, to) = (self.client.clone(), self.object(from), self.object(to));
        block(async move { client.rename(&from, &to).await.map_err(io_error) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_map_to_keys_and_back() {
        let b = S3Backend::from_url("s3://images/site-a/store/").unwrap();
        assert_eq!(
            b.object("packs/x.pack").as_ref(),
            "site-a/store/packs/x.pack"
        );
        assert_eq!(b.object("manifests/").as_ref(), "site-a/store/manifests");
        assert_eq!(
            b.key_of(&ObjectPath::from("site-a/store/packs/x.pack")),
            Some("packs/x.pack".into())
        );
        assert_eq!(b.key_of(&ObjectPath::from("site-b/packs/x.pack")), None);
        assert_eq!(
            b.locate("packs/x.pack"),
            PathBuf::from("s3://images/site-a/store/packs/x.pack")
        );
        assert_eq!(b.staging_name(), "images_site-a_store");
        let whole = S3Backend::from_url("s3://images").unwrap();
        assert_eq!(whole.object("fleetboot-store").as_ref(), "fleetboot-store");
        assert!(S3Backend::from_url("s3:///x").is_err());
        assert!(S3Backend::from_url("s3://b/a/../c").is_err());
    }
}
