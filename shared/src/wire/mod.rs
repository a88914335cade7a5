//! The data plane's frames: what travels gateway → stage → … → stage → gateway each step.
//!
//! A frame is a fixed 24-byte prelude, a small binary header and raw tensor bytes:
//!
//! ```text
//! prelude: magic "STRF" | version u16 | kind u16 | header_len u32 | payload_len u64 | reserved u32
//! header:  little-endian fields of the frame kind (below)
//! payload: activations, row-major little-endian, `rows × cols` elements of `dtype`
//! ```
//!
//! Each header type is described once, by the [`wire_struct!`] that declares it: its fields in
//! order are its wire form (integers and floats little-endian, `bool` one byte, a `Vec` or a
//! `String` a `u32` count then its items, an `Option` a one-byte tag then its value), and the
//! same description writes and reads it. [`FrameCodec`] frames them on a byte stream (a
//! `tokio_util` codec).
//!
//! A step frame carries a micro-batch of sequences, each with its first position and its
//! token ids (the first stage embeds them; the last stage keeps them for repetition
//! penalties), and the sequences to release before running. The last stage answers with a
//! samples frame: one sampled token (and log-probabilities) per sequence that asked for one.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"STRF";
/// Wire version; a peer with another version is refused.
pub const VERSION: u16 = 8;
/// Prelude length in bytes.
pub const PRELUDE_LEN: usize = 24;
/// Tokens per KV cache block. The gateway reserves and the stages allocate in these blocks, so
/// both sides must agree.
pub const KV_BLOCK_SIZE: usize = 16;
/// Default limit on one frame's header + payload.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 << 20;
/// Limit on a header alone.
pub const MAX_HEADER_BYTES: usize = 64 << 20;

/// Errors decoding or moving frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(
        "bad frame magic {0:02x?} (expected \"STRF\"): the peer is not a Strata data-plane endpoint"
    )]
    Magic([u8; 4]),
    #[error("frame version {0} is not supported (this build speaks version {VERSION})")]
    Version(u16),
    #[error("unknown frame kind {0}")]
    Kind(u16),
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: usize },
    #[error("malformed frame header: {0}")]
    Malformed(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {0} closed")]
    Closed(String),
}

impl From<std::io::Error> for WireError {
    fn from(source: std::io::Error) -> Self {
        WireError::Io {
            context: "data-plane I/O".into(),
            source,
        }
    }
}

/// A value with one wire form, written and read by the same description.
trait Wire: Sized {
    /// Bytes of the shortest encoding (bounds item counts by the bytes left).
    const MIN_LEN: usize;
    /// Bytes `put` writes.
    fn len(&self) -> usize;
    fn put(&self, out: &mut BytesMut);
    fn get(r: &mut Reader<'_>) -> Result<Self, WireError>;
}

macro_rules! wire_primitive {
    ($($t:ty => $put:ident, $get:ident;)*) => {$(
        impl Wire for $t {
            const MIN_LEN: usize = std::mem::size_of::<$t>();
            fn len(&self) -> usize {
                Self::MIN_LEN
            }
            fn put(&self, out: &mut BytesMut) {
                out.$put(*self);
            }
            fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
                r.need(Self::MIN_LEN)?;
                Ok(r.buf.$get())
            }
        }
    )*};
}

wire_primitive! {
    u8 => put_u8, get_u8;
    u32 => put_u32_le, get_u32_le;
    u64 => put_u64_le, get_u64_le;
    f32 => put_f32_le, get_f32_le;
}

impl Wire for bool {
    const MIN_LEN: usize = 1;
    fn len(&self) -> usize {
        1
    }
    fn put(&self, out: &mut BytesMut) {
        out.put_u8(u8::from(*self));
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(u8::get(r)? != 0)
    }
}

