//! The model's tokenizer and chat template: loaded from `tokenizer.json` (and
//! `tokenizer_config.json` / `chat_template.jinja`), or rebuilt from GGUF metadata the way
//! llama.cpp defines it (GPT-2-style byte-level BPE with the pre-tokenizer its `pre` key names,
//! or a llama SentencePiece vocabulary). Also incremental detokenization that never emits broken
//! UTF-8, and stop-sequence matching on text.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use strata_shared::gguf::GgufFile;
use strata_shared::source::ModelFiles;

use crate::error::GatewayError;

/// A chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Tokenizer, special tokens and chat template of the served model.
pub struct ModelTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// The chat template, compiled on first use.
    compiled: std::sync::OnceLock<Result<minijinja::Environment<'static>, String>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    vocab_size: usize,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_ids", &self.eos_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A JSON file of the model's, errors naming it.
fn read_json(path: &std::path::Path) -> Result<Value, GatewayError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| GatewayError::Model(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| GatewayError::Model(format!("{}: invalid JSON: {e}", path.display())))
}

fn tok_err(origin: &str) -> impl Fn(tokenizers::Error) -> GatewayError + '_ {
    move |e| GatewayError::Model(format!("{origin}: {e}"))
}

impl ModelTokenizer {
    /// Loads the tokenizer of a resolved model: `tokenizer.json` when the model has one, else
    /// the GGUF metadata. `eos_ids` are the model config's end-of-sequence ids.
    pub fn load(
        files: &ModelFiles,
        gguf: Option<&GgufFile>,
        eos_ids: &[u32],
    ) -> Result<Self, GatewayError> {
        let mut tok = match (&files.tokenizer_json, gguf) {
            (Some(path), _) => Self::from_tokenizer_json(
                &std::fs::read(path)
                    .map_err(|e| GatewayError::Model(format!("{}: {e}", path.display())))?,
                &path.display().to_string(),
            )?,
            (None, Some(g)) => Self::from_gguf(g)?,
            (None, None) => {
                return Err(GatewayError::Model(format!(
                    "model `{}` has neither tokenizer.json nor GGUF tokenizer metadata",
                    files.spec
                )));
            }
        };
        // Chat template and special tokens: tokenizer_config.json, chat_template.jinja, GGUF.
        if let Some(cfg_path) = &files.tokenizer_config {
            let cfg = read_json(cfg_path)?;
            tok.bos_token = special_token_text(&cfg["bos_token"]).or(tok.bos_token);
            tok.eos_token = special_token_text(&cfg["eos_token"]).or(tok.eos_token);
            tok.chat_template = match &cfg["chat_template"] {
                Value::String(s) => Some(s.clone()),
                Value::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or_else(|| list.first())
                    .and_then(|t| t["template"].as_str().map(str::to_string)),
                _ => tok.chat_template,
            };
        }
        if let Some(path) = &files.chat_template {
            tok.chat_template = Some(
                std::fs::read_to_string(path)
                    .map_err(|e| GatewayError::Model(format!("{}: {e}", path.display())))?,
            );
        }
        if tok.chat_template.is_none()
            && let Some(g) = gguf
        {
            tok.chat_template = g
                .opt_str("tokenizer.chat_template")
                .map_err(|e| GatewayError::Model(e.to_string()))?
                .map(str::to_string);
        }
        // Generation ends at any of: the config's ids, `generation_config.json`'s (chat models
        // often end a turn with a token the config does not name, e.g. Llama 3's `<|eot_id|>`),
        // and the tokenizer's own EOS token.
        tok.eos_ids = eos_ids.to_vec();
        if let Some(path) = &files.generation_config {
            let cfg = read_json(path)?;
            let ids = match &cfg["eos_token_id"] {
                Value::Array(list) => list.iter().collect(),
                Value::Null => Vec::new(),
                one => vec![one],
            };
            for v in ids {
                let id = v
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| {
                        GatewayError::Model(format!(
                            "{}: key `eos_token_id`: expected token ids, found {v}",
                            path.display()
                        ))
                    })?;
                tok.eos_ids.push(id);
            }
        }
        if let Some(id) = tok
            .eos_token
            .as_deref()
            .and_then(|t| tok.inner.token_to_id(t))
        {
            tok.eos_ids.push(id);
        }
        let mut seen = std::collections::HashSet::new();
        tok.eos_ids.retain(|id| seen.insert(*id));
        Ok(tok)
    }

    /// From the bytes of a `tokenizer.json`.
    pub fn from_tokenizer_json(bytes: &[u8], origin: &str) -> Result<Self, GatewayError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(tok_err(origin))?;
        Ok(Self::wrap(inner))
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Self {
        let vocab_size = inner.get_vocab_size(true);
        ModelTokenizer {
            inner,
            chat_template: None,
            compiled: std::sync::OnceLock::new(),
            bos_token: None,
            eos_token: None,
            eos_ids: Vec::new(),
            vocab_size,
        }
    }

    /// Rebuilds the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, GatewayError> {
        let origin = g.path().display().to_string();
        let meta_err = |e: strata_shared::ModelError| GatewayError::Model(e.to_string());
        let model = g
            .opt_str("tokenizer.ggml.model")
            .map_err(meta_err)?
            .unwrap_or("gpt2");
        let tokens = g
            .opt_str_array("tokenizer.ggml.tokens")
            .map_err(meta_err)?
            .ok_or_else(|| {
                GatewayError::Model(format!(
                    "{origin}: metadata key `tokenizer.ggml.tokens` is missing"
                ))
            })?;
        let types: Vec<u64> = match g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let id = |key: &str| -> Result<Option<u32>, GatewayError> {
            match g.opt_u64(key).map_err(meta_err)? {
                Some(v) => u32::try_from(v).map(Some).map_err(|_| {
                    GatewayError::Model(format!(
                        "{origin}: metadata key `{key}`: token id {v} is out of range"
                    ))
                }),
                None => Ok(None),
            }
        };
        let name_of = |i: Option<u32>| {
            i.and_then(|i| tokens.get(i as usize))
                .map(|s| s.to_string())
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let add_bos = g
            .opt_bool("tokenizer.ggml.add_bos_token")
            .map_err(meta_err)?
            .unwrap_or(model == "llama");
        // Control (3) and user-defined (4) tokens are matched whole in text, like added tokens.
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types.get(i) == Some(&3)})
            })
            .collect();
        let post = match (add_bos, name_of(bos)) {
            (true, Some(b)) => json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.clone(): {"id": b, "ids": [bos], "tokens": [b]}}}),
            _ => Value::Null,
        };
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let doc = match model {
            "gpt2" => {
                let merges = g
                    .opt_str_array("tokenizer.ggml.merges")
                    .map_err(meta_err)?
                    .ok_or_else(|| {
                        GatewayError::Model(format!(
                            "{origin}: metadata key `tokenizer.ggml.merges` is missing"
                        ))
                    })?;
                let pre = g
                    .opt_str("tokenizer.ggml.pre")
                    .map_err(meta_err)?
                    .unwrap_or("default");
                json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added, "normalizer": null,
                    "pre_tokenizer": gpt2_pre_tokenizer(pre).map_err(|supported| GatewayError::Model(format!(
                        "{origin}: metadata key `tokenizer.ggml.pre` is `{pre}`, a pre-tokenizer Strata does not know (it knows {supported}); tokenizing with other rules would give wrong ids"
                    )))?,
                    "post_processor": post,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                              "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                              "ignore_merges": false, "vocab": vocab, "merges": merges}
                })
            }
            "llama" => {
                let scores = g
                    .opt_f64_array("tokenizer.ggml.scores")
                    .map_err(meta_err)?
                    .unwrap_or_default();
                let unk = name_of(id("tokenizer.ggml.unknown_token_id")?)
                    .unwrap_or_else(|| "<unk>".into());
                let add_space = g
                    .opt_bool("tokenizer.ggml.add_space_prefix")
                    .map_err(meta_err)?
                    .unwrap_or(true);
                let mut normalizers = Vec::new();
                if add_space {
                    normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
                }
                normalizers
                    .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if add_space {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": normalizers},
                    "pre_tokenizer": null,
                    "post_processor": post,
                    "decoder": {"type": "Sequence", "decoders": decoders},
                    "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                              "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                              "ignore_merges": false, "vocab": vocab, "merges": spm_merges(&tokens, &scores)}
                })
            }
            other => {
                return Err(GatewayError::Model(format!(
                    "{origin}: metadata key `tokenizer.ggml.model`: unsupported tokenizer `{other}` (supported: gpt2, llama)"
                )));
            }
        };
        let bytes =
            serde_json::to_vec(&doc).map_err(|e| GatewayError::Model(format!("{origin}: {e}")))?;
        let mut tok = Self::from_tokenizer_json(&bytes, &origin)?;
        tok.bos_token = name_of(bos);
        tok.eos_token = name_of(eos);
        Ok(tok)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Token ids of `text`; special tokens (BOS) are added only if asked.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, GatewayError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| GatewayError::invalid("text", format!("cannot be tokenized: {e}")))
    }

    /// Token strings of `ids`.
    pub fn tokens(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| self.inner.id_to_token(i).unwrap_or_default())
            .collect()
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, GatewayError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| GatewayError::Internal(format!("detokenizing: {e}")))
    }

    /// Renders chat messages with the model's template (Hugging Face semantics: `trim_blocks`
    /// and `lstrip_blocks`, Python string methods, `raise_exception`).
    pub fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, GatewayError> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            GatewayError::FailedPrecondition("the model has no chat template; use Generate".into())
        })?;
        let env = self
            .compiled
            .get_or_init(|| compile_chat_template(template))
            .as_ref()
            .map_err(|e| {
                GatewayError::FailedPrecondition(format!(
                    "the model's chat template does not compile: {e}"
                ))
            })?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| GatewayError::Model(format!("chat template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| GatewayError::InvalidArgument {
            field: "messages".into(),
            message: format!("the chat template rejected them: {e}"),
        })
    }

    /// A streaming decoder for one sequence, primed with the end of its prompt.
    pub fn stream_decoder(
        self: &Arc<Self>,
        prompt: &[u32],
        skip_special_tokens: bool,
    ) -> StreamDecoder {
        let tail = &prompt[prompt.len().saturating_sub(4)..];
        StreamDecoder {
            tok: Arc::clone(self),
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
            skip_special_tokens,
        }
    }
}

