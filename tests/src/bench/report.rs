//! What every benchmark run reports: operations, duration, rate and latency quantiles, from an
//! HDR histogram of microseconds.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies in microseconds, 1 µs .. 60 s, 3 significant digits.
#[derive(Clone, Debug)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|error| panic!("histogram bounds are constants: {error}")),
        }
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(micros.max(1));
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at `quantile` (0.0–1.0) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// One measured run of one system under one workload.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ThroughputReport {
    /// What was measured, e.g. `sessions`, `pipeline floor`, `durable-streams`.
    pub system: String,
    /// The workload, e.g. `closed loop, 64 clients`.
    pub workload: String,
    /// Operations that succeeded (2xx, or consumed and persisted for the floor).
    pub operations: u64,
    /// Operations that failed.
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl ThroughputReport {
    pub fn new(
        system: &str,
        workload: &str,
        operations: u64,
        errors: u64,
        elapsed: Duration,
        latencies: &Latencies,
    ) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Self {
            system: system.to_owned(),
            workload: workload.to_owned(),
            operations,
            errors,
            seconds,
            per_second: operations as f64 / seconds,
            p50_ms: latencies.quantile_ms(0.5),
            p99_ms: latencies.quantile_ms(0.99),
        }
    }
}

impl std::fmt::Display for ThroughputReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<16} {:<36} {:>10.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} ok, {} errors, {:.1} s)",
            self.system,
            self.workload,
            self.per_second,
            self.p50_ms,
            self.p99_ms,
            self.operations,
            self.errors,
            self.seconds
        )
    }
}

/// Prints a progress line every second until aborted, the shape every window shares (tests/bench/
/// profile-cpu.sh reads its fifth field: operations so far): elapsed seconds, operations in the
/// last second with `unit`, `done()` operations so far with `label`, then `tail()`.
pub fn print_progress(
    started: std::time::Instant,
    unit: &'static str,
    label: &'static str,
    done: impl Fn() -> u64 + Send + 'static,
    tail: impl Fn() -> String + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0;
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.tick().await;
        loop {
            interval.tick().await;
            let now = done();
            eprintln!(
                "  {:>5.1} s  {:>7} {unit}  {:>8} {label}  {}",
                started.elapsed().as_secs_f64(),
                now - last,
                now,
                tail()
            );
            last = now;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_rates_come_from_what_was_recorded() {
        let mut latencies = Latencies::default();
        for millis in 1..=100 {
            latencies.record(Duration::from_millis(millis));
        }
        assert!((latencies.quantile_ms(0.5) - 50.0).abs() < 0.1);
        assert!((latencies.quantile_ms(0.99) - 99.0).abs() < 0.1);
        let report = ThroughputReport::new("x", "y", 500, 0, Duration::from_secs(2), &latencies);
        assert!((report.per_second - 250.0).abs() < 1e-9);
    }
}
