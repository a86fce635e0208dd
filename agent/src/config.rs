//! The agent's configuration: a YAML file, a few command-line overrides.
//!
//! ```yaml
//! nodeName: node1                  # default: the hostname, lowercased
//! stateDir: /var/lib/meshward      # default
//! datastore: dir:/etc/meshward/cluster   # or: kubernetes (required)
//! endpoint: 198.18.0.1:51871       # underlay ip[:port] peers send to (required; port default: listenPort)
//! listenPort: 51871                # default
//! underlayMTU: 1500                # default
//! mtu: 1420                        # of the mesh interface; default: underlayMTU - 80
//! keyRotationInterval: 24h         # optional; humantime ("90m", "7d", "1h 30m")
//! strictMode: true                 # default
//! mesh: true                       # default; false: policy only (another CNI routes pods, no WireGuard)
//! socketPath: /run/meshward/agent.sock   # default
//! clusterCIDR: 10.244.0.0/16       # default; the whole pod range (strict mode guards it)
//! healthAddress: 127.0.0.1:9879    # default; HTTP /healthz, /readyz, /metrics
//! flowEventBuffer: 4096            # default; recent flow events kept (`meshward observe`)
//! dnsSocketKeeper: spawn           # default; spawn | external | off (DNS across agent restarts)
//! flowEvents: true                 # default; false: no flow-event producers at all (metrics stay)
//! observeAddress: 198.18.0.1:4245  # optional; `observe` over TCP (off unless set)
//! observeTokenFile: /etc/meshward/observe-token  # required with observeAddress
//! cniAgentWait: 30s                # default; how long CNI ADD waits for the pod's policy (0s: not at all)
//! ```
//!
//! Unknown keys are errors. Relative paths in the file are relative to the
//! file's directory; on the command line, to the working directory.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::datastore::{check_endpoint, validate_node_name, DatastoreSpec};

pub const DEFAULT_PORT: u16 = 51871;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshward";
pub const DEFAULT_SOCKET: &str = "/run/meshward/agent.sock";
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// Where the agent's health endpoint listens unless configured.
pub const DEFAULT_HEALTH_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9879);
/// The Kubernetes convention for the cluster's pod range when unset.
pub const DEFAULT_CLUSTER_CIDR: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), 16) {
    Ok(net) => net,
    Err(_) => panic!("invalid constant prefix length"),
};
/// WireGuard's overhead over an IPv4 / IPv6 underlay: IP + UDP + 32.
const OVERHEAD_V4: u32 = 20 + 8 + 32;
const OVERHEAD_V6: u32 = 40 + 8 + 32;
/// The smallest MTU the mesh interface may have (IPv6's minimum).
const MIN_MTU: u32 = 1280;
const MIN_KEY_ROTATION: Duration = Duration::from_secs(60);
/// How long CNI ADD waits for the pod's policy unless `cniAgentWait` says.
pub const DEFAULT_CNI_AGENT_WAIT: Duration = Duration::from_secs(30);

/// `meshward agent` command-line arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The agent's configuration file (YAML)
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Overrides the file's datastore: dir:PATH or kubernetes
    #[arg(long, value_name = "dir:PATH|kubernetes")]
    pub datastore: Option<DatastoreSpec>,
    /// Overrides the file's nodeName
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Overrides the file's endpoint (ip or ip:port), e.g. the node's
    /// address from the Kubernetes downward API
    #[arg(long, value_name = "IP[:PORT]")]
    pub endpoint: Option<String>,
    /// Only check the configuration: print it and exit
    #[arg(long)]
    pub check: bool,
}

/// The agent's configuration, validated and with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub datastore: DatastoreSpec,
    /// Published to peers.
    pub endpoint: SocketAddr,
    pub listen_port: u16,
    /// Of the mesh interface.
    pub mtu: u32,
    pub underlay_mtu: u32,
    pub key_rotation_interval: Option<Duration>,
    pub strict_mode: bool,
    /// The encrypted mesh (keys, `mw0`, routes, strict mode, the Node
    /// annotations). Off: policy only, beside a CNI that addresses and
    /// routes pods itself (a cloud's VPC CNI, as Calico's policy-only mode).
    pub mesh: bool,
    pub socket_path: PathBuf,
    /// The cluster's whole pod range: strict mode treats all of it as
    /// remote (except this node's own pod CIDRs) from the first moment, before
    /// any peer is known.
    pub cluster_cidr: Ipv4Net,
    /// Policy enforcement and the transparent DNS proxy.
    pub policy: PolicySettings,
    /// HTTP: `/healthz`, `/readyz`, `/metrics`.
    pub health_address: SocketAddr,
    /// Recent flow events kept for `meshward observe`.
    pub flow_event_buffer: usize,
    /// Flow events on: the producers (nflog listener, DNS observer, mesh
    /// watcher) run and `observe` is served. Off: none of them runs.
    pub flow_events: bool,
    /// `observe` over TCP with a token, when configured.
    pub observe_tcp: Option<ObserveTcp>,
    /// Written into the conflist by `install-cni`: how long CNI ADD waits
    /// for the agent to confirm the pod's policy is in the kernel.
    pub cni_agent_wait: Duration,
}

