//! Schedules driven by a hand-set clock: which snapshots and backups exist after each step,
//! through daylight-saving changes, short months, downtime and restarts; retention per
//! schedule; hooks; protection status.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_control::clock::ManualClock;
use cairn_control::hooks::Hook;
use cairn_control::metering::Quota;
use cairn_control::model::*;
use cairn_control::names::SizeArg;
use cairn_control::retention::RetentionRules;
use cairn_control::{
    Control, CreateSchedule, Error, RepoLocation, SchedulerOptions, Settings, SnapshotRequest, UpdateSchedule,
};
use jiff::{SignedDuration, Timestamp};

fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

struct World {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    control: Arc<Control>,
    admin: Tenant,
}

fn settings(dir: &Path, clock: &Arc<ManualClock>, jitter: Duration) -> Settings {
    Settings {
        clock: clock.clone(),
        scheduler: SchedulerOptions { max_concurrent_runs: 4, max_jitter: jitter },
        backup_repository: Some(RepoLocation::Dir(dir.join("repo"))),
        copy_repositories: [("offsite".to_string(), RepoLocation::Dir(dir.join("offsite")))].into(),
        ..Settings::in_dir(dir)
    }
}

impl World {
    async fn new(start: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(at(start)));
        let (control, _) = Control::open_dir(settings(dir.path(), &clock, Duration::ZERO)).await.unwrap();
        let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
        let admin = control.authenticate(token.trim()).await.unwrap();
        World { dir, clock, control, admin }
    }

    /// Closes the control plane and opens it again on the same directory and clock, as a
    /// daemon restart does.
    async fn restart(self) -> World {
        let World { dir, clock, control, admin } = self;
        control.close().await;
        // The engine's lock goes with the last reference to the old control plane.
        assert_eq!(Arc::strong_count(&control), 1, "nothing still holds the old control plane");
        drop(control);
        let (control, _) = Control::open_dir(settings(dir.path(), &clock, Duration::ZERO)).await.unwrap();
        World { dir, clock, control, admin }
    }

    async fn volume(&self, name: &str) -> String {
        self.control.create_volume(&self.admin, name, &SizeArg::Text("4M".into()), None).await.unwrap().volume.id
    }

    async fn schedule(&self, name: &str, volume: &str, frequency: &str, zone: &str, keep_last: u32) -> String {
        let request = CreateSchedule {
            name: name.into(),
            volume: Some(volume.into()),
            vm: None,
            action: None,
            copy_to: None,
            frequency: frequency.into(),
            time_zone: Some(zone.into()),
            retention: RetentionRules { keep_last: Some(keep_last), ..Default::default() },
            hooks: None,
            paused: false,
        };
        self.control.create_schedule(&self.admin, request).await.unwrap().schedule.id
    }

    /// Moves the clock from now to `until` in `step`s, running what is due at each; returns
    /// the runs made, in order.
    async fn walk(&self, until: &str, step: SignedDuration) -> Vec<Run> {
        let until = at(until);
        let mut runs = Vec::new();
        loop {
            runs.extend(self.control.run_due_schedules().await.unwrap());
            let now = self.clock.now_for_test();
            if now >= until {
                return runs;
            }
            self.clock.set((now + step).min(until));
        }
    }

    /// The snapshots of `schedule`, by creation time.
    async fn snapshot_times(&self, schedule: &str) -> Vec<String> {
        let all = self.control.list_snapshots(&self.admin, None, None).await.unwrap();
        all.into_iter()
            .filter(|s| s.snapshot.schedule.as_deref() == Some(schedule))
            .map(|s| s.snapshot.created_at)
            .collect()
    }
}

trait NowForTest {
    fn now_for_test(&self) -> Timestamp;
}

impl NowForTest for ManualClock {
    fn now_for_test(&self) -> Timestamp {
        cairn_control::clock::Clock::now(self)
    }
}

fn due_times(runs: &[Run], schedule: &str) -> Vec<String> {
    runs.iter().filter(|r| r.schedule == schedule).map(|r| r.due_at.clone()).collect()
}

