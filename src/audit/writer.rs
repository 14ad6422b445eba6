//! Appending events: each is hashed alone and inserted without waiting for anyone (no chain
//! head lock: writers of one tenant run concurrently, under any isolation level); the
//! events' ids and hashes also go to `tenancy.audit_pending` (a row per tenant and up to
//! [`PENDING_EVENTS`] events), which the sealer ([`super::sealer`]) turns into blocks of the
//! tenant's chain after commit. Both are written through the table access method
//! ([`super::direct`]), as COPY writes.

use super::chain::{event_hash_v2, payload_digest, EventV2, PAYLOAD_SALT, PAYLOAD_V2_MARK};
use super::direct;
use super::event::next_event_ids;
pub(crate) use super::event::{payload_label, NewEvent, Who};
use crate::crypto::{self, envelope::Content};
use crate::error::Raise;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

/// Events per `audit_pending` row: about 1.7 kB, below the size at which PostgreSQL would
/// compress or move it out of line.
const PENDING_EVENTS: usize = 40;

/// End of the transaction: nothing of the writer's outlives it (its pending rows are
/// committed with its events, or gone with them).
pub(crate) fn at_xact_end(end: crate::xact::End) {
    super::legacy::at_xact_end(end);
    super::cluster::at_xact_end();
}

/// End of a subtransaction (the 0.2.0 writer's heads; the pending rows of a rolled-back
/// subtransaction are gone with its events).
pub(crate) fn at_sub_end(end: crate::xact::SubEnd, level: i32) {
    super::legacy::at_sub_end(end, level);
}

/// The columns the writer fills, in the order of its cells.
const EVENT_COLUMNS: [&str; 15] = [
    "organization_id",
    "event_id",
    "occurred_at",
    "txid",
    "actor",
    "actor_verified",
    "session_role",
    "outer_role",
    "action",
    "table_name",
    "row_key",
    "changed_columns",
    "payload",
    "hash",
    "payload_digest",
];

const PENDING_COLUMNS: [&str; 4] = ["organization_id", "event_ids", "hashes", "occurred_at"];

/// Appends one event to `org`'s chain, written by the current session.
pub(crate) fn write_event(
    org: &str,
    action: &str,
    table_name: Option<&str>,
    row_key: Option<&str>,
    changed_columns: Option<Vec<String>>,
    payload: Option<&serde_json::Value>,
) {
    append_events(
        &Who::current(),
        &[NewEvent {
            org: org.to_string(),
            action: action.to_string(),
            table_name: table_name.map(str::to_string),
            row_key: row_key.map(str::to_string),
            changed_columns,
            payload: payload.cloned(),
        }],
    );
}

