//! The audit trail's SQL functions: `log_action`, `audit_payload`, `audit_verify`,
//! `audit_purge`, `audit_history`, `audit_rekey`.

use super::chain::{
    event_hash, event_hash_v2, payload_digest, split_payload, BlockHasher, Body, EventContent,
    EventV2,
};
use super::writer::{payload_label, write_event};
use crate::crypto::{self, envelope::Content};
use crate::error::{Raise, TenancyError};
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};

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

/// An audit payload's JSON: after the salt of a v2 payload, or the whole of a v1 one. (written by pg_tenancy's serde_json; authenticated, but parsed
/// without trusting that: an error, never a panic).
fn payload_json(plain: &[u8]) -> Result<serde_json::Value, TenancyError> {
    let json = split_payload(plain).map_or(plain, |(_, json)| json);
    serde_json::from_slice(json).map_err(|_| TenancyError::PhiInvalidJson)
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

/// Verification's outcome: events checked, the first broken position and why, the unsealed tail.
pub(super) struct Verdict {
    events: i64,
    pub(super) broken: Option<(Option<i64>, String)>,
    unsealed: i64,
    oldest_unsealed: Option<pgrx::datum::TimestampWithTimeZone>,
}

/// Rows read per statement while verifying: memory stays bounded however long the trail.
const VERIFY_PAGE: i64 = 1000;
/// Blocks read per statement (each holds up to 10,000 event ids).
const VERIFY_BLOCKS: i64 = 8;

/// Verifies `org`'s audit trail: the v1 chain (events of 0.1.0 and 0.2.0), then every sealed
/// block (each event's hash, its payload's commitment, the block's hash and its link to the
/// one before), and that every other event of the tenant is waiting to be sealed. One row:
/// ok, events checked, the first broken position and what is wrong, and the unsealed tail
/// (how many events, the oldest one's time). Superusers may verify any tenant; others only
/// the tenant of their context.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)] // a result row is a tuple of its columns
fn audit_verify(
    org: &str,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(events, i64),
        name!(first_broken_seq, Option<i64>),
        name!(problem, Option<String>),
        name!(unsealed, i64),
        name!(oldest_unsealed, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    check_verify_allowed(org);
    let v = Spi::connect(|client| verify(client, org))
        .unwrap_or_else(|e| TenancyError::spi("reading the audit trail", e).report());
    TableIterator::once(v.row())
}

/// Raises unless the caller may verify `org`'s trail: a superuser, or the tenant itself.
pub(super) fn check_verify_allowed(org: &str) {
    // The verifiers are SECURITY DEFINER: ask about the caller (the outer user), not the owner.
    // SAFETY: plain catalog lookup of a role id.
    let caller_is_superuser = unsafe { pg_sys::superuser_arg(pg_sys::GetOuterUserId()) };
    let allowed = caller_is_superuser || crate::context::current_org().as_deref() == Some(org);
    if !allowed {
        TenancyError::OtherTenant {
            what: "audit_verify",
        }
        .report();
    }
}

impl Verdict {
    /// The row `audit_verify` returns.
    pub(super) fn row(
        self,
    ) -> (
        bool,
        i64,
        Option<i64>,
        Option<String>,
        i64,
        Option<pgrx::datum::TimestampWithTimeZone>,
    ) {
        let (at, problem) = match self.broken {
            Some((at, p)) => (at, Some(p)),
            None => (None, None),
        };
        (
            problem.is_none(),
            self.events,
            at,
            problem,
            self.unsealed,
            self.oldest_unsealed,
        )
    }
}

pub(super) fn verify(client: &SpiClient<'_>, org: &str) -> SpiResult<Verdict> {
    // In one statement (one snapshot): the sealed blocks as of now, the v2 events, and which
    // of them wait for the sealer. Blocks up to `last_block` never change but by a purge.
    let r = client
        .select(
            "SELECT (SELECT count(*) FROM tenancy.audit_events e WHERE e.organization_id = $1 AND e.seq IS NULL),
                    u.n, u.oldest,
                    (SELECT coalesce(max(block_no), 0) FROM tenancy.audit_seals WHERE organization_id = $1),
                    (SELECT coalesce(sum(event_count), 0)::bigint FROM tenancy.audit_seals WHERE organization_id = $1),
                    h.purged_through_seq, h.purged_anchor
               FROM (SELECT count(*) AS n, min(e.occurred_at) AS oldest
                       FROM tenancy.audit_events e
                      WHERE e.organization_id = $1 AND e.seq IS NULL
                        AND e.event_id IN (SELECT pg_catalog.unnest(p.event_ids) FROM tenancy.audit_pending p
                                            WHERE p.organization_id = $1)) u
               LEFT JOIN tenancy.audit_chain_heads h ON h.organization_id = $1",
            None,
            &[org.into()],
        )?
        .first();
    let v2_total = r.get::<i64>(1)?.unwrap_or(0);
    let unsealed = r.get::<i64>(2)?.unwrap_or(0);
    let oldest_unsealed = r.get::<pgrx::datum::TimestampWithTimeZone>(3)?;
    let last_block = r.get::<i64>(4)?.unwrap_or(0);
    let sealed_total = r.get::<i64>(5)?.unwrap_or(0);
    let purged_seq = r.get::<i64>(6)?.unwrap_or(0);
    let anchor = r.get::<Vec<u8>>(7)?;
    let mut v = Verdict {
        events: 0,
        broken: None,
        unsealed,
        oldest_unsealed,
    };
    // After a purge the trail starts at the anchor: the hash of the last purged event or block.
    let anchor_for_check = anchor.clone();
    let mut prev = anchor.unwrap_or_else(|| vec![0u8; 32]);
    // Positions come from the tables: a superuser's edit must be reported, not overflow.
    let Some(mut next_seq) = purged_seq.checked_add(1).filter(|_| purged_seq >= 0) else {
        v.broken = Some((
            None,
            format!("the purge position {purged_seq} is out of range (edited)"),
        ));
        return Ok(v);
    };
    if let Some(b) = verify_v1(client, org, &mut prev, &mut next_seq, &mut v.events)? {
        v.broken = Some(b);
        return Ok(v);
    }
    if let Some(b) = verify_blocks(
        client,
        org,
        last_block,
        &mut prev,
        &mut next_seq,
        &mut v.events,
    )? {
        v.broken = Some(b);
        return Ok(v);
    }
    if purged_seq > 0 {
        if let Some(p) = purge_problem(client, org, purged_seq, anchor_for_check.as_deref())? {
            v.broken = Some((Some(purged_seq), p));
            return Ok(v);
        }
    }
    if v2_total - unsealed != sealed_total {
        let stray = v2_total - unsealed - sealed_total;
        v.broken = Some((
            None,
            if stray > 0 {
                format!("{stray} event(s) are in no sealed block and not waiting to be sealed (written outside pg_tenancy)")
            } else {
                format!("{} sealed event(s) are missing", -stray)
            },
        ));
    }
    Ok(v)
}

/// The columns both formats hash of a stored event (occurred_at, txid, actor,
/// actor_verified, session_role, outer_role, action, table_name, row_key, changed_columns),
/// read from a row where they stand in that order from column `at`.
struct Stored {
    occurred_at: i64,
    txid: i64,
    actor: Option<String>,
    actor_verified: bool,
    session_role: String,
    outer_role: String,
    action: String,
    table_name: Option<String>,
    row_key: Option<String>,
    changed_columns: Option<Vec<String>>,
}

impl Stored {
    fn read(r: &pgrx::spi::SpiHeapTupleData<'_>, at: usize) -> SpiResult<Stored> {
        Ok(Stored {
            occurred_at: r
                .get::<pgrx::datum::TimestampWithTimeZone>(at)?
                .map(|t| t.into_inner())
                .unwrap_or(0),
            txid: r.get::<i64>(at + 1)?.unwrap_or(0),
            actor: r.get::<String>(at + 2)?,
            actor_verified: r.get::<bool>(at + 3)?.unwrap_or(false),
            session_role: r.get::<String>(at + 4)?.unwrap_or_default(),
            outer_role: r.get::<String>(at + 5)?.unwrap_or_default(),
            action: r.get::<String>(at + 6)?.unwrap_or_default(),
            table_name: r.get::<String>(at + 7)?,
            row_key: r.get::<String>(at + 8)?,
            // A NULL element (never written by pg_tenancy) becomes a name no column can
            // have, so the event's hash no longer matches.
            changed_columns: r.get::<Vec<Option<String>>>(at + 9)?.map(|c| {
                c.into_iter()
                    .map(|n| n.unwrap_or_else(|| "\u{0}NULL".into()))
                    .collect()
            }),
        })
    }

    fn body(&self) -> Body<'_> {
        Body {
            actor: self.actor.as_deref(),
            actor_verified: self.actor_verified,
            session_role: &self.session_role,
            outer_role: &self.outer_role,
            action: &self.action,
            table_name: self.table_name.as_deref(),
            row_key: self.row_key.as_deref(),
            changed_columns: self.changed_columns.as_deref(),
        }
    }
}

/// The v1 chain, in pages by position.
fn verify_v1(
    client: &SpiClient<'_>,
    org: &str,
    prev: &mut Vec<u8>,
    next_seq: &mut i64,
    checked: &mut i64,
) -> SpiResult<Option<(Option<i64>, String)>> {
    loop {
        let rows = client.select(
            "SELECT seq, event_id, occurred_at, txid, actor, actor_verified, session_role::text, outer_role::text,
                    action, table_name, row_key, changed_columns, payload, prev_hash, hash
               FROM tenancy.audit_events WHERE organization_id = $1 AND seq IS NOT NULL AND seq >= $2
              ORDER BY seq LIMIT $3",
            None,
            &[org.into(), (*next_seq).into(), VERIFY_PAGE.into()],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        for r in rows {
            *checked += 1;
            let expected = *next_seq;
            let seq = r.get::<i64>(1)?.unwrap_or(0);
            if seq != expected {
                return Ok(Some((
                    Some(expected),
                    format!("event {expected} is missing (next stored is {seq})"),
                )));
            }
            let stored_prev = r.get::<Vec<u8>>(14)?.unwrap_or_default();
            if stored_prev != *prev {
                return Ok(Some((
                    Some(seq),
                    "its link to the previous event does not match".into(),
                )));
            }
            let ev = Stored::read(&r, 3)?;
            let payload = r.get::<Vec<u8>>(13)?;
            let stored = r.get::<Vec<u8>>(15)?.unwrap_or_default();
            let content = EventContent {
                org,
                seq,
                event_id: r.get::<i64>(2)?.unwrap_or(0),
                occurred_at: ev.occurred_at,
                txid: ev.txid,
                body: ev.body(),
                payload: payload.as_deref(),
                prev_hash: &stored_prev,
            };
            if event_hash(&content).as_slice() != stored.as_slice() {
                return Ok(Some((
                    Some(seq),
                    "its content does not match its hash (edited)".into(),
                )));
            }
            *prev = stored;
            *next_seq = next_seq.saturating_add(1);
        }
    }
}

/// The sealed blocks up to `last_block`, a few per statement, each block's events read in one.
fn verify_blocks(
    client: &SpiClient<'_>,
    org: &str,
    last_block: i64,
    prev: &mut Vec<u8>,
    next_seq: &mut i64,
    checked: &mut i64,
) -> SpiResult<Option<(Option<i64>, String)>> {
    let mut after = 0i64;
    loop {
        let blocks = client.select(
            "SELECT block_no, first_seq, event_ids, prev_hash, hash, newest_event_at,
                    pg_catalog.array_lower(event_ids, 1) IS DISTINCT FROM 1 OR pg_catalog.array_ndims(event_ids) IS DISTINCT FROM 1
               FROM tenancy.audit_seals
              WHERE organization_id = $1 AND block_no > $2 AND block_no <= $3
              ORDER BY block_no LIMIT $4",
            None,
            &[
                org.into(),
                after.into(),
                last_block.into(),
                VERIFY_BLOCKS.into(),
            ],
        )?;
        if blocks.is_empty() {
            return Ok(None);
        }
        let mut list = Vec::new();
        for b in blocks {
            list.push((
                b.get::<i64>(1)?.unwrap_or(0),
                b.get::<i64>(2)?.unwrap_or(0),
                b.get::<Vec<Option<i64>>>(3)?.unwrap_or_default(),
                b.get::<Vec<u8>>(4)?.unwrap_or_default(),
                b.get::<Vec<u8>>(5)?.unwrap_or_default(),
                b.get::<pgrx::datum::TimestampWithTimeZone>(6)?
                    .map(|t| t.into_inner())
                    .unwrap_or(i64::MIN),
                b.get::<bool>(7)?.unwrap_or(true),
            ));
        }
        for (block_no, first_seq, ids, block_prev, block_hash, newest, reshaped) in list {
            after = block_no;
            if reshaped {
                return Ok(Some((
                    Some(first_seq),
                    format!(
                        "sealed block {block_no}'s event list was re-indexed or reshaped (edited)"
                    ),
                )));
            }
            let Some(ids) = ids.into_iter().collect::<Option<Vec<i64>>>() else {
                return Ok(Some((
                    Some(first_seq),
                    format!("sealed block {block_no} lists a NULL event id (edited)"),
                )));
            };
            if first_seq != *next_seq {
                return Ok(Some((
                    Some(*next_seq),
                    format!("sealed block {block_no} starts at position {first_seq}, not {}: events before it are missing", *next_seq),
                )));
            }
            if block_prev != *prev {
                return Ok(Some((
                    Some(first_seq),
                    format!("sealed block {block_no} does not link to the previous block"),
                )));
            }
            // The block's own hash, over the stored event hashes as each is checked.
            let mut hasher = BlockHasher::new(org, block_no, first_seq, &block_prev);
            if let Some(b) =
                verify_block_events(client, org, first_seq, &ids, &mut hasher, checked)?
            {
                return Ok(Some(b));
            }
            if hasher.finish(newest).as_slice() != block_hash.as_slice() {
                return Ok(Some((
                    Some(first_seq),
                    format!("sealed block {block_no} does not match its hash (edited, reordered or events removed)"),
                )));
            }
            *prev = block_hash;
            *next_seq = next_seq.saturating_add(ids.len() as i64);
        }
    }
}

/// Each event of one block: present, its hash over its content, its payload's commitment;
/// each stored hash goes into the block's `hasher` in the block's order.
fn verify_block_events(
    client: &SpiClient<'_>,
    org: &str,
    first_seq: i64,
    ids: &[i64],
    hasher: &mut BlockHasher,
    checked: &mut i64,
) -> SpiResult<Option<(Option<i64>, String)>> {
    let rows = client.select(
        "SELECT b.n, b.id, e.event_id, e.occurred_at, e.txid, e.actor, e.actor_verified, e.session_role::text,
                e.outer_role::text, e.action, e.table_name, e.row_key, e.changed_columns, e.payload,
                e.payload_digest, e.hash, e.prev_hash IS NOT NULL OR e.seq IS NOT NULL
           FROM unnest($2::bigint[]) WITH ORDINALITY AS b(id, n)
           LEFT JOIN tenancy.audit_events e ON e.organization_id = $1 AND e.event_id = b.id
          ORDER BY b.n",
        None,
        &[org.into(), ids.into()],
    )?;
    for r in rows {
        *checked += 1;
        let seq = first_seq.saturating_add(r.get::<i64>(1)?.unwrap_or(1) - 1);
        let id = r.get::<i64>(2)?.unwrap_or(0);
        let Some(event_id) = r.get::<i64>(3)? else {
            return Ok(Some((
                Some(seq),
                format!("event {id} (position {seq}) is missing"),
            )));
        };
        let ev = Stored::read(&r, 4)?;
        let payload = r.get::<Vec<u8>>(14)?;
        let digest = r.get::<Vec<u8>>(15)?;
        let stored = r.get::<Vec<u8>>(16)?.unwrap_or_default();
        if r.get::<bool>(17)?.unwrap_or(false) {
            return Ok(Some((
                Some(seq),
                format!("event {event_id}: a sealed event carries a v1 position or link (edited)"),
            )));
        }
        let content = EventV2 {
            org,
            event_id,
            occurred_at: ev.occurred_at,
            txid: ev.txid,
            body: ev.body(),
            payload_digest: digest.as_deref(),
        };
        if event_hash_v2(&content).as_slice() != stored.as_slice() {
            return Ok(Some((
                Some(seq),
                format!("event {event_id}: its content does not match its hash (edited)"),
            )));
        }
        if let Some(problem) = payload_problem(org, event_id, payload.as_deref(), digest.as_deref())
        {
            return Ok(Some((Some(seq), format!("event {event_id}: {problem}"))));
        }
        hasher.add(event_id, &stored);
    }
    Ok(None)
}

/// Whether a v2 payload still holds what its commitment (covered by the chain) says.
fn payload_problem(
    org: &str,
    event_id: i64,
    payload: Option<&[u8]>,
    digest: Option<&[u8]>,
) -> Option<String> {
    let (payload, digest) = match (payload, digest) {
        (None, None) => return None,
        (Some(p), Some(d)) => (p, d),
        _ => return Some("its payload does not match its commitment (added or removed)".into()),
    };
    let plain = match crypto::decrypt_for(org, payload, Some(Content::Jsonb), Some(&payload_label(event_id))) {
        Ok((_, plain)) => plain,
        Err(TenancyError::PhiUnknownKey { key_id }) => {
            return Some(format!("its payload is under PHI key {key_id}, which is not in the key ring (re-encrypt with tenancy.audit_rekey() before retiring a key)"))
        }
        Err(TenancyError::PhiNotConfigured) => return None,
        Err(_) => return Some("its payload does not decrypt for this tenant and event (replaced)".into()),
    };
    match split_payload(&plain) {
        Some((salt, json)) if payload_digest(org, event_id, salt, json).as_slice() == digest => {
            None
        }
        _ => Some("its payload does not match its commitment (replaced)".into()),
    }
}

/// Deletes `org`'s events older than `before` (a prefix of its trail only: the v1 chain's
/// events, then whole sealed blocks whose newest event is older), keeping the position and
/// hash of the last deleted event or block as the trail's new anchor, and records the purge
/// as an event in the same trail. Unsealed events are never purged. The only way to delete
/// audit events. Superuser. Returns how many were deleted.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_purge(org: &str, before: pgrx::datum::TimestampWithTimeZone) -> i64 {
    // SAFETY: superuser() only reads the current role.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::SuperuserOnly {
            what: "audit_purge",
        }
        .report();
    }
    let (deleted, through) = crate::policy::with_maintenance(|| {
        Spi::connect_mut(|client| -> SpiResult<(i64, i64)> {
            // The sealers' lock: no block of this tenant is written meanwhile.
            client.update("LOCK TABLE tenancy.audit_seals IN EXCLUSIVE MODE", None, &[])?;
            client.update(
                "INSERT INTO tenancy.audit_chain_heads (organization_id) VALUES ($1) ON CONFLICT DO NOTHING",
                None,
                &[org.into()],
            )?;
            let mut deleted = 0i64;
            let mut through = 0i64;
            // The v1 chain: its prefix of events older than `before`.
            let v1 = client.update(
                "SELECT seq, hash, seq = (SELECT max(seq) FROM tenancy.audit_events WHERE organization_id = $1 AND seq IS NOT NULL)
                   FROM tenancy.audit_events
                  WHERE organization_id = $1 AND seq = (SELECT max(seq) FROM tenancy.audit_events
                                                         WHERE organization_id = $1 AND seq IS NOT NULL AND occurred_at < $2)",
                None,
                &[org.into(), before.into()],
            )?;
            let mut v1_all_gone = client
                .select(
                    "SELECT NOT EXISTS (SELECT 1 FROM tenancy.audit_events WHERE organization_id = $1 AND seq IS NOT NULL)",
                    None,
                    &[org.into()],
                )?
                .first()
                .get_one::<bool>()?
                .unwrap_or(true);
            if let Some(r) = v1.into_iter().next() {
                let seq = r.get::<i64>(1)?.unwrap_or(0);
                let hash = r.get::<Vec<u8>>(2)?;
                v1_all_gone = r.get::<bool>(3)?.unwrap_or(false);
                deleted += client
                    .update(
                        "DELETE FROM tenancy.audit_events WHERE organization_id = $1 AND seq IS NOT NULL AND seq <= $2",
                        None,
                        &[org.into(), seq.into()],
                    )?
                    .len() as i64;
                client.update(
                    "UPDATE tenancy.audit_chain_heads SET purged_through_seq = $2, purged_anchor = $3 WHERE organization_id = $1",
                    None,
                    &[org.into(), seq.into(), hash.into()],
                )?;
                through = seq;
            }
            if !v1_all_gone {
                return Ok((deleted, through));
            }
            // Then whole blocks, oldest first, while their newest event is older than `before`.
            let last = client
                .select(
                    "SELECT b.block_no, b.first_seq + b.event_count - 1, b.hash FROM tenancy.audit_seals b
                      WHERE b.organization_id = $1
                        AND b.block_no < coalesce((SELECT min(block_no) FROM tenancy.audit_seals
                                                    WHERE organization_id = $1 AND newest_event_at >= $2), 9223372036854775807)
                      ORDER BY b.block_no DESC LIMIT 1",
                    None,
                    &[org.into(), before.into()],
                )?;
            if let Some(r) = last.into_iter().next() {
                let block_no = r.get::<i64>(1)?.unwrap_or(0);
                let seq = r.get::<i64>(2)?.unwrap_or(0);
                let hash = r.get::<Vec<u8>>(3)?;
                deleted += client
                    .update(
                        "DELETE FROM tenancy.audit_events e USING tenancy.audit_seals b
                          WHERE b.organization_id = $1 AND b.block_no <= $2
                            AND e.organization_id = $1 AND e.event_id = ANY (b.event_ids)",
                        None,
                        &[org.into(), block_no.into()],
                    )?
                    .len() as i64;
                client.update(
                    "DELETE FROM tenancy.audit_seals WHERE organization_id = $1 AND block_no <= $2",
                    None,
                    &[org.into(), block_no.into()],
                )?;
                client.update(
                    "UPDATE tenancy.audit_chain_heads SET purged_through_seq = $2, purged_anchor = $3 WHERE organization_id = $1",
                    None,
                    &[org.into(), seq.into(), hash.into()],
                )?;
                through = seq;
            }
            Ok((deleted, through))
        })
    })
    .unwrap_or_else(|e| TenancyError::spi("purging the audit trail", e).report());
    if deleted == 0 {
        return 0;
    }
    // The new anchor, named in clear in the purge's own event: audit_verify accepts a purged
    // prefix only with the AUDIT_PURGE that made it.
    let anchor = Spi::get_one_with_args::<Vec<u8>>(
        "SELECT purged_anchor FROM tenancy.audit_chain_heads WHERE organization_id = $1",
        &[org.into()],
    )
    .ok()
    .flatten();
    write_event(
        org,
        "AUDIT_PURGE",
        None,
        Some(&purge_key(through, anchor.as_deref())),
        None,
        Some(
            &serde_json::json!({ "deleted": deleted, "through_seq": through, "before": before.to_string() }),
        ),
    );
    deleted
}

