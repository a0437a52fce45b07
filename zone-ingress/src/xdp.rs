//! The XDP guard in front of the listener (`zone-ingress-ebpf/src/prefilter.rs`): loading,
//! attaching, live updates of its lists and limits, and its counters.
//!
//! ```text
//!  --xdp-config guard.yaml ─► load_config (validate, every problem at once)
//!                                  │
//!  listener address ─► interfaces carrying it ─► Guard::start: own aya::Ebpf (only the XDP
//!                                  │              program; the splice's maps shrunk to 1 entry),
//!                                  │              attach native, else generic (auto)
//!  SIGHUP / reload ─► Guard::reload ─► same maps, updated in place (insert new entries, write
//!                                       the config, remove stale entries); never detached
//!  /stats, /stats/prometheus ◄── Guard::counters (per-CPU slots summed)
//! ```
//!
//! The guard is optional: it runs when `--xdp-config` names a guard file (mode `auto`) or
//! `--xdp auto|native|generic` asks for it; `--xdp off` never loads it. In `auto` any failure
//! to load or attach is logged and the daemon runs without it. Dropping the [`Guard`] detaches the program
//! everywhere; the attachments are BPF links owned by this process, so they also go away if the
//! process dies.
//!
//! # Guard file
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
//! `serde_yaml` parses the structure (as in [`crate::config`]); a saphyr-parser pass gives
//! diagnostics their line and column.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ffi::CStr,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId},
};
use clap::ValueEnum;
use serde_yaml::Value;
use tracing::{error, info, warn};
use zone_ingress_ebpf::{
    prefilter::{self as abi, Config},
    splice,
};

use crate::config::{ConfigError, Diagnostic, Loaded};

/// The kernel object built by `build.rs` (the same bytes `splice::kernel` embeds).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zone-ingress-ebpf"));

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

/// `--xdp`: whether and how to attach the guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpMode {
    /// Not loaded.
    Off,
    /// Native (driver) mode where the driver supports it, generic otherwise; any failure is
    /// logged and the daemon runs without the guard.
    Auto,
    /// Native mode only; failing to attach is fatal.
    Native,
    /// Generic (SKB) mode only; failing to attach is fatal.
    Generic,
}

impl XdpMode {
    /// The `--xdp` value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

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
        let addr: IpAddr = addr_text.trim().parse().map_err(|_| format!("{s:?} is not an IP address or CIDR (e.g. 198.18.0.0/15, 2001:2::/48)"))?;
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
    fn tracked_sources(&self) -> u32 {
        self.syn_limit.map_or(abi::DEFAULT_TRACKED_SOURCES, |l| l.tracked_sources)
    }
}

// ---------------------------------------------------------------------------------------------
// The guard file
// ---------------------------------------------------------------------------------------------

/// Reads and validates a guard file; every problem is reported at once.
///
/// # Errors
/// The file cannot be read, is not YAML, or has invalid keys or values.
pub fn load_config(path: &Path) -> Result<Loaded<GuardConfig>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_config(path, &text),
        Err(e) => Err(ConfigError { diagnostics: vec![Diagnostic::error(path, "", format!("cannot read the XDP guard file: {e}"))] }),
    }
}

/// Validates the text of a guard file (`file` names it in diagnostics).
///
/// # Errors
/// See [`load_config`].
pub fn parse_config(file: &Path, text: &str) -> Result<Loaded<GuardConfig>, ConfigError> {
    let mut c = Checker { file, spans: Spans::index(text), diags: Vec::new() };
    let root: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let mut d = Diagnostic::error(file, "", format!("not valid YAML: {e}"));
            if let Some(l) = e.location() {
                d.line = Some(l.line());
                d.column = Some(l.column());
            }
            return Err(ConfigError { diagnostics: vec![d] });
        }
    };
    let cfg = c.guard(&root);
    if c.diags.iter().any(Diagnostic::is_error) { Err(ConfigError { diagnostics: c.diags }) } else { Ok(Loaded { value: cfg, warnings: c.diags }) }
}

