//! Turning a stored tensor into what a layer runs: read only its bytes, un-permute GGUF q/k
//! rows, then keep it as stored, convert it to a float type, or quantize it (ISQ) — one tensor
//! at a time, so that full-precision copies of a single tensor are all a load ever holds beside
//! the weights already loaded.

use std::borrow::Cow;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use strata_kernels::QuantMatrix;
use strata_kernels::dense::{DenseData, DenseMatrix};
use strata_kernels::ggml::BlockType;
use strata_kernels::int8;
use strata_shared::ggml::GgmlType;
use strata_shared::isq::IsqType;
use strata_shared::meta::{ModelMeta, TensorMeta};
use strata_shared::names::{LayerTensor, TensorRole};
use strata_shared::plan::FloatType;

use crate::error::{CandleContext, Result, WorkerError};

/// A weight matrix (or vector) in the form a layer runs it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A float tensor (f32, f16 or bf16), run with candle.
    Dense(Tensor),
    /// A quantized matrix (GGML block types, k-quants, HQQ, FP8), run with Strata's kernels.
    Matrix(Arc<dyn QuantMatrix>),
}

impl Weight {
    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Matrix(w) => w.storage_bytes(),
        }
    }

    /// The form Strata's kernels run: a 2-D float tensor becomes a [`DenseMatrix`] (f32, f16
    /// and bf16 keep their values; another float type widens to f32); anything else stays.
    pub fn into_kernel_form(self, name: &str) -> Result<Weight> {
        let Weight::Dense(t) = self else {
            return Ok(self);
        };
        let ctx = || format!("`{name}`");
        let (rows, cols) = match t.dims() {
            [r, c] => (*r, *c),
            _ => return Ok(Weight::Dense(t)),
        };
        let flat = t.flatten_all().ctx(ctx)?;
        drop(t);
        let data = match flat.dtype() {
            DType::F16 => DenseData::F16(flat.to_vec1::<half::f16>().ctx(ctx)?),
            DType::BF16 => DenseData::Bf16(flat.to_vec1::<half::bf16>().ctx(ctx)?),
            _ => DenseData::F32(
                flat.to_dtype(DType::F32)
                    .and_then(|t| t.to_vec1::<f32>())
                    .ctx(ctx)?,
            ),
        };
        // The matrix copies the values to where products stream them from (huge pages): two
        // copies at a time at most, as `to_vec1` made.
        drop(flat);
        let matrix = DenseMatrix::new(rows, cols, data).ctx(ctx)?;
        Ok(Weight::Matrix(Arc::new(matrix)))
    }

    /// A short description for logs (`Q4_1`, `HQQ4`, `f32`).
    pub fn kind(&self) -> String {
        match self {
            Weight::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Weight::Matrix(w) => w.format(),
        }
    }
}

/// How to load one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadSpec {
    pub isq: Option<IsqType>,
    pub dtype: Option<FloatType>,
    /// Un-permute llama.cpp's q/k row order for this many heads.
    pub unpermute_heads: Option<usize>,
}

/// The head count to un-permute a stored tensor with: GGUF `llama` q/k weights are stored in
/// llama.cpp's interleaved-RoPE row order.
pub fn unpermute_heads(meta: &ModelMeta, role: TensorRole) -> Option<usize> {
    match (meta.qk_permuted, role) {
        (true, TensorRole::Layer(_, LayerTensor::QProj)) => Some(meta.config.num_heads),
        (true, TensorRole::Layer(_, LayerTensor::KProj)) => Some(meta.config.num_kv_heads),
        _ => None,
    }
}

/// Reads the tensor's bytes (and nothing else) from its file, 8-byte aligned.
fn read_bytes(meta: &TensorMeta) -> Result<Vec<u64>> {
    let n = usize::try_from(meta.n_bytes)
        .map_err(|_| tensor_err(meta, "too large for this platform"))?;
    let mut buf = vec![0u64; n.div_ceil(8)];
    let file = std::fs::File::open(&meta.file)
        .map_err(|e| tensor_err(meta, format!("cannot open: {e}")))?;
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
    file.read_exact_at(&mut bytes[..n], meta.offset)
        .map_err(|e| {
            tensor_err(
                meta,
                format!("cannot read {n} bytes at offset {}: {e}", meta.offset),
            )
        })?;
    Ok(buf)
}

fn tensor_err(meta: &TensorMeta, problem: impl Into<String>) -> WorkerError {
    WorkerError::Tensor {
        file: meta.file.clone(),
        tensor: meta.stored_name.clone(),
        problem: problem.into(),
    }
}

