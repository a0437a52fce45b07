//! `{{ var }}` substitution in the `ZoneIngress` file (kuma-dp's `--dataplane-var`), and the
//! [`PosMap`] that maps positions in the substituted text back to the file.

use std::{collections::BTreeMap, path::Path};

use super::{
    diagnostic::{Diagnostic, Severity},
    yaml::Pos,
};

/// One placeholder replaced by its value: byte ranges in the output and in the original text.
#[derive(Debug, Clone, Copy)]
struct Replacement {
    out_start: usize,
    out_end: usize,
    orig_start: usize,
    orig_end: usize,
}

#[derive(Debug)]
struct Translation {
    original: String,
    output: String,
    replacements: Vec<Replacement>,
}

/// Maps positions in the substituted text (what the YAML parsers saw) back to the file the
/// operator wrote, so diagnostics point at the right column even after a substitution, and at
/// the right line even when a value contained newlines.
#[derive(Debug, Default)]
pub(crate) struct PosMap {
    translation: Option<Translation>,
}

impl PosMap {
    pub(crate) fn identity() -> Self {
        Self::default()
    }

    /// `(line, column)`, both 1-based, in the original text.
    pub(crate) fn original(&self, pos: Pos) -> (usize, usize) {
        let fallback = (pos.line, pos.column);
        let Some(t) = &self.translation else {
            return fallback;
        };
        let Some(out) = byte_at(&t.output, pos) else {
            return fallback;
        };
        // Before the first replacement, and between replacements, both texts are identical up
        // to a shift; inside a replacement, point at the placeholder.
        let orig = match t.replacements.iter().rev().find(|r| r.out_start <= out) {
            None => out,
            Some(r) if out < r.out_end => r.orig_start,
            Some(r) => r.orig_end + (out - r.out_end),
        };
        line_col(&t.original, orig).unwrap_or(fallback)
    }
}

/// Byte offset of a 1-based line/column (characters) in `text`; positions past the end of a
/// line map to its end.
fn byte_at(text: &str, pos: Pos) -> Option<usize> {
    let line_start = match pos.line {
        0 => return None,
        1 => 0,
        n => text.match_indices('\n').nth(n - 2)?.0 + 1,
    };
    let line = text.get(line_start..)?;
    let line = &line[..line.find('\n').unwrap_or(line.len())];
    let offset = line.char_indices().nth(pos.column.saturating_sub(1)).map_or(line.len(), |(i, _)| i);
    Some(line_start + offset)
}

/// 1-based line and column (characters) of a byte offset in `text`.
fn line_col(text: &str, byte: usize) -> Option<(usize, usize)> {
    let before = text.get(..byte)?;
    let line = 1 + before.matches('\n').count();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Some((line, before[line_start..].chars().count() + 1))
}

