//! Nothing created from one tenant's rows outlives its transaction in the session (II-2/9
//! finding 7, ATTACKS.md S1).
//!
//! A pooled connection serves tenant A's transaction, then tenant B's. Whatever A's
//! transaction leaves in the *session* is there for B: a temporary table that keeps its rows
//! (`ON COMMIT PRESERVE ROWS`, the default), rows written into a temporary table made earlier,
//! a large object (owned by the role, readable by every later session of it). WITH HOLD
//! cursors are refused by the context (context.rs). In a tenant transaction:
//! - `CREATE TEMP TABLE` (and `CREATE TEMP TABLE AS`, `SELECT INTO TEMP`) is refused unless
//!   `ON COMMIT DROP`; any other DDL by a role that is not a superuser is refused by the drift
//!   guard (temporary functions, views, types, comments, defaults outlive the transaction),
//!   which asks [`confined_ddl`] whether the statement is such an ON COMMIT DROP table;
//! - writing into a temporary table whose rows outlive the transaction (any not made `ON
//!   COMMIT DROP` or `ON COMMIT DELETE ROWS`, whenever it was made: INSERT, UPDATE, DELETE,
//!   MERGE, COPY FROM, also from functions and data-modifying CTEs) is refused;
//! - creating a large object is refused.

use crate::error::TenancyError;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;

thread_local! {
    /// Temporary tables of this session made `ON COMMIT DROP` or `ON COMMIT DELETE ROWS`:
    /// their rows never outlive a transaction. PostgreSQL keeps the ON COMMIT action in a
    /// private list, so it is noted here when the table is created.
    static CONFINED: RefCell<HashSet<pg_sys::Oid>> = RefCell::new(HashSet::new());
}

/// pg_largeobject: the class id of large objects in object access events.
const LARGE_OBJECT_RELATION_ID: u32 = 2613;

/// The table a CREATE TABLE or CREATE TABLE AS / SELECT INTO statement makes, with its
/// ON COMMIT action; None for any other statement.
unsafe fn created_table(
    stmt: *mut pg_sys::Node,
) -> Option<(*mut pg_sys::RangeVar, pg_sys::OnCommitAction::Type)> {
    use pg_sys::NodeTag::*;
    let (rel, on_commit) = if pgrx::is_a(stmt, T_CreateStmt) {
        let create = stmt.cast::<pg_sys::CreateStmt>();
        ((*create).relation, (*create).oncommit)
    } else if pgrx::is_a(stmt, T_CreateTableAsStmt) {
        let into = (*stmt.cast::<pg_sys::CreateTableAsStmt>()).into;
        if into.is_null() {
            return None;
        }
        ((*into).rel, (*into).onCommit)
    } else {
        return None;
    };
    (!rel.is_null()).then_some((rel, on_commit))
}

/// The relation `rv` names, resolved as the statement will (no lock taken), if it exists.
///
/// # Safety
/// `rv` is null or a RangeVar of the statement being run, inside a transaction.
pub(crate) unsafe fn relation_oid(rv: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    if rv.is_null() {
        return None;
    }
    let oid = pg_sys::RangeVarGetRelidExtended(
        rv,
        pg_sys::NoLock as pg_sys::LOCKMODE,
        pg_sys::RVROption::RVR_MISSING_OK,
        None,
        std::ptr::null_mut(),
    );
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// Utility statements in a tenant transaction (the caller knows it is one): temporary tables
/// that would keep rows past it, and COPY FROM into a temporary table from before it.
///
/// # Safety
/// `pstmt` is the utility statement ProcessUtility was given.
pub(crate) unsafe fn check_utility(pstmt: *mut pg_sys::PlannedStmt) {
    let stmt = (*pstmt).utilityStmt;
    if pgrx::is_a(stmt, pg_sys::NodeTag::T_CopyStmt) {
        let copy = stmt.cast::<pg_sys::CopyStmt>();
        if (*copy).is_from {
            if let Some(oid) = relation_oid((*copy).relation) {
                refuse_if_session_temp(oid);
            }
        }
        return;
    }
    let Some((rel, on_commit)) = created_table(stmt) else {
        return;
    };
    if (*rel).relpersistence as u8 != pg_sys::RELPERSISTENCE_TEMP {
        return;
    }
    // ON COMMIT DELETE ROWS empties the table but keeps its definition (defaults, comments):
    // only ON COMMIT DROP is gone with the transaction.
    if on_commit != pg_sys::OnCommitAction::ONCOMMIT_DROP {
        TenancyError::SessionObject {
            what: "creating a temporary table that keeps its rows after the transaction".into(),
        }
        .report();
    }
}

/// Refuses a write into `relid` when it is a temporary table whose rows outlive the
/// transaction (any but those made `ON COMMIT DROP` or `ON COMMIT DELETE ROWS`).
unsafe fn refuse_if_session_temp(relid: pg_sys::Oid) {
    if pg_sys::get_rel_persistence(relid) as u8 != pg_sys::RELPERSISTENCE_TEMP {
        return;
    }
    if CONFINED.with(|c| c.borrow().contains(&relid)) {
        return;
    }
    let rel = pg_sys::RelationIdGetRelation(relid);
    if rel.is_null() {
        return;
    }
    let name = std::ffi::CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr())
        .to_string_lossy()
        .into_owned();
    pg_sys::RelationClose(rel);
    TenancyError::SessionObject {
        what: format!("writing into temporary table \"{name}\", which outlives the transaction"),
    }
    .report();
}

