//! The audit trail's SQL functions: `log_action`, `audit_payload`, `audit_verify`,
//! `audit_purge`, `audit_history`.

use super::chain::{event_hash, EventContent};
use super::writer::{payload_label, write_event};
use crate::crypto::{self, envelope::Content};
use crate::error::{Raise, TenancyError};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

/// Decrypts an audit payload of the current tenant.
#[pg_extern(stable, parallel_restricted)]
pub(crate) fn audit_payload(payload: Option<&[u8]>, event_id: Option<i64>) -> Option<pgrx::JsonB> {
    let payload = payload?;
    let event_id = event_id
        .ok_or(TenancyError::NullArgument {
            function: "audit_payload",
            argument: "event_id",
        })
        .or_raise();
    let org = crate::context::current_org()
        .ok_or(TenancyError::NoTenant)
        .or_raise();
    let (_, plain) = crypto::decrypt_for(
        &org,
        payload,
        Some(Content::Jsonb),
        Some(&payload_label(event_id)),
    )
    .or_raise();
    Some(pgrx::JsonB(payload_json(&plain).or_raise()))
}

/// An audit payload's JSON (written by pg_tenancy's serde_json; authenticated, but parsed
/// without trusting that: an error, never a panic).
fn payload_json(plain: &[u8]) -> Result<serde_json::Value, TenancyError> {
    serde_json::from_slice(plain).map_err(|_| TenancyError::PhiInvalidJson)
}

/// Records an operator action of the application in the current tenant's audit trail.
///
/// `details` is read from its raw datum (pgrx's `JsonB` argument panics on values nested more
/// than serde_json's 128 levels, before the function could refuse them cleanly).
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = r#"
CREATE FUNCTION tenancy."log_action"("action" TEXT, "details" jsonb DEFAULT NULL) RETURNS bool
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'log_action_wrapper';
"#
)]
fn log_action(fcinfo: pg_sys::FunctionCallInfo) -> bool {
    // SAFETY: called by Postgres with this function's two arguments (text, jsonb).
    let (action, details) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 0),
            pgrx::fcinfo::pg_getarg_datum(fcinfo, 1),
        )
    };
    let details = details.map(|d| {
        serde_json::from_slice::<serde_json::Value>(&crate::jsonb::jsonb_text(d))
            .map_err(|_| TenancyError::DetailsTooDeep)
            .or_raise()
    });
    let action = action
        .ok_or(TenancyError::NullArgument {
            function: "log_action",
            argument: "action",
        })
        .or_raise();
    let org = crate::context::current_org()
        .ok_or(TenancyError::NoTenant)
        .or_raise();
    if action.is_empty()
        || action.len() > 64
        || !action
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
    {
        TenancyError::BadAction.report();
    }
    // The trail's own events (INSERT, UPDATE, DELETE, REVEAL, SUPPORT_READ, AUDIT_PURGE and
    // any added later) are named in capitals and '_' only: an application cannot forge one.
    if action.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
        TenancyError::ReservedAction {
            action: action.to_string(),
        }
        .report();
    }
    write_event(&org, action, None, None, None, details.as_ref());
    true
}

/// Verifies `org`'s hash chain: one row with the number of events checked and, when broken,
/// the first broken position and what is wrong. Superusers may verify any tenant; others
/// only the tenant of their context.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_verify(
    org: &str,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(events, i64),
        name!(first_broken_seq, Option<i64>),
        name!(problem, Option<String>),
    ),
