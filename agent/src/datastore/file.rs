//! The file datastore (`dir:PATH`): every `*.yaml`, `*.yml` and `*.json` in
//! one directory, watched with inotify (the `notify` crate).
//!
//! - Changes are debounced ([`DEBOUNCE`] of quiet, at most [`MAX_DELAY`]
//!   after the first) and applied as one batch, so a rename-into-place or a
//!   burst of edits becomes one snapshot.
//! - Each changed path is looked at as it is now: present → re-read (skipped
//!   when its content is unchanged), gone → its objects are deleted. Hidden
//!   files (`.x`), editor backups (`x~`, `#x#`) and other names are ignored.
//!   Events on `..`-names (a ConfigMap volume's `..data` swap), queue
//!   overflows and watcher errors trigger a full rescan.
//! - Nothing that was in force is lost to a bad edit: a file that cannot be
//!   read or parsed keeps the objects last loaded from it; a rejected object
//!   keeps its last good version; a document that cannot even be named keeps
//!   every object of that file it might have been.
//! - The same object in several files: `node-NAME.*` wins for Node NAME,
//!   otherwise the first file by name; a warning names them all.
//! - [`publish_own_node`] writes `node-NAME.yaml` atomically, changing only
//!   the two annotations (and the pod CIDRs when none are set), so several
//!   agents can share one directory, each writing only its own file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use serde_json::{json, Map, Value};
use tracing::{debug, error, info, warn};

use super::manifest::{self, Object, ObjectKey};
use super::model::{NodeInfo, ANNOTATION_ENDPOINT, ANNOTATION_PUBLIC_KEY};
use super::store::{Event, Store};
use super::{DatastoreError, OwnNode};

/// Quiet time that ends a batch of file events.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(50);
/// Longest a batch waits under a constant stream of events.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(500);

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// A running file datastore. Dropping it stops the watcher thread.
pub(crate) struct DirDatastore {
    dir: PathBuf,
    store: Arc<Store>,
    publish_lock: Arc<Mutex<()>>,
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for DirDatastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirDatastore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl DirDatastore {
    /// Watches `dir`, loads it (the first snapshot is published, synced,
    /// before this returns) and follows it on a thread of its own.
    pub(crate) fn start(dir: &Path) -> Result<Self, DatastoreError> {
        let dir_error = |source| DatastoreError::Directory {
            dir: dir.to_path_buf(),
            source,
        };
        let dir = dir.canonicalize().map_err(dir_error)?;
        if !dir.is_dir() {
            return Err(dir_error(io::Error::other("not a directory")));
        }
        let (tx, rx) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |res| {
            let _ = tx.send(res);
        })
        .map_err(|source| DatastoreError::Watch {
            dir: dir.clone(),
            source,
        })?;
        // watch first, then list: nothing changed in between is missed
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| DatastoreError::Watch {
                dir: dir.clone(),
                source,
            })?;
        let store = Arc::new(Store::new());
        let mut state = DirState::new(dir.clone());
        let mut events = state.rescan();
        events.push(Event::Synced);
        store.apply(events);
        info!(dir = %dir.display(), nodes = store.subscribe().borrow().nodes().count(), "file datastore loaded");

        let thread_store = store.clone();
        std::thread::Builder::new()
            .name("mw-datastore".into())
            .spawn(move || follow(state, rx, &thread_store))
            .map_err(|source| DatastoreError::Directory {
                dir: dir.clone(),
                source,
            })?;
        Ok(DirDatastore {
            dir,
            store,
            publish_lock: Arc::new(Mutex::new(())),
            _watcher: watcher,
        })
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) async fn publish_own_node(&self, own: &OwnNode) -> Result<(), DatastoreError> {
        let dir = self.dir.clone();
        let own = own.clone();
        let lock = self.publish_lock.clone();
        // where our Node is defined elsewhere, a new node file starts from it
        let seed = self.store.subscribe().borrow().node(&own.name).cloned();
        tokio::task::spawn_blocking(move || {
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            publish_own_node(&dir, &own, seed.as_ref())
        })
        .await
        .map_err(|e| DatastoreError::Io {
            path: self.dir.clone(),
            source: io::Error::other(e),
        })?
        .map(|_| ())
    }
}

