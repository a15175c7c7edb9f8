//! Deleting backups, one at a time or by retention rules (a plan that can be printed before
//! anything goes), and the repository jobs that check and reclaim it: verify and GC.

use cairn_backup::{GcOptions, Repository};
use jiff::tz::TimeZone;
use serde::Serialize;

use crate::db;
use crate::model::*;
use crate::retention::RetentionRules;
use crate::{now, Error};

use super::*;

/// One backup in a prune plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PruneItem {
    pub backup: String,
    pub created_at: String,
    pub size: u64,
    /// The rules that keep it; empty for a backup that goes.
    pub reasons: Vec<&'static str>,
}

/// What pruning does to one disk's backups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskPlan {
    pub volume: String,
    pub volume_name: String,
    pub keep: Vec<PruneItem>,
    pub forget: Vec<PruneItem>,
}

/// A prune: per disk, what stays and what goes. With `dry_run` nothing was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrunePlan {
    pub dry_run: bool,
    pub time_zone: String,
    pub disks: Vec<DiskPlan>,
    pub forgotten: usize,
    /// In a dry run, what forgetting the backups would free and do to the monthly bill.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::metering::CostPreview>,
}

/// Which backups a prune looks at and how it judges them.
#[derive(Debug, Clone, Default)]
pub struct PruneRequest {
    pub volume: Option<String>,
    pub vm: Option<String>,
    pub rules: RetentionRules,
    /// IANA time zone the periods of the rules are counted in; UTC when absent.
    pub time_zone: Option<String>,
    pub dry_run: bool,
}

pub(super) fn time_zone(name: Option<&str>) -> Result<TimeZone, Error> {
    match name {
        None => Ok(TimeZone::UTC),
        Some(name) => TimeZone::get(name).map_err(|_| {
            Error::invalid("time_zone", format!("{name:?} is not an IANA time zone (e.g. Europe/Berlin)"))
        }),
    }
}

impl Control {
    /// Deletes one backup: its row now, its record in the repository next (its chunks go at
    /// the next GC that finds them unreferenced).
    pub async fn delete_backup(&self, t: &Tenant, id: &str) -> Result<Backup, Error> {
        self.repository()?;
        let backup = {
            let _ops = self.ops.lock().await;
            let mut tx = self.meta.begin().await?;
            let backup = db::find_backup(&mut tx, &t.id, id).await?.ok_or_else(|| Error::not_found("backup", id))?;
            if backup.protected {
                return Err(Error::conflict(format!("backup {} is protected; unprotect it first", backup.id)));
            }
            db::delete_backups(&mut tx, std::slice::from_ref(&backup), &now()).await?;
            tx.commit().await?;
            backup
        };
        self.forget_checkpoints(std::slice::from_ref(&backup));
        self.forget_pending().await?;
        Ok(backup)
    }

    /// Applies retention rules to each disk's backups, or (dry run) only says what they would
    /// delete. Each disk (volume) is judged apart; the newest backup of a disk always stays.
    pub async fn prune_backups(&self, t: &Tenant, request: &PruneRequest) -> Result<PrunePlan, Error> {
        self.repository()?;
        request.rules.check()?;
        let tz = time_zone(request.time_zone.as_deref())?;
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let filter = DiskFilter::resolve(&mut tx, t, request.volume.as_deref(), request.vm.as_deref()).await?;
        let backups = db::list_backups(&mut tx, Some(&t.id), filter.volume_id(), filter.vm_id()).await?;
        // Protected backups are out of retention's reach: neither judged nor counted.
        let backups = backups.into_iter().filter(|b| !b.protected);
        let mut by_disk: BTreeMap<String, Vec<Backup>> = BTreeMap::new();
        for backup in backups {
            by_disk.entry(backup.volume.clone()).or_default().push(backup);
        }
        let mut plan = PrunePlan {
            dry_run: request.dry_run,
            time_zone: tz.iana_name().unwrap_or("UTC").to_string(),
            disks: Vec::new(),
            forgotten: 0,
            cost: None,
        };
        let mut doomed = Vec::new();
        for (volume, backups) in by_disk {
            let mut points = Vec::with_capacity(backups.len());
            for b in &backups {
                let time: jiff::Timestamp =
                    b.created_at.parse().map_err(|e| Error::Internal(format!("backup {}'s time: {e}", b.id)))?;
                points.push((b.id.clone(), time));
            }
            let by_id: BTreeMap<&str, &Backup> = backups.iter().map(|b| (b.id.as_str(), b)).collect();
            let mut disk =
                DiskPlan { volume, volume_name: backups[0].volume_name.clone(), keep: Vec::new(), forget: Vec::new() };
            for verdict in request.rules.plan(&points, &tz, jiff::Timestamp::now()) {
                let backup = by_id[verdict.id.as_str()];
                let item = PruneItem {
                    backup: backup.id.clone(),
                    created_at: backup.created_at.clone(),
                    size: backup.size,
                    reasons: verdict.reasons,
                };
                if verdict.keep {
                    disk.keep.push(item);
                } else {
                    disk.forget.push(item);
                    doomed.push(backup.clone());
                }
            }
            plan.disks.push(disk);
        }
        if request.dry_run {
            let ids: Vec<&str> = doomed.iter().map(|b| b.id.as_str()).collect();
            let freed = doomed.iter().map(Backup::frees_bytes).sum();
            plan.cost = Some(self.cost_preview(&mut tx, &t.id, &ids, freed).await?);
            return Ok(plan);
        }
        db::delete_backups(&mut tx, &doomed, &now()).await?;
        tx.commit().await?;
        drop(_ops);
        plan.forgotten = doomed.len();
        self.forget_checkpoints(&doomed);
        self.forget_pending().await?;
        Ok(plan)
    }

