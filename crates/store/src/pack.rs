//! Pack files: immutable files of frames, written once and read by range.
//!
//! A pack is a 16-byte header (`FBPACK01` + 8 reserved zero bytes) followed by frames back to back;
//! it has no index of its own — the manifests are the index. [`PackWriter`] builds one in the
//! store's `tmp/` and publishes it in `packs/` only when complete; [`LocalPacks`] reads frames from
//! the packs of a local store.

use super::fsutil::{unique_name, TempFile};
use super::{IoContext, Store, StoreError};
use fleetboot_image::{FrameSource, PackId};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// First bytes of every pack file.
pub const PACK_MAGIC: [u8; 8] = *b"FBPACK01";
/// Header length; the first frame starts here.
pub const PACK_HEADER_BYTES: u64 = 16;

/// A pack being written.
pub struct PackWriter {
    id: PackId,
    tmp: TempFile,
    len: u64,
}

impl PackWriter {
    /// Starts a new pack with a fresh id in the store's temp folder.
    pub fn create(store: &Store) -> Result<PackWriter, StoreError> {
        PackWriter::create_in(store, &store.tmp_dir())
    }

    /// Starts a new pack with a fresh id in `dir` (a staging folder of the store's own).
    pub fn create_in(store: &Store, dir: &Path) -> Result<PackWriter, StoreError> {
        let seed = unique_name(&store.root().to_string_lossy());
        let mut id = [0u8; 16];
        id.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..16]);
        let mut tmp = TempFile::create_in(dir, ".pack").at(dir)?;
        let mut header = [0u8; PACK_HEADER_BYTES as usize];
        header[..8].copy_from_slice(&PACK_MAGIC);
        tmp.file().write_all(&header).at(dir)?;
        Ok(PackWriter {
            id: PackId(id),
            tmp,
            len: PACK_HEADER_BYTES,
        })
    }

    pub fn id(&self) -> PackId {
        self.id
    }

    /// Bytes written so far, header included.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends a frame; returns its offset in the pack.
    pub fn append(&mut self, frame: &[u8]) -> io::Result<u64> {
        let offset = self.len;
        self.tmp.file().write_all(frame)?;
        self.len += frame.len() as u64;
        Ok(offset)
    }

    /// Syncs the pack and publishes it as `packs/<id>.pack`.
    pub fn finish(mut self, store: &Store) -> Result<PackId, StoreError> {
        let key = Store::pack_key(&self.id);
        let dest = store.backend().locate(&key);
        self.tmp.file().sync_all().at(&dest)?;
        store.backend().put_file(&key, self.tmp.path()).at(&dest)?;
        Ok(self.id)
    }
}

/// Reads frames from the pack files of a local store, keeping each opened pack open.
pub struct LocalPacks {
    store: Store,
    open: Mutex<HashMap<PackId, Arc<File>>>,
}

impl LocalPacks {
    pub fn new(store: &Store) -> LocalPacks {
        LocalPacks {
            store: store.clone(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, pack: &PackId) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(pack) {
            return Ok(f.clone());
        }
        let f = Arc::new(self.store.open_pack(pack)?);
        open.insert(*pack, f.clone());
        Ok(f)
    }
}

impl FrameSource for LocalPacks {
    fn read(&self, pack: &PackId, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let file = self.file(pack)?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(e.kind(), "the pack file ends before the frame (truncated?)")
            } else {
                e
            }
        })?;
        Ok(buf)
    }
}
