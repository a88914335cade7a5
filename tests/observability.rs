//! Observability, end to end with real processes: one request's trace spans the gateway and
//! both workers (exported over OTLP/gRPC to a real receiver, with the client's `traceparent`);
//! a dead collector costs no request; the gateway's and a worker's `/metrics` pass
//! `promtool check metrics` and move by what known requests did; log lines carry no escape
//! codes off a terminal, and as JSON they all parse and carry the request's ids.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use strata_proto::v1::{GenerateRequest, SamplingParameters, generate_request};
use support::{Server, Worker, generate, idle_info, metric, scrape};
use tokio::sync::oneshot;

/// A span as the receiver got it, with the pid of the process that sent it.
#[derive(Debug, Clone)]
struct Got {
    pid: i64,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text_of(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let pid = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "process.pid"))
                .and_then(|a| text_of(&a.value).parse().ok())
                .unwrap_or(-1);
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        pid,
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text_of(&a.value)))
                            .collect(),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A real OTLP/gRPC trace receiver on a free port; it stops when the sender fires or drops.
async fn receiver() -> (SocketAddr, Receiver, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = Receiver::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let service = TraceServiceServer::new(r.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    (addr, r, stop)
}

fn request(prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::Prompt(prompt.into())),
        parameters: Some(SamplingParameters {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_the_gateway_and_both_workers() {
    let (addr, received, _stop) = receiver().await;
    let endpoint = format!("http://{addr}");
    let server = Server::start_with_env(
        &["serve"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .unwrap_or_else(|log| panic!("server failed: {log}"));
    let gateway_pid = i64::from(server.pid());
    let mut client = server.client().await;
    let mut call = tonic::Request::new(request("The capital of France is", 4));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse().unwrap(),
    );
    let mut stream = client.generate(call).await.expect("generate").into_inner();
    while stream.message().await.expect("stream").is_some() {}

    // The spans of this trace: the gateway's request and batch steps, each worker's stages.
    let deadline = Instant::now() + Duration::from_secs(60);
    let spans = loop {
        let spans: Vec<Got> = received
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .cloned()
            .collect();
        // Each process exports on its own schedule: wait until the request has ended and
        // both workers' stage spans have caught up with the gateway's batch steps.
        let pids: HashSet<i64> = spans.iter().map(|s| s.pid).collect();
        let requests_done = spans.iter().any(|s| s.name == "request");
        let count = |name: &str, stage: Option<&str>| {
            spans
                .iter()
                .filter(|s| s.name == name)
                .filter(|s| {
                    stage.is_none_or(|st| s.attributes.get("stage").map(String::as_str) == Some(st))
                })
                .count()
        };
        let steps = count("batch_step", None);
        let stages_done =
            steps > 0 && count("stage", Some("0")) >= steps && count("stage", Some("1")) >= steps;
        if pids.len() >= 3 && requests_done && stages_done {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {TRACE_ID} from {} processes after 60 s: {spans:#?}\n{}",
            pids.len(),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let named = |name: &str| -> Vec<&Got> { spans.iter().filter(|s| s.name == name).collect() };

    let request = named("request");
    assert_eq!(request.len(), 1, "{spans:#?}");
    let request = request[0];
    assert_eq!(request.pid, gateway_pid);
    assert_eq!(
        request.parent, CLIENT_SPAN,
        "the client's span is the parent"
    );
    assert_eq!(request.attributes["method"], "generate");
    assert_eq!(request.attributes["finish_reason"], "length");
    assert!(request.attributes["request_id"].len() == 16, "{request:?}");

    let batches = named("batch_step");
    assert!(!batches.is_empty(), "{spans:#?}");
    for b in &batches {
        assert_eq!(b.pid, gateway_pid);
        assert_eq!(b.parent, request.span_id, "a batch step led by the request");
    }
    let batch_ids: HashSet<&str> = batches.iter().map(|b| b.span_id.as_str()).collect();
    let mine: Vec<&Got> = named("step")
        .into_iter()
        .filter(|s| s.parent == request.span_id)
        .collect();
    assert_eq!(
        mine.len(),
        4,
        "one step span per step the request took part in"
    );
    assert!(
        named("queue").iter().any(|q| q.parent == request.span_id),
        "{spans:#?}"
    );

    // Each worker's stage spans descend from the gateway's batch step, stage by stage.
    let stages = named("stage");
    let first: Vec<&&Got> = stages
        .iter()
        .filter(|s| s.attributes["stage"] == "0")
        .collect();
    let second: Vec<&&Got> = stages
        .iter()
        .filter(|s| s.attributes["stage"] == "1")
        .collect();
    assert_eq!(first.len(), batches.len(), "{stages:#?}");
    assert_eq!(second.len(), batches.len(), "{stages:#?}");
    for s in &first {
        assert!(batch_ids.contains(s.parent.as_str()), "{s:?}");
    }
    let first_ids: HashSet<&str> = first.iter().map(|s| s.span_id.as_str()).collect();
    for s in &second {
        assert!(first_ids.contains(s.parent.as_str()), "{s:?}");
    }
    let worker_pids: HashSet<i64> = stages.iter().map(|s| s.pid).collect();
    assert_eq!(worker_pids.len(), 2, "{stages:#?}");
    assert!(!worker_pids.contains(&gateway_pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_fails_no_request() {
    let (addr, received, stop) = receiver().await;
    let endpoint = format!("http://{addr}");
    let server = Server::start_with_env(
        &["serve", "--topology", "none"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .unwrap_or_else(|log| panic!("server failed: {log}"));
    let mut client = server.client().await;
    let (want, _) = generate(&mut client, request("The capital of France is", 8))
        .await
        .expect("generate");
    // The collector saw the first request, then goes away for good.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !received
        .spans
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.name == "request")
    {
        assert!(Instant::now() < deadline, "no span arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(()).unwrap();
    for _ in 0..4 {
        let (got, finished) = generate(&mut client, request("The capital of France is", 8))
            .await
            .expect("a request with the collector gone");
        assert_eq!(
            got.iter().map(|t| t.id).collect::<Vec<_>>(),
            want.iter().map(|t| t.id).collect::<Vec<_>>()
        );
        assert!(finished.usage.is_some());
    }
}

/// `promtool check metrics` on `text` (Debian's `prometheus` package's promtool, which
/// `scripts/setup-deploy-tools.sh` provides).
fn promtool_check(text: &str) {
    let promtool = support::setup("scripts/setup-deploy-tools.sh").join("promtool");
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_move_by_what_known_requests_did() {
    let w0 = Worker::start(&["--metrics-listen", "127.0.0.1:0"], &[]);
    let w1 = Worker::start(&["--metrics-listen", "127.0.0.1:0"], &[]);
    let server = Server::start(&[
        "gateway",
        "--worker",
        &format!("cpu[0]={}", w0.control),
        "--worker",
        &format!("cpu[1]={}", w1.control),
        "--data-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .unwrap_or_else(|log| panic!("gateway failed: {log}"));
    let gw = server
        .metrics
        .clone()
        .expect("the gateway's metrics address");
    let before = scrape(&gw);

    let mut client = server.client().await;
    let (mut prompt_tokens, mut completion_tokens) = (0.0, 0.0);
    for prompt in ["The capital of France is", "Once upon a time", "1, 2, 3,"] {
        let (_, finished) = generate(&mut client, request(prompt, 5))
            .await
            .expect("generate");
        let usage = finished.usage.expect("usage");
        prompt_tokens += f64::from(usage.prompt_tokens);
        completion_tokens += f64::from(usage.completion_tokens);
    }
    let mut bad = request("x", 5);
    bad.parameters.as_mut().unwrap().temperature = Some(1000.0);
    let err = generate(&mut client, bad)
        .await
        .expect_err("temperature 1000");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The gauges follow the scheduler's counters, published after each stream's last event.
    idle_info(&mut client).await;
    let after = scrape(&gw);
    promtool_check(&after);
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(
        delta("strata_prompt_tokens_total"),
        prompt_tokens,
        "{after}"
    );
    assert_eq!(delta("strata_generation_tokens_total"), completion_tokens);
    let finished: f64 = ["length", "stop", "eos", "cancelled"]
        .iter()
        .map(|r| {
            delta(&format!(
                "strata_request_success_total{{finished_reason=\"{r}\"}}"
            ))
        })
        .sum();
    assert_eq!(finished, 3.0, "{after}");
    assert_eq!(
        delta("strata_request_failure_total{code=\"InvalidArgument\"}"),
        1.0
    );
    for histogram in [
        "strata_time_to_first_token_seconds",
        "strata_e2e_request_latency_seconds",
        "strata_request_queue_time_seconds",
        "strata_request_prefill_time_seconds",
    ] {
        assert_eq!(delta(&format!("{histogram}_count")), 3.0, "{histogram}");
    }
    assert_eq!(
        delta("strata_inter_token_latency_seconds_count"),
        completion_tokens - 3.0
    );
    assert_eq!(metric(&after, "strata_num_requests_running"), 0.0);
    assert_eq!(metric(&after, "strata_kv_cache_usage_perc"), 0.0);

    for (stage, w) in [(0, &w0), (1, &w1)] {
        // A frame counts as out once its send has returned: scrape until the last one has.
        let addr = w.metrics.as_deref().expect("the worker's metrics address");
        let frames = |text: &str, dir: &str| {
            metric(
                text,
                &format!("strata_worker_frames_total{{direction=\"{dir}\"}}"),
            )
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut text = scrape(addr);
        while frames(&text, "in") != frames(&text, "out") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            text = scrape(addr);
        }
        promtool_check(&text);
        let forward = metric(
            &text,
            &format!("strata_worker_step_forward_seconds_count{{stage=\"{stage}\"}}"),
        );
        // One step per prompt and one per token after the first, at least.
        assert!(forward >= completion_tokens, "{text}");
        for series in [
            "strata_worker_frames_total{direction=\"in\"}",
            "strata_worker_frames_total{direction=\"out\"}",
            "strata_worker_model_load_seconds",
            "strata_worker_resident_memory_bytes",
        ] {
            assert!(metric(&text, series) > 0.0, "{series} in\n{text}");
        }
        assert_eq!(
            frames(&text, "in"),
            frames(&text, "out"),
            "every step frame in went on"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_have_no_escape_codes_off_a_terminal_and_as_json_carry_the_ids() {
    // stderr is a pipe here, not a terminal.
    let server = Server::start(&["serve", "--topology", "none"])
        .unwrap_or_else(|log| panic!("server failed: {log}"));
    let mut client = server.client().await;
    generate(&mut client, request("Hello", 2))
        .await
        .expect("generate");
    let log = server.log();
    assert!(log.contains("gateway ready"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in:\n{log}");
    drop(server);

    let server = Server::start(&["--log-format", "json", "serve", "--topology", "none"])
        .unwrap_or_else(|log| panic!("server failed: {log}"));
    let mut client = server.client().await;
    let mut call = tonic::Request::new(request("Hello", 2));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse().unwrap(),
    );
    let mut stream = client.generate(call).await.expect("generate");
    let request_id = stream
        .metadata()
        .get("x-request-id")
        .expect("the request id header")
        .to_str()
        .unwrap()
        .to_string();
    while stream.get_mut().message().await.expect("stream").is_some() {}
    // The last line is written as the request ends; give stderr a moment to arrive.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("request finished") {
        assert!(Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = server.log();
    let mut about_request = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n--- log ---\n{log}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["message"] == "request received" || v["message"] == "request finished" {
            about_request += 1;
            assert_eq!(v["span"]["request_id"], request_id.as_str(), "{line}");
            assert_eq!(v["span"]["trace_id"], TRACE_ID, "{line}");
        }
    }
    assert_eq!(about_request, 2, "{log}");
}
