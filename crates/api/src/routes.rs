//! The routes of docs/api.md, each a thin translation onto [`Control`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use cairn_control::metering::Quota;
use cairn_control::model::{ImageFormat, VmState};
use cairn_control::names::Kind;
use cairn_control::names::SizeArg;
use cairn_control::retention::RetentionRules;
use cairn_control::{
    CreateSchedule, CreateVm, GcOptions, ImageSource, PruneRequest, RestoreRequest, SnapshotRequest, UpdateSchedule,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::body::{Body, OptionalBody};
use crate::error::ApiError;
use crate::{idempotency, metrics, AppState, Caller};

type S = State<Arc<AppState>>;
type Answer = Result<Response, ApiError>;

fn ok(value: impl serde::Serialize) -> Answer {
    Ok(Json(value).into_response())
}

fn created(value: impl serde::Serialize) -> Answer {
    Ok((StatusCode::CREATED, Json(value)).into_response())
}

fn accepted(value: Value) -> Answer {
    Ok((StatusCode::ACCEPTED, Json(value)).into_response())
}

fn deleted(id: String) -> Answer {
    ok(json!({ "deleted": id }))
}

/// Every route of the API.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/whoami", get(whoami))
        .route("/tenants", post(create_tenant).get(list_tenants))
        .route("/vms", post(create_vm).get(list_vms))
        .route("/vms/{vm}", get(get_vm).delete(delete_vm))
        .route("/vms/{vm}/start", post(start_vm))
        .route("/vms/{vm}/stop", post(stop_vm))
        .route("/vms/{vm}/snapshots", post(snapshot_vm).get(list_vm_snapshots))
        .route("/volumes", post(create_volume).get(list_volumes))
        .route("/volumes/import", post(import_volume))
        .route("/volumes/{volume}", get(get_volume).delete(delete_volume))
        .route("/volumes/{volume}/attach", post(attach_volume))
        .route("/volumes/{volume}/detach", post(detach_volume))
        .route("/volumes/{volume}/grow", post(grow_volume))
        .route("/volumes/{volume}/revert", post(revert_volume))
        .route("/volumes/{volume}/export", post(export_volume))
        .route("/volumes/{volume}/snapshots", post(snapshot_volume).get(list_volume_snapshots))
        .route("/snapshots", get(list_snapshots))
        .route("/snapshots/{snapshot}", get(get_snapshot).delete(delete_snapshot))
        .route("/snapshots/{snapshot}/restore", post(restore_snapshot))
        .route("/snapshots/{snapshot}/protect", post(protect_snapshot))
        .route("/snapshots/{snapshot}/unprotect", post(unprotect_snapshot))
        .route("/snapshots/{snapshot}/export", post(export_snapshot))
        .route("/templates", post(create_template).get(list_templates))
        .route("/templates/import", post(import_template))
        .route("/templates/{template}", get(get_template).delete(delete_template))
        .route("/volumes/{volume}/backups", post(back_up_volume))
        .route("/volumes/{volume}/restore", post(restore_over_volume))
        .route("/vms/{vm}/backups", post(back_up_vm))
        .route("/backups", get(list_backups))
        .route("/backups/prune", post(prune_backups))
        .route("/backups/copy", post(copy_backups))
        .route("/backups/{backup}", get(get_backup).delete(delete_backup))
        .route("/backups/{backup}/restore", post(restore_backup))
        .route("/backups/{backup}/protect", post(protect_backup))
        .route("/backups/{backup}/unprotect", post(unprotect_backup))
        .route("/schedules", post(create_schedule).get(list_schedules))
        .route("/schedules/{schedule}", get(get_schedule).patch(update_schedule).delete(delete_schedule))
        .route("/schedules/{schedule}/runs", get(list_runs))
        .route("/schedules/{schedule}/pause", post(pause_schedule))
        .route("/schedules/{schedule}/resume", post(resume_schedule))
        .route("/schedules/{schedule}/run", post(run_schedule_now))
        .route("/status", get(protection_status))
        .route("/usage", get(usage))
        .route("/tenants/{tenant}/quota", get(get_quota).put(set_quota))
        .route("/backups/{backup}/export", post(export_backup))
        .route("/repository/verify", post(verify_repository))
        .route("/repository/gc", post(gc_repository))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{job}", get(get_job))
        .layer(middleware::from_fn_with_state(state.clone(), idempotency::layer))
        .layer(middleware::from_fn_with_state(state.clone(), meter_after_change))
        .route("/openapi.json", get(openapi));
    Router::new()
        .nest("/v1", v1)
        .route("/metrics", get(metrics::render))
        .fallback(|| async { ApiError::not_found("no such endpoint; see /v1/openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                code: "invalid",
                message: "this endpoint does not take that method; see /v1/openapi.json".into(),
                field: None,
            }
        })
        .layer(middleware::from_fn_with_state(state.clone(), metrics::count))
        .with_state(state)
}

