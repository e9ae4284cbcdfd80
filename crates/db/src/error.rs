//! The db crate's errors, and the one place where they become HTTP
//! answers: a status and a JSON body ([`ErrorBody`]: rqlite's `error`,
//! scaleout's `code`, the leader where one is known). Per-statement SQL
//! errors are not errors here: they stay inside `results`, status 200, as
//! rqlite answers them.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use scaleout_wire::data::{ErrorBody, ErrorCode};

use crate::auth::Denied;

/// Why a node could not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("not the leader{}", .leader.as_deref().map(|l| format!("; the leader is {l}")).unwrap_or_default())]
    NotLeader { leader: Option<String> },
    #[error("no leader: the cluster cannot take writes now")]
    NoLeader,
    #[error("index {0} not applied here in time")]
    NotCaughtUp(u64),
    /// A read asked for a log index the cluster has not reached (a
    /// session cookie from another cluster, or forged): refused at once.
    #[error("min_index {asked} is beyond the cluster's log (it has committed {committed}); drop it or use an index a write returned")]
    AheadOfLog { asked: u64, committed: u64 },
    #[error("data on this node is staler than the freshness asked for")]
    Stale,
    /// The leader lost its quorum while the write waited to commit: it may
    /// still be committed by the next leader, or never.
    #[error("the leader lost its quorum while the write was pending; its outcome is unknown")]
    OutcomeUnknown,
    /// A write whose fate this node cannot tell: forwarded to the leader
    /// and lost after it was sent, or pending when this node's Raft
    /// stopped. It may have been done.
    #[error("{0}; its outcome is unknown")]
    ForwardUnknown(String),
    /// Every read connection stayed busy for the read's whole time.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    pub fn status(&self) -> StatusCode {
        match self {
            NodeError::NotLeader { .. }
            | NodeError::NoLeader
            | NodeError::NotCaughtUp(_)
            | NodeError::Stale
            | NodeError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::OutcomeUnknown | NodeError::ForwardUnknown(_) => StatusCode::GATEWAY_TIMEOUT,
            NodeError::AheadOfLog { .. } => StatusCode::BAD_REQUEST,
            NodeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl NodeError {
    /// The code a program branches on.
    pub fn code(&self) -> ErrorCode {
        match self {
            NodeError::NotLeader { .. } => ErrorCode::NotLeader,
            NodeError::NoLeader => ErrorCode::NoLeader,
            NodeError::NotCaughtUp(_) => ErrorCode::NotCaughtUp,
            NodeError::AheadOfLog { .. } => ErrorCode::MinIndexAheadOfLog,
            NodeError::Stale => ErrorCode::Stale,
            NodeError::OutcomeUnknown | NodeError::ForwardUnknown(_) => ErrorCode::OutcomeUnknown,
            NodeError::Busy(_) => ErrorCode::Busy,
            NodeError::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl IntoResponse for NodeError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = ErrorBody::new(self.to_string(), Some(self.code()));
        if let NodeError::NotLeader { leader } = self {
            body.leader = leader;
        }
        (status, axum::Json(body)).into_response()
    }
}

/// A request the node's users may not make: `401` (with the challenge
/// that makes clients send Basic credentials) or `403`.
pub fn denied_response(denied: &Denied) -> Response {
    match denied {
        Denied::Unauthenticated(why) => {
            let mut resp = error(StatusCode::UNAUTHORIZED, why);
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"scaleout\""),
            );
            resp
        }
        Denied::Forbidden(why) => error(StatusCode::FORBIDDEN, why),
    }
}

/// An error answer that is not a [`NodeError`]: a bad request, a missing
/// endpoint, a failed backup. The code follows from the status.
pub fn error(status: StatusCode, msg: &str) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST
        | StatusCode::NOT_FOUND
        | StatusCode::METHOD_NOT_ALLOWED
        | StatusCode::CONFLICT => Some(ErrorCode::BadRequest),
        StatusCode::UNAUTHORIZED => Some(ErrorCode::Unauthorized),
        StatusCode::FORBIDDEN => Some(ErrorCode::Forbidden),
        s if s.is_server_error() => Some(ErrorCode::Internal),
        _ => None,
    };
    (status, axum::Json(ErrorBody::new(msg, code))).into_response()
}
