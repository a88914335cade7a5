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
//! A step frame carries a micro-batch of sequences, each with its first position and its
//! token ids (the first stage embeds them; the last stage keeps them for repetition
//! penalties), and the sequences to release before running. The last stage answers with a
//! samples frame: one sampled token (and log-probabilities) per sequence that asked for one.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"STRF";
/// Wire version; a peer with another version is refused.
pub const VERSION: u16 = 1;
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
        }
    }
}

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
}

/// Activations between stages: `rows` tokens (all sequences of the step, in order) × `cols`.
#[derive(Debug, Clone, PartialEq)]
pub struct Activations {
    pub dtype: ActDType,
    pub rows: u32,
    pub cols: u32,
    pub data: Bytes,
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
}

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

/// The last stage's answer to a step.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplesFrame {
    pub step_id: u64,
    pub samples: Vec<Sample>,
}

/// A stage's failure on a step, sent on to the gateway instead of the step: every later stage
/// passes it along untouched (addressed by `to`, like a step) until it reaches the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorFrame {
    pub step_id: u64,
    /// The stage that failed.
    pub stage: u32,
    /// Route index of the stage this frame is addressed to (the gateway past the last stage).
    pub to: u32,
    pub message: String,
}

/// Any data-plane frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Step(StepFrame),
    Samples(SamplesFrame),
    Error(ErrorFrame),
}

