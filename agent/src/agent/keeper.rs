//! The DNS socket keeper, agent side, and `meshward dns-keeper`.
//!
//! The keeper (`meshward_dns_proxy::keeper`) holds duplicates of the DNS
//! proxy's listening sockets, so while no agent runs (restart, crash,
//! kill -9) the kernel keeps queueing redirected queries instead of
//! finding no socket; the next agent takes the same sockets back and
//! answers them, late but within the resolvers' timeout.
//!
//! `dnsSocketKeeper` (config):
//! - `spawn` (default): the agent starts `meshward dns-keeper` itself when
//!   none answers at `stateDir/dns-sockets.sock` — in a session of its own,
//!   with no descriptor of the agent's but the log `stateDir/dns-keeper.log`
//!   (stderr), so killing the agent leaves it.
//! - `external`: something else runs it (the Helm chart: a second container
//!   of the agent's pod, because a container restart kills every process
//!   in it); the agent only talks to it.
//! - `off`: no keeper; one left by an earlier configuration is asked for its
//!   sockets and stopped.
//!
//! At start-up (after the policy's first apply, right before the proxy
//! serves; on a blocking thread, not the agent's runtime: the keeper's
//! answers may take seconds) the agent asks the keeper for its sockets;
//! when they are on another address than `dnsProxyPort` (the port changed)
//! it binds new ones and the proxy drains the old ones (answers what
//! queued there while no agent ran) before closing them; when there are
//! none, it binds new ones. A thread (`mw-dns-keeper`) then makes sure the
//! keeper holds exactly the sockets the proxy serves (inode numbers
//! compared) every [`CHECK_INTERVAL`]: it hands them over when the keeper
//! is new, empty or holds others, and in `spawn` mode starts a keeper when
//! none answers.

use std::fs::OpenOptions;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use meshward_dns_proxy::keeper::{inode, Client, Fetched, Keeper, SOCKET_NAME};
use meshward_dns_proxy::Listeners;
use tracing::{debug, info, warn};

use crate::config::DnsKeeperMode;

/// How often the agent checks that the keeper holds its sockets.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long a starting agent waits for an `external` keeper to answer.
const EXTERNAL_WAIT: Duration = Duration::from_secs(1);
/// How long a spawned keeper gets to start listening.
const SPAWN_WAIT: Duration = Duration::from_secs(3);
/// The spawned keeper's log, in the state directory.
pub const LOG_NAME: &str = "dns-keeper.log";

/// `stateDir/dns-sockets.sock`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// `meshward dns-keeper` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct KeeperArgs {
    /// The agent's state directory: listen on DIR/dns-sockets.sock
    #[arg(long, value_name = "DIR", required_unless_present = "socket")]
    pub state_dir: Option<PathBuf>,
    /// Listen on this socket instead
    #[arg(long, value_name = "PATH", conflicts_with = "state_dir")]
    pub socket: Option<PathBuf>,
}

/// Runs the keeper until it is asked to stop or killed.
pub fn run(args: KeeperArgs) -> Result<ExitCode> {
    let path = match (args.socket, args.state_dir) {
        (Some(socket), _) => socket,
        (None, Some(dir)) => socket_path(&dir),
        (None, None) => anyhow::bail!("--state-dir or --socket is required"),
    };
    exit_on_signals();
    let keeper = Keeper::bind(&path).context("starting the DNS socket keeper")?;
    info!(
        socket = %path.display(),
        pid = std::process::id(),
        "DNS socket keeper listening"
    );
    keeper.serve();
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT end the keeper at once, also as a container's PID 1
/// (which ignores signals it has no handler for).
fn exit_on_signals() {
    extern "C" fn bye(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(0) }
    }
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(bye), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only calls _exit.
        if let Err(e) = unsafe { sigaction(signal, &action) } {
            warn!("DNS socket keeper: handling {signal}: {e}");
        }
    }
}

