//! Latency of the lifecycle operations through the whole service — HTTP, metadata commit
//! (SQLite, synchronous=FULL) and the volume engine — against DESIGN.md's targets: snapshot
//! under 5 ms at p99, volume from snapshot and revert under 50 ms, at any size.
//!
//! A `cairn serve` (the release binary next to this one) runs on a fresh data directory. For
//! each disk size, a VM's root disk gets one ../shared/bench/mkimage.py image copied in with
//! nbdcopy, then each operation runs `--runs` times, with a 64 KiB write before each snapshot
//! so every snapshot freezes a head that has data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cairn_bench::{default_mkimage, human_size, load_average, parse_size, run, WorkDir, GIB, MIB, TIB};
use serde_json::{json, Value};

const USAGE: &str = "\
usage: service-bench [--dir DIR] [--image-size SIZE] [--runs N] [--mkimage PATH]
  --dir DIR          where the daemon's data directory goes (default /var/tmp)
  --image-size SIZE  the mkimage.py image copied into each disk (default 1G)
  --runs N           times each operation runs per disk size (default 50)
  --mkimage PATH     the image generator (default ../shared/bench/mkimage.py)
Needs nbdcopy, qemu-io and python3 on PATH, and the cairn release binary (bench/run builds it).";

struct Config {
    dir: PathBuf,
    image_size: u64,
    runs: usize,
    mkimage: PathBuf,
}

fn parse_args() -> Result<Option<Config>> {
    let mut cfg = Config { dir: PathBuf::from("/var/tmp"), image_size: GIB, runs: 50, mkimage: default_mkimage() };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => cfg.dir = PathBuf::from(value()?),
            "--image-size" => cfg.image_size = parse_size(&value()?)?,
            "--runs" => cfg.runs = value()?.parse().context("--runs")?,
            "--mkimage" => cfg.mkimage = PathBuf::from(value()?),
            "-h" | "--help" => return Ok(None),
            _ => bail!("unknown argument {arg:?}\n\n{USAGE}"),
        }
    }
    ensure!(
        cfg.image_size.is_multiple_of(MIB) && cfg.image_size > 0,
        "--image-size must be a positive multiple of 1 MiB"
    );
    ensure!(cfg.runs >= 2, "--runs must be at least 2");
    ensure!(cfg.mkimage.exists(), "{} not found (use --mkimage)", cfg.mkimage.display());
    Ok(Some(cfg))
}

/// The daemon under test; killed when dropped.
struct Daemon {
    child: Child,
    url: String,
    token: String,
    agent: ureq::Agent,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(data_dir: &Path) -> Result<Daemon> {
        let binary = std::env::current_exe()?.with_file_name("cairn");
        ensure!(binary.exists(), "{} not found: build it with cargo build --release -p cairn", binary.display());
        let child = Command::new(&binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--nbd-listen", "off", "--data-dir"])
            .arg(data_dir)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut daemon =
            Daemon { child, url: String::new(), token: String::new(), agent: ureq::AgentBuilder::new().build() };
        let deadline = Instant::now() + Duration::from_secs(30);
        // api.url appears once the API listens.
        while !std::fs::read_to_string(data_dir.join("api.url")).is_ok_and(|u| u.ends_with('\n')) {
            ensure!(daemon.child.try_wait()?.is_none(), "cairn serve exited at start");
            ensure!(Instant::now() < deadline, "cairn serve did not start within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon.url = std::fs::read_to_string(data_dir.join("api.url"))?.trim().to_string();
        daemon.token = std::fs::read_to_string(data_dir.join("admin.token"))?.trim().to_string();
        Ok(daemon)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let request = self
            .agent
            .request(method, &format!("{}{path}", self.url))
            .set("Authorization", &format!("Bearer {}", self.token));
        let response = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        match response {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(status, r)) => bail!("{method} {path}: {status} {}", r.into_string()?),
            Err(e) => bail!("{method} {path}: {e}"),
        }
    }

    /// The call's latency as the client sees it.
    fn timed(&self, method: &str, path: &str, body: Option<Value>) -> Result<(Duration, Value)> {
        let start = Instant::now();
        let answer = self.call(method, path, body)?;
        Ok((start.elapsed(), answer))
    }
}

/// p50, p99 and max in milliseconds.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99), at(1.0))
}

struct Row {
    operation: &'static str,
    size: u64,
    samples: Vec<Duration>,
    target_ms: f64,
}

fn measure_size(daemon: &Daemon, image: &Path, size: u64, runs: usize, rows: &mut Vec<Row>) -> Result<()> {
    let vm_name = format!("bench-{}", human_size(size).replace([' ', '.'], ""));
    let vm = daemon.call("POST", "/v1/vms", Some(json!({"name": vm_name, "size": size})))?;
    let root = vm["root_volume"].as_str().context("root_volume")?.to_string();
    let volume = daemon.call("GET", &format!("/v1/volumes/{root}"), None)?;
    let uri = volume["nbd"]["unix_uri"].as_str().context("unix_uri")?.to_string();
    run(Command::new("nbdcopy").arg(image).arg(&uri))?;
    daemon.call("POST", &format!("/v1/vms/{vm_name}/stop"), None)?;

    let mut snapshots = Vec::new();
    let mut samples = Vec::new();
    for i in 0..runs {
        let offset = (i as u64 * 7919 * MIB) % (size - MIB);
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P {} {offset} 64k", i % 250 + 1)])
            .arg(&uri))?;
        let (took, snapshot) = daemon.timed("POST", &format!("/v1/volumes/{root}/snapshots"), Some(json!({})))?;
        samples.push(took);
        snapshots.push(snapshot["id"].as_str().context("snapshot id")?.to_string());
    }
    rows.push(Row { operation: "snapshot a disk", size, samples, target_ms: 5.0 });

