//! GC's byte counts per backup (`bytes_by_backup`: exclusive, shared, attributed) and per
//! tenant (`bytes_by_tenant`), checked over random histories against a brute-force count.
//!
//! Billing and "what would forgetting this backup free" rest on these numbers, and they are
//! easy to get subtly wrong: a blob counted twice because two backups or two tenants share it,
//! the zero chunk counted, a manifest segment left out, or a blob's bytes dropped (or billed
//! twice) once the backup that first stored it is forgotten. So the expectation here does not
//! reuse gc.rs's scan: it reads the repository's objects itself through the crate's public
//! format functions (config and keys, index objects, manifest segments in their packs) and
//! counts by the definitions, set by set. It also checks each manifest against the disk that
//! was backed up, so a wrong expectation can not come from a wrong manifest.
//!
//! The histories: full and incremental backups of small disks made from a few chunk patterns
//! (so backups share chunks and segments, within and across tenants "a", "b", "c"), forgets,
//! and real GC runs (which repack and delete, so counts are also checked over blobs that
//! moved). A dry-run GC is checked at random points, at the end, and before and after every
//! forget, where the blobs attributed to the forgotten backup must move to their next oldest
//! user; at the end the backups are forgotten oldest first down to an empty repository.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use cairn_backup::crypto::Keys;
use cairn_backup::format::{decode_index, decode_segment, unpack_blob, Location, RepoConfig};
use cairn_backup::{
    Backend, BackupRecord, BackupRequest, ChunkId, GcOptions, GcReport, KdfParams, ObjectStoreBackend, Repository,
    CHUNK_SIZE,
};
use cairn_testkit::pattern as noise;
use common::Disk;
use proptest::collection::vec;
use proptest::prelude::*;

const CHUNK: usize = CHUNK_SIZE as usize;
const TENANTS: [&str; 3] = ["a", "b", "c"];
const PASSPHRASE: &str = "secret";

/// How many chunk contents disks are made of: few, so backups share chunks.
const PATTERNS: u8 = 6;

/// Chunk contents: one all zeros (never stored, so never counted), one that compresses (its
/// stored bytes differ from its size, so a count of sizes instead of stored bytes shows), and
/// noise.
fn pattern(which: u8) -> Vec<u8> {
    match which {
        0 => vec![0; CHUNK],
        1 => (0..CHUNK).map(|i| (i / 64) as u8).collect(),
        seed => noise(CHUNK, u64::from(seed)),
    }
}

/// A disk as whole chunks of patterns, and maybe a short last chunk (a prefix of a pattern,
/// of one of two lengths so that short chunks are shared too).
#[derive(Debug, Clone)]
struct DiskShape {
    chunks: Vec<u8>,
    short_tail: Option<(u8, usize)>,
}

impl DiskShape {
    fn bytes(&self) -> Vec<u8> {
        let mut disk: Vec<u8> = self.chunks.iter().flat_map(|p| pattern(*p)).collect();
        if let Some((p, len)) = self.short_tail {
            disk.extend_from_slice(&pattern(p)[..len]);
        }
        disk
    }
}

fn disk_shape() -> impl Strategy<Value = DiskShape> {
    let short_tail = prop::option::weighted(0.25, (0..PATTERNS, prop_oneof![Just(1000), Just(CHUNK / 2)]));
    // Down to no chunks at all: an empty disk's backup has no manifest segment, so no blobs.
    (vec(0..PATTERNS, 0..5), short_tail).prop_map(|(chunks, short_tail)| DiskShape { chunks, short_tail })
}

#[derive(Debug, Clone)]
enum Step {
    Full {
        tenant: usize,
        disk: DiskShape,
    },
    /// An incremental backup of a live backup's disk with some chunks rewritten (at a chunk
    /// index taken modulo the disk's chunks plus one, so it may grow) and maybe the last chunk
    /// cut off; under any tenant, so parent and child may belong to different tenants.
    Incremental {
        tenant: usize,
        parent: usize,
        rewrites: Vec<(usize, u8)>,
        drop_last_chunk: bool,
    },
    Forget(usize),
    ForgetOldest,
    DryGc,
    Gc {
        repack_unused_percent: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..TENANTS.len(), disk_shape()).prop_map(|(tenant, disk)| Step::Full { tenant, disk }),
        3 => incremental(),
        2 => any::<usize>().prop_map(Step::Forget),
        1 => Just(Step::ForgetOldest),
        2 => Just(Step::DryGc),
        2 => (0u8..50).prop_map(|repack_unused_percent| Step::Gc { repack_unused_percent }),
    ]
}

