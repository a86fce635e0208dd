//! Running external commands with captured output and a hard time limit.

use std::fmt;
use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

/// Default limit for one external command (ip, tc, nft, iptables-save, a
/// plugin).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Outcome of [`run`].
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From spawn to exit (not including reading leftover output).
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.success() && !self.timed_out
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status {}{} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            if self.timed_out {
                " (killed: timed out)"
            } else {
                ""
            },
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cmd` with `stdin` as its input and kills it (SIGKILL, by its own
/// pid) when it is still running after `timeout`. The child is waited for
/// without being reaped first, so the watchdog can never signal a recycled
/// pid. Output left open by grandchildren (daemons such as conmon) is read
/// for at most two more seconds after the child exits.
pub fn run(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> std::io::Result<Run> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = Pid::from_raw(child.id() as i32);

    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(timeout) {
            // The child is not reaped before this thread is joined, so `pid`
            // still names our child (running or a zombie).
            let _ = kill(pid, Signal::SIGKILL);
            true
        } else {
            false
        }
    });

    let out_rx = spawn_reader(child.stdout.take().expect("piped stdout"));
    let err_rx = spawn_reader(child.stderr.take().expect("piped stderr"));
    if let Some(mut input) = child.stdin.take() {
        let data = stdin.to_vec();
        thread::spawn(move || {
            // A child that exits without reading its input gets EPIPE: fine.
            let _ = input.write_all(&data);
        });
    }

    // Wait for exit without reaping (WNOWAIT).
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                let _ = stop_tx.send(());
                let _ = watchdog.join();
                return Err(e.into());
            }
        }
    }
    let elapsed = start.elapsed();
    let _ = stop_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let status = child.wait()?;

    let grace = Duration::from_secs(2);
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    Ok(Run {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed,
        timed_out,
    })
}

/// Runs a command that must succeed within `timeout`; panics with its
/// output otherwise.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Run {
    let what = format!("{cmd:?}");
    let r = run(cmd, b"", timeout).unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    assert!(r.success(), "{what} failed: {r}");
    r
}

/// Runs a command that must succeed within [`CMD_TIMEOUT`]; returns stdout.
pub fn sh(cmd: &[&str]) -> String {
    let r = run(Command::new(cmd[0]).args(&cmd[1..]), b"", CMD_TIMEOUT)
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(r.success(), "{cmd:?} failed: {r}");
    r.stdout
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_feeds_stdin() {
        let r = run(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]),
            b"hello\n",
            CMD_TIMEOUT,
        )
        .unwrap();
        assert!(!r.success());
        assert!(!r.timed_out);
        assert_eq!(r.status.code(), Some(3));
        assert_eq!(r.stdout, "hello\n");
        assert_eq!(r.stderr, "err\n");
    }

    #[test]
    fn kills_a_command_that_overruns() {
        let r = run(
            Command::new("sleep").arg("30"),
            b"",
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(r.timed_out, "{r}");
        assert!(!r.success());
        assert!(r.elapsed < Duration::from_secs(10), "{r}");
        assert!(r.to_string().contains("timed out"));
    }

    #[test]
    fn output_held_open_by_a_grandchild_is_not_waited_for() {
        // The background sleep keeps stdout open after sh exits; its output
        // is given up after the 2 s grace.
        let start = Instant::now();
        let r = run(
            Command::new("sh").args(["-c", "echo hi; sleep 6 & exit 0"]),
            b"",
            CMD_TIMEOUT,
        )
        .unwrap();
        assert!(r.success(), "{r}");
        assert!(start.elapsed() < Duration::from_secs(5), "{r}");
    }

    #[test]
    fn sh_returns_stdout_and_panics_on_failure() {
        assert_eq!(sh(&["echo", "a", "b"]), "a b\n");
        let failed = std::panic::catch_unwind(|| sh(&["false"]));
        assert!(failed.is_err());
    }

    #[test]
    fn spawn_errors_are_errors() {
        assert!(run(&mut Command::new("/nonexistent/mwt"), b"", CMD_TIMEOUT).is_err());
    }
}
