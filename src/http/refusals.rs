//! Refused requests, counted and logged without letting an attacker flood the logs: each reason is
//! logged at most once a second, with how many were refused for it since the last line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

/// At most one log line per reason this often.
const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Refusals {
    reasons: Mutex<HashMap<&'static str, Window>>,
}

struct Window {
    logged_at: Instant,
    /// Refused since that line, not logged.
    suppressed: u64,
}

impl Refusals {
    /// Counts a refused request (`forwarder_requests_refused_total{reason}`) and logs it, unless
    /// this reason was logged less than a second ago (then it is counted as suppressed, and the
    /// next line says how many were).
    pub fn refused(&self, reason: &'static str, detail: &str) {
        metrics::counter!("forwarder_requests_refused_total", "reason" => reason).increment(1);
        let now = Instant::now();
        let suppressed = {
            let mut reasons = self.reasons.lock().expect("refusals lock");
            match reasons.get_mut(reason) {
                Some(window) if now.duration_since(window.logged_at) < LOG_EVERY => {
                    window.suppressed += 1;
                    return;
                }
                Some(window) => {
                    let suppressed = window.suppressed;
                    *window = Window {
                        logged_at: now,
                        suppressed: 0,
                    };
                    suppressed
                }
                None => {
                    reasons.insert(
                        reason,
                        Window {
                            logged_at: now,
                            suppressed: 0,
                        },
                    );
                    0
                }
            }
        };
        warn!(reason, detail, suppressed, "request refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_reason_a_second_and_the_rest_counted() {
        let refusals = Refusals::default();
        for _ in 0..1000 {
            refusals.refused("401", "no signature");
        }
        refusals.refused("413", "too large");
        let reasons = refusals.reasons.lock().unwrap();
        assert_eq!(reasons["401"].suppressed, 999, "one logged, the rest counted");
        assert_eq!(reasons["413"].suppressed, 0, "each reason has its own window");
    }
}
