//! Format compatibility: stores written by earlier builds open in this build with every byte
//! where it was. `tests/fixtures/v1/` was written by the last build of layer map format
//! version 1 (commit 6c253b7, before chunk placement); `tests/fixtures/v2/` by a version 2
//! build, with every catalog event and journal op and what a crash leaves behind. Fixtures are
//! checked-in bytes, not the output of today's encoder; their READMEs say how they were made.

mod common;

use cairn_volume::{AllocExtent, ChangeTarget, SnapshotId, Store, StoreOptions, VolumeId, BLOCK_SIZE};
use common::blocks;
use std::collections::BTreeSet;
use std::path::Path;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1");
const FIXTURE_V2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v2");
/// Reaches into the second data segment (1 TiB each), so the fixture has a `.d1` file.
const VOLUME_SIZE: u64 = (1 << 40) + (8 << 20);
const SEGMENT_1: u64 = 1 << 40;
/// The two stretches of the volume the history touches, each checked byte for byte.
const WINDOWS: [u64; 2] = [0, SEGMENT_1];
const WINDOW_LEN: u64 = 256 << 10;

/// What the fixture's generator did, in order (the README has its source).
#[derive(Debug, Clone, Copy)]
enum Step {
    Write { volume: &'static str, seed: u8, at: u64, len: u64 },
    Zero { volume: &'static str, at: u64, len: u64 },
    Snapshot { volume: &'static str, name: &'static str },
    Clone { snapshot: &'static str, name: &'static str },
}

const HISTORY: [Step; 9] = [
    Step::Write { volume: "a", seed: 1, at: 0, len: 32768 },
    Step::Write { volume: "a", seed: 2, at: 100_000, len: 10_000 },
    Step::Write { volume: "a", seed: 3, at: SEGMENT_1 + 4096, len: 8192 },
    Step::Snapshot { volume: "a", name: "s1" },
    Step::Write { volume: "a", seed: 4, at: 20_000, len: 5000 },
    Step::Zero { volume: "a", at: 8192, len: 8192 },
    Step::Snapshot { volume: "a", name: "s2" },
    Step::Clone { snapshot: "s1", name: "c" },
    Step::Write { volume: "c", seed: 5, at: 4096, len: 4096 },
];

fn pattern(seed: u8, at: u64, len: u64) -> Vec<u8> {
    (at..at + len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// The windows of one volume or snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Content(Vec<Vec<u8>>);

impl Content {
    fn zeros() -> Self {
        Content(WINDOWS.iter().map(|_| vec![0; WINDOW_LEN as usize]).collect())
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        for (start, window) in WINDOWS.iter().zip(&mut self.0) {
            if at >= *start && at + bytes.len() as u64 <= start + WINDOW_LEN {
                let from = (at - start) as usize;
                window[from..from + bytes.len()].copy_from_slice(bytes);
                return;
            }
        }
        panic!("the history stays inside the windows");
    }

    fn read(read: impl Fn(&mut [u8], u64)) -> Self {
        Content(
            WINDOWS
                .iter()
                .map(|start| {
                    let mut window = vec![0; WINDOW_LEN as usize];
                    read(&mut window, *start);
                    window
                })
                .collect(),
        )
    }
}

/// The model: the content of every volume and snapshot the history leaves, by name.
fn expected() -> Vec<(&'static str, Content)> {
    let mut all: Vec<(&'static str, Content)> = vec![("a", Content::zeros())];
    let find = |all: &[(&'static str, Content)], name: &str| all.iter().position(|(n, _)| *n == name).unwrap();
    for step in HISTORY {
        match step {
            Step::Write { volume, seed, at, len } => {
                let i = find(&all, volume);
                all[i].1.put(at, &pattern(seed, at, len));
            }
            Step::Zero { volume, at, len } => {
                let i = find(&all, volume);
                all[i].1.put(at, &vec![0; len as usize]);
            }
            Step::Snapshot { volume, name } => {
                let i = find(&all, volume);
                let content = all[i].1.clone();
                all.push((name, content));
            }
            Step::Clone { snapshot, name } => {
                let i = find(&all, snapshot);
                let content = all[i].1.clone();
                all.push((name, content));
            }
        }
    }
    all
}

/// Copies the store files of `fixture`, not its README and answers, into `to`.
fn copy_fixture(fixture: &str, to: &Path) {
    for entry in std::fs::read_dir(fixture).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name != "README.md" && name != "answers.txt" {
            std::fs::copy(entry.path(), to.join(name)).unwrap();
        }
    }
}

/// Reads every volume and snapshot of the history and compares it with the model.
fn check(store: &Store, expected: &[(&'static str, Content)]) {
    let a = store.volume_id("a").unwrap();
    for (name, content) in expected {
        let found = match *name {
            "s1" | "s2" => {
                let view = store.open_snapshot(store.snapshot_id(a, name).unwrap()).unwrap();
                Content::read(|buf, at| view.read(buf, at).unwrap())
            }
            volume => {
                let volume = store.volume(store.volume_id(volume).unwrap()).unwrap();
                assert_eq!(volume.size(), VOLUME_SIZE);
                Content::read(|buf, at| volume.read(buf, at).unwrap())
            }
        };
        assert!(found == *content, "{name} differs from the model");
    }
}

fn options() -> StoreOptions {
    StoreOptions { background_merge: false, ..StoreOptions::default() }
}

/// The layer map format versions in the store directory, one per map file that has a
/// header, sorted.
fn map_versions(dir: &Path) -> Vec<u32> {
    let mut versions: Vec<u32> = files_of(dir)
        .into_iter()
        .filter(|(name, bytes)| name.ends_with(".map") && !bytes.is_empty())
        .map(|(_, bytes)| u32::from_le_bytes(bytes[8..12].try_into().unwrap()))
        .collect();
    versions.sort_unstable();
    versions
}

#[test]
fn a_version_1_store_reads_back_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(FIXTURE, dir.path());
    assert_eq!(map_versions(dir.path()), vec![1; 4], "the fixture is four version 1 layers");
    let mut expected = expected();
    let store = Store::open_dir(dir.path(), options()).unwrap();
    check(&store, &expected);

    // The version 1 head of "a" takes new writes at its own offsets; a snapshot gives "a" a
    // version 2 head on top of version 1 layers.
    let a = store.volume(store.volume_id("a").unwrap()).unwrap();
    let write = |at: u64, seed: u8, expected: &mut Vec<(&'static str, Content)>| {
        let bytes = pattern(seed, at, 3 * BLOCK_SIZE);
        a.write(&bytes, at, false).unwrap();
        expected[0].1.put(at, &bytes);
    };
    write(SEGMENT_1 + 40_000, 6, &mut expected);
    a.flush().unwrap();
    store.snapshot(a.id(), "s3").unwrap();
    write(60_000, 7, &mut expected);
    write(SEGMENT_1 + 200_000, 8, &mut expected);
    a.flush().unwrap();
    drop(a);
    store.close().unwrap();
    assert_eq!(map_versions(dir.path()), vec![1, 1, 1, 1, 2], "only the new head is version 2");

    let store = Store::open_dir(dir.path(), options()).unwrap();
    check(&store, &expected);
}

/// Every file of the store directory and its bytes, the lock file aside.
fn files_of(dir: &Path) -> Files {
    let mut files: Files = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "store.lock")
        .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

/// A store directory's files and their bytes, by name.
type Files = Vec<(String, Vec<u8>)>;

/// Sets the version field of `file` to `version`, opens the store, which must refuse with the
/// version error, and puts the file back. Returns the directory's files before and after.
fn refused_as_newer(dir: &Path, file: &str, version: u32) -> (Files, Files) {
    let path = dir.join(file);
    let original = std::fs::read(&path).unwrap();
    let mut newer = original.clone();
    newer[8..12].copy_from_slice(&version.to_le_bytes());
    std::fs::write(&path, &newer).unwrap();
    let before = files_of(dir);
    let err = Store::open_dir(dir, options()).unwrap_err();
    assert!(
        matches!(&err, cairn_volume::Error::UnsupportedFormat { file: f, reason } if f == file && reason.contains(&format!("version {version}"))),
        "{file}: {err}"
    );
    assert!(err.to_string().contains("newer cairn"), "{err}");
    let after = files_of(dir);
    std::fs::write(&path, &original).unwrap();
    (before, after)
}

#[test]
fn a_newer_format_version_is_refused_as_such_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(FIXTURE, dir.path());
    let map = files_of(dir.path()).into_iter().map(|(name, _)| name).find(|n| n.ends_with(".map")).unwrap();
    for (file, version) in [(map.as_str(), 3u32), ("catalog.log", 2)] {
        let (before, after) = refused_as_newer(dir.path(), file, version);
        assert!(after == before, "opening {file} of version {version} changed the store");
    }
    check(&Store::open_dir(dir.path(), options()).unwrap(), &expected());
}

// The version 2 fixture: its generator's history, in its README, and the answers it recorded.

const KIB: u64 = 1024;
/// Volume and snapshot ids of the fixture (its generator printed them).
const A: VolumeId = VolumeId(3);
const B: VolumeId = VolumeId(5);
const C: VolumeId = VolumeId(19);
const B_G1: SnapshotId = SnapshotId(11);
const B_S5: SnapshotId = SnapshotId(21);
/// Layers of the fixture: c's head (its last batch torn), e's head (map file empty), m's head
/// (map file missing).
const C_HEAD: &str = "layer-0000000000000014.map";
const E_HEAD: &str = "layer-0000000000000019.map";
const M_HEAD: &str = "layer-000000000000001b.map";
/// What a crash left that opening deletes: the files of a layer a logged event dropped, a map
/// whose layer's creation was never logged, and temporary files.
const LEFTOVERS: [&str; 5] = [
    "layer-0000000000000002.map",
    "layer-0000000000000002.d0",
    "layer-000000000000001c.map",
    "catalog.log.tmp",
    "layer-0000000000000012.map.tmp",
];
/// The catalog's valid length: a torn frame of 6 bytes follows.
const CATALOG_VALID: usize = 2327;
/// The bytes of a torn batch after the last whole one of c's head.
const TORN_BATCH: usize = 24;

/// Writes of the generator, as (seed, offset, length); a seed of 0 is write-zeroes or trim.
fn replay_writes(content: &mut [u8], writes: &[(u8, u64, u64)]) {
    for (seed, at, len) in writes {
        let bytes = if *seed == 0 { vec![0; *len as usize] } else { pattern(*seed, *at, *len) };
        content[*at as usize..(at + len) as usize].copy_from_slice(&bytes);
    }
}

/// Every volume and live snapshot of the version 2 fixture, as the generator's history leaves
/// it: (name, content).
fn expected_v2() -> Vec<(&'static str, Vec<u8>)> {
    let mut a = vec![0; 1024 * KIB as usize];
    // Snapshot s0 (deleted, a checkpoint) between the two writes.
    replay_writes(&mut a, &[(1, 0, 40_000), (2, 300_000, 9000)]);
    // Snapshot g1 of a and b; a: a write, zeroed whole blocks, zeroed bytes, a trim over g1's data.
    replay_writes(&mut a, &[(4, 20_000, 5000), (0, 8192, 16384), (0, 50_000, 100), (0, 303_104, 4096)]);
    let s2 = a.clone();
    replay_writes(&mut a, &[(5, 0, 4096), (0, 90_112, 8192)]);
    // Snapshot s3 (deleted, a checkpoint), then s4 (deleted, its merge pending).
    replay_writes(&mut a, &[(6, 12_288, 8192)]);
    let mut c = s2;
    c.resize(1536 * KIB as usize, 0);
    replay_writes(&mut c, &[(7, 1_200_000, 4096)]);
    let mut b = vec![0; 512 * KIB as usize];
    replay_writes(&mut b, &[(3, 4096, 8192)]);
    let g1 = b.clone();
    b.resize(768 * KIB as usize, 0);
    replay_writes(&mut b, &[(8, 700_000, 3000)]);
    let s5 = b;
    let mut b = g1.clone();
    replay_writes(&mut b, &[(9, 0, 512)]);
    let empty = vec![0; 64 * KIB as usize];
    vec![("a", a), ("b", b), ("c", c), ("e", empty.clone()), ("m", empty), ("b@g1", g1), ("b@s5", s5)]
}

/// Reads every volume and live snapshot of the version 2 fixture and compares it with `expected`.
fn check_v2(store: &Store, expected: &[(&'static str, Vec<u8>)]) {
    for (name, content) in expected {
        let mut found = vec![0; content.len()];
        match name.split_once('@') {
            Some((volume, snapshot)) => {
                let id = store.snapshot_id(store.volume_id(volume).unwrap(), snapshot).unwrap();
                let view = store.open_snapshot(id).unwrap();
                assert_eq!(view.size(), content.len() as u64, "{name}");
                view.read(&mut found, 0).unwrap();
            }
            None => {
                let volume = store.volume(store.volume_id(name).unwrap()).unwrap();
                assert_eq!(volume.size(), content.len() as u64, "{name}");
                volume.read(&mut found, 0).unwrap();
            }
        }
        assert!(found == *content, "{name} differs from the model");
    }
}

/// The store's answer to one line of the fixture's `answers.txt`: everything up to the colon
/// is the question (allocation, depth, usage or changes of an id), the rest what the build that
/// wrote the fixture answered.
fn answer(store: &Store, question: &str) -> String {
    let words: Vec<&str> = question.split(' ').collect();
    let id = |at: usize| words[at].parse::<u64>().unwrap();
    let list = |items: Vec<String>| items.join(", ");
    let allocation = |extents: Vec<AllocExtent>| {
        list(extents.iter().map(|e| format!("{}+{} {:?}", e.offset, e.length, e.kind)).collect())
    };
    let answer = match words[..] {
        ["allocation", "volume", _] => {
            let v = store.volume(VolumeId(id(2))).unwrap();
            allocation(v.allocation(0, v.size()).unwrap())
        }
        ["depth", "volume", _] => {
            let v = store.volume(VolumeId(id(2))).unwrap();
            let extents = v.allocation_depth(0, v.size()).unwrap();
            list(extents.iter().map(|e| format!("{}+{} {}", e.offset, e.length, e.depth)).collect())
        }
        ["allocation", "snapshot", _] => {
            let view = store.open_snapshot(SnapshotId(id(2))).unwrap();
            allocation(view.allocation(0, view.size()).unwrap())
        }
        ["usage", "snapshot", _] => {
            let u = store.snapshot_usage(SnapshotId(id(2))).unwrap();
            let (l, a, e, s) = (u.logical_bytes, u.allocated_bytes, u.exclusive_bytes, u.shared_bytes);
            format!("logical {l} allocated {a} exclusive {e} shared {s}")
        }
        ["changes", _, kind, _] => {
            let target = match kind {
                "volume" => ChangeTarget::Volume(VolumeId(id(3))),
                _ => ChangeTarget::Snapshot(SnapshotId(id(3))),
            };
            let extents = store.changed_extents(SnapshotId(id(1)), target).unwrap();
            list(extents.iter().map(|e| format!("{}+{}", e.offset, e.length)).collect())
        }
        _ => panic!("unknown question {question:?}"),
    };
    format!("{question}: {answer}")
}

/// Checks the store's answers against the fixture's. `exact`: change tracking too; else its
/// answers may list more blocks than the fixture's (as after a crash, format.md §9), never fewer.
fn check_answers(store: &Store, exact: bool) {
    let answers = std::fs::read_to_string(Path::new(FIXTURE_V2).join("answers.txt")).unwrap();
    assert_eq!(answers.lines().count(), 18, "the answers file is whole");
    for line in answers.lines() {
        let (question, recorded) = line.split_once(": ").unwrap();
        let given = answer(store, question);
        if exact || !question.starts_with("changes") {
            assert_eq!(given, line);
            continue;
        }
        let blocks = |extents: &str| -> BTreeSet<u64> {
            let ranges = extents.split(", ").filter_map(|e| e.split_once('+'));
            ranges.flat_map(|(at, len)| blocks(at.parse().unwrap(), len.parse().unwrap())).collect()
        };
        let (_, listed) = given.split_once(": ").unwrap();
        assert!(blocks(recorded).is_subset(&blocks(listed)), "{question}: {listed} misses some of {recorded}");
    }
}

/// What a clean close leaves (format.md §2): the build that wrote the fixtures had no such
/// mark, so each of their opens counts as after a crash unless a test puts it there.
fn mark_closed_cleanly(dir: &Path) {
    std::fs::write(dir.join("clean-close"), b"CAIRNCLS\x01\x00\x00\x00\x00\x00\x00\x00").unwrap();
}

#[test]
fn a_version_2_store_with_crash_leftovers_reads_back_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(FIXTURE_V2, dir.path());
    let file = |name: &str| std::fs::read(dir.path().join(name)).ok();
    // The fixture holds what its README says: a log whose first frame is a state, a torn
    // frame after it, a torn batch, an empty and a missing map, the leftovers.
    let catalog = file("catalog.log").unwrap();
    assert!(catalog[24..].starts_with(br#"{"event":"state""#));
    assert_eq!(catalog.len(), CATALOG_VALID + 6);
    let torn_map_len = file(C_HEAD).unwrap().len();
    assert_eq!((file(E_HEAD).map(|f| f.len()), file(M_HEAD)), (Some(0), None));
    assert!(LEFTOVERS.iter().all(|name| file(name).is_some()));
    assert!(map_versions(dir.path()).iter().all(|version| *version == 2), "every layer map is version 2");

    let mut expected = expected_v2();
    // As if closed cleanly (by a build that writes the mark), so that change tracking is
    // exact and no head gets marks; the open after a crash is the next test.
    mark_closed_cleanly(dir.path());
    let store = Store::open_dir(dir.path(), options()).unwrap();
    check_v2(&store, &expected);
    check_answers(&store, true);
    // Opening cut the torn tails, gave e and m their headers and deleted the leftovers.
    assert_eq!(file("catalog.log").unwrap().len(), CATALOG_VALID);
    assert_eq!(file(C_HEAD).unwrap().len(), torn_map_len - TORN_BATCH);
    assert_eq!((file(E_HEAD).map(|f| f.len()), file(M_HEAD).map(|f| f.len())), (Some(32), Some(32)));
    assert_eq!(LEFTOVERS.iter().filter(|name| file(name).is_some()).collect::<Vec<_>>(), Vec::<&&str>::new());

    // The pending merge of s4 into a's head runs; nothing reads differently.
    let layers = store.layer_count();
    while store.merge_step().unwrap() {}
    assert_eq!(store.layer_count(), layers - 1);
    check_v2(&store, &expected);

    // Every volume takes writes, including the heads whose maps were empty and missing.
    for (i, (name, content)) in expected.iter_mut().enumerate().filter(|(_, (name, _))| !name.contains('@')) {
        let volume = store.volume(store.volume_id(name).unwrap()).unwrap();
        let (at, len) = (content.len() as u64 / 2 - 1000, 6000);
        let bytes = pattern(20 + i as u8, at, len);
        volume.write(&bytes, at, false).unwrap();
        volume.flush().unwrap();
        content[at as usize..(at + len) as usize].copy_from_slice(&bytes);
    }
    store.snapshot(A, "after").unwrap();
    store.close().unwrap();
    let store = Store::open_dir(dir.path(), options()).unwrap();
    check_v2(&store, &expected);
    assert_eq!(store.changed_extents(B_G1, ChangeTarget::Snapshot(B_S5)).unwrap().len(), 1);
    assert_eq!(store.volume(C).unwrap().size(), 1536 * KIB);
    assert_eq!(store.volume(B).unwrap().size(), 512 * KIB);
}

#[test]
fn a_version_2_store_opened_as_after_a_crash_lists_at_least_the_same_changes() {
    // Without the clean-close mark, as a store from before the mark opens: every byte reads
    // as before, and change tracking lists every block the writing build listed, perhaps more
    // (the blocks merges copied into heads and the layers below them, format.md §9).
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(FIXTURE_V2, dir.path());
    let store = Store::open_dir(dir.path(), options()).unwrap();
    check_v2(&store, &expected_v2());
    check_answers(&store, false);
}

#[test]
fn a_newer_format_version_in_a_version_2_store_is_refused_as_such() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(FIXTURE_V2, dir.path());
    // The catalog is read first: nothing changes.
    let (before, after) = refused_as_newer(dir.path(), "catalog.log", 2);
    assert!(after == before, "opening a catalog of version 2 changed the store");
    // A layer map is read after the catalog's torn tail is cut and the leftovers that every
    // build deletes are gone (format.md §12); no other file changes.
    let (before, after) = refused_as_newer(dir.path(), "layer-000000000000000a.map", 3);
    let cleaned: Vec<_> = before
        .into_iter()
        .filter(|(name, _)| !LEFTOVERS.contains(&name.as_str()))
        .map(
            |(name, bytes)| if name == "catalog.log" { (name, bytes[..CATALOG_VALID].to_vec()) } else { (name, bytes) },
        )
        .collect();
    assert!(after == cleaned, "opening a layer map of version 3 changed more than the leftovers");
    check_v2(&Store::open_dir(dir.path(), options()).unwrap(), &expected_v2());
}
