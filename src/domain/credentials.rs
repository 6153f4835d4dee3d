//! Credentials in what OrderCloud sends or answers: a password, a token or a secret under any key
//! of a body, at any depth (an `xp` field, a query parameter). None is ever stored with an intent:
//! intake and reconciliation erase them before the store sees the intent.

use serde_json::Value;

/// Whether a JSON key names a credential: a password, a token or a secret, in any letter case.
pub fn is_credential_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "passwd", "pwd", "token", "secret"]
        .iter()
        .any(|word| key.contains(word))
}

/// Removes credential-like keys at every depth; true when something was removed.
pub fn strip(value: &mut Value) -> bool {
    match value {
        Value::Object(map) => {
            let before = map.len();
            map.retain(|k, _| !is_credential_key(k));
            let mut removed = map.len() != before;
            for v in map.values_mut() {
                removed |= strip(v);
            }
            removed
        }
        Value::Array(items) => items.iter_mut().fold(false, |removed, v| strip(v) | removed),
        _ => false,
    }
}
