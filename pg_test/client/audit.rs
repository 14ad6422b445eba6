//! Rows A1-A3 and A5-A7 of ATTACKS.md and the audit trail's exactness, on the reference
//! schema protected with `audit => true` (all fifteen tables audit into the sixteenth).

use crate::harness::{connect_port, count, db_error, sqlstate, strings, Cluster};
use crate::rls::{reference_cluster, CONWAY, SHERWOOD};
use postgres::Client;
use std::sync::OnceLock;

fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(reference_cluster)
}

fn enter(c: &mut Client, org: &str, actor: &str) {
    c.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{org}', '{actor}')"
    ))
    .unwrap();
}

/// Events of one audited table row (by its id), oldest first: (action, changed columns).
fn events_of(c: &mut Client, id: &str) -> Vec<(String, Vec<String>)> {
    c.query(
        "SELECT action, changed_columns FROM tenancy.my_audit_events WHERE row_key LIKE '%' || $1 || '%' ORDER BY event_id",
        &[&id],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[test]
fn test_audit_rows_match_the_changes_exactly() {
    let mut c = cluster().connect("app", "app");
    let id = "5e000000-0000-4000-8000-0000000000f1";
    enter(&mut c, SHERWOOD, "user-7");
    c.batch_execute(&format!(
        "INSERT INTO clinic.reviews (id, rating, body) VALUES ('{id}', 4, 'good')"
    ))
    .unwrap();
    c.batch_execute(&format!(
        "UPDATE clinic.reviews SET rating = 5 WHERE id = '{id}'"
    ))
    .unwrap();
    c.batch_execute(&format!(
        "UPDATE clinic.reviews SET rating = 5 WHERE id = '{id}'"
    ))
    .unwrap(); // no-op
    c.batch_execute("COMMIT").unwrap();
    // A change rolled back leaves no event.
    enter(&mut c, SHERWOOD, "user-7");
    c.batch_execute(&format!(
        "UPDATE clinic.reviews SET body = 'rolled back' WHERE id = '{id}'"
    ))
    .unwrap();
    c.batch_execute("ROLLBACK").unwrap();
    enter(&mut c, SHERWOOD, "user-7");
    c.batch_execute(&format!("DELETE FROM clinic.reviews WHERE id = '{id}'"))
        .unwrap();
    let events = events_of(&mut c, id);
    let actions: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(actions, ["INSERT", "UPDATE", "DELETE"]);
    assert_eq!(events[1].1, ["rating"], "only the changed column, in clear");
    // The payloads decrypt to the right values.
    let payloads = strings(
        &mut c,
        &format!("SELECT changes::text FROM tenancy.my_audit_events WHERE row_key LIKE '%{id}%' ORDER BY event_id"),
    );
    assert!(
        payloads[0].contains("\"body\": \"good\"") && payloads[0].contains("\"rating\": \"4\""),
        "{}",
        payloads[0]
    );
    assert_eq!(
        payloads[1],
        "{\"new\": {\"rating\": \"5\"}, \"old\": {\"rating\": \"4\"}}"
    );
    assert!(
        payloads[2].contains("\"rating\": \"5\""),
        "DELETE holds the old row: {}",
        payloads[2]
    );
    // A5: the actor is recorded, with how it was established.
    let row = c
        .query_one(
            &format!("SELECT actor, actor_verified, session_role::text, outer_role::text FROM tenancy.my_audit_events WHERE row_key LIKE '%{id}%' ORDER BY event_id LIMIT 1"),
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("user-7"));
    assert!(
        !row.get::<_, bool>(1),
        "no signed token: the actor is the application's word"
    );
    assert_eq!(
        (row.get::<_, String>(2), row.get::<_, String>(3)),
        ("app".into(), "app".into())
    );
    c.batch_execute("COMMIT").unwrap();
    let mut su = cluster().connect("postgres", "app");
    assert_chain_ok(&mut su, SHERWOOD);
}

/// The number of the bulk test actor's events of one action in the current tenant's trail.
fn bulk_events(c: &mut Client, action: &str) -> i64 {
    count(
        c,
        &format!("SELECT count(*) FROM tenancy.my_audit_events WHERE actor = 'bulk' AND action = '{action}'"),
    )
}

#[test]
fn test_bulk_statements_are_audited_row_for_row_across_batches() {
    // 2,500 rows span three of the statement trigger's 1,000-event batches.
    let mut c = cluster().connect("app", "app");
    enter(&mut c, CONWAY, "bulk");
    // A small work_mem makes the transition tables spill to disk, the path where rows are
    // read back into the trigger's own memory.
    c.batch_execute("SET LOCAL work_mem = '64kB'").unwrap();
    c.batch_execute(
        "INSERT INTO clinic.reviews (id, rating, body)
         SELECT ('c0000000-0000-4000-8000-' || lpad(g::text, 12, '0'))::uuid, 1 + g % 5, 'bulk ' || g
           FROM generate_series(1, 2500) g",
    )
    .unwrap();
    assert_eq!(bulk_events(&mut c, "INSERT"), 2500);
    // UPDATE: each event pairs a row's own old and new values.
    c.batch_execute("UPDATE clinic.reviews SET rating = 1 + rating % 5 WHERE body LIKE 'bulk %'")
        .unwrap();
    assert_eq!(bulk_events(&mut c, "UPDATE"), 2500);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM tenancy.my_audit_events WHERE actor = 'bulk' AND action = 'UPDATE'
                AND (changed_columns <> '{rating}'
                     OR (changes->'new'->>'rating')::int <> 1 + (changes->'old'->>'rating')::int % 5)"
        ),
        0
    );
    // A primary-key change: the event's key is the new key, the payload has old and new ids.
    c.batch_execute(
        "UPDATE clinic.reviews SET id = overlay(id::text placing 'c1' from 1 for 2)::uuid
          WHERE body LIKE 'bulk %0'",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM tenancy.my_audit_events WHERE actor = 'bulk' AND changed_columns = '{id}'
                AND changes->'new'->>'id' = overlay(changes->'old'->>'id' placing 'c1' from 1 for 2)
                AND row_key LIKE '%' || (changes->'new'->>'id') || '%'"
        ),
        250
    );
    // Rows changed inside a rolled-back savepoint leave no events.
    c.batch_execute("SAVEPOINT s; UPDATE clinic.reviews SET body = 'gone' WHERE body LIKE 'bulk %'; ROLLBACK TO SAVEPOINT s")
        .unwrap();
    assert_eq!(bulk_events(&mut c, "UPDATE"), 2750);
    // INSERT ... ON CONFLICT DO UPDATE: new rows are INSERTs, conflicting ones UPDATEs.
    c.batch_execute(
        "INSERT INTO clinic.reviews (id, rating, body)
         SELECT ('c0000000-0000-4000-8000-' || lpad(g::text, 12, '0'))::uuid, 5, 'bulk upsert ' || g
           FROM generate_series(2491, 2505) g
         ON CONFLICT (organization_id, id) DO UPDATE SET body = EXCLUDED.body",
    )
    .unwrap();
    // 2491-2499 conflict; 2500 was re-keyed away above, so it and 2501-2505 are new.
    assert_eq!(bulk_events(&mut c, "INSERT"), 2506);
    assert_eq!(bulk_events(&mut c, "UPDATE"), 2750 + 9);
    c.batch_execute("DELETE FROM clinic.reviews WHERE body LIKE 'bulk %'")
        .unwrap();
    assert_eq!(bulk_events(&mut c, "DELETE"), 2506);
    c.batch_execute("COMMIT").unwrap();
    let mut su = cluster().connect("postgres", "app");
    assert_chain_ok(&mut su, CONWAY);
}

