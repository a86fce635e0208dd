//! The data plane around [`Mesh`]: a TUN device and UDP sockets, driven by
//! plain threads doing blocking-style batched I/O (Linux only).
//!
//! Threads, per worker `i` (one worker per core by default):
//! * `mw-tx-i`: TUN queue `i` → seal → UDP socket `i`. Reads until the queue
//!   is dry (a TSO super-packet arrives split into MTU-size packets), seals
//!   each packet back to back into one buffer, sends each run of equal-size
//!   datagrams for one peer as a single UDP GSO `sendmsg`.
//! * `mw-rx-i`: UDP socket `i` → open → TUN queue `i`. `recvmmsg` with UDP
//!   GRO, opens each datagram into a write slot, then tun-rs's GRO table
//!   coalesces the segments of each flow and writes super-packets.
//! * `mw-timer`: [`Mesh::tick`] every 100 ms.
//!
//! The TUN has one queue per worker (`IFF_MULTI_QUEUE`, flows spread by the
//! kernel's hash) and the sockets share the port through `SO_REUSEPORT`.
//! Every descriptor is non-blocking; a worker that runs dry waits in epoll
//! together with a shared eventfd, which is how [`Device::shutdown`] wakes it.
//!
//! The protocol stays in [`Mesh`]: this module only moves bytes.
//!
//! Handover (not built yet): the TUN queues and sockets are opened first and
//! the workers started on them (`Device::run`), so a `from_fds` only needs
//! another way to open them. The TUN is always `IFF_MULTI_QUEUE`, so a
//! successor can also attach fresh queues to the live `mw0` by name (tun-rs
//! cannot adopt a descriptor that has the virtio-net header on); the UDP
//! sockets are `SO_REUSEPORT`, but handing them over by `SCM_RIGHTS` keeps
//! the port check of `start` meaningful.

mod rx;
mod tun;
mod tx;
mod udp;
mod wake;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Mesh, RateLimitedLog};

/// How often the timer thread calls [`Mesh::tick`].
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// What [`Device::start`] creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Name of the TUN device, e.g. "mw0".
    pub tun_name: String,
    /// MTU of the TUN: the underlay MTU minus 60 (IPv4 underlay) or 80 (IPv6).
    pub mtu: u32,
    /// Underlay address and port of the UDP sockets, e.g. 0.0.0.0:51871.
    pub listen: SocketAddr,
    /// Worker pairs (TUN queue + UDP socket, one thread each way); 0 means
    /// one per available core.
    pub workers: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            tun_name: "mw0".to_owned(),
            mtu: 1420,
            listen: SocketAddr::from(([0, 0, 0, 0], 51871)),
            workers: default_workers(),
        }
    }
}

/// One per available core, at least one.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Counters of the I/O shell (the protocol's own are in [`Mesh::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// `read`s of the TUN that returned something, and the packets they
    /// held once super-packets were split.
    pub tun_reads: u64,
    pub tun_packets_read: u64,
    /// Plaintext packets given to the GRO table, and how many batches.
    pub tun_packets_written: u64,
    pub tun_flushes: u64,
    /// `sendmsg` calls (one per GSO run) and the datagrams they carried.
    pub udp_sends: u64,
    pub udp_datagrams_sent: u64,
    /// `recvmmsg` calls and the datagrams they returned (GRO trains split).
    pub udp_recvs: u64,
    pub udp_datagrams_received: u64,
    /// I/O errors (logged rate-limited; the device keeps going).
    pub errors: u64,
}

/// A running data plane. Dropping it stops it, as [`Device::shutdown`] does.
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
}

pub(crate) struct Shared {
    mesh: Arc<Mesh>,
    tun: tun::Tun,
    sockets: Vec<udp::Udp>,
    mtu: u16,
    stop: wake::Stop,
    log: IoLog,
    /// One per worker index, each on its own cache lines.
    counters: Vec<Counters>,
}

