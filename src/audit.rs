//! The audit trail: every audited change and operator action becomes one
//! `tenancy.audit_events` row, filed under the tenant of the row written (never the context),
//! with the change payload encrypted under the PHI key ring (bound to the tenant and the
//! event id) and a per-tenant SHA-256 hash chain that `tenancy.audit_verify` checks.
//!
//! Writers of one tenant serialise on that tenant's row in `tenancy.audit_chain_heads`;
//! different tenants never wait on each other. The statements are prepared once per backend.

use crate::crypto::{self, envelope::Content};
use crate::error::{Raise, TenancyError};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use pgrx::{PgMemoryContexts, PgOid};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroUsize;

const HASH_DOMAIN: &str = "pg_tenancy.audit.v1";

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
pub fn at_xact_end(_end: crate::xact::End) {
    forget_tips();
}

/// End of a subtransaction: a rolled-back one took its events and head locks with it.
pub fn at_sub_end(end: crate::xact::SubEnd, _level: i32) {
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

/// `n` values of `tenancy.audit_event_id`, without a query: the sequence is looked up once,
/// then the builtin nextval(regclass) is called per value.
fn next_event_ids(n: usize) -> Vec<i64> {
    // SAFETY: catalog lookups by name (the namespace lookup raises if the schema is missing).
    let seq = unsafe {
        let ns = pg_sys::get_namespace_oid(c"tenancy".as_ptr(), false);
        pg_sys::get_relname_relid(c"audit_event_id".as_ptr(), ns)
    };
    if seq == pg_sys::InvalidOid {
        TenancyError::UndefinedTable {
            name: "tenancy.audit_event_id".into(),
        }
        .report();
    }
    (0..n)
        .map(|_| {
            // SAFETY: nextval(regclass) on the sequence found above.
            unsafe { pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[seq.into_datum()]) }
                .expect("nextval returns a value")
        })
        .collect()
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

/// Takes the chain head of the context's tenant before a statement on an audited table
/// touches any row (the BEFORE STATEMENT form of the audit trigger). A transaction thus takes
/// its tenant's head lock before its row locks, in the same order as every other writer of
/// the tenant: holding a row lock while waiting for the head, which deadlocked against a
/// writer holding the head and waiting for that row, cannot happen for context-bound writers.
fn take_context_head() {
    let Some(org) = crate::context::current_org() else {
        return; // no context: rows are filed by their own tenant at the end of the statement
    };
    if TIPS.with(|t| t.borrow().contains_key(&org)) {
        return;
    }
    with_plans(|client, plans| take_heads(client, plans, &[org.as_str()]))
        .unwrap_or_else(|e| TenancyError::spi("locking the audit chain", e).report());
}

/// One event to append, before its place in its tenant's chain is known.
pub struct NewEvent {
    pub org: String,
    pub action: String,
    pub table_name: Option<String>,
    pub row_key: Option<String>,
    pub changed_columns: Option<Vec<String>>,
    pub payload: Option<serde_json::Value>,
}

/// A text[] literal of `items` (every element quoted), for one cell of a batch.
fn array_literal(items: &[String]) -> String {
    let mut s = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('"');
        for ch in item.chars() {
            if ch == '"' || ch == '\\' {
                s.push('\\');
            }
            s.push(ch);
        }
        s.push('"');
    }
    s.push('}');
    s
}

