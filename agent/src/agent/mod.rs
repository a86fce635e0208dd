//! `meshward agent`: the node agent.
//!
//! Start-up, in this order (each step's failure ends the agent with an
//! error naming it; nothing before it is undone, in particular not strict
//! mode):
//!
//! 1. configuration file (and command-line overrides), then
//!    `stateDir/agent.lock`: one agent per state directory (a second one
//!    would share the first one's TUN queues and UDP port);
//! 2. the node key from `stateDir` (generated on first start). If a
//!    previous key is still there, a rotation was interrupted: the mesh gets
//!    both, the previous one accepted until every peer has moved over;
//! 3. the peer cache (`stateDir/peers.json`): the mesh is configured with
//!    the last good peers at once, so sessions come back before the
//!    datastore has synced;
//! 4. the datastore (initial sync), and this node's IPv4 pod CIDR(s) from
//!    its Node (waited for, bounded);
//! 5. strict mode (`table inet meshward`), with the local pod CIDRs and, as
//!    remote, the cluster range plus every other Node's pod CIDRs — before
//!    the tunnel exists, so no pod packet can leave in plaintext while the
//!    mesh comes up;
//! 6. the data plane (`mw0`, the UDP socket);
//! 7. `mw0` gets the node's reserved address, the first host of its pod
//!    CIDR (e.g. 198.19.1.1/32);
//! 8. the own Node is published (public key, endpoint);
//! 9. the control socket, then the reconcile loop: on every snapshot the
//!    peer set, the routes through `mw0`, strict mode's remote set and the
//!    own Node's annotations are brought in line (see `plan.rs` for the
//!    rules about bad peer data). A full pass also runs every
//!    [`RESYNC_INTERVAL`], repairing kernel state changed behind our back.
//!
//! Shutdown on SIGTERM or SIGINT: the control socket is removed and the data
//! plane stopped. Closing the TUN removes `mw0` and with it every route
//! through it; strict mode stays in the kernel (and a node that also routes
//! the cluster range `unreachable`, as lab nodes do, refuses cross-node pod
//! traffic), so traffic fails closed until the agent is back. Nothing is
//! torn down on `kill -9` either: a restarted agent converges from whatever
//! it finds.

pub mod cache;
mod cni_pods;
mod control;
pub mod events;
mod health;
pub mod keeper;
mod l7;
mod metrics;
mod netlink;
mod nflog;
mod observe;
pub mod observe_tcp;
pub mod plan;
mod policy;
pub mod protocol;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use ipnet::{IpNet, Ipv4Net};
use meshward_egress::StrictMode;
use meshward_keys::{KeyStore, NodeKey, PublicKey};
use meshward_mesh::device::{Device, DeviceConfig};
use meshward_mesh::{Mesh, PeerConfig};
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::{AgentArgs, Config};
use crate::datastore::{Cluster, Datastore, NodeInfo, OwnNode};
use plan::{Local, Peer, Problem};
use protocol::{DataPlaneStatus, DatastoreStatus, PeerStatus, Request, Response, Rotation, Status};

/// The tunnel interface.
pub const TUN_NAME: &str = "mw0";
/// A full reconcile pass runs at least this often.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// Held by the running agent in its state directory.
const INSTANCE_LOCK: &str = "agent.lock";
/// How long a starting agent waits for a predecessor to release the lock.
const INSTANCE_LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long start-up waits for the own Node to show a pod CIDR.
const OWN_NODE_WAIT: Duration = Duration::from_secs(60);
/// How often a rotation in progress checks whether the mesh still needs
/// the previous key.
const FORGET_POLL: Duration = Duration::from_secs(1);
/// Publishing the own Node again waits at least this long after an attempt.
const PUBLISH_SPACING: Duration = Duration::from_secs(1);
/// How long start-up waits for a predecessor's tunnel interface to vanish.
const TUN_GONE_WAIT: Duration = Duration::from_secs(3);
/// Longest the data plane gets to stop on shutdown.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// When `keyRotationInterval` is due already at start-up, the rotation
/// waits this long, so peers are up first.
const ROTATION_START_DELAY: Duration = Duration::from_secs(10);
/// Flow events kept unless `flowEventBuffer` says otherwise.
pub const DEFAULT_FLOW_EVENTS: usize = events::DEFAULT_CAPACITY;

