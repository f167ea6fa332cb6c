//! Token auth for upgrades: a JWT signed with HS256, in the `token` query parameter.
//!
//! Only HS256 is accepted (`alg: none` and every other algorithm are refused, so a
//! token cannot pick its own verification). `exp` is enforced when present; a
//! `channels` claim (list of names, a trailing `*` matches a prefix) limits which
//! channels the connection may join — absent means any channel.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401: no token, bad signature, wrong algorithm, expired, malformed.
    Unauthorized(&'static str),
    /// 403: a valid token that does not cover this channel.
    Forbidden,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Checks `token` for joining `channel` at `now` (Unix seconds).
pub fn authorize(token: Option<&str>, secret: &str, channel: &str, now: u64) -> Result<(), Denied> {
    let token = token.ok_or(Denied::Unauthorized("token required"))?;
    let claims = verify(token, secret.as_bytes())?;
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_f64().ok_or(Denied::Unauthorized("bad exp claim"))?;
        if (now as f64) >= exp {
            return Err(Denied::Unauthorized("token expired"));
        }
    }
    match claims.get("channels") {
        None => Ok(()),
        Some(serde_json::Value::Array(list)) => {
            let allowed = list
                .iter()
                .any(|p| p.as_str().is_some_and(|p| channel_matches(p, channel)));
            if allowed {
                Ok(())
            } else {
                Err(Denied::Forbidden)
            }
        }
        Some(_) => Err(Denied::Unauthorized("bad channels claim")),
    }
}

/// Checks `token` for a connection that names its channels later (Centrifugo's
/// `connect`): signature, algorithm and `exp`; the `channels` claim is checked per
/// channel with [`authorize`]. Returns `exp` (Unix seconds), if the token has one.
pub fn authenticate(token: Option<&str>, secret: &str, now: u64) -> Result<Option<u64>, Denied> {
    let token = token.ok_or(Denied::Unauthorized("token required"))?;
    let claims = verify(token, secret.as_bytes())?;
    match claims.get("exp") {
        None => Ok(None),
        Some(exp) => {
            let exp = exp.as_f64().ok_or(Denied::Unauthorized("bad exp claim"))?;
            if (now as f64) >= exp {
                return Err(Denied::Unauthorized("token expired"));
            }
            Ok(Some(exp as u64))
        }
    }
}

fn channel_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => pattern == channel,
    }
}

/// Verifies signature and header; returns the claims object.
fn verify(
    token: &str,
    secret: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, Denied> {
    let bad = Denied::Unauthorized("malformed token");
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    let header: serde_json::Value =
        serde_json::from_slice(&B64.decode(h).map_err(|_| bad.clone())?)
            .map_err(|_| bad.clone())?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err(Denied::Unauthorized("only HS256 tokens are accepted"));
    }
    let sig = B64.decode(s).map_err(|_| bad.clone())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| bad.clone())?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    mac.verify_slice(&sig)
        .map_err(|_| Denied::Unauthorized("bad token signature"))?;
    match serde_json::from_slice(&B64.decode(p).map_err(|_| bad.clone())?) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(bad),
    }
}

/// Signs claims (JSON object text) as an HS256 JWT. Used by tests and tools.
pub fn sign(claims_json: &str, secret: &str) -> String {
    let h = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let p = B64.encode(claims_json.as_bytes());
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new(); // HMAC accepts keys of any length
    };
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    let s = B64.encode(mac.finalize().into_bytes());
    format!("{h}.{p}.{s}")
}

/// Compares secrets without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_expired_wrong_signature_and_channels() {
        let t = sign(
            r#"{"sub":"u","exp":2000,"channels":["room.*","lobby"]}"#,
            "s3",
        );
        assert_eq!(authorize(Some(&t), "s3", "room.1", 1000), Ok(()));
        assert_eq!(authorize(Some(&t), "s3", "lobby", 1000), Ok(()));
        assert_eq!(
            authorize(Some(&t), "s3", "other", 1000),
            Err(Denied::Forbidden)
        );
        assert_eq!(
            authorize(Some(&t), "s3", "lobby", 2000),
            Err(Denied::Unauthorized("token expired"))
        );
        assert!(matches!(
            authorize(Some(&t), "nope", "lobby", 1000),
            Err(Denied::Unauthorized(_))
        ));
        assert!(matches!(
            authorize(None, "s3", "lobby", 1000),
            Err(Denied::Unauthorized(_))
        ));
        let any = sign(r#"{"sub":"u"}"#, "s3");
        assert_eq!(authorize(Some(&any), "s3", "whatever", 1), Ok(()));
    }

    #[test]
    fn alg_none_and_garbage_are_refused() {
        let h = B64.encode(br#"{"alg":"none"}"#);
        let p = B64.encode(br#"{"sub":"u"}"#);
        let t = format!("{h}.{p}.");
        assert_eq!(
            authorize(Some(&t), "s3", "a", 1),
            Err(Denied::Unauthorized("only HS256 tokens are accepted"))
        );
        for junk in ["", "a", "a.b", "a.b.c.d", "!!.!!.!!", "e30.e30.e30"] {
            assert!(
                matches!(
                    authorize(Some(junk), "s3", "a", 1),
                    Err(Denied::Unauthorized(_))
                ),
                "{junk}"
            );
        }
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
