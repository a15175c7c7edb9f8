//! Import and export jobs: qemu-img between image files and private or read-only NBD exports.

use std::sync::Arc;

use super::backups::NewBackup;
use crate::db;
use crate::metering::Holding;
use crate::model::*;
use crate::names::{check_name, new_id, Kind, SizeArg};
use crate::{now, Error};

use super::*;

impl Control {
    /// Where a tenant may read and write image files: anywhere outside the data directory for an
    /// administrator (the operator, who can read the machine anyway); for other tenants only
    /// under TRANSFER_DIR/TENANT, and nowhere when the daemon has no transfer directory. Paths
    /// are resolved (symlinks followed) before they are checked. Returns the resolved path.
    fn transfer_path(&self, t: &Tenant, path: &str, for_export: bool) -> Result<PathBuf, Error> {
        let given = Path::new(path);
        if !given.is_absolute() {
            return Err(Error::invalid(
                "path",
                format!("path {path:?} must be absolute (a path on the daemon's machine)"),
            ));
        }
        let resolved = if for_export {
            let name = given.file_name().ok_or_else(|| Error::invalid("path", format!("{path} names no file")))?;
            let parent = given.parent().and_then(|p| p.canonicalize().ok()).ok_or_else(|| {
                Error::invalid("path", format!("the directory of {path} does not exist on the daemon's machine"))
            })?;
            parent.join(name)
        } else {
            given
                .canonicalize()
                .ok()
                .filter(|p| p.is_file())
                .ok_or_else(|| Error::invalid("path", format!("{path} is not a file on the daemon's machine")))?
        };
        if resolved.starts_with(&self.settings.data_dir) {
            return Err(Error::Forbidden(format!("{path} is inside cairn's data directory")));
        }
        if !t.admin {
            let Some(transfer_dir) = &self.settings.transfer_dir else {
                return Err(Error::Forbidden(
                    "this daemon has no transfer directory (--transfer-dir), so only an administrator may import \
                     and export files"
                        .into(),
                ));
            };
            let own = transfer_dir.join(&t.name);
            if !resolved.starts_with(&own) {
                return Err(Error::Forbidden(format!("{path} is not under your transfer directory {}", own.display())));
            }
        }
        Ok(resolved)
    }

    /// Checks an image to import; returns its resolved path, format and the volume size for it.
    pub(super) async fn inspect_image(
        &self,
        t: &Tenant,
        image: &ImageSource,
    ) -> Result<(String, ImageFormat, u64), Error> {
        let path = self.transfer_path(t, &image.path, false)?;
        let (format, size) = jobs::image_info(&path, image.format).await?;
        // Volumes are whole sectors; the tail past the image reads as zeros.
        let size = size.div_ceil(names::SECTOR) * names::SECTOR;
        let size = SizeArg::Bytes(size.max(names::SECTOR)).volume_bytes("path")?;
        Ok((path.to_string_lossy().into_owned(), format, size))
    }

    pub(super) fn new_job(&self, t: &Tenant, kind: JobKind, resource: &str, path: &str, total: u64) -> Job {
        Job {
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
            result: None,
        }
    }

    pub(super) fn track(&self, job: &Job) -> Arc<Progress> {
        let progress = Arc::new(Progress::new(job.bytes_total));
        self.jobs.lock().expect("jobs lock").insert(job.id.clone(), progress.clone());
        progress
    }

    pub(super) fn job_view(&self, job: Job) -> JobView {
        let progress = self.jobs.lock().expect("jobs lock").get(&job.id).cloned();
        match progress {
            Some(p) if job.state == JobState::Running => {
                let (rate, eta) = p.rate_and_eta();
                let job = Job { bytes_done: p.done(), bytes_total: p.total(), ..job };
                JobView { job, rate_bytes_per_sec: rate, eta_seconds: eta }
            }
            _ => JobView { job, rate_bytes_per_sec: 0, eta_seconds: None },
        }
    }

