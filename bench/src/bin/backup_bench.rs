//! backup-bench: cairn's backup repository against restic and borg in one run.
//!
//! One image from ../shared/bench/mkimage.py is backed up by all three tools, each into an
//! encrypted repository on the same disk: cairn from a snapshot of a volume holding the image,
//! restic and borg from the raw file. Then 1 % of the image's 64 KiB blocks change (the same
//! blocks in the file and in the volume), each tool makes an incremental backup, and each
//! restores the latest backup, which is checked against the changed image.
//!
//! Every timed step ends with its output durable: restic, borg and cairn's directory backend
//! fsync what they write to a repository; the peers' restores are followed by an fsync of the
//! restored file (cairn's restore ends with the volume's flush). Each cairn step also opens its repository
//! (Argon2id and the index), as each peer's run does.
//!
//! Prints a markdown table against DESIGN.md's targets, or JSON with `--json`.

use anyhow::{bail, ensure, Context, Result};
use cairn_backup::{BackupRequest, BlockSink, BlockSource, DirBackend, KdfParams, Repository};
use cairn_bench::{default_mkimage, drop_caches, human_size, load_average, median, parse_size, run, WorkDir, KIB, MIB};
use cairn_volume::{Allocation, ChangeTarget, SnapshotId, SnapshotView, Store, StoreOptions, Volume};
use serde_json::json;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

const USAGE: &str = "\
usage: backup-bench [options]

  --dir DIR         where to put the image, volumes and repositories (default /var/tmp; a fresh
                    directory is made in it and removed at the end; keep it off tmpfs)
  --size SIZE       image size, a multiple of 1 MiB, such as 256M (default 4G, as in DESIGN.md)
  --rounds N        rounds, each from a fresh image and fresh repositories; each figure is the
                    median (default 1)
  --mkimage PATH    the image generator (default ../shared/bench/mkimage.py from the project root)
  --json            print JSON instead of the markdown table

Needs restic, borg (apt-get install restic borgbackup), python3 and du on PATH.
";

const IMAGE_SEED: &str = "1";
const CHANGE_SEED: &str = "2";
const CHANGE_PERCENT: &str = "1";
/// The block mkimage.py's --mutate overwrites, and cairn's chunk.
const BLOCK: usize = 64 * KIB as usize;
const PASSPHRASE: &str = "cairn-bench passphrase";

/// The tools, in the order every step runs them; the figures' arrays follow it.
const TOOLS: [&str; 3] = ["cairn", "restic", "borg"];

/// A step of the table: name, unit, JSON key, the target's ratio and what it is relative to.
struct Step {
    name: &'static str,
    unit: &'static str,
    key: &'static str,
    target: f64,
    /// The target is against restic alone, not the better peer.
    against_restic: bool,
}

const STEPS: [Step; 4] = [
    Step { name: "full backup", unit: "s", key: "full_backup_s", target: 2.0, against_restic: false },
    Step {
        name: "incremental backup after a 1 % change",
        unit: "s",
        key: "incremental_backup_s",
        target: 20.0,
        against_restic: false,
    },
    Step {
        name: "repository growth from the change",
        unit: "MiB",
        key: "growth_mib",
        target: 4.0,
        against_restic: true,
    },
    Step { name: "restore of the latest backup", unit: "s", key: "restore_s", target: 2.0, against_restic: true },
];

#[derive(Debug)]
struct Config {
    dir: PathBuf,
    size: u64,
    rounds: usize,
    mkimage: PathBuf,
    json: bool,
}

