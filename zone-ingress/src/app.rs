//! The daemon's lifecycle: load → start → serve → reload → drain, and `validate`.
//!
//! - load: both inputs (and the XDP guard file) are checked together; any error exits 64 with
//!   every problem reported and nothing started;
//! - start: the eBPF object, the splice mode, the XDP guard, the listeners, the admin server;
//! - serve: signals, admin commands and file changes until a shutdown; each reload validates
//!   the files and swaps the configuration atomically ([`crate::reload`]);
//! - drain: not ready, stop accepting, let established flows finish for the drain time, then
//!   close the rest.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    admin,
    cli::{RunArgs, ValidateArgs},
    config::{self, Diagnostic, Inputs, Sources, ZoneIngress},
    control_plane, ebpf,
    metrics::Metrics,
    reload::{self, Reloader},
    routing::RouteTable,
    server::{self, Ingress, Options, Snapshot},
    signal::{Event, Signals},
    splice::{self, Limits, ReportReceiver, SpliceMode, packet::PacketSplice, sockmap::KernelSplice},
    xdp,
};

/// Exit code for invalid configuration (linkerd's convention: EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// How long the files must be quiet (no event, no change of size or time) before a reload
/// reads them.
const RELOAD_SETTLE: Duration = Duration::from_millis(250);
/// How long an empty input file must stay empty before a reload applies it: `cat new > file`
/// truncates before it writes.
const EMPTY_SETTLE: Duration = Duration::from_secs(2);
/// A reload waits at most this long for the files to settle.
const RELOAD_SETTLE_MAX: Duration = Duration::from_secs(10);