/// Runs `meshward agent` until SIGTERM or SIGINT.
pub fn run(args: AgentArgs) -> Result<ExitCode> {
    let config = Config::load(&args)?;
    // the token is checked before anything starts
    let observe_token = match &config.observe_tcp {
        Some(tcp) => Some(observe_tcp::Token::new(
            &observe_tcp::read_token(&tcp.token_file).context("observeTokenFile")?,
        )),
        None => None,
    };
    // One agent per state directory: a second one would share the first
    // one's TUN queues and UDP port.
    let instance_lock = lock_state_dir(&config.state_dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        // Up before start-up, so liveness passes while it waits.
        let address = config.health_address;
        let health = health::Server::start(address)
            .await
            .with_context(|| format!("health endpoint (healthAddress {address})"))?;
        let (agent, requests) = Agent::start(config, instance_lock, observe_token).await?;
        health.started(agent.rx.clone());
        health.observe(metrics::Sources {
            mesh: agent.mesh.clone(),
            policy: agent.policy.as_ref().map(policy::PolicyEngine::handle),
            events: agent.events.clone(),
        });
        agent.run(requests).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A request from the control socket, with where to send the answer.
pub(crate) type ControlRequest = (Request, oneshot::Sender<Response>);

/// At most this many queued control requests are taken in one pass of the
/// run loop, so a flood of them cannot starve the datastore and timers.
const REQUEST_BATCH: usize = 256;

/// `first` and then what is already queued behind it, at most `max` in all,
/// without waiting.
fn drain_queued<T>(first: T, queue: &mut mpsc::Receiver<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < max {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    batch
}

struct Agent {
    config: Config,
    store: KeyStore,
    current: PublicKey,
    /// Set while a rotation is in progress.
    previous: Option<PublicKey>,
    mesh: Arc<Mesh>,
    datastore: Datastore,
    rx: watch::Receiver<Arc<Cluster>>,
    snapshot: Arc<Cluster>,
    own_cidrs: Vec<Ipv4Net>,
    address: Ipv4Addr,
    device: Option<Device>,
    netlink: rtnetlink::Handle,
    tun_index: u32,
    tun_name: String,
    /// The peer set the mesh runs with: the last good one.
    peers: BTreeMap<String, Peer>,
    problems: Vec<Problem>,
    strict_applied: Option<Vec<Ipv4Net>>,
    next_rotation: Option<Instant>,
    publish_retry: Option<Instant>,
    last_publish: Option<Instant>,
    own_node_warning: Option<String>,
    control: Option<control::Server>,
    /// `observe` over TCP (`observeAddress`).
    observe_tcp: Option<observe_tcp::Server>,
    policy: Option<policy::PolicyEngine>,
    /// Addresses from CNI ADD not yet in the Pod status, and the ADDs
    /// waiting for their pod's policy.
    cni_pods: cni_pods::CniPods,
    /// Flow events (`meshward observe`); none with `flowEvents: false`.
    events: Option<Arc<events::EventHub>>,
    /// Held for the agent's lifetime (`stateDir/agent.lock`).
    _instance_lock: Flock<std::fs::File>,
}

/// Creates the state directory (mode 0700) if needed and takes
/// `agent.lock` in it, or fails naming the agent that holds it.
fn lock_state_dir(dir: &Path) -> Result<Flock<std::fs::File>> {
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
    }
    let path = dir.join(INSTANCE_LOCK);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // A predecessor that was just killed may still be exiting: wait a little.
    let deadline = std::time::Instant::now() + INSTANCE_LOCK_WAIT;
    let mut file = file;
    let mut told = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                if !told {
                    info!(lock = %path.display(), "another agent holds the state directory; waiting for it to exit");
                    told = true;
                }
                file = f;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "another meshward agent is running with the state directory {} (it holds {})",
                dir.display(),
                path.display()
            ),
            Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

fn first_host(net: &Ipv4Net) -> Result<Ipv4Addr> {
    if net.prefix_len() > 30 {
        bail!("pod CIDR {net} is too small: it needs room for the node's address and pods");
    }
    Ok(Ipv4Addr::from(u32::from(net.network()) + 1))
}

fn ipv4_cidrs(node: &NodeInfo) -> Vec<Ipv4Net> {
    let mut v: Vec<Ipv4Net> = node
        .pod_cidrs
        .iter()
        .filter_map(|c| match c {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

fn peer_configs(peers: &BTreeMap<String, Peer>) -> Vec<PeerConfig> {
    peers
        .iter()
        .map(|(name, p)| PeerConfig {
            name: name.clone(),
            public_key: p.public_key.into(),
            endpoint: Some(p.endpoint),
            allowed_ips: p.pod_cidrs.clone(),
            keepalive: None,
        })
        .collect()
}

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("{what}: task failed: {e}"))
}

impl Agent {
    async fn start(
        config: Config,
        instance_lock: Flock<std::fs::File>,
        observe_token: Option<observe_tcp::Token>,
    ) -> Result<(Agent, mpsc::Receiver<ControlRequest>)> {
        info!(
            node = %config.node_name,
            datastore = %config.datastore,
            endpoint = %config.endpoint,
            state_dir = %config.state_dir.display(),
            "meshward agent starting"
        );

        // 2. keys
        let store = KeyStore::new(&config.state_dir);
        let (current_key, previous_key) = if config.mesh {
            let store = store.clone();
            blocking("loading the node key", move || {
                let current = store.load_or_generate()?;
                let previous = store.previous()?;
                Ok::<_, meshward_keys::KeyError>((current, previous))
            })
            .await?
            .context("node key")?
        } else {
            // Policy only: no tunnel, so no node key on disk; a key file
            // left by a mesh-mode run stays as it is for a switch back.
            (NodeKey::generate(), None)
        };
        let current = current_key.public();
        let previous = previous_key.as_ref().map(NodeKey::public);
        if config.mesh {
            info!(public_key = %current, key_file = %store.key_path().display(), "node key loaded");
        }
        if let Some(previous) = previous {
            warn!(
                previous_public_key = %previous,
                "a key rotation was interrupted: the previous key stays accepted until every peer uses the new one"
            );
        }

        // 3. the mesh, with the cached peers
        let cached = match cache::load(&config.state_dir, &config.node_name) {
            Ok(c) => c.unwrap_or_default(),
            Err(e) => {
                warn!("ignoring the peer cache: {e}");
                cache::Cached::default()
            }
        };
        let start_key = previous_key.as_ref().unwrap_or(&current_key);
        let mesh = Arc::new(Mesh::new(start_key.secret().clone()));
        let mut peers = BTreeMap::new();
        if config.mesh && !cached.peers.is_empty() {
            match mesh.set_peers(peer_configs(&cached.peers)) {
                Ok(()) => {
                    info!(
                        peers = cached.peers.len(),
                        "mesh configured from the peer cache"
                    );
                    peers = cached.peers.clone();
                }
                Err(e) => {
                    warn!("the peer cache holds a peer set the mesh refuses ({e}); ignoring it")
                }
            }
        }
        if previous_key.is_some() {
            mesh.rotate_local_key(current_key.secret().clone());
        }
        drop((current_key, previous_key));

        // 4. datastore and own pod CIDRs
        let datastore = Datastore::start(&config.datastore)
            .await
            .with_context(|| format!("starting the datastore {}", config.datastore))?;
        let mut rx = datastore.subscribe();
        // Policy only: pod addresses and routes belong to another CNI, so
        // no pod CIDR is needed (local pods are the Pods bound to this node).
        let (own_cidrs, address) = if config.mesh {
            let own_cidrs = own_pod_cidrs(&config, &mut rx, &cached).await?;
            let first = own_cidrs
                .first()
                .ok_or_else(|| anyhow!("Node {} has no IPv4 pod CIDR", config.node_name))?;
            let address = first_host(first)?;
            info!(
                pod_cidrs = ?own_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                %address,
                "own pod CIDRs"
            );
            (own_cidrs, address)
        } else {
            (Vec::new(), Ipv4Addr::UNSPECIFIED)
        };
        let snapshot = rx.borrow_and_update().clone();

        let mut agent = Agent {
            store,
            current,
            previous,
            mesh,
            datastore,
            rx,
            snapshot,
            own_cidrs,
            address,
            device: None,
            netlink: netlink::connect().context("netlink")?,
            tun_index: 0,
            tun_name: TUN_NAME.to_string(),
            peers,
            problems: Vec::new(),
            strict_applied: None,
            next_rotation: None,
            publish_retry: None,
            last_publish: None,
            own_node_warning: None,
            control: None,
            observe_tcp: None,
            policy: None,
            cni_pods: cni_pods::CniPods::default(),
            events: config
                .flow_events
                .then(|| events::EventHub::new(&config.node_name, config.flow_event_buffer)),
            _instance_lock: instance_lock,
            config,
        };

        // 5. strict mode, before the tunnel exists
        let plan = agent.plan();
        if !agent.config.mesh {
            info!("mesh off (policy only): no tunnel, no routes, no strict mode");
            // A predecessor that ran the mesh may have left strict mode.
            match blocking("strict mode", meshward_egress::disarm_strict).await? {
                Ok(true) => warn!(
                    "strict mode from an earlier mesh-mode agent disarmed: pod traffic between nodes is the other CNI's now"
                ),
                Ok(false) => {}
                Err(e) => bail!("disarming strict mode left by an earlier mesh-mode agent: {e}"),
            }
        } else if agent.config.strict_mode {
            agent
                .apply_strict(&plan.strict_remote)
                .await
                .context("installing strict mode (before the mesh comes up)")?;
        } else {
            warn!("strictMode is off: pod traffic to other nodes is not forced through the tunnel");
        }

        // 5b. policy: the structure, the first full apply (with the learned
        // names restored from the state directory), then the DNS proxy
        let mut engine = policy::PolicyEngine::start(
            &agent.config.node_name,
            agent.config.state_dir.clone(),
            &agent.config.policy,
        )?;
        // the L7 proxy listens before any port is redirected to it
        l7::start(engine.l7(), &agent.config.policy).context("starting the L7 proxy")?;
        agent.restore_cni_pods().await;
        let view = agent
            .cni_pods
            .overlay(&agent.snapshot, &agent.config.node_name);
        if !engine.update(view.as_ref().unwrap_or(&agent.snapshot), true) {
            bail!("applying the policy to the kernel failed (see above)");
        }
        engine
            .start_dns_proxy(&agent.config.policy)
            .await
            .context("starting the DNS proxy")?;
        // flow events: the producers run only when they are on
        match &agent.events {
            Some(hub) => observe::start(
                hub,
                &engine,
                agent.config.policy.nflog_group,
                agent.mesh.clone(),
                agent.rx.clone(),
            ),
            None => info!("flow events are off (flowEvents: false)"),
        }
        agent.policy = Some(engine);

        // 6-8. the data plane, its address, the own Node's annotations
        if agent.config.mesh {
            agent.start_mesh().await?;
        }

        // 9. control socket, first reconcile
        let (tx, requests) = mpsc::channel(16);
        agent.control = Some(
            control::Server::start(&agent.config.socket_path, tx, agent.events.clone())
                .await
                .context("control socket")?,
        );
        if let (Some(tcp), Some(hub), Some(token)) =
            (&agent.config.observe_tcp, &agent.events, observe_token)
        {
            let address = tcp.address;
            agent.observe_tcp = Some(
                observe_tcp::Server::start(address, token, hub.clone())
                    .await
                    .with_context(|| format!("observe over TCP (observeAddress {address})"))?,
            );
        }
        if agent.previous.is_some() {
            info!("waiting for the mesh to stop needing the previous key");
        }
        agent.next_rotation = agent.first_rotation();
        agent.reconcile().await;
        info!(peers = agent.peers.len(), "agent running");
        Ok((agent, requests))
    }

    /// The data plane (`mw0`, the UDP socket, the workers), the node's
    /// address on it, and the own Node's key and endpoint published.
    async fn start_mesh(&mut self) -> Result<()> {
        let agent = self;
        let listen = SocketAddr::new(
            match agent.config.endpoint.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            },
            agent.config.listen_port,
        );
        let settings = DeviceConfig {
            tun_name: TUN_NAME.to_string(),
            mtu: agent.config.mtu,
            listen,
            // one worker pair per core
            workers: 0,
        };
        let device = start_device(&agent.mesh, &settings)
            .await
            .with_context(|| {
                format!(
                    "starting the data plane ({} with MTU {}, UDP {listen})",
                    settings.tun_name, settings.mtu
                )
            })?;
        agent.tun_index = device.tun_index();
        agent.tun_name = device.tun_name().to_string();
        agent.device = Some(device);
        info!(interface = %agent.tun_name, index = agent.tun_index, %listen, "data plane up");
        disable_ipv6(&agent.tun_name);

        // 7. the node's address on the tunnel
        netlink::set_address(
            &agent.netlink,
            agent.tun_index,
            &agent.tun_name,
            agent.address,
        )
        .await
        .context("tunnel address")?;

        // 8. publish
        agent.publish_if_needed().await;
        Ok(())
    }

    /// When `keyRotationInterval` is set: the key file's age decides, so
    /// restarts do not postpone rotations forever.
    fn first_rotation(&self) -> Option<Instant> {
        if !self.config.mesh {
            return None;
        }
        let interval = self.config.key_rotation_interval?;
        let age = std::fs::metadata(self.store.key_path())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        let wait = rotation_wait(interval, age);
        info!(in_secs = wait.as_secs(), "next scheduled key rotation");
        Some(Instant::now() + wait)
    }

    async fn run(mut self, mut requests: mpsc::Receiver<ControlRequest>) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut resync = tokio::time::interval(RESYNC_INTERVAL);
        resync.tick().await;
        let mut forget = tokio::time::interval(FORGET_POLL);
        let mut policy_tick = tokio::time::interval(policy::PolicyEngine::save_interval());
        let far = || Instant::now() + Duration::from_secs(365 * 86400);
        let result = loop {
            let rotation_at = self.next_rotation.unwrap_or_else(far);
            let publish_at = self.publish_retry.unwrap_or_else(far);
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        break Err(anyhow!("the datastore stopped"));
                    }
                    self.snapshot = self.rx.borrow_and_update().clone();
                    debug!(generation = self.snapshot.generation(), "datastore snapshot");
                    self.reconcile().await;
                }
                Some(first) = requests.recv() => {
                    // A node starting many pods at once queues many CNI
                    // ADDs: record them all, then compile once.
                    let mut cni_pending = false;
                    for (request, reply) in drain_queued(first, &mut requests, REQUEST_BATCH) {
                        match request {
                            Request::Cni(event) => {
                                self.cni_pods.record(event, reply);
                                cni_pending = true;
                            }
                            request => {
                                // Requests are answered in order: CNI events
                                // before this one are in force first.
                                if std::mem::take(&mut cni_pending) {
                                    self.reconcile_policy();
                                }
                                let response = self.handle(request).await;
                                let _ = reply.send(response);
                            }
                        }
                    }
                    if cni_pending {
                        self.reconcile_policy();
                    }
                }
                _ = resync.tick() => self.reconcile().await,
                _ = policy_tick.tick() => {
                    if let Some(policy) = &self.policy {
                        policy.tick();
                    }
                }
                _ = forget.tick(), if self.previous.is_some() => self.forget_previous_if_done().await,
                _ = tokio::time::sleep_until(rotation_at), if self.next_rotation.is_some() => {
                    info!("scheduled key rotation (keyRotationInterval)");
                    if let Err(e) = self.rotate().await {
                        error!("scheduled key rotation failed: {e}");
                    }
                    self.next_rotation = self
                        .config
                        .key_rotation_interval
                        .map(|i| Instant::now() + i);
                }
                _ = tokio::time::sleep_until(publish_at), if self.publish_retry.is_some() => {
                    self.publish_retry = None;
                    self.publish_if_needed().await;
                }
                _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break Ok(()) }
                _ = sigint.recv() => { info!("SIGINT: shutting down"); break Ok(()) }
            }
        };
        self.shutdown().await;
        result
    }

    async fn shutdown(mut self) {
        if let Some(server) = self.observe_tcp.take() {
            server.stop();
        }
        if let Some(control) = self.control.take() {
            control.stop();
        }
        if let Some(policy) = &self.policy {
            // Policy and learned peers stay in the kernel; save the cache.
            policy.tick();
        }
        if let Some(device) = self.device.take() {
            let stopped = tokio::time::timeout(
                SHUTDOWN_WAIT,
                tokio::task::spawn_blocking(move || device.shutdown()),
            )
            .await;
            if stopped.is_err() {
                warn!("the data plane did not stop within {SHUTDOWN_WAIT:?}; exiting anyway");
            }
        }
        info!("agent stopped (strict mode stays in place)");
    }

    fn local_keys(&self) -> Vec<PublicKey> {
        std::iter::once(self.current).chain(self.previous).collect()
    }

    fn plan(&self) -> plan::Plan {
        let keys = self.local_keys();
        let local = Local {
            name: &self.config.node_name,
            keys: &keys,
            pod_cidrs: &self.own_cidrs,
            endpoint: self.config.endpoint,
            cluster_cidr: self.config.cluster_cidr,
        };
        plan::plan(
            &local,
            self.snapshot.nodes(),
            self.snapshot.synced(),
            &self.peers,
        )
    }

    /// Brings peers, routes, strict mode and the own Node in line with the
    /// current snapshot. Failures are logged and retried on the next pass.
    async fn reconcile(&mut self) {
        self.reconcile_policy();
        if self.config.mesh {
            self.reconcile_mesh().await;
        }
    }

    /// Reads the pods the CNI attached on this node (`stateDir/ipam`, what
    /// `install-cni` configures) so their addresses count before their Pod
    /// status shows them. Nothing to read is fine; a bad store is logged.
    async fn restore_cni_pods(&mut self) {
        let dir = self.config.state_dir.join("ipam");
        let network = crate::cli::install_cni::NETWORK;
        if !dir.join(format!("{network}.json")).is_file() {
            return;
        }
        let read = blocking("reading the CNI's allocations", move || {
            meshward_cni::ipam::Store::open(&dir, network)?.list()
        })
        .await;
        match read {
            Ok(Ok(allocations)) => {
                debug!(count = allocations.len(), "CNI allocations read");
                self.cni_pods.restore(&allocations);
            }
            Ok(Err(e)) => warn!("reading the CNI's allocations: {e}"),
            Err(e) => warn!("{e:#}"),
        }
    }

    /// Brings the kernel's policy in line with the snapshot plus the pod
    /// addresses CNI ADD told (see `cni_pods`), then answers the ADDs whose
    /// policy is in force.
    fn reconcile_policy(&mut self) {
        let node = &self.config.node_name;
        let applied = match &mut self.policy {
            Some(policy) => match self.cni_pods.overlay(&self.snapshot, node) {
                Some(view) => policy.update(&view, false),
                None => policy.update(&self.snapshot, false),
            },
            None => true,
        };
        self.cni_pods.settle(&self.snapshot, node, applied);
    }

    /// Peers, routes, strict mode and the own Node's annotations.
    async fn reconcile_mesh(&mut self) {
        let plan = self.plan();
        if plan.problems != self.problems {
            for problem in plan.problems.iter().filter(|p| !self.problems.contains(p)) {
                warn!(node = %problem.node, "bad peer data: {}", problem.message);
            }
            if plan.problems.is_empty() && !self.problems.is_empty() {
                info!("no more problems with peer data");
            }
            self.problems = plan.problems.clone();
        }

        if plan.peers != self.peers {
            match self.mesh.set_peers(peer_configs(&plan.peers)) {
                Ok(()) => {
                    log_peer_changes(&self.peers, &plan.peers);
                    self.peers = plan.peers.clone();
                    self.save_cache().await;
                }
                Err(e) => {
                    error!("the mesh refused the planned peer set ({e}); keeping the last good peer set");
                }
            }
        }

        // routes through the tunnel: exactly the running peers' pod CIDRs
        let desired = plan::routes(&self.peers);
        match netlink::reconcile_routes(
            &self.netlink,
            self.tun_index,
            &self.tun_name,
            self.address,
            &desired,
        )
        .await
        {
            Ok(changes) => {
                for net in &changes.added {
                    info!(route = %net, dev = %self.tun_name, src = %self.address, "route set");
                }
                for net in &changes.removed {
                    info!(route = %net, "route removed");
                }
            }
            Err(e) => {
                error!(
                    "routes through {}: {e} (retrying on the next pass)",
                    self.tun_name
                );
            }
        }

        if self.config.strict_mode {
            let mut remote: BTreeSet<Ipv4Net> = plan.strict_remote.iter().copied().collect();
            remote.extend(
                self.peers
                    .values()
                    .flat_map(|p| p.pod_cidrs.iter().copied()),
            );
            let remote: Vec<Ipv4Net> = remote.into_iter().collect();
            if self.strict_applied.as_ref() != Some(&remote) {
                if let Err(e) = self.apply_strict(&remote).await {
                    error!("updating strict mode: {e:#} (retrying on the next pass)");
                }
            }
        }

        self.check_own_node();
        self.publish_if_needed().await;
    }

    async fn apply_strict(&mut self, remote: &[Ipv4Net]) -> Result<()> {
        let strict = StrictMode {
            tunnel_ifname: TUN_NAME.to_string(),
            local_pod_cidrs: self.own_cidrs.clone(),
            remote_pod_cidrs: remote.to_vec(),
        };
        blocking("strict mode", move || {
            meshward_egress::apply_strict(&strict)
        })
        .await?
        .context("nft")?;
        info!(
            local = ?self.own_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            remote = ?remote.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "strict mode in place"
        );
        self.strict_applied = Some(remote.to_vec());
        Ok(())
    }

    /// Warns (once per distinct situation) when the own Node vanished or its
    /// pod CIDRs changed under a running agent.
    fn check_own_node(&mut self) {
        let warning =
            match self.snapshot.node(&self.config.node_name) {
                None if self.snapshot.synced() => Some(format!(
                    "own Node {} is gone from the datastore: not re-creating it; \
                 keeping pod CIDRs {:?} and the tunnel up",
                    self.config.node_name,
                    self.own_cidrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                )),
                Some(node)
                    if ipv4_cidrs(node) != self.own_cidrs && !ipv4_cidrs(node).is_empty() =>
                {
                    Some(format!(
                    "own Node's pod CIDRs changed to {:?}; this agent keeps {:?} until it restarts",
                    ipv4_cidrs(node).iter().map(ToString::to_string).collect::<Vec<_>>(),
                    self.own_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>()
                ))
                }
                _ => None,
            };
        if warning != self.own_node_warning {
            if let Some(w) = &warning {
                warn!("{w}");
            }
            self.own_node_warning = warning;
        }
    }

    fn own_node(&self) -> OwnNode {
        OwnNode {
            name: self.config.node_name.clone(),
            public_key: self.current.to_string(),
            endpoint: self.config.endpoint,
            pod_cidrs: Vec::new(),
        }
    }

    /// Publishes the own Node when the snapshot shows other annotations
    /// than ours. A Node that is absent is not re-created: it was deleted.
    async fn publish_if_needed(&mut self) {
        let Some(node) = self.snapshot.node(&self.config.node_name) else {
            return;
        };
        let wanted_key = self.current.to_string();
        if node.public_key.as_deref() == Some(wanted_key.as_str())
            && node.endpoint == Some(self.config.endpoint)
        {
            return;
        }
        self.publish().await;
    }

    async fn publish(&mut self) -> bool {
        let now = Instant::now();
        if let Some(last) = self.last_publish {
            if now < last + PUBLISH_SPACING {
                self.publish_retry = Some(last + PUBLISH_SPACING);
                return false;
            }
        }
        self.last_publish = Some(now);
        match self.datastore.publish_own_node(&self.own_node()).await {
            Ok(()) => {
                debug!(public_key = %self.current, "own node published");
                true
            }
            Err(e) => {
                error!("publishing own node: {e} (retrying)");
                self.publish_retry = Some(now + 2 * PUBLISH_SPACING);
                false
            }
        }
    }

    async fn save_cache(&self) {
        let cached = cache::Cached {
            pod_cidrs: self.own_cidrs.clone(),
            peers: self.peers.clone(),
        };
        let dir = self.config.state_dir.clone();
        let node = self.config.node_name.clone();
        match blocking("peer cache", move || cache::save(&dir, &node, &cached)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("writing the peer cache: {e}"),
            Err(e) => warn!("{e}"),
        }
    }

    async fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::status(self.status()),
            Request::Rotate => match self.rotate().await {
                Ok(rotation) => Response::rotation(rotation),
                Err(e) => Response::error(format!("{e:#}")),
            },
            // answered by the control socket itself
            Request::Observe(_) => Response::error("observe is served by the control socket"),
            // taken by the run loop before it gets here
            Request::Cni(_) => Response::error("CNI events are handled by the run loop"),
        }
    }

    /// KeyStore rotation → mesh → publish. The previous key is forgotten
    /// (in the mesh and on disk) once no session needs it.
    async fn rotate(&mut self) -> Result<Rotation> {
        if !self.config.mesh {
            bail!("the mesh is off on this node (mesh: false): there is no key to rotate");
        }
        let store = self.store.clone();
        let rotation = blocking("key rotation", move || store.rotate())
            .await?
            .context("rotating the node key")?;
        self.mesh
            .rotate_local_key(rotation.current.secret().clone());
        let previous = rotation.previous.public();
        self.current = rotation.current.public();
        self.previous = Some(previous);
        info!(public_key = %self.current, previous_public_key = %previous, "node key rotated");
        self.last_publish = None;
        if !self.publish().await {
            warn!("the new key is in use but not published yet; peers keep using the previous key until it is");
        }
        Ok(Rotation {
            public_key: self.current.to_string(),
            previous_public_key: previous.to_string(),
        })
    }

    async fn forget_previous_if_done(&mut self) {
        if self.mesh.stats().previous_public_key.is_some() {
            return;
        }
        let store = self.store.clone();
        match blocking("forgetting the previous key", move || {
            store.forget_previous()
        })
        .await
        {
            Ok(Ok(())) => {
                info!(
                    public_key = %self.current,
                    "key rotation complete: every peer uses the new key; previous key deleted"
                );
                self.previous = None;
            }
            Ok(Err(e)) => error!("deleting the previous key: {e}"),
            Err(e) => error!("{e}"),
        }
    }

    fn status(&self) -> Status {
        let stats = self.mesh.stats();
        let now = SystemTime::now();
        let peers = stats
            .peers
            .iter()
            .map(|p| PeerStatus {
                name: p.name.clone(),
                public_key: PublicKey::from(p.public_key).to_string(),
                endpoint: p.endpoint.map(|e| e.to_string()),
                allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                session_up: p.session_up,
                last_handshake_unix_ms: p.last_handshake.and_then(|t| {
                    t.duration_since(UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_millis() as u64)
                }),
                last_handshake_secs_ago: p
                    .last_handshake
                    .map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64()),
                handshakes: p.handshakes,
                tx_packets: p.tx_packets,
                tx_bytes: p.tx_bytes,
                rx_packets: p.rx_packets,
                rx_bytes: p.rx_bytes,
                key_change_pending: p.key_change_pending,
            })
            .collect();
        Status {
            node: self.config.node_name.clone(),
            pid: std::process::id(),
            // policy only: the mesh's key is a throwaway, never used
            public_key: if self.config.mesh {
                PublicKey::from(stats.local_public_key).to_string()
            } else {
                String::new()
            },
            // ours, not the mesh's: cleared once the key file is deleted too
            previous_public_key: self.previous.map(|k| k.to_string()),
            endpoint: self.config.endpoint.to_string(),
            pod_cidrs: self.own_cidrs.iter().map(ToString::to_string).collect(),
            address: self.address.to_string(),
            interface: self.tun_name.clone(),
            mesh: self.config.mesh,
            strict_mode: self.config.strict_mode,
            datastore: DatastoreStatus {
                spec: self.config.datastore.to_string(),
                synced: self.snapshot.synced(),
                generation: self.snapshot.generation(),
            },
            data_plane: self.device.as_ref().map(|device| {
                let d = device.stats();
                DataPlaneStatus {
                    offload: device.offload(),
                    udp_datagrams_sent: d.udp_datagrams_sent,
                    udp_datagrams_received: d.udp_datagrams_received,
                    tun_packets_read: d.tun_packets_read,
                    tun_packets_written: d.tun_packets_written,
                    errors: d.errors,
                }
            }),
            peers,
            drops: stats
                .drops
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(reason, n)| (reason.as_str().to_string(), n))
                .collect(),
            problems: self.problems.iter().map(ToString::to_string).collect(),
            policy: self.policy.as_ref().map(|engine| {
                let mut status = engine.status();
                status.policies_loaded = self.snapshot.policies().count();
                status
            }),
            health_address: Some(self.config.health_address.to_string()),
            flow_events: self.events.as_ref().map(|e| e.stats()),
        }
    }
}

