//! The pause while CDP refuses the client key (401/403) or redirects: nothing is dead-lettered,
//! readiness names the cause, and one intent probes again after `delivery.auth_pause_secs`,
//! doubling up to ten times as long, until CDP accepts the key.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::health::Health;

pub struct Pause {
    first: Duration,
    health: Health,
    /// While paused: when to probe again, and the current pause length.
    state: Mutex<Option<(Instant, Duration)>>,
}

impl Pause {
    pub fn new(first: Duration, health: Health) -> Pause {
        Pause {
            first,
            health,
            state: Mutex::new(None),
        }
    }

    /// CDP refused the configuration: pause, report it, probe again later (slowly). Returns the wait.
    pub fn start(&self, reason: &str) -> Duration {
        let mut state = self.state.lock().expect("pause lock");
        let next = match *state {
            Some((_, last)) => (last * 2).min(self.first * 10),
            None => self.first,
        };
        *state = Some((Instant::now() + next, next));
        self.health.set("cdp", reason.to_string());
        warn!(
            reason,
            probe_in_secs = next.as_secs(),
            "CDP refuses the configuration: delivery paused"
        );
        next
    }

    /// CDP accepted an event or a browser/create: resume.
    pub fn end(&self) {
        let was_paused = self.state.lock().expect("pause lock").take().is_some();
        if was_paused {
            self.health.clear("cdp");
            info!("CDP accepts the configuration again: delivery resumed");
        }
    }

    /// `Some(wait)` while paused and the next probe is not due yet.
    pub fn waiting(&self) -> Option<Duration> {
        let state = self.state.lock().expect("pause lock");
        state.and_then(|(probe_at, _)| probe_at.checked_duration_since(Instant::now()))
    }

    pub fn is_paused(&self) -> bool {
        self.state.lock().expect("pause lock").is_some()
    }
}
