//! Continuous batching. A scheduler actor owns a plain [`SchedulerState`] (queue, KV blocks,
//! preemption, prefix caching, step building; no I/O, no tokenizer) and keeps a [`Pipeline`]
//! full: up to one step in flight per stage, each over sequences no other step in flight
//! carries, so that every stage computes at once. Each sequence's results go to its
//! [`SeqOutput`]; the real one, [`StreamOutput`], detokenizes, matches stop sequences and
//! streams API events to the client. A client that is gone (its stream closed) is cancelled
//! and its KV released; one past its deadline gets DEADLINE_EXCEEDED.
//!
//! When the ring breaks (a worker died), every sequence waits again with its tokens so far and
//! no step is sent until the ring is rebuilt; then the sequences are recomputed through the
//! normal batched prefill and go on, each with exactly the tokens it would have had. Only when
//! the rebuild gives up do the requests fail, with UNAVAILABLE naming the cause.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::error::GatewayError;
use crate::pipeline::{Pipeline, PipelineEvent, sleep_until};
use crate::validation::ValidRequest;

pub mod blocks;
pub mod depth;
mod output;
mod state;
#[cfg(test)]
mod tests;

pub use output::{EventSender, RequestObserver, SeqEnd, SeqOutput, StreamOutput, TokenVerdict};
pub use state::{NewRequest, SchedulerConfig, SchedulerState, SchedulerStats};

/// Steps in flight beyond one per stage that the scheduler may keep where the hops take long
/// ([`depth::StepsInFlight`]).
pub const EXTRA_STEPS_IN_FLIGHT: usize = 4;

/// Handle to the scheduler actor.
#[derive(Debug)]
pub struct Scheduler<O = StreamOutput> {
    tx: mpsc::Sender<NewRequest<O>>,
}

impl<O> Clone for Scheduler<O> {
    fn clone(&self) -> Self {
        Scheduler {
            tx: self.tx.clone(),
        }
    }
}

impl<O: SeqOutput> Scheduler<O> {
    /// Starts the actor over `pipeline`. It runs until `shutdown` turns true (then cancels
    /// everything) or every handle is dropped.
    pub fn spawn<P: Pipeline>(
        pipeline: P,
        state: SchedulerState<O>,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let handle = tokio::spawn(run(pipeline, state, rx, shutdown));
        (Scheduler { tx }, handle)
    }

    /// Submits a validated request; its results go to `output`. `deadline` is when the client
    /// stops waiting.
    pub async fn submit(
        &self,
        request: ValidRequest,
        output: O,
        deadline: Option<Instant>,
    ) -> Result<(), GatewayError> {
        self.tx
            .send(NewRequest {
                request,
                output,
                arrived: Instant::now(),
                deadline,
            })
            .await
            .map_err(|_| GatewayError::Unavailable("the scheduler has stopped".into()))
    }
}

