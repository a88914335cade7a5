//! Bad input through the real loading path (`ModelFiles::resolve`, `ModelMeta::open`,
//! `ModelSlice::load`): a missing file, a truncated GGUF or safetensors file, an unknown
//! architecture, a tensor with the wrong shape, a missing tensor, an unsupported dtype and a
//! non-finite weight under ISQ. Each fails with an error naming the file and the tensor or
//! metadata key, never with a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use strata_shared::ggml::GgmlType;
use strata_shared::gguf::write::{RawTensor, to_bytes};
use strata_shared::gguf::{GgufFile, GgufValue};
use strata_shared::isq::IsqType;
use strata_shared::meta::ModelMeta;
use strata_shared::names::{LayerTensor, TensorRole};
use strata_shared::source::ModelFiles;
use strata_worker::model::{ModelSlice, SliceSpec};
use strata_worker::weights::{self, LoadSpec};

// A tiny tied Llama: hidden 64 (one HQQ group per row), 4 heads of 16, 2 KV heads.
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTER: usize = 64;
const LAYERS: usize = 2;
const VOCAB: usize = 32;

/// One tensor to write, by Hugging Face name; `dtype` is the safetensors dtype string (the
/// data is always 4 bytes per element, so `I32` can stand in for an unsupported type).
#[derive(Clone)]
struct T {
    name: String,
    shape: Vec<usize>,
    dtype: &'static str,
    data: Vec<f32>,
}

/// Every tensor of the tiny model, with small deterministic values.
fn tensors() -> Vec<T> {
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for i in 0..LAYERS {
        for (s, shape) in [
            ("input_layernorm.weight", vec![HIDDEN]),
            ("self_attn.q_proj.weight", vec![q, HIDDEN]),
            ("self_attn.k_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.v_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, q]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("mlp.gate_proj.weight", vec![INTER, HIDDEN]),
            ("mlp.up_proj.weight", vec![INTER, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, INTER]),
        ] {
            shapes.push((format!("model.layers.{i}.{s}"), shape));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![HIDDEN]));
    let mut seed = 0x2545_f491_u32;
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let data = (0..shape.iter().product())
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 * 0.4 - 0.2
                })
                .collect();
            T {
                name,
                shape,
                dtype: "F32",
                data,
            }
        })
        .collect()
}

fn find<'a>(ts: &'a mut [T], name: &str) -> &'a mut T {
    ts.iter_mut().find(|t| t.name == name).unwrap()
}

fn bytes_of(t: &T) -> Vec<u8> {
    t.data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A safetensors file with the tensors' data in the given order.
fn safetensors_bytes(ts: &[T]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for t in ts {
        let b = bytes_of(t);
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [data.len(), data.len() + b.len()]}),
        );
        data.extend_from_slice(&b);
    }
    let mut header = serde_json::to_string(&header).unwrap();
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn config_json(model_type: &str) -> String {
    serde_json::json!({
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32,
        "tie_word_embeddings": true,
    })
    .to_string()
}

/// A Hugging Face directory `dir` with `config.json` and `model.safetensors`.
fn write_hf(dir: &Path, model_type: &str, ts: &[T]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json(model_type)).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(ts)).unwrap();
    dir.to_path_buf()
}

fn gguf_metadata(arch: &str) -> Vec<(String, GgufValue)> {
    let k = |s: &str| format!("{arch}.{s}");
    vec![
        (
            "general.architecture".into(),
            GgufValue::String(arch.into()),
        ),
        (k("block_count"), GgufValue::U32(LAYERS as u32)),
        (k("embedding_length"), GgufValue::U32(HIDDEN as u32)),
        (k("feed_forward_length"), GgufValue::U32(INTER as u32)),
        (k("attention.head_count"), GgufValue::U32(HEADS as u32)),
        (
            k("attention.head_count_kv"),
            GgufValue::U32(KV_HEADS as u32),
        ),
        (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-5)),
        (k("context_length"), GgufValue::U32(32)),
        (k("vocab_size"), GgufValue::U32(VOCAB as u32)),
    ]
}

/// A GGUF file (f32 tensors under their GGUF names, q/k left as they are: the data is noise).
fn gguf_bytes(metadata: &[(String, GgufValue)], ts: &[T]) -> Vec<u8> {
    let stored: Vec<(String, Vec<u8>)> = ts
        .iter()
        .map(|t| {
            (
                TensorRole::from_hf_name(&t.name).unwrap().gguf_name(),
                bytes_of(t),
            )
        })
        .collect();
    let raw: Vec<RawTensor<'_>> = ts
        .iter()
        .zip(&stored)
        .map(|(t, (name, data))| RawTensor {
            name,
            shape: &t.shape,
            dtype: GgmlType::F32,
            data,
        })
        .collect();
    let meta: Vec<(&str, GgufValue)> = metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    to_bytes(&meta, &raw)
}