/// Logs every problem of a rejected configuration.
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
///
/// # Errors
/// None today: every problem is a configuration problem, reported with exit code 64.
pub fn validate(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let sources = Sources::from(&args.inputs);
    if args.inputs.control_plane.cp_address.is_some() {
        // The routes come from the control plane: only the ZoneIngress file is ours to check.
        return Ok(match load_zone_ingress_only(&sources) {
            Ok(zi) => {
                info!(listener = %zi.listen_addr(), "configuration is valid (routes come from the control plane)");
                ExitCode::SUCCESS
            }
            Err(problems) => {
                report(&problems);
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        });
    }
    // Every problem of the three files in one report.
    let mut problems = Vec::new();
    let inputs = config::load_inputs(&sources).map_err(|p| problems.extend(p));
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
            let table = RouteTable::build(&inputs.inventory, &sources.zone);
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

/// `zone-ingress run`: load, start, serve; reload on file changes and SIGHUP; drain on
/// SIGUSR2 or `POST /drain_listeners`; shut down on SIGTERM/SIGINT (after the drain time) or
/// `POST /quitquitquit` (at once).
///
/// # Errors
/// A start that failed (the splice or guard a flag insists on, the listener, the runtime).
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    if let Some(read_only) = args.read_only_admin_address {
        admin::check_read_only_address(args.admin_address, read_only).map_err(anyhow::Error::msg)?;
    }
    if args.inputs.control_plane.cp_address.is_some() {
        return run_with_control_plane(args);
    }
    let sources = Sources::from(&args.inputs);
    // Load. What the files looked like before: a change from here until the watcher is armed
    // (just before "ready") is then still applied.
    let loaded = reload::Fingerprint::read(&sources);
    let inputs = match config::load_inputs(&sources) {
        Ok(i) => i,
        Err(problems) => {
            report(&problems);
            return Ok(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    for w in &inputs.warnings {
        warn!("{w}");
    }
    // The parse trees are gone; their pages go back to the kernel (a large inventory's are
    // hundreds of MiB).
    crate::sys::trim_heap();
    let limits = args.limits();
    let kernel = match start_kernel_side(&args, &limits, inputs.zone_ingress.listen_addr())? {
        Ok(k) => k,
        Err(code) => return Ok(code),
    };
    let Inputs { zone_ingress: zi, inventory, .. } = inputs;
    let metrics = Arc::new(Metrics::default());
    let snapshot = Snapshot::build(&metrics, Some(zi.clone()), inventory, &sources.zone);
    info!(routes = snapshot.table.entries().count(), "routing table built");
    if let Some(sni) = &args.plaintext_route
        && snapshot.table.lookup(sni).is_err()
    {
        bail!("--plaintext-route {sni:?} does not match any route of the inventory");
    }
    let started = Started { zi, metrics, snapshot, limits, kernel };
    serve_until_stopped(args, started, async move { Ok(Loaded { sources, fingerprint: loaded, control_plane: None }) })
}

/// What `run` has built before the runtime starts.
struct Started {
    zi: ZoneIngress,
    metrics: Arc<Metrics>,
    snapshot: Snapshot,
    limits: Limits,
    kernel: KernelSide,
}

/// On a new runtime: `inputs` (which may talk to the control plane first), then start, serve
/// and drain.
fn serve_until_stopped(
    args: RunArgs,
    started: Started,
    inputs: impl Future<Output = anyhow::Result<Loaded>>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let Started { zi, metrics, snapshot, limits, kernel } = started;
        let inputs = inputs.await?;
        let mut app = App::start(args, inputs, &zi, metrics, snapshot, limits, kernel)?;
        match app.serve().await {
            Stop::Drain(drain_time) => app.drain(drain_time).await,
            Stop::Handover => app.handover().await,
        }
        anyhow::Ok(())
    })?;
    // Dropping the runtime dropped the last handles: the verdict program is detached and no
    // map or program of ours remains, but the packet splice's pins after a handover.
    drop(runtime);
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The ZoneIngress file alone (control-plane mode), its warnings logged.
fn load_zone_ingress_only(sources: &Sources) -> Result<ZoneIngress, Vec<Diagnostic>> {
    let loaded = config::load_zone_ingress_input(sources)?;
    for w in &loaded.warnings {
        warn!("{w}");
    }
    Ok(loaded.value)
}

/// The control-plane settings of `args` for the checked ZoneIngress `zi`: the token and CA
/// read, the resource as JSON for the bootstrap request.
fn control_plane_settings(
    args: &RunArgs,
    sources: &Sources,
    zi: &ZoneIngress,
) -> anyhow::Result<control_plane::Settings> {
    let cp = &args.inputs.control_plane;
    let url = control_plane::Settings::parse_url(cp.cp_address.as_deref().unwrap_or_default())?;
    let token = match (&cp.dataplane_token_file, &cp.dataplane_token) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("--dataplane-token-file {}", path.display()))?
            .trim()
            .to_owned(),
        (None, Some(token)) => token.trim().to_owned(),
        (None, None) => String::new(),
    };
    if token.is_empty() {
        warn!(
            "no dataplane token (--dataplane-token-file): a control plane with authentication will refuse this proxy"
        );
    }
    let ca = cp
        .ca_cert_file
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("--ca-cert-file {}", p.display())))
        .transpose()?;
    // kuma-dp sends the resource as JSON in Universal form (what the control plane parses,
    // whichever form the file was written in), after the `--dataplane-var` substitutions.
    let mut networking = serde_json::json!({
        "address": zi.address.to_string(),
        "port": zi.port,
        "admin": {"port": zi.admin_port},
    });
    if let Some((address, port)) = zi.advertised() {
        networking["advertisedAddress"] = address.into();
        networking["advertisedPort"] = port.into();
    }
    let resource = serde_json::json!({"type": "ZoneIngress", "name": zi.name, "networking": networking});
    Ok(control_plane::Settings {
        url,
        token,
        token_path: cp.dataplane_token_file.clone(),
        ca,
        mesh: cp.mesh.clone(),
        name: cp.name.clone().unwrap_or_else(|| zi.name.clone()),
        resource: resource.to_string(),
        zone: sources.zone.clone(),
        retry_backoff: cp.cp_retry_backoff.0,
        retry_max_duration: cp.cp_retry_max_duration.0,
    })
}