/// The watcher thread: batches events, reloads, publishes. Ends when the
/// watcher (and so the channel's sender) is dropped.
fn follow(mut state: DirState, rx: mpsc::Receiver<notify::Result<notify::Event>>, store: &Store) {
    while let Ok(first) = rx.recv() {
        let mut batch = Batch::default();
        batch.add(first, &state.dir);
        let start = Instant::now();
        let mut last = start;
        loop {
            let deadline = (last + DEBOUNCE).min(start + MAX_DELAY);
            let Some(wait) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match rx.recv_timeout(wait) {
                Ok(event) => {
                    batch.add(event, &state.dir);
                    last = Instant::now();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        let events = if batch.rescan {
            state.rescan()
        } else if batch.paths.is_empty() {
            continue;
        } else {
            for path in &batch.paths {
                state.load(path);
            }
            state.recompute()
        };
        if !events.is_empty() {
            debug!(changes = events.len(), "file datastore changed");
        }
        store.apply(events);
    }
}

#[derive(Default)]
struct Batch {
    paths: BTreeSet<PathBuf>,
    rescan: bool,
}

impl Batch {
    fn add(&mut self, event: notify::Result<notify::Event>, dir: &Path) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                warn!(dir = %dir.display(), "file watcher: {e}; rescanning");
                self.rescan = true;
                return;
            }
        };
        if event.need_rescan() {
            self.rescan = true;
            return;
        }
        if let EventKind::Access(kind) = event.kind {
            // our own reads open and close files: only a write matters
            if kind != AccessKind::Close(AccessMode::Write) {
                return;
            }
        }
        for path in event.paths {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if path.parent() != Some(dir) {
                // the directory itself (moved, deleted): look again
                self.rescan = true;
            } else if name.starts_with("..") {
                self.rescan = true;
            } else if is_manifest_name(name) {
                self.paths.insert(dir.join(name));
            }
        }
    }
}

/// `*.yaml`, `*.yml`, `*.json`, not hidden, not an editor's temporary.
fn is_manifest_name(name: &str) -> bool {
    if name.starts_with('.') || name.starts_with('#') {
        return false;
    }
    match name.rsplit_once('.') {
        Some((stem, ext)) => {
            !stem.is_empty() && EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e))
        }
        None => false,
    }
}

struct FileEntry {
    /// Hash of the content last looked at (good or not).
    hash: u64,
    /// The objects in force from this file.
    objects: BTreeMap<ObjectKey, Object>,
}

struct DirState {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    /// What the store holds.
    effective: BTreeMap<ObjectKey, Object>,
    /// Objects defined in several files, already warned about.
    conflicts: BTreeMap<ObjectKey, Vec<PathBuf>>,
}

impl DirState {
    fn new(dir: PathBuf) -> Self {
        DirState {
            dir,
            files: BTreeMap::new(),
            effective: BTreeMap::new(),
            conflicts: BTreeMap::new(),
        }
    }

