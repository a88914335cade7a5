//! The gateway's side of the control plane: reach each worker, have it load its stages (with
//! progress), point every stage at its next hop, and watch the workers afterwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_proto::worker::v1::worker_client::WorkerClient;
use strata_proto::worker::v1::{
    LinkRequest, LoadRequest, NcclIdRequest, NcclInbound, NextHop, StageSpec, State, StatusRequest,
    TensorLoad, load_event,
};
use strata_shared::device::DeviceSpec;
use strata_shared::plan::Plan;
use strata_shared::tls::LinkSecurity;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::error::GatewayError;
use crate::progress::{Progress, ProgressTask};

/// What the gateway knows about one worker.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub device: DeviceSpec,
    /// Control-plane address (`http://host:port`).
    pub address: String,
    pub stages: Vec<u32>,
    pub data_address: String,
    pub state: WorkerState,
    pub weight_bytes: u64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub load_seconds: f64,
    /// The compute kernels the worker picked for its CPU.
    pub kernels: String,
    /// The device's name (a GPU's, or the CPU's model name) and its memory in bytes.
    pub device_name: String,
    pub device_memory_bytes: u64,
    /// What the worker's KV cache stores (`f16`, `f32`).
    pub kv_cache_dtype: String,
    /// Whether it can take part in NCCL hops (a GPU, with the NCCL library).
    pub nccl: bool,
    pub error: String,
}

impl WorkerInfo {
    /// A worker about to load `stages` on `device`, reached at `address`: nothing known yet.
    pub fn loading(device: DeviceSpec, address: String, stages: Vec<u32>) -> Self {
        WorkerInfo {
            device,
            address,
            stages,
            data_address: String::new(),
            state: WorkerState::Loading,
            weight_bytes: 0,
            rss_bytes: 0,
            peak_rss_bytes: 0,
            load_seconds: 0.0,
            kernels: String::new(),
            device_name: String::new(),
            device_memory_bytes: 0,
            kv_cache_dtype: String::new(),
            nccl: false,
            error: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Loading,
    Ready,
    Failed,
}

/// The workers of a served model, shared with the API (ModelInfo) and the keeper.
#[derive(Debug, Clone, Default)]
pub struct Workers {
    inner: Arc<Mutex<Vec<WorkerInfo>>>,
}

impl Workers {
    pub fn snapshot(&self) -> Vec<WorkerInfo> {
        self.inner.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn update(&self, address: &str, f: impl FnOnce(&mut WorkerInfo)) {
        if let Ok(mut g) = self.inner.lock()
            && let Some(w) = g.iter_mut().find(|w| w.address == address)
        {
            f(w);
        }
    }

    /// Replaces what it knows with `infos` (a new load of every worker).
    fn reset(&self, infos: Vec<WorkerInfo>) {
        if let Ok(mut g) = self.inner.lock() {
            *g = infos;
        }
    }

    /// Marks a worker failed.
    pub fn fail(&self, address: &str, why: &str) {
        self.update(address, |w| {
            w.state = WorkerState::Failed;
            w.error = why.to_string();
        });
    }
}

/// A transport error with its causes (tonic's own message is often only "transport error"),
/// each said once.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !out.ends_with(&part) {
            out = format!("{out}: {part}");
        }
        cur = c.source();
    }
    out
}

fn normalize(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// The control-plane endpoint of the worker at `address` (`http://host:port`). Under mutual
/// TLS: https, presenting this gateway's certificate, and the worker's checked against the CA.
fn endpoint(address: &str, links: &LinkSecurity) -> Result<Endpoint, GatewayError> {
    let uri = match links {
        LinkSecurity::Mtls(_) => address.replacen("http://", "https://", 1),
        LinkSecurity::Plaintext => address.to_string(),
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| GatewayError::invalid("--worker", format!("`{address}`: {e}")))?;
    let LinkSecurity::Mtls(tls) = links else {
        return Ok(endpoint);
    };
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    endpoint
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
                .domain_name(tls.server_name_for(address)),
        )
        .map_err(|e| GatewayError::Internal(format!("control-plane TLS for {address}: {e}")))
}