/// `run` in control-plane mode: the ZoneIngress file gives the listener and admin addresses,
/// the control plane everything else (docs/design.md#control-plane-mode). The listener is bound
/// at start and accepts once the first configuration is installed.
fn run_with_control_plane(args: RunArgs) -> anyhow::Result<ExitCode> {
    let sources = Sources::from(&args.inputs);
    let zi = match load_zone_ingress_only(&sources) {
        Ok(zi) => zi,
        Err(problems) => {
            report(&problems);
            return Ok(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    let settings = control_plane_settings(&args, &sources, &zi)?;
    if args.plaintext_route.is_some() {
        bail!("--plaintext-route is a file-mode extension; the control plane decides every route");
    }
    let limits = args.limits();
    let kernel = match start_kernel_side(&args, &limits, zi.listen_addr())? {
        Ok(k) => k,
        Err(code) => return Ok(code),
    };
    let metrics = Arc::new(Metrics::default());
    metrics.cp_mode.store(true, std::sync::atomic::Ordering::Relaxed);
    let empty = RouteTable::from_control_plane(&sources.zone, Vec::new(), None);
    let snapshot = Snapshot::from_table(&metrics, Some(zi.clone()), empty);
    let started = Started { zi, metrics, snapshot, limits, kernel };
    serve_until_stopped(args, started, async move {
        let boot = control_plane::bootstrap(&settings).await?;
        let fingerprint = reload::Fingerprint::read(&sources);
        Ok(Loaded { sources, fingerprint, control_plane: Some((settings, boot)) })
    })
}

/// Start: the kernel side first (a flag that insists on it fails before anything binds), from
/// one eBPF object shared by the splice and the XDP guard in front of `listen`. `Ok(Err(code))`:
/// the guard file is invalid (reported).
fn start_kernel_side(
    args: &RunArgs,
    limits: &Limits,
    listen: SocketAddr,
) -> anyhow::Result<Result<KernelSide, ExitCode>> {
    let guard_plan = match xdp::plan(args.xdp, args.xdp_config.as_deref()) {
        Ok(plan) => plan,
        Err(xdp::StartError::Config(problems)) => {
            report(&problems);
            return Ok(Err(ExitCode::from(EXIT_BAD_CONFIG)));
        }
        Err(e) => return Err(e.into()),
    };
    let pins = packet_pins(args, listen);
    let object = load_object(args.splice, guard_plan.as_ref(), pins.clone());
    if let Some(Ok(object)) = &object {
        crate::ebpf_log::start(object);
    }
    let (reports_tx, reports) = splice::report_channel();
    let (splice, packet) =
        start_splices(args.splice, object.clone(), limits, reports_tx, listen, pins.clone(), args.packet_ports)?;
    if packet.is_none()
        && let Some(dir) = &pins
        && splice::packet::pins::pinned_interfaces(dir).is_empty()
    {
        // `auto` without the packet splice: the maps pinned at load serve nobody (a directory
        // with links holds an earlier daemon's flows and stays).
        splice::packet::pins::remove(dir);
    }
    raise_fd_limit();
    let guard = match guard_plan {
        Some(plan) => {
            xdp::start(plan, object.unwrap_or_else(|| Err(Arc::new(ebpf::Error::NoObject))), listen)?.map(Arc::new)
        }
        None => None,
    };
    Ok(Ok(KernelSide { splice, packet, reports, guard }))
}

/// The packet splice's pin directory (`--bpf-pin-dir`), created; `None` when the packet splice
/// is not wanted, pinning is off, or the directory is unusable (logged: flows then end with the
/// process).
fn packet_pins(args: &RunArgs, listen: SocketAddr) -> Option<std::path::PathBuf> {
    if !matches!(args.splice, SpliceMode::Packet | SpliceMode::Auto) {
        return None;
    }
    let dir = match args.bpf_pin_dir.as_deref() {
        Some("off") => return None,
        Some(dir) => std::path::PathBuf::from(dir),
        None => match splice::packet::pins::default_dir(listen) {
            Ok(dir) => {
                for old in splice::packet::pins::other_versions(&dir) {
                    warn!(
                        dir = %old.display(),
                        "packet splice: a daemon of another version left its pins for this namespace and port; \
                         its programs stay attached and its flows run until the directory is removed \
                         (rm -r it once they ended: docs/operations.md#restarts-and-upgrades)"
                    );
                }
                dir
            }
            Err(e) => {
                warn!(error = %e, "packet splice: no pin directory; its flows end with this process");
                return None;
            }
        },
    };
    match splice::packet::pins::prepare(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "packet splice: cannot pin there; its flows end with this process");
            None
        }
    }
}

/// The eBPF object, loaded once if the splice or the guard needs it (`None` if neither does).
fn load_object(
    splice: SpliceMode,
    guard: Option<&xdp::Plan>,
    packet_pins: Option<std::path::PathBuf>,
) -> Option<Result<Arc<ebpf::Object>, Arc<ebpf::Error>>> {
    let wants_splice = splice != SpliceMode::Userspace;
    if !wants_splice && guard.is_none() {
        return None;
    }
    let syn_buckets = guard.map_or(zone_ingress_ebpf::prefilter::DEFAULT_TRACKED_SOURCES, xdp::Plan::tracked_sources);
    Some(
        ebpf::Object::load(ebpf::Users { splice: wants_splice, syn_buckets, packet_pins })
            .map(Arc::new)
            .map_err(Arc::new),
    )
}

/// Loads the splices `--splice` asks for into `object`: the packet splice (`packet`, `auto`)
/// and the sockmap splice (`kernel`, `packet`, `auto`); `None` for a path not used.
fn start_splices(
    mode: SpliceMode,
    object: Option<Result<Arc<ebpf::Object>, Arc<ebpf::Error>>>,
    limits: &Limits,
    reports: splice::ReportSender,
    listen: SocketAddr,
    pins: Option<std::path::PathBuf>,
    ports: Option<splice::packet::ports::Range>,
) -> anyhow::Result<(Option<KernelSplice>, Option<PacketSplice>)> {
    let object = || -> anyhow::Result<Arc<ebpf::Object>> {
        object.clone().context("no eBPF object")?.map_err(|e| anyhow::anyhow!(e))
    };
    let load_kernel =
        || -> anyhow::Result<KernelSplice> { Ok(KernelSplice::load(object()?, limits.clone(), reports.clone())?) };
    let load_packet = || -> anyhow::Result<PacketSplice> {
        let ephemeral = splice::packet::ports::Ephemeral::read().context("reading the kernel's ephemeral ports")?;
        let ports = ephemeral.choose(ports).map_err(|e| anyhow::anyhow!(e))?;
        Ok(PacketSplice::load(object()?, limits.clone(), reports.clone(), listen, pins.clone(), ports)?)
    };
    Ok(match mode {
        SpliceMode::Userspace => {
            info!(mode = "userspace", "splice mode: userspace (chosen by --splice userspace)");
            (None, None)
        }
        SpliceMode::Kernel => {
            let k = load_kernel().context("--splice kernel: loading the eBPF splice")?;
            info!(mode = "kernel", "splice mode: kernel (sockhash + sk_skb verdict)");
            (Some(k), None)
        }
        SpliceMode::Packet => {
            let p = load_packet().context("--splice packet: loading the packet splice")?;
            let k = load_kernel().context("--splice packet: loading the sockmap splice it falls back to")?;
            info!(mode = "packet", "splice mode: packet (tc translation), sockmap and userspace for the rest");
            (Some(k), Some(p))
        }
        SpliceMode::Auto => {
            let packet = match load_packet() {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(error = format!("{e:#}"), "auto: the packet splice could not load; not using it");
                    None
                }
            };
            match load_kernel() {
                Ok(k) => {
                    info!(
                        mode = if packet.is_some() { "packet" } else { "kernel" },
                        "splice mode: auto ({}sockmap, then userspace)",
                        if packet.is_some() { "packet, then " } else { "" }
                    );
                    (Some(k), packet)
                }
                Err(e) => {
                    warn!(
                        mode = "userspace",
                        error = format!("{e:#}"),
                        "splice mode: userspace (auto: the eBPF splice could not load)"
                    );
                    (None, packet)
                }
            }
        }
    })
}

