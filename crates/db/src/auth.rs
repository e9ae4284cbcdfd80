//! Users and permissions on the data API, in rqlite's format
//! (`scaleout db --auth FILE`), and the secret the nodes' Raft RPCs carry.
//!
//! The file is a JSON list of users, each with a password (plain, or a
//! bcrypt hash as `htpasswd -B` makes) and permissions; the user `*`
//! gives its permissions to everyone, signed in or not:
//!
//! ```json
//! [
//!   {"username": "app", "password": "$2y$10$...", "perms": ["query", "execute"]},
//!   {"username": "ops", "password": "secret", "perms": ["all"]},
//!   {"username": "*", "perms": ["status", "ready"]}
//! ]
//! ```
//!
//! A request signs in with HTTP Basic. Wrong or unknown credentials are
//! `401`; signed in (or not) without the permission the endpoint needs,
//! `401` when anonymous and `403` otherwise. Plain passwords are compared
//! in constant time; bcrypt verifications that succeeded are remembered
//! for a while by a digest of the credentials, so a client signing in on
//! every request does not pay bcrypt's cost each time.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use subtle::ConstantTimeEq;

/// What a user may do (rqlite's permission names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Perm {
    All,
    Execute,
    Query,
    Load,
    Backup,
    Status,
    Ready,
    Join,
    JoinReadOnly,
    Remove,
    Snapshot,
    LeaderOps,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    username: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    perms: Vec<Perm>,
}

enum Password {
    Bcrypt(String),
    Plain(Vec<u8>),
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Password::Bcrypt(_) => "Bcrypt(..)",
            Password::Plain(_) => "Plain(..)",
        })
    }
}

#[derive(Debug)]
struct User {
    password: Password,
    perms: HashSet<Perm>,
}

/// The users of one node.
#[derive(Debug)]
pub struct Users {
    by_name: HashMap<String, User>,
    anyone: HashSet<Perm>,
    /// Digests of credentials bcrypt accepted, and when.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    /// One bcrypt verification at a time: wrong passwords sent in a flood
    /// cost one core at most, not every core.
    bcrypt_gate: Mutex<()>,
}

/// How long a bcrypt verification is remembered.
const REMEMBER: Duration = Duration::from_secs(300);
/// At most this many remembered verifications.
const REMEMBERED: usize = 10_000;

/// Who is asking, once signed in.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub user: Option<String>,
    perms: HashSet<Perm>,
}

impl Caller {
    /// Everything (no `--auth`).
    pub fn anyone_may_do_anything() -> Caller {
        Caller {
            user: None,
            perms: HashSet::from([Perm::All]),
        }
    }

    pub fn may(&self, need: Perm) -> bool {
        may(&self.perms, need)
    }
}

fn may(perms: &HashSet<Perm>, need: Perm) -> bool {
    perms.contains(&Perm::All)
        || perms.contains(&need)
        || (need == Perm::JoinReadOnly && perms.contains(&Perm::Join))
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// `401`: no credentials where they are needed, or wrong ones.
    #[error("{0}")]
    Unauthenticated(String),
    /// `403`: signed in, without the permission.
    #[error("{0}")]
    Forbidden(String),
}

impl Users {
    pub fn load(path: &Path) -> Result<Users, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Users::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Users, String> {
        let entries: Vec<Entry> = serde_json::from_str(text).map_err(|e| {
            format!("{e}; expected [{{\"username\": ..., \"password\": ..., \"perms\": [\"all\" | \"execute\" | \"query\" | \"load\" | \"backup\" | \"status\" | \"ready\" | \"join\" | \"join-read-only\" | \"remove\" | \"snapshot\" | \"leader-ops\"]}}]")
        })?;
        let mut by_name = HashMap::new();
        let mut anyone = HashSet::new();
        for e in entries {
            if e.username == "*" {
                anyone.extend(e.perms);
                continue;
            }
            let Some(password) = e.password else {
                return Err(format!("user {:?} has no password", e.username));
            };
            let password = if ["$2a$", "$2b$", "$2y$"]
                .iter()
                .any(|p| password.starts_with(p))
            {
                Password::Bcrypt(password)
            } else {
                Password::Plain(password.into_bytes())
            };
            let user = User {
                password,
                perms: e.perms.into_iter().collect(),
            };
            if by_name.insert(e.username.clone(), user).is_some() {
                return Err(format!("user {:?} is listed twice", e.username));
            }
        }
        Ok(Users {
            by_name,
            anyone,
            verified: Mutex::new(HashMap::new()),
            bcrypt_gate: Mutex::new(()),
        })
    }

