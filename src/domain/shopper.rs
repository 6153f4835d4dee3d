//! What the forwarder remembers of a shopper: who they are in CDP and which CDP browser they use.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What delivery remembers per shopper (queue key).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShopperState {
    /// `<BuyerID>-<UserID>` or `anon-<orderid>`, once resolved.
    pub identity: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub firstname: Option<String>,
    #[serde(default)]
    pub lastname: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    /// The CDP browser id used per channel.
    #[serde(default)]
    pub browsers: BTreeMap<String, String>,
    /// Identities this shopper was linked from (anonymous → registered).
    #[serde(default)]
    pub linked_from: Vec<String>,
}

/// A CDP browser id as the forwarder accepts it from a storefront's payload or from CDP itself:
/// 1 to 128 ASCII letters, digits, `-`, `_`, `.` or `:` (CDP mints UUIDs). Anything else — a NUL
/// that PostgreSQL cannot store, a megabyte of text, a path — is refused before it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrowserId(String);

impl BrowserId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(text: &str) -> Option<BrowserId> {
        let text = text.trim();
        let valid = (1..=Self::MAX_LEN).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        valid.then(|| BrowserId(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browser_ids_are_refused_unless_short_and_plain() {
        let uuid = "4b8d6c2a-0f3e-4c1b-9a7d-5e6f7a8b9c0d";
        assert_eq!(BrowserId::parse(uuid).unwrap().as_str(), uuid);
        assert_eq!(BrowserId::parse("  abc  ").unwrap().as_str(), "abc");
        for bad in ["", "a\0b", "a b", "../etc", "é", &"x".repeat(129), "a\"b"] {
            assert!(BrowserId::parse(bad).is_none(), "{bad:?}");
        }
        assert!(BrowserId::parse(&"x".repeat(128)).is_some());
    }
}
