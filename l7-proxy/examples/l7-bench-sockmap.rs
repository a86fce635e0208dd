//! bench/l7-proxy's socket-redirect prototype (MW_BENCH_SOCKMAP=1):
//! `l7-bench-sockmap OBJECT CGROUP` loads l7-proxy/bpf/bench_local_redirect.bpf.c
//! (built by the script with clang), attaches its sockops program to the
//! cgroup (v2) and its sk_msg program to the sockhash, prints `attached`
//! and keeps them until killed (the links go with the process).

use aya::maps::{MapData, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use aya::Ebpf;

/// `struct sock_key` of the C program.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockKey {
    local_ip: u32,
    remote_ip: u32,
    local_port: u32,
    remote_port: u32,
}

// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for SockKey {}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(object), Some(cgroup)) = (args.next(), args.next()) else {
        return Err("usage: l7-bench-sockmap OBJECT CGROUP".into());
    };
    let mut bpf = Ebpf::load_file(&object)?;
    let socks: SockHash<MapData, SockKey> = bpf
        .take_map("local_socks")
        .ok_or("no map local_socks")?
        .try_into()?;
    let socks_fd = socks.fd().try_clone()?;
    let redirect: &mut SkMsg = bpf
        .program_mut("local_redirect")
        .ok_or("no program local_redirect")?
        .try_into()?;
    redirect.load()?;
    redirect.attach(&socks_fd)?;
    let sockops: &mut SockOps = bpf
        .program_mut("local_sockops")
        .ok_or("no program local_sockops")?
        .try_into()?;
    sockops.load()?;
    sockops.attach(std::fs::File::open(&cgroup)?, CgroupAttachMode::Single)?;
    println!("attached");
    loop {
        std::thread::park();
    }
}
