//! Crash test: a child process (this test binary, run again as `crash_child`) does random
//! volume operations on a directory store until the parent kills it with SIGKILL at a random
//! moment. The parent then reopens the store and checks it against a model it builds from the
//! child's log of operations.
//!
//! What must hold after `kill -9` (a process crash: the page cache survives, so this checks
//! the order in which the engine writes data, journals and catalog, not its fsyncs; the
//! power-loss half is `tests/model.rs` on `MemStorage`):
//! - each byte of a volume reads its value as of the last durable point (a completed flush,
//!   snapshot, revert, clone or reopen) or the value of some write or zeroing issued after it;
//!   a completed FUA write is durable for its own bytes;
//! - every completed snapshot exists and reads exactly the volume's content at its instant; a
//!   group snapshot exists for all its volumes or for none;
//! - a completed delete is gone; an interrupted one may or may not be; whatever exists is
//!   intact; an interrupted revert, clone or volume delete happened entirely or not at all;
//! - change tracking lists every block that differs between a snapshot and a later state;
//! - merges resumed after the crash change nothing that can be read.
//!
//! A directory lives for [`ROUNDS_PER_DIR`] rounds, so later crashes hit a store that already
//! recovered from earlier ones, with deeper chains and merges left pending.
//!
//! `CAIRN_CRASH_ROUNDS=N` runs N rounds (default 30). A failure prints the seed of its
//! directory; `CAIRN_CRASH_SEED=S CAIRN_CRASH_ROUNDS=R` replays the same operations, though
//! the moment of each kill depends on timing and may differ.

mod common;

use cairn_volume::{ChangeTarget, Error, SnapshotId, Store, StoreOptions, VolumeId, BLOCK_SIZE};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Set in the child's environment to `<seed>:<first seq>:<dir>`.
const CHILD_ENV: &str = "CAIRN_CRASH_CHILD";
/// The `#[test]` the child runs.
const CHILD_TEST: &str = "crash_child";
/// Starts every log record, so the harness's own output on stdout is skipped.
const MARK: &str = "@cairn ";
/// Set in the child's environment to a file that receives every log record too: the power-loss
/// harness (`tests/power_loss_fs.py`) logs the writes of the child's file system and these
/// records in one stream, so it knows which operations had completed at any write.
const MARKERS_ENV: &str = "CAIRN_CRASH_MARKERS";
const VOLUME_SIZE: u64 = 8 << 20;
const ROUNDS_PER_DIR: u64 = 50;
const DEFAULT_ROUNDS: u64 = 30;
/// Base volumes the parent creates; the child never deletes them, so a group snapshot always
/// has two volumes to take.
const BASE_VOLUMES: [&str; 2] = ["a", "b"];
/// The child clones only up to this many volumes and keeps about this many snapshots, which
/// bounds the parent's model (8 MiB per volume or snapshot).
const MAX_VOLUMES: usize = 4;
const MAX_SNAPSHOTS: usize = 10;
const MAX_WRITE: u64 = 256 << 10;

fn options() -> StoreOptions {
    // 64 KiB chunks: an 8 MiB volume spans 128, placed in the order the random writes reach them.
    StoreOptions { background_merge: true, merge_bytes_per_sec: None, chunk_shift: 16, journal_compact_min: 256 }
}

// ---------------------------------------------------------------------------------------------
// Randomness and content: both sides derive everything from seeds.

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64: tiny and seedable, enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The byte that the data write with sequence number `seq` puts at volume offset `off`. The
/// parent recomputes it from the log; two writes agree on a byte only by chance (1 in 256).
fn pattern(seq: u64, off: u64) -> u8 {
    let word = mix(seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (off >> 3));
    (word >> ((off & 7) * 8)) as u8
}

fn fill(buf: &mut [u8], seq: u64, off: u64, zero: bool) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = if zero { 0 } else { pattern(seq, off + i as u64) };
    }
}

// ---------------------------------------------------------------------------------------------
// The log: one record before an operation starts, one after it completed.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// Data, or zeros (`write_zeroes` / `trim`), optionally FUA.
    Write {
        vol: u64,
        off: u64,
        len: u64,
        zero: bool,
        fua: bool,
    },
    Flush {
        vol: u64,
    },
    /// One snapshot per (volume, name), all at one instant.
    Snapshot {
        entries: Vec<(u64, String)>,
    },
    DeleteSnapshot {
        snap: u64,
        keep_checkpoint: bool,
    },
    ForgetCheckpoint {
        snap: u64,
    },
    Revert {
        vol: u64,
        snap: u64,
    },
    Clone {
        snap: u64,
        name: String,
    },
    DeleteVolume {
        vol: u64,
    },
    /// Close the store (which flushes every volume) and open it again.
    Reopen,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Done; the ids of the snapshots or the volume it created.
    Ok(Vec<u64>),
    /// The engine said no: a revert to a snapshot outside the volume's history, or a
    /// checkpoint already dropped with its layer. Nothing changed.
    Refused,
}

