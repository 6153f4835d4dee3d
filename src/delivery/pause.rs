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
    /// While paused: when to probe again, the current pause length, and whether a probe is out.
    state: Mutex<Option<Paused>>,
}

#[derive(Clone, Copy)]
struct Paused {
    probe_at: Instant,
    length: Duration,
    probing: bool,
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
    /// A probe's refusal doubles the pause (up to ten times the first); the refusals of requests
    /// that were on their way when the pause began do not.
    pub fn start(&self, reason: &str) -> Duration {
        let mut state = self.state.lock().expect("pause lock");
        let length = match *state {
            Some(p) if p.probing => (p.length * 2).min(self.first * 10),
            Some(p) => {
                // Already paused by this wave of refusals: the probe's time stands.
                return p.probe_at.saturating_duration_since(Instant::now());
            }
            None => self.first,
        };
        *state = Some(Paused {
            probe_at: Instant::now() + length,
            length,
            probing: false,
        });
        self.health.set("cdp", reason.to_string());
        warn!(
            reason,
            probe_in_secs = length.as_secs(),
            "CDP refuses the configuration: delivery paused"
        );
        length
    }

    /// CDP accepted an event or a browser/create: resume.
    pub fn end(&self) {
        let was_paused = self.state.lock().expect("pause lock").take().is_some();
        if was_paused {
            self.health.clear("cdp");
            info!("CDP accepts the configuration again: delivery resumed");
        }
    }

    /// `Some(wait)` while paused and no probe may go yet: the next is not due, or one is out.
    pub fn waiting(&self) -> Option<Duration> {
        let state = self.state.lock().expect("pause lock");
        state.and_then(|p| match p.probing {
            true => Some(p.length),
            false => p.probe_at.checked_duration_since(Instant::now()),
        })
    }

    pub fn is_paused(&self) -> bool {
        self.state.lock().expect("pause lock").is_some()
    }

    /// The probe is out: no other goes until its answer ([`Pause::start`], [`Pause::end`]) or
    /// [`Pause::probe_ended`].
    pub fn probing(&self) {
        if let Some(p) = self.state.lock().expect("pause lock").as_mut() {
            p.probing = true;
        }
    }

    /// The probe's intent ended without an answer from CDP on the key (it failed before reaching
    /// CDP, say): another may probe now.
    pub fn probe_ended(&self) {
        if let Some(p) = self.state.lock().expect("pause lock").as_mut() {
            if p.probing {
                p.probing = false;
                p.probe_at = Instant::now();
            }
        }
    }
}
