//! What the scheduler drives: something that carries steps through every stage of the route
//! and gives back their samples. Several steps may be in flight at once (one per stage keeps
//! every stage busy); they complete in any order. The ring over a [`Transport`] is the real
//! one; `strata generate` plugs an in-process engine behind the same trait.
//!
//! A ring can break (a worker dies, a link stalls) and be rebuilt by the
//! [`keeper`](crate::keeper): the pipeline then reports [`PipelineEvent::Broken`] (every step in
//! flight is lost, and no step is taken) and later [`PipelineEvent::Restored`], or
//! [`PipelineEvent::Lost`] when the keeper gives up for now.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use strata_shared::transport::{FrameSender, Transport, accept_frames, hello, next_or_heartbeat};
use strata_shared::wire::{Frame, SamplesFrame, StepFrame, WireError};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::keeper::{RingStatus, report_failure};

/// The outcome of one step.
#[derive(Debug)]
pub struct Completion {
    pub step_id: u64,
    pub result: Result<SamplesFrame, GatewayError>,
    /// From the step's leaving to its samples' arrival, where the pipeline measures it (a
    /// ring, whose hops the scheduler may hide behind more steps in flight).
    pub round_trip: Option<Duration>,
}

/// What happened next on the pipeline.
#[derive(Debug)]
pub enum PipelineEvent {
    /// A step completed, or failed on its own (its sequences end; the others go on).
    Completed(Completion),
    /// The route broke: every step in flight is lost, and steps are refused until `Restored`.
    Broken(String),
    /// The route works again, under a new data-plane session.
    Restored,
    /// Rebuilding the route gave up for now: requests fail with this cause until `Restored`.
    Lost(String),
}

/// Carries steps through the route.
pub trait Pipeline: Send + 'static {
    /// Steps worth keeping in flight at once: one per stage.
    fn depth(&self) -> usize;

    /// The most steps worth keeping in flight where the hops take long (the scheduler adapts
    /// between [`Pipeline::depth`] and this, from the completions' round trips): by default,
    /// the depth.
    fn max_depth(&self) -> usize {
        self.depth()
    }

    /// Sends a step on its way. An error means it never left (it completes with nothing).
    fn submit(&mut self, step: StepFrame) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// The next event: a step completing, or the route breaking or coming back. With nothing
    /// in flight and a route that holds, it waits.
    fn next_event(&mut self) -> impl Future<Output = PipelineEvent> + Send;
}

/// The ring: steps go to the first stage over a persistent connection; the last stage's
/// samples come back to the gateway's own data-plane listener. The [`keeper`](crate::keeper)
/// publishes where the first stage is and under which session; the pipeline follows.
pub struct RingPipeline<T: Transport> {
    transport: T,
    /// The queue of the link to the first stage (a task sends it, with heartbeats), and the
    /// stage's address, while the ring holds.
    first: Option<(mpsc::Sender<Frame>, String)>,
    /// The keeper's epoch this pipeline is connected to (0: none yet).
    epoch: u64,
    /// Whether the scheduler was told the ring is lost (and not yet that it is back).
    lost: bool,
    /// Steps it holds at once, at least and at most.
    depth: usize,
    max_depth: usize,
    results: mpsc::Receiver<Result<Frame, WireError>>,
    status: watch::Receiver<RingStatus>,
    /// Where the pipeline reports a failure it sees itself (a send that fails, a step that
    /// gets no answer): the keeper rebuilds the ring.
    failures: Arc<watch::Sender<Option<String>>>,
    step_timeout: Duration,
    /// Steps in flight, by id, with when they were sent.
    pending: BTreeMap<u64, Instant>,
}

impl<T: Transport> RingPipeline<T> {
    /// Collects the frames that `listener` (the gateway's data-plane listener, where the last
    /// stage sends) receives from connections that present `session` (the keeper sets it for
    /// each ring it builds), and follows the ring that `status` describes. It holds
    /// `depths.start()` steps at once (the route's length by default: one per stage), or up to
    /// `depths.end()` where the hops take long.
    pub fn new(
        transport: T,
        depths: std::ops::RangeInclusive<usize>,
        listener: T::Listener,
        session: watch::Receiver<String>,
        status: watch::Receiver<RingStatus>,
        failures: Arc<watch::Sender<Option<String>>>,
        step_timeout: Duration,
    ) -> Self {
        let (tx, results) = mpsc::channel(64);
        tokio::spawn(accept_frames(listener, tx, |r| r, session));
        RingPipeline {
            transport,
            first: None,
            epoch: 0,
            lost: false,
            depth: *depths.start(),
            max_depth: *depths.end(),
            results,
            status,
            failures,
            step_timeout,
            pending: BTreeMap::new(),
        }
    }

    /// Connects to the first stage of the ring the keeper announced. A failure goes to the
    /// keeper.
    pub async fn connect(&mut self) -> Result<(), GatewayError> {
        let RingStatus::Up {
            epoch,
            first,
            session,
        } = self.status.borrow_and_update().clone()
        else {
            return Err(GatewayError::Unavailable("the ring is not up".into()));
        };
        self.epoch = epoch;
        match hello(&self.transport, &first, &session).await {
            Ok(sender) => {
                let (queue, frames) = mpsc::channel(16);
                tokio::spawn(send_to_first(
                    sender,
                    frames,
                    first.clone(),
                    epoch,
                    self.status.clone(),
                    Arc::clone(&self.failures),
                ));
                self.first = Some((queue, first));
                Ok(())
            }
            Err(e) => {
                let why = format!("data plane: connecting to the first stage at {first}: {e}");
                self.report(&why);
                Err(GatewayError::Unavailable(why))
            }
        }
    }

