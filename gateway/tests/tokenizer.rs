//! The tokenizer against the reference tokenizer's golden outputs for SmolLM2-135M-Instruct
//! (`tests/golden/smollm2/prompts.json`): token ids from both tokenizer sources (the GGUF
//! metadata of the default model, and `hf/tokenizer.json`), chat template rendering from both
//! sources, decoding and streaming detokenization; plus a SentencePiece (`llama`) vocabulary
//! rebuilt from GGUF metadata.

// Test helpers outside `#[test]` functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use strata_gateway::tokenizer::{Message, ModelTokenizer};
use strata_shared::gguf::write::to_bytes;
use strata_shared::gguf::{GgufFile, GgufValue};
use strata_shared::meta::ModelMeta;
use strata_shared::source::{ModelFiles, WeightFormat, fetch_default_model};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/smollm2")
}

#[derive(serde::Deserialize)]
struct Prompt {
    name: String,
    prompt_text: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
    #[serde(default, deserialize_with = "messages")]
    messages: Option<Vec<Message>>,
}

/// `messages` of the chat prompt (`Message` is not `Deserialize`).
fn messages<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Message>>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Raw {
        role: String,
        content: String,
    }
    let raw: Option<Vec<Raw>> = serde::Deserialize::deserialize(d)?;
    Ok(raw.map(|list| {
        list.into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect()
    }))
}

#[derive(serde::Deserialize)]
struct Prompts {
    prompts: Vec<Prompt>,
}

fn prompts() -> &'static [Prompt] {
    static PROMPTS: OnceLock<Vec<Prompt>> = OnceLock::new();
    PROMPTS.get_or_init(|| {
        let text = std::fs::read_to_string(golden_dir().join("prompts.json")).unwrap();
        let prompts = serde_json::from_str::<Prompts>(&text).unwrap().prompts;
        assert!(
            prompts.iter().any(|p| p.name == "unicode"),
            "the golden set has a unicode prompt"
        );
        assert!(
            prompts.iter().any(|p| p.messages.is_some()),
            "the golden set has a chat prompt"
        );
        prompts
    })
}

fn prompt(name: &str) -> &'static Prompt {
    prompts().iter().find(|p| p.name == name).unwrap()
}

/// The default model's metadata (its GGUF header holds the tokenizer).
fn meta() -> &'static ModelMeta {
    static META: OnceLock<ModelMeta> = OnceLock::new();
    META.get_or_init(|| {
        let path = fetch_default_model().unwrap();
        ModelMeta::open(ModelFiles::resolve(path.to_str().unwrap(), None).unwrap()).unwrap()
    })
}

/// The tokenizer rebuilt from the default model's GGUF metadata, with its chat template.
fn gguf_tok() -> &'static Arc<ModelTokenizer> {
    static TOK: OnceLock<Arc<ModelTokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let m = meta();
        Arc::new(ModelTokenizer::load(&m.files, m.gguf.as_ref(), &[]).unwrap())
    })
}

/// The tokenizer of `hf/tokenizer.json` alone.
fn json_tok() -> &'static Arc<ModelTokenizer> {
    static TOK: OnceLock<Arc<ModelTokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let bytes = std::fs::read(golden_dir().join("hf/tokenizer.json")).unwrap();
        Arc::new(ModelTokenizer::from_tokenizer_json(&bytes, "tokenizer.json").unwrap())
    })
}

fn sources() -> [(&'static str, &'static Arc<ModelTokenizer>); 2] {
    [("gguf", gguf_tok()), ("tokenizer.json", json_tok())]
}

/// A Hugging Face model directory holding copies of the golden files (no weights).
fn hf_dir_files(dir: &Path) -> ModelFiles {
    let copy = |name: &str| {
        let to = dir.join(name);
        std::fs::copy(golden_dir().join("hf").join(name), &to).unwrap();
        Some(to)
    };
    ModelFiles {
        spec: dir.display().to_string(),
        format: WeightFormat::Safetensors,
        weights: vec![],
        config: copy("config.json"),
        tokenizer_json: copy("tokenizer.json"),
        tokenizer_config: copy("tokenizer_config.json"),
        chat_template: copy("chat_template.jinja"),
        generation_config: None,
    }
}

