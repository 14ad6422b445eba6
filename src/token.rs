//! Signed mode for the tenant context: when `tenancy.context_key_file` names a key,
//! `tenancy.set_org()` only accepts a tenant (and actor) together with a token minted by the
//! application tier that holds the same key. Injected SQL has no key and cannot mint one.
//!
//! Token format (documented in docs/context.md):
//!
//! ```text
//! token   = "v2." expiry "." nonce "." base64url_nopad(HMAC-SHA256(key, message))
//! message = "pg_tenancy.context.v2\n" org "\n" actor "\n" expiry "\n" nonce
//! ```
//!
//! `expiry` is Unix seconds in decimal, `nonce` 16 to 64 base64url characters chosen at random
//! per token, `org` the tenant id in the form `set_org` stores (canonical lower-case UUID by
//! default), `actor` the actor id or the empty string. 0.2.0's `v1` tokens (no nonce) are
//! still accepted.
//!
//! A token is **single-use**: its signature is remembered cluster-wide (shared memory) until
//! it expires, and a second `set_org` with it is refused, so a token read from
//! `pg_stat_activity` or a log cannot be replayed.

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
pub(crate) const MIN_KEY_BYTES: usize = 32;
const DOMAIN: &str = "pg_tenancy.context.v1";
const DOMAIN_V2: &str = "pg_tenancy.context.v2";

/// Tokens remembered at once (24 bytes each: 1.5 MiB of shared memory). A token occupies a
/// slot until it expires; with 60-second tokens that is about 1,000 set_org calls a second.
const SEEN_SLOTS: usize = 65_536;
/// Slots a token may land in (and a replay is looked for in), from its hash.
const SEEN_PROBE: usize = 64;

#[derive(Clone, Copy)]
#[repr(C)]
struct Seen {
    digest: [u8; 16],
    expiry: u64,
}

#[repr(C)]
struct SeenTokens {
    slots: [Seen; SEEN_SLOTS],
}

const SEEN_NAME: &std::ffi::CStr = c"pg_tenancy_seen_tokens";

/// The table in shared memory and its lock, set up once by the postmaster (children inherit
/// them). Laid out by hand rather than with pgrx's `PgLwLock`, which builds the 1.5 MiB
/// initial value on the postmaster's stack: all zeros is the empty table.
static mut SEEN: *mut SeenTokens = std::ptr::null_mut();
static mut SEEN_LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;

unsafe fn request_shmem() {
    pg_sys::RequestAddinShmemSpace(std::mem::size_of::<SeenTokens>());
    pg_sys::RequestNamedLWLockTranche(SEEN_NAME.as_ptr(), 1);
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    if let Some(prev) = PREV_SHMEM_REQUEST {
        // SAFETY: the hook installed before ours; C, so called inside the FFI boundary.
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev());
    }
    request_shmem();
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    if let Some(prev) = PREV_SHMEM_STARTUP {
        // SAFETY: the hook installed before ours; C, so called inside the FFI boundary.
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev());
    }
    // AddinShmemInitLock is MainLWLockArray[21] (lwlocknames.txt).
    let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
    pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut found = false;
    let table = pg_sys::ShmemInitStruct(
        SEEN_NAME.as_ptr(),
        std::mem::size_of::<SeenTokens>(),
        &mut found,
    )
    .cast::<SeenTokens>();
    if !found {
        std::ptr::write_bytes(table, 0, 1);
    }
    SEEN = table;
    SEEN_LOCK = &raw mut (*pg_sys::GetNamedLWLockTranche(SEEN_NAME.as_ptr())).lock;
    pg_sys::LWLockRelease(init_lock);
}

