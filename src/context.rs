//! The tenant context: which tenant (and which application actor) the current transaction
//! acts for.
//!
//! * Set only by `tenancy.set_org()`, at most one tenant per transaction, only inside a
//!   transaction block; cleared at commit, abort and PREPARE, and on rollback of the
//!   subtransaction that set it.
//! * Mirrored into the setting `app.current_org_id` (SET LOCAL semantics) so that existing
//!   SQL, logs and parallel workers can read it. A check hook refuses every other write to
//!   that setting: `SET`, `SET LOCAL`, `set_config()`, `PGOPTIONS`, `ALTER ROLE/DATABASE SET`.
//! * `tenancy.current_org_id()` reads the mirror, so the leader and its parallel workers
//!   always agree, and anything that clears the mirror (RESET, a function's SET clause
//!   unwinding) fails closed.

use crate::error::{Raise, Result, TenancyError};
use crate::gucs::{self, TenantIdFormat};
use crate::preload::require_preload;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void, CStr, CString};

/// The setting that mirrors the tenant context.
pub const MIRROR_GUC: &CStr = c"app.current_org_id";
/// Longest text tenant id or actor id accepted.
pub const MAX_ID_LEN: usize = 128;

/// The context of the current transaction, as `set_org` recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Context {
    org: String,
    actor: Option<String>,
    /// True when a signed token proved the tenant and actor.
    signed: bool,
    /// Transaction nesting level that set it (1 = top level).
    level: i32,
}

thread_local! {
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
    /// Open only while `set_org` writes the mirror: the check hook refuses everything else.
    static WRITING_MIRROR: Cell<bool> = const { Cell::new(false) };
    /// A WITH HOLD cursor was declared in this transaction.
    static HOLDABLE_CURSOR: Cell<bool> = const { Cell::new(false) };
    /// Inside ANALYZE, VACUUM, CREATE INDEX, REINDEX or CLUSTER: commands that would store
    /// the values they compute (statistics, index entries) at rest.
    static IN_STORING_COMMAND: Cell<bool> = const { Cell::new(false) };
}

static MIRROR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Defines `app.current_org_id`; called from [`crate::gucs::init`].
pub fn define_mirror_guc() {
    // SAFETY: the check hook is `#[pg_guard]`ed and has the signature Postgres expects.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            MIRROR_GUC,
            c"Tenant of the current transaction, as set by tenancy.set_org(); read-only for SQL.",
            c"Mirrors the pg_tenancy tenant context for existing SQL, logs and parallel workers. Any write other than tenancy.set_org() is refused.",
            &MIRROR,
            GucContext::Userset,
            GucFlags::NO_RESET_ALL | GucFlags::DISALLOW_IN_FILE | GucFlags::NOT_WHILE_SEC_REST,
            Some(check_mirror),
            None,
            None,
        );
    }
}

/// Registers the transaction callbacks and the utility hook. Called from `_PG_init`.
pub fn init() {
    // SAFETY: callbacks and hooks are installed once, at library load, on the main thread.
    unsafe {
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_mirror(
    _newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // The boot value at definition, our own write, and a parallel worker copying its
    // leader's settings are the only writes allowed.
    if source == pg_sys::GucSource::PGC_S_DEFAULT
        || WRITING_MIRROR.with(Cell::get)
        || pg_sys::InitializingParallelWorker
    {
        return true;
    }
    pg_sys::GUC_check_errcode(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32);
    pg_sys::GUC_check_errmsg_string =
        pg_sys::pstrdup(c"app.current_org_id can only be set by tenancy.set_org()".as_ptr());
    pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(
        c"Call tenancy.set_org('<tenant id>') inside the transaction instead of SET.".as_ptr(),
    );
    false
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PREPARE => crate::reveal_log::flush(true),
        XACT_EVENT_ABORT => crate::reveal_log::flush(false),
        _ => {}
    }
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    ) {
        CONTEXT.with(|c| c.borrow_mut().take());
        HOLDABLE_CURSOR.with(|h| h.set(false));
        IN_STORING_COMMAND.with(|f| f.set(false));
        crate::audit::forget_tips();
        WRITING_MIRROR.with(|w| w.set(false));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    _my_subid: pg_sys::SubTransactionId,
    _parent_subid: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    // During the callback the ending subtransaction is still the current one.
    let level = pg_sys::GetCurrentTransactionNestLevel();
    CONTEXT.with(|c| {
        let mut slot = c.borrow_mut();
        match event {
            // The mirror is rolled back by the GUC machinery at the same point.
            pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
                crate::audit::forget_tips();
                if slot.as_ref().is_some_and(|ctx| ctx.level >= level) {
                    *slot = None;
                }
            }
            pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
                if let Some(ctx) = slot.as_mut().filter(|ctx| ctx.level >= level) {
                    ctx.level = level - 1;
                }
            }
            _ => {}
        }
    });
}

