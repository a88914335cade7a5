//! The process's compute threads: one rayon pool, and [`install`] to run work on it.
//!
//! A product called from a thread outside the pool hands its work to the pool and sleeps until
//! it is done: two thread switches per product, which on a small model cost as much as the
//! product itself (hundreds per token). Work run through [`install`] runs on a pool thread, so
//! its products split among the pool's threads without leaving it.

use std::sync::OnceLock;

/// A positive thread count from the environment variable `var`.
fn threads_from_env(var: &str) -> Option<usize> {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// A pool of `threads` threads named `name-i`.
fn build(threads: usize, name: &'static str) -> Option<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .ok()
}

/// The pool: `RAYON_NUM_THREADS` threads (what `--threads` sets), or one per core.
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = threads_from_env("RAYON_NUM_THREADS").unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        build(threads, "strata-compute")
    })
    .as_ref()
}

/// Runs `f` on a thread of the compute pool (at once if this thread is one), so that the
/// kernels it calls share out their work without thread switches. Where no pool could be
/// started, `f` runs here, on rayon's global pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(p) if rayon::current_thread_index().is_none() => p.install(f),
        _ => f(),
    }
}

/// Where the host's cores are shared with other workers that compute at the same time
/// (`strata serve` starts one per device on one host): the threads of this worker's share,
/// from `STRATA_SHARED_THREADS`, and a pool of that many. `None` when unset, or no fewer than
/// the pool's.
fn share_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let share = threads_from_env("STRATA_SHARED_THREADS").filter(|&n| n < threads())?;
        build(share, "strata-share")
    })
    .as_ref()
}

/// [`install`], on this worker's share of the cores when `shared` (other stages compute at the
/// same time) and it has one: a worker that took every core while the others compute would
/// take them from the others, and its threads would wait at every join for a thread that the
/// others had put off its core. Alone, it computes on every core.
pub fn install_sharing<R: Send>(shared: bool, f: impl FnOnce() -> R + Send) -> R {
    match share_pool() {
        Some(p) if shared && rayon::current_thread_index().is_none() => p.install(f),
        _ => install(f),
    }
}

/// Threads of the compute pool.
pub fn threads() -> usize {
    pool().map_or_else(
        rayon::current_num_threads,
        rayon::ThreadPool::current_num_threads,
    )
}

/// Rows per task for work done row by row over `rows` rows of `row_len` values each: every row
/// in one task when there are fewer than `min_values` values or one thread (a fork/join costs
/// microseconds), otherwise about four tasks per thread, for balance. A row's arithmetic never
/// depends on its task.
pub fn rows_per_task(rows: usize, row_len: usize, min_values: usize) -> usize {
    let threads = rayon::current_num_threads();
    if threads <= 1 || rows.saturating_mul(row_len) < min_values {
        rows.max(1)
    } else {
        rows.div_ceil(threads * 4).max(1)
    }
}
