//! fleetboot-image: what the appliance and the agent share about an image.
//!
//! - [`manifest`]: an image's descriptive data — metadata, the offset table and the map from image
//!   offsets to table entries — and its versioned binary encoding (docs/store-format.md).
//! - [`restore`]: creating an image on a destination from its manifest: fetch each frame the
//!   manifest names, verify every chunk against its id, then write it. `fleetboot image export`
//!   and the agent both run this one code path, with different frame sources and targets.
//!
//! - [`id_table`]: a pack's id table, which manifests of format 2 name chunks by.
//! - [`api`]: the agent API's JSON types.
//! - [`hints`]: choosing a disk by what it is (root device hints) and the comparisons they use.
//!
//! Architecture invariant: this crate knows nothing of the store's directory layout, networks or
//! the appliance; it only depends on hashing, compression and serde, so the agent stays small.

pub mod api;
pub mod hints;
pub mod id;
pub mod id_table;
pub mod manifest;
pub mod restore;

pub use id::{ChunkId, PackId};
pub use manifest::{Entry, Extent, Manifest, ManifestError, Metadata};
pub use restore::{
    restore, restore_with, FrameSource, LocalChunks, NoLocalChunks, RestoreError, RestoreOptions,
    RestoreReport, Target,
};

/// The store's block size: zero detection and the default chunker work on these boundaries.
pub const BLOCK_BYTES: usize = 4096;
