//! The hash chain's formats: what an event's hash covers, in which order. A leaf (no SQL),
//! shared by the writer, the sealer and `audit_verify`.
//!
//! * v1 (0.1.0 and 0.2.0): each event hashed with its tenant's previous event (`seq`,
//!   `prev_hash`), written under the tenant's chain-head lock. Still verified.
//! * v2: each event hashed alone when it is written (no lock, no link), its payload through a
//!   hiding commitment (so the payload can be re-encrypted under a new key); after commit the
//!   sealer links events into per-tenant blocks ([`BlockHasher`]), each block hashing the
//!   previous block's hash and its events' (event_id, hash) in order.

use sha2::{Digest, Sha256};

const HASH_DOMAIN: &str = "pg_tenancy.audit.v1";
const EVENT_DOMAIN_V2: &str = "pg_tenancy.audit.v2.event";
const BLOCK_DOMAIN_V2: &str = "pg_tenancy.audit.v2.block";
const PAYLOAD_DOMAIN_V2: &str = "pg_tenancy.audit.v2.payload";

/// The first byte of a v2 payload's plaintext (a v1 payload is JSON: it starts with `{`).
pub(crate) const PAYLOAD_V2_MARK: u8 = 0;
/// Bytes of secret salt after the mark, then the JSON.
pub(crate) const PAYLOAD_SALT: usize = 16;

/// Who did what, hashed the same way (and in the same place) by both formats.
pub(crate) struct Body<'a> {
    pub actor: Option<&'a str>,
    pub actor_verified: bool,
    pub session_role: &'a str,
    pub outer_role: &'a str,
    pub action: &'a str,
    pub table_name: Option<&'a str>,
    pub row_key: Option<&'a str>,
    pub changed_columns: Option<&'a [String]>,
}

/// Everything hashed for one v1 event, in a fixed order.
pub(crate) struct EventContent<'a> {
    pub org: &'a str,
    pub seq: i64,
    pub event_id: i64,
    pub occurred_at: i64,
    pub txid: i64,
    pub body: Body<'a>,
    pub payload: Option<&'a [u8]>,
    pub prev_hash: &'a [u8],
}

fn field(h: &mut Sha256, v: Option<&[u8]>) {
    match v {
        None => h.update(u32::MAX.to_be_bytes()),
        Some(b) => {
            h.update((b.len() as u32).to_be_bytes());
            h.update(b);
        }
    }
}

/// `v2`: the changed columns as a counted list of fields (v1 joined them with U+001F, which a
/// column name may hold: `{"a\u{1f}b"}` and `{a,b}` hashed alike).
fn body(h: &mut Sha256, b: &Body<'_>, v2: bool) {
    let changed = b.changed_columns.map(|c| c.join("\u{1f}"));
    field(h, b.actor.map(str::as_bytes));
    field(h, Some(&[b.actor_verified as u8]));
    field(h, Some(b.session_role.as_bytes()));
    field(h, Some(b.outer_role.as_bytes()));
    field(h, Some(b.action.as_bytes()));
    field(h, b.table_name.map(str::as_bytes));
    field(h, b.row_key.map(str::as_bytes));
    match (v2, b.changed_columns) {
        (true, Some(columns)) => {
            field(h, Some(&(columns.len() as u32).to_be_bytes()));
            for c in columns {
                field(h, Some(c.as_bytes()));
            }
        }
        _ => field(h, changed.as_deref().map(str::as_bytes)),
    }
}

/// SHA-256 over the length-prefixed fields (u32 big-endian length, or 0xFFFFFFFF for NULL).
pub(crate) fn event_hash(e: &EventContent<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    field(&mut h, Some(HASH_DOMAIN.as_bytes()));
    field(&mut h, Some(e.org.as_bytes()));
    for n in [e.seq, e.event_id, e.occurred_at, e.txid] {
        field(&mut h, Some(&n.to_be_bytes()));
    }
    body(&mut h, &e.body, false);
    field(&mut h, e.payload);
    field(&mut h, Some(e.prev_hash));
    h.finalize().into()
}

/// Everything a v2 event's own hash covers, in a fixed order.
pub(crate) struct EventV2<'a> {
    pub org: &'a str,
    pub event_id: i64,
    pub occurred_at: i64,
    pub txid: i64,
    pub body: Body<'a>,
    pub payload_digest: Option<&'a [u8]>,
}

