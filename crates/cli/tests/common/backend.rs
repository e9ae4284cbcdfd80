//! An upstream web server for load balancer tests, in the test process: a
//! real listening socket, real connections. Every connection task belongs
//! to the backend, so `kill` drops them all at once, as a crash would.
//!
//! Routes: `/healthz` (200, or 503 after `set_healthy(false)`), `/slow?ms=N`,
//! `/status/N` (answers N), `/echo` (the request head as JSON), `/ws`
//! (101, then echoes bytes), `/big/N` (N bytes), anything else: 200 with
//! the backend's name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<State>,
    tasks: Mutex<Option<JoinSet<()>>>,
}

#[derive(Default)]
struct State {
    healthy: AtomicBool,
    /// Requests other than health checks.
    hits: AtomicU64,
    posts: AtomicU64,
}

impl Backend {
    pub async fn start(name: &str) -> Arc<Backend> {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// On `addr`; a port another socket holds for a moment (a test
    /// reviving a backend on the port it had) is tried again for 5 s.
    pub async fn start_on(name: &str, addr: SocketAddr) -> Arc<Backend> {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("backend {name} cannot listen on {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            healthy: AtomicBool::new(true),
            ..Default::default()
        });
        let mut tasks = JoinSet::new();
        let name_owned = name.to_string();
        let st = state.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let name = name_owned.clone();
                let st = st.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(name.clone(), st.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Arc::new(Backend {
            name: name.to_string(),
            addr,
            state,
            tasks: Mutex::new(Some(tasks)),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn posts(&self) -> u64 {
        self.state.posts.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Closes the listener and every connection, at once.
    pub fn kill(&self) {
        if let Some(mut tasks) = self.tasks.lock().unwrap().take() {
            tasks.abort_all();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn reply(status: StatusCode, name: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("x-backend", name)
        .body(Full::new(body.into()))
        .unwrap()
}

async fn handle(
    name: String,
    st: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        let ok = st.healthy.load(Ordering::SeqCst);
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Ok(reply(status, &name, "health"));
    }
    st.hits.fetch_add(1, Ordering::SeqCst);
    if req.method() == hyper::Method::POST {
        st.posts.fetch_add(1, Ordering::SeqCst);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
        return Ok(reply(StatusCode::OK, &name, format!("slow {name}")));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        return Ok(reply(status, &name, format!("{code} from {name}")));
    }
    if let Some(n) = path.strip_prefix("/big/") {
        let n: usize = n.parse().unwrap_or(0);
        let body: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
        return Ok(reply(StatusCode::OK, &name, body));
    }
    if path == "/echo" {
        // A header sent more than once shows as its values joined by
        // ", ", so a test sees a duplicate the proxy let through.
        let mut headers = BTreeMap::<String, String>::new();
        for (k, v) in req.headers() {
            let v = v.to_str().unwrap_or("");
            headers
                .entry(k.as_str().to_string())
                .and_modify(|prior| *prior = format!("{prior}, {v}"))
                .or_insert_with(|| v.to_string());
        }
        let head = serde_json::json!({
            "method": req.method().as_str(),
            "uri": req.uri().to_string(),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        let body = req.into_body().collect().await?.to_bytes();
        let echoed = serde_json::json!({
            "head": head,
            "body_len": body.len(),
            "body_fnv": fnv1a(&body),
        });
        return Ok(reply(StatusCode::OK, &name, echoed.to_string()));
    }
    if path == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("x-backend", &name)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    Ok(reply(StatusCode::OK, &name, name.clone()))
}

/// FNV-1a over a body, as hex: what `/echo` says it received.
pub fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
