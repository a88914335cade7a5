//! The Qwen2 and Mistral paths on small random-weight checkpoints that the tests write
//! themselves, each as a Hugging Face directory and as a GGUF file, against an independent
//! naive forward pass in f64 (no candle): shapes, q/k/v biases (Qwen2), the sliding window
//! (Mistral), grouped KV heads, tied and untied heads, and llama.cpp's q/k row permutation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use strata_shared::config::Arch;
use strata_shared::ggml::GgmlType;
use strata_shared::gguf::GgufValue;
use strata_shared::gguf::write::{RawTensor, to_bytes};
use strata_shared::meta::ModelMeta;
use strata_shared::names::TensorRole;
use strata_shared::source::ModelFiles;
use strata_shared::wire::{SamplingParams, SeqStep, StepFrame};
use strata_worker::Engine;
use strata_worker::model::{ModelSlice, SliceSpec};
use strata_worker::stage::Stage;

/// Hyper-parameters of a tiny checkpoint.
#[derive(Debug, Clone, Copy)]
struct Cfg {
    family: Family,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    layers: usize,
    vocab: usize,
    theta: f64,
    eps: f64,
    /// The window the model really uses (Hugging Face semantics).
    window: Option<usize>,
    bias: bool,
    tied: bool,
    max_pos: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Qwen2,
    Mistral,
}

const QWEN2: Cfg = Cfg {
    family: Family::Qwen2,
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    inter: 96,
    layers: 2,
    vocab: 97,
    theta: 10_000.0,
    eps: 1e-6,
    window: None,
    bias: true,
    tied: true,
    max_pos: 64,
};

const MISTRAL: Cfg = Cfg {
    family: Family::Mistral,
    hidden: 64,
    heads: 4,
    kv_heads: 1,
    head_dim: 16,
    inter: 96,
    layers: 2,
    vocab: 89,
    theta: 10_000.0,
    eps: 1e-5,
    window: Some(4),
    bias: false,
    tied: false,
    max_pos: 64,
};

/// Prompts of length 1, 3 (within the window) and 11 (longer than the window).
const PROMPTS: [&[u32]; 3] = [
    &[7],
    &[12, 80, 3],
    &[5, 17, 3, 88, 42, 0, 61, 29, 73, 11, 50],
];

/// xorshift64*: deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, center: f32, amp: f32) -> Vec<f32> {
        (0..n).map(|_| center + amp * self.uniform()).collect()
    }
}