    /// Signs a request in from its `Authorization` header and checks it
    /// may do what it needs. May run bcrypt: call it off the async
    /// threads.
    pub fn check(&self, authorization: Option<&str>, need: Perm) -> Result<Caller, Denied> {
        let caller = match authorization {
            None => Caller {
                user: None,
                perms: self.anyone.clone(),
            },
            Some(header) => {
                let (user, password) = basic(header).ok_or_else(|| {
                    Denied::Unauthenticated("Authorization must be Basic with user:password".into())
                })?;
                let known = self
                    .by_name
                    .get(&user)
                    .filter(|u| self.verify(&user, u, &password));
                let Some(known) = known else {
                    return Err(Denied::Unauthenticated(
                        "wrong user name or password".into(),
                    ));
                };
                Caller {
                    user: Some(user),
                    perms: known.perms.union(&self.anyone).copied().collect(),
                }
            }
        };
        if caller.may(need) {
            return Ok(caller);
        }
        let what = format!("{need:?}");
        Err(match caller.user {
            None => Denied::Unauthenticated(format!(
                "sign in (HTTP Basic) as a user with the {what} permission"
            )),
            Some(user) => Denied::Forbidden(format!("user {user:?} lacks the {what} permission")),
        })
    }

    fn verify(&self, name: &str, user: &User, password: &[u8]) -> bool {
        match &user.password {
            Password::Plain(expected) => bool::from(expected.as_slice().ct_eq(password)),
            Password::Bcrypt(hash) => {
                let mut key = Vec::with_capacity(name.len() + password.len() + hash.len() + 2);
                for part in [name.as_bytes(), password, hash.as_bytes()] {
                    key.extend_from_slice(part);
                    key.push(0);
                }
                let digest = ring::digest::digest(&ring::digest::SHA256, &key);
                let mut id = [0u8; 32];
                id.copy_from_slice(digest.as_ref());
                let now = Instant::now();
                let verified = self
                    .verified
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if verified
                    .get(&id)
                    .is_some_and(|at| now.duration_since(*at) < REMEMBER)
                {
                    return true;
                }
                drop(verified);
                let gate = self
                    .bcrypt_gate
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let ok = std::str::from_utf8(password)
                    .ok()
                    .is_some_and(|p| bcrypt::verify(p, hash).unwrap_or(false));
                drop(gate);
                if ok {
                    let mut verified = self
                        .verified
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if verified.len() >= REMEMBERED {
                        verified.retain(|_, at| now.duration_since(*at) < REMEMBER);
                        if verified.len() >= REMEMBERED {
                            verified.clear();
                        }
                    }
                    verified.insert(id, now);
                }
                ok
            }
        }
    }
}

/// `Basic base64(user:password)`.
fn basic(header: &str) -> Option<(String, Vec<u8>)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let at = decoded.iter().position(|b| *b == b':')?;
    let user = String::from_utf8(decoded[..at].to_vec()).ok()?;
    Some((user, decoded[at + 1..].to_vec()))
}

/// What an endpoint of the node's API needs; `None`: nothing (`/healthz`).
pub fn needs(method: &axum::http::Method, path: &str) -> Option<Perm> {
    Some(match path {
        "/healthz" => return None,
        "/db/execute" => Perm::Execute,
        "/db/query" => Perm::Query,
        // A list of reads and writes: the handler asks for more when it
        // writes.
        "/db/request" => Perm::Query,
        "/db/backup" => Perm::Backup,
        "/db/load" => Perm::Load,
        "/readyz" => Perm::Ready,
        // Joining as a voter needs `join`: the handler checks.
        "/join" => Perm::JoinReadOnly,
        "/remove" => Perm::Remove,
        "/leader" if method == axum::http::Method::POST => Perm::LeaderOps,
        "/status" | "/nodes" | "/leader" | "/metrics" | "/debug/vars" => Perm::Status,
        _ => return None,
    })
}

