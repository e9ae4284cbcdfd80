//! Client request heads: [`parse`] (strict framing, origin form only) into
//! a [`RequestHead`] of spans over the bytes read, and [`encode`] for a
//! head held as `http` types (the hyper path's).

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};

use super::{push_content_length, span, span_values, Chunk, Framing, Headers};
use crate::error::ErrorAnswer;

/// Most headers accepted in one request.
const MAX_REQUEST_HEADERS: usize = 100;

/// A parsed client request head; spans index into `head`.
pub struct RequestHead {
    pub head: Bytes,
    pub method: Method,
    pub path: Range<usize>,
    pub http10: bool,
    pub headers: Vec<(Range<usize>, Range<usize>)>,
    /// The connection stays open after this request.
    pub keep_alive: bool,
    /// An upgrade (`Connection: upgrade` and `Upgrade`) is asked for.
    pub upgrade: bool,
    pub expect_continue: bool,
    pub framing: Framing,
    pub host: Option<Range<usize>>,
}

impl RequestHead {
    pub fn name(&self, i: usize) -> &[u8] {
        &self.head[self.headers[i].0.clone()]
    }

    pub fn value(&self, i: usize) -> &[u8] {
        &self.head[self.headers[i].1.clone()]
    }

    pub fn path(&self) -> &[u8] {
        &self.head[self.path.clone()]
    }

    pub fn host(&self) -> Option<&[u8]> {
        self.host.clone().map(|h| &self.head[h])
    }
}

impl Headers for RequestHead {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        span_values(&self.head, &self.headers, name)
    }
}

