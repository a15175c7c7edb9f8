//! The layer map journal (`layer-<id>.map`): encoding and decoding, no I/O.
//!
//! A header, then batches of 16-byte records, each batch sealed by a CRC-32C. A flush appends
//! one batch; a torn or corrupt batch at the tail is where replay stops (its writes were never
//! acknowledged as flushed). docs/format.md describes the bytes.
//!
//! Version 2 adds a chunk size to the header and placement records: a layer keeps the chunks
//! of the volume (2 MiB by default) in its data files in the order they were first written,
//! not at the volume's own offsets (see `crate::layer`). Version 1 files, whose layers use the
//! volume's offsets, are still read.

use crate::blockmap::{BlockRun, BlockState, LayerMap, MapOp};

/// Magic at the start of a map journal.
pub const MAGIC: [u8; 8] = *b"CAIRNMAP";
/// The journal format version this code writes; it also reads [`VERSION_IDENTITY`].
pub const VERSION: u32 = 2;
/// The first version: data at the volume's own offsets, no placement records.
pub const VERSION_IDENTITY: u32 = 1;
/// Size of the file header.
pub const HEADER_LEN: usize = 32;
const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"BTCH");
const BATCH_HEADER_LEN: usize = 16;
const RECORD_LEN: usize = 16;
const OP_DATA: u8 = 1;
const OP_ZERO: u8 = 2;
const OP_MARK_WRITTEN: u8 = 3;
const OP_PLACE: u8 = 4;
const FLAG_WRITTEN: u8 = 1;
/// The chunk sizes a version 2 layer may have, as log2: 8 KiB to 1 GiB.
pub const CHUNK_SHIFTS: std::ops::RangeInclusive<u32> = 13..=30;
/// The chunk size of new layers: 2 MiB.
pub const DEFAULT_CHUNK_SHIFT: u32 = 21;

/// The chunks of the largest volume: placement records name no chunk beyond.
pub fn max_chunks(chunk_shift: u32) -> u64 {
    crate::store::MAX_VOLUME_SIZE >> chunk_shift
}

/// The chunks that cover `size` bytes of a volume.
fn chunks_of(size: u64, chunk_shift: u32) -> u64 {
    size.div_ceil(1 << chunk_shift).min(max_chunks(chunk_shift))
}

/// Why a journal cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    /// The file does not start with the journal magic.
    #[error("not a cairn layer map (bad magic)")]
    BadMagic,
    /// Written by a newer cairn.
    #[error(
        "layer map format version {0} is not supported (this build reads versions {VERSION_IDENTITY} and {VERSION})"
    )]
    UnsupportedVersion(u32),
    /// The header names another layer.
    #[error("layer map belongs to layer {found}, expected {expected}")]
    WrongLayer { expected: u64, found: u64 },
    /// A batch before the end of the file fails its checksum, or bad bytes are followed by an
    /// intact batch: damage, not a torn tail.
    #[error("batch at byte {offset} fails its checksum and is not the last one")]
    Damaged { offset: u64 },
    /// A batch passed its checksum but holds an impossible record.
    #[error("invalid record at byte {offset}")]
    BadRecord { offset: u64 },
    /// A placement names a chunk past the largest volume or snapshot of the store, or more
    /// chunks than that one has: no layer ever places those.
    #[error("the placement at byte {offset} needs {needs} chunks, more than the {limit} of the store's largest volume or snapshot")]
    PlacementTooFar { offset: u64, needs: u64, limit: u64 },
}

/// One journal entry: `op` applied to `run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The blocks, or for [`RecordOp::Place`] the chunks.
    pub run: BlockRun,
    /// What happens to them.
    pub op: RecordOp,
}

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOp {
    /// A change to the block map.
    Map(MapOp),
    /// The chunks of the run take the next free chunk slots of the data files, in order
    /// (version 2 only).
    Place,
}

/// How a layer lays out its data files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Version 1: every byte at the volume's own offset.
    Identity,
    /// Version 2: chunks of `1 << chunk_shift` bytes, each in the next free slot when placed;
    /// `placed` is the chunk in each slot, by slot.
    Packed { chunk_shift: u32, placed: Vec<u64> },
}

