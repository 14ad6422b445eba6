//! Appending events: each is hashed alone and inserted without waiting for anyone (no chain
//! head lock: writers of one tenant run concurrently, under any isolation level); the
//! transaction's first event of a tenant also files a row in `tenancy.audit_pending`, which
//! the sealer ([`super::sealer`]) turns into a block of the tenant's chain after commit.

use super::chain::{event_hash_v2, payload_digest, EventV2, PAYLOAD_SALT, PAYLOAD_V2_MARK};
use super::event::{array_literal, next_event_ids};
pub(crate) use super::event::{payload_label, NewEvent, Who};
use crate::crypto::{self, envelope::Content};
use crate::error::{Raise, TenancyError};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashSet;

thread_local! {
    static PLANS: RefCell<Option<Plans>> = const { RefCell::new(None) };
    /// The tenants this transaction has filed an `audit_pending` row for.
    static PENDING: RefCell<HashSet<String>> = RefCell::new(HashSet::new());
}

fn forget_pending() {
    PENDING.with(|t| t.borrow_mut().clear());
}

/// End of the transaction: its pending rows are committed (or gone with it).
pub(crate) fn at_xact_end(end: crate::xact::End) {
    forget_pending();
    super::legacy::at_xact_end(end);
}

/// End of a subtransaction: a rolled-back one may have taken a pending row with it; the next
/// event files one again (a second row of the same transaction is harmless).
pub(crate) fn at_sub_end(end: crate::xact::SubEnd, _level: i32) {
    if end == crate::xact::SubEnd::Abort {
        forget_pending();
    }
    super::legacy::at_sub_end(end, _level);
}

/// Whether `tenancy.audit_pending` exists (0.2.1's objects are installed).
fn has_pending_table() -> bool {
    // SAFETY: catalog lookups by name (missing_ok for the namespace).
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"tenancy".as_ptr(), true);
        ns != pg_sys::InvalidOid
            && pg_sys::get_relname_relid(c"audit_pending".as_ptr(), ns) != pg_sys::InvalidOid
    }
}

struct Plans {
    pending: OwnedPreparedStatement,
    insert_one: OwnedPreparedStatement,
    insert: OwnedPreparedStatement,
}

const INSERT_COLUMNS: &str = "INSERT INTO tenancy.audit_events (organization_id, event_id, occurred_at,
    txid, actor, actor_verified, session_role, outer_role, action, table_name, row_key, changed_columns,
    payload, hash, payload_digest)";

fn text() -> PgOid {
    PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID)
}

fn prepare(client: &SpiClient<'_>) -> SpiResult<Plans> {
    use pg_sys::BuiltinOid::*;
    let o = PgOid::BuiltIn;
    Ok(Plans {
        pending: client
            .prepare_mut(
                "INSERT INTO tenancy.audit_pending (organization_id, txid, first_event_id)
                 SELECT * FROM unnest($1, $2, $3)",
                &[o(TEXTARRAYOID), o(INT8ARRAYOID), o(INT8ARRAYOID)],
            )?
            .keep(),
        // One event (the common OLTP case): a plain VALUES row, the cheapest plan.
        insert_one: client
            .prepare_mut(
                &format!(
                    "{INSERT_COLUMNS} VALUES ($1[1], $2[1], $3, $4, $5, $6, $7::name, $8::name, $9[1], $10[1],
                        $11[1], $12[1]::text[], $13[1], $14[1], $15[1])"
                ),
                &array_params(),
            )?
            .keep(),
        // A whole batch in one statement: one executor start, not one per event.
        insert: client
            .prepare_mut(
                &format!(
                    "{INSERT_COLUMNS}
                     SELECT u.o, u.e, $3, $4, $5, $6, $7::name, $8::name, u.a, u.t, u.k, u.c::text[],
                            u.p, u.h, u.d
                       FROM unnest($1, $2, $9, $10, $11, $12, $13, $14, $15)
                            AS u(o, e, a, t, k, c, p, h, d)"
                ),
                &array_params(),
            )?
            .keep(),
    })
}

