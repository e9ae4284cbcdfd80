//! Routes and handlers of the links app, and the middleware every response
//! passes through (`X-Served-By`, `X-Request-Id`, metrics, access log).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::abuse::{self, CreateLimit};
use crate::cache::LinkCache;
use crate::error::{AppError, StoreError};
use crate::html::{self, HomePage};
use crate::links;
use crate::metrics::{RequestLabels, RouteLabels, WebMetrics};
use crate::store::{Deleted, Deleter, Link, ReadOpts, Store, Written};
use crate::WebConfig;

pub static X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
pub static X_DB_NODE: HeaderName = HeaderName::from_static("x-db-node");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// How many links the home page lists.
const HOME_LINKS: u32 = 20;
/// `GET /api/links` default and maximum `limit`: more is paged (`before`).
const LIST_DEFAULT: u32 = 20;
const LIST_MAX: u32 = 100;
/// The cookie that shows a form user their new link's delete token once.
const TOKEN_COOKIE_PREFIX: &str = "scaleout_delete_";
/// Attempts at drawing an unused code before giving up (each collision has
/// odds of about n / 3.5e12).
const CODE_ATTEMPTS: usize = 8;

pub struct App {
    pub config: WebConfig,
    pub store: Arc<dyn Store>,
    pub cache: LinkCache,
    pub metrics: WebMetrics,
    pub create_limit: CreateLimit,
    served_by: HeaderValue,
}

impl App {
    pub fn new(config: WebConfig, store: Arc<dyn Store>) -> Result<Self, crate::Error> {
        config.validate()?;
        let served_by = HeaderValue::from_str(&config.name).map_err(|_| {
            crate::Error::Config(format!(
                "server name {:?} is not a valid header value",
                config.name
            ))
        })?;
        Ok(App {
            cache: LinkCache::new(config.cache_capacity, config.cache_ttl),
            metrics: WebMetrics::new(&config.name),
            create_limit: CreateLimit::new(config.create_per_minute, config.create_burst),
            served_by,
            store,
            config,
        })
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/links", post(create_form))
        .route("/api/links", post(create_api).get(list_api))
        .route("/api/links/{code}", get(get_api).delete(delete_api))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/{code}", get(redirect))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// Sent with every response.
const SECURITY_HEADERS: [(HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_FRAME_OPTIONS, "DENY"),
];

/// Whether a browser says this request comes from another site (its
/// `Sec-Fetch-Site`, or an `Origin` whose host is not the one asked):
/// a cross-site form post (CSRF). Clients that send neither (curl, the
/// API's users) are not browsers acting for someone else.
fn cross_site(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    let Some(origin) = text("origin") else {
        return false;
    };
    let host = text("x-forwarded-host")
        .or_else(|| text("host"))
        .unwrap_or("");
    let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
    origin == "null" || !origin_host.eq_ignore_ascii_case(host)
}

/// Every response: names this server, carries the request id (kept from the
/// client or load balancer, else made here), is counted and timed.
async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| scaleout_wire::request_id::acceptable(v.as_bytes()))
        .cloned()
        .unwrap_or_else(new_request_id);
    let span = tracing::info_span!(
        "request",
        %method,
        route,
        request_id = %request_id.to_str().unwrap_or("-"),
    );
    // The database requests this one makes carry its id.
    let id = request_id.to_str().unwrap_or("-").to_string();
    let mut resp = scaleout_client::with_request_id(id, next.run(req))
        .instrument(span.clone())
        .await;
    let headers = resp.headers_mut();
    headers.insert(X_SERVED_BY.clone(), app.served_by.clone());
    headers.insert(X_REQUEST_ID.clone(), request_id);
    // The pages load nothing but their own inline style and post only
    // to this site; nothing may frame them or learn where users came from.
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.to_string(),
            route: route.clone(),
            status,
        })
        .inc();
    app.metrics
        .latency
        .get_or_create(&RouteLabels { route })
        .observe(elapsed.as_secs_f64());
    span.in_scope(|| tracing::debug!(status, micros = elapsed.as_micros() as u64, "served"));
    resp
}

fn new_request_id() -> HeaderValue {
    // 32 lowercase hex digits are always a valid header value.
    HeaderValue::from_bytes(&scaleout_wire::request_id::new())
        .unwrap_or(HeaderValue::from_static("-"))
}

