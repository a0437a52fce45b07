//! Source ports of the backend leg (docs/design.md#source-ports).
//!
//! The packet splice closes both of a flow's sockets once its switch settles: from then on the
//! flow is map entries only. The kernel then no longer knows that the backend leg's 4-tuple is
//! in use, and would give the same source port to the next connection toward that endpoint,
//! whose SYN-ACK the flow's entry would translate. So the backend connects of the packet splice
//! bind a port of their own, from a range the kernel never picks by itself (above
//! `net.ipv4.ip_local_port_range`, or listed in `net.ipv4.ip_local_reserved_ports`), and this
//! table holds each (endpoint, port) while a socket or a flow's entries use it.
//!
//! - A [`Lease`] is taken before the connect and travels with the connection; the switch takes
//!   another for the flow's entries, dropped when they are removed (after the linger).
//! - Ports are handed out in turn (a cursor over the range), so a port comes back as late as
//!   the range allows; the same port serves any number of endpoints at once.
//! - A range with every port held toward an endpoint: the connect takes a kernel-chosen port,
//!   and that flow stays on the sockmap splice.
//! - A dormant flow (docs/design.md#dormant-flows) keeps its hold as one bit in a bitmap of the
//!   range per endpoint: no memory per flow.

use std::{
    collections::HashMap,
    fmt, io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
};

/// Fewest ports a range may have.
const MIN_RANGE: u32 = 64;

/// A range of source ports, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub first: u16,
    pub last: u16,
}

impl Range {
    fn len(self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for Range {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 61000-65535"))?;
        let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
        let r = Self { first: port(a)?, last: port(b)? };
        if r.first < 1024 || r.last < r.first || r.len() < MIN_RANGE {
            return Err(format!("{s}: a range of at least {MIN_RANGE} ports, all from 1024 up"));
        }
        Ok(r)
    }
}

/// The kernel's own choice of source ports in this network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ephemeral {
    /// `net.ipv4.ip_local_port_range` (IPv6 uses it too).
    pub range: Range,
    /// `net.ipv4.ip_local_reserved_ports`: ports the kernel skips in that range.
    pub reserved: Vec<Range>,
}

impl Ephemeral {
    /// Reads both sysctls of this process's network namespace.
    ///
    /// # Errors
    /// /proc/sys is not readable or holds something unexpected.
    pub fn read() -> io::Result<Self> {
        let text = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
        Self::parse(&text("ip_local_port_range")?, &text("ip_local_reserved_ports")?).map_err(io::Error::other)
    }

    fn parse(range: &str, reserved: &str) -> Result<Self, String> {
        let mut it = range.split_whitespace().map(str::parse::<u16>);
        let (Some(Ok(first)), Some(Ok(last))) = (it.next(), it.next()) else {
            return Err(format!("ip_local_port_range: unexpected {range:?}"));
        };
        let mut out = Self { range: Range { first, last }, reserved: Vec::new() };
        for part in reserved.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) else {
                return Err(format!("ip_local_reserved_ports: unexpected {part:?}"));
            };
            out.reserved.push(Range { first: a, last: b });
        }
        Ok(out)
    }

    /// Whether the kernel may pick `port` for a connect by itself.
    fn may_pick(&self, port: u16) -> bool {
        self.range.contains(port) && !self.reserved.iter().any(|r| r.contains(port))
    }

    /// The range to use: `wanted` if the kernel picks none of its ports, else an error that
    /// says what to change; without `wanted`, every port above the kernel's range.
    ///
    /// # Errors
    /// `wanted` overlaps ports the kernel picks, or nothing is left above its range.
    pub fn choose(&self, wanted: Option<Range>) -> Result<Range, String> {
        if let Some(w) = wanted {
            let clash: Vec<u16> = (w.first..=w.last).filter(|p| self.may_pick(*p)).take(2).collect();
            return match clash.first() {
                None => Ok(w),
                Some(p) => Err(format!(
                    "--packet-ports {w}: port {p} is in the kernel's ephemeral range {} (net.ipv4.ip_local_port_range) and not in net.ipv4.ip_local_reserved_ports; reserve the range there, or narrow the ephemeral range",
                    self.range
                )),
            };
        }
        let first = u32::from(self.range.last) + 1;
        if first.max(1024) + MIN_RANGE - 1 > 65535 {
            return Err(format!(
                "the kernel's ephemeral range {} (net.ipv4.ip_local_port_range) leaves fewer than {MIN_RANGE} ports above it; give --packet-ports a range listed in net.ipv4.ip_local_reserved_ports",
                self.range
            ));
        }
        Ok(Range { first: u16::try_from(first.max(1024)).unwrap_or(u16::MAX), last: 65535 })
    }
}

