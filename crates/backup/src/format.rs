//! The repository's objects as bytes: pure encoding and decoding (docs/backup-format.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::{ChunkId, KdfParams};

/// The format version this code writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Disk bytes per chunk: the unit of change tracking, dedup and restore. Aligned to the disk,
/// so a changed 64 KiB region costs one chunk, not a content-defined chunk of a megabyte.
pub const CHUNK_SIZE: u64 = 64 << 10;
/// Chunk ids per manifest segment (256 MiB of disk): a backup rewrites only the segments in
/// which something changed.
pub const SEGMENT_CHUNKS: usize = 4096;
/// Packs are closed once they hold this much, so a backend sees few, large objects.
pub const PACK_TARGET: usize = 16 << 20;

const INDEX_MAGIC: &[u8; 8] = b"CAIRNIX1";
const PACK_MAGIC: &[u8; 8] = b"CAIRNPK1";
const ENTRY_LEN: usize = 32 + 1 + 32 + 4 + 4 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what} is malformed: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("repository format version {0} is newer than this cairn reads ({FORMAT_VERSION}); use a newer cairn")]
    NewerVersion(u32),
}

fn malformed(what: &'static str, why: impl Into<String>) -> FormatError {
    FormatError::Malformed { what, why: why.into() }
}

/// The `config` object: what every reader needs first. Never encrypted (it holds what
/// decryption needs); the master key in it is wrapped by the passphrase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub chunk_size: u64,
    pub segment_chunks: usize,
    pub encryption: Option<Encryption>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub algorithm: String,
    pub kdf: KdfParams,
    pub wrapped_key: String,
}

impl RepoConfig {
    pub fn decode(bytes: &[u8]) -> Result<RepoConfig, FormatError> {
        #[derive(Deserialize)]
        struct Probe {
            format: String,
            version: u32,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| malformed("config", e.to_string()))?;
        if probe.format != "cairn-backup" {
            return Err(malformed("config", format!("not a cairn repository (format {:?})", probe.format)));
        }
        if probe.version > FORMAT_VERSION {
            return Err(FormatError::NewerVersion(probe.version));
        }
        let config: RepoConfig = serde_json::from_slice(bytes).map_err(|e| malformed("config", e.to_string()))?;
        if config.chunk_size != CHUNK_SIZE || config.segment_chunks != SEGMENT_CHUNKS {
            return Err(malformed("config", "chunk or segment size this version does not use"));
        }
        Ok(config)
    }
}

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// A chunk of disk data.
    Data = 0,
    /// A manifest segment: chunk ids.
    Segment = 1,
}

impl BlobKind {
    fn from_byte(b: u8) -> Option<BlobKind> {
        match b {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Segment),
            _ => None,
        }
    }
}

/// Where a blob is: its pack and its bytes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub kind: BlobKind,
    pub pack: ChunkId,
    pub offset: u32,
    /// Bytes stored (compressed, sealed).
    pub length: u32,
    /// Bytes of the blob's content.
    pub raw_length: u32,
}

/// One index entry: a blob's id and location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: ChunkId,
    pub location: Location,
}

/// Encodes index entries (an index object's and a pack trailer's content before sealing).
pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.push(e.location.kind as u8);
        out.extend_from_slice(&e.location.pack.0);
        out.extend_from_slice(&e.location.offset.to_le_bytes());
        out.extend_from_slice(&e.location.length.to_le_bytes());
        out.extend_from_slice(&e.location.raw_length.to_le_bytes());
    }
    out
}

