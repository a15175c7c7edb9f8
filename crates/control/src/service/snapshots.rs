//! Snapshots of volumes and VMs (R1), and restore into fresh volumes (R5, R7).

use crate::db;
use crate::metering::Holding;
use crate::model::*;
use crate::names::{check_name, new_id, Kind};
use crate::{now, Error};

use super::schedules::hook_context;
use super::*;

impl Control {
    /// R7: a copy of a root disk (from a snapshot or a backup named `what`) only goes back to
    /// the VM it was taken of; a data disk's copy goes anywhere.
    pub(super) fn check_restore_target(
        disk_role: DiskRole,
        taken_of: Option<&str>,
        vm: Option<&Vm>,
        what: &str,
    ) -> Result<(), Error> {
        let own_vm = vm.is_some_and(|vm| taken_of == Some(vm.id.as_str()));
        if disk_role == DiskRole::Root && !own_vm {
            return Err(Error::conflict(format!(
                "{what} is of a VM's root disk: it can not become a standalone volume or be attached to another VM; \
                 restore it to its own VM, or make a template from it"
            )));
        }
        Ok(())
    }

    /// What snapshotting these volumes adds to a tenant's holding: a snapshot each, storing
    /// what its volume wrote since its last snapshot (its `stored_bytes`). Writes that arrive
    /// between this judgement and the snapshot add to that, unjudged.
    pub(super) fn snapshots_add(&self, volumes: &[Volume]) -> Holding {
        let bytes = volumes.iter().filter_map(|v| self.storage_usage(&v.id, None)).map(|u| u.stored_bytes).sum();
        Holding { bytes, snapshots: volumes.len() as u64, ..Default::default() }
    }

    /// Snapshots a volume, or (with `vm`) every disk of a VM at one instant. A scheduled run's
    /// snapshots carry its ids, and the run's step to `taken` commits with them.
    pub(super) async fn take_snapshots(
        &self,
        t: &Tenant,
        volumes: &[Volume],
        vm: Option<&Vm>,
        request: &SnapshotRequest,
        made_by: Option<&Run>,
    ) -> Result<Vec<SnapshotView>, Error> {
        if let Some(busy) = volumes.iter().find(|v| v.state != ResourceState::Ready) {
            return Err(Error::conflict(format!("volume {} is being imported", busy.name)));
        }
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        self.check_quota(&mut tx, t, self.snapshots_add(volumes)).await?;
        // Every snapshot of a VM belongs to its group, even a one-disk VM's.
        let group = vm.map(|_| new_id(Kind::SnapshotGroup));
        let snapshots = Self::snapshot_rows(&mut tx, t, volumes, vm, group, request, made_by).await?;
        let engine_ids: Vec<VolumeId> = volumes.iter().map(|v| self.engine_volume(&v.id)).collect::<Result<_, _>>()?;
        let engine_names: Vec<String> = snapshots.iter().map(|s| engine_snapshot_name(&s.volume, &s.id)).collect();
        let requests: Vec<(VolumeId, &str)> =
            engine_ids.iter().zip(&engine_names).map(|(v, name)| (*v, name.as_str())).collect();
        self.engine.snapshot_group(&requests)?;
        for snapshot in &snapshots {
            db::insert_snapshot(&mut tx, snapshot).await?;
        }
        if let Some(run) = made_by {
            let consistency = request.consistency.unwrap_or(Consistency::Crash);
            db::update_run(&mut tx, &Run { stage: RunStage::Taken, consistency: Some(consistency), ..run.clone() })
                .await?;
        }
        tx.commit().await?;
        self.snapshot_views(snapshots)
    }

