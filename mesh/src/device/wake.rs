//! Stopping blocked workers: every descriptor is non-blocking and a worker
//! that runs dry waits (epoll; poll for the rare send-buffer-full wait) on
//! its descriptor *and* one eventfd shared by the device. Shutdown writes the eventfd once; it stays readable, so
//! every worker wakes, sees the flag and returns.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

pub(crate) struct Stop {
    flag: AtomicBool,
    event: EventFd,
}

/// Why a wait returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    Ready,
    TimedOut,
    Stop,
}

impl Stop {
    pub fn new() -> io::Result<Stop> {
        let event =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(io::Error::from)?;
        Ok(Stop {
            flag: AtomicBool::new(false),
            event,
        })
    }

    pub fn stopped(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    pub fn trigger(&self) {
        self.flag.store(true, Ordering::Relaxed);
        // Cannot fail short of the counter overflowing, which one write never does.
        let _ = self.event.write(1);
    }

    /// Waits until `fd` has `events` (`POLLIN`/`POLLOUT`), the device stops,
    /// or `timeout` passes (`None`: no timeout).
    pub fn wait(&self, fd: BorrowedFd<'_>, events: PollFlags, timeout: Option<Duration>) -> Wait {
        if self.stopped() {
            return Wait::Stop;
        }
        let timeout = match timeout {
            None => PollTimeout::NONE,
            Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [
            PollFd::new(fd, events),
            PollFd::new(self.event.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => Wait::TimedOut,
            Ok(_) if self.stopped() => Wait::Stop,
            Ok(_) => Wait::Ready,
            // A signal: let the caller retry its I/O.
            Err(Errno::EINTR) => Wait::Ready,
            Err(_) => {
                // poll itself failing (EFAULT, ENOMEM) should not spin a core.
                std::thread::sleep(Duration::from_millis(10));
                Wait::Ready
            }
        }
    }

    /// A waiter for a worker's one descriptor becoming readable: an epoll
    /// set holding it and the stop eventfd, registered once (poll would
    /// add and remove both wait-queue entries on every wait: measurable
    /// per packet when traffic is sparse). Falls back to `poll` if epoll
    /// cannot be set up.
    pub fn readable<'a>(&'a self, fds: &[BorrowedFd<'a>]) -> Waiter<'a> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).and_then(|epoll| {
            for fd in fds {
                epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
            }
            epoll.add(&self.event, EpollEvent::new(EpollFlags::EPOLLIN, 1))?;
            Ok(epoll)
        });
        if let Err(e) = &epoll {
            tracing::warn!(error = %e, "epoll unavailable; waiting with poll");
        }
        Waiter {
            stop: self,
            fds: fds.to_vec(),
            epoll: epoll.ok(),
        }
    }

    /// Sleeps up to `timeout`, returning early (`true`) when the device stops.
    pub fn sleep(&self, timeout: Duration) -> bool {
        if self.stopped() {
            return true;
        }
        let mut fds = [PollFd::new(self.event.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut fds, timeout);
        self.stopped()
    }
}

pub(crate) struct Waiter<'a> {
    stop: &'a Stop,
    fds: Vec<BorrowedFd<'a>>,
    epoll: Option<Epoll>,
}

impl Waiter<'_> {
    /// Waits until a descriptor is readable or the device stops.
    pub fn wait(&self) -> Wait {
        if self.stop.stopped() {
            return Wait::Stop;
        }
        let Some(epoll) = &self.epoll else {
            return self.poll_all();
        };
        let mut events = [EpollEvent::empty(); 3];
        match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(_) if self.stop.stopped() => Wait::Stop,
            Ok(_) | Err(Errno::EINTR) => Wait::Ready,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                Wait::Ready
            }
        }
    }
}

impl Waiter<'_> {
    fn poll_all(&self) -> Wait {
        let mut fds: Vec<PollFd<'_>> = self
            .fds
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(self.stop.event.as_fd(), PollFlags::POLLIN));
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if self.stop.stopped() => Wait::Stop,
            Ok(_) | Err(Errno::EINTR) => Wait::Ready,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                Wait::Ready
            }
        }
    }
}