#[test]
fn test_a1_the_audit_trail_is_append_only() {
    for role in ["app", "owner"] {
        let mut c = cluster().connect(role, "app");
        enter(&mut c, SHERWOOD, "x");
        for stmt in [
            "UPDATE tenancy.audit_events SET action = 'forged'",
            "DELETE FROM tenancy.audit_events",
            "TRUNCATE tenancy.audit_events",
            "INSERT INTO tenancy.audit_events (organization_id, seq, event_id, occurred_at, txid, actor_verified, session_role, outer_role, action, prev_hash, hash) VALUES ('x', 1, 1, now(), 1, false, 'a', 'a', 'x', '', '')",
        ] {
            c.batch_execute("SAVEPOINT s").unwrap();
            assert_eq!(sqlstate(c.batch_execute(stmt)), "42501", "{role}: {stmt}");
            c.batch_execute("ROLLBACK TO s").unwrap();
        }
        c.batch_execute("ROLLBACK").unwrap();
    }
    // Even a superuser's UPDATE hits the append-only trigger.
    let mut su = cluster().connect("postgres", "app");
    assert_eq!(
        sqlstate(su.batch_execute("UPDATE tenancy.audit_events SET action = 'forged'")),
        "42501"
    );
}

#[test]
fn test_a2_audit_triggers_cannot_be_disabled_or_dropped() {
    let mut owner = cluster().connect("owner", "app");
    for stmt in [
        "ALTER TABLE clinic.bookings DISABLE TRIGGER tenancy_audit_update",
        "DROP TRIGGER tenancy_audit_insert ON clinic.bookings",
    ] {
        let err = db_error(owner.batch_execute(stmt));
        assert_eq!(err.code().code(), "42501", "{stmt}");
    }
    let mut su = cluster().connect("postgres", "app");
    assert_eq!(
        sqlstate(su.batch_execute(
            "ALTER TABLE tenancy.audit_events DISABLE TRIGGER audit_events_append_only"
        )),
        "42501"
    );
    assert_eq!(
        sqlstate(su.batch_execute("ALTER TABLE tenancy.audit_events NO FORCE ROW LEVEL SECURITY")),
        "42501"
    );
}

