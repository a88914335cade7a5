//! The service's life around its worker processes: Ctrl-C ends every stream as cancelled and
//! stops every worker; SIGTERM drains (the streams in flight finish, new requests are refused,
//! health turns NOT_SERVING) and then stops; with recovery off (`--recovery-secs 0`), a worker
//! that dies turns the service NOT_SERVING and fails requests with UNAVAILABLE naming it (with
//! recovery on, `tests/recovery.rs`, the ring is rebuilt and no stream is lost); a client that
//! leaves frees its KV cache on every worker of the ring.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use strata_proto::v1::strata_client::StrataClient;
use strata_proto::v1::{
    FinishReason, GenerateResponse, ModelInfoRequest, ModelInfoResponse, WorkerState,
    generate_response,
};
use strata_shared::wire::{Frame, HelloFrame, SamplesFrame};
use support::{Server, Worker, alive, generate, long_story};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Serves `args`, starts a long generation and reads `tokens` of it.
async fn serve_and_stream(
    args: &[&str],
    max_tokens: u32,
    tokens: usize,
) -> (
    Server,
    StrataClient<Channel>,
    tonic::Streaming<GenerateResponse>,
) {
    let server = Server::start(args).unwrap_or_else(|log| panic!("server failed: {log}"));
    let mut client = server.client().await;
    let mut stream = client
        .generate(long_story(max_tokens))
        .await
        .expect("generate")
        .into_inner();
    for _ in 0..tokens {
        stream.message().await.expect("token").expect("stream open");
    }
    (server, client, stream)
}

