//! II-7: a reveal is on record, durably, before its plaintext leaves the server, whatever
//! happens next: a crash, an immediate shutdown, a rollback, PREPARE TRANSACTION, a parallel
//! worker; one record the worker cannot write refuses its own reveal and holds up no other;
//! every reveal event names the session and request it came from.

use crate::audit::assert_chain_ok;
use crate::harness::{count, db_error, strings, Cluster};
use postgres::Client;
use std::time::{Duration, Instant};

const ORG: &str = "7e570000-0000-4000-8000-000000000001";

fn cluster(conf: &[&str]) -> Cluster {
    let c = Cluster::start_with_phi(conf);
    c.connect("postgres", "app")
        .batch_execute("CREATE EXTENSION pg_tenancy")
        .unwrap();
    c
}

/// Reveals a fresh envelope under `label` in its own transaction of tenant ORG; returns the
/// plaintext the server sent back.
fn reveal(app: &mut Client, label: &str) -> String {
    app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{ORG}', 'clerk')"))
        .unwrap();
    let v: String = app
        .query_one(
            &format!("SELECT tenancy.phi_reveal(tenancy.phi_encrypt('value of {label}', '{label}'), '{label}')"),
            &[],
        )
        .unwrap()
        .get(0);
    app.batch_execute("COMMIT").unwrap();
    v
}

fn events(su: &mut Client, action: &str, label: &str) -> i64 {
    count(
        su,
        &format!("SELECT count(*) FROM tenancy.audit_events WHERE action = '{action}' AND table_name = '{label}'"),
    )
}

