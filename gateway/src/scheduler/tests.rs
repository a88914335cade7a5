//! The scheduler's state and actor, with a recording [`SeqOutput`]: no tokenizer needed. (The
//! output stage's own tests, with the real tokenizer, are in `output.rs`.)
//!
//! (Longer than our ~800-line guide: it is tests only, sharing one set of fixtures across
//! admission, growth, preemption, prefix caching, pipelining and the property tests.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use strata_proto::v1::FinishReason;
use strata_shared::wire::{Sample, SamplesFrame, SamplingParams, SeqStep, StepFrame};
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use super::*;

/// `<|im_end|>`, the golden model's EOS.
pub(super) const EOS: u32 = 2;

/// What the scheduler told one sequence's output.
#[derive(Debug)]
enum Event {
    Token { id: u32, index: u32 },
    End(SeqEnd),
    Fail(Status),
}

/// Records what the scheduler reports; dropping the receiver is the client leaving. A token
/// equal to `stop_at` completes a stop sequence `<stop>`.
#[derive(Debug)]
struct TestOutput {
    tx: mpsc::UnboundedSender<Event>,
    stop_at: Option<u32>,
}

impl SeqOutput for TestOutput {
    fn token(&mut self, sample: &Sample, index: u32) -> TokenVerdict {
        let sent = self.tx.send(Event::Token {
            id: sample.token,
            index,
        });
        match (sent, self.stop_at) {
            (Err(_), _) => TokenVerdict::Gone,
            (Ok(()), Some(t)) if t == sample.token => TokenVerdict::Stop {
                stop_sequence: "<stop>".into(),
            },
            (Ok(()), _) => TokenVerdict::Continue,
        }
    }
    fn finish(self, end: SeqEnd) {
        let _ = self.tx.send(Event::End(end));
    }
    fn fail(self, status: Status) {
        let _ = self.tx.send(Event::Fail(status));
    }
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

type Events = mpsc::UnboundedReceiver<Event>;

pub(super) fn config(
    kv_blocks: usize,
    max_batch_tokens: usize,
    max_running: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        kv_blocks,
        block_size: 16,
        max_batch_tokens,
        max_running,
        max_waiting: 1024,
        prefix_caching: false,
    }
}

fn state(
    kv_blocks: usize,
    max_batch_tokens: usize,
    max_running: usize,
) -> SchedulerState<TestOutput> {
    SchedulerState::new(config(kv_blocks, max_batch_tokens, max_running), vec![EOS])
}

/// A request with a `prompt_len`-token prompt (ids 100, 101, ...).
pub(super) fn request(prompt_len: usize, max_new_tokens: u32) -> ValidRequest {
    prompt(
        &(0..prompt_len as u32).map(|i| 100 + i).collect::<Vec<_>>(),
        max_new_tokens,
    )
}

pub(super) fn prompt(input_ids: &[u32], max_new_tokens: u32) -> ValidRequest {
    ValidRequest {
        input_ids: input_ids.to_vec(),
        max_new_tokens,
        params: SamplingParams::default(),
        stop: vec![],
        ignore_eos: false,
        include_special_tokens: false,
    }
}

fn submit_stopping_at(
    st: &mut SchedulerState<TestOutput>,
    request: ValidRequest,
    stop_at: Option<u32>,
) -> Events {
    let (tx, rx) = mpsc::unbounded_channel();
    st.enqueue(NewRequest {
        request,
        output: TestOutput { tx, stop_at },
        arrived: Instant::now(),
        deadline: None,
    });
    rx
}

fn submit(st: &mut SchedulerState<TestOutput>, request: ValidRequest) -> Events {
    submit_stopping_at(st, request, None)
}

pub(super) fn sample(seq_id: u64, token: u32) -> Sample {
    Sample {
        seq_id,
        token,
        logprob: -0.25,
        top: vec![],
    }
}

pub(super) fn feed<O: SeqOutput>(
    st: &mut SchedulerState<O>,
    step: &StepFrame,
    samples: Vec<Sample>,
) {
    st.on_samples(SamplesFrame {
        times: Default::default(),
        step_id: step.step_id,
        samples,
    });
}

/// The step a decoding sequence takes (its block table as `blocks`).
fn decode_step(seq_id: u64, pos0: u32, prompt_len: u32, token: u32, blocks: Vec<u32>) -> SeqStep {
    SeqStep {
        seq_id,
        pos0,
        prompt_len,
        tokens: vec![token],
        sample: true,
        params: SamplingParams::default(),
        blocks,
        fresh: false,
        history: vec![],
    }
}

/// Completes a step that carries no sequences (only releases).
fn complete_empty<O: SeqOutput>(st: &mut SchedulerState<O>, step: &StepFrame) {
    assert!(step.seqs.is_empty(), "{step:?}");
    feed(st, step, vec![]);
}

/// What one output received.
#[derive(Debug, Default)]
struct Received {
    /// (token id, index)
    tokens: Vec<(u32, u32)>,
    end: Option<SeqEnd>,
    error: Option<Status>,
}

impl Received {
    fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.0).collect()
    }

    fn end(&self) -> &SeqEnd {
        self.end
            .as_ref()
            .unwrap_or_else(|| panic!("not finished: {self:?}"))
    }

    fn reason(&self) -> FinishReason {
        self.end().reason
    }

    fn usage(&self) -> (u32, u32) {
        (self.end().prompt_tokens, self.end().completion_tokens)
    }
}

/// Everything reported so far; nothing may follow the end.
fn drain(rx: &mut Events) -> Received {
    let mut r = Received::default();
    while let Ok(ev) = rx.try_recv() {
        assert!(
            r.end.is_none() && r.error.is_none(),
            "event after the end: {ev:?}"
        );
        match ev {
            Event::Token { id, index } => r.tokens.push((id, index)),
            Event::End(end) => r.end = Some(end),
            Event::Fail(e) => r.error = Some(e),
        }
    }
    r
}

