//! Property test: random sequences of volume operations against an in-memory reference model,
//! comparing every byte of every volume and snapshot, change tracking and allocation maps.
//! Runs on `MemStorage`, whose power loss drops all or a random part of what was not synced,
//! so the durability contract is checked here too: after a power loss each byte is either its
//! value at the last flush or the value of a write made after it.

mod common;

use cairn_volume::storage::{MemStorage, Storage};
use cairn_volume::{Allocation, ChangeTarget, ReadPart, SnapshotId, Store, StoreOptions, VolumeId, BLOCK_SIZE};
use common::blocks;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Op {
    Write { vol: usize, at: u64, len: u64, seed: u8, fua: bool },
    Zero { vol: usize, at: u64, len: u64 },
    Flush { vol: usize },
    Snapshot { vol: usize },
    GroupSnapshot,
    Clone { snap: usize },
    Revert { vol: usize, snap: usize },
    DeleteSnapshot { snap: usize, keep_checkpoint: bool },
    ForgetCheckpoint { snap: usize },
    DeleteVolume { vol: usize },
    Grow { vol: usize, sectors: u64 },
    MergeStep,
    Reopen,
    PowerLoss { keep: Option<u64> },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let idx = 0usize..8;
    prop_oneof![
        8 => (idx.clone(), any::<u64>(), 1u64..20_000, any::<u8>(), proptest::bool::weighted(0.1))
            .prop_map(|(vol, at, len, seed, fua)| Op::Write { vol, at, len, seed, fua }),
        2 => (idx.clone(), any::<u64>(), 1u64..40_000).prop_map(|(vol, at, len)| Op::Zero { vol, at, len }),
        2 => idx.clone().prop_map(|vol| Op::Flush { vol }),
        3 => idx.clone().prop_map(|vol| Op::Snapshot { vol }),
        1 => Just(Op::GroupSnapshot),
        1 => idx.clone().prop_map(|snap| Op::Clone { snap }),
        1 => (idx.clone(), idx.clone()).prop_map(|(vol, snap)| Op::Revert { vol, snap }),
        2 => (idx.clone(), any::<bool>()).prop_map(|(snap, keep_checkpoint)| Op::DeleteSnapshot { snap, keep_checkpoint }),
        1 => idx.clone().prop_map(|snap| Op::ForgetCheckpoint { snap }),
        1 => idx.clone().prop_map(|vol| Op::DeleteVolume { vol }),
        1 => (idx.clone(), 1u64..40).prop_map(|(vol, sectors)| Op::Grow { vol, sectors }),
        2 => Just(Op::MergeStep),
        1 => Just(Op::Reopen),
        // A seed keeps a part of what was not synced, chosen by it; `None` keeps nothing.
        1 => proptest::option::of(any::<u64>()).prop_map(|keep| Op::PowerLoss { keep }),
    ]
}

/// Which blocks were touched since each snapshot (or checkpoint) in a state's history.
type TouchedSince = BTreeMap<SnapshotId, BTreeSet<u64>>;

#[derive(Debug, Clone)]
struct ModelVolume {
    id: VolumeId,
    name: String,
    content: Vec<u8>,
    /// Content as of the last flush.
    durable: Vec<u8>,
    /// Writes since the last flush: (offset, bytes). Any of them may survive a power loss.
    unflushed: Vec<(u64, Vec<u8>)>,
    touched: TouchedSince,
}

#[derive(Debug, Clone)]
struct ModelSnapshot {
    id: SnapshotId,
    volume: VolumeId,
    content: Vec<u8>,
    touched: TouchedSince,
}

struct Harness {
    storage: MemStorage,
    store: Option<Store>,
    volumes: Vec<ModelVolume>,
    snapshots: Vec<ModelSnapshot>,
    /// Checkpoints and the content of the snapshot each was.
    checkpoints: Vec<(SnapshotId, Vec<u8>)>,
    counter: u64,
}

fn options() -> StoreOptions {
    // 8 KiB chunks: the small volumes here span many, so the order in which chunks are placed
    // (and replayed after a power loss) is exercised, not only the first chunk.
    StoreOptions { background_merge: false, merge_bytes_per_sec: None, chunk_shift: 13, journal_compact_min: 128 }
}

