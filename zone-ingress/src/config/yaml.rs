//! YAML documents: parsing (structure from `serde_yaml`, integers beyond 64 bits kept as
//! out-of-range numbers rather than failing the document) and the span index, which maps every
//! field path of a document to the line and column of its key and value (saphyr-parser's event
//! stream).

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::Path,
};

use serde::Deserialize;
pub(crate) use serde_yaml::{Mapping, Value};

use super::{
    check::{Checker, Where, child_path, describe, index_path},
    diagnostic::{Diagnostic, Severity},
    template::PosMap,
};

/// 1-based line and column (characters) in the text that was parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub(crate) line: usize,
    pub(crate) column: usize,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct FieldSpan {
    /// Where the key starts; `None` for list items and the document root.
    pub(crate) key: Option<Pos>,
    /// Where the value starts.
    pub(crate) value: Pos,
}

/// Positions of every addressable node of one YAML document.
#[derive(Debug, Default)]
pub(crate) struct DocSpans {
    /// Where the document starts.
    pub(crate) start: Option<Pos>,
    /// By field path (`networking.inbound[0].port`, `tags["kuma.io/service"]`).
    pub(crate) fields: HashMap<String, FieldSpan>,
    /// Keys that repeat within their mapping: `serde_yaml` reports these only at the mapping.
    duplicate_keys: Vec<Pos>,
}

/// The documents of one file and their positions.
pub(crate) struct Parsed {
    /// The documents read before any syntax error, in order; empty ones are `Null`.
    pub(crate) docs: Vec<Value>,
    /// The position index of each document (`None` where the index has no such document).
    spans: Vec<Option<DocSpans>>,
    posmap: PosMap,
    syntax_error: bool,
}

/// The document of a file that holds one resource.
pub(crate) enum Single<'p> {
    /// The only non-empty document, and its index.
    Found(usize, &'p Value),
    /// No document, or only empty ones.
    Empty,
    /// A syntax error before any document (already reported).
    Broken,
}

impl Parsed {
    /// A checker for document `doc`.
    pub(crate) fn checker<'a>(&'a self, file: &'a Path, doc: usize, diags: &'a mut Vec<Diagnostic>) -> Checker<'a> {
        Checker::new(file, self.spans.get(doc).and_then(Option::as_ref), &self.posmap, diags)
    }

    /// The file's only non-empty document; a second one is an error ("expected a single `what`
    /// document").
    pub(crate) fn single(&self, file: &Path, diags: &mut Vec<Diagnostic>, what: &str) -> Single<'_> {
        let mut docs = self.docs.iter().enumerate().filter(|(_, doc)| !doc.is_null());
        match (docs.next(), docs.next()) {
            (Some((i, doc)), second) => {
                if let Some((j, _)) = second {
                    self.checker(file, j, diags).error(
                        "",
                        Where::Value(""),
                        format!("expected a single {what} document; found more than one"),
                    );
                }
                Single::Found(i, doc)
            }
            (None, _) if self.syntax_error => Single::Broken,
            (None, _) => Single::Empty,
        }
    }
}

/// Parse every document of `text` as written in `file`; see [`parse_substituted`].
pub(crate) fn parse_documents(file: &Path, text: &str, diags: &mut Vec<Diagnostic>) -> Parsed {
    parse_substituted(file, text, PosMap::identity(), diags)
}

/// Parse every document of `text`, which `posmap` maps back to `file`. On a syntax error the
/// documents before it are still returned (and checked), so one run reports as much as possible.
pub(crate) fn parse_substituted(file: &Path, text: &str, posmap: PosMap, diags: &mut Vec<Diagnostic>) -> Parsed {
    let (mut docs, mut spans) = (Vec::new(), Vec::new());
    let syntax_error = each_document(file, text, &posmap, diags, |doc_spans, value, _| {
        spans.push(doc_spans);
        docs.push(value);
    });
    Parsed { docs, spans, posmap, syntax_error }
}

