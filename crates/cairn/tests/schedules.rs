//! Schedules in the real daemon: a per-minute cron schedule runs on the wall clock, a run cut
//! by kill -9 resumes once after the restart without snapshotting twice, and `cairn status`
//! and the metrics report each disk's protection.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{id, TestServer};
use serde_json::Value;

/// Polls `done` on `what` every 200 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn runs(srv: &TestServer, schedule: &str) -> Vec<Value> {
    srv.cli_json(&["schedule", "show", schedule])["runs"].as_array().unwrap().clone()
}

fn scheduled_snapshots(srv: &TestServer, schedule_id: &str) -> Vec<Value> {
    let all = srv.cli_json(&["snapshot", "list"]);
    all.as_array().unwrap().iter().filter(|s| s["schedule"] == schedule_id).cloned().collect()
}

#[test]
fn a_per_minute_cron_schedule_runs_on_the_wall_clock() {
    let srv = TestServer::start_with(&["--schedule-jitter", "0"], &[]);
    srv.cli_json(&["volume", "create", "db", "--size", "4M"]);
    let schedule =
        srv.cli_json(&["schedule", "create", "minutely", "--volume", "db", "--cron", "* * * * *", "--keep-last", "2"]);
    assert_eq!(schedule["frequency"], "cron * * * * *");
    assert_eq!(schedule["interval_seconds"], 60);
    let schedule_id = id(&schedule);
    // The next minute boundary, plus the time a pass takes on a busy machine.
    wait_until(Duration::from_secs(90), "a run of the per-minute schedule", || {
        runs(&srv, "minutely").iter().any(|r| r["state"] == "succeeded")
    });
    let run = runs(&srv, "minutely").into_iter().find(|r| r["state"] == "succeeded").unwrap();
    assert_eq!(run["late"], false, "{run}");
    assert_eq!(run["consistency"], "crash");
    let due = run["due_at"].as_str().unwrap();
    assert!(due.ends_with(":00.000Z"), "a firing on the minute: {due}");
    let snapshots = scheduled_snapshots(&srv, &schedule_id);
    assert!(!snapshots.is_empty());
    assert_eq!(snapshots[0]["origin"], "scheduled");

    let status = srv.cli_json(&["status", "--volume", "db"]);
    let disk = &status["volumes"][0];
    assert_eq!(disk["rpo_seconds"], 60, "{status}");
    assert_eq!(disk["rpo_exceeded"], false, "{status}");
    assert_eq!(disk["newest_restore_point"]["kind"], "snapshot");
    let table = srv.cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("db") && table.contains("ok"), "{table}");
    let (_, metrics) = srv.http_text("GET", "/metrics", None, None, &[]);
    assert!(metrics.contains("cairn_rpo_seconds{tenant=\"admin\""), "{metrics}");
    assert!(metrics.contains("cairn_schedule_runs{state=\"succeeded\"}"), "{metrics}");

    // run-now waits for its run and prints it.
    let manual = srv.cli_json(&["schedule", "run-now", "minutely"]);
    assert_eq!(manual["state"], "succeeded", "{manual}");
    assert_eq!(manual["manual"], true);
    // Keep 2: never more than two of the schedule's snapshots.
    assert!(scheduled_snapshots(&srv, &schedule_id).len() <= 2);

    // A hook option without a hook is refused rather than dropped.
    let refused = srv.cli_fails(&["schedule", "update", "minutely", "--hook-timeout", "5"]);
    assert!(refused.contains("go with a hook"), "{refused}");

    srv.cli_json(&["schedule", "pause", "minutely"]);
    let paused = srv.cli_json(&["schedule", "show", "minutely"]);
    assert_eq!(paused["schedule"]["paused"], true);
    srv.cli_json(&["schedule", "delete", "minutely"]);
    assert!(srv.cli_fails(&["schedule", "show", "minutely"]).contains("not found"));
}

/// A hook script that says it started, then waits for the test to release it; with `once`,
/// only its first run waits. It also ends when the test's directory is gone: a hook whose
/// server was killed with SIGKILL lives on, and would otherwise poll forever.
fn blocking_hook(dir: &Path, name: &str, once: bool) -> String {
    let script = dir.join(format!("{name}.sh"));
    let started = dir.join(format!("{name}.started"));
    let release = dir.join("release");
    let guard = if once { format!("[ -e {0} ] && exit 0\n", started.display()) } else { String::new() };
    std::fs::write(
        &script,
        format!(
            "{guard}touch {}\nwhile [ ! -e {} ] && [ -d {} ]; do sleep 0.1; done\n",
            started.display(),
            release.display(),
            dir.display()
        ),
    )
    .unwrap();
    format!("sh {}", script.display())
}

#[test]
fn a_run_cut_by_kill_9_resumes_once_without_a_second_snapshot() {
    let mut srv = TestServer::start_with(&["--schedule-jitter", "0"], &[]);
    let hooks = srv.dir.path().to_path_buf();
    srv.cli_json(&["volume", "create", "db", "--size", "4M"]);

    // Killed after the snapshot, in the post hook: the snapshot stays the run's only one.
    let post = blocking_hook(&hooks, "post", true);
    let after = srv.cli_json(&[
        "schedule",
        "create",
        "after",
        "--volume",
        "db",
        "--daily",
        "03:00",
        "--keep-last",
        "5",
        "--post-hook",
        &post,
        "--hook-timeout",
        "600",
    ]);
    srv.cli_json(&["schedule", "run-now", "after", "--no-wait"]);
    wait_until(Duration::from_secs(30), "the post hook to start", || hooks.join("post.started").exists());
    assert_eq!(scheduled_snapshots(&srv, &id(&after)).len(), 1);
    srv.kill9();
    srv.restart();
    wait_until(Duration::from_secs(30), "the interrupted run to end", || {
        runs(&srv, "after").iter().all(|r| r["state"] != "running")
    });
    let run = &runs(&srv, "after")[0];
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(run["late"], true, "a resumed run is late: {run}");
    assert_eq!(scheduled_snapshots(&srv, &id(&after)).len(), 1, "no second snapshot for the same run");

    // Killed in the pre hook, before the snapshot: the run starts over once and makes one.
    let pre = blocking_hook(&hooks, "pre", true);
    let before = srv.cli_json(&[
        "schedule",
        "create",
        "before",
        "--volume",
        "db",
        "--daily",
        "03:00",
        "--keep-last",
        "5",
        "--pre-hook",
        &pre,
        "--hook-timeout",
        "600",
    ]);
    srv.cli_json(&["schedule", "run-now", "before", "--no-wait"]);
    wait_until(Duration::from_secs(30), "the pre hook to start", || hooks.join("pre.started").exists());
    assert!(scheduled_snapshots(&srv, &id(&before)).is_empty());
    srv.kill9();
    srv.restart();
    wait_until(Duration::from_secs(30), "the interrupted run to end", || {
        runs(&srv, "before").iter().all(|r| r["state"] != "running")
    });
    let all = runs(&srv, "before");
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["state"], "succeeded", "{}", all[0]);
    let made = scheduled_snapshots(&srv, &id(&before));
    assert_eq!(made.len(), 1);
    assert_eq!(made[0]["consistency"], "application", "the pre hook ran to its end on the resumed run");
    // The first daemon's hook processes wait for this; they end now.
    std::fs::write(hooks.join("release"), "").unwrap();
}
