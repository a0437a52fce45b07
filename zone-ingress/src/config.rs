//! Configuration inputs: the `ZoneIngress` resource file (reference §2.1) and the backend
//! inventory of Kuma `Dataplane` resources in Universal form (reference §2.2).
//!
//! Both are read the way an operator writes them and the control plane prints them, then checked
//! against Kuma's validation rules plus the few this data plane adds (it binds to
//! `networking.address` and dials endpoints without resolving DNS). Only checked values leave this
//! module: [`ZoneIngress`] and [`Inventory`] are plain data.
//!
//! Every problem in a file is reported at once, each as a [`Diagnostic`] with the file, the
//! line and column when known, and the field path (`networking.admin.port`,
//! `items[2].networking.inbound[0].tags`). `serde_yaml` gives positions only for syntax errors, so
//! a second, span-aware pass over the same text (saphyr-parser's event stream) indexes every
//! field path to its line and column; the structure itself always comes from `serde_yaml`. When the
//! two disagree (they should not for any realistic input) a diagnostic merely loses its position.
//!
//! All `serde_yaml` use is confined to this module so that a maintained fork can replace it here.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt, fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use thiserror::Error;

use crate::sni::{SERVICE_TAG, is_key_char, is_value_char};

/// Admin port used when `networking.admin.port` is absent or 0 (the control plane's default).
pub const DEFAULT_ADMIN_PORT: u16 = 9901;

/// The `kuma.io/zone` label/tag that the zone control plane puts on its resources.
pub const ZONE_TAG: &str = "kuma.io/zone";

// ---------------------------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------------------------

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
    /// An error without a position, for problems found outside this module (command-line
    /// arguments, say) that should be reported together with the file problems.
    pub fn error(file: impl Into<PathBuf>, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { file: file.into(), line: None, column: None, path: path.into(), message: message.into(), severity: Severity::Error }
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
fn finish<T>(value: Option<T>, mut diags: Vec<Diagnostic>) -> Result<Loaded<T>, ConfigError> {
    // Stable: problems without a position keep their place after the positioned ones of the file.
    diags.sort_by(|a, b| (&a.file, a.line.unwrap_or(usize::MAX), a.column).cmp(&(&b.file, b.line.unwrap_or(usize::MAX), b.column)));
    match value {
        Some(value) if !diags.iter().any(Diagnostic::is_error) => Ok(Loaded { value, warnings: diags }),
        _ => Err(ConfigError { diagnostics: diags }),
    }
}

// ---------------------------------------------------------------------------------------------
// ZoneIngress
// ---------------------------------------------------------------------------------------------

/// The checked `ZoneIngress` resource: where to listen and what other zones are told to dial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZoneIngress {
    /// `name`: unique within the zone; part of the proxy id.
    pub name: String,
    /// `networking.address`: the IP the passthrough and admin listeners bind to. Never
    /// unspecified (`0.0.0.0` / `::`), never a DNS name.
    pub address: IpAddr,
    /// `networking.port`: the passthrough listener port.
    pub port: u16,
    /// `networking.advertisedAddress`: what other zones dial (IP or DNS name). `None` together
    /// with `advertised_port`: then no other zone sends traffic here (a warning was issued).
    pub advertised_address: Option<String>,
    /// `networking.advertisedPort`; set exactly when `advertised_address` is.
    pub advertised_port: Option<u16>,
    /// `networking.admin.port`, [`DEFAULT_ADMIN_PORT`] when absent or 0. Never equal to `port`.
    pub admin_port: u16,
}

impl ZoneIngress {
    /// The passthrough listener's socket address.
    #[must_use]
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The admin listener's socket address (`address:admin_port`, reference §8).
    #[must_use]
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.admin_port)
    }

    /// The advertised coordinates, when both are set.
    #[must_use]
    pub fn advertised(&self) -> Option<(&str, u16)> {
        match (&self.advertised_address, self.advertised_port) {
            (Some(address), Some(port)) => Some((address.as_str(), port)),
            _ => None,
        }
    }
}

/// Read and check a ZoneIngress file, substituting `{{ var }}` placeholders from `vars` first
/// (kuma-dp's `--dataplane-var k=v`).
///
/// # Errors
/// The file cannot be read, a placeholder names a variable not in `vars`, the YAML is malformed,
/// or any validation rule fails; all problems found are in the error.
pub fn load_zone_ingress(path: &Path, vars: &BTreeMap<String, String>) -> Result<Loaded<ZoneIngress>, ConfigError> {
    let text = read_text(path).map_err(|d| ConfigError { diagnostics: vec![d] })?;
    parse_zone_ingress(path, &text, vars)
}

/// Check ZoneIngress text; `file` is used only in diagnostics.
///
/// # Errors
/// As [`load_zone_ingress`], without the I/O.
pub fn parse_zone_ingress(file: &Path, text: &str, vars: &BTreeMap<String, String>) -> Result<Loaded<ZoneIngress>, ConfigError> {
    let mut diags = Vec::new();
    let Some((text, posmap)) = substitute(file, text, vars, &mut diags) else {
        return finish(None, diags);
    };
    let parsed = parse_documents(file, &text, &posmap, &mut diags);
    let mut docs = parsed.docs.iter().enumerate().filter(|(_, doc)| !doc.is_null());
    let value = match (docs.next(), docs.next()) {
        (Some((i, doc)), second) => {
            if let Some((j, _)) = second {
                let mut ck = parsed.checker(file, &posmap, j, &mut diags);
                ck.error("", Where::Value(""), "expected a single ZoneIngress document; found more than one");
            }
            let mut ck = parsed.checker(file, &posmap, i, &mut diags);
            check_zone_ingress(&mut ck, doc)
        }
        (None, _) if parsed.syntax_error => None,
        (None, _) => {
            diags.push(whole_file(file, Severity::Error, "no ZoneIngress resource: the file is empty"));
            None
        }
    };
    finish(value, diags)
}

const ZONE_INGRESS_KEYS: &[&str] = &[
    "type",
    "name",
    "networking",
    "zone",
    "availableServices",
    // Metadata that `kumactl get zoneingress -o yaml` prints; harmless, so not worth a warning.
    "labels",
    "creationTime",
    "modificationTime",
    "kri",
];
const ZONE_INGRESS_NETWORKING_KEYS: &[&str] = &["address", "port", "advertisedAddress", "advertisedPort", "admin"];

