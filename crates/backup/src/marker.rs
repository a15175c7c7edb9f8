//! In-progress markers (`locks/ID`): every backup, restore, verify, copy and GC announces itself
//! with one while it runs, so GC knows who might still use what it wants to delete. Object
//! stores have no access times and no locks, so the protocol is built from plain objects:
//! a marker says which condemned lists (`gc/ID`) its session saw when it began, and GC deletes
//! a condemned pack only once every live session has seen the list that condemned it.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError};
use crate::crypto::{hex, random};
use crate::Error;

/// How often a running session rewrites its marker, so GC can tell it is alive.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(300);

/// What a marker holds (plain JSON: nothing in it is secret, and GC reads it first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MarkerBody {
    pub version: u32,
    /// backup, restore, verify, copy or gc.
    pub kind: String,
    pub host: String,
    pub pid: u32,
    /// Seconds since the Unix epoch when the session began.
    pub started: u64,
    /// The condemned lists (`gc/…` keys) that existed when the session loaded its index: the
    /// session neither dedups against nor reads from the packs they condemn.
    pub seen: Vec<String>,
}

/// A marker as GC finds it.
#[derive(Debug, Clone)]
pub(crate) struct LiveMarker {
    pub key: String,
    pub body: MarkerBody,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// A session's marker: written on creation, refreshed by a thread of its own, deleted on drop.
#[derive(Debug)]
pub(crate) struct Marker {
    backend: Arc<dyn Backend>,
    key: String,
    body: Arc<Mutex<MarkerBody>>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<JoinHandle<()>>,
}

impl Marker {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Writes a new marker for a session of `kind`, which has seen nothing yet.
    pub fn create(backend: Arc<dyn Backend>, kind: &str) -> Result<Marker, Error> {
        let body = MarkerBody {
            version: 1,
            kind: kind.to_string(),
            host: host_name(),
            pid: std::process::id(),
            started: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            seen: Vec::new(),
        };
        let key = format!("locks/{}", hex(&random::<16>()));
        backend.put(&key, encode(&body))?;
        let body = Arc::new(Mutex::new(body));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let refresher = {
            let (backend, key, body, stop) = (backend.clone(), key.clone(), body.clone(), stop.clone());
            std::thread::Builder::new()
                .name("cairn-marker".into())
                .spawn(move || refresh_until_stopped(&*backend, &key, &body, &stop))
                .map_err(Error::Io)?
        };
        Ok(Marker { backend, key, body, stop, refresher: Some(refresher) })
    }

    /// Records the condemned lists the session saw, before it loads the index.
    pub fn set_seen(&self, seen: Vec<String>) -> Result<(), Error> {
        let body = {
            let mut body = self.body.lock().expect("marker lock");
            body.seen = seen;
            body.clone()
        };
        self.backend.put(&self.key, encode(&body))?;
        Ok(())
    }
}

fn encode(body: &MarkerBody) -> Bytes {
    Bytes::from(serde_json::to_vec(body).expect("a marker serialises"))
}

fn refresh_until_stopped(backend: &dyn Backend, key: &str, body: &Mutex<MarkerBody>, stop: &(Mutex<bool>, Condvar)) {
    let (stopped, wake) = stop;
    let mut stopped = stopped.lock().expect("marker stop lock");
    loop {
        let (guard, timeout) = wake.wait_timeout_while(stopped, REFRESH_EVERY, |s| !*s).expect("marker stop lock");
        stopped = guard;
        if !timeout.timed_out() {
            return;
        }
        let current = body.lock().expect("marker lock").clone();
        // A failed refresh is retried at the next tick; if they keep failing the marker goes
        // stale and GC stops waiting for this session, which is why stale_after is generous.
        let _ = backend.put(key, encode(&current));
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        let (stopped, wake) = &*self.stop;
        *stopped.lock().expect("marker stop lock") = true;
        wake.notify_all();
        if let Some(refresher) = self.refresher.take() {
            let _ = refresher.join();
        }
        // A marker left behind (the delete failed, or the process died) goes stale and is
        // ignored after stale_after; GC removes stale markers.
        let _ = self.backend.delete(&self.key);
    }
}

/// Whether a process with this pid runs on this machine (Linux: it has a /proc entry).
fn process_exists(pid: u32) -> bool {
    pid == 0 || std::path::Path::new("/proc").join(pid.to_string()).exists()
}

/// Markers written or refreshed within `stale_after`, except `own`; stale ones are returned
/// apart so GC can remove them.
pub(crate) fn list_markers(
    backend: &dyn Backend,
    stale_after: Duration,
    own: &str,
) -> Result<(Vec<LiveMarker>, Vec<String>), Error> {
    let now = SystemTime::now();
    let mut live = Vec::new();
    let mut stale = Vec::new();
    for object in backend.list("locks/")? {
        if object.key == own {
            continue;
        }
        let age = now.duration_since(object.modified).unwrap_or_default();
        if age > stale_after {
            stale.push(object.key);
            continue;
        }
        let bytes = match backend.get(&object.key) {
            Ok(bytes) => bytes,
            // The session ended between the listing and now.
            Err(BackendError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        // A marker that does not parse is from a newer or broken writer: treat it as a live
        // session that has seen nothing, which only makes GC wait.
        let body = serde_json::from_slice(&bytes).unwrap_or(MarkerBody {
            version: 0,
            kind: "unknown".into(),
            host: String::new(),
            pid: 0,
            started: 0,
            seen: Vec::new(),
        });
        if body.host == host_name() && !process_exists(body.pid) {
            // Its process on this machine is gone (killed, crashed): as good as stale, and
            // a restarted daemon need not wait out stale_after to collect.
            stale.push(object.key);
            continue;
        }
        live.push(LiveMarker { key: object.key, body });
    }
    Ok((live, stale))
}