/// What the kernel side started before the runtime: the splice (with the receiver of its close
/// reports) and the XDP guard.
struct KernelSide {
    splice: Option<KernelSplice>,
    packet: Option<PacketSplice>,
    reports: ReportReceiver,
    guard: Option<Arc<xdp::Guard>>,
}

/// Where the inputs come from, and what they looked like when they were loaded.
struct Loaded {
    sources: Sources,
    fingerprint: reload::Fingerprint,
    /// Control-plane mode: the settings and the bootstrap received.
    control_plane: Option<(control_plane::Settings, control_plane::bootstrap::Bootstrap)>,
}

/// The ADS client task of control-plane mode.
struct ControlPlaneTask {
    /// Turns true to close the stream.
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Hears once the first configuration is installed.
    first: mpsc::Receiver<()>,
    /// The bound listener, accepting from the first configuration on.
    pending: Option<Vec<tokio::net::TcpListener>>,
}

/// A started daemon, inside the runtime.
struct App {
    args: RunArgs,
    ingress: Arc<Ingress>,
    signals: Signals,
    commands_tx: mpsc::Sender<admin::Command>,
    commands_rx: mpsc::Receiver<admin::Command>,
    admin: Option<admin::AdminServer>,
    /// `--read-only-admin-address`'s listener, on the same port.
    read_only_admin: Option<admin::AdminServer>,
    info: admin::Info,
    reloader: Reloader,
    xdp_guard: Option<Arc<xdp::Guard>>,
    /// Watches the input files (`None` when it could not: SIGHUP still reloads); its events.
    watcher: Option<reload::Watcher>,
    changes_rx: mpsc::Receiver<()>,
    /// Control-plane mode.
    control_plane: Option<ControlPlaneTask>,
}

