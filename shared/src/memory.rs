//! Process memory: the resident set as the kernel reports it (`/proc/self/status`), and what a
//! process gives back after a load: the allocator's free pages, and the mapped pages of code
//! it ran only while loading.

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
    Rss {
        current: kb_field(&status, "VmRSS:"),
        peak: kb_field(&status, "VmHWM:"),
    }
}

/// The bytes of a `Name:   123 kB` line of a `/proc` text (0 where absent or unreadable).
fn kb_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of this process's anonymous memory on transparent huge pages (`AnonHugePages` of
/// `/proc/self/smaps_rollup`; 0 where unavailable): the weights, which ask for them
/// (`strata_kernels::huge`), and, where the system's setting is `always`, whatever else it
/// backs with them.
pub fn huge_page_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup").map_or(0, |s| kb_field(&s, "AnonHugePages:"))
}

/// Gives back what a load leaves resident and serving does not use: the allocator's free
/// pages ([`release_free_heap`]) and the mapped pages of code and constants
/// ([`release_file_pages`]). Call it once a load (or a step of one) is done.
pub fn release_idle_pages() {
    release_free_heap();
    release_file_pages();
}

/// The size from which the allocator maps a block of its own, and the free space at the top of
/// one of its arenas from which it gives that space back ([`fix_heap_thresholds`]).
pub const HEAP_THRESHOLD_BYTES: usize = 1 << 20;

/// Fixes glibc's thresholds at [`HEAP_THRESHOLD_BYTES`], so that memory a step frees goes back
/// to the system: a block that large is a mapping of its own, unmapped when freed, and an arena
/// gives back its top once that much is free there. Call it once a worker's load is done,
/// before it serves.
///
/// By default glibc raises both as a process frees large blocks: its mapping threshold to the
/// largest mapped block freed (up to 32 MiB), its trim threshold to twice that. After a load
/// has freed the default model's 30 MB embedding as read from the file, a thread's arena kept
/// what a prompt's step had used (2.3 MiB of activations for 64 rows) resident for good, and
/// `malloc_trim` does not reach the top of a thread's arena. Buffers that every step needs stay
/// allocated from one step to the next (`strata_worker::scratch`), so a decode frees nothing
/// that large. Elsewhere than on glibc this does nothing.
pub fn fix_heap_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `mallopt` sets glibc's tunables under its own lock; the values are in range.
    unsafe {
        let bytes = HEAP_THRESHOLD_BYTES as libc::c_int;
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
        libc::mallopt(libc::M_TRIM_THRESHOLD, bytes);
    }
}

/// Returns the allocator's free pages to the kernel.
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

/// Unmaps from this process the pages of its read-only file mappings (the binary's code and
/// constants, the shared libraries'), and returns how many bytes of them were resident.
///
/// One binary holds the gateway, the worker, the command line, the GGUF reader, the quantizers
/// and the tokenizer's builder, and a load runs much of it once: a worker that had loaded its
/// layers kept 9.5 MiB of the binary's 15 MiB of code mapped, and 14 MiB of files in all
/// (`RssFile`), most of which serving never runs again. The pages stay in the kernel's page
/// cache (shared with every process of the binary); the code that runs afterwards maps its
/// pages again at first use, a minor fault without a read.
///
/// Only private, non-writable mappings of a file that hold no page of their own
/// (`Anonymous: 0 kB` in `/proc/self/smaps`: nothing copied on write, as the relocated
/// read-only data are) are touched, so every page dropped is the file's own and comes back
/// the same. Elsewhere than on Linux this does nothing and returns 0.
pub fn release_file_pages() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return 0;
        };
        let mut released = 0;
        for m in mappings(&smaps).filter(Mapping::clean_file_pages) {
            // SAFETY: the range is a whole mapping of this process, private, not writable and
            // without a page of its own; `MADV_DONTNEED` on it only drops page-table entries,
            // and each page is read again from the file, unchanged, when next touched (by
            // code on any thread, this one's included). Failure (a locked mapping) changes
            // nothing.
            #[allow(unsafe_code)]
            let done = unsafe {
                libc::madvise(
                    m.start as *mut libc::c_void,
                    m.end - m.start,
                    libc::MADV_DONTNEED,
                )
            } == 0;
            if done {
                released += m.rss_kb * 1024;
            }
        }
        released
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// One mapping of `/proc/self/smaps`: its range, permissions, file and resident pages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
    rss_kb: u64,
    anonymous_kb: u64,
}

