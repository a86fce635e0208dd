//! The DNS socket keeper: a small process that holds duplicates of the
//! proxy's listening sockets (the transparent UDP socket and the TCP
//! listener) so that, while the agent is down (restart, crash, kill -9),
//! the kernel keeps queueing redirected queries in the UDP receive buffer
//! and connections in the TCP accept backlog instead of finding no socket.
//! The next agent takes the very same sockets back and answers what waited.
//!
//! The keeper listens on a Unix `SOCK_SEQPACKET` socket (mode 0600, peer
//! uid root or the keeper's own). One request per connection, one reply,
//! both single messages; descriptors travel as `SCM_RIGHTS`:
//!
//! | request | reply |
//! |---|---|
//! | `mwdk1 get` | `mwdk1 held UDP TCP UDP_INO TCP_INO` + the two descriptors, or `mwdk1 empty` |
//! | `mwdk1 put` + UDP and TCP descriptors | `mwdk1 ok` (the previous pair is closed), or `mwdk1 error WHY` |
//! | `mwdk1 status` | `mwdk1 held …` without descriptors, or `mwdk1 empty` |
//! | `mwdk1 stop` | `mwdk1 ok`; the keeper removes its socket and returns |
//!
//! Anything else gets `mwdk1 error …`; a bad request never ends the keeper.
//! `UDP_INO`/`TCP_INO` are the sockets' inode numbers: the agent compares
//! them with its own to see whether the keeper holds what it serves.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, connect, getsockname, getsockopt, listen, sendmsg, setsockopt, socket, sockopt,
    AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, SockaddrLike,
    SockaddrStorage, UnixAddr,
};
use nix::sys::stat::{fstat, umask, Mode};
use nix::sys::time::TimeVal;
use tracing::{info, warn};

/// The protocol's tag, first word of every message.
pub const PROTOCOL: &str = "mwdk1";
/// The keeper's socket in the agent's state directory.
pub const SOCKET_NAME: &str = "dns-sockets.sock";
/// Longest message either side sends.
const MAX_MESSAGE: usize = 512;
/// Descriptors accepted in one message at most (more are closed).
const MAX_FDS: usize = 4;
/// A connection gets this long for its request and reply.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// A request to the keeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Get,
    Put,
    Status,
    Stop,
}

impl Request {
    pub fn encode(self) -> String {
        let op = match self {
            Request::Get => "get",
            Request::Put => "put",
            Request::Status => "status",
            Request::Stop => "stop",
        };
        format!("{PROTOCOL} {op}")
    }

    /// Parses a request message; the error says what was wrong.
    pub fn parse(message: &[u8]) -> Result<Request, String> {
        let text = std::str::from_utf8(message).map_err(|_| "not UTF-8".to_string())?;
        let mut words = text.split_ascii_whitespace();
        match words.next() {
            Some(PROTOCOL) => {}
            Some(other) => return Err(format!("unsupported protocol {:?}", clip(other))),
            None => return Err("empty request".into()),
        }
        let request = match words.next() {
            Some("get") => Request::Get,
            Some("put") => Request::Put,
            Some("status") => Request::Status,
            Some("stop") => Request::Stop,
            Some(other) => return Err(format!("unknown request {:?}", clip(other))),
            None => return Err("no request".into()),
        };
        if words.next().is_some() {
            return Err("trailing words in the request".into());
        }
        Ok(request)
    }
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What the keeper holds: the sockets' addresses and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldInfo {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub udp_ino: u64,
    pub tcp_ino: u64,
}

/// A reply from the keeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Held(HeldInfo),
    Empty,
    Ok,
    Error(String),
}

impl Reply {
    pub fn encode(&self) -> String {
        match self {
            Reply::Held(h) => format!(
                "{PROTOCOL} held {} {} {} {}",
                h.udp, h.tcp, h.udp_ino, h.tcp_ino
            ),
            Reply::Empty => format!("{PROTOCOL} empty"),
            Reply::Ok => format!("{PROTOCOL} ok"),
            // one line, bounded, so it always fits a message
            Reply::Error(why) => {
                let why: String = why.chars().filter(|c| !c.is_control()).take(400).collect();
                format!("{PROTOCOL} error {why}")
            }
        }
    }