/// Connects to a worker's control plane, retrying until `deadline`.
async fn connect(
    address: &str,
    links: &LinkSecurity,
    deadline: Instant,
) -> Result<WorkerClient<Channel>, GatewayError> {
    let endpoint = endpoint(address, links)?;
    let mut last = String::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        // An address that drops packets must not hold the attempt past the deadline.
        match endpoint.clone().connect_timeout(left).connect().await {
            Ok(channel) => {
                return Ok(WorkerClient::new(channel).max_decoding_message_size(64 << 20));
            }
            Err(e) => last = describe(&e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(GatewayError::Unavailable(format!(
        "worker {address} cannot be reached: {last}"
    )))
}

/// What the workers are to load, and how the ring closes.
#[derive(Debug, Clone, Copy)]
pub struct Deployment<'a> {
    pub plan: &'a Plan,
    /// The data-plane session token every connection must present.
    pub session: &'a str,
    /// The model's fingerprint, which every worker's copy must match.
    pub fingerprint: &'a str,
    /// The model as the user named it; each worker resolves it itself.
    pub model: &'a str,
    pub revision: Option<&'a str>,
    /// Control-plane address of the worker of each device.
    pub addresses: &'a HashMap<DeviceSpec, String>,
    /// KV cache of every stage, in blocks of `kv_block_size` tokens.
    pub kv_blocks: u32,
    pub kv_block_size: u32,
    /// Where the last stage sends its samples.
    pub gateway_data_address: &'a str,
    /// How long workers may take to become reachable.
    pub connect_timeout: Duration,
    /// Mutual TLS on the control plane, or plaintext.
    pub links: &'a LinkSecurity,
    /// Activations between GPU workers over NCCL where both can (otherwise every hop is TCP).
    pub nccl: bool,
}

/// What a worker needs to load route stage `index` of `plan`.
pub fn stage_spec(plan: &Plan, index: usize) -> Option<StageSpec> {
    let s = plan.route.get(index)?;
    Some(StageSpec {
        index: s.index as u32,
        layer_start: s.layer_start as u32,
        layer_end: s.layer_end as u32,
        embed: s.embed,
        head: s.head,
        tensors: plan
            .stage_tensors(s.index)
            .map(|t| TensorLoad {
                name: t.name.clone(),
                source: t.source.clone(),
                isq: t.isq.map(|q| q.to_string()).unwrap_or_default(),
                dtype: t.dtype.map(|d| d.name().to_string()).unwrap_or_default(),
            })
            .collect(),
    })
}

/// Loads every stage of the plan on the worker that owns its device, all workers at once, and
/// links the ring; `workers` follows their states. Any failure names the worker and stops
/// everything. A worker loaded before (the ring is being rebuilt) drops what it held.
pub async fn load_and_link(d: &Deployment<'_>, workers: &Workers) -> Result<(), GatewayError> {
    let Deployment {
        plan,
        session,
        fingerprint,
        model,
        revision,
        addresses,
        kv_blocks,
        kv_block_size,
        gateway_data_address,
        connect_timeout,
        links,
        nccl,
    } = *d;
    let mut infos = Vec::new();
    for device in &plan.devices {
        let address = addresses.get(device).map(|a| normalize(a)).ok_or_else(|| {
            GatewayError::FailedPrecondition(format!(
                "no worker address for device {device} of the topology"
            ))
        })?;
        let stages = plan
            .route
            .iter()
            .filter(|s| s.device == *device)
            .map(|s| s.index as u32)
            .collect();
        infos.push(WorkerInfo::loading(*device, address, stages));
    }
    workers.reset(infos.clone());
    let deadline = Instant::now() + connect_timeout;
    // One progress bar per worker on a terminal; log lines otherwise.
    let progress = Progress::new();
    let mut tasks = JoinSet::new();
    for info in infos {
        let mut task = progress.task(info.device.to_string());
        let req = LoadRequest {
            model: model.to_string(),
            revision: revision.unwrap_or_default().to_string(),
            device: info.device.to_string(),
            stages: info
                .stages
                .iter()
                .filter_map(|&i| stage_spec(plan, i as usize))
                .collect(),
            kv_blocks,
            kv_block_size,
            session: session.to_string(),
            model_fingerprint: fingerprint.to_string(),
        };
        let workers = workers.clone();
        let links = links.clone();
        tasks.spawn(async move {
            let address = info.address.clone();
            let result = load_one(&info, req, &links, deadline, &workers, &mut task).await;
            drop(task);
            if let Err(e) = &result {
                workers.fail(&address, &e.to_string());
            }
            result
        });
    }
    // The first failure ends startup at once; the other loads are abandoned.
    let mut clients = HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (address, client) =
            joined.map_err(|e| GatewayError::Internal(format!("load task: {e}")))??;
        clients.insert(address, client);
    }
    // Link: each stage sends to the worker of the next stage, the last one to the gateway.
    let snapshot = workers.snapshot();
    let data_of = |stage: usize| -> Option<String> {
        let device = plan.route.get(stage)?.device;
        snapshot
            .iter()
            .find(|w| w.device == device)
            .map(|w| w.data_address.clone())
    };
    // NCCL hops: a unique id from each one's sending worker, for both ends.
    let mut nccl_ids: HashMap<u32, Vec<u8>> = HashMap::new();
    let hops = if nccl {
        nccl_hops(plan, &snapshot)
    } else {
        Vec::new()
    };
    for stage in hops {
        let sender = snapshot
            .iter()
            .find(|w| w.stages.contains(&stage))
            .ok_or_else(|| GatewayError::Internal(format!("no worker runs stage {stage}")))?;
        let client = clients
            .get_mut(&sender.address)
            .ok_or_else(|| GatewayError::Internal(format!("no client for {}", sender.address)))?;
        let id = client.nccl_id(NcclIdRequest {}).await.map_err(|s| {
            GatewayError::Unavailable(format!(
                "worker {} ({}) could not open an NCCL hop from stage {stage}: {}",
                sender.address,
                sender.device,
                s.message()
            ))
        })?;
        tracing::info!(from = stage, to = stage + 1, "stage hop over NCCL");
        nccl_ids.insert(stage, id.into_inner().id);
    }
    for w in &snapshot {
        let hops = w
            .stages
            .iter()
            .map(|&s| NextHop {
                stage: s,
                address: data_of(s as usize + 1)
                    .unwrap_or_else(|| gateway_data_address.to_string()),
                nccl_id: nccl_ids.get(&s).cloned().unwrap_or_default(),
            })
            .collect();
        let nccl_inbound = w
            .stages
            .iter()
            .filter_map(|&s| {
                let id = nccl_ids.get(&s.checked_sub(1)?)?;
                Some(NcclInbound {
                    stage: s,
                    nccl_id: id.clone(),
                })
            })
            .collect();
        let client = clients
            .get_mut(&w.address)
            .ok_or_else(|| GatewayError::Internal(format!("no client for {}", w.address)))?;
        let request = LinkRequest { hops, nccl_inbound };
        client.link(request).await.map_err(|s| {
            GatewayError::Unavailable(format!(
                "worker {} ({}) could not link its stages: {}",
                w.address,
                w.device,
                s.message()
            ))
        })?;
    }
    Ok(())
}

