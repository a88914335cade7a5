//! The SIMD level the kernels run at, detected once per process.
//!
//! The workspace is compiled for x86-64-v3 (AVX2, FMA, F16C), but the kernels do not rely on
//! that: every SIMD path is selected by runtime detection, and a portable scalar path exists for
//! every kernel (and is the only one on other architectures).

use std::sync::OnceLock;

/// Proof that the CPU supports AVX2, FMA and F16C.
///
/// The only constructor runs the CPU detection, so holding a value is what makes calling the
/// `#[target_feature(enable = "avx2,fma,f16c")]` kernels sound.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The token, if this CPU supports AVX2, FMA and F16C.
    fn detect() -> Option<Self> {
        let ok = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        ok.then_some(Self(()))
    }
}

/// Proof that the CPU supports AVX-512F in addition to everything [`Avx2`] stands for.
///
/// As with [`Avx2`], the only constructor runs the CPU detection.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512(());

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// The token, if this CPU supports AVX-512F, AVX2, FMA and F16C.
    fn detect() -> Option<Self> {
        Avx2::detect()?;
        std::arch::is_x86_feature_detected!("avx512f").then_some(Self(()))
    }
}

/// Proof that the CPU has AVX-512 with byte/word instructions and VNNI (`vpdpbusd` on 512-bit
/// vectors), in addition to everything [`Avx2`] stands for.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512Vnni(());

#[cfg(target_arch = "x86_64")]
impl Avx512Vnni {
    fn detect() -> Option<Self> {
        Avx512::detect()?;
        (std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni"))
        .then_some(Self(()))
    }
}

/// Proof that the CPU has AVX-VNNI (`vpdpbusd` on 256-bit vectors, VEX-encoded: Intel since
/// Alder Lake, AMD since Zen 5) in addition to everything [`Avx2`] stands for.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AvxVnni(());

#[cfg(target_arch = "x86_64")]
impl AvxVnni {
    fn detect() -> Option<Self> {
        Avx2::detect()?;
        std::arch::is_x86_feature_detected!("avxvnni").then_some(Self(()))
    }
}

/// The instruction-set level of the int8 products (activations quantized to 8 bits), carrying
/// the proof that the CPU supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Int8Level {
    /// Portable Rust.
    Scalar,
    /// AVX2 byte products (`vpmaddubsw`, `vpmaddwd`).
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
    /// 256-bit VNNI.
    #[cfg(target_arch = "x86_64")]
    AvxVnni(AvxVnni),
    /// 512-bit VNNI.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni(Avx512Vnni),
}

impl Int8Level {
    /// The short name used in logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Int8Level::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            Int8Level::AvxVnni(_) => "avx-vnni",
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx512Vnni(_) => "avx512-vnni",
        }
    }
}

/// The best int8 level this CPU supports, detected on first use and cached for the process.
pub(crate) fn int8_level() -> Int8Level {
    static LEVEL: OnceLock<Int8Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(token) = Avx512Vnni::detect() {
                return Int8Level::Avx512Vnni(token);
            }
            if let Some(token) = AvxVnni::detect() {
                return Int8Level::AvxVnni(token);
            }
            if let Some(token) = Avx2::detect() {
                return Int8Level::Avx2(token);
            }
        }
        Int8Level::Scalar
    })
}

/// Every int8 level this CPU supports, scalar first; tests run each kernel at each of them.
#[cfg(test)]
pub(crate) fn int8_levels() -> Vec<Int8Level> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut levels = vec![Int8Level::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        levels.extend(Avx2::detect().map(Int8Level::Avx2));
        levels.extend(AvxVnni::detect().map(Int8Level::AvxVnni));
        levels.extend(Avx512Vnni::detect().map(Int8Level::Avx512Vnni));
    }
    levels
}

/// The levels of [`int8_levels`] this CPU lacks, by name (tests report what they could not run).
#[cfg(test)]
pub(crate) fn missing_int8_levels() -> Vec<&'static str> {
    let have: Vec<&str> = int8_levels().iter().map(|l| l.name()).collect();
    ["avx2", "avx-vnni", "avx512-vnni"]
        .into_iter()
        .filter(|n| !have.contains(n))
        .collect()
}

/// An instruction-set level, carrying the proof that the CPU supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// Portable Rust, no explicit intrinsics.
    Scalar,
    /// 256-bit AVX2 + FMA + F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
    /// 512-bit AVX-512F (plus AVX2, FMA, F16C).
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
}

