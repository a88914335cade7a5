//! Model topology files: which ISQ type and which device each layer (or tensor) gets.
//!
//! The format is mistral.rs's topology YAML. The top level is a mapping whose keys are
//!
//! * a layer range `START-END` (start inclusive, end exclusive, `START < END`), e.g. `0-8`;
//! * a single layer `N`, meaning `N-(N+1)` (written `8:` or `'8':`);
//! * a regex selector `'/PATTERN/'`, matched (unanchored, like [`regex::Regex::is_match`])
//!   against fully qualified tensor names such as `model.layers.3.self_attn.q_proj.weight`.
//!
//! Each value is a mapping with an optional `isq` (an [`IsqType`] name) and an optional
//! `device` (a [`DeviceSpec`]: `cpu`, `cpu[N]`, `cuda[N]`, `metal[N]`); a null value (a key with
//! nothing after the colon) is an entry with neither, and a field written with no value
//! (`isq:`) is the same as leaving it out. Any other field is an error.
//!
//! ```yaml
//! 0-8:
//!   isq: Q3K
//!   device: cuda[0]
//! 16-24:
//!   isq: Q6K
//! '/attn\.q_proj$/':
//!   isq: Q4K
//! ```
//!
//! Resolution follows mistral.rs exactly:
//!
//! * Where ranges overlap, the range with the higher end wins; between ranges with the same
//!   end, the one declared later wins. The winning range supplies the whole entry: a field it
//!   leaves out is *not* taken from a losing range.
//! * A layer that no range covers has no topology entry, and the caller applies its global
//!   `--isq`. A covered layer whose winning range names no `isq` gets no ISQ at all.
//! * Regex selectors override ranges. Among selectors, the last declared one that matches wins,
//!   and it overrides only the fields it sets.
//!
//! serde_yaml values carry no positions, so a small locator over the raw text finds the line of
//! each top-level key and of the fields in its block (block-style YAML); errors carry the file,
//! the line (where found) and the key.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use regex::Regex;
use serde_yaml::Value;

use crate::device::{DeviceSpec, InvalidDevice};
use crate::isq::{IsqType, UnknownIsq};

/// What a topology says about one layer or tensor. `None` fields are not set by the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerTopology {
    /// ISQ type to quantize to. For a range entry, `None` means "no ISQ for these layers".
    pub isq: Option<IsqType>,
    /// Device the layer (or tensor) lives on; `None` leaves the caller's default.
    pub device: Option<DeviceSpec>,
}

/// One layer-range entry (`START-END` or `N`) of a topology file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeEntry {
    /// First layer covered (inclusive).
    pub start: usize,
    /// One past the last layer covered (exclusive); always greater than `start`.
    pub end: usize,
    /// The entry's fields.
    pub entry: LayerTopology,
    /// The key as written in the file (`0-8`, `8`).
    pub key: String,
    /// 1-based line of the key in the file; 0 when it could not be located (flow-style YAML).
    pub line: usize,
}

impl RangeEntry {
    /// Whether this range covers `layer`.
    pub fn contains(&self, layer: usize) -> bool {
        self.start <= layer && layer < self.end
    }
}

/// One regex-selector entry (`'/PATTERN/'`) of a topology file.
#[derive(Debug, Clone)]
pub struct SelectorEntry {
    /// The compiled pattern (the key without its slashes); matched unanchored.
    pub regex: Regex,
    /// The key as written in the file, slashes included (`/attn\.q_proj$/`).
    pub key: String,
    /// The entry's fields; only the set ones override a layer's range entry.
    pub entry: LayerTopology,
    /// 1-based line of the key in the file; 0 when it could not be located (flow-style YAML).
    pub line: usize,
}

impl SelectorEntry {
    /// Whether the selector matches any of `names` (the names one tensor is known by).
    pub fn matches_any<S: AsRef<str>>(&self, names: &[S]) -> bool {
        names.iter().any(|n| self.regex.is_match(n.as_ref()))
    }
}

/// A parsed topology file: range entries and regex selectors, each in declaration order.
#[derive(Debug, Clone)]
pub struct Topology {
    origin: String,
    ranges: Vec<RangeEntry>,
    selectors: Vec<SelectorEntry>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::empty()
    }
}

/// Label used as the origin of [`Topology::empty`].
const EMPTY_ORIGIN: &str = "<none>";

impl Topology {
    /// Parses topology YAML. `origin` names the source in errors (a path, or a label such as
    /// `<inline>`). An empty text, or one with only comments, is a valid empty topology.
    pub fn parse(text: &str, origin: &str) -> Result<Topology, TopologyError> {
        let located = locate(text);
        let err =
            |line: Option<usize>, key: Option<String>, kind: TopologyErrorKind| TopologyError {
                origin: origin.to_string(),
                line,
                key,
                kind,
            };

        let root: Value = match serde_yaml::from_str(text) {
            Ok(v) => v,
            Err(e) => return Err(yaml_error(&e, &located, origin)),
        };
        let mapping = match root {
            Value::Null => {
                return Ok(Topology {
                    origin: origin.to_string(),
                    ranges: Vec::new(),
                    selectors: Vec::new(),
                });
            }
            Value::Mapping(m) => m,
            other => {
                return Err(err(
                    first_content_line(text),
                    None,
                    TopologyErrorKind::NotAMapping {
                        found: value_kind(&other),
                    },
                ));
            }
        };

        let mut ranges = Vec::new();
        let mut selectors = Vec::new();
        // identity of a key -> (line, key as written) of its first definition
        let mut seen: HashMap<KeyId, (usize, String)> = HashMap::new();
        let mut cursor = 0usize;

        for (key, value) in &mapping {
            let loc = match_located(&located, &mut cursor, key);
            let key_line = loc.map(|l| l.line);
            let key_text = key_display(key);
            let kerr = |line: Option<usize>, kind| err(line, Some(key_text.clone()), kind);

            let parsed = classify_key(key).map_err(|k| kerr(key_line, k))?;
            let id = match &parsed {
                ParsedKey::Range { start, end } => KeyId::Range(*start, *end),
                ParsedKey::Regex(re) => KeyId::Regex(re.as_str().to_string()),
            };
            if let Some((first_line, first_key)) = seen.get(&id) {
                return Err(kerr(
                    key_line,
                    TopologyErrorKind::DuplicateKey {
                        first_line: (*first_line > 0).then_some(*first_line),
                        first_key: (*first_key != key_text).then(|| first_key.clone()),
                    },
                ));
            }
            seen.insert(id, (key_line.unwrap_or(0), key_text.clone()));

            let entry =
                parse_entry(value, loc).map_err(|(line, kind)| kerr(line.or(key_line), kind))?;
            let line = key_line.unwrap_or(0);
            match parsed {
                ParsedKey::Range { start, end } => ranges.push(RangeEntry {
                    start,
                    end,
                    entry,
                    key: key_text,
                    line,
                }),
                ParsedKey::Regex(regex) => selectors.push(SelectorEntry {
                    regex,
                    key: key_text,
                    entry,
                    line,
                }),
            }
        }

        Ok(Topology {
            origin: origin.to_string(),
            ranges,
            selectors,
        })
    }

