//! Entering network namespaces.
//!
//! A thread that calls setns(2) stays in that namespace, so work that must
//! happen inside another namespace runs on a short-lived thread of its own
//! and the caller's threads are never moved.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// Opens a network namespace handle (a path such as `/run/netns/NAME` or
/// `/proc/PID/ns/net`).
pub fn open(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// Runs `f` on a new thread that has joined the network namespace `ns`, and
/// returns its result. Sockets created inside `f` (netlink included) belong
/// to that namespace for their whole life.
pub fn run_in<F, T>(ns: &File, f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| io::Error::other(format!("setns into network namespace: {e}")))?;
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("thread inside network namespace panicked"))?
    })
}
