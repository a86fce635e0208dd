//! The local node's static keys: the current one, and during a rotation the
//! previous one, still accepted from peers that have not learned the new key.

use std::sync::Arc;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::time::Instant;

pub(crate) struct LocalKey {
    /// Increases by one per rotation; tunnels remember which key they use.
    pub generation: u64,
    pub secret: StaticSecret,
    pub public: PublicKey,
    /// Verifies mac1 (which names the key an initiation is addressed to) and
    /// answers with cookies under load, before any Diffie-Hellman is spent.
    pub rate_limiter: Arc<RateLimiter>,
}

impl LocalKey {
    pub fn new(secret: StaticSecret, generation: u64, handshake_rate_limit: u64) -> LocalKey {
        let public = PublicKey::from(&secret);
        LocalKey {
            generation,
            rate_limiter: Arc::new(RateLimiter::new(&public, handshake_rate_limit)),
            secret,
            public,
        }
    }
}

pub(crate) struct PreviousKey {
    pub key: Arc<LocalKey>,
    pub retired_at: Instant,
}

pub(crate) struct LocalKeys {
    pub current: Arc<LocalKey>,
    pub previous: Option<PreviousKey>,
}

impl LocalKeys {
    pub fn holds(&self, generation: u64) -> bool {
        self.current.generation == generation
            || self
                .previous
                .as_ref()
                .is_some_and(|previous| previous.key.generation == generation)
    }

    /// Current first: most initiations are addressed to it.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<LocalKey>> {
        std::iter::once(&self.current).chain(self.previous.as_ref().map(|previous| &previous.key))
    }
}