    /// Reads and parses a topology file; the origin (in errors too, I/O errors included) is
    /// `path.display()`.
    pub fn from_file(path: &Path) -> Result<Topology, TopologyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            origin: origin.clone(),
            line: None,
            key: None,
            kind: TopologyErrorKind::Io(e),
        })?;
        Topology::parse(&text, &origin)
    }

    /// A topology with no entries (every layer takes the global settings). Its origin is
    /// `<none>`.
    pub fn empty() -> Topology {
        Topology {
            origin: EMPTY_ORIGIN.to_string(),
            ranges: Vec::new(),
            selectors: Vec::new(),
        }
    }

    /// Where the topology came from: the file path, or the label given to [`Topology::parse`].
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The range entries, in declaration order.
    pub fn ranges(&self) -> &[RangeEntry] {
        &self.ranges
    }

    /// The regex selectors, in declaration order.
    pub fn selectors(&self) -> &[SelectorEntry] {
        &self.selectors
    }

    /// Whether the topology has neither ranges nor selectors.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.selectors.is_empty()
    }

    /// Winning range for `layer`, None if uncovered. Among the ranges covering `layer`, the one
    /// with the highest end wins; among equal ends, the one declared last.
    pub fn layer(&self, layer: usize) -> Option<&RangeEntry> {
        let mut best: Option<&RangeEntry> = None;
        for r in self.ranges.iter().filter(|r| r.contains(layer)) {
            if best.is_none_or(|b| r.end >= b.end) {
                best = Some(r);
            }
        }
        best
    }

    /// Last-declared selector matching any of `names` (a tensor may be known by several names,
    /// e.g. its Hugging Face name and its GGUF name).
    pub fn selector_for(&self, names: &[&str]) -> Option<&SelectorEntry> {
        self.selectors.iter().rev().find(|s| s.matches_any(names))
    }

    /// Resolves the settings of one tensor, the way mistral.rs does: the base is the winning
    /// range of `layer` (its whole entry), or, when `layer` is `None` or uncovered,
    /// `{ isq: global_isq, device: None }`; then the last matching selector overrides the
    /// fields it sets.
    pub fn resolve(
        &self,
        layer: Option<usize>,
        names: &[&str],
        global_isq: Option<IsqType>,
    ) -> LayerTopology {
        let mut out = match layer.and_then(|l| self.layer(l)) {
            Some(r) => r.entry,
            None => LayerTopology {
                isq: global_isq,
                device: None,
            },
        };
        if let Some(sel) = self.selector_for(names) {
            if sel.entry.isq.is_some() {
                out.isq = sel.entry.isq;
            }
            if sel.entry.device.is_some() {
                out.device = sel.entry.device;
            }
        }
        out
    }

    /// Checks against a concrete model: every range must end at or before `n_layers`; every
    /// selector must match at least one tensor (`tensors` yields, per tensor, all names it is
    /// known by). Errors carry file, line and key; the first problem (ranges first, then
    /// selectors, each in declaration order) is reported.
    pub fn validate(&self, n_layers: usize, tensors: &[Vec<String>]) -> Result<(), TopologyError> {
        let err = |line: usize, key: &str, kind| TopologyError {
            origin: self.origin.clone(),
            line: (line > 0).then_some(line),
            key: Some(key.to_string()),
            kind,
        };
        for r in &self.ranges {
            if r.end > n_layers {
                return Err(err(
                    r.line,
                    &r.key,
                    TopologyErrorKind::RangePastModel {
                        range: r.key.clone(),
                        single: r.end - r.start == 1 && !r.key.contains('-'),
                        n_layers,
                    },
                ));
            }
        }
        for s in &self.selectors {
            if !tensors.iter().any(|names| s.matches_any(names)) {
                return Err(err(
                    s.line,
                    &s.key,
                    TopologyErrorKind::SelectorMatchesNothing {
                        n_tensors: tensors.len(),
                        example: tensors.first().and_then(|n| n.first()).cloned(),
                    },
                ));
            }
        }
        Ok(())
    }
}

/// An error in a topology file, with where it is: `{origin}:{line}: key `{key}`: {kind}`
/// (parts that are unknown are left out).
#[derive(Debug, thiserror::Error)]
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
const KEY_FORMS: &str = "expected a layer range `START-END` (e.g. `0-8`, end exclusive), a single layer `N` (e.g. `8`) or a regex selector `'/PATTERN/'`";

/// What is wrong in a topology file.
#[derive(Debug, thiserror::Error)]
pub enum TopologyErrorKind {
    /// The file could not be read.
    #[error("cannot read topology file: {0}")]
    Io(std::io::Error),
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

/// The identity of a key, for duplicate detection (`8`, `'8'` and `8-9` are the same).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyId {
    Range(usize, usize),
    Regex(String),
}

