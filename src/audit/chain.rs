//! The hash chain's format: what an event's hash covers, in which order. A leaf (no SQL),
//! shared by the writer and by `audit_verify`.

use sha2::{Digest, Sha256};

const HASH_DOMAIN: &str = "pg_tenancy.audit.v1";

/// Everything hashed for one event, in a fixed order.
pub(crate) struct EventContent<'a> {
    pub org: &'a str,
    pub seq: i64,
    pub event_id: i64,
    pub occurred_at: i64,
    pub txid: i64,
    pub actor: Option<&'a str>,
    pub actor_verified: bool,
    pub session_role: &'a str,
    pub outer_role: &'a str,
    pub action: &'a str,
    pub table_name: Option<&'a str>,
    pub row_key: Option<&'a str>,
    pub changed_columns: Option<&'a [String]>,
    pub payload: Option<&'a [u8]>,
    pub prev_hash: &'a [u8],
}

/// SHA-256 over the length-prefixed fields (u32 big-endian length, or 0xFFFFFFFF for NULL).
pub(crate) fn event_hash(e: &EventContent<'_>) -> [u8; 32] {
    fn field(h: &mut Sha256, v: Option<&[u8]>) {
        match v {
            None => h.update(u32::MAX.to_be_bytes()),
            Some(b) => {
                h.update((b.len() as u32).to_be_bytes());
                h.update(b);
            }
        }
    }
    let mut h = Sha256::new();
    let changed = e.changed_columns.map(|c| c.join("\u{1f}"));
    field(&mut h, Some(HASH_DOMAIN.as_bytes()));
    field(&mut h, Some(e.org.as_bytes()));
    for n in [e.seq, e.event_id, e.occurred_at, e.txid] {
        field(&mut h, Some(&n.to_be_bytes()));
    }
    field(&mut h, e.actor.map(str::as_bytes));
    field(&mut h, Some(&[e.actor_verified as u8]));
    field(&mut h, Some(e.session_role.as_bytes()));
    field(&mut h, Some(e.outer_role.as_bytes()));
    field(&mut h, Some(e.action.as_bytes()));
    field(&mut h, e.table_name.map(str::as_bytes));
    field(&mut h, e.row_key.map(str::as_bytes));
    field(&mut h, changed.as_deref().map(str::as_bytes));
    field(&mut h, e.payload);
    field(&mut h, Some(e.prev_hash));
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(changed: &'a [String], payload: &'a [u8], prev: &'a [u8]) -> EventContent<'a> {
        EventContent {
            org: "org",
            seq: 1,
            event_id: 10,
            occurred_at: 5,
            txid: 7,
            actor: Some("u"),
            actor_verified: false,
            session_role: "app",
            outer_role: "app",
            action: "UPDATE",
            table_name: Some("clinic.reviews"),
            row_key: Some("{}"),
            changed_columns: Some(changed),
            payload: Some(payload),
            prev_hash: prev,
        }
    }

    #[test]
    fn test_event_hash_covers_every_field_and_the_link() {
        let changed = vec!["rating".to_string()];
        let base = event_hash(&sample(&changed, b"p", &[0; 32]));
        assert_eq!(
            base,
            event_hash(&sample(&changed, b"p", &[0; 32])),
            "deterministic"
        );
        let mut e = sample(&changed, b"p", &[0; 32]);
        e.actor = None;
        assert_ne!(event_hash(&e), base, "NULL differs from a value");
        let mut e = sample(&changed, b"p", &[0; 32]);
        e.actor_verified = true;
        assert_ne!(event_hash(&e), base);
        assert_ne!(
            event_hash(&sample(&changed, b"q", &[0; 32])),
            base,
            "payload"
        );
        assert_ne!(
            event_hash(&sample(&changed, b"p", &[1; 32])),
            base,
            "link to the previous event"
        );
        let other = vec!["body".to_string()];
        assert_ne!(
            event_hash(&sample(&other, b"p", &[0; 32])),
            base,
            "changed columns"
        );
        // Length prefixes: moving bytes between adjacent fields changes the hash.
        let mut e = sample(&changed, b"p", &[0; 32]);
        e.session_role = "ap";
        e.outer_role = "papp";
        assert_ne!(event_hash(&e), base);
    }
}
