//! The namespace's interfaces (`getifaddrs(3)`), for the programs' attachments: the XDP guard
//! and the packet splice attach to the interfaces carrying the listener address, and the packet
//! splice also to those the routing table picks toward the endpoints.

use std::{
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// One address of one interface.
struct IfAddr {
    name: String,
    /// `IFF_UP` and not `IFF_LOOPBACK`.
    up_not_loopback: bool,
    ip: Option<IpAddr>,
}

/// Every (interface, address) pair `getifaddrs` lists.
fn addresses() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: `ifa_addr`, when set, points to a sockaddr whose family says its real type
        // (read unaligned: the list only promises `sockaddr`'s alignment).
        let ip = unsafe {
            if ifa.ifa_addr.is_null() {
                None
            } else {
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
            }
        };
        // SAFETY: a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        let up_not_loopback =
            ifa.ifa_flags & libc::IFF_LOOPBACK as u32 == 0 && ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        out.push(IfAddr { name, up_not_loopback, ip });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Names of the interfaces matching `keep`, each once, in the order listed.
fn names(keep: impl Fn(&IfAddr) -> bool) -> io::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for a in addresses()?.into_iter().filter(|a| keep(a)) {
        if !out.contains(&a.name) {
            out.push(a.name);
        }
    }
    Ok(out)
}

/// Names of the interfaces that have `ip` as one of their addresses.
///
/// # Errors
/// `getifaddrs` failed.
pub fn interfaces_with(ip: IpAddr) -> io::Result<Vec<String>> {
    names(|a| a.ip == Some(ip))
}

/// Every interface that is up, but loopback.
///
/// # Errors
/// `getifaddrs` failed.
pub fn all_interfaces() -> io::Result<Vec<String>> {
    names(|a| a.up_not_loopback)
}

/// The interfaces (but loopback) carrying the source address the routing table picks toward
/// `ip` (a UDP socket's connect asks the table and sends nothing).
///
/// # Errors
/// No route to `ip`, or `getifaddrs` failed.
pub fn interfaces_toward(ip: IpAddr) -> io::Result<Vec<String>> {
    let bind =
        SocketAddr::new(if ip.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() }, 0);
    let s = std::net::UdpSocket::bind(bind)?;
    s.connect(SocketAddr::new(ip, 9))?;
    let src = s.local_addr()?.ip();
    Ok(interfaces_with(src)?.into_iter().filter(|n| n != "lo").collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_carries_localhost() {
        let found = interfaces_with(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("getifaddrs");
        // Every Linux network namespace with `lo` up has 127.0.0.1 on it; a down `lo` has none.
        assert!(found.is_empty() || found == ["lo"], "{found:?}");
        assert!(!all_interfaces().expect("getifaddrs").iter().any(|n| n == "lo"));
    }
}
