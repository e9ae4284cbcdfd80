//! The zone and its answers, free of I/O: which records answer a query,
//! given which addresses are healthy. Policy:
//! - names outside the zone: REFUSED (authoritative only, no recursion);
//! - the apex: SOA and NS; a host: A/AAAA of its healthy addresses, rotated
//!   per query so clients spread over the load balancers; when none of a
//!   host's addresses is healthy, all of them (fail open: a possibly-down
//!   answer beats no answer, as Route 53 does);
//! - a name in the zone that is not a host: NXDOMAIN; a host asked for a
//!   type it lacks: NOERROR with no answers (NODATA); both with the SOA in
//!   the authority section for negative caching (RFC 2308).

use std::net::IpAddr;
use std::str::FromStr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

/// One name in the zone and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: Name,
    pub addrs: Vec<IpAddr>,
    /// Given at start (`--host`), not made through the records API: such
    /// a name keeps at least one address.
    pub configured: bool,
}

#[derive(Debug, Clone)]
pub struct Zone {
    pub origin: Name,
    origin_lower: LowerName,
    pub hosts: Vec<Host>,
    pub ttl: u32,
    soa: Record,
    ns: Record,
}

/// What to send back.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub rcode: ResponseCode,
    /// Whether the server is authoritative for the name (false: REFUSED).
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
}

/// Drops answers from the end until the response (`query`, the answers,
/// the authority section, and `reserve` bytes for what is added later,
/// such as the EDNS record) fits in `limit` bytes; true when it dropped
/// any, which the TC bit must say (RFC 1035 §4.2.1, RFC 6891 §7).
pub fn fit(
    answer: &mut Answer,
    query: &hickory_proto::op::Query,
    limit: usize,
    reserve: usize,
) -> bool {
    let size = |a: &Answer| {
        let mut m = hickory_proto::op::Message::new();
        m.add_query(query.clone());
        m.add_answers(a.answers.iter().cloned());
        m.add_name_servers(a.authority.iter().cloned());
        m.to_vec().map_or(usize::MAX, |v| v.len() + reserve)
    };
    let mut truncated = false;
    while !answer.answers.is_empty() && size(answer) > limit {
        answer.answers.pop();
        truncated = true;
    }
    truncated
}

/// Whether a client can connect to `addr` (not unspecified, broadcast or
/// multicast).
pub fn connectable(addr: IpAddr) -> bool {
    !(addr.is_unspecified()
        || addr.is_multicast()
        || matches!(addr, IpAddr::V4(v4) if v4.is_broadcast()))
}

/// Why an address could not be taken out of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The name does not have that address.
    Absent,
    /// It is the name's last address.
    Last,
}

