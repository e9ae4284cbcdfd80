//! The proxy rules: what a request and its answer lose and gain on the way
//! through the load balancer, stated once and applied by both request
//! paths — [`crate::fast`] on the bytes httparse read, [`crate::proxy`] on
//! a `HeaderMap` — through the [`Headers`] view of either.
//!
//! - Hop-by-hop headers stop here (RFC 9110 §7.6.1): a fixed list and
//!   every name `Connection` lists ([`Hop`]). An upgrade keeps `Upgrade`
//!   and is sent on with `Connection: upgrade`.
//! - The load balancer says what it saw ([`forwarding`]): `X-Request-Id`
//!   (the client's first one when acceptable, else a new one; a backend's
//!   own is replaced in the answer), `X-Forwarded-For` and `Forwarded`
//!   (RFC 7239) appended to, `X-Forwarded-Proto` and `X-Forwarded-Host`
//!   replaced — a client's claim would steer the links app's short URLs.
//! - A request may be replayed on another backend when its method is
//!   idempotent or it carries `Idempotency-Key` ([`replayable`]).
//! - The key of `--algorithm hash`: the client's address, a header, or a
//!   cookie ([`hash_key`]).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;

use crate::codec::Headers;
use crate::config::HashOn;
use crate::conn::ConnInfo;
use crate::selection::hash_bytes;

