//! The control plane's one error type. Each variant maps onto one HTTP status in the API.

/// Why a control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; `field` names the request field at fault.
    #[error("{message}")]
    Invalid { field: Option<&'static str>, message: String },
    #[error("missing or unknown API token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    /// No such resource in the caller's tenant (another tenant's resource looks the same).
    #[error("{kind} {reference:?} not found")]
    NotFound { kind: &'static str, reference: String },
    /// The request breaks a rule of the lifecycle (a name taken, an attached volume, ...).
    #[error("{0}")]
    Conflict(String),
    #[error("metadata store: {0}")]
    Metadata(#[from] sqlx::Error),
    #[error("volume engine: {0}")]
    Engine(#[from] cairn_volume::Error),
    /// A pre or post hook failed (a command's exit, a webhook's answer); the user's setup is
    /// at fault, not cairn.
    #[error("{0}")]
    Hook(String),
    /// The request would take the tenant over its quota; nothing was done.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid { field: Some(field), message: message.into() }
    }

    pub fn not_found(kind: &'static str, reference: &str) -> Self {
        Error::NotFound { kind, reference: reference.to_string() }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Error::Conflict(message.into())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(format!("I/O error: {e}"))
    }
}
