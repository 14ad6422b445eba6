//! The executor-level hooks: ProcessUtility (every utility statement), ExecutorStart (every
//! plan) and object access (every object created). Each hook asks the modules that own a
//! rule about the statement, in a fixed order, then hands it on to the hook installed before
//! ours (pg_stat_statements, ...) or to PostgreSQL.
//!
//! * [`crate::citus`]: the tenant floor is RESTRICTIVE wherever it is created (shards too).
//! * [`crate::context`]: no WITH HOLD cursor in a tenant transaction.
//! * [`crate::session_objects`]: nothing session-lived made or written in a tenant transaction.
//! * [`crate::phi`]: no reveal while statistics or index entries are computed.
//! * [`crate::owner_ddl`]: no code of non-superusers in DDL over tables with forced RLS.

use crate::context::in_tenant_transaction;
use pgrx::prelude::*;
use std::ffi::{c_char, c_void};

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;
static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

/// Installs the three hooks, keeping the previous ones to chain. Called from `_PG_init`.
pub(crate) fn init() {
    // SAFETY: hooks are installed once, at library load, on the main thread.
    unsafe {
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
    }
}

/// Every utility statement: the checks and statement-long guards around `next` (the hook
/// installed before ours, or PostgreSQL's own).
unsafe fn around_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    context: pg_sys::ProcessUtilityContext::Type,
    next: impl FnOnce(),
) {
    crate::citus::force_floor_restrictive((*pstmt).utilityStmt);
    crate::citus::check_set_statement((*pstmt).utilityStmt);
    crate::citus::refuse_shard_weakening((*pstmt).utilityStmt);
    crate::context::check_holdable_cursor(pstmt);
    crate::owner_ddl::refuse_session_setting_for_others((*pstmt).utilityStmt);
    crate::owner_ddl::refuse_trail_maintenance(
        (*pstmt).utilityStmt,
        context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL,
    );
    if in_tenant_transaction() {
        crate::session_objects::check_utility(pstmt);
    }
    // Guards that last for the statement, dropped however it ends (an ERROR unwinds here).
    let _storing = crate::phi::StoringCommand::enter(pstmt);
    let _owner_ddl = crate::owner_ddl::Guard::enter(pstmt);
    let _confined = crate::session_objects::ConfinedDdl::enter(pstmt);
    let prepared = prepared_transaction((*pstmt).utilityStmt);
    if let Some((pg_sys::TransactionStmtKind::TRANS_STMT_PREPARE, gid)) = &prepared {
        crate::reveal_log::preparing(gid);
    }
    let shard_trigger = crate::citus::shard_audit_trigger((*pstmt).utilityStmt);
    next();
    if let Some(t) = shard_trigger {
        t.check();
    }
    crate::citus::refuse_foreign_code_on_shard((*pstmt).utilityStmt);
    crate::session_objects::after_utility(pstmt);
    match prepared {
        Some((pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED, gid)) => {
            crate::reveal_log::prepared_ended(&gid, true)
        }
        Some((pg_sys::TransactionStmtKind::TRANS_STMT_ROLLBACK_PREPARED, gid)) => {
            crate::reveal_log::prepared_ended(&gid, false)
        }
        _ => {}
    }
}

/// PREPARE TRANSACTION, COMMIT PREPARED or ROLLBACK PREPARED, with its GID.
///
/// SAFETY: `stmt` is a parse tree node (or NULL).
unsafe fn prepared_transaction(
    stmt: *mut pg_sys::Node,
) -> Option<(pg_sys::TransactionStmtKind::Type, String)> {
    use pg_sys::TransactionStmtKind::*;
    if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_TransactionStmt {
        return None;
    }
    let t = stmt.cast::<pg_sys::TransactionStmt>();
    let kind = (*t).kind;
    if !matches!(
        kind,
        TRANS_STMT_PREPARE | TRANS_STMT_COMMIT_PREPARED | TRANS_STMT_ROLLBACK_PREPARED
    ) || (*t).gid.is_null()
    {
        return None;
    }
    let gid = std::ffi::CStr::from_ptr((*t).gid)
        .to_string_lossy()
        .into_owned();
    Some((kind, gid))
}

// The hook itself, in the two signatures: PostgreSQL 14 added `read_only_tree`. A chained hook
// is C: an ERROR in it longjmps, so it is called inside pgrx's FFI boundary, which turns the
// ERROR into a Rust unwind (the guards above are dropped) and re-raises it at the hook's
// #[pg_guard]. SAFETY (both): `prev` is the hook installed before ours, with this signature.

#[cfg(feature = "pg13")]
#[pg_guard]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    around_utility(pstmt, context, || match PREV_PROCESS_UTILITY {
        Some(prev) => pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
            prev(pstmt, query_string, context, params, query_env, dest, qc)
        }),
        None => pg_sys::standard_ProcessUtility(
            pstmt,
            query_string,
            context,
            params,
            query_env,
            dest,
            qc,
        ),
    });
}

#[cfg(not(feature = "pg13"))]
#[pg_guard]
#[allow(clippy::too_many_arguments)] // the hook's signature is Postgres's
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let ro = read_only_tree;
    around_utility(pstmt, context, || match PREV_PROCESS_UTILITY {
        Some(prev) => pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
            prev(
                pstmt,
                query_string,
                ro,
                context,
                params,
                query_env,
                dest,
                qc,
            )
        }),
        None => pg_sys::standard_ProcessUtility(
            pstmt,
            query_string,
            ro,
            context,
            params,
            query_env,
            dest,
            qc,
        ),
    });
}

/// Plans of a tenant transaction: no writes into session-lived temporary tables; on a Citus
/// worker, a handed-over context only inside a distributed transaction.
#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query_desc: *mut pg_sys::QueryDesc, eflags: i32) {
    crate::citus::confirm_distributed(query_desc);
    if in_tenant_transaction() {
        crate::session_objects::check_plan(query_desc, eflags);
    }
    match PREV_EXECUTOR_START {
        // SAFETY: the hook installed before ours; C, so called inside the FFI boundary.
        Some(prev) => pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(query_desc, eflags)),
        None => pg_sys::standard_ExecutorStart(query_desc, eflags),
    }
}

/// Objects created in a tenant transaction: no large objects.
#[pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: i32,
    arg: *mut c_void,
) {
    if access == pg_sys::ObjectAccessType::OAT_POST_CREATE && in_tenant_transaction() {
        crate::session_objects::check_object_created(class_id);
    }
    if access == pg_sys::ObjectAccessType::OAT_DROP {
        crate::citus::refuse_floor_drop(class_id, object_id);
    }
    if access == pg_sys::ObjectAccessType::OAT_FUNCTION_EXECUTE {
        crate::citus::refuse_row_copy_by_non_superuser(object_id);
    }
    if let Some(prev) = PREV_OBJECT_ACCESS {
        // SAFETY: the hook installed before ours; C, so called inside the FFI boundary.
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
            prev(access, class_id, object_id, sub_id, arg)
        });
    }
}
