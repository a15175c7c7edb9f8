//! One layer on storage: its data files (sparse, split into 1 TiB segments because ext4 caps a
//! file just under 16 TiB) and its map journal. The data files hold the volume's chunks (2 MiB
//! by default) in the order they were first written (format version 2), or, for layers written
//! by format version 1, every byte at the volume's own offset.
//!
//! Durability: writers put bytes in the data file first and only then record the blocks in the
//! in-memory map and the pending list. [`Layer::flush`] syncs the data files before it appends
//! and syncs the pending records, so a journal never points at data that is not on disk.
//!
//! Concurrent flushes sync the data files side by side and queue only for the journal: each
//! cuts off the records queued so far, under a ticket, before its data sync, and may journal
//! a cut only once a data sync that began after that cut has finished. Cuts are journaled
//! oldest first, so batches land in the order their changes were made.

use crate::blockmap::{BlockRun, LayerMap, MapOp, BLOCK_SHIFT};
use crate::journal::{self, Layout, Record, RecordOp};
use crate::storage::{Access, Storage, StorageFile};
use crate::view::ReadPart;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Bytes per data segment file.
pub const SEGMENT_SHIFT: u32 = 40;
const SEGMENT_SIZE: u64 = 1 << SEGMENT_SHIFT;
/// Segments of the largest volume.
const MAX_SEGMENTS: usize = (crate::store::MAX_VOLUME_SIZE >> SEGMENT_SHIFT) as usize;
/// log2 of the chunks per slot table of a [`ChunkTable`] (2 GiB of volume in 2 MiB chunks).
const TABLE_SHIFT: u32 = 10;
/// log2 of the slot tables per directory (2 TiB of volume in 2 MiB chunks).
const DIRECTORY_SHIFT: u32 = 10;
/// A write at least this large starts its own writeback at once, so that the disk writes a
/// sequential stream while it arrives rather than all at the next flush. A copy of a 1 GiB
/// image over NBD (nbdcopy, with its flush) took 660-820 ms this way against 730-960 ms
/// without; small random writes are left to the flush, which writes them in one batch.
const WRITE_BEHIND_MIN: u64 = 128 << 10;

/// File name of a layer's map journal.
pub fn map_file_name(id: u64) -> String {
    format!("layer-{id:016x}.map")
}

/// File name of one data segment of a layer.
pub fn data_file_name(id: u64, segment: u64) -> String {
    format!("layer-{id:016x}.d{segment}")
}

/// The layer id a file belongs to, if it is a layer file.
pub fn layer_of_file(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("layer-")?;
    let (hex, ext) = rest.split_once('.')?;
    let valid_ext = ext == "map" || ext.strip_prefix('d').is_some_and(|n| n.parse::<u64>().is_ok());
    (valid_ext && hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

/// What a layer is when a store opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// A volume's writable top layer.
    Head,
    /// Read-only: a snapshot's layer, or one that snapshots and clones share.
    Frozen,
    /// Data merged away; only its change tracking is left (§9 of docs/format.md).
    Ghost,
}

impl LayerKind {
    fn access(self) -> Access {
        match self {
            LayerKind::Head => Access::InPlaceWrites,
            LayerKind::Frozen | LayerKind::Ghost => Access::ReadMostly,
        }
    }
}

/// The map and the changes not yet in the journal, under one lock so they never disagree.
#[derive(Debug, Default)]
pub struct MapState {
    pub map: LayerMap,
    /// Changes since the last cut, in order.
    pending: Vec<Record>,
    /// Changes cut off by flushes still syncing the data they point at, oldest first, each
    /// under its flush's ticket.
    cuts: VecDeque<(u64, Vec<Record>)>,
    next_ticket: u64,
}

impl MapState {
    /// Changes the map and queues the change for the journal. The data the change points at
    /// must already be written.
    pub fn apply(&mut self, run: BlockRun, op: MapOp) {
        self.map.set(run, op);
        journal::push_record(&mut self.pending, run, RecordOp::Map(op));
    }

    /// Cuts off the changes queued so far for a flush about to sync the data, and returns the
    /// flush's ticket. A separate list also keeps later changes from joining a cut record.
    fn cut(&mut self) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if !self.pending.is_empty() {
            self.cuts.push_back((ticket, std::mem::take(&mut self.pending)));
        }
        ticket
    }

    /// The changes of every cut up to `ticket`'s, oldest first: their data is on disk once
    /// `ticket`'s data sync has finished.
    fn take_cuts(&mut self, ticket: u64) -> Vec<Record> {
        let mut records = Vec::new();
        while self.cuts.front().is_some_and(|(cut, _)| *cut <= ticket) {
            records.extend(self.cuts.pop_front().expect("checked").1);
        }
        records
    }
}

