//! Property test: per-snapshot space accounting (`Store::snapshot_usage`) against brute-force
//! counts over an independent model of the layer tree, over random histories of writes,
//! zeroing, snapshots, deletes (with and without checkpoints), clones, reverts, volume deletes,
//! merges and reopens; and what deleting a volume, a volume frozen in one of its snapshots, or any
//! set of snapshots and volumes at once frees (`Store::usage_of`, `Store::freed_by_deleting`).
//!
//! The model keeps, per layer, a map block -> Data | Zero and the parent link, and applies the
//! catalog's rules (garbage collection, which layers merge and where their data goes) by itself.
//! Usage is compared before merges run as well as after, so the accounting is checked against
//! pending merges too. Space is also checked physically: a storage wrapper counts the 4 KiB
//! pages held by the layers' data files, which must equal the model's data blocks; and with no
//! merge pending, deleting a snapshot must free exactly what its usage reported as exclusive.

use cairn_volume::storage::{Access, MemStorage, Storage, StorageFile};
use cairn_volume::{Allocation, Footprint, SnapshotId, SnapshotUsage, Store, StoreOptions, VolumeId, BLOCK_SIZE};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::sync::{Arc, Mutex};

const VOLUME_BLOCKS: u64 = 64;
const MAX_VOLUMES: usize = 5;

// Storage that counts the pages each file holds, so freed space is measured, not inferred.

type PageSet = Arc<Mutex<BTreeSet<u64>>>;

#[derive(Debug, Clone, Default)]
struct CountingStorage {
    inner: MemStorage,
    pages: Arc<Mutex<HashMap<String, PageSet>>>,
}

#[derive(Debug)]
struct CountingFile {
    inner: Arc<dyn StorageFile>,
    pages: PageSet,
}

/// Whether `name` is a layer's data segment (not its map journal or the catalog).
fn is_data_file(name: &str) -> bool {
    let Some((stem, ext)) = name.split_once('.') else {
        return false;
    };
    stem.starts_with("layer-") && ext.strip_prefix('d').is_some_and(|n| !n.is_empty() && n.parse::<u64>().is_ok())
}

impl CountingStorage {
    /// Pages (= blocks) held by all data files.
    fn data_pages(&self) -> u64 {
        let files = self.pages.lock().unwrap();
        files.iter().filter(|(name, _)| is_data_file(name)).map(|(_, p)| p.lock().unwrap().len() as u64).sum()
    }
}

impl Storage for CountingStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let inner = self.inner.open(name, create)?;
        let pages = self.pages.lock().unwrap().entry(name.to_string()).or_default().clone();
        Ok(Arc::new(CountingFile { inner, pages }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)?;
        self.pages.lock().unwrap().remove(name);
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to)?;
        let mut files = self.pages.lock().unwrap();
        let moved = files.remove(from).unwrap_or_default();
        files.insert(to.to_string(), moved);
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.inner.sync_dir()
    }

    fn lock_exclusive(&self) -> io::Result<()> {
        self.inner.lock_exclusive()
    }
}

