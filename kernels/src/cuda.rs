//! NVIDIA GPUs through cudarc, loaded at run time: a binary built with the `cuda` feature needs
//! no CUDA toolkit to build and starts on a machine without a GPU; it says so when a topology
//! asks for one.
//!
//! - [`CudaDevice::open`]: one device, its context, stream and cuBLAS handle, with every way it
//!   can be missing turned into a [`KernelError::Device`] that names the device and the cause;
//! - [`CudaMatrix`]: a weight matrix in device memory (f16), whose products run with cuBLAS
//!   (f16 inputs, f32 accumulation and output) behind the same [`QuantMatrix`] interface as
//!   the CPU kernels.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, result as blas_result, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use half::f16;

use crate::KernelError;
use crate::matrix::{QuantMatrix, check_len, check_matmul};

/// What a device is: shown in `ModelInfo` and in the worker's logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The driver's name for it (`NVIDIA H200`).
    pub name: String,
    /// Device memory in bytes.
    pub total_memory: u64,
    /// Free device memory in bytes when it was opened.
    pub free_memory: u64,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Whether the NCCL library can be loaded on this machine.
    pub nccl: bool,
}

/// Whether the CUDA driver library (`libcuda.so`) can be loaded here.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NCCL library (`libnccl.so`) can be loaded here.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// Whether the cuBLAS library (`libcublas.so`) can be loaded here.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

fn device_error(ordinal: usize, what: &str, e: impl fmt::Display) -> KernelError {
    KernelError::Device(format!("cuda[{ordinal}]: {what}: {e}"))
}

/// The number of CUDA devices the driver sees.
///
/// # Errors
///
/// [`KernelError::Device`] when there is no driver or it fails to initialize.
pub fn device_count() -> Result<usize, KernelError> {
    if !driver_present() {
        return Err(KernelError::Device(
            "no NVIDIA driver on this machine: libcuda.so cannot be loaded (install the driver, or put its directory on LD_LIBRARY_PATH)".into(),
        ));
    }
    let n = CudaContext::device_count()
        .map_err(|e| KernelError::Device(format!("the CUDA driver does not initialize: {e}")))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// One CUDA device: its stream and cuBLAS handle. Products on it run one at a time, in the
/// order they are called.
pub struct CudaDevice {
    ordinal: usize,
    stream: Arc<CudaStream>,
    blas: Mutex<CudaBlas>,
    info: DeviceInfo,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("info", &self.info)
            .finish()
    }
}

impl CudaDevice {
    /// Opens `cuda[ordinal]`.
    ///
    /// # Errors
    ///
    /// [`KernelError::Device`], saying which: no driver, no such device (with how many there
    /// are), no cuBLAS, or the driver's own error.
    pub fn open(ordinal: usize) -> Result<Arc<Self>, KernelError> {
        let count =
            device_count().map_err(|e| KernelError::Device(format!("cuda[{ordinal}]: {e}")))?;
        if ordinal >= count {
            let have = match count {
                0 => "no CUDA device".to_string(),
                1 => "one CUDA device, cuda[0]".to_string(),
                n => format!("{n} CUDA devices, cuda[0] to cuda[{}]", n - 1),
            };
            return Err(KernelError::Device(format!(
                "cuda[{ordinal}]: this machine has {have}"
            )));
        }
        if !cublas_present() {
            return Err(KernelError::Device(format!(
                "cuda[{ordinal}]: libcublas.so cannot be loaded (install the CUDA runtime libraries, or put their directory on LD_LIBRARY_PATH)"
            )));
        }
        let driver = |what: &'static str| move |e: DriverError| device_error(ordinal, what, e);
        let ctx = CudaContext::new(ordinal).map_err(driver("cannot create a context"))?;
        let name = ctx.name().map_err(driver("cannot read its name"))?;
        let total_memory = ctx.total_mem().map_err(driver("cannot read its memory"))? as u64;
        let (free, _) = ctx
            .mem_get_info()
            .map_err(driver("cannot read its free memory"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(driver("cannot read its compute capability"))?;
        let stream = ctx.new_stream().map_err(driver("cannot create a stream"))?;
        let blas = CudaBlas::new(Arc::clone(&stream))
            .map_err(|e| device_error(ordinal, "cannot create a cuBLAS handle", e))?;
        Ok(Arc::new(CudaDevice {
            ordinal,
            stream,
            blas: Mutex::new(blas),
            info: DeviceInfo {
                name,
                total_memory,
                free_memory: free as u64,
                compute_capability,
                nccl: nccl_present(),
            },
        }))
    }

    /// Its ordinal, N of `cuda[N]`.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// A new stream on the device's context (an NCCL hop's, beside the products' own).
    pub(crate) fn new_stream(&self) -> Result<Arc<CudaStream>, DriverError> {
        self.stream.context().new_stream()
    }

    /// What it is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn error(&self, what: &str, e: impl fmt::Display) -> KernelError {
        device_error(self.ordinal, what, e)
    }
}

/// Rows dequantized and uploaded at a time: bounds the host copy a load needs.
const UPLOAD_ROWS: usize = 1024;

/// A `[rows, cols]` weight matrix in device memory, f16, row-major. Products upload the
/// activations as f16 and run one cuBLAS GEMM with f32 accumulation and f32 output.
pub struct CudaMatrix {
    device: Arc<CudaDevice>,
    rows: usize,
    cols: usize,
    /// The format it was made from (`Q4_1`, `f32`).
    source: String,
    weight: CudaSlice<f16>,
}

impl fmt::Debug for CudaMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaMatrix")
            .field("device", &self.device.ordinal)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("source", &self.source)
            .finish()
    }
}