impl App {
    /// Binds the listeners and the admin server and starts accepting.
    fn start(
        args: RunArgs,
        Loaded { sources, fingerprint: loaded, control_plane: cp }: Loaded,
        zi: &ZoneIngress,
        metrics: Arc<Metrics>,
        snapshot: Snapshot,
        limits: Limits,
        kernel: KernelSide,
    ) -> anyhow::Result<Self> {
        let signals = Signals::new().context("installing signal handlers")?;
        let listen = zi.listen_addr();
        let n = args.listeners.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        // Our listeners share their port with SO_REUSEPORT, which would also let a second
        // instance started by mistake bind it and silently take half of the connections.
        server::check_port_free(listen).with_context(|| format!("binding the listener {listen}"))?;
        let listener_mss = kernel
            .packet
            .as_ref()
            .and_then(|_| PacketSplice::listener_mss(!splice::packet::switch::unmap(listen.ip()).is_ipv4()));
        let listeners = server::bind(listen, n, limits.keepalive, listener_mss)
            .with_context(|| format!("binding the listener {listen}"))?;
        let options = Options {
            client_hello_timeout: args.client_hello_timeout.0,
            connect_timeout: args.connect_timeout.0,
            connect_attempts: usize::from(args.connect_attempts),
            max_cluster_connections: args.max_connections_per_cluster,
            max_pending_handshakes: args.max_pending_handshakes as usize,
            plaintext_route: args.plaintext_route.clone(),
            proxy_id: zi.name.clone(),
            zone: sources.zone.clone(),
            splice: args.splice,
            limits,
            listener_mss,
            ..Options::default()
        };
        let KernelSide { splice, packet, reports, guard: xdp_guard } = kernel;
        if let Some(p) = &packet {
            p.follow_endpoints(snapshot.table.entries().flat_map(|r| r.endpoints.iter().map(SocketAddr::ip)));
        }
        let ingress = Ingress::with_snapshot(options, metrics, snapshot, splice, packet);
        tokio::spawn(server::close_reports(Arc::clone(&ingress), reports));
        let control_plane = match cp {
            None => {
                adopt(&ingress);
                ingress.start_listeners(listeners);
                None
            }
            Some((settings, boot)) => {
                let (first_tx, first) = mpsc::channel(1);
                let (shutdown, shutdown_rx) = watch::channel(false);
                let task =
                    tokio::spawn(control_plane::serve(settings, boot, Arc::clone(&ingress), first_tx, shutdown_rx));
                Some(ControlPlaneTask { shutdown, task, first, pending: Some(listeners) })
            }
        };
        let (commands_tx, commands_rx) = mpsc::channel(4);
        let info = admin::Info {
            dataplane_file: sources.dataplane_file.clone(),
            dataplanes: sources.dataplanes.clone(),
            drain_time: args.drain_time.0,
            listeners: n,
            xdp: xdp_guard.clone(),
        };
        let admin_addr = SocketAddr::new(args.admin_address, zi.admin_port);
        let admin = start_admin(&ingress, admin_addr, &commands_tx, &info, admin::Role::Full);
        let read_only_addr = args.read_only_admin_address.map(|ip| SocketAddr::new(ip, zi.admin_port));
        let read_only_admin =
            read_only_addr.and_then(|a| start_admin(&ingress, a, &commands_tx, &info, admin::Role::ReadOnly));
        // Watch before "ready", so no change made once the daemon is ready can be missed; a
        // change made since the load is applied at once.
        let (changes_tx, changes_rx) = mpsc::channel(1);
        // Control-plane mode reads its files once, as kuma-dp.
        let watcher = if control_plane.is_some() {
            None
        } else {
            reload::watch(&sources, changes_tx.clone())
                .map_err(|e| warn!(error = %e, "cannot watch the configuration files; reload with SIGHUP"))
                .ok()
        };
        if control_plane.is_none() && reload::Fingerprint::read(&sources) != loaded {
            let _ = changes_tx.try_send(());
        }
        let read_only = read_only_addr.map(tracing::field::display);
        info!(%listen, listeners = n, admin = %admin_addr, read_only_admin = read_only, "ready");
        let reloader = Reloader { sources, listeners: n };
        Ok(Self {
            args,
            ingress,
            signals,
            commands_tx,
            commands_rx,
            admin,
            read_only_admin,
            info,
            reloader,
            xdp_guard,
            watcher,
            changes_rx,
            control_plane,
        })
    }

