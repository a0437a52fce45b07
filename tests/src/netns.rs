//! Network namespaces created and removed by the test itself.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// One network namespace, deleted on drop (which also destroys its veth ends).
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    pub fn new(name: &str) -> Self {
        // A leftover from an interrupted run would make `ip netns add` fail.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ...`.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Runs `f` on a thread that entered this namespace; sockets it creates live here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns on this thread only, with a namespace fd we hold open.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Binds a listener here and hands it to the current tokio runtime.
    pub fn listen(&self, addr: SocketAddr) -> tokio::net::TcpListener {
        let l = self
            .run(|| std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", self.name));
        l.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpListener::from_std(l).expect("tokio listener")
    }

    /// Connects from this namespace (blocking connect on the namespace thread).
    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let s = self.run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
        s.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(s)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The three-tier topology of the module docs.
pub struct Topology {
    pub client: Netns,
    pub ingress: Netns,
    pub dataplanes: Vec<Netns>,
}

impl Topology {
    /// Client, ingress and `n` dataplane namespaces, with unique names for this process.
    pub fn new(n: usize) -> Self {
        crate::require_root();
        let id = format!("{}{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed));
        let client = Netns::new(&format!("zit{id}c"));
        let ingress = Netns::new(&format!("zit{id}i"));
        link(&client, "c0", &ingress, "i0", 0, 1, 2);
        let mut dataplanes = Vec::new();
        for k in 1..=n {
            let dp = Netns::new(&format!("zit{id}d{k}"));
            link(&ingress, &format!("i{k}"), &dp, "d0", u8::try_from(k).expect("k < 256"), 1, 2);
            dataplanes.push(dp);
        }
        // Lets IPv6 addresses settle (nodad avoids the DAD wait; this covers link-up).
        std::thread::sleep(Duration::from_millis(50));
        Self { client, ingress, dataplanes }
    }

    /// The ingress address facing the client.
    pub fn ingress_v4() -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 2)
    }

    pub fn ingress_v6() -> Ipv6Addr {
        "2001:2::2".parse().expect("v6")
    }

    /// Dataplane k's address (k from 1).
    pub fn dataplane_v4(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, u8::try_from(k).expect("k < 256"), 2)
    }

    pub fn dataplane_v6(k: usize) -> Ipv6Addr {
        format!("2001:2:0:{k:x}::2").parse().expect("v6")
    }

    pub fn dataplane_addr(k: usize, v6: bool) -> IpAddr {
        if v6 { Self::dataplane_v6(k).into() } else { Self::dataplane_v4(k).into() }
    }
}

/// veth between `a` and `b` on subnet 198.18.<net>.0/24 and 2001:2:0:<net>::/64.
fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str, net: u8, a_host: u8, b_host: u8) {
    ip(&["link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name]);
    for (ns, ifname, host) in [(a, a_if, a_host), (b, b_if, b_host)] {
        ns.ip(&["addr", "add", &format!("198.18.{net}.{host}/24"), "dev", ifname]);
        ns.ip(&["-6", "addr", "add", &format!("2001:2:0:{net:x}::{host}/64"), "dev", ifname, "nodad"]);
        ns.ip(&["link", "set", ifname, "up"]);
    }
}
