//! A real S3 server on loopback for tests: s3s-fs keeps objects as files in a temporary
//! directory and s3s speaks the protocol (SigV4 checked against one key pair), served by hyper
//! on a runtime the handle owns. Dropping the handle stops the server and removes its files.

use std::net::SocketAddr;

use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

/// The only credentials the server accepts.
pub const ACCESS_KEY_ID: &str = "cairn-test-key";
pub const SECRET_ACCESS_KEY: &str = "cairn-test-secret";

/// A running server; it stops when dropped.
#[derive(Debug)]
pub struct S3Server {
    addr: SocketAddr,
    root: tempfile::TempDir,
    /// Taken out on drop: a runtime must not be dropped (which blocks) inside another one.
    runtime: Option<tokio::runtime::Runtime>,
}

/// Starts a server on 127.0.0.1 at a free port. It answers as soon as this returns: the
/// listener is bound and listening before the accept loop is spawned, so early connections
/// wait in its backlog.
pub fn start_s3_server() -> S3Server {
    let root = tempfile::tempdir().expect("a directory for the S3 server");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port for the S3 server");
    listener.set_nonblocking(true).expect("a non-blocking listener");
    let addr = listener.local_addr().expect("the listener's address");
    let store = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over the directory");
    let mut service = S3ServiceBuilder::new(store);
    service.set_auth(SimpleAuth::from_single(ACCESS_KEY_ID, SECRET_ACCESS_KEY));
    let service = service.build();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("testkit-s3")
        .enable_all()
        .build()
        .expect("a runtime for the S3 server");
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        loop {
            // Accept errors (out of descriptors, an aborted handshake) are passing.
            let Ok((stream, _)) = listener.accept().await else { continue };
            let service = service.clone();
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    S3Server { addr, root, runtime: Some(runtime) }
}

impl S3Server {
    /// `http://127.0.0.1:PORT`, for a client's endpoint setting.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes an empty bucket (s3s-fs keeps each bucket as a directory).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir(self.root.path().join(name)).unwrap_or_else(|e| panic!("creating bucket {name}: {e}"));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Ends the accept loop and every connection, and lets file writes in flight finish
            // before the directory goes; inside an async test, where blocking is not allowed,
            // it only signals the shutdown.
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            }
        }
    }
}
