//! DDL on a table with forced row level security runs no code of a role that is not a
//! superuser (II-2/9 finding 4, ATTACKS.md O4/O5).
//!
//! FORCE ROW LEVEL SECURITY keeps the table's owner out of other tenants' rows, but utility
//! commands read every row without RLS: `ADD CONSTRAINT ... CHECK (f(row))`, `CREATE INDEX ON
//! t (f(col))`, `ALTER COLUMN ... TYPE ... USING (f(...))`, a generated column, `REINDEX`,
//! `CLUSTER`, `VACUUM FULL` and `ANALYZE` (expression indexes) evaluate expressions over all
//! tenants' rows. If `f` is the owner's function it sees them all (a `RAISE NOTICE` of each
//! row is enough). While such a command runs for a role that is not a superuser, every call
//! of a function whose owner is not a superuser is refused before it starts: the `fmgr` hooks
//! (`needs_fmgr_hook`/`fmgr_hook`, the ones sepgsql uses) see every call, through operators,
//! SQL functions and PL handlers alike, whatever the function is named or wrapped in.
//!
//! That covers what runs *during* the command. What such DDL would leave behind (a CHECK
//! constraint, index expression, generated column or rule that runs the owner's code on
//! every later write) is refused by the drift guard at the end of the command
//! (`tenancy.foreign_code_problem`, sql/guards.sql).

use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    /// How many guarded utility commands are running (they nest: an event trigger's DDL).
    static GUARDED: Cell<u32> = const { Cell::new(0) };
    /// Guarded until the transaction ends: set by maintenance functions a superuser runs over
    /// every tenant's rows (key rotation), so the owner's triggers and domain checks cannot run
    /// with the superuser's rights.
    static GUARDED_XACT: Cell<bool> = const { Cell::new(false) };
    /// The error that aborted a guarded command is reported without its message and detail:
    /// they can hold other tenants' values ("invalid input syntax for type integer: ...",
    /// "Key (body)=(...) is duplicated", "Failing row contains (...)").
    static SCRUB_NEXT_ERROR: Cell<bool> = const { Cell::new(false) };
}

static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

static mut PREV_NEEDS_FMGR_HOOK: pg_sys::needs_fmgr_hook_type = None;
static mut PREV_FMGR_HOOK: pg_sys::fmgr_hook_type = None;

pub(crate) fn init() {
    // SAFETY: called once from _PG_init, before any backend code runs; the previous hooks are
    // kept and chained.
    unsafe {
        PREV_NEEDS_FMGR_HOOK = pg_sys::needs_fmgr_hook;
        pg_sys::needs_fmgr_hook = Some(needs_fmgr_hook);
        PREV_FMGR_HOOK = pg_sys::fmgr_hook;
        pg_sys::fmgr_hook = Some(fmgr_hook);
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log_hook);
    }
}

/// End of the transaction: nothing stays guarded.
pub(crate) fn at_xact_end(_end: crate::xact::End) {
    GUARDED_XACT.with(|g| g.set(false));
    GUARDED.with(|g| g.set(0));
}

/// Refuses code of roles that are not superusers until the end of the transaction. Called by
/// maintenance functions that write every tenant's rows as a superuser (phi_rotate_column).
#[pg_extern(volatile, parallel_unsafe)]
fn refuse_foreign_code_in_transaction() -> bool {
    GUARDED_XACT.with(|g| g.set(true));
    true
}

/// PostgreSQL's MAKE_SQLSTATE of a five-character code.
const fn sqlstate(c: &[u8; 5]) -> i32 {
    let mut code = 0i32;
    let mut i = 0;
    while i < 5 {
        code |= (((c[i] - b'0') & 0x3F) as i32) << (6 * i);
        i += 1;
    }
    code
}

/// Replaces the message and detail of the error that aborted a guarded command.
#[pg_guard]
unsafe extern "C-unwind" fn emit_log_hook(edata: *mut pg_sys::ErrorData) {
    // Any error can carry a row's value ("invalid input syntax for type integer: <value>",
    // "Key (col)=(<value>)", "unrecognized configuration parameter \"<value>\""); only the
    // refusals (42501 insufficient privilege, 0A000 not supported: pg_tenancy's own among
    // them, 25001 not in a transaction block) keep their text.
    // 25001 (cannot run inside a transaction block) names only the command.
    let carries_values = |code: i32| {
        code != sqlstate(b"42501") && code != sqlstate(b"0A000") && code != sqlstate(b"25001")
    };
    if !edata.is_null()
        && (*edata).elevel >= pg_sys::PGERROR as i32
        && SCRUB_NEXT_ERROR.with(|s| s.replace(false))
        && carries_values((*edata).sqlerrcode)
    {
        const MESSAGE: &std::ffi::CStr =
            c"pg_tenancy: a command over a protected table's rows failed; its message is withheld (it could show other tenants' values)";
        const HINT: &std::ffi::CStr = c"Ask a superuser to review the command and run it.";
        (*edata).message = pg_sys::pstrdup(MESSAGE.as_ptr());
        (*edata).detail = std::ptr::null_mut();
        (*edata).detail_log = std::ptr::null_mut();
        (*edata).hint = pg_sys::pstrdup(HINT.as_ptr());
        (*edata).context = std::ptr::null_mut();
        (*edata).internalquery = std::ptr::null_mut();
    }
    if let Some(prev) = PREV_EMIT_LOG_HOOK {
        // SAFETY: the hook installed before ours; C, so called inside the FFI boundary.
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(edata));
    }
}

