//! Metering and quotas through the API on a hand-set clock: exact GiB-hours over a month with
//! resources made, grown and deleted mid-hour, across a restart; quotas that refuse a request
//! before anything is made.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cairn_control::clock::ManualClock;
use cairn_control::{Control, Settings};
use jiff::Timestamp;
use serde_json::{json, Value};
use tower::ServiceExt;

struct World {
    app: axum::Router,
    control: Arc<Control>,
    clock: Arc<ManualClock>,
    token: String,
}

impl World {
    async fn open(dir: &Path, clock: Arc<ManualClock>) -> World {
        let mut settings = Settings::in_dir(dir);
        settings.clock = clock.clone();
        let (control, _) = Control::open_dir(settings).await.unwrap();
        let token = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_string();
        let app = cairn_api::router(cairn_api::AppState::new(control.clone()));
        World { app, control, clock, token }
    }

    /// A fresh daemon in a new directory, its clock set to `at`; the directory lives as long
    /// as the returned guard.
    async fn start(at: &str) -> (tempfile::TempDir, World) {
        let dir = tempfile::tempdir().unwrap();
        let world = World::open(dir.path(), Arc::new(ManualClock::new(at.parse().unwrap()))).await;
        (dir, world)
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(&self.token, method, uri, body).await
    }

    async fn call_as(&self, token: &str, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn at(&self, text: &str) {
        self.clock.set(text.parse::<Timestamp>().unwrap());
    }
}

const GIB: u64 = 1 << 30;

fn item<'a>(usage: &'a Value, name: &str) -> &'a Value {
    usage["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no line for {name} in {usage:#}"))
}

