//! The integrity protocol run over every tested connection, TLS or plain:
//!
//! client → server: `ZIH1` + 4 zero bytes + n_up (u64 LE) + n_down (u64 LE), then n_up bytes
//! server → client: 16-byte dataplane name, n_down bytes, SHA-256 of the n_up bytes it received
//!
//! Both payloads are a deterministic pseudo-random stream, so each side knows what it must see;
//! any byte lost, duplicated or reordered changes a digest.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The client's mTLS handshake with `sni` over `tcp` (through the ingress); panics when it does
/// not complete within `timeout`.
pub async fn mtls_handshake(
    connector: &tokio_rustls::TlsConnector,
    tcp: TcpStream,
    sni: &str,
    timeout: Duration,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("dns name");
    tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .expect("handshake timed out")
        .expect("mTLS handshake through the ingress")
}

/// xorshift64* stream: fast and deterministic.
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const CHUNK: usize = 64 << 10;
pub const UP_SEED: u64 = 0x5550_0000_0000_0001;
pub const DOWN_SEED: u64 = 0x444f_574e_0000_0001;

/// The first `n` bytes of `Gen::new(seed)`, one chunk at a time.
struct Chunks {
    g: Gen,
    buf: Vec<u8>,
    left: u64,
}

impl Chunks {
    fn new(seed: u64, n: u64) -> Self {
        Self { g: Gen::new(seed), buf: vec![0u8; CHUNK], left: n }
    }

    fn next_chunk(&mut self) -> Option<&[u8]> {
        if self.left == 0 {
            return None;
        }
        let k = usize::try_from(self.left.min(CHUNK as u64)).expect("chunk");
        self.g.fill(&mut self.buf[..k]);
        self.left -= k as u64;
        Some(&self.buf[..k])
    }
}

/// Writes `n` bytes of `Gen::new(seed)`, returning their SHA-256.
pub async fn send_stream<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, n: u64) -> std::io::Result<[u8; 32]> {
    let mut chunks = Chunks::new(seed, n);
    let mut h = Sha256::new();
    while let Some(c) = chunks.next_chunk() {
        h.update(c);
        w.write_all(c).await?;
    }
    w.flush().await?;
    Ok(h.finalize().into())
}

/// Like [`send_stream`], in bursts of `burst` bytes with a `pause` after each but the last (a
/// sender that goes quiet now and then).
pub async fn send_stream_paced<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    n: u64,
    burst: u64,
    pause: std::time::Duration,
) -> std::io::Result<[u8; 32]> {
    let mut chunks = Chunks::new(seed, n);
    let mut h = Sha256::new();
    let mut in_burst = 0u64;
    while let Some(c) = chunks.next_chunk() {
        h.update(c);
        w.write_all(c).await?;
        in_burst += c.len() as u64;
        if in_burst >= burst && chunks.left > 0 {
            w.flush().await?;
            tokio::time::sleep(pause).await;
            in_burst = 0;
        }
    }
    w.flush().await?;
    Ok(h.finalize().into())
}

/// Reads exactly `n` bytes, returning their SHA-256.
pub async fn recv_stream<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let k = usize::try_from(left.min(CHUNK as u64)).expect("chunk");
        let got = r.read(&mut buf[..k]).await?;
        if got == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("EOF with {left} of {n} bytes missing"),
            ));
        }
        h.update(&buf[..got]);
        left -= got as u64;
    }
    Ok(h.finalize().into())
}

/// SHA-256 of `n` bytes of `Gen::new(seed)`.
pub fn expected(seed: u64, n: u64) -> [u8; 32] {
    let mut chunks = Chunks::new(seed, n);
    let mut h = Sha256::new();
    while let Some(c) = chunks.next_chunk() {
        h.update(c);
    }
    h.finalize().into()
}

/// What a client run of the protocol saw.
#[derive(Debug)]
pub struct Outcome {
    /// The name of the dataplane that answered.
    pub dataplane: String,
    pub up_ok: bool,
    pub down_ok: bool,
}

