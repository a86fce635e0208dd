//! The CNI protocol, sans-IO: versions, the `CNI_*` environment, the plugin
//! configuration and the result object in each version's format.
//!
//! Everything here is pure parsing and formatting so it is tested without
//! namespaces; `plugin` does the work.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{CniError, ErrorCode};
use crate::ipam::DEFAULT_STATE_DIR;

/// Spec versions we accept in a configuration. 0.3.x share 0.4.0's result
/// format; CHECK needs 0.4.0, STATUS and GC need 1.1.0.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version we speak, used where no configuration names one.
pub const LATEST_VERSION: &str = "1.1.0";

/// The link-local gateway every pod routes through (as Calico does): the
/// host side of the veth answers for it, so no address is spent per pod.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// A spec version we speak, ordered oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        Some(match s {
            "0.3.0" => Version::V0_3_0,
            "0.3.1" => Version::V0_3_1,
            "0.4.0" => Version::V0_4_0,
            "1.0.0" => Version::V1_0_0,
            "1.1.0" => Version::V1_1_0,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }
}

/// The operation the runtime asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }

    /// The oldest spec version that defines this command.
    pub fn min_version(self) -> Version {
        match self {
            Command::Check => Version::V0_4_0,
            Command::Status | Command::Gc => Version::V1_1_0,
            _ => Version::V0_3_0,
        }
    }
}

/// The `CNI_*` variables, validated for the command at hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: BTreeMap<String, String>,
    pub path: Option<String>,
}

fn env_error(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidEnvironment, msg, details)
}

impl Env {
    /// Parses the variables as given by `get` (`std::env::var` in the binary).
    /// Required variables per command follow the spec: ADD and CHECK need the
    /// container id, netns and ifname; DEL needs container id and ifname.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let nonempty = |name: &str| get(name).filter(|v| !v.is_empty());
        let raw = nonempty("CNI_COMMAND").ok_or_else(|| {
            env_error(
                "CNI_COMMAND is not set",
                "set CNI_COMMAND to one of ADD, DEL, CHECK, VERSION, STATUS, GC",
            )
        })?;
        let command = Command::parse(&raw).ok_or_else(|| {
            env_error(
                format!("unknown CNI_COMMAND {raw:?}"),
                "expected one of ADD, DEL, CHECK, VERSION, STATUS, GC",
            )
        })?;
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);

        let container_id = nonempty("CNI_CONTAINERID");
        let ifname = nonempty("CNI_IFNAME");
        let netns = nonempty("CNI_NETNS").map(PathBuf::from);
        if needs_attachment {
            let id = container_id
                .as_deref()
                .ok_or_else(|| env_error("CNI_CONTAINERID is not set", required_for(&raw)))?;
            validate_container_id(id)?;
            let name = ifname
                .as_deref()
                .ok_or_else(|| env_error("CNI_IFNAME is not set", required_for(&raw)))?;
            validate_ifname(name)?;
        }
        if needs_netns && netns.is_none() {
            return Err(env_error("CNI_NETNS is not set", required_for(&raw)));
        }
        let args = match get("CNI_ARGS") {
            Some(raw_args) => parse_args(&raw_args)?,
            None => BTreeMap::new(),
        };
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
            path: nonempty("CNI_PATH"),
        })
    }
}

fn required_for(command: &str) -> String {
    format!("the CNI specification requires it for {command}")
}

/// Container ids as the spec defines them: an alphanumeric first character,
/// then alphanumerics, `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(env_error(
            format!("CNI_CONTAINERID {id:?} is not a valid container id"),
            "it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        ))
    }
}

/// Linux interface names: 1 to 15 bytes, no '/', ':' or whitespace, not "." or "..".
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad_char = name
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '/' | ':') || c.is_control());
    if name.is_empty() || name.len() > 15 || name == "." || name == ".." || bad_char.is_some() {
        return Err(env_error(
            format!("CNI_IFNAME {name:?} is not a valid interface name"),
            "interface names are 1 to 15 bytes without '/', ':' or whitespace",
        ));
    }
    Ok(())
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn parse_args(raw: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut args = BTreeMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                args.insert(key.to_string(), value.to_string());
            }
            _ => {
                return Err(env_error(
                    format!("CNI_ARGS element {pair:?} is not KEY=VALUE"),
                    format!("CNI_ARGS was {raw:?}; expected KEY=VALUE pairs separated by ';'"),
                ))
            }
        }
    }
    Ok(args)
}