    pub fn parse(message: &[u8]) -> Result<Reply, String> {
        let text = std::str::from_utf8(message).map_err(|_| "reply is not UTF-8".to_string())?;
        let (tag, rest) = text.split_once(' ').unwrap_or((text, ""));
        if tag != PROTOCOL {
            return Err(format!("unsupported protocol {:?}", clip(tag)));
        }
        let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "empty" if rest.is_empty() => Ok(Reply::Empty),
            "ok" if rest.is_empty() => Ok(Reply::Ok),
            "error" => Ok(Reply::Error(rest.to_string())),
            "held" => {
                let words: Vec<&str> = rest.split(' ').collect();
                let bad = || format!("bad held reply {:?}", clip(text));
                let [udp, tcp, udp_ino, tcp_ino] = words[..] else {
                    return Err(bad());
                };
                Ok(Reply::Held(HeldInfo {
                    udp: udp.parse().map_err(|_| bad())?,
                    tcp: tcp.parse().map_err(|_| bad())?,
                    udp_ino: udp_ino.parse().map_err(|_| bad())?,
                    tcp_ino: tcp_ino.parse().map_err(|_| bad())?,
                }))
            }
            _ => Err(format!("unknown reply {:?}", clip(text))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("a DNS socket keeper is already listening on {}", .0.display())]
    InUse(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// No keeper answers at the path (no socket, nobody listening).
    #[error("no DNS socket keeper at {}: {source}", path.display())]
    Unreachable { path: PathBuf, source: io::Error },
    /// A keeper answered, but not as expected.
    #[error("DNS socket keeper at {}: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
}

impl KeeperError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, KeeperError::Unreachable { .. })
    }
}

/// The sockets the keeper holds.
struct Held {
    udp: OwnedFd,
    tcp: OwnedFd,
    info: HeldInfo,
}

/// What one connection asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served (or refused); keep going.
    Continue,
    /// A `stop` request: the keeper should end.
    Stop,
}

/// The keeper: a listening socket and what it holds.
pub struct Keeper {
    listener: OwnedFd,
    path: PathBuf,
    /// (device, inode) of the socket file bound at `path`.
    file: (u64, u64),
    held: Option<Held>,
    uid: u32,
}

/// How often an idle keeper checks that its socket file is still its own.
const PATH_CHECK: Duration = Duration::from_secs(5);