/// Everything hashed for one event, in a fixed order.
pub struct EventContent<'a> {
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
pub fn event_hash(e: &EventContent<'_>) -> [u8; 32] {
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

/// Who wrote an event, and when.
pub struct Who {
    pub actor: Option<String>,
    pub actor_verified: bool,
    pub session_role: String,
    pub outer_role: String,
    pub occurred_at: i64,
}

impl Who {
    /// The current session's actor, roles and clock.
    pub fn current() -> Who {
        let (actor, actor_verified) = crate::context::current_actor_and_verified();
        // SAFETY: plain reads of the current roles and clock.
        unsafe {
            Who {
                actor,
                actor_verified,
                session_role: role_name(pg_sys::GetSessionUserId()),
                outer_role: role_name(pg_sys::GetOuterUserId()),
                occurred_at: pg_sys::GetCurrentTimestamp(),
            }
        }
    }
}

/// A role's name (or its oid when it was dropped).
pub fn role_name(oid: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId with noerr=true returns NULL for a dropped role.
    unsafe {
        let p = pg_sys::GetUserNameFromId(oid, true);
        if p.is_null() {
            format!("oid {}", u32::from(oid))
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// Appends one event to `org`'s chain, written by the current session.
pub fn write_event(
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

/// Appends `events` (in order) to their tenants' chains on behalf of `who`, in one INSERT.
/// Each payload is encrypted for its tenant under the active PHI key, bound to its event id.
/// Chain heads this transaction does not hold yet are locked in a fixed (sorted) order within
/// the batch (docs/audit.md: what can still deadlock across batches).
pub fn append_events(who: &Who, events: &[NewEvent]) {
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
                    actor: who.actor.as_deref(),
                    actor_verified: who.actor_verified,
                    session_role: &who.session_role,
                    outer_role: &who.outer_role,
                    action: &e.action,
                    table_name: e.table_name.as_deref(),
                    row_key: e.row_key.as_deref(),
                    changed_columns: e.changed_columns.as_deref(),
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

/// The label an event's payload is bound to.
pub fn payload_label(event_id: i64) -> String {
    format!("tenancy.audit_events:{event_id}")
}

/// Decrypts an audit payload of the current tenant.
#[pg_extern(stable, parallel_restricted)]
fn audit_payload(payload: Option<&[u8]>, event_id: Option<i64>) -> Option<pgrx::JsonB> {
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
        // SAFETY: `d` is a non-NULL jsonb datum; jsonb_out returns a palloc'd C string.
        let text = unsafe {
            let out = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(d)])
                .expect("jsonb_out returns a string");
            std::ffi::CStr::from_ptr(out.cast_mut_ptr::<std::ffi::c_char>())
        };
        serde_json::from_slice::<serde_json::Value>(text.to_bytes())
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

/// Events of one statement are appended in batches of this many (one INSERT each), so memory
/// stays bounded however many rows the statement changes.
const BATCH: usize = 1000;

type Row = Vec<(String, serde_json::Value)>;

/// Reads rows of one relation's row type as (column, JSON text value) pairs, with every
/// column's output function looked up once per statement, not once per value.
struct RowReader {
    tupdesc: pg_sys::TupleDesc,
    /// (attribute number, name, output function, part of the primary key), live columns only.
    columns: Vec<(usize, String, pg_sys::FmgrInfo, bool)>,
}

impl RowReader {
    /// SAFETY: `rel` is open for the duration of the reader's use.
    unsafe fn new(rel: pg_sys::Relation) -> RowReader {
        let tupdesc = (*rel).rd_att;
        let pk = pg_sys::RelationGetIndexAttrBitmap(
            rel,
            pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY,
        );
        // PgTupleDesc hides the attribute array's layout, which changed in PG 18.
        let desc = pgrx::PgTupleDesc::from_pg_unchecked(tupdesc);
        let columns = desc
            .iter()
            .enumerate()
            .filter(|(_, att)| !att.is_dropped())
            .map(|(i, att)| {
                let mut out = pg_sys::Oid::INVALID;
                let mut varlena = false;
                pg_sys::getTypeOutputInfo(att.atttypid, &mut out, &mut varlena);
                let mut finfo: pg_sys::FmgrInfo = std::mem::zeroed();
                pg_sys::fmgr_info(out, &mut finfo);
                let in_pk = pg_sys::bms_is_member(
                    i32::from(att.attnum) - pg_sys::FirstLowInvalidHeapAttributeNumber,
                    pk,
                );
                (i + 1, att.name().to_string(), finfo, in_pk)
            })
            .collect();
        RowReader { tupdesc, columns }
    }

    /// SAFETY: `tuple` is a valid tuple of the reader's row type.
    unsafe fn read(&mut self, tuple: *mut pg_sys::HeapTupleData) -> Row {
        let tupdesc = self.tupdesc;
        self.columns
            .iter_mut()
            .map(|(attno, name, finfo, _)| {
                let attno = NonZeroUsize::new(*attno).expect("attno from 1");
                let value = match pgrx::heap_getattr_raw(tuple, attno, tupdesc) {
                    None => serde_json::Value::Null,
                    Some(datum) => {
                        let c = pg_sys::OutputFunctionCall(finfo, datum);
                        let v = std::ffi::CStr::from_ptr(c).to_string_lossy().into_owned();
                        pg_sys::pfree(c.cast());
                        serde_json::Value::String(v)
                    }
                };
                (name.clone(), value)
            })
            .collect()
    }

    /// The primary key of `row` as JSON text (`{"col": "value", ...}`; `{}` without one).
    fn key(&self, row: &Row) -> String {
        let key: serde_json::Map<String, serde_json::Value> = row
            .iter()
            .zip(&self.columns)
            .filter(|(_, c)| c.3)
            .map(|(v, _)| v.clone())
            .collect();
        serde_json::Value::Object(key).to_string()
    }
}

/// The event for one changed row (None for a no-op UPDATE). Its tenant is the row's tenant
/// column, never the context.
fn change_event(
    table: &str,
    tenant_column: &str,
    reader: &RowReader,
    old: Option<Row>,
    new: Option<Row>,
) -> Result<Option<NewEvent>, TenancyError> {
    let (action, current) = match (&old, &new) {
        (Some(_), Some(n)) => ("UPDATE", n),
        (None, Some(n)) => ("INSERT", n),
        (Some(o), None) => ("DELETE", o),
        (None, None) => return Ok(None),
    };
    let org = match current.iter().find(|(n, _)| n == tenant_column) {
        Some((_, serde_json::Value::String(s))) => s.clone(),
        _ => return Err(TenancyError::NoTenant),
    };
    let row_key = reader.key(current);
    let (changed, payload) = match (old, new) {
        (Some(o), Some(n)) => {
            let changed: Vec<usize> = (0..n.len()).filter(|i| o[*i].1 != n[*i].1).collect();
            if changed.is_empty() {
                return Ok(None); // a no-op UPDATE writes nothing
            }
            let pick = |row: &Row| {
                serde_json::Value::Object(changed.iter().map(|i| row[*i].clone()).collect())
            };
            (
                changed.iter().map(|i| n[*i].0.clone()).collect::<Vec<_>>(),
                serde_json::json!({ "old": pick(&o), "new": pick(&n) }),
            )
        }
        (Some(row), None) | (None, Some(row)) => (
            row.iter().map(|(n, _)| n.clone()).collect(),
            serde_json::Value::Object(row.into_iter().collect()),
        ),
        (None, None) => unreachable!("handled above"),
    };
    Ok(Some(NewEvent {
        org,
        action: action.into(),
        table_name: Some(table.into()),
        row_key: Some(row_key),
        changed_columns: Some(changed),
        payload: Some(payload),
    }))
}

/// A read position in one transition table.
struct TransitionScan {
    store: *mut pg_sys::Tuplestorestate,
    slot: *mut pg_sys::TupleTableSlot,
}

impl TransitionScan {
    /// SAFETY: `store` is a transition table of the firing trigger, of row type `tupdesc`.
    unsafe fn new(store: *mut pg_sys::Tuplestorestate, tupdesc: pg_sys::TupleDesc) -> Option<Self> {
        if store.is_null() {
            return None;
        }
        // Our own read pointer, as a NamedTuplestoreScan does: other triggers read it too.
        let ptr = pg_sys::tuplestore_alloc_read_pointer(store, 0);
        pg_sys::tuplestore_select_read_pointer(store, ptr);
        pg_sys::tuplestore_rescan(store);
        let slot = pg_sys::MakeSingleTupleTableSlot(tupdesc, &pg_sys::TTSOpsMinimalTuple);
        Some(TransitionScan { store, slot })
    }

    /// The next row, read in the current memory context.
    unsafe fn next(&mut self, reader: &mut RowReader) -> Option<Row> {
        if !pg_sys::tuplestore_gettupleslot(self.store, true, false, self.slot) {
            return None;
        }
        let mut should_free = false;
        let tuple = pg_sys::ExecFetchSlotHeapTuple(self.slot, false, &mut should_free);
        Some(reader.read(tuple))
    }

    /// Lets go of the current row. A row read back from a spilled transition table is
    /// allocated in the memory context current at the read and owned by the slot: the slot
    /// must drop it before that context is reset.
    unsafe fn release(&mut self) {
        pg_sys::ExecClearTuple(self.slot);
    }
}

impl Drop for TransitionScan {
    fn drop(&mut self) {
        // SAFETY: the slot was made by MakeSingleTupleTableSlot and is not used after this.
        unsafe { pg_sys::ExecDropSingleTupleTableSlot(self.slot) };
    }
}

/// The audit trigger. Attached by `tenancy.protect(..., audit => true)` as four statement
/// triggers: BEFORE, it takes the context tenant's chain head; AFTER INSERT / UPDATE / DELETE
/// ... REFERENCING the transition tables, it reads the statement's changed rows and appends
/// their events in batches.
/// It also works as a row trigger (AFTER ... FOR EACH ROW), one event per call; the statement
/// form is the faster for bulk statements (docs/audit.md has the measurements). Its
/// argument is the tenant column; each event is filed under that column's value.
///
/// Errors are raised here with their own SQLSTATE: an `Err` returned to pgrx's trigger
/// wrapper would reach the client as "Trigger function panic" (XX000).
#[pg_trigger]
fn audit_trigger<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, TenancyError> {
    Ok(audit_trigger_body(trigger).or_raise())
}

fn audit_trigger_body<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, TenancyError> {
    use pgrx::trigger_support::{PgTriggerLevel, PgTriggerOperation as Op, PgTriggerWhen};
    if matches!(trigger.when(), Ok(PgTriggerWhen::Before)) {
        take_context_head();
        return Ok(None);
    }
    let data = trigger.trigger_data();
    let tenant_column = trigger
        .extra_args()
        .ok()
        .and_then(|a| a.into_iter().next())
        .unwrap_or_else(|| "organization_id".into());
    let rel = trigger.relation().expect("a trigger has a relation");
    let table = format!("{}.{}", rel.namespace(), rel.name());
    let op = trigger.op().expect("a trigger has an operation");
    if matches!(op, Op::Truncate) {
        return Ok(None); // protected tables refuse TRUNCATE before it happens
    }
    let who = Who::current();
    // SAFETY: the trigger's relation, tuples and transition tables are valid for the call.
    unsafe {
        let mut reader = RowReader::new(data.tg_relation);
        if matches!(trigger.level(), PgTriggerLevel::Row) {
            let (old, new) = match op {
                Op::Insert => (None, Some(reader.read(data.tg_trigtuple))),
                Op::Delete => (Some(reader.read(data.tg_trigtuple)), None),
                _ => (
                    Some(reader.read(data.tg_trigtuple)),
                    Some(reader.read(data.tg_newtuple)),
                ),
            };
            if let Some(event) = change_event(&table, &tenant_column, &reader, old, new)? {
                append_events(&who, &[event]);
            }
            return Ok(None);
        }
        let tupdesc = (*data.tg_relation).rd_att;
        let (mut olds, mut news) = match op {
            Op::Insert => (None, TransitionScan::new(data.tg_newtable, tupdesc)),
            Op::Delete => (TransitionScan::new(data.tg_oldtable, tupdesc), None),
            _ => (
                TransitionScan::new(data.tg_oldtable, tupdesc),
                TransitionScan::new(data.tg_newtable, tupdesc),
            ),
        };
        if olds.is_none() && news.is_none() {
            return Err(TenancyError::AuditTriggerMisdefined {
                reason: "a statement-level audit trigger needs REFERENCING OLD TABLE / NEW TABLE",
            });
        }
        // For UPDATE, the old and new transition tables hold each row's old and new version
        // at the same position (PostgreSQL appends both as it updates the row).
        let mut batch_cxt = PgMemoryContexts::new("pg_tenancy audit batch");
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let done = batch_cxt.switch_to(|_| -> Result<bool, TenancyError> {
                while batch.len() < BATCH {
                    let old = olds.as_mut().map(|s| s.next(&mut reader));
                    let new = news.as_mut().map(|s| s.next(&mut reader));
                    let (old, new) = match (old, new) {
                        (Some(None), Some(None)) | (Some(None), None) | (None, Some(None)) => {
                            return Ok(true)
                        }
                        (Some(None), _) | (_, Some(None)) => {
                            return Err(TenancyError::AuditTriggerMisdefined {
                                reason: "the old and new transition tables differ in length",
                            })
                        }
                        (o, n) => (o.flatten(), n.flatten()),
                    };
                    if let Some(event) = change_event(&table, &tenant_column, &reader, old, new)? {
                        batch.push(event);
                    }
                }
                Ok(false)
            })?;
            append_events(&who, &batch);
            batch.clear();
            olds.iter_mut()
                .chain(news.iter_mut())
                .for_each(|s| s.release());
            batch_cxt.reset();
            if done {
                return Ok(None);
            }
        }
    }
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