/// The table of held (endpoint, port) pairs.
#[derive(Debug)]
pub struct Ports {
    range: Range,
    cursor: AtomicU32,
    held: Mutex<HashMap<(SocketAddr, u16), u32>>,
    /// Holds of dormant flows: per endpoint, one bit per port of the range, and how many are set.
    dormant: Mutex<HashMap<SocketAddr, (Vec<u64>, usize)>>,
}

impl Ports {
    pub fn new(range: Range) -> Self {
        Self { range, cursor: AtomicU32::new(0), held: Mutex::default(), dormant: Mutex::default() }
    }

    /// Where `port`'s bit is in an endpoint's bitmap (`None`: outside the range).
    fn bit(&self, port: u16) -> Option<(usize, u64)> {
        let i = usize::from(port.checked_sub(self.range.first)?);
        self.contains(port).then_some((i / 64, 1 << (i % 64)))
    }

    /// Turns `lease` into a dormant flow's hold: a bit (`false`, the lease kept: the port is
    /// outside today's range, an adopted flow's).
    pub fn sleep(&self, lease: Lease) -> Result<(), Lease> {
        let Some((word, bit)) = self.bit(lease.port) else { return Err(lease) };
        let words = (self.range.len() as usize).div_ceil(64);
        let mut dormant = self.dormant.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, n) = dormant.entry(lease.endpoint).or_insert_with(|| (vec![0; words], 0));
        if map[word] & bit == 0 {
            map[word] |= bit;
            *n += 1;
        }
        // The bit is set before the lease goes: `lease` never sees the pair free.
        drop(dormant);
        drop(lease);
        Ok(())
    }

    /// A dormant flow's hold back as a lease.
    pub fn wake(self: &Arc<Self>, endpoint: SocketAddr, port: u16) -> Lease {
        let lease = self.hold(endpoint, port);
        if let Some((word, bit)) = self.bit(port) {
            let mut dormant = self.dormant.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((map, n)) = dormant.get_mut(&endpoint)
                && map[word] & bit != 0
            {
                map[word] &= !bit;
                *n -= 1;
                if *n == 0 {
                    dormant.remove(&endpoint);
                }
            }
        }
        lease
    }

    fn is_dormant(&self, endpoint: SocketAddr, port: u16) -> bool {
        let Some((word, bit)) = self.bit(port) else { return false };
        self.dormant
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&endpoint)
            .is_some_and(|(map, _)| map[word] & bit != 0)
    }

    pub fn range(&self) -> Range {
        self.range
    }

    /// Whether `port` is one this table hands out (the kernel never picks it by itself).
    pub fn contains(&self, port: u16) -> bool {
        self.range.contains(port)
    }

    /// The next port not held toward `endpoint`, held until the lease drops; `None` if every
    /// port of the range is.
    pub fn lease(self: &Arc<Self>, endpoint: SocketAddr) -> Option<Lease> {
        let len = self.range.len();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..len {
            let i = self.cursor.fetch_add(1, Ordering::Relaxed) % len;
            let port = u16::try_from(u32::from(self.range.first) + i).unwrap_or(u16::MAX);
            if self.is_dormant(endpoint, port) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(v) = held.entry((endpoint, port)) {
                v.insert(1);
                return Some(Lease { ports: Arc::clone(self), endpoint, port });
            }
        }
        None
    }

    /// Holds (`endpoint`, `port`) once more, whether or not it is held already (a flow's
    /// entries; an adopted flow's, whose port may lie outside today's range).
    pub fn hold(self: &Arc<Self>, endpoint: SocketAddr, port: u16) -> Lease {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner).entry((endpoint, port)).or_insert(0) += 1;
        Lease { ports: Arc::clone(self), endpoint, port }
    }

    /// (endpoint, port) pairs held now (a pair both leased and dormant counts twice).
    pub fn held(&self) -> usize {
        let dormant: usize = self.dormant.lock().unwrap_or_else(PoisonError::into_inner).values().map(|(_, n)| n).sum();
        self.held.lock().unwrap_or_else(PoisonError::into_inner).len() + dormant
    }

    /// Frees the table's room left by flows gone dormant.
    pub fn shrink(&self) {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).shrink_to_fit();
    }

    fn release(&self, endpoint: SocketAddr, port: u16) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&(endpoint, port)) {
            *n -= 1;
            if *n == 0 {
                held.remove(&(endpoint, port));
            }
        }
    }
}

