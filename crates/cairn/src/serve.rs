//! `cairn serve`: the daemon. It opens the volume store and the metadata database in the data
//! directory, repairs what a crash left, and serves the REST API and NBD until SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cairn_control::metering::{MeteredKind, Price, Prices};
use cairn_control::{Control, NbdAddress, RepoLocation, SchedulerOptions};
use cairn_nbd::{Listener, ServerConfig};
use serde::Deserialize;
use tokio::sync::watch;

const DEFAULT_DATA_DIR: &str = "cairn-data";
const DEFAULT_LISTEN: &str = "127.0.0.1:8474";
const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
/// How long a shutdown waits for import and export jobs before leaving them to the next start.
const JOB_GRACE: Duration = Duration::from_secs(5);

/// Options: flags, then CAIRN_* variables, then the TOML file, then the embedded defaults.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A TOML file with any of: data_dir, listen, nbd_listen, nbd_socket, transfer_dir,
    /// backup_repo, max_concurrent_runs, schedule_jitter, free_backups_per_vm, a [copy_repos]
    /// table of NAME = LOCATION and a [prices] table of KIND = price per GiB-month.
    #[arg(long, env = "CAIRN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where volumes, metadata and the admin token live [default: ./cairn-data].
    #[arg(long, env = "CAIRN_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the REST API [default: 127.0.0.1:8474]; port 0 picks a free one.
    #[arg(long, env = "CAIRN_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// TCP address of the NBD server [default: 127.0.0.1:10809]; "off" for none.
    #[arg(long, env = "CAIRN_NBD_LISTEN", value_name = "ADDR")]
    nbd_listen: Option<String>,
    /// Unix socket of the NBD server [default: DATA_DIR/nbd.sock].
    #[arg(long, env = "CAIRN_NBD_SOCKET", value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// Directory under which each tenant may import and export image files, in
    /// TRANSFER_DIR/TENANT_NAME [default: none; only the administrator may].
    #[arg(long, env = "CAIRN_TRANSFER_DIR", value_name = "DIR")]
    transfer_dir: Option<PathBuf>,
    /// The backup repository: a directory on another disk, or s3://BUCKET[/PREFIX] with the
    /// endpoint and keys in AWS_* variables [default: cairn-backups beside the data
    /// directory]; "off" for none. Encrypted when CAIRN_BACKUP_PASSPHRASE is set (read from
    /// the environment only, so it never shows in a process list).
    #[arg(long, env = "CAIRN_BACKUP_REPO", value_name = "LOCATION")]
    backup_repo: Option<String>,
    /// A second repository backups can be copied to (the off-site copy), as NAME=LOCATION;
    /// repeat for more. Same forms and passphrase as --backup-repo.
    #[arg(long = "copy-repo", value_name = "NAME=LOCATION", value_parser = parse_named_location)]
    copy_repos: Vec<(String, String)>,
    /// Scheduled runs in progress at once; the rest wait their turn [default: 4].
    #[arg(long, env = "CAIRN_MAX_CONCURRENT_RUNS", value_name = "N")]
    max_concurrent_runs: Option<usize>,
    /// Longest delay, in seconds, after a schedule's time before its run starts (spread per
    /// schedule, at most a tenth of its interval) [default: 300].
    #[arg(long, env = "CAIRN_SCHEDULE_JITTER", value_name = "SECONDS")]
    schedule_jitter: Option<u32>,
    /// A price per GiB-month, as KIND=PRICE with KIND volume, snapshot, template or backup;
    /// repeat for each [default: volume=0.08, snapshot=0.05, template=0.05, backup=0.05].
    #[arg(long = "price", value_name = "KIND=PRICE", value_parser = parse_price)]
    prices: Vec<(MeteredKind, Price)>,
    /// Restore points of each VM that are not billed: its oldest that exist [default: 3].
    #[arg(long, env = "CAIRN_FREE_BACKUPS_PER_VM", value_name = "N")]
    free_backups_per_vm: Option<u32>,
}

fn parse_price(text: &str) -> Result<(MeteredKind, Price), String> {
    let (kind, price) = text.split_once('=').ok_or_else(|| format!("{text:?}: give KIND=PRICE, e.g. backup=0.05"))?;
    let kind = MeteredKind::parse(kind)
        .ok_or_else(|| format!("{kind:?}: the kinds priced are volume, snapshot, template and backup"))?;
    Ok((kind, price.parse().map_err(|e| format!("{e}"))?))
}

/// A price in the TOML file: "0.05" or 0.05 (a float's shortest text is the decimal written).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FilePrice {
    Text(String),
    Number(f64),
}

