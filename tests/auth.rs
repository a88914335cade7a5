//! API keys on the public API, with a real gateway and worker: calls without a key or with an
//! unknown one are refused with UNAUTHENTICATED; a key's concurrent streams are limited with
//! RESOURCE_EXHAUSTED naming the limit; health stays open with `--open-health` (Kubernetes'
//! probes present no credentials) and is closed without it; a key added to the file works
//! without a restart; a bad key file stops the gateway naming the file and line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use strata_proto::v1::strata_client::StrataClient;
use strata_proto::v1::{ModelInfoRequest, generate_response};
use support::{Server, long_story};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const ALICE: &str = "sk-alice-4f1c9a7e2b6d8c03";
const BOB: &str = "sk-bob-9d2e7b4c1a8f6e05";
const CAROL: &str = "sk-carol-3a5c7e9b1d2f4a68";

fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

/// Runs a generation with `key` to its end: the number of tokens, or the error.
async fn run(
    client: &mut StrataClient<Channel>,
    key: Option<&str>,
    max_tokens: u32,
) -> Result<usize, tonic::Status> {
    let mut stream = client
        .generate(with_key(long_story(max_tokens), key))
        .await?
        .into_inner();
    let mut tokens = 0;
    while let Some(msg) = stream.message().await? {
        if let Some(generate_response::Event::Token(_)) = msg.event {
            tokens += 1;
        }
    }
    Ok(tokens)
}

async fn health(addr: &str, key: Option<&str>) -> Result<i32, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
        .check(with_key(
            HealthCheckRequest {
                service: String::new(),
            },
            key,
        ))
        .await
        .map(|r| r.into_inner().status)
}

fn serve(keys: &Path, extra: &[&str]) -> Server {
    let keys = keys.to_str().expect("utf-8 path");
    let mut args = vec!["serve", "--topology", "none", "--api-keys", keys];
    args.extend_from_slice(extra);
    Server::start(&args).unwrap_or_else(|log| panic!("server failed: {log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_admit_their_callers_within_their_limits_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(
        &keys,
        format!("# name key max_streams\nalice {ALICE} 1\nbob {BOB}\n"),
    )
    .unwrap();
    let server = serve(&keys, &["--open-health"]);
    let mut client = server.client().await;

    // No key, a malformed header, an unknown key: refused before anything runs.
    let e = run(&mut client, None, 4).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("authorization: Bearer"), "{e:?}");
    let e = run(&mut client, Some("sk-nobody-0000000000000"), 4)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(e.message(), "unknown API key");
    let e = client
        .model_info(with_key(ModelInfoRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "every API call needs a key"
    );

    // A known key works; health is open (--open-health).
    assert_eq!(run(&mut client, Some(BOB), 4).await.unwrap(), 4);
    assert_eq!(
        health(&server.addr, None).await.unwrap(),
        ServingStatus::Serving as i32
    );

    // alice may hold one stream at a time.
    let mut first = client
        .generate(with_key(long_story(64), Some(ALICE)))
        .await
        .expect("alice's first stream")
        .into_inner();
    first.message().await.expect("token").expect("open");
    let e = run(&mut client, Some(ALICE), 4).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("`alice` already has 1 streams open"),
        "{e:?}"
    );
    // Others are not held back by alice's limit.
    assert_eq!(run(&mut client, Some(BOB), 4).await.unwrap(), 4);
    while first.message().await.expect("stream").is_some() {}
    // Her stream ended: she may start another.
    assert_eq!(run(&mut client, Some(ALICE), 4).await.unwrap(), 4);

    // A key added to the file works without a restart.
    std::fs::write(
        &keys,
        format!("alice {ALICE} 1\nbob {BOB}\ncarol {CAROL}\n"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match run(&mut client, Some(CAROL), 2).await {
            Ok(n) => {
                assert_eq!(n, 2);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
                assert!(Instant::now() < deadline, "the new key never took effect");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let log = server.log_until(|l| l.contains("API keys reloaded"));
    assert!(log.contains("API keys reloaded"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_open_health_health_needs_a_key_too() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("bob {BOB}\n")).unwrap();
    let server = serve(&keys, &[]);
    let e = health(&server.addr, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(
        health(&server.addr, Some(BOB)).await.unwrap(),
        ServingStatus::Serving as i32
    );
}

#[test]
fn a_bad_key_file_stops_the_gateway_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("alice {ALICE}\nbob short\n")).unwrap();
    let keys = keys.to_str().unwrap();
    let err = Server::start(&["serve", "--topology", "none", "--api-keys", keys])
        .err()
        .expect("startup must fail");
    assert!(
        err.contains(&format!("{keys}:2: the key of `bob` has 5 characters")),
        "{err}"
    );
}
