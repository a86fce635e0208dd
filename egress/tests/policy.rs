//! The policy back end in a real kernel: real packets between pod
//! namespaces and an external namespace, forwarded by a node namespace.

mod common;

use std::time::Duration;

use common::*;
use meshward_egress::{
    apply_strict, Direction, FqdnElement, PolicyConfig, PolicyTables, StrictMode, STRICT_CHAIN,
    TABLE,
};
use meshward_policy::{L4Protocol, PortMatch};

const LIFE: Duration = Duration::from_secs(120);

fn tcp(port: u16) -> PortMatch {
    PortMatch::single(L4Protocol::Tcp, port)
}

fn tables(lab: &Lab) -> PolicyTables {
    lab.node
        .run(|| PolicyTables::new(PolicyConfig::default()))
        .expect("install policy tables")
}

#[test]
fn policy_allows_exactly_what_it_says_and_counts_drops() {
    let lab = Lab::new(&["198.19.1.2", "198.19.1.3", "198.19.1.4"]);
    tcp_echo(&lab.ext, &format!("{EXT}:80"), LIFE);
    tcp_echo(&lab.ext, &format!("{EXT}:81"), LIFE);
    tcp_echo(lab.pod(1), "198.19.1.3:8080", LIFE);
    tcp_echo(lab.pod(1), "198.19.1.3:8081", LIFE);
    let sink = udp_sink(&lab.ext, &format!("{EXT2}:1500"));
    let sink_far = udp_sink(&lab.ext, &format!("{EXT2}:2500"));
    // the range's edges: single ports (1000, 2000), the last port of a
    // 64-port block (1983), and just past the range (2001)
    let sink_edges: Vec<_> = [1000, 1983, 2000, 2001]
        .iter()
        .map(|port| udp_sink(&lab.ext, &format!("{EXT2}:{port}")))
        .collect();

    // Strict mode first, as the agent does; the policy shares its table.
    lab.node
        .run(|| {
            apply_strict(&StrictMode {
                tunnel_ifname: "mw0".into(),
                local_pod_cidrs: vec!["198.19.1.0/24".parse().unwrap()],
                remote_pod_cidrs: vec!["198.19.0.0/16".parse().unwrap()],
            })
        })
        .unwrap();
    let mut t = tables(&lab);
    let (a, b, c) = (lab.ip(0), lab.ip(1), lab.ip(2));
    let udp_range = PortMatch::Ports {
        protocol: L4Protocol::Udp,
        first: 1000,
        last: 2000,
    };
    t.apply_policy(&state(vec![
        // a: TCP 80 to one external host, a UDP port range to a /30, all of b.
        Ep {
            ip: a,
            egress: Some(rules(vec![
                allow(&[&format!("{EXT}/32")], &[tcp(80)]),
                allow(&["198.18.100.0/30"], &[udp_range]),
                allow(&["198.19.1.3/32"], &[PortMatch::Any]),
            ])),
            ingress: None,
            dns: false,
        },
        // b: only a, only TCP 8080.
        Ep {
            ip: b,
            egress: None,
            ingress: Some(rules(vec![allow(&["198.19.1.2/32"], &[tcp(8080)])])),
            dns: false,
        },
    ]))
    .expect("apply policy");

    assert!(
        tcp_works(lab.pod(0), &format!("{EXT}:80")),
        "allowed TCP 80"
    );
    assert!(
        !tcp_works(lab.pod(0), &format!("{EXT}:81")),
        "TCP 81 not allowed"
    );
    assert!(
        udp_passes(lab.pod(0), &sink, &format!("{EXT2}:1500")),
        "UDP in range"
    );
    assert!(
        !udp_passes(lab.pod(0), &sink_far, &format!("{EXT2}:2500")),
        "UDP out of range"
    );
    for (sink, (port, inside)) in
        sink_edges
            .iter()
            .zip([(1000, true), (1983, true), (2000, true), (2001, false)])
    {
        assert_eq!(
            udp_passes(lab.pod(0), sink, &format!("{EXT2}:{port}")),
            inside,
            "UDP to {port}"
        );
    }
    assert!(!lab.pod(0).ping(EXT), "ICMP not allowed to external");
    assert!(tcp_works(lab.pod(0), "198.19.1.3:8080"), "a -> b:8080");
    assert!(
        !tcp_works(lab.pod(0), "198.19.1.3:8081"),
        "b's ingress refuses 8081"
    );
    assert!(!lab.pod(0).ping("198.19.1.3"), "b's ingress refuses ICMP");
    assert!(
        !tcp_works(lab.pod(2), "198.19.1.3:8080"),
        "c is not allowed into b"
    );
    // c is not isolated: it reaches everything b's ingress does not guard.
    assert!(tcp_works(lab.pod(2), &format!("{EXT}:81")));
    assert!(lab.pod(2).ping(EXT));
    // Strict mode kept its own chain.
    assert!(lab
        .nft(&["list", "chain", "inet", TABLE, STRICT_CHAIN])
        .contains("drop"));

    let counts = t.drop_counters().unwrap();
    let of = |ip, dir| {
        counts
            .iter()
            .find(|d| d.ip == ip && d.direction == dir)
            .map_or(0, |d| d.packets)
    };
    assert!(of(a, Direction::Egress) >= 3, "{counts:?}");
    assert!(of(b, Direction::Ingress) >= 3, "{counts:?}");
    assert_eq!(of(c, Direction::Egress), 0, "{counts:?}");

    // Lifting the isolation opens everything again (empty sets).
    t.apply_policy(&state(vec![])).unwrap();
    assert!(tcp_works(lab.pod(0), &format!("{EXT}:81")));
    assert!(tcp_works(lab.pod(2), "198.19.1.3:8081"));
}

