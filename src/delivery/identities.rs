//! Registered shoppers' identities (`<BuyerID>-<UserID>`) that enrichment has resolved and stored,
//! kept in memory for intake: a later line change of such a shopper on an order's route needs
//! nothing else from OrderCloud, so intake stores it enriched already (as it does an anonymous
//! shopper's), without its token, and it skips the enrichment round: a claim, a decode of the
//! intent and a rewrite of its row.
//!
//! The stored record (`shoppers.identity`) is what enrichment itself reads for such an intent; this
//! memory only ever holds what was stored there, learned after the store answered. It starts empty
//! and holds up to [`CAPACITY_BYTES`] of keys and identities (about 100 bytes a shopper: some 40,000
//! shoppers; a key is the token's user name and API host, each at most 512 bytes); when full it is
//! emptied (a miss costs only the enrichment round it would have saved).

use std::collections::HashMap;
use std::sync::Mutex;

/// Bytes of keys and identities remembered at most, each entry counted with [`ENTRY_OVERHEAD`].
pub const CAPACITY_BYTES: usize = 4 << 20;
/// What an entry costs beside its text: the table's slot and two allocations' headers, about.
const ENTRY_OVERHEAD: usize = 64;

#[derive(Default)]
pub struct KnownIdentities {
    memory: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    /// Boxed strings: no spare capacity kept per entry.
    by_shopper: HashMap<Box<str>, Box<str>>,
    bytes: usize,
}

fn entry_bytes(key: &str, identity: &str) -> usize {
    key.len() + identity.len() + ENTRY_OVERHEAD
}

impl KnownIdentities {
    /// The identity stored for the shopper with this queue key, if learned.
    pub fn get(&self, shopper_key: &str) -> Option<String> {
        self.lock().by_shopper.get(shopper_key).map(|i| i.to_string())
    }

    /// Remembers identities once they are stored: `(shopper key, identity)`.
    pub fn learn(&self, stored: &[(String, String)]) {
        let mut memory = self.lock();
        for (key, identity) in stored {
            let bytes = entry_bytes(key, identity);
            if memory.bytes + bytes > CAPACITY_BYTES {
                memory.by_shopper.clear();
                memory.bytes = 0;
            }
            if let Some(old) = memory.by_shopper.insert(key.as_str().into(), identity.as_str().into()) {
                memory.bytes -= entry_bytes(key, &old);
            }
            memory.bytes += bytes;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        // No panic can happen between the map's change and the count's: a poisoned lock is usable.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
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
        // The same shopper learned again is counted once.
        known.learn(&[("user:a".into(), "buyer-a".into())]);
        assert_eq!(known.lock().bytes, entry_bytes("user:a", "buyer-a"));
        // Long keys (a token's user name and host may be 512 bytes each) fill it sooner: it starts over.
        let long = "x".repeat(1000);
        let n = CAPACITY_BYTES / entry_bytes(&format!("user:{long}:0"), "b") + 10;
        let many: Vec<(String, String)> = (0..n).map(|i| (format!("user:{long}:{i}"), "b".to_string())).collect();
        known.learn(&many);
        let memory = known.lock();
        assert!(memory.bytes <= CAPACITY_BYTES, "{} bytes", memory.bytes);
        assert!(memory.by_shopper.len() < n);
        let sum: usize = memory.by_shopper.iter().map(|(k, v)| entry_bytes(k, v)).sum();
        assert_eq!(memory.bytes, sum);
        drop(memory);
        assert_eq!(known.get(&format!("user:{long}:{}", n - 1)).as_deref(), Some("b"));
    }
}
