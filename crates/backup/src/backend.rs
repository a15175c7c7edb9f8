//! Where a repository's objects live. [`Backend`] is the narrow, blocking interface the
//! repository needs; [`ObjectStoreBackend`] serves it from any `object_store` store (a local
//! directory, memory, S3), and [`FaultyBackend`] injects failures for tests.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("backend: {0}")]
    Other(String),
}

/// An object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// A flat store of immutable objects by key. Calls block; the repository calls them from
/// its own threads.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Stores an object whole; readers never see part of it.
    fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError>;
    fn get(&self, key: &str) -> Result<Bytes, BackendError>;
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError>;
    /// Every object whose key starts with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError>;
    /// Deletes an object; deleting a missing one is not an error.
    fn delete(&self, key: &str) -> Result<(), BackendError>;
}

/// A [`Backend`] over an `object_store` store, running its async calls on a runtime of its own,
/// so it can be called from any thread that is not itself a runtime worker.
#[derive(Debug)]
pub struct ObjectStoreBackend {
    store: Arc<dyn ObjectStore>,
    /// Taken out on drop: a runtime must not be dropped (which blocks) inside another one.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for ObjectStoreBackend {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl ObjectStoreBackend {
    pub fn new(store: Arc<dyn ObjectStore>) -> Result<Self, BackendError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cairn-backup-io")
            .enable_all()
            .build()
            .map_err(|e| BackendError::Other(format!("starting the I/O runtime: {e}")))?;
        Ok(Self { store, runtime: Some(runtime) })
    }

    /// A repository in memory: the test double.
    pub fn memory() -> Self {
        Self::new(Arc::new(object_store::memory::InMemory::new())).expect("an in-memory store")
    }
}

fn convert(key: &str, e: object_store::Error) -> BackendError {
    match e {
        // S3 answers a missing bucket with 404 too; taken for a missing object it would read
        // as "no repository here" and invite an init that cannot succeed.
        object_store::Error::NotFound { source, .. } if source.to_string().contains("NoSuchBucket") => {
            BackendError::Other(format!("{key}: the bucket does not exist ({source})"))
        }
        object_store::Error::NotFound { .. } => BackendError::NotFound(key.to_string()),
        other => BackendError::Other(format!("{key}: {other}")),
    }
}

impl ObjectStoreBackend {
    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.as_ref().expect("the runtime lives until drop").block_on(future)
    }
}

impl Backend for ObjectStoreBackend {
    fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        let path = ObjectPath::from(key);
        self.block_on(self.store.put(&path, data.into())).map(|_| ()).map_err(|e| convert(key, e))
    }

    fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        let path = ObjectPath::from(key);
        self.block_on(async { self.store.get(&path).await?.bytes().await }).map_err(|e| convert(key, e))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        let path = ObjectPath::from(key);
        self.block_on(self.store.get_range(&path, range)).map_err(|e| convert(key, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let path = ObjectPath::from(prefix.trim_end_matches('/'));
        let listed: Vec<object_store::ObjectMeta> =
            self.block_on(self.store.list(Some(&path)).try_collect()).map_err(|e| convert(prefix, e))?;
        Ok(listed
            .into_iter()
            .map(|m| ObjectInfo { key: m.location.to_string(), size: m.size, modified: m.last_modified.into() })
            .filter(|o| o.key.starts_with(prefix))
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = ObjectPath::from(key);
        match self.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(convert(key, e)),
        }
    }
}

/// A repository in a local directory: each object a file, written to a temporary name, synced
/// and renamed into place, its directory synced too, so an object that exists is whole and
/// survives power loss — a backup record never outlives the packs it names. (object_store's
/// local store renames without syncing.)
#[derive(Debug)]
pub struct DirBackend {
    root: std::path::PathBuf,
}

impl DirBackend {
    /// Opens the directory, creating it if missing.
    pub fn new(root: &std::path::Path) -> Result<Self, BackendError> {
        std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
        Ok(Self { root: root.to_path_buf() })
    }

    fn path(&self, key: &str) -> Result<std::path::PathBuf, BackendError> {
        // Keys are the repository's own (`packs/ab/…`); anything climbing out is a bug.
        if key.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            return Err(BackendError::Other(format!("bad object key {key:?}")));
        }
        Ok(self.root.join(key))
    }
}

fn io(path: &std::path::Path, e: std::io::Error) -> BackendError {
    if e.kind() == std::io::ErrorKind::NotFound {
        BackendError::NotFound(path.display().to_string())
    } else {
        BackendError::Other(format!("{}: {e}", path.display()))
    }
}

fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Backend for DirBackend {
    fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        use std::io::Write;
        let path = self.path(key)?;
        let dir = path.parent().expect("keys have a directory or the root");
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        if created {
            sync_dir(dir.parent().unwrap_or(dir)).map_err(|e| io(dir, e))?;
        }
        let partial = dir.join(format!(".{}.partial", crate::crypto::hex(&crate::crypto::random::<8>())));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&partial)?;
            file.write_all(&data)?;
            file.sync_all()?;
            std::fs::rename(&partial, &path)?;
            sync_dir(dir)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            io(&path, e)
        })
    }

    fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        let path = self.path(key)?;
        std::fs::read(&path).map(Bytes::from).map_err(|e| io(&path, e))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        use std::os::unix::fs::FileExt;
        let path = self.path(key)?;
        let file = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        file.read_exact_at(&mut buf, range.start).map_err(|e| io(&path, e))?;
        Ok(Bytes::from(buf))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let mut found = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io(&dir, e))?;
                let path = entry.path();
                let meta = entry.metadata().map_err(|e| io(&path, e))?;
                let key = path.strip_prefix(&self.root).expect("under the root").to_string_lossy().into_owned();
                if meta.is_dir() {
                    // Only directories that can hold keys with the prefix.
                    if prefix.starts_with(&format!("{key}/")) || key.starts_with(prefix) || prefix.is_empty() {
                        pending.push(path);
                    }
                } else if key.starts_with(prefix) && !entry.file_name().to_string_lossy().starts_with('.') {
                    let modified = meta.modified().map_err(|e| io(&path, e))?;
                    found.push(ObjectInfo { key, size: meta.len(), modified });
                }
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, e)),
        }
    }
}

/// What a [`FaultyBackend`] does to the call it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call fails and does nothing.
    Error,
    /// A put stores only the first half of the object, then fails (a torn upload on a backend
    /// without atomic puts).
    PartialWrite,
}

/// Which calls a [`FaultyBackend`] fails.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Every call from the `from`-th on; reads too when `reads`.
    From { from: u64, fault: Fault, reads: bool },
    /// Every `n`-th call, read or write: a flaky network or store.
    Every { n: u64, fault: Fault },
}

/// Wraps a backend and fails calls on command: after `n` more calls, every call (or only
/// writes) fails until healed; or every n-th call.
#[derive(Debug)]
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    calls: AtomicU64,
    plan: Mutex<Option<Plan>>,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Self { inner, calls: AtomicU64::new(0), plan: Mutex::new(None) }
    }

    /// From the `after`-th call on, fail with `fault`; reads too when `reads`.
    pub fn fail_after(&self, after: u64, fault: Fault, reads: bool) {
        let from = self.calls.load(Ordering::SeqCst) + after;
        *self.plan.lock().expect("plan lock") = Some(Plan::From { from, fault, reads });
    }

    /// Fails every `n`-th call (n ≥ 1) with `fault`, until healed.
    pub fn fail_every(&self, n: u64, fault: Fault) {
        *self.plan.lock().expect("plan lock") = Some(Plan::Every { n: n.max(1), fault });
    }

    pub fn heal(&self) {
        *self.plan.lock().expect("plan lock") = None;
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// The fault this call suffers, if any.
    fn fault(&self, is_read: bool) -> Option<Fault> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        match *self.plan.lock().expect("plan lock") {
            Some(Plan::From { from, fault, reads }) if call >= from && (reads || !is_read) => Some(fault),
            Some(Plan::Every { n, fault }) if call % n == n - 1 => Some(fault),
            _ => None,
        }
    }
}

/// Retries failed calls a few times, waiting longer each time, for stores whose errors are
/// often passing (a network share, a busy disk). "Not found" is an answer, not a failure, and
/// is never retried. A retried put rewrites the object whole, so a torn first attempt is
/// replaced.
#[derive(Debug)]
pub struct RetryingBackend {
    inner: Arc<dyn Backend>,
    attempts: u32,
    first_delay: Duration,
}

impl RetryingBackend {
    pub fn new(inner: Arc<dyn Backend>, attempts: u32, first_delay: Duration) -> Self {
        Self { inner, attempts: attempts.max(1), first_delay }
    }

    fn retry<T>(&self, mut call: impl FnMut() -> Result<T, BackendError>) -> Result<T, BackendError> {
        let mut delay = self.first_delay;
        let mut attempt = 1;
        loop {
            match call() {
                Err(BackendError::Other(_)) if attempt < self.attempts => {
                    std::thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
                Err(BackendError::Other(why)) if self.attempts > 1 => {
                    return Err(BackendError::Other(format!("{why} (after {attempt} attempts)")))
                }
                other => return other,
            }
        }
    }
}

impl Backend for RetryingBackend {
    fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.retry(|| self.inner.put(key, data.clone()))
    }

    fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        self.retry(|| self.inner.get(key))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        self.retry(|| self.inner.get_range(key, range.clone()))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.retry(|| self.inner.list(prefix))
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.retry(|| self.inner.delete(key))
    }
}

fn injected() -> BackendError {
    BackendError::Other("injected fault".into())
}

impl Backend for FaultyBackend {
    fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        match self.fault(false) {
            None => self.inner.put(key, data),
            Some(Fault::Error) => Err(injected()),
            Some(Fault::PartialWrite) => {
                let _ = self.inner.put(key, data.slice(..data.len() / 2));
                Err(injected())
            }
        }
    }

    fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        match self.fault(true) {
            None => self.inner.get(key),
            Some(_) => Err(injected()),
        }
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        match self.fault(true) {
            None => self.inner.get_range(key, range),
            Some(_) => Err(injected()),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        match self.fault(true) {
            None => self.inner.list(prefix),
            Some(_) => Err(injected()),
        }
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        match self.fault(false) {
            None => self.inner.delete(key),
            Some(_) => Err(injected()),
        }
    }
}
