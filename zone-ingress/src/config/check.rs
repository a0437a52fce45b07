//! The field checker: reads fields out of parsed YAML values and reports each problem as a
//! [`Diagnostic`] with its field path and, through the span index, its line and column. Used for
//! every file the daemon reads: the `ZoneIngress` file, the inventory and the XDP guard file.

use std::{collections::BTreeMap, fmt, net::IpAddr, ops::RangeInclusive, path::Path};

use serde_yaml::{Mapping, Value};

use super::{
    diagnostic::{Diagnostic, Severity},
    template::PosMap,
    yaml::DocSpans,
};
use crate::sni::{SERVICE_TAG, is_key_char, is_value_char};

/// Result of reading one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Got<T> {
    /// Absent, null, or a value meaning "unset" (empty string, port 0 where allowed).
    Absent,
    /// Present but wrong; a diagnostic was emitted.
    Invalid,
    /// Present and valid.
    Value(T),
}

impl<T> Got<T> {
    pub(crate) fn ok(self) -> Option<T> {
        match self {
            Self::Value(v) => Some(v),
            Self::Absent | Self::Invalid => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    Required,
    Optional,
}

/// What a 0 port means for a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zero {
    /// Out of range.
    Invalid,
    /// Unset (proto3 default), as for `advertisedPort` and `admin.port`.
    Unset,
}

/// An address field: an IP literal or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => ip.fmt(f),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// Which position a diagnostic points at.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Where<'p> {
    /// The value of the field at this path.
    Value(&'p str),
    /// The key of the field at this path (its value if it has no key, e.g. a list item).
    Key(&'p str),
    /// A field that is missing: point at its parent.
    Parent(&'p str),
    /// The file as a whole: no position.
    File,
}

/// Emits diagnostics for one document of one file.
pub(crate) struct Checker<'a> {
    /// The file, for the diagnostics.
    pub(crate) file: &'a Path,
    spans: Option<&'a DocSpans>,
    posmap: &'a PosMap,
    diags: &'a mut Vec<Diagnostic>,
    /// Errors emitted so far.
    pub(crate) errors: usize,
}

impl<'a> Checker<'a> {
    /// A checker for the document whose positions are `spans` (`None`: no positions) in the text
    /// `posmap` maps back to the file.
    pub(crate) fn new(
        file: &'a Path,
        spans: Option<&'a DocSpans>,
        posmap: &'a PosMap,
        diags: &'a mut Vec<Diagnostic>,
    ) -> Self {
        Self { file, spans, posmap, diags, errors: 0 }
    }

    pub(crate) fn position(&self, path: &str, at: &Where<'_>) -> Option<(usize, usize)> {
        let spans = self.spans?;
        let pos = match *at {
            Where::File => return None,
            Where::Value(p) => spans.fields.get(p).map(|f| f.value),
            Where::Key(p) => spans.fields.get(p).map(|f| f.key.unwrap_or(f.value)),
            Where::Parent(p) => spans.fields.get(p).map(|f| f.key.unwrap_or(f.value)).or(spans.start),
        };
        // A field that serde_yaml sees but the span index does not (merge keys) has no position
        // of its own; its parent's is close enough.
        let pos = pos.or_else(|| {
            let parent = parent_path(path)?;
            spans.fields.get(parent).map(|f| f.key.unwrap_or(f.value))
        })?;
        Some(self.posmap.original(pos))
    }

    fn push(&mut self, severity: Severity, path: &str, at: Where<'_>, message: String) {
        let pos = self.position(path, &at);
        if severity == Severity::Error {
            self.errors += 1;
        }
        self.diags.push(Diagnostic {
            file: self.file.to_path_buf(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            path: path.to_owned(),
            message,
            severity,
        });
    }

    pub(crate) fn error(&mut self, path: &str, at: Where<'_>, message: impl Into<String>) {
        self.push(Severity::Error, path, at, message.into());
    }

    pub(crate) fn warn(&mut self, path: &str, at: Where<'_>, message: impl Into<String>) {
        self.push(Severity::Warning, path, at, message.into());
    }

    /// Where the diagnostics emitted from now on start, for [`Checker::demote_since`].
    pub(crate) fn mark(&self) -> usize {
        self.diags.len()
    }

    /// Turns the errors emitted since `mark` into warnings, each message prefixed by `prefix`:
    /// the part they are about is left out instead of the whole input being rejected. Whether
    /// there were any.
    pub(crate) fn demote_since(&mut self, mark: usize, prefix: &str) -> bool {
        let mut any = false;
        for d in self.diags.iter_mut().skip(mark).filter(|d| d.is_error()) {
            d.severity = Severity::Warning;
            d.message = format!("{prefix}{}", d.message);
            self.errors -= 1;
            any = true;
        }
        any
    }

    /// Warn about keys not in `known`: unknown keys are ignored, but a misspelt optional field
    /// would otherwise silently keep its default.
    pub(crate) fn unknown_keys(&mut self, map: &Mapping, parent: &str, known: &[&str]) {
        for (path, hint) in unexpected_keys(map, parent, known) {
            let message = match hint {
                Some(hint) => format!("unknown field, ignored (did you mean `{hint}`?)"),
                None => "unknown field, ignored".to_owned(),
            };
            self.warn(&path, Where::Key(&path), message);
        }
    }

    /// Reject keys not in `known`, for files where a misspelt key would silently leave a hole
    /// (the XDP guard file).
    pub(crate) fn closed_keys(&mut self, map: &Mapping, parent: &str, known: &[&str]) {
        for (path, hint) in unexpected_keys(map, parent, known) {
            let expected = known.join(", ");
            let message = match hint {
                Some(hint) => format!("unknown key; expected one of: {expected} (did you mean `{hint}`?)"),
                None => format!("unknown key; expected one of: {expected}"),
            };
            self.error(&path, Where::Key(&path), message);
        }
    }

    pub(crate) fn resource_type(&mut self, map: &Mapping, parent: &str, expected: &str) {
        let path = child_path(parent, "type");
        match get(map, "type") {
            Some(Value::String(t)) if t == expected => {}
            Some(other) => {
                self.error(&path, Where::Value(&path), format!("must be `{expected}`, got {}", describe(other)))
            }
            None => self.error(&path, Where::Parent(parent), format!("is required (`type: {expected}`)")),
        }
    }

    fn missing(&mut self, parent: &str, key: &str) {
        let path = child_path(parent, key);
        self.error(&path, Where::Parent(parent), "is required");
    }

    pub(crate) fn string(&mut self, map: &Mapping, parent: &str, key: &str, need: Need) -> Got<String> {
        let path = child_path(parent, key);
        match get(map, key) {
            None => {
                if need == Need::Required {
                    self.missing(parent, key);
                }
                Got::Absent
            }
            Some(Value::String(s)) if s.is_empty() => {
                if need == Need::Required {
                    self.error(&path, Where::Value(&path), "must not be empty");
                }
                Got::Absent
            }
            Some(Value::String(s)) => Got::Value(s.clone()),
            Some(other) => {
                self.error(&path, Where::Value(&path), format!("must be a string, got {}", describe(other)));
                Got::Invalid
            }
        }
    }

    /// An IP literal or DNS name, not `0.0.0.0`/`::` (Kuma's `validateAddress`).
    pub(crate) fn address(&mut self, map: &Mapping, parent: &str, key: &str, need: Need) -> Got<Host> {
        let path = child_path(parent, key);
        let text = match self.string(map, parent, key, need) {
            Got::Value(text) => text,
            Got::Absent => return Got::Absent,
            Got::Invalid => return Got::Invalid,
        };
        if let Ok(ip) = text.parse::<IpAddr>() {
            if ip.is_unspecified() {
                self.error(&path, Where::Value(&path), "must not be 0.0.0.0 or ::");
                return Got::Invalid;
            }
            return Got::Value(Host::Ip(ip));
        }
        if is_dns_name(&text) {
            return Got::Value(Host::Name(text));
        }
        self.error(&path, Where::Value(&path), format!("`{text}` is not a valid IP address or domain name"));
        Got::Invalid
    }

    /// A port in 1..=65535. Numeric strings are accepted because Kuma's proto JSON decoding
    /// accepts them (and `port: "{{ port }}"` is a common template).
    pub(crate) fn port(&mut self, map: &Mapping, parent: &str, key: &str, need: Need, zero: Zero) -> Got<u16> {
        const RANGE: &str = "port must be in the range [1, 65535]";
        let path = child_path(parent, key);
        let Some(value) = get(map, key) else {
            if need == Need::Required {
                self.missing(parent, key);
            }
            return Got::Absent;
        };
        let number = match value {
            Value::Number(n) => {
                let integral_float = n.as_f64().is_some_and(|f| f.is_finite() && f.fract() == 0.0);
                if let Some(u) = n.as_u64() {
                    Ok(u)
                } else if n.as_i64().is_some() || (integral_float && n.as_f64().is_some_and(|f| f.abs() > 65535.0)) {
                    Err(RANGE.to_owned())
                } else {
                    Err(format!("must be an integer, got {}", describe(value)))
                }
            }
            Value::String(s) => {
                s.trim().parse::<u64>().map_err(|_| format!("must be an integer, got {}", describe(value)))
            }
            other => Err(format!("must be an integer, got {}", describe(other))),
        };
        match number {
            Ok(0) if zero == Zero::Unset => {
                if need == Need::Required {
                    self.missing(parent, key);
                }
                Got::Absent
            }
            Ok(n) => match u16::try_from(n) {
                Ok(port) if port != 0 => Got::Value(port),
                _ => {
                    self.error(&path, Where::Value(&path), RANGE);
                    Got::Invalid
                }
            },
            Err(message) => {
                self.error(&path, Where::Value(&path), message);
                Got::Invalid
            }
        }
    }

    pub(crate) fn mapping<'v>(&mut self, map: &'v Mapping, parent: &str, key: &str, need: Need) -> Got<&'v Mapping> {
        let path = child_path(parent, key);
        match get(map, key) {
            None => {
                if need == Need::Required {
                    self.missing(parent, key);
                }
                Got::Absent
            }
            Some(Value::Mapping(m)) => Got::Value(m),
            Some(other) => {
                self.error(&path, Where::Value(&path), format!("must be a mapping, got {}", describe(other)));
                Got::Invalid
            }
        }
    }

    pub(crate) fn sequence<'v>(
        &mut self,
        map: &'v Mapping,
        parent: &str,
        key: &str,
        need: Need,
    ) -> Got<&'v Vec<Value>> {
        let path = child_path(parent, key);
        match get(map, key) {
            None => {
                if need == Need::Required {
                    self.missing(parent, key);
                }
                Got::Absent
            }
            Some(Value::Sequence(s)) => Got::Value(s),
            Some(other) => {
                self.error(&path, Where::Value(&path), format!("must be a list, got {}", describe(other)));
                Got::Invalid
            }
        }
    }

    /// A list of strings, each with its path; absent or null is an empty list. Items that are
    /// not strings are reported and left out.
    pub(crate) fn strings<'v>(&mut self, map: &'v Mapping, parent: &str, key: &str) -> Vec<(String, &'v str)> {
        let path = child_path(parent, key);
        match get(map, key) {
            None => Vec::new(),
            Some(Value::Sequence(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let item_path = index_path(&path, i);
                    if let Value::String(s) = item {
                        Some((item_path, s.as_str()))
                    } else {
                        self.error(
                            &item_path,
                            Where::Value(&item_path),
                            format!("must be a string, got {}", describe(item)),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.error(&path, Where::Value(&path), format!("must be a list of strings, got {}", describe(other)));
                Vec::new()
            }
        }
    }

    /// A whole number in `range`. Only an absent key is absent: a null value is not a number.
    pub(crate) fn whole_number(
        &mut self,
        map: &Mapping,
        parent: &str,
        key: &str,
        range: RangeInclusive<u64>,
    ) -> Got<u64> {
        let path = child_path(parent, key);
        let Some(value) = map.get(key) else {
            return Got::Absent;
        };
        match value.as_u64() {
            Some(n) if range.contains(&n) => Got::Value(n),
            _ => {
                let (min, max) = range.into_inner();
                self.error(
                    &path,
                    Where::Value(&path),
                    format!("must be a whole number from {min} to {max}, got {}", describe(value)),
                );
                Got::Invalid
            }
        }
    }

    /// A boolean that defaults to `false` when absent (proto3 default).
    pub(crate) fn boolean(&mut self, map: &Mapping, parent: &str, key: &str) -> Option<bool> {
        let path = child_path(parent, key);
        match get(map, key) {
            None => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.error(&path, Where::Value(&path), format!("must be true or false, got {}", describe(other)));
                None
            }
        }
    }

    /// Kuma tag rules: `kuma.io/service` present, keys `[A-Za-z0-9.\-_:/]+`, values
    /// `[A-Za-z0-9.\-_:]+` (strings, not numbers).
    pub(crate) fn tags(&mut self, value: &Value, path: &str) -> Option<BTreeMap<String, String>> {
        let Value::Mapping(map) = value else {
            self.error(path, Where::Value(path), format!("must be a mapping, got {}", describe(value)));
            return None;
        };
        let errors_before = self.errors;
        let mut tags = BTreeMap::new();
        for (key, value) in map {
            let key = key_text(key);
            let tag_path = child_path(path, &key);
            if key.is_empty() {
                self.error(&tag_path, Where::Key(&tag_path), "tag name must be non-empty");
            } else if !key.chars().all(is_key_char) {
                self.error(
                    &tag_path,
                    Where::Key(&tag_path),
                    "tag name must consist of alphanumeric characters, dots, dashes, colons, \
                     slashes and underscores",
                );
            }
            match value {
                Value::String(v) if v.is_empty() => {
                    self.error(&tag_path, Where::Value(&tag_path), "tag value must be non-empty");
                }
                Value::String(v) if !v.chars().all(is_value_char) => self.error(
                    &tag_path,
                    Where::Value(&tag_path),
                    "tag value must consist of alphanumeric characters, dots, dashes, colons and \
                     underscores",
                ),
                Value::String(v) => {
                    tags.insert(key, v.clone());
                }
                Value::Null => {
                    self.error(&tag_path, Where::Value(&tag_path), "tag value must be non-empty");
                }
                other => self.error(
                    &tag_path,
                    Where::Value(&tag_path),
                    format!("tag value must be a string, got {} (quote it)", describe(other)),
                ),
            }
        }
        if !map.contains_key(SERVICE_TAG) {
            self.error(path, Where::Key(path), format!("mandatory tag \"{SERVICE_TAG}\" is missing"));
        }
        (self.errors == errors_before).then_some(tags)
    }
}

/// A field, treating null (`key:` with nothing after it) as absent, like proto JSON decoding.
pub(crate) fn get<'v>(map: &'v Mapping, key: &str) -> Option<&'v Value> {
    map.get(key).filter(|v| !v.is_null())
}

pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_owned(),
        _ => "<complex key>".to_owned(),
    }
}

/// The keys of `map` that are not in `known`: each one's path, and the known key it may be a
/// misspelling of.
fn unexpected_keys<'k>(map: &Mapping, parent: &str, known: &[&'k str]) -> Vec<(String, Option<&'k str>)> {
    map.keys()
        .map(key_text)
        .filter(|text| !known.contains(&text.as_str()))
        .map(|text| (child_path(parent, &text), closest(&text, known)))
        .collect()
}

/// The known key closest to a misspelt one, if any is plausibly meant.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(&key.to_ascii_lowercase(), &k.to_ascii_lowercase()), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Kuma accepts a DNS name wherever it accepts an address (govalidator's `IsDNSName`): labels of
/// 1..=63 `[A-Za-z0-9_-]` not starting with `-`, at most 255 characters, an optional final dot.
/// All-numeric names are rejected: `10.0.0.256` is a typo for an IP, not a host name.
fn is_dns_name(name: &str) -> bool {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > 255 {
        return false;
    }
    let labels_ok = trimmed.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    labels_ok && !trimmed.chars().all(|c| c.is_ascii_digit() || c == '.')
}

// ---------------------------------------------------------------------------------------------
// Field paths
// ---------------------------------------------------------------------------------------------