/// Refuses `ALTER DATABASE ... SET` / `ALTER ROLE ... SET` of `search_path`, `role` or
/// `session_authorization` by a role that is not a superuser. The database owner may set
/// them for every session of the database, superusers' included: a search_path with the
/// owner's schema before pg_catalog made the application's queries call the owner's `=`
/// (which copied revealed PHI out of each tenant's transaction) and a superuser's query on
/// the isolation report run it as superuser. RESET stays allowed.
///
/// # Safety
/// `stmt` is the utility statement's parse tree.
pub(crate) unsafe fn refuse_session_setting_for_others(stmt: *mut pg_sys::Node) {
    let setstmt = if pgrx::is_a(stmt, pg_sys::NodeTag::T_AlterDatabaseSetStmt) {
        (*stmt.cast::<pg_sys::AlterDatabaseSetStmt>()).setstmt
    } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_AlterRoleSetStmt) {
        (*stmt.cast::<pg_sys::AlterRoleSetStmt>()).setstmt
    } else {
        return;
    };
    if setstmt.is_null() || (*setstmt).name.is_null() {
        return; // RESET ALL
    }
    use pg_sys::VariableSetKind::*;
    if matches!((*setstmt).kind, VAR_RESET | VAR_RESET_ALL) {
        return;
    }
    let name = std::ffi::CStr::from_ptr((*setstmt).name).to_bytes();
    let steering: &[&[u8]] = &[b"search_path", b"role", b"session_authorization"];
    if steering.contains(&name) && !pg_sys::superuser() {
        crate::error::TenancyError::SessionSettingForOthers {
            setting: String::from_utf8_lossy(name).into_owned(),
        }
        .report();
    }
}

/// Maintenance commands that lock pg_tenancy's own tables are a superuser's: a database owner
/// may VACUUM, ANALYZE and REINDEX every table of its database, and `VACUUM FULL
/// tenancy.audit_events` queued behind an open reader (or an `ANALYZE` held in an open
/// transaction) stalled every audited write, the reveal worker and the sealer (found by an
/// attacker pass). Refused for non-superusers: those naming a table of schema `tenancy`,
/// database-wide `VACUUM FULL`, database-wide `ANALYZE` inside a transaction block or not
/// issued at top level (in a DO block or function its locks last until the caller's
/// statement ends: found by a second pass), and `REINDEX DATABASE | SYSTEM | SCHEMA
/// tenancy`. Plain database-wide VACUUM and ANALYZE at top level (short locks, as autovacuum
/// takes) stay allowed.
///
/// # Safety
/// `stmt` is a parse tree node (or NULL).
pub(crate) unsafe fn refuse_trail_maintenance(stmt: *mut pg_sys::Node, top_level: bool) {
    use pg_sys::NodeTag::*;
    if stmt.is_null() || !(pgrx::is_a(stmt, T_VacuumStmt) || pgrx::is_a(stmt, T_ReindexStmt)) {
        return;
    }
    if pg_sys::superuser() {
        return;
    }
    let ns = pg_sys::get_namespace_oid(c"tenancy".as_ptr(), true);
    if ns == pg_sys::InvalidOid {
        return; // pg_tenancy is not installed in this database
    }
    let in_tenancy = |rv: *mut pg_sys::RangeVar| -> bool {
        if rv.is_null() {
            return false;
        }
        let rel = pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        rel != pg_sys::InvalidOid && pg_sys::get_rel_namespace(rel) == ns
    };
    let refuse = |command: &'static str| -> ! {
        crate::error::TenancyError::TrailMaintenance { command }.report()
    };
    if pgrx::is_a(stmt, T_VacuumStmt) {
        let v = stmt.cast::<pg_sys::VacuumStmt>();
        let command = if (*v).is_vacuumcmd {
            "VACUUM"
        } else {
            "ANALYZE"
        };
        let options = pgrx::PgList::<pg_sys::DefElem>::from_pg((*v).options);
        let full = options.iter_ptr().any(|d| {
            std::ffi::CStr::from_ptr((*d).defname).to_bytes() == b"full" && pg_sys::defGetBoolean(d)
        });
        let rels = pgrx::PgList::<pg_sys::VacuumRelation>::from_pg((*v).rels);
        if rels.is_empty() {
            if full {
                refuse("VACUUM FULL");
            }
            if !(*v).is_vacuumcmd && (pg_sys::IsTransactionBlock() || !top_level) {
                refuse("ANALYZE in a transaction block or a function");
            }
        } else if rels.iter_ptr().any(|r| in_tenancy((*r).relation)) {
            refuse(command);
        }
        return;
    }
    let r = stmt.cast::<pg_sys::ReindexStmt>();
    use pg_sys::ReindexObjectType::*;
    let tenancy_schema =
        !(*r).name.is_null() && std::ffi::CStr::from_ptr((*r).name).to_bytes() == b"tenancy";
    match (*r).kind {
        REINDEX_OBJECT_DATABASE | REINDEX_OBJECT_SYSTEM => refuse("REINDEX DATABASE"),
        REINDEX_OBJECT_SCHEMA if tenancy_schema => refuse("REINDEX"),
        REINDEX_OBJECT_TABLE | REINDEX_OBJECT_INDEX if in_tenancy((*r).relation) => {
            refuse("REINDEX")
        }
        _ => {}
    }
}