    /// Tells the keeper the ring is broken (unless something already did).
    fn report(&self, why: &str) {
        tracing::error!("{why}");
        report_failure(&self.failures, why);
    }

    /// The ring broke under the steps in flight: they are lost.
    fn broken(&mut self, why: String) -> PipelineEvent {
        self.first = None;
        self.pending.clear();
        PipelineEvent::Broken(why)
    }
}

impl<T: Transport> Pipeline for RingPipeline<T> {
    fn depth(&self) -> usize {
        self.depth.max(1)
    }

    fn max_depth(&self) -> usize {
        self.max_depth.max(self.depth())
    }

    async fn submit(&mut self, step: StepFrame) -> Result<(), GatewayError> {
        let id = step.step_id;
        let Some((first, addr)) = self.first.as_mut() else {
            return Err(GatewayError::Unavailable(
                "the ring is being rebuilt".into(),
            ));
        };
        if first.send(Frame::Step(step)).await.is_err() {
            // The link's task has ended on an error, which it reported: the ring's failure
            // completes this step, with the others in flight.
            tracing::debug!(step = id, first = %addr, "the link to the first stage is down");
        }
        self.pending.insert(id, Instant::now());
        Ok(())
    }

    async fn next_event(&mut self) -> PipelineEvent {
        let mut watching = true;
        loop {
            let status = self.status.borrow_and_update().clone();
            match status {
                RingStatus::Up { epoch, .. } if epoch != self.epoch => {
                    // Rebuilt while this pipeline looked away: what was in flight is lost.
                    if self.first.is_some() {
                        return self.broken("the ring was rebuilt".into());
                    }
                    if self.connect().await.is_ok() {
                        self.lost = false;
                        return PipelineEvent::Restored;
                    }
                }
                // This ring's (if its connection failed, the keeper is rebuilding).
                RingStatus::Up { .. } => {}
                RingStatus::Recovering { cause } if self.first.is_some() => {
                    return self.broken(cause);
                }
                RingStatus::Recovering { .. } | RingStatus::Starting => {}
                RingStatus::Down { cause } if self.first.is_some() || !self.lost => {
                    self.first = None;
                    self.pending.clear();
                    self.lost = true;
                    return PipelineEvent::Lost(cause);
                }
                RingStatus::Down { .. } => {}
            }
            let oldest = self
                .pending
                .first_key_value()
                .map(|(&id, &sent)| (id, sent));
            let deadline = oldest.map(|(_, sent)| sent + self.step_timeout);
            tokio::select! {
                frame = self.results.recv() => match frame {
                    Some(Ok(Frame::Samples(s))) if self.pending.contains_key(&s.step_id) => {
                        let sent = self.pending.remove(&s.step_id);
                        return PipelineEvent::Completed(Completion {
                            step_id: s.step_id,
                            result: Ok(s),
                            round_trip: sent.map(|at| at.elapsed()),
                        });
                    }
                    Some(Ok(Frame::Error(e))) if self.pending.remove(&e.step_id).is_some() => {
                        return PipelineEvent::Completed(Completion {
                            round_trip: None,
                            step_id: e.step_id,
                            result: Err(GatewayError::Unavailable(format!(
                                "stage {} failed step {}: {}",
                                e.stage, e.step_id, e.message
                            ))),
                        });
                    }
                    Some(Ok(other)) => tracing::debug!(?other, "data plane: ignoring a frame for no step in flight"),
                    // Only the ring's own links get past the session check: one that breaks or
                    // stalls breaks the ring (unless it is already being rebuilt).
                    Some(Err(e)) if self.first.is_some() => {
                        let why = format!("data plane: the link from the last stage: {e}");
                        self.report(&why);
                        return self.broken(why);
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "data plane: a link of a broken ring ended"),
                    None => {
                        let why = "data plane: the gateway's listener stopped".to_string();
                        self.report(&why);
                        return self.broken(why);
                    }
                },
                changed = self.status.changed(), if watching => {
                    // The keeper gone (shutdown): the ring changes no more, but steps in
                    // flight still complete.
                    watching = changed.is_ok();
                }
                () = sleep_until(deadline) => {
                    if let Some((id, _)) = oldest {
                        let why = format!("step {id} got no answer within {:?}", self.step_timeout);
                        self.report(&why);
                        return self.broken(why);
                    }
                }
            }
        }
    }
}

/// Sends the steps queued for the first stage, with heartbeats while there are none, until the
/// queue closes (the ring was rebuilt) or sending fails, which breaks the ring of `epoch` (and
/// only that one).
async fn send_to_first<S: FrameSender>(
    mut sender: S,
    mut frames: mpsc::Receiver<Frame>,
    addr: String,
    epoch: u64,
    mut status: watch::Receiver<RingStatus>,
    failures: Arc<watch::Sender<Option<String>>>,
) {
    let ours = |s: &RingStatus| matches!(s, RingStatus::Up { epoch: e, .. } if *e == epoch);
    loop {
        // A link of an earlier ring ends, even one whose peer stopped reading.
        let next = tokio::select! {
            frame = next_or_heartbeat(&mut frames) => frame,
            _ = status.wait_for(|s| !ours(s)) => return,
        };
        let Some(frame) = next else {
            return;
        };
        let sent = tokio::select! {
            sent = sender.send(&frame) => sent,
            _ = status.wait_for(|s| !ours(s)) => return,
        };
        if let Err(e) = sent {
            if ours(&status.borrow()) {
                let why = format!("data plane: sending to the first stage at {addr}: {e}");
                tracing::error!("{why}");
                report_failure(&failures, &why);
            }
            return;
        }
    }
}

/// Sleeps until `at` (forever when there is none).
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
