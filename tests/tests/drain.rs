//! Shutdown with kuma-dp semantics: on SIGTERM `/ready` turns `TERMINATING`, the listener
//! stops accepting, established flows finish within the drain time, the rest are closed when
//! it ends, and the process exits 0 leaving no BPF program behind. SIGUSR2 drains the listener
//! and keeps the process running.

use std::time::{Duration, Instant};

use zone_ingress_tests::{
    daemon::{Daemon, zone_ingress_yaml},
    netns::Topology,
    ops::{
        self, Inbound, admin_addr, bpf_prog_exists, bpf_prog_ids, get, ingress_addr, paced_client, plain_dataplanes,
        wait_exit, wait_until,
    },
    runtime,
};

const ADMIN_PORT: u16 = 9901;
const PLAIN_ROUTE: &str = "backend{mesh=default}";

fn start(topo: &Topology, splice: &str, drain_time: &str) -> Daemon {
    let inventory = ops::inventory(&[Inbound { name: "backend-1", k: 1, port: 8080, service: "backend", tags: &[] }]);
    Daemon::start(
        &topo.ingress,
        &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT),
        &inventory,
        &["--splice", splice, "--plaintext-route", PLAIN_ROUTE, "--drain-time", drain_time],
    )
}

fn sigterm_lets_flows_finish(splice: &str) {
    let topo = Topology::new(1);
    let rt = runtime();
    let mut daemon = start(&topo, splice, "20s");
    let admin = admin_addr(ADMIN_PORT);
    let ns = &topo.ingress;
    let flows = rt.block_on(async {
        plain_dataplanes(&topo, &[(1, 8080, "backend-1")]);
        (0..3)
            .map(|_| {
                let tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
                // About three seconds each.
                tokio::spawn(paced_client(tcp, 16 << 20, 1 << 20, 64 << 10, Duration::from_millis(10)))
            })
            .collect::<Vec<_>>()
    });
    assert!(wait_until(Duration::from_secs(5), || get(ns, admin, "/connections").json()["total"] == 3));
    let programs = bpf_prog_ids(daemon.pid());
    assert_eq!(programs.is_empty(), splice == "userspace", "kernel mode holds the verdict program: {programs:?}");
    let t0 = Instant::now();
    daemon.signal(libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let r = get(ns, admin, "/ready");
            r.status == 503 && r.body.trim() == "TERMINATING"
        }),
        "/ready turns TERMINATING:\n{}",
        daemon.log_text()
    );
    assert!(daemon.wait_log("no new connections are accepted", Duration::from_secs(5)), "{}", daemon.log_text());
    assert!(topo.client.connect(ingress_addr(10001)).is_err(), "new connections are refused while draining");
    assert_eq!(ops::scrape(ns, admin).must("envoy_server_state", &[]), 1.0);
    for f in flows {
        let out = rt.block_on(f).expect("join").expect("flow across SIGTERM");
        assert!(out.up_ok && out.down_ok, "{out:?}");
    }
    assert!(wait_exit(daemon.pid(), Duration::from_secs(25)), "exit after the flows:\n{}", daemon.log_text());
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "exited as soon as the flows finished, not at the end of the drain time ({took:?})"
    );
    let status = daemon.stop(Duration::from_secs(5)).expect("exit status");
    assert!(status.success(), "exit status {status:?}:\n{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(log.contains("all flows finished"), "{log}");
    assert_eq!(log.matches("connection closed").count(), 3, "{log}");
    assert!(!log.contains("reason=\"shutdown\""), "no flow was cut:\n{log}");
    for id in programs {
        assert!(!bpf_prog_exists(id), "BPF program {id} still loaded after exit");
    }
}

#[test]
fn sigterm_lets_flows_finish_kernel() {
    sigterm_lets_flows_finish("kernel");
}

#[test]
fn sigterm_lets_flows_finish_userspace() {
    sigterm_lets_flows_finish("userspace");
}

