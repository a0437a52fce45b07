//! The `ZoneIngress` resource file (format: `docs/design.md#routing`): where the ingress listens
//! and what other zones are told to dial.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use serde::Serialize;
use serde_yaml::{Mapping, Value};

use super::{
    check::{Checker, Got, Host, Need, Where, Zero, child_path, describe, get, index_path},
    diagnostic::{ConfigError, Loaded, Severity, finish, read_text, whole_file},
    kube,
    template::substitute,
    yaml::{Single, parse_substituted},
};
use crate::sni::SERVICE_TAG;

/// Admin port used when `networking.admin.port` is absent or 0 (the control plane's default).
pub const DEFAULT_ADMIN_PORT: u16 = 9901;

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

    /// The admin listener's socket address (`address:admin_port`, `docs/design.md#routing`).
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
pub fn parse_zone_ingress(
    file: &Path,
    text: &str,
    vars: &BTreeMap<String, String>,
) -> Result<Loaded<ZoneIngress>, ConfigError> {
    let mut diags = Vec::new();
    let Some((text, posmap)) = substitute(file, text, vars, &mut diags) else {
        return finish(None, diags);
    };
    let parsed = parse_substituted(file, &text, posmap, &mut diags);
    let value = match parsed.single(file, &mut diags, "ZoneIngress") {
        Single::Found(i, doc) => check_zone_ingress(&mut parsed.checker(file, i, &mut diags), doc),
        Single::Broken => None,
        Single::Empty => {
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

/// Top-level keys of the Kubernetes form.
const KUBE_KEYS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "mesh", "status"];
/// Keys of its `spec`.
const KUBE_SPEC_KEYS: &[&str] = &["networking", "zone", "availableServices"];

fn check_zone_ingress(ck: &mut Checker<'_>, root: &Value) -> Option<ZoneIngress> {
    let Value::Mapping(map) = root else {
        ck.error("", Where::Value(""), format!("expected a ZoneIngress resource (a mapping), got {}", describe(root)));
        return None;
    };
    // The Kubernetes form: name under `metadata`, the rest under `spec`.
    let (name, spec, base) = if kube::is_kube(map) {
        ck.unknown_keys(map, "", KUBE_KEYS);
        let kind = kube::kind(ck, map, "");
        if let Some(kind) = kind.filter(|k| *k != "ZoneIngress") {
            ck.error("kind", Where::Value("kind"), format!("must be `ZoneIngress`, got {kind:?}"));
        }
        if let Err(message) = kube::api_version(map) {
            ck.error("apiVersion", Where::Value("apiVersion"), message);
        }
        let name = kube::metadata(ck, map, "").name;
        let spec = ck.mapping(map, "", "spec", Need::Required).ok()?;
        ck.unknown_keys(spec, "spec", KUBE_SPEC_KEYS);
        (name, spec, "spec")
    } else {
        ck.unknown_keys(map, "", ZONE_INGRESS_KEYS);
        ck.resource_type(map, "", "ZoneIngress");
        (ck.string(map, "", "name", Need::Required).ok(), map, "")
    };

    let zone = child_path(base, "zone");
    if get(spec, "zone").is_some() {
        ck.warn(
            &zone,
            Where::Key(&zone),
            "ignored: `zone` is written by the control plane (empty in the ingress's own zone)",
        );
    }
    let available = child_path(base, "availableServices");
    if let Some(services) = get(spec, "availableServices") {
        ck.warn(
            &available,
            Where::Key(&available),
            "ignored: `availableServices` is written by the control plane and recomputed from the \
             Dataplane inventory",
        );
        check_available_services(ck, services, &available);
    }

    let networking = ck.mapping(spec, base, "networking", Need::Required).ok()?;
    let net = &child_path(base, "networking");
    ck.unknown_keys(networking, net, ZONE_INGRESS_NETWORKING_KEYS);

    let address = bind_address(ck, networking, net);
    let port = ck.port(networking, net, "port", Need::Required, Zero::Invalid);
    let advertised_address = ck.address(networking, net, "advertisedAddress", Need::Optional);
    let advertised_port = ck.port(networking, net, "advertisedPort", Need::Optional, Zero::Unset);
    check_advertised_pair(ck, net, &advertised_address, &advertised_port);
    let admin_port = admin_port(ck, networking, net, &port, &advertised_address, &advertised_port);

    let advertised_address = match advertised_address {
        Got::Value(host) => Some(host.to_string()),
        _ => None,
    };
    Some(ZoneIngress {
        name: name?,
        address: address?,
        port: port.ok()?,
        advertised_address,
        advertised_port: advertised_port.ok(),
        admin_port: admin_port?,
    })
}

/// `networking.address`: an IP literal, since the listeners bind to it.
fn bind_address(ck: &mut Checker<'_>, networking: &Mapping, net: &str) -> Option<IpAddr> {
    let path = child_path(net, "address");
    match ck.address(networking, net, "address", Need::Required) {
        Got::Value(Host::Ip(ip)) => Some(ip),
        Got::Value(Host::Name(name)) => {
            ck.error(
                &path,
                Where::Value(&path),
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

fn check_advertised_pair(ck: &mut Checker<'_>, net: &str, address: &Got<Host>, port: &Got<u16>) {
    let (address_path, port_path) = (child_path(net, "advertisedAddress"), child_path(net, "advertisedPort"));
    // Kuma's rule: both or neither; the error sits on the missing one's name but we point at the
    // one that is present, which is where the operator has to look.
    match (address, port) {
        (Got::Absent, Got::Absent) => ck.warn(
            net,
            Where::Key(net),
            "advertisedAddress and advertisedPort are not set: other zones will not send any \
             traffic to this ingress (clients skip ingresses without both; kumahq/kuma#5157)",
        ),
        (Got::Absent, _) => {
            ck.error(&address_path, Where::Key(&port_path), "has to be defined with advertisedPort");
        }
        (_, Got::Absent) => {
            ck.error(&port_path, Where::Key(&address_path), "has to be defined with advertisedAddress");
        }
        _ => {}
    }
}

/// `networking.admin.port` (default [`DEFAULT_ADMIN_PORT`]) and its clashes with the other ports.
fn admin_port(
    ck: &mut Checker<'_>,
    networking: &Mapping,
    net: &str,
    port: &Got<u16>,
    advertised_address: &Got<Host>,
    advertised_port: &Got<u16>,
) -> Option<u16> {
    let admin_path = child_path(net, "admin");
    let admin_port_path = child_path(&admin_path, "port");
    let admin_port = match ck.mapping(networking, net, "admin", Need::Optional) {
        Got::Value(admin) => {
            ck.unknown_keys(admin, &admin_path, &["port"]);
            ck.port(admin, &admin_path, "port", Need::Optional, Zero::Unset)
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
        // `networking.address` too (`docs/design.md#routing`), so the two ports clash on any
        // address.
        if *port == admin {
            if explicit {
                ck.error(&admin_port_path, Where::Value(&admin_port_path), "must differ from port");
            } else {
                let port_path = child_path(net, "port");
                ck.error(
                    &port_path,
                    Where::Value(&port_path),
                    format!(
                        "must differ from the default admin port {DEFAULT_ADMIN_PORT}; set \
                         networking.admin.port to another port"
                    ),
                );
            }
        }
    }
    if let (Got::Value(Host::Ip(ip)), Got::Value(adv_port), Some((admin, true))) =
        (advertised_address, advertised_port, admin_port)
        && ip.is_loopback()
        && *adv_port == admin
    {
        ck.error(&admin_port_path, Where::Value(&admin_port_path), "must differ from advertisedPort");
    }
    admin_port.map(|(port, _)| port)
}

/// Kuma's rules for `availableServices[i].tags`. The values are ignored, but the control plane
/// would reject the resource, so an operator copying one around should hear about it.
fn check_available_services(ck: &mut Checker<'_>, services: &Value, base: &str) {
    let Value::Sequence(items) = services else {
        ck.error(base, Where::Value(base), format!("must be a list, got {}", describe(services)));
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let path = index_path(base, i);
        let Value::Mapping(item) = item else {
            ck.error(&path, Where::Value(&path), format!("must be a mapping, got {}", describe(item)));
            continue;
        };
        match get(item, "tags") {
            Some(tags) => {
                ck.tags(tags, &child_path(&path, "tags"));
            }
            None => ck.error(
                &child_path(&path, "tags"),
                Where::Parent(&path),
                format!("mandatory tag \"{SERVICE_TAG}\" is missing"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_util::*;

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
        assert!(e.diagnostics.iter().any(|d| d.path == "availableServices"
            && d.severity == Severity::Warning
            && d.message.contains("ignored")));
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

    #[test]
    fn zone_ingress_fixture_loads() {
        let loaded = load_zone_ingress(&fixture("zoneingress.yaml"), &no_vars()).expect("valid");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.value.name, "zi-east-1");
        assert_eq!(loaded.value.advertised(), Some(("zi.east.example.com", 10001)));
    }

    /// A ZoneIngress as `kubectl get zoneingress -o yaml` prints it.
    const KUBE_ZI: &str = "\
apiVersion: kuma.io/v1alpha1
kind: ZoneIngress
metadata:
  name: zi-east-1
  namespace: kuma-system
  labels: {kuma.io/zone: east}
  resourceVersion: \"42\"
spec:
  networking:
    address: 198.18.0.5
    port: 10001
    advertisedAddress: 203.0.113.7
    advertisedPort: 10001
    admin:
      port: 9901
";

    #[test]
    fn kubernetes_zone_ingress_is_read_with_kumas_name() {
        let loaded = zi(KUBE_ZI);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let z = loaded.value;
        assert_eq!(z.name, "zi-east-1.kuma-system");
        assert_eq!(z.listen_addr(), "198.18.0.5:10001".parse().expect("addr"));
        assert_eq!(z.advertised(), Some(("203.0.113.7", 10001)));
        assert_eq!(z.admin_port, 9901);
        // The same as the Universal form apart from the name.
        assert_eq!(ZoneIngress { name: "zi-east-1".into(), ..z }, zi(ZI).value);
        // Templates work on it too.
        let template = KUBE_ZI.replace("name: zi-east-1", "name: \"{{ name }}\"");
        let loaded = parse_zone_ingress(Path::new("zi.yaml"), &template, &vars(&[("name", "zi-2")])).expect("valid");
        assert_eq!(loaded.value.name, "zi-2.kuma-system");
    }

    #[test]
    fn kubernetes_zone_ingress_problems_are_errors_at_their_place() {
        let e = zi_err(&KUBE_ZI.replace("port: 10001\n    advertisedAddress", "port: 0\n    advertisedAddress"));
        let d = only_error(&e, "spec.networking.port");
        assert_eq!(at(&d), (Some(11), Some(11)));
        let e = zi_err(&KUBE_ZI.replace("  name: zi-east-1\n", ""));
        only_error(&e, "metadata.name");
        let e = zi_err(&KUBE_ZI.replace("kind: ZoneIngress", "kind: Dataplane"));
        assert_eq!(only_error(&e, "kind").message, "must be `ZoneIngress`, got \"Dataplane\"");
        let e = zi_err(&KUBE_ZI.replace("kuma.io/v1alpha1", "v1"));
        only_error(&e, "apiVersion");
        let head = &KUBE_ZI[..KUBE_ZI.find("spec:").expect("spec")];
        only_error(&zi_err(head), "spec");
        // Fields the control plane writes, and misspellings, are warnings as in the Universal form.
        let loaded = zi(&format!("{KUBE_ZI}  zone: east\n  availableService: []\n"));
        warning_at(&loaded.warnings, "spec.zone");
        assert!(warning_at(&loaded.warnings, "spec.availableService").message.contains("availableServices"));
    }
}
