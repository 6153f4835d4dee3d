//! Retry delays: exponential from `initial_backoff_ms` to `max_backoff_ms`, with ±20 % jitter so
//! that shoppers failing together do not retry together.

use std::time::Duration;

use rand::Rng as _;

use crate::config::DeliverySettings;

/// The delay before attempt number `attempts + 1` (attempts ≥ 1).
pub fn delay(settings: &DeliverySettings, attempts: i64) -> Duration {
    let exponent = (attempts.max(1) - 1).min(30) as u32;
    let base = settings
        .initial_backoff_ms
        .saturating_mul(1u64 << exponent)
        .min(settings.max_backoff_ms) as f64;
    let jitter = rand::thread_rng().gen_range(0.8..=1.2);
    Duration::from_millis((base * jitter) as u64)
}

/// The delay CDP asked for with Retry-After, if any, else the backoff; never more than an hour.
pub fn retry_delay(settings: &DeliverySettings, attempts: i64, retry_after: Option<Duration>) -> Duration {
    retry_after
        .unwrap_or_else(|| delay(settings, attempts))
        .min(Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_and_caps() {
        let s = DeliverySettings {
            initial_backoff_ms: 1000,
            max_backoff_ms: 10_000,
            ..DeliverySettings::default()
        };
        for (attempts, base) in [
            (1, 1000.0),
            (2, 2000.0),
            (3, 4000.0),
            (4, 8000.0),
            (5, 10_000.0),
            (40, 10_000.0),
        ] {
            for _ in 0..50 {
                let d = delay(&s, attempts).as_millis() as f64;
                assert!(
                    d >= base * 0.8 - 1.0 && d <= base * 1.2 + 1.0,
                    "attempt {attempts}: {d}"
                );
            }
        }
    }

    #[test]
    fn retry_after_wins() {
        let s = DeliverySettings::default();
        assert_eq!(retry_delay(&s, 1, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(
            retry_delay(&s, 1, Some(Duration::from_secs(99_999))),
            Duration::from_secs(3600)
        );
    }
}
