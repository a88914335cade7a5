//! The engine against the reference implementation's golden outputs for SmolLM2-135M
//! (`../shared/golden/smollm2/`, Hugging Face transformers in float32).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use candle_core::Device;
use strata_shared::meta::ModelMeta;
use strata_shared::plan::FloatType;
use strata_shared::plan::{Plan, PlanOptions};
use strata_shared::source::{HubOptions, ModelFiles, fetch_default_model};
use strata_shared::topology::Topology;
use strata_shared::wire::{SamplingParams, SeqStep, StepFrame};
use strata_worker::Engine;
use strata_worker::model::{ModelSlice, SliceSpec};
use strata_worker::stage::Stage;
use strata_worker::weights::{self, LoadSpec, Weight};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden/smollm2")
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

/// Greedy decoding of `n` tokens, not stopping at EOS.
fn greedy(engine: &mut Engine, seq_id: u64, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    let mut pos = 0u32;
    while out.len() < n {
        let step = StepFrame {
            step_id: out.len() as u64,
            stage: 0,
            releases: vec![],
            seqs: vec![SeqStep {
                seq_id,
                pos0: pos,
                prompt_len: prompt.len() as u32,
                tokens: feed.clone(),
                sample: true,
                params: SamplingParams::default(),
            }],
            hidden: None,
        };
        pos += feed.len() as u32;
        let s = engine.step(step).unwrap();
        let tok = s.samples[0].token;
        out.push(tok);
        feed = vec![tok];
    }
    engine.release(seq_id);
    out
}

#[test]
fn f32_logits_and_greedy_match_the_reference() {
    let meta = meta();
    let mut e = engine(&meta, Some(FloatType::F32));
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

#[test]
fn as_stored_q4_1_agrees_with_the_reference_top1() {
    let meta = meta();
    let mut e = engine(&meta, None);
    let (mut agree, mut total) = (0usize, 0usize);
    for p in prompts() {
        let tokens: Vec<u32> = p.prompt_ids.iter().chain(&p.greedy_ids).copied().collect();
        let first = p.prompt_ids.len() as u32 - 1;
        let rows: Vec<u32> = (first..first + p.greedy_ids.len() as u32).collect();
        e.logits_for(1, &tokens, &rows, 64, |r, l| {
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

#[test]
fn three_chained_slices_equal_one_slice_bit_for_bit() {
    let meta = meta();
    let three = plan(
        &meta,
        "0-10: {device: 'cpu[0]'}\n10-20: {device: 'cpu[1]'}\n20-30: {device: 'cpu[2]'}\n",
    );
    assert_eq!(three.route.len(), 3);
    let mut chained = Engine::load(&meta, &three, 64, &mut |_, _, _| {}).unwrap();
    let [a, b, c] = chained.stages() else {
        panic!("three stages")
    };
    // Each slice holds only what it owns: the middle one has neither embedding nor head.
    assert!(a.slice().has_embedding() && !a.slice().has_head());
    assert!(!b.slice().has_embedding() && !b.slice().has_head() && b.slice().n_layers() == 10);
    assert!(c.slice().has_head() && !c.slice().has_embedding());
    assert!(b.slice().weight_bytes() < a.slice().weight_bytes());
    let mut one = Engine::load(&meta, &plan(&meta, ""), 64, &mut |_, _, _| {}).unwrap();
    assert_eq!(one.stages().len(), 1);
    for p in prompts() {
        assert_eq!(
            chained.last_logits(&p.prompt_ids).unwrap(),
            one.last_logits(&p.prompt_ids).unwrap(),
            "{}",
            p.name
        );
    }
}

/// Writes the model's weights, dequantized to f32 in the Hugging Face layout, as a Hugging Face
/// directory with the reference config and tokenizer.
fn write_hf_dir(meta: &ModelMeta, dir: &std::path::Path) {
    let mut tensors = std::collections::HashMap::new();
    for (role, t) in &meta.tensors {
        let spec = LoadSpec {
            dtype: Some(FloatType::F32),
            unpermute_heads: weights::unpermute_heads(meta, *role),
            ..Default::default()
        };
        let Weight::Dense(w) = weights::load(t, &spec).unwrap() else {
            panic!("dense")
        };
        tensors.insert(t.name.clone(), w);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
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
    let p = &prompts()[1];
    let want = from_gguf.last_logits(&p.prompt_ids).unwrap();
    assert_eq!(from_hf.last_logits(&p.prompt_ids).unwrap(), want);

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