impl Op {
    /// The record: a keyword, then numbers and names separated by spaces.
    fn encode(&self) -> String {
        let b = |flag: bool| u8::from(flag);
        match self {
            Op::Write { vol, off, len, zero, fua } => format!("write {vol} {off} {len} {} {}", b(*zero), b(*fua)),
            Op::Flush { vol } => format!("flush {vol}"),
            Op::Snapshot { entries } => entries.iter().fold("snap".to_string(), |s, (v, n)| format!("{s} {v} {n}")),
            Op::DeleteSnapshot { snap, keep_checkpoint } => format!("delsnap {snap} {}", b(*keep_checkpoint)),
            Op::ForgetCheckpoint { snap } => format!("forget {snap}"),
            Op::Revert { vol, snap } => format!("revert {vol} {snap}"),
            Op::Clone { snap, name } => format!("clone {snap} {name}"),
            Op::DeleteVolume { vol } => format!("delvol {vol}"),
            Op::Reopen => "reopen".to_string(),
        }
    }

    fn decode(text: &str) -> Option<Op> {
        let words: Vec<&str> = text.split(' ').collect();
        let num = |i: usize| words.get(i)?.parse::<u64>().ok();
        let flag = |i: usize| num(i).map(|n| n != 0);
        let name = |i: usize| words.get(i).map(|s| s.to_string());
        Some(match words[0] {
            "write" => Op::Write { vol: num(1)?, off: num(2)?, len: num(3)?, zero: flag(4)?, fua: flag(5)? },
            "flush" => Op::Flush { vol: num(1)? },
            "snap" => Op::Snapshot {
                entries: (1..words.len()).step_by(2).map(|i| Some((num(i)?, name(i + 1)?))).collect::<Option<_>>()?,
            },
            "delsnap" => Op::DeleteSnapshot { snap: num(1)?, keep_checkpoint: flag(2)? },
            "forget" => Op::ForgetCheckpoint { snap: num(1)? },
            "revert" => Op::Revert { vol: num(1)?, snap: num(2)? },
            "clone" => Op::Clone { snap: num(1)?, name: name(2)? },
            "delvol" => Op::DeleteVolume { vol: num(1)? },
            "reopen" => Op::Reopen,
            _ => return None,
        })
    }
}

impl Outcome {
    fn encode(&self) -> String {
        match self {
            Outcome::Ok(ids) => ids.iter().fold("ok".to_string(), |s, id| format!("{s} {id}")),
            Outcome::Refused => "refused".to_string(),
        }
    }

    fn decode(text: &str) -> Option<Outcome> {
        let mut words = text.split(' ');
        match words.next()? {
            "ok" => Some(Outcome::Ok(words.map(|w| w.parse().ok()).collect::<Option<_>>()?)),
            "refused" => Some(Outcome::Refused),
            _ => None,
        }
    }
}

/// One operation as the parent read it from the log.
#[derive(Debug)]
struct Entry {
    seq: u64,
    op: Op,
    /// `None`: the kill came before it completed.
    outcome: Option<Outcome>,
}

/// Parses records `<seq> op <op>` and `<seq> done <outcome>`.
fn parse_log(lines: &[String]) -> Result<Vec<Entry>, String> {
    let mut entries: Vec<Entry> = Vec::new();
    for line in lines {
        let bad = || format!("bad log record {line:?}");
        let mut parts = line.splitn(3, ' ');
        let seq: u64 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let kind = parts.next().ok_or_else(bad)?;
        let rest = parts.next().unwrap_or("");
        let open = entries.last_mut().filter(|e| e.outcome.is_none());
        match (kind, open) {
            ("op", None) => entries.push(Entry { seq, op: Op::decode(rest).ok_or_else(bad)?, outcome: None }),
            ("done", Some(e)) if e.seq == seq => {
                e.outcome = Some(Outcome::decode(rest).ok_or_else(bad)?);
            }
            _ => return Err(format!("{} out of order", bad())),
        }
    }
    Ok(entries)
}

// ---------------------------------------------------------------------------------------------
// The child.

/// Runs only as the child, which the parent starts with [`CHILD_ENV`] set and `--ignored`; in
/// a normal test run it is ignored.
#[test]
#[ignore = "the crash test's child, which crash_rounds runs with --ignored"]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let mut num = || parts.next().and_then(|s| s.parse::<u64>().ok());
    let (seed, first_seq) = (num().expect("seed"), num().expect("first seq"));
    let dir = parts.next().expect("dir");
    Child::new(Path::new(dir), seed).run(first_seq);
}

/// Writes one log record. It is whole in the pipe (one `write(2)` of less than PIPE_BUF bytes,
/// flushed at once) before the child takes its next step, so a kill cuts the log only between
/// records and the parent reads every record written before the kill. With [`MARKERS_ENV`]
/// set, the record also goes to that file first, in one `write(2)` as well.
fn emit(record: &str) {
    static MARKERS: OnceLock<Option<std::fs::File>> = OnceLock::new();
    let line = format!("{MARK}{record}\n");
    let markers = MARKERS.get_or_init(|| {
        let path = std::env::var_os(MARKERS_ENV)?;
        Some(std::fs::OpenOptions::new().write(true).open(path).expect("open the marker file"))
    });
    if let Some(mut file) = markers.as_ref() {
        file.write_all(line.as_bytes()).expect("write a marker");
    }
    let mut out = std::io::stdout().lock();
    // A failed write means the parent is gone: stop rather than run on forever.
    out.write_all(line.as_bytes()).and_then(|()| out.flush()).expect("log pipe closed");
}