fn incremental() -> impl Strategy<Value = Step> {
    let rewrites = vec((0usize..6, 0..PATTERNS), 0..3);
    (0..TENANTS.len(), any::<usize>(), rewrites, any::<bool>()).prop_map(
        |(tenant, parent, rewrites, drop_last_chunk)| Step::Incremental { tenant, parent, rewrites, drop_last_chunk },
    )
}

fn rewritten(parent: &[u8], rewrites: &[(usize, u8)], drop_last_chunk: bool) -> Vec<u8> {
    let mut disk = parent.to_vec();
    if drop_last_chunk && !disk.is_empty() {
        disk.truncate((disk.len().div_ceil(CHUNK) - 1) * CHUNK);
    }
    for &(at, p) in rewrites {
        let start = (at % (disk.len().div_ceil(CHUNK) + 1)) * CHUNK;
        disk.resize(disk.len().max(start + CHUNK), 0);
        disk[start..start + CHUNK].copy_from_slice(&pattern(p));
    }
    disk
}

/// The chunks of `child` that differ from `parent` where both have them: exactly what changed-
/// block tracking would report (the backup reads what lies past the parent's end itself).
fn changed_ranges(parent: &[u8], child: &[u8]) -> Vec<Range<u64>> {
    let chunk = |disk: &[u8], i: usize| -> Vec<u8> { disk[i * CHUNK..((i + 1) * CHUNK).min(disk.len())].to_vec() };
    (0..parent.len().div_ceil(CHUNK).min(child.len().div_ceil(CHUNK)))
        .filter(|&i| chunk(parent, i) != chunk(child, i))
        .map(|i| (i * CHUNK) as u64..((i + 1) * CHUNK) as u64)
        .collect()
}

fn dry_run() -> GcOptions {
    GcOptions { dry_run: true, grace: Duration::ZERO, ..GcOptions::default() }
}

struct LiveBackup {
    record: BackupRecord,
    disk: Vec<u8>,
}

/// The repository and what the test knows it holds.
struct History {
    backend: Arc<dyn Backend>,
    repo: Repository,
    keys: Keys,
    live: Vec<LiveBackup>,
    forgotten: Vec<String>,
}

impl History {
    fn new(encrypted: bool) -> History {
        let backend: Arc<dyn Backend> = Arc::new(ObjectStoreBackend::memory());
        let repo = Repository::init(backend.clone(), encrypted.then_some(PASSPHRASE), KdfParams::cheap()).unwrap();
        // The keys as any reader gets them: from the config object and the passphrase.
        let config = RepoConfig::decode(&backend.get("config").unwrap()).unwrap();
        let keys = match config.encryption {
            Some(e) => Keys::unwrap(PASSPHRASE, &e.kdf, &e.wrapped_key).unwrap(),
            None => Keys::plain(),
        };
        History { backend, repo, keys, live: Vec::new(), forgotten: Vec::new() }
    }

    fn back_up(&mut self, tenant: usize, bytes: Vec<u8>, parent: Option<(&BackupRecord, &[Range<u64>])>) {
        let disk = Disk::new(bytes.len());
        disk.write(0, &bytes);
        let labels = BTreeMap::from([("tenant".to_string(), TENANTS[tenant].to_string())]);
        // Steps from a full backup: the order within a second, fixed once the backup is made.
        let generation = parent.map_or(0, |(p, _)| p.generation + 1);
        let record =
            self.repo.backup(&disk, BackupRequest { labels, parent, allocated: None, progress: None }).unwrap();
        assert_eq!(record.generation, generation, "{record:?}");
        self.live.push(LiveBackup { record, disk: bytes });
    }

