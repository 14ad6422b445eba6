//! PHI reveals on record before their plaintext leaves the server, whatever the transaction
//! does next (commit, rollback, PREPARE, a crash).
//!
//! A transactional INSERT would vanish with a ROLLBACK, yet the plaintext has already left.
//! So the first reveal of a (tenant, label) in a transaction puts a record into a queue in
//! shared memory and waits until the reveal worker ([`crate::reveal_worker`], connected to
//! `tenancy.audit_database`) has written it as a `REVEAL` event in a transaction of its own
//! and that commit is durable (the worker commits with `synchronous_commit = on`; concurrent
//! revealers share its flush). Later reveals of the same (tenant, label) in the transaction
//! are counted; at the transaction's end the record is settled (count, committed, rolled
//! back, prepared, or a parallel worker's share) and the worker writes a `REVEAL_END` event.
//! Reveals are refused in other databases and when no audit database is configured (fail
//! closed), and whenever a record cannot be kept (queue full, record refused by the worker):
//! nothing is dropped.
//!
//! This module is the queue; [`crate::reveal_worker`] is the worker.

use crate::error::TenancyError;
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

/// Records in flight: open ones (their transactions running) and settled ones the worker has
/// not written yet; about 1 MB of shared memory. (pgrx builds the initial value on the
/// postmaster's stack, copied by unoptimised builds: 2.8 MB made the test servers fail.)
const QUEUE_LEN: usize = 1024;
/// Distinct (tenant, label) records one transaction may hold: one transaction cannot take
/// more than a quarter of the queue from everyone else's reveals.
const RECORDS_PER_XACT: usize = QUEUE_LEN / 4;
const ORG_MAX: usize = crate::ids::MAX_ID_LEN;
const LABEL_MAX: usize = crate::ids::MAX_LABEL_LEN;
const ROLE_MAX: usize = 64;
/// Long enough for a transaction's GID (PostgreSQL allows 200 bytes).
const GID_MAX: usize = 200;

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
            // Ids, labels, role names and GIDs are validated shorter than N; cut at a
            // character boundary all the same.
            let mut end = s.len().min(N);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            f.bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
            f.len = end as u16;
            f.present = true;
        }
        f
    }

    pub(crate) fn get(&self) -> Option<String> {
        self.present
            .then(|| String::from_utf8_lossy(&self.bytes[..self.len as usize]).into_owned())
    }
}

/// Where a record is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Stage {
    /// Queued by a revealing transaction that waits for its `REVEAL` event.
    Open,
    /// Its `REVEAL` event is committed; the transaction has not ended.
    Written,
    /// The transaction ended; `REVEAL_END` (and `REVEAL` if not written yet) to write.
    Settled,
    /// The worker could not write it: the waiting reveal is refused.
    Refused,
}

/// How the revealing transaction ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Outcome {
    Running,
    Committed,
    RolledBack,
    Prepared,
    /// A parallel worker's share of its leader's transaction.
    ParallelWorker,
}

impl Outcome {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled back",
            Outcome::Prepared => "prepared",
            Outcome::ParallelWorker => "parallel worker",
        }
    }
}

/// What a record is of.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Kind {
    /// PHI revealed under a label.
    Reveal,
    /// A support role read the tenant's decrypted history (`tenancy.audit_history`).
    SupportRead,
    /// COMMIT PREPARED or ROLLBACK PREPARED of a transaction that revealed (its GID and
    /// outcome; the worker settles the prepared records of every tenant).
    PreparedEnd,
}