struct Child<'a> {
    dir: &'a Path,
    rng: Rng,
    store: Option<Store>,
    /// Checkpoints this process kept, which it may forget (no API lists them).
    checkpoints: Vec<u64>,
}

impl<'a> Child<'a> {
    fn new(dir: &'a Path, seed: u64) -> Self {
        let store = Store::open_dir(dir, options()).expect("open store");
        Self { dir, rng: Rng(seed), store: Some(store), checkpoints: Vec::new() }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("store is open")
    }

    fn run(mut self, first_seq: u64) {
        // The parent kills us long before this; the bound keeps seqs of rounds apart.
        for seq in first_seq..first_seq + 999_999 {
            let op = self.choose_op(seq);
            emit(&format!("{seq} op {}", op.encode()));
            let outcome = self.execute(&op, seq);
            emit(&format!("{seq} done {}", outcome.encode()));
        }
        panic!("the parent never killed the child");
    }

    /// A random byte range of a volume: block-aligned or not, 1 byte to 256 KiB.
    fn random_range(&mut self, size: u64) -> (u64, u64) {
        let rng = &mut self.rng;
        if rng.chance(50) {
            let blocks = rng.range(1, MAX_WRITE / BLOCK_SIZE);
            let at = rng.below(size / BLOCK_SIZE - blocks + 1);
            (at * BLOCK_SIZE, blocks * BLOCK_SIZE)
        } else {
            // Log-uniform lengths: a few bytes or sectors are as common as large runs.
            let bits = rng.range(0, 18);
            let len = rng.range(1, 1 << bits).min(MAX_WRITE);
            (rng.below(size - len + 1), len)
        }
    }

    /// Picks the next operation from what the store holds now.
    fn choose_op(&mut self, seq: u64) -> Op {
        let volumes = self.store().list_volumes();
        let snapshots = self.store().list_snapshots(None);
        let extra: Vec<u64> =
            volumes.iter().filter(|v| !BASE_VOLUMES.contains(&v.name.as_str())).map(|v| v.id.0).collect();
        // Percent of picks per kind. At the caps, snapshot and clone picks fall through to
        // deletes; a pick that has nothing to act on is drawn again.
        loop {
            let vol = self.rng.pick(&volumes);
            let op = match self.rng.below(100) {
                0..=46 => {
                    let (off, len) = self.random_range(vol.size);
                    let zero = self.rng.chance(25);
                    let fua = self.rng.chance(10);
                    Op::Write { vol: vol.id.0, off, len, zero, fua }
                }
                47..=57 => Op::Flush { vol: vol.id.0 },
                58..=69 if snapshots.len() < MAX_SNAPSHOTS => {
                    let mut entries = vec![(vol.id.0, format!("s{seq}"))];
                    let other = self.rng.pick(&volumes);
                    if other.id != vol.id && self.rng.chance(40) {
                        entries.push((other.id.0, format!("s{seq}")));
                    }
                    Op::Snapshot { entries }
                }
                58..=77 if !snapshots.is_empty() => {
                    Op::DeleteSnapshot { snap: self.rng.pick(&snapshots).id.0, keep_checkpoint: self.rng.chance(30) }
                }
                78..=79 if !self.checkpoints.is_empty() => {
                    Op::ForgetCheckpoint { snap: *self.rng.pick(&self.checkpoints) }
                }
                80..=87 if !snapshots.is_empty() => {
                    // Mostly the volume's own snapshots; sometimes any, which may be refused.
                    let own: Vec<_> = snapshots.iter().filter(|s| s.volume == vol.id).collect();
                    let snap = if !own.is_empty() && self.rng.chance(75) {
                        self.rng.pick(&own).id
                    } else {
                        self.rng.pick(&snapshots).id
                    };
                    Op::Revert { vol: vol.id.0, snap: snap.0 }
                }
                88..=91 if volumes.len() < MAX_VOLUMES && !snapshots.is_empty() => {
                    Op::Clone { snap: self.rng.pick(&snapshots).id.0, name: format!("c{seq}") }
                }
                88..=95 if !extra.is_empty() => Op::DeleteVolume { vol: *self.rng.pick(&extra) },
                96..=99 => Op::Reopen,
                _ => continue,
            };
            return op;
        }
    }