fn seq_ids(step: &StepFrame) -> Vec<u64> {
    step.seqs.iter().map(|s| s.seq_id).collect()
}

#[test]
fn prefill_then_decode_positions() {
    let mut st = state(64, 64, 4);
    let input: Vec<u32> = (100..105).collect();
    let out = [500, 501, 502];
    let mut rx = submit(&mut st, prompt(&input, 3));
    assert_eq!(st.blocks.available(), 64, "no blocks before admission");

    let step = st.next_step().unwrap();
    assert_eq!(
        step,
        StepFrame {
            times: Default::default(),
            step_id: 1,
            stage: 0,
            releases: vec![],
            seqs: vec![SeqStep {
                seq_id: 1,
                pos0: 0,
                prompt_len: 5,
                tokens: input.clone(),
                sample: true,
                params: SamplingParams::default(),
                blocks: vec![0],
                fresh: true,
                history: vec![],
            }],
            hidden: None,
            trace: String::new(),
            concurrent: 1,
        }
    );
    assert_eq!(
        st.blocks.available(),
        63,
        "5 tokens take one 16-token block"
    );
    feed(&mut st, &step, vec![sample(1, out[0])]);
    for i in 1..out.len() {
        let step = st.next_step().unwrap();
        assert_eq!(step.step_id, 1 + i as u64);
        assert!(step.releases.is_empty());
        assert_eq!(
            step.seqs,
            vec![decode_step(1, 4 + i as u32, 5, out[i - 1], vec![0])]
        );
        feed(&mut st, &step, vec![sample(1, out[i])]);
    }

    let r = drain(&mut rx);
    assert_eq!(r.tokens, vec![(500, 0), (501, 1), (502, 2)]);
    assert_eq!(r.reason(), FinishReason::Length);
    assert_eq!(r.usage(), (5, 3));
    let end = r.end();
    assert_eq!(end.stop_sequence, "");
    assert_eq!(end.seed, SamplingParams::default().seed);
    let t = &end.timings;
    assert!(
        t.total_ms >= t.time_to_first_token_ms && t.time_to_first_token_ms >= t.queue_ms,
        "{t:?}"
    );

    // The next step releases the sequence; then there is nothing left to do.
    let step = st.next_step().unwrap();
    assert_eq!(
        (step.step_id, step.releases.clone(), step.seqs.len()),
        (4, vec![1], 0)
    );
    complete_empty(&mut st, &step);
    assert_eq!(st.blocks.available(), 64);
    assert!(st.is_idle());
    assert!(st.next_step().is_none());
    st.check_blocks().unwrap();
}

#[test]
fn long_prompts_are_chunked_behind_decode_tokens() {
    let mut st = state(64, 8, 4);
    let mut rx_a = submit(&mut st, request(3, 10));
    let step = st.next_step().unwrap();
    assert_eq!(step.seqs.len(), 1);
    assert_eq!(
        (
            step.seqs[0].pos0,
            step.seqs[0].tokens.len(),
            step.seqs[0].sample
        ),
        (0, 3, true)
    );
    feed(&mut st, &step, vec![sample(1, 500)]);

    let mut rx_b = submit(&mut st, request(20, 5));
    let b_prompt: Vec<u32> = (100..120).collect();
    // 20 prompt tokens, 7 per step (one of the 8 goes to A's decode token, scheduled first).
    let chunks = [(0usize, 7usize, false), (7, 7, false), (14, 6, true)];
    for (i, (pos0, n, samples)) in chunks.into_iter().enumerate() {
        let step = st.next_step().unwrap();
        let a_tok = 500 + i as u32;
        assert_eq!(step.seqs.len(), 2, "{step:?}");
        assert_eq!(
            step.seqs[0],
            decode_step(1, 3 + i as u32, 3, a_tok, vec![0])
        );
        let b = &step.seqs[1];
        assert_eq!(
            (b.seq_id, b.pos0 as usize, b.prompt_len, b.sample, b.fresh),
            (2, pos0, 20, samples, i == 0)
        );
        assert_eq!(b.tokens, b_prompt[pos0..pos0 + n]);
        assert_eq!(b.blocks, vec![1, 2][..(pos0 + n).div_ceil(16)]);
        assert!(step.seqs.iter().map(|s| s.tokens.len()).sum::<usize>() <= 8);
        let mut samples_out = vec![sample(1, a_tok + 1)];
        if samples {
            samples_out.push(sample(2, 600));
        }
        feed(&mut st, &step, samples_out);
    }
    // Both decode now.
    let step = st.next_step().unwrap();
    assert_eq!(
        step.seqs,
        vec![
            decode_step(1, 6, 3, 503, vec![0]),
            decode_step(2, 20, 20, 600, vec![1, 2])
        ]
    );
    assert_eq!(drain(&mut rx_a).tokens.len(), 4);
    let b = drain(&mut rx_b);
    assert_eq!(b.ids(), vec![600], "B samples only after its last chunk");
    st.check_blocks().unwrap();
}

#[test]
fn decode_tokens_fill_the_budget_before_prompt_chunks() {
    let mut st = state(64, 2, 4);
    let _a = submit(&mut st, request(2, 10));
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(1, 500)]);
    let _b = submit(&mut st, request(2, 10));
    let step = st.next_step().unwrap();
    assert_eq!(step.seqs.len(), 2);
    assert_eq!(
        step.seqs[1].tokens.len(),
        1,
        "one decode token leaves one prompt token"
    );
    feed(&mut st, &step, vec![sample(1, 501)]);
    let step = st.next_step().unwrap();
    assert_eq!(step.seqs[1].tokens, vec![101]);
    assert!(step.seqs[1].sample);
    feed(&mut st, &step, vec![sample(1, 502), sample(2, 700)]);
    let _c = submit(&mut st, request(4, 10));
    // Two decode tokens take the whole budget: C's prompt waits.
    let step = st.next_step().unwrap();
    assert_eq!(seq_ids(&step), vec![1, 2]);
    assert_eq!(
        st.running.len(),
        3,
        "C is admitted (it has KV room) but gets no tokens"
    );
}

