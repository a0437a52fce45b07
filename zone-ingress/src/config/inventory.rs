//! The backend inventory: Kuma `Dataplane` resources in Universal form (format and endpoint
//! address precedence: `docs/design.md#routing`), from one file or a directory of them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;
use serde_yaml::{Mapping, Value};

use super::{
    check::{Checker, Got, Host, Need, Where, Zero, child_path, describe, get, index_path},
    diagnostic::{ConfigError, Diagnostic, Loaded, Severity, finish, read_text, whole_file},
    yaml::for_each_document,
};
use crate::sni::SERVICE_TAG;

/// The `kuma.io/zone` label/tag that the zone control plane puts on its resources.
pub const ZONE_TAG: &str = "kuma.io/zone";

/// The local backends: every `Dataplane` read from the inventory, in input order (files by
/// name, then documents, then list items).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Inventory {
    /// The dataplanes; gateway dataplanes and other resource types are not included.
    pub dataplanes: Vec<Dataplane>,
}

impl Inventory {
    /// Whether there is no dataplane at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.dataplanes.is_empty()
    }
}

/// One checked `Dataplane` (Universal form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Dataplane {
    /// `mesh`.
    pub mesh: String,
    /// `name`; unique per mesh within the inventory.
    pub name: String,
    /// `creationTime` as printed by kumactl (RFC 3339), when present. Kept as text: it only
    /// orders dataplanes.
    pub creation_time: Option<String>,
    /// `labels` (string values only); `kuma.io/zone` says which zone the dataplane is in.
    pub labels: BTreeMap<String, String>,
    /// The inbounds, healthy or not, in input order.
    pub inbounds: Vec<Inbound>,
}

impl Dataplane {
    /// The `kuma.io/zone` label, when set and non-empty.
    #[must_use]
    pub fn zone(&self) -> Option<&str> {
        self.labels.get(ZONE_TAG).map(String::as_str).filter(|z| !z.is_empty())
    }
}

/// `networking.inbound[].state`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub enum InboundState {
    /// `Ready` (also when absent).
    #[default]
    Ready,
    /// `NotReady`: not an endpoint.
    NotReady,
    /// `Ignored`: not an endpoint.
    Ignored,
}

/// One inbound of a dataplane: a port the ingress may connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inbound {
    /// Where the ingress connects: `networking.advertisedAddress`, else `inbound.address`, else
    /// `networking.address`, with `inbound.port`. Always an IP literal.
    pub endpoint: SocketAddr,
    /// `name`: the optional port name.
    pub name: Option<String>,
    /// `tags`; contains `kuma.io/service` whenever non-empty.
    pub tags: BTreeMap<String, String>,
    /// `state` (absent → `Ready`).
    pub state: InboundState,
    /// `state` is `Ready` and `health` is absent or `health.ready: true`. Only healthy inbounds
    /// are endpoints; unhealthy ones are kept for the config dump.
    pub healthy: bool,
}

impl Inbound {
    /// The `kuma.io/service` tag.
    #[must_use]
    pub fn service(&self) -> Option<&str> {
        self.tags.get(SERVICE_TAG).map(String::as_str)
    }
}

/// Read the inventory from `path`: a file (one document, a `---` stream, or a kumactl `items:`
/// list, in any combination) or a directory, whose `*.yaml`/`*.yml` files are read in name
/// order (not recursively; hidden files are skipped).
///
/// # Errors
/// Unreadable files, malformed YAML, invalid dataplanes, and duplicate `(mesh, name)` across
/// everything read; all problems found are in the error.
pub fn load_inventory(path: &Path) -> Result<Loaded<Inventory>, ConfigError> {
    let mut diags = Vec::new();
    let mut found = Vec::new();
    let mut budget = MAX_INVENTORY_BYTES;
    let is_dir = fs::metadata(path).is_ok_and(|m| m.is_dir());
    if is_dir {
        let files = match yaml_files(path) {
            Ok(files) => files,
            Err(d) => return finish(None, vec![d]),
        };
        if files.is_empty() {
            diags.push(whole_file(
                path,
                Severity::Warning,
                "no *.yaml or *.yml files in this directory: the inventory is empty",
            ));
        }
        for file in files {
            match read_text_within(&file, &mut budget) {
                Ok(text) => parse_inventory_into(&file, &text, &mut found, &mut diags),
                Err(Unread::Unreadable(d)) => diags.push(d),
                // The files after it would only repeat the error.
                Err(Unread::OverLimit(d)) => {
                    diags.push(d);
                    break;
                }
            }
        }
    } else {
        match read_text_within(path, &mut budget) {
            Ok(text) => parse_inventory_into(path, &text, &mut found, &mut diags),
            Err(Unread::Unreadable(d) | Unread::OverLimit(d)) => diags.push(d),
        }
    }
    let inventory = collect_inventory(path, found, &mut diags);
    finish(Some(inventory), diags)
}

