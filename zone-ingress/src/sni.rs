//! The two SNI formats a Kuma 2.x ZoneIngress serves (docs/design.md#sni-formats): the legacy tag format
//! `service{key=value,...}` and the hashed resource format `a<hash>.<name>.<port>.<mesh>.<type>`.
//!
//! Both sides of a cross-zone connection derive the SNI independently from the same data, so the
//! functions here must reproduce Kuma's strings byte for byte (Kuma source:
//! `pkg/xds/envoy/tls/sni.go`). Nothing is normalised: tag values may contain upper case and the
//! router compares whole strings.

use std::{collections::BTreeMap, fmt};

use thiserror::Error;

/// The tag that names a service; it is the part before `{` in a legacy SNI, never a pair inside.
pub const SERVICE_TAG: &str = "kuma.io/service";

/// The pseudo-tag every legacy SNI produced by Kuma carries inside its braces.
pub const MESH_TAG: &str = "mesh";

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Longest name or mesh kept verbatim in a resource SNI; longer ones are cut to this many bytes
/// and marked with a trailing `x` (docs/design.md#sni-formats), so the label stays within DNS's 63 bytes.
const MAX_RESOURCE_LABEL: usize = 62;

/// FNV-1a 64 over `bytes` (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`).
#[must_use]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// The resource type suffix of a hashed SNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// `ms`: a MeshService.
    Ms,
    /// `mzms`: a MeshMultiZoneService.
    Mzms,
    /// `mes`: a MeshExternalService. Never served by an ingress; listed so the format is complete
    /// and such SNIs can be recognised in logs.
    Mes,
}

impl ResourceKind {
    /// The suffix as it appears at the end of the SNI.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ms => "ms",
            Self::Mzms => "mzms",
            Self::Mes => "mes",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hashed SNI of a MeshService / MeshMultiZoneService port (docs/design.md#sni-formats):
/// `"a" + hex16(fnv1a64(name ";" mesh ";")) + "." + name' + "." + port + "." + mesh' + "." + kind`,
/// where `name'`/`mesh'` are cut to 62 bytes plus `x` when longer.
#[must_use]
pub fn mesh_service_sni(name: &str, mesh: &str, port: u16, kind: ResourceKind) -> String {
    resource_sni(name, mesh, port, kind, "")
}

/// [`mesh_service_sni`] with Kuma's optional data part in the hash input (`name;mesh;data`).
///
/// No current Kuma producer passes data; this exists so the upstream test vectors that use it can
/// be checked. An empty `data` gives exactly [`mesh_service_sni`].
#[must_use]
pub fn resource_sni(name: &str, mesh: &str, port: u16, kind: ResourceKind, optional_data: &str) -> String {
    // The hash covers the *full* name and mesh, so two long names sharing a 62-byte prefix still
    // get different SNIs.
    let mut input = Vec::with_capacity(name.len() + mesh.len() + optional_data.len() + 2);
    input.extend_from_slice(name.as_bytes());
    input.push(b';');
    input.extend_from_slice(mesh.as_bytes());
    input.push(b';');
    input.extend_from_slice(optional_data.as_bytes());
    let hash = fnv1a64(&input);
    format!("a{hash:016x}.{}.{port}.{}.{kind}", truncate_label(name), truncate_label(mesh))
}

/// Kuma cuts at byte 62 (Go slicing). Names are DNS labels in practice, so this is a char
/// boundary; for a non-ASCII name we back off to the previous boundary instead of producing
/// invalid UTF-8 (such a name cannot be a MeshService name, so no Kuma SNI is lost).
fn truncate_label(label: &str) -> String {
    if label.len() <= MAX_RESOURCE_LABEL {
        return label.to_owned();
    }
    let mut cut = MAX_RESOURCE_LABEL;
    while !label.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + 1);
    out.push_str(&label[..cut]);
    out.push('x');
    out
}

/// The legacy tag SNI (docs/design.md#sni-formats): `service{k1=v1,k2=v2}` with all `tags` except
/// `kuma.io/service`, sorted by key in byte order; just `service` when no pair remains.
///
/// `tags` should include `mesh` for anything a client would send; it is not required here
/// because Kuma's own formatter does not require it either.
#[must_use]
pub fn legacy_sni(service: &str, tags: &BTreeMap<String, String>) -> String {
    let mut out = String::from(service);
    // BTreeMap<String, _> iterates in byte order of the keys, which is Kuma's sort order.
    let mut pairs = tags.iter().filter(|(k, _)| k.as_str() != SERVICE_TAG);
    if let Some((k, v)) = pairs.next() {
        out.push('{');
        push_pair(&mut out, k, v);
        for (k, v) in pairs {
            out.push(',');
            push_pair(&mut out, k, v);
        }
        out.push('}');
    }
    out
}

fn push_pair(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push('=');
    out.push_str(value);
}

/// A decoded legacy SNI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacySni {
    /// The `kuma.io/service` value (the part before `{`).
    pub service: String,
    /// The pairs inside the braces, including `mesh`.
    pub tags: BTreeMap<String, String>,
}