impl Device {
    /// Creates the TUN (virtio-net header offloads when the kernel has them,
    /// one queue per worker), sets its MTU and brings it up, binds the UDP
    /// sockets, and starts the workers and the timer. Must be called from a
    /// thread in the node's network namespace: the TUN and the sockets
    /// belong to the namespace of the thread that creates them. Adds no
    /// address and no route: that is the caller's job.
    pub fn start(mesh: Arc<Mesh>, config: DeviceConfig) -> io::Result<Device> {
        let mtu = u16::try_from(config.mtu)
            .ok()
            .filter(|mtu| *mtu >= 576)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("MTU {} is outside 576..=65535", config.mtu),
                )
            })?;
        if config.tun_name.is_empty() || config.tun_name.len() > 15 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TUN name {:?} must be 1 to 15 bytes long", config.tun_name),
            ));
        }
        let workers = if config.workers == 0 {
            default_workers()
        } else {
            config.workers
        };
        // Sockets first: a port in use fails before a TUN is created.
        let sockets = udp::bind_group(config.listen, workers)?;
        let tun = tun::create(&config.tun_name, mtu, workers)?;
        Device::run(mesh, tun, sockets, mtu)
    }

    /// Starts the workers on open descriptors.
    fn run(mesh: Arc<Mesh>, tun: tun::Tun, sockets: Vec<udp::Udp>, mtu: u16) -> io::Result<Device> {
        let workers = tun.queues.len().max(sockets.len());
        let local_addr = sockets
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no UDP socket"))?
            .local_addr()?;
        let shared = Arc::new(Shared {
            mesh,
            tun,
            sockets,
            mtu,
            stop: wake::Stop::new()?,
            log: IoLog::new(),
            counters: (0..workers).map(|_| Counters::default()).collect(),
        });
        let mut device = Device {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            local_addr,
        };
        // One thread per direction per worker. Measured on 2 cores against
        // one thread doing both directions (TUN and socket in one epoll set,
        // as boringtun does): no better in latency, a little worse in
        // throughput, since encryption and decryption then share a thread.
        for i in 0..shared.tun.queues.len() {
            device.spawn(format!("mw-tx-{i}"), move |shared| tx::run(shared, i))?;
        }
        for i in 0..shared.sockets.len() {
            device.spawn(format!("mw-rx-{i}"), move |shared| rx::run(shared, i))?;
        }
        device.spawn("mw-timer".to_owned(), timer)?;
        tracing::info!(
            tun = %shared.tun.name,
            listen = %local_addr,
            workers,
            "mesh device started"
        );
        Ok(device)
    }

    /// On failure the threads already started are stopped by `Drop`.
    fn spawn(
        &mut self,
        name: String,
        work: impl FnOnce(&Shared) + Send + 'static,
    ) -> io::Result<()> {
        let shared = Arc::clone(&self.shared);
        let thread_name = name.clone();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            // A data plane thread that died would leave the device half
            // working with nothing to notice it. Dying whole instead lets the
            // supervisor restart the agent; strict mode keeps traffic failing
            // closed meanwhile.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&shared)));
            if ran.is_err() {
                tracing::error!(thread = %thread_name, "mesh data plane thread panicked; aborting");
                std::process::abort();
            }
        })?;
        self.threads.push(handle);
        Ok(())
    }

    pub fn tun_name(&self) -> &str {
        &self.shared.tun.name
    }

    pub fn tun_index(&self) -> u32 {
        self.shared.tun.index
    }

    /// The bound underlay address (the actual port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the TUN runs with virtio-net header offloads (TSO/GRO).
    pub fn offload(&self) -> bool {
        self.shared.tun.offload
    }

    pub fn stats(&self) -> DeviceStats {
        let mut stats = DeviceStats::default();
        for c in &self.shared.counters {
            let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
            stats.tun_reads += get(&c.tun_reads);
            stats.tun_packets_read += get(&c.tun_packets_read);
            stats.tun_packets_written += get(&c.tun_packets_written);
            stats.tun_flushes += get(&c.tun_flushes);
            stats.udp_sends += get(&c.udp_sends);
            stats.udp_datagrams_sent += get(&c.udp_datagrams_sent);
            stats.udp_recvs += get(&c.udp_recvs);
            stats.udp_datagrams_received += get(&c.udp_datagrams_received);
            stats.errors += get(&c.errors);
        }
        stats
    }

    /// Stops and joins every thread, then closes the TUN and the sockets
    /// (closing the TUN removes the device; routes through it go with it).
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop.trigger();
        for handle in self.threads.drain(..) {
            let name = handle.thread().name().unwrap_or("?").to_owned();
            if handle.join().is_err() {
                tracing::error!(thread = %name, "mesh device thread panicked");
            }
        }
        tracing::info!(tun = %self.shared.tun.name, "mesh device stopped");
    }
}

fn timer(shared: &Shared) {
    let socket = &shared.sockets[0];
    while !shared.stop.sleep(TICK_INTERVAL) {
        shared.mesh.tick(|to, datagram| {
            socket.send(to, datagram, None, &shared.stop, &shared.log);
        });
    }
}

/// Per-worker counters, added once per batch, not per packet.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Counters {
    tun_reads: AtomicU64,
    tun_packets_read: AtomicU64,
    tun_packets_written: AtomicU64,
    tun_flushes: AtomicU64,
    udp_sends: AtomicU64,
    udp_datagrams_sent: AtomicU64,
    udp_recvs: AtomicU64,
    udp_datagrams_received: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// I/O errors come at packet rate when something is wrong: a few lines per
/// interval, the rest counted and reported by the next line that passes.
pub(crate) struct IoLog(RateLimitedLog);

impl IoLog {
    fn new() -> IoLog {
        IoLog(RateLimitedLog::new(10, Duration::from_secs(10)))
    }

    pub fn error(&self, op: &'static str, error: &io::Error, peer: Option<SocketAddr>) {
        if let Some(suppressed) = self.0.admit() {
            match peer {
                Some(peer) => {
                    tracing::warn!(op, %peer, %error, suppressed, "mesh device I/O error")
                }
                None => tracing::warn!(op, %error, suppressed, "mesh device I/O error"),
            }
        }
    }
}

/// Backoff for an error that repeats (a descriptor gone bad): 1 ms doubling
/// to 100 ms, so a broken device neither spins a core nor stalls for long.
#[derive(Default)]
pub(crate) struct Backoff {
    failures: u32,
}

impl Backoff {
    fn reset(&mut self) {
        self.failures = 0;
    }

    fn fail(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// Two failures in a row: back off (one is just a bad packet).
    fn failing(&self) -> bool {
        self.failures >= 2
    }

    fn next(&self) -> Duration {
        Duration::from_millis(1 << self.failures.min(7)).min(Duration::from_millis(100))
    }
}
