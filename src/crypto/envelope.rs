//! The PHI envelope: a self-describing AES-256-GCM ciphertext, bound to a tenant.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "PH" (0x50 0x48)
//! 2       1     format version (1)
//! 3       1     flags: bits 0-1 content type (0 text, 1 bytea, 2 jsonb),
//!               bit 2 a context label is bound; other bits 0
//! 4       4     key id, big-endian
//! 8       12    nonce (OS CSPRNG, fresh per call)
//! 20      n     ciphertext
//! 20+n    16    GCM tag
//! ```
//!
//! Additional authenticated data (never stored):
//! `"pg_tenancy.phi.v1" 0x00 || bytes 0..8 of the envelope || u16be(len(tenant)) || tenant
//! || u16be(len(label)) || label`. The header is authenticated, and an envelope copied to
//! another tenant (or, with a label, another column) fails authentication.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Nonce, Tag};

pub(crate) const MAGIC: [u8; 2] = *b"PH";
pub(crate) const VERSION: u8 = 1;
pub(crate) const HEADER_LEN: usize = 20;
pub(crate) const TAG_LEN: usize = 16;
pub(crate) const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
const LABEL_FLAG: u8 = 0b100;
const AAD_DOMAIN: &[u8] = b"pg_tenancy.phi.v1\0";

/// What the plaintext was, so it is revealed as the same type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Content {
    Text = 0,
    Bytea = 1,
    Jsonb = 2,
}

impl Content {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Content::Text => "text",
            Content::Bytea => "bytea",
            Content::Jsonb => "jsonb",
        }
    }
}

/// Why an envelope cannot be opened. Carries no key, plaintext or ciphertext bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum EnvelopeError {
    /// Not an envelope at all, or truncated, or an unknown version or flag.
    Malformed(&'static str),
    /// The tag did not verify: tampered, another tenant's or label's, or the wrong key.
    Authentication,
}

/// The parsed fixed header of an envelope.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub key_id: u32,
    pub content: Content,
    pub labelled: bool,
}

/// Parses and checks the header; cheap and key-free (used by the `tenancy.phi` domain).
pub(crate) fn parse_header(env: &[u8]) -> Result<Header, EnvelopeError> {
    if env.len() < OVERHEAD {
        return Err(EnvelopeError::Malformed(
            "shorter than the 36-byte envelope overhead",
        ));
    }
    if env[0..2] != MAGIC {
        return Err(EnvelopeError::Malformed("missing the envelope magic bytes"));
    }
    if env[2] != VERSION {
        return Err(EnvelopeError::Malformed("unknown envelope format version"));
    }
    let flags = env[3];
    if flags & !0b111 != 0 {
        return Err(EnvelopeError::Malformed("unknown envelope flags"));
    }
    let content = match flags & 0b11 {
        0 => Content::Text,
        1 => Content::Bytea,
        2 => Content::Jsonb,
        _ => return Err(EnvelopeError::Malformed("unknown content type")),
    };
    Ok(Header {
        key_id: u32::from_be_bytes([env[4], env[5], env[6], env[7]]),
        content,
        labelled: flags & LABEL_FLAG != 0,
    })
}

fn aad(header8: &[u8], tenant: &str, label: Option<&str>) -> Vec<u8> {
    let label = label.unwrap_or("");
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 8 + 4 + tenant.len() + label.len());
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(header8);
    // Ids and labels are short; the lengths are checked by the callers (<= 65535).
    aad.extend_from_slice(&(tenant.len() as u16).to_be_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(&(label.len() as u16).to_be_bytes());
    aad.extend_from_slice(label.as_bytes());
    aad
}

/// Seals `plaintext` under `cipher` (key `key_id`) with `nonce`, bound to `tenant` and
/// `label`.
pub(crate) fn seal(
    cipher: &Aes256Gcm,
    key_id: u32,
    nonce: [u8; 12],
    content: Content,
    tenant: &str,
    label: Option<&str>,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(content as u8 | if label.is_some() { LABEL_FLAG } else { 0 });
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let aad = aad(&out[..8], tenant, label);
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[HEADER_LEN..])
        // aes-gcm fails only above 64 GiB of plaintext; Postgres values stop at 1 GiB.
        .expect("AES-GCM encryption of a value under 1 GiB cannot fail");
    out.extend_from_slice(&tag);
    out
}

