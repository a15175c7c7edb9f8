//! cairn's REST API over the control plane: routes under /v1 (docs/api.md, openapi.json),
//! bearer-token authentication, errors as HTTP, idempotency keys and Prometheus metrics.

mod body;
mod error;
mod idempotency;
mod metrics;
mod routes;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use cairn_control::model::Tenant;
use cairn_control::Control;

pub use error::ApiError;
pub use routes::router;

/// The OpenAPI document served at /v1/openapi.json.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub control: Arc<Control>,
    metrics: metrics::HttpMetrics,
    /// Idempotency keys whose first request is still running, so a concurrent retry waits
    /// its turn instead of doing the work twice.
    keys_in_flight: Mutex<HashSet<(String, String)>>,
}

impl AppState {
    pub fn new(control: Arc<Control>) -> Arc<Self> {
        Arc::new(AppState { control, metrics: Default::default(), keys_in_flight: Mutex::default() })
    }
}

/// The bearer token of a request, if it has one.
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim())
}

/// The tenant a request acts for, from its bearer token.
#[derive(Debug)]
pub struct Caller(pub Tenant);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(cairn_control::Error::Unauthorized)?;
        Ok(Caller(state.control.authenticate(token).await?))
    }
}
