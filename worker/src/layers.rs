//! The building blocks a decoder layer is made of, on plain f32 rows: linear projections over
//! every weight form (one product for several projections of the same input where their weights
//! stack), token embeddings, RMS norms and rotary position embeddings.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use strata_kernels::QuantMatrix;
use strata_kernels::int8::{PackedMatrix, Precision, QuantizedActivations};
use strata_shared::config::{ModelConfig, RopeScaling};

use crate::error::{CandleContext, Result, WorkerError};
use crate::weights::Weight;

/// Rows of f32 values, row-major: the hidden states of a batch (`[rows, cols]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hidden {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Hidden {
    /// Wraps `data` as `[rows, cols]`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(WorkerError::Step(format!(
                "{} values do not make {rows} rows of {cols}",
                data.len()
            )));
        }
        Ok(Hidden { rows, cols, data })
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..][..self.cols]
    }

    /// The rows `rows`, in that order.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Hidden> {
        let mut data = Vec::with_capacity(rows.len() * self.cols);
        for &r in rows {
            if r as usize >= self.rows {
                return Err(WorkerError::Step(format!(
                    "row {r} of {} hidden rows",
                    self.rows
                )));
            }
            data.extend_from_slice(self.row(r as usize));
        }
        Ok(Hidden {
            rows: rows.len(),
            cols: self.cols,
            data,
        })
    }
}

/// Buffers a forward pass reuses from one product to the next.
#[derive(Debug, Default)]
pub struct Scratch {
    /// The int8 quantization of a product's input.
    q8: QuantizedActivations,
}