    fn forget(&mut self, at: usize) -> BackupRecord {
        let gone = self.live.remove(at);
        self.repo.forget(&gone.record.id).unwrap();
        self.forgotten.push(gone.record.id.clone());
        gone.record
    }

    fn oldest(&self) -> Option<usize> {
        let oldest = oldest_first(&self.live).into_iter().next()?;
        self.live.iter().position(|b| b.record.id == oldest)
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::Full { tenant, disk } => self.back_up(tenant, disk.bytes(), None),
            Step::Incremental { tenant, parent, rewrites, drop_last_chunk } => {
                if self.live.is_empty() {
                    return;
                }
                let parent = &self.live[parent % self.live.len()];
                let (record, bytes) = (parent.record.clone(), rewritten(&parent.disk, &rewrites, drop_last_chunk));
                let changed = changed_ranges(&parent.disk, &bytes);
                self.back_up(tenant, bytes, Some((&record, &changed)));
            }
            Step::Forget(at) if !self.live.is_empty() => self.forget_and_check_attribution_moves(at % self.live.len()),
            Step::Forget(_) => {}
            Step::ForgetOldest => {
                if let Some(oldest) = self.oldest() {
                    self.forget_and_check_attribution_moves(oldest);
                }
            }
            Step::DryGc => {
                self.check_counts();
            }
            Step::Gc { repack_unused_percent } => {
                let options = GcOptions { grace: Duration::ZERO, repack_unused_percent, ..GcOptions::default() };
                let report = self.repo.gc(&options, None).unwrap();
                assert!(report.waiting_for.is_empty(), "no other session runs: {report:?}");
            }
        }
    }

    /// Runs a dry-run GC and checks its counts against the brute-force ones; returns both.
    fn check_counts(&self) -> (GcReport, Expected) {
        let listed: BTreeSet<String> = self.repo.list_backups().unwrap().into_iter().map(|r| r.id).collect();
        let live: BTreeSet<String> = self.live.iter().map(|b| b.record.id.clone()).collect();
        assert_eq!(listed, live, "the test's model of the live backups is the repository's");

        let report = self.repo.gc(&dry_run(), None).unwrap();
        let expected = Expected::of(self);
        assert_eq!(report.backups, self.live.len(), "{report:?}");
        let reported: BTreeSet<String> = report.bytes_by_backup.keys().cloned().collect();
        assert_eq!(reported, live, "every live backup is counted, and only those: {report:?}");
        for id in &self.forgotten {
            assert!(!report.bytes_by_backup.contains_key(id), "forgotten backup {id} is counted: {report:?}");
        }
        for (id, want) in &expected.by_backup {
            let got = report.bytes_by_backup[id];
            let got = Shares { exclusive: got.exclusive, shared: got.shared, attributed: got.attributed };
            assert_eq!(got, *want, "backup {id}: {report:?}");
        }
        assert_eq!(report.bytes_by_tenant, expected.by_tenant, "{report:?}");
        let attributed: u64 = report.bytes_by_backup.values().map(|b| b.attributed).sum();
        assert_eq!(
            attributed, expected.referenced_bytes,
            "attributed bytes add up to every referenced blob once: {report:?}"
        );
        (report, expected)
    }

    /// Forgets the live backup at `at`, with a checked dry run before and after. The blobs
    /// attributed to it (every one it used, if it was the oldest) must go to their oldest
    /// remaining user, those it alone used to nobody, and while the other backups keep their
    /// order, nothing else may move: forgetting one backup must not shift another's bill.
    fn forget_and_check_attribution_moves(&mut self, at: usize) {
        let (before, known) = self.check_counts();
        let gone = self.forget(at);
        let (after, now) = self.check_counts();

        let first_user = |expected: &Expected, blob: &ChunkId| -> Option<String> {
            expected.oldest_first.iter().find(|id| expected.blobs_of[*id].contains(blob)).cloned()
        };
        let gone_blobs = &known.blobs_of[&gone.id];
        let its_own: Vec<&ChunkId> =
            gone_blobs.iter().filter(|b| first_user(&known, b).as_ref() == Some(&gone.id)).collect();
        if known.oldest_first.first() == Some(&gone.id) {
            let all: u64 = gone_blobs.iter().map(|b| known.stored[b]).sum();
            assert_eq!(before.bytes_by_backup[&gone.id].attributed, all, "the oldest backup had all its blobs");
        }
        let mut inherited: BTreeMap<String, u64> = BTreeMap::new();
        for blob in its_own {
            if let Some(heir) = first_user(&now, blob) {
                *inherited.entry(heir).or_default() += known.stored[blob];
            }
        }
        // The order is fixed per record, so nothing moves but the forgotten backup's blobs.
        let kept_order = known.oldest_first.iter().filter(|id| **id != gone.id).eq(now.oldest_first.iter());
        assert!(kept_order, "forgetting {} reordered the others", gone.id);
        for (id, share) in &after.bytes_by_backup {
            let was = before.bytes_by_backup[id].attributed;
            let heir_of = inherited.get(id).copied().unwrap_or_default();
            assert_eq!(share.attributed, was + heir_of, "backup {id} after {} was forgotten: {after:?}", gone.id);
        }
        let total = |r: &GcReport| r.bytes_by_backup.values().map(|b| b.attributed).sum::<u64>();
        let freed = before.bytes_by_backup[&gone.id].exclusive;
        assert_eq!(total(&after), total(&before) - freed, "what goes unattributed is what it alone held");
    }
}

