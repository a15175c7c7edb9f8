//! Edge cases on a real directory: unaligned I/O, the end of the volume, bad input, huge thin
//! volumes, concurrency, and snapshots that are an exact point in time under load.

use cairn_volume::storage::{Access, FaultyStorage, MemStorage, Storage};
use cairn_volume::{Allocation, Error, SnapshotId, Store, StoreOptions, BLOCK_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};

fn store(dir: &tempfile::TempDir) -> Store {
    Store::open_dir(dir.path(), StoreOptions::default()).unwrap()
}

#[test]
fn unaligned_io_across_blocks_and_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let size = 5 * BLOCK_SIZE + 1536; // ends mid-block
    let id = s.create_volume("v", size).unwrap().id;
    let v = s.volume(id).unwrap();
    let mut model = vec![0u8; size as usize];
    let writes: [(u64, usize); 6] =
        [(100, 9000), (4095, 2), (0, 1), (size - 7, 7), (3 * BLOCK_SIZE - 3, 5000), (8192, 4096)];
    for (i, (at, len)) in writes.iter().enumerate() {
        let data: Vec<u8> = (0..*len).map(|k| (i * 31 + k) as u8 | 0x80).collect();
        v.write(&data, *at, false).unwrap();
        model[*at as usize..*at as usize + len].copy_from_slice(&data);
    }
    s.snapshot(id, "s").unwrap();
    // Partial writes over a frozen lower block copy it up without losing its other bytes.
    v.write(b"xy", 4097, false).unwrap();
    model[4097..4099].copy_from_slice(b"xy");
    v.write_zeroes(10, 5000, false).unwrap();
    model[10..5010].fill(0);
    let mut all = vec![0u8; size as usize];
    v.read(&mut all, 0).unwrap();
    assert_eq!(all, model);
    let mut tail = [0u8; 7];
    v.read(&mut tail, size - 7).unwrap();
    assert_eq!(&tail[..], &model[(size - 7) as usize..]);
    // Zero-length I/O is a no-op anywhere in range, including at the very end.
    v.write(&[], size, false).unwrap();
    v.read(&mut [], size).unwrap();
    assert!(matches!(v.read(&mut [0u8; 1], size), Err(Error::OutOfRange { .. })));
    assert!(matches!(v.write(&[1u8; 2], size - 1, false), Err(Error::OutOfRange { .. })));
    assert!(matches!(v.write_zeroes(u64::MAX, 2, false), Err(Error::OutOfRange { .. })));
    // Growing exposes zeros past the old end, also within the old last block.
    s.grow(id, size + 8192).unwrap();
    let mut grown = vec![1u8; 8192 + 7];
    v.read(&mut grown, size - 7).unwrap();
    assert_eq!(&grown[..7], &model[(size - 7) as usize..]);
    assert!(grown[7..].iter().all(|b| *b == 0));
}

#[test]
fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    assert!(matches!(s.create_volume("v", 0), Err(Error::InvalidSize { .. })));
    assert!(matches!(s.create_volume("v", 1000), Err(Error::InvalidSize { .. })));
    assert!(matches!(s.create_volume("v", 1 << 60), Err(Error::InvalidSize { .. })));
    assert!(matches!(s.create_volume("a@b", 4096), Err(Error::InvalidName(_))));
    assert!(matches!(s.create_volume("", 4096), Err(Error::InvalidName(_))));
    let a = s.create_volume("a", 1 << 20).unwrap().id;
    let b = s.create_volume("b", 1 << 20).unwrap().id;
    assert!(matches!(s.create_volume("a", 4096), Err(Error::AlreadyExists { .. })));
    let snap = s.snapshot(a, "s").unwrap().id;
    assert!(matches!(s.snapshot(a, "s"), Err(Error::AlreadyExists { .. })));
    s.snapshot(b, "s").unwrap();
    assert!(matches!(s.revert(b, snap), Err(Error::InvalidRequest(_))), "not b's snapshot");
    assert!(matches!(s.clone_snapshot(snap, "c", Some(4096)), Err(Error::InvalidSize { .. })));
    assert!(matches!(s.grow(a, 4096), Err(Error::InvalidSize { .. })));
    assert!(matches!(s.snapshot_group(&[(a, "g"), (a, "h")]), Err(Error::InvalidRequest(_))));
    assert!(matches!(s.snapshot_group(&[]), Err(Error::InvalidRequest(_))));
    s.delete_volume(b).unwrap();
    assert!(matches!(s.volume(b), Err(Error::NotFound { .. })));
    assert!(matches!(s.delete_snapshot(cairn_volume::SnapshotId(9999), false), Err(Error::NotFound { .. })));
    // The snapshots of a deleted volume stay until deleted themselves.
    assert_eq!(s.list_snapshots(Some(b)).len(), 1);
    assert_eq!(s.volume_id("a").unwrap(), a);
    assert_eq!(s.snapshot_id(a, "s").unwrap(), snap);
}

