//! Bad input and failures at the service boundary: every invalid field gets INVALID_ARGUMENT
//! naming it; an unreachable or failing worker stops startup with an error that names it; a
//! client that leaves mid-stream leaves nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use strata_proto::v1::{
    ChatRequest, GenerateRequest, ModelInfoRequest, SamplingParameters, StopSequence, TokenIds,
    generate_request, stop_sequence,
};
use support::{Server, generate};
use tonic::Code;

fn prompt(text: &str, p: SamplingParameters) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::Prompt(text.into())),
        parameters: Some(p),
        add_special_tokens: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_the_field_and_a_departed_client_leaves_nothing() {
    let server = Server::start(&["serve", "--topology", "none", "--kv-cache-tokens", "2048"])
        .unwrap_or_else(|log| panic!("server failed: {log}"));
    let mut client = server.client().await;
    let p = SamplingParameters::default;
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            prompt(
                "hi",
                SamplingParameters {
                    temperature: Some(-0.5),
                    ..p()
                },
            ),
            "parameters.temperature",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    top_p: Some(0.0),
                    ..p()
                },
            ),
            "parameters.top_p",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    top_p: Some(1.01),
                    ..p()
                },
            ),
            "parameters.top_p",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    min_p: Some(-0.1),
                    ..p()
                },
            ),
            "parameters.min_p",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    repetition_penalty: Some(0.0),
                    ..p()
                },
            ),
            "parameters.repetition_penalty",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    frequency_penalty: Some(2.5),
                    ..p()
                },
            ),
            "parameters.frequency_penalty",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    presence_penalty: Some(-3.0),
                    ..p()
                },
            ),
            "parameters.presence_penalty",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    top_logprobs: 50,
                    ..p()
                },
            ),
            "parameters.top_logprobs",
        ),
        (prompt("", p()), "prompt: must not be empty"),
        (
            prompt("word ".repeat(3000).as_str(), p()),
            "prompt: 3001 tokens do not fit the context window of 2048 tokens",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    max_tokens: Some(5000),
                    ..p()
                },
            ),
            "parameters.max_tokens: 5000 tokens after a 1-token prompt exceed the context window of 2048",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    max_tokens: Some(0),
                    ..p()
                },
            ),
            "parameters.max_tokens: must be at least 1",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    stop: vec![StopSequence { kind: None }],
                    ..p()
                },
            ),
            "parameters.stop[0]: unknown stop-sequence type",
        ),
        (
            prompt(
                "hi",
                SamplingParameters {
                    stop: vec![StopSequence {
                        kind: Some(stop_sequence::Kind::Text(String::new())),
                    }],
                    ..p()
                },
            ),
            "parameters.stop[0].text: must not be empty",
        ),
        (
            GenerateRequest::default(),
            "input: set `prompt` or `token_ids`",
        ),
        (
            GenerateRequest {
                input: Some(generate_request::Input::TokenIds(TokenIds {
                    ids: vec![1, 999_999],
                })),
                ..Default::default()
            },
            "token_ids.ids[1]: 999999 is outside the vocabulary",
        ),
    ];
    for (req, want) in cases {
        let err = generate(&mut client, req).await.expect_err(want);
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(
            err.message().contains(want),
            "want `{want}` in `{}`",
            err.message()
        );
    }
    let err = client
        .chat(ChatRequest::default())
        .await
        .expect_err("empty chat");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("messages"), "{}", err.message());

    // A client that leaves mid-stream: its sequence is cancelled and its KV released.
    let mut stream = client
        .generate(prompt(
            "Tell me a long story about",
            SamplingParameters {
                max_tokens: Some(400),
                ignore_eos: true,
                ..p()
            },
        ))
        .await
        .expect("generate")
        .into_inner();
    for _ in 0..3 {
        stream.message().await.expect("token").expect("stream open");
    }
    let busy = client
        .model_info(ModelInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(busy.running, 1);
    assert!(busy.kv_cache_reserved_tokens > 0);
    drop(stream);
    let mut idle = busy;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        idle = client
            .model_info(ModelInfoRequest {})
            .await
            .expect("info")
            .into_inner();
        if idle.running == 0 && idle.kv_cache_reserved_tokens == 0 {
            break;
        }
    }
    assert_eq!(
        (idle.running, idle.waiting, idle.kv_cache_reserved_tokens),
        (0, 0, 0),
        "nothing left behind"
    );
    // The next request is unaffected.
    let (tokens, fin) = generate(
        &mut client,
        prompt(
            "The capital of France is",
            SamplingParameters {
                max_tokens: Some(2),
                temperature: Some(0.0),
                ..p()
            },
        ),
    )
    .await
    .expect("next request");
    assert_eq!(
        tokens.iter().map(|t| t.text.as_str()).collect::<String>(),
        " Paris."
    );
    assert_eq!(fin.usage.expect("usage").completion_tokens, 2);
}

