//! Dead-letter operations shared by the CLI (`dead-letters …`) and the admin API (`/admin/dead-letters`).

use crate::domain::now_ms;
use crate::store::{DeadLetter, Operations, StoreError};

/// Which dead letters to put back in their shoppers' queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Ids(Vec<i64>),
    All,
    /// Dead-lettered at or after this time (epoch ms).
    Since(i64),
}

/// A time given by an operator: RFC 3339 (`2026-11-22T10:00:00Z`) or an age (`90s`, `15m`, `6h`, `7d`),
/// returned as epoch milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: i64 = number.parse().map_err(|_| {
        format!("{text:?} is not a time: use RFC 3339 (2026-11-22T10:00:00Z) or an age (90s, 15m, 6h, 7d)")
    })?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: an age needs a unit: s, m, h or d")),
    };
    Ok(now_ms() - n.saturating_mul(unit_ms))
}

pub async fn list(store: &dyn Operations, since_ms: Option<i64>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
    store.dead_letters(since_ms, limit).await
}

/// Puts the selected dead letters back in their shoppers' queues, in their original places.
pub async fn replay(store: &dyn Operations, selection: &Selection) -> Result<u64, StoreError> {
    let replayed = match selection {
        Selection::Ids(ids) => store.replay_dead_letters(Some(ids), None).await?,
        Selection::All => store.replay_dead_letters(None, None).await?,
        Selection::Since(since) => store.replay_dead_letters(None, Some(*since)).await?,
    };
    metrics::counter!("forwarder_dead_letters_replayed_total").increment(replayed);
    Ok(replayed)
}

/// Dead letters younger than this are purged only when forced: a purge that would take the ones
/// an operator is still looking at (`--before 0s`) needs `--force`.
pub const MIN_PURGE_AGE_MS: i64 = 3_600_000;

/// Refuses a purge of dead letters younger than [`MIN_PURGE_AGE_MS`] unless forced.
pub fn check_purge_age(before_ms: i64, force: bool) -> Result<(), String> {
    if !force && before_ms > now_ms() - MIN_PURGE_AGE_MS {
        return Err("refusing to purge dead letters younger than one hour".into());
    }
    Ok(())
}

pub async fn purge(store: &dyn Operations, before_ms: i64) -> Result<u64, StoreError> {
    store.purge_dead_letters(before_ms).await
}

/// One line per dead letter, for people.
pub fn format_line(d: &DeadLetter) -> String {
    let at = d
        .dead_at_ms
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    format!(
        "{}\t{}\t{}\t{}\tattempts={}\t{}",
        d.id,
        at,
        d.shopper_key,
        d.kind,
        d.attempts,
        d.last_error.as_deref().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_purge_of_the_last_hour_needs_force() {
        assert!(check_purge_age(parse_time("0s").unwrap(), false).is_err());
        assert!(check_purge_age(parse_time("59m").unwrap(), false).is_err());
        assert!(check_purge_age(parse_time("61m").unwrap(), false).is_ok());
        assert!(check_purge_age(parse_time("0s").unwrap(), true).is_ok());
    }

    #[test]
    fn times_as_dates_or_ages() {
        assert_eq!(parse_time("2026-11-22T10:00:00Z").unwrap(), 1_795_341_600_000);
        let hour_ago = parse_time("1h").unwrap();
        assert!((now_ms() - hour_ago - 3_600_000).abs() < 5_000);
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("5").is_err());
    }
}
