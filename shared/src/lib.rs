//! Strata's shared vocabulary: what the gateway and the workers must agree on.
//!
//! - model metadata read from file headers ([`gguf`], [`safetensors`], [`config`], [`meta`],
//!   [`source`]), never tensor data;
//! - the user's model [`topology`] format and the load [`plan`] it resolves to;
//! - the data plane's [`wire`] frames and [`transport`], and the links' mutual [`tls`];
//! - logs, traces and metrics, set up alike in every process ([`telemetry`]), and the process's
//!   own [`memory`].
//!
//! Architecture invariant: this crate does no tensor math and depends on no tensor library.

pub mod config;
pub mod device;
pub mod error;
pub mod ggml;
pub mod gguf;
pub mod isq;
pub mod memory;
pub mod meta;
pub mod names;
pub mod plan;
pub mod safetensors;
pub mod source;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod transport;
pub mod wire;

pub use error::ModelError;
pub use plan::PlanError;
pub use tls::TlsError;
pub use topology::TopologyError;
pub use wire::WireError;

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Ctrl-C (SIGINT): stop now.
    Interrupt,
    /// SIGTERM (what Kubernetes sends): the gateway drains first.
    Terminate,
}

/// Every request to stop (SIGINT and SIGTERM), in the order they come. Call it within a tokio
/// runtime.
pub fn stop_signals() -> tokio::sync::mpsc::Receiver<Stop> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::error!("cannot listen for SIGINT and SIGTERM");
            return std::future::pending().await;
        };
        loop {
            let stop = tokio::select! {
                _ = int.recv() => Stop::Interrupt,
                _ = term.recv() => Stop::Terminate,
            };
            if tx.send(stop).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Resolves when the process is asked to stop: Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
