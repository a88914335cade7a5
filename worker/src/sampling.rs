//! Turning the last position's logits into a token: penalties, temperature, top-k, top-p,
//! min-p, then a draw from a seeded generator (same seed, same output). Greedy when the
//! temperature is 0. Log-probabilities are those of the model's own distribution (before
//! penalties and truncation).
//!
//! The draw for the `k`-th generated token is the `k`-th number of the seed's stream, read at
//! its position: a sampler rebuilt from the tokens so far (after a preemption, or by another
//! worker) draws exactly what the first one would have.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strata_shared::wire::{Sample, SamplingParams};

/// Per-sequence sampler state kept by the last stage.
#[derive(Debug, Clone)]
pub struct SeqSampler {
    rng: ChaCha8Rng,
    /// Every token fed so far: prompt, then output.
    history: Vec<u32>,
    prompt_len: usize,
}

/// Words of the generator's stream one draw reads (an f64 takes two 32-bit words).
const WORDS_PER_DRAW: u128 = 2;

impl SeqSampler {
    pub fn new(seed: u64, prompt_len: usize) -> Self {
        SeqSampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
            history: Vec::new(),
            prompt_len,
        }
    }

    /// Records tokens fed to the model.
    pub fn feed(&mut self, tokens: &[u32]) {
        self.history.extend_from_slice(tokens);
    }

    /// Samples a token from `logits` (one row, vocabulary-sized).
    pub fn sample(&mut self, seq_id: u64, logits: &[f32], p: &SamplingParams) -> Sample {
        // log p(x) = logit(x) − ln Σ exp(logits), for the few tokens reported; the normalizer
        // (a pass of `exp` over the vocabulary) only where the client asked for them.
        let lse = if p.wants_logprobs() {
            strata_kernels::math::log_sum_exp(logits)
        } else {
            f64::NAN
        };
        let logprob = |t: u32| {
            logits
                .get(t as usize)
                .map_or(f32::NEG_INFINITY, |&x| (f64::from(x) - lse) as f32)
        };
        let penalized;
        let scores = if p.repetition_penalty != 1.0
            || p.frequency_penalty != 0.0
            || p.presence_penalty != 0.0
        {
            let mut s = logits.to_vec();
            self.apply_penalties(&mut s, p);
            penalized = s;
            &penalized[..]
        } else {
            logits
        };
        let token = if p.temperature <= 0.0 {
            argmax(scores)
        } else {
            let probs = truncated_probs(scores, p);
            // The token being sampled is the `k`-th generated one.
            let k = self.history.len().saturating_sub(self.prompt_len) as u128;
            self.rng.set_word_pos(k * WORDS_PER_DRAW);
            let u: f64 = self.rng.random();
            draw(&probs, u)
        };
        let top = top_k(logits, p.top_logprobs as usize)
            .into_iter()
            .map(|t| (t, logprob(t)))
            .collect();
        Sample {
            seq_id,
            token,
            logprob: logprob(token),
            top,
        }
    }

    fn apply_penalties(&self, scores: &mut [f32], p: &SamplingParams) {
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; scores.len()];
            for &t in &self.history {
                if let Some(s) = seen.get_mut(t as usize)
                    && !*s
                {
                    *s = true;
                    let x = &mut scores[t as usize];
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in self.history.iter().skip(self.prompt_len) {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(x) = scores.get_mut(t as usize) {
                    *x -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
    }
}

/// Index of the largest score (the first one on ties).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// Numerically stable log-softmax, computed in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// The `k` tokens of highest logit (so of highest probability), best first (ties: lower id
/// first).
fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(k.saturating_sub(1), cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx
}

/// Probabilities after temperature, top-k, top-p and min-p (in that order), as
/// (token, probability) pairs sorted by decreasing probability.
fn truncated_probs(scores: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let t = f64::from(p.temperature);
    let by_score = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    let k = p.top_k as usize;
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_score);
        order.truncate(k);
    }
    order.sort_by(by_score);
    // (score - max) / t, never score / t - max / t: no overflow to infinity at tiny temperatures.
    let max = order
        .first()
        .map_or(0.0, |&i| f64::from(scores[i as usize]));
    let mut probs: Vec<(u32, f64)> = order
        .iter()
        .map(|&i| (i, ((f64::from(scores[i as usize]) - max) / t).exp()))
        .collect();
    let total: f64 = probs.iter().map(|x| x.1).sum();
    probs.iter_mut().for_each(|x| x.1 /= total);
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, x) in probs.iter().enumerate() {
            cum += x.1;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    if p.min_p > 0.0 {
        let floor = probs.first().map_or(0.0, |x| x.1) * p.min_p as f64;
        probs.retain(|x| x.1 >= floor);
    }
    let total: f64 = probs.iter().map(|x| x.1).sum();
    probs.iter_mut().for_each(|x| x.1 /= total);
    probs
}

