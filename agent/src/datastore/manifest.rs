//! Kubernetes-style manifests in a file: multi-document YAML (`---`), JSON
//! (one or more concatenated values), `kind: List` / `kind: NodeList`.
//! Pure: bytes in, objects and errors out.
//!
//! A file that is not YAML/JSON at all is one [`FileError`]. Otherwise each
//! document (or List item) stands alone: a bad one is a [`ManifestError`]
//! naming the file, the document, the object and the field, and the rest of
//! the file still applies.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use meshward_policy::{MeshClusterwideNetworkPolicy, MeshNetworkPolicy, PolicyObject};
use serde_json::Value;
use tracing::debug;

use super::model::{namespace_info, pod_info, FieldError, NodeInfo};
pub(crate) use super::store::{Object, ObjectKey};

/// A file that is not YAML (or JSON) at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileError {
    pub file: PathBuf,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

impl std::error::Error for FileError {}

/// A problem with one object (document or List item) in a manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ManifestError {
    pub file: PathBuf,
    /// 1-based document number.
    pub document: usize,
    /// The document's first line.
    pub line: u64,
    /// 1-based index in a List's `items`.
    pub item: Option<usize>,
    /// `Node node-1`, `Node (unnamed)`; none when the kind is unknown yet.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {} (line {})",
            self.file.display(),
            self.document,
            self.line
        )?;
        if let Some(item) = self.item {
            write!(f, ", item {item}")?;
        }
        if let Some(object) = &self.object {
            write!(f, ", {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// What one file holds.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    /// Good objects, each key at most once, in file order.
    pub objects: Vec<Object>,
    /// One per rejected document/item, in file order.
    pub errors: Vec<ManifestError>,
    /// Objects that were rejected but could be named: their last good
    /// version (if any) should stay in force.
    pub rejected: Vec<ObjectKey>,
    /// Some rejected object of a known kind could not even be named.
    pub unnamed_rejects: bool,
}

fn is_json(file: &Path) -> bool {
    file.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Splits a file into documents, each with its first line.
pub(crate) fn documents(file: &Path, bytes: &[u8]) -> Result<Vec<(Value, u64)>, FileError> {
    let whole = |message: String| FileError {
        file: file.to_path_buf(),
        message,
    };
    if is_json(file) {
        let mut docs = Vec::new();
        let mut stream = serde_json::Deserializer::from_slice(bytes).into_iter::<Value>();
        loop {
            // the first line of the next document: skip the whitespace before it
            let offset = stream.byte_offset();
            let start = offset
                + bytes[offset..]
                    .iter()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
            let line = 1 + bytes[..start].iter().filter(|&&b| b == b'\n').count() as u64;
            match stream.next() {
                None => break,
                Some(Ok(v)) => docs.push((v, line)),
                Some(Err(e)) => return Err(whole(format!("invalid JSON: {e}"))),
            }
        }
        Ok(docs)
    } else {
        let text = std::str::from_utf8(bytes).map_err(|e| whole(format!("not UTF-8: {e}")))?;
        let options = serde_saphyr::options! { with_snippet: false };
        let docs: Vec<serde_saphyr::Spanned<Value>> =
            serde_saphyr::from_multiple_with_options(text, options)
                .map_err(|e| whole(format!("invalid YAML: {e}")))?;
        Ok(docs
            .into_iter()
            .map(|d| (d.value, d.referenced.line()))
            .collect())
    }
}

/// Parses a manifest file's content.
pub(crate) fn parse(file: &Path, bytes: &[u8]) -> Result<Parsed, FileError> {
    let mut parsed = Parsed::default();
    let mut seen: BTreeMap<ObjectKey, usize> = BTreeMap::new();
    for (i, (value, line)) in documents(file, bytes)?.into_iter().enumerate() {
        let at = At {
            file,
            document: i + 1,
            line,
            item: None,
        };
        dispatch(value, &at, true, &mut parsed, &mut seen);
    }
    Ok(parsed)
}

/// Where a document is.
struct At<'a> {
    file: &'a Path,
    document: usize,
    line: u64,
    item: Option<usize>,
}

impl At<'_> {
    fn error(
        &self,
        object: Option<String>,
        field: Option<String>,
        message: String,
    ) -> ManifestError {
        ManifestError {
            file: self.file.to_path_buf(),
            document: self.document,
            line: self.line,
            item: self.item,
            object,
            field,
            message,
        }
    }
}