#[tokio::test]
async fn daily_runs_through_berlin_daylight_saving_changes_keep_the_latest_n() {
    let w = World::new("2026-03-27T00:00:00Z").await;
    let volume = w.volume("db").await;
    // 02:30 does not exist on 29 March (clocks jump 02:00 → 03:00) and happens twice on
    // 25 October: it fires at the jump, and once at the first 02:30.
    let s = w.schedule("nightly", &volume, "daily 02:30", "Europe/Berlin", 3).await;
    let runs = w.walk("2026-03-31T12:00:00Z", SignedDuration::from_mins(30)).await;
    assert_eq!(
        due_times(&runs, &s),
        [
            "2026-03-27T01:30:00.000Z",
            "2026-03-28T01:30:00.000Z",
            "2026-03-29T01:00:00.000Z",
            "2026-03-30T00:30:00.000Z",
            "2026-03-31T00:30:00.000Z",
        ]
    );
    assert!(runs.iter().all(|r| r.state == RunState::Succeeded && !r.late), "{runs:#?}");
    // Keep 3: the three newest runs' snapshots, dated by the clock at each run.
    assert_eq!(
        w.snapshot_times(&s).await,
        ["2026-03-29T01:00:00.000Z", "2026-03-30T00:30:00.000Z", "2026-03-31T00:30:00.000Z"]
    );
    assert_eq!(runs.iter().map(|r| r.pruned).sum::<u64>(), 2);

    w.clock.set(at("2026-10-23T12:00:00Z"));
    // Re-align: the schedule's next run was due long ago; one late run stands for them all.
    let caught_up = w.control.run_due_schedules().await.unwrap();
    assert_eq!(caught_up.len(), 1);
    assert!(caught_up[0].late);
    assert_eq!(caught_up[0].due_at, "2026-10-23T00:30:00.000Z");
    let runs = w.walk("2026-10-27T12:00:00Z", SignedDuration::from_mins(15)).await;
    assert_eq!(
        due_times(&runs, &s),
        [
            "2026-10-24T00:30:00.000Z",
            // The first 02:30, still in summer time (UTC+2).
            "2026-10-25T00:30:00.000Z",
            "2026-10-26T01:30:00.000Z",
            "2026-10-27T01:30:00.000Z",
        ]
    );
}

#[tokio::test]
async fn new_york_daylight_saving_changes() {
    let w = World::new("2026-03-06T12:00:00Z").await;
    let volume = w.volume("web").await;
    let s = w.schedule("nightly", &volume, "daily 02:30", "America/New_York", 10).await;
    let runs = w.walk("2026-03-10T12:00:00Z", SignedDuration::from_mins(20)).await;
    assert_eq!(
        due_times(&runs, &s),
        [
            "2026-03-07T07:30:00.000Z",
            // 8 March 02:00 EST jumps to 03:00 EDT: 02:30 fires at the jump, 07:00 UTC.
            "2026-03-08T07:00:00.000Z",
            "2026-03-09T06:30:00.000Z",
            "2026-03-10T06:30:00.000Z",
        ]
    );
    w.clock.set(at("2026-10-30T12:00:00Z"));
    w.control.run_due_schedules().await.unwrap();
    let runs = w.walk("2026-11-03T12:00:00Z", SignedDuration::from_mins(20)).await;
    assert_eq!(
        due_times(&runs, &s),
        [
            "2026-10-31T06:30:00.000Z",
            // 1 November: 01:00–02:00 happens twice, 02:30 once (EST).
            "2026-11-01T07:30:00.000Z",
            "2026-11-02T07:30:00.000Z",
            "2026-11-03T07:30:00.000Z",
        ]
    );
}