/// The route stages whose activations go to the next stage over NCCL: both stages on GPUs of
/// different workers that can each take part in NCCL hops. Every other hop is TCP, so a route
/// may mix CPU and GPU stages.
pub fn nccl_hops(plan: &Plan, workers: &[WorkerInfo]) -> Vec<u32> {
    let nccl_worker = |stage: usize| {
        let device = plan.route.get(stage)?.device;
        let w = workers.iter().find(|w| w.device == device)?;
        (matches!(device, DeviceSpec::Cuda(_)) && w.nccl).then_some(device)
    };
    (0..plan.route.len())
        .filter(|&s| match (nccl_worker(s), nccl_worker(s + 1)) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        })
        .map(|s| s as u32)
        .collect()
}

async fn load_one(
    info: &WorkerInfo,
    req: LoadRequest,
    links: &LinkSecurity,
    deadline: Instant,
    workers: &Workers,
    progress: &mut ProgressTask,
) -> Result<(String, WorkerClient<Channel>), GatewayError> {
    let who = format!("worker {} ({})", info.address, info.device);
    let mut client = connect(&info.address, links, deadline).await?;
    // The worker's load span joins this one's trace (W3C context in the call's metadata).
    let span = tracing::info_span!("load", worker = %info.address, device = %info.device);
    let mut request = tonic::Request::new(req);
    if let Ok(v) = strata_shared::telemetry::traceparent_of(&span).parse() {
        request.metadata_mut().insert("traceparent", v);
    }
    let mut stream = client
        .load(request)
        .await
        .map_err(|s| GatewayError::Unavailable(format!("{who} refused to load: {}", s.message())))?
        .into_inner();
    loop {
        let event = stream.message().await.map_err(|s| {
            GatewayError::Unavailable(format!("{who} failed to load: {}", s.message()))
        })?;
        match event.and_then(|e| e.event) {
            Some(load_event::Event::Progress(p)) => {
                progress.update(p.done as usize, p.total as usize, &p.tensor);
            }
            Some(load_event::Event::Loaded(l)) => {
                tracing::info!(worker = %info.address, device = %info.device, data = %l.data_address, weight_bytes = l.weight_bytes, seconds = l.load_seconds, kernels = %l.kernels, device_name = %l.device_name, device_memory = l.device_memory_bytes, kv_cache = %l.kv_cache_dtype, "worker loaded");
                workers.update(&info.address, |w| {
                    w.state = WorkerState::Ready;
                    w.data_address = l.data_address.clone();
                    w.weight_bytes = l.weight_bytes;
                    w.rss_bytes = l.rss_bytes;
                    w.peak_rss_bytes = l.peak_rss_bytes;
                    w.load_seconds = l.load_seconds;
                    w.kernels = l.kernels.clone();
                    w.device_name = l.device_name.clone();
                    w.device_memory_bytes = l.device_memory_bytes;
                    w.kv_cache_dtype = l.kv_cache_dtype.clone();
                    w.nccl = l.nccl;
                });
                return Ok((info.address.clone(), client));
            }
            None => {
                return Err(GatewayError::Unavailable(format!(
                    "{who} ended its load stream before loading"
                )));
            }
        }
    }
}

