//! The 0.2.0 writer (v1 chain: each event linked to its tenant's previous one under the
//! tenant's chain-head lock), kept for one purpose: a server running this library over
//! objects of 0.1.0 or 0.2.0 (before `ALTER EXTENSION pg_tenancy UPDATE`) keeps writing the
//! trail those objects hold, which the update then carries over into the sealed one.

use super::chain::{event_hash, EventContent};
use super::event::{array_literal, next_event_ids, payload_label, NewEvent, Who};
use crate::crypto::{self, envelope::Content};
use crate::error::{Raise, TenancyError};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    static PLANS: RefCell<Option<Plans>> = const { RefCell::new(None) };
    /// The last (seq, hash) of every chain this transaction holds the head lock of. Updating
    /// a head row per event would leave one dead row version per event for the next lookup
    /// to walk (quadratic in a bulk statement), so the tip is read once and kept here.
    static TIPS: RefCell<HashMap<String, (i64, Vec<u8>)>> = RefCell::new(HashMap::new());
}

/// Forgets the cached chain tips: at transaction end and when a subtransaction aborts (its
/// events and its head locks are gone with it).
fn forget_tips() {
    TIPS.with(|t| t.borrow_mut().clear());
}

/// End of the transaction: the chain heads are released, their tips forgotten.
pub(super) fn at_xact_end(_end: crate::xact::End) {
    forget_tips();
}

/// End of a subtransaction: a rolled-back one took its events and head locks with it.
pub(super) fn at_sub_end(end: crate::xact::SubEnd, _level: i32) {
    if end == crate::xact::SubEnd::Abort {
        forget_tips();
    }
}

struct Plans {
    head: OwnedPreparedStatement,
    lock: OwnedPreparedStatement,
    tip: OwnedPreparedStatement,
    insert_one: OwnedPreparedStatement,
    insert: OwnedPreparedStatement,
}

const INSERT_COLUMNS: &str = "INSERT INTO tenancy.audit_events (organization_id, seq, event_id, occurred_at,
    txid, actor, actor_verified, session_role, outer_role, action, table_name, row_key, changed_columns,
    payload, prev_hash, hash)";

fn text() -> PgOid {
    PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID)
}

fn prepare(client: &SpiClient<'_>) -> SpiResult<Plans> {
    Ok(Plans {
        head: client
            .prepare_mut(
                "INSERT INTO tenancy.audit_chain_heads (organization_id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[text()],
            )?
            .keep(),
        // Locks the tenant's chain head (held to commit: one writer per tenant at a time).
        lock: client
            .prepare_mut(
                "SELECT 1 FROM tenancy.audit_chain_heads WHERE organization_id = $1 FOR UPDATE",
                &[text()],
            )?
            .keep(),
        // Then reads the chain's tip, in a statement of its own so that in READ COMMITTED it
        // sees what the writer we waited for committed: the newest event, or the purge
        // anchor, or the start.
        tip: client
            .prepare_mut(
                "SELECT coalesce(e.seq, h.purged_through_seq), coalesce(e.hash, h.purged_anchor)
                   FROM tenancy.audit_chain_heads h
                   LEFT JOIN LATERAL (SELECT seq, hash FROM tenancy.audit_events
                                       WHERE organization_id = h.organization_id
                                       ORDER BY seq DESC LIMIT 1) e ON true
                  WHERE h.organization_id = $1",
                &[text()],
            )?
            .keep(),
        // One event (the common OLTP case): a plain VALUES row, the cheapest plan.
        insert_one: client
            .prepare_mut(
                &format!(
                    "{INSERT_COLUMNS} VALUES ($1[1], $2[1], $3[1], $4, $5, $6, $7, $8::name, $9::name, $10[1], $11[1],
                        $12[1], $13[1]::text[], $14[1], $15[1], $16[1])"
                ),
                &array_params(),
            )?
            .keep(),
        // A whole batch in one statement: one executor start, not one per event.
        insert: client
            .prepare_mut(
                &format!(
                    "{INSERT_COLUMNS}
                     SELECT u.o, u.s, u.e, $4, $5, $6, $7, $8::name, $9::name, u.a, u.t, u.k, u.c::text[],
                            u.p, u.ph, u.h
                       FROM unnest($1, $2, $3, $10, $11, $12, $13, $14, $15, $16)
                            AS u(o, s, e, a, t, k, c, p, ph, h)"
                ),
                &array_params(),
            )?
            .keep(),
    })
}

