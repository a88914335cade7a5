//! Long-lived buffers (packed weights) on transparent huge pages.
//!
//! A decode step reads every weight once, front to back, as one stream. On 4 KiB pages that
//! stream crosses a page every 4 KiB: the hardware prefetchers, which follow physical
//! addresses, stop at each crossing and start over, and the TLB misses. From 2 MiB pages one
//! stream of decode read 1.27× to 1.31× faster on AMD Zen 4 (`docs/benchmarks.md`, section
//! "(eleventh)").
//!
//! A huge page needs a 2 MiB-aligned range of one mapping, and most weight matrices are
//! smaller than that (a layer of the default model is 2 MiB of Q4_1 in seven of them). So the
//! buffers are carved one after another out of chunks of anonymous memory that start on a
//! 2 MiB boundary and are marked `MADV_HUGEPAGE`: consecutive matrices share huge pages. The
//! kernel backs a 2 MiB range with a huge page at its first touch where it can, and with small
//! pages where it cannot (transparent huge pages off, or no free huge page); either way the
//! memory is the same zeroed memory.
//!
//! A chunk reserves address space only ([`CHUNK_BYTES`], `MAP_NORESERVE`); what is resident is
//! what was touched, rounded up to the huge page. A freed buffer's range is reused, first fit,
//! by the next buffer that fits (a stacked matrix frees its parts, `int8::PackedMatrix::stack`);
//! a chunk with no buffer left is unmapped. Once a load is done ([`release_unused`]), the
//! huge page that holds a chunk's top and the space above it go on small pages: `khugepaged`
//! would otherwise fill that last huge page, 2 MiB resident for a tail of a few KiB.
//!
//! Architecture Invariant: a buffer from here is zeroed when handed out, whether the range is
//! fresh or reused, and no two live buffers overlap.

#![allow(unsafe_code)]

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Mutex;

/// Buffers shorter than this stay on the heap: they would not fill a huge page's worth of
/// weights, and tests make thousands of them.
pub(crate) const MIN_BYTES: usize = 64 << 10;

/// The huge page: 2 MiB on x86-64 (and the alignment of every chunk elsewhere).
const HUGE_PAGE: usize = 2 << 20;

/// Address space one chunk reserves (more for a larger buffer): the default model's weights
/// fit in one.
const CHUNK_BYTES: usize = 256 << 20;

/// Every buffer starts on a cache line and spans whole ones.
const LINE: usize = 64;