impl Level {
    /// The short name used in logs.
    fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            Level::Avx512(_) => "avx512",
        }
    }
}

/// The best level this CPU supports, detected on first use and cached for the process.
pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(token) = Avx512::detect() {
            return Level::Avx512(token);
        }
        if let Some(token) = Avx2::detect() {
            return Level::Avx2(token);
        }
    }
    Level::Scalar
}

/// Whether a decode's products (few activation rows, which read every weight once, from
/// memory) read their weights as one stream: on AMD family 19h (Zen 4), whose prefetchers
/// follow one stream through a matrix but not several short ones side by side. Each output
/// element's arithmetic is the same either way, so the bits do not depend on it; only the
/// order in which memory is read does.
///
/// - f32, f16 and bf16 ([`dense_single_row_side_by_side`]): four weight rows side by side are
///   four streams of 2.3 KiB on the default model; on Zen 4 they read at 12.5 to 13.1 GB/s on
///   one thread, the rows one by one at 21.3 to 21.7 (a plain read: 28 GB/s). On Zen 5 the rows
///   one by one were the slower, 26.3 to 27.4 GB/s against 28.7 to 33.1 (`dense_speed 1`).
/// - int8 (`PackedMatrix::matmul_quantized`, 1 to 4 activation rows): a pair of 16-row tiles
///   side by side are two streams; on Zen 4 the tiles one after the other decoded Q4_1, Q4_0
///   and Q8_0 1.39× to 1.46× as fast on one thread and 1.22× to 1.26× on two, and without the
///   kernel's own prefetch 1.10× to 1.17× faster again (`strata bench`; docs/benchmarks.md).
pub(crate) fn single_stream() -> bool {
    static ONE: OnceLock<bool> = OnceLock::new();
    *ONE.get_or_init(amd_family_19h)
}

/// Weight rows that an f32, f16 or bf16 product of a single activation row reads side by side
/// at AVX-512: 1 where the weights are read as one stream ([`single_stream`]), 4 elsewhere.
pub(crate) fn dense_single_row_side_by_side() -> usize {
    if single_stream() { 1 } else { 4 }
}

/// Whether the CPU is an AMD processor of family 19h (Zen 3 and Zen 4), from CPUID leaves 0 and 1.
fn amd_family_19h() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        let vendor = __cpuid(0);
        let amd = [vendor.ebx, vendor.edx, vendor.ecx]
            == [*b"Auth", *b"enti", *b"cAMD"].map(u32::from_le_bytes);
        let eax = __cpuid(1).eax;
        let base = (eax >> 8) & 0xf;
        let family = base + if base == 0xf { (eax >> 20) & 0xff } else { 0 };
        amd && family == 0x19
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Every level this CPU supports, scalar first; tests run each kernel at each of them.
#[cfg(test)]
pub(crate) fn supported_levels() -> Vec<Level> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut levels = vec![Level::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        levels.extend(Avx2::detect().map(Level::Avx2));
        levels.extend(Avx512::detect().map(Level::Avx512));
    }
    levels
}

/// The SIMD level the f32 kernels selected on this machine: `"avx512"`, `"avx2"` or
/// `"scalar"`.
///
/// Meant for logs; the first call runs the CPU detection.
pub fn features() -> &'static str {
    level().name()
}

/// The level the int8 products selected on this machine: `"avx512-vnni"`, `"avx-vnni"`,
/// `"avx2"` or `"scalar"`.
pub fn int8_features() -> &'static str {
    int8_level().name()
}

/// Both selections, as one line for logs and `ModelInfo`: `f32 avx512, int8 avx512-vnni`.
pub fn summary() -> String {
    format!("f32 {}, int8 {}", features(), int8_features())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_level_is_the_best_supported_one() {
        let levels = supported_levels();
        assert_eq!(levels.first(), Some(&Level::Scalar));
        assert_eq!(levels.last(), Some(&level()));
        assert_eq!(features(), level().name());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn detection_matches_the_cpu() {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        let avx512 = avx2 && std::arch::is_x86_feature_detected!("avx512f");
        let expected = if avx512 {
            "avx512"
        } else if avx2 {
            "avx2"
        } else {
            "scalar"
        };
        assert_eq!(features(), expected);
        assert_eq!(
            supported_levels().len(),
            1 + usize::from(avx2) + usize::from(avx512)
        );
    }
}