/// The parameter types of both insert plans: per-event columns as arrays, the writer's
/// columns (time, transaction, actor, roles) once.
fn array_params() -> [PgOid; 16] {
    use pg_sys::BuiltinOid::*;
    let o = PgOid::BuiltIn;
    [
        o(TEXTARRAYOID),
        o(INT8ARRAYOID),
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

/// Locks the chain heads of `orgs` (sorted, none held yet) for the rest of the transaction
/// and reads their tips.
fn take_heads(client: &mut SpiClient<'_>, plans: &Plans, orgs: &[&str]) -> SpiResult<()> {
    for org in orgs {
        let org = *org;
        // The head row exists but for a tenant's very first event.
        if client.update(&plans.lock, None, &[org.into()])?.is_empty() {
            client.update(&plans.head, None, &[org.into()])?;
            client.update(&plans.lock, None, &[org.into()])?;
        }
        let row = client.update(&plans.tip, None, &[org.into()])?.first();
        let tip = (
            row.get::<i64>(1)?.unwrap_or(0),
            row.get::<Vec<u8>>(2)?.unwrap_or_else(|| vec![0u8; 32]),
        );
        TIPS.with(|t| t.borrow_mut().insert(org.to_string(), tip));
    }
    Ok(())
}

/// Appends `events` (in order) to their tenants' chains on behalf of `who`, in one INSERT.
/// Each payload is encrypted for its tenant under the active PHI key, bound to its event id.
/// Chain heads this transaction does not hold yet are locked in a fixed (sorted) order within
/// the batch (docs/audit.md: what can still deadlock across batches).
pub(super) fn append_events(who: &Who, events: &[NewEvent]) {
    if events.is_empty() {
        return;
    }
    let result: SpiResult<()> = with_plans(|client, plans| {
        let mut missing: Vec<&str> = TIPS.with(|t| {
            let tips = t.borrow();
            events
                .iter()
                .map(|e| e.org.as_str())
                .filter(|org| !tips.contains_key(*org))
                .collect()
        });
        missing.sort_unstable();
        missing.dedup();
        take_heads(client, plans, &missing)?;
        let ids = next_event_ids(events.len());
        // txid_current(): the top-level transaction id with its epoch.
        // SAFETY: assigns the transaction id if it has none yet, as txid_current() does.
        let txid = unsafe { pg_sys::GetTopFullTransactionId() }.value as i64;
        let mut orgs = Vec::with_capacity(events.len());
        let mut seqs = Vec::with_capacity(events.len());
        let mut actions = Vec::with_capacity(events.len());
        let mut tables = Vec::with_capacity(events.len());
        let mut keys = Vec::with_capacity(events.len());
        let mut changed = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        let mut prevs = Vec::with_capacity(events.len());
        let mut hashes = Vec::with_capacity(events.len());
        TIPS.with(|t| {
            let mut tips = t.borrow_mut();
            for (e, &event_id) in events.iter().zip(&ids) {
                let tip = tips.get_mut(&e.org).expect("every chain head is held");
                let seq = tip.0 + 1;
                let sealed = e.payload.as_ref().map(|p| {
                    let bytes = serde_json::to_vec(p).expect("JSON serialises");
                    crypto::encrypt_for(
                        &e.org,
                        Content::Jsonb,
                        Some(&payload_label(event_id)),
                        &bytes,
                    )
                    .or_raise()
                });
                let hash = event_hash(&EventContent {
                    org: &e.org,
                    seq,
                    event_id,
                    occurred_at: who.occurred_at,
                    txid,
                    body: e.body(who),
                    payload: sealed.as_deref(),
                    prev_hash: &tip.1,
                })
                .to_vec();
                orgs.push(e.org.clone());
                seqs.push(seq);
                actions.push(e.action.clone());
                tables.push(e.table_name.clone());
                keys.push(e.row_key.clone());
                changed.push(e.changed_columns.as_deref().map(array_literal));
                payloads.push(sealed);
                prevs.push(std::mem::replace(&mut tip.1, hash.clone()));
                hashes.push(hash);
                tip.0 = seq;
            }
        });
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
                seqs.into(),
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
                prevs.into(),
                hashes.into(),
            ],
        )?;
        Ok(())
    });
    result.unwrap_or_else(|e| TenancyError::spi("writing the audit event", e).report());
}
