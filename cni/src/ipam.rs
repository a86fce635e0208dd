//! IPAM: hands out pod addresses from the node's pod CIDR.
//!
//! The plugin is a short-lived process and the runtime may run many ADDs and
//! DELs at once, so all state lives in one JSON file per network under a state
//! directory (default [`DEFAULT_STATE_DIR`]), guarded by `flock(2)` on a
//! sibling lock file. Every change is written to a temporary file, fsynced and
//! renamed over the old one (then the directory is fsynced), so a crash or
//! power loss leaves either the old or the new state, never a torn file.
//!
//! A state file that cannot be understood is reported as
//! [`IpamError::Corrupt`] and left exactly as it is: discarding it would hand
//! out addresses that running pods still use.
//!
//! Address plan inside a range: the network and broadcast addresses are never
//! used and the first host address is reserved for the node itself, so a /24
//! gives pods .2 to .254. Addresses are handed out round robin (the search
//! starts after the last address handed out), so an address released by a DEL
//! is not given to the next pod at once, while stale routes or conntrack
//! entries for it may still exist.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Where allocations live unless the plugin config names another directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshward/ipam";

/// How long a call waits for another plugin process holding the lock. Each
/// holder only reads and rewrites a small file, so waiting this long means
/// something is stuck; failing beats hanging the runtime forever.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The state file format this code reads and writes.
const STATE_VERSION: u32 = 1;

/// Longest accepted network name; keeps file names well below NAME_MAX.
const MAX_NETWORK_NAME: usize = 128;

/// One pod interface, as the CNI runtime identifies it. ADD, DEL and GC all
/// name attachments this way, so it is the allocation's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Self {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }
}

/// The Kubernetes pod behind an attachment, when the runtime told us
/// (`K8S_POD_NAMESPACE`/`K8S_POD_NAME`/`K8S_POD_UID`). Stored so an operator (or the agent)
/// can tell which pod holds an address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// An address held by one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub key: AttachmentKey,
    /// The host side veth, kept so DEL/GC can clean up even if the naming
    /// scheme changes between versions.
    pub host_ifname: String,
    pub pod: PodMeta,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("IPAM: {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "IPAM state file {} is corrupt: {detail}; it was left untouched \
         (fix or move it aside by hand: the allocations in it may be in use)",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "IPAM range {range} is exhausted: all {in_use} usable pod addresses are allocated \
         (network, broadcast and the node's first host address are reserved)"
    )]
    Exhausted { range: Ipv4Net, in_use: u32 },
    #[error(
        "IPAM: timed out after {}s waiting for the lock on {}; another meshward-cni process holds it",
        waited.as_secs_f32(),
        path.display()
    )]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error(
        "IPAM: invalid network name {0:?}: it names the state file, so it must be 1 to 128 \
         characters of A-Z a-z 0-9 . _ - and must not start with '.'"
    )]
    InvalidNetworkName(String),
    #[error("IPAM: invalid pod range {range}: {reason}")]
    InvalidRange { range: Ipv4Net, reason: String },
    #[error("IPAM: invalid attachment {key:?}: {reason}")]
    InvalidKey { key: AttachmentKey, reason: String },
}

/// Handle on one network's allocations. Cheap: holds only paths. Every call
/// takes the file lock, so handles in different threads and processes may be
/// used at the same time.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    state_path: PathBuf,
    tmp_path: PathBuf,
    lock_path: PathBuf,
    lock_timeout: Duration,
}

