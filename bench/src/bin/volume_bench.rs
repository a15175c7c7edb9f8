//! volume-bench: measures the volume engine against its targets (DESIGN.md §3) in one run.
//!
//! 1. Snapshot-create latency while a writer runs, on a 1 GiB and a 1 TiB thin volume.
//! 2. The data path (sequential 1 MiB and random 4 KiB reads and writes) of a raw file, a cairn
//!    volume without snapshots and a cairn volume many snapshot layers deep, all on the same
//!    disk with the same requests in the same order from the same seeds.
//!
//! Prints a markdown table, or JSON with `--json`. Progress goes to stderr.

use anyhow::{bail, ensure, Context, Result};
use cairn_bench::{
    cpu_steal, file_system_of, human_size, load_average, median as median_of, parse_size, warm_free_memory, WorkDir,
    GIB, KIB, MIB, TIB,
};
use cairn_volume::buffer::PageBuffer;
use cairn_volume::{Allocation, Store, StoreOptions, Volume};
use serde_json::json;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const SEQ_REQUEST: u64 = MIB;
const RAND_REQUEST: u64 = 4 * KIB;
const SEED: u64 = 0xca12_4b3e_0c4a_17e5;
/// Random streams: each test and each thread gets its own, the same for every target.
const STREAM_SNAPSHOT_WRITER: u64 = 1 << 32;
const STREAM_RAND_READ: u64 = 2 << 32;
const STREAM_RAND_WRITE: u64 = 3 << 32;
const STREAM_DATA: u64 = 4 << 32;
/// The snapshot test's writer flushes after this many writes, like a guest's periodic fsync.
const WRITER_FLUSH_EVERY: u64 = 64;
/// Pause between snapshots, so that every layer gets some of the writer's data.
const SNAPSHOT_GAP: Duration = Duration::from_millis(10);
const SNAPSHOT_VOLUMES: [(u64, &str); 2] = [(GIB, "1 GiB"), (TIB, "1 TiB (thin)")];
const SNAPSHOT_P99_TARGET: Duration = Duration::from_millis(5);
const RATIO_TARGET: f64 = 0.9;

const USAGE: &str = "\
usage: volume-bench [options]

  --dir DIR         where to put the data: a fresh directory is made in DIR and removed
                    at the end (default /var/tmp; keep it off tmpfs)
  --size SIZE       data-path volume and raw file size (default 1G; K, M, G, T suffixes)
  --seconds S       how long each random 4 KiB test runs (default 3)
  --threads N       threads for the random tests (default 4)
  --snapshots N     snapshots taken per volume in the snapshot test (default 200)
  --layers N        snapshot layers under the layered volume's head (default 32)
  --rounds N        data-path rounds; each figure is their median (default 3)
  --json            print JSON instead of the markdown table
";

#[derive(Debug)]
struct Config {
    dir: PathBuf,
    size: u64,
    random_time: Duration,
    threads: usize,
    snapshots: usize,
    layers: usize,
    rounds: usize,
    json: bool,
}

impl Config {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Config>> {
        let mut cfg = Config {
            dir: PathBuf::from("/var/tmp"),
            size: GIB,
            random_time: Duration::from_secs(3),
            threads: 4,
            snapshots: 200,
            layers: 32,
            rounds: 3,
            json: false,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--dir" => cfg.dir = PathBuf::from(value()?),
                "--size" => cfg.size = parse_size(&value()?)?,
                "--seconds" => cfg.random_time = Duration::try_from_secs_f64(value()?.parse().context("--seconds")?)?,
                "--threads" => cfg.threads = value()?.parse().context("--threads")?,
                "--snapshots" => cfg.snapshots = value()?.parse().context("--snapshots")?,
                "--layers" => cfg.layers = value()?.parse().context("--layers")?,
                "--rounds" => cfg.rounds = value()?.parse().context("--rounds")?,
                "--json" => cfg.json = true,
                "-h" | "--help" => return Ok(None),
                _ => bail!("unknown argument {arg:?}\n\n{USAGE}"),
            }
        }
        ensure!(cfg.size.is_multiple_of(SEQ_REQUEST), "--size must be a multiple of 1 MiB");
        ensure!(cfg.layers >= 1 && cfg.size >= cfg.layers as u64 * SEQ_REQUEST, "--layers must be 1..=size in MiB");
        ensure!(
            cfg.threads >= 1 && !cfg.random_time.is_zero() && cfg.snapshots >= 1 && cfg.rounds >= 1,
            "--threads, --seconds, --snapshots and --rounds must be positive"
        );
        Ok(Some(cfg))
    }
}

