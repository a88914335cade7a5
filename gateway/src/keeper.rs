//! Keeping the ring up. The keeper owns the workers (the local processes it started, or the
//! addresses of remote ones): it loads and links them, polls them, and when one fails (its
//! process exits, it stops answering, it reports itself failed, or the pipeline loses a step)
//! it rebuilds the ring under a new data-plane session. A local worker whose process died is
//! started again; a remote one is waited for at the same address (a restarted pod); every
//! worker loads its stages afresh, dropping every sequence it held, and the ring is linked
//! again. Meanwhile the scheduler keeps each sequence's tokens and replays them once the ring
//! is back ([`RingStatus::Up`] with the next epoch): clients see a pause, not an error.
//!
//! Architecture invariant: nothing of an earlier ring reaches a later one. Each rebuild has a
//! new session token, and a data-plane listener that takes the new token closes every
//! connection opened under the old one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_proto::worker::v1::worker_client::WorkerClient;
use strata_shared::device::DeviceSpec;
use strata_shared::plan::Plan;
use strata_shared::tls::LinkSecurity;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::error::GatewayError;
use crate::launcher::{LocalWorker, WorkerCommand, spawn_worker};
use crate::workers::{Deployment, Workers, load_and_link, poll_once};

/// How long one rebuilding attempt waits for a worker's control plane to answer. A worker
/// started for the attempt already listens; one that does not answer in this window is dead or
/// unreachable, and the next attempt (with backoff, within `--recovery-secs`) tries again.
const RECOVERY_CONNECT: Duration = Duration::from_secs(10);

/// Where the workers come from.
#[derive(Debug, Clone)]
pub enum WorkerSource {
    /// Start one worker process per device on this machine.
    Spawn(WorkerCommand),
    /// Workers started elsewhere: device → control-plane address.
    Remote(HashMap<DeviceSpec, String>),
}

/// The state of the ring, as the keeper publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingStatus {
    /// Not built yet.
    Starting,
    /// The ring works. `epoch` counts its builds; `first` is the first stage's data-plane
    /// address and `session` the token every data-plane connection presents.
    Up {
        epoch: u64,
        first: String,
        session: String,
    },
    /// A worker failed; the ring is being rebuilt.
    Recovering { cause: String },
    /// Rebuilding did not succeed within the budget (the keeper goes on trying).
    Down { cause: String },
}

/// What the keeper deploys, and how patiently.
#[derive(Debug, Clone)]
pub struct KeeperConfig {
    pub plan: Plan,
    /// The model as the user named it; each worker resolves it itself.
    pub model: String,
    pub revision: Option<String>,
    /// The model's fingerprint, which every worker's copy must match.
    pub fingerprint: String,
    /// KV cache of every stage, in blocks of `kv_block_size` tokens.
    pub kv_blocks: u32,
    pub kv_block_size: u32,
    /// Where the last stage sends its samples.
    pub gateway_data_address: String,
    /// How long a worker may take to start or become reachable.
    pub connect_timeout: Duration,
    /// Mutual TLS on the control plane, or plaintext.
    pub links: LinkSecurity,
    /// Activations between GPU workers over NCCL where both can.
    pub nccl: bool,
    pub source: WorkerSource,
    /// How long a rebuild may take before the requests waiting on it fail; zero: never rebuild.
    pub recovery: Duration,
    /// How often every worker's status is polled; a poll unanswered for twice as long is a
    /// failure.
    pub poll: Duration,
}

/// Owns the workers and keeps the ring up; see the module docs.
pub struct Keeper {
    cfg: KeeperConfig,
    local: Arc<Mutex<Vec<LocalWorker>>>,
    workers: Workers,
    failures: Arc<watch::Sender<Option<String>>>,
    failures_rx: watch::Receiver<Option<String>>,
    status: watch::Sender<RingStatus>,
    session: String,
    /// The session the gateway's own data-plane listener admits: the ring's.
    listener_session: watch::Sender<String>,
    epoch: u64,
    recoveries: Arc<AtomicU64>,
}