fn pattern(seed: u8, at: u64, len: u64) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(((at + i) * 7 % 251) as u8) | 1).collect()
}

/// After a crash the store counts the blocks merges copied into a head, or into the layer
/// below it, as changed since the checkpoints below: a lost write may have landed on them.
/// Which blocks those are depends on when merges ran, so since a checkpoint any block may be
/// listed from then on; that every block that differs from the checkpoint is listed is still
/// checked. Since live snapshots nothing changes: a merged block there was written after the
/// snapshot anyway.
fn widen_since_checkpoints(touched: &mut TouchedSince, live: &BTreeSet<SnapshotId>, len: usize) {
    for (since, set) in touched.iter_mut() {
        if !live.contains(since) {
            set.extend(blocks(0, len as u64));
        }
    }
}

impl Harness {
    fn new() -> Self {
        let storage = MemStorage::new();
        let store = Store::open(Arc::new(storage.clone()) as Arc<dyn Storage>, options()).unwrap();
        let mut h = Harness {
            storage,
            store: Some(store),
            volumes: Vec::new(),
            snapshots: Vec::new(),
            checkpoints: Vec::new(),
            counter: 0,
        };
        // One 4 KiB-aligned size and one that ends mid-block.
        h.create("a", 96 * 1024);
        h.create("b", 37 * 512 * 3);
        h
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn create(&mut self, name: &str, size: u64) {
        let info = self.store().create_volume(name, size).unwrap();
        let zeros = vec![0u8; size as usize];
        self.volumes.push(ModelVolume {
            id: info.id,
            name: name.into(),
            content: zeros.clone(),
            durable: zeros,
            unflushed: Vec::new(),
            touched: TouchedSince::new(),
        });
    }

    fn next_name(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}", self.counter)
    }

    fn touch(&mut self, v: usize, at: u64, len: u64) {
        for set in self.volumes[v].touched.values_mut() {
            set.extend(blocks(at, len));
        }
    }

