//! Identifiers: [`ChunkId`] (BLAKE3 of a chunk's raw bytes) and [`PackId`] (a pack file's name).

use std::fmt;
use std::str::FromStr;

/// The unique id of a chunk: the BLAKE3 hash of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

/// The id of a pack file: 16 random-looking bytes, named in hex as `packs/<id>.pack`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// The pack's file name inside the store's `packs/` folder.
    pub fn file_name(&self) -> String {
        format!("{self}.pack")
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

/// Error for a string that is not a hex id of the right length.
#[derive(Debug, thiserror::Error)]
#[error("not a {expected_len}-digit hex id: {input:?}")]
pub struct ParseIdError {
    input: String,
    expected_len: usize,
}

impl FromStr for PackId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex(s).map(PackId)
    }
}

impl FromStr for ChunkId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex(s).map(ChunkId)
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], ParseIdError> {
    let err = || ParseIdError {
        input: s.to_string(),
        expected_len: N * 2,
    };
    if s.len() != N * 2 || !s.is_ascii() {
        return Err(err());
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).map_err(|_| err())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex() {
        let id = ChunkId::of(b"hello");
        assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
        let pack = PackId([0xab; 16]);
        assert_eq!(pack.file_name(), format!("{}.pack", "ab".repeat(16)));
        assert_eq!(pack.to_string().parse::<PackId>().unwrap(), pack);
        assert!("zz".repeat(16).parse::<PackId>().is_err());
        assert!("ab".parse::<PackId>().is_err());
    }
}