fn to_candle_ggml(t: GgmlType) -> GgmlDType {
    match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q8_1 => GgmlDType::Q8_1,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Q8K => GgmlDType::Q8K,
    }
}

fn float_dtype(f: FloatType) -> DType {
    match f {
        FloatType::F32 => DType::F32,
        FloatType::F16 => DType::F16,
        FloatType::BF16 => DType::BF16,
    }
}

/// Reorders whole rows from llama.cpp's interleaved-RoPE order back to Hugging Face's: GGUF row
/// `h*d + 2i + j` holds Hugging Face row `h*d + j*d/2 + i`. Rows are independent in every
/// storage type (blocks never cross rows), so this works on raw bytes.
fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Option<Vec<u8>> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || !bytes.len().is_multiple_of(rows)
    {
        return None;
    }
    let d = rows / heads;
    let row_bytes = bytes.len() / rows;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * (d / 2) + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Some(out)
}

/// The stored tensor: floats as a candle tensor, GGML blocks as aligned raw bytes.
enum Source {
    Float(Tensor),
    Packed {
        dtype: GgmlType,
        aligned: Vec<u64>,
        bytes: usize,
    },
}

fn read_source(meta: &TensorMeta, spec: &LoadSpec) -> Result<Source> {
    let mut buf = read_bytes(meta)?;
    let n = meta.n_bytes as usize;
    if let Some(heads) = spec.unpermute_heads {
        let rows = meta.shape.first().copied().unwrap_or(0);
        let all: &[u8] = bytemuck::cast_slice(&buf);
        let out = unpermute_rows(&all[..n], rows, heads).ok_or_else(|| {
            tensor_err(
                meta,
                format!("{rows} rows do not split into {heads} heads of even size"),
            )
        })?;
        bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..n].copy_from_slice(&out);
    }
    let ctx = || format!("{}: tensor `{}`", meta.file.display(), meta.stored_name);
    let float = |dtype| {
        let all: &[u8] = bytemuck::cast_slice(&buf);
        Tensor::from_raw_buffer(&all[..n], dtype, &meta.shape, &Device::Cpu).ctx(ctx)
    };
    Ok(match meta.dtype {
        GgmlType::F32 => Source::Float(float(DType::F32)?),
        GgmlType::F16 => Source::Float(float(DType::F16)?),
        GgmlType::BF16 => Source::Float(float(DType::BF16)?),
        q => Source::Packed {
            dtype: q,
            aligned: buf,
            bytes: n,
        },
    })
}

/// The GGML block type of Strata's f32-activation kernels, if `t` is one.
fn block_type(t: GgmlType) -> Option<BlockType> {
    Some(match t {
        GgmlType::Q4_0 => BlockType::Q4_0,
        GgmlType::Q4_1 => BlockType::Q4_1,
        GgmlType::Q5_0 => BlockType::Q5_0,
        GgmlType::Q5_1 => BlockType::Q5_1,
        GgmlType::Q8_0 => BlockType::Q8_0,
        GgmlType::Q8_1 => BlockType::Q8_1,
        GgmlType::Q8K => BlockType::Q8K,
        _ => return None,
    })
}

/// Packs GGML block bytes of a `[rows, cols]` tensor into the weight form that runs them.
fn packed_weight(
    meta: &TensorMeta,
    dtype: GgmlType,
    aligned: Vec<u64>,
    bytes: usize,
) -> Result<Weight> {
    let (rows, cols) = match meta.shape.as_slice() {
        [r, c] => (*r, *c),
        [c] => (1, *c),
        s => {
            return Err(tensor_err(
                meta,
                format!("a {dtype} tensor of shape {s:?} is not a matrix"),
            ));
        }
    };
    if let Some(bt) = block_type(dtype) {
        let raw: &[u8] = bytemuck::cast_slice::<u64, u8>(&aligned);
        let data = raw
            .get(..bytes)
            .ok_or_else(|| tensor_err(meta, format!("{bytes} bytes were not read")))?;
        let w = int8::from_ggml_blocks(bt, rows, cols, data)
            .ctx(|| format!("{}: tensor `{}`", meta.file.display(), meta.stored_name))?;
        return Ok(Weight::Matrix(Arc::new(w)));
    }
    let kind = match dtype {
        GgmlType::Q2K => int8::KQuant::Q2K,
        GgmlType::Q3K => int8::KQuant::Q3K,
        GgmlType::Q4K => int8::KQuant::Q4K,
        GgmlType::Q5K => int8::KQuant::Q5K,
        GgmlType::Q6K => int8::KQuant::Q6K,
        _ => {
            return Err(tensor_err(
                meta,
                format!("{dtype} is not a block-quantized type"),
            ));
        }
    };
    let raw: &[u8] = bytemuck::cast_slice::<u64, u8>(&aligned);
    let data = raw
        .get(..bytes)
        .ok_or_else(|| tensor_err(meta, format!("{bytes} bytes were not read")))?;
    let w = int8::from_kquant_blocks(kind, rows, cols, data)
        .ctx(|| format!("{}: tensor `{}`", meta.file.display(), meta.stored_name))?;
    Ok(Weight::Matrix(Arc::new(w)))
}

