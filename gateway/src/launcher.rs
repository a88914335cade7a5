//! Starting worker processes on this machine: one per device of the topology. Each worker gets
//! its own process, learns nothing but its listen address, and exits when the gateway's end of
//! its stdin closes, so workers never outlive the gateway.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use strata_shared::device::DeviceSpec;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;

use crate::error::GatewayError;

/// How to start a worker process: a program and the arguments before the worker's own
/// (`strata` + `["worker"]`, or `strata-worker` + `[]`).
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// A worker process started by the launcher.
#[derive(Debug)]
pub struct LocalWorker {
    pub device: DeviceSpec,
    pub control: String,
    pub pid: Option<u32>,
    stdin: Option<ChildStdin>,
}

#[derive(Deserialize)]
struct Ready {
    control: String,
}

/// Starts one worker per device and waits until each reports its addresses. Returns the
/// workers and a task that publishes on `failures` when any of them exits.
pub async fn spawn_workers(
    cmd: &WorkerCommand,
    devices: &[DeviceSpec],
    failures: watch::Sender<Option<String>>,
    start_timeout: Duration,
) -> Result<Vec<LocalWorker>, GatewayError> {
    let mut out = Vec::new();
    for &device in devices {
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .args(["--listen", "127.0.0.1:0", "--exit-with-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| {
            GatewayError::Unavailable(format!(
                "cannot start the worker for {device} ({}): {e}",
                cmd.program.display()
            ))
        })?;
        let pid = child.id();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| GatewayError::Internal("worker stdout not captured".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(start_timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(r) = serde_json::from_str::<Ready>(&line) {
                    return Some(r);
                }
            }
            None
        })
        .await;
        let ready = match ready {
            Ok(Some(r)) => r,
            Ok(None) => {
                let status = child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                return Err(GatewayError::Unavailable(format!(
                    "the worker for {device} exited before listening ({status})"
                )));
            }
            Err(_) => {
                return Err(GatewayError::Unavailable(format!(
                    "the worker for {device} did not start listening within {start_timeout:?}"
                )));
            }
        };
        tracing::info!(%device, control = %ready.control, pid, "worker started");
        let stdin = child.stdin.take();
        tokio::spawn(watch_exit(child, device, failures.clone()));
        out.push(LocalWorker {
            device,
            control: ready.control,
            pid,
            stdin,
        });
    }
    Ok(out)
}

async fn watch_exit(mut child: Child, device: DeviceSpec, failures: watch::Sender<Option<String>>) {
    let status = child.wait().await;
    let msg = match status {
        Ok(s) => format!("the worker process for {device} exited ({s})"),
        Err(e) => format!("the worker process for {device} is lost: {e}"),
    };
    tracing::warn!("{msg}");
    failures.send_if_modified(|f| {
        if f.is_none() {
            *f = Some(msg.clone());
            true
        } else {
            false
        }
    });
}

impl LocalWorker {
    /// Asks the worker to exit by closing its stdin.
    pub fn stop(&mut self) {
        self.stdin = None;
    }
}