    fn execute(&mut self, op: &Op, seq: u64) -> Outcome {
        // Borrows only the field, so the checkpoint list stays writable.
        let store = self.store.as_ref().expect("store is open");
        let volume = |id: u64| store.volume(VolumeId(id)).expect("volume handle");
        let mut ids = Vec::new();
        match op {
            Op::Write { vol, off, len, zero, fua } => {
                let v = volume(*vol);
                let done = if !zero {
                    let mut data = vec![0; *len as usize];
                    fill(&mut data, seq, *off, false);
                    v.write(&data, *off, *fua)
                } else if seq.is_multiple_of(2) {
                    // trim and write_zeroes promise the same content; use both.
                    v.trim(*off, *len, *fua)
                } else {
                    v.write_zeroes(*off, *len, *fua)
                };
                done.expect("write");
            }
            Op::Flush { vol } => volume(*vol).flush().expect("flush"),
            Op::Snapshot { entries } => {
                let requests: Vec<(VolumeId, &str)> = entries.iter().map(|(v, n)| (VolumeId(*v), n.as_str())).collect();
                let infos = store.snapshot_group(&requests).expect("snapshot");
                ids = infos.iter().map(|i| i.id.0).collect();
            }
            Op::DeleteSnapshot { snap, keep_checkpoint } => {
                store.delete_snapshot(SnapshotId(*snap), *keep_checkpoint).expect("delete snapshot");
                if *keep_checkpoint {
                    self.checkpoints.push(*snap);
                }
            }
            Op::ForgetCheckpoint { snap } => {
                self.checkpoints.retain(|c| c != snap);
                match store.forget_checkpoint(SnapshotId(*snap)) {
                    Ok(()) => {}
                    // Deleting its volume can drop a checkpoint's layer, and the checkpoint.
                    Err(Error::NotFound { .. }) => return Outcome::Refused,
                    Err(e) => panic!("forget checkpoint: {e}"),
                }
            }
            Op::Revert { vol, snap } => match store.revert(VolumeId(*vol), SnapshotId(*snap)) {
                Ok(()) => {}
                Err(Error::InvalidRequest(_)) => return Outcome::Refused,
                Err(e) => panic!("revert: {e}"),
            },
            Op::Clone { snap, name } => {
                let info = store.clone_snapshot(SnapshotId(*snap), name, None);
                ids.push(info.expect("clone").id.0);
            }
            Op::DeleteVolume { vol } => store.delete_volume(VolumeId(*vol)).expect("delete volume"),
            Op::Reopen => {
                let store = self.store.take().expect("store is open");
                store.close().expect("close");
                self.store = Some(Store::open_dir(self.dir, options()).expect("reopen"));
            }
        }
        Outcome::Ok(ids)
    }
}

// ---------------------------------------------------------------------------------------------
// The parent's model.

/// A write (or zeroing) since the volume's last durable point: any of its bytes may or may
/// not have survived the crash.
#[derive(Debug)]
struct Candidate {
    seq: u64,
    zero: bool,
    /// Byte ranges not since made durable by a FUA write.
    ranges: Vec<(u64, u64)>,
}

impl Candidate {
    fn value(&self, off: u64) -> u8 {
        if self.zero {
            0
        } else {
            pattern(self.seq, off)
        }
    }

    fn covers(&self, off: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| (s..e).contains(&off))
    }
}

#[derive(Debug)]
struct VolumeModel {
    name: String,
    /// Content as of the last durable point, plus completed FUA writes.
    durable: Vec<u8>,
    /// Content with every completed write: what a snapshot taken now holds.
    current: Vec<u8>,
    candidates: Vec<Candidate>,
}

#[derive(Debug, Clone)]
struct SnapshotModel {
    volume: u64,
    name: String,
    content: Arc<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Model {
    volumes: BTreeMap<u64, VolumeModel>,
    snapshots: BTreeMap<u64, SnapshotModel>,
    /// The content of each snapshot deleted keeping its checkpoint, for checking change
    /// tracking since it. Deleting a volume may drop a checkpoint, and an interrupted delete
    /// may or may not have made one: the store tells which still exist.
    checkpoints: BTreeMap<u64, Arc<Vec<u8>>>,
}

/// What the operation the kill interrupted may have done. Writes, flushes, reopens and
/// forgotten checkpoints need no entry: an interrupted write is one more candidate, and
/// flushing only makes candidates stick.
#[derive(Debug)]
enum Pending {
    None,
    /// All of these snapshots exist, or none; if one does, its volume reads exactly its content.
    Snapshot(Vec<(u64, String, Arc<Vec<u8>>)>),
    DeleteSnapshot(u64),
    /// The volume reads exactly this, or what it would without the revert.
    Revert(u64, Arc<Vec<u8>>),
    /// A volume of this name, if it exists, reads exactly this.
    Clone(String, Arc<Vec<u8>>),
    DeleteVolume(u64),
}

/// `ranges` without `[start, end)`.
fn subtract(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        if e <= start || s >= end {
            out.push((s, e));
            continue;
        }
        if s < start {
            out.push((s, start));
        }
        if e > end {
            out.push((end, e));
        }
    }
    out
}

impl VolumeModel {
    fn new(name: String, content: Vec<u8>) -> Self {
        Self { name, durable: content.clone(), current: content, candidates: Vec::new() }
    }

    fn write(&mut self, seq: u64, off: u64, len: u64, zero: bool, durable: bool) {
        let range = off as usize..(off + len) as usize;
        fill(&mut self.current[range.clone()], seq, off, zero);
        if durable {
            fill(&mut self.durable[range], seq, off, zero);
            // Older writes to these bytes can no longer show through.
            for c in &mut self.candidates {
                c.ranges = subtract(&c.ranges, off, off + len);
            }
            self.candidates.retain(|c| !c.ranges.is_empty());
        } else {
            self.candidates.push(Candidate { seq, zero, ranges: vec![(off, off + len)] });
        }
    }