async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], crate::OPENAPI).into_response()
}

async fn whoami(Caller(t): Caller) -> Answer {
    ok(t)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameOnly {
    name: String,
}

async fn create_tenant(State(s): S, Caller(t): Caller, Body(r): Body<NameOnly>) -> Answer {
    let (tenant, token) = s.control.create_tenant(&t, &r.name).await?;
    created(json!({ "tenant": tenant, "token": token }))
}

async fn list_tenants(State(s): S, Caller(t): Caller) -> Answer {
    ok(s.control.list_tenants(&t).await?)
}

// ---- VMs ----

async fn create_vm(State(s): S, Caller(t): Caller, Body(r): Body<CreateVm>) -> Answer {
    match s.control.create_vm(&t, r).await? {
        (vm, Some(job)) => accepted(json!({ "job": job, "vm": vm })),
        (vm, None) => created(vm),
    }
}

async fn list_vms(State(s): S, Caller(t): Caller) -> Answer {
    ok(s.control.list_vms(&t).await?)
}

async fn get_vm(State(s): S, Caller(t): Caller, Path(vm): Path<String>) -> Answer {
    ok(s.control.get_vm(&t, &vm).await?)
}

async fn start_vm(State(s): S, Caller(t): Caller, Path(vm): Path<String>) -> Answer {
    ok(s.control.set_vm_state(&t, &vm, VmState::Running).await?)
}

async fn stop_vm(State(s): S, Caller(t): Caller, Path(vm): Path<String>) -> Answer {
    ok(s.control.set_vm_state(&t, &vm, VmState::Stopped).await?)
}

async fn delete_vm(State(s): S, Caller(t): Caller, Path(vm): Path<String>) -> Answer {
    ok(s.control.delete_vm(&t, &vm).await?)
}

async fn snapshot_vm(
    State(s): S,
    Caller(t): Caller,
    Path(vm): Path<String>,
    OptionalBody(r): OptionalBody<SnapshotRequest>,
) -> Answer {
    created(s.control.snapshot_vm(&t, &vm, &r).await?)
}

async fn list_vm_snapshots(State(s): S, Caller(t): Caller, Path(vm): Path<String>) -> Answer {
    // A deleted VM's id still lists what is left of it (R8), so the VM need not exist.
    ok(s.control.list_snapshots(&t, None, Some(&vm)).await?)
}

// ---- volumes ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolume {
    name: String,
    size: SizeArg,
    vm: Option<String>,
}