/// One hold on an (endpoint, port) pair, released when dropped.
pub struct Lease {
    ports: Arc<Ports>,
    endpoint: SocketAddr,
    port: u16,
}

impl Lease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({} → {})", self.port, self.endpoint)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.ports.release(self.endpoint, self.port);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Ephemeral, Ports, Range};

    #[test]
    fn range_flag() {
        assert_eq!("61000-65535".parse::<Range>(), Ok(Range { first: 61000, last: 65535 }));
        assert!("65535-61000".parse::<Range>().is_err());
        assert!("80-1000".parse::<Range>().is_err());
        assert!("61000-61010".parse::<Range>().is_err());
        assert!("61000".parse::<Range>().is_err());
    }

    #[test]
    fn choice_against_the_kernel_range() {
        let e = Ephemeral::parse("32768\t60999\n", "\n").unwrap();
        assert_eq!(e.choose(None), Ok(Range { first: 61000, last: 65535 }));
        assert!(e.choose(Some(Range { first: 20000, last: 40000 })).unwrap_err().contains("port 32768"));
        assert_eq!(e.choose(Some(Range { first: 20000, last: 30000 })), Ok(Range { first: 20000, last: 30000 }));
        let reserved = Ephemeral::parse("1024 65535", "40000-49999,50000\n").unwrap();
        assert!(reserved.choose(None).is_err());
        assert_eq!(reserved.choose(Some(Range { first: 40000, last: 50000 })), Ok(Range { first: 40000, last: 50000 }));
        assert!(reserved.choose(Some(Range { first: 40000, last: 50001 })).unwrap_err().contains("port 50001"));
    }

    #[test]
    fn leases_per_endpoint_and_exhaustion() {
        let ports = Arc::new(Ports::new(Range { first: 61000, last: 61063 }));
        let a = "198.18.0.1:443".parse().unwrap();
        let b = "198.18.0.2:443".parse().unwrap();
        let mut to_a: Vec<_> = (0..64).map(|_| ports.lease(a).unwrap()).collect();
        let mut seen: Vec<u16> = to_a.iter().map(super::Lease::port).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 64, "every port once");
        assert!(ports.lease(a).is_none(), "the range is exhausted toward a");
        let to_b = ports.lease(b).unwrap();
        // A flow's hold keeps a port after the connect's lease is gone.
        let port = to_a[0].port();
        let flow = ports.hold(a, port);
        to_a.remove(0);
        assert!(ports.lease(a).is_none());
        drop(flow);
        assert_eq!(ports.lease(a).map(|l| l.port()), Some(port));
        drop(to_a);
        drop(to_b);
        assert_eq!(ports.held(), 0);
    }

    #[test]
    fn a_dormant_hold_is_a_bit_and_comes_back_as_a_lease() {
        let ports = Arc::new(Ports::new(Range { first: 61000, last: 61063 }));
        let a = "198.18.0.1:443".parse().unwrap();
        let first = ports.lease(a).unwrap();
        let port = first.port();
        assert!(ports.sleep(first).is_ok());
        assert_eq!(ports.held(), 1);
        let others: Vec<_> = (0..63).map(|_| ports.lease(a).unwrap()).collect();
        assert!(others.iter().all(|l| l.port() != port), "a dormant port is not leased");
        assert!(ports.lease(a).is_none());
        let back = ports.wake(a, port);
        assert_eq!(ports.held(), 64);
        drop(others);
        drop(back);
        assert_eq!(ports.held(), 0);
        // Outside the range (an adopted flow's port): kept as a lease.
        assert!(ports.sleep(ports.hold(a, 40000)).is_err());
        assert_eq!(ports.held(), 0);
    }
}
