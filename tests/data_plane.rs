//! The data plane between real worker processes, with this test as the gateway (over mutual
//! TLS, with the certificates the workers were given): bad steps fail with an error frame that
//! travels the rest of the ring to the gateway, and the ring keeps working afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use strata_gateway::workers::stage_spec;
use strata_proto::worker::v1::worker_client::WorkerClient;
use strata_proto::worker::v1::{LinkRequest, LoadRequest, NcclIdRequest, NextHop, load_event};
use strata_shared::device::DeviceSpec;
use strata_shared::meta::ModelMeta;
use strata_shared::plan::{Plan, PlanOptions};
use strata_shared::source::ModelFiles;
use strata_shared::tls::{LinkSecurity, Tls, TlsFiles};
use strata_shared::topology::Topology;
use strata_shared::transport::{
    FrameListener, FrameReceiver, FrameSender, TcpTransport, Transport, hello,
};
use strata_shared::wire::{Frame, KV_BLOCK_SIZE, SamplingParams, SeqStep, StepFrame};
use support::Worker;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const SESSION: &str = "0123456789abcdef0123456789abcdef";

fn step(step_id: u64, seq_id: u64, pos0: u32, tokens: Vec<u32>) -> StepFrame {
    StepFrame {
        times: Default::default(),
        step_id,
        stage: 0,
        releases: vec![],
        seqs: vec![SeqStep {
            seq_id,
            pos0,
            prompt_len: tokens.len() as u32,
            blocks: (0..(pos0 as usize + tokens.len()).div_ceil(16) as u32).collect(),
            tokens,
            sample: true,
            params: SamplingParams::default(),
            fresh: pos0 == 0,
            history: vec![],
        }],
        hidden: None,
        trace: String::new(),
        concurrent: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_comes_back_as_an_error_and_the_ring_goes_on() {
    let path = strata_shared::source::fetch_default_model().unwrap();
    let meta = ModelMeta::open(ModelFiles::resolve(path.to_str().unwrap(), None).unwrap()).unwrap();
    let topology = Topology::parse(
        "0-15: {device: 'cpu[0]'}\n15-30: {device: 'cpu[1]'}\n",
        "t.yml",
    )
    .unwrap();
    let plan = Plan::resolve(&meta, &topology, &PlanOptions::default()).unwrap();
    let (a, b) = (Worker::start(&[], &[]), Worker::start(&[], &[]));
    let tls = Arc::new(Tls::load(&TlsFiles::in_dir(support::certs()), None).unwrap());

    // Load stage 0 on a, stage 1 on b.
    let mut data = Vec::new();
    for (w, device) in [(&a, DeviceSpec::Cpu(0)), (&b, DeviceSpec::Cpu(1))] {
        let s = plan.route.iter().find(|s| s.device == device).unwrap();
        let channel = Endpoint::from_shared(w.control.replacen("http://", "https://", 1))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                    .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = WorkerClient::new(channel);
        let mut stream = client
            .load(LoadRequest {
                model: path.to_str().unwrap().into(),
                revision: String::new(),
                device: device.to_string(),
                stages: vec![stage_spec(&plan, s.index).unwrap()],
                kv_blocks: 8,
                kv_block_size: KV_BLOCK_SIZE as u32,
                session: SESSION.into(),
                model_fingerprint: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        loop {
            match stream.message().await.unwrap().and_then(|e| e.event) {
                Some(load_event::Event::Loaded(l)) => {
                    data.push((client, s.index as u32, l.data_address));
                    break;
                }
                Some(_) => {}
                None => panic!("load stream ended early"),
            }
        }
    }
    let transport = TcpTransport::new(LinkSecurity::Mtls(tls));
    let mut listener = transport.bind("127.0.0.1:0").await.unwrap();
    let gateway = listener.local_addr();
    let b_data = data[1].2.clone();
    let first = data[0].2.clone();
    let (client_a, ..) = &mut data[0];
    // A CPU worker makes no NCCL ids and joins no NCCL hop; it says why, and the refused link
    // leaves it unlinked.
    let refused = client_a.nccl_id(NcclIdRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("cpu[0]"),
        "{}",
        refused.message()
    );
    let refused = client_a
        .link(LinkRequest {
            hops: vec![NextHop {
                stage: 0,
                address: b_data.clone(),
                nccl_id: vec![0; 128],
            }],
            nccl_inbound: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().starts_with("stage 0: ") && refused.message().contains("cuda"),
        "{}",
        refused.message()
    );
    client_a
        .link(LinkRequest {
            hops: vec![NextHop {
                stage: 0,
                address: b_data,
                nccl_id: Vec::new(),
            }],
            nccl_inbound: Vec::new(),
        })
        .await
        .unwrap();
    // Under TLS the last stage's link completes its handshake only while this side reads.
    let accepted = tokio::spawn(async move {
        let (mut back, _) = listener.accept().await.unwrap();
        let first = back.recv().await.unwrap().unwrap();
        (back, first)
    });
    let (client_b, ..) = &mut data[1];
    client_b
        .link(LinkRequest {
            hops: vec![NextHop {
                stage: 1,
                address: gateway,
                nccl_id: Vec::new(),
            }],
            nccl_inbound: Vec::new(),
        })
        .await
        .unwrap();
    let mut to_first = hello(&transport, &first, SESSION).await.unwrap();
    let (mut back, opening) = accepted.await.unwrap();
    // The last stage's connection opens with the session token it was given.
    match opening {
        Frame::Hello(h) => assert_eq!(h.session, SESSION),
        other => panic!("expected a hello frame, got {other:?}"),
    }

    let mut round_trip = async |frame: StepFrame| {
        to_first.send(&Frame::Step(frame)).await.unwrap();
        back.recv().await.unwrap().unwrap()
    };
    // A token outside the vocabulary fails stage 0; stage 1 passes the error on.
    match round_trip(step(1, 7, 0, vec![1, 999_999])).await {
        Frame::Error(e) => {
            assert_eq!((e.step_id, e.stage, e.to), (1, 0, 2));
            assert!(
                e.message.contains("999999") && e.message.contains("vocabulary"),
                "{}",
                e.message
            );
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    // Positions past the context, and one sequence twice, fail before any work.
    match round_trip(step(2, 8, 8190, vec![1, 2, 3])).await {
        Frame::Error(e) => assert!(
            e.message.contains("past the model's context length 8192"),
            "{}",
            e.message
        ),
        other => panic!("expected an error frame, got {other:?}"),
    }
    let mut twice = step(3, 9, 0, vec![1]);
    twice.seqs.push(twice.seqs[0].clone());
    match round_trip(twice).await {
        Frame::Error(e) => assert!(
            e.message.contains("sequence 9: appears twice"),
            "{}",
            e.message
        ),
        other => panic!("expected an error frame, got {other:?}"),
    }
    // A block table beyond the KV cache (8 blocks of 16 tokens), and one too short.
    match round_trip(step(4, 10, 0, vec![1; 200])).await {
        Frame::Error(e) => assert!(
            e.message.contains("KV block 8 is not one of the 8 blocks"),
            "{}",
            e.message
        ),
        other => panic!("expected an error frame, got {other:?}"),
    }
    let mut short = step(4, 10, 0, vec![1; 20]);
    short.seqs[0].blocks.truncate(1);
    match round_trip(short).await {
        Frame::Error(e) => assert!(
            e.message
                .contains("hold 16 positions, the step reaches position 20"),
            "{}",
            e.message
        ),
        other => panic!("expected an error frame, got {other:?}"),
    }
    // The ring still works: "The capital of France is" → " Paris".
    match round_trip(step(5, 11, 0, vec![504, 3575, 282, 4649, 314])).await {
        Frame::Samples(s) => {
            assert_eq!(s.step_id, 5);
            assert_eq!(s.samples[0].token, 7042);
        }
        other => panic!("expected samples, got {other:?}"),
    }
}
