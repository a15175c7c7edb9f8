//! Fault injection: storage that fails with EIO or ENOSPC after N operations. Every error
//! reaches the caller as an error (no panic), and after the fault clears and the machine loses
//! power (keeping none or some of what was not synced), the store opens, every acknowledged
//! snapshot is intact and every flushed byte is there.

mod common;

use cairn_volume::storage::{Fault, FaultControl, FaultyStorage, MemStorage, Storage};
use cairn_volume::{ChangeTarget, Error, SnapshotId, Store, StoreOptions, Volume, VolumeId};
use std::sync::Arc;

const SIZE: u64 = 256 * 1024;

fn options() -> StoreOptions {
    // 8 KiB chunks: a failure can fall between placing a chunk and writing into it.
    StoreOptions { background_merge: false, merge_bytes_per_sec: None, chunk_shift: 13, journal_compact_min: 128 }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed ^ (i % 253) as u8 | 1).collect()
}

/// What the run acknowledged of one volume, to check after the crash.
#[derive(Debug, Clone)]
struct Tracked {
    /// Its content at the last successful flush.
    durable: Vec<u8>,
    /// Writes tried since then (successful or not): each may or may not have landed.
    maybe: Vec<(u64, Vec<u8>)>,
    /// The content of the snapshot a failed revert went to: its event may have reached the
    /// disk, so the volume may read so after the crash, unless a later flush succeeded (which
    /// claims the writes since are durable: a revert coming back would lose them).
    maybe_reverted: Option<Vec<u8>>,
    /// The size a failed grow asked for: its event may have reached the disk. (After it the
    /// catalog and every layer refuse work, so no later success clears it.)
    maybe_grown: Option<u64>,
}

impl Tracked {
    fn new(content: Vec<u8>) -> Self {
        Tracked { durable: content, maybe: Vec::new(), maybe_reverted: None, maybe_grown: None }
    }

    /// The volume's content is durable as it is now.
    fn durable_now(&mut self, content: &[u8]) {
        *self = Tracked::new(content.to_vec());
    }
}

/// What the run acknowledged, to check after the crash.
#[derive(Default)]
struct Acknowledged {
    volumes: Vec<(VolumeId, Tracked)>,
    /// Each snapshot, the volume it was taken of, and its content.
    snapshots: Vec<(SnapshotId, VolumeId, Vec<u8>)>,
    deleted: Vec<SnapshotId>,
    /// Snapshots whose deletion failed: each may be gone or intact.
    maybe_deleted: Vec<SnapshotId>,
    /// Snapshots deleted but kept as change-tracking checkpoints, with their volume and
    /// content: changes since each must list every block that differs from it.
    checkpoints: Vec<(SnapshotId, VolumeId, Vec<u8>)>,
    deleted_volumes: Vec<VolumeId>,
}

impl Acknowledged {
    fn volume(&mut self, id: VolumeId) -> &mut Tracked {
        &mut self.volumes.iter_mut().find(|(v, _)| *v == id).expect("a tracked volume").1
    }
}

/// A store on fault-injecting memory storage with one volume "v".
fn faulty_store() -> (MemStorage, Arc<FaultControl>, Store, VolumeId, Volume) {
    let mem = MemStorage::new();
    let faulty = FaultyStorage::new(Arc::new(mem.clone()));
    let control = faulty.control();
    let store = Store::open(Arc::new(faulty) as Arc<dyn Storage>, options()).unwrap();
    let id = store.create_volume("v", SIZE).unwrap().id;
    let vol = store.volume(id).unwrap();
    (mem, control, store, id, vol)
}

/// How the storage fails: from the chosen operation on, or that operation alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lasting {
    Permanent,
    Transient,
}

/// A volume of the workload: handle and content as last read or written.
struct Live {
    vol: Volume,
    content: Vec<u8>,
}

/// Where a run fails: from the `fail_after`-th storage operation on, or at that one alone.
#[derive(Debug, Clone, Copy)]
struct Failure {
    fail_after: u64,
    fault: Fault,
    fail_reads: bool,
    lasting: Lasting,
}

