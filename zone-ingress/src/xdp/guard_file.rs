//! The XDP guard file (`--xdp-config`): source CIDR lists, the SYN limit, the interfaces.
//!
//! ```yaml
//! allow: [198.18.0.0/16, "2001:2::/48"]   # empty or absent: every source
//! deny: [198.18.66.0/24]                 # longest matching prefix wins across both lists
//! synLimit:                              # absent: no SYN limit
//!   rate: 200                            # SYNs per second per source prefix, per CPU
//!   burst: 400                           # bucket depth (default: rate)
//!   ipv4PrefixLength: 32                 # sources sharing a /32 share a bucket
//!   ipv6PrefixLength: 64
//!   trackedSources: 65536                # LRU capacity (read at start only)
//! interfaces: []                         # default: the interfaces carrying the listener address
//! ```
//!
//! Unknown keys are errors: a misspelt key in a guard would silently leave a hole.
//! The file is parsed and checked with the configuration files' YAML reader and field checker
//! ([`crate::config`]), so its diagnostics carry the file, line:column and field path the same
//! way. Design: `docs/design.md#xdp-guard`.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use zone_ingress_ebpf::prefilter as abi;

use crate::config::{
    ConfigError, Diagnostic, Loaded,
    check::{Checker, Got, Need, Where, describe},
    finish,
    yaml::{Mapping, Single, Value, parse_documents},
};

/// Default `synLimit.ipv4PrefixLength`.
pub const DEFAULT_V4_PREFIX: u8 = 32;
/// Default `synLimit.ipv6PrefixLength`: one customer site or host usually owns a /64.
pub const DEFAULT_V6_PREFIX: u8 = 64;
/// Smallest accepted `synLimit.trackedSources`.
pub const MIN_TRACKED_SOURCES: u32 = 1024;
/// Largest accepted `synLimit.trackedSources` (the map is preallocated per CPU).
pub const MAX_TRACKED_SOURCES: u32 = 1 << 22;
/// Longest interface name (`IFNAMSIZ` − 1).
const MAX_IFNAME: usize = 15;

/// A source prefix: the address with its host bits zero, and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Cidr {
    /// Parses `addr/len` or a bare address (a host prefix). Host bits must be zero.
    ///
    /// # Errors
    /// A message for the diagnostic, with a hint.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr_text, len_text) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR (e.g. 198.18.0.0/15, 2001:2::/48)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len_text {
            None => max,
            Some(l) => match l.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: the prefix length must be a number from 0 to {max}")),
            },
        };
        let masked = mask(addr, prefix_len);
        if masked != addr {
            return Err(format!("{s:?} has host bits set; did you mean {masked}/{prefix_len}?"));
        }
        Ok(Self { addr, prefix_len })
    }

    /// Whether `ip` lies in this prefix.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// The per-source SYN token bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynLimit {
    /// SYNs per second per source prefix, per CPU.
    pub rate: u64,
    /// Bucket depth in SYNs.
    pub burst: u64,
    /// Sources are grouped by these prefix lengths.
    pub ipv4_prefix_len: u8,
    pub ipv6_prefix_len: u8,
    /// Capacity of the LRU map of buckets (read at start only).
    pub tracked_sources: u32,
}

/// A validated guard file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// Allowed source prefixes; empty: every source not denied.
    pub allow: Vec<Cidr>,
    /// Denied source prefixes (the longest match across both lists decides).
    pub deny: Vec<Cidr>,
    /// `None`: no SYN limit.
    pub syn_limit: Option<SynLimit>,
    /// Interfaces to attach to; empty: those carrying the listener address.
    pub interfaces: Vec<String>,
}

impl GuardConfig {
    /// Capacity the SYN bucket map is created with.
    pub(super) fn tracked_sources(&self) -> u32 {
        self.syn_limit.map_or(abi::DEFAULT_TRACKED_SOURCES, |l| l.tracked_sources)
    }
}

