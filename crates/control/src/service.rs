//! [`Control`]: every operation of the lifecycle, with its rules. Metadata changes are one
//! transaction each; engine objects are made before the rows that name them and removed after
//! the rows are gone, so a crash leaves at worst an engine object no row names, which
//! [`Control::open`] removes (see docs/architecture.md, "Control plane").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_volume::{SnapshotId, Store, VolumeId};
use serde::Deserialize;

use crate::db::{self, MetaStore};
use crate::exports::{ServiceExports, TEMPLATE_SNAPSHOT};
use crate::jobs::{self, Progress};
use crate::model::*;
use crate::names::{self, check_name, new_id, Kind, SizeArg};
use crate::{now, now_minus, Error};

/// How long an idempotency key's answer is replayed.
const IDEMPOTENCY_SECONDS: i64 = 24 * 3600;

/// Where the NBD server listens, to tell clients in every answer.
#[derive(Debug, Clone)]
pub struct NbdAddress {
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
}

/// A request to snapshot a volume or a VM.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub name: Option<String>,
    pub consistency: Option<Consistency>,
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
    nbd: NbdAddress,
    /// Mutating operations run one at a time: their checks (names free, VM stopped...) and
    /// their changes must not interleave, and they take milliseconds.
    ops: tokio::sync::Mutex<()>,
    jobs: Mutex<HashMap<String, Arc<Progress>>>,
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
    /// Opens the control plane: brings the schema up to date, creates the admin tenant on first
    /// start (its token goes to `admin_token_path`), fails jobs a crash interrupted and removes
    /// what they were making, and removes engine objects no metadata names.
    pub async fn open(
        meta: MetaStore,
        engine: Arc<Store>,
        exports: Arc<ServiceExports>,
        nbd: NbdAddress,
        admin_token_path: &Path,
    ) -> Result<(Arc<Control>, Recovery), Error> {
        let control =
            Arc::new(Control { meta, engine, exports, nbd, ops: tokio::sync::Mutex::new(()), jobs: Mutex::default() });
        let mut recovery = Recovery::default();
        {
            let mut c = control.meta.conn().await?;
            if db::tenant_by_name(&mut c, "admin").await?.is_none() {
                let token = new_token();
                // The file first: a crash before the row leaves no tenant, and the next start
                // makes both again.
                write_secret(admin_token_path, &token)?;
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
        Ok((control, recovery))
    }

    pub fn engine(&self) -> &Arc<Store> {
        &self.engine
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
            let mut tx = self.meta.begin().await?;
            db::finish_job(&mut tx, &job).await?;
            tx.commit().await?;
            match job.kind {
                JobKind::Import => self.discard_import(&job.tenant, &job.resource).await?,
                JobKind::Export => {
                    let _ = std::fs::remove_file(partial_path(&job.path, &job.id));
                }
            }
            failed.push(job.id);
        }
        Ok(failed)
    }

    /// Removes what a failed import was making: the volume (and the VM it was the root of) or
    /// the template.
    async fn discard_import(&self, tenant: &str, resource: &str) -> Result<(), Error> {
        let mut tx = self.meta.begin().await?;
        if let Some(volume) = db::find_volume(&mut tx, tenant, resource).await? {
            if let (DiskRole::Root, Some(vm)) = (volume.role, &volume.vm) {
                db::delete_vm(&mut tx, vm).await?;
            }
            db::delete_volume(&mut tx, &volume.id).await?;
        }
        if db::find_template(&mut tx, tenant, resource).await?.is_some() {
            db::delete_template(&mut tx, resource).await?;
        }
        tx.commit().await?;
        self.remove_engine_volume(resource)?;
        Ok(())
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
            let orphan = if s.name.starts_with(Kind::Snapshot.prefix()) {
                !snapshots.contains(&s.name)
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

    // ---- tenants ----

    pub async fn authenticate(&self, token: &str) -> Result<Tenant, Error> {
        let mut c = self.meta.conn().await?;
        db::tenant_by_token(&mut c, &token_hash(token)).await?.ok_or(Error::Unauthorized)
    }

    fn require_admin(tenant: &Tenant) -> Result<(), Error> {
        if tenant.admin {
            Ok(())
        } else {
            Err(Error::Forbidden("only an administrator may manage tenants".into()))
        }
    }

    /// Creates a tenant and its first token, returned once.
    pub async fn create_tenant(&self, caller: &Tenant, name: &str) -> Result<(Tenant, String), Error> {
        Self::require_admin(caller)?;
        check_name("name", name)?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        if db::tenant_by_name(&mut tx, name).await?.is_some() {
            return Err(Error::conflict(format!("a tenant named {name:?} exists")));
        }
        let tenant = Tenant { id: new_id(Kind::Tenant), name: name.into(), admin: false, created_at: now() };
        let token = new_token();
        db::insert_tenant(&mut tx, &tenant).await?;
        db::insert_token(&mut tx, &token_hash(&token), &tenant.id).await?;
        tx.commit().await?;
        Ok((tenant, token))
    }

    pub async fn list_tenants(&self, caller: &Tenant) -> Result<Vec<Tenant>, Error> {
        Self::require_admin(caller)?;
        db::list_tenants(&mut *self.meta.conn().await?).await
    }

    // ---- lookups and views ----

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
            uri: self.nbd.tcp.map(|addr| format!("nbd://{addr}/{export}")),
            unix_uri: format!("nbd+unix:///{export}?socket={}", self.nbd.socket.display()),
            export,
        }
    }

    fn volume_view(&self, volume: Volume) -> VolumeView {
        VolumeView { nbd: self.nbd_for(volume.id.clone()), volume }
    }

    fn template_view(&self, template: Template) -> TemplateView {
        TemplateView { nbd: self.nbd_for(template.id.clone()), template }
    }

    /// Views of snapshots with their sizes, looking each up in one listing of the engine's.
    fn snapshot_views(&self, snapshots: Vec<Snapshot>) -> Result<Vec<SnapshotView>, Error> {
        let engine: HashMap<String, (SnapshotId, VolumeId)> =
            self.engine.list_snapshots(None).into_iter().map(|s| (s.name, (s.id, s.volume))).collect();
        let live_volumes: HashMap<VolumeId, String> =
            self.engine.list_volumes().into_iter().map(|v| (v.id, v.name)).collect();
        snapshots
            .into_iter()
            .map(|snapshot| {
                let (engine_id, engine_volume) = *engine.get(&snapshot.id).ok_or_else(|| {
                    Error::Internal(format!("snapshot {} is in the metadata but not in the volume store", snapshot.id))
                })?;
                let usage = self.engine.snapshot_usage(engine_id)?;
                // `VOLUME@SNAPSHOT` while the volume lives; the bare id always works.
                let export = match live_volumes.get(&engine_volume) {
                    Some(volume) if *volume == snapshot.volume => format!("{volume}@{}", snapshot.id),
                    _ => snapshot.id.clone(),
                };
                Ok(SnapshotView {
                    logical_bytes: usage.logical_bytes,
                    exclusive_bytes: usage.exclusive_bytes,
                    shared_bytes: usage.shared_bytes,
                    nbd: self.nbd_for(export),
                    snapshot,
                })
            })
            .collect()
    }

    fn snapshot_view(&self, snapshot: Snapshot) -> Result<SnapshotView, Error> {
        Ok(self.snapshot_views(vec![snapshot])?.remove(0))
    }

    fn engine_volume(&self, id: &str) -> Result<VolumeId, Error> {
        Ok(self.engine.volume_id(id)?)
    }

    fn engine_snapshot(&self, id: &str) -> Result<SnapshotId, Error> {
        self.exports
            .engine_snapshot(id)
            .map(|(s, _)| s)
            .ok_or_else(|| Error::Internal(format!("snapshot {id} is in the metadata but not in the volume store")))
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

    // ---- VMs ----

    /// Creates a VM; with an image, also the job that imports its root disk.
    pub async fn create_vm(self: &Arc<Self>, t: &Tenant, request: CreateVm) -> Result<(Vm, Option<JobView>), Error> {
        check_name("name", &request.name)?;
        let size = request.size.as_ref().map(|s| s.volume_bytes("size")).transpose()?;
        let sources =
            [request.size.is_some() && request.template.is_none(), request.template.is_some(), request.image.is_some()];
        if sources.iter().filter(|s| **s).count() != 1 || (request.image.is_some() && request.size.is_some()) {
            return Err(Error::invalid(
                "size",
                "give exactly one of size, template and image (size may go with template)",
            ));
        }
        let image = match &request.image {
            Some(image) => Some(self.inspect_image(image).await?),
            None => None,
        };
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        Self::name_free(&mut tx, t, Kind::Vm, &request.name).await?;
        let root_name = Self::free_name(&mut tx, t, Kind::Volume, &format!("{}-root", request.name)).await?;
        let template = match &request.template {
            Some(reference) => Some(self.template(&mut tx, t, reference).await?),
            None => None,
        };
        if template.as_ref().is_some_and(|tpl| tpl.state != ResourceState::Ready) {
            return Err(Error::conflict("the template is still being imported"));
        }
        let vm = Vm {
            id: new_id(Kind::Vm),
            tenant: t.id.clone(),
            name: request.name.clone(),
            state: VmState::Running,
            root_volume: new_id(Kind::Volume),
            data_volumes: Vec::new(),
            template: template.as_ref().map(|tpl| tpl.id.clone()),
            created_at: now(),
        };
        let mut root = Volume {
            id: vm.root_volume.clone(),
            tenant: t.id.clone(),
            name: root_name,
            size: 0,
            state: ResourceState::Ready,
            vm: Some(vm.id.clone()),
            role: DiskRole::Root,
            source: Source::Blank,
            created_at: now(),
        };
        let mut job = None;
        if let Some(tpl) = &template {
            if size.is_some_and(|s| s < tpl.size) {
                return Err(Error::invalid("size", format!("size is smaller than the template ({} bytes)", tpl.size)));
            }
            let info = self.engine.clone_snapshot(self.template_snapshot(&tpl.id)?, &root.id, size)?;
            root.size = info.size;
            root.source = Source::Template { id: tpl.id.clone() };
        } else if let (Some(image), Some((format, image_size))) = (&request.image, image) {
            root.size = image_size;
            root.state = ResourceState::Importing;
            root.source = Source::Image { path: image.path.clone() };
            self.engine.create_volume(&root.id, image_size)?;
            job = Some(self.new_job(t, JobKind::Import, &root.id, &image.path, image_size));
            job.as_mut().expect("just set").1 = format;
        } else {
            root.size = size.expect("checked above");
            self.engine.create_volume(&root.id, root.size)?;
        }
        db::insert_volume(&mut tx, &root).await?;
        db::insert_vm(&mut tx, &vm).await?;
        let job = match job {
            Some((job, format)) => {
                db::insert_job(&mut tx, &job).await?;
                tx.commit().await?;
                Some(self.start_import(job, format))
            }
            None => {
                tx.commit().await?;
                None
            }
        };
        Ok((vm, job))
    }

    pub async fn list_vms(&self, t: &Tenant) -> Result<Vec<Vm>, Error> {
        let mut c = self.meta.conn().await?;
        let mut vms = db::list_vms(&mut c, Some(&t.id)).await?;
        let volumes = db::list_volumes(&mut c, Some(&t.id), None).await?;
        for vm in &mut vms {
            vm.data_volumes = volumes
                .iter()
                .filter(|v| v.role == DiskRole::Data && v.vm.as_deref() == Some(vm.id.as_str()))
                .map(|v| v.id.clone())
                .collect();
        }
        Ok(vms)
    }

    pub async fn get_vm(&self, t: &Tenant, reference: &str) -> Result<Vm, Error> {
        self.vm(&mut *self.meta.conn().await?, t, reference).await
    }

    pub async fn set_vm_state(&self, t: &Tenant, reference: &str, state: VmState) -> Result<Vm, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let mut vm = self.vm(&mut tx, t, reference).await?;
        db::set_vm_state(&mut tx, &vm.id, state).await?;
        tx.commit().await?;
        vm.state = state;
        Ok(vm)
    }

    /// Deletes a VM and its root volume; data volumes are detached and stay, snapshots stay (R8).
    pub async fn delete_vm(&self, t: &Tenant, reference: &str) -> Result<DeleteVmOutcome, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let vm = self.vm(&mut tx, t, reference).await?;
        let root = self.volume(&mut tx, t, &vm.root_volume).await?;
        if root.state == ResourceState::Importing {
            return Err(Error::conflict("the VM's root disk is being imported; wait for the job"));
        }
        let mut detached = Vec::new();
        for mut volume in db::list_volumes(&mut tx, Some(&t.id), Some(&vm.id)).await? {
            if volume.role == DiskRole::Data {
                volume.vm = None;
                db::update_volume(&mut tx, &volume).await?;
                detached.push(volume.id);
            }
        }
        db::delete_volume(&mut tx, &root.id).await?;
        db::delete_vm(&mut tx, &vm.id).await?;
        tx.commit().await?;
        self.remove_engine_volume(&root.id)?;
        Ok(DeleteVmOutcome { deleted: vm.id, deleted_volumes: vec![root.id], detached_volumes: detached })
    }

    // ---- volumes ----

    pub async fn create_volume(
        &self,
        t: &Tenant,
        name: &str,
        size: &SizeArg,
        vm: Option<&str>,
    ) -> Result<VolumeView, Error> {
        check_name("name", name)?;
        let size = size.volume_bytes("size")?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        Self::name_free(&mut tx, t, Kind::Volume, name).await?;
        let vm = match vm {
            Some(reference) => Some(self.vm(&mut tx, t, reference).await?.id),
            None => None,
        };
        let volume = Volume {
            id: new_id(Kind::Volume),
            tenant: t.id.clone(),
            name: name.into(),
            size,
            state: ResourceState::Ready,
            vm,
            role: DiskRole::Data,
            source: Source::Blank,
            created_at: now(),
        };
        self.engine.create_volume(&volume.id, size)?;
        db::insert_volume(&mut tx, &volume).await?;
        tx.commit().await?;
        Ok(self.volume_view(volume))
    }

    pub async fn list_volumes(&self, t: &Tenant) -> Result<Vec<VolumeView>, Error> {
        let volumes = db::list_volumes(&mut *self.meta.conn().await?, Some(&t.id), None).await?;
        Ok(volumes.into_iter().map(|v| self.volume_view(v)).collect())
    }

    pub async fn get_volume(&self, t: &Tenant, reference: &str) -> Result<VolumeView, Error> {
        Ok(self.volume_view(self.volume(&mut *self.meta.conn().await?, t, reference).await?))
    }

    pub async fn attach_volume(&self, t: &Tenant, reference: &str, vm: &str) -> Result<VolumeView, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let mut volume = self.volume(&mut tx, t, reference).await?;
        let vm = self.vm(&mut tx, t, vm).await?;
        if volume.role == DiskRole::Root {
            return Err(Error::conflict(format!("volume {} is a VM's root disk and stays with that VM", volume.name)));
        }
        if let Some(current) = &volume.vm {
            return Err(Error::conflict(format!("volume {} is attached to {current}; detach it first", volume.name)));
        }
        volume.vm = Some(vm.id);
        db::update_volume(&mut tx, &volume).await?;
        tx.commit().await?;
        Ok(self.volume_view(volume))
    }

    pub async fn detach_volume(&self, t: &Tenant, reference: &str) -> Result<VolumeView, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let mut volume = self.volume(&mut tx, t, reference).await?;
        if volume.role == DiskRole::Root {
            return Err(Error::conflict(format!(
                "volume {} is a VM's root disk; it can not be detached (delete the VM, or restore a snapshot as its root)",
                volume.name
            )));
        }
        if volume.vm.is_none() {
            return Err(Error::conflict(format!("volume {} is not attached", volume.name)));
        }
        volume.vm = None;
        db::update_volume(&mut tx, &volume).await?;
        tx.commit().await?;
        Ok(self.volume_view(volume))
    }

    pub async fn grow_volume(&self, t: &Tenant, reference: &str, size: &SizeArg) -> Result<VolumeView, Error> {
        let size = size.volume_bytes("size")?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let mut volume = self.volume(&mut tx, t, reference).await?;
        if size < volume.size {
            return Err(Error::conflict(format!(
                "volume {} is {} bytes; volumes only grow (asked for {size})",
                volume.name, volume.size
            )));
        }
        if volume.state != ResourceState::Ready {
            return Err(Error::conflict(format!("volume {} is being imported", volume.name)));
        }
        if size > volume.size {
            self.engine.grow(self.engine_volume(&volume.id)?, size)?;
            volume.size = size;
            db::update_volume(&mut tx, &volume).await?;
            tx.commit().await?;
        }
        Ok(self.volume_view(volume))
    }

    /// Makes a volume's content that of one of its snapshots (R4); its VM must be stopped, as a
    /// running guest would see its disk change under it.
    pub async fn revert_volume(&self, t: &Tenant, reference: &str, snapshot: &str) -> Result<VolumeView, Error> {
        let _ops = self.ops.lock().await;
        let mut c = self.meta.conn().await?;
        let volume = self.volume(&mut c, t, reference).await?;
        let snapshot = self.snapshot(&mut c, t, snapshot).await?;
        if let Some(vm) = &volume.vm {
            let vm = self.vm(&mut c, t, vm).await?;
            if vm.state == VmState::Running {
                return Err(Error::conflict(format!("VM {} is running; stop it before reverting its disk", vm.name)));
            }
        }
        let own = snapshot.volume == volume.id || volume.source == Source::Snapshot { id: snapshot.id.clone() };
        if !own {
            return Err(Error::conflict(format!(
                "snapshot {} is not of volume {}; restore it to a new volume instead",
                snapshot.name, volume.name
            )));
        }
        self.engine.revert(self.engine_volume(&volume.id)?, self.engine_snapshot(&snapshot.id)?)?;
        Ok(self.volume_view(volume))
    }

    pub async fn delete_volume(&self, t: &Tenant, reference: &str) -> Result<String, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let volume = self.volume(&mut tx, t, reference).await?;
        match (&volume.vm, volume.role) {
            (Some(vm), DiskRole::Root) => {
                return Err(Error::conflict(format!("volume {} is the root disk of {vm}; delete the VM", volume.name)))
            }
            (Some(vm), DiskRole::Data) => {
                return Err(Error::conflict(format!("volume {} is attached to {vm}; detach it first", volume.name)))
            }
            (None, _) => {}
        }
        if volume.state == ResourceState::Importing {
            return Err(Error::conflict(format!("volume {} is being imported", volume.name)));
        }
        db::delete_volume(&mut tx, &volume.id).await?;
        tx.commit().await?;
        self.remove_engine_volume(&volume.id)?;
        Ok(volume.id)
    }

    // ---- snapshots ----

    /// Snapshots a volume, or (with `vm`) every disk of a VM at one instant.
    async fn take_snapshots(
        &self,
        t: &Tenant,
        volumes: Vec<Volume>,
        vm: Option<&Vm>,
        request: &SnapshotRequest,
    ) -> Result<Vec<SnapshotView>, Error> {
        if let Some(name) = &request.name {
            check_name("name", name)?;
        }
        if let Some(busy) = volumes.iter().find(|v| v.state != ResourceState::Ready) {
            return Err(Error::conflict(format!("volume {} is being imported", busy.name)));
        }
        let mut tx = self.meta.begin().await?;
        let group = (volumes.len() > 1).then(|| new_id(Kind::SnapshotGroup));
        let mut snapshots = Vec::new();
        for volume in &volumes {
            let id = new_id(Kind::Snapshot);
            let name = match (&request.name, volumes.len()) {
                (Some(name), 1) => name.clone(),
                (Some(name), _) => format!("{name}-{}", volume.name),
                (None, _) => id.clone(),
            };
            let name = name[..name.len().min(63)].to_string();
            Self::name_free(&mut tx, t, Kind::Snapshot, &name).await?;
            snapshots.push(Snapshot {
                id,
                tenant: t.id.clone(),
                name,
                volume: volume.id.clone(),
                volume_name: volume.name.clone(),
                vm: vm.map(|vm| vm.id.clone()).or_else(|| volume.vm.clone()),
                disk_role: volume.role,
                group: group.clone(),
                origin: Origin::Manual,
                consistency: request.consistency.unwrap_or(Consistency::Crash),
                created_at: now(),
            });
        }
        let engine_ids: Vec<VolumeId> = volumes.iter().map(|v| self.engine_volume(&v.id)).collect::<Result<_, _>>()?;
        let requests: Vec<(VolumeId, &str)> =
            engine_ids.iter().zip(&snapshots).map(|(v, s)| (*v, s.id.as_str())).collect();
        self.engine.snapshot_group(&requests)?;
        for snapshot in &snapshots {
            db::insert_snapshot(&mut tx, snapshot).await?;
        }
        tx.commit().await?;
        self.snapshot_views(snapshots)
    }

    pub async fn snapshot_volume(
        &self,
        t: &Tenant,
        reference: &str,
        request: &SnapshotRequest,
    ) -> Result<SnapshotView, Error> {
        let _ops = self.ops.lock().await;
        let volume = self.volume(&mut *self.meta.conn().await?, t, reference).await?;
        Ok(self.take_snapshots(t, vec![volume], None, request).await?.remove(0))
    }

    /// All disks of a VM at one instant: multi-disk crash consistency.
    pub async fn snapshot_vm(
        &self,
        t: &Tenant,
        reference: &str,
        request: &SnapshotRequest,
    ) -> Result<Vec<SnapshotView>, Error> {
        let _ops = self.ops.lock().await;
        let mut c = self.meta.conn().await?;
        let vm = self.vm(&mut c, t, reference).await?;
        let mut volumes = db::list_volumes(&mut c, Some(&t.id), Some(&vm.id)).await?;
        // Root first, so the answer reads in a stable order.
        volumes.sort_by_key(|v| (v.role != DiskRole::Root, v.created_at.clone()));
        drop(c);
        self.take_snapshots(t, volumes, Some(&vm), request).await
    }

    /// Snapshots filtered by volume and VM, each given by id or name; the id of a deleted
    /// volume or VM still finds the snapshots left of it.
    pub async fn list_snapshots(
        &self,
        t: &Tenant,
        volume: Option<&str>,
        vm: Option<&str>,
    ) -> Result<Vec<SnapshotView>, Error> {
        let mut c = self.meta.conn().await?;
        let volume = match volume {
            Some(r) => Some(db::find_volume(&mut c, &t.id, r).await?.map_or(r.to_string(), |v| v.id)),
            None => None,
        };
        let vm = match vm {
            Some(r) => Some(db::find_vm(&mut c, &t.id, r).await?.map_or(r.to_string(), |v| v.id)),
            None => None,
        };
        let snapshots = db::list_snapshots(&mut c, Some(&t.id), volume.as_deref(), vm.as_deref()).await?;
        self.snapshot_views(snapshots)
    }

    pub async fn get_snapshot(&self, t: &Tenant, reference: &str) -> Result<SnapshotView, Error> {
        let snapshot = self.snapshot(&mut *self.meta.conn().await?, t, reference).await?;
        self.snapshot_view(snapshot)
    }

    pub async fn delete_snapshot(&self, t: &Tenant, reference: &str) -> Result<String, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let snapshot = self.snapshot(&mut tx, t, reference).await?;
        let engine_id = self.engine_snapshot(&snapshot.id)?;
        db::delete_snapshot(&mut tx, &snapshot.id).await?;
        tx.commit().await?;
        self.engine.delete_snapshot(engine_id, false)?;
        Ok(snapshot.id)
    }

    /// A fresh volume from a snapshot (R5, R7); see docs/api.md, "Restore rules".
    pub async fn restore_snapshot(
        &self,
        t: &Tenant,
        reference: &str,
        request: &RestoreRequest,
    ) -> Result<VolumeView, Error> {
        if let Some(name) = &request.name {
            check_name("name", name)?;
        }
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let snapshot = self.snapshot(&mut tx, t, reference).await?;
        let vm = match &request.vm {
            Some(r) => Some(self.vm(&mut tx, t, r).await?),
            None => None,
        };
        let role = request.role.unwrap_or(DiskRole::Data);
        if snapshot.disk_role == DiskRole::Root {
            let own_vm = vm.as_ref().is_some_and(|vm| snapshot.vm.as_deref() == Some(vm.id.as_str()));
            if !own_vm {
                return Err(Error::conflict(format!(
                    "snapshot {} is of a VM's root disk: it can not become a standalone volume or be attached to \
                     another VM; restore it to its own VM, or make a template from it",
                    snapshot.name
                )));
            }
        }
        if role == DiskRole::Root {
            let Some(vm) = &vm else {
                return Err(Error::invalid("vm", "restoring as a root disk needs the vm"));
            };
            if snapshot.disk_role == DiskRole::Data {
                return Err(Error::conflict(format!(
                    "snapshot {} is of a data disk; it can not become a root disk",
                    snapshot.name
                )));
            }
            if vm.state == VmState::Running {
                return Err(Error::conflict(format!(
                    "VM {} is running; stop it before replacing its root disk",
                    vm.name
                )));
            }
        }
        let name = match &request.name {
            Some(name) => {
                Self::name_free(&mut tx, t, Kind::Volume, name).await?;
                name.clone()
            }
            None => Self::free_name(&mut tx, t, Kind::Volume, &format!("{}-restore", snapshot.name)).await?,
        };
        let volume = Volume {
            id: new_id(Kind::Volume),
            tenant: t.id.clone(),
            name,
            size: 0,
            state: ResourceState::Ready,
            vm: vm.as_ref().map(|vm| vm.id.clone()),
            role,
            source: Source::Snapshot { id: snapshot.id.clone() },
            created_at: now(),
        };
        let old_root = match (&vm, role) {
            (Some(vm), DiskRole::Root) => Some(self.volume(&mut tx, t, &vm.root_volume).await?),
            _ => None,
        };
        // Before anything changes: the old root's content is kept as a snapshot, so replacing
        // a root disk loses nothing.
        let kept = match &old_root {
            Some(old) => {
                let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%S").to_string();
                let kept_name =
                    Self::free_name(&mut tx, t, Kind::Snapshot, &format!("{}-replaced-{stamp}", old.name)).await?;
                let kept = Snapshot {
                    id: new_id(Kind::Snapshot),
                    tenant: t.id.clone(),
                    name: kept_name,
                    volume: old.id.clone(),
                    volume_name: old.name.clone(),
                    vm: old.vm.clone(),
                    disk_role: DiskRole::Root,
                    group: None,
                    origin: Origin::Manual,
                    consistency: Consistency::Crash,
                    created_at: now(),
                };
                self.engine.snapshot(self.engine_volume(&old.id)?, &kept.id)?;
                Some(kept)
            }
            None => None,
        };
        let info = self.engine.clone_snapshot(self.engine_snapshot(&snapshot.id)?, &volume.id, None)?;
        let volume = Volume { size: info.size, ..volume };
        db::insert_volume(&mut tx, &volume).await?;
        if let (Some(old), Some(kept), Some(vm)) = (&old_root, &kept, &vm) {
            db::insert_snapshot(&mut tx, kept).await?;
            db::set_vm_root(&mut tx, &vm.id, &volume.id).await?;
            db::delete_volume(&mut tx, &old.id).await?;
        }
        tx.commit().await?;
        if let Some(old) = &old_root {
            self.remove_engine_volume(&old.id)?;
        }
        Ok(self.volume_view(volume))
    }

    // ---- templates ----

    /// A template from a root-disk snapshot (R6): an engine volume cloned from it and frozen.
    pub async fn create_template(&self, t: &Tenant, name: &str, snapshot: &str) -> Result<TemplateView, Error> {
        check_name("name", name)?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        Self::name_free(&mut tx, t, Kind::Template, name).await?;
        let snapshot = self.snapshot(&mut tx, t, snapshot).await?;
        if snapshot.disk_role != DiskRole::Root {
            return Err(Error::conflict(format!(
                "snapshot {} is of a data disk; templates are made from root-disk snapshots (restore a data-disk \
                 snapshot to a volume instead)",
                snapshot.name
            )));
        }
        let template = Template {
            id: new_id(Kind::Template),
            tenant: t.id.clone(),
            name: name.into(),
            size: 0,
            state: ResourceState::Ready,
            source: Source::Snapshot { id: snapshot.id.clone() },
            created_at: now(),
        };
        let info = self.engine.clone_snapshot(self.engine_snapshot(&snapshot.id)?, &template.id, None)?;
        self.engine.snapshot(info.id, TEMPLATE_SNAPSHOT)?;
        let template = Template { size: info.size, ..template };
        db::insert_template(&mut tx, &template).await?;
        tx.commit().await?;
        Ok(self.template_view(template))
    }

    pub async fn list_templates(&self, t: &Tenant) -> Result<Vec<TemplateView>, Error> {
        let templates = db::list_templates(&mut *self.meta.conn().await?, Some(&t.id)).await?;
        Ok(templates.into_iter().map(|tpl| self.template_view(tpl)).collect())
    }

    pub async fn get_template(&self, t: &Tenant, reference: &str) -> Result<TemplateView, Error> {
        Ok(self.template_view(self.template(&mut *self.meta.conn().await?, t, reference).await?))
    }

    /// Deletes a template; VMs made from it keep the layers they share with it.
    pub async fn delete_template(&self, t: &Tenant, reference: &str) -> Result<String, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let template = self.template(&mut tx, t, reference).await?;
        if template.state != ResourceState::Ready {
            return Err(Error::conflict(format!("template {} is being imported", template.name)));
        }
        db::delete_template(&mut tx, &template.id).await?;
        tx.commit().await?;
        self.remove_engine_volume(&template.id)?;
        Ok(template.id)
    }

    // ---- import and export jobs ----

    async fn inspect_image(&self, image: &ImageSource) -> Result<(ImageFormat, u64), Error> {
        let path = Path::new(&image.path);
        if !path.is_absolute() {
            return Err(Error::invalid(
                "path",
                format!("path {:?} must be absolute (a path on the daemon's machine)", image.path),
            ));
        }
        if !path.is_file() {
            return Err(Error::invalid("path", format!("{} is not a file on the daemon's machine", image.path)));
        }
        let (format, size) = jobs::image_info(path, image.format).await?;
        // Volumes are whole sectors; the tail past the image reads as zeros.
        let size = size.div_ceil(names::SECTOR) * names::SECTOR;
        SizeArg::Bytes(size.max(names::SECTOR)).volume_bytes("path").map(|size| (format, size))
    }

    fn new_job(&self, t: &Tenant, kind: JobKind, resource: &str, path: &str, total: u64) -> (Job, ImageFormat) {
        let job = Job {
            id: new_id(Kind::Job),
            tenant: t.id.clone(),
            kind,
            state: JobState::Running,
            resource: resource.into(),
            path: path.into(),
            bytes_done: 0,
            bytes_total: total,
            error: None,
            created_at: now(),
            finished_at: None,
        };
        (job, ImageFormat::Raw)
    }

    fn track(&self, job: &Job) -> Arc<Progress> {
        let progress = Arc::new(Progress::new(job.bytes_total));
        self.jobs.lock().expect("jobs lock").insert(job.id.clone(), progress.clone());
        progress
    }

    fn job_view(&self, job: Job) -> JobView {
        let progress = self.jobs.lock().expect("jobs lock").get(&job.id).cloned();
        match progress {
            Some(p) if job.state == JobState::Running => {
                let (rate, eta) = p.rate_and_eta();
                JobView { job: Job { bytes_done: p.done(), ..job }, rate_bytes_per_sec: rate, eta_seconds: eta }
            }
            _ => JobView { job, rate_bytes_per_sec: 0, eta_seconds: None },
        }
    }

    /// Records a job's end and forgets its live progress.
    async fn finish(&self, mut job: Job, result: Result<(), String>) -> Result<Job, Error> {
        let progress = self.jobs.lock().expect("jobs lock").remove(&job.id);
        job.bytes_done = progress.map_or(job.bytes_done, |p| p.done());
        job.finished_at = Some(now());
        match result {
            Ok(()) => job.state = JobState::Succeeded,
            Err(e) => {
                job.state = JobState::Failed;
                job.error = Some(e);
            }
        }
        let mut tx = self.meta.begin().await?;
        db::finish_job(&mut tx, &job).await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Starts filling the volume or template `job.resource` from `job.path` through a private
    /// NBD export; on success the resource becomes ready, on failure it is removed.
    fn start_import(self: &Arc<Self>, job: Job, format: ImageFormat) -> JobView {
        let progress = self.track(&job);
        let view = self.job_view(job.clone());
        let control = self.clone();
        tokio::spawn(async move {
            let result = control.run_import(&job, format, &progress).await;
            let failed = result.is_err();
            let tenant = job.tenant.clone();
            let resource = job.resource.clone();
            if let Err(e) = control.finish(job, result).await {
                eprintln!("cairn: recording the end of an import job: {e}");
            }
            if failed {
                if let Err(e) = control.discard_import(&tenant, &resource).await {
                    eprintln!("cairn: removing the remains of a failed import of {resource}: {e}");
                }
            }
        });
        view
    }

    async fn run_import(&self, job: &Job, format: ImageFormat, progress: &Progress) -> Result<(), String> {
        let volume = self.engine.volume_id(&job.resource).map_err(|e| e.to_string())?;
        let export = format!("import-{}", job.id);
        self.exports.set_import(&export, Some(volume));
        let target = format!("nbd+unix:///{export}?socket={}", self.nbd.socket.display());
        let args: Vec<&std::ffi::OsStr> = vec![
            "-n".as_ref(),
            // The new volume reads as zeros, so qemu-img skips writing zeros: imports stay sparse.
            "--target-is-zero".as_ref(),
            "-f".as_ref(),
            format.as_str().as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            job.path.as_ref(),
            target.as_ref(),
        ];
        let result = jobs::convert(&args, progress).await;
        self.exports.set_import(&export, None);
        result?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await.map_err(|e| e.to_string())?;
        let finish = async {
            if let Some(mut volume) = db::find_volume(&mut tx, &job.tenant, &job.resource).await? {
                volume.state = ResourceState::Ready;
                db::update_volume(&mut tx, &volume).await?;
            } else {
                // A template: freeze what was imported as its content.
                self.engine.snapshot(volume, TEMPLATE_SNAPSHOT)?;
                db::set_template_state(&mut tx, &job.resource, ResourceState::Ready).await?;
            }
            tx.commit().await?;
            Ok::<(), Error>(())
        };
        finish.await.map_err(|e| e.to_string())
    }

    /// Imports a raw or qcow2 file into a new data volume (attached to `vm` if given).
    pub async fn import_volume(
        self: &Arc<Self>,
        t: &Tenant,
        name: &str,
        image: &ImageSource,
        vm: Option<&str>,
    ) -> Result<(JobView, VolumeView), Error> {
        check_name("name", name)?;
        let (format, size) = self.inspect_image(image).await?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        Self::name_free(&mut tx, t, Kind::Volume, name).await?;
        let vm = match vm {
            Some(reference) => Some(self.vm(&mut tx, t, reference).await?.id),
            None => None,
        };
        let volume = Volume {
            id: new_id(Kind::Volume),
            tenant: t.id.clone(),
            name: name.into(),
            size,
            state: ResourceState::Importing,
            vm,
            role: DiskRole::Data,
            source: Source::Image { path: image.path.clone() },
            created_at: now(),
        };
        self.engine.create_volume(&volume.id, size)?;
        db::insert_volume(&mut tx, &volume).await?;
        let (job, _) = self.new_job(t, JobKind::Import, &volume.id, &image.path, size);
        db::insert_job(&mut tx, &job).await?;
        tx.commit().await?;
        Ok((self.start_import(job, format), self.volume_view(volume)))
    }

    /// Imports a raw or qcow2 file as a template.
    pub async fn import_template(
        self: &Arc<Self>,
        t: &Tenant,
        name: &str,
        image: &ImageSource,
    ) -> Result<(JobView, TemplateView), Error> {
        check_name("name", name)?;
        let (format, size) = self.inspect_image(image).await?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        Self::name_free(&mut tx, t, Kind::Template, name).await?;
        let template = Template {
            id: new_id(Kind::Template),
            tenant: t.id.clone(),
            name: name.into(),
            size,
            state: ResourceState::Importing,
            source: Source::Image { path: image.path.clone() },
            created_at: now(),
        };
        self.engine.create_volume(&template.id, size)?;
        db::insert_template(&mut tx, &template).await?;
        let (job, _) = self.new_job(t, JobKind::Import, &template.id, &image.path, size);
        db::insert_job(&mut tx, &job).await?;
        tx.commit().await?;
        Ok((self.start_import(job, format), self.template_view(template)))
    }

    /// Exports a volume or a snapshot to a new raw or qcow2 file on the daemon's machine.
    async fn export(
        self: &Arc<Self>,
        t: &Tenant,
        resource: &str,
        nbd_export: String,
        size: u64,
        path: &str,
        format: Option<ImageFormat>,
    ) -> Result<JobView, Error> {
        let target = Path::new(path);
        if !target.is_absolute() {
            return Err(Error::invalid(
                "path",
                format!("path {path:?} must be absolute (a path on the daemon's machine)"),
            ));
        }
        if !target.parent().is_some_and(Path::is_dir) {
            return Err(Error::invalid("path", format!("the directory of {path} does not exist")));
        }
        if target.exists() {
            return Err(Error::conflict(format!("{path} exists; cairn does not overwrite files")));
        }
        let (job, _) = self.new_job(t, JobKind::Export, resource, path, size);
        let mut tx = self.meta.begin().await?;
        db::insert_job(&mut tx, &job).await?;
        tx.commit().await?;
        let progress = self.track(&job);
        let view = self.job_view(job.clone());
        let control = self.clone();
        let format = format.unwrap_or(ImageFormat::Raw);
        tokio::spawn(async move {
            let result = control.run_export(&job, &nbd_export, format, &progress).await;
            if let Err(e) = control.finish(job, result).await {
                eprintln!("cairn: recording the end of an export job: {e}");
            }
        });
        Ok(view)
    }

    /// Writes to a partial file and links it into place at the end, so the path never holds
    /// half an image and a file that appeared meanwhile is not overwritten.
    async fn run_export(
        &self,
        job: &Job,
        export: &str,
        format: ImageFormat,
        progress: &Progress,
    ) -> Result<(), String> {
        let source = format!("nbd+unix:///{export}?socket={}", self.nbd.socket.display());
        let partial = partial_path(&job.path, &job.id);
        let args: Vec<&std::ffi::OsStr> = vec![
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            format.as_str().as_ref(),
            source.as_ref(),
            partial.as_ref(),
        ];
        let result = jobs::convert(&args, progress).await.and_then(|()| {
            std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(|e| format!("syncing the export: {e}"))?;
            std::fs::hard_link(&partial, &job.path).map_err(|e| format!("placing the export at {}: {e}", job.path))
        });
        let _ = std::fs::remove_file(&partial);
        result
    }

    pub async fn export_volume(
        self: &Arc<Self>,
        t: &Tenant,
        reference: &str,
        path: &str,
        format: Option<ImageFormat>,
    ) -> Result<JobView, Error> {
        let volume = self.volume(&mut *self.meta.conn().await?, t, reference).await?;
        if volume.state != ResourceState::Ready {
            return Err(Error::conflict(format!("volume {} is being imported", volume.name)));
        }
        self.export(t, &volume.id, volume.id.clone(), volume.size, path, format).await
    }

    pub async fn export_snapshot(
        self: &Arc<Self>,
        t: &Tenant,
        reference: &str,
        path: &str,
        format: Option<ImageFormat>,
    ) -> Result<JobView, Error> {
        let snapshot = self.get_snapshot(t, reference).await?;
        self.export(t, &snapshot.snapshot.id, snapshot.snapshot.id.clone(), snapshot.logical_bytes, path, format).await
    }

    pub async fn list_jobs(&self, t: &Tenant) -> Result<Vec<JobView>, Error> {
        let jobs = db::list_jobs(&mut *self.meta.conn().await?, Some(&t.id), None).await?;
        Ok(jobs.into_iter().map(|j| self.job_view(j)).collect())
    }

    pub async fn get_job(&self, t: &Tenant, id: &str) -> Result<JobView, Error> {
        let job =
            db::find_job(&mut *self.meta.conn().await?, &t.id, id).await?.ok_or_else(|| Error::not_found("job", id))?;
        Ok(self.job_view(job))
    }

    // ---- idempotency and metrics ----

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
        let deadline = tokio::time::Instant::now() + grace;
        while !self.jobs.lock().expect("jobs lock").is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub async fn close(&self) {
        self.meta.close().await;
    }
}

/// Where an export job writes before the file is complete.
fn partial_path(path: &str, job: &str) -> PathBuf {
    PathBuf::from(format!("{path}.{job}.partial"))
}