/// A checkpoint in memory: Hugging Face names to (row-major shape, values).
struct Model {
    cfg: Cfg,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Model {
    fn random(cfg: Cfg, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let mut tensors = BTreeMap::new();
        let mut put = |name: String, shape: Vec<usize>, center: f32, amp: f32| {
            let data = rng.vec(shape.iter().product(), center, amp);
            tensors.insert(name, (shape, data));
        };
        let (h, q, kv) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
        );
        put(
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab, h],
            0.0,
            0.5,
        );
        for i in 0..cfg.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            put(p("input_layernorm.weight"), vec![h], 1.0, 0.2);
            put(p("self_attn.q_proj.weight"), vec![q, h], 0.0, 0.25);
            put(p("self_attn.k_proj.weight"), vec![kv, h], 0.0, 0.25);
            put(p("self_attn.v_proj.weight"), vec![kv, h], 0.0, 0.25);
            if cfg.bias {
                put(p("self_attn.q_proj.bias"), vec![q], 0.0, 0.5);
                put(p("self_attn.k_proj.bias"), vec![kv], 0.0, 0.5);
                put(p("self_attn.v_proj.bias"), vec![kv], 0.0, 0.5);
            }
            put(p("self_attn.o_proj.weight"), vec![h, q], 0.0, 0.2);
            put(p("post_attention_layernorm.weight"), vec![h], 1.0, 0.2);
            put(p("mlp.gate_proj.weight"), vec![cfg.inter, h], 0.0, 0.2);
            put(p("mlp.up_proj.weight"), vec![cfg.inter, h], 0.0, 0.2);
            put(p("mlp.down_proj.weight"), vec![h, cfg.inter], 0.0, 0.2);
        }
        put("model.norm.weight".into(), vec![h], 1.0, 0.2);
        if !cfg.tied {
            put("lm_head.weight".into(), vec![cfg.vocab, h], 0.0, 0.2);
        }
        Model { cfg, tensors }
    }

    fn get(&self, name: &str) -> &[f32] {
        &self.tensors[name].1
    }

    /// Writes `config.json` and `model.safetensors` (f32) into `dir`.
    fn write_hf(&self, dir: &Path) -> PathBuf {
        let c = &self.cfg;
        std::fs::create_dir_all(dir).unwrap();
        let mut config = serde_json::json!({
            "hidden_size": c.hidden,
            "intermediate_size": c.inter,
            "num_hidden_layers": c.layers,
            "num_attention_heads": c.heads,
            "num_key_value_heads": c.kv_heads,
            "vocab_size": c.vocab,
            "rope_theta": c.theta,
            "rms_norm_eps": c.eps,
            "max_position_embeddings": c.max_pos,
            "tie_word_embeddings": c.tied,
            "torch_dtype": "float32",
        });
        match c.family {
            Family::Qwen2 => {
                config["model_type"] = "qwen2".into();
                config["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
                // As in released Qwen2 configs: a window is named but not used.
                config["sliding_window"] = 4.into();
                config["use_sliding_window"] = false.into();
            }
            Family::Mistral => {
                config["model_type"] = "mistral".into();
                config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
                config["head_dim"] = c.head_dim.into();
                config["sliding_window"] = serde_json::json!(c.window);
            }
        }
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
        let tensors: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(name, (shape, data))| {
                (
                    name.clone(),
                    Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        dir.to_path_buf()
    }

    /// Writes the same weights as a GGUF file the way llama.cpp's converter does: arch `qwen2`
    /// (q/k as they are) or `llama` for Mistral (q/k rows permuted for interleaved RoPE).
    fn write_gguf(&self, path: &Path) -> PathBuf {
        let c = &self.cfg;
        let arch = match c.family {
            Family::Qwen2 => "qwen2",
            Family::Mistral => "llama",
        };
        let k = |s: &str| format!("{arch}.{s}");
        let mut meta: Vec<(String, GgufValue)> = vec![
            (
                "general.architecture".into(),
                GgufValue::String(arch.into()),
            ),
            (
                "general.name".into(),
                GgufValue::String(format!("tiny-{arch}")),
            ),
            (k("block_count"), GgufValue::U32(c.layers as u32)),
            (k("embedding_length"), GgufValue::U32(c.hidden as u32)),
            (k("feed_forward_length"), GgufValue::U32(c.inter as u32)),
            (k("attention.head_count"), GgufValue::U32(c.heads as u32)),
            (
                k("attention.head_count_kv"),
                GgufValue::U32(c.kv_heads as u32),
            ),
            (
                k("attention.layer_norm_rms_epsilon"),
                GgufValue::F32(c.eps as f32),
            ),
            (k("rope.freq_base"), GgufValue::F32(c.theta as f32)),
            (k("context_length"), GgufValue::U32(c.max_pos as u32)),
            (k("vocab_size"), GgufValue::U32(c.vocab as u32)),
        ];
        if let Some(w) = c.window {
            meta.push((k("attention.sliding_window"), GgufValue::U32(w as u32)));
        }
        let mut stored: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, (shape, data)) in &self.tensors {
            let role = TensorRole::from_hf_name(name).unwrap();
            let permute_heads = match (c.family, name.as_str()) {
                (Family::Mistral, n) if n.ends_with("q_proj.weight") => Some(c.heads),
                (Family::Mistral, n) if n.ends_with("k_proj.weight") => Some(c.kv_heads),
                _ => None,
            };
            let data = match permute_heads {
                Some(heads) => permute_rows(data, heads, shape[1]),
                None => data.clone(),
            };
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            stored.push((role.gguf_name(), shape.clone(), bytes));
        }
        let raw: Vec<RawTensor<'_>> = stored
            .iter()
            .map(|(name, shape, bytes)| RawTensor {
                name,
                shape,
                dtype: GgmlType::F32,
                data: bytes,
            })
            .collect();
        let meta: Vec<(&str, GgufValue)> =
            meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        std::fs::write(path, to_bytes(&meta, &raw)).unwrap();
        path.to_path_buf()
    }
}

/// llama.cpp's `permute`: `w.reshape(heads, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)`,
/// so stored row `h*d + 2i + j` holds Hugging Face row `h*d + j*d/2 + i`.
fn permute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let d = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let dst = h * d + 2 * i + j;
                let src = h * d + j * (d / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// What the reference may leave out, to show that Strata does not.
#[derive(Debug, Clone, Copy, Default)]
struct Ablation {
    /// Attend to every earlier position even if the model has a window.
    no_window: bool,
    /// Use this window instead of the model's.
    force_window: Option<usize>,
    /// Zero the q, k, v biases respectively.
    zero_bias: [bool; 3],
}

fn matvec(w: &[f32], x: &[f64], rows: usize) -> Vec<f64> {
    let cols = x.len();
    assert_eq!(w.len(), rows * cols);
    (0..rows)
        .map(|r| {
            w[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(a, b)| f64::from(*a) * b)
                .sum()
        })
        .collect()
}

fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, w)| v * s * f64::from(*w))
        .collect()
}

