//! Shared by the interop tests: a cairn store served over NBD on a unix socket (and TCP) by
//! a server on its own runtime, and a way to run real NBD clients against it.
#![allow(dead_code)] // each test binary uses a different part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_nbd::{Exports, Listener, ServerConfig, VolumeExports};
pub use cairn_testkit::{have, pattern, run, run_failing};
use cairn_volume::{Store, StoreOptions};

/// A running server; dropping it shuts the server down gracefully and waits for it.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub store: Arc<Store>,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// A server on a unix socket over a new, empty store.
    pub fn start() -> TestServer {
        Self::start_with(ServerConfig::default(), false)
    }

    /// A server with `config`, on a unix socket and, with `tcp`, also on 127.0.0.1:0 — the
    /// TCP listener then serves the same store with the same config.
    pub fn start_with(config: ServerConfig, tcp: bool) -> TestServer {
        Self::start_exporting(config, tcp, |store| Arc::new(VolumeExports::new(store)))
    }

    /// A server offering what `exports` makes of the new store.
    pub fn start_exporting(
        config: ServerConfig,
        tcp: bool,
        exports: impl FnOnce(Arc<Store>) -> Arc<dyn Exports>,
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open_dir(dir.path().join("volumes"), StoreOptions::default()).expect("open store"));
        Self::start_on(dir, store, config, tcp, exports)
    }

    /// A server on `store`, which may live anywhere (on fault-injecting storage, say), with
    /// its socket in `dir`.
    pub fn start_on(
        dir: tempfile::TempDir,
        store: Arc<Store>,
        config: ServerConfig,
        tcp: bool,
        exports: impl FnOnce(Arc<Store>) -> Arc<dyn Exports>,
    ) -> TestServer {
        let socket = dir.path().join("nbd.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let exports = exports(store.clone());
        let sock = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let unix = Listener::Unix(tokio::net::UnixListener::bind(&sock)?);
                let (tcp_listener, addr) = if tcp {
                    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let addr = l.local_addr()?;
                    (Some(Listener::Tcp(l)), Some(addr))
                } else {
                    (None, None)
                };
                ready_tx.send(addr).expect("test waits");
                let (both_tx, _) = tokio::sync::broadcast::channel::<()>(1);
                let mut rx1 = both_tx.subscribe();
                let mut rx2 = both_tx.subscribe();
                let unix_server = cairn_nbd::serve(unix, exports.clone(), config.clone(), async move {
                    let _ = rx1.recv().await;
                });
                let tcp_server = async {
                    match tcp_listener {
                        Some(l) => {
                            cairn_nbd::serve(l, exports.clone(), config.clone(), async move {
                                let _ = rx2.recv().await;
                            })
                            .await
                        }
                        None => Ok(()),
                    }
                };
                let signal = async {
                    let _ = stopped.await;
                    let _ = both_tx.send(());
                };
                let (a, b, ()) = tokio::join!(unix_server, tcp_server, signal);
                a.and(b)
            })
        });
        let tcp = ready_rx.recv().expect("server started");
        TestServer { dir, store, socket, tcp, stop: Some(stop), thread: Some(thread) }
    }

    /// nbd+unix URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Shuts the server down and waits for it to finish.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread").expect("server ran");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("write file");
}