#[tokio::test]
async fn monthly_on_day_31_runs_on_each_months_last_day() {
    let w = World::new("2026-01-01T00:00:00Z").await;
    let volume = w.volume("ledger").await;
    let s = w.schedule("month-end", &volume, "monthly 31 23:00", "UTC", 12).await;
    let runs = w.walk("2027-01-01T00:00:00Z", SignedDuration::from_hours(12)).await;
    let days: Vec<String> = due_times(&runs, &s).iter().map(|d| d[..10].to_string()).collect();
    assert_eq!(
        days,
        [
            "2026-01-31",
            "2026-02-28",
            "2026-03-31",
            "2026-04-30",
            "2026-05-31",
            "2026-06-30",
            "2026-07-31",
            "2026-08-31",
            "2026-09-30",
            "2026-10-31",
            "2026-11-30",
            "2026-12-31",
        ]
    );
    assert_eq!(w.snapshot_times(&s).await.len(), 12);
}

#[tokio::test]
async fn several_schedules_per_disk_each_prune_only_their_own() {
    let w = World::new("2026-06-01T00:00:00Z").await;
    let volume = w.volume("app").await;
    let manual = w
        .control
        .snapshot_volume(
            &w.admin,
            &volume,
            &SnapshotRequest { name: Some("before-upgrade".into()), ..Default::default() },
        )
        .await
        .unwrap();
    let daily = w.schedule("daily", &volume, "daily 03:00", "UTC", 7).await;
    let weekly = w.schedule("weekly", &volume, "weekly sun 06:00", "UTC", 4).await;
    let cron = w.schedule("six-hourly", &volume, "cron 0 */6 * * *", "UTC", 2).await;
    // Protect the first daily snapshot: retention passes it by.
    w.walk("2026-06-01T12:00:00Z", SignedDuration::from_hours(1)).await;
    let first_daily = w.control.list_snapshots(&w.admin, Some(&volume), None).await.unwrap();
    let first_daily = first_daily.iter().find(|s| s.snapshot.schedule.as_deref() == Some(daily.as_str())).unwrap();
    w.control
        .set_protected(&w.admin, cairn_control::names::Kind::Snapshot, &first_daily.snapshot.id, true)
        .await
        .unwrap();
    let runs = w.walk("2026-07-31T12:00:00Z", SignedDuration::from_hours(6)).await;
    assert!(runs.iter().all(|r| r.state == RunState::Succeeded), "{runs:#?}");
    assert_eq!(w.snapshot_times(&daily).await.len(), 7 + 1, "7 kept, plus the protected one");
    assert_eq!(
        w.snapshot_times(&weekly).await,
        [
            "2026-07-05T06:00:00.000Z",
            "2026-07-12T06:00:00.000Z",
            "2026-07-19T06:00:00.000Z",
            "2026-07-26T06:00:00.000Z"
        ]
    );
    assert_eq!(w.snapshot_times(&cron).await, ["2026-07-31T06:00:00.000Z", "2026-07-31T12:00:00.000Z"]);
    let left = w.control.list_snapshots(&w.admin, Some(&volume), None).await.unwrap();
    assert!(left.iter().any(|s| s.snapshot.id == manual.snapshot.id), "manual snapshots are never pruned");
    assert!(left.iter().any(|s| s.snapshot.id == first_daily.snapshot.id), "protected snapshots stay");
    // A protected snapshot is not deleted by hand either, until unprotected.
    let refused = w.control.delete_snapshot(&w.admin, &first_daily.snapshot.id).await.unwrap_err();
    assert!(refused.to_string().contains("protected"), "{refused}");
}