/// A v2 event's hash: SHA-256 over its length-prefixed fields (as v1, without seq and link,
/// and with the payload's commitment instead of its ciphertext).
pub(crate) fn event_hash_v2(e: &EventV2<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    field(&mut h, Some(EVENT_DOMAIN_V2.as_bytes()));
    field(&mut h, Some(e.org.as_bytes()));
    for n in [e.event_id, e.occurred_at, e.txid] {
        field(&mut h, Some(&n.to_be_bytes()));
    }
    body(&mut h, &e.body, true);
    field(&mut h, e.payload_digest);
    h.finalize().into()
}

/// The commitment to a payload: SHA-256 over the domain, the tenant, the event id, the
/// payload's secret salt and its JSON. The salt travels inside the ciphertext only, so the
/// digest (stored in clear) reveals nothing of a guessable payload (`{"rating": "5"}`), and
/// a payload re-encrypted under another key keeps its digest, hence the chain.
pub(crate) fn payload_digest(org: &str, event_id: i64, salt: &[u8], json: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    field(&mut h, Some(PAYLOAD_DOMAIN_V2.as_bytes()));
    field(&mut h, Some(org.as_bytes()));
    field(&mut h, Some(&event_id.to_be_bytes()));
    field(&mut h, Some(salt));
    field(&mut h, Some(json));
    h.finalize().into()
}

/// A v2 payload's plaintext split into (salt, JSON), or None for a v1 payload (bare JSON).
pub(crate) fn split_payload(plain: &[u8]) -> Option<(&[u8], &[u8])> {
    match plain.first() {
        Some(&PAYLOAD_V2_MARK) if plain.len() > PAYLOAD_SALT => {
            Some((&plain[1..=PAYLOAD_SALT], &plain[PAYLOAD_SALT + 1..]))
        }
        _ => None,
    }
}

/// One block's hash, built event by event: SHA-256 over the domain, the tenant, the block's
/// number and first position, the previous block's hash, then each event's id and hash in
/// chain order, then the number of events and the newest event's time (which decides when
/// `audit_purge` may remove the block).
pub(crate) struct BlockHasher {
    h: Sha256,
    n: i64,
}

impl BlockHasher {
    pub(crate) fn new(org: &str, block_no: i64, first_seq: i64, prev_hash: &[u8]) -> Self {
        let mut h = Sha256::new();
        field(&mut h, Some(BLOCK_DOMAIN_V2.as_bytes()));
        field(&mut h, Some(org.as_bytes()));
        field(&mut h, Some(&block_no.to_be_bytes()));
        field(&mut h, Some(&first_seq.to_be_bytes()));
        field(&mut h, Some(prev_hash));
        BlockHasher { h, n: 0 }
    }

    pub(crate) fn add(&mut self, event_id: i64, event_hash: &[u8]) {
        field(&mut self.h, Some(&event_id.to_be_bytes()));
        field(&mut self.h, Some(event_hash));
        self.n += 1;
    }

    pub(crate) fn count(&self) -> i64 {
        self.n
    }

    pub(crate) fn finish(mut self, newest_event_at: i64) -> [u8; 32] {
        field(&mut self.h, Some(&self.n.to_be_bytes()));
        field(&mut self.h, Some(&newest_event_at.to_be_bytes()));
        self.h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_body(changed: &[String]) -> Body<'_> {
        Body {
            actor: Some("u"),
            actor_verified: false,
            session_role: "app",
            outer_role: "app",
            action: "UPDATE",
            table_name: Some("clinic.reviews"),
            row_key: Some("{}"),
            changed_columns: Some(changed),
        }
    }