fn check_zone_ingress(ck: &mut Checker<'_>, root: &Value) -> Option<ZoneIngress> {
    let Value::Mapping(map) = root else {
        ck.error("", Where::Value(""), format!("expected a ZoneIngress resource (a mapping), got {}", describe(root)));
        return None;
    };
    ck.unknown_keys(map, "", ZONE_INGRESS_KEYS);
    ck.resource_type(map, "", "ZoneIngress");
    let name = ck.string(map, "", "name", Need::Required).ok();

    if get(map, "zone").is_some() {
        ck.warn("zone", Where::Key("zone"), "ignored: `zone` is written by the control plane (empty in the ingress's own zone)");
    }
    if let Some(services) = get(map, "availableServices") {
        ck.warn(
            "availableServices",
            Where::Key("availableServices"),
            "ignored: `availableServices` is written by the control plane and recomputed from the \
             Dataplane inventory",
        );
        check_available_services(ck, services);
    }

    let networking = ck.mapping(map, "", "networking", Need::Required).ok()?;
    let net = "networking";
    ck.unknown_keys(networking, net, ZONE_INGRESS_NETWORKING_KEYS);

    let address = bind_address(ck, networking);
    let port = ck.port(networking, net, "port", Need::Required, Zero::Invalid);
    let advertised_address = ck.address(networking, net, "advertisedAddress", Need::Optional);
    let advertised_port = ck.port(networking, net, "advertisedPort", Need::Optional, Zero::Unset);
    check_advertised_pair(ck, &advertised_address, &advertised_port);
    let admin_port = admin_port(ck, networking, &port, &advertised_address, &advertised_port);

    let advertised_address = match advertised_address {
        Got::Value(host) => Some(host.to_string()),
        _ => None,
    };
    Some(ZoneIngress { name: name?, address: address?, port: port.ok()?, advertised_address, advertised_port: advertised_port.ok(), admin_port: admin_port? })
}

/// `networking.address`: an IP literal, since the listeners bind to it.
fn bind_address(ck: &mut Checker<'_>, networking: &Mapping) -> Option<IpAddr> {
    match ck.address(networking, "networking", "address", Need::Required) {
        Got::Value(Host::Ip(ip)) => Some(ip),
        Got::Value(Host::Name(name)) => {
            ck.error(
                "networking.address",
                Where::Value("networking.address"),
                format!(
                    "must be an IP address, not the DNS name `{name}`: the listener binds to it \
                     and zone-ingress does not resolve names"
                ),
            );
            None
        }
        Got::Absent | Got::Invalid => None,
    }
}

fn check_advertised_pair(ck: &mut Checker<'_>, address: &Got<Host>, port: &Got<u16>) {
    let net = "networking";
    // Kuma's rule: both or neither; the error sits on the missing one's name but we point at the
    // one that is present, which is where the operator has to look.
    match (address, port) {
        (Got::Absent, Got::Absent) => ck.warn(
            net,
            Where::Key(net),
            "advertisedAddress and advertisedPort are not set: other zones will not send any \
             traffic to this ingress (clients skip ingresses without both; kumahq/kuma#5157)",
        ),
        (Got::Absent, _) => ck.error("networking.advertisedAddress", Where::Key("networking.advertisedPort"), "has to be defined with advertisedPort"),
        (_, Got::Absent) => ck.error("networking.advertisedPort", Where::Key("networking.advertisedAddress"), "has to be defined with advertisedAddress"),
        _ => {}
    }
}

/// `networking.admin.port` (default [`DEFAULT_ADMIN_PORT`]) and its clashes with the other ports.
fn admin_port(ck: &mut Checker<'_>, networking: &Mapping, port: &Got<u16>, advertised_address: &Got<Host>, advertised_port: &Got<u16>) -> Option<u16> {
    let admin_port = match ck.mapping(networking, "networking", "admin", Need::Optional) {
        Got::Value(admin) => {
            ck.unknown_keys(admin, "networking.admin", &["port"]);
            ck.port(admin, "networking.admin", "port", Need::Optional, Zero::Unset)
        }
        Got::Absent => Got::Absent,
        Got::Invalid => Got::Invalid,
    };
    let admin_port = match admin_port {
        Got::Value(p) => Some((p, true)),
        Got::Absent => Some((DEFAULT_ADMIN_PORT, false)),
        Got::Invalid => None,
    };

    if let (Got::Value(port), Some((admin, explicit))) = (port, admin_port) {
        // Kuma rejects this only for a loopback listener; here the admin listener always binds
        // `networking.address` too (reference §8), so the two ports clash on any address.
        if *port == admin {
            if explicit {
                ck.error("networking.admin.port", Where::Value("networking.admin.port"), "must differ from port");
            } else {
                ck.error(
                    "networking.port",
                    Where::Value("networking.port"),
                    format!(
                        "must differ from the default admin port {DEFAULT_ADMIN_PORT}; set \
                         networking.admin.port to another port"
                    ),
                );
            }
        }
    }
    if let (Got::Value(Host::Ip(ip)), Got::Value(adv_port), Some((admin, true))) = (advertised_address, advertised_port, admin_port)
        && ip.is_loopback()
        && *adv_port == admin
    {
        ck.error("networking.admin.port", Where::Value("networking.admin.port"), "must differ from advertisedPort");
    }
    admin_port.map(|(port, _)| port)
}