/// Polls `check` every 100 ms until it holds or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Polls ModelInfo until `check` holds of it or `limit` passes.
async fn info_until(
    client: &StrataClient<Channel>,
    limit: Duration,
    check: impl Fn(&ModelInfoResponse) -> bool,
) -> bool {
    let check = &check;
    eventually(limit, || {
        let mut client = client.clone();
        async move {
            let info = client
                .model_info(ModelInfoRequest {})
                .await
                .expect("info")
                .into_inner();
            check(&info)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_streams_and_stops_every_worker() {
    let (mut server, _client, mut stream) = serve_and_stream(&["serve"], 500, 2).await;
    let workers = server.children();
    assert_eq!(workers.len(), 2, "the default topology runs two workers");

    // Ctrl-C in a terminal signals the whole foreground group; only the gateway must act on it.
    server.interrupt_group();
    let mut finished = None;
    while let Some(msg) = stream.message().await.expect("the stream ends cleanly") {
        if let Some(generate_response::Event::Finished(f)) = msg.event {
            finished = Some(f);
        }
    }
    let finished = finished.expect("a final message");
    assert_eq!(
        finished.reason,
        FinishReason::Cancelled as i32,
        "{finished:?}"
    );
    let status = server.wait_exit();
    assert!(status.success(), "exit status {status}\n{}", server.log());
    let mut gone = false;
    for _ in 0..50 {
        gone = workers.iter().all(|&w| !alive(w));
        if gone {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gone, "workers {workers:?} outlived the gateway");
    let log = server.log();
    assert!(
        !log.contains("exited (signal"),
        "a worker was killed rather than stopped:\n{log}"
    );
    assert!(
        !log.contains("ERROR") && log.matches("worker stopped").count() == 2,
        "a clean stop logs no error:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_streams_in_flight_finish_refuses_new_ones_and_then_stops() {
    const STREAMS: usize = 8;
    // Long enough that the drain outlasts the health checks and the refused request below.
    const TOKENS: u32 = 240;
    let mut server = Server::start(&["serve", "--drain-secs", "300"])
        .unwrap_or_else(|log| panic!("server failed: {log}"));
    let workers = server.children();
    let client = server.client().await;
    // Eight streams, each seen running (its first token arrived) before the signal.
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut stream = client
            .clone()
            .generate(long_story(TOKENS))
            .await
            .expect("generate")
            .into_inner();
        stream.message().await.expect("token").expect("stream open");
        streams.push(stream);
    }
    support::signal("-TERM", &server.pid().to_string());

    // Draining: health says NOT_SERVING and a new request is refused, naming the reason.
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .expect("connect while draining");
    let health = HealthClient::new(channel);
    let not_serving = eventually(Duration::from_secs(30), || {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::NotServing as i32)
        }
    })
    .await;
    assert!(not_serving, "health still SERVING while draining");
    let refused = generate(&mut client.clone(), long_story(4))
        .await
        .expect_err("a new request while draining");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("shutting down"), "{refused:?}");

    // Every stream in flight runs to its end, none cancelled.
    for (i, mut stream) in streams.into_iter().enumerate() {
        let mut tokens = 1;
        let mut finished = None;
        while let Some(msg) = stream.message().await.expect("the stream ends cleanly") {
            match msg.event {
                Some(generate_response::Event::Token(_)) => tokens += 1,
                Some(generate_response::Event::Finished(f)) => finished = Some(f),
                None => {}
            }
        }
        let finished = finished.unwrap_or_else(|| panic!("stream {i} got no final message"));
        assert_eq!(
            finished.reason,
            FinishReason::Length as i32,
            "stream {i}: {finished:?}"
        );
        assert_eq!(tokens, TOKENS, "stream {i}");
    }
    // Then the gateway stops on its own, and its workers with it.
    let status = server.wait_exit();
    assert!(status.success(), "exit status {status}\n{}", server.log());
    let log = server.log();
    assert!(log.contains("drained: every request has finished"), "{log}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            workers.iter().all(|&w| !alive(w))
        })
        .await,
        "workers {workers:?} outlived the gateway"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_foreign_frames_sent_to_any_data_plane_port_change_no_stream() {
    use std::io::Write;
    let worker = Worker::start(&[], &[]);
    let data = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let server = Server::start(&[
        "gateway",
        "--topology",
        "none",
        "--worker",
        &format!("cpu[0]={}", worker.control),
        "--data-listen",
        &data,
    ])
    .unwrap_or_else(|log| panic!("gateway failed: {log}"));
    let mut client = server.client().await;
    let (want, _) = generate(&mut client, long_story(96))
        .await
        .expect("a clean run");

    let mut stream = client
        .generate(long_story(96))
        .await
        .expect("generate")
        .into_inner();
    let mut got = Vec::new();
    while got.len() < 4 {
        if let Some(generate_response::Event::Token(t)) =
            stream.message().await.expect("token").expect("open").event
        {
            got.push(t.id);
        }
    }
    // Mid-stream, a stranger writes garbage to the gateway's and the worker's data planes, then
    // well-formed frames without the session's token: empty samples for every step id the
    // gateway may have in flight (step ids are sequential), a hello with a guessed token.
    for addr in [&data, &worker.data] {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        conn.write_all(b"GET / HTTP/1.1\r\nHost: strata\r\n\r\n")
            .expect("write garbage");
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        let mut bytes = Vec::new();
        for step_id in 1..400 {
            let foreign = Frame::Samples(SamplesFrame {
                times: Default::default(),
                step_id,
                samples: vec![],
            });
            bytes.extend_from_slice(&foreign.to_bytes().unwrap());
        }
        conn.write_all(&bytes).expect("write foreign frames");
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        let guess = Frame::Hello(HelloFrame {
            session: "0".repeat(32),
        });
        conn.write_all(&guess.to_bytes().unwrap())
            .expect("write a hello");
        conn.write_all(&bytes).expect("write foreign frames");
    }
    let mut finished = None;
    while let Some(msg) = stream.message().await.expect("the stream goes on") {
        match msg.event {
            Some(generate_response::Event::Token(t)) => got.push(t.id),
            Some(generate_response::Event::Finished(f)) => finished = Some(f),
            None => {}
        }
    }
    let finished = finished.expect("a final message");
    assert_eq!(finished.reason, FinishReason::Length as i32, "{finished:?}");
    assert_eq!(got, want.iter().map(|t| t.id).collect::<Vec<_>>());
    let refusals = |l: &str| {
        l.matches("refused a connection that did not present this session's token")
            .count()
    };
    let log = server.log_until(|l| refusals(l) >= 3);
    assert!(refusals(&log) >= 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_recovery_a_dead_worker_turns_the_service_unhealthy_and_fails_requests_naming_it() {
    let server = Server::start(&["serve", "--recovery-secs", "0"])
        .unwrap_or_else(|log| panic!("server failed: {log}"));
    let workers = server.children();
    assert_eq!(workers.len(), 2);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "strata.v1.Strata"] {
        let s = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(s.status, ServingStatus::Serving as i32, "`{service}`");
    }

    support::signal("-KILL", &workers[1].to_string());

    // The overall status (what probes ask) and the API's own both turn NOT_SERVING; with
    // recovery off the ring stays down, so even `liveness` (what a liveness probe asks) fails
    // and Kubernetes restarts the gateway.
    for service in ["", "strata.v1.Strata", "liveness"] {
        let turned = eventually(Duration::from_secs(10), || {
            let mut health = health.clone();
            async move {
                health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::NotServing as i32)
            }
        })
        .await;
        assert!(
            turned,
            "health of `{service}` stays SERVING\n{}",
            server.log()
        );
    }
    let mut client = server.client().await;
    let err = generate(&mut client, long_story(4))
        .await
        .expect_err("no ring, no tokens");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The first failure seen is the one reported: the worker's exit, or the link it held,
    // which the kernel may reset a moment before the exit is seen.
    let m = err.message();
    assert!(
        (m.contains("the worker process for cpu[") && m.contains("exited"))
            || m.contains("data plane: the link"),
        "{m}"
    );
    // ModelInfo shows which worker failed.
    let failed = info_until(&client, Duration::from_secs(15), |info| {
        info.workers
            .iter()
            .filter(|w| w.state == WorkerState::Failed as i32 && !w.error.is_empty())
            .count()
            == 1
    })
    .await;
    assert!(failed, "ModelInfo never shows the dead worker as FAILED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_client_frees_its_kv_cache_on_every_worker() {
    // 512 tokens (32 blocks) of KV cache; a 400-token generation needs 26 blocks. The first
    // one leaves after 150 tokens, holding 10 blocks on every worker: if any worker kept them,
    // the second generation would run out of blocks there.
    let (server, mut client, stream) =
        serve_and_stream(&["serve", "--kv-cache-tokens", "512"], 400, 150).await;
    drop(stream);
    let released = info_until(&client, Duration::from_secs(10), |info| {
        info.running == 0 && info.kv_cache_reserved_tokens == 0
    })
    .await;
    assert!(released, "the gateway still holds the departed sequence");
    let (tokens, fin) = generate(&mut client, long_story(400))
        .await
        .unwrap_or_else(|e| panic!("the second generation: {e:?}\n{}", server.log()));
    assert_eq!(tokens.len(), 400);
    assert_eq!(fin.reason, FinishReason::Length as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_elsewhere_that_cannot_run_its_gpu_stops_the_gateway_saying_why() {
    // The gateway accepts `cuda[N]` for workers started elsewhere (each knows its own build and
    // machine); this one, on a machine without a GPU, refuses it at load and says why.
    let worker = Worker::start(&[], &[]);
    let (_dir, topology) = support::topology_file("0-30:\n  device: cuda[0]\n");
    let served = Server::start(&[
        "gateway",
        "--topology",
        topology.to_str().unwrap(),
        "--worker",
        &format!("cuda[0]={}", worker.control),
    ]);
    let log = match served {
        Err(log) => log,
        Ok(_) if std::path::Path::new("/dev/nvidiactl").exists() && cfg!(feature = "cuda") => {
            return;
        }
        Ok(server) => panic!("served without a GPU: {}", server.log()),
    };
    let why = if cfg!(feature = "cuda") {
        "cuda[0]: no NVIDIA driver on this machine: libcuda.so cannot be loaded"
    } else {
        "cuda[0]: this build runs CPU workers only; build with `cargo build --release --features cuda`"
    };
    assert!(log.contains(why), "{log}");
}
