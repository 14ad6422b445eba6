//! The PHI functions of SQL: `phi_encrypt`, `phi_reveal*`, `phi_rotate*`, `phi_key_id`,
//! `phi_is_envelope`, `phi_key_status`, for the tenant of the current transaction (the cipher
//! core is [`crate::crypto`]). Every reveal is noted for the audit trail ([`crate::reveal_log`])
//! and refused while a command computes values it would store at rest.

use crate::crypto::{decrypt_for, encrypt_for, envelope, envelope::Content, phi_error};
use crate::error::{Raise, Result, TenancyError};
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    /// Inside ANALYZE, VACUUM, CREATE INDEX, REINDEX or CLUSTER: commands that would store
    /// the values they compute (statistics, index entries) at rest.
    static IN_STORING_COMMAND: Cell<bool> = const { Cell::new(false) };
}

/// True while a command runs that stores computed values at rest (statistics, indexes): PHI
/// must not be revealed there.
pub(crate) fn in_storing_command() -> bool {
    IN_STORING_COMMAND.with(Cell::get)
}

/// Marks [`in_storing_command`] for the duration of a utility statement, if it is one.
pub(crate) struct StoringCommand(Option<bool>);

impl StoringCommand {
    /// # Safety
    /// `pstmt` is the utility statement ProcessUtility was given.
    pub(crate) unsafe fn enter(pstmt: *mut pg_sys::PlannedStmt) -> Self {
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

/// End of the transaction: no command is running any more.
pub(crate) fn at_xact_end(_end: crate::xact::End) {
    IN_STORING_COMMAND.with(|f| f.set(false));
}

fn tenant() -> Result<String> {
    crate::context::current_org().ok_or(TenancyError::NoTenant)
}

fn reveal(env: &[u8], want: Content, label: Option<&str>) -> Vec<u8> {
    // ANALYZE would keep revealed values in pg_statistic, CREATE INDEX in the index.
    if in_storing_command() {
        TenancyError::PhiWhileStoring.report();
    }
    let org = tenant().or_raise();
    // No reveal without its record: refuse when it could not be audited.
    crate::reveal_log::check_reveal_allowed(&org, label).or_raise();
    let (_, plain) = decrypt_for(&org, env, Some(want), label).or_raise();
    crate::reveal_log::note(&org, label);
    plain
}

/// Encrypts a text value for the current tenant. NULL in, NULL out.
#[pg_extern(volatile, parallel_restricted, name = "phi_encrypt")]
fn phi_encrypt(value: Option<&str>, label: default!(Option<&str>, "NULL")) -> Option<Vec<u8>> {
    let value = value?;
    let org = tenant().or_raise();
    Some(encrypt_for(&org, Content::Text, label, value.as_bytes()).or_raise())
}

/// Encrypts a bytea value for the current tenant. NULL in, NULL out.
#[pg_extern(volatile, parallel_restricted, name = "phi_encrypt")]
fn phi_encrypt_bytea(
    value: Option<&[u8]>,
    label: default!(Option<&str>, "NULL"),
) -> Option<Vec<u8>> {
    let value = value?;
    let org = tenant().or_raise();
    Some(encrypt_for(&org, Content::Bytea, label, value).or_raise())
}

/// Encrypts a jsonb value for the current tenant. NULL in, NULL out.
///
/// The envelope holds the value's text form as `jsonb_out` writes it (keys in jsonb's order,
/// numbers exactly as stored): read through the argument's raw datum, since pgrx's `JsonB`
/// goes through serde_json's f64 numbers and lost digits of medical record numbers.
#[pg_extern(
    volatile,
    parallel_restricted,
    name = "phi_encrypt",
    sql = r#"
CREATE FUNCTION tenancy."phi_encrypt"("value" jsonb, "label" TEXT DEFAULT NULL) RETURNS bytea
VOLATILE PARALLEL RESTRICTED
LANGUAGE c AS 'MODULE_PATHNAME', 'phi_encrypt_jsonb_wrapper';
"#
)]
fn phi_encrypt_jsonb(fcinfo: pg_sys::FunctionCallInfo) -> Option<Vec<u8>> {
    // SAFETY: called by Postgres with this function's two arguments (jsonb, text).
    let (value, label) = unsafe {
        (
            pgrx::fcinfo::pg_getarg_datum(fcinfo, 0),
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 1),
        )
    };
    let value = value?;
    let org = tenant().or_raise();
    let plain = zeroize::Zeroizing::new(crate::jsonb::jsonb_text(value));
    Some(encrypt_for(&org, Content::Jsonb, label, &plain).or_raise())
}

/// What a text envelope may hold: a value PostgreSQL can return as `text` in a UTF-8
/// database (valid UTF-8, no NUL byte). Envelopes written by other code may hold anything;
/// the message names the problem, never the bytes.
pub(crate) fn check_text(plain: &[u8]) -> Result<&str> {
    let text = std::str::from_utf8(plain).map_err(|_| TenancyError::PhiInvalidText {
        reason: "the plaintext is not valid UTF-8",
    })?;
    if text.contains('\0') {
        return Err(TenancyError::PhiInvalidText {
            reason: "the plaintext contains a NUL byte, which text values cannot hold",
        });
    }
    Ok(text)
}