/// Hugging Face's rotate-half RoPE on every head of `x`, at position `pos`.
fn rope(x: &mut [f64], head_dim: usize, theta: f64, pos: usize) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let inv_freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
            let (sin, cos) = (pos as f64 * inv_freq).sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos - b * sin;
            head[i + half] = b * cos + a * sin;
        }
    }
}

/// A naive f64 forward pass over `tokens`: the logits at every position.
fn reference(m: &Model, tokens: &[u32], ab: Ablation) -> Vec<Vec<f64>> {
    let c = &m.cfg;
    let (h, hd) = (c.hidden, c.head_dim);
    let (q_w, kv_w) = (c.heads * hd, c.kv_heads * hd);
    let window = if ab.no_window {
        None
    } else {
        ab.force_window.or(c.window)
    };
    let emb = m.get("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            emb[t as usize * h..(t as usize + 1) * h]
                .iter()
                .map(|v| f64::from(*v))
                .collect()
        })
        .collect();
    for l in 0..c.layers {
        let name = |s: &str| format!("model.layers.{l}.{s}");
        let proj = |x: &[f64], which: usize, rows: usize| -> Vec<f64> {
            let p = ["q", "k", "v"][which];
            let mut y = matvec(m.get(&name(&format!("self_attn.{p}_proj.weight"))), x, rows);
            if c.bias && !ab.zero_bias[which] {
                let b = m.get(&name(&format!("self_attn.{p}_proj.bias")));
                y.iter_mut().zip(b).for_each(|(y, b)| *y += f64::from(*b));
            }
            y
        };
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let n = rms_norm(x, m.get(&name("input_layernorm.weight")), c.eps);
            let mut q = proj(&n, 0, q_w);
            let mut k = proj(&n, 1, kv_w);
            rope(&mut q, hd, c.theta, pos);
            rope(&mut k, hd, c.theta, pos);
            qs.push(q);
            ks.push(k);
            vs.push(proj(&n, 2, kv_w));
        }
        let group = c.heads / c.kv_heads;
        for (p, x) in xs.iter_mut().enumerate() {
            // Keys at positions > p - window: the last `window` positions, itself included.
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let mut attn = vec![0f64; q_w];
            for head in 0..c.heads {
                let kvh = head / group;
                let q = &qs[p][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (lo..=p)
                    .map(|s| {
                        let k = &ks[s][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (s, e) in (lo..=p).zip(&exps) {
                    let v = &vs[s][kvh * hd..(kvh + 1) * hd];
                    for (o, v) in attn[head * hd..(head + 1) * hd].iter_mut().zip(v) {
                        *o += e / total * v;
                    }
                }
            }
            let o = matvec(m.get(&name("self_attn.o_proj.weight")), &attn, h);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let n = rms_norm(x, m.get(&name("post_attention_layernorm.weight")), c.eps);
            let gate = matvec(m.get(&name("mlp.gate_proj.weight")), &n, c.inter);
            let up = matvec(m.get(&name("mlp.up_proj.weight")), &n, c.inter);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(m.get(&name("mlp.down_proj.weight")), &act, h);
            x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        }
    }
    let head = if c.tied { emb } else { m.get("lm_head.weight") };
    xs.iter()
        .map(|x| {
            matvec(
                head,
                &rms_norm(x, m.get("model.norm.weight"), c.eps),
                c.vocab,
            )
        })
        .collect()
}

fn last_reference(m: &Model, tokens: &[u32], ab: Ablation) -> Vec<f64> {
    reference(m, tokens, ab).pop().unwrap()
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "logit vector lengths");
    a.iter()
        .zip(b)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max)
}