struct Checker<'a> {
    file: &'a Path,
    spans: Spans,
    diags: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn push(&mut self, mut d: Diagnostic, at_key: bool) {
        if let Some((line, column)) = self.spans.find(&d.path, at_key) {
            d.line = Some(line);
            d.column = Some(column);
        }
        self.diags.push(d);
    }

    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.push(Diagnostic::error(self.file, path, message), false);
    }

    fn warning(&mut self, path: &str, message: impl Into<String>) {
        self.push(Diagnostic::warning(self.file, path, message), false);
    }

    fn unknown_key(&mut self, path: &str, allowed: &[&str]) {
        let d = Diagnostic::error(self.file, path, format!("unknown key; expected one of: {}", allowed.join(", ")));
        self.push(d, true);
    }

    /// The entries of a mapping (`null` is an empty one), with unknown keys reported.
    fn mapping<'v>(&mut self, path: &str, v: &'v Value, allowed: &[&str]) -> Vec<(String, &'v Value)> {
        let Some(m) = (match v {
            Value::Null => return Vec::new(),
            Value::Mapping(m) => Some(m),
            _ => None,
        }) else {
            self.error(path, "must be a mapping");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in m {
            let key = match k {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap_or_default().trim().to_owned(),
            };
            let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            if allowed.contains(&key.as_str()) {
                out.push((key, v));
            } else {
                self.unknown_key(&child, allowed);
            }
        }
        out
    }

    fn strings<'v>(&mut self, path: &str, v: &'v Value) -> Vec<(String, &'v str)> {
        match v {
            Value::Null => Vec::new(),
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let p = format!("{path}[{i}]");
                    if let Value::String(s) = item {
                        Some((p, s.as_str()))
                    } else {
                        self.error(&p, "must be a string");
                        None
                    }
                })
                .collect(),
            _ => {
                self.error(path, "must be a list of strings");
                Vec::new()
            }
        }
    }

    fn number(&mut self, path: &str, v: &Value, min: u64, max: u64) -> Option<u64> {
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.error(path, format!("must be a whole number from {min} to {max}"));
                None
            }
        }
    }

    fn guard(&mut self, root: &Value) -> GuardConfig {
        let mut cfg = GuardConfig::default();
        let mut lists: [Vec<(String, Cidr)>; 2] = [Vec::new(), Vec::new()];
        for (key, v) in self.mapping("", root, &["allow", "deny", "synLimit", "interfaces"]) {
            match key.as_str() {
                "allow" | "deny" => {
                    let slot = usize::from(key == "deny");
                    for (path, s) in self.strings(&key, v) {
                        match Cidr::parse(s) {
                            Ok(c) => lists[slot].push((path, c)),
                            Err(m) => self.error(&path, m),
                        }
                    }
                }
                "synLimit" => cfg.syn_limit = self.syn_limit(v),
                _ => {
                    for (path, name) in self.strings("interfaces", v) {
                        if name.is_empty() || name.len() > MAX_IFNAME || name.contains(['/', ' ', '\0']) {
                            self.error(&path, format!("{name:?} is not an interface name"));
                        } else {
                            cfg.interfaces.push(name.to_owned());
                        }
                    }
                }
            }
        }
        let [allow, deny] = lists;
        let mut seen: HashMap<Cidr, String> = HashMap::new();
        for (path, c) in &allow {
            if let Some(first) = seen.insert(*c, path.clone()) {
                self.warning(path, format!("{c} is listed twice (first at {first})"));
            }
        }
        let allowed: HashMap<Cidr, String> = std::mem::take(&mut seen);
        for (path, c) in &deny {
            if let Some(at) = allowed.get(c) {
                self.error(path, format!("{c} is in both allow ({at}) and deny; remove one"));
            } else if let Some(first) = seen.insert(*c, path.clone()) {
                self.warning(path, format!("{c} is listed twice (first at {first})"));
            }
        }
        cfg.allow = dedup(allow);
        cfg.deny = dedup(deny);
        for (v6, name) in [(false, "IPv4"), (true, "IPv6")] {
            let n = cfg.allow.iter().chain(&cfg.deny).filter(|c| c.addr.is_ipv6() == v6).count();
            if n > abi::MAX_CIDRS as usize {
                self.error("", format!("{n} {name} prefixes in allow and deny; at most {} fit", abi::MAX_CIDRS));
            }
        }
        cfg
    }

    fn syn_limit(&mut self, v: &Value) -> Option<SynLimit> {
        if v.is_null() {
            return None;
        }
        let fields = self.mapping("synLimit", v, &["rate", "burst", "ipv4PrefixLength", "ipv6PrefixLength", "trackedSources"]);
        let mut rate = None;
        let mut burst = None;
        let mut limit = SynLimit {
            rate: 0,
            burst: 0,
            ipv4_prefix_len: DEFAULT_V4_PREFIX,
            ipv6_prefix_len: DEFAULT_V6_PREFIX,
            tracked_sources: abi::DEFAULT_TRACKED_SOURCES,
        };
        let mut ok = true;
        for (key, v) in fields {
            let path = format!("synLimit.{key}");
            let parsed = match key.as_str() {
                "rate" => self.number(&path, v, 1, abi::MAX_SYN_RATE).map(|n| rate = Some(n)),
                "burst" => self.number(&path, v, 1, abi::MAX_SYN_BURST).map(|n| burst = Some(n)),
                "ipv4PrefixLength" => self.number(&path, v, 1, 32).and_then(|n| u8::try_from(n).ok()).map(|n| limit.ipv4_prefix_len = n),
                "ipv6PrefixLength" => self.number(&path, v, 1, 128).and_then(|n| u8::try_from(n).ok()).map(|n| limit.ipv6_prefix_len = n),
                _ => self
                    .number(&path, v, u64::from(MIN_TRACKED_SOURCES), u64::from(MAX_TRACKED_SOURCES))
                    .and_then(|n| u32::try_from(n).ok())
                    .map(|n| limit.tracked_sources = n),
            };
            ok &= parsed.is_some();
        }
        let Some(rate) = rate else {
            if ok && v.is_mapping() {
                self.error("synLimit", "missing `rate` (SYNs per second per source); remove `synLimit` to disable the limit");
            }
            return None;
        };
        limit.rate = rate;
        limit.burst = burst.unwrap_or_else(|| rate.min(abi::MAX_SYN_BURST));
        ok.then_some(limit)
    }
}