/// One backup's three numbers, compared as a whole for a readable failure; a type of the
/// test's own rather than `BackupBytes`, so a field added there does not break this test.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Shares {
    exclusive: u64,
    shared: u64,
    attributed: u64,
}

/// The counts by their definitions, from the repository's objects.
struct Expected {
    by_backup: BTreeMap<String, Shares>,
    by_tenant: BTreeMap<String, u64>,
    /// Stored bytes of every distinct blob some live backup references.
    referenced_bytes: u64,
    /// Each live backup's distinct blobs: manifest segments and non-zero chunks.
    blobs_of: BTreeMap<String, BTreeSet<ChunkId>>,
    oldest_first: Vec<String>,
    stored: HashMap<ChunkId, u64>,
}

impl Expected {
    fn of(history: &History) -> Expected {
        let blobs = StoredBlobs::read(&*history.backend, &history.keys);
        let mut blobs_of: BTreeMap<String, BTreeSet<ChunkId>> = BTreeMap::new();
        for backup in &history.live {
            let record = &backup.record;
            let segments: Vec<ChunkId> = record.segments.iter().map(|s| ChunkId::from_hex(s).unwrap()).collect();
            let manifest: Vec<ChunkId> =
                segments.iter().flat_map(|s| decode_segment(&blobs.content(*s, &history.keys)).unwrap()).collect();
            assert_eq!(manifest, chunk_ids(&history.keys, &backup.disk), "backup {}'s manifest", record.id);
            let referenced = manifest.into_iter().chain(segments).filter(|id| *id != ChunkId::ZERO).collect();
            blobs_of.insert(record.id.clone(), referenced);
        }
        let stored: HashMap<ChunkId, u64> =
            blobs_of.values().flatten().map(|id| (*id, u64::from(blobs.location(*id).1.length))).collect();
        let bytes = |ids: &mut dyn Iterator<Item = &ChunkId>| -> u64 { ids.map(|id| stored[id]).sum() };

        let mut users: HashMap<ChunkId, usize> = HashMap::new();
        for id in blobs_of.values().flatten() {
            *users.entry(*id).or_default() += 1;
        }
        let oldest_first = oldest_first(&history.live);
        let mut attributed_already: HashSet<ChunkId> = HashSet::new();
        let mut by_backup = BTreeMap::new();
        for id in &oldest_first {
            let own = &blobs_of[id];
            by_backup.insert(
                id.clone(),
                Shares {
                    exclusive: bytes(&mut own.iter().filter(|b| users[*b] == 1)),
                    shared: bytes(&mut own.iter().filter(|b| users[*b] > 1)),
                    attributed: bytes(&mut own.iter().filter(|b| attributed_already.insert(**b))),
                },
            );
        }

        let mut tenant_blobs: BTreeMap<String, BTreeSet<ChunkId>> = BTreeMap::new();
        for backup in &history.live {
            let tenant = backup.record.labels["tenant"].clone();
            tenant_blobs.entry(tenant).or_default().extend(&blobs_of[&backup.record.id]);
        }
        let by_tenant = tenant_blobs.into_iter().map(|(tenant, ids)| (tenant, bytes(&mut ids.iter()))).collect();
        let all: BTreeSet<ChunkId> = blobs_of.values().flatten().copied().collect();
        let referenced_bytes = bytes(&mut all.iter());
        Expected { by_backup, by_tenant, referenced_bytes, blobs_of, oldest_first, stored }
    }
}

