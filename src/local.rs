//! The single-process engine behind the gateway's `Pipeline` trait: every stage of the plan in
//! this process, stepped on a blocking thread. `strata generate` runs the same scheduler,
//! detokenizer and stop-sequence logic as the service over it.

use std::sync::{Arc, Mutex};

use strata_gateway::GatewayError;
use strata_gateway::pipeline::Pipeline;
use strata_shared::wire::{SamplesFrame, StepFrame};
use strata_worker::Engine;

/// An in-process pipeline.
#[derive(Clone)]
pub struct LocalPipeline {
    engine: Arc<Mutex<Engine>>,
}

impl LocalPipeline {
    pub fn new(engine: Engine) -> Self {
        LocalPipeline {
            engine: Arc::new(Mutex::new(engine)),
        }
    }
}

impl Pipeline for LocalPipeline {
    async fn step(&mut self, step: StepFrame) -> Result<SamplesFrame, GatewayError> {
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || {
            let mut e = engine
                .lock()
                .map_err(|_| GatewayError::Internal("engine lock poisoned".into()))?;
            e.step(step)
                .map_err(|e| GatewayError::Internal(e.to_string()))
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("engine task: {e}")))?
    }
}