#[test]
fn admission_waits_for_the_prompts_blocks_in_fifo_order() {
    // 4 blocks of 16 tokens.
    let mut st = state(4, 64, 8);
    let mut a = submit(&mut st, request(40, 20)); // 3 blocks of prompt
    let mut b = submit(&mut st, request(20, 4)); // 2 blocks: do not fit next to A
    let mut c = submit(&mut st, request(4, 4)); // 1 block: would fit, but waits behind B
    let step = st.next_step().unwrap();
    assert_eq!(seq_ids(&step), vec![1]);
    assert_eq!(
        (st.running.len(), st.waiting.len(), st.blocks.available()),
        (1, 2, 1)
    );

    // A ends with EOS; B and C are admitted once its blocks are back.
    feed(&mut st, &step, vec![sample(1, EOS)]);
    assert_eq!(drain(&mut a).reason(), FinishReason::Eos);
    assert_eq!(st.blocks.available(), 4);
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1]);
    assert_eq!(seq_ids(&step), vec![2, 3]);
    assert_eq!(
        (st.running.len(), st.waiting.len(), st.blocks.available()),
        (2, 0, 1)
    );
    assert!(drain(&mut b).tokens.is_empty() && drain(&mut c).tokens.is_empty());
    st.check_blocks().unwrap();
}

#[test]
fn a_sequence_takes_blocks_as_it_grows() {
    let mut st = state(8, 64, 4);
    let _rx = submit(&mut st, request(15, 20));
    let mut step = st.next_step().unwrap();
    assert_eq!(step.seqs[0].blocks, vec![0]);
    // Position 15 is the last of block 0; position 16 needs block 1.
    for (token, pos) in (500..).zip(15..18u32) {
        feed(&mut st, &step, vec![sample(1, token)]);
        step = st.next_step().unwrap();
        assert_eq!(step.seqs[0].pos0, pos);
        let want: Vec<u32> = if pos < 16 { vec![0] } else { vec![0, 1] };
        assert_eq!(step.seqs[0].blocks, want, "position {pos}");
    }
    st.check_blocks().unwrap();
}

#[test]
fn admission_waits_for_a_running_slot() {
    let mut st = state(64, 64, 2);
    let mut rxs: Vec<Events> = (0..4).map(|_| submit(&mut st, request(3, 1))).collect();
    let step = st.next_step().unwrap();
    assert_eq!(seq_ids(&step), vec![1, 2]);
    assert_eq!(st.waiting.len(), 2);
    // Max tokens 1: both finish on their first sample; 3 and 4 take their slots, in order.
    feed(&mut st, &step, vec![sample(1, 500), sample(2, 501)]);
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1, 2]);
    assert_eq!(seq_ids(&step), vec![3, 4]);
    feed(&mut st, &step, vec![sample(4, 503), sample(3, 502)]);
    for (i, rx) in rxs.iter_mut().enumerate() {
        let r = drain(rx);
        assert_eq!(r.ids(), vec![500 + i as u32]);
        assert_eq!(r.reason(), FinishReason::Length);
        assert_eq!(r.usage(), (3, 1));
    }
    let step = st.next_step().unwrap();
    assert_eq!(
        step.releases,
        vec![4, 3],
        "released in the order they finished"
    );
    complete_empty(&mut st, &step);
    assert!(st.next_step().is_none());
    // Ids keep increasing.
    let _rx = submit(&mut st, request(3, 1));
    assert_eq!(st.next_step().unwrap().seqs[0].seq_id, 5);
}

#[test]
fn eos_counts_in_usage_but_is_not_streamed() {
    let mut st = state(64, 64, 4);
    let mut rx = submit(&mut st, request(4, 10));
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(1, 500)]);
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(1, EOS)]);
    let r = drain(&mut rx);
    assert_eq!(r.ids(), vec![500], "no token event for EOS");
    assert_eq!(r.reason(), FinishReason::Eos);
    assert_eq!(r.usage(), (4, 2));
    assert_eq!(r.end().stop_sequence, "");
    assert_eq!(st.next_step().unwrap().releases, vec![1]);
}

#[test]
fn ignore_eos_keeps_going() {
    let mut st = state(64, 64, 4);
    let mut req = request(4, 3);
    req.ignore_eos = true;
    let mut rx = submit(&mut st, req);
    for _ in 0..3 {
        let step = st.next_step().unwrap();
        assert_eq!(step.seqs.len(), 1);
        feed(&mut st, &step, vec![sample(1, EOS)]);
    }
    let r = drain(&mut rx);
    assert_eq!(r.ids(), vec![EOS; 3]);
    assert_eq!(r.reason(), FinishReason::Length);
    assert_eq!(r.usage(), (4, 3));
}

#[test]
fn a_stop_sequence_ends_the_sequence_and_frees_its_blocks() {
    let mut st = state(64, 64, 4);
    let mut rx = submit_stopping_at(&mut st, request(5, 20), Some(503));
    let mut fed = 0;
    while let Some(step) = st.next_step() {
        if step.seqs.is_empty() {
            assert_eq!(step.releases, vec![1]);
            complete_empty(&mut st, &step);
            break;
        }
        feed(&mut st, &step, vec![sample(1, 500 + fed)]);
        fed += 1;
    }
    let r = drain(&mut rx);
    assert_eq!(r.ids(), vec![500, 501, 502, 503]);
    assert_eq!(r.reason(), FinishReason::Stop);
    assert_eq!(r.end().stop_sequence, "<stop>");
    assert_eq!(r.usage(), (5, 4));
    assert_eq!(st.blocks.available(), 64);
    assert!(st.is_idle());
}