impl LegacySni {
    /// The `mesh` pair, if present (always present after [`parse_legacy`]).
    #[must_use]
    pub fn mesh(&self) -> Option<&str> {
        self.tags.get(MESH_TAG).map(String::as_str)
    }

    /// The pairs that select a subset of the service's endpoints: every tag except `mesh`.
    pub fn subset_tags(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tags.iter().filter(|(k, _)| k.as_str() != MESH_TAG).map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl fmt::Display for LegacySni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&legacy_sni(&self.service, &self.tags))
    }
}

/// Why a string is not an acceptable legacy SNI.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SniError {
    /// The service part before `{` (or the whole name) is empty.
    #[error("empty service name")]
    EmptyService,
    /// A `{` without the matching `}` at the very end.
    #[error("`{{` is not closed by a `}}` at the end of the name")]
    Unclosed,
    /// `{` or `}` somewhere other than the one pair of braces.
    #[error("unexpected `{ch}` at byte {at}")]
    UnexpectedBrace {
        /// The offending character.
        ch: char,
        /// Its byte offset in the SNI.
        at: usize,
    },
    /// `service{}`.
    #[error("no tags between the braces")]
    EmptyTags,
    /// A pair without `=`.
    #[error("tag `{0}` has no `=`")]
    MissingEquals(String),
    /// `=value` or `,,`.
    #[error("empty tag key")]
    EmptyKey,
    /// `key=`.
    #[error("tag `{0}` has an empty value")]
    EmptyValue(String),
    /// A character outside the tag charset (keys `[A-Za-z0-9.-_:/]`, values `[A-Za-z0-9.-_:]`).
    #[error("invalid character {ch:?} in {what} `{text}`")]
    InvalidChar {
        /// `service`, `tag key` or `tag value`.
        what: &'static str,
        /// The offending part.
        text: String,
        /// The first character that is not allowed.
        ch: char,
    },
    /// The same key twice.
    #[error("tag `{0}` appears more than once")]
    DuplicateKey(String),
    /// No `mesh=` pair: Kuma never produces such an SNI for an ingress.
    #[error("no `mesh` tag")]
    MissingMesh,
    /// `kuma.io/service` inside the braces: Kuma puts the service before `{` only.
    #[error("`kuma.io/service` must not appear inside the braces")]
    ServiceTagInBraces,
    /// Well formed but not in Kuma's canonical (sorted) form.
    #[error("not canonical: Kuma would send `{canonical}`")]
    NotCanonical {
        /// The canonical spelling of the same tags.
        canonical: String,
    },
}

impl SniError {
    /// Whether the error is about syntax (the string is not a tag SNI at all) rather than a
    /// well-formed tag SNI that Kuma would never produce.
    #[must_use]
    pub fn is_syntax(&self) -> bool {
        !matches!(
            self,
            Self::DuplicateKey(_) | Self::MissingMesh | Self::ServiceTagInBraces | Self::NotCanonical { .. }
        )
    }
}

/// Decode a legacy SNI syntactically, as Kuma's `TagsFromSNI` does: no `mesh` requirement and no
/// ordering check. Use [`parse_legacy`] to decide whether an ingress may route it.
///
/// # Errors
/// Any syntax problem: unbalanced or nested braces, a pair without `=`, empty keys or values,
/// characters outside the tag charset, duplicate keys.
pub fn parse_legacy_tags(sni: &str) -> Result<LegacySni, SniError> {
    let (service, rest) = match sni.find('{') {
        Some(at) => (&sni[..at], Some((at, &sni[at + 1..]))),
        None => (sni, None),
    };
    if let Some(at) = service.find('}') {
        return Err(SniError::UnexpectedBrace { ch: '}', at });
    }
    check_charset("service", service, is_value_char)?;
    let mut tags = BTreeMap::new();
    let Some((open, rest)) = rest else {
        return Ok(LegacySni { service: service.to_owned(), tags });
    };
    let Some(inner) = rest.strip_suffix('}') else {
        return Err(match rest.find(['{', '}']) {
            Some(i) => SniError::UnexpectedBrace { ch: char::from(rest.as_bytes()[i]), at: open + 1 + i },
            None => SniError::Unclosed,
        });
    };
    if let Some(i) = inner.find(['{', '}']) {
        return Err(SniError::UnexpectedBrace { ch: char::from(inner.as_bytes()[i]), at: open + 1 + i });
    }
    if inner.is_empty() {
        return Err(SniError::EmptyTags);
    }
    for pair in inner.split(',') {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(if pair.is_empty() { SniError::EmptyKey } else { SniError::MissingEquals(pair.to_owned()) });
        };
        if key.is_empty() {
            return Err(SniError::EmptyKey);
        }
        if value.is_empty() {
            return Err(SniError::EmptyValue(key.to_owned()));
        }
        check_charset("tag key", key, is_key_char)?;
        // `*` is the selector wildcard (docs/design.md#sni-formats); it is a whole value, never part of one.
        if value != "*" {
            check_charset("tag value", value, is_value_char)?;
        }
        if tags.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(SniError::DuplicateKey(key.to_owned()));
        }
    }
    Ok(LegacySni { service: service.to_owned(), tags })
}

