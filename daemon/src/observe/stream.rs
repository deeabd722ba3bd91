//! The ring-buffer consumer: drains the `events` ring on tokio and decodes each record.
//!
//! The BPF side wakes the consumer only in batches (threshold or interval, see
//! process.bpf.c), so besides epoll readiness the consumer also drains every
//! `poll_interval`: the last events before a quiet period are never stranded.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::ObserveError;
use super::event::{self, Event};

/// Most records one [`EventStream::drain`] takes, so a storm cannot starve the caller.
const MAX_BATCH: usize = 65_536;

/// Decoded events from the observer's ring buffer, in ring order (the order of reservation,
/// which follows each task's own order of events).
#[derive(Debug)]
pub struct EventStream {
    ring: AsyncFd<RingFd>,
    poll_interval: Duration,
    malformed: u64,
}

/// The ring buffer, with the fd contract [`AsyncFd`] registration needs.
struct RingFd(RingBuf<MapData>);

impl std::fmt::Debug for RingFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RingFd").field(&self.as_raw_fd()).finish()
    }
}

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl EventStream {
    /// Registers `ring` with the current tokio runtime (the caller checked there is one).
    pub(super) fn new(
        ring: RingBuf<MapData>,
        poll_interval: Duration,
    ) -> Result<Self, ObserveError> {
        // SAFETY: RingFd owns the RingBuf, which owns the map's OwnedFd; the fd therefore stays
        // open and refers to the same ring for as long as the AsyncFd (its owner) lives, and
        // as_raw_fd always returns that same fd.
        let ring = unsafe { AsyncFd::register_with_interest(RingFd(ring), Interest::READABLE) }
            .map_err(|err| ObserveError::Register {
                source: err.into_parts().1,
            })?;
        Ok(Self {
            ring,
            poll_interval,
            malformed: 0,
        })
    }

    /// Waits until at least one event is available, then appends what is there (up to a batch
    /// limit) to `out` and returns how many were appended.
    pub async fn next_batch(&mut self, out: &mut Vec<Event>) -> Result<usize, ObserveError> {
        loop {
            let appended = self.drain(out);
            if appended > 0 {
                return Ok(appended);
            }
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    // Clear first, drain next: data committed after this point sets
                    // readiness again, so no wakeup is lost between the two.
                    guard.map_err(|source| ObserveError::Poll { source })?.clear_ready();
                }
                () = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }

    /// Appends the events available now (up to a batch limit) to `out`, without waiting.
    pub fn drain(&mut self, out: &mut Vec<Event>) -> usize {
        let ring = &mut self.ring.get_mut().0;
        let mut appended = 0;
        while appended < MAX_BATCH {
            let Some(record) = ring.next() else { break };
            match event::decode(&record) {
                Ok(event) => {
                    out.push(event);
                    appended += 1;
                }
                Err(err) => {
                    if self.malformed == 0 {
                        tracing::error!(%err, "observer ring buffer record does not match events.h");
                    }
                    self.malformed += 1;
                }
            }
        }
        appended
    }

    /// Drains until the ring stays empty for `quiet`: the tail of a finished step.
    pub async fn drain_until_quiet(&mut self, out: &mut Vec<Event>, quiet: Duration) -> usize {
        let mut appended = 0;
        loop {
            let n = self.drain(out);
            appended += n;
            if n == 0 {
                tokio::time::sleep(quiet).await;
                let n = self.drain(out);
                appended += n;
                if n == 0 {
                    return appended;
                }
            }
        }
    }

    /// Records that could not be decoded (BPF object and decoder disagree; should stay 0).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }
}