#[test]
fn a_gone_client_is_cancelled_and_released() {
    let mut st = state(64, 64, 4);
    let a = submit(&mut st, request(4, 10));
    let mut b = submit(&mut st, request(4, 10));
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(1, 500), sample(2, 500)]);
    let c = submit(&mut st, request(4, 10)); // waiting: never admitted
    st.cfg.max_running = 2;
    drop(a);
    drop(c);
    st.reap(Instant::now());
    assert_eq!(
        (st.running.len(), st.waiting.len(), st.blocks.available()),
        (1, 0, 63)
    );
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1]);
    assert_eq!(step.seqs, vec![decode_step(2, 4, 4, 500, vec![1])]);
    // A client that goes away between steps: its next token cannot be sent.
    feed(&mut st, &step, vec![sample(2, 501)]);
    assert_eq!(drain(&mut b).tokens.len(), 2);
    drop(b);
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(2, 502)]);
    assert!(st.running.is_empty());
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![2]);
    complete_empty(&mut st, &step);
    assert!(st.is_idle());
    assert_eq!(st.blocks.available(), 64);
}

#[test]
fn a_client_leaving_mid_step_is_released_when_the_step_completes() {
    let mut st = state(64, 64, 4);
    let a = submit(&mut st, request(4, 10));
    let step = st.next_step().unwrap();
    drop(a);
    st.reap(Instant::now());
    assert_eq!(st.running.len(), 1, "its step is still in flight");
    feed(&mut st, &step, vec![sample(1, 500)]);
    assert!(st.running.is_empty());
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1]);
    complete_empty(&mut st, &step);
    assert_eq!(st.blocks.available(), 64);
    st.check_blocks().unwrap();
}

#[test]
fn a_request_larger_than_the_kv_cache_is_refused_at_once() {
    let mut st = state(2, 64, 4);
    let mut rx = submit(&mut st, request(10, 23)); // 33 tokens > 32
    let r = drain(&mut rx);
    let e = r.error.unwrap();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("parameters.max_tokens: prompt plus max_tokens is 33 tokens"),
        "{e:?}"
    );
    assert!(e.message().contains("(32 tokens)"), "{e:?}");
    assert!(rx.try_recv().is_err());
    assert!(st.is_idle());
    assert!(st.next_step().is_none());
    // Exactly the capacity fits, and takes the first id.
    let _rx = submit(&mut st, request(10, 22));
    let step = st.next_step().unwrap();
    assert_eq!(step.seqs[0].seq_id, 1);
    assert_eq!(st.blocks.available(), 1, "the prompt's one block");
}

#[test]
fn a_full_queue_refuses_more_requests() {
    let mut st = state(64, 64, 1);
    st.cfg.max_waiting = 2;
    let _a = submit(&mut st, request(4, 4));
    let _b = submit(&mut st, request(4, 4));
    let mut c = submit(&mut st, request(4, 4));
    let e = drain(&mut c).error.unwrap();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("2 requests are already waiting"),
        "{e:?}"
    );
    // Admission makes room in the queue.
    let _step = st.next_step().unwrap();
    let mut d = submit(&mut st, request(4, 4));
    assert!(drain(&mut d).error.is_none());
}

#[test]
fn a_deadline_ends_a_request_waiting_or_running() {
    let mut st = state(64, 64, 1);
    let past = Instant::now();
    let (tx_a, mut a) = mpsc::unbounded_channel();
    st.enqueue(NewRequest {
        request: request(4, 10),
        output: TestOutput {
            tx: tx_a,
            stop_at: None,
        },
        arrived: past,
        deadline: Some(past + std::time::Duration::from_secs(3600)),
    });
    let (tx_b, mut b) = mpsc::unbounded_channel();
    st.enqueue(NewRequest {
        request: request(4, 10),
        output: TestOutput {
            tx: tx_b,
            stop_at: None,
        },
        arrived: past,
        deadline: Some(past),
    });
    let step = st.next_step().unwrap();
    assert_eq!(seq_ids(&step), vec![1]);
    // B waits past its deadline; A runs, and its deadline passes while its step is in flight.
    let later = past + std::time::Duration::from_secs(7200);
    st.reap(later);
    let e = drain(&mut b).error.unwrap();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(
        drain(&mut a).error.is_none(),
        "not while its step is in flight"
    );
    // Its step completes: it ends there (its caller has stopped listening).
    feed(&mut st, &step, vec![sample(1, 500)]);
    let r = drain(&mut a);
    assert!(r.ids().is_empty());
    assert_eq!(r.error.unwrap().code(), Code::DeadlineExceeded);
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1]);
    complete_empty(&mut st, &step);
    assert!(st.is_idle());
    assert_eq!(st.blocks.available(), 64);
}

#[test]
fn steps_in_flight_carry_disjoint_sequences() {
    let mut st = state(64, 64, 4);
    let _a = submit(&mut st, request(4, 10));
    let first = st.next_step().unwrap();
    let _b = submit(&mut st, request(4, 10));
    let second = st.next_step().unwrap();
    assert_eq!((seq_ids(&first), seq_ids(&second)), (vec![1], vec![2]));
    assert_eq!(st.in_flight(), 2);
    assert!(st.next_step().is_none(), "both sequences are in flight");
    // They complete in any order.
    feed(&mut st, &second, vec![sample(2, 700)]);
    let third = st.next_step().unwrap();
    assert_eq!(third.seqs, vec![decode_step(2, 4, 4, 700, vec![1])]);
    feed(&mut st, &first, vec![sample(1, 500)]);
    let fourth = st.next_step().unwrap();
    assert_eq!(fourth.seqs, vec![decode_step(1, 4, 4, 500, vec![0])]);
    assert_eq!(st.stats().max_in_flight.load(Ordering::Relaxed), 2);
}