/// Runs a fixed workload, with `failure`. It writes, flushes, snapshots, reverts and deletes
/// snapshots of "v", clones one of its snapshots as "c", and from then on alternates between
/// the two and takes group snapshots of both. `variant` moves and resizes its writes (0: the
/// workload every test run checks; others: `CAIRN_FAULT_VARIANTS`).
fn run(variant: u64, failure: Failure) -> (MemStorage, Acknowledged, u64) {
    let Failure { fail_after, fault, fail_reads, lasting } = failure;
    let (mem, control, store, id, vol) = faulty_store();
    let mut ack = Acknowledged { volumes: vec![(id, Tracked::new(vec![0; SIZE as usize]))], ..Default::default() };
    let mut live = vec![Live { vol, content: vec![0u8; SIZE as usize] }];
    let start = control.ops();
    match lasting {
        Lasting::Permanent => control.fail_after(fail_after, fault, fail_reads),
        Lasting::Transient => control.fail_once(fail_after, fault, fail_reads),
    }
    for step in 0..16u64 {
        let at = (step * 20_011 + variant * 7_919) % (SIZE - 30_000);
        let data = pattern(step as u8, 10_000 + ((step + variant * 5) % 16) as usize * 1000);
        let which = step as usize % live.len();
        let result: Result<(), Error> = (|| {
            let Live { vol, content } = &mut live[which];
            let id = vol.id();
            ack.volume(id).maybe.push((at, data.clone()));
            vol.write(&data, at, false)?;
            content[at as usize..at as usize + data.len()].copy_from_slice(&data);
            if step % 6 == 0 {
                // Whole blocks and partial ones at both ends.
                let (zero_at, zeros) = (at + 3000, vec![0u8; 9000]);
                ack.volume(id).maybe.push((zero_at, zeros.clone()));
                vol.write_zeroes(zero_at, zeros.len() as u64, false)?;
                content[zero_at as usize..zero_at as usize + zeros.len()].copy_from_slice(&zeros);
            }
            if step % 2 == 1 {
                vol.flush()?;
                ack.volume(id).durable_now(content);
            }
            if step % 3 == 2 {
                let snap = store.snapshot(id, &format!("s{step}"))?;
                ack.volume(id).durable_now(content);
                ack.snapshots.push((snap.id, id, content.clone()));
            }
            if step % 5 == 4 {
                if let Some((snap, _, at_snap)) = ack.snapshots.iter().rev().find(|(_, of, _)| *of == id).cloned() {
                    // Any failed revert counts as one whose event may be on the disk, even one
                    // that failed before its event was written: a weaker check, kept simple.
                    store.revert(id, snap).inspect_err(|_| ack.volume(id).maybe_reverted = Some(at_snap.clone()))?;
                    *content = at_snap;
                    ack.volume(id).durable_now(content);
                }
            }
            if step % 4 == 3 && !ack.snapshots.is_empty() {
                // Every other deletion keeps a checkpoint, whose layer's merge folds in the
                // change tracking the checkpoint needs.
                let keep_checkpoint = step % 8 == 3;
                let (victim, of, at_victim) = ack.snapshots[0].clone();
                store.delete_snapshot(victim, keep_checkpoint).inspect_err(|_| ack.maybe_deleted.push(victim))?;
                ack.snapshots.remove(0);
                ack.deleted.push(victim);
                if keep_checkpoint {
                    ack.checkpoints.push((victim, of, at_victim));
                }
                store.merge_step()?;
            }
            if step == 10 {
                // Durable when it returns, but it flushes nothing: unflushed writes stay maybe.
                let size = content.len() as u64 + 64 * 1024;
                store.grow(id, size).inspect_err(|_| ack.volume(id).maybe_grown = Some(size))?;
                content.resize(size as usize, 0);
                ack.volume(id).durable.resize(size as usize, 0);
            }
            if step == 14 && !ack.checkpoints.is_empty() {
                // Whether or not this succeeds, the checkpoint is no longer checked.
                let (checkpoint, ..) = ack.checkpoints.remove(0);
                store.forget_checkpoint(checkpoint)?;
                store.merge_step()?;
            }
            Ok(())
        })();
        let result = result.and_then(|()| match (step, live.len()) {
            // The clone: a new volume on v's newest snapshot, durable when it returns.
            (5, 1) => {
                let Some((snap, _, at_snap)) = ack.snapshots.last().cloned() else { return Ok(()) };
                let clone = store.clone_snapshot(snap, "c", None)?;
                ack.volumes.push((clone.id, Tracked::new(at_snap.clone())));
                live.push(Live { vol: store.volume(clone.id)?, content: at_snap });
                Ok(())
            }
            (_, 2) if step % 4 == 0 => {
                // The volume this step wrote without a flush goes last: its old head's flush is
                // the one that overlaps the event's commit.
                let name = format!("g{step}");
                let (other, written) = (&live[1 - which], &live[which]);
                let snaps = store.snapshot_group(&[(other.vol.id(), &name), (written.vol.id(), &name)])?;
                for (snap, l) in snaps.iter().zip([other, written]) {
                    ack.volume(l.vol.id()).durable_now(&l.content);
                    ack.snapshots.push((snap.id, l.vol.id(), l.content.clone()));
                }
                Ok(())
            }
            // The clone goes at the end; until the call returns it may or may not be gone.
            (15, 2) => {
                let clone = live.pop().expect("two volumes").vol.id();
                ack.volumes.retain(|(id, _)| *id != clone);
                store.delete_volume(clone)?;
                ack.deleted_volumes.push(clone);
                Ok(())
            }
            _ => Ok(()),
        });
        if let Err(e) = result {
            // The error is the storage's, reported as such.
            assert!(matches!(e, Error::Io(_) | Error::Merge(_)), "unexpected error {e}");
            let errno = match &e {
                Error::Io(io) => io.raw_os_error(),
                _ => None,
            };
            assert!(errno.is_none() || errno == Some(libc_errno(fault)), "{e}");
            // When a write itself failed, what it did to the content is unknown.
            for l in &mut live {
                l.content = read_all(&l.vol).unwrap_or(std::mem::take(&mut l.content));
            }
        }
    }
    let ops = control.ops() - start;
    drop(live);
    drop(store);
    (mem, ack, ops)
}

