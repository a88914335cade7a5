//! The architecture hyper-parameters of a Llama-family model, read from GGUF metadata or a
//! Hugging Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::gguf::{GgufFile, GgufValue};

/// Model families Strata runs. All share the Llama decoder; they differ in biases, sliding
/// windows and how GGUF stores q/k weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Decoder hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// Attention sees only the last `W` positions (Mistral v0.1).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Checks the numbers fit together; `origin` names the file for the error.
    pub fn validate(&self, origin: &Path) -> Result<(), ModelError> {
        let bad = |key: &str, problem: String| Err(ModelError::meta(origin, key, problem));
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(key, "must be greater than zero".into());
            }
        }
        // Bounds far beyond any real model, so that sizes computed from them never overflow.
        for (key, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 18),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_layers, 1 << 12),
            ("num_attention_heads", self.num_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ] {
            if v > max {
                return bad(key, format!("{v} is larger than Strata supports ({max})"));
            }
        }
        if self.num_kv_heads > self.num_heads {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} is more than the {} attention heads",
                    self.num_kv_heads, self.num_heads
                ),
            );
        }
        if let Some(id) = self
            .bos_token_id
            .iter()
            .chain(&self.eos_token_ids)
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return bad(
                "eos_token_id",
                format!(
                    "token {id} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            );
        }
        if self.sliding_window == Some(0) {
            return bad(
                "sliding_window",
                "must be greater than zero (leave it out for full attention)".into(),
            );
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} attention heads do not split into groups of {} key/value heads",
                    self.num_heads, self.num_kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} is odd; RoPE needs an even head size", self.head_dim),
            );
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return bad(
                "rope_theta",
                format!("{} must be positive", self.rope_theta),
            );
        }
        Ok(())
    }

    /// Reads the config from GGUF metadata (`{arch}.block_count`, ...).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let path = g.path();
        let arch_name = g
            .opt_str("general.architecture")?
            .ok_or_else(|| ModelError::meta(path, "general.architecture", "missing"))?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(ModelError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                });
            }
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let usize_of = |key: &str| -> Result<usize, ModelError> {
            let v = g.req_u64(key)?;
            usize::try_from(v).map_err(|_| ModelError::meta(path, key, format!("{v} is too large")))
        };
        let hidden_size = usize_of(&k("embedding_length"))?;
        let num_heads = usize_of(&k("attention.head_count"))?;
        let num_kv_heads = match g.opt_u64(&k("attention.head_count_kv"))? {
            Some(v) => v as usize,
            None => num_heads,
        };
        let head_dim = match g.opt_u64(&k("attention.key_length"))? {
            Some(v) => v as usize,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let vocab_size = match g.opt_u64(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::array_len)
                .or_else(|| {
                    g.tensor("token_embd.weight")
                        .and_then(|t| t.shape.first().copied())
                })
                .ok_or_else(|| {
                    ModelError::meta(
                        path,
                        &k("vocab_size"),
                        "missing (and no tokenizer.ggml.tokens)",
                    )
                })?,
        };
        let rope_scaling = match g.opt_str(&k("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: g.opt_f64(&k("rope.scaling.factor"))?.unwrap_or(1.0),
            }),
            Some(other) => {
                return Err(ModelError::meta(
                    path,
                    &k("rope.scaling.type"),
                    format!("unsupported rope scaling `{other}` (supported: none, linear)"),
                ));
            }
        };
        let eos = g.opt_u64("tokenizer.ggml.eos_token_id")?;
        let eot = g.opt_u64("tokenizer.ggml.eot_token_id")?;
        let mut eos_token_ids: Vec<u32> = eos
            .into_iter()
            .chain(eot)
            .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
            .collect();
        eos_token_ids.dedup();
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of(&k("feed_forward_length"))?,
            num_layers: usize_of(&k("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: g
                .opt_f64(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: g.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: g.opt_u64(&k("context_length"))?.unwrap_or(4096) as usize,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            attention_bias: g.tensor("blk.0.attn_q.bias").is_some(),
            sliding_window: g
                .opt_u64(&k("attention.sliding_window"))?
                .map(|v| v as usize),
            bos_token_id: g
                .opt_u64("tokenizer.ggml.bos_token_id")?
                .map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
            eos_token_ids,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
            path: path.to_path_buf(),
            what: format!("invalid config.json: {e}"),
        })?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let arch = match model_type.as_str() {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "" => {
                return Err(ModelError::meta(path, "model_type", "missing"));
            }
            other => {
                return Err(ModelError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                });
            }
        };
        let req =
            |v: Option<usize>, key: &str| v.ok_or_else(|| ModelError::meta(path, key, "missing"));
        let hidden_size = req(raw.hidden_size, "hidden_size")?;
        let num_heads = req(raw.num_attention_heads, "num_attention_heads")?;
        let head_dim = match raw.head_dim {
            Some(h) => h,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let rope_scaling = match &raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                Some(parse_rope_scaling(v).map_err(|p| ModelError::meta(path, "rope_scaling", p))?)
            }
        };
        let eos_token_ids = match &raw.eos_token_id {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .map(|v| vec![u32::try_from(v).unwrap_or(u32::MAX)])
                .unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
                .collect(),
            Some(other) => {
                return Err(ModelError::meta(
                    path,
                    "eos_token_id",
                    format!("expected an id or a list, found {other}"),
                ));
            }
        };
        let (attention_bias, sliding_window) = match arch {
            Arch::Qwen2 => (
                raw.attention_bias.unwrap_or(true),
                if raw.use_sliding_window.unwrap_or(false) {
                    raw.sliding_window
                } else {
                    None
                },
            ),
            Arch::Mistral => (raw.attention_bias.unwrap_or(false), raw.sliding_window),
            Arch::Llama => (raw.attention_bias.unwrap_or(false), None),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: req(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: req(raw.intermediate_size, "intermediate_size")?,
            num_layers: req(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias,
            sliding_window,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling, String> {
    let ty = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .ok_or("missing `rope_type`")?;
    let num = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or(format!("missing `{k}`"))
    };
    match ty {
        "default" => Ok(RopeScaling::Linear { factor: 1.0 }),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => Err(format!(
            "unsupported rope type `{other}` (supported: default, linear, llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_golden_hf_config() {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/smollm2/hf/config.json");
        let c = ModelConfig::from_hf_config(&p).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (
                c.num_layers,
                c.hidden_size,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim
            ),
            (30, 576, 9, 3, 64)
        );
        assert_eq!(c.rope_theta, 100_000.0);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn unknown_architecture_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"model_type": "gpt_neox", "hidden_size": 8}"#).unwrap();
        let err = ModelConfig::from_hf_config(&p).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("gpt_neox"),
            "{err}"
        );
        std::fs::write(&p, r#"{"model_type": "llama", "hidden_size": 8}"#).unwrap();
        let err = ModelConfig::from_hf_config(&p).unwrap_err().to_string();
        assert!(
            err.contains("num_attention_heads") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn a_zero_sliding_window_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"model_type": "mistral", "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "vocab_size": 4, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
                "sliding_window": 0}"#,
        )
        .unwrap();
        let err = ModelConfig::from_hf_config(&p).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("sliding_window"),
            "{err}"
        );
    }
}