#[test]
fn test_a6_a_tenant_reads_and_decrypts_only_its_own_events() {
    let mut c = cluster().connect("app", "app");
    enter(&mut c, CONWAY, "c-user");
    c.batch_execute("INSERT INTO clinic.reviews (rating) VALUES (3)")
        .unwrap();
    let foreign = count(
        &mut c,
        &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id <> '{CONWAY}'"),
    );
    assert_eq!(foreign, 0);
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM tenancy.audit_events"),
        0,
        "no context, no events"
    );
    // Sherwood's payload, handed to Conway, does not decrypt.
    let mut su = cluster().connect("postgres", "app");
    let row = su
        .query_one(&format!("SELECT payload, event_id FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND payload IS NOT NULL LIMIT 1"), &[])
        .unwrap();
    let (payload, event_id): (Vec<u8>, i64) = (row.get(0), row.get(1));
    enter(&mut c, CONWAY, "c-user");
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT tenancy.audit_payload($1, $2)",
            &[&payload, &event_id]
        )),
        "28000"
    );
    c.batch_execute("ROLLBACK").unwrap();
    // Nor can Conway verify Sherwood's chain.
    enter(&mut c, CONWAY, "c-user");
    assert_eq!(
        sqlstate(c.query_one(
            &format!("SELECT * FROM tenancy.audit_verify('{SHERWOOD}')"),
            &[]
        )),
        "42501"
    );
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_a7_the_event_is_filed_under_the_row_not_the_context() {
    // A superuser (RLS does not apply) in Conway's context writes a Sherwood row.
    let mut su = cluster().connect("postgres", "app");
    su.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{CONWAY}');
         INSERT INTO clinic.reviews (organization_id, rating, body) VALUES ('{SHERWOOD}', 2, 'misfiled?'); COMMIT;"
    ))
    .unwrap();
    let org: String = su
        .query_one(
            "SELECT e.organization_id FROM tenancy.audit_events e JOIN clinic.reviews r
               ON e.row_key LIKE '%' || r.id || '%' WHERE r.body = 'misfiled?'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(org, SHERWOOD);
}

