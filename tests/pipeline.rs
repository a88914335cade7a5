//! The distributed pipeline against the single-process engine: real gateway and worker
//! processes on loopback, real gRPC, every golden prompt.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use strata_gateway::server::{ModelChoice, TopologyChoice};
use strata_proto::v1::{GenerateRequest, SamplingParameters, TokenIds, generate_request};
use strata_shared::plan::FloatType;
use strata_shared::wire::{SamplingParams, SeqStep, StepFrame};
use strata_worker::Engine;
use support::{Prompt, Server, generate, prompts, topology_file};

const N: u32 = 32;

/// One quantization layout, spread over devices in several ways: `{a}`, `{b}`, `{c}` are the
/// devices of layers 0-10, 10-20 and 20-30. Every spreading must give the same tokens.
fn layout(a: &str, b: &str, c: &str) -> String {
    format!(
        "0-10:\n  device: '{a}'\n  isq: Q8_0\n10-20:\n  device: '{b}'\n  isq: Q4_1\n20-30:\n  device: '{c}'\n  isq: HQQ8\n'/mlp\\.down_proj\\.weight$/':\n  isq: Q6K\n"
    )
}

/// Greedy tokens and log-probabilities from the single-process engine.
fn engine_greedy(
    topology: &std::path::Path,
    dtype: Option<FloatType>,
    prompts: &[Prompt],
) -> Vec<Vec<(u32, f32)>> {
    let r = strata_gateway::server::resolve(&ModelChoice {
        model: "default".into(),
        revision: None,
        topology: TopologyChoice::File(topology.to_path_buf()),
        isq: None,
        dtype,
    })
    .expect("resolve");
    let mut engine = Engine::load(&r.meta, &r.plan, 64, &mut |_, _, _| {}).expect("load engine");
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let seq = i as u64 + 1;
            let mut out = Vec::new();
            let mut feed = p.prompt_ids.clone();
            let mut pos = 0;
            while out.len() < N as usize {
                let step = StepFrame {
                    times: Default::default(),
                    step_id: 0,
                    stage: 0,
                    releases: vec![],
                    seqs: vec![SeqStep {
                        seq_id: seq,
                        pos0: pos,
                        prompt_len: p.prompt_ids.len() as u32,
                        tokens: feed.clone(),
                        sample: true,
                        params: SamplingParams {
                            logprobs: true,
                            ..SamplingParams::default()
                        },
                        // The engine allocates.
                        blocks: vec![],
                        fresh: pos == 0,
                        history: vec![],
                    }],
                    hidden: None,
                    trace: String::new(),
                    concurrent: 1,
                };
                pos += feed.len() as u32;
                let s = engine.step(step).expect("engine step");
                let x = &s.samples[0];
                out.push((x.token, x.logprob));
                feed = vec![x.token];
            }
            engine.release(seq);
            out
        })
        .collect()
}

fn request(p: &Prompt) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::TokenIds(TokenIds {
            ids: p.prompt_ids.clone(),
        })),
        parameters: Some(SamplingParameters {
            max_tokens: Some(N),
            temperature: Some(0.0),
            ignore_eos: true,
            logprobs: true,
            ..Default::default()
        }),
        add_special_tokens: false,
    }
}

