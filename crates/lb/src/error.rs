//! The load balancer's errors: fatal ones ([`Error`], [`ConfigError`]) apart
//! from per-request ones ([`ProxyError`]), which say where they came from and
//! whether a retry on another backend is safe. [`ErrorAnswer`] is the one
//! place an error becomes an answer (status, JSON body, headers); the two
//! request paths only write it out, as bytes or as an `http::Response`.

use bytes::Bytes;
use http::StatusCode;

/// A configuration the load balancer cannot run with.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}

/// Fatal errors: the load balancer cannot start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Which side of the proxy a per-request error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something we refuse.
    Downstream,
    /// The backend failed.
    Upstream,
    /// The load balancer itself cannot serve (no backend).
    Internal,
}

/// One failed attempt at serving a request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// TCP connect (or the HTTP handshake) to the backend failed: nothing
    /// was sent, so any request may go elsewhere.
    #[error("connecting to backend {backend} failed: {reason}")]
    Connect { backend: String, reason: String },
    /// The connection broke before the request was written: safe to retry.
    #[error("sending the request to backend {backend} failed: {reason}")]
    NotSent { backend: String, reason: String },
    /// The request was (maybe) written and the exchange failed: only
    /// idempotent requests may be retried.
    #[error("backend {backend} failed: {reason}")]
    Exchange { backend: String, reason: String },
    #[error("backend {backend} did not answer within {timeout:?}")]
    Timeout {
        backend: String,
        timeout: std::time::Duration,
    },
    #[error("no healthy backend")]
    NoBackend,
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request body stopped arriving, or came slower than the minimum rate.
    #[error("the request body arrived too slowly")]
    BodyTimeout,
    /// A transfer coding the load balancer does not decode (RFC 9112 §6.1).
    #[error("transfer coding {0:?} is not supported: send chunked alone, or a Content-Length")]
    UnsupportedCoding(String),
    /// The client has as many requests in flight as it may.
    #[error("too many requests in flight from this address; finish some first")]
    TooManyInFlight,
    /// The client is over its request rate.
    #[error("too many requests from this address; slow down")]
    RateLimited,
    /// The spool for large request bodies is full.
    #[error("the load balancer has no room for this request body now; retry later")]
    SpoolFull,
}

impl ProxyError {
    pub fn side(&self) -> Side {
        match self {
            ProxyError::Connect { .. }
            | ProxyError::NotSent { .. }
            | ProxyError::Exchange { .. }
            | ProxyError::Timeout { .. } => Side::Upstream,
            ProxyError::NoBackend => Side::Internal,
            ProxyError::BodyTooLarge { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::BodyTimeout
            | ProxyError::RateLimited
            | ProxyError::TooManyInFlight
            | ProxyError::UnsupportedCoding(_) => Side::Downstream,
            ProxyError::SpoolFull => Side::Internal,
        }
    }

    /// Whether the request may be sent to another backend after this error.
    /// A request the backend may have acted on is replayed only when it is
    /// idempotent (RFC 9110 §9.2.2, or carries `Idempotency-Key`).
    pub fn retryable(&self, idempotent: bool) -> bool {
        match self {
            ProxyError::Connect { .. } | ProxyError::NotSent { .. } => true,
            ProxyError::Exchange { .. } | ProxyError::Timeout { .. } => idempotent,
            ProxyError::NoBackend
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::BodyTimeout
            | ProxyError::RateLimited
            | ProxyError::TooManyInFlight
            | ProxyError::UnsupportedCoding(_)
            | ProxyError::SpoolFull => false,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect { .. }
            | ProxyError::NotSent { .. }
            | ProxyError::Exchange { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UnsupportedCoding(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::RateLimited | ProxyError::TooManyInFlight => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::SpoolFull => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An answer the load balancer makes itself: a status, and a JSON body
/// that says what went wrong (`{"error": "..."}`); `Retry-After: 1` with a
/// 429, when waiting is what helps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorAnswer {
    pub status: StatusCode,
    pub message: String,
}

impl ErrorAnswer {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ErrorAnswer {
            status,
            message: message.into(),
        }
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(serde_json::json!({ "error": self.message }).to_string())
    }

    /// The headers besides the body's length.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        let retry = (self.status == StatusCode::TOO_MANY_REQUESTS).then_some(("retry-after", "1"));
        std::iter::once(("content-type", "application/json")).chain(retry)
    }
}

impl From<&ProxyError> for ErrorAnswer {
    fn from(e: &ProxyError) -> Self {
        ErrorAnswer::new(e.status(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unsent_requests_are_retried_unless_idempotent() {
        let connect = ProxyError::Connect {
            backend: "b".into(),
            reason: "refused".into(),
        };
        let exchange = ProxyError::Exchange {
            backend: "b".into(),
            reason: "reset".into(),
        };
        assert!(connect.retryable(false) && connect.retryable(true));
        assert!(
            !exchange.retryable(false),
            "a POST that was sent is never replayed"
        );
        assert!(exchange.retryable(true));
        assert!(!ProxyError::NoBackend.retryable(true));
        assert_eq!(exchange.side(), Side::Upstream);
        assert_eq!(
            ProxyError::BodyTooLarge { limit: 1 }.side(),
            Side::Downstream
        );
        assert_eq!(
            ProxyError::NoBackend.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn answers_are_json_and_say_when_to_come_back() {
        let limited = ErrorAnswer::from(&ProxyError::RateLimited);
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
        let body: serde_json::Value = serde_json::from_slice(&limited.body()).unwrap();
        assert_eq!(body["error"], ProxyError::RateLimited.to_string());
        let headers: Vec<_> = limited.headers().collect();
        assert_eq!(
            headers,
            [("content-type", "application/json"), ("retry-after", "1")]
        );
        let quote = ErrorAnswer::new(StatusCode::BAD_REQUEST, "a \"quoted\"\n name");
        let body: serde_json::Value = serde_json::from_slice(&quote.body()).unwrap();
        assert_eq!(body["error"], "a \"quoted\"\n name");
        assert_eq!(
            ErrorAnswer::from(&ProxyError::NoBackend).headers().count(),
            1
        );
    }
}
