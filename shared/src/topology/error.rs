//! Topology errors: what is wrong, and where (file, line, key).

use std::fmt;
use std::sync::Arc;

use crate::device::InvalidDevice;
use crate::isq::UnknownIsq;

/// An error in a topology file, with where it is: `{origin}:{line}: key `{key}`: {kind}`
/// (parts that are unknown are left out).
#[derive(Debug, Clone, thiserror::Error)]
pub struct TopologyError {
    /// The file path, or the label given to [`Topology::parse`].
    pub origin: String,
    /// 1-based line of the problem, where known.
    pub line: Option<usize>,
    /// The top-level key the problem is under, where there is one.
    pub key: Option<String>,
    /// What is wrong.
    pub kind: TopologyErrorKind,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.kind)
    }
}

/// The forms a top-level key may take, for error messages.
pub(super) const KEY_FORMS: &str = "expected a layer range `START-END` (e.g. `0-8`, end exclusive), a single layer `N` (e.g. `8`) or a regex selector `'/PATTERN/'`";

/// What is wrong in a topology file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TopologyErrorKind {
    /// The file could not be read.
    #[error("cannot read topology file: {0}")]
    Io(Arc<std::io::Error>),
    /// The text is not valid YAML (serde_yaml's message).
    #[error("invalid YAML: {message}")]
    Yaml {
        /// serde_yaml's description of the problem.
        message: String,
    },
    /// The top level is not a mapping.
    #[error(
        "expected a mapping of layer ranges (START-END), layers (N) or regex selectors ('/.../') to {{isq, device}}, found {found}"
    )]
    NotAMapping {
        /// What was found instead (`a sequence`, `a string`, ...).
        found: &'static str,
    },
    /// The value of a top-level key is not a mapping (nor empty).
    #[error(
        "expected a mapping with optional `isq` and `device` fields (or nothing), found {found}"
    )]
    ValueNotAMapping {
        /// What was found instead.
        found: &'static str,
    },
    /// A field other than `isq` or `device`.
    #[error("unknown field `{field}`; expected `isq` or `device`")]
    UnknownField {
        /// The field as written.
        field: String,
    },
    /// A field whose value is not a string.
    #[error("field `{field}` must be a string ({}), found {found}", field_expects(.field))]
    FieldNotString {
        /// `isq` or `device`.
        field: &'static str,
        /// What was found instead.
        found: &'static str,
    },
    /// A top-level key that is neither a range, a layer nor a regex selector.
    #[error("invalid key ({detail}); {KEY_FORMS}")]
    BadKey {
        /// Why the key was rejected.
        detail: String,
    },
    /// A range whose end is not greater than its start.
    #[error("range end must be greater than start (START-END: start inclusive, end exclusive)")]
    EmptyRange {
        /// The range's start.
        start: usize,
        /// The range's end.
        end: usize,
    },
    /// An `isq` that is not an ISQ type name.
    #[error("{0}")]
    UnknownIsq(UnknownIsq),
    /// A `device` that is not a device name.
    #[error("{0}")]
    InvalidDevice(InvalidDevice),
    /// A regex selector whose pattern does not compile.
    #[error("invalid regex selector: {message}")]
    InvalidRegex {
        /// The regex crate's message.
        message: String,
    },
    /// Two keys naming the same range, layer or regex (`8` and `'8'`, `0-8` twice).
    #[error("duplicate key{}", fmt_first(.first_line, .first_key))]
    DuplicateKey {
        /// Line of the first definition, where known.
        first_line: Option<usize>,
        /// The first definition as written, when it is spelled differently (`8` vs `8-9`).
        first_key: Option<String>,
    },
    /// A field (`isq`, `device`) given twice in one entry.
    #[error("duplicate field `{field}`{}", fmt_first(.first_line, &None))]
    DuplicateField {
        /// The field as written.
        field: String,
        /// Line of the first definition, where known.
        first_line: Option<usize>,
    },
    /// A range that reaches past the model's last layer (from [`Topology::validate`]).
    #[error("{} `{range}` ends past the model's {}", range_word(.single), fmt_layers(.n_layers))]
    RangePastModel {
        /// The range as written.
        range: String,
        /// Whether it was written as a single layer `N`.
        single: bool,
        /// The model's layer count.
        n_layers: usize,
    },
    /// A regex selector that matches no tensor of the model (from [`Topology::validate`]).
    #[error("regex selector matches no tensor of the model ({})", fmt_tensors(.n_tensors, .example))]
    SelectorMatchesNothing {
        /// How many tensors were checked.
        n_tensors: usize,
        /// One tensor name, to show what names look like.
        example: Option<String>,
    },
}

fn field_expects(field: &str) -> &'static str {
    if field == "isq" {
        "an ISQ type name such as `Q4K`"
    } else {
        "`cpu`, `cpu[N]`, `cuda[N]` or `metal[N]`"
    }
}

fn fmt_first(first_line: &Option<usize>, first_key: &Option<String>) -> String {
    match (*first_line, first_key) {
        (Some(l), Some(k)) => format!("; first defined on line {l} (as `{k}`)"),
        (Some(l), None) => format!("; first defined on line {l}"),
        (None, Some(k)) => format!("; first defined as `{k}`"),
        (None, None) => {
            "; each range, layer, regex selector and field may appear only once".to_string()
        }
    }
}

fn range_word(single: &bool) -> &'static str {
    if *single { "layer" } else { "range" }
}

fn fmt_layers(n: &usize) -> String {
    match *n {
        0 => "0 layers".to_string(),
        1 => "1 layer (0-0)".to_string(),
        n => format!("{n} layers (0-{})", n - 1),
    }
}

fn fmt_tensors(n: &usize, example: &Option<String>) -> String {
    match example {
        Some(e) => format!("checked {n} tensors, named like `{e}`"),
        None => format!("checked {n} tensors"),
    }
}
