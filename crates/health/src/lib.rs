//! One definition of healthy, shared by the tiers that check others: the
//! load balancer (its backends) and the DNS server (the load balancers it
//! answers with).
//!
//! A check is one `GET` over a fresh connection, `Connection: close` (as
//! HAProxy's `httpchk` does, so a check also proves the peer still takes
//! connections); it passes on a 2xx or 3xx answer within its time
//! ([`passes`], [`probe`]). `rise` passes in a row bring a peer up, `fall`
//! failures in a row take it down ([`Verdict`]). The verdict logic is free
//! of I/O and of clocks; the callers own the connecting (plain TCP, TLS)
//! and the ticking.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Whether an answer's status means healthy: 2xx or 3xx, HAProxy's
/// default for `option httpchk`. A redirect is a peer that is up and
/// configured to send clients elsewhere, not a dead one.
pub fn passes(status: StatusCode) -> bool {
    status.is_success() || status.is_redirection()
}

/// How many checks in a row change a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Passes in a row that bring a down peer up.
    pub rise: u32,
    /// Failures in a row that take an up peer down.
    pub fall: u32,
}

/// A peer's health as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    up: bool,
    /// Results in a row that disagree with `up`.
    streak: u32,
}

/// A change of verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

impl Verdict {
    /// Peers start up: a new one takes traffic at once, and is taken out
    /// after `fall` failed checks.
    pub fn new_up() -> Self {
        Verdict {
            up: true,
            streak: 0,
        }
    }

    /// A peer that must prove itself first: in after `rise` passed checks
    /// (a backend found by name, which may be one that just failed).
    pub fn new_down() -> Self {
        Verdict {
            up: false,
            streak: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Feeds one check's result.
    pub fn observe(&mut self, passed: bool, t: Thresholds) -> Option<Transition> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        // A threshold of 0 would mean "change before any evidence"; one
        // result is the least that can change a verdict.
        let needed = if self.up { t.fall } else { t.rise }.max(1);
        if self.streak < needed {
            return None;
        }
        self.up = passed;
        self.streak = 0;
        Some(if passed {
            Transition::WentUp
        } else {
            Transition::WentDown
        })
    }
}

/// One check over an open connection (plain or TLS, the caller's to
/// make): `GET path` with `Host: authority`, then [`passes`] on the
/// answer's status. Bounded by nothing here: the caller wraps the connect
/// and the probe together in one timeout ([`within`]).
pub async fn probe<S>(stream: S, authority: &str, path: &str, agent: &str) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, agent)
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if passes(resp.status()) {
        Ok(())
    } else {
        Err(format!("status {}", resp.status()))
    }
}

/// `check`, failed if it takes longer than `timeout`.
pub async fn within<F>(timeout: Duration, check: F) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Thresholds = Thresholds { rise: 2, fall: 3 };

    #[test]
    fn fall_and_rise_thresholds() {
        let mut s = Verdict::new_up();
        assert_eq!(s.observe(false, T), None);
        assert_eq!(s.observe(false, T), None);
        assert_eq!(s.observe(true, T), None, "a pass breaks the failing streak");
        assert_eq!(s.observe(false, T), None);
        assert_eq!(s.observe(false, T), None);
        assert_eq!(s.observe(false, T), Some(Transition::WentDown));
        assert!(!s.is_up());
        assert_eq!(s.observe(false, T), None);
        assert_eq!(s.observe(true, T), None);
        assert_eq!(s.observe(true, T), Some(Transition::WentUp));
        assert!(s.is_up());
    }

    #[test]
    fn a_zero_threshold_still_needs_one_result() {
        let zero = Thresholds { rise: 0, fall: 0 };
        let mut s = Verdict::new_up();
        assert_eq!(s.observe(true, zero), None);
        assert_eq!(s.observe(false, zero), Some(Transition::WentDown));
        assert_eq!(s.observe(true, zero), Some(Transition::WentUp));
    }

    #[test]
    fn healthy_is_2xx_or_3xx() {
        for ok in [200, 204, 301, 302, 308] {
            assert!(passes(StatusCode::from_u16(ok).unwrap()), "{ok}");
        }
        for bad in [100, 404, 429, 500, 503] {
            assert!(!passes(StatusCode::from_u16(bad).unwrap()), "{bad}");
        }
    }

    /// A one-shot HTTP/1 server answering `status`; returns what it read.
    async fn serve_once(
        status: &'static str,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let answer =
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&head).into_owned()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_probe_sends_the_check_and_judges_the_status() {
        for (status, ok) in [
            ("200 OK", true),
            ("302 Found", true),
            ("503 Service Unavailable", false),
        ] {
            let (addr, server) = serve_once(status).await;
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let result = probe(tcp, "peer.test:80", "/healthz", "scaleout test").await;
            assert_eq!(result.is_ok(), ok, "{status}: {result:?}");
            let head = server.await.unwrap().to_ascii_lowercase();
            assert!(head.starts_with("get /healthz http/1.1\r\n"), "{head}");
            assert!(head.contains("host: peer.test:80\r\n"), "{head}");
            assert!(head.contains("connection: close\r\n"), "{head}");
        }
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_fails_within_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted (by the kernel's backlog) but never answered.
        let check = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            probe(tcp, "peer.test", "/", "scaleout test").await
        };
        let result = within(Duration::from_millis(200), check).await;
        assert!(result.unwrap_err().contains("no answer within"));
        drop(listener);
    }
}