/// A zeroed, 64-byte aligned buffer in a huge-page chunk; its range goes back to the chunk
/// when dropped.
pub(crate) struct Block {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Block` owns its range of the chunk exclusively (the arena never hands out an
// overlapping one while it lives), as a `Vec<u8>` owns its allocation.
unsafe impl Send for Block {}
// SAFETY: shared access only reads (`as_slice`); writing takes `&mut self`.
unsafe impl Sync for Block {}

impl Block {
    /// `len` zero bytes, or `None` where no chunk could be mapped (the caller then uses the
    /// heap).
    pub(crate) fn zeroed(len: usize) -> Option<Block> {
        if len == 0 {
            return None;
        }
        let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
        let addr = arena.alloc(len)?;
        Some(Block {
            ptr: NonNull::new(addr as *mut u8)?,
            len,
        })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the range `[ptr, ptr + len)` lies in a mapped, readable and writable chunk,
        // owned by this block alone, zeroed when it was handed out (so initialized).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
        arena.free(self.ptr.as_ptr() as usize, self.len);
    }
}

static ARENA: Mutex<Arena> = Mutex::new(Arena { chunks: Vec::new() });

/// Gives back to the system the memory of the chunks that no buffer holds but that may be
/// resident: freed ranges, and the rest of the huge page that holds a chunk's top (touching
/// one byte of a huge page makes all 2 MiB of it resident). Returns the bytes given back (at
/// most; some may never have been touched).
///
/// Call it once a load is done: a huge page cut here goes on as small pages, so a call after
/// every matrix would cost the next ones their huge pages. What lies from the top's huge page
/// on is marked for small pages until a buffer is handed out there.
pub fn release_unused() -> u64 {
    let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
    arena.chunks.iter_mut().map(Chunk::release_unused).sum()
}

/// The chunks and, in each, what is handed out.
struct Arena {
    chunks: Vec<Chunk>,
}

/// One mapping. Offsets below `top` are handed out or in `free`; those from `clean` on have
/// never been written; those from `small_from` on are marked for small pages.
struct Chunk {
    base: usize,
    size: usize,
    top: usize,
    clean: usize,
    small_from: usize,
    /// Freed ranges below `top`: sorted, disjoint, none touching another or `top`.
    free: Vec<Range<usize>>,
    live: usize,
}

impl Arena {
    /// The address of `len` zeroed bytes (whole cache lines), or `None` where a new chunk was
    /// needed and could not be mapped.
    fn alloc(&mut self, len: usize) -> Option<usize> {
        let n = len.checked_next_multiple_of(LINE)?;
        for chunk in &mut self.chunks {
            if let Some(at) = chunk.take(n) {
                return Some(chunk.base + at);
            }
        }
        let mut chunk = Chunk::map(n.checked_next_multiple_of(HUGE_PAGE)?.max(CHUNK_BYTES))?;
        let at = chunk.take(n)?;
        let addr = chunk.base + at;
        self.chunks.push(chunk);
        Some(addr)
    }

    /// Gives back the `len` bytes at `addr`, from [`Arena::alloc`]; unmaps a chunk left empty.
    fn free(&mut self, addr: usize, len: usize) {
        let n = len.next_multiple_of(LINE);
        let Some(i) = self
            .chunks
            .iter()
            .position(|c| (c.base..c.base + c.size).contains(&addr))
        else {
            return;
        };
        let chunk = &mut self.chunks[i];
        chunk.give_back(addr - chunk.base, n);
        if chunk.live == 0 {
            self.chunks.swap_remove(i);
        }
    }
}

impl Chunk {
    /// Maps `size` bytes of address space starting on a huge page, marked for huge pages.
    fn map(size: usize) -> Option<Chunk> {
        let span = size.checked_add(HUGE_PAGE)?;
        // SAFETY: a new private anonymous mapping at an address the kernel picks; nothing
        // else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = p as usize;
        let base = start.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (base - start, HUGE_PAGE - (base - start));
        // SAFETY: both ranges lie in the mapping just made, outside `[base, base + size)`,
        // and nothing refers to them. A failure leaves them mapped, unused: harmless.
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((base + size) as *mut libc::c_void, tail);
            }
            // Without transparent huge pages (a kernel built without, or `never`) this fails
            // and the chunk is small pages: the same memory, slower to stream.
            libc::madvise(base as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        Some(Chunk {
            base,
            size,
            top: 0,
            clean: 0,
            small_from: size,
            free: Vec::new(),
            live: 0,
        })
    }

    /// The offset of `n` zeroed bytes: the first freed range that holds them, or the top.
    fn take(&mut self, n: usize) -> Option<usize> {
        let at = if let Some(i) = self.free.iter().position(|r| r.len() >= n) {
            let r = &mut self.free[i];
            let at = r.start;
            r.start += n;
            if r.start == r.end {
                self.free.remove(i);
            }
            at
        } else if self.size - self.top >= n {
            let at = self.top;
            self.top += n;
            if self.top > self.small_from {
                // A buffer past the load's end (`release_unused`): huge pages again.
                self.advise(self.small_from..self.size, libc::MADV_HUGEPAGE);
                self.small_from = self.size;
            }
            at
        } else {
            return None;
        };
        // Bytes below `clean` were written by an earlier buffer.
        let dirty = self.clean.min(at + n).saturating_sub(at);
        // SAFETY: `[at, at + dirty)` lies in this chunk's mapping, handed out to no one.
        unsafe { std::ptr::write_bytes((self.base + at) as *mut u8, 0, dirty) };
        self.clean = self.clean.max(at + n);
        self.live += 1;
        Some(at)
    }

    /// Returns `[at, at + n)` to the free ranges, merging it with its neighbours (and with the
    /// top).
    fn give_back(&mut self, at: usize, n: usize) {
        let i = self.free.partition_point(|r| r.start < at);
        self.free.insert(i, at..at + n);
        if i + 1 < self.free.len() && self.free[i].end == self.free[i + 1].start {
            let next = self.free.remove(i + 1);
            self.free[i].end = next.end;
        }
        if i > 0 && self.free[i - 1].end == self.free[i].start {
            let this = self.free.remove(i);
            self.free[i - 1].end = this.end;
        }
        if self.free.last().is_some_and(|r| r.end == self.top)
            && let Some(last) = self.free.pop()
        {
            self.top = last.start;
        }
        self.live -= 1;
    }

    /// See [`release_unused`].
    fn release_unused(&mut self) -> u64 {
        // SAFETY: `sysconf` reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let past_top = self.top..self.top.next_multiple_of(HUGE_PAGE).min(self.size);
        let mut released = 0;
        for r in self.free.iter().cloned().chain([past_top]) {
            let (start, end) = (r.start.next_multiple_of(page), r.end / page * page);
            // Whole pages of this chunk that no live buffer holds; they read as zeros when
            // touched again, and a buffer given out there is zeroed anyway (`take`).
            if start < end && self.advise(start..end, libc::MADV_DONTNEED) {
                released += (end - start) as u64;
            }
        }
        // The huge page that holds the top, cut to small pages above, and every one after it
        // stay small: else `khugepaged` (which fills a huge page around even one small page
        // present) makes the top's whole 2 MiB resident again a few seconds later.
        let small_from = self.top / HUGE_PAGE * HUGE_PAGE;
        if small_from < self.small_from && self.advise(small_from..self.size, libc::MADV_NOHUGEPAGE)
        {
            self.small_from = small_from;
        }
        released
    }

    /// `madvise(advice)` on `range` (offsets in this chunk, on page boundaries); whether it
    /// took.
    fn advise(&self, range: Range<usize>, advice: libc::c_int) -> bool {
        // SAFETY: `range` lies in this chunk's mapping; the callers pass `MADV_DONTNEED` only
        // for pages no live buffer holds, and the huge-page advice changes no contents.
        unsafe {
            libc::madvise(
                (self.base + range.start) as *mut libc::c_void,
                range.len(),
                advice,
            ) == 0
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the chunk's own mapping; no buffer of it is live (`live == 0`) or the arena
        // that owns it is gone.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::{Arena, CHUNK_BYTES, HUGE_PAGE};

    fn bytes(addr: usize, len: usize) -> &'static mut [u8] {
        // SAFETY (test): `addr` came from the test's own arena, which outlives every use.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
    }

    #[test]
    fn hands_out_zeroed_aligned_disjoint_ranges_and_reuses_freed_ones() {
        let mut arena = Arena { chunks: Vec::new() };
        let a = arena.alloc(1000).unwrap();
        let b = arena.alloc(3000).unwrap();
        let c = arena.alloc(100).unwrap();
        assert_eq!(a % HUGE_PAGE, 0, "the first buffer starts a huge page");
        assert_eq!(
            (b - a, c - b),
            (1024, 3008),
            "one after another, on cache lines"
        );
        for (addr, len) in [(a, 1000), (b, 3000), (c, 100)] {
            assert!(bytes(addr, len).iter().all(|&v| v == 0));
            bytes(addr, len).fill(0xAB);
        }
        // b's range, freed, holds a smaller buffer (zeroed again) and then the rest of it.
        arena.free(b, 3000);
        let d = arena.alloc(2000).unwrap();
        assert_eq!(d, b);
        assert!(bytes(d, 2000).iter().all(|&v| v == 0));
        let e = arena.alloc(900).unwrap();
        assert_eq!(e, b + 2048);
        assert!(bytes(e, 900).iter().all(|&v| v == 0));
        // Too large for what is left of the hole: from the top.
        arena.free(e, 900);
        let f = arena.alloc(2000).unwrap();
        assert_eq!(f, c + 128);
        // Freeing the top lowers it; ranges next to each other merge.
        arena.free(f, 2000);
        arena.free(c, 100);
        arena.free(d, 2000);
        let chunk = &arena.chunks[0];
        assert_eq!(
            (chunk.top, chunk.free.as_slice(), chunk.live),
            (1024, &[][..], 1)
        );
        // A buffer larger than a chunk gets a chunk of its own; empty chunks are unmapped.
        let big = arena.alloc(CHUNK_BYTES + 1).unwrap();
        assert_eq!(arena.chunks.len(), 2);
        assert!(arena.chunks[1].size > CHUNK_BYTES);
        arena.free(big, CHUNK_BYTES + 1);
        arena.free(a, 1000);
        assert!(arena.chunks.is_empty());
    }

    /// The `VmFlags` of the mapping that holds `addr` in this process, if one does.
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut lines = smaps.lines();
        lines.find(|l| {
            let range = l.split(' ').next().unwrap_or_default();
            let mut ends = range.split('-').map(|x| usize::from_str_radix(x, 16));
            matches!((ends.next(), ends.next()), (Some(Ok(lo)), Some(Ok(hi))) if (lo..hi).contains(&addr))
        })?;
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .map(str::to_owned)
    }

    #[test]
    fn release_keeps_the_top_on_small_pages_until_a_buffer_goes_past_it() {
        let mut arena = Arena { chunks: Vec::new() };
        let a = arena.alloc(HUGE_PAGE + 1000).unwrap();
        bytes(a, HUGE_PAGE + 1000).fill(1);
        if !vm_flags(a).is_some_and(|f| f.contains(" hg")) {
            eprintln!("skipped: this kernel has no transparent huge pages to advise");
            arena.free(a, HUGE_PAGE + 1000);
            return;
        }
        arena.chunks[0].release_unused();
        let chunk = &arena.chunks[0];
        assert_eq!(
            chunk.small_from, HUGE_PAGE,
            "from the huge page that holds the top"
        );
        let flags = vm_flags(chunk.base + HUGE_PAGE).expect("the small part is a mapping");
        assert!(flags.contains(" nh"), "marked for small pages: {flags}");
        let flags = vm_flags(chunk.base).expect("the chunk's first mapping");
        assert!(
            flags.contains(" hg"),
            "the full huge page keeps its advice: {flags}"
        );
        // A buffer past the mark (another load): the rest is for huge pages again.
        let b = arena.alloc(HUGE_PAGE).unwrap();
        assert!(bytes(b, HUGE_PAGE).iter().all(|&v| v == 0));
        let chunk = &arena.chunks[0];
        assert_eq!(chunk.small_from, chunk.size);
        let flags = vm_flags(chunk.base + HUGE_PAGE).expect("the chunk's mapping");
        assert!(flags.contains(" hg"), "advice taken back: {flags}");
        arena.free(b, HUGE_PAGE);
        arena.free(a, HUGE_PAGE + 1000);
        assert!(arena.chunks.is_empty());
    }
}
