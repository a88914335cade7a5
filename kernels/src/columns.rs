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
pub(crate) struct Columns<'a> {
    ptr: *mut f32,
    m: usize,
    cols: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `Columns` is an exclusive borrow of its buffer, like the `&mut [f32]` it was made
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
            ptr: out.as_mut_ptr(),
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
            f(Strip {
                out: this,
                first: s * width,
                end: this.cols.min((s + 1) * width),
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
        let n = N.min(self.end - first);
        // SAFETY: `i < m` and `first + n <= end <= cols`, so the `n` elements from
        // `i · cols + first` lie inside the `m · cols` buffer that `out` borrows exclusively,
        // and within this strip, which no other thread holds.
        unsafe {
            let dst = self.out.ptr.add(i * self.out.cols + first);
            if n == N {
                dst.cast::<[f32; N]>().write_unaligned(*lanes);
            } else {
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n);
            }
        }
    }
}