/// Starts the data plane. An `mw0` that still exists is given a moment to
/// go: a predecessor killed a moment ago may still be closing its TUN.
async fn start_device(mesh: &Arc<Mesh>, settings: &DeviceConfig) -> std::io::Result<Device> {
    let deadline = Instant::now() + TUN_GONE_WAIT;
    loop {
        match Device::start(mesh.clone(), settings.clone()) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AlreadyExists && Instant::now() < deadline =>
            {
                debug!("{e}; waiting for it to go");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            result => return result,
        }
    }
}

/// How long after start-up the first scheduled rotation is due, for a key
/// `key_age` old: when the interval has passed already, soon, but not
/// before the mesh had time to come up.
fn rotation_wait(interval: Duration, key_age: Duration) -> Duration {
    interval.saturating_sub(key_age).max(ROTATION_START_DELAY)
}

/// The mesh carries IPv4 only: no IPv6 link-local address (and no router
/// solicitations into the tunnel) on it.
fn disable_ipv6(interface: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Ok(()) => {}
        // a kernel without IPv6
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("disabling IPv6 on {interface} ({path}): {e}"),
    }
}

fn log_peer_changes(old: &BTreeMap<String, Peer>, new: &BTreeMap<String, Peer>) {
    for (name, peer) in new {
        match old.get(name) {
            None => info!(
                peer = %name,
                endpoint = %peer.endpoint,
                public_key = %peer.public_key,
                allowed_ips = ?peer.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "peer configured"
            ),
            Some(before) if before != peer => info!(
                peer = %name,
                endpoint = %peer.endpoint,
                public_key = %peer.public_key,
                allowed_ips = ?peer.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "peer changed"
            ),
            _ => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        info!(peer = %name, "peer removed");
    }
}

/// The own Node's IPv4 pod CIDRs: from the datastore, waited for (bounded);
/// from the cache when the datastore has not synced yet.
async fn own_pod_cidrs(
    config: &Config,
    rx: &mut watch::Receiver<Arc<Cluster>>,
    cached: &cache::Cached,
) -> Result<Vec<Ipv4Net>> {
    let deadline = Instant::now() + OWN_NODE_WAIT;
    let mut told = false;
    loop {
        let snapshot = rx.borrow_and_update().clone();
        let name = &config.node_name;
        match snapshot.node(name) {
            Some(node) if !ipv4_cidrs(node).is_empty() => return Ok(ipv4_cidrs(node)),
            _ if !snapshot.synced() && !cached.pod_cidrs.is_empty() => {
                info!("datastore not synced yet: using the pod CIDRs from the peer cache");
                return Ok(cached.pod_cidrs.clone());
            }
            found => {
                if !told {
                    let what = match found {
                        None => "is not in the datastore",
                        Some(_) => "has no IPv4 pod CIDR (spec.podCIDR)",
                    };
                    info!("Node {name} {what} yet; waiting up to {OWN_NODE_WAIT:?}");
                    told = true;
                }
            }
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("the datastore stopped while waiting for Node {name}"),
            Err(_) => bail!(
                "Node {name} has no IPv4 pod CIDR in {} after {OWN_NODE_WAIT:?} \
                 (set spec.podCIDR on the Node)",
                config.datastore
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_rotations_follow_the_key_files_age() {
        let day = Duration::from_secs(86400);
        assert_eq!(rotation_wait(day, Duration::ZERO), day);
        assert_eq!(
            rotation_wait(day, day - Duration::from_secs(3600)),
            Duration::from_secs(3600)
        );
        // overdue (the agent was down when it was due): shortly after start
        assert_eq!(rotation_wait(day, 3 * day), ROTATION_START_DELAY);
        assert_eq!(
            rotation_wait(day, day - Duration::from_secs(1)),
            ROTATION_START_DELAY
        );
    }

    #[test]
    fn queued_requests_are_taken_in_order_up_to_the_batch_bound() {
        let (tx, mut rx) = mpsc::channel(16);
        for n in 1..=5 {
            tx.try_send(n).unwrap();
        }
        assert_eq!(drain_queued(0, &mut rx, 4), vec![0, 1, 2, 3]);
        // the rest stays queued for the next pass
        assert_eq!(drain_queued(9, &mut rx, 10), vec![9, 4, 5]);
        assert_eq!(drain_queued(7, &mut rx, 10), vec![7]);
    }

    #[test]
    fn the_node_address_is_the_first_host() {
        let net: Ipv4Net = "198.19.7.0/24".parse().unwrap();
        assert_eq!(first_host(&net).unwrap(), Ipv4Addr::new(198, 19, 7, 1));
        assert!(first_host(&"198.19.7.0/31".parse().unwrap()).is_err());
    }
}