    let mut samples = Vec::new();
    for (i, snapshot) in snapshots.iter().cycle().take(runs).enumerate() {
        let body = json!({"vm": vm_name, "as": "data", "name": format!("{vm_name}-r{i}")});
        let (took, restored) = daemon.timed("POST", &format!("/v1/snapshots/{snapshot}/restore"), Some(body))?;
        samples.push(took);
        let id = restored["id"].as_str().context("volume id")?;
        // A root disk's copy stays with its VM (R7); it is deleted attached.
        daemon.call("DELETE", &format!("/v1/volumes/{id}"), None)?;
    }
    rows.push(Row { operation: "volume from snapshot", size, samples, target_ms: 50.0 });

    let mut samples = Vec::new();
    for snapshot in snapshots.iter().rev().cycle().take(runs) {
        let (took, _) =
            daemon.timed("POST", &format!("/v1/volumes/{root}/revert"), Some(json!({"snapshot": snapshot})))?;
        samples.push(took);
    }
    rows.push(Row { operation: "revert a disk", size, samples, target_ms: 50.0 });

    let template = format!("{vm_name}-tpl");
    daemon.call("POST", "/v1/templates", Some(json!({"name": template, "snapshot": snapshots[0]})))?;
    let mut samples = Vec::new();
    for i in 0..runs {
        let name = format!("{vm_name}-c{i}");
        let (took, _) = daemon.timed("POST", "/v1/vms", Some(json!({"name": name, "template": template})))?;
        samples.push(took);
        daemon.call("DELETE", &format!("/v1/vms/{name}"), None)?;
    }
    rows.push(Row { operation: "VM from template", size, samples, target_ms: 50.0 });
    Ok(())
}

fn main() -> Result<()> {
    let Some(cfg) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    let work = WorkDir::create(&cfg.dir)?;
    let image = work.0.join("image.raw");
    run(Command::new("python3").arg(&cfg.mkimage).arg(&image).arg((cfg.image_size / MIB).to_string()).arg("1"))?;
    let daemon = Daemon::start(&work.0.join("data"))?;
    let mut rows = Vec::new();
    for size in [cfg.image_size, TIB] {
        measure_size(&daemon, &image, size, cfg.runs, &mut rows)?;
    }
    println!(
        "cairn service latency, {} runs each, {} of mkimage data per disk, load {}",
        cfg.runs,
        human_size(cfg.image_size),
        load_average()
    );
    println!("| operation | disk | p50 ms | p99 ms | max ms | target p99 ms | target / p99 |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for row in rows {
        let (p50, p99, max) = percentiles(row.samples);
        println!(
            "| {} | {} | {p50:.2} | {p99:.2} | {max:.2} | {:.0} | {:.2} |",
            row.operation,
            human_size(row.size),
            row.target_ms,
            row.target_ms / p99
        );
    }
    Ok(())
}