async fn create_volume(State(s): S, Caller(t): Caller, Body(r): Body<CreateVolume>) -> Answer {
    created(s.control.create_volume(&t, &r.name, &r.size, r.vm.as_deref()).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportRequest {
    name: String,
    path: String,
    format: Option<ImageFormat>,
    vm: Option<String>,
}

async fn import_volume(State(s): S, Caller(t): Caller, Body(r): Body<ImportRequest>) -> Answer {
    let image = ImageSource { path: r.path, format: r.format };
    let (job, volume) = s.control.import_volume(&t, &r.name, &image, r.vm.as_deref()).await?;
    accepted(json!({ "job": job, "volume": volume }))
}

async fn list_volumes(State(s): S, Caller(t): Caller) -> Answer {
    ok(s.control.list_volumes(&t).await?)
}

async fn get_volume(State(s): S, Caller(t): Caller, Path(volume): Path<String>) -> Answer {
    ok(s.control.get_volume(&t, &volume).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
    vm: String,
}

async fn attach_volume(State(s): S, Caller(t): Caller, Path(volume): Path<String>, Body(r): Body<Attach>) -> Answer {
    ok(s.control.attach_volume(&t, &volume, &r.vm).await?)
}

async fn detach_volume(State(s): S, Caller(t): Caller, Path(volume): Path<String>) -> Answer {
    ok(s.control.detach_volume(&t, &volume).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grow {
    size: SizeArg,
}

async fn grow_volume(State(s): S, Caller(t): Caller, Path(volume): Path<String>, Body(r): Body<Grow>) -> Answer {
    ok(s.control.grow_volume(&t, &volume, &r.size).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revert {
    snapshot: String,
}

async fn revert_volume(State(s): S, Caller(t): Caller, Path(volume): Path<String>, Body(r): Body<Revert>) -> Answer {
    ok(s.control.revert_volume(&t, &volume, &r.snapshot).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportRequest {
    path: String,
    format: Option<ImageFormat>,
}

async fn export_volume(
    State(s): S,
    Caller(t): Caller,
    Path(volume): Path<String>,
    Body(r): Body<ExportRequest>,
) -> Answer {
    accepted(json!({ "job": s.control.export_volume(&t, &volume, &r.path, r.format).await? }))
}

async fn delete_volume(State(s): S, Caller(t): Caller, Path(volume): Path<String>) -> Answer {
    deleted(s.control.delete_volume(&t, &volume).await?)
}

async fn snapshot_volume(
    State(s): S,
    Caller(t): Caller,
    Path(volume): Path<String>,
    OptionalBody(r): OptionalBody<SnapshotRequest>,
) -> Answer {
    created(s.control.snapshot_volume(&t, &volume, &r).await?)
}

async fn list_volume_snapshots(State(s): S, Caller(t): Caller, Path(volume): Path<String>) -> Answer {
    ok(s.control.list_snapshots(&t, Some(&volume), None).await?)
}

// ---- snapshots ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotFilter {
    volume: Option<String>,
    vm: Option<String>,
}

async fn list_snapshots(
    State(s): S,
    Caller(t): Caller,
    filter: Result<Query<SnapshotFilter>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(filter) = filter.map_err(|e| ApiError::invalid(e.body_text(), None))?;
    ok(s.control.list_snapshots(&t, filter.volume.as_deref(), filter.vm.as_deref()).await?)
}

async fn get_snapshot(State(s): S, Caller(t): Caller, Path(snapshot): Path<String>) -> Answer {
    ok(s.control.get_snapshot(&t, &snapshot).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRun {
    #[serde(default)]
    dry_run: bool,
}

async fn delete_snapshot(
    State(s): S,
    Caller(t): Caller,
    Path(snapshot): Path<String>,
    query: Result<Query<DryRun>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text(), None))?;
    if query.dry_run {
        return ok(s.control.preview_snapshot_delete(&t, &snapshot).await?);
    }
    deleted(s.control.delete_snapshot(&t, &snapshot).await?)
}

async fn protect_snapshot(State(s): S, Caller(t): Caller, Path(snapshot): Path<String>) -> Answer {
    s.control.set_protected(&t, Kind::Snapshot, &snapshot, true).await?;
    ok(s.control.get_snapshot(&t, &snapshot).await?)
}

async fn unprotect_snapshot(State(s): S, Caller(t): Caller, Path(snapshot): Path<String>) -> Answer {
    s.control.set_protected(&t, Kind::Snapshot, &snapshot, false).await?;
    ok(s.control.get_snapshot(&t, &snapshot).await?)
}

async fn protect_backup(State(s): S, Caller(t): Caller, Path(backup): Path<String>) -> Answer {
    s.control.set_protected(&t, Kind::Backup, &backup, true).await?;
    ok(s.control.get_backup(&t, &backup).await?)
}

async fn unprotect_backup(State(s): S, Caller(t): Caller, Path(backup): Path<String>) -> Answer {
    s.control.set_protected(&t, Kind::Backup, &backup, false).await?;
    ok(s.control.get_backup(&t, &backup).await?)
}

async fn create_schedule(State(s): S, Caller(t): Caller, Body(r): Body<CreateSchedule>) -> Answer {
    created(s.control.create_schedule(&t, r).await?)
}

async fn list_schedules(
    State(s): S,
    Caller(t): Caller,
    filter: Result<Query<SnapshotFilter>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(filter) = filter.map_err(|e| ApiError::invalid(e.body_text(), None))?;
    ok(s.control.list_schedules(&t, filter.volume.as_deref(), filter.vm.as_deref()).await?)
}

async fn get_schedule(State(s): S, Caller(t): Caller, Path(schedule): Path<String>) -> Answer {
    ok(s.control.get_schedule(&t, &schedule).await?)
}

async fn update_schedule(
    State(s): S,
    Caller(t): Caller,
    Path(schedule): Path<String>,
    Body(r): Body<UpdateSchedule>,
) -> Answer {
    let (schedule, plan) = s.control.update_schedule(&t, &schedule, r).await?;
    ok(json!({ "schedule": schedule, "retention_plan": plan }))
}

async fn delete_schedule(State(s): S, Caller(t): Caller, Path(schedule): Path<String>) -> Answer {
    deleted(s.control.delete_schedule(&t, &schedule).await?)
}

async fn list_runs(State(s): S, Caller(t): Caller, Path(schedule): Path<String>) -> Answer {
    ok(s.control.list_runs(&t, &schedule).await?)
}

async fn pause_schedule(State(s): S, Caller(t): Caller, Path(schedule): Path<String>) -> Answer {
    ok(s.control.set_schedule_paused(&t, &schedule, true).await?)
}

async fn resume_schedule(State(s): S, Caller(t): Caller, Path(schedule): Path<String>) -> Answer {
    ok(s.control.set_schedule_paused(&t, &schedule, false).await?)
}

async fn run_schedule_now(State(s): S, Caller(t): Caller, Path(schedule): Path<String>) -> Answer {
    accepted(json!(s.control.run_schedule_now(&t, &schedule).await?))
}

async fn protection_status(
    State(s): S,
    Caller(t): Caller,
    filter: Result<Query<SnapshotFilter>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(filter) = filter.map_err(|e| ApiError::invalid(e.body_text(), None))?;
    ok(s.control.protection_status(&t, filter.volume.as_deref(), filter.vm.as_deref()).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    tenant: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

async fn usage(
    State(s): S,
    Caller(t): Caller,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text(), None))?;
    ok(s.control.usage(&t, q.tenant.as_deref(), q.from.as_deref(), q.to.as_deref()).await?)
}

async fn get_quota(State(s): S, Caller(t): Caller, Path(tenant): Path<String>) -> Answer {
    ok(s.control.quota_of(&t, &tenant).await?)
}

async fn set_quota(State(s): S, Caller(t): Caller, Path(tenant): Path<String>, Body(quota): Body<Quota>) -> Answer {
    let quota = Some(quota).filter(|q| *q != Quota::default());
    ok(s.control.set_quota(&t, &tenant, quota).await?)
}

/// A request that changed something moves the meter on at once, so usage is billed from
/// the moment of the change (reads keep it current anyway; this keeps the times exact).
async fn meter_after_change(State(s): S, request: axum::extract::Request, next: middleware::Next) -> Response {
    let changes = request.method() != axum::http::Method::GET;
    let response = next.run(request).await;
    if changes && response.status().is_success() {
        if let Err(e) = s.control.sync_meters().await {
            eprintln!("cairn: metering after a change: {e}");
        }
    }
    response
}

async fn restore_snapshot(
    State(s): S,
    Caller(t): Caller,
    Path(snapshot): Path<String>,
    OptionalBody(r): OptionalBody<RestoreRequest>,
) -> Answer {
    created(s.control.restore_snapshot(&t, &snapshot, &r).await?)
}

async fn export_snapshot(
    State(s): S,
    Caller(t): Caller,
    Path(snapshot): Path<String>,
    Body(r): Body<ExportRequest>,
) -> Answer {
    accepted(json!({ "job": s.control.export_snapshot(&t, &snapshot, &r.path, r.format).await? }))
}

// ---- templates ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTemplate {
    name: String,
    snapshot: String,
}

async fn create_template(State(s): S, Caller(t): Caller, Body(r): Body<CreateTemplate>) -> Answer {
    created(s.control.create_template(&t, &r.name, &r.snapshot).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportTemplate {
    name: String,
    path: String,
    format: Option<ImageFormat>,
}

async fn import_template(State(s): S, Caller(t): Caller, Body(r): Body<ImportTemplate>) -> Answer {
    let image = ImageSource { path: r.path, format: r.format };
    let (job, template) = s.control.import_template(&t, &r.name, &image).await?;
    accepted(json!({ "job": job, "template": template }))
}

async fn list_templates(State(s): S, Caller(t): Caller) -> Answer {
    ok(s.control.list_templates(&t).await?)
}

async fn get_template(State(s): S, Caller(t): Caller, Path(template): Path<String>) -> Answer {
    ok(s.control.get_template(&t, &template).await?)
}

async fn delete_template(State(s): S, Caller(t): Caller, Path(template): Path<String>) -> Answer {
    deleted(s.control.delete_template(&t, &template).await?)
}

// ---- backups ----

/// A backup's options: keep a snapshot of the same instant on the disks' storage too.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BackupBody {
    #[serde(default)]
    keep_snapshot: bool,
    /// The kept snapshot's name (per disk NAME-VOLUMENAME for a VM), implying keep_snapshot.
    snapshot_name: Option<String>,
}

impl BackupBody {
    fn kept(self) -> Option<SnapshotRequest> {
        (self.keep_snapshot || self.snapshot_name.is_some())
            .then_some(SnapshotRequest { name: self.snapshot_name, ..SnapshotRequest::default() })
    }
}

async fn back_up_volume(
    State(s): S,
    Caller(t): Caller,
    Path(volume): Path<String>,
    OptionalBody(r): OptionalBody<BackupBody>,
) -> Answer {
    accepted(json!({ "job": s.control.start_backup(&t, Some(&volume), None, r.kept().as_ref()).await? }))
}

async fn back_up_vm(
    State(s): S,
    Caller(t): Caller,
    Path(vm): Path<String>,
    OptionalBody(r): OptionalBody<BackupBody>,
) -> Answer {
    accepted(json!({ "job": s.control.start_backup(&t, None, Some(&vm), r.kept().as_ref()).await? }))
}

async fn list_backups(
    State(s): S,
    Caller(t): Caller,
    filter: Result<Query<SnapshotFilter>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(filter) = filter.map_err(|e| ApiError::invalid(e.body_text(), None))?;
    ok(s.control.list_backups(&t, filter.volume.as_deref(), filter.vm.as_deref()).await?)
}

async fn get_backup(State(s): S, Caller(t): Caller, Path(backup): Path<String>) -> Answer {
    ok(s.control.get_backup(&t, &backup).await?)
}

async fn restore_backup(
    State(s): S,
    Caller(t): Caller,
    Path(backup): Path<String>,
    OptionalBody(r): OptionalBody<RestoreRequest>,
) -> Answer {
    let (job, volume) = s.control.restore_backup(&t, &backup, &r).await?;
    accepted(json!({ "job": job, "volume": volume }))
}

async fn export_backup(
    State(s): S,
    Caller(t): Caller,
    Path(backup): Path<String>,
    Body(r): Body<ExportRequest>,
) -> Answer {
    accepted(json!({ "job": s.control.export_backup(&t, &backup, &r.path, r.format).await? }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreOver {
    backup: String,
    from: Option<String>,
}

async fn restore_over_volume(
    State(s): S,
    Caller(t): Caller,
    Path(volume): Path<String>,
    Body(r): Body<RestoreOver>,
) -> Answer {
    accepted(json!({ "job": s.control.restore_backup_over(&t, &volume, &r.backup, r.from.as_deref()).await? }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VerifyRequest {
    sample_percent: Option<f64>,
    /// A second repository instead of the backup repository.
    repository: Option<String>,
}

async fn verify_repository(State(s): S, Caller(t): Caller, OptionalBody(r): OptionalBody<VerifyRequest>) -> Answer {
    accepted(json!({ "job": s.control.start_verify(&t, r.repository.as_deref(), r.sample_percent).await? }))
}

async fn delete_backup(State(s): S, Caller(t): Caller, Path(backup): Path<String>) -> Answer {
    deleted(s.control.delete_backup(&t, &backup).await?.id)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneBody {
    volume: Option<String>,
    vm: Option<String>,
    keep_last: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    keep_yearly: Option<u32>,
    keep_within_days: Option<u32>,
    time_zone: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn prune_backups(State(s): S, Caller(t): Caller, Body(r): Body<PruneBody>) -> Answer {
    let request = PruneRequest {
        volume: r.volume,
        vm: r.vm,
        rules: RetentionRules {
            keep_last: r.keep_last,
            keep_daily: r.keep_daily,
            keep_weekly: r.keep_weekly,
            keep_monthly: r.keep_monthly,
            keep_yearly: r.keep_yearly,
            keep_within_days: r.keep_within_days,
        },
        time_zone: r.time_zone,
        dry_run: r.dry_run,
    };
    ok(s.control.prune_backups(&t, &request).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CopyBody {
    to: String,
    backup: Option<String>,
    volume: Option<String>,
    vm: Option<String>,
}

async fn copy_backups(State(s): S, Caller(t): Caller, Body(r): Body<CopyBody>) -> Answer {
    let job = s.control.start_copy(&t, &r.to, r.backup.as_deref(), r.volume.as_deref(), r.vm.as_deref()).await?;
    accepted(json!({ "job": job }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GcBody {
    /// A second repository instead of the backup repository.
    repository: Option<String>,
    grace_seconds: Option<u64>,
    repack_unused_percent: Option<u8>,
    #[serde(default)]
    dry_run: bool,
}

async fn gc_repository(State(s): S, Caller(t): Caller, OptionalBody(r): OptionalBody<GcBody>) -> Answer {
    let defaults = GcOptions::default();
    if r.repack_unused_percent.is_some_and(|p| p > 100) {
        return Err(ApiError::invalid("a percentage, 0 to 100", Some("repack_unused_percent".into())));
    }
    let options = GcOptions {
        grace: r.grace_seconds.map_or(defaults.grace, Duration::from_secs),
        repack_unused_percent: r.repack_unused_percent.unwrap_or(defaults.repack_unused_percent),
        dry_run: r.dry_run,
        ..defaults
    };
    accepted(json!({ "job": s.control.start_gc(&t, r.repository.as_deref(), options).await? }))
}

// ---- jobs ----

async fn list_jobs(State(s): S, Caller(t): Caller) -> Answer {
    ok(s.control.list_jobs(&t).await?)
}

async fn get_job(State(s): S, Caller(t): Caller, Path(job): Path<String>) -> Answer {
    ok(s.control.get_job(&t, &job).await?)
}
