//! The one place kubbi reads wall-clock time. Everything else asks a [`Clock`], so tests can
//! move time and so it is clear which code stamps time (the proposing leader) and which must
//! never read it (apply).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ids::Millis;

/// A source of wall-clock time in milliseconds since the epoch.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Millis;
}

/// The system clock, optionally shifted by a fixed offset (tests of skew and expiry).
#[derive(Debug, Default, Clone)]
pub struct SystemClock {
    offset_ms: Arc<AtomicI64>,
}

impl SystemClock {
    /// Shifts this clock (and every clone of it) by `delta_ms`.
    pub fn advance(&self, delta_ms: i64) {
        self.offset_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        (real + self.offset_ms.load(Ordering::SeqCst)).max(0) as Millis
    }
}
