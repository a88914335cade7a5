//! The engine against the reference implementation's golden outputs for SmolLM2-135M
//! (`tests/golden/smollm2/`, Hugging Face transformers in float32).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use candle_core::Device;
use strata_shared::meta::ModelMeta;
use strata_shared::plan::FloatType;
use strata_shared::plan::{Plan, PlanOptions};
use strata_shared::source::{HubOptions, ModelFiles, fetch_default_model};
use strata_shared::topology::Topology;
use strata_shared::wire::{
    DEFAULT_MAX_FRAME_BYTES, Frame, KV_BLOCK_SIZE, Sample, SamplingParams, SeqStep, StepFrame,
};
use strata_worker::Engine;
use strata_worker::kv::KvDtype;
use strata_worker::model::{ModelSlice, SliceSpec};
use strata_worker::stage::Stage;
use strata_worker::weights;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/smollm2")
}

#[derive(serde::Deserialize)]
struct Prompt {
    name: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Prompts {
    prompts: Vec<Prompt>,
}

fn prompts() -> Vec<Prompt> {
    let text = std::fs::read_to_string(golden_dir().join("prompts.json")).unwrap();
    serde_json::from_str::<Prompts>(&text).unwrap().prompts
}

fn meta() -> ModelMeta {
    let path = fetch_default_model().expect("fetch the default model");
    ModelMeta::open(ModelFiles::resolve(path.to_str().unwrap(), None).unwrap()).unwrap()
}

fn engine(meta: &ModelMeta, dtype: Option<FloatType>) -> Engine {
    let spec = SliceSpec::whole(meta, dtype);
    let slice = ModelSlice::load(meta, &spec, &mut |_, _, _| {}).unwrap();
    Engine::from_stages(vec![Stage::new(0, slice, 256).unwrap()]).unwrap()
}

fn reference_logits(name: &str) -> Vec<Vec<f32>> {
    let t = candle_core::safetensors::load(golden_dir().join(name), &Device::Cpu).unwrap();
    t["last_logits"].to_vec2::<f32>().unwrap()
}

/// A step of one sequence on stage 0: `tokens` from position `pos0`, sampled greedily.
fn one_seq_step(
    step_id: u64,
    seq_id: u64,
    pos0: u32,
    prompt_len: usize,
    tokens: &[u32],
) -> StepFrame {
    StepFrame {
        times: Default::default(),
        step_id,
        stage: 0,
        releases: vec![],
        seqs: vec![SeqStep {
            seq_id,
            pos0,
            prompt_len: prompt_len as u32,
            tokens: tokens.to_vec(),
            sample: true,
            params: SamplingParams {
                logprobs: true,
                ..SamplingParams::default()
            },
            // One sequence at a time: it may take blocks 0, 1, ... of every stage's pool.
            blocks: (0..(pos0 as usize + tokens.len()).div_ceil(KV_BLOCK_SIZE) as u32).collect(),
            fresh: pos0 == 0,
            history: vec![],
        }],
        hidden: None,
        trace: String::new(),
        concurrent: 1,
    }
}

/// Greedy decoding of `n` tokens, not stopping at EOS: `run` takes each step and returns the
/// sequence's sample. Returns each token with its log-probability.
fn greedy_with(
    seq_id: u64,
    prompt: &[u32],
    n: usize,
    mut run: impl FnMut(StepFrame) -> Sample,
) -> Vec<(u32, f32)> {
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    let mut pos = 0u32;
    while out.len() < n {
        let s = run(one_seq_step(
            out.len() as u64,
            seq_id,
            pos,
            prompt.len(),
            &feed,
        ));
        out.push((s.token, s.logprob));
        pos += feed.len() as u32;
        feed = vec![s.token];
    }
    out
}

/// Greedy decoding of `n` tokens through the engine.
fn greedy(engine: &mut Engine, seq_id: u64, prompt: &[u32], n: usize) -> Vec<u32> {
    let out = greedy_with(seq_id, prompt, n, |step| {
        engine.step(step).unwrap().samples.remove(0)
    });
    engine.release(seq_id);
    out.into_iter().map(|(token, _)| token).collect()
}

#[test]
fn f32_logits_and_greedy_match_the_reference() {
    let meta = meta();
    let mut e = engine(&meta, Some(FloatType::F32));
    // f32 weights keep f32 keys and values.
    assert_eq!(e.stages()[0].kv().dtype(), KvDtype::F32);
    let reference = reference_logits("logits.safetensors");
    for (i, p) in prompts().iter().enumerate() {
        let logits = e.last_logits(&p.prompt_ids).unwrap();
        let max_diff = logits
            .iter()
            .zip(&reference[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "prompt {}: max |logit - reference| = {max_diff:.2e}",
            p.name
        );
        assert!(
            max_diff <= 5e-3,
            "prompt {}: max |logit diff| = {max_diff}",
            p.name
        );
        let got = greedy(&mut e, i as u64, &p.prompt_ids, p.greedy_ids.len());
        assert_eq!(got, p.greedy_ids, "prompt {}", p.name);
    }
}

/// A layer that takes its rows in runs gives the bits it gives in one pass: two prompts in one
/// step, in runs of 7 rows (across the two sequences, and across the attention's tiles of 16),
/// then decode steps of both.
#[test]
fn rows_in_runs_give_the_bits_of_one_pass() {
    let meta = meta();
    let spec = SliceSpec::whole(&meta, None);
    let engine = |rows| {
        let slice = ModelSlice::load(&meta, &spec, &mut |_, _, _| {}).unwrap();
        Engine::from_stages(vec![
            Stage::new(0, slice.with_chunk_rows(rows), 256).unwrap(),
        ])
        .unwrap()
    };
    let prompts = prompts();
    let (a, b) = (&prompts[5].prompt_ids, &prompts[3].prompt_ids);
    let run = |engine: &mut Engine| {
        let mut out = Vec::new();
        let (mut feed_a, mut feed_b) = (a.clone(), b.clone());
        let (mut pos_a, mut pos_b) = (0u32, 0u32);
        for step_id in 0..4 {
            let mut step = one_seq_step(step_id, 1, pos_a, a.len(), &feed_a);
            let mut second = one_seq_step(step_id, 2, pos_b, b.len(), &feed_b);
            // The second sequence's blocks from 128 on.
            second.seqs[0].blocks.iter_mut().for_each(|b| *b += 128);
            step.seqs.append(&mut second.seqs);
            let samples = engine.step(step).unwrap().samples;
            assert_eq!(samples.len(), 2);
            pos_a += feed_a.len() as u32;
            pos_b += feed_b.len() as u32;
            feed_a = vec![samples[0].token];
            feed_b = vec![samples[1].token];
            out.extend(samples.iter().map(|s| (s.token, s.logprob.to_bits())));
        }
        out
    };
    assert!(
        a.len() > 7 && b.len() > 7,
        "each prompt fills more than one run"
    );
    let whole = run(&mut engine(4096));
    assert_eq!(run(&mut engine(7)), whole);
}

#[test]
fn as_stored_q4_1_agrees_with_the_reference_top1() {
    let meta = meta();
    let mut e = engine(&meta, None);
    // Quantized weights get an f16 KV cache, and keep every top-1.
    assert_eq!(e.stages()[0].kv().dtype(), KvDtype::F16);
    let (mut agree, mut total) = (0usize, 0usize);
    for p in prompts() {
        let tokens: Vec<u32> = p.prompt_ids.iter().chain(&p.greedy_ids).copied().collect();
        let first = p.prompt_ids.len() as u32 - 1;
        let rows: Vec<u32> = (first..first + p.greedy_ids.len() as u32).collect();
        e.logits_for(1, &tokens, p.prompt_ids.len(), &rows, 64, |r, l| {
            let want = p.greedy_ids[r - first as usize];
            agree += usize::from(strata_worker::sampling::argmax(l) == want);
            total += 1;
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(total, 192);
    let rate = agree as f64 / total as f64;
    eprintln!("as-stored Q4_1 top-1 agreement: {agree}/{total} = {rate:.4}");
    assert!(rate >= 0.95, "top-1 agreement {agree}/{total}");
}

fn plan(meta: &ModelMeta, yaml: &str) -> Plan {
    let topology = Topology::parse(yaml, "<test>").unwrap();
    Plan::resolve(meta, &topology, &PlanOptions::default()).unwrap()
}

/// A frame as the next hop receives it: encoded, then decoded from its bytes.
fn over_the_wire(frame: Frame) -> Frame {
    let bytes = frame.to_bytes().unwrap();
    Frame::from_bytes(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap()
}

/// Greedy decoding through `stages` chained by hand, each frame crossing the wire format;
/// returns each generated token with its log-probability.
fn greedy_through(stages: &mut [Stage], seq_id: u64, prompt: &[u32], n: usize) -> Vec<(u32, f32)> {
    let out = greedy_with(seq_id, prompt, n, |step| {
        let mut frame = Frame::Step(step);
        for stage in stages.iter_mut() {
            let Frame::Step(step) = over_the_wire(frame) else {
                panic!("a step reaches every stage")
            };
            frame = stage.run(step).unwrap();
        }
        let Frame::Samples(mut samples) = over_the_wire(frame) else {
            panic!("the last stage returns samples")
        };
        samples.samples.remove(0)
    });
    for stage in stages.iter_mut() {
        stage.release(seq_id);
    }
    out
}

/// The stages of `plan`, each loaded on its own; also checks that each loads exactly the
/// tensors the plan gives it (by the names its progress reports) and holds exactly their bytes.
fn load_stages(meta: &ModelMeta, plan: &Plan) -> Vec<Stage> {
    (0..plan.route.len())
        .map(|i| {
            let spec = SliceSpec::from_plan(plan, i).unwrap();
            let mut loaded = Vec::new();
            let slice =
                ModelSlice::load(meta, &spec, &mut |name, _, _| loaded.push(name.to_string()))
                    .unwrap();
            let mut owned: Vec<String> = plan.stage_tensors(i).map(|t| t.name.clone()).collect();
            loaded.sort();
            owned.sort();
            assert_eq!(loaded, owned, "stage {i} loads exactly its own tensors");
            assert_eq!(
                slice.weight_bytes() as u64,
                plan.stage_bytes(i),
                "stage {i} holds exactly its own weights"
            );
            Stage::new(i as u32, slice, 64).unwrap()
        })
        .collect()
}

#[test]
fn three_slices_chained_by_hand_equal_one_slice_bit_for_bit() {
    let meta = meta();
    let three = plan(
        &meta,
        "0-10: {device: 'cpu[0]'}\n10-20: {device: 'cpu[1]'}\n20-30: {device: 'cpu[2]'}\n",
    );
    assert_eq!(three.route.len(), 3);
    let mut chained = load_stages(&meta, &three);
    let [a, b, c] = &chained[..] else {
        panic!("three stages")
    };
    // Each slice holds only what it owns: the middle one has neither embedding nor head.
    assert!(a.slice().has_embedding() && !a.slice().has_head());
    assert!(!b.slice().has_embedding() && !b.slice().has_head() && b.slice().n_layers() == 10);
    assert!(c.slice().has_head() && !c.slice().has_embedding());
    let mut one = load_stages(&meta, &plan(&meta, ""));
    assert_eq!(one.len(), 1);
    for (i, p) in prompts().iter().enumerate() {
        // Prefill, then 16 decode steps over each stage's own KV cache.
        assert_eq!(
            greedy_through(&mut chained, i as u64, &p.prompt_ids, 16),
            greedy_through(&mut one, i as u64, &p.prompt_ids, 16),
            "{}",
            p.name
        );
    }
}

#[test]
fn a_slice_never_depends_on_tensors_it_does_not_own() {
    // A copy of the model whose layers 10-29 and final norm hold garbage: the slice of layers
    // 0-10 (with the embedding) must compute exactly what it computes from the real file.
    let meta = meta();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("garbled.gguf");
    let mut bytes = std::fs::read(&meta.files.weights[0]).unwrap();
    let mut garbled = 0;
    for t in meta.tensors.values() {
        let foreign = match t.role {
            strata_shared::names::TensorRole::Layer(i, _) => i >= 10,
            strata_shared::names::TensorRole::FinalNorm => true,
            _ => false,
        };
        if foreign {
            let at = t.offset as usize;
            bytes[at..at + t.n_bytes as usize].fill(0xff);
            garbled += 1;
        }
    }
    assert_eq!(garbled, 20 * 9 + 1);
    std::fs::write(&path, bytes).unwrap();
    let garbled_meta =
        ModelMeta::open(ModelFiles::resolve(path.to_str().unwrap(), None).unwrap()).unwrap();
    let split = "0-10: {device: 'cpu[0]'}\n10-30: {device: 'cpu[1]'}\n";
    let run_first = |meta: &ModelMeta| {
        let plan = plan(meta, split);
        let spec = SliceSpec::from_plan(&plan, 0).unwrap();
        let slice = ModelSlice::load(meta, &spec, &mut |_, _, _| {}).unwrap();
        let mut stage = Stage::new(0, slice, 64).unwrap();
        let p = &prompts()[0];
        let step = one_seq_step(0, 1, 0, p.prompt_ids.len(), &p.prompt_ids);
        match stage.run(step).unwrap() {
            Frame::Step(s) => s.hidden.expect("activations"),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(run_first(&garbled_meta), run_first(&meta));
}

/// Writes the model's weights, dequantized to f32 in the Hugging Face layout, as a Hugging Face
/// directory with the reference config and tokenizer.
fn write_hf_dir(meta: &ModelMeta, dir: &std::path::Path) {
    weights::export_safetensors(meta, FloatType::F32, &dir.join("model.safetensors")).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(golden_dir().join("hf").join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn hf_directory_and_hub_cache_give_the_gguf_logits() {
    let meta = meta();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2");
    std::fs::create_dir(&dir).unwrap();
    write_hf_dir(&meta, &dir);
    let hf = ModelMeta::open(ModelFiles::resolve(dir.to_str().unwrap(), None).unwrap()).unwrap();
    assert_eq!(hf.config.num_layers, 30);
    let mut from_gguf = engine(&meta, Some(FloatType::F32));
    let mut from_hf = engine(&hf, None);
    for p in prompts() {
        assert_eq!(
            from_hf.last_logits(&p.prompt_ids).unwrap(),
            from_gguf.last_logits(&p.prompt_ids).unwrap(),
            "{}",
            p.name
        );
    }
    let p = &prompts()[1];
    let want = from_gguf.last_logits(&p.prompt_ids).unwrap();

    // The same weights as a sharded checkpoint (two files and an index).
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    let all = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (k, half) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", k + 1);
        let part: std::collections::HashMap<_, _> = half
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, sharded.join(&file)).unwrap();
        for n in half {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), sharded.join(f)).unwrap();
    }
    let files = ModelFiles::resolve(sharded.to_str().unwrap(), None).unwrap();
    assert_eq!(files.weights.len(), 2);
    let mut from_shards = engine(&ModelMeta::open(files).unwrap(), None);
    assert_eq!(from_shards.last_logits(&p.prompt_ids).unwrap(), want);

    // The same directory as a hub id in a Hugging Face cache, resolved offline.
    let home = tmp.path().join("hf-home");
    let repo = home.join("hub/models--HuggingFaceTB--SmolLM2-135M-Instruct");
    let snap = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        std::fs::rename(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    let hub_opts = HubOptions {
        cache_dir: home.join("hub"),
        offline: true,
        endpoint: None,
    };
    let files =
        ModelFiles::resolve_with("HuggingFaceTB/SmolLM2-135M-Instruct", None, &hub_opts).unwrap();
    assert!(files.tokenizer_json.is_some());
    let hub = ModelMeta::open(files).unwrap();
    let mut from_hub = engine(&hub, None);
    assert_eq!(from_hub.last_logits(&p.prompt_ids).unwrap(), want);
    let err = ModelFiles::resolve_with("HuggingFaceTB/not-cached", None, &hub_opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HuggingFaceTB/not-cached")
            && err.contains("config.json")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

#[test]
fn half_precision_weights_stay_close_to_f32() {
    let meta = meta();
    let mut f32 = engine(&meta, Some(FloatType::F32));
    for (dtype, tolerance) in [(FloatType::F16, 0.2), (FloatType::BF16, 1.0)] {
        let mut e = engine(&meta, Some(dtype));
        for p in prompts() {
            let want = f32.last_logits(&p.prompt_ids).unwrap();
            let got = e.last_logits(&p.prompt_ids).unwrap();
            let max_diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!(
                "{}: prompt {}: max |logit diff| = {max_diff:.3}",
                dtype.name(),
                p.name
            );
            assert!(
                max_diff <= tolerance,
                "{}: prompt {}: max |logit diff| {max_diff}",
                dtype.name(),
                p.name
            );
            // The top token may change only between near-ties.
            let best = want[strata_worker::sampling::argmax(&want) as usize];
            let chosen = want[strata_worker::sampling::argmax(&got) as usize];
            assert!(
                best - chosen <= tolerance,
                "{}: prompt {}: top token {chosen} vs {best}",
                dtype.name(),
                p.name
            );
        }
    }
}