fn dispatch(
    value: Value,
    at: &At<'_>,
    top: bool,
    parsed: &mut Parsed,
    seen: &mut BTreeMap<ObjectKey, usize>,
) {
    let Value::Object(map) = &value else {
        parsed
            .errors
            .push(at.error(None, None, "not an object (a mapping)".into()));
        return;
    };
    let text = |field: &str| -> Result<&str, String> {
        match map.get(field) {
            None | Some(Value::Null) => Err("missing".into()),
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(other) => Err(format!("not a string: {other}")),
        }
    };
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let kind = match text("kind") {
        Ok(v) => v,
        Err(m) => {
            let label = name.map(|n| format!("object {n}"));
            parsed.errors.push(at.error(label, Some("kind".into()), m));
            return;
        }
    };
    let label = format!("{kind} {}", name.as_deref().unwrap_or("(unnamed)"));
    let api_version = match text("apiVersion") {
        Ok(v) => v,
        Err(m) => {
            parsed
                .errors
                .push(at.error(Some(label), Some("apiVersion".into()), m));
            return;
        }
    };
    if (kind.ends_with("List") && api_version == "v1") || kind == "List" {
        if !top {
            parsed
                .errors
                .push(at.error(Some(label), None, "a List inside a List".into()));
            return;
        }
        let items = match map.get("items") {
            None | Some(Value::Null) => return,
            Some(Value::Array(items)) => items.clone(),
            Some(_) => {
                parsed.errors.push(at.error(
                    Some(label),
                    Some("items".into()),
                    "not a list".into(),
                ));
                return;
            }
        };
        for (j, item) in items.into_iter().enumerate() {
            let at = At {
                item: Some(j + 1),
                ..*at
            };
            dispatch(item, &at, false, parsed, seen);
        }
        return;
    }
    let namespace = map
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let (api_version, kind) = (api_version.to_string(), kind.to_string());
    let (api_version, kind) = (api_version.as_str(), kind.as_str());
    let Some(object) = convert(api_version, kind, value) else {
        debug!(
            file = %at.file.display(),
            document = at.document,
            "ignoring {api_version} {kind}: not a kind meshward reads"
        );
        return;
    };
    match object {
        Ok(object) => {
            let key = object.key();
            if let Some(first) = seen.get(&key) {
                parsed.errors.push(at.error(
                    Some(label),
                    Some("metadata.name".into()),
                    format!("{key} is already defined in document {first}; this one is skipped"),
                ));
            } else {
                seen.insert(key, at.document);
                parsed.objects.push(object);
            }
        }
        Err(e) => {
            parsed
                .errors
                .push(at.error(Some(label), Some(e.field), e.message));
            match name.and_then(|name| key_of(api_version, kind, namespace, name)) {
                Some(key) => parsed.rejected.push(key),
                None => parsed.unnamed_rejects = true,
            }
        }
    }
}

