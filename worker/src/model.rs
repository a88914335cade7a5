//! The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2), loadable as a slice: layers
//! `[a, b)`, plus the embedding on the first stage and the final norm and head on the last.
//! One struct per layer, each with a `load`; field names mirror the checkpoint's.

use std::collections::HashMap;

use candle_core::Tensor;
use strata_kernels::attention::{self, AttentionShape};
use strata_kernels::int8::Precision;
use strata_shared::config::ModelConfig;
use strata_shared::isq::IsqType;
use strata_shared::meta::ModelMeta;
use strata_shared::names::{LayerTensor, TensorRole};
use strata_shared::plan::{FloatType, Plan};
use strata_shared::wire::KV_BLOCK_SIZE;

pub use crate::batch::{ActivationPolicy, Batch, LAYER_CHUNK_ROWS, Span};
use crate::device::Placement;
use crate::error::{CandleContext, Result, WorkerError};
use crate::kv::{KvCache, KvDtype, Pools};
use crate::layers::{
    Embedding, Hidden, Linear, Projections, RmsNorm, Rope, RopeTables, add_residual,
};
pub use crate::scratch::{HeadScratch, LayerScratch};
use crate::weights::{self, LoadSpec, Weight};

/// How one tensor use is loaded (from the plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLoad {
    /// Canonical name of the stored tensor it reads.
    pub source: String,
    pub isq: Option<IsqType>,
    pub dtype: Option<FloatType>,
}

/// What a slice holds and how to load each tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSpec {
    pub layer_start: usize,
    pub layer_end: usize,
    pub embed: bool,
    pub head: bool,
    /// By canonical use name (`model.layers.3.mlp.up_proj.weight`, `lm_head.weight`).
    pub tensors: HashMap<String, TensorLoad>,
}

impl SliceSpec {
    /// The spec of route stage `index` of `plan`.
    pub fn from_plan(plan: &Plan, index: usize) -> Result<Self> {
        let stage = plan
            .route
            .get(index)
            .ok_or_else(|| WorkerError::Load(format!("the plan has no stage {index}")))?;
        Ok(SliceSpec {
            layer_start: stage.layer_start,
            layer_end: stage.layer_end,
            embed: stage.embed,
            head: stage.head,
            tensors: plan
                .stage_tensors(index)
                .map(|t| {
                    (
                        t.name.clone(),
                        TensorLoad {
                            source: t.source.clone(),
                            isq: t.isq,
                            dtype: t.dtype,
                        },
                    )
                })
                .collect(),
        })
    }

    /// A slice of every layer with the embedding and the head, every tensor as stored (or
    /// converted to `dtype`).
    pub fn whole(meta: &ModelMeta, dtype: Option<FloatType>) -> Self {
        let mut tensors: HashMap<String, TensorLoad> = meta
            .tensors
            .values()
            .map(|t| {
                (
                    t.name.clone(),
                    TensorLoad {
                        source: t.name.clone(),
                        isq: None,
                        dtype,
                    },
                )
            })
            .collect();
        if meta.tied_head() {
            tensors.insert(
                "lm_head.weight".into(),
                TensorLoad {
                    source: TensorRole::Embedding.hf_name(),
                    isq: None,
                    dtype,
                },
            );
        }
        SliceSpec {
            layer_start: 0,
            layer_end: meta.config.num_layers,
            embed: true,
            head: true,
            tensors,
        }
    }
}

/// Progress callback: (tensor name, tensors done, tensors total).
pub type Progress<'a> = &'a mut (dyn FnMut(&str, usize, usize) + Send);

/// Loads tensors of a slice in a fixed order, reporting progress.
struct Loader<'a> {
    meta: &'a ModelMeta,
    spec: &'a SliceSpec,
    /// Where linear weights go once loaded.
    placement: &'a Placement,
    progress: Progress<'a>,
    done: usize,
    total: usize,
    bytes: usize,
}

