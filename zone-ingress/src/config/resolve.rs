//! DNS names in a Dataplane's `networking.address` and `networking.advertisedAddress`, resolved
//! when the inventory is read (at start and on every reload) as the control plane resolves them
//! before it hands endpoints to its proxies (`docs/operations.md#input-forms`).
//!
//! Names are looked up with the system resolver (`getaddrinfo`: `/etc/hosts`, then DNS as
//! `nsswitch.conf` says), each distinct name once per load, on up to [`MAX_THREADS`] threads at
//! once, all within one bound ([`RESOLVE_TIMEOUT`]) for the whole load: a resolver that hangs
//! delays a load by that much at most, and the names it has not answered by then count as
//! unresolved. A look-up still running at the bound is left to finish on its own thread; its
//! answer is dropped.

use std::{
    collections::HashMap,
    net::{IpAddr, ToSocketAddrs},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

/// How long one load may spend resolving names, all of them together.
pub(crate) const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most look-ups under way at once.
pub(crate) const MAX_THREADS: usize = 16;

/// Looks a host name up: every address it has, or why not.
pub(crate) trait Resolver: Send + Sync {
    fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String>;
}

/// The system resolver (`getaddrinfo`).
pub(crate) struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        (host, 0u16).to_socket_addrs().map(|addrs| addrs.map(|a| a.ip()).collect()).map_err(|e| e.to_string())
    }
}

/// The shared system resolver.
pub(crate) fn system() -> Arc<dyn Resolver> {
    Arc::new(SystemResolver)
}

/// The address used for a name that resolves to `ips`: as the control plane does, the one whose
/// text form sorts first (so the choice does not depend on the resolver's order), IPv4 addresses
/// mapped into IPv6 written as IPv4. No family is preferred as such: `localhost` gives
/// `127.0.0.1` (before `::1`), but `2001:2::1` comes before `203.0.113.1`.
pub(crate) fn pick(ips: &[IpAddr]) -> Option<IpAddr> {
    ips.iter().map(|ip| ip.to_canonical()).min_by_key(ToString::to_string)
}