/// Decode a legacy SNI and enforce the canonical rule (docs/design.md#sni-formats): it must carry `mesh`,
/// must not carry `kuma.io/service` inside the braces, and re-serialising it with sorted keys must
/// give the input byte for byte. Kuma has a filter chain only for canonical names, so anything
/// else must be rejected rather than "fixed".
///
/// # Errors
/// Everything [`parse_legacy_tags`] rejects, plus [`SniError::MissingMesh`],
/// [`SniError::ServiceTagInBraces`] and [`SniError::NotCanonical`].
pub fn parse_legacy(sni: &str) -> Result<LegacySni, SniError> {
    let parsed = parse_legacy_tags(sni)?;
    if parsed.tags.contains_key(SERVICE_TAG) {
        return Err(SniError::ServiceTagInBraces);
    }
    if !parsed.tags.contains_key(MESH_TAG) {
        return Err(SniError::MissingMesh);
    }
    let canonical = parsed.to_string();
    if canonical != sni {
        return Err(SniError::NotCanonical { canonical });
    }
    Ok(parsed)
}

/// Tag keys: `[A-Za-z0-9.\-_:/]` (Kuma's tag key charset).
#[must_use]
pub fn is_key_char(c: char) -> bool {
    is_value_char(c) || c == '/'
}

/// Tag values and service names: `[A-Za-z0-9.\-_:]` (Kuma's tag value charset).
#[must_use]
pub fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')
}