#[tokio::test]
async fn a_month_of_volumes_made_grown_and_deleted_mid_hour_bills_exact_gib_hours() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new("2026-11-01T00:00:00Z".parse().unwrap()));
    let w = World::open(dir.path(), clock.clone()).await;
    let (status, _) = w.call("POST", "/v1/volumes", Some(json!({"name": "db", "size": "1G"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, vm) = w.call("POST", "/v1/vms", Some(json!({"name": "app", "size": "1G"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    w.at("2026-11-01T01:00:00Z");
    let (status, _) = w.call("POST", "/v1/vms/app/stop", None).await;
    assert_eq!(status, StatusCode::OK);
    w.at("2026-11-01T05:15:00Z");
    w.call("POST", "/v1/volumes", Some(json!({"name": "web", "size": "1G"}))).await;
    w.at("2026-11-01T10:30:00Z");
    let (status, _) = w.call("POST", "/v1/volumes/db/grow", Some(json!({"size": "2G"}))).await;
    assert_eq!(status, StatusCode::OK);
    // A volume that lives 45 minutes, inside one hour.
    w.at("2026-11-01T12:10:00Z");
    w.call("POST", "/v1/volumes", Some(json!({"name": "scratch", "size": "4G"}))).await;
    w.at("2026-11-01T12:55:00Z");
    let (status, _) = w.call("DELETE", "/v1/volumes/scratch", None).await;
    assert_eq!(status, StatusCode::OK);
    w.at("2026-11-01T20:45:00Z");
    w.call("DELETE", "/v1/volumes/db", None).await;

    // A restart: what was open stays open, and the downtime is billed once.
    drop(w);
    clock.set("2026-11-20T00:00:00Z".parse().unwrap());
    let w = World::open(dir.path(), clock.clone()).await;
    w.at("2026-12-03T00:00:00Z");
    let (status, usage) = w.call("GET", "/v1/usage?from=2026-11-01&to=2026-12-01", None).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    // db: 1 GiB for 10.5 h, then 2 GiB for 10.25 h.
    assert_eq!(item(&usage, "db")["gib_hours"], 31.0);
    assert_eq!(item(&usage, "scratch")["gib_hours"], 3.0);
    // web: from 05:15 on the 1st to the end of November: 714.75 h.
    assert_eq!(item(&usage, "web")["gib_hours"], 714.75);
    assert_eq!(item(&usage, "web")["bytes"], GIB);
    // A stopped VM's disk bills all the same, the whole month (720 h), under its VM.
    let root = item(&usage, "app-root");
    assert_eq!(root["gib_hours"], 720.0);
    assert_eq!(root["vm"], vm["id"], "{root}");
    assert_eq!(usage["totals"]["gib_hours"], 748.75 + 720.0);
    // At 0.08 per GiB-month of 730 h, each line rounded to a millionth once.
    let lines = ["db", "scratch", "web", "app-root"];
    let costs: Vec<u64> = lines.iter().map(|n| item(&usage, n)["cost_micros"].as_u64().unwrap()).collect();
    assert_eq!(costs, [3397, 329, 78329, 78904]);
    assert_eq!(usage["totals"]["cost_micros"], 3397 + 329 + 78329 + 78904);

    // A period that starts mid-way counts only its part; an empty or reversed one is refused.
    let (_, part) = w.call("GET", "/v1/usage?from=2026-11-01T10:00:00Z&to=2026-11-01T11:00:00Z", None).await;
    assert_eq!(item(&part, "db")["gib_hours"], 1.5);
    let (status, _) = w.call("GET", "/v1/usage?from=2026-12-01&to=2026-11-01", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = w.call("GET", "/v1/usage?from=yesterday", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_request_over_quota_is_refused_before_anything_is_made() {
    let (_dir, w) = World::start("2026-11-01T00:00:00Z").await;
    let (status, created) = w.call("POST", "/v1/tenants", Some(json!({"name": "acme"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let acme = created["token"].as_str().unwrap().to_string();
    let quota = json!({"max_bytes": 3 * GIB, "max_volumes": 2, "max_snapshots": 1});
    let (status, view) = w.call("PUT", "/v1/tenants/acme/quota", Some(quota)).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    // Only the administrator sets quotas.
    let (status, _) = w.call_as(&acme, "PUT", "/v1/tenants/acme/quota", Some(json!({}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, _) = w.call_as(&acme, "POST", "/v1/volumes", Some(json!({"name": "a", "size": "2G"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, refused) = w.call_as(&acme, "POST", "/v1/volumes", Some(json!({"name": "b", "size": "2G"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(refused["error"]["code"], "quota_exceeded");
    assert!(refused["error"]["message"].as_str().unwrap().contains("bytes"), "{refused}");
    // Nothing half-made: no row, no engine volume.
    let (_, volumes) = w.call_as(&acme, "GET", "/v1/volumes", None).await;
    assert_eq!(volumes.as_array().unwrap().len(), 1, "{volumes}");
    assert_eq!(w.control.engine().list_volumes().len(), 1);

    let (status, _) = w.call_as(&acme, "POST", "/v1/volumes/a/snapshots", Some(json!({"name": "s1"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, refused) = w.call_as(&acme, "POST", "/v1/volumes/a/snapshots", Some(json!({"name": "s2"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    let (_, snapshots) = w.call_as(&acme, "GET", "/v1/snapshots", None).await;
    assert_eq!(snapshots.as_array().unwrap().len(), 1);

    // Growing counts the bytes it adds; a clone of the snapshot counts a volume of its size.
    let (status, _) = w.call_as(&acme, "POST", "/v1/volumes/a/grow", Some(json!({"size": "4G"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = w.call_as(&acme, "POST", "/v1/snapshots/s1/restore", Some(json!({"name": "c"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, a) = w.call_as(&acme, "GET", "/v1/volumes/a", None).await;
    assert_eq!(a["size"], 2 * GIB, "{a}");

    let (_, view) = w.call_as(&acme, "GET", "/v1/tenants/acme/quota", None).await;
    assert_eq!(view["holding"]["volumes"], 1);
    assert_eq!(view["holding"]["snapshots"], 1);
    assert_eq!(view["holding"]["bytes"], 2 * GIB);
    // Another tenant's quota is not acme's to see; the administrator's usage is not either.
    let (status, _) = w.call_as(&acme, "GET", "/v1/tenants/admin/quota", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = w.call_as(&acme, "GET", "/v1/usage?tenant=admin", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Lifted, the same request goes through.
    w.call("PUT", "/v1/tenants/acme/quota", Some(json!({}))).await;
    let (status, _) = w.call_as(&acme, "POST", "/v1/volumes", Some(json!({"name": "b", "size": "2G"}))).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_snapshot_delete_preview_shows_what_it_frees_and_the_bill_after() {
    let (_dir, w) = World::start("2026-11-01T00:00:00Z").await;
    let (_, volume) = w.call("POST", "/v1/volumes", Some(json!({"name": "db", "size": "64M"}))).await;
    let engine = w.control.engine();
    let disk = engine.volume(engine.volume_id(volume["id"].as_str().unwrap()).unwrap()).unwrap();
    const MIB: usize = 1 << 20;
    disk.write(&vec![7u8; 8 * MIB], 0, true).unwrap();
    let (status, _) = w.call("POST", "/v1/volumes/db/snapshots", Some(json!({"name": "s1"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    // Half of what s1 holds is overwritten since: deleting s1 frees that half.
    disk.write(&vec![9u8; 4 * MIB], 0, true).unwrap();

    let (status, preview) = w.call("DELETE", "/v1/snapshots/s1?dry_run=true", None).await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(preview["frees_bytes"], 4 * MIB);
    // 64 MiB of volume at 0.08 and 8 MiB of snapshot at 0.05 per GiB-month.
    assert_eq!(preview["monthly_cost_before"], "0.005391");
    assert_eq!(preview["monthly_cost_after"], "0.005000");
    let (_, snapshots) = w.call("GET", "/v1/snapshots", None).await;
    assert_eq!(snapshots.as_array().unwrap().len(), 1, "a preview deletes nothing");
    w.at("2026-11-01T01:00:00Z");
    let (_, usage) = w.call("GET", "/v1/usage", None).await;
    assert_eq!(item(&usage, "s1")["bytes"], 8 * MIB);
    assert_eq!(item(&usage, "s1")["gib_hours"], 1.0 / 128.0);

    // s2 holds the 4 MiB written since s1. Deleting s1 moves its other 4 MiB up into s2, which
    // is billed for them from then on, merged yet or not.
    let (status, _) = w.call("POST", "/v1/volumes/db/snapshots", Some(json!({"name": "s2"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, s2) = w.call("GET", "/v1/snapshots/s2", None).await;
    assert_eq!(s2["stored_bytes"], 4 * MIB, "{s2}");
    w.at("2026-11-01T02:00:00Z");
    let (status, _) = w.call("DELETE", "/v1/snapshots/s1", None).await;
    assert_eq!(status, StatusCode::OK);
    w.at("2026-11-01T03:00:00Z");
    let (_, usage) = w.call("GET", "/v1/usage", None).await;
    assert_eq!(item(&usage, "s2")["bytes"], 8 * MIB, "{usage:#}");
    // 4 MiB from 01:00 to 02:00, then 8 MiB to 03:00.
    assert_eq!(item(&usage, "s2")["gib_hours"], 12.0 / 1024.0);
    assert_eq!(item(&usage, "s1")["gib_hours"], 2.0 / 128.0, "s1 billed until it went");
}

/// Volumes and templates show the data they hold, what deleting them frees and what they share
/// with snapshots and clones, as the layers under them change hands.
#[tokio::test]
async fn volumes_and_templates_show_what_deleting_them_frees_and_what_they_share() {
    let (_dir, w) = World::start("2026-11-01T00:00:00Z").await;
    let (status, vm) = w.call("POST", "/v1/vms", Some(json!({"name": "app", "size": "64M"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let root = vm["root_volume"].as_str().unwrap().to_string();
    let engine = w.control.engine();
    let disk = engine.volume(engine.volume_id(&root).unwrap()).unwrap();
    const MIB: u64 = 1 << 20;
    disk.write(&vec![7u8; 8 * MIB as usize], 0, true).unwrap();
    let footprint = |v: &Value| [v["data_bytes"].clone(), v["exclusive_bytes"].clone(), v["shared_bytes"].clone()];
    let sizes = |data: u64, exclusive: u64, shared: u64| [json!(data), json!(exclusive), json!(shared)];
    let root_path = format!("/v1/volumes/{root}");
    let volume = || w.call("GET", &root_path, None);
    assert_eq!(footprint(&volume().await.1), sizes(8 * MIB, 8 * MIB, 0), "all its own");

    // A snapshot takes over what was written: the volume reads it, but keeps only what it
    // writes from then on.
    let (status, snap) = w.call("POST", "/v1/vms/app/snapshots", Some(json!({"name": "s1"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    disk.write(&vec![9u8; 2 * MIB as usize], 0, true).unwrap();
    assert_eq!(footprint(&volume().await.1), sizes(8 * MIB, 2 * MIB, 6 * MIB));

    // A template made from s1 reads s1's data: deleting it frees nothing while s1 is there.
    let (status, template) = w.call("POST", "/v1/templates", Some(json!({"name": "golden", "snapshot": "s1"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{template}");
    assert_eq!(footprint(&template), sizes(8 * MIB, 0, 8 * MIB), "{template}");
    let listed = w.call("GET", "/v1/templates", None).await.1;
    assert_eq!(footprint(&listed[0]), sizes(8 * MIB, 0, 8 * MIB), "{listed}");

    // With s1 deleted its layer stays for the template and the volume. Deleting the template
    // then frees the 2 MiB the volume has overwritten; deleting the volume frees its own 2 MiB
    // (the rest moves up into the template).
    let (status, _) = w.call("DELETE", "/v1/snapshots/s1", None).await;
    assert_eq!(status, StatusCode::OK);
    let template = w.call("GET", "/v1/templates/golden", None).await.1;
    assert_eq!(footprint(&template), sizes(8 * MIB, 2 * MIB, 6 * MIB), "{template}");
    assert_eq!(footprint(&volume().await.1), sizes(8 * MIB, 2 * MIB, 6 * MIB));

    // A VM made from the template shares all of it.
    let (status, web) = w.call("POST", "/v1/vms", Some(json!({"name": "web", "template": "golden"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{web}");
    let template = w.call("GET", "/v1/templates/golden", None).await.1;
    assert_eq!(footprint(&template), sizes(8 * MIB, 0, 8 * MIB), "{template}");
    let web_root = w.call("GET", &format!("/v1/volumes/{}", web["root_volume"].as_str().unwrap()), None).await.1;
    assert_eq!(footprint(&web_root), sizes(8 * MIB, 0, 8 * MIB), "{web_root}");
    assert_eq!(web_root["stored_bytes"], 0, "it has written nothing");
    assert_eq!(template["stored_bytes"], 0, "made from a snapshot, it holds nothing itself");

    // A volume can free more than it reads: once the snapshot a clone was made from is
    // deleted, the data under both stays for both; the clone overwrote all of it, so it is the
    // volume's alone to free. What a snapshot of it would store is still only its own writes.
    let (_, data) = w.call("POST", "/v1/volumes", Some(json!({"name": "data", "size": "64M"}))).await;
    let data_disk = engine.volume(engine.volume_id(data["id"].as_str().unwrap()).unwrap()).unwrap();
    data_disk.write(&vec![1u8; 8 * MIB as usize], 0, true).unwrap();
    let (status, _) = w.call("POST", "/v1/volumes/data/snapshots", Some(json!({"name": "t0"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, copy) = w.call("POST", "/v1/snapshots/t0/restore", Some(json!({"name": "copy"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{copy}");
    let copy_disk = engine.volume(engine.volume_id(copy["id"].as_str().unwrap()).unwrap()).unwrap();
    copy_disk.write(&vec![2u8; 8 * MIB as usize], 0, true).unwrap();
    let (status, _) = w.call("DELETE", "/v1/snapshots/t0", None).await;
    assert_eq!(status, StatusCode::OK);
    data_disk.write(&vec![3u8; MIB as usize], 0, true).unwrap();
    let data = w.call("GET", "/v1/volumes/data", None).await.1;
    assert_eq!(footprint(&data), sizes(8 * MIB, 9 * MIB, 0), "{data}");
    assert_eq!(data["stored_bytes"], MIB, "{data}");
}

/// Deleting several snapshots together frees more than the sum of what each frees alone: a
/// block written in s1 and overwritten in s2 goes only when both go. A retention change's
/// preview counts the set.
#[tokio::test]
async fn a_retention_preview_counts_what_its_snapshots_free_together() {
    let (_dir, w) = World::start("2026-11-02T00:00:00Z").await;
    let (_, volume) = w.call("POST", "/v1/volumes", Some(json!({"name": "db", "size": "64M"}))).await;
    let engine = w.control.engine();
    let disk = engine.volume(engine.volume_id(volume["id"].as_str().unwrap()).unwrap()).unwrap();
    const MIB: usize = 1 << 20;
    let (status, schedule) = w
        .call(
            "POST",
            "/v1/schedules",
            Some(json!({"name": "daily", "volume": "db", "frequency": "daily 01:00", "retention": {"keep_last": 3}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    let schedule = schedule["id"].as_str().unwrap().to_string();
    // Three daily runs: s1 holds A (the first 4 MiB), s2 B (the next 4 MiB), s3 both again.
    for (day, offset, length) in [(2, 0, 4 * MIB), (3, 4 * MIB, 4 * MIB), (4, 0, 8 * MIB)] {
        disk.write(&vec![day as u8; length], offset as u64, true).unwrap();
        // Past the scheduler's jitter (at most 5 minutes).
        w.at(&format!("2026-11-0{day}T01:10:00Z"));
        w.control.run_due_schedules().await.unwrap();
    }
    let (_, snapshots) = w.call("GET", "/v1/snapshots", None).await;
    let mut snapshots = snapshots.as_array().unwrap().clone();
    snapshots.sort_by_key(|s| s["created_at"].as_str().unwrap().to_string());
    let exclusive: Vec<&Value> = snapshots.iter().map(|s| &s["exclusive_bytes"]).collect();
    // Alone, s1 frees nothing (A moves up into s2), s2 frees B (s3 overwrote it).
    assert_eq!(exclusive, [&json!(0), &json!(4 * MIB), &json!(0)], "{snapshots:#?}");

    // Keeping 1 deletes s1 and s2 together: A passes through s2 into s3, which overwrote it,
    // so both A and B go: 8 MiB, not the 4 MiB their exclusive bytes add up to.
    let (status, plan) = w
        .call(
            "PATCH",
            &format!("/v1/schedules/{schedule}"),
            Some(json!({"retention": {"keep_last": 1}, "dry_run": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    let plan = &plan["retention_plan"];
    assert_eq!(plan["delete"].as_array().unwrap().len(), 2, "{plan:#}");
    assert_eq!(plan["cost"]["frees_bytes"], 8 * MIB as u64, "{plan:#}");
}

/// A snapshot adds what its volume wrote since the last one: a byte quota refuses one that
/// would store more than is left, before anything is made, and admits it once room is made.
#[tokio::test]
async fn a_snapshot_is_judged_on_the_bytes_it_will_store() {
    let (_dir, w) = World::start("2026-11-01T00:00:00Z").await;
    const MIB: u64 = 1 << 20;
    let (_, volume) = w.call("POST", "/v1/volumes", Some(json!({"name": "db", "size": "64M"}))).await;
    let engine = w.control.engine();
    let disk = engine.volume(engine.volume_id(volume["id"].as_str().unwrap()).unwrap()).unwrap();
    disk.write(&vec![7u8; 8 * MIB as usize], 0, true).unwrap();
    // Room for the volume and 4 MiB more: the 8 MiB written do not fit in a snapshot.
    let (status, _) = w.call("PUT", "/v1/tenants/admin/quota", Some(json!({"max_bytes": 68 * MIB}))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, refused) = w.call("POST", "/v1/volumes/db/snapshots", Some(json!({"name": "s1"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains(&(8 * MIB).to_string()), "{refused}");
    let (_, snapshots) = w.call("GET", "/v1/snapshots", None).await;
    assert_eq!(snapshots, json!([]), "nothing half-made");
    assert!(engine.list_snapshots(None).is_empty());

    // Trimmed to 2 MiB of its own, it fits; the snapshot then holds them, and the volume's
    // next snapshot adds only what it writes after.
    disk.trim(2 * MIB, 6 * MIB, true).unwrap();
    let (status, made) = w.call("POST", "/v1/volumes/db/snapshots", Some(json!({"name": "s1"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let (_, view) = w.call("GET", "/v1/tenants/admin/quota", None).await;
    assert_eq!(view["holding"]["bytes"], 66 * MIB, "{view}");
    let (status, made) = w.call("POST", "/v1/volumes/db/snapshots", Some(json!({"name": "s2"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
}