    /// Records a job's end — for an import or restore, in the same transaction that makes its
    /// volume ready or removes it; for a backup, with the backups it made — then forgets its
    /// live progress.
    pub(super) async fn finish(&self, job: Job, result: Result<Vec<NewBackup>, String>) -> Result<(), Error> {
        self.finish_reporting(job, result, None).await
    }

    /// [`Self::finish`] for a job that reports what it found (verify, gc), whether it
    /// succeeded or failed.
    pub(super) async fn finish_reporting(
        &self,
        mut job: Job,
        result: Result<Vec<NewBackup>, String>,
        report: Option<serde_json::Value>,
    ) -> Result<(), Error> {
        job.result = report;
        let _ops = self.ops.lock().await;
        if let Some(p) = self.jobs.lock().expect("jobs lock").get(&job.id) {
            job.bytes_done = p.done();
            job.bytes_total = p.total();
        }
        job.finished_at = Some(now());
        let mut tx = self.meta.begin().await?;
        let mut discarded = false;
        let mut made = Vec::new();
        match (result, job.kind) {
            (Ok(_), JobKind::Import | JobKind::Restore) => {
                job.state = JobState::Succeeded;
                if let Some(mut volume) = db::find_volume(&mut tx, &job.tenant, &job.resource).await? {
                    volume.state = ResourceState::Ready;
                    db::update_volume(&mut tx, &volume).await?;
                } else {
                    // A template: what was imported is frozen as its content.
                    self.engine.snapshot(self.engine_volume(&job.resource)?, TEMPLATE_SNAPSHOT)?;
                    db::set_template_state(&mut tx, &job.resource, ResourceState::Ready).await?;
                }
            }
            (Ok(backups), JobKind::Backup) => {
                job.state = JobState::Succeeded;
                for new in &backups {
                    db::insert_backup(&mut tx, &new.backup).await?;
                    db::drop_checkpoints(&mut tx, &new.backup.volume, &new.backup.id).await?;
                }
                made = backups;
            }
            (Ok(_), JobKind::Gc) => {
                job.state = JobState::Succeeded;
                // A gc of the backup repository counted what each tenant takes in it.
                let counted = job.result.as_ref().and_then(|r| r.get("bytes_by_tenant")).and_then(|b| b.as_object());
                if let (Some(counted), "repository") = (counted, job.resource.as_str()) {
                    let by_tenant: Vec<(String, u64)> =
                        counted.iter().map(|(tenant, bytes)| (tenant.clone(), bytes.as_u64().unwrap_or(0))).collect();
                    let at = job.finished_at.clone().unwrap_or_default();
                    db::set_repository_usage(&mut tx, &by_tenant, &at).await?;
                    let shares = job.result.as_ref().and_then(|r| r.get("bytes_by_backup")).and_then(|b| b.as_object());
                    let shares: Vec<db::BackupShare> = shares
                        .into_iter()
                        .flatten()
                        .map(|(record, b)| {
                            let bytes = |k: &str| b.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                            db::BackupShare {
                                record: record.clone(),
                                exclusive: bytes("exclusive"),
                                shared: bytes("shared"),
                                attributed: b.get("attributed").and_then(|v| v.as_u64()),
                            }
                        })
                        .collect();
                    db::set_backup_shares(&mut tx, &shares).await?;
                }
            }
            (Ok(_), JobKind::Export | JobKind::Verify | JobKind::Copy) => job.state = JobState::Succeeded,
            (Err(e), kind) => {
                job.state = JobState::Failed;
                job.error = Some(e);
                if matches!(kind, JobKind::Import | JobKind::Restore) {
                    discarded = Self::discard_import(&mut tx, &job.tenant, &job.resource).await?;
                }
            }
        }
        db::finish_job(&mut tx, &job).await?;
        tx.commit().await?;
        if discarded {
            self.remove_engine_volume(&job.resource)?;
        }
        // Each backup's snapshot goes, keeping its change tracking for the next backup; the
        // older backups' tracking is no longer needed.
        for new in made {
            if !new.kept {
                self.engine.delete_snapshot(new.snapshot, true)?;
            }
            for old in new.older_checkpoints {
                let _ = self.engine.forget_checkpoint(SnapshotId(old));
            }
        }
        self.jobs.lock().expect("jobs lock").remove(&job.id);
        // A backup or import changed what the tenant stores: the meter says so from now.
        if let Err(e) = self.sync_meters().await {
            eprintln!("cairn: metering after job {}: {e}", job.id);
        }
        // After the commit: a shutdown waiting for jobs may close the database next.
        self.job_ended.notify_waiters();
        Ok(())
    }

