//! Command line (kuma-dp's flag names where they mean the same thing) and the `run` /
//! `validate` entry points.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

use tokio::sync::mpsc;

use crate::{
    admin,
    config::{self, Diagnostic},
    metrics::Metrics,
    reload::{self, Reloader},
    routing::RouteTable,
    server::{self, Ingress, Options, Snapshot},
    signal::{Event, Signals},
    splice::{Limits, SpliceMode, kernel::KernelSplice},
    xdp::{self, XdpMode},
};

/// Exit code for invalid configuration (linkerd's convention: EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "zone-ingress", version, about = "Kuma ZoneIngress data plane: SNI passthrough with in-kernel splice")]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ZONE_INGRESS_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// The access log (one `access` line per closed or rejected connection). `off` saves its
    /// formatting and write, about 15 µs of CPU per connection.
    #[arg(long, global = true, value_enum, default_value_t = AccessLog::On, env = "ZONE_INGRESS_ACCESS_LOG")]
    pub access_log: AccessLog,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccessLog {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the ingress.
    Run(RunArgs),
    /// Check the ZoneIngress file, the inventory and (if given) the XDP guard file, print every
    /// problem, and exit.
    Validate(ValidateArgs),
}

/// The two inputs, shared by `run` and `validate`.
#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    /// The ZoneIngress resource (YAML), as for `kuma-dp run --dataplane-file`.
    #[arg(long, env = "KUMA_DATAPLANE_RUNTIME_RESOURCE_PATH")]
    pub dataplane_file: PathBuf,
    /// Local inventory: Kuma Dataplane resources (one document, a `---` stream, a kumactl
    /// `items:` list, or a directory of such files).
    #[arg(long)]
    pub dataplanes: PathBuf,
    /// `{{ key }}` substitutions in the dataplane file (repeatable), as kuma-dp.
    #[arg(long = "dataplane-var", value_parser = parse_var)]
    pub dataplane_vars: Vec<(String, String)>,
    /// The zone this ingress serves (for MeshService cluster names and the empty-table answer).
    #[arg(long, env = "KUMA_MULTIZONE_ZONE", default_value = "")]
    pub zone: String,
    /// Accepted for kuma-dp compatibility; must be `ingress`.
    #[arg(long, env = "KUMA_DATAPLANE_PROXY_TYPE", default_value = "ingress")]
    pub proxy_type: String,
}

/// `validate`: the inputs of `run`, and the guard file if there is one.
#[derive(Args, Debug)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub inputs: InputArgs,
    /// The XDP guard file, checked like `run --xdp-config` loads it.
    #[arg(long, env = "ZONE_INGRESS_XDP_CONFIG")]
    pub xdp_config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub inputs: InputArgs,
    /// Which path moves bytes after routing.
    #[arg(long, value_enum, default_value_t = SpliceMode::Auto)]
    pub splice: SpliceMode,
    /// How long established flows may keep running after SIGTERM/SIGINT.
    #[arg(long, env = "KUMA_DATAPLANE_DRAIN_TIME", value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_time: Duration,
    /// Give up on an incomplete ClientHello after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    pub client_hello_timeout: Duration,
    /// Per-attempt backend connect timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,
    /// Endpoints tried per connection when connects fail.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub connect_attempts: u16,
    /// Close a flow after this long without a byte either way.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub idle_timeout: Duration,
    /// Concurrent connections per cluster.
    #[arg(long, default_value_t = 1024)]
    pub max_connections_per_cluster: usize,
    /// Memory guard: bytes a kernel-spliced connection may have queued toward a slow peer.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_in_flight_bytes: u64,
    /// Memory guard: how long a connection may stay above the in-flight cap.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub in_flight_grace: Duration,
    /// Global cap on kernel-spliced connections (beyond it: userspace relay).
    #[arg(long, default_value_t = Limits::default().max_spliced)]
    pub max_spliced: usize,
    /// Kernel splice: monitor threads (close handling, backpressure, relaying held directions);
    /// default: one per CPU, at most 4.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub splice_threads: Option<u16>,
    /// Non-Kuma extension, off by default: route connections that do not start with a TLS
    /// ClientHello as if they carried this SNI (e.g. `iperf{mesh=default}`).
    #[arg(long)]
    pub plaintext_route: Option<String>,
    /// Listener sockets (SO_REUSEPORT); default: one per CPU.
    #[arg(long)]
    pub listeners: Option<usize>,
    /// Address the admin server binds to, on the ZoneIngress's `networking.admin.port`. It
    /// serves state and a shutdown trigger: keep it on loopback unless something else guards it.
    #[arg(long, default_value_t = crate::admin::DEFAULT_ADMIN_ADDRESS, env = "ZONE_INGRESS_ADMIN_ADDRESS")]
    pub admin_address: std::net::IpAddr,
    /// XDP guard in front of the listener: `auto` attaches natively where the driver can and
    /// generically otherwise, and runs without it if neither works; `native`/`generic` insist.
    /// Default: `auto` with `--xdp-config`, else `off`.
    #[arg(long, value_enum, env = "ZONE_INGRESS_XDP")]
    pub xdp: Option<XdpMode>,
    /// The XDP guard's CIDR lists and SYN limit (YAML, see README); re-read on SIGHUP and
    /// configuration reloads. `--xdp auto|native|generic` without it: no lists, no SYN limit,
    /// only the early drops.
    #[arg(long, env = "ZONE_INGRESS_XDP_CONFIG")]
    pub xdp_config: Option<PathBuf>,
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.trim().to_owned(), v.to_owned())).filter(|(k, _)| !k.is_empty()).ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// Sets up `tracing` from `RUST_LOG` (default `info`).
pub fn init_tracing(cli: &Cli) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.access_log == AccessLog::Off
        && let Ok(d) = "access=off".parse()
    {
        filter = filter.add_directive(d);
    }
    // Colours only on a terminal: files and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stdout);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Both inputs, checked.
