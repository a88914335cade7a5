//! The per-sequence output stage: what a client sees of its sequence. The scheduler hands it
//! each sampled token and the sequence's end; it detokenizes incrementally, matches stop
//! sequences (holding back text that may start one), builds the API's events and sends them on
//! the client's stream. It is the only part of scheduling that needs the tokenizer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_proto::v1::{
    FinishReason, Finished, GenerateResponse, Timings, Token, TopLogprob, Usage, generate_response,
};
use strata_shared::wire::Sample;
use tokio::sync::mpsc;
use tonic::Status;

use crate::metrics::GatewayMetrics;
use crate::tokenizer::{ModelTokenizer, StopMatcher, StopOutcome, StreamDecoder};
use crate::validation::ValidRequest;

/// Where a request's events go.
pub type EventSender = mpsc::Sender<Result<GenerateResponse, Status>>;

/// What the output stage says after a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenVerdict {
    /// Go on generating.
    Continue,
    /// A stop sequence completed: the sequence ends with [`FinishReason::Stop`].
    Stop { stop_sequence: String },
    /// The client cannot be reached any more (gone, or sent an error): drop the sequence.
    Gone,
}

/// How a sequence ended, as the scheduler saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqEnd {
    pub reason: FinishReason,
    /// The stop sequence that ended it (with [`FinishReason::Stop`]), else empty.
    pub stop_sequence: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub timings: Timings,
    pub seed: u64,
}

/// One sequence's results, as the scheduler reports them.
pub trait SeqOutput: Send + 'static {
    /// A sampled token that does not end the sequence by itself (not an end-of-sequence token);
    /// `index` is its place in the output.
    fn token(&mut self, sample: &Sample, index: u32) -> TokenVerdict;
    /// The sequence ended normally (EOS, length, stop sequence or cancellation).
    fn finish(self, end: SeqEnd);
    /// The sequence failed: its stream ends with `status`.
    fn fail(self, status: Status);
    /// Whether the client has gone (its stream closed).
    fn is_closed(&self) -> bool;
    /// The sequence was sent in step `step_id`, whose span is `batch`.
    fn scheduled(&mut self, _step_id: u64, _batch: &tracing::Span) {}
    /// The request's span: a batch step it leads is traced as its child.
    fn span(&self) -> Option<&tracing::Span> {
        None
    }
}

/// What an output stage reports about its request: the metrics it feeds and the request's
/// span, with children for its time in the queue and for each step it took part in (each
/// linked to the batch step's span, which every worker's spans descend from).
#[derive(Debug)]
pub struct RequestObserver {
    metrics: Option<Arc<GatewayMetrics>>,
    span: tracing::Span,
    queue: Option<tracing::Span>,
    step: Option<tracing::Span>,
    arrived: Instant,
    last_token: Option<Instant>,
    prompt_tokens: u32,
    /// The request's place in its API key's stream limit, given back when it ends (before
    /// its last event goes out, so that a client that starts its next stream on it is
    /// admitted).
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl RequestObserver {
    /// Observes a request of `prompt_tokens` tokens, arrived now, whose span is `span`.
    pub fn new(metrics: Arc<GatewayMetrics>, span: tracing::Span, prompt_tokens: u32) -> Self {
        let queue = tracing::info_span!(parent: &span, "queue");
        RequestObserver {
            metrics: Some(metrics),
            span,
            queue: Some(queue),
            step: None,
            arrived: Instant::now(),
            last_token: None,
            prompt_tokens,
            permit: None,
        }
    }

    /// Holds `permit` until the request ends.
    pub fn holding(mut self, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        self.permit = permit;
        self
    }

    /// Observes nothing.
    pub fn none() -> Self {
        RequestObserver {
            metrics: None,
            span: tracing::Span::none(),
            queue: None,
            step: None,
            arrived: Instant::now(),
            last_token: None,
            prompt_tokens: 0,
            permit: None,
        }
    }

    fn scheduled(&mut self, step_id: u64, batch: &tracing::Span) {
        self.queue = None;
        let step = tracing::info_span!(parent: &self.span, "step", step_id);
        strata_shared::telemetry::link(&step, batch);
        self.step = Some(step);
    }

    fn token(&mut self) {
        self.step = None;
        let now = Instant::now();
        if let Some(m) = &self.metrics {
            if self.last_token.is_none() {
                m.first_token(now - self.arrived, self.prompt_tokens);
            }
            m.token(self.last_token.map(|t| now - t));
        }
        self.last_token = Some(now);
    }

    fn finished(&mut self, end: &SeqEnd) {
        self.step = None;
        self.permit = None;
        let reason = crate::metrics::finish_label(end.reason);
        self.span.record("finish_reason", reason);
        self.span.record("completion_tokens", end.completion_tokens);
        self.span.record("status", "OK");
        tracing::info!(parent: &self.span, reason, completion_tokens = end.completion_tokens, "request finished");
        if let Some(m) = &self.metrics {
            let ms = |v: f64| Duration::from_secs_f64(v.max(0.0) / 1000.0);
            m.finished(
                end.reason,
                ms(end.timings.total_ms),
                ms(end.timings.queue_ms),
                ms(end.timings.time_to_first_token_ms),
            );
        }
    }

    fn failed(&mut self, status: &Status) {
        self.step = None;
        self.permit = None;
        self.queue = None;
        let code = format!("{:?}", status.code());
        self.span.record("status", code.as_str());
        tracing::warn!(parent: &self.span, status = %code, message = status.message(), "request failed");
        if let Some(m) = &self.metrics {
            m.failed(status.code());
        }
    }
}

/// The real output stage: detokenizer, stop matcher and the client's event channel.
#[derive(Debug)]
pub struct StreamOutput {
    tokenizer: Arc<ModelTokenizer>,
    events: EventSender,
    decoder: StreamDecoder,
    stop: StopMatcher,
    logprobs: bool,
    observer: RequestObserver,
}

impl StreamOutput {
    pub fn new(
        tokenizer: &Arc<ModelTokenizer>,
        request: &ValidRequest,
        events: EventSender,
    ) -> Self {
        StreamOutput {
            tokenizer: Arc::clone(tokenizer),
            events,
            decoder: tokenizer.stream_decoder(&request.input_ids, !request.include_special_tokens),
            stop: StopMatcher::new(request.stop.clone()),
            logprobs: request.params.wants_logprobs(),
            observer: RequestObserver::none(),
        }
    }

