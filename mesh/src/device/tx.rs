//! TUN → UDP: read what the TUN has (super-packets split by tun-rs), seal
//! every packet into one contiguous buffer, and send runs of equal-size
//! datagrams to the same peer as single UDP GSO sends.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsFd;

use nix::poll::PollFlags;
use tun_rs::{SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::udp::{max_batch_bytes, Udp};
use super::wake::Wait;
use super::{Backoff, Counters, Shared};
use crate::{Outbound, DATA_OVERHEAD};

/// Packet slots per batch. Every read is given at least `IDEAL_BATCH_SIZE`
/// free slots (the most segments tun-rs splits one super-packet into), so a
/// batch holds one to two super-packets or up to 256 small packets.
const SLOTS: usize = 2 * IDEAL_BATCH_SIZE;
/// A slot holds any packet the TUN can hand over, even after an MTU raise.
const SLOT_LEN: usize = 65535;

pub(crate) fn run(shared: &Shared, queue: usize) {
    let Some(tun) = shared.tun.queues.get(queue) else {
        return;
    };
    let udp = &shared.sockets[queue % shared.sockets.len()];
    let counters = &shared.counters[queue];
    let mut worker = Worker {
        original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
        slots: (0..SLOTS).map(|_| vec![0u8; SLOT_LEN]).collect(),
        sizes: vec![0; SLOTS],
        sealed: vec![0u8; SLOTS * (usize::from(shared.mtu) + DATA_OVERHEAD) + 148],
        datagrams: Vec::with_capacity(SLOTS),
    };
    let mut backoff = Backoff::default();
    while !shared.stop.stopped() {
        let read = worker.read(shared, tun, counters, &mut backoff);
        if read == 0 {
            if backoff.failing() {
                if shared.stop.sleep(backoff.next()) {
                    return;
                }
            } else if shared.stop.wait(tun.as_fd(), PollFlags::POLLIN, None) == Wait::Stop {
                return;
            }
            continue;
        }
        if !worker.seal_and_send(shared, udp, counters, read) {
            return;
        }
    }
}

struct Worker {
    /// Raw read: virtio-net header plus up to a 64 KiB super-packet.
    original: Vec<u8>,
    slots: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Sealed datagrams back to back: a run of them is one GSO send.
    sealed: Vec<u8>,
    datagrams: Vec<(SocketAddr, Range<usize>)>,
}

impl Worker {
    /// Reads until the TUN is dry or the slots are full; returns how many
    /// packets sit in the slots.
    fn read(
        &mut self,
        shared: &Shared,
        tun: &SyncDevice,
        counters: &Counters,
        backoff: &mut Backoff,
    ) -> usize {
        let mut count = 0;
        while count + IDEAL_BATCH_SIZE <= SLOTS {
            match tun.recv_multiple(
                &mut self.original,
                &mut self.slots[count..],
                &mut self.sizes[count..],
                0,
            ) {
                Ok(n) => {
                    count += n;
                    counters.add(&counters.tun_reads, 1);
                    backoff.reset();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A packet tun-rs could not split (dropped), or the
                    // device failing: keep what was read, back off if it repeats.
                    shared.log.error("tun read", &e, None);
                    counters.add(&counters.errors, 1);
                    backoff.fail();
                    break;
                }
            }
        }
        counters.add(&counters.tun_packets_read, count as u64);
        count
    }

    /// Seals `count` packets and sends them; false when the device stops.
    fn seal_and_send(
        &mut self,
        shared: &Shared,
        udp: &Udp,
        counters: &Counters,
        count: usize,
    ) -> bool {
        self.datagrams.clear();
        let mut pos = 0;
        for i in 0..count {
            let Some(packet) = self.slots[i].get(..self.sizes[i]) else {
                continue;
            };
            let need = (packet.len() + DATA_OVERHEAD).max(148);
            if pos + need > self.sealed.len() {
                if !send_runs(shared, udp, counters, &self.sealed, &self.datagrams) {
                    return false;
                }
                self.datagrams.clear();
                pos = 0;
                if need > self.sealed.len() {
                    continue;
                }
            }
            let base = self.sealed.as_ptr() as usize;
            let (to, start, len) = match shared
                .mesh
                .outbound(packet, &mut self.sealed[pos..pos + need])
            {
                Outbound::Send { to, datagram } => (
                    to,
                    (datagram.as_ptr() as usize).wrapping_sub(base),
                    datagram.len(),
                ),
                Outbound::Queued | Outbound::Drop(_) => continue,
            };
            if start
                .checked_add(len)
                .is_none_or(|end| end > self.sealed.len())
            {
                continue;
            }
            // boringtun writes at the start of the buffer it is given; move
            // it there should that ever change.
            if start != pos {
                self.sealed.copy_within(start..start + len, pos);
            }
            self.datagrams.push((to, pos..pos + len));
            pos += len;
        }
        send_runs(shared, udp, counters, &self.sealed, &self.datagrams)
    }
}

/// Sends the datagrams, coalescing each run of consecutive datagrams to the
/// same destination, of the same size (the last may be shorter), into one
/// GSO send. False when the device stops.
fn send_runs(
    shared: &Shared,
    udp: &Udp,
    counters: &Counters,
    sealed: &[u8],
    datagrams: &[(SocketAddr, Range<usize>)],
) -> bool {
    let max_segments = udp.max_segments();
    let mut i = 0;
    let mut sends = 0;
    while i < datagrams.len() {
        let (to, first) = &datagrams[i];
        let segment = first.len();
        let limit = max_batch_bytes(to);
        let mut end = first.end;
        let mut j = i + 1;
        while j < datagrams.len() && j - i < max_segments {
            let (next_to, next) = &datagrams[j];
            if next_to != to
                || next.start != end
                || next.len() > segment
                || next.end - first.start > limit
            {
                break;
            }
            end = next.end;
            j += 1;
            if next.len() < segment {
                break;
            }
        }
        let segments = j - i;
        if !udp.send(
            *to,
            &sealed[first.start..end],
            (segments > 1).then_some(segment),
            &shared.stop,
            &shared.log,
        ) {
            return false;
        }
        sends += 1;
        i = j;
    }
    counters.add(&counters.udp_sends, sends);
    counters.add(&counters.udp_datagrams_sent, datagrams.len() as u64);
    true
}