/// Resolves every name of `names` with `resolver` within `timeout`, on up to [`MAX_THREADS`]
/// threads: each name's address ([`pick`]), or why it has none.
pub(crate) fn resolve_all(
    names: Vec<String>,
    resolver: &Arc<dyn Resolver>,
    timeout: Duration,
) -> HashMap<String, Result<IpAddr, String>> {
    let deadline = Instant::now() + timeout;
    let names = Arc::new(names);
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<(usize, Result<IpAddr, String>)>();
    let mut results: HashMap<String, Result<IpAddr, String>> = HashMap::with_capacity(names.len());
    let mut spawn_error = None;
    for _ in 0..names.len().min(MAX_THREADS) {
        let (names, next, tx, resolver) = (Arc::clone(&names), Arc::clone(&next), tx.clone(), Arc::clone(resolver));
        let spawned = thread::Builder::new().name("resolve".into()).spawn(move || {
            // Past the deadline nobody waits for an answer: take no further name.
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = names.get(i) else { break };
                let answer = resolver
                    .lookup(name)
                    .and_then(|ips| pick(&ips).ok_or_else(|| "the name has no address".to_owned()));
                if tx.send((i, answer)).is_err() {
                    break;
                }
            }
        });
        if let Err(e) = spawned {
            spawn_error = Some(format!("cannot start a resolver thread: {e}"));
            break;
        }
    }
    drop(tx);
    let mut pending = names.len();
    while pending > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, answer)) => {
                results.insert(names[i].clone(), answer);
                pending -= 1;
            }
            // Timeout, or every thread is gone (none could be started).
            Err(_) => break,
        }
    }
    let unanswered = spawn_error.unwrap_or_else(|| format!("no answer within {} s", timeout.as_secs_f32()));
    for name in names.iter() {
        results.entry(name.clone()).or_insert_with(|| Err(unanswered.clone()));
    }
    results
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Mutex, PoisonError};

    use super::*;

    /// A resolver that answers from a table; names not in it fail; names mapped to `None` hang
    /// until [`TableResolver::release`].
    pub(crate) struct TableResolver {
        table: HashMap<String, Option<Vec<IpAddr>>>,
        hang: Mutex<mpsc::Receiver<()>>,
        release: Mutex<Option<mpsc::Sender<()>>>,
    }

    impl TableResolver {
        pub(crate) fn new(entries: &[(&str, Option<&[&str]>)]) -> Arc<Self> {
            let (release, hang) = mpsc::channel();
            let table = entries
                .iter()
                .map(|(name, ips)| {
                    let ips = ips.map(|ips| ips.iter().map(|ip| ip.parse().expect("test IP")).collect());
                    ((*name).to_owned(), ips)
                })
                .collect();
            Arc::new(Self { table, hang: Mutex::new(hang), release: Mutex::new(Some(release)) })
        }

        /// Itself as the loader takes a resolver.
        pub(crate) fn dyn_ref(self: &Arc<Self>) -> Arc<dyn Resolver> {
            Arc::clone(self) as Arc<dyn Resolver>
        }

        /// Lets the hanging look-ups return (with an error).
        pub(crate) fn release(&self) {
            self.release.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
    }

    impl Resolver for TableResolver {
        fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
            match self.table.get(host) {
                Some(Some(ips)) => Ok(ips.clone()),
                Some(None) => {
                    // Blocks until the sender is dropped.
                    let _ = self.hang.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    Err("released".to_owned())
                }
                None => Err("Name or service not known".to_owned()),
            }
        }
    }

    #[test]
    fn the_smallest_text_form_is_picked() {
        let ips = |s: &[&str]| s.iter().map(|ip| ip.parse().expect("ip")).collect::<Vec<IpAddr>>();
        assert_eq!(pick(&ips(&["::1", "127.0.0.1"])), Some("127.0.0.1".parse().expect("ip")));
        assert_eq!(pick(&ips(&["198.18.0.9", "198.18.0.10"])), Some("198.18.0.10".parse().expect("ip")));
        assert_eq!(pick(&ips(&["::ffff:198.18.0.1", "2001:2::1"])), Some("198.18.0.1".parse().expect("ip")));
        assert_eq!(pick(&ips(&["2001:2::1", "1.2.3.4"])), Some("1.2.3.4".parse().expect("ip")));
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn a_hanging_resolver_holds_the_load_only_until_the_bound() {
        let mut entries: Vec<(String, Option<&[&str]>)> =
            vec![("ok.test".to_owned(), Some(&["198.18.0.1"])), ("nx.test".to_owned(), Some(&[]))];
        // More hanging names than threads: the queue behind them is not waited for either.
        entries.extend((0..MAX_THREADS + 4).map(|i| (format!("hang-{i}.test"), None)));
        let refs: Vec<(&str, Option<&[&str]>)> = entries.iter().map(|(n, ips)| (n.as_str(), *ips)).collect();
        let table = TableResolver::new(&refs);
        let resolver: Arc<dyn Resolver> = table.clone();
        let names: Vec<String> = entries.iter().map(|(n, _)| n.clone()).chain(["unknown.test".to_owned()]).collect();
        let started = Instant::now();
        let results = resolve_all(names, &resolver, Duration::from_millis(300));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");
        assert_eq!(results["ok.test"], Ok("198.18.0.1".parse().expect("ip")));
        assert_eq!(results["nx.test"], Err("the name has no address".to_owned()));
        for name in (0..MAX_THREADS + 4).map(|i| format!("hang-{i}.test")).chain(["unknown.test".to_owned()]) {
            let r = &results[&name];
            assert!(matches!(r, Err(e) if e.contains("no answer within 0.3 s")), "{name}: {r:?}");
        }
        table.release();
    }

    #[test]
    fn the_system_resolver_resolves_localhost_and_fails_on_invalid() {
        let resolver = system();
        let names = vec!["localhost".to_owned(), "no-such-host.invalid".to_owned()];
        let results = resolve_all(names, &resolver, RESOLVE_TIMEOUT);
        let local = results["localhost"].as_ref().expect("localhost resolves");
        assert!(local.is_loopback(), "{local}");
        assert!(results["no-such-host.invalid"].is_err(), "{results:?}");
    }
}
