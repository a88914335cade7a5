//! Process memory: the resident set as the kernel reports it (`/proc/self/status`), and handing
//! the allocator's free pages back to the kernel after a load.

/// Resident set size now and its peak, in bytes (0 where unavailable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rss {
    pub current: u64,
    pub peak: u64,
}

/// Reads the current and peak resident set size of this process.
pub fn rss() -> Rss {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Rss::default();
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Rss {
        current: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}

/// Returns the allocator's free pages to the kernel; call it once a load is done.
///
/// Loading leaves holes in the heap: a tokenizer is built through a JSON document several
/// times its own size, and each weight passes through a full-precision copy before it is
/// quantized or repacked. glibc keeps those pages resident as long as anything allocated later
/// sits above them (24 MiB after the default model's tokenizer, a few MiB after its weights);
/// `malloc_trim` gives back every free page, wherever it lies. Elsewhere this does nothing.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `malloc_trim` only walks glibc's own arenas under their locks; it takes no
    // pointer and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_gives_back_freed_pages() {
        let before = rss();
        assert!(
            before.current > 0 && before.peak >= before.current,
            "{before:?}"
        );
        // 64 MiB in small blocks (below glibc's mmap threshold, so they live on the heap),
        // touched, then freed but for one block at the top that pins the heap.
        let mut blocks: Vec<Vec<u8>> = (0..2048).map(|_| vec![1u8; 32 << 10]).collect();
        let pin = vec![1u8; 32 << 10];
        let touched = rss().current;
        blocks.clear();
        blocks.shrink_to_fit();
        release_free_heap();
        let after = rss().current;
        assert!(
            after + (32 << 20) < touched,
            "resident {touched} bytes with the blocks, {after} after freeing and trimming"
        );
        drop(pin);
    }
}
