//! Load generators for `cargo xtask bench`, run inside the benchmark's namespaces:
//!
//! - `tls-server ADDR`: rustls server (test CA) answering `ok` after each handshake;
//! - `conn-rate ADDR SNI SECONDS CONCURRENCY`: new TLS connections per second, each a full
//!   handshake with a Kuma SNI and a 2-byte reply; prints JSON `{ok, errors, seconds, p50_us,
//!   p99_us}` (the percentiles of connect → reply per connection);
//! - `hash-server ADDR` / `hash-client ADDR BYTES`: the tests' integrity protocol (SHA-256 of
//!   BYTES each way), proving a path moves bytes unchanged;
//! - `hold-server ADDR` / `hold-client ADDR N SNI`: N idle connections (the client sends a probe
//!   ClientHello on each, then holds them until stdin closes), for the memory-per-flow figure.
//!
//! Both TLS sides derive their certificates from the same fixed-seed CA in a directory passed
//! with `--pki DIR` (created by the first caller), so server and client agree.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn arg(args: &[String], i: usize, what: &str) -> String {
    args.get(i).cloned().unwrap_or_else(|| panic!("missing argument {i}: {what}"))
}

/// PEM files of one CA, a server leaf and a client leaf, created once in `dir`.
fn pki(dir: &PathBuf, sni: &str) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ca_path = dir.join("ca.pem");
    if !ca_path.exists() {
        let p = zone_ingress_tests::pki::Pki::new();
        let s = p.leaf("bench-dataplane", &[sni]);
        let c = p.leaf("bench-client", &["client.test"]);
        std::fs::create_dir_all(dir).expect("pki dir");
        for (name, text) in [
            ("server.pem", &s.cert_pem),
            ("server.key", &s.key_pem),
            ("client.pem", &c.cert_pem),
            ("client.key", &c.key_pem),
            ("ca.pem", &p.ca_pem),
        ] {
            std::fs::write(dir.join(name), text).expect("write pem");
        }
    }
    let certs = |f: &str| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(dir.join(f)).expect("pem").map(|c| c.expect("cert")).collect()
    };
    let key = |f: &str| PrivateKeyDer::from_pem_file(dir.join(f)).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("ca.pem") {
        roots.add(c).expect("root");
    }
    let roots = Arc::new(roots);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .expect("verifier");
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs("server.pem"), key("server.key"))
        .expect("server cert");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(certs("client.pem"), key("client.key"))
        .expect("client cert");
    (Arc::new(server), Arc::new(client))
}