/// `observeAddress` and `observeTokenFile`: flow events over TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveTcp {
    pub address: SocketAddr,
    /// Holds the token clients must present (read at start-up).
    pub token_file: PathBuf,
}

/// Largest `dnsAnswerCacheEntries` (the cache also caps its answers' wire
/// bytes at 16 MiB; with keys and learned addresses beside them, memory is
/// up to about three times that).
const MAX_DNS_ANSWER_CACHE_ENTRIES: usize = 1_000_000;

/// Policy enforcement knobs (`dns*`, `fqdn*`, `nflogGroup` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    /// Port of the node's transparent DNS proxy (on 127.0.0.1 and ::1).
    pub dns_proxy_port: u16,
    /// Answer to a query the policy does not allow: REFUSED or NXDOMAIN.
    pub dns_deny_nxdomain: bool,
    /// Longest an answer waits for its addresses to reach the kernel.
    pub dns_hold_timeout: Duration,
    /// Entries of the DNS proxy's answer cache (0: off).
    pub dns_answer_cache_entries: usize,
    /// Shortest lifetime of a learned address (0: honour the DNS TTL).
    pub fqdn_min_ttl: Duration,
    /// Most addresses kept per name (Cilium's default: 1000).
    pub fqdn_max_ips_per_name: usize,
    /// Most learned (name, address) entries in all.
    pub fqdn_max_entries: usize,
    /// nflog group of policy drops.
    pub nflog_group: u16,
    /// Who holds the DNS proxy's sockets while no agent runs.
    pub dns_socket_keeper: DnsKeeperMode,
    /// Port of the node's L7 proxy (on 127.0.0.1 and ::1): TCP on ports
    /// with `rules.http` / `rules.tls` is TPROXYed there.
    pub l7_proxy_port: u16,
    /// Largest HTTP request head the L7 proxy accepts, bytes.
    pub l7_max_header_bytes: usize,
    /// Time a client has to send a complete HTTP/1 request head.
    pub l7_header_timeout: Duration,
    /// A proxied connection idle this long is closed.
    pub l7_idle_timeout: Duration,
    /// An idle upstream HTTP/1.1 connection is kept this long for the next
    /// client connection from the same pod to the same destination (0: not
    /// kept).
    pub l7_upstream_idle_timeout: Duration,
    /// Threads of the L7 proxy (each its own runtime and listener); 0: one
    /// per core.
    pub l7_proxy_threads: usize,
}

/// `dnsSocketKeeper`: the process that holds the DNS proxy's listening
/// sockets across agent restarts (`agent/keeper.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsKeeperMode {
    /// The agent starts `meshward dns-keeper` when none runs.
    Spawn,
    /// Something else runs it (the Helm chart: a second container).
    External,
    /// None: queries arriving while no agent runs are lost.
    Off,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            dns_proxy_port: 10053,
            dns_deny_nxdomain: false,
            dns_hold_timeout: Duration::from_millis(100),
            dns_answer_cache_entries: meshward_dns_proxy::answers::DEFAULT_ENTRIES,
            fqdn_min_ttl: Duration::ZERO,
            fqdn_max_ips_per_name: 1000,
            fqdn_max_entries: 200_000,
            nflog_group: 109,
            dns_socket_keeper: DnsKeeperMode::Spawn,
            l7_proxy_port: 15001,
            l7_max_header_bytes: 64 * 1024,
            l7_header_timeout: Duration::from_secs(10),
            l7_idle_timeout: Duration::from_secs(300),
            l7_upstream_idle_timeout: Duration::from_secs(4),
            l7_proxy_threads: 0,
        }
    }
}

/// Command-line values that win over the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub datastore: Option<DatastoreSpec>,
    pub node_name: Option<String>,
    pub endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {message}", file.display())]
    Parse { file: PathBuf, message: String },
    /// `field` is the file's key, or the command-line flag that set it.
    #[error("config file {}: {field}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        field: String,
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    node_name: Option<String>,
    state_dir: Option<PathBuf>,
    datastore: Option<String>,
    endpoint: Option<String>,
    listen_port: Option<u16>,
    mtu: Option<u32>,
    #[serde(rename = "underlayMTU")]
    underlay_mtu: Option<u32>,
    key_rotation_interval: Option<String>,
    strict_mode: Option<bool>,
    mesh: Option<bool>,
    socket_path: Option<PathBuf>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    dns_proxy_port: Option<u16>,
    /// `refused` (default) or `nxdomain`.
    dns_deny_response: Option<String>,
    dns_hold_timeout: Option<String>,
    /// Entries of the DNS answer cache; 0 turns it off.
    dns_answer_cache_entries: Option<usize>,
    #[serde(rename = "fqdnMinTTL")]
    fqdn_min_ttl: Option<String>,
    #[serde(rename = "fqdnMaxIPsPerName")]
    fqdn_max_ips_per_name: Option<usize>,
    fqdn_max_entries: Option<usize>,
    nflog_group: Option<u16>,
    /// `spawn` (default), `external` or `off`.
    dns_socket_keeper: Option<String>,
    #[serde(rename = "l7ProxyPort")]
    l7_proxy_port: Option<u16>,
    #[serde(rename = "l7MaxHeaderBytes")]
    l7_max_header_bytes: Option<usize>,
    #[serde(rename = "l7HeaderTimeout")]
    l7_header_timeout: Option<String>,
    #[serde(rename = "l7IdleTimeout")]
    l7_idle_timeout: Option<String>,
    #[serde(rename = "l7UpstreamIdleTimeout")]
    l7_upstream_idle_timeout: Option<String>,
    #[serde(rename = "l7ProxyThreads")]
    l7_proxy_threads: Option<usize>,
    health_address: Option<String>,
    flow_event_buffer: Option<usize>,
    flow_events: Option<bool>,
    observe_address: Option<String>,
    observe_token_file: Option<PathBuf>,
    cni_agent_wait: Option<String>,
}

