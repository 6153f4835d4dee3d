//! Registered shoppers' identities (`<BuyerID>-<UserID>`) that enrichment has resolved and stored,
//! kept in memory for intake: a later line change of such a shopper on an order's route needs
//! nothing else from OrderCloud, so intake stores it enriched already (as it does an anonymous
//! shopper's), without its token, and it skips the enrichment round: a claim, a decode of the
//! intent and a rewrite of its row.
//!
//! The stored record (`shoppers.identity`) is what enrichment itself reads for such an intent; this
//! memory only ever holds what was stored there, learned after the store answered. It starts empty
//! and holds up to [`CAPACITY`] shoppers; when full it is emptied (a miss costs only the enrichment
//! round it would have saved).

use std::collections::HashMap;
use std::sync::Mutex;

/// Shoppers remembered at most (a count: keys and identities are short strings).
pub const CAPACITY: usize = 65_536;

#[derive(Default)]
pub struct KnownIdentities {
    /// Boxed strings: no spare capacity kept per entry.
    by_shopper: Mutex<HashMap<Box<str>, Box<str>>>,
}

impl KnownIdentities {
    /// The identity stored for the shopper with this queue key, if learned.
    pub fn get(&self, shopper_key: &str) -> Option<String> {
        self.lock().get(shopper_key).map(|i| i.to_string())
    }

    /// Remembers identities once they are stored: `(shopper key, identity)`.
    pub fn learn(&self, stored: &[(String, String)]) {
        let mut map = self.lock();
        for (key, identity) in stored {
            if map.len() >= CAPACITY && !map.contains_key(key.as_str()) {
                map.clear();
            }
            map.insert(key.as_str().into(), identity.as_str().into());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Box<str>>> {
        // Plain inserts and reads cannot leave the map half-changed: a poisoned lock is still usable.
        self.by_shopper.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_learned_identity_is_found_and_a_full_memory_starts_over() {
        let known = KnownIdentities::default();
        assert_eq!(known.get("user:a"), None);
        known.learn(&[("user:a".into(), "buyer-a".into())]);
        assert_eq!(known.get("user:a").as_deref(), Some("buyer-a"));
        let many: Vec<(String, String)> = (0..CAPACITY).map(|n| (format!("user:{n}"), format!("b-{n}"))).collect();
        known.learn(&many);
        assert!(known.lock().len() <= CAPACITY);
        assert_eq!(
            known.get(&format!("user:{}", CAPACITY - 1)).as_deref(),
            Some(&*format!("b-{}", CAPACITY - 1))
        );
    }
}
