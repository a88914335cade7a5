//! Strata's shared vocabulary: what the gateway and the workers must agree on.
//!
//! - model metadata read from file headers ([`gguf`], [`safetensors`], [`config`], [`meta`],
//!   [`source`]), never tensor data;
//! - the user's model [`topology`] format and the load [`plan`] it resolves to;
//! - the data plane's [`wire`] frames and [`transport`].
//!
//! Architecture invariant: this crate does no tensor math and depends on no tensor library.

pub mod config;
pub mod device;
pub mod error;
pub mod ggml;
pub mod gguf;
pub mod isq;
pub mod meta;
pub mod names;
pub mod plan;
pub mod safetensors;
pub mod source;
pub mod topology;
pub mod transport;
pub mod wire;

pub use error::ModelError;

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}