/// Parses the text form held by a jsonb envelope with jsonb_in. Its own errors would quote
/// the plaintext ("Token "..." is invalid"): they are caught and replaced by one without it.
pub(crate) fn parse_jsonb(plain: &[u8]) -> Result<pg_sys::Datum> {
    let text = check_text(plain).map_err(|_| TenancyError::PhiInvalidJson)?;
    let c = zeroize::Zeroizing::new(
        std::ffi::CString::new(text)
            .map_err(|_| TenancyError::PhiInvalidJson)?
            .into_bytes_with_nul(),
    );
    let ptr = c.as_ptr() as usize;
    pgrx::PgTryBuilder::new(move || {
        // SAFETY: `ptr` is a NUL-terminated C string alive for the call (owned by `c`).
        unsafe {
            pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(pg_sys::Datum::from(ptr))])
        }
    })
    .catch_others(|_| None)
    .execute()
    .ok_or(TenancyError::PhiInvalidJson)
}

/// Decrypts a text envelope of the current tenant. NULL in, NULL out. Never IMMUTABLE.
#[pg_extern(stable, parallel_restricted)]
fn phi_reveal(env: Option<&[u8]>, label: default!(Option<&str>, "NULL")) -> Option<String> {
    let plain = zeroize::Zeroizing::new(reveal(env?, Content::Text, label));
    Some(check_text(&plain).or_raise().to_string())
}

/// Decrypts a bytea envelope of the current tenant.
#[pg_extern(stable, parallel_restricted)]
fn phi_reveal_bytea(env: Option<&[u8]>, label: default!(Option<&str>, "NULL")) -> Option<Vec<u8>> {
    Some(reveal(env?, Content::Bytea, label))
}

/// Decrypts a jsonb envelope of the current tenant: the value exactly as encrypted.
#[pg_extern(
    stable,
    parallel_restricted,
    sql = r#"
CREATE FUNCTION tenancy."phi_reveal_jsonb"("env" bytea, "label" TEXT DEFAULT NULL) RETURNS jsonb
STABLE PARALLEL RESTRICTED
LANGUAGE c AS 'MODULE_PATHNAME', 'phi_reveal_jsonb_wrapper';
"#
)]
fn phi_reveal_jsonb(fcinfo: pg_sys::FunctionCallInfo) -> Option<pgrx::Internal> {
    // SAFETY: called by Postgres with this function's two arguments (bytea, text).
    let (env, label) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<&[u8]>(fcinfo, 0),
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 1),
        )
    };
    let plain = zeroize::Zeroizing::new(reveal(env?, Content::Jsonb, label));
    Some(pgrx::Internal::from(Some(parse_jsonb(&plain).or_raise())))
}

/// Re-encrypts an envelope of the current tenant under the active key (same type and label).
#[pg_extern(volatile, parallel_restricted)]
fn phi_rotate(env: Option<&[u8]>, label: default!(Option<&str>, "NULL")) -> Option<Vec<u8>> {
    let org = tenant().or_raise();
    Some(rotate_for(&org, env?, label).or_raise())
}

fn rotate_for(org: &str, env: &[u8], label: Option<&str>) -> Result<Vec<u8>> {
    let (content, plain) = decrypt_for(org, env, None, label)?;
    let plain = zeroize::Zeroizing::new(plain);
    encrypt_for(org, content, label, &plain)
}

/// Re-encrypts an envelope for the tenant given explicitly (used by the batched column
/// rotation, which runs as superuser across tenants). Returns ciphertext only. Superuser.
#[pg_extern(volatile, parallel_restricted)]
fn phi_rotate_for_tenant(
    env: Option<&[u8]>,
    org: Option<&str>,
    label: default!(Option<&str>, "NULL"),
) -> Option<Vec<u8>> {
    // SAFETY: superuser() only reads the current role.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::SuperuserOnly {
            what: "phi_rotate_for_tenant",
        }
        .report();
    }
    let org = org.ok_or(TenancyError::NullTenant).or_raise();
    Some(rotate_for(org, env?, label).or_raise())
}

/// The key id an envelope was sealed with (header only, no key needed).
#[pg_extern(immutable, strict, parallel_safe)]
fn phi_key_id(env: &[u8]) -> i64 {
    i64::from(
        envelope::parse_header(env)
            .map_err(phi_error)
            .or_raise()
            .key_id,
    )
}

/// Whether a value is a well-formed PHI envelope (header check only). Used by the
/// `tenancy.phi` domain to refuse plaintext written by mistake.
#[pg_extern(immutable, strict, parallel_safe)]
fn phi_is_envelope(value: &[u8]) -> bool {
    envelope::parse_header(value).is_ok()
}

/// Which PHI keys are loaded, which is active, and whether the ring loaded: never key bytes.
#[pg_extern(volatile, parallel_restricted)]
fn phi_key_status() -> TableIterator<
    'static,
    (
        name!(key_id, Option<i64>),
        name!(active, bool),
        name!(status, String),
    ),
> {
    TableIterator::new(crate::crypto::key_status())
}