#[tokio::test]
async fn downtime_makes_one_late_run_and_a_restart_does_not_repeat_a_run() {
    let w = World::new("2026-05-01T00:00:00Z").await;
    let volume = w.volume("db").await;
    let s = w.schedule("nightly", &volume, "daily 03:00", "UTC", 30).await;
    let runs = w.walk("2026-05-01T06:00:00Z", SignedDuration::from_hours(1)).await;
    assert_eq!(runs.len(), 1);
    // Down from 1 May 06:00 to 5 May 10:00: four firings missed.
    let w = w.restart().await;
    w.clock.set(at("2026-05-05T10:00:00Z"));
    let runs = w.control.run_due_schedules().await.unwrap();
    assert_eq!(runs.len(), 1, "missed runs are made up once: {runs:#?}");
    assert!(runs[0].late);
    assert_eq!(runs[0].due_at, "2026-05-05T03:00:00.000Z");
    assert_eq!(w.snapshot_times(&s).await.len(), 2);
    // Restarting again and passing over the same instant makes nothing more.
    let w = w.restart().await;
    assert!(w.control.run_due_schedules().await.unwrap().is_empty());
    let schedule = w.control.get_schedule(&w.admin, &s).await.unwrap();
    assert_eq!(schedule.schedule.next_run_at, "2026-05-06T03:00:00.000Z");
    assert_eq!(w.control.list_runs(&w.admin, &s).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_paused_schedule_makes_nothing_and_resumes_without_making_up() {
    let w = World::new("2026-05-01T00:00:00Z").await;
    let volume = w.volume("db").await;
    let s = w.schedule("nightly", &volume, "daily 03:00", "UTC", 30).await;
    w.control.set_schedule_paused(&w.admin, &s, true).await.unwrap();
    assert!(w.walk("2026-05-04T00:00:00Z", SignedDuration::from_hours(3)).await.is_empty());
    let resumed = w.control.set_schedule_paused(&w.admin, &s, false).await.unwrap();
    assert_eq!(resumed.schedule.next_run_at, "2026-05-04T03:00:00.000Z");
    let runs = w.walk("2026-05-04T04:00:00Z", SignedDuration::from_hours(1)).await;
    assert_eq!(due_times(&runs, &s), ["2026-05-04T03:00:00.000Z"]);
    assert!(!runs[0].late);
}

#[tokio::test]
async fn a_retention_change_shows_what_it_would_delete_before_it_does() {
    let w = World::new("2026-05-01T00:00:00Z").await;
    let volume = w.volume("db").await;
    let s = w.schedule("nightly", &volume, "daily 03:00", "UTC", 5).await;
    w.walk("2026-05-05T12:00:00Z", SignedDuration::from_hours(3)).await;
    assert_eq!(w.snapshot_times(&s).await.len(), 5);
    let keep_two = RetentionRules { keep_last: Some(2), ..Default::default() };
    let (_, plan) = w
        .control
        .update_schedule(&w.admin, &s, UpdateSchedule { retention: Some(keep_two.clone()), hooks: None, dry_run: true })
        .await
        .unwrap();
    let plan = plan.unwrap();
    assert!(plan.cost.is_some(), "a dry run says what it would do to the bill");
    assert_eq!(plan.delete.len(), 3);
    assert_eq!(plan.keep.len(), 2);
    assert_eq!(w.snapshot_times(&s).await.len(), 5, "a dry run deletes nothing");
    assert_eq!(w.control.get_schedule(&w.admin, &s).await.unwrap().schedule.retention.keep_last, Some(5));
    let (view, _) = w
        .control
        .update_schedule(&w.admin, &s, UpdateSchedule { retention: Some(keep_two), hooks: None, dry_run: false })
        .await
        .unwrap();
    assert_eq!(view.schedule.retention.keep_last, Some(2));
    assert_eq!(w.snapshot_times(&s).await, ["2026-05-04T03:00:00.000Z", "2026-05-05T03:00:00.000Z"]);
    let refused = w
        .control
        .update_schedule(
            &w.admin,
            &s,
            UpdateSchedule { retention: Some(RetentionRules::default()), hooks: None, dry_run: true },
        )
        .await;
    let refused = refused.unwrap_err();
    assert!(matches!(&refused, Error::Invalid { field: Some(f), .. } if *f == "retention"), "{refused:?}");

    // New hooks alone delete nothing and plan nothing.
    let hooks = Hooks { pre: Some(command("true")), post: None, on_pre_failure: None };
    let (view, plan) = w
        .control
        .update_schedule(&w.admin, &s, UpdateSchedule { retention: None, hooks: Some(hooks), dry_run: false })
        .await
        .unwrap();
    assert!(plan.is_none() && view.schedule.hooks.is_some());
    assert_eq!(w.snapshot_times(&s).await.len(), 2);
}

#[tokio::test]
async fn vm_schedules_back_up_every_disk_at_one_instant_copy_and_prune() {
    let w = World::new("2026-05-01T00:00:00Z").await;
    let vm = w
        .control
        .create_vm(
            &w.admin,
            cairn_control::CreateVm {
                name: "web1".into(),
                size: Some(SizeArg::Text("4M".into())),
                template: None,
                image: None,
            },
        )
        .await
        .unwrap()
        .0;
    w.control.create_volume(&w.admin, "web1-data", &SizeArg::Text("4M".into()), Some("web1")).await.unwrap();
    let request = CreateSchedule {
        name: "web1-backup".into(),
        volume: None,
        vm: Some("web1".into()),
        action: Some(ScheduleAction::Backup),
        copy_to: Some("offsite".into()),
        frequency: "daily 01:00".into(),
        time_zone: None,
        retention: RetentionRules { keep_last: Some(2), ..Default::default() },
        hooks: Some(Hooks { pre: Some(command("true")), post: None, on_pre_failure: None }),
        paused: false,
    };
    let s = w.control.create_schedule(&w.admin, request).await.unwrap().schedule.id;
    let runs = w.walk("2026-05-04T12:00:00Z", SignedDuration::from_hours(4)).await;
    assert_eq!(runs.len(), 4);
    assert!(runs.iter().all(|r| r.state == RunState::Succeeded && r.job.is_some()), "{runs:#?}");
    // The pre hook succeeded, so each backup was taken of a quiesced VM.
    assert!(runs.iter().all(|r| r.consistency == Some(Consistency::Application)), "{runs:#?}");
    let backups = w.control.list_backups(&w.admin, None, Some(&vm.id)).await.unwrap();
    // Two runs kept, each with both disks, each disk pair taken at one instant, each copied.
    assert_eq!(backups.len(), 4, "{backups:#?}");
    assert!(backups.iter().all(|b| b.schedule.as_deref() == Some(s.as_str()) && b.copies == ["offsite"]));
    let mut times: Vec<&str> = backups.iter().map(|b| b.created_at.as_str()).collect();
    times.dedup();
    // Dated when they were taken: the 04:00 pass after each 01:00 firing.
    assert_eq!(times, ["2026-05-03T04:00:00.000Z", "2026-05-04T04:00:00.000Z"]);
    assert_eq!(runs.iter().map(|r| r.pruned).sum::<u64>(), 4);
}

fn command(script: &str) -> Hook {
    Hook { command: Some(vec!["sh".into(), "-c".into(), script.into()]), url: None, timeout_seconds: Some(10) }
}

#[tokio::test]
async fn hooks_bracket_the_snapshot_and_decide_its_consistency() {
    let w = World::new("2026-05-01T00:00:00Z").await;
    let volume = w.volume("db").await;
    let log = w.dir.path().join("hooks.log");
    let log_text = log.display().to_string();
    let hooks = Hooks {
        pre: Some(command(&format!("echo pre $CAIRN_HOOK_PHASE $CAIRN_VOLUMES >> {log_text}"))),
        post: Some(command(&format!("echo post $CAIRN_HOOK_PHASE $CAIRN_SNAPSHOTS >> {log_text}"))),
        on_pre_failure: None,
    };
    let request = SnapshotRequest { name: Some("quiesced".into()), consistency: None, hooks: Some(hooks) };
    let taken = w.control.snapshot_volume(&w.admin, &volume, &request).await.unwrap();
    assert_eq!(taken.snapshot.consistency, Consistency::Application);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text, format!("pre pre {volume}\npost post {}\n", taken.snapshot.id));

    // A failing pre hook: no snapshot, and the post hook still undoes what it may have done.
    std::fs::remove_file(&log).unwrap();
    let failing = Hooks {
        pre: Some(command("echo database busy >&2; exit 3")),
        post: Some(command(&format!("echo thawed >> {log_text}"))),
        on_pre_failure: None,
    };
    let request = SnapshotRequest { name: Some("refused".into()), consistency: None, hooks: Some(failing.clone()) };
    let error = w.control.snapshot_volume(&w.admin, &volume, &request).await.unwrap_err();
    assert!(error.to_string().contains("database busy") && error.to_string().contains("no snapshot"), "{error}");
    assert!(w.control.get_snapshot(&w.admin, "refused").await.is_err());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "thawed\n");

    // ... unless the request says to take a crash-consistent one anyway.
    let fallback = Hooks { on_pre_failure: Some(OnHookFailure::CrashConsistent), ..failing };
    let request = SnapshotRequest { name: Some("anyway".into()), consistency: None, hooks: Some(fallback.clone()) };
    let taken = w.control.snapshot_volume(&w.admin, &volume, &request).await.unwrap();
    assert_eq!(taken.snapshot.consistency, Consistency::Crash);
    assert!(taken.warnings.iter().any(|w| w.contains("database busy")), "{:?}", taken.warnings);

    // The same rules in a scheduled run: recorded on the run.
    let mut create = CreateSchedule {
        name: "hooked".into(),
        volume: Some(volume.clone()),
        vm: None,
        action: None,
        copy_to: None,
        frequency: "daily 03:00".into(),
        time_zone: None,
        retention: RetentionRules { keep_last: Some(3), ..Default::default() },
        hooks: Some(Hooks { on_pre_failure: None, ..fallback.clone() }),
        paused: false,
    };
    w.control.create_schedule(&w.admin, create.clone()).await.unwrap();
    create.name = "hooked-anyway".into();
    create.hooks = Some(fallback);
    w.control.create_schedule(&w.admin, create).await.unwrap();
    let runs = w.walk("2026-05-01T04:00:00Z", SignedDuration::from_hours(1)).await;
    let failed = runs.iter().find(|r| r.state == RunState::Failed).expect("the strict schedule's run fails");
    assert!(failed.error.as_deref().unwrap().contains("database busy"));
    let anyway = runs.iter().find(|r| r.state == RunState::Succeeded).expect("the lenient one succeeds");
    assert_eq!(anyway.consistency, Some(Consistency::Crash));
    assert!(anyway.warning.as_deref().unwrap().contains("database busy"));
    let status = w.control.protection_status(&w.admin, Some(&volume), None).await.unwrap();
    assert!(status.volumes[0].last_run_failed, "a failed run shows in the status");
}