    fn make_durable(&mut self) {
        self.durable.clone_from(&self.current);
        self.candidates.clear();
    }

    fn reset(&mut self, content: &[u8]) {
        self.current.copy_from_slice(content);
        self.make_durable();
    }

    /// Checks that every byte of `actual` is its durable value or that of a later candidate.
    fn check(&self, actual: &[u8]) -> Result<(), String> {
        if actual.len() != self.durable.len() {
            return Err(format!("size {}, expected {}", actual.len(), self.durable.len()));
        }
        // Whole blocks compare at memcmp speed; only blocks that differ need a look at the
        // candidates, byte by byte.
        let block = BLOCK_SIZE as usize;
        let differs: Vec<bool> = actual.chunks(block).zip(self.durable.chunks(block)).map(|(a, d)| a != d).collect();
        if !differs.contains(&true) {
            return Ok(());
        }
        let mut ok: Vec<bool> = actual.iter().zip(&self.durable).map(|(a, d)| a == d).collect();
        for c in &self.candidates {
            for &(s, e) in &c.ranges {
                for off in s..e {
                    let i = off as usize;
                    if differs[i / block] && !ok[i] {
                        ok[i] = c.value(off) == actual[i];
                    }
                }
            }
        }
        let Some(first) = ok.iter().position(|o| !o) else {
            return Ok(());
        };
        let bad = ok.iter().filter(|o| !**o).count();
        let covering: Vec<u64> = self.candidates.iter().filter(|c| c.covers(first as u64)).map(|c| c.seq).collect();
        Err(format!(
            "{bad} bytes read neither their durable value nor that of a later write; \
             the first at offset {first} (block {}) reads {:#04x}, durable {:#04x}, \
             latest {:#04x}, later writes covering it: {covering:?}",
            first / block,
            actual[first],
            self.durable[first],
            self.current[first],
        ))
    }
}

/// Checks that `actual` is exactly `expected`.
fn diff(actual: &[u8], expected: &[u8]) -> Result<(), String> {
    if actual == expected {
        return Ok(());
    }
    if actual.len() != expected.len() {
        return Err(format!("size {}, expected {}", actual.len(), expected.len()));
    }
    let differ = |(a, e): &(&u8, &u8)| a != e;
    let bad = actual.iter().zip(expected).filter(differ).count();
    let first = actual.iter().zip(expected).position(|p| differ(&p)).unwrap_or(0);
    Err(format!(
        "{bad} bytes differ; the first at offset {first} (block {}) reads {:#04x}, expected {:#04x}",
        first as u64 / BLOCK_SIZE,
        actual[first],
        expected[first]
    ))
}

impl Model {
    fn volume(&mut self, id: u64) -> Result<&mut VolumeModel, String> {
        self.volumes.get_mut(&id).ok_or_else(|| format!("the log names volume {id}, which the model lacks"))
    }

    fn snapshot(&self, id: u64) -> Result<Arc<Vec<u8>>, String> {
        let snap = self.snapshots.get(&id);
        let snap = snap.ok_or_else(|| format!("the log names snapshot {id}, which the model lacks"))?;
        Ok(snap.content.clone())
    }

    /// Applies an operation that completed.
    fn apply(&mut self, seq: u64, op: &Op, outcome: &Outcome) -> Result<(), String> {
        let ids = match (outcome, op) {
            (Outcome::Ok(ids), _) => ids.as_slice(),
            (Outcome::Refused, Op::Revert { .. } | Op::ForgetCheckpoint { .. }) => return Ok(()),
            (Outcome::Refused, _) => return Err(format!("operation {seq} cannot be refused")),
        };
        match op {
            Op::Write { vol, off, len, zero, fua } => self.volume(*vol)?.write(seq, *off, *len, *zero, *fua),
            Op::Flush { vol } => self.volume(*vol)?.make_durable(),
            Op::Snapshot { entries } => {
                if ids.len() != entries.len() {
                    return Err(format!("snapshot {seq} returned {ids:?}"));
                }
                for ((vol, name), id) in entries.iter().zip(ids) {
                    let v = self.volume(*vol)?;
                    v.make_durable();
                    let snap = SnapshotModel { volume: *vol, name: name.clone(), content: Arc::new(v.current.clone()) };
                    self.snapshots.insert(*id, snap);
                }
            }
            Op::DeleteSnapshot { snap, keep_checkpoint } => {
                let Some(deleted) = self.snapshots.remove(snap) else {
                    return Err(format!("deleted snapshot {snap} is not in the model"));
                };
                if *keep_checkpoint {
                    self.checkpoints.insert(*snap, deleted.content);
                }
            }
            Op::ForgetCheckpoint { snap } => {
                self.checkpoints.remove(snap);
            }
            Op::Revert { vol, snap } => {
                let content = self.snapshot(*snap)?;
                self.volume(*vol)?.reset(&content);
            }
            Op::Clone { snap, name } => {
                let content = self.snapshot(*snap)?.to_vec();
                let id = *ids.first().ok_or("clone returned no id")?;
                self.volumes.insert(id, VolumeModel::new(name.clone(), content));
            }
            Op::DeleteVolume { vol } => {
                if self.volumes.remove(vol).is_none() {
                    return Err(format!("deleted volume {vol} is not in the model"));
                }
            }
            Op::Reopen => self.volumes.values_mut().for_each(VolumeModel::make_durable),
        }
        Ok(())
    }

