//! Format compatibility: a store written by the last build of layer map format version 1
//! (commit 6c253b7, before chunk placement) opens in this build with every byte where it was.
//! The fixture in `tests/fixtures/v1/` is checked-in bytes, not the output of today's encoder;
//! its README says how it was made.

use cairn_volume::{Store, StoreOptions, BLOCK_SIZE};
use std::path::Path;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1");
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

fn copy_fixture(to: &Path) {
    for entry in std::fs::read_dir(FIXTURE).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name != "README.md" {
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

/// The layer map format versions in the store directory, one per map file, sorted.
fn map_versions(dir: &Path) -> Vec<u32> {
    let mut versions: Vec<u32> = files_of(dir)
        .into_iter()
        .filter(|(name, _)| name.ends_with(".map"))
        .map(|(_, bytes)| u32::from_le_bytes(bytes[8..12].try_into().unwrap()))
        .collect();
    versions.sort_unstable();
    versions
}

#[test]
fn a_version_1_store_reads_back_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
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
fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "store.lock")
        .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn a_newer_format_version_is_refused_as_such_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let map = files_of(dir.path()).into_iter().map(|(name, _)| name).find(|n| n.ends_with(".map")).unwrap();
    for (file, version) in [(map.as_str(), 3u32), ("catalog.log", 2)] {
        let path = dir.path().join(file);
        let original = std::fs::read(&path).unwrap();
        let mut newer = original.clone();
        newer[8..12].copy_from_slice(&version.to_le_bytes());
        std::fs::write(&path, &newer).unwrap();
        let before = files_of(dir.path());
        let err = Store::open_dir(dir.path(), options()).unwrap_err();
        assert!(
            matches!(&err, cairn_volume::Error::UnsupportedFormat { file: f, reason } if f == file && reason.contains(&format!("version {version}"))),
            "{file}: {err}"
        );
        assert!(err.to_string().contains("newer cairn"), "{err}");
        assert!(files_of(dir.path()) == before, "opening {file} of version {version} changed the store");
        std::fs::write(&path, &original).unwrap();
    }
    check(&Store::open_dir(dir.path(), options()).unwrap(), &expected());
}