#[tokio::test]
async fn a_run_over_quota_fails_and_the_status_says_why() {
    let w = World::new("2026-05-01T00:00:00Z").await;
    let volume = w.volume("db").await;
    let quota = Quota { max_snapshots: Some(1), ..Default::default() };
    w.control.set_quota(&w.admin, "admin", Some(quota)).await.unwrap();
    let s = w.schedule("nightly", &volume, "daily 03:00", "UTC", 5).await;
    let runs = w.walk("2026-05-02T04:00:00Z", SignedDuration::from_hours(1)).await;
    let states: Vec<RunState> = runs.iter().map(|r| r.state).collect();
    assert_eq!(states, [RunState::Succeeded, RunState::Failed], "{runs:#?}");
    assert!(runs[1].error.as_deref().unwrap().contains("over quota"), "{runs:#?}");
    assert_eq!(w.snapshot_times(&s).await.len(), 1, "the refused run made nothing");
    let status = w.control.protection_status(&w.admin, Some(&volume), None).await.unwrap();
    assert!(status.volumes[0].last_run_failed && status.volumes[0].over_quota);
}

#[tokio::test]
async fn only_the_administrator_sets_command_hooks() {
    let w = World::new("2026-05-01T00:00:00Z").await;
    let (tenant, _) = w.control.create_tenant(&w.admin, "acme").await.unwrap();
    w.control.create_volume(&tenant, "disk", &SizeArg::Text("4M".into()), None).await.unwrap();
    let hooks = Hooks { pre: Some(command("true")), post: None, on_pre_failure: None };
    let request = SnapshotRequest { hooks: Some(hooks), ..Default::default() };
    let refused = w.control.snapshot_volume(&tenant, "disk", &request).await.unwrap_err();
    assert!(matches!(refused, cairn_control::Error::Forbidden(_)), "{refused}");
    assert!(w.control.list_snapshots(&tenant, Some("disk"), None).await.unwrap().is_empty());
}

