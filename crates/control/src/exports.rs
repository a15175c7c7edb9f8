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

/// Resolves export names straight from the engine, whose volume and snapshot names are the
/// control plane's ids: `vol-…` (read-write), `vol-…@snap-…` or `snap-…` (read-only),
/// `tpl-…` (read-only), and `import-job-…` while an import job fills a volume.
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

    /// The engine snapshot whose name is `snapshot_id`, if it exists.
    pub(crate) fn engine_snapshot(&self, snapshot_id: &str) -> Option<(SnapshotId, VolumeId)> {
        self.engine.list_snapshots(None).into_iter().find(|s| s.name == snapshot_id).map(|s| (s.id, s.volume))
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
        if !snapshot_part.starts_with(Kind::Snapshot.prefix()) {
            return None;
        }
        let (snapshot, of_volume) = self.engine_snapshot(snapshot_part)?;
        if let Some(volume_name) = volume_part {
            if self.engine.volume_id(volume_name).ok()? != of_volume {
                return None;
            }
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