pub struct Inputs {
    pub zone_ingress: config::ZoneIngress,
    pub inventory: config::Inventory,
    pub warnings: Vec<Diagnostic>,
}

/// Loads and validates both inputs, reporting every problem of both at once.
pub fn load_inputs(args: &InputArgs) -> Result<Inputs, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    if args.proxy_type != "ingress" {
        problems.push(Diagnostic::error(
            PathBuf::from("--proxy-type"),
            "proxy-type",
            format!("zone-ingress only serves --proxy-type=ingress, got {:?}", args.proxy_type),
        ));
    }
    let vars: BTreeMap<String, String> = args.dataplane_vars.iter().cloned().collect();
    let zi = config::load_zone_ingress(&args.dataplane_file, &vars);
    let inv = config::load_inventory(&args.dataplanes);
    let mut warnings = Vec::new();
    let zi = match zi {
        Ok(l) => {
            warnings.extend(l.warnings);
            Some(l.value)
        }
        Err(e) => {
            problems.extend(e.diagnostics);
            None
        }
    };
    let inv = match inv {
        Ok(l) => {
            warnings.extend(l.warnings);
            Some(l.value)
        }
        Err(e) => {
            problems.extend(e.diagnostics);
            None
        }
    };
    match (zi, inv) {
        (Some(zone_ingress), Some(inventory)) if problems.is_empty() => Ok(Inputs { zone_ingress, inventory, warnings }),
        _ => Err(problems),
    }
}

fn report(problems: &[Diagnostic]) {
    let mut errors = 0;
    for p in problems {
        if p.is_error() {
            errors += 1;
            error!("{p}");
        } else {
            warn!("{p}");
        }
    }
    error!("{errors} configuration error(s); nothing started");
}

/// `zone-ingress validate`.
pub fn validate(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    // Every problem of the three files in one report.
    let mut problems = Vec::new();
    let inputs = load_inputs(&args.inputs).map_err(|p| problems.extend(p));
    let guard_warnings = match args.xdp_config.as_deref().map(xdp::load_config) {
        Some(Ok(g)) => g.warnings,
        Some(Err(e)) => {
            problems.extend(e.diagnostics);
            Vec::new()
        }
        None => Vec::new(),
    };
    match inputs {
        Ok(inputs) if problems.is_empty() => {
            for w in inputs.warnings.iter().chain(&guard_warnings) {
                warn!("{w}");
            }
            if let Some(path) = &args.xdp_config {
                info!(file = %path.display(), "XDP guard file is valid");
            }
            let table = RouteTable::build(&inputs.inventory, &args.inputs.zone);
            info!(
                listener = %SocketAddr::new(inputs.zone_ingress.address, inputs.zone_ingress.port),
                routes = table.entries().count(),
                dataplanes = inputs.inventory.dataplanes.len(),
                "configuration is valid"
            );
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            report(&problems);
            Ok(ExitCode::from(EXIT_BAD_CONFIG))
        }
    }
}

