//! Helpers for the operations tests (`tests/admin.rs`, `reload.rs`, `drain.rs`): a minimal
//! HTTP/1.1 client for the admin API (run inside the ingress namespace, where the admin server
//! listens on loopback), Prometheus scrapes parsed with a real text-format parser, paced
//! integrity flows that outlive reloads, inventories on the test topology, and BPF checks.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    netns::{Netns, Topology},
    stream::{DOWN_SEED, Gen, Outcome, UP_SEED, expected, recv_stream},
};

/// The admin address inside the ingress namespace for `port`.
pub fn admin_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends raw bytes to `addr` from `ns` and parses what comes back (`None`: the connection
/// closed without a status line).
pub fn raw_request(ns: &Netns, addr: SocketAddr, request: &[u8]) -> Option<Response> {
    let request = request.to_vec();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
        // A server may answer and close before reading all of an oversized request.
        let _ = s.write_all(&request);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        parse_response(&buf)
    })
}

/// `method path` with `Connection: close`.
pub fn request(ns: &Netns, addr: SocketAddr, method: &str, path: &str) -> Response {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    raw_request(ns, addr, req.as_bytes()).unwrap_or_else(|| panic!("{method} {path}: no HTTP response from {addr}"))
}

/// `GET path`.
pub fn get(ns: &Netns, addr: SocketAddr, path: &str) -> Response {
    request(ns, addr, "GET", path)
}

fn parse_response(buf: &[u8]) -> Option<Response> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let mut body = buf[head_end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Some(Response { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).ok()?.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// `GET /stats/prometheus`, parsed. Every line must be a comment or a sample the parser
/// understands, and every sample's family must have a `# TYPE`.
pub fn scrape(ns: &Netns, admin: SocketAddr) -> Scrape {
    let r = get(ns, admin, "/stats/prometheus");
    assert_eq!(r.status, 200, "/stats/prometheus: {}", r.body);
    Scrape::parse(&r.body)
}

/// A parsed Prometheus exposition.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub parsed: prometheus_parse::Scrape,
}

impl Scrape {
    /// Parses `text` with `prometheus-parse`, strictly: no line may be ignored.
    pub fn parse(text: &str) -> Self {
        use prometheus_parse::LineInfo;
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            match LineInfo::parse(line) {
                LineInfo::Ignored => panic!("line not in the Prometheus text format: {line:?}"),
                LineInfo::Type { metric_alias, metric_name, .. } => {
                    typed.insert(metric_alias.unwrap_or(metric_name));
                }
                LineInfo::Sample { metric_name, .. } => {
                    let family = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| metric_name.strip_suffix(s).filter(|f| typed.contains(*f)))
                        .unwrap_or(metric_name);
                    assert!(typed.contains(family), "sample without a # TYPE line: {line:?}");
                }
                LineInfo::Doc { .. } | LineInfo::Empty => {}
            }
        }
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("prometheus text");
        Self { text: text.to_owned(), parsed }
    }

    /// The value of the sample `name` whose labels include all of `labels`, if exactly one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self
            .parsed
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
        let s = found.next()?;
        assert!(found.next().is_none(), "several samples of {name} match {labels:?}");
        match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(*v),
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).reduce(f64::max),
            prometheus_parse::Value::Summary(_) => None,
        }
    }

    /// Like [`Scrape::value`], panicking with the exposition when absent.
    pub fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
    }

    /// Sum over every sample of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.parsed
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                _ => 0.0,
            })
            .sum()
    }

    /// Metric family names present.
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.parsed.samples.iter().map(|s| s.metric.clone()).collect()
    }
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
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

/// Writes `text` to `path` atomically (temporary file + rename), as editors and config
/// management tools do.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write temporary file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// One inbound of the test inventory: dataplane `k` (its namespace's address), `port`,
/// `service`, extra tags.
pub struct Inbound<'a> {
    pub name: &'a str,
    pub k: usize,
    pub port: u16,
    pub service: &'a str,
    pub tags: &'a [(&'a str, &'a str)],
}

