//! A model's metadata: its config and every tensor's name, role, shape, type and byte range.
//! Built from headers only; reading this never touches tensor data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{Arch, ModelConfig};
use crate::error::ModelError;
use crate::ggml::GgmlType;
use crate::gguf::GgufFile;
use crate::names::{LayerTensor, TensorRole};
use crate::safetensors::SafetensorsFile;
use crate::source::{ModelFiles, WeightFormat};

/// One stored tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    /// Canonical (Hugging Face) name.
    pub name: String,
    /// The name in the file (the GGUF name for GGUF files).
    pub stored_name: String,
    pub role: TensorRole,
    /// Row-major shape.
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    pub file: PathBuf,
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorMeta {
    /// Names a topology selector may match: the canonical name, and the stored name if it differs.
    pub fn names(&self) -> Vec<String> {
        if self.name == self.stored_name {
            vec![self.name.clone()]
        } else {
            vec![self.name.clone(), self.stored_name.clone()]
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Everything known about a model before loading it.
#[derive(Debug, Clone)]
pub struct ModelMeta {
    pub files: ModelFiles,
    pub config: ModelConfig,
    /// Tensors Strata uses, by role.
    pub tensors: BTreeMap<TensorRole, TensorMeta>,
    /// The GGUF header (tokenizer and chat template live in its metadata).
    pub gguf: Option<GgufFile>,
    /// The q/k weights are stored permuted for llama.cpp's interleaved RoPE (GGUF `llama`
    /// architecture) and must be un-permuted to the Hugging Face layout when loaded.
    pub qk_permuted: bool,
}

/// Bytes of each tensor's data that go into [`ModelMeta::fingerprint`].
const FINGERPRINT_SAMPLE: u64 = 4096;

impl ModelMeta {
    /// A fingerprint of the model's contents: SHA-256 over every tensor's name, type, shape and
    /// size and the first 4 KiB of its data, in role order. Two copies of a model agree; a
    /// fine-tune or another quantization of the same architecture does not. The gateway and
    /// each worker compute it from their own files, so that a pod with another copy of the
    /// model is refused at load. Reads about 4 KiB per tensor.
    pub fn fingerprint(&self) -> Result<String, ModelError> {
        use sha2::Digest as _;
        use std::os::unix::fs::FileExt as _;
        let mut hash = sha2::Sha256::new();
        let mut open: BTreeMap<&Path, std::fs::File> = BTreeMap::new();
        let mut sample = vec![0u8; FINGERPRINT_SAMPLE as usize];
        for t in self.tensors.values() {
            hash.update(t.name.as_bytes());
            hash.update(format!("|{:?}|{:?}|{}|", t.dtype, t.shape, t.n_bytes).as_bytes());
            let file = match open.entry(t.file.as_path()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(
                    std::fs::File::open(&t.file).map_err(|source| ModelError::Io {
                        path: t.file.clone(),
                        source,
                    })?,
                ),
            };
            let n = t.n_bytes.min(FINGERPRINT_SAMPLE) as usize;
            file.read_exact_at(&mut sample[..n], t.offset)
                .map_err(|source| ModelError::Io {
                    path: t.file.clone(),
                    source,
                })?;
            hash.update(&sample[..n]);
        }
        let digest = hash.finalize();
        Ok(format!(
            "sha256:{}",
            digest[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ))
    }

    /// Reads headers and config, and checks that every tensor the architecture needs is present
    /// with the right shape.
    pub fn open(files: ModelFiles) -> Result<Self, ModelError> {
        let mut tensors = BTreeMap::new();
        let (config, gguf, qk_permuted) = match files.format {
            WeightFormat::Gguf => {
                let path = files.weights.first().ok_or_else(|| ModelError::Source {
                    spec: files.spec.clone(),
                    problem: "no weight file".into(),
                })?;
                let g = GgufFile::open(path)?;
                let config = ModelConfig::from_gguf(&g)?;
                for t in g.tensors() {
                    let Some(role) = TensorRole::from_gguf_name(&t.name) else {
                        tracing::debug!(tensor = %t.name, "ignoring tensor Strata does not use");
                        continue;
                    };
                    insert_unique(
                        &mut tensors,
                        role,
                        TensorMeta {
                            name: role.hf_name(),
                            stored_name: t.name.clone(),
                            role,
                            shape: t.shape.clone(),
                            dtype: t.dtype,
                            file: path.clone(),
                            offset: t.offset,
                            n_bytes: t.n_bytes,
                        },
                    )?;
                }
                // llama.cpp's converter permutes q/k rows for Llama-architecture models only.
                let permuted = matches!(config.arch, Arch::Llama | Arch::Mistral);
                (config, Some(g), permuted)
            }
            WeightFormat::Safetensors => {
                let cfg_path = files.config.clone().ok_or_else(|| ModelError::Source {
                    spec: files.spec.clone(),
                    problem: "no config.json".into(),
                })?;
                let config = ModelConfig::from_hf_config(&cfg_path)?;
                for path in &files.weights {
                    let st = SafetensorsFile::open(path)?;
                    for t in st.tensors() {
                        let Some(role) = TensorRole::from_hf_name(&t.name) else {
                            tracing::debug!(tensor = %t.name, "ignoring tensor Strata does not use");
                            continue;
                        };
                        insert_unique(
                            &mut tensors,
                            role,
                            TensorMeta {
                                name: t.name.clone(),
                                stored_name: t.name.clone(),
                                role,
                                shape: t.shape.clone(),
                                dtype: t.dtype,
                                file: path.clone(),
                                offset: t.offset,
                                n_bytes: t.n_bytes,
                            },
                        )?;
                    }
                }
                (config, None, false)
            }
        };
        let meta = ModelMeta {
            files,
            config,
            tensors,
            gguf,
            qk_permuted,
        };
        meta.check_tensors()?;
        Ok(meta)
    }

    /// Frees the tokenizer's metadata (a GGUF's `tokenizer.*` entries: vocabulary, merges and
    /// token types, the last an array of one value per token), which a process that never
    /// tokenizes (a worker) does not need while it loads: the default model's worker peaks
    /// 3 MiB lower without it.
    pub fn forget_tokenizer(&mut self) {
        if let Some(g) = &mut self.gguf {
            g.retain_metadata(|key| !key.starts_with("tokenizer."));
        }
    }

    /// The file that holds the weights (for error messages).
    pub fn weights_origin(&self) -> &Path {
        self.files
            .weights
            .first()
            .map(PathBuf::as_path)
            .unwrap_or(Path::new("<model>"))
    }

    /// Whether the output head reuses the token embedding.
    pub fn tied_head(&self) -> bool {
        self.config.tie_word_embeddings || !self.tensors.contains_key(&TensorRole::LmHead)
    }

    pub fn tensor(&self, role: TensorRole) -> Option<&TensorMeta> {
        self.tensors.get(&role)
    }

    /// The tensor for `role`, or a "missing" error naming the file.
    pub fn require(&self, role: TensorRole) -> Result<&TensorMeta, ModelError> {
        self.tensor(role).ok_or_else(|| ModelError::MissingTensor {
            path: self.weights_origin().to_path_buf(),
            tensor: match self.files.format {
                WeightFormat::Gguf => role.gguf_name(),
                WeightFormat::Safetensors => role.hf_name(),
            },
        })
    }

    /// The shape the architecture expects for `role`, row-major.
    pub fn expected_shape(&self, role: TensorRole) -> Vec<usize> {
        let c = &self.config;
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        match role {
            TensorRole::Embedding | TensorRole::LmHead => vec![c.vocab_size, c.hidden_size],
            TensorRole::FinalNorm => vec![c.hidden_size],
            TensorRole::RopeFreqs => vec![c.head_dim / 2],
            TensorRole::Layer(_, t) => match t {
                LayerTensor::InputNorm | LayerTensor::PostAttentionNorm => vec![c.hidden_size],
                LayerTensor::QProj => vec![q, c.hidden_size],
                LayerTensor::KProj | LayerTensor::VProj => vec![kv, c.hidden_size],
                LayerTensor::OProj => vec![c.hidden_size, q],
                LayerTensor::QBias => vec![q],
                LayerTensor::KBias | LayerTensor::VBias => vec![kv],
                LayerTensor::OBias => vec![c.hidden_size],
                LayerTensor::GateProj | LayerTensor::UpProj => {
                    vec![c.intermediate_size, c.hidden_size]
                }
                LayerTensor::DownProj => vec![c.hidden_size, c.intermediate_size],
            },
        }
    }

    /// Roles the architecture needs.
    pub fn required_roles(&self) -> Vec<TensorRole> {
        let mut roles = vec![TensorRole::Embedding, TensorRole::FinalNorm];
        if !self.config.tie_word_embeddings {
            roles.push(TensorRole::LmHead);
        }
        let mut per_layer = vec![
            LayerTensor::InputNorm,
            LayerTensor::PostAttentionNorm,
            LayerTensor::QProj,
            LayerTensor::KProj,
            LayerTensor::VProj,
            LayerTensor::OProj,
            LayerTensor::GateProj,
            LayerTensor::UpProj,
            LayerTensor::DownProj,
        ];
        if self.config.attention_bias {
            per_layer.extend([LayerTensor::QBias, LayerTensor::KBias, LayerTensor::VBias]);
        }
        for i in 0..self.config.num_layers {
            roles.extend(per_layer.iter().map(|&t| TensorRole::Layer(i, t)));
        }
        roles
    }

    fn check_tensors(&self) -> Result<(), ModelError> {
        for role in self.required_roles() {
            self.require(role)?;
        }
        for t in self.tensors.values() {
            if let Some(layer) = t.role.layer()
                && layer >= self.config.num_layers
            {
                return Err(ModelError::tensor(
                    &t.file,
                    &t.stored_name,
                    format!(
                        "belongs to layer {layer}, but the model has {} layers",
                        self.config.num_layers
                    ),
                ));
            }
            let want = self.expected_shape(t.role);
            if t.shape != want {
                return Err(ModelError::tensor(
                    &t.file,
                    &t.stored_name,
                    format!(
                        "has shape {:?}, expected {want:?} from the model config",
                        t.shape
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Adds a tensor, refusing a second tensor with the same role (a duplicated name across
/// shards, or two GGUF names for one weight).
fn insert_unique(
    tensors: &mut BTreeMap<TensorRole, TensorMeta>,
    role: TensorRole,
    t: TensorMeta,
) -> Result<(), ModelError> {
    if let Some(first) = tensors.get(&role) {
        return Err(ModelError::tensor(
            &t.file,
            &t.stored_name,
            format!(
                "is the same weight as `{}` in {}",
                first.stored_name,
                first.file.display()
            ),
        ));
    }
    tensors.insert(role, t);
    Ok(())
}
