//! Drops as flow events: the nftables policy chains log every packet
//! they drop to an nflog group (`log prefix "meshward-drop egress"
//! group N`), and so do the fail-closed rules of the DNS and L7 redirects
//! (`meshward-drop dns-proxy`, `meshward-drop l7-proxy egress|ingress`:
//! TPROXY found no proxy socket, the packet was dropped or its connection
//! reset). This listener binds that group (NETLINK_NETFILTER,
//! nfnetlink_log) on a thread of its own and turns each packet into a
//! `dropped` event naming the pod, the peer, port and protocol, the
//! policies concerned and the reason.
//!
//! The kernel copies only the first [`COPY_RANGE`] bytes of each packet
//! (enough for the IP and transport headers) and batches them
//! ([`FLUSH_TIMEOUT_CS`], [`QUEUE_THRESHOLD`]). When the socket's buffer
//! overflows under a flood the kernel drops log messages (ENOBUFS): they
//! are counted as lost, the listener goes on. Parsing ([`parse_packet`],
//! [`drop_rule_of`]) and the events ([`drop_event`]) are pure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use meshward_egress::layout::{NFLOG_DNS_PROXY_PREFIX, NFLOG_L7_PROXY_PREFIX, NFLOG_PREFIX};
use meshward_policy::{NodeRules, PolicyRef};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigMode, ConfigNla, PacketNla, Timeout, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{constants::NETLINK_NETFILTER, Socket};
use tracing::{debug, info, warn};

use super::events::{protocol_name, EventHub, FlowEvent, FlowType, Verdict};

/// Bytes of each dropped packet copied to us: IPv6 header + ports.
const COPY_RANGE: u32 = 128;
/// The kernel sends a batch at least this often (hundredths of a second).
const FLUSH_TIMEOUT_CS: u32 = 5;
/// ... or when this many packets are queued.
const QUEUE_THRESHOLD: u32 = 32;
/// Socket receive buffer asked for.
const RECV_BUFFER: usize = 4 << 20;

/// Which side of the flow the local pod is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }

    fn parse(text: &str) -> Option<Direction> {
        match text {
            "egress" => Some(Direction::Egress),
            "ingress" => Some(Direction::Ingress),
            _ => None,
        }
    }
}

/// Which rule logged a packet, by its log prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropRule {
    /// A policy check chain: no rule of that direction admits the packet.
    Policy(Direction),
    /// The DNS redirect's fail-closed rule: no DNS proxy socket took the
    /// query (UDP dropped, TCP reset).
    DnsProxy,
    /// An L7 redirect's fail-closed rule (the side whose L7 port it is):
    /// no L7 proxy socket took the connection (reset).
    L7Proxy(Direction),
}

/// `meshward-drop egress|ingress`, `meshward-drop dns-proxy` or
/// `meshward-drop l7-proxy egress|ingress` (the kernel may add a trailing
/// space or NUL); `None` for anything else.
pub fn drop_rule_of(prefix: &[u8]) -> Option<DropRule> {
    let text = std::str::from_utf8(prefix).ok()?;
    let text = text.trim_end_matches(['\0', ' ']);
    if text == NFLOG_DNS_PROXY_PREFIX {
        return Some(DropRule::DnsProxy);
    }
    if let Some(rest) = text.strip_prefix(NFLOG_L7_PROXY_PREFIX) {
        return Direction::parse(rest.strip_prefix(' ')?).map(DropRule::L7Proxy);
    }
    Direction::parse(text.strip_prefix(NFLOG_PREFIX)?).map(DropRule::Policy)
}

/// The addresses, protocol and ports of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// TCP, UDP and SCTP only, and only in a first fragment.
    pub ports: Option<(u16, u16)>,
}

fn ports(protocol: u8, l4: &[u8]) -> Option<(u16, u16)> {
    if !matches!(protocol, 6 | 17 | 132) || l4.len() < 4 {
        return None;
    }
    Some((
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    ))
}