    /// Serves until a shutdown is asked for; returns how.
    async fn serve(&mut self) -> Stop {
        loop {
            let trigger = tokio::select! {
                event = self.signals.next() => match event {
                    Event::Shutdown(_) => return Stop::Drain(self.args.drain_time.0),
                    Event::Handover => return Stop::Handover,
                    Event::Reload => "SIGHUP",
                    Event::DrainListeners => {
                        self.ingress.stop_listeners().await;
                        continue;
                    }
                },
                Some(command) = self.commands_rx.recv() => match command {
                    admin::Command::Quit => {
                        info!("POST /quitquitquit: exiting now");
                        return Stop::Drain(Duration::ZERO);
                    }
                    admin::Command::DrainListeners => {
                        info!("POST /drain_listeners: draining the listener");
                        self.ingress.stop_listeners().await;
                        continue;
                    }
                },
                Some(()) = async {
                    match &mut self.control_plane {
                        Some(cp) if cp.pending.is_some() => cp.first.recv().await,
                        _ => std::future::pending().await,
                    }
                } => {
                    if let Some(listeners) = self.control_plane.as_mut().and_then(|cp| cp.pending.take())
                        && !self.ingress.listener_drained()
                    {
                        // Adopted flows are registered under the routes of this configuration.
                        adopt(&self.ingress);
                        self.ingress.start_listeners(listeners);
                    }
                    continue;
                },
                Some(()) = self.changes_rx.recv() => {
                    // Editors and `cat >` write in several steps: read once it has settled.
                    settle(&mut self.changes_rx, &self.reloader.sources).await;
                    "file change"
                },
            };
            if let Some(w) = &mut self.watcher {
                w.rearm();
            }
            self.reload(trigger);
        }
    }

    /// Applies the files again, the guard file too, and follows an admin port change (with
    /// both admin listeners).
    fn reload(&mut self, trigger: &str) {
        if self.control_plane.is_some() {
            info!(trigger, "the configuration comes from the control plane; only the XDP guard file is read again");
            if let Some(guard) = &self.xdp_guard {
                guard.reload(self.ingress.listener_addr(), trigger);
            }
            return;
        }
        let reloaded = self.reloader.reload(&self.ingress, trigger);
        if let Some(guard) = &self.xdp_guard {
            guard.reload(self.ingress.listener_addr(), trigger);
        }
        if let Ok(applied) = reloaded {
            let servers = [
                (&mut self.admin, Some(self.args.admin_address), admin::Role::Full),
                (&mut self.read_only_admin, self.args.read_only_admin_address, admin::Role::ReadOnly),
            ];
            for (server, ip, role) in servers {
                let Some(ip) = ip else { continue };
                let wanted = SocketAddr::new(ip, applied.admin_port);
                if server.as_ref().map(admin::AdminServer::addr) != Some(wanted) {
                    info!(admin = %wanted, "admin port changed; rebinding the {} server", role.as_str());
                    drop(server.take());
                    *server = start_admin(&self.ingress, wanted, &self.commands_tx, &self.info, role);
                }
            }
        }
    }

    /// The start of every stop: `/ready` says `TERMINATING`, the listeners close, and the ADS
    /// stream closes, which is how the control plane learns the proxy is leaving (it then stops
    /// offering this ingress to other zones); the installed table keeps serving the established
    /// flows.
    async fn leave(&mut self) {
        self.ingress.begin_termination();
        self.ingress.stop_listeners().await;
        if let Some(cp) = self.control_plane.take() {
            let _ = cp.shutdown.send(true);
            let _ = cp.task.await;
        }
    }

