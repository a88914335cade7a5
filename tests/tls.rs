//! TLS: the links between the gateway and its workers are mutual TLS, and refuse whoever lacks
//! a certificate from their CA; plaintext is an explicit `--insecure`; the public API serves
//! TLS when given a certificate (and wants client certificates when given a CA), with health
//! left open on a plaintext port of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_proto::v1::strata_client::StrataClient;
use strata_proto::worker::v1::StatusRequest;
use strata_proto::worker::v1::worker_client::WorkerClient;
use strata_shared::wire::{Frame, HelloFrame};
use support::{Server, Worker};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;

/// `strata ARGS`, expected to fail: its stderr.
fn fails(args: &[&str]) -> String {
    let out = Command::new(support::strata())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run strata");
    assert!(!out.status.success(), "strata {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A certificate set from a CA of its own, unrelated to [`support::certs`].
fn other_certs(dir: &Path) -> Vec<String> {
    let out = Command::new(support::strata())
        .args(["certs", "--name", "127.0.0.1", "--out"])
        .arg(dir)
        .output()
        .expect("run strata certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ["tls-cert", "tls-key", "tls-ca"]
        .iter()
        .zip(["tls.crt", "tls.key", "ca.crt"])
        .flat_map(|(flag, file)| [format!("--{flag}"), dir.join(file).display().to_string()])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_links_refuse_every_peer_without_a_certificate_from_their_ca() {
    let worker = Worker::start(&[], &[]);

    // The control plane: a plaintext client gets nothing.
    let plain = async {
        let mut c = WorkerClient::connect(worker.control.clone())
            .await
            .map_err(|e| e.to_string())?;
        c.status(StatusRequest {}).await.map_err(|e| e.to_string())
    };
    assert!(plain.await.is_err(), "a plaintext client was answered");
    // Nor does a TLS client that trusts the worker but presents no certificate of its own.
    let ca = std::fs::read(support::certs().join("ca.crt")).unwrap();
    let anonymous = async {
        let channel = Channel::from_shared(worker.control.replacen("http://", "https://", 1))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca)))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        WorkerClient::new(channel)
            .status(StatusRequest {})
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        anonymous.await.is_err(),
        "a client without a certificate was answered"
    );

    // A gateway whose certificates another CA signed is refused, and says why.
    let dir = tempfile::tempdir().unwrap();
    let other = other_certs(dir.path());
    let worker_arg = format!("cpu[0]={}", worker.control);
    let mut args = vec![
        "gateway",
        "--topology",
        "none",
        "--worker",
        &worker_arg,
        "--connect-timeout-secs",
        "3",
    ];
    args.extend(other.iter().map(String::as_str));
    let log = Server::start(&args)
        .err()
        .expect("the gateway must not start");
    assert!(
        log.contains(&format!("worker {} cannot be reached", worker.control))
            && log.contains("UnknownIssuer"),
        "{log}"
    );

    // The data plane: a plaintext connection that speaks the frame format is cut off.
    let mut raw = std::net::TcpStream::connect(&worker.data).unwrap();
    let hello = Frame::Hello(HelloFrame {
        session: "0123456789abcdef0123456789abcdef".into(),
    });
    raw.write_all(&hello.to_bytes().unwrap()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match raw.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {} // a TLS alert
        }
        assert!(started.elapsed() < Duration::from_secs(5), "still open");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the worker did not close a plaintext data-plane connection"
    );
}

