//! Rate-limited logging: bad datagrams arrive at line rate from anyone, so a
//! log line per drop would be a denial of service on the log itself.

use std::time::Duration;

use parking_lot::Mutex;

use crate::time::Instant;

/// Lets through at most `max_lines` lines per `interval` and counts the rest,
/// so the next line that gets through can say how many were suppressed.
#[derive(Debug)]
pub struct RateLimitedLog {
    max_lines: u32,
    interval: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    emitted: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(max_lines: u32, interval: Duration) -> Self {
        RateLimitedLog {
            max_lines,
            interval,
            window: Mutex::new(Window {
                started: None,
                emitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(suppressed)` when a line may be written now, `suppressed` being
    /// the number of lines swallowed since the last one written; `None` when
    /// this line must be dropped (it is counted).
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut window = self.window.lock();
        let expired = match window.started {
            None => true,
            Some(started) => now.saturating_duration_since(started) >= self.interval,
        };
        if expired {
            window.started = Some(now);
            window.emitted = 0;
        }
        if window.emitted < self.max_lines {
            window.emitted += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            None
        }
    }

    /// Lines swallowed and not yet reported by a line that got through.
    pub fn suppressed(&self) -> u64 {
        self.window.lock().suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_then_counts_suppressed_lines() {
        let log = RateLimitedLog::new(3, Duration::from_secs(3600));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), Some(0));
        for _ in 0..10 {
            assert_eq!(log.admit(), None);
        }
        assert_eq!(log.suppressed(), 10);
    }

    #[test]
    fn a_new_window_reports_what_the_last_one_suppressed() {
        let log = RateLimitedLog::new(1, Duration::from_millis(1));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        #[cfg(feature = "mock-time")]
        mock_instant::MockClock::advance(Duration::from_millis(2));
        #[cfg(not(feature = "mock-time"))]
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(log.admit(), Some(2));
        assert_eq!(log.suppressed(), 0);
    }
}
