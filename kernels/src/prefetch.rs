//! Software prefetch: a hint that memory is about to be read, so that it streams in while the
//! kernel computes on what it already has. Where the hardware prefetchers cannot guess the
//! next address (the scattered blocks of a paged KV cache, the next tiles of a weight), the
//! kernels ask for it ahead themselves.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1};
#[cfg(not(target_arch = "x86_64"))]
const _MM_HINT_T0: i32 = 0;
#[cfg(not(target_arch = "x86_64"))]
const _MM_HINT_T1: i32 = 0;

/// Asks for every cache line of `xs` to be brought into all cache levels (`prefetcht0`). No
/// effect on the result, and none at all off x86-64.
#[inline(always)]
pub(crate) fn lines<T>(xs: &[T]) {
    lines_with::<_MM_HINT_T0, T>(xs);
}

/// Asks for every cache line of `xs` to be brought into L2 and the levels below it, not L1
/// (`prefetcht1`): for many short runs scattered in memory, each read soon but not at once.
/// On Zen 4, 2 KiB runs in random order read at 6.9 to 8.3 GB/s on one thread with no
/// prefetch, 9.1 to 9.8 when each run asked for the lines of the run 2 to 8 ahead into L1, 12.4
/// to 15.4 into L2 (a linear read: 21 to 22 GB/s); presumably a request into L1 holds one of
/// the core's few L1 miss buffers until its line arrives (docs/benchmarks.md, "twelfth").
#[inline(always)]
pub(crate) fn lines_l2<T>(xs: &[T]) {
    lines_with::<_MM_HINT_T1, T>(xs);
}

#[inline(always)]
fn lines_with<const HINT: i32, T>(xs: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(xs);
        let start = xs.as_ptr().cast::<u8>();
        for offset in (0..bytes).step_by(64) {
            // SAFETY: `offset < bytes`, so the address is inside `xs`; a prefetch never faults
            // and has no architectural effect (`prefetcht0` and `prefetcht1` are part of the
            // x86-64 baseline).
            #[allow(unsafe_code)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<HINT>(start.add(offset).cast());
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xs;
}