/// `zone-ingress run`: load, bind, serve; reload on file changes and SIGHUP; drain on
/// SIGUSR2 or `POST /drain_listeners`; shut down on SIGTERM/SIGINT (after the drain time) or
/// `POST /quitquitquit` (at once).
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let inputs = match load_inputs(&args.inputs) {
        Ok(i) => i,
        Err(problems) => {
            report(&problems);
            return Ok(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    for w in &inputs.warnings {
        warn!("{w}");
    }
    let limits = Limits {
        idle_timeout: args.idle_timeout,
        max_in_flight: args.max_in_flight_bytes,
        in_flight_grace: args.in_flight_grace,
        max_spliced: args.max_spliced,
        monitor_threads: args.splice_threads.map_or_else(crate::splice::kernel::default_monitor_threads, usize::from),
        ..Limits::default()
    };
    let kernel = match args.splice {
        SpliceMode::Userspace => {
            info!(mode = "userspace", "splice mode: userspace (chosen by --splice userspace)");
            None
        }
        SpliceMode::Kernel => {
            let k = KernelSplice::load(limits.clone()).context("--splice kernel: loading the eBPF splice")?;
            info!(mode = "kernel", "splice mode: kernel (sockhash + sk_skb verdict)");
            Some(k)
        }
        SpliceMode::Auto => match KernelSplice::load(limits.clone()) {
            Ok(k) => {
                info!(mode = "kernel", "splice mode: kernel (auto: eBPF loaded)");
                Some(k)
            }
            Err(e) => {
                warn!(mode = "userspace", error = %e, "splice mode: userspace (auto: the eBPF splice could not load)");
                None
            }
        },
    };
    raise_fd_limit();
    let Inputs { zone_ingress: zi, inventory, .. } = inputs;
    let xdp_guard = match xdp::start(args.xdp, args.xdp_config.as_deref(), zi.listen_addr()) {
        Ok(guard) => guard.map(Arc::new),
        Err(xdp::StartError::Config(problems)) => {
            report(&problems);
            return Ok(ExitCode::from(EXIT_BAD_CONFIG));
        }
        Err(e) => return Err(e.into()),
    };
    let table = RouteTable::build(&inventory, &args.inputs.zone);
    if let Some(sni) = &args.plaintext_route
        && table.lookup(sni).is_err()
    {
        bail!("--plaintext-route {sni:?} does not match any route of the inventory");
    }
    info!(routes = table.entries().count(), "routing table built");
    let options = Options {
        client_hello_timeout: args.client_hello_timeout,
        connect_timeout: args.connect_timeout,
        connect_attempts: usize::from(args.connect_attempts),
        max_cluster_connections: args.max_connections_per_cluster,
        plaintext_route: args.plaintext_route.clone(),
        proxy_id: zi.name.clone(),
        zone: args.inputs.zone.clone(),
        splice: args.splice,
        limits,
        ..Options::default()
    };
    let listen = zi.listen_addr();
    let keepalive = options.limits.keepalive;
    let n = args.listeners.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut signals = Signals::new().context("installing signal handlers")?;
        // Our listeners share their port with SO_REUSEPORT, which would also let a second
        // instance started by mistake bind it and silently take half of the connections.
        server::check_port_free(listen).with_context(|| format!("binding the listener {listen}"))?;
        let listeners = server::bind(listen, n, keepalive).with_context(|| format!("binding the listener {listen}"))?;
        let metrics = Arc::new(Metrics::default());
        let snapshot = Snapshot {
            version: 1,
            clusters: metrics.clusters_for(&table),
            available_services: table.available_services(&inventory),
            dataplanes: inventory.dataplanes.len(),
            inventory: Arc::new(inventory),
            zone_ingress: Some(zi.clone()),
            loaded_at: SystemTime::now(),
            table: Arc::new(table),
        };
        let ingress = Ingress::with_snapshot(options, metrics, snapshot, kernel);
        ingress.start_listeners(listeners);
        let (commands_tx, mut commands_rx) = mpsc::channel(4);
        let info = admin::Info {
            dataplane_file: args.inputs.dataplane_file.clone(),
            dataplanes: args.inputs.dataplanes.clone(),
            drain_time: args.drain_time,
            listeners: n,
            xdp: xdp_guard.clone(),
        };
        let admin_addr = SocketAddr::new(args.admin_address, zi.admin_port);
        let mut admin_server = start_admin(&ingress, admin_addr, &commands_tx, &info);
        let reloader = Reloader { args: args.inputs.clone(), listeners: n };
        let (changes_tx, mut changes_rx) = mpsc::channel(1);
        // Without a watcher the files still reload on SIGHUP.
        let _watcher = reload::watch(&args.inputs, changes_tx).map_err(|e| warn!(error = %e, "cannot watch the configuration files; reload with SIGHUP")).ok();
        info!(%listen, listeners = n, admin = %admin_addr, "ready");

        let drain_time = loop {
            let trigger = tokio::select! {
                event = signals.next() => match event {
                    Event::Shutdown(_) => break args.drain_time,
                    Event::Reload => "SIGHUP",
                    Event::DrainListeners => {
                        ingress.stop_listeners().await;
                        continue;
                    }
                },
                Some(command) = commands_rx.recv() => match command {
                    admin::Command::Quit => {
                        info!("POST /quitquitquit: exiting now");
                        break Duration::ZERO;
                    }
                    admin::Command::DrainListeners => {
                        info!("POST /drain_listeners: draining the listener");
                        ingress.stop_listeners().await;
                        continue;
                    }
                },
                Some(()) = changes_rx.recv() => {
                    // Editors write in several steps: let the burst settle, then read once.
                    tokio::time::sleep(RELOAD_SETTLE).await;
                    while changes_rx.try_recv().is_ok() {}
                    "file change"
                },
            };
            let reloaded = reloader.reload(&ingress, trigger);
            if let Some(guard) = &xdp_guard {
                guard.reload(ingress.listener_addr(), trigger);
            }
            if let Ok(applied) = reloaded {
                let wanted = SocketAddr::new(args.admin_address, applied.admin_port);
                if admin_server.as_ref().map(admin::AdminServer::addr) != Some(wanted) {
                    info!(admin = %wanted, "admin port changed; rebinding the admin server");
                    drop(admin_server.take());
                    admin_server = start_admin(&ingress, wanted, &commands_tx, &info);
                }
            }
        };

        // kuma-dp semantics: not ready, stop accepting, let established flows finish.
        ingress.begin_termination();
        ingress.stop_listeners().await;
        let deadline = Instant::now() + drain_time;
        info!(drain_time = %humantime::format_duration(drain_time), open = ingress.open_connections(), "draining");
        let left = ingress.wait_idle(deadline).await;
        if left > 0 {
            warn!(left, "drain time over; closing the remaining connections");
            ingress.abort_flows();
            // Relays log their close as they see the abort; give them a moment.
            let _ = ingress.wait_idle(Instant::now() + Duration::from_secs(2)).await;
        } else {
            info!("all flows finished");
        }
        drop(admin_server);
        anyhow::Ok(())
    })?;
    // Dropping the runtime dropped the last handles: the verdict program is detached and no
    // map or program of ours remains (nothing is pinned).
    drop(runtime);
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// How long a burst of file events must be quiet before the reload reads the files.
const RELOAD_SETTLE: Duration = Duration::from_millis(250);

/// Binds and starts the admin server; a failure is logged, not fatal (the data path keeps
/// running; readiness probes then fail visibly).
fn start_admin(ingress: &Arc<Ingress>, addr: SocketAddr, commands: &mpsc::Sender<admin::Command>, info: &admin::Info) -> Option<admin::AdminServer> {
    match admin::bind(addr) {
        Ok(listener) => Some(admin::AdminServer::start(Arc::clone(ingress), listener, commands.clone(), info.clone())),
        Err(e) => {
            error!(%addr, error = %e, "cannot bind the admin server; /ready, /stats and /config_dump are unavailable");
            None
        }
    }
}

/// Raises the soft open-file limit to the hard limit: every connection holds two sockets.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit with a valid out-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const wanted) == 0 {
                lim = wanted;
            }
        }
    }
    info!(max_open_files = lim.rlim_cur, "file descriptor limit");
}
