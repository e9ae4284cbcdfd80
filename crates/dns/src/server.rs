//! The DNS server: hickory-server's `ServerFuture` over UDP and TCP with a
//! request handler that asks [`Zone`] for the answer, and a small HTTP
//! listener for `/metrics` and `/healthz`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hickory_proto::op::{Header, MessageType, OpCode, ResponseCode};
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::zone::Zone;
use crate::{DnsConfig, Error};

/// How long a TCP client may take per message.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

struct Handler {
    /// Shared with the health checker and the records API, which edits it.
    zone: Arc<RwLock<Zone>>,
    health: Arc<Health>,
    rotation: AtomicUsize,
    /// Queries answered, by (type, rcode).
    counts: Mutex<BTreeMap<(String, String), u64>>,
}

impl Handler {
    fn count(&self, qtype: &str, rcode: ResponseCode) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry((qtype.to_string(), rcode_name(rcode))).or_default() += 1;
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        let refuse = |rcode: ResponseCode| {
            let mut h = header;
            h.set_response_code(rcode);
            h
        };
        if request.message_type() != MessageType::Query || request.op_code() != OpCode::Query {
            self.count("-", ResponseCode::NotImp);
            let h = refuse(ResponseCode::NotImp);
            return send(&mut response, builder.build_no_records(h), h).await;
        }
        // EDNS beyond version 0 is BADVERS, answered with our version
        // (RFC 6891 §6.1.3), not a NOERROR that would pretend to speak it.
        if request.edns().is_some_and(|e| e.version() > 0) {
            let mut builder = MessageResponseBuilder::from_message_request(request);
            let mut edns = hickory_proto::op::Edns::new();
            edns.set_version(0);
            edns.set_max_payload(1232);
            builder.edns(edns);
            self.count("-", ResponseCode::BADVERS);
            let h = refuse(ResponseCode::BADVERS);
            return send(&mut response, builder.build_no_records(h), h).await;
        }
        let info = match request.request_info() {
            Ok(info) => info,
            Err(_) => {
                // Not exactly one question.
                self.count("-", ResponseCode::FormErr);
                let h = refuse(ResponseCode::FormErr);
                return send(&mut response, builder.build_no_records(h), h).await;
            }
        };
        let qtype = info.query.query_type();
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        let health = &self.health;
        let answer = self
            .zone
            .read()
            .ok()
            .map(|zone| zone.answer(info.query.name(), qtype, &|a| health.is_up(a), rotation));
        let answer = match answer {
            Some(answer) => answer,
            None => {
                self.count("-", ResponseCode::ServFail);
                let h = refuse(ResponseCode::ServFail);
                return send(&mut response, builder.build_no_records(h), h).await;
            }
        };
        let mut answer = answer;
        // Over UDP an answer fits the client's buffer (512 bytes without
        // EDNS) or says it was cut, so the client asks again over TCP.
        if request.protocol() == hickory_proto::xfer::Protocol::Udp {
            // Room kept for what the response's encoder adds to ours (the
            // EDNS record, names it does not compress as we measured).
            let limit = request
                .edns()
                .map_or(512, |e| usize::from(e.max_payload().clamp(512, 4096)));
            let reserve = 64;
            let query = hickory_proto::op::Query::query(info.query.name().into(), qtype);
            if crate::zone::fit(&mut answer, &query, limit, reserve) {
                header.set_truncated(true);
            }
        }
        header.set_authoritative(answer.authoritative);
        header.set_response_code(answer.rcode);
        header.set_recursion_available(false);
        self.count(&qtype.to_string(), answer.rcode);
        let msg = builder.build(
            header,
            answer.answers.iter(),
            answer.authority.iter(),
            std::iter::empty(),
            std::iter::empty(),
        );
        send(&mut response, msg, header).await
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::authority::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
    >,
    header: Header,
) -> ResponseInfo {
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "sending a DNS response failed");
            header.into()
        }
    }
}

/// A DNS server whose sockets are bound.
pub struct BoundDns {
    config: DnsConfig,
    zone: Zone,
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
    /// Where queries go (UDP and TCP).
    pub addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are.
    pub http_addr: SocketAddr,
}

/// Validates the config and binds UDP, TCP (same port) and HTTP.
/// UDP and TCP on the same port. With port 0 the OS picks the UDP port,
/// and another process may already hold that port for TCP: then pick
/// again (a few times) rather than fail.
async fn bind_udp_and_tcp(
    listen: SocketAddr,
) -> Result<(tokio::net::UdpSocket, tokio::net::TcpListener, SocketAddr), Error> {
    let mut attempts = 0;
    loop {
        let udp = tokio::net::UdpSocket::bind(listen)
            .await
            .map_err(|source| Error::Bind {
                addr: listen,
                source,
            })?;
        let addr = udp.local_addr()?;
        match tokio::net::TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp, addr)),
            Err(e)
                if listen.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempts < 16 =>
            {
                attempts += 1;
            }
            Err(source) => return Err(Error::Bind { addr, source }),
        }
    }
}

