//! The Strata worker: one process per device. It owns the slice of transformer layers that the
//! topology assigns to its device, quantizes those weights itself while loading (ISQ), keeps the
//! KV cache of its own layers, and runs them with candle.
//!
//! Architecture invariant: the worker never tokenizes; it sees token ids and activations only.

pub mod cli;
pub mod engine;
pub mod error;
pub mod kv;
pub mod layers;
pub mod memory;
pub mod model;
pub mod sampling;
pub mod service;
pub mod stage;
pub mod weights;

pub use engine::Engine;
pub use error::{Result, WorkerError};

/// The SIMD level Strata's own kernels run at on this CPU (`avx512`, `avx2`, `scalar`).
pub fn cpu_features() -> &'static str {
    strata_kernels::cpu::features()
}