const KIND_STEP: u16 = 1;
const KIND_SAMPLES: u16 = 2;
const KIND_ERROR: u16 = 3;

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
        if !(KIND_STEP..=KIND_ERROR).contains(&kind) {
            return Err(WireError::Kind(kind));
        }
        let header_len = b.get_u32_le();
        let payload_len = b.get_u64_le();
        let size = u64::from(header_len) + payload_len;
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
    /// Bytes of header and payload (what a frame-size limit counts).
    pub fn encoded_len(encoded: &(BytesMut, Option<Bytes>)) -> u64 {
        (encoded.0.len() - PRELUDE_LEN) as u64 + encoded.1.as_ref().map_or(0, |p| p.len() as u64)
    }

    /// Encodes into (prelude + header, payload); the payload is shared, not copied.
    pub fn encode(&self) -> (BytesMut, Option<Bytes>) {
        let mut h = BytesMut::with_capacity(256);
        let (kind, payload) = match self {
            Frame::Step(s) => {
                h.put_u64_le(s.step_id);
                h.put_u32_le(s.stage);
                h.put_u32_le(s.releases.len() as u32);
                for r in &s.releases {
                    h.put_u64_le(*r);
                }
                h.put_u32_le(s.seqs.len() as u32);
                for q in &s.seqs {
                    h.put_u64_le(q.seq_id);
                    h.put_u32_le(q.pos0);
                    h.put_u32_le(q.prompt_len);
                    h.put_u8(u8::from(q.sample));
                    let p = &q.params;
                    h.put_f32_le(p.temperature);
                    h.put_u32_le(p.top_k);
                    h.put_f32_le(p.top_p);
                    h.put_f32_le(p.min_p);
                    h.put_f32_le(p.repetition_penalty);
                    h.put_f32_le(p.frequency_penalty);
                    h.put_f32_le(p.presence_penalty);
                    h.put_u64_le(p.seed);
                    h.put_u32_le(p.top_logprobs);
                    h.put_u32_le(q.tokens.len() as u32);
                    for t in &q.tokens {
                        h.put_u32_le(*t);
                    }
                }
                match &s.hidden {
                    Some(a) => {
                        h.put_u8(1);
                        h.put_u8(a.dtype as u8);
                        h.put_u32_le(a.rows);
                        h.put_u32_le(a.cols);
                        (KIND_STEP, Some(a.data.clone()))
                    }
                    None => {
                        h.put_u8(0);
                        (KIND_STEP, None)
                    }
                }
            }
            Frame::Samples(s) => {
                h.put_u64_le(s.step_id);
                h.put_u32_le(s.samples.len() as u32);
                for x in &s.samples {
                    h.put_u64_le(x.seq_id);
                    h.put_u32_le(x.token);
                    h.put_f32_le(x.logprob);
                    h.put_u32_le(x.top.len() as u32);
                    for (t, lp) in &x.top {
                        h.put_u32_le(*t);
                        h.put_f32_le(*lp);
                    }
                }
                (KIND_SAMPLES, None)
            }
            Frame::Error(e) => {
                h.put_u64_le(e.step_id);
                h.put_u32_le(e.stage);
                h.put_u32_le(e.to);
                h.put_u32_le(e.message.len() as u32);
                h.put_slice(e.message.as_bytes());
                (KIND_ERROR, None)
            }
        };
        let payload_len = payload.as_ref().map_or(0, Bytes::len);
        let mut out = BytesMut::with_capacity(PRELUDE_LEN + h.len());
        out.put_slice(&MAGIC);
        out.put_u16_le(VERSION);
        out.put_u16_le(kind);
        out.put_u32_le(h.len() as u32);
        out.put_u64_le(payload_len as u64);
        out.put_u32_le(0);
        out.put_slice(&h);
        (out, payload)
    }

    /// Decodes a frame from its prelude, header bytes and payload.
    pub fn decode(prelude: &Prelude, header: &[u8], payload: Bytes) -> Result<Frame, WireError> {
        let mut r = Reader { buf: header };
        let frame = match prelude.kind {
            KIND_STEP => {
                let step_id = r.u64()?;
                let stage = r.u32()?;
                let n_rel = r.count(8)?;
                let mut releases = Vec::with_capacity(n_rel);
                for _ in 0..n_rel {
                    releases.push(r.u64()?);
                }
                let n_seqs = r.count(60)?;
                let mut seqs = Vec::with_capacity(n_seqs);
                for _ in 0..n_seqs {
                    let seq_id = r.u64()?;
                    let pos0 = r.u32()?;
                    let prompt_len = r.u32()?;
                    let sample = r.u8()? != 0;
                    let params = SamplingParams {
                        temperature: r.f32()?,
                        top_k: r.u32()?,
                        top_p: r.f32()?,
                        min_p: r.f32()?,
                        repetition_penalty: r.f32()?,
                        frequency_penalty: r.f32()?,
                        presence_penalty: r.f32()?,
                        seed: r.u64()?,
                        top_logprobs: r.u32()?,
                    };
                    let n_tok = r.count(4)?;
                    let mut tokens = Vec::with_capacity(n_tok);
                    for _ in 0..n_tok {
                        tokens.push(r.u32()?);
                    }
                    seqs.push(SeqStep {
                        seq_id,
                        pos0,
                        prompt_len,
                        tokens,
                        sample,
                        params,
                    });
                }
                let hidden = match r.u8()? {
                    0 => None,
                    _ => {
                        let dtype = ActDType::from_u8(r.u8()?)?;
                        let rows = r.u32()?;
                        let cols = r.u32()?;
                        let want = rows as u64 * cols as u64 * dtype.size() as u64;
                        if want != payload.len() as u64 {
                            return Err(WireError::Malformed(format!(
                                "activations {rows}x{cols} of {dtype:?} need {want} bytes, payload has {}",
                                payload.len()
                            )));
                        }
                        Some(Activations {
                            dtype,
                            rows,
                            cols,
                            data: payload,
                        })
                    }
                };
                Frame::Step(StepFrame {
                    step_id,
                    stage,
                    releases,
                    seqs,
                    hidden,
                })
            }
            KIND_SAMPLES => {
                let step_id = r.u64()?;
                let n = r.count(20)?;
                let mut samples = Vec::with_capacity(n);
                for _ in 0..n {
                    let seq_id = r.u64()?;
                    let token = r.u32()?;
                    let logprob = r.f32()?;
                    let k = r.count(8)?;
                    let mut top = Vec::with_capacity(k);
                    for _ in 0..k {
                        top.push((r.u32()?, r.f32()?));
                    }
                    samples.push(Sample {
                        seq_id,
                        token,
                        logprob,
                        top,
                    });
                }
                Frame::Samples(SamplesFrame { step_id, samples })
            }
            KIND_ERROR => {
                let step_id = r.u64()?;
                let stage = r.u32()?;
                let to = r.u32()?;
                let n = r.count(1)?;
                let bytes = r.take(n)?;
                Frame::Error(ErrorFrame {
                    step_id,
                    stage,
                    to,
                    message: String::from_utf8_lossy(bytes).into_owned(),
                })
            }
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
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }
    fn f32(&mut self) -> Result<f32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_f32_le())
    }
    /// A count of items each at least `min_item` bytes long, bounded by the bytes left.
    fn count(&mut self, min_item: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
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
mod tests {
    use super::*;

    fn round_trip(f: &Frame) -> Frame {
        let (head, payload) = f.encode();
        let prelude = Prelude::parse(
            head[..PRELUDE_LEN].try_into().unwrap(),
            DEFAULT_MAX_FRAME_BYTES,
        )
        .unwrap();
        assert_eq!(prelude.header_len as usize, head.len() - PRELUDE_LEN);
        Frame::decode(&prelude, &head[PRELUDE_LEN..], payload.unwrap_or_default()).unwrap()
    }

    #[test]
    fn frames_round_trip() {
        let step = Frame::Step(StepFrame {
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
                    ..Default::default()
                },
            }],
            hidden: Some(Activations {
                dtype: ActDType::F32,
                rows: 3,
                cols: 2,
                data: Bytes::from(vec![0u8; 24]),
            }),
        });
        assert_eq!(round_trip(&step), step);
        let samples = Frame::Samples(SamplesFrame {
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
        let (head, _) = Frame::Error(ErrorFrame {
            step_id: 1,
            stage: 0,
            to: 1,
            message: "x".into(),
        })
        .encode();
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
}