/// Reads and validates a guard file; every problem is reported at once.
///
/// # Errors
/// The file cannot be read, is not YAML, or has invalid keys or values.
pub fn load_config(path: &Path) -> Result<Loaded<GuardConfig>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_config(path, &text),
        Err(e) => Err(ConfigError {
            diagnostics: vec![Diagnostic::error(path, "", format!("cannot read the XDP guard file: {e}"))],
        }),
    }
}

/// Validates the text of a guard file (`file` names it in diagnostics).
///
/// # Errors
/// See [`load_config`].
pub fn parse_config(file: &Path, text: &str) -> Result<Loaded<GuardConfig>, ConfigError> {
    let mut diags = Vec::new();
    let parsed = parse_documents(file, text, &mut diags);
    let value = match parsed.single(file, &mut diags, "XDP guard") {
        Single::Found(i, root) => Some(check_guard(&mut parsed.checker(file, i, &mut diags), root)),
        // An empty file (or only comments) guards without lists or limits.
        Single::Empty => Some(GuardConfig::default()),
        Single::Broken => None,
    };
    finish(value, diags)
}

const GUARD_KEYS: &[&str] = &["allow", "deny", "synLimit", "interfaces"];
const SYN_LIMIT_KEYS: &[&str] = &["rate", "burst", "ipv4PrefixLength", "ipv6PrefixLength", "trackedSources"];

fn check_guard(ck: &mut Checker<'_>, root: &Value) -> GuardConfig {
    let mut cfg = GuardConfig::default();
    let Value::Mapping(map) = root else {
        ck.error("", Where::Value(""), format!("the XDP guard file must be a mapping, got {}", describe(root)));
        return cfg;
    };
    ck.closed_keys(map, "", GUARD_KEYS);
    let mut lists: [Vec<(String, Cidr)>; 2] = [Vec::new(), Vec::new()];
    for (list, key) in lists.iter_mut().zip(["allow", "deny"]) {
        for (path, s) in ck.strings(map, "", key) {
            match Cidr::parse(s) {
                Ok(c) => list.push((path, c)),
                Err(m) => ck.error(&path, Where::Value(&path), m),
            }
        }
    }
    cfg.syn_limit = syn_limit(ck, map);
    for (path, name) in ck.strings(map, "", "interfaces") {
        if name.is_empty() || name.len() > MAX_IFNAME || name.contains(['/', ' ', '\0']) {
            ck.error(&path, Where::Value(&path), format!("{name:?} is not an interface name"));
        } else {
            cfg.interfaces.push(name.to_owned());
        }
    }
    let [allow, deny] = lists;
    let mut seen: HashMap<Cidr, String> = HashMap::new();
    for (path, c) in &allow {
        if let Some(first) = seen.insert(*c, path.clone()) {
            ck.warn(path, Where::Value(path), format!("{c} is listed twice (first at {first})"));
        }
    }
    let allowed: HashMap<Cidr, String> = std::mem::take(&mut seen);
    for (path, c) in &deny {
        if let Some(at) = allowed.get(c) {
            ck.error(path, Where::Value(path), format!("{c} is in both allow ({at}) and deny; remove one"));
        } else if let Some(first) = seen.insert(*c, path.clone()) {
            ck.warn(path, Where::Value(path), format!("{c} is listed twice (first at {first})"));
        }
    }
    cfg.allow = dedup(allow);
    cfg.deny = dedup(deny);
    for (v6, name) in [(false, "IPv4"), (true, "IPv6")] {
        let n = cfg.allow.iter().chain(&cfg.deny).filter(|c| c.addr.is_ipv6() == v6).count();
        if n > abi::MAX_CIDRS as usize {
            ck.error("", Where::File, format!("{n} {name} prefixes in allow and deny; at most {} fit", abi::MAX_CIDRS));
        }
    }
    cfg
}

