//! The CNI commands: ADD, DEL, CHECK, VERSION, STATUS and GC.

use std::fs::File;
use std::path::Path;

use crate::datapath::{self, DatapathError};
use crate::error::{CniError, ErrorCode};
use crate::ipam::{AttachmentKey, IpamError, PodMeta, Store};
use crate::notify::{self, Event};
use crate::spec::{Attachment, CniResult, Command, Env, NetConf, Version, LATEST_VERSION};

/// A command's failure together with the cniVersion to report it in.
#[derive(Debug)]
pub struct Failure {
    pub cni_version: String,
    pub error: CniError,
}

/// Runs one plugin invocation: the environment (through `get`) and stdin in,
/// the JSON to print on success out (`None` prints nothing).
pub fn run(
    get: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Option<serde_json::Value>, Failure> {
    let reported_version = loose_version(stdin);
    let fail = |error: CniError| Failure {
        cni_version: reported_version.clone(),
        error,
    };
    let env = Env::parse(get).map_err(fail)?;
    if env.command == Command::Version {
        return Ok(Some(crate::spec::version_info()));
    }
    let conf = NetConf::parse(stdin).map_err(fail)?;
    let version = conf.version().map_err(fail)?;
    if version < env.command.min_version() {
        return Err(fail(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "{:?} is not defined for cniVersion {}",
                env.command, conf.cni_version
            ),
            format!(
                "it needs cniVersion {} or later",
                env.command.min_version().as_str()
            ),
        )));
    }
    let out = match env.command {
        Command::Add => add(&env, &conf, version).map(Some),
        Command::Del => del(&env, &conf).map(|()| None),
        Command::Check => check(&env, &conf).map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Gc => gc(&conf).map(|()| None),
        Command::Version => unreachable!("handled above"),
    };
    out.map_err(fail)
}

/// The cniVersion to put on an error: the configuration's if it names one.
fn loose_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| Version::parse(v).is_some())
        .unwrap_or_else(|| LATEST_VERSION.to_string())
}

fn attachment_key(env: &Env) -> AttachmentKey {
    AttachmentKey::new(
        env.container_id.clone().unwrap_or_default(),
        env.ifname.clone().unwrap_or_default(),
    )
}

fn open_store(conf: &NetConf) -> Result<Store, CniError> {
    Store::open(&conf.state_dir(), &conf.name).map_err(ipam_error)
}

fn ipam_error(e: IpamError) -> CniError {
    let code = match &e {
        IpamError::Io { .. } | IpamError::Corrupt { .. } => ErrorCode::IoFailure,
        IpamError::Exhausted { .. } => ErrorCode::RangeExhausted,
        IpamError::LockTimeout { .. } => ErrorCode::TryAgainLater,
        IpamError::InvalidNetworkName(_) | IpamError::InvalidRange { .. } => {
            ErrorCode::InvalidNetworkConfig
        }
        IpamError::InvalidKey { .. } => ErrorCode::InvalidEnvironment,
    };
    let msg = match code {
        ErrorCode::RangeExhausted => "no free pod address",
        ErrorCode::TryAgainLater => "IPAM store is busy",
        ErrorCode::IoFailure => "IPAM state could not be read or written",
        _ => "invalid IPAM request",
    };
    CniError::new(code, msg, e.to_string())
}

fn datapath_error(e: DatapathError) -> CniError {
    match e {
        DatapathError::InterfaceExists { .. } => {
            CniError::new(ErrorCode::InterfaceExists, e.to_string(), "the CNI specification requires an error when CNI_IFNAME already exists; DEL the earlier attachment first")
        }
        DatapathError::Mismatch(_) => {
            CniError::new(ErrorCode::CheckFailed, "container networking is not as ADD left it", e.to_string())
        }
        _ => CniError::new(ErrorCode::Datapath, "data path change failed", e.to_string()),
    }
}

/// Opens CNI_NETNS, distinguishing a missing path from one that is not a
/// network namespace. `missing` is the code for a path that does not exist.
fn open_netns(path: &Path, missing: ErrorCode) -> Result<File, CniError> {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let shown = path.display();
    let file = crate::netns::open(path).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            missing
        } else {
            ErrorCode::InvalidEnvironment
        };
        CniError::new(
            code,
            format!("CNI_NETNS {shown} cannot be opened"),
            format!("{e}; the runtime must pass the path of the container's network namespace"),
        )
    })?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_NETNS {shown} cannot be inspected"),
            e.to_string(),
        )
    })?;
    if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_NETNS {shown} is not a network namespace"),
            "expected a namespace file such as /run/netns/NAME or /proc/PID/ns/net",
        ));
    }
    Ok(file)
}

