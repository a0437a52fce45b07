//! Captures a real client's first TLS flight into a fixture file for `client_hello` tests.
//!
//! Listens on `127.0.0.1:0`, lets one client connect, reads whole TLS records until the
//! `ClientHello` they carry is complete, writes exactly those bytes and closes the connection (so
//! the client fails its handshake, which is expected).
//!
//! ```text
//! # in-process rustls 0.23 client, ring provider (the zone-ingress dev-dependency)
//! cargo run -p zone-ingress --example capture_client_hello -- rustls <SNI> <OUT.bin>
//! # any external client; `{port}` in its arguments becomes the listening port
//! cargo run -p zone-ingress --example capture_client_hello -- exec <OUT.bin> <PROGRAM> [ARGS...]
//! ```
//!
//! Record reassembly is written out here on purpose rather than calling
//! `zone_ingress::client_hello::parse`, so that a parser bug cannot shape its own fixtures.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::Arc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

/// Gives up on a client that never sends its hello.
const READ_TIMEOUT: Duration = Duration::from_mins(1);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (hello, out) = match args.as_slice() {
        [mode, sni, out] if mode == "rustls" => (capture_rustls(&listener, sni)?, out),
        [mode, out, program, rest @ ..] if mode == "exec" => (capture_exec(&listener, port, program, rest)?, out),
        _ => bail!(
            "usage: capture_client_hello rustls <SNI> <OUT> | exec <OUT> <PROGRAM> [ARGS...] \
             ({{port}} in ARGS is replaced)"
        ),
    };
    std::fs::write(out, &hello).with_context(|| format!("write {out}"))?;
    eprintln!("wrote {} bytes to {out}", hello.len());
    Ok(())
}

/// A rustls 0.23 client with the ring provider and its default settings.
fn capture_rustls(listener: &TcpListener, sni: &str) -> Result<Vec<u8>> {
    let addr = listener.local_addr()?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned())
        .with_context(|| format!("rustls only sends DNS names, not {sni:?}"))?;
    // No roots: the handshake never gets as far as the server's certificate.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let client = thread::spawn(move || -> Result<()> {
        let mut sock = TcpStream::connect(addr)?;
        // Sends the hello, then fails when the capture side closes: expected.
        let _ = conn.complete_io(&mut sock);
        Ok(())
    });
    let hello = accept_and_read(listener)?;
    client.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    Ok(hello)
}

/// Any client program, e.g. `openssl s_client -connect 127.0.0.1:{port}`.
fn capture_exec(listener: &TcpListener, port: u16, program: &str, args: &[String]) -> Result<Vec<u8>> {
    let args: Vec<String> = args.iter().map(|a| a.replace("{port}", &port.to_string())).collect();
    eprintln!("running {program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {program}"))?;
    let hello = accept_and_read(listener);
    // The client has nothing left to do once its hello is captured.
    let _ = child.kill();
    let _ = child.wait();
    hello
}

/// Accepts one connection and returns the records that carry its `ClientHello`.
fn accept_and_read(listener: &TcpListener) -> Result<Vec<u8>> {
    let (mut sock, peer) = listener.accept().context("accept")?;
    eprintln!("client connected from {peer}");
    sock.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut stream = Vec::new();
    let mut handshake = Vec::new();
    loop {
        let mut header = [0u8; 5];
        sock.read_exact(&mut header).context("read record header")?;
        let [content_type, major, minor, len_hi, len_lo] = header;
        ensure!(
            content_type == 22,
            "record type {content_type} (version {major}.{minor}) before the hello was complete"
        );
        let mut fragment = vec![0u8; usize::from(u16::from_be_bytes([len_hi, len_lo]))];
        sock.read_exact(&mut fragment).context("read record body")?;
        stream.extend_from_slice(&header);
        stream.extend_from_slice(&fragment);
        handshake.extend_from_slice(&fragment);
        eprintln!("record: version {major}.{minor}, {} bytes", fragment.len());
        if let Some(&[msg_type, a, b, c]) = handshake.get(..4) {
            ensure!(msg_type == 1, "handshake message {msg_type} is not a ClientHello");
            let need = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
            if handshake.len() >= need {
                ensure!(handshake.len() == need, "handshake bytes after the ClientHello");
                break;
            }
        }
    }
    // Closing without a reply ends the client's attempt.
    let _ = sock.shutdown(std::net::Shutdown::Both);
    let _ = sock.flush();
    Ok(stream)
}
