//! Backend response heads: [`parse`] into a [`ResponseHead`] of spans
//! over the bytes read, with the body's framing and whether the backend
//! keeps the connection.

use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};

use super::{invalid, span, span_values, Chunk, Framing, Headers};

/// Most response headers accepted from a backend.
const MAX_HEADERS: usize = 128;
/// Largest response head accepted from a backend.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A response head as the backend sent it: parsed, not copied. Header
/// names and values are spans of `head`.
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub head: Bytes,
    pub reason: Range<usize>,
    pub headers: Vec<(Range<usize>, Range<usize>)>,
    pub framing: Framing,
    /// The backend will keep the connection open after this response.
    pub keep_alive: bool,
}

impl ResponseHead {
    pub fn header(&self, i: usize) -> (&[u8], &[u8]) {
        let (n, v) = &self.headers[i];
        (&self.head[n.clone()], &self.head[v.clone()])
    }

    /// As `http` types, for the hyper side.
    pub fn into_parts(self) -> std::io::Result<http::response::Parts> {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (n, v) in &self.headers {
            let name = HeaderName::from_bytes(&self.head[n.clone()])
                .map_err(|_| invalid("bad header name"))?;
            let value = HeaderValue::from_maybe_shared(self.head.slice(v.clone()))
                .map_err(|_| invalid("bad header value"))?;
            headers.append(name, value);
        }
        if matches!(self.framing, Framing::Chunked(_)) {
            headers.remove(http::header::CONTENT_LENGTH);
        }
        let mut parts = Response::new(()).into_parts().0;
        parts.status = self.status;
        parts.version = self.version;
        parts.headers = headers;
        Ok(parts)
    }
}

impl Headers for ResponseHead {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        span_values(&self.head, &self.headers, name)
    }
}

/// Parses a response head off the front of `buf`, skipping interim
/// answers (100 Continue, 103) but `101`. `Ok(None)`: not a whole head yet.
/// `head_request`: the answer to a HEAD, which has no body whatever its
/// headers say.
pub fn parse(buf: &mut BytesMut, head_request: bool) -> std::io::Result<Option<ResponseHead>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD_BYTES {
                    return Err(invalid("response head too large"));
                }
                return Ok(None);
            }
            Err(e) => return Err(invalid(&format!("malformed response head: {e}"))),
        };
        let code = resp.code.unwrap_or(0);
        if (100..200).contains(&code) && code != 101 {
            buf.advance(len);
            continue;
        }
        let whole: &[u8] = buf;
        let spans: Vec<_> = resp
            .headers
            .iter()
            .map(|h| (span(whole, h.name.as_bytes()), span(whole, h.value)))
            .collect();
        let reason = match resp.reason {
            Some(r) => span(whole, r.as_bytes()),
            None => 0..0,
        };
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let status = StatusCode::from_u16(code).map_err(|_| invalid("bad status code"))?;
        let head = buf.split_to(len).freeze();
        let mut raw = ResponseHead {
            status,
            version,
            head,
            reason,
            headers: spans,
            framing: Framing::Close,
            keep_alive: false,
        };
        let (framing, keep_alive) = framing(&raw, head_request)?;
        raw.framing = framing;
        raw.keep_alive = keep_alive;
        return Ok(Some(raw));
    }
}

/// The body framing and connection persistence a response head says.
fn framing(raw: &ResponseHead, head_request: bool) -> std::io::Result<(Framing, bool)> {
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut keep_alive = raw.version == Version::HTTP_11;
    for i in 0..raw.headers.len() {
        let (name, value) = raw.header(i);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| invalid("bad content-length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(invalid("conflicting content-length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value
                .split(|b| *b == b',')
                .next_back()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    let status = raw.status;
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    Ok(if no_body {
        (Framing::Length(0), keep_alive)
    } else if chunked {
        (Framing::Chunked(Chunk::Size), keep_alive)
    } else if let Some(n) = content_length {
        (Framing::Length(n), keep_alive)
    } else {
        (Framing::Close, false)
    })
}