/// The header of an IPv4 or IPv6 packet (by its version nibble); `None`
/// for anything shorter or malformed.
pub fn parse_packet(packet: &[u8]) -> Option<PacketHeader> {
    match packet.first()? >> 4 {
        4 => {
            if packet.len() < 20 {
                return None;
            }
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let protocol = packet[9];
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            let l4 = packet.get(ihl..).unwrap_or_default();
            Some(PacketHeader {
                src: src.into(),
                dst: dst.into(),
                protocol,
                ports: (fragment_offset == 0)
                    .then(|| ports(protocol, l4))
                    .flatten(),
            })
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let addr = |at: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&packet[at..at + 16]);
                Ipv6Addr::from(b)
            };
            // Extension headers are not followed: their protocol is shown.
            let protocol = packet[6];
            Some(PacketHeader {
                src: addr(8).into(),
                dst: addr(24).into(),
                protocol,
                ports: ports(protocol, &packet[40..]),
            })
        }
        _ => None,
    }
}

/// The event for a packet a rule of ours dropped (or reset).
pub fn drop_event(
    hub: &EventHub,
    rules: &NodeRules,
    rule: DropRule,
    h: &PacketHeader,
) -> FlowEvent {
    let (kind, direction) = match rule {
        DropRule::Policy(d) => (FlowType::L4, d),
        DropRule::DnsProxy => (FlowType::Dns, Direction::Egress),
        DropRule::L7Proxy(d) => (FlowType::L7, d),
    };
    let mut e = FlowEvent::new(kind, Verdict::Dropped);
    e.direction = Some(direction.as_str().into());
    e.source = Some(hub.endpoint(h.src, None));
    e.destination = Some(hub.endpoint(h.dst, h.ports.map(|(_, d)| d)));
    e.protocol = Some(protocol_name(h.protocol));
    let local = match direction {
        Direction::Egress => h.src,
        Direction::Ingress => h.dst,
    };
    let endpoint = rules.endpoint_by_ip(local);
    let side = endpoint.and_then(|ep| match direction {
        Direction::Egress => ep.egress.as_deref(),
        Direction::Ingress => ep.ingress.as_deref(),
    });
    match rule {
        DropRule::Policy(_) => match side {
            Some(d) => {
                e.policies = d.policies.iter().map(ToString::to_string).collect();
                e.reason = Some(format!("no {} rule allows it", direction.as_str()));
            }
            None => e.reason = Some("policy changed since the drop".into()),
        },
        DropRule::DnsProxy => {
            if let Some(dns) = endpoint.and_then(|ep| ep.dns.as_deref()) {
                e.policies = distinct(dns.allow.iter().map(|a| &a.policy));
            }
            e.reason = Some(no_proxy_socket("DNS", h));
        }
        DropRule::L7Proxy(_) => {
            if let (Some(d), Some((_, port))) = (side, h.ports) {
                let on_port = d.l7.iter().filter(|a| a.port == port);
                e.policies = distinct(on_port.map(|a| &a.policy));
            }
            e.reason = Some(no_proxy_socket("L7", h));
        }
    }
    e
}

/// Why a fail-closed rule stopped the packet, and how.
fn no_proxy_socket(proxy: &str, h: &PacketHeader) -> String {
    let family = if h.src.is_ipv4() { "IPv4" } else { "IPv6" };
    let outcome = if h.protocol == 6 {
        "connection reset"
    } else {
        "dropped"
    };
    format!(
        "no {proxy} proxy socket on the node took it (the proxy not listening on {family}, or restarting): {outcome}"
    )
}