/// A Jinja environment with the chat template as Hugging Face renders it: `trim_blocks`,
/// `lstrip_blocks`, Python string methods and `raise_exception`.
fn compile_chat_template(template: &str) -> Result<minijinja::Environment<'static>, String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned("chat", template.to_string())
        .map_err(|e| e.to_string())?;
    Ok(env)
}

/// `bos_token` / `eos_token` of a tokenizer_config.json: a string or an AddedToken object.
fn special_token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// llama.cpp's pre-tokenizer for a GGUF `tokenizer.ggml.pre` value, as a tokenizers config;
/// for a value it does not know, the list of those it does.
fn gpt2_pre_tokenizer(pre: &str) -> Result<Value, &'static str> {
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]})
    };
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "llama3" | "llama-bpe" | "llama-v3" => split(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2),
        // SmolLM splits every digit before the GPT-2 rules (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM).
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]}),
        "default" | "gpt2" | "gpt-2" => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
        _ => {
            return Err("default, gpt2, llama-bpe (llama3), qwen2, deepseek-r1-qwen and smollm");
        }
    })
}

/// BPE merges for a SentencePiece vocabulary (transformers' `SentencePieceExtractor`): every
/// split of a piece into two pieces of the vocabulary, ordered by the merged piece's score.
fn spm_merges(tokens: &[&str], scores: &[f64]) -> Vec<Value> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((score, li, ri, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|m| json!([m.3, m.4])).collect()
}