    /// Lists the directory again and reloads everything in it.
    fn rescan(&mut self) -> Vec<Event> {
        let listed: BTreeSet<PathBuf> = match fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_str().is_some_and(is_manifest_name))
                .map(|e| self.dir.join(e.file_name()))
                .collect(),
            Err(e) => {
                error!(
                    dir = %self.dir.display(),
                    "cannot list the datastore directory: {e}; keeping everything loaded from it"
                );
                return Vec::new();
            }
        };
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !listed.contains(*p))
            .cloned()
            .collect();
        for path in gone.iter().chain(&listed) {
            self.load(path);
        }
        self.recompute()
    }

    /// Brings one file's entry up to date with the file as it is now.
    fn load(&mut self, path: &Path) {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound || path.is_dir() => {
                if let Some(old) = self.files.remove(path) {
                    info!(
                        file = %path.display(),
                        objects = old.objects.len(),
                        "manifest file removed: its objects are deleted"
                    );
                }
                return;
            }
            Err(e) => {
                let kept = self.files.get(path).map_or(0, |f| f.objects.len());
                error!(
                    file = %path.display(),
                    "cannot read manifest file: {e}; keeping the {kept} objects last loaded from it"
                );
                return;
            }
        };
        let mut hasher = DefaultHasher::new();
        bytes.hash(&mut hasher);
        let hash = hasher.finish();
        let entry = self.files.entry(path.to_path_buf()).or_insert(FileEntry {
            hash: hash.wrapping_add(1),
            objects: BTreeMap::new(),
        });
        if entry.hash == hash {
            return;
        }
        entry.hash = hash;
        let parsed = match manifest::parse(path, &bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                error!(
                    "{e}; the file is skipped, keeping the {} objects last loaded from it",
                    entry.objects.len()
                );
                return;
            }
        };
        for e in &parsed.errors {
            error!("{e}; the object is skipped");
        }
        let mut objects: BTreeMap<ObjectKey, Object> =
            parsed.objects.into_iter().map(|o| (o.key(), o)).collect();
        for key in parsed.rejected {
            if objects.contains_key(&key) {
                continue;
            }
            if let Some(old) = entry.objects.get(&key) {
                warn!(file = %path.display(), "keeping the last good version of {key}");
                objects.insert(key, old.clone());
            }
        }
        if parsed.unnamed_rejects {
            for (key, old) in &entry.objects {
                if !objects.contains_key(key) {
                    warn!(
                        file = %path.display(),
                        "keeping {key}: a rejected object without a name might be it"
                    );
                    objects.insert(key.clone(), old.clone());
                }
            }
        }
        entry.objects = objects;
    }

    /// Merges all files into the effective set; returns the changes.
    fn recompute(&mut self) -> Vec<Event> {
        let mut candidates: BTreeMap<&ObjectKey, Vec<(&PathBuf, &Object)>> = BTreeMap::new();
        for (path, entry) in &self.files {
            for (key, object) in &entry.objects {
                candidates.entry(key).or_default().push((path, object));
            }
        }
        let mut effective = BTreeMap::new();
        let mut conflicts = BTreeMap::new();
        for (key, found) in candidates {
            let chosen = found
                .iter()
                .find(|(path, _)| is_canonical_file(key, path))
                .unwrap_or(&found[0]);
            if found.len() > 1 {
                let paths: Vec<PathBuf> = found.iter().map(|(p, _)| (*p).clone()).collect();
                if self.conflicts.get(key) != Some(&paths) {
                    let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                    warn!(
                        "{key} is defined in {}; using the one in {}",
                        list.join(", "),
                        chosen.0.display()
                    );
                }
                conflicts.insert(key.clone(), paths);
            }
            effective.insert(key.clone(), chosen.1.clone());
        }
        self.conflicts = conflicts;

        let mut events = Vec::new();
        for key in self.effective.keys() {
            if !effective.contains_key(key) {
                events.push(key.clone().deleted());
            }
        }
        for (key, object) in &effective {
            if self.effective.get(key) != Some(object) {
                events.push(object.clone().upserted());
            }
        }
        self.effective = effective;
        events
    }
}

/// `node-NAME.yaml` (or .yml, .json) is where Node NAME belongs.
fn is_canonical_file(key: &ObjectKey, path: &Path) -> bool {
    let ObjectKey::Node(name) = key else {
        return false;
    };
    let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    EXTENSIONS
        .iter()
        .any(|ext| file == format!("node-{name}.{ext}"))
}

