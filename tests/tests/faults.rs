//! Faults the network, the backends and the host cause: a backend that vanishes while the
//! client is sending (both modes); a daemon paused while kernel-spliced flows run; readers that
//! stop reading.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    task::JoinSet,
};
use zone_ingress_tests::{
    daemon::{Daemon, zone_ingress_yaml},
    netns::Topology,
    ops::{self, Inbound, ingress_addr},
    raw::{self, MemSample, SockOpts},
    runtime,
};

const ADMIN_PORT: u16 = 9901;
const PLAIN_ROUTE: &str = "backend{mesh=default}";
/// `--backend-user-timeout` of the test.
const USER_TIMEOUT: Duration = Duration::from_secs(2);

/// The daemon in `topo`'s ingress namespace with one service, `backend` on dataplane 1 port
/// 8080, reached through the plaintext route; `args` are the mode and further flags.
fn plain_daemon(topo: &Topology, args: &[&str]) -> Daemon {
    let inventory = ops::inventory(&[Inbound { name: "backend-1", k: 1, port: 8080, service: "backend", tags: &[] }]);
    let mut all = vec!["--plaintext-route", PLAIN_ROUTE];
    all.extend_from_slice(args);
    Daemon::start(&topo.ingress, &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT), &inventory, &all)
}

