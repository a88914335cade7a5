//! The scheduler's state and actor, with a recording [`SeqOutput`]: no tokenizer needed. (The
//! output stage's own tests, with the real tokenizer, are in `output.rs`.)

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
        logprobs: false,
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
        step_id: step.step_id,
        samples,
    });
}

fn decode_step(seq_id: u64, pos0: u32, prompt_len: u32, token: u32) -> SeqStep {
    SeqStep {
        seq_id,
        pos0,
        prompt_len,
        tokens: vec![token],
        sample: true,
        params: SamplingParams::default(),
    }
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
    assert_eq!(st.free_blocks, 64, "blocks are reserved at admission");

    let step = st.next_step().unwrap();
    assert_eq!(
        step,
        StepFrame {
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
            }],
            hidden: None,
        }
    );
    assert_eq!(st.free_blocks, 63, "5 + 3 tokens take one 16-token block");
    feed(&mut st, &step, vec![sample(1, out[0])]);
    for i in 1..out.len() {
        let step = st.next_step().unwrap();
        assert_eq!(step.step_id, 1 + i as u64);
        assert!(step.releases.is_empty());
        assert_eq!(step.seqs, vec![decode_step(1, 4 + i as u32, 5, out[i - 1])]);
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
    assert_eq!(st.free_blocks, 64);
    assert!(st.is_idle());
    assert!(st.next_step().is_none());
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
        assert_eq!(step.seqs[0], decode_step(1, 3 + i as u32, 3, a_tok));
        let b = &step.seqs[1];
        assert_eq!(
            (b.seq_id, b.pos0 as usize, b.prompt_len, b.sample),
            (2, pos0, 20, samples)
        );
        assert_eq!(b.tokens, b_prompt[pos0..pos0 + n]);
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
        vec![decode_step(1, 6, 3, 503), decode_step(2, 20, 20, 600)]
    );
    assert_eq!(drain(&mut rx_a).tokens.len(), 4);
    let b = drain(&mut rx_b);
    assert_eq!(b.ids(), vec![600], "B samples only after its last chunk");
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
fn admission_waits_for_kv_blocks_in_fifo_order() {
    // 4 blocks of 16 tokens.
    let mut st = state(4, 64, 8);
    let mut a = submit(&mut st, request(4, 40)); // 3 blocks
    let mut b = submit(&mut st, request(4, 20)); // 2 blocks: does not fit next to A
    let mut c = submit(&mut st, request(4, 4)); // 1 block: would fit, but waits behind B
    let step = st.next_step().unwrap();
    assert_eq!(seq_ids(&step), vec![1]);
    assert_eq!(
        (st.running.len(), st.waiting.len(), st.free_blocks),
        (1, 2, 1)
    );

    // A ends with EOS; B and C are admitted once its blocks are back.
    feed(&mut st, &step, vec![sample(1, EOS)]);
    assert_eq!(drain(&mut a).reason(), FinishReason::Eos);
    assert_eq!(st.free_blocks, 4);
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1]);
    assert_eq!(seq_ids(&step), vec![2, 3]);
    assert_eq!(
        (st.running.len(), st.waiting.len(), st.free_blocks),
        (2, 0, 1)
    );
    assert!(drain(&mut b).tokens.is_empty() && drain(&mut c).tokens.is_empty());
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
    assert_eq!(st.free_blocks, 64);
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
    st.reap_disconnected();
    assert_eq!(
        (st.running.len(), st.waiting.len(), st.free_blocks),
        (1, 0, 63)
    );
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1]);
    assert_eq!(step.seqs, vec![decode_step(2, 4, 4, 500)]);
    // A client that goes away between steps: its next token cannot be sent.
    feed(&mut st, &step, vec![sample(2, 501)]);
    assert_eq!(drain(&mut b).tokens.len(), 2);
    drop(b);
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(2, 502)]);
    assert!(st.running.is_empty());
    assert_eq!(st.next_step().unwrap().releases, vec![2]);
    assert!(st.is_idle());
    assert_eq!(st.free_blocks, 64);
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
    assert_eq!(st.free_blocks, 0);
}

#[test]
fn fail_running_errors_every_running_stream() {
    let mut st = state(64, 64, 2);
    let mut a = submit(&mut st, request(4, 10));
    let mut b = submit(&mut st, request(4, 10));
    let mut c = submit(&mut st, request(4, 10)); // waits for a slot
    let step = st.next_step().unwrap();
    feed(&mut st, &step, vec![sample(1, 500), sample(2, 500)]);
    st.fail_running(&GatewayError::Unavailable("worker cpu[1] died".into()));
    for rx in [&mut a, &mut b] {
        let r = drain(rx);
        assert_eq!(r.tokens.len(), 1);
        assert!(r.end.is_none());
        let e = r.error.unwrap();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("worker cpu[1] died"), "{e:?}");
    }
    // Their KV is released with the next step, which runs the waiting request.
    let step = st.next_step().unwrap();
    assert_eq!(step.releases, vec![1, 2]);
    assert_eq!(seq_ids(&step), vec![3]);
    assert!(drain(&mut c).error.is_none());
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
    assert_eq!((step.releases, step.seqs.len()), (vec![1], 0));
    assert!(st.is_idle());
    assert_eq!(st.free_blocks, 64);
}

#[test]
fn samples_for_unknown_sequences_are_ignored() {
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
}

impl crate::pipeline::Pipeline for BrokenRing {
    async fn step(&mut self, _step: StepFrame) -> Result<SamplesFrame, GatewayError> {
        self.steps.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        Err(GatewayError::Unavailable(
            "the worker for cpu[1] exited".into(),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_ring_fails_requests_without_spinning_on_releases() {
    let steps = Arc::new(AtomicUsize::new(0));
    let (_stop_tx, stop_rx) = watch::channel(false);
    let pipeline = BrokenRing {
        steps: Arc::clone(&steps),
    };
    let (scheduler, task) = Scheduler::spawn(pipeline, state(64, 64, 4), stop_rx);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let output = |tx| TestOutput { tx, stop_at: None };
    scheduler.submit(request(3, 4), output(tx)).await.unwrap();
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
    scheduler.submit(request(3, 4), output(tx)).await.unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Fail(_))));
    drop(scheduler);
    task.await.unwrap();
}