/// The policies, each once, in their first order.
fn distinct<'a>(policies: impl Iterator<Item = &'a PolicyRef>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in policies.map(ToString::to_string) {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Binds nflog `group` in the current network namespace and hands drops
/// to `hub` on a thread of its own. `rules` returns the rules in force.
pub fn start(
    group: u16,
    hub: Arc<EventHub>,
    rules: impl Fn() -> Arc<NodeRules> + Send + 'static,
) -> Result<()> {
    let socket = bind(group).with_context(|| format!("binding nflog group {group}"))?;
    std::thread::Builder::new()
        .name("mw-nflog".into())
        .spawn(move || listen(socket, &hub, rules))
        .context("starting the nflog thread")?;
    info!(group, "listening for policy drops (nflog)");
    Ok(())
}

fn send_config(socket: &Socket, group: u16, nlas: Vec<ConfigNla>) -> Result<()> {
    let msg = config_request(NetfilterProtoFamily::Unspec, group, nlas);
    let mut buf = vec![0; msg.header.length as usize];
    msg.serialize(&mut buf[..]);
    socket
        .send(&buf, 0)
        .context("sending an nflog config request")?;
    let mut answer = vec![0u8; 4096];
    let n = socket
        .recv(&mut &mut answer[..], 0)
        .context("reading the nflog config answer")?;
    let reply = <NetlinkMessage<NetfilterMessage>>::deserialize(&answer[..n])
        .map_err(|e| anyhow!("decoding the nflog config answer: {e}"))?;
    if let NetlinkPayload::Error(e) = reply.payload {
        if let Some(code) = e.code {
            bail!(
                "the kernel refused the nflog config: {}",
                std::io::Error::from_raw_os_error(-code.get())
            );
        }
    }
    Ok(())
}

fn bind(group: u16) -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER).context("opening a netfilter socket")?;
    socket.bind_auto().context("binding the netfilter socket")?;
    if let Err(e) = socket.set_rx_buf_sz(RECV_BUFFER) {
        debug!("nflog receive buffer: {e}");
    }
    send_config(&socket, group, vec![ConfigCmd::Bind.into()])?;
    send_config(
        &socket,
        group,
        vec![
            ConfigMode::new_packet(COPY_RANGE).into(),
            Timeout::new(FLUSH_TIMEOUT_CS).into(),
            ConfigNla::QThresh(QUEUE_THRESHOLD),
        ],
    )?;
    Ok(socket)
}

fn listen(socket: Socket, hub: &EventHub, rules: impl Fn() -> Arc<NodeRules>) {
    let mut buf = vec![0u8; 1 << 16];
    let mut errors = 0u32;
    loop {
        let n = match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => {
                errors = 0;
                n
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // the kernel dropped log messages: we cannot tell how many
                hub.count_lost(1);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                errors += 1;
                if errors > 100 {
                    warn!("nflog: giving up after repeated errors: {e}");
                    return;
                }
                warn!("nflog: receiving: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        handle_batch(&buf[..n], hub, &rules());
    }
}

/// Publishes the logged packets in one read of the nflog socket (several
/// netlink messages).
fn handle_batch(batch: &[u8], hub: &EventHub, rules: &NodeRules) {
    let mut at = 0;
    while at < batch.len() {
        let bytes = &batch[at..];
        let msg = match <NetlinkMessage<NetfilterMessage>>::deserialize(bytes) {
            Ok(m) => m,
            Err(e) => {
                debug!("nflog: undecodable message: {e}");
                break;
            }
        };
        let len = msg.header.length as usize;
        if let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
            ..
        }) = &msg.payload
        {
            if let Some(event) = packet_event(hub, rules, nlas) {
                hub.publish(event);
            }
        }
        if len == 0 {
            break;
        }
        at += (len + 3) & !3;
    }
}

fn packet_event(hub: &EventHub, rules: &NodeRules, nlas: &[PacketNla]) -> Option<FlowEvent> {
    let mut rule = None;
    let mut header = None;
    for nla in nlas {
        match nla {
            PacketNla::Prefix(p) => rule = drop_rule_of(p.as_bytes()),
            PacketNla::Payload(p) => header = parse_packet(p),
            _ => {}
        }
    }
    Some(drop_event(hub, rules, rule?, &header?))
}

#[cfg(test)]
mod tests {
    use super::super::events::render_line;
    use super::*;

    fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn parses_ipv4_and_ipv6_headers() {
        let p = ipv4_tcp([198, 19, 1, 2], [198, 18, 100, 11], 40000, 80);
        assert_eq!(
            parse_packet(&p),
            Some(PacketHeader {
                src: "198.19.1.2".parse().unwrap(),
                dst: "198.18.100.11".parse().unwrap(),
                protocol: 6,
                ports: Some((40000, 80)),
            })
        );
        // a later fragment carries no ports
        let mut frag = p.clone();
        frag[7] = 10;
        assert_eq!(parse_packet(&frag).unwrap().ports, None);
        // ICMP: no ports
        let mut icmp = p.clone();
        icmp[9] = 1;
        assert_eq!(parse_packet(&icmp).unwrap().ports, None);
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[6] = 17;
        v6[23] = 1;
        v6[39] = 2;
        v6[40..42].copy_from_slice(&53u16.to_be_bytes());
        v6[42..44].copy_from_slice(&5353u16.to_be_bytes());
        let h = parse_packet(&v6).unwrap();
        assert_eq!(
            (h.src, h.dst, h.protocol, h.ports),
            (
                "::1".parse().unwrap(),
                "::2".parse().unwrap(),
                17,
                Some((53, 5353))
            )
        );
    }

