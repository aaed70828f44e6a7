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

impl FrameSource for HttpPacks {
    fn read(&self, pack: &PackId, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let (url, with_token) = match self.presigned.get(&pack.to_string()) {
            Some(url) => (url.clone(), false),
            None => (format!("{}/{}", self.base, pack.file_name()), true),
        };
        let range = format!("bytes={}-{}", offset, offset + u64::from(len) - 1);
        let data = retry(&url, || {
            let mut req = self.http.get(&url).header("range", &range);
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
        .map_err(|e| io::Error::other(format!("{e:#}")))?;
        self.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }
}