/// Most bytes of inventory (all files together) the daemon reads. Loading costs about ten times
/// the text in memory at its peak (the parse of one document at a time, and every dataplane
/// kept); above the limit the inventory is rejected with an error, as a reload would be, and the
/// last good table stays.
pub(crate) const MAX_INVENTORY_BYTES: u64 = 64 << 20;

/// Why an inventory file was not read.
enum Unread {
    /// Missing, unreadable or not UTF-8.
    Unreadable(Diagnostic),
    /// It would take the inventory past [`MAX_INVENTORY_BYTES`].
    OverLimit(Diagnostic),
}

/// [`read_text`] of a file that fits in `budget` bytes, taken from the budget. A file larger
/// than its `metadata` says (it grew meanwhile) is refused after the read.
fn read_text_within(path: &Path, budget: &mut u64) -> Result<String, Unread> {
    let over = |size: u64| {
        Unread::OverLimit(whole_file(
            path,
            Severity::Error,
            format!(
                "the inventory is larger than the limit of {} MiB ({} bytes with this file); split the \
                 services over several ingresses or trim the inventory",
                MAX_INVENTORY_BYTES >> 20,
                MAX_INVENTORY_BYTES - *budget + size,
            ),
        ))
    };
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len > *budget {
        return Err(over(len));
    }
    let text = read_text(path).map_err(Unread::Unreadable)?;
    let size = text.len() as u64;
    if size > *budget {
        return Err(over(size));
    }
    *budget -= size;
    Ok(text)
}

/// Check inventory text (any of the single-file forms of [`load_inventory`]); `file` is used only
/// in diagnostics.
///
/// # Errors
/// As [`load_inventory`], without the I/O.
pub fn parse_inventory(file: &Path, text: &str) -> Result<Loaded<Inventory>, ConfigError> {
    let mut diags = Vec::new();
    let mut found = Vec::new();
    parse_inventory_into(file, text, &mut found, &mut diags);
    let inventory = collect_inventory(file, found, &mut diags);
    finish(Some(inventory), diags)
}

/// A dataplane and where it came from, for the duplicate check.
struct Found {
    dataplane: Dataplane,
    file: PathBuf,
    /// Field path of the resource (`""` or `items[i]`).
    path: String,
    /// Line and column of its `name` value.
    pos: Option<(usize, usize)>,
}