#[test]
fn established_flows_survive_reapply_and_a_restarted_agent() {
    let lab = Lab::new(&["198.19.1.2"]);
    tcp_echo(&lab.ext, &format!("{EXT}:80"), LIFE);
    let a = lab.ip(0);
    let allowed = || {
        state(vec![Ep {
            ip: a,
            egress: Some(rules(vec![allow(&[&format!("{EXT}/32")], &[tcp(80)])])),
            ingress: None,
            dns: false,
        }])
    };
    let closed = || {
        state(vec![Ep {
            ip: a,
            egress: Some(rules(vec![])),
            ingress: None,
            dns: false,
        }])
    };
    let mut t = tables(&lab);
    t.apply_policy(&allowed()).unwrap();
    let mut conn = tcp_open(lab.pod(0), &format!("{EXT}:80"));

    // Same policy again: nothing changes, the flow goes on.
    t.apply_policy(&allowed()).unwrap();
    assert!(echo(&mut conn));
    // A policy that no longer allows it: new flows are dropped, the
    // established one carries on (accepted before any set is consulted).
    t.apply_policy(&closed()).unwrap();
    assert!(echo(&mut conn), "established flow cut by a re-apply");
    assert!(!tcp_works(lab.pod(0), &format!("{EXT}:80")));

    // The agent dies (kill -9: nothing cleaned up) and a new one starts
    // from scratch: structure re-installed, sets flushed and refilled.
    drop(t);
    let mut t = tables(&lab);
    assert!(
        echo(&mut conn),
        "flow cut while the new agent installed its tables"
    );
    t.apply_policy(&allowed()).unwrap();
    assert!(echo(&mut conn), "flow cut by the reconciling apply");
    assert!(tcp_works(lab.pod(0), &format!("{EXT}:80")));
    // Only one copy of every rule after the restart.
    let chain = lab.nft(&["list", "chain", "inet", TABLE, "policy_forward"]);
    assert_eq!(chain.matches("established").count(), 1, "{chain}");
}

#[test]
fn reconcile_replaces_what_a_predecessor_left() {
    let lab = Lab::new(&["198.19.1.2"]);
    tcp_echo(&lab.ext, &format!("{EXT}:81"), LIFE);
    let a = lab.ip(0);
    let mut t = tables(&lab);
    t.apply_policy(&state(vec![Ep {
        ip: a,
        egress: Some(rules(vec![allow(&[&format!("{EXT}/32")], &[tcp(81)])])),
        ingress: None,
        dns: false,
    }]))
    .unwrap();
    t.add_fqdn(&[FqdnElement {
        src: a,
        dst: EXT2.parse().unwrap(),
        ports: tcp(81),
        timeout: Duration::from_secs(600),
    }])
    .unwrap();
    drop(t);
    // The successor knows nothing of 81 or the learned peer: its first
    // apply flushes them.
    let mut t = tables(&lab);
    t.apply_policy(&state(vec![Ep {
        ip: a,
        egress: Some(rules(vec![])),
        ingress: None,
        dns: false,
    }]))
    .unwrap();
    assert!(!tcp_works(lab.pod(0), &format!("{EXT}:81")));
    assert!(!lab
        .set_listing("egress4_fqdn_port")
        .contains("198.18.100.2"));
    assert!(!lab.set_listing("egress4_port").contains("198.18.100.1"));
}