/// Sets our annotations (and pod CIDRs when unset) on our Node in
/// `dir/node-NAME.yaml` (or an existing `.yml`/`.json`), creating it if
/// needed, keeping everything else in the file. Writes nothing when nothing
/// changes; refuses to touch a file it cannot parse. Returns whether it wrote.
///
/// `seed`: our Node as currently known (from another file): a Node created
/// here starts with its pod CIDRs and labels, since it will take precedence.
pub(crate) fn publish_own_node(
    dir: &Path,
    own: &OwnNode,
    seed: Option<&NodeInfo>,
) -> Result<bool, DatastoreError> {
    own.validate()?;
    let existing = EXTENSIONS
        .iter()
        .map(|ext| dir.join(format!("node-{}.{ext}", own.name)))
        .find(|p| p.exists());
    let path = existing
        .clone()
        .unwrap_or_else(|| dir.join(format!("node-{}.yaml", own.name)));
    let refuse = |message: String| DatastoreError::OwnNodeFile {
        file: path.clone(),
        message,
    };
    let io_error = |source| DatastoreError::Io {
        path: path.clone(),
        source,
    };

    let mut docs: Vec<Value> = match &existing {
        None => Vec::new(),
        Some(path) => {
            let bytes = fs::read(path).map_err(io_error)?;
            manifest::documents(path, &bytes)
                .map_err(|e| refuse(e.message))?
                .into_iter()
                .map(|(v, _)| v)
                .collect()
        }
    };
    let original = docs.clone();
    if find_node(&mut docs, &own.name).is_none() {
        let mut doc = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": own.name },
        });
        if let Some(seed) = seed {
            info!(
                file = %path.display(),
                "Node {} is defined in another file: this file now takes precedence, \
                 starting from its pod CIDRs and labels",
                own.name
            );
            if !seed.labels.is_empty() {
                doc["metadata"]["labels"] = json!(seed.labels);
            }
            if let Some(first) = seed.pod_cidrs.first() {
                let all: Vec<String> = seed.pod_cidrs.iter().map(|c| c.to_string()).collect();
                doc["spec"] = json!({ "podCIDR": first.to_string(), "podCIDRs": all });
            }
        }
        docs.push(doc);
    }
    let Some(node) = find_node(&mut docs, &own.name).and_then(Value::as_object_mut) else {
        return Err(refuse(format!("cannot find Node {} in it", own.name)));
    };
    let metadata = child_object(node, "metadata").map_err(&refuse)?;
    let annotations =
        child_object(metadata, "annotations").map_err(|m| refuse(format!("metadata.{m}")))?;
    annotations.insert(ANNOTATION_PUBLIC_KEY.into(), json!(own.public_key));
    annotations.insert(ANNOTATION_ENDPOINT.into(), json!(own.endpoint.to_string()));
    if !own.pod_cidrs.is_empty() {
        let spec = child_object(node, "spec").map_err(&refuse)?;
        let unset = |k: &str| spec.get(k).is_none_or(Value::is_null);
        if unset("podCIDR") && unset("podCIDRs") {
            let cidrs: Vec<String> = own.pod_cidrs.iter().map(|c| c.to_string()).collect();
            spec.insert("podCIDR".into(), json!(cidrs[0]));
            spec.insert("podCIDRs".into(), json!(cidrs));
        }
    }
    if existing.is_some() && docs == original {
        return Ok(false);
    }

    let mut text = String::new();
    let json = path.extension().is_some_and(|e| e == "json");
    for (i, doc) in docs.iter().enumerate() {
        if json {
            let s = serde_json::to_string_pretty(doc).map_err(|e| refuse(e.to_string()))?;
            text.push_str(&s);
            text.push('\n');
        } else {
            if i > 0 {
                text.push_str("---\n");
            }
            let s = serde_saphyr::to_string(doc).map_err(|e| refuse(e.to_string()))?;
            text.push_str(&s);
            if !s.ends_with('\n') {
                text.push('\n');
            }
        }
    }
    write_atomically(&path, text.as_bytes()).map_err(io_error)?;
    info!(file = %path.display(), endpoint = %own.endpoint, "published own node");
    Ok(true)
}

/// Our Node among the documents (top level or in a List's items).
fn find_node<'a>(docs: &'a mut [Value], name: &str) -> Option<&'a mut Value> {
    fn is_ours(v: &Value, name: &str) -> bool {
        v.get("kind").and_then(Value::as_str) == Some("Node")
            && v.get("apiVersion").and_then(Value::as_str) == Some("v1")
            && v.get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                == Some(name)
    }
    for doc in docs.iter_mut() {
        if is_ours(doc, name) {
            return Some(doc);
        }
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            if let Some(item) = items.iter_mut().find(|i| is_ours(i, name)) {
                return Some(item);
            }
        }
    }
    None
}

/// `parent[key]` as a mapping, created when absent or null.
fn child_object<'a>(
    parent: &'a mut Map<String, Value>,
    key: &str,
) -> Result<&'a mut Map<String, Value>, String> {
    let slot = parent.entry(key).or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut()
        .ok_or_else(|| format!("{key} is not a mapping; not overwriting it"))
}

/// Temp file (hidden, so the watcher ignores it), fsync, rename, fsync dir.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("manifest");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names() {
        for good in ["a.yaml", "node-1.yml", "x.JSON", "a.b.yaml"] {
            assert!(is_manifest_name(good), "{good}");
        }
        for bad in [
            ".a.yaml",
            ".a.yaml.swp",
            "a.yaml~",
            "#a.yaml#",
            "4913",
            "a.yaml.tmp",
            ".yaml",
            "..data",
            "a.txt",
        ] {
            assert!(!is_manifest_name(bad), "{bad}");
        }
    }

    #[test]
    fn canonical_files() {
        let key = ObjectKey::Node("n1".into());
        assert!(is_canonical_file(&key, Path::new("/d/node-n1.yaml")));
        assert!(is_canonical_file(&key, Path::new("/d/node-n1.json")));
        assert!(!is_canonical_file(&key, Path::new("/d/node-n10.yaml")));
        assert!(!is_canonical_file(&key, Path::new("/d/nodes.yaml")));
    }
}
