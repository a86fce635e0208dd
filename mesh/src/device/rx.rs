//! UDP → TUN: `recvmmsg` a batch (each buffer one datagram or a GRO train
//! of them), open every datagram in place into a TUN write slot, and hand
//! the slots to tun-rs's GRO table, which coalesces TCP/UDP segments of a
//! flow into super-packets so the kernel walks its stack once per 64 KiB.

use std::io::{self, IoSliceMut};
use std::os::fd::AsFd;

use quinn_udp::{RecvMeta, BATCH_SIZE};
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::udp::Udp;
use super::wake::Wait;
use super::{Backoff, Counters, Shared};
use crate::Inbound;

/// One receive buffer holds a whole GRO train (64 KiB by default; twice
/// that in case the admin raised `gro_max_size`).
const RECV_LEN: usize = 128 << 10;
/// Plaintext packets handed to the GRO table at once.
const WRITE_SLOTS: usize = IDEAL_BATCH_SIZE;
/// Where plaintext starts in a write slot: room for the virtio-net header.
const OFFSET: usize = VIRTIO_NET_HDR_LEN;

/// What one step of a direction did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Moved packets (or hit an error worth retrying at once).
    Worked,
    /// Nothing to read: wait for the descriptor (or back off after errors).
    Dry,
    /// The device is stopping.
    Stop,
}

/// The UDP → TUN direction of one worker: its buffers and state.
pub(crate) struct Receiver {
    storage: Vec<u8>,
    meta: [RecvMeta; BATCH_SIZE],
    writer: Writer,
    pub backoff: Backoff,
}

impl Receiver {
    pub fn new() -> Receiver {
        Receiver {
            storage: vec![0u8; BATCH_SIZE * RECV_LEN],
            meta: [RecvMeta::default(); BATCH_SIZE],
            writer: Writer {
                slots: (0..WRITE_SLOTS)
                    .map(|_| Vec::with_capacity(OFFSET + 65535))
                    .collect(),
                used: 0,
                gro: GROTable::new(),
            },
            backoff: Backoff::default(),
        }
    }

    /// One `recvmmsg` batch, opened and written to the TUN.
    pub fn step(
        &mut self,
        shared: &Shared,
        udp: &Udp,
        tun: &SyncDevice,
        counters: &Counters,
    ) -> Step {
        let received = {
            let mut chunks = self.storage.chunks_mut(RECV_LEN);
            let mut bufs: [IoSliceMut<'_>; BATCH_SIZE] =
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
            udp.recv(&mut bufs, &mut self.meta)
        };
        let count = match received {
            Ok(count) => {
                self.backoff.reset();
                count
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Dry,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Step::Worked,
            Err(e) => {
                // E.g. a queued ICMP error (ECONNREFUSED): reported once, gone.
                shared.log.error("udp receive", &e, None);
                counters.add(&counters.errors, 1);
                self.backoff.fail();
                return if self.backoff.failing() {
                    Step::Dry
                } else {
                    Step::Worked
                };
            }
        };
        counters.add(&counters.udp_recvs, 1);
        let mut datagrams = 0u64;
        for (meta, buf) in self
            .meta
            .iter()
            .zip(self.storage.chunks(RECV_LEN))
            .take(count)
        {
            let Some(data) = buf.get(..meta.len) else {
                continue;
            };
            let stride = if meta.stride == 0 {
                meta.len
            } else {
                meta.stride
            };
            if stride == 0 {
                continue;
            }
            for datagram in data.chunks(stride) {
                datagrams += 1;
                self.writer.open(shared, udp, meta, datagram);
                if self.writer.used == WRITE_SLOTS {
                    self.writer.flush(shared, tun, counters);
                }
            }
        }
        counters.add(&counters.udp_datagrams_received, datagrams);
        // Never hold packets across a wait: latency matters as much as batching.
        self.writer.flush(shared, tun, counters);
        if shared.stop.stopped() {
            Step::Stop
        } else {
            Step::Worked
        }
    }
}

/// A worker that only moves UDP → TUN (socket `index`).
pub(crate) fn run(shared: &Shared, index: usize) {
    let Some(udp) = shared.sockets.get(index) else {
        return;
    };
    let tun = &shared.tun.queues[index % shared.tun.queues.len()];
    let counters = &shared.counters[index];
    let mut receiver = Receiver::new();
    let readable = shared.stop.readable(&[udp.socket.as_fd()]);
    loop {
        match receiver.step(shared, udp, tun, counters) {
            Step::Worked => {}
            Step::Stop => return,
            Step::Dry => {
                let stop = if receiver.backoff.failing() {
                    shared.stop.sleep(receiver.backoff.next())
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

struct Writer {
    /// `OFFSET` bytes of room, then a plaintext packet; the length of each
    /// used slot is exactly the end of its packet (what tun-rs's GRO reads).
    slots: Vec<Vec<u8>>,
    used: usize,
    gro: GROTable,
}

impl Writer {
    /// Opens one datagram; a plaintext packet takes the next slot.
    fn open(&mut self, shared: &Shared, udp: &Udp, meta: &RecvMeta, datagram: &[u8]) {
        let slot = &mut self.slots[self.used];
        // Only grows by the few bytes the previous packet in this slot lacked.
        slot.resize(OFFSET + datagram.len().max(148), 0);
        let base = slot.as_ptr() as usize + OFFSET;
        let reply = |to, reply: &[u8]| {
            udp.send(to, reply, None, &shared.stop, &shared.log);
        };
        let opened = match shared
            .mesh
            .inbound(meta.addr, datagram, &mut slot[OFFSET..], reply)
        {
            Inbound::Tunnel(packet) => {
                Some(((packet.as_ptr() as usize).wrapping_sub(base), packet.len()))
            }
            Inbound::Done | Inbound::Drop(_) => None,
        };
        let Some((start, len)) = opened else { return };
        if start
            .checked_add(len)
            .is_none_or(|end| OFFSET + end > slot.len())
        {
            return;
        }
        // boringtun decrypts to the start of the buffer it is given; move
        // the packet there should that ever change.
        if start != 0 {
            slot.copy_within(OFFSET + start..OFFSET + start + len, OFFSET);
        }
        slot.truncate(OFFSET + len);
        self.used += 1;
    }

    fn flush(&mut self, shared: &Shared, tun: &SyncDevice, counters: &Counters) {
        if self.used == 0 {
            return;
        }
        let packets = self.used;
        self.used = 0;
        match tun.send_multiple(&mut self.gro, &mut self.slots[..packets], OFFSET) {
            Ok(_) => {}
            Err(e) => {
                // Some packets may have gone; the rest are lost (TCP resends).
                shared.log.error("tun write", &e, None);
                counters.add(&counters.errors, 1);
            }
        }
        counters.add(&counters.tun_packets_written, packets as u64);
        counters.add(&counters.tun_flushes, 1);
    }
}
