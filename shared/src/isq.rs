//! In-situ quantization (ISQ) types: the names users write, their storage cost, and the
//! block-shape rules that decide whether a tensor can take a type or must fall back.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ggml::GgmlType;

/// One of the fifteen ISQ types a topology or `--isq` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum IsqType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Hqq4,
    Hqq8,
    Fp8,
}

/// Group size (along a weight row) of HQQ4. Groups of 64 (4.5 bits per weight) measured
/// perplexity 23.1 (1.37x f32) on the default model, whose weights come from 32-wide Q4_1 blocks;
/// groups of 32 (5 bits per weight, Q4_1's cost) measured 16.86.
pub const HQQ4_GROUP: usize = 32;
/// Group size of HQQ8 (8.5 bits per weight).
pub const HQQ8_GROUP: usize = 64;

impl IsqType {
    /// Every type, in the order the documentation lists them.
    pub const ALL: [IsqType; 15] = [
        IsqType::Q4_0,
        IsqType::Q4_1,
        IsqType::Q5_0,
        IsqType::Q5_1,
        IsqType::Q8_0,
        IsqType::Q8_1,
        IsqType::Q2K,
        IsqType::Q3K,
        IsqType::Q4K,
        IsqType::Q5K,
        IsqType::Q6K,
        IsqType::Q8K,
        IsqType::Hqq4,
        IsqType::Hqq8,
        IsqType::Fp8,
    ];

    /// The canonical spelling (`Q4_0`, `Q4K`, `HQQ4`, `FP8`).
    pub fn name(self) -> &'static str {
        match self {
            IsqType::Q4_0 => "Q4_0",
            IsqType::Q4_1 => "Q4_1",
            IsqType::Q5_0 => "Q5_0",
            IsqType::Q5_1 => "Q5_1",
            IsqType::Q8_0 => "Q8_0",
            IsqType::Q8_1 => "Q8_1",
            IsqType::Q2K => "Q2K",
            IsqType::Q3K => "Q3K",
            IsqType::Q4K => "Q4K",
            IsqType::Q5K => "Q5K",
            IsqType::Q6K => "Q6K",
            IsqType::Q8K => "Q8K",
            IsqType::Hqq4 => "HQQ4",
            IsqType::Hqq8 => "HQQ8",
            IsqType::Fp8 => "FP8",
        }
    }

    /// A comma-separated list of every valid name, for error messages.
    pub fn valid_names() -> String {
        Self::ALL
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The GGML block type an ISQ type is stored as, if it is one.
    pub fn ggml(self) -> Option<GgmlType> {
        Some(match self {
            IsqType::Q4_0 => GgmlType::Q4_0,
            IsqType::Q4_1 => GgmlType::Q4_1,
            IsqType::Q5_0 => GgmlType::Q5_0,
            IsqType::Q5_1 => GgmlType::Q5_1,
            IsqType::Q8_0 => GgmlType::Q8_0,
            IsqType::Q8_1 => GgmlType::Q8_1,
            IsqType::Q2K => GgmlType::Q2K,
            IsqType::Q3K => GgmlType::Q3K,
            IsqType::Q4K => GgmlType::Q4K,
            IsqType::Q5K => GgmlType::Q5K,
            IsqType::Q6K => GgmlType::Q6K,
            IsqType::Q8K => GgmlType::Q8K,
            IsqType::Hqq4 | IsqType::Hqq8 | IsqType::Fp8 => return None,
        })
    }

    /// Number of weights one quantization block covers along a row.
    pub fn block_size(self) -> usize {
        match (self.ggml(), self) {
            (Some(g), _) => g.block_size(),
            (None, IsqType::Hqq4) => HQQ4_GROUP,
            (None, IsqType::Hqq8) => HQQ8_GROUP,
            (None, _) => 1,
        }
    }

    /// Bytes one block takes (for FP8: one weight; its per-row scale is counted by
    /// [`IsqType::storage_bytes`]).
    pub fn block_bytes(self) -> usize {
        match (self.ggml(), self) {
            (Some(g), _) => g.block_bytes(),
            // packed codes + f16 scale + f16 zero per group
            (None, IsqType::Hqq4) => HQQ4_GROUP / 2 + 4,
            (None, IsqType::Hqq8) => HQQ8_GROUP + 4,
            (None, _) => 1,
        }
    }

    /// Bytes a `[rows, cols]` weight takes in this type, or `None` when `cols` does not fit
    /// the block size.
    pub fn storage_bytes(self, rows: usize, cols: usize) -> Option<usize> {
        if !self.fits(cols) {
            return None;
        }
        let per_row = cols / self.block_size() * self.block_bytes();
        let scales = if self == IsqType::Fp8 { 4 } else { 0 };
        Some(rows * (per_row + scales))
    }

    /// Whether this type's quantizer weighs its error by input-channel importance (llama.cpp's
    /// importance-matrix search, used for the 2 to 6 bit k-quants).
    pub fn takes_importance(self) -> bool {
        matches!(
            self,
            IsqType::Q2K | IsqType::Q3K | IsqType::Q4K | IsqType::Q5K | IsqType::Q6K
        )
    }

    /// Whether a row of `cols` weights splits into whole blocks of this type.
    pub fn fits(self, cols: usize) -> bool {
        cols > 0 && cols.is_multiple_of(self.block_size())
    }

    /// The type used instead when a row does not fit this type's blocks. K-quants fall back
    /// as llama.cpp's `llama_tensor_get_type` does (Q4K to Q5_0, Q6K to Q8_0; Q2K/Q3K to Q4_0,
    /// standing in for llama.cpp's IQ4_NL), except Q5K, which takes Q5_0 (its own 5.5 bits per
    /// weight) rather than llama.cpp's Q5_1 (6 bits, and worse on the default model: perplexity
    /// 19.6 against Q5_0's 18.2); Q8K to Q8_0; HQQ to the block-32 type of the same width.
    /// Returns `None` where no lower block size exists.
    pub fn fallback(self) -> Option<IsqType> {
        match self {
            IsqType::Q2K | IsqType::Q3K => Some(IsqType::Q4_0),
            IsqType::Q4K | IsqType::Q5K => Some(IsqType::Q5_0),
            IsqType::Q6K | IsqType::Q8K => Some(IsqType::Q8_0),
            IsqType::Hqq4 => Some(IsqType::Q4_0),
            IsqType::Hqq8 => Some(IsqType::Q8_0),
            _ => None,
        }
    }

    /// Resolves the type a row of `cols` weights actually gets: this type if it fits, else
    /// the first fallback that fits; `None` if nothing fits (the weight stays as stored).
    pub fn resolve_for(self, cols: usize) -> Option<IsqType> {
        let mut t = self;
        loop {
            if t.fits(cols) {
                return Some(t);
            }
            t = t.fallback()?;
        }
    }
}

