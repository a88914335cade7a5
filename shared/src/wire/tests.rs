use super::*;

fn round_trip(f: &Frame) -> Frame {
    let bytes = f.to_bytes().unwrap();
    let prelude = Prelude::parse(
        bytes[..PRELUDE_LEN].try_into().unwrap(),
        DEFAULT_MAX_FRAME_BYTES,
    )
    .unwrap();
    assert_eq!(
        PRELUDE_LEN + prelude.header_len as usize + prelude.payload_len as usize,
        bytes.len()
    );
    // The length the metrics count, computed without encoding, is what was encoded.
    assert_eq!(f.wire_len(), bytes.len() as u64, "{f:?}");
    Frame::from_bytes(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap()
}

#[test]
fn frames_round_trip() {
    let step = Frame::Step(StepFrame {
        times: Default::default(),
        step_id: 7,
        stage: 2,
        releases: vec![3, 9],
        seqs: vec![SeqStep {
            seq_id: 11,
            pos0: 5,
            prompt_len: 5,
            tokens: vec![1, 2, 3],
            sample: true,
            params: SamplingParams {
                temperature: 0.7,
                top_k: 40,
                seed: 42,
                top_logprobs: 3,
                logprobs: true,
                ..Default::default()
            },
            blocks: vec![4, 0, 9],
            fresh: true,
            history: vec![5, 6, 7, 8, 9],
        }],
        hidden: Some(Activations {
            dtype: ActDType::F32,
            rows: 3,
            cols: 2,
            carrier: Carrier::Frame,
            data: Bytes::from(vec![0u8; 24]),
        }),
        trace: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        concurrent: 1,
    });
    assert_eq!(round_trip(&step), step);
    let samples = Frame::Samples(SamplesFrame {
        times: Default::default(),
        step_id: 7,
        samples: vec![Sample {
            seq_id: 11,
            token: 42,
            logprob: -0.5,
            top: vec![(42, -0.5), (7, -1.25)],
        }],
    });
    assert_eq!(round_trip(&samples), samples);
    let err = Frame::Error(ErrorFrame {
        step_id: 1,
        stage: 0,
        to: 3,
        message: "boom ✗".into(),
    });
    assert_eq!(round_trip(&err), err);
}

#[test]
fn rejects_bad_preludes_and_headers() {
    let head = Frame::Error(ErrorFrame {
        step_id: 1,
        stage: 0,
        to: 1,
        message: "x".into(),
    })
    .to_bytes()
    .unwrap();
    let mut p: [u8; PRELUDE_LEN] = head[..PRELUDE_LEN].try_into().unwrap();
    assert!(
        Prelude::parse(&p, 1)
            .unwrap_err()
            .to_string()
            .contains("exceeds the limit")
    );
    p[4] = 9;
    assert!(matches!(
        Prelude::parse(&p, 1 << 20),
        Err(WireError::Version(9))
    ));
    p[0] = b'G';
    assert!(matches!(
        Prelude::parse(&p, 1 << 20),
        Err(WireError::Magic(_))
    ));
    // A header cut short, or with a count larger than the bytes left.
    let prelude = Prelude {
        kind: KIND_SAMPLES,
        header_len: 12,
        payload_len: 0,
    };
    let mut h = BytesMut::new();
    h.put_u64_le(1);
    h.put_u32_le(u32::MAX);
    let err = Frame::decode(&prelude, &h, Bytes::new()).unwrap_err();
    assert!(err.to_string().contains("header ends early"), "{err}");
}

#[test]
fn the_codec_reassembles_frames_from_any_chunking() {
    let frames = vec![
        Frame::Samples(SamplesFrame {
            times: Default::default(),
            step_id: 1,
            samples: vec![Sample {
                seq_id: 3,
                token: 9,
                logprob: -0.25,
                top: vec![(9, -0.25)],
            }],
        }),
        Frame::Step(StepFrame {
            times: Default::default(),
            step_id: 2,
            stage: 1,
            releases: vec![],
            seqs: vec![],
            hidden: Some(Activations {
                dtype: ActDType::BF16,
                rows: 2,
                cols: 3,
                carrier: Carrier::Frame,
                data: Bytes::from((0u8..12).collect::<Vec<_>>()),
            }),
            trace: String::new(),
            concurrent: 1,
        }),
    ];
    let mut stream = BytesMut::new();
    for f in &frames {
        FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)
            .encode(f, &mut stream)
            .unwrap();
    }
    for chunk in [1, 5, 23, 24, 25, 1000] {
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_BYTES);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
        assert_eq!(got, frames, "chunks of {chunk}");
    }
    // A stream that ends inside a frame is an error.
    let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_BYTES);
    let mut cut = BytesMut::from(&stream[..stream.len() - 1]);
    assert!(codec.decode(&mut cut).unwrap().is_some());
    let err = codec.decode_eof(&mut cut).unwrap_err().to_string();
    assert!(err.contains("into a frame"), "{err}");
}

