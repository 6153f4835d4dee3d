//! Conditions that make the service not ready, set by the parts that notice them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Health {
    problems: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Health {
    /// Reports a problem under `source`, replacing an earlier one.
    pub fn set(&self, source: &'static str, problem: impl Into<String>) {
        self.problems
            .lock()
            .expect("health lock")
            .insert(source, problem.into());
    }

    pub fn clear(&self, source: &'static str) {
        self.problems.lock().expect("health lock").remove(source);
    }

    pub fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .expect("health lock")
            .iter()
            .map(|(source, p)| format!("{source}: {p}"))
            .collect()
    }
}