pub const REQUEST_ID: &str = "x-request-id";
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Hop-by-hop headers whatever `Connection` says (`upgrade` passes only
/// with an upgrade).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the load balancer writes itself ([`forwarding`]): a
/// client's own are not passed on as they are.
const SET_BY_LB: [&str; 5] = [
    REQUEST_ID,
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

fn listed(list: &[&str], name: &[u8]) -> bool {
    list.iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// Which headers of one message stop at the load balancer.
pub struct Hop<'a> {
    /// Names the message's `Connection` headers list.
    named: Vec<&'a [u8]>,
    upgrade: bool,
}

impl<'a> Hop<'a> {
    /// For a message with these headers; `upgrade`: the message carries an
    /// upgrade through (a request asking for one, a `101` granting it).
    pub fn of(headers: &'a impl Headers, upgrade: bool) -> Self {
        let named = headers
            .values("connection")
            .flat_map(|v| v.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .collect();
        Hop { named, upgrade }
    }

    /// Whether a header of this name stops here.
    pub fn drops(&self, name: &[u8]) -> bool {
        if name.eq_ignore_ascii_case(b"upgrade") {
            return !self.upgrade;
        }
        listed(&HOP_BY_HOP, name) || self.named.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// [`Hop`] on a `HeaderMap`: removes what it drops; an upgrade gets
/// `Connection: upgrade` back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let dropped: Vec<HeaderName> = {
        let hop = Hop::of(headers, upgrade);
        headers
            .keys()
            .filter(|n| hop.drops(n.as_str().as_bytes()))
            .cloned()
            .collect()
    };
    for name in dropped {
        headers.remove(&name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a client's request header of this name is left out, because
/// [`forwarding`] writes it (or, for `Content-Length`, the codec: bodies
/// go on with their exact length).
pub fn set_by_lb(name: &[u8]) -> bool {
    listed(&SET_BY_LB, name) || name.eq_ignore_ascii_case(b"content-length")
}

/// Whether a backend's answer header of this name is replaced: the
/// answer carries the request's id.
pub fn replaced_in_answer(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(REQUEST_ID.as_bytes())
}

/// The forwarding headers for the backend, given to `emit` in the order
/// they are written. `headers`: the client's (prior hops' values are
/// appended to, in order, unless `hop` drops them); `host`: the host the
/// client asked for; `scratch` holds the values made here.
#[allow(clippy::too_many_arguments)] // each is one fact the headers are made of
pub fn forwarding(
    headers: &impl Headers,
    hop: &Hop<'_>,
    conn: &ConnInfo,
    scheme: &str,
    host: Option<&[u8]>,
    request_id: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&'static str, &[u8]),
) {
    emit(REQUEST_ID, request_id);

    scratch.clear();
    let prior = |name: &'static str| {
        let passes = !hop.drops(name.as_bytes());
        headers.values(name).filter(move |_| passes)
    };
    for prior in prior("x-forwarded-for") {
        scratch.extend_from_slice(prior);
        scratch.extend_from_slice(b", ");
    }
    scratch.extend_from_slice(conn.client_ip.as_bytes());
    emit("x-forwarded-for", scratch);
    emit("x-forwarded-proto", scheme.as_bytes());
    if let Some(host) = host {
        emit("x-forwarded-host", host);
    }

    scratch.clear();
    for prior in prior("forwarded") {
        scratch.extend_from_slice(prior);
        scratch.extend_from_slice(b", ");
    }
    scratch.extend_from_slice(b"for=");
    scratch.extend_from_slice(conn.forwarded_for.as_bytes());
    scratch.extend_from_slice(b";proto=");
    scratch.extend_from_slice(scheme.as_bytes());
    // As a quoted-string (RFC 7239 §4), and only when it is one safely.
    if let Some(host) = host.filter(|h| {
        h.iter()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\'))
    }) {
        scratch.extend_from_slice(b";host=\"");
        scratch.extend_from_slice(host);
        scratch.push(b'"');
    }
    emit("forwarded", scratch);
}

/// The client's request id, when it sent one the one length rule
/// (`scaleout_wire::request_id`) accepts: the first `X-Request-Id` decides.
/// Otherwise the request gets [`new_request_id`].
pub fn client_request_id(headers: &impl Headers) -> Option<&[u8]> {
    headers
        .first(REQUEST_ID)
        .filter(|id| scaleout_wire::request_id::acceptable(id))
}

pub fn new_request_id() -> Bytes {
    Bytes::copy_from_slice(&scaleout_wire::request_id::new())
}

/// Methods RFC 9110 §9.2.2 calls idempotent.
pub fn idempotent_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a request the backend may have acted on can be sent again.
pub fn replayable(method: &Method, headers: &impl Headers) -> bool {
    idempotent_method(method) || headers.first(IDEMPOTENCY_KEY).is_some()
}

/// The key `--algorithm hash` places a request by; 0 when the header or
/// cookie is missing (all such requests go to one backend).
pub fn hash_key(on: &HashOn, headers: &impl Headers, conn: &ConnInfo) -> u64 {
    match on {
        HashOn::ClientIp => hash_bytes(conn.client_ip.as_bytes()),
        HashOn::Header(name) => headers.first(name.as_str()).map_or(0, hash_bytes),
        HashOn::Cookie(name) => headers
            .values("cookie")
            .find_map(|v| cookie_value(v, name))
            .map_or(0, hash_bytes),
    }
}

/// The value of cookie `name` in one `Cookie` header value.
fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|b| *b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|b| *b == b'=')?;
        (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
    })
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use http::{Request, Version};

    use super::*;
    use crate::codec::request::{self, RequestHead};
    use crate::spool::RequestBody;

    fn conn() -> ConnInfo {
        ConnInfo::new("10.1.2.3:5555".parse().unwrap())
    }

    fn head(raw: &[u8]) -> RequestHead {
        let mut buf = BytesMut::from(raw);
        match request::parse(&mut buf, 64 * 1024) {
            Ok(Some(req)) => req,
            other => panic!("{:?}: {:?}", String::from_utf8_lossy(raw), other.err()),
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));

        let req = head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: X-Secret,, close\r\nConnection: other\r\n\r\n");
        let hop = Hop::of(&req, false);
        for name in [
            "x-secret",
            "X-SECRET",
            "other",
            "close",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(hop.drops(name.as_bytes()), "{name}");
        }
        for name in ["host", "x-secrets", ""] {
            assert!(!hop.drops(name.as_bytes()), "{name:?}");
        }
    }

    #[test]
    fn upgrades_keep_upgrade_and_connection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    fn prepared(parts: &mut http::request::Parts, conn: &ConnInfo, scheme: &'static str) {
        crate::proxy::prepare_request(parts, conn, scheme, false, b"rid").unwrap();
    }

    #[test]
    fn forwarding_headers_are_added_and_appended() {
        let (mut parts, ()) = Request::get("http://www.example.test:8080/a?b")
            .body(())
            .unwrap()
            .into_parts();
        parts.version = Version::HTTP_2;
        parts
            .headers
            .insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        prepared(&mut parts, &conn(), "https");
        assert_eq!(parts.uri, "/a?b");
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers[header::HOST], "www.example.test:8080");
        assert_eq!(parts.headers["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
        assert_eq!(parts.headers["x-forwarded-proto"], "https");
        assert_eq!(parts.headers["x-forwarded-host"], "www.example.test:8080");
        assert_eq!(parts.headers[REQUEST_ID], "rid");
        assert_eq!(
            parts.headers[header::FORWARDED],
            "for=10.1.2.3;proto=https;host=\"www.example.test:8080\""
        );

        let (mut parts, ()) = Request::get("/")
            .header("host", "h")
            .body(())
            .unwrap()
            .into_parts();
        let v6 = ConnInfo::new("[2001:db8::1]:1".parse().unwrap());
        parts.headers.insert(
            header::FORWARDED,
            HeaderValue::from_static("for=192.0.2.60"),
        );
        prepared(&mut parts, &v6, "http");
        assert_eq!(
            parts.headers[header::FORWARDED],
            "for=192.0.2.60, for=\"[2001:db8::1]\";proto=http;host=\"h\""
        );
    }

    #[test]
    fn idempotency_follows_rfc_9110_and_the_key() {
        let none = HeaderMap::new();
        assert!(replayable(&Method::GET, &none));
        assert!(replayable(&Method::PUT, &none));
        assert!(!replayable(&Method::POST, &none));
        assert!(!replayable(&Method::PATCH, &none));
        let mut keyed = HeaderMap::new();
        keyed.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k1"));
        assert!(replayable(&Method::POST, &keyed));
        assert!(replayable(
            &Method::POST,
            &head(b"POST / HTTP/1.1\r\nHost: h\r\nIdempotency-Key: k\r\n\r\n")
        ));
    }

    #[test]
    fn hash_keys_come_from_the_chosen_source() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; session=abc; z=2"),
        );
        h.insert("x-user", HeaderValue::from_static("u1"));
        let c = conn();
        assert_eq!(
            hash_key(&HashOn::Cookie("session".into()), &h, &c),
            hash_bytes(b"abc")
        );
        assert_eq!(
            hash_key(&HashOn::Header(HeaderName::from_static("x-user")), &h, &c),
            hash_bytes(b"u1")
        );
        assert_eq!(hash_key(&HashOn::ClientIp, &h, &c), hash_bytes(b"10.1.2.3"));
        assert_eq!(hash_key(&HashOn::Cookie("none".into()), &h, &c), 0);
        let raw = head(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: session=abc\r\nX-User: u1\r\n\r\n");
        assert_eq!(
            hash_key(&HashOn::Cookie("session".into()), &raw, &c),
            hash_bytes(b"abc")
        );
        assert_eq!(
            hash_key(&HashOn::Header(HeaderName::from_static("x-user")), &raw, &c),
            hash_bytes(b"u1")
        );
    }

    #[test]
    fn the_first_acceptable_request_id_decides() {
        let id = |raw: &[u8]| client_request_id(&head(raw)).map(<[u8]>::to_vec);
        assert_eq!(
            id(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc-1\r\nX-Request-Id: other\r\n\r\n"),
            Some(b"abc-1".to_vec())
        );
        assert_eq!(
            id(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: \r\nX-Request-Id: fine\r\n\r\n"),
            None,
            "an unacceptable first id is replaced, not skipped"
        );
        let long = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: {}\r\n\r\n",
            "a".repeat(500)
        );
        assert_eq!(id(long.as_bytes()), None);
        assert_eq!(new_request_id().len(), 32);
    }

    /// The two paths' upstream heads for the same request, as sorted
    /// (lower-case name, value) pairs.
    /// Header lines as sorted (lower-case name, value) pairs.
    type HeaderSet = Vec<(String, Vec<u8>)>;

    fn both_paths(raw: &[u8]) -> (HeaderSet, HeaderSet) {
        let req = head(raw);
        let c = conn();
        let id = client_request_id(&req).map_or_else(|| b"fresh".to_vec(), <[u8]>::to_vec);
        let mut fast = Vec::new();
        crate::fast::encode_upstream_head(
            &mut fast,
            &req,
            &RequestBody::empty(),
            &c,
            "http",
            &id,
            &mut Vec::new(),
        );

        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(std::str::from_utf8(req.path()).unwrap());
        for i in 0..req.headers.len() {
            builder = builder.header(req.name(i), req.value(i));
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        crate::proxy::prepare_request(&mut parts, &c, "http", req.upgrade, &id).unwrap();
        let mut hyper = Vec::new();
        request::encode(
            &mut hyper,
            &parts.method,
            parts.uri.path(),
            &parts.headers,
            0,
        );
        (header_set(&fast), header_set(&hyper))
    }

    fn header_set(encoded: &[u8]) -> HeaderSet {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(encoded).unwrap().is_complete());
        let mut set: Vec<_> = req
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        set.sort();
        set
    }

    #[test]
    fn both_paths_send_the_backend_the_same_headers() {
        let cases: [&[u8]; 8] = [
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
            // Prior hops, twice each: all kept, in order.
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-For: 192.0.2.2, 192.0.2.3\r\nForwarded: for=a\r\nForwarded: for=b\r\n\r\n",
            // A client's claims about the load balancer's view are replaced.
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nX-Forwarded-Host: evil2.test\r\nX-Request-Id: mine\r\nX-Request-Id: second\r\n\r\n",
            // Connection names headers, the forwarding ones among them.
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: x-secret, X-Forwarded-For, close\r\nX-Secret: 1\r\nX-Forwarded-For: 192.0.2.9\r\nClose: yes\r\nTE: trailers\r\nTrailer: x\r\nProxy-Connection: keep-alive\r\nKeep-Alive: 5\r\nUpgrade: h2c\r\n\r\n",
            // A host that cannot go in a quoted-string.
            b"GET / HTTP/1.1\r\nHost: a\"b\\c\r\n\r\n",
            // An upgrade keeps Upgrade and says so.
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n",
            // A body's length is the load balancer's to say.
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nIdempotency-Key: k\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
            b"GET / HTTP/1.0\r\nX-Request-Id: has space\r\n\r\n",
        ];
        for raw in cases {
            let (fast, hyper) = both_paths(raw);
            assert_eq!(fast, hyper, "{}", String::from_utf8_lossy(raw));
            let names: Vec<&str> = fast.iter().map(|(n, _)| n.as_str()).collect();
            for once in [
                "x-request-id",
                "x-forwarded-for",
                "x-forwarded-proto",
                "forwarded",
            ] {
                assert_eq!(
                    names.iter().filter(|n| **n == once).count(),
                    1,
                    "{once} in {names:?}"
                );
            }
            for never in [
                "x-secret",
                "close",
                "te",
                "trailer",
                "proxy-connection",
                "keep-alive",
            ] {
                assert!(!names.contains(&never), "{never} passed: {names:?}");
            }
        }
        let (fast, _) = both_paths(cases[1]);
        let xff = fast.iter().find(|(n, _)| n == "x-forwarded-for").unwrap();
        assert_eq!(xff.1, b"192.0.2.1, 192.0.2.2, 192.0.2.3, 10.1.2.3");
        let fwd = fast.iter().find(|(n, _)| n == "forwarded").unwrap();
        assert_eq!(fwd.1, b"for=a, for=b, for=10.1.2.3;proto=http;host=\"h\"");
        let (fast, _) = both_paths(cases[3]);
        let xff = fast.iter().find(|(n, _)| n == "x-forwarded-for").unwrap();
        assert_eq!(
            xff.1, b"10.1.2.3",
            "a prior hop's header it marked hop-by-hop is dropped"
        );
        let (fast, _) = both_paths(cases[4]);
        let fwd = fast.iter().find(|(n, _)| n == "forwarded").unwrap();
        assert_eq!(fwd.1, b"for=10.1.2.3;proto=http");
        let (fast, _) = both_paths(cases[5]);
        assert!(fast.contains(&("upgrade".into(), b"websocket".to_vec())));
        assert!(fast.contains(&("connection".into(), b"upgrade".to_vec())));
    }
}
