//! meshward-cni: the CNI plugin (spec 0.4.0, 1.0.0, 1.1.0) that gives each
//! pod an L3 veth with a /32 address from the node's pod CIDR.
//!
//! `spec` is the protocol (pure), `ipam` the crash-safe address store,
//! `datapath` the netlink work, `plugin` the commands tying them together.

pub mod datapath;
pub mod error;
pub mod ipam;
pub mod netns;
pub mod notify;
pub mod plugin;
pub mod spec;
