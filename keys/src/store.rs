//! The on-disk key store: the node's private key (and, during a rotation, the
//! one before it) under the agent's state directory.
//!
//! Files in the directory (default [`DEFAULT_KEY_DIR`]):
//!
//! - `key`: the current private key, one line of `wg` base64 plus `\n`,
//!   exactly what `wg genkey` prints, so `wg pubkey < key` works. Mode 0600.
//! - `key.previous`: the key that was current before the last rotation, same
//!   format and mode, kept until the mesh has switched over
//!   ([`KeyStore::forget_previous`]), so handshakes from peers that still
//!   know the old public key are answered.
//! - `key.lock`: empty; `flock(2)` on it serialises writers (the agent's
//!   rotation timer and `meshward keys rotate` may race).
//! - `.key.tmp`, `.key.previous.tmp`: a write in progress, or garbage from a
//!   writer that died. Never read; removed by the next write.
//!
//! A key file is read only if it is a regular file (not a symlink), owned by
//! the current effective uid, not accessible to group or others, and holds
//! exactly one valid key. Anything else is an error that names the file and
//! the problem, and the file is left exactly as it was: replacing a node's
//! key behind the operator's back would cut the node off from every peer and
//! hide whatever damaged the file.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::libc;
use zeroize::Zeroizing;

use crate::key::{NodeKey, KEY_LEN_BASE64};

/// The agent's state directory; the key lives at `DEFAULT_KEY_DIR/key`.
pub const DEFAULT_KEY_DIR: &str = "/var/lib/meshward";

const KEY_FILE: &str = "key";
const PREVIOUS_FILE: &str = "key.previous";
const LOCK_FILE: &str = "key.lock";

/// Largest key file read. A real one is 45 bytes; the bound keeps a wrong
/// path (a log, a device) from being read whole.
const MAX_FILE_LEN: usize = 1024;

/// What went wrong with the key store; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("key file {path} does not exist")]
    NotFound { path: PathBuf },
    #[error(
        "key file {path} is a symbolic link; refusing to follow it \
         (put the key file itself there, mode 0600)"
    )]
    Symlink { path: PathBuf },
    #[error("key file {path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error(
        "key file {path} is owned by uid {owner}, not by the current user (uid {uid}); \
         refusing to use a private key someone else controls"
    )]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "key file {path} has mode {mode:04o}, which lets group or others access the \
         private key; run `chmod 600 {path}` (and consider the key exposed)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} is corrupt: {reason}; it was left untouched (restore it, or remove \
         it to make a new key, which peers must then learn)"
    )]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> KeyError + 'a {
    move |source| KeyError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The result of [`KeyStore::rotate`]: publish `current`, keep answering on
/// `previous` until every peer has switched over.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub current: NodeKey,
    pub previous: NodeKey,
}