/// The link as the JSON API shows it.
#[derive(Serialize)]
struct LinkView {
    code: String,
    url: String,
    short_url: String,
    created_at: String,
    /// Only in the answer to the creation: what deletes the link.
    #[serde(skip_serializing_if = "Option::is_none")]
    delete_token: Option<String>,
}

impl LinkView {
    fn new(link: Link, base: &str) -> Self {
        LinkView {
            short_url: format!("{base}/{}", link.code),
            code: link.code,
            url: link.url,
            created_at: link.created_at,
            delete_token: None,
        }
    }
}

/// The peer of a request, when the server says (it does; a router
/// driven directly in a unit test does not).
type Peer = Option<axum::Extension<ConnectInfo<SocketAddr>>>;

/// Refuses a creation past the client's rate.
fn check_create_rate(app: &App, headers: &HeaderMap, peer: &Peer) -> Result<(), AppError> {
    let peer = peer
        .as_ref()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |p| p.0 .0);
    let client = abuse::client_ip(headers, peer, &app.config.trusted_proxies);
    app.create_limit.check(client).map_err(|retry_after| {
        app.metrics.rate_limited.inc();
        AppError::TooManyRequests { retry_after }
    })
}

/// The scheme and host short URLs are built on: the configured public URL,
/// else what the load balancer forwarded, else the request's Host.
fn base_url(app: &App, headers: &HeaderMap) -> String {
    if let Some(public) = &app.config.public_url {
        return public.trim_end_matches('/').to_string();
    }
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').next().unwrap_or("").trim())
            .filter(|v| !v.is_empty())
    };
    let safe = |h: &&str| {
        h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    };
    let host = text("x-forwarded-host")
        .filter(safe)
        .or_else(|| text("host").filter(safe))
        .unwrap_or("localhost");
    let proto = match text("x-forwarded-proto") {
        Some("https") => "https",
        _ => "http",
    };
    format!("{proto}://{host}")
}

/// The cookie that carries a browser's session guarantees across web
/// servers: the highest log index it has seen, from its own writes
/// (read-your-writes) and from the reads it was served (monotonic reads). A
/// read with it is served only by a database node that has applied that
/// index, so the browser never sees its writes vanish or the data go back
/// in time when the next request lands on another replica.
const SEEN_COOKIE: &str = "scaleout_seen";

/// What this client must see: `min_index` from its cookie.
fn seen(headers: &HeaderMap) -> ReadOpts {
    let min_index = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == SEEN_COOKIE)
        .filter_map(|(_, value)| value.parse::<u64>().ok())
        .max();
    ReadOpts { min_index }
}

/// Remembers the index of the state a read showed the client; a cookie
/// the database found beyond its log is replaced, not kept.
fn remember_served(
    resp: Response,
    headers: &HeaderMap,
    index: Option<u64>,
    reset: bool,
) -> Response {
    if reset {
        return set_seen(resp, index);
    }
    remember(resp, headers, index)
}

/// Remembers an index the client has seen in its cookie, when it is newer
/// than the one the cookie holds.
fn remember(resp: Response, headers: &HeaderMap, index: Option<u64>) -> Response {
    if seen(headers)
        .min_index
        .is_some_and(|old| index.is_some_and(|i| old >= i))
    {
        return resp;
    }
    set_seen(resp, index)
}