#[test]
fn an_unreachable_worker_stops_startup_naming_it() {
    let err = Server::start(&[
        "gateway",
        "--topology",
        "none",
        "--worker",
        "cpu[0]=http://127.0.0.1:9",
        "--data-listen",
        "127.0.0.1:0",
        "--connect-timeout-secs",
        "2",
    ])
    .err()
    .expect("startup must fail");
    assert!(
        err.contains("worker http://127.0.0.1:9 cannot be reached"),
        "{err}"
    );
    assert!(err.contains("exited with exit status: 1"), "{err}");
}

/// A Hugging Face cache under `home` in which the hub id `acme/smol` holds `model` as
/// `smol.gguf` (copied when `copy`, else linked); the file's path.
fn hub_cache(home: &std::path::Path, model: &std::path::Path, copy: bool) -> std::path::PathBuf {
    let repo = home.join("hub/models--acme--smol");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).expect("mkdir");
    std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
    std::fs::write(repo.join("refs/main"), "0123abcd").expect("ref");
    let file = snap.join("smol.gguf");
    if copy {
        std::fs::copy(model, &file).expect("copy the model");
    } else {
        std::os::unix::fs::symlink(model, &file).expect("symlink");
    }
    file
}

/// Starts a gateway for `acme/smol:smol.gguf` (from the cache at `home`, offline) on `worker`;
/// the startup must fail: its log.
fn gateway_on_hub_model_fails(worker: &support::Worker, home: &std::path::Path) -> String {
    Server::start_with_env(
        &[
            "gateway",
            "--model",
            "acme/smol:smol.gguf",
            "--topology",
            "none",
            "--worker",
            &format!("cpu[0]={}", worker.control),
            "--data-listen",
            "127.0.0.1:0",
        ],
        &[
            ("HF_HOME", home.to_str().expect("utf-8")),
            ("HF_HUB_OFFLINE", "1"),
        ],
    )
    .err()
    .expect("startup must fail")
}

#[test]
fn a_worker_that_fails_to_load_stops_startup_naming_it() {
    // The gateway reads the model from its Hugging Face cache; the worker, started elsewhere
    // with an empty cache and no network, cannot find it.
    let model = strata_shared::source::fetch_default_model().expect("default model");
    let tmp = tempfile::tempdir().expect("tmp");
    hub_cache(&tmp.path().join("gw"), &model, false);
    let empty = tmp.path().join("worker-home");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let worker = support::Worker::start(
        &[],
        &[
            ("HF_HOME", empty.to_str().expect("utf-8")),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    let err = gateway_on_hub_model_fails(&worker, &tmp.path().join("gw"));
    assert!(
        err.contains(&format!(
            "worker {} (cpu[0]) failed to load",
            worker.control
        )),
        "{err}"
    );
    assert!(
        err.contains("smol.gguf") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

#[test]
fn a_worker_with_another_copy_of_the_model_is_refused_at_load() {
    use std::os::unix::fs::FileExt;
    // The same hub id resolves, in each process's own cache, to files that differ in one byte
    // of tensor data (as a fine-tune or a stale cache would): the worker refuses to load.
    let model = strata_shared::source::fetch_default_model().expect("default model");
    let tmp = tempfile::tempdir().expect("tmp");
    hub_cache(&tmp.path().join("gw"), &model, false);
    let other = hub_cache(&tmp.path().join("wk"), &model, true);
    let files =
        strata_shared::source::ModelFiles::resolve(model.to_str().unwrap(), None).expect("resolve");
    let meta = strata_shared::meta::ModelMeta::open(files).expect("open");
    let first = meta.tensors.values().next().expect("a tensor");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&other)
        .expect("open the copy");
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, first.offset + 7).expect("read");
    f.write_all_at(&[byte[0] ^ 0x55], first.offset + 7)
        .expect("write");
    drop(f);

    let wk = tmp.path().join("wk");
    let worker = support::Worker::start(
        &[],
        &[
            ("HF_HOME", wk.to_str().expect("utf-8")),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    let err = gateway_on_hub_model_fails(&worker, &tmp.path().join("gw"));
    assert!(
        err.contains("failed to load") && err.contains("has fingerprint sha256:"),
        "{err}"
    );
    assert!(err.contains("both must load the same model files"), "{err}");
}