#[tokio::test]
async fn status_flags_a_disk_whose_newest_restore_point_is_older_than_its_rpo() {
    let w = World::new("2026-05-01T00:00:00Z").await;
    let volume = w.volume("db").await;
    w.volume("scratch").await;
    w.schedule("nightly", &volume, "daily 03:00", "UTC", 3).await;
    w.walk("2026-05-01T12:00:00Z", SignedDuration::from_hours(1)).await;
    let status = w.control.protection_status(&w.admin, None, None).await.unwrap();
    let db = status.volumes.iter().find(|d| d.volume == volume).unwrap();
    assert_eq!(db.rpo_seconds, Some(86_400));
    assert_eq!(db.newest_restore_point.as_ref().unwrap().age_seconds, 9 * 3600);
    assert!(!db.rpo_exceeded);
    assert_eq!(db.next_run_at.as_deref(), Some("2026-05-02T03:00:00.000Z"));
    let scratch = status.volumes.iter().find(|d| d.volume_name == "scratch").unwrap();
    assert_eq!((scratch.rpo_seconds, scratch.rpo_exceeded), (None, false), "no schedule, no promise");
    // No run happens (the scheduler is stuck); past 24 hours the promise is broken.
    w.clock.set(at("2026-05-02T04:00:00Z"));
    let status = w.control.protection_status(&w.admin, Some(&volume), None).await.unwrap();
    assert!(status.volumes[0].rpo_exceeded, "{status:#?}");
}

