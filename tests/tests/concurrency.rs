//! 1,000 concurrent connections through the live ingress: opened and held first (all 1,000
//! confirmed spliced), then 256 KiB each way on every one at once with per-connection SHA-256
//! checks, then closed; afterwards the daemon must hold exactly the fds it held before, its BPF
//! flow maps must be empty (`PAIRS` of the sockmap splice; `PKT_FLOWS` and the guard's
//! `PKT_QUIET` of the packet splice), nothing of the flows may be left in `ss`, and the access
//! log must have 1,000 `connection closed` lines.
//!
//! The packet splice keeps no socket once a flow is switched: with all 1,000 open, the daemon
//! holds no fd for them, the ingress namespace has none of their sockets, every backend leg's
//! source port comes from the packet splice's own range, and the daemon's held ports return to
//! 0 after the linger.
//!
//! Every connection carries its own index right after the ClientHello and its own seeds, so a
//! cross-wired pair of sockets fails the digest comparison as surely as a lost byte does.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, net::TcpStream, task::JoinSet};
use zone_ingress_tests::{
    daemon::{Daemon, zone_ingress_yaml},
    netns::Topology,
    ops,
    raw::{self, SockOpts},
    runtime, section5_inventory, stream,
};

const N: usize = 1000;
const BYTES: u64 = 256 << 10;
const SNI: &str = "backend{mesh=default,version=v1}";

fn up_seed(i: u64) -> u64 {
    0x1000_0000 + i
}

