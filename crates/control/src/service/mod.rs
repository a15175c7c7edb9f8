//! [`Control`]: every operation of the lifecycle, with its rules. Metadata changes are one
//! transaction each; engine objects are made before the rows that name them and removed after
//! the rows are gone, so a crash leaves at worst an engine object no row names, which
//! [`Control::open`] removes (see docs/architecture.md, "Control plane").

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_volume::{SnapshotId, Store, VolumeId};
use serde::Deserialize;

mod backups;
mod copies;
mod metering;
mod pruning;
mod schedules;
mod snapshots;
mod templates;
mod tenants;
mod transfers;
mod vms;
mod volumes;

pub use metering::{QuotaView, Usage};
pub use pruning::{DiskPlan, PruneItem, PrunePlan, PruneRequest};
pub use schedules::{
    CreateSchedule, DiskStatus, ProtectionStatus, RestorePoint, RetentionPlan, RunItems, ScheduleView,
    SchedulerOptions, UpdateSchedule, VmStatus,
};

use crate::db::{self, MetaStore};
use crate::exports::{engine_snapshot_name, parse_engine_snapshot_name, ServiceExports, TEMPLATE_SNAPSHOT};
use crate::jobs::{self, Progress};
use crate::model::*;
use crate::names::{self, new_id, Kind, SizeArg};
use crate::{now, now_minus, Error};

/// How long an idempotency key's answer is replayed.
const IDEMPOTENCY_SECONDS: i64 = 24 * 3600;

/// Where the NBD server listens, to tell clients in every answer.
#[derive(Debug, Clone)]
pub struct NbdAddress {
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
}

/// What the control plane needs to know of its daemon.
#[derive(Debug, Clone)]
pub struct Settings {
    pub nbd: NbdAddress,
    /// The data directory, resolved: the admin token goes there, and no import or export may
    /// touch it.
    pub data_dir: PathBuf,
    /// Where tenants other than the administrator may import from and export to: each under
    /// its own TRANSFER_DIR/TENANT_NAME. None: only the administrator may.
    pub transfer_dir: Option<PathBuf>,
    /// The backup repository (a directory is created on first use), and the passphrase that
    /// encrypts it (None: not encrypted). None: no backups.
    pub backup_repository: Option<cairn_backup::RepoLocation>,
    /// Second repositories, by name, that backups can be copied to (the off-site copy); they
    /// share the passphrase and are opened, or made, on first use.
    pub copy_repositories: BTreeMap<String, cairn_backup::RepoLocation>,
    pub backup_passphrase: Option<String>,
    /// The scheduler's clock: the system's, or a hand-set one in tests.
    pub clock: Arc<dyn crate::clock::Clock>,
    pub scheduler: SchedulerOptions,
    /// What storage costs, and how many restore points per VM are free.
    pub prices: crate::metering::Prices,
}

impl Settings {
    /// Everything in `dir`, NBD on its unix socket only, no transfer directory, no backups.
    pub fn in_dir(dir: &Path) -> Settings {
        Settings {
            nbd: NbdAddress { socket: dir.join("nbd.sock"), tcp: None },
            data_dir: dir.to_path_buf(),
            transfer_dir: None,
            backup_repository: None,
            copy_repositories: BTreeMap::new(),
            backup_passphrase: None,
            clock: Arc::new(crate::clock::SystemClock),
            scheduler: SchedulerOptions::default(),
            prices: crate::metering::Prices::default(),
        }
    }
}

/// A request to snapshot a volume or a VM.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub name: Option<String>,
    /// What the caller vouches for (it quiesced the guest itself); hooks that succeed make a
    /// snapshot application-consistent anyway.
    pub consistency: Option<Consistency>,
    /// Pre and post hooks around the snapshot (R9).
    pub hooks: Option<Hooks>,
}

/// An image file on the daemon's machine to import.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSource {
    pub path: String,
    pub format: Option<ImageFormat>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    pub size: Option<SizeArg>,
    pub template: Option<String>,
    pub image: Option<ImageSource>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The second repository to restore from (its copy of the backup) [default: the backup
    /// repository].
    pub from: Option<String>,
    pub name: Option<String>,
    pub vm: Option<String>,
    #[serde(rename = "as")]
    pub role: Option<DiskRole>,
}