/// DNS settings, echoed into the result for the runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

/// One attachment named in a GC request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin configuration on stdin. Unknown keys are ignored, as runtimes
/// add their own (`runtimeConfig`, `args`, capabilities).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: Option<String>,
    /// This node's pod CIDR (IPv4). Required for ADD, CHECK and STATUS.
    #[serde(rename = "podCIDR", default)]
    pub pod_cidr: Option<Ipv4Net>,
    /// The pod interface MTU; default `underlayMTU` minus the WireGuard overhead.
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(rename = "underlayMTU", default)]
    pub underlay_mtu: Option<u32>,
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// Seconds ADD waits for the agent to confirm the pod's policy is in the
    /// kernel (0, the default: notify and go on). With a wait, an agent that
    /// is down or does not confirm in time fails ADD with code 11, so no pod
    /// runs before its policy does.
    #[serde(default)]
    pub agent_wait_seconds: Option<u64>,
    #[serde(default)]
    pub dns: Option<Dns>,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<GcAttachment>>,
    /// The key's name in the spec's first 1.1.0 drafts, still sent by libcni.
    #[serde(rename = "cni.dev/attachments", default)]
    pub attachments: Option<Vec<GcAttachment>>,
}

/// Default agent notification socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/meshward/agent.sock";
/// Longest `agentWaitSeconds` accepted: kubelet gives a sandbox's ADD a few
/// minutes; a wait must end well before that.
pub const MAX_AGENT_WAIT_SECONDS: u64 = 120;
/// Underlay MTU assumed when the configuration gives none.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// WireGuard's worst-case overhead over IPv6 underlay: 40 (IPv6) + 8 (UDP)
/// + 32 (WireGuard header and tag), the figure `wg-quick` uses.
pub const WIREGUARD_OVERHEAD: u32 = 80;