impl Loader<'_> {
    fn plan_for(&self, role: TensorRole) -> Result<(&strata_shared::meta::TensorMeta, LoadSpec)> {
        let name = role.hf_name();
        let entry = self.spec.tensors.get(&name);
        let source_role = match entry {
            Some(e) => TensorRole::from_hf_name(&e.source).ok_or_else(|| {
                WorkerError::Load(format!("`{name}` reads unknown tensor `{}`", e.source))
            })?,
            None => role,
        };
        let meta = self.meta.require(source_role)?;
        let spec = LoadSpec {
            isq: entry.and_then(|e| e.isq),
            dtype: entry.and_then(|e| e.dtype),
            unpermute_heads: weights::unpermute_heads(self.meta, source_role),
        };
        Ok((meta, spec))
    }

    /// Whether the head reads the embedding tensor with the same load plan (a tied head).
    fn shares_embedding(&self) -> bool {
        let embed = self.spec.tensors.get(&TensorRole::Embedding.hf_name());
        let head = self.spec.tensors.get(&TensorRole::LmHead.hf_name());
        match (embed, head) {
            (Some(e), Some(h)) => h.source == e.source && h.isq == e.isq && h.dtype == e.dtype,
            _ => false,
        }
    }

    fn tick(&mut self, name: &str) {
        self.done += 1;
        (self.progress)(name, self.done, self.total);
    }

    fn matrix(&mut self, role: TensorRole) -> Result<Weight> {
        let (meta, spec) = self.plan_for(role)?;
        let w = weights::load(meta, &spec)?.into_kernel_form(&role.hf_name())?;
        self.bytes += w.bytes();
        tracing::debug!(tensor = %role.hf_name(), kind = %w.kind(), bytes = w.bytes(), "loaded");
        self.tick(&role.hf_name());
        Ok(w)
    }

    fn linear(
        &mut self,
        layer: usize,
        t: LayerTensor,
        bias: Option<LayerTensor>,
        importance: Option<&[f32]>,
    ) -> Result<Linear> {
        let role = TensorRole::Layer(layer, t);
        let (meta, spec) = self.plan_for(role)?;
        let w =
            weights::load_weighted(meta, &spec, importance)?.into_kernel_form(&role.hf_name())?;
        self.bytes += w.bytes();
        tracing::debug!(tensor = %role.hf_name(), kind = %w.kind(), bytes = w.bytes(), "loaded");
        self.tick(&role.hf_name());
        let b = match bias {
            Some(b) if self.meta.tensor(TensorRole::Layer(layer, b)).is_some() => {
                Some(self.vector(TensorRole::Layer(layer, b))?)
            }
            _ => None,
        };
        let name = TensorRole::Layer(layer, t).hf_name();
        let w = self.placement.place(&name, w)?;
        Linear::new(&name, w, b)
    }

    fn vector(&mut self, role: TensorRole) -> Result<Tensor> {
        let meta = self.meta.require(role)?;
        let t = weights::load_vector_f32(meta)?;
        self.bytes += t.elem_count() * 4;
        self.tick(&role.hf_name());
        Ok(t)
    }
}

/// Multi-head attention with grouped key/value heads over the paged KV cache.
#[derive(Debug)]
pub struct Attention {
    /// q_proj, k_proj and v_proj.
    qkv: Projections,
    o_proj: Linear,
    shape: AttentionShape,
    scale: f32,
    sliding_window: Option<usize>,
}

impl Attention {
    fn load(
        l: &mut Loader<'_>,
        layer: usize,
        cfg: &ModelConfig,
        input_norm: &[f32],
    ) -> Result<Self> {
        let bias = cfg.attention_bias;
        let pick = |t| if bias { Some(t) } else { None };
        let imp = norm_importance(input_norm);
        let q_proj = l.linear(
            layer,
            LayerTensor::QProj,
            pick(LayerTensor::QBias),
            Some(&imp),
        )?;
        let k_proj = l.linear(
            layer,
            LayerTensor::KProj,
            pick(LayerTensor::KBias),
            Some(&imp),
        )?;
        let v_proj = l.linear(
            layer,
            LayerTensor::VProj,
            pick(LayerTensor::VBias),
            Some(&imp),
        )?;
        Ok(Attention {
            qkv: Projections::new(vec![q_proj, k_proj, v_proj]),
            o_proj: l.linear(layer, LayerTensor::OProj, Some(LayerTensor::OBias), None)?,
            shape: attention_shape(cfg),
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            sliding_window: cfg.sliding_window,
        })
    }

