//! Starting worker processes on this machine: one per device of the topology. Each worker gets
//! its own process, learns nothing but its listen address, and exits when the gateway's end of
//! its stdin closes, so workers never outlive the gateway.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;
use strata_shared::device::DeviceSpec;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::GatewayError;
use crate::progress::Progress;

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
    /// Set before the worker is asked to exit, so that its exit is not reported as a failure.
    stopping: Arc<AtomicBool>,
    /// The task that owns the child process and waits for it.
    exited: JoinHandle<()>,
}

#[derive(Deserialize)]
struct Ready {
    control: String,
}

/// Starts the worker process for `device` and waits until it reports its addresses. When it
/// exits on its own, `failures` says so.
///
/// `local_workers` is how many workers this gateway starts on this host: unless the thread
/// count was chosen (`--threads`, which sets `RAYON_NUM_THREADS` for the gateway and every
/// worker it starts), each is told its equal share of the cores (`STRATA_SHARED_THREADS`),
/// which it keeps to while other stages compute at the same time; alone, it uses them all.
pub async fn spawn_worker(
    cmd: &WorkerCommand,
    device: DeviceSpec,
    local_workers: usize,
    failures: Arc<watch::Sender<Option<String>>>,
    start_timeout: Duration,
) -> Result<LocalWorker, GatewayError> {
    let mut command = Command::new(&cmd.program);
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let share = (cores / local_workers.max(1)).max(1);
        command.env("STRATA_SHARED_THREADS", share.to_string());
    }
    command
        .args(&cmd.args)
        .args(["--listen", "127.0.0.1:0", "--exit-with-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // A process group of its own: a terminal's Ctrl-C reaches the gateway alone, which
        // then ends the streams and stops its workers in order.
        .process_group(0)
        .kill_on_drop(true);
    // On a terminal the gateway draws the workers' load progress; their own info lines
    // would only break up the bars (RUST_LOG, when set, still decides).
    if Progress::new().draws_bars() && std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "warn");
    }
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
    let stopping = Arc::new(AtomicBool::new(false));
    let exited = tokio::spawn(watch_exit(child, device, failures, Arc::clone(&stopping)));
    Ok(LocalWorker {
        device,
        control: ready.control,
        pid,
        stdin,
        stopping,
        exited,
    })
}

async fn watch_exit(
    mut child: Child,
    device: DeviceSpec,
    failures: Arc<watch::Sender<Option<String>>>,
    stopping: Arc<AtomicBool>,
) {
    let status = child.wait().await;
    if stopping.load(Ordering::SeqCst) {
        tracing::info!(%device, status = ?status, "worker stopped");
        return;
    }
    let msg = match status {
        Ok(s) => format!("the worker process for {device} exited ({s})"),
        Err(e) => format!("the worker process for {device} is lost: {e}"),
    };
    tracing::error!("{msg}");
    crate::keeper::report_failure(&failures, &msg);
}

impl LocalWorker {
    /// Whether its process still runs.
    pub fn is_alive(&self) -> bool {
        !self.exited.is_finished()
    }

    /// Asks the worker to exit by closing its stdin, and waits up to `grace` for it; a worker
    /// still running then is killed.
    pub async fn stop(mut self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stdin = None;
        if tokio::time::timeout(grace, &mut self.exited).await.is_err() {
            tracing::warn!(device = %self.device, "worker did not exit in {grace:?}; killing it");
            // Dropping the child (owned by the aborted task) kills it.
            self.exited.abort();
            let _ = self.exited.await;
        }
    }
}
