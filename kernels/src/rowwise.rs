//! The driver shared by the `x · Wᵀ` products of the quantized weight formats.
//!
//! A product `out[m, rows] = x[m, cols] · W[rows, cols]ᵀ` is split by weight row: a kernel is
//! handed one weight row `j` and fills `out[i][j]` for every activation row `i`, so each weight
//! row is decoded once per call whatever `m` is. Weight rows are spread over rayon tasks when
//! the product is big enough to pay for it. Each output element is computed by exactly one
//! kernel call, so results do not depend on the thread count.

use rayon::prelude::*;

use crate::columns::Columns;

/// Products with fewer multiply-adds than this run on the calling thread: below it, rayon's
/// fork/join overhead (microseconds) is comparable to the work itself.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Weight rows per rayon task.
pub(crate) const ROWS_PER_TASK: usize = 16;

/// The most activation bytes of a chunk of a long prompt's rows ([`chunk_rows`]): half of a Zen 4
/// or 5 core's L2, so that the weights streaming past have the other half.
const CHUNK_BYTES: usize = 512 << 10;

/// The rows of each chunk of a product of `m` rows of `row_bytes` activation bytes each, which
/// the products take one after another so that a chunk's activations stay in L2 while every
/// weight passes by them (rather than streaming every row from L3 again for each few weight
/// rows): chunks of equal size within [`CHUNK_BYTES`], in whole blocks of 4 rows (the kernels'
/// blocks), or a single one up to twice that, whose activations still fit in L2. Each output
/// element is computed alike in any chunk.
pub(crate) fn chunk_rows(m: usize, row_bytes: usize) -> usize {
    let budget = (CHUNK_BYTES / row_bytes.max(1)).max(1);
    let chunks = if m > 2 * budget {
        m.div_ceil(budget)
    } else {
        1
    };
    m.div_ceil(chunks).next_multiple_of(4).max(4)
}

/// Activation rows the SIMD kernels process together, so that each decoded weight vector is
/// reused from registers this many times.
#[cfg(target_arch = "x86_64")]
pub(crate) const TILE: usize = 4;

/// Computes every `out[i][j]` (`out` is `[m, rows]`, row-major) by calling `row_fn(j, col)`
/// once per weight row `j`, where `col[i]` receives `out[i][j]` for `i < m`.
///
/// The caller has checked that `out.len() == m * rows`. With `m > 1`, each task gathers its
/// weight rows' results in a small `[rows of the task, m]` buffer and writes them into its own
/// columns of `out`, in place and in parallel.
pub(crate) fn for_each_weight_row<F>(rows: usize, cols: usize, m: usize, out: &mut [f32], row_fn: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    for_each_weight_group(rows, cols, m, out, 1, row_fn);
}

/// As [`for_each_weight_row`], but a call covers a group of up to `group` consecutive weight
/// rows (a divisor of the rows per task): `group_fn(j0, buf)` fills `buf[t * m + i]` with
/// `out[i][j0 + t]` for the `buf.len() / m` rows of the group.
pub(crate) fn for_each_weight_group<F>(
    rows: usize,
    cols: usize,
    m: usize,
    out: &mut [f32],
    group: usize,
    group_fn: F,
) where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if m == 0 || rows == 0 {
        return;
    }
    let group = group.clamp(1, ROWS_PER_TASK);
    debug_assert_eq!(ROWS_PER_TASK % group, 0);
    let parallel = m.saturating_mul(rows).saturating_mul(cols) >= PARALLEL_MIN_MACS;
    if m == 1 {
        // `[1, rows]` and `[rows, 1]` are the same layout: no scratch needed.
        run(out, 1, group, parallel, &group_fn);
        return;
    }
    let Ok(mut columns) = Columns::new(out, m, rows) else {
        debug_assert!(false, "the caller checks the output's length");
        return;
    };
    let min_len = tasks_per_job(rows.div_ceil(ROWS_PER_TASK));
    columns.for_each_strip(ROWS_PER_TASK, parallel, min_len, |strip| {
        let (j0, n) = (strip.first(), strip.width());
        // The task's results by weight row (`[n][m]`), then out row by out row.
        let mut by_weight_row = vec![0.0; n * m];
        for (g, rows) in by_weight_row.chunks_mut(group * m).enumerate() {
            group_fn(j0 + g * group, rows);
        }
        let mut lanes = [0.0f32; ROWS_PER_TASK];
        for i in 0..m {
            for (t, lane) in lanes[..n].iter_mut().enumerate() {
                *lane = by_weight_row[t * m + i];
            }
            strip.write(i, 0, &lanes);
        }
    });
}

