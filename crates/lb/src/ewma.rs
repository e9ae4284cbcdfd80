//! PeakEWMA latency estimate (Finagle's, as in tower::load::PeakEwma): a
//! slower sample is taken at once (peak), a faster one is averaged in with a
//! weight that decays with the time since the last sample. tower's own
//! PeakEwma must wrap a `Service`; the proxy's backends are not tower
//! services on the hot path, so the estimate lives here, with time passed in.

use std::time::{Duration, Instant};

/// How quickly old samples stop mattering.
const DECAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    pub fn new(initial: Duration, now: Instant) -> Self {
        PeakEwma {
            estimate_ns: initial.as_nanos() as f64,
            stamp: now,
        }
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.estimate_ns {
            self.estimate_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
            let keep = (-elapsed / DECAY.as_secs_f64()).exp();
            self.estimate_ns = self.estimate_ns * keep + rtt * (1.0 - keep);
        }
        self.stamp = now;
    }

    pub fn estimate(&self, _now: Instant) -> Duration {
        Duration::from_nanos(self.estimate_ns as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_at_once_and_decays_toward_faster_samples() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::from_millis(1), t0);
        e.observe(Duration::from_millis(50), t0);
        assert_eq!(
            e.estimate(t0),
            Duration::from_millis(50),
            "a slow sample is the new estimate"
        );
        // One fast sample a second later moves it only a little…
        e.observe(Duration::from_millis(1), t0 + Duration::from_secs(1));
        let after_one = e.estimate(t0);
        assert!(after_one < Duration::from_millis(50) && after_one > Duration::from_millis(40));
        // …many of them bring it close.
        for i in 2..120 {
            e.observe(Duration::from_millis(1), t0 + Duration::from_secs(i));
        }
        assert!(
            e.estimate(t0) < Duration::from_millis(2),
            "{:?}",
            e.estimate(t0)
        );
    }
}
