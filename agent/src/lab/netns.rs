//! Named network namespaces, as `ip netns` keeps them: a file under
//! /run/netns with the namespace bind-mounted onto it.
//!
//! Work inside a namespace (netlink, sysctls) runs on a short-lived thread
//! that joined it (`meshward_cni::netns::run_in`), so the caller's threads
//! never move.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, NSFS_MAGIC};
use nix::unistd::{gettid, Pid};

/// Where named namespaces live (as with iproute2).
pub const NETNS_DIR: &str = "/run/netns";

/// The path of a named namespace.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// True when /run/netns/NAME has a network namespace mounted on it.
pub fn exists(name: &str) -> bool {
    statfs(&path(name)).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Opens a named namespace for `run_in` or setns.
pub fn open(name: &str) -> Result<File> {
    meshward_cni::netns::open(&path(name))
        .with_context(|| format!("opening network namespace {}", path(name).display()))
}

/// Names in /run/netns that start with `prefix`, sorted.
pub fn list_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
        if let Some(name) = entry.file_name().to_str() {
            if name.starts_with(prefix) {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Creates the named network namespace `name`, like `ip netns add`.
pub fn create(name: &str) -> Result<()> {
    prepare_netns_dir()?;
    let target = path(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&target)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => {
                anyhow::anyhow!("network namespace {} already exists", target.display())
            }
            _ => anyhow::Error::new(e).context(format!("creating {}", target.display())),
        })?;

    // unshare(2) moves only the calling thread: do it on a thread of its own
    // and pin the new namespace by bind-mounting that thread's handle.
    let bound = thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
                let own = format!("/proc/self/task/{}/ns/net", gettid());
                mount(
                    Some(own.as_str()),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .with_context(|| format!("bind-mounting {own} on {}", target.display()))
            })
            .join()
            .unwrap_or_else(|_| bail!("namespace creation thread panicked"))
    });
    if let Err(e) = bound {
        let _ = fs::remove_file(&target);
        return Err(e.context(format!("creating network namespace {name}")));
    }
    Ok(())
}

/// Deletes the named namespace `name`, like `ip netns delete`. A name that is
/// not mounted any more (a half-created or half-deleted one) is just removed.
pub fn delete(name: &str) -> Result<()> {
    let target = path(name);
    match umount2(&target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("unmounting {}", target.display())),
    }
    match fs::remove_file(&target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", target.display())),
    }
}

/// Makes /run/netns a shared mount point, as iproute2 does, so namespace
/// mounts made here show in every mount namespace. Serialized with a lock on
/// the directory so concurrent labs don't stack bind mounts.
fn prepare_netns_dir() -> Result<()> {
    fs::create_dir_all(NETNS_DIR).with_context(|| format!("creating {NETNS_DIR}"))?;
    let dir = File::open(NETNS_DIR).with_context(|| format!("opening {NETNS_DIR}"))?;
    let _lock = Flock::lock(dir, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {NETNS_DIR}"))?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself, then share it.
        Err(Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting {NETNS_DIR} on itself"))?;
            shared().with_context(|| format!("making {NETNS_DIR} a shared mount"))
        }
        Err(e) => Err(e).with_context(|| format!("making {NETNS_DIR} a shared mount")),
    }
}

/// Kills every process that has a thread inside one of the named
/// namespaces: SIGTERM, then SIGKILL for those still there after `grace`.
/// Returns how many processes were found.
pub fn kill_processes_in(names: &[String], grace: Duration) -> Result<usize> {
    let inodes: HashSet<(u64, u64)> = names
        .iter()
        .filter_map(|n| fs::metadata(path(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if inodes.is_empty() {
        return Ok(0);
    }
    let victims = processes_in(&inodes)?;
    for pid in &victims {
        tracing::info!(
            pid = pid.as_raw(),
            "terminating process inside lab namespace"
        );
        let _ = kill(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && victims.iter().any(|p| alive(*p)) {
        thread::sleep(Duration::from_millis(20));
    }
    for pid in victims.iter().filter(|p| alive(**p)) {
        tracing::warn!(
            pid = pid.as_raw(),
            "process ignored SIGTERM, sending SIGKILL"
        );
        let _ = kill(*pid, Signal::SIGKILL);
    }
    Ok(victims.len())
}

fn alive(pid: Pid) -> bool {
    // A zombie (killed, not yet reaped by its parent) holds no namespace.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Processes (other than this one) with any thread in one of `inodes`.
fn processes_in(inodes: &HashSet<(u64, u64)>) -> Result<Vec<Pid>> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes vanish while we look: every error means "not in there".
        let Ok(tasks) = fs::read_dir(entry.path().join("task")) else {
            continue;
        };
        let inside = tasks.flatten().any(|task| {
            fs::metadata(task.path().join("ns/net"))
                .is_ok_and(|m| inodes.contains(&(m.dev(), m.ino())))
        });
        if inside {
            if let Ok(pid) = i32::try_from(pid) {
                found.push(Pid::from_raw(pid));
            }
        }
    }
    Ok(found)
}

/// Runs `f` on a thread inside namespace `ns` with a netlink handle whose
/// socket belongs to that namespace, on a current-thread tokio runtime.
pub fn netlink<F, Fut, T>(ns: &File, f: F) -> Result<T>
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send,
    Fut: Future<Output = Result<T>>,
    T: Send,
{
    meshward_cni::netns::run_in(ns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a tokio runtime")?;
        runtime.block_on(async {
            let (connection, handle, _) =
                rtnetlink::new_connection().context("opening a netlink socket")?;
            tokio::spawn(connection);
            f(handle).await
        })
    })
    .context("entering network namespace")?
}

/// Writes a sysctl under /proc/sys/net (`key` as `net/ipv4/ip_forward`) from
/// a thread inside namespace `ns`, where /proc/sys/net shows that namespace.
pub fn set_sysctl(ns: &File, key: &str, value: &str) -> Result<()> {
    let file = Path::new("/proc/sys").join(key);
    meshward_cni::netns::run_in(ns, || {
        OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|mut f| f.write_all(value.as_bytes()))
    })
    .context("entering network namespace")?
    .with_context(|| format!("writing {value} to {}", file.display()))
}