fn max_diff32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit vector lengths");
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f64]) -> (u32, f64) {
    let mut sorted: Vec<(usize, f64)> = v.iter().copied().enumerate().collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    (sorted[0].0 as u32, sorted[0].1 - sorted[1].1)
}

fn log_softmax(v: &[f64]) -> Vec<f64> {
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + v.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    v.iter().map(|x| x - lse).collect()
}

fn open(path: &Path) -> ModelMeta {
    ModelMeta::open(ModelFiles::resolve(path.to_str().unwrap(), None).unwrap()).unwrap()
}

fn engine(meta: &ModelMeta) -> Engine {
    let spec = SliceSpec::whole(meta, None);
    let slice = ModelSlice::load(meta, &spec, &mut |_, _, _| {}).unwrap();
    Engine::from_stages(vec![Stage::new(0, slice, 8).unwrap()]).unwrap()
}

/// A model written both ways into a fresh temporary directory.
struct Written {
    model: Model,
    hf: ModelMeta,
    gguf: ModelMeta,
    _tmp: tempfile::TempDir,
}

fn write_both(cfg: Cfg, seed: u64) -> Written {
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::random(cfg, seed);
    let hf = open(&model.write_hf(&tmp.path().join("hf")));
    let gguf = open(&model.write_gguf(&tmp.path().join("tiny.gguf")));
    Written {
        model,
        hf,
        gguf,
        _tmp: tmp,
    }
}

/// Strata's last-position logits from both formats against the reference.
fn check_logits(w: &Written) {
    let mut from_hf = engine(&w.hf);
    let mut from_gguf = engine(&w.gguf);
    for prompt in PROMPTS {
        let want = last_reference(&w.model, prompt, Ablation::default());
        let spread = want.iter().copied().fold(0f64, |m, v| m.max(v.abs()));
        assert!(
            spread > 0.5,
            "degenerate reference logits (max |logit| {spread})"
        );
        let hf = from_hf.last_logits(prompt).unwrap();
        let d = max_diff(&hf, &want);
        assert!(
            d <= 1e-4,
            "{:?} HF, prompt of {}: max |logit diff| = {d}",
            w.model.cfg.family,
            prompt.len()
        );
        let gguf = from_gguf.last_logits(prompt).unwrap();
        let d = max_diff32(&gguf, &hf);
        assert!(
            d <= 1e-5,
            "{:?} GGUF vs HF, prompt of {}: max |logit diff| = {d}",
            w.model.cfg.family,
            prompt.len()
        );
    }
}