impl Config {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Config>> {
        let mut cfg = Config {
            dir: PathBuf::from("/var/tmp"),
            size: 4 << 30,
            rounds: 1,
            mkimage: default_mkimage(),
            json: false,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--dir" => cfg.dir = PathBuf::from(value()?),
                "--size" => cfg.size = parse_size(&value()?)?,
                "--rounds" => cfg.rounds = value()?.parse().context("--rounds")?,
                "--mkimage" => cfg.mkimage = PathBuf::from(value()?),
                "--json" => cfg.json = true,
                "-h" | "--help" => return Ok(None),
                _ => bail!("unknown argument {arg:?}\n\n{USAGE}"),
            }
        }
        ensure!(cfg.size.is_multiple_of(MIB) && cfg.size > 0, "--size must be a positive multiple of 1 MiB");
        ensure!(cfg.rounds >= 1, "--rounds must be positive");
        ensure!(cfg.mkimage.exists(), "{} not found (use --mkimage)", cfg.mkimage.display());
        Ok(Some(cfg))
    }
}

/// Bytes a directory takes on disk, as du counts them.
fn disk_usage(dir: &Path) -> Result<u64> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let out = run(Command::new("du").args(["-s", "--block-size=1"]).arg(dir))?;
    out.split_whitespace().next().and_then(|n| n.parse().ok()).with_context(|| format!("du printed {out:?}"))
}

/// Fails unless what `read` gives equals the image, byte for byte.
fn ensure_same(what: &str, image: &File, size: u64, mut read: impl FnMut(&mut [u8], u64) -> Result<()>) -> Result<()> {
    let mut want = vec![0u8; MIB as usize];
    let mut got = vec![0u8; MIB as usize];
    for at in (0..size).step_by(MIB as usize) {
        image.read_exact_at(&mut want, at)?;
        read(&mut got, at)?;
        if want != got {
            let first = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(0);
            bail!("{what} differs from the changed image at byte {}", at + first as u64);
        }
    }
    Ok(())
}

/// A snapshot as a backup reads it.
struct SnapshotSource(SnapshotView);

impl BlockSource for SnapshotSource {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read(buf, offset).map_err(io::Error::other)
    }
}

/// A volume as a restore writes it; durable only at the flush after the restore.
struct VolumeSink(Volume);

impl BlockSink for VolumeSink {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.0.write(data, offset, false).map_err(io::Error::other)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len, false).map_err(io::Error::other)
    }
}

/// A timed cairn step and where its time went.
struct Timed {
    seconds: f64,
    detail: String,
}

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// cairn's side of a round: a store holding the image in a volume, snapshots of it, and a
/// repository of its backups.
struct Cairn {
    store: Store,
    volume: Volume,
    repo_dir: PathBuf,
    /// The volume's snapshots, oldest first: the image, then the image after each change.
    snapshots: Vec<SnapshotId>,
    /// Ids of the backups made, oldest first.
    backups: Vec<String>,
}

impl Cairn {
    /// The store, a volume holding the image, its first snapshot and an empty repository.
    /// All-zero blocks are not written, so the volume is as sparse as the image.
    fn setup(dir: &Path, image: &Path, size: u64) -> Result<Cairn> {
        let store = Store::open_dir(dir.join("cairn-store"), StoreOptions::default())?;
        let volume = store.volume(store.create_volume("disk", size)?.id)?;
        let file = File::open(image)?;
        let mut buf = vec![0u8; MIB as usize];
        for at in (0..size).step_by(MIB as usize) {
            file.read_exact_at(&mut buf, at)?;
            // Runs of non-zero blocks go in one write each.
            let mut blocks = buf.chunks(BLOCK).enumerate().peekable();
            while let Some((first, block)) = blocks.next() {
                if block.iter().all(|b| *b == 0) {
                    continue;
                }
                let mut end = first + 1;
                while blocks.next_if(|(_, b)| b.iter().any(|x| *x != 0)).is_some() {
                    end += 1;
                }
                volume.write(&buf[first * BLOCK..end * BLOCK], at + (first * BLOCK) as u64, false)?;
            }
        }
        volume.flush()?;
        let s1 = store.snapshot(volume.id(), "s1")?.id;
        let repo_dir = dir.join("cairn-repo");
        Repository::init(Arc::new(DirBackend::new(&repo_dir)?), Some(PASSPHRASE), KdfParams::standard())?;
        Ok(Cairn { store, volume, repo_dir, snapshots: vec![s1], backups: Vec::new() })
    }