/// Incremental detokenization: text is released only once it is valid UTF-8 and can no longer
/// change as more tokens arrive (Hugging Face TGI's prefix/read offsets).
pub struct StreamDecoder {
    tok: Arc<ModelTokenizer>,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("ids", &self.ids)
            .finish()
    }
}

impl StreamDecoder {
    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, GatewayError> {
        self.ids.push(id);
        let prefix = self.tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = self
            .tok
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        // A prefix that ends inside a character (a prompt cut mid-character) decodes with a
        // trailing U+FFFD that the full text replaces by the character: emit from where the
        // two part, so the completed character is not lost.
        let start = if prefix.ends_with('\u{FFFD}') {
            common_prefix_len(&prefix, &full)
        } else {
            prefix.len()
        };
        if full.len() > start && !full.ends_with('\u{FFFD}') {
            let delta = full.get(start..).unwrap_or_default().to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

/// Bytes of the longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.chars()
        .zip(b.chars())
        .take_while(|(x, y)| x == y)
        .map(|(c, _)| c.len_utf8())
        .sum()
}

/// Stop-sequence matching on the output text. Text that could still be the start of a stop
/// sequence is held back; a stop sequence is never emitted.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to emit after a text delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text and go on.
    Continue(String),
    /// Emit this text (what preceded the stop sequence) and stop.
    Stopped { text: String, stop: String },
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(delta.to_string());
        }
        self.pending.push_str(delta);
        // Earliest complete stop sequence wins.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = hit {
            let text = self.pending[..at].to_string();
            let stop = stop.clone();
            self.pending.clear();
            return StopOutcome::Stopped { text, stop };
        }
        // Hold back the longest suffix that is a prefix of some stop sequence.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let suffix = &self.pending[i..];
                if suffix.len() > hold && s.starts_with(suffix) {
                    hold = suffix.len();
                }
            }
        }
        let emit_to = self.pending.len() - hold;
        let text = self.pending[..emit_to].to_string();
        self.pending.drain(..emit_to);
        StopOutcome::Continue(text)
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_are_held_back_and_never_emitted() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(m.push("Hello"), StopOutcome::Continue("Hello".into()));
        assert_eq!(m.push(" wor\n"), StopOutcome::Continue(" wor".into()));
        assert_eq!(m.push("ld E"), StopOutcome::Continue("\nld ".into()));
        assert_eq!(
            m.push("ND and more"),
            StopOutcome::Stopped {
                text: "".into(),
                stop: "END".into()
            }
        );
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xa"), StopOutcome::Continue("x".into()));
        assert_eq!(m.flush(), "a");
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("a"), StopOutcome::Continue("a".into()));
    }

    #[test]
    fn spm_merges_follow_piece_scores() {
        let tokens = ["<unk>", "a", "b", "ab", "abb", "bb"];
        let scores = [0.0, -1.0, -2.0, -0.5, -0.2, -0.3];
        let merges = spm_merges(&tokens, &scores);
        // "abb" (score -0.2) splits as a+bb and ab+b; then bb (-0.3), then ab (-0.5).
        assert_eq!(
            merges,
            vec![
                json!(["a", "bb"]),
                json!(["ab", "b"]),
                json!(["b", "b"]),
                json!(["a", "b"])
            ]
        );
    }
}