fn set_seen(mut resp: Response, index: Option<u64>) -> Response {
    let Some(index) = index else {
        return resp;
    };
    let cookie = format!("{SEEN_COOKIE}={index}; Path=/; Max-Age=300; SameSite=Lax; HttpOnly");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

fn with_db_node(mut resp: Response, node: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(node) {
        resp.headers_mut().insert(X_DB_NODE.clone(), v);
    }
    resp
}

/// Creates a link; returns it with its delete token.
async fn create_link(app: &App, raw_url: &str) -> Result<(Written<Link>, String), AppError> {
    let url = links::validate_url(raw_url).map_err(AppError::BadRequest)?;
    let created_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let token = links::new_delete_token(&mut rand::rng());
    let delete_hash = Some(links::token_hash(&token));
    for _ in 0..CODE_ATTEMPTS {
        let code = links::new_code(&mut rand::rng());
        let link = Link {
            code,
            url: url.clone(),
            created_at: created_at.clone(),
            delete_hash: delete_hash.clone(),
        };
        match app.store.insert(&link).await {
            Ok(w) => {
                tracing::info!(code = %link.code, node = %w.node, "link created");
                let written = Written {
                    value: link,
                    node: w.node,
                    index: w.index,
                };
                return Ok((written, token));
            }
            Err(StoreError::Conflict { code }) => {
                tracing::debug!(%code, "code taken, drawing another")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Internal {
        node: "-".into(),
        reason: format!("no free code after {CODE_ATTEMPTS} attempts"),
    }
    .into())
}

/// Reads a request body, refusing more than the configured limit.
async fn read_body(app: &App, body: Body) -> Result<Bytes, AppError> {
    let limit = app.config.max_body_bytes;
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| AppError::PayloadTooLarge { limit })
}

fn content_type_is(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn home(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let created = query_param(query.as_deref(), "created").filter(|c| links::is_valid_code(c));
    let resp = render_home(&app, &headers, StatusCode::OK, None, created.as_deref()).await;
    // The token cookie has been shown: it goes.
    match created.filter(|c| cookie(&headers, &format!("{TOKEN_COOKIE_PREFIX}{c}")).is_some()) {
        Some(code) => with_cookie(
            resp,
            &format!("{TOKEN_COOKIE_PREFIX}{code}=; Path=/; Max-Age=0; SameSite=Strict; HttpOnly"),
        ),
        None => resp,
    }
}

async fn render_home(
    app: &App,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<(&str, &str)>,
    created: Option<&str>,
) -> Response {
    match app.store.newest(HOME_LINKS, None, seen(headers)).await {
        Ok(served) => {
            let base = base_url(app, headers);
            let short = created.map(|c| format!("{base}/{c}"));
            let token = created.and_then(|c| {
                cookie(headers, &format!("{TOKEN_COOKIE_PREFIX}{c}"))
                    .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
            });
            let page = html::home(&HomePage {
                links: &served.value.links,
                error,
                created: short.as_deref(),
                delete_token: token.as_deref(),
                base: &base,
                web_server: &app.config.name,
                db_node: &served.node,
            });
            let resp = with_db_node((status, Html(page)).into_response(), &served.node);
            remember_served(resp, headers, served.index, served.session_reset)
        }
        Err(e) => html_error(app, AppError::from(e)),
    }
}

fn html_error(app: &App, err: AppError) -> Response {
    let status = err.status();
    if status.is_server_error() {
        tracing::warn!(error = %err, "request failed");
    }
    let title = status.canonical_reason().unwrap_or("Error");
    let mut resp = (
        status,
        Html(html::error_page(title, &err.to_string(), &app.config.name)),
    )
        .into_response();
    err.add_headers(resp.headers_mut());
    resp
}

/// The HTML form's target: post/redirect/get on success, the page again
/// with the message on bad input.
async fn create_form(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if cross_site(&headers) {
        let err =
            AppError::Forbidden("this form may only be sent from this site's own page".into());
        return html_error(&app, err);
    }
    if let Err(e) = check_create_rate(&app, &headers, &peer) {
        return html_error(&app, e);
    }
    if !content_type_is(&headers, "application/x-www-form-urlencoded") {
        let err = AppError::UnsupportedMediaType(
            "the form must be sent as application/x-www-form-urlencoded".into(),
        );
        return html_error(&app, err);
    }
    let body = match read_body(&app, body).await {
        Ok(b) => b,
        Err(e) => return html_error(&app, e),
    };
    let typed = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "url")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    match create_link(&app, &typed).await {
        Ok((w, token)) => {
            let code = &w.value.code;
            let location = format!("/?created={code}");
            let resp = with_db_node(
                (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
                &w.node,
            );
            // The delete token rides to the next page in a cookie, not in
            // the URL (where logs and history would keep it).
            let resp = with_cookie(
                resp,
                &format!("{TOKEN_COOKIE_PREFIX}{code}={token}; Path=/; Max-Age=600; SameSite=Strict; HttpOnly"),
            );
            remember(resp, &headers, w.index)
        }
        Err(AppError::BadRequest(msg)) => {
            render_home(
                &app,
                &headers,
                StatusCode::BAD_REQUEST,
                Some((&msg, &typed)),
                None,
            )
            .await
        }
        Err(e) => html_error(&app, e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    url: String,
}

async fn create_api(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    check_create_rate(&app, &headers, &peer)?;
    if !content_type_is(&headers, "application/json") {
        return Err(AppError::UnsupportedMediaType(
            "send the link as JSON with Content-Type: application/json".into(),
        ));
    }
    let body = read_body(&app, body).await?;
    let req: CreateRequest = serde_json::from_slice(&body)
        .map_err(|e| AppError::BadRequest(format!("body is not {{\"url\": \"...\"}}: {e}")))?;
    let (w, token) = create_link(&app, &req.url).await?;
    let location = format!("/api/links/{}", w.value.code);
    let index = w.index;
    let mut view = LinkView::new(w.value, &base_url(&app, &headers));
    view.delete_token = Some(token);
    let resp = (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    )
        .into_response();
    Ok(remember(with_db_node(resp, &w.node), &headers, index))
}

async fn list_api(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, AppError> {
    let limit = match query_param(query.as_deref(), "limit") {
        None => LIST_DEFAULT,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=LIST_MAX).contains(n))
            .ok_or_else(|| {
                AppError::BadRequest(format!(
                    "limit must be a whole number from 1 to {LIST_MAX}, not {raw:?}"
                ))
            })?,
    };
    let before = match query_param(query.as_deref(), "before") {
        None => None,
        Some(raw) => Some(raw.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            AppError::BadRequest(format!(
                "before must be the `next` of a previous page, not {raw:?}"
            ))
        })?),
    };
    let served = app.store.newest(limit, before, seen(&headers)).await?;
    let base = base_url(&app, &headers);
    let next = served
        .value
        .next
        .map(|n| format!("/api/links?limit={limit}&before={n}"));
    let links: Vec<LinkView> = served
        .value
        .links
        .into_iter()
        .map(|l| LinkView::new(l, &base))
        .collect();
    let resp = with_db_node(
        Json(serde_json::json!({ "links": links, "next": next })).into_response(),
        &served.node,
    );
    Ok(remember_served(
        resp,
        &headers,
        served.index,
        served.session_reset,
    ))
}

fn code_from(path: Result<Path<String>, PathRejection>) -> Result<String, AppError> {
    let Path(code) = path.map_err(|e| AppError::BadRequest(e.body_text()))?;
    if links::is_valid_code(&code) {
        Ok(code)
    } else {
        Err(AppError::NotFound(format!("no link with code {code:?}")))
    }
}

async fn get_api(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, AppError> {
    let code = code_from(path)?;
    let served = app.store.get(&code, seen(&headers)).await?;
    let link = served
        .value
        .ok_or_else(|| AppError::NotFound(format!("no link with code {code:?}")))?;
    let view = LinkView::new(link, &base_url(&app, &headers));
    let resp = with_db_node(Json(view).into_response(), &served.node);
    Ok(remember_served(
        resp,
        &headers,
        served.index,
        served.session_reset,
    ))
}

async fn delete_api(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, AppError> {
    let code = code_from(path)?;
    // A delete is a replicated write even when its token is wrong: it
    // counts against the same per-client rate as a creation.
    check_create_rate(&app, &headers, &peer)?;
    let by = deleter(&app, &headers)?;
    let w = app.store.delete(&code, &by).await?;
    match w.value {
        Deleted::Done => {}
        Deleted::NoSuchLink => {
            // This server may still cache one deleted elsewhere.
            app.cache.evict(&code).await;
            return Err(AppError::NotFound(format!("no link with code {code:?}")));
        }
        Deleted::WrongToken => {
            return Err(AppError::Forbidden(format!(
                "this token does not delete link {code:?}: use the delete_token returned when it was created"
            )))
        }
    }
    app.cache.evict(&code).await;
    tracing::info!(%code, node = %w.node, "link deleted");
    let resp = with_db_node(StatusCode::NO_CONTENT.into_response(), &w.node);
    Ok(remember(resp, &headers, w.index))
}

/// Who asks for a delete: `Authorization: Bearer <token>` with the link's
/// delete token, or the admin token.
fn deleter(app: &App, headers: &HeaderMap) -> Result<Deleter, AppError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            AppError::Unauthorized(
                "deleting a link needs Authorization: Bearer <the delete_token returned when it was created>"
                    .into(),
            )
        })?;
    if let Some(admin) = &app.config.admin_token {
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            token.as_bytes(),
            admin.as_bytes(),
        )) {
            return Ok(Deleter::Admin);
        }
    }
    Ok(Deleter::Owner {
        token_hash: links::token_hash(token),
    })
}

