//! Configuration inputs: the `ZoneIngress` resource file and the backend inventory of Kuma
//! `Dataplane` resources, each in Universal or Kubernetes form (formats: `docs/design.md#routing`;
//! the forms accepted: `docs/operations.md#input-forms`).
//!
//! Both are read the way an operator writes them and the control plane prints them, then checked
//! against Kuma's validation rules plus the few this data plane adds (it binds to the
//! ZoneIngress's `networking.address`, so that must be an IP). A Dataplane that cannot be used is
//! skipped with a warning, as the control plane would have refused or left out that one alone;
//! a ZoneIngress with any error is refused. Only checked values leave this module: [`ZoneIngress`]
//! and [`Inventory`] are plain data.
//!
//! Every problem in a file is reported at once, each as a [`Diagnostic`] with the file, the
//! line and column when known, and the field path (`networking.admin.port`,
//! `items[2].networking.inbound[0].tags`). `serde_yaml` gives positions only for syntax errors, so
//! a second, span-aware pass over the same text (saphyr-parser's event stream) indexes every
//! field path to its line and column; the structure itself always comes from `serde_yaml`. When the
//! two disagree (they should not for any realistic input) a diagnostic merely loses its position.
//! The XDP guard file ([`crate::xdp`]) is read and checked with the same machinery.
//!
//! All `serde_yaml` use is confined to this module so that a maintained fork can replace it here;
//! other modules reach its values through `yaml::Value` and `yaml::Mapping`.
//!
//! - `diagnostic`: [`Diagnostic`], [`ConfigError`], [`Loaded`].
//! - `zone_ingress`: the `ZoneIngress` file.
//! - `inventory`: the `Dataplane` inventory (a file or a directory).
//! - `kube`: the Kubernetes form (`apiVersion`, `kind`, `metadata`, `spec`) of both.
//! - `resolve`: DNS names of Dataplane addresses, resolved within a bound at every load.
//! - `check`: the field checker, which turns values into diagnostics with a path and a position.
//! - `yaml`: parsing documents, and the span index of field paths to positions.
//! - `template`: `{{ var }}` substitution, and positions in the substituted text mapped back to
//!   the file.
//! - [`load_inputs`]: both files at once, as `run`, `validate` and a reload read them.

use std::{collections::BTreeMap, path::PathBuf};

pub(crate) mod check;
mod diagnostic;
mod inventory;
mod kube;
mod resolve;
mod template;
#[cfg(test)]
mod test_util;
pub(crate) mod yaml;
mod zone_ingress;

pub(crate) use diagnostic::finish;
pub use diagnostic::{ConfigError, Diagnostic, Loaded, Severity};
pub(crate) use inventory::yaml_files;
pub use inventory::{Dataplane, Inbound, InboundState, Inventory, ZONE_TAG, load_inventory, parse_inventory};
pub use zone_ingress::{DEFAULT_ADMIN_PORT, ZoneIngress, load_zone_ingress, parse_zone_ingress};

/// Where the inputs come from: the command-line values [`load_inputs`] reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// The `ZoneIngress` file (`--dataplane-file`).
    pub dataplane_file: PathBuf,
    /// The inventory file or directory (`--dataplanes`).
    pub dataplanes: PathBuf,
    /// `{{ key }}` substitutions in the `ZoneIngress` file (`--dataplane-var key=value`).
    pub dataplane_vars: Vec<(String, String)>,
    /// The zone this ingress serves (`--zone`).
    pub zone: String,
    /// `--proxy-type`; only `ingress` is accepted.
    pub proxy_type: String,
}

/// Both inputs, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The checked `ZoneIngress`.
    pub zone_ingress: ZoneIngress,
    /// The checked inventory.
    pub inventory: Inventory,
    /// Warnings of both files; callers should log them.
    pub warnings: Vec<Diagnostic>,
}

/// A loaded input's value, its warnings added to `warnings`; or `None` and its problems added to
/// `problems`.
fn take<T>(
    loaded: Result<Loaded<T>, ConfigError>,
    warnings: &mut Vec<Diagnostic>,
    problems: &mut Vec<Diagnostic>,
) -> Option<T> {
    match loaded {
        Ok(l) => {
            warnings.extend(l.warnings);
            Some(l.value)
        }
        Err(e) => {
            problems.extend(e.diagnostics);
            None
        }
    }
}

impl Sources {
    /// `--dataplane-var` as the substitution map.
    fn vars(&self) -> BTreeMap<String, String> {
        self.dataplane_vars.iter().cloned().collect()
    }
}

/// The `--proxy-type` problem, if any: only `ingress` is served.
fn proxy_type_problems(sources: &Sources) -> Vec<Diagnostic> {
    if sources.proxy_type == "ingress" {
        return Vec::new();
    }
    vec![Diagnostic::error(
        PathBuf::from("--proxy-type"),
        "proxy-type",
        format!("zone-ingress only serves --proxy-type=ingress, got {:?}", sources.proxy_type),
    )]
}

/// The ZoneIngress input alone, as control-plane mode reads it (the routes come from the
/// control plane), with `--proxy-type` checked.
///
/// # Errors
/// Every diagnostic (errors and the warnings found with them) when anything is an error.
pub fn load_zone_ingress_input(sources: &Sources) -> Result<Loaded<ZoneIngress>, Vec<Diagnostic>> {
    let mut problems = proxy_type_problems(sources);
    let mut warnings = Vec::new();
    match take(load_zone_ingress(&sources.dataplane_file, &sources.vars()), &mut warnings, &mut problems) {
        Some(value) if problems.is_empty() => Ok(Loaded { value, warnings }),
        _ => {
            problems.splice(0..0, warnings);
            Err(problems)
        }
    }
}