#[test]
fn generation_ends_at_every_eos_the_model_files_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = hf_dir_files(dir.path());
    // A chat model whose turns end with a token config.json does not name (`<|im_end|>` is 2
    // here, `<|endoftext|>` 0): generation_config.json adds it, tokenizer_config.json's
    // `eos_token` adds its own, and each id counts once.
    let gen_cfg = dir.path().join("generation_config.json");
    std::fs::write(&gen_cfg, r#"{"bos_token_id": 1, "eos_token_id": [0, 7]}"#).unwrap();
    files.generation_config = Some(gen_cfg.clone());
    let tok = ModelTokenizer::load(&files, None, &[0]).unwrap();
    assert_eq!(tok.eos_ids(), &[0, 7, 2]);
    std::fs::write(&gen_cfg, r#"{"eos_token_id": 5}"#).unwrap();
    let tok = ModelTokenizer::load(&files, None, &[]).unwrap();
    assert_eq!(tok.eos_ids(), &[5, 2]);
    // A malformed file names itself and the key.
    std::fs::write(&gen_cfg, r#"{"eos_token_id": "x"}"#).unwrap();
    let e = ModelTokenizer::load(&files, None, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("generation_config.json") && e.contains("eos_token_id"),
        "{e}"
    );
}

#[test]
fn both_sources_encode_every_prompt_to_the_golden_ids() {
    for p in prompts() {
        for (source, tok) in sources() {
            assert_eq!(
                tok.encode(&p.prompt_text, false).unwrap(),
                p.prompt_ids,
                "{source}: prompt `{}`",
                p.name
            );
        }
    }
}

#[test]
fn both_sources_agree_on_the_vocabulary() {
    let (g, j) = (gguf_tok(), json_tok());
    assert_eq!(g.vocab_size(), 49152);
    assert_eq!(j.vocab_size(), 49152);
    let ids: Vec<u32> = (0..49152).step_by(97).chain([0, 1, 2, 49151]).collect();
    assert_eq!(g.tokens(&ids), j.tokens(&ids));
    assert_eq!(g.tokens(&[1, 2]), vec!["<|im_start|>", "<|im_end|>"]);
    // The GGUF tokenizer adds no BOS (`tokenizer.ggml.add_bos_token` is false).
    assert_eq!(
        g.encode("Hello", true).unwrap(),
        g.encode("Hello", false).unwrap()
    );
    // EOS from the GGUF's `tokenizer.ggml.eos_token_id` when the caller gives none.
    assert_eq!(g.eos_ids(), &[2]);
    assert!(j.eos_ids().is_empty(), "a bare tokenizer.json knows no EOS");
}

#[test]
fn both_sources_decode_every_prompt_to_its_text() {
    for p in prompts() {
        for (source, tok) in sources() {
            assert_eq!(
                tok.decode(&p.prompt_ids, false).unwrap(),
                p.prompt_text,
                "{source}: prompt `{}`",
                p.name
            );
            assert_eq!(
                tok.decode(&p.greedy_ids, false).unwrap(),
                p.greedy_text,
                "{source}: greedy text of `{}`",
                p.name
            );
        }
    }
    // Skipping special tokens drops the chat markers.
    let chat = prompt("chat");
    for (source, tok) in sources() {
        let text = tok.decode(&chat.prompt_ids, true).unwrap();
        assert!(
            !text.contains("<|im_start|>") && !text.contains("<|im_end|>"),
            "{source}: {text:?}"
        );
        assert!(
            text.contains("What is the capital of France?"),
            "{source}: {text:?}"
        );
    }
}

#[test]
fn the_gguf_chat_template_renders_the_chat_prompt() {
    let tok = gguf_tok();
    assert!(tok.has_chat_template());
    for p in prompts() {
        let Some(messages) = &p.messages else {
            continue;
        };
        assert_eq!(
            tok.render_chat(messages, true).unwrap(),
            p.prompt_text,
            "prompt `{}`",
            p.name
        );
        // Without the generation prompt the assistant header is left out.
        let bare = tok.render_chat(messages, false).unwrap();
        assert_eq!(format!("{bare}<|im_start|>assistant\n"), p.prompt_text);
    }
}

#[test]
fn the_hf_directory_chat_template_renders_the_chat_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let files = hf_dir_files(dir.path());
    let tok = ModelTokenizer::load(&files, None, &[2]).unwrap();
    assert!(tok.has_chat_template());
    assert_eq!(tok.eos_ids(), &[2]);
    for p in prompts() {
        assert_eq!(
            tok.encode(&p.prompt_text, false).unwrap(),
            p.prompt_ids,
            "prompt `{}`",
            p.name
        );
        let Some(messages) = &p.messages else {
            continue;
        };
        assert_eq!(
            tok.render_chat(messages, true).unwrap(),
            p.prompt_text,
            "prompt `{}`",
            p.name
        );
    }
    // Without the caller's EOS ids, EOS comes from tokenizer_config.json's `eos_token`.
    let tok = ModelTokenizer::load(&files, None, &[]).unwrap();
    assert_eq!(tok.eos_ids(), &[2]);
    // tokenizer_config.json's own `chat_template` serves when there is no chat_template.jinja.
    let files = ModelFiles {
        chat_template: None,
        ..files
    };
    let tok = ModelTokenizer::load(&files, None, &[2]).unwrap();
    let chat = prompt("chat");
    assert_eq!(
        tok.render_chat(chat.messages.as_deref().unwrap(), true)
            .unwrap(),
        chat.prompt_text
    );
    // Without any template, rendering is refused.
    let files = ModelFiles {
        tokenizer_config: None,
        ..files
    };
    let tok = ModelTokenizer::load(&files, None, &[2]).unwrap();
    assert!(!tok.has_chat_template());
    let err = tok
        .render_chat(chat.messages.as_deref().unwrap(), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn a_model_without_any_tokenizer_is_an_error() {
    let files = ModelFiles {
        spec: "bare".into(),
        format: WeightFormat::Safetensors,
        weights: vec![],
        config: None,
        tokenizer_json: None,
        tokenizer_config: None,
        chat_template: None,
        generation_config: None,
    };
    let err = ModelTokenizer::load(&files, None, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`bare`") && err.contains("tokenizer"), "{err}");
}

/// Feeds `ids` one at a time; returns the deltas.
fn stream(
    tok: &Arc<ModelTokenizer>,
    prompt: &[u32],
    ids: &[u32],
    skip_special: bool,
) -> Vec<String> {
    let mut d = tok.stream_decoder(prompt, skip_special);
    ids.iter().map(|&id| d.push(id).unwrap()).collect()
}

#[track_caller]
fn check_deltas(deltas: &[String], what: &str) {
    for (i, d) in deltas.iter().enumerate() {
        // A `String` is valid UTF-8 by construction; broken sequences would show as U+FFFD.
        assert!(
            !d.contains('\u{FFFD}'),
            "{what}: delta {i} {d:?} holds a replacement character"
        );
    }
}

#[test]
fn streaming_the_greedy_outputs_reproduces_their_text() {
    for p in prompts() {
        for (source, tok) in sources() {
            let what = format!("{source}: greedy output of `{}`", p.name);
            let deltas = stream(tok, &p.prompt_ids, &p.greedy_ids, false);
            check_deltas(&deltas, &what);
            assert_eq!(
                deltas.concat(),
                tok.decode(&p.greedy_ids, false).unwrap(),
                "{what}"
            );
            assert_eq!(deltas.concat(), p.greedy_text, "{what}");
        }
    }
}

#[test]
fn streaming_splits_multibyte_characters_only_between_deltas() {
    let p = prompt("unicode");
    for (source, tok) in sources() {
        // Some character of the prompt spans several tokens.
        let split = p
            .prompt_ids
            .iter()
            .any(|&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}'));
        assert!(
            split,
            "{source}: the unicode prompt splits a character across tokens"
        );
        let deltas = stream(tok, &[], &p.prompt_ids, false);
        check_deltas(&deltas, source);
        assert!(
            deltas.iter().any(String::is_empty),
            "{source}: a partial character is held back"
        );
        assert_eq!(deltas.concat(), p.prompt_text, "{source}");
        // Primed with any prefix of the prompt, the rest streams exactly: after a prompt that
        // ends inside a character, the output starts with that whole character.
        let mut mid_character = 0;
        for cut in 1..p.prompt_ids.len() {
            let head = tok.decode(&p.prompt_ids[..cut], false).unwrap();
            let whole = head.trim_end_matches('\u{FFFD}');
            mid_character += usize::from(whole.len() < head.len());
            let deltas = stream(tok, &p.prompt_ids[..cut], &p.prompt_ids[cut..], false);
            check_deltas(&deltas, source);
            assert!(p.prompt_text.starts_with(whole), "{source}: cut at {cut}");
            assert_eq!(
                deltas.concat(),
                p.prompt_text[whole.len()..],
                "{source}: cut at {cut}"
            );
        }
        assert!(
            mid_character > 0,
            "{source}: some cut falls inside a character"
        );
    }
}

#[test]
fn streaming_can_skip_special_tokens() {
    let chat = prompt("chat");
    for (source, tok) in sources() {
        let deltas = stream(tok, &chat.prompt_ids, &chat.greedy_ids, true);
        check_deltas(&deltas, source);
        let text = deltas.concat();
        assert_eq!(
            text,
            tok.decode(&chat.greedy_ids, true).unwrap(),
            "{source}"
        );
        assert!(
            text.starts_with("The capital of France is Paris.") && !text.contains("<|im_end|>"),
            "{source}: {text:?}"
        );
    }
}

// --- SentencePiece (`tokenizer.ggml.model = "llama"`) vocabularies rebuilt from GGUF ---------

const SPM_TOKENS: [&str; 16] = [
    "<unk>", "<s>", "</s>", "▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "llo", "▁hello", "<0x41>",
    "w", "▁w",
];

fn str_array(items: &[&str]) -> GgufValue {
    GgufValue::Array(
        items
            .iter()
            .map(|s| GgufValue::String((*s).into()))
            .collect(),
    )
}

/// Writes a GGUF file with metadata only and opens it.
fn gguf_with(dir: &Path, name: &str, metadata: &[(&str, GgufValue)]) -> GgufFile {
    let path = dir.join(name);
    std::fs::write(&path, to_bytes(metadata, &[])).unwrap();
    GgufFile::open(&path).unwrap()
}

fn spm_metadata(model: &str) -> Vec<(&'static str, GgufValue)> {
    // Longer pieces score higher, so they are merged first.
    let scores = SPM_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            GgufValue::F32(if i < 3 {
                0.0
            } else {
                -10.0 + t.chars().count() as f32
            })
        })
        .collect();
    let types = SPM_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            GgufValue::I32(match i {
                0 => 2,
                1 | 2 => 3,
                _ if t.starts_with("<0x") => 6,
                _ => 1,
            })
        })
        .collect();
    vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("tokenizer.ggml.model", GgufValue::String(model.into())),
        ("tokenizer.ggml.tokens", str_array(&SPM_TOKENS)),
        ("tokenizer.ggml.scores", GgufValue::Array(scores)),
        ("tokenizer.ggml.token_type", GgufValue::Array(types)),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
        ("tokenizer.ggml.add_space_prefix", GgufValue::Bool(true)),
    ]
}