impl<T: Wire> Wire for Vec<T> {
    const MIN_LEN: usize = 4;
    fn len(&self) -> usize {
        4 + self.iter().map(Wire::len).sum::<usize>()
    }
    fn put(&self, out: &mut BytesMut) {
        out.put_u32_le(self.len() as u32);
        for item in self {
            item.put(out);
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let n = r.count(T::MIN_LEN)?;
        (0..n).map(|_| T::get(r)).collect()
    }
}

impl Wire for String {
    const MIN_LEN: usize = 4;
    fn len(&self) -> usize {
        4 + String::len(self)
    }
    fn put(&self, out: &mut BytesMut) {
        out.put_u32_le(self.len() as u32);
        out.put_slice(self.as_bytes());
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let n = r.count(1)?;
        Ok(String::from_utf8_lossy(r.take(n)?).into_owned())
    }
}

impl<T: Wire> Wire for Option<T> {
    const MIN_LEN: usize = 1;
    fn len(&self) -> usize {
        1 + self.as_ref().map_or(0, Wire::len)
    }
    fn put(&self, out: &mut BytesMut) {
        match self {
            Some(v) => {
                out.put_u8(1);
                v.put(out);
            }
            None => out.put_u8(0),
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        match u8::get(r)? {
            0 => Ok(None),
            _ => T::get(r).map(Some),
        }
    }
}

impl<A: Wire, B: Wire> Wire for (A, B) {
    const MIN_LEN: usize = A::MIN_LEN + B::MIN_LEN;
    fn len(&self) -> usize {
        self.0.len() + self.1.len()
    }
    fn put(&self, out: &mut BytesMut) {
        self.0.put(out);
        self.1.put(out);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok((A::get(r)?, B::get(r)?))
    }
}

/// Declares a header struct and its wire form at once: the fields, in declaration order.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl Wire for $name {
            const MIN_LEN: usize = 0 $(+ <$ty as Wire>::MIN_LEN)*;
            fn len(&self) -> usize {
                0 $(+ Wire::len(&self.$field))*
            }
            fn put(&self, out: &mut BytesMut) {
                $(self.$field.put(out);)*
            }
            fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
                Ok($name { $($field: <$ty as Wire>::get(r)?,)* })
            }
        }
    };
}

wire_struct! {
    /// Sampling settings of one sequence, applied by the last stage.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct SamplingParams {
        /// 0 means greedy.
        pub temperature: f32,
        /// 0 means off.
        pub top_k: u32,
        /// 1 means off.
        pub top_p: f32,
        /// 0 means off.
        pub min_p: f32,
        /// 1 means off (Hugging Face semantics, over prompt and output tokens).
        pub repetition_penalty: f32,
        /// 0 means off (OpenAI semantics, over output tokens).
        pub frequency_penalty: f32,
        /// 0 means off (OpenAI semantics, over output tokens).
        pub presence_penalty: f32,
        pub seed: u64,
        /// Number of top alternatives to return with each token (0: none).
        pub top_logprobs: u32,
        /// Whether the client asked for the sampled token's log-probability (asking for
        /// `top_logprobs` alternatives asks for it too: [`SamplingParams::wants_logprobs`]).
        pub logprobs: bool,
    }
}

impl SamplingParams {
    /// Whether log-probabilities go back to the client: without, the last stage skips the
    /// softmax's normalizer and a sample's `logprob` is NaN.
    pub fn wants_logprobs(&self) -> bool {
        self.logprobs || self.top_logprobs > 0
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            top_logprobs: 0,
            logprobs: false,
        }
    }
}