fn write_gguf(path: &Path, metadata: &[(String, GgufValue)], ts: &[T]) -> PathBuf {
    std::fs::write(path, gguf_bytes(metadata, ts)).unwrap();
    path.to_path_buf()
}

/// Resolves and opens `path` the way `--model` does, turning a panic into a test failure that
/// says so.
fn open(path: &Path) -> Result<ModelMeta, String> {
    let spec = path.to_str().unwrap().to_string();
    catch_unwind(|| {
        let files = ModelFiles::resolve(&spec, None).map_err(|e| e.to_string())?;
        ModelMeta::open(files).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|_| panic!("opening {spec} panicked instead of returning an error"))
}

/// Loads every tensor of an opened model as `spec` says.
fn load_with(meta: &ModelMeta, spec: &SliceSpec) -> Result<ModelSlice, String> {
    catch_unwind(AssertUnwindSafe(|| {
        ModelSlice::load(meta, spec, &mut |_, _, _| {}).map_err(|e| e.to_string())
    }))
    .unwrap_or_else(|_| {
        panic!(
            "loading {} panicked instead of returning an error",
            meta.files.spec
        )
    })
}

fn load(meta: &ModelMeta) -> Result<ModelSlice, String> {
    load_with(meta, &SliceSpec::whole(meta, None))
}

/// The error of the whole path (resolve, open, load), which must fail.
fn load_err(path: &Path) -> String {
    match open(path) {
        Err(e) => e,
        Ok(meta) => match load(&meta) {
            Err(e) => e,
            Ok(_) => panic!("{} loaded without an error", path.display()),
        },
    }
}

fn assert_names(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "the error should name `{p}`: {err}");
    }
}

#[test]
fn the_tiny_checkpoints_load_when_intact() {
    // The control for every case below: what they break is all that breaks.
    let tmp = tempfile::tempdir().unwrap();
    let hf = write_hf(&tmp.path().join("hf"), "llama", &tensors());
    let meta = open(&hf).unwrap();
    assert_eq!(meta.tensors.len(), 2 + 9 * LAYERS);
    load(&meta).unwrap();
    let gguf = write_gguf(
        &tmp.path().join("ok.gguf"),
        &gguf_metadata("llama"),
        &tensors(),
    );
    let meta = open(&gguf).unwrap();
    assert!(meta.qk_permuted);
    load(&meta).unwrap();
}

#[test]
fn a_missing_file_or_directory_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_err(&tmp.path().join("absent.gguf"));
    assert_names(&err, &["absent.gguf", "no such file"]);
    let err = load_err(&tmp.path().join("absent-dir"));
    assert_names(&err, &["absent-dir", "no such file"]);

    // A directory with config.json but no weights.
    let dir = tmp.path().join("no-weights");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json("llama")).unwrap();
    assert_names(&load_err(&dir), &["no-weights", "model.safetensors"]);

    // A sharded checkpoint whose index names a shard that is not there.
    let dir = tmp.path().join("sharded");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json("llama")).unwrap();
    let ts = tensors();
    std::fs::write(
        dir.join("model-00001-of-00002.safetensors"),
        safetensors_bytes(&ts),
    )
    .unwrap();
    let index = serde_json::json!({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors",
    }});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_names(&load_err(&dir), &["model-00002-of-00002.safetensors"]);

    // Weights that vanish between reading the headers and loading the tensors.
    let hf = write_hf(&tmp.path().join("vanishing"), "llama", &ts);
    let meta = open(&hf).unwrap();
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    let err = load(&meta).unwrap_err();
    assert_names(&err, &["model.safetensors", "model.embed_tokens.weight"]);
    let gguf = write_gguf(
        &tmp.path().join("vanishing.gguf"),
        &gguf_metadata("llama"),
        &ts,
    );
    let meta = open(&gguf).unwrap();
    std::fs::remove_file(&gguf).unwrap();
    let err = load(&meta).unwrap_err();
    assert_names(&err, &["vanishing.gguf", "token_embd.weight"]);
}