#[test]
fn a_second_process_cannot_open_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let _s = store(&dir);
    let err = Store::open_dir(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn sixteen_tib_volume_is_thin() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let size = 16u64 << 40;
    let id = s.create_volume("big", size).unwrap().id;
    let v = s.volume(id).unwrap();
    v.write(b"first", 0, false).unwrap();
    v.write(b"last!", size - 5, true).unwrap();
    s.snapshot(id, "s").unwrap();
    v.write(b"LAST!", size - 5, true).unwrap();
    drop(v);
    s.close().unwrap();
    let s = store(&dir);
    let v = s.volume(id).unwrap();
    let mut buf = [0u8; 5];
    v.read(&mut buf, size - 5).unwrap();
    assert_eq!(&buf, b"LAST!");
    let snap = s.open_snapshot(s.snapshot_id(id, "s").unwrap()).unwrap();
    snap.read(&mut buf, size - 5).unwrap();
    assert_eq!(&buf, b"last!");
    let alloc = v.allocation(0, size).unwrap();
    assert_eq!(alloc.iter().filter(|e| e.kind == Allocation::Data).map(|e| e.length).sum::<u64>(), 2 * BLOCK_SIZE);
    let used: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| std::os::unix::fs::MetadataExt::blocks(&e.unwrap().metadata().unwrap()) * 512)
        .sum();
    assert!(used < 1 << 20, "a 16 TiB volume with two blocks written uses {used} bytes");
}

#[test]
fn concurrent_writers_on_disjoint_bytes_of_shared_blocks() {
    // Eight threads write interleaved 512-byte sectors of the same blocks, over a frozen
    // layer, so every write is a partial-block copy-up racing with its neighbours.
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let id = s.create_volume("v", 64 * BLOCK_SIZE).unwrap().id;
    let v = s.volume(id).unwrap();
    v.write(&vec![0xEE; 64 * BLOCK_SIZE as usize], 0, false).unwrap();
    s.snapshot(id, "base").unwrap();
    let threads = 8u64;
    let barrier = Arc::new(Barrier::new(threads as usize));
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (v, barrier) = (v.clone(), barrier.clone());
            scope.spawn(move || {
                barrier.wait();
                for sector in (t..64 * 8).step_by(threads as usize) {
                    v.write(&[t as u8 + 1; 512], sector * 512, false).unwrap();
                }
            });
        }
        // A reader meanwhile sees every byte either old or new, never anything else (zeros
        // from a block copied up too early, or a neighbour's bytes). Not each sector whole: a
        // read racing the in-place write of the same sector copies the page cache while that
        // write copies into it (one run in about 400 saw 64 new bytes, then 448 old ones).
        let v = v.clone();
        scope.spawn(move || {
            let mut buf = vec![0u8; 64 * BLOCK_SIZE as usize];
            for _ in 0..50 {
                v.read(&mut buf, 0).unwrap();
                for (sector, chunk) in buf.chunks(512).enumerate() {
                    let new = (sector as u64 % threads) as u8 + 1;
                    let stray = chunk.iter().find(|b| **b != 0xEE && **b != new);
                    assert_eq!(stray, None, "sector {sector} holds a byte that was never written there");
                }
            }
        });
    });
    let mut buf = vec![0u8; 64 * BLOCK_SIZE as usize];
    v.read(&mut buf, 0).unwrap();
    for (sector, chunk) in buf.chunks(512).enumerate() {
        assert!(chunk.iter().all(|b| *b == (sector as u64 % threads) as u8 + 1), "sector {sector} lost a write");
    }
}

/// Snapshots taken in a concurrent test: id, each block's stamp before it began, and after it
/// returned.
type Taken = Vec<(SnapshotId, Vec<u8>, Vec<u8>)>;

/// A crash image taken while a concurrent test ran, with the flushed stamps and the snapshots
/// it must hold.
type Cut = (MemStorage, Vec<u8>, Taken);

fn stamps(from: &[AtomicU8]) -> Vec<u8> {
    from.iter().map(|a| a.load(Ordering::SeqCst)).collect()
}

/// Opens `storage` after a power loss and checks that every block holds at least the stamp
/// `flushed` says it had at its thread's last successful flush, and that every snapshot in
/// `taken` holds, per block, a stamp between what was written before it began and one round
/// after it returned.
fn check_stamps(storage: MemStorage, blocks: u64, stride: u64, flushed: &[u8], taken: &Taken, what: &str) {
    let s = Store::open(Arc::new(storage) as Arc<dyn Storage>, StoreOptions::default())
        .unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
    // Per block, the stamps of its sectors. A block whose last write was never flushed may be
    // torn between sectors (format.md §7), but a sector is written whole.
    let read_stamps = |read: &dyn Fn(&mut [u8], u64)| -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        (0..blocks)
            .map(|b| {
                read(&mut buf, b * stride);
                let sectors = buf.chunks(512);
                assert!(
                    sectors.clone().all(|s| s.iter().all(|byte| *byte == s[0])),
                    "{what}: a sector of block {b} is torn"
                );
                sectors.map(|s| s[0]).collect()
            })
            .collect()
    };
    let v = s.volume(s.volume_id("v").unwrap()).unwrap();
    let now = read_stamps(&|buf, at| v.read(buf, at).unwrap());
    for (block, (now, flushed)) in now.iter().zip(flushed).enumerate() {
        for stamp in now {
            assert!(stamp >= flushed, "{what}: block {block} lost a flushed write: {stamp} < {flushed}");
        }
    }
    for (snap, low, high) in taken {
        let view = s.open_snapshot(*snap).unwrap_or_else(|e| panic!("{what}: snapshot {snap:?}: {e}"));
        for (block, stamps) in read_stamps(&|buf, at| view.read(buf, at).unwrap()).into_iter().enumerate() {
            // A write that completed just before the snapshot returned may be in it, though its
            // thread had not noted it yet: one round more.
            let range = low[block]..=high[block].saturating_add(1);
            for stamp in stamps {
                assert!(range.contains(&stamp), "{what}: snapshot {snap:?} block {block}: {stamp} outside {range:?}");
            }
        }
    }
}