/// `y = x Wᵀ (+ b)` for a weight in any form. Activations are f32 `[n, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    name: String,
    weight: Weight,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    pub fn new(name: &str, weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        let ctx = || format!("`{name}`");
        let (out_features, in_features) = match &weight {
            Weight::Dense(t) => t.dims2().ctx(ctx)?,
            Weight::Matrix(w) => (w.rows(), w.cols()),
        };
        let bias = match bias {
            Some(b) => {
                let b = b
                    .to_dtype(DType::F32)
                    .and_then(|b| b.to_vec1::<f32>())
                    .ctx(ctx)?;
                if b.len() != out_features {
                    return Err(WorkerError::Load(format!(
                        "{}: a bias of {} for {out_features} outputs",
                        ctx(),
                        b.len()
                    )));
                }
                Some(b)
            }
            None => None,
        };
        Ok(Linear {
            name: name.to_string(),
            weight,
            bias,
            out_features,
            in_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
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

    /// Whether the weight is f32 (neither quantized nor a narrower float).
    pub fn is_f32(&self) -> bool {
        match &self.weight {
            Weight::Dense(w) => w.dtype() == DType::F32,
            Weight::Matrix(w) => w.is_f32(),
        }
    }

    /// The weight as int8 tiles, when it is.
    fn int8(&self) -> Option<&PackedMatrix> {
        match &self.weight {
            Weight::Matrix(w) => w.as_int8(),
            Weight::Dense(_) => None,
        }
    }

    /// `out[m, out_features] = x[m, in_features] Wᵀ (+ b)`, row `i` of `x` quantized at
    /// `precision[i]` for int8 products (`m = precision.len()`).
    pub fn forward_into(
        &self,
        x: &[f32],
        precision: &[Precision],
        scratch: &mut Scratch,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let m = precision.len();
        let ctx = || format!("`{}` forward", self.name);
        match &self.weight {
            Weight::Matrix(w) => match w.as_int8() {
                Some(p) => {
                    // The product writes every element: no clearing.
                    out.resize(m * self.out_features, 0.0);
                    scratch
                        .q8
                        .quantize_rows(x, m, self.in_features, |i| precision[i])
                        .ctx(ctx)?;
                    p.matmul_quantized(&scratch.q8, out).ctx(ctx)?;
                }
                None => {
                    out.clear();
                    out.resize(m * self.out_features, 0.0);
                    w.matmul(x, m, out).ctx(ctx)?;
                }
            },
            Weight::Dense(w) => {
                let y = Tensor::from_slice(x, (m, self.in_features), &Device::Cpu)
                    .and_then(|x| x.to_dtype(w.dtype()))
                    .and_then(|x| x.matmul(&w.t()?))
                    .and_then(|y| y.to_dtype(DType::F32))
                    .and_then(|y| y.flatten_all())
                    .and_then(|y| y.to_vec1::<f32>())
                    .ctx(ctx)?;
                out.clear();
                out.extend_from_slice(&y);
            }
        }
        if let Some(b) = &self.bias {
            add_bias(out, b);
        }
        Ok(())
    }
}

/// Linear projections of one input (q, k and v; gate and up). When their weights are int8
/// tiles of one format that stack, they run as one product over one quantization of the input
/// (and the stacked copy replaces the parts' own weights).
#[derive(Debug)]
pub enum Projections {
    /// One product each.
    Separate(Vec<Linear>),
    /// One product for all; each part's name, width and bias.
    Stacked {
        weight: Arc<PackedMatrix>,
        parts: Vec<(String, usize, Option<Vec<f32>>)>,
    },
}

impl Projections {
    /// Whether every part's weight is f32 (stacked parts are int8 tiles).
    pub fn is_f32(&self) -> bool {
        match self {
            Projections::Separate(parts) => parts.iter().all(Linear::is_f32),
            Projections::Stacked { .. } => false,
        }
    }

    pub fn new(parts: Vec<Linear>) -> Self {
        let int8: Option<Vec<&PackedMatrix>> = parts.iter().map(Linear::int8).collect();
        match int8
            .filter(|p| p.len() > 1)
            .and_then(|p| PackedMatrix::stack(&p).ok())
        {
            Some(stacked) => Projections::Stacked {
                weight: Arc::new(stacked),
                parts: parts
                    .into_iter()
                    .map(|p| (p.name, p.out_features, p.bias))
                    .collect(),
            },
            None => Projections::Separate(parts),
        }
    }

    /// `outs[i] = x · W_iᵀ (+ b_i)` for every projection `i` (row `r` of `x` quantized at
    /// `precision[r]`).
    pub fn forward_into(
        &self,
        x: &[f32],
        precision: &[Precision],
        scratch: &mut Scratch,
        outs: &mut [Vec<f32>],
    ) -> Result<()> {
        let m = precision.len();
        let (stacked, parts) = match self {
            Projections::Separate(parts) => {
                for (part, out) in parts.iter().zip(outs.iter_mut()) {
                    part.forward_into(x, precision, scratch, out)?;
                }
                return Ok(());
            }
            Projections::Stacked { weight, parts } => (weight, parts),
        };
        let ctx = || {
            let names: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
            format!("{names:?} forward")
        };
        scratch
            .q8
            .quantize_rows(x, m, stacked.cols(), |i| precision[i])
            .ctx(ctx)?;
        // Each part's results go straight to its own buffer; every element is written, so a
        // buffer of the right length needs no clearing.
        let widths: Vec<usize> = parts.iter().map(|p| p.1).collect();
        let mut dsts: Vec<&mut [f32]> = outs
            .iter_mut()
            .zip(&widths)
            .map(|(out, w)| {
                out.resize(m * w, 0.0);
                out.as_mut_slice()
            })
            .collect();
        stacked
            .matmul_quantized_parts(&scratch.q8, &mut dsts, &widths)
            .ctx(ctx)?;
        for ((_, _, bias), out) in parts.iter().zip(outs.iter_mut()) {
            if let Some(b) = bias {
                add_bias(out, b);
            }
        }
        Ok(())
    }
}

/// Adds `bias` to every row of `out` (rows of `bias.len()` values).
fn add_bias(out: &mut [f32], bias: &[f32]) {
    for row in out.chunks_exact_mut(bias.len().max(1)) {
        row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
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

    /// `[tokens.len(), hidden]`.
    pub fn forward(&self, tokens: &[u32]) -> Result<Hidden> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(WorkerError::Step(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab
            )));
        }
        let ctx = || "token embedding".to_string();
        let data = match &self.table {
            Weight::Dense(t) => Tensor::new(tokens, &Device::Cpu)
                .and_then(|ids| t.index_select(&ids, 0))
                .and_then(|e| e.to_dtype(DType::F32))
                .and_then(|e| e.flatten_all())
                .and_then(|e| e.to_vec1::<f32>())
                .ctx(ctx)?,
            Weight::Matrix(w) => {
                let mut out = vec![0f32; tokens.len() * self.hidden];
                for (t, row) in tokens.iter().zip(out.chunks_exact_mut(self.hidden)) {
                    w.dequantize_row(*t as usize, row).ctx(ctx)?;
                }
                out
            }
        };
        Hidden::new(tokens.len(), self.hidden, data)
    }
}