/// Appends `events` (in order) on behalf of `who`, in one INSERT, and files the pending rows
/// of tenants this transaction had written no event for yet. Each payload is encrypted for its
/// tenant under the active PHI key, bound to its event id, with a secret salt in front of the
/// JSON; the event's hash covers the salted payload's digest, not the ciphertext.
pub(crate) fn append_events(who: &Who, events: &[NewEvent]) {
    if events.is_empty() {
        return;
    }
    let tables = (
        direct::tenancy_table(c"audit_events"),
        direct::tenancy_table(c"audit_pending"),
    );
    let (Some(events_rel), Some(pending_rel)) = tables else {
        // The library is newer than the extension's objects (ALTER EXTENSION pg_tenancy
        // UPDATE not run yet): write the 0.2.0 chain, which the update keeps.
        return super::legacy::append_events(who, events);
    };
    let ids = next_event_ids(events.len());
    // txid_current(): the top-level transaction id with its epoch.
    // SAFETY: assigns the transaction id if it has none yet, as txid_current() does.
    let txid = unsafe { pg_sys::GetTopFullTransactionId() }.value as i64;
    // The cells live in a context of their own, gone once the rows are written.
    let mut cells = PgMemoryContexts::new("pg_tenancy audit rows");
    // SAFETY: nothing allocated in `cells` outlives the closure (the rows are written in it).
    unsafe {
        cells.switch_to(|_| {
            let session_role = direct::name_datum(&who.session_role);
            let outer_role = direct::name_datum(&who.outer_role);
            let actor = who.actor.as_deref().into_datum();
            // Per tenant, in order: (event id, hash) of this batch's events.
            let mut sealed: Vec<(&str, Vec<i64>, Vec<u8>)> = Vec::new();
            let rows: Vec<Vec<direct::Cell>> = events
                .iter()
                .zip(&ids)
                .map(|(e, &event_id)| {
                    let (row, hash) =
                        event_row(who, e, event_id, txid, session_role, outer_role, actor);
                    let at = match sealed.iter().position(|t| t.0 == e.org) {
                        Some(at) => at,
                        None => {
                            sealed.push((e.org.as_str(), Vec::new(), Vec::new()));
                            sealed.len() - 1
                        }
                    };
                    sealed[at].1.push(event_id);
                    sealed[at].2.extend_from_slice(&hash);
                    row
                })
                .collect();
            direct::insert(events_rel, &EVENT_COLUMNS, &rows);
            // What the sealer needs of them, in the same (sub)transaction: committed with
            // the events or gone with them.
            let occurred_at = pg_sys::Datum::from(who.occurred_at);
            let pending: Vec<Vec<direct::Cell>> = sealed
                .iter()
                .flat_map(|(org, ids, hashes)| {
                    ids.chunks(PENDING_EVENTS)
                        .zip(hashes.chunks(PENDING_EVENTS * 32))
                        .map(|(ids, hashes)| {
                            vec![
                                org.into_datum(),
                                ids.to_vec().into_datum(),
                                hashes.into_datum(),
                                Some(occurred_at),
                            ]
                        })
                })
                .collect();
            direct::insert(pending_rel, &PENDING_COLUMNS, &pending);
        })
    };
}

/// The cells of one event's row. Its payload is encrypted for its tenant under the active
/// PHI key, bound to its event id, with a secret salt in front of the JSON; its hash covers
/// the salted payload's digest, not the ciphertext.
fn event_row(
    who: &Who,
    e: &NewEvent,
    event_id: i64,
    txid: i64,
    session_role: pg_sys::Datum,
    outer_role: pg_sys::Datum,
    actor: direct::Cell,
) -> (Vec<direct::Cell>, [u8; 32]) {
    let sealed = e.payload.as_ref().map(|p| {
        let salt = crypto::random_bytes::<PAYLOAD_SALT>();
        let json = serde_json::to_vec(p).expect("JSON serialises");
        let mut plain = Vec::with_capacity(1 + PAYLOAD_SALT + json.len());
        plain.push(PAYLOAD_V2_MARK);
        plain.extend_from_slice(&salt);
        plain.extend_from_slice(&json);
        let envelope = crypto::encrypt_for(
            &e.org,
            Content::Jsonb,
            Some(&payload_label(event_id)),
            &plain,
        )
        .or_raise();
        (envelope, payload_digest(&e.org, event_id, &salt, &json))
    });
    let digest = sealed.as_ref().map(|(_, d)| d.as_slice());
    let hash = event_hash_v2(&EventV2 {
        org: &e.org,
        event_id,
        occurred_at: who.occurred_at,
        txid,
        body: e.body(who),
        payload_digest: digest,
    });
    let row = vec![
        e.org.as_str().into_datum(),
        event_id.into_datum(),
        // timestamptz is the microseconds since 2000-01-01 the clock returned.
        Some(pg_sys::Datum::from(who.occurred_at)),
        txid.into_datum(),
        actor,
        who.actor_verified.into_datum(),
        Some(session_role),
        Some(outer_role),
        e.action.as_str().into_datum(),
        e.table_name.as_deref().into_datum(),
        e.row_key.as_deref().into_datum(),
        e.changed_columns.clone().into_datum(),
        sealed.as_ref().map(|(p, _)| p.as_slice()).into_datum(),
        hash.as_slice().into_datum(),
        digest.into_datum(),
    ];
    (row, hash)
}