impl StorageFile for CountingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        if !buf.is_empty() {
            let last = (offset + buf.len() as u64 - 1) / BLOCK_SIZE;
            self.pages.lock().unwrap().extend(offset / BLOCK_SIZE..=last);
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)?;
        // Only whole pages are freed; a partial page keeps its other bytes.
        let (first, end) = (offset.div_ceil(BLOCK_SIZE), (offset + len) / BLOCK_SIZE);
        let mut pages = self.pages.lock().unwrap();
        for p in first..end.max(first) {
            pages.remove(&p);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)?;
        self.pages.lock().unwrap().retain(|p| p * BLOCK_SIZE < len);
        Ok(())
    }

    fn set_access(&self, access: Access) {
        self.inner.set_access(access)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        self.inner.start_writeback(offset, len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Data,
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct MLayer {
    parent: Option<u64>,
    map: BTreeMap<u64, Block>,
    /// Merged away but kept for a checkpoint's change tracking: it holds no blocks.
    ghost: bool,
}

#[derive(Debug, Clone)]
struct MVolume {
    id: VolumeId,
    head: u64,
    size: u64,
}

#[derive(Debug, Clone)]
struct MSnapshot {
    id: SnapshotId,
    volume: VolumeId,
    layer: u64,
    size: u64,
}

#[derive(Debug, Clone)]
struct MCheckpoint {
    id: SnapshotId,
    layer: u64,
}

/// Expected usage in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expected {
    allocated: u64,
    exclusive: u64,
    /// Data blocks once every pending merge has run.
    stored: u64,
    absorbed_by: Option<SnapshotId>,
}

#[derive(Debug, Default, Clone)]
struct Model {
    layers: BTreeMap<u64, MLayer>,
    volumes: Vec<MVolume>,
    snapshots: Vec<MSnapshot>,
    checkpoints: Vec<MCheckpoint>,
    next_layer: u64,
}

fn data_blocks(map: &BTreeMap<u64, Block>) -> u64 {
    map.values().filter(|b| **b == Block::Data).count() as u64
}

impl Model {
    fn new_layer(&mut self, parent: Option<u64>) -> u64 {
        self.next_layer += 1;
        self.layers.insert(self.next_layer, MLayer { parent, map: BTreeMap::new(), ghost: false });
        self.next_layer
    }

    fn children(&self, layer: u64) -> Vec<u64> {
        self.layers.iter().filter(|(_, l)| l.parent == Some(layer)).map(|(id, _)| *id).collect()
    }

    fn is_head(&self, layer: u64) -> bool {
        self.volumes.iter().any(|v| v.head == layer)
    }

    fn has_snapshot(&self, layer: u64) -> bool {
        self.snapshots.iter().any(|s| s.layer == layer)
    }

    fn has_checkpoint(&self, layer: u64) -> bool {
        self.checkpoints.iter().any(|c| c.layer == layer)
    }

    /// `top` and the layers below it, top first, ghosts included.
    fn lineage(&self, top: u64) -> Vec<u64> {
        let mut out = vec![top];
        while let Some(p) = self.layers[out.last().unwrap()].parent {
            out.push(p);
        }
        out
    }

    /// The layer a layer's data lands in when it merges: its only child, or, through ghosts
    /// (which hold no data), the first real layer above.
    fn data_target(&self, layer: u64) -> Option<u64> {
        let mut children = self.children(layer);
        if children.len() != 1 {
            return None;
        }
        let mut target = children.pop().unwrap();
        while self.layers[&target].ghost {
            let above = self.children(target);
            if above.len() != 1 {
                return None;
            }
            target = above[0];
        }
        Some(target)
    }

    /// What deleting the snapshot on `layer` frees, counted block by block: with no child the
    /// layer goes entirely; with one, its data blocks that any layer its data passes through
    /// on the way up holds (as data or as zeros) are dropped, since those win, and the rest move
    /// up; with several (clones) it stays. The way up runs through deleted layers still waiting
    /// to merge, so the figure is what the delete frees once every merge has run.
    fn expected_usage(&self, layer: u64) -> Expected {
        let own = &self.layers[&layer].map;
        let allocated = data_blocks(own);
        let (path, absorbed_by) = self.landing(layer);
        let exclusive = match self.children(layer).len() {
            0 => allocated,
            1 => own
                .iter()
                .filter(|(b, st)| **st == Block::Data && path.iter().any(|l| self.layers[l].map.contains_key(b)))
                .count() as u64,
            _ => 0,
        };
        let mut settled = self.clone();
        settled.merge_all();
        let stored = data_blocks(&settled.layers[&layer].map);
        Expected { allocated, exclusive, stored, absorbed_by }
    }

    /// Where a deleted layer's data finally rests: the layers it passes through, from its
    /// merge target on through layers still waiting to merge, and the live snapshot on the
    /// last (none when that is a volume's head).
    fn landing(&self, layer: u64) -> (Vec<u64>, Option<SnapshotId>) {
        let mut path = Vec::new();
        let Some(mut at) = self.data_target(layer) else { return (path, None) };
        loop {
            path.push(at);
            if let Some(s) = self.snapshots.iter().find(|s| s.layer == at) {
                return (path, Some(s.id));
            }
            if self.is_head(at) {
                return (path, None);
            }
            match self.data_target(at) {
                Some(next) => at = next,
                None => return (path, None),
            }
        }
    }

    /// Data blocks over every layer: what the data files must hold.
    fn total_data(&self) -> u64 {
        self.layers.values().map(|l| data_blocks(&l.map)).sum()
    }

    /// What a read of `top`'s chain sees at each block.
    fn allocation(&self, top: u64, size: u64) -> Vec<Allocation> {
        let chain = self.lineage(top);
        (0..size.div_ceil(BLOCK_SIZE))
            .map(|b| match chain.iter().find_map(|l| self.layers[l].map.get(&b)) {
                Some(Block::Data) => Allocation::Data,
                Some(Block::Zero) => Allocation::Zero,
                None => Allocation::Hole,
            })
            .collect()
    }

    /// Drops layers nothing uses (no volume head, live snapshot or child), repeatedly, and the
    /// checkpoints on them.
    fn collect_garbage(&mut self) {
        loop {
            let unused: Vec<u64> = self
                .layers
                .keys()
                .copied()
                .filter(|id| !self.is_head(*id) && !self.has_snapshot(*id) && self.children(*id).is_empty())
                .collect();
            if unused.is_empty() {
                return;
            }
            for id in unused {
                self.layers.remove(&id);
            }
            let layers = &self.layers;
            self.checkpoints.retain(|c| layers.contains_key(&c.layer));
        }
    }

    /// One merge the engine may run, if any: a layer no volume or live snapshot uses, with a
    /// single child, and not a ghost that a checkpoint still needs.
    fn mergeable(&self) -> Option<u64> {
        self.layers.keys().copied().find(|id| {
            let needed_ghost = self.layers[id].ghost && self.has_checkpoint(*id);
            !self.is_head(*id) && !self.has_snapshot(*id) && self.children(*id).len() == 1 && !needed_ghost
        })
    }

    fn merge(&mut self, layer: u64) {
        let child = self.children(layer)[0];
        let rec = self.layers[&layer].clone();
        if !rec.ghost {
            let target = self.data_target(layer).expect("a ghost always has one child");
            let above = &mut self.layers.get_mut(&target).unwrap().map;
            // The newer layer's entries win; the rest move up.
            for (b, st) in rec.map {
                above.entry(b).or_insert(st);
            }
        }
        if self.has_checkpoint(layer) {
            let l = self.layers.get_mut(&layer).unwrap();
            l.ghost = true;
            l.map.clear();
        } else {
            self.layers.remove(&layer);
            self.layers.get_mut(&child).unwrap().parent = rec.parent;
        }
        self.collect_garbage();
    }

    /// Every pending merge. Merges commute, so the order does not matter.
    fn merge_all(&mut self) {
        while let Some(layer) = self.mergeable() {
            self.merge(layer);
        }
    }

    /// Data blocks once every pending merge has run.
    fn settled_data(&self) -> u64 {
        let mut settled = self.clone();
        settled.merge_all();
        settled.total_data()
    }

    /// What deleting these snapshots and volumes together frees, once every merge has run:
    /// the data held before less the data held after, both settled.
    fn expected_freed(&self, snapshots: &[SnapshotId], volumes: &[VolumeId]) -> u64 {
        let mut after = self.clone();
        after.snapshots.retain(|s| !snapshots.contains(&s.id));
        after.volumes.retain(|v| !volumes.contains(&v.id));
        after.collect_garbage();
        self.settled_data() - after.settled_data()
    }

    /// The footprint of the volume whose head is `top` (or of a golden image: a volume frozen in
    /// the snapshot on `top`, deleted with it), in blocks: data a read sees and what goes.
    fn expected_footprint(&self, top: u64, size: u64, snapshots: &[SnapshotId], volume: VolumeId) -> Footprint {
        let data = self.allocation(top, size).iter().filter(|a| **a == Allocation::Data).count() as u64;
        let exclusive = self.expected_freed(snapshots, &[volume]);
        let mut settled = self.clone();
        settled.merge_all();
        Footprint {
            logical_bytes: size,
            data_bytes: data * BLOCK_SIZE,
            stored_bytes: data_blocks(&settled.layers[&top].map) * BLOCK_SIZE,
            exclusive_bytes: exclusive * BLOCK_SIZE,
            shared_bytes: data.saturating_sub(exclusive) * BLOCK_SIZE,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Blocks `[block, block+blocks)`, less `head` bytes at the start and `tail` at the end.
    Write {
        vol: usize,
        block: u64,
        blocks: u64,
        head: u64,
        tail: u64,
    },
    Zero {
        vol: usize,
        block: u64,
        blocks: u64,
        head: u64,
        tail: u64,
        trim: bool,
    },
    Snapshot {
        vol: usize,
    },
    /// `settle`: merge everything first and after, and check the space freed.
    Delete {
        snap: usize,
        keep_checkpoint: bool,
        settle: bool,
    },
    ForgetCheckpoint {
        cp: usize,
    },
    Clone {
        snap: usize,
    },
    Revert {
        vol: usize,
        snap: usize,
    },
    DeleteVolume {
        vol: usize,
    },
    Grow {
        vol: usize,
        sectors: u64,
    },
    /// Deletes the snapshots picked by the bits of `mask`, and with `vol` a volume too, at
    /// once, after checking what the engine says that frees against the space it frees.
    DeleteMany {
        mask: u32,
        vol: Option<usize>,
    },
    Merge,
    Reopen,
}

fn misalign() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![3 => Just(0u64), 1 => 1u64..BLOCK_SIZE]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let idx = 0usize..16;
    let range = (0..VOLUME_BLOCKS, 1u64..24, misalign(), misalign());
    prop_oneof![
        10 => (idx.clone(), range.clone())
            .prop_map(|(vol, (block, blocks, head, tail))| Op::Write { vol, block, blocks, head, tail }),
        4 => (idx.clone(), range, any::<bool>()).prop_map(|(vol, (block, blocks, head, tail), trim)| Op::Zero {
            vol,
            block,
            blocks,
            head,
            tail,
            trim
        }),
        5 => idx.clone().prop_map(|vol| Op::Snapshot { vol }),
        4 => (idx.clone(), proptest::bool::weighted(0.4), any::<bool>())
            .prop_map(|(snap, keep_checkpoint, settle)| Op::Delete { snap, keep_checkpoint, settle }),
        1 => idx.clone().prop_map(|cp| Op::ForgetCheckpoint { cp }),
        2 => idx.clone().prop_map(|snap| Op::Clone { snap }),
        1 => (idx.clone(), idx.clone()).prop_map(|(vol, snap)| Op::Revert { vol, snap }),
        1 => idx.clone().prop_map(|vol| Op::DeleteVolume { vol }),
        1 => (idx.clone(), 1u64..20).prop_map(|(vol, sectors)| Op::Grow { vol, sectors }),
        2 => (any::<u32>(), proptest::option::of(idx)).prop_map(|(mask, vol)| Op::DeleteMany { mask, vol }),
        2 => Just(Op::Merge),
        1 => Just(Op::Reopen),
    ]
}

fn options() -> StoreOptions {
    // Merges run only when the test asks, so the state measured is the one the model holds.
    StoreOptions { background_merge: false, merge_bytes_per_sec: None, ..StoreOptions::default() }
}

struct Harness {
    storage: CountingStorage,
    store: Option<Store>,
    model: Model,
    names: u64,
}

impl Harness {
    fn new() -> Self {
        let storage = CountingStorage::default();
        let store = Store::open(Arc::new(storage.clone()), options()).unwrap();
        let mut h = Harness { storage, store: Some(store), model: Model::default(), names: 0 };
        let size = VOLUME_BLOCKS * BLOCK_SIZE;
        let id = h.store().create_volume("v", size).unwrap().id;
        let head = h.model.new_layer(None);
        h.model.volumes.push(MVolume { id, head, size });
        h
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn name(&mut self) -> String {
        self.names += 1;
        format!("n{}", self.names)
    }

    fn pick_volume(&self, i: usize) -> Option<usize> {
        (!self.model.volumes.is_empty()).then(|| i % self.model.volumes.len())
    }

    fn pick_snapshot(&self, i: usize) -> Option<usize> {
        (!self.model.snapshots.is_empty()).then(|| i % self.model.snapshots.len())
    }

    /// The byte range an op addresses on volume `v`: never empty, within the volume.
    fn byte_range(&self, v: usize, block: u64, blocks: u64, head: u64, tail: u64) -> (u64, u64) {
        let size = self.model.volumes[v].size;
        let first = block % size.div_ceil(BLOCK_SIZE);
        let start = (first * BLOCK_SIZE + head).min(size - 1);
        let end = ((first + blocks) * BLOCK_SIZE).saturating_sub(tail).min(size).max(start + 1);
        (start, end)
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { vol, block, blocks, head, tail } => {
                let Some(v) = self.pick_volume(vol) else { return };
                let (start, end) = self.byte_range(v, block, blocks, head, tail);
                let data = vec![0xa5u8; (end - start) as usize];
                self.store().volume(self.model.volumes[v].id).unwrap().write(&data, start, false).unwrap();
                // Any block the write touches, even partly, becomes the head's own data.
                let map = &mut self.model.layers.get_mut(&self.model.volumes[v].head).unwrap().map;
                for b in start / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE) {
                    map.insert(b, Block::Data);
                }
            }
            Op::Zero { vol, block, blocks, head, tail, trim } => {
                let Some(v) = self.pick_volume(vol) else { return };
                let (start, end) = self.byte_range(v, block, blocks, head, tail);
                let handle = self.store().volume(self.model.volumes[v].id).unwrap();
                if trim {
                    handle.trim(start, end - start, false).unwrap();
                } else {
                    handle.write_zeroes(start, end - start, false).unwrap();
                }
                // Whole blocks become zero blocks; a partly zeroed block must keep its other
                // bytes, so it is copied up as data.
                let map = &mut self.model.layers.get_mut(&self.model.volumes[v].head).unwrap().map;
                for b in start / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE) {
                    let whole = b * BLOCK_SIZE >= start && (b + 1) * BLOCK_SIZE <= end;
                    map.insert(b, if whole { Block::Zero } else { Block::Data });
                }
            }
            Op::Snapshot { vol } => {
                let Some(v) = self.pick_volume(vol) else { return };
                let name = self.name();
                let info = self.store().snapshot(self.model.volumes[v].id, &name).unwrap();
                let frozen = self.model.volumes[v].head;
                let head = self.model.new_layer(Some(frozen));
                let m = &mut self.model.volumes[v];
                m.head = head;
                assert_eq!(info.size, m.size);
                self.model.snapshots.push(MSnapshot { id: info.id, volume: m.id, layer: frozen, size: m.size });
            }
            Op::Delete { snap, keep_checkpoint, settle } => {
                let Some(s) = self.pick_snapshot(snap) else { return };
                if settle {
                    self.merge_all();
                    self.check();
                }
                let snap = self.model.snapshots[s].clone();
                let reported = self.store().snapshot_usage(snap.id).unwrap();
                let (pages_before, layers_before) = (self.storage.data_pages(), self.model.layers.clone());
                let target = self.model.data_target(snap.layer);
                self.store().delete_snapshot(snap.id, keep_checkpoint).unwrap();
                self.model.snapshots.remove(s);
                if keep_checkpoint {
                    self.model.checkpoints.push(MCheckpoint { id: snap.id, layer: snap.layer });
                }
                self.model.collect_garbage();
                if settle {
                    self.merge_all();
                    let freed = (pages_before - self.storage.data_pages()) * BLOCK_SIZE;
                    // Other layers change only if the delete unblocked further merges or
                    // garbage (a snapshot left without children whose parent goes with it).
                    let cascade = layers_before.iter().any(|(id, l)| {
                        *id != snap.layer && Some(*id) != target && self.model.layers.get(id) != Some(l)
                    });
                    if cascade {
                        assert!(freed >= reported.exclusive_bytes, "freed {freed}, reported {reported:?}");
                    } else {
                        assert_eq!(freed, reported.exclusive_bytes, "space freed by deleting {:?}", snap.id);
                    }
                }
            }
            Op::ForgetCheckpoint { cp } => {
                if self.model.checkpoints.is_empty() {
                    return;
                }
                let c = self.model.checkpoints.remove(cp % self.model.checkpoints.len());
                self.store().forget_checkpoint(c.id).unwrap();
                self.model.collect_garbage();
            }
            Op::Clone { snap } => {
                let Some(s) = self.pick_snapshot(snap) else { return };
                if self.model.volumes.len() >= MAX_VOLUMES {
                    return;
                }
                let snap = self.model.snapshots[s].clone();
                let name = self.name();
                let info = self.store().clone_snapshot(snap.id, &name, None).unwrap();
                let head = self.model.new_layer(Some(snap.layer));
                self.model.volumes.push(MVolume { id: info.id, head, size: snap.size });
            }
            Op::Revert { vol, snap } => {
                let (Some(v), Some(s)) = (self.pick_volume(vol), self.pick_snapshot(snap)) else { return };
                let snap = self.model.snapshots[s].clone();
                let allowed = self.model.lineage(self.model.volumes[v].head).contains(&snap.layer);
                let result = self.store().revert(self.model.volumes[v].id, snap.id);
                assert_eq!(result.is_ok(), allowed, "revert: {result:?}");
                if allowed {
                    let head = self.model.new_layer(Some(snap.layer));
                    let m = &mut self.model.volumes[v];
                    m.head = head;
                    m.size = snap.size;
                    self.model.collect_garbage();
                }
            }
            Op::DeleteVolume { vol } => {
                let Some(v) = self.pick_volume(vol) else { return };
                // Keep one, so that a history never runs out of things to do.
                if self.model.volumes.len() <= 1 {
                    return;
                }
                let m = self.model.volumes.remove(v);
                self.store().delete_volume(m.id).unwrap();
                self.model.collect_garbage();
            }
            Op::Grow { vol, sectors } => {
                let Some(v) = self.pick_volume(vol) else { return };
                let size = self.model.volumes[v].size + sectors * 512;
                self.store().grow(self.model.volumes[v].id, size).unwrap();
                self.model.volumes[v].size = size;
            }
            Op::DeleteMany { mask, vol } => {
                let snapshots: Vec<SnapshotId> = self
                    .model
                    .snapshots
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i < 32 && mask & (1 << i) != 0)
                    .map(|(_, s)| s.id)
                    .collect();
                let volume = vol.and_then(|v| self.pick_volume(v)).filter(|_| self.model.volumes.len() > 1);
                let volumes: Vec<VolumeId> = volume.map(|v| self.model.volumes[v].id).into_iter().collect();
                let reported = self.store().freed_by_deleting(&snapshots, &volumes).unwrap();
                assert_eq!(reported, self.model.expected_freed(&snapshots, &volumes) * BLOCK_SIZE, "freed by deleting");
                self.merge_all();
                let pages_before = self.storage.data_pages();
                for s in &snapshots {
                    self.store().delete_snapshot(*s, false).unwrap();
                }
                for v in &volumes {
                    self.store().delete_volume(*v).unwrap();
                }
                self.model.snapshots.retain(|s| !snapshots.contains(&s.id));
                self.model.volumes.retain(|v| !volumes.contains(&v.id));
                self.model.collect_garbage();
                self.merge_all();
                assert_eq!((pages_before - self.storage.data_pages()) * BLOCK_SIZE, reported, "space freed");
            }
            Op::Merge => self.merge_all(),
            Op::Reopen => {
                self.store.take().unwrap().close().unwrap();
                self.store = Some(Store::open(Arc::new(self.storage.clone()), options()).unwrap());
            }
        }
    }

    fn merge_all(&mut self) {
        self.store().wait_for_merges().unwrap();
        self.model.merge_all();
    }

    fn check(&self) {
        let store = self.store();
        assert_eq!(store.layer_count(), self.model.layers.len(), "layers kept");
        let listed: BTreeSet<SnapshotId> = store.list_snapshots(None).iter().map(|s| s.id).collect();
        let expected: BTreeSet<SnapshotId> = self.model.snapshots.iter().map(|s| s.id).collect();
        assert_eq!(listed, expected, "live snapshots");
        assert_eq!(self.storage.data_pages(), self.model.total_data(), "blocks held by data files");
        // The maps the usage is counted from must be the engine's: compare what reads see.
        for m in &self.model.volumes {
            let handle = store.volume(m.id).unwrap();
            let seen = per_block(&handle.allocation(0, m.size).unwrap(), m.size);
            assert_eq!(seen, self.model.allocation(m.head, m.size), "allocation of volume {:?}", m.id);
            let footprint = store.usage_of(m.id, None).unwrap();
            assert_eq!(footprint, self.model.expected_footprint(m.head, m.size, &[], m.id), "volume {:?}", m.id);
            for s in self.model.snapshots.iter().filter(|s| s.volume == m.id) {
                let golden = store.usage_of(m.id, Some(s.id)).unwrap();
                let want = self.model.expected_footprint(s.layer, s.size, &[s.id], m.id);
                assert_eq!(golden, want, "volume {:?} frozen in {:?}", m.id, s.id);
            }
        }
        for s in &self.model.snapshots {
            let view = store.open_snapshot(s.id).unwrap();
            let seen = per_block(&view.allocation(0, s.size).unwrap(), s.size);
            assert_eq!(seen, self.model.allocation(s.layer, s.size), "allocation of snapshot {:?}", s.id);
            let usage = store.snapshot_usage(s.id).unwrap();
            let e = self.model.expected_usage(s.layer);
            let want = SnapshotUsage {
                logical_bytes: s.size,
                allocated_bytes: e.allocated * BLOCK_SIZE,
                exclusive_bytes: e.exclusive * BLOCK_SIZE,
                shared_bytes: (e.allocated - e.exclusive) * BLOCK_SIZE,
                stored_bytes: e.stored * BLOCK_SIZE,
                absorbed_by: e.absorbed_by,
            };
            assert_eq!(usage, want, "usage of snapshot {:?}", s.id);
            assert_eq!(usage.exclusive_bytes + usage.shared_bytes, usage.allocated_bytes);
        }
    }
}