/// The `row_key` of an `AUDIT_PURGE` event: the position purged through and the new anchor.
fn purge_key(through: i64, anchor: Option<&[u8]>) -> String {
    format!(
        "purged through {through}, anchor {}",
        hex::encode(anchor.unwrap_or_default())
    )
}

/// Whether the trail's purged prefix (through `through`, anchored at `anchor`) was made by
/// `audit_purge`: its AUDIT_PURGE event names both (0.2.0's named neither: its payload's
/// `through_seq` must match). A superuser who deletes a prefix and moves the anchor by hand
/// left no such event.
fn purge_problem(
    client: &SpiClient<'_>,
    org: &str,
    through: i64,
    anchor: Option<&[u8]>,
) -> SpiResult<Option<String>> {
    let key = purge_key(through, anchor);
    let rows = client.select(
        "SELECT row_key = $2, payload, event_id FROM tenancy.audit_events
          WHERE organization_id = $1 AND action = 'AUDIT_PURGE' AND (row_key = $2 OR row_key IS NULL)",
        None,
        &[org.into(), key.as_str().into()],
    )?;
    for r in rows {
        if r.get::<bool>(1)?.unwrap_or(false) {
            return Ok(None);
        }
        let (Some(payload), Some(id)) = (r.get::<Vec<u8>>(2)?, r.get::<i64>(3)?) else {
            continue;
        };
        let Ok((_, plain)) = crypto::decrypt_for(
            org,
            &payload,
            Some(Content::Jsonb),
            Some(&payload_label(id)),
        ) else {
            continue;
        };
        if payload_json(&plain)
            .ok()
            .and_then(|v| v.get("through_seq").and_then(|t| t.as_i64()))
            == Some(through)
        {
            return Ok(None);
        }
    }
    Ok(Some(format!(
        "the trail starts after position {through}, but no AUDIT_PURGE event records a purge through it (events deleted outside tenancy.audit_purge)"
    )))
}