fn to_c_int(what: &str, n: usize) -> Result<i32, KernelError> {
    i32::try_from(n).map_err(|_| {
        KernelError::InvalidShape(format!("{what} {n} is too large for a cuBLAS product"))
    })
}

impl CudaMatrix {
    /// Uploads `source`, dequantized to f16 a chunk of rows at a time.
    ///
    /// # Errors
    ///
    /// [`KernelError::Device`] when the device cannot hold it or a copy fails.
    pub fn upload(device: &Arc<CudaDevice>, source: &dyn QuantMatrix) -> Result<Self, KernelError> {
        let (rows, cols) = (source.rows(), source.cols());
        Self::build(device, rows, cols, source.format(), |row, out| {
            source.dequantize_row(row, out)
        })
    }

    /// Uploads a row-major f32 matrix.
    ///
    /// # Errors
    ///
    /// [`KernelError::LengthMismatch`] when `data` is not `rows * cols` long;
    /// [`KernelError::Device`] when the device cannot hold it or a copy fails.
    pub fn from_f32(
        device: &Arc<CudaDevice>,
        rows: usize,
        cols: usize,
        format: &str,
        data: &[f32],
    ) -> Result<Self, KernelError> {
        check_len("matrix", data.len(), rows.saturating_mul(cols))?;
        Self::build(device, rows, cols, format.to_string(), |row, out| {
            out.copy_from_slice(&data[row * cols..][..cols]);
            Ok(())
        })
    }

    fn build(
        device: &Arc<CudaDevice>,
        rows: usize,
        cols: usize,
        source: String,
        row_f32: impl Fn(usize, &mut [f32]) -> Result<(), KernelError>,
    ) -> Result<Self, KernelError> {
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| KernelError::InvalidShape(format!("{rows} × {cols} overflows")))?;
        to_c_int("rows", rows)?;
        to_c_int("columns", cols)?;
        let stream = &device.stream;
        let mut weight = stream
            .alloc_zeros::<f16>(len.max(1))
            .map_err(|e| device.error(&format!("cannot allocate {} bytes", len * 2), e))?;
        let mut row = vec![0f32; cols];
        let mut host: Vec<f16> = Vec::with_capacity(UPLOAD_ROWS.min(rows.max(1)) * cols);
        let mut start = 0;
        while start < rows {
            let end = (start + UPLOAD_ROWS).min(rows);
            host.clear();
            for r in start..end {
                row_f32(r, &mut row)?;
                host.extend(row.iter().map(|&v| f16::from_f32(v)));
            }
            let mut dst = weight.slice_mut(start * cols..end * cols);
            stream
                .memcpy_htod(host.as_slice(), &mut dst)
                .map_err(|e| device.error("cannot upload a weight", e))?;
            // The host buffer is refilled next: wait until the copy has read it.
            stream
                .synchronize()
                .map_err(|e| device.error("cannot upload a weight", e))?;
            start = end;
        }
        Ok(CudaMatrix {
            device: Arc::clone(device),
            rows,
            cols,
            source,
            weight,
        })
    }
}

