//! How a configuration problem is reported: a [`Diagnostic`] with the file, the position when
//! known and the field path; a rejected input is a [`ConfigError`] holding all of them.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use serde::Serialize;
use thiserror::Error;

/// How bad a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The input is rejected.
    Error,
    /// The input is accepted, but something is probably not what the operator meant.
    Warning,
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column in characters, when known.
    pub column: Option<usize>,
    /// Field path such as `networking.admin.port` or `items[2].networking.inbound[0].tags`;
    /// empty for problems with the file as a whole. Keys that are not plain identifiers are
    /// quoted: `tags["kuma.io/service"]`.
    pub path: String,
    /// What is wrong, and a hint when there is one.
    pub message: String,
    /// Error or warning.
    pub severity: Severity,
}

impl Diagnostic {
    /// An error without a position, for problems found outside the files (command-line
    /// arguments, say) that should be reported together with the file problems.
    pub fn error(file: impl Into<PathBuf>, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line: None,
            column: None,
            path: path.into(),
            message: message.into(),
            severity: Severity::Error,
        }
    }

    /// A warning without a position; see [`Diagnostic::error`].
    pub fn warning(file: impl Into<PathBuf>, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { severity: Severity::Warning, ..Self::error(file, path, message) }
    }

    /// Whether this is an error (as opposed to a warning).
    #[must_use]
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    /// `file:line:col: path: message`; warnings say `warning:` before the path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// A configuration input was rejected. Holds every error found (at least one) and the warnings
/// found alongside them, because a warning such as an unknown (misspelt) key often explains an
/// error such as a missing field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", render_lines(.diagnostics))]
pub struct ConfigError {
    /// All problems, in file and line order.
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    /// The diagnostics that are errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
}

fn render_lines(diagnostics: &[Diagnostic]) -> String {
    diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// A successfully loaded input and the warnings it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<T> {
    /// The checked value.
    pub value: T,
    /// Problems that did not prevent loading; callers should log them.
    pub warnings: Vec<Diagnostic>,
}

/// Turn collected diagnostics into the result: an error if any diagnostic is an error.
pub(crate) fn finish<T>(value: Option<T>, mut diags: Vec<Diagnostic>) -> Result<Loaded<T>, ConfigError> {
    // Stable: problems without a position keep their place after the positioned ones of the file.
    diags.sort_by(|a, b| {
        (&a.file, a.line.unwrap_or(usize::MAX), a.column).cmp(&(&b.file, b.line.unwrap_or(usize::MAX), b.column))
    });
    match value {
        Some(value) if !diags.iter().any(Diagnostic::is_error) => Ok(Loaded { value, warnings: diags }),
        _ => Err(ConfigError { diagnostics: diags }),
    }
}

/// A diagnostic about the file as a whole (no position, no field path).
pub(crate) fn whole_file(file: &Path, severity: Severity, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        file: file.to_path_buf(),
        line: None,
        column: None,
        path: String::new(),
        message: message.into(),
        severity,
    }
}

/// The file's text; an unreadable or non-UTF-8 file is a diagnostic.
pub(crate) fn read_text(path: &Path) -> Result<String, Diagnostic> {
    let bytes = fs::read(path).map_err(|e| whole_file(path, Severity::Error, format!("cannot read file: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        whole_file(path, Severity::Error, format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()))
    })
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use crate::config::{load_inventory, load_zone_ingress, test_util::*};

    #[test]
    fn unreadable_files_are_diagnostics() {
        let missing = Path::new("/nonexistent/zone-ingress/zi.yaml");
        let e = load_zone_ingress(missing, &no_vars()).expect_err("missing");
        assert!(e.diagnostics[0].message.starts_with("cannot read file"));
        let dir = TempDir::new();
        let bad = dir.0.join("latin1.yaml");
        fs::write(&bad, b"name: caf\xe9\n").expect("write");
        let e = load_inventory(&bad).expect_err("not utf-8");
        assert!(e.diagnostics[0].message.contains("UTF-8"), "{e}");
    }
}