pub async fn bind(config: DnsConfig) -> Result<BoundDns, Error> {
    config.validate()?;
    let zone = config.zone()?;
    let (udp, tcp, addr) = bind_udp_and_tcp(config.listen).await?;
    let http = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|source| Error::Bind {
            addr: config.http,
            source,
        })?;
    let http_addr = http.local_addr()?;
    Ok(BoundDns {
        config,
        zone,
        udp,
        tcp,
        http,
        addr,
        http_addr,
    })
}

impl BoundDns {
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let BoundDns {
            config,
            zone,
            udp,
            tcp,
            http,
            addr,
            http_addr,
        } = self;
        let health = Arc::new(Health::default());
        tracing::info!(%addr, %http_addr, zone = %zone.origin, hosts = zone.hosts.len(), "dns server listening");
        let zone = Arc::new(RwLock::new(zone));
        let handler = Arc::new(Handler {
            zone: zone.clone(),
            health: health.clone(),
            rotation: AtomicUsize::new(0),
            counts: Mutex::default(),
        });
        let mut server = ServerFuture::new(SharedHandler(handler.clone()));
        server.register_socket(udp);
        server.register_listener(tcp, TCP_TIMEOUT);

        let checker = tokio::spawn(crate::health::run(
            zone.clone(),
            config.health.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        let app = crate::records::router(zone, health, config.http_token.clone())
            .fallback(|| async {
                (
                    axum::http::StatusCode::NOT_FOUND,
                    axum::Json(serde_json::json!({"error": "no such route: /hosts, /metrics and /healthz are here"})),
                )
            })
            .route(
                "/healthz",
                axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
            )
            .route(
                "/metrics",
                axum::routing::get({
                    let handler = handler.clone();
                    let token = config.http_token.clone();
                    move |headers: axum::http::HeaderMap| {
                        let handler = handler.clone();
                        let token = token.clone();
                        async move {
                            use axum::response::IntoResponse;
                            if !bearer_matches(&headers, token.as_deref()) {
                                return (
                                    axum::http::StatusCode::UNAUTHORIZED,
                                    axum::Json(serde_json::json!({"error": "/metrics needs Authorization: Bearer <token>"})),
                                )
                                    .into_response();
                            }
                            (
                                [("content-type", scaleout_metrics::CONTENT_TYPE)],
                                render(handler),
                            )
                                .into_response()
                        }
                    }
                }),
            );
        // Bounded like every other server: a head timeout and a
        // connection cap of its own.
        let limits = scaleout_serve::Limits {
            header_timeout: std::time::Duration::from_secs(10),
            max_connections: 256,
            drain: std::time::Duration::from_secs(5),
        };
        let web_server =
            scaleout_serve::serve(http, app, limits, Arc::default(), None, shutdown.clone());
        let web = tokio::spawn(web_server);

        shutdown.cancelled().await;
        let _ = server.shutdown_gracefully().await;
        checker.abort();
        let _ = web.await;
        tracing::info!("dns server stopped");
        Ok(())
    }
}

/// hickory wants the handler by value; the metrics endpoint shares it.
struct SharedHandler(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for SharedHandler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        self.0.handle_request(request, response).await
    }
}

/// The rcode as dig prints it.
fn rcode_name(rcode: ResponseCode) -> String {
    match u16::from(rcode) {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => n.to_string(),
    }
}

/// Whether the request carries the token, when there is one (compared in
/// constant time).
pub(crate) fn bearer_matches(headers: &axum::http::HeaderMap, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110 §11.1).
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
        })
        .unwrap_or("");
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// `/metrics`: queries by type and rcode, and each address's health.
fn render(h: Arc<Handler>) -> String {
    use scaleout_metrics::{Label, Labels, Scrape, Writer};
    let registry = Scrape(move |w: &mut Writer<'_>| {
        let counts: Vec<((String, String), u64)> = match h.counts.lock() {
            Ok(c) => c.iter().map(|(k, n)| (k.clone(), *n)).collect(),
            Err(_) => Vec::new(),
        };
        w.counters(
            "scaleout_dns_queries_total",
            "Queries answered, by type and rcode.",
            counts.iter().map(|((qtype, rcode), n)| {
                (Labels([Label("type", qtype), Label("rcode", rcode)]), *n)
            }),
        )?;
        let addrs: Vec<(String, u64)> = h
            .zone
            .read()
            .map(|z| z.all_addrs())
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a.to_string(), u64::from(h.health.is_up(a))))
            .collect();
        w.gauges(
            "scaleout_dns_address_up",
            "1 when the address passes its health check (and is answered).",
            addrs
                .iter()
                .map(|(a, up)| (Labels([Label("address", a)]), *up)),
        )
    })
    .registry();
    scaleout_metrics::render(&registry)
}
