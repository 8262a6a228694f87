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