fn add(env: &Env, conf: &NetConf, version: Version) -> Result<serde_json::Value, CniError> {
    let cidr = conf.require_pod_cidr()?;
    let netns_path = env.netns.as_deref().unwrap_or(Path::new(""));
    let ns = open_netns(netns_path, ErrorCode::InvalidEnvironment)?;
    let prev = conf
        .prev_result
        .as_ref()
        .map(CniResult::from_prev)
        .transpose()?;
    let key = attachment_key(env);
    let host_ifname = datapath::host_ifname(&key.container_id, &key.ifname);
    let store = open_store(conf)?;
    let existed = store.get(&key).map_err(ipam_error)?.is_some();
    let pod = PodMeta {
        namespace: env.args.get("K8S_POD_NAMESPACE").cloned(),
        name: env.args.get("K8S_POD_NAME").cloned(),
        uid: env.args.get("K8S_POD_UID").cloned(),
    };
    let alloc = store
        .allocate(cidr, &key, &host_ifname, pod.clone())
        .map_err(ipam_error)?;
    let mtu = conf.pod_mtu();
    let link = match datapath::add(&ns, &host_ifname, &key.ifname, alloc.ip, mtu) {
        Ok(link) => link,
        Err(e) => {
            // A fresh allocation must not leak; an earlier ADD's stays.
            if !existed {
                let _ = store.release(&key);
            }
            return Err(datapath_error(e));
        }
    };
    let attachment = Attachment {
        host_ifname: host_ifname.clone(),
        host_mac: datapath::format_mac(&datapath::HOST_MAC),
        pod_ifname: key.ifname.clone(),
        pod_mac: link.pod_mac,
        netns: netns_path.display().to_string(),
        mtu,
        ip: alloc.ip,
        default_route: link.default_route,
    };
    let event = Event::add(&conf.name, &key, &attachment, &pod);
    let wait = conf.agent_wait();
    if wait.is_zero() {
        notify::send(&conf.agent_socket(), &event);
    } else if let Err(why) = notify::confirm(&conf.agent_socket(), &event, wait) {
        // No pod runs before its policy: undo this ADD (the agent forgets
        // the address too), the runtime retries.
        let _ = datapath::delete_host_link(&host_ifname);
        if !existed {
            let _ = store.release(&key);
        }
        notify::send(
            &conf.agent_socket(),
            &Event {
                event: "del",
                ..event
            },
        );
        return Err(CniError::new(
            ErrorCode::TryAgainLater,
            "the pod's network policy is not in place yet",
            why,
        ));
    }
    let result = CniResult::for_attachment(version, &attachment, conf.dns.as_ref(), prev);
    serde_json::to_value(result).map_err(|e| {
        CniError::new(
            ErrorCode::IoFailure,
            "could not encode the result",
            e.to_string(),
        )
    })
}

fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let key = attachment_key(env);
    let store = open_store(conf)?;
    let recorded = store.get(&key).map_err(ipam_error)?;
    let host_ifname = recorded
        .as_ref()
        .map(|a| a.host_ifname.clone())
        .unwrap_or_else(|| datapath::host_ifname(&key.container_id, &key.ifname));
    // Gone already if the netns was destroyed: deleting reports false, fine.
    datapath::delete_host_link(&host_ifname).map_err(datapath_error)?;
    if let Some(alloc) = store.release(&key).map_err(ipam_error)? {
        notify::send(&conf.agent_socket(), &Event::del(&conf.name, &alloc));
    }
    Ok(())
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidNetworkConfig,
            "CHECK needs prevResult",
            "the runtime must pass the result of the earlier ADD as prevResult",
        )
    })?;
    let prev = CniResult::from_prev(prev)?;
    let netns_path = env.netns.as_deref().unwrap_or(Path::new(""));
    let ns = open_netns(netns_path, ErrorCode::UnknownContainer)?;
    let key = attachment_key(env);
    let store = open_store(conf)?;
    let alloc = store.get(&key).map_err(ipam_error)?.ok_or_else(|| {
        CniError::new(
            ErrorCode::CheckFailed,
            "container has no address allocated",
            format!(
                "no IPAM allocation for container {} interface {}",
                key.container_id, key.ifname
            ),
        )
    })?;
    let ip = alloc.ip.to_string();
    if !prev.addresses_of(&key.ifname).contains(&ip) {
        return Err(CniError::new(
            ErrorCode::CheckFailed,
            "prevResult does not match the allocation",
            format!(
                "IPAM holds {ip} for {}, prevResult does not list it",
                key.ifname
            ),
        ));
    }
    datapath::check(
        &ns,
        &alloc.host_ifname,
        &key.ifname,
        alloc.ip,
        conf.pod_mtu(),
        prev.has_default_route(),
    )
    .map_err(datapath_error)
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    let cidr = conf.require_pod_cidr()?;
    let unavailable =
        |msg: &str, details: String| CniError::new(ErrorCode::NotAvailable, msg, details);
    let store = Store::open(&conf.state_dir(), &conf.name)
        .map_err(|e| unavailable("IPAM state directory is not usable", e.to_string()))?;
    nix::unistd::access(&conf.state_dir(), nix::unistd::AccessFlags::W_OK).map_err(|e| {
        unavailable(
            "IPAM state directory is not writable",
            format!("{}: {e}", conf.state_dir().display()),
        )
    })?;
    let free = store
        .free_count(cidr)
        .map_err(|e| unavailable("IPAM state could not be read", e.to_string()))?;
    if free == 0 {
        return Err(unavailable(
            "no free pod address",
            format!("every usable address of {cidr} is allocated"),
        ));
    }
    Ok(())
}

fn gc(conf: &NetConf) -> Result<(), CniError> {
    let keep: Vec<AttachmentKey> = conf
        .gc_keep()?
        .into_iter()
        .map(|a| AttachmentKey::new(a.container_id, a.ifname))
        .collect();
    let store = open_store(conf)?;
    let released = store.gc(&keep).map_err(ipam_error)?;
    let mut failures = Vec::new();
    for alloc in &released {
        match datapath::delete_host_link(&alloc.host_ifname) {
            Ok(_) => notify::send(&conf.agent_socket(), &Event::del(&conf.name, alloc)),
            Err(e) => failures.push(e.to_string()),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::Datapath,
            "GC released the addresses but could not delete every interface",
            failures.join("; "),
        ))
    }
}
