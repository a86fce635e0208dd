//! meshward node keys: the x25519 key pair each node uses for the WireGuard
//! mesh.
//!
//! - [`NodeKey`] / [`PublicKey`]: keys as the `boringtun::x25519` types (so
//!   they go straight into boringtun) with the `wg` base64 text form.
//! - [`KeyStore`]: the private key on disk under the agent's state directory,
//!   mode 0600, written crash-safe, validated on every load (a bad file is an
//!   error, never silently replaced), and rotated with the old key kept until
//!   peers have switched over.
//!
//! The private key is never part of any `Debug` or `Display` output or error
//! message; the one way out in text form is
//! [`NodeKey::to_wg_base64_secret`], for writing the key file.

mod key;
mod store;

pub use key::{NodeKey, ParseKeyError, PublicKey};
pub use store::{KeyError, KeyStore, Rotation, DEFAULT_KEY_DIR};