/// An `items:` inventory (mesh `default`, zone `east`) of the given inbounds, one dataplane each.
pub fn inventory(inbounds: &[Inbound<'_>]) -> String {
    let mut out = String::from("items:\n");
    for i in inbounds {
        let mut tags: BTreeMap<&str, &str> = i.tags.iter().copied().collect();
        tags.insert("kuma.io/service", i.service);
        tags.insert("kuma.io/zone", "east");
        out.push_str(&format!(
            "- type: Dataplane\n  mesh: default\n  name: {}\n  networking:\n    address: \"{}\"\n    inbound:\n    - port: {}\n      tags:\n",
            i.name,
            Topology::dataplane_v4(i.k),
            i.port
        ));
        for (k, v) in tags {
            out.push_str(&format!("        {k}: {v}\n"));
        }
    }
    out.push_str(&format!("next: null\ntotal: {}\n", inbounds.len()));
    out
}

/// Client side of the integrity protocol (`stream::client`) with the upload paced: `n_up`
/// bytes in `chunk`-byte writes with `pause` between them, so a flow lasts long enough to
/// span reloads and drains. The download is not paced (the client reads as fast as it can).
pub async fn paced_client<S: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: S,
    n_up: u64,
    n_down: u64,
    chunk: usize,
    pause: Duration,
) -> std::io::Result<Outcome> {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut header = Vec::with_capacity(24);
    header.extend_from_slice(b"ZIH1\0\0\0\0");
    header.extend_from_slice(&n_up.to_le_bytes());
    header.extend_from_slice(&n_down.to_le_bytes());
    let send = async {
        w.write_all(&header).await?;
        let mut g = Gen::new(UP_SEED);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; chunk];
        let mut left = n_up;
        while left > 0 {
            let k = usize::try_from(left.min(chunk as u64)).expect("chunk");
            g.fill(&mut buf[..k]);
            h.update(&buf[..k]);
            w.write_all(&buf[..k]).await?;
            left -= k as u64;
            tokio::time::sleep(pause).await;
        }
        w.flush().await?;
        let sent: [u8; 32] = h.finalize().into();
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

/// Bytes each side sends in one run of the protocol over plain TCP: (client → dataplane,
/// dataplane → client). The header is 24 bytes; the answer adds a 16-byte name and a 32-byte
/// digest.
pub fn protocol_bytes(n_up: u64, n_down: u64) -> (u64, u64) {
    (24 + n_up, 16 + n_down + 32)
}

/// Waits until process `pid` has exited (gone, or a zombie waiting to be reaped).
pub fn wait_exit(pid: u32, timeout: Duration) -> bool {
    wait_until(timeout, || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    })
}

/// Plain-TCP dataplanes on the test topology serving the integrity protocol, one per
/// `(k, port, name)`; returns their counters.
pub fn plain_dataplanes(
    topo: &Topology,
    dps: &[(usize, u16, &str)],
) -> Vec<std::sync::Arc<crate::stream::ServerStats>> {
    dps.iter()
        .map(|(k, port, name)| {
            let addr = SocketAddr::new(Topology::dataplane_v4(*k).into(), *port);
            crate::stream::spawn_dataplane(topo.dataplanes[k - 1].listen(addr), name, None)
        })
        .collect()
}

/// The passthrough listener address on the test topology.
pub fn ingress_addr(port: u16) -> SocketAddr {
    SocketAddr::new(Topology::ingress_v4().into(), port)
}

/// Runs one plain-TCP protocol exchange from the client namespace through the ingress.
pub async fn plain_flow(topo: &Topology, port: u16, n_up: u64, n_down: u64) -> std::io::Result<Outcome> {
    let tcp = topo.client.connect(ingress_addr(port))?;
    tokio::time::timeout(Duration::from_secs(60), crate::stream::client(tcp, n_up, n_down))
        .await
        .map_err(|_| std::io::Error::other("flow timed out"))?
}

/// Ids of the BPF programs process `pid` holds open (from `/proc/<pid>/fdinfo`).
pub fn bpf_prog_ids(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return Vec::new() };
    let mut ids: Vec<u32> = dir
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("prog_id:").and_then(|v| v.trim().parse().ok())))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The BPF program `id` still exists (`bpftool prog show id <id>`).
pub fn bpf_prog_exists(id: u32) -> bool {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool prog show id")
        .status
        .success()
}

/// Loads an nftables script into `ns` (nft is installed by `cargo xtask setup`).
pub fn nft(ns: &Netns, script: &str) {
    use std::io::Write as _;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft (installed by `cargo xtask setup`)");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("nft script");
    let out = child.wait_with_output().expect("nft");
    assert!(out.status.success(), "nft: {}\n{script}", String::from_utf8_lossy(&out.stderr));
}

/// The network namespace's SNMP counter `name` (`nstat -az`, e.g. `TcpRetransSegs`).
pub fn nstat(ns: &Netns, name: &str) -> u64 {
    let out = ns.command("nstat").args(["-az", name]).output().expect("nstat");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// Packets counted by the `counter` rules of table `inet TABLE` in `ns`.
pub fn nft_counted(ns: &Netns, table: &str) -> u64 {
    let out = ns.command("nft").args(["list", "table", "inet", table]).output().expect("nft list");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("packets ").skip(1).filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok()).sum()
}