wire_struct! {
    /// One sequence's part of a step.
    #[derive(Debug, Clone, PartialEq)]
    pub struct SeqStep {
        pub seq_id: u64,
        /// Position of `tokens[0]`.
        pub pos0: u32,
        /// Number of prompt tokens; positions at or past it hold generated tokens.
        pub prompt_len: u32,
        /// Token ids at positions `pos0..pos0 + tokens.len()`.
        pub tokens: Vec<u32>,
        /// Whether the last stage samples a token after this chunk.
        pub sample: bool,
        pub params: SamplingParams,
        /// The sequence's KV blocks (the gateway owns them): position `p` lives in
        /// `blocks[p / KV_BLOCK_SIZE]`. Covers at least `pos0 + tokens.len()` positions.
        /// Empty when a single-process engine allocates for its caller.
        pub blocks: Vec<u32>,
        /// The first step of the sequence on the workers (after admission or a preemption):
        /// stages forget anything they held for its id, and the last stage starts its sampler
        /// from `history`.
        pub fresh: bool,
        /// On a fresh step, the tokens before `pos0` (a cached prefix, or what a recomputed
        /// sequence had), for the sampler's penalties; empty otherwise.
        pub history: Vec<u32>,
    }
}

/// Activations between stages: `rows` tokens (all sequences of the step, in order) × `cols`.
/// In a frame, the header carries `dtype`, `rows`, `cols` and the carrier; `data` is the
/// frame's payload, or (carried by NCCL) travels device to device beside the frame, which then
/// has none.
#[derive(Debug, Clone, PartialEq)]
pub struct Activations {
    pub dtype: ActDType,
    pub rows: u32,
    pub cols: u32,
    pub carrier: Carrier,
    pub data: Bytes,
}

impl Wire for Activations {
    const MIN_LEN: usize = 10;
    /// The shape and carrier only: the data travels as the frame's payload (or over NCCL).
    fn len(&self) -> usize {
        Self::MIN_LEN
    }
    fn put(&self, out: &mut BytesMut) {
        (self.dtype as u8).put(out);
        self.rows.put(out);
        self.cols.put(out);
        (self.carrier as u8).put(out);
    }
    /// The shape and carrier only: [`Frame::decode`] attaches the payload and checks its
    /// length.
    fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Activations {
            dtype: ActDType::from_u8(u8::get(r)?)?,
            rows: u32::get(r)?,
            cols: u32::get(r)?,
            carrier: Carrier::from_u8(u8::get(r)?)?,
            data: Bytes::new(),
        })
    }
}

impl Activations {
    /// Activations carried in the frame.
    pub fn in_frame(dtype: ActDType, rows: u32, cols: u32, data: Bytes) -> Self {
        Activations {
            dtype,
            rows,
            cols,
            carrier: Carrier::Frame,
            data,
        }
    }

    /// Bytes `rows × cols` elements of `dtype` take.
    pub fn expected_len(&self) -> u64 {
        u64::from(self.rows) * u64::from(self.cols) * self.dtype.size() as u64
    }

    /// Bytes of payload the frame carries for them: all, or none when NCCL carries them.
    pub fn payload_len(&self) -> u64 {
        match self.carrier {
            Carrier::Frame => self.expected_len(),
            Carrier::Nccl => 0,
        }
    }
}

/// How a step's activations travel to the next stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// In the frame, as its payload (the TCP ring).
    Frame = 0,
    /// Device to device over the hop's NCCL communicator (the sender queues the transfer, then
    /// the frame): the frame carries only the step header.
    Nccl = 1,
}

impl Carrier {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            0 => Ok(Carrier::Frame),
            1 => Ok(Carrier::Nccl),
            _ => Err(WireError::Malformed(format!(
                "unknown activation carrier {v}"
            ))),
        }
    }
}

/// Element type of [`Activations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActDType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

impl ActDType {
    pub fn size(self) -> usize {
        match self {
            ActDType::F32 => 4,
            ActDType::F16 | ActDType::BF16 => 2,
        }
    }

    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            0 => Ok(ActDType::F32),
            1 => Ok(ActDType::F16),
            2 => Ok(ActDType::BF16),
            _ => Err(WireError::Malformed(format!(
                "unknown activation dtype {v}"
            ))),
        }
    }
}