    fn open_repo(&self) -> Result<Repository> {
        Ok(Repository::open(Arc::new(DirBackend::new(&self.repo_dir)?), Some(PASSPHRASE))?)
    }

    /// Backs up the first snapshot, reading only what its allocation map says holds data.
    fn full_backup(&mut self) -> Result<Timed> {
        let start = Instant::now();
        let repo = self.open_repo()?;
        let opened = secs(start);
        let view = self.store.open_snapshot(self.snapshots[0])?;
        let allocated: Vec<Range<u64>> = view
            .allocation(0, view.size())?
            .into_iter()
            .filter(|e| e.kind == Allocation::Data)
            .map(|e| e.offset..e.offset + e.length)
            .collect();
        let mapped = secs(start);
        let request =
            BackupRequest { labels: BTreeMap::new(), parent: None, allocated: Some(&allocated), progress: None };
        let record = repo.backup(&SnapshotSource(view), request)?;
        let seconds = secs(start);
        self.backups.push(record.id);
        let stats = record.stats;
        Ok(Timed {
            seconds,
            detail: format!(
                "open {opened:.2} s (Argon2id + index), allocation map {:.2} s ({} data extents), backup {:.2} s \
                 ({} chunks read, {} new, {:.1} MiB added)",
                mapped - opened,
                allocated.len(),
                seconds - mapped,
                stats.chunks_read,
                stats.chunks_new,
                stats.bytes_added as f64 / MIB as f64
            ),
        })
    }

    /// Makes the volume equal the changed image: the blocks that differ from the last
    /// snapshot are written, then a snapshot is taken. Returns how many blocks changed.
    fn apply_change(&mut self, image: &Path) -> Result<u64> {
        let before = self.store.open_snapshot(*self.snapshots.last().context("no snapshot")?)?;
        let file = File::open(image)?;
        let (mut now, mut was) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
        let mut changed = 0;
        for at in (0..before.size()).step_by(MIB as usize) {
            file.read_exact_at(&mut now, at)?;
            before.read(&mut was, at)?;
            for (i, (new, old)) in now.chunks(BLOCK).zip(was.chunks(BLOCK)).enumerate() {
                if new != old {
                    self.volume.write(new, at + (i * BLOCK) as u64, false)?;
                    changed += 1;
                }
            }
        }
        self.volume.flush()?;
        let name = format!("s{}", self.snapshots.len() + 1);
        self.snapshots.push(self.store.snapshot(self.volume.id(), &name)?.id);
        Ok(changed)
    }

    /// Backs up the newest snapshot over the last backup, reading only the ranges that
    /// changed-block tracking reports since the snapshot that backup was made of.
    fn incremental_backup(&mut self) -> Result<Timed> {
        let [.., since, latest] = self.snapshots[..] else { bail!("an incremental backup needs two snapshots") };
        let start = Instant::now();
        let repo = self.open_repo()?;
        let parent = repo.backup_record(self.backups.last().context("no backup to build on")?)?;
        let opened = secs(start);
        let changed: Vec<Range<u64>> = self
            .store
            .changed_extents(since, ChangeTarget::Snapshot(latest))?
            .into_iter()
            .map(|e| e.offset..e.offset + e.length)
            .collect();
        let tracked = secs(start);
        let request = BackupRequest {
            labels: BTreeMap::new(),
            parent: Some((&parent, &changed)),
            allocated: None,
            progress: None,
        };
        let record = repo.backup(&SnapshotSource(self.store.open_snapshot(latest)?), request)?;
        let seconds = secs(start);
        self.backups.push(record.id);
        let stats = record.stats;
        Ok(Timed {
            seconds,
            detail: format!(
                "open {opened:.2} s (Argon2id + index + parent record), changed_extents {:.3} s ({} extents, {:.1} MiB), \
                 backup {:.2} s ({} chunks read, {} new, {:.1} MiB added)",
                tracked - opened,
                changed.len(),
                changed.iter().map(|r| r.end - r.start).sum::<u64>() as f64 / MIB as f64,
                seconds - tracked,
                stats.chunks_read,
                stats.chunks_new,
                stats.bytes_added as f64 / MIB as f64
            ),
        })
    }

