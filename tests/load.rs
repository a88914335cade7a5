//! `strata load` against a live `strata serve`: its report counts what it sent, the service's
//! own counters agree (batching, the prefix cache for `--shared-prefix`), and bad options are
//! refused with a message.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;

use strata_proto::v1::ModelInfoRequest;
use support::{Server, strata};

/// Runs `strata load ARGS --json` and returns its JSON lines.
fn load(addr: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(strata())
        .args(["load", "--addr", addr, "--json"])
        .args(args)
        .output()
        .expect("run strata load");
    assert!(
        out.status.success(),
        "strata load {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_what_it_sent_and_the_service_batched_and_cached_it() {
    let mut server = Server::start(&["serve", "--topology", "none"])
        .unwrap_or_else(|log| panic!("server failed: {log}"));
    let addr = server.addr.clone();

    // Closed loop: 1 then 4 streams, 2 requests each, with a shared 32-token prefix (two full
    // KV blocks) before 4 to 8 tokens of their own.
    let closed = load(
        &addr,
        &[
            "--streams",
            "1,4",
            "--per-stream",
            "2",
            "--prompt-tokens",
            "4-8",
            "--gen-tokens",
            "6",
            "--shared-prefix",
            "32",
        ],
    );
    assert_eq!(closed.len(), 2, "{closed:?}");
    for (report, streams) in closed.iter().zip([1u64, 4]) {
        assert_eq!(report["streams"], streams, "{report}");
        assert_eq!(report["requests"], 2 * streams, "{report}");
        assert_eq!(report["errors"], serde_json::json!({}), "{report}");
        assert!(
            report["tokens_per_second"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        let (p50, p99) = (
            report["ttft_ms_p50"].as_f64().unwrap(),
            report["ttft_ms_p99"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99, "{report}");
        assert!(
            report["inter_token_ms_p50"].as_f64().unwrap() > 0.0,
            "{report}"
        );
    }

    // Open loop: 5 Poisson arrivals.
    let open = load(
        &addr,
        &["--rate", "50", "--requests", "5", "--gen-tokens", "3"],
    );
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["rate"], 50.0);
    assert_eq!(open[0]["requests"], 5);
    assert_eq!(open[0]["errors"], serde_json::json!({}));

    // The service saw it: several sequences in one step, and every request after the first
    // found the shared prefix's two blocks in the cache.
    let info = server
        .client()
        .await
        .model_info(ModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner();
    let counters = info.scheduler.expect("scheduler counters");
    assert!(counters.max_step_sequences > 1, "{counters:?}");
    assert!(counters.prefix_cache_hits >= 2 * 9, "{counters:?}");
    server.terminate();
}

#[test]
fn bad_load_options_are_refused_with_a_message() {
    for (args, says) in [
        (&["--prompt-tokens", "9-2"][..], "MIN at most MAX"),
        (&["--gen-tokens", "many"][..], "is not a length"),
        (&["--rate", "0"][..], "--rate must be a positive number"),
        (&["--streams", "0"][..], "must be at least 1"),
    ] {
        let out = Command::new(strata())
            .args(["load", "--addr", "127.0.0.1:9"])
            .args(args)
            .output()
            .expect("run strata load");
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
