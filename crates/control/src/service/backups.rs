//! Backups (R12, R13): a disk's snapshot copied into the backup repository, incrementally by
//! the engine's changed-block tracking, and restored into a fresh volume or over an existing one.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;

use cairn_backup::{BackupRequest, BlockSink, BlockSource, Repository};
use cairn_volume::{Allocation, ChangeTarget};

use crate::db;
use crate::metering::Holding;
use crate::model::*;
use crate::names::{check_name, new_id, Kind};
use crate::{now, Error};

use super::*;

/// The engine's name for the snapshot a backup reads: the volume's id and the backup's.
/// Once backed up it is deleted, keeping only its change tracking (a checkpoint).
fn backup_snapshot_name(volume: &str, backup: &str) -> String {
    format!("{volume}+{backup}")
}

fn io_error(e: cairn_volume::Error) -> io::Error {
    io::Error::other(e.to_string())
}

struct SnapshotSource(cairn_volume::SnapshotView);

impl BlockSource for SnapshotSource {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read(buf, offset).map_err(io_error)
    }
}

struct VolumeTarget(cairn_volume::Volume);

impl BlockSource for VolumeTarget {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read(buf, offset).map_err(io_error)
    }
}

impl BlockSink for VolumeTarget {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.0.write(data, offset, false).map_err(io_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len, false).map_err(io_error)
    }
}

/// One disk of a backup job: what to read and what it continues from.
pub(super) struct DiskToBackUp {
    backup: Backup,
    snapshot: SnapshotId,
    /// The previous backup of this volume and its checkpoint, for an incremental backup.
    parent: Option<(String, u64)>,
    /// The snapshot read is a user's kept snapshot, not the backup's own: it stays.
    kept: bool,
}

/// A backup made, to record when the job ends.
#[derive(Debug)]
pub(super) struct NewBackup {
    pub backup: Backup,
    pub snapshot: SnapshotId,
    /// Checkpoints of older backups of the volume, forgotten once this one is recorded.
    pub older_checkpoints: Vec<u64>,
    /// The snapshot is a kept user snapshot, which stays (and serves as the checkpoint).
    pub kept: bool,
}

impl Control {
    pub(super) fn repository(&self) -> Result<Arc<Repository>, Error> {
        self.repo.clone().ok_or_else(|| Error::conflict("this daemon has no backup repository (--backup-repo)"))
    }

    /// Backs up one volume, or every disk of a VM at one instant, as a job. The snapshot a
    /// backup reads goes once it is backed up; with `keep_snapshot`, a snapshot of the same
    /// instant stays on the disks' storage too (named as that request says).
    pub async fn start_backup(
        self: &Arc<Self>,
        t: &Tenant,
        volume: Option<&str>,
        vm: Option<&str>,
        keep_snapshot: Option<&SnapshotRequest>,
    ) -> Result<JobView, Error> {
        self.begin_backup(t, volume, vm, keep_snapshot, None).await
    }