enum ParsedKey {
    Range { start: usize, end: usize },
    Regex(Regex),
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// The key as written, as near as a `Value` allows.
fn key_display(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "~".to_string(),
        Value::Sequence(_) => "[...]".to_string(),
        Value::Mapping(_) => "{...}".to_string(),
        Value::Tagged(t) => format!("{} ...", t.tag),
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_layer(s: &str) -> Result<usize, TopologyErrorKind> {
    s.parse::<usize>().map_err(|_| TopologyErrorKind::BadKey {
        detail: format!("layer number `{s}` is too large"),
    })
}

fn single_layer(n: usize) -> Result<ParsedKey, TopologyErrorKind> {
    let end = n.checked_add(1).ok_or_else(|| TopologyErrorKind::BadKey {
        detail: format!("layer number `{n}` is too large"),
    })?;
    Ok(ParsedKey::Range { start: n, end })
}

fn classify_key(key: &Value) -> Result<ParsedKey, TopologyErrorKind> {
    let bad = |detail: &str| TopologyErrorKind::BadKey {
        detail: detail.to_string(),
    };
    let s = match key {
        Value::String(s) => s.as_str(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                let n = usize::try_from(u).map_err(|_| bad("layer number is too large"))?;
                return single_layer(n);
            }
            if n.as_i64().is_some() {
                return Err(bad("layer numbers cannot be negative"));
            }
            return Err(bad("a layer number must be a whole number"));
        }
        other => {
            return Err(TopologyErrorKind::BadKey {
                detail: format!("found {}", value_kind(other)),
            });
        }
    };
    if s.is_empty() {
        return Err(bad("empty key"));
    }
    if s.starts_with('/') {
        if s.len() < 2 || !s.ends_with('/') {
            return Err(bad("a regex selector must start and end with `/`"));
        }
        let pattern = &s[1..s.len() - 1];
        if pattern.is_empty() {
            return Err(bad("empty regex selector"));
        }
        return Regex::new(pattern).map(ParsedKey::Regex).map_err(|e| {
            TopologyErrorKind::InvalidRegex {
                message: e.to_string(),
            }
        });
    }
    if let Some((a, b)) = s.split_once('-') {
        if !all_digits(a) || !all_digits(b) {
            return Err(bad(
                "not a layer range: START and END must be non-negative integers",
            ));
        }
        let (start, end) = (parse_layer(a)?, parse_layer(b)?);
        if end <= start {
            return Err(TopologyErrorKind::EmptyRange { start, end });
        }
        return Ok(ParsedKey::Range { start, end });
    }
    if all_digits(s) {
        return single_layer(parse_layer(s)?);
    }
    Err(bad("not a layer number, layer range or regex selector"))
}

/// Parses one entry's value. Errors carry the line of the offending field, where located.
fn parse_entry(
    value: &Value,
    loc: Option<&LocatedKey>,
) -> Result<LayerTopology, (Option<usize>, TopologyErrorKind)> {
    let field_line = |name: &str| loc.and_then(|l| l.field_line(name));
    let map = match value {
        Value::Null => return Ok(LayerTopology::default()),
        Value::Mapping(m) => m,
        other => {
            return Err((
                None,
                TopologyErrorKind::ValueNotAMapping {
                    found: value_kind(other),
                },
            ));
        }
    };
    let mut out = LayerTopology::default();
    for (k, v) in map {
        let name = match k {
            Value::String(s) if s == "isq" => "isq",
            Value::String(s) if s == "device" => "device",
            other => {
                let field = key_display(other);
                return Err((
                    field_line(&field),
                    TopologyErrorKind::UnknownField { field },
                ));
            }
        };
        let line = field_line(name);
        let text = match v {
            Value::Null => continue,
            Value::String(s) => s.as_str(),
            other => {
                return Err((
                    line,
                    TopologyErrorKind::FieldNotString {
                        field: name,
                        found: value_kind(other),
                    },
                ));
            }
        };
        if name == "isq" {
            out.isq = Some(
                text.parse()
                    .map_err(|e| (line, TopologyErrorKind::UnknownIsq(e)))?,
            );
        } else {
            out.device = Some(
                text.parse()
                    .map_err(|e| (line, TopologyErrorKind::InvalidDevice(e)))?,
            );
        }
    }
    Ok(out)
}

/// Turns a serde_yaml error into a topology error; a duplicate-key error is reported as
/// [`TopologyErrorKind::DuplicateKey`] at the later key when the locator can find it.
fn yaml_error(e: &serde_yaml::Error, located: &[LocatedKey], origin: &str) -> TopologyError {
    let message = e.to_string();
    let yaml_line = e.location().map(|l| l.line());
    if message.contains("duplicate entry") {
        if let Some(err) = find_duplicate(located, origin) {
            return err;
        }
        return TopologyError {
            origin: origin.to_string(),
            line: yaml_line,
            key: None,
            kind: TopologyErrorKind::DuplicateKey {
                first_line: None,
                first_key: None,
            },
        };
    }
    TopologyError {
        origin: origin.to_string(),
        line: yaml_line,
        key: None,
        kind: TopologyErrorKind::Yaml { message },
    }
}

/// Finds the first top-level key (or field within a key's block) that repeats an earlier one.
fn find_duplicate(located: &[LocatedKey], origin: &str) -> Option<TopologyError> {
    let mut seen: Vec<&LocatedKey> = Vec::new();
    for l in located {
        if let Some(first) = seen.iter().find(|f| f.text == l.text) {
            return Some(TopologyError {
                origin: origin.to_string(),
                line: Some(l.line),
                key: Some(l.text.clone()),
                kind: TopologyErrorKind::DuplicateKey {
                    first_line: Some(first.line),
                    first_key: None,
                },
            });
        }
        seen.push(l);
        for (i, (name, line)) in l.fields.iter().enumerate() {
            if let Some((_, first)) = l.fields[..i].iter().find(|(n, _)| n == name) {
                return Some(TopologyError {
                    origin: origin.to_string(),
                    line: Some(*line),
                    key: Some(l.text.clone()),
                    kind: TopologyErrorKind::DuplicateField {
                        field: name.clone(),
                        first_line: Some(*first),
                    },
                });
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Line locator

/// A top-level key found in the raw text, with the fields of its block.
#[derive(Debug)]
struct LocatedKey {
    /// The key's scalar value (quotes removed, escapes resolved).
    text: String,
    /// Whether it was written in quotes (then it is always a string).
    quoted: bool,
    /// 1-based line.
    line: usize,
    /// Fields (`name`, line) at the block's first indentation level, in order.
    fields: Vec<(String, usize)>,
}

impl LocatedKey {
    fn field_line(&self, name: &str) -> Option<usize> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, l)| *l)
    }

    /// Whether this located key is the mapping key `key`.
    fn is(&self, key: &Value) -> bool {
        match key {
            Value::String(s) => *s == self.text,
            Value::Number(n) => {
                !self.quoted
                    && (n.to_string() == self.text
                        || n.as_u64()
                            .is_some_and(|u| self.text.parse::<u64>() == Ok(u))
                        || n.as_i64()
                            .is_some_and(|i| self.text.parse::<i64>() == Ok(i)))
            }
            other => !self.quoted && key_display(other) == self.text,
        }
    }
}

/// Finds the located key for `key`, searching forward from `cursor` (keys come in order).
fn match_located<'a>(
    located: &'a [LocatedKey],
    cursor: &mut usize,
    key: &Value,
) -> Option<&'a LocatedKey> {
    let rest = located.get(*cursor..)?;
    let i = rest.iter().position(|l| l.is(key))?;
    *cursor += i + 1;
    rest.get(i)
}