    #[test]
    fn bad_packets_are_refused_without_a_panic() {
        assert_eq!(parse_packet(&[]), None);
        assert_eq!(parse_packet(&[0x45; 19]), None);
        assert_eq!(parse_packet(&[0x41; 40]), None, "IHL below 5");
        assert_eq!(parse_packet(&[0x60; 39]), None);
        assert_eq!(parse_packet(&[0x20; 60]), None);
        // a header length past the copy: no ports, no panic
        let mut p = ipv4_tcp([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
        p[0] = 0x4f;
        assert_eq!(parse_packet(&p).unwrap().ports, None);
        for len in 0..60 {
            for first in [0x45u8, 0x4f, 0x60] {
                let mut p = vec![0xffu8; len];
                if let Some(b) = p.first_mut() {
                    *b = first;
                }
                let _ = parse_packet(&p);
            }
        }
    }

    #[test]
    fn the_prefix_names_the_rule() {
        let cases: [(&[u8], Option<DropRule>); 12] = [
            (
                b"meshward-drop egress",
                Some(DropRule::Policy(Direction::Egress)),
            ),
            (
                b"meshward-drop ingress\0",
                Some(DropRule::Policy(Direction::Ingress)),
            ),
            (b"meshward-drop dns-proxy", Some(DropRule::DnsProxy)),
            (b"meshward-drop dns-proxy \0", Some(DropRule::DnsProxy)),
            (
                b"meshward-drop l7-proxy egress",
                Some(DropRule::L7Proxy(Direction::Egress)),
            ),
            (
                b"meshward-drop l7-proxy ingress\0",
                Some(DropRule::L7Proxy(Direction::Ingress)),
            ),
            (b"meshward-drop l7-proxy", None),
            (b"meshward-drop l7-proxyegress", None),
            (b"meshward-drop l7-proxy sideways", None),
            (b"meshward-drop dns-proxy egress", None),
            (b"something else", None),
            (&[0xff, 0xfe], None),
        ];
        for (prefix, rule) in cases {
            assert_eq!(
                drop_rule_of(prefix),
                rule,
                "{:?}",
                String::from_utf8_lossy(prefix)
            );
        }
    }

    /// Every log prefix the layout writes is one this listener reads.
    #[test]
    fn every_prefix_of_the_ruleset_is_understood() {
        let text = meshward_egress::layout::structure_ruleset(
            &meshward_egress::layout::Structure {
                nflog_group: 109,
                dns_proxy_port: Some(53),
                l7_proxy_port: Some(15001),
                tproxy_mark: 0x40_0000,
            },
            &Default::default(),
        );
        let mut seen = Vec::new();
        for part in text.split("log prefix \"").skip(1) {
            let prefix = part.split('"').next().unwrap();
            let rule = drop_rule_of(prefix.as_bytes())
                .unwrap_or_else(|| panic!("{prefix:?} not understood"));
            if !seen.contains(&rule) {
                seen.push(rule);
            }
        }
        assert_eq!(seen.len(), 5, "{seen:?}");
    }

    fn policy(name: &str) -> PolicyRef {
        PolicyRef {
            kind: meshward_policy::PolicyKind::MeshNetworkPolicy,
            namespace: "default".into(),
            name: name.into(),
        }
    }

    /// A pod (198.19.1.2) with DNS rules from two policies and egress L7
    /// rules on port 80 from one of them.
    fn proxied_pod() -> NodeRules {
        use meshward_policy::{
            DirectionRules, DnsAllow, DnsRules, EndpointRules, L4Protocol, L7Allow, L7Rule, PodRef,
            PortMatch,
        };
        let pod = PodRef {
            namespace: "default".into(),
            name: "client".into(),
        };
        let dns = |p: &str| DnsAllow {
            servers: vec!["198.18.100.53/32".parse().unwrap()],
            ports: vec![PortMatch::single(L4Protocol::Udp, 53)],
            names: None,
            policy: policy(p),
        };
        let l7 = |port: u16, p: &str| L7Allow {
            nets: vec!["198.18.100.0/24".parse().unwrap()],
            fqdns: Vec::new(),
            port,
            rule: L7Rule::AllowAll,
            policy: policy(p),
        };
        let egress = DirectionRules {
            policies: vec![policy("web"), policy("other")],
            allow: Vec::new(),
            fqdn: Vec::new(),
            l7: vec![l7(80, "web"), l7(80, "web"), l7(8080, "other")],
        };
        let mut endpoints = std::collections::BTreeMap::new();
        endpoints.insert(
            pod.clone(),
            EndpointRules {
                pod,
                ips: vec!["198.19.1.2".parse().unwrap()],
                egress: Some(Arc::new(egress)),
                ingress: None,
                dns: Some(Arc::new(DnsRules {
                    allow: vec![dns("dns"), dns("web"), dns("dns")],
                })),
            },
        );
        NodeRules { endpoints }
    }

    #[test]
    fn fail_closed_drops_become_dns_and_l7_events() {
        let hub = EventHub::new("node1", 16);
        let rules = proxied_pod();
        let p = parse_packet(&ipv4_tcp([198, 19, 1, 2], [198, 18, 100, 11], 40000, 80)).unwrap();
        let e = drop_event(&hub, &rules, DropRule::L7Proxy(Direction::Egress), &p);
        assert_eq!((e.kind, e.verdict), (FlowType::L7, Verdict::Dropped));
        assert_eq!(e.direction.as_deref(), Some("egress"));
        assert_eq!(e.protocol.as_deref(), Some("TCP"));
        assert_eq!(e.destination.as_ref().and_then(|d| d.port), Some(80));
        assert_eq!(e.policies, vec![policy("web").to_string()]);
        assert_eq!(
            e.reason.as_deref(),
            Some("no L7 proxy socket on the node took it (the proxy not listening on IPv4, or restarting): connection reset")
        );
        // A port without L7 rules of its own (the policy changed since):
        // no policy named, the reason stays.
        let p8 = parse_packet(&ipv4_tcp([198, 19, 1, 2], [198, 18, 100, 11], 40000, 81)).unwrap();
        let e = drop_event(&hub, &rules, DropRule::L7Proxy(Direction::Egress), &p8);
        assert!(e.policies.is_empty(), "{:?}", e.policies);
        assert!(e.reason.unwrap().starts_with("no L7 proxy socket"));

        let mut udp = ipv4_tcp([198, 19, 1, 2], [198, 18, 100, 53], 40000, 53);
        udp[9] = 17;
        let q = parse_packet(&udp).unwrap();
        let e = drop_event(&hub, &rules, DropRule::DnsProxy, &q);
        assert_eq!((e.kind, e.verdict), (FlowType::Dns, Verdict::Dropped));
        assert_eq!(e.direction.as_deref(), Some("egress"));
        assert_eq!(e.protocol.as_deref(), Some("UDP"));
        assert_eq!(
            e.policies,
            vec![policy("dns").to_string(), policy("web").to_string()]
        );
        assert_eq!(
            e.reason.as_deref(),
            Some("no DNS proxy socket on the node took it (the proxy not listening on IPv4, or restarting): dropped")
        );
        let line = render_line(&e, false);
        assert!(
            line.contains("DROPPED dns 198.19.1.2 -> 198.18.100.53:53/UDP egress"),
            "{line}"
        );
        // An ingress L7 port: the destination is the local pod.
        let inbound =
            parse_packet(&ipv4_tcp([198, 18, 100, 11], [198, 19, 1, 2], 40000, 80)).unwrap();
        let e = drop_event(
            &hub,
            &rules,
            DropRule::L7Proxy(Direction::Ingress),
            &inbound,
        );
        assert_eq!(e.direction.as_deref(), Some("ingress"));
        assert!(e.policies.is_empty(), "no ingress rules");
        // Policy drops as before.
        let e = drop_event(&hub, &rules, DropRule::Policy(Direction::Egress), &p);
        assert_eq!(e.kind, FlowType::L4);
        assert_eq!(e.reason.as_deref(), Some("no egress rule allows it"));
        assert_eq!(e.policies.len(), 2);
    }

    /// The kernel's side, through a real nflog socket: with the DNS and L7
    /// redirects installed and no proxy socket, a pod's UDP query is
    /// dropped, its TCP query and L7 connection are refused at once
    /// (reset), and each comes back from the group as a `dropped` event.
    #[test]
    fn the_kernel_logs_fail_closed_verdicts_to_the_group() {
        use meshward_egress::{PolicyConfig, PolicyState, PolicyTables};
        use meshward_testkit::{veth, Netns};
        use std::io::ErrorKind;
        use std::net::{SocketAddr, TcpStream, UdpSocket};
        use std::time::{Duration, Instant};

        const GROUP: u16 = 7;
        let pod = Netns::new("p");
        let node = Netns::new("n");
        veth(
            &pod,
            "eth0",
            "198.19.1.2/24",
            &node,
            "pod0",
            "198.19.1.1/24",
        );
        pod.ip(&["route", "add", "default", "via", "198.19.1.1"]);
        let rules = proxied_pod();
        let mut tables = node
            .run(|| {
                PolicyTables::new(PolicyConfig {
                    nflog_group: GROUP,
                    dns_proxy_port: Some(15353),
                    l7_proxy_port: Some(15001),
                    ..PolicyConfig::default()
                })
            })
            .expect("meshward's tables");
        tables
            .apply_policy(&PolicyState {
                rules: rules.clone(),
                fqdn: Vec::new(),
            })
            .expect("apply");
        let socket = node.run(|| bind(GROUP)).expect("bind the nflog group");
        socket.set_non_blocking(true).unwrap();

        let dns: SocketAddr = "198.18.100.53:53".parse().unwrap();
        let web: SocketAddr = "198.18.100.11:80".parse().unwrap();
        pod.run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(b"query", dns).unwrap();
        });
        for dst in [dns, web] {
            let connect = pod.run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)));
            assert_eq!(
                connect.map(drop).map_err(|e| e.kind()),
                Err(ErrorKind::ConnectionRefused),
                "{dst}"
            );
        }

        let hub = EventHub::new("node1", 64);
        let mut buf = vec![0u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(10);
        let summary = |hub: &EventHub| {
            let mut seen: Vec<(FlowType, String, u16)> = hub
                .recent(&super::super::events::Filter::default(), 64)
                .iter()
                .map(|e| {
                    (
                        e.kind,
                        e.protocol.clone().unwrap_or_default(),
                        e.destination.as_ref().and_then(|d| d.port).unwrap_or(0),
                    )
                })
                .collect();
            seen.sort_by_key(|(k, p, port)| (format!("{k:?}"), p.clone(), *port));
            seen.dedup();
            seen
        };
        let want = vec![
            (FlowType::Dns, "TCP".to_string(), 53),
            (FlowType::Dns, "UDP".to_string(), 53),
            (FlowType::L7, "TCP".to_string(), 80),
        ];
        while summary(&hub) != want {
            assert!(
                Instant::now() < deadline,
                "events so far: {:?}",
                summary(&hub)
            );
            match socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => handle_batch(&buf[..n], &hub, &rules),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("nflog recv: {e}"),
            }
        }
        let events = hub.recent(&super::super::events::Filter::default(), 64);
        assert!(events.iter().all(|e| e.verdict == Verdict::Dropped));
        for e in &events {
            let reason = e.reason.as_deref().unwrap_or_default();
            let how = if e.protocol.as_deref() == Some("TCP") {
                "connection reset"
            } else {
                "dropped"
            };
            assert!(reason.ends_with(how), "{e:?}");
            assert_eq!(
                e.source.as_ref().map(|s| s.ip.as_str()),
                Some("198.19.1.2"),
                "{e:?}"
            );
        }
    }
}
