//! The backend inventory: Kuma `Dataplane` resources in Universal or Kubernetes form (format and
//! endpoint address precedence: `docs/design.md#routing`; forms: `docs/operations.md#input-forms`),
//! from one file or a directory of them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use serde_yaml::{Mapping, Value};

use super::{
    check::{Checker, Got, Host, Need, Where, Zero, child_path, describe, get, index_path},
    diagnostic::{ConfigError, Diagnostic, Loaded, Severity, finish, read_text, whole_file},
    kube,
    resolve::{RESOLVE_TIMEOUT, Resolver, resolve_all, system},
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

/// One checked `Dataplane` (either form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Dataplane {
    /// `mesh`.
    pub mesh: String,
    /// `name`, or on Kubernetes `metadata.name` + `.` + `metadata.namespace` (Kuma's name);
    /// unique per mesh within the inventory.
    pub name: String,
    /// `creationTime` as printed by kumactl (RFC 3339), or `metadata.creationTimestamp`, when
    /// present. Kept as text: it only orders dataplanes.
    pub creation_time: Option<String>,
    /// `labels` or `metadata.labels` (string values only); `kuma.io/zone` says which zone the
    /// dataplane is in.
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
    /// `networking.address`, with `inbound.port`. Always an IP: a DNS name in the dataplane-level
    /// addresses was resolved when the inventory was read.
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

/// Read the inventory from `path`: a file (one document, a `---` stream, a kumactl `items:` list
/// or a kubectl `kind: List`, in any combination; Universal or Kubernetes form) or a directory,
/// whose `*.yaml`/`*.yml` files are read in name order (not recursively; hidden files are
/// skipped). DNS names in `networking.address`/`advertisedAddress` are resolved with the system
/// resolver.
///
/// A Dataplane that cannot be used (it breaks a rule of the control plane's, repeats a
/// `(mesh, name)` read before, or has a name that does not resolve) is skipped with warnings
/// that name it; the others load.
///
/// # Errors
/// Unreadable files, malformed YAML, and documents that are not resources at all (no `type` or
/// `kind`, not a mapping); all problems found are in the error.
pub fn load_inventory(path: &Path) -> Result<Loaded<Inventory>, ConfigError> {
    load_inventory_with(path, &system())
}

/// [`load_inventory`] with `resolver` for the DNS names.
pub(crate) fn load_inventory_with(path: &Path, resolver: &Arc<dyn Resolver>) -> Result<Loaded<Inventory>, ConfigError> {
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
    let inventory = collect_inventory(path, found, &mut diags, resolver);
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
    parse_inventory_with(file, text, &system())
}

/// [`parse_inventory`] with `resolver` for the DNS names.
pub(crate) fn parse_inventory_with(
    file: &Path,
    text: &str,
    resolver: &Arc<dyn Resolver>,
) -> Result<Loaded<Inventory>, ConfigError> {
    let mut diags = Vec::new();
    let mut found = Vec::new();
    parse_inventory_into(file, text, &mut found, &mut diags);
    let inventory = collect_inventory(file, found, &mut diags, resolver);
    finish(Some(inventory), diags)
}

/// A dataplane and where it came from, for the duplicate check, and the DNS names its
/// endpoints wait for.
struct Found {
    dataplane: Dataplane,
    file: PathBuf,
    /// Field path of its name (`name`, `items[i].metadata.name`).
    name_path: String,
    /// Line and column of its name's value.
    pos: Option<(usize, usize)>,
    /// Its dataplane-level DNS names (usually none).
    names: Vec<Named>,
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

/// The inventory of what was found: a later duplicate of a `(mesh, name)` is skipped, then the
/// DNS names are resolved and a dataplane whose name does not resolve is skipped, each with a
/// warning. Nothing is resolved when the load is rejected anyway.
fn collect_inventory(
    origin: &Path,
    found: Vec<Found>,
    diags: &mut Vec<Diagnostic>,
    resolver: &Arc<dyn Resolver>,
) -> Inventory {
    // (mesh, name) → where it was first defined.
    type FirstSeen = (PathBuf, Option<(usize, usize)>);
    let mut seen: HashMap<(String, String), FirstSeen> = HashMap::new();
    let mut kept = Vec::with_capacity(found.len());
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
                path: f.name_path,
                message: format!(
                    "skipped Dataplane `{}` (mesh `{}`): a duplicate; the one first defined at {at} is used",
                    key.1, key.0
                ),
                severity: Severity::Warning,
            });
            continue;
        }
        seen.insert(key, (f.file.clone(), f.pos));
        kept.push(f);
    }
    drop(seen);
    if !diags.iter().any(Diagnostic::is_error) {
        resolve_names(&mut kept, diags, resolver);
    }
    let dataplanes: Vec<Dataplane> = kept.into_iter().map(|f| f.dataplane).collect();
    if dataplanes.is_empty() && !diags.iter().any(Diagnostic::is_error) {
        diags.push(whole_file(
            origin,
            Severity::Warning,
            "no Dataplane resources: the ingress has nothing to route to",
        ));
    }
    Inventory { dataplanes }
}