/// Flows still open when the drain time ends are reset (reason `shutdown`): the client sees a
/// reset, not a clean end of stream it could take for a complete transfer. The process still
/// exits 0.
fn drain_time_closes_the_rest(splice: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let topo = Topology::new(1);
    let rt = runtime();
    let mut daemon = start(&topo, splice, "2s");
    let mut stuck = rt.block_on(async {
        plain_dataplanes(&topo, &[(1, 8080, "backend-1")]);
        let mut tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
        // A header announcing bytes that never come: the flow stays open, idle.
        let mut header = b"ZIH1\0\0\0\0".to_vec();
        header.extend_from_slice(&(1u64 << 30).to_le_bytes());
        header.extend_from_slice(&16u64.to_le_bytes());
        tcp.write_all(&header).await.expect("header");
        tcp
    });
    assert!(wait_until(
        Duration::from_secs(5),
        || get(&topo.ingress, admin_addr(ADMIN_PORT), "/connections").json()["total"] == 1
    ));
    let programs = bpf_prog_ids(daemon.pid());
    assert_eq!(programs.is_empty(), splice == "userspace", "kernel mode holds the verdict program: {programs:?}");
    let t0 = Instant::now();
    daemon.signal(libc::SIGTERM);
    let end = rt.block_on(async {
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, stuck.read(&mut buf)).await {
                Ok(Ok(0)) => return Some(Ok(())),
                Ok(Err(e)) => return Some(Err(e)),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    });
    match end {
        None => panic!("the open flow is not closed at the end of the drain time"),
        Some(Ok(())) => panic!("the flow cut by the drain time ended with a clean EOF, not a reset"),
        Some(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(1900), "not before the drain time ({:?})", t0.elapsed());
    assert!(wait_exit(daemon.pid(), Duration::from_secs(10)), "{}", daemon.log_text());
    let status = daemon.stop(Duration::from_secs(5)).expect("exit status");
    assert!(status.success(), "exit status {status:?}:\n{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(log.contains("drain time over"), "{log}");
    assert!(log.contains("reason=\"shutdown\""), "{log}");
    for id in programs {
        assert!(!bpf_prog_exists(id), "BPF program {id} still loaded after exit");
    }
}

#[test]
fn drain_time_closes_the_rest_kernel() {
    drain_time_closes_the_rest("kernel");
}

#[test]
fn drain_time_closes_the_rest_userspace() {
    drain_time_closes_the_rest("userspace");
}

#[test]
fn sigusr2_drains_the_listener_and_keeps_running() {
    let topo = Topology::new(1);
    let rt = runtime();
    let mut daemon = start(&topo, "kernel", "5s");
    let admin = admin_addr(ADMIN_PORT);
    let ns = &topo.ingress;
    let flow = {
        let _in_runtime = rt.enter();
        plain_dataplanes(&topo, &[(1, 8080, "backend-1")]);
        let tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
        rt.spawn(paced_client(tcp, 8 << 20, 1 << 16, 64 << 10, Duration::from_millis(10)))
    };
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(libc::SIGUSR2);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let r = get(ns, admin, "/ready");
            r.status == 503 && r.body.trim() == "NOT_READY"
        }),
        "{}",
        daemon.log_text()
    );
    assert!(topo.client.connect(ingress_addr(10001)).is_err(), "drained listener refuses connections");
    let out = rt.block_on(flow).expect("join").expect("flow across SIGUSR2");
    assert!(out.up_ok && out.down_ok, "{out:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get(ns, admin, "/ready").status, 503, "still running, still drained");
    let programs = bpf_prog_ids(daemon.pid());
    assert!(!programs.is_empty(), "the verdict program stays loaded while the daemon runs");
    let status = daemon.stop(Duration::from_secs(15)).expect("exit status");
    assert!(status.success(), "exit status {status:?}:\n{}", daemon.log_text());
    for id in programs {
        assert!(!bpf_prog_exists(id), "BPF program {id} still loaded after exit");
    }
}

/// A second instance on the same listener address refuses to start (exit 1, a clear reason)
/// instead of sharing the port through `SO_REUSEPORT` and taking half of the connections; the
/// first keeps serving every connection.
#[test]
fn second_instance_on_the_same_port_refuses_to_start() {
    let topo = Topology::new(1);
    let first = start(&topo, "kernel", "1s");
    let scratch = zone_ingress_tests::daemon::Scratch::new("second");
    let zi = scratch.write("zi.yaml", &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT + 1));
    let dps = scratch.write(
        "dps.yaml",
        &ops::inventory(&[Inbound { name: "backend-1", k: 1, port: 8080, service: "backend", tags: &[] }]),
    );
    let log = scratch.0.join("second.log");
    let out = std::fs::File::create(&log).expect("log file");
    let mut second = topo
        .ingress
        .command(zone_ingress_tests::daemon::binary().to_str().expect("utf-8 path"))
        .args(["run", "--dataplane-file"])
        .arg(&zi)
        .arg("--dataplanes")
        .arg(&dps)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().expect("log fd"))
        .stderr(out)
        .spawn()
        .expect("spawn the second daemon");
    // Bounded: a second instance that does start is stopped (by its PID) and fails the test.
    let status = zone_ingress_tests::daemon::wait_or_kill(&mut second, Duration::from_secs(10));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "the second instance must exit 1 at once:\n{text}");
    assert!(text.contains("already in use by another socket"), "{text}");
    assert!(!text.contains(" ready "), "the second instance must not get ready:\n{text}");
    // The first instance still serves every connection.
    let rt = runtime();
    rt.block_on(async {
        plain_dataplanes(&topo, &[(1, 8080, "backend-1")]);
        for i in 0..8 {
            let out = ops::plain_flow(&topo, 10001, 64 << 10, 64 << 10)
                .await
                .unwrap_or_else(|e| panic!("flow {i} after the second instance: {e}\n{}", first.log_text()));
            assert!(out.up_ok && out.down_ok, "flow {i}: {out:?}");
        }
    });
    assert_eq!(get(&topo.ingress, admin_addr(ADMIN_PORT), "/ready").status, 200, "the first instance stays ready");
}
