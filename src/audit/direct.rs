//! Rows written the way COPY writes them: through the table access method's multi-insert,
//! with their index entries, and no query, plan, executor or SPI connection per statement.
//! Used for the extension's own append-only tables (`audit_events`, `audit_pending`), which
//! have no triggers on INSERT, no foreign keys and no CHECK constraints beyond NOT NULL
//! (the writer supplies every NOT NULL column). A leaf of the audit module.

use crate::error::TenancyError;
use pgrx::prelude::*;
use std::ptr::null_mut;

/// One cell: a datum valid in the current memory context, or NULL.
pub(super) type Cell = Option<pg_sys::Datum>;

/// The oid of `tenancy.<name>`, if it exists.
pub(super) fn tenancy_table(name: &std::ffi::CStr) -> Option<pg_sys::Oid> {
    // SAFETY: catalog lookups by name (missing_ok for the namespace).
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"tenancy".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return None;
        }
        let rel = pg_sys::get_relname_relid(name.as_ptr(), ns);
        (rel != pg_sys::InvalidOid).then_some(rel)
    }
}

fn relation_name(relid: pg_sys::Oid) -> String {
    // SAFETY: get_rel_name returns NULL for an unknown oid.
    unsafe {
        let p = pg_sys::get_rel_name(relid);
        if p.is_null() {
            format!("oid {}", u32::from(relid))
        } else {
            format!("tenancy.{}", std::ffi::CStr::from_ptr(p).to_string_lossy())
        }
    }
}

/// A `name` datum of `s` (role names come from the catalog, so they fit).
pub(super) fn name_datum(s: &str) -> pg_sys::Datum {
    let bytes = s.as_bytes();
    let len = bytes.len().min(pg_sys::NAMEDATALEN as usize - 1);
    // SAFETY: a zeroed NAMEDATALEN allocation in the current memory context, `len` bytes
    // copied into it (NUL-terminated by the zeroing).
    unsafe {
        let p = pg_sys::palloc0(pg_sys::NAMEDATALEN as usize).cast::<u8>();
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, len);
        pg_sys::Datum::from(p)
    }
}

/// Inserts `rows` into the table `relid`, each row's cells in the order of `columns`
/// (columns not named are NULL), with one multi-insert call and the index entries of every
/// row (unique indexes checked as an INSERT would). Bypasses triggers, RLS and privileges:
/// callers are the extension's own writers.
pub(super) fn insert(relid: pg_sys::Oid, columns: &[&str], rows: &[Vec<Cell>]) {
    if rows.is_empty() {
        return;
    }
    // SAFETY: the relation is opened and locked as an INSERT would; every slot is of its
    // row type and filled with datums of its columns' types (the callers' contract) that
    // live in the current memory context for the whole call; the executor state, result
    // relation and slots are released below (or by the transaction's abort on error).
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let natts = desc.len();
        let positions: Vec<usize> = columns
            .iter()
            .map(|c| {
                desc.iter()
                    .position(|a| !a.is_dropped() && a.name() == *c)
                    .unwrap_or_else(|| {
                        TenancyError::NoTenantColumn {
                            relation: relation_name(relid),
                            column: (*c).to_string(),
                        }
                        .report()
                    })
            })
            .collect();
        let estate = pg_sys::CreateExecutorState();
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            .cast::<pg_sys::ResultRelInfo>();
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(rri, rel, 1, null_mut(), 0);
        #[cfg(feature = "pg13")]
        {
            (*estate).es_result_relation_info = rri;
        }
        pg_sys::ExecOpenIndices(rri, false);
        let mut slots: Vec<*mut pg_sys::TupleTableSlot> = rows
            .iter()
            .map(|row| {
                let slot = pg_sys::table_slot_create(rel, null_mut());
                pg_sys::ExecClearTuple(slot);
                let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
                let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
                nulls.fill(true);
                for (cell, &at) in row.iter().zip(&positions) {
                    if let Some(d) = cell {
                        values[at] = *d;
                        nulls[at] = false;
                    }
                }
                pg_sys::ExecStoreVirtualTuple(slot);
                slot
            })
            .collect();
        let multi_insert = (*(*rel).rd_tableam)
            .multi_insert
            .expect("every table access method has multi_insert");
        multi_insert(
            rel,
            slots.as_mut_ptr(),
            slots.len() as i32,
            pg_sys::GetCurrentCommandId(true),
            0,
            null_mut(),
        );
        if (*rri).ri_NumIndices > 0 {
            for &slot in &slots {
                #[cfg(feature = "pg13")]
                let recheck =
                    pg_sys::ExecInsertIndexTuples(slot, estate, false, null_mut(), null_mut());
                #[cfg(any(feature = "pg14", feature = "pg15"))]
                let recheck = pg_sys::ExecInsertIndexTuples(
                    rri,
                    slot,
                    estate,
                    false,
                    false,
                    null_mut(),
                    null_mut(),
                );
                #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
                let recheck = pg_sys::ExecInsertIndexTuples(
                    rri,
                    slot,
                    estate,
                    false,
                    false,
                    null_mut(),
                    null_mut(),
                    false,
                );
                pg_sys::list_free(recheck);
                let econtext = (*estate).es_per_tuple_exprcontext;
                if !econtext.is_null() {
                    pg_sys::MemoryContextReset((*econtext).ecxt_per_tuple_memory);
                }
            }
        }
        for slot in slots {
            pg_sys::ExecDropSingleTupleTableSlot(slot);
        }
        pg_sys::ExecCloseIndices(rri);
        pg_sys::FreeExecutorState(estate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}
