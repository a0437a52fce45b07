//! The XDP guard in front of the listener (`zone-ingress-ebpf/src/prefilter.rs`): loading,
//! attaching, live updates of its lists and limits, and its counters (design:
//! `docs/design.md#xdp-guard`).
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
//! to load or attach is logged and the daemon runs without it. Dropping the [`Guard`] detaches
//! the program everywhere; the attachments are BPF links owned by this process, so they also go
//! away if the process dies.
//!
//! - `guard_file`: the guard file ([`GuardConfig`]), read and checked like the other
//!   configuration files.
//! - `attach`: the interfaces the guard attaches to, and attaching in native or generic mode.

use std::{
    collections::BTreeMap,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf,
    maps::{
        Array, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::Xdp,
};
use clap::ValueEnum;
use tracing::{error, info, warn};
use zone_ingress_ebpf::prefilter::{self as abi, Config};

use crate::{
    config::Diagnostic,
    ebpf::{self, Object},
};

mod attach;
mod guard_file;

use attach::Attachment;
pub use guard_file::{
    Cidr, DEFAULT_V4_PREFIX, DEFAULT_V6_PREFIX, GuardConfig, MAX_TRACKED_SOURCES, MIN_TRACKED_SOURCES, SynLimit,
    load_config, parse_config,
};

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

/// Why the guard could not be started or updated.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(transparent)]
    Object(#[from] ebpf::Error),
    #[error("the eBPF object could not be loaded: {0}")]
    NoObject(#[source] Arc<ebpf::Error>),
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
    /// The object the program lives in (shared with the splice).
    object: Arc<Object>,
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

/// The guard as `--xdp` and the guard file ask for it, checked, before anything is loaded.
#[derive(Debug)]
pub struct Plan {
    mode: XdpMode,
    path: Option<PathBuf>,
    config: GuardConfig,
}

impl Plan {
    /// Sources the SYN limit tracks: the size of its map, set when the object is loaded.
    #[must_use]
    pub fn tracked_sources(&self) -> u32 {
        self.config.tracked_sources()
    }
}

/// Reads `--xdp` (`None`: not given, which means `auto` with a guard file and `off` without)
/// and checks the guard file. `Ok(None)` when the guard is off (logged). Warnings of the guard
/// file are logged.
///
/// # Errors
/// An invalid guard file (in any mode but `off`).
pub fn plan(mode: Option<XdpMode>, path: Option<&Path>) -> Result<Option<Plan>, StartError> {
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
    Ok(Some(Plan { mode, path: path.map(Path::to_path_buf), config }))
}

/// Loads the guard of `plan` into `object` (the process's eBPF object, or why it could not be
/// loaded) and attaches it in front of `listener`. `Ok(None)` when `auto` could not load or
/// attach it (logged).
///
/// # Errors
/// A failure in `native`/`generic` mode.
pub fn start(
    plan: Plan,
    object: Result<Arc<Object>, Arc<ebpf::Error>>,
    listener: SocketAddr,
) -> Result<Option<Guard>, StartError> {
    let mode = plan.mode;
    match object.map_err(XdpError::NoObject).and_then(|object| Guard::load(plan, object, listener)) {
        Ok(g) => Ok(Some(g)),
        Err(source) if mode == XdpMode::Auto => {
            warn!(error = %source, "xdp guard: not attached (auto); running without it");
            Ok(None)
        }
        Err(source) => Err(StartError::Required { mode: mode.as_str(), source: Box::new(source) }),
    }
}

impl Guard {
    fn load(plan: Plan, object: Arc<Object>, listener: SocketAddr) -> Result<Self, XdpError> {
        let Plan { mode, path, config } = plan;
        xdp_program(&mut object.lock())?.load().map_err(|source| XdpError::Program { source })?;
        let maps = Maps {
            config: object.take_map(abi::CONFIG)?,
            cidr_v4: object.take_map(abi::CIDR_V4)?,
            cidr_v6: object.take_map(abi::CIDR_V6)?,
        };
        let stats: PerCpuArray<MapData, u64> = object.take_map(abi::STATS)?;
        let mut state = State {
            object,
            maps,
            written: Written::default(),
            attached: Vec::new(),
            listener,
            current: GuardConfig::default(),
        };
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
        let limit = c.syn_limit.map_or_else(
            || "off".to_owned(),
            |l| format!("{}/s burst {} per /{} and /{} per CPU", l.rate, l.burst, l.ipv4_prefix_len, l.ipv6_prefix_len),
        );
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
        let interfaces: Vec<String> = s.attached.iter().map(|a| a.interface.clone()).collect();
        let summary: Vec<String> = counters.iter().filter(|(_, v)| *v > 0).map(|(n, v)| format!("{n}={v}")).collect();
        // The object may outlive the guard (the splice shares it): detach now.
        let mut loaded = s.object.lock();
        if let Ok(prog) = xdp_program(&mut loaded) {
            for a in s.attached.drain(..) {
                if let Err(e) = prog.detach(a.link) {
                    warn!(interface = %a.interface, error = %e, "detaching the xdp guard failed");
                }
            }
        }
        info!(interfaces = ?interfaces, counters = %summary.join(" "), "xdp guard detached");
    }
}

fn xdp_program(loaded: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let prog = loaded.program_mut(abi::PROG).ok_or(ebpf::Error::Missing(abi::PROG))?;
    prog.try_into().map_err(|source| XdpError::Program { source })
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
        let map_err = |name| move |source| XdpError::Object(ebpf::Error::Map { name, source });
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