#[test]
fn learned_peers_allow_until_they_expire_and_ranges_stay_disjoint() {
    let lab = Lab::new(&["198.19.1.2"]);
    for port in [80, 85, 95, 150] {
        tcp_echo(&lab.ext, &format!("{EXT}:{port}"), LIFE);
    }
    tcp_echo(&lab.ext, &format!("{EXT2}:443"), LIFE);
    let a = lab.ip(0);
    let ext = EXT.parse().unwrap();
    let mut t = tables(&lab);
    t.apply_policy(&state(vec![Ep {
        ip: a,
        egress: Some(rules(vec![])),
        ingress: None,
        dns: false,
    }]))
    .unwrap();
    assert!(!tcp_works(lab.pod(0), &format!("{EXT2}:443")));

    let learned = |dst: &str, ports, secs| FqdnElement {
        src: a,
        dst: dst.parse().unwrap(),
        ports,
        timeout: Duration::from_secs(secs),
    };
    // A short-lived exact peer, refreshed once with a longer TTL; a range
    // peer built from overlapping answers.
    t.add_fqdn(&[learned(EXT2, tcp(443), 1)]).unwrap();
    assert!(tcp_works(lab.pod(0), &format!("{EXT2}:443")));
    t.add_fqdn(&[learned(EXT2, tcp(443), 4)]).unwrap();
    // A shorter answer does not shorten it.
    t.add_fqdn(&[learned(EXT2, tcp(443), 1)]).unwrap();
    let range = |first, last| PortMatch::Ports {
        protocol: L4Protocol::Tcp,
        first,
        last,
    };
    t.add_fqdn(&[learned(EXT, range(80, 90), 600)]).unwrap();
    t.add_fqdn(&[learned(EXT, range(85, 100), 1)]).unwrap();
    t.add_fqdn(&[learned(EXT, range(60, 200), 2)]).unwrap();
    assert!(tcp_works(lab.pod(0), &format!("{EXT}:95")));
    assert!(tcp_works(lab.pod(0), &format!("{EXT}:150")));

    std::thread::sleep(Duration::from_millis(2500));
    // 443 (refreshed to 4 s) still there; 95 and 150 expired; 80-90 not.
    assert!(
        tcp_works(lab.pod(0), &format!("{EXT2}:443")),
        "refresh lost"
    );
    assert!(
        !tcp_works(lab.pod(0), &format!("{EXT}:95")),
        "range piece outlived its TTL"
    );
    assert!(!tcp_works(lab.pod(0), &format!("{EXT}:150")));
    assert!(tcp_works(lab.pod(0), &format!("{EXT}:85")));
    std::thread::sleep(Duration::from_millis(2000));
    assert!(
        !tcp_works(lab.pod(0), &format!("{EXT2}:443")),
        "learned peer never expired"
    );

    // Removing part of a range keeps the rest.
    t.remove_fqdn(&[learned(EXT, range(84, 86), 0)]).unwrap();
    assert!(!tcp_works(lab.pod(0), &format!("{EXT}:85")));
    assert!(tcp_works(lab.pod(0), &format!("{EXT}:80")));
    // Any-protocol learned peers admit ICMP too.
    assert!(!lab.pod(0).ping(EXT));
    t.add_fqdn(&[FqdnElement {
        src: a,
        dst: ext,
        ports: PortMatch::Any,
        timeout: Duration::from_secs(60),
    }])
    .unwrap();
    assert!(lab.pod(0).ping(EXT));
    t.remove_fqdn(&[FqdnElement {
        src: a,
        dst: ext,
        ports: PortMatch::Any,
        timeout: Duration::ZERO,
    }])
    .unwrap();
    assert!(!lab.pod(0).ping(EXT));
}

