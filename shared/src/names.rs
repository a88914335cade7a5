//! Tensor names. Strata's canonical names are Hugging Face's (`model.layers.3.self_attn.q_proj.weight`);
//! GGUF files use llama.cpp's (`blk.3.attn_q.weight`). Topology regex selectors match either.

/// What a tensor is in a Llama-family decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorRole {
    Embedding,
    FinalNorm,
    LmHead,
    /// Llama 3 rope frequency factors (GGUF `rope_freqs.weight`).
    RopeFreqs,
    Layer(usize, LayerTensor),
}

/// A tensor inside decoder layer N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerTensor {
    InputNorm,
    PostAttentionNorm,
    QProj,
    KProj,
    VProj,
    OProj,
    QBias,
    KBias,
    VBias,
    OBias,
    GateProj,
    UpProj,
    DownProj,
}

impl LayerTensor {
    const ALL: [(LayerTensor, &'static str, &'static str); 13] = [
        (
            LayerTensor::InputNorm,
            "input_layernorm.weight",
            "attn_norm.weight",
        ),
        (
            LayerTensor::PostAttentionNorm,
            "post_attention_layernorm.weight",
            "ffn_norm.weight",
        ),
        (
            LayerTensor::QProj,
            "self_attn.q_proj.weight",
            "attn_q.weight",
        ),
        (
            LayerTensor::KProj,
            "self_attn.k_proj.weight",
            "attn_k.weight",
        ),
        (
            LayerTensor::VProj,
            "self_attn.v_proj.weight",
            "attn_v.weight",
        ),
        (
            LayerTensor::OProj,
            "self_attn.o_proj.weight",
            "attn_output.weight",
        ),
        (LayerTensor::QBias, "self_attn.q_proj.bias", "attn_q.bias"),
        (LayerTensor::KBias, "self_attn.k_proj.bias", "attn_k.bias"),
        (LayerTensor::VBias, "self_attn.v_proj.bias", "attn_v.bias"),
        (
            LayerTensor::OBias,
            "self_attn.o_proj.bias",
            "attn_output.bias",
        ),
        (
            LayerTensor::GateProj,
            "mlp.gate_proj.weight",
            "ffn_gate.weight",
        ),
        (LayerTensor::UpProj, "mlp.up_proj.weight", "ffn_up.weight"),
        (
            LayerTensor::DownProj,
            "mlp.down_proj.weight",
            "ffn_down.weight",
        ),
    ];

    /// Whether this is a linear layer's weight matrix (what ISQ quantizes).
    pub fn is_linear_weight(self) -> bool {
        matches!(
            self,
            LayerTensor::QProj
                | LayerTensor::KProj
                | LayerTensor::VProj
                | LayerTensor::OProj
                | LayerTensor::GateProj
                | LayerTensor::UpProj
                | LayerTensor::DownProj
        )
    }

    fn hf_suffix(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|e| e.0 == self)
            .map(|e| e.1)
            .unwrap_or("")
    }

    fn gguf_suffix(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|e| e.0 == self)
            .map(|e| e.2)
            .unwrap_or("")
    }
}

impl TensorRole {
    /// The Hugging Face name of this tensor.
    pub fn hf_name(self) -> String {
        match self {
            TensorRole::Embedding => "model.embed_tokens.weight".into(),
            TensorRole::FinalNorm => "model.norm.weight".into(),
            TensorRole::LmHead => "lm_head.weight".into(),
            TensorRole::RopeFreqs => "rope_freqs.weight".into(),
            TensorRole::Layer(i, t) => format!("model.layers.{i}.{}", t.hf_suffix()),
        }
    }

    /// The GGUF name of this tensor.
    pub fn gguf_name(self) -> String {
        match self {
            TensorRole::Embedding => "token_embd.weight".into(),
            TensorRole::FinalNorm => "output_norm.weight".into(),
            TensorRole::LmHead => "output.weight".into(),
            TensorRole::RopeFreqs => "rope_freqs.weight".into(),
            TensorRole::Layer(i, t) => format!("blk.{i}.{}", t.gguf_suffix()),
        }
    }

    /// Parses a Hugging Face name; `None` for tensors Strata does not use.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "model.embed_tokens.weight" => return Some(TensorRole::Embedding),
            "model.norm.weight" => return Some(TensorRole::FinalNorm),
            "lm_head.weight" => return Some(TensorRole::LmHead),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (idx, suffix) = rest.split_once('.')?;
        let i = parse_index(idx)?;
        LayerTensor::ALL
            .iter()
            .find(|e| e.1 == suffix)
            .map(|e| TensorRole::Layer(i, e.0))
    }

    /// Parses a GGUF name; `None` for tensors Strata does not use.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        match name {
            "token_embd.weight" => return Some(TensorRole::Embedding),
            "output_norm.weight" => return Some(TensorRole::FinalNorm),
            "output.weight" => return Some(TensorRole::LmHead),
            "rope_freqs.weight" => return Some(TensorRole::RopeFreqs),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?;
        let (idx, suffix) = rest.split_once('.')?;
        let i = parse_index(idx)?;
        LayerTensor::ALL
            .iter()
            .find(|e| e.2 == suffix)
            .map(|e| TensorRole::Layer(i, e.0))
    }

    /// The decoder layer this tensor belongs to, if any.
    pub fn layer(self) -> Option<usize> {
        match self {
            TensorRole::Layer(i, _) => Some(i),
            _ => None,
        }
    }
}

fn parse_index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let r = TensorRole::from_gguf_name("blk.12.ffn_down.weight").unwrap();
        assert_eq!(r, TensorRole::Layer(12, LayerTensor::DownProj));
        assert_eq!(r.hf_name(), "model.layers.12.mlp.down_proj.weight");
        assert_eq!(TensorRole::from_hf_name(&r.hf_name()), Some(r));
        assert_eq!(
            TensorRole::from_hf_name(&r.hf_name()).unwrap().gguf_name(),
            "blk.12.ffn_down.weight"
        );
        assert_eq!(
            TensorRole::from_gguf_name("token_embd.weight")
                .unwrap()
                .hf_name(),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            TensorRole::from_hf_name("model.layers.01.mlp.up_proj.weight"),
            None
        );
        assert_eq!(
            TensorRole::from_hf_name("model.layers.1.mlp.rotary.inv_freq"),
            None
        );
    }
}
