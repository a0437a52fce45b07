//! Where the guard runs: the interfaces carrying the listener address (or those the guard file
//! names), and attaching to each in native (driver) or generic (SKB) mode.

use std::net::{IpAddr, Ipv4Addr};

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
        let found = crate::sys::net::interfaces_with(ip).map_err(XdpError::Interfaces)?;
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