/// One cookie's value from the request.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_string())
}

fn with_cookie(mut resp: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// The hot path: code → 302, from the cache when it can.
async fn redirect(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let code = match code_from(path) {
        Ok(code) => code,
        Err(e) => return html_error(&app, e),
    };
    let opts = seen(&headers);
    if let Some(url) = app.cache.get(&code, opts.min_index).await {
        app.metrics.cache_hits.inc();
        return found(&url, "hit");
    }
    app.metrics.cache_misses.inc();
    match app.store.get(&code, opts).await {
        Ok(served) => {
            let resp = match served.value {
                Some(link) => {
                    app.cache.put(&code, &link.url, served.index).await;
                    found(&link.url, "miss")
                }
                None => html_error(
                    &app,
                    AppError::NotFound(format!("There is no link with code {code:?}.")),
                ),
            };
            remember_served(
                with_db_node(resp, &served.node),
                &headers,
                served.index,
                served.session_reset,
            )
        }
        Err(e) => html_error(&app, e.into()),
    }
}

fn found(url: &str, cache: &'static str) -> Response {
    match HeaderValue::from_str(url) {
        Ok(location) => (
            StatusCode::FOUND,
            [
                (header::LOCATION, location),
                (X_CACHE.clone(), HeaderValue::from_static(cache)),
            ],
        )
            .into_response(),
        // Stored URLs are normalized ASCII, so this means a corrupted row.
        Err(_) => AppError::Store(StoreError::Internal {
            node: "-".into(),
            reason: "stored URL is not a valid header".into(),
        })
        .into_response(),
    }
}

async fn healthz(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "server": app.config.name }))
}