/// Marks a utility statement as guarded for its duration, when a role that is not a
/// superuser runs it on a table with forced row level security.
/// Holds whether the statement is guarded, and whether its error text is withheld (not for
/// superusers, who may read every row anyway: protect()'s own failing statement is shown).
pub(crate) struct Guard(bool, bool);

impl Guard {
    /// # Safety
    /// `pstmt` is the utility statement ProcessUtility was given.
    pub(crate) unsafe fn enter(pstmt: *mut pg_sys::PlannedStmt) -> Guard {
        let stmt = (*pstmt).utilityStmt;
        // A superuser's maintenance (REINDEX, CLUSTER, VACUUM, ANALYZE) is guarded too: an
        // index or statistics object an owner left behind must not run the owner's code with
        // a superuser's rights.
        // Superusers too: a superuser's VALIDATE CONSTRAINT ran an owner's function wrapped in
        // query_to_xml() with superuser rights (found by an attacker pass).
        let guarded = targets_forced_table(stmt);
        let superuser = pg_sys::superuser();
        if guarded {
            if !superuser {
                refuse_rewrites(stmt);
            }
            GUARDED.with(|g| g.set(g.get() + 1));
        }
        Guard(guarded, !superuser)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0 {
            GUARDED.with(|g| g.set(g.get().saturating_sub(1)));
            if self.1 && std::thread::panicking() {
                // The command is being aborted by an ERROR: withhold its text.
                SCRUB_NEXT_ERROR.with(|s| s.set(true));
            }
        }
    }
}

/// `ALTER TABLE ... ALTER COLUMN ... TYPE ... USING (expr)` by a role that is not a superuser
/// rewrites every tenant's values with an expression it chose (a constant, or a CASE on the
/// tenant column): refused on tables with forced RLS. A type change without USING converts
/// every value by the type's own cast.
unsafe fn refuse_rewrites(stmt: *mut pg_sys::Node) {
    if !pgrx::is_a(stmt, pg_sys::NodeTag::T_AlterTableStmt) {
        return;
    }
    let cmds = (*stmt.cast::<pg_sys::AlterTableStmt>()).cmds;
    if cmds.is_null() {
        return;
    }
    for i in 0..(*cmds).length as usize {
        let cmd = (*(*cmds).elements.add(i))
            .ptr_value
            .cast::<pg_sys::AlterTableCmd>();
        if (*cmd).subtype == pg_sys::AlterTableType::AT_AlterColumnType {
            let def = (*cmd).def.cast::<pg_sys::ColumnDef>();
            if !def.is_null() && !(*def).raw_default.is_null() {
                crate::error::TenancyError::RewriteInDdl.report();
            }
        }
    }
}