/// `synLimit`: absent or null is no limit; present, it needs a `rate`.
fn syn_limit(ck: &mut Checker<'_>, root: &Mapping) -> Option<SynLimit> {
    const PARENT: &str = "synLimit";
    let Got::Value(map) = ck.mapping(root, "", PARENT, Need::Optional) else {
        return None;
    };
    ck.closed_keys(map, PARENT, SYN_LIMIT_KEYS);
    let mut ok = true;
    let mut number =
        |ck: &mut Checker<'_>, key: &str, min: u64, max: u64| match ck.whole_number(map, PARENT, key, min..=max) {
            Got::Value(n) => Some(n),
            Got::Absent => None,
            Got::Invalid => {
                ok = false;
                None
            }
        };
    let rate = number(ck, "rate", 1, abi::MAX_SYN_RATE);
    let burst = number(ck, "burst", 1, abi::MAX_SYN_BURST);
    let ipv4_prefix_len = number(ck, "ipv4PrefixLength", 1, 32).and_then(|n| u8::try_from(n).ok());
    let ipv6_prefix_len = number(ck, "ipv6PrefixLength", 1, 128).and_then(|n| u8::try_from(n).ok());
    let tracked_sources = number(ck, "trackedSources", u64::from(MIN_TRACKED_SOURCES), u64::from(MAX_TRACKED_SOURCES))
        .and_then(|n| u32::try_from(n).ok());
    let Some(rate) = rate else {
        if ok {
            ck.error(
                PARENT,
                Where::Value(PARENT),
                "missing `rate` (SYNs per second per source); remove `synLimit` to disable the limit",
            );
        }
        return None;
    };
    ok.then_some(SynLimit {
        rate,
        burst: burst.unwrap_or_else(|| rate.min(abi::MAX_SYN_BURST)),
        ipv4_prefix_len: ipv4_prefix_len.unwrap_or(DEFAULT_V4_PREFIX),
        ipv6_prefix_len: ipv6_prefix_len.unwrap_or(DEFAULT_V6_PREFIX),
        tracked_sources: tracked_sources.unwrap_or(abi::DEFAULT_TRACKED_SOURCES),
    })
}