/// Root-mean-square layer norm.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

/// Values from which [`RmsNorm::forward_into`] splits its rows among threads.
const PARALLEL_MIN_VALUES: usize = 1 << 15;

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: weight.to_vec1::<f32>().ctx(|| "norm weight".into())?,
            eps: eps as f32,
        })
    }

    /// The norm's weights.
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    /// `out = x / sqrt(mean(x²) + eps) · w`, row by row (`x` holds whole rows).
    pub fn forward_into(&self, x: &[f32], out: &mut Vec<f32>) {
        let dim = self.weight.len().max(1);
        let rows = x.len() / dim;
        // Every row is written below: no clearing.
        out.resize(rows * dim, 0.0);
        let norm = |(row, out): (&[f32], &mut [f32])| {
            // Eight partial sums: a fixed order, and no single dependency chain.
            let mut lanes = [0f32; 8];
            let (chunks, tail) = row.as_chunks::<8>();
            for c in chunks {
                for (l, v) in lanes.iter_mut().zip(c) {
                    *l += v * v;
                }
            }
            let sum2 = lanes.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>();
            let scale = 1.0 / (sum2 / dim as f32 + self.eps).sqrt();
            for ((o, v), w) in out.iter_mut().zip(row).zip(&self.weight) {
                *o = v * scale * w;
            }
        };
        // A prefill's rows in parallel (each row's arithmetic is its own).
        let x = &x[..rows * dim];
        let rows_per_task = strata_kernels::pool::rows_per_task(rows, dim, PARALLEL_MIN_VALUES);
        if rows_per_task < rows {
            x.par_chunks(rows_per_task * dim)
                .zip(out.par_chunks_mut(rows_per_task * dim))
                .for_each(|(x, out)| {
                    x.chunks_exact(dim)
                        .zip(out.chunks_exact_mut(dim))
                        .for_each(norm)
                });
        } else {
            x.chunks_exact(dim)
                .zip(out.chunks_exact_mut(dim))
                .for_each(norm);
        }
    }
}

/// Rotary position embedding (Hugging Face's rotate-half layout).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    max_positions: usize,
}