fn parse_named_location(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, location)) if !name.is_empty() && !location.is_empty() => Ok((name.into(), location.into())),
        _ => Err(format!("{text:?}: give NAME=LOCATION, e.g. offsite=s3://bucket/cairn")),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    nbd_listen: Option<String>,
    nbd_socket: Option<PathBuf>,
    transfer_dir: Option<PathBuf>,
    backup_repo: Option<String>,
    #[serde(default)]
    copy_repos: BTreeMap<String, String>,
    max_concurrent_runs: Option<usize>,
    schedule_jitter: Option<u32>,
    /// KIND = price per GiB-month.
    #[serde(default)]
    prices: BTreeMap<String, FilePrice>,
    free_backups_per_vm: Option<u32>,
}

/// The settings in force.
#[derive(Debug)]
struct Settings {
    data_dir: PathBuf,
    listen: String,
    nbd_listen: Option<String>,
    nbd_socket: PathBuf,
    transfer_dir: Option<PathBuf>,
    backup_repo: Option<RepoLocation>,
    copy_repos: BTreeMap<String, RepoLocation>,
    scheduler: SchedulerOptions,
    prices: Prices,
}

const DEFAULT_BACKUP_REPO: &str = "cairn-backups";

fn settings(args: ServeArgs) -> Result<Settings> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    let nbd_listen = args.nbd_listen.or(file.nbd_listen).unwrap_or_else(|| DEFAULT_NBD_LISTEN.into());
    let defaults = SchedulerOptions::default();
    let max_concurrent_runs =
        args.max_concurrent_runs.or(file.max_concurrent_runs).unwrap_or(defaults.max_concurrent_runs);
    if max_concurrent_runs == 0 {
        bail!("--max-concurrent-runs must be at least 1");
    }
    let scheduler = SchedulerOptions {
        max_concurrent_runs,
        max_jitter: match args.schedule_jitter.or(file.schedule_jitter) {
            Some(seconds) => Duration::from_secs(u64::from(seconds)),
            None => defaults.max_jitter,
        },
    };
    let mut prices = Prices::default();
    for (kind, price) in &file.prices {
        let text = match price {
            FilePrice::Text(text) => text.clone(),
            FilePrice::Number(n) => n.to_string(),
        };
        let (kind, price) = parse_price(&format!("{kind}={text}")).map_err(|e| anyhow::anyhow!("[prices] {e}"))?;
        prices.per_gib_month.insert(kind, price);
    }
    prices.per_gib_month.extend(args.prices);
    if let Some(free) = args.free_backups_per_vm.or(file.free_backups_per_vm) {
        prices.free_backups_per_vm = free;
    }
    Ok(Settings {
        scheduler,
        prices,
        nbd_socket: args.nbd_socket.or(file.nbd_socket).unwrap_or_else(|| data_dir.join("nbd.sock")),
        listen: args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.into()),
        nbd_listen: (nbd_listen != "off").then_some(nbd_listen),
        transfer_dir: args.transfer_dir.or(file.transfer_dir),
        // Beside the data directory by default (./cairn-backups for ./cairn-data); another
        // disk in earnest, since a backup on the disk's own storage is not a backup (R12).
        backup_repo: match args.backup_repo.or(file.backup_repo) {
            Some(off) if off == "off" => None,
            Some(text) => Some(RepoLocation::parse(&text).context("--backup-repo")?),
            None => Some(RepoLocation::Dir(data_dir.with_file_name(DEFAULT_BACKUP_REPO))),
        },
        // Flags add to (and override by name) what the file names.
        copy_repos: file
            .copy_repos
            .into_iter()
            .chain(args.copy_repos)
            .map(|(name, text)| {
                cairn_control::names::check_name("copy repository", &name).map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok((name.clone(), RepoLocation::parse(&text).with_context(|| format!("copy repository {name}"))?))
            })
            .collect::<Result<_>>()?,
        data_dir,
    })
}

