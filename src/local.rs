//! The single-process engine behind the gateway's `Pipeline` trait: every stage of the plan in
//! this process, stepped on a blocking thread. `strata generate` runs the same scheduler,
//! detokenizer and stop-sequence logic as the service over it.

use std::sync::{Arc, Mutex};

use strata_gateway::GatewayError;
use strata_gateway::pipeline::{Completion, Pipeline, PipelineEvent};
use strata_shared::wire::StepFrame;
use strata_worker::Engine;
use tokio::sync::mpsc;

/// An in-process pipeline: one step at a time (the engine computes them in turn).
pub struct LocalPipeline {
    engine: Arc<Mutex<Engine>>,
    done_tx: mpsc::UnboundedSender<Completion>,
    done_rx: mpsc::UnboundedReceiver<Completion>,
}

impl LocalPipeline {
    pub fn new(engine: Engine) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        LocalPipeline {
            engine: Arc::new(Mutex::new(engine)),
            done_tx,
            done_rx,
        }
    }
}

impl Pipeline for LocalPipeline {
    fn depth(&self) -> usize {
        1
    }

    async fn submit(&mut self, step: StepFrame) -> Result<(), GatewayError> {
        let engine = Arc::clone(&self.engine);
        let done = self.done_tx.clone();
        let step_id = step.step_id;
        tokio::task::spawn_blocking(move || {
            let result = match engine.lock() {
                Ok(mut e) => e
                    .step(step)
                    .map_err(|e| GatewayError::Internal(e.to_string())),
                Err(_) => Err(GatewayError::Internal("engine lock poisoned".into())),
            };
            let _ = done.send(Completion {
                step_id,
                result,
                round_trip: None,
            });
        });
        Ok(())
    }

    async fn next_event(&mut self) -> PipelineEvent {
        match self.done_rx.recv().await {
            Some(c) => PipelineEvent::Completed(c),
            // The sender lives in `self`: this cannot end.
            None => std::future::pending().await,
        }
    }
}