#[test]
fn a_payload_must_match_the_activations_it_claims() {
    let step = |hidden: Option<Activations>| {
        Frame::Step(StepFrame {
            times: Default::default(),
            step_id: 1,
            stage: 0,
            releases: vec![],
            seqs: vec![],
            hidden,
            trace: String::new(),
            concurrent: 1,
        })
    };
    let mut a = Activations {
        dtype: ActDType::F32,
        rows: 1,
        cols: 2,
        carrier: Carrier::Frame,
        data: Bytes::from(vec![0u8; 8]),
    };
    let bytes = step(Some(a.clone())).to_bytes().unwrap();
    assert!(Frame::from_bytes(&bytes, DEFAULT_MAX_FRAME_BYTES).is_ok());
    a.cols = 3;
    let bytes = step(Some(a)).to_bytes().unwrap();
    let err = Frame::from_bytes(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap_err();
    assert!(
        err.to_string()
            .contains("need 12 bytes of payload, it has 8"),
        "{err}"
    );
}

#[test]
fn activations_that_nccl_carries_leave_the_frame_without_payload() {
    let mut a = Activations {
        dtype: ActDType::F32,
        rows: 2,
        cols: 4,
        carrier: Carrier::Nccl,
        data: Bytes::new(),
    };
    let frame = |a: &Activations| {
        Frame::Step(StepFrame {
            times: Default::default(),
            step_id: 3,
            stage: 1,
            releases: vec![],
            seqs: vec![],
            hidden: Some(a.clone()),
            trace: String::new(),
            concurrent: 2,
        })
    };
    assert_eq!(a.payload_len(), 0);
    assert_eq!(round_trip(&frame(&a)), frame(&a));
    let bytes = frame(&a).to_bytes().unwrap();
    assert_eq!(bytes.len() as u64, frame(&a).wire_len());
    // The header says NCCL carries them: a payload beside it is a malformed frame.
    a.data = Bytes::from(vec![0u8; 32]);
    let bytes = frame(&a).to_bytes().unwrap();
    let err = Frame::from_bytes(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap_err();
    assert!(
        err.to_string()
            .contains("carried by Nccl need 0 bytes of payload, it has 32"),
        "{err}"
    );
    // An unknown carrier is refused by name.
    let mut bytes = frame(&Activations {
        data: Bytes::new(),
        ..a
    })
    .to_bytes()
    .unwrap()
    .to_vec();
    // The carrier: the last byte before the trace (empty: its u32 count), `concurrent` and the
    // stages' times (two u64s).
    let at = bytes.len() - 16 - 4 - 4 - 1;
    assert_eq!(bytes[at], 1);
    bytes[at] = 7;
    let err = Frame::from_bytes(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap_err();
    assert!(
        err.to_string().contains("unknown activation carrier 7"),
        "{err}"
    );
}

#[test]
fn a_hello_carries_its_session_token() {
    let hello = Frame::Hello(HelloFrame {
        session: "0af7651916cd43dd8448eb211c80319c".into(),
    });
    assert_eq!(round_trip(&hello), hello);
}

#[test]
fn a_heartbeat_is_a_prelude_alone() {
    assert_eq!(round_trip(&Frame::Heartbeat), Frame::Heartbeat);
    let bytes = Frame::Heartbeat.to_bytes().unwrap();
    assert_eq!(bytes.len() as u64, Frame::Heartbeat.wire_len());
}

#[test]
fn a_payload_length_that_would_wrap_around_is_refused_not_a_panic() {
    // Found by fuzzing (shared/fuzz, target `frame`): a hello whose payload length is u64::MAX
    // once summed to a small size and split the buffer past its end.
    let mut bytes = Frame::Hello(HelloFrame {
        session: "7af7651844b211c".into(),
    })
    .to_bytes()
    .unwrap();
    bytes[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    bytes.extend_from_slice(&[0; 8]);
    let err = Frame::from_bytes(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap_err();
    assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
}