fn libc_errno(fault: Fault) -> i32 {
    match fault {
        Fault::Io => 5,
        Fault::NoSpace => 28,
    }
}

fn read_all(vol: &cairn_volume::Volume) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; vol.size() as usize];
    vol.read(&mut buf, 0).ok().map(|_| buf)
}

/// How the machine stops after the workload.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Power fails, keeping nothing unsynced (`None`) or a part chosen by the seed: a sync
    /// that failed may still have written some of its pages, as a crash in the middle of a
    /// flush would leave them.
    PowerLoss(Option<u64>),
    /// The process dies: everything it wrote stays, synced or not, a failed sync's pages too.
    ProcessCrash,
}

/// Opens what `stop` leaves of `mem` and checks it against what the run acknowledged. A
/// process crash opens `mem` itself, so it goes last.
fn check_after(mem: &MemStorage, ack: &Acknowledged, stop: Stop) {
    let storage = match stop {
        Stop::PowerLoss(keep) => mem.crash_image(keep),
        Stop::ProcessCrash => mem.clone(),
    };
    let store = Store::open(Arc::new(storage) as Arc<dyn Storage>, options()).expect("the store always reopens");
    store.wait_for_merges().unwrap();
    for (id, tracked) in &ack.volumes {
        let actual = read_all(&store.volume(*id).expect("an acknowledged volume is there")).unwrap();
        if tracked.maybe_reverted.as_ref() == Some(&actual) {
            continue;
        }
        let (kept, grown) = actual.split_at(tracked.durable.len().min(actual.len()));
        if actual.len() != tracked.durable.len() {
            assert_eq!(Some(actual.len() as u64), tracked.maybe_grown, "volume {id:?}: its size");
            assert!(grown.iter().all(|b| *b == 0), "volume {id:?}: grown space that is not zeros");
        }
        common::assert_survived(kept, &tracked.durable, &tracked.maybe, &format!("volume {id:?}"));
    }
    let listed: Vec<SnapshotId> = store.list_snapshots(None).iter().map(|s| s.id).collect();
    for (snap, _, content) in &ack.snapshots {
        if !listed.contains(snap) {
            // Its deletion's event may have reached the disk though the call failed.
            assert!(ack.maybe_deleted.contains(snap), "acknowledged snapshot {snap:?} lost");
            continue;
        }
        let mut buf = vec![0u8; content.len()];
        store.open_snapshot(*snap).unwrap().read(&mut buf, 0).unwrap();
        assert!(&buf == content, "snapshot {snap:?} corrupt");
    }
    for snap in &ack.deleted {
        assert!(!listed.contains(snap), "deleted snapshot {snap:?} came back");
    }
    for id in &ack.deleted_volumes {
        assert!(matches!(store.volume(*id), Err(Error::NotFound { .. })), "deleted volume {id:?} came back");
    }
    for (checkpoint, of, at_checkpoint) in &ack.checkpoints {
        if !ack.volumes.iter().any(|(id, _)| id == of) {
            continue; // Its volume is deleted, or may be.
        }
        let changes = match store.changed_extents(*checkpoint, ChangeTarget::Volume(*of)) {
            Ok(changes) => changes,
            // A revert to an older snapshot took the checkpoint out of the volume's history.
            Err(Error::InvalidRequest(_)) => continue,
            Err(e) => panic!("changes since checkpoint {checkpoint:?}: {e}"),
        };
        let now = read_all(&store.volume(*of).unwrap()).unwrap();
        if let Some(block) = common::unlisted_change(&changes, at_checkpoint, &now) {
            panic!("block {block} changed since checkpoint {checkpoint:?} but is not listed");
        }
    }
}