/// An object of a kind meshward reads, from its JSON form: `None` for any
/// other kind. The one conversion every datastore uses.
pub(crate) fn convert(
    api_version: &str,
    kind: &str,
    value: Value,
) -> Option<Result<Object, FieldError>> {
    let converted: Result<Object, FieldError> = match (api_version, kind) {
        ("v1", "Node") => typed::<Node>(value)
            .and_then(|n| NodeInfo::try_from(&n))
            .map(Object::Node),
        ("v1", "Pod") => typed::<Pod>(value)
            .and_then(|p| pod_info(&p))
            .map(Object::Pod),
        ("v1", "Namespace") => typed::<Namespace>(value)
            .and_then(|n| namespace_info(&n))
            .map(Object::Namespace),
        ("networking.k8s.io/v1", "NetworkPolicy") => typed::<NetworkPolicy>(value)
            .and_then(|p| named(p.metadata.name.as_deref()).map(|_| p))
            .map(|p| Object::Policy(PolicyObject::Kubernetes(Arc::new(p)))),
        ("meshward.io/v1alpha1", "MeshNetworkPolicy") => typed::<MeshNetworkPolicy>(value)
            .and_then(|p| named(p.metadata.name.as_deref()).map(|_| p))
            .and_then(|p| checked(p.spec.validate()).map(|_| p))
            .map(|p| Object::Policy(PolicyObject::Mesh(Arc::new(p)))),
        ("meshward.io/v1alpha1", "MeshClusterwideNetworkPolicy") => {
            typed::<MeshClusterwideNetworkPolicy>(value)
                .and_then(|p| named(p.metadata.name.as_deref()).map(|_| p))
                .and_then(|p| checked(p.spec.validate()).map(|_| p))
                .map(|p| Object::Policy(PolicyObject::Clusterwide(Arc::new(p))))
        }
        _ => return None,
    };
    Some(converted.and_then(|o| policy_problems(&o).map_or(Ok(o), Err)))
}

/// The key a rejected object would have had.
pub(crate) fn key_of(
    api_version: &str,
    kind: &str,
    namespace: String,
    name: String,
) -> Option<ObjectKey> {
    use meshward_policy::{PodRef, PolicyKind, PolicyRef};
    let policy = |kind, namespace| {
        Some(ObjectKey::Policy(PolicyRef {
            kind,
            namespace,
            name: name.clone(),
        }))
    };
    match (api_version, kind) {
        ("v1", "Node") => Some(ObjectKey::Node(name)),
        ("v1", "Namespace") => Some(ObjectKey::Namespace(name)),
        ("v1", "Pod") => Some(ObjectKey::Pod(PodRef { namespace, name })),
        ("networking.k8s.io/v1", "NetworkPolicy") => policy(PolicyKind::NetworkPolicy, namespace),
        ("meshward.io/v1alpha1", "MeshNetworkPolicy") => {
            policy(PolicyKind::MeshNetworkPolicy, namespace)
        }
        ("meshward.io/v1alpha1", "MeshClusterwideNetworkPolicy") => {
            policy(PolicyKind::MeshClusterwideNetworkPolicy, String::new())
        }
        _ => None,
    }
}

fn named(name: Option<&str>) -> Result<(), FieldError> {
    match name {
        Some(n) if !n.is_empty() => Ok(()),
        _ => Err(FieldError::new("metadata.name", "missing")),
    }
}

/// The first problem `validate()` found (every one is logged by the
/// compiler later; the manifest error names the first).
fn checked(result: Result<(), meshward_policy::ValidationErrors>) -> Result<(), FieldError> {
    result.map_err(|errors| {
        let mut all = errors.0.into_iter();
        let first = all.next();
        let more = all.count();
        let (field, message) = first.map_or(("spec".to_string(), "invalid".to_string()), |e| {
            (e.path, e.message)
        });
        let message = if more > 0 {
            format!("{message} (and {more} more problems)")
        } else {
            message
        };
        FieldError::new(field, message)
    })
}

/// What the policy compiler would reject in a policy (checked here so the
/// error names the file and the last good version stays in force).
fn policy_problems(object: &Object) -> Option<FieldError> {
    let Object::Policy(policy) = object else {
        return None;
    };
    let view = meshward_policy::ClusterView {
        policies: vec![policy.clone()],
        ..Default::default()
    };
    let errors = meshward_policy::compile(&view, "").errors;
    let more = errors.len().saturating_sub(1);
    errors.into_iter().next().map(|e| {
        let message = if more > 0 {
            format!("{} (and {more} more problems)", e.message)
        } else {
            e.message
        };
        FieldError::new(e.field, message)
    })
}