#[test]
fn test_operator_actions_and_concurrent_writers_keep_the_chain() {
    let port = cluster().port;
    let writers: Vec<_> = (0..2)
        .map(|w| {
            std::thread::spawn(move || {
                let mut c = connect_port(port, "app", "app");
                for i in 0..40 {
                    c.batch_execute(&format!(
                        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}', 'w{w}');
                         INSERT INTO clinic.reviews (rating, body) VALUES (1, 'w{w}-{i}');
                         SELECT tenancy.log_action('export.csv', '{{\"rows\": {i}}}'); COMMIT;"
                    ))
                    .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut su = cluster().connect("postgres", "app");
    assert_chain_ok(&mut su, SHERWOOD);
    let actions = count(&mut su, &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND action = 'export.csv'"));
    assert_eq!(actions, 80);
    let mut c = cluster().connect("app", "app");
    enter(&mut c, SHERWOOD, "x");
    assert_eq!(
        sqlstate(c.query_one("SELECT tenancy.log_action('bad action; drop')", &[])),
        "22023"
    );
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        sqlstate(c.query_one("SELECT tenancy.log_action('export')", &[])),
        "42501",
        "no context"
    );
}

#[test]
fn test_a3_a_superusers_edit_deletion_reordering_or_insertion_is_found() {
    let cluster = reference_cluster();
    let mut su = cluster.connect("postgres", "app");
    // The seed wrote Sherwood's events; add a few more, and seal them all.
    su.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}');
         SELECT tenancy.log_action('a', '{{\"n\": 1}}'); SELECT tenancy.log_action('b', '{{\"n\": 2}}');
         SELECT tenancy.log_action('c'); COMMIT;
         SELECT tenancy.audit_seal();"
    ))
    .unwrap();
    let verify = |su: &mut Client| -> (bool, Option<i64>, Option<String>) {
        let r = su
            .query_one(
                &format!(
                    "SELECT ok, first_broken_seq, problem FROM tenancy.audit_verify('{SHERWOOD}')"
                ),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(verify(&mut su), (true, None, None));
    // The n-th event of Sherwood's trail (its position: sealed in event-id order).
    let nth = |su: &mut Client, n: i64| -> i64 {
        su.query_one(
            &format!("SELECT event_id FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' ORDER BY event_id OFFSET $1 LIMIT 1"),
            &[&(n - 1)],
        )
        .unwrap()
        .get(0)
    };
    // A superuser who switches the guards off can change rows; the trail shows it.
    su.batch_execute(
        "ALTER EVENT TRIGGER tenancy_guard_ddl DISABLE;
         ALTER TABLE tenancy.audit_events DISABLE TRIGGER audit_events_append_only;
         ALTER TABLE tenancy.audit_seals DISABLE TRIGGER audit_seals_append_only;",
    )
    .unwrap();
    let third = nth(&mut su, 3);
    let actor: Option<String> = su
        .query_one(
            "SELECT actor FROM tenancy.audit_events WHERE event_id = $1",
            &[&third],
        )
        .unwrap()
        .get(0);
    su.execute(
        "UPDATE tenancy.audit_events SET actor = 'someone else' WHERE event_id = $1",
        &[&third],
    )
    .unwrap();
    let (ok, at, problem) = verify(&mut su);
    assert_eq!((ok, at), (false, Some(3)), "{problem:?}");
    assert!(problem.unwrap().contains("edited"));
    su.execute(
        "UPDATE tenancy.audit_events SET actor = $2 WHERE event_id = $1",
        &[&third, &actor],
    )
    .unwrap();
    assert!(verify(&mut su).0, "restored");
    // A payload replaced by another event's (its stored digest and hash untouched).
    // The events of log_action('a') and ('b'), written by this version (on a trail updated
    // from 0.1.0 the first events are v1, whose hash covers the ciphertext itself).
    let total = count(
        &mut su,
        &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}'"),
    );
    let (a, b) = (nth(&mut su, total - 2), nth(&mut su, total - 1));
    let original: Option<Vec<u8>> = su
        .query_one(
            "SELECT payload FROM tenancy.audit_events WHERE event_id = $1",
            &[&b],
        )
        .unwrap()
        .get(0);
    assert!(original.is_some(), "log_action('b') has a payload");
    su.execute(
        "UPDATE tenancy.audit_events x SET payload = y.payload FROM tenancy.audit_events y
          WHERE x.event_id = $1 AND y.event_id = $2",
        &[&b, &a],
    )
    .unwrap();
    let (ok, at, problem) = verify(&mut su);
    assert_eq!((ok, at), (false, Some(total - 1)), "{problem:?}");
    assert!(problem.unwrap().contains("payload"));
    su.execute(
        "UPDATE tenancy.audit_events SET payload = $2 WHERE event_id = $1",
        &[&b, &original],
    )
    .unwrap();
    assert!(verify(&mut su).0, "restored");
    // Reordering two events inside their block.
    let order: Vec<i64> = su
        .query_one(
            &format!("SELECT event_ids FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}' ORDER BY block_no DESC LIMIT 1"),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(order.len() >= 2, "{order:?}");
    let mut swapped = order.clone();
    swapped.swap(0, 1);
    su.execute(
        &format!("UPDATE tenancy.audit_seals SET event_ids = $1 WHERE organization_id = '{SHERWOOD}' AND event_ids = $2"),
        &[&swapped, &order],
    )
    .unwrap();
    let (ok, _, problem) = verify(&mut su);
    assert!(!ok, "reordered");
    assert!(problem.unwrap().contains("sealed block"));
    su.execute(
        &format!("UPDATE tenancy.audit_seals SET event_ids = $2 WHERE organization_id = '{SHERWOOD}' AND event_ids = $1"),
        &[&swapped, &order],
    )
    .unwrap();
    // An event inserted behind pg_tenancy's back (a copy under a new id) is in no block.
    let stray: i64 = su
        .query_one(
            &format!(
                "INSERT INTO tenancy.audit_events
                 SELECT organization_id, NULL, nextval('tenancy.audit_event_id'), occurred_at, txid, actor, actor_verified,
                        session_role, outer_role, action, table_name, row_key, changed_columns, payload, NULL, hash,
                        payload_digest
                   FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' ORDER BY event_id DESC LIMIT 1
                 RETURNING event_id"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    let (ok, _, problem) = verify(&mut su);
    assert!(!ok);
    assert!(problem.unwrap().contains("in no sealed block"));
    su.execute(
        "DELETE FROM tenancy.audit_events WHERE event_id = $1",
        &[&stray],
    )
    .unwrap();
    // Deleting one.
    let second = nth(&mut su, 2);
    su.execute(
        "DELETE FROM tenancy.audit_events WHERE event_id = $1",
        &[&second],
    )
    .unwrap();
    let (ok, at, problem) = verify(&mut su);
    assert_eq!((ok, at), (false, Some(2)), "{problem:?}");
    assert!(problem.unwrap().contains("missing"));
}

#[test]
fn test_a4_a_reveal_followed_by_rollback_stays_on_record() {
    let mut c = cluster().connect("app", "app");
    enter(&mut c, SHERWOOD, "nurse-1");
    c.batch_execute(
        "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('555-0142', 'a4.phone'), 'a4.phone') FROM generate_series(1, 3)",
    )
    .unwrap();
    c.batch_execute("ROLLBACK").unwrap();
    let mut su = cluster().connect("postgres", "app");
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL' AND table_name = 'a4.phone'"
        ),
        1,
        "the reveal was on record before its value came back"
    );
    let end = "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL_END' AND table_name = 'a4.phone'";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while count(&mut su, end) < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The tenant sees who revealed how much, and that the transaction rolled back.
    enter(&mut c, SHERWOOD, "nurse-1");
    let row = c
        .query_one(
            "SELECT actor, changes->>'count', changes->>'transaction' FROM tenancy.my_audit_events
              WHERE action = 'REVEAL_END' AND table_name = 'a4.phone'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("nurse-1"));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("3"));
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("rolled back")
    );
    c.batch_execute("COMMIT").unwrap();
    assert_chain_ok(&mut su, SHERWOOD);
}

#[test]
fn test_reveals_are_refused_where_they_cannot_be_audited() {
    // A second database of the same server is not the audit database.
    let mut su = cluster().connect("postgres", "postgres");
    su.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_tenancy")
        .unwrap();
    su.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{SHERWOOD}')"))
        .unwrap();
    let env: Vec<u8> = su
        .query_one("SELECT tenancy.phi_encrypt('x')", &[])
        .unwrap()
        .get(0);
    let err = db_error(su.query_one("SELECT tenancy.phi_reveal($1)", &[&env]));
    assert_eq!(err.code().code(), "55000");
    assert!(
        err.detail().unwrap_or_default().contains("\"app\""),
        "{:?}",
        err.detail()
    );
    su.batch_execute("ROLLBACK").unwrap();
}

/// A reveal's record has its place in the queue before anything is revealed: a transaction
/// that reveals under many distinct labels (dummy labels sorted before the real one) is
/// refused at the 257th label, never left with a reveal that the end of the transaction
/// cannot queue; every label it did reveal under is on record.
#[test]
fn test_no_reveal_goes_unrecorded_when_labels_flood_the_queue() {
    let c = reference_cluster();
    let mut app = c.connect("app", "app");
    enter(&mut app, SHERWOOD, "flooder");
    let revealed = count(
        &mut app,
        "SELECT count(tenancy.phi_reveal(tenancy.phi_encrypt('x', 'a' || lpad(g::text, 5, '0')), 'a' || lpad(g::text, 5, '0')))
           FROM generate_series(1, 256) g",
    );
    assert_eq!(revealed, 256);
    let err = db_error(app.query_one(
        "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('x', 'patients.phone'), 'patients.phone')",
        &[],
    ));
    assert_eq!(err.code().code(), "55000", "{err:?}");
    assert!(err.detail().unwrap_or_default().contains("256"), "{err:?}");
    app.batch_execute("ROLLBACK").unwrap();
    let mut su = c.connect("postgres", "app");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut n = 0;
    while std::time::Instant::now() < deadline {
        n = count(
            &mut su,
            &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND action = 'REVEAL' AND actor = 'flooder'"),
        );
        if n == 256 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(n, 256, "every label revealed under is on record");
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL' AND table_name = 'patients.phone' AND actor = 'flooder'"
        ),
        0,
        "the refused reveal revealed nothing"
    );
    // Another tenant still reveals (the flood held at most an eighth of the queue).
    let mut conway = c.connect("app", "app");
    enter(&mut conway, CONWAY, "nurse");
    conway
        .query_one(
            "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('y', 'patients.phone'), 'patients.phone')",
            &[],
        )
        .unwrap();
    conway.batch_execute("COMMIT").unwrap();
}

