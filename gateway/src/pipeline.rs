//! What the scheduler drives: something that carries steps through every stage of the route
//! and gives back their samples. Several steps may be in flight at once (one per stage keeps
//! every stage busy); they complete in any order. The ring over a [`Transport`] is the real
//! one; `strata generate` plugs an in-process engine behind the same trait.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use strata_shared::transport::{FrameSender, Transport, accept_frames, hello};
use strata_shared::wire::{Frame, SamplesFrame, StepFrame, WireError};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::error::GatewayError;

/// The outcome of one step.
#[derive(Debug)]
pub struct Completion {
    pub step_id: u64,
    pub result: Result<SamplesFrame, GatewayError>,
}

/// Carries steps through the route.
pub trait Pipeline: Send + 'static {
    /// Steps worth keeping in flight at once: one per stage.
    fn depth(&self) -> usize;

    /// Sends a step on its way. An error means it never left (it completes with nothing).
    fn submit(&mut self, step: StepFrame) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// The next step to complete; called only while steps are in flight.
    fn next_completion(&mut self) -> impl Future<Output = Completion> + Send;
}

/// The ring: steps go to the first stage over a persistent connection; the last stage's
/// samples come back to the gateway's own data-plane listener.
pub struct RingPipeline<T: Transport> {
    first: T::Sender,
    first_addr: String,
    stages: usize,
    results: mpsc::Receiver<Result<Frame, WireError>>,
    failures: watch::Receiver<Option<String>>,
    step_timeout: Duration,
    /// Steps in flight, by id, with when they were sent.
    pending: BTreeMap<u64, Instant>,
}

impl<T: Transport> RingPipeline<T> {
    /// Connects to the first stage at `first_addr` and collects the frames that `listener`
    /// (the gateway's data-plane listener, where the last stage sends) receives. `failures`
    /// carries a worker failure, which fails the steps in flight at once. `stages` is the
    /// route's length.
    pub async fn connect(
        transport: &T,
        first_addr: &str,
        session: &str,
        stages: usize,
        listener: T::Listener,
        failures: watch::Receiver<Option<String>>,
        step_timeout: Duration,
    ) -> Result<Self, GatewayError> {
        let first = hello(transport, first_addr, session)
            .await
            .map_err(|e| GatewayError::Unavailable(format!("data plane: {e}")))?;
        let (tx, results) = mpsc::channel(64);
        // The session never changes: the sender may go.
        let (_, session) = watch::channel(session.to_string());
        tokio::spawn(accept_frames(listener, tx, |r| r, session));
        Ok(RingPipeline {
            first,
            first_addr: first_addr.to_string(),
            stages,
            results,
            failures,
            step_timeout,
            pending: BTreeMap::new(),
        })
    }

    /// Fails the oldest step in flight with `err`.
    fn fail_oldest(&mut self, err: GatewayError) -> Option<Completion> {
        let (step_id, _) = self.pending.pop_first()?;
        Some(Completion {
            step_id,
            result: Err(err),
        })
    }
}

impl<T: Transport> Pipeline for RingPipeline<T> {
    fn depth(&self) -> usize {
        self.stages.max(1)
    }

    async fn submit(&mut self, step: StepFrame) -> Result<(), GatewayError> {
        if let Some(f) = self.failures.borrow().clone() {
            return Err(GatewayError::Unavailable(f));
        }
        let id = step.step_id;
        self.first.send(&Frame::Step(step)).await.map_err(|e| {
            GatewayError::Unavailable(format!(
                "sending step {id} to the first stage at {}: {e}",
                self.first_addr
            ))
        })?;
        self.pending.insert(id, Instant::now());
        Ok(())
    }

    async fn next_completion(&mut self) -> Completion {
        let mut watching = true;
        loop {
            let failure = self.failures.borrow().clone();
            if let Some(f) = failure
                && let Some(c) = self.fail_oldest(GatewayError::Unavailable(f))
            {
                return c;
            }
            let Some((&oldest, &sent)) = self.pending.first_key_value() else {
                // Nothing in flight: nothing will ever complete.
                std::future::pending::<()>().await;
                continue;
            };
            let deadline = sent + self.step_timeout;
            tokio::select! {
                frame = self.results.recv() => match frame {
                    Some(Ok(Frame::Samples(s))) if self.pending.remove(&s.step_id).is_some() => {
                        return Completion { step_id: s.step_id, result: Ok(s) };
                    }
                    Some(Ok(Frame::Error(e))) if self.pending.remove(&e.step_id).is_some() => {
                        return Completion {
                            step_id: e.step_id,
                            result: Err(GatewayError::Unavailable(format!(
                                "stage {} failed step {}: {}",
                                e.stage, e.step_id, e.message
                            ))),
                        };
                    }
                    Some(Ok(other)) => tracing::warn!(?other, "data plane: ignoring a frame for no step in flight"),
                    // One inbound connection's garbage ends that connection only: a stage whose
                    // link really broke is caught by the supervisor (its worker reports itself
                    // failed or stops answering) or by the step's deadline.
                    Some(Err(e)) => tracing::warn!(error = %e, "data plane: dropped an inbound connection"),
                    None => {
                        if let Some(c) = self.fail_oldest(GatewayError::Unavailable("data plane: the return path closed".into())) {
                            return c;
                        }
                    }
                },
                changed = self.failures.changed(), if watching => {
                    // A failure is picked up at the top of the loop; nobody reporting any more
                    // leaves the deadline.
                    if changed.is_err() {
                        watching = false;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    self.pending.remove(&oldest);
                    return Completion {
                        step_id: oldest,
                        result: Err(GatewayError::Unavailable(format!(
                            "step {oldest} got no answer within {:?}", self.step_timeout
                        ))),
                    };
                }
            }
        }
    }
}
