//! The error type of every kernel.

/// Why a kernel refused its inputs.
///
/// Kernels check shapes, lengths and indices before touching any data, so a malformed request
/// is reported here instead of panicking or reading out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// A buffer's length does not match the shape it was passed with.
    #[error("{what} has length {actual}, expected {expected}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// The length the shape implies.
        expected: usize,
        /// The buffer's actual length.
        actual: usize,
    },
    /// A shape parameter is invalid: zero, not divisible as required, or so large that the
    /// element count overflows `usize`.
    #[error("invalid shape: {0}")]
    InvalidShape(String),
    /// A quantization bit width other than the supported ones.
    #[error("unsupported bit width {0} (expected 4 or 8)")]
    UnsupportedBits(u8),
    /// A weight, scale or zero point is NaN or infinite.
    #[error("{what} at index {index} is not finite")]
    NonFinite {
        /// Which buffer.
        what: &'static str,
        /// Index of the first offending element.
        index: usize,
    },
    /// A weight group spans a range so wide that its scale does not fit in an f16.
    #[error("weight group {group} spans a range too wide for an f16 scale")]
    ScaleOverflow {
        /// Index of the group, counted over the whole matrix in row-major order.
        group: usize,
    },
    /// An FP8 E4M3 byte that encodes NaN (0x7F or 0xFF).
    #[error("fp8 byte {index} is the NaN code 0x{code:02x}")]
    NanCode {
        /// Index of the byte.
        index: usize,
        /// The byte itself.
        code: u8,
    },
    /// A matrix implemented outside this crate (over another library) failed.
    #[error("{0}")]
    Backend(String),
    /// A GPU device is missing, unusable or failed (the message names it, as `cuda[N]`).
    #[error("{0}")]
    Device(String),
    /// A row index past the end of a matrix.
    #[error("row {row} is out of range for a matrix of {rows} rows")]
    RowOutOfRange {
        /// The requested row.
        row: usize,
        /// Number of rows of the matrix.
        rows: usize,
    },
    /// A sequence's block table has fewer entries than its positions need.
    #[error("block table has {len} entries but the positions used need {needed}")]
    BlockTableTooShort {
        /// Entries in the table.
        len: usize,
        /// Entries needed.
        needed: usize,
    },
    /// A block table entry names a block outside the KV pool.
    #[error(
        "block table entry {index} names block {block}, but the pool holds {num_blocks} blocks"
    )]
    BlockOutOfRange {
        /// Index of the entry in the block table.
        index: usize,
        /// The block it names.
        block: u32,
        /// Number of blocks in the pool.
        num_blocks: usize,
    },
}
