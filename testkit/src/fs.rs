//! Temp dirs owned by a test, mounts below them, and the stale cleanup of
//! what killed test processes left behind.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use nix::mount::{umount2, MntFlags};

use crate::cmd::run;
use crate::netns::delete_netns;
use crate::{owner_pid, unique_name};

/// Name of a script a test may leave in its [`TempDir`] to stop what it
/// started there (podman containers) if the test process gets killed; the
/// stale cleanup runs it (bounded in time) before removing the directory.
pub const STALE_CLEANUP_SCRIPT: &str = "stale-cleanup.sh";

/// How long a [`STALE_CLEANUP_SCRIPT`] may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes leftovers of test processes that no longer exist: directories in
/// the temp dir named `mwt-<pid>-*` (first running their
/// [`STALE_CLEANUP_SCRIPT`], bounded in time) and then namespaces in
/// /run/netns. Runs once per process (namespaces and temp dirs call it on
/// first use); it never touches names of live processes (other tests
/// running in parallel) or names without our prefix. scripts/test does the
/// same before cargo runs.
pub fn cleanup_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| remove_stale(&std::env::temp_dir(), Path::new("/run/netns")));
}

/// [`cleanup_stale`] over the given directories, every time it is called.
pub(crate) fn remove_stale(temp: &Path, netns_dir: &Path) {
    let me = std::process::id();
    let stale = |name: &str| matches!(owner_pid(name), Some(pid) if pid != me && !pid_alive(pid));
    if let Ok(entries) = fs::read_dir(temp) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(stale(&name) && e.path().is_dir()) {
                continue;
            }
            eprintln!("removing stale test directory {}", e.path().display());
            let script = e.path().join(STALE_CLEANUP_SCRIPT);
            if script.is_file() {
                match run(Command::new("bash").arg(&script), b"", SCRIPT_TIMEOUT) {
                    Ok(r) if r.success() => {}
                    Ok(r) => eprintln!("warning: {}: {r}", script.display()),
                    Err(err) => eprintln!("warning: {}: {err}", script.display()),
                }
            }
            remove_tree(&e.path());
        }
    }
    if let Ok(entries) = fs::read_dir(netns_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                eprintln!("removing stale test namespace {name}");
                delete_netns(&name);
            }
        }
    }
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut seen = HashSet::new();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .filter(|m| seen.insert(m.clone()))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts
}

/// Lazily unmounts anything mounted below `dir` (container shm and the like)
/// and removes the tree.
pub fn remove_tree(dir: &Path) {
    for m in mounts_under(dir) {
        // Best effort: what cannot be detached makes remove_dir_all warn.
        let _ = umount2(&m, MntFlags::MNT_DETACH);
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("warning: remove {}: {e}", dir.display());
        }
    }
}

/// A temp directory `mwt-<pid>-<n>` removed on drop (after unmounting
/// anything left below it). Runs the stale cleanup once per process first.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        cleanup_stale();
        let path = std::env::temp_dir().join(unique_name());
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.path.join(p)
    }
}

impl Default for TempDir {
    fn default() -> TempDir {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Every file below `dir` whose content mentions `needle` (e.g. IPAM stores
/// list container ids: this is how tests see that DEL released an address).
/// The walk stops after 10,000 entries.
pub fn files_mentioning(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut budget = 10_000; // bounded walk
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            budget -= 1;
            if budget == 0 {
                return hits;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if fs::read(&p)
                .map(|b| String::from_utf8_lossy(&b).contains(needle))
                .unwrap_or(false)
            {
                hits.push(p);
            }
        }
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid that existed a moment ago and is gone now.
    fn dead_pid() -> u32 {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait true");
        assert!(!pid_alive(pid));
        pid
    }

    #[test]
    fn temp_dir_is_ours_and_removed_with_what_is_in_it() {
        let dir = TempDir::new();
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        assert_eq!(owner_pid(&name), Some(std::process::id()));
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/f"), "container-42 holds 198.19.0.2").unwrap();
        fs::write(dir.join("g"), "nothing").unwrap();
        assert_eq!(
            files_mentioning(dir.path(), "container-42"),
            vec![dir.join("a/b/f")]
        );
        assert!(files_mentioning(dir.path(), "container-43").is_empty());
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn temp_dir_removal_unmounts_first() {
        crate::require_root();
        let dir = TempDir::new();
        let mnt = dir.join("shm");
        fs::create_dir(&mnt).unwrap();
        crate::sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "mwt",
            mnt.to_str().unwrap(),
        ]);
        fs::write(mnt.join("f"), "x").unwrap();
        assert_eq!(mounts_under(dir.path()), vec![mnt.clone()]);
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        assert!(mounts_under(&path).is_empty());
    }

    #[test]
    fn stale_cleanup_takes_only_dead_owners() {
        crate::require_root();
        // A private "temp dir" and "netns dir" so only this test's entries
        // are looked at; the namespaces themselves are real.
        let root = TempDir::new();
        let (temp, netns_dir) = (root.join("tmp"), root.join("netns"));
        fs::create_dir_all(&temp).unwrap();
        fs::create_dir_all(&netns_dir).unwrap();
        let dead = dead_pid();
        let me = std::process::id();

        let stale_dir = temp.join(format!("mwt-{dead}-0"));
        fs::create_dir(&stale_dir).unwrap();
        let marker = temp.join("script-ran");
        fs::write(
            stale_dir.join(STALE_CLEANUP_SCRIPT),
            format!("touch {}\n", marker.display()),
        )
        .unwrap();
        let live_dir = temp.join(format!("mwt-{me}-0"));
        let foreign_dir = temp.join(format!("other-{dead}-0"));
        fs::create_dir(&live_dir).unwrap();
        fs::create_dir(&foreign_dir).unwrap();

        // A namespace named after the dead pid, listed in the private dir.
        let stale_ns = format!("mwt-{dead}-0s");
        crate::netns::add_netns(&stale_ns);
        fs::write(netns_dir.join(&stale_ns), "").unwrap();
        fs::write(netns_dir.join(format!("mwt-{me}-0x")), "").unwrap();

        remove_stale(&temp, &netns_dir);
        let ns_left = Path::new("/run/netns").join(&stale_ns).exists();
        if ns_left {
            crate::sh(&["ip", "netns", "del", &stale_ns]);
        }
        assert!(!ns_left, "stale namespace {stale_ns} kept");
        assert!(!stale_dir.exists(), "stale dir kept");
        assert!(marker.exists(), "{STALE_CLEANUP_SCRIPT} not run");
        assert!(live_dir.exists(), "a live process's dir removed");
        assert!(foreign_dir.exists(), "a dir without our prefix removed");
    }
}