/// Writes a small file whole or not at all.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn run(args: ServeArgs) -> Result<()> {
    let settings = settings(args)?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(settings))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match &mut term { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

async fn serve(settings: Settings) -> Result<()> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating the data directory {}", settings.data_dir.display()))?;
    let data_dir = settings.data_dir.canonicalize()?;

    if let Some(parent) = settings.nbd_socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // A socket file left by a daemon that was killed would make bind fail.
    let _ = std::fs::remove_file(&settings.nbd_socket);
    let unix = tokio::net::UnixListener::bind(&settings.nbd_socket)
        .with_context(|| format!("binding the NBD socket {}", settings.nbd_socket.display()))?;
    let nbd_socket = settings.nbd_socket.canonicalize()?;
    let tcp = match &settings.nbd_listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding NBD on {addr}"))?)
        }
        None => None,
    };
    let nbd_tcp: Option<SocketAddr> = tcp.as_ref().map(|l| l.local_addr()).transpose()?;

    let transfer_dir = match &settings.transfer_dir {
        Some(dir) => Some(dir.canonicalize().with_context(|| format!("the transfer directory {}", dir.display()))?),
        None => None,
    };
    let control_settings = cairn_control::Settings {
        nbd: NbdAddress { socket: nbd_socket.clone(), tcp: nbd_tcp },
        data_dir: data_dir.clone(),
        transfer_dir,
        backup_repository: settings.backup_repo.clone(),
        copy_repositories: settings.copy_repos.clone(),
        backup_passphrase: std::env::var("CAIRN_BACKUP_PASSPHRASE").ok().filter(|p| !p.is_empty()),
        clock: Arc::new(cairn_control::clock::SystemClock),
        scheduler: settings.scheduler.clone(),
        prices: settings.prices.clone(),
    };
    let (control, recovery) = Control::open_dir(control_settings).await.context("opening the control plane")?;
    let engine = control.engine().clone();
    let exports: Arc<dyn cairn_nbd::Exports> = control.exports().clone();
    if recovery.admin_token.is_some() {
        let token_path = data_dir.join("admin.token");
        eprintln!("cairn: first start: created the tenant admin; its API token is in {}", token_path.display());
    }
    for job in &recovery.interrupted_jobs {
        eprintln!("cairn: job {job} was interrupted by a restart; marked failed");
    }
    for orphan in &recovery.orphans_removed {
        eprintln!("cairn: removed {orphan}, left without metadata by a crash");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut nbd_servers = tokio::task::JoinSet::new();
    nbd_servers.spawn(cairn_nbd::serve(
        Listener::Unix(unix),
        exports.clone(),
        ServerConfig::default(),
        stopped(stop_rx.clone()),
    ));
    if let Some(tcp) = tcp {
        nbd_servers.spawn(cairn_nbd::serve(
            Listener::Tcp(tcp),
            exports.clone(),
            ServerConfig::default(),
            stopped(stop_rx.clone()),
        ));
    }

    let api = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("binding the API on {}", settings.listen))?;
    let url = format!("http://{}", api.local_addr()?);
    // Written once the API listens, so whoever waits for this file can call at once.
    write_atomically(&data_dir.join("api.url"), &format!("{url}\n"))?;
    eprintln!("cairn: API on {url} (OpenAPI at {url}/v1/openapi.json)");
    if let Some(repo) = &settings.backup_repo {
        eprintln!("cairn: backups go to {repo}");
    }
    for (name, location) in &settings.copy_repos {
        eprintln!("cairn: backups can be copied to {name} ({location})");
    }
    match nbd_tcp {
        Some(addr) => eprintln!("cairn: NBD on nbd://{addr}/ and nbd+unix:///?socket={}", nbd_socket.display()),
        None => eprintln!("cairn: NBD on nbd+unix:///?socket={}", nbd_socket.display()),
    }

    let (scheduler_stop, scheduler_stopped) = watch::channel(false);
    let scheduler = tokio::spawn(control.clone().run_scheduler(stopped(scheduler_stopped)));

    let state = cairn_api::AppState::new(control.clone());
    axum::serve(api, cairn_api::router(state)).with_graceful_shutdown(shutdown_signal()).await?;

    eprintln!("cairn: shutting down: finishing runs, jobs and NBD requests in flight");
    let _ = scheduler_stop.send(true);
    let _ = scheduler.await;
    control.stop_runs(JOB_GRACE).await;
    // Jobs first: imports and exports run through the NBD socket.
    control.drain_jobs(JOB_GRACE).await;
    let _ = stop_tx.send(true);
    while let Some(done) = nbd_servers.join_next().await {
        if let Err(e) = done? {
            eprintln!("cairn: NBD server: {e}");
        }
    }
    // Jobs still running have lost their NBD connection and end now; the next start marks any
    // that did not as interrupted.
    control.drain_jobs(JOB_GRACE).await;
    control.close().await;
    drop((control, exports));
    match Arc::try_unwrap(engine) {
        Ok(store) => store.close().context("closing the volume store")?,
        Err(_) => bail!("the volume store was still in use at shutdown; unflushed writes may be lost"),
    }
    let _ = std::fs::remove_file(&nbd_socket);
    // Nobody listens there any more; a client finding no file says so more plainly.
    let _ = std::fs::remove_file(data_dir.join("api.url"));
    Ok(())
}
