//! The NBD exports of a running cairn: volumes read-write by id, snapshots and templates
//! read-only, and private names for imports in progress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cairn_nbd::{Export, ExportListing, Exports, LookupError};
use cairn_volume::{SnapshotId, Store, VolumeId};

use crate::names::Kind;

/// The engine snapshot that holds a template's content; the template's engine volume is never
/// written, so this snapshot is its whole state.
pub const TEMPLATE_SNAPSHOT: &str = "base";

/// The engine's name for a snapshot: the ids of the volume it was taken of and its own. The
/// engine forgets a deleted volume's name, so the snapshot's name carries it, and
/// `VOLUME@SNAPSHOT` keeps working after the volume is gone (R8).
pub fn engine_snapshot_name(volume_id: &str, snapshot_id: &str) -> String {
    format!("{volume_id}+{snapshot_id}")
}

/// The (volume id, snapshot id) an engine snapshot name stands for, if it is one of ours.
pub fn parse_engine_snapshot_name(name: &str) -> Option<(&str, &str)> {
    name.split_once('+').filter(|(v, s)| v.starts_with(Kind::Volume.prefix()) && s.starts_with(Kind::Snapshot.prefix()))
}

/// Resolves export names straight from the engine, whose volume names are the control plane's
/// ids: `vol-…` (read-write), `vol-…@snap-…` or `snap-…` (read-only), `tpl-…` (read-only),
/// and `import-job-…` while an import job fills a volume.
#[derive(Debug)]
pub struct ServiceExports {
    engine: Arc<Store>,
    imports: Mutex<HashMap<String, VolumeId>>,
}

impl ServiceExports {
    pub fn new(engine: Arc<Store>) -> Self {
        Self { engine, imports: Mutex::new(HashMap::new()) }
    }

    /// Opens a private read-write export for an import job; `None` removes it.
    pub(crate) fn set_import(&self, name: &str, volume: Option<VolumeId>) {
        let mut imports = self.imports.lock().expect("imports lock");
        match volume {
            Some(v) => imports.insert(name.to_string(), v),
            None => imports.remove(name),
        };
    }

    /// The engine snapshot of the control plane's snapshot `snapshot_id`, if it exists, with the
    /// id of the volume it was taken of.
    pub(crate) fn engine_snapshot(&self, snapshot_id: &str) -> Option<(SnapshotId, String)> {
        self.engine.list_snapshots(None).into_iter().find_map(|s| {
            let (volume, snapshot) = parse_engine_snapshot_name(&s.name)?;
            (snapshot == snapshot_id).then(|| (s.id, volume.to_string()))
        })
    }

    fn open_named(&self, name: &str) -> Option<Arc<dyn Export>> {
        if let Some(volume) = self.imports.lock().expect("imports lock").get(name) {
            return Some(Arc::new(self.engine.volume(*volume).ok()?));
        }
        let (volume_part, snapshot_part) = match name.split_once('@') {
            Some((v, s)) => (Some(v), s),
            None => (None, name),
        };
        if volume_part.is_none() && name.starts_with(Kind::Volume.prefix()) {
            let id = self.engine.volume_id(name).ok()?;
            return Some(Arc::new(self.engine.volume(id).ok()?));
        }
        if volume_part.is_none() && name.starts_with(Kind::Template.prefix()) {
            let volume = self.engine.volume_id(name).ok()?;
            let snapshot = self.engine.snapshot_id(volume, TEMPLATE_SNAPSHOT).ok()?;
            return Some(Arc::new(self.engine.open_snapshot(snapshot).ok()?));
        }
        let (snapshot, of_volume) = self.engine_snapshot(snapshot_part)?;
        if volume_part.is_some_and(|v| v != of_volume) {
            return None;
        }
        Some(Arc::new(self.engine.open_snapshot(snapshot).ok()?))
    }
}

impl Exports for ServiceExports {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, LookupError> {
        self.open_named(name).ok_or_else(|| LookupError::NotFound(name.to_string()))
    }

    /// Nothing: NBD has no tokens, so an export's unguessable id is what keeps tenants apart,
    /// and listing them would hand every tenant's ids to anyone who connects.
    fn list(&self) -> Vec<ExportListing> {
        Vec::new()
    }
}