impl Keeper {
    /// A keeper for `cfg`; the local worker processes it starts go into `local`, where whoever
    /// stops them at the end finds them (the keeper may be aborted at any await).
    pub fn new(cfg: KeeperConfig, local: Arc<Mutex<Vec<LocalWorker>>>) -> Self {
        let (failures, failures_rx) = watch::channel(None);
        Keeper {
            cfg,
            local,
            workers: Workers::default(),
            failures: Arc::new(failures),
            failures_rx,
            status: watch::channel(RingStatus::Starting).0,
            session: String::new(),
            listener_session: watch::channel(String::new()).0,
            epoch: 0,
            recoveries: Arc::default(),
        }
    }

    /// The ring's state, as it changes.
    pub fn status(&self) -> watch::Receiver<RingStatus> {
        self.status.subscribe()
    }

    /// The session token the gateway's data-plane listener should admit, as it changes.
    pub fn listener_session(&self) -> watch::Receiver<String> {
        self.listener_session.subscribe()
    }

    /// The workers' states (for ModelInfo).
    pub fn workers(&self) -> Workers {
        self.workers.clone()
    }

    /// Where anyone who sees the ring fail reports it.
    pub fn failures(&self) -> Arc<watch::Sender<Option<String>>> {
        Arc::clone(&self.failures)
    }