    /// Reports to `observer` what happens to the request.
    pub fn observed(mut self, observer: RequestObserver) -> Self {
        self.observer = observer;
        self
    }
}

impl SeqOutput for StreamOutput {
    fn token(&mut self, sample: &Sample, index: u32) -> TokenVerdict {
        self.observer.token();
        let delta = match self.decoder.push(sample.token) {
            Ok(d) => d,
            Err(e) => {
                let _ = self.events.try_send(Err(e.into()));
                return TokenVerdict::Gone;
            }
        };
        let (text, verdict) = match self.stop.push(&delta) {
            StopOutcome::Continue(t) => (t, TokenVerdict::Continue),
            StopOutcome::Stopped { text, stop } => (
                text,
                TokenVerdict::Stop {
                    stop_sequence: stop,
                },
            ),
        };
        let (logprob, top_logprobs) = if self.logprobs {
            let top = sample
                .top
                .iter()
                .map(|&(id, lp)| TopLogprob {
                    id,
                    text: self.tokenizer.decode(&[id], false).unwrap_or_default(),
                    logprob: lp,
                })
                .collect();
            (Some(sample.logprob), top)
        } else {
            (None, Vec::new())
        };
        let event = generate_response::Event::Token(Token {
            id: sample.token,
            text,
            logprob,
            top_logprobs,
            index,
        });
        match self
            .events
            .try_send(Ok(GenerateResponse { event: Some(event) }))
        {
            Ok(()) => verdict,
            Err(_) => TokenVerdict::Gone,
        }
    }

    fn finish(mut self, end: SeqEnd) {
        self.observer.finished(&end);
        // A stop sequence is never emitted; any other end releases the held-back text.
        let text = if end.reason == FinishReason::Stop {
            String::new()
        } else {
            self.stop.flush()
        };
        let finished = Finished {
            reason: end.reason as i32,
            usage: Some(Usage {
                prompt_tokens: end.prompt_tokens,
                completion_tokens: end.completion_tokens,
            }),
            timings: Some(end.timings),
            seed: end.seed,
            text,
            stop_sequence: end.stop_sequence,
        };
        let _ = self.events.try_send(Ok(GenerateResponse {
            event: Some(generate_response::Event::Finished(finished)),
        }));
    }

    fn fail(mut self, status: Status) {
        self.observer.failed(&status);
        let _ = self.events.try_send(Err(status));
    }

    fn is_closed(&self) -> bool {
        self.events.is_closed()
    }

    fn scheduled(&mut self, step_id: u64, batch: &tracing::Span) {
        self.observer.scheduled(step_id, batch);
    }

    fn span(&self) -> Option<&tracing::Span> {
        Some(&self.observer.span)
    }
}

/// The output stage with the real tokenizer, driven by the scheduler's state.
#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::Instant;

    use strata_shared::source::{ModelFiles, WeightFormat};

    use super::super::state::{NewRequest, SchedulerState};
    use super::super::tests::{EOS, config, feed, prompt, request, sample};
    use super::*;

