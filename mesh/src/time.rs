//! The clock this crate reads. With the `mock-time` feature both this crate
//! and boringtun read mock_instant's thread-local clock, so tests can move
//! time by minutes (rekeys, rotation timeouts) without sleeping.

#[cfg(feature = "mock-time")]
pub(crate) use mock_instant::Instant;
#[cfg(not(feature = "mock-time"))]
pub(crate) use std::time::Instant;