    /// SIGQUIT: not ready, stop accepting, leave the ADS stream, and return without touching
    /// the packet-level flows: their entries and links stay pinned for the next daemon.
    async fn handover(mut self) {
        self.leave().await;
        let ingress = &self.ingress;
        // A switch not settled yet needs its backend socket, which dies with the process: wait
        // for it (a round trip to the backend), within bounds.
        let deadline = Instant::now() + Duration::from_secs(2);
        while ingress.packet.as_ref().is_some_and(|p| p.unsettled() > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let left = ingress.packet.as_ref().map_or(0, |p| p.stats().active.load(std::sync::atomic::Ordering::Relaxed));
        info!(packet_flows = left, "handing over: packet-level flows stay pinned for the next daemon");
        drop(self.admin);
        drop(self.read_only_admin);
    }

    /// kuma-dp semantics: not ready, stop accepting, let established flows finish for
    /// `drain_time`, then close the rest.
    async fn drain(mut self, drain_time: Duration) {
        self.leave().await;
        let ingress = &self.ingress;
        let deadline = Instant::now() + drain_time;
        info!(drain_time = %humantime::format_duration(drain_time), open = ingress.open_connections(), "draining");
        let left = ingress.wait_idle(deadline).await;
        if left > 0 {
            warn!(left, "drain time over; closing the remaining connections");
            ingress.abort_flows();
            // Relays and close reports log their close as they see the abort; give them a moment.
            let _ = ingress.wait_idle(Instant::now() + Duration::from_secs(2)).await;
        } else {
            info!("all flows finished");
        }
        // Every packet-level flow ended or was reset: nothing is left for a later daemon.
        if let Some(p) = &ingress.packet {
            p.unpin();
        }
        drop(self.admin);
        drop(self.read_only_admin);
    }
}

/// How the daemon stops.
enum Stop {
    /// Drain established flows for this long, reset the rest, remove the pins.
    Drain(Duration),
    /// Stop accepting and exit now; packet-level flows keep running, pinned, for the next daemon
    /// (other flows end with the process's sockets).
    Handover,
}

/// Takes over the packet-level flows an earlier daemon left pinned; logs how many.
fn adopt(ingress: &Ingress) {
    let n = ingress.adopt_packet_flows();
    if n > 0 {
        info!(flows = n, "packet splice: adopted the flows an earlier daemon left running");
    }
}

/// Waits until the input files have had no event and no change of size or modification time
/// for [`RELOAD_SETTLE`] ([`EMPTY_SETTLE`] while an input is empty), or
/// [`RELOAD_SETTLE_MAX`] has passed.
async fn settle(changes: &mut mpsc::Receiver<()>, sources: &Sources) {
    let started = Instant::now();
    let mut last = reload::Fingerprint::read(sources);
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(RELOAD_SETTLE / 5).await;
        let now = reload::Fingerprint::read(sources);
        let mut events = false;
        while changes.try_recv().is_ok() {
            events = true;
        }
        if events || now != last {
            quiet_since = Instant::now();
        }
        let needed = if now.has_empty_input() { EMPTY_SETTLE } else { RELOAD_SETTLE };
        last = now;
        if quiet_since.elapsed() >= needed {
            return;
        }
        if started.elapsed() >= RELOAD_SETTLE_MAX {
            warn!("the configuration files keep changing; reading them as they are");
            return;
        }
    }
}

/// Binds and starts an admin server of `role`; a failure is logged, not fatal (the data path
/// keeps running; readiness probes then fail visibly).
fn start_admin(
    ingress: &Arc<Ingress>,
    addr: SocketAddr,
    commands: &mpsc::Sender<admin::Command>,
    info: &admin::Info,
    role: admin::Role,
) -> Option<admin::AdminServer> {
    match admin::bind(addr) {
        Ok(listener) => {
            Some(admin::AdminServer::start(Arc::clone(ingress), listener, commands.clone(), info.clone(), role))
        }
        Err(e) => {
            error!(%addr, error = %e, "cannot bind the {} server; /ready and /stats are unavailable there", role.as_str());
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