/// Parses `www=127.0.0.2,127.0.0.3` (a name relative to the zone, or `@`).
pub fn parse_host(spec: &str, origin: &Name) -> Result<Host, String> {
    let (label, list) = spec
        .split_once('=')
        .ok_or_else(|| format!("--host {spec:?}: use NAME=IP[,IP...]"))?;
    let name = if label == "@" {
        origin.clone()
    } else {
        Name::from_str(label)
            .map_err(|e| format!("--host {spec:?}: bad name {label:?}: {e}"))?
            .append_domain(origin)
            .map_err(|e| format!("--host {spec:?}: {e}"))?
    };
    let addrs = list
        .split(',')
        .map(|a| {
            a.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("--host {spec:?}: {a:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(format!("--host {spec:?}: give at least one address"));
    }
    Ok(Host {
        name,
        addrs,
        configured: true,
    })
}

impl Zone {
    pub fn new(origin: Name, hosts: Vec<Host>, ttl: u32) -> Self {
        let origin = origin.to_lowercase();
        let mut fqdn = origin.clone();
        fqdn.set_fqdn(true);
        let ns_name = Name::from_str("ns")
            .ok()
            .and_then(|n| n.append_domain(&fqdn).ok())
            .unwrap_or_else(|| fqdn.clone());
        let mbox = Name::from_str("hostmaster")
            .ok()
            .and_then(|n| n.append_domain(&fqdn).ok())
            .unwrap_or_else(|| fqdn.clone());
        // serial, refresh, retry, expire, minimum (negative-cache TTL).
        let soa = SOA::new(ns_name.clone(), mbox, 1, 3600, 600, 86400, ttl);
        let soa = Record::from_rdata(fqdn.clone(), ttl, RData::SOA(soa));
        let ns = Record::from_rdata(fqdn.clone(), ttl, RData::NS(NS(ns_name)));
        let hosts = hosts
            .into_iter()
            .map(|mut h| {
                h.name = h.name.to_lowercase();
                h.name.set_fqdn(true);
                h
            })
            .collect();
        Zone {
            origin_lower: LowerName::from(&fqdn),
            origin: fqdn,
            hosts,
            ttl,
            soa,
            ns,
        }
    }

    /// Most names and addresses per name the zone takes through edits.
    pub const MAX_HOSTS: usize = 256;
    pub const MAX_ADDRS: usize = 64;

    /// The host `label` names (relative to the origin, `@` for the apex,
    /// or a name inside the zone, with or without its final dot), or why
    /// it is not one of this zone's names. Host names only: letters,
    /// digits, `-` and `_` in each label (no wildcards, no escapes).
    pub fn name_of(&self, label: &str) -> Result<Name, String> {
        let origin = self.origin.to_ascii().to_ascii_lowercase();
        let origin = origin.trim_end_matches('.');
        let lower = label.to_ascii_lowercase();
        let plain = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let bare = lower.trim_end_matches('.');
        if label != "@" && !bare.split('.').all(plain) {
            return Err(format!(
                "bad name {label:?}: use letters, digits, - and _ in each label (at most 63), no wildcards"
            ));
        }
        let name = if label == "@" {
            self.origin.clone()
        } else {
            let name = Name::from_str(label).map_err(|e| format!("bad name {label:?}: {e}"))?;
            // `www.scaleout.test` is the zone's own name too.
            if name.is_fqdn() || bare == origin || bare.ends_with(&format!(".{origin}")) {
                let mut name = name;
                name.set_fqdn(true);
                name
            } else {
                name.append_domain(&self.origin)
                    .map_err(|e| format!("bad name {label:?}: {e}"))?
            }
        };
        let mut name = name.to_lowercase();
        name.set_fqdn(true);
        if !self.origin_lower.zone_of(&LowerName::from(&name)) {
            return Err(format!("{name} is not in the zone {}", self.origin));
        }
        Ok(name)
    }

    /// Adds `addr` to `name` (made when new); false when it was there.
    /// An address nobody can connect to (unspecified, broadcast,
    /// multicast) is refused.
    pub fn add(&mut self, name: &Name, addr: IpAddr) -> Result<bool, String> {
        if !connectable(addr) {
            return Err(format!("{addr} is not an address a client can connect to"));
        }
        let hosts = self.hosts.len();
        match self.hosts.iter_mut().find(|h| h.name == *name) {
            Some(h) if h.addrs.contains(&addr) => Ok(false),
            Some(h) if h.addrs.len() >= Self::MAX_ADDRS => Err(format!(
                "{name} has {} addresses, the most it may have",
                Self::MAX_ADDRS
            )),
            Some(h) => {
                h.addrs.push(addr);
                self.changed();
                Ok(true)
            }
            None if hosts >= Self::MAX_HOSTS => Err(format!(
                "the zone has {} names, the most it may have",
                Self::MAX_HOSTS
            )),
            None => {
                self.hosts.push(Host {
                    name: name.clone(),
                    addrs: vec![addr],
                    configured: false,
                });
                self.changed();
                Ok(true)
            }
        }
    }

    /// Takes `addr` out of `name`'s answers. A name keeps at least one
    /// address: without one its answers would turn into NXDOMAIN, which
    /// resolvers cache.
    pub fn remove(&mut self, name: &Name, addr: IpAddr) -> Result<(), Removal> {
        let host = self
            .hosts
            .iter_mut()
            .find(|h| h.name == *name)
            .ok_or(Removal::Absent)?;
        let at = host
            .addrs
            .iter()
            .position(|a| *a == addr)
            .ok_or(Removal::Absent)?;
        if host.addrs.len() == 1 {
            if host.configured {
                return Err(Removal::Last);
            }
            self.changed();
            // A name made through the API goes with its last address.
            self.hosts.retain(|h| h.name != *name);
            return Ok(());
        }
        host.addrs.remove(at);
        self.changed();
        Ok(())
    }

    /// The zone changed: its SOA serial says so (secondaries and caches
    /// that look at it see a new version).
    fn changed(&mut self) {
        if let RData::SOA(soa) = self.soa.data_mut() {
            soa.increment_serial();
        }
    }

    /// Every address of every host (what the health checker watches).
    pub fn all_addrs(&self) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = self
            .hosts
            .iter()
            .flat_map(|h| h.addrs.iter().copied())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    pub fn answer(
        &self,
        qname: &LowerName,
        qtype: RecordType,
        healthy: &dyn Fn(IpAddr) -> bool,
        rotation: usize,
    ) -> Answer {
        if !self.origin_lower.zone_of(qname) {
            return Answer {
                rcode: ResponseCode::Refused,
                authoritative: false,
                answers: vec![],
                authority: vec![],
            };
        }
        let negative = |rcode| Answer {
            rcode,
            authoritative: true,
            answers: vec![],
            authority: vec![self.soa.clone()],
        };
        let mut answers = Vec::new();
        let is_apex = *qname == self.origin_lower;
        if is_apex {
            match qtype {
                RecordType::SOA => answers.push(self.soa.clone()),
                RecordType::NS => answers.push(self.ns.clone()),
                RecordType::ANY => answers.extend([self.soa.clone(), self.ns.clone()]),
                _ => {}
            }
        }
        let host = self
            .hosts
            .iter()
            .find(|h| LowerName::from(&h.name) == *qname);
        if let Some(host) = host {
            let wanted: Vec<IpAddr> = host
                .addrs
                .iter()
                .copied()
                .filter(|a| match qtype {
                    RecordType::A => a.is_ipv4(),
                    RecordType::AAAA => a.is_ipv6(),
                    RecordType::ANY => true,
                    _ => false,
                })
                .collect();
            let up: Vec<IpAddr> = wanted.iter().copied().filter(|a| healthy(*a)).collect();
            let mut chosen = if up.is_empty() { wanted } else { up };
            if !chosen.is_empty() {
                let n = chosen.len();
                chosen.rotate_left(rotation % n);
            }
            for addr in chosen {
                let rdata = match addr {
                    IpAddr::V4(v4) => RData::A(A(v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                };
                answers.push(Record::from_rdata(host.name.clone(), self.ttl, rdata));
            }
        } else if !is_apex {
            return negative(ResponseCode::NXDomain);
        }
        if answers.is_empty() {
            return negative(ResponseCode::NoError);
        }
        Answer {
            rcode: ResponseCode::NoError,
            authoritative: true,
            answers,
            authority: vec![],
        }
    }
}

/// The entry point for the fuzzer (`fuzz/`) and its regression tests: any
/// query name, type, health and rotation against a fixed zone, with the
/// properties every answer must keep. Panics mean a bug.
#[doc(hidden)]
#[allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // a fuzzing entry point: a panic is the finding
pub mod fuzzing {
    use super::*;

    pub fn answer(data: &[u8]) {
        if data.len() < 4 {
            return;
        }
        let origin = Name::from_str("scaleout.test.").expect("a valid origin");
        let hosts = [
            "www=10.0.0.1,10.0.0.2,2001:db8::1",
            "@=10.0.0.9",
            "api=10.0.0.3",
        ]
        .iter()
        .map(|h| parse_host(h, &origin).expect("a valid host"))
        .collect();
        let zone = Zone::new(origin, hosts, 30);
        let qtype = RecordType::from(u16::from_be_bytes([data[0], data[1]]));
        let health_bits = data[2];
        let rotation = usize::from(data[3]);
        // The rest as a name: text when it parses as one, else raw labels.
        let rest = &data[4..];
        let name = std::str::from_utf8(rest)
            .ok()
            .and_then(|t| Name::from_ascii(t).ok())
            .or_else(|| Name::from_labels(rest.split(|b| *b == b'.')).ok());
        let Some(name) = name else { return };
        let qname = LowerName::from(&name);
        let healthy = |a: IpAddr| {
            let last = match a {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(v6) => v6.octets()[15],
            };
            health_bits & (1 << (last % 8)) != 0
        };
        let answer = zone.answer(&qname, qtype, &healthy, rotation);
        match answer.rcode {
            ResponseCode::Refused => {
                assert!(!answer.authoritative && answer.answers.is_empty());
            }
            ResponseCode::NXDomain => {
                assert!(answer.answers.is_empty() && answer.authority.len() == 1);
            }
            ResponseCode::NoError => {
                assert!(answer.authoritative);
                for record in &answer.answers {
                    assert_eq!(
                        LowerName::from(record.name()),
                        qname,
                        "answers are about the question"
                    );
                    let fits = match qtype {
                        RecordType::ANY => true,
                        t => record.record_type() == t,
                    };
                    assert!(fits, "{qtype} answered with {}", record.record_type());
                }
            }
            other => panic!("unexpected rcode {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        let origin = Name::from_str("scaleout.test.").unwrap();
        let hosts = vec![
            parse_host("www=127.0.0.2,127.0.0.3,::1", &origin).unwrap(),
            parse_host("api=127.0.0.4", &origin).unwrap(),
        ];
        Zone::new(origin, hosts, 5)
    }

    fn q(name: &str) -> LowerName {
        LowerName::from(Name::from_str(name).unwrap())
    }

    fn ips(a: &Answer) -> Vec<String> {
        a.answers.iter().map(|r| r.data().to_string()).collect()
    }

    #[test]
    fn edits_add_and_remove_addresses_but_keep_one_per_name() {
        let mut z = zone();
        let www = z.name_of("www").unwrap();
        assert_eq!(www, z.name_of("WWW.scaleout.test.").unwrap());
        assert!(z.name_of("www.example.com.").is_err());
        assert!(z.name_of("bad..name").is_err());
        let four: IpAddr = "127.0.0.4".parse().unwrap();
        assert_eq!(z.add(&www, four), Ok(true));
        assert_eq!(z.add(&www, four), Ok(false), "an address is there once");
        let all = |_| true;
        let a = z.answer(&q("www.scaleout.test."), RecordType::A, &all, 0);
        assert!(ips(&a).contains(&"127.0.0.4".to_string()), "{:?}", ips(&a));
        assert!(z.all_addrs().contains(&four), "the checker watches it");
        z.remove(&www, four).unwrap();
        let a = z.answer(&q("www.scaleout.test."), RecordType::A, &all, 0);
        assert!(!ips(&a).contains(&"127.0.0.4".to_string()));
        assert_eq!(z.remove(&www, four), Err(Removal::Absent));
        let api = z.name_of("api").unwrap();
        assert_eq!(z.remove(&api, four), Err(Removal::Last), "its only address");
        // A new name, then the caps.
        let new = z.name_of("new").unwrap();
        assert_eq!(z.add(&new, four), Ok(true));
        let a = z.answer(&q("new.scaleout.test."), RecordType::A, &all, 0);
        assert_eq!(ips(&a), vec!["127.0.0.4"]);
        for i in 0..Zone::MAX_ADDRS {
            let _ = z.add(
                &new,
                IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]),
            );
        }
        assert!(z.add(&new, "10.9.9.9".parse().unwrap()).is_err());
        for i in 0..Zone::MAX_HOSTS {
            let _ = z.add(&z.name_of(&format!("h{i}")).unwrap(), four);
        }
        assert!(z.add(&z.name_of("one-more").unwrap(), four).is_err());
    }

    #[test]
    fn healthy_addresses_rotate_and_dead_ones_drop_out() {
        let z = zone();
        let all = |_: IpAddr| true;
        let a0 = z.answer(&q("www.scaleout.test."), RecordType::A, &all, 0);
        assert_eq!(a0.rcode, ResponseCode::NoError);
        assert_eq!(ips(&a0), ["127.0.0.2", "127.0.0.3"]);
        assert_eq!(a0.answers[0].ttl(), 5);
        let a1 = z.answer(&q("WWW.Scaleout.Test."), RecordType::A, &all, 1);
        assert_eq!(
            ips(&a1),
            ["127.0.0.3", "127.0.0.2"],
            "rotated, case-insensitive"
        );
        let not_2 = |a: IpAddr| a.to_string() != "127.0.0.2";
        assert_eq!(
            ips(&z.answer(&q("www.scaleout.test."), RecordType::A, &not_2, 0)),
            ["127.0.0.3"]
        );
        let none = |_: IpAddr| false;
        assert_eq!(
            ips(&z.answer(&q("www.scaleout.test."), RecordType::A, &none, 0)).len(),
            2,
            "fail open"
        );
        assert_eq!(
            ips(&z.answer(&q("www.scaleout.test."), RecordType::AAAA, &all, 0)),
            ["::1"]
        );
    }

    #[test]
    fn apex_unknown_names_and_other_zones() {
        let z = zone();
        let all = |_: IpAddr| true;
        let soa = z.answer(&q("scaleout.test."), RecordType::SOA, &all, 0);
        assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
        let ns = z.answer(&q("scaleout.test."), RecordType::NS, &all, 0);
        assert_eq!(ns.answers[0].record_type(), RecordType::NS);
        let nx = z.answer(&q("nope.scaleout.test."), RecordType::A, &all, 0);
        assert_eq!(nx.rcode, ResponseCode::NXDomain);
        assert_eq!(nx.authority[0].record_type(), RecordType::SOA);
        let nodata = z.answer(&q("api.scaleout.test."), RecordType::MX, &all, 0);
        assert_eq!(
            (nodata.rcode, nodata.answers.len()),
            (ResponseCode::NoError, 0)
        );
        let refused = z.answer(&q("example.com."), RecordType::A, &all, 0);
        assert_eq!(refused.rcode, ResponseCode::Refused);
        assert!(!refused.authoritative);
    }

    #[test]
    fn host_specs_are_checked() {
        let origin = Name::from_str("scaleout.test.").unwrap();
        assert!(parse_host("www", &origin).is_err());
        assert!(parse_host("www=not-an-ip", &origin).is_err());
        assert_eq!(parse_host("@=10.0.0.1", &origin).unwrap().name, origin);
    }

    /// Every input the fuzzers saved (seeds and past crashes) in
    /// `fuzz/regressions/TARGET/`, replayed.
    fn replay_dns(target: &str, run: fn(&[u8])) {
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
        replay_dns("dns_answer", super::fuzzing::answer);
    }
}