    /// [`Self::start_backup`], for a scheduled run too: its backups carry the run's ids, and
    /// the run's step to `taken` (naming the job) commits with the job.
    pub(super) async fn begin_backup(
        self: &Arc<Self>,
        t: &Tenant,
        volume: Option<&str>,
        vm: Option<&str>,
        keep_snapshot: Option<&SnapshotRequest>,
        made_by: Option<&Run>,
    ) -> Result<JobView, Error> {
        let repo = self.repository()?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let (volumes, vm, resource) = match (volume, vm) {
            (Some(reference), None) => {
                let volume = self.volume(&mut tx, t, reference).await?;
                let id = volume.id.clone();
                (vec![volume], None, id)
            }
            (None, Some(reference)) => {
                let vm = self.vm(&mut tx, t, reference).await?;
                let volumes = db::list_volumes(&mut tx, Some(&t.id), Some(&vm.id)).await?;
                let id = vm.id.clone();
                (volumes, Some(vm), id)
            }
            _ => return Err(Error::invalid("volume", "back up a volume or a VM")),
        };
        if let Some(busy) = volumes.iter().find(|v| v.state != ResourceState::Ready) {
            return Err(Error::conflict(format!("volume {} is being imported", busy.name)));
        }
        // A backup's bytes are known once it is made: its count is judged here (and a kept
        // snapshot's count and bytes).
        let mut adding = match keep_snapshot {
            Some(_) => self.snapshots_add(&volumes),
            None => Holding::default(),
        };
        adding.backups = volumes.len() as u64;
        self.check_quota(&mut tx, t, adding).await?;
        let group = vm.as_ref().map(|_| new_id(Kind::SnapshotGroup));
        let mut disks = Vec::new();
        for volume in &volumes {
            // The newest backup of the volume that still has its checkpoint.
            let parent = db::list_backups(&mut tx, Some(&t.id), Some(&volume.id), None)
                .await?
                .into_iter()
                .rev()
                .find_map(|b| Some((b.record, b.checkpoint?)));
            let backup = Backup {
                id: new_id(Kind::Backup),
                tenant: t.id.clone(),
                record: String::new(),
                volume: volume.id.clone(),
                volume_name: volume.name.clone(),
                vm: vm.as_ref().map(|vm| vm.id.clone()).or_else(|| volume.vm.clone()),
                disk_role: if volume.from_root_disk { DiskRole::Root } else { DiskRole::Data },
                group: group.clone(),
                // A run's items are dated by the scheduler's clock, as its retention reads them.
                created_at: made_by.map_or_else(now, |run| run.started_at.clone()),
                size: volume.size,
                bytes_read: 0,
                bytes_added: 0,
                checkpoint: None,
                copies: Vec::new(),
                schedule: made_by.map(|run| run.schedule.clone()),
                run: made_by.map(|run| run.id.clone()),
                protected: false,
                exclusive_bytes: None,
                shared_bytes: None,
                attributed_bytes: None,
            };
            disks.push((backup, parent));
        }
        let kept = match keep_snapshot {
            Some(request) => {
                Self::snapshot_rows(&mut tx, t, &volumes, vm.as_ref(), group.clone(), request, made_by).await?
            }
            None => Vec::new(),
        };
        // All disks freeze at one instant; the backup reads those snapshots at its own pace.
        // A kept snapshot is the one the backup reads.
        let engine_ids: Vec<VolumeId> = volumes.iter().map(|v| self.engine_volume(&v.id)).collect::<Result<_, _>>()?;
        let names: Vec<String> = if kept.is_empty() {
            disks.iter().map(|(b, _)| backup_snapshot_name(&b.volume, &b.id)).collect()
        } else {
            kept.iter().map(|s| engine_snapshot_name(&s.volume, &s.id)).collect()
        };
        let requests: Vec<(VolumeId, &str)> = engine_ids.iter().zip(&names).map(|(v, n)| (*v, n.as_str())).collect();
        let taken = self.engine.snapshot_group(&requests)?;
        for snapshot in &kept {
            db::insert_snapshot(&mut tx, snapshot).await?;
        }
        let to_back_up: Vec<DiskToBackUp> = disks
            .into_iter()
            .zip(taken)
            .map(|((backup, parent), info)| DiskToBackUp { backup, snapshot: info.id, parent, kept: !kept.is_empty() })
            .collect();
        let job = self.new_job(t, JobKind::Backup, &resource, "", 0);
        db::insert_job(&mut tx, &job).await?;
        if let Some(run) = made_by {
            // The caller set the run's consistency from its hooks.
            let taken = Run { stage: RunStage::Taken, job: Some(job.id.clone()), ..run.clone() };
            db::update_run(&mut tx, &taken).await?;
        }
        tx.commit().await?;
        let progress = self.track(&job);
        let view = self.job_view(job.clone());
        let control = self.clone();
        tokio::spawn(async move {
            let engine = control.engine.clone();
            let snapshots: Vec<SnapshotId> = to_back_up.iter().filter(|d| !d.kept).map(|d| d.snapshot).collect();
            let progress_for_work = progress.clone();
            let result = tokio::task::spawn_blocking(move || back_up(&engine, &repo, to_back_up, &progress_for_work))
                .await
                .unwrap_or_else(|e| Err(format!("the backup task failed: {e}")));
            if result.is_err() {
                for snapshot in snapshots {
                    let _ = control.engine.delete_snapshot(snapshot, false);
                }
            }
            let id = job.id.clone();
            if let Err(e) = control.finish(job, result).await {
                eprintln!("cairn: recording the end of backup job {id}: {e}");
            }
        });
        Ok(view)
    }