/// Polls (up to 15 s) until `sql` (a count) reaches `want`; returns the last value.
fn wait_for(su: &mut Client, sql: &str, want: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = count(su, sql);
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The decrypted payload of the newest event of `action` under `label` (tenant ORG's).
fn payload(su: &mut Client, action: &str, label: &str) -> serde_json::Value {
    su.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{ORG}')"))
        .unwrap();
    let text: String = su
        .query_one(
            &format!(
                "SELECT tenancy.audit_payload(payload, event_id)::text FROM tenancy.audit_events
                  WHERE action = '{action}' AND table_name = '{label}' ORDER BY event_id DESC LIMIT 1"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    su.batch_execute("COMMIT").unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn test_a_reveal_is_on_record_before_its_plaintext_returns_even_across_a_crash() {
    let c = cluster(&[]);
    let mut app = c.connect("app", "app");
    assert_eq!(reveal(&mut app, "crash.one"), "value of crash.one");
    // At once, before any worker poll could have run: the record is already committed.
    let mut su = c.connect("postgres", "app");
    assert_eq!(
        events(&mut su, "REVEAL", "crash.one"),
        1,
        "on record before the value came back"
    );
    // A reveal inside a transaction the crash ends: its plaintext was returned, its record
    // must survive.
    app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{ORG}')"))
        .unwrap();
    let v: String = app
        .query_one(
            "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('kept', 'crash.two'), 'crash.two')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(v, "kept");
    drop(su);
    c.crash();
    drop(app);
    c.start_again();
    let mut su = c.connect("postgres", "app");
    assert_eq!(events(&mut su, "REVEAL", "crash.one"), 1);
    assert_eq!(
        events(&mut su, "REVEAL", "crash.two"),
        1,
        "the reveal of a transaction killed by the crash is on record"
    );
    assert_chain_ok(&mut su, ORG);
}

#[test]
fn test_every_returned_reveal_is_on_record_after_an_immediate_shutdown_under_load() {
    let c = cluster(&[]);
    let port = c.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut app = crate::harness::connect_port(port, "app", "app");
                let mut returned = Vec::new();
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let label = format!("load.{t}.{i}");
                    let r = app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{ORG}')")).and_then(|_| {
                        app.query_one(
                            &format!("SELECT tenancy.phi_reveal(tenancy.phi_encrypt('v', '{label}'), '{label}')"),
                            &[],
                        )
                    });
                    match r {
                        Ok(row) => {
                            assert_eq!(row.get::<_, String>(0), "v");
                            returned.push(label);
                        }
                        Err(_) => break, // the server went away
                    }
                    if app.batch_execute("COMMIT").is_err() {
                        break;
                    }
                }
                returned
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    c.stop_immediate();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let returned: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(returned.len() > 20, "the load revealed: {}", returned.len());
    c.start_again();
    let mut su = c.connect("postgres", "app");
    let recorded: std::collections::HashSet<String> = strings(
        &mut su,
        "SELECT table_name FROM tenancy.audit_events WHERE action = 'REVEAL' AND table_name LIKE 'load.%'",
    )
    .into_iter()
    .collect();
    let missing: Vec<&String> = returned.iter().filter(|l| !recorded.contains(*l)).collect();
    assert!(
        missing.is_empty(),
        "returned but not on record: {missing:?}"
    );
}

#[test]
fn test_rolled_back_reveals_support_reads_and_settlements_are_on_record() {
    let c = cluster(&["max_prepared_transactions = 4"]);
    let mut su = c.connect("postgres", "app");
    su.batch_execute(
        "CREATE ROLE support LOGIN; GRANT EXECUTE ON FUNCTION tenancy.audit_history(text, timestamptz, timestamptz) TO support",
    )
    .unwrap();
    let mut app = c.connect("app", "app");
    // Three reveals of one label, rolled back: one REVEAL, settled with count 3.
    app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{ORG}')"))
        .unwrap();
    app.batch_execute(
        "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('x', 'rb.label'), 'rb.label') FROM generate_series(1, 3); ROLLBACK",
    )
    .unwrap();
    let end = "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL_END' AND table_name = 'rb.label'";
    assert_eq!(wait_for(&mut su, end, 1), 1);
    assert_eq!(events(&mut su, "REVEAL", "rb.label"), 1);
    let p = payload(&mut su, "REVEAL_END", "rb.label");
    assert_eq!(p["count"], 3, "{p}");
    assert_eq!(p["transaction"], "rolled back", "{p}");
    // The request is named: the session id as log_line_prefix's %c prints it.
    let session: String = app
        .query_one(
            "SELECT to_hex(trunc(extract(epoch FROM backend_start))::bigint) || '.' || to_hex(pid)
               FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(p["request"]["session"], session.as_str(), "{p}");
    assert_eq!(
        payload(&mut su, "REVEAL", "rb.label")["request"]["session"],
        session.as_str()
    );

    // A support read rolled back is on record all the same.
    let mut support = c.connect("support", "app");
    support
        .batch_execute(&format!(
            "BEGIN; SELECT count(*) FROM tenancy.audit_history('{ORG}', '-infinity', 'infinity'); ROLLBACK"
        ))
        .unwrap();
    assert_eq!(
        count(
            &mut su,
            &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{ORG}' AND action = 'SUPPORT_READ' AND outer_role = 'support'")
        ),
        1,
        "the rolled-back support read is in the clinic's trail"
    );

    // PREPARE TRANSACTION: recorded as prepared; COMMIT PREPARED and ROLLBACK PREPARED settle.
    for (gid, finish) in [
        ("gid-c", "COMMIT PREPARED 'gid-c'"),
        ("gid-r", "ROLLBACK PREPARED 'gid-r'"),
    ] {
        let label = format!("prep.{gid}");
        app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{ORG}')"))
            .unwrap();
        app.batch_execute(&format!(
            "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('x', '{label}'), '{label}'); PREPARE TRANSACTION '{gid}'"
        ))
        .unwrap();
        let ends = format!("SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL_END' AND table_name = '{label}'");
        assert_eq!(wait_for(&mut su, &ends, 1), 1);
        assert_eq!(
            payload(&mut su, "REVEAL_END", &label)["transaction"],
            "prepared"
        );
        su.batch_execute(finish).unwrap();
        assert_eq!(
            wait_for(&mut su, &ends, 2),
            2,
            "{finish} settled the record"
        );
        let settled = payload(&mut su, "REVEAL_END", &label);
        let want = if gid == "gid-c" {
            "committed prepared"
        } else {
            "rolled back prepared"
        };
        assert_eq!(settled["transaction"], want, "{settled}");
    }
    assert_chain_ok(&mut su, ORG);
}

#[test]
fn test_a_reveal_in_a_parallel_worker_is_on_record() {
    let c = cluster(&[]);
    let mut su = c.connect("postgres", "app");
    su.batch_execute(
        "CREATE FUNCTION public.peek(bytea) RETURNS text LANGUAGE plpgsql PARALLEL SAFE
           AS $$ BEGIN RETURN tenancy.phi_reveal($1, 'par.label'); END $$;
         GRANT EXECUTE ON FUNCTION public.peek(bytea) TO app",
    )
    .unwrap();
    let mut app = c.connect("app", "app");
    app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{ORG}')"))
        .unwrap();
    let env: Vec<u8> = app
        .query_one(
            "SELECT tenancy.phi_encrypt('in a worker', 'par.label')::bytea",
            &[],
        )
        .unwrap()
        .get(0);
    app.batch_execute("COMMIT").unwrap();
    let force = if crate::harness::pg_major() >= 16 {
        "debug_parallel_query"
    } else {
        "force_parallel_mode"
    };
    app.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{ORG}'); SET LOCAL {force} = on"
    ))
    .unwrap();
    let plan: Vec<String> = app
        .query("EXPLAIN (COSTS OFF) SELECT public.peek($1)", &[&env])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("Gather")),
        "runs in a worker: {plan:?}"
    );
    let v: String = app
        .query_one("SELECT public.peek($1)", &[&env])
        .unwrap()
        .get(0);
    assert_eq!(v, "in a worker");
    app.batch_execute("COMMIT").unwrap();
    let ends = "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL_END' AND table_name = 'par.label'";
    assert_eq!(wait_for(&mut su, ends, 1), 1);
    assert_eq!(
        events(&mut su, "REVEAL", "par.label"),
        1,
        "the worker's reveal is on record"
    );
    assert_eq!(
        payload(&mut su, "REVEAL_END", "par.label")["transaction"],
        "parallel worker"
    );
}