fn dedup(list: Vec<(String, Cidr)>) -> Vec<Cidr> {
    let set: BTreeSet<Cidr> = list.into_iter().map(|(_, c)| c).collect();
    set.into_iter().collect()
}

/// Line and column (1-based) of every mapping key and value in a small YAML document, by
/// field path (`synLimit.rate`, `allow[2]`), from saphyr-parser's event stream. Stops quietly
/// at a syntax error (`serde_yaml` reports it).
#[derive(Default)]
struct Spans {
    keys: HashMap<String, (usize, usize)>,
    values: HashMap<String, (usize, usize)>,
}

impl Spans {
    fn index(text: &str) -> Self {
        use saphyr_parser::{Event, Parser};

        enum Frame {
            /// `pending`: `None` while a key is expected, else the key just read (`None` inside
            /// for a complex key, whose value has no path).
            Mapping {
                path: String,
                pending: Option<Option<String>>,
            },
            Sequence {
                path: String,
                next: usize,
            },
            /// Below a complex key: nothing is addressable.
            Opaque,
        }
        let mut spans = Self::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        while let Some(Ok((event, span))) = parser.next_event() {
            let pos = (span.start.line(), span.start.col() + 1);
            let container = match &event {
                Event::MappingStart(..) => Some(true),
                Event::SequenceStart(..) => Some(false),
                Event::Scalar(..) | Event::Alias(_) => None,
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    continue;
                }
                _ => continue,
            };
            let path = match stack.last_mut() {
                None => Some(String::new()),
                Some(Frame::Opaque) => None,
                Some(Frame::Sequence { path, next }) => {
                    *next += 1;
                    Some(format!("{path}[{}]", *next - 1))
                }
                Some(Frame::Mapping { path, pending }) => match pending.take() {
                    None => {
                        let key = match &event {
                            Event::Scalar(k, ..) => {
                                let p = if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
                                spans.keys.entry(p).or_insert(pos);
                                Some(k.to_string())
                            }
                            _ => None,
                        };
                        *pending = Some(key);
                        if container.is_some() {
                            stack.push(Frame::Opaque);
                        }
                        continue;
                    }
                    Some(Some(k)) => Some(if path.is_empty() { k } else { format!("{path}.{k}") }),
                    Some(None) => None,
                },
            };
            if let Some(p) = &path {
                spans.values.entry(p.clone()).or_insert(pos);
            }
            match (container, path) {
                (Some(true), Some(path)) => stack.push(Frame::Mapping { path, pending: None }),
                (Some(false), Some(path)) => stack.push(Frame::Sequence { path, next: 0 }),
                (Some(_), None) => stack.push(Frame::Opaque),
                (None, _) => {}
            }
        }
        spans
    }

    fn find(&self, path: &str, at_key: bool) -> Option<(usize, usize)> {
        if path.is_empty() {
            return None;
        }
        let primary = if at_key { &self.keys } else { &self.values };
        primary.get(path).or_else(|| self.keys.get(path)).copied()
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel side
// ---------------------------------------------------------------------------------------------

/// Why the guard could not be started or updated.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("the eBPF object is empty: the daemon was built with AYA_BUILD_SKIP=1")]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{0} missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {}: {source}", abi::PROG)]
    Program {
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("no interface carries the listener address {0}; name one under `interfaces` in the --xdp-config file")]
    NoInterface(IpAddr),
    #[error("listing the interfaces: {0}")]
    Interfaces(#[source] io::Error),
    #[error("attaching to {interface} in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// One attachment: the interface, the mode it got, and the link that keeps it.
#[derive(Debug)]
struct Attachment {
    interface: String,
    mode: &'static str,
    link: XdpLinkId,
}

struct Maps {
    config: Array<MapData, Config>,
    cidr_v4: LpmTrie<MapData, [u8; 4], u32>,
    cidr_v6: LpmTrie<MapData, [u8; 16], u32>,
}

/// What the maps hold now, so a reload writes only the difference.
#[derive(Default)]
struct Written {
    v4: BTreeMap<(u8, [u8; 4]), u32>,
    v6: BTreeMap<(u8, [u8; 16]), u32>,
}

struct State {
    ebpf: Ebpf,
    maps: Maps,
    written: Written,
    attached: Vec<Attachment>,
    listener: SocketAddr,
    current: GuardConfig,
}

/// The loaded, attached guard. Dropping it detaches the program from every interface.
pub struct Guard {
    mode: XdpMode,
    path: Option<PathBuf>,
    state: Mutex<State>,
    // Apart from `state` so that a scrape never waits for a reload.
    stats: Mutex<PerCpuArray<MapData, u64>>,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard").field("mode", &self.mode).field("path", &self.path).finish_non_exhaustive()
    }
}

/// Why [`start`] did not produce a guard.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The guard file is invalid (reported like the other configuration files).
    #[error("{} problem(s) in the XDP guard file", .0.len())]
    Config(Vec<Diagnostic>),
    /// `--xdp native|generic` and the guard could not be loaded or attached.
    #[error("--xdp {mode}: {source}")]
    Required {
        mode: &'static str,
        #[source]
        source: Box<XdpError>,
    },
}

