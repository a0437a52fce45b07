//! The handoff: a routed connection's client and backend sockets enter the maps in an order
//! that keeps every byte on one path ([docs/design.md#handoff](../../../../docs/design.md#handoff)):
//! 1. read both cookies; write `PAIRS[C] = B`, `PAIRS[B] = C`;
//! 2. take the byte-counter baselines while nothing has moved yet;
//! 3. insert B and C into `SOCKS` (the redirect target, no program), then B, then C, into
//!    `VERDICT` (B cannot speak before it sees the ClientHello, which only leaves C once C is in
//!    `VERDICT`; and both are already in `SOCKS`, so no redirect can miss its peer);
//! 4. kick both with `SO_RCVLOWAT = 1`: the verdict runs over the queued ClientHello and the
//!    kernel forwards it; from here every byte goes through one path, in order;
//! 5. the monitor checks `peer_missing`; non-zero means the assumption broke: abort both with RST.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::atomic::Ordering,
    time::Instant,
};

use tracing::warn;
use zone_ingress_ebpf::splice::{Pair, REDIRECT_WINDOW};

use super::{BACKEND, CLIENT, HandoffError, KernelSplice, Rejected, monitor::Spliced};
use crate::{
    splice::{CloseReason, prepare_backend},
    sys::{self, epoll},
};

impl KernelSplice {
    /// Hands a connection to the kernel (module docs, steps 1–5). On error both sockets come
    /// back unchanged (nothing was read, written or left in a map). `flow` is the owner's id of
    /// the connection, which its close report carries.
    pub fn handoff(&self, client: OwnedFd, backend: OwnedFd, flow: u64) -> Result<(), Rejected> {
        let cap = self.shared.limits.max_spliced;
        if self.shared.stats.active.fetch_add(1, Ordering::AcqRel) >= cap {
            self.shared.stats.active.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejected { client, backend, error: HandoffError::Full(cap) });
        }
        match self.try_handoff(&client, &backend) {
            Ok(prep) => {
                self.shared.stats.total.fetch_add(1, Ordering::Relaxed);
                self.register(prep, [client, backend], flow);
                Ok(())
            }
            Err(error) => {
                self.shared.stats.active.fetch_sub(1, Ordering::AcqRel);
                Err(Rejected { client, backend, error })
            }
        }
    }

    fn try_handoff(&self, client: &OwnedFd, backend: &OwnedFd) -> Result<Prepared, HandoffError> {
        let io = |what| move |source| HandoffError::Io { what, source };
        let fds = [client.as_fd(), backend.as_fd()];
        let cookies = [
            sys::socket_cookie(fds[CLIENT]).map_err(io("SO_COOKIE of the client socket"))?,
            sys::socket_cookie(fds[BACKEND]).map_err(io("SO_COOKIE of the backend socket"))?,
        ];
        // The client socket inherited what it needs from the listener (`server::bind`).
        prepare_backend(fds[BACKEND], &self.shared.limits).map_err(io("backend socket options"))?;
        let maps = &self.shared.maps;
        for side in [CLIENT, BACKEND] {
            let pair = Pair { peer: cookies[1 - side], ..Pair::default() };
            if let Err(source) = maps.pairs.insert(&cookies[side], &pair) {
                for c in cookies {
                    let _ = maps.pairs.remove(&c);
                }
                return Err(HandoffError::Map { what: "PAIRS insert", source });
            }
        }
        let baselines = (|| -> io::Result<_> {
            let mut recv_base = [0; 2];
            let mut sent_base = [0; 2];
            for side in [CLIENT, BACKEND] {
                let info = sys::tcp_info(fds[side])?;
                recv_base[side] = info.bytes_received - u64::from(sys::inq(fds[side])?);
                sent_base[side] = info.bytes_acked + u64::from(sys::outq(fds[side])?);
            }
            Ok((recv_base, sent_base))
        })();
        let (recv_base, sent_base) = match baselines {
            Ok(b) => b,
            Err(source) => {
                for c in cookies {
                    let _ = maps.pairs.remove(&c);
                }
                return Err(HandoffError::Io { what: "byte-counter baselines", source });
            }
        };
        // Both into the target map, then backend first, then client, into the verdict map: see
        // the module docs. On failure nothing has moved yet, so undoing the inserts is safe.
        let steps: [(&'static str, bool, usize); 4] = [
            ("SOCKS insert of the backend socket", false, BACKEND),
            ("SOCKS insert of the client socket (a client that already sent FIN is refused)", false, CLIENT),
            ("VERDICT insert of the backend socket", true, BACKEND),
            ("VERDICT insert of the client socket (a client that already sent FIN is refused)", true, CLIENT),
        ];
        for (i, (what, verdict, side)) in steps.into_iter().enumerate() {
            let map = if verdict { &maps.verdict } else { &maps.socks };
            if let Err(source) = map.insert(&cookies[side], &fds[side].as_raw_fd()) {
                for (_, v, sd) in steps.into_iter().take(i).rev() {
                    let m = if v { &maps.verdict } else { &maps.socks };
                    let _ = m.remove(&cookies[sd]);
                }
                for c in cookies {
                    let _ = maps.pairs.remove(&c);
                }
                return Err(HandoffError::Map { what, source });
            }
        }
        // From here on the connection belongs to the kernel; errors abort instead of falling back.
        let handoff_ns = sys::monotonic_ns();
        let kicked = fds.iter().try_for_each(|fd| sys::set_rcvlowat(*fd, 1));
        Ok(Prepared { cookies, recv_base, sent_base, handoff_ns, kick_error: kicked.err() })
    }

    fn register(&self, prep: Prepared, fds: [OwnedFd; 2], flow: u64) {
        let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let conn = Spliced {
            cookies: prep.cookies,
            recv_base: prep.recv_base,
            sent_base: prep.sent_base,
            fin: [false; 2],
            shut: [false; 2],
            drain_progress: [(now, 0); 2],
            handoff_ns: prep.handoff_ns,
            relay: [None, None],
            relayed: [0; 2],
            hold_entry: [false; 2],
            grant: [REDIRECT_WINDOW; 2],
            last_kick: [None; 2],
            over_cap_since: None,
            flow,
            bytes: [0; 2],
            first_fin: None,
            fds,
        };
        let raw = [conn.fds[0].as_raw_fd(), conn.fds[1].as_raw_fd()];
        let monitor = self.shared.monitor_of(token);
        let mut conns = monitor.lock_conns();
        for side in [CLIENT, BACKEND] {
            conns.by_cookie.insert(conn.cookies[side], (token, side));
        }
        conns.conns.insert(token, conn);
        let mut failed = prep.kick_error.map(|e| ("SO_RCVLOWAT kick", e));
        for side in [CLIENT, BACKEND] {
            // `raw[side]` is owned by `conns[token]`.
            if let Err(e) = epoll::add(
                monitor.epoll.as_fd(),
                raw[side],
                (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                token << 1 | side as u64,
            ) {
                failed = Some(("epoll_ctl", e));
            }
        }
        if let Some((what, e)) = failed {
            warn!(error = %e, "{what} failed after the sockets entered the map; aborting");
            self.shared.finish(&mut conns, token, CloseReason::Internal);
        }
    }
}

struct Prepared {
    cookies: [u64; 2],
    recv_base: [u64; 2],
    sent_base: [u64; 2],
    handoff_ns: u64,
    kick_error: Option<io::Error>,
}
