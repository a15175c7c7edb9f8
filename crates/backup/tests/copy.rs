//! Copying backups to a second repository (the off-site copy): byte for byte whatever either
//! side's encryption, incremental by the parent's copy, idempotent, and never leaving a record
//! for an incomplete copy.

mod common;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cairn_backup::*;
use cairn_testkit::pattern as noise;
use common::{full, incremental, restored, Disk};

const CHUNK: usize = CHUNK_SIZE as usize;

fn repo(backend: Arc<dyn Backend>, passphrase: Option<&str>) -> Repository {
    Repository::init(backend, passphrase, KdfParams::cheap()).unwrap()
}

fn memory() -> Arc<dyn Backend> {
    Arc::new(ObjectStoreBackend::memory())
}

fn assert_verifies(repo: &Repository) {
    let report = repo.verify(None, None).unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
}

/// Counts the bytes read from packs, to show what a copy fetched from its source.
#[derive(Debug)]
struct PackReads {
    inner: Arc<dyn Backend>,
    bytes: AtomicU64,
}

impl PackReads {
    fn count(&self, key: &str, data: Bytes) -> Bytes {
        if key.starts_with("packs/") {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        data
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Backend for PackReads {
    fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        Ok(self.count(key, self.inner.get(key)?))
    }
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        Ok(self.count(key, self.inner.get_range(key, range)?))
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.inner.delete(key)
    }
}

/// 40 chunks: 20 of noise, a hole of 10, then 10 more and an unaligned tail (31 non-zero).
fn holey_disk() -> Disk {
    let disk = Disk::new(40 * CHUNK + 1000);
    disk.write(0, &noise(20 * CHUNK, 1));
    disk.write(30 * CHUNK, &noise(10 * CHUNK + 1000, 2));
    disk
}

#[test]
fn a_copy_restores_byte_for_byte_and_the_next_one_fetches_only_what_changed() {
    let counted = Arc::new(FaultyBackend::new(memory()));
    let reads = Arc::new(PackReads { inner: counted.clone(), bytes: AtomicU64::new(0) });
    let source = repo(reads.clone(), Some("here"));
    let offsite = repo(memory(), Some("there"));
    let disk = holey_disk();
    let first = full(&source, &disk);
    let stats = source.copy_backup(&first.id, &offsite, None).unwrap();
    assert!(!stats.already_there);
    assert_eq!(stats.chunks_fetched, 31, "every non-zero chunk once: {stats:?}");
    let whole_copy = reads.bytes();
    let copy = offsite.backup_record(&first.id).unwrap();
    assert_eq!((copy.time, &copy.labels, copy.size, &copy.parent), (first.time, &first.labels, first.size, &None));
    assert_eq!(copy.stats.chunks_read, 31);
    assert!(restored(&offsite, &copy) == disk.bytes());
    assert_verifies(&offsite);

    // Three chunks change; the copy of the child fetches those three and nothing else.
    disk.write(CHUNK + 5, &noise(10, 3));
    disk.write(33 * CHUNK, &noise(2 * CHUNK, 4));
    let changed = [CHUNK as u64..CHUNK as u64 + 15, 33 * CHUNK as u64..35 * CHUNK as u64];
    let second = incremental(&source, &disk, &first, &changed);
    let (calls_before, bytes_before) = (counted.calls(), reads.bytes());
    let stats = source.copy_backup(&second.id, &offsite, None).unwrap();
    assert_eq!(stats.chunks_fetched, 3, "{stats:?}");
    // Three chunks and the two backups' manifests, not the 31 chunks the first copy read.
    let fetched = reads.bytes() - bytes_before;
    assert!(fetched < 4 * CHUNK_SIZE && whole_copy > 25 * CHUNK_SIZE, "read {whole_copy} bytes, then {fetched}");
    let source_calls = counted.calls() - calls_before;
    assert!(source_calls < 20, "{source_calls} calls to the source for 3 chunks");
    let copy = offsite.backup_record(&second.id).unwrap();
    assert_eq!((copy.time, &copy.parent), (second.time, &Some(first.id.clone())));
    assert!(restored(&offsite, &copy) == disk.bytes());
    assert_verifies(&offsite);

    // Again: nothing to do, nothing read.
    let calls_before = counted.calls();
    let again = source.copy_backup(&second.id, &offsite, None).unwrap();
    assert_eq!(again, CopyStats { already_there: true, chunks_fetched: 0, chunks_new: 0, bytes_added: 0 });
    assert_eq!(counted.calls(), calls_before, "an idempotent copy asks only the destination");
}

#[test]
fn copies_cross_between_plain_and_encrypted_repositories() {
    let plain = repo(memory(), None);
    let sealed = repo(memory(), Some("off-site"));
    let back = repo(memory(), None);
    let disk = holey_disk();
    let backup = full(&plain, &disk);
    plain.copy_backup(&backup.id, &sealed, None).unwrap();
    sealed.copy_backup(&backup.id, &back, None).unwrap();
    for copy in [&sealed, &back] {
        assert!(restored(copy, &copy.backup_record(&backup.id).unwrap()) == disk.bytes());
        assert_verifies(copy);
    }
    // The encrypted copy holds no chunk the plain one names: other keys, other ids.
    let listed = |r: &Repository| r.list_backups().unwrap().into_iter().flat_map(|b| b.segments).collect::<Vec<_>>();
    assert!(listed(&sealed).iter().all(|s| !listed(&plain).contains(s)));
    assert_eq!(listed(&back), listed(&plain), "same (plain) keys, same manifest");
}

#[test]
fn a_child_whose_parent_was_never_copied_is_copied_whole() {
    let source = repo(memory(), Some("here"));
    let offsite = repo(memory(), Some("there"));
    let disk = holey_disk();
    let first = full(&source, &disk);
    disk.write(2 * CHUNK, &noise(CHUNK, 7));
    let changed = 2 * CHUNK as u64..3 * CHUNK as u64;
    let second = incremental(&source, &disk, &first, std::slice::from_ref(&changed));
    let stats = source.copy_backup(&second.id, &offsite, None).unwrap();
    assert_eq!(stats.chunks_fetched, 31, "{stats:?}");
    assert!(restored(&offsite, &offsite.backup_record(&second.id).unwrap()) == disk.bytes());
    // Copying the parent afterwards dedups against the child: only the one chunk it differs by.
    let stats = source.copy_backup(&first.id, &offsite, None).unwrap();
    assert_eq!((stats.chunks_fetched, stats.chunks_new), (31, 2), "one chunk and one segment: {stats:?}");
    assert_verifies(&offsite);
}

#[test]
fn a_copy_cut_short_leaves_no_record_and_a_retry_completes() {
    let source = repo(memory(), Some("here"));
    let disk = Disk::new(12 * CHUNK);
    disk.write(0, &noise(12 * CHUNK, 5));
    let backup = full(&source, &disk);
    // Failing writes only (the store refuses them), or everything (the store is gone). Torn
    // puts are not tried: backends promise whole objects (DirBackend writes and renames).
    for reads in [false, true] {
        let mut fail_after = 0;
        loop {
            let faulty = Arc::new(FaultyBackend::new(memory()));
            let offsite = repo(faulty.clone(), Some("there"));
            faulty.fail_after(fail_after, Fault::Error, reads);
            let done = source.copy_backup(&backup.id, &offsite, None).is_ok();
            faulty.heal();
            let offsite = Repository::open(faulty.clone(), Some("there")).unwrap();
            if !done {
                let cut = format!("failing from call {fail_after} (reads too: {reads})");
                assert!(!offsite.has_backup(&backup.id).unwrap(), "{cut}: a record");
                assert_verifies(&offsite);
                let retry = source.copy_backup(&backup.id, &offsite, None).unwrap();
                assert!(!retry.already_there, "{cut}");
            }
            assert!(restored(&offsite, &offsite.backup_record(&backup.id).unwrap()) == disk.bytes());
            assert_verifies(&offsite);
            if done {
                break;
            }
            fail_after += 1;
        }
        assert!(fail_after >= 3, "the copy made {fail_after} calls");
    }
}

#[test]
fn a_corrupt_source_chunk_fails_the_copy_by_name() {
    let backend = memory();
    let source = repo(backend.clone(), Some("here"));
    let disk = Disk::new(4 * CHUNK);
    disk.write(0, &noise(4 * CHUNK, 6));
    let backup = full(&source, &disk);
    // Flip a byte in the middle of the only pack.
    let pack = backend.list("packs/").unwrap().remove(0);
    let mut bytes = backend.get(&pack.key).unwrap().to_vec();
    bytes[100] ^= 0xff;
    backend.put(&pack.key, bytes.into()).unwrap();
    let offsite = repo(memory(), Some("there"));
    let error = source.copy_backup(&backup.id, &offsite, None).unwrap_err();
    let Error::Corrupt { id, .. } = &error else { panic!("{error}") };
    // The chunk named is the one verify names in the source.
    let report = source.verify(None, None).unwrap();
    assert!(report.problems.iter().any(|p| p.contains(&format!("{id:?}"))), "{error} / {report:?}");
    assert!(error.to_string().contains(&format!("{id:?}")), "{error}");
    assert!(!offsite.has_backup(&backup.id).unwrap());
    assert_verifies(&offsite);
}
