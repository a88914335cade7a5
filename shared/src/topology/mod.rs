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
//! serde_yaml values carry no positions, so a small locator over the raw text ([`locate`]) finds
//! the line of each top-level key and of the fields in its block (block-style YAML); errors
//! ([`error`]) carry the file, the line (where found) and the key. [`keys`] reads keys and
//! entries.
//!
//! A topology can also be built in code, in mistral.rs's shape, with the same validation and
//! errors as the YAML path; [`Topology::to_yaml`] prints it:
//!
//! ```
//! use strata_shared::device::DeviceSpec;
//! use strata_shared::isq::IsqType;
//! use strata_shared::topology::{LayerTopology, Topology};
//!
//! let topology = Topology::empty()
//!     .with_range(0..8, LayerTopology { isq: Some(IsqType::Q3K), device: None })
//!     .with_range(8..16, LayerTopology { isq: Some(IsqType::Q4K), device: Some(DeviceSpec::Cpu(1)) })
//!     .with_layer(20, LayerTopology { isq: Some(IsqType::Q8_0), device: None })
//!     .with_selector(r"attn\.q_proj", LayerTopology { isq: Some(IsqType::Q6K), device: None })
//!     .build()?;
//! let yaml = topology.to_yaml()?;
//! assert!(yaml.starts_with("0-8:\n  isq: Q3K\n8-16:\n  isq: Q4K\n  device: cpu[1]\n"));
//! // The YAML form is the same topology.
//! let parsed = Topology::parse(&yaml, "<yaml>")?;
//! assert_eq!(parsed.to_yaml()?, yaml);
//!
//! // Mistakes are the YAML path's errors, reported by `build` (or when the topology is used).
//! let err = Topology::empty()
//!     .with_range(8..4, LayerTopology::default())
//!     .build()
//!     .unwrap_err();
//! assert_eq!(err.to_string(), "<code>:1: key `8-4`: range end must be greater than start (START-END: start inclusive, end exclusive)");
//! # Ok::<(), strata_shared::topology::TopologyError>(())
//! ```

use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use regex::Regex;
use serde_yaml::Value;

use crate::device::DeviceSpec;
use crate::isq::IsqType;

#[cfg(test)]
mod builder_tests;
pub mod error;
mod keys;
mod locate;
#[cfg(test)]
mod tests;

pub use error::{TopologyError, TopologyErrorKind};
use keys::{ParsedKey, classify_key, key_display, parse_entry, value_kind};
use locate::{LocatedKey, first_content_line, locate, match_located, yaml_error};

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

/// A topology: range entries and regex selectors, each in declaration order, from a file or
/// built in code.
#[derive(Debug, Clone)]
pub struct Topology {
    origin: String,
    ranges: Vec<RangeEntry>,
    selectors: Vec<SelectorEntry>,
    /// The first mistake a builder call made; reported by [`Topology::build`],
    /// [`Topology::validate`] and [`Topology::to_yaml`].
    pending: Option<Arc<TopologyError>>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::empty()
    }
}

/// Label used as the origin of [`Topology::empty`].
const EMPTY_ORIGIN: &str = "<none>";
/// Label used as the origin of a topology built in code.
const BUILT_ORIGIN: &str = "<code>";

impl Topology {
    /// Parses topology YAML. `origin` names the source in errors (a path, or a label such as
    /// `<inline>`). An empty text, or one with only comments, is a valid empty topology.
    pub fn parse(text: &str, origin: &str) -> Result<Topology, TopologyError> {
        let located = locate(text);
        let mut topology = Topology {
            origin: origin.to_string(),
            ..Topology::empty()
        };
        let root: Value = match serde_yaml::from_str(text) {
            Ok(v) => v,
            Err(e) => return Err(yaml_error(&e, &located, origin)),
        };
        let mapping = match root {
            Value::Null => return Ok(topology),
            Value::Mapping(m) => m,
            other => {
                return Err(topology.error(
                    first_content_line(text),
                    None,
                    TopologyErrorKind::NotAMapping {
                        found: value_kind(&other),
                    },
                ));
            }
        };
        let mut cursor = 0usize;
        for (key, value) in &mapping {
            let loc: Option<&LocatedKey> = match_located(&located, &mut cursor, key);
            let key_line = loc.map(|l| l.line);
            let key_text = key_display(key);
            let kerr =
                |line: Option<usize>, kind| topology.error(line, Some(key_text.clone()), kind);
            let parsed = classify_key(key).map_err(|k| kerr(key_line, k))?;
            let entry =
                parse_entry(value, loc).map_err(|(line, kind)| kerr(line.or(key_line), kind))?;
            topology.add(parsed, key_text, key_line.unwrap_or(0), entry)?;
        }
        Ok(topology)
    }

