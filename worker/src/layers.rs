//! The building blocks a decoder layer is made of: linear projections over any weight form,
//! token embeddings, RMS norms and rotary position embeddings.

use candle_core::{DType, Device, Tensor};
use strata_kernels::QuantMatrix;
use strata_shared::config::{ModelConfig, RopeScaling};

use crate::error::{CandleContext, Result, WorkerError};
use crate::weights::Weight;

/// `y = x Wᵀ (+ b)` for a weight in any form. Activations are f32 `[n, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    name: String,
    weight: Weight,
    bias: Option<Tensor>,
    out_features: usize,
}

impl Linear {
    pub fn new(name: &str, weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        let out_features = match &weight {
            Weight::Dense(t) => t.dim(0).ctx(|| format!("`{name}`"))?,
            Weight::Matrix(w) => w.rows(),
        };
        Ok(Linear {
            name: name.to_string(),
            weight,
            bias,
            out_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Row `row` of the weight, dequantized to f32 (`out` holds `in_features` values).
    pub fn row_f32(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let ctx = || format!("`{}` row {row}", self.name);
        match &self.weight {
            Weight::Dense(w) => {
                let v = w
                    .get(row)
                    .and_then(|r| r.to_dtype(DType::F32))
                    .and_then(|r| r.to_vec1::<f32>())
                    .ctx(ctx)?;
                if v.len() != out.len() {
                    return Err(WorkerError::Step(format!(
                        "{}: {} columns, not {}",
                        ctx(),
                        v.len(),
                        out.len()
                    )));
                }
                out.copy_from_slice(&v);
                Ok(())
            }
            Weight::Matrix(w) => w.dequantize_row(row, out).ctx(ctx),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ctx = || format!("`{}` forward", self.name);
        let y = match &self.weight {
            Weight::Dense(w) if w.dtype() == DType::F32 => x.matmul(&w.t().ctx(ctx)?).ctx(ctx)?,
            Weight::Dense(w) => {
                let xw = x.to_dtype(w.dtype()).ctx(ctx)?;
                xw.matmul(&w.t().ctx(ctx)?)
                    .and_then(|y| y.to_dtype(DType::F32))
                    .ctx(ctx)?
            }
            Weight::Matrix(w) => matrix_matmul(w.as_ref(), x).ctx(ctx)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b).ctx(ctx),
            None => Ok(y),
        }
    }
}

/// Runs a quantized matrix's product on a candle tensor.
fn matrix_matmul(w: &dyn QuantMatrix, x: &Tensor) -> std::result::Result<Tensor, KernelOrCandle> {
    let m = x.dim(0)?;
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; m * w.rows()];
    w.matmul(&xs, m, &mut out)?;
    Ok(Tensor::from_vec(out, (m, w.rows()), &Device::Cpu)?)
}

/// Either error of [`matrix_matmul`].
#[derive(Debug, thiserror::Error)]
pub enum KernelOrCandle {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Kernel(#[from] strata_kernels::KernelError),
}

impl<T> CandleContext<T> for std::result::Result<T, KernelOrCandle> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| match e {
            KernelOrCandle::Candle(source) => WorkerError::Candle {
                context: context(),
                source,
            },
            KernelOrCandle::Kernel(source) => WorkerError::Kernel {
                context: context(),
                source,
            },
        })
    }
}

/// Token embeddings; quantized tables stay quantized and dequantize only the rows looked up.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Weight,
    vocab: usize,
    hidden: usize,
}

impl Embedding {
    pub fn new(table: Weight, vocab: usize, hidden: usize) -> Self {
        Embedding {
            table,
            vocab,
            hidden,
        }
    }

    /// `[tokens.len(), hidden]` f32.
    pub fn forward(&self, tokens: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(WorkerError::Step(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab
            )));
        }
        let ctx = || "token embedding".to_string();
        match &self.table {
            Weight::Dense(t) => Tensor::new(tokens, &Device::Cpu)
                .and_then(|ids| t.index_select(&ids, 0))
                .and_then(|e| e.to_dtype(DType::F32))
                .ctx(ctx),
            Weight::Matrix(w) => {
                let mut out = vec![0f32; tokens.len() * self.hidden];
                for (t, row) in tokens.iter().zip(out.chunks_exact_mut(self.hidden)) {
                    w.dequantize_row(*t as usize, row).ctx(ctx)?;
                }
                Tensor::from_vec(out, (tokens.len(), self.hidden), &Device::Cpu).ctx(ctx)
            }
        }
    }
}

/// Root-mean-square layer norm.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            weight,
            eps: eps as f32,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps).ctx(|| "rms norm".into())
    }
}

/// Rotary position embedding tables (Hugging Face's rotate-half layout).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    max_positions: usize,
}

impl Rope {
    /// Inverse frequencies in f32 as Hugging Face computes them (with Linear or Llama 3
    /// scaling). `freq_factors` are GGUF's `rope_freqs.weight` (Llama 3), if present.
    pub fn new(cfg: &ModelConfig, freq_factors: Option<&[f32]>) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let base = cfg.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        match &cfg.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                inv_freq.iter_mut().for_each(|f| *f /= *factor as f32)
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f32;
                let (factor, lo, hi) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        if let Some(ff) = freq_factors {
            if ff.len() != half {
                return Err(WorkerError::Load(format!(
                    "rope_freqs.weight has {} entries, expected head_dim/2 = {half}",
                    ff.len()
                )));
            }
            inv_freq.iter_mut().zip(ff).for_each(|(f, d)| *f /= *d);
        }
        Ok(Rope {
            inv_freq,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// cos/sin rows for the given positions.
    pub fn tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        if let Some(&p) = positions
            .iter()
            .find(|&&p| p as usize >= self.max_positions)
        {
            return Err(WorkerError::Step(format!(
                "position {p} is past the model's context length {}",
                self.max_positions
            )));
        }
        // Angles in f32, as Hugging Face computes them: position times inverse frequency.
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let ctx = || "rope tables".to_string();
        Ok((
            Tensor::from_vec(cos, (positions.len(), half), &Device::Cpu).ctx(ctx)?,
            Tensor::from_vec(sin, (positions.len(), half), &Device::Cpu).ctx(ctx)?,
        ))
    }

    /// Rotates `x` of shape `[n, heads * head_dim]` in place of position.
    pub fn apply(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let ctx = || "rope".to_string();
        let (n, width) = x.dims2().ctx(ctx)?;
        let x4 = x.reshape((1, n, heads, width / heads)).ctx(ctx)?;
        candle_nn::rotary_emb::rope_thd(&x4, cos, sin)
            .and_then(|y| y.reshape((n, width)))
            .ctx(ctx)
    }
}
