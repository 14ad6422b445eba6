//! PHI reveals on record even when the revealing transaction rolls back.
//!
//! A transactional INSERT would vanish with a ROLLBACK, yet the plaintext has already left
//! the database. So at the end of every transaction that revealed PHI (commit or abort) the
//! backend puts one record per (tenant, label) with its count into a queue in shared memory,
//! and a background worker connected to `tenancy.audit_database` writes each as a `REVEAL`
//! event into `tenancy.audit_events` in its own transaction. Reveals are refused in other
//! databases and when no audit database is configured (fail closed).
//!
//! Limits: the queue lives in shared memory, so records not yet written are lost if the
//! server crashes; a full queue refuses further reveals until the worker catches up.

use crate::error::TenancyError;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

/// Room for bursts: 16 pooled clients revealing in every transaction filled 512 slots under
/// load (the hostile suite's soak on PG 13, with the worker polling every 100 ms); 2,048
/// records are about 1.4 MB of shared memory.
/// Settings the worker pins over whatever the database's owner set for the database: it runs
/// as itself, its SQL resolves names in the catalogs only, is not cut short, and commits
/// durably.
const WORKER_SETTINGS: &[(&str, &str)] = &[
    // First: `ALTER DATABASE ... SET role = owner` made the worker run as the owner (and fail).
    ("role", "none"),
    ("search_path", "pg_catalog, pg_temp"),
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("default_transaction_read_only", "off"),
    ("default_transaction_isolation", "read committed"),
    ("synchronous_commit", "on"),
];

const QUEUE_LEN: usize = 2048;
/// How often the worker looks at the queue.
const POLL_MS: u64 = 20;
const ORG_MAX: usize = crate::ids::MAX_ID_LEN;
const LABEL_MAX: usize = crate::ids::MAX_LABEL_LEN;
const ROLE_MAX: usize = 64;

/// A short string in shared memory.
#[derive(Clone, Copy)]
#[repr(C)]
struct Fixed<const N: usize> {
    len: u16,
    present: bool,
    bytes: [u8; N],
}

impl<const N: usize> Fixed<N> {
    const NONE: Self = Self {
        len: 0,
        present: false,
        bytes: [0; N],
    };

