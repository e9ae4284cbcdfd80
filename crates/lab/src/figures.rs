//! The figures the dashboard reads off each process's `/metrics`
//! (Prometheus' text format): its requests, its errors, and its latency
//! over the last look, from the histogram's buckets.

use std::collections::BTreeMap;

/// The value of one sample line of `name` (`name{labels} value` or
/// `name value`), with its labels' text; `None` for other lines.
fn sample<'a>(line: &'a str, name: &str) -> Option<(&'a str, f64)> {
    let rest = line.strip_prefix(name)?;
    let (labels, rest) = match rest.chars().next() {
        Some('{') => {
            let end = rest.find('}')?;
            (&rest[1..end], &rest[end + 1..])
        }
        Some(' ') => ("", rest),
        _ => return None,
    };
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((labels, value))
}

/// A label's value in a label set's text (`a="1",b="2"`).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// The sum of a counter over all its label sets; `None` when absent.
pub fn counter_sum(text: &str, name: &str) -> Option<u64> {
    counter_sum_where(text, name, |_| true)
}

/// The sum of a counter over the label sets `keep` takes (it is given
/// the labels' text); `None` when the counter is absent.
pub fn counter_sum_where(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> Option<u64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((labels, v)) = sample(line, name) {
            let sum = found.get_or_insert(0u64);
            if keep(labels) {
                *sum = sum.saturating_add(v as u64);
            }
        }
    }
    found
}

/// Each sample of the gauge `name` by the value of its `key` label
/// (`scaleout_lb_backend_available{backend="web-1"} 1` gives
/// `("web-1", 1.0)`), in the order they appear.
pub fn gauge_by(text: &str, name: &str, key: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (labels, v) = sample(line, name)?;
            Some((label(labels, key)?.to_string(), v))
        })
        .collect()
}

/// The errors a role counts: answers in 5xx (web servers, load
/// balancers), requests answered with an error (database nodes).
pub fn errors(role: &str, text: &str) -> Option<u64> {
    match role {
        "web" => counter_sum_where(text, "scaleout_web_http_requests_total", |l| {
            label(l, "status").is_some_and(|s| s.starts_with('5'))
        }),
        "lb" => counter_sum_where(text, "scaleout_lb_responses_total", |l| {
            label(l, "code") == Some("5xx")
        }),
        "db" => counter_sum(text, "scaleout_db_request_errors_total"),
        _ => None,
    }
}

/// The request-latency histogram each role has.
pub fn latency_histogram(role: &str) -> Option<&'static str> {
    Some(match role {
        "web" => "scaleout_web_http_request_duration_seconds",
        "lb" => "scaleout_lb_request_duration_seconds",
        "db" => "scaleout_db_request_seconds",
        _ => return None,
    })
}

/// A histogram's cumulative buckets, summed over its label sets: upper
/// bound (seconds; `+Inf` last) to count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(BTreeMap<OrderedBound, u64>);

/// A bucket's upper bound, ordered (never NaN: parsed from `le`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);

impl Eq for OrderedBound {}

impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Buckets {
    /// The buckets of histogram `name` in `text`; empty when absent.
    pub fn read(text: &str, name: &str) -> Buckets {
        let bucket = format!("{name}_bucket");
        let mut buckets = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((labels, v)) = sample(line, &bucket) else {
                continue;
            };
            let Some(le) = label(labels, "le").and_then(|le| match le {
                "+Inf" => Some(f64::INFINITY),
                le => le.parse::<f64>().ok().filter(|b| !b.is_nan()),
            }) else {
                continue;
            };
            *buckets.entry(OrderedBound(le)).or_insert(0u64) += v as u64;
        }
        Buckets(buckets)
    }

    /// What was observed since `earlier` (a restart starts from zero:
    /// then everything now counts).
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        let restarted = self
            .0
            .iter()
            .any(|(b, n)| earlier.0.get(b).is_some_and(|e| e > n));
        Buckets(
            self.0
                .iter()
                .map(|(b, n)| {
                    let before = if restarted {
                        0
                    } else {
                        earlier.0.get(b).copied().unwrap_or(0)
                    };
                    (*b, n - before)
                })
                .collect(),
        )
    }

    /// The `q` quantile in milliseconds, interpolated within its bucket
    /// (the highest finite bound when it falls in `+Inf`); `None` with no
    /// observations.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = *self.0.values().last()?;
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let (mut lower, mut below) = (0.0, 0u64);
        for (bound, count) in &self.0 {
            if *count as f64 >= rank {
                if bound.0.is_infinite() {
                    return Some(lower * 1000.0);
                }
                let within = (*count - below) as f64;
                let share = if within > 0.0 {
                    (rank - below as f64) / within
                } else {
                    1.0
                };
                return Some((lower + (bound.0 - lower) * share.clamp(0.0, 1.0)) * 1000.0);
            }
            (lower, below) = (bound.0, *count);
        }
        Some(lower * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_read_by_label() {
        let text = "# HELP scaleout_lb_backend_available x\n\
            scaleout_lb_backend_available{backend=\"web-1\"} 1\n\
            scaleout_lb_backend_available{backend=\"web-2\"} 0\n\
            scaleout_lb_backend_available_other{backend=\"web-3\"} 1\n\
            scaleout_lb_backend_up{backend=\"web-1\"} 1\n";
        assert_eq!(
            gauge_by(text, "scaleout_lb_backend_available", "backend"),
            vec![("web-1".to_string(), 1.0), ("web-2".to_string(), 0.0)]
        );
        assert!(gauge_by(text, "scaleout_lb_backend_available", "nope").is_empty());
    }

    #[test]
    fn counters_are_summed_over_their_labels_or_some_of_them() {
        let text = "# HELP x\nscaleout_web_http_requests_total{method=\"GET\",route=\"/\",status=\"200\"} 7\n\
                    scaleout_web_http_requests_total{method=\"GET\",route=\"/\",status=\"503\"} 2\n\
                    scaleout_web_http_requests_total{method=\"POST\",route=\"/x\",status=\"500\"} 1\n\
                    scaleout_web_http_requests_total_other 5\n";
        assert_eq!(
            counter_sum(text, "scaleout_web_http_requests_total"),
            Some(10)
        );
        assert_eq!(errors("web", text), Some(3));
        assert_eq!(counter_sum(text, "absent"), None);
        let lb = "scaleout_lb_responses_total{code=\"2xx\"} 40\nscaleout_lb_responses_total{code=\"5xx\"} 4\n";
        assert_eq!(errors("lb", lb), Some(4));
    }

    #[test]
    fn quantiles_come_from_the_buckets_observed_since_the_last_look() {
        let at = |n: [u64; 4]| {
            format!(
                "h_bucket{{k=\"a\",le=\"0.001\"}} {}\nh_bucket{{k=\"a\",le=\"0.01\"}} {}\nh_bucket{{k=\"a\",le=\"0.1\"}} {}\nh_bucket{{k=\"a\",le=\"+Inf\"}} {}\nh_count 9\n",
                n[0], n[1], n[2], n[3]
            )
        };
        let before = Buckets::read(&at([10, 10, 10, 10]), "h");
        // Since then: 50 under 1 ms, 48 more under 10 ms, 2 under 100 ms.
        let now = Buckets::read(&at([60, 108, 110, 110]), "h");
        let delta = now.since(&before);
        let p50 = delta.quantile_ms(0.5).unwrap();
        assert!((0.9..=1.0).contains(&p50), "{p50}");
        let p99 = delta.quantile_ms(0.99).unwrap();
        assert!((10.0..=100.0).contains(&p99), "{p99}");
        assert_eq!(now.since(&now).quantile_ms(0.5), None, "nothing observed");
        // A restarted process counts from zero.
        let restarted = Buckets::read(&at([1, 2, 2, 2]), "h").since(&now);
        assert!(restarted.quantile_ms(0.99).unwrap() > 1.0);
        assert_eq!(Buckets::read("", "h").quantile_ms(0.5), None);
    }
}