#[test]
fn concurrent_flushes_and_snapshots_keep_what_they_acknowledged_through_a_power_loss() {
    // Writers on four threads stamp their own blocks round after round and flush often, so
    // flushes overlap each other and the snapshots taken meanwhile; each flush's data sync may
    // find its records journaled by another. Each block sits in a chunk of its own, so the
    // chunks' placements race too, and a journal batch out of order would misplace them.
    // Power is cut (as crash images) before every 16th sync while they run, and for good at
    // the end: each time, every block holds at least the stamp it had before its thread's last
    // flush that had returned, and every snapshot that had returned holds, per block, a stamp
    // between what was written before it began and what was written when it returned.
    const THREADS: usize = 4;
    const BLOCKS_PER_THREAD: u64 = 32;
    const ROUNDS: u8 = 40;
    const STRIDE: u64 = 2 << 20;
    const CUT_EVERY: u64 = 16;
    let blocks = THREADS as u64 * BLOCKS_PER_THREAD;
    let mem = MemStorage::new();
    let s = Store::open(Arc::new(mem.clone()) as Arc<dyn Storage>, StoreOptions::default()).unwrap();
    let id = s.create_volume("v", blocks * STRIDE).unwrap().id;
    let v = s.volume(id).unwrap();
    let written: Vec<AtomicU8> = (0..blocks).map(|_| AtomicU8::new(0)).collect();
    // Each block's stamp as of its thread's last flush that returned, and the snapshots that
    // returned: what a cut must keep.
    let flushed: Arc<Vec<AtomicU8>> = Arc::new((0..blocks).map(|_| AtomicU8::new(0)).collect());
    let taken: Arc<Mutex<Taken>> = Arc::default();
    let cuts: Arc<Mutex<Vec<Cut>>> = Arc::default();
    let syncs = Arc::new(AtomicU64::new(0));
    mem.before_each_sync(Some(Arc::new({
        let (mem, flushed, taken, cuts) = (mem.clone(), flushed.clone(), taken.clone(), cuts.clone());
        move || {
            let n = syncs.fetch_add(1, Ordering::SeqCst);
            if n.is_multiple_of(CUT_EVERY) {
                // What had returned before the image: synced before it, so in it.
                let (flushed, taken) = (stamps(&flushed), taken.lock().unwrap().clone());
                let image = mem.crash_image(Some(n));
                cuts.lock().unwrap().push((image, flushed, taken));
            }
        }
    })));
    let running = AtomicUsize::new(THREADS);
    std::thread::scope(|scope| {
        for t in 0..THREADS as u64 {
            let (v, written, flushed, running) = (&v, &written, &flushed, &running);
            scope.spawn(move || {
                let mine = (t * BLOCKS_PER_THREAD) as usize..((t + 1) * BLOCKS_PER_THREAD) as usize;
                for round in 1..=ROUNDS {
                    for b in mine.clone() {
                        v.write(&[round; BLOCK_SIZE as usize], b as u64 * STRIDE, false).unwrap();
                        written[b].store(round, Ordering::SeqCst);
                        if b % 8 == 7 {
                            let before = stamps(&written[mine.clone()]);
                            v.flush().unwrap();
                            for (block, stamp) in mine.clone().zip(before) {
                                flushed[block].store(stamp, Ordering::SeqCst);
                            }
                        }
                    }
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let mut count = 0;
        while running.load(Ordering::SeqCst) > 0 && count < 100 {
            let low = stamps(&written);
            let snap = s.snapshot(id, &format!("s{count}")).unwrap().id;
            taken.lock().unwrap().push((snap, low, stamps(&written)));
            count += 1;
        }
    });
    mem.before_each_sync(None);
    let taken = taken.lock().unwrap().clone();
    assert!(taken.len() > 1, "snapshots overlapped the writers");
    let cuts = std::mem::take(&mut *cuts.lock().unwrap());
    assert!(cuts.len() > 20, "power was cut while they ran ({} cuts)", cuts.len());
    for (i, (image, flushed, taken)) in cuts.into_iter().enumerate() {
        check_stamps(image, blocks, STRIDE, &flushed, &taken, &format!("cut {i}"));
    }
    drop(v);
    drop(s);
    // One that keeps a part of what was not synced: blocks written since a thread's last flush
    // may come back with any stamp they had since, never with less than the flushed one.
    mem.power_loss_keeping(Some(0x5eed));
    check_stamps(mem, blocks, STRIDE, &stamps(&flushed), &taken, "the end");
}

#[test]
fn snapshot_under_load_is_a_point_in_time() {
    // A writer stamps blocks 0, 1, 2, ... in order, each write finishing before the next
    // starts; any snapshot must therefore hold a prefix of the stamped blocks.
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let blocks = 2048u64;
    let id = s.create_volume("v", blocks * BLOCK_SIZE).unwrap().id;
    let v = s.volume(id).unwrap();
    let done = AtomicBool::new(false);
    let snaps = std::thread::scope(|scope| {
        scope.spawn(|| {
            for round in 1..=3u8 {
                for b in 0..blocks {
                    v.write(&[round; BLOCK_SIZE as usize], b * BLOCK_SIZE, false).unwrap();
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut snaps = Vec::new();
        while !done.load(Ordering::SeqCst) && snaps.len() < 200 {
            snaps.push(s.snapshot(id, &format!("s{}", snaps.len())).unwrap().id);
        }
        snaps
    });
    assert!(!snaps.is_empty());
    for id in snaps {
        let view = s.open_snapshot(id).unwrap();
        let mut buf = vec![0u8; (blocks * BLOCK_SIZE) as usize];
        view.read(&mut buf, 0).unwrap();
        let stamps: Vec<u8> = buf.chunks(BLOCK_SIZE as usize).map(|c| c[0]).collect();
        // Stamps never increase along the disk: a newer round is a prefix over an older one.
        assert!(stamps.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1), "torn snapshot {id:?}");
        assert!(buf.chunks(BLOCK_SIZE as usize).all(|c| c.iter().all(|b| *b == c[0])), "torn block");
    }
}

#[test]
fn snapshot_cost_does_not_depend_on_size_or_data() {
    // Counts storage operations: a snapshot of a big, busy volume does the same work as one
    // of a small, empty volume.
    let ops_for = |size: u64, written: u64| {
        let faulty = FaultyStorage::new(Arc::new(MemStorage::new()));
        let control = faulty.control();
        let s = Store::open(Arc::new(faulty) as Arc<dyn Storage>, StoreOptions::default()).unwrap();
        let id = s.create_volume("v", size).unwrap().id;
        let v = s.volume(id).unwrap();
        let chunk = vec![7u8; 1 << 20];
        for i in 0..written {
            v.write(&chunk, i << 20, false).unwrap();
        }
        v.flush().unwrap();
        s.snapshot(id, "warm").unwrap();
        let before = control.ops();
        s.snapshot(id, "s").unwrap();
        control.ops() - before
    };
    assert_eq!(ops_for(1 << 30, 64), ops_for(1 << 40, 0));
    assert_eq!(ops_for(1 << 40, 64), ops_for(64 << 20, 1));
}

#[test]
fn clones_share_and_survive_their_origin() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let id = s.create_volume("golden", 1 << 20).unwrap().id;
    let v = s.volume(id).unwrap();
    v.write(&[5u8; 8192], 0, false).unwrap();
    let snap = s.snapshot(id, "image").unwrap().id;
    let clones: Vec<_> = (0..5).map(|i| s.clone_snapshot(snap, &format!("vm{i}"), Some(2 << 20)).unwrap().id).collect();
    let layers_before = s.layer_count();
    s.delete_volume(id).unwrap();
    s.delete_snapshot(snap, false).unwrap();
    s.wait_for_merges().unwrap();
    assert_eq!(s.layer_count(), layers_before - 1, "only the origin's head goes; clones keep the image");
    for (i, c) in clones.iter().enumerate() {
        let cv = s.volume(*c).unwrap();
        assert_eq!(cv.size(), 2 << 20);
        cv.write(&[i as u8; 4096], 4096, false).unwrap();
        let mut buf = [0u8; 8192];
        cv.read(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 5));
        assert!(buf[4096..].iter().all(|b| *b == i as u8));
    }
    for c in clones {
        s.delete_volume(c).unwrap();
    }
    assert_eq!(s.layer_count(), 0, "the last user frees the shared layer");
}

#[test]
fn usage_tells_what_deleting_frees() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let id = s.create_volume("v", 1 << 20).unwrap().id;
    let v = s.volume(id).unwrap();
    v.write(&[1u8; 40960], 0, false).unwrap(); // 10 blocks
    let snap = s.snapshot(id, "s").unwrap().id;
    v.write(&[2u8; 12288], 4096, false).unwrap(); // overwrites 3 of them
    let usage = s.snapshot_usage(snap).unwrap();
    assert_eq!(usage.allocated_bytes, 10 * BLOCK_SIZE);
    assert_eq!(usage.exclusive_bytes, 3 * BLOCK_SIZE);
    assert_eq!(usage.shared_bytes, 7 * BLOCK_SIZE);
    assert_eq!(usage.logical_bytes, 1 << 20);
}

#[test]
fn change_tracking_survives_snapshot_deletion_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let id = s.create_volume("v", 1 << 20).unwrap().id;
    let v = s.volume(id).unwrap();
    v.write(&[1u8; 4096], 0, false).unwrap();
    let backup1 = s.snapshot(id, "backup1").unwrap().id;
    v.write(&[2u8; 4096], 8192, false).unwrap();
    // The backup drops its local snapshot but keeps the checkpoint for the next incremental.
    s.delete_snapshot(backup1, true).unwrap();
    s.wait_for_merges().unwrap();
    v.write(&[3u8; 100], 65536 + 10, true).unwrap();
    drop(v);
    s.close().unwrap();
    let s = store(&dir);
    let changed = s.changed_extents(backup1, cairn_volume::ChangeTarget::Volume(id)).unwrap();
    let offsets: Vec<(u64, u64)> = changed.iter().map(|e| (e.offset, e.length)).collect();
    assert_eq!(offsets, vec![(8192, 4096), (65536, 4096)]);
    s.forget_checkpoint(backup1).unwrap();
    s.wait_for_merges().unwrap();
    assert!(s.changed_extents(backup1, cairn_volume::ChangeTarget::Volume(id)).is_err());
    assert_eq!(s.layer_count(), 1);
}

/// A merge copies a deleted snapshot's blocks into the live head as unchanged since its
/// checkpoint. A guest write over such a block lands in place, and its "changed" mark reaches
/// the journal only at the next flush. If the process dies before that, the new bytes are on
/// the disk (the page cache survives a process crash) and may be after a power loss too, so
/// the next incremental backup must still be told the block changed.
#[test]
fn a_merged_block_overwritten_before_a_crash_is_still_listed_as_changed() {
    for power_loss in [None, Some(7)] {
        let mem = MemStorage::new();
        let open = |mem: &MemStorage| Store::open(Arc::new(mem.clone()) as Arc<dyn Storage>, StoreOptions::default());
        let s = open(&mem).unwrap();
        let id = s.create_volume("v", 1 << 20).unwrap().id;
        let v = s.volume(id).unwrap();
        v.write(&[1u8; 8192], 0, true).unwrap();
        // A clean close and open first: the mark of that close must not outlive the open.
        s.close().unwrap();
        assert!(matches!(v.write(&[5u8; 512], 0, false), Err(Error::Closed)), "a change after the close");
        assert!(matches!(v.flush(), Err(Error::Closed)), "a flush after the close");
        let mut kept = [0u8; 512];
        v.read(&mut kept, 0).unwrap();
        assert_eq!(kept, [1u8; 512], "a handle kept past the close still reads");
        let s = open(&mem).unwrap();
        let v = s.volume(id).unwrap();
        let backup = s.snapshot(id, "backup").unwrap().id;
        s.delete_snapshot(backup, true).unwrap();
        s.wait_for_merges().unwrap();
        v.write(&[9u8; 4096], 4096, false).unwrap();
        // The process dies (no close): nothing more is flushed.
        drop(v);
        drop(s);
        let after = match power_loss {
            None => mem.clone(),
            Some(seed) => mem.crash_image(Some(seed)),
        };
        let s = open(&after).unwrap();
        let mut now = vec![0u8; 8192];
        s.volume(id).unwrap().read(&mut now, 0).unwrap();
        let changed = s.changed_extents(backup, cairn_volume::ChangeTarget::Volume(id)).unwrap();
        let listed = |offset: u64| changed.iter().any(|e| e.offset <= offset && offset < e.offset + e.length);
        assert!(now[..4096].iter().all(|b| *b == 1), "{power_loss:?}: block 0 was not written");
        // An unflushed write may survive torn: each byte is old or new.
        assert!(now[4096..].iter().all(|b| *b == 1 || *b == 9), "{power_loss:?}: block 1 is not old or new");
        if now[4096..].contains(&9) {
            assert!(
                listed(4096),
                "{power_loss:?}: block 1 changed since the checkpoint but is not listed: {changed:?}"
            );
        }
        if power_loss.is_none() {
            assert!(now[4096..].iter().all(|b| *b == 9), "a process crash keeps what was written");
        }
    }
}

#[test]
fn merge_is_invisible_to_readers_and_writers() {
    // Readers compare every byte while a deleted snapshot merges into the live head, which a
    // writer keeps changing in its own half of the disk.
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open_dir(
        dir.path(),
        StoreOptions { background_merge: true, merge_bytes_per_sec: Some(64 << 20), ..StoreOptions::default() },
    )
    .unwrap();
    let blocks = 4096u64; // 16 MiB: 8 pages
    let id = s.create_volume("v", blocks * BLOCK_SIZE).unwrap().id;
    let v = s.volume(id).unwrap();
    let stamp = |b: u64, gen: u8| -> Vec<u8> { vec![(b % 200) as u8 ^ gen; BLOCK_SIZE as usize] };
    for b in 0..blocks {
        v.write(&stamp(b, 1), b * BLOCK_SIZE, false).unwrap();
    }
    let old = s.snapshot(id, "old").unwrap().id;
    for b in (0..blocks).step_by(3) {
        v.write(&stamp(b, 2), b * BLOCK_SIZE, false).unwrap();
    }
    let later = s.snapshot(id, "later").unwrap().id;
    let expected_later: Vec<u8> = (0..blocks).flat_map(|b| stamp(b, if b % 3 == 0 { 2 } else { 1 })).collect();
    let later_view = s.open_snapshot(later).unwrap();
    s.delete_snapshot(old, false).unwrap();
    let merging = AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            s.wait_for_merges().unwrap();
            merging.store(false, Ordering::SeqCst);
        });
        scope.spawn(|| {
            let mut gen = 3u8;
            while merging.load(Ordering::SeqCst) {
                for b in (blocks / 2..blocks).step_by(7) {
                    v.write(&stamp(b, gen), b * BLOCK_SIZE, false).unwrap();
                }
                gen = gen.wrapping_add(1);
            }
        });
        let mut buf = vec![0u8; (blocks * BLOCK_SIZE) as usize];
        let mut rounds = 0;
        while merging.load(Ordering::SeqCst) || rounds < 3 {
            later_view.read(&mut buf, 0).unwrap();
            assert!(buf == expected_later, "snapshot changed during the merge");
            v.read(&mut buf[..(blocks / 2 * BLOCK_SIZE) as usize], 0).unwrap();
            let half = (blocks / 2 * BLOCK_SIZE) as usize;
            assert!(buf[..half] == expected_later[..half], "volume changed during the merge");
            rounds += 1;
        }
    });
    assert_eq!(s.list_snapshots(Some(id)).len(), 1);
}