/// Greedy decoding through `Engine::step`: the prompt, then three tokens one at a time; each
/// sampled token must be the reference's argmax.
fn check_greedy(model: &Model, meta: &ModelMeta) {
    let mut e = engine(meta);
    let prompt = PROMPTS[2];
    let seq_id = 7;
    let mut seq = prompt.to_vec();
    let mut feed = prompt.to_vec();
    for step_id in 0..4u64 {
        let step = StepFrame {
            times: Default::default(),
            step_id,
            stage: 0,
            releases: vec![],
            seqs: vec![SeqStep {
                seq_id,
                pos0: (seq.len() - feed.len()) as u32,
                prompt_len: prompt.len() as u32,
                tokens: feed.clone(),
                sample: true,
                params: SamplingParams {
                    top_logprobs: 5,
                    ..SamplingParams::default()
                },
                // The engine allocates.
                blocks: vec![],
                fresh: step_id == 0,
                history: vec![],
            }],
            hidden: None,
            trace: String::new(),
            concurrent: 1,
        };
        let samples = e.step(step).unwrap();
        assert_eq!(samples.samples.len(), 1);
        let sample = &samples.samples[0];
        let got = sample.token;
        let logits = last_reference(model, &seq, Ablation::default());
        let (want, margin) = argmax(&logits);
        assert!(
            margin > 1e-3,
            "step {step_id}: the reference's top two logits are {margin} apart"
        );
        assert_eq!(
            got,
            want,
            "{:?} step {step_id} after {} tokens",
            model.cfg.family,
            seq.len()
        );
        // The reported log-probabilities come from the same logits as the reference's.
        let lp = log_softmax(&logits);
        let off = |t: u32, v: f32| (f64::from(v) - lp[t as usize]).abs();
        assert!(
            off(got, sample.logprob) <= 1e-4,
            "step {step_id}: logprob {}",
            sample.logprob
        );
        assert_eq!(sample.top.len(), 5);
        assert_eq!(sample.top[0].0, want);
        for &(t, v) in &sample.top {
            assert!(
                off(t, v) <= 1e-4,
                "step {step_id}: top logprob of token {t}: {v} vs {}",
                lp[t as usize]
            );
        }
        seq.push(got);
        feed = vec![got];
    }
    e.release(seq_id);
    assert_eq!(e.free_blocks(), 8, "released sequence frees its blocks");
}

#[test]
fn qwen2_config_is_read_from_both_formats() {
    let w = write_both(QWEN2, 0x5157_454e_3200_0001);
    for meta in [&w.hf, &w.gguf] {
        let c = &meta.config;
        assert_eq!(c.arch, Arch::Qwen2);
        assert_eq!(
            (
                c.num_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                c.vocab_size
            ),
            (2, 64, 96, 4, 2, 16, 97)
        );
        assert!(c.attention_bias, "Qwen2 has q/k/v biases");
        assert_eq!(c.sliding_window, None, "use_sliding_window is false");
        assert!(c.tie_word_embeddings && meta.tied_head());
        assert!(!meta.qk_permuted, "llama.cpp does not permute Qwen2's q/k");
        assert_eq!(c.max_position_embeddings, 64);
    }
}

#[test]
fn mistral_config_is_read_from_both_formats() {
    let w = write_both(MISTRAL, 0x4d49_5354_5241_4c01);
    for meta in [&w.hf, &w.gguf] {
        let c = &meta.config;
        assert_eq!(
            (
                c.num_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                c.vocab_size
            ),
            (2, 64, 96, 4, 1, 16, 89)
        );
        assert!(!c.attention_bias);
        assert_eq!(c.sliding_window, Some(4));
        assert!(!c.tie_word_embeddings && !meta.tied_head());
    }
    assert_eq!(w.hf.config.arch, Arch::Mistral);
    assert!(!w.hf.qk_permuted);
    // Mistral GGUFs use llama.cpp's `llama` architecture, with permuted q/k rows.
    assert_eq!(w.gguf.config.arch, Arch::Llama);
    assert!(w.gguf.qk_permuted);
}

