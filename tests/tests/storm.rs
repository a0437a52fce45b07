//! A connection storm: many clients in a loop, each connecting, sending a ClientHello with a
//! Kuma SNI, reading the backend's 100-byte answer to its end, and closing, while the backend
//! answers and closes at once. Every connection must complete, in both modes, with clients that
//! open connections in batches or one at a time; a connection that does not is reported with
//! what the kernel knows of it on every leg.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinSet,
};
use zone_ingress_tests::{
    daemon::{Daemon, zone_ingress_yaml},
    netns::Topology,
    raw::{self, SockOpts},
    section5_inventory,
};

const SNI: &str = "backend{mesh=default,version=v1}";
/// Client threads, each with its own runtime.
const THREADS: usize = 16;
/// Connections a thread opens at once (batched storm; the sequential storm opens one).
const BATCH: usize = 64;
/// How long the storm lasts.
const STORM: Duration = Duration::from_secs(5);
/// How long one connection may take.
const PATIENCE: Duration = Duration::from_secs(5);
/// The backend's answer.
const ANSWER: usize = 100;

fn storm(mode: &'static str, batch_size: usize) {
    let nofile = raw::raise_nofile();
    assert!(nofile >= (2 * THREADS * batch_size) as u64 + 200, "RLIMIT_NOFILE hard limit {nofile} is too low");
    let topo = Topology::new(1);
    let daemon = Daemon::start(
        &topo.ingress,
        &zone_ingress_yaml("198.18.0.2", 10001, 9901),
        &section5_inventory(false),
        &["--splice", mode, "--drain-time", "1s", "--max-connections-per-cluster", "100000", "--access-log", "off"],
    );
    let ingress = SocketAddr::new(Topology::ingress_v4().into(), 10001);
    let dp1 = SocketAddr::new(Topology::dataplane_v4(1).into(), 8080);
    let hello = raw::probe(SNI);
    // The backend: its own runtime, answering every connection once its ClientHello is in.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failures, started) = std::thread::scope(|sc| {
        let (listening_tx, listening) = std::sync::mpsc::channel();
        let backend = {
            let (stop, hello_len, dp) = (Arc::clone(&stop), hello.len(), &topo.dataplanes[0]);
            sc.spawn(move || {
                let rt =
                    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
                rt.block_on(async move {
                    let l = raw::listen(dp, dp1, SockOpts::nodelay(), 4096);
                    listening_tx.send(()).expect("the test waits for the backend");
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(Ok((mut s, _))) = tokio::time::timeout(Duration::from_millis(100), l.accept()).await
                        else {
                            continue;
                        };
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; hello_len];
                            if tokio::time::timeout(PATIENCE, s.read_exact(&mut buf)).await.is_ok() {
                                let _ = s.write_all(&[7u8; ANSWER]).await;
                            }
                        });
                    }
                });
            })
        };
        // The storm starts once the backend listens (a SYN before that is refused).
        listening.recv_timeout(Duration::from_secs(10)).expect("the backend listens");
        let done = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::<(u16, String)>::new()));
        let started = Instant::now();
        let clients: Vec<_> = (0..THREADS)
            .map(|_| {
                let (client, hello, done, failures) =
                    (&topo.client, hello.clone(), Arc::clone(&done), Arc::clone(&failures));
                sc.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
                    rt.block_on(async move {
                        while started.elapsed() < STORM {
                            let sockets =
                                raw::sockets(client, ingress, batch_size, SockOpts::nodelay()).expect("sockets");
                            let mut batch = JoinSet::new();
                            for sock in sockets {
                                let hello = hello.clone();
                                batch.spawn(async move {
                                    let mut port = 0;
                                    let r = tokio::time::timeout(PATIENCE, async {
                                        let mut s = sock.connect(ingress).await.map_err(|e| format!("connect: {e}"))?;
                                        port = s.local_addr().map_or(0, |a| a.port());
                                        s.write_all(&hello).await.map_err(|e| format!("write: {e}"))?;
                                        let mut answer = [0u8; ANSWER + 1];
                                        let mut got = 0;
                                        loop {
                                            match s.read(&mut answer[got..]).await {
                                                Ok(0) => break,
                                                Ok(n) => got += n,
                                                Err(e) => return Err(format!("read after {got} bytes: {e}")),
                                            }
                                        }
                                        if got == ANSWER { Ok(()) } else { Err(format!("{got} bytes then EOF")) }
                                    })
                                    .await;
                                    match r {
                                        Ok(Ok(())) => Ok(()),
                                        Ok(Err(e)) => Err((port, e)),
                                        Err(_) => Err((port, format!("not complete after {PATIENCE:?}"))),
                                    }
                                });
                            }
                            while let Some(r) = batch.join_next().await {
                                match r.expect("connection task") {
                                    Ok(()) => {
                                        done.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(f) => failures.lock().expect("lock").push(f),
                                }
                            }
                        }
                    });
                })
            })
            .collect();
        for c in clients {
            c.join().expect("client thread");
        }
        stop.store(true, Ordering::Relaxed);
        backend.join().expect("backend thread");
        (done, failures, started)
    });
    let mut report = String::new();
    let failures = std::mem::take(&mut *failures.lock().expect("lock"));
    for (port, why) in failures.iter().take(4) {
        report.push_str(&format!("client port {port}: {why}\n"));
        for ns in [&topo.client, &topo.ingress, &topo.dataplanes[0]] {
            let out = raw::ss_port(ns, &["-a", "-o", "-i", "-e"], *port);
            report.push_str(&format!("  {}:\n{}\n", ns.name, if out.is_empty() { "none" } else { &out }));
        }
    }
    let scrape = zone_ingress_tests::ops::scrape(&topo.ingress, zone_ingress_tests::ops::admin_addr(9901));
    let rejected: Vec<String> = scrape
        .text
        .lines()
        .filter(|l| l.starts_with("zone_ingress_rejected_connections_total") && !l.ends_with(" 0"))
        .map(str::to_owned)
        .collect();
    report.push_str(&format!("rejected by the ingress: {rejected:?}\n"));
    for ns in [&topo.client, &topo.ingress, &topo.dataplanes[0]] {
        let out = ns.command("nstat").args(["-az"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let counters: Vec<String> = out
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                let v: Vec<&str> = l.split_whitespace().collect();
                v.len() >= 2
                    && v[1] != "0"
                    && [
                        "Listen",
                        "Reset",
                        "RST",
                        "PAWS",
                        "TW",
                        "Abort",
                        "Drop",
                        "Syncookie",
                        "Refused",
                        "Attempt",
                        "Estab",
                        "OutRsts",
                        "InErrs",
                    ]
                    .iter()
                    .any(|k| v[0].contains(k))
            })
            .map(str::to_owned)
            .collect();
        report.push_str(&format!("nstat {}: {}\n", ns.name, counters.join("; ")));
    }
    let done = done.load(Ordering::Relaxed);
    let rate = done as f64 / started.elapsed().as_secs_f64();
    eprintln!("{mode}: {done} connections completed ({rate:.0}/s), {} did not", failures.len());
    assert!(done >= 5_000, "{mode}: only {done} connections completed; the storm did not happen");
    assert!(
        failures.is_empty(),
        "{mode}: {} of {} connections did not complete:\n{report}\n{}",
        failures.len(),
        done as usize + failures.len(),
        daemon.log_text().lines().filter(|l| l.contains("connect")).take(10).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn storm_every_connection_completes_userspace() {
    storm("userspace", BATCH);
}

#[test]
fn storm_every_connection_completes_kernel() {
    storm("kernel", BATCH);
}

/// One connection at a time per client, as a client in a loop opens them: each ClientHello
/// lands on a connection the ingress has just accepted and is peeking, the moment where a lost
/// readiness edge would leave the relay waiting for the client's FIN.
#[test]
fn storm_of_sequential_clients_completes_userspace() {
    storm("userspace", 1);
}