#[test]
fn a_long_catalog_compacts_and_reopens() {
    // More events than the compaction threshold, with reopens between: the compacted state
    // must read back exactly. (In memory: the point is the catalog, not the disk.)
    let mem = MemStorage::new();
    let open = || Store::open(Arc::new(mem.clone()) as Arc<dyn Storage>, StoreOptions::default()).unwrap();
    let s = open();
    let id = s.create_volume("v", 1 << 20).unwrap().id;
    let v = s.volume(id).unwrap();
    for i in 0..1100u64 {
        v.write(&[i as u8; 512], (i % 64) * 4096, false).unwrap();
        let snap = s.snapshot(id, &format!("s{i}")).unwrap().id;
        if i % 50 != 0 {
            s.delete_snapshot(snap, false).unwrap();
        }
    }
    s.wait_for_merges().unwrap();
    drop(v);
    s.close().unwrap();
    for _ in 0..2 {
        let s = open();
        assert_eq!(s.list_snapshots(Some(id)).len(), 22);
        let mut buf = [0u8; 512];
        s.volume(id).unwrap().read(&mut buf, 63 * 4096).unwrap();
        assert_eq!(buf, [1087u64 as u8; 512], "the last write to block 63 was number 1087");
        s.close().unwrap();
    }
}

#[test]
fn deleting_an_older_snapshot_below_a_checkpoint_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let id = s.create_volume("v", 1 << 20).unwrap().id;
    let v = s.volume(id).unwrap();
    v.write(&[1u8; 4096], 0, false).unwrap();
    let s1 = s.snapshot(id, "s1").unwrap().id;
    v.write(&[2u8; 4096], 4096, false).unwrap();
    let s2 = s.snapshot(id, "s2").unwrap().id;
    s.delete_snapshot(s2, true).unwrap();
    s.wait_for_merges().unwrap();
    s.delete_snapshot(s1, false).unwrap();
    s.wait_for_merges().unwrap();
    drop(v);
    s.close().unwrap();
    let store = store(&dir);
    let mut buf = [0u8; 8192];
    store.volume(id).unwrap().read(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|b| *b == 1) && buf[4096..].iter().all(|b| *b == 2));
    let changed = store.changed_extents(s2, cairn_volume::ChangeTarget::Volume(id)).unwrap();
    assert!(changed.is_empty(), "{changed:?}");
}

