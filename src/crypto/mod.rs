//! PHI column encryption: `phi_encrypt` / `phi_reveal` with AES-256-GCM, envelopes bound to
//! the tenant (and optionally a column label), keys from a server-side key ring file that no
//! SQL user can read.
//!
//! * [`envelope`]: the byte format (documented in docs/phi.md).
//! * [`keyring`]: the key ring file format and its check values.
//!
//! This module is the cipher core (key ring state, nonces, seal and open for an explicit
//! tenant); the SQL functions are in [`crate::phi`].
//!
//! The key ring is loaded by the assign hook of `tenancy.phi_key_file`: in the postmaster at
//! start (backends inherit it) and in every backend on reload. Only when the library was
//! preloaded; otherwise every PHI function raises.

pub(crate) mod envelope;
pub(crate) mod keyring;

use crate::error::{Result, TenancyError};
use crate::preload::{is_preloaded, require_preload};
use envelope::{Content, EnvelopeError};
use keyring::KeyRing;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

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
pub(crate) unsafe extern "C-unwind" fn phi_key_file_assigned(
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
    random_bytes::<12>()
}

/// `N` (at most 4,096) bytes from the OS CSPRNG, drawn from this process's pool.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    NONCES.with(|cell| {
        let mut slot = cell.borrow_mut();
        // SAFETY: a plain read of a process-global integer.
        let pid = unsafe { pg_sys::MyProcPid };
        let stale = match slot.as_ref() {
            Some(p) => p.pid != pid || p.used + N > p.bytes.len(),
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
        let mut out = [0u8; N];
        out.copy_from_slice(&pool.bytes[pool.used..pool.used + N]);
        // Drawn bytes are wiped so a later memory disclosure cannot replay them.
        pool.bytes[pool.used..pool.used + N].fill(0);
        pool.used += N;
        out
    })
}

/// Encrypts under the active key for `tenant` (explicit; callers decide where it comes from).
pub(crate) fn encrypt_for(
    tenant: &str,
    content: Content,
    label: Option<&str>,
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    crate::ids::check_label(label)?;
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

/// The id of the active key (the ring loaded, or the error saying why not).
pub(crate) fn active_key_id() -> Result<u32> {
    Ok(ring()?.active)
}

/// Decrypts an envelope for `tenant`, checking it holds `want` (any type when `None`).
pub(crate) fn decrypt_for(
    tenant: &str,
    env: &[u8],
    want: Option<Content>,
    label: Option<&str>,
) -> Result<(Content, Vec<u8>)> {
    crate::ids::check_label(label)?;
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

pub(crate) fn phi_error(e: EnvelopeError) -> TenancyError {
    match e {
        EnvelopeError::Malformed(reason) => TenancyError::PhiMalformed { reason },
        EnvelopeError::Authentication => TenancyError::PhiAuthentication,
    }
}

/// Which PHI keys are loaded, which is active, and whether the ring loaded: never key bytes.
pub(crate) fn key_status() -> Vec<(Option<i64>, bool, String)> {
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
    rows
}
