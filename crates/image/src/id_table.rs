//! A pack's id table: the ids of the chunks a pack holds, stored once per store beside the pack
//! (`packs/<id>.ids`) so that manifests of format 2 name a chunk by its row in the table (a small,
//! delta-coded number) instead of repeating its 32-byte id in every image that uses it.
//!
//! The table is plain data: a manifest that uses it keeps the table's BLAKE3, and checks it before
//! trusting a row. The exact layout is in docs/store-format.md.

use crate::id::{ChunkId, PackId};
use crate::manifest::ManifestError;
use std::collections::HashMap;

/// First bytes of every id table.
pub const MAGIC: [u8; 8] = *b"FBIDTAB1";
const HEADER_BYTES: usize = 8 + 16 + 4;

/// The ids of a pack's chunks, in the order the pack holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdTable {
    pub pack: PackId,
    pub ids: Vec<ChunkId>,
}

impl IdTable {
    /// The table's file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.ids.len() * 32);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.pack.0);
        let rows = u32::try_from(self.ids.len()).expect("a pack holds fewer than 2^32 chunks");
        out.extend_from_slice(&rows.to_le_bytes());
        for id in &self.ids {
            out.extend_from_slice(&id.0);
        }
        out
    }

    /// Reads the table of `pack` from its file bytes, checking that it is one and is that pack's.
    pub fn decode(bytes: &[u8], pack: &PackId) -> Result<IdTable, ManifestError> {
        let bad = |what: &str| ManifestError::IdTable {
            pack: *pack,
            why: what.into(),
        };
        if bytes.len() < HEADER_BYTES || bytes[..8] != MAGIC {
            return Err(bad("not an id table"));
        }
        if bytes[8..24] != pack.0 {
            return Err(bad("it belongs to another pack"));
        }
        let rows = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]) as usize;
        let body = &bytes[HEADER_BYTES..];
        if body.len() != rows * 32 {
            return Err(bad("its length does not match its row count"));
        }
        let ids = body
            .chunks_exact(32)
            .map(|c| {
                let mut id = [0u8; 32];
                id.copy_from_slice(c);
                ChunkId(id)
            })
            .collect();
        Ok(IdTable { pack: *pack, ids })
    }
}

/// What a manifest encoder needs of a published id table: its file's BLAKE3 (kept in the
/// manifest) and each id's row.
#[derive(Clone, Debug)]
pub struct TableIndex {
    pub digest: [u8; 32],
    pub rows: HashMap<ChunkId, u32>,
}

impl TableIndex {
    /// Indexes a table from its file bytes (as [`IdTable::decode`] reads them).
    pub fn of_bytes(bytes: &[u8], pack: &PackId) -> Result<TableIndex, ManifestError> {
        let table = IdTable::decode(bytes, pack)?;
        let mut rows = HashMap::with_capacity(table.ids.len());
        for (row, id) in table.ids.iter().enumerate() {
            // The first row of an id wins (a table lists each id once; this keeps it stable).
            rows.entry(*id).or_insert(row as u32);
        }
        Ok(TableIndex {
            digest: *blake3::hash(bytes).as_bytes(),
            rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let pack = PackId([3; 16]);
        let t = IdTable {
            pack,
            ids: vec![ChunkId::of(b"a"), ChunkId::of(b"b")],
        };
        let bytes = t.encode();
        assert_eq!(IdTable::decode(&bytes, &pack).unwrap(), t);
        let index = TableIndex::of_bytes(&bytes, &pack).unwrap();
        assert_eq!(index.rows[&ChunkId::of(b"b")], 1);
        assert_eq!(&index.digest, blake3::hash(&bytes).as_bytes());
        // Another pack's table, a cut one, one with a byte too many, not a table at all.
        assert!(IdTable::decode(&bytes, &PackId([4; 16])).is_err());
        assert!(IdTable::decode(&bytes[..bytes.len() - 1], &pack).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(IdTable::decode(&long, &pack).is_err());
        assert!(IdTable::decode(b"FBPACK01", &pack).is_err());
    }
}