#[test]
fn allocation_depth_tells_which_layer_holds_each_block() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let b = BLOCK_SIZE;
    // A 3 MiB volume, so the blocks below span two 2 MiB map pages.
    let id = s.create_volume("v", 3 << 20).unwrap().id;
    let v = s.volume(id).unwrap();
    v.write(&[1; 4096], 0, false).unwrap(); // block 0: oldest layer
    let first = s.snapshot(id, "first").unwrap().id;
    v.write(&[2; 4096], b, false).unwrap(); // block 1: middle layer
    v.write(&[2; 4096], 600 * b, false).unwrap(); // block 600, second page: middle layer
    s.snapshot(id, "second").unwrap();
    v.write(&[3; 4096], 2 * b, false).unwrap(); // block 2: head
    v.write_zeroes(3 * b, b, false).unwrap(); // block 3: zeroed in the head, still held there
    v.write(&[3; 4096], 0, false).unwrap(); // block 0 again: the head's copy is on top
    let depth = |start: u64, length: u64, depth: u32| cairn_volume::DepthExtent { offset: start, length, depth };
    assert_eq!(
        v.allocation_depth(0, 3 << 20).unwrap(),
        vec![
            depth(0, b, 1),
            depth(b, b, 2),
            depth(2 * b, 2 * b, 1),
            depth(4 * b, 596 * b, 0),
            depth(600 * b, b, 2),
            depth(601 * b, (3 << 20) - 601 * b, 0),
        ]
    );
    // Unaligned ranges are cut at their ends.
    assert_eq!(v.allocation_depth(b + 100, b).unwrap(), vec![depth(b + 100, b - 100, 2), depth(2 * b, 100, 1)]);
    // A snapshot counts from its own layer.
    let view = s.open_snapshot(first).unwrap();
    assert_eq!(view.allocation_depth(0, 2 * b).unwrap(), vec![depth(0, b, 1), depth(b, b, 0)]);
    assert!(matches!(v.allocation_depth(3 << 20, 1), Err(Error::OutOfRange { .. })));
}