async fn run<P: Pipeline, O: SeqOutput>(
    mut pipeline: P,
    mut state: SchedulerState<O>,
    mut rx: mpsc::Receiver<NewRequest<O>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // After a failed step, steps that carry only releases wait this long: a broken ring fails
    // every step at once, and must not be asked again in a hot loop.
    const RELEASE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
    let mut retry_releases_at: Option<tokio::time::Instant> = None;
    let mut depth = if pipeline.max_depth() > pipeline.depth() {
        depth::StepsInFlight::adaptive(pipeline.depth(), pipeline.max_depth())
    } else {
        depth::StepsInFlight::fixed(pipeline.depth())
    };
    state
        .stats()
        .steps_in_flight
        .store(depth.current(), std::sync::atomic::Ordering::Relaxed);
    let mut open = true;
    // The span of each step in flight; it ends when the step completes.
    let mut spans: HashMap<u64, tracing::Span> = HashMap::new();
    // The ring is being rebuilt: nothing is sent.
    let mut suspended = false;
    // Rebuilding gave up: new requests fail at once with this.
    let mut lost: Option<GatewayError> = None;
    loop {
        // With every handle gone and nothing left to answer, stop (releases still pending are
        // moot: nobody will send those sequences again).
        if *shutdown.borrow() || (!open && !state.has_requests() && state.in_flight() == 0) {
            break;
        }
        while let Ok(r) = rx.try_recv() {
            admit_or_refuse(&mut state, r, lost.as_ref());
        }
        state.reap(Instant::now());
        // Keep the pipeline full.
        while !suspended
            && state.in_flight() < depth.current()
            && (retry_releases_at.is_none() || state.has_requests())
        {
            let Some(mut step) = state.next_step_of(depth.current()) else {
                break;
            };
            let id = step.step_id;
            spans.insert(id, state.trace_step(&mut step));
            if let Err(e) = pipeline.submit(step).await {
                spans.remove(&id);
                tracing::error!(error = %e, step = id, "a step could not be sent");
                state.on_step_failed(id, &e);
                retry_releases_at = Some(tokio::time::Instant::now() + RELEASE_RETRY);
                break;
            }
        }
        state.publish();
        let deadline = state.next_deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            event = pipeline.next_event() => match event {
                PipelineEvent::Completed(c) => {
                    spans.remove(&c.step_id);
                    match c.result {
                        Ok(samples) => {
                            retry_releases_at = None;
                            if let Some(round_trip) = c.round_trip
                                && let Some(change) = depth.observe(round_trip, samples.times)
                            {
                                tracing::info!(
                                    from = change.from,
                                    to = change.to,
                                    hops_ms = change.hops.as_secs_f64() * 1e3,
                                    stage_ms = change.stage.as_secs_f64() * 1e3,
                                    "steps in flight changed: the hops' time a step against a stage's computation"
                                );
                                state
                                    .stats()
                                    .steps_in_flight
                                    .store(change.to, std::sync::atomic::Ordering::Relaxed);
                            }
                            state.on_samples(samples);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, step = c.step_id, "step failed; failing its sequences");
                            state.on_step_failed(c.step_id, &e);
                            retry_releases_at = Some(tokio::time::Instant::now() + RELEASE_RETRY);
                        }
                    }
                }
                PipelineEvent::Broken(cause) => {
                    spans.clear();
                    suspended = true;
                    let n = state.requeue_all();
                    tracing::warn!(sequences = n, %cause, "the ring broke: every sequence waits for it with its tokens so far");
                }
                PipelineEvent::Restored => {
                    suspended = false;
                    lost = None;
                    retry_releases_at = None;
                    tracing::info!("the ring is back: the waiting sequences resume");
                }
                PipelineEvent::Lost(cause) => {
                    spans.clear();
                    suspended = true;
                    // The workers' KV caches are gone as after `Broken` (which a pipeline may
                    // skip): no block or prefix-cache entry of the old ring may outlive it.
                    state.requeue_all();
                    let err = GatewayError::Unavailable(cause);
                    state.fail_all(&err);
                    lost = Some(err);
                }
            },
            r = rx.recv(), if open => match r {
                Some(r) => admit_or_refuse(&mut state, r, lost.as_ref()),
                None => open = false,
            },
            _ = shutdown.changed() => {}
            () = sleep_until(deadline), if deadline.is_some() => {}
            () = sleep_until(retry_releases_at), if retry_releases_at.is_some() => {
                retry_releases_at = None;
            }
        }
    }
    state.cancel_all();
    state.publish();
    // Let the workers forget the cancelled sequences.
    if let Some(step) = state.next_step() {
        let free = async {
            if pipeline.submit(step).await.is_ok() {
                // Its completion, or the ring breaking under it.
                let _ = pipeline.next_event().await;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), free).await;
    }
}

/// Queues a request, or fails it at once while the ring is lost.
fn admit_or_refuse<O: SeqOutput>(
    state: &mut SchedulerState<O>,
    r: NewRequest<O>,
    lost: Option<&GatewayError>,
) {
    match lost {
        Some(err) => r
            .output
            .fail(GatewayError::Unavailable(err.to_string()).into()),
        None => state.enqueue(r),
    }
}
