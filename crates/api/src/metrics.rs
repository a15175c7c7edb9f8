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
    let _ = writeln!(
        out,
        "# HELP cairn_http_requests_total HTTP requests answered.\n# TYPE cairn_http_requests_total counter"
    );
    for ((method, status), n) in state.metrics.answered.lock().expect("metrics lock").iter() {
        let _ = writeln!(out, "cairn_http_requests_total{{method=\"{method}\",status=\"{status}\"}} {n}");
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