fn down_seed(i: u64) -> u64 {
    0x2000_0000 + i
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes; returns the last result.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One side's transfer: sends `BYTES` of `send_seed`, receives `BYTES`, half-closes, reads
/// to a clean EOF. Returns (SHA-256 sent, SHA-256 received).
async fn transfer(s: TcpStream, send_seed: u64) -> Result<([u8; 32], [u8; 32]), String> {
    let (mut r, mut w) = s.into_split();
    let send = async {
        let h = stream::send_stream(&mut w, send_seed, BYTES).await.map_err(|e| format!("send: {e}"))?;
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        Ok::<_, String>(h)
    };
    let recv = async {
        let h = stream::recv_stream(&mut r, BYTES).await.map_err(|e| format!("receive: {e}"))?;
        let (rest, end) = raw::read_to_end(&mut r, 1 << 20, Duration::from_secs(30)).await;
        if !rest.is_empty() || !end.is_eof() {
            return Err(format!("{} extra bytes, then {end:?}", rest.len()));
        }
        Ok(h)
    };
    let (sent, got) = tokio::join!(send, recv);
    let res = (sent?, got?);
    // Both halves dropped here: the socket closes.
    drop((r, w));
    Ok(res)
}

/// Connection sockets of the test's flows in `ns` (established or waiting for a close).
fn flow_sockets(ns: &zone_ingress_tests::netns::Netns) -> Vec<String> {
    raw::ss(ns)
        .lines()
        .filter(|l| l.contains("198.18.") && (l.contains("ESTAB") || l.contains("CLOSE-WAIT")))
        .map(str::to_owned)
        .collect()
}

fn concurrent(mode: &'static str) {
    let t0 = Instant::now();
    let nofile = raw::raise_nofile();
    assert!(nofile >= 2 * N as u64 + 200, "RLIMIT_NOFILE hard limit {nofile} is too low for {N} connections");
    let topo = Topology::new(1);
    let daemon = Daemon::start(
        &topo.ingress,
        &zone_ingress_yaml("198.18.0.2", 10001, 9901),
        &section5_inventory(false),
        &["--splice", mode, "--drain-time", "1s", "--max-connections-per-cluster", "4096"],
    );
    let pid = daemon.pid();
    let names: &[&str] = match mode {
        "kernel" => &["PAIRS"],
        "packet" => &["PKT_FLOWS", "PKT_QUIET"],
        _ => &[],
    };
    let maps: Vec<(&str, u32)> =
        names.iter().map(|n| (*n, raw::daemon_map_id(pid, n).unwrap_or_else(|e| panic!("{e}")))).collect();
    for (name, id) in &maps {
        assert_eq!(raw::map_entries(*id), Ok(0), "{name} before the test");
    }
    let fd_base = raw::fd_count(pid);
    let ingress = SocketAddr::new(Topology::ingress_v4().into(), 10001);
    let dp1 = SocketAddr::new(Topology::dataplane_v4(1).into(), 8080);
    let hello = raw::probe(SNI);
    let rt = runtime();
    let (clients, backends) = rt.block_on(async {
        let l = raw::listen(&topo.dataplanes[0], dp1, SockOpts::nodelay(), 4096);
        // Backend side: accept all, read the ClientHello and the connection's index.
        let hello_b = hello.clone();
        let acceptor = tokio::spawn(async move {
            let mut readers = JoinSet::new();
            for _ in 0..N {
                let s = raw::accept(&l, Duration::from_secs(30)).await.expect("dataplane accept");
                let hello = hello_b.clone();
                readers.spawn(async move {
                    let mut s = s;
                    s.set_nodelay(true).expect("nodelay");
                    let got =
                        raw::read_exact(&mut s, hello.len() + 8, Duration::from_secs(30)).await.expect("hello + index");
                    raw::assert_bytes("ClientHello", &got[..hello.len()], &hello);
                    let i = u64::from_le_bytes(got[hello.len()..].try_into().expect("8 bytes"));
                    (i, s)
                });
            }
            let mut out: Vec<Option<TcpStream>> = (0..N).map(|_| None).collect();
            while let Some(r) = readers.join_next().await {
                let (i, s) = r.expect("reader task");
                let slot = &mut out[usize::try_from(i).expect("index")];
                assert!(slot.is_none(), "index {i} arrived twice");
                *slot = Some(s);
            }
            out.into_iter().map(|s| s.expect("every index arrived")).collect::<Vec<_>>()
        });
        // Client side: N sockets in the client namespace, all connected at once.
        let sockets = raw::sockets(&topo.client, ingress, N, SockOpts::nodelay()).expect("client sockets");
        let mut connects = JoinSet::new();
        for (i, sock) in sockets.into_iter().enumerate() {
            let mut first = hello.clone();
            first.extend_from_slice(&(i as u64).to_le_bytes());
            connects.spawn(async move {
                let mut s = tokio::time::timeout(Duration::from_secs(30), sock.connect(ingress))
                    .await
                    .expect("connect timed out")
                    .expect("connect");
                s.set_nodelay(true).expect("nodelay");
                raw::write_all(&mut s, &first, Duration::from_secs(30)).await.expect("hello + index");
                (i, s)
            });
        }
        let mut clients: Vec<Option<TcpStream>> = (0..N).map(|_| None).collect();
        while let Some(r) = connects.join_next().await {
            let (i, s) = r.expect("connect task");
            clients[i] = Some(s);
        }
        let clients: Vec<TcpStream> = clients.into_iter().map(|s| s.expect("connected")).collect();
        let backends = tokio::time::timeout(Duration::from_secs(40), acceptor)
            .await
            .expect("the dataplane accepted them all in time")
            .expect("acceptor");
        (clients, backends)
    });
    let opened = t0.elapsed();
    assert_eq!(backends.len(), N);

    let mut fds_held = 0;
    if mode == "packet" {
        // Switched and settled: map entries only. The daemon holds no fd for the flows, and the
        // ingress namespace has none of their sockets.
        let mut estab = Vec::new();
        let gone = wait_until(Duration::from_secs(10), || {
            fds_held = raw::fd_count(pid);
            estab = flow_sockets(&topo.ingress);
            fds_held <= fd_base + 8 && estab.is_empty()
        });
        assert!(
            gone,
            "with {N} packet-level flows open: daemon fds {fd_base} before, {fds_held} now; {} sockets in the ingress namespace:\n{}",
            estab.len(),
            estab.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
        );
        // The kernel never picks those ports by itself (above ip_local_port_range).
        let outside: Vec<u16> = backends
            .iter()
            .map(|b| b.peer_addr().expect("peer").port())
            .filter(|p| !(61000..=65535).contains(p))
            .collect();
        assert!(outside.is_empty(), "backend legs with a source port outside 61000-65535: {outside:?}");
        let scrape = ops::scrape(&topo.ingress, ops::admin_addr(9901));
        assert_eq!(scrape.must("zone_ingress_packet_source_ports_held", &[]), N as f64, "held source ports");
    } else {
        // All N held open: the daemon holds two sockets per connection, and (kernel) every
        // socket is in the pairing map.
        let all_held = wait_until(Duration::from_secs(10), || {
            fds_held = raw::fd_count(pid);
            fds_held >= fd_base + 2 * N
        });
        assert!(all_held, "daemon fds: {fd_base} before, {fds_held} with {N} connections open (want +{})", 2 * N);
        assert!(
            fds_held <= fd_base + 2 * N + 16,
            "daemon fds: {fd_base} before, {fds_held} with {N} open: more than two per connection"
        );
    }
    for (name, id) in &maps {
        // Two per connection in each: one per socket, or one per direction and one per parked
        // socket.
        let mut got = Ok(0);
        let all = wait_until(Duration::from_secs(10), || {
            got = raw::map_entries(*id);
            got == Ok(2 * N)
        });
        assert!(all, "{name} entries with {N} spliced connections: {got:?}");
    }
    let log = daemon.log_text();
    for refusal in ["kernel splice refused", "packet splice refused"] {
        assert!(
            raw::lines_with(&log, &[refusal]).is_empty(),
            "some connections took another path:\n{}",
            raw::lines_with(&log, &[refusal]).join("\n")
        );
    }
    eprintln!("{mode}: {N} connections open and spliced after {opened:?}; daemon fds {fd_base} → {fds_held}");

    // Transfers on all of them at once.
    let t1 = Instant::now();
    rt.block_on(async {
        let mut tasks = JoinSet::new();
        for (i, (c, b)) in clients.into_iter().zip(backends).enumerate() {
            let i = i as u64;
            tasks.spawn(async move {
                let (c_res, b_res) = tokio::join!(transfer(c, up_seed(i)), transfer(b, down_seed(i)));
                (i, c_res, b_res)
            });
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
        let mut done = 0;
        let mut failures = Vec::new();
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
            let (i, c, b) = r.expect("transfer task");
            done += 1;
            match (c, b) {
                (Ok((c_sent, c_got)), Ok((b_sent, b_got))) => {
                    if c_sent != b_got {
                        failures.push(format!("connection {i}: client→backend SHA-256 mismatch"));
                    }
                    if b_sent != c_got {
                        failures.push(format!("connection {i}: backend→client SHA-256 mismatch"));
                    }
                }
                (c, b) => failures.push(format!("connection {i}: client {:?} backend {:?}", c.err(), b.err())),
            }
        }
        tasks.abort_all();
        assert_eq!(done, N, "only {done} of {N} transfers finished within 45 s");
        assert!(
            failures.is_empty(),
            "{} of {N} connections failed:\n{}",
            failures.len(),
            failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    });
    eprintln!("{mode}: {N} × {} KiB each way verified in {:?}", BYTES >> 10, t1.elapsed());

    // Closed: no fd, no map entry left, one access line each.
    let closed_at = Instant::now();
    let mut fds_now = 0;
    // Within 15 s of the end on every path (the packet path lingers at most 10 s, docs/design.md).
    let released = wait_until(Duration::from_secs(15), || {
        fds_now = raw::fd_count(pid);
        fds_now <= fd_base
    });
    assert!(released, "daemon fds: {fd_base} before, {fds_now} 15 s after all {N} connections closed");
    assert_eq!(fds_now, fd_base, "daemon fds after close");
    for (name, id) in &maps {
        let mut left = Ok(usize::MAX);
        // The same bound: a packet-level flow's entries linger at most 10 s after its end (and, with no
        // socket to wait for, this wait starts as soon as the transfers are done).
        let empty = wait_until((closed_at + Duration::from_secs(15)).saturating_duration_since(Instant::now()), || {
            left = raw::map_entries(*id);
            left == Ok(0)
        });
        assert!(empty, "{name} still has {left:?} entries 15 s after all connections closed");
    }
    // Nothing of the flows is left in the ingress's TCP tables (the listener aside).
    let left = flow_sockets(&topo.ingress);
    assert!(left.is_empty(), "sockets left in the ingress namespace:\n{}", left.join("\n"));
    if mode == "packet" {
        let mut held = f64::NAN;
        let released = wait_until(Duration::from_secs(5), || {
            held = ops::scrape(&topo.ingress, ops::admin_addr(9901)).must("zone_ingress_packet_source_ports_held", &[]);
            held == 0.0
        });
        assert!(released, "{held} source ports still held after every flow was removed");
    }
    assert!(
        daemon.wait_log_count("connection closed", N, Duration::from_secs(10)),
        "{} `connection closed` lines for {N} connections",
        daemon.log_text().matches("connection closed").count()
    );
    let log = daemon.log_text();
    assert_eq!(log.matches("connection closed").count(), N, "one access line per connection");
    assert_eq!(log.matches(&format!("mode=\"{mode}\" bytes")).count(), N, "every connection on the {mode} path");
    let want_bytes =
        format!("bytes_client_to_backend={} bytes_backend_to_client={BYTES}", hello.len() as u64 + 8 + BYTES);
    assert_eq!(log.matches(&want_bytes).count(), N, "every access line counts exactly the bytes moved ({want_bytes})");
    eprintln!("{mode}: total {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(90), "took {:?}", t0.elapsed());
}

#[test]
fn packet_1000_concurrent_spliced_connections() {
    concurrent("packet");
}

#[test]
fn kernel_1000_concurrent_spliced_connections() {
    concurrent("kernel");
}

#[test]
fn userspace_1000_concurrent_connections() {
    concurrent("userspace");
}