/// What deleting a VM did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeleteVmOutcome {
    pub deleted: String,
    pub deleted_volumes: Vec<String>,
    pub detached_volumes: Vec<String>,
}

/// What [`Control::open`] found and repaired after the previous run.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// The admin token, when this start created the admin tenant.
    pub admin_token: Option<String>,
    pub interrupted_jobs: Vec<String>,
    /// Engine volumes and snapshots no metadata named (left by a crash), now removed.
    pub orphans_removed: Vec<String>,
}

/// Resource counts for metrics.
#[derive(Debug, Clone, Default)]
pub struct StoreCounts {
    pub tenants: u64,
    pub vms_running: u64,
    pub vms_stopped: u64,
    pub volumes: u64,
    pub volume_bytes: u64,
    pub snapshots: u64,
    pub templates: u64,
    pub jobs_running: u64,
    pub engine_layers: u64,
}

/// The control plane of one cairn daemon.
#[derive(Debug)]
pub struct Control {
    meta: MetaStore,
    engine: Arc<Store>,
    exports: Arc<ServiceExports>,
    settings: Settings,
    repo: Option<Arc<cairn_backup::Repository>>,
    /// Second repositories opened so far, by name (opened on first use, so an unreachable
    /// off-site store does not stop the daemon from starting).
    copy_repos: tokio::sync::Mutex<HashMap<String, Arc<cairn_backup::Repository>>>,
    /// Mutating operations run one at a time: their checks (names free, VM stopped...) and
    /// their changes must not interleave, and they take milliseconds.
    ops: tokio::sync::Mutex<()>,
    /// One meter sync at a time: two would both open the same new segments.
    meter_lock: tokio::sync::Mutex<()>,
    /// Scheduled runs ended since the meter last caught up.
    meter_wanted: tokio::sync::Notify,
    /// Snapshots that took in a deleted snapshot's data, to be measured again.
    meter_remeasure: Mutex<HashSet<String>>,
    jobs: Mutex<HashMap<String, Arc<Progress>>>,
    /// Signalled whenever a job ends, for a shutdown that waits for them.
    job_ended: tokio::sync::Notify,
    /// Scheduled runs in progress at once are bounded by these permits.
    run_slots: Arc<tokio::sync::Semaphore>,
    /// Schedules with a run in progress in this process: a schedule runs once at a time.
    active_schedules: Mutex<std::collections::HashSet<String>>,
    /// Runs a restart interrupted are resumed once, at the scheduler's first pass.
    runs_resumed: std::sync::atomic::AtomicBool,
    /// Signalled when a schedule is made, changed or resumed, so the scheduler looks again.
    schedules_changed: tokio::sync::Notify,
    /// The tasks of runs in progress, to cut short at shutdown (they resume at the next start).
    run_tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Runs doing their work now (holding a slot), and the most there ever were at once.
    runs_working: std::sync::atomic::AtomicUsize,
    runs_working_peak: std::sync::atomic::AtomicUsize,
}

fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn new_token() -> String {
    format!("cairn_{}", names::to_hex(&names::random_bytes::<24>()))
}