/// splitmix64: fast, and a fixed seed gives every target the same offsets.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (multiply-shift, no division).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A page-aligned buffer of `len` random bytes. Every target reads into and writes from
    /// such buffers, as QEMU does: where a buffer starts within its page changes how fast the
    /// kernel copies into it up to five-fold (see [`PageBuffer`]), which would otherwise swing
    /// the read figures with wherever the allocator put the buffer.
    fn bytes(&mut self, len: u64) -> PageBuffer {
        let mut buffer = PageBuffer::zeroed(len as usize);
        for word in buffer.chunks_mut(8) {
            word.copy_from_slice(&self.next_u64().to_le_bytes()[..word.len()]);
        }
        buffer
    }
}

/// What the data-path tests drive: the raw file or a cairn volume.
trait Disk: Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
}

impl Disk for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.read_exact_at(buf, offset)?)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.write_all_at(buf, offset)?)
    }

    fn flush(&self) -> Result<()> {
        Ok(self.sync_data()?)
    }
}

impl Disk for Volume {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.read(buf, offset)?)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.write(buf, offset, false)?)
    }

    fn flush(&self) -> Result<()> {
        Ok(Volume::flush(self)?)
    }
}

/// A whole-volume allocation map (what NBD block status, `qemu-img map` and a backup's scan
/// ask for) of a thin volume that is zeroed throughout, with one data block every 64 MiB.
#[derive(Debug)]
struct AllocationResult {
    volume_size: u64,
    extents: usize,
    /// The first walk builds the flattened pages; later ones find them cached.
    first: Duration,
    cached: Duration,
}

const ALLOCATION_VOLUME: u64 = 256 * GIB;

fn allocation_walk(dir: &Path) -> Result<AllocationResult> {
    let store = Store::open_dir(dir, StoreOptions::default())?;
    let id = store.create_volume("allocation-bench", ALLOCATION_VOLUME)?.id;
    let volume = store.volume(id)?;
    for at in (0..ALLOCATION_VOLUME).step_by(GIB as usize) {
        volume.write_zeroes(at, GIB, false)?;
    }
    for at in (0..ALLOCATION_VOLUME).step_by(64 * MIB as usize) {
        volume.write(&[1; 4096], at, false)?;
    }
    let walk = || -> Result<(Duration, usize)> {
        let start = Instant::now();
        let extents = volume.allocation(0, ALLOCATION_VOLUME)?.len();
        Ok((start.elapsed(), extents))
    };
    let (first, extents) = walk()?;
    let cached =
        (0..3).map(|_| walk().map(|(t, _)| t)).collect::<Result<Vec<_>>>()?.into_iter().min().expect("3 walks");
    drop(volume);
    store.close()?;
    std::fs::remove_dir_all(dir)?;
    Ok(AllocationResult { volume_size: ALLOCATION_VOLUME, extents, first, cached })
}

#[derive(Debug)]
struct SnapshotResult {
    label: &'static str,
    volume_size: u64,
    latencies: Vec<Duration>,
    layers: usize,
    writer_writes: u64,
    /// The writer's own flushes meanwhile, sorted: a data sync and a journal sync, the least a
    /// durable snapshot must also wait for, on the same disk at the same time.
    writer_flushes: Vec<Duration>,
    /// CPU time the hypervisor took from this machine during the test, and the test's length.
    steal: Option<Duration>,
    elapsed: Duration,
}

/// Nearest-rank percentile of sorted durations; `None` for none.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

