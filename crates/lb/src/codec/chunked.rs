//! The chunked transfer coding (RFC 9112 §7.1): decoded a step at a time
//! ([`chunked_step`]), or walked without decoding to pass it on as it is
//! ([`chunked_scan`]). Sizes and line lengths are bounded.

use bytes::{Buf, Bytes, BytesMut};

use super::{find_crlf, invalid};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

/// One step of chunked decoding over `buf`: the next piece of data, or
/// `None` when more bytes are needed (or the body is `Done`). Framing
/// bytes are consumed; trailers are dropped.
pub fn chunked_step(state: &mut Chunk, buf: &mut BytesMut) -> std::io::Result<Option<Bytes>> {
    loop {
        match *state {
            Chunk::Done => return Ok(None),
            Chunk::Size => {
                let Some(eol) = find_crlf(buf) else {
                    if buf.len() > 4096 {
                        return Err(invalid("chunk size line too long"));
                    }
                    return Ok(None);
                };
                let size = chunk_size(&buf[..eol])?;
                buf.advance(eol + 2);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(n) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = n.min(buf.len() as u64) as usize;
                *state = if n == take as u64 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(n - take as u64)
                };
                return Ok(Some(buf.split_to(take).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(invalid("missing CRLF after chunk data"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(eol) = find_crlf(buf) else {
                    if buf.len() > 16 * 1024 {
                        return Err(invalid("trailers too long"));
                    }
                    return Ok(None);
                };
                buf.advance(eol + 2);
                if eol == 0 {
                    *state = Chunk::Done;
                }
            }
        }
    }
}

/// Walks chunked framing without decoding it: how many leading bytes of
/// `buf` belong to the body (to pass them on as they are). Stops early at a
/// line that has not fully arrived.
pub fn chunked_scan(state: &mut Chunk, buf: &[u8]) -> std::io::Result<usize> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        match *state {
            Chunk::Done => return Ok(at),
            Chunk::Size | Chunk::Trailers => {
                let Some(eol) = find_crlf(rest) else {
                    if rest.len() > 16 * 1024 {
                        return Err(invalid("chunk line too long"));
                    }
                    return Ok(at);
                };
                if *state == Chunk::Size {
                    let size = chunk_size(&rest[..eol])?;
                    *state = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                } else if eol == 0 {
                    *state = Chunk::Done;
                }
                at += eol + 2;
            }
            Chunk::Data(n) => {
                if rest.is_empty() {
                    return Ok(at);
                }
                let take = n.min(rest.len() as u64);
                *state = if n == take {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(n - take)
                };
                at += take as usize;
            }
            Chunk::DataEnd => {
                if rest.len() < 2 {
                    return Ok(at);
                }
                if &rest[..2] != b"\r\n" {
                    return Err(invalid("missing CRLF after chunk data"));
                }
                *state = Chunk::Size;
                at += 2;
            }
        }
    }
}

/// The size on a chunk-size line (hex, extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> std::io::Result<u64> {
    let hex = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or(b"")
        .trim_ascii();
    std::str::from_utf8(hex)
        .ok()
        .filter(|h| !h.is_empty() && h.len() <= 15)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| invalid("bad chunk size"))
}
