//! One reconciliation pass: take the window's lease, list the orders submitted in the window page
//! by page, look their submits up in the dedupe (one query a page), and store a submit for each
//! order that has none — read its lines first, so only lost orders cost more calls. Then move the
//! watermark to the end of the window.

use std::collections::HashSet;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use super::submit::{shopper_of, submit_of};
use super::Reconciler;
use crate::domain::intent::submit_dedupe_key;
use crate::domain::now_ms;
use crate::ordercloud::admin::AdminError;
use crate::store::{EnqueueOutcome, StoreError};

/// Pages read with one query (10,000 orders); a window with more is read in several.
const MAX_PAGES: u32 = 100;
/// A bound on the queries of one pass (a million orders), against a server that never stops.
const MAX_WINDOWS: u32 = 100;

/// Lost orders whose lines could not be read for now (OrderCloud failing on them) that a pass
/// passes over before it takes OrderCloud for down and stops.
const MAX_UNREAD: u64 = 3;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Orders listed in the window.
    pub listed: u64,
    /// Submits stored by this pass (orders whose webhook never came).
    pub sent: u64,
    /// The first lost order whose lines could not be read for now: (order ID, submitted at, why).
    /// The pass went on past it, and the watermark stops before it: the next pass tries it again.
    pub unread: Option<(String, i64, String)>,
    unread_count: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    OrderCloud(#[from] AdminError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("another replica took the reconciliation window over during the pass")]
    LeaseLost,
}

pub async fn run(r: &Reconciler) -> Result<Report, PassError> {
    let Some(watermark) = r.store.lease_reconciler(&r.holder, r.lease()).await? else {
        return Ok(Report::default());
    };
    r.saw_watermark(watermark);
    let settings = &r.settings.reconcile;
    let now = now_ms();
    let lag = secs_to_ms(settings.lag_secs);
    let until = now - lag;
    let floor = now - secs_to_ms(settings.lookback_secs);
    // Each pass looks back over the lag again: orders the search cache showed late are found then;
    // never before the store's migration to the ledger (earlier submits are keyed by LogID, and
    // would look lost).
    let since = r.store.ledger_since().await?.unwrap_or(i64::MIN);
    let from = watermark.map_or(floor, |w| w - lag).max(floor).max(since);
    let mut report = Report::default();
    if from >= until {
        return Ok(report);
    }
    let anonymous = r.anonymous_usernames().await?;
    let api = r.ordercloud.base().to_string();
    // Listed a hundred pages at a time; a window that holds more goes on from the time of the last
    // order read (the same query from a later time, that time included: orders submitted at the
    // same instant may not all have been read; those that were are passed over), so a pass
    // finishes its window.
    let mut window_from = from;
    // Whether the next query takes in the orders submitted at `window_from` itself.
    let mut inclusive = true;
    // The orders the last query read at its last instant, where the next query begins.
    let mut read_at_start: HashSet<String> = HashSet::new();
    let mut finished = false;
    'windows: for _ in 0..MAX_WINDOWS {
        let from_text = iso(window_from);
        let mut last_read = None;
        let mut read_at_last: HashSet<String> = HashSet::new();
        for page in 1..=MAX_PAGES {
            let list = r.ordercloud.submitted_orders(&from_text, inclusive, page).await?;
            let items = list.get("Items").and_then(Value::as_array).cloned().unwrap_or_default();
            let mut in_window = Vec::with_capacity(items.len());
            let mut past_window = false;
            for order in items {
                let (Some(id), Some(submitted)) = (
                    order.get("ID").and_then(Value::as_str).map(str::to_string),
                    order.get("DateSubmitted").and_then(Value::as_str).and_then(parse_ms),
                ) else {
                    continue;
                };
                if submitted > until {
                    past_window = true;
                    break;
                }
                if read_at_start.contains(&id) {
                    continue;
                }
                if last_read != Some(submitted) {
                    last_read = Some(submitted);
                    read_at_last.clear();
                }
                read_at_last.insert(id.clone());
                in_window.push((id, submitted, order));
            }
            report.listed += in_window.len() as u64;
            send_lost(r, &in_window, &api, &anonymous, &mut report).await?;
            let total_pages = list.pointer("/Meta/TotalPages").and_then(Value::as_u64).unwrap_or(1);
            if past_window || u64::from(page) >= total_pages {
                finished = true;
                break 'windows;
            }
            if r.store.lease_reconciler(&r.holder, r.lease()).await?.is_none() {
                return Err(PassError::LeaseLost);
            }
        }
        match last_read {
            Some(last) if last > window_from => {
                window_from = last;
                inclusive = true;
                read_at_start = read_at_last;
            }
            // A hundred pages all submitted at `window_from` (ten thousand orders in one
            // millisecond): the rest of that instant cannot be reached by this listing; the pass
            // goes on after it rather than end its window there.
            _ if inclusive => {
                tracing::warn!(
                    at = %iso(window_from),
                    "more than 10,000 orders listed as submitted at one instant: the rest of that instant is not reconciled"
                );
                inclusive = false;
                read_at_start.clear();
            }
            // A server that ignores the filter: the same orders again.
            _ => break,
        }
    }
    // A window not finished (a listing that does not move on, or more than a million orders) is
    // taken up by the next pass from where this one stopped; an order whose lines could not be
    // read is looked at again by the next pass: the window ends just before it.
    let mut reached = if finished { until } else { window_from };
    if !finished {
        tracing::warn!(at = %iso(reached), "a reconciliation pass stopped before the end of its window: the next pass goes on from there");
    }
    if let Some((_, submitted, _)) = &report.unread {
        reached = reached.min(submitted - 1);
    }
    if !r.store.advance_reconciler(&r.holder, reached).await? {
        return Err(PassError::LeaseLost);
    }
    r.saw_watermark(Some(reached));
    Ok(report)
}