fn is_var_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Replace `{{ name }}` / `{{name}}` with `vars[name]`, as kuma-dp does with `--dataplane-var`.
/// Values are inserted verbatim (no YAML quoting), like kuma-dp. Returns `None` after reporting
/// every unknown variable and malformed placeholder.
pub(crate) fn substitute(
    file: &Path,
    text: &str,
    vars: &BTreeMap<String, String>,
    diags: &mut Vec<Diagnostic>,
) -> Option<(String, PosMap)> {
    if !text.contains("{{") {
        return Some((text.to_owned(), PosMap::identity()));
    }
    let mut failed = false;
    let mut fail = |at: usize, message: String| {
        let pos = line_col(text, at);
        diags.push(Diagnostic {
            file: file.to_path_buf(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            path: String::new(),
            message,
            severity: Severity::Error,
        });
        failed = true;
    };
    let mut output = String::with_capacity(text.len());
    let mut replacements = Vec::new();
    let mut copied_to = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("{{") {
        let open = search + found;
        let inner_start = open + 2;
        let line_end = text[inner_start..].find('\n').map_or(text.len(), |i| inner_start + i);
        let Some(close) = text[inner_start..line_end].find("}}").map(|i| inner_start + i) else {
            fail(open, "unterminated `{{`: placeholders look like `{{ name }}` on one line".to_owned());
            search = inner_start;
            continue;
        };
        let end = close + 2;
        let name = text[inner_start..close].trim();
        if !is_var_name(name) {
            fail(
                open,
                format!(
                    "invalid placeholder `{}`: expected `{{{{ name }}}}` with a name of \
                     letters, digits, `_`, `-` or `.`",
                    &text[open..end]
                ),
            );
        } else if let Some(value) = vars.get(name) {
            output.push_str(&text[copied_to..open]);
            let out_start = output.len();
            output.push_str(value);
            replacements.push(Replacement { out_start, out_end: output.len(), orig_start: open, orig_end: end });
            copied_to = end;
        } else {
            fail(open, format!("variable `{name}` is not set (pass --dataplane-var {name}=VALUE)"));
        }
        search = end;
    }
    if failed {
        return None;
    }
    output.push_str(&text[copied_to..]);
    let posmap =
        PosMap { translation: Some(Translation { original: text.to_owned(), output: output.clone(), replacements }) };
    Some((output, posmap))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::config::{parse_zone_ingress, test_util::*};

    #[test]
    fn vars_are_substituted() {
        let text = fs::read_to_string(fixture("zoneingress-template.yaml")).expect("fixture");
        let loaded = parse_zone_ingress(
            Path::new("t.yaml"),
            &text,
            &vars(&[("name", "zi-east-2"), ("address", "198.18.0.6"), ("port", "10001"), ("unused", "x")]),
        )
        .expect("valid");
        let z = loaded.value;
        assert_eq!(z.name, "zi-east-2");
        assert_eq!(z.listen_addr(), "198.18.0.6:10001".parse().expect("addr"));
        assert_eq!(z.advertised(), Some(("203.0.113.7", 10001)));
    }

    #[test]
    fn vars_missing_are_all_reported_with_positions() {
        let text = "type: ZoneIngress\nname: {{ name }}\nnetworking:\n  address: {{address}}\n  \
                    port: {{ port }}\n";
        let e = zi_err_vars(text, &vars(&[("address", "198.18.0.6")]));
        let lines: Vec<String> = e.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "zi.yaml:2:7: variable `name` is not set (pass --dataplane-var name=VALUE)",
                "zi.yaml:5:9: variable `port` is not set (pass --dataplane-var port=VALUE)",
            ]
        );
    }

    #[test]
    fn vars_malformed_placeholders() {
        let e = zi_err_vars("name: {{ a b }}\nx: {{ open\n", &vars(&[("a", "1")]));
        assert_eq!(e.diagnostics.len(), 2, "{e}");
        assert!(e.diagnostics[0].message.starts_with("invalid placeholder"));
        assert!(e.diagnostics[1].message.starts_with("unterminated"));
        assert_eq!(at(&e.diagnostics[1]), (Some(2), Some(4)));
    }

    #[test]
    fn vars_positions_map_back_to_the_original_text() {
        // After a longer substitution on the same line, the column is the original one.
        let text = "type: ZoneIngress\nname: zi\nnetworking: {address: {{ a }}, port: bad}\n";
        let e = zi_err_vars(text, &vars(&[("a", "198.18.0.200")]));
        let d = error_at(&e, "networking.port");
        assert_eq!(at(d), (Some(3), Some(38)));
        // A value with a newline shifts later lines; positions still refer to the file.
        let text = "type: ZoneIngress\n{{ block }}\nnetworking:\n  address: 1.2.3.4\n  port: x\n";
        let e = zi_err_vars(text, &vars(&[("block", "name: zi\nzone: east")]));
        let d = error_at(&e, "networking.port");
        assert_eq!(at(d), (Some(5), Some(9)));
        // A problem inside the substituted value points at the placeholder.
        let text = "type: ZoneIngress\nname: zi\nnetworking:\n  address: 1.2.3.4\n  port: {{ p }}\n";
        let e = zi_err_vars(text, &vars(&[("p", "70000")]));
        assert_eq!(at(error_at(&e, "networking.port")), (Some(5), Some(9)));
    }
}