/// Encodes the file header for layer `layer_id`: version 2 with its chunk size, or version 1
/// for a layer at the volume's own offsets (`chunk_shift` `None`).
pub fn encode_header(layer_id: u64, chunk_shift: Option<u32>) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    let version = match chunk_shift {
        None => VERSION_IDENTITY,
        Some(shift) => {
            h[24..28].copy_from_slice(&shift.to_le_bytes());
            VERSION
        }
    };
    h[8..12].copy_from_slice(&version.to_le_bytes());
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
            RecordOp::Map(MapOp::Set { state: BlockState::Data, written }) => (OP_DATA, written),
            RecordOp::Map(MapOp::Set { state: BlockState::Zero, written }) => (OP_ZERO, written),
            RecordOp::Map(MapOp::MarkWritten) => (OP_MARK_WRITTEN, false),
            RecordOp::Place => (OP_PLACE, false),
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
pub fn push_record(records: &mut Vec<Record>, run: BlockRun, op: RecordOp) {
    const MAX: u64 = u32::MAX as u64;
    let mut start = run.start;
    let end = run.end();
    while start < end {
        let count = (end - start).min(MAX);
        // Sequential writes arrive as adjacent runs; one record covers them all. Placements
        // are pushed in slot order, so adjacent chunks placed one after the other have
        // adjacent slots too.
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
    /// The layout, with the placements as of the last intact batch; `None` for an empty
    /// file.
    pub layout: Option<Layout>,
    /// Bytes of the file that are valid; anything after is a torn tail to cut off.
    pub valid_len: u64,
}

/// Replays a whole journal file. An empty or short file (its header never reached the disk)
/// is an empty layer. `size_limit` is the size of the store's largest volume or snapshot: a
/// layer only places chunks of the volumes and snapshots that read it, none larger (sizes only
/// grow, a revert starts at its snapshot's size and a clone at that or larger), so a placement past it is
/// damage. It also bounds the memory a crafted placement of billions of chunks could take.
pub fn replay(bytes: &[u8], layer_id: u64, size_limit: u64) -> Result<Replayed, JournalError> {
    if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN].iter().all(|b| *b == 0) {
        // A header the disk never got: nothing was flushed after it either, unless the
        // header itself was damaged.
        if bytes.len() > HEADER_LEN && has_intact_batch(&bytes[HEADER_LEN..]) {
            return Err(JournalError::Damaged { offset: 0 });
        }
        return Ok(Replayed { map: LayerMap::new(), layout: None, valid_len: 0 });
    }
    if bytes[0..8] != MAGIC {
        return Err(JournalError::BadMagic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION && version != VERSION_IDENTITY {
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
    let packed = version == VERSION;
    let chunk_shift = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    if packed && !CHUNK_SHIFTS.contains(&chunk_shift) {
        return Err(JournalError::BadRecord { offset: 24 });
    }
    // Version 2 checks that reserved bytes and unused flag bits are zero, so a later version
    // can give them a meaning; version 1 files were never checked and stay readable as written.
    let strict = packed;
    if strict && bytes[28..32] != [0; 4] {
        return Err(JournalError::BadRecord { offset: 28 });
    }
    // Placements (version 2 only: a version 1 header's chunk shift is not checked) name chunks
    // of the largest volume, and no more slots than it has.
    let limit = if packed { chunks_of(size_limit, chunk_shift) } else { 0 };
    let mut map = LayerMap::new();
    let mut placed = Vec::new();
    let mut pos = HEADER_LEN;
    while let Some(records) = intact_batch(&bytes[pos..]) {
        if strict && bytes[pos + 12..pos + BATCH_HEADER_LEN] != [0; 4] {
            return Err(JournalError::BadRecord { offset: pos as u64 + 12 });
        }
        for i in 0..records {
            let at = pos + BATCH_HEADER_LEN + i * RECORD_LEN;
            let r = &bytes[at..at + RECORD_LEN];
            let unused_flags = match r[12] {
                OP_DATA | OP_ZERO => r[13] & !FLAG_WRITTEN,
                _ => r[13],
            };
            if strict && (unused_flags != 0 || r[14..16] != [0; 2]) {
                return Err(JournalError::BadRecord { offset: at as u64 });
            }
            let start = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
            let count = u64::from(u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")));
            let written = r[13] & FLAG_WRITTEN != 0;
            let op = match r[12] {
                OP_DATA => MapOp::Set { state: BlockState::Data, written },
                OP_ZERO => MapOp::Set { state: BlockState::Zero, written },
                OP_MARK_WRITTEN => MapOp::MarkWritten,
                OP_PLACE if packed => {
                    // Chunks up to `start + count`, in as many slots as placed so far and these.
                    let needs = start.saturating_add(count).max(placed.len() as u64 + count);
                    if needs > limit {
                        return Err(JournalError::PlacementTooFar { offset: at as u64, needs, limit });
                    }
                    placed.extend(start..start + count);
                    continue;
                }
                _ => return Err(JournalError::BadRecord { offset: at as u64 }),
            };
            if start.checked_add(count).is_none() {
                return Err(JournalError::BadRecord { offset: at as u64 });
            }
            map.set(BlockRun { start, count }, op);
        }
        pos += BATCH_HEADER_LEN + records * RECORD_LEN;
    }
    // Flushes append one batch at a time and sync it before the next, and a failed flush
    // stops every later one, so only the last batch can be torn. A whole batch with a bad
    // checksum and more bytes after it is damage, and so is any intact batch after bad bytes
    // (a damaged batch magic or record count would otherwise pass for a torn tail).
    let rest = &bytes[pos..];
    if rest.len() >= BATCH_HEADER_LEN && u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) == BATCH_MAGIC {
        let records = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
        if BATCH_HEADER_LEN + records * RECORD_LEN < rest.len() {
            return Err(JournalError::Damaged { offset: pos as u64 });
        }
    }
    if rest.len() > 1 && has_intact_batch(&rest[1..]) {
        return Err(JournalError::Damaged { offset: pos as u64 });
    }
    let layout = if packed { Layout::Packed { chunk_shift, placed } } else { Layout::Identity };
    Ok(Replayed { map, layout: Some(layout), valid_len: pos as u64 })
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

/// Whether an intact batch starts at any byte of `bytes`. Cheap: almost every offset fails
/// the magic.
fn has_intact_batch(bytes: &[u8]) -> bool {
    (0..bytes.len()).any(|at| intact_batch(&bytes[at..]).is_some())
}

/// Records that rebuild `map` and the placements `placed` (chunk by slot) from nothing: the
/// compacted form of a journal. Placements come first, in slot order.
pub fn snapshot_records(map: &LayerMap, placed: &[u64]) -> Vec<Record> {
    let mut records = Vec::new();
    for chunk in placed {
        push_record(&mut records, BlockRun { start: *chunk, count: 1 }, RecordOp::Place);
    }
    for state in [BlockState::Data, BlockState::Zero] {
        for run in map.state_runs(state) {
            push_record(&mut records, run, RecordOp::Map(MapOp::Set { state, written: false }));
        }
    }
    for run in map.written_runs() {
        push_record(&mut records, run, RecordOp::Map(MapOp::MarkWritten));
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound of a store holding a volume of the largest size.
    const ANY_SIZE: u64 = crate::store::MAX_VOLUME_SIZE;

    fn packed(placed: &[u64]) -> Layout {
        Layout::Packed { chunk_shift: DEFAULT_CHUNK_SHIFT, placed: placed.to_vec() }
    }

    fn data(start: u64, count: u64) -> Record {
        Record {
            run: BlockRun { start, count },
            op: RecordOp::Map(MapOp::Set { state: BlockState::Data, written: true }),
        }
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let mut file = encode_header(7, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
        encode_batch(&[data(0, 3), data(10, 1)], &mut file);
        let good = file.len();
        encode_batch(&[data(100, 1)], &mut file);
        // A torn second batch: its last bytes never reached the disk.
        file.truncate(file.len() - 3);
        let r = replay(&file, 7, ANY_SIZE).unwrap();
        assert_eq!(r.valid_len, good as u64);
        assert_eq!(r.map.get(2), Some(BlockState::Data));
        assert_eq!(r.map.get(100), None);
    }

    #[test]
    fn corrupt_batch_stops_replay() {
        let mut file = encode_header(1, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
        encode_batch(&[data(0, 1)], &mut file);
        let good = file.len();
        encode_batch(&[data(5, 1)], &mut file);
        let last = file.len() - 10;
        file[last] ^= 0xff;
        assert_eq!(replay(&file, 1, ANY_SIZE).unwrap().valid_len, good as u64, "the last batch may be torn");
        encode_batch(&[data(9, 1)], &mut file);
        assert_eq!(replay(&file, 1, ANY_SIZE).unwrap_err(), JournalError::Damaged { offset: good as u64 });
    }

    #[test]
    fn bad_bytes_followed_by_an_intact_batch_are_damage_not_a_torn_tail() {
        let mut file = encode_header(1, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
        encode_batch(&[data(0, 1)], &mut file);
        let good = file.len();
        encode_batch(&[data(5, 1)], &mut file);
        encode_batch(&[data(9, 1)], &mut file);
        // Each of these once read as a torn tail and dropped the flushed batches after it.
        for (at, what) in [(good, "batch magic"), (good + 4, "record count")] {
            let mut damaged = file.clone();
            damaged[at] ^= 0x40;
            assert_eq!(
                replay(&damaged, 1, ANY_SIZE).unwrap_err(),
                JournalError::Damaged { offset: good as u64 },
                "{what}"
            );
        }
        // A header of zeros is a layer whose header never reached the disk, unless flushed
        // batches follow it.
        let mut zeroed = file.clone();
        zeroed[..HEADER_LEN].fill(0);
        assert_eq!(replay(&zeroed, 1, ANY_SIZE).unwrap_err(), JournalError::Damaged { offset: 0 });
        zeroed.truncate(HEADER_LEN + 5);
        assert_eq!(replay(&zeroed, 1, ANY_SIZE).unwrap().valid_len, 0);
        // A last batch whose end reads as zeros (the file grew before its data arrived) is
        // still a torn tail.
        let mut torn = file.clone();
        let len = torn.len();
        torn[len - 5..].fill(0);
        assert_eq!(replay(&torn, 1, ANY_SIZE).unwrap().valid_len, (len - BATCH_HEADER_LEN - RECORD_LEN) as u64);
    }

    #[test]
    fn header_checks() {
        let mut file = encode_header(1, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
        assert_eq!(replay(&file, 2, ANY_SIZE).unwrap_err(), JournalError::WrongLayer { expected: 2, found: 1 });
        file[8] = 9;
        assert_eq!(replay(&file, 1, ANY_SIZE).unwrap_err(), JournalError::UnsupportedVersion(9));
        file[0] = b'X';
        assert_eq!(replay(&file, 1, ANY_SIZE).unwrap_err(), JournalError::BadMagic);
        assert_eq!(replay(&[], 1, ANY_SIZE).unwrap().valid_len, 0);
    }

    #[test]
    fn push_record_coalesces_sequential_runs() {
        let mut records = Vec::new();
        let op = RecordOp::Map(MapOp::Set { state: BlockState::Data, written: true });
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
        let placed = [7, 8, 2, 3, 4, 100];
        let mut file = encode_header(3, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
        encode_batch(&snapshot_records(&map, &placed), &mut file);
        let replayed = replay(&file, 3, ANY_SIZE).unwrap();
        assert_eq!(replayed.map, map);
        assert_eq!(replayed.layout, Some(packed(&placed)));
    }

    fn place(start: u64, count: u64) -> Record {
        Record { run: BlockRun { start, count }, op: RecordOp::Place }
    }

    #[test]
    fn placements_take_slots_in_order_across_batches() {
        let mut file = encode_header(5, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
        encode_batch(&[place(9, 2), data(9 << 9, 1)], &mut file);
        encode_batch(&[place(3, 1)], &mut file);
        assert_eq!(replay(&file, 5, ANY_SIZE).unwrap().layout, Some(packed(&[9, 10, 3])));
    }

    #[test]
    fn version_1_reads_without_placements_and_refuses_them() {
        let mut file = encode_header(5, None).to_vec();
        assert_eq!(file[8], 1);
        encode_batch(&[data(0, 4)], &mut file);
        assert_eq!(replay(&file, 5, ANY_SIZE).unwrap().layout, Some(Layout::Identity));
        encode_batch(&[place(0, 1)], &mut file);
        assert!(matches!(replay(&file, 5, ANY_SIZE).unwrap_err(), JournalError::BadRecord { .. }));
    }

    #[test]
    fn placement_past_the_largest_volume_is_corrupt() {
        let mut file = encode_header(5, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
        encode_batch(&[place(max_chunks(DEFAULT_CHUNK_SHIFT) - 1, 2)], &mut file);
        assert!(matches!(replay(&file, 5, ANY_SIZE).unwrap_err(), JournalError::PlacementTooFar { .. }));
    }

    #[test]
    fn placements_stay_within_the_stores_largest_volume() {
        // 3 MiB: two 2 MiB chunks, the second one partly.
        let size = 3 << 20;
        let placements = |records: &[Record]| {
            let mut file = encode_header(5, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
            encode_batch(records, &mut file);
            replay(&file, 5, size)
        };
        assert_eq!(placements(&[place(1, 1), place(0, 1)]).unwrap().layout, Some(packed(&[1, 0])));
        let offset = (HEADER_LEN + BATCH_HEADER_LEN) as u64;
        assert_eq!(
            placements(&[place(2, 1)]).unwrap_err(),
            JournalError::PlacementTooFar { offset, needs: 3, limit: 2 }
        );
        // A crafted count fails before anything is allocated for it, even at chunk 0.
        let offset = offset + RECORD_LEN as u64;
        assert_eq!(
            placements(&[place(0, 1), place(0, u64::from(u32::MAX))]).unwrap_err(),
            JournalError::PlacementTooFar { offset, needs: 1 + u64::from(u32::MAX), limit: 2 }
        );
    }

    /// The example of docs/format.md §4.5, byte for byte: an accidental format change fails here.
    #[test]
    fn encodes_the_documented_example() {
        let expected = "\
            434149524e4d4150 020000000c000000 2a00000000000000 1500000000000000\
            4254434805000000 167d391300000000\
            0000000000000000 0100000004000000 0000000000000000 0800000001010000\
            6400000000000000 0100000002010000 0008000000000000 0100000004000000\
            0000100000000000 0100000001010000";
        let expected: Vec<u8> = expected
            .split_whitespace()
            .flat_map(|word| (0..word.len()).step_by(2).map(move |i| u8::from_str_radix(&word[i..i + 2], 16).unwrap()))
            .collect();
        let data = RecordOp::Map(MapOp::Set { state: BlockState::Data, written: true });
        let records = [
            place(0, 1),
            Record { run: BlockRun { start: 0, count: 8 }, op: data },
            Record {
                run: BlockRun { start: 100, count: 1 },
                op: RecordOp::Map(MapOp::Set { state: BlockState::Zero, written: true }),
            },
            place(2048, 1),
            Record { run: BlockRun { start: 1 << 20, count: 1 }, op: data },
        ];
        let mut file = encode_header(0x2a, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
        encode_batch(&records, &mut file);
        assert_eq!(file, expected);
        let replayed = replay(&file, 0x2a, ANY_SIZE).unwrap();
        assert_eq!(replayed.layout, Some(packed(&[0, 2048])));
        assert_eq!(replayed.map.get(1 << 20), Some(BlockState::Data));
    }

    #[test]
    fn version_2_refuses_reserved_bytes_and_unused_flags() {
        let mut good = encode_header(5, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
        encode_batch(&[place(0, 1), data(0, 1)], &mut good);
        replay(&good, 5, ANY_SIZE).unwrap();
        let records = HEADER_LEN + BATCH_HEADER_LEN;
        let (place_at, data_at) = (records, records + RECORD_LEN);
        // Header and batch header reserved bytes, a record's reserved bytes, a data record's
        // unused flag bit, and a flags byte on a placement.
        for (at, value) in [(30, 1), (HEADER_LEN + 13, 1), (data_at + 15, 1), (data_at + 13, 3), (place_at + 13, 1)] {
            let mut file = good.clone();
            file[at] = value;
            // Re-seal the batch, so that only the byte set above is wrong.
            let crc = crc32c::crc32c_append(crc32c::crc32c(&file[HEADER_LEN + 4..HEADER_LEN + 8]), &file[records..]);
            file[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&crc.to_le_bytes());
            assert!(matches!(replay(&file, 5, ANY_SIZE), Err(JournalError::BadRecord { .. })), "byte {at}");
        }
        // Version 1 files were never checked, and still open with reserved bytes set.
        let mut old = encode_header(5, None).to_vec();
        old[30] = 1;
        encode_batch(&[data(0, 1)], &mut old);
        replay(&old, 5, ANY_SIZE).unwrap();
    }

    #[test]
    fn chunk_size_is_in_the_header_and_checked() {
        let mut file = encode_header(5, Some(13)).to_vec();
        assert_eq!(
            replay(&file, 5, ANY_SIZE).unwrap().layout,
            Some(Layout::Packed { chunk_shift: 13, placed: Vec::new() })
        );
        file[24] = 12;
        assert_eq!(replay(&file, 5, ANY_SIZE).unwrap_err(), JournalError::BadRecord { offset: 24 });
    }

    mod damaged_journals {
        use super::*;
        use proptest::prelude::*;

        /// A batch's records: each places a new chunk and writes or zeroes blocks in it.
        fn records() -> impl Strategy<Value = Vec<(u64, u64, bool)>> {
            prop::collection::vec((0u64..512, 1u64..64, any::<bool>()), 1..6)
        }

        /// The end of a whole batch, with the map and the placements up to it.
        type StateAt = (usize, LayerMap, Vec<u64>);

        /// A version 2 journal of `batches`, and the state after each whole batch.
        fn journal(batches: &[Vec<(u64, u64, bool)>]) -> (Vec<u8>, Vec<StateAt>) {
            let mut file = encode_header(1, Some(DEFAULT_CHUNK_SHIFT)).to_vec();
            let (mut map, mut placed) = (LayerMap::new(), Vec::new());
            let mut states = vec![(file.len(), map.clone(), placed.clone())];
            for batch in batches {
                let mut records = Vec::new();
                for (block, count, zero) in batch {
                    // Each record's own chunk, so no chunk is placed twice.
                    let chunk = placed.len() as u64;
                    placed.push(chunk);
                    records.push(Record { run: BlockRun { start: chunk, count: 1 }, op: RecordOp::Place });
                    let state = if *zero { BlockState::Zero } else { BlockState::Data };
                    let run = BlockRun {
                        start: (chunk << (DEFAULT_CHUNK_SHIFT - crate::blockmap::BLOCK_SHIFT)) + block,
                        count: *count,
                    };
                    let op = MapOp::Set { state, written: true };
                    map.set(run, op);
                    records.push(Record { run, op: RecordOp::Map(op) });
                }
                encode_batch(&records, &mut file);
                states.push((file.len(), map.clone(), placed.clone()));
            }
            (file, states)
        }

        proptest! {
            /// A journal cut anywhere after its header (a torn flush) replays as exactly the
            /// batches wholly before the cut.
            #[test]
            fn a_cut_journal_replays_as_its_whole_batches(batches in prop::collection::vec(records(), 0..6), cut in any::<prop::sample::Index>()) {
                let (file, states) = journal(&batches);
                let cut = HEADER_LEN + cut.index(file.len() - HEADER_LEN + 1);
                let r = replay(&file[..cut], 1, ANY_SIZE).unwrap();
                let (end, map, placed) = states.iter().rev().find(|(end, ..)| *end <= cut).unwrap();
                prop_assert_eq!(r.valid_len, *end as u64);
                prop_assert_eq!(&r.map, map);
                prop_assert_eq!(r.layout, Some(packed(placed)));
            }

            /// Damaged bytes anywhere never panic: replay answers with a map (of at most the
            /// file's length) or an error.
            #[test]
            fn damaged_journals_replay_or_fail_without_panicking(
                batches in prop::collection::vec(records(), 0..6),
                damage in crate::damage::strategy(),
            ) {
                let file = crate::damage::apply(journal(&batches).0, &damage);
                if let Ok(r) = replay(&file, 1, ANY_SIZE) {
                    prop_assert!(r.valid_len <= file.len() as u64);
                }
            }
        }
    }
}
