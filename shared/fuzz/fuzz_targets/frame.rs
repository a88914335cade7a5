//! The data-plane frame decoder, on any bytes a peer might send: as one frame, and as a
//! stream cut into frames by the codec. It must return frames or errors, never panic, and never
//! allocate what the prelude claims before the bytes are there.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use strata_shared::wire::{Frame, FrameCodec};
use tokio_util::codec::Decoder;

const MAX_FRAME: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::from_bytes(data, MAX_FRAME) {
        // What decodes encodes again, and that decodes to the same bytes (compared as bytes: a
        // NaN log-probability is not equal to itself).
        let bytes = frame.to_bytes().expect("a decoded frame encodes");
        assert_eq!(bytes.len() as u64, frame.wire_len());
        let again = Frame::from_bytes(&bytes, MAX_FRAME).expect("an encoded frame decodes");
        assert_eq!(again.to_bytes().expect("it encodes again"), bytes);
    }
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
});
