//! Schedules (R2): snapshots or backups of a volume or VM made at set times in an IANA time
//! zone, each schedule pruning what it made by its own retention rules (R3); hooks around a
//! snapshot (R9); and each disk's protection status against its schedules (R11). See
//! docs/scheduling.md for the rules a user relies on.
//!
//! A run is claimed in one transaction that records it and moves the schedule's next run past
//! now, so a firing runs once however often the daemon restarts; a run then steps through
//! `started` → `taken` → `done`, each step committed with what it made, and a run a restart
//! interrupted resumes from its step.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::clock::stamp;
use crate::db;
use crate::hooks::{run_hook, HookContext, Phase};
use crate::metering::CostPreview;
use crate::model::*;
use crate::names::{check_name, new_id, Kind};
use crate::retention::RetentionRules;
use crate::schedule::Frequency;
use crate::Error;

use super::pruning::time_zone;
use super::*;

/// How often at most the meter catches up with scheduled runs that ended.
const METER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(1);

/// Stops a background task when its owner goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A run that starts later than this after its time (plus jitter) is marked late.
const LATE_AFTER: SignedDuration = SignedDuration::from_secs(60);
/// The scheduler looks at the schedules at least this often, whatever it expects.
const LONGEST_NAP: SignedDuration = SignedDuration::from_secs(60);
/// Runs listed with a schedule.
const RUNS_SHOWN: i64 = 20;

/// How the scheduler spreads and bounds its work.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Runs in progress at once; the rest wait their turn.
    pub max_concurrent_runs: usize,
    /// A run starts up to this long after its time (at most a tenth of its schedule's
    /// interval), by a fixed amount per schedule and firing, so schedules set to the same
    /// minute do not all start at once.
    pub max_jitter: std::time::Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions { max_concurrent_runs: 4, max_jitter: std::time::Duration::from_secs(300) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    pub name: String,
    pub volume: Option<String>,
    pub vm: Option<String>,
    /// snapshot [default] or backup.
    pub action: Option<ScheduleAction>,
    /// A second repository each backup is copied to.
    pub copy_to: Option<String>,
    pub frequency: String,
    /// IANA time zone the frequency's times are in [default UTC].
    pub time_zone: Option<String>,
    pub retention: RetentionRules,
    pub hooks: Option<Hooks>,
    #[serde(default)]
    pub paused: bool,
}

/// A change to a schedule's retention or hooks; with `dry_run`, nothing changes and the answer
/// says what the new retention would delete.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSchedule {
    pub retention: Option<RetentionRules>,
    /// New hooks; `{}` removes them.
    pub hooks: Option<Hooks>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScheduleView {
    #[serde(flatten)]
    pub schedule: Schedule,
    pub target_name: String,
    /// The schedule's interval: the RPO it promises.
    pub interval_seconds: i64,
    pub last_run: Option<Run>,
}

/// One run's items in a retention plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunItems {
    pub run: String,
    pub created_at: String,
    /// Snapshot or backup ids.
    pub items: Vec<String>,
    pub reasons: Vec<&'static str>,
}

/// What a schedule's retention keeps and deletes; with `dry_run` nothing was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetentionPlan {
    pub schedule: String,
    pub dry_run: bool,
    pub keep: Vec<RunItems>,
    pub delete: Vec<RunItems>,
    /// In a dry run, what the deletions would free and do to the monthly bill.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostPreview>,
}

/// A restore point: a snapshot or a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestorePoint {
    pub kind: &'static str,
    pub id: String,
    pub created_at: String,
    pub age_seconds: i64,
}

/// How well a disk is protected (R11).
#[derive(Debug, Clone, Serialize)]
pub struct DiskStatus {
    pub volume: String,
    pub volume_name: String,
    pub vm: Option<String>,
    /// Schedules aimed at it or at its VM.
    pub schedules: Vec<String>,
    pub newest_restore_point: Option<RestorePoint>,
    /// The shortest interval of its active schedules: its RPO. None: no active schedule.
    pub rpo_seconds: Option<i64>,
    /// The newest restore point is older than the RPO (or there is none while a schedule
    /// promises one).
    pub rpo_exceeded: bool,
    pub next_run_at: Option<String>,
    /// The latest run of one of its schedules failed.
    pub last_run_failed: bool,
    /// ... because it would have taken the tenant over its quota.
    pub over_quota: bool,
}

/// A VM is as protected as its least protected disk.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub vm: String,
    pub vm_name: String,
    pub disks: Vec<String>,
    pub oldest_newest_restore_point: Option<RestorePoint>,
    pub rpo_seconds: Option<i64>,
    pub rpo_exceeded: bool,
    pub last_run_failed: bool,
    pub over_quota: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProtectionStatus {
    pub at: String,
    pub volumes: Vec<DiskStatus>,
    pub vms: Vec<VmStatus>,
}

/// What a hook is told of the snapshot it brackets.
pub(super) fn hook_context(t: &Tenant, volumes: &[Volume], vm: Option<&Vm>, run: Option<&Run>) -> HookContext {
    HookContext {
        phase: Phase::Pre,
        tenant: t.name.clone(),
        vm: vm.map(|vm| vm.id.clone()),
        volumes: volumes.iter().map(|v| v.id.clone()).collect(),
        schedule: run.map(|r| r.schedule.clone()),
        run: run.map(|r| r.id.clone()),
        snapshots: Vec::new(),
    }
}

/// A schedule's retention rules, refused under the request's field name.
fn check_retention(rules: &RetentionRules) -> Result<(), Error> {
    rules.check().map_err(|e| match e {
        Error::Invalid { message, .. } => Error::invalid("retention", message),
        other => other,
    })
}

