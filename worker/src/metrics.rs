//! A worker's Prometheus metrics, served on `--metrics-listen`: the forward time of each step
//! by stage, data-plane frames and bytes in and out with the time each send takes (the hop's
//! latency as this side sees it), model load and ISQ time, and resident memory.

use std::time::Duration;

use strata_shared::telemetry::metrics::prometheus::{
    self, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts,
};
use strata_shared::telemetry::metrics::{STEP_BUCKETS, encode};

use crate::error::WorkerError;
use crate::memory;

/// Every series a worker exports.
pub struct WorkerMetrics {
    registry: prometheus::Registry,
    forward: HistogramVec,
    frame_bytes: IntCounterVec,
    frames: IntCounterVec,
    send: HistogramVec,
    load_seconds: Gauge,
    isq_seconds: Gauge,
    resident: IntGauge,
    peak_resident: IntGauge,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

/// Which way a frame went.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

impl WorkerMetrics {
    pub fn new() -> Result<Self, WorkerError> {
        Self::build().map_err(|e| WorkerError::Load(format!("metrics: {e}")))
    }

    fn build() -> Result<Self, prometheus::Error> {
        let m = WorkerMetrics {
            registry: prometheus::Registry::new(),
            forward: HistogramVec::new(
                HistogramOpts::new(
                    "strata_worker_step_forward_seconds",
                    "Time one stage took to compute one step.",
                )
                .buckets(STEP_BUCKETS.to_vec()),
                &["stage"],
            )?,
            frame_bytes: IntCounterVec::new(
                Opts::new(
                    "strata_worker_frame_bytes_total",
                    "Data-plane bytes received and sent (whole frames).",
                ),
                &["direction"],
            )?,
            frames: IntCounterVec::new(
                Opts::new(
                    "strata_worker_frames_total",
                    "Data-plane frames received and sent.",
                ),
                &["direction"],
            )?,
            send: HistogramVec::new(
                HistogramOpts::new(
                    "strata_worker_hop_send_seconds",
                    "Time to hand one frame to the next hop's connection.",
                )
                .buckets(STEP_BUCKETS.to_vec()),
                &["next_hop"],
            )?,
            load_seconds: Gauge::new(
                "strata_worker_model_load_seconds",
                "Time the last load took, in-situ quantization included.",
            )?,
            isq_seconds: Gauge::new(
                "strata_worker_isq_seconds",
                "Time spent quantizing weights while loading, over the process's life.",
            )?,
            resident: IntGauge::new(
                "strata_worker_resident_memory_bytes",
                "Resident memory of the worker process.",
            )?,
            peak_resident: IntGauge::new(
                "strata_worker_peak_resident_memory_bytes",
                "Peak resident memory of the worker process.",
            )?,
        };
        let r = &m.registry;
        r.register(Box::new(m.forward.clone()))?;
        r.register(Box::new(m.frame_bytes.clone()))?;
        r.register(Box::new(m.frames.clone()))?;
        r.register(Box::new(m.send.clone()))?;
        r.register(Box::new(m.load_seconds.clone()))?;
        r.register(Box::new(m.isq_seconds.clone()))?;
        r.register(Box::new(m.resident.clone()))?;
        r.register(Box::new(m.peak_resident.clone()))?;
        for d in [Direction::In, Direction::Out] {
            m.frames.with_label_values(&[d.label()]);
            m.frame_bytes.with_label_values(&[d.label()]);
        }
        Ok(m)
    }

    /// Stage `stage` computed a step in `took`.
    pub fn forward(&self, stage: u32, took: Duration) {
        self.forward
            .with_label_values(&[&stage.to_string()])
            .observe(took.as_secs_f64());
    }

    /// A frame of `bytes` went `direction`.
    pub fn frame(&self, direction: Direction, bytes: u64) {
        self.frames.with_label_values(&[direction.label()]).inc();
        self.frame_bytes
            .with_label_values(&[direction.label()])
            .inc_by(bytes);
    }

    /// Sending one frame to `next_hop` took `took`.
    pub fn sent(&self, next_hop: &str, took: Duration) {
        self.send
            .with_label_values(&[next_hop])
            .observe(took.as_secs_f64());
    }

    /// A load finished in `seconds`.
    pub fn loaded(&self, seconds: f64) {
        self.load_seconds.set(seconds);
    }

    /// Everything, in Prometheus' text format.
    pub fn render(&self) -> String {
        let rss = memory::rss();
        self.resident
            .set(i64::try_from(rss.current).unwrap_or(i64::MAX));
        self.peak_resident
            .set(i64::try_from(rss.peak).unwrap_or(i64::MAX));
        self.isq_seconds.set(crate::weights::isq_seconds());
        encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_move_by_what_happened() {
        let m = WorkerMetrics::new().unwrap();
        m.forward(3, Duration::from_millis(4));
        m.frame(Direction::In, 100);
        m.frame(Direction::Out, 40);
        m.frame(Direction::Out, 2);
        m.sent("127.0.0.1:9", Duration::from_micros(50));
        m.loaded(1.5);
        let text = m.render();
        for line in [
            "strata_worker_step_forward_seconds_count{stage=\"3\"} 1",
            "strata_worker_frame_bytes_total{direction=\"in\"} 100",
            "strata_worker_frame_bytes_total{direction=\"out\"} 42",
            "strata_worker_frames_total{direction=\"out\"} 2",
            "strata_worker_hop_send_seconds_count{next_hop=\"127.0.0.1:9\"} 1",
            "strata_worker_model_load_seconds 1.5",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(
            !text.contains("strata_worker_resident_memory_bytes 0\n"),
            "{text}"
        );
    }
}