    fn snapshot_model(&mut self, v: usize, id: SnapshotId) {
        let vol = &mut self.volumes[v];
        // A snapshot flushes the volume first.
        vol.durable = vol.content.clone();
        vol.unflushed.clear();
        self.snapshots.push(ModelSnapshot {
            id,
            volume: vol.id,
            content: vol.content.clone(),
            touched: vol.touched.clone(),
        });
        vol.touched.insert(id, BTreeSet::new());
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { vol, at, len, seed, fua } => {
                let Some(v) = self.pick_volume(vol) else {
                    return;
                };
                let size = self.volumes[v].content.len() as u64;
                let at = at % size;
                let len = len.min(size - at);
                let data = pattern(seed, at, len);
                let handle = self.store().volume(self.volumes[v].id).unwrap();
                handle.write(&data, at, fua).unwrap();
                let m = &mut self.volumes[v];
                m.content[at as usize..(at + len) as usize].copy_from_slice(&data);
                m.unflushed.push((at, data));
                if fua {
                    m.durable = m.content.clone();
                    m.unflushed.clear();
                }
                self.touch(v, at, len);
            }
            Op::Zero { vol, at, len } => {
                let Some(v) = self.pick_volume(vol) else {
                    return;
                };
                let size = self.volumes[v].content.len() as u64;
                let at = at % size;
                let len = len.min(size - at);
                self.store().volume(self.volumes[v].id).unwrap().write_zeroes(at, len, false).unwrap();
                let m = &mut self.volumes[v];
                m.content[at as usize..(at + len) as usize].fill(0);
                m.unflushed.push((at, vec![0; len as usize]));
                self.touch(v, at, len);
            }
            Op::Flush { vol } => {
                let Some(v) = self.pick_volume(vol) else {
                    return;
                };
                self.store().volume(self.volumes[v].id).unwrap().flush().unwrap();
                let m = &mut self.volumes[v];
                m.durable = m.content.clone();
                m.unflushed.clear();
            }
            Op::Snapshot { vol } => {
                let Some(v) = self.pick_volume(vol) else {
                    return;
                };
                let name = self.next_name("s");
                let info = self.store().snapshot(self.volumes[v].id, &name).unwrap();
                assert_eq!(info.size, self.volumes[v].content.len() as u64);
                self.snapshot_model(v, info.id);
            }
            Op::GroupSnapshot => {
                let name = self.next_name("g");
                let requests: Vec<(VolumeId, &str)> = self.volumes.iter().map(|v| (v.id, name.as_str())).collect();
                if requests.is_empty() {
                    return;
                }
                let infos = self.store().snapshot_group(&requests).unwrap();
                for (v, info) in infos.into_iter().enumerate() {
                    self.snapshot_model(v, info.id);
                }
            }
            Op::Clone { snap } => {
                let Some(s) = self.pick_snapshot(snap) else {
                    return;
                };
                if self.volumes.len() >= 6 {
                    return;
                }
                let name = self.next_name("c");
                let snap = self.snapshots[s].clone();
                let info = self.store().clone_snapshot(snap.id, &name, None).unwrap();
                let mut touched = snap.touched.clone();
                touched.insert(snap.id, BTreeSet::new());
                self.volumes.push(ModelVolume {
                    id: info.id,
                    name,
                    content: snap.content.clone(),
                    durable: snap.content.clone(),
                    unflushed: Vec::new(),
                    touched,
                });
            }
            Op::Revert { vol, snap } => {
                let Some(v) = self.pick_volume(vol) else {
                    return;
                };
                let Some(s) = self.pick_snapshot(snap) else {
                    return;
                };
                let snap = self.snapshots[s].clone();
                let result = self.store().revert(self.volumes[v].id, snap.id);
                // Allowed exactly when the snapshot is in the volume's history.
                let in_history = self.volumes[v].touched.contains_key(&snap.id);
                assert_eq!(result.is_ok(), in_history, "revert {result:?}");
                if in_history {
                    let m = &mut self.volumes[v];
                    m.content = snap.content.clone();
                    m.durable = snap.content.clone();
                    m.unflushed.clear();
                    m.touched = snap.touched.clone();
                    m.touched.insert(snap.id, BTreeSet::new());
                }
            }
            Op::DeleteSnapshot { snap, keep_checkpoint } => {
                let Some(s) = self.pick_snapshot(snap) else {
                    return;
                };
                let snap = self.snapshots.remove(s);
                self.store().delete_snapshot(snap.id, keep_checkpoint).unwrap();
                if keep_checkpoint {
                    self.checkpoints.push((snap.id, snap.content));
                } else {
                    self.forget(snap.id);
                }
            }
            Op::ForgetCheckpoint { snap } => {
                if self.checkpoints.is_empty() {
                    return;
                }
                let (id, _) = self.checkpoints.remove(snap % self.checkpoints.len());
                // A checkpoint whose layers all went (its volume and clones deleted) is gone.
                let known = self.volumes.iter().any(|v| v.touched.contains_key(&id))
                    || self.snapshots.iter().any(|s| s.touched.contains_key(&id));
                let result = self.store().forget_checkpoint(id);
                assert_eq!(result.is_ok(), known, "forget {result:?}");
                self.forget(id);
            }
            Op::DeleteVolume { vol } => {
                let Some(v) = self.pick_volume(vol) else {
                    return;
                };
                if self.volumes.len() <= 1 {
                    return;
                }
                let m = self.volumes.remove(v);
                self.store().delete_volume(m.id).unwrap();
                assert!(self.store().volume(m.id).is_err());
                let still_known = |id: &SnapshotId, h: &Harness| {
                    h.volumes.iter().any(|v| v.touched.contains_key(id))
                        || h.snapshots.iter().any(|s| s.touched.contains_key(id))
                };
                let gone: Vec<SnapshotId> =
                    self.checkpoints.iter().map(|(c, _)| *c).filter(|c| !still_known(c, self)).collect();
                self.checkpoints.retain(|(c, _)| !gone.contains(c));
            }
            Op::Grow { vol, sectors } => {
                let Some(v) = self.pick_volume(vol) else {
                    return;
                };
                let new_size = self.volumes[v].content.len() as u64 + sectors * 512;
                self.store().grow(self.volumes[v].id, new_size).unwrap();
                let m = &mut self.volumes[v];
                m.content.resize(new_size as usize, 0);
                m.durable.resize(new_size as usize, 0);
            }
            Op::MergeStep => {
                self.store().merge_step().unwrap();
            }
            Op::Reopen => {
                self.store.take().unwrap().close().unwrap();
                self.store = Some(Store::open(Arc::new(self.storage.clone()), options()).unwrap());
                for m in &mut self.volumes {
                    m.durable = m.content.clone();
                    m.unflushed.clear();
                }
            }
            Op::PowerLoss { keep } => {
                drop(self.store.take());
                self.storage.power_loss_keeping(keep);
                self.store = Some(Store::open(Arc::new(self.storage.clone()), options()).unwrap());
                self.check_power_loss();
            }
        }
    }

    /// Every byte is its flushed value or one written since; the model adopts what survived.
    fn check_power_loss(&mut self) {
        let store = self.store.take().unwrap();
        let live: BTreeSet<SnapshotId> = self.snapshots.iter().map(|s| s.id).collect();
        for m in &mut self.volumes {
            let mut actual = vec![0u8; m.content.len()];
            store.volume(m.id).unwrap().read(&mut actual, 0).unwrap();
            common::assert_survived(&actual, &m.durable, &m.unflushed, &format!("volume {}", m.name));
            widen_since_checkpoints(&mut m.touched, &live, actual.len());
            m.content = actual.clone();
            m.durable = actual;
            m.unflushed.clear();
        }
        for s in &mut self.snapshots {
            widen_since_checkpoints(&mut s.touched, &live, s.content.len());
        }
        self.store = Some(store);
    }

    fn forget(&mut self, id: SnapshotId) {
        for v in &mut self.volumes {
            v.touched.remove(&id);
        }
        for s in &mut self.snapshots {
            s.touched.remove(&id);
        }
    }

    fn pick_volume(&self, i: usize) -> Option<usize> {
        (!self.volumes.is_empty()).then(|| i % self.volumes.len())
    }

    fn pick_snapshot(&self, i: usize) -> Option<usize> {
        (!self.snapshots.is_empty()).then(|| i % self.snapshots.len())
    }

    fn check(&self) {
        let store = self.store();
        for m in &self.volumes {
            let handle = store.volume(m.id).unwrap();
            assert_eq!(handle.size(), m.content.len() as u64);
            let mut actual = vec![0u8; m.content.len()];
            handle.read(&mut actual, 0).unwrap();
            assert!(actual == m.content, "volume {} differs from the model", m.name);
            check_read_parts(|offset, len| handle.read_parts(offset, len).unwrap(), &m.content);
            check_allocation(&handle.allocation(0, handle.size()).unwrap(), &m.content);
            for (since, touched) in &m.touched {
                self.check_changes(*since, ChangeTarget::Volume(m.id), &m.content, touched);
            }
        }
        let listed: BTreeSet<SnapshotId> = store.list_snapshots(None).iter().map(|s| s.id).collect();
        let expected: BTreeSet<SnapshotId> = self.snapshots.iter().map(|s| s.id).collect();
        assert_eq!(listed, expected);
        for s in &self.snapshots {
            let view = store.open_snapshot(s.id).unwrap();
            let mut actual = vec![0u8; s.content.len()];
            view.read(&mut actual, 0).unwrap();
            assert!(actual == s.content, "snapshot {:?} differs from the model", s.id);
            check_read_parts(|offset, len| view.read_parts(offset, len).unwrap(), &s.content);
            check_allocation(&view.allocation(0, view.size()).unwrap(), &s.content);
            for (since, touched) in &s.touched {
                self.check_changes(*since, ChangeTarget::Snapshot(s.id), &s.content, touched);
            }
            let usage = store.snapshot_usage(s.id).unwrap();
            assert_eq!(usage.exclusive_bytes + usage.shared_bytes, usage.allocated_bytes);
            let _ = s.volume;
        }
    }

    /// Change tracking lists every block that differs and nothing that was not touched.
    fn check_changes(&self, since: SnapshotId, target: ChangeTarget, content: &[u8], touched: &BTreeSet<u64>) {
        let live = self.snapshots.iter().find(|s| s.id == since).map(|s| &s.content);
        let base = live.or_else(|| self.checkpoints.iter().find(|(c, _)| *c == since).map(|(_, content)| content));
        let extents = self.store().changed_extents(since, target).unwrap();
        let mut changed = BTreeSet::new();
        for e in &extents {
            assert!(e.offset + e.length <= content.len() as u64);
            changed.extend(blocks(e.offset, e.length));
        }
        assert!(changed.is_subset(touched), "changed blocks {changed:?} not all touched ({touched:?})");
        if let Some(base) = base {
            for b in 0..(content.len() as u64).div_ceil(BLOCK_SIZE) {
                let lo = (b * BLOCK_SIZE) as usize;
                let hi = (lo + BLOCK_SIZE as usize).min(content.len());
                let old = if lo < base.len() { &base[lo..hi.min(base.len())] } else { &[][..] };
                let differs =
                    old != &content[lo..lo + old.len()] || content[lo + old.len()..hi].iter().any(|x| *x != 0);
                assert!(!differs || changed.contains(&b), "block {b} changed since {since:?} but is not listed");
            }
        }
    }
}