    /// Attention over the normed rows in `s.normed`, into `s.out`.
    fn forward(
        &self,
        batch: &Batch,
        rope: &RopeTables,
        kv: &mut KvCache,
        layer: usize,
        s: &mut LayerScratch,
    ) -> Result<()> {
        let sh = &self.shape;
        let m = batch.rows();
        self.qkv
            .forward_into(&s.normed, &batch.precision, &mut s.products, &mut s.proj)?;
        let [q, k, v] = &mut s.proj;
        Rope::apply(q, sh.n_heads, rope);
        Rope::apply(k, sh.n_kv_heads, rope);
        let ctx = || format!("layer {layer} attention");
        let q_width = sh.n_heads * sh.head_dim;
        // Attention writes every element (`run_batch`): no clearing. The buffer is the MLP's
        // too, longer after a layer's SwiGLU: it is only grown, so that no layer zeroes the
        // part its attention cut off.
        let n = m * q_width;
        if s.attn.len() < n {
            s.attn.resize(n, 0.0);
        }
        let attn = &mut s.attn[..n];
        match kv.layer(layer)?.pools()? {
            Pools::F32(k_pool, v_pool) => self.attend(batch, k, v, q, k_pool, v_pool, attn),
            Pools::F16(k_pool, v_pool) => self.attend(batch, k, v, q, k_pool, v_pool, attn),
        }
        .ctx(ctx)?;
        self.o_proj
            .forward_into(&s.attn[..n], &batch.precision, &mut s.products, &mut s.out)
    }

    /// Writes the rows' keys and values `k`, `v` into the pools, then attends with the queries
    /// `q`, every sequence of the batch in one parallel region, into `out`.
    #[allow(clippy::too_many_arguments)]
    fn attend<T: attention::KvElement>(
        &self,
        batch: &Batch,
        k: &[f32],
        v: &[f32],
        q: &[f32],
        k_pool: &mut [T],
        v_pool: &mut [T],
        out: &mut [f32],
    ) -> std::result::Result<(), strata_kernels::KernelError> {
        let sh = &self.shape;
        let q_width = sh.n_heads * sh.head_dim;
        let kv_width = sh.n_kv_heads * sh.head_dim;
        for (span, table) in batch.spans.iter().zip(&batch.tables) {
            let rows = span.row..span.row + span.len;
            attention::write_kv(
                sh,
                k_pool,
                v_pool,
                table,
                span.pos0,
                &k[rows.start * kv_width..rows.end * kv_width],
                &v[rows.start * kv_width..rows.end * kv_width],
                span.len,
            )?;
        }
        // Every sequence's attention in one parallel region.
        let (k_pool, v_pool) = (&*k_pool, &*v_pool);
        let requests: Vec<attention::PagedAttention<'_, T>> = batch
            .spans
            .iter()
            .zip(&batch.tables)
            .map(|(span, table)| attention::PagedAttention {
                shape: *sh,
                q: &q[span.row * q_width..(span.row + span.len) * q_width],
                pos0: span.pos0,
                k_pool,
                v_pool,
                block_table: table,
                scale: self.scale,
                window: self.sliding_window,
            })
            .collect();
        attention::PagedAttention::run_batch(&requests, out)
    }
}

/// The gated SiLU feed-forward block.
#[derive(Debug)]
pub struct Mlp {
    /// gate_proj and up_proj.
    gate_up: Projections,
    down_proj: Linear,
}

impl Mlp {
    fn load(l: &mut Loader<'_>, layer: usize, post_norm: &[f32]) -> Result<Self> {
        let imp = norm_importance(post_norm);
        let gate_proj = l.linear(layer, LayerTensor::GateProj, None, Some(&imp))?;
        let up_proj = l.linear(layer, LayerTensor::UpProj, None, Some(&imp))?;
        let down = TensorRole::Layer(layer, LayerTensor::DownProj);
        let down_imp = if l
            .plan_for(down)?
            .1
            .isq
            .is_some_and(IsqType::takes_importance)
        {
            Some(down_proj_importance(&gate_proj, &up_proj, post_norm)?)
        } else {
            None
        };
        let down_proj = l.linear(layer, LayerTensor::DownProj, None, down_imp.as_deref())?;
        Ok(Mlp {
            gate_up: Projections::new(vec![gate_proj, up_proj]),
            down_proj,
        })
    }

