//! Id tables in the store: `packs/<id>.ids` beside the pack they describe, and what keeps them
//! in step with their packs.
//!
//! A table is written by `store compact` (and by gc for a pack it rewrites from one that had a
//! table) after its pack is visible and before any manifest names it; it then lives and dies with
//! its pack: retired to `retired/<id>.ids` with it, put back with it, deleted with it. Readers
//! look in `retired/` when `packs/` has it no more, as they do for packs. Manifests of format 2
//! keep each table's BLAKE3, so a missing or damaged table makes its manifests unreadable — loudly
//! (`verify`, gc's refusal) — never silently wrong.
//!
//! Agents never read tables: the appliance expands format 2 to format 1 ([`Store::served_manifest`]).

use super::{IoContext, Store, StoreError};
use fleetboot_image::id_table::{IdTable, TableIndex};
use fleetboot_image::{ChunkId, Manifest, PackId};
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Id tables indexed so far, by pack (`None`: the pack has no usable table).
pub(crate) type TableCache = HashMap<PackId, Option<TableIndex>>;

/// Id tables' file bytes kept by a store handle, so that serving a format 2 manifest to many
/// agents (from an object store: a GET per table) reads each table once. A table never changes
/// under its pack's id (pack ids are never reused), and every use checks its BLAKE3.
#[derive(Clone, Debug, Default)]
pub(crate) struct IdTableCache(Arc<Mutex<HashMap<PackId, Arc<Vec<u8>>>>>);

/// Bytes of tables a handle keeps at most; past it the cache starts over.
const CACHED_TABLE_BYTES_MAX: usize = 64 << 20;

impl IdTableCache {
    fn get(&self, id: &PackId) -> Option<Arc<Vec<u8>>> {
        let tables = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tables.get(id).cloned()
    }

    fn keep(&self, id: PackId, bytes: Arc<Vec<u8>>) {
        if bytes.len() > CACHED_TABLE_BYTES_MAX {
            return;
        }
        let mut tables = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = tables.values().map(|t| t.len()).sum();
        if held + bytes.len() > CACHED_TABLE_BYTES_MAX {
            tables.clear();
        }
        tables.insert(id, bytes);
    }
}

impl Store {
    /// The key of a pack's id table.
    pub fn id_table_key(id: &PackId) -> String {
        format!("packs/{id}.ids")
    }
    /// The key of the id table of a pack gc retired.
    pub fn retired_id_table_key(id: &PackId) -> String {
        format!("retired/{id}.ids")
    }

    /// The file bytes of pack `id`'s table, from `packs/` or (retired since) `retired/`.
    pub fn read_id_table(&self, id: &PackId) -> io::Result<Option<Arc<Vec<u8>>>> {
        if let Some(bytes) = self.id_tables.get(id) {
            return Ok(Some(bytes));
        }
        for key in [Self::id_table_key(id), Self::retired_id_table_key(id)] {
            if let Some(bytes) = self.backend.get(&key)? {
                return Ok(Some(Arc::new(bytes)));
            }
        }
        Ok(None)
    }

    /// Publishes the table of a pack that is already visible (one PUT: whole or absent).
    pub(crate) fn put_id_table(&self, pack: PackId, ids: Vec<ChunkId>) -> Result<(), StoreError> {
        let key = Self::id_table_key(&pack);
        let bytes = IdTable { pack, ids }.encode();
        self.backend
            .put(&key, &bytes)
            .at(&self.backend.locate(&key))
    }

    /// Decodes manifest file bytes of either format, reading the id tables format 2 names (kept
    /// for the next manifest only once this one's digests proved them right).
    pub(crate) fn decode_manifest(
        &self,
        bytes: &[u8],
    ) -> Result<Manifest, fleetboot_image::ManifestError> {
        let mut read = Vec::new();
        let decoded = Manifest::decode_with(bytes, &mut |pack| {
            let at = || self.backend.locate(&Self::id_table_key(pack));
            match self.read_id_table(pack) {
                Ok(Some(bytes)) => {
                    let copy = bytes.to_vec();
                    read.push((*pack, bytes));
                    Ok(copy)
                }
                Ok(None) => Err(format!(
                    "{} is missing (run `fleetboot store verify`)",
                    at().display()
                )),
                Err(e) => Err(format!("{}: {e}", at().display())),
            }
        });
        if decoded.is_ok() {
            for (pack, bytes) in read {
                self.id_tables.keep(pack, bytes);
            }
        }
        decoded
    }