#[test]
fn with_two_stages_the_running_sequences_split_between_two_steps() {
    let mut st = state(64, 512, 16);
    let _handles: Vec<_> = (0..5).map(|_| submit(&mut st, request(4, 10))).collect();
    // The prompts: three in the first step, two in the second, none left for a third.
    let a = st.next_step_of(2).unwrap();
    let b = st.next_step_of(2).unwrap();
    assert_eq!((seq_ids(&a), seq_ids(&b)), (vec![1, 2, 3], vec![4, 5]));
    // Each step says how many were in flight when it left (the workers' cue to share cores).
    assert_eq!((a.concurrent, b.concurrent), (1, 2));
    assert!(st.next_step_of(2).is_none(), "every sequence is in flight");
    // In the decode that follows, each step's sequences come back as one step: the two
    // groups keep alternating through the stages.
    feed(&mut st, &a, (1..=3).map(|id| sample(id, 500)).collect());
    let a2 = st.next_step_of(2).unwrap();
    assert_eq!(seq_ids(&a2), vec![1, 2, 3]);
    feed(&mut st, &b, (4..=5).map(|id| sample(id, 500)).collect());
    let b2 = st.next_step_of(2).unwrap();
    assert_eq!(seq_ids(&b2), vec![4, 5]);
    // With one stage, one step takes them all.
    feed(&mut st, &a2, (1..=3).map(|id| sample(id, 501)).collect());
    feed(&mut st, &b2, (4..=5).map(|id| sample(id, 501)).collect());
    assert_eq!(seq_ids(&st.next_step_of(1).unwrap()), vec![1, 2, 3, 4, 5]);
    st.check_blocks().unwrap();
}

#[test]
fn with_two_stages_a_burst_of_prompts_goes_in_steps_of_a_few_hundred_tokens() {
    use super::state::PIPELINED_STEP_TOKENS;
    let tokens = |step: &StepFrame| step.seqs.iter().map(|s| s.tokens.len()).sum::<usize>();
    // Eight 100-token prompts: with one stage, one step takes them all.
    let mut one = state(256, 2048, 16);
    let _one: Vec<_> = (0..8).map(|_| submit(&mut one, request(100, 4))).collect();
    assert_eq!(tokens(&one.next_step_of(1).unwrap()), 800);
    // With two, each step stops taking prompts once it holds PIPELINED_STEP_TOKENS (whole
    // prompts: 200 of them here), and the next step the same.
    const { assert!(PIPELINED_STEP_TOKENS > 100 && PIPELINED_STEP_TOKENS <= 200) };
    let mut two = state(256, 2048, 16);
    let _two: Vec<_> = (0..8).map(|_| submit(&mut two, request(100, 4))).collect();
    let a = two.next_step_of(2).unwrap();
    let b = two.next_step_of(2).unwrap();
    assert_eq!((seq_ids(&a), seq_ids(&b)), (vec![1, 2], vec![3, 4]));
    assert!(
        a.seqs.iter().chain(&b.seqs).all(|s| s.sample),
        "no prompt is cut"
    );
    // When the first comes back, its sequences decode ahead of the next prompts, which fill
    // the step up to the same bound.
    feed(&mut two, &a, vec![sample(1, 500), sample(2, 500)]);
    let c = two.next_step_of(2).unwrap();
    assert_eq!(seq_ids(&c), vec![1, 2, 5, 6]);
    assert_eq!(tokens(&c), 202);
    // A prompt longer than the bound still goes whole, up to the step's budget: its chunks
    // could not be in two steps at once anyway.
    let mut long = state(256, 2048, 16);
    let _long = submit(&mut long, request(1000, 4));
    assert_eq!(tokens(&long.next_step_of(2).unwrap()), 1000);
    for st in [&one, &two, &long] {
        st.check_blocks().unwrap();
    }
}

#[test]
fn with_two_stages_hundreds_of_decoding_sequences_all_go_in_the_two_steps() {
    use super::state::PIPELINED_STEP_TOKENS;
    let n = 300;
    let mut st = state(1024, 2048, 512);
    let _handles: Vec<_> = (0..n).map(|_| submit(&mut st, request(4, 100))).collect();
    let answer = |step: &StepFrame| {
        let samples = step.seqs.iter().filter(|s| s.sample);
        samples.map(|s| sample(s.seq_id, 500)).collect::<Vec<_>>()
    };
    // The prompts go in steps of about PIPELINED_STEP_TOKENS, two in flight at a time, until
    // every sequence decodes.
    let mut rounds = 0;
    let (a, b) = loop {
        let (a, b) = (st.next_step_of(2).unwrap(), st.next_step_of(2).unwrap());
        let decoding = |s: &StepFrame| s.seqs.iter().all(|s| s.tokens.len() == 1 && s.pos0 >= 4);
        if decoding(&a) && decoding(&b) {
            break (a, b);
        }
        assert!(
            a.seqs
                .iter()
                .all(|s| s.tokens.len() <= PIPELINED_STEP_TOKENS)
        );
        feed(&mut st, &a, answer(&a));
        feed(&mut st, &b, answer(&b));
        rounds += 1;
        assert!(rounds < 100, "the prompts never finished");
    };
    assert!(
        rounds > 2,
        "the prompts went in {rounds} rounds of two steps"
    );
    // Their decode tokens are bound by the share of sequences alone: the two steps hold every
    // one of them, half each.
    let mut ids: Vec<u64> = seq_ids(&a).into_iter().chain(seq_ids(&b)).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=n as u64).collect::<Vec<_>>());
    assert_eq!((a.seqs.len(), b.seqs.len()), (n / 2, n / 2));
    st.check_blocks().unwrap();
}