/// What the DNS proxy serves, and what it drains first.
pub struct Taken {
    pub listeners: Listeners,
    /// The keeper's sockets on another address (`dnsProxyPort` changed):
    /// what queued on them is answered, then they close.
    pub replaced: Option<Listeners>,
}

/// The DNS proxy's listeners on `addr`: the keeper's when it holds sockets
/// on `addr`, else new ones. Unless `mode` is off, a thread then keeps the
/// keeper holding them. Blocks (the keeper's answers; up to a few
/// seconds): call it off the async runtime.
pub fn listeners(addr: SocketAddr, mode: DnsKeeperMode, state_dir: &Path) -> Result<Taken> {
    let client = Client::new(socket_path(state_dir));
    let fetched = match mode {
        DnsKeeperMode::Off => take_and_stop(&client),
        DnsKeeperMode::Spawn => fetch(&client, Duration::ZERO),
        DnsKeeperMode::External => fetch(&client, EXTERNAL_WAIT),
    };
    let mut replaced = None;
    let listeners = match fetched {
        Some(f) if f.info.udp == addr => {
            info!(
                %addr,
                "DNS proxy sockets taken over from the keeper: queries that arrived while no agent ran are answered now"
            );
            Listeners::from_std(f.udp, f.tcp)
                .with_context(|| format!("using the keeper's DNS sockets on {addr}"))?
        }
        Some(f) => {
            info!(
                held = %f.info.udp,
                want = %addr,
                "the keeper holds DNS sockets for another address (dnsProxyPort changed): binding new ones, answering what queued on the old ones"
            );
            let held = f.info.udp;
            match Listeners::from_std(f.udp, f.tcp) {
                Ok(old) => replaced = Some(old),
                Err(e) => warn!(%held, "the keeper's old DNS sockets cannot be drained: {e}"),
            }
            bind(addr)?
        }
        None => bind(addr)?,
    };
    if mode != DnsKeeperMode::Off {
        let udp = listeners
            .udp()
            .try_clone()
            .context("duplicating the DNS UDP socket")?;
        let tcp = listeners
            .tcp()
            .try_clone()
            .context("duplicating the DNS TCP listener")?;
        let state_dir = state_dir.to_path_buf();
        std::thread::Builder::new()
            .name("mw-dns-keeper".into())
            .spawn(move || keep(client, mode, udp, tcp, &state_dir))
            .context("starting the DNS socket keeper thread")?;
    }
    Ok(Taken {
        listeners,
        replaced,
    })
}

fn bind(addr: SocketAddr) -> Result<Listeners> {
    Listeners::bind(addr).with_context(|| format!("binding the DNS proxy to {addr} (udp and tcp)"))
}

/// The keeper's sockets, if one answers (retried for `wait` while none
/// does) and holds some.
fn fetch(client: &Client, wait: Duration) -> Option<Fetched> {
    let deadline = Instant::now() + wait;
    loop {
        match client.get() {
            Ok(fetched) => {
                if fetched.is_none() {
                    info!("the DNS socket keeper holds no sockets yet");
                }
                return fetched;
            }
            Err(e) if e.is_unreachable() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.is_unreachable() => {
                debug!("{e}");
                return None;
            }
            Err(e) => {
                warn!("{e}; binding new DNS sockets");
                // An incompatible keeper may hold the port: ask it to go.
                let _ = client.stop();
                return None;
            }
        }
    }
}

/// `dnsSocketKeeper: off`: a keeper left by an earlier configuration hands
/// its sockets over and is stopped.
fn take_and_stop(client: &Client) -> Option<Fetched> {
    if !client.path.exists() {
        return None;
    }
    let fetched = client.get().ok().flatten();
    match client.stop() {
        Ok(pid) => info!(
            pid,
            "dnsSocketKeeper is off: stopped the running DNS socket keeper"
        ),
        Err(e) => debug!("{e}"),
    }
    fetched
}