fn is_skippable(line: &str) -> bool {
    let t = line.trim();
    t.is_empty()
        || t.starts_with('#')
        || line.starts_with("---")
        || line.starts_with("...")
        || line.starts_with('%')
}

/// The first line with content (not blank, a comment or a document marker).
fn first_content_line(text: &str) -> Option<usize> {
    text.lines().position(|l| !is_skippable(l)).map(|i| i + 1)
}

/// Finds the top-level keys of block-style YAML and the fields of their blocks.
fn locate(text: &str) -> Vec<LocatedKey> {
    let mut out: Vec<LocatedKey> = Vec::new();
    // Whether the lines being read belong to the last key's block.
    let mut in_block = false;
    let mut field_indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if is_skippable(line) {
            continue;
        }
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if indent == 0 {
            in_block = false;
            if let Some((text, quoted)) = scan_key(line) {
                out.push(LocatedKey {
                    text,
                    quoted,
                    line: lineno,
                    fields: Vec::new(),
                });
                in_block = true;
                field_indent = None;
            }
            continue;
        }
        if !in_block {
            continue;
        }
        if *field_indent.get_or_insert(indent) != indent {
            continue;
        }
        if let (Some((name, _)), Some(last)) = (scan_key(&line[indent..]), out.last_mut()) {
            last.fields.push((name, lineno));
        }
    }
    out
}

/// Reads a mapping key at the start of `s`: `'quoted'`, `"quoted"` or plain, followed by `:`
/// (and then whitespace or the end of the line). Returns the key and whether it was quoted.
fn scan_key(s: &str) -> Option<(String, bool)> {
    let mut chars = s.char_indices().peekable();
    let (key, rest, quoted) = match s.chars().next()? {
        '\'' => {
            chars.next();
            let mut key = String::new();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if matches!(chars.peek(), Some((_, '\''))) {
                        chars.next();
                        key.push('\'');
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    key.push(c);
                }
            }
            (key, s.get(end?..)?, true)
        }
        '"' => {
            chars.next();
            let mut key = String::new();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    '\\' => {
                        let (_, e) = chars.next()?;
                        key.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            '0' => '\0',
                            other => other,
                        });
                    }
                    c => key.push(c),
                }
            }
            (key, s.get(end?..)?, true)
        }
        '{' | '[' | '?' | '&' | '*' | '!' | '|' | '>' | '#' | '@' | '`' => return None,
        '-' if s[1..].starts_with([' ', '\t']) || s.len() == 1 => return None,
        _ => {
            let bytes = s.as_bytes();
            let colon = (0..bytes.len()).find(|&i| {
                bytes[i] == b':' && matches!(bytes.get(i + 1), None | Some(b' ' | b'\t'))
            })?;
            let key = s[..colon].trim_end();
            if key.contains(" #") || key.contains("\t#") {
                return None;
            }
            (key.to_string(), &s[colon..], false)
        }
    };
    rest.trim_start_matches([' ', '\t'])
        .starts_with(':')
        .then_some((key, quoted))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGES_EXAMPLE: &str = "\
0-8:
  isq: Q3K
  device: cuda[0]
8-16:
  isq: Q4K
  device: cpu
16-24:
  isq: Q6K
# Skip 24-28
28-32:
  isq: Q8_0
  device: cuda[0]
";

    const REGEX_EXAMPLE: &str = r"'/attn\.q_proj$/':
  isq: Q4K
'/ffn_.*\.weight$/':
  isq: Q3K
