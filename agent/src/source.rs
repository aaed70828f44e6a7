//! Frames over HTTP: a Range request per frame on the pack file, retried with backoff.

use crate::client::retry;
use fleetboot_image::{FrameSource, PackId};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};

/// The packs of a store served by the appliance (`{base}/{id}.pack`).
pub struct HttpPacks {
    base: String,
    /// `Bearer <install token>`: the appliance serves its store to live installs only.
    authorization: String,
    http: ureq::Agent,
    /// Presigned URLs of packs in object storage, by pack id (`store_access: direct`):
    /// fetched without the token.
    presigned: std::collections::BTreeMap<String, String>,
    /// Bytes received, for the report.
    pub fetched: AtomicU64,
}

impl HttpPacks {
    pub fn new(base: &str, token: &str) -> HttpPacks {
        HttpPacks {
            base: base.trim_end_matches('/').to_string(),
            authorization: format!("Bearer {token}"),
            http: crate::client::http(),
            presigned: Default::default(),
            fetched: AtomicU64::new(0),
        }
    }

    /// Packs to fetch from these presigned URLs instead (by pack id).
    pub fn with_presigned(mut self, urls: std::collections::BTreeMap<String, String>) -> Self {
        self.presigned = urls;
        self
    }
}

impl HttpPacks {
    /// `len` bytes at `offset` from `url`, with the install token or (a presigned URL) without.
    fn fetch(&self, url: &str, with_token: bool, offset: u64, len: u32) -> anyhow::Result<Vec<u8>> {
        let range = format!("bytes={}-{}", offset, offset + u64::from(len) - 1);
        retry(url, || {
            let mut req = self.http.get(url).header("range", &range);
            if with_token {
                req = req.header("authorization", &self.authorization);
            }
            let mut resp = req.call()?;
            if resp.status().as_u16() != 206 {
                anyhow::bail!("expected 206 Partial Content, got {}", resp.status());
            }
            let mut buf = Vec::with_capacity(len as usize);
            resp.body_mut()
                .with_config()
                .limit(u64::from(len) + 1)
                .reader()
                .take(u64::from(len) + 1)
                .read_to_end(&mut buf)?;
            if buf.len() != len as usize {
                anyhow::bail!("got {} bytes of a {len}-byte frame", buf.len());
            }
            Ok(buf)
        })
    }
}

impl FrameSource for HttpPacks {
    fn read(&self, pack: &PackId, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let appliance = format!("{}/{}", self.base, pack.file_name());
        let data = match self.presigned.get(&pack.to_string()) {
            // Straight from the object store; if that fails (gc retired the pack since the
            // URL was signed, or the URL expired), through the appliance, which reads retired
            // packs too.
            Some(url) => self.fetch(url, false, offset, len).or_else(|e| {
                eprintln!("fleetboot-agent: pack {pack} from the object store: {e:#}; asking the appliance");
                self.fetch(&appliance, true, offset, len)
            }),
            None => self.fetch(&appliance, true, offset, len),
        }
        .map_err(|e| io::Error::other(format!("{e:#}")))?;
        self.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }
}