fn parse_time(text: &str, what: &str) -> Result<Timestamp, Error> {
    text.parse().map_err(|e| Error::Internal(format!("{what} {text:?} is not a time: {e}")))
}

impl Control {
    /// The scheduler's now.
    pub(super) fn clock_now(&self) -> Timestamp {
        self.settings.clock.now()
    }

    /// Hooks are checked when they are set: command hooks run on the daemon's machine as the
    /// daemon's user, so only the administrator may set them; tenants use webhooks.
    fn check_hooks(t: &Tenant, hooks: &Hooks) -> Result<(), Error> {
        for hook in [&hooks.pre, &hooks.post].into_iter().flatten() {
            hook.check().map_err(|e| Error::invalid("hooks", e.to_string()))?;
            if hook.command.is_some() && !t.admin {
                return Err(Error::Forbidden(
                    "command hooks run on the daemon's machine, so only the administrator may set them; use a webhook \
                     (url)"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Runs `take` between the pre and the post hook. A pre hook that succeeds makes the
    /// snapshot application-consistent; one that fails stops here, unless the hooks say to
    /// take a crash-consistent snapshot anyway (the failure is then the returned warning). The
    /// post hook runs whenever the pre hook ran, even if it or `take` failed, so a guest is
    /// never left frozen; its failure is a warning when the snapshot was taken.
    pub(super) async fn around_hooks<T>(
        &self,
        t: &Tenant,
        hooks: Option<&Hooks>,
        mut context: HookContext,
        claimed: Option<Consistency>,
        take: impl AsyncFnOnce(Consistency) -> Result<(T, Vec<String>), Error>,
    ) -> Result<(T, Option<String>), Error> {
        let hooks = hooks.filter(|h| !h.is_empty());
        let Some(hooks) = hooks else {
            return Ok((take(claimed.unwrap_or(Consistency::Crash)).await?.0, None));
        };
        Self::check_hooks(t, hooks)?;
        let mut warnings = Vec::new();
        let mut consistency = Consistency::Application;
        if let Some(pre) = &hooks.pre {
            if let Err(e) = run_hook(pre, &context).await {
                if hooks.on_pre_failure != Some(OnHookFailure::CrashConsistent) {
                    let mut message = format!("{e}; no snapshot was taken");
                    if let Some(post) = &hooks.post {
                        context.phase = Phase::Post;
                        if let Err(post_error) = run_hook(post, &context).await {
                            message.push_str(&format!("; then {post_error}"));
                        }
                    }
                    return Err(Error::Hook(message));
                }
                warnings.push(format!("{e}; the snapshot is crash-consistent"));
                consistency = Consistency::Crash;
            }
        } else {
            // A post hook alone quiesced nothing.
            consistency = claimed.unwrap_or(Consistency::Crash);
        }
        let taken = take(consistency).await;
        if let Some(post) = &hooks.post {
            context.phase = Phase::Post;
            context.snapshots = taken.as_ref().map(|(_, ids)| ids.clone()).unwrap_or_default();
            if let Err(e) = run_hook(post, &context).await {
                warnings.push(e.to_string());
            }
        }
        let (value, _) = taken?;
        Ok((value, (!warnings.is_empty()).then(|| warnings.join("; "))))
    }

    /// The volumes a schedule aims at, and its VM.
    async fn schedule_target(
        &self,
        c: &mut db::Conn,
        t: &Tenant,
        kind: TargetKind,
        target: &str,
    ) -> Result<(Vec<Volume>, Option<Vm>), Error> {
        match kind {
            TargetKind::Volume => Ok((vec![self.volume(c, t, target).await?], None)),
            TargetKind::Vm => {
                let (vm, volumes) = self.vm_disks(c, t, target).await?;
                Ok((volumes, Some(vm)))
            }
        }
    }

    async fn schedule_view(&self, c: &mut db::Conn, schedule: Schedule) -> Result<ScheduleView, Error> {
        let target_name = match schedule.target_kind {
            TargetKind::Volume => db::find_volume(c, &schedule.tenant, &schedule.target).await?.map(|v| v.name),
            TargetKind::Vm => db::find_vm(c, &schedule.tenant, &schedule.target).await?.map(|v| v.name),
        }
        .unwrap_or_default();
        let last_run = db::list_runs(c, Some(&schedule.id), None, 1).await?.pop();
        let interval_seconds = self.interval_of(&schedule)?.as_secs();
        Ok(ScheduleView { schedule, target_name, interval_seconds, last_run })
    }

    fn interval_of(&self, schedule: &Schedule) -> Result<SignedDuration, Error> {
        Ok(schedule.frequency.interval(self.clock_now(), &time_zone(Some(&schedule.time_zone))?))
    }

    /// The next nominal firing strictly after `after`.
    fn next_firing(schedule: &Schedule, after: Timestamp) -> Result<Timestamp, Error> {
        let tz = time_zone(Some(&schedule.time_zone))?;
        schedule
            .frequency
            .next_after(after, &tz)
            .ok_or_else(|| Error::Internal(format!("schedule {} never fires again", schedule.name)))
    }

    pub async fn create_schedule(&self, t: &Tenant, request: CreateSchedule) -> Result<ScheduleView, Error> {
        check_name("name", &request.name)?;
        let frequency: Frequency =
            request.frequency.parse().map_err(|e| Error::invalid("frequency", format!("{e}")))?;
        let tz = time_zone(request.time_zone.as_deref())?;
        check_retention(&request.retention)?;
        let action = request.action.unwrap_or(ScheduleAction::Snapshot);
        if let Some(hooks) = &request.hooks {
            Self::check_hooks(t, hooks)?;
        }
        match (action, &request.copy_to) {
            (ScheduleAction::Backup, _) => {
                self.repository()?;
                if let Some(to) = &request.copy_to {
                    if !self.settings.copy_repositories.contains_key(to) {
                        return Err(Error::invalid("copy_to", format!("no second repository {to:?} is configured")));
                    }
                }
            }
            (ScheduleAction::Snapshot, Some(_)) => {
                return Err(Error::invalid("copy_to", "only a backup schedule copies to a second repository"))
            }
            (ScheduleAction::Snapshot, None) => {}
        }
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        if db::find_schedule(&mut tx, &t.id, &request.name).await?.is_some() {
            return Err(Error::conflict(format!("a schedule named {:?} exists", request.name)));
        }
        let (target_kind, target) = match (&request.volume, &request.vm) {
            (Some(volume), None) => (TargetKind::Volume, self.volume(&mut tx, t, volume).await?.id),
            (None, Some(vm)) => (TargetKind::Vm, self.vm(&mut tx, t, vm).await?.id),
            _ => return Err(Error::invalid("volume", "a schedule aims at a volume or a VM (one of the two)")),
        };
        let now = self.clock_now();
        let mut schedule = Schedule {
            id: new_id(Kind::Schedule),
            tenant: t.id.clone(),
            name: request.name,
            target_kind,
            target,
            action,
            copy_to: request.copy_to,
            frequency,
            time_zone: tz.iana_name().unwrap_or("UTC").to_string(),
            retention: request.retention,
            hooks: request.hooks.filter(|h| !h.is_empty()),
            paused: request.paused,
            next_run_at: String::new(),
            created_at: stamp(now),
        };
        schedule.next_run_at = stamp(Self::next_firing(&schedule, now)?);
        db::insert_schedule(&mut tx, &schedule).await?;
        let view = self.schedule_view(&mut tx, schedule).await?;
        tx.commit().await?;
        self.schedules_changed.notify_one();
        Ok(view)
    }

    /// Schedules aimed at a volume or VM (each by id or name), or all of the tenant's.
    pub async fn list_schedules(
        &self,
        t: &Tenant,
        volume: Option<&str>,
        vm: Option<&str>,
    ) -> Result<Vec<ScheduleView>, Error> {
        let mut c = self.meta.conn().await?;
        let target = match (volume, vm) {
            (Some(_), Some(_)) => return Err(Error::invalid("vm", "filter by a volume or by a VM, not both")),
            (Some(v), None) => Some(self.volume(&mut c, t, v).await?.id),
            (None, Some(vm)) => Some(self.vm(&mut c, t, vm).await?.id),
            (None, None) => None,
        };
        let mut views = Vec::new();
        for schedule in db::list_schedules(&mut c, Some(&t.id), target.as_deref()).await? {
            views.push(self.schedule_view(&mut c, schedule).await?);
        }
        Ok(views)
    }

    async fn schedule(&self, c: &mut db::Conn, t: &Tenant, reference: &str) -> Result<Schedule, Error> {
        db::find_schedule(c, &t.id, reference).await?.ok_or_else(|| Error::not_found("schedule", reference))
    }

    pub async fn get_schedule(&self, t: &Tenant, reference: &str) -> Result<ScheduleView, Error> {
        let mut c = self.meta.conn().await?;
        let schedule = self.schedule(&mut c, t, reference).await?;
        self.schedule_view(&mut c, schedule).await
    }

    /// A schedule's latest runs, oldest first.
    pub async fn list_runs(&self, t: &Tenant, reference: &str) -> Result<Vec<Run>, Error> {
        let mut c = self.meta.conn().await?;
        let schedule = self.schedule(&mut c, t, reference).await?;
        db::list_runs(&mut c, Some(&schedule.id), None, RUNS_SHOWN).await
    }

    /// Pauses or resumes a schedule. A resumed schedule runs next at its next time after now:
    /// the firings it missed while paused are not made up.
    pub async fn set_schedule_paused(&self, t: &Tenant, reference: &str, paused: bool) -> Result<ScheduleView, Error> {
        let mut tx = self.meta.begin().await?;
        let mut schedule = self.schedule(&mut tx, t, reference).await?;
        if schedule.paused != paused {
            schedule.paused = paused;
            if !paused {
                schedule.next_run_at = stamp(Self::next_firing(&schedule, self.clock_now())?);
            }
            db::update_schedule(&mut tx, &schedule).await?;
        }
        let view = self.schedule_view(&mut tx, schedule).await?;
        tx.commit().await?;
        self.schedules_changed.notify_one();
        Ok(view)
    }

    /// Deletes a schedule and its run history. What it made stays, and lives until deleted,
    /// like anything made by hand.
    pub async fn delete_schedule(&self, t: &Tenant, reference: &str) -> Result<String, Error> {
        let mut tx = self.meta.begin().await?;
        let schedule = self.schedule(&mut tx, t, reference).await?;
        if self.active_schedules.lock().expect("schedules lock").contains(&schedule.id) {
            return Err(Error::conflict(format!("schedule {} is running; delete it when the run ends", schedule.name)));
        }
        db::delete_schedule(&mut tx, &schedule.id).await?;
        tx.commit().await?;
        Ok(schedule.id)
    }

    /// Changes a schedule's retention or hooks. A new retention is applied at once, after
    /// saying (with `dry_run`, only saying) what it deletes.
    pub async fn update_schedule(
        &self,
        t: &Tenant,
        reference: &str,
        update: UpdateSchedule,
    ) -> Result<(ScheduleView, Option<RetentionPlan>), Error> {
        if let Some(rules) = &update.retention {
            check_retention(rules)?;
        }
        if let Some(hooks) = &update.hooks {
            Self::check_hooks(t, hooks)?;
        }
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let mut schedule = self.schedule(&mut tx, t, reference).await?;
        let retention_changes = update.retention.is_some();
        if let Some(rules) = update.retention {
            schedule.retention = rules;
        }
        if let Some(hooks) = update.hooks {
            schedule.hooks = Some(hooks).filter(|h| !h.is_empty());
        }
        // Only a retention change deletes anything; new hooks alone leave what exists alone.
        let plan = match retention_changes {
            true => Some(self.retention_plan(&mut tx, &schedule, update.dry_run).await?),
            false => None,
        };
        if update.dry_run {
            let view = self.schedule_view(&mut tx, schedule).await?;
            return Ok((view, plan));
        }
        db::update_schedule(&mut tx, &schedule).await?;
        let engine = match &plan {
            Some(plan) => self.delete_planned(&mut tx, plan).await?,
            None => Vec::new(),
        };
        let view = self.schedule_view(&mut tx, schedule).await?;
        tx.commit().await?;
        drop(_ops);
        self.after_prune(engine).await?;
        Ok((view, plan))
    }

    /// What the schedule's retention keeps and deletes of what it made, run by run (a VM's run
    /// made one item per disk; they stay or go together). Protected items are left out.
    async fn retention_plan(
        &self,
        c: &mut db::Conn,
        schedule: &Schedule,
        dry_run: bool,
    ) -> Result<RetentionPlan, Error> {
        // Each item; a backup's with what forgetting it frees (snapshots are measured together,
        // as a set, below).
        let mut backup_frees: HashMap<String, u64> = HashMap::new();
        let items: Vec<(String, String, String)> = match schedule.action {
            ScheduleAction::Snapshot => db::snapshots_of_schedule(c, &schedule.id)
                .await?
                .into_iter()
                .filter(|s| !s.protected)
                .map(|s| (s.run.unwrap_or_default(), s.id, s.created_at))
                .collect(),
            ScheduleAction::Backup => db::backups_of_schedule(c, &schedule.id)
                .await?
                .into_iter()
                .filter(|b| !b.protected)
                .map(|b| {
                    backup_frees.insert(b.id.clone(), b.frees_bytes());
                    (b.run.unwrap_or_default(), b.id, b.created_at)
                })
                .collect(),
        };
        let mut runs: BTreeMap<String, RunItems> = BTreeMap::new();
        for (run, id, created_at) in items {
            let entry = runs.entry(run.clone()).or_insert_with(|| RunItems {
                run,
                created_at: created_at.clone(),
                items: Vec::new(),
                reasons: Vec::new(),
            });
            entry.created_at = entry.created_at.clone().min(created_at);
            entry.items.push(id);
        }
        let points: Vec<(String, Timestamp)> = runs
            .values()
            .map(|r| Ok((r.run.clone(), parse_time(&r.created_at, "an item's time")?)))
            .collect::<Result<_, Error>>()?;
        let tz = time_zone(Some(&schedule.time_zone))?;
        let (mut keep, mut delete) = (Vec::new(), Vec::new());
        for verdict in schedule.retention.plan(&points, &tz, self.clock_now()) {
            let Some(mut run) = runs.remove(&verdict.id) else { continue };
            run.reasons = verdict.reasons;
            if verdict.keep {
                keep.push(run);
            } else {
                delete.push(run);
            }
        }
        let cost = match dry_run {
            true => {
                let doomed: Vec<&str> = delete.iter().flat_map(|r| r.items.iter().map(String::as_str)).collect();
                let freed = match schedule.action {
                    ScheduleAction::Snapshot => self.freed_by_deleting_snapshots(&doomed)?,
                    ScheduleAction::Backup => doomed.iter().filter_map(|id| backup_frees.get(*id)).sum(),
                };
                Some(self.cost_preview(c, &schedule.tenant, &doomed, freed).await?)
            }
            false => None,
        };
        Ok(RetentionPlan { schedule: schedule.id.clone(), dry_run, keep, delete, cost })
    }

    /// Deletes the rows a retention plan lets go, in the caller's transaction; returns the
    /// engine snapshots to delete after it commits.
    async fn delete_planned(&self, tx: &mut db::Conn, plan: &RetentionPlan) -> Result<Vec<(SnapshotId, bool)>, Error> {
        let mut engine = Vec::new();
        let mut backups = Vec::new();
        for id in plan.delete.iter().flat_map(|r| &r.items) {
            if id.starts_with(Kind::Snapshot.prefix()) {
                if let Some(snapshot) =
                    db::snapshots_of_schedule(tx, &plan.schedule).await?.into_iter().find(|s| &s.id == id)
                {
                    engine.extend(self.delete_snapshot_rows(tx, &[snapshot]).await?);
                }
            } else if let Some(backup) =
                db::backups_of_schedule(tx, &plan.schedule).await?.into_iter().find(|b| &b.id == id)
            {
                backups.push(backup);
            }
        }
        if !backups.is_empty() {
            db::delete_backups(tx, &backups, &stamp(self.clock_now())).await?;
            self.forget_checkpoints(&backups);
        }
        Ok(engine)
    }

    /// After a prune commits: its engine snapshots go, and deleted backups' records.
    async fn after_prune(&self, engine: Vec<(SnapshotId, bool)>) -> Result<(), Error> {
        self.delete_engine_snapshots(engine)?;
        if self.repo.is_some() {
            self.forget_pending().await?;
        }
        Ok(())
    }

    /// Starts a run of a schedule now, whatever its times (it does not move them); the run
    /// goes on in the background.
    pub async fn run_schedule_now(self: &Arc<Self>, t: &Tenant, reference: &str) -> Result<Run, Error> {
        let mut tx = self.meta.begin().await?;
        let schedule = self.schedule(&mut tx, t, reference).await?;
        if !self.active_schedules.lock().expect("schedules lock").insert(schedule.id.clone()) {
            return Err(Error::conflict(format!("schedule {} is running already", schedule.name)));
        }
        let now = stamp(self.clock_now());
        let run = Run { manual: true, ..self.new_run(&schedule, now.clone(), now, false) };
        let inserted = db::insert_run(&mut tx, &run).await;
        let committed = match inserted {
            Ok(true) => tx.commit().await.map_err(Error::from),
            Ok(false) => Err(Error::conflict("a run of this schedule started this very millisecond")),
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            self.active_schedules.lock().expect("schedules lock").remove(&schedule.id);
            return Err(e);
        }
        let started = run.clone();
        self.spawn_run(schedule, run);
        Ok(started)
    }

    fn new_run(&self, schedule: &Schedule, due_at: String, started_at: String, late: bool) -> Run {
        Run {
            id: new_id(Kind::Run),
            schedule: schedule.id.clone(),
            tenant: schedule.tenant.clone(),
            due_at,
            started_at,
            finished_at: None,
            state: RunState::Running,
            stage: RunStage::Started,
            late,
            manual: false,
            consistency: None,
            job: None,
            bytes: 0,
            pruned: 0,
            error: None,
            warning: None,
        }
    }

    /// The delay after a firing at which its run starts: fixed per schedule and firing (so a
    /// restart does not move it), at most the configured jitter and a tenth of the interval.
    fn jitter(&self, schedule: &Schedule, due: Timestamp) -> Result<SignedDuration, Error> {
        let max = SignedDuration::try_from(self.settings.scheduler.max_jitter).unwrap_or(SignedDuration::MAX);
        let cap = max.min(schedule.frequency.interval(due, &time_zone(Some(&schedule.time_zone))?) / 10);
        let cap_ms = cap.as_millis();
        if cap_ms <= 0 {
            return Ok(SignedDuration::ZERO);
        }
        let seed = blake3::hash(format!("{}@{}", schedule.id, due.as_second()).as_bytes());
        let draw = u64::from_le_bytes(seed.as_bytes()[..8].try_into().expect("8 bytes"));
        Ok(SignedDuration::from_millis((draw % cap_ms as u64) as i64))
    }

    /// Claims every run due by the scheduler's now, in one transaction: each is recorded and
    /// its schedule's next run moves past now, so downtime makes one late run, not one per
    /// missed firing. Also returns when the next claim may be due.
    async fn claim_due_runs(&self) -> Result<(Vec<(Schedule, Run)>, Timestamp), Error> {
        let now = self.clock_now();
        let mut wake = now + LONGEST_NAP;
        let mut tx = self.meta.begin().await?;
        let mut claimed = Vec::new();
        for mut schedule in db::schedules_due(&mut tx, &stamp(now)).await? {
            let nominal = parse_time(&schedule.next_run_at, "a schedule's next run")?;
            let ready_at = nominal + self.jitter(&schedule, nominal)?;
            if ready_at > now {
                wake = wake.min(ready_at);
                continue;
            }
            if self.active_schedules.lock().expect("schedules lock").contains(&schedule.id) {
                // Its previous run is still going; this one starts when that ends, late.
                continue;
            }
            // The run stands for the latest firing not after now.
            let mut due = nominal;
            loop {
                let next = Self::next_firing(&schedule, due)?;
                if next > now {
                    break;
                }
                due = next;
            }
            let late = due != nominal || now > ready_at + LATE_AFTER;
            let run = self.new_run(&schedule, stamp(due), stamp(now), late);
            let fresh = db::insert_run(&mut tx, &run).await?;
            schedule.next_run_at = stamp(Self::next_firing(&schedule, now)?);
            db::update_schedule(&mut tx, &schedule).await?;
            if fresh {
                claimed.push((schedule, run));
            }
        }
        tx.commit().await?;
        if let Some(soonest) = db::soonest_next_run(&mut *self.meta.conn().await?).await? {
            wake = wake.min(parse_time(&soonest, "a schedule's next run")?);
        }
        let mut active = self.active_schedules.lock().expect("schedules lock");
        for (schedule, _) in &claimed {
            active.insert(schedule.id.clone());
        }
        Ok((claimed, wake))
    }

    /// Runs a restart interrupted, to resume (once per process), marked late.
    async fn interrupted_runs(&self) -> Result<Vec<(Schedule, Run)>, Error> {
        if self.runs_resumed.swap(true, Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let mut c = self.meta.conn().await?;
        let mut resumed = Vec::new();
        for run in db::list_runs(&mut c, None, Some(RunState::Running), i64::MAX).await? {
            let Some(schedule) = db::schedule_by_id(&mut c, &run.schedule).await? else { continue };
            if self.active_schedules.lock().expect("schedules lock").insert(schedule.id.clone()) {
                resumed.push((schedule, Run { late: true, ..run }));
            }
        }
        Ok(resumed)
    }

    /// One pass of the scheduler: resumes interrupted runs, claims the due ones and starts
    /// them (each waits for a free slot). Returns the started runs and when to look again.
    async fn scheduler_pass(self: &Arc<Self>) -> Result<(Vec<tokio::task::JoinHandle<Run>>, Timestamp), Error> {
        let mut runs = self.interrupted_runs().await?;
        let (claimed, wake) = self.claim_due_runs().await?;
        runs.extend(claimed);
        let handles = runs.into_iter().map(|(schedule, run)| self.spawn_run(schedule, run)).collect();
        Ok((handles, wake))
    }

    fn spawn_run(self: &Arc<Self>, schedule: Schedule, run: Run) -> tokio::task::JoinHandle<Run> {
        let control = self.clone();
        let handle = tokio::spawn(async move { control.execute_run(schedule, run).await });
        let mut tasks = self.run_tasks.lock().expect("run tasks lock");
        tasks.retain(|task| !task.is_finished());
        tasks.push(handle.abort_handle());
        handle
    }

    /// For a shutdown: waits up to `grace` for runs in progress to end, then cuts the rest
    /// short (a cut hook's processes are killed); they resume at the next start.
    pub async fn stop_runs(&self, grace: std::time::Duration) {
        let wait_all = async {
            loop {
                let ended = self.job_ended.notified();
                if self.active_schedules.lock().expect("schedules lock").is_empty() {
                    return;
                }
                ended.await;
            }
        };
        if tokio::time::timeout(grace, wait_all).await.is_err() {
            let tasks = std::mem::take(&mut *self.run_tasks.lock().expect("run tasks lock"));
            for task in &tasks {
                task.abort();
            }
            // An aborted task lets go of what it holds when it is next polled.
            for task in tasks {
                while !task.is_finished() {
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    /// Runs whatever is due by the scheduler's clock and waits for those runs to end: what
    /// the daemon's scheduler does on each wake-up, for tests that move the clock by hand.
    pub async fn run_due_schedules(self: &Arc<Self>) -> Result<Vec<Run>, Error> {
        let (handles, _) = self.scheduler_pass().await?;
        let mut runs = Vec::with_capacity(handles.len());
        for handle in handles {
            runs.push(handle.await.map_err(|e| Error::Internal(format!("a scheduled run panicked: {e}")))?);
        }
        self.sync_meters().await?;
        Ok(runs)
    }

    /// The daemon's scheduler: passes over the schedules whenever one may be due, until
    /// `shutdown`; then [`Self::stop_runs`] ends the runs in progress.
    pub async fn run_scheduler(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let meter = self.clone();
        let metering = tokio::spawn(async move {
            loop {
                meter.meter_wanted.notified().await;
                if let Err(e) = meter.sync_meters().await {
                    eprintln!("cairn: metering after scheduled runs: {e}");
                }
                // Runs that end meanwhile wait for the next sync: one a second at most, so a
                // burst of runs costs a sync a second rather than one each.
                tokio::time::sleep(METER_CATCH_UP).await;
            }
        });
        let _stop_metering = AbortOnDrop(metering);
        loop {
            let changed = self.schedules_changed.notified();
            let wake = match self.scheduler_pass().await {
                Ok((_, wake)) => wake,
                Err(e) => {
                    eprintln!("cairn: scheduler: {e}");
                    self.clock_now() + LONGEST_NAP
                }
            };
            let nap = wake.duration_since(self.clock_now()).clamp(SignedDuration::from_millis(10), LONGEST_NAP);
            let nap = std::time::Duration::try_from(nap).unwrap_or(std::time::Duration::from_secs(1));
            tokio::select! {
                _ = &mut shutdown => {
                    if let Err(e) = self.sync_meters().await {
                        eprintln!("cairn: metering at shutdown: {e}");
                    }
                    return;
                }
                _ = changed => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Carries out a run to its end and records how it ended; never fails (its failure is
    /// the run's). Waits for a free slot first.
    async fn execute_run(self: Arc<Self>, schedule: Schedule, mut run: Run) -> Run {
        let permit = self.run_slots.clone().acquire_owned().await;
        let working = self.runs_working.fetch_add(1, Ordering::SeqCst) + 1;
        self.runs_working_peak.fetch_max(working, Ordering::SeqCst);
        let outcome = self.run_steps(&schedule, &mut run).await;
        self.runs_working.fetch_sub(1, Ordering::SeqCst);
        drop(permit);
        run.finished_at = Some(stamp(self.clock_now()));
        run.stage = RunStage::Done;
        match outcome {
            Ok(()) => run.state = RunState::Succeeded,
            Err(e) => {
                run.state = RunState::Failed;
                run.error = Some(e.to_string());
            }
        }
        let recorded = async {
            let mut c = self.meta.conn().await?;
            db::update_run(&mut c, &run).await
        };
        if let Err(e) = recorded.await {
            eprintln!("cairn: recording the end of run {}: {e}", run.id);
        }
        // Thousands of runs may end in a minute: the meter catches up with them together.
        self.meter_wanted.notify_one();
        self.active_schedules.lock().expect("schedules lock").remove(&schedule.id);
        // A run that ends may let a waiting one of the same schedule start, or a shutdown end.
        self.schedules_changed.notify_one();
        self.job_ended.notify_waiters();
        run
    }

    async fn run_steps(self: &Arc<Self>, schedule: &Schedule, run: &mut Run) -> Result<(), Error> {
        let mut c = self.meta.conn().await?;
        let tenant = db::tenant_by_id(&mut c, &schedule.tenant)
            .await?
            .ok_or_else(|| Error::Internal(format!("schedule {}'s tenant is gone", schedule.name)))?;
        let (volumes, vm) = self.schedule_target(&mut c, &tenant, schedule.target_kind, &schedule.target).await?;
        // Whatever a run committed before a restart counts: it is not made again.
        let (snapshots, backups) = db::items_of_run(&mut c, &run.id).await?;
        drop(c);
        if !snapshots.is_empty() || !backups.is_empty() {
            run.stage = RunStage::Taken;
        }
        match schedule.action {
            ScheduleAction::Snapshot => {
                if run.stage == RunStage::Started {
                    let request = SnapshotRequest { name: None, consistency: None, hooks: schedule.hooks.clone() };
                    let views = self.hooked_snapshots(&tenant, &volumes, vm.as_ref(), &request, Some(run)).await?;
                    run.stage = RunStage::Taken;
                    run.consistency = views.first().map(|v| v.snapshot.consistency);
                    run.bytes = views.iter().map(|v| v.exclusive_bytes).sum();
                    run.warning = views.first().and_then(|v| v.warnings.first().cloned());
                }
            }
            ScheduleAction::Backup => self.back_up_for_run(&tenant, schedule, &volumes, vm.as_ref(), run).await?,
        }
        let _ops = self.ops.lock().await;
        let mut tx = self.meta.begin().await?;
        let plan = self.retention_plan(&mut tx, schedule, false).await?;
        let engine = self.delete_planned(&mut tx, &plan).await?;
        run.pruned = plan.delete.iter().map(|r| r.items.len() as u64).sum();
        tx.commit().await?;
        drop(_ops);
        self.after_prune(engine).await
    }

    /// A backup run: the backup (between the hooks) unless a restart found it made, then its
    /// copy to the schedule's second repository.
    async fn back_up_for_run(
        self: &Arc<Self>,
        tenant: &Tenant,
        schedule: &Schedule,
        volumes: &[Volume],
        vm: Option<&Vm>,
        run: &mut Run,
    ) -> Result<(), Error> {
        let (volume, vm_reference) = match schedule.target_kind {
            TargetKind::Volume => (Some(schedule.target.as_str()), None),
            TargetKind::Vm => (None, Some(schedule.target.as_str())),
        };
        let mut backups = db::items_of_run(&mut *self.meta.conn().await?, &run.id).await?.1;
        if backups.is_empty() {
            // A job running in this process is waited for; one a restart interrupted failed,
            // and the backup is made again.
            let in_flight = run.job.clone().filter(|job| self.jobs.lock().expect("jobs lock").contains_key(job));
            let job = match in_flight {
                Some(job) => job,
                None => {
                    let context = hook_context(tenant, volumes, vm, Some(run));
                    let taking = run.clone();
                    let ((job, consistency), warning) = self
                        .around_hooks(tenant, schedule.hooks.as_ref(), context, None, async |consistency| {
                            let run = Run { consistency: Some(consistency), ..taking };
                            let job = self.begin_backup(tenant, volume, vm_reference, None, Some(&run)).await?;
                            Ok(((job.job.id, consistency), Vec::new()))
                        })
                        .await?;
                    run.warning = warning;
                    run.consistency = Some(consistency);
                    job
                }
            };
            run.stage = RunStage::Taken;
            run.job = Some(job.clone());
            let ended = self.wait_for_job(&tenant.id, &job).await?;
            if ended.state == JobState::Failed {
                return Err(Error::Internal(format!(
                    "backup job {job} failed: {}",
                    ended.error.unwrap_or_else(|| "no reason given".into())
                )));
            }
            backups = db::items_of_run(&mut *self.meta.conn().await?, &run.id).await?.1;
        }
        run.consistency = run.consistency.or(Some(Consistency::Crash));
        run.bytes = backups.iter().map(|b| b.bytes_added).sum();
        if let Some(to) = &schedule.copy_to {
            let source = self.repository()?;
            let dest = self.repository_named(to).await?;
            let mut c = self.meta.conn().await?;
            let pending: Vec<Backup> = self
                .with_copies(&mut c, backups)
                .await?
                .into_iter()
                .filter(|b| !b.copies.iter().any(|r| r == to))
                .collect();
            drop(c);
            let progress = Arc::new(Progress::new(0));
            self.copy_all(&source, &dest, to, pending, &progress).await.map_err(|(e, _)| Error::Internal(e))?;
        }
        Ok(())
    }

    /// Waits for a job to end and returns it as it ended.
    async fn wait_for_job(&self, tenant: &str, id: &str) -> Result<Job, Error> {
        loop {
            let ended = self.job_ended.notified();
            let running = self.jobs.lock().expect("jobs lock").contains_key(id);
            if !running {
                return db::find_job(&mut *self.meta.conn().await?, tenant, id)
                    .await?
                    .ok_or_else(|| Error::Internal(format!("job {id} is gone")));
            }
            ended.await;
        }
    }

    /// Each disk's and VM's protection (R11) at the scheduler's now: its schedules, its newest
    /// restore point and that point's age against the shortest interval of its active
    /// schedules. Filtered to one volume or VM when asked.
    pub async fn protection_status(
        &self,
        t: &Tenant,
        volume: Option<&str>,
        vm: Option<&str>,
    ) -> Result<ProtectionStatus, Error> {
        let now = self.clock_now();
        let mut c = self.meta.conn().await?;
        let only_volume = match volume {
            Some(v) => Some(self.volume(&mut c, t, v).await?.id),
            None => None,
        };
        let only_vm = match vm {
            Some(v) => Some(self.vm(&mut c, t, v).await?.id),
            None => None,
        };
        let schedules = db::list_schedules(&mut c, Some(&t.id), None).await?;
        let snapshots = db::list_snapshots(&mut c, Some(&t.id), None, None).await?;
        let backups = db::list_backups(&mut c, Some(&t.id), None, None).await?;
        let mut last_runs: HashMap<String, Run> = HashMap::new();
        for schedule in &schedules {
            if let Some(run) = db::list_runs(&mut c, Some(&schedule.id), None, 1).await?.pop() {
                last_runs.insert(schedule.id.clone(), run);
            }
        }
        let vms: HashMap<String, Vm> =
            db::list_vms(&mut c, Some(&t.id)).await?.into_iter().map(|v| (v.id.clone(), v)).collect();
        let volumes = db::list_volumes(&mut c, Some(&t.id), None).await?;
        drop(c);
        let mut status = ProtectionStatus { at: stamp(now), volumes: Vec::new(), vms: Vec::new() };
        for volume in &volumes {
            if only_volume.as_ref().is_some_and(|v| v != &volume.id) || only_vm.is_some() && only_vm != volume.vm {
                continue;
            }
            let aimed: Vec<&Schedule> =
                schedules.iter().filter(|s| s.target == volume.id || Some(&s.target) == volume.vm.as_ref()).collect();
            let mut newest: Option<RestorePoint> = None;
            let points = snapshots
                .iter()
                .filter(|s| s.volume == volume.id)
                .map(|s| ("snapshot", &s.id, &s.created_at))
                .chain(backups.iter().filter(|b| b.volume == volume.id).map(|b| ("backup", &b.id, &b.created_at)));
            for (kind, id, created_at) in points {
                if newest.as_ref().is_none_or(|n| created_at > &n.created_at) {
                    let age = now.duration_since(parse_time(created_at, "a restore point's time")?).as_secs();
                    newest =
                        Some(RestorePoint { kind, id: id.clone(), created_at: created_at.clone(), age_seconds: age });
                }
            }
            let active: Vec<&&Schedule> = aimed.iter().filter(|s| !s.paused).collect();
            let mut rpo: Option<i64> = None;
            for schedule in &active {
                let interval = self.interval_of(schedule)?.as_secs();
                rpo = Some(rpo.map_or(interval, |r| r.min(interval)));
            }
            // A disk's first firing has not come yet: its RPO starts counting at its schedule.
            let oldest_schedule = active.iter().map(|s| s.created_at.as_str()).min();
            let rpo_exceeded = match (rpo, &newest, oldest_schedule) {
                (Some(rpo), Some(point), _) => point.age_seconds > rpo,
                (Some(rpo), None, Some(since)) => {
                    now.duration_since(parse_time(since, "a schedule's time")?).as_secs() > rpo
                }
                _ => false,
            };
            let failed: Vec<&Run> =
                aimed.iter().filter_map(|s| last_runs.get(&s.id)).filter(|r| r.state == RunState::Failed).collect();
            let last_run_failed = !failed.is_empty();
            let over_quota =
                failed.iter().any(|r| r.error.as_deref().is_some_and(|e| e.contains(crate::metering::OVER_QUOTA)));
            status.volumes.push(DiskStatus {
                volume: volume.id.clone(),
                volume_name: volume.name.clone(),
                vm: volume.vm.clone(),
                schedules: aimed.iter().map(|s| s.id.clone()).collect(),
                newest_restore_point: newest,
                rpo_seconds: rpo,
                rpo_exceeded,
                next_run_at: active.iter().map(|s| s.next_run_at.clone()).min(),
                last_run_failed,
                over_quota,
            });
        }
        let mut seen = HashSet::new();
        for disk in &status.volumes {
            let Some(vm_id) = &disk.vm else { continue };
            if !seen.insert(vm_id.clone()) {
                continue;
            }
            let disks: Vec<&DiskStatus> = status.volumes.iter().filter(|d| d.vm.as_ref() == Some(vm_id)).collect();
            // The VM's point is its least recent disk's newest; none if a disk has none.
            let oldest_newest = disks
                .iter()
                .map(|d| d.newest_restore_point.clone())
                .collect::<Option<Vec<_>>>()
                .and_then(|points| points.into_iter().max_by_key(|p| p.age_seconds));
            status.vms.push(VmStatus {
                vm: vm_id.clone(),
                vm_name: vms.get(vm_id).map(|v| v.name.clone()).unwrap_or_default(),
                disks: disks.iter().map(|d| d.volume.clone()).collect(),
                oldest_newest_restore_point: oldest_newest,
                rpo_seconds: disks.iter().filter_map(|d| d.rpo_seconds).min(),
                rpo_exceeded: disks.iter().any(|d| d.rpo_exceeded),
                last_run_failed: disks.iter().any(|d| d.last_run_failed),
                over_quota: disks.iter().any(|d| d.over_quota),
            });
        }
        Ok(status)
    }

    /// Protection of every tenant's disks, for metrics.
    pub async fn protection_of_all(&self) -> Result<Vec<(Tenant, ProtectionStatus)>, Error> {
        let tenants = db::list_tenants(&mut *self.meta.conn().await?).await?;
        let mut all = Vec::with_capacity(tenants.len());
        for tenant in tenants {
            let status = self.protection_status(&tenant, None, None).await?;
            all.push((tenant, status));
        }
        Ok(all)
    }

    /// The most runs that did their work at once since the start (bounded by
    /// [`SchedulerOptions::max_concurrent_runs`]).
    pub fn peak_concurrent_runs(&self) -> usize {
        self.runs_working_peak.load(Ordering::SeqCst)
    }

    /// Runs recorded, by state, for metrics.
    pub async fn run_counts(&self) -> Result<Vec<(String, u64)>, Error> {
        db::count_runs(&mut *self.meta.conn().await?).await
    }
}