impl SnapshotResult {
    fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p).expect("at least one snapshot")
    }

    /// The writer's flush p50 and p99 in ms; `None` if a short run left it no time to flush.
    fn writer_flush_ms(&self) -> Option<(f64, f64)> {
        Some((ms(percentile(&self.writer_flushes, 50.0)?), ms(percentile(&self.writer_flushes, 99.0)?)))
    }

    fn max(&self) -> Duration {
        *self.latencies.last().expect("at least one snapshot")
    }
}

/// Takes `count` snapshots of a new volume while another thread writes to it, timing each.
fn snapshot_latency(dir: &Path, label: &'static str, volume_size: u64, count: usize) -> Result<SnapshotResult> {
    let store = Store::open_dir(dir, StoreOptions::default())?;
    let id = store.create_volume("snapshot-bench", volume_size)?.id;
    let volume = store.volume(id)?;
    let stop = AtomicBool::new(false);
    let (started, steal_before) = (Instant::now(), cpu_steal());
    let (taken, writer) = std::thread::scope(|s| {
        let writer = s.spawn(|| run_writer(&volume, &stop));
        let taken = (0..count)
            .map(|i| {
                std::thread::sleep(SNAPSHOT_GAP);
                let start = Instant::now();
                store.snapshot(id, &format!("s{i}"))?;
                Ok(start.elapsed())
            })
            .collect::<Result<Vec<_>>>();
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().expect("writer thread panicked");
        (taken, writes)
    });
    let elapsed = started.elapsed();
    let steal = cpu_steal().zip(steal_before).map(|(after, before)| after.saturating_sub(before));
    let mut latencies = taken?;
    let (writer_writes, mut writer_flushes) = writer?;
    writer_flushes.sort_unstable();
    latencies.sort_unstable();
    let layers = store.layer_count();
    store.close()?;
    std::fs::remove_dir_all(dir)?;
    Ok(SnapshotResult { label, volume_size, latencies, layers, writer_writes, writer_flushes, steal, elapsed })
}

/// Random 4 KiB writes with a flush every [`WRITER_FLUSH_EVERY`], until `stop`. Returns the
/// writes made and how long each flush took.
fn run_writer(volume: &Volume, stop: &AtomicBool) -> Result<(u64, Vec<Duration>)> {
    let mut rng = Rng::new(SEED ^ STREAM_SNAPSHOT_WRITER);
    let data = rng.bytes(RAND_REQUEST);
    let blocks = volume.size() / RAND_REQUEST;
    let mut writes = 0u64;
    let mut flushes = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        volume.write(&data, rng.below(blocks) * RAND_REQUEST, false)?;
        writes += 1;
        if writes.is_multiple_of(WRITER_FLUSH_EVERY) {
            let start = Instant::now();
            volume.flush()?;
            flushes.push(start.elapsed());
        }
    }
    Ok((writes, flushes))
}

/// The data-path tests in the order they run: name, unit, JSON key. Reads come first so that
/// on the layered volume they go through its layers; the writes after that land in its head.
/// The index of the sequential write in [`TESTS`].
const SEQ_WRITE: usize = 2;
const TESTS: [(&str, &str, &str); 4] = [
    ("sequential read (1 MiB)", "MiB/s", "seq_read"),
    ("random read (4 KiB)", "IOPS", "rand_read"),
    ("sequential write (1 MiB)", "MiB/s", "seq_write"),
    ("random write (4 KiB)", "IOPS", "rand_write"),
];

/// One target's results, in [`TESTS`] order.
type Figures = [f64; TESTS.len()];

/// `scratch`: a path beside the target's data for [`warm_free_memory`].
fn measure(disk: &dyn Disk, cfg: &Config, scratch: &Path) -> Result<Figures> {
    let seq_read = sequential(disk, cfg.size, false)?;
    let rand_read = random(disk, cfg, false)?;
    warm_free_memory(scratch, cfg.size)?;
    let seq_write = sequential(disk, cfg.size, true)?;
    Ok([seq_read, rand_read, seq_write, random(disk, cfg, true)?])
}

/// Writes `[first, end)` in 1 MiB requests, untimed: the data the read tests read.
fn fill(disk: &dyn Disk, first: u64, end: u64) -> Result<()> {
    let data = Rng::new(SEED ^ STREAM_DATA).bytes(SEQ_REQUEST);
    (first..end).step_by(SEQ_REQUEST as usize).try_for_each(|offset| disk.write_at(&data, offset))
}