#[derive(Clone, Copy)]
#[repr(C)]
/// One (tenant, label) of one transaction: how many reveals, by whom, when, from where.
pub(crate) struct RevealRecord {
    /// Unique in the queue's life (the worker finds records again by it).
    pub(crate) id: u64,
    pub(crate) kind: Kind,
    pub(crate) stage: Stage,
    pub(crate) outcome: Outcome,
    /// Whether the `REVEAL` event is committed.
    pub(crate) written: bool,
    pub(crate) org: Fixed<ORG_MAX>,
    pub(crate) label: Fixed<LABEL_MAX>,
    pub(crate) actor: Fixed<ORG_MAX>,
    pub(crate) session_role: Fixed<ROLE_MAX>,
    pub(crate) outer_role: Fixed<ROLE_MAX>,
    pub(crate) gid: Fixed<GID_MAX>,
    /// For a support read: the period read.
    pub(crate) detail: Fixed<96>,
    pub(crate) actor_verified: bool,
    pub(crate) count: u64,
    pub(crate) at: i64,
    pub(crate) xid: u64,
    /// The revealing process (woken when its record is written).
    pub(crate) pid: i32,
    /// The session's start time (with `pid`, the session id `log_line_prefix`'s `%c`
    /// prints) and this record's number in the session: ties the event to the request and
    /// the log. A parallel worker also names its leader's pid.
    pub(crate) session_start: i64,
    pub(crate) leader_pid: i32,
    pub(crate) session_seq: u64,
}

impl RevealRecord {
    const EMPTY: Self = Self {
        id: 0,
        kind: Kind::Reveal,
        stage: Stage::Open,
        outcome: Outcome::Running,
        written: false,
        org: Fixed::NONE,
        label: Fixed::NONE,
        actor: Fixed::NONE,
        session_role: Fixed::NONE,
        outer_role: Fixed::NONE,
        gid: Fixed::NONE,
        detail: Fixed::NONE,
        actor_verified: false,
        count: 0,
        at: 0,
        xid: 0,
        pid: 0,
        session_start: 0,
        leader_pid: 0,
        session_seq: 0,
    };