fn dedup(list: Vec<(String, Cidr)>) -> Vec<Cidr> {
    let set: BTreeSet<Cidr> = list.into_iter().map(|(_, c)| c).collect();
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GuardConfig, Vec<Diagnostic>> {
        parse_config(Path::new("guard.yaml"), text).map(|l| l.value).map_err(|e| e.diagnostics)
    }

    #[test]
    fn full_file() {
        let c = parse(
            "allow: [198.18.0.0/15, \"2001:2::/48\"]\ndeny:\n  - 198.18.66.0/24\n  - 2001:2:0:66::/64\nsynLimit:\n  rate: 100\n  ipv6PrefixLength: 56\ninterfaces: [eth0]\n",
        )
        .expect("valid");
        assert_eq!(c.allow.len(), 2);
        assert_eq!(c.deny[0].to_string(), "198.18.66.0/24");
        let l = c.syn_limit.expect("limit");
        assert_eq!((l.rate, l.burst, l.ipv4_prefix_len, l.ipv6_prefix_len), (100, 100, 32, 56));
        assert_eq!(c.interfaces, ["eth0"]);
    }

    #[test]
    fn empty_file_allows_everything() {
        assert_eq!(parse("").expect("valid"), GuardConfig::default());
        assert_eq!(parse("{}\n").expect("valid"), GuardConfig::default());
    }

    #[test]
    fn every_problem_with_its_position() {
        let d = parse("allow:\n  - 198.18.0.1/24\n  - nonsense\ndeny: [10.0.0.0/33]\nsynLimit:\n  rate: -1\n  brust: 5\nextra: 1\n").expect_err("invalid");
        let at =
            |path: &str| d.iter().find(|d| d.path == path).unwrap_or_else(|| panic!("no diagnostic for {path}: {d:?}"));
        assert!(at("allow[0]").message.contains("did you mean 198.18.0.0/24"), "{:?}", at("allow[0]"));
        assert_eq!(at("allow[0]").line, Some(2));
        assert_eq!(at("allow[1]").line, Some(3));
        assert!(at("deny[0]").message.contains("0 to 32"));
        assert_eq!(at("synLimit.rate").line, Some(6));
        assert_eq!(at("synLimit.brust").line, Some(7));
        assert!(at("synLimit.brust").message.ends_with("(did you mean `burst`?)"), "{:?}", at("synLimit.brust"));
        assert!(at("extra").message.contains("unknown key"));
        assert_eq!(at("extra").line, Some(8));
        assert!(d.iter().all(Diagnostic::is_error));
    }

    #[test]
    fn conflicts_and_duplicates() {
        let d = parse("allow: [198.18.0.0/16]\ndeny: [198.18.0.0/16]\n").expect_err("conflict");
        assert!(d[0].message.contains("both allow"), "{d:?}");
        let l =
            parse_config(Path::new("g"), "deny: [198.18.1.0/24, 198.18.1.0/24]\n").expect("duplicates are warnings");
        assert_eq!(l.value.deny.len(), 1);
        assert_eq!(l.warnings.len(), 1);
    }

    #[test]
    fn syn_limit_needs_a_rate() {
        let d = parse("synLimit:\n  burst: 5\n").expect_err("no rate");
        assert!(d[0].message.contains("missing `rate`"), "{d:?}");
        assert!(parse("synLimit:\n  rate: 10000001\n").is_err());
        assert!(parse("synLimit: null\n").expect("off").syn_limit.is_none());
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let d = parse("allow: [198.18.0.0/16\n").expect_err("syntax");
        assert!(d[0].line.is_some(), "{d:?}");
        // A repeated key is reported where it repeats.
        let d = parse("deny: []\nallow: []\ndeny: []\n").expect_err("duplicate key");
        assert_eq!((d[0].line, d[0].column), (Some(3), Some(1)), "{d:?}");
    }

    #[test]
    fn one_document_only() {
        let d = parse("deny: [198.18.0.0/16]\n---\nallow: []\n").expect_err("two documents");
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].line, Some(3));
        assert!(d[0].message.contains("single XDP guard document"), "{:?}", d[0]);
        assert!(parse("- 198.18.0.0/16\n").expect_err("a list")[0].message.contains("must be a mapping, got a list"));
    }

    /// The lines the daemon tests (`tests/tests/xdp.rs`, `tests/tests/e2e.rs`) look for.
    #[test]
    fn rendered_like_the_daemon_tests_expect() {
        let lines = |text: &str| -> String {
            let d = parse(text).expect_err("invalid");
            d.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
        };
        let text = lines("allow: [198.18.0.1/24]\nsynLimit:\n  rate: 0\nextra: true\n");
        for needle in [
            "guard.yaml:1:9: allow[0]",
            "did you mean 198.18.0.0/24",
            "guard.yaml:3:9: synLimit.rate",
            "guard.yaml:4:1: extra: unknown key",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
        }
        let text = lines("allow:\n  - 198.18.0.0/15\n  - nonsense\nsynLimit:\n  rate: -1\n");
        assert!(text.contains("guard.yaml:3:5: allow[1]: "), "{text}");
        assert!(text.contains("guard.yaml:5:9: synLimit.rate: "), "{text}");
        assert!(lines("deny: [198.18.0.49/33]\n").contains("deny[0]"));
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(Cidr::parse("198.18.0.7").expect("host").prefix_len, 32);
        assert_eq!(Cidr::parse("2001:2::1").expect("host").prefix_len, 128);
        assert_eq!(Cidr::parse("0.0.0.0/0").expect("all").prefix_len, 0);
        assert!(Cidr::parse("2001:2::/129").is_err());
        assert!(Cidr::parse("2001:2::1/48").expect_err("host bits").contains("2001:2::/48"));
        assert!(Cidr::parse("198.18.0.0/15").expect("net").contains("198.19.255.255".parse().expect("ip")));
    }
}
