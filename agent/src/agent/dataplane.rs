//! The data plane: `meshward_mesh::device::Device` (the TUN `mw0`, the UDP
//! socket and the worker threads around the sans-IO mesh).
//!
//! The device is built on its own branch; until it is part of the
//! workspace, the agent is compiled against it only with the `device`
//! feature, and without it [`Device::start`] fails with a clear error (the
//! rest of the agent, the lab and the tests that need no data plane still
//! build and run). This file is the only place that names the device.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use meshward_mesh::Mesh;

/// Name of the tunnel interface.
pub const TUN_NAME: &str = "mw0";

/// Whether this build has the mesh data plane.
pub const AVAILABLE: bool = cfg!(feature = "device");

/// What the device is started with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mtu: u32,
    pub listen: SocketAddr,
    pub workers: usize,
}

#[cfg(feature = "device")]
pub struct Device(meshward_mesh::device::Device);

#[cfg(feature = "device")]
impl Device {
    /// Creates `mw0` (MTU set, up) and the UDP socket in the calling
    /// thread's network namespace, and starts moving packets.
    pub fn start(mesh: Arc<Mesh>, settings: &Settings) -> io::Result<Device> {
        let config = meshward_mesh::device::DeviceConfig {
            tun_name: TUN_NAME.to_string(),
            mtu: settings.mtu,
            listen: settings.listen,
            workers: settings.workers,
        };
        meshward_mesh::device::Device::start(mesh, config).map(Device)
    }

    pub fn tun_name(&self) -> &str {
        self.0.tun_name()
    }

    pub fn tun_index(&self) -> u32 {
        self.0.tun_index()
    }

    /// Stops the workers and closes the TUN (which removes `mw0` and every
    /// route through it).
    pub fn shutdown(self) {
        self.0.shutdown()
    }
}

#[cfg(not(feature = "device"))]
pub struct Device(std::convert::Infallible);

#[cfg(not(feature = "device"))]
impl Device {
    pub fn start(mesh: Arc<Mesh>, settings: &Settings) -> io::Result<Device> {
        drop(mesh);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "cannot create {TUN_NAME} (MTU {}, UDP {}, {} workers): this meshward was built \
                 without the mesh data plane (meshward_mesh::device; build with --features device)",
                settings.mtu, settings.listen, settings.workers
            ),
        ))
    }

    pub fn tun_name(&self) -> &str {
        match self.0 {}
    }

    pub fn tun_index(&self) -> u32 {
        match self.0 {}
    }

    pub fn shutdown(self) {
        match self.0 {}
    }
}
