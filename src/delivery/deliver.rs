//! One claimed intent through the stages: gather → plan → send → settle, with its lease kept
//! alive meanwhile (its renewal polled beside them, on the same task).

use std::sync::Arc;

use tokio::sync::watch;
use tracing::Instrument as _;

use super::lease::{Claiming, Lease};
use super::settle::{settle, Attempt, Failure};
use super::{gather, send, Deps};
use crate::store::{ClaimedIntent, Write};

/// Delivers one claimed intent and settles it.
pub async fn process(deps: Arc<Deps>, claimed: ClaimedIntent, claiming: Claiming, stop: watch::Receiver<bool>) {
    let span = tracing::info_span!(
        "delivery",
        intent_id = claimed.claim.intent_id,
        shopper = %claimed.shopper_key,
        kind = claimed.intent.kind.label(),
        attempt = claimed.attempts,
    );
    async {
        let (lease, renewal) = Lease::keep(
            deps.store.clone(),
            claimed.claim.clone(),
            deps.settings.delivery.lease(),
            claiming,
        );
        let work = async {
            let result = deliver(&deps, &claimed, &lease, &stop).await;
            settle(&deps, &Attempt::of(&claimed), result).await;
        };
        // The renewal never ends: the delivery and its settling do.
        tokio::select! {
            () = work => {}
            () = renewal => {}
        }
    }
    .instrument(span)
    .await
}

/// Returns the writes to make with the ack once CDP acknowledged every event.
async fn deliver(
    deps: &Deps,
    claimed: &ClaimedIntent,
    lease: &Lease,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<Write>, Failure> {
    let mut gathered = gather::gather(deps, claimed).await?;
    let mut writes = send::send(deps, claimed, &mut gathered, lease, stop).await?;
    writes.extend(gathered.finish_writes());
    Ok(writes)
}
