//! What crosses between scaleout's tiers, written down once.
//!
//! - [`data`]: the data API's JSON (rqlite's shapes plus scaleout's
//!   additions): the results of `/db/execute`, `/db/query`,
//!   `/db/request`, the listing of `/nodes`, `/status`, `/leader` and the
//!   error answers. The database serializes these types and the client
//!   parses them, so a renamed or dropped key fails to compile on one side
//!   and to parse on the other instead of silently turning into a default.
//!   Unknown fields are tolerated when reading (rqlite's clients, and
//!   newer nodes, may send more); a missing required field is an error.
//! - [`request_id`]: the one rule for `X-Request-Id`, which the load
//!   balancer, the web servers and the database nodes all apply.
//! - [`ready`]: the line a role prints once it serves, which the lab (and
//!   any supervisor) reads as JSON.

pub mod data;
pub mod ready;
pub mod request_id;