#[test]
fn flags_choose_tls_or_plaintext_and_say_what_is_missing() {
    let e = fails(&["worker", "--listen", "127.0.0.1:0"]);
    assert!(
        e.contains("give --tls-cert, --tls-key and --tls-ca") && e.contains("--insecure"),
        "{e}"
    );
    let e = fails(&["gateway", "--worker", "cpu[0]=http://127.0.0.1:1"]);
    assert!(e.contains("give --tls-cert, --tls-key and --tls-ca"), "{e}");
    let e = fails(&["worker", "--tls-cert", "/nonexistent/tls.crt"]);
    assert!(e.contains("--tls-key and --tls-ca missing"), "{e}");
    let e = fails(&[
        "worker",
        "--tls-cert",
        "/nonexistent/tls.crt",
        "--tls-key",
        "k",
        "--tls-ca",
        "c",
    ]);
    assert!(
        e.contains("--tls-cert /nonexistent/tls.crt: No such file"),
        "{e}"
    );
    // Certificates that do not fit together are caught before anything listens.
    let dir = tempfile::tempdir().unwrap();
    let other = other_certs(dir.path());
    let own = support::certs().join("tls.crt").display().to_string();
    let mut args = vec!["worker", "--listen", "127.0.0.1:0"];
    args.extend(other.iter().map(String::as_str));
    args[4] = &own;
    let e = fails(&args);
    assert!(e.contains("does not pass the CA's check"), "{e}");

    // Plaintext keeps the data plane on loopback, even for a worker listening everywhere.
    let mut child = Command::new(support::strata())
        .args(["worker", "--listen", "0.0.0.0:0", "--insecure"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(
        v["control"].as_str().unwrap().starts_with("0.0.0.0:"),
        "{v}"
    );
    assert!(v["data"].as_str().unwrap().starts_with("127.0.0.1:"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_tls_with_health_open_on_a_plaintext_port() {
    let certs = support::certs();
    let (cert, key, ca) = (
        certs.join("tls.crt"),
        certs.join("tls.key"),
        certs.join("ca.crt"),
    );
    // Plaintext links (`--insecure`) and a TLS API that wants client certificates.
    let server = Server::start(&[
        "serve",
        "--topology",
        "none",
        "--insecure",
        "--api-tls-cert",
        cert.to_str().unwrap(),
        "--api-tls-key",
        key.to_str().unwrap(),
        "--api-tls-client-ca",
        ca.to_str().unwrap(),
        "--health-listen",
        "127.0.0.1:0",
    ])
    .unwrap_or_else(|log| panic!("server failed: {log}"));
    assert!(
        server.log().contains("links=\"plaintext\""),
        "{}",
        server.log()
    );

    let tls_client = |identity: bool| {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()))
            .domain_name("localhost");
        if identity {
            config = config.identity(Identity::from_pem(
                std::fs::read(&cert).unwrap(),
                std::fs::read(&key).unwrap(),
            ));
        }
        Channel::from_shared(format!("https://{}", server.addr))
            .unwrap()
            .tls_config(config)
            .unwrap()
    };
    let channel = tls_client(true)
        .connect()
        .await
        .expect("a TLS client connects");
    let mut client = StrataClient::new(channel);
    let (tokens, _) = support::generate(
        &mut client,
        support::token_request(&[504, 3575, 282, 4649, 314], 4, None),
    )
    .await
    .expect("generate over TLS");
    assert_eq!(tokens[0].id, 7042, "\" Paris\"");

    // A plaintext client is not served.
    let plain = async {
        let mut c = StrataClient::connect(format!("http://{}", server.addr))
            .await
            .map_err(|e| e.to_string())?;
        support::generate(&mut c, support::token_request(&[504], 1, None))
            .await
            .map_err(|e| e.to_string())
    };
    assert!(plain.await.is_err(), "a plaintext client was served");
    // Nor is a TLS client without a certificate.
    let anonymous = async {
        let mut c = StrataClient::new(
            tls_client(false)
                .connect()
                .await
                .map_err(|e| e.to_string())?,
        );
        support::generate(&mut c, support::token_request(&[504], 1, None))
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        anonymous.await.is_err(),
        "a client without a certificate was served"
    );

    // grpcurl, given the CA, lists the services over TLS.
    let venv = support::setup("scripts/setup-test-peers.sh");
    let out = Command::new(venv.join("bin/grpcurl"))
        .args(["-cacert", ca.to_str().unwrap(), "-servername", "localhost"])
        .args([
            "-cert",
            cert.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
        ])
        .args([server.addr.as_str(), "list"])
        .output()
        .expect("run grpcurl");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("strata.v1.Strata"),
        "{listed}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Health, alone and in plaintext, for probes.
    let health = server.health.clone().expect("a health address");
    let mut h = support::health_client(&health).await;
    assert_eq!(
        support::health_status(&mut h, "").await,
        Some(ServingStatus::Serving as i32)
    );
}