    /// The session id as `log_line_prefix = '%c'` prints it.
    pub(crate) fn session(&self) -> String {
        format!("{:x}.{:x}", self.session_start, self.pid)
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct RevealQueue {
    len: usize,
    next_id: u64,
    /// The reveal worker's pid (0 while none runs), woken when a record is queued.
    worker_pid: i32,
    /// The sealer's pid (0 while none runs), for the status view.
    sealer_pid: i32,
    /// When the sealer last wrote the digest file (0: never since start).
    digest_at: i64,
    /// Records the worker could not write (refused reveals or lost settlements), since start.
    refused: u64,
    records: [RevealRecord; QUEUE_LEN],
}

impl Default for RevealQueue {
    fn default() -> Self {
        Self {
            len: 0,
            next_id: 1,
            worker_pid: 0,
            sealer_pid: 0,
            digest_at: 0,
            refused: 0,
            records: [RevealRecord::EMPTY; QUEUE_LEN],
        }
    }
}

// SAFETY: plain old data, no pointers; every access goes through the LWLock.
unsafe impl PGRXSharedMemory for RevealQueue {}

// SAFETY: the lock's name is unique to this library; pg_shmem_init! in init() sets it up.
static QUEUE: PgLwLock<RevealQueue> = unsafe { PgLwLock::new(c"pg_tenancy_reveal_queue") };

thread_local! {
    /// This transaction's records by "tenant NUL label" (looked up through KEY, so a reveal
    /// allocates nothing): the queue id and the reveals counted so far.
    static PENDING: RefCell<BTreeMap<String, (u64, u64)>> = const { RefCell::new(BTreeMap::new()) };
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
    /// Whether this backend's database is the audit database: fixed for the backend's life
    /// (a postmaster setting and the connected database), so looked up once.
    static HERE_ALLOWED: RefCell<Option<Result<(), String>>> = const { RefCell::new(None) };
    /// Records this session has queued.
    static SESSION_SEQ: Cell<u64> = const { Cell::new(0) };
    /// The GID of the PREPARE TRANSACTION being run (set by the utility hook).
    static PREPARING: RefCell<Option<String>> = const { RefCell::new(None) };
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

/// What the status view shows of the queue: records in it, records refused since start, the
/// two workers' pids (0 when not running).
pub(crate) fn status() -> (i64, i64, i32, i32, i64) {
    if !crate::preload::is_preloaded() {
        return (0, 0, 0, 0, 0);
    }
    let q = QUEUE.share();
    (
        q.len as i64,
        q.refused as i64,
        q.worker_pid,
        q.sealer_pid,
        q.digest_at,
    )
}

/// The sealer wrote the digest file at `at`.
pub(crate) fn digest_written(at: i64) {
    QUEUE.exclusive().digest_at = at;
}

/// The reveal worker announces itself (its pid, 0 when it exits).
pub(crate) fn set_worker(pid: i32) {
    QUEUE.exclusive().worker_pid = pid;
}

/// The sealer announces itself (its pid, 0 when it exits).
pub(crate) fn set_sealer(pid: i32) {
    QUEUE.exclusive().sealer_pid = pid;
}

/// The records the worker has to write: open ones and settled ones, oldest first.
pub(crate) fn to_write() -> Vec<RevealRecord> {
    let q = QUEUE.share();
    q.records[..q.len]
        .iter()
        .filter(|r| matches!(r.stage, Stage::Open | Stage::Settled))
        .copied()
        .collect()
}

/// After the worker's commit of `written` (the records as it wrote them): an open record is
/// now written (its revealer is woken), a settled one is done and leaves the queue.
pub(crate) fn mark_written(written: &[RevealRecord]) {
    let mut wake = Vec::new();
    {
        let mut q = QUEUE.exclusive();
        for w in written {
            let len = q.len;
            let Some(at) = q.records[..len].iter().position(|r| r.id == w.id) else {
                continue; // its transaction ended without revealing anything
            };
            let r = &mut q.records[at];
            r.written = true;
            match (w.stage, r.stage) {
                (Stage::Open, Stage::Open) => {
                    r.stage = Stage::Written;
                    wake.push(r.pid);
                }
                // Settled meanwhile: its REVEAL is written, its REVEAL_END is next.
                (Stage::Open, _) => {}
                (Stage::Settled, _) => remove(&mut q, at),
                _ => {}
            }
        }
    }
    for pid in wake {
        wake_pid(pid);
    }
}

/// The worker could not write `record`: its revealer (if waiting) is refused, a settled
/// record is given up. Counted in the status view.
pub(crate) fn mark_refused(record: &RevealRecord) {
    let pid = {
        let mut q = QUEUE.exclusive();
        q.refused += 1;
        let len = q.len;
        match q.records[..len].iter().position(|r| r.id == record.id) {
            Some(at) if q.records[at].stage == Stage::Open => {
                q.records[at].stage = Stage::Refused;
                Some(q.records[at].pid)
            }
            Some(at) => {
                remove(&mut q, at);
                None
            }
            None => None,
        }
    };
    if let Some(pid) = pid {
        wake_pid(pid);
    }
}

fn remove(q: &mut RevealQueue, at: usize) {
    let len = q.len;
    q.records.copy_within(at + 1..len, at);
    q.len -= 1;
}

/// Sets the latch of process `pid`, if it is still there.
fn wake_pid(pid: i32) {
    if pid == 0 {
        return;
    }
    // SAFETY: BackendPidGetProc returns NULL for a pid that is not a live backend; a PGPROC
    // stays in shared memory, so setting its latch is safe even if the process just exited.
    unsafe {
        let proc_ = pg_sys::BackendPidGetProc(pid);
        if !proc_.is_null() {
            pg_sys::SetLatch(&mut (*proc_).procLatch);
        }
    }
}

/// The GID of the PREPARE TRANSACTION about to run (from the utility hook).
pub(crate) fn preparing(gid: &str) {
    PREPARING.with(|p| *p.borrow_mut() = Some(gid.to_string()));
}

/// COMMIT PREPARED / ROLLBACK PREPARED `gid` succeeded: queued for the worker, which writes a
/// `REVEAL_END` for every record that transaction left as prepared. Never refused (the
/// reveals are on record already); a full queue is logged and counted.
pub(crate) fn prepared_ended(gid: &str, committed: bool) {
    if !crate::preload::is_preloaded() || in_audit_database().is_err() {
        return;
    }
    let who = crate::audit::writer::Who::current();
    let worker = {
        let mut q = QUEUE.exclusive();
        if q.len >= QUEUE_LEN {
            q.refused += 1;
            drop(q);
            pgrx::warning!("pg_tenancy: the reveal queue is full; the end of prepared transaction {gid:?} is not on record (its reveals are, as prepared)");
            return;
        }
        let id = q.next_id;
        q.next_id += 1;
        let i = q.len;
        q.records[i] = RevealRecord {
            id,
            kind: Kind::PreparedEnd,
            stage: Stage::Settled,
            outcome: if committed {
                Outcome::Committed
            } else {
                Outcome::RolledBack
            },
            gid: Fixed::from(Some(gid)),
            session_role: Fixed::from(Some(&who.session_role)),
            outer_role: Fixed::from(Some(&who.outer_role)),
            at: who.occurred_at,
            ..RevealRecord::EMPTY
        };
        q.len += 1;
        q.worker_pid
    };
    wake_pid(worker);
}

/// Checks that a reveal of `label` for `org` may happen here and that it is on record: an
/// audit database is configured, this is it, and this transaction's record of (`org`,
/// `label`) is durably written. The first reveal of a (tenant, label) in a transaction
/// queues the record and waits for the worker's commit; a record that cannot be queued
/// (queue full, [`RECORDS_PER_XACT`] records in this transaction) or written refuses the
/// reveal.
pub(crate) fn check_reveal_allowed(org: &str, label: Option<&str>) -> Result<(), TenancyError> {
    record_here(Kind::Reveal, org, label.unwrap_or(""), None)
}

/// A support read of `org`'s history over `period`: on record before anything is returned,
/// and whatever the reading transaction does next, like a reveal.
pub(crate) fn record_support_read(org: &str, period: &str) -> Result<(), TenancyError> {
    record_here(Kind::SupportRead, org, SUPPORT_LABEL, Some(period))?;
    note(org, Some(SUPPORT_LABEL));
    Ok(())
}

/// The label of a support read's record.
const SUPPORT_LABEL: &str = "tenancy.audit_history";

fn in_audit_database() -> Result<(), TenancyError> {
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
    here.map_err(|reason| TenancyError::RevealNotAudited { reason })
}

fn record_here(
    kind: Kind,
    org: &str,
    label: &str,
    detail: Option<&str>,
) -> Result<(), TenancyError> {
    in_audit_database()?;
    if !crate::context::parallel_actor_known() {
        return Err(TenancyError::RevealNotRecorded {
            reason:
                "in a parallel worker without its leader's actor (tenancy.context_actor was reset)"
                    .into(),
        });
    }
    // SAFETY: a plain read of the recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Err(TenancyError::RevealNotRecorded {
            reason: "this server is a standby: the audit trail cannot record reveals here".into(),
        });
    }
    if with_key(org, label, |key| {
        PENDING.with(|p| p.borrow().contains_key(key))
    }) {
        return Ok(()); // on record already: counted at the end
    }
    if PENDING.with(|p| p.borrow().len()) >= RECORDS_PER_XACT {
        return Err(TenancyError::RevealNotRecorded {
            reason: format!(
                "this transaction already revealed under {RECORDS_PER_XACT} distinct labels, the most one transaction may"
            ),
        });
    }
    let who = crate::audit::writer::Who::current();
    let seq = SESSION_SEQ.with(|s| {
        s.set(s.get() + 1);
        s.get()
    });
    // SAFETY: plain reads of process globals (the transaction id is 0 when none is assigned;
    // a parallel worker's lock group leader is its leader's PGPROC, in shared memory).
    let (xid, pid, session_start, leader_pid) = unsafe {
        let leader = (*pg_sys::MyProc).lockGroupLeader;
        let leader_pid = if leader.is_null() { 0 } else { (*leader).pid };
        (
            u32::from(pg_sys::GetTopTransactionIdIfAny()) as u64,
            pg_sys::MyProcPid,
            pg_sys::MyStartTime,
            if leader_pid == pg_sys::MyProcPid {
                0
            } else {
                leader_pid
            },
        )
    };
    let (id, worker) = {
        let mut q = QUEUE.exclusive();
        if q.len >= QUEUE_LEN {
            return Err(TenancyError::RevealNotRecorded {
                reason: "the reveal queue is full".into(),
            });
        }
        let id = q.next_id;
        q.next_id += 1;
        let i = q.len;
        q.records[i] = RevealRecord {
            id,
            kind,
            org: Fixed::from(Some(org)),
            label: Fixed::from(Some(label)),
            detail: Fixed::from(detail),
            actor: Fixed::from(who.actor.as_deref()),
            session_role: Fixed::from(Some(&who.session_role)),
            outer_role: Fixed::from(Some(&who.outer_role)),
            actor_verified: who.actor_verified,
            at: who.occurred_at,
            xid,
            pid,
            session_start,
            leader_pid,
            session_seq: seq,
            ..RevealRecord::EMPTY
        };
        q.len += 1;
        (id, q.worker_pid)
    };
    // Until it is written, the record is the waiting reveal's: a refusal, a cancel or a
    // timeout while waiting (an ERROR unwinds through the guard) takes it out of the queue,
    // and nothing of it stays in this transaction, so a retry (after a savepoint or an
    // exception block) queues and waits again.
    let waiting = Waiting(id);
    wake_pid(worker);
    wait_until_written(id)?;
    std::mem::forget(waiting);
    // Written: from here the record is this transaction's; its end settles it.
    PENDING.with(|p| p.borrow_mut().insert(format!("{org}\0{label}"), (id, 0)));
    Ok(())
}

