//! The layer map journal (`layer-<id>.map`): encoding and decoding, no I/O.
//!
//! A header, then batches of 16-byte records, each batch sealed by a CRC-32C. A flush appends
//! one batch; a torn or corrupt batch at the tail is where replay stops (its writes were never
//! acknowledged as flushed). docs/format.md describes the bytes.

use crate::blockmap::{BlockRun, BlockState, LayerMap, MapOp};

/// Magic at the start of a map journal.
pub const MAGIC: [u8; 8] = *b"CAIRNMAP";
/// The journal format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Size of the file header.
pub const HEADER_LEN: usize = 32;
const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"BTCH");
const BATCH_HEADER_LEN: usize = 16;
const RECORD_LEN: usize = 16;
const OP_DATA: u8 = 1;
const OP_ZERO: u8 = 2;
const OP_MARK_WRITTEN: u8 = 3;
const FLAG_WRITTEN: u8 = 1;

/// Why a journal cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    /// The file does not start with the journal magic.
    #[error("not a cairn layer map (bad magic)")]
    BadMagic,
    /// Written by a newer cairn.
    #[error("layer map format version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    /// The header names another layer.
    #[error("layer map belongs to layer {found}, expected {expected}")]
    WrongLayer { expected: u64, found: u64 },
    /// A batch before the end of the file fails its checksum.
    #[error("batch at byte {offset} fails its checksum and is not the last one")]
    Damaged { offset: u64 },
    /// A batch passed its checksum but holds an impossible record.
    #[error("invalid record at byte {offset}")]
    BadRecord { offset: u64 },
}

/// One map change: `op` applied to `run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The blocks.
    pub run: BlockRun,
    /// What happens to them.
    pub op: MapOp,
}

/// Encodes the file header for layer `layer_id`.
pub fn encode_header(layer_id: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&crate::blockmap::BLOCK_SHIFT.to_le_bytes());
    h[16..24].copy_from_slice(&layer_id.to_le_bytes());
    h
}

/// Appends `records` to `out` as one sealed batch.
pub fn encode_batch(records: &[Record], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&BATCH_MAGIC.to_le_bytes());
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    for r in records {
        let (op, flags) = match r.op {
            MapOp::Set { state: BlockState::Data, written } => (OP_DATA, written),
            MapOp::Set { state: BlockState::Zero, written } => (OP_ZERO, written),
            MapOp::MarkWritten => (OP_MARK_WRITTEN, false),
        };
        out.extend_from_slice(&r.run.start.to_le_bytes());
        out.extend_from_slice(&(r.run.count as u32).to_le_bytes());
        out.push(op);
        out.push(if flags { FLAG_WRITTEN } else { 0 });
        out.extend_from_slice(&[0u8; 2]);
    }
    let crc = crc32c::crc32c(&out[start + 4..start + 8]);
    let crc = crc32c::crc32c_append(crc, &out[start + BATCH_HEADER_LEN..]);
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// Splits runs longer than a record can hold (2^32 - 1 blocks).
pub fn push_record(records: &mut Vec<Record>, run: BlockRun, op: MapOp) {
    const MAX: u64 = u32::MAX as u64;
    let mut start = run.start;
    let end = run.end();
    while start < end {
        let count = (end - start).min(MAX);
        // Sequential writes arrive as adjacent runs; one record covers them all.
        if let Some(last) = records.last_mut() {
            if last.op == op && last.run.end() == start && last.run.count + count <= MAX {
                last.run.count += count;
                start += count;
                continue;
            }
        }
        records.push(Record { run: BlockRun { start, count }, op });
        start += count;
    }
}

/// The result of replaying a journal.
#[derive(Debug)]
pub struct Replayed {
    /// The map as of the last intact batch.
    pub map: LayerMap,
    /// Bytes of the file that are valid; anything after is a torn tail to cut off.
    pub valid_len: u64,
}

/// Replays a whole journal file. An empty or short file (its header never reached the disk)
/// is an empty layer.
pub fn replay(bytes: &[u8], layer_id: u64) -> Result<Replayed, JournalError> {
    if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN].iter().all(|b| *b == 0) {
        return Ok(Replayed { map: LayerMap::new(), valid_len: 0 });
    }
    if bytes[0..8] != MAGIC {
        return Err(JournalError::BadMagic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(JournalError::UnsupportedVersion(version));
    }
    let shift = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if shift != crate::blockmap::BLOCK_SHIFT {
        return Err(JournalError::BadRecord { offset: 12 });
    }
    let found = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if found != layer_id {
        return Err(JournalError::WrongLayer { expected: layer_id, found });
    }
    let mut map = LayerMap::new();
    let mut pos = HEADER_LEN;
    while let Some(records) = intact_batch(&bytes[pos..]) {
        for i in 0..records {
            let at = pos + BATCH_HEADER_LEN + i * RECORD_LEN;
            let r = &bytes[at..at + RECORD_LEN];
            let start = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
            let count = u64::from(u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")));
            let written = r[13] & FLAG_WRITTEN != 0;
            let op = match r[12] {
                OP_DATA => MapOp::Set { state: BlockState::Data, written },
                OP_ZERO => MapOp::Set { state: BlockState::Zero, written },
                OP_MARK_WRITTEN => MapOp::MarkWritten,
                _ => return Err(JournalError::BadRecord { offset: at as u64 }),
            };
            if start.checked_add(count).is_none() {
                return Err(JournalError::BadRecord { offset: at as u64 });
            }
            map.set(BlockRun { start, count }, op);
        }
        pos += BATCH_HEADER_LEN + records * RECORD_LEN;
    }
    // Flushes append one batch at a time and sync it before the next, so only the last batch
    // can be torn. A whole batch with a bad checksum and more bytes after it is damage.
    let rest = &bytes[pos..];
    if rest.len() >= BATCH_HEADER_LEN && u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) == BATCH_MAGIC {
        let records = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
        if BATCH_HEADER_LEN + records * RECORD_LEN < rest.len() {
            return Err(JournalError::Damaged { offset: pos as u64 });
        }
    }
    Ok(Replayed { map, valid_len: pos as u64 })
}

