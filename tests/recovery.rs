//! A worker that dies loses no stream: the gateway restarts it, rebuilds the ring under a new
//! session, recomputes every sequence from its tokens so far and resumes the streams, each with
//! exactly the tokens and log-probabilities of a fault-free run. Checked with `kill -9` of the
//! worker of the first stage, of a middle one and of the last, over a route of three workers
//! that revisits one of them, under 16 concurrent greedy and seeded streams; and with a link
//! between two remote workers that stalls (a proxy in the test stops forwarding), which the
//! heartbeat deadline catches.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use strata_proto::v1::strata_client::StrataClient;
use strata_proto::v1::{GenerateRequest, ModelInfoRequest, generate_response};
use support::{Server, Worker, idle_info, prompts, token_request, topology_file};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// (token id, log-probability) per generated token.
type Output = Vec<(u32, f32)>;

/// 16 requests: the golden prompts greedy and seeded, and prompts of other lengths.
fn requests() -> Vec<GenerateRequest> {
    let golden = prompts();
    let long: Vec<u32> = golden.iter().flat_map(|p| p.prompt_ids.clone()).collect();
    let mut out = Vec::new();
    for (i, p) in golden.iter().enumerate() {
        out.push(token_request(&p.prompt_ids, 32, None));
        out.push(token_request(&p.prompt_ids, 32, Some(7 + i as u64)));
    }
    let mut i = 0;
    while out.len() < 16 {
        let ids: Vec<u32> = long
            .iter()
            .cycle()
            .skip(i * 7)
            .take(5 + i * 13)
            .copied()
            .collect();
        out.push(token_request(
            &ids,
            24 + i as u32,
            (i % 2 == 1).then_some(100 + i as u64),
        ));
        i += 1;
    }
    out
}

