//! `X-Request-Id`: one rule for every tier. The load balancer keeps a
//! client's id that passes [`acceptable`] and makes one otherwise; the
//! web servers and the database nodes apply the same rule, so an id the
//! load balancer kept is never replaced further in, and every tier's log
//! lines for one request carry the same id.

/// The header's name, lowercase as HTTP/2 needs it.
pub const HEADER: &str = "x-request-id";

/// The longest id kept.
pub const MAX_LEN: usize = 128;

/// Whether a client's id is kept: 1 to [`MAX_LEN`] bytes of visible
/// ASCII (no spaces or controls, so it cannot forge or split a log line).
pub fn acceptable(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A new id: 128 random bits as 32 lowercase hex digits (always a valid
/// header value, and [`acceptable`]).
pub fn new() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut text = [0u8; 32];
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    text
}

/// [`new`] as a `String`.
pub fn new_string() -> String {
    new().iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_keeps_printable_ids_up_to_the_limit_and_nothing_else() {
        assert!(acceptable(b"abc-123"));
        assert!(acceptable(&[b'x'; MAX_LEN]));
        assert!(!acceptable(&[b'x'; MAX_LEN + 1]));
        assert!(!acceptable(b""));
        assert!(!acceptable(b"two words"));
        assert!(!acceptable(b"line\nbreak"));
        assert!(!acceptable("caf\u{e9}".as_bytes()));
        let made = new();
        assert!(acceptable(&made));
        assert_ne!(made, new(), "ids are random");
        assert_eq!(new_string().len(), 32);
    }
}