    /// Restores the last backup into a fresh volume and checks it against the image (untimed).
    fn restore(&self, image: &Path, size: u64) -> Result<Timed> {
        let start = Instant::now();
        let repo = self.open_repo()?;
        let opened = secs(start);
        let target = self.store.volume(self.store.create_volume("restored", size)?.id)?;
        let sink = VolumeSink(target);
        let stats = repo.restore(self.backups.last().context("no backup to restore")?, &sink, None, None)?;
        let restored = secs(start);
        sink.0.flush()?;
        let seconds = secs(start);
        ensure_same("cairn's restored volume", &File::open(image)?, size, |buf, at| Ok(sink.0.read(buf, at)?))?;
        Ok(Timed {
            seconds,
            detail: format!(
                "open {opened:.2} s, restore {:.2} s ({} chunks written, {} zero), volume flush {:.2} s",
                restored - opened,
                stats.chunks_written,
                stats.chunks_zero,
                seconds - restored
            ),
        })
    }

    /// Fails unless the repository verifies clean (untimed).
    fn verify(&self) -> Result<()> {
        let report = self.open_repo()?.verify(None, None)?;
        ensure!(report.problems.is_empty(), "cairn's repository does not verify: {:?}", report.problems);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerKind {
    Restic,
    Borg,
}

/// restic or borg with an encrypted repository in the round's directory; its cache and
/// settings stay in that directory too, so nothing outlives the run.
struct Peer {
    kind: PeerKind,
    repo: PathBuf,
    home: PathBuf,
}

impl Peer {
    /// A peer with a fresh repository (untimed).
    fn init(kind: PeerKind, dir: &Path) -> Result<Peer> {
        let name = match kind {
            PeerKind::Restic => "restic",
            PeerKind::Borg => "borg",
        };
        let peer = Peer { kind, repo: dir.join(format!("{name}-repo")), home: dir.join(format!("{name}-home")) };
        std::fs::create_dir(&peer.home)?;
        let mut cmd = peer.command();
        match kind {
            // Format 2 is restic's default since 0.14; named, so the report's "compressed" holds.
            PeerKind::Restic => run(cmd.args(["init", "--repository-version", "2"]))?,
            PeerKind::Borg => run(cmd.args(["init", "--encryption=repokey-blake2"]).arg(&peer.repo))?,
        };
        Ok(peer)
    }

    fn command(&self) -> Command {
        match self.kind {
            PeerKind::Restic => {
                let mut cmd = Command::new("restic");
                cmd.arg("--repo")
                    .arg(&self.repo)
                    .env("RESTIC_PASSWORD", PASSPHRASE)
                    .env("RESTIC_CACHE_DIR", &self.home);
                cmd
            }
            PeerKind::Borg => {
                let mut cmd = Command::new("borg");
                cmd.env("BORG_PASSPHRASE", PASSPHRASE).env("BORG_BASE_DIR", &self.home);
                cmd
            }
        }
    }

    fn archive(&self, name: &str) -> PathBuf {
        let mut spec = self.repo.clone().into_os_string();
        spec.push(format!("::{name}"));
        spec.into()
    }

    /// Seconds to back the image up as archive `name` (borg names archives; restic does not).
    fn backup(&self, image: &Path, name: &str) -> Result<f64> {
        let mut cmd = self.command();
        match self.kind {
            PeerKind::Restic => cmd.args(["backup", "--quiet"]).arg(image),
            PeerKind::Borg => cmd.arg("create").arg(self.archive(name)).arg(image),
        };
        let start = Instant::now();
        run(&mut cmd)?;
        Ok(secs(start))
    }

    /// Seconds to restore archive `name` (restic: the latest snapshot) under `into` and fsync
    /// the file; then checks the file against the image (untimed).
    fn restore(&self, image: &Path, name: &str, size: u64, into: &Path) -> Result<f64> {
        std::fs::create_dir(into)?;
        let mut cmd = self.command();
        match self.kind {
            PeerKind::Restic => cmd.args(["restore", "latest", "--target"]).arg(into),
            // --sparse: borg can leave holes where the image has zeros; restic 0.14 cannot.
            PeerKind::Borg => cmd.current_dir(into).args(["extract", "--sparse"]).arg(self.archive(name)),
        };
        let start = Instant::now();
        run(&mut cmd)?;
        // Both keep the file's absolute path under the target.
        let restored = into.join(image.strip_prefix("/")?);
        File::open(&restored).with_context(|| format!("{} not restored", restored.display()))?.sync_all()?;
        let seconds = secs(start);
        let file = File::open(&restored)?;
        ensure!(file.metadata()?.len() == size, "{}'s restored image has the wrong size", TOOLS[self.tool()]);
        ensure_same(&format!("{}'s restored image", TOOLS[self.tool()]), &File::open(image)?, size, |buf, at| {
            Ok(file.read_exact_at(buf, at)?)
        })?;
        std::fs::remove_dir_all(into)?;
        Ok(seconds)
    }

    /// The peer's index in [`TOOLS`].
    fn tool(&self) -> usize {
        match self.kind {
            PeerKind::Restic => 1,
            PeerKind::Borg => 2,
        }
    }
}

/// What one round measured; arrays follow [`TOOLS`].
struct RoundResult {
    full: [f64; 3],
    incremental: [f64; 3],
    restore: [f64; 3],
    repo_after_full: [u64; 3],
    repo_after_incremental: [u64; 3],
    changed_blocks: u64,
    /// Where cairn's time went in each timed step.
    cairn_details: [String; 3],
}

impl RoundResult {
    /// The step's figure for each tool, in the step's unit.
    fn figures(&self, step: usize) -> [f64; 3] {
        match step {
            0 => self.full,
            1 => self.incremental,
            2 => std::array::from_fn(|t| {
                (self.repo_after_incremental[t] as f64 - self.repo_after_full[t] as f64) / MIB as f64
            }),
            _ => self.restore,
        }
    }
}

fn run_round(cfg: &Config, dir: &Path, image: &Path, round: usize) -> Result<RoundResult> {
    let say = |what: &str| eprintln!("round {}: {what}", round + 1);
    say("loading the image into a cairn volume");
    let mut cairn = Cairn::setup(dir, image, cfg.size)?;
    let peers = [Peer::init(PeerKind::Restic, dir)?, Peer::init(PeerKind::Borg, dir)?];
    let repo_sizes = |cairn: &Cairn| -> Result<[u64; 3]> {
        Ok([disk_usage(&cairn.repo_dir)?, disk_usage(&peers[0].repo)?, disk_usage(&peers[1].repo)?])
    };

    say("full backups");
    drop_caches();
    let full_cairn = cairn.full_backup()?;
    let mut full = [full_cairn.seconds, 0.0, 0.0];
    for peer in &peers {
        drop_caches();
        full[peer.tool()] = peer.backup(image, "a")?;
    }
    let repo_after_full = repo_sizes(&cairn)?;

    say("changing 1 % of the image");
    run(Command::new("python3").arg(&cfg.mkimage).arg("--mutate").arg(image).args([CHANGE_PERCENT, CHANGE_SEED]))?;
    let changed_blocks = cairn.apply_change(image)?;

    say("incremental backups");
    drop_caches();
    let incremental_cairn = cairn.incremental_backup()?;
    let mut incremental = [incremental_cairn.seconds, 0.0, 0.0];
    for peer in &peers {
        drop_caches();
        incremental[peer.tool()] = peer.backup(image, "b")?;
    }
    let repo_after_incremental = repo_sizes(&cairn)?;

    say("restores");
    drop_caches();
    let restore_cairn = cairn.restore(image, cfg.size)?;
    let mut restore = [restore_cairn.seconds, 0.0, 0.0];
    for peer in &peers {
        drop_caches();
        let into = dir.join(format!("{}-restored", TOOLS[peer.tool()]));
        restore[peer.tool()] = peer.restore(image, "b", cfg.size, &into)?;
    }
    say("verifying cairn's repository");
    cairn.verify()?;
    Ok(RoundResult {
        full,
        incremental,
        restore,
        repo_after_full,
        repo_after_incremental,
        changed_blocks,
        cairn_details: [full_cairn.detail, incremental_cairn.detail, restore_cairn.detail],
    })
}

struct Report {
    load: String,
    cores: usize,
    caches_dropped: bool,
    restic_version: String,
    borg_version: String,
    rounds: Vec<RoundResult>,
}

impl Report {
    /// The median figure of `tool` in `step`.
    fn figure(&self, step: usize, tool: usize) -> f64 {
        median(&self.rounds.iter().map(|r| r.figures(step)[tool]).collect::<Vec<_>>())
    }

    fn best_peer(&self, step: usize) -> f64 {
        self.figure(step, 1).min(self.figure(step, 2))
    }

    /// What DESIGN.md compares cairn with in `step`.
    fn reference(&self, step: usize) -> f64 {
        if STEPS[step].against_restic {
            self.figure(step, 1)
        } else {
            self.best_peer(step)
        }
    }

    /// Smaller is better in every step, so reference / cairn above 1 means cairn is better.
    fn target_ratio(&self, step: usize) -> f64 {
        self.reference(step) / self.figure(step, 0)
    }

    fn met(&self, step: usize) -> bool {
        self.target_ratio(step) >= STEPS[step].target
    }

    fn misses(&self) -> Vec<&'static str> {
        (0..STEPS.len()).filter(|&s| !self.met(s)).map(|s| STEPS[s].name).collect()
    }

    /// The median repository size of `tool` after the full backup, or after the incremental.
    fn repo_size(&self, tool: usize, incremental: bool) -> f64 {
        let sizes: Vec<f64> = self
            .rounds
            .iter()
            .map(|r| if incremental { r.repo_after_incremental[tool] } else { r.repo_after_full[tool] } as f64)
            .collect();
        median(&sizes)
    }

    fn markdown(&self, cfg: &Config) -> String {
        let mut out = format!(
            "## Backup: {} image from mkimage.py (seed {IMAGE_SEED}), {CHANGE_PERCENT} % of its 64 KiB blocks \
             changed (seed {CHANGE_SEED}), median of {} round(s)\n\n",
            human_size(cfg.size),
            cfg.rounds
        );
        out += "| step | unit | cairn | restic | borg | best peer | best peer / cairn | DESIGN.md target | \
                target ratio | met? |\n";
        out += "|---|---|---:|---:|---:|---:|---:|---|---:|---|\n";
        for (s, step) in STEPS.iter().enumerate() {
            let against = if step.against_restic { "restic's" } else { "the faster peer's" };
            let target = if step.unit == "s" { "time" } else { "growth" };
            out += &format!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | cairn's {target} ≤ 1/{} of {against} | {:.2} | {} |\n",
                step.name,
                step.unit,
                self.figure(s, 0),
                self.figure(s, 1),
                self.figure(s, 2),
                self.best_peer(s),
                self.best_peer(s) / self.figure(s, 0),
                step.target,
                self.target_ratio(s),
                if self.met(s) { "yes" } else { "**no**" },
            );
        }
        out += "\nRatios are peer / cairn: above 1 means cairn is faster or smaller. The target ratio is against \
                what DESIGN.md names (the faster peer, or restic) and must reach the target's denominator.\n";
        out += "\n| repository on disk (du) | cairn | restic | borg |\n|---|---:|---:|---:|\n";
        for (name, incremental) in [("after the full backup", false), ("after the incremental backup", true)] {
            out += &format!(
                "| {name} | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n",
                self.repo_size(0, incremental) / MIB as f64,
                self.repo_size(1, incremental) / MIB as f64,
                self.repo_size(2, incremental) / MIB as f64,
            );
        }
        let misses = self.misses();
        let last = self.rounds.last().expect("at least one round");
        out += "\nNotes:\n";
        out += &format!(
            "- Targets: {}\n",
            if misses.is_empty() { "all met.".to_string() } else { format!("missed: {}.", misses.join(", ")) }
        );
        out += &format!(
            "- Peers: {}, {}. All three repositories are encrypted with a passphrase and on the same disk: cairn \
             XChaCha20-Poly1305 under an Argon2id-wrapped key (KdfParams::standard), zstd level 1 on 64 KiB chunks; \
             restic repository format 2 with its default compression (auto: klauspost/compress zstd at its default \
             level, about zstd 3), content-defined chunks of about 1 MiB; borg init --encryption=repokey-blake2 with \
             its default compression (lz4), content-defined chunks of about 2 MiB.\n",
            self.restic_version, self.borg_version
        );
        out += &format!(
            "- {} cores, shared with whatever else runs (see the load average). cairn and restic back up and restore \
             on several threads; borg 1.x on one.\n",
            self.cores
        );
        out += &format!(
            "- The change: {} blocks of 64 KiB ({:.1} MiB) overwritten with random data by mkimage.py --mutate in the \
             file, and the same blocks written into cairn's volume (untimed) before snapshot s2.\n",
            last.changed_blocks,
            (last.changed_blocks * BLOCK as u64) as f64 / MIB as f64
        );
        out += "- cairn backs up snapshots of a volume holding the image (the full backup reads only the allocated \
                ranges; the incremental only the ranges changed_extents reports, whose time counts); restic and borg \
                back up the raw file, which they read whole both times since its mtime changed. Every timed cairn \
                step opens the repository (Argon2id, index), as each peer command does.\n";
        out += "- Durability: every timed step ends with its output on disk. restic and borg fsync their repository \
                writes themselves, and so does cairn's directory backend (each object synced, then renamed into \
                place). cairn's restore ends with the volume's flush; the peers' restores with an \
                fsync of the restored file. borg extracts with --sparse (holes for zero chunks); restic 0.14 has no \
                sparse restore and writes the zeros.\n";
        out += "- Each restored image was compared with the changed image byte for byte (untimed) and cairn's \
                repository verified clean.\n";
        for (step, detail) in ["full backup", "incremental backup", "restore"].iter().zip(&last.cairn_details) {
            out += &format!("- cairn {step}, round {}: {detail}.\n", self.rounds.len());
        }
        out += &format!(
            "- Before each tool's timed step: sync and {}. Repository sizes are taken after a sync.\n",
            if self.caches_dropped { "drop the page cache" } else { "NOT dropping the page cache (not root)" }
        );
        out += &format!("- Load average at the start: {}.\n", self.load);
        out
    }