/// Checks every document of `text` (as written in `file`) with `check`, one at a time: a
/// document's value and position index are dropped before the next is read, so a long stream
/// (a large inventory) costs memory for what `check` keeps, not for the whole parse. Reports
/// what [`parse_documents`] reports; stops at a syntax error, after the documents before it.
pub(crate) fn for_each_document(
    file: &Path,
    text: &str,
    diags: &mut Vec<Diagnostic>,
    mut check: impl FnMut(&mut Checker<'_>, &Value),
) {
    let posmap = PosMap::identity();
    each_document(file, text, &posmap, diags, |doc_spans, value, diags| {
        check(&mut Checker::new(file, doc_spans.as_ref(), &posmap, diags), &value);
    });
}

/// Reads the documents of `text` one at a time, each with its position index (`None` where the
/// index has no such document), and hands them to `each`. A YAML error is reported at its
/// position (mapped back to `file` by `posmap`); a document whose merge keys fail is handed on
/// as `Null`. Returns whether it stopped at a syntax error (the documents before it were handed
/// on).
fn each_document(
    file: &Path,
    text: &str,
    posmap: &PosMap,
    diags: &mut Vec<Diagnostic>,
    mut each: impl FnMut(Option<DocSpans>, Value, &mut Vec<Diagnostic>),
) -> bool {
    let mut index = SpanIndex::new(text);
    for document in serde_yaml::Deserializer::from_str(text) {
        let spans = index.next_doc();
        match Lenient::deserialize(document) {
            Ok(Lenient(mut value)) => {
                if let Err(e) = value.apply_merge() {
                    diags.push(yaml_error(file, spans.as_ref().and_then(|s| s.start), posmap, &e));
                    value = Value::Null;
                }
                each(spans, value, diags);
            }
            Err(e) => {
                let mut pos = e.location().map(|l| Pos { line: l.line(), column: l.column() });
                // serde_yaml points at the mapping; the span index knows the repeated key.
                if e.to_string().starts_with("duplicate entry")
                    && let Some(dup) = spans.as_ref().and_then(|s| s.duplicate_keys.first())
                {
                    pos = Some(*dup);
                }
                diags.push(yaml_error(file, pos, posmap, &e));
                // serde_yaml's document iterator repeats a fatal error forever.
                return true;
            }
        }
    }
    false
}

fn yaml_error(file: &Path, pos: Option<Pos>, posmap: &PosMap, e: &serde_yaml::Error) -> Diagnostic {
    let pos = pos.map(|p| posmap.original(p));
    Diagnostic {
        file: file.to_path_buf(),
        line: pos.map(|p| p.0),
        column: pos.map(|p| p.1),
        path: String::new(),
        message: format!("invalid YAML: {e}"),
        severity: Severity::Error,
    }
}

/// A `serde_yaml::Value` read without failing the whole document on integers that do not fit 64
/// bits: `serde_yaml`'s own `Value` rejects them, which would hide every other problem of the file.
/// They become floats here, so the field check reports them as out of range like any other.
struct Lenient(Value);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LenientVisitor).map(Lenient)
    }
}

struct LenientVisitor;

impl<'de> serde::de::Visitor<'de> for LenientVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(huge_integer(&v.to_string()))
    }

    fn visit_u128<E>(self, v: u128) -> Result<Value, E> {
        Ok(huge_integer(&v.to_string()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Lenient::deserialize(d).map(|l| l.0)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Lenient(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut mapping = Mapping::new();
        while let Some(Lenient(key)) = map.next_key()? {
            let Lenient(value) = map.next_value()?;
            if mapping.contains_key(&key) {
                // Same wording as serde_yaml's, which `parse_documents` recognises.
                return Err(serde::de::Error::custom(format_args!("duplicate entry with key {}", describe(&key))));
            }
            mapping.insert(key, value);
        }
        Ok(Value::Mapping(mapping))
    }

    /// `serde_yaml` presents a tagged node (`!tag value`) as an enum variant named by the tag.
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        use serde::de::VariantAccess as _;
        let (tag, contents): (String, _) = data.variant()?;
        let Lenient(value) = contents.newtype_variant()?;
        Ok(Value::Tagged(Box::new(serde_yaml::value::TaggedValue { tag: serde_yaml::value::Tag::new(tag), value })))
    }
}

/// An integer beyond 64 bits as a float: only its magnitude matters, since any such value is out
/// of range for every field.
fn huge_integer(digits: &str) -> Value {
    Value::Number(digits.parse::<f64>().unwrap_or(f64::INFINITY).into())
}

/// The position of every mapping value and list item by field path, one document at a time (so a
/// long stream never has all of its indexes in memory at once), from saphyr-parser's event
/// stream. Stops quietly at a syntax error (`serde_yaml` reports it).
struct SpanIndex<'t> {
    parser: saphyr_parser::Parser<'t, saphyr_parser::StrInput<'t>>,
    stack: Vec<Frame>,
    done: bool,
}

