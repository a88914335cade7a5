//! What the scheduler drives: something that runs a step through every stage of the route and
//! returns the samples. The ring over a [`Transport`] is the real one; `strata generate` plugs an
//! in-process engine behind the same trait.

use std::future::Future;
use std::time::Duration;

use strata_shared::transport::{FrameSender, Transport, accept_frames};
use strata_shared::wire::{Frame, SamplesFrame, StepFrame, WireError};
use tokio::sync::{mpsc, watch};

use crate::error::GatewayError;

/// Runs steps through the route, one at a time.
pub trait Pipeline: Send + 'static {
    fn step(
        &mut self,
        step: StepFrame,
    ) -> impl Future<Output = Result<SamplesFrame, GatewayError>> + Send;
}

/// The ring: steps go to the first stage over a persistent connection; the last stage's
/// samples come back to the gateway's own data-plane listener.
pub struct RingPipeline<T: Transport> {
    first: T::Sender,
    first_addr: String,
    results: mpsc::Receiver<Result<Frame, WireError>>,
    failures: watch::Receiver<Option<String>>,
    step_timeout: Duration,
}

impl<T: Transport> RingPipeline<T> {
    /// Connects to the first stage at `first_addr` and collects the frames that `listener`
    /// (the gateway's data-plane listener, where the last stage sends) receives. `failures`
    /// carries a worker failure, which fails the step in flight at once.
    pub async fn connect(
        transport: &T,
        first_addr: &str,
        listener: T::Listener,
        failures: watch::Receiver<Option<String>>,
        step_timeout: Duration,
    ) -> Result<Self, GatewayError> {
        let first = transport
            .connect(first_addr)
            .await
            .map_err(|e| GatewayError::Unavailable(format!("data plane: {e}")))?;
        let (tx, results) = mpsc::channel(64);
        tokio::spawn(accept_frames(listener, tx, |r| r));
        Ok(RingPipeline {
            first,
            first_addr: first_addr.to_string(),
            results,
            failures,
            step_timeout,
        })
    }
}

impl<T: Transport> Pipeline for RingPipeline<T> {
    async fn step(&mut self, step: StepFrame) -> Result<SamplesFrame, GatewayError> {
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
        let deadline = tokio::time::sleep(self.step_timeout);
        tokio::pin!(deadline);
        let mut watching = true;
        loop {
            tokio::select! {
                frame = self.results.recv() => match frame {
                    Some(Ok(Frame::Samples(s))) if s.step_id == id => return Ok(s),
                    Some(Ok(Frame::Error(e))) if e.step_id == id => {
                        return Err(GatewayError::Unavailable(format!("stage {} failed step {id}: {}", e.stage, e.message)));
                    }
                    Some(Ok(other)) => tracing::warn!(?other, "data plane: ignoring a frame for another step"),
                    Some(Err(e)) => return Err(GatewayError::Unavailable(format!("data plane: {e}"))),
                    None => return Err(GatewayError::Unavailable("data plane: the return path closed".into())),
                },
                changed = self.failures.changed(), if watching => match changed {
                    Ok(()) => {
                        if let Some(why) = self.failures.borrow().clone() {
                            return Err(GatewayError::Unavailable(why));
                        }
                    }
                    // Nobody reports failures any more; rely on the deadline.
                    Err(_) => watching = false,
                },
                () = &mut deadline => {
                    return Err(GatewayError::Unavailable(format!(
                        "step {id} got no answer within {:?}", self.step_timeout
                    )));
                }
            }
        }
    }
}
