//! Helpers shared by the configuration tests.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::{
    ConfigError, Diagnostic, Inventory, Loaded, Severity, ZoneIngress, inventory::parse_inventory_with,
    parse_inventory, parse_zone_ingress, resolve::tests::TableResolver,
};

pub(crate) const ZI: &str = "\
type: ZoneIngress
name: zi-east-1
networking:
  address: 198.18.0.5
  port: 10001
  advertisedAddress: 203.0.113.7
  advertisedPort: 10001
  admin:
    port: 9901
";

pub(crate) fn no_vars() -> BTreeMap<String, String> {
    BTreeMap::new()
}

pub(crate) fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

pub(crate) fn zi(text: &str) -> Loaded<ZoneIngress> {
    match parse_zone_ingress(Path::new("zi.yaml"), text, &no_vars()) {
        Ok(loaded) => loaded,
        Err(e) => panic!("expected a valid ZoneIngress, got:\n{e}"),
    }
}

pub(crate) fn zi_err(text: &str) -> ConfigError {
    zi_err_vars(text, &no_vars())
}

pub(crate) fn zi_err_vars(text: &str, vars: &BTreeMap<String, String>) -> ConfigError {
    match parse_zone_ingress(Path::new("zi.yaml"), text, vars) {
        Ok(loaded) => panic!("expected errors, got {loaded:?}"),
        Err(e) => e,
    }
}

pub(crate) fn inv(text: &str) -> Loaded<Inventory> {
    match parse_inventory(Path::new("dp.yaml"), text) {
        Ok(loaded) => loaded,
        Err(e) => panic!("expected a valid inventory, got:\n{e}"),
    }
}

/// [`inv`] with `resolver` for the DNS names.
pub(crate) fn inv_with(text: &str, resolver: &Arc<TableResolver>) -> Loaded<Inventory> {
    match parse_inventory_with(Path::new("dp.yaml"), text, &resolver.dyn_ref()) {
        Ok(loaded) => loaded,
        Err(e) => panic!("expected a valid inventory, got:\n{e}"),
    }
}

/// The warnings of an inventory that loads, about the Dataplanes it skipped.
pub(crate) fn inv_skips(text: &str) -> Vec<Diagnostic> {
    inv(text).warnings.into_iter().filter(|d| d.message.starts_with("skipped")).collect()
}

/// The warning at `path` that says a Dataplane was skipped.
pub(crate) fn skip_at<'d>(warnings: &'d [Diagnostic], path: &str) -> &'d Diagnostic {
    let d = warning_at(warnings, path);
    assert!(d.message.starts_with("skipped Dataplane") || d.message.starts_with("skipped a Dataplane"), "{d}");
    d
}

/// The only warning about a skipped Dataplane, which must be at `path`.
pub(crate) fn only_skip(warnings: &[Diagnostic], path: &str) -> Diagnostic {
    let skips: Vec<&Diagnostic> = warnings.iter().filter(|d| d.message.starts_with("skipped")).collect();
    assert_eq!(skips.len(), 1, "expected exactly one skipped Dataplane: {warnings:#?}");
    skip_at(warnings, path).clone()
}

pub(crate) fn inv_err(text: &str) -> ConfigError {
    match parse_inventory(Path::new("dp.yaml"), text) {
        Ok(loaded) => panic!("expected errors, got {loaded:?}"),
        Err(e) => e,
    }
}

/// The only error, which must be at `path`.
pub(crate) fn only_error(e: &ConfigError, path: &str) -> Diagnostic {
    let errors: Vec<&Diagnostic> = e.errors().collect();
    assert_eq!(errors.len(), 1, "expected exactly one error:\n{e}");
    assert_eq!(errors[0].path, path, "{e}");
    errors[0].clone()
}

pub(crate) fn error_at<'e>(e: &'e ConfigError, path: &str) -> &'e Diagnostic {
    e.errors().find(|d| d.path == path).unwrap_or_else(|| panic!("no error at {path}:\n{e}"))
}

pub(crate) fn warning_at<'d>(warnings: &'d [Diagnostic], path: &str) -> &'d Diagnostic {
    warnings
        .iter()
        .find(|d| d.path == path && d.severity == Severity::Warning)
        .unwrap_or_else(|| panic!("no warning at {path}: {warnings:#?}"))
}

pub(crate) fn at(d: &Diagnostic) -> (Option<usize>, Option<usize>) {
    (d.line, d.column)
}

/// A Dataplane document; `inbound` is the text of its `networking.inbound` list, indented by
/// the caller.
pub(crate) fn dp(name: &str, address: &str, inbound: &str) -> String {
    format!(
        "type: Dataplane\nmesh: default\nname: {name}\nnetworking:\n  address: {address}\n  \
         inbound:\n{inbound}"
    )
}

/// A directory removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "zone-ingress-config-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(name)
}