impl NetConf {
    /// Parses stdin: not JSON at all is a decode failure (6); JSON that does
    /// not fit (a wrong type, a missing field, a bad CIDR) is an invalid
    /// configuration (7) naming the field.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::DecodeFailure,
                "network configuration on stdin is not valid JSON",
                e.to_string(),
            )
        })?;
        if !value.is_object() {
            return Err(CniError::new(
                ErrorCode::DecodeFailure,
                "network configuration on stdin is not a JSON object",
                format!("got {}", json_kind(&value)),
            ));
        }
        let conf: NetConf = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("invalid network configuration field {field:?}"),
                e.into_inner().to_string(),
            )
        })?;
        conf.validate()?;
        Ok(conf)
    }

    fn validate(&self) -> Result<(), CniError> {
        let invalid = |msg: String, details: String| {
            CniError::new(ErrorCode::InvalidNetworkConfig, msg, details)
        };
        if !valid_network_name(&self.name) {
            return Err(invalid(
                format!("invalid network name {:?}", self.name),
                "a network name starts with a letter or digit, followed by letters, digits, '_', '.' or '-'"
                    .into(),
            ));
        }
        if let Some(wait) = self
            .agent_wait_seconds
            .filter(|&w| w > MAX_AGENT_WAIT_SECONDS)
        {
            return Err(invalid(
                format!("agentWaitSeconds {wait} is too long"),
                format!("at most {MAX_AGENT_WAIT_SECONDS} (the runtime times ADD out)"),
            ));
        }
        if let Some(cidr) = self.pod_cidr {
            if cidr.trunc() != cidr {
                return Err(invalid(
                    format!("podCIDR {cidr} has host bits set"),
                    format!("did you mean {}?", cidr.trunc()),
                ));
            }
            if cidr.prefix_len() > 30 {
                return Err(invalid(
                    format!("podCIDR {cidr} is too small"),
                    "a pod CIDR needs at least a /30: network, broadcast and the node's own address are reserved".into(),
                ));
            }
        }
        for (field, value) in [("mtu", self.mtu), ("underlayMTU", self.underlay_mtu)] {
            if let Some(mtu) = value {
                if !(576..=65535).contains(&mtu) {
                    return Err(invalid(
                        format!("{field} {mtu} is out of range"),
                        "an IPv4 MTU must lie between 576 and 65535".into(),
                    ));
                }
            }
        }
        if self.mtu.is_none() {
            let underlay = self.underlay_mtu.unwrap_or(DEFAULT_UNDERLAY_MTU);
            if underlay < 576 + WIREGUARD_OVERHEAD {
                return Err(invalid(
                    format!("underlayMTU {underlay} leaves no room for WireGuard"),
                    format!("it must be at least {}", 576 + WIREGUARD_OVERHEAD),
                ));
            }
        }
        Ok(())
    }

    /// The pod MTU: explicit, or the underlay's minus the WireGuard overhead
    /// so encrypted packets never fragment.
    pub fn pod_mtu(&self) -> u32 {
        self.mtu.unwrap_or_else(|| {
            self.underlay_mtu.unwrap_or(DEFAULT_UNDERLAY_MTU) - WIREGUARD_OVERHEAD
        })
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }

    /// How long ADD waits for the agent's confirmation (zero: not at all).
    pub fn agent_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.agent_wait_seconds.unwrap_or(0))
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET))
    }

    /// The configured version, or error 1 if we do not speak it.
    pub fn version(&self) -> Result<Version, CniError> {
        Version::parse(&self.cni_version).ok_or_else(|| {
            CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("cniVersion {:?} is not supported", self.cni_version),
                format!("meshward-cni speaks {}", SUPPORTED_VERSIONS.join(", ")),
            )
        })
    }

    /// The pod CIDR, or error 7 for commands that need one.
    pub fn require_pod_cidr(&self) -> Result<Ipv4Net, CniError> {
        self.pod_cidr.ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "network configuration has no podCIDR",
                "set \"podCIDR\" to this node's pod range, e.g. \"10.244.1.0/24\"",
            )
        })
    }

    /// The attachments a GC request keeps, under either key.
    pub fn gc_keep(&self) -> Result<Vec<GcAttachment>, CniError> {
        match (&self.valid_attachments, &self.attachments) {
            (Some(valid), _) | (None, Some(valid)) => Ok(valid.clone()),
            (None, None) => Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "GC request has no cni.dev/valid-attachments",
                "without the list of valid attachments nothing can be collected safely",
            )),
        }
    }
}

fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The output of the VERSION command.
pub fn version_info() -> serde_json::Value {
    serde_json::json!({
        "cniVersion": LATEST_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// One interface in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// One address in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// "4" or "6"; present only before 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// The result of ADD (and the `prevResult` a runtime hands back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

/// What ADD set up, independent of the result format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub host_ifname: String,
    pub host_mac: String,
    pub pod_ifname: String,
    pub pod_mac: String,
    pub netns: String,
    pub mtu: u32,
    pub ip: Ipv4Addr,
    /// Whether the pod's default route is ours (not for a second interface).
    pub default_route: bool,
}

impl CniResult {
    /// Builds the ADD result in `version`'s format, appended to `prev` when
    /// another plugin ran before us in a chain.
    pub fn for_attachment(
        version: Version,
        att: &Attachment,
        dns: Option<&Dns>,
        prev: Option<CniResult>,
    ) -> CniResult {
        let mut result = prev.unwrap_or(CniResult {
            cni_version: String::new(),
            interfaces: Vec::new(),
            ips: Vec::new(),
            routes: Vec::new(),
            dns: Dns::default(),
        });
        result.cni_version = version.as_str().to_string();
        let mtu = (version >= Version::V1_1_0).then_some(att.mtu);
        result.interfaces.push(Interface {
            name: att.host_ifname.clone(),
            mac: Some(att.host_mac.clone()),
            mtu,
            sandbox: None,
        });
        result.interfaces.push(Interface {
            name: att.pod_ifname.clone(),
            mac: Some(att.pod_mac.clone()),
            mtu,
            sandbox: Some(att.netns.clone()),
        });
        result.ips.push(IpConfig {
            version: (version < Version::V1_0_0).then(|| "4".to_string()),
            address: format!("{}/32", att.ip),
            gateway: Some(GATEWAY.to_string()),
            interface: Some(result.interfaces.len() - 1),
        });
        if att.default_route {
            result.routes.push(Route {
                dst: "0.0.0.0/0".into(),
                gw: Some(GATEWAY.to_string()),
            });
        }
        if let Some(dns) = dns {
            result.dns = dns.clone();
        }
        result
    }

    /// Reads a `prevResult`; a malformed one is an invalid configuration.
    pub fn from_prev(value: &serde_json::Value) -> Result<CniResult, CniError> {
        let mut value = value.clone();
        // Some runtimes omit cniVersion inside prevResult.
        if let Some(obj) = value.as_object_mut() {
            obj.entry("cniVersion")
                .or_insert_with(|| serde_json::Value::String(String::new()));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("invalid prevResult field {field:?}"),
                e.into_inner().to_string(),
            )
        })
    }

    /// Whether the result routes the default route through our gateway.
    pub fn has_default_route(&self) -> bool {
        let gateway = GATEWAY.to_string();
        self.routes
            .iter()
            .any(|r| r.dst == "0.0.0.0/0" && r.gw.as_deref() == Some(gateway.as_str()))
    }

    /// The addresses (without prefix) the result gives the interface `ifname`.
    pub fn addresses_of(&self, ifname: &str) -> Vec<String> {
        self.ips
            .iter()
            .filter(|ip| {
                ip.interface
                    .and_then(|i| self.interfaces.get(i))
                    .is_some_and(|iface| iface.name == ifname)
            })
            .map(|ip| ip.address.split('/').next().unwrap_or_default().to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const ADD_ENV: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ),
    ];

    #[test]
    fn env_add_parses_args() {
        let env = Env::parse(env_of(ADD_ENV)).unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.args["K8S_POD_NAME"], "web-0");
        assert_eq!(env.args["IgnoreUnknown"], "1");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "CNI_COMMAND is not set"),
            (&[("CNI_COMMAND", "FROB")], "unknown CNI_COMMAND \"FROB\""),
            (&[("CNI_COMMAND", "ADD")], "CNI_CONTAINERID is not set"),
            (
                &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "x")],
                "CNI_IFNAME is not set",
            ),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "x"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_NETNS is not set",
            ),
            (
                &[
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "-bad"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_CONTAINERID \"-bad\" is not a valid container id",
            ),
            (
                &[
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "x"),
                    ("CNI_IFNAME", "this-name-is-too-long"),
                ],
                "not a valid interface name",
            ),
            (
                &[
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "x"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", "A=1;garbage"),
                ],
                "CNI_ARGS element \"garbage\" is not KEY=VALUE",
            ),
        ];
        for (pairs, want) in cases {
            let err = Env::parse(env_of(pairs)).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidEnvironment, "{pairs:?}");
            assert!(err.msg.contains(want), "{pairs:?}: {}", err.msg);
        }
    }

    #[test]
    fn del_does_not_need_netns_and_version_needs_nothing() {
        let env = Env::parse(env_of(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(env.netns, None);
        assert!(Env::parse(env_of(&[("CNI_COMMAND", "VERSION")])).is_ok());
        assert!(Env::parse(env_of(&[("CNI_COMMAND", "GC")])).is_ok());
    }

    #[test]
    fn config_decode_vs_invalid() {
        let err = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(err.code, ErrorCode::DecodeFailure);
        let err = NetConf::parse(b"[1,2]").unwrap_err();
        assert_eq!(err.code, ErrorCode::DecodeFailure);
        let err = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidNetworkConfig);
        assert!(err.msg.contains("\"mtu\""), "{}", err.msg);
        let err = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","podCIDR":"300.1.1.0/24"}"#)
            .unwrap_err();
        assert!(err.msg.contains("podCIDR"), "{}", err.msg);
        let err = NetConf::parse(br#"{"name":"n"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidNetworkConfig);
        assert!(err.details.contains("cniVersion"), "{}", err.details);
        let err = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","podCIDR":"198.19.1.7/24"}"#)
            .unwrap_err();
        assert!(err.msg.contains("host bits"), "{}", err.msg);
        let err = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"../x"}"#).unwrap_err();
        assert!(err.msg.contains("network name"), "{}", err.msg);
        let err = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","mtu":40}"#).unwrap_err();
        assert!(err.msg.contains("mtu 40"), "{}", err.msg);
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"meshward","type":"meshward-cni",
                "podCIDR":"198.19.1.0/24","runtimeConfig":{"portMappings":[]},"args":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(conf.pod_mtu(), 1420);
        assert_eq!(conf.version().unwrap(), Version::V1_0_0);
        assert_eq!(conf.state_dir(), PathBuf::from(DEFAULT_STATE_DIR));
        let conf =
            NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","underlayMTU":9001}"#).unwrap();
        assert_eq!(conf.pod_mtu(), 8921);
        assert_eq!(
            conf.version().unwrap_err().code,
            ErrorCode::IncompatibleVersion
        );
    }

    fn attachment() -> Attachment {
        Attachment {
            host_ifname: "mw0123456789a".into(),
            host_mac: "ee:ee:ee:ee:ee:ee".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "02:00:00:00:00:01".into(),
            netns: "/run/netns/p".into(),
            mtu: 1420,
            ip: Ipv4Addr::new(198, 19, 1, 2),
            default_route: true,
        }
    }

    #[test]
    fn result_formats_per_version() {
        let old = CniResult::for_attachment(Version::V0_4_0, &attachment(), None, None);
        let json = serde_json::to_value(&old).unwrap();
        assert_eq!(json["cniVersion"], "0.4.0");
        assert_eq!(json["ips"][0]["version"], "4");
        assert_eq!(json["ips"][0]["interface"], 1);
        assert!(json["interfaces"][0].get("mtu").is_none());
        assert!(json.get("dns").is_none());

        let v1 = CniResult::for_attachment(Version::V1_0_0, &attachment(), None, None);
        let json = serde_json::to_value(&v1).unwrap();
        assert!(json["ips"][0].get("version").is_none());
        assert_eq!(json["ips"][0]["address"], "198.19.1.2/32");
        assert_eq!(json["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(json["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(json["interfaces"][1]["sandbox"], "/run/netns/p");

        let dns = Dns {
            nameservers: vec!["198.18.100.53".into()],
            ..Dns::default()
        };
        let v11 = CniResult::for_attachment(Version::V1_1_0, &attachment(), Some(&dns), None);
        let json = serde_json::to_value(&v11).unwrap();
        assert_eq!(json["interfaces"][1]["mtu"], 1420);
        assert_eq!(json["dns"]["nameservers"][0], "198.18.100.53");
        assert_eq!(v11.addresses_of("eth0"), vec!["198.19.1.2".to_string()]);
    }

    #[test]
    fn result_appends_to_prev_result() {
        let prev = CniResult::from_prev(&serde_json::json!({
            "interfaces": [{"name": "lo0"}],
            "ips": [{"address": "198.18.9.9/32", "interface": 0}]
        }))
        .unwrap();
        let result = CniResult::for_attachment(Version::V1_0_0, &attachment(), None, Some(prev));
        assert_eq!(result.interfaces.len(), 3);
        assert_eq!(result.ips[1].interface, Some(2));
        let err = CniResult::from_prev(&serde_json::json!({"ips": "nope"})).unwrap_err();
        assert!(err.msg.contains("prevResult"), "{}", err.msg);
    }

    #[test]
    fn agent_wait_defaults_to_none_and_is_bounded() {
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n"}"#).unwrap();
        assert!(conf.agent_wait().is_zero());
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","agentWaitSeconds":30}"#).unwrap();
        assert_eq!(conf.agent_wait(), std::time::Duration::from_secs(30));
        let err = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","agentWaitSeconds":121}"#)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidNetworkConfig);
        assert!(err.msg.contains("agentWaitSeconds"), "{}", err.msg);
        let err = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","agentWaitSeconds":-1}"#)
            .unwrap_err();
        assert!(err.msg.contains("agentWaitSeconds"), "{}", err.msg);
    }
}
