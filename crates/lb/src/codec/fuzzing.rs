//! Entry points for the fuzzers (`fuzz/`) and their regression tests: the
//! request-head parser and the chunked decoder on arbitrary bytes, with
//! the properties they must keep. Panics mean a bug.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // a fuzzing entry point: a panic is the finding

use bytes::BytesMut;

use super::request::parse as parse_request;
use super::{chunked_step, Chunk, Framing};

/// Parses `data` as a request head (fed in two pieces, as a socket
/// might), then decodes what follows as the body its framing says.
pub fn request(data: &[u8]) {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut rbuf = BytesMut::from(&data[..split]);
    let first = parse_request(&mut rbuf, 8192);
    let req = match first {
        Ok(None) => {
            rbuf.extend_from_slice(&data[split..]);
            parse_request(&mut rbuf, 8192)
        }
        other => {
            rbuf.extend_from_slice(&data[split..]);
            other
        }
    };
    let Ok(Some(req)) = req else { return };
    assert!(
        req.head.len() <= data.len(),
        "a head is never longer than its bytes"
    );
    for i in 0..req.headers.len() {
        // Every header range lies inside the head.
        let _ = (req.name(i), req.value(i));
    }
    if let Framing::Chunked(mut state) = req.framing {
        let before = rbuf.len();
        let mut data_bytes = 0usize;
        while let Ok(Some(chunk)) = chunked_step(&mut state, &mut rbuf) {
            data_bytes += chunk.len();
        }
        assert!(data_bytes <= before, "no more body than bytes");
    }
}

/// Encodes `data` as a chunked body (chunk sizes from the data itself)
/// and decodes it a few bytes at a time: the body comes back whole.
pub fn chunked_round_trip(data: &[u8]) {
    let mut encoded = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (usize::from(rest[0]) % 17 + 1).min(rest.len());
        encoded.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        encoded.extend_from_slice(&rest[..n]);
        encoded.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    encoded.extend_from_slice(b"0\r\n\r\n");
    let step = data.first().map_or(1, |b| usize::from(*b % 7) + 1);
    let mut state = Chunk::Size;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in encoded.chunks(step) {
        buf.extend_from_slice(piece);
        while let Some(chunk) = chunked_step(&mut state, &mut buf).expect("valid chunked") {
            out.extend_from_slice(&chunk);
        }
    }
    assert_eq!(state, Chunk::Done);
    assert_eq!(out, data);
}
