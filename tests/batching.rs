//! Serving many requests at once, through real gateway and worker processes: a request gives
//! the same tokens and log-probabilities alone or in any batch, through 1, 2 and 3 workers with
//! steps in flight on every stage; preemption when the KV cache runs out changes no output;
//! the prefix cache serves a shared system prompt; the waiting queue is bounded; deadlines end
//! requests. Each property that is about the scheduler's behaviour is read from its counters
//! (`ModelInfo.scheduler`), never from timing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use strata_proto::v1::strata_client::StrataClient;
use strata_proto::v1::{GenerateRequest, ModelInfoRequest, ModelInfoResponse};
use support::{Server, generate, idle_info, prompts, token_request, topology_file};
use tonic::transport::Channel;

/// (token id, log-probability) per generated token.
type Output = Vec<(u32, f32)>;

/// 16 requests of mixed lengths: the golden prompts greedy, the same seeded at temperature
/// 0.8, and four prompts of other lengths (greedy and seeded).
fn mixed_requests() -> Vec<(String, GenerateRequest)> {
    let mut out = Vec::new();
    let golden = prompts();
    for p in &golden {
        out.push((
            format!("{} greedy", p.name),
            token_request(&p.prompt_ids, 24, None),
        ));
        out.push((
            format!("{} seeded", p.name),
            token_request(&p.prompt_ids, 24, Some(7)),
        ));
    }
    let long: Vec<u32> = golden.iter().flat_map(|p| p.prompt_ids.clone()).collect();
    for (i, len) in [3usize, 40, 90, 150].into_iter().enumerate() {
        let ids: Vec<u32> = long
            .iter()
            .cycle()
            .skip(i * 11)
            .take(len)
            .copied()
            .collect();
        let seed = (i % 2 == 1).then_some(100 + i as u64);
        out.push((
            format!("{len} tokens"),
            token_request(&ids, 16 + 4 * i as u32, seed),
        ));
    }
    assert_eq!(out.len(), 16);
    out
}

async fn run_one(client: &mut StrataClient<Channel>, req: GenerateRequest) -> Output {
    let (tokens, _) = generate(client, req).await.expect("generate");
    tokens
        .iter()
        .map(|t| (t.id, t.logprob.expect("logprobs requested")))
        .collect()
}

