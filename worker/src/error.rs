//! The worker's errors. Each says which file, tensor, sequence or peer it concerns.

use strata_shared::ModelError;
use strata_shared::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{}: tensor `{tensor}`: {problem}", file.display())]
    Tensor {
        file: std::path::PathBuf,
        tensor: String,
        problem: String,
    },
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("{context}: {source}")]
    Kernel {
        context: String,
        #[source]
        source: strata_kernels::KernelError,
    },
    #[error("KV cache is full: sequence {seq_id} needs {needed} more blocks, {free} are free")]
    KvFull {
        seq_id: u64,
        needed: usize,
        free: usize,
    },
    #[error("sequence {seq_id}: {problem}")]
    Sequence { seq_id: u64, problem: String },
    #[error("invalid step: {0}")]
    Step(String),
    #[error("invalid load request: {0}")]
    Load(String),
    /// A device this build or this machine cannot run, or one that failed (names the device).
    #[error("{0}")]
    Device(String),
    /// A setting of the process (an environment variable) is invalid.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Tls(#[from] strata_shared::TlsError),
}

/// Adds context to candle errors: `.ctx("layer 3 attention")?`.
pub(crate) trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, WorkerError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, WorkerError> {
        self.map_err(|source| WorkerError::Candle {
            context: context(),
            source,
        })
    }
}

impl<T> CandleContext<T> for Result<T, strata_kernels::KernelError> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, WorkerError> {
        self.map_err(|source| WorkerError::Kernel {
            context: context(),
            source,
        })
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