pub fn decode_index(bytes: &[u8]) -> Result<Vec<IndexEntry>, FormatError> {
    if bytes.len() < 12 || &bytes[..8] != INDEX_MAGIC {
        return Err(malformed("index", "bad magic"));
    }
    let count = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let body = &bytes[12..];
    if body.len() != count * ENTRY_LEN {
        return Err(malformed("index", format!("{} bytes for {count} entries", body.len())));
    }
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    body.chunks_exact(ENTRY_LEN)
        .map(|e| {
            Ok(IndexEntry {
                id: ChunkId(e[..32].try_into().expect("32 bytes")),
                location: Location {
                    kind: BlobKind::from_byte(e[32])
                        .ok_or_else(|| malformed("index", format!("blob kind {}", e[32])))?,
                    pack: ChunkId(e[33..65].try_into().expect("32 bytes")),
                    offset: u32_at(e, 65),
                    length: u32_at(e, 69),
                    raw_length: u32_at(e, 73),
                },
            })
        })
        .collect()
}

/// Closes a pack: its blobs, then its sealed trailer (the pack's own index, so a lost index
/// can be rebuilt from the packs), the trailer's length and the magic.
pub fn finish_pack(mut blobs: Vec<u8>, sealed_trailer: &[u8]) -> Vec<u8> {
    blobs.extend_from_slice(sealed_trailer);
    blobs.extend_from_slice(&(sealed_trailer.len() as u32).to_le_bytes());
    blobs.extend_from_slice(PACK_MAGIC);
    blobs
}

/// The sealed trailer of a pack.
pub fn pack_trailer(pack: &[u8]) -> Result<&[u8], FormatError> {
    let n = pack.len();
    if n < 12 || &pack[n - 8..] != PACK_MAGIC {
        return Err(malformed("pack", "bad magic"));
    }
    let len = u32::from_le_bytes(pack[n - 12..n - 8].try_into().expect("4 bytes")) as usize;
    if len > n - 12 {
        return Err(malformed("pack", "trailer longer than the pack"));
    }
    Ok(&pack[n - 12 - len..n - 12])
}

/// Blob content is a compression byte, then the payload.
const RAW: u8 = 0;
const ZSTD: u8 = 1;

thread_local! {
    /// One zstd context per thread and level: making one per chunk showed in profiles.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            *cell = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        cell.as_mut().expect("just set").1.compress(data)
    })
}

/// Compresses with zstd when that saves space; incompressible data is stored as it is.
pub fn pack_blob(data: &[u8], level: i32) -> Vec<u8> {
    if let Ok(compressed) = compress(data, level) {
        if compressed.len() + 64 < data.len() {
            let mut out = Vec::with_capacity(1 + compressed.len());
            out.push(ZSTD);
            out.extend_from_slice(&compressed);
            return out;
        }
    }
    let mut out = Vec::with_capacity(1 + data.len());
    out.push(RAW);
    out.extend_from_slice(data);
    out
}

pub fn unpack_blob(blob: &[u8], raw_length: usize) -> Result<Vec<u8>, FormatError> {
    match blob.split_first() {
        Some((&RAW, data)) => Ok(data.to_vec()),
        Some((&ZSTD, data)) => zstd::bulk::decompress(data, raw_length).map_err(|e| malformed("blob", e.to_string())),
        _ => Err(malformed("blob", "unknown compression")),
    }
}

pub fn encode_segment(ids: &[ChunkId]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.0).collect()
}

pub fn decode_segment(bytes: &[u8]) -> Result<Vec<ChunkId>, FormatError> {
    if !bytes.len().is_multiple_of(32) || bytes.len() > SEGMENT_CHUNKS * 32 {
        return Err(malformed("segment", format!("{} bytes", bytes.len())));
    }
    Ok(bytes.chunks_exact(32).map(|c| ChunkId(c.try_into().expect("32 bytes"))).collect())
}

/// A backup: a dated, labelled point-in-time copy of one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub version: u32,
    pub id: String,
    /// Seconds since the Unix epoch, UTC.
    pub time: u64,
    /// Who and what: volume id and name, VM, tenant, snapshot; free-form.
    pub labels: BTreeMap<String, String>,
    pub size: u64,
    pub chunk_size: u64,
    /// Manifest segment ids, in disk order.
    pub segments: Vec<String>,
    pub parent: Option<String>,
    /// How many incremental steps it is from a full backup: its parent's plus one, 0 for a
    /// full backup. `time` is in whole seconds, so this orders a backup after its parent taken
    /// in the same second, for good (it does not change when other backups go). Records
    /// written before it existed read as 0.
    #[serde(default)]
    pub generation: u64,
    pub stats: BackupStats,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Chunks read from the disk (the rest came from the parent or were known zero).
    pub chunks_read: u64,
    /// Chunks new to the repository.
    pub chunks_new: u64,
    /// Bytes added to the repository (packs, before their trailers).
    pub bytes_added: u64,
    pub seconds: f64,
}

