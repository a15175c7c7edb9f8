//! Idempotency keys: a creating POST with an `Idempotency-Key` header is done once; a retry
//! with the same key gets the first answer again (docs/api.md, "Conventions").

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cairn_control::db::StoredAnswer;
use cairn_control::names::fingerprint;

use crate::error::ApiError;
use crate::AppState;

const HEADER: &str = "idempotency-key";
/// Answers are small JSON documents; anything larger is not stored.
const MAX_STORED_ANSWER: usize = 4 << 20;

fn key_of(request: &Request) -> Result<Option<String>, ApiError> {
    let Some(value) = request.headers().get(HEADER) else { return Ok(None) };
    let key =
        value.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 200 && k.bytes().all(|b| (0x20..0x7f).contains(&b)));
    key.map(|k| Some(k.to_string())).ok_or_else(|| {
        ApiError::invalid("Idempotency-Key must be 1-200 printable ASCII characters", Some("Idempotency-Key".into()))
    })
}

/// Removes a key from the in-flight set however the request ends.
struct InFlight<'a> {
    state: &'a AppState,
    entry: (String, String),
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.state.keys_in_flight.lock().expect("keys lock").remove(&self.entry);
    }
}

pub async fn layer(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    match run(&state, request, next).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn run(state: &Arc<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    if request.method() != Method::POST {
        return Ok(next.run(request).await);
    }
    let Some(key) = key_of(&request)? else { return Ok(next.run(request).await) };
    let (parts, body) = request.into_parts();
    // Without a valid token the handler answers 401; nothing to remember.
    let Some(tenant) = (match crate::bearer(&parts) {
        Some(token) => state.control.authenticate(token).await.ok(),
        None => None,
    }) else {
        return Ok(next.run(Request::from_parts(parts, body)).await);
    };
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .map_err(|e| ApiError::invalid(format!("the request body could not be read: {e}"), None))?;
    // The path as the client sent it (nesting under /v1 strips the prefix from `parts.uri`).
    let uri = parts.extensions.get::<axum::extract::OriginalUri>().map_or(parts.uri.to_string(), |o| o.0.to_string());
    let print = fingerprint(&[parts.method.as_str().as_bytes(), uri.as_bytes(), &bytes]);
    // Claim the key before looking for its answer: a retry arriving just as the first request
    // ends then either sees the stored answer or waits its turn, never runs the work again.
    let entry = (tenant.id.clone(), key.clone());
    if !state.keys_in_flight.lock().expect("keys lock").insert(entry.clone()) {
        return Err(ApiError::conflict("a request with this Idempotency-Key is still running; retry later"));
    }
    let _in_flight = InFlight { state, entry };
    if let Some(answer) = state.control.stored_answer(&tenant, &key).await? {
        if answer.fingerprint != print {
            return Err(ApiError::conflict("this Idempotency-Key was used for a different request"));
        }
        return Ok(replay(answer));
    }
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_STORED_ANSWER)
        .await
        .map_err(|e| ApiError::invalid(format!("the answer could not be read: {e}"), None))?;
    // Server errors are not remembered: a retry should get a fresh try. Nor is a new tenant's
    // answer: it holds a token, and tokens are only ever stored hashed.
    if !parts.status.is_server_error() && uri.trim_end_matches('/') != "/v1/tenants" {
        let answer = StoredAnswer {
            fingerprint: print,
            status: parts.status.as_u16(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
        };
        state.control.store_answer(&tenant, &key, &answer).await?;
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

fn replay(answer: StoredAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let mut response = (status, answer.body).into_response();
    let headers = response.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}