    type Events = mpsc::Receiver<Result<GenerateResponse, Status>>;

    /// The golden SmolLM2 tokenizer with EOS = 2.
    fn tok() -> Arc<ModelTokenizer> {
        static TOK: OnceLock<Arc<ModelTokenizer>> = OnceLock::new();
        Arc::clone(TOK.get_or_init(|| {
            let hf =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/smollm2/hf");
            let files = ModelFiles {
                spec: "smollm2".into(),
                format: WeightFormat::Safetensors,
                weights: vec![],
                config: Some(hf.join("config.json")),
                tokenizer_json: Some(hf.join("tokenizer.json")),
                tokenizer_config: Some(hf.join("tokenizer_config.json")),
                chat_template: None,
                generation_config: None,
            };
            Arc::new(ModelTokenizer::load(&files, None, &[EOS]).unwrap())
        }))
    }

    fn ids(text: &str) -> Vec<u32> {
        tok().encode(text, false).unwrap()
    }

    fn state() -> SchedulerState<StreamOutput> {
        assert_eq!(tok().eos_ids(), &[EOS]);
        SchedulerState::new(config(64, 64, 4), tok().eos_ids().to_vec())
    }

    fn submit(st: &mut SchedulerState<StreamOutput>, request: ValidRequest) -> Events {
        let (tx, rx) = mpsc::channel(256);
        st.enqueue(NewRequest {
            output: StreamOutput::new(&tok(), &request, tx),
            request,
            arrived: Instant::now(),
            deadline: None,
        });
        rx
    }

    /// Feeds `tokens` to sequence 1, one step each, while it runs.
    fn generate(st: &mut SchedulerState<StreamOutput>, tokens: &[u32]) -> usize {
        let mut fed = 0;
        while let Some(step) = st.next_step() {
            if step.seqs.is_empty() || fed == tokens.len() {
                break;
            }
            feed(st, &step, vec![sample(1, tokens[fed])]);
            fed += 1;
        }
        fed
    }

    /// What a client received.
    #[derive(Debug, Default)]
    struct Received {
        tokens: Vec<Token>,
        finished: Option<Finished>,
        error: Option<Status>,
    }

    impl Received {
        fn text(&self) -> String {
            let mut t: String = self.tokens.iter().map(|t| t.text.as_str()).collect();
            if let Some(f) = &self.finished {
                t.push_str(&f.text);
            }
            t
        }

        fn finished(&self) -> &Finished {
            self.finished
                .as_ref()
                .unwrap_or_else(|| panic!("not finished: {self:?}"))
        }

        fn reason(&self) -> FinishReason {
            FinishReason::try_from(self.finished().reason).unwrap()
        }
    }

    /// Everything queued on a client's stream; nothing may follow the end.
    fn drain(rx: &mut Events) -> Received {
        let mut r = Received::default();
        while let Ok(ev) = rx.try_recv() {
            assert!(
                r.finished.is_none() && r.error.is_none(),
                "event after the end: {ev:?}"
            );
            match ev {
                Ok(GenerateResponse {
                    event: Some(generate_response::Event::Token(t)),
                }) => r.tokens.push(t),
                Ok(GenerateResponse {
                    event: Some(generate_response::Event::Finished(f)),
                }) => r.finished = Some(f),
                Ok(other) => panic!("unexpected event {other:?}"),
                Err(e) => r.error = Some(e),
            }
        }
        r
    }