fn id(token: &str) -> u32 {
    SPM_TOKENS.iter().position(|t| *t == token).unwrap() as u32
}

#[test]
fn a_sentencepiece_gguf_vocabulary_builds() {
    let dir = tempfile::tempdir().unwrap();
    let g = gguf_with(dir.path(), "spm.gguf", &spm_metadata("llama"));
    let tok = ModelTokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.vocab_size(), SPM_TOKENS.len());

    // A space prefix is added, and the pieces merge up to the whole word.
    assert_eq!(tok.encode("hello", false).unwrap(), vec![id("▁hello")]);
    assert_eq!(tok.decode(&[id("▁hello")], false).unwrap(), "hello");
    // BOS is added by default for llama vocabularies.
    assert_eq!(tok.encode("hello", true).unwrap(), vec![1, id("▁hello")]);
    assert_eq!(tok.decode(&[1, id("▁hello")], true).unwrap(), "hello");
    // Spaces become ▁ and start a new word.
    let ids = tok.encode("hello hello", false).unwrap();
    assert_eq!(ids, vec![id("▁hello"), id("▁hello")]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "hello hello");
    let ids = tok.encode("hell", false).unwrap();
    assert_eq!(tok.tokens(&ids), vec!["▁he", "ll"]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "hell");
    // A character outside the vocabulary falls back to its byte token.
    let ids = tok.encode("A", false).unwrap();
    assert_eq!(ids, vec![id("▁"), id("<0x41>")]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "A");
    // Control tokens are matched whole in text.
    assert_eq!(tok.encode("</s>", false).unwrap(), vec![2]);
    // EOS comes from the GGUF's eos_token_id when the caller gives none.
    let files = ModelFiles {
        spec: "spm".into(),
        format: WeightFormat::Gguf,
        weights: vec![g.path().to_path_buf()],
        config: None,
        tokenizer_json: None,
        tokenizer_config: None,
        chat_template: None,
        generation_config: None,
    };
    let tok = Arc::new(ModelTokenizer::load(&files, Some(&g), &[]).unwrap());
    assert_eq!(tok.eos_ids(), &[2]);
    assert!(!tok.has_chat_template());
    // Streaming restores the spaces between words but not before the first.
    let ids = tok.encode("hello whello", false).unwrap();
    let deltas = stream(&tok, &[], &ids, false);
    assert_eq!(deltas.concat(), "hello whello");
}

