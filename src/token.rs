//! Signed mode for the tenant context: when `tenancy.context_key_file` names a key,
//! `tenancy.set_org()` only accepts a tenant (and actor) together with a token minted by the
//! application tier that holds the same key. Injected SQL has no key and cannot mint one.
//!
//! Token format (documented in docs/context.md):
//!
//! ```text
//! token   = "v1." expiry "." base64url_nopad(HMAC-SHA256(key, message))
//! message = "pg_tenancy.context.v1\n" org "\n" actor "\n" expiry
//! ```
//!
//! `expiry` is Unix seconds in decimal, `org` the tenant id in the form `set_org` stores
//! (canonical lower-case UUID by default), `actor` the actor id or the empty string.

use crate::error::{Result, TenancyError};
use crate::keyfile;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use pgrx::prelude::*;
use sha2::Sha256;
use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted context key: 256 bits.
pub const MIN_KEY_BYTES: usize = 32;
const DOMAIN: &str = "pg_tenancy.context.v1";

thread_local! {
    /// The loaded context key of this backend; dropped (and zeroised) on reload.
    static KEY: RefCell<Option<Zeroizing<Vec<u8>>>> = const { RefCell::new(None) };
}

/// Assign hook of `tenancy.context_key_file`: runs at start and on every reload, so the key
/// is read again from the file the next time it is needed.
#[pg_guard]
pub unsafe extern "C-unwind" fn context_key_file_assigned(
    _newval: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    KEY.with(|k| k.borrow_mut().take());
}

/// The message a token signs.
pub fn message(org: &str, actor: Option<&str>, expiry: u64) -> String {
    format!("{DOMAIN}\n{org}\n{}\n{expiry}", actor.unwrap_or(""))
}

/// Mints a token; used by tests and documented for application tiers.
pub fn mint(key: &[u8], org: &str, actor: Option<&str>, expiry: u64) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message(org, actor, expiry).as_bytes());
    format!(
        "v1.{expiry}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// Checks `token` against the tenant, actor and clock. Constant-time comparison.
pub fn verify(key: &[u8], token: &str, org: &str, actor: Option<&str>, now: u64) -> Result<()> {
    let malformed = |reason| TenancyError::TokenMalformed { reason };
    let mut parts = token.splitn(3, '.');
    if parts.next() != Some("v1") {
        return Err(malformed("the token must start with \"v1.\""));
    }
    let expiry = parts
        .next()
        .filter(|s| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(malformed("the expiry must be Unix seconds in decimal"))?;
    let sig = parts
        .next()
        .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
        .filter(|s| s.len() == 32)
        .ok_or(malformed(
            "the signature must be 32 bytes in unpadded base64url",
        ))?;
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message(org, actor, expiry).as_bytes());
    mac.verify_slice(&sig)
        .map_err(|_| TenancyError::TokenInvalid)?;
    // Expiry is checked after the signature so an attacker learns nothing from timing it.
    if expiry <= now {
        return Err(TenancyError::TokenExpired);
    }
    Ok(())
}

/// Verifies a token for `set_org` when signed mode is on. Returns whether the context is
/// signed (and so the actor verified).
pub fn check_for_set_org(token: Option<&str>, org: &str, actor: Option<&str>) -> Result<bool> {
    let Some(path) = crate::gucs::context_key_file() else {
        return Ok(false);
    };
    let token = token.ok_or(TenancyError::TokenRequired)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    with_key(&path, |key| verify(key, token, org, actor, now))?;
    Ok(true)
}

fn with_key<T>(path: &str, f: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
    KEY.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let problem = |p: keyfile::KeyFileProblem| TenancyError::KeyFile {
                path: path.to_string(),
                reason: p.0,
            };
            let raw = keyfile::read_secret_file(path).map_err(problem)?;
            *slot = Some(keyfile::decode_hex_key(&raw, MIN_KEY_BYTES).map_err(problem)?);
        }
        f(slot.as_ref().expect("loaded just above"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = &[7u8; 32];
    const ORG: &str = "6f1c1f9e-8d3a-4c7e-9f1e-0a6b5d4c3b2a";

    #[test]
    fn test_fuzz_mutated_and_random_tokens_are_refused_without_panic() {
        let valid = mint(KEY, ORG, Some("u1"), 2_000_000_000);
        let mut rng = crate::fuzz::Rng::new(0x5eed_0002);
        for i in 0..crate::fuzz::iterations() {
            let input = if i % 2 == 0 {
                String::from_utf8_lossy(&rng.mutate(valid.as_bytes())).into_owned()
            } else {
                rng.string(80)
            };
            if verify(KEY, &input, ORG, Some("u1"), 1_900_000_000).is_ok() {
                assert_eq!(input, valid, "a changed token verified");
            }
        }
    }

    #[test]
    fn test_minted_token_verifies() {
        let t = mint(KEY, ORG, Some("user-1"), 2_000);
        assert!(verify(KEY, &t, ORG, Some("user-1"), 1_000).is_ok());
    }

    #[test]
    fn test_token_is_bound_to_org_actor_key_and_time() {
        let t = mint(KEY, ORG, Some("user-1"), 2_000);
        let other_org = "7f1c1f9e-8d3a-4c7e-9f1e-0a6b5d4c3b2a";
        assert!(matches!(
            verify(KEY, &t, other_org, Some("user-1"), 1_000),
            Err(TenancyError::TokenInvalid)
        ));
        assert!(matches!(
            verify(KEY, &t, ORG, Some("user-2"), 1_000),
            Err(TenancyError::TokenInvalid)
        ));
        assert!(matches!(
            verify(KEY, &t, ORG, None, 1_000),
            Err(TenancyError::TokenInvalid)
        ));
        assert!(matches!(
            verify(&[8u8; 32], &t, ORG, Some("user-1"), 1_000),
            Err(TenancyError::TokenInvalid)
        ));
        assert!(matches!(
            verify(KEY, &t, ORG, Some("user-1"), 2_000),
            Err(TenancyError::TokenExpired)
        ));
    }

    #[test]
    fn test_tampered_expiry_is_refused() {
        let t = mint(KEY, ORG, None, 2_000);
        let forged = t.replacen("v1.2000.", "v1.9999999999.", 1);
        assert!(matches!(
            verify(KEY, &forged, ORG, None, 1_000),
            Err(TenancyError::TokenInvalid)
        ));
    }

    #[test]
    fn test_malformed_tokens_are_refused_without_panic() {
        for bad in [
            "",
            "v1",
            "v1.",
            "v2.1.AAAA",
            "v1.x.AAAA",
            "v1.1.",
            "v1.1.!!!!",
            "v1.-1.AAAA",
            "v1.99999999999999999999999.AAAA",
            "v1.1.QUJD",
        ] {
            assert!(
                matches!(
                    verify(KEY, bad, ORG, None, 0),
                    Err(TenancyError::TokenMalformed { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn test_rfc4231_case_2_hmac_sha256() {
        // RFC 4231 test case 2: proves the MAC primitive is HMAC-SHA256 as documented.
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