/// Whether `stmt` evaluates expressions over the rows of a table with forced RLS.
unsafe fn targets_forced_table(stmt: *mut pg_sys::Node) -> bool {
    use pg_sys::NodeTag::*;
    let relation: *mut pg_sys::RangeVar = if pgrx::is_a(stmt, T_AlterTableStmt) {
        (*stmt.cast::<pg_sys::AlterTableStmt>()).relation
    } else if pgrx::is_a(stmt, T_IndexStmt) {
        (*stmt.cast::<pg_sys::IndexStmt>()).relation
    } else if pgrx::is_a(stmt, T_RuleStmt) {
        (*stmt.cast::<pg_sys::RuleStmt>()).relation
    } else if pgrx::is_a(stmt, T_ReindexStmt) {
        let reindex = stmt.cast::<pg_sys::ReindexStmt>();
        if (*reindex).relation.is_null() {
            return true; // REINDEX SCHEMA / DATABASE / SYSTEM: every table it reaches
        }
        (*reindex).relation
    } else if pgrx::is_a(stmt, T_ClusterStmt) {
        let cluster = stmt.cast::<pg_sys::ClusterStmt>();
        if (*cluster).relation.is_null() {
            return true; // CLUSTER of every clustered table
        }
        (*cluster).relation
    } else if pgrx::is_a(stmt, T_AlterDomainStmt) {
        // ALTER DOMAIN ... ADD CONSTRAINT / VALIDATE checks every column of the domain, in
        // protected tables too: whatever domain it is, no owner code runs meanwhile.
        return true;
    } else if pgrx::is_a(stmt, T_VacuumStmt) {
        let vacuum = stmt.cast::<pg_sys::VacuumStmt>();
        let rels = (*vacuum).rels;
        if rels.is_null() {
            return true; // VACUUM / ANALYZE of the whole database
        }
        // A List of VacuumRelation (PostgreSQL 13+ lists are arrays of cells).
        return (0..(*rels).length as usize).any(|i| {
            let vr = (*(*rels).elements.add(i))
                .ptr_value
                .cast::<pg_sys::VacuumRelation>();
            is_forced((*vr).relation)
        });
    } else {
        return false;
    };
    is_forced(relation)
}

/// Whether the table `rv` names (if any) has FORCE ROW LEVEL SECURITY.
unsafe fn is_forced(rv: *mut pg_sys::RangeVar) -> bool {
    let Some(oid) = crate::session_objects::relation_oid(rv) else {
        return false;
    };
    let tuple = pg_sys::SearchSysCache1(
        pg_sys::SysCacheIdentifier::RELOID as i32,
        pg_sys::Datum::from(oid),
    );
    if tuple.is_null() {
        return false;
    }
    let class = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple);
    let forced = (*class).relforcerowsecurity;
    pg_sys::ReleaseSysCache(tuple);
    forced
}

/// The owner of function `fn_oid`, when it is not a superuser (None for superusers' code,
/// built-in functions, and functions that no longer exist).
unsafe fn untrusted_owner(fn_oid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    if u32::from(fn_oid) < pg_sys::FirstNormalObjectId {
        return None; // built in
    }
    let tuple = pg_sys::SearchSysCache1(
        pg_sys::SysCacheIdentifier::PROCOID as i32,
        pg_sys::Datum::from(fn_oid),
    );
    if tuple.is_null() {
        return None;
    }
    let proc_ = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_proc>(tuple);
    let owner = (*proc_).proowner;
    pg_sys::ReleaseSysCache(tuple);
    (!pg_sys::superuser_arg(owner)).then_some(owner)
}

fn guarded() -> bool {
    GUARDED.with(|g| g.get() > 0) || GUARDED_XACT.with(Cell::get)
}

#[pg_guard]
unsafe extern "C-unwind" fn needs_fmgr_hook(fn_oid: pg_sys::Oid) -> bool {
    if let Some(prev) = PREV_NEEDS_FMGR_HOOK {
        // SAFETY: the hook installed before ours; C, so called inside the FFI boundary.
        if pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(fn_oid)) {
            return true;
        }
    }
    guarded() && untrusted_owner(fn_oid).is_some()
}

#[pg_guard]
unsafe extern "C-unwind" fn fmgr_hook(
    event: pg_sys::FmgrHookEventType::Type,
    flinfo: *mut pg_sys::FmgrInfo,
    arg: *mut pg_sys::Datum,
) {
    if event == pg_sys::FmgrHookEventType::FHET_START && guarded() {
        let fn_oid = (*flinfo).fn_oid;
        if let Some(owner) = untrusted_owner(fn_oid) {
            crate::error::TenancyError::ForeignCodeInDdl {
                function: object_name(fn_oid, "regprocedure"),
                owner: object_name(owner, "regrole"),
            }
            .report();
        }
    }
    if let Some(prev) = PREV_FMGR_HOOK {
        // SAFETY: the hook installed before ours; C, so called inside the FFI boundary.
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(event, flinfo, arg));
    }
}

/// `oid` as `name(argtypes)` (a function) or a role name.
unsafe fn object_name(oid: pg_sys::Oid, kind: &str) -> String {
    let ptr = match kind {
        "regprocedure" => pg_sys::format_procedure(oid),
        _ => pg_sys::GetUserNameFromId(oid, true),
    };
    if ptr.is_null() {
        return format!("{}", u32::from(oid));
    }
    std::ffi::CStr::from_ptr(ptr).to_string_lossy().into_owned()
}