    pub async fn list_backups(&self, t: &Tenant, volume: Option<&str>, vm: Option<&str>) -> Result<Vec<Backup>, Error> {
        let mut c = self.meta.conn().await?;
        let filter = DiskFilter::resolve(&mut c, t, volume, vm).await?;
        let backups = db::list_backups(&mut c, Some(&t.id), filter.volume_id(), filter.vm_id()).await?;
        self.with_copies(&mut c, backups).await
    }

    pub async fn get_backup(&self, t: &Tenant, id: &str) -> Result<Backup, Error> {
        let mut c = self.meta.conn().await?;
        let backup = db::find_backup(&mut c, &t.id, id).await?.ok_or_else(|| Error::not_found("backup", id))?;
        Ok(self.with_copies(&mut c, vec![backup]).await?.remove(0))
    }

    /// A fresh volume with a backup's content (standalone, or attached to `vm`), as a job. The
    /// rules of R7 are those of restoring a snapshot.
    pub async fn restore_backup(
        self: &Arc<Self>,
        t: &Tenant,
        id: &str,
        request: &RestoreRequest,
    ) -> Result<(JobView, VolumeView), Error> {
        if let Some(name) = &request.name {
            check_name("name", name)?;
        }
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let backup = db::find_backup(&mut tx, &t.id, id).await?.ok_or_else(|| Error::not_found("backup", id))?;
        self.check_quota(&mut tx, t, Holding { bytes: backup.size, volumes: 1, ..Default::default() }).await?;
        let repo = self.restore_source(&mut tx, &backup, request.from.as_deref()).await?;
        let vm = self.optional_vm(&mut tx, t, request.vm.as_deref()).await?;
        if request.role == Some(DiskRole::Root) {
            return Err(Error::invalid(
                "as",
                "a backup restores as a data disk; to bring a root disk back, stop the VM and restore the backup over \
                 its root volume",
            ));
        }
        Self::check_restore_target(backup.disk_role, backup.vm.as_deref(), vm.as_ref(), &backup.id)?;
        let name = Self::restore_name(&mut tx, t, request.name.as_deref(), &backup.volume_name).await?;
        let source = Source::Backup { id: backup.id.clone() };
        let vm_id = vm.as_ref().map(|vm| vm.id.clone());
        let volume = Volume {
            state: ResourceState::Importing,
            from_root_disk: backup.disk_role == DiskRole::Root,
            ..Volume::new(&t.id, name, backup.size, vm_id, DiskRole::Data, source)
        };
        self.engine.create_volume(&volume.id, volume.size)?;
        db::insert_volume(&mut tx, &volume).await?;
        let job = self.new_job(t, JobKind::Restore, &volume.id, "", 0);
        db::insert_job(&mut tx, &job).await?;
        tx.commit().await?;
        let view = self.run_restore(job, repo, backup.record, volume.id.clone(), false)?;
        Ok((view, self.volume_view(volume)))
    }

    /// Restores a backup over an existing volume, writing only the chunks that differ (a delta
    /// revert from off-site). Its VM must be stopped.
    pub async fn restore_backup_over(
        self: &Arc<Self>,
        t: &Tenant,
        volume: &str,
        id: &str,
        from: Option<&str>,
    ) -> Result<JobView, Error> {
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let volume = self.volume(&mut tx, t, volume).await?;
        let backup = db::find_backup(&mut tx, &t.id, id).await?.ok_or_else(|| Error::not_found("backup", id))?;
        let repo = self.restore_source(&mut tx, &backup, from).await?;
        if let Some(vm) = &volume.vm {
            let vm = self.vm(&mut tx, t, vm).await?;
            if vm.state == VmState::Running {
                return Err(Error::conflict(format!(
                    "VM {} is running; stop it before restoring over its disk",
                    vm.name
                )));
            }
        }
        if backup.volume != volume.id {
            return Err(Error::conflict(format!(
                "backup {} is of volume {}, not {}; restore it to a new volume instead",
                backup.id, backup.volume_name, volume.name
            )));
        }
        if volume.size < backup.size {
            return Err(Error::conflict(format!("volume {} is smaller than the backup", volume.name)));
        }
        let job = self.new_job(t, JobKind::Restore, &volume.id, "", 0);
        db::insert_job(&mut tx, &job).await?;
        tx.commit().await?;
        self.run_restore(job, repo, backup.record, volume.id, true)
    }