/// Admin tokens are written to DATA_DIR/admin.token readable by the owner only, replacing
/// the file whole so a crash never leaves half a token.
fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let partial = path.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&partial)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&partial, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Control {
    /// Opens the control plane over the data directory's volume store (`volumes/`) and
    /// metadata database (`cairn.db`); see [`Control::open`].
    pub async fn open_dir(settings: Settings) -> Result<(Arc<Control>, Recovery), Error> {
        let engine =
            Arc::new(Store::open_dir(settings.data_dir.join("volumes"), cairn_volume::StoreOptions::default())?);
        let meta = MetaStore::open_sqlite(&settings.data_dir.join("cairn.db")).await?;
        let exports = Arc::new(ServiceExports::new(engine.clone()));
        Self::open(meta, engine, exports, settings).await
    }

    /// Opens the control plane: brings the schema up to date, creates the admin tenant on first
    /// start (its token goes to DATA_DIR/admin.token), fails jobs a crash interrupted and removes
    /// what they were making, and removes engine objects no metadata names.
    async fn open(
        meta: MetaStore,
        engine: Arc<Store>,
        exports: Arc<ServiceExports>,
        settings: Settings,
    ) -> Result<(Arc<Control>, Recovery), Error> {
        let repo = match &settings.backup_repository {
            Some(location) => {
                Some(Arc::new(open_repository(location.clone(), settings.backup_passphrase.clone()).await?))
            }
            None => None,
        };
        let control = Arc::new(Control {
            meta,
            engine,
            exports,
            repo,
            copy_repos: Default::default(),
            ops: tokio::sync::Mutex::new(()),
            meter_lock: tokio::sync::Mutex::new(()),
            meter_wanted: tokio::sync::Notify::new(),
            meter_remeasure: Mutex::new(HashSet::new()),
            jobs: Mutex::default(),
            job_ended: Default::default(),
            run_slots: Arc::new(tokio::sync::Semaphore::new(settings.scheduler.max_concurrent_runs.max(1))),
            active_schedules: Mutex::default(),
            runs_resumed: Default::default(),
            schedules_changed: Default::default(),
            run_tasks: Mutex::default(),
            runs_working: Default::default(),
            runs_working_peak: Default::default(),
            settings,
        });
        let mut recovery = Recovery::default();
        {
            let mut c = control.meta.conn().await?;
            if db::tenant_by_name(&mut c, "admin").await?.is_none() {
                // A new database over a store that has cairn's volumes means the database was
                // lost or replaced: starting would take every volume for an orphan.
                let ours = control.engine.list_volumes().into_iter().filter(|v| names::looks_like_id(&v.name)).count();
                if ours > 0 {
                    return Err(Error::Internal(format!(
                        "the metadata database is new, but the volume store holds {ours} cairn volumes; refusing \
                         to start (restore cairn.db from a copy, or move the volumes directory away)"
                    )));
                }
                let admin_token_path = control.settings.data_dir.join("admin.token");
                let token = new_token();
                // The file first: a crash before the row leaves no tenant, and the next start
                // makes both again.
                write_secret(&admin_token_path, &token)?;
                let mut tx = control.meta.begin().await?;
                let tenant = Tenant { id: new_id(Kind::Tenant), name: "admin".into(), admin: true, created_at: now() };
                db::insert_tenant(&mut tx, &tenant).await?;
                db::insert_token(&mut tx, &token_hash(&token), &tenant.id).await?;
                tx.commit().await?;
                recovery.admin_token = Some(token);
            }
        }
        recovery.interrupted_jobs = control.fail_interrupted_jobs().await?;
        recovery.orphans_removed = control.remove_orphans().await?;
        // Backups deleted just before a crash: their records go now.
        control.forget_pending().await?;
        // What changed while the daemon was down without a sync after it (a crash between a
        // change and its sync) is metered from now; until now the old value stood.
        control.sync_meters().await?;
        Ok((control, recovery))
    }

    pub fn engine(&self) -> &Arc<Store> {
        &self.engine
    }

    /// What the NBD server serves.
    pub fn exports(&self) -> &Arc<ServiceExports> {
        &self.exports
    }

    async fn fail_interrupted_jobs(&self) -> Result<Vec<String>, Error> {
        let mut c = self.meta.conn().await?;
        let running = db::list_jobs(&mut c, None, Some(JobState::Running)).await?;
        drop(c);
        let mut failed = Vec::new();
        for mut job in running {
            job.state = JobState::Failed;
            job.error = Some("interrupted by a restart".into());
            job.finished_at = Some(now());
            // The job's end and the removal of what it was making commit together.
            let mut tx = self.meta.begin().await?;
            db::finish_job(&mut tx, &job).await?;
            let discarded = match job.kind {
                JobKind::Import | JobKind::Restore => Self::discard_import(&mut tx, &job.tenant, &job.resource).await?,
                // A backup's snapshots are left without a row: the orphan sweep removes them.
                // An interrupted verify or gc leaves its marker to go stale; gc's every step
                // is idempotent and the next run finishes its work.
                // A copy records each backup it finished; the rest are copied again next time.
                JobKind::Export | JobKind::Backup | JobKind::Verify | JobKind::Gc | JobKind::Copy => false,
            };
            tx.commit().await?;
            if discarded {
                self.remove_engine_volume(&job.resource)?;
            }
            if job.kind == JobKind::Export {
                let _ = std::fs::remove_file(partial_path(&job.path, &job.id));
                let _ = std::fs::remove_file(raw_partial_path(&job.path, &job.id));
            }
            failed.push(job.id);
        }
        Ok(failed)
    }

    /// Removes the rows of what a failed import was making, if it is still importing: the
    /// volume (and the VM it is the root of, whose other disks are detached) or the template.
    /// Returns whether there was something, whose engine volume the caller removes after commit.
    async fn discard_import(tx: &mut db::Conn, tenant: &str, resource: &str) -> Result<bool, Error> {
        if let Some(volume) = db::find_volume(tx, tenant, resource).await? {
            if volume.state != ResourceState::Importing {
                return Ok(false);
            }
            if let (DiskRole::Root, Some(vm)) = (volume.role, &volume.vm) {
                for mut disk in db::list_volumes(tx, Some(tenant), Some(vm)).await? {
                    disk.vm = None;
                    db::update_volume(tx, &disk).await?;
                }
                db::delete_vm(tx, vm).await?;
            }
            db::delete_volume(tx, &volume.id).await?;
            return Ok(true);
        }
        match db::find_template(tx, tenant, resource).await? {
            Some(template) if template.state == ResourceState::Importing => {
                db::delete_template(tx, resource).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Deletes engine volumes and snapshots whose ids no metadata row names: made just before a
    /// crash that came before their row, or whose row went just before a crash.
    async fn remove_orphans(&self) -> Result<Vec<String>, Error> {
        let mut c = self.meta.conn().await?;
        let volumes: Vec<String> = db::list_volumes(&mut c, None, None).await?.into_iter().map(|v| v.id).collect();
        let templates: Vec<String> = db::list_templates(&mut c, None).await?.into_iter().map(|t| t.id).collect();
        let snapshots: Vec<String> =
            db::list_snapshots(&mut c, None, None, None).await?.into_iter().map(|s| s.id).collect();
        drop(c);
        let mut removed = Vec::new();
        let engine_volumes = self.engine.list_volumes();
        for s in self.engine.list_snapshots(None) {
            let orphan = if let Some((_, id)) = parse_engine_snapshot_name(&s.name) {
                !snapshots.iter().any(|known| known == id)
            } else if s.name.contains(&format!("+{}", Kind::Backup.prefix())) {
                // A backup's snapshot lives only while its job runs.
                true
            } else {
                // A template's base snapshot goes with its template.
                s.name == TEMPLATE_SNAPSHOT
                    && engine_volumes
                        .iter()
                        .find(|v| v.id == s.volume)
                        .is_some_and(|v| v.name.starts_with(Kind::Template.prefix()) && !templates.contains(&v.name))
            };
            if orphan {
                self.engine.delete_snapshot(s.id, false)?;
                removed.push(format!("snapshot {}", s.name));
            }
        }
        for v in engine_volumes {
            let known = if v.name.starts_with(Kind::Volume.prefix()) {
                volumes.contains(&v.name)
            } else if v.name.starts_with(Kind::Template.prefix()) {
                templates.contains(&v.name)
            } else {
                // Not one of ours by name (made by the engine's own tools): leave it.
                true
            };
            if !known {
                self.engine.delete_volume(v.id)?;
                removed.push(format!("volume {}", v.name));
            }
        }
        Ok(removed)
    }

    async fn vm(&self, c: &mut db::Conn, t: &Tenant, reference: &str) -> Result<Vm, Error> {
        let mut vm = db::find_vm(c, &t.id, reference).await?.ok_or_else(|| Error::not_found("vm", reference))?;
        vm.data_volumes = db::list_volumes(c, Some(&t.id), Some(&vm.id))
            .await?
            .into_iter()
            .filter(|v| v.role == DiskRole::Data)
            .map(|v| v.id)
            .collect();
        Ok(vm)
    }

    async fn volume(&self, c: &mut db::Conn, t: &Tenant, reference: &str) -> Result<Volume, Error> {
        db::find_volume(c, &t.id, reference).await?.ok_or_else(|| Error::not_found("volume", reference))
    }

    async fn snapshot(&self, c: &mut db::Conn, t: &Tenant, reference: &str) -> Result<Snapshot, Error> {
        db::find_snapshot(c, &t.id, reference).await?.ok_or_else(|| Error::not_found("snapshot", reference))
    }

    async fn template(&self, c: &mut db::Conn, t: &Tenant, reference: &str) -> Result<Template, Error> {
        db::find_template(c, &t.id, reference).await?.ok_or_else(|| Error::not_found("template", reference))
    }

    fn nbd_for(&self, export: String) -> Nbd {
        Nbd {
            uri: self.settings.nbd.tcp.map(|addr| format!("nbd://{addr}/{export}")),
            unix_uri: format!("nbd+unix:///{export}?socket={}", self.settings.nbd.socket.display()),
            export,
        }
    }

    fn volume_view(&self, volume: Volume) -> VolumeView {
        let usage = self.storage_usage(&volume.id, None);
        VolumeView { nbd: self.nbd_for(volume.id.clone()), usage, volume }
    }

    fn template_view(&self, template: Template) -> TemplateView {
        // A template's data is its frozen snapshot's, and deleting it deletes both.
        let usage = self.template_snapshot(&template.id).ok().and_then(|s| self.storage_usage(&template.id, Some(s)));
        TemplateView { nbd: self.nbd_for(template.id.clone()), usage, template }
    }

    /// The engine's footprint of a volume (or of a volume frozen in `snapshot`), if it is there.
    pub(super) fn storage_usage(&self, volume: &str, snapshot: Option<SnapshotId>) -> Option<StorageUsage> {
        let footprint = self.engine.usage_of(self.engine_volume(volume).ok()?, snapshot).ok()?;
        Some(StorageUsage {
            data_bytes: footprint.data_bytes,
            stored_bytes: footprint.stored_bytes,
            exclusive_bytes: footprint.exclusive_bytes,
            shared_bytes: footprint.shared_bytes,
        })
    }

    /// Views of snapshots with their sizes, looking each up in one listing of the engine's. A
    /// snapshot whose engine object is gone (deleted a moment ago, between its row's removal and
    /// the engine's) is left out.
    fn snapshot_views(&self, snapshots: Vec<Snapshot>) -> Result<Vec<SnapshotView>, Error> {
        let engine = self.engine_snapshot_ids();
        let mut views = Vec::with_capacity(snapshots.len());
        for snapshot in snapshots {
            let Some(engine_id) = engine.get(&snapshot.id) else { continue };
            let usage = match self.engine.snapshot_usage(*engine_id) {
                Ok(usage) => usage,
                Err(cairn_volume::Error::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            views.push(SnapshotView {
                logical_bytes: usage.logical_bytes,
                exclusive_bytes: usage.exclusive_bytes,
                shared_bytes: usage.shared_bytes,
                stored_bytes: usage.stored_bytes,
                nbd: self.nbd_for(format!("{}@{}", snapshot.volume, snapshot.id)),
                warnings: Vec::new(),
                snapshot,
            });
        }
        Ok(views)
    }

    fn snapshot_view(&self, snapshot: Snapshot) -> Result<SnapshotView, Error> {
        let id = snapshot.id.clone();
        self.snapshot_views(vec![snapshot])?.pop().ok_or_else(|| Error::not_found("snapshot", &id))
    }

    fn engine_volume(&self, id: &str) -> Result<VolumeId, Error> {
        Ok(self.engine.volume_id(id)?)
    }

    /// Every snapshot's engine id by its control-plane id, from one listing of the engine's:
    /// for looking up many at once ([`Control::engine_snapshot`] lists them for each).
    fn engine_snapshot_ids(&self) -> HashMap<String, SnapshotId> {
        self.engine
            .list_snapshots(None)
            .into_iter()
            .filter_map(|s| Some((parse_engine_snapshot_name(&s.name)?.1.to_string(), s.id)))
            .collect()
    }

    fn engine_snapshot(&self, id: &str) -> Result<SnapshotId, Error> {
        self.exports.engine_snapshot(id).map(|(s, _)| s).ok_or_else(|| missing_from_engine(id))
    }

    fn template_snapshot(&self, template_id: &str) -> Result<SnapshotId, Error> {
        Ok(self.engine.snapshot_id(self.engine_volume(template_id)?, TEMPLATE_SNAPSHOT)?)
    }

    fn remove_engine_volume(&self, id: &str) -> Result<(), Error> {
        if let Ok(volume) = self.engine.volume_id(id) {
            if let Ok(snapshot) = self.engine.snapshot_id(volume, TEMPLATE_SNAPSHOT) {
                self.engine.delete_snapshot(snapshot, false)?;
            }
            self.engine.delete_volume(volume)?;
        }
        Ok(())
    }

    /// The VM a request names, if it names one.
    async fn optional_vm(&self, c: &mut db::Conn, t: &Tenant, reference: Option<&str>) -> Result<Option<Vm>, Error> {
        match reference {
            Some(r) => Ok(Some(self.vm(c, t, r).await?)),
            None => Ok(None),
        }
    }

    /// The name of a volume restored from a copy: the one asked for if it is free, else
    /// `BASE-restore` made unique.
    async fn restore_name(c: &mut db::Conn, t: &Tenant, requested: Option<&str>, base: &str) -> Result<String, Error> {
        match requested {
            Some(name) => {
                Self::name_free(c, t, Kind::Volume, name).await?;
                Ok(name.to_string())
            }
            None => Self::free_name(c, t, Kind::Volume, &format!("{base}-restore")).await,
        }
    }

    /// Fails when `name` is taken by a resource of this kind in the tenant.
    async fn name_free(c: &mut db::Conn, t: &Tenant, kind: Kind, name: &str) -> Result<(), Error> {
        let taken = match kind {
            Kind::Vm => db::find_vm(c, &t.id, name).await?.is_some(),
            Kind::Volume => db::find_volume(c, &t.id, name).await?.is_some(),
            Kind::Snapshot => db::find_snapshot(c, &t.id, name).await?.is_some(),
            Kind::Template => db::find_template(c, &t.id, name).await?.is_some(),
            _ => false,
        };
        if taken {
            return Err(Error::conflict(format!("a {} named {name:?} exists", kind.noun())));
        }
        Ok(())
    }

    /// `base`, or `base-2`, `base-3`... whichever is free first.
    async fn free_name(c: &mut db::Conn, t: &Tenant, kind: Kind, base: &str) -> Result<String, Error> {
        let base = &base[..base.len().min(56)];
        let mut candidate = base.to_string();
        for n in 2.. {
            if Self::name_free(c, t, kind, &candidate).await.is_ok() {
                break;
            }
            candidate = format!("{base}-{n}");
        }
        Ok(candidate)
    }

    pub async fn stored_answer(&self, t: &Tenant, key: &str) -> Result<Option<db::StoredAnswer>, Error> {
        db::find_answer(&mut *self.meta.conn().await?, &t.id, key, &now_minus(IDEMPOTENCY_SECONDS)).await
    }

    pub async fn store_answer(&self, t: &Tenant, key: &str, answer: &db::StoredAnswer) -> Result<(), Error> {
        let mut tx = self.meta.begin().await?;
        db::forget_answers_before(&mut tx, &now_minus(IDEMPOTENCY_SECONDS)).await?;
        db::store_answer(&mut tx, &t.id, key, answer).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn counts(&self) -> Result<StoreCounts, Error> {
        let mut c = self.meta.conn().await?;
        let vms = db::list_vms(&mut c, None).await?;
        let volumes = db::list_volumes(&mut c, None, None).await?;
        Ok(StoreCounts {
            tenants: db::list_tenants(&mut c).await?.len() as u64,
            vms_running: vms.iter().filter(|v| v.state == VmState::Running).count() as u64,
            vms_stopped: vms.iter().filter(|v| v.state == VmState::Stopped).count() as u64,
            volumes: volumes.len() as u64,
            volume_bytes: volumes.iter().map(|v| v.size).sum(),
            snapshots: db::list_snapshots(&mut c, None, None, None).await?.len() as u64,
            templates: db::list_templates(&mut c, None).await?.len() as u64,
            jobs_running: self.jobs.lock().expect("jobs lock").len() as u64,
            engine_layers: self.engine.layer_count() as u64,
        })
    }

    /// Waits for jobs in flight to end, for a graceful shutdown; what is still running after
    /// `grace` is failed as interrupted at the next start.
    pub async fn drain_jobs(&self, grace: std::time::Duration) {
        let wait_all = async {
            loop {
                let ended = self.job_ended.notified();
                if self.jobs.lock().expect("jobs lock").is_empty() {
                    return;
                }
                ended.await;
            }
        };
        let _ = tokio::time::timeout(grace, wait_all).await;
    }

    pub async fn close(&self) {
        self.meta.close().await;
    }
}

/// Which disk's snapshots or backups to list: a live volume or VM by id or name, or else the
/// text taken as the id of a deleted one, whose copies outlive it (R8).
struct DiskFilter {
    /// (id, whether it names a live resource) for the volume and the VM.
    volume: Option<(String, bool)>,
    vm: Option<(String, bool)>,
}

impl DiskFilter {
    async fn resolve(c: &mut db::Conn, t: &Tenant, volume: Option<&str>, vm: Option<&str>) -> Result<Self, Error> {
        let volume = match volume {
            Some(r) => Some(db::find_volume(c, &t.id, r).await?.map_or((r.to_string(), false), |v| (v.id, true))),
            None => None,
        };
        let vm = match vm {
            Some(r) => Some(db::find_vm(c, &t.id, r).await?.map_or((r.to_string(), false), |v| (v.id, true))),
            None => None,
        };
        Ok(DiskFilter { volume, vm })
    }

    fn volume_id(&self) -> Option<&str> {
        self.volume.as_ref().map(|(id, _)| id.as_str())
    }

    fn vm_id(&self) -> Option<&str> {
        self.vm.as_ref().map(|(id, _)| id.as_str())
    }

    /// The first reference that names no live resource, as a not-found error.
    fn unknown(&self) -> Option<Error> {
        match (&self.volume, &self.vm) {
            (Some((r, false)), _) => Some(Error::not_found("volume", r)),
            (_, Some((r, false))) => Some(Error::not_found("vm", r)),
            _ => None,
        }
    }
}

/// Opens the repository at `location`, creating it on first use.
async fn open_repository(
    location: cairn_backup::RepoLocation,
    passphrase: Option<String>,
) -> Result<cairn_backup::Repository, Error> {
    let location_text = location.to_string();
    tokio::task::spawn_blocking(move || {
        let backend = location.backend()?;
        match cairn_backup::Repository::open(backend.clone(), passphrase.as_deref()) {
            Err(cairn_backup::Error::NoRepository) => {
                cairn_backup::Repository::init(backend, passphrase.as_deref(), cairn_backup::KdfParams::standard())
            }
            other => other,
        }
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
    .map_err(|e| Error::Internal(format!("the backup repository {location_text}: {e}")))
}

/// Where an export job writes before the file is complete.
fn partial_path(path: &str, job: &str) -> PathBuf {
    PathBuf::from(format!("{path}.{job}.partial"))
}

/// Where an export of a backup to qcow2 first restores the raw image.
fn raw_partial_path(path: &str, job: &str) -> PathBuf {
    PathBuf::from(format!("{path}.{job}.partial.raw"))
}

/// A snapshot row whose engine snapshot is gone: the two stores disagree.
fn missing_from_engine(snapshot: &str) -> Error {
    Error::Internal(format!("snapshot {snapshot} is in the metadata but not in the volume store"))
}
