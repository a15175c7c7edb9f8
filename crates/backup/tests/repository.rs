//! Backups round-trip byte for byte, incrementally, deduplicated and encrypted; damage and
//! backend faults are reported, never silent.

mod common;

use std::ops::Range;
use std::sync::Arc;

use cairn_backup::*;
use cairn_testkit::pattern as noise;
use common::{full, incremental, labels, restored, Disk};
use proptest::prelude::*;

fn memory_repo(passphrase: Option<&str>) -> (Arc<dyn Backend>, Repository) {
    let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
    let repo = Repository::init(backend.clone(), passphrase, KdfParams::cheap()).unwrap();
    (backend, repo)
}

#[test]
fn a_sparse_unaligned_disk_round_trips_and_an_identical_one_costs_nothing() {
    let (backend, repo) = memory_repo(None);
    // 3 MiB + 1000 bytes: the last chunk is short; the middle is a hole.
    let disk = Disk::new((3 << 20) + 1000);
    disk.write(0, &noise(1 << 20, 1));
    disk.write((2 << 20) + 5, &noise((1 << 20) + 995, 2));
    let first = full(&repo, &disk);
    assert_eq!(restored(&repo, &first), disk.bytes());
    // The same content again, as another disk: every chunk is already there.
    let second = full(&repo, &disk);
    assert_eq!(second.stats.chunks_new, 0, "{:?}", second.stats);
    assert_eq!(restored(&repo, &second), disk.bytes());
    // A reopened repository finds both through its index.
    let reopened = Repository::open(backend, None).unwrap();
    assert_eq!(reopened.list_backups().unwrap().len(), 2);
    assert_eq!(restored(&reopened, &first), disk.bytes());
}

#[test]
fn an_incremental_backup_reads_only_what_changed() {
    let (_, repo) = memory_repo(None);
    let disk = Disk::new(8 << 20);
    disk.write(0, &noise(8 << 20, 3));
    let base = full(&repo, &disk);
    let before = disk.bytes();
    // Two small writes: one inside a chunk, one across a chunk boundary.
    disk.write(100_000, &noise(10, 4));
    disk.write((5 << 20) - 10, &noise(20, 5));
    let changed = [100_000..100_010, (5 << 20) - 10..(5 << 20) + 10];
    let next = incremental(&repo, &disk, &base, &changed);
    assert_eq!(next.stats.chunks_read, 3, "one chunk, then two across the boundary");
    assert_eq!(next.stats.chunks_new, 3 + 1, "three chunks and the one segment that changed");
    assert_eq!(next.parent.as_deref(), Some(base.id.as_str()));
    assert_eq!(restored(&repo, &next), disk.bytes());
    assert_eq!(restored(&repo, &base), before, "the older backup is untouched");
}

#[test]
fn a_delta_restore_writes_only_the_chunks_that_differ() {
    let (_, repo) = memory_repo(None);
    let disk = Disk::new(4 << 20);
    disk.write(0, &noise(4 << 20, 6));
    let backup = full(&repo, &disk);
    // The target drifted from the backup in two chunks, one of them now zero in the backup.
    disk.write(70_000, &noise(100, 7));
    disk.write(3 << 20, &noise(10, 8));
    let stats = repo.restore(&backup.id, &disk, Some(&disk), None).unwrap();
    assert_eq!(stats.chunks_written, 2);
    assert_eq!(stats.chunks_unchanged, (4 << 20) / CHUNK_SIZE - 2);
    assert_eq!(disk.bytes(), restored(&repo, &backup));
}

#[test]
fn an_encrypted_repository_needs_its_passphrase() {
    let (backend, repo) = memory_repo(Some("correct horse"));
    let disk = Disk::new(1 << 20);
    disk.write(0, &b"secret text ".repeat(1000));
    let backup = full(&repo, &disk);
    assert!(matches!(Repository::open(backend.clone(), None), Err(Error::NeedPassphrase)));
    assert!(matches!(
        Repository::open(backend.clone(), Some("battery staple")),
        Err(Error::Crypto(CryptoError::WrongPassphrase))
    ));
    let reopened = Repository::open(backend.clone(), Some("correct horse")).unwrap();
    assert_eq!(restored(&reopened, &backup), disk.bytes());
    // Nothing stored says what the disk holds.
    for object in backend.list("").unwrap() {
        let bytes = backend.get(&object.key).unwrap();
        assert!(!bytes.windows(12).any(|w| w == b"secret text "), "{} holds plaintext", object.key);
    }
}

