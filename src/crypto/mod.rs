//! PHI column encryption: `phi_encrypt` / `phi_reveal` with AES-256-GCM, envelopes bound to
//! the tenant (and optionally a column label), keys from a server-side key ring file that no
//! SQL user can read.
//!
//! * [`envelope`]: the byte format (documented in docs/phi.md).
//! * [`keyring`]: the key ring file format and its check values.
//!
//! The key ring is loaded by the assign hook of `tenancy.phi_key_file`: in the postmaster at
//! start (backends inherit it) and in every backend on reload. Only when the library was
//! preloaded; otherwise every PHI function raises.

pub mod envelope;
pub mod keyring;

use crate::error::{Raise, Result, TenancyError};
use crate::preload::{is_preloaded, require_preload};
use envelope::{Content, EnvelopeError};
use keyring::KeyRing;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

/// Longest accepted context label.
pub const MAX_LABEL_LEN: usize = 255;

enum RingState {
    NotConfigured,
    Loaded { path: String, ring: Rc<KeyRing> },
    Failed { path: String, problem: String },
}

thread_local! {
    static RING: RefCell<RingState> = const { RefCell::new(RingState::NotConfigured) };
}

/// Assign hook of `tenancy.phi_key_file`: (re)loads the key ring. Assign hooks must not
/// fail, so a bad file leaves the ring in a failed state that every PHI call reports.
#[pg_guard]
pub unsafe extern "C-unwind" fn phi_key_file_assigned(
    newval: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    if !is_preloaded() {
        return;
    }
    let path = if newval.is_null() {
        String::new()
    } else {
        std::ffi::CStr::from_ptr(newval)
            .to_string_lossy()
            .trim()
            .to_string()
    };
    let state = load(&path);
    if let RingState::Failed { path, problem } = &state {
        // No key bytes in here: problems name files, lines and ids only.
        pgrx::log!("pg_tenancy: PHI key ring \"{path}\" not loaded: {problem}");
    }
    RING.with(|r| *r.borrow_mut() = state);
}

fn load(path: &str) -> RingState {
    if path.is_empty() {
        return RingState::NotConfigured;
    }
    let loaded = crate::keyfile::read_secret_file(path)
        .map_err(|p| p.0)
        .and_then(|bytes| {
            let text =
                std::str::from_utf8(&bytes).map_err(|_| "the key ring must be text".to_string())?;
            keyring::parse(text)
        });
    match loaded {
        Ok(ring) => RingState::Loaded {
            path: path.to_string(),
            ring: Rc::new(ring),
        },
        Err(problem) => RingState::Failed {
            path: path.to_string(),
            problem,
        },
    }
}

fn ring() -> Result<Rc<KeyRing>> {
    require_preload();
    RING.with(|r| match &*r.borrow() {
        RingState::Loaded { ring, .. } => Ok(ring.clone()),
        RingState::NotConfigured => Err(TenancyError::PhiNotConfigured),
        RingState::Failed { path, problem } => Err(TenancyError::PhiKeyFile {
            path: path.clone(),
            reason: problem.clone(),
        }),
    })
}

/// Reads the loaded key ring's file again, at most once a second per backend; installs and
/// returns the new ring when it loads (a file that fails to load leaves the old ring).
fn reread_for_unknown_key() -> Option<Rc<KeyRing>> {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    let now = std::time::Instant::now();
    if LAST.with(|l| {
        l.get()
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1))
    }) {
        return None;
    }
    LAST.with(|l| l.set(Some(now)));
    let path = RING.with(|r| match &*r.borrow() {
        RingState::Loaded { path, .. } => Some(path.clone()),
        _ => None,
    })?;
    match load(&path) {
        RingState::Loaded { path, ring } => {
            RING.with(|r| {
                *r.borrow_mut() = RingState::Loaded {
                    path,
                    ring: ring.clone(),
                }
            });
            Some(ring)
        }
        _ => None,
    }
}

fn check_label(label: Option<&str>) -> Result<()> {
    match label {
        Some(l) if l.is_empty() || l.len() > MAX_LABEL_LEN => Err(TenancyError::PhiBadLabel),
        _ => Ok(()),
    }
}

fn tenant() -> Result<String> {
    crate::context::current_org().ok_or(TenancyError::NoTenant)
}

/// Random bytes from the OS CSPRNG, fetched 4 KiB at a time: one getrandom() call per value
/// was a fifth of phi_encrypt's time (measured with perf). The buffer belongs to one process:
/// it records its pid and is thrown away if a fork ever hands it to another, so no two
/// processes can draw the same nonce (Postgres sets `MyProcPid` in every process it forks;
/// reading it costs nothing, unlike getpid()).
struct NoncePool {
    pid: i32,
    bytes: Box<[u8; 4096]>,
    used: usize,
}

