//! The audit workers, connected to `tenancy.audit_database`: the reveal worker writes the
//! queued reveal records ([`crate::reveal_log`]) as `REVEAL` events, each batch in its own
//! transaction, and removes them from the queue once committed; the sealer seals committed
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
    while BackgroundWorker::wait_latch(Some(Duration::from_millis(POLL_MS))) {
        reload_if_signalled();
        write_reveals();
    }
}

/// The sealer: a round every SEAL_MS, or at once while more is pending than a round takes.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_sealer_main(_arg: pg_sys::Datum) {
    start();
    let mut behind = false;
    while BackgroundWorker::wait_latch(Some(Duration::from_millis(if behind {
        1
    } else {
        SEAL_MS
    }))) {
        reload_if_signalled();
        behind = seal_once();
    }
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

/// Writes the queued reveal records as REVEAL events, in one transaction, and removes them
/// from the queue once committed.
fn write_reveals() {
    let batch: Vec<RevealRecord> = crate::reveal_log::queued();
    if batch.is_empty() {
        return;
    }
    if !installed("tenancy.audit_events") {
        return; // the extension is not installed in this database yet
    }
    // Oldest first; writers take no lock, so no tenant's open transaction can hold
    // this one up.
    BackgroundWorker::transaction(|| {
        for r in &batch {
            let who = crate::audit::writer::Who {
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
            crate::audit::writer::append_events(
                &who,
                &[crate::audit::writer::NewEvent {
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
    crate::reveal_log::remove_oldest(batch.len());
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
    BackgroundWorker::transaction(crate::audit::sealer::seal_round).more
}