/// The secret every Raft RPC carries (`Authorization: Bearer ...`), from
/// a file; compared in constant time.
#[derive(Clone)]
pub struct ClusterSecret(std::sync::Arc<Vec<u8>>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    pub fn load(path: &Path) -> Result<ClusterSecret, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        ClusterSecret::new(text.trim()).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn new(secret: &str) -> Result<ClusterSecret, String> {
        if secret.len() < 16 || secret.contains(char::is_whitespace) {
            return Err("the cluster secret must be at least 16 characters, without spaces".into());
        }
        Ok(ClusterSecret(std::sync::Arc::new(
            secret.as_bytes().to_vec(),
        )))
    }

    pub fn header(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.0))
    }

    /// Whether a header (`Authorization`, or the join's own) carries this
    /// secret.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|given| bool::from(given.as_bytes().ct_eq(&self.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic_header(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    fn users() -> Users {
        let hash = bcrypt::hash("hashed-pw", 4).unwrap();
        Users::parse(&format!(
            r#"[
              {{"username": "ops", "password": "secret", "perms": ["all"]}},
              {{"username": "reader", "password": "{hash}", "perms": ["query"]}},
              {{"username": "joiner", "password": "j", "perms": ["join"]}},
              {{"username": "*", "perms": ["status", "ready"]}}
            ]"#
        ))
        .unwrap()
    }

    #[test]
    fn every_permission_allowed_and_denied() {
        let u = users();
        let ops = basic_header("ops", "secret");
        let reader = basic_header("reader", "hashed-pw");
        for need in [
            Perm::Execute,
            Perm::Query,
            Perm::Load,
            Perm::Backup,
            Perm::Remove,
            Perm::Join,
            Perm::LeaderOps,
        ] {
            assert!(u.check(Some(&ops), need).is_ok(), "{need:?}");
            assert!(
                matches!(u.check(None, need), Err(Denied::Unauthenticated(_))),
                "{need:?}"
            );
        }
        assert!(u.check(Some(&reader), Perm::Query).is_ok());
        assert!(u.check(Some(&reader), Perm::Query).is_ok(), "remembered");
        assert!(matches!(
            u.check(Some(&reader), Perm::Execute),
            Err(Denied::Forbidden(_))
        ));
        assert!(
            u.check(Some(&reader), Perm::Status).is_ok(),
            "what everyone may do"
        );
        assert!(u.check(None, Perm::Ready).is_ok());
        let joiner = basic_header("joiner", "j");
        assert!(
            u.check(Some(&joiner), Perm::JoinReadOnly).is_ok(),
            "join includes read-only"
        );
        assert!(matches!(
            u.check(Some(&joiner), Perm::Remove),
            Err(Denied::Forbidden(_))
        ));
    }

    #[test]
    fn wrong_passwords_and_malformed_headers_are_unauthenticated() {
        let u = users();
        for header in [
            basic_header("ops", "wrong"),
            basic_header("ops", ""),
            basic_header("nobody", "secret"),
            basic_header("reader", "wrong"),
            "Basic !!!".to_string(),
            "Bearer secret".to_string(),
            "Basic b3Bz".to_string(),
        ] {
            assert!(
                matches!(
                    u.check(Some(&header), Perm::Status),
                    Err(Denied::Unauthenticated(_))
                ),
                "{header}"
            );
        }
    }

    #[test]
    fn a_bad_file_says_what_to_fix() {
        assert!(
            Users::parse(r#"[{"username": "a", "password": "b", "perms": ["everything"]}]"#)
                .unwrap_err()
                .contains("join-read-only")
        );
        assert!(Users::parse(r#"[{"username": "a", "perms": ["all"]}]"#)
            .unwrap_err()
            .contains("no password"));
        assert!(Users::parse(
            r#"[{"username": "a", "password": "b"}, {"username": "a", "password": "c"}]"#
        )
        .unwrap_err()
        .contains("twice"));
    }

    #[test]
    fn the_cluster_secret_is_all_or_nothing() {
        let s = ClusterSecret::new("0123456789abcdef-secret").unwrap();
        assert!(s.admits(Some(&s.header())));
        assert!(!s.admits(Some("Bearer 0123456789abcdef-secreT")));
        assert!(!s.admits(Some("Bearer 0123456789abcdef-secre")));
        assert!(!s.admits(None));
        assert!(ClusterSecret::new("short").is_err());
    }
}
