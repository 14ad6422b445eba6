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

use crate::preload::require_preload;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void, CStr, CString};

/// The setting that mirrors the tenant context.
pub(crate) const MIRROR_GUC: &CStr = c"app.current_org_id";

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
}

static MIRROR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The actor and whether a token proved it, for parallel workers (which get their leader's
/// settings, not its memory): `1<actor>`, `0<actor>`, or `-` (no actor); empty outside a
/// tenant transaction. Hidden; written only by `set_org` (a RESET, which no check hook sees,
/// empties it: a parallel worker then refuses to reveal, found by an attacker pass).
const ACTOR_GUC: &CStr = c"tenancy.context_actor";
static ACTOR_MIRROR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Defines `app.current_org_id`; called from [`crate::gucs::init`].
pub(crate) fn define_mirror_guc() {
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
        GucRegistry::define_string_guc_with_hooks(
            ACTOR_GUC,
            c"The actor of the current transaction, for its parallel workers; read-only for SQL.",
            c"Written by tenancy.set_org() only.",
            &ACTOR_MIRROR,
            GucContext::Userset,
            GucFlags::NO_RESET_ALL
                | GucFlags::DISALLOW_IN_FILE
                | GucFlags::NOT_WHILE_SEC_REST
                | GucFlags::NO_SHOW_ALL,
            Some(check_actor_mirror),
            None,
            None,
        );
    }
}

/// Whether a write of a mirror setting is allowed: the boot value at definition, our own
/// write, and a parallel worker copying its leader's settings. (RESET and SET ... TO DEFAULT
/// never reach a check hook: a reset actor mirror is empty, and a parallel worker refuses to
/// reveal without it.)
unsafe fn mirror_write_allowed(source: pg_sys::GucSource::Type) -> bool {
    source == pg_sys::GucSource::PGC_S_DEFAULT
        || WRITING_MIRROR.with(Cell::get)
        || pg_sys::InitializingParallelWorker
}

/// Fails a check hook with 42501 and `message` / `hint`.
unsafe fn refuse_mirror_write(message: &CStr, hint: &CStr) -> bool {
    pg_sys::GUC_check_errcode(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32);
    pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(message.as_ptr());
    pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(hint.as_ptr());
    false
}

#[pg_guard]
unsafe extern "C-unwind" fn check_mirror(
    _newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    mirror_write_allowed(source)
        || refuse_mirror_write(
            c"app.current_org_id can only be set by tenancy.set_org()",
            c"Call tenancy.set_org('<tenant id>') inside the transaction instead of SET.",
        )
}

#[pg_guard]
unsafe extern "C-unwind" fn check_actor_mirror(
    _newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    mirror_write_allowed(source)
        || refuse_mirror_write(
            c"tenancy.context_actor can only be set by tenancy.set_org()",
            c"Call tenancy.set_org('<tenant id>', '<actor>') inside the transaction.",
        )
}

/// End of the transaction: the context, the mirror's door and the cursor note go.
pub(crate) fn at_xact_end(_end: crate::xact::End) {
    CONTEXT.with(|c| c.borrow_mut().take());
    crate::citus::at_xact_end();
    HOLDABLE_CURSOR.with(|h| h.set(false));
    WRITING_MIRROR.with(|w| w.set(false));
}

/// End of a subtransaction: a context set inside a rolled-back one goes (the mirror is rolled
/// back by the GUC machinery at the same point); one set inside a committed one now belongs
/// to its parent.
pub(crate) fn at_sub_end(end: crate::xact::SubEnd, level: i32) {
    CONTEXT.with(|c| {
        let mut slot = c.borrow_mut();
        match end {
            crate::xact::SubEnd::Abort => {
                if slot.as_ref().is_some_and(|ctx| ctx.level >= level) {
                    *slot = None;
                }
            }
            crate::xact::SubEnd::Commit => {
                if let Some(ctx) = slot.as_mut().filter(|ctx| ctx.level >= level) {
                    ctx.level = level - 1;
                }
            }
        }
    });
}