fn check_charset(what: &'static str, text: &str, ok: fn(char) -> bool) -> Result<(), SniError> {
    if text.is_empty() && what == "service" {
        return Err(SniError::EmptyService);
    }
    match text.chars().find(|&c| !ok(c)) {
        Some(ch) => Err(SniError::InvalidChar { what, text: text.to_owned(), ch }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn fnv_primitive() {
        // Standard FNV-1a-64 test values.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(format!("{:016x}", fnv1a64(b"a")), "af63dc4c8601ec8c");
    }

    #[test]
    fn hash_vector_backend_demo_ms() {
        assert_eq!(
            mesh_service_sni("backend", "demo", 8080, ResourceKind::Ms),
            "ae10a8071b8a8eeb8.backend.8080.demo.ms"
        );
    }

    #[test]
    fn hash_vector_backend_demo_mzms_shares_hash() {
        assert_eq!(
            mesh_service_sni("backend", "demo", 8080, ResourceKind::Mzms),
            "ae10a8071b8a8eeb8.backend.8080.demo.mzms"
        );
    }

    #[test]
    fn hash_vector_backend_default() {
        assert_eq!(
            mesh_service_sni("backend", "default", 80, ResourceKind::Ms),
            "a601e0c00295a9fbe.backend.80.default.ms"
        );
    }

    #[test]
    fn hash_vector_backend2_default() {
        assert_eq!(
            mesh_service_sni("backend2", "default", 80, ResourceKind::Ms),
            "aec60634adf0f45d6.backend2.80.default.ms"
        );
    }

    #[test]
    fn hash_vector_multi_backend_mzms() {
        assert_eq!(
            mesh_service_sni("multi-backend", "default", 80, ResourceKind::Mzms),
            "a6844c35bc637ba96.multi-backend.80.default.mzms"
        );
    }

    #[test]
    fn hash_vector_test_server_envoyconfig() {
        assert_eq!(
            mesh_service_sni("test-server", "envoyconfig", 80, ResourceKind::Ms),
            "a029781856823048e.test-server.80.envoyconfig.ms"
        );
    }

    #[test]
    fn hash_vector_kubernetes_name_with_dot() {
        assert_eq!(
            mesh_service_sni("redis.kuma-demo", "default", 6379, ResourceKind::Ms),
            "a64067518fe826e27.redis.kuma-demo.6379.default.ms"
        );
    }

    #[test]
    fn hash_vector_truncated_name() {
        let name = format!("{}-qwe", "a".repeat(62));
        assert_eq!(
            mesh_service_sni(&name, "default", 8080, ResourceKind::Ms),
            format!("a1f6ee52b5dc5a634.{}x.8080.default.ms", "a".repeat(62))
        );
    }

    #[test]
    fn hash_vector_optional_data() {
        assert_eq!(
            resource_sni("backend", "demo", 8080, ResourceKind::Ms, "x=a"),
            "a333a125865a97632.backend.8080.demo.ms"
        );
    }

    #[test]
    fn hash_vector_truncated_name_and_mesh_with_data() {
        let name = format!("{}-qwe", "a".repeat(62));
        let mesh = format!("{}-qwe", "b".repeat(62));
        assert_eq!(
            resource_sni(&name, &mesh, 8080, ResourceKind::Ms, "x=a"),
            format!("a5b91d8a08567bf09.{}x.8080.{}x.ms", "a".repeat(62), "b".repeat(62))
        );
    }

    #[test]
    fn truncation_boundaries() {
        let exactly = "a".repeat(62);
        assert!(mesh_service_sni(&exactly, "m", 1, ResourceKind::Ms).contains(&format!(".{exactly}.1.m.ms")));
        let longer = "a".repeat(63);
        assert!(mesh_service_sni(&longer, "m", 1, ResourceKind::Ms).contains(&format!(".{exactly}x.1.m.ms")));
        // A multi-byte character across byte 62 must not panic.
        let odd = format!("{}é", "a".repeat(61));
        let sni = mesh_service_sni(&odd, "m", 1, ResourceKind::Ms);
        assert!(sni.contains(&format!(".{}x.1.m.ms", "a".repeat(61))));
    }

    #[test]
    fn legacy_vector_without_mesh_round_trips_syntactically() {
        let t = tags(&[
            ("kuma.io/service", "backend"),
            ("app", "backend-app"),
            ("env", "prod"),
            ("region", "eu"),
            ("version", "v1"),
        ]);
        let sni = "backend{app=backend-app,env=prod,region=eu,version=v1}";
        assert_eq!(legacy_sni("backend", &t), sni);
        let parsed = parse_legacy_tags(sni).expect("parses");
        assert_eq!(parsed.service, "backend");
        assert_eq!(parsed.tags.len(), 4);
        assert_eq!(parsed.to_string(), sni);
        // Kuma never sends a tag SNI without `mesh` to an ingress.
        assert_eq!(parse_legacy(sni), Err(SniError::MissingMesh));
    }

    #[test]
    fn legacy_vector_instance_mesh1() {
        let sni = "backend{kuma.io/instance=ins-0,mesh=mesh1}";
        let t = tags(&[("kuma.io/instance", "ins-0"), ("mesh", "mesh1")]);
        assert_eq!(legacy_sni("backend", &t), sni);
        let parsed = parse_legacy(sni).expect("canonical");
        assert_eq!(parsed.service, "backend");
        assert_eq!(parsed.mesh(), Some("mesh1"));
        assert_eq!(parsed.tags, t);
    }

    #[test]
    fn legacy_vector_frontend_mesh2() {
        let sni = "frontend{cloud=gke,mesh=mesh2,region=eu}";
        let t = tags(&[("cloud", "gke"), ("mesh", "mesh2"), ("region", "eu")]);
        assert_eq!(legacy_sni("frontend", &t), sni);
        let parsed = parse_legacy(sni).expect("canonical");
        assert_eq!(parsed.tags, t);
        assert_eq!(parsed.subset_tags().collect::<Vec<_>>(), vec![("cloud", "gke"), ("region", "eu")]);
    }

    #[test]
    fn legacy_vector_gateway_mesh_only() {
        let sni = "mesh-gateway{mesh=mesh2}";
        assert_eq!(legacy_sni("mesh-gateway", &tags(&[("mesh", "mesh2")])), sni);
        let parsed = parse_legacy(sni).expect("canonical");
        assert_eq!(parsed.service, "mesh-gateway");
        assert_eq!(parsed.subset_tags().count(), 0);
    }

    #[test]
    fn legacy_error_unclosed() {
        assert_eq!(parse_legacy_tags("backend{"), Err(SniError::Unclosed));
        assert!(parse_legacy("backend{").is_err());
    }

    #[test]
    fn legacy_error_nested_brace() {
        let err = parse_legacy_tags("backend{mesh=default{mesh").expect_err("invalid");
        assert!(matches!(err, SniError::UnexpectedBrace { ch: '{', at: 20 }));
        assert!(err.is_syntax());
        assert!(parse_legacy("backend{mesh=default{mesh").is_err());
    }

    #[test]
    fn legacy_rejects_non_canonical_order() {
        assert_eq!(
            parse_legacy("backend{version=v1,mesh=default}"),
            Err(SniError::NotCanonical { canonical: "backend{mesh=default,version=v1}".to_owned() })
        );
    }

    #[test]
    fn legacy_rejects_service_tag_inside() {
        assert_eq!(parse_legacy("backend{kuma.io/service=backend,mesh=default}"), Err(SniError::ServiceTagInBraces));
    }

    #[test]
    fn legacy_rejects_duplicate_key() {
        let err = parse_legacy("backend{mesh=default,mesh=default}").expect_err("dup");
        assert_eq!(err, SniError::DuplicateKey("mesh".to_owned()));
        assert!(!err.is_syntax());
    }

    #[test]
    fn legacy_rejects_missing_mesh_and_bare_name() {
        assert_eq!(parse_legacy("backend{version=v1}"), Err(SniError::MissingMesh));
        assert_eq!(parse_legacy("backend"), Err(SniError::MissingMesh));
    }

    #[test]
    fn legacy_rejects_empty_parts() {
        assert_eq!(parse_legacy_tags(""), Err(SniError::EmptyService));
        assert_eq!(parse_legacy_tags("{mesh=default}"), Err(SniError::EmptyService));
        assert_eq!(parse_legacy_tags("backend{}"), Err(SniError::EmptyTags));
        assert_eq!(parse_legacy_tags("backend{=x,mesh=default}"), Err(SniError::EmptyKey));
        assert_eq!(parse_legacy_tags("backend{mesh=default,,a=b}"), Err(SniError::EmptyKey));
        assert_eq!(parse_legacy_tags("backend{mesh=}"), Err(SniError::EmptyValue("mesh".to_owned())));
        assert_eq!(parse_legacy_tags("backend{mesh}"), Err(SniError::MissingEquals("mesh".to_owned())));
    }

    #[test]
    fn legacy_rejects_bad_chars() {
        for sni in [
            "back end{mesh=default}",
            "backend{mesh=default,v=a/b}",
            "backend{mesh=default,k y=v}",
            "backend{mesh=default,v=a=b}",
            "backend{mesh=default}x",
            "back}end{mesh=default}",
            "backend{mesh=d\0}",
            "backend{mesh=défaut}",
        ] {
            let err = parse_legacy(sni).expect_err(sni);
            assert!(err.is_syntax(), "{sni}: {err}");
        }
    }

    #[test]
    fn legacy_accepts_slash_colon_upper_case_and_wildcard() {
        let sni = "backend_kuma-demo_svc_8080{k8s.kuma.io/service-port=8080,mesh=default,version=*,zone=EU:1}";
        let parsed = parse_legacy(sni).expect("canonical");
        assert_eq!(parsed.service, "backend_kuma-demo_svc_8080");
        assert_eq!(parsed.tags["version"], "*");
        assert_eq!(parsed.tags["zone"], "EU:1");
    }

    #[test]
    fn legacy_sni_skips_service_tag_and_sorts_bytewise() {
        let t = tags(&[("mesh", "default"), ("Zeta", "1"), ("kuma.io/service", "ignored"), ("a", "2")]);
        // Byte order: upper case sorts before lower case.
        assert_eq!(legacy_sni("svc", &t), "svc{Zeta=1,a=2,mesh=default}");
        assert_eq!(legacy_sni("svc", &BTreeMap::new()), "svc");
    }

    #[test]
    fn every_prefix_of_a_tag_sni_has_the_right_answer() {
        let sni = "backend{kuma.io/zone=east,mesh=default,version=v2}";
        for end in 0..=sni.len() {
            let prefix = &sni[..end];
            // A tag SNI needs its `mesh` tag, and an opened tag list must be closed: no proper
            // prefix is one.
            assert_eq!(parse_legacy(prefix).is_ok(), end == sni.len(), "{prefix:?}: {:?}", parse_legacy(prefix));
        }
        for s in ["{", "}", "{}", "}{", "a{b=c}}", "a{{b=c}", "a{b=c,}", "\u{fffd}{"] {
            assert!(parse_legacy(s).is_err(), "{s:?}: {:?}", parse_legacy(s));
        }
    }
}
