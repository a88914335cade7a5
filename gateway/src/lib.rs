//! The Strata gateway: serves the public gRPC API, validates and tokenizes requests, schedules
//! continuous batches over the workers' paged KV caches, drives the pipeline of worker processes
//! and streams tokens back.
//!
//! Architecture invariant: the gateway never touches tensors; it sees token ids, sampling
//! parameters and samples. It does not depend on candle.

pub mod auth;
pub mod cli;
pub mod error;
pub mod keeper;
pub mod launcher;
pub mod metrics;
pub mod pipeline;
pub mod progress;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod tokenizer;
pub mod validation;
pub mod workers;

pub use error::GatewayError;
