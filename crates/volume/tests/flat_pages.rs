//! Property test of reads through the flattened map on a volume of whole 2 MiB pages: writes
//! that fill pages in one layer (pages the view keeps as a single entry), small writes and
//! zeroes that split such pages, snapshots, reverts and reopens, against an in-memory model.
//! The main model test's volumes are smaller than one page, so they never make such pages.

use cairn_volume::storage::{MemStorage, Storage};
use cairn_volume::{Allocation, SnapshotId, Store, StoreOptions, VolumeId, BLOCK_SIZE};
use proptest::prelude::*;
use std::sync::Arc;

/// Blocks per page of the flattened map.
const PAGE: u64 = 512 * BLOCK_SIZE;
/// Three whole pages and a partial fourth.
const SIZE: u64 = 3 * PAGE + 2 * BLOCK_SIZE;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    /// Writes pages `[page, page + pages)` in 1 MiB requests, as a sequential writer does.
    Fill {
        page: u64,
        pages: u64,
        seed: u8,
    },
    Write {
        at: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        at: u64,
        len: u64,
    },
    Snapshot,
    Revert {
        snap: usize,
    },
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..4, 1u64..3, any::<u8>()).prop_map(|(page, pages, seed)| Op::Fill { page, pages, seed }),
        4 => (0..SIZE, 1u64..20_000, any::<u8>()).prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        2 => (0..SIZE, 1u64..3 * PAGE).prop_map(|(at, len)| Op::Zero { at, len }),
        2 => Just(Op::Snapshot),
        1 => (0usize..8).prop_map(|snap| Op::Revert { snap }),
        1 => Just(Op::Reopen),
    ]
}

fn pattern(seed: u8, at: u64, len: u64) -> Vec<u8> {
    (at..at + len).map(|i| (i / 4096) as u8 ^ (i as u8).rotate_left(3) ^ seed).collect()
}

struct Harness {
    storage: MemStorage,
    store: Option<Store>,
    id: VolumeId,
    content: Vec<u8>,
    /// What the allocation map must say of each block.
    blocks: Vec<Allocation>,
    snapshots: Vec<(SnapshotId, Vec<u8>, Vec<Allocation>)>,
    /// Indexes in `snapshots` of those in the volume's history: the ones it can revert to.
    history: Vec<usize>,
}

