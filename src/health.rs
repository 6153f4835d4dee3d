//! Conditions that the parts of the service notice and readiness reports: problems make the
//! service not ready; warnings are shown but keep it ready (a replica that takes no webhooks loses
//! them: OrderCloud does not retry).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Health {
    conditions: Arc<Mutex<BTreeMap<&'static str, Condition>>>,
}

#[derive(Clone)]
struct Condition {
    text: String,
    blocks_readiness: bool,
}

impl Health {
    /// Reports a problem under `source`, replacing an earlier one: the service is not ready.
    pub fn set(&self, source: &'static str, problem: impl Into<String>) {
        self.insert(source, problem.into(), true);
    }

    /// Reports a warning under `source`: shown by readiness, which stays ready.
    pub fn warn(&self, source: &'static str, warning: impl Into<String>) {
        self.insert(source, warning.into(), false);
    }

    pub fn clear(&self, source: &'static str) {
        self.conditions.lock().expect("health lock").remove(source);
    }

    /// `source: problem` for every problem.
    pub fn problems(&self) -> Vec<String> {
        self.list(true)
    }

    /// `source: warning` for every warning.
    pub fn warnings(&self) -> Vec<String> {
        self.list(false)
    }

    fn insert(&self, source: &'static str, text: String, blocks_readiness: bool) {
        self.conditions
            .lock()
            .expect("health lock")
            .insert(source, Condition { text, blocks_readiness });
    }

    fn list(&self, blocking: bool) -> Vec<String> {
        self.conditions
            .lock()
            .expect("health lock")
            .iter()
            .filter(|(_, c)| c.blocks_readiness == blocking)
            .map(|(source, c)| format!("{source}: {}", c.text))
            .collect()
    }
}