/// `parent.key`, or `parent["key"]` for keys that are not plain identifiers (tag names contain
/// dots and slashes, and a dotted rendering would be ambiguous).
pub(crate) fn child_path(parent: &str, key: &str) -> String {
    let plain = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (plain, parent.is_empty()) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{parent}.{key}"),
        (false, _) => format!("{parent}[{key:?}]"),
    }
}

pub(crate) fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// The path one level up, for position fallback. Only called on paths built by [`child_path`]
/// and [`index_path`]; a quoted key may contain `.`/`[`, so `["` is recognised first.
fn parent_path(path: &str) -> Option<&str> {
    if path.ends_with("\"]") {
        return path.rfind("[\"").map(|i| &path[..i]);
    }
    let cut = path.rfind(['.', '['])?;
    Some(&path[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_and_climb() {
        assert_eq!(child_path("", "networking"), "networking");
        assert_eq!(child_path("a", "kuma.io/service"), "a[\"kuma.io/service\"]");
        assert_eq!(index_path("items", 2), "items[2]");
        assert_eq!(parent_path("a.b[3].c"), Some("a.b[3]"));
        assert_eq!(parent_path("a.b[3]"), Some("a.b"));
        assert_eq!(parent_path("t[\"x.y[1]\"]"), Some("t"));
        assert_eq!(parent_path("a"), None);
    }

    #[test]
    fn dns_names() {
        for ok in ["a", "zi.east.example.com", "zi.east.example.com.", "a_b-c.d", "x1"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in ["", "1.2.3.4", "a..b", "-a", "a b", &"a".repeat(64), "a/b"] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }
}
