//! The command line: kuma-dp's flag names where they mean the same thing. Plain clap types;
//! [`crate::app`] runs them.

use std::{fmt, net::IpAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    admin, config, control_plane, server,
    splice::{self, Limits, SpliceMode},
    xdp::XdpMode,
};

/// A duration on the command line, in humantime's form (`15s`, `1h`, `500ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl FromStr for HumanDuration {
    type Err = humantime::DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(Self)
    }
}

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
#[allow(clippy::large_enum_variant, reason = "parsed once at start; its size costs nothing")]
pub enum Command {
    /// Run the ingress.
    Run(RunArgs),
    /// Check the ZoneIngress file, the inventory and (if given) the XDP guard file, print every
    /// problem, and exit.
    Validate(ValidateArgs),
}

/// How long established flows may keep running after SIGTERM/SIGINT (kuma-dp's default).
pub const DEFAULT_DRAIN_TIME: Duration = Duration::from_secs(30);

/// The two inputs, shared by `run` and `validate`.
#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    /// The ZoneIngress resource (YAML), as for `kuma-dp run --dataplane-file`.
    #[arg(long, env = "KUMA_DATAPLANE_RUNTIME_RESOURCE_PATH")]
    pub dataplane_file: PathBuf,
    /// Local inventory: Kuma Dataplane resources (one document, a `---` stream, a kumactl
    /// `items:` list, or a directory of such files). File mode; not with `--cp-address`.
    #[arg(long, required_unless_present = "cp_address", conflicts_with = "cp_address")]
    pub dataplanes: Option<PathBuf>,
    /// `{{ key }}` substitutions in the dataplane file (repeatable), as kuma-dp.
    #[arg(long = "dataplane-var", value_parser = parse_var)]
    pub dataplane_vars: Vec<(String, String)>,
    /// The zone this ingress serves (for MeshService cluster names and the empty-table answer).
    #[arg(long, env = "KUMA_MULTIZONE_ZONE", default_value = "")]
    pub zone: String,
    /// Accepted for kuma-dp compatibility; must be `ingress`.
    #[arg(long, env = "KUMA_DATAPLANE_PROXY_TYPE", default_value = "ingress")]
    pub proxy_type: String,
    #[command(flatten)]
    pub control_plane: ControlPlaneArgs,
}