/// Serves `topology`, runs every prompt (one at a time, then all at once) and checks each
/// against `want`. Returns the route served: (device, first layer, end layer) per stage.
async fn check_served(
    topology: &std::path::Path,
    extra: &[&str],
    want: &[Vec<(u32, f32)>],
    workers: usize,
) -> Vec<(String, u32, u32)> {
    let t = topology.to_str().expect("utf-8 path");
    let mut args = vec!["serve", "--topology", t];
    args.extend_from_slice(extra);
    let mut server = Server::start(&args).unwrap_or_else(|log| panic!("server failed: {log}"));
    let mut client = server.client().await;
    let info = client
        .model_info(strata_proto::v1::ModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner();
    assert_eq!(info.workers.len(), workers, "{info:?}");
    for w in &info.workers {
        // Each worker says which kernels it picked for this CPU.
        assert!(
            w.kernels.starts_with("f32 ") && w.kernels.contains(", int8 "),
            "worker {} reports kernels {:?}",
            w.address,
            w.kernels
        );
        // The KV cache stores f16, but for f32 weights.
        let kv = if extra.windows(2).any(|a| a == ["--dtype", "f32"]) {
            "f32"
        } else {
            "f16"
        };
        assert_eq!(w.kv_cache_dtype, kv, "worker {}", w.address);
        // And which device it runs on: the CPU's model name and the machine's RAM.
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        assert!(
            !w.device_name.is_empty()
                && cpu
                    .lines()
                    .filter(|l| l.starts_with("model name"))
                    .any(|l| l.ends_with(&w.device_name)),
            "worker {} reports device {:?}",
            w.address,
            w.device_name
        );
        assert!(w.device_memory_bytes > 1 << 30, "{w:?}");
    }
    let route = info
        .route
        .iter()
        .map(|s| (s.device.clone(), s.layer_start, s.layer_end))
        .collect();
    let prompts = prompts();
    let compare = |name: &str, got: &[strata_proto::v1::Token], want: &[(u32, f32)]| {
        let ids: Vec<u32> = got.iter().map(|t| t.id).collect();
        let want_ids: Vec<u32> = want.iter().map(|w| w.0).collect();
        assert_eq!(
            ids, want_ids,
            "prompt {name}: pipeline tokens differ from the single-process engine"
        );
        for (g, w) in got.iter().zip(want) {
            let lp = g.logprob.expect("logprob requested");
            assert!(
                (lp - w.1).abs() <= 1e-4,
                "prompt {name}: logprob {lp} vs {}",
                w.1
            );
        }
    };
    for (p, w) in prompts.iter().zip(want) {
        let (tokens, fin) = generate(&mut client, request(p)).await.expect("generate");
        assert_eq!(fin.reason, strata_proto::v1::FinishReason::Length as i32);
        compare(&p.name, &tokens, w);
    }
    // All prompts at once: continuous batching must not change any of them.
    let mut tasks = Vec::new();
    for p in prompts.clone() {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            (p.name.clone(), generate(&mut c, request(&p)).await)
        }));
    }
    for (t, w) in tasks.into_iter().zip(want) {
        let (name, r) = t.await.expect("task");
        let (tokens, _) = r.expect("generate");
        compare(&name, &tokens, w);
    }
    let status = server.terminate();
    assert!(
        status.success(),
        "clean shutdown: {status}\n{}",
        server.log()
    );
    route
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_two_and_three_workers_give_the_single_process_tokens() {
    // Each served topology against the single-process engine loading the same topology.
    for (devices, workers) in [
        (["cpu[0]", "cpu[0]", "cpu[0]"], 1),
        (["cpu[0]", "cpu[0]", "cpu[1]"], 2),
        (["cpu[0]", "cpu[1]", "cpu[2]"], 3),
    ] {
        let (_dir, topology) = topology_file(&layout(devices[0], devices[1], devices[2]));
        let want = engine_greedy(&topology, None, &prompts());
        let route = check_served(&topology, &[], &want, workers).await;
        assert_eq!(route.len(), workers, "{route:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_visits_a_worker_twice_gives_the_contiguous_tokens() {
    // cpu[0] runs layers 0-10 and 20-30: the route goes cpu[0] → cpu[1] → cpu[0].
    let (_d, revisit) = topology_file(&layout("cpu[0]", "cpu[1]", "cpu[0]"));
    let (_c, contiguous) = topology_file(&layout("cpu[0]", "cpu[1]", "cpu[1]"));
    let want = engine_greedy(&contiguous, None, &prompts());
    let route = check_served(&revisit, &[], &want, 2).await;
    assert_eq!(
        route,
        [("cpu[0]", 0, 10), ("cpu[1]", 10, 20), ("cpu[0]", 20, 30)]
            .map(|(d, a, b)| (d.to_string(), a, b))
            .to_vec(),
        "the route visits cpu[0] twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f32_pipeline_reproduces_the_reference_greedy_tokens() {
    let (_d, two) = topology_file("0-15: {device: 'cpu[0]'}\n15-30: {device: 'cpu[1]'}\n");
    let prompts = prompts();
    let want = engine_greedy(&two, Some(FloatType::F32), &prompts);
    for (p, w) in prompts.iter().zip(&want) {
        let ids: Vec<u32> = w.iter().map(|x| x.0).collect();
        assert_eq!(ids, p.greedy_ids, "prompt {}: engine vs reference", p.name);
    }
    check_served(&two, &["--dtype", "f32"], &want, 2).await;
}