    fn sample<'a>(changed: &'a [String], payload: &'a [u8], prev: &'a [u8]) -> EventContent<'a> {
        EventContent {
            org: "org",
            seq: 1,
            event_id: 10,
            occurred_at: 5,
            txid: 7,
            body: sample_body(changed),
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
        e.body.actor = None;
        assert_ne!(event_hash(&e), base, "NULL differs from a value");
        let mut e = sample(&changed, b"p", &[0; 32]);
        e.body.actor_verified = true;
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
        e.body.session_role = "ap";
        e.body.outer_role = "papp";
        assert_ne!(event_hash(&e), base);
    }

    #[test]
    fn test_v2_hashes_cover_every_field_order_and_count() {
        let changed = vec!["rating".to_string()];
        let e = |digest: Option<&'static [u8]>, id: i64| EventV2 {
            org: "org",
            event_id: id,
            occurred_at: 5,
            txid: 7,
            body: sample_body(&changed),
            payload_digest: digest,
        };
        let base = event_hash_v2(&e(Some(b"d"), 1));
        assert_eq!(base, event_hash_v2(&e(Some(b"d"), 1)));
        assert_ne!(base, event_hash_v2(&e(Some(b"x"), 1)), "payload digest");
        assert_ne!(base, event_hash_v2(&e(None, 1)), "NULL payload");
        assert_ne!(base, event_hash_v2(&e(Some(b"d"), 2)), "event id");
        // The payload commitment depends on salt, JSON, tenant and event.
        let d = payload_digest("org", 1, &[1; 16], b"{}");
        assert_ne!(d, payload_digest("org", 1, &[2; 16], b"{}"));
        assert_ne!(d, payload_digest("org", 2, &[1; 16], b"{}"));
        assert_ne!(d, payload_digest("other", 1, &[1; 16], b"{}"));
        assert_ne!(d, payload_digest("org", 1, &[1; 16], b"[]"));
        // Blocks: order, membership, link and position all count.
        let block = |ids: &[i64], prev: &[u8], first: i64| {
            let mut b = BlockHasher::new("org", 1, first, prev);
            for id in ids {
                b.add(*id, &[*id as u8; 32]);
            }
            b.finish(5)
        };
        let b = block(&[1, 2, 3], &[0; 32], 1);
        assert_eq!(b, block(&[1, 2, 3], &[0; 32], 1));
        assert_ne!(b, block(&[2, 1, 3], &[0; 32], 1), "order");
        assert_ne!(b, block(&[1, 2], &[0; 32], 1), "a dropped event");
        assert_ne!(b, block(&[1, 2, 3], &[1; 32], 1), "link");
        assert_ne!(b, block(&[1, 2, 3], &[0; 32], 2), "position");
        let mut later = BlockHasher::new("org", 1, 1, &[0; 32]);
        for id in [1i64, 2, 3] {
            later.add(id, &[id as u8; 32]);
        }
        assert_ne!(b, later.finish(6), "the newest event's time");
        // v2: a column name holding U+001F is not two names.
        let joined = ["a\u{1f}b".to_string()];
        let split = ["a".to_string(), "b".to_string()];
        let v2 = |c: &[String]| {
            event_hash_v2(&EventV2 {
                org: "org",
                event_id: 1,
                occurred_at: 1,
                txid: 1,
                body: sample_body(c),
                payload_digest: None,
            })
        };
        assert_ne!(
            v2(&joined),
            v2(&split),
            "changed columns are a counted list"
        );
        let mut plain = vec![PAYLOAD_V2_MARK];
        plain.extend_from_slice(&[9; PAYLOAD_SALT]);
        plain.extend_from_slice(b"{\"a\":1}");
        assert_eq!(
            split_payload(&plain),
            Some((&[9u8; PAYLOAD_SALT][..], &b"{\"a\":1}"[..]))
        );
        assert_eq!(split_payload(b"{\"a\":1}"), None, "v1: bare JSON");
    }

    /// Known answers: the stored formats never change (v1 is what 0.1.0 and 0.2.0 wrote; v2
    /// as of 0.2.1, with changed columns as a counted list).
    #[test]
    fn test_hash_formats_are_fixed() {
        let changed = vec!["rating".to_string()];
        assert_eq!(
            hex::encode(event_hash(&sample(&changed, b"p", &[0; 32]))),
            "8ac309a13ee5960bf9ed5a852790d771544e019085e0a97d02143e7af23c58a6"
        );
        let e = EventV2 {
            org: "org",
            event_id: 10,
            occurred_at: 5,
            txid: 7,
            body: sample_body(&changed),
            payload_digest: Some(b"d"),
        };
        assert_eq!(
            hex::encode(event_hash_v2(&e)),
            "caf21238d5b46ff61af2a50bbec5f994b91086ee7a56cc2a168d1f6eff794f0c"
        );
        let mut b = BlockHasher::new("org", 2, 11, &[7; 32]);
        b.add(10, &[1; 32]);
        b.add(12, &[2; 32]);
        assert_eq!(
            hex::encode(b.finish(99)),
            "37bc8171b067329e35a1a706be41f6494b1e27fd2f22fda8fdc2b20978b4ff77"
        );
    }
}