/// Refuses `DECLARE ... WITH HOLD` in a tenant transaction: such a cursor is materialised at
/// commit with this tenant's rows and can then be fetched by whatever transaction runs next
/// on the (pooled) connection.
pub(crate) unsafe fn check_holdable_cursor(pstmt: *mut pg_sys::PlannedStmt) {
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

/// Enters `org` for the rest of the current transaction. Returns the stored form of the id.
pub(crate) fn enter(org: Option<&str>, actor: Option<&str>, token: Option<&str>) -> Result<String> {
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
    let org = crate::ids::parse_org(org, crate::tenant_format::current())?;
    let actor = crate::ids::parse_actor(actor)?;
    // On a Citus worker: the coordinator's context, handed over with this transaction.
    if let Some(handed) = crate::citus::installed_context() {
        if handed.org != org {
            return Err(TenancyError::TenantAlreadySet);
        }
        if actor.is_some() && handed.actor != actor {
            return Err(TenancyError::ActorAlreadySet);
        }
    }
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
    let handover = crate::citus::before_entry()?;
    let signed = crate::token::check_for_set_org(token, &org, actor.as_deref())?;
    write_mirror(&org);
    write_setting(
        ACTOR_GUC,
        &actor
            .as_deref()
            .map(|a| format!("{}{a}", if signed { 1 } else { 0 }))
            .unwrap_or_else(|| "-".into()),
    );
    CONTEXT.with(|c| {
        *c.borrow_mut() = Some(Context {
            org: org.clone(),
            actor: actor.clone(),
            signed,
            level,
        })
    });
    // On a Citus coordinator: every worker of this distributed transaction gets it too.
    if let Some(handover) = handover {
        handover.hand_over(&org, actor.as_deref(), signed)?;
    }
    Ok(org)
}

/// Writes the mirror setting with SET LOCAL semantics, through the check hook's one door.
fn write_mirror(org: &str) {
    write_setting(MIRROR_GUC, org);
}

/// Writes one of the two mirrors with SET LOCAL semantics, through the check hook's one door.
fn write_setting(name: &CStr, org: &str) {
    struct Close;
    impl Drop for Close {
        fn drop(&mut self) {
            WRITING_MIRROR.with(|w| w.set(false));
        }
    }
    // Validated ids never contain NUL.
    let value = CString::new(org).expect("tenant and actor ids are validated (no NUL)");
    WRITING_MIRROR.with(|w| w.set(true));
    let _close = Close;
    // SAFETY: both strings are NUL-terminated and outlive the call; ERROR unwinds through
    // `_close`, which shuts the door again.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
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

/// The actor of the current transaction and whether a signed token proved it (in a parallel
/// worker: its leader's, from the hidden mirror).
pub(crate) fn current_actor_and_verified() -> (Option<String>, bool) {
    if let Some(found) = CONTEXT.with(|c| {
        c.borrow()
            .as_ref()
            .map(|ctx| (ctx.actor.clone(), ctx.signed))
    }) {
        return found;
    }
    if let Some(handed) = crate::citus::installed_context() {
        return (handed.actor, handed.signed);
    }
    // SAFETY: a plain read of a process global.
    if unsafe { pg_sys::ParallelWorkerNumber } >= 0 {
        if let Some(v) = ACTOR_MIRROR.get() {
            let v = v.to_string_lossy();
            if let Some(actor) = v.get(1..).filter(|a| !a.is_empty()) {
                return (Some(actor.to_string()), v.starts_with('1'));
            }
        }
    }
    (None, false)
}

/// In a parallel worker: whether the leader's actor reached it (`tenancy.context_actor` was
/// written by `set_org`, `-` when there is no actor); a reveal without it is refused.
/// Always true elsewhere.
pub(crate) fn parallel_actor_known() -> bool {
    // SAFETY: a plain read of a process global.
    if unsafe { pg_sys::ParallelWorkerNumber } < 0 {
        return true;
    }
    ACTOR_MIRROR.get().is_some_and(|v| !v.as_bytes().is_empty())
        || crate::citus::installed_context().is_some()
}

/// Whether the current transaction has a tenant context (no allocation: for hooks that run
/// on every statement).
pub(crate) fn in_tenant_transaction() -> bool {
    CONTEXT.with(|c| c.borrow().is_some())
}

/// The tenant id of the current transaction as text, from the mirror; `None` when unset.
pub(crate) fn current_org() -> Option<String> {
    with_mirror(|b| b.map(|b| String::from_utf8_lossy(b).into_owned()))
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
    current_org_uuid().map(pgrx::Uuid::from_bytes)
}

/// The mirror's current value, borrowed from the GUC machinery (no copy); `None` when unset.
fn with_mirror<R>(f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    // SAFETY: the setting's storage is a C string owned by the GUC machinery (or NULL), valid
    // until the setting changes, which cannot happen while `f` runs (it only reads).
    let bytes = unsafe {
        let p = *MIRROR.as_ptr();
        (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes())
    };
    match bytes.filter(|b| !b.is_empty()) {
        Some(b) => f(Some(b)),
        // On a Citus worker, the context the coordinator handed over.
        None => crate::citus::with_installed_org(f),
    }
}

/// The tenant of the current transaction as UUID bytes, parsed once per value of the mirror:
/// RLS calls this for every query (in a seq scan formerly for every row), so a repeated call
/// compares the mirror's bytes with the cached ones and allocates nothing. Reading the mirror
/// each time (not the context) keeps parallel workers and a RESET mirror failing closed.
pub(crate) fn current_org_uuid() -> Option<[u8; 16]> {
    thread_local! {
        static PARSED: RefCell<(Vec<u8>, Option<[u8; 16]>)> = const { RefCell::new((Vec::new(), None)) };
    }
    with_mirror(|bytes| {
        let bytes = bytes?;
        PARSED.with(|c| {
            let mut cache = c.borrow_mut();
            if cache.0 != bytes {
                cache.1 = std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|s| uuid::Uuid::try_parse(s).ok())
                    .map(|u| u.into_bytes());
                cache.0.clear();
                cache.0.extend_from_slice(bytes);
            }
            cache.1
        })
    })
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
    if let Some(b) = current_org_uuid() {
        return pgrx::Uuid::from_bytes(b);
    }
    current_org().ok_or(TenancyError::NoTenant).or_raise();
    TenancyError::MalformedTenant {
        reason: "the current tenant id is not a UUID; use tenancy.require_org_text()".into(),
    }
    .report()
}

/// The current tenant as text, or an error when none is set.
#[pg_extern(stable, parallel_safe)]
fn require_org_text() -> String {
    current_org().ok_or(TenancyError::NoTenant).or_raise()
}

/// The application actor given to `set_org` in this transaction, or NULL.
#[pg_extern(stable, parallel_restricted)]
fn current_actor() -> Option<String> {
    CONTEXT
        .with(|c| c.borrow().as_ref().map(|ctx| ctx.actor.clone()))
        .unwrap_or_else(|| crate::citus::installed_context().and_then(|h| h.actor))
}

/// Whether this transaction's context was proven by a signed token (signed mode).
#[pg_extern(stable, parallel_restricted)]
fn context_is_signed() -> bool {
    CONTEXT
        .with(|c| c.borrow().as_ref().map(|ctx| ctx.signed))
        .unwrap_or_else(|| crate::citus::installed_context().is_some_and(|h| h.signed))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    const A: &str = "11111111-1111-4111-8111-111111111111";

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

    /// The same tenant again is accepted; another tenant in the same transaction is refused
    /// with its own message (each statement checked on its own, so the test cannot pass
    /// because an earlier one failed).
    #[pg_test]
    fn test_second_tenant_in_one_transaction_raises() {
        let set = |org: &str| Spi::get_one::<String>(&format!("SELECT tenancy.set_org('{org}')"));
        assert_eq!(set(A).unwrap().as_deref(), Some(A));
        assert_eq!(set(A).unwrap().as_deref(), Some(A), "the same tenant again");
        let refused = pgrx::PgTryBuilder::new(|| {
            set("22222222-2222-4222-8222-222222222222").unwrap();
            None
        })
        .catch_others(|e| match e {
            pgrx::pg_sys::panic::CaughtError::PostgresError(r) => Some(r.message().to_string()),
            _ => Some("not a Postgres error".into()),
        })
        .execute();
        assert_eq!(
            refused.as_deref(),
            Some("a different tenant context is already set in this transaction")
        );
        assert_eq!(
            crate::context::current_org().as_deref(),
            Some(A),
            "still the first tenant"
        );
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
