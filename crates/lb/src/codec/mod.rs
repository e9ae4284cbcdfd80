//! HTTP/1.1 as bytes, for both request paths: heads parsed with httparse
//! into spans of the bytes read (nothing copied) — [`request`] for what
//! clients send, [`response`] for what backends answer — message framing
//! (RFC 9112 §6) with the [`chunked`] coding, and the small encoders the
//! paths write heads with. No I/O and no policy: what a proxy adds to a
//! message or drops from it is [`crate::rules`]; sockets are
//! [`crate::fast`]'s and [`crate::upstream`]'s.

pub mod chunked;
#[doc(hidden)]
pub mod fuzzing;
pub mod request;
pub mod response;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method};

pub use chunked::{chunked_scan, chunked_step, Chunk};

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the sender closes the connection.
    Close,
}

/// The next piece of body in `buf` as the client gets it, and whether the
/// body is complete. `dechunk`: chunked framing is decoded (for hyper, or an
/// HTTP/1.0 client) rather than passed through as it is.
pub fn take_body(
    framing: &mut Framing,
    buf: &mut BytesMut,
    dechunk: bool,
) -> std::io::Result<(Bytes, bool)> {
    match framing {
        Framing::Length(n) => {
            let take = (*n).min(buf.len() as u64) as usize;
            *n -= take as u64;
            Ok((buf.split_to(take).freeze(), *n == 0))
        }
        Framing::Chunked(state) if dechunk => {
            let mut out = BytesMut::new();
            while let Some(data) = chunked_step(state, buf)? {
                out.extend_from_slice(&data);
            }
            Ok((out.freeze(), *state == Chunk::Done))
        }
        Framing::Chunked(state) => {
            let n = chunked_scan(state, buf)?;
            Ok((buf.split_to(n).freeze(), *state == Chunk::Done))
        }
        Framing::Close => Ok((buf.split().freeze(), false)),
    }
}

/// A message's headers as either path holds them (a `HeaderMap`, or spans
/// of the bytes httparse read), for the rules that read them.
pub trait Headers {
    /// Every value of header `name` (ASCII case-insensitive), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;

    fn first<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl Headers for HeaderMap {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

/// Header spans over a head's bytes: what both parsed heads hold.
fn span_values<'a>(
    head: &'a [u8],
    headers: &'a [(std::ops::Range<usize>, std::ops::Range<usize>)],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| head[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
        .map(move |(_, v)| &head[v.clone()])
}

/// Offset of `part` inside `whole` (both from the same buffer).
pub fn span(whole: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

/// The body is kept whole, so its length is known; methods that
/// usually carry a body get an explicit 0.
pub fn push_content_length(out: &mut Vec<u8>, method: &Method, len: u64) {
    if len > 0 || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, len);
        out.extend_from_slice(b"\r\n");
    }
}

pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

pub(crate) fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_pass_through_or_decode() {
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\nNEXT"[..]);
        let (out, done) = take_body(&mut framing, &mut buf, false).unwrap();
        assert_eq!(&out[..], b"3\r\nabc\r\n0\r\n\r\n");
        assert!(done);
        assert_eq!(&buf[..], b"NEXT", "the next response is left alone");

        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n2\r"[..]);
        let (out, done) = take_body(&mut framing, &mut buf, true).unwrap();
        assert_eq!(&out[..], b"abc");
        assert!(!done);
        buf.extend_from_slice(b"\nde\r\n0\r\n\r\n");
        let (out, done) = take_body(&mut framing, &mut buf, true).unwrap();
        assert_eq!(&out[..], b"de");
        assert!(done);
    }

    #[test]
    fn decimals_and_header_lookups() {
        let mut n = Vec::new();
        push_decimal(&mut n, 1234567);
        push_decimal(&mut n, 0);
        push_decimal(&mut n, u64::MAX);
        assert_eq!(n, b"1234567018446744073709551615");
        let mut h = HeaderMap::new();
        h.append("x-a", http::HeaderValue::from_static("1"));
        h.append("X-A", http::HeaderValue::from_static("2"));
        assert_eq!(
            Headers::values(&h, "x-a").collect::<Vec<_>>(),
            [&b"1"[..], b"2"]
        );
        assert_eq!(Headers::first(&h, "X-A"), Some(&b"1"[..]));
        assert_eq!(Headers::first(&h, "x-b"), None);
    }

    /// Every input the fuzzers saved (seeds and past crashes) in
    /// `fuzz/regressions/TARGET/`, replayed.
    fn replay_lb(target: &str, run: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/regressions")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("the regressions directory") {
            run(&std::fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no inputs in {}", dir.display());
    }

    #[test]
    fn fuzz_regressions() {
        replay_lb("lb_request", fuzzing::request);
        replay_lb("lb_chunked", fuzzing::chunked_round_trip);
    }
}