impl BackupRecord {
    pub fn decode(bytes: &[u8]) -> Result<BackupRecord, FormatError> {
        let record: BackupRecord = serde_json::from_slice(bytes).map_err(|e| malformed("backup", e.to_string()))?;
        if record.version > FORMAT_VERSION {
            return Err(FormatError::NewerVersion(record.version));
        }
        Ok(record)
    }
}

/// A condemned list (`gc/ID`): packs GC found unreferenced and will delete once every live
/// session has seen this list. Sessions that have seen it neither dedup against nor read from
/// these packs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CondemnedList {
    pub version: u32,
    /// Seconds since the Unix epoch, UTC.
    pub time: u64,
    /// Pack ids, hex.
    pub packs: Vec<String>,
}

impl CondemnedList {
    pub fn decode(bytes: &[u8]) -> Result<CondemnedList, FormatError> {
        let list: CondemnedList = serde_json::from_slice(bytes).map_err(|e| malformed("gc list", e.to_string()))?;
        if list.version > FORMAT_VERSION {
            return Err(FormatError::NewerVersion(list.version));
        }
        Ok(list)
    }

    pub fn pack_ids(&self) -> Result<Vec<ChunkId>, FormatError> {
        self.packs
            .iter()
            .map(|p| ChunkId::from_hex(p).ok_or_else(|| malformed("gc list", format!("pack id {p:?}"))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seed: u8) -> IndexEntry {
        IndexEntry {
            id: ChunkId([seed; 32]),
            location: Location {
                kind: if seed.is_multiple_of(2) { BlobKind::Data } else { BlobKind::Segment },
                pack: ChunkId([seed.wrapping_add(1); 32]),
                offset: seed as u32 * 1000,
                length: 77,
                raw_length: 65536,
            },
        }
    }

    proptest! {
        #[test]
        fn indexes_round_trip(seeds in proptest::collection::vec(any::<u8>(), 0..50)) {
            let entries: Vec<_> = seeds.into_iter().map(entry).collect();
            prop_assert_eq!(decode_index(&encode_index(&entries)).unwrap(), entries);
        }

        #[test]
        fn blobs_round_trip(data in proptest::collection::vec(any::<u8>(), 0..3000), zeros in 0usize..5000) {
            let mut data = data;
            data.extend(std::iter::repeat_n(0, zeros));
            prop_assert_eq!(unpack_blob(&pack_blob(&data, 1), data.len()).unwrap(), data);
        }
    }

    #[test]
    fn damaged_objects_are_refused_not_misread() {
        let encoded = encode_index(&[entry(1), entry(2)]);
        assert!(decode_index(&encoded[..encoded.len() - 1]).is_err());
        assert!(decode_index(b"CAIRNIX2\0\0\0\0").is_err());
        let pack = finish_pack(vec![1, 2, 3], b"trailer");
        assert_eq!(pack_trailer(&pack).unwrap(), b"trailer");
        assert!(pack_trailer(&pack[..pack.len() - 1]).is_err());
        assert!(unpack_blob(&[9, 1, 2], 2).is_err());
        assert!(decode_segment(&[0; 33]).is_err());
    }

    #[test]
    fn a_newer_version_is_refused_by_name() {
        let config = br#"{"format":"cairn-backup","version":2,"id":"x","chunk_size":65536,"segment_chunks":4096,"encryption":null}"#;
        assert_eq!(RepoConfig::decode(config), Err(FormatError::NewerVersion(2)));
        assert!(RepoConfig::decode(br#"{"format":"restic","version":1}"#).is_err());
    }
}
