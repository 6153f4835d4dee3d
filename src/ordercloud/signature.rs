//! `X-oc-hash`: standard Base64 of HMAC-SHA256 over the exact raw body, keyed by the webhook's HashKey.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

/// The `X-oc-hash` header value for `body` signed with `key`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(body);
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Why a signature was refused. Never carries the body or a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("X-oc-hash header is missing")]
    Missing,
    #[error("X-oc-hash is not standard Base64 of 32 bytes")]
    Malformed,
    #[error("X-oc-hash does not match any configured hash key")]
    Mismatch,
}

/// Checks `header` against every key in constant time per key; any key may sign (rotation).
pub fn verify(header: Option<&[u8]>, body: &[u8], keys: &[Secret]) -> Result<(), SignatureError> {
    verify_expected(&expected(header)?, body, keys)
}

/// The HMAC an `X-oc-hash` header names, or why it cannot be one: checked before the body is read,
/// so a request without a plausible signature costs neither its body's memory nor an HMAC.
pub fn expected(header: Option<&[u8]>) -> Result<Vec<u8>, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let header = std::str::from_utf8(header)
        .map_err(|_| SignatureError::Malformed)?
        .trim();
    if header.is_empty() {
        return Err(SignatureError::Missing);
    }
    let expected = STANDARD.decode(header).map_err(|_| SignatureError::Malformed)?;
    if expected.len() != 32 {
        return Err(SignatureError::Malformed);
    }
    Ok(expected)
}

/// Checks the HMAC from [`expected`] against every key, in constant time per key.
pub fn verify_expected(expected: &[u8], body: &[u8], keys: &[Secret]) -> Result<(), SignatureError> {
    // Check every key, not just until the first match, so timing does not tell which key signed.
    let mut matched = false;
    for key in keys.iter().filter(|k| !k.is_empty()) {
        let mut mac = HmacSha256::new_from_slice(key.expose().as_bytes()).expect("any key length");
        mac.update(body);
        matched |= mac.verify_slice(expected).is_ok();
    }
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_A_BODY: &str = r#"{"Route":"v1/buyers/{buyerID}/addresses/{addressID}","Verb":"PUT","Request":{"Body":{"City":"Minneapolis"}},"ConfigData":{"Foo":"blah"}}"#;
    const VECTOR_A_HASH: &str = "4NPw1O9AviSOC1A3C+HqkDutRLNwyABneY/3M2OqByE=";

    fn keys(list: &[&str]) -> Vec<Secret> {
        list.iter().map(|k| Secret::new(*k)).collect()
    }

    #[test]
    fn vector_a_from_ordercloud_test_suite() {
        assert_eq!(VECTOR_A_BODY.len(), 136);
        assert_eq!(sign(b"myhashkey", VECTOR_A_BODY.as_bytes()), VECTOR_A_HASH);
        assert_eq!(
            verify(
                Some(VECTOR_A_HASH.as_bytes()),
                VECTOR_A_BODY.as_bytes(),
                &keys(&["myhashkey"])
            ),
            Ok(())
        );
    }

    #[test]
    fn one_byte_change_of_body_or_key_fails() {
        let mut body = VECTOR_A_BODY.as_bytes().to_vec();
        body[20] ^= 1;
        assert_eq!(
            verify(Some(VECTOR_A_HASH.as_bytes()), &body, &keys(&["myhashkey"])),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                Some(VECTOR_A_HASH.as_bytes()),
                VECTOR_A_BODY.as_bytes(),
                &keys(&["myhashkez"])
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn vectors_b_c_d() {
        let b = r#"{"Route":"v1/buyers/{buyerID}","RouteParams":{"buyerID":"buyer_10"},"QueryParams":{},"Verb":"PUT","Date":"2021-04-04T19:41:39.6504645+00:00","LogID":"71ce120a-17d5-4833-89f6-4f9a33ddd42f","UserToken":"...","Request":{"Body":{"Active":true,"Name":"New Name Updated","xp":{"segment":"Foo"}},"Headers":null},"Response":{"Body":{},"Headers":null},"ConfigData":{"config_key":"config_value"}}"#;
        assert_eq!(
            sign(b"myhashkey", b.as_bytes()),
            "WF7dsca0MJWxrItMHkQjfFPfG4kI1e0/2Aon+Q8NzIo="
        );
        let c = format!("{VECTOR_A_BODY}\n");
        assert_eq!(
            sign(b"myhashkey", c.as_bytes()),
            "iZuTUwbRrHslFl/Wnta3C/v6G9d33trnHL+CPlBBCEA="
        );
        let d = "{\"Route\":\"v1/buyers/{buyerID}\",\"Verb\":\"PUT\",\"Request\":{\"Body\":{\"Name\":\"Caf\u{e9} \u{2013} B\u{fc}cher\"}}}";
        assert_eq!(d.len(), 92);
        assert_eq!(
            sign(b"myhashkey", d.as_bytes()),
            "hiNZkJa2yA3LAmZrkb756ZSszYQ5AKKUEaZUwgOJ61o="
        );
    }

    #[test]
    fn other_encodings_of_the_right_mac_are_refused() {
        let body = VECTOR_A_BODY.as_bytes();
        let k = keys(&["myhashkey"]);
        let hex = "e0d3f0d4ef40be248e0b50370be1ea903bad44b370c80067798ff73363aa0721";
        assert_ne!(verify(Some(hex.as_bytes()), body, &k), Ok(()));
        let url_safe = VECTOR_A_HASH.replace('+', "-").replace('/', "_");
        assert_ne!(verify(Some(url_safe.as_bytes()), body, &k), Ok(()));
        let unpadded = VECTOR_A_HASH.trim_end_matches('=');
        assert_ne!(verify(Some(unpadded.as_bytes()), body, &k), Ok(()));
        assert_eq!(verify(None, body, &k), Err(SignatureError::Missing));
    }

    #[test]
    fn any_configured_key_may_sign() {
        let k = keys(&["old-key", "myhashkey"]);
        assert_eq!(
            verify(Some(VECTOR_A_HASH.as_bytes()), VECTOR_A_BODY.as_bytes(), &k),
            Ok(())
        );
        let empty_keys: Vec<Secret> = keys(&[""]);
        assert_eq!(
            verify(Some(sign(b"", b"x").as_bytes()), b"x", &empty_keys),
            Err(SignatureError::Mismatch),
            "an empty key never verifies"
        );
    }
}