#[expect(clippy::print_stdout, reason = "results go to stdout for xtask")]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pki_dir = args.iter().position(|a| a == "--pki").map(|i| PathBuf::from(arg(&args, i + 1, "pki dir")));
    let args: Vec<String> = match args.iter().position(|a| a == "--pki") {
        Some(i) => args[..i].iter().chain(&args[i + 2..]).cloned().collect(),
        None => args,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let cmd = arg(&args, 0, "command");
    rt.block_on(async {
        match cmd.as_str() {
            "tls-server" => {
                let addr: SocketAddr = arg(&args, 1, "addr").parse().expect("addr");
                let sni = arg(&args, 2, "sni");
                let (server, _) = pki(&pki_dir.expect("--pki"), &sni);
                let acceptor = tokio_rustls::TlsAcceptor::from(server);
                let l = tokio::net::TcpListener::bind(addr).await.expect("bind");
                println!("listening");
                loop {
                    let Ok((s, _)) = l.accept().await else { continue };
                    let a = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(5), a.accept(s)).await {
                            let _ = tls.write_all(b"ok").await;
                            let _ = tls.shutdown().await;
                        }
                    });
                }
            }
            "conn-rate" => {
                let addr: SocketAddr = arg(&args, 1, "addr").parse().expect("addr");
                let sni = arg(&args, 2, "sni");
                let secs: f64 = arg(&args, 3, "seconds").parse().expect("seconds");
                let conc: usize = arg(&args, 4, "concurrency").parse().expect("concurrency");
                let (_, client) = pki(&pki_dir.expect("--pki"), &sni);
                let connector = tokio_rustls::TlsConnector::from(client);
                let ok = Arc::new(AtomicU64::new(0));
                let errors = Arc::new(AtomicU64::new(0));
                let start = Instant::now();
                let end = start + Duration::from_secs_f64(secs);
                let mut tasks = Vec::new();
                for _ in 0..conc {
                    let (c, ok, errors, sni) = (connector.clone(), Arc::clone(&ok), Arc::clone(&errors), sni.clone());
                    tasks.push(tokio::spawn(async move {
                        // Connect → reply of each successful connection, µs.
                        let mut took: Vec<u64> = Vec::new();
                        while Instant::now() < end {
                            let t0 = Instant::now();
                            let one = async {
                                let tcp = tokio::net::TcpStream::connect(addr).await?;
                                // RST on close: no TIME_WAIT pile-up in a tight connect loop.
                                let lin = libc::linger { l_onoff: 1, l_linger: 0 };
                                // SAFETY: setsockopt on a live socket with a correctly sized value.
                                unsafe {
                                    libc::setsockopt(
                                        std::os::fd::AsRawFd::as_raw_fd(&tcp),
                                        libc::SOL_SOCKET,
                                        libc::SO_LINGER,
                                        std::ptr::from_ref(&lin).cast(),
                                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                                    )
                                };
                                let mut tls = c.connect(ServerName::try_from(sni.clone()).expect("dns sni"), tcp).await?;
                                let mut buf = [0u8; 2];
                                tls.read_exact(&mut buf).await?;
                                if &buf != b"ok" {
                                    return Err(std::io::Error::other("bad reply"));
                                }
                                std::io::Result::Ok(())
                            };
                            match tokio::time::timeout(Duration::from_secs(5), one).await {
                                Ok(Ok(())) => {
                                    took.push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
                                    ok.fetch_add(1, Ordering::Relaxed)
                                }
                                _ => errors.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                        took
                    }));
                }
                let mut took = Vec::new();
                for t in tasks {
                    took.extend(t.await.unwrap_or_default());
                }
                took.sort_unstable();
                let pct = |p: usize| took.get((took.len() * p / 100).min(took.len().saturating_sub(1))).copied();
                let seconds = start.elapsed().as_secs_f64();
                println!(
                    "{}",
                    serde_json::json!({"ok": ok.load(Ordering::Relaxed), "errors": errors.load(Ordering::Relaxed), "seconds": seconds,
                                       "p50_us": pct(50), "p99_us": pct(99)})
                );
            }
            "hold-server" => {
                let addr: SocketAddr = arg(&args, 1, "addr").parse().expect("addr");
                let l = tokio::net::TcpListener::bind(addr).await.expect("bind");
                println!("listening");
                // One task per connection, holding it until the peer closes: the bench runs one
                // system after another against this server, so closed flows must free their
                // descriptors (the machine's hard limit is 20,000).
                loop {
                    if let Ok((mut s, _)) = l.accept().await {
                        tokio::spawn(async move {
                            let mut buf = [0u8; 4096];
                            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                        });
                    }
                }
            }
            "hold-client" => {
                let addr: SocketAddr = arg(&args, 1, "addr").parse().expect("addr");
                let n: usize = arg(&args, 2, "n").parse().expect("n");
                let sni = arg(&args, 3, "sni");
                let hello = zone_ingress::client_hello::build_client_hello(Some(sni.as_bytes()), 0);
                let mut held = Vec::with_capacity(n);
                let mut errors = 0u64;
                for _ in 0..n {
                    match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await {
                        Ok(Ok(mut s)) => {
                            if s.write_all(&hello).await.is_ok() {
                                held.push(s);
                            } else {
                                errors += 1;
                            }
                        }
                        _ => errors += 1,
                    }
                }
                println!("{}", serde_json::json!({"held": held.len(), "errors": errors}));
                // Hold until stdin closes.
                let mut sink = Vec::new();
                let _ = tokio::io::stdin().read_to_end(&mut sink).await;
            }
            "hash-server" => {
                let addr: SocketAddr = arg(&args, 1, "addr").parse().expect("addr");
                let l = tokio::net::TcpListener::bind(addr).await.expect("bind");
                println!("listening");
                loop {
                    if let Ok((s, _)) = l.accept().await {
                        tokio::spawn(async move {
                            let _ = zone_ingress_tests::stream::serve_one(s, "bench-dp").await;
                        });
                    }
                }
            }
            "hash-client" => {
                let addr: SocketAddr = arg(&args, 1, "addr").parse().expect("addr");
                let n: u64 = arg(&args, 2, "bytes").parse().expect("bytes");
                let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let out = tokio::time::timeout(Duration::from_secs(60), zone_ingress_tests::stream::client(s, n, n))
                    .await
                    .expect("hash transfer timed out")
                    .expect("hash transfer");
                println!("{}", serde_json::json!({"up_ok": out.up_ok, "down_ok": out.down_ok, "bytes_each_way": n}));
            }
            other => panic!("unknown command {other}"),
        }
    });
}