impl Mapping<'_> {
    /// A private, non-writable mapping of a file, with resident pages and none of its own.
    fn clean_file_pages(&self) -> bool {
        let p = self.perms.as_bytes();
        self.path.starts_with('/')
            && p.get(1) == Some(&b'-')
            && p.get(3) == Some(&b'p')
            && self.rss_kb > 0
            && self.anonymous_kb == 0
    }
}

/// The mappings of an `smaps` text. A mapping whose header or counters cannot be read is
/// skipped, as is one whose `Anonymous` line is missing (it then counts as having pages of
/// its own).
fn mappings(smaps: &str) -> impl Iterator<Item = Mapping<'_>> {
    let mut lines = smaps.lines().peekable();
    std::iter::from_fn(move || {
        loop {
            let header = lines.next()?;
            let mut fields = header.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next().unwrap_or("");
            // offset, device, inode, then the path (which may hold spaces)
            let path = fields.nth(3).map_or("", |first| {
                let at = header.find(first).unwrap_or(header.len());
                header[at..].trim_end()
            });
            let (mut rss_kb, mut anonymous_kb) = (None, None);
            while let Some(line) = lines.peek() {
                let Some((key, value)) = line.split_once(':') else {
                    break;
                };
                if key.contains(' ') || key.contains('-') {
                    break; // the next mapping's header
                }
                let kb = || {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                };
                match key {
                    "Rss" => rss_kb = kb(),
                    "Anonymous" => anonymous_kb = kb(),
                    _ => {}
                }
                lines.next();
            }
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            let (Some(rss_kb), Some(anonymous_kb)) = (rss_kb, anonymous_kb) else {
                continue;
            };
            return Some(Mapping {
                start,
                end,
                perms,
                path,
                rss_kb,
                anonymous_kb,
            });
        }
    })
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
    const SMAPS: &str = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 08:01 1234                       /usr/bin/strata
Size:               1024 kB
Rss:                 512 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
55d0c0b00000-55d0c0c00000 r-xp 00100000 08:01 1234                       /usr/bin/strata
Size:               1024 kB
Rss:                 900 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
55d0c0c00000-55d0c0c10000 r--p 00200000 08:01 1234                       /usr/bin/strata
Rss:                  64 kB
Anonymous:            64 kB
55d0c0c10000-55d0c0c20000 rw-p 00210000 08:01 1234                       /usr/bin/strata
Rss:                  64 kB
Anonymous:             8 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Rss:                1024 kB
Anonymous:          1024 kB
7f0000200000-7f0000300000 r--s 00000000 08:01 99                         /data/model file.gguf
Rss:                 128 kB
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_private_read_only_file_mappings_are_released() {
        let all: Vec<Mapping<'_>> = mappings(SMAPS).collect();
        assert_eq!(all.len(), 7, "{all:#?}");
        assert_eq!(all[5].path, "/data/model file.gguf");
        assert_eq!((all[1].start, all[1].end), (0x55d0c0b00000, 0x55d0c0c00000));
        let released: Vec<(&str, u64)> = all
            .iter()
            .filter(|m| m.clean_file_pages())
            .map(|m| (m.perms, m.rss_kb))
            .collect();
        // The constants and the code; not the relocated read-only data (copied on write),
        // the writable data, anonymous memory, a shared mapping or the vDSO.
        assert_eq!(released, [("r--p", 512), ("r-xp", 900)]);
    }

    #[test]
    fn unmaps_code_pages_that_come_back_when_run() {
        fn file_rss_kb() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("RssFile:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                })
                .unwrap_or(0)
        }
        let before = file_rss_kb();
        let released = release_file_pages();
        let after = file_rss_kb();
        if cfg!(target_os = "linux") {
            assert!(
                released > 0 && after < before,
                "RssFile {before} kB before, {after} kB after releasing {released} bytes"
            );
        }
        // The code runs on, its pages mapped again from the file.
        let words: Vec<String> = (0..1000).map(|i| format!("{i:x}")).collect();
        assert_eq!(words.concat().len(), 16 + 240 * 2 + 744 * 3);
        assert!(file_rss_kb() > 0 || !cfg!(target_os = "linux"));
    }
}
