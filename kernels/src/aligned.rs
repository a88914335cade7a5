//! Byte buffers that start on a cache line: on the heap, or, for weights a decode streams, on
//! transparent huge pages ([`AlignedBytes::zeroed_for_streaming`], `crate::huge`).
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
#[derive(Default)]
pub(crate) struct AlignedBytes {
    store: Store,
    len: usize,
}

/// Where the bytes live.
enum Store {
    /// Whole cache lines on the heap.
    Heap(Vec<Line>),
    /// A range of a huge-page chunk ([`crate::huge`]).
    #[cfg(target_os = "linux")]
    Huge(crate::huge::Block),
}

impl Default for Store {
    fn default() -> Self {
        Store::Heap(Vec::new())
    }
}

impl AlignedBytes {
    /// `len` zero bytes on the heap.
    pub(crate) fn zeroed(len: usize) -> Self {
        AlignedBytes {
            store: Store::Heap(vec![Line([0; 64]); len.div_ceil(64)]),
            len,
        }
    }

    /// `len` zero bytes that will be read as a stream for as long as the process serves
    /// (weights): on transparent huge pages where there are enough of them to fill some
    /// ([`crate::huge::MIN_BYTES`]) and the system lets a chunk be mapped, else on the heap.
    pub(crate) fn zeroed_for_streaming(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if len >= crate::huge::MIN_BYTES
            && let Some(block) = crate::huge::Block::zeroed(len)
        {
            return AlignedBytes {
                store: Store::Huge(block),
                len,
            };
        }
        Self::zeroed(len)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the bytes lie in a huge-page chunk.
    #[cfg(test)]
    pub(crate) fn on_huge_pages(&self) -> bool {
        !matches!(self.store, Store::Heap(_))
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match &self.store {
            // SAFETY: `lines` holds `len.div_ceil(64)` initialized `Line`s of 64 bytes each,
            // with no padding (`repr(C)` over `[u8; 64]`), so its first `len` bytes are
            // initialized and readable for as long as `self` is borrowed.
            Store::Heap(lines) => unsafe {
                std::slice::from_raw_parts(lines.as_ptr().cast::<u8>(), self.len)
            },
            #[cfg(target_os = "linux")]
            Store::Huge(block) => block.as_slice(),
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.store {
            // SAFETY: as in `as_slice`; the mutable borrow of `self` makes the slice the only
            // access, and every byte value is a valid `Line` byte.
            Store::Heap(lines) => unsafe {
                std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), self.len)
            },
            #[cfg(target_os = "linux")]
            Store::Huge(block) => block.as_mut_slice(),
        }
    }
}

/// Values kept for streaming (float weights): [`AlignedBytes::zeroed_for_streaming`] holding
/// them.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AlignedValues<T> {
    bytes: AlignedBytes,
    _values: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> AlignedValues<T> {
    /// A copy of `values`.
    pub(crate) fn for_streaming(values: &[T]) -> Self {
        let src: &[u8] = bytemuck::cast_slice(values);
        let mut bytes = AlignedBytes::zeroed_for_streaming(src.len());
        bytes.as_mut_slice().copy_from_slice(src);
        AlignedValues {
            bytes,
            _values: std::marker::PhantomData,
        }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        // The bytes start on a cache line (aligned for any value type of at most 64 bytes)
        // and are whole values, as `for_streaming` copied them: the cast cannot fail.
        bytemuck::cast_slice(self.bytes.as_slice())
    }

    #[cfg(test)]
    pub(crate) fn on_huge_pages(&self) -> bool {
        self.bytes.on_huge_pages()
    }
}

impl Clone for AlignedBytes {
    /// A copy in the same kind of memory.
    fn clone(&self) -> Self {
        let mut copy = match self.store {
            Store::Heap(_) => Self::zeroed(self.len),
            #[cfg(target_os = "linux")]
            Store::Huge(_) => Self::zeroed_for_streaming(self.len),
        };
        copy.as_mut_slice().copy_from_slice(self.as_slice());
        copy
    }
}

impl PartialEq for AlignedBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for AlignedBytes {}

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

    #[test]
    fn long_lived_bytes_are_zeroed_aligned_and_copy_to_their_kind() {
        for len in [0, 100, 64 << 10, (3 << 20) + 5] {
            let mut b = AlignedBytes::zeroed_for_streaming(len);
            #[cfg(target_os = "linux")]
            assert_eq!(
                b.on_huge_pages(),
                len >= crate::huge::MIN_BYTES,
                "{len} bytes"
            );
            assert_eq!(b.len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % 64, 0);
            assert!(b.as_slice().iter().all(|&v| v == 0));
            b.as_mut_slice().fill(7);
            let c = b.clone();
            assert_eq!(c.on_huge_pages(), b.on_huge_pages());
            assert!(c == b);
        }
    }

    #[test]
    fn values_read_back_as_written() {
        use super::AlignedValues;
        for len in [0, 3, 100_000] {
            let v: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 7.0).collect();
            let a = AlignedValues::for_streaming(&v);
            assert_eq!(a.as_slice(), &v[..]);
            assert_eq!(a.as_slice().as_ptr() as usize % 64, 0);
            #[cfg(target_os = "linux")]
            assert_eq!(a.on_huge_pages(), 4 * len >= crate::huge::MIN_BYTES);
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            assert_eq!(AlignedValues::for_streaming(&h).as_slice(), &h[..]);
        }
    }
}