impl Store {
    /// Opens (creating if needed) the store for `network` in `state_dir`:
    /// `<network>.json` holds the allocations and `<network>.lock` is the lock
    /// file. A missing directory is created with mode 0700.
    pub fn open(state_dir: &Path, network: &str) -> Result<Store, IpamError> {
        validate_network_name(network)?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io_err("creating state directory", state_dir))?;
        let store = Store {
            dir: state_dir.to_path_buf(),
            state_path: state_dir.join(format!("{network}.json")),
            // The leading dot keeps it apart from every network's files, since
            // network names may not start with one.
            tmp_path: state_dir.join(format!(".{network}.json.tmp")),
            lock_path: state_dir.join(format!("{network}.lock")),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        };
        // Surface permission problems now rather than in the middle of an ADD.
        drop(store.open_lock_file()?);
        Ok(store)
    }

    /// Overrides how long calls wait for the lock (default
    /// [`DEFAULT_LOCK_TIMEOUT`]).
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Path of the JSON state file, for messages and tooling.
    pub fn state_path(&self) -> &Path {
        &self.state_path
    }

    /// Returns the address held by `key`, or allocates the next free one in
    /// `range`. Idempotent: a repeated ADD gets the same address back, even if
    /// `range` changed since (the pod still uses it).
    pub fn allocate(
        &self,
        range: Ipv4Net,
        key: &AttachmentKey,
        host_ifname: &str,
        pod: PodMeta,
    ) -> Result<Allocation, IpamError> {
        validate_key(key)?;
        let pool = Pool::new(range)?;
        let _lock = self.lock(FlockArg::LockExclusiveNonblock)?;
        let mut state = self.read_state()?;
        if let Some(existing) = state.find(key) {
            return Ok(existing.to_allocation());
        }
        let used: HashSet<Ipv4Addr> = state.allocations.iter().map(|r| r.ip).collect();
        let in_use = pool.count_in(&used);
        if in_use >= pool.capacity() {
            return Err(IpamError::Exhausted {
                range,
                in_use: u32::try_from(in_use).unwrap_or(u32::MAX),
            });
        }
        // Starts right after the last address handed out (round robin). Since
        // fewer than `capacity` addresses are in use, a free one is found
        // within `in_use + 1` steps.
        let start = match state.last_allocated.and_then(|ip| pool.offset_of(ip)) {
            Some(last) => pool.next(last),
            None => pool.first,
        };
        let mut offset = start;
        let ip = loop {
            let ip = pool.addr(offset);
            if !used.contains(&ip) {
                break ip;
            }
            offset = pool.next(offset);
            if offset == start {
                // Unreachable given the count above; reported rather than
                // looping or panicking.
                return Err(IpamError::Exhausted {
                    range,
                    in_use: u32::try_from(in_use).unwrap_or(u32::MAX),
                });
            }
        };
        let allocation = Allocation {
            ip,
            key: key.clone(),
            host_ifname: host_ifname.to_string(),
            pod,
        };
        state.allocations.push(Record::from_allocation(&allocation));
        state.last_allocated = Some(ip);
        self.write_state(&mut state)?;
        Ok(allocation)
    }

    /// Frees the address held by `key`. Idempotent: `Ok(None)` if there was
    /// none, since the runtime may repeat a DEL.
    pub fn release(&self, key: &AttachmentKey) -> Result<Option<Allocation>, IpamError> {
        let _lock = self.lock(FlockArg::LockExclusiveNonblock)?;
        let mut state = self.read_state()?;
        let Some(pos) = state.allocations.iter().position(|r| r.matches(key)) else {
            return Ok(None);
        };
        let removed = state.allocations.remove(pos);
        self.write_state(&mut state)?;
        Ok(Some(removed.to_allocation()))
    }

    /// The allocation held by `key`, if any (for CHECK).
    pub fn get(&self, key: &AttachmentKey) -> Result<Option<Allocation>, IpamError> {
        let _lock = self.lock(FlockArg::LockSharedNonblock)?;
        let state = self.read_state()?;
        Ok(state.find(key).map(Record::to_allocation))
    }

    /// Every allocation, ordered by address.
    pub fn list(&self) -> Result<Vec<Allocation>, IpamError> {
        let _lock = self.lock(FlockArg::LockSharedNonblock)?;
        let mut state = self.read_state()?;
        state.allocations.sort_by_key(|r| r.ip);
        Ok(state
            .allocations
            .iter()
            .map(Record::to_allocation)
            .collect())
    }

    /// Releases every allocation whose key is not in `valid` (the runtime's
    /// `cni.dev/valid-attachments`) and returns what it released, so the
    /// caller can clean up their host interfaces.
    pub fn gc(&self, valid: &[AttachmentKey]) -> Result<Vec<Allocation>, IpamError> {
        let valid: HashSet<&AttachmentKey> = valid.iter().collect();
        let _lock = self.lock(FlockArg::LockExclusiveNonblock)?;
        let mut state = self.read_state()?;
        let (keep, stale): (Vec<Record>, Vec<Record>) = std::mem::take(&mut state.allocations)
            .into_iter()
            .partition(|r| valid.contains(&r.key()));
        state.allocations = keep;
        if !stale.is_empty() {
            self.write_state(&mut state)?;
        }
        let mut released: Vec<Allocation> = stale.iter().map(Record::to_allocation).collect();
        released.sort_by_key(|a| a.ip);
        Ok(released)
    }

    /// Free pod addresses left in `range` (for STATUS).
    pub fn free_count(&self, range: Ipv4Net) -> Result<u32, IpamError> {
        let pool = Pool::new(range)?;
        let _lock = self.lock(FlockArg::LockSharedNonblock)?;
        let state = self.read_state()?;
        let used: HashSet<Ipv4Addr> = state.allocations.iter().map(|r| r.ip).collect();
        let free = pool.capacity().saturating_sub(pool.count_in(&used));
        Ok(u32::try_from(free).unwrap_or(u32::MAX))
    }

    fn open_lock_file(&self) -> Result<File, IpamError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.lock_path)
            .map_err(io_err("opening lock file", &self.lock_path))
    }

    /// Takes the lock by polling a non-blocking flock, because a blocking
    /// flock cannot time out. The lock is released when the guard drops (or
    /// when the process dies, so a crashed plugin never wedges the node).
    fn lock(&self, arg: FlockArg) -> Result<Flock<File>, IpamError> {
        let started = Instant::now();
        let mut file = self.open_lock_file()?;
        let mut pause = Duration::from_millis(1);
        loop {
            match Flock::lock(file, arg) {
                Ok(guard) => return Ok(guard),
                Err((f, Errno::EAGAIN | Errno::EINTR)) => file = f,
                Err((_, errno)) => {
                    return Err(IpamError::Io {
                        action: "locking",
                        path: self.lock_path.clone(),
                        source: errno.into(),
                    })
                }
            }
            let waited = started.elapsed();
            if waited >= self.lock_timeout {
                return Err(IpamError::LockTimeout {
                    path: self.lock_path.clone(),
                    waited,
                });
            }
            std::thread::sleep(pause.min(self.lock_timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Reads the state; a missing file is an empty store (first ADD on the
    /// node), anything unreadable is [`IpamError::Corrupt`].
    fn read_state(&self) -> Result<StateFile, IpamError> {
        let path = &self.state_path;
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StateFile::default()),
            Err(e) => return Err(io_err("reading state file", path)(e)),
        };
        let corrupt = |detail: String| IpamError::Corrupt {
            path: path.clone(),
            detail,
        };
        // The version is checked on its own first, so a file from a newer
        // meshward gets "unsupported version" rather than a confusing parse
        // error.
        let probe: VersionProbe =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        match probe.version {
            Some(STATE_VERSION) => {}
            Some(v) => {
                return Err(corrupt(format!(
                    "unsupported format version {v} (this meshward-cni understands {STATE_VERSION})"
                )))
            }
            None => return Err(corrupt("no \"version\" field".to_string())),
        }
        let state: StateFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("bad contents: {e}")))?;
        let mut ips = HashSet::new();
        let mut keys = HashSet::new();
        for r in &state.allocations {
            if !ips.insert(r.ip) {
                return Err(corrupt(format!("address {} is allocated twice", r.ip)));
            }
            if !keys.insert(r.key()) {
                return Err(corrupt(format!(
                    "attachment {}/{} appears twice",
                    r.container_id, r.ifname
                )));
            }
        }
        Ok(state)
    }

    /// Replaces the state file atomically and durably: temp file, fsync,
    /// rename, fsync of the directory (which makes the rename itself durable).
    fn write_state(&self, state: &mut StateFile) -> Result<(), IpamError> {
        state.version = STATE_VERSION;
        state.allocations.sort_by_key(|r| r.ip);
        let mut data = serde_json::to_vec_pretty(state).map_err(|e| IpamError::Io {
            action: "encoding state for",
            path: self.state_path.clone(),
            source: io::Error::other(e),
        })?;
        data.push(b'\n');

        let tmp = &self.tmp_path;
        // A temp file left by a crashed writer is garbage (the rename never
        // happened); we hold the lock, so nobody else is writing it now.
        match fs::remove_file(tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing stale temp file", tmp)(e)),
        }
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)
                .map_err(io_err("creating temp file", tmp))?;
            file.write_all(&data)
                .map_err(io_err("writing temp file", tmp))?;
            file.sync_all().map_err(io_err("syncing temp file", tmp))?;
            fs::rename(tmp, &self.state_path)
                .map_err(io_err("renaming temp file over", &self.state_path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(tmp);
        }
        result?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing state directory", &self.dir))
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IpamError + 'a {
    move |source| IpamError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn validate_network_name(network: &str) -> Result<(), IpamError> {
    let ok = !network.is_empty()
        && network.len() <= MAX_NETWORK_NAME
        && !network.starts_with('.')
        && network
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IpamError::InvalidNetworkName(network.to_string()))
    }
}

