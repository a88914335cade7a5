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
    LinkRequest, LinkResponse, LoadEvent, LoadProgress, LoadRequest, Loaded, State, StatusRequest,
    StatusResponse, load_event,
};
use strata_shared::meta::ModelMeta;
use strata_shared::source::ModelFiles;
use strata_shared::transport::{
    FrameListener, FrameReceiver, FrameSender, TcpTransport, Transport,
};
use strata_shared::wire::{ErrorFrame, Frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::WorkerError;
use crate::memory;
use crate::model::{ModelSlice, SliceSpec, TensorLoad};
use crate::stage::Stage;

/// What the compute thread is asked to do.
enum Job {
    /// Take over freshly loaded stages.
    Install(Vec<Stage>),
    /// Route each stage's output: stage index → outbound queue.
    Route(HashMap<u32, mpsc::Sender<Frame>>),
    /// A frame from the data plane.
    Frame(Frame),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    Loading,
    Ready,
    Failed(String),
}

struct Shared {
    phase: Mutex<Phase>,
    device: Mutex<String>,
    stages: Mutex<Vec<u32>>,
    data_address: String,
    jobs: mpsc::Sender<Job>,
    transport: TcpTransport,
}

impl Shared {
    fn set_phase(&self, p: Phase) {
        if let Ok(mut g) = self.phase.lock() {
            *g = p;
        }
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
) -> Result<(WorkerServer<WorkerService>, String), WorkerError> {
    let listener = transport.bind(data_listen).await?;
    let local = listener.local_addr();
    let data_address = match (advertise_host, local.rsplit_once(':')) {
        (Some(host), Some((_, port))) => format!("{host}:{port}"),
        _ => local.clone(),
    };
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(256);
    std::thread::Builder::new()
        .name("strata-compute".into())
        .spawn(move || compute_loop(jobs_rx))
        .map_err(|e| WorkerError::Load(format!("cannot start the compute thread: {e}")))?;
    tokio::spawn(accept_loop(listener, jobs_tx.clone()));
    let shared = Arc::new(Shared {
        phase: Mutex::new(Phase::Idle),
        device: Mutex::new(String::new()),
        stages: Mutex::new(Vec::new()),
        data_address: data_address.clone(),
        jobs: jobs_tx,
        transport,
    });
    Ok((WorkerServer::new(WorkerService { shared }), data_address))
}

async fn accept_loop<L: FrameListener>(mut listener: L, jobs: mpsc::Sender<Job>) {
    loop {
        match listener.accept().await {
            Ok((mut rx, peer)) => {
                tracing::debug!(%peer, "data plane: inbound connection");
                let jobs = jobs.clone();
                tokio::spawn(async move {
                    loop {
                        match rx.recv().await {
                            Ok(Some(frame)) => {
                                if jobs.send(Job::Frame(frame)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => return,
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "data plane: dropping connection");
                                return;
                            }
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "data plane: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs frames through the stages, in arrival order.
fn compute_loop(mut jobs: mpsc::Receiver<Job>) {
    let mut stages: HashMap<u32, Stage> = HashMap::new();
    let mut routes: HashMap<u32, mpsc::Sender<Frame>> = HashMap::new();
    while let Some(job) = jobs.blocking_recv() {
        match job {
            Job::Install(list) => {
                stages = list.into_iter().map(|s| (s.index(), s)).collect();
            }
            Job::Route(r) => routes = r,
            Job::Frame(frame) => {
                let stage = match &frame {
                    Frame::Step(s) => s.stage,
                    Frame::Error(e) => e.stage,
                    Frame::Samples(_) => {
                        tracing::warn!("data plane: a samples frame reached a worker; dropping it");
                        continue;
                    }
                };
                let Some(out) = routes.get(&stage) else {
                    tracing::error!(
                        stage,
                        "data plane: frame for a stage this worker does not route; dropping it"
                    );
                    continue;
                };
                let next = match frame {
                    Frame::Step(step) => {
                        let step_id = step.step_id;
                        match stages.get_mut(&stage) {
                            Some(s) => match s.run(step) {
                                Ok(f) => f,
                                Err(e) => {
                                    tracing::error!(stage, step_id, error = %e, "step failed");
                                    Frame::Error(ErrorFrame {
                                        step_id,
                                        stage,
                                        message: e.to_string(),
                                    })
                                }
                            },
                            None => Frame::Error(ErrorFrame {
                                step_id,
                                stage,
                                message: format!("stage {stage} is not loaded on this worker"),
                            }),
                        }
                    }
                    // Errors travel on to the gateway untouched.
                    other => other,
                };
                if out.blocking_send(next).is_err() {
                    tracing::error!(stage, "data plane: the outbound connection is gone");
                }
            }
        }
    }
}

/// Sends frames queued for one peer over one persistent connection.
async fn outbound(mut sender: impl FrameSender, addr: String, mut rx: mpsc::Receiver<Frame>) {
    while let Some(frame) = rx.recv().await {
        if let Err(e) = sender.send(&frame).await {
            tracing::error!(%addr, error = %e, "data plane: sending failed");
            return;
        }
    }
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
        let req = request.into_inner();
        {
            let mut phase = self
                .shared
                .phase
                .lock()
                .map_err(|_| Status::internal("state lock poisoned"))?;
            match &*phase {
                Phase::Idle | Phase::Failed(_) => *phase = Phase::Loading,
                other => {
                    return Err(Status::failed_precondition(format!(
                        "this worker is already {}",
                        if *other == Phase::Loading {
                            "loading"
                        } else {
                            "loaded"
                        }
                    )));
                }
            }
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
        let (tx, rx) = mpsc::channel(64);
        let shared = Arc::clone(&self.shared);
        let kv_blocks = req.kv_blocks.max(1) as usize;
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = (|| -> Result<(Vec<Stage>, usize), WorkerError> {
                let revision = (!req.revision.is_empty()).then_some(req.revision.as_str());
                let files = ModelFiles::resolve(&req.model, revision)?;
                let meta = ModelMeta::open(files)?;
                let mut stages = Vec::new();
                let mut bytes = 0;
                for (index, spec) in &specs {
                    tracing::info!(stage = index, layers = ?(spec.layer_start..spec.layer_end), embed = spec.embed, head = spec.head, "loading stage");
                    let mut last_logged = 0;
                    let slice = ModelSlice::load(&meta, spec, &mut |tensor, done, total| {
                        let _ = tx.blocking_send(Ok(progress_event(tensor, done, total)));
                        if done * 10 / total.max(1) > last_logged || done == total {
                            last_logged = done * 10 / total.max(1);
                            tracing::info!(stage = index, done, total, tensor, "loading");
                        }
                    })?;
                    bytes += slice.weight_bytes();
                    stages.push(Stage::new(*index, slice, kv_blocks)?);
                }
                Ok((stages, bytes))
            })();
            match result {
                Ok((stages, bytes)) => {
                    let indices: Vec<u32> = stages.iter().map(Stage::index).collect();
                    if shared.jobs.blocking_send(Job::Install(stages)).is_err() {
                        shared.set_phase(Phase::Failed("the compute thread is gone".into()));
                        let _ =
                            tx.blocking_send(Err(Status::internal("the compute thread is gone")));
                        return;
                    }
                    if let Ok(mut s) = shared.stages.lock() {
                        *s = indices;
                    }
                    shared.set_phase(Phase::Ready);
                    let rss = memory::rss();
                    tracing::info!(
                        weight_bytes = bytes,
                        rss = rss.current,
                        peak_rss = rss.peak,
                        seconds = started.elapsed().as_secs_f64(),
                        "loaded"
                    );
                    let _ = tx.blocking_send(Ok(LoadEvent {
                        event: Some(load_event::Event::Loaded(Loaded {
                            data_address: shared.data_address.clone(),
                            weight_bytes: bytes as u64,
                            rss_bytes: rss.current,
                            peak_rss_bytes: rss.peak,
                            load_seconds: started.elapsed().as_secs_f64(),
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
        let mut by_addr: HashMap<String, mpsc::Sender<Frame>> = HashMap::new();
        let mut routes = HashMap::new();
        for hop in request.into_inner().hops {
            if !loaded.contains(&hop.stage) {
                return Err(Status::invalid_argument(format!(
                    "hops: stage {} is not loaded on this worker",
                    hop.stage
                )));
            }
            let tx = match by_addr.get(&hop.address) {
                Some(tx) => tx.clone(),
                None => {
                    let sender =
                        self.shared
                            .transport
                            .connect(&hop.address)
                            .await
                            .map_err(|e| {
                                Status::unavailable(format!(
                                    "stage {}: next hop {}: {e}",
                                    hop.stage, hop.address
                                ))
                            })?;
                    let (tx, rx) = mpsc::channel(64);
                    tokio::spawn(outbound(sender, hop.address.clone(), rx));
                    by_addr.insert(hop.address.clone(), tx.clone());
                    tx
                }
            };
            routes.insert(hop.stage, tx);
        }
        if let Some(missing) = loaded.iter().find(|s| !routes.contains_key(s)) {
            return Err(Status::invalid_argument(format!(
                "hops: no next hop for stage {missing}"
            )));
        }
        self.shared
            .jobs
            .send(Job::Route(routes))
            .await
            .map_err(|_| Status::internal("the compute thread is gone"))?;
        Ok(Response::new(LinkResponse {}))
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