#[test]
fn every_failure_point_is_clean() {
    // More variants of the workload: `CAIRN_FAULT_VARIANTS=N` runs N (default 1).
    let variants =
        std::env::var("CAIRN_FAULT_VARIANTS").map_or(1, |n| n.parse().expect("CAIRN_FAULT_VARIANTS is a number"));
    for variant in 0..variants {
        every_failure_point_of(variant);
    }
}

fn every_failure_point_of(variant: u64) {
    let no_failure = Failure { fail_after: u64::MAX, fault: Fault::Io, fail_reads: true, lasting: Lasting::Permanent };
    let (_, clean, total) = run(variant, no_failure);
    assert!(total > 50, "the workload does real I/O ({total} operations)");
    let clone = *clean.deleted_volumes.first().expect("the workload clones a volume and deletes it");
    assert!(clean.snapshots.iter().any(|(_, of, _)| *of == clone), "the workload snapshots the clone");
    let grown = clean.volumes.iter().any(|(_, v)| v.durable.len() as u64 > SIZE);
    assert!(grown, "the workload grows a volume");
    let checked = clean.checkpoints.iter().any(|(_, of, _)| clean.volumes.iter().any(|(id, _)| id == of));
    assert!(checked, "the workload keeps a checkpoint of a volume it keeps");
    let kinds = [
        (Fault::Io, true, Lasting::Permanent),
        (Fault::NoSpace, false, Lasting::Permanent),
        // After a transient fault the rest of the workload runs on working storage, so what
        // the engine acknowledges after the failure is checked too.
        (Fault::Io, true, Lasting::Transient),
        // A full disk that gets space back.
        (Fault::NoSpace, false, Lasting::Transient),
    ];
    for fail_after in 0..total {
        for (fault, fail_reads, lasting) in kinds {
            let (mem, ack, _) = run(variant, Failure { fail_after, fault, fail_reads, lasting });
            for stop in [Stop::PowerLoss(None), Stop::PowerLoss(Some(fail_after)), Stop::ProcessCrash] {
                check_after(&mem, &ack, stop);
            }
        }
    }
}