    /// The rows of new snapshots of `volumes` (one per disk, named as `request` says, in
    /// `group`, made by a scheduled run or by hand), checked against the names in use; the
    /// caller takes them in the engine.
    pub(super) async fn snapshot_rows(
        tx: &mut db::Conn,
        t: &Tenant,
        volumes: &[Volume],
        vm: Option<&Vm>,
        group: Option<String>,
        request: &SnapshotRequest,
        made_by: Option<&Run>,
    ) -> Result<Vec<Snapshot>, Error> {
        if let Some(name) = &request.name {
            check_name("name", name)?;
        }
        let mut snapshots: Vec<Snapshot> = Vec::new();
        for volume in volumes {
            let id = new_id(Kind::Snapshot);
            let name = match &request.name {
                Some(name) if volumes.len() == 1 => name.clone(),
                // One name per disk: NAME-VOLUMENAME, checked like any name.
                Some(name) => format!("{name}-{}", volume.name),
                None => id.clone(),
            };
            if name != id {
                check_name("name", &name)?;
            }
            if snapshots.iter().any(|s| s.name == name) {
                return Err(Error::invalid("name", format!("two disks' snapshots would both be named {name:?}")));
            }
            Self::name_free(tx, t, Kind::Snapshot, &name).await?;
            snapshots.push(Snapshot {
                id,
                tenant: t.id.clone(),
                name,
                volume: volume.id.clone(),
                volume_name: volume.name.clone(),
                vm: vm.map(|vm| vm.id.clone()).or_else(|| volume.vm.clone()),
                disk_role: if volume.from_root_disk { DiskRole::Root } else { DiskRole::Data },
                group: group.clone(),
                origin: if made_by.is_some() { Origin::Scheduled } else { Origin::Manual },
                consistency: request.consistency.unwrap_or(Consistency::Crash),
                // A run's items are dated by the scheduler's clock, as its retention reads them.
                created_at: made_by.map_or_else(now, |run| run.started_at.clone()),
                schedule: made_by.map(|run| run.schedule.clone()),
                run: made_by.map(|run| run.id.clone()),
                protected: false,
            });
        }
        Ok(snapshots)
    }

    /// Snapshots a volume, between its hooks if the request has any.
    pub async fn snapshot_volume(
        &self,
        t: &Tenant,
        reference: &str,
        request: &SnapshotRequest,
    ) -> Result<SnapshotView, Error> {
        let volume = self.volume(&mut *self.meta.conn().await?, t, reference).await?;
        Ok(self.hooked_snapshots(t, &[volume], None, request, None).await?.remove(0))
    }

    /// All disks of a VM at one instant: multi-disk crash consistency (application
    /// consistency with hooks).
    pub async fn snapshot_vm(
        &self,
        t: &Tenant,
        reference: &str,
        request: &SnapshotRequest,
    ) -> Result<Vec<SnapshotView>, Error> {
        let mut c = self.meta.conn().await?;
        let (vm, volumes) = self.vm_disks(&mut c, t, reference).await?;
        drop(c);
        self.hooked_snapshots(t, &volumes, Some(&vm), request, None).await
    }

    /// A VM and its disks, root first, so answers read in a stable order.
    pub(super) async fn vm_disks(
        &self,
        c: &mut db::Conn,
        t: &Tenant,
        reference: &str,
    ) -> Result<(Vm, Vec<Volume>), Error> {
        let vm = self.vm(c, t, reference).await?;
        let mut volumes = db::list_volumes(c, Some(&t.id), Some(&vm.id)).await?;
        volumes.sort_by_key(|v| (v.role != DiskRole::Root, v.created_at.clone()));
        Ok((vm, volumes))
    }

    /// [`Self::take_snapshots`] between the request's pre and post hooks; a warning (a failed
    /// post hook, or a failed pre hook the request said to take a crash-consistent snapshot
    /// through) goes with the views.
    pub(super) async fn hooked_snapshots(
        &self,
        t: &Tenant,
        volumes: &[Volume],
        vm: Option<&Vm>,
        request: &SnapshotRequest,
        made_by: Option<&Run>,
    ) -> Result<Vec<SnapshotView>, Error> {
        // Judged before the pre hook too, so a request over quota never freezes a guest; the
        // judgement that counts is the one under the lock in take_snapshots.
        self.check_quota(&mut *self.meta.conn().await?, t, self.snapshots_add(volumes)).await?;
        let context = hook_context(t, volumes, vm, made_by);
        let (mut views, warning) = self
            .around_hooks(t, request.hooks.as_ref(), context, request.consistency, async |consistency| {
                let request = SnapshotRequest { consistency: Some(consistency), ..request.clone() };
                let views = self.take_snapshots(t, volumes, vm, &request, made_by).await?;
                let ids = views.iter().map(|v| v.snapshot.id.clone()).collect();
                Ok((views, ids))
            })
            .await?;
        if let Some(warning) = warning {
            for view in &mut views {
                view.warnings.push(warning.clone());
            }
        }
        Ok(views)
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
        let filter = DiskFilter::resolve(&mut c, t, volume, vm).await?;
        let snapshots = db::list_snapshots(&mut c, Some(&t.id), filter.volume_id(), filter.vm_id()).await?;
        // An unknown volume or VM with nothing left of it is not found.
        if let (true, Some(unknown)) = (snapshots.is_empty(), filter.unknown()) {
            return Err(unknown);
        }
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
        if snapshot.protected {
            return Err(Error::conflict(format!("snapshot {} is protected; unprotect it first", snapshot.name)));
        }
        let engine = self.delete_snapshot_rows(&mut tx, std::slice::from_ref(&snapshot)).await?;
        tx.commit().await?;
        self.delete_engine_snapshots(engine)?;
        Ok(snapshot.id)
    }

