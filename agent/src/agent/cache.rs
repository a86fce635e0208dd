//! The peer cache, `<stateDir>/peers.json`: the last good peer set and this
//! node's pod CIDRs, so a restarted agent configures the mesh at once,
//! before its datastore has synced, and sessions come back without waiting
//! for a full listing.
//!
//! Written crash-safe on every change (temporary file, fsync, rename, fsync
//! of the directory): a crash leaves the old file or the new one. It is
//! only a cache: one that cannot be read or does not belong to this node is
//! reported and ignored, and replaced by the next write.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use meshward_keys::PublicKey;
use serde::{Deserialize, Serialize};

use super::plan::Peer;

pub const FILE_NAME: &str = "peers.json";
const VERSION: u32 = 1;
/// A cache larger than this is not read (a wrong file, not a cache).
const MAX_LEN: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// What the cache holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cached {
    pub pod_cidrs: Vec<Ipv4Net>,
    pub peers: BTreeMap<String, Peer>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File1 {
    version: u32,
    node: String,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Vec<Ipv4Net>,
    peers: BTreeMap<String, PeerEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerEntry {
    public_key: String,
    endpoint: SocketAddr,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Vec<Ipv4Net>,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Reads the cache of node `node`; `Ok(None)` when there is none.
pub fn load(state_dir: &Path, node: &str) -> Result<Option<Cached>, CacheError> {
    let path = path(state_dir);
    let invalid = |message: String| CacheError::Invalid {
        path: path.clone(),
        message,
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Io {
                action: "opening",
                path,
                source,
            })
        }
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_LEN {
        return Err(invalid(format!("{len} bytes: too large for a peer cache")));
    }
    let text = fs::read(&path).map_err(|source| CacheError::Io {
        action: "reading",
        path: path.clone(),
        source,
    })?;
    let parsed: File1 =
        serde_json::from_slice(&text).map_err(|e| invalid(format!("not a peer cache: {e}")))?;
    if parsed.version != VERSION {
        return Err(invalid(format!(
            "format version {}, this agent reads {VERSION}",
            parsed.version
        )));
    }
    if parsed.node != node {
        return Err(invalid(format!(
            "written for node {:?}, this is node {node:?}",
            parsed.node
        )));
    }
    let mut peers = BTreeMap::new();
    for (name, entry) in parsed.peers {
        let public_key = PublicKey::from_wg_base64(&entry.public_key)
            .map_err(|e| invalid(format!("peers.{name}.publicKey: {e}")))?;
        let mut pod_cidrs: Vec<Ipv4Net> = entry.pod_cidrs.iter().map(Ipv4Net::trunc).collect();
        pod_cidrs.sort();
        pod_cidrs.dedup();
        if pod_cidrs.is_empty() {
            return Err(invalid(format!("peers.{name}.podCIDRs: empty")));
        }
        peers.insert(
            name,
            Peer {
                public_key,
                endpoint: entry.endpoint,
                pod_cidrs,
            },
        );
    }
    Ok(Some(Cached {
        pod_cidrs: parsed.pod_cidrs,
        peers,
    }))
}

/// Replaces the cache with `cached`, crash-safe.
pub fn save(state_dir: &Path, node: &str, cached: &Cached) -> Result<(), CacheError> {
    let path = path(state_dir);
    let file = File1 {
        version: VERSION,
        node: node.to_string(),
        pod_cidrs: cached.pod_cidrs.clone(),
        peers: cached
            .peers
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    PeerEntry {
                        public_key: p.public_key.to_string(),
                        endpoint: p.endpoint,
                        pod_cidrs: p.pod_cidrs.clone(),
                    },
                )
            })
            .collect(),
    };
    let mut text = serde_json::to_vec_pretty(&file).map_err(|e| CacheError::Invalid {
        path: path.clone(),
        message: format!("encoding: {e}"),
    })?;
    text.push(b'\n');
    write_atomically(&path, &text)
}

/// Temp file beside the target, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("cache");
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CacheError::Io {
            action,
            path,
            source,
        }
    };
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        f.write_all(bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io("renaming temp file to", path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing directory", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshward_keys::NodeKey;

    fn cached() -> Cached {
        let mut peers = BTreeMap::new();
        peers.insert(
            "node2".to_string(),
            Peer {
                public_key: NodeKey::generate().public(),
                endpoint: "198.18.0.2:51871".parse().unwrap(),
                pod_cidrs: vec!["198.19.2.0/24".parse().unwrap()],
            },
        );
        Cached {
            pod_cidrs: vec!["198.19.1.0/24".parse().unwrap()],
            peers,
        }
    }

    #[test]
    fn round_trip_and_owner_check() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "node1").unwrap(), None);
        let c = cached();
        save(dir.path(), "node1", &c).unwrap();
        assert_eq!(load(dir.path(), "node1").unwrap(), Some(c.clone()));
        let e = load(dir.path(), "node9").unwrap_err().to_string();
        assert!(e.contains("written for node \"node1\""), "{e}");
        // an overwrite leaves no temp file behind
        save(dir.path(), "node1", &Cached::default()).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
        assert_eq!(load(dir.path(), "node1").unwrap(), Some(Cached::default()));
    }

    #[test]
    fn a_bad_cache_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "{",
            "[]",
            r#"{"version":2,"node":"node1","podCIDRs":[],"peers":{}}"#,
            r#"{"version":1,"node":"node1","podCIDRs":[],"peers":{"n":{"publicKey":"x","endpoint":"198.18.0.2:1","podCIDRs":["198.19.2.0/24"]}}}"#,
            r#"{"version":1,"node":"node1","podCIDRs":[],"peers":{"n":{"publicKey":"WAmgVYXkbT2bCtdcDwolI88/iVi/aV3/PHcUBTQSYmo=","endpoint":"198.18.0.2:1","podCIDRs":[]}}}"#,
        ] {
            fs::write(path(dir.path()), text).unwrap();
            let e = load(dir.path(), "node1").unwrap_err().to_string();
            assert!(e.contains("peers.json"), "{text}: {e}");
        }
    }
}
