//! The pause while CDP refuses the client key (401/403) or redirects: nothing is dead-lettered,
//! readiness names the cause (a warning: webhooks are still taken and wait), and one intent probes again after `delivery.auth_pause_secs`,
//! doubling up to ten times as long, until CDP accepts the key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::health::Health;

pub struct Pause {
    first: Duration,
    health: Health,
    /// While paused: when to probe again, the current pause length, and whether a probe is out.
    state: Mutex<Option<Paused>>,
    /// Intents whose event CDP refused, and when; and when the latest request CDP accepted was sent.
    refusals: Mutex<Refusals>,
}

#[derive(Default)]
struct Refusals {
    refused_at: HashMap<i64, Instant>,
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
            state: Mutex::new(None),
            refusals: Mutex::default(),
        }
    }

    /// CDP refused the event of intent `intent_id` (401/403, a redirect). When a request sent after
    /// this intent was last refused has been accepted since, the key works and the refusal is the
    /// event's own (a rule of CDP's or of a firewall in front of it): `None`, and the intent is a
    /// dead letter instead of pausing everyone's delivery again and again. Otherwise the pause
    /// begins, or goes on: `Some(wait)`.
    pub fn refused_event(&self, intent_id: i64, reason: &str) -> Option<Duration> {
        {
            let mut refusals = self.refusals.lock().expect("refusals lock");
            let accepted_since = match (refusals.refused_at.get(&intent_id), refusals.last_accepted_sent) {
                (Some(refused), Some(accepted)) => accepted > *refused,
                _ => false,
            };
            if accepted_since {
                refusals.refused_at.remove(&intent_id);
                return None;
            }
            if refusals.refused_at.len() >= MAX_REFUSED {
                refusals.refused_at.clear();
            }
            refusals.refused_at.insert(intent_id, Instant::now());
        }
        Some(self.start(reason))
    }

    /// CDP accepted a request sent at `sent_at`: the key works; resume.
    pub fn accepted(&self, sent_at: Instant) {
        {
            let mut refusals = self.refusals.lock().expect("refusals lock");
            if !refusals.refused_at.is_empty() {
                refusals.last_accepted_sent = Some(refusals.last_accepted_sent.map_or(sent_at, |t| t.max(sent_at)));
            }
        }
        self.end();
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
        // A warning, not a problem: the replica stays ready and keeps taking webhooks (intake needs only
        // the store), which wait for CDP. Not ready, every replica would leave the load balancer at
        // once, and OrderCloud does not send a refused webhook again.
        self.health.warn("cdp", reason.to_string());
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
        // Called from a drop guard, also while a panic unwinds: a poisoned lock is taken as it is.
        if let Some(p) = self.state.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            if p.probing {
                p.probing = false;
                p.probe_at = Instant::now();
            }
        }
    }
}