#[test]
fn a_truncated_gguf_names_the_file_and_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = tensors();
    let full = gguf_bytes(&gguf_metadata("llama"), &ts);
    let path = tmp.path().join("cut.gguf");
    let last = TensorRole::from_hf_name(&ts.last().unwrap().name)
        .unwrap()
        .gguf_name();
    std::fs::write(&path, &full).unwrap();
    let header = GgufFile::open(&path).unwrap();
    let data_start = header.tensors().iter().map(|t| t.offset).min().unwrap() as usize;

    // Cut in the last tensor's data.
    std::fs::write(&path, &full[..full.len() - 4]).unwrap();
    assert_names(
        &load_err(&path),
        &["cut.gguf", &format!("tensor `{last}`"), "truncated"],
    );

    // Cut anywhere in the data: the error names a tensor whose data is missing.
    for cut in (data_start..full.len()).step_by(997) {
        std::fs::write(&path, &full[..cut]).unwrap();
        let err = load_err(&path);
        assert_names(&err, &["cut.gguf", "tensor `", "truncated"]);
    }

    // Cut inside the header (magic, counts, metadata, tensor descriptors): the file is named.
    for cut in (0..data_start)
        .step_by(13)
        .chain([1, 4, 8, 24, data_start - 1])
    {
        std::fs::write(&path, &full[..cut]).unwrap();
        let err = load_err(&path);
        assert_names(&err, &["cut.gguf"]);
    }

    // Truncated after its header was read: loading names the tensor it cannot read.
    std::fs::write(&path, &full).unwrap();
    let meta = open(&path).unwrap();
    std::fs::write(&path, &full[..data_start + 8]).unwrap();
    let err = load(&meta).unwrap_err();
    assert_names(&err, &["cut.gguf", "tensor `token_embd.weight`"]);
}

#[test]
fn a_truncated_safetensors_file_names_the_file_and_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = tensors();
    let dir = write_hf(&tmp.path().join("cut"), "llama", &ts);
    let file = dir.join("model.safetensors");
    let full = std::fs::read(&file).unwrap();
    let last = &ts.last().unwrap().name;

    // Cut in the last tensor's data.
    std::fs::write(&file, &full[..full.len() - 4]).unwrap();
    assert_names(
        &load_err(&dir),
        &[
            "model.safetensors",
            &format!("tensor `{last}`"),
            "truncated",
        ],
    );

    // Cut anywhere in the data.
    let header_end = 8 + u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    for cut in (header_end..full.len()).step_by(997) {
        std::fs::write(&file, &full[..cut]).unwrap();
        assert_names(
            &load_err(&dir),
            &["model.safetensors", "tensor `", "truncated"],
        );
    }

    // Cut inside the header.
    for cut in [0, 3, 8, 9, 100, header_end - 1] {
        std::fs::write(&file, &full[..cut]).unwrap();
        assert_names(&load_err(&dir), &["model.safetensors"]);
    }

    // Truncated after its header was read.
    std::fs::write(&file, &full).unwrap();
    let meta = open(&dir).unwrap();
    std::fs::write(&file, &full[..header_end + 8]).unwrap();
    let err = load(&meta).unwrap_err();
    assert_names(
        &err,
        &["model.safetensors", "tensor `model.embed_tokens.weight`"],
    );
}

#[test]
fn an_unknown_architecture_names_the_file_and_the_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_hf(&tmp.path().join("neox"), "gpt_neox", &tensors());
    assert_names(
        &load_err(&dir),
        &["config.json", "gpt_neox", "unsupported architecture"],
    );

    let path = write_gguf(
        &tmp.path().join("falcon.gguf"),
        &gguf_metadata("falcon"),
        &tensors(),
    );
    assert_names(
        &load_err(&path),
        &["falcon.gguf", "`falcon`", "unsupported architecture"],
    );

    // No architecture at all, and a missing hyper-parameter: the key is named.
    std::fs::write(dir.join("config.json"), r#"{"hidden_size": 64}"#).unwrap();
    assert_names(&load_err(&dir), &["config.json", "model_type", "missing"]);
    let mut meta = gguf_metadata("llama");
    meta.retain(|(k, _)| k != "general.architecture");
    let path = write_gguf(&tmp.path().join("anonymous.gguf"), &meta, &tensors());
    assert_names(
        &load_err(&path),
        &["anonymous.gguf", "general.architecture", "missing"],
    );
    let mut meta = gguf_metadata("llama");
    meta.retain(|(k, _)| k != "llama.block_count");
    let path = write_gguf(&tmp.path().join("no-blocks.gguf"), &meta, &tensors());
    assert_names(
        &load_err(&path),
        &["no-blocks.gguf", "llama.block_count", "missing"],
    );
}