async fn readyz(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, AppError> {
    let node = app.store.ping().await?;
    Ok(Json(
        serde_json::json!({ "status": "ready", "server": app.config.name, "db_node": node }),
    ))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, scaleout_metrics::CONTENT_TYPE)],
        app.metrics.render(),
    )
}

async fn not_found(req: Request) -> AppError {
    AppError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Served;
    use async_trait::async_trait;
    use tower::ServiceExt;

    /// A data tier that is down: every call fails as unreachable.
    struct DownStore;

    fn down<T>() -> Result<T, StoreError> {
        Err(StoreError::Unavailable {
            node: "db-9".into(),
            reason: "connection refused".into(),
        })
    }

    #[async_trait]
    impl Store for DownStore {
        async fn insert(&self, _: &Link) -> Result<Written<()>, StoreError> {
            down()
        }
        async fn get(&self, _: &str, _: ReadOpts) -> Result<Served<Option<Link>>, StoreError> {
            down()
        }
        async fn newest(
            &self,
            _: u32,
            _: Option<i64>,
            _: ReadOpts,
        ) -> Result<Served<crate::store::Page>, StoreError> {
            down()
        }
        async fn delete(&self, _: &str, _: &Deleter) -> Result<Written<Deleted>, StoreError> {
            down()
        }
        async fn ping(&self) -> Result<String, StoreError> {
            down()
        }
    }

    async fn call(req: axum::http::Request<Body>) -> (StatusCode, HeaderMap, String) {
        let app = Arc::new(App::new(WebConfig::default(), Arc::new(DownStore)).unwrap());
        let resp = router(app).oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn get(path: &str) -> axum::http::Request<Body> {
        axum::http::Request::get(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn a_down_database_gives_503_with_a_reason_and_liveness_stays_up() {
        let (status, headers, body) = call(get("/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["x-served-by"], "web-1");
        assert!(
            body.contains("database db-9 unavailable: connection refused"),
            "{body}"
        );

        let (status, _, body) = call(get("/")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("<h1>Service Unavailable</h1>"), "{body}");

        let (status, _, body) = call(get("/abcdefg")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("db-9"), "{body}");

        let create = axum::http::Request::post("/api/links")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"url":"https://example.com/"}"#))
            .unwrap();
        let (status, _, body) = call(create).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.starts_with("{\"error\":"), "{body}");

        let (status, _, _) = call(get("/healthz")).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "liveness does not depend on the database"
        );
    }

    #[test]
    fn config_is_validated() {
        let bad = [
            WebConfig {
                name: "has space".into(),
                ..WebConfig::default()
            },
            WebConfig {
                name: String::new(),
                ..WebConfig::default()
            },
            WebConfig {
                cache_capacity: 0,
                ..WebConfig::default()
            },
            WebConfig {
                public_url: Some("ftp://x".into()),
                ..WebConfig::default()
            },
        ];
        for config in bad {
            assert!(
                App::new(config.clone(), Arc::new(DownStore)).is_err(),
                "{config:?}"
            );
        }
    }

    #[tokio::test]
    async fn creations_past_a_clients_rate_get_429_and_others_go_on() {
        let config = WebConfig {
            create_per_minute: 60,
            create_burst: 3,
            ..WebConfig::default()
        };
        let app = Arc::new(App::new(config, Arc::new(DownStore)).unwrap());
        let create = |client: &'static str| {
            let app = app.clone();
            async move {
                let mut req = axum::http::Request::post("/api/links")
                    .header("content-type", "application/json")
                    .header("x-forwarded-for", client)
                    .body(Body::from(r#"{"url": "https://example.com/"}"#))
                    .unwrap();
                req.extensions_mut()
                    .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))));
                router(app).oneshot(req).await.unwrap()
            }
        };
        for _ in 0..3 {
            // Past the limit check: the (down) database answers.
            assert_eq!(
                create("192.0.2.1").await.status(),
                StatusCode::SERVICE_UNAVAILABLE
            );
        }
        let refused = create("192.0.2.1").await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(
            create("192.0.2.2").await.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "another client is not held back"
        );
        // A delete is a write too (a wrong token's as well): same rate.
        let mut delete = axum::http::Request::delete("/api/links/abc1234")
            .header("authorization", "Bearer wrong")
            .header("x-forwarded-for", "192.0.2.1")
            .body(Body::empty())
            .unwrap();
        delete
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))));
        let refused = router(app.clone()).oneshot(delete).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn short_urls_follow_the_forwarded_host_and_proto() {
        let app = App::new(WebConfig::default(), Arc::new(DownStore)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("10.0.0.5:8081"));
        assert_eq!(base_url(&app, &headers), "http://10.0.0.5:8081");
        headers.insert(
            "x-forwarded-host",
            HeaderValue::from_static("www.scaleout.test"),
        );
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert_eq!(base_url(&app, &headers), "https://www.scaleout.test");
        headers.insert("x-forwarded-host", HeaderValue::from_static("evil\"<host>"));
        assert_eq!(
            base_url(&app, &headers),
            "https://10.0.0.5:8081",
            "an unsafe host is ignored"
        );
    }

    /// Every page carries the security headers; a form posted from another
    /// site is refused before anything is read, one from the site itself
    /// is taken (here it reaches the down database: 503).
    #[tokio::test]
    async fn security_headers_and_cross_site_forms() {
        let (_, headers, _) = call(get("/healthz")).await;
        assert!(headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'"));
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        let form = |extra: &[(&str, &str)]| {
            let mut req = axum::http::Request::post("/links")
                .header("host", "links.test")
                .header("content-type", "application/x-www-form-urlencoded");
            for (k, v) in extra {
                req = req.header(*k, *v);
            }
            req.body(Body::from("url=https%3A%2F%2Fexample.com"))
                .unwrap()
        };
        for hostile in [
            vec![("origin", "https://evil.example")],
            vec![("origin", "null")],
            vec![("sec-fetch-site", "cross-site")],
            vec![
                ("sec-fetch-site", "same-site"),
                ("origin", "http://links.test"),
            ],
        ] {
            let (status, _, _) = call(form(&hostile)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{hostile:?}");
        }
        for friendly in [
            vec![("origin", "http://links.test")],
            vec![("sec-fetch-site", "same-origin")],
            vec![],
        ] {
            let (status, _, _) = call(form(&friendly)).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{friendly:?}");
        }
    }
}