/// The inventory files of directory `dir`: its YAML files (not hidden, symlinks followed), in
/// name order. Also what a reload watches for changes.
pub(crate) fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, Diagnostic> {
    let entries =
        fs::read_dir(dir).map_err(|e| whole_file(dir, Severity::Error, format!("cannot read directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| whole_file(dir, Severity::Error, format!("cannot read directory: {e}")))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        // Hidden files are editor and Kubernetes ConfigMap bookkeeping (`..data`), not inventory.
        // `fs::metadata` follows symlinks, which is how ConfigMap volumes present their files.
        if yaml && !name.starts_with('.') && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn parse_inventory_into(file: &Path, text: &str, found: &mut Vec<Found>, diags: &mut Vec<Diagnostic>) {
    for_each_document(file, text, diags, |ck, doc| check_inventory_document(ck, doc, found));
}

fn collect_inventory(origin: &Path, found: Vec<Found>, diags: &mut Vec<Diagnostic>) -> Inventory {
    // (mesh, name) → where it was first defined.
    type FirstSeen = (PathBuf, Option<(usize, usize)>);
    let mut seen: HashMap<(String, String), FirstSeen> = HashMap::new();
    let mut dataplanes = Vec::with_capacity(found.len());
    for f in found {
        let key = (f.dataplane.mesh.clone(), f.dataplane.name.clone());
        if let Some((first_file, first_pos)) = seen.get(&key) {
            let at = match first_pos {
                Some((line, col)) => format!("{}:{line}:{col}", first_file.display()),
                None => first_file.display().to_string(),
            };
            diags.push(Diagnostic {
                file: f.file,
                line: f.pos.map(|p| p.0),
                column: f.pos.map(|p| p.1),
                path: child_path(&f.path, "name"),
                message: format!("duplicate Dataplane `{}` in mesh `{}`; first defined at {at}", key.1, key.0),
                severity: Severity::Error,
            });
            continue;
        }
        seen.insert(key, (f.file, f.pos));
        dataplanes.push(f.dataplane);
    }
    if dataplanes.is_empty() && !diags.iter().any(Diagnostic::is_error) {
        diags.push(whole_file(
            origin,
            Severity::Warning,
            "no Dataplane resources: the ingress has nothing to route to",
        ));
    }
    Inventory { dataplanes }
}

fn check_inventory_document(ck: &mut Checker<'_>, doc: &Value, found: &mut Vec<Found>) {
    match doc {
        // Empty documents (a trailing `---`, a comment-only file) carry nothing.
        Value::Null => {}
        Value::Mapping(map) if get(map, "type").is_none() && map.contains_key("items") => match get(map, "items") {
            None => {}
            Some(Value::Sequence(items)) => {
                check_page(ck, map, items.len());
                for (i, item) in items.iter().enumerate() {
                    check_resource(ck, item, &index_path("items", i), found);
                }
            }
            Some(other) => ck.error("items", Where::Value("items"), format!("must be a list, got {}", describe(other))),
        },
        _ => check_resource(ck, doc, "", found),
    }
}

/// A kumactl or API export is paged when it names a `next` page or a `total` above its item
/// count: the dataplanes on the other pages are missing from the inventory, which loads what it
/// has and says so.
fn check_page(ck: &mut Checker<'_>, list: &Mapping, items: usize) {
    let next = get(list, "next").filter(|v| !v.is_null());
    let total = get(list, "total").and_then(Value::as_u64);
    if next.is_none() && total.is_none_or(|t| t <= items as u64) {
        return;
    }
    let of = total.map_or_else(String::new, |t| format!(" of {t}"));
    let (path, at) = if next.is_some() { ("next", Where::Key("next")) } else { ("total", Where::Value("total")) };
    ck.warn(
        path,
        at,
        format!(
            "one page of a paged export ({items}{of} items): the dataplanes on the other pages are missing; add \
             the other pages (more files or documents) or export with a page size that holds them all"
        ),
    );
}

const DATAPLANE: &str = "Dataplane";
const DATAPLANE_OVERVIEW: &str = "DataplaneOverview";

fn check_resource(ck: &mut Checker<'_>, value: &Value, base: &str, found: &mut Vec<Found>) {
    let Value::Mapping(map) = value else {
        ck.error(
            base,
            Where::Value(base),
            format!("expected a Dataplane resource or an `items:` list, got {}", describe(value)),
        );
        return;
    };
    let Some(kind) = resource_kind(ck, map, base) else {
        return;
    };
    // A `kumactl inspect dataplanes` overview carries the Dataplane's body under `dataplane`.
    let (spec, spec_path) = match kind {
        Kind::Dataplane => (map, base.to_owned()),
        Kind::Overview => match ck.mapping(map, base, "dataplane", Need::Required).ok() {
            Some(spec) => (spec, child_path(base, "dataplane")),
            None => return,
        },
    };

    let errors_before = ck.errors;
    let mesh = ck.string(map, base, "mesh", Need::Required).ok();
    let name = ck.string(map, base, "name", Need::Required).ok();
    let creation_time = match get(map, "creationTime") {
        Some(Value::String(t)) => Some(t.clone()),
        _ => None,
    };
    let labels = match get(map, "labels") {
        Some(Value::Mapping(labels)) => {
            labels.iter().filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned()))).collect()
        }
        _ => BTreeMap::new(),
    };
    let net_path = child_path(&spec_path, "networking");
    let Some(networking) = ck.mapping(spec, &spec_path, "networking", Need::Required).ok() else {
        return;
    };
    if get(networking, "gateway").is_some() {
        let gw = child_path(&net_path, "gateway");
        ck.warn(&gw, Where::Key(&gw), "skipped: gateway dataplanes are not plain backends of the ingress");
        return;
    }
    if get(networking, "listeners").is_some() && get(networking, "inbound").is_none() {
        let listeners = child_path(&net_path, "listeners");
        ck.warn(
            &listeners,
            Where::Key(&listeners),
            "skipped: a zone proxy (listeners and no inbound) is not a backend of the ingress",
        );
        return;
    }

    let inbounds = check_inbounds(ck, networking, &net_path);

    if ck.errors > errors_before {
        return;
    }
    let (Some(mesh), Some(name)) = (mesh, name) else {
        return;
    };
    let name_path = child_path(base, "name");
    let pos = ck.position(&name_path, &Where::Value(&name_path));
    found.push(Found {
        dataplane: Dataplane { mesh, name, creation_time, labels, inbounds },
        file: ck.file.to_path_buf(),
        path: base.to_owned(),
        pos,
    });
}

/// What a resource of the inventory is.
enum Kind {
    /// `type: Dataplane`.
    Dataplane,
    /// `type: DataplaneOverview` (`kumactl inspect dataplanes -o yaml`): the Dataplane's body is
    /// under `dataplane`.
    Overview,
}

/// A Dataplane or its overview? Other resource types are skipped with a warning.
fn resource_kind(ck: &mut Checker<'_>, map: &Mapping, base: &str) -> Option<Kind> {
    let type_path = child_path(base, "type");
    match get(map, "type") {
        None => {
            ck.error(
                &type_path,
                Where::Parent(base),
                "is required (expected `Dataplane`, or an `items:` list of them)",
            );
            None
        }
        Some(Value::String(t)) if t == DATAPLANE => Some(Kind::Dataplane),
        Some(Value::String(t)) if t == DATAPLANE_OVERVIEW => Some(Kind::Overview),
        Some(Value::String(t)) => {
            ck.warn(
                &type_path,
                Where::Value(&type_path),
                format!("skipped: only Dataplane resources (or their overviews) are read from the inventory, not {t}"),
            );
            None
        }
        Some(other) => {
            ck.error(&type_path, Where::Value(&type_path), format!("must be a string, got {}", describe(other)));
            None
        }
    }
}

/// The dataplane's addresses and its inbounds; only valid inbounds are returned.
fn check_inbounds(ck: &mut Checker<'_>, networking: &Mapping, net_path: &str) -> Vec<Inbound> {
    let address = ck.address(networking, net_path, "address", Need::Required);
    let advertised = ck.address(networking, net_path, "advertisedAddress", Need::Optional);
    let inbound_path = child_path(net_path, "inbound");
    let inbounds = match ck.sequence(networking, net_path, "inbound", Need::Optional) {
        Got::Value(items) if !items.is_empty() => items.as_slice(),
        Got::Invalid => return Vec::new(),
        _ => {
            ck.error(&inbound_path, Where::Key(net_path), "dataplane must have at least one inbound (or be a gateway)");
            &[]
        }
    };

    // A DNS name used as endpoint address is reported once at its source, not per inbound.
    let mut reported_names = HashSet::new();
    let mut checked = Vec::with_capacity(inbounds.len());
    for (i, inbound) in inbounds.iter().enumerate() {
        let path = index_path(&inbound_path, i);
        let hosts =
            [(&advertised, child_path(net_path, "advertisedAddress")), (&address, child_path(net_path, "address"))];
        if let Some(inbound) = check_inbound(ck, inbound, &path, hosts, &mut reported_names) {
            checked.push(inbound);
        }
    }
    checked
}

/// Check one inbound. `hosts` are the dataplane-level address candidates in precedence order
/// around the inbound's own address: `[advertisedAddress, address]`.
fn check_inbound(
    ck: &mut Checker<'_>,
    value: &Value,
    path: &str,
    hosts: [(&Got<Host>, String); 2],
    reported_names: &mut HashSet<String>,
) -> Option<Inbound> {
    let Value::Mapping(map) = value else {
        ck.error(path, Where::Value(path), format!("must be a mapping, got {}", describe(value)));
        return None;
    };
    let port = ck.port(map, path, "port", Need::Required, Zero::Invalid);
    let own_address = ck.address(map, path, "address", Need::Optional);
    let name = ck.string(map, path, "name", Need::Optional).ok();

    let state_path = child_path(path, "state");
    let state = match get(map, "state") {
        None => Some(InboundState::Ready),
        Some(Value::String(s)) if s == "Ready" => Some(InboundState::Ready),
        Some(Value::String(s)) if s == "NotReady" => Some(InboundState::NotReady),
        Some(Value::String(s)) if s == "Ignored" => Some(InboundState::Ignored),
        Some(other) => {
            ck.error(
                &state_path,
                Where::Value(&state_path),
                format!("must be one of Ready, NotReady, Ignored; got {}", describe(other)),
            );
            None
        }
    };
    let health_ready = match ck.mapping(map, path, "health", Need::Optional) {
        Got::Absent => Some(true),
        // A `health` block without `ready` means not ready (proto default), as in Kuma.
        Got::Value(health) => ck.boolean(health, &child_path(path, "health"), "ready"),
        Got::Invalid => None,
    };

    let tags_path = child_path(path, "tags");
    let tags = if let Some(tags) = get(map, "tags") {
        ck.tags(tags, &tags_path)
    } else {
        ck.warn(
            &tags_path,
            Where::Key(path),
            "inbound has no tags: it belongs to no service and is not reachable through the \
             ingress",
        );
        Some(BTreeMap::new())
    };

    // Endpoint address precedence (`docs/design.md#routing`): advertisedAddress, inbound.address,
    // address.
    let [(advertised, advertised_path), (address, address_path)] = hosts;
    let own_path = child_path(path, "address");
    let chosen = [(advertised, advertised_path), (&own_address, own_path), (address, address_path)]
        .into_iter()
        .find(|(got, _)| !matches!(got, Got::Absent));
    let ip = match chosen {
        Some((Got::Value(Host::Ip(ip)), _)) => Some(*ip),
        Some((Got::Value(Host::Name(host)), source)) => {
            if reported_names.insert(source.clone()) {
                ck.error(
                    &source,
                    Where::Value(&source),
                    format!(
                        "endpoint address must be an IP address, not the DNS name `{host}`: \
                         zone-ingress does not resolve names"
                    ),
                );
            }
            None
        }
        // Invalid: already reported; absent: `networking.address` is required and reported.
        _ => None,
    };

    let state = state?;
    let healthy = state == InboundState::Ready && health_ready?;
    Some(Inbound { endpoint: SocketAddr::new(ip?, port.ok()?), name, tags: tags?, state, healthy })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_util::*;

    #[test]
    fn inventory_single_document() {
        let text = dp("backend-1", "198.18.1.11", "  - port: 8080\n    tags:\n      kuma.io/service: backend\n");
        let loaded = inv(&text);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let d = &loaded.value.dataplanes[0];
        assert_eq!((d.mesh.as_str(), d.name.as_str()), ("default", "backend-1"));
        assert_eq!(d.inbounds.len(), 1);
        let i = &d.inbounds[0];
        assert_eq!(i.endpoint, "198.18.1.11:8080".parse().expect("addr"));
        assert_eq!(i.service(), Some("backend"));
        assert!(i.healthy);
    }

    #[test]
    fn inventory_multi_document_stream() {
        let inbound = "  - port: 80\n    tags: {kuma.io/service: s}\n";
        let text = format!(
            "---\n{}---\n{}---\ntype: MeshService\nname: s\nmesh: default\n---\n",
            dp("a", "198.18.1.1", inbound),
            dp("b", "198.18.1.2", inbound),
        );
        let loaded = inv(&text);
        let names: Vec<&str> = loaded.value.dataplanes.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        let d = warning_at(&loaded.warnings, "type");
        assert!(d.message.contains("not MeshService"), "{d}");
        assert_eq!(d.line, Some(20));
    }

    #[test]
    fn inventory_kumactl_list_and_fixture() {
        let loaded = load_inventory(&fixture("dataplanes.yaml")).expect("valid");
        let dps = &loaded.value.dataplanes;
        // The gateway is skipped with a warning; nothing else is reported.
        assert_eq!(dps.len(), 4);
        let d = warning_at(&loaded.warnings, "items[4].networking.gateway");
        assert!(d.message.contains("gateway"));
        assert_eq!(d.line, Some(106));
        assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);

        let b1 = &dps[0];
        assert_eq!(b1.creation_time.as_deref(), Some("2025-03-04T09:12:41.501245Z"));
        assert_eq!(b1.zone(), Some("east"));
        assert_eq!(b1.inbounds[0].name.as_deref(), Some("http"));
        assert!(b1.inbounds[0].healthy);
        assert_eq!(b1.inbounds[1].state, InboundState::NotReady);
        assert!(!b1.inbounds[1].healthy);
        // DNS name in networking.address is fine when advertisedAddress (IPv6) is used.
        assert_eq!(dps[2].inbounds[0].endpoint, "[2001:db8:1::13]:6379".parse().expect("addr"));
        // health.ready: false.
        assert!(!dps[3].inbounds[0].healthy);
        assert_eq!(dps[3].inbounds[0].state, InboundState::Ready);
    }

    #[test]
    fn inventory_directory() {
        let dir = TempDir::new();
        let inbound = "  - port: 80\n    tags: {kuma.io/service: s}\n";
        dir.write("b.yml", &dp("from-b", "198.18.1.2", inbound));
        dir.write("a.yaml", &dp("from-a", "198.18.1.1", inbound));
        dir.write("c.YAML", &dp("from-c", "198.18.1.3", inbound));
        dir.write("notes.txt", "not: yaml: at all: [");
        dir.write(".hidden.yaml", "garbage: [");
        fs::create_dir(dir.0.join("sub.yaml")).expect("mkdir");
        let loaded = load_inventory(&dir.0).expect("valid");
        let names: Vec<&str> = loaded.value.dataplanes.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, vec!["from-a", "from-b", "from-c"]);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);

        // Problems in several files are all reported, each with its file; duplicates across
        // files name the first definition.
        dir.write("d.yaml", &dp("from-a", "198.18.1.4", inbound));
        dir.write("e.yaml", "type: Dataplane\nmesh: default\n");
        let e = load_inventory(&dir.0).expect_err("invalid");
        let dup = error_at(&e, "name");
        assert_eq!(dup.file, dir.0.join("d.yaml"));
        assert!(dup.message.contains(&format!("first defined at {}:3:7", dir.0.join("a.yaml").display())), "{dup}");
        let missing = e.errors().find(|d| d.file == dir.0.join("e.yaml") && d.path == "name").expect("e.yaml error");
        assert!(missing.message.contains("required"));
    }

    #[test]
    fn an_inventory_above_the_size_limit_is_an_error_that_says_so() {
        let dir = TempDir::new();
        let inbound = "  - port: 80\n    tags: {kuma.io/service: s}\n";
        dir.write("a.yaml", &dp("small", "198.18.1.1", inbound));
        // Sparse: as large as the limit allows and one byte more, without writing it.
        let big = fs::File::create(dir.0.join("b.yaml")).expect("create");
        big.set_len(MAX_INVENTORY_BYTES).expect("set_len");
        dir.write("c.yaml", &dp("after", "198.18.1.3", inbound));
        let e = load_inventory(&dir.0).expect_err("above the limit");
        let d = e.errors().find(|d| d.file == dir.0.join("b.yaml")).expect("an error on the file that crossed it");
        assert!(d.message.contains("larger than the limit of 64 MiB"), "{d}");
        assert!(
            d.message.contains(&format!(
                "{} bytes",
                MAX_INVENTORY_BYTES + fs::metadata(dir.0.join("a.yaml")).expect("a").len()
            )),
            "{d}"
        );
        // A single file too: at the limit it is read (and its NUL bytes are not YAML), one byte
        // more and it is not.
        let e = load_inventory(&dir.0.join("b.yaml")).expect_err("NUL bytes");
        assert!(e.errors().all(|d| !d.message.contains("larger than the limit")), "{e}");
        big.set_len(MAX_INVENTORY_BYTES + 1).expect("set_len");
        let e = load_inventory(&dir.0.join("b.yaml")).expect_err("one byte above the limit");
        assert!(e.errors().any(|d| d.message.contains("larger than the limit")), "{e}");
    }

    #[test]
    fn inventory_empty_directory_warns() {
        let dir = TempDir::new();
        let loaded = load_inventory(&dir.0).expect("valid");
        assert!(loaded.value.is_empty());
        assert!(loaded.warnings[0].message.contains("no *.yaml"));
    }

    #[test]
    fn inventory_empty_file_warns() {
        let loaded = inv("# nothing yet\n");
        assert!(loaded.value.is_empty());
        assert!(loaded.warnings[0].message.contains("no Dataplane"));
    }

    #[test]
    fn inventory_healthy_rules() {
        let text = dp(
            "a",
            "198.18.1.1",
            "  - {port: 1, tags: {kuma.io/service: s}}
  - {port: 2, state: Ready, tags: {kuma.io/service: s}}
  - {port: 3, state: NotReady, tags: {kuma.io/service: s}}
  - {port: 4, state: Ignored, tags: {kuma.io/service: s}}
  - {port: 5, health: {ready: true}, tags: {kuma.io/service: s}}
  - {port: 6, health: {ready: false}, tags: {kuma.io/service: s}}
  - {port: 7, health: {}, tags: {kuma.io/service: s}}
  - {port: 8, state: NotReady, health: {ready: true}, tags: {kuma.io/service: s}}
",
        );
        let loaded = inv(&text);
        let healthy: Vec<bool> = loaded.value.dataplanes[0].inbounds.iter().map(|i| i.healthy).collect();
        assert_eq!(healthy, vec![true, true, false, false, true, false, false, false]);
    }

    #[test]
    fn inventory_bad_state_and_health() {
        let text = dp(
            "a",
            "198.18.1.1",
            "  - {port: 1, state: Healthy, tags: {kuma.io/service: s}}
  - {port: 2, health: {ready: yes}, tags: {kuma.io/service: s}}
  - {port: 3, health: true, tags: {kuma.io/service: s}}
",
        );
        let e = inv_err(&text);
        let d = error_at(&e, "networking.inbound[0].state");
        assert_eq!(at(d), (Some(7), Some(22)));
        error_at(&e, "networking.inbound[1].health.ready");
        error_at(&e, "networking.inbound[2].health");
        assert_eq!(e.errors().count(), 3);
    }

    #[test]
    fn inventory_endpoint_address_precedence() {
        let text = "\
type: Dataplane
mesh: default
name: a
networking:
  address: 198.18.1.1
  inbound:
  - {port: 1, tags: {kuma.io/service: s}}
  - {port: 2, address: 198.18.9.9, tags: {kuma.io/service: s}}
---
type: Dataplane
mesh: default
name: b
networking:
  address: 198.18.1.2
  advertisedAddress: 203.0.113.2
  inbound:
  - {port: 3, address: 198.18.9.9, tags: {kuma.io/service: s}}
";
        let loaded = inv(text);
        let eps: Vec<String> =
            loaded.value.dataplanes.iter().flat_map(|d| d.inbounds.iter().map(|i| i.endpoint.to_string())).collect();
        assert_eq!(eps, vec!["198.18.1.1:1", "198.18.9.9:2", "203.0.113.2:3"]);
    }

    #[test]
    fn inventory_endpoint_dns_names_are_errors_once_at_their_source() {
        let text = dp(
            "a",
            "backend.internal",
            "  - {port: 1, tags: {kuma.io/service: s}}
  - {port: 2, tags: {kuma.io/service: s}}
  - {port: 3, address: other.internal, tags: {kuma.io/service: s}}
",
        );
        let e = inv_err(&text);
        let d = error_at(&e, "networking.address");
        assert!(d.message.contains("does not resolve"), "{d}");
        assert_eq!(at(d), (Some(5), Some(12)));
        error_at(&e, "networking.inbound[2].address");
        assert_eq!(e.errors().count(), 2, "{e}");
    }

    #[test]
    fn inventory_ipv6_endpoints() {
        let text = dp(
            "a",
            "\"2001:db8::1\"",
            "  - {port: 8080, tags: {kuma.io/service: s}}
  - {port: 8081, address: \"fd00::2\", tags: {kuma.io/service: s}}
",
        );
        let loaded = inv(&text);
        let eps: Vec<String> = loaded.value.dataplanes[0].inbounds.iter().map(|i| i.endpoint.to_string()).collect();
        assert_eq!(eps, vec!["[2001:db8::1]:8080", "[fd00::2]:8081"]);
    }

    #[test]
    fn inventory_addresses_must_not_be_unspecified() {
        let text = dp("a", "0.0.0.0", "  - {port: 1, tags: {kuma.io/service: s}}\n");
        let e = inv_err(&text);
        only_error(&e, "networking.address");
    }

    #[test]
    fn inventory_tags_need_service() {
        let text = dp("a", "198.18.1.1", "  - port: 1\n    tags:\n      version: v1\n");
        let e = inv_err(&text);
        let d = only_error(&e, "networking.inbound[0].tags");
        assert_eq!(d.message, "mandatory tag \"kuma.io/service\" is missing");
        assert_eq!(at(&d), (Some(8), Some(5)));
    }

    #[test]
    fn inventory_tag_charset() {
        let text = dp(
            "a",
            "198.18.1.1",
            "  - port: 1
    tags:
      kuma.io/service: s
      \"bad key\": v
      ok: \"a/b\"
      version: 1
      empty: \"\"
",
        );
        let e = inv_err(&text);
        let d = error_at(&e, "networking.inbound[0].tags[\"bad key\"]");
        assert_eq!(at(d), (Some(10), Some(7)));
        let d = error_at(&e, "networking.inbound[0].tags.ok");
        assert_eq!(at(d), (Some(11), Some(11)));
        let d = error_at(&e, "networking.inbound[0].tags.version");
        assert!(d.message.contains("must be a string"), "{d}");
        error_at(&e, "networking.inbound[0].tags.empty");
        assert_eq!(e.errors().count(), 4, "{e}");
    }

    #[test]
    fn inventory_inbound_port_range() {
        let text = dp("a", "198.18.1.1", "  - port: 0\n    tags: {kuma.io/service: s}\n");
        let d = only_error(&inv_err(&text), "networking.inbound[0].port");
        assert_eq!(at(&d), (Some(7), Some(11)));
        let text = dp("a", "198.18.1.1", "  - port: 65536\n    tags: {kuma.io/service: s}\n");
        only_error(&inv_err(&text), "networking.inbound[0].port");
        let text = dp("a", "198.18.1.1", "  - tags: {kuma.io/service: s}\n");
        only_error(&inv_err(&text), "networking.inbound[0].port");
    }

    #[test]
    fn inventory_mesh_and_name_required() {
        let text = "type: Dataplane\nnetworking:\n  address: 198.18.1.1\n  inbound:\n  - {port: \
                    1, tags: {kuma.io/service: s}}\n";
        let e = inv_err(text);
        error_at(&e, "mesh");
        error_at(&e, "name");
        assert_eq!(e.errors().count(), 2);
    }

    #[test]
    fn inventory_type_required() {
        let e = inv_err("mesh: default\nname: a\n");
        assert!(only_error(&e, "type").message.contains("required"));
    }

    #[test]
    fn inventory_networking_and_inbounds_required() {
        let e = inv_err("type: Dataplane\nmesh: default\nname: a\n");
        only_error(&e, "networking");
        let e = inv_err("type: Dataplane\nmesh: default\nname: a\nnetworking:\n  address: 198.18.1.1\n");
        only_error(&e, "networking.inbound");
        let e = inv_err(
            "type: Dataplane\nmesh: default\nname: a\nnetworking:\n  inbound:\n  - {port: 1, \
             tags: {kuma.io/service: s}}\n",
        );
        only_error(&e, "networking.address");
    }

    #[test]
    fn inventory_duplicate_mesh_and_name() {
        let inbound = "  - {port: 1, tags: {kuma.io/service: s}}\n";
        let a = dp("a", "198.18.1.1", inbound);
        let text = format!("{a}---\n{a}---\n{}", a.replace("mesh: default", "mesh: other"));
        let e = inv_err(&text);
        let d = only_error(&e, "name");
        assert_eq!(at(&d), (Some(11), Some(7)));
        assert!(d.message.contains("first defined at dp.yaml:3:7"), "{d}");
    }

    #[test]
    fn inventory_zone_proxy_dataplanes_are_skipped_not_refused() {
        let text = "type: Dataplane\nmesh: default\nname: zp\nnetworking:\n  address: 198.18.1.1\n  listeners:\n  \
                    - {type: ZoneIngress, port: 10001}\n---\n"
            .to_owned()
            + &dp("backend-1", "198.18.1.2", "  - port: 80\n    tags: {kuma.io/service: s}\n");
        let loaded = inv(&text);
        let names: Vec<&str> = loaded.value.dataplanes.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["backend-1"]);
        let d = warning_at(&loaded.warnings, "networking.listeners");
        assert!(d.message.contains("zone proxy"), "{d}");
    }

    #[test]
    fn a_page_of_a_paged_export_loads_with_a_warning() {
        let item = dp("a", "198.18.1.1", "  - port: 80\n    tags: {kuma.io/service: s}\n");
        let indented: String = item.lines().map(|l| format!("  {l}\n")).collect();
        let text = format!("total: 3\nnext: http://cp:5681/dataplanes?offset=1\nitems:\n-{}", &indented[1..]);
        let loaded = inv(&text);
        assert_eq!(loaded.value.dataplanes.len(), 1);
        let d = warning_at(&loaded.warnings, "next");
        assert!(d.message.contains("1 of 3 items"), "{d}");
        // A complete list says nothing.
        let text = format!("total: 1\nnext: null\nitems:\n-{}", &indented[1..]);
        assert!(inv(&text).warnings.is_empty(), "{:?}", inv(&text).warnings);
    }

    #[test]
    fn dataplane_overviews_are_read_from_their_dataplane() {
        let text = "\
type: DataplaneOverview
mesh: default
name: backend-1
creationTime: '2026-01-01T00:00:00Z'
dataplane:
  networking:
    address: 198.18.1.1
    inbound:
    - port: 8080
      tags: {kuma.io/service: backend}
dataplaneInsight:
  subscriptions: []
";
        let loaded = inv(text);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let d = &loaded.value.dataplanes[0];
        assert_eq!((d.mesh.as_str(), d.name.as_str(), d.inbounds.len()), ("default", "backend-1", 1));
        // Without its body, an overview is an error at the right place.
        let e = inv_err("type: DataplaneOverview\nmesh: default\nname: x\n");
        assert!(error_at(&e, "dataplane").message.contains("required"), "{e}");
    }

    #[test]
    fn inventory_gateway_dataplanes_are_skipped() {
        let text = "type: Dataplane\nmesh: default\nname: gw\nnetworking:\n  address: \
                    198.18.1.1\n  gateway:\n    type: BUILTIN\n    tags: {kuma.io/service: gw}\n";
        let loaded = inv(text);
        assert!(loaded.value.is_empty());
        let d = warning_at(&loaded.warnings, "networking.gateway");
        assert_eq!(at(d), (Some(6), Some(3)));
    }

    #[test]
    fn inventory_unknown_keys_are_ignored_silently() {
        let text = "\
type: Dataplane
mesh: default
name: a
whatever: 1
labels: {team: x, weird: [1]}
networking:
  address: 198.18.1.1
  transparentProxying: {redirectPortInbound: 15006}
  admin: {port: 9901}
  inbound:
  - port: 1
    servicePort: 18080
    serviceAddress: 127.0.0.1
    somethingNew: {a: b}
    tags: {kuma.io/service: s}
  outbound:
  - {port: 33033, tags: {kuma.io/service: redis}}
";
        let loaded = inv(text);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.value.dataplanes[0].labels, BTreeMap::from([("team".to_owned(), "x".to_owned())]));
    }

    #[test]
    fn inventory_inbound_without_tags_warns() {
        let text = dp("a", "198.18.1.1", "  - port: 1\n");
        let loaded = inv(&text);
        let d = warning_at(&loaded.warnings, "networking.inbound[0].tags");
        assert!(d.message.contains("no tags"));
        assert_eq!(loaded.value.dataplanes[0].inbounds[0].service(), None);
    }

    #[test]
    fn inventory_reports_every_problem_at_once() {
        let text = "\
items:
- type: Dataplane
  mesh: default
  name: ok
  networking:
    address: 198.18.1.1
    inbound:
    - {port: 1, tags: {kuma.io/service: s}}
- type: Dataplane
  mesh: default
  name: bad-port
  networking:
    address: 198.18.1.2
    inbound:
    - port: 99999
      tags: {kuma.io/service: s}
- type: Dataplane
  mesh: default
  name: bad-tags
  networking:
    address: 198.18.1.3
    inbound:
    - port: 80
      tags: {version: v1}
- 42
next: null
total: 4
";
        let e = inv_err(text);
        let lines: Vec<String> = e.errors().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "dp.yaml:15:13: items[1].networking.inbound[0].port: port must be in the range \
                 [1, 65535]",
                "dp.yaml:24:7: items[2].networking.inbound[0].tags: mandatory tag \
                 \"kuma.io/service\" is missing",
                "dp.yaml:25:3: items[3]: expected a Dataplane resource or an `items:` list, got \
                 number 42",
            ]
        );
    }

    #[test]
    fn inventory_items_must_be_a_list_and_documents_mappings() {
        only_error(&inv_err("items: {a: b}\n"), "items");
        only_error(&inv_err("- a\n"), "");
    }
}