impl Keeper {
    /// Listens on `path` (mode 0600 from creation; a stale socket is
    /// replaced, a live keeper refused; the directory is created 0700 if
    /// missing).
    pub fn bind(path: &Path) -> Result<Keeper, KeeperError> {
        let io_err = |action: &'static str| {
            let path = path.to_path_buf();
            move |source: io::Error| KeeperError::Io {
                action,
                path,
                source,
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io_err("creating the directory of"))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if connect_to(path, Duration::from_millis(500)).is_ok() {
                    return Err(KeeperError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(io_err("removing the stale socket"))?;
            }
            Ok(_) => return Err(KeeperError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspecting")(e)),
        }
        let addr = UnixAddr::new(path).map_err(|e| io_err("naming")(e.into()))?;
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| io_err("creating a socket for")(e.into()))?;
        // Created with no access for group and others from the start.
        let old = umask(Mode::from_bits_truncate(0o177));
        let bound = bind(listener.as_raw_fd(), &addr);
        umask(old);
        bound.map_err(|e| io_err("binding")(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("setting mode 0600 on"))?;
        listen(&listener, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| io_err("listening on")(e.into()))?;
        let meta = std::fs::symlink_metadata(path).map_err(io_err("inspecting"))?;
        Ok(Keeper {
            listener,
            path: path.to_path_buf(),
            file: (meta.dev(), meta.ino()),
            held: None,
            uid: nix::unistd::geteuid().as_raw(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What it holds now.
    pub fn held(&self) -> Option<HeldInfo> {
        self.held.as_ref().map(|h| h.info)
    }

    /// Whether `path` still names the socket this keeper listens on. When it
    /// is gone or replaced (a state directory wiped), no agent can reach
    /// this keeper, yet its sockets would keep the DNS port busy.
    fn reachable(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.file)
    }

    /// Serves connections one at a time until a `stop` request (then removes
    /// the socket), or until its socket file is gone or replaced (then exits
    /// and closes what it holds). Errors of single connections are logged,
    /// never fatal.
    pub fn serve(mut self) {
        let mut errors_in_a_row = 0u32;
        loop {
            let mut ready = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            let timeout = PollTimeout::try_from(PATH_CHECK).unwrap_or(PollTimeout::MAX);
            if let Ok(0) = poll(&mut ready, timeout) {
                if !self.reachable() {
                    warn!(
                        socket = %self.path.display(),
                        "DNS socket keeper: its socket file is gone or replaced; exiting (no agent could reach it)"
                    );
                    return;
                }
                continue;
            }
            let conn = match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor we now own.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(Errno::EINTR) | Err(Errno::ECONNABORTED) => continue,
                Err(e) => {
                    errors_in_a_row += 1;
                    if errors_in_a_row % 100 == 1 {
                        warn!("DNS socket keeper: accept on {}: {e}", self.path.display());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            errors_in_a_row = 0;
            if self.handle(&conn) == Outcome::Stop {
                break;
            }
        }
        let _ = std::fs::remove_file(&self.path);
        info!(socket = %self.path.display(), "DNS socket keeper stopped on request");
    }

    /// Handles one connection: checks the peer, reads one request, replies.
    pub fn handle(&mut self, conn: &OwnedFd) -> Outcome {
        let _ = set_timeouts(conn, CONNECTION_TIMEOUT);
        match getsockopt(conn, sockopt::PeerCredentials) {
            Ok(cred) if cred.uid() == 0 || cred.uid() == self.uid => {}
            Ok(cred) => {
                warn!(
                    uid = cred.uid(),
                    "DNS socket keeper: refusing a connection from another user"
                );
                let _ = send_message(
                    conn,
                    &Reply::Error("permission denied".into()).encode(),
                    &[],
                );
                return Outcome::Continue;
            }
            Err(e) => {
                warn!("DNS socket keeper: no peer credentials: {e}");
                return Outcome::Continue;
            }
        }
        let (message, fds) = match recv_message(conn) {
            Ok(m) => m,
            Err(e) => {
                warn!("DNS socket keeper: reading a request: {e}");
                return Outcome::Continue;
            }
        };
        let (reply, give, outcome) = match Request::parse(&message) {
            Err(why) => (Reply::Error(why), false, Outcome::Continue),
            Ok(Request::Put) => match self.take(fds) {
                Ok(()) => (Reply::Ok, false, Outcome::Continue),
                Err(why) => (Reply::Error(why), false, Outcome::Continue),
            },
            Ok(request) if !fds.is_empty() => (
                Reply::Error(format!(
                    "{} descriptor(s) sent with {request:?}; only put takes descriptors",
                    fds.len()
                )),
                false,
                Outcome::Continue,
            ),
            Ok(request @ (Request::Get | Request::Status)) => match &self.held {
                Some(h) => (
                    Reply::Held(h.info),
                    request == Request::Get,
                    Outcome::Continue,
                ),
                None => (Reply::Empty, false, Outcome::Continue),
            },
            Ok(Request::Stop) => (Reply::Ok, false, Outcome::Stop),
        };
        let raw: Vec<RawFd> = match (&self.held, give) {
            (Some(h), true) => vec![h.udp.as_raw_fd(), h.tcp.as_raw_fd()],
            _ => Vec::new(),
        };
        if let Err(e) = send_message(conn, &reply.encode(), &raw) {
            warn!("DNS socket keeper: replying: {e}");
        }
        outcome
    }

    /// A `put`: exactly a bound UDP socket and a listening TCP socket on the
    /// same address. The previous pair is closed once the new one is in.
    fn take(&mut self, fds: Vec<OwnedFd>) -> Result<(), String> {
        let [udp, tcp]: [OwnedFd; 2] = fds
            .try_into()
            .map_err(|v: Vec<OwnedFd>| format!("put wants 2 descriptors, got {}", v.len()))?;
        let info = check_pair(udp.as_fd(), tcp.as_fd())?;
        info!(
            udp = %info.udp,
            tcp = %info.tcp,
            "DNS socket keeper: holding the DNS proxy's sockets"
        );
        self.held = Some(Held { udp, tcp, info });
        Ok(())
    }
}

/// Checks that `udp` is a bound UDP socket and `tcp` a listening TCP socket
/// on the same address; returns their addresses and inodes.
pub fn check_pair(udp: BorrowedFd<'_>, tcp: BorrowedFd<'_>) -> Result<HeldInfo, String> {
    let kind = |fd: BorrowedFd<'_>| {
        getsockopt(&fd, sockopt::SockType).map_err(|e| format!("not a socket ({e})"))
    };
    match kind(udp)? {
        SockType::Datagram => {}
        other => {
            return Err(format!(
                "the first descriptor is a {other:?} socket, not UDP"
            ))
        }
    }
    match kind(tcp)? {
        SockType::Stream => {}
        other => {
            return Err(format!(
                "the second descriptor is a {other:?} socket, not TCP"
            ))
        }
    }
    if !getsockopt(&tcp, sockopt::AcceptConn).unwrap_or(false) {
        return Err("the TCP socket is not listening".into());
    }
    let udp_addr = inet_name(udp).map_err(|e| format!("the UDP socket: {e}"))?;
    let tcp_addr = inet_name(tcp).map_err(|e| format!("the TCP socket: {e}"))?;
    if udp_addr != tcp_addr {
        return Err(format!(
            "the UDP socket is on {udp_addr}, the TCP socket on {tcp_addr}"
        ));
    }
    Ok(HeldInfo {
        udp: udp_addr,
        tcp: tcp_addr,
        udp_ino: inode(udp).map_err(|e| format!("the UDP socket: {e}"))?,
        tcp_ino: inode(tcp).map_err(|e| format!("the TCP socket: {e}"))?,
    })
}

/// The inode number of a descriptor (unique per socket).
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(fstat(fd).map_err(io::Error::from)?.st_ino)
}

fn inet_name(fd: BorrowedFd<'_>) -> Result<SocketAddr, String> {
    let name: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    if let Some(v4) = name.as_sockaddr_in() {
        Ok(SocketAddr::V4((*v4).into()))
    } else if let Some(v6) = name.as_sockaddr_in6() {
        Ok(SocketAddr::V6((*v6).into()))
    } else {
        Err(format!("not an IP socket (family {:?})", name.family()))
    }
}

fn set_timeouts(fd: &OwnedFd, timeout: Duration) -> nix::Result<()> {
    let tv = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    setsockopt(fd, sockopt::ReceiveTimeout, &tv)?;
    setsockopt(fd, sockopt::SendTimeout, &tv)
}

/// Sends one message with `fds` attached.
pub fn send_message(fd: &OwnedFd, text: &str, fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(text.as_bytes())];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != text.len() {
        return Err(io::Error::other("short send"));
    }
    Ok(())
}

/// Receives one message and the descriptors attached to it (owned, close
/// on exec). A message or descriptor list that did not fit is an error,
/// and every descriptor that did arrive is closed: the control data is
/// walked by hand, because nix refuses to parse it once the kernel set
/// MSG_CTRUNC, which left those descriptors open in this process. (The
/// kernel itself closes the ones beyond the buffer.)
pub fn recv_message(fd: &OwnedFd) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    const FD_SIZE: usize = std::mem::size_of::<RawFd>();
    let mut buf = vec![0u8; MAX_MESSAGE];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * FD_SIZE) as u32) } as usize;
    // u64 words: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iovec, no control).
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = space as _;
    let n = loop {
        // SAFETY: hdr points at live buffers of the sizes it states.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel wrote hdr.msg_controllen bytes of well-formed
    // control messages into `control` (CMSG_NXTHDR stays inside them); each
    // SCM_RIGHTS payload holds descriptors it installed for us, which we
    // now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let header = data as usize - c as usize;
                let count = ((*c).cmsg_len as usize).saturating_sub(header) / FD_SIZE;
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    if hdr.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(format!(
            "more than {MAX_FDS} descriptors in one message (the {} received closed)",
            fds.len()
        )));
    }
    if hdr.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other(format!(
            "message longer than {MAX_MESSAGE} bytes"
        )));
    }
    if n == 0 && fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without a message",
        ));
    }
    buf.truncate(n);
    Ok((buf, fds))
}