/// Polls every worker's status once (each call within `timeout`); the first one that stops
/// answering or reports a failure is published on `failures` and marked failed. `clients` keeps
/// the control-plane connections between polls.
pub async fn poll_once(
    workers: &Workers,
    clients: &mut HashMap<String, WorkerClient<Channel>>,
    links: &LinkSecurity,
    failures: &watch::Sender<Option<String>>,
    timeout: Duration,
) {
    for w in workers.snapshot() {
        if w.state != WorkerState::Ready {
            continue;
        }
        let client = match clients.get_mut(&w.address) {
            Some(c) => c,
            None => match tokio::time::timeout(timeout, async {
                let channel = endpoint(&w.address, links)
                    .map_err(|e| e.to_string())?
                    .connect()
                    .await
                    .map_err(|e| describe(&e))?;
                Ok::<_, String>(WorkerClient::new(channel))
            })
            .await
            {
                Ok(Ok(c)) => clients.entry(w.address.clone()).or_insert(c),
                Ok(Err(e)) => {
                    report(workers, failures, &w, &format!("unreachable: {e}"));
                    continue;
                }
                Err(_) => {
                    report(workers, failures, &w, "unreachable: connecting timed out");
                    continue;
                }
            },
        };
        match tokio::time::timeout(timeout, client.status(StatusRequest {})).await {
            Ok(Ok(s)) => {
                let s = s.into_inner();
                if s.state == State::Failed as i32 {
                    report(workers, failures, &w, &s.error);
                } else {
                    workers.update(&w.address, |i| {
                        i.rss_bytes = s.rss_bytes;
                        i.peak_rss_bytes = s.peak_rss_bytes;
                    });
                }
            }
            Ok(Err(e)) => report(
                workers,
                failures,
                &w,
                &format!("status failed: {}", e.message()),
            ),
            Err(_) => report(workers, failures, &w, "status timed out"),
        }
    }
}