#[test]
fn test_support_reads_one_clinics_history_and_is_recorded_doing_so() {
    let mut su = cluster().connect("postgres", "app");
    su.batch_execute(
        "DO $$ BEGIN CREATE ROLE support LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT EXECUTE ON FUNCTION tenancy.audit_history(text, timestamptz, timestamptz) TO support;",
    )
    .unwrap();
    // The application role may not call it.
    let mut app = cluster().connect("app", "app");
    assert_eq!(
        sqlstate(app.query(
            &format!("SELECT * FROM tenancy.audit_history('{SHERWOOD}', '-infinity', 'infinity')"),
            &[]
        )),
        "42501"
    );
    let mut support = cluster().connect("support", "app");
    let rows = support
        .query(
            &format!("SELECT action, changes IS NOT NULL FROM tenancy.audit_history('{SHERWOOD}', '-infinity', 'infinity')"),
            &[],
        )
        .unwrap();
    assert!(
        rows.iter()
            .any(|r| r.get::<_, String>(0) == "INSERT" && r.get::<_, bool>(1)),
        "decrypted history"
    );
    // The read itself is in the clinic's trail, naming the support role.
    let reads = count(
        &mut su,
        &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND action = 'SUPPORT_READ' AND outer_role = 'support'"),
    );
    assert!(reads >= 1);
}