#[test]
fn after_a_failed_sync_the_disk_refuses_work_until_reopened() {
    // After a failed fdatasync the kernel may have dropped the dirty pages; a retry that
    // "succeeds" would acknowledge lost data. So the error sticks until the store is reopened.
    let (mem, control, store, id, vol) = faulty_store();
    vol.write(&[8u8; 8192], 0, true).unwrap();
    vol.write(&[9u8; 8192], 0, false).unwrap();
    control.fail_after(0, Fault::NoSpace, false);
    assert!(matches!(vol.flush(), Err(Error::Io(_))));
    control.heal();
    assert!(matches!(vol.flush(), Err(Error::Io(_))), "the failure sticks");
    assert!(matches!(vol.write(&[1u8; 512], 0, false), Err(Error::Io(_))));
    assert!(matches!(store.snapshot(id, "s"), Err(Error::Io(_))));
    drop(vol);
    drop(store);
    mem.power_loss();
    let store = Store::open(Arc::new(mem) as Arc<dyn Storage>, options()).unwrap();
    let vol = store.volume(id).unwrap();
    let mut buf = [0u8; 8192];
    vol.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|b| *b == 8), "the flushed write is there, the failed one is not");
    vol.write(&[7u8; 512], 0, true).unwrap();
    store.snapshot(id, "s").unwrap();
}

/// A store on memory with one volume "v" of `SIZE` bytes, whose first 4 KiB hold
/// `pattern(7, 4096)`, flushed, grown `grows` times by 512 bytes. With `grows` `None` it grows
/// until a grow makes the catalog compact (format.md §5.5: at 1000 frames). Returns the
/// storage, the volume, and the grows made before the compacting one (or its size after the
/// `grows`).
fn grown_store(grows: Option<u64>) -> (MemStorage, VolumeId, u64) {
    let mem = MemStorage::new();
    let store = Store::open(Arc::new(mem.clone()) as Arc<dyn Storage>, options()).unwrap();
    let id = store.create_volume("v", SIZE).unwrap().id;
    store.volume(id).unwrap().write(&pattern(7, 4096), 0, true).unwrap();
    let log_len = || mem.open("catalog.log", false).unwrap().size().unwrap();
    let mut size = SIZE;
    for grown in 0.. {
        if grows == Some(grown) {
            break;
        }
        let before = log_len();
        size += 512;
        store.grow(id, size).unwrap();
        if grows.is_none() && log_len() < before {
            return (mem, id, grown);
        }
    }
    store.close().unwrap();
    (mem, id, size)
}

/// [`grown_store`] one event short of compacting its log, everything synced, and the volume's
/// size.
fn store_one_event_short_of_compaction() -> (MemStorage, VolumeId, u64) {
    let (_, _, grows) = grown_store(None);
    grown_store(Some(grows))
}

#[test]
fn every_failure_point_of_a_catalog_compaction_is_clean() {
    let (base, id, size) = store_one_event_short_of_compaction();
    let mut compacted_cleanly = false;
    for fail_after in 0.. {
        let mem = base.crash_image(None);
        let faulty = FaultyStorage::new(Arc::new(mem.clone()));
        let control = faulty.control();
        let store = Store::open(Arc::new(faulty) as Arc<dyn Storage>, options()).unwrap();
        let start = control.ops();
        control.fail_after(fail_after, Fault::Io, true);
        let grown = store.grow(id, size + 512);
        let fired = control.ops() - start > fail_after;
        control.heal();
        // After a fault no event is acknowledged until the store is reopened: the compaction
        // may have renamed the old log away.
        let next = store.grow(id, size + 1024);
        assert_eq!(next.is_err(), fired, "failure point {fail_after}: {next:?} after {grown:?}");
        drop(store);
        for keep in [None, Some(fail_after)] {
            let image = mem.crash_image(keep);
            let store = Store::open(Arc::new(image) as Arc<dyn Storage>, options())
                .unwrap_or_else(|e| panic!("failure point {fail_after}, keep {keep:?}: the store does not open: {e}"));
            let vol = store.volume(id).unwrap();
            let now = vol.size();
            let allowed: &[u64] = match (&grown, &next) {
                (Ok(()), Ok(())) => &[size + 1024],
                (Ok(()), Err(_)) => &[size + 512],
                (Err(_), _) => &[size, size + 512],
            };
            assert!(allowed.contains(&now), "failure point {fail_after}, keep {keep:?}: size {now}, {grown:?}");
            let mut buf = vec![0u8; 4096];
            vol.read(&mut buf, 0).unwrap();
            assert_eq!(buf, pattern(7, 4096), "failure point {fail_after}: the flushed write");
            // The store goes on: another event.
            store.grow(id, now + 512).unwrap();
        }
        if !fired {
            let log_len = |mem: &MemStorage| mem.open("catalog.log", false).unwrap().size().unwrap();
            compacted_cleanly = grown.is_ok() && log_len(&mem) < log_len(&base);
            break;
        }
    }
    assert!(compacted_cleanly, "the last run compacted the log without a fault");
}