/// A record the worker cannot write (here: a superuser's unique index that the second
/// REVEAL of one label violates) refuses its own reveal, is counted and logged, and holds up
/// no other reveal written in the same batch.
#[test]
fn test_a_record_that_cannot_be_written_refuses_its_reveal_and_blocks_no_other() {
    let c = cluster(&[]);
    let mut su = c.connect("postgres", "app");
    let mut app = c.connect("app", "app");
    reveal(&mut app, "poison.label");
    su.batch_execute(
        "ALTER EVENT TRIGGER tenancy_guard_ddl DISABLE;
         CREATE UNIQUE INDEX poison ON tenancy.audit_events (table_name) WHERE action = 'REVEAL' AND table_name = 'poison.label';
         ALTER EVENT TRIGGER tenancy_guard_ddl ENABLE;",
    )
    .unwrap();
    let mut other = c.connect("app", "app");
    let port = c.port;
    // Another session reveals at the same moment: its record shares the worker's batch.
    let t = std::thread::spawn(move || {
        let mut app = crate::harness::connect_port(port, "app", "app");
        (0..20)
            .map(|i| reveal(&mut app, &format!("fine.{i}")))
            .count()
    });
    app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{ORG}')"))
        .unwrap();
    let err = db_error(app.query_one(
        "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('x', 'poison.label'), 'poison.label')",
        &[],
    ));
    assert_eq!(err.code().code(), "55000", "{err:?}");
    assert!(!err.message().contains("value of"), "no plaintext");
    app.batch_execute("ROLLBACK").unwrap();
    assert_eq!(t.join().unwrap(), 20, "the other reveals went on");
    assert_eq!(reveal(&mut other, "fine.after"), "value of fine.after");
    let (refused,): (i64,) = {
        let r = su
            .query_one("SELECT refused_records FROM tenancy.audit_status", &[])
            .unwrap();
        (r.get(0),)
    };
    assert!(refused >= 1, "counted in the status view");
    let log = c.log();
    assert!(
        log.contains("a reveal record could not be written and was set aside"),
        "{}",
        &log[log.len().saturating_sub(3000)..]
    );
    assert!(!c.log().contains("value of"), "no plaintext in the log");
}

/// A reveal cancelled while it waits for its record (here: statement_timeout while a
/// superuser's lock holds the worker up) leaves nothing behind in its transaction: retried
/// after the savepoint, it queues and waits for a record of its own again.
#[test]
fn test_a_reveal_cancelled_while_waiting_is_recorded_again_when_retried() {
    let c = cluster(&[]);
    let mut su = c.connect("postgres", "app");
    let mut app = c.connect("app", "app");
    reveal(&mut app, "retry.warmup"); // the worker is up
    let mut locker = c.connect("postgres", "app");
    locker
        .batch_execute("BEGIN; LOCK TABLE tenancy.audit_events IN SHARE MODE")
        .unwrap();
    app.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{ORG}'); SAVEPOINT a; SET LOCAL statement_timeout = '300ms'"
    ))
    .unwrap();
    let err = db_error(app.query_one(
        "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('x', 'retry.label'), 'retry.label')",
        &[],
    ));
    assert_eq!(
        err.code().code(),
        "57014",
        "cancelled while waiting: {err:?}"
    );
    app.batch_execute("ROLLBACK TO SAVEPOINT a").unwrap();
    locker.batch_execute("COMMIT").unwrap();
    let v: String = app
        .query_one(
            "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('y', 'retry.label'), 'retry.label')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(v, "y");
    app.batch_execute("COMMIT").unwrap();
    // The cancelled attempt's record may still have been written (the worker held it while
    // it waited for the lock): at least the retry's own is there.
    let n = wait_for(
        &mut su,
        "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL' AND table_name = 'retry.label'",
        2,
    );
    assert!(n >= 2, "the retried reveal has a record of its own: {n}");
    // The session's third record (warm-up, cancelled attempt, retry) is the newest REVEAL.
    assert_eq!(
        payload(&mut su, "REVEAL", "retry.label")["request"]["record"],
        3
    );
}