impl Config {
    /// Reads `args.config` and applies the command-line overrides.
    pub fn load(args: &AgentArgs) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(&args.config).map_err(|source| ConfigError::Read {
            file: args.config.clone(),
            source,
        })?;
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let overrides = Overrides {
            datastore: args.datastore.clone().map(|d| match d {
                DatastoreSpec::Dir(p) => DatastoreSpec::Dir(cwd.join(p)),
                other => other,
            }),
            node_name: args.node_name.clone(),
            endpoint: args.endpoint.clone(),
        };
        Config::parse(&text, &args.config, &overrides, hostname)
    }

    /// Parses and validates a config file's text. `hostname` supplies the
    /// default node name.
    pub fn parse(
        text: &str,
        file: &Path,
        overrides: &Overrides,
        hostname: impl FnOnce() -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw = parse_raw(text, file)?;
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let base = file.parent().unwrap_or(Path::new(""));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let node_name = match (&overrides.node_name, raw.node_name) {
            (Some(name), _) => {
                validate_node_name(name).map_err(|m| invalid("--node-name", m))?;
                name.clone()
            }
            (None, Some(name)) => {
                validate_node_name(&name).map_err(|m| invalid("nodeName", m))?;
                name
            }
            (None, None) => {
                let host = hostname()
                    .ok_or_else(|| invalid("nodeName", "not set, and no hostname".into()))?
                    .to_lowercase();
                validate_node_name(&host).map_err(|m| {
                    invalid(
                        "nodeName",
                        format!("not set, and the hostname is no good: {m}"),
                    )
                })?;
                host
            }
        };

        let datastore = match (&overrides.datastore, raw.datastore) {
            (Some(d), _) => d.clone(),
            (None, Some(text)) => match text.parse() {
                Ok(DatastoreSpec::Dir(p)) => DatastoreSpec::Dir(resolve(p)),
                Ok(other) => other,
                Err(m) => return Err(invalid("datastore", m)),
            },
            (None, None) => {
                return Err(invalid(
                    "datastore",
                    "missing (dir:PATH or kubernetes)".into(),
                ))
            }
        };

        let listen_port = raw.listen_port.unwrap_or(DEFAULT_PORT);
        if listen_port == 0 {
            return Err(invalid("listenPort", "must not be 0".into()));
        }

        let (endpoint_field, endpoint_text) = match (&overrides.endpoint, raw.endpoint) {
            (Some(text), _) => ("--endpoint", Some(text.clone())),
            (None, text) => ("endpoint", text),
        };
        let endpoint = match endpoint_text {
            None => {
                return Err(invalid(
                    "endpoint",
                    "missing: the underlay address peers reach this node at (ip or ip:port)".into(),
                ))
            }
            Some(text) => {
                let text = text.trim();
                let bare = text
                    .strip_prefix('[')
                    .and_then(|t| t.strip_suffix(']'))
                    .unwrap_or(text);
                let addr = match bare.parse::<IpAddr>() {
                    Ok(ip) => SocketAddr::new(ip, listen_port),
                    Err(_) => text.parse::<SocketAddr>().map_err(|_| {
                        invalid(
                            endpoint_field,
                            format!("{text:?} is not ip or ip:port (e.g. 198.18.0.1:51871)"),
                        )
                    })?,
                };
                check_endpoint(addr).map_err(|m| invalid(endpoint_field, m))?;
                addr
            }
        };

        let underlay_mtu = raw.underlay_mtu.unwrap_or(DEFAULT_UNDERLAY_MTU);
        if !(MIN_MTU + OVERHEAD_V4..=65535).contains(&underlay_mtu) {
            return Err(invalid(
                "underlayMTU",
                format!(
                    "{underlay_mtu} is outside {}..=65535",
                    MIN_MTU + OVERHEAD_V4
                ),
            ));
        }
        let overhead = if endpoint.is_ipv4() {
            OVERHEAD_V4
        } else {
            OVERHEAD_V6
        };
        let mtu = match raw.mtu {
            Some(mtu) => {
                if mtu < MIN_MTU || mtu + overhead > underlay_mtu {
                    return Err(invalid(
                        "mtu",
                        format!(
                            "{mtu} must be at least {MIN_MTU} and at most underlayMTU - {overhead} \
                             = {} (WireGuard over {})",
                            underlay_mtu.saturating_sub(overhead),
                            if endpoint.is_ipv4() { "IPv4" } else { "IPv6" }
                        ),
                    ));
                }
                mtu
            }
            // the same for both families, as wg-quick does
            None => underlay_mtu.saturating_sub(OVERHEAD_V6).max(MIN_MTU),
        };

        let key_rotation_interval = match raw.key_rotation_interval {
            None => None,
            Some(text) => {
                let d = humantime::parse_duration(text.trim()).map_err(|e| {
                    invalid(
                        "keyRotationInterval",
                        format!("{text:?}: {e} (e.g. 24h, 90m, 7d)"),
                    )
                })?;
                if d < MIN_KEY_ROTATION {
                    return Err(invalid(
                        "keyRotationInterval",
                        format!("{text:?} is shorter than 1m"),
                    ));
                }
                Some(d)
            }
        };

        let state_dir = resolve(raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()));
        let socket_path = resolve(raw.socket_path.unwrap_or_else(|| DEFAULT_SOCKET.into()));
        for (field, path) in [("stateDir", &state_dir), ("socketPath", &socket_path)] {
            if path.as_os_str().is_empty() {
                return Err(invalid(field, "empty path".into()));
            }
        }

        let cluster_cidr = match raw.cluster_cidr {
            None => DEFAULT_CLUSTER_CIDR,
            Some(text) => {
                let net: Ipv4Net = text.trim().parse().map_err(|_| {
                    invalid(
                        "clusterCIDR",
                        format!("{text:?} is not an IPv4 CIDR (e.g. 10.244.0.0/16)"),
                    )
                })?;
                if net.trunc() != net {
                    return Err(invalid(
                        "clusterCIDR",
                        format!("{text:?} has host bits set (did you mean {}?)", net.trunc()),
                    ));
                }
                net
            }
        };

        let defaults = PolicySettings::default();
        let duration = |field: &str, text: Option<String>, default: Duration| match text {
            None => Ok(default),
            Some(text) => humantime::parse_duration(text.trim())
                .map_err(|e| invalid(field, format!("{text:?}: {e} (e.g. 100ms, 30s)"))),
        };
        let dns_answer_cache_entries = raw
            .dns_answer_cache_entries
            .unwrap_or(defaults.dns_answer_cache_entries);
        if dns_answer_cache_entries > MAX_DNS_ANSWER_CACHE_ENTRIES {
            return Err(invalid(
                "dnsAnswerCacheEntries",
                format!("{dns_answer_cache_entries} is outside 0..={MAX_DNS_ANSWER_CACHE_ENTRIES}"),
            ));
        }
        let dns_proxy_port = raw.dns_proxy_port.unwrap_or(defaults.dns_proxy_port);
        if dns_proxy_port == 0 {
            return Err(invalid("dnsProxyPort", "must not be 0".into()));
        }
        let dns_deny_nxdomain = match raw.dns_deny_response.as_deref().map(str::trim) {
            None | Some("refused") => false,
            Some("nxdomain") => true,
            Some(other) => {
                return Err(invalid(
                    "dnsDenyResponse",
                    format!("{other:?}: want refused or nxdomain"),
                ))
            }
        };
        let dns_hold_timeout = duration(
            "dnsHoldTimeout",
            raw.dns_hold_timeout,
            defaults.dns_hold_timeout,
        )?;
        if dns_hold_timeout.is_zero() || dns_hold_timeout > Duration::from_secs(5) {
            return Err(invalid(
                "dnsHoldTimeout",
                format!("{dns_hold_timeout:?} is outside 1ms..=5s"),
            ));
        }
        let fqdn_min_ttl = duration("fqdnMinTTL", raw.fqdn_min_ttl, defaults.fqdn_min_ttl)?;
        let positive = |field: &str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(invalid(field, "must be at least 1".into())),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let l7_proxy_port = raw.l7_proxy_port.unwrap_or(defaults.l7_proxy_port);
        if l7_proxy_port == 0 {
            return Err(invalid("l7ProxyPort", "must not be 0".into()));
        }
        if l7_proxy_port == dns_proxy_port {
            return Err(invalid(
                "l7ProxyPort",
                format!("{l7_proxy_port} is dnsProxyPort too (both listen on TCP)"),
            ));
        }
        let l7_max_header_bytes = raw
            .l7_max_header_bytes
            .unwrap_or(defaults.l7_max_header_bytes);
        if !(8 * 1024..=1024 * 1024).contains(&l7_max_header_bytes) {
            return Err(invalid(
                "l7MaxHeaderBytes",
                format!("{l7_max_header_bytes} is outside 8192..=1048576"),
            ));
        }
        let l7_header_timeout = duration(
            "l7HeaderTimeout",
            raw.l7_header_timeout,
            defaults.l7_header_timeout,
        )?;
        if l7_header_timeout.is_zero() || l7_header_timeout > Duration::from_secs(300) {
            return Err(invalid(
                "l7HeaderTimeout",
                format!("{l7_header_timeout:?} is outside 1ms..=300s"),
            ));
        }
        let l7_idle_timeout = duration(
            "l7IdleTimeout",
            raw.l7_idle_timeout,
            defaults.l7_idle_timeout,
        )?;
        if l7_idle_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "l7IdleTimeout",
                format!("{l7_idle_timeout:?} is less than 1s"),
            ));
        }
        let l7_upstream_idle_timeout = duration(
            "l7UpstreamIdleTimeout",
            raw.l7_upstream_idle_timeout,
            defaults.l7_upstream_idle_timeout,
        )?;
        if l7_upstream_idle_timeout > Duration::from_secs(3600) {
            return Err(invalid(
                "l7UpstreamIdleTimeout",
                format!("{l7_upstream_idle_timeout:?} is more than 1h"),
            ));
        }
        let l7_proxy_threads = match raw.l7_proxy_threads {
            Some(n) if !(1..=256).contains(&n) => {
                return Err(invalid(
                    "l7ProxyThreads",
                    format!("{n} is outside 1..=256 (leave it out for one per core)"),
                ));
            }
            n => n.unwrap_or(defaults.l7_proxy_threads),
        };
        let policy = PolicySettings {
            l7_proxy_port,
            l7_proxy_threads,
            l7_max_header_bytes,
            l7_header_timeout,
            l7_idle_timeout,
            l7_upstream_idle_timeout,
            dns_proxy_port,
            dns_deny_nxdomain,
            dns_hold_timeout,
            dns_answer_cache_entries,
            fqdn_min_ttl,
            fqdn_max_ips_per_name: positive(
                "fqdnMaxIPsPerName",
                raw.fqdn_max_ips_per_name,
                defaults.fqdn_max_ips_per_name,
            )?,
            fqdn_max_entries: positive(
                "fqdnMaxEntries",
                raw.fqdn_max_entries,
                defaults.fqdn_max_entries,
            )?,
            nflog_group: raw.nflog_group.unwrap_or(defaults.nflog_group),
            dns_socket_keeper: match raw.dns_socket_keeper.as_deref().map(str::trim) {
                None => defaults.dns_socket_keeper,
                Some("spawn") => DnsKeeperMode::Spawn,
                Some("external") => DnsKeeperMode::External,
                Some("off") => DnsKeeperMode::Off,
                Some(other) => {
                    return Err(invalid(
                        "dnsSocketKeeper",
                        format!("{other:?}: want spawn, external or off"),
                    ))
                }
            },
        };
        let health_address = match raw.health_address {
            None => DEFAULT_HEALTH_ADDRESS,
            Some(text) => text.trim().parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "healthAddress",
                    format!("{text:?} is not ip:port (e.g. 0.0.0.0:9879)"),
                )
            })?,
        };
        if health_address.port() == 0 {
            return Err(invalid("healthAddress", "port must not be 0".into()));
        }
        let flow_event_buffer = match raw.flow_event_buffer {
            None => crate::agent::DEFAULT_FLOW_EVENTS,
            Some(n) if (1..=1_000_000).contains(&n) => n,
            Some(n) => {
                return Err(invalid(
                    "flowEventBuffer",
                    format!("{n} is outside 1..=1000000"),
                ))
            }
        };

        let flow_events = raw.flow_events.unwrap_or(true);
        let observe_tcp = match (raw.observe_address, raw.observe_token_file) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid(
                    "observeTokenFile",
                    "set, but observeAddress is not (the token guards observe over TCP)".into(),
                ))
            }
            (Some(_), None) => {
                return Err(invalid(
                    "observeTokenFile",
                    "required when observeAddress is set: a file (mode 0600 or 0640) \
                     holding the token observe clients present"
                        .into(),
                ))
            }
            (Some(text), Some(file)) => {
                let address = text.trim().parse::<SocketAddr>().map_err(|_| {
                    invalid(
                        "observeAddress",
                        format!("{text:?} is not ip:port (e.g. 198.18.0.1:4245)"),
                    )
                })?;
                if address.port() == 0 {
                    return Err(invalid("observeAddress", "port must not be 0".into()));
                }
                if address == health_address {
                    return Err(invalid(
                        "observeAddress",
                        format!("{address} is healthAddress too"),
                    ));
                }
                if !flow_events {
                    return Err(invalid(
                        "observeAddress",
                        "set, but flowEvents is false: there are no events to serve".into(),
                    ));
                }
                if file.as_os_str().is_empty() {
                    return Err(invalid("observeTokenFile", "empty path".into()));
                }
                Some(ObserveTcp {
                    address,
                    token_file: resolve(file),
                })
            }
        };

        let cni_agent_wait = duration("cniAgentWait", raw.cni_agent_wait, DEFAULT_CNI_AGENT_WAIT)?;
        let most = Duration::from_secs(meshward_cni::spec::MAX_AGENT_WAIT_SECONDS);
        if cni_agent_wait > most || cni_agent_wait.subsec_nanos() != 0 {
            return Err(invalid(
                "cniAgentWait",
                format!("{cni_agent_wait:?} must be whole seconds within 0s..={most:?}"),
            ));
        }

        Ok(Config {
            cni_agent_wait,
            policy,
            node_name,
            state_dir,
            datastore,
            endpoint,
            listen_port,
            mtu,
            underlay_mtu,
            key_rotation_interval,
            strict_mode: raw.strict_mode.unwrap_or(true),
            mesh: raw.mesh.unwrap_or(true),
            socket_path,
            cluster_cidr,
            health_address,
            flow_event_buffer,
            flow_events,
            observe_tcp,
        })
    }
}

