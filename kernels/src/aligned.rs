//! Byte buffers that start on a cache line.
//!
//! Packed weights are read in 64-byte vectors; a buffer from the allocator starts wherever it
//! likes (glibc: 16 bytes into a page for large blocks), so that every such load would straddle
//! two cache lines, and a split load costs as much as two (`docs/benchmarks.md`: about 3% of
//! the int8 products' speed on AMD Zen 5). [`AlignedBytes`] starts on a 64-byte boundary.

#![allow(unsafe_code)]

use std::fmt;

/// One cache line: 64 bytes, aligned to 64, without padding.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// `len` bytes whose first is 64-byte aligned.
#[derive(Clone, PartialEq, Eq, Default)]
pub(crate) struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> Self {
        AlignedBytes {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `lines` holds `len.div_ceil(64)` initialized `Line`s of 64 bytes each, with no
        // padding (`repr(C)` over `[u8; 64]`), so its first `len` bytes are initialized and
        // readable for as long as `self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the mutable borrow of `self` makes the slice the only access,
        // and every byte value is a valid `Line` byte.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBytes;

    #[test]
    fn starts_on_a_cache_line_and_holds_its_bytes() {
        for len in [0, 1, 63, 64, 65, 1000] {
            let mut b = AlignedBytes::zeroed(len);
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % 64, 0);
            for (i, v) in b.as_mut_slice().iter_mut().enumerate() {
                *v = i as u8;
            }
            assert!(b.as_slice().iter().enumerate().all(|(i, &v)| v == i as u8));
            assert_eq!(b.clone().as_slice(), b.as_slice());
        }
    }
}