#[test]
fn test_retention_is_one_recorded_superuser_function_and_the_chain_still_verifies() {
    let cluster = reference_cluster();
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}'); SELECT tenancy.log_action('old.1'); SELECT tenancy.log_action('old.2'); COMMIT;
         SELECT tenancy.audit_seal();"
    ))
    .unwrap();
    // Purges remove whole sealed blocks: the old events were sealed before the cutoff.
    let cutoff: String = su
        .query_one("SELECT (clock_timestamp())::text", &[])
        .unwrap()
        .get(0);
    su.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}'); SELECT tenancy.log_action('new.1'); COMMIT;
         SELECT tenancy.audit_seal();"
    ))
    .unwrap();
    let before = count(
        &mut su,
        &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}'"),
    );
    // Not for the application role.
    let mut app = cluster.connect("app", "app");
    assert_eq!(
        sqlstate(app.query_one(
            &format!("SELECT tenancy.audit_purge('{SHERWOOD}', now())"),
            &[]
        )),
        "42501"
    );
    let deleted = count(
        &mut su,
        &format!("SELECT tenancy.audit_purge('{SHERWOOD}', '{cutoff}')"),
    );
    assert!(deleted >= 2, "{deleted}");
    let after = count(
        &mut su,
        &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}'"),
    );
    assert_eq!(after, before - deleted + 1, "the purge is itself recorded");
    let actions = strings(&mut su, &format!("SELECT action FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' ORDER BY event_id"));
    assert_eq!(actions, ["new.1", "AUDIT_PURGE"]);
    assert_chain_ok(&mut su, SHERWOOD);
    // Conway's trail is untouched.
    assert_chain_ok(&mut su, CONWAY);
}