    /// Reads and parses a topology file; the origin (in errors too, I/O errors included) is
    /// `path.display()`.
    pub fn from_file(path: &Path) -> Result<Topology, TopologyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            origin: origin.clone(),
            line: None,
            key: None,
            kind: TopologyErrorKind::Io(Arc::new(e)),
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
            pending: None,
        }
    }

    /// An error at `line` (1-based, where known) under `key`, in this topology's origin.
    fn error(
        &self,
        line: Option<usize>,
        key: Option<String>,
        kind: TopologyErrorKind,
    ) -> TopologyError {
        TopologyError {
            origin: self.origin.clone(),
            line,
            key,
            kind,
        }
    }

    /// Adds an entry, refusing a key that names the same range, layer or regex as an earlier
    /// one (`8`, `'8'` and `8-9` are the same).
    fn add(
        &mut self,
        parsed: ParsedKey,
        key: String,
        line: usize,
        entry: LayerTopology,
    ) -> Result<(), TopologyError> {
        let first = match &parsed {
            ParsedKey::Range { start, end } => self
                .ranges
                .iter()
                .find(|r| r.start == *start && r.end == *end)
                .map(|r| (r.line, r.key.clone())),
            ParsedKey::Regex(re) => self
                .selectors
                .iter()
                .find(|s| s.regex.as_str() == re.as_str())
                .map(|s| (s.line, s.key.clone())),
        };
        if let Some((first_line, first_key)) = first {
            let kind = TopologyErrorKind::DuplicateKey {
                first_line: (first_line > 0).then_some(first_line),
                first_key: (first_key != key).then_some(first_key),
            };
            return Err(self.error((line > 0).then_some(line), Some(key), kind));
        }
        match parsed {
            ParsedKey::Range { start, end } => self.ranges.push(RangeEntry {
                start,
                end,
                entry,
                key,
                line,
            }),
            ParsedKey::Regex(regex) => self.selectors.push(SelectorEntry {
                regex,
                key,
                entry,
                line,
            }),
        }
        Ok(())
    }

    /// Adds a layer range `range` (end exclusive), as a `START-END` key would: later ranges
    /// win over earlier ones with the same end, the higher end wins where they overlap.
    /// A mistake (an empty range, a range given twice) is kept and reported by
    /// [`Topology::build`] (or wherever the topology is used), with the YAML path's error.
    pub fn with_range(self, range: Range<usize>, layer: LayerTopology) -> Topology {
        let key = format!("{}-{}", range.start, range.end);
        self.with_key(Value::String(key), layer)
    }

    /// Adds a single layer, as a key `N` would.
    pub fn with_layer(self, layer: usize, entry: LayerTopology) -> Topology {
        self.with_key(Value::Number((layer as u64).into()), entry)
    }

    /// Adds a regex selector over tensor names (`pattern` without the slashes), as a key
    /// `'/PATTERN/'` would: it overrides the fields it sets, for every tensor it matches.
    pub fn with_selector(self, pattern: &str, entry: LayerTopology) -> Topology {
        self.with_key(Value::String(format!("/{pattern}/")), entry)
    }

    /// The builder's one path: the key is read exactly as a YAML key is, and lines are those
    /// of [`Topology::to_yaml`]'s text.
    fn with_key(mut self, key: Value, entry: LayerTopology) -> Topology {
        if self.pending.is_some() {
            return self;
        }
        if self.origin == EMPTY_ORIGIN {
            self.origin = BUILT_ORIGIN.to_string();
        }
        let key_text = key_display(&key);
        let line = self.next_yaml_line(key_text.starts_with('/'));
        let result = classify_key(&key)
            .map_err(|kind| self.error(Some(line), Some(key_text.clone()), kind))
            .and_then(|parsed| self.add(parsed, key_text, line, entry));
        match result {
            Ok(()) => self.number_lines_as_yaml(),
            Err(e) => self.pending = Some(Arc::new(e)),
        }
        self
    }

    /// The line [`Topology::to_yaml`] would write a new entry's key on: after the last range
    /// (a range), or at the end (a selector).
    fn next_yaml_line(&self, selector: bool) -> usize {
        let lines = |e: &LayerTopology| 1 + yaml_fields(e);
        let ranges: usize = self.ranges.iter().map(|r| lines(&r.entry)).sum();
        let selectors: usize = self.selectors.iter().map(|s| lines(&s.entry)).sum();
        1 + ranges + if selector { selectors } else { 0 }
    }

    /// Gives every entry the line [`Topology::to_yaml`] writes its key on (ranges first).
    fn number_lines_as_yaml(&mut self) {
        let mut line = 1;
        for r in &mut self.ranges {
            r.line = line;
            line += 1 + yaml_fields(&r.entry);
        }
        for s in &mut self.selectors {
            s.line = line;
            line += 1 + yaml_fields(&s.entry);
        }
    }

    /// The topology, or the first mistake a builder call made.
    pub fn build(self) -> Result<Topology, TopologyError> {
        match &self.pending {
            Some(e) => Err(TopologyError::clone(e)),
            None => Ok(self),
        }
    }

    /// The topology as a YAML file that parses back to the same topology: ranges in
    /// declaration order, then selectors in declaration order (only the order within each
    /// kind matters).
    pub fn to_yaml(&self) -> Result<String, TopologyError> {
        if let Some(e) = &self.pending {
            return Err(TopologyError::clone(e));
        }
        let mut out = String::new();
        let mut entry = |key: &str, e: &LayerTopology| {
            let _ = writeln!(out, "{key}:");
            if let Some(isq) = e.isq {
                let _ = writeln!(out, "  isq: {isq}");
            }
            if let Some(device) = e.device {
                let _ = writeln!(out, "  device: {device}");
            }
        };
        for r in &self.ranges {
            let key = if r.end - r.start == 1 && !r.key.contains('-') {
                r.start.to_string()
            } else {
                format!("{}-{}", r.start, r.end)
            };
            entry(&key, &r.entry);
        }
        for s in &self.selectors {
            entry(
                &format!("'/{}/'", s.regex.as_str().replace('\'', "''")),
                &s.entry,
            );
        }
        Ok(out)
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
        if let Some(e) = &self.pending {
            return Err(TopologyError::clone(e));
        }
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

/// Lines an entry's fields take in [`Topology::to_yaml`]'s text.
fn yaml_fields(e: &LayerTopology) -> usize {
    usize::from(e.isq.is_some()) + usize::from(e.device.is_some())
}
