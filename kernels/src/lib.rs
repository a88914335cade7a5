//! Strata's own compute kernels.
//!
//! - [`hqq`]: Half-Quadratic Quantization of weight matrices (4 and 8 bit, group-wise) and
//!   matrix products against the quantized weights;
//! - [`dense`]: weights kept in f32, f16 or bf16, and matrix products against them;
//! - [`fp8`]: FP8 E4M3 weights with one scale per row, and matrix products against them;
//! - [`ggml`]: weights in GGML block formats (`Q4_0` … `Q8_K`), and matrix products of f32
//!   activations against them;
//! - [`int8`]: products of int8-quantized activations against weights repacked into 16-row
//!   tiles (GGML block types, k-quants, HQQ);
//! - [`attention`]: causal attention over a paged KV cache;
//! - [`math`]: vectorized `exp`, SiLU-gated products, log-sum-exp;
//! - [`cpu`]: the SIMD level picked at run time;
//! - `huge` (Linux): packed weights on transparent huge pages, and what a load leaves of them
//!   unused given back;
//! - `cuda` (with the `cuda` feature): NVIDIA devices through cudarc, loaded at run time, and
//!   weight matrices in device memory behind the same [`QuantMatrix`] interface;
//! - `nccl` (with the `cuda` feature): NCCL hops, activations device to device between GPU
//!   workers.
//!
//! Every kernel has a portable scalar implementation and, on x86-64, AVX2 and AVX-512 versions
//! chosen once per process by runtime CPU detection. Kernels validate their inputs and report
//! problems as [`KernelError`]; no input makes them panic. Results are deterministic: an output
//! element is always computed by one task, in a fixed order, whatever the thread count or batch
//! size.

pub mod attention;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dense;
pub mod error;
pub mod fp8;
pub mod ggml;
pub mod hqq;
#[cfg(target_os = "linux")]
pub mod huge;
pub mod int8;
pub mod math;
pub mod matrix;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod pool;

mod aligned;
mod columns;
mod prefetch;
mod rowwise;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod test_util;

pub use error::KernelError;
pub use matrix::QuantMatrix;
