//! The one clock of stored times: epoch milliseconds, UTC.

/// Current time in epoch milliseconds, the unit of every stored time.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
