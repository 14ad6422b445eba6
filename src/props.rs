//! Property tests (proptest) of the code that faces untrusted input: PHI envelopes, context
//! tokens, tenant and actor ids. Round trips and refusals, for inputs proptest draws and
//! shrinks. Seeds are fixed (`PROPTEST_RNG_SEED` overrides), so a failure reproduces; the case
//! count follows `PG_TENANCY_FUZZ_ITERATIONS` / 100 (500 by default). Test builds only.

use crate::crypto::envelope::{open, parse_header, seal, Content, EnvelopeError};
use crate::error::TenancyError;
use crate::gucs::TenantIdFormat;
use crate::ids::{parse_actor, parse_org};
use crate::phi::check_text;
use crate::token::{mint, mint_v1, verify};
use aes_gcm::{Aes256Gcm, KeyInit};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn config() -> Config {
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7e4a_4e17);
    Config {
        cases: (crate::fuzz::iterations() / 100).max(50) as u32,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        Just(Content::Text),
        Just(Content::Bytea),
        Just(Content::Jsonb)
    ]
}

/// Tenant ids and labels as callers pass them: 1 to 255 bytes of any Unicode.
fn name() -> impl Strategy<Value = String> {
    "\\PC{1,40}".prop_filter("1 to 255 bytes", |s| !s.is_empty() && s.len() <= 255)
}

