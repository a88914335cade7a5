//! A product's output, written in place by the tasks that each compute some of its columns
//! (the int8 products' tiles, the row-wise products' groups of weight rows).

#![allow(unsafe_code)]

use std::marker::PhantomData;

use rayon::prelude::*;

use crate::error::KernelError;
use crate::matrix::{check_len, checked_len};

/// A row-major `[m][cols]` output cut into strips of columns, each handed to exactly one task:
/// the tiles (or weight rows) of a product cover disjoint columns of every row, so its tasks
/// write their results in place, with no scratch buffer the size of the output.
///
/// The output may also be several buffers side by side ([`Columns::side_by_side`]): a stacked
/// product's parts (q, k and v; gate and up) land each in its own `[m][width]` buffer, with no
/// copy out of a stacked one.
pub(crate) struct Columns<'a> {
    /// Each buffer's first column among the `cols`, its width and its start.
    parts: Vec<Part>,
    m: usize,
    cols: usize,
    _out: PhantomData<&'a mut [f32]>,
}

/// One buffer of a [`Columns`]: the columns `first..first + cols` of every row.
struct Part {
    ptr: *mut f32,
    first: usize,
    cols: usize,
}

// SAFETY: a `Columns` is an exclusive borrow of its buffers, like the `&mut [f32]`s it was made
// from. Threads write through it only with a `Strip`, and each strip (a set of columns) is
// handed out once, so no two threads touch one element.
unsafe impl Send for Columns<'_> {}
// SAFETY: as above.
unsafe impl Sync for Columns<'_> {}

impl<'a> Columns<'a> {
    /// `out` as `m` rows of `cols`.
    ///
    /// # Errors
    ///
    /// [`KernelError::LengthMismatch`] if its length is not `m · cols`.
    pub(crate) fn new(out: &'a mut [f32], m: usize, cols: usize) -> Result<Self, KernelError> {
        check_len("output", out.len(), checked_len("output", m, cols)?)?;
        Ok(Columns {
            parts: vec![Part {
                ptr: out.as_mut_ptr(),
                first: 0,
                cols,
            }],
            m,
            cols,
            _out: PhantomData,
        })
    }

    /// `outs[k]` as `m` rows of `widths[k]`, side by side: together `m` rows of `cols`, the sum
    /// of the widths.
    ///
    /// # Errors
    ///
    /// [`KernelError::LengthMismatch`] if the widths do not add up to `cols` or a buffer's
    /// length is not `m` times its width.
    pub(crate) fn side_by_side(
        outs: &'a mut [&mut [f32]],
        widths: &[usize],
        m: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        check_len("output widths", outs.len(), widths.len())?;
        let mut parts = Vec::with_capacity(outs.len());
        let mut first = 0usize;
        for (out, &w) in outs.iter_mut().zip(widths) {
            check_len("output part", out.len(), checked_len("output part", m, w)?)?;
            parts.push(Part {
                ptr: out.as_mut_ptr(),
                first,
                cols: w,
            });
            first = first.saturating_add(w);
        }
        check_len("output columns", first, cols)?;
        Ok(Columns {
            parts,
            m,
            cols,
            _out: PhantomData,
        })
    }

    /// Calls `f` once for each strip of `width` columns (the last one may be narrower), in
    /// parallel (at least `min_len` strips a job) or in order. It takes `&mut self`, so that
    /// no two calls hand out the same strip at once.
    pub(crate) fn for_each_strip<F>(&mut self, width: usize, parallel: bool, min_len: usize, f: F)
    where
        F: Fn(Strip<'_, 'a>) + Sync + Send,
    {
        let this = &*self;
        let strips = this.cols.div_ceil(width.max(1));
        let strip = |s: usize| {
            let (first, end) = (s * width, this.cols.min((s + 1) * width));
            f(Strip {
                out: this,
                first,
                end,
                within: this
                    .parts
                    .iter()
                    .position(|p| p.first <= first && end <= p.first.saturating_add(p.cols)),
            })
        };
        if parallel {
            (0..strips)
                .into_par_iter()
                .with_min_len(min_len.max(1))
                .for_each(strip);
        } else {
            (0..strips).for_each(strip);
        }
    }
}

/// The columns `first..end` of every row of a [`Columns`], owned by one task.
pub(crate) struct Strip<'s, 'a> {
    out: &'s Columns<'a>,
    first: usize,
    end: usize,
    /// The part that holds all of the strip's columns, where one does (the usual case: parts
    /// as wide as whole strips).
    within: Option<usize>,
}

impl Strip<'_, '_> {
    /// The strip's first column.
    pub(crate) fn first(&self) -> usize {
        self.first
    }

    /// The strip's width in columns.
    pub(crate) fn width(&self) -> usize {
        self.end - self.first
    }

    /// Writes `N` results of row `i` to the strip's columns `first + offset ..`, cut at the
    /// strip's end; positions outside the strip or the output are ignored.
    pub(crate) fn write<const N: usize>(&self, i: usize, offset: usize, lanes: &[f32; N]) {
        let first = self.first.saturating_add(offset);
        if i >= self.out.m || first >= self.end {
            return;
        }
        let end = first + N.min(self.end - first);
        if let Some(part) = self.within.and_then(|k| self.out.parts.get(k))
            && end - first == N
        {
            // SAFETY: `i < m` and `part.first <= self.first <= first < end <= self.end <=
            // part.first + part.cols`, so the `N` elements from `i · part.cols + first -
            // part.first` lie inside the part's `m · part.cols` buffer, which `out` borrows
            // exclusively, and within this strip's columns, which no other thread holds.
            unsafe {
                let dst = part.ptr.add(i * part.cols + first - part.first);
                dst.cast::<[f32; N]>().write_unaligned(*lanes);
            }
            return;
        }
        for part in &self.out.parts {
            let (lo, hi) = (first.max(part.first), end.min(part.first + part.cols));
            if lo >= hi {
                continue;
            }
            // SAFETY: `i < m` and `part.first <= lo < hi <= part.first + part.cols`, so the
            // `hi - lo` elements from `i · part.cols + lo - part.first` lie inside the part's
            // `m · part.cols` buffer, which `out` borrows exclusively, and within this strip's
            // columns, which no other thread holds. `lanes[lo - first..hi - first]` is in
            // bounds since `hi - first <= N`.
            unsafe {
                let dst = part.ptr.add(i * part.cols + lo - part.first);
                if hi - lo == N {
                    dst.cast::<[f32; N]>().write_unaligned(*lanes);
                } else {
                    std::ptr::copy_nonoverlapping(lanes.as_ptr().add(lo - first), dst, hi - lo);
                }
            }
        }
    }
}
