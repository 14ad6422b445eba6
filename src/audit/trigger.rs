//! The audit trigger: reads the changed rows of a statement (transition tables) or of one row,
//! renders each column with its output function, and appends one event per changed row.

use super::writer::{append_events, NewEvent, Who};
use crate::error::{Raise, TenancyError};
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::num::NonZeroUsize;

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

/// Whose rows the writer may file events for: `None` when any tenant's (the role in effect
/// for the session, after SET ROLE, is a superuser or has BYPASSRLS: RLS does not bind it);
/// otherwise the tenant of its context (or none), the only one whose rows the tenant floor
/// lets it write. The trigger runs as its definer, so the writer is the outer role (a
/// referential action, which runs as the table's owner without RLS, is bound by it too). An
/// event of another tenant's row from a bound writer means the trigger does not read the
/// column the floor checks (its argument names another column, or the column was renamed or
/// replaced under it), or a referential action crossed tenants: it would file events in
/// another tenant's trail, and is refused.
fn bound_tenant() -> Option<Option<String>> {
    // SAFETY: role lookups of the outer user.
    let free = unsafe {
        let writer = pg_sys::GetOuterUserId();
        pg_sys::superuser_arg(writer) || pg_sys::has_bypassrls_privilege(writer)
    };
    (!free).then(crate::context::current_org)
}

/// Whether two tenant ids are one: equal, or the same UUID written differently.
fn same_tenant(a: &str, b: &str) -> bool {
    a == b
        || matches!((uuid::Uuid::parse_str(a), uuid::Uuid::parse_str(b)), (Ok(x), Ok(y)) if x == y)
}

/// The event for one changed row (None for a no-op UPDATE). Its tenant is the row's tenant
/// column, never the context; a writer bound to one tenant ([`bound_tenant`]) files events
/// of that tenant's rows only.
fn change_event(
    table: &str,
    tenant_column: &str,
    bound: &Option<Option<String>>,
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
    if let Some(allowed) = bound {
        if !allowed.as_deref().is_some_and(|t| same_tenant(t, &org)) {
            return Err(TenancyError::EventOfOtherTenant {
                table: table.to_string(),
                column: tenant_column.to_string(),
            });
        }
    }
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

/// The audit trigger. Attached by `tenancy.protect(..., audit => true)` as three statement
/// triggers, AFTER INSERT / UPDATE / DELETE ... REFERENCING the transition tables: it reads
/// the statement's changed rows and appends their events in batches.
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
        // 0.2.0's tenancy_audit_lock took the chain head here; events no longer wait for
        // one (protect() and the update drop that trigger).
        return Ok(None);
    }
    let data = trigger.trigger_data();
    let tenant_column = trigger
        .extra_args()
        .ok()
        .and_then(|a| a.into_iter().next())
        .unwrap_or_else(|| "organization_id".into());
    let rel = trigger.relation().expect("a trigger has a relation");
    // A Citus shard's events are filed under its distributed table's name.
    let table = crate::citus::shard_logical_name(rel.namespace(), rel.name())
        .unwrap_or_else(|| format!("{}.{}", rel.namespace(), rel.name()));
    let op = trigger.op().expect("a trigger has an operation");
    if matches!(op, Op::Truncate) {
        return Ok(None); // protected tables refuse TRUNCATE before it happens
    }
    let who = Who::current();
    let bound = bound_tenant();
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
            if let Some(event) = change_event(&table, &tenant_column, &bound, &reader, old, new)? {
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
                    if let Some(event) =
                        change_event(&table, &tenant_column, &bound, &reader, old, new)?
                    {
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