/// True while a command runs that stores computed values at rest (statistics, indexes): PHI
/// must not be revealed there.
pub fn in_storing_command() -> bool {
    IN_STORING_COMMAND.with(Cell::get)
}

/// Marks [`in_storing_command`] for the duration of a utility statement, if it is one.
struct StoringCommand(Option<bool>);

impl StoringCommand {
    unsafe fn enter(pstmt: *mut pg_sys::PlannedStmt) -> Self {
        use pg_sys::NodeTag::*;
        let stmt = (*pstmt).utilityStmt;
        let storing = [T_VacuumStmt, T_IndexStmt, T_ReindexStmt, T_ClusterStmt]
            .into_iter()
            .any(|tag| pgrx::is_a(stmt, tag));
        StoringCommand(storing.then(|| IN_STORING_COMMAND.with(|f| f.replace(true))))
    }
}

impl Drop for StoringCommand {
    fn drop(&mut self) {
        if let Some(previous) = self.0 {
            IN_STORING_COMMAND.with(|f| f.set(previous));
        }
    }
}

static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

/// Plans of a tenant transaction: no writes into session-lived temporary tables
/// (session_objects.rs).
#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query_desc: *mut pg_sys::QueryDesc, eflags: i32) {
    if in_tenant_transaction() {
        crate::session_objects::check_plan(query_desc, eflags);
    }
    match PREV_EXECUTOR_START {
        // SAFETY: the hook installed before ours; C, so called inside the FFI boundary.
        Some(prev) => pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(query_desc, eflags)),
        None => pg_sys::standard_ExecutorStart(query_desc, eflags),
    }
}

/// Objects created in a tenant transaction: no large objects (session_objects.rs).
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
    if let Some(prev) = PREV_OBJECT_ACCESS {
        // SAFETY: the hook installed before ours; C, so called inside the FFI boundary.
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
            prev(access, class_id, object_id, sub_id, arg)
        });
    }
}

/// Refuses `DECLARE ... WITH HOLD` in a tenant transaction: such a cursor is materialised at
/// commit with this tenant's rows and can then be fetched by whatever transaction runs next
/// on the (pooled) connection.
unsafe fn check_utility(pstmt: *mut pg_sys::PlannedStmt) {
    let stmt = (*pstmt).utilityStmt;
    if pgrx::is_a(stmt, pg_sys::NodeTag::T_DeclareCursorStmt) {
        let declare = stmt.cast::<pg_sys::DeclareCursorStmt>();
        if (*declare).options & pg_sys::CURSOR_OPT_HOLD as i32 != 0 {
            if CONTEXT.with(|c| c.borrow().is_some()) {
                TenancyError::HoldableCursor.report();
            }
            HOLDABLE_CURSOR.with(|h| h.set(true));
        }
    }
}

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
    check_utility(pstmt);
    if in_tenant_transaction() {
        crate::session_objects::check_utility(pstmt);
    }
    let _storing = StoringCommand::enter(pstmt);
    let _owner_ddl = crate::owner_ddl::Guard::enter(pstmt);
    let _confined = crate::session_objects::ConfinedDdl::enter(pstmt);
    match PREV_PROCESS_UTILITY {
        // A chained hook (pg_stat_statements, ...) is C: an ERROR in it longjmps, so it is
        // called inside pgrx's FFI boundary, which turns the ERROR into a Rust unwind (the
        // guards above are dropped) and re-raises it at this function's #[pg_guard].
        // SAFETY: `prev` is the hook that was installed before ours, with this signature.
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
    }
    crate::session_objects::after_utility(pstmt);
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
    check_utility(pstmt);
    if in_tenant_transaction() {
        crate::session_objects::check_utility(pstmt);
    }
    let _storing = StoringCommand::enter(pstmt);
    let _owner_ddl = crate::owner_ddl::Guard::enter(pstmt);
    let _confined = crate::session_objects::ConfinedDdl::enter(pstmt);
    match PREV_PROCESS_UTILITY {
        // A chained hook (pg_stat_statements, ...) is C: an ERROR in it longjmps, so it is
        // called inside pgrx's FFI boundary, which turns the ERROR into a Rust unwind (the
        // guards above are dropped) and re-raises it at this function's #[pg_guard].
        // SAFETY: `prev` is the hook that was installed before ours, with this signature.
        Some(prev) => pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
            prev(
                pstmt,
                query_string,
                read_only_tree,
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
            read_only_tree,
            context,
            params,
            query_env,
            dest,
            qc,
        ),
    }
    crate::session_objects::after_utility(pstmt);
}