/// Opens an envelope whose header was parsed as `header`, with the cipher of its key.
pub(crate) fn open(
    cipher: &Aes256Gcm,
    env: &[u8],
    header: &Header,
    tenant: &str,
    label: Option<&str>,
) -> Result<Vec<u8>, EnvelopeError> {
    if header.labelled != label.is_some() {
        return Err(EnvelopeError::Authentication);
    }
    let body_end = env.len() - TAG_LEN;
    let mut buf = env[HEADER_LEN..body_end].to_vec();
    let aad = aad(&env[..8], tenant, label);
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(&env[8..HEADER_LEN]),
            &aad,
            &mut buf,
            Tag::from_slice(&env[body_end..]),
        )
        .map_err(|_| EnvelopeError::Authentication)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::Aead;
    use aes_gcm::KeyInit;

    fn cipher(key: &[u8]) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(key).unwrap()
    }

    #[test]
    fn test_fuzz_two_hundred_thousand_mutated_envelopes_never_open_or_panic() {
        let c = cipher(&[9u8; 32]);
        let valid = seal(
            &c,
            1,
            [3u8; 12],
            Content::Text,
            "org-a",
            Some("l"),
            b"a secret",
        );
        let mut rng = crate::fuzz::Rng::new(0x5eed_0001);
        let (mut malformed, mut refused) = (0, 0);
        for _ in 0..crate::fuzz::iterations() {
            let input = rng.mutate(&valid);
            match parse_header(&input) {
                Err(EnvelopeError::Malformed(_)) => malformed += 1,
                Err(EnvelopeError::Authentication) => refused += 1,
                Ok(h) => match open(&c, &input, &h, "org-a", Some("l")) {
                    Ok(plain) => {
                        assert_eq!(input, valid, "a changed envelope opened");
                        assert_eq!(plain, b"a secret");
                    }
                    Err(_) => refused += 1,
                },
            }
        }
        assert!(
            malformed > 10_000 && refused > 10_000,
            "{malformed} {refused}"
        );
    }

    /// Published AES-256-GCM vectors (McGrew & Viega, "The Galois/Counter Mode of Operation",
    /// test cases 13, 14 and 16): ciphertext || tag.
    #[test]
    fn test_aes_256_gcm_published_vectors() {
        let zero = [0u8; 32];
        let c = cipher(&zero);
        let out = c.encrypt(Nonce::from_slice(&[0u8; 12]), &[][..]).unwrap();
        assert_eq!(hex::encode(out), "530f8afbc74536b9a963b4f1c4cb738b");
        let out = c
            .encrypt(Nonce::from_slice(&[0u8; 12]), &[0u8; 16][..])
            .unwrap();
        assert_eq!(
            hex::encode(out),
            "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"
        );
        let key = hex::decode("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .unwrap();
        let iv = hex::decode("cafebabefacedbaddecaf888").unwrap();
        let pt = hex::decode("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39").unwrap();
        let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
        let out = cipher(&key)
            .encrypt(
                Nonce::from_slice(&iv),
                aes_gcm::aead::Payload {
                    msg: &pt,
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(
            hex::encode(out),
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f66276fc6ece0f4e1768cddf8853bb2d551b"
        );
    }

    const ORG: &str = "5e000000-0000-4000-8000-000000000001";

    /// The worked example of docs/phi.md, computed independently with Python's
    /// `cryptography` (AESGCM): the same bytes come out of this implementation.
    #[test]
    fn test_documented_worked_example() {
        let key: Vec<u8> = (0u8..32).collect();
        let nonce: [u8; 12] = core::array::from_fn(|i| i as u8);
        let env = seal(
            &cipher(&key),
            1,
            nonce,
            Content::Text,
            ORG,
            Some("patients.phone"),
            b"555-0101",
        );
        assert_eq!(
            hex::encode(&env),
            "5048010400000001000102030405060708090a0b7237e336f5d4f22ae8bc09cce5751e98dd77990e30b67748"
        );
        assert_eq!(
            hex::encode(aad(&env[..8], ORG, Some("patients.phone"))),
            "70675f74656e616e63792e7068692e7631005048010400000001002435653030303030302d303030302d343030302d383030302d303030303030303030303031000e70617469656e74732e70686f6e65"
        );
    }

    #[test]
    fn test_round_trip_and_layout() {
        let c = cipher(&[9u8; 32]);
        let env = seal(
            &c,
            7,
            [1u8; 12],
            Content::Text,
            ORG,
            Some("patients.phone"),
            b"555-0100",
        );
        assert_eq!(env.len(), 8 + OVERHEAD);
        assert_eq!(&env[..4], &[b'P', b'H', 1, 0b100]);
        assert_eq!(&env[4..8], &7u32.to_be_bytes());
        let h = parse_header(&env).unwrap();
        assert_eq!(
            h,
            Header {
                key_id: 7,
                content: Content::Text,
                labelled: true
            }
        );
        assert_eq!(
            open(&c, &env, &h, ORG, Some("patients.phone")).unwrap(),
            b"555-0100"
        );
    }

    #[test]
    fn test_bound_to_tenant_label_and_key() {
        let c = cipher(&[9u8; 32]);
        let env = seal(&c, 1, [2u8; 12], Content::Text, ORG, Some("a"), b"x");
        let h = parse_header(&env).unwrap();
        let other = "c0000000-0000-4000-8000-000000000002";
        assert_eq!(
            open(&c, &env, &h, other, Some("a")),
            Err(EnvelopeError::Authentication)
        );
        assert_eq!(
            open(&c, &env, &h, ORG, Some("b")),
            Err(EnvelopeError::Authentication)
        );
        assert_eq!(
            open(&c, &env, &h, ORG, None),
            Err(EnvelopeError::Authentication)
        );
        assert_eq!(
            open(&cipher(&[8u8; 32]), &env, &h, ORG, Some("a")),
            Err(EnvelopeError::Authentication)
        );
    }

    #[test]
    fn test_every_bit_flip_and_truncation_is_refused() {
        let c = cipher(&[3u8; 32]);
        let env = seal(
            &c,
            1,
            [4u8; 12],
            Content::Bytea,
            ORG,
            None,
            b"some phi value",
        );
        for i in 0..env.len() * 8 {
            let mut bad = env.clone();
            bad[i / 8] ^= 1 << (i % 8);
            let result = parse_header(&bad).and_then(|h| {
                // A flipped key id names another key; with this one key it fails to open.
                open(&c, &bad, &h, ORG, None)
            });
            assert!(result.is_err(), "bit {i} flipped still opened");
        }
        for len in 0..env.len() {
            let r = parse_header(&env[..len]).and_then(|h| open(&c, &env[..len], &h, ORG, None));
            assert!(r.is_err(), "truncated to {len} still opened");
        }
        let mut longer = env.clone();
        longer.push(0);
        let h = parse_header(&longer).unwrap();
        assert!(open(&c, &longer, &h, ORG, None).is_err());
    }
}
