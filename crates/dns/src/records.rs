//! The records API on the HTTP listener: a load balancer added or taken
//! away enters or leaves the answers without a restart (what an operator
//! does with Route 53's API or `nsupdate`).
//!
//! - `GET /hosts`: every name, its addresses and whether each passes its
//!   health check.
//! - `POST /hosts/{name}` with `{"addr": "127.0.0.4"}`: adds an address
//!   (the name is made when new); `201` when added, `200` when it was
//!   there.
//! - `DELETE /hosts/{name}/{addr}`: takes one out; a name given at start
//!   keeps at least one address (`409`), one made here goes with its last.
//!
//! `{name}` is relative to the zone (`www`), `@` for the apex, or a name
//! in the zone ending in a dot. Edits live in memory: a restart serves
//! the configured zone again. Reading wants the `/metrics` token when
//! there is one; editing always wants a token (`--http-token-file`), so a
//! server started without one cannot be edited at all.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::health::Health;
use crate::server::bearer_matches;
use crate::zone::{Removal, Zone};

#[derive(Clone)]
struct Records {
    zone: Arc<RwLock<Zone>>,
    health: Arc<Health>,
    token: Option<String>,
}

/// The routes, for the server's HTTP listener.
pub(crate) fn router(
    zone: Arc<RwLock<Zone>>,
    health: Arc<Health>,
    token: Option<String>,
) -> Router {
    Router::new()
        .route("/hosts", get(list))
        .route("/hosts/{name}", axum::routing::post(add))
        .route("/hosts/{name}/{addr}", delete(remove))
        .layer(DefaultBodyLimit::max(4096))
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .with_state(Records {
            zone,
            health,
            token,
        })
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct HostView {
    pub name: String,
    pub addrs: Vec<AddrView>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct AddrView {
    pub addr: IpAddr,
    /// Passes its health check (and is answered).
    pub up: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAddr {
    addr: IpAddr,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// A refused request: its status and what to fix.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

impl Records {
    /// Reading: the token when there is one.
    fn may_read(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if bearer_matches(headers, self.token.as_deref()) {
            Ok(())
        } else {
            Err(Refusal(
                StatusCode::UNAUTHORIZED,
                "this wants Authorization: Bearer <token>".into(),
            ))
        }
    }

    /// Editing: a token, always.
    fn may_edit(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.token.is_none() {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "this server takes no edits: start it with --http-token-file".into(),
            ));
        }
        self.may_read(headers)
    }

    fn name(&self, label: &str) -> Result<hickory_proto::rr::Name, Refusal> {
        let zone = self.zone.read().map_err(|_| {
            Refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the zone is unavailable".into(),
            )
        })?;
        zone.name_of(label)
            .map_err(|e| Refusal(StatusCode::BAD_REQUEST, e))
    }
}

fn poisoned() -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, "the zone is unavailable")
}

async fn list(State(r): State<Records>, headers: HeaderMap) -> Response {
    if let Err(refused) = r.may_read(&headers) {
        return refused.into_response();
    }
    let Ok(zone) = r.zone.read() else {
        return poisoned();
    };
    let hosts: Vec<HostView> = zone
        .hosts
        .iter()
        .map(|h| HostView {
            name: h.name.to_string(),
            addrs: h
                .addrs
                .iter()
                .map(|a| AddrView {
                    addr: *a,
                    up: r.health.is_up(*a),
                })
                .collect(),
        })
        .collect();
    Json(serde_json::json!({ "zone": zone.origin.to_string(), "hosts": hosts })).into_response()
}

async fn add(
    State(r): State<Records>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Json<NewAddr>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(refused) = r.may_edit(&headers) {
        return refused.into_response();
    }
    let Path(label) = match path {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let Json(new) = match body {
        Ok(b) => b,
        Err(e) => {
            let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return error(
                status,
                format!("send {{\"addr\": \"IP\"}} as JSON: {}", e.body_text()),
            );
        }
    };
    if !crate::zone::connectable(new.addr) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{} is not an address a client can connect to", new.addr),
        );
    }
    let name = match r.name(&label) {
        Ok(n) => n,
        Err(refused) => return refused.into_response(),
    };
    let Ok(mut zone) = r.zone.write() else {
        return poisoned();
    };
    match zone.add(&name, new.addr) {
        Ok(true) => {
            tracing::info!(%name, addr = %new.addr, "address added to the answers");
            (
                StatusCode::CREATED,
                Json(serde_json::json!({ "name": name.to_string(), "addr": new.addr })),
            )
                .into_response()
        }
        Ok(false) => {
            Json(serde_json::json!({ "name": name.to_string(), "addr": new.addr })).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn remove(
    State(r): State<Records>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = r.may_edit(&headers) {
        return refused.into_response();
    }
    let Path((label, addr)) = match path {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let name = match r.name(&label) {
        Ok(n) => n,
        Err(refused) => return refused.into_response(),
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{addr:?} is not an IP address"),
        );
    };
    let Ok(mut zone) = r.zone.write() else {
        return poisoned();
    };
    match zone.remove(&name, addr) {
        Ok(()) => {
            tracing::info!(%name, %addr, "address taken out of the answers");
            Json(serde_json::json!({ "name": name.to_string(), "removed": addr })).into_response()
        }
        Err(Removal::Absent) => error(
            StatusCode::NOT_FOUND,
            format!("{name} has no address {addr}"),
        ),
        Err(Removal::Last) => error(
            StatusCode::CONFLICT,
            format!("{addr} is {name}'s last address: a name keeps one (its answers would turn NXDOMAIN)"),
        ),
    }
}
