//! Every role's `/metrics`, written by one library: prometheus-client's
//! OpenMetrics text encoder ([`CONTENT_TYPE`]).
//!
//! The web server registers prometheus-client's own metric types. The
//! load balancer, the database nodes and the DNS server keep their figures
//! where their work keeps them (atomics on the proxy's hot path, openraft's
//! metrics, a health table) and write them when scraped, through a
//! [`Scrape`]: a prometheus-client `Collector` that calls a closure with a
//! [`Writer`]. [`Histogram`] is a fixed-bucket histogram of atomics (no
//! lock on observe, unlike prometheus-client's), encoded as a histogram.
//!
//! Names are the samples' names as Prometheus stores them: a counter is
//! given as `…_total` (the encoder writes the suffix; the `# TYPE` line
//! names the family without it, as OpenMetrics has it).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabel, EncodeLabelSet, EncodeLabelValue,
    LabelSetEncoder, LabelValueEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The content type of what [`render`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The text exposition of everything in `registry`, `# EOF` included.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector's own error ends
    // the exposition early and is logged by the caller's absence of data.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// A collector made of a closure over state read at scrape time.
pub struct Scrape<F>(pub F);

impl<F> fmt::Debug for Scrape<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

impl<F> Collector for Scrape<F>
where
    F: Fn(&mut Writer<'_>) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        (self.0)(&mut Writer(encoder))
    }
}

impl<F> Scrape<F>
where
    F: Fn(&mut Writer<'_>) -> fmt::Result + Send + Sync + 'static,
{
    /// A registry holding only this collector.
    pub fn registry(self) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        registry
    }
}

/// A label value escaped as the text format wants (`\`, `"`, newline);
/// prometheus-client writes `&str` values as they are, and a backend's
/// name or a route comes from configuration, not from us.
pub struct Escaped<'a>(pub &'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// One label, `key="value"` with the value escaped.
pub struct Label<'a>(pub &'static str, pub &'a str);

impl EncodeLabel for Label<'_> {
    fn encode(&self, encoder: prometheus_client::encoding::LabelEncoder) -> fmt::Result {
        (self.0, Escaped(self.1)).encode(encoder)
    }
}

/// A set of labels, in order.
pub struct Labels<'a, const N: usize>(pub [Label<'a>; N]);

impl<const N: usize> EncodeLabelSet for Labels<'_, N> {
    fn encode(&self, mut encoder: LabelSetEncoder) -> fmt::Result {
        for label in &self.0 {
            label.encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// Writes metric families during a scrape.
pub struct Writer<'a>(DescriptorEncoder<'a>);

/// A family's name without the `_total` a counter's samples carry.
fn family(name: &str, kind: &MetricType) -> String {
    match kind {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name).to_string(),
        _ => name.to_string(),
    }
}

impl Writer<'_> {
    /// A counter without labels; `name` ends in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let name = family(name, &MetricType::Counter);
        self.0
            .encode_descriptor(&name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)
    }

    /// A counter family, one sample per label set.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let name = family(name, &MetricType::Counter);
        let mut metric = self
            .0
            .encode_descriptor(&name, help, None, MetricType::Counter)?;
        for (labels, value) in samples {
            metric
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        Ok(())
    }

    /// A gauge without labels.
    pub fn gauge<V: EncodeGaugeValue>(&mut self, name: &str, help: &str, value: V) -> fmt::Result {
        self.0
            .encode_descriptor(name, help, None, MetricType::Gauge)?
            .encode_gauge(&value)
    }

    /// A gauge family, one sample per label set.
    pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result {
        let mut metric = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in samples {
            metric.encode_family(&labels)?.encode_gauge(&value)?;
        }
        Ok(())
    }

    /// A histogram family, one histogram per label set.
    pub fn histograms<'h, L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, &'h Histogram)>,
    ) -> fmt::Result {
        let mut metric = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in samples {
            let (sum, count, buckets) = h.snapshot();
            metric
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// Request latencies' bucket bounds, in seconds: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram of durations in fixed buckets, each an atomic counter: an
/// observation is two or three relaxed adds, no lock and no allocation,
/// so the load balancer's hot path can afford one per request.
pub struct Histogram {
    /// Upper bounds in microseconds, ascending.
    bounds_us: Vec<u64>,
    /// One per bound, then one for what is above the last (+Inf).
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(LATENCY_BUCKETS)
    }
}

impl Histogram {
    /// Buckets bounded by `bounds` (seconds, ascending), and +Inf.
    pub fn new(bounds: &[f64]) -> Self {
        let bounds_us: Vec<u64> = bounds.iter().map(|s| (s * 1e6).round() as u64).collect();
        let counts = (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram {
            bounds_us,
            counts,
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = self.bounds_us.partition_point(|b| *b < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Sum in seconds, count, and (bound, count in that bucket alone),
    /// +Inf last as `f64::MAX` (prometheus-client's spelling of it).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .bounds_us
            .iter()
            .map(|b| *b as f64 / 1e6)
            .chain(std::iter::once(f64::MAX))
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn scrape(f: impl Fn(&mut Writer<'_>) -> fmt::Result + Send + Sync + 'static) -> String {
        render(&Scrape(f).registry())
    }

    #[test]
    fn a_histogram_renders_cumulative_buckets() {
        let h = Arc::new(Histogram::default());
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_secs(60));
        assert_eq!(h.count(), 4);
        let seen = h.clone();
        let out = scrape(move |w| {
            w.histograms(
                "x_seconds",
                "help",
                [(Labels([Label("a", "b")]), seen.as_ref())],
            )
        });
        assert!(out.contains("# TYPE x_seconds histogram\n"), "{out}");
        // prometheus-client writes `le` first.
        assert!(
            out.contains("x_seconds_bucket{le=\"0.0001\",a=\"b\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{le=\"0.0005\",a=\"b\"} 3\n"),
            "a bound is inclusive: {out}"
        );
        assert!(
            out.contains("x_seconds_bucket{le=\"10.0\",a=\"b\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{le=\"+Inf\",a=\"b\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{a=\"b\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_sum{a=\"b\"} 60.00085\n"), "{out}");
        assert!(out.ends_with("# EOF\n"));
    }

    #[test]
    fn counters_keep_their_total_and_gauges_their_name() {
        let out = scrape(|w| {
            w.counter("c_total", "a counter", 3)?;
            w.counters(
                "d_total",
                "by class",
                [
                    (Labels([Label("code", "2xx")]), 5u64),
                    (Labels([Label("code", "5xx")]), 0),
                ],
            )?;
            w.gauge("g", "a gauge", 7u64)?;
            w.gauge("f", "a float gauge", 0.25f64)
        });
        assert!(out.contains("# TYPE c counter\nc_total 3\n"), "{out}");
        assert!(
            out.contains("d_total{code=\"2xx\"} 5\nd_total{code=\"5xx\"} 0\n"),
            "{out}"
        );
        assert!(out.contains("# TYPE g gauge\ng 7\n"), "{out}");
        assert!(out.contains("f 0.25\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        let out = scrape(|w| {
            w.gauges(
                "up",
                "help",
                [(Labels([Label("backend", "a\"b\\c\nd")]), 1u64)],
            )
        });
        assert!(out.contains(r#"up{backend="a\"b\\c\nd"} 1"#), "{out}");
    }
}