/// Runs every request at once; `received` counts the tokens that arrive, over all streams.
async fn run_all(
    client: &StrataClient<Channel>,
    reqs: &[GenerateRequest],
    received: Arc<AtomicUsize>,
) -> Vec<Result<Output, tonic::Status>> {
    let tasks: Vec<_> = reqs
        .iter()
        .map(|r| {
            let mut c = client.clone();
            let r = r.clone();
            let received = Arc::clone(&received);
            tokio::spawn(async move {
                let mut stream = c.generate(r).await?.into_inner();
                let mut out = Vec::new();
                while let Some(msg) = stream.message().await? {
                    if let Some(generate_response::Event::Token(t)) = msg.event {
                        out.push((t.id, t.logprob.expect("logprobs requested")));
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(out)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// Checks that every run gave exactly the fault-free tokens and log-probabilities.
fn same_as_fault_free(
    outputs: &[Result<Output, tonic::Status>],
    fault_free: &[Output],
    what: &str,
    log: impl Fn() -> String,
) {
    for (i, (got, want)) in outputs.iter().zip(fault_free).enumerate() {
        let got = got
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i} failed after {what}: {e:?}\n{}", log()));
        assert_eq!(
            got.iter().map(|t| t.0).collect::<Vec<_>>(),
            want.iter().map(|t| t.0).collect::<Vec<_>>(),
            "request {i}: tokens differ from the fault-free run after {what}"
        );
        for (j, (a, b)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                a.1.to_bits(),
                b.1.to_bits(),
                "request {i}, token {j}: log-probability {} against {} fault-free",
                a.1,
                b.1
            );
        }
    }
}

/// Runs `reqs` at once and calls `fault` once a quarter of their tokens are out; returns the
/// outputs (within 180 s, or panics with `log`).
async fn run_with_fault(
    client: &StrataClient<Channel>,
    reqs: &[GenerateRequest],
    fault: impl FnOnce(),
    log: impl Fn() -> String,
) -> Vec<Result<Output, tonic::Status>> {
    let total: usize = reqs
        .iter()
        .map(|r| r.parameters.as_ref().and_then(|p| p.max_tokens).unwrap() as usize)
        .sum();
    let received = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn({
        let client = client.clone();
        let reqs = reqs.to_vec();
        let received = Arc::clone(&received);
        async move { run_all(&client, &reqs, received).await }
    });
    while received.load(Ordering::SeqCst) < total / 4 && !run.is_finished() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fault();
    let outputs = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .unwrap_or_else(|_| panic!("streams stalled after the fault:\n{}", log()))
        .expect("run");
    let failed: Vec<String> = outputs
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.as_ref().err().map(|e| format!("request {i}: {e:?}")))
        .collect();
    assert!(
        failed.is_empty(),
        "streams failed after the fault:\n{}\n{}",
        failed.join("\n"),
        log()
    );
    assert_eq!(
        received.load(Ordering::SeqCst),
        total,
        "every token arrived\n{}",
        log()
    );
    outputs
}

/// The pid of the worker process now serving `device`, from the gateway's log ("worker
/// started" lines, the latest one per device).
fn worker_pid(server: &Server, device: &str) -> u32 {
    server
        .log()
        .lines()
        .rev()
        .filter(|l| l.contains("worker started") && l.contains(&format!("device={device}")))
        .filter_map(|l| {
            l.split("pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .next()
        .unwrap_or_else(|| panic!("no worker started for {device}:\n{}", server.log()))
}

/// Whether health is SERVING overall and for `liveness`.
async fn serving(server: &Server) -> bool {
    let mut health = support::health_client(&server.addr).await;
    for service in ["", "liveness"] {
        if support::health_status(&mut health, service).await != Some(ServingStatus::Serving as i32)
        {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_first_a_middle_or_the_last_worker_mid_stream_changes_no_token() {
    // Four stages on three workers; cpu[0] runs the first stage and, again, the third.
    let (_dir, topology) = topology_file(
        "0-8:\n  device: cpu[0]\n8-16:\n  device: cpu[1]\n16-23:\n  device: cpu[0]\n23-30:\n  device: cpu[2]\n",
    );
    let server = Server::start(&["serve", "--topology", topology.to_str().unwrap()])
        .unwrap_or_else(|log| panic!("server failed: {log}"));
    let mut client = server.client().await;
    let reqs = requests();
    let fault_free: Vec<Output> = run_all(&client, &reqs, Arc::default())
        .await
        .into_iter()
        .map(|r| r.expect("a fault-free run"))
        .collect();

    for (kills, victim) in [(1, "cpu[0]"), (2, "cpu[1]"), (3, "cpu[2]")] {
        let pid = worker_pid(&server, victim);
        let outputs = run_with_fault(
            &client,
            &reqs,
            || support::signal("-KILL", &pid.to_string()),
            || server.log(),
        )
        .await;
        same_as_fault_free(
            &outputs,
            &fault_free,
            &format!("{victim} was killed"),
            || server.log(),
        );
        let info = idle_info(&mut client).await;
        let counters = info.scheduler.expect("scheduler counters");
        assert_eq!(counters.ring_rebuilds, kills, "{counters:?}");
        assert!(counters.requeued_sequences > 0, "{counters:?}");
        assert_eq!(
            (info.running, info.waiting, info.kv_cache_reserved_tokens),
            (0, 0, 0),
            "every block back once all is done: {info:?}"
        );
        assert_ne!(worker_pid(&server, victim), pid, "{victim} was restarted");
        assert!(serving(&server).await, "SERVING again after the rebuild");
    }
    let log = server.log();
    assert!(log.contains("rebuilding the ring"), "{log}");
}

/// A TCP proxy whose connections, once [`StallingProxy::stall`] is called, stop forwarding in
/// both directions but stay open: a stalled link, as a dead router or a frozen peer leaves it.
/// Connections made after the stall forward again.
struct StallingProxy {
    accepted: Arc<AtomicUsize>,
    stalled_below: Arc<AtomicUsize>,
}

impl StallingProxy {
    async fn start(listen: &str, target: &str) -> StallingProxy {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .expect("proxy bind");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stalled_below = Arc::new(AtomicUsize::new(0));
        let (count, stalled) = (Arc::clone(&accepted), Arc::clone(&stalled_below));
        let target = target.to_string();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(forward(ri, wo, n, Arc::clone(&stalled)));
                tokio::spawn(forward(ro, wi, n, Arc::clone(&stalled)));
            }
        });
        StallingProxy {
            accepted,
            stalled_below,
        }
    }

    /// Every connection open now stops forwarding.
    fn stall(&self) {
        self.stalled_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: usize,
    stalled_below: Arc<AtomicUsize>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let read = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if n < stalled_below.load(Ordering::SeqCst) {
            // Hold both ends open and forward nothing, ever.
            let _held = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..read]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_link_between_two_workers_is_caught_by_its_heartbeat_deadline_and_the_streams_finish()
 {
    // Worker B listens on 127.0.0.1 but advertises 127.0.0.2, where the proxy listens: worker
    // A's link to B goes through the proxy.
    let a = Worker::start(&[], &[]);
    let b = Worker::start(&["--advertise-host", "127.0.0.2"], &[]);
    let port = b.data.rsplit_once(':').expect("host:port").1;
    let proxy = StallingProxy::start(&b.data, &format!("127.0.0.1:{port}")).await;
    let (_dir, topology) = topology_file("0-15:\n  device: cpu[0]\n15-30:\n  device: cpu[1]\n");
    let server = Server::start(&[
        "gateway",
        "--topology",
        topology.to_str().unwrap(),
        "--worker",
        &format!("cpu[0]={}", a.control),
        "--worker",
        &format!("cpu[1]={}", b.control),
        // Far beyond the heartbeat deadline: the stall must not wait for it.
        "--step-timeout-secs",
        "600",
        "--data-listen",
        "127.0.0.1:0",
    ])
    .unwrap_or_else(|log| panic!("gateway failed: {log}"));
    let client = server.client().await;
    let reqs: Vec<GenerateRequest> = requests().into_iter().take(8).collect();
    let fault_free: Vec<Output> = run_all(&client, &reqs, Arc::default())
        .await
        .into_iter()
        .map(|r| r.expect("a fault-free run"))
        .collect();
    let outputs = run_with_fault(&client, &reqs, || proxy.stall(), || server.log()).await;
    same_as_fault_free(&outputs, &fault_free, "the link stalled", || server.log());
    let info = client
        .clone()
        .model_info(ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let counters = info.scheduler.expect("scheduler counters");
    assert_eq!(counters.ring_rebuilds, 1, "{counters:?}");
    let log = server.log();
    assert!(
        log.contains("the link stalled"),
        "caught by the heartbeat deadline:\n{log}"
    );
    assert!(serving(&server).await, "SERVING again after the rebuild");
}
