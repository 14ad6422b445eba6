//! Every setting pg_tenancy defines, in one place: one private static per setting, one
//! `init()` called from `_PG_init`, and one accessor per setting. A leaf: the assign hooks of
//! the key file settings belong to their owners (token, crypto) and are handed in by lib.rs;
//! `app.current_org_id` is the tenant context's own (context.rs).
//!
//! Security settings hold paths, never key bytes, and are readable by superusers only.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

/// How `tenancy.set_org()` validates tenant ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PostgresGucEnum)]
pub(crate) enum TenantIdFormat {
    /// Tenant ids are UUIDs, stored in canonical lower-case hyphenated form.
    #[name = c"uuid"]
    Uuid,
    /// Tenant ids are opaque text (Better Auth's `organization.id`, for example).
    #[name = c"text"]
    Text,
}

/// What the drift guard does with a new table that has the tenant column in a protected schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PostgresGucEnum)]
pub(crate) enum NewTableAction {
    /// Protect it at creation (default).
    #[name = c"protect"]
    Protect,
    /// Refuse to create it.
    #[name = c"refuse"]
    Refuse,
}

/// `tenancy.new_table_action`: `protect` (default) or `refuse`; superuser-settable.
static NEW_TABLE_ACTION: GucSetting<NewTableAction> =
    GucSetting::<NewTableAction>::new(NewTableAction::Protect);

/// `tenancy.restore_mode`: on while a superuser restores a dump, so the drift guards let
/// pg_restore rebuild protected tables piece by piece. Superuser-only.
static RESTORE_MODE: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `tenancy.tenant_id_format`: `uuid` (default) or `text`. Superuser-settable so a DBA can
/// choose per database (`ALTER DATABASE ... SET`) while the application cannot.
static TENANT_ID_FORMAT: GucSetting<TenantIdFormat> =
    GucSetting::<TenantIdFormat>::new(TenantIdFormat::Uuid);

/// `tenancy.context_key_file`: path of the HMAC key that turns on signed mode for
/// `set_org`. Empty (the default) means signed mode is off. Server-only, superuser-only.
static CONTEXT_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `tenancy.phi_key_file`: path of the PHI key ring. Server-only, superuser-only; read by
/// the postmaster at start and by every backend on reload.
static PHI_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `tenancy.audit_database`: the database whose `tenancy.audit_events` receives PHI reveal
/// events from the background worker. Reveals are refused elsewhere. Postmaster context.
static AUDIT_DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `tenancy.audit_digest_file`: a file outside the data directory to which the sealer appends
/// every tenant's digest line (tenancy.audit_digest()) once per interval. Server-only.
static AUDIT_DIGEST_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `tenancy.audit_digest_interval`: seconds between two digest writes.
static AUDIT_DIGEST_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(3600);

/// A string setting's assign hook, as PostgreSQL calls it.
pub(crate) type AssignHook =
    unsafe extern "C-unwind" fn(*const std::ffi::c_char, *mut std::ffi::c_void);

/// The owners' reactions to a changed key file path.
pub(crate) struct AssignHooks {
    /// `tenancy.context_key_file` changed: forget the loaded HMAC key.
    pub context_key_file: AssignHook,
    /// `tenancy.phi_key_file` changed: load the key ring again.
    pub phi_key_file: AssignHook,
}

/// Registers every setting. Runs in `_PG_init`, before any backend can use one. `preloaded`:
/// whether the postmaster is loading the library (postmaster-context settings need that).
pub(crate) fn init(preloaded: bool, hooks: AssignHooks) {
    GucRegistry::define_enum_guc(
        c"tenancy.tenant_id_format",
        c"How tenancy.set_org() validates tenant ids: uuid or text.",
        c"uuid accepts only UUIDs and stores them in canonical form; text accepts 1 to 128 printable characters without quotes, backslashes or spaces.",
        &TENANT_ID_FORMAT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"tenancy.new_table_action",
        c"What happens to a new table with the tenant column in a protected schema: protect or refuse.",
        c"protect runs tenancy.protect() on it at creation; refuse makes the CREATE fail.",
        &NEW_TABLE_ACTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"tenancy.restore_mode",
        c"Lets a superuser's pg_restore rebuild protected tables: the drift guards stand down in this session.",
        c"Set it for the restoring session only (PGOPTIONS='-c tenancy.restore_mode=on' pg_restore ...), then check SELECT * FROM tenancy.isolation_report().",
        &RESTORE_MODE,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: the assign hook is a `#[pg_guard]`ed function with the signature Postgres expects.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"tenancy.context_key_file",
            c"Path of the HMAC-SHA256 key for signed tenant contexts; empty turns signed mode off.",
            c"A path, never key bytes. The file must belong to the server's OS user and not be readable by group or others. Read again on reload.",
            &CONTEXT_KEY_FILE,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            None,
            Some(hooks.context_key_file),
            None,
        );
    }
    // SAFETY: as above.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"tenancy.phi_key_file",
            c"Path of the PHI key ring file (AES-256 keys with ids, one active).",
            c"A path, never key bytes. The file must belong to the server's OS user and not be readable by group or others. Loaded at start and on reload; see tenancy.phi_key_status().",
            &PHI_KEY_FILE,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            None,
            Some(hooks.phi_key_file),
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"tenancy.audit_digest_file",
        c"File outside the data directory to which the sealer appends every tenant's audit digest line once per interval; empty: none.",
        c"Keep it (or copies of it) where database superusers cannot change it; check with tenancy.audit_verify(org, digest). Read again on reload.",
        &AUDIT_DIGEST_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"tenancy.audit_digest_interval",
        c"Seconds between two digest writes to tenancy.audit_digest_file.",
        c"",
        &AUDIT_DIGEST_INTERVAL,
        1,
        86400 * 7,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    // A postmaster-context setting can only be defined while preloading; loaded any other
    // way, the library refuses to work anyway (preload.rs).
    if preloaded {
        define_audit_database();
    }
    reserve_prefix(c"tenancy");
}

fn define_audit_database() {
    GucRegistry::define_string_guc(
        c"tenancy.audit_database",
        c"Database whose audit trail records PHI reveals (via a background worker); reveals are refused elsewhere.",
        c"Reveal records survive ROLLBACK: a background worker writes them in their own transaction. Requires a restart.",
        &AUDIT_DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

/// Refuses unknown `tenancy.*` settings (typos, placeholders) from PG 15 on; older servers
/// can only warn about them.
fn reserve_prefix(prefix: &CStr) {
    // SAFETY: plain calls into the GUC machinery with a NUL-terminated static string.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        pg_sys::EmitWarningsOnPlaceholders(prefix.as_ptr());
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        pg_sys::MarkGUCPrefixReserved(prefix.as_ptr());
    }
}

/// The current `tenancy.tenant_id_format`.
pub(crate) fn tenant_id_format() -> TenantIdFormat {
    TENANT_ID_FORMAT.get()
}

/// The database that records reveal events, when configured.
pub(crate) fn audit_database() -> Option<String> {
    AUDIT_DATABASE
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.trim().is_empty())
}

/// The digest file and the seconds between two writes, when a file is configured.
pub(crate) fn audit_digest_file() -> Option<(String, i32)> {
    AUDIT_DIGEST_FILE
        .get()
        .map(|s| s.to_string_lossy().trim().to_string())
        .filter(|s| !s.is_empty())
        .map(|f| (f, AUDIT_DIGEST_INTERVAL.get()))
}

/// The configured context key path, or `None` when signed mode is off.
pub(crate) fn context_key_file() -> Option<String> {
    CONTEXT_KEY_FILE
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.trim().is_empty())
}