/// Validates and canonicalises a tenant id under `tenancy.tenant_id_format`.
pub fn parse_org(raw: Option<&str>, format: TenantIdFormat) -> Result<String> {
    let raw = raw.ok_or(TenancyError::NullTenant)?;
    if raw.is_empty() {
        return Err(TenancyError::EmptyTenant);
    }
    match format {
        TenantIdFormat::Uuid => uuid::Uuid::try_parse(raw)
            .map(|u| u.hyphenated().to_string())
            .map_err(|_| TenancyError::MalformedTenant {
                reason: format!(
                    "tenancy.tenant_id_format is 'uuid' and the value ({} characters) is not a UUID",
                    raw.chars().count()
                ),
            }),
        TenantIdFormat::Text => check_plain_id(raw)
            .map(str::to_string)
            .map_err(|reason| TenancyError::MalformedTenant { reason }),
    }
}

/// Validates an actor id: same rule as text tenant ids.
pub fn parse_actor(raw: Option<&str>) -> Result<Option<String>> {
    match raw {
        None => Ok(None),
        Some(a) => check_plain_id(a)
            .map(|a| Some(a.to_string()))
            .map_err(|reason| TenancyError::MalformedActor { reason }),
    }
}

/// 1..=128 printable ASCII characters, none of them a space, quote or backslash: nothing
/// that could break out of a log line, a token message or a quoted literal.
fn check_plain_id(id: &str) -> std::result::Result<&str, String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "the value must be 1 to {MAX_ID_LEN} characters, not {}",
            id.len()
        ));
    }
    if let Some(pos) = id
        .bytes()
        .position(|b| !b.is_ascii_graphic() || matches!(b, b'\'' | b'"' | b'\\'))
    {
        return Err(format!("character {} is not allowed", pos + 1));
    }
    Ok(id)
}

/// Enters `org` for the rest of the current transaction. Returns the stored form of the id.
pub fn enter(org: Option<&str>, actor: Option<&str>, token: Option<&str>) -> Result<String> {
    require_preload();
    // SAFETY: plain reads of transaction state on the backend's main thread.
    let (in_block, level) = unsafe {
        (
            pg_sys::IsTransactionBlock(),
            pg_sys::GetCurrentTransactionNestLevel(),
        )
    };
    if !in_block {
        return Err(TenancyError::OutsideTransaction);
    }
    let org = parse_org(org, gucs::tenant_id_format())?;
    let actor = parse_actor(actor)?;
    if let Some(current) = CONTEXT.with(|c| c.borrow().clone()) {
        if current.org != org {
            return Err(TenancyError::TenantAlreadySet);
        }
        if actor.is_some() && current.actor != actor {
            return Err(TenancyError::ActorAlreadySet);
        }
        // The same tenant again is a no-op apart from restoring a mirror that was RESET.
        write_mirror(&org);
        return Ok(org);
    }
    if HOLDABLE_CURSOR.with(Cell::get) {
        return Err(TenancyError::HoldableCursor);
    }
    let signed = crate::token::check_for_set_org(token, &org, actor.as_deref())?;
    write_mirror(&org);
    CONTEXT.with(|c| {
        *c.borrow_mut() = Some(Context {
            org: org.clone(),
            actor,
            signed,
            level,
        })
    });
    Ok(org)
}

/// Writes the mirror setting with SET LOCAL semantics, through the check hook's one door.
fn write_mirror(org: &str) {
    struct Close;
    impl Drop for Close {
        fn drop(&mut self) {
            WRITING_MIRROR.with(|w| w.set(false));
        }
    }
    // Validated ids never contain NUL.
    let value = CString::new(org).expect("tenant ids are validated to printable ASCII");
    WRITING_MIRROR.with(|w| w.set(true));
    let _close = Close;
    // SAFETY: both strings are NUL-terminated and outlive the call; ERROR unwinds through
    // `_close`, which shuts the door again.
    unsafe {
        pg_sys::set_config_option(
            MIRROR_GUC.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            pgrx::PgLogLevel::ERROR as i32,
            false,
        );
    }
}

