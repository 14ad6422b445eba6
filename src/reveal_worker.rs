//! The audit workers, connected to `tenancy.audit_database`: the reveal worker writes the
//! queued reveal records ([`crate::reveal_log`]) as `REVEAL` and `REVEAL_END` events, each
//! batch in its own durable transaction, and wakes the revealers waiting for them; the sealer seals committed
//! audit events into their tenants' chains ([`crate::audit::sealer`]) every [`SEAL_MS`].

use crate::error::TenancyError;
use crate::reveal_log::RevealRecord;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

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

/// How often the worker looks at the queue.
const POLL_MS: u64 = 20;
/// How often the sealer seals what writers committed (at once again while it is behind).
const SEAL_MS: u64 = 100;

/// Registers the two workers when an audit database is configured; only from `_PG_init`
/// under preload. Two, so that sealing a busy platform never keeps reveals waiting (a full
/// queue refuses reveals; an unsealed event only waits).
pub(crate) fn init() {
    if !crate::preload::is_preloaded() || crate::gucs::audit_database().is_none() {
        return;
    }
    for (name, function) in [
        ("pg_tenancy reveal audit", "pg_tenancy_reveal_worker_main"),
        ("pg_tenancy audit sealer", "pg_tenancy_sealer_main"),
    ] {
        BackgroundWorkerBuilder::new(name)
            .set_function(function)
            .set_library("pg_tenancy")
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

/// Connects a worker to the audit database and pins its settings.
fn start() {
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
}

/// The reveal worker: writes queued reveal records as audit events, oldest first.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_reveal_worker_main(_arg: pg_sys::Datum) {
    start();
    // SAFETY: a plain read of the worker's pid.
    crate::reveal_log::set_worker(unsafe { pg_sys::MyProcPid });
    while BackgroundWorker::wait_latch(Some(Duration::from_millis(POLL_MS))) {
        reload_if_signalled();
        write_reveals();
    }
    crate::reveal_log::set_worker(0);
}

/// The sealer: a round every SEAL_MS, or at once while more is pending than a round takes.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_sealer_main(_arg: pg_sys::Datum) {
    start();
    // SAFETY: a plain read of the worker's pid.
    crate::reveal_log::set_sealer(unsafe { pg_sys::MyProcPid });
    let mut behind = false;
    let mut last_digest: Option<std::time::Instant> = None;
    while BackgroundWorker::wait_latch(Some(Duration::from_millis(if behind {
        1
    } else {
        SEAL_MS
    }))) {
        reload_if_signalled();
        behind = seal_once();
        if let Some((path, interval)) = crate::gucs::audit_digest_file() {
            let due = last_digest
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(interval.max(1) as u64));
            if due && !behind && installed("tenancy.audit_seals") {
                last_digest = Some(std::time::Instant::now());
                write_digests(&path);
            }
        }
    }
    crate::reveal_log::set_sealer(0);
}

/// Appends every tenant's digest line to the digest file (a WARNING when it cannot).
fn write_digests(path: &str) {
    let written = BackgroundWorker::transaction(|| crate::audit::digest::append_to_file(path));
    match written {
        // SAFETY: the clock.
        Ok(_) => crate::reveal_log::digest_written(unsafe { pg_sys::GetCurrentTimestamp() }),
        Err(problem) => pgrx::warning!("pg_tenancy: audit digests not written: {problem}"),
    }
}

