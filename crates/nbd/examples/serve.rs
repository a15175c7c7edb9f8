//! Serves a cairn store over NBD until Ctrl-C: every volume read-write as `VOLUME`, every
//! snapshot read-only as `VOLUME@SNAPSHOT`. On a new store it creates a volume `disk` of
//! `--size` bytes (default 10 GiB; K, M, G, T suffixes).
//!
//! cargo run --release -p cairn-nbd --example serve -- [--dir DIR] [--socket PATH] [--size SIZE]
//!     [--tcp ADDR] [--tls-cert PEM --tls-key PEM [--tls-ca PEM] [--tls-required]]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cairn_nbd::{Exports, Listener, ServerConfig, TlsMode, VolumeExports};
use cairn_volume::{Store, StoreOptions};

struct Args {
    dir: PathBuf,
    socket: PathBuf,
    tcp: Option<String>,
    size: u64,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_required: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        dir: PathBuf::from("cairn-data/volumes"),
        socket: PathBuf::from("cairn-data/nbd.sock"),
        tcp: None,
        size: 10 << 30,
        tls_cert: None,
        tls_key: None,
        tls_ca: None,
        tls_required: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => args.dir = value()?.into(),
            "--socket" => args.socket = value()?.into(),
            "--tcp" => args.tcp = Some(value()?),
            "--size" => args.size = parse_size(&value()?)?,
            "--tls-cert" => args.tls_cert = Some(value()?.into()),
            "--tls-key" => args.tls_key = Some(value()?.into()),
            "--tls-ca" => args.tls_ca = Some(value()?.into()),
            "--tls-required" => args.tls_required = true,
            _ => bail!("unknown argument {arg:?} (see the comment at the top of examples/serve.rs)"),
        }
    }
    Ok(args)
}

fn parse_size(text: &str) -> Result<u64> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        Some(b'T' | b't') => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().with_context(|| format!("bad size {text:?}"))?;
    n.checked_mul(1 << shift).with_context(|| format!("size {text:?} is too large"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let store = Arc::new(Store::open_dir(&args.dir, StoreOptions::default())?);
    if store.list_volumes().is_empty() {
        store.create_volume("disk", args.size)?;
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsMode {
            acceptor: cairn_nbd::tls_acceptor(cert, key, args.tls_ca.as_deref())?,
            required: args.tls_required,
        }),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let config = ServerConfig { tls };
    let exports = Arc::new(VolumeExports::new(store.clone()));
    if let Some(parent) = args.socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // A socket file left by a server that was killed would make bind fail.
    let _ = std::fs::remove_file(&args.socket);
    let unix = Listener::Unix(tokio::net::UnixListener::bind(&args.socket)?);
    for e in exports.list() {
        println!("export {}: nbd+unix:///{}?socket={}", e.name, e.name, args.socket.display());
    }
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut servers = tokio::task::JoinSet::new();
    let mut stop = stop_tx.subscribe();
    servers.spawn(cairn_nbd::serve(unix, exports.clone(), config.clone(), async move {
        let _ = stop.recv().await;
    }));
    if let Some(addr) = &args.tcp {
        let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        println!("listening on nbd://{}/", tcp.local_addr()?);
        let mut stop = stop_tx.subscribe();
        servers.spawn(cairn_nbd::serve(Listener::Tcp(tcp), exports, config, async move {
            let _ = stop.recv().await;
        }));
    }
    tokio::signal::ctrl_c().await?;
    eprintln!("shutting down: finishing requests in flight");
    let _ = stop_tx.send(());
    while let Some(done) = servers.join_next().await {
        done??;
    }
    let _ = std::fs::remove_file(&args.socket);
    Arc::try_unwrap(store).map_err(|_| anyhow::anyhow!("store still in use"))?.close()?;
    Ok(())
}