> {
    // This function is SECURITY DEFINER: ask about the caller (the outer user), not the owner.
    // SAFETY: plain catalog lookup of a role id.
    let caller_is_superuser = unsafe { pg_sys::superuser_arg(pg_sys::GetOuterUserId()) };
    let allowed = caller_is_superuser || crate::context::current_org().as_deref() == Some(org);
    if !allowed {
        TenancyError::OtherTenant {
            what: "audit_verify",
        }
        .report();
    }
    let result = Spi::connect(|client| -> SpiResult<(i64, Option<(i64, String)>)> {
        let rows = client.select(
            "SELECT seq, event_id, occurred_at, txid, actor, actor_verified, session_role::text, outer_role::text,
                    action, table_name, row_key, changed_columns, payload, prev_hash, hash
               FROM tenancy.audit_events WHERE organization_id = $1 ORDER BY seq",
            None,
            &[org.into()],
        )?;
        // After a purge the chain starts at the anchor: the hash of the last purged event.
        let anchor = client
            .select(
                "SELECT purged_through_seq, purged_anchor FROM tenancy.audit_chain_heads WHERE organization_id = $1",
                None,
                &[org.into()],
            )?
            .first()
            .get_two::<i64, Vec<u8>>()
            .unwrap_or((None, None));
        let mut expected_prev = anchor.1.unwrap_or_else(|| vec![0u8; 32]);
        let first_seq = anchor.0.unwrap_or(0) + 1;
        let mut n = 0i64;
        for (expected_seq, r) in (first_seq..).zip(rows) {
            n += 1;
            let seq = r.get::<i64>(1)?.unwrap_or(0);
            if seq != expected_seq {
                return Ok((n, Some((expected_seq, format!("event {expected_seq} is missing (next stored is {seq})")))));
            }
            let prev = r.get::<Vec<u8>>(14)?.unwrap_or_default();
            if prev != expected_prev {
                return Ok((n, Some((seq, "its link to the previous event does not match".into()))));
            }
            let ts = r.get::<pgrx::datum::TimestampWithTimeZone>(3)?.map(|t| t.into_inner()).unwrap_or(0);
            let actor = r.get::<String>(5)?;
            let session_role = r.get::<String>(7)?.unwrap_or_default();
            let outer_role = r.get::<String>(8)?.unwrap_or_default();
            let action = r.get::<String>(9)?.unwrap_or_default();
            let table_name = r.get::<String>(10)?;
            let row_key = r.get::<String>(11)?;
            let changed = r.get::<Vec<String>>(12)?;
            let payload = r.get::<Vec<u8>>(13)?;
            let stored = r.get::<Vec<u8>>(15)?.unwrap_or_default();
            let content = EventContent {
                org,
                seq,
                event_id: r.get::<i64>(2)?.unwrap_or(0),
                occurred_at: ts,
                txid: r.get::<i64>(4)?.unwrap_or(0),
                actor: actor.as_deref(),
                actor_verified: r.get::<bool>(6)?.unwrap_or(false),
                session_role: &session_role,
                outer_role: &outer_role,
                action: &action,
                table_name: table_name.as_deref(),
                row_key: row_key.as_deref(),
                changed_columns: changed.as_deref(),
                payload: payload.as_deref(),
                prev_hash: &prev,
            };
            if event_hash(&content).as_slice() != stored.as_slice() {
                return Ok((n, Some((seq, "its content does not match its hash (edited)".into()))));
            }
            expected_prev = stored;
        }
        Ok((n, None))
    })
    .unwrap_or_else(|e| TenancyError::spi("reading the audit trail", e).report());
    let (events, broken) = result;
    TableIterator::once((
        broken.is_none(),
        events,
        broken.as_ref().map(|b| b.0),
        broken.map(|b| b.1),
    ))
}

