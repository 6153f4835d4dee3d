//! OrderCloud access-token claims, read without network. The token arrives inside an
//! HMAC-verified body, so its signature is not checked here.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The claims the forwarder uses. `role` may be a string or a list, so it is not typed.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct TokenClaims {
    #[serde(default)]
    pub usr: Option<String>,
    #[serde(default)]
    pub cid: Option<String>,
    #[serde(default)]
    pub usrtype: Option<String>,
    #[serde(default)]
    pub aud: Option<String>,
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub exp: Option<i64>,
    #[serde(default)]
    pub nbf: Option<i64>,
    /// Present only on anonymous shoppers' tokens.
    #[serde(default)]
    pub orderid: Option<String>,
}

impl TokenClaims {
    pub fn is_anonymous(&self) -> bool {
        self.orderid.as_deref().is_some_and(|o| !o.is_empty())
    }

    /// True when the token has expired at `now` (epoch seconds).
    pub fn expired_at(&self, now_secs: i64) -> bool {
        self.exp.is_some_and(|exp| exp <= now_secs)
    }
}

/// Why a UserToken cannot name a shopper.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("UserToken is missing")]
    Missing,
    #[error("UserToken is not a decodable JWT")]
    Undecodable,
    #[error("UserToken has neither an orderid nor a usr claim")]
    NoShopper,
    #[error("UserToken's orderid, usr or aud claim holds control characters or is longer than 512 bytes")]
    UnusableClaim,
}

/// A claim that names a queue: printable, and short enough for any store's key.
fn usable(claim: &str) -> bool {
    claim.len() <= 512 && !claim.chars().any(char::is_control)
}

/// Decodes the claims of an OrderCloud JWT without verifying its signature or lifetime.
pub fn decode_claims(token: &str) -> Result<TokenClaims, TokenError> {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.insecure_disable_signature_validation();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    validation.algorithms = vec![
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::HS256,
        Algorithm::HS384,
        Algorithm::HS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::EdDSA,
    ];
    jsonwebtoken::decode::<TokenClaims>(token, &DecodingKey::from_secret(&[]), &validation)
        .map(|data| data.claims)
        .map_err(|_| TokenError::Undecodable)
}

/// The queue a webhook belongs to, decided at intake without network:
/// `anon-<orderid>` for anonymous shoppers, `user:<aud host>:<usr>` for registered ones.
/// The CDP identity `<BuyerID>-<UserID>` of a registered shopper is resolved at delivery.
pub fn shopper_key(claims: &TokenClaims) -> Result<String, TokenError> {
    for claim in [&claims.orderid, &claims.usr, &claims.aud].into_iter().flatten() {
        if !usable(claim) {
            return Err(TokenError::UnusableClaim);
        }
    }
    if let Some(orderid) = claims.orderid.as_deref().filter(|o| !o.is_empty()) {
        return Ok(format!("anon-{orderid}"));
    }
    let usr = claims
        .usr
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or(TokenError::NoShopper)?;
    let host = claims
        .aud
        .as_deref()
        .map(|aud| {
            aud.trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
        })
        .unwrap_or("");
    Ok(format!("user:{host}:{usr}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    /// An unsigned-looking JWT with the given claims (the signature is never checked).
    pub fn jwt(claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header}.{payload}.c2lnbmF0dXJl")
    }

    #[test]
    fn anonymous_token_gives_anon_orderid() {
        let t = jwt(
            serde_json::json!({"usr":"anon-template","cid":"c1","orderid":"iEYOUdiVuEKbhEfK3QrRIA","usrtype":"buyer","role":["Shopper","MeAdmin"],"aud":"https://api.ordercloud.io","exp":1525123397}),
        );
        let claims = decode_claims(&t).unwrap();
        assert!(claims.is_anonymous());
        assert_eq!(shopper_key(&claims).unwrap(), "anon-iEYOUdiVuEKbhEfK3QrRIA");
    }

    #[test]
    fn registered_token_gives_aud_and_usr() {
        let t = jwt(
            serde_json::json!({"usr":"jane","cid":"c1","usrtype":"buyer","role":"Shopper","aud":"https://sandboxapi.ordercloud.io","exp":1}),
        );
        let claims = decode_claims(&t).unwrap();
        assert!(!claims.is_anonymous());
        assert_eq!(shopper_key(&claims).unwrap(), "user:sandboxapi.ordercloud.io:jane");
        assert!(claims.expired_at(2));
    }

    #[test]
    fn garbage_is_undecodable() {
        assert_eq!(decode_claims("..."), Err(TokenError::Undecodable));
        assert_eq!(decode_claims("not-a-jwt"), Err(TokenError::Undecodable));
        let no_user = decode_claims(&jwt(serde_json::json!({"cid":"c"}))).unwrap();
        assert_eq!(shopper_key(&no_user), Err(TokenError::NoShopper));
    }
}