/// An empty id would make unrelated attachments collide on one allocation.
fn validate_key(key: &AttachmentKey) -> Result<(), IpamError> {
    let reason = if key.container_id.is_empty() {
        "empty container id"
    } else if key.ifname.is_empty() {
        "empty interface name"
    } else {
        return Ok(());
    };
    Err(IpamError::InvalidKey {
        key: key.clone(),
        reason: reason.to_string(),
    })
}

/// The addresses of a range pods may get, as offsets from the network
/// address: `first..=last`. u64 so a /0 cannot overflow.
struct Pool {
    net: u32,
    first: u64,
    last: u64,
}

impl Pool {
    fn new(range: Ipv4Net) -> Result<Pool, IpamError> {
        if range.network() != range.addr() {
            return Err(IpamError::InvalidRange {
                range,
                reason: format!("host bits are set (did you mean {}?)", range.trunc()),
            });
        }
        if range.prefix_len() > 30 {
            return Err(IpamError::InvalidRange {
                range,
                reason: "a /31 or /32 has no address left for pods once the node's address \
                         is reserved; use /30 or larger (a /24 gives 253 pods)"
                    .to_string(),
            });
        }
        let size = 1u64 << (32 - u32::from(range.prefix_len()));
        Ok(Pool {
            net: u32::from(range.network()),
            // Offset 0 is the network address and 1 the node's own address;
            // size - 1 is broadcast.
            first: 2,
            last: size - 2,
        })
    }

