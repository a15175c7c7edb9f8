//! nbd-bench: cairn's NBD server against qemu-nbd and nbdkit (file plugin) in one run.
//!
//! One image from ../shared/bench/mkimage.py is served four ways over unix sockets: by
//! qemu-nbd and nbdkit from raw copies of it, and by cairn from a fresh volume holding it and
//! from a volume whose data is spread over many snapshot layers. The same clients run the
//! same tests on each: nbdcopy sequential read (to null:) and write (the image into the
//! export, flushed), and fio's nbd engine with 4 KiB random reads and writes at depth 32.
//!
//! Prints a markdown table with cairn / best-peer ratios, or JSON with `--json`.

use anyhow::{bail, ensure, Context, Result};
use cairn_bench::{
    default_mkimage, drop_caches, file_system_of, human_size, load_average, median, parse_size, read_ahead_kib_of, run,
    warm_free_memory, WorkDir, MIB,
};
use cairn_nbd::{Listener, ServerConfig, VolumeExports};
use cairn_volume::{Store, StoreOptions, Volume};
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

const USAGE: &str = "\
usage: nbd-bench [options]

  --dir DIR         where to put the data (default /var/tmp; a fresh directory is made in it
                    and removed at the end; keep it off tmpfs)
  --size SIZE       image size, a multiple of 1 MiB (default 1G)
  --seconds S       how long each fio test runs (default 10)
  --layers N        snapshot layers the layered cairn volume's data is spread over (default 32)
  --rounds N        rounds; each figure is the median (default 1)
  --targets LIST    comma-separated subset of qemu-nbd,nbdkit,cairn,cairn-layered (default all;
                    ratios need a peer and a cairn target)
  --mkimage PATH    the image generator (default ../shared/bench/mkimage.py from the project root)
  --json            print JSON instead of the markdown table

Needs qemu-nbd, nbdkit, nbdcopy, fio and python3 on PATH.
";

const IMAGE_SEED: &str = "1";
const FIO_DEPTH: u32 = 32;

#[derive(Debug)]
struct Config {
    dir: PathBuf,
    size: u64,
    seconds: u64,
    layers: usize,
    rounds: usize,
    mkimage: PathBuf,
    targets: Vec<usize>,
    json: bool,
}

impl Config {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Config>> {
        let mut cfg = Config {
            dir: PathBuf::from("/var/tmp"),
            size: 1 << 30,
            seconds: 10,
            layers: 32,
            rounds: 1,
            mkimage: default_mkimage(),
            targets: (0..TARGETS.len()).collect(),
            json: false,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--dir" => cfg.dir = PathBuf::from(value()?),
                "--size" => cfg.size = parse_size(&value()?)?,
                "--seconds" => cfg.seconds = value()?.parse().context("--seconds")?,
                "--layers" => cfg.layers = value()?.parse().context("--layers")?,
                "--rounds" => cfg.rounds = value()?.parse().context("--rounds")?,
                "--mkimage" => cfg.mkimage = PathBuf::from(value()?),
                "--targets" => {
                    cfg.targets = value()?
                        .split(',')
                        .map(|t| TARGETS.iter().position(|n| *n == t).with_context(|| format!("unknown target {t:?}")))
                        .collect::<Result<_>>()?
                }
                "--json" => cfg.json = true,
                "-h" | "--help" => return Ok(None),
                _ => bail!("unknown argument {arg:?}\n\n{USAGE}"),
            }
        }
        ensure!(cfg.size.is_multiple_of(MIB) && cfg.size > 0, "--size must be a positive multiple of 1 MiB");
        ensure!(cfg.layers >= 1 && cfg.size >= cfg.layers as u64 * MIB, "--layers must be 1..=size in MiB");
        ensure!(cfg.seconds >= 1 && cfg.rounds >= 1, "--seconds and --rounds must be positive");
        ensure!(cfg.mkimage.exists(), "{} not found (use --mkimage)", cfg.mkimage.display());
        Ok(Some(cfg))
    }
}

/// The four servers, in the order every round runs them.
const TARGETS: [&str; 4] = ["qemu-nbd", "nbdkit", "cairn", "cairn-layered"];

