//! The gateway's Prometheus metrics: vLLM's series under a `strata_` prefix, so that vLLM's
//! dashboards port by renaming the prefix, in Prometheus' conventions (seconds, `_total`
//! counters). Request series are fed by each request's output stage as tokens and ends happen;
//! the scheduler's gauges and counters are read from its live [`SchedulerStats`] when scraped.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strata_proto::v1::FinishReason;
use strata_shared::telemetry::metrics::prometheus::{
    self, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
};
use strata_shared::telemetry::metrics::{ITL_BUCKETS, REQUEST_BUCKETS, TTFT_BUCKETS, encode};

use crate::error::GatewayError;
use crate::scheduler::SchedulerStats;

/// Every series the gateway exports.
pub struct GatewayMetrics {
    registry: prometheus::Registry,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    success: IntCounterVec,
    failure: IntCounterVec,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    running: IntGauge,
    waiting: IntGauge,
    steps_in_flight: IntGauge,
    kv_usage: Gauge,
    preemptions: IntCounter,
    requeued: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    scheduler: Option<(Arc<SchedulerStats>, usize, usize)>,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics").finish_non_exhaustive()
    }
}

/// How metrics, spans and logs name a finish reason.
pub fn finish_label(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Eos => "eos",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Unspecified => "unspecified",
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, prometheus::Error> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
}

impl GatewayMetrics {
    /// The metrics of a gateway whose scheduler publishes `stats` over a KV cache of
    /// `kv_blocks` blocks of `block_size` tokens (`None`: no scheduler, as in unit tests).
    pub fn new(
        scheduler: Option<(Arc<SchedulerStats>, usize, usize)>,
    ) -> Result<Self, GatewayError> {
        Self::build(scheduler).map_err(|e| GatewayError::Internal(format!("metrics: {e}")))
    }

    fn build(
        scheduler: Option<(Arc<SchedulerStats>, usize, usize)>,
    ) -> Result<Self, prometheus::Error> {
        let registry = prometheus::Registry::new();
        let m = GatewayMetrics {
            ttft: histogram(
                "strata_time_to_first_token_seconds",
                "Time from a request's arrival to its first generated token.",
                TTFT_BUCKETS,
            )?,
            itl: histogram(
                "strata_inter_token_latency_seconds",
                "Time between two consecutive tokens of one request.",
                ITL_BUCKETS,
            )?,
            e2e: histogram(
                "strata_e2e_request_latency_seconds",
                "Time from a request's arrival to its end.",
                REQUEST_BUCKETS,
            )?,
            queue: histogram(
                "strata_request_queue_time_seconds",
                "Time a request waited before its first step.",
                REQUEST_BUCKETS,
            )?,
            prefill: histogram(
                "strata_request_prefill_time_seconds",
                "Time from a request's first step to its first token.",
                REQUEST_BUCKETS,
            )?,
            success: IntCounterVec::new(
                Opts::new(
                    "strata_request_success_total",
                    "Requests that ended normally, by why they ended.",
                ),
                &["finished_reason"],
            )?,
            failure: IntCounterVec::new(
                Opts::new(
                    "strata_request_failure_total",
                    "Requests that ended with an error, by gRPC status code.",
                ),
                &["code"],
            )?,
            prompt_tokens: IntCounter::new(
                "strata_prompt_tokens_total",
                "Prompt tokens of requests that got a first token.",
            )?,
            generation_tokens: IntCounter::new(
                "strata_generation_tokens_total",
                "Tokens generated.",
            )?,
            running: IntGauge::new(
                "strata_num_requests_running",
                "Requests holding KV cache and taking part in steps.",
            )?,
            waiting: IntGauge::new("strata_num_requests_waiting", "Requests queued.")?,
            steps_in_flight: IntGauge::new(
                "strata_steps_in_flight",
                "Steps the scheduler keeps in flight now: one per stage, more while the hops between stages take long.",
            )?,
            kv_usage: Gauge::new(
                "strata_kv_cache_usage_perc",
                "Fraction of the KV cache's blocks held by requests (1 = full).",
            )?,
            preemptions: IntCounter::new(
                "strata_num_preemptions_total",
                "Requests preempted (their KV cache taken back, to be recomputed).",
            )?,
            requeued: IntCounter::new(
                "strata_num_requeued_total",
                "Requests that waited for the ring to be rebuilt after a worker failed (recomputed from their tokens so far).",
            )?,
            prefix_queries: IntCounter::new(
                "strata_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache (in whole blocks).",
            )?,
            prefix_hits: IntCounter::new(
                "strata_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
            )?,
            registry,
            scheduler,
        };
        let r = &m.registry;
        r.register(Box::new(m.ttft.clone()))?;
        r.register(Box::new(m.itl.clone()))?;
        r.register(Box::new(m.e2e.clone()))?;
        r.register(Box::new(m.queue.clone()))?;
        r.register(Box::new(m.prefill.clone()))?;
        r.register(Box::new(m.success.clone()))?;
        r.register(Box::new(m.failure.clone()))?;
        r.register(Box::new(m.prompt_tokens.clone()))?;
        r.register(Box::new(m.generation_tokens.clone()))?;
        r.register(Box::new(m.running.clone()))?;
        r.register(Box::new(m.waiting.clone()))?;
        r.register(Box::new(m.steps_in_flight.clone()))?;
        r.register(Box::new(m.kv_usage.clone()))?;
        r.register(Box::new(m.preemptions.clone()))?;
        r.register(Box::new(m.requeued.clone()))?;
        r.register(Box::new(m.prefix_queries.clone()))?;
        r.register(Box::new(m.prefix_hits.clone()))?;
        // Every finish reason and the common failures exist from the start, at zero.
        for reason in ["length", "stop", "eos", "cancelled"] {
            m.success.with_label_values(&[reason]);
        }
        Ok(m)
    }