/// Resolves the DNS names of `found` (each distinct name once, all within
/// [`RESOLVE_TIMEOUT`]), sets the endpoints that use them, and drops the dataplanes with a name
/// that does not resolve, with a warning at that name.
fn resolve_names(found: &mut Vec<Found>, diags: &mut Vec<Diagnostic>, resolver: &Arc<dyn Resolver>) {
    let names: HashSet<&str> = found.iter().flat_map(|f| f.names.iter().map(|n| n.host.as_str())).collect();
    if names.is_empty() {
        return;
    }
    let names: Vec<String> = names.into_iter().map(str::to_owned).collect();
    let resolved = resolve_all(names, resolver, RESOLVE_TIMEOUT);
    found.retain_mut(|f| {
        for named in &f.names {
            match &resolved[&named.host] {
                Ok(ip) => {
                    for &i in &named.inbounds {
                        f.dataplane.inbounds[i].endpoint.set_ip(*ip);
                    }
                }
                Err(why) => {
                    diags.push(Diagnostic {
                        file: f.file.clone(),
                        line: named.pos.map(|p| p.0),
                        column: named.pos.map(|p| p.1),
                        path: named.path.clone(),
                        message: format!(
                            "skipped Dataplane `{}` (mesh `{}`): `{}` does not resolve ({why})",
                            f.dataplane.name, f.dataplane.mesh, named.host
                        ),
                        severity: Severity::Warning,
                    });
                    return false;
                }
            }
        }
        true
    });
}

