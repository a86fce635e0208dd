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

use k8s_openapi::api::core::v1::Node;
use serde_json::Value;
use tracing::debug;

use super::model::{FieldError, NodeInfo};
use super::store::Event;

/// An object the agent understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Object {
    Node(NodeInfo),
}

/// The identity of an object (kind, namespace, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum ObjectKey {
    Node(String),
}

impl Object {
    pub(crate) fn key(&self) -> ObjectKey {
        match self {
            Object::Node(n) => ObjectKey::Node(n.name.clone()),
        }
    }

    pub(crate) fn upserted(self) -> Event {
        match self {
            Object::Node(n) => Event::NodeUpserted(n),
        }
    }
}

impl ObjectKey {
    pub(crate) fn deleted(self) -> Event {
        match self {
            ObjectKey::Node(name) => Event::NodeDeleted(name),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::Node(name) => write!(f, "Node {name}"),
        }
    }
}

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
    match (api_version, kind) {
        ("v1", "Node") => match node_from_value(value) {
            Ok(node) => {
                let key = ObjectKey::Node(node.name.clone());
                if let Some(first) = seen.get(&key) {
                    parsed.errors.push(at.error(
                        Some(label),
                        Some("metadata.name".into()),
                        format!(
                            "{key} is already defined in document {first}; this one is skipped"
                        ),
                    ));
                } else {
                    seen.insert(key, at.document);
                    parsed.objects.push(Object::Node(node));
                }
            }
            Err(e) => {
                parsed
                    .errors
                    .push(at.error(Some(label), Some(e.field), e.message));
                match name {
                    Some(name) => parsed.rejected.push(ObjectKey::Node(name)),
                    None => parsed.unnamed_rejects = true,
                }
            }
        },
        _ => debug!(
            file = %at.file.display(),
            document = at.document,
            "ignoring {api_version} {kind}: not a kind meshward reads"
        ),
    }
}

/// A Node from a generic value, with the path of any bad field.
fn node_from_value(value: Value) -> Result<NodeInfo, FieldError> {
    let node: Node = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "(object)".into() } else { path };
        FieldError::new(field, e.into_inner().to_string())
    })?;
    NodeInfo::try_from(&node)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "WAmgVYXkbT2bCtdcDwolI88/iVi/aV3/PHcUBTQSYmo=";

    fn names(p: &Parsed) -> Vec<String> {
        p.objects
            .iter()
            .map(|o| match o {
                Object::Node(n) => n.name.clone(),
            })
            .collect()
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
        assert_eq!(names(&p), ["a", "b"]);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let Object::Node(a) = &p.objects[0];
        assert!(a.is_peerable());
    }

    #[test]
    fn lists_and_json() {
        let yaml = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: a}}\n\
                    - {apiVersion: v1, kind: Node, metadata: {name: b}}\n---\n\
                    apiVersion: v1\nkind: NodeList\nitems: [{apiVersion: v1, kind: Node, metadata: {name: c}}]\n";
        let p = parse(Path::new("l.yml"), yaml.as_bytes()).unwrap();
        assert_eq!(names(&p), ["a", "b", "c"]);

        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"j1"}}]}
            {"apiVersion":"v1","kind":"Node","metadata":{"name":"j2"},"spec":{"podCIDR":"bad"}}"#;
        let p = parse(Path::new("/d/n.json"), json.as_bytes()).unwrap();
        assert_eq!(names(&p), ["j1"]);
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
        assert_eq!(names(&p), ["a", "e"]);
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
}