/// The parameter types of both insert plans: per-event columns as arrays, the writer's
/// columns (time, transaction, actor, roles) once.
fn array_params() -> [PgOid; 15] {
    use pg_sys::BuiltinOid::*;
    let o = PgOid::BuiltIn;
    [
        o(TEXTARRAYOID),
        o(INT8ARRAYOID),
        o(TIMESTAMPTZOID),
        o(INT8OID),
        text(),
        o(BOOLOID),
        text(),
        text(),
        o(TEXTARRAYOID),
        o(TEXTARRAYOID),
        o(TEXTARRAYOID),
        o(TEXTARRAYOID),
        o(BYTEAARRAYOID),
        o(BYTEAARRAYOID),
        o(BYTEAARRAYOID),
    ]
}

/// Runs `f` with an SPI connection and this backend's prepared statements (prepared on first
/// use, kept for the backend's life).
fn with_plans<R>(f: impl FnOnce(&mut SpiClient<'_>, &Plans) -> SpiResult<R>) -> SpiResult<R> {
    Spi::connect_mut(|client| {
        PLANS.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(prepare(client)?);
            }
            f(client, slot.as_ref().expect("prepared just above"))
        })
    })
}

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
    if !has_pending_table() {
        // The library is newer than the extension's objects (ALTER EXTENSION pg_tenancy
        // UPDATE not run yet): write the 0.2.0 chain, which the update keeps.
        return super::legacy::append_events(who, events);
    }
    let result: SpiResult<()> = with_plans(|client, plans| {
        let ids = next_event_ids(events.len());
        // txid_current(): the top-level transaction id with its epoch.
        // SAFETY: assigns the transaction id if it has none yet, as txid_current() does.
        let txid = unsafe { pg_sys::GetTopFullTransactionId() }.value as i64;
        let mut orgs = Vec::with_capacity(events.len());
        let mut actions = Vec::with_capacity(events.len());
        let mut tables = Vec::with_capacity(events.len());
        let mut keys = Vec::with_capacity(events.len());
        let mut changed = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        let mut hashes = Vec::with_capacity(events.len());
        let mut digests = Vec::with_capacity(events.len());
        let (mut new_orgs, mut new_firsts) = (Vec::new(), Vec::new());
        PENDING.with(|p| {
            let mut pending = p.borrow_mut();
            for (e, &event_id) in events.iter().zip(&ids) {
                if pending.insert(e.org.clone()) {
                    new_orgs.push(e.org.clone());
                    new_firsts.push(event_id);
                }
            }
        });
        for (e, &event_id) in events.iter().zip(&ids) {
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
                (
                    envelope,
                    payload_digest(&e.org, event_id, &salt, &json).to_vec(),
                )
            });
            let (payload, digest) = match sealed {
                Some((p, d)) => (Some(p), Some(d)),
                None => (None, None),
            };
            let hash = event_hash_v2(&EventV2 {
                org: &e.org,
                event_id,
                occurred_at: who.occurred_at,
                txid,
                body: e.body(who),
                payload_digest: digest.as_deref(),
            })
            .to_vec();
            orgs.push(e.org.clone());
            actions.push(e.action.clone());
            tables.push(e.table_name.clone());
            keys.push(e.row_key.clone());
            changed.push(e.changed_columns.as_deref().map(array_literal));
            payloads.push(payload);
            hashes.push(hash);
            digests.push(digest);
        }
        let ts = pgrx::datum::TimestampWithTimeZone::try_from(who.occurred_at)
            .expect("the clock is a valid timestamp");
        let plan = if events.len() == 1 {
            &plans.insert_one
        } else {
            &plans.insert
        };
        client.update(
            plan,
            None,
            &[
                orgs.into(),
                ids.into(),
                ts.into(),
                txid.into(),
                who.actor.clone().into(),
                who.actor_verified.into(),
                who.session_role.as_str().into(),
                who.outer_role.as_str().into(),
                actions.into(),
                tables.into(),
                keys.into(),
                changed.into(),
                payloads.into(),
                hashes.into(),
                digests.into(),
            ],
        )?;
        if !new_orgs.is_empty() {
            let txids = vec![txid; new_orgs.len()];
            client.update(
                &plans.pending,
                None,
                &[new_orgs.into(), txids.into(), new_firsts.into()],
            )?;
        }
        Ok(())
    });
    if result.is_err() {
        // Whatever was filed in this statement is rolled back with it.
        forget_pending();
    }
    result.unwrap_or_else(|e| TenancyError::spi("writing the audit event", e).report());
}