";

    fn parse(text: &str) -> Topology {
        match Topology::parse(text, "<inline>") {
            Ok(t) => t,
            Err(e) => panic!("unexpected error for {text:?}: {e}"),
        }
    }

    fn lt(isq: Option<IsqType>, device: Option<DeviceSpec>) -> LayerTopology {
        LayerTopology { isq, device }
    }

    use DeviceSpec::{Cpu, Cuda};
    use IsqType::*;

    #[test]
    fn documented_range_example() {
        let t = parse(RANGES_EXAMPLE);
        assert_eq!(t.origin(), "<inline>");
        assert!(t.selectors().is_empty());
        let keys: Vec<_> = t
            .ranges()
            .iter()
            .map(|r| (r.key.as_str(), r.start, r.end, r.line))
            .collect();
        assert_eq!(
            keys,
            [
                ("0-8", 0, 8, 1),
                ("8-16", 8, 16, 4),
                ("16-24", 16, 24, 7),
                ("28-32", 28, 32, 10)
            ]
        );
        let cases: &[(usize, Option<LayerTopology>)] = &[
            (0, Some(lt(Some(Q3K), Some(Cuda(0))))),
            (7, Some(lt(Some(Q3K), Some(Cuda(0))))),
            (8, Some(lt(Some(Q4K), Some(Cpu(0))))),
            (15, Some(lt(Some(Q4K), Some(Cpu(0))))),
            (16, Some(lt(Some(Q6K), None))),
            (23, Some(lt(Some(Q6K), None))),
            (24, None),
            (27, None),
            (28, Some(lt(Some(Q8_0), Some(Cuda(0))))),
            (31, Some(lt(Some(Q8_0), Some(Cuda(0))))),
            (32, None),
        ];
        for (layer, want) in cases {
            assert_eq!(t.layer(*layer).map(|r| r.entry), *want, "layer {layer}");
        }
        // Uncovered layers take the global ISQ; covered ones their range's (whole) entry.
        assert_eq!(
            t.resolve(Some(25), &["model.layers.25.mlp.up_proj.weight"], Some(Q5K)),
            lt(Some(Q5K), None)
        );
        assert_eq!(
            t.resolve(Some(20), &["model.layers.20.mlp.up_proj.weight"], Some(Q5K)),
            lt(Some(Q6K), None)
        );
        assert_eq!(
            t.resolve(None, &["model.embed_tokens.weight"], Some(Q5K)),
            lt(Some(Q5K), None)
        );
    }

    #[test]
    fn documented_regex_example() {
        let t = parse(REGEX_EXAMPLE);
        assert!(t.ranges().is_empty());
        let sel: Vec<_> = t
            .selectors()
            .iter()
            .map(|s| (s.key.as_str(), s.regex.as_str(), s.line))
            .collect();
        assert_eq!(
            sel,
            [
                (r"/attn\.q_proj$/", r"attn\.q_proj$", 1),
                (r"/ffn_.*\.weight$/", r"ffn_.*\.weight$", 3)
            ]
        );
        let cases: &[(&[&str], Option<IsqType>)] = &[
            (&["model.layers.3.self_attn.q_proj"], Some(Q4K)),
            // `$` anchors: the `.weight` suffix keeps the first selector from matching.
            (&["model.layers.3.self_attn.q_proj.weight"], None),
            (&["blk.3.ffn_up.weight"], Some(Q3K)),
            (
                &["model.layers.3.mlp.up_proj.weight", "blk.3.ffn_up.weight"],
                Some(Q3K),
            ),
            (&["model.layers.3.mlp.up_proj.weight"], None),
            (&[], None),
        ];
        for (names, want) in cases {
            assert_eq!(
                t.selector_for(names).and_then(|s| s.entry.isq),
                *want,
                "{names:?}"
            );
        }
    }

    #[test]
    fn resolution_rules() {
        let q = "model.layers.5.self_attn.q_proj.weight";
        // (rule, yaml, layer, names, global isq, expected)
        type Case<'a> = (
            &'a str,
            &'a str,
            Option<usize>,
            &'a [&'a str],
            Option<IsqType>,
            LayerTopology,
        );
        let cases: &[Case<'_>] = &[
            (
                "overlap: higher end wins (declared first)",
                "0-10:\n  isq: Q8_0\n0-6:\n  isq: Q2K\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q8_0), None),
            ),
            (
                "overlap: higher end wins (declared last)",
                "0-6:\n  isq: Q2K\n4-10:\n  isq: Q8_0\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q8_0), None),
            ),
            (
                "overlap: lower-end range keeps layers the other does not cover",
                "0-6:\n  isq: Q2K\n4-10:\n  isq: Q8_0\n",
                Some(3),
                &[q],
                None,
                lt(Some(Q2K), None),
            ),
            (
                "equal ends: later declared wins",
                "0-8:\n  isq: Q2K\n4-8:\n  isq: Q4K\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q4K), None),
            ),
            (
                "equal ends: later declared wins (wider one later)",
                "4-8:\n  isq: Q4K\n0-8:\n  isq: Q2K\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q2K), None),
            ),
            (
                "whole-entry replacement: missing device not inherited",
                "0-6:\n  isq: Q2K\n  device: cuda[1]\n0-10:\n  isq: Q8_0\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q8_0), None),
            ),
            (
                "whole-entry replacement: missing isq means no ISQ (not global)",
                "0-6:\n  isq: Q2K\n0-10:\n  device: cpu\n",
                Some(5),
                &[q],
                Some(Q6K),
                lt(None, Some(Cpu(0))),
            ),
            (
                "null value: covered layer with no ISQ and no device",
                "0-10:\n",
                Some(5),
                &[q],
                Some(Q6K),
                lt(None, None),
            ),
            (
                "a range ending higher beats a single layer inside it",
                "0-8:\n  isq: Q2K\n5:\n  isq: Q8_0\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q2K), None),
            ),
            (
                "a single layer declared before an equal-end range loses",
                "5:\n  isq: Q8_0\n0-6:\n  isq: Q2K\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q2K), None),
            ),
            (
                "single layer with equal end declared later wins",
                "0-6:\n  isq: Q2K\n'5':\n  isq: Q8_0\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q8_0), None),
            ),
            (
                "single layer covers only itself",
                "0-6:\n  isq: Q2K\n5:\n  isq: Q8_0\n",
                Some(6),
                &[q],
                Some(Q4_0),
                lt(Some(Q4_0), None),
            ),
            (
                "regex beats range",
                "0-10:\n  isq: Q2K\n  device: cuda[0]\n'/q_proj/':\n  isq: Q8_0\n  device: cpu\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q8_0), Some(Cpu(0))),
            ),
            (
                "regex declared before the range still beats it",
                "'/q_proj/':\n  isq: Q8_0\n0-10:\n  isq: Q2K\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q8_0), None),
            ),
            (
                "later regex wins",
                "'/q_proj/':\n  isq: Q8_0\n'/layers\\.5\\./':\n  isq: Q4K\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q4K), None),
            ),
            (
                "later regex wins only when it matches",
                "'/q_proj/':\n  isq: Q8_0\n'/layers\\.6\\./':\n  isq: Q4K\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q8_0), None),
            ),
            (
                "regex overrides only isq when it sets only isq",
                "0-10:\n  isq: Q2K\n  device: cuda[0]\n'/q_proj/':\n  isq: Q8_0\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q8_0), Some(Cuda(0))),
            ),
            (
                "regex overrides only device when it sets only device",
                "0-10:\n  isq: Q2K\n  device: cuda[0]\n'/q_proj/':\n  device: cpu[1]\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q2K), Some(Cpu(1))),
            ),
            (
                "regex on an uncovered layer overrides the global ISQ",
                "0-2:\n  isq: Q2K\n'/q_proj/':\n  isq: Q8_0\n",
                Some(5),
                &[q],
                Some(Q4K),
                lt(Some(Q8_0), None),
            ),
            (
                "regex matching a second name of the tensor",
                "'/blk\\.5\\.attn_q/':\n  isq: Q5K\n",
                Some(5),
                &[q, "blk.5.attn_q.weight"],
                None,
                lt(Some(Q5K), None),
            ),
            (
                "uncovered layer, no selector: global ISQ",
                "0-2:\n  isq: Q2K\n",
                Some(5),
                &[q],
                Some(Q4K),
                lt(Some(Q4K), None),
            ),
            (
                "regex is unanchored",
                "'/self_attn/':\n  isq: Q5_1\n",
                Some(5),
                &[q],
                None,
                lt(Some(Q5_1), None),
            ),
        ];
        for (rule, yaml, layer, names, global, want) in cases {
            let t = parse(yaml);
            assert_eq!(t.resolve(*layer, names, *global), *want, "{rule}");
        }
    }

    #[test]
    fn layer_lookup_returns_winning_range() {
        let t = parse("0-8:\n  isq: Q2K\n4-8:\n  isq: Q4K\n2-6:\n  isq: Q6K\n");
        let cases: &[(usize, Option<&str>)] = &[
            (0, Some("0-8")),
            (2, Some("0-8")),
            (4, Some("4-8")),
            (7, Some("4-8")),
            (8, None),
            (100, None),
        ];
        for (layer, want) in cases {
            assert_eq!(
                t.layer(*layer).map(|r| r.key.as_str()),
                *want,
                "layer {layer}"
            );
        }
    }

    #[test]
    fn key_forms() {
        let t = parse(
            "8:\n  isq: Q4K\n'9':\n  isq: Q5K\n\"10-12\":\n  isq: Q6K\n'/a/': {isq: Q2K}\n\"/b\\\\.c/\":\n  device: metal[0]\n",
        );
        let r: Vec<_> = t
            .ranges()
            .iter()
            .map(|r| (r.key.as_str(), r.start, r.end, r.line))
            .collect();
        assert_eq!(r, [("8", 8, 9, 1), ("9", 9, 10, 3), ("10-12", 10, 12, 5)]);
        let s: Vec<_> = t
            .selectors()
            .iter()
            .map(|s| (s.key.as_str(), s.regex.as_str(), s.line, s.entry))
            .collect();
        assert_eq!(
            s,
            [
                ("/a/", "a", 7, lt(Some(Q2K), None)),
                ("/b\\.c/", "b\\.c", 8, lt(None, Some(DeviceSpec::Metal(0))))
            ]
        );
    }

    #[test]
    fn empty_and_comment_only_are_valid() {
        for text in [
            "",
            "\n\n",
            "# nothing here\n# at all\n",
            "---\n# only a comment\n",
            "~\n",
        ] {
            let t = parse(text);
            assert!(t.is_empty(), "{text:?}");
            assert!(t.layer(0).is_none());
            assert_eq!(t.resolve(Some(0), &["x"], Some(Q4K)), lt(Some(Q4K), None));
        }
        let e = Topology::empty();
        assert!(e.is_empty());
        assert_eq!(e.origin(), "<none>");
        assert!(Topology::default().is_empty());
        assert!(!parse("0-1:\n").is_empty());
    }

    #[test]
    fn flow_style_parses_with_unknown_lines() {
        let t = parse("{0-8: {isq: Q4K}, '/x/': {device: cpu}}");
        assert_eq!(t.ranges()[0].entry, lt(Some(Q4K), None));
        assert_eq!(t.ranges()[0].line, 0);
        assert_eq!(t.selectors()[0].entry, lt(None, Some(Cpu(0))));
        let err = Topology::parse("{0-8: {isq: Q9K}}", "<inline>").unwrap_err();
        assert_eq!(err.line, None);
        assert!(
            err.to_string()
                .starts_with("<inline>: key `0-8`: unknown ISQ type `Q9K`"),
            "{err}"
        );
    }

    #[test]
    fn comments_and_blank_lines_do_not_shift_lines() {
        let text = "---\n# header\n0-4: # first\n  # about isq\n  isq: Q4K\n\n  device: cuda[0]\n";
        let t = parse(text);
        assert_eq!(t.ranges()[0].line, 3);
        let bad = text.replace("cuda[0]", "gpu");
        let err = Topology::parse(&bad, "f.yaml").unwrap_err();
        assert_eq!(err.line, Some(7));
        assert!(
            err.to_string()
                .starts_with("f.yaml:7: key `0-4`: invalid device `gpu`"),
            "{err}"
        );
    }

    #[test]
    fn errors() {
        let isq_names = IsqType::valid_names();
        let unknown_isq = format!("unknown ISQ type `Q3_0`; expected one of {isq_names}");
        // (yaml, expected line, expected key, substring of the kind's message)
        let cases: Vec<(&str, Option<usize>, Option<&str>, &str)> = vec![
            // YAML syntax
            (
                "0-8:\n  isq: Q4K\n device: cpu\n",
                Some(3),
                None,
                "invalid YAML: ",
            ),
            ("0-8: [\n", Some(2), None, "invalid YAML: "),
            // top level not a mapping
            (
                "# c\n- 0-8\n- 8-16\n",
                Some(2),
                None,
                "expected a mapping of layer ranges (START-END), layers (N) or regex selectors ('/.../') to {isq, device}, found a sequence",
            ),
            ("Q4K\n", Some(1), None, "found a string"),
            // value not a mapping
            (
                "0-8: Q4K\n",
                Some(1),
                Some("0-8"),
                "expected a mapping with optional `isq` and `device` fields (or nothing), found a string",
            ),
            (
                "0-4:\n  isq: Q4K\n4-8:\n  - isq: Q4K\n",
                Some(3),
                Some("4-8"),
                "found a sequence",
            ),
            // unknown field
            (
                "0-8:\n  isq: Q4K\n  isqq: Q4K\n",
                Some(3),
                Some("0-8"),
                "unknown field `isqq`; expected `isq` or `device`",
            ),
            (
                "'/x/':\n  dtype: f16\n",
                Some(2),
                Some("/x/"),
                "unknown field `dtype`; expected `isq` or `device`",
            ),
            // field not a string
            (
                "0-8:\n  isq: [Q4K]\n",
                Some(2),
                Some("0-8"),
                "field `isq` must be a string (an ISQ type name such as `Q4K`), found a sequence",
            ),
            (
                "0-8:\n  isq: Q4K\n  device: 0\n",
                Some(3),
                Some("0-8"),
                "field `device` must be a string (`cpu`, `cpu[N]`, `cuda[N]` or `metal[N]`), found a number",
            ),
            // bad keys
            (
                "x-3:\n  isq: Q4K\n",
                Some(1),
                Some("x-3"),
                "invalid key (not a layer range: START and END must be non-negative integers); expected a layer range `START-END` (e.g. `0-8`, end exclusive), a single layer `N` (e.g. `8`) or a regex selector `'/PATTERN/'`",
            ),
            (
                "0-4:\nabc:\n  isq: Q4K\n",
                Some(2),
                Some("abc"),
                "invalid key (not a layer number, layer range or regex selector); expected a layer range `START-END`",
            ),
            (
                "-3:\n  isq: Q4K\n",
                Some(1),
                Some("-3"),
                "invalid key (layer numbers cannot be negative); expected",
            ),
            (
                "'-3':\n  isq: Q4K\n",
                Some(1),
                Some("-3"),
                "invalid key (not a layer range",
            ),
            (
                "1-2-3:\n  isq: Q4K\n",
                Some(1),
                Some("1-2-3"),
                "invalid key (not a layer range",
            ),
            (
                "'':\n  isq: Q4K\n",
                Some(1),
                Some(""),
                "invalid key (empty key); expected",
            ),
            (
                "'//':\n  isq: Q4K\n",
                Some(1),
                Some("//"),
                "invalid key (empty regex selector); expected",
            ),
            (
                "'/':\n  isq: Q4K\n",
                Some(1),
                Some("/"),
                "invalid key (a regex selector must start and end with `/`)",
            ),
            (
                "'/abc':\n  isq: Q4K\n",
                Some(1),
                Some("/abc"),
                "invalid key (a regex selector must start and end with `/`)",
            ),
            (
                "1.5:\n  isq: Q4K\n",
                Some(1),
                Some("1.5"),
                "invalid key (a layer number must be a whole number)",
            ),
            (
                "true:\n  isq: Q4K\n",
                Some(1),
                Some("true"),
                "invalid key (found a boolean)",
            ),
            (
                "99999999999999999999999-2:\n",
                Some(1),
                Some("99999999999999999999999-2"),
                "is too large",
            ),
            // reversed / empty range
            (
                "0-4:\n  isq: Q4K\n8-4:\n  isq: Q4K\n",
                Some(3),
                Some("8-4"),
                "range end must be greater than start (START-END: start inclusive, end exclusive)",
            ),
            (
                "4-4:\n",
                Some(1),
                Some("4-4"),
                "range end must be greater than start",
            ),
            // unknown ISQ / invalid device
            (
                "0-8:\n  device: cpu\n  isq: Q3_0\n",
                Some(3),
                Some("0-8"),
                &unknown_isq,
            ),
            (
                "0-8:\n  isq: Q4K\n  device: gpu[0]\n",
                Some(3),
                Some("0-8"),
                "invalid device `gpu[0]`; expected `cpu`, `cpu[N]`, `cuda[N]` or `metal[N]`",
            ),
            // invalid regex
            (
                "'/a(b/':\n  isq: Q4K\n",
                Some(1),
                Some("/a(b/"),
                "invalid regex selector: regex parse error",
            ),
            (
                "'/a(b/':\n  isq: Q4K\n",
                Some(1),
                Some("/a(b/"),
                "unclosed group",
            ),
            // duplicates that serde_yaml lets through
            (
                "8:\n  isq: Q4K\n'8':\n  isq: Q5K\n",
                Some(3),
                Some("8"),
                "duplicate key; first defined on line 1",
            ),
            (
                "8-9:\n  isq: Q4K\n# c\n8:\n  isq: Q5K\n",
                Some(4),
                Some("8"),
                "duplicate key; first defined on line 1 (as `8-9`)",
            ),
            (
                "'/a/':\n  isq: Q4K\n\"/a/\":\n  isq: Q5K\n",
                Some(3),
                Some("/a/"),
                "duplicate key; first defined on line 1",
            ),
            // exact duplicates, which serde_yaml itself rejects
            (
                "0-8:\n  isq: Q4K\n8-16:\n  isq: Q4K\n0-8:\n  isq: Q5K\n",
                Some(5),
                Some("0-8"),
                "duplicate key; first defined on line 1",
            ),
            (
                "'/a/':\n  isq: Q4K\n'/a/':\n  isq: Q5K\n",
                Some(3),
                Some("/a/"),
                "duplicate key; first defined on line 1",
            ),
            (
                "0-8:\n  isq: Q4K\n  isq: Q5K\n",
                Some(3),
                Some("0-8"),
                "duplicate field `isq`; first defined on line 2",
            ),
        ];
        for (yaml, line, key, msg) in cases {
            let err = match Topology::parse(yaml, "topo.yaml") {
                Ok(t) => panic!("expected an error for {yaml:?}, got {t:?}"),
                Err(e) => e,
            };
            let shown = err.to_string();
            assert_eq!(err.line, line, "{yaml:?}: {shown}");
            assert_eq!(err.key.as_deref(), key, "{yaml:?}: {shown}");
            assert!(err.kind.to_string().contains(msg), "{yaml:?}: {shown}");
            let prefix = match (line, key) {
                (Some(l), Some(k)) => format!("topo.yaml:{l}: key `{k}`: "),
                (Some(l), None) => format!("topo.yaml:{l}: "),
                (None, Some(k)) => format!("topo.yaml: key `{k}`: "),
                (None, None) => "topo.yaml: ".to_string(),
            };
            assert!(shown.starts_with(&prefix), "{yaml:?}: {shown}");
        }
    }

    #[test]
    fn error_kinds_are_matchable() {
        let kind = |yaml: &str| Topology::parse(yaml, "t").map(|_| ()).unwrap_err().kind;
        assert!(matches!(
            kind("8-4:\n"),
            TopologyErrorKind::EmptyRange { start: 8, end: 4 }
        ));
        assert!(
            matches!(kind("0-1:\n  isq: Q9\n"), TopologyErrorKind::UnknownIsq(UnknownIsq { given }) if given == "Q9")
        );
        assert!(
            matches!(kind("0-1:\n  device: x\n"), TopologyErrorKind::InvalidDevice(InvalidDevice { given }) if given == "x")
        );
        assert!(matches!(kind("0-1: [\n"), TopologyErrorKind::Yaml { .. }));
    }

    #[test]
    fn from_file_reads_and_errors_carry_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.yaml");
        std::fs::write(&good, RANGES_EXAMPLE).unwrap();
        let t = Topology::from_file(&good).unwrap();
        assert_eq!(t.origin(), good.display().to_string());
        assert_eq!(t.ranges().len(), 4);

        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "0-8:\n  isq: Q4K\n8-16:\n  isqq: Q4K\n").unwrap();
        let err = Topology::from_file(&bad).unwrap_err();
        assert_eq!(err.origin, bad.display().to_string());
        assert_eq!(
            err.to_string(),
            format!(
                "{}:4: key `8-16`: unknown field `isqq`; expected `isq` or `device`",
                bad.display()
            )
        );

        let missing = dir.path().join("missing.yaml");
        let err = Topology::from_file(&missing).unwrap_err();
        assert!(matches!(err.kind, TopologyErrorKind::Io(_)));
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!(
                "{}: cannot read topology file: ",
                missing.display()
            )),
            "{shown}"
        );
    }

    fn tensors(names: &[&[&str]]) -> Vec<Vec<String>> {
        names
            .iter()
            .map(|n| n.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn validate_against_a_model() {
        let model = tensors(&[
            &["model.embed_tokens.weight", "token_embd.weight"],
            &[
                "model.layers.0.self_attn.q_proj.weight",
                "blk.0.attn_q.weight",
            ],
            &["model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"],
        ]);
        let ok = parse("0-30:\n  isq: Q4K\n'/ffn_up/':\n  isq: Q8_0\n");
        assert!(ok.validate(30, &model).is_ok());
        assert!(parse(RANGES_EXAMPLE).validate(32, &model).is_ok());

        // (yaml, n_layers, expected full message)
        let cases: &[(&str, usize, &str)] = &[
            (
                RANGES_EXAMPLE,
                30,
                "<inline>:10: key `28-32`: range `28-32` ends past the model's 30 layers (0-29)",
            ),
            (
                "0-4:\n  isq: Q4K\n4:\n  isq: Q5K\n",
                4,
                "<inline>:3: key `4`: layer `4` ends past the model's 4 layers (0-3)",
            ),
            (
                "0-2:\n",
                1,
                "<inline>:1: key `0-2`: range `0-2` ends past the model's 1 layer (0-0)",
            ),
            (
                "0-4:\n'/attn_q/':\n  isq: Q4K\n'/lm_head/':\n  isq: Q8_0\n",
                30,
                "<inline>:4: key `/lm_head/`: regex selector matches no tensor of the model (checked 3 tensors, named like `model.embed_tokens.weight`)",
            ),
            (
                REGEX_EXAMPLE,
                30,
                "<inline>:1: key `/attn\\.q_proj$/`: regex selector matches no tensor of the model",
            ),
        ];
        for (yaml, n_layers, want) in cases {
            let err = parse(yaml).validate(*n_layers, &model).unwrap_err();
            assert!(err.to_string().starts_with(want), "{}\nwant {want}", err);
        }
        let err = parse("'/x/':\n").validate(1, &[]).unwrap_err();
        assert!(matches!(
            err.kind,
            TopologyErrorKind::SelectorMatchesNothing {
                n_tensors: 0,
                example: None
            }
        ));
    }

    #[test]
    fn locator_reads_quoted_and_plain_keys() {
        let cases: &[(&str, Option<(&str, bool)>)] = &[
            ("0-8:", Some(("0-8", false))),
            ("0-8: # c", Some(("0-8", false))),
            ("0-8 : {isq: Q4K}", Some(("0-8", false))),
            ("'/a''b/':", Some(("/a'b/", true))),
            ("\"/a\\\\.b\\\"/\":", Some(("/a\\.b\"/", true))),
            ("'/a:b/': x", Some(("/a:b/", true))),
            ("{0-8: {}}", None),
            ("- a: b", None),
            ("abc", None),
            ("a:b", None),
        ];
        for (line, want) in cases {
            let got = scan_key(line);
            assert_eq!(
                got.as_ref().map(|(k, q)| (k.as_str(), *q)),
                *want,
                "{line:?}"
            );
        }
    }
}
