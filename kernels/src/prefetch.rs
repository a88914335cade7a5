//! Software prefetch: a hint that memory is about to be read, so that it streams in while the
//! kernel computes on what it already has. Where the hardware prefetchers cannot guess the
//! next address (the scattered blocks of a paged KV cache, the next tiles of a weight), the
//! kernels ask for it ahead themselves.

/// Asks for every cache line of `xs` to be brought into all cache levels. No effect on the
/// result, and none at all off x86-64.
#[inline(always)]
pub(crate) fn lines<T>(xs: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(xs);
        let start = xs.as_ptr().cast::<u8>();
        for offset in (0..bytes).step_by(64) {
            // SAFETY: `offset < bytes`, so the address is inside `xs`; a prefetch never faults
            // and has no architectural effect (`prefetcht0` is part of the x86-64 baseline).
            #[allow(unsafe_code)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    start.add(offset).cast(),
                );
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xs;
}
