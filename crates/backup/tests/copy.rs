//! Copying backups to a second repository (the off-site copy): byte for byte, incremental by
//! the parent's copy, idempotent, and never leaving a record for an incomplete copy.

mod common;

use std::sync::Arc;

use cairn_backup::*;
use cairn_testkit::pattern as noise;
use common::{full, incremental, restored, Disk};

const CHUNK: usize = CHUNK_SIZE as usize;

fn repo(backend: Arc<dyn Backend>, passphrase: &str) -> Repository {
    Repository::init(backend, Some(passphrase), KdfParams::cheap()).unwrap()
}

fn memory() -> Arc<dyn Backend> {
    Arc::new(ObjectStoreBackend::memory())
}

#[test]
fn a_copy_restores_byte_for_byte_and_the_next_one_fetches_only_what_changed() {
    let counted = Arc::new(FaultyBackend::new(memory()));
    let source = repo(counted.clone(), "here");
    let offsite = repo(memory(), "there");
    // 40 chunks with a hole and an unaligned tail.
    let disk = Disk::new(40 * CHUNK + 1000);
    disk.write(0, &noise(20 * CHUNK, 1));
    disk.write(30 * CHUNK, &noise(10 * CHUNK + 1000, 2));
    let first = full(&source, &disk);
    let stats = source.copy_backup(&first.id, &offsite, None).unwrap();
    assert_eq!(stats.chunks_fetched, 31, "every non-zero chunk once: {stats:?}");
    let copy = offsite.backup_record(&first.id).unwrap();
    assert_eq!((copy.time, &copy.labels, copy.size), (first.time, &first.labels, first.size));
    assert!(restored(&offsite, &copy) == disk.bytes());

    // Three chunks change; the copy of the child fetches those three and nothing else.
    disk.write(CHUNK + 5, &noise(10, 3));
    disk.write(33 * CHUNK, &noise(2 * CHUNK, 4));
    let changed = [CHUNK as u64..CHUNK as u64 + 15, 33 * CHUNK as u64..35 * CHUNK as u64];
    let second = incremental(&source, &disk, &first, &changed);
    let calls_before = counted.calls();
    let stats = source.copy_backup(&second.id, &offsite, None).unwrap();
    assert_eq!(stats.chunks_fetched, 3, "{stats:?}");
    let source_calls = counted.calls() - calls_before;
    assert!(source_calls < 20, "{source_calls} calls to the source for 3 chunks");
    assert!(restored(&offsite, &offsite.backup_record(&second.id).unwrap()) == disk.bytes());
    assert!(offsite.verify(None, None).unwrap().problems.is_empty());

    // Again: nothing to do.
    assert!(source.copy_backup(&second.id, &offsite, None).unwrap().already_there);
}

#[test]
fn a_copy_cut_short_leaves_no_record_and_a_retry_completes() {
    let source = repo(memory(), "here");
    let disk = Disk::new(12 * CHUNK);
    disk.write(0, &noise(12 * CHUNK, 5));
    let backup = full(&source, &disk);
    let mut fail_after = 0;
    loop {
        let faulty = Arc::new(FaultyBackend::new(memory()));
        let offsite = repo(faulty.clone(), "there");
        faulty.fail_after(fail_after, Fault::Error, false);
        let done = source.copy_backup(&backup.id, &offsite, None).is_ok();
        faulty.heal();
        let offsite = Repository::open(faulty.clone(), Some("there")).unwrap();
        if !done {
            assert!(!offsite.has_backup(&backup.id).unwrap(), "cut after {fail_after} writes: a record");
            assert!(offsite.verify(None, None).unwrap().problems.is_empty());
            source.copy_backup(&backup.id, &offsite, None).unwrap();
        }
        assert!(restored(&offsite, &offsite.backup_record(&backup.id).unwrap()) == disk.bytes());
        if done {
            break;
        }
        fail_after += 1;
    }
    assert!(fail_after >= 3, "the copy made {fail_after} writes");
}

#[test]
fn a_corrupt_source_chunk_fails_the_copy_by_name() {
    let backend = memory();
    let source = repo(backend.clone(), "here");
    let disk = Disk::new(4 * CHUNK);
    disk.write(0, &noise(4 * CHUNK, 6));
    let backup = full(&source, &disk);
    // Flip a byte in the middle of the only pack.
    let pack = backend.list("packs/").unwrap().remove(0);
    let mut bytes = backend.get(&pack.key).unwrap().to_vec();
    bytes[100] ^= 0xff;
    backend.put(&pack.key, bytes.into()).unwrap();
    let offsite = repo(memory(), "there");
    let error = source.copy_backup(&backup.id, &offsite, None).unwrap_err();
    assert!(matches!(error, Error::Corrupt { .. }), "{error}");
    assert!(!offsite.has_backup(&backup.id).unwrap());
}