    /// The first token of a request, `since_arrival` after it came, with its prompt length.
    pub fn first_token(&self, since_arrival: Duration, prompt_tokens: u32) {
        self.ttft.observe(since_arrival.as_secs_f64());
        self.prompt_tokens.inc_by(u64::from(prompt_tokens));
    }

    /// A generated token, `since_previous` after the one before it (`None` for the first).
    pub fn token(&self, since_previous: Option<Duration>) {
        self.generation_tokens.inc();
        if let Some(d) = since_previous {
            self.itl.observe(d.as_secs_f64());
        }
    }

    /// A request that ended normally.
    pub fn finished(&self, reason: FinishReason, e2e: Duration, queue: Duration, ttft: Duration) {
        self.success
            .with_label_values(&[finish_label(reason)])
            .inc();
        self.e2e.observe(e2e.as_secs_f64());
        self.queue.observe(queue.as_secs_f64());
        self.prefill
            .observe(ttft.saturating_sub(queue).as_secs_f64());
    }

    /// A request that ended with `code` (also one refused before it was queued).
    pub fn failed(&self, code: tonic::Code) {
        self.failure
            .with_label_values(&[&format!("{code:?}")])
            .inc();
    }

    /// Everything, in Prometheus' text format.
    pub fn render(&self) -> String {
        if let Some((stats, kv_blocks, block_size)) = &self.scheduler {
            self.running
                .set(stats.running.load(Ordering::Relaxed) as i64);
            self.waiting
                .set(stats.waiting.load(Ordering::Relaxed) as i64);
            self.steps_in_flight
                .set(stats.steps_in_flight.load(Ordering::Relaxed) as i64);
            let used = stats.used_blocks.load(Ordering::Relaxed);
            self.kv_usage.set(used as f64 / (*kv_blocks).max(1) as f64);
            // The scheduler's counters only grow: catch the exported ones up with them.
            let catch_up = |c: &IntCounter, now: u64| c.inc_by(now.saturating_sub(c.get()));
            catch_up(&self.preemptions, stats.preemptions.load(Ordering::Relaxed));
            catch_up(&self.requeued, stats.requeued.load(Ordering::Relaxed));
            let block = *block_size as u64;
            catch_up(
                &self.prefix_queries,
                stats.prefix_queries.load(Ordering::Relaxed) * block,
            );
            catch_up(
                &self.prefix_hits,
                stats.prefix_hits.load(Ordering::Relaxed) * block,
            );
        }
        encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[test]
    fn request_series_move_by_what_happened() {
        let stats = Arc::new(SchedulerStats::default());
        let m = GatewayMetrics::new(Some((Arc::clone(&stats), 100, 16))).unwrap();
        m.first_token(Duration::from_millis(30), 7);
        m.token(None);
        m.token(Some(Duration::from_millis(20)));
        m.finished(
            FinishReason::Length,
            Duration::from_millis(90),
            Duration::from_millis(10),
            Duration::from_millis(30),
        );
        m.failed(tonic::Code::InvalidArgument);
        stats.used_blocks.store(25, Ordering::Relaxed);
        stats.prefix_queries.store(3, Ordering::Relaxed);
        stats.prefix_hits.store(2, Ordering::Relaxed);
        let text = m.render();
        assert_eq!(value(&text, "strata_prompt_tokens_total"), 7.0);
        assert_eq!(value(&text, "strata_generation_tokens_total"), 2.0);
        assert_eq!(
            value(&text, "strata_time_to_first_token_seconds_count"),
            1.0
        );
        assert_eq!(
            value(&text, "strata_inter_token_latency_seconds_count"),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "strata_request_success_total{finished_reason=\"length\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "strata_request_success_total{finished_reason=\"stop\"}"
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "strata_request_failure_total{code=\"InvalidArgument\"}"
            ),
            1.0
        );
        assert_eq!(value(&text, "strata_kv_cache_usage_perc"), 0.25);
        assert_eq!(value(&text, "strata_prefix_cache_queries_total"), 48.0);
        assert_eq!(value(&text, "strata_prefix_cache_hits_total"), 32.0);
        // Prefill is the first token's wait after the queue.
        assert!(
            (value(&text, "strata_request_prefill_time_seconds_sum") - 0.02).abs() < 1e-9,
            "{text}"
        );
        // Scraping again adds nothing.
        assert_eq!(m.render(), text);
    }
}
