//! A Bloom filter of the LogIDs in `seen_webhooks`, so that a new LogID (nearly every webhook's)
//! is known to be new without reading the index: in production the index holds a week of LogIDs,
//! and a lookup of a random key reads a random leaf. It answers "absent" (certain) or "maybe" (the
//! index decides); keys pruned from the index stay in the filter, which only makes "maybe" likelier.

use std::hash::{DefaultHasher, Hash, Hasher};

use super::seen::SeenKey;

/// Bits per key the filter is sized for: about 1 % of new keys read the index anyway.
const BITS_PER_KEY: u64 = 10;
/// Bits probed per key (the best count for 10 bits a key).
const PROBES: u64 = 7;
/// The smallest filter: 8 Mbit, 1 MiB, for up to about 840,000 keys.
const MIN_BITS: u64 = 1 << 23;
/// The largest: 64 Mbit, 8 MiB, for 6.7 million keys at 1 %. Past that more new keys read the
/// index (a fifth of them at 20 million keys), and none is ever taken for a duplicate.
const MAX_BITS: u64 = 1 << 26;

pub(super) struct KeyFilter {
    bits: Vec<u64>,
    /// Bit count minus one (a power of two).
    mask: u64,
    /// Keys added.
    added: u64,
}

impl KeyFilter {
    /// An empty filter with room for `keys` and as many again.
    pub fn for_keys(keys: u64) -> KeyFilter {
        let bits = (keys.saturating_mul(2).saturating_mul(BITS_PER_KEY))
            .clamp(MIN_BITS, MAX_BITS)
            .next_power_of_two();
        KeyFilter {
            bits: vec![0; (bits / 64) as usize],
            mask: bits - 1,
            added: 0,
        }
    }

    pub fn insert(&mut self, key: &SeenKey) {
        for bit in self.probes(key) {
            self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.added += 1;
    }

    /// `false`: the key was never inserted.
    pub fn may_contain(&self, key: &SeenKey) -> bool {
        self.probes(key)
            .all(|bit| self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// More keys added than it was sized for (below its largest size): build it again, larger.
    pub fn is_full(&self) -> bool {
        let (bits, capacity) = (self.mask + 1, (self.mask + 1) / BITS_PER_KEY);
        self.added > capacity && bits < MAX_BITS
    }

    /// The bits a key sets: `h1 + i·h2` for two hashes (GUIDs are random: their halves serve).
    fn probes(&self, key: &SeenKey) -> impl Iterator<Item = u64> {
        let (h1, h2) = match key {
            SeenKey::Guid(b) => (
                u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
            ),
            SeenKey::Text(t) => {
                let mut first = DefaultHasher::new();
                t.hash(&mut first);
                let mut second = DefaultHasher::new();
                (t, 1u8).hash(&mut second);
                (first.finish(), second.finish())
            }
        };
        let (mask, h2) = (self.mask, h2 | 1);
        (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guid(i: u64) -> SeenKey {
        SeenKey::new(
            &uuid::Uuid::from_u128((i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)).to_string(),
        )
    }

    #[test]
    fn inserted_keys_are_always_found_and_few_others_are() {
        let mut filter = KeyFilter::for_keys(100_000);
        for i in 0..200_000 {
            filter.insert(&guid(i));
            filter.insert(&SeenKey::Text(format!("sha256:{i}")));
        }
        assert!((0..200_000).all(|i| filter.may_contain(&guid(i))));
        assert!((0..200_000).all(|i| filter.may_contain(&SeenKey::Text(format!("sha256:{i}")))));
        let false_positives = (200_000..300_000).filter(|&i| filter.may_contain(&guid(i))).count();
        assert!(false_positives < 2_000, "{false_positives} of 100,000 new keys");
        assert!(!filter.is_full(), "sized for twice its keys: 400,000 fit");
        let mut small = KeyFilter::for_keys(0);
        for i in 0..900_000 {
            small.insert(&guid(i));
        }
        assert!(small.is_full(), "past the smallest filter's 840,000 keys");
    }
}
