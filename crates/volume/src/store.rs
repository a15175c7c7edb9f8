//! The store: a directory of layers and a catalog, and the volumes and snapshots built on them.
//!
//! Lock order, outermost first: merger state → catalog → volume gate → volume regions →
//! volume view → layer journal → layer map. I/O never takes the catalog.
//! Writes take a volume's gate shared; snapshot, revert and delete take it exclusively,
//! which drains writes in flight so a snapshot is an exact point in time. Reads need no gate:
//! they hold the view's read lock throughout, and chain changes take its write lock.

use crate::blockmap::{BlockRun, BlockSet, BlockState, MapOp, BLOCK_SHIFT, BLOCK_SIZE, PAGE_BLOCKS};
use crate::buffer::PageBuffer;
use crate::catalog::{self, Catalog, Event, MergeTask, SnapshotEntry};
use crate::journal;
use crate::layer::{self, Layer, LayerKind};
use crate::storage::{DirStorage, Storage, StorageFile};
use crate::view::{self, AllocExtent, DepthExtent, ReadPart, ViewLock, ViewState, MAX_CHAIN};
use crate::Error;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The largest volume: 256 TiB.
pub const MAX_VOLUME_SIZE: u64 = 1 << 48;
/// Sizes are multiples of this.
pub const SECTOR_SIZE: u64 = 512;
const CATALOG_FILE: &str = "catalog.log";
/// Written by [`Store::close`] once everything is durable, removed by [`Store::open`]: its
/// absence at an open means the store was not closed cleanly (docs/format.md §2).
const CLEAN_CLOSE_FILE: &str = "clean-close";
/// The whole content of [`CLEAN_CLOSE_FILE`]: magic, version 1, four reserved zero bytes.
const CLEAN_CLOSE_MARK: [u8; 16] = *b"CAIRNCLS\x01\x00\x00\x00\x00\x00\x00\x00";
const REGION_SHIFT: u32 = 4;
const REGION_STRIPES: usize = 256;
/// Compact the catalog log on open once it holds this many events.
const CATALOG_COMPACT_FRAMES: u64 = 1000;
/// How long the background merge waits before retrying after an error.
const MERGE_RETRY: Duration = Duration::from_secs(1);
/// Unflushed map records above which a snapshot flushes the head before pausing writes.
const PRE_FLUSH_RECORDS: usize = 256;

/// Identifies a volume within a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub u64);

/// Identifies a snapshot within a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(pub u64);

/// How a store runs.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Merge deleted snapshots in a background thread. When off, call [`Store::merge_step`].
    pub background_merge: bool,
    /// Upper bound on the merge's copy rate, so it does not starve guest I/O.
    pub merge_bytes_per_sec: Option<u64>,
    /// log2 of the chunk size new layers place their data in (13 to 30: 8 KiB to 1 GiB).
    /// Layers keep the chunk size they were made with.
    pub chunk_shift: u32,
    /// A flush rewrites its head's map journal as the map once the journal is larger than this
    /// and than 4× its size after the last rewrite (default 8 MiB). The rewrite pauses the
    /// volume's I/O; tests make it small so that their workloads rewrite often.
    pub journal_compact_min: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            background_merge: true,
            merge_bytes_per_sec: Some(256 << 20),
            chunk_shift: journal::DEFAULT_CHUNK_SHIFT,
            journal_compact_min: 8 << 20,
        }
    }
}

/// A volume as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
    pub created_ms: u64,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub name: String,
    /// The volume it was taken of; it may have been deleted since.
    pub volume: VolumeId,
    pub size: u64,
    pub created_ms: u64,
}

/// Space a snapshot takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotUsage {
    /// The disk size at the snapshot.
    pub logical_bytes: u64,
    /// Data held by the snapshot's own layer.
    pub allocated_bytes: u64,
    /// What deleting the snapshot frees: its blocks that the layer above has overwritten.
    pub exclusive_bytes: u64,
    /// The rest of its data, which stays after a delete because newer state still reads it.
    pub shared_bytes: u64,
    /// The data its layer holds once the merges waiting now are done: its allocated bytes plus
    /// what snapshots deleted just before it bring up. What it stores, independent of when the
    /// background merge runs.
    pub stored_bytes: u64,
    /// The snapshot its shared data moves to when it is deleted (None: a volume's head, or
    /// nothing moves): that snapshot's stored bytes grow by this one's shared bytes.
    pub absorbed_by: Option<SnapshotId>,
}

/// What a volume, or a snapshot with its volume, takes (see [`Store::usage_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// The disk size.
    pub logical_bytes: u64,
    /// The data reading it finds, in whatever layer holds it.
    pub data_bytes: u64,
    /// What its own top layer holds once pending merges are done: for a volume, what it wrote
    /// since its last snapshot, which is what a snapshot taken now would store.
    pub stored_bytes: u64,
    /// What deleting it frees once the merges that starts are done.
    pub exclusive_bytes: u64,
    /// The rest of its data: what stays because other volumes or snapshots still read it.
    pub shared_bytes: u64,
}

/// The newer end of a change-tracking query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeTarget {
    /// A later snapshot.
    Snapshot(SnapshotId),
    /// A volume's current state.
    Volume(VolumeId),
}

/// A byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 255 || name.contains(['\0', '@', '/']) || name.trim() != name {
        return Err(Error::InvalidName(name.to_string()));
    }
    Ok(())
}

fn check_size(size: u64) -> Result<(), Error> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::InvalidSize { size, reason: "must be a positive multiple of 512 bytes" });
    }
    if size > MAX_VOLUME_SIZE {
        return Err(Error::InvalidSize { size, reason: "larger than 256 TiB" });
    }
    Ok(())
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<(), Error> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

struct CatalogFile {
    state: Catalog,
    file: Arc<dyn StorageFile>,
    end: u64,
    /// Events in the log, to know when to compact it.
    frames: u64,
    /// A write or sync of the log failed: whether that event reached the disk is unknown, so
    /// no further event may be appended until the store is reopened.
    failed: bool,
}

#[derive(Debug, Default)]
struct MergerState {
    stop: bool,
    /// Bumped whenever new merge work may exist.
    wakeups: u64,
    idle: bool,
    last_error: Option<String>,
}

struct StoreInner {
    storage: Arc<dyn Storage>,
    options: StoreOptions,
    catalog: Mutex<CatalogFile>,
    layers: Mutex<HashMap<u64, Arc<Layer>>>,
    volumes: RwLock<HashMap<u64, Arc<VolumeCore>>>,
    /// Bumped on every catalog change, so snapshot views notice a new chain.
    epoch: AtomicU64,
    merger: Mutex<MergerState>,
    merger_signal: Condvar,
}

impl std::fmt::Debug for StoreInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreInner").field("storage", &self.storage).finish_non_exhaustive()
    }
}

struct VolumeCore {
    id: u64,
    gate: RwLock<()>,
    regions: Box<[Mutex<()>]>,
    view: ViewLock,
    deleted: AtomicBool,
    /// Set by [`Store::close`]: changes and flushes fail from then on.
    closed: AtomicBool,
    /// Journal size of the head right after its last compaction.
    compacted_journal: AtomicU64,
    /// [`StoreOptions::journal_compact_min`].
    journal_compact_min: u64,
}

impl std::fmt::Debug for VolumeCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeCore").field("id", &self.id).finish_non_exhaustive()
    }
}

impl VolumeCore {
    fn new(id: u64, chain: Vec<Arc<Layer>>, size: u64, journal_compact_min: u64) -> Self {
        Self {
            id,
            gate: RwLock::new(()),
            regions: (0..REGION_STRIPES).map(|_| Mutex::new(())).collect(),
            view: ViewLock::new(ViewState::new(chain, size)),
            deleted: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            compacted_journal: AtomicU64::new(0),
            journal_compact_min,
        }
    }

    fn head(&self) -> Arc<Layer> {
        self.view.read().chain.last().expect("a volume has a head").clone()
    }

    fn size(&self) -> u64 {
        self.view.read().size
    }

    /// Locks the region stripes covering blocks `[first, end)` in a fixed order.
    fn lock_regions(&self, first: u64, end: u64) -> Vec<MutexGuard<'_, ()>> {
        let (r0, r1) = (first >> REGION_SHIFT, (end - 1) >> REGION_SHIFT);
        let mut stripes: Vec<usize> = if r1 - r0 + 1 >= REGION_STRIPES as u64 {
            (0..REGION_STRIPES).collect()
        } else {
            (r0..=r1).map(|r| (r % REGION_STRIPES as u64) as usize).collect()
        };
        stripes.sort_unstable();
        stripes.dedup();
        stripes.into_iter().map(|s| self.regions[s].lock().expect("region lock")).collect()
    }
}

