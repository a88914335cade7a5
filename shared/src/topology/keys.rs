//! Reading a top-level key (a range, a layer or a regex selector) and its entry.

use regex::Regex;
use serde_yaml::Value;

use super::LayerTopology;
use super::error::TopologyErrorKind;
use super::locate::LocatedKey;

/// What a key names.
pub(super) enum ParsedKey {
    Range { start: usize, end: usize },
    Regex(Regex),
}

pub(super) fn value_kind(v: &Value) -> &'static str {
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
pub(super) fn key_display(key: &Value) -> String {
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

pub(super) fn classify_key(key: &Value) -> Result<ParsedKey, TopologyErrorKind> {
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
pub(super) fn parse_entry(
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