/// The audit workers' counters for `tenancy.audit_status`: records in the reveal queue,
/// records the worker could not write since the server started, the workers' pids.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)] // a result row is a tuple of its columns
fn audit_worker_status() -> TableIterator<
    'static,
    (
        name!(reveal_queue_records, i64),
        name!(refused_records, i64),
        name!(reveal_worker_pid, Option<i32>),
        name!(sealer_pid, Option<i32>),
        name!(last_digest_at, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    let (len, refused, worker, sealer, digest_at) = crate::reveal_log::status();
    let pid = |p: i32| (p != 0).then_some(p);
    let at = (digest_at != 0)
        .then(|| pgrx::datum::TimestampWithTimeZone::try_from(digest_at).ok())
        .flatten();
    TableIterator::once((len, refused, pid(worker), pid(sealer), at))
}

/// After a reload signal (`pg_reload_conf()`, `pg_ctl reload`), reads the configuration
/// again here, at the top of the loop, as every backend does between commands: the key ring
/// is loaded again by its setting's assign hook, so a rotation reaches the worker's REVEAL
/// payloads. The signal handler itself only sets a flag and the latch (pgrx's).
fn reload_if_signalled() {
    if BackgroundWorker::sighup_received() {
        // SAFETY: outside any transaction, in the worker's main loop, as postgres's own
        // background processes call it.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

/// Writes the queued records: a `REVEAL` (or `SUPPORT_READ`) event for each new one, a
/// `REVEAL_END` for each settled one, all in one transaction committed durably, then wakes
/// the revealers waiting for them. When that transaction fails, each record is tried alone:
/// one that still fails is set aside (logged, counted in `tenancy.audit_status`, its reveal
/// refused) and holds up no other.
fn write_reveals() {
    let batch: Vec<RevealRecord> = crate::reveal_log::to_write();
    if batch.is_empty() {
        return;
    }
    if !installed("tenancy.audit_events") {
        return; // the extension is not installed in this database yet
    }
    if try_transaction(|| batch.iter().for_each(write_record)) {
        crate::reveal_log::mark_written(&batch);
        return;
    }
    for r in &batch {
        if try_transaction(|| write_record(r)) {
            crate::reveal_log::mark_written(std::slice::from_ref(r));
        } else {
            pgrx::warning!(
                "pg_tenancy: a reveal record could not be written and was set aside (tenant {:?}, label {:?}, session {}, record {})",
                r.org.get().unwrap_or_default(),
                r.label.get().unwrap_or_default(),
                r.session(),
                r.session_seq
            );
            crate::reveal_log::mark_refused(r);
        }
    }
}

/// Runs `f` in a transaction of its own; false (the transaction rolled back, the error
/// logged) when it raised.
fn try_transaction(f: impl FnOnce()) -> bool {
    // SAFETY: called from the worker's main loop, outside any transaction; the snapshot is
    // pushed for SPI and popped before the commit, as BackgroundWorker::transaction does.
    unsafe {
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let ok = PgTryBuilder::new(std::panic::AssertUnwindSafe(move || {
        f();
        true
    }))
    .catch_others(|e| {
        if let pg_sys::panic::CaughtError::PostgresError(report)
        | pg_sys::panic::CaughtError::ErrorReport(report) = &e
        {
            pgrx::warning!(
                "pg_tenancy: writing reveal records failed: {}",
                report.message()
            );
        }
        false
    })
    .execute();
    // SAFETY: ends the transaction begun above (an error left it aborted, not ended).
    unsafe {
        if ok {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
    }
    ok
}

/// The events of one record.
fn write_record(r: &RevealRecord) {
    use crate::reveal_log::{Kind, Stage};
    let who = crate::audit::writer::Who {
        actor: r.actor.get(),
        actor_verified: r.actor_verified,
        session_role: r.session_role.get().unwrap_or_default(),
        outer_role: r.outer_role.get().unwrap_or_default(),
        occurred_at: r.at,
    };
    let org = r.org.get().unwrap_or_default();
    let label = r.label.get().filter(|l| !l.is_empty());
    let mut request = serde_json::json!({
        "session": r.session(),
        "record": r.session_seq,
        "xid": r.xid,
    });
    if r.leader_pid != 0 {
        request["parallel_leader_pid"] = r.leader_pid.into();
    }
    let event = |action: &str, row_key: Option<String>, payload: serde_json::Value| {
        crate::audit::writer::NewEvent {
            org: org.clone(),
            action: action.into(),
            table_name: label.clone(),
            row_key,
            changed_columns: None,
            payload: Some(payload),
        }
    };
    let mut events = Vec::new();
    match r.kind {
        Kind::PreparedEnd => return write_prepared_end(r),
        Kind::SupportRead if !r.written => events.push(event(
            "SUPPORT_READ",
            None,
            serde_json::json!({ "period": r.detail.get(), "request": request }),
        )),
        Kind::SupportRead => {}
        Kind::Reveal => {
            if !r.written {
                events.push(event(
                    "REVEAL",
                    None,
                    serde_json::json!({ "label": r.label.get(), "request": request }),
                ));
            }
            if r.stage == Stage::Settled {
                let gid = r.gid.get();
                events.push(event(
                    "REVEAL_END",
                    gid.as_ref().map(|g| format!("prepared:{g}")),
                    serde_json::json!({
                        "label": r.label.get(),
                        "count": r.count,
                        "transaction": r.outcome.name(),
                        "gid": gid,
                        "request": request,
                    }),
                ));
            }
        }
    }
    crate::audit::writer::append_events(&who, &events);
}

/// COMMIT / ROLLBACK PREPARED of a transaction that revealed: a `REVEAL_END` for each of its
/// prepared records, in their tenants' trails.
fn write_prepared_end(r: &RevealRecord) {
    let gid = r.gid.get().unwrap_or_default();
    let key = format!("prepared:{gid}");
    let prepared: Vec<(String, Option<String>)> = Spi::connect(|client| {
        client
            .select(
                "SELECT DISTINCT organization_id, table_name FROM tenancy.audit_events
                  WHERE action = 'REVEAL_END' AND row_key = $1",
                None,
                &[key.as_str().into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?,
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| TenancyError::spi("finding a prepared transaction's reveals", e).report());
    let who = crate::audit::writer::Who {
        actor: None,
        actor_verified: false,
        session_role: r.session_role.get().unwrap_or_default(),
        outer_role: r.outer_role.get().unwrap_or_default(),
        occurred_at: r.at,
    };
    let events: Vec<_> = prepared
        .into_iter()
        .map(|(org, label)| crate::audit::writer::NewEvent {
            org,
            action: "REVEAL_END".into(),
            table_name: label.clone(),
            row_key: Some(format!("{}:{gid}", r.outcome.name())),
            changed_columns: None,
            payload: Some(serde_json::json!({
                "label": label,
                "transaction": format!("{} prepared", r.outcome.name()),
                "gid": gid,
            })),
        })
        .collect();
    crate::audit::writer::append_events(&who, &events);
}

/// Whether `relation` exists in the worker's database (the extension installed, updated).
fn installed(relation: &str) -> bool {
    BackgroundWorker::transaction(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[relation.into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}

/// One sealing round in its own transaction; whether it was full (more is pending).
fn seal_once() -> bool {
    if !installed("tenancy.audit_seals") {
        return false; // not installed, or not updated to 0.2.1 yet
    }
    BackgroundWorker::transaction(|| crate::audit::sealer::seal_round(false)).more
}
