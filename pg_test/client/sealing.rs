//! II-6: audit events are written without waiting for any other writer and sealed after
//! commit. Writers of one tenant run concurrently under every isolation level; no tenant's
//! open transaction holds up another tenant, the reveal worker or the sealer; a crash between
//! commit and sealing loses nothing; an old key can be retired on an audited database.

use crate::audit::assert_chain_ok;
use crate::harness::{count, keyring_tool, strings, Cluster};
use crate::rls::{reference_cluster, CONWAY, SHERWOOD};
use postgres::Client;
use std::time::{Duration, Instant};

fn enter(c: &mut Client, isolation: &str, org: &str) {
    c.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL {isolation}; SELECT tenancy.set_org('{org}', 'writer')"
    ))
    .unwrap();
}

/// Polls (up to 15 s) until `sql` (a count) reaches `want`; returns the last value.
fn wait_for(su: &mut Client, sql: &str, want: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = count(su, sql);
        if n == want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unsealed(su: &mut Client, org: &str) -> i64 {
    count(
        su,
        &format!("SELECT unsealed FROM tenancy.audit_verify('{org}')"),
    )
}

#[test]
fn test_writers_of_one_tenant_do_not_wait_for_each_other() {
    let c = reference_cluster();
    let mut first = c.connect("app", "app");
    let mut second = c.connect("app", "app");
    second.batch_execute("SET lock_timeout = '1s'").unwrap();
    // The first writer of Sherwood stays open after its insert; the second commits within
    // its lock_timeout of 1 s (0.2.0 made it wait for the first's chain head).
    enter(&mut first, "READ COMMITTED", SHERWOOD);
    first
        .batch_execute("INSERT INTO clinic.reviews (rating, body) VALUES (1, 'first, open')")
        .unwrap();
    enter(&mut second, "READ COMMITTED", SHERWOOD);
    second
        .batch_execute("INSERT INTO clinic.reviews (rating, body) VALUES (2, 'second'); COMMIT;")
        .expect("the second writer of the tenant does not wait for the first");
    // Neither another tenant's writes, nor its reveals, nor the sealer wait for Sherwood's
    // open transaction.
    let mut conway = c.connect("app", "app");
    conway.batch_execute("SET lock_timeout = '1s'").unwrap();
    enter(&mut conway, "READ COMMITTED", CONWAY);
    conway
        .batch_execute(
            "INSERT INTO clinic.reviews (rating, body) VALUES (3, 'conway');
             SELECT tenancy.phi_reveal(tenancy.phi_encrypt('x', 'sealing.label'), 'sealing.label');
             COMMIT;",
        )
        .unwrap();
    let mut su = c.connect("postgres", "app");
    assert_eq!(
        wait_for(
            &mut su,
            "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL' AND table_name = 'sealing.label'",
            1
        ),
        1,
        "the reveal worker recorded Conway's reveal"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while unsealed(&mut su, CONWAY) > 0 || unsealed(&mut su, SHERWOOD) > 0 {
        assert!(
            Instant::now() < deadline,
            "the worker seals committed events while a transaction of Sherwood stays open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    first.batch_execute("COMMIT").unwrap();
    // Under REPEATABLE READ and SERIALIZABLE, two writers of one tenant that began together
    // both commit (0.2.0: duplicate key on the tip the second read with its old snapshot).
    for isolation in ["REPEATABLE READ", "SERIALIZABLE"] {
        enter(&mut first, isolation, SHERWOOD);
        enter(&mut second, isolation, SHERWOOD);
        for c in [&mut first, &mut second] {
            c.batch_execute("SELECT count(*) FROM clinic.services")
                .unwrap();
        }
        first
            .batch_execute("INSERT INTO clinic.reviews (rating, body) VALUES (4, 'rr 1'); COMMIT;")
            .unwrap_or_else(|e| panic!("{isolation}, first: {e:?}"));
        second
            .batch_execute("INSERT INTO clinic.reviews (rating, body) VALUES (5, 'rr 2'); COMMIT;")
            .unwrap_or_else(|e| panic!("{isolation}, second: {e:?}"));
    }
    assert_chain_ok(&mut su, SHERWOOD);
    assert_chain_ok(&mut su, CONWAY);
    assert_eq!(
        count(
            &mut su,
            &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND table_name = 'clinic.reviews' AND action = 'INSERT' AND txid IS NOT NULL AND event_id > 0 AND changed_columns IS NOT NULL")
        ),
        count(
            &mut su,
            &format!("SELECT count(*) FROM clinic.reviews WHERE organization_id = '{SHERWOOD}'")
        ),
        "one event per row"
    );
}

/// kill -9 of the postmaster between commit and sealing: the committed events and their
/// pending rows survive crash recovery, and the worker seals them after the restart.
#[test]
fn test_events_committed_before_a_crash_are_sealed_after_it() {
    let c = reference_cluster();
    let mut su = c.connect("postgres", "app");
    su.batch_execute("SELECT tenancy.audit_seal()").unwrap();
    // Hold the sealer off (its lock conflicts with SHARE), so the events are surely unsealed.
    let mut blocker = c.connect("postgres", "app");
    blocker
        .batch_execute("BEGIN; LOCK TABLE tenancy.audit_seals IN SHARE MODE")
        .unwrap();
    let mut app = c.connect("app", "app");
    enter(&mut app, "READ COMMITTED", SHERWOOD);
    app.batch_execute(
        "INSERT INTO clinic.reviews (rating, body) SELECT 1, 'crash ' || g FROM generate_series(1, 500) g; COMMIT;",
    )
    .unwrap();
    assert!(unsealed(&mut su, SHERWOOD) >= 500, "committed, not sealed");
    drop((su, blocker, app));
    c.crash();
    c.start_again();
    let mut su = c.connect("postgres", "app");
    let deadline = Instant::now() + Duration::from_secs(30);
    while unsealed(&mut su, SHERWOOD) > 0 {
        assert!(
            Instant::now() < deadline,
            "the worker seals after the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_chain_ok(&mut su, SHERWOOD);
    assert_eq!(
        count(
            &mut su,
            &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND row_key IS NOT NULL AND table_name = 'clinic.reviews' AND action = 'INSERT'")
        ),
        count(
            &mut su,
            &format!("SELECT count(*) FROM clinic.reviews WHERE organization_id = '{SHERWOOD}'")
        ),
        "nothing lost"
    );
}

/// Retiring a PHI key on an audited database: a new key, PHI columns rotated, audit
/// payloads re-encrypted (their commitments unchanged), the old key removed from the ring:
/// the trail still verifies and decrypts.
#[test]
fn test_an_old_key_is_retired_on_an_audited_database() {
    let c: Cluster = reference_cluster();
    let mut su = c.connect("postgres", "app");
    su.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}'); SELECT tenancy.log_action('before.rotation', '{{\"k\": 1}}'); COMMIT;
         SELECT tenancy.audit_seal();"
    ))
    .unwrap();
    let before = strings(
        &mut su,
        &format!("SELECT encode(hash, 'hex') FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}' ORDER BY block_no"),
    );
    let path = c.phi_key_file.clone().unwrap();
    keyring_tool(&["add", path.to_str().unwrap(), "--activate"]);
    c.reload();
    c.wait_for_active_key(2);
    // Every PHI column, then the trail.
    let columns: Vec<(String, String)> = su
        .query(
            "SELECT a.attrelid::regclass::text, a.attname::text FROM pg_attribute a JOIN tenancy.protected_tables p ON p.rel = a.attrelid
              WHERE a.atttypid = 'tenancy.phi'::regtype AND NOT a.attisdropped",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (table, column) in &columns {
        su.batch_execute(&format!(
            "CALL tenancy.phi_rotate_all('{table}', '{column}')"
        ))
        .unwrap();
    }
    let mut rekeyed = 0;
    loop {
        let n = count(&mut su, "SELECT tenancy.audit_rekey(NULL, 100)");
        if n == 0 {
            break;
        }
        rekeyed += n;
    }
    assert!(rekeyed > 0, "payloads were under key 1");
    assert_eq!(
        count(&mut su, "SELECT count(*) FROM tenancy.audit_events WHERE seq IS NULL AND payload IS NOT NULL AND tenancy.phi_key_id(payload) <> 2"),
        0
    );
    // On a trail updated from 0.1.0, the v1 events (their hash covers the ciphertext) keep
    // key 1: documented, readable until the key goes, purged before it does.
    let v1 = count(
        &mut su,
        "SELECT count(*) FROM tenancy.audit_events WHERE seq IS NOT NULL AND payload IS NOT NULL AND tenancy.phi_key_id(payload) <> 2",
    );
    assert_eq!(
        v1,
        count(&mut su, "SELECT count(*) FROM tenancy.audit_events WHERE seq IS NOT NULL AND payload IS NOT NULL"),
        "v1 payloads are left as they are"
    );
    keyring_tool(&["retire", path.to_str().unwrap(), "1"]);
    c.reload();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(
        &mut c.connect("postgres", "app"),
        "SELECT count(*) FROM tenancy.phi_key_status()",
    ) != 1
    {
        assert!(Instant::now() < deadline, "key 1 is gone from the ring");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut su = c.connect("postgres", "app");
    assert_chain_ok(&mut su, SHERWOOD);
    assert_chain_ok(&mut su, CONWAY);
    let after = strings(
        &mut su,
        &format!("SELECT encode(hash, 'hex') FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}' ORDER BY block_no"),
    );
    assert_eq!(
        after[..before.len()],
        before[..],
        "the sealed chain is unchanged"
    );
    let mut app = c.connect("app", "app");
    enter(&mut app, "READ COMMITTED", SHERWOOD);
    let details = strings(
        &mut app,
        "SELECT changes::text FROM tenancy.my_audit_events WHERE action = 'before.rotation'",
    );
    assert_eq!(details, [r#"{"k": 1}"#]);
    let names = strings(
        &mut app,
        "SELECT tenancy.phi_reveal(first_name) FROM clinic.patients ORDER BY id LIMIT 1",
    );
    assert_eq!(names.len(), 1, "PHI columns decrypt under key 2");
    app.batch_execute("COMMIT").unwrap();
}

/// A round seals at most 20,000 events and files the rest of a large transaction as pending
/// again: a 45,000-row statement is sealed over three rounds or more, each event exactly once,
/// in blocks of at most 10,000, and the trail verifies.
#[test]
fn test_a_large_transaction_is_sealed_over_several_rounds() {
    let c = reference_cluster();
    let mut app = c.connect("app", "app");
    enter(&mut app, "READ COMMITTED", SHERWOOD);
    app.batch_execute(
        "INSERT INTO clinic.reviews (rating, body) SELECT 1, 'bulk ' || g FROM generate_series(1, 45000) g; COMMIT;",
    )
    .unwrap();
    let mut su = c.connect("postgres", "app");
    assert_chain_ok(&mut su, SHERWOOD);
    let blocks: Vec<(i32, i64)> = su
        .query(
            &format!("SELECT event_count, first_seq FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}' ORDER BY block_no"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(blocks.iter().all(|b| b.0 <= 10_000), "{blocks:?}");
    assert!(
        blocks.len() >= 5,
        "45,000 events in blocks of at most 10,000: {blocks:?}"
    );
    assert_eq!(
        count(
            &mut su,
            &format!("SELECT count(*) FROM (SELECT unnest(event_ids) FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}') s")
        ),
        count(
            &mut su,
            &format!("SELECT count(DISTINCT id) FROM (SELECT unnest(event_ids) AS id FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}') s")
        ),
        "no event sealed twice"
    );
}

/// The sealer builds blocks from the pending rows written with the events, never reading
/// the events: a pending row pg_tenancy did not write (ids and hashes that do not match) is
/// set aside with a warning and blocks nobody, and an event deleted before it was sealed is
/// reported by audit_verify as missing from its block.
#[test]
fn test_a_malformed_pending_row_is_set_aside_and_an_event_deleted_before_sealing_is_found() {
    let c = reference_cluster();
    let mut su = c.connect("postgres", "app");
    su.batch_execute(
        "INSERT INTO tenancy.audit_pending (organization_id, event_ids, hashes, occurred_at)
         VALUES ('not-a-tenant-of-ours', '{1,2}', '\\x00', now())",
    )
    .unwrap();
    let mut app = c.connect("app", "app");
    enter(&mut app, "READ COMMITTED", CONWAY);
    app.batch_execute(
        "INSERT INTO clinic.reviews (rating, body) VALUES (4, 'sealed past a bad row'); COMMIT;",
    )
    .unwrap();
    assert_chain_ok(&mut su, CONWAY);
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.audit_pending WHERE organization_id = 'not-a-tenant-of-ours'"
        ),
        0,
        "the malformed row was taken out of the sealer's way"
    );
    assert!(
        c.log()
            .contains("a malformed row of tenancy.audit_pending was discarded"),
        "the discarded row is in the log"
    );

    // An event deleted between its commit and its sealing (the sealer held off by a lock
    // that conflicts with its own) is sealed from its pending row all the same, so the
    // trail shows the gap.
    let mut holder = c.connect("postgres", "app");
    holder
        .batch_execute("BEGIN; LOCK TABLE tenancy.audit_seals IN SHARE MODE")
        .unwrap();
    enter(&mut app, "READ COMMITTED", CONWAY);
    app.batch_execute(
        "INSERT INTO clinic.reviews (rating, body) VALUES (2, 'deleted before sealing'); COMMIT;",
    )
    .unwrap();
    su.batch_execute(
        "ALTER EVENT TRIGGER tenancy_guard_ddl DISABLE;
         ALTER TABLE tenancy.audit_events DISABLE TRIGGER audit_events_append_only;
         DELETE FROM tenancy.audit_events WHERE action = 'INSERT' AND table_name = 'clinic.reviews'
            AND event_id = (SELECT max(event_id) FROM tenancy.audit_events);",
    )
    .unwrap();
    holder.batch_execute("COMMIT").unwrap();
    su.batch_execute("SELECT tenancy.audit_seal()").unwrap();
    let row = su
        .query_one(
            &format!("SELECT ok, problem FROM tenancy.audit_verify('{CONWAY}')"),
            &[],
        )
        .unwrap();
    assert!(!row.get::<_, bool>(0), "a sealed event is missing");
    let problem: String = row.get(1);
    assert!(problem.contains("missing"), "{problem}");
}

/// II-7: the reveal worker reads the configuration again after a reload signal, as every
/// backend does, so after the runbook's add key, activate, reload, its REVEAL payloads are
/// sealed under the new key (it kept key 1 for good before).
#[test]
fn test_the_reveal_worker_picks_up_a_key_rotation_on_reload() {
    let c = reference_cluster();
    let mut su = c.connect("postgres", "app");
    let mut app = c.connect("app", "app");
    let newest_reveal_key = |su: &mut Client, label: &str| -> i64 {
        count(
            su,
            &format!(
                "SELECT coalesce(max((get_byte(payload, 4)::bigint << 24) | (get_byte(payload, 5) << 16)
                                     | (get_byte(payload, 6) << 8) | get_byte(payload, 7)), 0)
                   FROM tenancy.audit_events WHERE action = 'REVEAL' AND table_name = '{label}'"
            ),
        )
    };
    let reveal = |app: &mut Client, label: &str| {
        enter(app, "READ COMMITTED", SHERWOOD);
        app.batch_execute(&format!(
            "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('x', '{label}'), '{label}'); COMMIT;"
        ))
        .unwrap();
    };
    reveal(&mut app, "rotation.before");
    let events = "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL' AND table_name LIKE 'rotation.%'";
    assert_eq!(wait_for(&mut su, events, 1), 1, "the reveal was recorded");
    assert_eq!(newest_reveal_key(&mut su, "rotation.before"), 1);
    let path = c.phi_key_file.clone().unwrap();
    keyring_tool(&["add", path.to_str().unwrap(), "--activate"]);
    c.reload();
    c.wait_for_active_key(2);
    reveal(&mut app, "rotation.after");
    assert_eq!(
        wait_for(&mut su, events, 2),
        2,
        "the second reveal was recorded"
    );
    assert_eq!(
        newest_reveal_key(&mut su, "rotation.after"),
        2,
        "the worker sealed the REVEAL payload under the key activated by the reload"
    );
    assert_chain_ok(&mut su, SHERWOOD);
}

fn digest_of(su: &mut Client, org: &str) -> String {
    su.query_one(
        &format!("SELECT digest FROM tenancy.audit_digest() WHERE organization_id = '{org}'"),
        &[],
    )
    .unwrap()
    .get(0)
}

fn verify_against(su: &mut Client, org: &str, digest: &str) -> (bool, Option<String>) {
    let r = su
        .query_one(
            "SELECT ok, problem FROM tenancy.audit_verify($1, $2)",
            &[&org, &digest],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

/// II-7: a digest kept outside the database proves later trails extend it: deleting the
/// newest events (blocks, heads and all) and rewriting the trail from an edit on with a
/// consistent new chain both verify on their own, and both fail against the digest.
#[test]
fn test_digests_kept_outside_find_truncation_and_a_rewritten_consistent_chain() {
    let c = reference_cluster();
    let mut su = c.connect("postgres", "app");
    let write = |su: &mut Client, what: &str| {
        su.batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{SHERWOOD}'); SELECT tenancy.log_action('{what}'); COMMIT; SELECT tenancy.audit_seal();"
        ))
        .unwrap();
    };
    write(&mut su, "digest.one");
    let first = digest_of(&mut su, SHERWOOD);
    assert!(first.starts_with("pg_tenancy-digest:1:"), "{first}");
    assert_eq!(verify_against(&mut su, SHERWOOD, &first), (true, None));
    write(&mut su, "digest.two");
    let second = digest_of(&mut su, SHERWOOD);
    assert_ne!(first, second);
    assert_eq!(
        verify_against(&mut su, SHERWOOD, &first),
        (true, None),
        "the trail extends the older digest"
    );
    // Malformed, or another tenant's: a clear error.
    let e = crate::harness::db_error(su.query_one(
        "SELECT * FROM tenancy.audit_verify($1, 'junk')",
        &[&SHERWOOD],
    ));
    assert_eq!(e.code().code(), "22023");
    let e = crate::harness::db_error(su.query_one(
        "SELECT * FROM tenancy.audit_verify($1, $2)",
        &[&CONWAY, &second],
    ));
    assert_eq!(e.code().code(), "22023");

    // A superuser truncates: the newest block, its events and the head go.
    su.batch_execute(&format!(
        "ALTER EVENT TRIGGER tenancy_guard_ddl DISABLE;
         ALTER TABLE tenancy.audit_events DISABLE TRIGGER audit_events_append_only;
         ALTER TABLE tenancy.audit_seals DISABLE TRIGGER audit_seals_append_only;
         DELETE FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}'
            AND event_id = ANY ((SELECT event_ids FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}' ORDER BY block_no DESC LIMIT 1)::bigint[]);
         DELETE FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}'
            AND block_no = (SELECT max(block_no) FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}');
         UPDATE tenancy.audit_chain_heads h SET last_block = s.block_no, last_seq = s.first_seq + s.event_count - 1, last_hash = s.hash
           FROM tenancy.audit_seals s WHERE h.organization_id = '{SHERWOOD}' AND s.organization_id = h.organization_id
            AND s.block_no = (SELECT max(block_no) FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}');"
    ))
    .unwrap();
    assert_chain_ok(&mut su, SHERWOOD); // alone, the shorter trail verifies
    let (ok, problem) = verify_against(&mut su, SHERWOOD, &second);
    assert!(!ok);
    assert!(
        problem.as_deref().unwrap_or("").contains("truncated"),
        "{problem:?}"
    );

    // A superuser deletes an older event and re-seals everything into a new, consistent chain.
    write(&mut su, "digest.three");
    let third = digest_of(&mut su, SHERWOOD);
    su.batch_execute(&format!(
        "DELETE FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND action = 'digest.one';
         DELETE FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}';
         DELETE FROM tenancy.audit_chain_heads WHERE organization_id = '{SHERWOOD}';
         INSERT INTO tenancy.audit_pending (organization_id, event_ids, hashes, occurred_at)
         SELECT organization_id, array_agg(event_id ORDER BY event_id), string_agg(hash, ''::bytea ORDER BY event_id), max(occurred_at)
           FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND seq IS NULL GROUP BY organization_id;
         SELECT tenancy.audit_seal();"
    ))
    .unwrap();
    let alone: (bool, Option<String>) = {
        let r = su
            .query_one(
                &format!("SELECT ok, problem FROM tenancy.audit_verify('{SHERWOOD}')"),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        alone,
        (true, None),
        "the forged chain is consistent on its own"
    );
    let (ok, problem) = verify_against(&mut su, SHERWOOD, &third);
    assert!(!ok, "the digest shows the rewrite");
    let p = problem.unwrap_or_default();
    assert!(p.contains("rewritten") || p.contains("truncated"), "{p}");
}

/// II-7: with `tenancy.audit_digest_file`, the sealer appends every tenant's digest line to a
/// file outside the data directory once per interval; a line verifies as it is; a path inside
/// the data directory is refused with a WARNING.
#[test]
fn test_the_sealer_appends_digests_to_a_file_outside_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::process::Command::new("chown")
        .args(["postgres", dir.path().to_str().unwrap()])
        .output()
        .ok();
    let file = dir.path().join("digests.log");
    let c = reference_cluster();
    let mut su = c.connect("postgres", "app");
    for sql in [
        format!(
            "ALTER SYSTEM SET tenancy.audit_digest_file = '{}'",
            file.display()
        ),
        "ALTER SYSTEM SET tenancy.audit_digest_interval = 1".into(),
        "SELECT pg_reload_conf()".into(),
    ] {
        su.batch_execute(&sql).unwrap();
    }
    su.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}'); SELECT tenancy.log_action('digest.file'); COMMIT;"
    ))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if let Some(l) = text.lines().rev().find(|l| l.contains(SHERWOOD)) {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no digest line written: {}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        verify_against(&mut su, SHERWOOD, &line),
        (true, None),
        "{line}"
    );
    // The worker records the time after it has written the line: wait for it (CI saw the
    // status read in between on a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: Option<String> = su
            .query_one("SELECT last_digest_at::text FROM tenancy.audit_status", &[])
            .unwrap()
            .get(0);
        if status.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the status view shows the last digest"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for sql in [
        format!(
            "ALTER SYSTEM SET tenancy.audit_digest_file = '{}'",
            c.dir.join("digests.log").display()
        ),
        "SELECT pg_reload_conf()".into(),
    ] {
        su.batch_execute(&sql).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.log().contains("is inside the data directory") {
        assert!(
            Instant::now() < deadline,
            "a digest file inside the data directory is refused"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!c.dir.join("digests.log").exists());
}

/// II-7's attacker pass, each variant refused or found: the schema owner (the database's
/// owner) can no longer lock pg_tenancy's tables with maintenance commands (VACUUM FULL
/// queued behind a reader stalled every audited write and both workers); a purged prefix
/// without its AUDIT_PURGE event is reported; and the superuser edits that verified before
/// (a column name holding U+001F, a block's newest_event_at, a link on a sealed event) or
/// raised XX000 (NULL array elements) are found as edits.
#[test]
fn test_the_ii7_attacker_pass_variants_are_refused_or_found() {
    let c = reference_cluster();
    let mut owner = c.connect("owner", "app");
    for sql in [
        "VACUUM FULL tenancy.audit_events",
        "VACUUM tenancy.audit_pending",
        "ANALYZE tenancy.audit_seals",
        "VACUUM FULL",
        "REINDEX DATABASE app",
        "REINDEX SCHEMA tenancy",
    ] {
        let e = crate::harness::db_error(owner.batch_execute(sql));
        assert_eq!(e.code().code(), "42501", "{sql}: {e:?}");
        assert!(
            e.message().contains("pg_tenancy's own tables"),
            "{sql}: {}",
            e.message()
        );
    }
    owner.batch_execute("BEGIN").unwrap();
    let e = crate::harness::db_error(owner.batch_execute("ANALYZE"));
    assert_eq!(e.code().code(), "42501", "{e:?}");
    owner.batch_execute("ROLLBACK").unwrap();
    // In a DO block its locks would last until the block ends (a second pass found it).
    let e = crate::harness::db_error(
        owner.batch_execute("DO $$ BEGIN ANALYZE; PERFORM pg_sleep(0.1); END $$"),
    );
    assert_eq!(e.code().code(), "42501", "{e:?}");
    // PostgreSQL's own refusal of a VACUUM in a transaction block names no value: not withheld.
    let e = crate::harness::db_error(owner.batch_execute("VACUUM; SELECT 1"));
    assert_eq!(e.code().code(), "25001", "{e:?}");
    assert!(
        e.message()
            .contains("cannot run inside a transaction block"),
        "{}",
        e.message()
    );
    // The owner's own maintenance, and database-wide short locks as autovacuum takes, stay.
    owner.batch_execute("VACUUM clinic.reviews").unwrap();
    owner.batch_execute("ANALYZE clinic.reviews").unwrap();
    owner.batch_execute("VACUUM").unwrap();
    owner.batch_execute("ANALYZE").unwrap();

    let mut su = c.connect("postgres", "app");
    for what in ["a", "b", "c"] {
        su.batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{SHERWOOD}'); SELECT tenancy.log_action('pass.{what}', '{{\"k\": 1}}'); COMMIT; SELECT tenancy.audit_seal();"
        ))
        .unwrap();
    }
    su.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}');
         INSERT INTO clinic.reviews (rating, body) VALUES (3, 'two columns'); COMMIT;
         SELECT tenancy.audit_seal();
         ALTER EVENT TRIGGER tenancy_guard_ddl DISABLE;
         ALTER TABLE tenancy.audit_events DISABLE TRIGGER audit_events_append_only;
         ALTER TABLE tenancy.audit_seals DISABLE TRIGGER audit_seals_append_only;"
    ))
    .unwrap();
    assert_chain_ok(&mut su, SHERWOOD);
    let verdict = |su: &mut Client| -> (bool, String) {
        let r = su
            .query_one(
                &format!(
                    "SELECT ok, coalesce(problem, '') FROM tenancy.audit_verify('{SHERWOOD}')"
                ),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let event: i64 = su
        .query_one(
            &format!("SELECT max(event_id) FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' AND table_name = 'clinic.reviews'"),
            &[],
        )
        .unwrap()
        .get(0);
    let original: Vec<String> = su
        .query_one(
            "SELECT changed_columns FROM tenancy.audit_events WHERE event_id = $1",
            &[&event],
        )
        .unwrap()
        .get(0);
    assert!(original.len() >= 2, "{original:?}");
    for (what, edit) in [
        (
            "two column names joined by U+001F",
            format!("UPDATE tenancy.audit_events SET changed_columns = ARRAY[changed_columns[1] || chr(31) || changed_columns[2]] || changed_columns[3:] WHERE event_id = {event}"),
        ),
        (
            "a NULL column name",
            format!("UPDATE tenancy.audit_events SET changed_columns = changed_columns || ARRAY[NULL]::text[] WHERE event_id = {event}"),
        ),
        (
            "a link on a sealed event",
            format!("UPDATE tenancy.audit_events SET prev_hash = hash WHERE event_id = {event}"),
        ),
    ] {
        su.batch_execute(&edit).unwrap();
        let (ok, problem) = verdict(&mut su);
        assert!(!ok, "{what} is found");
        assert!(problem.contains(&format!("event {event}")), "{what}: {problem}");
        su.execute(
            "UPDATE tenancy.audit_events SET changed_columns = $2, prev_hash = NULL WHERE event_id = $1",
            &[&event, &original],
        )
        .unwrap();
        assert_eq!(verdict(&mut su), (true, String::new()), "restored after {what}");
    }
    for (what, edit, undo) in [
        (
            "a block's newest_event_at",
            "UPDATE tenancy.audit_seals SET newest_event_at = newest_event_at - interval '10 years' WHERE organization_id = $1 AND block_no = 1",
            "UPDATE tenancy.audit_seals SET newest_event_at = newest_event_at + interval '10 years' WHERE organization_id = $1 AND block_no = 1",
        ),
        (
            "a block's event list re-indexed",
            "UPDATE tenancy.audit_seals SET event_ids = ('[0:' || (cardinality(event_ids) - 1) || ']=' || event_ids::text)::bigint[] WHERE organization_id = $1 AND block_no = 1",
            "UPDATE tenancy.audit_seals SET event_ids = ('{' || array_to_string(event_ids, ',') || '}')::bigint[] WHERE organization_id = $1 AND block_no = 1",
        ),
        (
            "a NULL event id in a block",
            "UPDATE tenancy.audit_seals SET event_ids = event_ids || NULL::bigint WHERE organization_id = $1 AND block_no = 1",
            "UPDATE tenancy.audit_seals SET event_ids = event_ids[1:cardinality(event_ids) - 1] WHERE organization_id = $1 AND block_no = 1",
        ),
    ] {
        su.execute(edit, &[&SHERWOOD]).unwrap();
        let (ok, problem) = verdict(&mut su);
        assert!(!ok, "{what} is found");
        assert!(problem.contains("sealed block 1"), "{what}: {problem}");
        su.execute(undo, &[&SHERWOOD]).unwrap();
        assert_eq!(verdict(&mut su), (true, String::new()), "restored after {what}");
    }
    // A purge position out of range is an edit, not an overflow.
    su.execute(
        "UPDATE tenancy.audit_chain_heads SET purged_through_seq = 9223372036854775807 WHERE organization_id = $1",
        &[&SHERWOOD],
    )
    .unwrap();
    let (ok, problem) = verdict(&mut su);
    assert!(!ok && problem.contains("out of range"), "{problem}");
    su.execute(
        "UPDATE tenancy.audit_chain_heads SET purged_through_seq = 0 WHERE organization_id = $1",
        &[&SHERWOOD],
    )
    .unwrap();
    assert_eq!(verdict(&mut su), (true, String::new()));
    // A prefix deleted and the anchor moved by hand, without audit_purge: no AUDIT_PURGE
    // names it.
    su.batch_execute(&format!(
        "DELETE FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}'
            AND event_id = ANY ((SELECT event_ids FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}' AND block_no = 1)::bigint[]);
         UPDATE tenancy.audit_chain_heads h SET purged_through_seq = s.first_seq + s.event_count - 1, purged_anchor = s.hash
           FROM tenancy.audit_seals s WHERE h.organization_id = '{SHERWOOD}' AND s.organization_id = h.organization_id AND s.block_no = 1;
         DELETE FROM tenancy.audit_seals WHERE organization_id = '{SHERWOOD}' AND block_no = 1;"
    ))
    .unwrap();
    let (ok, problem) = verdict(&mut su);
    assert!(!ok, "a hand-made purge is found");
    assert!(problem.contains("AUDIT_PURGE"), "{problem}");
}