/// The `mw-dns-keeper` thread: makes sure the keeper holds `udp` and `tcp`.
fn keep(
    client: Client,
    mode: DnsKeeperMode,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    state_dir: &Path,
) {
    let want = match (inode(udp.as_fd()), inode(tcp.as_fd())) {
        (Ok(u), Ok(t)) => (u, t),
        (Err(e), _) | (_, Err(e)) => {
            warn!(
                "DNS socket keeper: cannot identify the proxy's sockets: {e}; not using a keeper"
            );
            return;
        }
    };
    let mut child: Option<Child> = None;
    let mut last_problem: Option<String> = None;
    loop {
        if let Some(c) = &mut child {
            if let Ok(Some(status)) = c.try_wait() {
                warn!(pid = c.id(), "the DNS socket keeper exited ({status})");
                child = None;
            }
        }
        let problem = match check(&client, mode, &udp, &tcp, want, &mut child, state_dir) {
            Ok(()) => None,
            Err(e) => Some(format!("{e:#}")),
        };
        if problem != last_problem {
            match &problem {
                Some(p) => warn!(
                    "DNS socket keeper: {p} (DNS queries arriving while no agent runs are lost until this is fixed; retrying every {}s)",
                    CHECK_INTERVAL.as_secs()
                ),
                None if last_problem.is_some() => info!("DNS socket keeper: holding the proxy's sockets again"),
                None => {}
            }
            last_problem = problem;
        }
        std::thread::sleep(CHECK_INTERVAL);
    }
}

fn check(
    client: &Client,
    mode: DnsKeeperMode,
    udp: &std::net::UdpSocket,
    tcp: &std::net::TcpListener,
    want: (u64, u64),
    child: &mut Option<Child>,
    state_dir: &Path,
) -> Result<()> {
    match client.status() {
        Ok(Some(held)) if (held.udp_ino, held.tcp_ino) == want => Ok(()),
        Ok(_) => {
            client.put(udp.as_fd(), tcp.as_fd())?;
            info!(socket = %client.path.display(), "DNS proxy sockets handed to the keeper");
            Ok(())
        }
        Err(e) if e.is_unreachable() && mode == DnsKeeperMode::Spawn => {
            if let Some(mut old) = child.take() {
                // ours, alive, but not answering: replace it
                let _ = old.kill();
                let _ = old.wait();
            }
            let started = spawn(state_dir).context("starting `meshward dns-keeper`")?;
            let pid = started.id();
            *child = Some(started);
            let deadline = Instant::now() + SPAWN_WAIT;
            loop {
                match client.put(udp.as_fd(), tcp.as_fd()) {
                    Ok(()) => break,
                    Err(e) if e.is_unreachable() && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            info!(
                pid,
                socket = %client.path.display(),
                log = %state_dir.join(LOG_NAME).display(),
                "DNS socket keeper started; it holds the proxy's sockets"
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Starts `meshward dns-keeper --socket stateDir/dns-sockets.sock`: the
/// running binary (`/proc/self/exe`, also after an upgrade replaced the
/// file), its own session, stdin and stdout on /dev/null, stderr to
/// `stateDir/dns-keeper.log`, and none of the agent's other descriptors.
fn spawn(state_dir: &Path) -> io::Result<Child> {
    let log_path = state_dir.join(LOG_NAME);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", log_path.display())))?;
    let mut command = Command::new("/proc/self/exe");
    command
        .arg("dns-keeper")
        .arg("--socket")
        .arg(socket_path(state_dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    // SAFETY: only setsid(2), close_range(2) and fcntl(2) run between fork
    // and exec, all async-signal-safe; nothing allocates.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Every descriptor above stdio close-on-exec (std's own exec
            // error pipe already is), so the keeper holds nothing of the
            // agent's: not its lock, TUN or sockets.
            let r = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if r != 0 {
                for fd in 3..4096 {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
            Ok(())
        });
    }
    command.spawn()
}