/// Every request at once.
async fn run_all(
    client: &StrataClient<Channel>,
    reqs: &[(String, GenerateRequest)],
) -> Vec<Output> {
    let tasks: Vec<_> = reqs
        .iter()
        .map(|(_, r)| {
            let mut c = client.clone();
            let r = r.clone();
            tokio::spawn(async move { run_one(&mut c, r).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

async fn info(client: &mut StrataClient<Channel>) -> ModelInfoResponse {
    client
        .model_info(ModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner()
}

/// Bit-identical tokens and log-probabilities.
fn same(name: &str, alone: &Output, batched: &Output) {
    assert_eq!(
        alone.iter().map(|t| t.0).collect::<Vec<_>>(),
        batched.iter().map(|t| t.0).collect::<Vec<_>>(),
        "{name}: tokens differ alone and batched"
    );
    for (i, (a, b)) in alone.iter().zip(batched).enumerate() {
        assert_eq!(
            a.1.to_bits(),
            b.1.to_bits(),
            "{name}: log-probability of token {i}: {} alone, {} batched",
            a.1,
            b.1
        );
    }
}

/// Serves `args`, runs the requests one at a time and then all at once, and checks that each
/// gives the same output both ways. Returns the scheduler's counters.
async fn alone_and_batched(args: &[&str], reqs: &[(String, GenerateRequest)]) -> ModelInfoResponse {
    let mut server = Server::start(args).unwrap_or_else(|log| panic!("server failed: {log}"));
    let mut client = server.client().await;
    let mut alone = Vec::new();
    for (_, r) in reqs {
        alone.push(run_one(&mut client, r.clone()).await);
    }
    let batched = run_all(&client, reqs).await;
    for (((name, _), a), b) in reqs.iter().zip(&alone).zip(&batched) {
        same(name, a, b);
    }
    let info = idle_info(&mut client).await;
    assert_eq!(
        (info.running, info.waiting, info.kv_cache_reserved_tokens),
        (0, 0, 0),
        "every block back once all is done: {info:?}"
    );
    let status = server.terminate();
    assert!(
        status.success(),
        "clean shutdown: {status}\n{}",
        server.log()
    );
    info
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_gives_the_same_output_alone_or_batched_through_1_2_and_3_workers() {
    let reqs = mixed_requests();
    for (devices, stages) in [
        (["cpu[0]", "cpu[0]", "cpu[0]"], 1),
        (["cpu[0]", "cpu[1]", "cpu[1]"], 2),
        (["cpu[0]", "cpu[1]", "cpu[2]"], 3),
    ] {
        let yaml = format!(
            "0-10:\n  device: '{}'\n10-20:\n  device: '{}'\n20-30:\n  device: '{}'\n",
            devices[0], devices[1], devices[2]
        );
        let (_dir, topology) = topology_file(&yaml);
        let t = topology.to_str().unwrap();
        let info = alone_and_batched(&["serve", "--topology", t], &reqs).await;
        let s = info.scheduler.expect("scheduler counters");
        assert_eq!(info.route.len(), stages);
        assert!(
            s.max_step_sequences > 1,
            "{stages} stages: no step carried several sequences: {s:?}"
        );
        if stages > 1 {
            assert!(
                s.max_steps_in_flight > 1,
                "{stages} stages: never more than one step in flight: {s:?}"
            );
        }
        // One step per stage at least, a few more at most (more where the hops took long).
        let most = stages + strata_gateway::scheduler::EXTRA_STEPS_IN_FLIGHT;
        assert!(
            (stages..=most).contains(&(s.steps_in_flight as usize)),
            "{stages} stages: {} steps in flight: {s:?}",
            s.steps_in_flight
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_when_the_kv_cache_runs_out_changes_no_output() {
    // 20 blocks of 16 tokens; the requests need up to 16 blocks each, 150 together.
    let reqs = mixed_requests();
    let info = alone_and_batched(
        &["serve", "--topology", "none", "--kv-cache-tokens", "320"],
        &reqs,
    )
    .await;
    let s = info.scheduler.expect("scheduler counters");
    assert!(s.preemptions > 0, "the cache never ran out: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_system_prompt_is_served_from_the_prefix_cache() {
    let mut server = Server::start(&["serve", "--topology", "none"])
        .unwrap_or_else(|log| panic!("server failed: {log}"));
    let mut client = server.client().await;
    // A 512-token system prompt, then a question.
    let system: Vec<u32> = prompts()
        .iter()
        .flat_map(|p| p.prompt_ids.clone())
        .cycle()
        .take(512)
        .collect();
    let ask = |q: &[u32]| {
        let mut ids = system.clone();
        ids.extend_from_slice(q);
        token_request(&ids, 8, None)
    };
    let first = run_one(&mut client, ask(&[504, 3575, 282])).await;
    let before = idle_info(&mut client).await.scheduler.unwrap();
    // The same request again is served from the cache, with the same output.
    let again = run_one(&mut client, ask(&[504, 3575, 282])).await;
    same("the same request, cached", &first, &again);
    let after = idle_info(&mut client).await.scheduler.unwrap();
    assert!(
        after.cached_prompt_tokens >= before.cached_prompt_tokens + 512,
        "{before:?} → {after:?}"
    );
    assert!(after.prefix_cache_hits >= before.prefix_cache_hits + 32);
    // Only the uncached tail and the generated tokens were computed.
    assert!(
        after.computed_tokens - before.computed_tokens < 32,
        "{before:?} → {after:?}"
    );
    // Another question after the same system prompt shares it too.
    let _ = run_one(&mut client, ask(&[1, 2, 3, 4])).await;
    let last = idle_info(&mut client).await;
    let s = last.scheduler.unwrap();
    assert!(s.cached_prompt_tokens >= after.cached_prompt_tokens + 512);
    assert_eq!(last.kv_cache_reserved_tokens, 0);
    assert!(server.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_and_a_deadline_ends_a_request() {
    let mut server = Server::start(&[
        "serve",
        "--topology",
        "none",
        "--max-running",
        "1",
        "--max-waiting",
        "1",
    ])
    .unwrap_or_else(|log| panic!("server failed: {log}"));
    let client = server.client().await;
    let long = || token_request(&[504, 3575, 282], 400, None);
    // One runs, one waits, the third is refused.
    let mut running = client.clone();
    let first = tokio::spawn(async move { generate(&mut running, long()).await });
    let mut c = client.clone();
    loop {
        let i = info(&mut c).await;
        if i.running == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut waiting = client.clone();
    let second = tokio::spawn(async move { generate(&mut waiting, long()).await });
    loop {
        if info(&mut c).await.waiting == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let err = generate(&mut c, long()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("already waiting"), "{err:?}");
    // A request with a short deadline ends with DEADLINE_EXCEEDED, and its KV goes back.
    first.abort();
    second.abort();
    for _ in 0..200 {
        let i = info(&mut c).await;
        if i.running == 0 && i.waiting == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut req = tonic::Request::new(long());
    req.set_timeout(std::time::Duration::from_millis(300));
    let err = match c.generate(req).await {
        Err(e) => e,
        Ok(stream) => {
            let mut s = stream.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("the stream ended without the deadline"),
                    Err(e) => break e,
                }
            }
        }
    };
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    // Every sequence ends and gives its blocks back.
    for _ in 0..200 {
        let i = info(&mut c).await;
        if i.running == 0 && i.waiting == 0 && i.kv_cache_reserved_tokens == 0 {
            assert!(server.terminate().success());
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("sequences or blocks left: {:?}", info(&mut c).await);
}