thread_local! {
    static CONFINED_DDL: Cell<bool> = const { Cell::new(false) };
}

/// Marks, for the duration of a utility statement, whether it creates a temporary table
/// `ON COMMIT DROP` (the one kind of DDL a tenant transaction may run).
pub(crate) struct ConfinedDdl(Option<bool>);

impl ConfinedDdl {
    /// # Safety
    /// `pstmt` is the utility statement ProcessUtility was given.
    pub(crate) unsafe fn enter(pstmt: *mut pg_sys::PlannedStmt) -> ConfinedDdl {
        let confined = created_table((*pstmt).utilityStmt).is_some_and(|(rel, on_commit)| {
            (*rel).relpersistence as u8 == pg_sys::RELPERSISTENCE_TEMP
                && on_commit == pg_sys::OnCommitAction::ONCOMMIT_DROP
        });
        ConfinedDdl(confined.then(|| CONFINED_DDL.with(|c| c.replace(true))))
    }
}

impl Drop for ConfinedDdl {
    fn drop(&mut self) {
        if let Some(previous) = self.0 {
            CONFINED_DDL.with(|c| c.set(previous));
        }
    }
}

/// Whether the running utility statement creates a temporary table `ON COMMIT DROP` (for the
/// drift guard, which refuses every other DDL in a tenant transaction).
#[pg_extern(stable, parallel_restricted)]
fn confined_ddl() -> bool {
    CONFINED_DDL.with(Cell::get)
}

/// After a utility statement ran: notes temporary tables whose rows never outlive a
/// transaction (in tenant transactions and outside them alike).
///
/// # Safety
/// `pstmt` is the utility statement ProcessUtility was given, and it completed.
pub(crate) unsafe fn after_utility(pstmt: *mut pg_sys::PlannedStmt) {
    let Some((rel, on_commit)) = created_table((*pstmt).utilityStmt) else {
        return;
    };
    if on_commit != pg_sys::OnCommitAction::ONCOMMIT_DROP
        && on_commit != pg_sys::OnCommitAction::ONCOMMIT_DELETE_ROWS
    {
        return;
    }
    if let Some(oid) = relation_oid(rel) {
        if pg_sys::get_rel_persistence(oid) as u8 == pg_sys::RELPERSISTENCE_TEMP {
            CONFINED.with(|c| c.borrow_mut().insert(oid));
        }
    }
}

/// A plan about to run in a tenant transaction (the caller knows it is one): refuses writes
/// into temporary tables whose rows outlive the transaction.
///
/// # Safety
/// `query_desc` is the QueryDesc ExecutorStart was given.
pub(crate) unsafe fn check_plan(query_desc: *mut pg_sys::QueryDesc, eflags: i32) {
    if eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0 {
        return;
    }
    let planned = (*query_desc).plannedstmt;
    let results = (*planned).resultRelations;
    if results.is_null() {
        return;
    }
    let rtable = (*planned).rtable;
    // Lists are arrays of cells (PostgreSQL 13+): result relations are RT indexes.
    for i in 0..(*results).length as usize {
        let rt_index = (*(*results).elements.add(i)).int_value as usize;
        if rtable.is_null() || rt_index == 0 || rt_index > (*rtable).length as usize {
            continue;
        }
        let rte = (*(*rtable).elements.add(rt_index - 1))
            .ptr_value
            .cast::<pg_sys::RangeTblEntry>();
        if !rte.is_null() && (*rte).relid != pg_sys::InvalidOid {
            refuse_if_session_temp((*rte).relid);
        }
    }
}

/// An object created in a tenant transaction (the caller knows it is one): large objects are
/// refused.
pub(crate) fn check_object_created(class_id: pg_sys::Oid) {
    if u32::from(class_id) == LARGE_OBJECT_RELATION_ID {
        TenancyError::SessionObject {
            what: "creating a large object (readable by every later session of the role)".into(),
        }
        .report();
    }
}