/// Re-encrypts up to `batch_size` v2 audit payloads (of `org`, or of every tenant when NULL)
/// that are not under the active PHI key, keeping each payload's commitment, so the trail
/// still verifies and the old key can be retired once none is left. Superuser. Returns how
/// many were re-encrypted (0 when done). Events written before 0.2.1 hash their ciphertext:
/// they keep their key until `audit_purge` removes them.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_rekey(org: Option<&str>, batch_size: default!(Option<i32>, 1000)) -> i64 {
    let batch_size = batch_size
        .ok_or(TenancyError::NullArgument {
            function: "audit_rekey",
            argument: "batch_size",
        })
        .or_raise();
    // SAFETY: superuser() only reads the current role.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::SuperuserOnly {
            what: "audit_rekey",
        }
        .report();
    }
    let active = crypto::active_key_id().or_raise();
    crate::policy::with_maintenance(|| {
        Spi::connect_mut(|client| -> SpiResult<i64> {
            let rows = client.update(
                "SELECT organization_id, event_id, payload FROM tenancy.audit_events
                  WHERE ($1::text IS NULL OR organization_id = $1) AND seq IS NULL AND payload IS NOT NULL
                    AND tenancy.phi_key_id(payload) <> $2
                  LIMIT $3 FOR UPDATE",
                None,
                &[org.into(), i64::from(active).into(), batch_size.max(1).into()],
            )?;
            let mut todo = Vec::new();
            for r in rows {
                todo.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<i64>(2)?.unwrap_or(0),
                    r.get::<Vec<u8>>(3)?.unwrap_or_default(),
                ));
            }
            let n = todo.len() as i64;
            for (tenant, event_id, payload) in todo {
                let label = payload_label(event_id);
                let (_, plain) = crypto::decrypt_for(&tenant, &payload, Some(Content::Jsonb), Some(&label)).or_raise();
                let fresh = crypto::encrypt_for(&tenant, Content::Jsonb, Some(&label), &plain).or_raise();
                client.update(
                    "UPDATE tenancy.audit_events SET payload = $3 WHERE organization_id = $1 AND event_id = $2",
                    None,
                    &[tenant.into(), event_id.into(), fresh.into()],
                )?;
            }
            Ok(n)
        })
    })
    .unwrap_or_else(|e| TenancyError::spi("re-encrypting the audit trail", e).report())
}