#[test]
fn the_newest_sequence_is_preempted_and_recomputed_when_blocks_run_out() {
    // 3 blocks of 16 tokens: A and B take one block each for their prompts, then grow.
    let mut st = state(3, 64, 4);
    let mut a = submit(&mut st, request(16, 20));
    let mut b = submit(&mut st, request(16, 20));
    let step = st.next_step().unwrap();
    assert_eq!(seq_ids(&step), vec![1, 2]);
    feed(&mut st, &step, vec![sample(1, 500), sample(2, 700)]);
    // A's next token needs a second block (the last free one); B's too: B, the newest, is
    // preempted, and comes back with its prompt and its token, to be recomputed.
    let step = st.next_step().unwrap();
    assert_eq!(step.seqs, vec![decode_step(1, 16, 16, 500, vec![0, 2])]);
    assert_eq!(step.releases, vec![2], "the workers forget B");
    assert_eq!(st.stats().preemptions.load(Ordering::Relaxed), 1);
    assert_eq!(st.waiting.front().map(|s| s.id), Some(2));
    st.check_blocks().unwrap();
    // A runs to the end; then B is recomputed, fresh, from position 0 with all 17 tokens.
    let mut token = 501;
    let mut step = step;
    loop {
        feed(&mut st, &step, vec![sample(1, token)]);
        token += 1;
        step = st.next_step().unwrap();
        if step.seqs.iter().any(|s| s.seq_id == 2) {
            break;
        }
    }
    let r = drain(&mut a);
    assert_eq!(r.ids().len(), 20);
    let b_step = step.seqs.iter().find(|s| s.seq_id == 2).unwrap();
    let mut want: Vec<u32> = (100..116).collect();
    want.push(700);
    assert_eq!(
        (
            b_step.pos0,
            b_step.tokens.clone(),
            b_step.sample,
            b_step.fresh
        ),
        (0, want, true, true)
    );
    feed(&mut st, &step, vec![sample(2, 701)]);
    let r = drain(&mut b);
    assert_eq!(
        r.ids(),
        vec![700, 701],
        "its output goes on where it stopped"
    );
    st.check_blocks().unwrap();
}

#[test]
fn a_shared_prefix_is_not_computed_twice() {
    let mut st = state(64, 256, 4);
    st.cfg.prefix_caching = true;
    let system: Vec<u32> = (1000..1040).collect(); // 2 full blocks and 8 tokens
    let mut first = system.clone();
    first.extend([1, 2, 3]);
    let _a = submit(&mut st, prompt(&first, 1));
    let step = st.next_step().unwrap();
    assert_eq!(step.seqs[0].tokens.len(), 43);
    feed(&mut st, &step, vec![sample(1, 500)]);
    // A finished: its two full prompt blocks stay cached.
    let step = st.next_step().unwrap();
    complete_empty(&mut st, &step);
    let mut second = system.clone();
    second.extend([7, 8]);
    let mut b = submit(&mut st, prompt(&second, 1));
    let step = st.next_step().unwrap();
    let s = &step.seqs[0];
    assert_eq!(
        (s.pos0, s.tokens.len(), s.fresh, s.history.clone()),
        (32, 10, true, system[..32].to_vec())
    );
    assert_eq!(s.blocks[..2], [0, 1], "A's blocks, shared");
    let stats = st.stats();
    st.publish();
    assert_eq!(stats.cached_tokens.load(Ordering::Relaxed), 32);
    assert_eq!(stats.prefix_hits.load(Ordering::Relaxed), 2);
    feed(&mut st, &step, vec![sample(2, 600)]);
    assert_eq!(drain(&mut b).ids(), vec![600]);
    st.check_blocks().unwrap();
}

#[test]
fn a_failed_step_fails_only_its_sequences() {
    let mut st = state(64, 64, 4);
    let mut a = submit(&mut st, request(4, 10));
    let first = st.next_step().unwrap();
    let mut b = submit(&mut st, request(4, 10));
    let second = st.next_step().unwrap();
    st.on_step_failed(
        first.step_id,
        &GatewayError::Unavailable("stage 1 failed step 1".into()),
    );
    assert_eq!(drain(&mut a).error.unwrap().code(), Code::Unavailable);
    feed(&mut st, &second, vec![sample(2, 700)]);
    let r = drain(&mut b);
    assert!(r.error.is_none());
    assert_eq!(r.ids(), vec![700]);
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1]);
    st.check_blocks().unwrap();
}

#[test]
fn fail_all_errors_every_stream() {
    let mut st = state(64, 64, 2);
    let mut a = submit(&mut st, request(4, 10));
    let mut b = submit(&mut st, request(4, 10));
    let mut c = submit(&mut st, request(4, 10)); // waits for a slot
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(1, 500), sample(2, 500)]);
    st.fail_all(&GatewayError::Unavailable("worker cpu[1] died".into()));
    for (rx, tokens) in [(&mut a, 1), (&mut b, 1), (&mut c, 0)] {
        let r = drain(rx);
        assert_eq!(r.tokens.len(), tokens);
        assert!(r.end.is_none());
        let e = r.error.unwrap();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("worker cpu[1] died"), "{e:?}");
    }
    // Their KV is released with the next step.
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1, 2]);
    assert!(step.seqs.is_empty());
    complete_empty(&mut st, &step);
    assert!(st.is_idle());
    st.check_blocks().unwrap();
}

#[test]
fn a_broken_ring_requeues_every_sequence_with_its_tokens_and_recomputes_it() {
    let mut st = state(64, 64, 2);
    let mut a = submit(&mut st, request(4, 10));
    let mut b = submit(&mut st, request(4, 10));
    let _c = submit(&mut st, request(4, 10)); // waits for a slot
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(1, 500), sample(2, 600)]);
    // A step in flight when the ring breaks is lost.
    let lost = st.next_step().unwrap();
    assert_eq!(seq_ids(&lost), vec![1, 2]);
    assert_eq!(st.requeue_all(), 2);
    assert_eq!(st.in_flight(), 0);
    assert_eq!(st.blocks.available(), 64);
    st.check_blocks().unwrap();
    // Once the ring is back, the oldest go first, each recomputed from all its tokens
    // (prompt and what it generated) as a fresh sequence, with no release owed.
    let step = st.next_step().unwrap();
    assert!(step.releases.is_empty());
    assert_eq!(seq_ids(&step), vec![1, 2]);
    for s in &step.seqs {
        assert!(s.fresh && s.sample);
        assert_eq!((s.pos0, s.tokens.len()), (0, 5));
        assert_eq!(s.tokens[4], if s.seq_id == 1 { 500 } else { 600 });
    }
    feed(&mut st, &step, vec![sample(1, 501), sample(2, 601)]);
    assert_eq!(drain(&mut a).ids(), vec![500, 501]);
    assert_eq!(drain(&mut b).ids(), vec![600, 601]);
    st.check_blocks().unwrap();
}

