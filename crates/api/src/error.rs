//! Errors as HTTP answers: one status and one JSON shape per kind (docs/api.md, "Errors").

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cairn_control::Error;
use serde_json::json;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, field: Option<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, code: "invalid", message: message.into(), field }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::CONFLICT, code: "conflict", message: message.into(), field: None }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, code: "not_found", message: message.into(), field: None }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code, field) = match &e {
            Error::Invalid { field, .. } => (StatusCode::BAD_REQUEST, "invalid", field.map(str::to_string)),
            Error::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", None),
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found", None),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict", None),
            Error::Hook(_) => (StatusCode::BAD_GATEWAY, "hook_failed", None),
            Error::QuotaExceeded(_) => (StatusCode::FORBIDDEN, "quota_exceeded", None),
            // The engine refuses requests the control plane let through (a size, a range):
            // the client's fault, not the server's.
            Error::Engine(
                cairn_control::volume::Error::InvalidSize { .. } | cairn_control::volume::Error::InvalidRequest(_),
            ) => (StatusCode::CONFLICT, "conflict", None),
            Error::Metadata(_) | Error::Engine(_) | Error::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", None)
            }
        };
        ApiError { status, code, message: e.to_string(), field }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(field) = self.field {
            error["field"] = json!(field);
        }
        (self.status, axum::Json(json!({ "error": error }))).into_response()
    }
}