/// Many schedules due in the same minute: jitter spreads their starts over the jitter window
/// and no more than the configured number run at once. CAIRN_SCALE_SCHEDULES sets how many
/// (the note's figures come from 10000); the normal run uses 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_schedules_due_at_once_are_spread_and_bounded() {
    let count: usize = std::env::var("CAIRN_SCALE_SCHEDULES").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2026-05-01T02:00:00Z")));
    let mut settings = settings(dir.path(), &clock, Duration::from_secs(300));
    settings.scheduler.max_concurrent_runs = 8;
    let (control, _) = Control::open_dir(settings).await.unwrap();
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = control.authenticate(token.trim()).await.unwrap();
    let volumes = 50;
    for v in 0..volumes {
        control.create_volume(&admin, &format!("disk{v}"), &SizeArg::Text("1M".into()), None).await.unwrap();
    }
    let started = std::time::Instant::now();
    for n in 0..count {
        let request = CreateSchedule {
            name: format!("s{n}"),
            volume: Some(format!("disk{}", n % volumes)),
            vm: None,
            action: None,
            copy_to: None,
            frequency: "daily 03:00".into(),
            time_zone: None,
            retention: RetentionRules { keep_last: Some(1), ..Default::default() },
            hooks: None,
            paused: false,
        };
        control.create_schedule(&admin, request).await.unwrap();
    }
    let created = started.elapsed();
    let started = std::time::Instant::now();
    clock.set(at("2026-05-01T03:00:00Z"));
    let mut per_step = Vec::new();
    let mut runs = Vec::new();
    // 30-second steps through the 300-second jitter window.
    for _ in 0..=10 {
        let step = control.run_due_schedules().await.unwrap();
        per_step.push(step.len());
        runs.extend(step);
        clock.advance(SignedDuration::from_secs(30));
    }
    let ran = started.elapsed();
    assert_eq!(runs.len(), count, "every schedule ran once: {per_step:?}");
    assert!(runs.iter().all(|r| r.state == RunState::Succeeded && !r.late));
    let expected_per_step = count / 10;
    assert!(
        per_step.iter().all(|n| *n <= expected_per_step * 2),
        "jitter spreads the starts over the window: {per_step:?}"
    );
    let peak = control.peak_concurrent_runs();
    assert!((1..=8).contains(&peak), "at most 8 runs at once, saw {peak}");
    let memory = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    eprintln!(
        "scale: {count} schedules on {volumes} volumes; created in {created:.1?}; all ran in {ran:.1?} \
         (starts per 30 s step {per_step:?}, peak {peak} at once); {memory}"
    );
}