/// Stores the submit of each order of a page that the service holds none for.
async fn send_lost(
    r: &Reconciler,
    orders: &[(String, i64, Value)],
    api: &str,
    anonymous: &[String],
    report: &mut Report,
) -> Result<(), PassError> {
    let keys: Vec<String> = orders.iter().map(|(id, _, _)| submit_dedupe_key(id)).collect();
    let known = r.store.known_dedupe_keys(&keys).await?;
    for ((id, submitted, order), key) in orders.iter().zip(&keys) {
        if known.contains(key) {
            continue;
        }
        let Some(shopper) = shopper_of(order, api, anonymous) else {
            tracing::warn!(order = %id, "a submitted order without FromCompanyID and FromUser: not reconciled");
            continue;
        };
        let lines = match r.ordercloud.order_lines(id).await {
            Ok(lines) => lines,
            // This order's lines cannot be read (deleted meanwhile?): it is left out, the others go
            // on; OrderCloud down or the credentials refused stop the pass (the window is kept).
            Err(e @ AdminError::Permanent(..)) => {
                tracing::warn!(order = %id, error = %e, "cannot read a lost order's lines: not reconciled");
                continue;
            }
            // OrderCloud failing on this order for now (a 5xx, a timeout): the others go on, and
            // the next pass tries it again; past a few such orders OrderCloud is taken for down.
            Err(e @ AdminError::Transient(..)) if report.unread_count < MAX_UNREAD => {
                tracing::warn!(order = %id, error = %e, "cannot read a lost order's lines for now: tried again next pass");
                report.unread_count += 1;
                if report.unread.as_ref().is_none_or(|(_, at, _)| submitted < at) {
                    report.unread = Some((id.clone(), *submitted, e.to_string()));
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let submit = submit_of(order, lines, shopper, api, *submitted);
        if let EnqueueOutcome::Queued(_) = r.store.enqueue(submit).await? {
            report.sent += 1;
            metrics::counter!("orders_reconciled_total").increment(1);
            tracing::info!(order = %id, "the order's submit webhook never came: sent from reconciliation");
        }
    }
    Ok(())
}

fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// An epoch-ms time as OrderCloud's filters take it (UTC, `Z`: no `+` to be read as a space).
fn iso(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_ms(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
        .or_else(|| {
            // OrderCloud may omit the offset: the time is UTC then.
            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc().timestamp_millis())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_go_out_in_utc_and_come_back_with_or_without_an_offset() {
        assert_eq!(iso(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_ms("1970-01-01T00:00:01.500Z"), Some(1500));
        assert_eq!(parse_ms("1970-01-01T01:00:01+01:00"), Some(1000));
        assert_eq!(parse_ms("1970-01-01T00:00:02.25"), Some(2250));
        assert_eq!(parse_ms("yesterday"), None);
    }
}