/// Deletes `org`'s events older than `before` (whole chain prefix only), keeping the hash of
/// the last deleted event as the chain's new anchor, and records the purge as an event in the
/// same trail. The only way to delete audit events. Superuser. Returns how many were deleted.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_purge(org: &str, before: pgrx::datum::TimestampWithTimeZone) -> i64 {
    // SAFETY: superuser() only reads the current role.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::SuperuserOnly {
            what: "audit_purge",
        }
        .report();
    }
    let (through, anchor) = Spi::connect_mut(|client| -> SpiResult<(i64, Option<Vec<u8>>)> {
        // Lock the chain head: no event of this tenant is written meanwhile.
        client.update(
            "SELECT 1 FROM tenancy.audit_chain_heads WHERE organization_id = $1 FOR UPDATE",
            None,
            &[org.into()],
        )?;
        let rows = client.select(
            "SELECT seq, hash FROM tenancy.audit_events
              WHERE organization_id = $1 AND seq = (SELECT max(seq) FROM tenancy.audit_events
                                                     WHERE organization_id = $1 AND occurred_at < $2)",
            None,
            &[org.into(), before.into()],
        )?;
        if rows.is_empty() {
            return Ok((0, None)); // nothing that old: nothing to purge
        }
        let row = rows.first().get_two::<i64, Vec<u8>>()?;
        Ok((row.0.unwrap_or(0), row.1))
    })
    .unwrap_or_else(|e| TenancyError::spi("reading the audit trail", e).report());
    let Some(anchor) = anchor else {
        return 0;
    };
    let deleted = crate::policy::with_maintenance(|| {
        Spi::connect_mut(|client| -> SpiResult<i64> {
            let n = client
                .update(
                    "DELETE FROM tenancy.audit_events WHERE organization_id = $1 AND seq <= $2",
                    None,
                    &[org.into(), through.into()],
                )?
                .len() as i64;
            client.update(
                "UPDATE tenancy.audit_chain_heads SET purged_through_seq = $2, purged_anchor = $3 WHERE organization_id = $1",
                None,
                &[org.into(), through.into(), anchor.clone().into()],
            )?;
            Ok(n)
        })
    })
    .unwrap_or_else(|e| TenancyError::spi("purging the audit trail", e).report());
    write_event(
        org,
        "AUDIT_PURGE",
        None,
        None,
        None,
        Some(
            &serde_json::json!({ "deleted": deleted, "through_seq": through, "before": before.to_string() }),
        ),
    );
    deleted
}

/// One clinic's audit history between `from` and `to`, payloads decrypted, for a support
/// role: EXECUTE is granted by the DBA (revoked from PUBLIC). Writes a `SUPPORT_READ` event
/// into that clinic's own trail first, naming the role that read it.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)] // a result row is a tuple of its columns
fn audit_history(
    org: &str,
    from: pgrx::datum::TimestampWithTimeZone,
    to: pgrx::datum::TimestampWithTimeZone,
) -> TableIterator<
    'static,
    (
        name!(seq, i64),
        name!(occurred_at, pgrx::datum::TimestampWithTimeZone),
        name!(actor, Option<String>),
        name!(action, String),
        name!(table_name, Option<String>),
        name!(changed_columns, Option<Vec<String>>),
        name!(changes, Option<pgrx::JsonB>),
    ),
> {
    write_event(
        org,
        "SUPPORT_READ",
        None,
        None,
        None,
        Some(&serde_json::json!({ "from": from.to_string(), "to": to.to_string() })),
    );
    let rows = Spi::connect(|client| -> SpiResult<Vec<_>> {
        let t = client.select(
            "SELECT seq, occurred_at, actor, action, table_name, changed_columns, payload, event_id
               FROM tenancy.audit_events
              WHERE organization_id = $1 AND occurred_at >= $2 AND occurred_at < $3 ORDER BY seq",
            None,
            &[org.into(), from.into(), to.into()],
        )?;
        let mut out = Vec::new();
        for r in t {
            let event_id = r.get::<i64>(8)?.unwrap_or(0);
            let changes = r.get::<Vec<u8>>(7)?.map(|p| {
                let (_, plain) = crypto::decrypt_for(
                    org,
                    &p,
                    Some(Content::Jsonb),
                    Some(&payload_label(event_id)),
                )
                .or_raise();
                pgrx::JsonB(payload_json(&plain).or_raise())
            });
            out.push((
                r.get::<i64>(1)?.unwrap_or(0),
                r.get::<pgrx::datum::TimestampWithTimeZone>(2)?
                    .expect("occurred_at is NOT NULL"),
                r.get::<String>(3)?,
                r.get::<String>(4)?.unwrap_or_default(),
                r.get::<String>(5)?,
                r.get::<Vec<String>>(6)?,
                changes,
            ));
        }
        Ok(out)
    })
    .unwrap_or_else(|e| TenancyError::spi("reading the audit trail", e).report());
    TableIterator::new(rows)
}