/// Runs `group_fn` over the `[rows, m]` buffer `buf`, `group` weight rows per call, serially or
/// on the rayon pool.
fn run<F>(buf: &mut [f32], m: usize, group: usize, parallel: bool, group_fn: &F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let task = |(chunk_index, chunk): (usize, &mut [f32])| {
        for (g, rows) in chunk.chunks_mut(group * m).enumerate() {
            group_fn(chunk_index * ROWS_PER_TASK + g * group, rows);
        }
    };
    let chunk_len = ROWS_PER_TASK * m;
    if parallel {
        let min_len = tasks_per_job(buf.len().div_ceil(chunk_len));
        buf.par_chunks_mut(chunk_len)
            .enumerate()
            .with_min_len(min_len)
            .for_each(task);
    } else {
        buf.chunks_mut(chunk_len).enumerate().for_each(task);
    }
}

/// Tasks of [`ROWS_PER_TASK`] weight rows that one rayon job takes, out of `tasks`: about four
/// jobs per thread, for balance. A decode's task is a microsecond of work, as much as rayon's
/// splitting costs, so jobs of one task each would spend half their time splitting.
fn tasks_per_job(tasks: usize) -> usize {
    tasks.div_ceil(rayon::current_num_threads() * 4).max(1)
}

/// The activations of one product: `x` is `[m, cols]`, and `sums[i * stride + g]` is the sum of
/// group (or block) `g` of row `i` of `x`, for the formats that fold a per-group offset into the
/// product (`stride` is 0, and `sums` empty, for those that do not).
pub(crate) struct Activations<'a> {
    pub(crate) x: &'a [f32],
    pub(crate) sums: &'a [f32],
    pub(crate) cols: usize,
    pub(crate) stride: usize,
}

impl Activations<'_> {
    /// Row `i` of `x` and its group sums.
    pub(crate) fn row(&self, i: usize) -> (&[f32], &[f32]) {
        (
            &self.x[i * self.cols..][..self.cols],
            &self.sums[i * self.stride..][..self.stride],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `out[i][j] = 1000 i + j` must land in the right place, serial and parallel, for any m.
    #[test]
    fn every_element_is_written_once_in_place() {
        for (rows, cols, m) in [
            (1, 1, 1),
            (5, 3, 1),
            (37, 8, 3),
            (40, 4096, 7),
            (3, 100_000, 2),
        ] {
            let mut out = vec![f32::NAN; rows * m];
            for_each_weight_row(rows, cols, m, &mut out, |j, col| {
                assert_eq!(col.len(), m);
                for (i, v) in col.iter_mut().enumerate() {
                    *v = (1000 * i + j) as f32;
                }
            });
            for i in 0..m {
                for j in 0..rows {
                    assert_eq!(
                        out[i * rows + j],
                        (1000 * i + j) as f32,
                        "rows={rows} m={m}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_products_call_nothing() {
        let mut out: [f32; 0] = [];
        for_each_weight_row(0, 4, 3, &mut out, |_, _| unreachable!());
        for_each_weight_row(4, 4, 0, &mut out, |_, _| unreachable!());
    }

    #[test]
    fn chunks_are_equal_and_only_past_twice_the_budget() {
        // Rows of 576 f32 columns (2,304 bytes): 227 fit the budget.
        assert_eq!(chunk_rows(128, 2304), 128);
        assert_eq!(
            chunk_rows(454, 2304),
            456,
            "one chunk up to twice the budget"
        );
        assert_eq!(chunk_rows(455, 2304), 152, "then three equal ones");
        assert_eq!(chunk_rows(4000, 2304), 224);
        assert_eq!(chunk_rows(1, 0), 4);
    }
}