impl<'t> SpanIndex<'t> {
    fn new(text: &'t str) -> Self {
        Self { parser: saphyr_parser::Parser::new_from_str(text), stack: Vec::new(), done: false }
    }

    /// The index of the next document; `None` at the end of the stream or at a syntax error.
    fn next_doc(&mut self) -> Option<DocSpans> {
        use saphyr_parser::Event;

        let mut doc: Option<DocSpans> = None;
        while !self.done {
            let Some(Ok((event, span))) = self.parser.next_event() else {
                self.done = true;
                break;
            };
            let pos = Pos { line: span.start.line(), column: span.start.col() + 1 };
            let node = match event {
                Event::DocumentStart(_) => {
                    doc = Some(DocSpans { start: Some(pos), ..DocSpans::default() });
                    self.stack.clear();
                    continue;
                }
                Event::DocumentEnd => {
                    if doc.is_some() {
                        return doc;
                    }
                    continue;
                }
                Event::StreamEnd => {
                    self.done = true;
                    break;
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    self.stack.pop();
                    continue;
                }
                Event::Scalar(value, ..) => Node::Scalar(value.into_owned()),
                Event::Alias(_) => Node::Alias,
                Event::MappingStart(..) => Node::Mapping,
                Event::SequenceStart(..) => Node::Sequence,
                Event::Nothing | Event::StreamStart => continue,
            };
            if let Some(d) = doc.as_mut() {
                on_node(d, &mut self.stack, node, pos);
            }
        }
        doc
    }
}

enum Node {
    Scalar(String),
    Alias,
    Mapping,
    Sequence,
}

/// What the next node of a mapping is.
enum Pending {
    Key,
    /// The value of the key just read: its text and position, or `None` for a complex key,
    /// whose value has no path.
    Value(Option<(String, Pos)>),
}

enum Frame {
    Mapping {
        path: String,
        next: Pending,
        seen: HashSet<String>,
    },
    Sequence {
        path: String,
        next: usize,
    },
    /// Inside a complex (non-scalar) key: nothing below is addressable.
    Opaque,
}