fn parse_raw(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let options = serde_saphyr::options! { with_snippet: false };
    let mut path = None;
    let result: Result<Option<RawConfig>, _> =
        serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                path = Some(e.path().to_string());
                e.into_inner()
            })
        });
    match result {
        // an empty file: all defaults (and errors for what is required)
        Ok(raw) => Ok(raw.unwrap_or_default()),
        Err(e) => {
            let message = match path.filter(|p| p != ".") {
                Some(p) => format!("{p}: {e}"),
                None => e.to_string(),
            };
            Err(ConfigError::Parse {
                file: file.to_path_buf(),
                message,
            })
        }
    }
}

fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()?
        .into_string()
        .ok()
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/meshward/agent.yaml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(FILE), &Overrides::default(), || {
            Some("Host-1".into())
        })
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const MINIMAL: &str = "datastore: dir:/srv/cluster\nendpoint: 198.18.0.1\n";

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c,
            Config {
                node_name: "host-1".into(),
                state_dir: DEFAULT_STATE_DIR.into(),
                datastore: DatastoreSpec::Dir("/srv/cluster".into()),
                endpoint: "198.18.0.1:51871".parse().unwrap(),
                listen_port: 51871,
                mtu: 1420,
                underlay_mtu: 1500,
                key_rotation_interval: None,
                strict_mode: true,
                mesh: true,
                socket_path: DEFAULT_SOCKET.into(),
                cluster_cidr: "10.244.0.0/16".parse().unwrap(),
                health_address: "127.0.0.1:9879".parse().unwrap(),
                policy: PolicySettings::default(),
                flow_event_buffer: 4096,
                flow_events: true,
                observe_tcp: None,
                cni_agent_wait: Duration::from_secs(30),
            }
        );
    }

    #[test]
    fn cni_agent_wait_is_whole_seconds_within_bounds() {
        let c = parse(&format!("{MINIMAL}cniAgentWait: 0s\n")).unwrap();
        assert!(c.cni_agent_wait.is_zero());
        let c = parse(&format!("{MINIMAL}cniAgentWait: 2m\n")).unwrap();
        assert_eq!(c.cni_agent_wait, Duration::from_secs(120));
        for bad in ["3m", "1500ms", "soon"] {
            let e = parse(&format!("{MINIMAL}cniAgentWait: {bad}\n")).unwrap_err();
            assert!(e.to_string().contains("cniAgentWait"), "{bad}: {e}");
        }
    }

    #[test]
    fn policy_settings() {
        let c = parse(&format!(
            "{MINIMAL}dnsProxyPort: 5353\ndnsDenyResponse: nxdomain\ndnsHoldTimeout: 250ms\n\
             fqdnMinTTL: 30s\nfqdnMaxIPsPerName: 10\nfqdnMaxEntries: 99\nnflogGroup: 7\n\
             dnsSocketKeeper: external\n"
        ))
        .unwrap();
        assert_eq!(
            c.policy,
            PolicySettings {
                dns_proxy_port: 5353,
                dns_deny_nxdomain: true,
                dns_hold_timeout: Duration::from_millis(250),
                fqdn_min_ttl: Duration::from_secs(30),
                fqdn_max_ips_per_name: 10,
                fqdn_max_entries: 99,
                nflog_group: 7,
                dns_socket_keeper: DnsKeeperMode::External,
                ..PolicySettings::default()
            }
        );
        assert_eq!(
            parse(MINIMAL).unwrap().policy.dns_answer_cache_entries,
            10_000
        );
        let c = parse(&format!("{MINIMAL}dnsAnswerCacheEntries: 0\n")).unwrap();
        assert_eq!(c.policy.dns_answer_cache_entries, 0);
        let e = parse(&format!("{MINIMAL}dnsAnswerCacheEntries: 2000000\n")).unwrap_err();
        assert!(
            e.to_string()
                .contains("dnsAnswerCacheEntries: 2000000 is outside 0..=1000000"),
            "{e}"
        );
        let off = parse(&format!("{MINIMAL}dnsSocketKeeper: off\n")).unwrap();
        assert_eq!(off.policy.dns_socket_keeper, DnsKeeperMode::Off);
        let c = parse(&format!(
            "{MINIMAL}l7ProxyPort: 16001\nl7MaxHeaderBytes: 16384\nl7HeaderTimeout: 2s\nl7IdleTimeout: 1m\nl7ProxyThreads: 3\nl7UpstreamIdleTimeout: 0s\n"
        ))
        .unwrap();
        assert_eq!(c.policy.l7_proxy_threads, 3);
        assert_eq!(c.policy.l7_upstream_idle_timeout, Duration::ZERO);
        assert_eq!(
            parse(MINIMAL).unwrap().policy.l7_upstream_idle_timeout,
            Duration::from_secs(4)
        );
        assert_eq!(parse(MINIMAL).unwrap().policy.l7_proxy_threads, 0);
        assert_eq!(
            (
                c.policy.l7_proxy_port,
                c.policy.l7_max_header_bytes,
                c.policy.l7_header_timeout,
                c.policy.l7_idle_timeout
            ),
            (
                16001,
                16384,
                Duration::from_secs(2),
                Duration::from_secs(60)
            )
        );
        for (text, want) in [
            ("dnsProxyPort: 0", "dnsProxyPort: must not be 0"),
            ("l7ProxyPort: 0", "l7ProxyPort: must not be 0"),
            ("l7ProxyThreads: 0", "l7ProxyThreads: 0 is outside 1..=256"),
            (
                "l7ProxyPort: 10053",
                "l7ProxyPort: 10053 is dnsProxyPort too",
            ),
            (
                "l7MaxHeaderBytes: 100",
                "l7MaxHeaderBytes: 100 is outside 8192..=1048576",
            ),
            ("l7HeaderTimeout: 0s", "l7HeaderTimeout: 0ns is outside"),
            ("l7IdleTimeout: 10ms", "l7IdleTimeout: 10ms is less than 1s"),
            (
                "l7UpstreamIdleTimeout: 2h",
                "l7UpstreamIdleTimeout: 7200s is more than 1h",
            ),
            (
                "dnsSocketKeeper: yes",
                "dnsSocketKeeper: \"yes\": want spawn, external or off",
            ),
            (
                "dnsDenyResponse: drop",
                "dnsDenyResponse: \"drop\": want refused or nxdomain",
            ),
            (
                "dnsHoldTimeout: 10s",
                "dnsHoldTimeout: 10s is outside 1ms..=5s",
            ),
            ("dnsHoldTimeout: soon", "dnsHoldTimeout: \"soon\""),
            ("fqdnMinTTL: x", "fqdnMinTTL: \"x\""),
            (
                "fqdnMaxIPsPerName: 0",
                "fqdnMaxIPsPerName: must be at least 1",
            ),
        ] {
            let e = error(&format!("{MINIMAL}{text}\n"));
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn everything_set() {
        let c = parse(
            "nodeName: node1\nstateDir: state\ndatastore: kubernetes\n\
             endpoint: '[fd00::1]:4000'\nlistenPort: 5000\nunderlayMTU: 9001\nmtu: 8921\n\
             keyRotationInterval: 24h\nstrictMode: false\nmesh: false\nsocketPath: /tmp/a.sock\n\
             clusterCIDR: 198.19.0.0/16\nhealthAddress: '[::]:9000'\n",
        )
        .unwrap();
        assert_eq!(c.node_name, "node1");
        assert_eq!(c.state_dir, PathBuf::from("/etc/meshward/state"));
        assert_eq!(c.datastore, DatastoreSpec::Kubernetes);
        assert_eq!(c.endpoint, "[fd00::1]:4000".parse().unwrap());
        assert_eq!(c.listen_port, 5000);
        assert_eq!((c.mtu, c.underlay_mtu), (8921, 9001));
        assert_eq!(c.key_rotation_interval, Some(Duration::from_secs(86400)));
        assert!(!c.strict_mode);
        assert!(!c.mesh);
        assert_eq!(c.socket_path, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.cluster_cidr, "198.19.0.0/16".parse::<Ipv4Net>().unwrap());
        assert_eq!(c.health_address, "[::]:9000".parse().unwrap());
    }

    #[test]
    fn endpoint_port_defaults_to_listen_port_and_paths_resolve() {
        let c = parse("datastore: dir:cluster\nendpoint: 198.18.0.1\nlistenPort: 7000\n").unwrap();
        assert_eq!(c.endpoint, "198.18.0.1:7000".parse().unwrap());
        assert_eq!(
            c.datastore,
            DatastoreSpec::Dir("/etc/meshward/cluster".into())
        );
    }

    #[test]
    fn overrides_win() {
        let o = Overrides {
            datastore: Some(DatastoreSpec::Dir("/x".into())),
            node_name: Some("other".into()),
            endpoint: Some("198.18.0.9".into()),
        };
        let c = Config::parse(MINIMAL, Path::new(FILE), &o, || None).unwrap();
        assert_eq!(c.node_name, "other");
        assert_eq!(c.datastore, DatastoreSpec::Dir("/x".into()));
        assert_eq!(c.endpoint, "198.18.0.9:51871".parse().unwrap());
        // the override stands in for a missing endpoint, and is named when bad
        let o = Overrides {
            endpoint: Some("[fd00::9]:4000".into()),
            ..Default::default()
        };
        let c = Config::parse("datastore: kubernetes\n", Path::new(FILE), &o, || {
            Some("n".into())
        })
        .unwrap();
        assert_eq!(c.endpoint, "[fd00::9]:4000".parse().unwrap());
        let o = Overrides {
            endpoint: Some("node-a".into()),
            ..Default::default()
        };
        let e = Config::parse(MINIMAL, Path::new(FILE), &o, || Some("n".into())).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("config file {FILE}: --endpoint: ")),
            "{e}"
        );
        let o = Overrides {
            node_name: Some("Bad_Name".into()),
            ..Default::default()
        };
        let e = Config::parse(MINIMAL, Path::new(FILE), &o, || None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("config file {FILE}: --node-name: ")),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = error(&format!("{MINIMAL}listenport: 1\n"));
        assert!(
            e.starts_with(&format!(
                "config file {FILE}: listenport: unknown field `listenport`"
            )),
            "{e}"
        );
        assert!(e.contains("line 3"), "{e}");
        let e = error(&format!("{MINIMAL}underlayMtu: 1500\n"));
        assert!(e.contains("unknown field `underlayMtu`"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("endpoint: 198.18.0.1\n", "datastore"),
            ("datastore: dir:/a\n", "endpoint"),
            ("datastore: etcd\nendpoint: 198.18.0.1\n", "datastore"),
            ("datastore: 'dir:'\nendpoint: 198.18.0.1\n", "datastore"),
            ("datastore: kubernetes\nendpoint: host:1\n", "endpoint"),
            ("datastore: kubernetes\nendpoint: 0.0.0.0\n", "endpoint"),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1:0\n",
                "endpoint",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nnodeName: A_B\n",
                "nodeName",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nlistenPort: 0\n",
                "listenPort",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nmtu: 1500\n",
                "mtu",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nmtu: 1000\n",
                "mtu",
            ),
            (
                "datastore: kubernetes\nendpoint: '[fd00::1]'\nmtu: 1440\n",
                "mtu",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nunderlayMTU: 100\n",
                "underlayMTU",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nkeyRotationInterval: soon\n",
                "keyRotationInterval",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nkeyRotationInterval: 5s\n",
                "keyRotationInterval",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nclusterCIDR: 10.244.0.1/16\n",
                "clusterCIDR",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nclusterCIDR: 'fd00::/64'\n",
                "clusterCIDR",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nhealthAddress: 9879\n",
                "healthAddress",
            ),
            (
                "datastore: kubernetes\nendpoint: 198.18.0.1\nhealthAddress: 0.0.0.0:0\n",
                "healthAddress",
            ),
        ];
        for (text, field) in cases {
            let e = error(text);
            assert!(
                e.starts_with(&format!("config file {FILE}: {field}: ")),
                "{text}: {e}"
            );
        }
        // type errors come from the parser, with the key and the line
        let e = error(&format!("{MINIMAL}listenPort: many\n"));
        assert!(
            e.starts_with(&format!("config file {FILE}: listenPort: ")),
            "{e}"
        );
        assert!(e.contains("line 3"), "{e}");
        let e = error(&format!("{MINIMAL}strictMode: [\n"));
        assert!(e.starts_with(&format!("config file {FILE}: ")), "{e}");
    }

    #[test]
    fn flow_events_and_observe_over_tcp() {
        let c = parse(&format!(
            "{MINIMAL}observeAddress: 198.18.0.1:4245\nobserveTokenFile: observe-token\n"
        ))
        .unwrap();
        assert!(c.flow_events);
        assert_eq!(
            c.observe_tcp,
            Some(ObserveTcp {
                address: "198.18.0.1:4245".parse().unwrap(),
                token_file: "/etc/meshward/observe-token".into(),
            })
        );
        let c = parse(&format!("{MINIMAL}flowEvents: false\n")).unwrap();
        assert!(!c.flow_events);
        assert_eq!(c.observe_tcp, None);
        for (text, want) in [
            (
                "observeAddress: 198.18.0.1:4245",
                "observeTokenFile: required when observeAddress is set",
            ),
            (
                "observeTokenFile: /t",
                "observeTokenFile: set, but observeAddress is not",
            ),
            (
                "observeAddress: 4245\nobserveTokenFile: /t",
                "observeAddress: \"4245\" is not ip:port",
            ),
            (
                "observeAddress: 198.18.0.1:0\nobserveTokenFile: /t",
                "observeAddress: port must not be 0",
            ),
            (
                "observeAddress: 127.0.0.1:9879\nobserveTokenFile: /t",
                "observeAddress: 127.0.0.1:9879 is healthAddress too",
            ),
            (
                "observeAddress: 198.18.0.1:4245\nobserveTokenFile: /t\nflowEvents: false",
                "observeAddress: set, but flowEvents is false",
            ),
            ("flowEvents: maybe", "flowEvents"),
        ] {
            let e = error(&format!("{MINIMAL}{text}\n"));
            assert!(
                e.starts_with(&format!("config file {FILE}: ")) && e.contains(want),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn an_ipv6_endpoint_fits_the_default_mtu() {
        let c = parse("datastore: kubernetes\nendpoint: '[fd00::1]'\n").unwrap();
        assert_eq!(c.mtu, 1420);
        let c = parse("datastore: kubernetes\nendpoint: 198.18.0.1\nmtu: 1440\n").unwrap();
        assert_eq!(c.mtu, 1440);
    }

    #[test]
    fn hostname_default() {
        let e =
            Config::parse(MINIMAL, Path::new(FILE), &Overrides::default(), || None).unwrap_err();
        assert!(e.to_string().contains("nodeName: not set"), "{e}");
        let e = Config::parse(MINIMAL, Path::new(FILE), &Overrides::default(), || {
            Some("under_score".into())
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("nodeName: not set, and the hostname"),
            "{e}"
        );
    }

    #[test]
    fn empty_file_and_missing_file() {
        assert!(error("").contains(": datastore: missing"));
        let args = AgentArgs {
            config: "/nonexistent/agent.yaml".into(),
            datastore: None,
            node_name: None,
            endpoint: None,
            check: false,
        };
        let e = Config::load(&args).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read config file /nonexistent/agent.yaml: "),
            "{e}"
        );
    }

    #[test]
    fn load_reads_the_file_and_resolves_the_cli_datastore() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("agent.yaml");
        std::fs::write(&file, format!("nodeName: n1\n{MINIMAL}")).unwrap();
        let args = AgentArgs {
            config: file,
            datastore: Some("dir:rel".parse().unwrap()),
            node_name: None,
            endpoint: None,
            check: false,
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(
            c.datastore,
            DatastoreSpec::Dir(std::env::current_dir().unwrap().join("rel"))
        );
    }
}