/// The number of records of the batch at the start of `bytes`, if it is whole and its
/// checksum matches.
fn intact_batch(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < BATCH_HEADER_LEN || u32::from_le_bytes(bytes[0..4].try_into().ok()?) != BATCH_MAGIC {
        return None;
    }
    let records = u32::from_le_bytes(bytes[4..8].try_into().ok()?) as usize;
    let end = BATCH_HEADER_LEN.checked_add(records.checked_mul(RECORD_LEN)?)?;
    if bytes.len() < end {
        return None;
    }
    let stored = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[4..8]), &bytes[BATCH_HEADER_LEN..end]);
    (crc == stored).then_some(records)
}

/// Records that rebuild `map` from nothing: the compacted form of a journal.
pub fn snapshot_records(map: &LayerMap) -> Vec<Record> {
    let mut records = Vec::new();
    for state in [BlockState::Data, BlockState::Zero] {
        for run in map.state_runs(state) {
            push_record(&mut records, run, MapOp::Set { state, written: false });
        }
    }
    for run in map.written_runs() {
        push_record(&mut records, run, MapOp::MarkWritten);
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(start: u64, count: u64) -> Record {
        Record { run: BlockRun { start, count }, op: MapOp::Set { state: BlockState::Data, written: true } }
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let mut file = encode_header(7).to_vec();
        encode_batch(&[data(0, 3), data(10, 1)], &mut file);
        let good = file.len();
        encode_batch(&[data(100, 1)], &mut file);
        // A torn second batch: its last bytes never reached the disk.
        file.truncate(file.len() - 3);
        let r = replay(&file, 7).unwrap();
        assert_eq!(r.valid_len, good as u64);
        assert_eq!(r.map.get(2), Some(BlockState::Data));
        assert_eq!(r.map.get(100), None);
    }

    #[test]
    fn corrupt_batch_stops_replay() {
        let mut file = encode_header(1).to_vec();
        encode_batch(&[data(0, 1)], &mut file);
        let good = file.len();
        encode_batch(&[data(5, 1)], &mut file);
        let last = file.len() - 10;
        file[last] ^= 0xff;
        assert_eq!(replay(&file, 1).unwrap().valid_len, good as u64, "the last batch may be torn");
        encode_batch(&[data(9, 1)], &mut file);
        assert_eq!(replay(&file, 1).unwrap_err(), JournalError::Damaged { offset: good as u64 });
    }

    #[test]
    fn header_checks() {
        let mut file = encode_header(1).to_vec();
        assert_eq!(replay(&file, 2).unwrap_err(), JournalError::WrongLayer { expected: 2, found: 1 });
        file[8] = 9;
        assert_eq!(replay(&file, 1).unwrap_err(), JournalError::UnsupportedVersion(9));
        file[0] = b'X';
        assert_eq!(replay(&file, 1).unwrap_err(), JournalError::BadMagic);
        assert_eq!(replay(&[], 1).unwrap().valid_len, 0);
    }

    #[test]
    fn push_record_coalesces_sequential_runs() {
        let mut records = Vec::new();
        let op = MapOp::Set { state: BlockState::Data, written: true };
        push_record(&mut records, BlockRun { start: 0, count: 4 }, op);
        push_record(&mut records, BlockRun { start: 4, count: 4 }, op);
        push_record(&mut records, BlockRun { start: 9, count: 1 }, op);
        assert_eq!(records, vec![data(0, 8), data(9, 1)]);
    }

    #[test]
    fn snapshot_records_rebuild_the_map() {
        let mut map = LayerMap::new();
        map.set(BlockRun { start: 3, count: 700 }, MapOp::Set { state: BlockState::Data, written: true });
        map.set(BlockRun { start: 10, count: 5 }, MapOp::Set { state: BlockState::Zero, written: false });
        map.set(BlockRun { start: 5000, count: 2 }, MapOp::MarkWritten);
        let mut file = encode_header(3).to_vec();
        encode_batch(&snapshot_records(&map), &mut file);
        assert_eq!(replay(&file, 3).unwrap().map, map);
    }
}