/// Starts the guard as `--xdp` asks (`None`: not given, which means `auto` with a guard file
/// and `off` without), in front of `listener`. `Ok(None)` when it is off, or when `auto` could
/// not load or attach it (logged). Warnings of the guard file are logged.
///
/// # Errors
/// An invalid guard file (in any mode but `off`), or a failure in `native`/`generic` mode.
pub fn start(mode: Option<XdpMode>, path: Option<&Path>, listener: SocketAddr) -> Result<Option<Guard>, StartError> {
    let mode = mode.unwrap_or(if path.is_some() { XdpMode::Auto } else { XdpMode::Off });
    if mode == XdpMode::Off {
        if let Some(p) = path {
            warn!(path = %p.display(), "--xdp off: the XDP guard file is not used");
            info!(mode = "off", "xdp guard: off (--xdp off)");
        } else {
            info!(mode = "off", "xdp guard: off (no --xdp-config; --xdp auto enables it without lists)");
        }
        return Ok(None);
    }
    let config = match path {
        None => GuardConfig::default(),
        Some(p) => {
            let loaded = load_config(p).map_err(|e| StartError::Config(e.diagnostics))?;
            for w in &loaded.warnings {
                warn!("{w}");
            }
            loaded.value
        }
    };
    match Guard::load(mode, path.map(Path::to_path_buf), config, listener) {
        Ok(g) => Ok(Some(g)),
        Err(source) if mode == XdpMode::Auto => {
            warn!(error = %source, "xdp guard: not attached (auto); running without it");
            Ok(None)
        }
        Err(source) => Err(StartError::Required { mode: mode.as_str(), source: Box::new(source) }),
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

impl Guard {
    fn load(mode: XdpMode, path: Option<PathBuf>, config: GuardConfig, listener: SocketAddr) -> Result<Self, XdpError> {
        if EBPF_OBJECT.is_empty() {
            return Err(XdpError::NoObject);
        }
        // One object holds both programs; this instance loads only the guard, so the splice's
        // maps are created at their smallest (the kernel splice has its own instance).
        let mut loader = EbpfLoader::new();
        for name in [splice::SOCKS, splice::VERDICT, splice::PAIRS, splice::STATS] {
            loader.map_max_entries(name, 1);
        }
        loader.map_max_entries(splice::EVENTS, page_size());
        loader.map_max_entries(abi::SYN_BUCKETS, config.tracked_sources());
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let prog = xdp_program(&mut ebpf)?;
        prog.load().map_err(|source| XdpError::Program { source })?;
        let maps = Maps { config: take_map(&mut ebpf, abi::CONFIG)?, cidr_v4: take_map(&mut ebpf, abi::CIDR_V4)?, cidr_v6: take_map(&mut ebpf, abi::CIDR_V6)? };
        let stats: PerCpuArray<MapData, u64> = take_map(&mut ebpf, abi::STATS)?;
        let mut state = State { ebpf, maps, written: Written::default(), attached: Vec::new(), listener, current: GuardConfig::default() };
        // Contents first, then the attachments: the program never runs unconfigured.
        state.apply(&config, listener)?;
        state.current = config;
        let wanted = state.wanted_interfaces()?;
        state.sync_attachments(mode, &wanted)?;
        let guard = Self { mode, path, state: Mutex::new(state), stats: Mutex::new(stats) };
        guard.log_summary("xdp guard loaded");
        Ok(guard)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log_summary(&self, what: &str) {
        let s = self.lock();
        let c = &s.current;
        let limit = c
            .syn_limit
            .map_or_else(|| "off".to_owned(), |l| format!("{}/s burst {} per /{} and /{} per CPU", l.rate, l.burst, l.ipv4_prefix_len, l.ipv6_prefix_len));
        info!(listener = %s.listener, allow = c.allow.len(), deny = c.deny.len(), syn_limit = %limit, "{what}");
    }

    /// Re-reads the guard file (if any) and applies it and `listener` (the listener's address
    /// now, after a reload of the `ZoneIngress`) to the running program: map contents are
    /// updated in place, never by detaching. An invalid file is reported and changes nothing.
    pub fn reload(&self, listener: Option<SocketAddr>, trigger: &str) {
        let config = match &self.path {
            None => GuardConfig::default(),
            Some(p) => match load_config(p) {
                Ok(loaded) => {
                    for w in &loaded.warnings {
                        warn!("{w}");
                    }
                    loaded.value
                }
                Err(e) => {
                    for d in &e.diagnostics {
                        error!("{d}");
                    }
                    error!(trigger, "{} problem(s) in the XDP guard file; the running guard stays", e.errors().count());
                    return;
                }
            },
        };
        let mut s = self.lock();
        let listener = listener.unwrap_or(s.listener);
        if config == s.current && listener == s.listener {
            info!(trigger, "xdp guard unchanged");
            return;
        }
        if config.tracked_sources() != s.current.tracked_sources() {
            warn!(
                now = s.current.tracked_sources(),
                wanted = config.tracked_sources(),
                "synLimit.trackedSources takes effect at the next start (the map is sized at load)"
            );
        }
        if let Err(e) = s.apply(&config, listener) {
            error!(trigger, error = %e, "updating the XDP guard failed; it may be partly updated");
            return;
        }
        s.listener = listener;
        s.current = config;
        match s.wanted_interfaces() {
            Ok(wanted) => {
                if let Err(e) = s.sync_attachments(self.mode, &wanted) {
                    error!(trigger, error = %e, "re-attaching the XDP guard failed");
                }
            }
            Err(e) => error!(trigger, error = %e, "the XDP guard stays on its current interfaces"),
        }
        drop(s);
        self.log_summary("xdp guard updated");
    }

    /// Packets per `STAT_*` reason since load, summed over CPUs, in slot order.
    #[must_use]
    pub fn counters(&self) -> [(&'static str, u64); abi::STAT_COUNT as usize] {
        let mut out = abi::STAT_NAMES.map(|n| (n, 0));
        let stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        for (slot, entry) in (0u32..).zip(out.iter_mut()) {
            if let Ok(values) = stats.get(&slot, 0) {
                entry.1 = values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
            }
        }
        out
    }

    /// The interfaces the guard is attached to, with their mode (`native` or `generic`).
    #[must_use]
    pub fn attachments(&self) -> Vec<(String, &'static str)> {
        self.lock().attached.iter().map(|a| (a.interface.clone(), a.mode)).collect()
    }

    /// Numbers of prefixes in the allow and deny lists now.
    #[must_use]
    pub fn list_sizes(&self) -> (usize, usize) {
        let s = self.lock();
        (s.current.allow.len(), s.current.deny.len())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let counters = self.counters();
        let s = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let interfaces: Vec<&str> = s.attached.iter().map(|a| a.interface.as_str()).collect();
        let summary: Vec<String> = counters.iter().filter(|(_, v)| *v > 0).map(|(n, v)| format!("{n}={v}")).collect();
        // The links go with `ebpf`, right after this.
        info!(interfaces = ?interfaces, counters = %summary.join(" "), "xdp guard detached");
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let prog = ebpf.program_mut(abi::PROG).ok_or(XdpError::Missing(abi::PROG))?;
    prog.try_into().map_err(|source| XdpError::Program { source })
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, XdpError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(XdpError::Missing(name))?;
    M::try_from(map).map_err(|source| XdpError::Map { name, source })
}

/// The raw words of an IPv4 address (network-order bytes read natively).
fn raw_v4(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn raw_v6(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// The raw mask words of a prefix length over `words` 32-bit words.
fn raw_mask<const N: usize>(prefix_len: u8) -> [u32; N] {
    std::array::from_fn(|i| {
        let bits = u32::from(prefix_len).saturating_sub(u32::try_from(32 * i).unwrap_or(u32::MAX)).min(32);
        let host = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
        u32::from_ne_bytes(host.to_be_bytes())
    })
}

/// The kernel's view of a guard configuration for `listener`.
fn kernel_config(c: &GuardConfig, listener: SocketAddr) -> Config {
    let mut k = Config { version: abi::CONFIG_VERSION, port: u32::from(listener.port()), ..Config::default() };
    match listener.ip() {
        IpAddr::V4(a) => {
            k.flags |= abi::FLAG_LISTENER_V4;
            k.addr_v4 = raw_v4(a);
        }
        // A v4-mapped listener address receives IPv4 packets.
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => {
                k.flags |= abi::FLAG_LISTENER_V4;
                k.addr_v4 = raw_v4(v4);
            }
            None => {
                k.flags |= abi::FLAG_LISTENER_V6;
                k.addr_v6 = raw_v6(a);
            }
        },
    }
    if !c.allow.is_empty() {
        k.flags |= abi::FLAG_DEFAULT_DENY;
    }
    if let Some(l) = c.syn_limit {
        k.flags |= abi::FLAG_SYN_LIMIT;
        k.syn_rate = l.rate;
        k.syn_burst = l.burst;
        k.syn_mask_v4 = raw_mask::<1>(l.ipv4_prefix_len)[0];
        k.syn_mask_v6 = raw_mask::<4>(l.ipv6_prefix_len);
    }
    k
}

impl State {
    /// Writes `c` for `listener`: new and changed prefixes first, then the configuration, then
    /// the removal of stale prefixes, so that each source sees either its old or its new
    /// verdict while this runs.
    fn apply(&mut self, c: &GuardConfig, listener: SocketAddr) -> Result<(), XdpError> {
        let mut want = Written::default();
        for (list, action) in [(&c.allow, abi::ACTION_ALLOW), (&c.deny, abi::ACTION_DENY)] {
            for cidr in list {
                match cidr.addr {
                    IpAddr::V4(a) => want.v4.insert((cidr.prefix_len, a.octets()), action),
                    IpAddr::V6(a) => want.v6.insert((cidr.prefix_len, a.octets()), action),
                };
            }
        }
        let map_err = |name| move |source| XdpError::Map { name, source };
        for (&(len, data), &action) in &want.v4 {
            if self.written.v4.get(&(len, data)) != Some(&action) {
                self.maps.cidr_v4.insert(&Key::new(u32::from(len), data), action, 0).map_err(map_err(abi::CIDR_V4))?;
                self.written.v4.insert((len, data), action);
            }
        }
        for (&(len, data), &action) in &want.v6 {
            if self.written.v6.get(&(len, data)) != Some(&action) {
                self.maps.cidr_v6.insert(&Key::new(u32::from(len), data), action, 0).map_err(map_err(abi::CIDR_V6))?;
                self.written.v6.insert((len, data), action);
            }
        }
        self.maps.config.set(0, kernel_config(c, listener), 0).map_err(map_err(abi::CONFIG))?;
        let stale_v4: Vec<_> = self.written.v4.keys().filter(|k| !want.v4.contains_key(k)).copied().collect();
        for (len, data) in stale_v4 {
            self.maps.cidr_v4.remove(&Key::new(u32::from(len), data)).map_err(map_err(abi::CIDR_V4))?;
            self.written.v4.remove(&(len, data));
        }
        let stale_v6: Vec<_> = self.written.v6.keys().filter(|k| !want.v6.contains_key(k)).copied().collect();
        for (len, data) in stale_v6 {
            self.maps.cidr_v6.remove(&Key::new(u32::from(len), data)).map_err(map_err(abi::CIDR_V6))?;
            self.written.v6.remove(&(len, data));
        }
        Ok(())
    }

    /// The guard file's interfaces, or those carrying the listener address.
    fn wanted_interfaces(&self) -> Result<Vec<String>, XdpError> {
        if !self.current.interfaces.is_empty() {
            return Ok(self.current.interfaces.clone());
        }
        let ip = match self.listener.ip() {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        let found = interfaces_with(ip).map_err(XdpError::Interfaces)?;
        if found.is_empty() { Err(XdpError::NoInterface(ip)) } else { Ok(found) }
    }

    /// Attaches to the interfaces in `wanted` that lack the guard, then detaches it from the
    /// others. In `auto` an interface that refuses is logged and skipped, as long as one
    /// attachment remains.
    fn sync_attachments(&mut self, mode: XdpMode, wanted: &[String]) -> Result<(), XdpError> {
        let mut first_error = None;
        for name in wanted {
            if self.attached.iter().any(|a| &a.interface == name) {
                continue;
            }
            match attach(xdp_program(&mut self.ebpf)?, name, mode) {
                Ok(a) => {
                    info!(interface = %a.interface, mode = a.mode, "xdp guard attached ({} mode)", a.mode);
                    self.attached.push(a);
                }
                Err(e) if mode == XdpMode::Auto => {
                    warn!(interface = %name, error = %e, "xdp guard: cannot attach to this interface");
                    first_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let (keep, stale): (Vec<_>, Vec<_>) = std::mem::take(&mut self.attached).into_iter().partition(|a| wanted.contains(&a.interface));
        self.attached = keep;
        for a in stale {
            let prog = xdp_program(&mut self.ebpf)?;
            match prog.detach(a.link) {
                Ok(()) => info!(interface = %a.interface, "xdp guard detached from an interface the listener left"),
                Err(e) => warn!(interface = %a.interface, error = %e, "detaching the xdp guard failed"),
            }
        }
        match first_error {
            Some(e) if self.attached.is_empty() => Err(e),
            _ => Ok(()),
        }
    }
}

/// Attaches to one interface: `auto` tries native (driver) mode, then generic.
fn attach(prog: &mut Xdp, interface: &str, mode: XdpMode) -> Result<Attachment, XdpError> {
    let tries: &[(AyaXdpMode, &'static str)] = match mode {
        XdpMode::Native => &[(AyaXdpMode::Driver, "native")],
        XdpMode::Generic => &[(AyaXdpMode::Skb, "generic")],
        XdpMode::Auto | XdpMode::Off => &[(AyaXdpMode::Driver, "native"), (AyaXdpMode::Skb, "generic")],
    };
    let mut last = None;
    for &(flags, name) in tries {
        match prog.attach(interface, flags) {
            Ok(link) => return Ok(Attachment { interface: interface.to_owned(), mode: name, link }),
            Err(source) => {
                if tries.len() > 1 {
                    info!(interface, error = %source, "xdp guard: {name} mode unavailable");
                }
                last = Some(XdpError::Attach { interface: interface.to_owned(), mode: name, source });
            }
        }
    }
    Err(last.unwrap_or(XdpError::NoInterface(IpAddr::V4(Ipv4Addr::UNSPECIFIED))))
}

/// Names of the interfaces that have `ip` as one of their addresses (`getifaddrs(3)`).
///
/// # Errors
/// `getifaddrs` failed.
pub fn interfaces_with(ip: IpAddr) -> io::Result<Vec<String>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: `ifa_addr` points to a sockaddr whose family says its real type (read
        // unaligned: the list only promises `sockaddr`'s alignment).
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in>());
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
                }
                libc::AF_INET6 => {
                    let sin6 = std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in6>());
                    Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                }
                _ => None,
            }
        };
        if addr == Some(ip) {
            // SAFETY: `ifa_name` is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
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
        let at = |path: &str| d.iter().find(|d| d.path == path).unwrap_or_else(|| panic!("no diagnostic for {path}: {d:?}"));
        assert!(at("allow[0]").message.contains("did you mean 198.18.0.0/24"), "{:?}", at("allow[0]"));
        assert_eq!(at("allow[0]").line, Some(2));
        assert_eq!(at("allow[1]").line, Some(3));
        assert!(at("deny[0]").message.contains("0 to 32"));
        assert_eq!(at("synLimit.rate").line, Some(6));
        assert_eq!(at("synLimit.brust").line, Some(7));
        assert!(at("extra").message.contains("unknown key"));
        assert_eq!(at("extra").line, Some(8));
        assert!(d.iter().all(Diagnostic::is_error));
    }

    #[test]
    fn conflicts_and_duplicates() {
        let d = parse("allow: [198.18.0.0/16]\ndeny: [198.18.0.0/16]\n").expect_err("conflict");
        assert!(d[0].message.contains("both allow"), "{d:?}");
        let l = parse_config(Path::new("g"), "deny: [198.18.1.0/24, 198.18.1.0/24]\n").expect("duplicates are warnings");
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

    #[test]
    fn kernel_words() {
        assert_eq!(raw_v4(Ipv4Addr::new(198, 18, 0, 2)).to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(raw_mask::<1>(24)[0].to_ne_bytes(), [255, 255, 255, 0]);
        let m = raw_mask::<4>(64);
        assert_eq!(m.map(u32::to_ne_bytes), [[255; 4], [255; 4], [0; 4], [0; 4]]);
        assert_eq!(raw_mask::<4>(0), [0; 4]);
        let k = kernel_config(&GuardConfig::default(), "[::ffff:198.18.0.2]:10001".parse().expect("addr"));
        assert_eq!(k.flags, abi::FLAG_LISTENER_V4);
        assert_eq!(k.addr_v4.to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(k.port, 10001);
        let k = kernel_config(
            &GuardConfig { allow: vec![Cidr::parse("2001:2::/48").expect("cidr")], ..GuardConfig::default() },
            "[2001:2::2]:10001".parse().expect("addr"),
        );
        assert_eq!(k.flags, abi::FLAG_LISTENER_V6 | abi::FLAG_DEFAULT_DENY);
        assert_eq!(k.addr_v6, raw_v6("2001:2::2".parse().expect("v6")));
    }

    #[test]
    fn loopback_carries_localhost() {
        let found = interfaces_with(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("getifaddrs");
        // Every Linux network namespace with `lo` up has 127.0.0.1 on it; a down `lo` has none.
        assert!(found.is_empty() || found == ["lo"], "{found:?}");
    }
}