/// A typed object from a generic value, with the path of any bad field.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "(object)".into() } else { path };
        FieldError::new(field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "WAmgVYXkbT2bCtdcDwolI88/iVi/aV3/PHcUBTQSYmo=";

    fn names(p: &Parsed) -> Vec<String> {
        p.objects.iter().map(|o| o.key().to_string()).collect()
    }

    #[test]
    fn multi_document_yaml_with_other_kinds_and_empty_documents() {
        let yaml = format!(
            "# cluster\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: a\n  annotations:\n    \
             meshward.io/public-key: {KEY}\n    meshward.io/endpoint: 198.18.0.1:51871\n\
             spec:\n  podCIDR: 198.19.1.0/24\n---\n---\napiVersion: v1\nkind: ConfigMap\n\
             metadata: {{name: x}}\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: b}}\n"
        );
        let p = parse(Path::new("/d/nodes.yaml"), yaml.as_bytes()).unwrap();
        assert_eq!(names(&p), ["Node a", "Node b"]);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let Object::Node(a) = &p.objects[0] else {
            panic!("not a node: {:?}", p.objects[0])
        };
        assert!(a.is_peerable());
    }

    #[test]
    fn lists_and_json() {
        let yaml = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: a}}\n\
                    - {apiVersion: v1, kind: Node, metadata: {name: b}}\n---\n\
                    apiVersion: v1\nkind: NodeList\nitems: [{apiVersion: v1, kind: Node, metadata: {name: c}}]\n";
        let p = parse(Path::new("l.yml"), yaml.as_bytes()).unwrap();
        assert_eq!(names(&p), ["Node a", "Node b", "Node c"]);

        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"j1"}}]}
            {"apiVersion":"v1","kind":"Node","metadata":{"name":"j2"},"spec":{"podCIDR":"bad"}}"#;
        let p = parse(Path::new("/d/n.json"), json.as_bytes()).unwrap();
        assert_eq!(names(&p), ["Node j1"]);
        assert_eq!(
            p.errors[0].to_string(),
            "/d/n.json: document 2 (line 2), Node j2: field spec.podCIDR: \
             \"bad\" is not a CIDR (want e.g. 10.244.1.0/24)"
        );
        assert_eq!(p.rejected, [ObjectKey::Node("j2".into())]);
    }

    #[test]
    fn a_bad_object_is_named_and_skipped_and_the_rest_applies() {
        let yaml = "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: Node\nmetadata:\n  name: b\n  labels: {x: 1}\n---\n\
                    apiVersion: v1\nkind: Node\nmetadata:\n  name: c\n  annotations:\n    \
                    meshward.io/endpoint: nowhere\n---\n\
                    apiVersion: v1\nkind: Node\nmetadata: {name: d}\nspec: {podCIDRs: [10.0.0.0/24, 7]}\n---\n\
                    apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {}}\n\
                    - {apiVersion: v1, kind: Node, metadata: {name: e}}\n---\n\
                    kind: Node\nmetadata: {name: f}\n---\n- just a list\n---\n\
                    apiVersion: v1\nkind: Node\nmetadata: {name: a}\n";
        let p = parse(Path::new("/d/bad.yaml"), yaml.as_bytes()).unwrap();
        assert_eq!(names(&p), ["Node a", "Node e"]);
        let errors: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        let expected = [
            "/d/bad.yaml: document 2 (line 5), Node b: field metadata.labels.x: invalid type: integer `1`, expected a string",
            "/d/bad.yaml: document 3 (line 11), Node c: field metadata.annotations[\"meshward.io/endpoint\"]: \"nowhere\" is not ip:port (e.g. 198.18.0.1:51871)",
            "/d/bad.yaml: document 4 (line 18), Node d: field spec.podCIDRs[1]: invalid type: integer `7`, expected a string",
            "/d/bad.yaml: document 5 (line 23), item 1, Node (unnamed): field metadata.name: missing",
            "/d/bad.yaml: document 6 (line 29), Node f: field apiVersion: missing",
            "/d/bad.yaml: document 7 (line 32): not an object (a mapping)",
            "/d/bad.yaml: document 8 (line 34), Node a: field metadata.name: Node a is already defined in document 1; this one is skipped",
        ];
        for (got, want) in errors.iter().zip(expected) {
            assert_eq!(got, want);
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        assert_eq!(
            p.rejected,
            ["b", "c", "d"].map(|n| ObjectKey::Node(n.into()))
        );
        assert!(p.unnamed_rejects);
    }

    #[test]
    fn a_file_that_is_not_yaml_is_one_error() {
        let e = parse(Path::new("/d/x.yaml"), b"apiVersion: v1\nkind: [Node\n").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("/d/x.yaml: invalid YAML: "), "{text}");
        assert!(text.contains("line"), "{text}");
        let e = parse(Path::new("/d/x.json"), b"{\"a\": ").unwrap_err();
        assert!(
            e.to_string().starts_with("/d/x.json: invalid JSON: "),
            "{e}"
        );
        let e = parse(Path::new("/d/x.yaml"), b"\xff\xfe").unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        assert!(parse(Path::new("/d/empty.yaml"), b"")
            .unwrap()
            .objects
            .is_empty());
    }

    #[test]
    fn pods_namespaces_and_policies() {
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, uid: 7c1e, labels: {app: web}}\n\
            spec:\n  nodeName: node1\n  containers:\n  - name: c\n    ports:\n    - {name: http, containerPort: 8080}\n    \
            - {containerPort: 9090}\n    - {name: dns, containerPort: 53, protocol: UDP}\n\
            status: {podIP: 198.19.1.2, podIPs: [{ip: 198.19.1.2}]}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: bare}\n---\n\
            apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\n\
            spec: {podSelector: {}, policyTypes: [Ingress]}\n---\n\
            apiVersion: meshward.io/v1alpha1\nkind: MeshNetworkPolicy\nmetadata: {name: api, namespace: shop}\n\
            spec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toFQDNs: [{matchName: api.example.test}]\n---\n\
            apiVersion: meshward.io/v1alpha1\nkind: MeshClusterwideNetworkPolicy\nmetadata: {name: all}\n\
            spec: {endpointSelector: {}, egress: [{toFQDNs: [{matchPattern: \"bad pattern!\"}]}]}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: shop}\nstatus: {podIP: nope}\n";
        let p = parse(Path::new("/d/app.yaml"), yaml.as_bytes()).unwrap();
        assert_eq!(
            names(&p),
            [
                "Namespace shop",
                "Pod shop/web",
                "Pod default/bare",
                "NetworkPolicy shop/deny",
                "MeshNetworkPolicy shop/api"
            ]
        );
        let Object::Pod(web) = &p.objects[1] else {
            panic!("{:?}", p.objects[1])
        };
        assert_eq!(web.node, "node1");
        assert_eq!(web.uid, "7c1e");
        assert_eq!(web.ips, ["198.19.1.2".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(web.labels["app"], "web");
        let named: Vec<(&str, u16)> = web
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect();
        assert_eq!(named, [("http", 8080), ("dns", 53)]);
        assert_eq!(web.ports[1].protocol, meshward_policy::L4Protocol::Udp);

        let errors: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].starts_with(
                "/d/app.yaml: document 6 (line 35), MeshClusterwideNetworkPolicy all: \
                 field spec.egress[0].toFQDNs[0].matchPattern: "
            ),
            "{}",
            errors[0]
        );
        assert_eq!(
            errors[1],
            "/d/app.yaml: document 7 (line 40), Pod broken: field status.podIP: \
             \"nope\" is not an IP address"
        );
        assert_eq!(p.rejected.len(), 2);
        assert_eq!(p.rejected[1].to_string(), "Pod shop/broken");
        assert_eq!(
            p.rejected[0].to_string(),
            "MeshClusterwideNetworkPolicy all"
        );
    }

    #[test]
    fn network_policies_are_checked_by_the_compiler() {
        let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: shop}\n\
            spec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/33}\n";
        let p = parse(Path::new("/d/np.yaml"), yaml.as_bytes()).unwrap();
        assert!(p.objects.is_empty());
        let e = p.errors[0].to_string();
        assert!(
            e.starts_with("/d/np.yaml: document 1 (line 1), NetworkPolicy bad: field spec.ingress[0].from[0].ipBlock.cidr: "),
            "{e}"
        );
        assert_eq!(p.rejected[0].to_string(), "NetworkPolicy shop/bad");
    }
}