/// Seals what is pending and asserts that `org`'s whole audit trail verifies, showing the
/// problem when it does not.
pub fn assert_chain_ok(su: &mut Client, org: &str) {
    // Seal, then verify; the reveal worker may still be writing a REVEAL_END of a transaction
    // that just ended (after the seal, before the verify): seal again until nothing is left
    // (bounded), failing at once on a broken trail.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        su.batch_execute("SELECT tenancy.audit_seal()").unwrap();
        let row = su
            .query_one(
                &format!("SELECT ok, problem, unsealed FROM tenancy.audit_verify('{org}')"),
                &[],
            )
            .unwrap();
        assert!(
            row.get::<_, bool>(0),
            "{org}: {:?}",
            row.get::<_, Option<String>>(1)
        );
        let unsealed = row.get::<_, i64>(2);
        if unsealed == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{org}: everything sealed ({unsealed} left)"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// S3: an UPDATE is recorded whatever output settings the session uses: values are compared
/// and rendered under settings the trigger pins (extra_float_digits = -15 once rendered 37
/// and 39.4 both as "4e+01", and the change left no event).
#[test]
fn test_s3_session_output_settings_hide_no_update() {
    let c = &reference_cluster();
    let mut su = c.connect("postgres", "app");
    su.batch_execute(
        "CREATE TABLE public.vitals (id int PRIMARY KEY, organization_id uuid NOT NULL, temp_c float8,
                                     weight real, taken date, wait interval, raw bytea);
         GRANT SELECT, INSERT, UPDATE ON public.vitals TO app;
         SELECT tenancy.protect('public.vitals', audit => true);",
    )
    .unwrap();
    let mut app = c.connect("app", "app");
    enter(&mut app, SHERWOOD, "nurse");
    app.batch_execute(
        "INSERT INTO public.vitals VALUES (1, tenancy.current_org_id(), 37, 70.25, '2026-01-02', '1 day', '\\x00');
         COMMIT;",
    )
    .unwrap();
    for (setting, update, column) in [
        ("extra_float_digits = -15", "temp_c = 39.4", "temp_c"),
        ("extra_float_digits = -15", "weight = 70.26", "weight"),
        ("DateStyle = 'SQL, DMY'", "taken = '2026-02-01'", "taken"),
        (
            "IntervalStyle = 'sql_standard'",
            "wait = '1 day 1 second'",
            "wait",
        ),
        ("bytea_output = 'escape'", "raw = '\\x01'", "raw"),
    ] {
        enter(&mut app, SHERWOOD, "nurse");
        app.batch_execute(&format!(
            "SET LOCAL {setting}; UPDATE public.vitals SET {update} WHERE id = 1; COMMIT;"
        ))
        .unwrap();
        enter(&mut app, SHERWOOD, "nurse");
        let last = app
            .query_one(
                "SELECT action, changed_columns, changes::text FROM tenancy.my_audit_events
                  WHERE table_name = 'public.vitals' ORDER BY event_id DESC LIMIT 1",
                &[],
            )
            .unwrap();
        app.batch_execute("COMMIT").unwrap();
        let (action, changed, changes): (String, Vec<String>, String) =
            (last.get(0), last.get(1), last.get(2));
        assert_eq!(action, "UPDATE", "{setting}: {update} was recorded");
        assert_eq!(changed, [column], "{setting}: {changes}");
        assert!(
            !changes.contains("e+01"),
            "{setting}: rendered under pinned settings: {changes}"
        );
    }
}

/// The trail's own event names cannot be forged by the application through log_action.
#[test]
fn test_log_action_refuses_the_trails_own_event_names() {
    let mut c = cluster().connect("app", "app");
    // A tenant of its own: other tests count Sherwood's and Conway's events.
    const SHERWOOD: &str = "0d000000-0000-4000-8000-00000000000d";
    for reserved in [
        "REVEAL",
        "SUPPORT_READ",
        "AUDIT_PURGE",
        "UPDATE",
        "INSERT",
        "DELETE",
        "NEW_KIND",
    ] {
        enter(&mut c, SHERWOOD, "user-1");
        assert_eq!(
            sqlstate(c.query_one("SELECT tenancy.log_action($1)", &[&reserved])),
            "42939",
            "{reserved}"
        );
        c.batch_execute("ROLLBACK").unwrap();
    }
    enter(&mut c, SHERWOOD, "user-1");
    for allowed in ["export.csv", "Reveal", "REVEAL.export", "login"] {
        let ok: bool = c
            .query_one("SELECT tenancy.log_action($1)", &[&allowed])
            .unwrap()
            .get(0);
        assert!(ok, "{allowed}");
    }
    c.batch_execute("COMMIT").unwrap();
}

