//! Prometheus metrics at /metrics: request counts by status, resource counts and bytes.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Requests answered, by method and status.
    answered: Mutex<BTreeMap<(String, u16), u64>>,
}

pub async fn count(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let response = next.run(request).await;
    *state.metrics.answered.lock().expect("metrics lock").entry((method, response.status().as_u16())).or_default() += 1;
    response
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// Label values are quoted; names are restricted to safe characters, but escape anyway.
fn label(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// R11 as metrics: each disk's restore point age, its RPO and whether it is exceeded, and the
/// scheduled runs recorded by how they ended.
async fn render_protection(out: &mut String, state: &AppState) -> Result<(), ApiError> {
    let protection = state.control.protection_of_all().await?;
    let mut ages = String::new();
    let mut rpos = String::new();
    let mut exceeded = String::new();
    for (tenant, status) in &protection {
        for disk in &status.volumes {
            let labels = format!(
                "tenant=\"{}\",volume=\"{}\",volume_name=\"{}\"",
                label(&tenant.name),
                label(&disk.volume),
                label(&disk.volume_name)
            );
            if let Some(point) = &disk.newest_restore_point {
                let _ = writeln!(ages, "cairn_restore_point_age_seconds{{{labels}}} {}", point.age_seconds);
            }
            if let Some(rpo) = disk.rpo_seconds {
                let _ = writeln!(rpos, "cairn_rpo_seconds{{{labels}}} {rpo}");
                let _ = writeln!(exceeded, "cairn_rpo_exceeded{{{labels}}} {}", u8::from(disk.rpo_exceeded));
            }
        }
    }
    let _ = write!(
        out,
        "# HELP cairn_restore_point_age_seconds Age of each disk's newest snapshot or backup.\n\
         # TYPE cairn_restore_point_age_seconds gauge\n{ages}\
         # HELP cairn_rpo_seconds Each scheduled disk's RPO: the shortest interval of its active schedules.\n\
         # TYPE cairn_rpo_seconds gauge\n{rpos}\
         # HELP cairn_rpo_exceeded 1 when a disk's newest restore point is older than its RPO.\n\
         # TYPE cairn_rpo_exceeded gauge\n{exceeded}"
    );
    let _ = writeln!(
        out,
        "# HELP cairn_schedule_runs Scheduled runs recorded, by state.\n# TYPE cairn_schedule_runs gauge"
    );
    for (run_state, n) in state.control.run_counts().await? {
        let _ = writeln!(out, "cairn_schedule_runs{{state=\"{run_state}\"}} {n}");
    }
    Ok(())
}

pub async fn render(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let counts = state.control.counts().await?;
    let mut out = String::new();
    gauge(&mut out, "cairn_tenants", "Tenants.", counts.tenants);
    let _ = writeln!(
        out,
        "# HELP cairn_vms VMs by state.\n# TYPE cairn_vms gauge\ncairn_vms{{state=\"running\"}} {}\ncairn_vms{{state=\"stopped\"}} {}",
        counts.vms_running, counts.vms_stopped
    );
    gauge(&mut out, "cairn_volumes", "Volumes.", counts.volumes);
    gauge(&mut out, "cairn_volume_bytes", "Sum of volume sizes (logical bytes).", counts.volume_bytes);
    gauge(&mut out, "cairn_snapshots", "Snapshots.", counts.snapshots);
    gauge(&mut out, "cairn_templates", "Templates.", counts.templates);
    gauge(&mut out, "cairn_jobs_running", "Import and export jobs running.", counts.jobs_running);
    gauge(&mut out, "cairn_engine_layers", "Layers in the volume store.", counts.engine_layers);
    render_protection(&mut out, &state).await?;
    let _ = writeln!(
        out,
        "# HELP cairn_http_requests_total HTTP requests answered.\n# TYPE cairn_http_requests_total counter"
    );
    for ((method, status), n) in state.metrics.answered.lock().expect("metrics lock").iter() {
        let _ = writeln!(out, "cairn_http_requests_total{{method=\"{method}\",status=\"{status}\"}} {n}");
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