proptest! {
    #![proptest_config(config())]

    /// seal then open gives back the plaintext byte for byte, with the header's key id and
    /// content type, for any plaintext, tenant, label, key id and nonce.
    #[test]
    fn envelope_round_trips(
        key in any::<[u8; 32]>(),
        key_id in any::<u32>(),
        nonce in any::<[u8; 12]>(),
        content in content(),
        tenant in name(),
        label in proptest::option::of(name()),
        plain in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let c = Aes256Gcm::new_from_slice(&key).unwrap();
        let env = seal(&c, key_id, nonce, content, &tenant, label.as_deref(), &plain);
        let h = parse_header(&env).unwrap();
        prop_assert_eq!(h.key_id, key_id);
        prop_assert_eq!(h.content, content);
        prop_assert_eq!(env.len(), plain.len() + 36);
        prop_assert_eq!(open(&c, &env, &h, &tenant, label.as_deref()).unwrap(), plain);
    }

    /// Any one changed bit, any truncation, another tenant or another label: refused, never
    /// opened and never a panic.
    #[test]
    fn envelope_refuses_every_change(
        key in any::<[u8; 32]>(),
        tenant in name(),
        other in name(),
        label in proptest::option::of(name()),
        plain in proptest::collection::vec(any::<u8>(), 0..256),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let c = Aes256Gcm::new_from_slice(&key).unwrap();
        let env = seal(&c, 7, [1u8; 12], Content::Bytea, &tenant, label.as_deref(), &plain);
        let opens = |bytes: &[u8], t: &str, l: Option<&str>| match parse_header(bytes) {
            Ok(h) => open(&c, bytes, &h, t, l).is_ok(),
            Err(EnvelopeError::Malformed(_)) | Err(EnvelopeError::Authentication) => false,
        };
        let mut flipped = env.clone();
        flipped[flip.index(env.len())] ^= 1 << bit;
        prop_assert!(!opens(&flipped, &tenant, label.as_deref()));
        let truncated = &env[..cut.index(env.len())];
        prop_assert!(!opens(truncated, &tenant, label.as_deref()));
        if other != tenant {
            prop_assert!(!opens(&env, &other, label.as_deref()));
        }
        let other_label = match &label { Some(_) => None, None => Some("x") };
        prop_assert!(!opens(&env, &tenant, other_label));
    }

    /// Arbitrary bytes never panic the header parser, and what it accepts has its fields.
    #[test]
    fn envelope_header_parses_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        if let Ok(h) = parse_header(&bytes) {
            prop_assert!(bytes.len() >= 36);
            prop_assert_eq!(u32::from_be_bytes(bytes[4..8].try_into().unwrap()), h.key_id);
        }
    }

    /// A text envelope's plaintext is returned only when it is valid UTF-8 without NUL, and
    /// then exactly.
    #[test]
    fn text_contents_are_exact_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        match check_text(&bytes) {
            Ok(text) => {
                prop_assert_eq!(text.as_bytes(), &bytes[..]);
                prop_assert!(!bytes.contains(&0));
            }
            Err(e) => {
                prop_assert!(std::str::from_utf8(&bytes).is_err() || bytes.contains(&0));
                prop_assert_eq!(e.sqlstate(), pgrx::PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE);
            }
        }
    }

    /// Minted tokens verify for exactly their tenant, actor and time, once per signature.
    #[test]
    fn tokens_round_trip_and_bind(
        key in proptest::collection::vec(any::<u8>(), 16..64),
        org in "[a-z0-9_-]{1,40}",
        other in "[a-z0-9_-]{1,40}",
        actor in proptest::option::of("[a-z0-9_.@-]{1,40}"),
        expiry in 2u64..4_000_000_000,
        v1 in any::<bool>(),
    ) {
        let token = if v1 {
            mint_v1(&key, &org, actor.as_deref(), expiry)
        } else {
            mint(&key, &org, actor.as_deref(), expiry)
        };
        let (_, exp) = verify(&key, &token, &org, actor.as_deref(), expiry - 1).unwrap();
        prop_assert_eq!(exp, expiry);
        prop_assert!(matches!(
            verify(&key, &token, &org, actor.as_deref(), expiry),
            Err(TenancyError::TokenExpired)
        ));
        if other != org {
            prop_assert!(matches!(
                verify(&key, &token, &other, actor.as_deref(), 0),
                Err(TenancyError::TokenInvalid)
            ));
        }
        let wrong_actor = if actor.is_some() { None } else { Some("someone") };
        prop_assert!(verify(&key, &token, &org, wrong_actor, 0).is_err());
    }

    /// Any change of one character of a token is refused (malformed or invalid), never a panic.
    #[test]
    fn tokens_refuse_every_change(
        org in "[a-z0-9]{1,20}",
        at in any::<prop::sample::Index>(),
        with in any::<char>(),
    ) {
        let key = [5u8; 32];
        let token = mint(&key, &org, None, 4_000_000_000);
        let mut chars: Vec<char> = token.chars().collect();
        let i = at.index(chars.len());
        if chars[i] != with {
            chars[i] = with;
            let changed: String = chars.into_iter().collect();
            prop_assert!(verify(&key, &changed, &org, None, 0).is_err());
        }
    }

    /// Arbitrary strings never panic the token parser; errors never echo the token.
    #[test]
    fn tokens_parse_any_string(s in "\\PC{0,200}") {
        if let Err(e) = verify(&[1u8; 32], &s, "org", None, 0) {
            let shown = format!("{e} {:?}", e.detail());
            if s.len() > 8 {
                prop_assert!(!shown.contains(&s));
            }
        }
    }

    /// UUID tenant ids in any accepted spelling canonicalise to one lower-case hyphenated
    /// form, and canonical forms are fixed points.
    #[test]
    fn uuid_ids_canonicalise(bytes in any::<[u8; 16]>(), upper in any::<bool>(), simple in any::<bool>()) {
        let u = uuid::Uuid::from_bytes(bytes);
        let mut spelled = if simple { u.simple().to_string() } else { u.hyphenated().to_string() };
        if upper {
            spelled = spelled.to_uppercase();
        }
        let canonical = parse_org(Some(&spelled), TenantIdFormat::Uuid).unwrap();
        prop_assert_eq!(&canonical, &u.hyphenated().to_string());
        prop_assert_eq!(parse_org(Some(&canonical), TenantIdFormat::Uuid).unwrap(), canonical);
    }

    /// Text tenant ids and actor ids: accepted exactly when 1 to 128 printable ASCII
    /// characters without space, quotes or backslash; kept as given; errors never echo them.
    #[test]
    fn text_ids_accept_exactly_the_documented_set(s in "\\PC{0,140}") {
        let allowed = !s.is_empty()
            && s.len() <= 128
            && s.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'\'' | b'"' | b'\\'));
        match parse_org(Some(&s), TenantIdFormat::Text) {
            Ok(id) => {
                prop_assert!(allowed);
                prop_assert_eq!(id, s.clone());
            }
            Err(e) => {
                prop_assert!(!allowed);
                let shown = format!("{e} {:?}", e.detail());
                if s.len() > 3 {
                    prop_assert!(!shown.contains(&s));
                }
            }
        }
        prop_assert_eq!(parse_actor(Some(&s)).is_ok(), allowed);
    }
}