thread_local! {
    static NONCES: RefCell<Option<NoncePool>> = const { RefCell::new(None) };
}

fn fresh_nonce() -> [u8; 12] {
    NONCES.with(|cell| {
        let mut slot = cell.borrow_mut();
        // SAFETY: a plain read of a process-global integer.
        let pid = unsafe { pg_sys::MyProcPid };
        let stale = match slot.as_ref() {
            Some(p) => p.pid != pid || p.used + 12 > p.bytes.len(),
            None => true,
        };
        if stale {
            let mut bytes = Box::new([0u8; 4096]);
            // The OS CSPRNG failing is not recoverable; refusing to encrypt is the only safe answer.
            getrandom::getrandom(&mut bytes[..]).expect("the OS random number generator failed");
            *slot = Some(NoncePool {
                pid,
                bytes,
                used: 0,
            });
        }
        let pool = slot.as_mut().expect("filled just above");
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&pool.bytes[pool.used..pool.used + 12]);
        // Drawn bytes are wiped so a later memory disclosure cannot replay them.
        pool.bytes[pool.used..pool.used + 12].fill(0);
        pool.used += 12;
        nonce
    })
}

/// Encrypts under the active key for `tenant` (explicit; callers decide where it comes from).
pub fn encrypt_for(
    tenant: &str,
    content: Content,
    label: Option<&str>,
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    check_label(label)?;
    let ring = ring()?;
    let key = &ring.keys[&ring.active];
    Ok(envelope::seal(
        &key.cipher,
        ring.active,
        fresh_nonce(),
        content,
        tenant,
        label,
        plaintext,
    ))
}

/// Decrypts an envelope for `tenant`, checking it holds `want` (any type when `None`).
pub fn decrypt_for(
    tenant: &str,
    env: &[u8],
    want: Option<Content>,
    label: Option<&str>,
) -> Result<(Content, Vec<u8>)> {
    check_label(label)?;
    let header = envelope::parse_header(env).map_err(phi_error)?;
    if let Some(want) = want.filter(|w| *w != header.content) {
        return Err(TenancyError::PhiWrongType {
            found: header.content.name(),
            want: want.name(),
        });
    }
    let mut ring = ring()?;
    if !ring.keys.contains_key(&header.key_id) {
        // A key added to the ring file since this backend last read it: a rotation writes
        // envelopes under the new key while transactions that began before the reload signal
        // are still running here. Read the file again (at most once a second) before failing.
        if let Some(fresh) = reread_for_unknown_key() {
            ring = fresh;
        }
    }
    let key = ring
        .keys
        .get(&header.key_id)
        .ok_or(TenancyError::PhiUnknownKey {
            key_id: header.key_id,
        })?;
    let plain = envelope::open(&key.cipher, env, &header, tenant, label).map_err(phi_error)?;
    Ok((header.content, plain))
}

fn phi_error(e: EnvelopeError) -> TenancyError {
    match e {
        EnvelopeError::Malformed(reason) => TenancyError::PhiMalformed { reason },
        EnvelopeError::Authentication => TenancyError::PhiAuthentication,
    }
}

fn reveal(env: &[u8], want: Content, label: Option<&str>) -> Vec<u8> {
    // ANALYZE would keep revealed values in pg_statistic, CREATE INDEX in the index.
    if crate::context::in_storing_command() {
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
    // SAFETY: `value` is a non-NULL jsonb datum; jsonb_out returns a palloc'd C string.
    let text = unsafe {
        let out = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(value)])
            .expect("jsonb_out returns a string");
        std::ffi::CStr::from_ptr(out.cast_mut_ptr::<std::ffi::c_char>())
    };
    let plain = zeroize::Zeroizing::new(text.to_bytes().to_vec());
    Some(encrypt_for(&org, Content::Jsonb, label, &plain).or_raise())
}

/// What a text envelope may hold: a value PostgreSQL can return as `text` in a UTF-8
/// database (valid UTF-8, no NUL byte). Envelopes written by other code may hold anything;
/// the message names the problem, never the bytes.
pub fn check_text(plain: &[u8]) -> Result<&str> {
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
pub fn parse_jsonb(plain: &[u8]) -> Result<pg_sys::Datum> {
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
    require_preload();
    let rows = RING.with(|r| match &*r.borrow() {
        RingState::NotConfigured => vec![(
            None,
            false,
            "no key ring configured (tenancy.phi_key_file is empty)".to_string(),
        )],
        RingState::Failed { path, problem } => vec![(
            None,
            false,
            format!("key ring \"{path}\" failed to load: {problem}"),
        )],
        RingState::Loaded { ring, path } => ring
            .keys
            .keys()
            .map(|id| {
                (
                    Some(i64::from(*id)),
                    *id == ring.active,
                    format!("loaded from \"{path}\", check value verified"),
                )
            })
            .collect(),
    });
    TableIterator::new(rows)
}
