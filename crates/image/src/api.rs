//! The agent API's wire types (JSON), shared by the appliance and the agent so the two cannot
//! drift apart.
//!
//! ```text
//! GET  /api/agent/{mac}/assignment   -> Assignment     (Authorization: Bearer <per-boot token>)
//! POST /api/agent/{mac}/progress     <- Progress
//! POST /api/agent/{mac}/done         <- Done
//! POST /api/agent/{mac}/failed       <- Failed
//! ```

use serde::{Deserialize, Serialize};

/// What the agent is to install, and where to find it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub mac: String,
    /// `NAME@N`.
    pub image: String,
    pub size: u64,
    /// BLAKE3 of the whole image.
    pub digest: String,
    /// The manifest (descriptive data); then the packs by range: `{packs_url}/{id}.pack`.
    pub manifest_url: String,
    pub packs_url: String,
    /// `auto`, a path, `/dev/disk/by-id/…`, a serial or a WWN.
    pub disk: String,
    pub hostname: Option<String>,
    /// The image the appliance recorded as installed on this disk, if it is still in the store:
    /// the agent reuses its chunks from the disk instead of fetching them.
    #[serde(default)]
    pub installed_manifest_url: Option<String>,
}

/// Bytes written so far, of the image's size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// The image is on the disk and reads back with this digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub image: String,
    /// BLAKE3 of what the agent read back from the disk.
    pub digest: String,
    pub bytes_fetched: u64,
    pub bytes_reused: u64,
}

/// The install failed; nothing was reported done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub reason: String,
}