/// Runs the client side over `stream` (TLS or plain): sends n_up, receives n_down, compares.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: S,
    n_up: u64,
    n_down: u64,
) -> std::io::Result<Outcome> {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut header = Vec::with_capacity(24);
    header.extend_from_slice(b"ZIH1\0\0\0\0");
    header.extend_from_slice(&n_up.to_le_bytes());
    header.extend_from_slice(&n_down.to_le_bytes());
    let send = async {
        w.write_all(&header).await?;
        let sent = send_stream(&mut w, UP_SEED, n_up).await?;
        std::io::Result::Ok((sent, w))
    };
    let recv = async {
        let mut name = [0u8; 16];
        r.read_exact(&mut name).await?;
        let got = recv_stream(&mut r, n_down).await?;
        let mut digest = [0u8; 32];
        r.read_exact(&mut digest).await?;
        std::io::Result::Ok((name, got, digest))
    };
    let ((sent, mut w), (name, got, their_digest)) = tokio::try_join!(send, recv)?;
    let _ = w.shutdown().await;
    let dataplane = String::from_utf8_lossy(&name).trim_end_matches('\0').to_owned();
    Ok(Outcome { dataplane, up_ok: sent == their_digest, down_ok: got == expected(DOWN_SEED, n_down) })
}

/// Server side of the protocol for one connection.
pub async fn serve_one<S: AsyncRead + AsyncWrite + Unpin + Send>(stream: S, name: &str) -> std::io::Result<()> {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut header = [0u8; 24];
    r.read_exact(&mut header).await?;
    if &header[..4] != b"ZIH1" {
        return Err(std::io::Error::other(format!("bad header {:?}", &header[..8])));
    }
    let n_up = u64::from_le_bytes(header[8..16].try_into().expect("8"));
    let n_down = u64::from_le_bytes(header[16..24].try_into().expect("8"));
    let mut tag = [0u8; 16];
    let nb = name.as_bytes();
    tag[..nb.len().min(16)].copy_from_slice(&nb[..nb.len().min(16)]);
    let send = async {
        w.write_all(&tag).await?;
        send_stream(&mut w, DOWN_SEED, n_down).await?;
        std::io::Result::Ok(w)
    };
    let recv = async { recv_stream(&mut r, n_up).await };
    let (mut w, digest) = tokio::try_join!(send, recv)?;
    w.write_all(&digest).await?;
    w.shutdown().await?;
    // Wait for the client's EOF so the client reads everything before we close.
    let mut rest = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(30), r.read(&mut rest)).await;
    Ok(())
}

/// Counters of a dataplane server.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub accepted: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// SNIs seen by the TLS server, in order.
    pub snis: Mutex<Vec<String>>,
    pub errors: Mutex<Vec<String>>,
    /// `tcpi_options` of each accepted connection, in order (`TCPI_OPT_*` bits).
    pub tcp_options: Mutex<Vec<u8>>,
}

/// A dataplane: mTLS (client certificate required) or plain TCP, running the protocol.
pub fn spawn_dataplane(listener: TcpListener, name: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Arc<ServerStats> {
    let stats = Arc::new(ServerStats::default());
    let st = Arc::clone(&stats);
    let name = name.to_owned();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { continue };
            st.accepted.fetch_add(1, Ordering::Relaxed);
            if let Ok(info) = zone_ingress::sys::tcp_info(std::os::fd::AsFd::as_fd(&sock)) {
                st.tcp_options.lock().expect("lock").push(info.options());
            }
            let st = Arc::clone(&st);
            let name = name.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let result = match acceptor {
                    Some(a) => match a.accept(sock).await {
                        Ok(tls) => {
                            if let Some(sni) = tls.get_ref().1.server_name() {
                                st.snis.lock().expect("lock").push(sni.to_owned());
                            }
                            serve_one(tls, &name).await
                        }
                        Err(e) => Err(e),
                    },
                    None => serve_one(sock, &name).await,
                };
                match result {
                    Ok(()) => st.completed.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        st.errors.lock().expect("lock").push(e.to_string());
                        st.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            });
        }
    });
    stats
}
