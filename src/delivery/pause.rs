//! The pause while CDP refuses the client key (401/403) or redirects: nothing is dead-lettered,
//! readiness names the cause (a warning: webhooks are still taken and wait), and one intent probes
//! again after `delivery.auth_pause_secs`, doubling up to ten times as long, until CDP accepts the
//! key. An event refused again after CDP accepted a request sent since is refused for itself.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::health::Health;

pub struct Pause {
    first: Duration,
    health: Health,
    /// One lock, taken once per request CDP answers.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// While paused: when to probe again, the current pause length, and whether a probe is out.
    paused: Option<Paused>,
    /// Intents whose event CDP refused, and when.
    refused_at: HashMap<i64, Instant>,
    /// When the latest request CDP accepted was sent (kept while some intent is remembered refused).
    last_accepted_sent: Option<Instant>,
}

/// Intents remembered as refused, at most (a key refused for hours refuses a few at a time: the
/// probes). Past it the memory starts over.
const MAX_REFUSED: usize = 4096;

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
            state: Mutex::default(),
        }
    }

    /// Called from drop guards too, also while a panic unwinds: a poisoned lock is taken as it is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// CDP refused the event of intent `intent_id` (401/403, a redirect). When a request sent after
    /// this intent was last refused has been accepted since, the key works and the refusal is the
    /// event's own (a rule of CDP's or of a firewall in front of it): `None`, and the intent is a
    /// dead letter instead of pausing everyone's delivery again and again. Otherwise the pause
    /// begins, or goes on: `Some(wait)`.
    pub fn refused_event(&self, intent_id: i64, reason: &str) -> Option<Duration> {
        let mut state = self.state();
        let accepted_since = match (state.refused_at.get(&intent_id), state.last_accepted_sent) {
            (Some(refused), Some(accepted)) => accepted > *refused,
            _ => false,
        };
        if accepted_since {
            state.refused_at.remove(&intent_id);
            return None;
        }
        if state.refused_at.len() >= MAX_REFUSED {
            state.refused_at.clear();
        }
        state.refused_at.insert(intent_id, Instant::now());
        Some(self.pause(state, reason))
    }

    /// CDP refused the configuration outside any one event (browser/create): the pause begins, or
    /// goes on. Returns the wait.
    pub fn start(&self, reason: &str) -> Duration {
        self.pause(self.state(), reason)
    }

    /// Pauses, reports it, and says when to probe again (slowly). A probe's refusal doubles the
    /// pause (up to ten times the first); the refusals of requests that were on their way when the
    /// pause began do not.
    fn pause(&self, mut state: MutexGuard<'_, State>, reason: &str) -> Duration {
        let length = match state.paused {
            Some(p) if p.probing => (p.length * 2).min(self.first * 10),
            // Already paused by this wave of refusals: the probe's time stands.
            Some(p) => return p.probe_at.saturating_duration_since(Instant::now()),
            None => self.first,
        };
        state.paused = Some(Paused {
            probe_at: Instant::now() + length,
            length,
            probing: false,
        });
        drop(state);
        // A warning, not a problem: the replica stays ready and keeps taking webhooks (intake needs
        // only the store), which wait for CDP. Not ready, every replica would leave the load
        // balancer at once, and OrderCloud does not send a refused webhook again.
        self.health.warn("cdp", reason.to_string());
        warn!(
            reason,
            probe_in_secs = length.as_secs(),
            "CDP refuses the configuration: delivery paused"
        );
        length
    }

    /// CDP accepted a request sent at `sent_at` (an event, a browser/create): the key works;
    /// resume.
    pub fn accepted(&self, sent_at: Instant) {
        let was_paused = {
            let mut state = self.state();
            if !state.refused_at.is_empty() {
                state.last_accepted_sent = Some(state.last_accepted_sent.map_or(sent_at, |t| t.max(sent_at)));
            }
            state.paused.take().is_some()
        };
        if was_paused {
            self.health.clear("cdp");
            info!("CDP accepts the configuration again: delivery resumed");
        }
    }

    /// `Some(wait)` while paused and no probe may go yet: the next is not due, or one is out.
    pub fn waiting(&self) -> Option<Duration> {
        self.state().paused.and_then(|p| match p.probing {
            true => Some(p.length),
            false => p.probe_at.checked_duration_since(Instant::now()),
        })
    }

    pub fn is_paused(&self) -> bool {
        self.state().paused.is_some()
    }

    /// The probe is out: no other goes until its answer ([`Pause::refused_event`],
    /// [`Pause::accepted`]) or [`Pause::probe_ended`].
    pub fn probing(&self) {
        if let Some(p) = self.state().paused.as_mut() {
            p.probing = true;
        }
    }

    /// The probe's intent ended without an answer from CDP on the key (it failed before reaching
    /// CDP, say): another may probe now.
    pub fn probe_ended(&self) {
        if let Some(p) = self.state().paused.as_mut().filter(|p| p.probing) {
            p.probing = false;
            p.probe_at = Instant::now();
        }
    }
}