    #[test]
    fn tokens_stream_their_text_and_the_end_its_usage() {
        let mut st = state();
        let input = ids("The capital of France is");
        let out = ids(" Paris. The");
        assert_eq!((input.len(), out.len()), (5, 3));
        let mut rx = submit(&mut st, prompt(&input, 3));
        assert_eq!(generate(&mut st, &out), 3);
        let r = drain(&mut rx);
        assert_eq!(r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), out);
        assert_eq!(
            r.tokens.iter().map(|t| t.index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(
            r.tokens
                .iter()
                .all(|t| t.logprob.is_none() && t.top_logprobs.is_empty())
        );
        assert_eq!(r.text(), " Paris. The");
        assert_eq!(r.reason(), FinishReason::Length);
        let f = r.finished();
        assert_eq!((f.text.as_str(), f.stop_sequence.as_str()), ("", ""));
        let usage = f.usage.unwrap_or_default();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, 3));
        assert!(f.timings.is_some());
    }

    #[test]
    fn eos_ends_the_text_without_a_token_event() {
        let mut st = state();
        let mut rx = submit(&mut st, request(4, 10));
        let hello = ids(" Hello");
        generate(&mut st, &[hello[0], EOS]);
        let r = drain(&mut rx);
        assert_eq!(r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), hello);
        assert_eq!(r.reason(), FinishReason::Eos);
        assert_eq!(r.text(), " Hello");
    }

    #[test]
    fn special_tokens_are_skipped_in_the_text_unless_asked_for() {
        let mut st = state();
        let mut req = request(4, 3);
        req.ignore_eos = true;
        let mut rx = submit(&mut st, req.clone());
        req.include_special_tokens = true;
        let mut rx_special = submit(&mut st, req);
        for _ in 0..3 {
            let step = st.next_step().unwrap();
            assert_eq!(step.seqs.len(), 2);
            feed(&mut st, &step, vec![sample(1, EOS), sample(2, EOS)]);
        }
        let r = drain(&mut rx);
        assert_eq!(r.tokens.len(), 3);
        assert_eq!(r.text(), "", "special tokens are skipped in the text");
        assert_eq!(r.reason(), FinishReason::Length);
        let r = drain(&mut rx_special);
        assert_eq!(r.text(), "<|im_end|>".repeat(3));
        assert_eq!(r.reason(), FinishReason::Length);
    }

    #[test]
    fn a_stop_sequence_split_across_tokens_is_never_emitted() {
        let mut st = state();
        let out = ids(" Paris.\n\nThe answer");
        let mut req = request(5, 20);
        req.stop = vec![".\n\nThe".into(), "never".into()];
        let mut rx = submit(&mut st, req);
        let fed = generate(&mut st, &out);
        let r = drain(&mut rx);
        assert_eq!(fed, r.tokens.len());
        assert!(fed < out.len(), "stopped before ` answer`");
        assert_eq!(r.reason(), FinishReason::Stop);
        assert_eq!(r.finished().stop_sequence, ".\n\nThe");
        assert_eq!(r.text(), " Paris");
        assert!(
            r.tokens
                .iter()
                .all(|t| !t.text.contains('.') && !t.text.contains('\n')),
            "{r:?}"
        );
        assert!(!st.has_requests());
    }

    #[test]
    fn held_back_text_is_flushed_at_the_end() {
        let mut st = state();
        let out = ids(" Paris.");
        let mut req = request(5, out.len() as u32);
        req.stop = vec![". Nope".into()];
        let mut rx = submit(&mut st, req);
        generate(&mut st, &out);
        let r = drain(&mut rx);
        assert_eq!(r.reason(), FinishReason::Length);
        assert_eq!(
            r.tokens.last().map(|t| t.text.as_str()),
            Some(""),
            "`.` may start the stop sequence"
        );
        assert_eq!(r.finished().text, ".");
        assert_eq!(r.text(), " Paris.");
    }

    #[test]
    fn held_back_text_is_flushed_on_cancellation() {
        let mut st = state();
        let out = ids(" Paris.");
        let mut req = request(5, 10);
        req.stop = vec![". Nope".into()];
        let mut rx = submit(&mut st, req);
        generate(&mut st, &out);
        st.cancel_all();
        let r = drain(&mut rx);
        assert_eq!(r.reason(), FinishReason::Cancelled);
        assert_eq!(r.text(), " Paris.");
    }

    #[test]
    fn logprobs_come_with_tokens_when_asked() {
        let mut st = state();
        let mut req = request(4, 1);
        req.params.logprobs = true;
        let mut rx = submit(&mut st, req);
        let paris = ids(" Paris")[0];
        let step = st.next_step().unwrap();
        feed(
            &mut st,
            &step,
            vec![Sample {
                seq_id: 1,
                token: paris,
                logprob: -0.5,
                top: vec![(paris, -0.5), (EOS, -2.0)],
            }],
        );
        let r = drain(&mut rx);
        assert_eq!(r.tokens[0].logprob, Some(-0.5));
        assert_eq!(
            r.tokens[0].top_logprobs,
            vec![
                TopLogprob {
                    id: paris,
                    text: " Paris".into(),
                    logprob: -0.5
                },
                TopLogprob {
                    id: EOS,
                    text: "<|im_end|>".into(),
                    logprob: -2.0
                },
            ]
        );
    }

    #[test]
    fn multibyte_text_streams_whole_characters() {
        let mut st = state();
        let text = "日本語 🤖 ✓";
        let out = ids(text);
        assert!(
            out.len() > text.chars().count(),
            "some character spans tokens"
        );
        let mut rx = submit(&mut st, request(3, out.len() as u32));
        generate(&mut st, &out);
        let r = drain(&mut rx);
        assert_eq!(r.tokens.len(), out.len());
        assert!(
            r.tokens.iter().all(|t| !t.text.contains('\u{FFFD}')),
            "{r:?}"
        );
        assert!(r.tokens.iter().any(|t| t.text.is_empty()));
        assert_eq!(r.text(), text);
    }
}
