//! The PHI key ring: several AES-256 keys with ids, one active, loaded from the file named by
//! `tenancy.phi_key_file` by the postmaster at start and by every backend on reload.
//!
//! File format (text; `#` starts a comment; one key per line):
//!
//! ```text
//! # pg_tenancy PHI key ring
//! <id> <key: 64 hex> <check: 16 hex> [active]
//! ```
//!
//! `id` is 1..=4294967295; exactly one line says `active`. The check value is the first 8
//! bytes of HMAC-SHA256(key, "pg_tenancy key check v1"): a wrong or corrupted key is refused
//! at load instead of failing every row later. `scripts/phi_keyring.py` writes such files.

use aes_gcm::{Aes256Gcm, KeyInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// One loaded key. The cipher's round keys are zeroised on drop (aes-gcm `zeroize`).
pub(crate) struct RingKey {
    pub cipher: Aes256Gcm,
}

/// A loaded key ring.
pub(crate) struct KeyRing {
    pub keys: BTreeMap<u32, RingKey>,
    pub active: u32,
}

/// The key check value of a key, as written in the file.
pub(crate) fn check_value(key: &[u8]) -> [u8; 8] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"pg_tenancy key check v1");
    let full = mac.finalize().into_bytes();
    let mut kcv = [0u8; 8];
    kcv.copy_from_slice(&full[..8]);
    kcv
}

/// Parses a key ring file. Problems name the line, never its key material.
pub(crate) fn parse(text: &str) -> Result<KeyRing, String> {
    let mut keys = BTreeMap::new();
    let mut active = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let lineno = n + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (id, key_hex, kcv_hex, flag) = match fields.as_slice() {
            [id, key, kcv] => (*id, *key, *kcv, None),
            [id, key, kcv, flag] => (*id, *key, *kcv, Some(*flag)),
            _ => {
                return Err(format!(
                    "line {lineno}: expected \"<id> <key hex> <check hex> [active]\""
                ))
            }
        };
        let id: u32 = id.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
            format!("line {lineno}: the key id must be a number from 1 to 4294967295")
        })?;
        let key = Zeroizing::new(
            hex::decode(key_hex)
                .map_err(|_| format!("line {lineno} (key {id}): the key is not valid hex"))?,
        );
        if key.len() != 32 {
            return Err(format!(
                "line {lineno} (key {id}): the key must be 32 bytes (64 hex digits), not {}",
                key.len()
            ));
        }
        let kcv = hex::decode(kcv_hex)
            .map_err(|_| format!("line {lineno} (key {id}): the check value is not valid hex"))?;
        if kcv.as_slice() != check_value(&key) {
            return Err(format!(
                "line {lineno} (key {id}): the key does not match its check value (wrong or corrupted key)"
            ));
        }
        match flag {
            None => {}
            Some("active") if active.is_some() => {
                return Err(format!("line {lineno}: more than one key is marked active"));
            }
            Some("active") => active = Some(id),
            Some(_) => {
                return Err(format!(
                    "line {lineno} (key {id}): the fourth field may only be \"active\""
                ))
            }
        }
        let cipher = Aes256Gcm::new_from_slice(&key).expect("32-byte key");
        if keys.insert(id, RingKey { cipher }).is_some() {
            return Err(format!("line {lineno}: key id {id} appears twice"));
        }
    }
    if keys.is_empty() {
        return Err("the key ring holds no keys".into());
    }
    let active = active.ok_or("no key is marked active")?;
    Ok(KeyRing { keys, active })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: u32, key: &[u8; 32], active: bool) -> String {
        format!(
            "{id} {} {}{}\n",
            hex::encode(key),
            hex::encode(check_value(key)),
            if active { " active" } else { "" }
        )
    }

    #[test]
    fn test_ring_with_two_keys() {
        let text = format!(
            "# ring\n{}{}",
            line(1, &[1; 32], false),
            line(2, &[2; 32], true)
        );
        let ring = parse(&text).unwrap();
        assert_eq!(ring.active, 2);
        assert_eq!(ring.keys.keys().copied().collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn test_bad_rings_are_refused_without_echoing_keys() {
        let good = line(1, &[1; 32], true);
        let corrupted = good.replacen("0101", "0102", 1);
        let cases = [
            ("".to_string(), "no keys"),
            (line(1, &[1; 32], false), "no key is marked active"),
            (
                format!("{}{}", line(1, &[1; 32], true), line(2, &[2; 32], true)),
                "more than one",
            ),
            (format!("{good}{good}"), "more than one"),
            (corrupted, "check value"),
            ("1 zz 00\n".into(), "not valid hex"),
            ("1 0011 00 active\n".into(), "32 bytes"),
            ("0 00 00\n".into(), "key id"),
            ("1 2\n".into(), "expected"),
        ];
        for (text, want) in cases {
            let err = parse(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(
                !err.contains(&hex::encode([1u8; 32])),
                "the key leaked into: {err}"
            );
        }
    }
}