    /// Starts filling the volume or template `job.resource` from `job.path` through a private
    /// NBD export; on success the resource becomes ready, on failure it is removed.
    pub(super) fn start_import(self: &Arc<Self>, job: Job, format: ImageFormat) -> JobView {
        let progress = self.track(&job);
        let view = self.job_view(job.clone());
        let control = self.clone();
        tokio::spawn(async move {
            let result = control.run_import(&job, format, &progress).await.map(|()| Vec::new());
            let id = job.id.clone();
            if let Err(e) = control.finish(job, result).await {
                eprintln!("cairn: recording the end of import job {id}: {e}");
            }
        });
        view
    }

    async fn run_import(&self, job: &Job, format: ImageFormat, progress: &Progress) -> Result<(), String> {
        let volume = self.engine.volume_id(&job.resource).map_err(|e| e.to_string())?;
        let export = format!("import-{}", job.id);
        self.exports.set_import(&export, Some(volume));
        let target = format!("nbd+unix:///{export}?socket={}", self.settings.nbd.socket.display());
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
        result
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
        let (path, format, size) = self.inspect_image(t, image).await?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        self.check_quota(&mut tx, t, Holding { bytes: size, volumes: 1, ..Default::default() }).await?;
        Self::name_free(&mut tx, t, Kind::Volume, name).await?;
        let vm = self.optional_vm(&mut tx, t, vm).await?.map(|vm| vm.id);
        let source = Source::Image { path: path.clone() };
        let volume = Volume {
            state: ResourceState::Importing,
            ..Volume::new(&t.id, name.into(), size, vm, DiskRole::Data, source)
        };
        self.engine.create_volume(&volume.id, size)?;
        db::insert_volume(&mut tx, &volume).await?;
        let job = self.new_job(t, JobKind::Import, &volume.id, &path, size);
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
        let (path, format, size) = self.inspect_image(t, image).await?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        self.check_quota(&mut tx, t, Holding { bytes: size, ..Default::default() }).await?;
        Self::name_free(&mut tx, t, Kind::Template, name).await?;
        let template = Template {
            id: new_id(Kind::Template),
            tenant: t.id.clone(),
            name: name.into(),
            size,
            state: ResourceState::Importing,
            source: Source::Image { path: path.clone() },
            created_at: now(),
        };
        self.engine.create_volume(&template.id, size)?;
        db::insert_template(&mut tx, &template).await?;
        let job = self.new_job(t, JobKind::Import, &template.id, &path, size);
        db::insert_job(&mut tx, &job).await?;
        tx.commit().await?;
        Ok((self.start_import(job, format), self.template_view(template)))
    }

    /// Exports a volume or a snapshot to a new raw or qcow2 file on the daemon's machine.
    pub(super) async fn export(
        self: &Arc<Self>,
        t: &Tenant,
        resource: &str,
        source: ExportSource,
        size: u64,
        path: &str,
        format: Option<ImageFormat>,
    ) -> Result<JobView, Error> {
        let target = self.transfer_path(t, path, true)?;
        if target.symlink_metadata().is_ok() {
            return Err(Error::conflict(format!("{path} exists; cairn does not overwrite files")));
        }
        let job = self.new_job(t, JobKind::Export, resource, &target.to_string_lossy(), size);
        let mut tx = self.meta.begin().await?;
        db::insert_job(&mut tx, &job).await?;
        tx.commit().await?;
        let progress = self.track(&job);
        let view = self.job_view(job.clone());
        let control = self.clone();
        let format = format.unwrap_or(ImageFormat::Raw);
        tokio::spawn(async move {
            let result = control.run_export(&job, source, format, &progress).await.map(|()| Vec::new());
            let id = job.id.clone();
            if let Err(e) = control.finish(job, result).await {
                eprintln!("cairn: recording the end of export job {id}: {e}");
            }
        });
        Ok(view)
    }