/// Parses a request head off the front of `rbuf`, at most `max` bytes;
/// what it leaves is the body and whatever follows. `Ok(None)`: not a
/// whole head yet. Refused: what a stricter peer could read differently
/// (two framings, a list or a sign in `Content-Length`, two `Host`s, a
/// transfer coding but a lone `chunked`) and anything but origin form.
pub fn parse(rbuf: &mut BytesMut, max: usize) -> Result<Option<RequestHead>, ErrorAnswer> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(rbuf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if rbuf.len() >= max {
                return Err(ErrorAnswer::new(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("request head is larger than {max} bytes"),
                ));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ErrorAnswer::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_REQUEST_HEADERS} request headers"),
            ))
        }
        Err(e) => {
            return Err(ErrorAnswer::new(
                StatusCode::BAD_REQUEST,
                format!("malformed request: {e}"),
            ))
        }
    };
    if len > max {
        return Err(ErrorAnswer::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request head is larger than {max} bytes"),
        ));
    }
    let whole: &[u8] = rbuf;
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| ErrorAnswer::new(StatusCode::BAD_REQUEST, "malformed request method"))?;
    let raw_path = parsed.path.unwrap_or("");
    if !raw_path.starts_with('/') {
        // Absolute form and `*` are for proxies and OPTIONS; a reverse
        // proxy wants origin form.
        if !(method == Method::OPTIONS && raw_path == "*") {
            return Err(ErrorAnswer::new(
                StatusCode::BAD_REQUEST,
                "request target must be a path (origin form)",
            ));
        }
    }
    let path = span(whole, raw_path.as_bytes());
    let http10 = parsed.version == Some(0);
    let spans: Vec<_> = parsed
        .headers
        .iter()
        .map(|h| (span(whole, h.name.as_bytes()), span(whole, h.value)))
        .collect();
    let head = rbuf.split_to(len).freeze();

    let mut req = RequestHead {
        head,
        method,
        path,
        http10,
        headers: spans,
        keep_alive: !http10,
        upgrade: false,
        expect_continue: false,
        framing: Framing::Length(0),
        host: None,
    };
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut has_upgrade_header = false;
    let mut connection_upgrade = false;
    for i in 0..req.headers.len() {
        let (n, v) = req.headers[i].clone();
        let (name, value) = (&req.head[n.clone()], &req.head[v.clone()]);
        if name.eq_ignore_ascii_case(b"content-length") {
            // Digits only (RFC 9110 §8.6): no sign, no spaces inside, no
            // list; a value a stricter peer would read otherwise is refused.
            let digits = value.trim_ascii();
            let parsed =
                (!digits.is_empty() && digits.len() <= 19 && digits.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(digits).ok()?.parse::<u64>().ok())
                    .flatten();
            match (parsed, content_length) {
                (None, _) => {
                    return Err(ErrorAnswer::new(
                        StatusCode::BAD_REQUEST,
                        "invalid Content-Length",
                    ))
                }
                (Some(a), Some(b)) if a != b => {
                    return Err(ErrorAnswer::new(
                        StatusCode::BAD_REQUEST,
                        "conflicting Content-Length headers",
                    ))
                }
                (Some(a), _) => content_length = Some(a),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Exactly one coding, chunked, over all the request's
            // Transfer-Encoding headers: forwarding `gzip, chunked` as
            // chunked would drop a coding; RFC 9112 §6.1 answers 501.
            if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(ErrorAnswer::new(
                    StatusCode::NOT_IMPLEMENTED,
                    "only the chunked transfer-coding, alone, is supported",
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    req.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    req.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    connection_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            has_upgrade_header = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            req.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"host") {
            if req.host.is_some() {
                return Err(ErrorAnswer::new(
                    StatusCode::BAD_REQUEST,
                    "more than one Host header",
                ));
            }
            req.host = Some(v.clone());
        }
    }
    if chunked && content_length.is_some() {
        // Both framings at once: the classic request-smuggling shape.
        return Err(ErrorAnswer::new(
            StatusCode::BAD_REQUEST,
            "both Transfer-Encoding and Content-Length",
        ));
    }
    if http10 && req.host.is_none() {
        // HTTP/1.0 without Host: fine, the backend sees none either.
    } else if req.host.is_none() {
        return Err(ErrorAnswer::new(
            StatusCode::BAD_REQUEST,
            "missing Host header",
        ));
    }
    req.upgrade = !http10 && has_upgrade_header && connection_upgrade;
    req.framing = if chunked {
        Framing::Chunked(Chunk::Size)
    } else {
        Framing::Length(content_length.unwrap_or(0))
    };
    Ok(Some(req))
}

/// A request head held as `http` types, as bytes: the body's exact length
/// replaces any `Content-Length` it carried.
pub fn encode(out: &mut Vec<u8>, method: &Method, path: &str, headers: &HeaderMap, body_len: u64) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == http::header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    push_content_length(out, method, body_len);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(raw: &[u8]) -> Result<Option<RequestHead>, ErrorAnswer> {
        let mut buf = BytesMut::from(raw);
        parse(&mut buf, 32 * 1024)
    }

    #[test]
    fn parses_heads_and_refuses_bad_ones() {
        let req = parse_all(b"POST /a?b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close, x-hop\r\n\r\nabc").ok().flatten().unwrap();
        assert_eq!(req.method, Method::POST);
        assert_eq!(req.path(), b"/a?b");
        assert_eq!(req.host(), Some(&b"h"[..]));
        assert_eq!(req.framing, Framing::Length(3));
        assert!(!req.keep_alive);
        assert_eq!(req.first("connection"), Some(&b"close, x-hop"[..]));
        assert!(
            parse_all(b"GET / HTTP/1.1\r\nHost: h\r\n")
                .ok()
                .flatten()
                .is_none(),
            "partial"
        );
        let up = parse_all(
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .ok()
        .flatten()
        .unwrap();
        assert!(up.upgrade && up.keep_alive);
        let old = parse_all(b"GET / HTTP/1.0\r\n\r\n").ok().flatten().unwrap();
        assert!(old.http10 && !old.keep_alive && old.host().is_none());

        for (raw, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], StatusCode::BAD_REQUEST),
            (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", StatusCode::NOT_IMPLEMENTED),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", StatusCode::NOT_IMPLEMENTED),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", StatusCode::NOT_IMPLEMENTED),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1 1\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1,1\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"GET http://x/ HTTP/1.1\r\nHost: h\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"G\x01T / HTTP/1.1\r\n\r\n", StatusCode::BAD_REQUEST),
        ] {
            let err = parse_all(raw).err().unwrap_or_else(|| panic!("{:?} accepted", String::from_utf8_lossy(raw)));
            assert_eq!(err.status, status, "{:?}: {}", String::from_utf8_lossy(raw), err.message);
        }
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
            "a".repeat(40_000)
        );
        assert_eq!(
            parse_all(big.as_bytes()).err().unwrap().status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn heads_held_as_http_types_are_encoded_with_an_exact_length() {
        let mut headers = HeaderMap::new();
        headers.insert("host", http::HeaderValue::from_static("h"));
        headers.insert("content-length", http::HeaderValue::from_static("999"));
        let mut out = Vec::new();
        encode(&mut out, &Method::POST, "/p?q", &headers, 3);
        assert_eq!(
            out,
            b"POST /p?q HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\n\r\n"
        );
        encode(&mut out, &Method::GET, "/", &HeaderMap::new(), 0);
        assert_eq!(
            out, b"GET / HTTP/1.1\r\n\r\n",
            "no length on a GET without a body"
        );
        encode(&mut out, &Method::PUT, "/", &HeaderMap::new(), 0);
        assert_eq!(out, b"PUT / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    }
}
