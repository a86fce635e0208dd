//! Fixtures for meshward's integration tests and benches.
//!
//! - [`Netns`]: a network namespace owned by one test, named
//!   `mwt-<pid>-<n><role>` so parallel tests and processes never collide,
//!   removed on drop (also when the test fails). [`veth`] links two of them.
//! - [`run`] / [`run_ok`] / [`sh`]: external commands with captured output
//!   and a hard time limit ([`CMD_TIMEOUT`] unless told otherwise).
//! - [`TempDir`]: a temp directory `mwt-<pid>-<n>` removed on drop, after
//!   unmounting whatever a test (or a container it ran) left mounted below.
//! - [`cleanup_stale`]: leftovers of killed earlier runs (temp dirs and
//!   namespaces named after a pid that is gone) are removed on first use.
//! - [`http_get`], [`files_mentioning`]: small checks tests share.
//!
//! Every name these helpers create comes from one counter ([`unique_name`]),
//! so namespaces and temp dirs never clash within a process. Rules kept by
//! everything here: work happens only in namespaces the test creates; tests
//! put only addresses from 198.18.0.0/15 in them and never link them to the
//! host's interfaces; every wait is bounded in time.

use std::sync::atomic::{AtomicU32, Ordering};

mod cmd;
mod fs;
mod net;
mod netns;

pub use cmd::{run, run_ok, sh, Run, CMD_TIMEOUT};
pub use fs::{
    cleanup_stale, files_mentioning, mounts_under, remove_tree, TempDir, STALE_CLEANUP_SCRIPT,
};
pub use net::http_get;
pub use netns::{in_netns, veth, Netns};

/// Prefix of every namespace and temp dir these helpers create (as
/// `mwt-<pid>-<n>...`); the stale cleanup only ever looks at names with it.
pub const PREFIX: &str = "mwt";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique per test process and call: `mwt-<pid>-<n>`. Namespaces and
/// temp dirs share the counter.
pub fn unique_name() -> String {
    format!(
        "{PREFIX}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// The pid inside a name `mwt-<pid>-...`, if it has that shape.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// The tests need root (namespaces, veths, mounts). Fails loudly when not
/// root so CI can never pass by skipping.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and must run as root"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_carry_pid_and_never_repeat() {
        let a = unique_name();
        let b = unique_name();
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert!(a.starts_with(&format!("mwt-{}-", std::process::id())));
    }

    #[test]
    fn owner_pid_only_for_our_shape() {
        assert_eq!(owner_pid("mwt-42-7"), Some(42));
        assert_eq!(owner_pid("mwt-42-7h"), Some(42));
        assert_eq!(owner_pid("mwt-42-"), Some(42));
        assert_eq!(owner_pid("mwt-42"), None);
        assert_eq!(owner_pid("mwt-x-1"), None);
        assert_eq!(owner_pid("mwtx-42-1"), None);
        assert_eq!(owner_pid("mwl-lab-node1"), None);
        assert_eq!(owner_pid("mwt-does-not-exist"), None);
    }
}