    /// The block over the normed rows in `s.normed`, into `s.out`.
    fn forward(&self, precision: &[Precision], s: &mut LayerScratch) -> Result<()> {
        self.gate_up
            .forward_into(&s.normed, precision, &mut s.products, &mut s.gate_up)?;
        let [g, u] = &s.gate_up;
        // silu(gate) · up, into the attention buffer (free at this point).
        strata_kernels::math::silu_mul(g, u, &mut s.attn);
        self.down_proj
            .forward_into(&s.attn, precision, &mut s.products, &mut s.out)
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.
#[derive(Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(l: &mut Loader<'_>, layer: usize, cfg: &ModelConfig) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let input_norm = RmsNorm::new(
            l.vector(TensorRole::Layer(layer, LayerTensor::InputNorm))?,
            eps,
        )?;
        let self_attn = Attention::load(l, layer, cfg, input_norm.weight())?;
        let post_norm = RmsNorm::new(
            l.vector(TensorRole::Layer(layer, LayerTensor::PostAttentionNorm))?,
            eps,
        )?;
        let mlp = Mlp::load(l, layer, post_norm.weight())?;
        Ok(DecoderLayer {
            input_layernorm: input_norm,
            self_attn,
            post_attention_layernorm: post_norm,
            mlp,
        })
    }

    /// Whether every linear weight of the layer is f32.
    fn weights_are_f32(&self) -> bool {
        [&self.self_attn.qkv, &self.mlp.gate_up]
            .iter()
            .all(|p| p.is_f32())
            && self.self_attn.o_proj.is_f32()
            && self.mlp.down_proj.is_f32()
    }

    /// `x += attention(norm(x)); x += mlp(norm(x))`, in place, over the rows of `batch` (`x`
    /// holds them, row after row).
    fn forward(
        &self,
        x: &mut [f32],
        batch: &Batch,
        rope: &RopeTables,
        kv: &mut KvCache,
        layer: usize,
        s: &mut LayerScratch,
    ) -> Result<()> {
        self.input_layernorm.forward_into(x, &mut s.normed);
        self.self_attn.forward(batch, rope, kv, layer, s)?;
        add_residual(x, &s.out);
        self.post_attention_layernorm.forward_into(x, &mut s.normed);
        self.mlp.forward(&batch.precision, s)?;
        add_residual(x, &s.out);
        Ok(())
    }
}

pub fn attention_shape(cfg: &ModelConfig) -> AttentionShape {
    AttentionShape {
        n_heads: cfg.num_heads,
        n_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size: KV_BLOCK_SIZE,
    }
}

/// A contiguous slice of the model.
#[derive(Debug)]
pub struct ModelSlice {
    config: ModelConfig,
    embed_tokens: Option<Embedding>,
    layers: Vec<DecoderLayer>,
    layer_start: usize,
    rope: Option<Rope>,
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    weight_bytes: usize,
    /// Rows a layer takes at a time ([`LAYER_CHUNK_ROWS`] unless set).
    chunk_rows: usize,
}

impl ModelSlice {
    /// Loads what `spec` names, and nothing else, reporting progress per tensor.
    pub fn load(meta: &ModelMeta, spec: &SliceSpec, progress: Progress<'_>) -> Result<Self> {
        Self::load_on(meta, spec, &Placement::Cpu, progress)
    }

    /// Loads what `spec` names with its linear weights on `placement`'s device (embeddings,
    /// norms and the KV cache stay in host memory).
    pub fn load_on(
        meta: &ModelMeta,
        spec: &SliceSpec,
        placement: &Placement,
        progress: Progress<'_>,
    ) -> Result<Self> {
        strata_kernels::pool::install(|| Self::load_here(meta, spec, placement, progress))
    }