fn check_inventory_document(ck: &mut Checker<'_>, doc: &Value, found: &mut Vec<Found>) {
    match doc {
        // Empty documents (a trailing `---`, a comment-only file) carry nothing.
        Value::Null => {}
        // kumactl's list (`items`, `next`, `total`) and kubectl's (`kind: List`, or `kind:
        // DataplaneList`, with `items` and `metadata`).
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
/// count, a kubectl list when its `metadata.continue` is set: the dataplanes on the other pages
/// are missing from the inventory, which loads what it has and says so.
fn check_page(ck: &mut Checker<'_>, list: &Mapping, items: usize) {
    let next = get(list, "next").filter(|v| !v.is_null());
    let total = get(list, "total").and_then(Value::as_u64);
    let kube_continue = match get(list, "metadata") {
        Some(Value::Mapping(m)) => get(m, "continue").and_then(Value::as_str).is_some_and(|c| !c.is_empty()),
        _ => false,
    };
    if next.is_none() && total.is_none_or(|t| t <= items as u64) && !kube_continue {
        return;
    }
    let of = total.map_or_else(String::new, |t| format!(" of {t}"));
    let (path, at) = if next.is_some() {
        ("next", Where::Key("next"))
    } else if kube_continue {
        ("metadata.continue", Where::Key("metadata.continue"))
    } else {
        ("total", Where::Value("total"))
    };
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

/// One resource of the inventory. What is not a resource at all (not a mapping, no `type` or
/// `kind`) is an error that rejects the inventory; a Dataplane that cannot be used is skipped
/// with warnings that name it, as the control plane would have refused it (or, for a name that
/// does not resolve, left it out) without refusing the others.
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
    let mark = ck.mark();
    let head = check_head(ck, map, base, kind);
    let body = head.spec.and_then(|(spec, spec_path)| check_body(ck, spec, &spec_path));
    let who = match (&head.name, &head.mesh) {
        (Some(name), Some(mesh)) => format!("skipped Dataplane `{name}` (mesh `{mesh}`): "),
        (Some(name), None) => format!("skipped Dataplane `{name}`: "),
        (None, _) => "skipped a Dataplane without a valid name: ".to_owned(),
    };
    if ck.demote_since(mark, &who) {
        return;
    }
    let (Some((inbounds, names)), Some(mesh), Some(name)) = (body, head.mesh, head.name) else {
        return;
    };
    let pos = ck.position(&head.name_path, &Where::Value(&head.name_path));
    found.push(Found {
        dataplane: Dataplane { mesh, name, creation_time: head.creation_time, labels: head.labels, inbounds },
        file: ck.file.to_path_buf(),
        name_path: head.name_path,
        pos,
        names,
    });
}

/// What a Dataplane says about itself, and where its body (`networking`) is.
struct Head<'m> {
    mesh: Option<String>,
    name: Option<String>,
    /// Where the name is (`name`, `metadata.name`), for diagnostics.
    name_path: String,
    creation_time: Option<String>,
    labels: BTreeMap<String, String>,
    /// The mapping holding `networking`, and its path.
    spec: Option<(&'m Mapping, String)>,
}

fn check_head<'m>(ck: &mut Checker<'_>, map: &'m Mapping, base: &str, kind: Kind) -> Head<'m> {
    if kind == Kind::Kube {
        let meta = kube::metadata(ck, map, base);
        // The CRD's `mesh`, else the mesh label, else the default mesh (as the control plane
        // defaults a Dataplane's mesh).
        let mesh = match ck.string(map, base, "mesh", Need::Optional) {
            Got::Value(mesh) => Some(mesh),
            Got::Invalid => None,
            Got::Absent => Some(
                meta.labels
                    .get(kube::MESH_LABEL)
                    .filter(|m| !m.is_empty())
                    .cloned()
                    .unwrap_or_else(|| "default".into()),
            ),
        };
        let spec = ck.mapping(map, base, "spec", Need::Required).ok().map(|spec| (spec, child_path(base, "spec")));
        return Head {
            mesh,
            name: meta.name,
            name_path: kube::name_path(base),
            creation_time: meta.creation_time,
            labels: meta.labels,
            spec,
        };
    }
    let mesh = ck.string(map, base, "mesh", Need::Required).ok();
    let name = ck.string(map, base, "name", Need::Required).ok();
    // A `kumactl inspect dataplanes` overview carries the Dataplane's body under `dataplane`.
    let spec = match kind {
        Kind::Overview => {
            ck.mapping(map, base, "dataplane", Need::Required).ok().map(|spec| (spec, child_path(base, "dataplane")))
        }
        _ => Some((map, base.to_owned())),
    };
    Head {
        mesh,
        name,
        name_path: child_path(base, "name"),
        creation_time: get(map, "creationTime").and_then(Value::as_str).map(str::to_owned),
        labels: kube::string_map(get(map, "labels")),
        spec,
    }
}

/// The inbounds of a Dataplane's body and the DNS names they need resolved; `None` when it is
/// skipped (a warning or an error says why).
fn check_body(ck: &mut Checker<'_>, spec: &Mapping, spec_path: &str) -> Option<(Vec<Inbound>, Vec<Named>)> {
    let net_path = child_path(spec_path, "networking");
    let networking = ck.mapping(spec, spec_path, "networking", Need::Required).ok()?;
    if get(networking, "gateway").is_some() {
        let gw = child_path(&net_path, "gateway");
        ck.warn(&gw, Where::Key(&gw), "skipped: gateway dataplanes are not plain backends of the ingress");
        return None;
    }
    if get(networking, "listeners").is_some() && get(networking, "inbound").is_none() {
        let listeners = child_path(&net_path, "listeners");
        ck.warn(
            &listeners,
            Where::Key(&listeners),
            "skipped: a zone proxy (listeners and no inbound) is not a backend of the ingress",
        );
        return None;
    }
    Some(check_inbounds(ck, networking, &net_path))
}

/// What a resource of the inventory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `type: Dataplane`.
    Dataplane,
    /// `type: DataplaneOverview` (`kumactl inspect dataplanes -o yaml`): the Dataplane's body is
    /// under `dataplane`.
    Overview,
    /// `kind: Dataplane` (Kubernetes form): name and labels under `metadata`, the body under
    /// `spec`.
    Kube,
}

/// A Dataplane or its overview? Other resource types are skipped with a warning.
fn resource_kind(ck: &mut Checker<'_>, map: &Mapping, base: &str) -> Option<Kind> {
    if kube::is_kube(map) {
        let kind = kube::kind(ck, map, base)?;
        if kind != DATAPLANE {
            let kind_path = child_path(base, "kind");
            ck.warn(
                &kind_path,
                Where::Value(&kind_path),
                format!("skipped: only Dataplane resources are read from the inventory, not {kind}"),
            );
            return None;
        }
        if let Err(message) = kube::api_version(map) {
            let path = child_path(base, "apiVersion");
            ck.warn(&path, Where::Value(&path), format!("skipped: not a Kuma resource: {message}"));
            return None;
        }
        return Some(Kind::Kube);
    }
    let type_path = child_path(base, "type");
    match get(map, "type") {
        None => {
            ck.error(
                &type_path,
                Where::Parent(base),
                "is required (expected `type: Dataplane`, `kind: Dataplane`, or an `items:` list of them)",
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

/// A DNS name in `networking.address` or `networking.advertisedAddress`, resolved when the
/// inventory is loaded (`docs/operations.md#input-forms`).
struct Named {
    host: String,
    /// The field, and where its value is.
    path: String,
    pos: Option<(usize, usize)>,
    /// The inbounds whose endpoint address it is.
    inbounds: Vec<usize>,
}

/// Where an inbound's endpoint address comes from.
#[derive(Clone, Copy)]
enum Via {
    /// An IP literal.
    Ip,
    /// A dataplane-level DNS name (its index in the dataplane's names), resolved later.
    Name(usize),
}

/// The dataplane's addresses and its inbounds (only valid ones), and the DNS names to resolve.
/// The control plane resolves both dataplane-level addresses when they are names, and leaves
/// the dataplane out when either does not resolve, whichever one the endpoints use.
fn check_inbounds(ck: &mut Checker<'_>, networking: &Mapping, net_path: &str) -> (Vec<Inbound>, Vec<Named>) {
    let address = ck.address(networking, net_path, "address", Need::Required);
    let advertised = ck.address(networking, net_path, "advertisedAddress", Need::Optional);
    let mut names = Vec::new();
    let mut name_of = |ck: &mut Checker<'_>, got: &Got<Host>, key: &str| -> Option<usize> {
        let Got::Value(Host::Name(host)) = got else { return None };
        let path = child_path(net_path, key);
        let pos = ck.position(&path, &Where::Value(&path));
        names.push(Named { host: host.clone(), path, pos, inbounds: Vec::new() });
        Some(names.len() - 1)
    };
    let advertised_name = name_of(ck, &advertised, "advertisedAddress");
    let address_name = name_of(ck, &address, "address");

    let inbound_path = child_path(net_path, "inbound");
    let inbounds = match ck.sequence(networking, net_path, "inbound", Need::Optional) {
        Got::Value(items) if !items.is_empty() => items.as_slice(),
        Got::Invalid => return (Vec::new(), names),
        _ => {
            ck.error(&inbound_path, Where::Key(net_path), "dataplane must have at least one inbound (or be a gateway)");
            &[]
        }
    };

    let mut checked = Vec::with_capacity(inbounds.len());
    for (i, inbound) in inbounds.iter().enumerate() {
        let path = index_path(&inbound_path, i);
        let hosts = [(&advertised, advertised_name), (&address, address_name)];
        if let Some((inbound, from)) = check_inbound(ck, inbound, &path, hosts) {
            if let Via::Name(n) = from {
                names[n].inbounds.push(checked.len());
            }
            checked.push(inbound);
        }
    }
    (checked, names)
}

/// Check one inbound. `hosts` are the dataplane-level address candidates in precedence order
/// around the inbound's own address: `[advertisedAddress, address]`, each with the index of its
/// DNS name in the dataplane's names when it is one. An endpoint that uses a name gets its
/// address when the names are resolved.
fn check_inbound(
    ck: &mut Checker<'_>,
    value: &Value,
    path: &str,
    hosts: [(&Got<Host>, Option<usize>); 2],
) -> Option<(Inbound, Via)> {
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
    let [(advertised, advertised_name), (address, address_name)] = hosts;
    let chosen = [(advertised, advertised_name), (&own_address, None), (address, address_name)]
        .into_iter()
        .find(|(got, _)| !matches!(got, Got::Absent));
    let endpoint = match chosen {
        Some((Got::Value(Host::Ip(ip)), _)) => Some((*ip, Via::Ip)),
        Some((Got::Value(Host::Name(_)), Some(n))) => Some((IpAddr::V4(Ipv4Addr::UNSPECIFIED), Via::Name(n))),
        // The control plane resolves only the dataplane-level addresses.
        Some((Got::Value(Host::Name(host)), None)) => {
            let own_path = child_path(path, "address");
            ck.error(
                &own_path,
                Where::Value(&own_path),
                format!(
                    "endpoint address must be an IP address, not the DNS name `{host}`: an inbound's own \
                     address is not resolved (networking.address and advertisedAddress are)"
                ),
            );
            None
        }
        // Invalid: already reported; absent: `networking.address` is required and reported.
        _ => None,
    };

    let state = state?;
    let healthy = state == InboundState::Ready && health_ready?;
    let (ip, from) = endpoint?;
    Some((Inbound { endpoint: SocketAddr::new(ip, port.ok()?), name, tags: tags?, state, healthy }, from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve::tests::TableResolver, test_util::*};

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
        // redis-1's `networking.address` is a DNS name: resolved, though its endpoint is the
        // advertised address.
        let resolver = TableResolver::new(&[("redis-1.east.internal", Some(&["198.18.1.13"]))]);
        let loaded = load_inventory_with(&fixture("dataplanes.yaml"), &resolver.dyn_ref()).expect("valid");
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

        // Dataplanes that cannot be used are skipped, each with its file; a duplicate across
        // files names the first definition, which stays.
        dir.write("d.yaml", &dp("from-a", "198.18.1.4", inbound));
        dir.write("e.yaml", "type: Dataplane\nmesh: default\n");
        let loaded = load_inventory(&dir.0).expect("the usable dataplanes load");
        let names: Vec<&str> = loaded.value.dataplanes.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, vec!["from-a", "from-b", "from-c"]);
        assert_eq!(loaded.value.dataplanes[0].inbounds[0].endpoint, "198.18.1.1:80".parse().expect("addr"));
        let dup = skip_at(&loaded.warnings, "name");
        assert_eq!(dup.file, dir.0.join("d.yaml"));
        assert!(dup.message.contains(&format!("first defined at {}:3:7", dir.0.join("a.yaml").display())), "{dup}");
        let missing = loaded
            .warnings
            .iter()
            .find(|d| d.file == dir.0.join("e.yaml") && d.path == "name")
            .expect("e.yaml warning");
        assert_eq!(missing.message, "skipped a Dataplane without a valid name: is required");
        // A file that is not YAML still rejects the inventory.
        dir.write("f.yaml", "type: Dataplane\nname: [\n");
        let e = load_inventory(&dir.0).expect_err("invalid YAML");
        let d = e.errors().next().expect("an error");
        assert_eq!(d.file, dir.0.join("f.yaml"));
        assert!(d.message.starts_with("invalid YAML"), "{d}");
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
        let w = inv_skips(&text);
        let d = skip_at(&w, "networking.inbound[0].state");
        assert_eq!(at(d), (Some(7), Some(22)));
        assert!(d.message.starts_with("skipped Dataplane `a` (mesh `default`): must be one of"), "{d}");
        skip_at(&w, "networking.inbound[1].health.ready");
        skip_at(&w, "networking.inbound[2].health");
        assert_eq!(w.len(), 3);
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
    fn dataplane_dns_names_are_resolved_when_the_inventory_loads() {
        let resolver = TableResolver::new(&[
            ("backend.internal", Some(&["::1", "198.18.7.7", "198.18.7.10"])),
            ("adv.internal", Some(&["2001:2::9"])),
        ]);
        let text = dp(
            "a",
            "backend.internal",
            "  - {port: 1, tags: {kuma.io/service: s}}
  - {port: 2, address: 198.18.9.9, tags: {kuma.io/service: s}}
",
        ) + "---\n"
            + &dp("b", "198.18.1.2", "  - {port: 3, tags: {kuma.io/service: s}}\n")
                .replace("  inbound:", "  advertisedAddress: adv.internal\n  inbound:");
        let loaded = inv_with(&text, &resolver);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let eps: Vec<String> =
            loaded.value.dataplanes.iter().flat_map(|d| d.inbounds.iter().map(|i| i.endpoint.to_string())).collect();
        // The smallest text form of the name's addresses, as the control plane picks it.
        assert_eq!(eps, vec!["198.18.7.10:1", "198.18.9.9:2", "[2001:2::9]:3"]);
    }

    /// Nothing is cached: every load (a reload too) asks the resolver again.
    #[test]
    fn every_load_resolves_the_names_again() {
        struct Moving(std::sync::atomic::AtomicU8);
        impl Resolver for Moving {
            fn lookup(&self, _: &str) -> Result<Vec<IpAddr>, String> {
                let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(vec![IpAddr::from([198, 18, 0, n])])
            }
        }
        let resolver: Arc<dyn Resolver> = Arc::new(Moving(1.into()));
        let dir = TempDir::new();
        let file = dir.write("dp.yaml", &dp("a", "backend.internal", "  - {port: 1, tags: {kuma.io/service: s}}\n"));
        for expected in ["198.18.0.1:1", "198.18.0.2:1"] {
            let loaded = load_inventory_with(&file, &resolver).expect("valid");
            assert_eq!(loaded.value.dataplanes[0].inbounds[0].endpoint.to_string(), expected);
        }
    }

    #[test]
    fn a_dataplane_whose_name_does_not_resolve_is_skipped_with_a_warning() {
        let resolver = TableResolver::new(&[("backend.internal", Some(&["198.18.7.7"]))]);
        let inbound = "  - {port: 1, tags: {kuma.io/service: s}}\n";
        // `gone.internal` is not used by the endpoint (advertisedAddress is), but the control
        // plane resolves both and leaves the dataplane out when either fails.
        let text = [
            dp("ok", "backend.internal", inbound),
            dp("gone", "gone.internal", inbound).replace("  inbound:", "  advertisedAddress: 198.18.1.9\n  inbound:"),
            dp("ip", "198.18.1.3", inbound),
        ]
        .join("---\n");
        let loaded = inv_with(&text, &resolver);
        let names: Vec<&str> = loaded.value.dataplanes.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["ok", "ip"]);
        let d = only_skip(&loaded.warnings, "networking.address");
        assert_eq!(at(&d), (Some(13), Some(12)));
        assert_eq!(
            d.message,
            "skipped Dataplane `gone` (mesh `default`): `gone.internal` does not resolve (Name or service not known)"
        );
    }

    #[test]
    fn an_inbound_dns_name_skips_its_dataplane() {
        let text = dp(
            "a",
            "198.18.1.1",
            "  - {port: 1, tags: {kuma.io/service: s}}
  - {port: 3, address: other.internal, tags: {kuma.io/service: s}}
",
        ) + "---\n"
            + &dp("b", "198.18.1.2", "  - {port: 1, tags: {kuma.io/service: s}}\n");
        let loaded = inv(&text);
        assert_eq!(loaded.value.dataplanes.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["b"]);
        let d = only_skip(&loaded.warnings, "networking.inbound[1].address");
        assert!(d.message.contains("not the DNS name `other.internal`"), "{d}");
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
        only_skip(&inv_skips(&text), "networking.address");
    }

    #[test]
    fn inventory_tags_need_service() {
        let text = dp("a", "198.18.1.1", "  - port: 1\n    tags:\n      version: v1\n");
        let d = only_skip(&inv_skips(&text), "networking.inbound[0].tags");
        assert_eq!(d.message, "skipped Dataplane `a` (mesh `default`): mandatory tag \"kuma.io/service\" is missing");
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
        let w = inv_skips(&text);
        let d = skip_at(&w, "networking.inbound[0].tags[\"bad key\"]");
        assert_eq!(at(d), (Some(10), Some(7)));
        let d = skip_at(&w, "networking.inbound[0].tags.ok");
        assert_eq!(at(d), (Some(11), Some(11)));
        let d = skip_at(&w, "networking.inbound[0].tags.version");
        assert!(d.message.contains("must be a string"), "{d}");
        skip_at(&w, "networking.inbound[0].tags.empty");
        assert_eq!(w.len(), 4, "{w:#?}");
    }

    #[test]
    fn inventory_inbound_port_range() {
        let text = dp("a", "198.18.1.1", "  - port: 0\n    tags: {kuma.io/service: s}\n");
        let d = only_skip(&inv_skips(&text), "networking.inbound[0].port");
        assert_eq!(at(&d), (Some(7), Some(11)));
        let text = dp("a", "198.18.1.1", "  - port: 65536\n    tags: {kuma.io/service: s}\n");
        only_skip(&inv_skips(&text), "networking.inbound[0].port");
        let text = dp("a", "198.18.1.1", "  - tags: {kuma.io/service: s}\n");
        only_skip(&inv_skips(&text), "networking.inbound[0].port");
    }

    #[test]
    fn inventory_mesh_and_name_required() {
        let text = "type: Dataplane\nnetworking:\n  address: 198.18.1.1\n  inbound:\n  - {port: \
                    1, tags: {kuma.io/service: s}}\n";
        let w = inv_skips(text);
        skip_at(&w, "mesh");
        skip_at(&w, "name");
        assert_eq!(w.len(), 2);
        // Named, but without a mesh.
        let w = inv_skips("type: Dataplane\nname: a\nnetworking: {address: 198.18.1.1, inbound: [{port: 1}]}\n");
        assert_eq!(only_skip(&w, "mesh").message, "skipped Dataplane `a`: is required");
    }

    #[test]
    fn inventory_type_required() {
        let e = inv_err("mesh: default\nname: a\n");
        assert!(only_error(&e, "type").message.contains("required"));
    }

    #[test]
    fn inventory_networking_and_inbounds_required() {
        only_skip(&inv_skips("type: Dataplane\nmesh: default\nname: a\n"), "networking");
        let w = inv_skips("type: Dataplane\nmesh: default\nname: a\nnetworking:\n  address: 198.18.1.1\n");
        only_skip(&w, "networking.inbound");
        let w = inv_skips(
            "type: Dataplane\nmesh: default\nname: a\nnetworking:\n  inbound:\n  - {port: 1, \
             tags: {kuma.io/service: s}}\n",
        );
        only_skip(&w, "networking.address");
    }

    #[test]
    fn inventory_duplicate_mesh_and_name() {
        let inbound = "  - {port: 1, tags: {kuma.io/service: s}}\n";
        let a = dp("a", "198.18.1.1", inbound);
        let b = a.replace("198.18.1.1", "198.18.1.2");
        let text = format!("{a}---\n{b}---\n{}", a.replace("mesh: default", "mesh: other"));
        let loaded = inv(&text);
        let kept: Vec<(&str, String)> =
            loaded.value.dataplanes.iter().map(|d| (d.mesh.as_str(), d.inbounds[0].endpoint.to_string())).collect();
        assert_eq!(kept, [("default", "198.18.1.1:1".to_owned()), ("other", "198.18.1.1:1".to_owned())]);
        let d = only_skip(&loaded.warnings, "name");
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
        // Without its body, an overview is skipped, with a warning at the right place.
        let w = inv_skips("type: DataplaneOverview\nmesh: default\nname: x\n");
        assert_eq!(only_skip(&w, "dataplane").message, "skipped Dataplane `x` (mesh `default`): is required");
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
        let lines: Vec<String> = e.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "dp.yaml:15:13: warning: items[1].networking.inbound[0].port: skipped Dataplane `bad-port` \
                 (mesh `default`): port must be in the range [1, 65535]",
                "dp.yaml:24:7: warning: items[2].networking.inbound[0].tags: skipped Dataplane `bad-tags` \
                 (mesh `default`): mandatory tag \"kuma.io/service\" is missing",
                "dp.yaml:25:3: items[3]: expected a Dataplane resource or an `items:` list, got \
                 number 42",
            ]
        );
        // Without the item that is no resource, the usable dataplane loads.
        let loaded = inv(&text.replace("- 42\n", "").replace("total: 4", "total: 3"));
        assert_eq!(loaded.value.dataplanes.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["ok"]);
        assert_eq!(loaded.warnings.len(), 2, "{:#?}", loaded.warnings);
    }

    /// A Dataplane as `kubectl get dataplane -o yaml` prints it.
    const KUBE_DP: &str = "\
apiVersion: kuma.io/v1alpha1
kind: Dataplane
mesh: demo
metadata:
  creationTimestamp: \"2026-01-02T03:04:05Z\"
  generation: 1
  labels:
    app: backend
    kuma.io/mesh: demo
    kuma.io/zone: east
  name: backend-7d9c-x2k4p
  namespace: kuma-demo
  ownerReferences:
  - {apiVersion: v1, kind: Pod, name: backend-7d9c-x2k4p, uid: 0b6f}
  resourceVersion: \"4711\"
  uid: 1c2d
spec:
  networking:
    address: 198.18.4.10
    inbound:
    - port: 8080
      tags:
        kuma.io/service: backend_kuma-demo_svc_8080
        k8s.kuma.io/service-port: \"8080\"
    - port: 9090
      health: {ready: false}
      tags:
        kuma.io/service: backend-admin_kuma-demo_svc_9090
";

    #[test]
    fn kubernetes_dataplanes_are_read_with_kumas_name_mesh_and_labels() {
        let loaded = inv(KUBE_DP);
        assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
        let d = &loaded.value.dataplanes[0];
        assert_eq!((d.mesh.as_str(), d.name.as_str()), ("demo", "backend-7d9c-x2k4p.kuma-demo"));
        assert_eq!(d.creation_time.as_deref(), Some("2026-01-02T03:04:05Z"));
        assert_eq!(d.zone(), Some("east"));
        assert_eq!(d.labels["app"], "backend");
        let eps: Vec<(String, bool)> = d.inbounds.iter().map(|i| (i.endpoint.to_string(), i.healthy)).collect();
        assert_eq!(eps, [("198.18.4.10:8080".to_owned(), true), ("198.18.4.10:9090".to_owned(), false)]);
        assert_eq!(d.inbounds[0].service(), Some("backend_kuma-demo_svc_8080"));

        // Without `mesh`: the mesh label; without both: `default`. Without a namespace (as a
        // cluster-scoped object would be): the bare name.
        let labelled = KUBE_DP.replace("\nmesh: demo\n", "\n");
        assert_eq!(inv(&labelled).value.dataplanes[0].mesh, "demo");
        let bare = labelled.replace("    kuma.io/mesh: demo\n", "").replace("  namespace: kuma-demo\n", "");
        let d = &inv(&bare).value.dataplanes[0];
        assert_eq!((d.mesh.as_str(), d.name.as_str()), ("default", "backend-7d9c-x2k4p"));
    }

    #[test]
    fn kubectl_lists_and_mixed_streams_are_read() {
        let indented: String = KUBE_DP.lines().map(|l| format!("  {l}\n")).collect();
        let second = indented
            .replace("backend-7d9c-x2k4p", "backend-7d9c-q8m2z")
            .replace("198.18.4.10", "198.18.4.11")
            .replace("- port: 8080", "- port: 80800");
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n-{}-{}metadata:\n  resourceVersion: \"\"\n",
            &indented[1..],
            &second[1..]
        );
        let universal = dp("vm-1", "198.18.5.1", "  - port: 80\n    tags: {kuma.io/service: vm}\n");
        let text = format!(
            "{list}---\n{universal}---\n{}",
            KUBE_DP.replace("198.18.4.10", "198.18.4.12").replace("namespace: kuma-demo", "namespace: other")
        );
        let loaded = inv(&text);
        let names: Vec<&str> = loaded.value.dataplanes.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["backend-7d9c-x2k4p.kuma-demo", "vm-1", "backend-7d9c-x2k4p.other"]);
        // The second item breaks a rule: skipped, named, at its line in the list.
        let d = only_skip(&loaded.warnings, "items[1].spec.networking.inbound[0].port");
        assert_eq!(at(&d), (Some(52), Some(15)));
        assert_eq!(
            d.to_string(),
            "dp.yaml:52:15: warning: items[1].spec.networking.inbound[0].port: skipped Dataplane \
             `backend-7d9c-q8m2z.kuma-demo` (mesh `demo`): port must be in the range [1, 65535]"
        );
        assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
    }

    #[test]
    fn kubernetes_documents_that_cannot_be_used() {
        // No name: skipped.
        let w = inv_skips(&KUBE_DP.replace("  name: backend-7d9c-x2k4p\n", ""));
        assert_eq!(only_skip(&w, "metadata.name").message, "skipped a Dataplane without a valid name: is required");
        // No spec: skipped.
        let head = &KUBE_DP[..KUBE_DP.find("spec:").expect("spec")];
        let w = inv_skips(head);
        let d = only_skip(&w, "spec");
        assert!(d.message.starts_with("skipped Dataplane `backend-7d9c-x2k4p.kuma-demo` (mesh `demo`)"), "{d}");
        // Another kind, another API: skipped with a warning, not read.
        let loaded = inv(&KUBE_DP.replace("kind: Dataplane", "kind: DataplaneInsight"));
        assert!(loaded.value.is_empty());
        assert!(warning_at(&loaded.warnings, "kind").message.contains("not DataplaneInsight"));
        let loaded = inv(&KUBE_DP.replace("kuma.io/v1alpha1", "example.com/v1"));
        assert!(loaded.value.is_empty());
        assert!(warning_at(&loaded.warnings, "apiVersion").message.contains("must be `kuma.io/v1alpha1`"));
        // A `kind` that is not a string is not a resource: an error.
        only_error(&inv_err("apiVersion: kuma.io/v1alpha1\nkind: [Dataplane]\n"), "kind");
    }

    #[test]
    fn a_page_of_a_kubectl_list_loads_with_a_warning() {
        let indented: String = KUBE_DP.lines().map(|l| format!("  {l}\n")).collect();
        let text = format!(
            "apiVersion: v1\nkind: List\nitems:\n-{}metadata:\n  continue: eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ\n",
            &indented[1..]
        );
        let loaded = inv(&text);
        assert_eq!(loaded.value.dataplanes.len(), 1);
        let d = warning_at(&loaded.warnings, "metadata.continue");
        assert!(d.message.contains("one page of a paged export (1 items)"), "{d}");
    }

    #[test]
    fn inventory_items_must_be_a_list_and_documents_mappings() {
        only_error(&inv_err("items: {a: b}\n"), "items");
        only_error(&inv_err("- a\n"), "");
    }
}