wire_struct! {
    /// A step travelling down the route.
    #[derive(Debug, Clone, PartialEq)]
    pub struct StepFrame {
        pub step_id: u64,
        /// Route index of the stage this frame is addressed to.
        pub stage: u32,
        /// Sequences whose state every stage frees before running this step.
        pub releases: Vec<u64>,
        pub seqs: Vec<SeqStep>,
        /// Hidden states from the previous stage; `None` into the first stage.
        pub hidden: Option<Activations>,
        /// W3C `traceparent` of the span that sent the step (the gateway's step span, then each
        /// stage's), so that every process's spans join the batch's trace; empty: none.
        pub trace: String,
        /// Steps the gateway had in flight when it sent this one, itself included: above 1,
        /// other stages compute at the same time, and a worker that shares its host's cores
        /// with them keeps to its share.
        pub concurrent: u32,
        /// How long the stages it passed held it and computed on it, so far.
        pub times: StageTimes,
    }
}

wire_struct! {
    /// How long the stages a step passed held it, summed over them: from its arrival at each
    /// stage's worker to the end of that stage's computation on it (`held_us`, waiting behind
    /// other steps included), and the computation alone (`compute_us`). Whatever else a step's
    /// round trip took was spent on the hops (and in the gateway): what more steps in flight
    /// can hide.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct StageTimes {
        pub held_us: u64,
        pub compute_us: u64,
    }
}

impl StageTimes {
    /// These times with one more stage's: it held the step `held` and computed `compute`.
    #[must_use]
    pub fn and(self, held: std::time::Duration, compute: std::time::Duration) -> Self {
        let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        StageTimes {
            held_us: self.held_us.saturating_add(us(held)),
            compute_us: self.compute_us.saturating_add(us(compute)),
        }
    }
}

wire_struct! {
    /// One sampled token.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Sample {
        pub seq_id: u64,
        pub token: u32,
        /// Log-probability of `token` under the model's distribution.
        pub logprob: f32,
        /// The most likely tokens with their log-probabilities, best first.
        pub top: Vec<(u32, f32)>,
    }
}

wire_struct! {
    /// The last stage's answer to a step.
    #[derive(Debug, Clone, PartialEq)]
    pub struct SamplesFrame {
        pub step_id: u64,
        pub samples: Vec<Sample>,
        /// The step's times over every stage.
        pub times: StageTimes,
    }
}

wire_struct! {
    /// A stage's failure on a step, sent on to the gateway instead of the step: every later
    /// stage passes it along untouched (addressed by `to`, like a step) until it reaches the
    /// gateway.
    #[derive(Debug, Clone, PartialEq)]
    pub struct ErrorFrame {
        pub step_id: u64,
        /// The stage that failed.
        pub stage: u32,
        /// Route index of the stage this frame is addressed to (the gateway past the last stage).
        pub to: u32,
        pub message: String,
    }
}

wire_struct! {
    /// The first frame on every data-plane connection: the session token the gateway handed
    /// its workers at load. A listener drops a connection that opens with anything else.
    #[derive(Debug, Clone, PartialEq)]
    pub struct HelloFrame {
        pub session: String,
    }
}

/// Any data-plane frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Step(StepFrame),
    Samples(SamplesFrame),
    Error(ErrorFrame),
    Hello(HelloFrame),
    /// Sent on an idle connection so that its receiver can tell a quiet link from a stalled
    /// one (see `transport::LINK_DEADLINE`). Empty.
    Heartbeat,
}

const KIND_STEP: u16 = 1;
const KIND_SAMPLES: u16 = 2;
const KIND_ERROR: u16 = 3;
const KIND_HELLO: u16 = 4;
const KIND_HEARTBEAT: u16 = 5;

/// The parsed prelude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prelude {
    pub kind: u16,
    pub header_len: u32,
    pub payload_len: u64,
}