    fn from(s: Option<&str>) -> Self {
        let mut f = Self::NONE;
        if let Some(s) = s {
            // Ids, labels and role names are validated shorter than N.
            let b = &s.as_bytes()[..s.len().min(N)];
            f.bytes[..b.len()].copy_from_slice(b);
            f.len = b.len() as u16;
            f.present = true;
        }
        f
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    fn get(&self) -> Option<String> {
        self.present
            .then(|| String::from_utf8_lossy(&self.bytes[..self.len as usize]).into_owned())
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct RevealRecord {
    org: Fixed<ORG_MAX>,
    label: Fixed<LABEL_MAX>,
    actor: Fixed<ORG_MAX>,
    session_role: Fixed<ROLE_MAX>,
    outer_role: Fixed<ROLE_MAX>,
    actor_verified: bool,
    committed: bool,
    count: u64,
    at: i64,
    xid: u64,
}

impl RevealRecord {
    const EMPTY: Self = Self {
        org: Fixed::NONE,
        label: Fixed::NONE,
        actor: Fixed::NONE,
        session_role: Fixed::NONE,
        outer_role: Fixed::NONE,
        actor_verified: false,
        committed: false,
        count: 0,
        at: 0,
        xid: 0,
    };
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct RevealQueue {
    len: usize,
    records: [RevealRecord; QUEUE_LEN],
}

impl Default for RevealQueue {
    fn default() -> Self {
        Self {
            len: 0,
            records: [RevealRecord::EMPTY; QUEUE_LEN],
        }
    }
}

// SAFETY: plain old data, no pointers; every access goes through the LWLock.
unsafe impl PGRXSharedMemory for RevealQueue {}

// SAFETY: the lock's name is unique to this library; pg_shmem_init! in init() sets it up.
static QUEUE: PgLwLock<RevealQueue> = unsafe { PgLwLock::new(c"pg_tenancy_reveal_queue") };

thread_local! {
    /// Reveals of the current transaction by (tenant, label), with who and when, built while
    /// the transaction is still valid (no catalog access is possible once it aborts).
    /// Keyed by "tenant NUL label" (looked up through KEY, so a reveal allocates nothing).
    static PENDING: RefCell<BTreeMap<String, RevealRecord>> = const { RefCell::new(BTreeMap::new()) };
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
    /// Whether this backend's database is the audit database: fixed for the backend's life
    /// (a postmaster setting and the connected database), so looked up once.
    static HERE_ALLOWED: RefCell<Option<Result<(), String>>> = const { RefCell::new(None) };
}

/// Runs `f` on the pending-map key of (`org`, `label`), built in a reused buffer.
fn with_key<R>(org: &str, label: &str, f: impl FnOnce(&str) -> R) -> R {
    KEY.with(|k| {
        let mut key = k.borrow_mut();
        key.clear();
        key.push_str(org);
        key.push('\0');
        key.push_str(label);
        f(&key)
    })
}

/// Sets up the shared queue and the worker; only from `_PG_init` under preload.
pub fn init() {
    if !crate::preload::is_preloaded() {
        return;
    }
    pgrx::pg_shmem_init!(QUEUE);
    if crate::gucs::audit_database().is_some() {
        BackgroundWorkerBuilder::new("pg_tenancy reveal audit")
            .set_function("pg_tenancy_reveal_worker_main")
            .set_library("pg_tenancy")
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

/// Checks that a reveal of `label` for `org` may happen here: an audit database is configured,
/// this is it, and the reveal has a place in the queue (a record of this transaction for the
/// same tenant and label already holds one; only a new record needs a free slot).
pub fn check_reveal_allowed(org: &str, label: Option<&str>) -> Result<(), TenancyError> {
    let here = HERE_ALLOWED.with(|h| {
        h.borrow_mut()
            .get_or_insert_with(|| {
                let Some(db) = crate::gucs::audit_database() else {
                    return Err("tenancy.audit_database is not set".to_string());
                };
                // SAFETY: MyDatabaseId is set for every backend connected to a database.
                let here = unsafe {
                    std::ffi::CStr::from_ptr(pg_sys::get_database_name(pg_sys::MyDatabaseId))
                };
                if here.to_bytes() != db.as_bytes() {
                    return Err(format!(
                        "reveal events are written in database \"{db}\" only"
                    ));
                }
                Ok(())
            })
            .clone()
    });
    if let Err(reason) = here {
        return Err(TenancyError::RevealNotAudited { reason });
    }
    let counted = with_key(org, label.unwrap_or(""), |key| {
        PENDING.with(|p| p.borrow().contains_key(key))
    });
    if counted {
        return Ok(());
    }
    let full = QUEUE.share().len >= QUEUE_LEN;
    if full {
        return Err(TenancyError::RevealNotAudited {
            reason: "the reveal queue is full".into(),
        });
    }
    Ok(())
}

/// Counts one reveal of `label` for `org` in the current transaction.
pub fn note(org: &str, label: Option<&str>) {
    let label = label.unwrap_or("");
    let counted = with_key(org, label, |key| {
        PENDING.with(|p| match p.borrow_mut().get_mut(key) {
            Some(r) => {
                r.count += 1;
                true
            }
            None => false,
        })
    });
    if counted {
        return;
    }
    PENDING.with(|p| {
        let mut pending = p.borrow_mut();
        let who = crate::audit::Who::current();
        // SAFETY: a plain read of the transaction id (0 when none is assigned yet).
        let xid = unsafe { u32::from(pg_sys::GetTopTransactionIdIfAny()) } as u64;
        pending.insert(
            format!("{org}\0{label}"),
            RevealRecord {
                org: Fixed::from(Some(org)),
                label: Fixed::from(Some(label)),
                actor: Fixed::from(who.actor.as_deref()),
                session_role: Fixed::from(Some(&who.session_role)),
                outer_role: Fixed::from(Some(&who.outer_role)),
                actor_verified: who.actor_verified,
                committed: false,
                count: 1,
                at: who.occurred_at,
                xid,
            },
        );
    });
}

/// End of the transaction: its reveal records go to the shared queue, marked committed or
/// not (a rolled-back reveal still happened). Touches no catalog.
pub fn at_xact_end(end: crate::xact::End) {
    match end {
        crate::xact::End::Commit => flush(true),
        crate::xact::End::Abort => flush(false),
        crate::xact::End::ParallelWorker => {}
    }
}

fn flush(committed: bool) {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if pending.is_empty() || !crate::preload::is_preloaded() {
        return;
    }
    let mut q = QUEUE.exclusive();
    for (_, mut record) in pending {
        if q.len >= QUEUE_LEN {
            // check_reveal_allowed refuses reveals once full; concurrent flushes can still fill it.
            pgrx::log!("pg_tenancy: reveal queue full; a reveal record was dropped");
            break;
        }
        record.committed = committed;
        let i = q.len;
        q.records[i] = record;
        q.len += 1;
    }
}

/// The worker: writes queued reveal records as audit events, oldest first.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_reveal_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = crate::gucs::audit_database().unwrap_or_else(|| "postgres".into());
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    // The worker is a superuser session in a database whose owner may have set anything a
    // database owner can (ALTER DATABASE ... SET): it pins what its SQL depends on, above all
    // a search_path of the catalogs only (an owner's schema with a shadowing `=` must not run
    // as superuser here).
    BackgroundWorker::transaction(|| {
        for (name, value) in WORKER_SETTINGS {
            Spi::get_one_with_args::<String>(
                "SELECT pg_catalog.set_config($1, $2, false)",
                &[(*name).into(), (*value).into()],
            )
            .unwrap_or_else(|e| {
                TenancyError::spi("setting the reveal worker's settings", e).report()
            });
        }
    });
    while BackgroundWorker::wait_latch(Some(Duration::from_millis(POLL_MS))) {
        let batch: Vec<RevealRecord> = {
            let q = QUEUE.share();
            q.records[..q.len].to_vec()
        };
        if batch.is_empty() {
            continue;
        }
        let ready = BackgroundWorker::transaction(|| {
            Spi::get_one::<bool>(
                "SELECT pg_catalog.to_regclass('tenancy.audit_events') IS NOT NULL",
            )
            .ok()
            .flatten()
            .unwrap_or(false)
        });
        if !ready {
            continue; // the extension is not installed in this database yet
        }
        // Tenant by tenant (chain heads in a fixed order), oldest first within each.
        let mut batch = batch;
        batch.sort_by(|a, b| a.org.as_bytes().cmp(b.org.as_bytes()));
        BackgroundWorker::transaction(|| {
            for r in &batch {
                let who = crate::audit::Who {
                    actor: r.actor.get(),
                    actor_verified: r.actor_verified,
                    session_role: r.session_role.get().unwrap_or_default(),
                    outer_role: r.outer_role.get().unwrap_or_default(),
                    occurred_at: r.at,
                };
                let payload = serde_json::json!({
                    "label": r.label.get(),
                    "count": r.count,
                    "transaction": if r.committed { "committed" } else { "rolled back" },
                    "xid": r.xid,
                });
                let label = r.label.get().filter(|l| !l.is_empty());
                crate::audit::append_events(
                    &who,
                    &[crate::audit::NewEvent {
                        org: r.org.get().unwrap_or_default(),
                        action: "REVEAL".into(),
                        table_name: label,
                        row_key: None,
                        changed_columns: None,
                        payload: Some(payload),
                    }],
                );
            }
        });
        // Written and committed: remove exactly what was written (new records may follow).
        let mut q = QUEUE.exclusive();
        let n = batch.len().min(q.len);
        let len = q.len;
        q.records.copy_within(n..len, 0);
        q.len -= n;
    }
}