#[test]
fn cancel_all_finishes_running_and_refuses_waiting() {
    let mut st = state(64, 64, 1);
    let mut a = submit(&mut st, request(4, 10));
    let mut b = submit(&mut st, request(4, 10));
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(1, 500)]);
    st.cancel_all();
    let r = drain(&mut a);
    assert_eq!(r.reason(), FinishReason::Cancelled);
    assert_eq!(r.usage(), (4, 1));
    let r = drain(&mut b);
    assert!(r.tokens.is_empty() && r.end.is_none());
    assert_eq!(r.error.unwrap().code(), Code::Cancelled);
    let step = st.next_step().unwrap();
    assert_eq!((step.releases.clone(), step.seqs.len()), (vec![1], 0));
    complete_empty(&mut st, &step);
    assert!(st.is_idle());
    assert_eq!(st.blocks.available(), 64);
}

#[test]
fn samples_for_sequences_not_in_the_step_are_ignored() {
    let mut st = state(64, 64, 4);
    let mut rx = submit(&mut st, request(3, 2));
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(99, 500), sample(1, 501)]);
    assert_eq!(drain(&mut rx).tokens.len(), 1);
    assert_eq!(st.running.len(), 1);
}

/// A ring that is broken for good: every step fails at once.
struct BrokenRing {
    steps: Arc<AtomicUsize>,
    failed: Vec<u64>,
}

impl crate::pipeline::Pipeline for BrokenRing {
    fn depth(&self) -> usize {
        2
    }

    async fn submit(&mut self, step: StepFrame) -> Result<(), GatewayError> {
        self.steps.fetch_add(1, Ordering::SeqCst);
        self.failed.push(step.step_id);
        Ok(())
    }

    async fn next_event(&mut self) -> crate::pipeline::PipelineEvent {
        tokio::task::yield_now().await;
        match self.failed.pop() {
            Some(step_id) => {
                crate::pipeline::PipelineEvent::Completed(crate::pipeline::Completion {
                    step_id,
                    round_trip: None,
                    result: Err(GatewayError::Unavailable(
                        "the worker for cpu[1] exited".into(),
                    )),
                })
            }
            None => std::future::pending().await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_ring_fails_requests_without_spinning_on_releases() {
    let steps = Arc::new(AtomicUsize::new(0));
    let (_stop_tx, stop_rx) = watch::channel(false);
    let pipeline = BrokenRing {
        steps: Arc::clone(&steps),
        failed: Vec::new(),
    };
    let (scheduler, task) = Scheduler::spawn(pipeline, state(64, 64, 4), stop_rx);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let output = |tx| TestOutput { tx, stop_at: None };
    scheduler
        .submit(request(3, 4), output(tx), None)
        .await
        .unwrap();
    let Some(Event::Fail(err)) = rx.recv().await else {
        panic!("the request should fail")
    };
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("cpu[1] exited"), "{err:?}");
    // The failed sequence's release is pending, and the ring still fails: it is retried
    // once a second, not in a loop.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let n = steps.load(Ordering::SeqCst);
    assert!(n <= 2, "{n} steps in 300 ms");
    // A new request still gets its answer at once.
    let (tx, mut rx) = mpsc::unbounded_channel();
    scheduler
        .submit(request(3, 4), output(tx), None)
        .await
        .unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Fail(_))));
    drop(scheduler);
    task.await.unwrap();
}

/// A ring of two stages whose hops take `hops` a step: each step completes (in order) with a
/// sample for every sequence that asked for one, held 2 ms by each stage and computed 2 ms by
/// each, its round trip 4 ms plus the hops'.
struct FarRing {
    hops: std::time::Duration,
    queue: std::collections::VecDeque<StepFrame>,
}

impl crate::pipeline::Pipeline for FarRing {
    fn depth(&self) -> usize {
        2
    }

    fn max_depth(&self) -> usize {
        6
    }

    async fn submit(&mut self, step: StepFrame) -> Result<(), GatewayError> {
        self.queue.push_back(step);
        Ok(())
    }

    async fn next_event(&mut self) -> crate::pipeline::PipelineEvent {
        tokio::task::yield_now().await;
        let Some(step) = self.queue.pop_front() else {
            return std::future::pending().await;
        };
        let samples = step
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| sample(s.seq_id, 500))
            .collect();
        crate::pipeline::PipelineEvent::Completed(crate::pipeline::Completion {
            step_id: step.step_id,
            result: Ok(SamplesFrame {
                step_id: step.step_id,
                samples,
                times: strata_shared::wire::StageTimes {
                    held_us: 4_000,
                    compute_us: 4_000,
                },
            }),
            round_trip: Some(std::time::Duration::from_millis(4) + self.hops),
        })
    }
}