/// Sets up the cluster-wide memory of used tokens; only from `_PG_init` under preload.
pub(crate) fn init() {
    if !crate::preload::is_preloaded() {
        return;
    }
    // SAFETY: _PG_init of a preloaded library, in the postmaster; hooks are chained.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        request_shmem();
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        {
            PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(shmem_request);
        }
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

/// Records the token with signature `sig` as used until `expiry`; refuses one already used.
fn use_once(sig: &[u8; 32], expiry: u64, now: u64) -> Result<()> {
    if !crate::preload::is_preloaded() {
        // No shared memory to remember tokens in: signed mode cannot be single-use.
        return Err(TenancyError::TokenMemoryFull);
    }
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&sig[..16]);
    let start =
        (u64::from_le_bytes(sig[16..24].try_into().expect("8 bytes")) as usize) % SEEN_SLOTS;
    // SAFETY: SEEN and SEEN_LOCK were set up by the postmaster (preloaded, checked above);
    // the table is only touched under the exclusive lock, released on every path below
    // (nothing in between can raise).
    unsafe {
        if SEEN.is_null() || SEEN_LOCK.is_null() {
            return Err(TenancyError::TokenMemoryFull);
        }
        pg_sys::LWLockAcquire(SEEN_LOCK, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let slots = &mut (*SEEN).slots;
        let mut free = None;
        let mut replayed = false;
        for i in 0..SEEN_PROBE {
            let slot = (start + i) % SEEN_SLOTS;
            let s = slots[slot];
            if s.expiry > now {
                if s.digest == digest {
                    replayed = true;
                    break;
                }
            } else if free.is_none() {
                free = Some(slot);
            }
        }
        let result = if replayed {
            Err(TenancyError::TokenReplayed)
        } else if let Some(slot) = free {
            slots[slot] = Seen { digest, expiry };
            Ok(())
        } else {
            Err(TenancyError::TokenMemoryFull)
        };
        pg_sys::LWLockRelease(SEEN_LOCK);
        result
    }
}

thread_local! {
    /// The loaded context key of this backend; dropped (and zeroised) on reload.
    static KEY: RefCell<Option<Vec<Zeroizing<Vec<u8>>>>> = const { RefCell::new(None) };
}

/// Assign hook of `tenancy.context_key_file`: runs at start and on every reload, so the key
/// is read again from the file the next time it is needed.
#[pg_guard]
pub(crate) unsafe extern "C-unwind" fn context_key_file_assigned(
    _newval: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    KEY.with(|k| k.borrow_mut().take());
}

/// The message a token signs.
pub(crate) fn message(org: &str, actor: Option<&str>, expiry: u64) -> String {
    format!("{DOMAIN}\n{org}\n{}\n{expiry}", actor.unwrap_or(""))
}

/// The message a v2 token signs.
pub(crate) fn message_v2(org: &str, actor: Option<&str>, expiry: u64, nonce: &str) -> String {
    format!(
        "{DOMAIN_V2}\n{org}\n{}\n{expiry}\n{nonce}",
        actor.unwrap_or("")
    )
}

/// Mints a v2 token with a random nonce, as docs/context.md shows application tiers doing
/// (the tests' reference minter).
#[cfg(test)]
pub(crate) fn mint(key: &[u8], org: &str, actor: Option<&str>, expiry: u64) -> String {
    let mut raw = [0u8; 16];
    getrandom::getrandom(&mut raw).expect("the OS has randomness");
    let nonce = URL_SAFE_NO_PAD.encode(raw);
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message_v2(org, actor, expiry, &nonce).as_bytes());
    format!(
        "v2.{expiry}.{nonce}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// Mints a 0.2.0 (v1) token, without a nonce.
#[cfg(test)]
pub(crate) fn mint_v1(key: &[u8], org: &str, actor: Option<&str>, expiry: u64) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message(org, actor, expiry).as_bytes());
    format!(
        "v1.{expiry}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// Checks `token` against the tenant, actor and clock (constant-time comparison); returns
/// its signature and expiry, which identify it for [`use_once`].
pub(crate) fn verify(
    key: &[u8],
    token: &str,
    org: &str,
    actor: Option<&str>,
    now: u64,
) -> Result<([u8; 32], u64)> {
    let malformed = |reason| TenancyError::TokenMalformed { reason };
    let v2 = token.starts_with("v2.");
    let mut parts = token.splitn(if v2 { 4 } else { 3 }, '.');
    if !matches!(parts.next(), Some("v1" | "v2")) {
        return Err(malformed(
            "the token must start with \"v2.\" (or 0.2.0's \"v1.\")",
        ));
    }
    let expiry = parts
        .next()
        .filter(|s| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(malformed("the expiry must be Unix seconds in decimal"))?;
    let nonce = if v2 {
        Some(
            parts
                .next()
                .filter(|n| {
                    (16..=64).contains(&n.len())
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
                .ok_or(malformed("the nonce must be 16 to 64 base64url characters"))?,
        )
    } else {
        None
    };
    let sig = parts
        .next()
        .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
        .filter(|s| s.len() == 32)
        .ok_or(malformed(
            "the signature must be 32 bytes in unpadded base64url",
        ))?;
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    match nonce {
        Some(n) => mac.update(message_v2(org, actor, expiry, n).as_bytes()),
        None => mac.update(message(org, actor, expiry).as_bytes()),
    }
    mac.verify_slice(&sig)
        .map_err(|_| TenancyError::TokenInvalid)?;
    // Expiry is checked after the signature so an attacker learns nothing from timing it.
    if expiry <= now {
        return Err(TenancyError::TokenExpired);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(&sig);
    Ok((out, expiry))
}

/// Verifies a token for `set_org` when signed mode is on. Returns whether the context is
/// signed (and so the actor verified).
pub(crate) fn check_for_set_org(
    token: Option<&str>,
    org: &str,
    actor: Option<&str>,
) -> Result<bool> {
    let Some(path) = crate::gucs::context_key_file() else {
        return Ok(false);
    };
    let token = token.ok_or(TenancyError::TokenRequired)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // During a rotation the file holds two keys: a token under either is accepted.
    let (sig, expiry) = with_key(&path, |keys| {
        let mut first = None;
        for key in keys {
            match verify(key, token, org, actor, now) {
                Ok(found) => return Ok(found),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or(TenancyError::TokenInvalid))
    })?;
    use_once(&sig, expiry, now)?;
    Ok(true)
}

/// Keys a context key file may hold: the current one and, during a rotation, one more.
const MAX_CONTEXT_KEYS: usize = 2;

fn with_key<T>(path: &str, f: impl FnOnce(&[Zeroizing<Vec<u8>>]) -> Result<T>) -> Result<T> {
    KEY.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let problem = |p: keyfile::KeyFileProblem| TenancyError::KeyFile {
                path: path.to_string(),
                reason: p.0,
            };
            let raw = keyfile::read_secret_file(path).map_err(problem)?;
            *slot = Some(
                keyfile::decode_hex_keys(&raw, MIN_KEY_BYTES, MAX_CONTEXT_KEYS).map_err(problem)?,
            );
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
        let (mut accepted, mut refused) = (0usize, 0usize);
        for i in 0..crate::fuzz::iterations() {
            // Every hundredth input is the valid token itself: a verifier that refused
            // everything would fail here instead of passing.
            let input = if i % 100 == 0 {
                valid.clone()
            } else if i % 2 == 0 {
                String::from_utf8_lossy(&rng.mutate(valid.as_bytes())).into_owned()
            } else {
                rng.string(80)
            };
            if verify(KEY, &input, ORG, Some("u1"), 1_900_000_000).is_ok() {
                assert_eq!(input, valid, "a changed token verified");
                accepted += 1;
            } else {
                assert_ne!(input, valid, "the valid token was refused");
                refused += 1;
            }
        }
        assert!(
            accepted >= crate::fuzz::iterations() / 100,
            "{accepted} accepted"
        );
        assert!(refused > crate::fuzz::iterations() / 2, "{refused} refused");
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
    fn test_v1_tokens_of_0_2_0_still_verify() {
        let t = mint_v1(KEY, ORG, Some("user-1"), 2_000);
        assert!(t.starts_with("v1.2000."));
        assert!(verify(KEY, &t, ORG, Some("user-1"), 1_000).is_ok());
    }

    #[test]
    fn test_v2_tokens_differ_for_the_same_tenant_actor_and_second() {
        let (a, b) = (mint(KEY, ORG, None, 2_000), mint(KEY, ORG, None, 2_000));
        assert_ne!(a, b, "the nonce makes every token unique");
        let nonce_swapped = format!(
            "v2.2000.{}.{}",
            b.split('.').nth(2).unwrap(),
            a.split('.').nth(3).unwrap()
        );
        assert!(matches!(
            verify(KEY, &nonce_swapped, ORG, None, 1_000),
            Err(TenancyError::TokenInvalid)
        ));
    }

    #[test]
    fn test_tampered_expiry_is_refused() {
        let t = mint(KEY, ORG, None, 2_000);
        let forged = t.replacen("v2.2000.", "v2.9999999999.", 1);
        assert_ne!(forged, t);
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
            "v2.1.short.AAAA",
            "v3.1.AAAA",
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