/// Kuma's rules for `availableServices[i].tags`. The values are ignored, but the control plane
/// would reject the resource, so an operator copying one around should hear about it.
fn check_available_services(ck: &mut Checker<'_>, services: &Value) {
    let Value::Sequence(items) = services else {
        ck.error("availableServices", Where::Value("availableServices"), format!("must be a list, got {}", describe(services)));
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let path = index_path("availableServices", i);
        let Value::Mapping(item) = item else {
            ck.error(&path, Where::Value(&path), format!("must be a mapping, got {}", describe(item)));
            continue;
        };
        match get(item, "tags") {
            Some(tags) => {
                ck.tags(tags, &child_path(&path, "tags"));
            }
            None => ck.error(&child_path(&path, "tags"), Where::Parent(&path), format!("mandatory tag \"{SERVICE_TAG}\" is missing")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inventory
// ---------------------------------------------------------------------------------------------

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
    let is_dir = fs::metadata(path).is_ok_and(|m| m.is_dir());
    if is_dir {
        let files = match yaml_files(path) {
            Ok(files) => files,
            Err(d) => return finish(None, vec![d]),
        };
        if files.is_empty() {
            diags.push(whole_file(path, Severity::Warning, "no *.yaml or *.yml files in this directory: the inventory is empty"));
        }
        for file in files {
            match read_text(&file) {
                Ok(text) => parse_inventory_into(&file, &text, &mut found, &mut diags),
                Err(d) => diags.push(d),
            }
        }
    } else {
        match read_text(path) {
            Ok(text) => parse_inventory_into(path, &text, &mut found, &mut diags),
            Err(d) => diags.push(d),
        }
    }
    let inventory = collect_inventory(path, found, &mut diags);
    finish(Some(inventory), diags)
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

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, Diagnostic> {
    let entries = fs::read_dir(dir).map_err(|e| whole_file(dir, Severity::Error, format!("cannot read directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| whole_file(dir, Severity::Error, format!("cannot read directory: {e}")))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let yaml = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
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
    let posmap = PosMap::identity();
    let parsed = parse_documents(file, text, &posmap, diags);
    for (i, doc) in parsed.docs.iter().enumerate() {
        let mut ck = parsed.checker(file, &posmap, i, diags);
        check_inventory_document(&mut ck, doc, found);
    }
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
        diags.push(whole_file(origin, Severity::Warning, "no Dataplane resources: the ingress has nothing to route to"));
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
                for (i, item) in items.iter().enumerate() {
                    check_resource(ck, item, &index_path("items", i), found);
                }
            }
            Some(other) => ck.error("items", Where::Value("items"), format!("must be a list, got {}", describe(other))),
        },
        _ => check_resource(ck, doc, "", found),
    }
}

const DATAPLANE: &str = "Dataplane";

fn check_resource(ck: &mut Checker<'_>, value: &Value, base: &str, found: &mut Vec<Found>) {
    let Value::Mapping(map) = value else {
        ck.error(base, Where::Value(base), format!("expected a Dataplane resource or an `items:` list, got {}", describe(value)));
        return;
    };
    if !is_dataplane(ck, map, base) {
        return;
    }

    let errors_before = ck.errors;
    let mesh = ck.string(map, base, "mesh", Need::Required).ok();
    let name = ck.string(map, base, "name", Need::Required).ok();
    let creation_time = match get(map, "creationTime") {
        Some(Value::String(t)) => Some(t.clone()),
        _ => None,
    };
    let labels = match get(map, "labels") {
        Some(Value::Mapping(labels)) => labels.iter().filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned()))).collect(),
        _ => BTreeMap::new(),
    };
    let net_path = child_path(base, "networking");
    let Some(networking) = ck.mapping(map, base, "networking", Need::Required).ok() else {
        return;
    };
    if get(networking, "gateway").is_some() {
        let gw = child_path(&net_path, "gateway");
        ck.warn(&gw, Where::Key(&gw), "skipped: gateway dataplanes are not plain backends of the ingress");
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
    found.push(Found { dataplane: Dataplane { mesh, name, creation_time, labels, inbounds }, file: ck.file.to_path_buf(), path: base.to_owned(), pos });
}

/// `type: Dataplane`? Other resource types are skipped with a warning.
fn is_dataplane(ck: &mut Checker<'_>, map: &Mapping, base: &str) -> bool {
    let type_path = child_path(base, "type");
    match get(map, "type") {
        None => {
            ck.error(&type_path, Where::Parent(base), "is required (expected `Dataplane`, or an `items:` list of them)");
            false
        }
        Some(Value::String(t)) if t == DATAPLANE => true,
        Some(Value::String(t)) => {
            ck.warn(&type_path, Where::Value(&type_path), format!("skipped: only Dataplane resources are read from the inventory, not {t}"));
            false
        }
        Some(other) => {
            ck.error(&type_path, Where::Value(&type_path), format!("must be a string, got {}", describe(other)));
            false
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
        let hosts = [(&advertised, child_path(net_path, "advertisedAddress")), (&address, child_path(net_path, "address"))];
        if let Some(inbound) = check_inbound(ck, inbound, &path, hosts, &mut reported_names) {
            checked.push(inbound);
        }
    }
    checked
}

/// Check one inbound. `hosts` are the dataplane-level address candidates in precedence order
/// around the inbound's own address: `[advertisedAddress, address]`.
fn check_inbound(ck: &mut Checker<'_>, value: &Value, path: &str, hosts: [(&Got<Host>, String); 2], reported_names: &mut HashSet<String>) -> Option<Inbound> {
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
            ck.error(&state_path, Where::Value(&state_path), format!("must be one of Ready, NotReady, Ignored; got {}", describe(other)));
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

    // Endpoint address precedence (reference §2.2): advertisedAddress, inbound.address, address.
    let [(advertised, advertised_path), (address, address_path)] = hosts;
    let own_path = child_path(path, "address");
    let chosen = [(advertised, advertised_path), (&own_address, own_path), (address, address_path)].into_iter().find(|(got, _)| !matches!(got, Got::Absent));
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

// ---------------------------------------------------------------------------------------------
// Field checking
// ---------------------------------------------------------------------------------------------

/// Result of reading one field.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got<T> {
    /// Absent, null, or a value meaning "unset" (empty string, port 0 where allowed).
    Absent,
    /// Present but wrong; a diagnostic was emitted.
    Invalid,
    /// Present and valid.
    Value(T),
}

impl<T> Got<T> {
    fn ok(self) -> Option<T> {
        match self {
            Self::Value(v) => Some(v),
            Self::Absent | Self::Invalid => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Required,
    Optional,
}

/// What a 0 port means for a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zero {
    /// Out of range.
    Invalid,
    /// Unset (proto3 default), as for `advertisedPort` and `admin.port`.
    Unset,
}

/// An address field: an IP literal or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
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
enum Where<'p> {
    /// The value of the field at this path.
    Value(&'p str),
    /// The key of the field at this path (its value if it has no key, e.g. a list item).
    Key(&'p str),
    /// A field that is missing: point at its parent.
    Parent(&'p str),
}

/// Emits diagnostics for one document of one file.
struct Checker<'a> {
    file: &'a Path,
    spans: Option<&'a DocSpans>,
    posmap: &'a PosMap,
    diags: &'a mut Vec<Diagnostic>,
    errors: usize,
}

impl Checker<'_> {
    fn position(&self, path: &str, at: &Where<'_>) -> Option<(usize, usize)> {
        let spans = self.spans?;
        let pos = match *at {
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

    fn error(&mut self, path: &str, at: Where<'_>, message: impl Into<String>) {
        self.push(Severity::Error, path, at, message.into());
    }

    fn warn(&mut self, path: &str, at: Where<'_>, message: impl Into<String>) {
        self.push(Severity::Warning, path, at, message.into());
    }

    /// Warn about keys not in `known`: unknown keys are ignored, but a misspelt optional field
    /// would otherwise silently keep its default.
    fn unknown_keys(&mut self, map: &Mapping, parent: &str, known: &[&str]) {
        for key in map.keys() {
            let text = key_text(key);
            if known.contains(&text.as_str()) {
                continue;
            }
            let path = child_path(parent, &text);
            let message = match closest(&text, known) {
                Some(hint) => format!("unknown field, ignored (did you mean `{hint}`?)"),
                None => "unknown field, ignored".to_owned(),
            };
            self.warn(&path, Where::Key(&path), message);
        }
    }

    fn resource_type(&mut self, map: &Mapping, parent: &str, expected: &str) {
        let path = child_path(parent, "type");
        match get(map, "type") {
            Some(Value::String(t)) if t == expected => {}
            Some(other) => self.error(&path, Where::Value(&path), format!("must be `{expected}`, got {}", describe(other))),
            None => self.error(&path, Where::Parent(parent), format!("is required (`type: {expected}`)")),
        }
    }

    fn missing(&mut self, parent: &str, key: &str) {
        let path = child_path(parent, key);
        self.error(&path, Where::Parent(parent), "is required");
    }

    fn string(&mut self, map: &Mapping, parent: &str, key: &str, need: Need) -> Got<String> {
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
    fn address(&mut self, map: &Mapping, parent: &str, key: &str, need: Need) -> Got<Host> {
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
    fn port(&mut self, map: &Mapping, parent: &str, key: &str, need: Need, zero: Zero) -> Got<u16> {
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
            Value::String(s) => s.trim().parse::<u64>().map_err(|_| format!("must be an integer, got {}", describe(value))),
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

    fn mapping<'v>(&mut self, map: &'v Mapping, parent: &str, key: &str, need: Need) -> Got<&'v Mapping> {
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

    fn sequence<'v>(&mut self, map: &'v Mapping, parent: &str, key: &str, need: Need) -> Got<&'v Vec<Value>> {
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

    /// A boolean that defaults to `false` when absent (proto3 default).
    fn boolean(&mut self, map: &Mapping, parent: &str, key: &str) -> Option<bool> {
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
    fn tags(&mut self, value: &Value, path: &str) -> Option<BTreeMap<String, String>> {
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
                other => self.error(&tag_path, Where::Value(&tag_path), format!("tag value must be a string, got {} (quote it)", describe(other))),
            }
        }
        if !map.contains_key(SERVICE_TAG) {
            self.error(path, Where::Key(path), format!("mandatory tag \"{SERVICE_TAG}\" is missing"));
        }
        (self.errors == errors_before).then_some(tags)
    }
}

/// A field, treating null (`key:` with nothing after it) as absent, like proto JSON decoding.
fn get<'v>(map: &'v Mapping, key: &str) -> Option<&'v Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn describe(value: &Value) -> String {
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
        !label.is_empty() && label.len() <= 63 && !label.starts_with('-') && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    labels_ok && !trimmed.chars().all(|c| c.is_ascii_digit() || c == '.')
}

fn whole_file(file: &Path, severity: Severity, message: impl Into<String>) -> Diagnostic {
    Diagnostic { file: file.to_path_buf(), line: None, column: None, path: String::new(), message: message.into(), severity }
}

fn read_text(path: &Path) -> Result<String, Diagnostic> {
    let bytes = fs::read(path).map_err(|e| whole_file(path, Severity::Error, format!("cannot read file: {e}")))?;
    String::from_utf8(bytes).map_err(|e| whole_file(path, Severity::Error, format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to())))
}

// ---------------------------------------------------------------------------------------------
// Field paths
// ---------------------------------------------------------------------------------------------

/// `parent.key`, or `parent["key"]` for keys that are not plain identifiers (tag names contain
/// dots and slashes, and a dotted rendering would be ambiguous).
fn child_path(parent: &str, key: &str) -> String {
    let plain =
        key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (plain, parent.is_empty()) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{parent}.{key}"),
        (false, _) => format!("{parent}[{key:?}]"),
    }
}

fn index_path(parent: &str, index: usize) -> String {
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

// ---------------------------------------------------------------------------------------------
// YAML documents and positions
// ---------------------------------------------------------------------------------------------

/// 1-based line and column (characters) in the text that was parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    column: usize,
}

#[derive(Debug, Clone, Copy)]
struct FieldSpan {
    /// Where the key starts; `None` for list items and the document root.
    key: Option<Pos>,
    /// Where the value starts.
    value: Pos,
}

/// Positions of every addressable node of one YAML document.
#[derive(Debug, Default)]
struct DocSpans {
    start: Option<Pos>,
    fields: HashMap<String, FieldSpan>,
    /// Keys that repeat within their mapping: `serde_yaml` reports these only at the mapping.
    duplicate_keys: Vec<Pos>,
}

struct Parsed {
    docs: Vec<Value>,
    spans: Vec<DocSpans>,
    syntax_error: bool,
}

impl Parsed {
    fn checker<'a>(&'a self, file: &'a Path, posmap: &'a PosMap, doc: usize, diags: &'a mut Vec<Diagnostic>) -> Checker<'a> {
        Checker { file, spans: self.spans.get(doc), posmap, diags, errors: 0 }
    }
}

/// Parse every document of `text`. On a syntax error the documents before it are still returned
/// (and checked), so one run reports as much as possible.
fn parse_documents(file: &Path, text: &str, posmap: &PosMap, diags: &mut Vec<Diagnostic>) -> Parsed {
    let spans = index_spans(text);
    let mut docs = Vec::new();
    let mut syntax_error = false;
    for document in serde_yaml::Deserializer::from_str(text) {
        match Lenient::deserialize(document) {
            Ok(Lenient(mut value)) => {
                if let Err(e) = value.apply_merge() {
                    let pos = spans.get(docs.len()).and_then(|s| s.start);
                    diags.push(yaml_error(file, pos, posmap, &e));
                    value = Value::Null;
                }
                docs.push(value);
            }
            Err(e) => {
                let mut pos = e.location().map(|l| Pos { line: l.line(), column: l.column() });
                if e.to_string().starts_with("duplicate entry") {
                    // serde_yaml points at the mapping; the span index knows the repeated key.
                    if let Some(dup) = spans.get(docs.len()).and_then(|s| s.duplicate_keys.first()) {
                        pos = Some(*dup);
                    }
                }
                diags.push(yaml_error(file, pos, posmap, &e));
                syntax_error = true;
                // serde_yaml's document iterator repeats a fatal error forever.
                break;
            }
        }
    }
    Parsed { docs, spans, syntax_error }
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

/// Index the position of every mapping value and list item by field path, document by document,
/// from saphyr-parser's event stream. Stops quietly at a syntax error (`serde_yaml` reports it).
fn index_spans(text: &str) -> Vec<DocSpans> {
    use saphyr_parser::{Event, Parser};

    let mut docs: Vec<DocSpans> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut parser = Parser::new_from_str(text);
    while let Some(Ok((event, span))) = parser.next_event() {
        let pos = Pos { line: span.start.line(), column: span.start.col() + 1 };
        let node = match event {
            Event::DocumentStart(_) => {
                docs.push(DocSpans { start: Some(pos), ..DocSpans::default() });
                stack.clear();
                continue;
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                continue;
            }
            Event::Scalar(value, ..) => Node::Scalar(value.into_owned()),
            Event::Alias(_) => Node::Alias,
            Event::MappingStart(..) => Node::Mapping,
            Event::SequenceStart(..) => Node::Sequence,
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => continue,
        };
        if let Some(doc) = docs.last_mut() {
            on_node(doc, &mut stack, node, pos);
        }
    }
    docs
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

// ---------------------------------------------------------------------------------------------
// `{{ var }}` substitution
// ---------------------------------------------------------------------------------------------

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
struct PosMap {
    translation: Option<Translation>,
}

impl PosMap {
    fn identity() -> Self {
        Self::default()
    }

    /// `(line, column)`, both 1-based, in the original text.
    fn original(&self, pos: Pos) -> (usize, usize) {
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
fn substitute(file: &Path, text: &str, vars: &BTreeMap<String, String>, diags: &mut Vec<Diagnostic>) -> Option<(String, PosMap)> {
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
    let posmap = PosMap { translation: Some(Translation { original: text.to_owned(), output: output.clone(), replacements }) };
    Some((output, posmap))
}

// ---------------------------------------------------------------------------------------------
// Sources: what to load
// ---------------------------------------------------------------------------------------------

/// Where the inputs come from (plain data; the command line fills it).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The ZoneIngress resource (YAML).
    pub dataplane_file: PathBuf,
    /// The inventory: a file or a directory of Kuma Dataplane resources.
    pub dataplanes: PathBuf,
    /// `{{ key }}` substitutions in the dataplane file.
    pub dataplane_vars: Vec<(String, String)>,
    /// The zone this ingress serves.
    pub zone: String,
    /// Must be `ingress` (kuma-dp's `--proxy-type`).
    pub proxy_type: String,
}

/// Both inputs, checked.
#[derive(Debug)]
pub struct Inputs {
    pub zone_ingress: ZoneIngress,
    pub inventory: Inventory,
    pub warnings: Vec<Diagnostic>,
}

/// Loads and validates both inputs, reporting every problem of both at once.
///
/// # Errors
/// Every error (and warning) of both inputs when one of them has an error.
pub fn load_inputs(sources: &Sources) -> Result<Inputs, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    if sources.proxy_type != "ingress" {
        problems.push(Diagnostic::error(
            PathBuf::from("--proxy-type"),
            "proxy-type",
            format!("zone-ingress only serves --proxy-type=ingress, got {:?}", sources.proxy_type),
        ));
    }
    let vars: BTreeMap<String, String> = sources.dataplane_vars.iter().cloned().collect();
    let zi = load_zone_ingress(&sources.dataplane_file, &vars);
    let inv = load_inventory(&sources.dataplanes);
    let mut warnings = Vec::new();
    fn take<T>(loaded: Result<Loaded<T>, ConfigError>, warnings: &mut Vec<Diagnostic>, problems: &mut Vec<Diagnostic>) -> Option<T> {
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
    let zi = take(zi, &mut warnings, &mut problems);
    let inv = take(inv, &mut warnings, &mut problems);
    match (zi, inv) {
        (Some(zone_ingress), Some(inventory)) if problems.is_empty() => Ok(Inputs { zone_ingress, inventory, warnings }),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    // ---- helpers ------------------------------------------------------------------------------

    const ZI: &str = "\
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

    fn no_vars() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn zi(text: &str) -> Loaded<ZoneIngress> {
        match parse_zone_ingress(Path::new("zi.yaml"), text, &no_vars()) {
            Ok(loaded) => loaded,
            Err(e) => panic!("expected a valid ZoneIngress, got:\n{e}"),
        }
    }

    fn zi_err(text: &str) -> ConfigError {
        zi_err_vars(text, &no_vars())
    }

    fn zi_err_vars(text: &str, vars: &BTreeMap<String, String>) -> ConfigError {
        match parse_zone_ingress(Path::new("zi.yaml"), text, vars) {
            Ok(loaded) => panic!("expected errors, got {loaded:?}"),
            Err(e) => e,
        }
    }

    fn inv(text: &str) -> Loaded<Inventory> {
        match parse_inventory(Path::new("dp.yaml"), text) {
            Ok(loaded) => loaded,
            Err(e) => panic!("expected a valid inventory, got:\n{e}"),
        }
    }

    fn inv_err(text: &str) -> ConfigError {
        match parse_inventory(Path::new("dp.yaml"), text) {
            Ok(loaded) => panic!("expected errors, got {loaded:?}"),
            Err(e) => e,
        }
    }

    /// The only error, which must be at `path`.
    fn only_error(e: &ConfigError, path: &str) -> Diagnostic {
        let errors: Vec<&Diagnostic> = e.errors().collect();
        assert_eq!(errors.len(), 1, "expected exactly one error:\n{e}");
        assert_eq!(errors[0].path, path, "{e}");
        errors[0].clone()
    }

    fn error_at<'e>(e: &'e ConfigError, path: &str) -> &'e Diagnostic {
        e.errors().find(|d| d.path == path).unwrap_or_else(|| panic!("no error at {path}:\n{e}"))
    }

    fn warning_at<'d>(warnings: &'d [Diagnostic], path: &str) -> &'d Diagnostic {
        warnings.iter().find(|d| d.path == path && d.severity == Severity::Warning).unwrap_or_else(|| panic!("no warning at {path}: {warnings:#?}"))
    }

    fn at(d: &Diagnostic) -> (Option<usize>, Option<usize>) {
        (d.line, d.column)
    }

    /// A Dataplane document with one inbound; `extra_net` goes under `networking`, `extra_in`
    /// under the inbound (both indented by the caller's text).
    fn dp(name: &str, address: &str, inbound: &str) -> String {
        format!(
            "type: Dataplane\nmesh: default\nname: {name}\nnetworking:\n  address: {address}\n  \
             inbound:\n{inbound}"
        )
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!("zone-ingress-config-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
            fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
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

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(name)
    }

    // ---- ZoneIngress: valid input -------------------------------------------------------------

    #[test]
    fn zone_ingress_valid() {
        let loaded = zi(ZI);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let z = loaded.value;
        assert_eq!(z.name, "zi-east-1");
        assert_eq!(z.listen_addr(), "198.18.0.5:10001".parse().expect("addr"));
        assert_eq!(z.admin_addr(), "198.18.0.5:9901".parse().expect("addr"));
        assert_eq!(z.advertised(), Some(("203.0.113.7", 10001)));
        assert_eq!(z.admin_port, 9901);
    }

    #[test]
    fn zone_ingress_admin_port_defaults_to_9901() {
        let without = ZI.replace("  admin:\n    port: 9901\n", "");
        assert_eq!(zi(&without).value.admin_port, DEFAULT_ADMIN_PORT);
        let zero = ZI.replace("port: 9901", "port: 0");
        assert_eq!(zi(&zero).value.admin_port, DEFAULT_ADMIN_PORT);
        let custom = ZI.replace("port: 9901", "port: 9902");
        assert_eq!(zi(&custom).value.admin_port, 9902);
    }

    #[test]
    fn zone_ingress_ipv6_addresses() {
        let text = ZI.replace("198.18.0.5", "\"2001:db8::5\"").replace("203.0.113.7", "::ffff:203.0.113.7");
        let z = zi(&text).value;
        assert_eq!(z.listen_addr(), "[2001:db8::5]:10001".parse().expect("addr"));
        assert_eq!(z.advertised_address.as_deref(), Some("::ffff:203.0.113.7"));
        let plain = ZI.replace("198.18.0.5", "fd00::5");
        assert_eq!(zi(&plain).value.address, "fd00::5".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn zone_ingress_numeric_strings_are_ports() {
        // Kuma's proto JSON decoding accepts quoted numbers, and templates often quote them.
        let text = ZI.replace("port: 10001", "port: \"10001\"");
        assert_eq!(zi(&text).value.port, 10001);
    }

    #[test]
    fn zone_ingress_advertised_address_may_be_a_dns_name() {
        let text = ZI.replace("203.0.113.7", "zi.east.example.com");
        assert_eq!(zi(&text).value.advertised(), Some(("zi.east.example.com", 10001)));
    }

    // ---- ZoneIngress: one test per rule -------------------------------------------------------

    #[test]
    fn zone_ingress_type_required() {
        let e = zi_err(&ZI.replace("type: ZoneIngress\n", ""));
        let d = only_error(&e, "type");
        assert!(d.message.contains("is required"), "{d}");
    }

    #[test]
    fn zone_ingress_type_must_be_zone_ingress() {
        let e = zi_err(&ZI.replace("type: ZoneIngress", "type: Dataplane"));
        let d = only_error(&e, "type");
        assert_eq!(at(&d), (Some(1), Some(7)));
        assert!(d.message.contains("must be `ZoneIngress`"), "{d}");
    }

    #[test]
    fn zone_ingress_name_required() {
        let e = zi_err(&ZI.replace("name: zi-east-1\n", ""));
        only_error(&e, "name");
        let e = zi_err(&ZI.replace("name: zi-east-1", "name: \"\""));
        let d = only_error(&e, "name");
        assert!(d.message.contains("must not be empty"));
        let e = zi_err(&ZI.replace("name: zi-east-1", "name: [a]"));
        assert!(only_error(&e, "name").message.contains("must be a string"));
    }

    #[test]
    fn zone_ingress_networking_required() {
        let e = zi_err("type: ZoneIngress\nname: zi\n");
        only_error(&e, "networking");
        let e = zi_err("type: ZoneIngress\nname: zi\nnetworking: 5\n");
        assert!(only_error(&e, "networking").message.contains("must be a mapping"));
    }

    #[test]
    fn zone_ingress_address_required() {
        let e = zi_err(&ZI.replace("  address: 198.18.0.5\n", ""));
        let d = only_error(&e, "networking.address");
        // Points at the parent, `networking:` on line 3.
        assert_eq!(at(&d), (Some(3), Some(1)));
    }

    #[test]
    fn zone_ingress_address_must_be_an_ip_literal() {
        let e = zi_err(&ZI.replace("198.18.0.5", "ingress.east.internal"));
        let d = only_error(&e, "networking.address");
        assert_eq!(at(&d), (Some(4), Some(12)));
        assert!(d.message.contains("DNS name"), "{d}");
        assert!(d.message.contains("does not resolve"), "{d}");
    }

    #[test]
    fn zone_ingress_address_must_not_be_unspecified() {
        for any in ["0.0.0.0", "\"::\""] {
            let e = zi_err(&ZI.replace("198.18.0.5", any));
            let d = only_error(&e, "networking.address");
            assert!(d.message.contains("must not be 0.0.0.0 or ::"), "{d}");
        }
    }

    #[test]
    fn zone_ingress_address_must_be_valid() {
        for bad in ["198.18.0.999", "not an address!", "-bad.example"] {
            let e = zi_err(&ZI.replace("198.18.0.5", bad));
            let d = only_error(&e, "networking.address");
            assert!(d.message.contains("not a valid IP address"), "{bad}: {d}");
        }
    }

    #[test]
    fn zone_ingress_port_required() {
        let e = zi_err(&ZI.replace("  port: 10001\n", ""));
        only_error(&e, "networking.port");
    }

    #[test]
    fn zone_ingress_port_range() {
        for bad in ["0", "70000", "-1", "99999999999999999999"] {
            let e = zi_err(&ZI.replace("port: 10001", &format!("port: {bad}")));
            let d = only_error(&e, "networking.port");
            assert_eq!(at(&d), (Some(5), Some(9)), "{bad}");
            assert_eq!(d.message, "port must be in the range [1, 65535]", "{bad}");
        }
    }

    #[test]
    fn zone_ingress_port_type() {
        for bad in ["abc", "\"abc\"", "80.5", "true", "[1]"] {
            let e = zi_err(&ZI.replace("port: 10001", &format!("port: {bad}")));
            let d = only_error(&e, "networking.port");
            assert_eq!(at(&d), (Some(5), Some(9)), "{bad}");
            assert!(d.message.starts_with("must be an integer"), "{bad}: {d}");
        }
    }

    #[test]
    fn zone_ingress_advertised_port_range() {
        let e = zi_err(&ZI.replace("advertisedPort: 10001", "advertisedPort: 65536"));
        let d = only_error(&e, "networking.advertisedPort");
        assert_eq!(at(&d), (Some(7), Some(19)));
    }

    #[test]
    fn zone_ingress_advertised_address_needs_port() {
        let e = zi_err(&ZI.replace("  advertisedPort: 10001\n", ""));
        let d = only_error(&e, "networking.advertisedPort");
        assert_eq!(d.message, "has to be defined with advertisedAddress");
        // Points at the advertisedAddress that is there.
        assert_eq!(at(&d), (Some(6), Some(3)));
        // Port 0 means unset (proto default), so it is the same case.
        let e = zi_err(&ZI.replace("advertisedPort: 10001", "advertisedPort: 0"));
        only_error(&e, "networking.advertisedPort");
    }

    #[test]
    fn zone_ingress_advertised_port_needs_address() {
        let e = zi_err(&ZI.replace("  advertisedAddress: 203.0.113.7\n", ""));
        let d = only_error(&e, "networking.advertisedAddress");
        assert_eq!(d.message, "has to be defined with advertisedPort");
    }

    #[test]
    fn zone_ingress_advertised_address_must_not_be_unspecified() {
        let e = zi_err(&ZI.replace("203.0.113.7", "0.0.0.0"));
        let d = only_error(&e, "networking.advertisedAddress");
        assert_eq!(at(&d), (Some(6), Some(22)));
        let e = zi_err(&ZI.replace("203.0.113.7", "bad_host!"));
        only_error(&e, "networking.advertisedAddress");
    }

    #[test]
    fn zone_ingress_admin_port_must_differ_from_port() {
        let e = zi_err(&ZI.replace("port: 9901", "port: 10001"));
        let d = only_error(&e, "networking.admin.port");
        assert_eq!(d.message, "must differ from port");
        assert_eq!(at(&d), (Some(9), Some(11)));
        // Also with the default admin port.
        let text = ZI.replace("  admin:\n    port: 9901\n", "").replace("port: 10001", "port: 9901");
        let e = zi_err(&text);
        let d = only_error(&e, "networking.port");
        assert!(d.message.contains("default admin port 9901"), "{d}");
    }

    #[test]
    fn zone_ingress_admin_port_must_differ_from_loopback_advertised_port() {
        let text = ZI.replace("203.0.113.7", "127.0.0.1").replace("advertisedPort: 10001", "advertisedPort: 9901");
        let e = zi_err(&text);
        assert_eq!(only_error(&e, "networking.admin.port").message, "must differ from advertisedPort");
        // Not a problem when the advertised address is not loopback.
        let text = ZI.replace("advertisedPort: 10001", "advertisedPort: 9901");
        zi(&text);
    }

    #[test]
    fn zone_ingress_admin_port_range_and_type() {
        let e = zi_err(&ZI.replace("port: 9901", "port: 70000"));
        only_error(&e, "networking.admin.port");
        let e = zi_err(&ZI.replace("  admin:\n    port: 9901\n", "  admin: 9901\n"));
        only_error(&e, "networking.admin");
    }

    #[test]
    fn zone_ingress_available_services_tags_rules() {
        let text = format!(
            "{ZI}availableServices:
- mesh: default
  instances: 2
  tags:
    kuma.io/service: backend
    version: v1
- mesh: default
  tags:
    version: v2
- mesh: default
  tags:
    kuma.io/service: ok
    bad key: x
    good: \"bad value\"
    empty: \"\"
    number: 1
- mesh: default
"
        );
        let e = zi_err(&text);
        let d = error_at(&e, "availableServices[1].tags");
        assert_eq!(d.message, "mandatory tag \"kuma.io/service\" is missing");
        assert_eq!(at(d), (Some(17), Some(3)));
        let d = error_at(&e, "availableServices[2].tags[\"bad key\"]");
        assert!(d.message.starts_with("tag name must consist"), "{d}");
        assert_eq!(at(d), (Some(22), Some(5)));
        let d = error_at(&e, "availableServices[2].tags.good");
        assert!(d.message.starts_with("tag value must consist"), "{d}");
        assert_eq!(at(d), (Some(23), Some(11)));
        error_at(&e, "availableServices[2].tags.empty");
        error_at(&e, "availableServices[2].tags.number");
        error_at(&e, "availableServices[3].tags");
        assert_eq!(e.errors().count(), 6, "{e}");
        // Still reported as ignored.
        assert!(e.diagnostics.iter().any(|d| d.path == "availableServices" && d.severity == Severity::Warning && d.message.contains("ignored")));
    }

    #[test]
    fn zone_ingress_control_plane_fields_warn() {
        let text = format!(
            "{ZI}zone: east\navailableServices:\n- mesh: default\n  instances: 1\n  tags:\n    \
             kuma.io/service: backend\n"
        );
        let loaded = zi(&text);
        let d = warning_at(&loaded.warnings, "zone");
        assert_eq!(at(d), (Some(10), Some(1)));
        assert!(d.message.contains("ignored"));
        let d = warning_at(&loaded.warnings, "availableServices");
        assert!(d.message.contains("recomputed"), "{d}");
        assert_eq!(loaded.warnings.len(), 2);
    }

    #[test]
    fn zone_ingress_without_advertised_coordinates_warns_loudly() {
        let text = ZI.replace("  advertisedAddress: 203.0.113.7\n  advertisedPort: 10001\n", "");
        let loaded = zi(&text);
        assert_eq!(loaded.value.advertised(), None);
        let d = warning_at(&loaded.warnings, "networking");
        assert!(d.message.contains("other zones will not send"), "{d}");
        assert!(d.message.contains("5157"), "{d}");
        assert_eq!(at(d), (Some(3), Some(1)));
    }

    #[test]
    fn zone_ingress_unknown_keys_warn_with_path_and_hint() {
        let text = ZI
            .replace("  advertisedPort: 10001\n", "  advertisedPort: 10001\n  adress: 1.2.3.4\n")
            .replace("    port: 9901\n", "    port: 9901\n    bind: x\n")
            + "mesh: default\nlabels:\n  a: b\ncreationTime: x\n";
        let loaded = zi(&text);
        let d = warning_at(&loaded.warnings, "networking.adress");
        assert_eq!(at(d), (Some(8), Some(3)));
        assert!(d.message.contains("did you mean `address`?"), "{d}");
        warning_at(&loaded.warnings, "networking.admin.bind");
        warning_at(&loaded.warnings, "mesh");
        // kumactl's metadata keys are known.
        assert_eq!(loaded.warnings.len(), 3, "{:#?}", loaded.warnings);
    }

    #[test]
    fn zone_ingress_reports_every_problem_at_once() {
        let text = "\
type: ZoneIngress
networking:
  address: ingress.internal
  port: abc
  advertisedPort: 70000
  admin:
    port: -3
  adress: typo
";
        let e = zi_err(text);
        let lines: Vec<String> = e.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "zi.yaml:1:1: name: is required",
                "zi.yaml:3:12: networking.address: must be an IP address, not the DNS name \
                 `ingress.internal`: the listener binds to it and zone-ingress does not resolve \
                 names",
                "zi.yaml:4:9: networking.port: must be an integer, got string \"abc\"",
                // The invalid advertisedPort counts as set, so the address is missing.
                "zi.yaml:5:3: networking.advertisedAddress: has to be defined with \
                 advertisedPort",
                "zi.yaml:5:19: networking.advertisedPort: port must be in the range [1, 65535]",
                "zi.yaml:7:11: networking.admin.port: port must be in the range [1, 65535]",
                "zi.yaml:8:3: warning: networking.adress: unknown field, ignored (did you mean \
                 `address`?)",
            ]
        );
        assert_eq!(e.to_string(), lines.join("\n"));
        assert_eq!(e.errors().count(), 6);
    }

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
    fn zone_ingress_single_document_only() {
        let e = zi_err(&format!("{ZI}---\n{ZI}"));
        let d = only_error(&e, "");
        assert!(d.message.contains("single ZoneIngress"));
        assert_eq!(d.line, Some(11));
        // A trailing `---` (an empty document) is fine.
        zi(&format!("---\n{ZI}---\n"));
    }

    #[test]
    fn zone_ingress_empty_or_not_a_mapping() {
        let e = zi_err("");
        assert!(only_error(&e, "").message.contains("empty"));
        let e = zi_err("# only a comment\n");
        only_error(&e, "");
        let e = zi_err("- a\n- b\n");
        assert!(only_error(&e, "").message.contains("got a list"));
    }

    // ---- `{{ var }}` substitution -------------------------------------------------------------

    #[test]
    fn vars_are_substituted() {
        let text = fs::read_to_string(fixture("zoneingress-template.yaml")).expect("fixture");
        let loaded =
            parse_zone_ingress(Path::new("t.yaml"), &text, &vars(&[("name", "zi-east-2"), ("address", "198.18.0.6"), ("port", "10001"), ("unused", "x")]))
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

    #[test]
    fn zone_ingress_fixture_loads() {
        let loaded = load_zone_ingress(&fixture("zoneingress.yaml"), &no_vars()).expect("valid");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.value.name, "zi-east-1");
        assert_eq!(loaded.value.advertised(), Some(("zi.east.example.com", 10001)));
    }

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

    // ---- Inventory: forms ---------------------------------------------------------------------

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
        let text =
            format!("---\n{}---\n{}---\ntype: MeshService\nname: s\nmesh: default\n---\n", dp("a", "198.18.1.1", inbound), dp("b", "198.18.1.2", inbound),);
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

    // ---- Inventory: rules ---------------------------------------------------------------------

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
        let eps: Vec<String> = loaded.value.dataplanes.iter().flat_map(|d| d.inbounds.iter().map(|i| i.endpoint.to_string())).collect();
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

    #[test]
    fn inventory_syntax_error_keeps_earlier_documents_checked() {
        let bad = dp("a", "198.18.1.1", "  - {port: 0, tags: {kuma.io/service: s}}\n");
        let e = inv_err(&format!("{bad}---\nname: [\n"));
        assert_eq!(e.diagnostics.len(), 2, "{e}");
        error_at(&e, "networking.inbound[0].port");
        assert!(e.diagnostics.iter().any(|d| d.message.starts_with("invalid YAML") && d.line == Some(10)));
    }

    // ---- internals ----------------------------------------------------------------------------

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
            let _ = parse_zone_ingress(Path::new("x"), text, &no_vars());
            let _ = parse_inventory(Path::new("x"), text);
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