    /// Takes in an operation the kill interrupted.
    fn interrupted(&mut self, seq: u64, op: &Op) -> Result<Pending, String> {
        Ok(match op {
            Op::Write { vol, off, len, zero, .. } => {
                self.volume(*vol)?.write(seq, *off, *len, *zero, false);
                Pending::None
            }
            Op::Flush { .. } | Op::Reopen | Op::ForgetCheckpoint { .. } => Pending::None,
            Op::Snapshot { entries } => {
                let mut out = Vec::new();
                for (vol, name) in entries {
                    let content = Arc::new(self.volume(*vol)?.current.clone());
                    out.push((*vol, name.clone(), content));
                }
                Pending::Snapshot(out)
            }
            Op::DeleteSnapshot { snap, .. } => Pending::DeleteSnapshot(*snap),
            Op::Revert { vol, snap } => Pending::Revert(*vol, self.snapshot(*snap)?),
            Op::Clone { snap, name } => Pending::Clone(name.clone(), self.snapshot(*snap)?),
            Op::DeleteVolume { vol } => Pending::DeleteVolume(*vol),
        })
    }

    /// Brings the model to the end of the log; returns what the last operation may have done.
    fn replay(&mut self, log: &[Entry]) -> Result<Pending, String> {
        for e in log {
            match &e.outcome {
                Some(outcome) => self.apply(e.seq, &e.op, outcome)?,
                None => return self.interrupted(e.seq, &e.op),
            }
        }
        Ok(Pending::None)
    }
}

// ---------------------------------------------------------------------------------------------
// Verification.

fn read_volume(store: &Store, id: VolumeId) -> Result<Vec<u8>, String> {
    let v = store.volume(id).map_err(|e| format!("volume {}: {e}", id.0))?;
    let mut buf = vec![0u8; v.size() as usize];
    v.read(&mut buf, 0).map_err(|e| format!("reading volume {}: {e}", id.0))?;
    Ok(buf)
}

fn read_snapshot(store: &Store, id: SnapshotId) -> Result<Vec<u8>, String> {
    let s = store.open_snapshot(id).map_err(|e| format!("snapshot {}: {e}", id.0))?;
    let mut buf = vec![0u8; s.size() as usize];
    s.read(&mut buf, 0).map_err(|e| format!("reading snapshot {}: {e}", id.0))?;
    Ok(buf)
}

/// Checks the store against the model and the interrupted operation. Returns the model of
/// what the store holds now (every volume exactly as read), for the next round.
fn verify(store: &Store, model: &Model, pending: &Pending) -> Result<Model, String> {
    let mut next = Model::default();
    // Snapshots first: one that an interrupted snapshot left behind fixes its volume's content.
    let mut exact: BTreeMap<u64, Arc<Vec<u8>>> = BTreeMap::new();
    for info in store.list_snapshots(None) {
        let id = info.id.0;
        let listed = (info.volume.0, info.name.as_str());
        let expected = if let Some(s) = model.snapshots.get(&id) {
            if (s.volume, s.name.as_str()) != listed {
                return Err(format!("snapshot {id} is {listed:?}, expected {s:?}"));
            }
            s.clone()
        } else if let Some((vol, name, content)) = pending.snapshot_named(listed) {
            exact.insert(*vol, content.clone());
            SnapshotModel { volume: *vol, name: name.clone(), content: content.clone() }
        } else {
            return Err(format!("unexpected snapshot {id} {listed:?}"));
        };
        let actual = read_snapshot(store, info.id)?;
        diff(&actual, &expected.content).map_err(|e| format!("snapshot {id}: {e}"))?;
        next.snapshots.insert(id, expected);
    }
    for (id, snap) in &model.snapshots {
        let may_be_gone = matches!(pending, Pending::DeleteSnapshot(s) if s == id);
        if !next.snapshots.contains_key(id) {
            if !may_be_gone {
                return Err(format!("snapshot {id} is lost"));
            }
            // Its deletion happened; it may have kept a checkpoint.
            next.checkpoints.insert(*id, snap.content.clone());
        }
    }
    next.checkpoints.extend(model.checkpoints.iter().map(|(id, content)| (*id, content.clone())));
    if let Pending::Snapshot(entries) = pending {
        if !exact.is_empty() && exact.len() != entries.len() {
            return Err(format!("{} of {} snapshots of a group exist", exact.len(), entries.len()));
        }
    }

    for info in store.list_volumes() {
        let id = info.id.0;
        let actual = read_volume(store, info.id)?;
        let result = match (model.volumes.get(&id), pending) {
            (Some(v), _) if v.name != info.name => Err(format!("named {}, expected {}", info.name, v.name)),
            (Some(_), _) if exact.contains_key(&id) => diff(&actual, &exact[&id]),
            (Some(_), Pending::Revert(vol, content)) if *vol == id && actual == **content => Ok(()),
            (Some(v), _) => v.check(&actual),
            (None, Pending::Clone(name, content)) if *name == info.name => diff(&actual, content),
            (None, _) => Err("unexpected".to_string()),
        };
        result.map_err(|e| format!("volume {id} ({}): {e}", info.name))?;
        next.volumes.insert(id, VolumeModel::new(info.name, actual));
    }
    for id in model.volumes.keys() {
        let may_be_gone = matches!(pending, Pending::DeleteVolume(v) if v == id);
        if !next.volumes.contains_key(id) && !may_be_gone {
            return Err(format!("volume {id} is lost"));
        }
    }
    check_change_tracking(store, &next)?;
    Ok(next)
}