/// Connects to the keeper at `path`, with `timeout` for every step.
pub fn connect_to(path: &Path, timeout: Duration) -> io::Result<OwnedFd> {
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    set_timeouts(&fd, timeout)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(fd)
}

/// A client of the keeper at one path.
#[derive(Debug, Clone)]
pub struct Client {
    pub path: PathBuf,
    pub timeout: Duration,
}

/// The sockets fetched from a keeper.
#[derive(Debug)]
pub struct Fetched {
    pub udp: std::net::UdpSocket,
    pub tcp: std::net::TcpListener,
    pub info: HeldInfo,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client {
            path: path.into(),
            timeout: CONNECTION_TIMEOUT,
        }
    }

    fn protocol(&self, message: impl Into<String>) -> KeeperError {
        KeeperError::Protocol {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// One request, its reply and the descriptors that came with it; also
    /// the keeper's pid (from its credentials).
    fn call(
        &self,
        request: Request,
        fds: &[RawFd],
    ) -> Result<(Reply, Vec<OwnedFd>, i32), KeeperError> {
        let conn =
            connect_to(&self.path, self.timeout).map_err(|source| KeeperError::Unreachable {
                path: self.path.clone(),
                source,
            })?;
        let me = nix::unistd::geteuid().as_raw();
        let pid = match getsockopt(&conn, sockopt::PeerCredentials) {
            Ok(cred) if cred.uid() == 0 || cred.uid() == me => cred.pid(),
            Ok(cred) => {
                return Err(self.protocol(format!(
                    "the keeper runs as uid {}, not root or ours",
                    cred.uid()
                )))
            }
            Err(e) => return Err(self.protocol(format!("no peer credentials: {e}"))),
        };
        send_message(&conn, &request.encode(), fds)
            .map_err(|e| self.protocol(format!("sending {request:?}: {e}")))?;
        let (message, fds) = recv_message(&conn)
            .map_err(|e| self.protocol(format!("reading the reply to {request:?}: {e}")))?;
        let reply = Reply::parse(&message).map_err(|e| self.protocol(e))?;
        Ok((reply, fds, pid))
    }

    /// Takes duplicates of the sockets the keeper holds (`None`: it holds
    /// none). They are checked, not trusted: UDP and a listening TCP socket
    /// on one address, matching the reply.
    pub fn get(&self) -> Result<Option<Fetched>, KeeperError> {
        let (reply, fds, _) = self.call(Request::Get, &[])?;
        match reply {
            Reply::Empty => Ok(None),
            Reply::Held(said) => {
                let [udp, tcp]: [OwnedFd; 2] = fds.try_into().map_err(|v: Vec<OwnedFd>| {
                    self.protocol(format!("sent {} descriptors, not 2", v.len()))
                })?;
                let info = check_pair(udp.as_fd(), tcp.as_fd()).map_err(|e| self.protocol(e))?;
                if info != said {
                    return Err(self.protocol(format!(
                        "sent other sockets than it named ({info:?}, said {said:?})"
                    )));
                }
                Ok(Some(Fetched {
                    udp: udp.into(),
                    tcp: tcp.into(),
                    info,
                }))
            }
            Reply::Error(why) => Err(self.protocol(why)),
            other => Err(self.protocol(format!("unexpected reply {other:?} to get"))),
        }
    }

    /// Hands the keeper (duplicates of) `udp` and `tcp` to hold instead of
    /// what it holds.
    pub fn put(&self, udp: BorrowedFd<'_>, tcp: BorrowedFd<'_>) -> Result<(), KeeperError> {
        match self
            .call(Request::Put, &[udp.as_raw_fd(), tcp.as_raw_fd()])?
            .0
        {
            Reply::Ok => Ok(()),
            Reply::Error(why) => Err(self.protocol(format!("refused the sockets: {why}"))),
            other => Err(self.protocol(format!("unexpected reply {other:?} to put"))),
        }
    }

    /// What the keeper holds, without descriptors.
    pub fn status(&self) -> Result<Option<HeldInfo>, KeeperError> {
        match self.call(Request::Status, &[])?.0 {
            Reply::Held(info) => Ok(Some(info)),
            Reply::Empty => Ok(None),
            Reply::Error(why) => Err(self.protocol(why)),
            other => Err(self.protocol(format!("unexpected reply {other:?} to status"))),
        }
    }

    /// Asks the keeper to end (closing what it holds); returns its pid.
    pub fn stop(&self) -> Result<i32, KeeperError> {
        match self.call(Request::Stop, &[])? {
            (Reply::Ok, _, pid) => Ok(pid),
            (Reply::Error(why), _, _) => Err(self.protocol(why)),
            (other, _, _) => Err(self.protocol(format!("unexpected reply {other:?} to stop"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::socketpair;
    use std::net::{TcpListener, UdpSocket};

    /// A connected pair; the client half gives up after 5 s.
    fn pair() -> (OwnedFd, OwnedFd) {
        let (client, server) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        set_timeouts(&client, Duration::from_secs(5)).unwrap();
        (client, server)
    }

    fn keeper_on(dir: &Path) -> Keeper {
        Keeper::bind(&dir.join(SOCKET_NAME)).unwrap()
    }

    /// A UDP socket and a TCP listener on one loopback port.
    fn sockets() -> (UdpSocket, TcpListener) {
        for _ in 0..50 {
            let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = tcp.local_addr().unwrap().port();
            if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)) {
                return (udp, tcp);
            }
        }
        panic!("no port free for both UDP and TCP");
    }

    /// Sends `text` + `fds` as a client would and returns the keeper's reply.
    fn ask(keeper: &mut Keeper, text: &[u8], fds: &[RawFd]) -> (Outcome, Reply, Vec<OwnedFd>) {
        let (client, server) = pair();
        let iov = [IoSlice::new(text)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(client.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
        let outcome = keeper.handle(&server);
        let (message, fds) = recv_message(&client).unwrap();
        (outcome, Reply::parse(&message).unwrap(), fds)
    }

    #[test]
    fn messages_round_trip() {
        for r in [Request::Get, Request::Put, Request::Status, Request::Stop] {
            assert_eq!(Request::parse(r.encode().as_bytes()), Ok(r));
        }
        let held = Reply::Held(HeldInfo {
            udp: "127.0.0.1:10053".parse().unwrap(),
            tcp: "127.0.0.1:10053".parse().unwrap(),
            udp_ino: 7,
            tcp_ino: 9,
        });
        for r in [
            held,
            Reply::Empty,
            Reply::Ok,
            Reply::Error("no good".into()),
        ] {
            assert_eq!(Reply::parse(r.encode().as_bytes()), Ok(r));
        }
        for bad in [
            &b""[..],
            b"mwdk1",
            b"mwdk2 get",
            b"mwdk1 fetch",
            b"mwdk1 get now",
            b"\xff\xfe",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad:?}");
        }
        for bad in [
            &b"mwdk1 held 1.2.3.4:5"[..],
            b"mwdk1 held x y 1 2",
            b"mwdk1 okay",
            b"other ok",
        ] {
            assert!(Reply::parse(bad).is_err(), "{bad:?}");
        }
        // a long error is clipped to fit a message
        let long = Reply::Error("x".repeat(10_000)).encode();
        assert!(long.len() < MAX_MESSAGE);
    }

    #[test]
    fn put_then_get_hands_over_the_same_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let mut keeper = keeper_on(dir.path());
        let (_, reply, _) = ask(&mut keeper, b"mwdk1 get", &[]);
        assert_eq!(reply, Reply::Empty);

        let (udp, tcp) = sockets();
        let addr = udp.local_addr().unwrap();
        let (outcome, reply, _) = ask(
            &mut keeper,
            b"mwdk1 put",
            &[udp.as_raw_fd(), tcp.as_raw_fd()],
        );
        assert_eq!((outcome, reply), (Outcome::Continue, Reply::Ok));
        // the original process closes its sockets (as a killed agent would)
        let udp_ino = inode(udp.as_fd()).unwrap();
        drop((udp, tcp));

        // a datagram and a connection arrive while nobody serves: they wait
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"queued", addr).unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut client, b"hello").unwrap();

        let (_, reply, fds) = ask(&mut keeper, b"mwdk1 get", &[]);
        let Reply::Held(info) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!((info.udp, info.tcp, info.udp_ino), (addr, addr, udp_ino));
        let [u, t]: [OwnedFd; 2] = fds.try_into().unwrap();
        let (u, t) = (UdpSocket::from(u), TcpListener::from(t));
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = u.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"queued"[..], sender.local_addr().unwrap())
        );
        let (mut conn, _) = t.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 5];
        std::io::Read::read_exact(&mut conn, &mut got).unwrap();
        assert_eq!(&got, b"hello");

        // status names the same sockets, without descriptors
        let (_, reply, fds) = ask(&mut keeper, b"mwdk1 status", &[]);
        assert_eq!((reply, fds.len()), (Reply::Held(info), 0));
    }

    #[test]
    fn bad_requests_are_refused_and_the_keeper_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut keeper = keeper_on(dir.path());
        let (udp, tcp) = sockets();
        let other_tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let unbound_listen = std::net::TcpStream::connect(other_tcp.local_addr().unwrap()).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let cases: Vec<(&[u8], Vec<RawFd>, &str)> = vec![
            (b"mwdk1", vec![], "no request"),
            (b" ", vec![], "empty request"),
            (b"GET / HTTP/1.1", vec![], "unsupported protocol"),
            (b"mwdk1 explode", vec![], "unknown request"),
            (b"mwdk1 put", vec![], "put wants 2 descriptors, got 0"),
            (b"mwdk1 put", vec![udp.as_raw_fd()], "got 1"),
            (
                b"mwdk1 put",
                vec![tcp.as_raw_fd(), udp.as_raw_fd()],
                "not UDP",
            ),
            (
                b"mwdk1 put",
                vec![udp.as_raw_fd(), file.as_raw_fd()],
                "not a socket",
            ),
            (
                b"mwdk1 put",
                vec![udp.as_raw_fd(), unbound_listen.as_raw_fd()],
                "not listening",
            ),
            (
                b"mwdk1 put",
                vec![udp.as_raw_fd(), other_tcp.as_raw_fd()],
                "the UDP socket is on",
            ),
            (
                b"mwdk1 get",
                vec![udp.as_raw_fd()],
                "only put takes descriptors",
            ),
        ];
        for (text, fds, want) in cases {
            let (outcome, reply, got) = ask(&mut keeper, text, &fds);
            assert_eq!(outcome, Outcome::Continue);
            match reply {
                Reply::Error(why) => assert!(why.contains(want), "{text:?}: {why}"),
                other => panic!("{text:?}: {other:?}"),
            }
            assert!(got.is_empty());
            assert_eq!(keeper.held(), None, "{text:?}");
        }
        // too many descriptors at once: refused, closed
        let many: Vec<RawFd> = (0..6).map(|_| udp.as_raw_fd()).collect();
        let (client, server) = pair();
        sendmsg::<()>(
            client.as_raw_fd(),
            &[IoSlice::new(b"mwdk1 put")],
            &[ControlMessage::ScmRights(&many)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(keeper.handle(&server), Outcome::Continue);
        // a peer that closes without a word
        let (client, server) = pair();
        drop(client);
        assert_eq!(keeper.handle(&server), Outcome::Continue);
        // still works
        let (_, reply, _) = ask(
            &mut keeper,
            b"mwdk1 put",
            &[udp.as_raw_fd(), tcp.as_raw_fd()],
        );
        assert_eq!(reply, Reply::Ok);
        assert!(keeper.held().is_some());
        let (outcome, reply, _) = ask(&mut keeper, b"mwdk1 stop", &[]);
        assert_eq!((outcome, reply), (Outcome::Stop, Reply::Ok));
    }

    #[test]
    fn descriptors_beyond_the_limit_are_all_closed() {
        // The read end of a pipe, sent more times than a message may carry:
        // once every copy is closed, writing gets EPIPE.
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (client, server) = pair();
        let many: Vec<RawFd> = (0..MAX_FDS + 3).map(|_| read_end.as_raw_fd()).collect();
        sendmsg::<()>(
            client.as_raw_fd(),
            &[IoSlice::new(b"mwdk1 put")],
            &[ControlMessage::ScmRights(&many)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(read_end);
        let err = recv_message(&server).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        assert_eq!(
            nix::unistd::write(&write_end, b"x"),
            Err(Errno::EPIPE),
            "a received descriptor of the pipe's read end is still open"
        );
        // Within the limit they arrive, and the pipe is open while held.
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (client, server) = pair();
        let two = [read_end.as_raw_fd(), read_end.as_raw_fd()];
        sendmsg::<()>(
            client.as_raw_fd(),
            &[IoSlice::new(b"mwdk1 put")],
            &[ControlMessage::ScmRights(&two)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(read_end);
        let (message, fds) = recv_message(&server).unwrap();
        assert_eq!((message.as_slice(), fds.len()), (&b"mwdk1 put"[..], 2));
        assert_eq!(nix::unistd::write(&write_end, b"x"), Ok(1));
        drop(fds);
        assert_eq!(nix::unistd::write(&write_end, b"x"), Err(Errno::EPIPE));
    }

    #[test]
    fn client_and_server_over_the_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/dns-sockets.sock");
        let client = Client::new(&path);
        assert!(client.get().unwrap_err().is_unreachable());
        let keeper = Keeper::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // a second keeper on the same path is refused
        assert!(matches!(Keeper::bind(&path), Err(KeeperError::InUse(_))));
        let server = std::thread::spawn(move || keeper.serve());
        assert!(client.get().unwrap().is_none());
        assert_eq!(client.status().unwrap(), None);
        let (udp, tcp) = sockets();
        client.put(udp.as_fd(), tcp.as_fd()).unwrap();
        let held = client.status().unwrap().unwrap();
        assert_eq!(held.udp_ino, inode(udp.as_fd()).unwrap());
        assert_eq!(held.tcp_ino, inode(tcp.as_fd()).unwrap());
        let fetched = client.get().unwrap().unwrap();
        assert_eq!(fetched.info, held);
        assert_eq!(fetched.udp.local_addr().unwrap(), udp.local_addr().unwrap());
        // received descriptors are close-on-exec
        let flags = nix::fcntl::fcntl(&fetched.udp, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(flags & libc::FD_CLOEXEC != 0);
        assert_eq!(client.stop().unwrap(), std::process::id() as i32);
        server.join().unwrap();
        assert!(!path.exists());
        // a stale socket file (keeper killed) is replaced by the next keeper
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(client.status().unwrap_err().is_unreachable());
        let keeper = Keeper::bind(&path).unwrap();
        assert_eq!(keeper.held(), None);
    }

    #[test]
    fn a_keeper_whose_socket_file_is_removed_exits_and_lets_go_of_the_port() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dns-sockets.sock");
        let keeper = Keeper::bind(&path).unwrap();
        let server = std::thread::spawn(move || keeper.serve());
        let client = Client::new(&path);
        let (udp, tcp) = sockets();
        let addr = tcp.local_addr().unwrap();
        client.put(udp.as_fd(), tcp.as_fd()).unwrap();
        drop((udp, tcp));
        // the state directory is wiped: nobody can reach this keeper
        std::fs::remove_file(&path).unwrap();
        let deadline = std::time::Instant::now() + PATH_CHECK * 3;
        while !server.is_finished() {
            assert!(std::time::Instant::now() < deadline, "keeper still running");
            std::thread::sleep(Duration::from_millis(50));
        }
        server.join().unwrap();
        // what it held is closed: the TCP port can be listened on again
        std::net::TcpListener::bind(addr).expect("the keeper still holds the port");
    }
}