/// One clinic's audit history between `from` and `to`, payloads decrypted, for a support
/// role: EXECUTE is granted by the DBA (revoked from PUBLIC). A `SUPPORT_READ` event naming
/// the role that read it is in that clinic's own trail before anything is returned (written
/// by the reveal worker, so it stays when the reading transaction rolls back).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)] // a result row is a tuple of its columns
fn audit_history(
    org: &str,
    from: pgrx::datum::TimestampWithTimeZone,
    to: pgrx::datum::TimestampWithTimeZone,
) -> TableIterator<
    'static,
    (
        name!(seq, Option<i64>),
        name!(occurred_at, pgrx::datum::TimestampWithTimeZone),
        name!(actor, Option<String>),
        name!(action, String),
        name!(table_name, Option<String>),
        name!(changed_columns, Option<Vec<String>>),
        name!(changes, Option<pgrx::JsonB>),
    ),
> {
    // On record (durably, by the reveal worker) before anything is read, so a rolled-back
    // reading transaction leaves its trace too.
    crate::reveal_log::record_support_read(org, &format!("{from} .. {to}")).or_raise();
    let rows = Spi::connect(|client| -> SpiResult<Vec<_>> {
        let t = client.select(
            "SELECT seq, occurred_at, actor, action, table_name, changed_columns, payload, event_id
               FROM tenancy.audit_events
              WHERE organization_id = $1 AND occurred_at >= $2 AND occurred_at < $3 ORDER BY event_id",
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
                r.get::<i64>(1)?,
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