/// The actor of the current transaction and whether a signed token proved it.
pub fn current_actor_and_verified() -> (Option<String>, bool) {
    CONTEXT.with(|c| {
        c.borrow()
            .as_ref()
            .map(|ctx| (ctx.actor.clone(), ctx.signed))
            .unwrap_or((None, false))
    })
}

/// Whether the current transaction has a tenant context (no allocation: for hooks that run
/// on every statement).
pub fn in_tenant_transaction() -> bool {
    CONTEXT.with(|c| c.borrow().is_some())
}

/// The tenant id of the current transaction as text, from the mirror; `None` when unset.
pub fn current_org() -> Option<String> {
    MIRROR
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

/// Enters a tenant for the current transaction (text id: a UUID by default, or any id when
/// `tenancy.tenant_id_format = 'text'`). `actor` names the application user acting in it;
/// `token` is required in signed mode. Raises outside a transaction block, for a second
/// tenant in one transaction, and for every malformed argument.
#[pg_extern(volatile, parallel_unsafe, name = "set_org")]
fn set_org(
    org: Option<&str>,
    actor: default!(Option<&str>, "NULL"),
    token: default!(Option<&str>, "NULL"),
) -> String {
    enter(org, actor, token).or_raise()
}

/// `set_org` for a typed `uuid` argument (drivers that bind parameters as uuid).
#[pg_extern(volatile, parallel_unsafe, name = "set_org")]
fn set_org_uuid(
    org: Option<pgrx::Uuid>,
    actor: default!(Option<&str>, "NULL"),
    token: default!(Option<&str>, "NULL"),
) -> String {
    let text = org.map(|u| {
        uuid::Uuid::from_bytes(*u.as_bytes())
            .hyphenated()
            .to_string()
    });
    enter(text.as_deref(), actor, token).or_raise()
}

/// The tenant of the current transaction as a uuid, or NULL when none is set (or when the
/// tenant id is not a UUID). What RLS policies on uuid tenant columns call.
#[pg_extern(stable, parallel_safe)]
fn current_org_id() -> Option<pgrx::Uuid> {
    let org = current_org()?;
    uuid::Uuid::try_parse(&org)
        .ok()
        .map(|u| pgrx::Uuid::from_bytes(u.into_bytes()))
}

/// The tenant of the current transaction as text, or NULL. What RLS policies on text tenant
/// columns call.
#[pg_extern(stable, parallel_safe)]
fn current_org_id_text() -> Option<String> {
    current_org()
}

/// The current tenant as a uuid, or an error when none is set: for write paths and column
/// defaults.
#[pg_extern(stable, parallel_safe)]
fn require_org() -> pgrx::Uuid {
    let org = current_org().ok_or(TenancyError::NoTenant).or_raise();
    match uuid::Uuid::try_parse(&org) {
        Ok(u) => pgrx::Uuid::from_bytes(u.into_bytes()),
        Err(_) => TenancyError::MalformedTenant {
            reason: "the current tenant id is not a UUID; use tenancy.require_org_text()".into(),
        }
        .report(),
    }
}

/// The current tenant as text, or an error when none is set.
#[pg_extern(stable, parallel_safe)]
fn require_org_text() -> String {
    current_org().ok_or(TenancyError::NoTenant).or_raise()
}

/// The application actor given to `set_org` in this transaction, or NULL.
#[pg_extern(stable, parallel_restricted)]
fn current_actor() -> Option<String> {
    CONTEXT.with(|c| c.borrow().as_ref().and_then(|ctx| ctx.actor.clone()))
}

/// Whether this transaction's context was proven by a signed token (signed mode).
#[pg_extern(stable, parallel_restricted)]
fn context_is_signed() -> bool {
    CONTEXT.with(|c| c.borrow().as_ref().is_some_and(|ctx| ctx.signed))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    const A: &str = "11111111-1111-4111-8111-111111111111";

    #[test]
    fn test_fuzz_tenant_ids_accepted_only_when_well_formed() {
        let mut rng = crate::fuzz::Rng::new(0x5eed_0003);
        let valid = "6f1c1f9e-8d3a-4c7e-9f1e-0a6b5d4c3b2a";
        for i in 0..crate::fuzz::iterations() {
            let input = if i % 2 == 0 {
                String::from_utf8_lossy(&rng.mutate(valid.as_bytes())).into_owned()
            } else {
                rng.string(140)
            };
            if let Ok(id) = parse_org(Some(&input), TenantIdFormat::Uuid) {
                assert_eq!(
                    id,
                    uuid::Uuid::try_parse(&input)
                        .unwrap()
                        .hyphenated()
                        .to_string()
                );
            }
            if let Ok(id) = parse_org(Some(&input), TenantIdFormat::Text) {
                assert!((1..=128).contains(&id.len()), "{id:?}");
                assert!(
                    id.chars()
                        .all(|c| c.is_ascii_graphic() && !"'\"\\\\".contains(c)),
                    "{id:?}"
                );
            }
            let _ = parse_actor(Some(&input));
        }
    }

    #[test]
    fn test_uuid_ids_are_canonicalised() {
        let upper = "6F1C1F9E-8D3A-4C7E-9F1E-0A6B5D4C3B2A";
        assert_eq!(
            parse_org(Some(upper), TenantIdFormat::Uuid).unwrap(),
            upper.to_lowercase()
        );
    }

    #[test]
    fn test_bad_ids_are_refused() {
        use TenantIdFormat::*;
        assert!(matches!(
            parse_org(None, Uuid),
            Err(TenancyError::NullTenant)
        ));
        assert!(matches!(
            parse_org(Some(""), Text),
            Err(TenancyError::EmptyTenant)
        ));
        for bad in [
            "x'; RESET ALL; --",
            "not-a-uuid",
            " 11111111-1111-4111-8111-111111111111",
        ] {
            assert!(
                matches!(
                    parse_org(Some(bad), Uuid),
                    Err(TenancyError::MalformedTenant { .. })
                ),
                "{bad}"
            );
        }
        for bad in [
            "x'; RESET ALL; --",
            "a b",
            "tab\t",
            "q\"",
            "back\\",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(
                    parse_org(Some(bad), Text),
                    Err(TenancyError::MalformedTenant { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(parse_org(Some("org_2xY-9.z"), Text).unwrap(), "org_2xY-9.z");
    }

    #[test]
    fn test_error_detail_does_not_echo_the_input() {
        let err = parse_org(Some("secret-looking-value"), TenantIdFormat::Uuid).unwrap_err();
        assert!(!err.detail().unwrap().contains("secret"));
    }

    #[pg_test]
    fn test_set_org_sets_context_and_mirror() {
        let stored = Spi::get_one::<String>(&format!("SELECT tenancy.set_org('{A}')")).unwrap();
        assert_eq!(stored.as_deref(), Some(A));
        let mirror =
            Spi::get_one::<String>("SELECT current_setting('app.current_org_id')").unwrap();
        assert_eq!(mirror.as_deref(), Some(A));
        let id = Spi::get_one::<String>("SELECT tenancy.current_org_id()::text").unwrap();
        assert_eq!(id.as_deref(), Some(A));
    }

    #[pg_test(error = "a different tenant context is already set in this transaction")]
    fn test_second_tenant_in_one_transaction_raises() {
        Spi::run(&format!("SELECT tenancy.set_org('{A}')")).unwrap();
        // the same tenant again is a no-op
        Spi::run(&format!("SELECT tenancy.set_org('{A}')")).unwrap();
        Spi::run("SELECT tenancy.set_org('22222222-2222-4222-8222-222222222222')").unwrap();
    }

    #[pg_test(error = "app.current_org_id can only be set by tenancy.set_org()")]
    fn test_set_config_on_mirror_is_refused() {
        Spi::run(
            "SELECT set_config('app.current_org_id', '22222222-2222-4222-8222-222222222222', true)",
        )
        .unwrap();
    }

    #[pg_test(error = "no tenant context is set")]
    fn test_require_org_without_context_raises() {
        Spi::run("SELECT tenancy.require_org()").unwrap();
    }

    #[pg_test]
    fn test_context_functions_are_never_immutable() {
        let n = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'tenancy' AND p.provolatile = 'i'
               AND p.proname IN ('set_org','current_org_id','current_org_id_text',
                                 'require_org','require_org_text','current_actor')",
        )
        .unwrap();
        assert_eq!(n, Some(0));
        let leakproof = Spi::get_one::<bool>(
            "SELECT bool_and(proleakproof) FROM pg_proc WHERE oid IN
             ('tenancy.current_org_id()'::regprocedure, 'tenancy.current_org_id_text()'::regprocedure)",
        )
        .unwrap();
        assert_eq!(leakproof, Some(true));
    }
}
