//! PHI reveals on record even when the revealing transaction rolls back.
//!
//! A transactional INSERT would vanish with a ROLLBACK, yet the plaintext has already left
//! the database. So at the end of every transaction that revealed PHI (commit or abort) the
//! backend puts one record per (tenant, label) with its count into a queue in shared memory,
//! and a background worker connected to `tenancy.audit_database` writes each as a `REVEAL`
//! event into `tenancy.audit_events` in its own transaction. Reveals are refused in other
//! databases and when no audit database is configured (fail closed).
//!
//! This module is the queue; [`crate::reveal_worker`] is the worker.
//!
//! Limits: the queue lives in shared memory, so records not yet written are lost if the
//! server crashes; a full queue refuses further reveals until the worker catches up.

use crate::error::TenancyError;
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// Room for bursts: 16 pooled clients revealing in every transaction filled 512 slots under
/// load (the hostile suite's soak on PG 13, with the worker polling every 100 ms); 2,048
/// records are about 1.4 MB of shared memory.
const QUEUE_LEN: usize = 2048;
/// Distinct (tenant, label) records one transaction may hold: one transaction cannot take
/// more than an eighth of the queue from everyone else's reveals.
const RECORDS_PER_XACT: usize = QUEUE_LEN / 8;
const ORG_MAX: usize = crate::ids::MAX_ID_LEN;
const LABEL_MAX: usize = crate::ids::MAX_LABEL_LEN;
const ROLE_MAX: usize = 64;

/// A short string in shared memory.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Fixed<const N: usize> {
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

    pub(crate) fn get(&self) -> Option<String> {
        self.present
            .then(|| String::from_utf8_lossy(&self.bytes[..self.len as usize]).into_owned())
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
/// One (tenant, label) of one transaction: how many reveals, by whom, when.
pub(crate) struct RevealRecord {
    pub(crate) org: Fixed<ORG_MAX>,
    pub(crate) label: Fixed<LABEL_MAX>,
    pub(crate) actor: Fixed<ORG_MAX>,
    pub(crate) session_role: Fixed<ROLE_MAX>,
    pub(crate) outer_role: Fixed<ROLE_MAX>,
    pub(crate) actor_verified: bool,
    pub(crate) committed: bool,
    pub(crate) count: u64,
    pub(crate) at: i64,
    pub(crate) xid: u64,
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
pub(crate) struct RevealQueue {
    len: usize,
    /// Slots promised to records of transactions still running: a record gets its slot
    /// before its first reveal, so the end of the transaction always finds room.
    reserved: usize,
    records: [RevealRecord; QUEUE_LEN],
}

impl Default for RevealQueue {
    fn default() -> Self {
        Self {
            len: 0,
            reserved: 0,
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

/// Sets up the shared queue; only from `_PG_init` under preload.
pub(crate) fn init() {
    if !crate::preload::is_preloaded() {
        return;
    }
    pgrx::pg_shmem_init!(QUEUE);
}

/// A copy of the queued records, oldest first (for the worker).
pub(crate) fn queued() -> Vec<RevealRecord> {
    let q = QUEUE.share();
    q.records[..q.len].to_vec()
}

/// Removes the `n` oldest records, once the worker has written and committed them (new
/// records may have been queued meanwhile).
pub(crate) fn remove_oldest(n: usize) {
    let mut q = QUEUE.exclusive();
    let n = n.min(q.len);
    let len = q.len;
    q.records.copy_within(n..len, 0);
    q.len -= n;
}

/// Checks that a reveal of `label` for `org` may happen here: an audit database is configured,
/// this is it, and the reveal's record has its slot in the queue. A record of this
/// transaction for the same tenant and label already holds one; a new record takes (reserves)
/// one now, before anything is revealed, or the reveal is refused: the queue full, or this
/// transaction holding [`RECORDS_PER_XACT`] records already.
pub(crate) fn check_reveal_allowed(org: &str, label: Option<&str>) -> Result<(), TenancyError> {
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
    let label = label.unwrap_or("");
    let counted = with_key(org, label, |key| {
        PENDING.with(|p| p.borrow().contains_key(key))
    });
    if counted {
        return Ok(());
    }
    if PENDING.with(|p| p.borrow().len()) >= RECORDS_PER_XACT {
        return Err(TenancyError::RevealNotAudited {
            reason: format!(
                "this transaction already revealed under {RECORDS_PER_XACT} distinct labels, the most one transaction may"
            ),
        });
    }
    {
        let mut q = QUEUE.exclusive();
        if q.len + q.reserved >= QUEUE_LEN {
            return Err(TenancyError::RevealNotAudited {
                reason: "the reveal queue is full".into(),
            });
        }
        q.reserved += 1;
    }
    // The record exists from now on (count 0 until the reveal succeeds), so the end of the
    // transaction gives its slot back whatever happens next.
    PENDING.with(|p| {
        let who = crate::audit::writer::Who::current();
        // SAFETY: a plain read of the transaction id (0 when none is assigned yet).
        let xid = unsafe { u32::from(pg_sys::GetTopTransactionIdIfAny()) } as u64;
        p.borrow_mut().insert(
            format!("{org}\0{label}"),
            RevealRecord {
                org: Fixed::from(Some(org)),
                label: Fixed::from(Some(label)),
                actor: Fixed::from(who.actor.as_deref()),
                session_role: Fixed::from(Some(&who.session_role)),
                outer_role: Fixed::from(Some(&who.outer_role)),
                actor_verified: who.actor_verified,
                committed: false,
                count: 0,
                at: who.occurred_at,
                xid,
            },
        );
    });
    Ok(())
}

/// Counts one reveal of `label` for `org` in the current transaction (its record was made
/// by [`check_reveal_allowed`]).
pub(crate) fn note(org: &str, label: Option<&str>) {
    let label = label.unwrap_or("");
    with_key(org, label, |key| {
        PENDING.with(|p| {
            if let Some(r) = p.borrow_mut().get_mut(key) {
                r.count += 1;
            }
        })
    });
}

/// End of the transaction: its reveal records go to the shared queue, marked committed or
/// not (a rolled-back reveal still happened). Touches no catalog.
pub(crate) fn at_xact_end(end: crate::xact::End) {
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
        // Every record holds a reserved slot (len + reserved never exceeds the queue).
        q.reserved = q.reserved.saturating_sub(1);
        if record.count == 0 {
            continue; // refused or failed before anything was revealed
        }
        if q.len >= QUEUE_LEN {
            pgrx::warning!(
                "pg_tenancy: reveal queue full at transaction end; a reveal record was dropped"
            );
            continue;
        }
        record.committed = committed;
        let i = q.len;
        q.records[i] = record;
        q.len += 1;
    }
}