/// The cos and sin rows of a batch's positions, `[positions][head_dim / 2]` each.
#[derive(Debug, Clone, Default)]
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
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
    pub fn tables(&self, positions: &[u32]) -> Result<RopeTables> {
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
        Ok(RopeTables { cos, sin, half })
    }

    /// Rotates `x` (`[rows][heads][2 · half]`, one row per position of `t`) in place.
    pub fn apply(x: &mut [f32], heads: usize, t: &RopeTables) {
        let half = t.half;
        let width = heads * 2 * half;
        if width == 0 {
            return;
        }
        // The rows of `x` with their cos and sin rows.
        let rotate = |x: &mut [f32], cos: &[f32], sin: &[f32]| {
            let rows = x.chunks_exact_mut(width);
            for ((row, cos), sin) in rows.zip(cos.chunks_exact(half)).zip(sin.chunks_exact(half)) {
                for head in row.chunks_exact_mut(2 * half) {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x0, x1) = (a[i], b[i]);
                        a[i] = x0 * cos[i] - x1 * sin[i];
                        b[i] = x0 * sin[i] + x1 * cos[i];
                    }
                }
            }
        };
        // A prefill's rows in parallel (each row's arithmetic is its own).
        let rows = x.len() / width;
        let rows_per_task = strata_kernels::pool::rows_per_task(rows, width, PARALLEL_MIN_VALUES);
        if rows_per_task < rows {
            x.par_chunks_mut(rows_per_task * width)
                .zip(t.cos.par_chunks(rows_per_task * half))
                .zip(t.sin.par_chunks(rows_per_task * half))
                .for_each(|((x, cos), sin)| rotate(x, cos, sin));
        } else {
            rotate(x, &t.cos, &t.sin);
        }
    }
}

/// `x[i] += y[i]` (a residual connection), split among the compute threads when long: each
/// element's sum is its own.
pub fn add_residual(x: &mut [f32], y: &[f32]) {
    let add = |x: &mut [f32], y: &[f32]| x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
    let chunk = strata_kernels::pool::rows_per_task(x.len(), 1, PARALLEL_MIN_VALUES);
    if chunk < x.len() {
        x.par_chunks_mut(chunk)
            .zip(y.par_chunks(chunk))
            .for_each(|(x, y)| add(x, y));
    } else {
        add(x, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotary embeddings and residual sums of many rows (split among threads) give each row the
    /// bits it has alone.
    #[test]
    fn rope_and_residuals_of_many_rows_are_each_row_alone() {
        let (heads, half) = (3, 8);
        let width = heads * 2 * half;
        let rows = PARALLEL_MIN_VALUES / width + 41;
        let value = |i: usize| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0;
        let tables = RopeTables {
            cos: (0..rows * half).map(|i| value(i + 5).cos()).collect(),
            sin: (0..rows * half).map(|i| value(i + 5).sin()).collect(),
            half,
        };
        let x: Vec<f32> = (0..rows * width).map(value).collect();
        let mut all = x.clone();
        Rope::apply(&mut all, heads, &tables);
        let mut residual = all.clone();
        add_residual(&mut residual, &x);
        for r in 0..rows {
            let one = RopeTables {
                cos: tables.cos[r * half..(r + 1) * half].to_vec(),
                sin: tables.sin[r * half..(r + 1) * half].to_vec(),
                half,
            };
            let row = r * width..(r + 1) * width;
            let mut alone = x[row.clone()].to_vec();
            Rope::apply(&mut alone, heads, &one);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&all[row.clone()]), bits(&alone), "row {r}");
            let sums: Vec<f32> = alone
                .iter()
                .zip(&x[row.clone()])
                .map(|(a, b)| a + b)
                .collect();
            assert_eq!(bits(&residual[row]), bits(&sums), "row {r}");
        }
    }

    /// Many rows, normed together (split among threads), give each row the bits it has alone.
    #[test]
    fn rms_norm_of_many_rows_is_each_row_alone() {
        let dim = 96;
        let weight: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let norm = RmsNorm {
            weight: weight.clone(),
            eps: 1e-5,
        };
        let rows = PARALLEL_MIN_VALUES / dim + 37;
        let x: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
            .collect();
        let mut all = Vec::new();
        norm.forward_into(&x, &mut all);
        assert_eq!(all.len(), rows * dim);
        let mut one = Vec::new();
        for (r, row) in x.chunks_exact(dim).enumerate() {
            norm.forward_into(row, &mut one);
            assert_eq!(one, all[r * dim..][..dim], "row {r}");
        }
    }
}
