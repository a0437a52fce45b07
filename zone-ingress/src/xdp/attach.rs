//! Where the guard runs: the interfaces carrying the listener address (or those the guard file
//! names), and attaching to each in native (driver) or generic (SKB) mode.

use std::{
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId};
use tracing::{info, warn};

use super::{State, XdpError, XdpMode, xdp_program};

/// One attachment: the interface, the mode it got, and the link that keeps it.
#[derive(Debug)]
pub(super) struct Attachment {
    pub(super) interface: String,
    pub(super) mode: &'static str,
    pub(super) link: XdpLinkId,
}

impl State {
    /// The guard file's interfaces, or those carrying the listener address.
    pub(super) fn wanted_interfaces(&self) -> Result<Vec<String>, XdpError> {
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
    pub(super) fn sync_attachments(&mut self, mode: XdpMode, wanted: &[String]) -> Result<(), XdpError> {
        let mut first_error = None;
        for name in wanted {
            if self.attached.iter().any(|a| &a.interface == name) {
                continue;
            }
            match attach(xdp_program(&mut self.object.lock())?, name, mode) {
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
        let (keep, stale): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.attached).into_iter().partition(|a| wanted.contains(&a.interface));
        self.attached = keep;
        for a in stale {
            match xdp_program(&mut self.object.lock())?.detach(a.link) {
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

    #[test]
    fn loopback_carries_localhost() {
        let found = interfaces_with(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("getifaddrs");
        // Every Linux network namespace with `lo` up has 127.0.0.1 on it; a down `lo` has none.
        assert!(found.is_empty() || found == ["lo"], "{found:?}");
    }
}