    /// A deleted backup's change tracking is of no use to the next backup, which reads
    /// everything when its parent's checkpoint is gone.
    pub(super) fn forget_checkpoints(&self, deleted: &[Backup]) {
        for checkpoint in deleted.iter().filter_map(|b| b.checkpoint) {
            let _ = self.engine.forget_checkpoint(SnapshotId(checkpoint));
        }
    }

    /// Forgets the records of deleted backups in the repositories that hold them (after a
    /// crash, those a previous run left). A second repository that can not be reached now is
    /// tried again next time.
    pub(super) async fn forget_pending(&self) -> Result<(), Error> {
        let mut c = self.meta.conn().await?;
        for (repository, record) in db::pending_forgets(&mut c).await? {
            let repo = match self.repository_named(&repository).await {
                Ok(repo) => repo,
                Err(e) if !repository.is_empty() => {
                    eprintln!("cairn: forgetting backup record {record} in {repository} later: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let id = record.clone();
            match blocking(move || repo.forget(&id)).await? {
                Ok(()) | Err(cairn_backup::Error::BackupNotFound(_)) => {
                    db::forgotten(&mut c, &repository, &record).await?
                }
                Err(e) => return Err(Error::Internal(format!("forgetting backup record {record}: {e}"))),
            }
        }
        Ok(())
    }

    /// Re-reads and re-hashes the repository (all of it, or about `sample_percent` of its
    /// packs) as a job; the job fails, naming the damaged backups, if any backup could not be
    /// fully restored, and its result is the whole report.
    /// `repository` names a second repository to verify instead of the backup repository.
    pub async fn start_verify(
        self: &Arc<Self>,
        t: &Tenant,
        repository: Option<&str>,
        sample_percent: Option<f64>,
    ) -> Result<JobView, Error> {
        if let Some(pct) = sample_percent {
            if !(pct > 0.0 && pct <= 100.0) {
                return Err(Error::invalid("sample_percent", "a percentage above 0 and at most 100"));
            }
        }
        // Users know backups by cairn's ids, not by the repository's record ids.
        let known = db::list_backups(&mut *self.meta.conn().await?, None, None, None).await?;
        self.start_repository_job(t, JobKind::Verify, repository, move |repo, progress| {
            let report = repo.verify(sample_percent, Some(progress)).map_err(|e| format!("verify: {e}"))?;
            let damaged = cairn_ids(&known, &report.damaged_backups);
            let problem = (!report.problems.is_empty()).then(|| {
                format!(
                    "{} problem(s); {} backup(s) can not be fully restored: {}",
                    report.problems.len(),
                    damaged.len(),
                    damaged.join(", ")
                )
            });
            let report = serde_json::json!({
                "backups": report.backups,
                "blobs_checked": report.blobs_checked,
                "problems": report.problems,
                "damaged_backups": damaged,
                "ok": report.problems.is_empty(),
            });
            Ok((report, problem))
        })
        .await
    }

    /// Deletes what no backup references, as a job whose result is GC's report.
    /// `repository` names a second repository to collect instead of the backup repository.
    pub async fn start_gc(
        self: &Arc<Self>,
        t: &Tenant,
        repository: Option<&str>,
        options: GcOptions,
    ) -> Result<JobView, Error> {
        self.start_repository_job(t, JobKind::Gc, repository, move |repo, progress| {
            let report = repo.gc(&options, Some(progress)).map_err(|e| format!("gc: {e}"))?;
            Ok((serde_json::to_value(&report).expect("a report serialises"), None))
        })
        .await
    }

    /// Starts an administrator's job on the whole repository. `work` runs on a blocking
    /// thread and returns its report and, if the job should fail, why.
    async fn start_repository_job<F>(
        self: &Arc<Self>,
        t: &Tenant,
        kind: JobKind,
        repository: Option<&str>,
        work: F,
    ) -> Result<JobView, Error>
    where
        F: FnOnce(&Repository, &cairn_backup::Progress) -> Result<(serde_json::Value, Option<String>), String>
            + Send
            + 'static,
    {
        if !t.admin {
            return Err(Error::Forbidden(format!("only an administrator may run {} on the repository", kind.as_str())));
        }
        let repo = self.repository_named(repository.unwrap_or("")).await?;
        let job = self.new_job(t, kind, repository.unwrap_or("repository"), "", 0);
        db::insert_job(&mut *self.meta.conn().await?, &job).await?;
        let progress = self.track(&job);
        let view = self.job_view(job.clone());
        let control = self.clone();
        tokio::spawn(async move {
            let outcome = tokio::task::spawn_blocking(move || work(&repo, &progress.counters))
                .await
                .unwrap_or_else(|e| Err(format!("the {} task failed: {e}", kind.as_str())));
            let (result, report) = match outcome {
                Ok((report, None)) => (Ok(Vec::new()), Some(report)),
                Ok((report, Some(problem))) => (Err(problem), Some(report)),
                Err(e) => (Err(e), None),
            };
            let id = job.id.clone();
            if let Err(e) = control.finish_reporting(job, result, report).await {
                eprintln!("cairn: recording the end of job {id}: {e}");
            }
        });
        Ok(view)
    }
}

/// cairn's ids of the backups with these repository record ids; records cairn has no row
/// for are named as they are.
fn cairn_ids(known: &[Backup], records: &[String]) -> Vec<String> {
    records
        .iter()
        .map(|r| known.iter().find(|b| &b.record == r).map_or_else(|| format!("record {r}"), |b| b.id.clone()))
        .collect()
}

/// Runs blocking repository work off the async workers.
pub(super) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Error::Internal(format!("a repository task failed: {e}")))
}