/// For each failure point that fails the snapshot "s" of a new store's volume after the
/// snapshot's event is durable (the old head's journal sync fails: the call fails and the
/// snapshot exists), calls `check` with the failure point and what the failed snapshot left.
/// `prepare` sets the volume up before the fault is armed; what it returns goes to `check`.
/// The sync and the event's append run on two threads, so which of them a failure point hits
/// varies: each point is tried a few times. Fails if no failure point does it.
fn for_each_snapshot_failing_after_its_event<T>(
    prepare: impl Fn(&Store, VolumeId, &Volume) -> T,
    mut check: impl FnMut(u64, MemStorage, Store, VolumeId, Volume, T),
) {
    let mut found = false;
    for fail_after in (0..).flat_map(|n| std::iter::repeat_n(n, 8)) {
        let (mem, control, store, id, vol) = faulty_store();
        let prepared = prepare(&store, id, &vol);
        control.fail_once(fail_after, Fault::Io, true);
        match store.snapshot(id, "s") {
            Ok(_) => break, // Past the snapshot's last storage operation.
            Err(_) if store.snapshot_id(id, "s").is_ok() => {
                found = true;
                check(fail_after, mem, store, id, vol, prepared);
            }
            Err(_) => {}
        }
    }
    assert!(found, "no failure point failed a snapshot after its event");
}

#[test]
fn a_snapshot_whose_layer_failed_its_last_journal_sync_is_not_reverted_to_or_cloned() {
    // The snapshot's layer may lack what it reads.
    for_each_snapshot_failing_after_its_event(
        |_, _, vol| vol.write(&[5u8; 8192], 0, false).unwrap(),
        |fail_after, _, store, id, vol, ()| {
            let snap = store.snapshot_id(id, "s").unwrap();
            let what = format!("failure point {fail_after}");
            assert!(matches!(store.revert(id, snap), Err(Error::Io(_))), "{what}: revert");
            assert!(matches!(store.clone_snapshot(snap, "c", None), Err(Error::Io(_))), "{what}: clone");
            assert!(matches!(vol.flush(), Err(Error::Io(_))), "{what}: the volume still flushes");
        },
    );
}

#[test]
fn a_merged_block_overwritten_before_a_snapshot_that_lost_its_journal_batch_is_listed() {
    // Here the old head held a block that a merge had copied in and that the guest overwrote
    // in place just before: the new bytes were synced with the head's data, the block's
    // written mark was in the batch that a power loss then takes. The snapshot's layer, no
    // longer a head, reads the new bytes; change tracking must still list them.
    for_each_snapshot_failing_after_its_event(
        |store, id, vol| {
            vol.write(&[1u8; 8192], 0, true).unwrap();
            let backup = store.snapshot(id, "backup").unwrap().id;
            store.delete_snapshot(backup, true).unwrap();
            store.wait_for_merges().unwrap();
            vol.write(&[9u8; 4096], 4096, false).unwrap();
            backup
        },
        |fail_after, mem, store, id, vol, backup| {
            drop(vol);
            drop(store);
            mem.power_loss();
            let store = Store::open(Arc::new(mem) as Arc<dyn Storage>, options()).unwrap();
            let snap = store.snapshot_id(id, "s").unwrap();
            let mut block = vec![0u8; 4096];
            store.open_snapshot(snap).unwrap().read(&mut block, 4096).unwrap();
            if block.contains(&9) {
                for target in [ChangeTarget::Snapshot(snap), ChangeTarget::Volume(id)] {
                    let changed = store.changed_extents(backup, target).unwrap();
                    assert!(
                        changed.iter().any(|e| e.offset <= 4096 && 4096 < e.offset + e.length),
                        "failure point {fail_after}: block 1 changed since the checkpoint but {target:?} does \
                         not list it"
                    );
                }
            }
        },
    );
}