#[test]
fn a_hundred_thousand_learned_peers_load() {
    let lab = Lab::new(&["198.19.1.2"]);
    tcp_echo(&lab.ext, &format!("{EXT}:443"), LIFE);
    let a = lab.ip(0);
    let mut t = tables(&lab);
    let mut st = state(vec![Ep {
        ip: a,
        egress: Some(rules(vec![])),
        ingress: None,
        dns: false,
    }]);
    // 100,000 distinct addresses in 198.18.128.0/17 .. 198.19.0.0 (never
    // routed here), plus the one the pod talks to.
    st.fqdn = (0..100_000u32)
        .map(|i| FqdnElement {
            src: a,
            dst: std::net::Ipv4Addr::from(0xc612_8000 + i).into(),
            ports: tcp(443),
            timeout: Duration::from_secs(3600),
        })
        .collect();
    st.fqdn.push(FqdnElement {
        src: a,
        dst: EXT.parse().unwrap(),
        ports: tcp(443),
        timeout: Duration::from_secs(3600),
    });
    t.apply_policy(&st).expect("load 100k learned peers");
    assert!(tcp_works(lab.pod(0), &format!("{EXT}:443")));
    // Kernel's own count, through nft.
    let listing = lab.set_listing("egress4_fqdn_port");
    assert_eq!(listing.matches(" . tcp . 443").count(), 100_001);
    // And incremental adds on top stay possible.
    t.add_fqdn(&[FqdnElement {
        src: a,
        dst: "198.18.100.9".parse().unwrap(),
        ports: tcp(443),
        timeout: Duration::from_secs(60),
    }])
    .unwrap();
}

#[test]
fn ipv6_elements_are_accepted_by_the_kernel() {
    // No IPv6 traffic here: this checks that 16-byte keys, ranges and
    // timeouts are encoded as the kernel expects, by reading them back.
    let lab = Lab::new(&["198.19.1.2"]);
    let mut t = tables(&lab);
    let pod6: std::net::IpAddr = "fd00::2".parse().unwrap();
    let mut st = state(vec![Ep {
        ip: pod6,
        egress: Some(rules(vec![
            allow(&["2001:db8::1/128"], &[tcp(443)]),
            allow(
                &["2001:db8:1::/64"],
                &[PortMatch::Ports {
                    protocol: L4Protocol::Udp,
                    first: 5000,
                    last: 5100,
                }],
            ),
            allow(&["2001:db8:2::/48"], &[PortMatch::Any]),
        ])),
        ingress: Some(rules(vec![allow(&["fd00::3/128"], &[PortMatch::Any])])),
        dns: true,
    }]);
    st.fqdn.push(FqdnElement {
        src: pod6,
        dst: "2001:db8::53".parse().unwrap(),
        ports: PortMatch::Ports {
            protocol: L4Protocol::Tcp,
            first: 80,
            last: 81,
        },
        timeout: Duration::from_secs(60),
    });
    t.apply_policy(&st).expect("apply IPv6 policy");
    let listing = |set: &str| lab.set_listing(set);
    assert!(listing("egress6_isolated").contains("fd00::2"));
    assert!(listing("egress6_port").contains("fd00::2 . 2001:db8::1 . tcp . 443"));
    assert!(
        listing("egress6_range").contains("fd00::2 . 2001:db8:1::/64 . udp . 5000-5100"),
        "{}",
        listing("egress6_range")
    );
    assert!(
        listing("egress6_net_any").contains("fd00::2 . 2001:db8:2::/48"),
        "{}",
        listing("egress6_net_any")
    );
    assert!(listing("ingress6_any").contains("fd00::2 . fd00::3"));
    assert!(
        listing("egress6_fqdn_range").contains("2001:db8::53 . tcp . 80-81 timeout"),
        "{}",
        listing("egress6_fqdn_range")
    );
    assert!(listing("dns_redirect6").contains("fd00::2"));
}