/// Where a layer keeps the volume's chunks in its data files.
#[derive(Debug)]
enum Placement {
    /// Format version 1: every byte at the volume's own offset.
    Identity,
    /// Format version 2: a chunk takes the next free slot when it is first written, so new
    /// data lands at the end of the files. ext4 then extends the last leaf of a file's extent
    /// tree instead of inserting into leaves all over a tree as wide as the volume, and a
    /// flush's sync commits a few metadata blocks instead of about one per write: syncing 64
    /// random 4 KiB writes into a 1 TiB sparse file took 6.6-11 ms at p99 at the volume's
    /// offsets and 1.2-1.9 ms packed in chunks (bench/sync_layout.py; docs/architecture.md,
    /// "Chunk placement").
    Packed(ChunkTable),
}

/// A slot table: slot + 1 of each of its chunks, 0 while unplaced.
type SlotTable = [AtomicU64; 1 << TABLE_SHIFT];
/// A directory of slot tables, each made when a chunk in its stretch is first placed.
type Directory = [OnceLock<Box<SlotTable>>];

/// The slot of every placed chunk. Readers find one with three atomic loads and no lock;
/// tables exist only for the stretches of the volume the layer holds data in.
#[derive(Debug)]
struct ChunkTable {
    chunk_shift: u32,
    directories: Box<[OnceLock<Box<Directory>>]>,
    /// The chunk in each slot, by slot. Held while a chunk is placed, so slots are handed out
    /// in the order their placement records are queued.
    placed: Mutex<Vec<u64>>,
}

impl ChunkTable {
    fn new(chunk_shift: u32) -> Self {
        let directories = (journal::max_chunks(chunk_shift) >> (TABLE_SHIFT + DIRECTORY_SHIFT)).max(1);
        ChunkTable {
            chunk_shift,
            directories: (0..directories).map(|_| OnceLock::new()).collect(),
            placed: Mutex::new(Vec::new()),
        }
    }

    /// Splits a chunk number into its directory, table and entry.
    fn indices(chunk: u64) -> (usize, usize, usize) {
        let mask = |bits: u32| (1usize << bits) - 1;
        let table = (chunk >> TABLE_SHIFT) as usize;
        ((table >> DIRECTORY_SHIFT), table & mask(DIRECTORY_SHIFT), chunk as usize & mask(TABLE_SHIFT))
    }

    fn slot(&self, chunk: u64) -> Option<u64> {
        let (d, t, e) = Self::indices(chunk);
        // `get`: a corrupt map may name blocks past the largest volume; they read as unplaced.
        let table = self.directories.get(d)?.get()?[t].get()?;
        table[e].load(Ordering::Acquire).checked_sub(1)
    }

    fn entry(&self, chunk: u64) -> &AtomicU64 {
        let (d, t, e) = Self::indices(chunk);
        let directory =
            self.directories[d].get_or_init(|| (0..1 << DIRECTORY_SHIFT).map(|_| OnceLock::new()).collect());
        &directory[t].get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))))[e]
    }

    /// Rebuilds the table from a journal's placements; `None` if a chunk is placed twice.
    fn from_placed(chunk_shift: u32, placed: Vec<u64>) -> Option<Self> {
        let table = ChunkTable::new(chunk_shift);
        for (slot, chunk) in placed.iter().enumerate() {
            let entry = table.entry(*chunk);
            if entry.load(Ordering::Relaxed) != 0 {
                return None;
            }
            entry.store(slot as u64 + 1, Ordering::Relaxed);
        }
        *table.placed.lock().expect("placement lock") = placed;
        Some(table)
    }
}

#[derive(Debug)]
struct JournalFile {
    file: Arc<dyn StorageFile>,
    end: u64,
}

impl JournalFile {
    /// Writes `records` as one batch without syncing it. Returns the file's new end, or `None`
    /// when there was nothing to write.
    fn append(&self, records: &[Record]) -> io::Result<Option<u64>> {
        if records.is_empty() {
            return Ok(None);
        }
        let mut batch = Vec::with_capacity(16 + records.len() * 16);
        journal::encode_batch(records, &mut batch);
        self.file.write_at(&batch, self.end)?;
        Ok(Some(self.end + batch.len() as u64))
    }

    /// Syncs what [`JournalFile::append`] wrote; the batch counts from then on, so the next
    /// one goes after it at `end`.
    fn sync_to(&mut self, end: u64) -> io::Result<()> {
        self.file.sync().map(|()| self.end = end)
    }
}