    fn json(&self, cfg: &Config) -> serde_json::Value {
        let steps: serde_json::Map<_, _> = STEPS
            .iter()
            .enumerate()
            .map(|(s, step)| {
                let mut row = serde_json::Map::new();
                row.insert("unit".into(), json!(step.unit));
                for (tool, name) in TOOLS.iter().enumerate() {
                    row.insert(name.to_string(), json!(self.figure(s, tool)));
                }
                row.insert("best_peer".into(), json!(self.best_peer(s)));
                row.insert("best_peer_over_cairn".into(), json!(self.best_peer(s) / self.figure(s, 0)));
                row.insert("target_against".into(), json!(if step.against_restic { "restic" } else { "best_peer" }));
                row.insert("target_ratio".into(), json!(self.target_ratio(s)));
                row.insert("target".into(), json!(step.target));
                row.insert("met".into(), json!(self.met(s)));
                (step.key.to_string(), serde_json::Value::Object(row))
            })
            .collect();
        let repository_bytes: serde_json::Map<_, _> = TOOLS
            .iter()
            .enumerate()
            .map(|(tool, name)| {
                let sizes = json!({
                    "after_full": self.repo_size(tool, false) as u64,
                    "after_incremental": self.repo_size(tool, true) as u64,
                });
                (name.to_string(), sizes)
            })
            .collect();
        let rounds: Vec<_> = self
            .rounds
            .iter()
            .map(|r| {
                json!({
                    "changed_blocks": r.changed_blocks,
                    "cairn_full_backup": r.cairn_details[0],
                    "cairn_incremental_backup": r.cairn_details[1],
                    "cairn_restore": r.cairn_details[2],
                })
            })
            .collect();
        json!({
            "config": {
                "size": cfg.size,
                "rounds": cfg.rounds,
                "image_seed": IMAGE_SEED,
                "change_seed": CHANGE_SEED,
                "change_percent": CHANGE_PERCENT,
                "load_average": self.load,
                "cores": self.cores,
                "page_cache_dropped": self.caches_dropped,
                "restic": self.restic_version,
                "borg": self.borg_version,
            },
            "steps": steps,
            "repository_bytes": repository_bytes,
            "rounds": rounds,
            "missed": self.misses(),
        })
    }
}

