//! Where things are in the raw text: serde_yaml values carry no positions, so this locator
//! finds the line of each top-level key and of the fields in its block (block-style YAML).

use serde_yaml::Value;

use super::error::{TopologyError, TopologyErrorKind};
use super::keys::key_display;

/// Turns a serde_yaml error into a topology error; a duplicate-key error is reported as
/// [`TopologyErrorKind::DuplicateKey`] at the later key when the locator can find it.
pub(super) fn yaml_error(
    e: &serde_yaml::Error,
    located: &[LocatedKey],
    origin: &str,
) -> TopologyError {
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

/// A top-level key found in the raw text, with the fields of its block.
#[derive(Debug)]
pub(super) struct LocatedKey {
    /// The key's scalar value (quotes removed, escapes resolved).
    text: String,
    /// Whether it was written in quotes (then it is always a string).
    quoted: bool,
    /// 1-based line.
    pub(super) line: usize,
    /// Fields (`name`, line) at the block's first indentation level, in order.
    fields: Vec<(String, usize)>,
}

impl LocatedKey {
    pub(super) fn field_line(&self, name: &str) -> Option<usize> {
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
pub(super) fn match_located<'a>(
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
pub(super) fn first_content_line(text: &str) -> Option<usize> {
    text.lines().position(|l| !is_skippable(l)).map(|i| i + 1)
}

/// Finds the top-level keys of block-style YAML and the fields of their blocks.
pub(super) fn locate(text: &str) -> Vec<LocatedKey> {
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
pub(super) fn scan_key(s: &str) -> Option<(String, bool)> {
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
