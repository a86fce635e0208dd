//! Set element changes as nf_tables netlink batches, in process.
//!
//! Running `nft` costs milliseconds per call; the DNS proxy holds each
//! answer until its addresses are in the kernel, so the element path talks
//! to the kernel directly. Only set elements go this way (add, destroy,
//! flush); tables, chains and rules are written once by `nft` (`layout`).
//! Message layout as `nft --debug=mnl` shows it: a batch (BEGIN ... END)
//! of NEWSETELEM / DESTROYSETELEM / DELSETELEM messages, each carrying
//! table, set and a nested element list; one batch is one transaction.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;

const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;

const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
/// Delete that succeeds when the element is already gone (kernel 6.3+).
const NFT_MSG_DESTROYSETELEM: u16 = 30;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;

const NLMSGERR_ATTR_MSG: u16 = 1;

/// An attribute length is 16 bits: keep each message's element list well
/// below 64 KiB and start a new message past this.
const MAX_ELEMS_BYTES: usize = 60_000;

/// One element to write: key, key end (interval sets), timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WireElem {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
    pub timeout: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Insert, or refresh the timeout of an identical element.
    Add,
    /// Remove if present.
    Destroy,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message under construction (attributes appended in place).
struct Msg<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Msg<'a> {
    fn begin(buf: &'a mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in end()
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
                                                    // nfgenmsg
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf, start }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len() + align4(len) - len, 0);
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(ty, &data);
    }

    /// Opens a nested attribute; returns where its header is.
    fn nest(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn data_value(&mut self, ty: u16, value: &[u8]) {
        let at = self.nest(ty);
        self.attr(NFTA_DATA_VALUE, value);
        self.nest_end(at);
    }

    fn end(self) {
        let len = (self.buf.len() - self.start) as u32;
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One transaction's messages. Every message but BEGIN/END asks for an
/// acknowledgement, so the reply says which one failed.
pub(crate) struct Batch {
    buf: Vec<u8>,
    next_seq: u32,
    acked: Vec<(u32, String)>,
    table: String,
}

impl Batch {
    pub fn new(table: &str, first_seq: u32) -> Self {
        let mut buf = Vec::with_capacity(4096);
        Msg::begin(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            first_seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .end();
        Batch {
            buf,
            next_seq: first_seq.wrapping_add(1),
            acked: Vec::new(),
            table: table.to_string(),
        }
    }

    fn message(&mut self, msg: u16, flags: u16, what: String) -> Msg<'_> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.acked.push((seq, what));
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        Msg::begin(
            &mut self.buf,
            ty,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            NFPROTO_INET,
            0,
        )
    }

    /// Removes every element of `set`.
    pub fn flush(&mut self, set: &str) {
        let table = self.table.clone();
        let mut m = self.message(NFT_MSG_DELSETELEM, 0, format!("flush set {set}"));
        m.attr_str(NFTA_SET_ELEM_LIST_TABLE, &table);
        m.attr_str(NFTA_SET_ELEM_LIST_SET, set);
        m.end();
    }

    /// Adds or destroys elements of `set`, in as many messages as needed.
    pub fn elems(&mut self, op: Op, set: &str, elems: &[WireElem]) {
        let (msg, flags, verb) = match op {
            Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_CREATE, "add to"),
            Op::Destroy => (NFT_MSG_DESTROYSETELEM, 0, "remove from"),
        };
        let table = self.table.clone();
        let mut rest = elems;
        while !rest.is_empty() {
            let mut m = self.message(msg, flags, format!("{verb} set {set}"));
            m.attr_str(NFTA_SET_ELEM_LIST_TABLE, &table);
            m.attr_str(NFTA_SET_ELEM_LIST_SET, set);
            let list = m.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
            let mut taken = 0;
            for e in rest {
                if m.buf.len() - list > MAX_ELEMS_BYTES {
                    break;
                }
                let item = m.nest(NFTA_LIST_ELEM);
                if let (Op::Add, Some(t)) = (op, e.timeout) {
                    let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1);
                    m.attr(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                }
                m.data_value(NFTA_SET_ELEM_KEY, &e.key);
                if let Some(end) = &e.key_end {
                    m.data_value(NFTA_SET_ELEM_KEY_END, end);
                }
                m.nest_end(item);
                taken += 1;
            }
            m.nest_end(list);
            m.end();
            rest = &rest[taken..];
        }
    }

    pub fn is_empty(&self) -> bool {
        self.acked.is_empty()
    }

    fn finish(mut self) -> (Vec<u8>, Vec<(u32, String)>, u32) {
        let seq = self.next_seq;
        Msg::begin(
            &mut self.buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .end();
        (self.buf, self.acked, seq.wrapping_add(1))
    }
}

/// What the kernel said about a batch.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("{what}: {err}{}", extack.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        what: String,
        err: io::Error,
        extack: Option<String>,
    },
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
    #[error("malformed netlink answer: {0}")]
    Malformed(&'static str),
}

impl NetlinkError {
    /// The errno the kernel returned, if it was the kernel that refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { err, .. } => err.raw_os_error(),
            _ => None,
        }
    }
}

