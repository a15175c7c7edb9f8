//! Garbage collection: deletes only what no backup needs, repacks mostly-dead packs, waits for
//! sessions that might still use what it condemned, and survives being stopped at any point.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cairn_backup::*;
use cairn_testkit::pattern as noise;
use proptest::prelude::*;

const CHUNK: usize = CHUNK_SIZE as usize;

/// A disk in memory; a gate, when set, holds every read until the test opens it, so a backup
/// can be kept running while GC works.
struct Disk {
    bytes: RwLock<Vec<u8>>,
    gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl Disk {
    fn new(bytes: Vec<u8>) -> Disk {
        Disk { bytes: RwLock::new(bytes), gate: Mutex::new(None) }
    }
}

impl BlockSource for Disk {
    fn size(&self) -> u64 {
        self.bytes.read().unwrap().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if let Some((started, go)) = self.gate.lock().unwrap().take() {
            started.send(()).unwrap();
            go.recv().unwrap();
        }
        let disk = self.bytes.read().unwrap();
        buf.copy_from_slice(&disk[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl BlockSink for Disk {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.bytes.write().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.bytes.write().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn back_up(repo: &Repository, bytes: &[u8]) -> BackupRecord {
    let request = BackupRequest { labels: BTreeMap::new(), parent: None, allocated: None, progress: None };
    repo.backup(&Disk::new(bytes.to_vec()), request).unwrap()
}

fn restored(repo: &Repository, backup: &BackupRecord) -> Vec<u8> {
    let target = Disk::new(vec![0; backup.size as usize]);
    repo.restore(&backup.id, &target, None, None).unwrap();
    target.bytes.into_inner().unwrap()
}

fn now() -> GcOptions {
    GcOptions { grace: Duration::ZERO, ..GcOptions::default() }
}

fn stored_bytes(backend: &dyn Backend) -> u64 {
    backend.list("packs/").unwrap().iter().map(|o| o.size).sum()
}

fn assert_sound(repo: &Repository, backups: &[(BackupRecord, Vec<u8>)]) {
    let report = repo.verify(None, None).unwrap();
    assert!(report.problems.is_empty(), "verify: {:?}", report.problems);
    for (backup, bytes) in backups {
        assert!(restored(repo, backup) == *bytes, "backup {} restores its disk", backup.id);
    }
}

/// A session marker as another process would write it, one that has seen no condemned list.
fn put_marker(backend: &dyn Backend, key: &str, kind: &str, host: &str, pid: u32) {
    let body = serde_json::json!({"version": 1, "kind": kind, "host": host, "pid": pid, "started": 0, "seen": []});
    backend.put(key, bytes::Bytes::from(body.to_string())).unwrap();
}

fn repo(backend: &Arc<dyn Backend>) -> Repository {
    Repository::init(backend.clone(), Some("secret"), KdfParams::cheap()).unwrap()
}

#[test]
fn gc_deletes_a_forgotten_backups_own_chunks_and_keeps_the_shared_ones() {
    let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
    let repo = repo(&backend);
    let first_disk = noise(40 * CHUNK, 1);
    let first = back_up(&repo, &first_disk);
    let mut second_disk = first_disk.clone();
    second_disk[..10 * CHUNK].copy_from_slice(&noise(10 * CHUNK, 2));
    let second = back_up(&repo, &second_disk);
    let before = stored_bytes(&*backend);

    // Nothing is garbage yet.
    let report = repo.gc(&now(), None).unwrap();
    assert_eq!((report.packs_condemned, report.packs_deleted), (0, 0));

    repo.forget(&first.id).unwrap();
    assert!(matches!(repo.forget(&first.id), Err(Error::BackupNotFound(_))));
    // The first backup's pack holds 40 chunks, 30 of them still the second's: a quarter dead
    // is under the default repack threshold, so it stays whole.
    let report = repo.gc(&now(), None).unwrap();
    assert_eq!((report.packs_condemned, report.packs_deleted), (0, 0), "{report:?}");
    // At a lower threshold its live chunks move to a new pack and it goes.
    let options = GcOptions { repack_unused_percent: 10, ..now() };
    let dry = repo.gc(&GcOptions { dry_run: true, ..options.clone() }, None).unwrap();
    assert_eq!(stored_bytes(&*backend), before, "a dry run changes nothing");
    let report = repo.gc(&options, None).unwrap();
    assert_eq!((report.packs_repacked, report.packs_deleted), (dry.packs_repacked, dry.packs_deleted));
    assert_eq!(report.packs_repacked, 1, "{report:?}");
    assert_eq!(report.packs_deleted, 1, "{report:?}");
    assert!(report.waiting_for.is_empty());
    let after = stored_bytes(&*backend);
    let ten_chunks = 10 * CHUNK as u64;
    assert!(before - after >= ten_chunks, "{before} -> {after}: the ten forgotten chunks are gone");
    assert!(backend.list("gc/").unwrap().is_empty(), "the condemned list is done with");
    assert!(backend.list("locks/").unwrap().is_empty(), "no marker is left behind");
    assert_sound(&repo, &[(second, second_disk)]);
    let reopened = Repository::open(backend.clone(), Some("secret")).unwrap();
    assert_eq!(reopened.list_backups().unwrap().len(), 1);
}

/// A backup labelled with `tenant`, full or (with `parent`) incremental.
fn back_up_for(
    repo: &Repository,
    tenant: &str,
    bytes: &[u8],
    parent: Option<(&BackupRecord, &[Range<u64>])>,
) -> BackupRecord {
    let labels = BTreeMap::from([("tenant".to_string(), tenant.to_string())]);
    let request = BackupRequest { labels, parent, allocated: None, progress: None };
    repo.backup(&Disk::new(bytes.to_vec()), request).unwrap()
}

#[test]
fn gc_counts_each_tenants_stored_bytes_once_however_many_backups_share_them() {
    let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
    let repo = repo(&backend);
    let disk = noise(8 * CHUNK, 3);
    let mut changed = disk.clone();
    changed[..CHUNK].copy_from_slice(&noise(CHUNK, 4));
    back_up_for(&repo, "a", &disk, None);
    let second = back_up_for(&repo, "a", &changed, None);
    // The same disk under another tenant: stored once in the repository, counted for each.
    back_up_for(&repo, "b", &disk, None);
    let dry = GcOptions { dry_run: true, ..now() };
    let report = repo.gc(&dry, None).unwrap();
    let (a, b) = (report.bytes_by_tenant["a"], report.bytes_by_tenant["b"]);
    // Noise does not compress: b holds 8 chunks and a manifest, a one chunk and one manifest
    // more, not twice b.
    assert!(b > 8 * CHUNK as u64, "{report:?}");
    let extra = a - b;
    assert!((CHUNK as u64..CHUNK as u64 + 4096).contains(&extra), "a - b = {extra}: {report:?}");
    // Per backup: a's second holds one chunk and its manifest alone; the first and b's backup
    // share everything (the same disk, the same manifest).
    let shares = &report.bytes_by_backup;
    let only_second = shares[&second.id].exclusive;
    assert_eq!(only_second, extra, "what a holds beyond b is what its second backup alone holds: {shares:?}");
    let firsts: Vec<&BackupBytes> = shares.iter().filter(|(id, _)| **id != second.id).map(|(_, b)| b).collect();
    assert!(firsts.iter().all(|b| b.exclusive == 0 && b.shared == report.bytes_by_tenant["b"]), "{shares:?}");
    // Once a's second backup is forgotten, a holds what b holds.
    repo.forget(&second.id).unwrap();
    let report = repo.gc(&dry, None).unwrap();
    assert_eq!(report.bytes_by_tenant["a"], report.bytes_by_tenant["b"], "{report:?}");
    assert!(!report.bytes_by_backup.contains_key(&second.id));
}

/// Billing on attributed bytes: every blob is counted once, for the oldest backup using it,
/// so the sum is what the backups keep stored; when that backup goes, its blobs that a newer
/// backup still uses move to that one instead of going unbilled.
#[test]
fn each_blob_is_attributed_once_and_moves_to_a_newer_backup_when_its_first_goes() {
    let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
    let repo = repo(&backend);
    let disk = noise(8 * CHUNK, 5);
    let mut changed = disk.clone();
    changed[..CHUNK].copy_from_slice(&noise(CHUNK, 6));
    let first = back_up_for(&repo, "a", &disk, None);
    // An incremental backup of the first, most likely within the same second: record times are
    // whole seconds, and it must still count as the younger.
    let changed_ranges = [Range { start: 0, end: CHUNK as u64 }];
    let second = back_up_for(&repo, "a", &changed, Some((&first, &changed_ranges[..])));
    let other = back_up_for(&repo, "b", &noise(2 * CHUNK, 7), None);
    let dry = GcOptions { dry_run: true, ..now() };
    let report = repo.gc(&dry, None).unwrap();
    let shares = &report.bytes_by_backup;
    let attributed: u64 = shares.values().map(|b| b.attributed).sum();
    let (a, b) = (report.bytes_by_tenant["a"], report.bytes_by_tenant["b"]);
    assert_eq!(attributed, a + b, "tenants share no blob here, so the sum is both tenants' bytes: {report:?}");
    assert_eq!(shares[&other.id].attributed, b, "{report:?}");
    assert_eq!(shares[&first.id].attributed + shares[&second.id].attributed, a, "{report:?}");
    // The first is the older: the seven chunks both use are its; the second has only its new
    // chunk and manifest.
    assert_eq!(shares[&second.id].attributed, shares[&second.id].exclusive, "{report:?}");
    assert!(shares[&first.id].attributed > 7 * CHUNK as u64, "{report:?}");
    for share in shares.values() {
        assert!(share.attributed >= share.exclusive && share.attributed <= share.exclusive + share.shared);
    }
    repo.forget(&first.id).unwrap();
    let report = repo.gc(&dry, None).unwrap();
    let now_second = report.bytes_by_backup[&second.id];
    assert_eq!(now_second.attributed, report.bytes_by_tenant["a"], "{report:?}");
    assert_eq!(now_second.attributed, now_second.exclusive, "the second alone holds a's data now: {report:?}");
}

#[test]
fn a_backup_running_during_gc_keeps_what_it_uses() {
    let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
    let repo = Arc::new(repo(&backend));
    let disk_bytes = noise(8 * CHUNK, 3);
    let old = back_up(&repo, &disk_bytes);
    repo.forget(&old.id).unwrap();

    // A backup of the same data begins, and loads the index with the forgotten chunks in it,
    // then stalls on its first read.
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let disk = Arc::new(Disk::new(disk_bytes.clone()));
    *disk.gate.lock().unwrap() = Some((started_tx, go_rx));
    let running = {
        let (repo, disk) = (repo.clone(), disk.clone());
        std::thread::spawn(move || {
            let request = BackupRequest { labels: BTreeMap::new(), parent: None, allocated: None, progress: None };
            repo.backup(&*disk, request).unwrap()
        })
    };
    started.recv().unwrap();

    // GC condemns the forgotten chunks but must not delete them: the running backup may use them.
    let gc_repo = Repository::open(backend.clone(), Some("secret")).unwrap();
    let report = gc_repo.gc(&now(), None).unwrap();
    assert!(report.packs_condemned >= 1);
    assert_eq!(report.packs_deleted, 0, "{report:?}");
    assert_eq!(report.waiting_for.len(), 1, "{report:?}");
    assert_eq!(backend.list("gc/").unwrap().len(), 1);

    go.send(()).unwrap();
    let new = running.join().unwrap();
    assert_eq!(new.stats.chunks_new, 0, "the backup deduplicated against the condemned chunks");

    // Now the list can be collected, and the packs the new backup needs are spared.
    let report = gc_repo.gc(&now(), None).unwrap();
    assert!(report.packs_rescued >= 1, "{report:?}");
    assert!(backend.list("gc/").unwrap().is_empty());
    assert_sound(&gc_repo, &[(new, disk_bytes)]);
}

#[test]
fn a_backup_begun_after_the_condemned_list_stores_its_own_copies() {
    let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
    let repo = repo(&backend);
    let disk_bytes = noise(6 * CHUNK, 4);
    let old = back_up(&repo, &disk_bytes);
    repo.forget(&old.id).unwrap();
    // A restore session that saw nothing holds the list open: model it with a stale-proof
    // marker from a session that is "running" (a marker object written by hand).
    put_marker(&*backend, "locks/elsewhere", "restore", "elsewhere", 1);
    let report = repo.gc(&now(), None).unwrap();
    assert_eq!((report.packs_deleted, report.waiting_for.len()), (0, 1));
    // A backup now sees the list and does not dedup against the condemned packs.
    let new = back_up(&repo, &disk_bytes);
    assert_eq!(new.stats.chunks_new, 7, "six chunks and the manifest segment, all condemned");
    backend.delete("locks/elsewhere").unwrap();
    let report = repo.gc(&now(), None).unwrap();
    assert_eq!(report.packs_rescued, 0, "the new backup has its own copies: {report:?}");
    assert!(report.packs_deleted >= 1);
    assert_sound(&repo, &[(new, disk_bytes)]);
}

#[test]
fn stale_and_dead_markers_are_ignored_and_removed_and_a_second_gc_is_refused() {
    let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
    let repo = repo(&backend);
    let old = back_up(&repo, &noise(3 * CHUNK, 5));
    repo.forget(&old.id).unwrap();
    put_marker(&*backend, "locks/gone", "backup", "elsewhere", 1);
    // With stale_after zero every other marker is stale.
    let report = repo.gc(&GcOptions { stale_after: Duration::ZERO, ..now() }, None).unwrap();
    assert_eq!(report.stale_markers_removed, 1);
    assert!(report.packs_deleted >= 1);
    assert!(backend.list("locks/").unwrap().is_empty());

    // A marker of a process on this machine that is gone counts as stale at once.
    let old = back_up(&repo, &noise(3 * CHUNK, 10));
    repo.forget(&old.id).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    put_marker(&*backend, "locks/dead", "gc", host.trim(), child.id());
    let report = repo.gc(&now(), None).unwrap();
    assert_eq!(report.stale_markers_removed, 1, "{report:?}");
    assert!(report.packs_deleted >= 1, "{report:?}");

    put_marker(&*backend, "locks/othergc", "gc", "elsewhere", 1);
    assert!(matches!(repo.gc(&now(), None), Err(Error::Busy(_))));
}

#[test]
fn young_packs_are_left_to_the_grace_period() {
    let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
    let repo = repo(&backend);
    let old = back_up(&repo, &noise(3 * CHUNK, 6));
    repo.forget(&old.id).unwrap();
    let report = repo.gc(&GcOptions { grace: Duration::from_secs(3600), ..now() }, None).unwrap();
    assert_eq!((report.packs_condemned, report.packs_deleted), (0, 0));
}

/// GC stopped after every possible number of backend calls (a crash at each step), then run
/// again to the end: the repository verifies clean, every backup restores, and what was
/// forgotten is gone.
#[test]
fn gc_stopped_at_any_call_leaves_a_sound_repository_that_the_next_run_finishes() {
    let mut stop_after = 0;
    loop {
        let faulty = Arc::new(FaultyBackend::new(Arc::new(ObjectStoreBackend::memory())));
        let backend: Arc<dyn Backend> = faulty.clone();
        let repo = repo(&backend);
        let a = noise(12 * CHUNK, 7);
        let mut b = a.clone();
        b[..9 * CHUNK].copy_from_slice(&noise(9 * CHUNK, 8));
        let c = noise(5 * CHUNK, 9);
        let first = back_up(&repo, &a);
        let second = back_up(&repo, &b);
        let third = back_up(&repo, &c);
        repo.forget(&first.id).unwrap();
        repo.forget(&third.id).unwrap();
        let options = GcOptions { repack_unused_percent: 10, ..now() };
        faulty.fail_after(stop_after, Fault::Error, true);
        let finished = repo.gc(&options, None).is_ok();
        faulty.heal();
        // The crashed process is gone: a new one opens the repository. Its marker, if the
        // crash left one, goes stale; model that with stale_after zero.
        let reopened = Repository::open(backend.clone(), Some("secret")).unwrap();
        assert_sound(&reopened, &[(second.clone(), b.clone())]);
        let options = GcOptions { stale_after: Duration::ZERO, ..options };
        reopened.gc(&options, None).unwrap();
        assert!(backend.list("gc/").unwrap().is_empty(), "stopped after {stop_after} calls");
        let left = stored_bytes(&*backend);
        assert!(left < 13 * CHUNK as u64, "stopped after {stop_after}: {left} bytes left");
        assert_sound(&reopened, &[(second, b)]);
        if finished {
            break;
        }
        stop_after += 1;
    }
    assert!(stop_after > 10, "the run made {stop_after} backend calls");
}

#[derive(Debug, Clone)]
enum Step {
    BackUp(u64),
    Forget(usize),
    Gc(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => any::<u64>().prop_map(Step::BackUp),
        2 => any::<usize>().prop_map(Step::Forget),
        2 => (0u8..90).prop_map(Step::Gc),
    ]
}

/// Disks drawn from a few chunk patterns, so backups share chunks in varied ways.
fn disk_of(seed: u64) -> Vec<u8> {
    let chunks = 1 + (seed % 7) as usize;
    (0..chunks).flat_map(|i| noise(CHUNK, (seed >> (8 + 2 * i)) % 5)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random backups, forgets and GCs: every remaining backup restores, verify is clean, and
    /// after a final GC no pack is entirely unreferenced.
    #[test]
    fn backups_survive_any_sequence_of_forget_and_gc(steps in proptest::collection::vec(step(), 1..20)) {
        let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
        let repo = Repository::init(backend.clone(), None, KdfParams::cheap()).unwrap();
        let mut alive: Vec<(BackupRecord, Vec<u8>)> = Vec::new();
        for step in steps {
            match step {
                Step::BackUp(seed) => {
                    let bytes = disk_of(seed);
                    alive.push((back_up(&repo, &bytes), bytes));
                }
                Step::Forget(i) if !alive.is_empty() => {
                    let (record, _) = alive.remove(i % alive.len());
                    repo.forget(&record.id).unwrap();
                }
                Step::Forget(_) => {}
                Step::Gc(percent) => {
                    repo.gc(&GcOptions { repack_unused_percent: percent, ..now() }, None).unwrap();
                }
            }
        }
        let report = repo.gc(&GcOptions { repack_unused_percent: 0, ..now() }, None).unwrap();
        prop_assert!(report.waiting_for.is_empty());
        assert_sound(&repo, &alive);
        // A second full GC finds nothing left to do.
        let again = repo.gc(&GcOptions { repack_unused_percent: 0, ..now() }, None).unwrap();
        prop_assert_eq!(again.packs_condemned, 0, "{:?}", again);
        if alive.is_empty() {
            prop_assert_eq!(stored_bytes(&*backend), 0);
        }
    }
}