/// A layer: data segments, map and journal.
#[derive(Debug)]
pub struct Layer {
    id: u64,
    storage: Arc<dyn Storage>,
    /// One slot per possible segment, set once when the segment's file is opened or created:
    /// readers find a segment with one atomic load, no lock.
    segments: Box<[OnceLock<Arc<dyn StorageFile>>]>,
    /// Files created since the last flush (data segments, or a new layer's journal) whose
    /// directory entries are not yet durable. Held while creating a segment, so two writers
    /// never create the same one.
    new_files: Mutex<bool>,
    state: RwLock<MapState>,
    journal: Mutex<JournalFile>,
    /// A sync failed. The kernel may have dropped the dirty pages and a retry could
    /// "succeed" without them, so the layer takes no more writes until the store is reopened.
    failed: std::sync::atomic::AtomicBool,
    /// The layer is a volume's head: a guest overwrites its blocks in place, often in 4 KiB
    /// pieces, so its data files are marked [`Access::InPlaceWrites`] (on ext4 that turns
    /// read-ahead off; see `storage::in_place_advice`). Frozen layers are mostly read.
    is_head: std::sync::atomic::AtomicBool,
    placement: Placement,
}

impl Layer {
    /// Creates the files of a new, empty head layer. They become durable at its first flush;
    /// a layer whose files are missing after a crash never flushed and is empty.
    pub fn create(storage: Arc<dyn Storage>, id: u64, chunk_shift: u32) -> io::Result<Layer> {
        let file = storage.open(&map_file_name(id), true)?;
        file.set_len(0)?;
        file.write_at(&journal::encode_header(id, Some(chunk_shift)), 0)?;
        Ok(Layer {
            id,
            storage,
            segments: empty_segments(),
            new_files: Mutex::new(true),
            state: RwLock::new(MapState::default()),
            journal: Mutex::new(JournalFile { file, end: journal::HEADER_LEN as u64 }),
            failed: Default::default(),
            is_head: true.into(),
            placement: Placement::Packed(ChunkTable::new(chunk_shift)),
        })
    }

    /// Opens a layer, replaying its journal and cutting off a torn tail. A ghost keeps only
    /// its change tracking. A layer that never flushed starts again with chunks of
    /// `1 << chunk_shift` bytes. `size_limit`: the store's largest volume or snapshot, past
    /// which no layer holds chunks (see [`journal::replay`]).
    pub fn open(
        storage: Arc<dyn Storage>,
        id: u64,
        kind: LayerKind,
        files: &[String],
        chunk_shift: u32,
        size_limit: u64,
    ) -> Result<Layer, crate::Error> {
        let ghost = kind == LayerKind::Ghost;
        let name = map_file_name(id);
        let file = storage.open(&name, true)?;
        let len = file.size()?;
        let mut bytes = vec![0u8; len as usize];
        file.read_at(&mut bytes, 0)?;
        let corrupt = |reason: String| crate::Error::Corrupt { file: name.clone(), reason };
        let replayed = journal::replay(&bytes, id, size_limit).map_err(|e| match e {
            journal::JournalError::UnsupportedVersion(_) => {
                crate::Error::UnsupportedFormat { file: name.clone(), reason: e.to_string() }
            }
            e => corrupt(e.to_string()),
        })?;
        let mut end = replayed.valid_len;
        let layout = replayed.layout.unwrap_or(Layout::Packed { chunk_shift, placed: Vec::new() });
        if end == 0 {
            // The header never reached the disk: nothing was ever flushed to this layer.
            file.set_len(0)?;
            file.write_at(&journal::encode_header(id, Some(chunk_shift)), 0)?;
            end = journal::HEADER_LEN as u64;
        } else if end < len {
            file.set_len(end)?;
            file.sync()?;
        }
        let placement = match layout {
            Layout::Identity => Placement::Identity,
            // A ghost has no data left to find: its slots are not rebuilt.
            Layout::Packed { chunk_shift, .. } if ghost => Placement::Packed(ChunkTable::new(chunk_shift)),
            Layout::Packed { chunk_shift, placed } => Placement::Packed(
                ChunkTable::from_placed(chunk_shift, placed)
                    .ok_or_else(|| corrupt("a chunk is placed twice".into()))?,
            ),
        };
        let mut map = replayed.map;
        if ghost {
            map.keep_only_written();
        }
        let segments = empty_segments();
        for f in files {
            let Some(seg) = f.strip_prefix(&format!("layer-{id:016x}.d")).and_then(|n| n.parse::<usize>().ok()) else {
                continue;
            };
            if ghost {
                // Its data was merged away; a crash kept the files from being removed then.
                storage.remove(f)?;
            } else if let Some(slot) = segments.get(seg) {
                let file = storage.open(f, false)?;
                file.set_access(kind.access());
                // Each segment has one file name, so each slot is set once.
                let _ = slot.set(file);
            }
        }
        Ok(Layer {
            id,
            storage,
            segments,
            new_files: Mutex::new(false),
            state: RwLock::new(MapState { map, ..MapState::default() }),
            journal: Mutex::new(JournalFile { file, end }),
            failed: Default::default(),
            is_head: (kind == LayerKind::Head).into(),
            placement,
        })
    }