impl Pending {
    /// The snapshot of an interrupted snapshot operation that has this (volume, name).
    fn snapshot_named(&self, listed: (u64, &str)) -> Option<&(u64, String, Arc<Vec<u8>>)> {
        match self {
            Pending::Snapshot(entries) => entries.iter().find(|(v, n, _)| (*v, n.as_str()) == listed),
            _ => None,
        }
    }
}

/// Change tracking must survive the crash too: every block that differs between a snapshot
/// or checkpoint and a later state (a volume or snapshot it is an ancestor of) must be listed
/// as changed. Listing more is allowed.
fn check_change_tracking(store: &Store, model: &Model) -> Result<(), String> {
    let volumes = model.volumes.iter().map(|(id, v)| (ChangeTarget::Volume(VolumeId(*id)), &v.current[..]));
    let snapshots = model.snapshots.iter().map(|(id, s)| (ChangeTarget::Snapshot(SnapshotId(*id)), &s.content[..]));
    let targets: Vec<(ChangeTarget, &[u8])> = volumes.chain(snapshots).collect();
    let live = model.snapshots.iter().map(|(id, s)| (*id, &s.content, false));
    let bases: Vec<(u64, &Arc<Vec<u8>>, bool)> =
        live.chain(model.checkpoints.iter().map(|(id, content)| (*id, content, true))).collect();
    for (since, base, checkpoint) in bases {
        for (target, content) in &targets {
            if *target == ChangeTarget::Snapshot(SnapshotId(since)) {
                continue;
            }
            let extents = match store.changed_extents(SnapshotId(since), *target) {
                Ok(extents) => extents,
                Err(Error::InvalidRequest(_)) => continue, // Not an ancestor.
                // A checkpoint that was forgotten, went with its volume, or was never made.
                Err(Error::NotFound { .. }) if checkpoint => continue,
                Err(e) => return Err(format!("changes since snapshot {since}: {e}")),
            };
            if let Some(b) = common::unlisted_change(&extents, base, content) {
                return Err(format!(
                    "block {b} differs between snapshot {since} and {target:?} but is not \
                     listed as changed"
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// Runs the child until a random kill; returns its log records.
fn run_child(dir: &Path, rng: &mut Rng, first_seq: u64) -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}:{first_seq}:{}", rng.next(), dir.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn child: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The harness prints on stdout too, and may start the first record's line.
            if let Some(at) = line.find(MARK) {
                let _ = tx.send(line[at + MARK.len()..].to_string());
            }
        }
    });

    // When to kill: after a random time, or a few microseconds to milliseconds after a random
    // record, which puts the kill at some point inside the operation that record starts (or
    // between operations). These timers choose the moment; nothing waits on them for order.
    let by_time = rng.chance(50);
    let wait = if by_time { rng.range(5, 300) } else { 3000 };
    let mut deadline = Instant::now() + Duration::from_millis(wait);
    let kill_after = if by_time { usize::MAX } else { rng.range(1, 300) as usize };
    let delay = Duration::from_micros(rng.below(3000));
    let mut lines = Vec::new();
    let mut ended = false;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                lines.push(line);
                if lines.len() == kill_after {
                    deadline = Instant::now() + delay;
                }
            }
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => {
                ended = true;
                break;
            }
        }
    }
    child.kill().map_err(|e| format!("kill child: {e}"))?;
    let status = child.wait().map_err(|e| format!("wait for child: {e}"))?;
    // The child is dead: the reader gets the rest of the pipe, then the end of the file.
    lines.extend(rx.iter());
    reader.join().map_err(|_| "log reader panicked")?;
    if ended || status.signal() != Some(libc::SIGKILL) {
        return Err(format!("the child ended by itself ({status}); its stderr is above"));
    }
    Ok(lines)
}

fn open(dir: &Path) -> Result<Store, String> {
    Store::open_dir(dir, options()).map_err(|e| format!("open store: {e}"))
}