/// The parts of the whole disk, and of an unaligned range inside it, gather into its bytes.
fn check_read_parts(read_parts: impl Fn(u64, u64) -> Vec<ReadPart>, content: &[u8]) {
    let len = content.len() as u64;
    for (offset, end) in [(0, len), (len / 3 + 1, (2 * len / 3 + 7).min(len))] {
        let mut gathered = Vec::new();
        for part in read_parts(offset, end - offset) {
            match part {
                ReadPart::Zeros(n) => gathered.resize(gathered.len() + n as usize, 0),
                ReadPart::File { file, offset, len } => {
                    let start = gathered.len();
                    gathered.resize(start + len as usize, 0);
                    file.read_at(&mut gathered[start..], offset).unwrap();
                }
            }
        }
        assert!(gathered == content[offset as usize..end as usize], "read parts of {offset}..{end} differ");
    }
}

/// Extents tile the volume in order, and holes and zero extents read as zeros.
fn check_allocation(extents: &[cairn_volume::AllocExtent], content: &[u8]) {
    let mut pos = 0u64;
    for e in extents {
        assert_eq!(e.offset, pos, "extents are contiguous");
        assert!(e.length > 0);
        if e.kind != Allocation::Data {
            let range = e.offset as usize..(e.offset + e.length) as usize;
            assert!(content[range].iter().all(|b| *b == 0), "{e:?} is not zero");
        }
        pos += e.length;
    }
    assert_eq!(pos, content.len() as u64);
}

fn run(ops: &[Op]) {
    let mut h = Harness::new();
    for op in ops {
        h.apply(op);
        h.check();
    }
    h.store().wait_for_merges().unwrap();
    h.check();
    h.apply(&Op::Reopen);
    h.check();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn volumes_match_the_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        run(&ops);
    }
}

/// A fixed long history, so a regression shows up even without proptest's luck.
#[test]
fn long_fixed_history() {
    let mut ops = Vec::new();
    for i in 0..300u64 {
        let vol = (i % 3) as usize;
        ops.push(match i % 11 {
            0 => Op::Snapshot { vol },
            3 => Op::DeleteSnapshot { snap: i as usize, keep_checkpoint: i % 2 == 0 },
            5 => Op::MergeStep,
            7 => Op::Zero { vol, at: i * 997, len: 9000 },
            8 if i % 4 == 0 => Op::Clone { snap: i as usize },
            9 if i % 5 == 0 => Op::PowerLoss { keep: (i % 2 == 0).then_some(i) },
            10 if i % 7 == 0 => Op::Revert { vol, snap: i as usize },
            _ => Op::Write { vol, at: i * 7919, len: 1 + i * 131 % 20000, seed: i as u8, fua: false },
        });
    }
    run(&ops);
}