#[test]
fn a_tampered_chunk_is_found_and_named_by_backup() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(DirBackend::new(dir.path()).unwrap());
    let repo = Repository::init(backend.clone(), Some("p"), KdfParams::cheap()).unwrap();
    let disk = Disk::new(2 << 20);
    disk.write(0, &noise(2 << 20, 9));
    let backup = full(&repo, &disk);
    assert!(repo.verify(None, None).unwrap().problems.is_empty());
    // Flip one byte in the middle of the (only) pack.
    let pack = backend.list("packs/").unwrap().remove(0);
    let path = dir.path().join(&pack.key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1 << 20] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let report = repo.verify(None, None).unwrap();
    assert_eq!(report.damaged_backups, vec![backup.id.clone()], "{report:?}");
    assert!(report.problems.iter().any(|p| p.contains("altered or damaged")), "{report:?}");
    let target = Disk::new(2 << 20);
    match repo.restore(&backup.id, &target, None, None) {
        Err(Error::Corrupt { .. }) => {}
        other => panic!("restoring a damaged backup: {other:?}"),
    }
}

#[test]
fn backend_faults_fail_the_backup_and_leave_the_repository_sound() {
    let inner: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
    let faulty = Arc::new(FaultyBackend::new(inner));
    let backend: Arc<dyn Backend> = faulty.clone();
    let repo = Repository::init(backend.clone(), None, KdfParams::cheap()).unwrap();
    let disk = Disk::new(40 << 20);
    disk.write(0, &noise(40 << 20, 10));
    let good = full(&repo, &disk);
    disk.write(0, &noise(40 << 20, 11));
    for (after, fault) in [(0, Fault::Error), (1, Fault::PartialWrite), (2, Fault::Error)] {
        faulty.fail_after(after, fault, false);
        let result =
            repo.backup(&disk, BackupRequest { labels: labels(), parent: None, allocated: None, progress: None });
        assert!(result.is_err(), "a backup through a failing backend must fail");
        faulty.heal();
    }
    // Whatever the failed backups left, the repository reopens, verifies and restores.
    let reopened = Repository::open(backend, None).unwrap();
    let report = reopened.verify(None, None).unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
    assert_eq!(reopened.list_backups().unwrap().len(), 1);
    let target = Disk::new(40 << 20);
    reopened.restore(&good.id, &target, None, None).unwrap();
    assert_eq!(target.bytes()[..1000], noise(40 << 20, 10)[..1000]);
    let retry = full(&reopened, &disk);
    assert_eq!(restored(&reopened, &retry), disk.bytes());
}

#[test]
fn a_flaky_backend_is_ridden_over_by_retries_and_a_dead_one_is_reported() {
    let faulty = Arc::new(FaultyBackend::new(Arc::new(ObjectStoreBackend::memory())));
    let retrying: Arc<dyn Backend> = Arc::new(RetryingBackend::new(faulty.clone(), 3, std::time::Duration::ZERO));
    let repo = Repository::init(retrying.clone(), Some("pw"), KdfParams::cheap()).unwrap();
    // Every third call fails, and a failing put leaves half an object behind.
    faulty.fail_every(3, Fault::PartialWrite);
    let disk = Disk::new(20 << 20);
    disk.write(1 << 20, &noise(17 << 20, 12));
    let first = full(&repo, &disk);
    disk.write(5 << 20, &noise(1 << 20, 13));
    let changed = (5 << 20)..(6 << 20);
    let second = incremental(&repo, &disk, &first, std::slice::from_ref(&changed));
    assert_eq!(restored(&repo, &second), disk.bytes());
    repo.forget(&first.id).unwrap();
    let gc = GcOptions { grace: std::time::Duration::ZERO, repack_unused_percent: 0, ..GcOptions::default() };
    repo.gc(&gc, None).unwrap();
    assert!(repo.verify(None, None).unwrap().problems.is_empty());
    assert!(faulty.calls() > 30, "the faults were exercised: {} calls", faulty.calls());
    // A backend that fails every call is reported after the last attempt, with the reason.
    faulty.fail_every(1, Fault::Error);
    let error = repo.backup(&disk, BackupRequest { labels: labels(), parent: None, allocated: None, progress: None });
    let message = error.unwrap_err().to_string();
    assert!(message.contains("after 3 attempts"), "{message}");
    faulty.heal();
    assert_eq!(restored(&Repository::open(retrying, Some("pw")).unwrap(), &second), disk.bytes());
}