#[test]
fn large_writes_start_their_writeback_and_small_ones_leave_it_to_the_flush() {
    let mem = MemStorage::new();
    let s = Store::open(Arc::new(mem.clone()) as Arc<dyn Storage>, StoreOptions::default()).unwrap();
    let id = s.create_volume("v", 8 << 20).unwrap().id;
    let v = s.volume(id).unwrap();
    let data_file = || mem.list().unwrap().into_iter().find(|n| n.ends_with(".d0")).unwrap();
    for at in (0..64 << 10).step_by(4096) {
        v.write(&[1u8; 4096], at, false).unwrap();
    }
    assert_eq!(mem.writeback_started(&data_file()), Some(0), "4 KiB writes wait for the flush");
    // Across a 2 MiB chunk boundary: both parts of one large write.
    v.write(&[2u8; 256 << 10], (2 << 20) - (64 << 10), false).unwrap();
    assert_eq!(mem.writeback_started(&data_file()), Some(256 << 10));
    v.write_zeroes(4 << 20, 1 << 20, false).unwrap();
    assert_eq!(mem.writeback_started(&data_file()), Some(256 << 10), "zeroes write no data");
    s.close().unwrap();
}

#[test]
fn heads_are_marked_for_in_place_writes_and_frozen_layers_read_only() {
    let mem = MemStorage::new();
    let open = || Store::open(Arc::new(mem.clone()) as Arc<dyn Storage>, StoreOptions::default()).unwrap();
    // Layer ids grow, so sorted names list the data files from the oldest layer up.
    let data_files = || {
        let mut names: Vec<String> = mem.list().unwrap().into_iter().filter(|n| n.ends_with(".d0")).collect();
        names.sort();
        names
    };
    let access = |name: &String| mem.access(name).unwrap();
    let s = open();
    let id = s.create_volume("v", 1 << 20).unwrap().id;
    let v = s.volume(id).unwrap();
    v.write(&[1u8; 4096], 0, false).unwrap();
    let files = data_files();
    assert_eq!(files.len(), 1);
    assert_eq!(access(&files[0]), Access::InPlaceWrites, "a head's data");
    s.snapshot(id, "s").unwrap();
    assert_eq!(access(&files[0]), Access::ReadMostly, "a frozen layer's");
    v.write(&[2u8; 4096], 0, false).unwrap();
    let files = data_files();
    assert_eq!(files.len(), 2);
    assert_eq!(access(&files[1]), Access::InPlaceWrites, "the new head");
    drop(v);
    s.close().unwrap();
    let s = open();
    assert_eq!(access(&files[0]), Access::ReadMostly, "frozen, after a reopen");
    assert_eq!(access(&files[1]), Access::InPlaceWrites, "the head, after a reopen");
    // A clone's head is a head too.
    let snap = s.list_snapshots(Some(id))[0].id;
    let clone = s.clone_snapshot(snap, "c", None).unwrap().id;
    s.volume(clone).unwrap().write(&[3u8; 4096], 4096, false).unwrap();
    let files = data_files();
    assert_eq!(files.len(), 3);
    assert_eq!(access(&files[2]), Access::InPlaceWrites, "a clone's head");
    s.close().unwrap();
}