/// A store of volumes and snapshots in one directory (or any [`Storage`]).
#[derive(Debug)]
pub struct Store {
    inner: Arc<StoreInner>,
    merger: Option<std::thread::JoinHandle<()>>,
}

impl Store {
    /// Opens (or creates) the store in directory `dir`.
    pub fn open_dir(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store, Error> {
        Self::open(Arc::new(DirStorage::new(dir)?), options)
    }

    /// Opens (or creates) a store on `storage`: replays the catalog, removes files of layers it
    /// no longer names, replays every layer's journal and resumes pending merges.
    pub fn open(storage: Arc<dyn Storage>, options: StoreOptions) -> Result<Store, Error> {
        if !journal::CHUNK_SHIFTS.contains(&options.chunk_shift) {
            return Err(Error::InvalidRequest(format!(
                "chunk shift {} is outside {}..={}",
                options.chunk_shift,
                journal::CHUNK_SHIFTS.start(),
                journal::CHUNK_SHIFTS.end()
            )));
        }
        storage.lock_exclusive()?;
        let files = storage.list()?;
        let catalog_len = storage.open(CATALOG_FILE, true)?.size()?;
        if catalog_len < catalog::HEADER_LEN as u64 && files.iter().any(|f| layer::layer_of_file(f).is_some()) {
            // Layers without a catalog: never treat this as a new store, which would delete them.
            return Err(Error::Corrupt {
                file: CATALOG_FILE.to_string(),
                reason: "missing or empty, but layer files exist".into(),
            });
        }
        let (file, replayed) = replay_catalog(&storage)?;
        // A layer the catalog does not name, that no replayed event dropped, and that holds
        // data: the events that made it were lost to damage. Its files are kept aside.
        let orphans: BTreeSet<u64> = files
            .iter()
            .filter_map(|f| layer::layer_of_file(f))
            .filter(|id| !replayed.catalog.layers.contains_key(id) && !replayed.dropped.contains(id))
            .collect();
        let mut lost = BTreeSet::new();
        for id in orphans {
            if layer_holds_data(&storage, id, &files)? {
                lost.insert(id);
            }
        }
        if let (0, Some(id)) = (replayed.frames, lost.first()) {
            // Only a store's very first volume can leave layer files behind a log without
            // events (a crash between creating its files and logging it), and those never held
            // data. Refused before the torn tail is cut off: nothing has changed yet.
            return Err(Error::Corrupt {
                file: CATALOG_FILE.to_string(),
                reason: format!("holds no events, but layer {id:016x} holds data"),
            });
        }
        let mut catalog = open_catalog(&storage, file, replayed)?;
        let lost_prefix = format!("lost-{}-", now_ms());
        for f in &files {
            match layer::layer_of_file(f) {
                Some(id) if lost.contains(&id) => storage.rename(f, &format!("{lost_prefix}{f}"))?,
                Some(id) if !catalog.state.layers.contains_key(&id) => storage.remove(f)?,
                Some(_) => {}
                None if f.ends_with(".tmp") => storage.remove(f)?,
                None => {}
            }
        }
        if catalog.frames >= CATALOG_COMPACT_FRAMES {
            // Only now: until the dropped layers' files are gone, the events that dropped them
            // must stay in the log. The compaction's directory sync makes the removals durable.
            catalog = write_compacted_catalog(&storage, catalog.state)?;
        }
        let heads: HashSet<u64> = catalog.state.volumes.values().map(|v| v.head).collect();
        let size_limit = catalog.state.largest_size();
        let mut layers = HashMap::new();
        for (id, rec) in &catalog.state.layers {
            let kind = match (rec.ghost, heads.contains(id)) {
                (true, _) => LayerKind::Ghost,
                (false, true) => LayerKind::Head,
                (false, false) => LayerKind::Frozen,
            };
            layers.insert(
                *id,
                Arc::new(Layer::open(storage.clone(), *id, kind, &files, options.chunk_shift, size_limit)?),
            );
        }
        let closed_cleanly = take_clean_close_mark(&storage, &files)?;
        // Files created before a crash may not have durable directory entries yet; flushes
        // after this open only sync the directory for files they create themselves. This sync
        // also makes the clean-close mark's removal durable before anything is written.
        storage.sync_dir()?;
        if !closed_cleanly {
            // Each head, and the layer below it: a snapshot that froze that layer may have its
            // event durable and the layer's last journal batch lost (its sync overlaps the
            // event's, or failed late), and with it the written marks of in-place writes.
            let state = &catalog.state;
            let below = |head: &u64| state.layers[head].parent.filter(|p| !state.layers[p].ghost);
            let marked: BTreeSet<u64> = heads.iter().flat_map(|h| std::iter::once(*h).chain(below(h))).collect();
            for id in &marked {
                mark_merged_blocks_changed(&layers[id])?;
            }
        }
        let mut volumes = HashMap::new();
        for (id, rec) in &catalog.state.volumes {
            let chain = catalog.state.read_chain(rec.head).iter().map(|l| layers[l].clone()).collect();
            volumes.insert(*id, Arc::new(VolumeCore::new(*id, chain, rec.size, options.journal_compact_min)));
        }
        let inner = Arc::new(StoreInner {
            storage,
            options: options.clone(),
            catalog: Mutex::new(catalog),
            layers: Mutex::new(layers),
            volumes: RwLock::new(volumes),
            epoch: AtomicU64::new(0),
            merger: Mutex::new(MergerState::default()),
            merger_signal: Condvar::new(),
        });
        let merger = if options.background_merge {
            let worker = inner.clone();
            Some(
                std::thread::Builder::new()
                    .name("cairn-merge".into())
                    .spawn(move || worker.run_merger())
                    .map_err(Error::Io)?,
            )
        } else {
            None
        };
        Ok(Store { inner, merger })
    }

    /// Stops the background merge (its progress is kept: it resumes on the next open),
    /// flushes every volume and marks the store closed cleanly. Volume handles kept past this
    /// still read, but their changes and flushes fail with [`Error::Closed`]. A store dropped
    /// without `close` counts as crashed at its next open.
    pub fn close(mut self) -> Result<(), Error> {
        self.stop_merger();
        let volumes: Vec<_> = self.inner.volumes.read().expect("volumes lock").values().cloned().collect();
        for v in volumes {
            {
                // Under the gate: a change in progress completes first and none starts after.
                let _gate = v.gate.write().expect("gate lock");
                v.closed.store(true, Ordering::SeqCst);
            }
            v.head().flush()?;
        }
        write_clean_close_mark(&self.inner.storage)?;
        Ok(())
    }

    fn stop_merger(&mut self) {
        if let Some(handle) = self.merger.take() {
            self.inner.merger.lock().expect("merger lock").stop = true;
            self.inner.merger_signal.notify_all();
            let _ = handle.join();
        }
    }

    /// Creates an empty (all-zero) thin volume.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, Error> {
        self.inner.create_volume(name, size, None)
    }

    /// Creates a volume whose initial content is a snapshot; usable at once, sharing the
    /// snapshot's layers. `size` (at least the snapshot's) defaults to the snapshot's size.
    pub fn clone_snapshot(&self, snapshot: SnapshotId, name: &str, size: Option<u64>) -> Result<VolumeInfo, Error> {
        let (layer, snap_size) = {
            let cat = self.inner.catalog();
            let snap = cat.state.live_snapshot(snapshot.0).ok_or_else(|| snap_not_found(snapshot))?;
            (snap.layer, snap.size)
        };
        let size = size.unwrap_or(snap_size);
        if size < snap_size {
            return Err(Error::InvalidSize { size, reason: "smaller than the snapshot" });
        }
        self.inner.create_volume(name, size, Some((snapshot, layer)))
    }

    /// A handle for I/O on a volume.
    pub fn volume(&self, id: VolumeId) -> Result<Volume, Error> {
        let core = self.inner.volume_core(id)?;
        Ok(Volume { core })
    }

    /// The id of the volume named `name`.
    pub fn volume_id(&self, name: &str) -> Result<VolumeId, Error> {
        self.inner
            .catalog()
            .state
            .volume_by_name(name)
            .map(VolumeId)
            .ok_or_else(|| Error::NotFound { kind: "volume", name: name.to_string() })
    }