fn on_node(doc: &mut DocSpans, stack: &mut Vec<Frame>, node: Node, pos: Pos) {
    // Some(true): a mapping starts here, Some(false): a sequence, None: a leaf.
    let container = match node {
        Node::Mapping => Some(true),
        Node::Sequence => Some(false),
        Node::Scalar(_) | Node::Alias => None,
    };
    // The path of this node, and its key's position; None when it has no path.
    let target: Option<(String, Option<Pos>)> = match stack.last_mut() {
        None => Some((String::new(), None)),
        Some(Frame::Opaque) => None,
        Some(Frame::Sequence { path, next }) => {
            let item = index_path(path, *next);
            *next += 1;
            Some((item, None))
        }
        Some(Frame::Mapping { path, next, seen }) => match std::mem::replace(next, Pending::Key) {
            Pending::Key => {
                // This node is a key, not a field.
                *next = Pending::Value(match node {
                    Node::Scalar(text) => {
                        if !seen.insert(text.clone()) {
                            doc.duplicate_keys.push(pos);
                        }
                        Some((text, pos))
                    }
                    Node::Alias | Node::Mapping | Node::Sequence => None,
                });
                if container.is_some() {
                    stack.push(Frame::Opaque);
                }
                return;
            }
            Pending::Value(Some((name, key_pos))) => Some((child_path(path, &name), Some(key_pos))),
            Pending::Value(None) => None,
        },
    };
    if let Some((path, key)) = &target {
        doc.fields.entry(path.clone()).or_insert(FieldSpan { key: *key, value: pos });
    }
    match (container, target) {
        (Some(true), Some((path, _))) => stack.push(Frame::Mapping { path, next: Pending::Key, seen: HashSet::new() }),
        (Some(false), Some((path, _))) => stack.push(Frame::Sequence { path, next: 0 }),
        (Some(_), None) => stack.push(Frame::Opaque),
        (None, _) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_inventory, parse_zone_ingress, test_util::*};

    #[test]
    fn zone_ingress_yaml_syntax_error_has_a_position() {
        let e = zi_err("type: ZoneIngress\nnetworking: [port: 1\nname: x\n");
        assert_eq!(e.diagnostics.len(), 1);
        let d = &e.diagnostics[0];
        assert_eq!(d.line, Some(3));
        assert!(d.message.starts_with("invalid YAML"), "{d}");
    }

    #[test]
    fn zone_ingress_duplicate_key_points_at_the_repeat() {
        let e = zi_err(&format!("{ZI}name: again\n"));
        let d = &e.diagnostics[0];
        assert!(d.message.contains("duplicate entry"), "{d}");
        assert_eq!(at(d), (Some(10), Some(1)));
    }

    #[test]
    fn inventory_syntax_error_keeps_earlier_documents_checked() {
        let bad = dp("a", "198.18.1.1", "  - {port: 0, tags: {kuma.io/service: s}}\n");
        let e = inv_err(&format!("{bad}---\nname: [\n"));
        assert_eq!(e.diagnostics.len(), 2, "{e}");
        skip_at(&e.diagnostics, "networking.inbound[0].port");
        let syntax = only_error(&e, "");
        assert!(syntax.message.starts_with("invalid YAML") && syntax.line == Some(10), "{syntax}");
    }

    #[test]
    fn never_panics_on_odd_yaml() {
        for text in [
            "",
            "---",
            "~",
            "[]",
            "{}",
            "? [a, b]\n: c\n",
            "type: ZoneIngress\nnetworking: {? {x: 1}: 2}\n",
            "a: &x {b: 1}\nc: *x\n",
            "<<: {type: ZoneIngress}\nname: zi\n",
            "type: !custom ZoneIngress\n",
            "\u{feff}type: ZoneIngress\n",
            "items:\n- ~\n- []\n",
            "{{",
            "}}{{}}",
            "key: {{ é }}",
        ] {
            // None of these is a ZoneIngress, and none holds a Dataplane: each is refused with
            // diagnostics, or (the inventory) accepted as empty.
            match parse_zone_ingress(Path::new("x"), text, &no_vars()) {
                Ok(l) => panic!("{text:?} accepted as a ZoneIngress: {:?}", l.value),
                Err(e) => assert!(e.errors().any(|d| !d.message.is_empty()), "{text:?}: {e:?}"),
            }
            match parse_inventory(Path::new("x"), text) {
                Ok(l) => assert!(l.value.is_empty(), "{text:?}"),
                Err(e) => assert!(e.errors().any(|d| !d.message.is_empty()), "{text:?}: {e:?}"),
            }
        }
    }

    #[test]
    fn merge_keys_are_applied() {
        let text = "\
base: &net
  address: 198.18.0.5
  port: 10001
type: ZoneIngress
name: zi
networking:
  <<: *net
  advertisedAddress: 203.0.113.7
  advertisedPort: 10001
";
        let loaded = zi(text);
        assert_eq!(loaded.value.port, 10001);
        warning_at(&loaded.warnings, "base");
    }
}