/// MiB/s of 1 MiB requests from start to end; a write pass includes its final flush.
fn sequential(disk: &dyn Disk, size: u64, write: bool) -> Result<f64> {
    let mut buf = Rng::new(SEED ^ STREAM_DATA).bytes(SEQ_REQUEST);
    let start = Instant::now();
    for offset in (0..size).step_by(SEQ_REQUEST as usize) {
        if write {
            disk.write_at(&buf, offset)?;
        } else {
            disk.read_at(&mut buf, offset)?;
        }
    }
    if write {
        disk.flush()?;
    }
    Ok(size as f64 / MIB as f64 / start.elapsed().as_secs_f64())
}

/// IOPS of random 4 KiB requests on `cfg.threads` threads for `cfg.random_time`. Each thread
/// follows its own fixed stream of offsets, so every target gets the same requests in the same
/// order; a faster one just gets further. Writes are not flushed in the timed part (a guest's
/// random writes are acknowledged from the cache on both sides); they are flushed afterwards
/// so that the next test starts clean.
fn random(disk: &dyn Disk, cfg: &Config, write: bool) -> Result<f64> {
    /// Requests between two looks at the clock.
    const BATCH: u64 = 64;
    let blocks = cfg.size / RAND_REQUEST;
    let stream = if write { STREAM_RAND_WRITE } else { STREAM_RAND_READ };
    let start = Instant::now();
    let deadline = start + cfg.random_time;
    let ops = std::thread::scope(|s| {
        let workers: Vec<_> = (0..cfg.threads as u64)
            .map(|t| {
                s.spawn(move || -> Result<u64> {
                    let mut rng = Rng::new(SEED ^ stream ^ t);
                    let mut buf = rng.bytes(RAND_REQUEST);
                    let mut ops = 0;
                    while Instant::now() < deadline {
                        for _ in 0..BATCH {
                            let offset = rng.below(blocks) * RAND_REQUEST;
                            if write {
                                disk.write_at(&buf, offset)?;
                            } else {
                                disk.read_at(&mut buf, offset)?;
                            }
                        }
                        ops += BATCH;
                    }
                    Ok(ops)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("benchmark thread panicked")).sum::<Result<u64>>()
    })?;
    let iops = ops as f64 / start.elapsed().as_secs_f64();
    if write {
        disk.flush()?;
    }
    Ok(iops)
}

/// The raw file's figures, and the sequential write into a new raw file: the write allocates
/// its blocks, as the layered volume's writes into its empty head must, while the raw file's
/// own test overwrites blocks it has.
fn bench_raw(dir: &Path, cfg: &Config) -> Result<(Figures, f64)> {
    let path = dir.join("raw.img");
    let file = File::options().read(true).write(true).create_new(true).open(&path)?;
    file.set_len(cfg.size)?;
    fill(&file, 0, cfg.size)?;
    file.sync_data()?;
    let result = measure(&file, cfg, &dir.join("warm.tmp"))?;
    drop(file);
    std::fs::remove_file(&path)?;
    let new_file = File::options().read(true).write(true).create_new(true).open(&path)?;
    new_file.set_len(cfg.size)?;
    warm_free_memory(&dir.join("warm.tmp"), cfg.size)?;
    let new_file_write = sequential(&new_file, cfg.size, true)?;
    drop(new_file);
    std::fs::remove_file(&path)?;
    Ok((result, new_file_write))
}

/// A cairn volume with `layers` snapshots under its head, each holding an equal slice of the
/// data, or with all the data in its head if `layers` is 0.
fn bench_cairn(dir: &Path, cfg: &Config, layers: usize) -> Result<Figures> {
    let store = Store::open_dir(dir, StoreOptions::default())?;
    let id = store.create_volume("data-bench", cfg.size)?.id;
    let volume = store.volume(id)?;
    if layers == 0 {
        fill(&volume, 0, cfg.size)?;
        volume.flush()?;
    } else {
        let requests = cfg.size / SEQ_REQUEST;
        let layers = layers as u64;
        for i in 0..layers {
            fill(&volume, i * requests / layers * SEQ_REQUEST, (i + 1) * requests / layers * SEQ_REQUEST)?;
            store.snapshot(id, &format!("layer-{i}"))?;
        }
    }
    let holes = volume.allocation(0, cfg.size)?.into_iter().any(|e| e.kind != Allocation::Data);
    ensure!(!holes, "the filled volume has holes: the read tests would not read data");
    let result = measure(&volume, cfg, &dir.with_extension("warm"))?;
    store.close()?;
    std::fs::remove_dir_all(dir)?;
    Ok(result)
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Raw,
    Cairn,
    Layered,
}

const TARGETS: [Target; 3] = [Target::Raw, Target::Cairn, Target::Layered];

#[derive(Debug)]
struct Report {
    /// Load average when the run started: other work on the machine skews every figure.
    load: String,
    /// The data directory's file system and its mount options.
    file_system: Option<String>,
    snapshots: Vec<SnapshotResult>,
    allocation: AllocationResult,
    /// One entry per round.
    raw: Vec<Figures>,
    /// Sequential writes into a new raw file, one per round.
    raw_new_file_write: Vec<f64>,
    cairn: Vec<Figures>,
    layered: Vec<Figures>,
}

/// The median over rounds of one figure (the upper one of the middle two for an even count).
fn median(rounds: &[Figures], test: usize) -> f64 {
    let mut values: Vec<f64> = rounds.iter().map(|r| r[test]).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Report {
    fn misses(&self) -> Vec<String> {
        let mut misses = Vec::new();
        for s in &self.snapshots {
            if s.percentile(99.0) >= SNAPSHOT_P99_TARGET {
                misses.push(format!("snapshot p99 on {}", s.label));
            }
        }
        for (test, (name, _, _)) in TESTS.iter().enumerate() {
            for (label, rounds) in [("cairn", &self.cairn), ("layered", &self.layered)] {
                if median(rounds, test) < RATIO_TARGET * median(&self.raw, test) {
                    misses.push(format!("{name} ({label})"));
                }
            }
        }
        misses
    }

    fn markdown(&self, cfg: &Config, dir: &Path) -> String {
        let mut out = String::new();
        out += "## Snapshot create while a writer runs\n\n";
        out += &format!(
            "Random 4 KiB writes on another thread, a flush every {WRITER_FLUSH_EVERY}; {} ms between snapshots. \
             The writer flush column times the writer's own flushes, a data sync then a journal sync: the least a \
             snapshot also waits for to be durable, on the same disk at the same time (not a target). Host steal \
             is CPU time the hypervisor gave to others, summed over this machine's CPUs, during the test: a \
             thread on a stolen CPU stops for that long, and a writer stopped while it holds the volume's \
             gate delays the snapshot as much.\n\n",
            SNAPSHOT_GAP.as_millis()
        );
        out += "| volume | snapshots | p50 ms | p99 ms | max ms | layers reached | writer writes | p99 < 5 ms \
                | writer flush p50 / p99 ms | host steal ms in s |\n";
        out += "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|\n";
        for s in &self.snapshots {
            out += &format!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} in {:.1} |\n",
                s.label,
                s.latencies.len(),
                ms(s.percentile(50.0)),
                ms(s.percentile(99.0)),
                ms(s.max()),
                s.layers,
                s.writer_writes,
                if s.percentile(99.0) < SNAPSHOT_P99_TARGET { "yes" } else { "NO" },
                s.writer_flush_ms().map_or("none".to_string(), |(p50, p99)| format!("{p50:.2} / {p99:.2}")),
                s.steal.map_or("unknown".to_string(), |d| format!("{:.0}", ms(d))),
                s.elapsed.as_secs_f64(),
            );
        }
        let a = &self.allocation;
        out += &format!(
            "\n## Allocation map of a {} thin volume\n\nZeroed throughout, one 4 KiB data block every 64 MiB; \
             `allocation(0, size)` as NBD block status, qemu-img map and backups ask for it. Not a target.\n\n\
             | extents | first walk ms | cached walk ms (best of 3) |\n|---:|---:|---:|\n| {} | {:.1} | {:.1} |\n",
            human_size(a.volume_size),
            a.extents,
            ms(a.first),
            ms(a.cached)
        );
        out += &format!(
            "\n## Data path: raw file vs cairn, {}, random tests {} s on {} threads, median of {} rounds\n\n",
            human_size(cfg.size),
            cfg.random_time.as_secs_f64(),
            cfg.threads,
            cfg.rounds
        );
        out += &format!(
            "| test | unit | raw file | cairn | cairn / raw | cairn, {} layers | {} layers / raw |\n",
            cfg.layers, cfg.layers
        );
        out += "|---|---|---:|---:|---:|---:|---:|\n";
        for (test, (name, unit, _)) in TESTS.iter().enumerate() {
            let raw = median(&self.raw, test);
            let cairn = median(&self.cairn, test);
            let layered = median(&self.layered, test);
            out += &format!(
                "| {name} | {unit} | {raw:.0} | {cairn:.0} | {:.2} | {layered:.0} | {:.2} |\n",
                cairn / raw,
                layered / raw
            );
        }
        let new_file = median_of(&self.raw_new_file_write);
        out += &format!(
            "| sequential write into a new raw file | MiB/s | {new_file:.0} | | | {:.0} | {:.2} |\n",
            median(&self.layered, SEQ_WRITE),
            median(&self.layered, SEQ_WRITE) / new_file
        );
        let misses = self.misses();
        out += "\nNotes:\n";
        out += &format!(
            "- Targets: snapshot p99 < 5 ms; every cairn / raw ratio >= {RATIO_TARGET}. {}\n",
            if misses.is_empty() { "All met.".to_string() } else { format!("Missed: {}.", misses.join(", ")) }
        );
        out += "- Page cache not dropped: raw and cairn both go through it, so reads are mostly cache hits on \
                both sides and the comparison is of the software paths; the write tests' flushes reach the disk.\n";
        out += &format!(
            "- Reads read data written beforehand (untimed); on the layered volume that is {} equal slices, one \
             per snapshot layer, under an empty head. Reads run before writes, so the layered volume's writes \
             land in its empty head while the other two overwrite.\n",
            cfg.layers
        );
        out += "- The last row is not a target: it writes the raw file's sequential test into a new (sparse) file, \
                so the write allocates its blocks as the layered volume's writes into its empty head must, and \
                sets the layered figure against that.\n";
        out += "- Sequential writes include their final flush; random writes do not (flushed afterwards, untimed). \
                Before each target's sequential write, a scratch file of the same size is written and deleted \
                (untimed), so that new page cache comes from warm memory for every target.\n";
        out +=
            &format!("- Load average at the start: {}. Data in {} (removed at the end).\n", self.load, dir.display());
        if let Some(fs) = &self.file_system {
            out += &format!("- File system: {fs}.\n");
        }
        let new_blocks = median_of(&self.raw_new_file_write) / median(&self.raw, SEQ_WRITE);
        if new_blocks < RATIO_TARGET {
            out += &format!(
                "- On this disk a sequential write into new blocks ran at {new_blocks:.2} of an overwrite (the \
                 last row against the raw file's sequential write): the disk below allocates on first write, as a \
                 thin-provisioned virtual disk does (and with `discard` the file system hands freed blocks back \
                 to it). The layered volume's writes into its empty head pay that and the raw file's overwrite \
                 does not. To measure the engine without it, run with --dir on `bench/provisioned-fs up DIR`, a \
                 file system whose blocks the disk below already holds.\n"
            );
        }
        out
    }

    fn json(&self, cfg: &Config, dir: &Path) -> serde_json::Value {
        let snapshots: Vec<_> = self
            .snapshots
            .iter()
            .map(|s| {
                json!({
                    "volume": s.label,
                    "volume_size": s.volume_size,
                    "snapshots": s.latencies.len(),
                    "p50_ms": ms(s.percentile(50.0)),
                    "p99_ms": ms(s.percentile(99.0)),
                    "max_ms": ms(s.max()),
                    "layers": s.layers,
                    "writer_writes": s.writer_writes,
                    "writer_flush_p50_ms": s.writer_flush_ms().map(|(p50, _)| p50),
                    "writer_flush_p99_ms": s.writer_flush_ms().map(|(_, p99)| p99),
                    "host_steal_ms": s.steal.map(ms),
                    "elapsed_s": s.elapsed.as_secs_f64(),
                    "p99_target_ms": ms(SNAPSHOT_P99_TARGET),
                })
            })
            .collect();
        let data_path: serde_json::Map<_, _> = TESTS
            .iter()
            .enumerate()
            .map(|(test, (_, unit, key))| {
                let raw = median(&self.raw, test);
                let cairn = median(&self.cairn, test);
                let layered = median(&self.layered, test);
                let all = |rounds: &[Figures]| rounds.iter().map(|r| r[test]).collect::<Vec<_>>();
                let row = json!({
                    "unit": unit,
                    "raw": raw,
                    "cairn": cairn,
                    "cairn_ratio": cairn / raw,
                    "layered": layered,
                    "layered_ratio": layered / raw,
                    "rounds": {
                        "raw": all(&self.raw),
                        "cairn": all(&self.cairn),
                        "layered": all(&self.layered),
                    },
                });
                (key.to_string(), row)
            })
            .collect();
        json!({
            "config": {
                "dir": dir,
                "size": cfg.size,
                "random_seconds": cfg.random_time.as_secs_f64(),
                "threads": cfg.threads,
                "layers": cfg.layers,
                "rounds": cfg.rounds,
                "seed": SEED,
                "load_average": self.load,
                "file_system": self.file_system,
                "page_cache_dropped": false,
            },
            "snapshot_create": snapshots,
            "allocation_map": {
                "volume_size": self.allocation.volume_size,
                "extents": self.allocation.extents,
                "first_walk_ms": ms(self.allocation.first),
                "cached_walk_ms": ms(self.allocation.cached),
            },
            "data_path": data_path,
            "seq_write_new_raw_file": {
                "median": median_of(&self.raw_new_file_write),
                "rounds": self.raw_new_file_write,
                "layered_ratio": median(&self.layered, SEQ_WRITE) / median_of(&self.raw_new_file_write),
            },
            "ratio_target": RATIO_TARGET,
            "missed": self.misses(),
        })
    }
}

fn main() -> Result<()> {
    let Some(cfg) = Config::parse(std::env::args().skip(1))? else {
        print!("{USAGE}");
        return Ok(());
    };
    let load = load_average();
    let work = WorkDir::create(&cfg.dir)?;
    let mut snapshots = Vec::new();
    for (size, label) in SNAPSHOT_VOLUMES {
        eprintln!("snapshot create on {label}: {} snapshots", cfg.snapshots);
        snapshots.push(snapshot_latency(&work.0.join("snapshots"), label, size, cfg.snapshots)?);
    }
    eprintln!("allocation map of a {} volume", human_size(ALLOCATION_VOLUME));
    let allocation = allocation_walk(&work.0.join("allocation"))?;
    let (mut raw, mut raw_new_file_write, mut cairn, mut layered) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..cfg.rounds {
        // Each round starts with another target, so that none always runs right after the
        // same other one (whose deleted files may still be being freed).
        for i in 0..TARGETS.len() {
            let target = TARGETS[(round + i) % TARGETS.len()];
            eprintln!("data path, round {}/{}: {target:?}", round + 1, cfg.rounds);
            match target {
                Target::Raw => {
                    let (figures, new_file_write) = bench_raw(&work.0, &cfg)?;
                    raw.push(figures);
                    raw_new_file_write.push(new_file_write);
                }
                Target::Cairn => cairn.push(bench_cairn(&work.0.join("cairn"), &cfg, 0)?),
                Target::Layered => layered.push(bench_cairn(&work.0.join("layered"), &cfg, cfg.layers)?),
            }
        }
    }
    let report = Report {
        load,
        file_system: file_system_of(&work.0),
        snapshots,
        allocation,
        raw,
        raw_new_file_write,
        cairn,
        layered,
    };
    if cfg.json {
        println!("{}", serde_json::to_string_pretty(&report.json(&cfg, &work.0))?);
    } else {
        print!("{}", report.markdown(&cfg, &work.0));
    }
    Ok(())
}