/// The live backups' ids, oldest first, as metering.md defines the order: by record time;
/// within one second (record times are whole seconds) by generation, so a parent comes
/// before its child; then by id.
fn oldest_first(live: &[LiveBackup]) -> Vec<String> {
    let mut records: Vec<&BackupRecord> = live.iter().map(|b| &b.record).collect();
    records.sort_by_key(|r| (r.time, r.generation, r.id.clone()));
    records.into_iter().map(|r| r.id.clone()).collect()
}

/// A disk's chunk ids as a backup names them: the zero chunk for chunks of zeros.
fn chunk_ids(keys: &Keys, disk: &[u8]) -> Vec<ChunkId> {
    disk.chunks(CHUNK).map(|c| if c.iter().all(|b| *b == 0) { ChunkId::ZERO } else { keys.chunk_id(c) }).collect()
}

/// Where each blob is stored, from the index objects, counting only copies in packs that exist.
struct StoredBlobs<'b> {
    backend: &'b dyn Backend,
    at: HashMap<ChunkId, (String, Location)>,
}

impl<'b> StoredBlobs<'b> {
    fn read(backend: &'b dyn Backend, keys: &Keys) -> StoredBlobs<'b> {
        let packs: HashMap<ChunkId, String> = backend
            .list("packs/")
            .unwrap()
            .into_iter()
            .map(|o| (ChunkId::from_hex(o.key.rsplit('/').next().unwrap()).unwrap(), o.key))
            .collect();
        let mut at: HashMap<ChunkId, (String, Location)> = HashMap::new();
        for object in backend.list("index/").unwrap() {
            for entry in decode_index(&keys.open(&backend.get(&object.key).unwrap()).unwrap()).unwrap() {
                let Some(pack) = packs.get(&entry.location.pack) else { continue };
                // With several copies (a repack), which one GC counts must not matter.
                if let Some((_, other)) = at.get(&entry.id) {
                    assert_eq!(other.length, entry.location.length, "copies of {:?} differ in size", entry.id);
                }
                at.insert(entry.id, (pack.clone(), entry.location));
            }
        }
        StoredBlobs { backend, at }
    }

    fn location(&self, id: ChunkId) -> &(String, Location) {
        self.at.get(&id).unwrap_or_else(|| panic!("referenced blob {id:?} is in no pack"))
    }

    fn content(&self, id: ChunkId, keys: &Keys) -> Vec<u8> {
        let (pack, l) = self.location(id);
        let sealed = self.backend.get_range(pack, u64::from(l.offset)..u64::from(l.offset + l.length)).unwrap();
        let content = unpack_blob(&keys.open(&sealed).unwrap(), l.raw_length as usize).unwrap();
        assert_eq!(keys.chunk_id(&content), id, "blob {id:?} read back");
        content
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn gc_counts_each_backups_and_tenants_bytes_as_defined(
        encrypted in any::<bool>(),
        steps in vec(step(), 1..24),
    ) {
        let mut history = History::new(encrypted);
        for step in steps {
            history.apply(step);
        }
        history.check_counts();
        // Forgetting the oldest one by one moves attribution along every chain of users, down
        // to an empty repository that counts nothing.
        while let Some(oldest) = history.oldest() {
            history.forget_and_check_attribution_moves(oldest);
        }
        let (report, _) = history.check_counts();
        prop_assert!(report.bytes_by_backup.is_empty() && report.bytes_by_tenant.is_empty(), "{:?}", report);
    }
}