#[test]
fn cidr_peers_of_several_prefix_lengths_allow_exactly_their_networks() {
    let lab = Lab::new(&["198.19.1.2", "198.19.1.3"]);
    // A second external network, outside the /24 but inside the /16.
    const FAR: &str = "198.18.101.1";
    lab.ext
        .ip(&["addr", "add", &format!("{FAR}/32"), "dev", "eth0"]);
    lab.node
        .ip(&["route", "add", &format!("{FAR}/32"), "via", EXT]);
    for port in [80, 81, 82] {
        tcp_echo(&lab.ext, &format!("{EXT}:{port}"), LIFE);
        tcp_echo(&lab.ext, &format!("{FAR}:{port}"), LIFE);
    }
    tcp_echo(lab.pod(1), "198.19.1.3:8080", LIFE);
    tcp_echo(lab.pod(1), "198.19.1.3:8081", LIFE);
    let sink = udp_sink(&lab.ext, &format!("{EXT}:1505"));
    let (a, b) = (lab.ip(0), lab.ip(1));
    let with_16 = |with: bool| {
        let mut egress = vec![
            allow(&["198.18.100.0/24"], &[tcp(80)]),
            // Egress lets a reach b on both ports; b's ingress decides.
            allow(&["198.19.1.0/28"], &[tcp(8080), tcp(8081)]),
            allow(
                &["198.18.100.0/25"],
                &[PortMatch::Ports {
                    protocol: L4Protocol::Udp,
                    first: 1500,
                    last: 1510,
                }],
            ),
        ];
        if with {
            egress.push(allow(&["198.18.0.0/16"], &[tcp(81)]));
        }
        state(vec![
            Ep {
                ip: a,
                egress: Some(rules(egress)),
                ingress: None,
                dns: false,
            },
            Ep {
                ip: b,
                egress: None,
                ingress: Some(rules(vec![allow(&["198.19.1.0/24"], &[tcp(8080)])])),
                dns: false,
            },
        ])
    };
    let mut t = tables(&lab);
    t.apply_policy(&with_16(true)).expect("apply policy");
    let chain = lab.nft(&["list", "chain", "inet", TABLE, "egress4"]);
    assert!(chain.contains("& 255.255.0.0"), "{chain}");
    assert!(chain.contains("& 255.255.255.0"), "{chain}");

    let works = |dst: &str| tcp_works(lab.pod(0), dst);
    assert!(works(&format!("{EXT}:80")), "/24, TCP 80");
    assert!(works(&format!("{EXT}:81")), "/16, TCP 81");
    assert!(works(&format!("{FAR}:81")), "/16 outside the /24, TCP 81");
    assert!(!works(&format!("{FAR}:80")), "TCP 80 only in the /24");
    assert!(!works(&format!("{EXT}:82")), "TCP 82 not allowed");
    assert!(
        udp_passes(lab.pod(0), &sink, &format!("{EXT}:1505")),
        "/25 UDP range"
    );
    assert!(!lab.pod(0).ping(EXT), "ICMP not allowed");
    assert!(
        tcp_works(lab.pod(0), "198.19.1.3:8080"),
        "ingress /24, 8080"
    );
    assert!(
        !tcp_works(lab.pod(0), "198.19.1.3:8081"),
        "ingress refuses 8081"
    );

    // A restarted agent keeps the prefix lookups until its first apply.
    drop(t);
    let mut t = tables(&lab);
    assert!(works(&format!("{FAR}:81")), "/16 lost across a restart");

    // The /16 goes: its sets and lookups go with it, the rest stays.
    t.apply_policy(&with_16(false)).expect("apply policy");
    assert!(!works(&format!("{FAR}:81")), "/16 removed");
    assert!(!works(&format!("{EXT}:81")), "/16 removed");
    assert!(works(&format!("{EXT}:80")), "/24 kept");
    let table = lab.nft(&["-t", "list", "table", "inet", TABLE]);
    assert!(!table.contains("egress4_p16"), "{table}");
    assert!(!table.contains("255.255.0.0"), "{table}");
    assert!(table.contains("egress4_p24_port"), "{table}");
    assert!(table.contains("ingress4_p24_port"), "{table}");

    // No policy: no prefix sets at all.
    t.apply_policy(&state(vec![])).unwrap();
    let table = lab.nft(&["-t", "list", "table", "inet", TABLE]);
    assert!(!table.contains("_p24_"), "{table}");
    assert!(works(&format!("{FAR}:82")));
}
