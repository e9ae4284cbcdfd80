//! The web crate's one error type, and the one place where errors become
//! HTTP responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Why the data tier could not answer. Owned by the web crate, returned by
/// every [`crate::Store`] implementation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The code is already taken (unique constraint). The caller picks another.
    #[error("link code {code:?} already exists")]
    Conflict { code: String },
    /// The database node could not be reached or refused to serve; a later
    /// attempt may succeed.
    #[error("database {node} unavailable: {reason}")]
    Unavailable { node: String, reason: String },
    /// A write was sent and the database did not say whether it happened
    /// (the leader lost its quorum with the write pending, the connection
    /// broke after sending): it may or may not be stored.
    #[error("database {node} did not confirm the write ({reason}); it may or may not have been stored: look before trying again")]
    OutcomeUnknown { node: String, reason: String },
    /// Anything else the database reported: a bug or corrupted state.
    #[error("database {node} failed: {reason}")]
    Internal { node: String, reason: String },
}

/// An error answered to a client of the web app.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A browser's request this site did not make (a cross-site form), or
    /// a token that does not open this door.
    #[error("{0}")]
    Forbidden(String),
    /// No credentials where some are needed.
    #[error("{0}")]
    Unauthorized(String),
    /// This client is over its rate; it may try again after `retry_after` seconds.
    #[error("too many links created or deleted from this address; try again in {retry_after} s")]
    TooManyRequests { retry_after: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Store(StoreError::Unavailable { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            // Its own status: not "try again" (503), which could store a
            // second link, nor a plain failure (500), which says nothing
            // was stored.
            AppError::Store(StoreError::OutcomeUnknown { .. }) => StatusCode::GATEWAY_TIMEOUT,
            AppError::Store(StoreError::Conflict { .. } | StoreError::Internal { .. }) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl AppError {
    /// What the status asks of the client: when to come back, how to sign in.
    pub fn add_headers(&self, headers: &mut axum::http::HeaderMap) {
        use axum::http::{header, HeaderValue};
        match self {
            AppError::TooManyRequests { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            AppError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"links\""),
                );
            }
            _ => {}
        }
    }
}

/// JSON error responses: `{"error": "..."}` with the status above. HTML routes
/// render their own error pages (see `html.rs`) and use this only for status.
impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let body = match &self {
            AppError::Store(StoreError::OutcomeUnknown { .. }) => {
                serde_json::json!({ "error": self.to_string(), "outcome": "unknown" })
            }
            _ => serde_json::json!({ "error": self.to_string() }),
        };
        let mut resp = (status, Json(body)).into_response();
        self.add_headers(resp.headers_mut());
        resp
    }
}
