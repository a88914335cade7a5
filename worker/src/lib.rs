//! The Strata worker: one process per device. It owns the slice of transformer layers that the
//! topology assigns to its device, quantizes those weights itself while loading (ISQ), keeps the
//! KV cache of its own layers, and runs them with candle.
//!
//! Architecture invariant: the worker never tokenizes; it sees token ids and activations only.

pub mod batch;
pub mod cli;
pub mod device;
pub mod engine;
pub mod error;
pub mod kv;
pub mod layers;
pub mod links;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod scratch;
pub mod service;
pub mod stage;
pub mod weights;

pub use device::{CUDA_BUILT, Placement};
pub use engine::Engine;
pub use error::{Result, WorkerError};
pub use model::ActivationPolicy;
pub use strata_shared::memory;

/// Sets up compute threads for this process: all parallel work runs on one rayon pool of `n`
/// threads (default: one per core), and candle's own pool gets no threads (candle then runs inline
/// on the calling thread), so two pools never compete for the cores.
///
/// # Safety
///
/// It writes environment variables: call it before any other thread of the process exists (first
/// thing in `main`).
#[allow(unsafe_code)]
pub unsafe fn configure_threads(n: Option<usize>) {
    // SAFETY: the caller guarantees no other thread exists to read the environment concurrently.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        if let Some(n) = n {
            std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
        }
    }
}

/// The kernels Strata picked for this CPU, e.g. `f32 avx512, int8 avx512-vnni`.
pub fn cpu_features() -> String {
    strata_kernels::cpu::summary()
}