    fn capacity(&self) -> u64 {
        self.last - self.first + 1
    }

    fn offset_of(&self, ip: Ipv4Addr) -> Option<u64> {
        let off = u64::from(u32::from(ip).wrapping_sub(self.net));
        (self.first..=self.last).contains(&off).then_some(off)
    }

    fn addr(&self, offset: u64) -> Ipv4Addr {
        // offset <= last < 2^32, and net + offset stays inside the range.
        Ipv4Addr::from(self.net.wrapping_add(offset as u32))
    }

    fn next(&self, offset: u64) -> u64 {
        if offset >= self.last {
            self.first
        } else {
            offset + 1
        }
    }

    fn count_in(&self, used: &HashSet<Ipv4Addr>) -> u64 {
        used.iter()
            .filter(|ip| self.offset_of(**ip).is_some())
            .count() as u64
    }
}

/// On-disk layout, kept apart from the public types so the API can change
/// without changing the file format (and the reverse).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateFile {
    version: u32,
    #[serde(default)]
    last_allocated: Option<Ipv4Addr>,
    #[serde(default)]
    allocations: Vec<Record>,
}

impl StateFile {
    fn find(&self, key: &AttachmentKey) -> Option<&Record> {
        self.allocations.iter().find(|r| r.matches(key))
    }
}