impl From<IsqType> for String {
    fn from(t: IsqType) -> String {
        t.name().to_string()
    }
}

impl TryFrom<String> for IsqType {
    type Error = UnknownIsq;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for IsqType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An ISQ name that is not one of the fifteen types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown ISQ type `{given}`; expected one of {}",
    IsqType::valid_names()
)]
pub struct UnknownIsq {
    pub given: String,
}

impl FromStr for IsqType {
    type Err = UnknownIsq;

    /// Accepts the canonical names case-insensitively, and the GGML spellings with an
    /// underscore before `K` (`Q4_K`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_uppercase();
        let norm = match norm.as_str() {
            "Q2_K" => "Q2K",
            "Q3_K" => "Q3K",
            "Q4_K" => "Q4K",
            "Q5_K" => "Q5K",
            "Q6_K" => "Q6K",
            "Q8_K" => "Q8K",
            other => other,
        };
        IsqType::ALL
            .iter()
            .copied()
            .find(|t| t.name() == norm)
            .ok_or_else(|| UnknownIsq {
                given: s.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in IsqType::ALL {
            assert_eq!(t.name().parse::<IsqType>(), Ok(t));
            assert_eq!(t.name().to_lowercase().parse::<IsqType>(), Ok(t));
        }
        assert_eq!("q4_k".parse::<IsqType>(), Ok(IsqType::Q4K));
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let err = "Q3_0".parse::<IsqType>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`Q3_0`"), "{msg}");
        assert!(msg.contains("Q4_0, Q4_1, Q5_0"), "{msg}");
        assert!(msg.contains("HQQ4, HQQ8, FP8"), "{msg}");
    }

    #[test]
    fn k_quants_fall_back_on_576_wide_rows() {
        assert_eq!(IsqType::Q4K.resolve_for(576), Some(IsqType::Q5_0));
        assert_eq!(IsqType::Q4K.resolve_for(1536), Some(IsqType::Q4K));
        assert_eq!(IsqType::Q2K.resolve_for(576), Some(IsqType::Q4_0));
        assert_eq!(IsqType::Q6K.resolve_for(576), Some(IsqType::Q8_0));
        assert_eq!(IsqType::Q5K.resolve_for(576), Some(IsqType::Q5_0));
        assert_eq!(IsqType::Hqq4.resolve_for(576), Some(IsqType::Hqq4));
        assert_eq!(IsqType::Hqq8.resolve_for(96), Some(IsqType::Q8_0));
        assert_eq!(IsqType::Q4_0.resolve_for(48), None);
        assert_eq!(IsqType::Fp8.resolve_for(7), Some(IsqType::Fp8));
    }

    #[test]
    fn storage_bytes() {
        assert_eq!(IsqType::Q4_1.storage_bytes(576, 1536), Some(552_960));
        assert_eq!(IsqType::Q8_0.storage_bytes(49152, 576), Some(30_081_024));
        assert_eq!(IsqType::Fp8.storage_bytes(2, 3), Some(2 * (3 + 4)));
        assert_eq!(IsqType::Q4K.storage_bytes(1, 576), None);
    }
}