impl QuantMatrix for CudaMatrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn storage_bytes(&self) -> usize {
        self.rows * self.cols * 2
    }

    fn format(&self) -> String {
        format!("{} as f16 on cuda[{}]", self.source, self.device.ordinal)
    }

    fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if row >= self.rows {
            return Err(KernelError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        check_len("row", out.len(), self.cols)?;
        let stream = &self.device.stream;
        let mut host = vec![f16::ZERO; self.cols];
        let src = self.weight.slice(row * self.cols..(row + 1) * self.cols);
        stream
            .memcpy_dtoh(&src, host.as_mut_slice())
            .and_then(|()| stream.synchronize())
            .map_err(|e| self.device.error("cannot read a weight row", e))?;
        out.iter_mut().zip(&host).for_each(|(o, h)| *o = h.to_f32());
        Ok(())
    }

    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        check_matmul(self.rows, self.cols, x, m, out)?;
        if m == 0 || self.rows == 0 {
            return Ok(());
        }
        let (rows, cols, n) = (
            to_c_int("rows", self.rows)?,
            to_c_int("columns", self.cols)?,
            to_c_int("activation rows", m)?,
        );
        let device = &self.device;
        let stream = &device.stream;
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let xd = stream
            .clone_htod(xh.as_slice())
            .map_err(|e| device.error("cannot upload activations", e))?;
        // SAFETY: uninitialized device memory of `out.len()` f32s, every one of which the GEMM
        // below writes (beta = 0: C is not read) before it is copied back.
        let mut yd = unsafe { stream.alloc::<f32>(out.len()) }
            .map_err(|e| device.error("cannot allocate a product's output", e))?;
        // cuBLAS runs on whatever context is current on the calling thread (a compute-pool
        // thread, not the one that opened the device).
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| device.error("cannot bind the device to this thread", e))?;
        {
            let blas = device
                .blas
                .lock()
                .map_err(|_| device.error("cuBLAS", "a product panicked"))?;
            let (alpha, beta) = (1f32, 0f32);
            let (w, _w_done) = self.weight.device_ptr(stream);
            let (xp, _x_done) = xd.device_ptr(stream);
            let (y, _y_done) = yd.device_ptr_mut(stream);
            // Column-major, as cuBLAS sees it: Y (rows × m) = Wᵀ' · X, where the row-major
            // weight [rows, cols] is a column-major cols × rows matrix (so op = transpose) and
            // the row-major activations [m, cols] a column-major cols × m matrix. Y's columns
            // are then the rows of `out`.
            // SAFETY: the three pointers are live device allocations of this stream with the
            // lengths the dimensions below imply (checked above), and alpha and beta outlive
            // the call, which reads them before returning (host pointer mode).
            unsafe {
                blas_result::gemm_ex(
                    *blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    rows,
                    n,
                    cols,
                    (&alpha as *const f32).cast::<c_void>(),
                    w as *const c_void,
                    blas_sys::cudaDataType_t::CUDA_R_16F,
                    cols,
                    xp as *const c_void,
                    blas_sys::cudaDataType_t::CUDA_R_16F,
                    cols,
                    (&beta as *const f32).cast::<c_void>(),
                    y as *mut c_void,
                    blas_sys::cudaDataType_t::CUDA_R_32F,
                    rows,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| device.error("cuBLAS product", e))?;
        }
        stream
            .memcpy_dtoh(&yd, out)
            .and_then(|()| stream.synchronize())
            .map_err(|e| device.error("cannot read a product's output", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without an NVIDIA driver (CI's), opening a device says so, names the
    /// device and the library, and does not panic. With a driver, a device past the last one
    /// names how many there are.
    #[test]
    fn opening_a_missing_device_says_what_is_missing() {
        let err = match CudaDevice::open(7) {
            Err(KernelError::Device(e)) => e,
            other => panic!("expected a device error, got {other:?}"),
        };
        assert!(err.starts_with("cuda[7]: "), "{err}");
        if driver_present() {
            assert!(
                err.contains("CUDA device") || err.contains("driver"),
                "{err}"
            );
        } else {
            assert!(
                err.contains("no NVIDIA driver on this machine: libcuda.so cannot be loaded"),
                "{err}"
            );
            assert!(matches!(device_count(), Err(KernelError::Device(_))));
        }
    }
}