#[test]
fn qwen2_logits_match_the_reference_from_hf_and_gguf() {
    check_logits(&write_both(QWEN2, 0x5157_454e_3200_0001));
}

#[test]
fn mistral_logits_match_the_reference_from_hf_and_gguf() {
    check_logits(&write_both(MISTRAL, 0x4d49_5354_5241_4c01));
}

#[test]
fn qwen2_biases_matter_and_its_unused_window_is_ignored() {
    let w = write_both(QWEN2, 0x5157_454e_3200_0001);
    let mut e = engine(&w.hf);
    let prompt = PROMPTS[2];
    let got = e.last_logits(prompt).unwrap();
    assert!(max_diff(&got, &last_reference(&w.model, prompt, Ablation::default())) <= 1e-4);
    // Each bias on its own moves the logits: a loader that dropped any one would fail above.
    for (which, p) in ["q", "k", "v"].iter().enumerate() {
        let mut ab = Ablation::default();
        ab.zero_bias[which] = true;
        let d = max_diff(&got, &last_reference(&w.model, prompt, ab));
        assert!(
            d > 1e-3,
            "zeroing the {p} bias changes the logits by only {d}"
        );
    }
    // The config names a window of 4 with use_sliding_window false: it must not be applied.
    let ab = Ablation {
        force_window: Some(4),
        ..Default::default()
    };
    let d = max_diff(&got, &last_reference(&w.model, prompt, ab));
    assert!(d > 1e-3, "a window of 4 changes the logits by only {d}");
}

#[test]
fn mistral_sliding_window_matters() {
    let w = write_both(MISTRAL, 0x4d49_5354_5241_4c01);
    let no_window = Ablation {
        no_window: true,
        ..Default::default()
    };
    // Within the window, full attention is the same thing (checks the reference itself).
    let short = PROMPTS[1];
    let d = last_reference(&w.model, short, Ablation::default())
        .iter()
        .zip(last_reference(&w.model, short, no_window))
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    assert!(d < 1e-12, "{d}");
    // Past it, ignoring the window gives other logits, from either format.
    let long = PROMPTS[2];
    let full = last_reference(&w.model, long, no_window);
    for meta in [&w.hf, &w.gguf] {
        let got = engine(meta).last_logits(long).unwrap();
        assert!(max_diff(&got, &last_reference(&w.model, long, Ablation::default())) <= 1e-4);
        let d = max_diff(&got, &full);
        assert!(
            d > 1e-3,
            "ignoring the window changes the logits by only {d}"
        );
    }
}

#[test]
fn mistral_gguf_without_the_permutation_would_differ() {
    // The GGUF's stored q/k rows really are in another order, so the match with the Hugging
    // Face directory shows the loader un-permutes them.
    let w = write_both(MISTRAL, 0x4d49_5354_5241_4c01);
    let g = w.gguf.gguf.as_ref().unwrap();
    let t = g.tensor("blk.0.attn_q.weight").unwrap();
    let bytes = std::fs::read(g.path()).unwrap();
    let stored: Vec<f32> = bytes[t.offset as usize..(t.offset + t.n_bytes) as usize]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let hf = w.model.get("model.layers.0.self_attn.q_proj.weight");
    assert_ne!(stored.as_slice(), hf);
    assert_eq!(stored, permute_rows(hf, MISTRAL.heads, MISTRAL.hidden));
}

#[test]
fn qwen2_greedy_decode_matches_the_reference() {
    let w = write_both(QWEN2, 0x5157_454e_3200_0001);
    check_greedy(&w.model, &w.hf);
    check_greedy(&w.model, &w.gguf);
}

#[test]
fn mistral_greedy_decode_matches_the_reference() {
    let w = write_both(MISTRAL, 0x4d49_5354_5241_4c01);
    check_greedy(&w.model, &w.hf);
    check_greedy(&w.model, &w.gguf);
}