/// 16 requests of 40 tokens through a [`FarRing`]: the most steps that were in flight at
/// once, and the count the scheduler kept at the end.
async fn steps_in_flight_over(hops: std::time::Duration) -> (usize, usize) {
    let (_stop_tx, stop_rx) = watch::channel(false);
    let pipeline = FarRing {
        hops,
        queue: std::collections::VecDeque::new(),
    };
    let st = state(256, 512, 16);
    let stats = st.stats();
    let (scheduler, task) = Scheduler::spawn(pipeline, st, stop_rx);
    let mut streams = Vec::new();
    for _ in 0..16 {
        let (tx, rx) = mpsc::unbounded_channel();
        let output = TestOutput { tx, stop_at: None };
        scheduler
            .submit(request(8, 40), output, None)
            .await
            .unwrap();
        streams.push(rx);
    }
    for mut rx in streams {
        let mut tokens = 0;
        loop {
            match rx.recv().await {
                Some(Event::Token { .. }) => tokens += 1,
                Some(Event::End(_)) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(tokens, 40);
    }
    drop(scheduler);
    task.await.unwrap();
    (
        stats.max_in_flight.load(Ordering::Relaxed),
        stats.steps_in_flight.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_hops_get_more_steps_in_flight_and_fast_ones_one_per_stage() {
    // Hops of 16 ms against a stage's 2 ms a step: the count climbs to its bound, 6.
    let (most, now) = steps_in_flight_over(std::time::Duration::from_millis(16)).await;
    assert_eq!((most, now), (6, 6));
    // Hops of 0.2 ms: one step per stage throughout.
    let (most, now) = steps_in_flight_over(std::time::Duration::from_micros(200)).await;
    assert_eq!((most, now), (2, 2));
}

/// What the property test does next.
#[derive(Debug, Clone)]
enum Op {
    /// A request: prompt length, max tokens, whether its prompt starts with the shared prefix,
    /// a token that stops it.
    Submit(usize, u32, bool, Option<u32>),
    /// Send the next step (while fewer than three are in flight).
    Step,
    /// Complete the `i`-th step in flight (modulo), sampling `token` for each sequence.
    Complete(usize, u32),
    /// Fail the `i`-th step in flight.
    Fail(usize),
    /// The `i`-th client still listening leaves.
    Leave(usize),
    /// The ring breaks under every step in flight, and is rebuilt.
    Rebuild,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        2 => (1usize..70, 1u32..40, any::<bool>(), proptest::option::of(500u32..520))
            .prop_map(|(p, m, shared, stop)| Op::Submit(p, m, shared, stop)),
        4 => Just(Op::Step),
        4 => (0usize..4, 498u32..520).prop_map(|(i, t)| Op::Complete(i, t)),
        1 => (0usize..4).prop_map(Op::Fail),
        1 => (0usize..8).prop_map(Op::Leave),
        1 => Just(Op::Rebuild),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Under random arrivals, steps, completions in any order, failures, clients leaving,
    /// rings breaking, preemptions (a small cache) and prefix sharing: no block is ever leaked
    /// or held twice,
    /// no sequence is in two steps at once, and when everything has ended every block is back.
    #[test]
    fn blocks_are_never_leaked_or_held_twice(ops in proptest::collection::vec(op(), 1..120)) {
        let mut cfg = config(12, 48, 6);
        cfg.prefix_caching = true;
        cfg.max_waiting = 8;
        let mut st: SchedulerState<TestOutput> = SchedulerState::new(cfg, vec![EOS]);
        let mut clients: Vec<Events> = Vec::new();
        let mut flying: Vec<StepFrame> = Vec::new();
        let shared: Vec<u32> = (900..932).collect();
        for op in ops {
            match op {
                Op::Submit(len, max, with_prefix, stop) => {
                    let mut ids: Vec<u32> = if with_prefix { shared.clone() } else { vec![] };
                    ids.extend((0..len as u32).map(|i| 100 + i));
                    clients.push(submit_stopping_at(&mut st, prompt(&ids, max), stop));
                }
                Op::Step => {
                    if flying.len() < 3 && let Some(step) = st.next_step() {
                        let mut seen = std::collections::HashSet::new();
                        for f in &flying {
                            seen.extend(f.seqs.iter().map(|s| s.seq_id));
                        }
                        for s in &step.seqs {
                            proptest::prop_assert!(seen.insert(s.seq_id), "sequence {} in two steps", s.seq_id);
                            proptest::prop_assert!(s.blocks.len() * 16 >= s.pos0 as usize + s.tokens.len());
                        }
                        flying.push(step);
                    }
                }
                Op::Complete(i, token) => {
                    if !flying.is_empty() {
                        let step = flying.remove(i % flying.len());
                        let samples = step
                            .seqs
                            .iter()
                            .filter(|s| s.sample)
                            .map(|s| sample(s.seq_id, token))
                            .collect();
                        feed(&mut st, &step, samples);
                    }
                }
                Op::Fail(i) => {
                    if !flying.is_empty() {
                        let step = flying.remove(i % flying.len());
                        st.on_step_failed(step.step_id, &GatewayError::Unavailable("boom".into()));
                    }
                }
                Op::Leave(i) => {
                    if !clients.is_empty() {
                        drop(clients.remove(i % clients.len()));
                        st.reap(Instant::now());
                    }
                }
                Op::Rebuild => {
                    flying.clear();
                    st.requeue_all();
                    proptest::prop_assert_eq!(st.blocks.held(), 0);
                }
            }
            if let Err(e) = st.check_blocks() {
                proptest::prop_assert!(false, "{e}");
            }
        }
        // Drain: complete what flies, then run everything to its end.
        for _ in 0..10_000 {
            if let Some(step) = flying.pop() {
                let samples = step.seqs.iter().filter(|s| s.sample).map(|s| sample(s.seq_id, 501)).collect();
                feed(&mut st, &step, samples);
                continue;
            }
            match st.next_step() {
                Some(step) => flying.push(step),
                None => break,
            }
        }
        proptest::prop_assert!(
            flying.is_empty() && !st.has_requests(),
            "did not drain: {} flying, running {:?}, waiting {:?}",
            flying.len(),
            st.running.iter().map(|s| (s.id, s.computed, s.generated.len(), s.in_flight, s.table.len())).collect::<Vec<_>>(),
            st.waiting.iter().map(|s| (s.id, s.computed, s.table.len())).collect::<Vec<_>>()
        );
        st.check_blocks().map_err(proptest::test_runner::TestCaseError::fail)?;
        proptest::prop_assert_eq!(st.blocks.held(), 0);
    }
}