fn report(workers: &Workers, failures: &watch::Sender<Option<String>>, w: &WorkerInfo, why: &str) {
    let msg = format!("worker {} ({}) failed: {why}", w.address, w.device);
    tracing::error!("{msg}");
    workers.fail(&w.address, why);
    crate::keeper::report_failure(failures, &msg);
}

#[cfg(test)]
mod tests {
    use strata_shared::plan::StagePlan;

    use super::*;

    /// A plan whose stage `i` runs on `devices[i]`, and the workers of its devices, those in
    /// `nccl` able to take part in NCCL hops.
    fn route(devices: &[DeviceSpec], nccl: &[DeviceSpec]) -> (Plan, Vec<WorkerInfo>) {
        let route = devices
            .iter()
            .enumerate()
            .map(|(index, &device)| StagePlan {
                index,
                device,
                layer_start: index,
                layer_end: index + 1,
                embed: index == 0,
                head: index + 1 == devices.len(),
            })
            .collect();
        let mut distinct: Vec<DeviceSpec> = Vec::new();
        for d in devices {
            if !distinct.contains(d) {
                distinct.push(*d);
            }
        }
        let workers = distinct
            .iter()
            .map(|&device| {
                let stages = (0..devices.len() as u32)
                    .filter(|&s| devices[s as usize] == device)
                    .collect();
                WorkerInfo {
                    state: WorkerState::Ready,
                    nccl: nccl.contains(&device),
                    ..WorkerInfo::loading(device, format!("http://{device}"), stages)
                }
            })
            .collect();
        let plan = Plan {
            tensors: Vec::new(),
            route,
            devices: distinct,
        };
        (plan, workers)
    }

    #[test]
    fn nccl_carries_the_hops_between_gpus_that_both_have_it() {
        use DeviceSpec::{Cpu, Cuda};
        let all = [Cuda(0), Cuda(1), Cuda(2)];
        // GPU to GPU: NCCL; the last stage answers the gateway over TCP.
        let (plan, w) = route(&[Cuda(0), Cuda(1)], &all);
        assert_eq!(nccl_hops(&plan, &w), vec![0]);
        // A mixed route: only the hop between the two GPUs.
        let (plan, w) = route(&[Cpu(0), Cuda(0), Cuda(1), Cpu(0)], &all);
        assert_eq!(nccl_hops(&plan, &w), vec![1]);
        // A GPU whose worker cannot load NCCL keeps its hops on TCP.
        let (plan, w) = route(&[Cuda(0), Cuda(1), Cuda(2)], &[Cuda(0), Cuda(2)]);
        assert!(nccl_hops(&plan, &w).is_empty());
        // CPU stages never, and a worker's stages on one device never to itself.
        let (plan, w) = route(&[Cpu(0), Cpu(1)], &all);
        assert!(nccl_hops(&plan, &w).is_empty());
        let (plan, w) = route(&[Cuda(0), Cuda(1), Cuda(0)], &all);
        assert_eq!(nccl_hops(&plan, &w), vec![0, 1]);
    }
}