impl Harness {
    fn new() -> Self {
        let storage = MemStorage::new();
        let store = Store::open(Arc::new(storage.clone()) as Arc<dyn Storage>, StoreOptions::default()).unwrap();
        let id = store.create_volume("v", SIZE).unwrap().id;
        Harness {
            storage,
            store: Some(store),
            id,
            content: vec![0; SIZE as usize],
            blocks: vec![Allocation::Hole; (SIZE / BLOCK_SIZE) as usize],
            snapshots: Vec::new(),
            history: Vec::new(),
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn write(&mut self, at: u64, data: &[u8]) {
        self.store().volume(self.id).unwrap().write(data, at, false).unwrap();
        self.content[at as usize..at as usize + data.len()].copy_from_slice(data);
        let blocks = at / BLOCK_SIZE..(at + data.len() as u64).div_ceil(BLOCK_SIZE);
        self.blocks[blocks.start as usize..blocks.end as usize].fill(Allocation::Data);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Fill { page, pages, seed } => {
                let end = ((page + pages) * PAGE).min(SIZE);
                for at in (page * PAGE..end).step_by(MIB as usize) {
                    let len = MIB.min(end - at);
                    self.write(at, &pattern(seed, at, len));
                }
            }
            Op::Write { at, len, seed } => {
                let len = len.min(SIZE - at);
                self.write(at, &pattern(seed, at, len));
            }
            Op::Zero { at, len } => {
                let len = len.min(SIZE - at);
                self.store().volume(self.id).unwrap().write_zeroes(at, len, false).unwrap();
                self.content[at as usize..(at + len) as usize].fill(0);
                // Whole blocks read as zero; the rest of a partial block is kept as data.
                let (first, end) = (at / BLOCK_SIZE, (at + len).div_ceil(BLOCK_SIZE));
                let (whole_first, whole_end) = (at.div_ceil(BLOCK_SIZE), (at + len) / BLOCK_SIZE);
                for block in first..end {
                    let whole = block >= whole_first && block < whole_end;
                    self.blocks[block as usize] = if whole { Allocation::Zero } else { Allocation::Data };
                }
            }
            Op::Snapshot => {
                let name = format!("s{}", self.snapshots.len());
                let snap = self.store().snapshot(self.id, &name).unwrap().id;
                self.history.push(self.snapshots.len());
                self.snapshots.push((snap, self.content.clone(), self.blocks.clone()));
            }
            Op::Revert { snap } => {
                if !self.history.is_empty() {
                    // Snapshots taken after the one reverted to leave the history.
                    self.history.truncate(snap % self.history.len() + 1);
                    let (id, content, blocks) = self.snapshots[*self.history.last().unwrap()].clone();
                    self.store().revert(self.id, id).unwrap();
                    self.content = content;
                    self.blocks = blocks;
                }
            }
            Op::Reopen => {
                self.store.take().unwrap().close().unwrap();
                let storage = Arc::new(self.storage.clone()) as Arc<dyn Storage>;
                self.store = Some(Store::open(storage, StoreOptions::default()).unwrap());
            }
        }
    }

    /// Reads inside one page (the path that uses a page's single entry), across pages and
    /// over the whole volume, and compares each with the model.
    fn check(&self) {
        let volume = self.store().volume(self.id).unwrap();
        let read = |at: u64, len: u64| {
            let mut buf = vec![0u8; len as usize];
            volume.read(&mut buf, at).unwrap();
            assert!(buf == self.content[at as usize..(at + len) as usize], "{len} bytes at {at} differ from the model");
        };
        for page in 0..SIZE.div_ceil(PAGE) {
            let start = page * PAGE;
            read(start, BLOCK_SIZE);
            read((start + PAGE / 2 - 100).min(SIZE - 300), 300);
            read((start + PAGE - BLOCK_SIZE).min(SIZE - BLOCK_SIZE), BLOCK_SIZE);
            if start + PAGE < SIZE {
                read(start + PAGE - 1000, 2000);
            }
        }
        read(0, SIZE);
        // The allocation map, block by block: of the whole volume (its cached uniform pages are
        // one extent each) and of a range inside one page.
        let check_allocation = |at: u64, len: u64| {
            let mut found = Vec::new();
            for e in volume.allocation(at, len).unwrap() {
                assert!(e.offset % BLOCK_SIZE == 0 && e.length % BLOCK_SIZE == 0, "{e:?}");
                found.extend(std::iter::repeat_n(e.kind, (e.length / BLOCK_SIZE) as usize));
            }
            let expected = &self.blocks[(at / BLOCK_SIZE) as usize..((at + len) / BLOCK_SIZE) as usize];
            assert!(found == expected, "allocation of {len} bytes at {at} differs from the model");
        };
        check_allocation(0, SIZE);
        check_allocation(PAGE + 5 * BLOCK_SIZE, 40 * BLOCK_SIZE);
    }

    fn check_snapshots(&self) {
        for (id, content, _) in &self.snapshots {
            let view = self.store().open_snapshot(*id).unwrap();
            let mut buf = vec![0u8; SIZE as usize];
            view.read(&mut buf, 0).unwrap();
            assert!(buf == *content, "snapshot {id:?} differs from the model");
            let mut block = vec![0u8; BLOCK_SIZE as usize];
            view.read(&mut block, PAGE + BLOCK_SIZE).unwrap();
            assert!(block[..] == content[(PAGE + BLOCK_SIZE) as usize..(PAGE + 2 * BLOCK_SIZE) as usize]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn reads_through_whole_and_split_pages_match_the_model(ops in proptest::collection::vec(op_strategy(), 1..30)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
            h.check();
        }
        h.check_snapshots();
    }
}