impl Prelude {
    /// Parses and checks a prelude against `max_frame` bytes.
    pub fn parse(buf: &[u8; PRELUDE_LEN], max_frame: usize) -> Result<Self, WireError> {
        let mut b = &buf[..];
        let mut magic = [0u8; 4];
        b.copy_to_slice(&mut magic);
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        let version = b.get_u16_le();
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let kind = b.get_u16_le();
        if !(KIND_STEP..=KIND_HEARTBEAT).contains(&kind) {
            return Err(WireError::Kind(kind));
        }
        let header_len = b.get_u32_le();
        let payload_len = b.get_u64_le();
        // A length near u64::MAX must not wrap around into a small frame.
        let size = u64::from(header_len).saturating_add(payload_len);
        if header_len as usize > MAX_HEADER_BYTES || size > max_frame as u64 {
            return Err(WireError::TooLarge {
                size,
                limit: max_frame,
            });
        }
        Ok(Prelude {
            kind,
            header_len,
            payload_len,
        })
    }
}

impl Frame {
    /// The frame's kind, header and payload (shared, not copied).
    fn parts(&self) -> (u16, BytesMut, Bytes) {
        let mut h = BytesMut::with_capacity(256);
        let (kind, payload) = match self {
            Frame::Step(s) => {
                s.put(&mut h);
                (
                    KIND_STEP,
                    s.hidden
                        .as_ref()
                        .map(|a| a.data.clone())
                        .unwrap_or_default(),
                )
            }
            Frame::Samples(s) => {
                s.put(&mut h);
                (KIND_SAMPLES, Bytes::new())
            }
            Frame::Error(e) => {
                e.put(&mut h);
                (KIND_ERROR, Bytes::new())
            }
            Frame::Hello(hello) => {
                hello.put(&mut h);
                (KIND_HELLO, Bytes::new())
            }
            Frame::Heartbeat => (KIND_HEARTBEAT, Bytes::new()),
        };
        (kind, h, payload)
    }

    /// Appends the whole frame (prelude, header, payload) to `out`, refusing one larger than
    /// `max_frame` bytes of header and payload (what the peer would refuse).
    pub fn encode_into(&self, out: &mut BytesMut, max_frame: usize) -> Result<(), WireError> {
        let (kind, h, payload) = self.parts();
        let size = (h.len() + payload.len()) as u64;
        if h.len() > MAX_HEADER_BYTES || size > max_frame as u64 {
            return Err(WireError::TooLarge {
                size,
                limit: max_frame,
            });
        }
        out.reserve(PRELUDE_LEN + size as usize);
        out.put_slice(&MAGIC);
        out.put_u16_le(VERSION);
        out.put_u16_le(kind);
        out.put_u32_le(h.len() as u32);
        out.put_u64_le(payload.len() as u64);
        out.put_u32_le(0);
        out.put_slice(&h);
        out.put_slice(&payload);
        Ok(())
    }

    /// Bytes the whole frame takes on the wire (prelude, header and payload), from the field
    /// descriptions alone: nothing is encoded.
    pub fn wire_len(&self) -> u64 {
        let (header, payload) = match self {
            Frame::Step(s) => (s.len(), s.hidden.as_ref().map_or(0, |a| a.data.len())),
            Frame::Samples(s) => (s.len(), 0),
            Frame::Error(e) => (e.len(), 0),
            Frame::Hello(h) => (h.len(), 0),
            Frame::Heartbeat => (0, 0),
        };
        (PRELUDE_LEN + header + payload) as u64
    }

    /// The whole frame as bytes (no size limit beyond the header's).
    pub fn to_bytes(&self) -> Result<BytesMut, WireError> {
        let mut out = BytesMut::new();
        self.encode_into(&mut out, usize::MAX)?;
        Ok(out)
    }