/// Loads and validates both inputs, reporting every problem of both at once.
///
/// # Errors
/// Every diagnostic of both files (errors and the warnings found with them), and a wrong
/// `proxy_type`, when anything is an error.
pub fn load_inputs(sources: &Sources) -> Result<Inputs, Vec<Diagnostic>> {
    let mut problems = proxy_type_problems(sources);
    let zi = load_zone_ingress(&sources.dataplane_file, &sources.vars());
    let inv = load_inventory(&sources.dataplanes);
    let mut warnings = Vec::new();
    let zi = take(zi, &mut warnings, &mut problems);
    let inv = take(inv, &mut warnings, &mut problems);
    match (zi, inv) {
        (Some(zone_ingress), Some(inventory)) if problems.is_empty() => {
            Ok(Inputs { zone_ingress, inventory, warnings })
        }
        // The warnings of a file that loaded (a skipped Dataplane, say) belong in the report too.
        _ => {
            problems.extend(warnings);
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::test_util::*;

    const DATAPLANE: &str = "type: Dataplane\nmesh: default\nname: b1\nnetworking:\n  address: 198.18.1.1\n  inbound:\n  - port: 80\n    tags: {kuma.io/service: s}\n";

    /// The loopback example of the README (`docs/examples/`) stays valid.
    #[test]
    fn the_documented_example_loads() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
        let sources = Sources {
            dataplane_file: docs.join("zoneingress.yaml"),
            dataplanes: docs.join("dataplanes.yaml"),
            zone: "east".into(),
            proxy_type: "ingress".into(),
            ..Sources::default()
        };
        let inputs = load_inputs(&sources).unwrap_or_else(|p| panic!("{p:#?}"));
        assert!(inputs.warnings.is_empty(), "{:#?}", inputs.warnings);
        assert_eq!(inputs.zone_ingress.listen_addr(), "127.0.0.1:10001".parse().expect("addr"));
        assert_eq!(inputs.inventory.dataplanes.len(), 2);
    }

    fn sources(dir: &TempDir, zone_ingress: &str, dataplanes: &str) -> Sources {
        Sources {
            dataplane_file: dir.write("zi.yaml", zone_ingress),
            dataplanes: dir.write("dp.yaml", dataplanes),
            dataplane_vars: Vec::new(),
            zone: "east".to_owned(),
            proxy_type: "ingress".to_owned(),
        }
    }

    #[test]
    fn load_inputs_reads_both_files() {
        let dir = TempDir::new();
        let template = ZI.replace("name: zi-east-1", "name: \"{{ name }}\"");
        let sources = Sources {
            dataplane_vars: vec![("name".to_owned(), "zi-east-2".to_owned())],
            ..sources(&dir, &template, DATAPLANE)
        };
        let inputs = load_inputs(&sources).expect("valid");
        assert_eq!(inputs.zone_ingress.name, "zi-east-2");
        assert_eq!(inputs.inventory.dataplanes.len(), 1);
        assert!(inputs.warnings.is_empty(), "{:?}", inputs.warnings);
    }

    #[test]
    fn load_inputs_reports_every_problem_at_once() {
        let dir = TempDir::new();
        let broken = ZI.replace("port: 10001\n  advertisedAddress", "port: abc\n  advertisedAddress");
        let given =
            Sources { proxy_type: "sidecar".to_owned(), ..sources(&dir, &broken, "type: Dataplane\nname: [\n") };
        let problems = load_inputs(&given).expect_err("invalid");
        let proxy = problems.iter().find(|d| d.path == "proxy-type").expect("proxy-type reported");
        assert_eq!(proxy.file, Path::new("--proxy-type"));
        assert_eq!(proxy.message, "zone-ingress only serves --proxy-type=ingress, got \"sidecar\"");
        let port = problems.iter().find(|d| d.path == "networking.port").expect("zone ingress reported");
        assert_eq!((port.file.as_path(), port.line, port.column), (given.dataplane_file.as_path(), Some(5), Some(9)));
        let yaml = problems.iter().find(|d| d.file == given.dataplanes).expect("inventory reported");
        assert!(yaml.message.starts_with("invalid YAML"), "{yaml}");
        assert!(problems.iter().all(Diagnostic::is_error), "{problems:#?}");
        // A Dataplane skipped while the ZoneIngress is refused: its warning is in the report.
        let with_skip = sources(&dir, &broken, "type: Dataplane\nmesh: default\nname: a\n");
        let problems = load_inputs(&with_skip).expect_err("invalid");
        let skipped = problems.iter().find(|d| d.file == with_skip.dataplanes).expect("inventory reported");
        assert_eq!(
            skipped.to_string(),
            format!(
                "{}:1:1: warning: networking: skipped Dataplane `a` (mesh `default`): is required",
                with_skip.dataplanes.display()
            )
        );
    }

    #[test]
    fn load_inputs_keeps_the_warnings_of_both_files() {
        let dir = TempDir::new();
        let sources = sources(&dir, &format!("{ZI}zone: east\n"), "");
        let inputs = load_inputs(&sources).expect("warnings only");
        let files: Vec<&Path> = inputs.warnings.iter().map(|w| w.file.as_path()).collect();
        assert_eq!(files, [sources.dataplane_file.as_path(), sources.dataplanes.as_path()]);
    }
}
