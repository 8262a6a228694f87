//! A downstream connection's place in its listener's connection limit and in the connection
//! gauges. The connection holds it, and so does the tunnel an HTTP upgrade turns it into, so an
//! upgraded connection keeps counting against `max_connections` (and in
//! `downstream_cx_active` / `server.total_connections`, which the drain waits on) until its last
//! byte.

use tokio::sync::OwnedSemaphorePermit;

use crate::stats::Stat;

pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    gauges: Vec<Stat>,
}

impl ConnSlot {
    /// Takes the permit and raises each gauge by one until the slot is dropped.
    pub fn new(permit: OwnedSemaphorePermit, gauges: Vec<Stat>) -> Self {
        for g in &gauges {
            g.inc();
        }
        Self {
            _permit: permit,
            gauges,
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        for g in &self.gauges {
            g.dec();
        }
    }
}

impl std::fmt::Debug for ConnSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnSlot")
    }
}

/// The process-wide connection count against `limits.global_max_connections`.
#[derive(Debug, Clone)]
pub struct Overload {
    total: Stat,
    max: u64,
}

impl Overload {
    pub fn new(total: Stat, max: usize) -> Self {
        Self {
            total,
            max: max as u64,
        }
    }

    /// At the limit: a new connection is refused.
    pub fn full(&self) -> bool {
        self.total.get() >= self.max
    }

    /// From 90 % of the limit: keep-alive is shed.
    pub fn shedding(&self) -> bool {
        self.total.get().saturating_mul(10) >= self.max.saturating_mul(9)
    }
}