/// Threads that each write their own block of a chunk nobody placed yet race to place it.
/// After a flush and a reopen, every block is back: each chunk got exactly one slot (a chunk
/// placed twice would make the layer's journal corrupt).
#[test]
fn concurrent_first_writes_into_new_chunks_place_each_chunk_once() {
    const THREADS: u64 = 4;
    // 256 KiB chunks: each thread's block of a chunk lies in its own 64 KiB write region, so
    // the writers do not serialize on region locks before they reach the placement.
    const CHUNK_SHIFT: u32 = 18;
    const CHUNK_BLOCKS: u64 = 1 << (CHUNK_SHIFT - 12);
    const CHUNKS: u64 = 2048;
    let block_of = |chunk: u64, thread: u64| chunk * CHUNK_BLOCKS + thread * (CHUNK_BLOCKS / THREADS);
    let fill = |block: u64| -> Vec<u8> { vec![(block % 251) as u8 + 1; BLOCK_SIZE as usize] };
    let dir = tempfile::tempdir().unwrap();
    let options = || StoreOptions { chunk_shift: CHUNK_SHIFT, ..StoreOptions::default() };
    let s = Store::open_dir(dir.path(), options()).unwrap();
    let id = s.create_volume("v", CHUNKS * CHUNK_BLOCKS * BLOCK_SIZE).unwrap().id;
    let v = s.volume(id).unwrap();
    let each_chunk = Barrier::new(THREADS as usize);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (v, each_chunk) = (&v, &each_chunk);
            scope.spawn(move || {
                for chunk in 0..CHUNKS {
                    // All threads reach the chunk together, so they race to place it.
                    each_chunk.wait();
                    v.write(&fill(block_of(chunk, t)), block_of(chunk, t) * BLOCK_SIZE, false).unwrap();
                }
            });
        }
    });
    v.flush().unwrap();
    drop(v);
    s.close().unwrap();
    let s = Store::open_dir(dir.path(), options()).unwrap();
    let v = s.volume(id).unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for chunk in 0..CHUNKS {
        for t in 0..THREADS {
            v.read(&mut buf, block_of(chunk, t) * BLOCK_SIZE).unwrap();
            assert_eq!(buf, fill(block_of(chunk, t)), "block {}", block_of(chunk, t));
        }
    }
}