    /// The layer stops being a head: from now on only merges write into its data files.
    /// Called with the volume's writes paused, so no segment is being created meanwhile.
    pub fn freeze(&self) {
        self.is_head.store(false, Ordering::Relaxed);
        for segment in self.segments.iter().filter_map(OnceLock::get) {
            segment.set_access(self.access());
        }
    }

    fn access(&self) -> Access {
        let kind = if self.is_head.load(Ordering::Relaxed) { LayerKind::Head } else { LayerKind::Frozen };
        kind.access()
    }

    /// The layer's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Shared access to the map.
    pub fn map(&self) -> RwLockReadGuard<'_, MapState> {
        self.state.read().expect("layer map lock")
    }

    /// Exclusive access to the map and the pending journal records.
    pub fn map_mut(&self) -> RwLockWriteGuard<'_, MapState> {
        self.state.write().expect("layer map lock")
    }

    /// Marks `runs` written (changed since the layer below), journaled at the next flush.
    pub fn mark_written(&self, runs: impl IntoIterator<Item = BlockRun>) {
        let mut state = self.map_mut();
        for run in runs {
            state.apply(run, MapOp::MarkWritten);
        }
    }

    /// The segment `index` (below MAX_SEGMENTS: volumes are at most MAX_VOLUME_SIZE).
    fn segment(&self, index: u64, create: bool) -> io::Result<Option<Arc<dyn StorageFile>>> {
        let slot = &self.segments[index as usize];
        if let Some(seg) = slot.get() {
            return Ok(Some(seg.clone()));
        }
        if !create {
            return Ok(None);
        }
        let mut new_files = self.new_files.lock().expect("new files lock");
        if let Some(seg) = slot.get() {
            return Ok(Some(seg.clone()));
        }
        let seg = self.storage.open(&data_file_name(self.id, index), true)?;
        seg.set_access(self.access());
        // Unset: checked under the creation lock just above.
        let _ = slot.set(seg.clone());
        *new_files = true;
        Ok(Some(seg))
    }

    /// Splits a volume byte range at chunk boundaries and finds where each part lives: the data
    /// segment and the offset in it, or `None` in a chunk the layer never placed. With `place`,
    /// such a chunk is placed first.
    fn for_each_part(
        &self,
        offset: u64,
        len: u64,
        place: bool,
        mut f: impl FnMut(Option<(u64, u64)>, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let chunk_shift = match &self.placement {
            Placement::Identity => SEGMENT_SHIFT,
            Placement::Packed(table) => table.chunk_shift,
        };
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let within = pos & ((1 << chunk_shift) - 1);
            let n = ((1 << chunk_shift) - within).min(len - done);
            let physical = match &self.placement {
                Placement::Identity => Some(pos),
                Placement::Packed(table) => {
                    let chunk = pos >> chunk_shift;
                    let slot = match table.slot(chunk) {
                        None if place => Some(self.place(table, chunk)),
                        slot => slot,
                    };
                    slot.map(|slot| slot << chunk_shift | within)
                }
            };
            // A chunk never straddles segments: the chunk size divides the segment size.
            f(physical.map(|p| (p >> SEGMENT_SHIFT, p & (SEGMENT_SIZE - 1))), done as usize..(done + n) as usize)?;
            done += n;
        }
        Ok(())
    }

    /// Gives `chunk` the next free slot and queues its placement record, ahead of any record
    /// of data written into it.
    fn place(&self, table: &ChunkTable, chunk: u64) -> u64 {
        let mut placed = table.placed.lock().expect("placement lock");
        if let Some(slot) = table.slot(chunk) {
            return slot; // Another writer placed it meanwhile.
        }
        let slot = placed.len() as u64;
        placed.push(chunk);
        journal::push_record(&mut self.map_mut().pending, BlockRun { start: chunk, count: 1 }, RecordOp::Place);
        table.entry(chunk).store(slot + 1, Ordering::Release);
        slot
    }

    /// Reads data bytes at a volume offset (blocks the layer does not hold read as zeros).
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // The hot read path: borrow the handle, no lock, no reference count.
        self.for_each_part(offset, buf.len() as u64, false, |at, range| match self.existing_file(at) {
            Some((file, within)) => file.read_at(&mut buf[range], within),
            None => {
                buf[range].fill(0);
                Ok(())
            }
        })
    }

    /// Where [`Layer::read_data`] would read the data bytes at a volume offset from, as parts
    /// given to `push` in order.
    pub fn data_parts(&self, offset: u64, len: u64, push: &mut impl FnMut(ReadPart)) -> io::Result<()> {
        self.for_each_part(offset, len, false, |at, range| {
            let len = range.len() as u64;
            push(match self.existing_file(at) {
                Some((file, within)) => ReadPart::File { file: file.clone(), offset: within, len },
                None => ReadPart::Zeros(len),
            });
            Ok(())
        })
    }

    /// The open segment file and offset in it of a position [`Layer::for_each_part`] gave, if
    /// the position is placed and its segment file exists (else it reads as zeros).
    fn existing_file(&self, at: Option<(u64, u64)>) -> Option<(&Arc<dyn StorageFile>, u64)> {
        let (segment, within) = at?;
        Some((self.segments[segment as usize].get()?, within))
    }

    /// Writes data bytes at a volume offset. The caller records the blocks in the map after.
    pub fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.for_each_part(offset, buf.len() as u64, true, |at, range| {
            let (seg, within) = at.expect("placed on demand");
            let file = self.segment(seg, true)?.expect("created on demand");
            file.write_at(&buf[range.clone()], within)?;
            if buf.len() as u64 >= WRITE_BEHIND_MIN {
                file.start_writeback(within, range.len() as u64);
            }
            Ok(())
        })
    }

    /// Frees the data of whole blocks (they will be marked zero).
    pub fn punch_blocks(&self, run: BlockRun) -> io::Result<()> {
        self.for_each_part(run.start << BLOCK_SHIFT, run.count << BLOCK_SHIFT, false, |at, range| {
            let Some((seg, within)) = at else {
                return Ok(()); // Never placed: nothing to free.
            };
            match self.segment(seg, false)? {
                Some(file) => file.punch_hole(within, (range.end - range.start) as u64),
                None => Ok(()),
            }
        })
    }

    /// Makes every completed write and map change durable: data first, then the journal.
    pub fn flush(&self) -> io::Result<()> {
        self.flush_with(None::<fn()>).and_then(|(synced, _)| synced)
    }

    /// Records not yet in the journal: about how many writes a flush would sync now.
    pub fn pending_records(&self) -> usize {
        let state = self.map();
        state.pending.len() + state.cuts.iter().map(|(_, records)| records.len()).sum::<usize>()
    }

    /// [`Layer::flush`], running `overlap` on another thread during the journal's own sync, so
    /// that two syncs cost the time of one. `overlap` starts after the journal batch was
    /// written, so whatever it writes reaches the files after the batch. Returns the flush's
    /// result and `overlap`'s; `Err` if the flush failed before `overlap` could start.
    pub fn flush_overlapped<R: Send>(&self, overlap: impl FnOnce() -> R + Send) -> io::Result<(io::Result<()>, R)> {
        let (synced, overlapped) = self.flush_with(Some(overlap))?;
        Ok((synced, overlapped.expect("an overlap runs whenever the flush gets that far")))
    }

    /// A flush, with or without work to overlap with its journal sync. Without, no thread is
    /// started: the journal lock is held until the overlap ends, so a plain flush that
    /// started one would keep the next flush waiting for the thread's start and exit too.
    fn flush_with<R: Send>(
        &self,
        overlap: Option<impl FnOnce() -> R + Send>,
    ) -> io::Result<(io::Result<()>, Option<R>)> {
        self.check_healthy()?;
        let ticket = self.map_mut().cut();
        // Outside the journal lock: a flush arriving while another syncs the data does not
        // wait for that sync before starting its own (see the module's comment).
        let data_synced = self.sync_data();
        let mut journal = self.journal.lock().expect("journal lock");
        // Possibly none: a flush with a later ticket may have journaled this cut already.
        let records = self.map_mut().take_cuts(ticket);
        // Healthy again under the lock: the flush that took this cut may have failed its sync.
        let written = data_synced.and_then(|()| self.check_healthy()).and_then(|()| journal.append(&records));
        let outcome = match (written, overlap) {
            (Err(e), _) => Err(e),
            (Ok(None), overlap) => Ok((Ok(()), overlap.map(|f| f()))),
            (Ok(Some(end)), None) => Ok((journal.sync_to(end), None)),
            (Ok(Some(end)), Some(overlap)) => Ok(std::thread::scope(|s| {
                let other = s.spawn(overlap);
                let synced = journal.sync_to(end);
                (synced, Some(other.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))))
            })),
        };
        if matches!(outcome, Err(_) | Ok((Err(_), _))) {
            self.poison();
            // Not durable: keep the records for the next flush, ahead of newer ones.
            self.map_mut().cuts.push_front((ticket, records));
        }
        outcome
    }

    /// Syncs the data files, and the directory if files were created since the last flush.
    fn sync_data(&self) -> io::Result<()> {
        for seg in self.segments.iter().filter_map(OnceLock::get) {
            seg.sync()?;
        }
        let mut new_files = self.new_files.lock().expect("new files lock");
        if *new_files {
            self.storage.sync_dir()?;
            *new_files = false;
        }
        Ok(())
    }

    /// Makes every later write and flush of this layer fail until the store is reopened: once
    /// what it acknowledged may not be on the disk (its sync failed, whatever a retry says; or
    /// a failed snapshot or catalog write left what lies under it unknown), a flush that
    /// succeeds would claim too much.
    pub fn poison(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Fails once a sync of this layer has failed.
    pub fn check_healthy(&self) -> io::Result<()> {
        if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other("an earlier sync of this disk failed; reopen the store"));
        }
        Ok(())
    }

    /// Size of the journal file in bytes.
    pub fn journal_len(&self) -> u64 {
        self.journal.lock().expect("journal lock").end
    }

    /// Rewrites the journal as the map's current state. Callers make sure no writer touches
    /// the layer meanwhile and that the map holds nothing unflushed.
    pub fn compact_journal(&self) -> io::Result<()> {
        let mut journal = self.journal.lock().expect("journal lock");
        let (header, records) = match &self.placement {
            Placement::Identity => {
                (journal::encode_header(self.id, None), journal::snapshot_records(&self.map().map, &[]))
            }
            Placement::Packed(table) => {
                let placed = table.placed.lock().expect("placement lock");
                let records = journal::snapshot_records(&self.map().map, &placed);
                (journal::encode_header(self.id, Some(table.chunk_shift)), records)
            }
        };
        let mut bytes = header.to_vec();
        journal::encode_batch(&records, &mut bytes);
        let tmp = format!("{}.tmp", map_file_name(self.id));
        let file = self.storage.open(&tmp, true)?;
        file.set_len(0)?;
        file.write_at(&bytes, 0)?;
        file.sync()?;
        self.storage.rename(&tmp, &map_file_name(self.id))?;
        // From here the old journal is unlinked: appends must go to the new one.
        *journal = JournalFile { file, end: bytes.len() as u64 };
        if let Err(e) = self.storage.sync_dir() {
            self.poison();
            return Err(e);
        }
        Ok(())
    }

    /// Deletes the layer's files (after the catalog no longer names it).
    pub fn remove_files(storage: &dyn Storage, id: u64, files: &[String]) -> io::Result<()> {
        for f in files {
            if layer_of_file(f) == Some(id) {
                storage.remove(f)?;
            }
        }
        Ok(())
    }

    /// Deletes the data segments only (a layer that became a ghost).
    pub fn remove_data_files(&self) -> io::Result<()> {
        for (i, seg) in self.segments.iter().enumerate() {
            if seg.get().is_some() {
                self.storage.remove(&data_file_name(self.id, i as u64))?;
            }
        }
        // The handles stay open: readers that resolved blocks to this layer before it became a
        // ghost finish reading the unlinked files; the space is freed when the layer drops.
        Ok(())
    }
}