    /// Decodes one whole frame from `bytes` (prelude, header, payload; nothing after).
    pub fn from_bytes(bytes: &[u8], max_frame: usize) -> Result<Frame, WireError> {
        let mut buf = BytesMut::from(bytes);
        let frame = FrameCodec::new(max_frame)
            .decode_eof(&mut buf)?
            .ok_or_else(|| WireError::Malformed("no frame".into()))?;
        if !buf.is_empty() {
            return Err(WireError::Malformed(format!(
                "{} bytes after the frame",
                buf.len()
            )));
        }
        Ok(frame)
    }

    /// Decodes a frame from its prelude, header bytes and payload.
    pub fn decode(prelude: &Prelude, header: &[u8], payload: Bytes) -> Result<Frame, WireError> {
        let mut r = Reader { buf: header };
        let frame = match prelude.kind {
            KIND_STEP => {
                let mut step = StepFrame::get(&mut r)?;
                match &mut step.hidden {
                    Some(a) if a.payload_len() != payload.len() as u64 => {
                        return Err(WireError::Malformed(format!(
                            "activations {}x{} of {:?} carried by {:?} need {} bytes of payload, it has {}",
                            a.rows,
                            a.cols,
                            a.dtype,
                            a.carrier,
                            a.payload_len(),
                            payload.len()
                        )));
                    }
                    Some(a) => a.data = payload,
                    None if !payload.is_empty() => {
                        return Err(WireError::Malformed(format!(
                            "a step without activations has a {}-byte payload",
                            payload.len()
                        )));
                    }
                    None => {}
                }
                Frame::Step(step)
            }
            KIND_SAMPLES => Frame::Samples(SamplesFrame::get(&mut r)?),
            KIND_ERROR => Frame::Error(ErrorFrame::get(&mut r)?),
            KIND_HELLO => Frame::Hello(HelloFrame::get(&mut r)?),
            KIND_HEARTBEAT => Frame::Heartbeat,
            k => return Err(WireError::Kind(k)),
        };
        if !r.buf.is_empty() {
            return Err(WireError::Malformed(format!(
                "{} trailing header bytes",
                r.buf.len()
            )));
        }
        Ok(frame)
    }
}

/// Frames on a byte stream, for `tokio_util::codec::{FramedRead, FramedWrite}`: a size limit
/// on both sides (a sender refuses what its peer would), and a stream that ends inside a frame
/// is an error, not a clean close.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame_bytes: usize,
    /// The prelude of the frame being read, once parsed.
    pending: Option<Prelude>,
}

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec {
            max_frame_bytes,
            pending: None,
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let prelude = match self.pending {
            Some(p) => p,
            None => {
                let Some(pre) = src.get(..PRELUDE_LEN) else {
                    return Ok(None);
                };
                let pre: &[u8; PRELUDE_LEN] = pre
                    .try_into()
                    .map_err(|_| WireError::Malformed("short prelude".into()))?;
                let p = Prelude::parse(pre, self.max_frame_bytes)?;
                self.pending = Some(p);
                p
            }
        };
        let total = PRELUDE_LEN + prelude.header_len as usize + prelude.payload_len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        self.pending = None;
        let mut frame = src.split_to(total);
        frame.advance(PRELUDE_LEN);
        let header = frame.split_to(prelude.header_len as usize);
        Frame::decode(&prelude, &header, frame.freeze()).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(WireError::from(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the connection closed {} bytes into a frame", src.len()),
            ))),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        frame.encode_into(dst, self.max_frame_bytes)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed(format!(
                "header ends early ({} bytes left, {n} needed)",
                self.buf.len()
            )));
        }
        Ok(())
    }
    /// A count of items each at least `min_item` bytes long, bounded by the bytes left.
    fn count(&mut self, min_item: usize) -> Result<usize, WireError> {
        let n = u32::get(self)? as usize;
        self.need(n.saturating_mul(min_item))?;
        Ok(n)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        self.need(n)?;
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
}

#[cfg(test)]
mod tests;
