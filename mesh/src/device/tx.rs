//! TUN → UDP: read what the TUN has (super-packets split by tun-rs), seal
//! every packet into one contiguous buffer, and send runs of equal-size
//! datagrams to the same peer as single UDP GSO sends.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsFd;

use tun_rs::{SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::rx::Step;
use super::udp::{max_batch_bytes, Udp};
use super::wake::Wait;
use super::{Backoff, Counters, Shared};
use crate::{Outbound, DATA_OVERHEAD};

/// Packet slots per batch. Every read is given at least `IDEAL_BATCH_SIZE`
/// (128) free slots, enough for a 64 KiB super-packet down to an MSS of
/// about 512 (one with more segments is dropped by tun-rs, as by
/// wireguard-go); a batch holds up to three 1400-MSS super-packets or 256
/// small packets.
const SLOTS: usize = 2 * IDEAL_BATCH_SIZE;
/// A slot holds any packet the TUN can hand over, even after an MTU raise.
const SLOT_LEN: usize = 65535;

/// A worker that only moves TUN → UDP (queue `queue`).
pub(crate) fn run(shared: &Shared, queue: usize) {
    let Some(tun) = shared.tun.queues.get(queue) else {
        return;
    };
    let udp = &shared.sockets[queue % shared.sockets.len()];
    let counters = &shared.counters[queue];
    let mut sender = Sender::new(shared.mtu);
    let readable = shared.stop.readable(&[tun.as_fd()]);
    loop {
        match sender.step(shared, tun, udp, counters) {
            Step::Worked => {}
            Step::Stop => return,
            Step::Dry => {
                let stop = if sender.backoff.failing() {
                    shared.stop.sleep(sender.backoff.next())
                } else {
                    readable.wait() == Wait::Stop
                };
                if stop {
                    return;
                }
            }
        }
    }
}

/// The TUN → UDP direction of one worker: its buffers and state.
pub(crate) struct Sender {
    worker: Worker,
    pub backoff: Backoff,
}

impl Sender {
    pub fn new(mtu: u16) -> Sender {
        Sender {
            worker: Worker {
                original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
                slots: (0..SLOTS).map(|_| vec![0u8; SLOT_LEN]).collect(),
                sizes: vec![0; SLOTS],
                sealed: vec![0u8; SLOTS * (usize::from(mtu) + DATA_OVERHEAD) + 148],
                datagrams: Vec::with_capacity(SLOTS),
            },
            backoff: Backoff::default(),
        }
    }

    /// Reads what the TUN has (up to a batch), seals and sends it.
    pub fn step(
        &mut self,
        shared: &Shared,
        tun: &SyncDevice,
        udp: &Udp,
        counters: &Counters,
    ) -> Step {
        if shared.stop.stopped() {
            return Step::Stop;
        }
        let read = self.worker.read(shared, tun, counters, &mut self.backoff);
        if read == 0 {
            return Step::Dry;
        }
        if self.worker.seal_and_send(shared, udp, counters, read) {
            Step::Worked
        } else {
            Step::Stop
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

/// Sends the datagrams, one `sendmsg` per GSO run. False when the device stops.
fn send_runs(
    shared: &Shared,
    udp: &Udp,
    counters: &Counters,
    sealed: &[u8],
    datagrams: &[(SocketAddr, Range<usize>)],
) -> bool {
    let mut sends = 0;
    for run in gso_runs(datagrams, udp.max_segments()) {
        if !udp.send(
            run.to,
            &sealed[run.bytes.clone()],
            run.segment,
            &shared.stop,
            &shared.log,
        ) {
            return false;
        }
        sends += 1;
    }
    counters.add(&counters.udp_sends, sends);
    counters.add(&counters.udp_datagrams_sent, datagrams.len() as u64);
    true
}

/// Datagrams one UDP GSO send carries.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    to: SocketAddr,
    bytes: Range<usize>,
    /// The segment size when the run holds more than one datagram.
    segment: Option<usize>,
}

/// Groups back-to-back datagrams into GSO runs: consecutive, same
/// destination, same size (the last may be shorter, as GSO allows), at most
/// `max_segments` of them and at most one IP datagram's worth of bytes.
fn gso_runs(
    datagrams: &[(SocketAddr, Range<usize>)],
    max_segments: usize,
) -> impl Iterator<Item = Run> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let (to, first) = datagrams.get(i)?;
        let segment = first.len();
        let limit = max_batch_bytes(to);
        let mut end = first.end;
        let mut j = i + 1;
        while j < datagrams.len() && j - i < max_segments.max(1) {
            let (next_to, next) = &datagrams[j];
            if next_to != to
                || next.start != end
                || next.len() > segment
                || next.is_empty()
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
        let run = Run {
            to: *to,
            bytes: first.start..end,
            segment: (j - i > 1).then_some(segment),
        };
        i = j;
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, n], 51871))
    }

    /// Back-to-back datagrams of these (destination, size).
    fn layout(spec: &[(u8, usize)]) -> Vec<(SocketAddr, Range<usize>)> {
        let mut pos = 0;
        spec.iter()
            .map(|(n, len)| {
                let range = pos..pos + len;
                pos += len;
                (addr(*n), range)
            })
            .collect()
    }

    fn runs(spec: &[(u8, usize)], max: usize) -> Vec<(u8, usize, Option<usize>)> {
        gso_runs(&layout(spec), max)
            .map(|run| {
                let SocketAddr::V4(v4) = run.to else { panic!() };
                (v4.ip().octets()[3], run.bytes.len(), run.segment)
            })
            .collect()
    }

    #[test]
    fn equal_sizes_to_one_peer_make_one_run_with_a_shorter_tail() {
        assert_eq!(
            runs(&[(2, 1452), (2, 1452), (2, 1452), (2, 500)], 64),
            vec![(2, 3 * 1452 + 500, Some(1452))]
        );
    }

    #[test]
    fn a_shorter_datagram_ends_the_run_and_a_longer_one_starts_a_new_one() {
        assert_eq!(
            runs(&[(2, 100), (2, 60), (2, 100), (2, 148), (2, 148)], 64),
            vec![(2, 160, Some(100)), (2, 100, None), (2, 296, Some(148))]
        );
    }

    #[test]
    fn a_new_destination_starts_a_new_run() {
        assert_eq!(
            runs(&[(2, 80), (3, 80), (3, 80), (2, 80)], 64),
            vec![(2, 80, None), (3, 160, Some(80)), (2, 80, None)]
        );
    }

    #[test]
    fn runs_stop_at_the_segment_count_and_at_64_kib() {
        assert_eq!(
            runs(&[(2, 10); 5], 2),
            vec![(2, 20, Some(10)), (2, 20, Some(10)), (2, 10, None)]
        );
        // 45 full datagrams fit in one IPv4 datagram, the 46th does not.
        let spec = vec![(2u8, 1452usize); 46];
        assert_eq!(
            runs(&spec, 64),
            vec![(2, 45 * 1452, Some(1452)), (2, 1452, None)]
        );
        // Without GSO every datagram goes alone.
        assert_eq!(runs(&[(2, 10); 3], 1).len(), 3);
    }

    #[test]
    fn gaps_split_runs() {
        let datagrams = vec![(addr(2), 0..10), (addr(2), 20..30)];
        assert_eq!(gso_runs(&datagrams, 64).count(), 2);
    }
}