/// The node's keys in one directory. Holds only the path: every call reads
/// the files afresh, so another process's rotation is seen.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    /// A store over `dir` (usually [`DEFAULT_KEY_DIR`]). Touches nothing.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The path of the current key file (`DIR/key`), for messages.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    fn previous_path(&self) -> PathBuf {
        self.dir.join(PREVIOUS_FILE)
    }

    /// Loads and validates the current key; [`KeyError::NotFound`] if there
    /// is none. Read-only, takes no lock: `key` is only ever replaced by an
    /// atomic rename, so a reader sees the old or the new key, whole.
    pub fn load(&self) -> Result<NodeKey, KeyError> {
        let path = self.key_path();
        read_key_file(&path)?.ok_or(KeyError::NotFound { path })
    }

    /// The agent's start-up call: loads the current key, or, only if the
    /// file does not exist, generates one and persists it (creating the
    /// directory with mode 0700). A file that exists but fails validation is
    /// an error and is never replaced.
    pub fn load_or_generate(&self) -> Result<NodeKey, KeyError> {
        let path = self.key_path();
        if let Some(key) = read_key_file(&path)? {
            return Ok(key);
        }
        self.create_dir()?;
        let _lock = self.lock(FlockArg::LockExclusive)?;
        // Another process may have generated it while we waited for the lock.
        if let Some(key) = read_key_file(&path)? {
            return Ok(key);
        }
        let key = NodeKey::generate();
        self.write_key_file(&path, &key)?;
        Ok(key)
    }

    /// The key that was current before the last rotation, if the mesh may
    /// still need it. `None` when there is none, or when `key.previous`
    /// holds the current key (a rotation that died half-way, see
    /// [`KeyStore::rotate`]). Errors if the current key cannot be loaded: a
    /// previous key means nothing without it.
    pub fn previous(&self) -> Result<Option<NodeKey>, KeyError> {
        // Shared lock: read the pair as one rotation left it, not half of
        // one rotation and half of the next.
        let _lock = match self.lock(FlockArg::LockShared) {
            Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound {
                    path: self.key_path(),
                })
            }
            other => other?,
        };
        let current = self.load()?;
        match read_key_file(&self.previous_path())? {
            Some(prev) if prev.public() != current.public() => Ok(Some(prev)),
            _ => Ok(None),
        }
    }

    /// Makes a new current key and keeps the old one as the previous key;
    /// returns both. Whatever `key.previous` held before is discarded (a
    /// rotation started before the last switch-over finished supersedes it).
    /// Needs a valid current key: a missing or bad one is an error and
    /// nothing is changed.
    ///
    /// Crash safety. Two steps, each a whole-file replacement (temp file,
    /// fsync, rename, fsync of the directory):
    ///
    /// 1. `key.previous` := the current key K1
    /// 2. `key` := the new key K2
    ///
    /// So the directory is only ever in one of three states, and a crash at
    /// any point (power loss included) leaves one of them:
    ///
    /// - A: `key` = K1, `key.previous` = the old previous or absent (step 1's
    ///   rename not done): the rotation did not happen.
    /// - B: `key` = K1, `key.previous` = K1: loads as K1 with no previous
    ///   ([`KeyStore::previous`] ignores a previous equal to the current),
    ///   i.e. also as if the rotation did not happen; only the old previous,
    ///   which the rotation discards anyway, is gone. Rotating again works.
    /// - C: `key` = K2, `key.previous` = K1: the rotation is complete.
    ///
    /// Each file is replaced by a rename of a complete, fsynced temp file, so
    /// neither is ever torn or missing; leftover temp files are never read.
    /// `key` changes only after `key.previous` durably holds K1 (the
    /// directory fsync between the renames stops a filesystem from
    /// persisting the second rename without the first), so no crash can lose
    /// K1, the key every peer knows, once K2 is current. The opposite order
    /// would have a state (K2, old previous) with K1 gone, and peers that
    /// have not yet learned K2 locked out.
    pub fn rotate(&self) -> Result<Rotation, KeyError> {
        let key_path = self.key_path();
        let _lock = match self.lock(FlockArg::LockExclusive) {
            Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound { path: key_path })
            }
            other => other?,
        };
        let previous = self.load()?;
        self.write_key_file(&self.previous_path(), &previous)?;
        let current = NodeKey::generate();
        self.write_key_file(&key_path, &current)?;
        Ok(Rotation { current, previous })
    }

    /// Deletes the previous key once every peer uses the current one, so
    /// the old secret no longer sits on disk. Nothing to do is not an error.
    pub fn forget_previous(&self) -> Result<(), KeyError> {
        let _lock = match self.lock(FlockArg::LockExclusive) {
            Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(())
            }
            other => other?,
        };
        let path = self.previous_path();
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path)(e)),
        }
    }

    /// Creates the directory, mode 0700, if it is missing; an existing one is
    /// left as it is (it is the agent's whole state directory).
    fn create_dir(&self) -> Result<(), KeyError> {
        if self.dir.is_dir() {
            return Ok(());
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_err("creating key directory", &self.dir))?;
        // Make the new directory's own entry durable, or a power loss could
        // take a freshly generated key with it.
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_err("syncing directory", parent))?;
        }
        Ok(())
    }

    fn lock(&self, arg: FlockArg) -> Result<Flock<File>, KeyError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err("opening lock file", &path))?;
        Flock::lock(file, arg).map_err(|(_, errno)| KeyError::Io {
            action: "locking",
            path,
            source: io::Error::from(errno),
        })
    }

    fn sync_dir(&self) -> Result<(), KeyError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing key directory", &self.dir))
    }

    /// Replaces `path` with `key` atomically and durably. The caller holds
    /// the exclusive lock, so the fixed temp name is ours; one left by a
    /// writer that died is removed first.
    fn write_key_file(&self, path: &Path, key: &NodeKey) -> Result<(), KeyError> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = self.dir.join(format!(".{name}.tmp"));
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing stale temp file", &tmp)(e)),
        }
        crash_point();
        let mut line = Zeroizing::new(Vec::with_capacity(KEY_LEN_BASE64 + 1));
        line.extend_from_slice(key.to_wg_base64_secret().as_bytes());
        line.push(b'\n');
        let result = (|| {
            // O_EXCL: never write through a file or link someone put there.
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("creating temp file", &tmp))?;
            // Exactly 0600 whatever the umask.
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err("setting mode 0600 on", &tmp))?;
            crash_point();
            let (a, b) = line.split_at(line.len() / 2);
            file.write_all(a).map_err(io_err("writing", &tmp))?;
            crash_point();
            file.write_all(b).map_err(io_err("writing", &tmp))?;
            file.sync_all().map_err(io_err("syncing", &tmp))?;
            crash_point();
            fs::rename(&tmp, path).map_err(io_err("renaming temp file to", path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        crash_point();
        self.sync_dir()
    }
}

