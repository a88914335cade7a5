//! The running service driven by real peers: the `grpcurl` binary (server reflection v1alpha,
//! health, a streaming Generate) and a Python grpcio client generated from `proto/`; reflection
//! v1 from a tonic client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::process::Command;

use support::{Server, peers_venv};

/// `grpcurl -plaintext FLAGS ADDR REST`.
fn grpcurl(venv: &Path, flags: &[&str], addr: &str, rest: &[&str]) -> String {
    let out = Command::new(venv.join("bin/grpcurl"))
        .arg("-plaintext")
        .args(flags)
        .arg(addr)
        .args(rest)
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {flags:?} {rest:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The services `grpc.reflection.v1.ServerReflection` lists.
fn reflection_v1_services(addr: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection v1")
            .into_inner();
        let reply = replies.message().await.expect("reply").expect("one reply");
        match reply.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("reflection v1 answered {other:?}"),
        }
    })
}

#[test]
fn grpcurl_and_a_python_client_drive_the_service() {
    let venv = peers_venv();
    let server = Server::start(&["serve"]).unwrap_or_else(|log| panic!("server failed: {log}"));
    let addr = server.addr.clone();

    let services = grpcurl(&venv, &[], &addr, &["list"]);
    for s in [
        "strata.v1.Strata",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == s),
            "`grpcurl list` lacks {s}:\n{services}"
        );
    }
    // Reflection v1 too (newer tools speak it): the same services, from a tonic client.
    let v1 = reflection_v1_services(&addr);
    for s in ["strata.v1.Strata", "grpc.health.v1.Health"] {
        assert!(v1.iter().any(|l| l == s), "reflection v1 lacks {s}: {v1:?}");
    }
    let described = grpcurl(&venv, &[], &addr, &["describe", "strata.v1.Strata"]);
    for rpc in [
        "rpc Generate",
        "rpc Chat",
        "rpc Tokenize",
        "rpc Detokenize",
        "rpc ModelInfo",
    ] {
        assert!(
            described.contains(rpc),
            "describe lacks {rpc}:\n{described}"
        );
    }
    let health = grpcurl(&venv, &[], &addr, &["grpc.health.v1.Health/Check"]);
    assert!(health.contains("\"SERVING\""), "{health}");

    // A streaming Generate: one JSON message per token, then the final one.
    let out = grpcurl(
        &venv,
        &[
            "-d",
            r#"{"prompt": "The capital of France is", "parameters": {"max_tokens": 4, "temperature": 0}}"#,
        ],
        &addr,
        &["strata.v1.Strata/Generate"],
    );
    let messages: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("grpcurl prints JSON messages");
    assert_eq!(messages.len(), 5, "{out}");
    let text: String = messages
        .iter()
        .filter_map(|m| m["token"]["text"].as_str())
        .collect();
    assert_eq!(text, " Paris.\n\n");
    assert_eq!(
        messages[4]["finished"]["reason"], "FINISH_REASON_LENGTH",
        "{out}"
    );

    // A Python client generated from the .proto streams a Chat.
    let stubs = tempfile::tempdir().expect("tmp");
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let status = Command::new(venv.join("bin/python"))
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_dir)
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg(proto_dir.join("strata/v1/strata.proto"))
        .status()
        .expect("grpc_tools.protoc");
    assert!(status.success());
    let script = r#"
import json, sys
import grpc
from strata.v1 import strata_pb2, strata_pb2_grpc
stub = strata_pb2_grpc.StrataStub(grpc.insecure_channel(sys.argv[1]))
req = strata_pb2.ChatRequest(
    messages=[strata_pb2.ChatMessage(role="user", content="What is the capital of France?")],
    parameters=strata_pb2.SamplingParameters(max_tokens=30, temperature=0.0))
text, reason, usage = "", None, None
for event in stub.Chat(req):
    if event.HasField("token"):
        text += event.token.text
    else:
        text += event.finished.text
        reason = strata_pb2.FinishReason.Name(event.finished.reason)
        usage = event.finished.usage.completion_tokens
print(json.dumps({"text": text, "reason": reason, "completion_tokens": usage}))
"#;
    let out = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(script)
        .arg(&addr)
        .env("PYTHONPATH", stubs.path())
        .output()
        .expect("python client");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json line");
    assert_eq!(reply["text"], "The capital of France is Paris.", "{reply}");
    assert_eq!(reply["reason"], "FINISH_REASON_EOS", "{reply}");
    assert_eq!(reply["completion_tokens"], 8, "{reply}");
}