/// The kind of each block, from byte extents that tile `[0, size)`.
fn per_block(extents: &[cairn_volume::AllocExtent], size: u64) -> Vec<Allocation> {
    let mut out = Vec::new();
    let mut pos = 0;
    for e in extents {
        assert_eq!(e.offset, pos, "extents tile the range");
        pos += e.length;
        while (out.len() as u64) * BLOCK_SIZE < pos {
            out.push(e.kind);
        }
    }
    assert_eq!(pos, size);
    out
}

fn run(ops: &[Op]) {
    let mut h = Harness::new();
    h.check();
    for op in ops {
        h.apply(op);
        h.check();
    }
    h.merge_all();
    h.check();
    h.apply(&Op::Reopen);
    h.check();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn usage_matches_a_brute_force_count(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        run(&ops);
    }
}

/// Each branch of the accounting at least once, whatever proptest draws: a merge target that
/// holds some blocks as data and some as zeros, a target reached through a ghost, clones
/// sharing a layer, and a snapshot whose volume is gone.
#[test]
fn fixed_history_covers_every_case() {
    let w = |block, blocks| Op::Write { vol: 0, block, blocks, head: 0, tail: 0 };
    let z = |block, blocks| Op::Zero { vol: 0, block, blocks, head: 0, tail: 0, trim: false };
    run(&[
        w(0, 16),
        Op::Snapshot { vol: 0 }, // s0
        w(0, 4),
        z(4, 4),
        w(8, 1),
        Op::Zero { vol: 0, block: 9, blocks: 1, head: 100, tail: 0, trim: true },
        Op::Snapshot { vol: 0 }, // s1
        w(2, 4),
        Op::Snapshot { vol: 0 }, // s2
        // s1 keeps a checkpoint: once merged, its layer is a ghost between s0 and s2.
        Op::Delete { snap: 1, keep_checkpoint: true, settle: true },
        Op::Clone { snap: 1 }, // clone of s2: s2's layer gets two children
        Op::Write { vol: 1, block: 0, blocks: 2, head: 0, tail: 0 },
        Op::Snapshot { vol: 1 },                                      // s3, on the clone
        Op::Delete { snap: 1, keep_checkpoint: false, settle: true }, // s2: shared, frees nothing
        Op::DeleteVolume { vol: 1 },                                  // s3 now has no child
        Op::Delete { snap: 1, keep_checkpoint: false, settle: true },
        Op::ForgetCheckpoint { cp: 0 },
        Op::Merge,
        Op::Delete { snap: 0, keep_checkpoint: false, settle: true },
    ]);
}