#[test]
fn without_add_space_prefix_no_space_is_prepended() {
    let dir = tempfile::tempdir().unwrap();
    let mut md = spm_metadata("llama");
    md.retain(|(k, _)| *k != "tokenizer.ggml.add_space_prefix");
    md.push(("tokenizer.ggml.add_space_prefix", GgufValue::Bool(false)));
    md.push(("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)));
    let g = gguf_with(dir.path(), "spm.gguf", &md);
    let tok = ModelTokenizer::from_gguf(&g).unwrap();
    assert_eq!(
        tok.tokens(&tok.encode("hello", false).unwrap()),
        vec!["h", "e", "llo"]
    );
    assert_eq!(tok.encode(" hello", true).unwrap(), vec![id("▁hello")]);
    assert_eq!(tok.decode(&[id("▁hello")], false).unwrap(), " hello");
}

#[test]
fn an_unsupported_gguf_tokenizer_model_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let g = gguf_with(dir.path(), "bert.gguf", &spm_metadata("bert"));
    let err = ModelTokenizer::from_gguf(&g).unwrap_err().to_string();
    assert!(err.contains("bert.gguf"), "names the file: {err}");
    assert!(err.contains("tokenizer.ggml.model"), "names the key: {err}");
    assert!(err.contains("`bert`"), "names the value: {err}");

    // Missing vocabulary: the key is named.
    let g = gguf_with(
        dir.path(),
        "empty.gguf",
        &[("general.architecture", GgufValue::String("llama".into()))],
    );
    let err = ModelTokenizer::from_gguf(&g).unwrap_err().to_string();
    assert!(
        err.contains("empty.gguf") && err.contains("tokenizer.ggml.tokens"),
        "{err}"
    );
    // A gpt2 vocabulary without merges.
    let g = gguf_with(
        dir.path(),
        "nomerges.gguf",
        &[
            ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", str_array(&["a", "b"])),
        ],
    );
    let err = ModelTokenizer::from_gguf(&g).unwrap_err().to_string();
    assert!(
        err.contains("nomerges.gguf") && err.contains("tokenizer.ggml.merges"),
        "{err}"
    );
    // A pre-tokenizer Strata does not know: an error, never silently different ids.
    let gpt2 = |pre: &str| {
        vec![
            ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", str_array(&["a", "b", "ab"])),
            ("tokenizer.ggml.merges", str_array(&["a b"])),
            ("tokenizer.ggml.pre", GgufValue::String(pre.into())),
        ]
    };
    let g = gguf_with(dir.path(), "tekken.gguf", &gpt2("tekken"));
    let err = ModelTokenizer::from_gguf(&g).unwrap_err().to_string();
    assert!(
        err.contains("tekken.gguf")
            && err.contains("`tokenizer.ggml.pre` is `tekken`")
            && err.contains("smollm"),
        "{err}"
    );
    for known in ["gpt2", "llama-bpe", "qwen2", "smollm"] {
        let g = gguf_with(dir.path(), "known.gguf", &gpt2(known));
        let tok = ModelTokenizer::from_gguf(&g).unwrap();
        assert_eq!(tok.encode("ab", false).unwrap(), vec![2], "pre `{known}`");
    }
}