    /// How many times the ring was rebuilt.
    pub fn recoveries(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.recoveries)
    }

    /// Builds the ring for the first time; a failure here is the caller's to report.
    pub async fn start(&mut self) -> Result<(), GatewayError> {
        self.build(false, self.cfg.connect_timeout).await?;
        self.announce();
        Ok(())
    }

    /// One health poll of every ready worker, reusing (and filling) `clients`.
    async fn poll(&self, clients: &mut HashMap<String, WorkerClient<Channel>>) {
        poll_once(
            &self.workers,
            clients,
            &self.cfg.links,
            &self.failures,
            self.cfg.poll * 2,
        )
        .await;
    }

    /// Polls the workers and rebuilds the ring after every failure, until aborted.
    pub async fn run(mut self) {
        let mut clients = HashMap::new();
        loop {
            tokio::select! {
                changed = self.failures_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(self.cfg.poll) => {
                    self.poll(&mut clients).await;
                }
            }
            let failure = self.failures_rx.borrow_and_update().clone();
            if let Some(cause) = failure {
                // One more poll marks the workers that failed (ModelInfo shows them).
                self.poll(&mut clients).await;
                clients.clear();
                self.recover(cause).await;
            }
        }
    }

    /// Rebuilds the ring after `cause`: within the recovery budget the requests wait; past
    /// it they fail, and the keeper goes on trying (a remote worker may come back later).
    async fn recover(&mut self, cause: String) {
        if self.cfg.recovery.is_zero() {
            tracing::error!("{cause}; recovery is off (--recovery-secs 0): the ring stays down");
            self.status.send_replace(RingStatus::Down { cause });
            return std::future::pending::<()>().await;
        }
        tracing::warn!(
            budget = ?self.cfg.recovery,
            "{cause}; rebuilding the ring (the requests in flight wait and resume)"
        );
        self.status.send_replace(RingStatus::Recovering {
            cause: cause.clone(),
        });
        let started = Instant::now();
        let give_up_at = started + self.cfg.recovery;
        let mut last;
        let mut down = false;
        for attempt in 0u32.. {
            // Failures seen from here on concern this attempt.
            self.failures.send_replace(None);
            // After a failed attempt every local worker starts afresh: one alive but stuck
            // would fail every attempt.
            let fresh = attempt > 0;
            // A worker that does not answer within the attempt's connect window fails the
            // attempt, and the next one starts every local worker afresh. (A local worker killed
            // a moment ago may still look alive, its exit not yet reaped: without the window,
            // the attempt would wait on its dead address for the whole budget.)
            let connect = RECOVERY_CONNECT.min(self.cfg.connect_timeout);
            let built = if down {
                self.build(fresh, connect).await
            } else {
                tokio::time::timeout_at(give_up_at, self.build(fresh, connect))
                    .await
                    .unwrap_or_else(|_| {
                        Err(GatewayError::Unavailable(format!(
                            "rebuilding took longer than {:?}",
                            self.cfg.recovery
                        )))
                    })
            };
            let failed_meanwhile = self.failures_rx.borrow_and_update().clone();
            match built {
                Ok(()) => match failed_meanwhile {
                    None => {
                        self.recoveries.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            seconds = started.elapsed().as_secs_f64(),
                            attempts = attempt + 1,
                            "the ring is rebuilt; the requests resume"
                        );
                        self.announce();
                        return;
                    }
                    Some(again) => last = again,
                },
                Err(e) => last = e.to_string(),
            }
            tracing::warn!(attempt, error = %last, "rebuilding the ring failed");
            if !down && Instant::now() >= give_up_at {
                down = true;
                let cause = format!(
                    "{cause}; the ring could not be rebuilt within {:?} (last: {last})",
                    self.cfg.recovery
                );
                tracing::error!("{cause}; failing the requests, and still trying");
                self.status.send_replace(RingStatus::Down { cause });
            }
            let backoff = Duration::from_millis(250 << attempt.min(5));
            tokio::time::sleep(backoff).await;
        }
    }

    /// Publishes the ring just built as the next epoch.
    fn announce(&mut self) {
        self.epoch += 1;
        let first = self
            .cfg
            .plan
            .route
            .first()
            .and_then(|s| {
                self.workers
                    .snapshot()
                    .into_iter()
                    .find(|w| w.device == s.device)
            })
            .map(|w| w.data_address)
            .unwrap_or_default();
        self.status.send_replace(RingStatus::Up {
            epoch: self.epoch,
            first,
            session: self.session.clone(),
        });
    }

    /// Starts the local workers that are not running (every one when `fresh`), then loads and
    /// links every worker under a new session.
    async fn build(&mut self, fresh: bool, connect_timeout: Duration) -> Result<(), GatewayError> {
        let addresses: HashMap<DeviceSpec, String> = match &self.cfg.source {
            WorkerSource::Spawn(cmd) => {
                for &device in &self.cfg.plan.devices {
                    let old = take_local(&self.local, device);
                    if let Some(w) = old {
                        if w.is_alive() && !fresh {
                            put_local(&self.local, w);
                            continue;
                        }
                        w.stop(Duration::from_secs(2)).await;
                    }
                    let w = spawn_worker(
                        cmd,
                        device,
                        self.cfg.plan.devices.len(),
                        Arc::clone(&self.failures),
                        self.cfg.connect_timeout,
                    )
                    .await?;
                    put_local(&self.local, w);
                }
                self.local
                    .lock()
                    .map(|l| l.iter().map(|w| (w.device, w.control.clone())).collect())
                    .unwrap_or_default()
            }
            WorkerSource::Remote(map) => map.clone(),
        };
        // A fresh session: only connections that present it get in (the workers', and the
        // gateway's to the first stage), so a stranger's bytes, or the old ring's, reach no
        // step.
        let session = format!("{:032x}", rand::random::<u128>());
        // The last stage links to the gateway under it; connections of the old ring close.
        self.listener_session.send_replace(session.clone());
        load_and_link(
            &Deployment {
                plan: &self.cfg.plan,
                session: &session,
                fingerprint: &self.cfg.fingerprint,
                model: &self.cfg.model,
                revision: self.cfg.revision.as_deref(),
                addresses: &addresses,
                kv_blocks: self.cfg.kv_blocks,
                kv_block_size: self.cfg.kv_block_size,
                gateway_data_address: &self.cfg.gateway_data_address,
                connect_timeout,
                links: &self.cfg.links,
                nccl: self.cfg.nccl,
            },
            &self.workers,
        )
        .await?;
        self.session = session;
        Ok(())
    }
}

/// Publishes a failure of the ring on `failures`, unless one is already there (the first
/// cause is the one reported).
pub fn report_failure(failures: &watch::Sender<Option<String>>, why: &str) {
    failures.send_if_modified(|f| {
        if f.is_none() {
            *f = Some(why.to_string());
            true
        } else {
            false
        }
    });
}

fn take_local(local: &Mutex<Vec<LocalWorker>>, device: DeviceSpec) -> Option<LocalWorker> {
    let mut l = local.lock().ok()?;
    let at = l.iter().position(|w| w.device == device)?;
    Some(l.remove(at))
}

fn put_local(local: &Mutex<Vec<LocalWorker>>, w: LocalWorker) {
    if let Ok(mut l) = local.lock() {
        l.push(w);
    }
}