#[derive(Deserialize)]
struct VersionProbe {
    version: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    ip: Ipv4Addr,
    container_id: String,
    ifname: String,
    host_ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod_uid: Option<String>,
}

impl Record {
    fn matches(&self, key: &AttachmentKey) -> bool {
        self.container_id == key.container_id && self.ifname == key.ifname
    }

    fn key(&self) -> AttachmentKey {
        AttachmentKey::new(&self.container_id, &self.ifname)
    }

    fn from_allocation(a: &Allocation) -> Record {
        Record {
            ip: a.ip,
            container_id: a.key.container_id.clone(),
            ifname: a.key.ifname.clone(),
            host_ifname: a.host_ifname.clone(),
            pod_namespace: a.pod.namespace.clone(),
            pod_name: a.pod.name.clone(),
            pod_uid: a.pod.uid.clone(),
        }
    }

    fn to_allocation(&self) -> Allocation {
        Allocation {
            ip: self.ip,
            key: self.key(),
            host_ifname: self.host_ifname.clone(),
            pod: PodMeta {
                namespace: self.pod_namespace.clone(),
                name: self.pod_name.clone(),
                uid: self.pod_uid.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    use std::sync::Arc;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn key(id: &str) -> AttachmentKey {
        AttachmentKey::new(id, "eth0")
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("ipam"), "meshward").unwrap();
        (dir, store)
    }

    fn alloc(store: &Store, range: &str, id: &str) -> Result<Allocation, IpamError> {
        store.allocate(net(range), &key(id), "mwtest", PodMeta::default())
    }

    #[test]
    fn allocates_from_two_and_is_idempotent() {
        let (_d, s) = store();
        let pod = PodMeta {
            namespace: Some("default".into()),
            name: Some("web-0".into()),
            uid: None,
        };
        let a = s
            .allocate(net("198.19.1.0/24"), &key("c1"), "mwabc", pod.clone())
            .unwrap();
        assert_eq!(a.ip, ip("198.19.1.2"));
        assert_eq!(a.pod, pod);
        assert_eq!(a.host_ifname, "mwabc");
        let again = alloc(&s, "198.19.1.0/24", "c1").unwrap();
        assert_eq!(again, a, "repeat ADD returns the stored allocation");
        // Even after the node's range changed, the pod keeps its address.
        let moved = alloc(&s, "198.19.2.0/24", "c1").unwrap();
        assert_eq!(moved, a);
        // Same container, another interface: a separate attachment.
        let other = s
            .allocate(
                net("198.19.1.0/24"),
                &AttachmentKey::new("c1", "net1"),
                "mwdef",
                PodMeta::default(),
            )
            .unwrap();
        assert_eq!(other.ip, ip("198.19.1.3"));
        assert_eq!(s.list().unwrap().len(), 2);
        assert_eq!(s.get(&key("c1")).unwrap(), Some(a));
        assert_eq!(s.get(&key("nope")).unwrap(), None);
    }

    #[test]
    fn round_robin_does_not_reuse_released_address_at_once() {
        let (_d, s) = store();
        for (id, want) in [
            ("a", "198.19.1.2"),
            ("b", "198.19.1.3"),
            ("c", "198.19.1.4"),
        ] {
            assert_eq!(alloc(&s, "198.19.1.0/24", id).unwrap().ip, ip(want));
        }
        let released = s.release(&key("b")).unwrap().unwrap();
        assert_eq!(released.ip, ip("198.19.1.3"));
        assert_eq!(s.release(&key("b")).unwrap(), None, "DEL is idempotent");
        assert_eq!(
            alloc(&s, "198.19.1.0/24", "d").unwrap().ip,
            ip("198.19.1.5")
        );
    }

    #[test]
    fn wraps_around_and_reuses_in_order() {
        let (_d, s) = store();
        // /29: .0 network, .1 node, .7 broadcast -> pods .2 to .6.
        for i in 2..=6 {
            let a = alloc(&s, "198.19.1.0/29", &format!("p{i}")).unwrap();
            assert_eq!(a.ip, Ipv4Addr::new(198, 19, 1, i));
        }
        s.release(&key("p4")).unwrap();
        s.release(&key("p3")).unwrap();
        // The search continues after .6 and wraps: .3 comes before .4.
        assert_eq!(
            alloc(&s, "198.19.1.0/29", "x").unwrap().ip,
            ip("198.19.1.3")
        );
        assert_eq!(
            alloc(&s, "198.19.1.0/29", "y").unwrap().ip,
            ip("198.19.1.4")
        );
    }

    #[test]
    fn exhaustion_is_a_clear_error() {
        let (_d, s) = store();
        assert_eq!(s.free_count(net("198.19.1.0/30")).unwrap(), 1);
        assert_eq!(
            alloc(&s, "198.19.1.0/30", "a").unwrap().ip,
            ip("198.19.1.2")
        );
        assert_eq!(s.free_count(net("198.19.1.0/30")).unwrap(), 0);
        let err = alloc(&s, "198.19.1.0/30", "b").unwrap_err();
        assert!(
            matches!(err, IpamError::Exhausted { in_use: 1, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("198.19.1.0/30") && msg.contains("exhausted"),
            "{msg}"
        );
        // The failed ADD stored nothing.
        assert_eq!(s.list().unwrap().len(), 1);
    }

    #[test]
    fn capacity_of_a_24() {
        let (_d, s) = store();
        let range = "198.19.1.0/24";
        assert_eq!(s.free_count(net(range)).unwrap(), 253);
        let mut seen = HashSet::new();
        for i in 0..253 {
            let a = alloc(&s, range, &format!("c{i}")).unwrap();
            let last = a.ip.octets()[3];
            assert!((2..=254).contains(&last), "{}", a.ip);
            assert!(seen.insert(a.ip));
        }
        assert_eq!(s.free_count(net(range)).unwrap(), 0);
        assert!(matches!(
            alloc(&s, range, "one-too-many"),
            Err(IpamError::Exhausted { in_use: 253, .. })
        ));
        // Allocations outside a range do not count against it.
        assert_eq!(s.free_count(net("198.19.2.0/24")).unwrap(), 253);
    }

    #[test]
    fn bad_ranges_are_rejected() {
        let (_d, s) = store();
        for r in ["198.19.1.0/31", "198.19.1.1/32"] {
            let err = alloc(&s, r, "a").unwrap_err();
            assert!(matches!(err, IpamError::InvalidRange { .. }), "{err:?}");
            assert!(err.to_string().contains(r), "{err}");
            assert!(s.free_count(net(r)).is_err());
        }
        let err = alloc(&s, "198.19.1.5/24", "a").unwrap_err();
        assert!(err.to_string().contains("198.19.1.0/24"), "{err}");
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn bad_keys_are_rejected() {
        let (_d, s) = store();
        for k in [AttachmentKey::new("", "eth0"), AttachmentKey::new("c", "")] {
            let err = s
                .allocate(net("198.19.1.0/24"), &k, "mw", PodMeta::default())
                .unwrap_err();
            assert!(matches!(err, IpamError::InvalidKey { .. }), "{err:?}");
        }
    }

    #[test]
    fn gc_releases_everything_not_valid() {
        let (_d, s) = store();
        for id in ["a", "b", "c"] {
            alloc(&s, "198.19.1.0/24", id).unwrap();
        }
        let released = s.gc(&[key("b"), key("unknown")]).unwrap();
        let ids: Vec<_> = released
            .iter()
            .map(|a| a.key.container_id.as_str())
            .collect();
        assert_eq!(ids, ["a", "c"]);
        let left = s.list().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].key, key("b"));
        assert!(s.gc(&[key("b")]).unwrap().is_empty());
        assert_eq!(s.gc(&[]).unwrap().len(), 1);
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn state_survives_reopen_with_expected_format_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("a/b/ipam");
        let s = Store::open(&state_dir, "meshward").unwrap();
        let pod = PodMeta {
            namespace: Some("ns".into()),
            name: Some("p".into()),
            uid: Some("0d9e7a52-uid".into()),
        };
        s.allocate(net("198.19.1.0/24"), &key("c1"), "mw0123456789a", pod)
            .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state_dir), 0o700);
        assert_eq!(mode(s.state_path()), 0o600);
        assert_eq!(mode(&state_dir.join("meshward.lock")), 0o600);
        assert!(!state_dir.join(".meshward.json.tmp").exists());

        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(s.state_path()).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "version": 1,
                "lastAllocated": "198.19.1.2",
                "allocations": [{
                    "ip": "198.19.1.2",
                    "containerId": "c1",
                    "ifname": "eth0",
                    "hostIfname": "mw0123456789a",
                    "podNamespace": "ns",
                    "podName": "p",
                    "podUid": "0d9e7a52-uid"
                }]
            })
        );
        let reopened = Store::open(&state_dir, "meshward").unwrap();
        assert_eq!(reopened.list().unwrap(), s.list().unwrap());
        // Round robin position survives too.
        assert_eq!(
            alloc(&reopened, "198.19.1.0/24", "c2").unwrap().ip,
            ip("198.19.1.3")
        );
        // Another network in the same directory is independent.
        let other = Store::open(&state_dir, "other-net").unwrap();
        assert!(other.list().unwrap().is_empty());
    }

    #[test]
    fn corrupt_state_is_an_error_and_left_untouched() {
        let (_d, s) = store();
        let cases: &[&[u8]] = &[
            b"",
            b"{not json",
            b"[]",
            br#"{"allocations":[]}"#,
            br#"{"version":2,"allocations":[]}"#,
            br#"{"version":1,"allocations":[{"ip":"bogus"}]}"#,
            br#"{"version":1,"allocations":[
                {"ip":"198.19.1.2","containerId":"a","ifname":"eth0","hostIfname":"x"},
                {"ip":"198.19.1.2","containerId":"b","ifname":"eth0","hostIfname":"y"}]}"#,
            br#"{"version":1,"allocations":[
                {"ip":"198.19.1.2","containerId":"a","ifname":"eth0","hostIfname":"x"},
                {"ip":"198.19.1.3","containerId":"a","ifname":"eth0","hostIfname":"y"}]}"#,
        ];
        for content in cases {
            fs::write(s.state_path(), content).unwrap();
            let results = [
                alloc(&s, "198.19.1.0/24", "new").map(|_| ()),
                s.release(&key("a")).map(|_| ()),
                s.gc(&[]).map(|_| ()),
                s.get(&key("a")).map(|_| ()),
                s.list().map(|_| ()),
                s.free_count(net("198.19.1.0/24")).map(|_| ()),
            ];
            for r in results {
                let err = r.unwrap_err();
                assert!(matches!(err, IpamError::Corrupt { .. }), "{err:?}");
                let msg = err.to_string();
                assert!(msg.contains(&s.state_path().display().to_string()), "{msg}");
            }
            assert_eq!(
                &fs::read(s.state_path()).unwrap(),
                content,
                "file was modified"
            );
        }
        fs::write(s.state_path(), br#"{"version":7}"#).unwrap();
        let msg = s.list().unwrap_err().to_string();
        assert!(msg.contains("version 7"), "{msg}");
    }

    #[test]
    fn stale_temp_file_is_ignored_and_replaced() {
        let (_d, s) = store();
        let tmp = s.state_path().with_file_name(".meshward.json.tmp");
        fs::write(&tmp, b"half-written garbage").unwrap();
        assert_eq!(
            alloc(&s, "198.19.1.0/24", "a").unwrap().ip,
            ip("198.19.1.2")
        );
        assert!(!tmp.exists());
        assert_eq!(s.list().unwrap().len(), 1);
    }

    #[test]
    fn invalid_network_names() {
        let dir = tempfile::tempdir().unwrap();
        let long = "a".repeat(129);
        for name in [
            "", ".", "..", ".hidden", "../x", "a/b", "a b", "né", "a\0b", &long,
        ] {
            let err = Store::open(dir.path(), name).unwrap_err();
            assert!(
                matches!(err, IpamError::InvalidNetworkName(_)),
                "{name:?}: {err:?}"
            );
        }
        for name in ["meshward", "k8s-pod-network", "net_1.0", &"a".repeat(128)] {
            Store::open(dir.path(), name).unwrap();
        }
    }

    #[test]
    fn lock_timeout_is_reported() {
        let (_d, s) = store();
        let s = s.with_lock_timeout(Duration::from_millis(100));
        let lock_path = s.state_path().with_file_name("meshward.lock");
        let held = Flock::lock(File::open(&lock_path).unwrap(), FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        let err = alloc(&s, "198.19.1.0/24", "a").unwrap_err();
        assert!(matches!(err, IpamError::LockTimeout { .. }), "{err:?}");
        assert!(err.to_string().contains("meshward.lock"), "{err}");
        assert!(matches!(s.list(), Err(IpamError::LockTimeout { .. })));
        drop(held);
        alloc(&s, "198.19.1.0/24", "a").unwrap();
    }

    fn assert_consistent(s: &Store, expected: usize) {
        let all = s.list().unwrap();
        assert_eq!(all.len(), expected);
        let ips: HashSet<_> = all.iter().map(|a| a.ip).collect();
        let keys: HashSet<_> = all.iter().map(|a| a.key.clone()).collect();
        assert_eq!(ips.len(), expected, "duplicate addresses: {all:?}");
        assert_eq!(keys.len(), expected);
    }

    #[test]
    fn concurrent_threads_get_distinct_addresses() {
        let (_d, s) = store();
        let s = Arc::new(s);
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || alloc(&s, "198.19.1.0/24", &format!("t{i}")).unwrap())
            })
            .collect();
        let ips: HashSet<_> = handles.into_iter().map(|h| h.join().unwrap().ip).collect();
        assert_eq!(ips.len(), 50);
        assert_consistent(&s, 50);
    }

    const CHILD_ENV: &str = "MESHWARD_IPAM_TEST_CHILD";

    /// Child side of `concurrent_processes_get_distinct_addresses`; a no-op
    /// unless that test started this process.
    #[test]
    fn multiprocess_child() {
        let Ok(spec) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (dir, tag) = spec.split_once('|').unwrap();
        let s = Arc::new(Store::open(Path::new(dir), "meshward").unwrap());
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let s = Arc::clone(&s);
                let id = format!("{tag}-{i}");
                std::thread::spawn(move || alloc(&s, "198.19.1.0/24", &id).unwrap())
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn concurrent_processes_get_distinct_addresses() {
        let (_d, s) = store();
        let dir = s
            .state_path()
            .parent()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..5)
            .map(|p| {
                Command::new(&exe)
                    .args(["--exact", "ipam::tests::multiprocess_child", "--quiet"])
                    .env(CHILD_ENV, format!("{dir}|proc{p}"))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success(), "child process failed");
        }
        assert_consistent(&s, 50);
        assert_eq!(s.free_count(net("198.19.1.0/24")).unwrap(), 253 - 50);
    }
}