/// II-6/9: a schema protected with `audit => true` stays audited. Tables created there later,
/// moved there, or attached as partitions of its tables get the audit triggers and their
/// writes reach the trail; a protected table there without audit is reported.
#[test]
fn test_tables_created_later_in_an_audited_schema_are_audited() {
    let c = reference_cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(
            "CREATE TABLE clinic.later (organization_id uuid NOT NULL, id int, note text);
             CREATE TABLE public.moved (organization_id uuid NOT NULL, id int, note text);
             ALTER TABLE public.moved SET SCHEMA clinic;
             CREATE TABLE clinic.parted (organization_id uuid NOT NULL, k int, note text) PARTITION BY LIST (k);
             CREATE TABLE public.part1 (organization_id uuid NOT NULL, k int, note text);
             ALTER TABLE clinic.parted ATTACH PARTITION public.part1 FOR VALUES IN (1);
             GRANT SELECT, INSERT ON clinic.later, clinic.moved, clinic.parted TO app;",
        )
        .unwrap();
    let mut su = c.connect("postgres", "app");
    for t in [
        "clinic.later",
        "clinic.moved",
        "clinic.parted",
        "public.part1",
    ] {
        assert_eq!(
            strings(
                &mut su,
                &format!("SELECT audited::text FROM tenancy.protected_tables WHERE rel = '{t}'::regclass")
            ),
            vec!["true".to_string()],
            "{t} is protected and audited"
        );
        assert_eq!(
            count(
                &mut su,
                &format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{t}'::regclass AND tgname LIKE 'tenancy_audit%' AND tgenabled = 'A'")
            ),
            3,
            "{t} has the audit triggers"
        );
    }
    let mut app = c.connect("app", "app");
    app.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}');
         INSERT INTO clinic.later (id, note) VALUES (1, 'written later');
         INSERT INTO clinic.parted (k, note) VALUES (1, 'into the attached partition');
         COMMIT;"
    ))
    .unwrap();
    assert_eq!(
        count(
            &mut su,
            &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND action = 'INSERT' AND table_name IN ('clinic.later', 'public.part1', 'clinic.parted')")
        ),
        2,
        "both writes are in the trail"
    );
    // Protected again without audit (by hand): the report says the schema wants it audited.
    su.batch_execute(
        "SELECT tenancy.unprotect('clinic.moved'); SELECT tenancy.protect('clinic.moved');",
    )
    .unwrap();
    let found = strings(
        &mut su,
        "SELECT severity || ' ' || object || ': ' || finding FROM tenancy.isolation_report() WHERE object = 'clinic.moved'",
    );
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("high clinic.moved: not audited, in schema clinic")),
        "{found:?}"
    );
    su.batch_execute("SELECT tenancy.protect('clinic.moved', audit => true)")
        .unwrap();
    assert_eq!(
        strings(
            &mut su,
            "SELECT finding FROM tenancy.isolation_report() WHERE object = 'clinic.moved'"
        ),
        Vec::<String>::new()
    );
}

/// The class behind a forged trail: an audit trigger that does not read the column the tenant
/// floor checks (its argument names another column, or the column was renamed or replaced
/// under it) would file a writer's row under any tenant named in that column. A writer bound
/// by RLS to one tenant files events of that tenant's rows only (42501 otherwise, nothing
/// filed); a superuser, whom RLS does not bind, still files each row under its own value.
#[test]
fn test_a7b_a_writer_files_events_under_its_own_tenant_only() {
    let c = Cluster::start_with_phi(&[]);
    let mut su = c.connect("postgres", "app");
    su.batch_execute(
        "CREATE EXTENSION pg_tenancy;
         CREATE SCHEMA probe;
         GRANT USAGE ON SCHEMA probe TO app;
         CREATE TABLE probe.notes (organization_id uuid NOT NULL, id int PRIMARY KEY, victim text);
         GRANT SELECT, INSERT ON probe.notes TO app;
         SELECT tenancy.protect('probe.notes', audit => true);
         -- the misattached trigger: events filed under another column's value
         CREATE TRIGGER misattached AFTER INSERT ON probe.notes REFERENCING NEW TABLE AS n
           FOR EACH STATEMENT EXECUTE FUNCTION tenancy.audit_trigger('victim');",
    )
    .unwrap();
    let mut app = c.connect("app", "app");
    enter(&mut app, SHERWOOD, "user-1");
    let e = db_error(app.batch_execute(&format!(
        "INSERT INTO probe.notes (organization_id, id, victim) VALUES ('{SHERWOOD}', 1, '{CONWAY}')"
    )));
    assert_eq!(e.code().code(), "42501", "{e:?}");
    assert!(e.message().contains("another tenant"), "{e:?}");
    app.batch_execute("ROLLBACK").unwrap();
    // The same writer's own tenant in both columns is filed twice (once per trigger).
    enter(&mut app, SHERWOOD, "user-1");
    app.batch_execute(&format!(
        "INSERT INTO probe.notes (organization_id, id, victim) VALUES ('{SHERWOOD}', 2, '{SHERWOOD}'); COMMIT"
    ))
    .unwrap();
    // A superuser is not bound to one tenant: its row is filed under each column's value.
    su.batch_execute(&format!(
        "INSERT INTO probe.notes (organization_id, id, victim) VALUES ('{SHERWOOD}', 3, '{CONWAY}')"
    ))
    .unwrap();
    let filed = strings(
        &mut su,
        "SELECT organization_id || ' ' || row_key FROM tenancy.audit_events
          WHERE table_name = 'probe.notes' ORDER BY row_key, organization_id",
    );
    assert_eq!(
        filed,
        [
            format!("{SHERWOOD} {{\"id\":\"2\"}}"),
            format!("{SHERWOOD} {{\"id\":\"2\"}}"),
            format!("{SHERWOOD} {{\"id\":\"3\"}}"),
            format!("{CONWAY} {{\"id\":\"3\"}}"),
        ]
    );
}