/// A backup that fails after uploading packs but before its index object names them must not
/// teach this process that those chunks are stored: a later backup in the same process would
/// point its record into packs no index names, which a restart (and GC) would lose.
#[test]
fn a_failed_backup_leaves_nothing_a_later_backup_in_the_same_process_relies_on() {
    let mut fail_after = 0;
    loop {
        let faulty = Arc::new(FaultyBackend::new(Arc::new(ObjectStoreBackend::memory())));
        let backend: Arc<dyn Backend> = faulty.clone();
        let repo = Repository::init(backend.clone(), None, KdfParams::cheap()).unwrap();
        let disk = Disk::new(6 << 20);
        disk.write(0, &noise(6 << 20, 14));
        faulty.fail_after(fail_after, Fault::Error, false);
        let failed =
            repo.backup(&disk, BackupRequest { labels: labels(), parent: None, allocated: None, progress: None });
        faulty.heal();
        let again = full(&repo, &disk);
        let reopened = Repository::open(backend, None).unwrap();
        assert_eq!(restored(&reopened, &again), disk.bytes(), "first backup cut after {fail_after} writes");
        assert!(reopened.verify(None, None).unwrap().problems.is_empty());
        if failed.is_ok() {
            break;
        }
        fail_after += 1;
    }
    assert!(fail_after >= 2, "the backup made {fail_after} writes");
}

#[derive(Debug, Clone)]
enum Step {
    Write { offset: usize, len: usize, seed: u64 },
    Zero { offset: usize, len: usize },
    Backup,
}

fn step(size: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..size, 1..200_000usize, any::<u64>()).prop_map(move |(offset, len, seed)| Step::Write {
            offset,
            len: len.min(size - offset),
            seed
        }),
        1 => (0..size, 1..300_000usize).prop_map(move |(offset, len)| Step::Zero { offset, len: len.min(size - offset) }),
        2 => Just(Step::Backup),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random writes and incremental backups against the disk's history: every backup restores
    /// to exactly the disk as it was when taken.
    #[test]
    fn every_backup_restores_its_point_in_time(steps in proptest::collection::vec(step(1_500_000), 1..25)) {
        let (_, repo) = memory_repo(None);
        let disk = Disk::new(1_500_000);
        let mut changed: Vec<Range<u64>> = Vec::new();
        let mut history: Vec<(BackupRecord, Vec<u8>)> = Vec::new();
        for step in steps {
            match step {
                Step::Write { offset, len, seed } => {
                    disk.write(offset, &noise(len, seed));
                    changed.push(offset as u64..(offset + len) as u64);
                }
                Step::Zero { offset, len } => {
                    disk.write(offset, &vec![0; len]);
                    changed.push(offset as u64..(offset + len) as u64);
                }
                Step::Backup => {
                    let backup = match history.last() {
                        Some((parent, _)) => incremental(&repo, &disk, parent, &changed),
                        None => full(&repo, &disk),
                    };
                    changed.clear();
                    history.push((backup, disk.bytes()));
                }
            }
        }
        for (backup, expected) in &history {
            prop_assert!(restored(&repo, backup) == *expected, "backup {} differs", backup.id);
        }
        prop_assert!(repo.verify(None, None).unwrap().problems.is_empty());
    }
}