/// The first line of a tool's version output, up to " compiled".
fn version(tool: &str, arg: &str) -> Result<String> {
    let out = run(Command::new(tool).arg(arg))?;
    let line = out.lines().next().unwrap_or_default();
    Ok(line.split(" compiled").next().unwrap_or(line).to_string())
}

fn main() -> Result<()> {
    let Some(cfg) = Config::parse(std::env::args().skip(1))? else {
        print!("{USAGE}");
        return Ok(());
    };
    for (tool, package) in [("restic", "restic"), ("borg", "borgbackup"), ("python3", "python3"), ("du", "coreutils")] {
        ensure!(
            Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status()?.success(),
            "{tool} is not installed (apt-get install {package})"
        );
    }
    let restic_version = version("restic", "version")?;
    let borg_version = version("borg", "--version")?;
    let load = load_average();
    let caches_dropped = drop_caches();
    if !caches_dropped {
        eprintln!("cannot drop the page cache (not root?): figures depend on what earlier steps left in it");
    }
    let work = WorkDir::create(&cfg.dir)?;
    // The peers store the image's absolute path and restore it under that path.
    let root = work.0.canonicalize()?;
    let pristine = root.join("image.raw");
    eprintln!("making a {} image", human_size(cfg.size));
    run(Command::new("python3").arg(&cfg.mkimage).arg(&pristine).arg((cfg.size / MIB).to_string()).arg(IMAGE_SEED))?;
    let mut rounds = Vec::new();
    for round in 0..cfg.rounds {
        let dir = root.join(format!("round-{round}"));
        std::fs::create_dir(&dir)?;
        let image = dir.join("image.raw");
        // The change is made in place, so every round but the last works on a copy.
        if round + 1 == cfg.rounds {
            std::fs::rename(&pristine, &image)?;
        } else {
            run(Command::new("cp").arg("--sparse=always").arg(&pristine).arg(&image))?;
        }
        rounds.push(run_round(&cfg, &dir, &image, round)?);
        std::fs::remove_dir_all(&dir)?;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let report = Report { load, cores, caches_dropped, restic_version, borg_version, rounds };
    if cfg.json {
        println!("{}", serde_json::to_string_pretty(&report.json(&cfg))?);
    } else {
        print!("{}", report.markdown(&cfg));
    }
    Ok(())
}
