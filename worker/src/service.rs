//! The worker process: a control-plane gRPC service (`strata.worker.v1.Worker`) through which the
//! gateway says what to load and where each stage's output goes, and a data-plane listener whose
//! frames a compute thread runs through the loaded stages.
//!
//! Threads: tokio runs the control plane and the data-plane connections; one compute thread owns
//! the stages (and their KV caches) and handles frames in arrival order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use strata_proto::worker::v1::worker_server::{Worker, WorkerServer};
use strata_proto::worker::v1::{
    LinkRequest, LinkResponse, LoadEvent, LoadProgress, LoadRequest, Loaded, NcclIdRequest,
    NcclIdResponse, State, StatusRequest, StatusResponse, load_event,
};
use strata_shared::meta::ModelMeta;
use strata_shared::source::ModelFiles;
use strata_shared::transport::{
    FrameListener, FrameSender, TcpTransport, Transport, accept_frames, advertised_address, hello,
    next_or_heartbeat,
};
use strata_shared::wire::{ErrorFrame, Frame, KV_BLOCK_SIZE, WireError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::device::Placement;
use crate::error::WorkerError;
use crate::links::{self, Routes};
use crate::memory;
use crate::metrics::{Direction, WorkerMetrics};
use crate::model::{ModelSlice, SliceSpec, TensorLoad};
use crate::stage::Stage;

/// What the compute thread is asked to do.
enum Job {
    /// Take over freshly loaded stages (every frame queued before goes to the old ones), and
    /// say so.
    Install(Vec<Stage>, std::sync::mpsc::SyncSender<()>),
    /// Route each stage's output (and input, where NCCL carries it).
    Route(Routes),
    /// A frame from the data plane, and when it arrived.
    Frame(Frame, Instant),
    /// An inbound data-plane connection of the current session broke or stalled: the ring is
    /// broken.
    PeerLost(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    Loading,
    Ready,
    Failed(String),
}

struct Shared {
    phase: Arc<Mutex<Phase>>,
    device: Mutex<String>,
    /// The device the loaded stages run on.
    placement: Mutex<Option<Placement>>,
    stages: Mutex<Vec<u32>>,
    data_address: String,
    jobs: mpsc::Sender<Job>,
    transport: TcpTransport,
    metrics: Arc<WorkerMetrics>,
    /// The data-plane session token of the gateway that loaded this worker.
    session: tokio::sync::watch::Sender<String>,
}

impl Shared {
    fn set_phase(&self, p: Phase) {
        if let Ok(mut g) = self.phase.lock() {
            *g = p;
        }
    }

    /// Marks a ready worker failed (a failure seen while it loads concerns the old stages).
    fn fail_if_ready(phase: &Mutex<Phase>, why: String) {
        if let Ok(mut g) = phase.lock()
            && *g == Phase::Ready
        {
            *g = Phase::Failed(why);
        }
    }

    /// The loaded stages' device (`None` before a load) and its name as the gateway gave it.
    fn device(&self) -> (Option<Placement>, String) {
        let placement = self.placement.lock().ok().and_then(|p| p.clone());
        let name = self.device.lock().map(|d| d.clone()).unwrap_or_default();
        (placement, name)
    }

    fn phase(&self) -> Phase {
        self.phase
            .lock()
            .map(|g| g.clone())
            .unwrap_or(Phase::Failed("state lock poisoned".into()))
    }
}

/// The control-plane service.
pub struct WorkerService {
    shared: Arc<Shared>,
}

/// Addresses a started worker listens on.
#[derive(Debug, Clone)]
pub struct WorkerAddrs {
    pub control: SocketAddr,
    pub data: String,
}

/// Starts the data plane and the compute thread; returns the control-plane service to serve.
///
/// `data_listen` is where to accept data-plane connections; `advertise_host` replaces its host
/// in the address given to peers (needed when listening on 0.0.0.0).
pub async fn start(
    data_listen: &str,
    advertise_host: Option<&str>,
    transport: TcpTransport,
    metrics: Arc<WorkerMetrics>,
) -> Result<(WorkerServer<WorkerService>, String), WorkerError> {
    let listener = transport.bind(data_listen).await?;
    let local = listener.local_addr();
    let data_address = advertised_address(&local, advertise_host);
    // One step is in flight per ring; a short queue bounds what frames can hold in memory.
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(8);
    let compute_metrics = Arc::clone(&metrics);
    let phase = Arc::new(Mutex::new(Phase::Idle));
    let compute_phase = Arc::clone(&phase);
    std::thread::Builder::new()
        .name("strata-compute".into())
        .spawn(move || compute_loop(jobs_rx, &compute_metrics, &compute_phase))
        .map_err(|e| WorkerError::Load(format!("cannot start the compute thread: {e}")))?;
    let (session, session_rx) = tokio::sync::watch::channel(String::new());
    tokio::spawn(accept_frames(
        listener,
        jobs_tx.clone(),
        |r| match r {
            Ok(frame) => Job::Frame(frame, Instant::now()),
            Err(e) => Job::PeerLost(e.to_string()),
        },
        session_rx,
    ));
    let shared = Arc::new(Shared {
        phase,
        device: Mutex::new(String::new()),
        placement: Mutex::new(None),
        stages: Mutex::new(Vec::new()),
        data_address: data_address.clone(),
        jobs: jobs_tx,
        transport,
        metrics,
        session,
    });
    Ok((WorkerServer::new(WorkerService { shared }), data_address))
}

/// Runs frames through the stages, in arrival order. Each step runs in a `stage` span, a child
/// of the span that sent it (the gateway's batch step, or the previous stage), and hands its
/// own context on with the frame it sends.
fn compute_loop(mut jobs: mpsc::Receiver<Job>, metrics: &WorkerMetrics, phase: &Mutex<Phase>) {
    let mut stages: HashMap<u32, Stage> = HashMap::new();
    let mut routes = Routes::default();
    while let Some(job) = jobs.blocking_recv() {
        match job {
            Job::Install(list, done) => {
                stages = list.into_iter().map(|s| (s.index(), s)).collect();
                let _ = done.send(());
            }
            Job::Route(r) => routes = r,
            Job::PeerLost(why) => {
                tracing::error!(error = %why, "data plane: an inbound link broke; this worker's ring is broken");
                Shared::fail_if_ready(phase, format!("data plane: {why}"));
            }
            Job::Frame(frame, arrived) => {
                metrics.frame(Direction::In, frame.wire_len());
                // Steps and errors are addressed to a stage on this worker; its route says where
                // the result (or the error, passed along untouched) goes next.
                let to = match &frame {
                    Frame::Step(s) => s.stage,
                    Frame::Error(e) => e.to,
                    Frame::Samples(_) | Frame::Hello(_) | Frame::Heartbeat => {
                        tracing::warn!(
                            "data plane: a samples or hello frame reached a worker's stages; dropping it"
                        );
                        continue;
                    }
                };
                let Some(out) = routes.next.get(&to) else {
                    tracing::error!(
                        stage = to,
                        "data plane: frame for a stage this worker does not route; dropping it"
                    );
                    continue;
                };
                let next = match frame {
                    Frame::Step(mut step) => {
                        let step_id = step.step_id;
                        let span = tracing::info_span!(
                            "stage",
                            step_id,
                            stage = to,
                            seqs = step.seqs.len(),
                            tokens = step.seqs.iter().map(|s| s.tokens.len()).sum::<usize>(),
                        );
                        strata_shared::telemetry::set_parent(&span, &step.trace);
                        let _entered = span.enter();
                        let started = Instant::now();
                        let shared = step.concurrent > 1;
                        // A hop that fails loses the order of its transfers: the ring must be
                        // rebuilt, with new communicators.
                        let nccl_failed = |e: &WorkerError| {
                            Shared::fail_if_ready(phase, format!("data plane: {e}"));
                        };
                        let result =
                            match stages.get_mut(&to) {
                                Some(s) => routes
                                    .receive(&mut step)
                                    .inspect_err(nccl_failed)
                                    .and_then(|()| {
                                        strata_kernels::pool::install_sharing(shared, || {
                                            s.run(step)
                                        })
                                    }),
                                None => Err(WorkerError::Step(format!(
                                    "stage {to} is not loaded on this worker"
                                ))),
                            };
                        let computed = started.elapsed();
                        metrics.forward(to, computed);
                        let held = arrived.elapsed();
                        let result = result.and_then(|mut next| {
                            match &mut next {
                                Frame::Step(s) => {
                                    s.trace = strata_shared::telemetry::traceparent_of(&span);
                                    s.times = s.times.and(held, computed);
                                }
                                Frame::Samples(s) => s.times = s.times.and(held, computed),
                                Frame::Error(_) | Frame::Hello(_) | Frame::Heartbeat => {}
                            }
                            routes.send(to, &mut next).inspect_err(nccl_failed)?;
                            Ok(next)
                        });
                        result.unwrap_or_else(|e| {
                            tracing::error!(stage = to, step_id, error = %e, "step failed");
                            Frame::Error(ErrorFrame {
                                step_id,
                                stage: to,
                                to: to + 1,
                                message: e.to_string(),
                            })
                        })
                    }
                    Frame::Error(mut e) => {
                        e.to = to + 1;
                        Frame::Error(e)
                    }
                    Frame::Samples(_) | Frame::Hello(_) | Frame::Heartbeat => continue,
                };
                if out.blocking_send(next).is_err() {
                    tracing::error!(stage = to, "data plane: the outbound connection is gone");
                }
            }
        }
    }
}

/// Sends frames queued for one peer over one persistent connection, opened under data-plane
/// session `session`. If the connection breaks while that session is current, the ring is
/// broken: the worker reports itself failed, which the gateway's keeper sees (a link of an
/// earlier session breaking is the old ring going away).
async fn outbound(
    sender: impl FrameSender,
    addr: String,
    session: String,
    rx: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
) {
    // A new session (the ring rebuilt) ends this link even if its peer stopped reading.
    let mut sessions = shared.session.subscribe();
    let sent = tokio::select! {
        r = send_all(sender, &addr, rx, &shared.metrics) => r,
        _ = sessions.wait_for(|s| *s != session) => return,
    };
    if let Err(e) = sent {
        if *shared.session.borrow() != session {
            tracing::debug!(%addr, error = %e, "data plane: a link of an earlier session broke");
            return;
        }
        tracing::error!(%addr, error = %e, "data plane: sending failed; this worker's ring is broken");
        shared.set_phase(Phase::Failed(format!(
            "data plane: sending to the next hop {addr} failed: {e}"
        )));
    }
}

async fn send_all(
    mut sender: impl FrameSender,
    addr: &str,
    mut rx: mpsc::Receiver<Frame>,
    metrics: &WorkerMetrics,
) -> Result<(), WireError> {
    while let Some(frame) = next_or_heartbeat(&mut rx).await {
        if matches!(frame, Frame::Heartbeat) {
            sender.send(&frame).await?;
            continue;
        }
        let started = Instant::now();
        match sender.send(&frame).await {
            Ok(()) => {
                metrics.sent(addr, started.elapsed());
                metrics.frame(Direction::Out, frame.wire_len());
            }
            // A frame over the peer's limit never left: say so down the ring instead.
            Err(e @ WireError::TooLarge { .. }) => {
                let Frame::Step(step) = &frame else {
                    tracing::error!(%addr, error = %e, "data plane: dropping an oversized frame");
                    continue;
                };
                let error = Frame::Error(ErrorFrame {
                    step_id: step.step_id,
                    stage: step.stage.saturating_sub(1),
                    to: step.stage,
                    message: format!("the step's activations cannot be sent to {addr}: {e}"),
                });
                sender.send(&error).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn to_spec(s: &strata_proto::worker::v1::StageSpec) -> Result<SliceSpec, Status> {
    let mut tensors = HashMap::new();
    for t in &s.tensors {
        let isq = if t.isq.is_empty() {
            None
        } else {
            Some(t.isq.parse().map_err(|e| {
                Status::invalid_argument(format!("stage {}: tensor `{}`: {e}", s.index, t.name))
            })?)
        };
        let dtype = if t.dtype.is_empty() {
            None
        } else {
            Some(t.dtype.parse().map_err(|e: String| {
                Status::invalid_argument(format!("stage {}: tensor `{}`: {e}", s.index, t.name))
            })?)
        };
        tensors.insert(
            t.name.clone(),
            TensorLoad {
                source: if t.source.is_empty() {
                    t.name.clone()
                } else {
                    t.source.clone()
                },
                isq,
                dtype,
            },
        );
    }
    Ok(SliceSpec {
        layer_start: s.layer_start as usize,
        layer_end: s.layer_end as usize,
        embed: s.embed,
        head: s.head,
        tensors,
    })
}

fn progress_event(tensor: &str, done: usize, total: usize) -> LoadEvent {
    LoadEvent {
        event: Some(load_event::Event::Progress(LoadProgress {
            tensor: tensor.to_string(),
            done: done as u32,
            total: total as u32,
            rss_bytes: memory::rss().current,
        })),
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type LoadStream = ReceiverStream<Result<LoadEvent, Status>>;

    async fn load(
        &self,
        request: Request<LoadRequest>,
    ) -> Result<Response<Self::LoadStream>, Status> {
        // A child of the gateway's load span, when its call carries a `traceparent`.
        let span = tracing::info_span!("load");
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        strata_shared::telemetry::set_parent(&span, traceparent);
        let req = request.into_inner();
        if req.session.is_empty() {
            return Err(Status::invalid_argument(
                "session: the data-plane session token is required",
            ));
        }
        if req.kv_block_size as usize != KV_BLOCK_SIZE {
            return Err(Status::invalid_argument(format!(
                "kv_block_size: {} tokens, but this worker's KV blocks hold {KV_BLOCK_SIZE}",
                req.kv_block_size
            )));
        }
        {
            // A loaded worker may be loaded again (a restarted gateway): the new stages replace
            // the old ones, and with them every sequence the old gateway left behind.
            let mut phase = self
                .shared
                .phase
                .lock()
                .map_err(|_| Status::internal("state lock poisoned"))?;
            if *phase == Phase::Loading {
                return Err(Status::failed_precondition(
                    "this worker is already loading",
                ));
            }
            *phase = Phase::Loading;
        }
        if req.stages.is_empty() {
            self.shared.set_phase(Phase::Idle);
            return Err(Status::invalid_argument(
                "stages: at least one stage to load",
            ));
        }
        let specs = match req
            .stages
            .iter()
            .map(|s| to_spec(s).map(|spec| (s.index, spec)))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(s) => s,
            Err(e) => {
                self.shared.set_phase(Phase::Idle);
                return Err(e);
            }
        };
        if let Ok(mut d) = self.shared.device.lock() {
            *d = req.device.clone();
        }
        // From now on only the new gateway's connections get in.
        self.shared.session.send_replace(req.session.clone());
        let (tx, rx) = mpsc::channel(64);
        let shared = Arc::clone(&self.shared);
        let kv_blocks = req.kv_blocks.max(1) as usize;
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let started = Instant::now();
            let result = (|| -> Result<(Vec<Stage>, usize, Placement), WorkerError> {
                let revision = (!req.revision.is_empty()).then_some(req.revision.as_str());
                let files = ModelFiles::resolve(&req.model, revision)?;
                let mut meta = ModelMeta::open(files)?;
                // The gateway tokenizes: its vocabulary would only add to this load's peak.
                meta.forget_tokenizer();
                if !req.model_fingerprint.is_empty() {
                    let mine = meta.fingerprint()?;
                    if mine != req.model_fingerprint {
                        return Err(WorkerError::Load(format!(
                            "this worker's copy of `{}` ({}) has fingerprint {mine}, the gateway's has {}: both must load the same model files",
                            req.model,
                            meta.files
                                .weights
                                .first()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                            req.model_fingerprint
                        )));
                    }
                }
                let placement = Placement::open(&req.device)?;
                let mut stages = Vec::new();
                let mut bytes = 0;
                for (index, spec) in &specs {
                    tracing::info!(stage = index, layers = ?(spec.layer_start..spec.layer_end), embed = spec.embed, head = spec.head, "loading stage");
                    let mut last_logged = 0;
                    let slice = ModelSlice::load_on(
                        &meta,
                        spec,
                        &placement,
                        &mut |tensor, done, total| {
                            let _ = tx.blocking_send(Ok(progress_event(tensor, done, total)));
                            if done * 10 / total.max(1) > last_logged || done == total {
                                last_logged = done * 10 / total.max(1);
                                tracing::info!(stage = index, done, total, tensor, "loading");
                            }
                        },
                    )?;
                    bytes += slice.weight_bytes();
                    stages.push(Stage::new(*index, slice, kv_blocks)?);
                }
                Ok((stages, bytes, placement))
            })();
            match result {
                Ok((stages, bytes, placement)) => {
                    let device = placement.describe();
                    let nccl = placement.nccl();
                    let indices: Vec<u32> = stages.iter().map(Stage::index).collect();
                    let mut kv_dtypes: Vec<&str> =
                        stages.iter().map(|s| s.kv().dtype().name()).collect();
                    kv_dtypes.dedup();
                    let kv_cache_dtype = kv_dtypes.join(",");
                    let (installed, done) = std::sync::mpsc::sync_channel(1);
                    // Ready only once the compute thread runs the new stages: a link failure it
                    // reports before then concerns the old ones.
                    if shared
                        .jobs
                        .blocking_send(Job::Install(stages, installed))
                        .is_err()
                        || done.recv().is_err()
                    {
                        shared.set_phase(Phase::Failed("the compute thread is gone".into()));
                        let _ =
                            tx.blocking_send(Err(Status::internal("the compute thread is gone")));
                        return;
                    }
                    if let Ok(mut s) = shared.stages.lock() {
                        *s = indices;
                    }
                    if let Ok(mut p) = shared.placement.lock() {
                        *p = Some(placement);
                    }
                    shared.set_phase(Phase::Ready);
                    shared.metrics.loaded(started.elapsed().as_secs_f64());
                    // The load's transient copies (and any earlier stages) are freed by now.
                    memory::release_idle_pages();
                    memory::fix_heap_thresholds();
                    let rss = memory::rss();
                    tracing::info!(
                        weight_bytes = bytes,
                        rss = rss.current,
                        peak_rss = rss.peak,
                        huge_pages = memory::huge_page_bytes(),
                        seconds = started.elapsed().as_secs_f64(),
                        kv_cache = %kv_cache_dtype,
                        "loaded"
                    );
                    let _ = tx.blocking_send(Ok(LoadEvent {
                        event: Some(load_event::Event::Loaded(Loaded {
                            data_address: shared.data_address.clone(),
                            weight_bytes: bytes as u64,
                            rss_bytes: rss.current,
                            peak_rss_bytes: rss.peak,
                            load_seconds: started.elapsed().as_secs_f64(),
                            kernels: strata_kernels::cpu::summary(),
                            kv_cache_dtype,
                            device_name: device.name,
                            device_memory_bytes: device.memory_bytes,
                            nccl,
                        })),
                    }));
                }
                Err(e) => {
                    tracing::error!(error = %e, "load failed");
                    shared.set_phase(Phase::Failed(e.to_string()));
                    let _ = tx.blocking_send(Err(Status::failed_precondition(format!(
                        "loading failed: {e}"
                    ))));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn link(&self, request: Request<LinkRequest>) -> Result<Response<LinkResponse>, Status> {
        if self.shared.phase() != Phase::Ready {
            return Err(Status::failed_precondition(
                "link before the stages are loaded",
            ));
        }
        let loaded = self
            .shared
            .stages
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let request = request.into_inner();
        // Every check before any effect: a refused request joins no communicator and opens no
        // connection.
        if let Some(hop) = request.hops.iter().find(|h| !loaded.contains(&h.stage)) {
            return Err(Status::invalid_argument(format!(
                "hops: stage {} is not loaded on this worker",
                hop.stage
            )));
        }
        if let Some(inbound) = request
            .nccl_inbound
            .iter()
            .find(|i| !loaded.contains(&i.stage))
        {
            return Err(Status::invalid_argument(format!(
                "nccl_inbound: stage {} is not loaded on this worker",
                inbound.stage
            )));
        }
        if let Some(missing) = loaded
            .iter()
            .find(|&&s| !request.hops.iter().any(|h| h.stage == s))
        {
            return Err(Status::invalid_argument(format!(
                "hops: no next hop for stage {missing}"
            )));
        }
        let (placement, device) = self.shared.device();
        let mut routes = Routes::default();
        // The NCCL hops first: each joins its communicator on a thread of its own, and the
        // other rank joins it when its own worker is linked.
        for inbound in &request.nccl_inbound {
            let link = links::join(
                placement.as_ref(),
                &device,
                inbound.stage,
                &inbound.nccl_id,
                1,
            )
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
            routes.nccl_in.insert(inbound.stage, link);
        }
        for hop in request.hops.iter().filter(|h| !h.nccl_id.is_empty()) {
            let link = links::join(placement.as_ref(), &device, hop.stage, &hop.nccl_id, 0)
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            routes.nccl_out.insert(hop.stage, link);
        }
        let mut by_addr: HashMap<String, mpsc::Sender<Frame>> = HashMap::new();
        for hop in request.hops {
            let tx = match by_addr.get(&hop.address) {
                Some(tx) => tx.clone(),
                None => {
                    let session = self.shared.session.borrow().clone();
                    let sender = hello(&self.shared.transport, &hop.address, &session)
                        .await
                        .map_err(|e| {
                            Status::unavailable(format!(
                                "stage {}: next hop {}: {e}",
                                hop.stage, hop.address
                            ))
                        })?;
                    let (tx, rx) = mpsc::channel(64);
                    tokio::spawn(outbound(
                        sender,
                        hop.address.clone(),
                        session,
                        rx,
                        Arc::clone(&self.shared),
                    ));
                    by_addr.insert(hop.address.clone(), tx.clone());
                    tx
                }
            };
            routes.next.insert(hop.stage, tx);
        }
        self.shared
            .jobs
            .send(Job::Route(routes))
            .await
            .map_err(|_| Status::internal("the compute thread is gone"))?;
        Ok(Response::new(LinkResponse {}))
    }

    async fn nccl_id(
        &self,
        _request: Request<NcclIdRequest>,
    ) -> Result<Response<NcclIdResponse>, Status> {
        if self.shared.phase() != Phase::Ready {
            return Err(Status::failed_precondition(
                "an NCCL id before the stages are loaded",
            ));
        }
        let (placement, device) = self.shared.device();
        let id = links::unique_id(placement.as_ref(), &device)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(NcclIdResponse { id }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let rss = memory::rss();
        let (state, error) = match self.shared.phase() {
            Phase::Idle => (State::Idle, String::new()),
            Phase::Loading => (State::Loading, String::new()),
            Phase::Ready => (State::Ready, String::new()),
            Phase::Failed(e) => (State::Failed, e),
        };
        Ok(Response::new(StatusResponse {
            state: state as i32,
            device: self
                .shared
                .device
                .lock()
                .map(|d| d.clone())
                .unwrap_or_default(),
            stages: self
                .shared
                .stages
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            data_address: self.shared.data_address.clone(),
            rss_bytes: rss.current,
            peak_rss_bytes: rss.peak,
            error,
        }))
    }
}