    /// Deletes snapshot rows; returns their engine snapshots, for
    /// [`Self::delete_engine_snapshots`] once the transaction commits.
    pub(super) async fn delete_snapshot_rows(
        &self,
        tx: &mut db::Conn,
        snapshots: &[Snapshot],
    ) -> Result<Vec<(SnapshotId, bool)>, Error> {
        let mut engine = Vec::with_capacity(snapshots.len());
        for snapshot in snapshots {
            let engine_id = self.engine_snapshot(&snapshot.id)?;
            // A snapshot kept at a backup is that backup's checkpoint: its change tracking
            // stays for the next incremental backup.
            let checkpoint = db::list_backups(tx, None, Some(&snapshot.volume), None)
                .await?
                .iter()
                .any(|b| b.checkpoint == Some(engine_id.0));
            db::delete_snapshot(tx, &snapshot.id).await?;
            // The snapshot its data moves up into stores more from now: the meter measures
            // it again.
            if let Some(absorber) = self.engine.snapshot_usage(engine_id)?.absorbed_by {
                let name = self.engine.snapshot_info(absorber).map(|s| s.name);
                if let Some((_, id)) = name.as_deref().and_then(parse_engine_snapshot_name) {
                    self.meter_remeasure.lock().expect("meter lock").insert(id.to_string());
                }
            }
            engine.push((engine_id, checkpoint));
        }
        Ok(engine)
    }

    pub(super) fn delete_engine_snapshots(&self, snapshots: Vec<(SnapshotId, bool)>) -> Result<(), Error> {
        for (id, keep_checkpoint) in snapshots {
            self.engine.delete_snapshot(id, keep_checkpoint)?;
        }
        Ok(())
    }

    /// Protects a snapshot or backup from retention and deletion, or lifts that.
    pub async fn set_protected(&self, t: &Tenant, kind: Kind, reference: &str, protected: bool) -> Result<(), Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let (table, id) = match kind {
            Kind::Snapshot => ("snapshots", self.snapshot(&mut tx, t, reference).await?.id),
            Kind::Backup => (
                "backups",
                db::find_backup(&mut tx, &t.id, reference)
                    .await?
                    .ok_or_else(|| Error::not_found("backup", reference))?
                    .id,
            ),
            _ => return Err(Error::Internal(format!("{} can not be protected", kind.noun()))),
        };
        db::set_protected(&mut tx, table, &id, protected).await?;
        tx.commit().await?;
        Ok(())
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
        if request.from.is_some() {
            return Err(Error::invalid("from", "a snapshot is on the disks' own storage, not in a repository"));
        }
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let snapshot = self.snapshot(&mut tx, t, reference).await?;
        let size = self.snapshot_view(snapshot.clone())?.logical_bytes;
        self.check_quota(&mut tx, t, Holding { bytes: size, volumes: 1, ..Default::default() }).await?;
        let vm = self.optional_vm(&mut tx, t, request.vm.as_deref()).await?;
        let role = request.role.unwrap_or(DiskRole::Data);
        Self::check_restore_target(snapshot.disk_role, snapshot.vm.as_deref(), vm.as_ref(), &snapshot.name)?;
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
        let name = Self::restore_name(&mut tx, t, request.name.as_deref(), &snapshot.name).await?;
        let source = Source::Snapshot { id: snapshot.id.clone() };
        let volume = Volume {
            // A copy of a root disk stays a root disk's copy, whatever it is attached as (R7).
            from_root_disk: snapshot.disk_role == DiskRole::Root,
            ..Volume::new(&t.id, name, 0, vm.as_ref().map(|vm| vm.id.clone()), role, source)
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
                    schedule: None,
                    run: None,
                    protected: false,
                };
                self.engine.snapshot(self.engine_volume(&old.id)?, &engine_snapshot_name(&old.id, &kept.id))?;
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
}