impl Source {
    fn to_f32(&self, meta: &TensorMeta) -> Result<Tensor> {
        let ctx = || format!("{}: tensor `{}`", meta.file.display(), meta.stored_name);
        match self {
            Source::Float(t) => t.to_dtype(DType::F32).ctx(ctx),
            Source::Packed {
                dtype,
                aligned,
                bytes,
            } => {
                let raw: &[u8] = &bytemuck::cast_slice(aligned)[..*bytes];
                let v = match to_candle_ggml(*dtype)
                    .from_data(Cow::Borrowed(raw))
                    .dequantize(meta.numel())
                    .ctx(ctx)?
                {
                    candle_core::CpuStorage::F32(v) => v,
                    _ => return Err(tensor_err(meta, "did not dequantize to f32")),
                };
                Tensor::from_vec(v, meta.shape.as_slice(), &Device::Cpu).ctx(ctx)
            }
        }
    }
}

/// Nanoseconds this process has spent in in-situ quantization.
static ISQ_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Seconds this process has spent in in-situ quantization (what the worker's metrics report).
pub fn isq_seconds() -> f64 {
    ISQ_NANOS.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9
}

/// Loads one tensor as `spec` says.
pub fn load(meta: &TensorMeta, spec: &LoadSpec) -> Result<Weight> {
    load_weighted(meta, spec, None)
}

/// [`load`], with per-input-channel importance for the k-quant search (llama.cpp's imatrix).
pub fn load_weighted(
    meta: &TensorMeta,
    spec: &LoadSpec,
    importance: Option<&[f32]>,
) -> Result<Weight> {
    let src = read_source(meta, spec)?;
    let ctx = || format!("{}: tensor `{}`", meta.file.display(), meta.stored_name);
    match (spec.isq, spec.dtype) {
        (Some(isq), _) => {
            let (rows, cols) = match meta.shape.as_slice() {
                [r, c] => (*r, *c),
                s => {
                    return Err(tensor_err(
                        meta,
                        format!("ISQ needs a 2-D weight, this one has shape {s:?}"),
                    ));
                }
            };
            let f32s = src.to_f32(meta)?;
            drop(src);
            let data = f32s
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .ctx(ctx)?;
            drop(f32s);
            let started = std::time::Instant::now();
            let quantized = quantize(meta, &data, rows, cols, isq, importance);
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            ISQ_NANOS.fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
            quantized
        }
        (None, Some(f)) => Ok(Weight::Dense(
            src.to_f32(meta)?.to_dtype(float_dtype(f)).ctx(ctx)?,
        )),
        (None, None) => match src {
            Source::Float(t) => Ok(Weight::Dense(t)),
            Source::Packed {
                dtype,
                aligned,
                bytes,
            } => packed_weight(meta, dtype, aligned, bytes),
        },
    }
}

/// Loads a 1-D tensor (a norm weight or a bias) as f32.
/// Writes every tensor of a model, converted to `dtype` in the Hugging Face layout (llama.cpp's
/// q/k row order undone), under its canonical name as one safetensors file: the weights a
/// Hugging Face checkpoint of the same model holds (what tests load as a full-precision source).
pub fn export_safetensors(
    meta: &ModelMeta,
    dtype: FloatType,
    path: &std::path::Path,
) -> Result<()> {
    let mut tensors = std::collections::HashMap::new();
    for (role, t) in &meta.tensors {
        let spec = LoadSpec {
            dtype: Some(dtype),
            unpermute_heads: unpermute_heads(meta, *role),
            ..LoadSpec::default()
        };
        match load(t, &spec)? {
            Weight::Dense(w) => {
                tensors.insert(t.name.clone(), w);
            }
            Weight::Matrix(_) => {
                return Err(WorkerError::Load(format!(
                    "{}: `{}` did not convert to {}",
                    meta.files.spec,
                    t.name,
                    dtype.name()
                )));
            }
        }
    }
    candle_core::safetensors::save(&tensors, path).ctx(|| format!("writing {}", path.display()))
}

pub fn load_vector_f32(meta: &TensorMeta) -> Result<Tensor> {
    read_source(meta, &LoadSpec::default())?.to_f32(meta)
}

/// Quantizes a row-major `[rows, cols]` f32 matrix to `isq`, using every core.
pub fn quantize(
    meta: &TensorMeta,
    data: &[f32],
    rows: usize,
    cols: usize,
    isq: IsqType,
    importance: Option<&[f32]>,
) -> Result<Weight> {
    let ctx = || {
        format!(
            "{}: tensor `{}`: quantizing to {isq}",
            meta.file.display(),
            meta.stored_name
        )
    };
    if !isq.fits(cols) {
        return Err(tensor_err(
            meta,
            format!(
                "{cols}-wide rows do not split into {isq} blocks of {}",
                isq.block_size()
            ),
        ));
    }
    match isq {
        IsqType::Hqq4 | IsqType::Hqq8 => {
            let bits = if isq == IsqType::Hqq4 { 4 } else { 8 };
            let w =
                strata_kernels::hqq::quantize(data, rows, cols, bits, isq.block_size()).ctx(ctx)?;
            // Int8 tiles where the groups split into their blocks (every HQQ group size here).
            match int8::from_hqq(&w) {
                Ok(packed) => Ok(Weight::Matrix(Arc::new(packed))),
                Err(_) => Ok(Weight::Matrix(Arc::new(w))),
            }
        }
        IsqType::Fp8 => Ok(Weight::Matrix(Arc::new(
            strata_kernels::fp8::quantize(data, rows, cols).ctx(ctx)?,
        ))),
        _ => {
            let dtype = isq
                .ggml()
                .map(to_candle_ggml)
                .ok_or_else(|| tensor_err(meta, format!("{isq} is not a GGML type")))?;
            // Rows quantize independently: split into chunks, quantize in parallel, concatenate.
            let chunk_rows = strata_kernels::pool::rows_per_task(rows, cols, 0);
            let ones = vec![1f32; cols];
            let weights = match importance {
                Some(w) if w.len() == cols => w,
                _ => &ones,
            };
            let parts: Vec<Vec<u8>> = data
                .par_chunks(chunk_rows * cols)
                .map(|chunk| {
                    let t = Tensor::from_slice(chunk, (chunk.len() / cols, cols), &Device::Cpu)?;
                    // The 2-6 bit k-quants take llama.cpp's importance-weighted search (uniform
                    // importance when none is known): lower error than the plain search on every
                    // model we measured.
                    let q = if isq.takes_importance() {
                        QTensor::quantize_imatrix(&t, weights, dtype)?
                    } else {
                        QTensor::quantize(&t, dtype)?
                    };
                    Ok(q.data()?.into_owned())
                })
                .collect::<candle_core::Result<_>>()
                .ctx(ctx)?;
            let bytes: usize = parts.iter().map(Vec::len).sum();
            let mut aligned = vec![0u64; bytes.div_ceil(8)];
            let mut at = 0;
            for p in parts {
                bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[at..at + p.len()]
                    .copy_from_slice(&p);
                at += p.len();
            }
            let gt = isq
                .ggml()
                .ok_or_else(|| tensor_err(meta, format!("{isq} is not a GGML type")))?;
            packed_weight(meta, gt, aligned, bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // 2 heads of size 4, rows of one byte each: llama.cpp's permute of HF rows 0..8.
        let heads = 2;
        let d = 4;
        let hf: Vec<u8> = (0..8).collect();
        let mut gguf = vec![0u8; 8];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    gguf[h * d + 2 * i + j] = hf[h * d + j * (d / 2) + i];
                }
            }
        }
        assert_eq!(gguf, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(unpermute_rows(&gguf, 8, heads).unwrap(), hf);
        assert!(unpermute_rows(&gguf, 8, 3).is_none());
    }

    /// The GGML block geometry lives in three tables: `strata-shared` sizes tensors from file
    /// headers, `strata-kernels` runs the blocks, candle runs the k-quants. They must agree.
    #[test]
    fn the_ggml_block_tables_agree() {
        for t in GgmlType::ALL {
            let geometry = (t.block_size(), t.block_bytes());
            let c = to_candle_ggml(t);
            assert_eq!(
                geometry,
                (c.block_size(), c.type_size()),
                "{t}: shared vs candle"
            );
            if let Some(b) = block_type(t) {
                assert_eq!(
                    geometry,
                    (b.block_size(), b.block_bytes()),
                    "{t}: shared vs kernels"
                );
            }
        }
    }
}