/// Control-plane mode: kuma-dp's flags and environment variables.
#[derive(Args, Debug, Clone)]
pub struct ControlPlaneArgs {
    /// The control plane's dataplane server (`https://HOST:5678`): the configuration then comes
    /// from it (bootstrap + ADS) instead of `--dataplanes`.
    #[arg(long, env = "KUMA_CONTROL_PLANE_URL")]
    pub cp_address: Option<String>,
    /// CA certificate (PEM) the control plane's certificate is checked against.
    #[arg(long, env = "KUMA_CONTROL_PLANE_CA_CERT_FILE", requires = "cp_address")]
    pub ca_cert_file: Option<PathBuf>,
    /// File holding the dataplane token (`kumactl generate zone-token` / dataplane token).
    #[arg(long, env = "KUMA_DATAPLANE_RUNTIME_TOKEN_PATH", requires = "cp_address")]
    pub dataplane_token_file: Option<PathBuf>,
    /// The dataplane token itself (prefer `--dataplane-token-file`).
    #[arg(
        long,
        env = "KUMA_DATAPLANE_RUNTIME_TOKEN",
        requires = "cp_address",
        conflicts_with = "dataplane_token_file"
    )]
    pub dataplane_token: Option<String>,
    /// Name of the resource for the control plane (default: the ZoneIngress file's `name`).
    #[arg(long, env = "KUMA_DATAPLANE_NAME")]
    pub name: Option<String>,
    /// Mesh sent with the bootstrap request (a ZoneIngress belongs to none).
    #[arg(long, env = "KUMA_DATAPLANE_MESH", default_value = "")]
    pub mesh: String,
    /// Bootstrap retry interval.
    #[arg(long, env = "KUMA_CONTROL_PLANE_RETRY_BACKOFF", default_value_t = HumanDuration(control_plane::DEFAULT_RETRY_BACKOFF))]
    pub cp_retry_backoff: HumanDuration,
    /// Give up on the bootstrap after this long.
    #[arg(long, env = "KUMA_CONTROL_PLANE_RETRY_MAX_DURATION", default_value_t = HumanDuration(control_plane::DEFAULT_RETRY_MAX_DURATION))]
    pub cp_retry_max_duration: HumanDuration,
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
    /// Packet splice: the bpffs directory where its maps and tc links are pinned, so its flows
    /// keep running while the daemon is stopped, killed or upgraded, and the next daemon with the
    /// same directory adopts them. Default: one per network namespace and listener port under
    /// /sys/fs/bpf/zone-ingress; `off` pins nothing (the flows end with the process).
    #[arg(long, value_name = "DIR|off")]
    pub bpf_pin_dir: Option<String>,
    /// Packet splice: the source ports of its backend connections, which it picks and holds
    /// itself (a switched flow keeps no socket). The kernel must never pick them for a connect:
    /// above net.ipv4.ip_local_port_range, or listed in net.ipv4.ip_local_reserved_ports.
    /// Default: every port above net.ipv4.ip_local_port_range (61000-65535 with Linux's
    /// defaults). Flows toward an endpoint beyond the range's size at once use the sockmap splice.
    #[arg(long, value_name = "FIRST-LAST")]
    pub packet_ports: Option<splice::packet::ports::Range>,
    /// How long established flows may keep running after SIGTERM/SIGINT.
    #[arg(long, env = "KUMA_DATAPLANE_DRAIN_TIME", default_value_t = HumanDuration(DEFAULT_DRAIN_TIME))]
    pub drain_time: HumanDuration,
    /// Give up on an incomplete ClientHello after this long.
    #[arg(long, default_value_t = HumanDuration(server::DEFAULT_CLIENT_HELLO_TIMEOUT))]
    pub client_hello_timeout: HumanDuration,
    /// Connections that may wait for their ClientHello at once; more are closed at once.
    #[arg(long, default_value_t = server::DEFAULT_MAX_PENDING_HANDSHAKES, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_handshakes: u32,
    /// Per-attempt backend connect timeout.
    #[arg(long, default_value_t = HumanDuration(server::DEFAULT_CONNECT_TIMEOUT))]
    pub connect_timeout: HumanDuration,
    /// Endpoints tried per connection when connects fail.
    #[arg(long, default_value_t = server::DEFAULT_CONNECT_ATTEMPTS, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub connect_attempts: u16,
    /// Close a flow after this long without a byte either way.
    #[arg(long, default_value_t = HumanDuration(splice::DEFAULT_IDLE_TIMEOUT))]
    pub idle_timeout: HumanDuration,
    /// Concurrent connections per cluster.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CLUSTER_CONNECTIONS)]
    pub max_connections_per_cluster: usize,
    /// Memory guard: bytes a kernel-spliced connection may have queued toward a slow peer.
    #[arg(long, default_value_t = splice::DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight_bytes: u64,
    /// Memory guard: how long a connection may stay above the in-flight cap.
    #[arg(long, default_value_t = HumanDuration(splice::DEFAULT_IN_FLIGHT_GRACE))]
    pub in_flight_grace: HumanDuration,
    /// `TCP_USER_TIMEOUT` on backend sockets, off by default: bytes sent to a backend that stay
    /// unacknowledged this long (it vanished while the client was sending) reset the flow, both
    /// ways, instead of after the kernel's retransmission limit (about 15 min). Trade-off: a
    /// backend that keeps its receive window closed this long (a paused reader) is cut too, so
    /// choose it well above the longest pause a healthy backend makes (e.g. `5m`).
    #[arg(long)]
    pub backend_user_timeout: Option<HumanDuration>,
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
    #[arg(long, default_value_t = admin::DEFAULT_ADMIN_ADDRESS, env = "ZONE_INGRESS_ADMIN_ADDRESS")]
    pub admin_address: IpAddr,
    /// A second admin listener on this address and the same port, serving only `GET` `/ready`,
    /// `/stats` and `/stats/prometheus` (for probes and scrapers at the pod's address). Must be
    /// a specific address other than `--admin-address`.
    #[arg(long, env = "ZONE_INGRESS_READ_ONLY_ADMIN_ADDRESS")]
    pub read_only_admin_address: Option<IpAddr>,
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
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

impl From<&InputArgs> for config::Sources {
    fn from(args: &InputArgs) -> Self {
        Self {
            dataplane_file: args.dataplane_file.clone(),
            dataplanes: args.dataplanes.clone().unwrap_or_default(),
            dataplane_vars: args.dataplane_vars.clone(),
            zone: args.zone.clone(),
            proxy_type: args.proxy_type.clone(),
        }
    }
}

impl RunArgs {
    /// The limits of spliced connections these flags ask for.
    #[must_use]
    pub fn limits(&self) -> Limits {
        Limits {
            idle_timeout: self.idle_timeout.0,
            max_in_flight: self.max_in_flight_bytes,
            in_flight_grace: self.in_flight_grace.0,
            max_spliced: self.max_spliced,
            monitor_threads: self.splice_threads.map_or_else(splice::sockmap::default_monitor_threads, usize::from),
            backend_user_timeout: self.backend_user_timeout.map(|d| d.0),
            ..Limits::default()
        }
    }
}

/// Sets up `tracing` from `RUST_LOG` (default `info`).
pub fn init_tracing(cli: &Cli) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