/// (name, unit, JSON key) of each test, in the order they run on a target.
const TESTS: [(&str, &str, &str); 4] = [
    ("nbdcopy sequential read", "MiB/s", "seq_read_mib_s"),
    ("fio 4 KiB random read, depth 32", "IOPS", "rand_read_iops"),
    ("nbdcopy sequential write (+flush)", "MiB/s", "seq_write_mib_s"),
    ("fio 4 KiB random write, depth 32", "IOPS", "rand_write_iops"),
];

type Figures = [f64; TESTS.len()];

/// A peer server started as a daemon; killed when dropped.
struct Daemon {
    pid_file: PathBuf,
}

impl Daemon {
    /// Runs `cmd`, which must daemonize once it accepts connections and write `pid_file`.
    fn start(cmd: &mut Command, pid_file: PathBuf) -> Result<Daemon> {
        let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
        ensure!(status.success(), "{cmd:?} failed: {status}");
        Ok(Daemon { pid_file })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) on a pid we started; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

fn uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// MiB/s of copying `size` bytes with nbdcopy.
fn nbdcopy(size: u64, from: &str, to: &str, flush: bool) -> Result<f64> {
    let mut cmd = Command::new("nbdcopy");
    if flush {
        cmd.arg("--flush");
    }
    let start = Instant::now();
    run(cmd.arg(from).arg(to))?;
    Ok(size as f64 / MIB as f64 / start.elapsed().as_secs_f64())
}

/// IOPS of a fio 4 KiB random test over NBD.
fn fio(uri: &str, size: u64, seconds: u64, write: bool) -> Result<f64> {
    let rw = if write { "randwrite" } else { "randread" };
    let out = run(Command::new("fio").args([
        "--name=bench",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={rw}"),
        "--bs=4k",
        &format!("--iodepth={FIO_DEPTH}"),
        &format!("--size={size}"),
        &format!("--runtime={seconds}"),
        "--time_based",
        "--randrepeat=1",
        "--output-format=json",
    ]))?;
    // fio may print warnings before the JSON.
    let json_start = out.find('{').context("fio printed no JSON")?;
    let report: serde_json::Value = serde_json::from_str(&out[json_start..]).context("fio's JSON")?;
    let side = if write { "write" } else { "read" };
    report["jobs"][0][side]["iops"].as_f64().context("fio reported no IOPS")
}

fn measure(socket: &Path, export: &str, image: &Path, cfg: &Config) -> Result<Figures> {
    let uri = uri(socket, export);
    let image = image.to_str().context("image path is not UTF-8")?;
    // Every server starts cold. How data entered the cache matters a lot: after large writes,
    // ext4 keeps large folios, and 4 KiB writes into those cost several times more than into
    // small ones.
    drop_caches();
    // Untimed: fills the page cache through this server's own reads, as for every server.
    nbdcopy(cfg.size, &uri, "null:", false)?;
    // Each test starts with nothing dirty: otherwise a server that wrote more in the random
    // write test would pay for the writeback in the next one.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    let settle = || unsafe { libc::sync() };
    let settled = |figure: Result<f64>| {
        settle();
        figure
    };
    let seq_read = settled(nbdcopy(cfg.size, &uri, "null:", false))?;
    let rand_read = settled(fio(&uri, cfg.size, cfg.seconds, false))?;
    // The source image comes from the page cache: read cold, the disk's read of it took
    // 317-753 ms of a copy that lasts about 700 ms, varied more than any server did, and
    // competed for the disk with whichever server writes while it receives. Read before the
    // warming below, or its pages would take the warmed memory.
    std::io::copy(&mut std::fs::File::open(image)?, &mut std::io::sink())?;
    // The peers and the fresh volume overwrite cached pages; the layered volume's empty head
    // needs new ones.
    warm_free_memory(&socket.with_extension("warm"), cfg.size)?;
    settle();
    Ok([
        seq_read,
        rand_read,
        // The image written over itself before random writes have fragmented the files.
        settled(nbdcopy(cfg.size, image, &uri, true))?,
        settled(fio(&uri, cfg.size, cfg.seconds, true))?,
    ])
}

/// A peer serving a raw copy of the image as export "disk". `command` gets the file, socket
/// and pid file and must give a command that daemonizes once it is listening.
fn bench_peer(
    work: &Path,
    name: &str,
    image: &Path,
    cfg: &Config,
    command: impl FnOnce(&Path, &Path, &Path) -> Command,
) -> Result<Figures> {
    let file = work.join(format!("{name}.raw"));
    run(Command::new("cp").arg("--sparse=always").arg(image).arg(&file))?;
    let socket = work.join(format!("{name}.sock"));
    let pid = work.join(format!("{name}.pid"));
    let _daemon = Daemon::start(&mut command(&file, &socket, &pid), pid)?;
    measure(&socket, "disk", image, cfg)
}

fn qemu_nbd_command(file: &Path, socket: &Path, pid: &Path) -> Command {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--fork", "--persistent", "--format=raw", "--shared=16", "--cache=writeback", "--discard=unmap"])
        .args(["-x", "disk"])
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--pid-file={}", pid.display()))
        .arg(file);
    cmd
}

fn nbdkit_command(file: &Path, socket: &Path, pid: &Path) -> Command {
    // Without -f nbdkit forks into the background once it is listening; it serves any name.
    let mut cmd = Command::new("nbdkit");
    cmd.arg("-U").arg(socket).arg("-P").arg(pid).arg("file").arg(file);
    cmd
}

/// cairn serving `volume` from `store` in this process, on its own runtime.
fn bench_cairn(work: &Path, store: &Arc<Store>, volume: &str, image: &Path, cfg: &Config) -> Result<Figures> {
    let socket = work.join(format!("{volume}.sock"));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let listener = {
        let _guard = runtime.enter();
        Listener::Unix(tokio::net::UnixListener::bind(&socket)?)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let exports = Arc::new(VolumeExports::new(store.clone()));
    let server = runtime.spawn(cairn_nbd::serve(listener, exports, ServerConfig::default(), async {
        let _ = stopped.await;
    }));
    let figures = measure(&socket, volume, image, cfg);
    let _ = stop.send(());
    runtime.block_on(server)??;
    figures
}

/// Writes the image's bytes `[start, end)` into `volume` (untimed setup). All-zero MiBs are
/// skipped: holes stay holes, as a sparse copy leaves them.
fn copy_image(volume: &Volume, image: &std::fs::File, start: u64, end: u64) -> Result<()> {
    let mut buf = vec![0u8; MIB as usize];
    for at in (start..end).step_by(MIB as usize) {
        image.read_exact_at(&mut buf, at)?;
        if buf.iter().any(|b| *b != 0) {
            volume.write(&buf, at, false)?;
        }
    }
    Ok(volume.flush()?)
}

/// A volume named "cairn" holding the image in its head.
fn fresh_volume(store: &Store, image: &Path, cfg: &Config) -> Result<()> {
    let info = store.create_volume("cairn", cfg.size)?;
    copy_image(&store.volume(info.id)?, &std::fs::File::open(image)?, 0, cfg.size)
}

/// A volume holding the image, written in `layers` slices with a snapshot after each, so its
/// data is spread over that many layers under an empty head.
fn layered_volume(store: &Store, image: &Path, cfg: &Config) -> Result<()> {
    let info = store.create_volume("cairn-layered", cfg.size)?;
    let volume = store.volume(info.id)?;
    let file = std::fs::File::open(image)?;
    let slice = (cfg.size / MIB / cfg.layers as u64) * MIB;
    for layer in 0..cfg.layers as u64 {
        let end = if layer + 1 == cfg.layers as u64 { cfg.size } else { (layer + 1) * slice };
        copy_image(&volume, &file, layer * slice, end)?;
        store.snapshot(info.id, &format!("layer-{layer}"))?;
    }
    Ok(())
}

struct Report {
    load: String,
    /// The work directory's file system and its device's read-ahead in KiB.
    file_system: Option<String>,
    read_ahead_kib: Option<u64>,
    caches_dropped: bool,
    /// rounds[target][round]
    rounds: Vec<Vec<Figures>>,
}

impl Report {
    /// The median figure, or NaN for a target left out with --targets.
    fn figure(&self, target: usize, test: usize) -> f64 {
        let values: Vec<f64> = self.rounds[target].iter().map(|r| r[test]).collect();
        if values.is_empty() {
            f64::NAN
        } else {
            median(&values)
        }
    }

    fn best_peer(&self, test: usize) -> f64 {
        self.figure(0, test).max(self.figure(1, test))
    }

    fn misses(&self) -> Vec<String> {
        let mut misses = Vec::new();
        for (test, (name, _, _)) in TESTS.iter().enumerate() {
            for target in [2, 3] {
                if self.figure(target, test) < self.best_peer(test) {
                    misses.push(format!("{name} ({})", TARGETS[target]));
                }
            }
        }
        misses
    }

    fn markdown(&self, cfg: &Config) -> String {
        let mut out = format!(
            "## NBD data path over unix sockets: {} image from mkimage.py (seed {IMAGE_SEED}), fio {} s per test, \
             median of {} round(s)\n\n",
            human_size(cfg.size),
            cfg.seconds,
            cfg.rounds
        );
        out += &format!(
            "| test | unit | qemu-nbd | nbdkit | cairn | cairn / best peer | cairn, {} layers | layered / best peer |\n",
            cfg.layers
        );
        out += "|---|---|---:|---:|---:|---:|---:|---:|\n";
        // Targets left out with --targets show as a dash.
        let show = |v: f64, decimals: usize| if v.is_nan() { "–".to_string() } else { format!("{v:.decimals$}") };
        for (test, (name, unit, _)) in TESTS.iter().enumerate() {
            let best = self.best_peer(test);
            out += &format!(
                "| {name} | {unit} | {} | {} | {} | {} | {} | {} |\n",
                show(self.figure(0, test), 0),
                show(self.figure(1, test), 0),
                show(self.figure(2, test), 0),
                show(self.figure(2, test) / best, 2),
                show(self.figure(3, test), 0),
                show(self.figure(3, test) / best, 2),
            );
        }
        let misses = self.misses();
        out += "\nNotes:\n";
        out += &format!(
            "- Target: every cairn figure at least the better peer's. {}\n",
            if misses.is_empty() { "All met.".to_string() } else { format!("Missed: {}.", misses.join(", ")) }
        );
        out += "- Peers serve raw copies of the image: qemu-nbd --persistent --cache=writeback --shared=16, nbdkit file plugin \
                with its default threads. cairn runs in this process (tokio, one worker per core).\n";
        out += &format!(
            "- The servers take turns in an order that rotates from round to round. Before each server's tests: sync and {}; then one untimed nbdcopy read warms the cache through that \
             server. A sync (untimed) follows every test. Before the sequential write, the source image is read into the page cache (untimed; read cold, the disk's read of it varied more than any server), then a scratch file of the image's size is \
             written and deleted (untimed), so that new page cache comes from warm memory for every server (on a VM, \
             memory untouched for a while costs a host fault per page; the layered volume's writes need new pages). Clients and servers share the machine's cores. nbdcopy skips the image's holes (about 45 %) \
             using block status, on every server alike.\n",
            if self.caches_dropped { "drop the page cache" } else { "NOT dropping the page cache (not root)" }
        );
        out += &format!(
            "- Data directory: {}; its device reads ahead {}. On ext4 read-ahead sets how large the page cache's \
             folios grow, and each 4 KiB write into a folio costs in proportion to the folio's size; there cairn reads a \
             volume's head without read-ahead (docs/architecture.md).\n",
            self.file_system.as_deref().unwrap_or("unknown file system"),
            self.read_ahead_kib.map_or("an unknown amount".to_string(), |kib| format!("{kib} KiB")),
        );
        if cfg.rounds > 1 {
            out += "- Lowest and highest round, to show the spread the medians hide:\n";
            for (test, (name, _, _)) in TESTS.iter().enumerate() {
                let spreads: Vec<String> = TARGETS
                    .iter()
                    .zip(&self.rounds)
                    .filter(|(_, rounds)| !rounds.is_empty())
                    .map(|(target, rounds)| {
                        let values = rounds.iter().map(|r| r[test]);
                        let low = values.clone().fold(f64::INFINITY, f64::min);
                        let high = values.fold(f64::NEG_INFINITY, f64::max);
                        format!("{target} {low:.0}-{high:.0}")
                    })
                    .collect();
                out += &format!("  - {name}: {}\n", spreads.join(", "));
            }
        }
        out += &format!("- Load average at the start: {}.\n", self.load);
        out
    }

    fn json(&self, cfg: &Config) -> serde_json::Value {
        let tests: serde_json::Map<_, _> = TESTS
            .iter()
            .enumerate()
            .map(|(test, (_, unit, key))| {
                let mut row = serde_json::Map::new();
                row.insert("unit".into(), json!(unit));
                for (target, name) in TARGETS.iter().enumerate() {
                    row.insert(name.to_string(), json!(self.figure(target, test)));
                }
                // Each round's figure, to see the spread the medians hide.
                let rounds: serde_json::Map<_, _> = TARGETS
                    .iter()
                    .zip(&self.rounds)
                    .map(|(name, rounds)| (name.to_string(), json!(rounds.iter().map(|r| r[test]).collect::<Vec<_>>())))
                    .collect();
                row.insert("rounds".into(), serde_json::Value::Object(rounds));
                row.insert("cairn_ratio".into(), json!(self.figure(2, test) / self.best_peer(test)));
                row.insert("layered_ratio".into(), json!(self.figure(3, test) / self.best_peer(test)));
                (key.to_string(), serde_json::Value::Object(row))
            })
            .collect();
        json!({
            "config": {
                "size": cfg.size,
                "fio_seconds": cfg.seconds,
                "fio_depth": FIO_DEPTH,
                "layers": cfg.layers,
                "rounds": cfg.rounds,
                "load_average": self.load,
                "page_cache_dropped": self.caches_dropped,
                "file_system": self.file_system,
                "read_ahead_kib": self.read_ahead_kib,
            },
            "tests": tests,
            "missed": self.misses(),
        })
    }
}

fn main() -> Result<()> {
    let Some(cfg) = Config::parse(std::env::args().skip(1))? else {
        print!("{USAGE}");
        return Ok(());
    };
    for tool in ["qemu-nbd", "nbdkit", "nbdcopy", "fio", "python3"] {
        ensure!(
            Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status()?.success(),
            "{tool} is not installed"
        );
    }
    let load = load_average();
    let caches_dropped = drop_caches();
    if !caches_dropped {
        eprintln!("cannot drop the page cache (not root?): figures depend on what earlier steps left in it");
    }
    let work = WorkDir::create(&cfg.dir)?;
    let image = work.0.join("image.raw");
    eprintln!("making a {} image", human_size(cfg.size));
    run(Command::new("python3").arg(&cfg.mkimage).arg(&image).arg((cfg.size / MIB).to_string()).arg(IMAGE_SEED))?;
    let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); TARGETS.len()];
    for round in 0..cfg.rounds {
        let dir = work.0.join(format!("round-{round}"));
        std::fs::create_dir(&dir)?;
        let store = Arc::new(Store::open_dir(dir.join("cairn"), StoreOptions::default())?);
        // Each round starts with another target, so that none always runs right after the
        // same other one (whose files, deleted or not, the disk may still be busy with).
        for i in 0..cfg.targets.len() {
            let target = cfg.targets[(round + i) % cfg.targets.len()];
            eprintln!("round {}: {}", round + 1, TARGETS[target]);
            rounds[target].push(match target {
                0 => bench_peer(&dir, TARGETS[0], &image, &cfg, qemu_nbd_command)?,
                1 => bench_peer(&dir, TARGETS[1], &image, &cfg, nbdkit_command)?,
                2 => {
                    fresh_volume(&store, &image, &cfg)?;
                    bench_cairn(&dir, &store, "cairn", &image, &cfg)?
                }
                _ => {
                    layered_volume(&store, &image, &cfg)?;
                    bench_cairn(&dir, &store, "cairn-layered", &image, &cfg)?
                }
            });
        }
        std::fs::remove_dir_all(&dir)?;
    }
    let report = Report {
        load,
        file_system: file_system_of(&work.0),
        read_ahead_kib: read_ahead_kib_of(&work.0),
        rounds,
        caches_dropped,
    };
    if cfg.json {
        println!("{}", serde_json::to_string_pretty(&report.json(&cfg))?);
    } else {
        print!("{}", report.markdown(&cfg));
    }
    Ok(())
}
