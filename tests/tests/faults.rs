//! Faults the network and the backends cause: a backend that vanishes while the client is
//! sending. Both modes.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zone_ingress_tests::{
    daemon::{Daemon, zone_ingress_yaml},
    netns::Topology,
    ops::{self, Inbound, ingress_addr},
    raw, runtime,
};

const ADMIN_PORT: u16 = 9901;
const PLAIN_ROUTE: &str = "backend{mesh=default}";
/// `--backend-user-timeout` of the test.
const USER_TIMEOUT: Duration = Duration::from_secs(2);

/// A backend that vanishes (its link goes down) while the client keeps sending: with
/// `--backend-user-timeout`, the bytes it never acknowledges end the flow within about that
/// long, and the client sees a reset (without it the client would wait for the kernel's
/// retransmission limit, about 15 min, or the idle timeout).
fn backend_vanishing_while_client_sends(splice: &'static str) {
    let topo = Topology::new(1);
    let rt = runtime();
    let inventory = ops::inventory(&[Inbound { name: "backend-1", k: 1, port: 8080, service: "backend", tags: &[] }]);
    let user_timeout = format!("{}s", USER_TIMEOUT.as_secs());
    let daemon = Daemon::start(
        &topo.ingress,
        &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT),
        &inventory,
        &["--splice", splice, "--plaintext-route", PLAIN_ROUTE, "--backend-user-timeout", &user_timeout],
    );
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
