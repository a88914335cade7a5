//! Continuous batching. A scheduler actor owns a plain [`SchedulerState`] (queue, admission by
//! KV blocks, step building; no I/O, no tokenizer) and drives a [`Pipeline`] with its steps.
//! Each sequence's results go to its [`SeqOutput`]; the real one, [`StreamOutput`],
//! detokenizes, matches stop sequences and streams API events to the client. A client that is
//! gone (its stream closed) is cancelled and its KV released.

use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::error::GatewayError;
use crate::pipeline::Pipeline;
use crate::validation::ValidRequest;

mod output;
mod state;
#[cfg(test)]
mod tests;

pub use output::{EventSender, SeqEnd, SeqOutput, StreamOutput, TokenVerdict};
pub use state::{NewRequest, SchedulerConfig, SchedulerState, SchedulerStats};

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

    /// Submits a validated request; its results go to `output`.
    pub async fn submit(&self, request: ValidRequest, output: O) -> Result<(), GatewayError> {
        self.tx
            .send(NewRequest {
                request,
                output,
                arrived: Instant::now(),
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
    // After a failed step, releases alone are retried only this much later: a broken ring
    // fails every step at once, and must not be asked again in a hot loop.
    const RELEASE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
    let mut retry_releases_at: Option<tokio::time::Instant> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        while let Ok(r) = rx.try_recv() {
            state.enqueue(r);
        }
        state.reap_disconnected();
        state.publish();
        if let Some(at) = retry_releases_at
            && !state.has_requests()
        {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => state.enqueue(r),
                    None => break,
                },
                _ = shutdown.changed() => {}
                () = tokio::time::sleep_until(at) => retry_releases_at = None,
            }
            continue;
        }
        match state.next_step() {
            Some(step) => {
                let releases = step.releases.clone();
                match pipeline.step(step).await {
                    Ok(samples) => {
                        retry_releases_at = None;
                        state.on_samples(samples);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "step failed; failing the running requests");
                        // Stages past the failure never saw the releases: send them again.
                        state.requeue_releases(releases);
                        state.fail_running(&e);
                        retry_releases_at = Some(tokio::time::Instant::now() + RELEASE_RETRY);
                    }
                }
            }
            None => {
                state.publish();
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => state.enqueue(r),
                        None => break,
                    },
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
    state.cancel_all();
    state.publish();
    // Let the workers free what the cancelled sequences held.
    if let Some(step) = state.next_step() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), pipeline.step(step)).await;
    }
}
