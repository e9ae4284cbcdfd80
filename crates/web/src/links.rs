//! The app's rules for links, free of I/O: what URL is acceptable, what a
//! code looks like, how a new code is drawn.

use rand::Rng;

/// The longest URL accepted, in bytes (the common browser/CDN limit).
pub const MAX_URL_BYTES: usize = 2048;
/// Length of a generated code: 62^7 ≈ 3.5e12 codes.
pub const CODE_LEN: usize = 7;
/// The longest code a lookup accepts; anything longer is not a code.
const MAX_CODE_LEN: usize = 32;
const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Single-segment paths the app serves itself; a code must never shadow one.
const RESERVED: &[&str] = &[
    "api",
    "links",
    "healthz",
    "readyz",
    "metrics",
    "favicon.ico",
];

/// Checks a URL submitted for shortening and returns its normalized form
/// (what is stored and redirected to), or a message saying what to fix.
pub fn validate_url(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("url is empty: give an http:// or https:// URL".into());
    }
    if raw.len() > MAX_URL_BYTES {
        return Err(format!(
            "url is {} bytes long; the limit is {MAX_URL_BYTES}",
            raw.len()
        ));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("url contains whitespace or control characters".into());
    }
    let url = url::Url::parse(raw).map_err(|e| format!("url is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "url scheme {:?} is not allowed: use http or https",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("url has no host".into());
    }
    let normalized = String::from(url);
    if normalized.len() > MAX_URL_BYTES {
        return Err(format!(
            "url is {} bytes long once normalized; the limit is {MAX_URL_BYTES}",
            normalized.len()
        ));
    }
    Ok(normalized)
}

/// Whether `code` could name a link (so lookups of anything else are a
/// plain "not found", without touching the database).
pub fn is_valid_code(code: &str) -> bool {
    (1..=MAX_CODE_LEN).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Draws a random code that does not collide with the app's own paths.
pub fn new_code(rng: &mut impl Rng) -> String {
    loop {
        let code: String = (0..CODE_LEN)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect();
        if !RESERVED.contains(&code.as_str()) {
            return code;
        }
    }
}

/// A new delete token: 128 random bits as 32 hex digits. Only its hash is
/// stored ([`token_hash`]), so a copy of the database deletes nothing.
pub fn new_delete_token(rng: &mut impl Rng) -> String {
    format!("{:032x}", rng.random::<u128>())
}

/// SHA-256 of a token, in hex: what the database keeps and compares.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_http_and_https_and_normalizes() {
        assert_eq!(
            validate_url("https://example.com").unwrap(),
            "https://example.com/"
        );
        assert_eq!(
            validate_url("  http://a.b/c?d=e#f ").unwrap(),
            "http://a.b/c?d=e#f"
        );
        assert_eq!(
            validate_url("https://bücher.de/").unwrap(),
            "https://xn--bcher-kva.de/"
        );
    }

    #[test]
    fn rejects_bad_urls_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("ftp://example.com/", "scheme"),
            ("javascript:alert(1)", "scheme"),
            ("example.com", "not a valid URL"),
            ("https://exa mple.com/", "whitespace"),
            ("http://", "empty host"),
        ] {
            let err = validate_url(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn enforces_the_length_limit() {
        let base = "https://example.com/";
        let fits = format!("{base}{}", "a".repeat(MAX_URL_BYTES - base.len()));
        assert!(validate_url(&fits).is_ok());
        let over = format!("{fits}a");
        assert!(validate_url(&over).unwrap_err().contains("limit is 2048"));
    }

    #[test]
    fn codes_are_alphanumeric_and_not_reserved() {
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let code = new_code(&mut rng);
            assert_eq!(code.len(), CODE_LEN);
            assert!(is_valid_code(&code));
            assert!(!RESERVED.contains(&code.as_str()));
        }
        assert!(!is_valid_code(""));
        assert!(!is_valid_code("a-b"));
        assert!(!is_valid_code(&"a".repeat(33)));
    }
}