/// Inverse-CDF draw with `u` in [0, 1).
fn draw(probs: &[(u32, f64)], u: f64) -> u32 {
    let mut cum = 0.0;
    for &(tok, p) in probs {
        cum += p;
        if u < cum {
            return tok;
        }
    }
    probs.last().map_or(0, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        let mut s = SeqSampler::new(0, 0);
        let asked = SamplingParams {
            logprobs: true,
            ..params()
        };
        let out = s.sample(9, &[0.0, 2.0, 1.0], &asked);
        assert_eq!((out.seq_id, out.token), (9, 1));
        let lp = log_softmax(&[0.0, 2.0, 1.0]);
        assert!((out.logprob - lp[1]).abs() < 1e-7);
        assert!((lp.iter().map(|x| (*x as f64).exp()).sum::<f64>() - 1.0).abs() < 1e-6);
        // Not asked for: the same token, no log-probability.
        let out = s.sample(9, &[0.0, 2.0, 1.0], &params());
        assert_eq!(out.token, 1);
        assert!(out.logprob.is_nan());
    }

    #[test]
    fn repetition_penalty_follows_hugging_face() {
        let mut s = SeqSampler::new(0, 2);
        s.feed(&[0, 1]);
        let mut scores = vec![2.0, -1.0, 1.5];
        s.apply_penalties(
            &mut scores,
            &SamplingParams {
                repetition_penalty: 2.0,
                ..params()
            },
        );
        assert_eq!(scores, vec![1.0, -2.0, 1.5]);
    }

    #[test]
    fn frequency_and_presence_penalties_count_output_tokens_only() {
        let mut s = SeqSampler::new(0, 1);
        s.feed(&[2, 1, 1, 0]);
        let mut scores = vec![0.0; 3];
        s.apply_penalties(
            &mut scores,
            &SamplingParams {
                frequency_penalty: 0.5,
                presence_penalty: 0.25,
                ..params()
            },
        );
        // Token 2 is only in the prompt; token 1 appears twice in the output, token 0 once.
        assert_eq!(scores, vec![-0.75, -1.25, 0.0]);
    }

    #[test]
    fn truncation_rules() {
        let scores = [3.0f32, 2.0, 1.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..params()
        };
        assert_eq!(truncated_probs(&scores, &p).len(), 2);
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..params()
        };
        // softmax([3,2,1,0]) = [0.644, 0.237, 0.087, 0.032]: the first token alone reaches 0.5.
        assert_eq!(truncated_probs(&scores, &p).len(), 1);
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.2,
            ..params()
        };
        // Keeps tokens with probability >= 0.2 * 0.644.
        assert_eq!(truncated_probs(&scores, &p).len(), 2);
        let probs = truncated_probs(
            &scores,
            &SamplingParams {
                temperature: 1.0,
                ..params()
            },
        );
        assert!((probs.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn tiny_temperatures_are_nearly_greedy_not_nan() {
        let scores = [1.0f32, 3.0, 2.0];
        let probs = truncated_probs(
            &scores,
            &SamplingParams {
                temperature: 1e-30,
                ..params()
            },
        );
        assert_eq!(probs[0], (1, 1.0));
        assert!(probs.iter().all(|p| p.1.is_finite()));
        let mut s = SeqSampler::new(3, 0);
        let p = SamplingParams {
            temperature: 1e-30,
            ..params()
        };
        assert!((0..10).all(|_| s.sample(0, &scores, &p).token == 1));
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..params()
        };
        let run = |seed| {
            let mut s = SeqSampler::new(seed, 0);
            (0..20)
                .map(|_| s.sample(0, &logits, &p).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_logprobs_are_sorted_and_are_the_log_softmax() {
        let logits = [1.0, 3.0, 2.0, 3.0];
        let lp = log_softmax(&logits);
        let p = SamplingParams {
            top_logprobs: 3,
            ..Default::default()
        };
        let s = SeqSampler::new(0, 0).sample(0, &logits, &p);
        assert_eq!(s.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert_eq!(s.token, 1);
        assert!((s.logprob - lp[1]).abs() < 1e-6);
        for (t, l) in s.top {
            assert!((l - lp[t as usize]).abs() < 1e-6, "token {t}");
        }
    }
}