#[test]
fn a_tensor_with_the_wrong_shape_names_it_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ts = tensors();
    let q = find(&mut ts, "model.layers.0.self_attn.q_proj.weight");
    q.shape = vec![63, 64];
    q.data.truncate(63 * 64);

    let dir = write_hf(&tmp.path().join("shape"), "llama", &ts);
    assert_names(
        &load_err(&dir),
        &[
            "model.safetensors",
            "`model.layers.0.self_attn.q_proj.weight`",
            "[63, 64]",
            "[64, 64]",
        ],
    );
    let path = write_gguf(&tmp.path().join("shape.gguf"), &gguf_metadata("llama"), &ts);
    assert_names(
        &load_err(&path),
        &[
            "shape.gguf",
            "`blk.0.attn_q.weight`",
            "[63, 64]",
            "[64, 64]",
        ],
    );

    // A vector of the wrong length, too.
    let mut ts = tensors();
    let n = find(&mut ts, "model.layers.1.post_attention_layernorm.weight");
    n.shape = vec![65];
    n.data.push(1.0);
    let dir = write_hf(&tmp.path().join("norm"), "llama", &ts);
    assert_names(
        &load_err(&dir),
        &[
            "model.safetensors",
            "`model.layers.1.post_attention_layernorm.weight`",
            "[65]",
            "[64]",
        ],
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ts = tensors();
    ts.retain(|t| t.name != "model.layers.1.mlp.down_proj.weight");
    let dir = write_hf(&tmp.path().join("missing"), "llama", &ts);
    assert_names(
        &load_err(&dir),
        &[
            "model.safetensors",
            "`model.layers.1.mlp.down_proj.weight`",
            "missing",
        ],
    );
    let path = write_gguf(
        &tmp.path().join("missing.gguf"),
        &gguf_metadata("llama"),
        &ts,
    );
    assert_names(
        &load_err(&path),
        &["missing.gguf", "`blk.1.ffn_down.weight`", "missing"],
    );

    // Qwen2 needs its q/k/v biases: a Hugging Face config implies them.
    let dir = write_hf(&tmp.path().join("qwen2"), "qwen2", &tensors());
    assert_names(
        &load_err(&dir),
        &[
            "model.safetensors",
            "`model.layers.0.self_attn.q_proj.bias`",
            "missing",
        ],
    );
    // A GGUF without `blk.0.attn_q.bias` reads as bias-free; with only that bias, the k bias
    // is missing.
    let path = write_gguf(
        &tmp.path().join("qwen2.gguf"),
        &gguf_metadata("qwen2"),
        &tensors(),
    );
    let meta = open(&path);
    assert!(meta.is_ok_and(|m| !m.config.attention_bias));
    let mut ts = tensors();
    ts.push(T {
        name: "model.layers.0.self_attn.q_proj.bias".into(),
        shape: vec![HEADS * HEAD_DIM],
        dtype: "F32",
        data: vec![0.1; HEADS * HEAD_DIM],
    });
    let path = write_gguf(
        &tmp.path().join("qwen2-bias.gguf"),
        &gguf_metadata("qwen2"),
        &ts,
    );
    assert_names(
        &load_err(&path),
        &["qwen2-bias.gguf", "tensor `blk.0.attn_k.bias`", "missing"],
    );
}

#[test]
fn an_unsupported_dtype_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ts = tensors();
    find(&mut ts, "model.layers.1.self_attn.v_proj.weight").dtype = "I32";
    let dir = write_hf(&tmp.path().join("int"), "llama", &ts);
    assert_names(
        &load_err(&dir),
        &[
            "model.safetensors",
            "`model.layers.1.self_attn.v_proj.weight`",
            "I32",
        ],
    );
}

#[test]
fn a_non_finite_weight_under_hqq4_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let role = TensorRole::Layer(0, LayerTensor::UpProj);
    let hqq = LoadSpec {
        isq: Some(IsqType::Hqq4),
        ..Default::default()
    };
    for (label, bad) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let mut ts = tensors();
        find(&mut ts, name).data[100] = bad;
        let dir = write_hf(&tmp.path().join(label), "llama", &ts);
        let meta = open(&dir).unwrap();

        // One tensor, as the worker's loader quantizes it.
        let t = meta.tensor(role).unwrap();
        let err = catch_unwind(AssertUnwindSafe(|| weights::load(t, &hqq)))
            .unwrap_or_else(|_| panic!("HQQ4 quantization of a {label} weight panicked"))
            .map(|w| w.kind())
            .unwrap_err()
            .to_string();
        assert_names(&err, &[name, "HQQ4", "not finite"]);

        // The whole slice, with the plan asking for HQQ4 on that tensor.
        let mut spec = SliceSpec::whole(&meta, None);
        spec.tensors.get_mut(name).unwrap().isq = Some(IsqType::Hqq4);
        let err = load_with(&meta, &spec).unwrap_err();
        assert_names(&err, &[name, "HQQ4", "not finite"]);

        // As stored (f32, no ISQ) it loads: the check belongs to the quantizer.
        load(&meta).unwrap();
    }
    // The control: finite weights quantize.
    let dir = write_hf(&tmp.path().join("finite"), "llama", &tensors());
    let meta = open(&dir).unwrap();
    let w = weights::load(meta.tensor(role).unwrap(), &hqq).unwrap();
    assert_eq!(w.kind(), "HQQ4 (int8 tiles)");
}