    /// Encodes `m` naming its chunks by the id tables its packs have (format 2), or with its ids
    /// (format 1) where a pack has none. `cache` keeps tables read for the next manifest.
    pub(crate) fn encode_manifest(
        &self,
        m: &Manifest,
        cache: &mut TableCache,
    ) -> Result<Vec<u8>, StoreError> {
        for pack in &m.packs {
            if cache.contains_key(pack) {
                continue;
            }
            let index = match self.read_id_table(pack) {
                Ok(Some(bytes)) => TableIndex::of_bytes(&bytes, pack).ok(),
                Ok(None) => None,
                Err(e) => return Err(e).at(&self.backend.locate(&Self::id_table_key(pack))),
            };
            cache.insert(*pack, index);
        }
        let tables: HashMap<PackId, TableIndex> = m
            .packs
            .iter()
            .filter_map(|p| Some((*p, cache.get(p)?.clone()?)))
            .collect();
        Ok(m.encode_with_tables(&tables))
    }

    /// Moves a pack and its table (if it has one) from `packs/` to `retired/`.
    pub(crate) fn retire_pack(&self, id: &PackId) -> io::Result<()> {
        self.backend
            .rename(&Self::pack_key(id), &Self::retired_key(id))?;
        self.move_id_table(&Self::id_table_key(id), &Self::retired_id_table_key(id))
    }

    /// Moves a retired pack and its table back to `packs/`.
    pub(crate) fn restore_pack(&self, id: &PackId) -> io::Result<()> {
        self.backend
            .rename(&Self::retired_key(id), &Self::pack_key(id))?;
        self.move_id_table(&Self::retired_id_table_key(id), &Self::id_table_key(id))
    }

    /// Deletes a retired pack and its table.
    pub(crate) fn delete_retired_pack(&self, id: &PackId) -> io::Result<()> {
        self.backend.delete(&Self::retired_key(id))?;
        ignore_missing(self.backend.delete(&Self::retired_id_table_key(id)))
    }

    fn move_id_table(&self, from: &str, to: &str) -> io::Result<()> {
        ignore_missing(self.backend.rename(from, to))
    }

    /// Deletes id tables whose pack is in neither `packs/` nor `retired/` (left by a crash between
    /// a pack's deletion and its table's), once older than `grace`. Tables are listed before
    /// packs: a table is published after its pack, so any table listed has its pack listed too,
    /// unless the pack is really gone. Returns how many were deleted.
    pub(crate) fn delete_orphan_id_tables(&self, grace: Duration) -> Result<usize, StoreError> {
        let mut tables = self.objects_by_pack("packs/", ".ids")?;
        tables.extend(self.objects_by_pack("retired/", ".ids")?);
        let packs: HashSet<PackId> = self
            .packs()?
            .into_iter()
            .map(|p| p.0)
            .chain(self.retired_packs()?.into_iter().map(|p| p.0))
            .collect();
        let now = SystemTime::now();
        let mut deleted = 0;
        for (id, o) in tables {
            let age = now.duration_since(o.modified).unwrap_or_default();
            if packs.contains(&id) || age < grace {
                continue;
            }
            ignore_missing(self.backend.delete(&o.key)).at(&self.backend.locate(&o.key))?;
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Id tables in `packs/`, with their sizes.
    pub(crate) fn id_table_sizes(&self) -> Result<HashMap<PackId, u64>, StoreError> {
        Ok(self
            .objects_by_pack("packs/", ".ids")?
            .into_iter()
            .map(|(id, o)| (id, o.size))
            .collect())
    }
}

/// An object already gone is not an error here (a pack without a table, or removed elsewhere).
fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