/// Reads and validates one key file; `Ok(None)` if it does not exist.
fn read_key_file(path: &Path) -> Result<Option<NodeKey>, KeyError> {
    // O_NOFOLLOW: a symlink is refused by the kernel, not by a racy lstat.
    // O_NONBLOCK: opening a FIFO planted there must not hang the agent.
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) && is_symlink(path) => {
            return Err(KeyError::Symlink {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err("opening key file", path)(e)),
    };
    // Checks on the open file (fstat), so they are about what is read.
    let meta = file
        .metadata()
        .map_err(io_err("inspecting key file", path))?;
    if !meta.file_type().is_file() {
        return Err(KeyError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(KeyError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }

    let mut buf = Zeroizing::new([0u8; MAX_FILE_LEN + 1]);
    let mut len = 0;
    let mut file = file;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading key file", path)(e)),
        }
    }
    let corrupt = |reason: String| KeyError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    parse_key_file(&buf[..len]).map(Some).map_err(corrupt)
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// The file must be one key line, as `wg genkey` writes it; the reasons
/// describe the content without quoting it.
fn parse_key_file(content: &[u8]) -> Result<NodeKey, String> {
    if content.len() > MAX_FILE_LEN {
        return Err(format!(
            "larger than {MAX_FILE_LEN} bytes (a key file is one {KEY_LEN_BASE64}-character line)"
        ));
    }
    if content.is_empty() {
        return Err("the file is empty".into());
    }
    let line = content.strip_suffix(b"\n").unwrap_or(content);
    if line.contains(&b'\n') {
        return Err("more than one line (expected exactly one key line)".into());
    }
    if line.ends_with(b"\r") {
        return Err("the line ends in a carriage return (CRLF); expected a plain \\n".into());
    }
    let text = std::str::from_utf8(line).map_err(|_| "not text (invalid UTF-8)".to_string())?;
    NodeKey::from_wg_base64_secret(text).map_err(|e| e.to_string())
}

// Test-only fault injection: a countdown of `Some(n)` makes the n-th crash
// point from now panic, which is as close as a test gets to the process
// dying there (no error-path cleanup runs; the lock is dropped as the kernel
// would drop it). Compiles to nothing outside tests.
#[cfg(test)]
thread_local! {
    static CRASH_COUNTDOWN: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
const CRASH_MSG: &str = "meshward-keys: simulated crash";

/// Marks a point where a crash leaves a distinct on-disk state (see above).
#[inline]
fn crash_point() {
    #[cfg(test)]
    CRASH_COUNTDOWN.with(|c| match c.get() {
        Some(0) => {
            c.set(None);
            std::panic::panic_any(CRASH_MSG);
        }
        Some(n) => c.set(Some(n - 1)),
        None => {}
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::Once;

    /// Runs `f` with a crash at the `n`-th crash point. Returns whether it
    /// crashed (true) or ran to the end (false).
    fn run_crashing_at<T>(n: u32, f: impl FnOnce() -> T) -> bool {
        static QUIET: Once = Once::new();
        QUIET.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if info.payload().downcast_ref::<&str>() != Some(&CRASH_MSG) {
                    prev(info)
                }
            }));
        });
        CRASH_COUNTDOWN.with(|c| c.set(Some(n)));
        let result = catch_unwind(AssertUnwindSafe(f));
        CRASH_COUNTDOWN.with(|c| c.set(None));
        match result {
            Ok(_) => false,
            Err(payload) if payload.downcast_ref::<&str>() == Some(&CRASH_MSG) => true,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[derive(Debug, PartialEq, Eq, Clone, Copy, PartialOrd, Ord)]
    enum State {
        /// Rotation not visible: (K1, old previous).
        A,
        /// Between the renames: (K1, K1).
        B,
        /// Done: (K2, K1).
        C,
    }

    /// Crashes rotate() at every crash point in turn, with and without an
    /// earlier previous key, and checks that each crash leaves a store that
    /// loads as a consistent pair and can rotate again.
    #[test]
    fn rotate_crash_at_every_point_leaves_a_consistent_pair() {
        for with_old_previous in [false, true] {
            let mut seen = Vec::new();
            let mut n = 0;
            loop {
                let dir = tempfile::tempdir().unwrap();
                let store = KeyStore::new(dir.path().join("state"));
                let mut old_previous = None;
                if with_old_previous {
                    store.load_or_generate().unwrap();
                    old_previous = Some(store.rotate().unwrap().previous.public());
                }
                let k1 = store.load_or_generate().unwrap().public();

                let crashed = run_crashing_at(n, || store.rotate());
                if !crashed {
                    assert!(n >= 10, "expected more crash points, got {n}");
                    break;
                }

                // "Restart": a fresh store over the same directory.
                let store = KeyStore::new(dir.path().join("state"));
                let current = store.load().unwrap().public();
                let previous = store.previous().unwrap().map(|k| k.public());
                let prev_file = read_key_file(&store.previous_path())
                    .unwrap()
                    .map(|k| k.public());
                let state = if current == k1 {
                    if prev_file == Some(k1) {
                        assert_eq!(previous, None, "crash point {n}");
                        State::B
                    } else {
                        assert_eq!(prev_file, old_previous, "crash point {n}");
                        assert_eq!(previous, old_previous, "crash point {n}");
                        State::A
                    }
                } else {
                    assert_eq!(previous, Some(k1), "crash point {n}");
                    assert_ne!(Some(current), old_previous);
                    State::C
                };
                seen.push(state);
                assert_eq!(mode_of(&store.key_path()), 0o600);
                if prev_file.is_some() {
                    assert_eq!(mode_of(&store.previous_path()), 0o600);
                }
                // Start-up never replaces what is there.
                assert_eq!(store.load_or_generate().unwrap().public(), current);
                // And the store is usable: stale temp files do not block.
                let r = store.rotate().unwrap();
                assert_eq!(r.previous.public(), current);
                assert_eq!(store.previous().unwrap().unwrap().public(), current);
                assert_eq!(temp_files(&dir.path().join("state")), Vec::<String>::new());
                n += 1;
            }
            seen.dedup();
            assert_eq!(seen, vec![State::A, State::B, State::C]);
        }
    }

    /// A crash while the first key is generated leaves either no key (the
    /// next start generates one) or a whole one; never a torn file.
    #[test]
    fn generate_crash_at_every_point() {
        let mut n = 0;
        let mut outcomes = (0, 0);
        loop {
            let dir = tempfile::tempdir().unwrap();
            let store = KeyStore::new(dir.path().join("state"));
            if !run_crashing_at(n, || store.load_or_generate()) {
                break;
            }
            match store.load() {
                Err(KeyError::NotFound { .. }) => outcomes.0 += 1,
                Ok(key) => {
                    outcomes.1 += 1;
                    assert_eq!(store.load_or_generate().unwrap().public(), key.public());
                }
                Err(e) => panic!("crash point {n}: {e}"),
            }
            store.load_or_generate().unwrap();
            assert_eq!(temp_files(&dir.path().join("state")), Vec::<String>::new());
            n += 1;
        }
        assert!(outcomes.0 >= 4 && outcomes.1 >= 1, "{outcomes:?}");
    }

    #[test]
    fn file_content_rules() {
        let good = NodeKey::generate();
        let b64 = good.to_wg_base64_secret();
        assert!(parse_key_file(format!("{}\n", *b64).as_bytes()).is_ok());
        assert!(parse_key_file(b64.as_bytes()).is_ok());
        for (content, expect) in [
            (String::new(), "empty"),
            (format!("{}\n\n", *b64), "more than one line"),
            (format!("{}\r\n", *b64), "carriage return"),
            (format!("{}\n{}\n", *b64, *b64), "more than one line"),
            (format!(" {}\n", *b64), "found 45"),
            ("x".repeat(2000), "larger than"),
        ] {
            let err = parse_key_file(content.as_bytes()).unwrap_err();
            assert!(err.contains(expect), "{err:?} should mention {expect:?}");
            assert!(!err.contains(&b64[..16]), "reason leaks the key: {err}");
        }
        assert!(parse_key_file(b"\xff\xfe\n").unwrap_err().contains("UTF-8"));
    }
}