#[test]
fn a_damaged_catalog_is_refused_and_no_layer_file_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let id = s.create_volume("v", 1 << 20).unwrap().id;
    s.volume(id).unwrap().write(&[7; 4096], 0, true).unwrap();
    s.close().unwrap();
    let log = dir.path().join("catalog.log");
    let intact = std::fs::read(&log).unwrap();
    let layer_files = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("layer-"))
            .collect();
        names.sort();
        names
    };
    let before = layer_files();
    assert!(before.iter().any(|f| f.contains(".d")), "the write made a data file: {before:?}");
    // The log is its 16-byte header and one event. With that event's frame header zeroed the
    // log once replayed as empty, and the orphan cleanup deleted the volume's files.
    let mut damaged = intact.clone();
    damaged[16..24].fill(0);
    std::fs::write(&log, &damaged).unwrap();
    let err = Store::open_dir(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(matches!(&err, Error::Corrupt { reason, .. } if reason.contains("holds no events")), "{err}");
    assert_eq!(layer_files(), before);
    // With a second event after the damaged one, replay itself refuses.
    let s = {
        std::fs::write(&log, &intact).unwrap();
        store(&dir)
    };
    s.snapshot(id, "s").unwrap();
    s.close().unwrap();
    let mut damaged = std::fs::read(&log).unwrap();
    damaged[16..24].fill(0);
    std::fs::write(&log, &damaged).unwrap();
    let before = layer_files();
    let err = Store::open_dir(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(matches!(&err, Error::Corrupt { reason, .. } if reason.contains("intact frame follows")), "{err}");
    assert_eq!(layer_files(), before);
    // Repaired, the store opens with its data.
    damaged[16..24].copy_from_slice(&intact[16..24]);
    std::fs::write(&log, &damaged).unwrap();
    let s = store(&dir);
    let mut buf = [0u8; 4096];
    s.volume(id).unwrap().read(&mut buf, 0).unwrap();
    assert_eq!(buf, [7; 4096]);
    assert_eq!(s.list_snapshots(Some(id)).len(), 1);
}

#[test]
fn a_layer_whose_event_was_lost_is_kept_aside_and_a_dropped_one_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let names = || {
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    };
    let s = store(&dir);
    let a = s.create_volume("a", 1 << 20).unwrap().id;
    s.volume(a).unwrap().write(&[1; 4096], 0, true).unwrap();
    let b = s.create_volume("b", 1 << 20).unwrap().id;
    s.volume(b).unwrap().write(&[2; 4096], 0, true).unwrap();
    s.close().unwrap();
    let layer_files: Vec<String> = names().into_iter().filter(|n| n.starts_with("layer-")).collect();
    let log = dir.path().join("catalog.log");

    // Deleting "b" drops its layer. A crash before its files were removed is simulated by
    // putting them back: the log holds the deletion, so the next open deletes them.
    let saved: Vec<(String, Vec<u8>)> =
        layer_files.iter().map(|n| (n.clone(), std::fs::read(dir.path().join(n)).unwrap())).collect();
    let s = store(&dir);
    s.delete_volume(b).unwrap();
    s.close().unwrap();
    for (name, bytes) in &saved {
        if !dir.path().join(name).exists() {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
    }
    let s = store(&dir);
    assert!(names().iter().all(|n| !n.starts_with("lost-")), "{:?}", names());
    let a_files: Vec<String> = names().into_iter().filter(|n| n.starts_with("layer-")).collect();
    assert!(a_files.len() < layer_files.len(), "b's files are gone: {a_files:?}");

    // Now "c" is created and written, and the event that created it is damaged at the end of
    // the log, so it reads as a torn tail. Its data must not be deleted with it.
    let c = s.create_volume("c", 1 << 20).unwrap().id;
    s.volume(c).unwrap().write(&[3; 4096], 0, true).unwrap();
    s.close().unwrap();
    let mut bytes = std::fs::read(&log).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();
    let c_files: Vec<String> =
        names().into_iter().filter(|n| n.starts_with("layer-") && !a_files.contains(n)).collect();
    assert!(!c_files.is_empty());
    let s = store(&dir);
    assert!(s.volume_id("c").is_err(), "the damaged event is gone");
    let lost: Vec<String> = names().into_iter().filter(|n| n.starts_with("lost-")).collect();
    assert_eq!(lost.len(), c_files.len(), "{lost:?}");
    for f in &c_files {
        assert!(lost.iter().any(|l| l.ends_with(&format!("-{f}"))), "{f} kept as {lost:?}");
    }
    let mut buf = [0u8; 4096];
    s.volume(a).unwrap().read(&mut buf, 0).unwrap();
    assert_eq!(buf, [1; 4096]);
    s.close().unwrap();
    // The kept files stay out of the way: the store opens again and leaves them alone.
    let s = store(&dir);
    assert_eq!(names().into_iter().filter(|n| n.starts_with("lost-")).count(), lost.len());
    s.close().unwrap();
}