fn empty_segments() -> Box<[OnceLock<Arc<dyn StorageFile>>]> {
    (0..MAX_SEGMENTS).map(|_| OnceLock::new()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockmap::{BlockState, BLOCK_SIZE};
    use crate::storage::{Fault, FaultControl, FaultyStorage, MemStorage};
    use crate::store::MAX_VOLUME_SIZE;

    const ID: u64 = 9;
    const SHIFT: u32 = journal::DEFAULT_CHUNK_SHIFT;

    /// Writes `fill` over block `block` and records it, as a volume's write does.
    fn write_block(layer: &Layer, block: u64, fill: u8) {
        layer.write_data(&[fill; BLOCK_SIZE as usize], block << BLOCK_SHIFT).unwrap();
        layer
            .map_mut()
            .apply(BlockRun { start: block, count: 1 }, MapOp::Set { state: BlockState::Data, written: true });
    }

    fn read_block(layer: &Layer, block: u64) -> Vec<u8> {
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        layer.read_data(&mut buf, block << BLOCK_SHIFT).unwrap();
        buf
    }

    /// The bytes of the layer's first data file at `offset`.
    fn file_bytes(storage: &MemStorage, offset: u64) -> Vec<u8> {
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        storage.open(&data_file_name(ID, 0), false).unwrap().read_at(&mut buf, offset).unwrap();
        buf
    }

    fn reopen(storage: &MemStorage) -> Layer {
        let files = storage.list().unwrap();
        Layer::open(Arc::new(storage.clone()), ID, LayerKind::Head, &files, SHIFT, MAX_VOLUME_SIZE).unwrap()
    }

    /// A layer on faulty memory with block 0 flushed and block 1 written, whose next sync (the
    /// next flush's data sync) stalls at the returned barrier.
    fn layer_with_a_flush_to_stall() -> (MemStorage, Arc<FaultControl>, Layer, Arc<std::sync::Barrier>) {
        let storage = MemStorage::new();
        let faulty = FaultyStorage::new(Arc::new(storage.clone()));
        let control = faulty.control();
        let layer = Layer::create(Arc::new(faulty), ID, SHIFT).unwrap();
        write_block(&layer, 0, 1);
        layer.flush().unwrap();
        write_block(&layer, 1, 2);
        let stall = control.stall_next_sync();
        (storage, control, layer, stall)
    }

    #[test]
    fn a_flush_journals_without_waiting_for_an_earlier_flushs_data_sync() {
        let (storage, _, layer, stall) = layer_with_a_flush_to_stall();
        std::thread::scope(|s| {
            let first = s.spawn(|| layer.flush());
            stall.wait(); // The first flush is syncing the data of block 1.
            write_block(&layer, 2, 3);
            let (done, finished) = std::sync::mpsc::channel();
            let layer = &layer;
            s.spawn(move || done.send(layer.flush()));
            let second = finished.recv_timeout(std::time::Duration::from_secs(30));
            if second.is_err() {
                stall.wait(); // Let the first flush go, so the scope can end and report.
                panic!("the second flush waited for the first one's data sync");
            }
            second.unwrap().unwrap();
            // The second flush's data sync began after block 1 was written, so it journaled
            // the first flush's records as well as its own: a power loss now keeps both.
            storage.power_loss();
            let reopened = reopen(&storage);
            for (block, fill) in [(0, 1), (1, 2), (2, 3)] {
                assert_eq!(read_block(&reopened, block), vec![fill; BLOCK_SIZE as usize], "block {block}");
            }
            stall.wait();
            first.join().unwrap().unwrap();
        });
    }

    #[test]
    fn a_failed_journal_sync_fails_the_flushes_whose_records_it_held() {
        let (_, control, layer, stall) = layer_with_a_flush_to_stall();
        std::thread::scope(|s| {
            let first = s.spawn(|| layer.flush());
            stall.wait();
            write_block(&layer, 2, 3);
            // The second flush syncs the data and journals both flushes' records; its journal
            // sync, the next operation after the batch is written, fails.
            control.fail_after(2, Fault::Io, false);
            assert!(layer.flush().is_err());
            control.heal();
            stall.wait();
            // The first flush's records went with the failed batch: it must not report them durable.
            assert!(first.join().unwrap().is_err());
        });
        assert!(layer.flush().is_err(), "the layer stays failed until reopened");
    }

    #[test]
    fn chunks_take_slots_in_the_order_first_written_and_keep_them_across_reopen() {
        let storage = MemStorage::new();
        let layer = Layer::create(Arc::new(storage.clone()), ID, SHIFT).unwrap();
        let chunk_blocks = 1u64 << (SHIFT - BLOCK_SHIFT);
        // Block 3 of chunk 1000 first, then block 1 of chunk 2, then chunk 1000 again.
        let far = 1000 * chunk_blocks + 3;
        write_block(&layer, far, 0xaa);
        write_block(&layer, 2 * chunk_blocks + 1, 0xbb);
        write_block(&layer, far + 1, 0xcc);
        layer.flush().unwrap();
        assert_eq!(file_bytes(&storage, 3 << BLOCK_SHIFT), vec![0xaa; BLOCK_SIZE as usize], "chunk 1000 in slot 0");
        assert_eq!(file_bytes(&storage, 4 << BLOCK_SHIFT), vec![0xcc; BLOCK_SIZE as usize]);
        let slot_1 = (1 << SHIFT) + BLOCK_SIZE;
        assert_eq!(file_bytes(&storage, slot_1), vec![0xbb; BLOCK_SIZE as usize], "chunk 2 in slot 1");
        drop(layer);
        let layer = reopen(&storage);
        assert_eq!(read_block(&layer, far), vec![0xaa; BLOCK_SIZE as usize]);
        assert_eq!(read_block(&layer, 2 * chunk_blocks + 1), vec![0xbb; BLOCK_SIZE as usize]);
        assert_eq!(read_block(&layer, 5), vec![0; BLOCK_SIZE as usize], "an unplaced chunk reads as zeros");
        // A chunk placed after the reopen takes the next slot, and compaction keeps them all.
        write_block(&layer, 7, 0xdd);
        layer.flush().unwrap();
        assert_eq!(file_bytes(&storage, (2 << SHIFT) + 7 * BLOCK_SIZE), vec![0xdd; BLOCK_SIZE as usize]);
        layer.compact_journal().unwrap();
        drop(layer);
        let layer = reopen(&storage);
        for (block, fill) in [(far, 0xaa), (far + 1, 0xcc), (2 * chunk_blocks + 1, 0xbb), (7, 0xdd)] {
            assert_eq!(read_block(&layer, block), vec![fill; BLOCK_SIZE as usize], "block {block}");
        }
    }

    #[test]
    fn a_placement_lost_in_a_power_loss_loses_only_unflushed_writes() {
        let storage = MemStorage::new();
        let layer = Layer::create(Arc::new(storage.clone()), ID, SHIFT).unwrap();
        write_block(&layer, 0, 1);
        layer.flush().unwrap();
        // Placed and written, never flushed: after the power loss its slot is free again.
        write_block(&layer, 1 << 20, 2);
        drop(layer);
        storage.power_loss();
        let layer = reopen(&storage);
        assert_eq!(layer.map().map.get(1 << 20), None);
        write_block(&layer, 3 << 20, 3);
        layer.flush().unwrap();
        drop(layer);
        let layer = reopen(&storage);
        assert_eq!(read_block(&layer, 0), vec![1; BLOCK_SIZE as usize]);
        assert_eq!(read_block(&layer, 3 << 20), vec![3; BLOCK_SIZE as usize]);
    }

    #[test]
    fn version_1_layers_keep_data_at_the_volume_offsets() {
        let storage = MemStorage::new();
        let mut journal_bytes = journal::encode_header(ID, None).to_vec();
        let run = BlockRun { start: 1 << 20, count: 1 };
        let op = MapOp::Set { state: BlockState::Data, written: true };
        journal::encode_batch(&[Record { run, op: RecordOp::Map(op) }], &mut journal_bytes);
        storage.open(&map_file_name(ID), true).unwrap().write_at(&journal_bytes, 0).unwrap();
        storage.open(&data_file_name(ID, 0), true).unwrap().write_at(&[5; BLOCK_SIZE as usize], 1 << 32).unwrap();
        let layer = reopen(&storage);
        assert_eq!(read_block(&layer, 1 << 20), vec![5; BLOCK_SIZE as usize]);
        // New writes go to their own offsets too, and compaction keeps version 1.
        write_block(&layer, 10, 6);
        layer.flush().unwrap();
        assert_eq!(file_bytes(&storage, 10 * BLOCK_SIZE), vec![6; BLOCK_SIZE as usize]);
        layer.compact_journal().unwrap();
        let mut header = [0u8; 12];
        storage.open(&map_file_name(ID), false).unwrap().read_at(&mut header, 0).unwrap();
        assert_eq!(header[8], 1, "still format version 1");
        drop(layer);
        assert_eq!(read_block(&reopen(&storage), 10), vec![6; BLOCK_SIZE as usize]);
    }

    #[test]
    fn a_chunk_placed_twice_is_corrupt() {
        let storage = MemStorage::new();
        let mut journal_bytes = journal::encode_header(ID, Some(SHIFT)).to_vec();
        let place = Record { run: BlockRun { start: 4, count: 1 }, op: RecordOp::Place };
        journal::encode_batch(&[place, place], &mut journal_bytes);
        storage.open(&map_file_name(ID), true).unwrap().write_at(&journal_bytes, 0).unwrap();
        let files = storage.list().unwrap();
        let err =
            Layer::open(Arc::new(storage.clone()), ID, LayerKind::Head, &files, SHIFT, MAX_VOLUME_SIZE).unwrap_err();
        assert!(err.to_string().contains("placed twice"), "{err}");
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(layer_of_file(&map_file_name(42)), Some(42));
        assert_eq!(layer_of_file(&data_file_name(42, 3)), Some(42));
        assert_eq!(layer_of_file("layer-000000000000002a.map.tmp"), None);
        assert_eq!(layer_of_file("catalog.log"), None);
    }
}
