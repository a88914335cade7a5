//! Where a worker's weights live and its products run: the CPU, or (with the `cuda` feature) one
//! NVIDIA GPU. A stage's layers load as usual (quantized on the host, one tensor at a time, as
//! the topology says); [`Placement::place`] then moves each linear weight to its device.
//!
//! Architecture Invariant: a device the build or the machine cannot run is refused before any
//! weight loads, with a message that names the device and what is missing (the feature, the
//! driver, the library, the ordinal).

use strata_shared::device::DeviceSpec;

use crate::error::{Result, WorkerError};
use crate::weights::Weight;

/// The device of a worker's stages.
#[derive(Debug, Clone)]
pub enum Placement {
    /// Host memory, Strata's CPU kernels.
    Cpu,
    /// One GPU: linear weights in device memory as f16, products with cuBLAS.
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<strata_kernels::cuda::CudaDevice>),
}

/// What a device is, for `ModelInfo` and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceDescription {
    /// `NVIDIA H200`, or the CPU's model name.
    pub name: String,
    /// Its memory in bytes: the GPU's, or the machine's RAM.
    pub memory_bytes: u64,
}

/// Whether this build can run `cuda[N]` devices.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl Placement {
    /// Opens the device a load request names (`cpu[0]`, `cuda[1]`; empty means the CPU).
    ///
    /// # Errors
    ///
    /// [`WorkerError::Device`] for a device this build or this machine cannot run.
    pub fn open(device: &str) -> Result<Self> {
        if device.is_empty() {
            return Ok(Placement::Cpu);
        }
        let spec: DeviceSpec =
            device
                .parse()
                .map_err(|e: strata_shared::device::InvalidDevice| {
                    WorkerError::Device(e.to_string())
                })?;
        Self::open_spec(spec)
    }

    /// Opens `spec`.
    ///
    /// # Errors
    ///
    /// [`WorkerError::Device`] for a device this build or this machine cannot run.
    pub fn open_spec(spec: DeviceSpec) -> Result<Self> {
        match spec {
            DeviceSpec::Cpu(_) => Ok(Placement::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => {
                let device = strata_kernels::cuda::CudaDevice::open(n as usize)
                    .map_err(|e| WorkerError::Device(e.to_string()))?;
                let info = device.info();
                tracing::info!(
                    device = %spec,
                    name = %info.name,
                    memory = info.total_memory,
                    free = info.free_memory,
                    compute_capability = ?info.compute_capability,
                    nccl = info.nccl,
                    "GPU opened"
                );
                Ok(Placement::Cuda(device))
            }
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(WorkerError::Device(format!(
                "{spec}: this build runs CPU workers only; build with `cargo build --release --features cuda` for `cuda[N]` workers"
            ))),
            DeviceSpec::Metal(_) => Err(WorkerError::Device(format!(
                "{spec}: Metal devices are not supported; Strata runs `cpu[N]` and `cuda[N]` workers"
            ))),
        }
    }

    /// Moves a linear weight to this device (on the CPU: as it is).
    ///
    /// # Errors
    ///
    /// [`WorkerError::Device`] when the device cannot hold it.
    pub fn place(&self, name: &str, weight: Weight) -> Result<Weight> {
        match self {
            Placement::Cpu => {
                let _ = name;
                Ok(weight)
            }
            #[cfg(feature = "cuda")]
            Placement::Cuda(device) => cuda::place(device, name, weight),
        }
    }

    /// What the device is.
    pub fn describe(&self) -> DeviceDescription {
        match self {
            Placement::Cpu => DeviceDescription {
                name: cpu_model_name(),
                memory_bytes: total_ram(),
            },
            #[cfg(feature = "cuda")]
            Placement::Cuda(device) => DeviceDescription {
                name: device.info().name.clone(),
                memory_bytes: device.info().total_memory,
            },
        }
    }

    /// Whether it is a GPU.
    pub fn is_cuda(&self) -> bool {
        !matches!(self, Placement::Cpu)
    }

    /// Whether it can take part in NCCL hops: a GPU, with the NCCL library loadable.
    pub fn nccl(&self) -> bool {
        match self {
            Placement::Cpu => false,
            #[cfg(feature = "cuda")]
            Placement::Cuda(device) => device.info().nccl,
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::DType;
    use strata_kernels::cuda::{CudaDevice, CudaMatrix};

    use crate::error::{CandleContext, Result, WorkerError};
    use crate::weights::Weight;

    pub(super) fn place(device: &Arc<CudaDevice>, name: &str, weight: Weight) -> Result<Weight> {
        let on_device =
            |e: strata_kernels::KernelError| WorkerError::Device(format!("`{name}`: {e}"));
        let matrix = match &weight {
            Weight::Matrix(m) => CudaMatrix::upload(device, m.as_ref()).map_err(on_device)?,
            Weight::Dense(t) => {
                let (rows, cols) = t.dims2().ctx(|| format!("`{name}`"))?;
                let data = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .ctx(|| format!("`{name}`"))?;
                CudaMatrix::from_f32(device, rows, cols, &weight.kind(), &data)
                    .map_err(on_device)?
            }
        };
        Ok(Weight::Matrix(Arc::new(matrix)))
    }
}

/// The CPU's model name from `/proc/cpuinfo` (empty where it cannot be read).
fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|v| v.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// The machine's RAM from `/proc/meminfo` (0 where it cannot be read).
fn total_ram() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_described_and_places_weights_as_they_are() {
        let p = Placement::open("cpu[0]").unwrap();
        assert!(matches!(p, Placement::Cpu));
        assert!(matches!(Placement::open("").unwrap(), Placement::Cpu));
        let d = p.describe();
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(d.memory_bytes > 0, "{d:?}");
        }
    }

    /// A `cuda[N]` device on this build and machine: without the feature, the build says so;
    /// with it, on a machine without an NVIDIA driver (CI's), the driver is named.
    #[test]
    fn a_gpu_this_build_or_machine_lacks_is_refused_with_the_reason() {
        let err = match Placement::open("cuda[0]") {
            Err(e) => e.to_string(),
            Ok(p) => {
                // Only a cuda build on a machine with a GPU gets here.
                assert!(!p.describe().name.is_empty());
                return;
            }
        };
        assert!(err.starts_with("cuda[0]: "), "{err}");
        if CUDA_BUILT {
            assert!(
                err.contains("libcuda.so cannot be loaded") || err.contains("CUDA"),
                "{err}"
            );
        } else {
            assert!(err.contains("--features cuda"), "{err}");
        }
        let metal = Placement::open("metal[0]").unwrap_err().to_string();
        assert!(metal.contains("Metal devices are not supported"), "{metal}");
        let bad = Placement::open("gpu[0]").unwrap_err().to_string();
        assert!(bad.contains("invalid device `gpu[0]`"), "{bad}");
    }
}