/// A backend that vanishes (its link goes down) while the client keeps sending: with
/// `--backend-user-timeout`, the bytes it never acknowledges end the flow within about that
/// long, and the client sees a reset (without it the client would wait for the kernel's
/// retransmission limit, about 15 min, or the idle timeout).
fn backend_vanishing_while_client_sends(splice: &'static str) {
    let topo = Topology::new(1);
    let rt = runtime();
    let user_timeout = format!("{}s", USER_TIMEOUT.as_secs());
    let daemon = plain_daemon(&topo, &["--splice", splice, "--backend-user-timeout", &user_timeout]);
    let dump = ops::get(&topo.ingress, ops::admin_addr(ADMIN_PORT), "/config_dump").json();
    assert_eq!(dump["splice"]["limits"]["backendUserTimeout"], user_timeout.as_str(), "{dump:#}");
    let backend_addr = SocketAddr::new(Topology::dataplane_v4(1).into(), 8080);
    let (client_addr, outcome, after) = rt.block_on(async {
        let listener = topo.dataplanes[0].listen(backend_addr);
        // The backend reads what comes until it has 64 KiB, then keeps the connection (and its
        // socket) while its link goes down.
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        let backend = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("backend: accept");
            let mut buf = vec![0u8; 64 << 10];
            s.read_exact(&mut buf).await.expect("backend: the first 64 KiB");
            let _ = got_tx.send(());
            // Hold the socket; the test ends it.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        });
        let mut client = topo.client.connect(ingress_addr(10001)).expect("connect");
        let client_addr = client.local_addr().expect("client address");
        client.write_all(&vec![7u8; 64 << 10]).await.expect("client: first 64 KiB");
        tokio::time::timeout(Duration::from_secs(10), got_rx)
            .await
            .expect("the backend got the first 64 KiB in time")
            .expect("backend task");
        topo.dataplanes[0].ip(&["link", "set", "d0", "down"]);
        let vanished = Instant::now();
        // Keep sending (the ingress forwards, the backend never acknowledges) and read: the flow
        // must end with a reset.
        let chunk = vec![9u8; 16 << 10];
        let deadline = vanished + Duration::from_secs(20);
        let mut buf = [0u8; 1024];
        let (mut rd, mut wr) = client.split();
        let outcome = loop {
            if Instant::now() >= deadline {
                break Err("no reset within 20 s".to_owned());
            }
            tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) => break Err("clean EOF where a reset was expected".to_owned()),
                    Ok(n) => break Err(format!("{n} unexpected bytes")),
                    Err(e) => break Ok(e.kind()),
                },
                w = wr.write(&chunk) => if let Err(e) = w { break Ok(e.kind()) },
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        };
        backend.abort();
        (client_addr, outcome, vanished.elapsed())
    });
    let kind = outcome.unwrap_or_else(|e| panic!("{splice}: {e}:\n{}", daemon.log_text()));
    assert!(
        matches!(kind, std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
        "{splice}: the client saw {kind:?}, not a reset"
    );
    assert!(
        after >= USER_TIMEOUT - Duration::from_millis(200),
        "{splice}: cut after {after:?}, before the user timeout"
    );
    assert!(after <= USER_TIMEOUT * 4, "{splice}: cut only after {after:?}");
    eprintln!("{splice}: the client saw {kind:?} {after:?} after the backend vanished");
    let line = raw::wait_access_line(&daemon.log, client_addr, "connection closed", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{splice}: no access line:\n{}", daemon.log_text()));
    assert_eq!(raw::field(&line, "reason"), Some("backend_reset"), "{line}");
    assert_eq!(raw::field(&line, "mode"), Some(splice), "{line}");
}

#[test]
fn backend_vanishing_while_client_sends_kernel() {
    backend_vanishing_while_client_sends("kernel");
}

#[test]
fn backend_vanishing_while_client_sends_userspace() {
    backend_vanishing_while_client_sends("userspace");
}

/// A repeating pattern whose period (1 MiB + 7) no buffer size divides, so a lost, repeated or
/// reordered run of bytes shows up at the next byte checked.
fn stream_pattern() -> Arc<Vec<u8>> {
    Arc::new(raw::pattern(77, (1 << 20) + 7))
}

/// Writes the pattern on from offset `from` (what was written before) until `until` or `max`
/// bytes, then shuts the stream down for writing. Returns the offset reached: every byte the
/// stream carried.
async fn write_pattern_until<W: AsyncWrite + Unpin>(
    w: &mut W,
    pattern: &[u8],
    from: u64,
    until: Instant,
    max: u64,
) -> io::Result<u64> {
    let mut written = from;
    while Instant::now() < until && written < max {
        let off = (written % pattern.len() as u64) as usize;
        let end = (off + (256 << 10)).min(pattern.len());
        // A write that waits (the direction is held, or the daemon is paused) is given up at the
        // next check of the clock; tokio's write is cancel-safe: nothing of it was written.
        if let Ok(n) = tokio::time::timeout(Duration::from_millis(200), w.write(&pattern[off..end])).await {
            written += n? as u64;
        }
    }
    w.shutdown().await?;
    Ok(written)
}

/// Reads to EOF (at most `limit` long), checking every byte against the pattern; `pace` sleeps
/// after each read of up to 64 KiB. Returns the bytes read, or what went wrong.
async fn read_pattern<R: AsyncRead + Unpin>(
    r: &mut R,
    pattern: &[u8],
    pace: Option<Duration>,
    limit: Duration,
) -> Result<u64, String> {
    let end = Instant::now() + limit;
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    loop {
        let n = match tokio::time::timeout_at(end.into(), r.read(&mut buf)).await {
            Err(_) => return Err(format!("no EOF within {limit:?} ({got} bytes read)")),
            Ok(Err(e)) => return Err(format!("{e} after {got} bytes")),
            Ok(Ok(0)) => return Ok(got),
            Ok(Ok(n)) => n,
        };
        for (i, b) in buf[..n].iter().enumerate() {
            let at = got + i as u64;
            if *b != pattern[(at % pattern.len() as u64) as usize] {
                return Err(format!("byte {at} differs from what was sent"));
            }
        }
        got += n as u64;
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
    }
}

/// How long the daemon is stopped while its kernel-spliced flows run.
const PAUSE: Duration = Duration::from_secs(8);
/// Kernel memory the two flows may hold while the daemon is stopped. Each direction may queue
/// its redirect window (4 MiB) toward the peer, besides the sockets' own buffers; without the
/// verdict's own bound the slow reader's queue takes all the writer sends (128 MiB).
const PAUSE_MEM_BOUND: u64 = 96 << 20;

/// The daemon stopped (SIGSTOP) for `PAUSE` while two kernel-spliced bulk flows run, one toward
/// a reader that keeps up and one toward a slow reader: the kernel queues stay bounded without
/// the daemon (the verdict holds a direction whose grant ran out), the flows wait, and after
/// SIGCONT both finish byte-exact with a clean EOF: the daemon does not take its own lateness
/// for a flow that outgrew its memory cap.
#[test]
fn daemon_paused_during_kernel_spliced_bulk_flows() {
    let topo = Topology::new(1);
    let rt = runtime();
    // A memory cap well above the redirect window: a guard that fires here fired on a flow the
    // kernel already bounds.
    let daemon = plain_daemon(&topo, &["--splice", "kernel", "--max-in-flight-bytes", "16777216"]);
    let backend_addr = SocketAddr::new(Topology::dataplane_v4(1).into(), 8080);
    let pattern = stream_pattern();
    let base = MemSample::take(Duration::ZERO);
    let samples = Arc::new(Mutex::new(Vec::<MemSample>::new()));
    let t0 = Instant::now();
    let (up, down) = rt.block_on(async {
        let listener = topo.dataplanes[0].listen(backend_addr);
        // Flow 1, client → backend, both ends at full speed.
        let mut c1 = topo.client.connect(ingress_addr(10001)).expect("connect 1");
        let (mut b1, _) = tokio::time::timeout(Duration::from_secs(5), async {
            // The plaintext route needs the client's first bytes: the writer's first write.
            let accept = listener.accept();
            let first = c1.write_all(&pattern[..1024]);
            let (a, w) = tokio::join!(accept, first);
            w.expect("client 1: first bytes");
            a
        })
        .await
        .expect("backend 1 accepted in time")
        .expect("accept 1");
        // Flow 2, backend → client, toward a client that reads at most 32 MiB/s.
        let mut c2 = topo.client.connect(ingress_addr(10001)).expect("connect 2");
        c2.write_all(b"flow-2").await.expect("client 2: first bytes");
        let (mut b2, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("accept 2 in time")
            .expect("accept 2");
        let mut hello = [0u8; 6];
        b2.read_exact(&mut hello).await.expect("backend 2: the client's first bytes");
        // Stop the daemon once both flows are spliced, before their bulk starts: from here on
        // only the kernel can bound what waits toward a slow peer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        daemon.signal(libc::SIGSTOP);
        let paused_at = t0.elapsed();
        let writers_end = Instant::now() + PAUSE + Duration::from_secs(3);
        let (p1, p2, p3, p4) = (Arc::clone(&pattern), Arc::clone(&pattern), Arc::clone(&pattern), Arc::clone(&pattern));
        let up_writer = tokio::spawn(async move {
            // The first 1024 bytes were written already.
            let written = write_pattern_until(&mut c1, &p1, 1024, writers_end, 2 << 30).await;
            (written, c1)
        });
        let up_reader = tokio::spawn(async move { read_pattern(&mut b1, &p2, None, Duration::from_secs(60)).await });
        let (r2, mut w2) = tokio::io::split(b2);
        let down_writer =
            tokio::spawn(async move { write_pattern_until(&mut w2, &p3, 0, writers_end, 128 << 20).await });
        let down_reader = tokio::spawn(async move {
            let r = read_pattern(&mut c2, &p4, Some(Duration::from_millis(2)), Duration::from_secs(60)).await;
            drop((c2, r2));
            r
        });
        let sampler = {
            let samples = Arc::clone(&samples);
            tokio::spawn(async move {
                for _ in 0..400 {
                    samples.lock().expect("lock").push(MemSample::take(t0.elapsed()));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        tokio::time::sleep(PAUSE).await;
        daemon.signal(libc::SIGCONT);
        let resumed_at = t0.elapsed();
        let (written_up, _c1) = up_writer.await.expect("writer task");
        let written_up = written_up.map_err(|e| e.to_string());
        let read_up = up_reader.await.expect("reader task");
        let written_down = down_writer.await.expect("writer task").map_err(|e| e.to_string());
        let read_down = down_reader.await.expect("reader task");
        sampler.abort();
        let during: Vec<MemSample> =
            samples.lock().expect("lock").iter().filter(|s| s.at >= paused_at && s.at <= resumed_at).cloned().collect();
        ((written_up, read_up, during), (written_down, read_down))
    });
    let (written_up, read_up, during) = up;
    let (written_down, read_down) = down;
    let log = daemon.log_text();
    eprintln!(
        "paused daemon: up {written_up:?} written, {read_up:?} read; down {written_down:?} written, {read_down:?} read; \
         {} samples while paused",
        during.len()
    );
    assert!(during.len() >= PAUSE.as_secs() as usize * 5, "only {} memory samples while paused", during.len());
    let grew = raw::lasting_growth(&during, &base);
    let trace: Vec<String> =
        during.iter().step_by(5).map(|s| format!("{:.1}", raw::mib(s.kernel.saturating_sub(base.kernel)))).collect();
    eprintln!("kernel memory growth while paused, every 500 ms (MiB): {}", trace.join(" "));
    assert!(
        grew < PAUSE_MEM_BOUND,
        "kernel memory grew by {:.1} MiB while the daemon was stopped (bound {:.0} MiB)",
        raw::mib(grew),
        raw::mib(PAUSE_MEM_BOUND)
    );
    assert_eq!(read_up, written_up, "client → backend flow after the pause:\n{log}");
    assert_eq!(read_down, written_down, "backend → client flow after the pause:\n{log}");
    let scrape = ops::scrape(&topo.ingress, ops::admin_addr(ADMIN_PORT));
    assert_eq!(scrape.must("zone_ingress_memory_guard_aborts_total", &[]), 0.0, "{log}");
    // The flows started their bulk while the daemon was stopped: the verdict held on its own.
    let holds = scrape.must("zone_ingress_splice_holds_total", &[]);
    let grant_holds = scrape.must("zone_ingress_splice_grant_holds_total", &[]);
    assert!(grant_holds >= 1.0, "the verdict held nothing on its own while the daemon was stopped: {}", scrape.text);
    eprintln!("holds: {holds}, of which the verdict started {grant_holds} on its own");
    eprintln!(
        "kernel memory growth while paused: {:.1} MiB (bound {:.0} MiB)",
        raw::mib(grew),
        raw::mib(PAUSE_MEM_BOUND)
    );
}

/// Flows whose client stops reading while the backend keeps writing.
const STUCK_FLOWS: usize = 200;
/// What each backend writes: more than the redirect window and the hold threshold, so every
/// flow's direction toward its client ends up held.
const STUCK_BYTES: usize = (7 << 20) / 2;
/// The daemon's CPU time allowed while every stuck flow waits, as a share of one core.
const STUCK_CPU_SHARE: f64 = 0.02;

/// The daemon's CPU time so far (every thread's, in nanoseconds, from `schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// Kernel mode: `STUCK_FLOWS` flows whose clients never read while their backends write
/// `STUCK_BYTES`. Every direction toward a client ends up held with its peer's buffers full;
/// from then on the daemon waits for the peer's room (`EPOLLOUT`) instead of polling, so the
/// stuck flows cost it at most `STUCK_CPU_SHARE` of a core. Once the clients read, every byte
/// arrives in order.
#[test]
fn stuck_readers_cost_no_cpu_kernel() {
    let topo = Topology::new(1);
    let rt = runtime();
    let daemon = plain_daemon(&topo, &["--splice", "kernel"]);
    let admin = ops::admin_addr(ADMIN_PORT);
    let backend_addr = SocketAddr::new(Topology::dataplane_v4(1).into(), 8080);
    let pattern = Arc::new(raw::pattern(78, STUCK_BYTES));
    rt.block_on(async {
        let listener = raw::listen(&topo.dataplanes[0], backend_addr, SockOpts::default(), 1024);
        let mut clients = Vec::new();
        let mut writers = JoinSet::new();
        for i in 0..STUCK_FLOWS {
            // A small receive buffer: the client's window stays small, so the bytes wait in the
            // ingress (where the hold applies), not in the client.
            let mut c =
                raw::connect(&topo.client, ingress_addr(10001), SockOpts { rcvbuf: Some(4096), ..SockOpts::nodelay() })
                    .await
                    .unwrap_or_else(|e| panic!("connect {i}: {e}"));
            c.write_all(b"stuck").await.expect("first bytes");
            let mut b =
                raw::accept(&listener, Duration::from_secs(5)).await.unwrap_or_else(|e| panic!("accept {i}: {e}"));
            let mut first = [0u8; 5];
            b.read_exact(&mut first).await.expect("backend: the client's first bytes");
            let p = Arc::clone(&pattern);
            writers.spawn(async move {
                // Blocks once the direction is held; the test ends it.
                let r = b.write_all(&p[..STUCK_BYTES]).await;
                (r, b)
            });
            clients.push(c);
        }
        let held = ops::wait_until(Duration::from_secs(30), || {
            ops::scrape(&topo.ingress, admin).must("zone_ingress_splice_holds_total", &[]) >= STUCK_FLOWS as f64
        });
        let scrape = ops::scrape(&topo.ingress, admin);
        assert!(held, "not every stuck direction was held within 30 s: {}", scrape.text);
        // Let the relays reach their wait (a pass or two), then measure.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let window = Duration::from_secs(5);
        let (cpu0, t) = (cpu_ns(daemon.pid()), Instant::now());
        assert!(cpu0 > 0, "no CPU time read from /proc/{}/task/*/schedstat", daemon.pid());
        tokio::time::sleep(window).await;
        let share = (cpu_ns(daemon.pid()) - cpu0) as f64 / t.elapsed().as_nanos() as f64;
        eprintln!(
            "{STUCK_FLOWS} stuck flows: the daemon used {:.2} % of a core over {window:?} (bound {:.0} %)",
            share * 100.0,
            STUCK_CPU_SHARE * 100.0
        );
        assert!(share <= STUCK_CPU_SHARE, "{STUCK_FLOWS} stuck flows cost the daemon {:.2} % of a core", share * 100.0);
        // The readers wake up: every flow delivers what its backend wrote, in order.
        let mut readers = JoinSet::new();
        for (i, mut c) in clients.into_iter().enumerate() {
            let p = Arc::clone(&pattern);
            readers.spawn(async move {
                let got = raw::read_exact(&mut c, STUCK_BYTES, Duration::from_secs(60)).await;
                (i, got.map(|g| g == p[..STUCK_BYTES]))
            });
        }
        while let Some(r) = readers.join_next().await {
            let (i, same) = r.expect("reader task");
            assert!(same.unwrap_or_else(|e| panic!("flow {i}: {e}")), "flow {i}: the bytes differ from what was sent");
        }
        while let Some(w) = writers.join_next().await {
            w.expect("writer task").0.expect("backend wrote every byte");
        }
    });
}

/// Connections that send part of a ClientHello, then nothing.
const PENDING: usize = 3000;
/// `--max-pending-handshakes` of the test.
const PENDING_CAP: usize = 2000;
/// Resident memory the daemon may grow by while `PENDING_CAP` connections wait (each holds a
/// task, a socket's registration and a peek buffer the size of what it sent).
const PENDING_RSS_BOUND: u64 = 24 << 20;
/// Resident memory the daemon may keep once they are gone.
const PENDING_RSS_AFTER: u64 = 6 << 20;

/// `VmRSS` of `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// `PENDING` connections each send the first 3,000 bytes of a 4 KiB ClientHello and wait: the
/// first `PENDING_CAP` wait for the rest (`zone_ingress_handshakes_pending`), the others are
/// closed at once (`handshake_overflow`, Envoy's `downstream_cx_overflow`); the daemon's memory
/// stays bounded while they wait and goes back down once they are gone.
#[test]
fn pending_handshakes_are_capped_and_their_memory_returned() {
    let nofile = raw::raise_nofile();
    assert!(nofile >= PENDING as u64 + 200, "RLIMIT_NOFILE hard limit {nofile} is too low for {PENDING} connections");
    let topo = Topology::new(1);
    let rt = runtime();
    let cap = PENDING_CAP.to_string();
    let daemon = plain_daemon(
        &topo,
        &["--splice", "userspace", "--max-pending-handshakes", &cap, "--client-hello-timeout", "120s"],
    );
    let admin = ops::admin_addr(ADMIN_PORT);
    let dump = ops::get(&topo.ingress, admin, "/config_dump").json();
    assert_eq!(dump["connections"]["maxPendingHandshakes"], PENDING_CAP, "{dump:#}");
    let hello = raw::probe_padded("backend{mesh=default}", 4000);
    assert!(hello.len() > 4000, "the probe is {} bytes", hello.len());
    let partial = &hello[..3000];
    let pid = daemon.pid();
    let base = rss(pid);
    let (peak, closed_early, still_waiting) = rt.block_on(async {
        let mut clients = Vec::with_capacity(PENDING);
        for i in 0..PENDING {
            let mut c = raw::connect(&topo.client, ingress_addr(10001), SockOpts::nodelay())
                .await
                .unwrap_or_else(|e| panic!("connect {i}: {e}"));
            // A connection over the cap may be closed before its bytes are all written.
            let _ = c.write_all(partial).await;
            clients.push(c);
        }
        let settled = ops::wait_until(Duration::from_secs(15), || {
            let s = ops::scrape(&topo.ingress, admin);
            s.must("zone_ingress_handshakes_pending", &[]) == PENDING_CAP as f64
                && s.must("zone_ingress_rejected_connections_total", &[("reason", "handshake_overflow")])
                    == (PENDING - PENDING_CAP) as f64
        });
        let s = ops::scrape(&topo.ingress, admin);
        assert!(settled, "pending handshakes not capped as expected:\n{}", s.text);
        assert_eq!(s.sum("envoy_listener_downstream_cx_overflow"), (PENDING - PENDING_CAP) as f64);
        let peak = rss(pid);
        // Which clients were closed: the ingress sends a pending client nothing, so any event
        // (EOF, reset) on its socket means it was closed.
        let mut fds: Vec<libc::pollfd> = clients
            .iter()
            .map(|c| libc::pollfd { fd: c.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 })
            .collect();
        let mut closed = 0;
        for _ in 0..40 {
            // SAFETY: `fds` is valid for its length; no wait.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
            closed = usize::try_from(n).expect("poll");
            if closed >= PENDING - PENDING_CAP {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let waiting = PENDING - closed;
        drop(clients);
        let drained = ops::wait_until(Duration::from_secs(15), || {
            ops::scrape(&topo.ingress, admin).must("zone_ingress_handshakes_pending", &[]) == 0.0
        });
        assert!(drained, "pending handshakes did not go back to 0");
        (peak, closed, waiting)
    });
    // The heap is trimmed in the background once the burst is over.
    let mut after = rss(pid);
    ops::wait_until(Duration::from_secs(5), || {
        after = rss(pid);
        after <= base + PENDING_RSS_AFTER
    });
    eprintln!(
        "{PENDING} partial ClientHellos, cap {PENDING_CAP}: {closed_early} closed at once, {still_waiting} waiting; daemon RSS \
         {:.1} MiB at start, {:.1} MiB while they waited, {:.1} MiB after",
        raw::mib(base),
        raw::mib(peak),
        raw::mib(after)
    );
    assert_eq!((closed_early, still_waiting), (PENDING - PENDING_CAP, PENDING_CAP));
    assert!(
        peak <= base + PENDING_RSS_BOUND,
        "the daemon grew by {:.1} MiB for {PENDING_CAP} pending handshakes",
        raw::mib(peak - base)
    );
    assert!(after <= base + PENDING_RSS_AFTER, "the daemon kept {:.1} MiB after the burst", raw::mib(after - base));
}

/// The value after `key` in `text` (`sk:1f2e` → `1f2e`, `r4096` → `4096`), up to a delimiter.
fn after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(key)? + key.len();
    let rest = &text[at..];
    Some(&rest[..rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len())])
}

/// Kernel mode, fault injected: the backend's socket disappears from the redirect map while the
/// connection is spliced. The verdict cannot redirect what the client sends next; it must keep
/// those bytes on the client's socket (they were acknowledged already: dropping them would
/// corrupt the stream silently), count them, and the daemon must reset both sides.
#[test]
fn verdict_keeps_the_bytes_when_the_peer_is_missing() {
    let topo = Topology::new(1);
    let rt = runtime();
    let daemon = plain_daemon(&topo, &["--splice", "kernel"]);
    let admin = ops::admin_addr(ADMIN_PORT);
    let backend_addr = SocketAddr::new(Topology::dataplane_v4(1).into(), 8080);
    const SENT: usize = 64 << 10;
    let (kept, outcome) = rt.block_on(async {
        let listener = topo.dataplanes[0].listen(backend_addr);
        let mut c = topo.client.connect(ingress_addr(10001)).expect("connect");
        c.write_all(b"first").await.expect("first bytes");
        let (mut b, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("accepted in time")
            .expect("accept");
        let mut first = [0u8; 5];
        b.read_exact(&mut first).await.expect("the first bytes through the splice");
        // The ingress's client-side socket, its peer in PAIRS, and that peer out of SOCKS.
        let line = raw::ss_port(&topo.ingress, &["-e", "state", "established"], 10001);
        let cookie = u64::from_str_radix(after(&line, "sk:").unwrap_or_else(|| panic!("no cookie in {line:?}")), 16)
            .expect("hex cookie");
        let pairs = raw::daemon_map_id(daemon.pid(), "PAIRS").expect("PAIRS");
        let key = cookie.to_ne_bytes().map(|b| b.to_string());
        let lookup = topo
            .ingress
            .command("bpftool")
            .args(["-j", "map", "lookup", "id", &pairs.to_string(), "key"])
            .args(&key)
            .output()
            .expect("bpftool");
        let v: serde_json::Value = serde_json::from_slice(&lookup.stdout)
            .unwrap_or_else(|e| panic!("bpftool lookup: {e}: {}", String::from_utf8_lossy(&lookup.stderr)));
        let peer_bytes: Vec<String> = v["value"].as_array().expect("value bytes")[..8]
            .iter()
            .map(|b| {
                let s = b.as_str().expect("byte");
                u8::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex byte").to_string()
            })
            .collect();
        let socks = raw::daemon_map_id(daemon.pid(), "SOCKS").expect("SOCKS");
        let deleted = topo
            .ingress
            .command("bpftool")
            .args(["map", "delete", "id", &socks.to_string(), "key"])
            .args(&peer_bytes)
            .status()
            .expect("bpftool");
        assert!(deleted.success(), "could not delete the backend socket from SOCKS");
        // The daemon stays stopped while the client sends, so only the kernel acts on the bytes.
        daemon.signal(libc::SIGSTOP);
        c.write_all(&vec![3u8; SENT]).await.expect("the client's bytes");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mem = raw::ss_port(&topo.ingress, &["-m", "state", "established"], 10001);
        let kept: u64 = after(&mem, "skmem:(r").and_then(|v| v.parse().ok()).unwrap_or(0);
        daemon.signal(libc::SIGCONT);
        let mut buf = [0u8; 1024];
        let outcome = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
        drop(b);
        (kept, outcome)
    });
    let log = daemon.log_text();
    eprintln!("peer missing: the client's socket holds {kept} bytes of receive memory after {SENT} bytes were sent");
    assert!(kept >= SENT as u64, "the verdict dropped the bytes it could not redirect ({kept} bytes kept):\n{log}");
    match outcome {
        Ok(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        other => panic!("the client saw {other:?}, not a reset:\n{log}"),
    }
    let s = ops::scrape(&topo.ingress, admin);
    assert!(s.must("zone_ingress_bpf_verdict_skbs_total", &[("result", "peer_missing")]) >= 1.0, "{}", s.text);
    assert_eq!(s.must("zone_ingress_peer_missing_aborts_total", &[]), 1.0, "{}", s.text);
}
