//! What the lab writes into its shared file datastore besides Nodes: a Pod
//! for every lab pod (`pods.yaml`: name, Kubernetes namespace, node, IP,
//! labels) and the files given to `lab apply` (`applied-FILE`).
//!
//! A Pod document in an applied file whose `metadata.name` is a lab pod
//! (`node1-pod2`) sets that pod's Kubernetes namespace and labels: the lab
//! owns its node and address. Every other document is applied as written.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::state::{Lab, Pod};

/// The datastore file holding the lab's Pods.
pub const PODS_FILE: &str = "pods.yaml";

/// Parses `--pod-labels POD=KEY=VALUE[,KEY=VALUE...]`.
pub fn parse_pod_labels(text: &str) -> Result<(String, BTreeMap<String, String>), String> {
    let (pod, labels) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: want POD=KEY=VALUE[,KEY=VALUE...]"))?;
    let mut map = BTreeMap::new();
    for pair in labels.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{text:?}: label {pair:?} is not KEY=VALUE"))?;
        if k.is_empty() {
            return Err(format!("{text:?}: empty label key"));
        }
        map.insert(k.to_string(), v.to_string());
    }
    Ok((pod.to_string(), map))
}

/// The Pod manifest of every lab pod, as one YAML List (JSON is YAML).
pub fn pods_manifest(state: &Lab) -> String {
    let items: Vec<Value> = state
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter().map(move |p| pod_object(&n.name, p)))
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    serde_json::to_string_pretty(&list).expect("a JSON value always serializes") + "\n"
}

fn pod_object(node: &str, pod: &Pod) -> Value {
    let ip = pod.address.addr().to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.k8s_namespace,
            "labels": pod.labels,
        },
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

pub fn write_pods(datastore: &Path, state: &Lab) -> Result<()> {
    write_atomically(&datastore.join(PODS_FILE), pods_manifest(state).as_bytes())
}

/// The datastore file `lab apply FILE` writes to.
pub fn applied_path(datastore: &Path, file: &Path) -> Result<PathBuf> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: not a file name", file.display()))?;
    let stem = name
        .strip_suffix(".yaml")
        .or_else(|| name.strip_suffix(".yml"))
        .or_else(|| name.strip_suffix(".json"))
        .unwrap_or(name);
    Ok(datastore.join(format!("applied-{stem}.yaml")))
}

/// `lab apply`: lab pods' namespace and labels go into `state`, everything
/// else into the returned YAML (one document per object). Rejects a file
/// that is not YAML; objects are checked by the agents, which log problems.
pub fn split_applied(file: &Path, text: &str, state: &mut Lab) -> Result<String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| anyhow!("{}: invalid YAML: {e}", file.display()))?;
    let mut rest = String::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let is_pod = doc.get("kind").and_then(Value::as_str) == Some("Pod")
            && doc.get("apiVersion").and_then(Value::as_str) == Some("v1");
        let name = doc.pointer("/metadata/name").and_then(Value::as_str);
        let lab_pod = name.and_then(|name| {
            state
                .nodes
                .iter_mut()
                .flat_map(|n| n.pods.iter_mut())
                .find(|p| p.name == name)
        });
        match (is_pod, lab_pod) {
            (true, Some(pod)) => {
                if let Some(ns) = doc.pointer("/metadata/namespace") {
                    let ns = ns.as_str().ok_or_else(|| {
                        anyhow!(
                            "{}: document {}: metadata.namespace is not a string",
                            file.display(),
                            i + 1
                        )
                    })?;
                    pod.k8s_namespace = ns.to_string();
                }
                let labels = match doc.pointer("/metadata/labels") {
                    None | Some(Value::Null) => BTreeMap::new(),
                    Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                        anyhow!(
                            "{}: document {}: metadata.labels: {e}",
                            file.display(),
                            i + 1
                        )
                    })?,
                };
                pod.labels = labels;
            }
            _ => {
                rest.push_str("---\n");
                rest.push_str(
                    &serde_json::to_string_pretty(&doc).expect("a JSON value always serializes"),
                );
                rest.push('\n');
            }
        }
    }
    Ok(rest)
}

pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp~");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Applies `--pod-labels` values to the lab's pods.
pub fn set_labels(state: &mut Lab, labels: &[(String, BTreeMap<String, String>)]) -> Result<()> {
    for (name, map) in labels {
        let Some(pod) = state
            .nodes
            .iter_mut()
            .flat_map(|n| n.pods.iter_mut())
            .find(|p| &p.name == name)
        else {
            bail!("--pod-labels names {name}, which is not a pod of this lab");
        };
        pod.labels = map.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_labels_flag() {
        let (pod, labels) = parse_pod_labels("node1-pod1=app=web,tier=front").unwrap();
        assert_eq!(pod, "node1-pod1");
        assert_eq!(labels["app"], "web");
        assert_eq!(labels["tier"], "front");
        assert!(parse_pod_labels("node1-pod1").is_err());
        assert!(parse_pod_labels("node1-pod1=app").is_err());
        assert!(parse_pod_labels("p==x").is_err());
        assert!(parse_pod_labels("p=").unwrap().1.is_empty());
    }

    #[test]
    fn applied_names() {
        let d = Path::new("/ds");
        assert_eq!(
            applied_path(d, Path::new("/x/policy.yaml")).unwrap(),
            Path::new("/ds/applied-policy.yaml")
        );
        assert_eq!(
            applied_path(d, Path::new("p.json")).unwrap(),
            Path::new("/ds/applied-p.yaml")
        );
    }
}
