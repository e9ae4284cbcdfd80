//! The admin API, on its own listener: list the pool, add, remove, drain and
//! re-weight backends (a backend added here takes traffic at once — the
//! seed's C8), and the load balancer's `/metrics` and `/healthz`. When a
//! token is configured, everything but `/healthz` and `/metrics` wants
//! `Authorization: Bearer <token>`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::addr::BackendAddr;
use crate::backend::Backend;
use crate::config::BackendConfig;
use crate::worker::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    let guarded = Router::new()
        .route("/backends", get(list).post(add))
        .route("/backends/{name}", get(show).delete(remove).patch(update))
        .route("/backends/{name}/drain", post(drain))
        .route("/backends/{name}/undrain", post(undrain))
        .route("/config", get(config))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(guarded)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such admin route") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .with_state(shared)
}

fn error(status: StatusCode, msg: &str) -> Response {
    AdminError(status, msg.to_string()).into_response()
}

/// Equality whose time does not depend on where the inputs differ (a
/// token guessed byte by byte learns nothing from the timing).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An admin request refused: the one place admin errors become responses.
struct AdminError(StatusCode, String);

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

async fn require_token(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(token) = &shared.config.admin_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same_bytes(g.as_bytes(), token.as_bytes())) {
            return error(
                StatusCode::UNAUTHORIZED,
                "admin API needs Authorization: Bearer <token>",
            );
        }
    }
    next.run(req).await
}

fn view(b: &Backend, now_ms: u64) -> Value {
    let ejected_for_ms = b
        .ejected_until
        .load(Ordering::Relaxed)
        .saturating_sub(now_ms);
    json!({
        "name": b.name,
        "url": b.url,
        "address": b.addr.to_string(),
        "weight": b.weight(),
        "health": if b.up.load(Ordering::Relaxed) { "up" } else { "down" },
        "available": b.available(now_ms),
        "draining": b.draining.load(Ordering::Relaxed),
        "ejected_for_ms": ejected_for_ms,
        "in_flight": b.in_flight(),
        "ewma_latency_ms": b.ewma_estimate(Instant::now()).as_secs_f64() * 1e3,
        "requests": b.stats.requests(),
        "errors": b.stats.errors(),
        "failures": b.stats.failures.load(Ordering::Relaxed),
        "ejections": b.stats.ejections.load(Ordering::Relaxed),
    })
}

fn now_ms(shared: &Shared) -> u64 {
    shared.clock.millis(Instant::now())
}

/// Ready to take traffic: at least one backend available (a container
/// orchestrator's readiness probe; `/healthz` says only that it runs).
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let now = now_ms(&shared);
    let pool = shared.pool.snapshot();
    let available = pool.iter().filter(|b| b.available(now)).count();
    let status = if available > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "ready": available > 0, "backends": pool.len(), "available": available })),
    )
        .into_response()
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let now = now_ms(&shared);
    let pool = shared.pool.snapshot();
    let available = pool.iter().filter(|b| b.available(now)).count();
    Json(json!({ "status": "ok", "backends": pool.len(), "available": available }))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let registry = scaleout_metrics::Scrape(move |w: &mut scaleout_metrics::Writer<'_>| {
        let backends = shared.pool.list();
        crate::metrics::write(w, &shared.stats, &backends, &shared.bodies, now_ms(&shared))?;
        crate::metrics::write_discovery(w, &shared.discovery)
    })
    .registry();
    (
        [(header::CONTENT_TYPE, scaleout_metrics::CONTENT_TYPE)],
        scaleout_metrics::render(&registry),
    )
}

async fn config(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let mut cfg = serde_json::to_value(&shared.config).unwrap_or(Value::Null);
    if let Some(token) = cfg.get_mut("admin_token").filter(|t| !t.is_null()) {
        *token = json!("<redacted>");
    }
    Json(cfg)
}

async fn list(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let now = now_ms(&shared);
    let backends: Vec<Value> = shared
        .pool
        .snapshot()
        .iter()
        .map(|b| view(b, now))
        .collect();
    Json(json!({ "algorithm": shared.config.algorithm, "backends": backends }))
}

fn find(
    shared: &Shared,
    path: Result<Path<String>, PathRejection>,
) -> Result<Arc<Backend>, AdminError> {
    let Path(name) = path.map_err(|e| AdminError(StatusCode::BAD_REQUEST, e.body_text()))?;
    shared
        .pool
        .find(&name)
        .ok_or_else(|| AdminError(StatusCode::NOT_FOUND, format!("no backend named {name:?}")))
}

fn parse_json<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, AdminError> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json_type {
        return Err(AdminError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send JSON with Content-Type: application/json".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| AdminError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

async fn show(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    match find(&shared, path) {
        Ok(b) => Json(view(&b, now_ms(&shared))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn add(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let cfg: BackendConfig = match parse_json(&headers, &body) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let addr = match BackendAddr::parse(&cfg.url) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if addr.tls && shared.config.upstream_tls.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "an https:// backend needs the load balancer started with --backend-ca",
        );
    }
    let resolved = match addr.resolve().await {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    match shared.pool.add(&cfg, resolved) {
        Ok(b) => {
            tracing::info!(backend = %b.name, url = %b.url, "backend added");
            (StatusCode::CREATED, Json(view(&b, now_ms(&shared)))).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

async fn remove(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let b = match find(&shared, path) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match shared.pool.remove(&b.name) {
        Some(b) => {
            tracing::info!(backend = %b.name, in_flight = b.in_flight(), "backend removed");
            StatusCode::NO_CONTENT.into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            &format!("no backend named {:?}", b.name),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Update {
    weight: Option<u32>,
    draining: Option<bool>,
}

async fn update(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let b = match find(&shared, path) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let update: Update = match parse_json(&headers, &body) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    if let Some(w) = update.weight {
        b.weight.store(w, Ordering::Relaxed);
    }
    if let Some(d) = update.draining {
        b.draining.store(d, Ordering::Relaxed);
    }
    tracing::info!(backend = %b.name, weight = b.weight(), draining = b.draining.load(Ordering::Relaxed), "backend updated");
    Json(view(&b, now_ms(&shared))).into_response()
}

async fn drain(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    set_draining(&shared, path, true)
}

async fn undrain(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    set_draining(&shared, path, false)
}

fn set_draining(
    shared: &Shared,
    path: Result<Path<String>, PathRejection>,
    draining: bool,
) -> Response {
    match find(shared, path) {
        Ok(b) => {
            b.draining.store(draining, Ordering::Relaxed);
            tracing::info!(backend = %b.name, draining, "backend drain changed");
            Json(view(&b, now_ms(shared))).into_response()
        }
        Err(e) => e.into_response(),
    }
}