    fn load_here(
        meta: &ModelMeta,
        spec: &SliceSpec,
        placement: &Placement,
        progress: Progress<'_>,
    ) -> Result<Self> {
        let cfg = meta.config.clone();
        if spec.layer_start > spec.layer_end || spec.layer_end > cfg.num_layers {
            return Err(WorkerError::Load(format!(
                "layers {}-{} are not within the model's {} layers",
                spec.layer_start, spec.layer_end, cfg.num_layers
            )));
        }
        let n_layers = spec.layer_end - spec.layer_start;
        // One tick per tensor use the slice loads (the tied head counts once more).
        let total = spec
            .tensors
            .keys()
            .filter(|name| {
                TensorRole::from_hf_name(name).is_some_and(|r| r != TensorRole::RopeFreqs)
            })
            .count();
        let mut l = Loader {
            meta,
            spec,
            placement,
            progress,
            done: 0,
            total,
            bytes: 0,
        };
        let embed_weight = if spec.embed {
            Some(l.matrix(TensorRole::Embedding)?)
        } else {
            None
        };
        let embed_tokens = embed_weight
            .clone()
            .map(|w| Embedding::new(w, cfg.vocab_size, cfg.hidden_size));
        let mut layers = Vec::with_capacity(n_layers);
        for i in spec.layer_start..spec.layer_end {
            layers.push(DecoderLayer::load(&mut l, i, &cfg)?);
            // Each layer's transient full-precision and raw copies are freed by now; glibc
            // keeps their pages resident (and the peak grows layer by layer) unless told.
            strata_shared::memory::release_idle_pages();
        }
        let rope = if n_layers > 0 {
            let factors = match meta.tensor(TensorRole::RopeFreqs) {
                Some(t) => Some(
                    weights::load_vector_f32(t)?
                        .to_vec1::<f32>()
                        .ctx(|| "rope_freqs.weight".into())?,
                ),
                None => None,
            };
            Some(Rope::new(&cfg, factors.as_deref())?)
        } else {
            None
        };
        let (norm, lm_head) = if spec.head {
            let norm = RmsNorm::new(l.vector(TensorRole::FinalNorm)?, cfg.rms_norm_eps)?;
            // A tied head loaded the same way as this slice's embedding shares its weights.
            let head_weight = match (embed_weight, l.shares_embedding()) {
                (Some(w), true) => {
                    l.tick("lm_head.weight");
                    w
                }
                _ => l.matrix(TensorRole::LmHead)?,
            };
            let head_weight = placement.place("lm_head.weight", head_weight)?;
            let head = Linear::new("lm_head.weight", head_weight, None)?;
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        let weight_bytes = l.bytes;
        // The huge page past the last weight, resident as a whole though mostly unused.
        #[cfg(target_os = "linux")]
        strata_kernels::huge::release_unused();
        Ok(ModelSlice {
            config: cfg,
            embed_tokens,
            layers,
            layer_start: spec.layer_start,
            rope,
            norm,
            lm_head,
            weight_bytes,
            chunk_rows: LAYER_CHUNK_ROWS,
        })
    }

    /// Runs each layer over at most `rows` rows at a time (see [`LAYER_CHUNK_ROWS`]): the same
    /// results, in buffers of that many rows.
    pub fn with_chunk_rows(mut self, rows: usize) -> Self {
        self.chunk_rows = rows.max(1);
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn has_embedding(&self) -> bool {
        self.embed_tokens.is_some()
    }

    pub fn has_head(&self) -> bool {
        self.lm_head.is_some()
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// A KV cache sized for this slice's layers, of the type [`KvDtype::for_slice`] picks.
    pub fn new_kv_cache(&self, num_blocks: usize) -> Result<KvCache> {
        let all_f32 = self.layers.iter().all(DecoderLayer::weights_are_f32);
        KvCache::new(
            attention_shape(&self.config),
            self.layers.len(),
            num_blocks,
            KvDtype::for_slice(all_f32)?,
        )
    }

    /// Embeds token ids: `[n, hidden]`. Only the first stage can.
    pub fn embed(&self, tokens: &[u32]) -> Result<Hidden> {
        self.embed_tokens
            .as_ref()
            .ok_or_else(|| WorkerError::Step("this stage has no token embedding".into()))?
            .forward(tokens)
    }

    /// Runs the slice's layers over a batch, whose block tables have been checked against the
    /// cache ([`KvCache::check_table`]), in the buffers of `scratch`.
    pub fn forward_layers(
        &self,
        x: Hidden,
        batch: &Batch,
        kv: &mut KvCache,
        scratch: &mut LayerScratch,
    ) -> Result<Hidden> {
        strata_kernels::pool::install(|| self.forward_layers_here(x, batch, kv, scratch))
    }

    fn forward_layers_here(
        &self,
        mut x: Hidden,
        batch: &Batch,
        kv: &mut KvCache,
        scratch: &mut LayerScratch,
    ) -> Result<Hidden> {
        let Some(rope) = &self.rope else {
            return Ok(x);
        };
        if x.rows != batch.rows() || x.cols != self.config.hidden_size {
            return Err(WorkerError::Step(format!(
                "{}x{} hidden states for a batch of {} rows of {}",
                x.rows,
                x.cols,
                batch.rows(),
                self.config.hidden_size
            )));
        }
        let chunks = batch.row_chunks(self.chunk_rows);
        let tables = chunks
            .iter()
            .map(|(_, chunk)| rope.tables(&chunk.positions))
            .collect::<Result<Vec<_>>>()?;
        let width = x.cols;
        for (i, layer) in self.layers.iter().enumerate() {
            chunks
                .iter()
                .zip(&tables)
                .try_for_each(|((first, chunk), tables)| {
                    let rows = &mut x.data[first * width..(first + chunk.rows()) * width];
                    layer.forward(rows, chunk, tables, kv, i, scratch)
                })
                .map_err(|e| match e {
                    WorkerError::Candle { context, source } => WorkerError::Candle {
                        context: format!("layer {}: {context}", self.layer_start + i),
                        source,
                    },
                    WorkerError::Kernel { context, source } => WorkerError::Kernel {
                        context: format!("layer {}: {context}", self.layer_start + i),
                        source,
                    },
                    other => other,
                })?;
        }
        Ok(x)
    }

    /// Final norm and output head over the given hidden rows: `[rows, vocab]` logits. The head
    /// reads its input at full int8 precision (two planes): logits decide tokens.
    pub fn logits(&self, x: &Hidden) -> Result<Hidden> {
        let mut head = HeadScratch::default();
        self.logits_into(x, &mut head)?;
        head.take()
    }

    /// [`ModelSlice::logits`] into the buffers of `s` ([`HeadScratch::row`] reads them).
    pub fn logits_into(&self, x: &Hidden, s: &mut HeadScratch) -> Result<()> {
        let (Some(norm), Some(head)) = (&self.norm, &self.lm_head) else {
            return Err(WorkerError::Step("this stage has no output head".into()));
        };
        s.rows = 0;
        strata_kernels::pool::install(|| {
            norm.forward_into(&x.data, &mut s.normed);
            let precision = vec![Precision::Int8x2; x.rows];
            head.forward_into(&s.normed, &precision, &mut s.products, &mut s.logits)
        })?;
        (s.rows, s.vocab) = (x.rows, head.out_features());
        Ok(())
    }
}

/// Importance of the input channels of a linear layer fed by an RMS norm: the energy of channel
/// `k` of a normalized hidden state whose components have unit variance, `weight[k]²`. Guides the
/// k-quant search (llama.cpp's importance matrix) without calibration data.
fn norm_importance(norm: &[f32]) -> Vec<f32> {
    norm.iter().map(|x| x * x).collect()
}

/// Importance of each input channel of a layer's `down_proj`: the expected energy of
/// `silu(gate_j · h) · (up_j · h)` for a normalized hidden state `h` with unit-variance
/// components scaled by the post-attention norm weight. Computed from the layer's own (loaded)
/// gate and up rows, one row at a time, by a fixed quadrature over the two correlated Gaussians.
fn down_proj_importance(gate: &Linear, up: &Linear, norm: &[f32]) -> Result<Vec<f32>> {
    let w2: Vec<f64> = norm.iter().map(|&x| f64::from(x) * f64::from(x)).collect();
    let hidden = norm.len();
    let inter = gate.out_features();
    // Fixed standard-normal pairs (Box-Muller over a regular grid): the same on every run.
    const N: usize = 24;
    let mut pairs = Vec::with_capacity(N * N);
    for a in 0..N {
        for b in 0..N {
            let r = (-2.0 * ((a as f64 + 0.5) / N as f64).ln()).sqrt();
            let th = 2.0 * std::f64::consts::PI * (b as f64 + 0.5) / N as f64;
            pairs.push((r * th.cos(), r * th.sin()));
        }
    }
    let silu = |x: f64| x / (1.0 + (-x).exp());
    let (mut g, mut u) = (vec![0f32; hidden], vec![0f32; hidden]);
    let mut out = vec![0f32; inter];
    for (j, o) in out.iter_mut().enumerate() {
        gate.row_f32(j, &mut g)?;
        up.row_f32(j, &mut u)?;
        let (mut vg, mut vu, mut c) = (0f64, 0f64, 0f64);
        for k in 0..hidden {
            let (gk, uk) = (f64::from(g[k]), f64::from(u[k]));
            vg += gk * gk * w2[k];
            vu += uk * uk * w2[k];
            c += gk * uk * w2[k];
        }
        let (sg, su) = (vg.sqrt(), vu.sqrt());
        let rho = if sg > 0.0 && su > 0.0 {
            (c / (sg * su)).clamp(-1.0, 1.0)
        } else {
            0.0
        };
        let side = (1.0 - rho * rho).sqrt();
        let e: f64 = pairs
            .iter()
            .map(|&(z1, z2)| {
                let a = silu(sg * z1) * su * (rho * z1 + side * z2);
                a * a
            })
            .sum();
        *o = (e / pairs.len() as f64) as f32;
    }
    Ok(out)
}