    /// Writes to a partial file and links it into place at the end, so the path never holds
    /// half an image and a file that appeared meanwhile is not overwritten.
    async fn run_export(
        &self,
        job: &Job,
        source: ExportSource,
        format: ImageFormat,
        progress: &Arc<Progress>,
    ) -> Result<(), String> {
        let partial = partial_path(&job.path, &job.id);
        let raw = raw_partial_path(&job.path, &job.id);
        let converted = match source {
            ExportSource::Nbd(export) => {
                let source = format!("nbd+unix:///{export}?socket={}", self.settings.nbd.socket.display());
                convert_image(&source, &partial, format, progress).await
            }
            ExportSource::Backup { repo, record, size } => {
                // The backup is restored into a sparse raw file first; qcow2 is made from it.
                let target = if format == ImageFormat::Raw { partial.clone() } else { raw.clone() };
                let counters = progress.clone();
                let restored =
                    tokio::task::spawn_blocking(move || restore_to_file(&repo, &record, size, &target, &counters))
                        .await
                        .unwrap_or_else(|e| Err(format!("the export task failed: {e}")));
                match (restored, format) {
                    (Err(e), _) => Err(e),
                    (Ok(()), ImageFormat::Raw) => Ok(()),
                    (Ok(()), _) => convert_image(&raw.to_string_lossy(), &partial, format, progress).await,
                }
            }
        };
        let result = converted.and_then(|()| {
            std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(|e| format!("syncing the export: {e}"))?;
            std::fs::hard_link(&partial, &job.path).map_err(|e| format!("placing the export at {}: {e}", job.path))
        });
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(&raw);
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
        self.export(t, &volume.id, ExportSource::Nbd(volume.id.clone()), volume.size, path, format).await
    }

    pub async fn export_snapshot(
        self: &Arc<Self>,
        t: &Tenant,
        reference: &str,
        path: &str,
        format: Option<ImageFormat>,
    ) -> Result<JobView, Error> {
        let snapshot = self.get_snapshot(t, reference).await?;
        let source = ExportSource::Nbd(snapshot.snapshot.id.clone());
        self.export(t, &snapshot.snapshot.id, source, snapshot.logical_bytes, path, format).await
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
}

/// What an export job reads.
pub(super) enum ExportSource {
    /// An NBD export of this daemon (a volume or a snapshot).
    Nbd(String),
    /// A backup in the repository.
    Backup { repo: Arc<cairn_backup::Repository>, record: String, size: u64 },
}

async fn convert_image(source: &str, target: &Path, format: ImageFormat, progress: &Progress) -> Result<(), String> {
    let args: Vec<&std::ffi::OsStr> =
        vec!["-f".as_ref(), "raw".as_ref(), "-O".as_ref(), format.as_str().as_ref(), source.as_ref(), target.as_ref()];
    jobs::convert(&args, progress).await
}

/// A raw image file as a restore target: zero chunks are never written, so it stays sparse.
struct FileSink(std::fs::File);

impl cairn_backup::BlockSink for FileSink {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, &vec![0; len as usize], offset)
    }
}

fn restore_to_file(
    repo: &cairn_backup::Repository,
    record: &str,
    size: u64,
    path: &Path,
    progress: &Progress,
) -> Result<(), String> {
    let file = std::fs::File::create_new(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    file.set_len(size).map_err(|e| e.to_string())?;
    repo.restore(record, &FileSink(file), None, Some(&progress.counters)).map(|_| ()).map_err(|e| e.to_string())
}