/// A fresh store with the base volumes, all zeros.
fn create_store(dir: &Path) -> Result<Model, String> {
    let store = open(dir)?;
    let mut model = Model::default();
    for name in BASE_VOLUMES {
        let info = store.create_volume(name, VOLUME_SIZE);
        let info = info.map_err(|e| format!("create volume: {e}"))?;
        let content = vec![0; VOLUME_SIZE as usize];
        model.volumes.insert(info.id.0, VolumeModel::new(name.to_string(), content));
    }
    store.close().map_err(|e| format!("close: {e}"))?;
    Ok(model)
}

/// One crash: run the child, kill it, check what survived, let merges finish, check again.
fn crash_round(dir: &Path, model: &mut Model, rng: &mut Rng, first_seq: u64) -> Result<(), String> {
    let lines = run_child(dir, rng, first_seq)?;
    check_survivor(dir, model, &lines)
}

/// Checks the store in `dir`, which a child left when it died with `lines` logged, against
/// `model` (the store before the child), which becomes the model of what survived; then lets
/// the merges finish and checks again.
fn check_survivor(dir: &Path, model: &mut Model, lines: &[String]) -> Result<(), String> {
    let log = parse_log(lines)?;
    let context = |e: String| {
        let shown: Vec<String> = log[log.len().saturating_sub(8)..]
            .iter()
            .map(|e| format!("  {} {} -> {:?}", e.seq, e.op.encode(), e.outcome))
            .collect();
        format!("{e}\n{} operations logged; the last:\n{}", log.len(), shown.join("\n"))
    };
    let pending = model.replay(&log).map_err(context)?;

    // Merges of deleted snapshots resume in the background while this reads.
    let store = open(dir)?;
    let recovered = verify(&store, model, &pending);
    *model = recovered.map_err(|e| context(format!("after the crash: {e}")))?;
    drop(store);

    // Opening again must find the same state, and finished merges must not change it.
    let store = open(dir)?;
    store.wait_for_merges().map_err(|e| format!("merge: {e}"))?;
    let merged = verify(&store, model, &Pending::None);
    *model = merged.map_err(|e| context(format!("after the merges: {e}")))?;
    Ok(())
}

/// `rounds` crashes on one fresh directory.
fn crash_dir(seed: u64, rounds: u64) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let mut model = create_store(dir.path())?;
    let mut rng = Rng(seed);
    for round in 1..=rounds {
        // Sequence numbers differ between rounds, so no two writes of a directory share content.
        if let Err(e) = crash_round(dir.path(), &mut model, &mut rng, round * 1_000_000) {
            let kept = dir.keep();
            return Err(format!(
                "round {round} failed: {e}\nthe store is kept in {}\n\
                 replay: CAIRN_CRASH_SEED={seed} CAIRN_CRASH_ROUNDS={round}",
                kept.display()
            ));
        }
    }
    Ok(())
}

/// The entry points of the power-loss harness `tests/power_loss_fs.py`, which runs the child
/// on ext4 over a block device that logs every write and flush, then replays the log cut at
/// many points and checks each image: with `CAIRN_POWER_SETUP=<dir>` this creates the store
/// the child works on; with `CAIRN_POWER_CHECK=<dir>` and `CAIRN_POWER_LOG=<file>` (the
/// records logged before the cut) it checks the store a cut left, as a crash round does. In a
/// normal test run it is ignored.
#[test]
#[ignore = "an entry point of tests/power_loss_fs.py, which runs it with --ignored"]
fn power_cut_entry() {
    if let Some(dir) = std::env::var_os("CAIRN_POWER_SETUP") {
        create_store(Path::new(&dir)).unwrap_or_else(|e| panic!("create the store: {e}"));
    }
    if let Some(dir) = std::env::var_os("CAIRN_POWER_CHECK") {
        let log = std::env::var("CAIRN_POWER_LOG").expect("CAIRN_POWER_LOG names the records");
        let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{log}: {e}"));
        let lines: Vec<String> = text.lines().filter_map(|l| l.strip_prefix(MARK)).map(str::to_string).collect();
        // A fresh store gets the same ids, so its model is the one the child started from.
        let scratch = tempfile::tempdir().expect("tempdir");
        let mut model = create_store(scratch.path()).unwrap_or_else(|e| panic!("base model: {e}"));
        if let Err(e) = check_survivor(Path::new(&dir), &mut model, &lines) {
            panic!("after the cut: {e}");
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a number")))
}

#[test]
fn crash_rounds() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let rounds = env_u64("CAIRN_CRASH_ROUNDS").unwrap_or(DEFAULT_ROUNDS);
    let base = env_u64("CAIRN_CRASH_SEED").unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        mix(now.unwrap_or_default().as_nanos() as u64 ^ u64::from(std::process::id()))
    });
    let started = Instant::now();
    let mut done = 0;
    // Each directory has its own seed, so a failure replays from its directory alone.
    for seed in (0..).map(|i| base.wrapping_add(i)) {
        if done >= rounds {
            break;
        }
        let n = (rounds - done).min(ROUNDS_PER_DIR);
        if let Err(e) = crash_dir(seed, n) {
            panic!("crash test failed: {e}");
        }
        done += n;
    }
    eprintln!("{rounds} crash rounds in {:.1?} (CAIRN_CRASH_SEED={base})", started.elapsed());
}