    /// The id of the snapshot of `volume` named `name`.
    pub fn snapshot_id(&self, volume: VolumeId, name: &str) -> Result<SnapshotId, Error> {
        self.inner
            .catalog()
            .state
            .snapshot_by_name(volume.0, name)
            .map(SnapshotId)
            .ok_or_else(|| Error::NotFound { kind: "snapshot", name: name.to_string() })
    }

    /// All volumes, by id.
    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let cat = self.inner.catalog();
        cat.state
            .volumes
            .iter()
            .map(|(id, v)| VolumeInfo {
                id: VolumeId(*id),
                name: v.name.clone(),
                size: v.size,
                created_ms: v.created_ms,
            })
            .collect()
    }

    /// Snapshots (not checkpoints) taken of `volume`, or of every volume, oldest first.
    pub fn list_snapshots(&self, volume: Option<VolumeId>) -> Vec<SnapshotInfo> {
        let cat = self.inner.catalog();
        cat.state
            .snapshots
            .iter()
            .filter(|(_, s)| !s.checkpoint_only && volume.is_none_or(|v| v.0 == s.volume))
            .map(|(id, s)| snapshot_info(*id, s))
            .collect()
    }

    /// One live snapshot, looked up by id.
    pub fn snapshot_info(&self, snapshot: SnapshotId) -> Option<SnapshotInfo> {
        self.inner.catalog().state.live_snapshot(snapshot.0).map(|s| snapshot_info(snapshot.0, s))
    }

    /// Takes a snapshot of one volume.
    pub fn snapshot(&self, volume: VolumeId, name: &str) -> Result<SnapshotInfo, Error> {
        Ok(self.snapshot_group(&[(volume, name)])?.remove(0))
    }

    /// Snapshots several volumes at one instant: writes in flight on all of them complete,
    /// then all heads freeze together, in one catalog record.
    pub fn snapshot_group(&self, requests: &[(VolumeId, &str)]) -> Result<Vec<SnapshotInfo>, Error> {
        self.inner.snapshot_group(requests)
    }

    /// A read-only view of a snapshot.
    pub fn open_snapshot(&self, snapshot: SnapshotId) -> Result<SnapshotView, Error> {
        let view = self.inner.snapshot_view_state(snapshot)?;
        Ok(SnapshotView {
            store: self.inner.clone(),
            snapshot,
            view: ViewLock::new(view.0),
            epoch: AtomicU64::new(view.1),
        })
    }

    /// Makes the volume's content that of `snapshot` (one of its own, or the one it was cloned
    /// from), discarding everything written since. O(1): the head is replaced by an empty one.
    pub fn revert(&self, volume: VolumeId, snapshot: SnapshotId) -> Result<(), Error> {
        self.inner.revert(volume, snapshot)
    }

    /// Grows a volume; the new space reads as zeros.
    pub fn grow(&self, volume: VolumeId, new_size: u64) -> Result<(), Error> {
        self.inner.grow(volume, new_size)
    }

    /// Deletes a snapshot. Its layer merges into the layer above in the background; with
    /// `keep_checkpoint`, changed blocks can still be listed since it afterwards.
    pub fn delete_snapshot(&self, snapshot: SnapshotId, keep_checkpoint: bool) -> Result<(), Error> {
        let cat = self.inner.catalog();
        let found = cat.state.snapshots.get(&snapshot.0).is_some_and(|s| !s.checkpoint_only);
        if !found {
            return Err(snap_not_found(snapshot));
        }
        self.inner.commit(cat, Event::DeleteSnapshot { snapshot: snapshot.0, keep_checkpoint })?;
        self.inner.wake_merger();
        Ok(())
    }

    /// Forgets a checkpoint kept by [`Store::delete_snapshot`].
    pub fn forget_checkpoint(&self, snapshot: SnapshotId) -> Result<(), Error> {
        let cat = self.inner.catalog();
        if !cat.state.snapshots.get(&snapshot.0).is_some_and(|s| s.checkpoint_only) {
            return Err(Error::NotFound { kind: "checkpoint", name: snapshot.0.to_string() });
        }
        self.inner.commit(cat, Event::ForgetCheckpoint { snapshot: snapshot.0 })?;
        self.inner.wake_merger();
        Ok(())
    }

    /// Deletes a volume. Its snapshots stay; layers they or clones use stay.
    pub fn delete_volume(&self, volume: VolumeId) -> Result<(), Error> {
        self.inner.delete_volume(volume)
    }

    /// The blocks that differ between `since` (a snapshot, or a checkpoint of a deleted one)
    /// and `target`, as byte extents, found from change tracking without reading data.
    /// `since` must be an ancestor of the target.
    pub fn changed_extents(&self, since: SnapshotId, target: ChangeTarget) -> Result<Vec<Extent>, Error> {
        self.inner.changed_extents(since, target)
    }

    /// Space a snapshot takes and what deleting it would free.
    pub fn snapshot_usage(&self, snapshot: SnapshotId) -> Result<SnapshotUsage, Error> {
        self.inner.snapshot_usage(snapshot)
    }

    /// What deleting these snapshots and volumes together would free, in bytes, once the
    /// merges the deletes start are done. A set is not the sum of its parts: deleting two
    /// neighbouring snapshots frees the older one's blocks that the younger one overwrote, and
    /// a layer shared by a clone is freed only when the clone goes too.
    pub fn freed_by_deleting(&self, snapshots: &[SnapshotId], volumes: &[VolumeId]) -> Result<u64, Error> {
        self.inner.freed_by_deleting(snapshots, volumes)
    }

    /// A volume's footprint, or (with `snapshot`, one of its own) that of a golden image: a
    /// volume frozen in a snapshot, whose data is the snapshot's and which goes with it.
    pub fn usage_of(&self, volume: VolumeId, snapshot: Option<SnapshotId>) -> Result<Footprint, Error> {
        self.inner.usage_of(volume, snapshot)
    }

    /// Runs one merge task if there is one; returns whether it did.
    pub fn merge_step(&self) -> Result<bool, Error> {
        self.inner.merge_once()
    }

    /// Waits until the background merge has no work left. Returns its last error, if any.
    pub fn wait_for_merges(&self) -> Result<(), Error> {
        if self.merger.is_none() {
            while self.merge_step()? {}
            return Ok(());
        }
        let mut state = self.inner.merger.lock().expect("merger lock");
        loop {
            if let Some(e) = &state.last_error {
                return Err(Error::Merge(e.clone()));
            }
            if state.idle && self.inner.catalog().state.merge_tasks().is_empty() {
                return Ok(());
            }
            state = self.inner.merger_signal.wait(state).expect("merger lock");
        }
    }

    /// Number of layers (frozen, ghost and heads) the store holds.
    pub fn layer_count(&self) -> usize {
        self.inner.catalog().state.layers.len()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop_merger();
    }
}

/// Whether the store was closed cleanly: [`CLEAN_CLOSE_FILE`] exists and holds exactly
/// [`CLEAN_CLOSE_MARK`]. Removes the file either way; the caller syncs the directory before
/// anything is written, so that a crash from then on finds no mark.
fn take_clean_close_mark(storage: &Arc<dyn Storage>, files: &[String]) -> Result<bool, Error> {
    if !files.iter().any(|f| f == CLEAN_CLOSE_FILE) {
        return Ok(false);
    }
    let file = storage.open(CLEAN_CLOSE_FILE, false)?;
    let mut content = [0u8; CLEAN_CLOSE_MARK.len()];
    let clean =
        file.size()? == content.len() as u64 && file.read_at(&mut content, 0).is_ok() && content == CLEAN_CLOSE_MARK;
    drop(file);
    storage.remove(CLEAN_CLOSE_FILE)?;
    Ok(clean)
}

/// Written last by [`Store::close`]: the file, its sync, then the directory's.
fn write_clean_close_mark(storage: &Arc<dyn Storage>) -> Result<(), Error> {
    let file = storage.open(CLEAN_CLOSE_FILE, true)?;
    file.set_len(0)?;
    file.write_at(&CLEAN_CLOSE_MARK, 0)?;
    file.sync()?;
    storage.sync_dir()?;
    Ok(())
}

/// After a crash, the blocks a merge copied into a head (data not marked written) count as
/// changed since every checkpoint below it; so do those of the layer a snapshot froze last
/// (see the caller). A guest write lands on such a block in place, and its mark reaches the
/// journal only at the next flush: the process may have died with the new bytes on the disk
/// and the mark lost. Change tracking may list blocks that did not change, never miss one
/// that did; this lists at most what merges copied into `layer`.
fn mark_merged_blocks_changed(layer: &Layer) -> Result<(), Error> {
    let runs = layer.map().map.unwritten_data_runs();
    if runs.is_empty() {
        return Ok(());
    }
    layer.mark_written(runs);
    Ok(layer.flush()?)
}