    fn run_restore(
        self: &Arc<Self>,
        job: Job,
        repo: Arc<Repository>,
        record: String,
        volume: String,
        over_existing: bool,
    ) -> Result<JobView, Error> {
        let target = VolumeTarget(self.engine.volume(self.engine_volume(&volume)?)?);
        let progress = self.track(&job);
        let view = self.job_view(job.clone());
        let control = self.clone();
        tokio::spawn(async move {
            let counters = progress.clone();
            let result = tokio::task::spawn_blocking(move || {
                let existing: Option<&dyn BlockSource> = over_existing.then_some(&target as &dyn BlockSource);
                repo.restore(&record, &target, existing, Some(&counters.counters)).map_err(|e| e.to_string())?;
                // Restored data is durable before the job says so.
                target.0.flush().map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("the restore task failed: {e}")))
            .map(|()| Vec::new());
            let id = job.id.clone();
            if let Err(e) = control.finish(job, result).await {
                eprintln!("cairn: recording the end of restore job {id}: {e}");
            }
        });
        Ok(view)
    }

    /// Exports a backup to a new raw or qcow2 file on the daemon's machine, for the user's own
    /// infrastructure (R12), as a job.
    pub async fn export_backup(
        self: &Arc<Self>,
        t: &Tenant,
        id: &str,
        path: &str,
        format: Option<ImageFormat>,
    ) -> Result<JobView, Error> {
        let repo = self.repository()?;
        let backup = self.get_backup(t, id).await?;
        let source = super::transfers::ExportSource::Backup { repo, record: backup.record, size: backup.size };
        self.export(t, &backup.id, source, backup.size, path, format).await
    }
}

/// The blocking part of a backup job: each disk's snapshot into the repository, reading only
/// the changes since the volume's previous backup when its checkpoint still says what they are.
fn back_up(
    engine: &Store,
    repo: &Repository,
    disks: Vec<DiskToBackUp>,
    progress: &Progress,
) -> Result<Vec<NewBackup>, String> {
    let mut made = Vec::new();
    for disk in disks {
        let view = engine.open_snapshot(disk.snapshot).map_err(|e| e.to_string())?;
        let size = view.size();
        let allocated: Vec<Range<u64>> = view
            .allocation(0, size)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|e| e.kind == Allocation::Data)
            .map(|e| e.offset..e.offset + e.length)
            .collect();
        let parent_record;
        let changed: Vec<Range<u64>>;
        // A checkpoint that is no longer an ancestor (the volume was reverted) or is gone: read
        // everything; dedup keeps what was already stored from costing anything.
        let parent = match &disk.parent {
            Some((record, checkpoint)) => {
                match (
                    repo.backup_record(record),
                    engine.changed_extents(SnapshotId(*checkpoint), ChangeTarget::Snapshot(disk.snapshot)),
                ) {
                    (Ok(record), Ok(extents)) => {
                        parent_record = record;
                        changed = extents.into_iter().map(|e| e.offset..e.offset + e.length).collect();
                        Some((&parent_record, changed.as_slice()))
                    }
                    _ => None,
                }
            }
            None => None,
        };
        let labels = BTreeMap::from([
            ("cairn_backup".to_string(), disk.backup.id.clone()),
            ("volume".to_string(), disk.backup.volume.clone()),
            ("volume_name".to_string(), disk.backup.volume_name.clone()),
            ("tenant".to_string(), disk.backup.tenant.clone()),
        ]);
        let request = BackupRequest { labels, parent, allocated: Some(&allocated), progress: Some(&progress.counters) };
        let record = repo.backup(&SnapshotSource(view), request).map_err(|e| e.to_string())?;
        let older_checkpoints = disk.parent.iter().map(|(_, c)| *c).collect();
        let backup = Backup {
            record: record.id.clone(),
            bytes_read: record.stats.chunks_read * cairn_backup::CHUNK_SIZE,
            bytes_added: record.stats.bytes_added,
            checkpoint: Some(disk.snapshot.0),
            ..disk.backup
        };
        made.push(NewBackup { backup, snapshot: disk.snapshot, older_checkpoints, kept: disk.kept });
    }
    Ok(made)
}