const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// A NETLINK_NETFILTER socket in the network namespace it was opened in.
pub(crate) struct Conn {
    sock: Socket,
    seq: u32,
    sndbuf: usize,
    buf: Vec<u8>,
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Conn {
    pub fn open() -> io::Result<Conn> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Acks without the request echoed back; error strings from the kernel.
        sock.set_cap_ack(true)?;
        sock.set_ext_ack(true)?;
        let fd = sock.as_raw_fd();
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO with a live timeval and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 4 << 20);
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(Conn {
            sock,
            seq,
            sndbuf: 0,
            buf: vec![0; 1 << 16],
        })
    }

    pub fn batch(&mut self, table: &str) -> Batch {
        Batch::new(table, self.seq)
    }

    /// Sends the batch (one transaction) and waits for every acknowledgement.
    pub fn commit(&mut self, batch: Batch) -> Result<(), NetlinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (bytes, acked, next) = batch.finish();
        self.seq = next;
        // A batch must arrive as one message: make room for it.
        if bytes.len() + 4096 > self.sndbuf {
            let want = (bytes.len() + 65536).min(i32::MAX as usize);
            let fd = self.sock.as_raw_fd();
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want as i32)
                .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, want as i32))?;
            self.sndbuf = want;
        }
        let sent = self.sock.send(&bytes, 0)?;
        if sent != bytes.len() {
            return Err(NetlinkError::Malformed("batch sent in part"));
        }
        let mut pending: Vec<u32> = acked.iter().map(|(s, _)| *s).collect();
        let mut first_err: Option<NetlinkError> = None;
        let deadline = Instant::now() + RECV_TIMEOUT;
        while !pending.is_empty() {
            if Instant::now() > deadline {
                return Err(NetlinkError::Timeout(RECV_TIMEOUT));
            }
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(NetlinkError::Timeout(RECV_TIMEOUT))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for (seq, errno, extack) in parse_acks(&self.buf[..n])? {
                pending.retain(|s| *s != seq);
                if errno != 0 && first_err.is_none() {
                    let what = acked
                        .iter()
                        .find(|(s, _)| *s == seq)
                        .map(|(_, w)| w.clone())
                        .unwrap_or_else(|| format!("message {seq}"));
                    first_err = Some(NetlinkError::Kernel {
                        what,
                        err: io::Error::from_raw_os_error(errno),
                        extack,
                    });
                }
            }
            // After a failure the kernel aborts the batch: acks for the
            // other messages may never come.
            if first_err.is_some() {
                break;
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Dumps a set's elements as raw NFTA_SET_ELEM attribute lists.
    pub fn dump_set(&mut self, table: &str, set: &str) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut buf = Vec::new();
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM;
        let mut m = Msg::begin(
            &mut buf,
            ty,
            NLM_F_REQUEST | NLM_F_DUMP | NLM_F_ACK,
            seq,
            NFPROTO_INET,
            0,
        );
        m.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
        m.attr_str(NFTA_SET_ELEM_LIST_SET, set);
        m.end();
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            if Instant::now() > deadline {
                return Err(NetlinkError::Timeout(RECV_TIMEOUT));
            }
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(NetlinkError::Timeout(RECV_TIMEOUT))
                }
                Err(e) => return Err(e.into()),
            };
            for (hdr, body) in messages(&self.buf[..n])? {
                if hdr.seq != seq {
                    continue;
                }
                match hdr.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = error_code(body)?;
                        if errno != 0 {
                            return Err(NetlinkError::Kernel {
                                what: format!("list set {set}"),
                                err: io::Error::from_raw_os_error(errno),
                                extack: None,
                            });
                        }
                        if hdr.flags & NLM_F_MULTI == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {
                        // nfgenmsg, then the element list attribute(s).
                        let attrs = body
                            .get(4..)
                            .ok_or(NetlinkError::Malformed("short nfgenmsg"))?;
                        for (ty, data) in attributes(attrs) {
                            if ty & !NLA_F_NESTED == NFTA_SET_ELEM_LIST_ELEMENTS {
                                for (_, elem) in attributes(data) {
                                    out.push(elem.to_vec());
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

struct Header {
    ty: u16,
    flags: u16,
    seq: u32,
}

fn messages(mut buf: &[u8]) -> Result<Vec<(Header, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            return Err(NetlinkError::Malformed("message length"));
        }
        let hdr = Header {
            ty: u16::from_ne_bytes(buf[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(buf[6..8].try_into().unwrap()),
            seq: u32::from_ne_bytes(buf[8..12].try_into().unwrap()),
        };
        out.push((hdr, &buf[NLMSG_HDR..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

fn error_code(body: &[u8]) -> Result<i32, NetlinkError> {
    let raw = body
        .get(0..4)
        .ok_or(NetlinkError::Malformed("short error message"))?;
    Ok(-i32::from_ne_bytes(raw.try_into().unwrap()))
}

/// Attributes of a TLV area (type with flags, payload).
pub(crate) fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]);
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((ty, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

/// (sequence, errno, kernel message) of every acknowledgement in `buf`.
fn parse_acks(buf: &[u8]) -> Result<Vec<(u32, i32, Option<String>)>, NetlinkError> {
    let mut out = Vec::new();
    for (hdr, body) in messages(buf)? {
        if hdr.ty != NLMSG_ERROR {
            continue;
        }
        let errno = error_code(body)?;
        // With NETLINK_CAP_ACK the echoed request is its header only; the
        // extended-ack attributes follow it.
        let seq = body
            .get(4 + 8..4 + 12)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
            .ok_or(NetlinkError::Malformed("short acknowledgement"))?;
        let extack = body.get(4 + NLMSG_HDR..).and_then(|attrs| {
            attributes(attrs)
                .into_iter()
                .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
                .map(|(_, s)| {
                    String::from_utf8_lossy(s)
                        .trim_end_matches('\0')
                        .to_string()
                })
        });
        out.push((seq, errno, extack));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_message_matches_what_nft_sends() {
        // nft --debug=mnl add element inet meshward egress4_fqdn_range
        //   { 198.19.1.3 . 198.18.100.1 . tcp . 80-443 timeout 10s }
        // (nft adds NFTA_SET_ELEM_LIST_SET_ID too, which the kernel ignores
        // for an existing set; we leave it out.)
        let mut b = Batch::new("meshward", 7);
        b.elems(
            Op::Add,
            "egress4_fqdn_range",
            &[WireElem {
                key: vec![198, 19, 1, 3, 198, 18, 100, 1, 6, 0, 0, 0, 0, 0x50, 0, 0],
                key_end: Some(vec![
                    198, 19, 1, 3, 198, 18, 100, 1, 6, 0, 0, 0, 1, 0xbb, 0, 0,
                ]),
                timeout: Some(Duration::from_secs(10)),
            }],
        );
        let (bytes, acked, next) = b.finish();
        assert_eq!(acked.len(), 1);
        assert_eq!(next, 7 + 3);
        let msgs = messages(&bytes).unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].0.ty, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs[0].1, [0, 0, 0, 10]); // res_id = NFTABLES, big endian
        assert_eq!(msgs[2].0.ty, NFNL_MSG_BATCH_END);
        let (hdr, body) = &msgs[1];
        assert_eq!(hdr.ty, 0x0a0c);
        assert_eq!(hdr.seq, 8);
        assert_eq!(&body[..4], [1, 0, 0, 0]); // inet, v0, res_id 0
        let attrs = attributes(&body[4..]);
        assert_eq!(attrs[0], (1, &b"meshward\0"[..]));
        assert_eq!(attrs[1], (2, &b"egress4_fqdn_range\0"[..]));
        assert_eq!(attrs[2].0, 3 | NLA_F_NESTED);
        let list = attributes(attrs[2].1);
        assert_eq!(list.len(), 1);
        let elem = attributes(list[0].1);
        assert_eq!(elem[0], (4, &10_000u64.to_be_bytes()[..]));
        assert_eq!(elem[1].0, 1 | NLA_F_NESTED);
        let key = attributes(elem[1].1);
        assert_eq!(
            key[0].1,
            [198, 19, 1, 3, 198, 18, 100, 1, 6, 0, 0, 0, 0, 0x50, 0, 0]
        );
        assert_eq!(elem[2].0, 10 | NLA_F_NESTED);
        // Lengths as nft computed them: list 68, element 64, keys 24.
        assert_eq!(attrs[2].1.len() + 4, 68);
        assert_eq!(list[0].1.len() + 4, 64);
        assert_eq!(elem[1].1.len() + 4, 24);
    }

    #[test]
    fn large_element_lists_are_split_below_the_attribute_limit() {
        let mut b = Batch::new("meshward", 1);
        let elems: Vec<WireElem> = (0..5000u32)
            .map(|i| WireElem {
                key: [
                    [198, 19, 1, 2],
                    i.to_be_bytes(),
                    [6, 0, 0, 0],
                    [1, 187, 0, 0],
                ]
                .concat(),
                key_end: None,
                timeout: Some(Duration::from_secs(60)),
            })
            .collect();
        b.elems(Op::Add, "egress4_fqdn_port", &elems);
        b.elems(Op::Destroy, "egress4_fqdn_port", &elems[..10]);
        b.flush("egress4_any");
        let (bytes, acked, _) = b.finish();
        assert!(acked.len() > 3, "{}", acked.len());
        let mut total = 0;
        for (hdr, body) in &messages(&bytes).unwrap()[1..] {
            if hdr.ty == 0x0a0c {
                let attrs = attributes(&body[4..]);
                let list = attrs.iter().find(|a| a.0 & !NLA_F_NESTED == 3).unwrap();
                assert!(list.1.len() < 65_535);
                total += attributes(list.1).len();
            }
        }
        assert_eq!(total, 5000);
    }

    #[test]
    fn acks_are_parsed_with_kernel_messages() {
        // An NLMSG_ERROR with errno -ENOENT, the echoed header (seq 42) and
        // an NLMSGERR_ATTR_MSG.
        let mut buf = Vec::new();
        let mut m = Msg::begin(&mut buf, NLMSG_ERROR, 0, 42, 0, 0);
        // Replace the nfgenmsg Msg::begin wrote with the error payload.
        m.buf.truncate(m.start + NLMSG_HDR);
        m.buf.extend_from_slice(&(-2i32).to_ne_bytes());
        let mut echoed = vec![0u8; 16];
        echoed[8..12].copy_from_slice(&42u32.to_ne_bytes());
        m.buf.extend_from_slice(&echoed);
        m.attr_str(NLMSGERR_ATTR_MSG, "no such set");
        m.end();
        let acks = parse_acks(&buf).unwrap();
        assert_eq!(acks, [(42, 2, Some("no such set".to_string()))]);
        assert!(parse_acks(&[1, 2, 3]).unwrap().is_empty());
        let bad = [255u8; 20];
        assert!(parse_acks(&bad).is_err());
    }
}