/// A queued record whose reveal is waiting for it; dropped unless the wait succeeded.
struct Waiting(u64);

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut q = QUEUE.exclusive();
        let len = q.len;
        if let Some(at) = q.records[..len].iter().position(|r| r.id == self.0) {
            remove(&mut q, at);
        }
    }
}

/// How long a reveal waits for its record at most.
const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits (interruptibly: a cancel or timeout raises, and nothing was revealed) until the
/// worker has committed record `id`, or refused it, or [`WAIT_LIMIT`] passed.
fn wait_until_written(id: u64) -> Result<(), TenancyError> {
    let deadline = std::time::Instant::now() + WAIT_LIMIT;
    loop {
        let stage = {
            let q = QUEUE.share();
            q.records[..q.len]
                .iter()
                .find(|r| r.id == id)
                .map(|r| r.stage)
        };
        match stage {
            Some(Stage::Written) => return Ok(()),
            Some(Stage::Refused) | None => {
                return Err(TenancyError::RevealNotRecorded {
                    reason: "its record could not be written to the audit trail (see the server log)"
                        .into(),
                })
            }
            Some(_) if std::time::Instant::now() > deadline => {
                return Err(TenancyError::RevealNotRecorded {
                    reason: format!(
                        "the reveal worker did not record it within {} s (is it running? see tenancy.audit_status)",
                        WAIT_LIMIT.as_secs()
                    ),
                })
            }
            Some(_) => {}
        }
        // SAFETY: the process latch, waited on as PostgreSQL's own waits do; interrupts are
        // served after each wake (a cancel raises here, before anything was revealed).
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                10,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
}

/// Counts one reveal of `label` for `org` in the current transaction (its record was written
/// by [`check_reveal_allowed`]).
pub(crate) fn note(org: &str, label: Option<&str>) {
    let label = label.unwrap_or("");
    with_key(org, label, |key| {
        PENDING.with(|p| {
            if let Some(r) = p.borrow_mut().get_mut(key) {
                r.1 += 1;
            }
        })
    });
}

/// End of the transaction: its records are settled with their counts and how it ended (a
/// record whose reveal never happened leaves the queue). Touches no catalog.
pub(crate) fn at_xact_end(end: crate::xact::End) {
    let outcome = match end {
        crate::xact::End::Commit => Outcome::Committed,
        crate::xact::End::Prepare => Outcome::Prepared,
        crate::xact::End::Abort => Outcome::RolledBack,
        crate::xact::End::ParallelWorker => Outcome::ParallelWorker,
    };
    let gid = PREPARING.with(|p| p.borrow_mut().take());
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if pending.is_empty() || !crate::preload::is_preloaded() {
        return;
    }
    let worker = {
        let mut q = QUEUE.exclusive();
        for (_, (id, count)) in pending {
            let len = q.len;
            let Some(at) = q.records[..len].iter().position(|r| r.id == id) else {
                continue;
            };
            let r = &mut q.records[at];
            if count == 0 && r.stage != Stage::Written {
                // Nothing was revealed (refused, cancelled while waiting, or failed).
                remove(&mut q, at);
                continue;
            }
            r.stage = Stage::Settled;
            r.count = count;
            r.outcome = outcome;
            if outcome == Outcome::Prepared {
                r.gid = Fixed::from(gid.as_deref());
            }
        }
        q.worker_pid
    };
    wake_pid(worker);
}