fn snap_not_found(snapshot: SnapshotId) -> Error {
    Error::NotFound { kind: "snapshot", name: snapshot.0.to_string() }
}

/// Whether layer `id` holds data: a data segment, or a map journal longer than its header.
/// `files` are the store directory's files.
fn layer_holds_data(storage: &Arc<dyn Storage>, id: u64, files: &[String]) -> Result<bool, Error> {
    for f in files.iter().filter(|f| layer::layer_of_file(f) == Some(id)) {
        if !f.ends_with(".map") || storage.open(f, false)?.size()? > journal::HEADER_LEN as u64 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reads and replays the catalog, changing nothing.
fn replay_catalog(storage: &Arc<dyn Storage>) -> Result<(Arc<dyn StorageFile>, catalog::Replayed), Error> {
    let file = storage.open(CATALOG_FILE, true)?;
    let mut bytes = vec![0u8; file.size()? as usize];
    file.read_at(&mut bytes, 0)?;
    let replayed = catalog::replay(&bytes).map_err(|e| match e {
        catalog::CatalogError::UnsupportedVersion(_) => {
            Error::UnsupportedFormat { file: CATALOG_FILE.to_string(), reason: e.to_string() }
        }
        e => Error::Corrupt { file: CATALOG_FILE.to_string(), reason: e.to_string() },
    })?;
    Ok((file, replayed))
}

/// The catalog of a replayed log: its torn tail cut off, or a fresh log for a new store.
fn open_catalog(
    storage: &Arc<dyn Storage>,
    file: Arc<dyn StorageFile>,
    replayed: catalog::Replayed,
) -> Result<CatalogFile, Error> {
    if replayed.valid_len == 0 {
        return write_compacted_catalog(storage, replayed.catalog);
    }
    if replayed.valid_len < file.size()? {
        file.set_len(replayed.valid_len)?;
        file.sync()?;
    }
    Ok(CatalogFile { state: replayed.catalog, file, end: replayed.valid_len, frames: replayed.frames, failed: false })
}

/// Replaces the log with one holding the state as a single event, atomically (a new store
/// gets a log with just the header).
fn write_compacted_catalog(storage: &Arc<dyn Storage>, state: Catalog) -> Result<CatalogFile, Error> {
    let mut out = catalog::encode_header().to_vec();
    let frames = u64::from(state != Catalog::default());
    if frames > 0 {
        catalog::encode_frame(&Event::State { catalog: state.clone() }, &mut out);
    }
    let tmp = format!("{CATALOG_FILE}.tmp");
    let file = storage.open(&tmp, true)?;
    file.set_len(0)?;
    file.write_at(&out, 0)?;
    file.sync()?;
    storage.rename(&tmp, CATALOG_FILE)?;
    storage.sync_dir()?;
    Ok(CatalogFile { state, file, end: out.len() as u64, frames, failed: false })
}

impl StoreInner {
    fn catalog(&self) -> MutexGuard<'_, CatalogFile> {
        self.catalog.lock().expect("catalog lock")
    }

    /// Validates and applies an event, makes it durable, then removes the files of layers
    /// nothing uses any more. On error nothing changed.
    fn commit(&self, mut cat: MutexGuard<'_, CatalogFile>, event: Event) -> Result<(), Error> {
        self.commit_locked(&mut cat, event)
    }

    /// [`StoreInner::commit`] for callers that keep the catalog locked to read the result.
    fn commit_locked(&self, cat: &mut CatalogFile, event: Event) -> Result<(), Error> {
        if cat.failed {
            return Err(Error::Io(std::io::Error::other("an earlier catalog write failed; reopen the store")));
        }
        let mut next = cat.state.clone();
        let dropped = next.apply(&event)?;
        let mut frame = Vec::new();
        catalog::encode_frame(&event, &mut frame);
        let written = cat.file.write_at(&frame, cat.end).and_then(|()| cat.file.sync());
        if let Err(e) = written {
            self.fail_catalog(cat);
            return Err(e.into());
        }
        cat.end += frame.len() as u64;
        cat.frames += 1;
        cat.state = next;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        // The event is durable: from here on nothing may fail. Files that cannot be removed
        // now are orphans that the next open removes, as long as the log still holds this event
        // (after a compaction it does not, and such files are kept aside instead), so they go
        // before the log is compacted, whose directory sync makes their removal durable.
        let files = if dropped.is_empty() { Vec::new() } else { self.storage.list().unwrap_or_default() };
        {
            let mut layers = self.layers.lock().expect("layers lock");
            for id in dropped {
                layers.remove(&id);
                let _ = Layer::remove_files(self.storage.as_ref(), id, &files);
            }
        }
        if cat.frames >= CATALOG_COMPACT_FRAMES {
            // The event above is durable either way. If compaction fails midway the old log may
            // already be renamed away, so appending to it could lose events: stop until reopen.
            match write_compacted_catalog(&self.storage, cat.state.clone()) {
                Ok(compacted) => *cat = compacted,
                Err(_) => cat.failed = true,
            }
        }
        Ok(())
    }

    /// After a failed append, whether the event reached the disk is unknown, and one that did
    /// (a revert, a volume's deletion) would drop the writes that later flushes acknowledged
    /// into the old head. So the catalog refuses further events and every layer refuses writes
    /// and flushes until the store is reopened and replay settles it.
    fn fail_catalog(&self, cat: &mut CatalogFile) {
        cat.failed = true;
        for layer in self.layers.lock().expect("layers lock").values() {
            layer.poison();
        }
    }

    fn layer(&self, id: u64) -> Arc<Layer> {
        self.layers.lock().expect("layers lock")[&id].clone()
    }

    fn chain_layers(&self, cat: &Catalog, top: u64) -> Vec<Arc<Layer>> {
        let layers = self.layers.lock().expect("layers lock");
        cat.read_chain(top).iter().map(|id| layers[id].clone()).collect()
    }

    fn volume_core(&self, id: VolumeId) -> Result<Arc<VolumeCore>, Error> {
        self.volumes
            .read()
            .expect("volumes lock")
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::NotFound { kind: "volume", name: id.0.to_string() })
    }

    fn new_layer(&self, cat: &mut CatalogFile) -> Result<Arc<Layer>, Error> {
        let id = cat.state.allocate_id();
        Ok(Arc::new(Layer::create(self.storage.clone(), id, self.options.chunk_shift)?))
    }

    fn create_volume(&self, name: &str, size: u64, base: Option<(SnapshotId, u64)>) -> Result<VolumeInfo, Error> {
        check_name(name)?;
        check_size(size)?;
        let mut cat = self.catalog();
        if cat.state.volume_by_name(name).is_some() {
            return Err(Error::AlreadyExists { kind: "volume", name: name.to_string() });
        }
        if let Some((snapshot, layer)) = base {
            // Checked again under this lock: the snapshot may have been deleted meanwhile.
            if !cat.state.snapshots.get(&snapshot.0).is_some_and(|s| !s.checkpoint_only && s.layer == layer) {
                return Err(snap_not_found(snapshot));
            }
            // A layer whose last sync failed may not hold on the disk what it reads: a volume
            // on it would flush successfully over data that a power loss takes away.
            self.layer(layer).check_healthy()?;
        }
        let id = cat.state.allocate_id();
        let head = self.new_layer(&mut cat)?;
        let parent = base.map(|(_, layer)| layer);
        let created_ms = now_ms();
        let event =
            Event::CreateVolume { volume: id, name: name.to_string(), size, head: head.id(), parent, created_ms };
        self.layers.lock().expect("layers lock").insert(head.id(), head.clone());
        if let Err(e) = self.commit_locked(&mut cat, event) {
            self.layers.lock().expect("layers lock").remove(&head.id());
            return Err(e);
        }
        let chain = self.chain_layers(&cat.state, head.id());
        // Listed before the catalog is let go, so that a merge committing next updates its
        // chain like every other volume's.
        self.volumes
            .write()
            .expect("volumes lock")
            .insert(id, Arc::new(VolumeCore::new(id, chain, size, self.options.journal_compact_min)));
        drop(cat);
        Ok(VolumeInfo { id: VolumeId(id), name: name.to_string(), size, created_ms })
    }

    fn snapshot_group(&self, requests: &[(VolumeId, &str)]) -> Result<Vec<SnapshotInfo>, Error> {
        if requests.is_empty() {
            return Err(Error::InvalidRequest("a snapshot needs at least one volume".into()));
        }
        let mut cat = self.catalog();
        let mut cores = Vec::new();
        for (i, (volume, name)) in requests.iter().enumerate() {
            check_name(name)?;
            if requests[..i].iter().any(|(v, _)| v == volume) {
                return Err(Error::InvalidRequest(format!("volume {} appears twice", volume.0)));
            }
            if cat.state.snapshot_by_name(volume.0, name).is_some() {
                return Err(Error::AlreadyExists { kind: "snapshot", name: name.to_string() });
            }
            let core = self.volume_core(*volume)?;
            if core.view.read().chain.len() >= MAX_CHAIN {
                return Err(Error::InvalidRequest(format!("volume {} has too many layers", volume.0)));
            }
            cores.push(core);
        }
        // New heads are made before writes are paused, to keep the pause short.
        let mut entries = Vec::new();
        let mut new_heads = Vec::new();
        for (volume, name) in requests {
            let snapshot = cat.state.allocate_id();
            let head = self.new_layer(&mut cat)?;
            entries.push(SnapshotEntry { volume: volume.0, snapshot, name: name.to_string(), new_head: head.id() });
            new_heads.push(head);
        }
        // A head with many unflushed writes is flushed before writes pause, so the pause stays
        // short for a busy guest. With few, one flush under the gate is quicker overall.
        for core in &cores {
            let head = core.head();
            if head.pending_records() > PRE_FLUSH_RECORDS {
                head.flush()?;
            }
        }
        let mut order: Vec<usize> = (0..cores.len()).collect();
        order.sort_by_key(|i| cores[*i].id);
        let gates: Vec<_> = order.iter().map(|i| cores[*i].gate.write().expect("gate lock")).collect();
        let heads: Vec<Arc<Layer>> = cores.iter().map(|c| c.head()).collect();
        let created_ms = now_ms();
        let event = Event::Snapshot { entries: entries.clone(), created_ms };
        let prepared = (|| {
            let (last, others) = heads.split_last().expect("at least one volume");
            for head in others {
                head.flush()?;
            }
            self.layers.lock().expect("layers lock").extend(new_heads.iter().map(|h| (h.id(), h.clone())));
            // The catalog record is written after the last head's journal batch and synced
            // while that batch syncs: two syncs in the time of one. Should the batch's sync
            // fail after the record was made, the snapshot exists and the error is reported.
            let catalog: &mut CatalogFile = &mut cat;
            let (synced, committed) = last.flush_overlapped(|| self.commit_locked(catalog, event))?;
            committed.map(|()| synced.err())
        })();
        drop(cat);
        let late_error = match prepared {
            Ok(late_error) => late_error,
            Err(e) => {
                let mut layers = self.layers.lock().expect("layers lock");
                for h in &new_heads {
                    layers.remove(&h.id());
                    let _ = self.storage.remove(&layer::map_file_name(h.id()));
                }
                return Err(e);
            }
        };
        for old_head in &heads {
            old_head.freeze();
        }
        let mut infos = Vec::new();
        for (((core, head), old_head), entry) in cores.iter().zip(new_heads).zip(&heads).zip(&entries) {
            // A new head inherits its old head's poison: a sync of the old head that failed
            // after the event was durable (the late error) may have lost writes the guest
            // completed before, and a flush of the new head must not report them durable.
            if old_head.check_healthy().is_err() {
                head.poison();
            }
            let mut v = core.view.write();
            v.push_top(head);
            core.compacted_journal.store(0, Ordering::Relaxed);
            infos.push(SnapshotInfo {
                id: SnapshotId(entry.snapshot),
                name: entry.name.clone(),
                volume: VolumeId(entry.volume),
                size: v.size,
                created_ms,
            });
        }
        drop(gates);
        match late_error {
            Some(e) => Err(Error::Io(e)),
            None => Ok(infos),
        }
    }

    /// The view state of a snapshot and the epoch it was built at.
    fn snapshot_view_state(&self, snapshot: SnapshotId) -> Result<(ViewState, u64), Error> {
        let cat = self.catalog();
        let snap = cat.state.live_snapshot(snapshot.0).ok_or_else(|| snap_not_found(snapshot))?;
        let chain = self.chain_layers(&cat.state, snap.layer);
        Ok((ViewState::new(chain, snap.size), self.epoch.load(Ordering::SeqCst)))
    }

    fn revert(&self, volume: VolumeId, snapshot: SnapshotId) -> Result<(), Error> {
        let mut cat = self.catalog();
        let core = self.volume_core(volume)?;
        let snap = cat.state.live_snapshot(snapshot.0).ok_or_else(|| snap_not_found(snapshot))?;
        let Some(vol) = cat.state.volumes.get(&volume.0) else {
            return Err(Error::NotFound { kind: "volume", name: volume.0.to_string() });
        };
        if !cat.state.lineage(vol.head).contains(&snap.layer) {
            return Err(Error::InvalidRequest(format!(
                "snapshot {} is not in the history of volume {}",
                snapshot.0, volume.0
            )));
        }
        // As for a clone (see `create_volume`).
        self.layer(snap.layer).check_healthy()?;
        let head = self.new_layer(&mut cat)?;
        let gate = core.gate.write().expect("gate lock");
        self.layers.lock().expect("layers lock").insert(head.id(), head.clone());
        let event = Event::Revert { volume: volume.0, snapshot: snapshot.0, new_head: head.id() };
        if let Err(e) = self.commit_locked(&mut cat, event) {
            self.layers.lock().expect("layers lock").remove(&head.id());
            return Err(e);
        }
        let chain = self.chain_layers(&cat.state, head.id());
        let size = cat.state.volumes[&volume.0].size;
        // The new chain goes in before the catalog is let go: a merge committing in between
        // would otherwise rebuild this volume's chain from the head the revert just dropped.
        let mut v = core.view.write();
        v.set_chain(chain);
        v.size = size;
        core.compacted_journal.store(0, Ordering::Relaxed);
        drop(v);
        drop(cat);
        drop(gate);
        self.wake_merger();
        Ok(())
    }

    fn grow(&self, volume: VolumeId, new_size: u64) -> Result<(), Error> {
        check_size(new_size)?;
        let cat = self.catalog();
        let core = self.volume_core(volume)?;
        let size = core.size();
        if new_size < size {
            return Err(Error::InvalidSize { size: new_size, reason: "volumes can only grow" });
        }
        let _gate = core.gate.write().expect("gate lock");
        self.commit(cat, Event::Grow { volume: volume.0, size: new_size })?;
        core.view.write().size = new_size;
        Ok(())
    }

    fn delete_volume(&self, volume: VolumeId) -> Result<(), Error> {
        let mut cat = self.catalog();
        let core = self.volume_core(volume)?;
        let gate = core.gate.write().expect("gate lock");
        self.commit_locked(&mut cat, Event::DeleteVolume { volume: volume.0 })?;
        core.deleted.store(true, Ordering::SeqCst);
        // Unlisted before the catalog is let go: a merge committing next has no chain of this
        // volume to rebuild.
        self.volumes.write().expect("volumes lock").remove(&volume.0);
        drop(cat);
        drop(gate);
        self.wake_merger();
        Ok(())
    }

    fn changed_extents(&self, since: SnapshotId, target: ChangeTarget) -> Result<Vec<Extent>, Error> {
        let cat = self.catalog();
        let base = cat.state.snapshots.get(&since.0).ok_or_else(|| snap_not_found(since))?;
        let (top, size) = match target {
            ChangeTarget::Snapshot(s) => {
                let snap = cat.state.live_snapshot(s.0).ok_or_else(|| snap_not_found(s))?;
                (snap.layer, snap.size)
            }
            ChangeTarget::Volume(v) => {
                let vol = cat
                    .state
                    .volumes
                    .get(&v.0)
                    .ok_or_else(|| Error::NotFound { kind: "volume", name: v.0.to_string() })?;
                (vol.head, vol.size)
            }
        };
        let lineage = cat.state.lineage(top);
        let Some(depth) = lineage.iter().position(|l| *l == base.layer) else {
            return Err(Error::InvalidRequest(format!("snapshot {} is not an ancestor of the target", since.0)));
        };
        let mut set = BlockSet::new();
        let layers: Vec<Arc<Layer>> = lineage[..depth].iter().map(|id| self.layer(*id)).collect();
        drop(cat);
        for layer in &layers {
            set.add_written(&layer.map().map, 0, u64::MAX);
        }
        // A grown disk: blocks past the old size changed from "absent" to zeros, not data;
        // they read as zeros either way, so only written blocks count.
        let end_block = size.div_ceil(BLOCK_SIZE);
        Ok(set
            .runs(0, end_block)
            .into_iter()
            .map(|r| {
                let offset = r.start << BLOCK_SHIFT;
                Extent { offset, length: (r.end() << BLOCK_SHIFT).min(size) - offset }
            })
            .collect())
    }

    fn snapshot_usage(&self, snapshot: SnapshotId) -> Result<SnapshotUsage, Error> {
        let cat = self.catalog();
        let snap = cat.state.live_snapshot(snapshot.0).ok_or_else(|| snap_not_found(snapshot))?;
        // Deleting merges the layer into the nearest non-ghost layer above it, if it has just
        // one child: blocks that layer already holds are freed, the rest move up. With no child
        // everything is freed; with several (clones) nothing is.
        let mut children = cat.state.layers.iter().filter(|(_, l)| l.parent == Some(snap.layer)).map(|(id, _)| *id);
        let first_child = children.next();
        let children = first_child.map_or(0, |_| 1 + children.count());
        // A live snapshot's layer is neither a head nor a ghost, so once the snapshot goes it
        // merges into its only child's first holding layer. Nothing above it changes, so where
        // the data then lands is read off the catalog as it is, without a copy to delete from.
        let target = match (first_child, children) {
            (Some(child), 1) => cat.state.first_holding_layer(child),
            _ => None,
        };
        // Its data passes through layers still waiting to merge before it rests: a block any of
        // them maps is overwritten there, and freed in the end.
        let (above, absorbed_by) = match target {
            Some(t) => cat.state.landing(t),
            None => (Vec::new(), None),
        };
        let absorbed_by = absorbed_by.map(SnapshotId);
        let above: Vec<_> = above.into_iter().map(|id| self.layer(id)).collect();
        let settling = self.settling_layers(&cat.state, snap.layer);
        let layer = self.layer(snap.layer);
        let logical_bytes = snap.size;
        drop(cat);
        let stored = settled_data_blocks(&settling);
        let own = layer.map();
        let allocated = own.map.data_blocks();
        let exclusive = match children {
            0 => allocated,
            1 => {
                let above: Vec<_> = above.iter().map(|l| l.map()).collect();
                let mut n = 0u64;
                for page_no in own.map.page_numbers(0, u64::MAX) {
                    let Some(p) = own.map.page(page_no) else { continue };
                    let pages: Vec<_> = above.iter().filter_map(|m| m.map.page(page_no)).collect();
                    for w in 0..p.data_bits().len() {
                        let covered = pages.iter().fold(0u64, |c, a| c | a.data_bits()[w] | a.zero_bits()[w]);
                        n += u64::from((p.data_bits()[w] & covered).count_ones());
                    }
                }
                n
            }
            _ => 0,
        };
        Ok(SnapshotUsage {
            logical_bytes,
            allocated_bytes: allocated * BLOCK_SIZE,
            exclusive_bytes: exclusive * BLOCK_SIZE,
            shared_bytes: (allocated - exclusive) * BLOCK_SIZE,
            stored_bytes: stored * BLOCK_SIZE,
            absorbed_by,
        })
    }

    /// `top` and the layers merging into it: the data it holds once the merges waiting now
    /// are done. Taken under the catalog, since a merge may drop a layer once it is let go.
    fn settling_layers(&self, state: &Catalog, top: u64) -> Vec<Arc<Layer>> {
        state.settling_into(top).into_iter().map(|id| self.layer(id)).collect()
    }

    fn usage_of(&self, volume: VolumeId, snapshot: Option<SnapshotId>) -> Result<Footprint, Error> {
        // Everything is read in one hold of the catalog, so a delete can not come in between.
        let cat = self.catalog();
        let state = &cat.state;
        let vol = state
            .volumes
            .get(&volume.0)
            .ok_or_else(|| Error::NotFound { kind: "volume", name: volume.0.to_string() })?;
        let (top, logical_bytes) = match snapshot {
            None => (vol.head, vol.size),
            Some(s) => {
                let snap =
                    state.live_snapshot(s.0).filter(|r| r.volume == volume.0).ok_or_else(|| snap_not_found(s))?;
                (snap.layer, snap.size)
            }
        };
        let mut chain = self.chain_layers(state, top);
        chain.reverse(); // top first, as the count reads it
        let stack_ids = state.settling_into(top);
        let stack: Vec<_> = stack_ids.iter().map(|id| self.layer(*id)).collect();
        // Deleting a volume frees exactly its head's stack when the layer that stack rests on
        // keeps a live snapshot (or there is none); otherwise the delete may set that layer
        // merging (a clone's parent losing one of its two children), and only the general
        // count can tell.
        let lowest = *stack_ids.last().expect("a stack holds its top");
        let rests_on = state.lineage(lowest).into_iter().skip(1).find(|id| !state.layers[id].ghost);
        let frees_just_the_stack = snapshot.is_none() && rests_on.is_none_or(|id| state.has_live_snapshot(id));
        drop(cat);
        let data_bytes = settled_data_blocks(&chain) * BLOCK_SIZE;
        let stored_bytes = settled_data_blocks(&stack) * BLOCK_SIZE;
        let exclusive_bytes = match frees_just_the_stack {
            true => stored_bytes,
            false => self.freed_by_deleting(snapshot.as_slice(), &[volume])?,
        };
        Ok(Footprint {
            logical_bytes,
            data_bytes,
            stored_bytes,
            exclusive_bytes,
            shared_bytes: data_bytes.saturating_sub(exclusive_bytes),
        })
    }

    fn freed_by_deleting(&self, snapshots: &[SnapshotId], volumes: &[VolumeId]) -> Result<u64, Error> {
        let cat = self.catalog();
        let before = &cat.state;
        let mut after = before.clone();
        // The layers the deletes touch, and every layer below them: only their children
        // change, so only they can start merging or go.
        let mut touched = BTreeSet::new();
        for s in snapshots {
            let snap = before.live_snapshot(s.0).ok_or_else(|| snap_not_found(*s))?;
            touched.extend(before.lineage(snap.layer));
            after.apply(&Event::DeleteSnapshot { snapshot: s.0, keep_checkpoint: false })?;
        }
        for v in volumes {
            let vol =
                before.volumes.get(&v.0).ok_or_else(|| Error::NotFound { kind: "volume", name: v.0.to_string() })?;
            touched.extend(before.lineage(vol.head));
            after.apply(&Event::DeleteVolume { volume: v.0 })?;
        }
        // A layer's data at rest is its own with that of the layers merging into it. The
        // stacks that differ rest in a touched layer or where a touched layer's data lands.
        let mut resting = BTreeSet::new();
        for state in [before, &after] {
            for layer in touched.iter().filter(|id| state.layers.contains_key(id)) {
                resting.extend(state.landing(*layer).0);
            }
        }
        let stacks = |state: &Catalog| -> Vec<Vec<Arc<Layer>>> {
            resting
                .iter()
                // A ghost holds no data: what merges through it rests above.
                .filter(|id| state.layers.get(id).is_some_and(|l| !l.ghost) && state.merge_task_for(**id).is_none())
                .map(|id| self.settling_layers(state, *id))
                .collect()
        };
        let (was, will_be) = (stacks(before), stacks(&after));
        drop(cat);
        let count = |stacks: Vec<Vec<Arc<Layer>>>| -> u64 { stacks.iter().map(|s| settled_data_blocks(s)).sum() };
        Ok(count(was).saturating_sub(count(will_be)) * BLOCK_SIZE)
    }

    fn wake_merger(&self) {
        let mut state = self.merger.lock().expect("merger lock");
        state.wakeups += 1;
        state.idle = false;
        self.merger_signal.notify_all();
    }

    fn run_merger(&self) {
        let mut seen = u64::MAX;
        loop {
            {
                let mut state = self.merger.lock().expect("merger lock");
                loop {
                    if state.stop {
                        return;
                    }
                    if state.wakeups != seen {
                        seen = state.wakeups;
                        state.idle = false;
                        break;
                    }
                    state.idle = true;
                    self.merger_signal.notify_all();
                    state = self.merger_signal.wait(state).expect("merger lock");
                }
            }
            loop {
                if self.merger.lock().expect("merger lock").stop {
                    return;
                }
                match self.merge_once() {
                    Ok(true) => self.merger.lock().expect("merger lock").last_error = None,
                    Ok(false) => break,
                    Err(e) => {
                        let mut state = self.merger.lock().expect("merger lock");
                        state.last_error = Some(e.to_string());
                        self.merger_signal.notify_all();
                        // Retry later: the fault (a full disk, say) may clear.
                        let (state, _) = self.merger_signal.wait_timeout(state, MERGE_RETRY).expect("merger lock");
                        if state.stop {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Merges one deleted snapshot's layer into its only child: copies the blocks the child
    /// does not hold (readers see the same bytes from either layer), makes the child durable,
    /// then commits. A crash anywhere before the commit leaves the source intact; the merge
    /// restarts and skips blocks already copied.
    fn merge_once(&self) -> Result<bool, Error> {
        let (task, source, child, target) = {
            // The layers are looked up under the catalog lock, with the task: once it is let
            // go, a delete or revert may drop them (the commit below then finds the task gone).
            let cat = self.catalog();
            let Some(task) = cat.state.merge_tasks().first().copied() else {
                return Ok(false);
            };
            (task, self.layer(task.layer), self.layer(task.into), task.data_into.map(|id| self.layer(id)))
        };
        let MergeTask { layer, into, keep_tracking, .. } = task;
        if let Some(target) = target {
            let pages: Vec<u64> = source.map().map.page_numbers(0, u64::MAX).collect();
            let mut buf = PageBuffer::default();
            for page_no in pages {
                if self.merger.lock().expect("merger lock").stop {
                    return Ok(false); // Closing: the merge resumes at the next open.
                }
                let started = Instant::now();
                let copied = self.merge_page(&source, &target, page_no, &mut buf)?;
                self.throttle(copied, started);
            }
            target.flush()?;
        }
        if !keep_tracking {
            // The boundary between the two layers is forgotten: the child now also answers
            // for the blocks written while the source was a head.
            let runs = source.map().map.written_runs();
            child.mark_written(runs);
        }
        child.flush()?;
        let cat = self.catalog();
        if !cat.state.merge_tasks().contains(&task) {
            return Ok(true); // The layers changed meanwhile (a volume was deleted): redo.
        }
        self.commit(cat, Event::Merged { layer, into })?;
        let cat = self.catalog();
        if cat.state.layers.contains_key(&layer) {
            source.map_mut().map.keep_only_written();
            source.remove_data_files()?;
        }
        // Live volumes drop the merged layer from their chains.
        for core in self.volumes.read().expect("volumes lock").values() {
            let mut v = core.view.write();
            if v.chain.iter().any(|l| l.id() == layer) {
                let top = v.chain.last().expect("a volume has a head").id();
                v.set_chain(self.chain_layers(&cat.state, top));
            }
        }
        Ok(true)
    }

    /// Copies the blocks of one page the target does not hold. Returns bytes copied.
    fn merge_page(&self, source: &Layer, target: &Layer, page_no: u64, buf: &mut PageBuffer) -> Result<u64, Error> {
        let first = page_no * PAGE_BLOCKS;
        // If the target is a live head, writes to this page wait until the page is done.
        let core = {
            let cat = self.catalog();
            if !cat.state.layers.contains_key(&target.id()) {
                return Ok(0); // Deleted meanwhile: the commit will see the task is gone.
            }
            let id = cat.state.volumes.iter().find(|(_, v)| v.head == target.id()).map(|(id, _)| *id);
            id.and_then(|id| self.volumes.read().expect("volumes lock").get(&id).cloned())
        };
        let _gate = core.as_ref().map(|c| c.gate.read().expect("gate lock"));
        if core.as_ref().is_some_and(|c| c.deleted.load(Ordering::SeqCst) || c.head().id() != target.id()) {
            // A revert or delete dropped the head between the check and the gate: writing
            // would make its deleted files again. The commit will see the task is gone.
            return Ok(0);
        }
        let _regions = core.as_ref().map(|c| c.lock_regions(first, first + PAGE_BLOCKS));
        let Some(src) = source.map().map.page(page_no).cloned() else {
            return Ok(0);
        };
        let dst = target.map().map.page(page_no).cloned().unwrap_or_default();
        let mut copied = 0;
        for (state, src_bits) in [(BlockState::Data, src.data_bits()), (BlockState::Zero, src.zero_bits())] {
            let mut todo = [0u64; 8];
            for w in 0..8 {
                todo[w] = src_bits[w] & !(dst.data_bits()[w] | dst.zero_bits()[w]);
            }
            let mut runs = crate::blockmap::RunBuilder::default();
            crate::blockmap::push_bitmap_runs(&mut runs, first, &todo);
            for run in runs.finish() {
                if state == BlockState::Data {
                    let bytes = (run.count << BLOCK_SHIFT) as usize;
                    buf.resize(bytes);
                    source.read_data(&mut buf[..bytes], run.start << BLOCK_SHIFT)?;
                    target.write_data(&buf[..bytes], run.start << BLOCK_SHIFT)?;
                    copied += bytes as u64;
                }
                target.map_mut().apply(run, MapOp::Set { state, written: false });
            }
        }
        Ok(copied)
    }

    fn throttle(&self, bytes: u64, started: Instant) {
        let Some(rate) = self.options.merge_bytes_per_sec.filter(|r| *r > 0) else {
            return;
        };
        let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
        if let Some(rest) = due.checked_sub(started.elapsed()) {
            // Pacing, not synchronization: the merge yields bandwidth to guest I/O.
            std::thread::sleep(rest);
        }
    }
}

/// A handle for I/O on a live volume. Cheap to clone; usable from many threads.
#[derive(Debug, Clone)]
pub struct Volume {
    core: Arc<VolumeCore>,
}

impl Volume {
    /// The volume's id.
    pub fn id(&self) -> VolumeId {
        VolumeId(self.core.id)
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.core.size()
    }

    fn alive(&self) -> Result<(), Error> {
        if self.core.deleted.load(Ordering::SeqCst) {
            return Err(Error::NotFound { kind: "volume", name: self.core.id.to_string() });
        }
        Ok(())
    }

    /// [`Volume::alive`], and the store not closed: nothing may change after its clean-close
    /// mark is written.
    fn changeable(&self) -> Result<(), Error> {
        self.alive()?;
        if self.core.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        // No gate: the read holds the view's lock, which every change of the chain (snapshot,
        // revert, grow) takes too, so it sees the chain before or after such a change.
        self.alive()?;
        Ok(view::read(&self.core.view, buf, offset)?)
    }

    /// Where the bytes of `[offset, offset + len)` are, for moving them without a copy (see
    /// [`ReadPart`]). Reading the parts gives what [`Volume::read`] would have at this moment,
    /// or the bytes of writes made since, where those overlap.
    pub fn read_parts(&self, offset: u64, len: u64) -> Result<Vec<ReadPart>, Error> {
        self.alive()?;
        Ok(view::read_parts(&self.core.view, offset, len)?)
    }

    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        self.modify(offset, data.len() as u64, Some(data), fua)
    }

    /// Makes `[offset, offset+len)` read as zeros, freeing whole blocks.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        self.modify(offset, len, None, fua)
    }

    /// Discards `[offset, offset+len)`. It reads back as zeros, even where an older snapshot
    /// holds data.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        self.write_zeroes(offset, len, fua)
    }

    fn modify(&self, offset: u64, len: u64, data: Option<&[u8]>, fua: bool) -> Result<(), Error> {
        {
            let _gate = self.core.gate.read().expect("gate lock");
            self.changeable()?;
            check_range(offset, len, self.core.size())?;
            if len > 0 {
                self.modify_locked(offset, len, data)?;
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn modify_locked(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), Error> {
        let first = offset >> BLOCK_SHIFT;
        let end = (offset + len).div_ceil(BLOCK_SIZE);
        let _regions = self.core.lock_regions(first, end);
        let head = self.core.head();
        head.check_healthy()?;
        let size = self.core.size();
        // Whole blocks in the middle; partial blocks at either edge need their other bytes.
        let full_first = offset.div_ceil(BLOCK_SIZE);
        let full_end = ((offset + len) >> BLOCK_SHIFT).max(full_first);
        let mut edges = Vec::new();
        if first < full_first {
            edges.push(first);
        }
        if end > full_end && (edges.is_empty() || end - 1 != first) {
            edges.push(end - 1);
        }
        for block in edges {
            let b_start = block << BLOCK_SHIFT;
            let lo = offset.max(b_start);
            let hi = (offset + len).min(b_start + BLOCK_SIZE);
            let zeros;
            let part = match data {
                Some(d) => &d[(lo - offset) as usize..(hi - offset) as usize],
                None => {
                    zeros = vec![0u8; (hi - lo) as usize];
                    &zeros[..]
                }
            };
            if head.map().map.get(block) == Some(BlockState::Data) {
                head.write_data(part, lo)?;
            } else {
                // Copy up: the block's current bytes from below, overlaid with the new ones.
                let mut whole = vec![0u8; BLOCK_SIZE as usize];
                let valid = (size - b_start).min(BLOCK_SIZE) as usize;
                view::read(&self.core.view, &mut whole[..valid], b_start)?;
                whole[(lo - b_start) as usize..(hi - b_start) as usize].copy_from_slice(part);
                head.write_data(&whole, b_start)?;
            }
        }
        let mid = BlockRun { start: full_first, count: full_end - full_first };
        if mid.count > 0 {
            match data {
                Some(d) => {
                    let at = mid.start << BLOCK_SHIFT;
                    head.write_data(&d[(at - offset) as usize..((mid.end() << BLOCK_SHIFT) - offset) as usize], at)?
                }
                None => head.punch_blocks(mid)?,
            }
        }
        // Only now that the bytes are written do the map and the flattened view point at them.
        let mut v = self.core.view.write();
        let mut state = head.map_mut();
        let mut note = |run: BlockRun, zero: bool| {
            let st = if zero { BlockState::Zero } else { BlockState::Data };
            state.apply(run, MapOp::Set { state: st, written: true });
            v.note_top_write(run, zero);
        };
        if data.is_some() {
            note(BlockRun { start: first, count: end - first }, false);
        } else {
            for block in [first, end - 1] {
                if block < full_first || block >= full_end {
                    note(BlockRun { start: block, count: 1 }, false);
                }
            }
            if mid.count > 0 {
                note(mid, true);
            }
        }
        Ok(())
    }

    /// Makes every write completed before this call durable.
    pub fn flush(&self) -> Result<(), Error> {
        let head = {
            let _gate = self.core.gate.read().expect("gate lock");
            self.changeable()?;
            self.core.head()
        };
        head.flush()?;
        let compacted = self.core.compacted_journal.load(Ordering::Relaxed);
        if head.journal_len() > self.core.journal_compact_min.max(compacted * 4) {
            // Rare: pause I/O on this volume while the journal is rewritten as its map.
            let _gate = self.core.gate.write().expect("gate lock");
            // Not for a volume deleted meanwhile (its files are gone: a rewrite would put a
            // map back) or a store closed meanwhile (nothing is written after its mark).
            if Arc::ptr_eq(&head, &self.core.head()) && self.changeable().is_ok() {
                head.flush()?;
                head.compact_journal()?;
                self.core.compacted_journal.store(head.journal_len(), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Allocation of `[offset, offset+len)`: data, zero and hole extents in order.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<AllocExtent>, Error> {
        let _gate = self.core.gate.read().expect("gate lock");
        self.alive()?;
        check_range(offset, len, self.core.size())?;
        Ok(view::allocation(&self.core.view, offset, len))
    }

    /// Where in the chain `[offset, offset+len)` is held: depth 1 is the head, 2 the newest
    /// snapshot's layer, and so on; 0 is held by no layer.
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>, Error> {
        let _gate = self.core.gate.read().expect("gate lock");
        self.alive()?;
        check_range(offset, len, self.core.size())?;
        Ok(view::allocation_depth(&self.core.view, offset, len))
    }
}

/// A read-only view of a snapshot. It follows merges of other layers under it; reads fail
/// once the snapshot is deleted.
#[derive(Debug)]
pub struct SnapshotView {
    store: Arc<StoreInner>,
    snapshot: SnapshotId,
    view: ViewLock,
    epoch: AtomicU64,
}

impl SnapshotView {
    /// The snapshot's size.
    pub fn size(&self) -> u64 {
        self.view.read().size
    }

    /// Picks up a changed chain (a merge under the snapshot) or notices a delete.
    fn refresh(&self) -> Result<(), Error> {
        let now = self.store.epoch.load(Ordering::SeqCst);
        if self.epoch.load(Ordering::SeqCst) == now {
            return Ok(());
        }
        let (fresh, epoch) = self.store.snapshot_view_state(self.snapshot)?;
        let mut v = self.view.write();
        let same = v.chain.len() == fresh.chain.len()
            && v.chain.iter().zip(fresh.chain.iter()).all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            *v = fresh;
        }
        self.epoch.store(epoch, Ordering::SeqCst);
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.refresh()?;
        Ok(view::read(&self.view, buf, offset)?)
    }

    /// Where the bytes of `[offset, offset + len)` are, as [`Volume::read_parts`] says.
    pub fn read_parts(&self, offset: u64, len: u64) -> Result<Vec<ReadPart>, Error> {
        self.refresh()?;
        Ok(view::read_parts(&self.view, offset, len)?)
    }

    /// Allocation of `[offset, offset+len)`.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<AllocExtent>, Error> {
        self.refresh()?;
        check_range(offset, len, self.size())?;
        Ok(view::allocation(&self.view, offset, len))
    }

    /// Where in the snapshot's chain `[offset, offset+len)` is held: depth 1 is the snapshot's
    /// own layer; 0 is held by no layer.
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>, Error> {
        self.refresh()?;
        check_range(offset, len, self.size())?;
        Ok(view::allocation_depth(&self.view, offset, len))
    }
}

fn snapshot_info(id: u64, s: &crate::catalog::SnapshotRecord) -> SnapshotInfo {
    SnapshotInfo {
        id: SnapshotId(id),
        name: s.name.clone(),
        volume: VolumeId(s.volume),
        size: s.size,
        created_ms: s.created_ms,
    }
}

/// Data blocks of the content `stack` (top first) settles into: a block counts where the
/// topmost layer that maps it holds data, as a merge that lets the upper layer win leaves it.
fn settled_data_blocks(stack: &[Arc<Layer>]) -> u64 {
    let maps: Vec<_> = stack.iter().map(|layer| layer.map()).collect();
    let mut pages = std::collections::BTreeSet::new();
    for m in &maps {
        pages.extend(m.map.page_numbers(0, u64::MAX));
    }
    let mut n = 0u64;
    for page_no in pages {
        let layers: Vec<_> = maps.iter().filter_map(|m| m.map.page(page_no)).collect();
        let words = layers.first().map_or(0, |p| p.data_bits().len());
        for w in 0..words {
            let (mut covered, mut data) = (0u64, 0u64);
            for p in &layers {
                data |= p.data_bits()[w] & !covered;
                covered |= p.data_bits()[w] | p.zero_bits()[w];
            }
            n += u64::from(data.count_ones());
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Record, RecordOp};
    use crate::storage::MemStorage;

    /// A layer's journal that places a chunk past every volume and snapshot of the store, its
    /// checksum intact (crafted, or written by a bug), makes the store refuse to open instead
    /// of allocating for it; while a volume as large exists, it opens.
    #[test]
    fn a_placement_past_every_volume_is_refused() {
        let storage = MemStorage::new();
        let options = StoreOptions { chunk_shift: 21, ..StoreOptions::default() };
        let open = || Store::open(Arc::new(storage.clone()) as Arc<dyn Storage>, options.clone());
        let s = open().unwrap();
        let small = s.create_volume("small", 4 << 20).unwrap().id;
        let large = s.create_volume("large", 8 << 20).unwrap().id;
        s.volume(small).unwrap().write(&[1; 4096], 0, true).unwrap();
        let small_head = s.inner.catalog().state.volumes[&small.0].head;
        s.close().unwrap();
        // Chunk 3: inside the large volume, past the small one (chunks 0 and 1).
        let map = storage.open(&layer::map_file_name(small_head), false).unwrap();
        let mut batch = Vec::new();
        journal::encode_batch(&[Record { run: BlockRun { start: 3, count: 1 }, op: RecordOp::Place }], &mut batch);
        map.write_at(&batch, map.size().unwrap()).unwrap();
        let s = open().unwrap();
        s.delete_volume(large).unwrap();
        s.close().unwrap();
        let Err(err) = open() else { panic!("opened, though the placement is past the largest volume now") };
        let reason =
            "the placement at byte 96 needs 4 chunks, more than the 2 of the store's largest volume or snapshot";
        assert!(matches!(&err, Error::Corrupt { reason: r, .. } if r == reason), "{err}");
    }
}
