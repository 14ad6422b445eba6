//! Rows C1-C12 of ATTACKS.md: the tenant context cannot be forged, switched, leaked across
//! transactions or smuggled past the parallel, prepared-statement and cursor machinery.
//! Every attack runs as `app`, the application's ordinary role.

use crate::harness::{count, db_error, pg_major, sqlstate, Cluster};
use postgres::Client;
use std::sync::OnceLock;

pub const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
pub const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";
const A_ROWS: i64 = 30;
const B_ROWS: i64 = 20;

/// One preloaded server with a protected `notes` table holding A's and B's rows.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let c = Cluster::start(&["shared_preload_libraries = 'pg_tenancy'"]);
        c.connect("postgres", "app")
            .batch_execute(
                "CREATE EXTENSION pg_tenancy;
                 CREATE ROLE authenticator LOGIN NOINHERIT;
                 GRANT app TO authenticator;",
            )
            .unwrap();
        c.connect("owner", "app")
            .batch_execute(&format!(
                "CREATE TABLE notes (
                    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    organization_id uuid NOT NULL DEFAULT tenancy.require_org(),
                    body text NOT NULL);
                 CREATE INDEX notes_org ON notes (organization_id);
                 ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
                 ALTER TABLE notes FORCE ROW LEVEL SECURITY;
                 CREATE POLICY tenant_floor ON notes AS RESTRICTIVE
                   USING (organization_id = tenancy.current_org_id())
                   WITH CHECK (organization_id = tenancy.current_org_id());
                 CREATE POLICY tenant_rows ON notes USING (true) WITH CHECK (true);
                 GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO app;
                 BEGIN; SELECT tenancy.set_org('{A}');
                 INSERT INTO notes (body) SELECT 'a' || g FROM generate_series(1, {A_ROWS}) g; COMMIT;
                 BEGIN; SELECT tenancy.set_org('{B}');
                 INSERT INTO notes (body) SELECT 'b' || g FROM generate_series(1, {B_ROWS}) g; COMMIT;
                 ANALYZE notes;"
            ))
            .unwrap();
        c
    })
}

pub fn app() -> Client {
    cluster().connect("app", "app")
}

/// (rows of A, rows of B, rows in all) visible to the current transaction.
fn visible(c: &mut Client) -> (i64, i64, i64) {
    let r = c
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE organization_id = '{A}'),
                        count(*) FILTER (WHERE organization_id = '{B}'),
                        count(*) FROM notes"
            ),
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn enter(c: &mut Client, org: &str) {
    c.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{org}')"))
        .unwrap();
}

#[test]
fn test_c1_set_and_set_config_on_the_context_variable_are_refused() {
    let mut c = app();
    for forge in [
        format!("SET app.current_org_id = '{B}'"),
        format!("SET LOCAL app.current_org_id = '{B}'"),
        format!("SELECT set_config('app.current_org_id', '{B}', true)"),
        format!("SELECT set_config('app.current_org_id', '{B}', false)"),
    ] {
        enter(&mut c, A);
        let err = db_error(c.batch_execute(&forge));
        assert_eq!(err.code().code(), "42501", "{forge}");
        assert_eq!(
            err.message(),
            "app.current_org_id can only be set by tenancy.set_org()"
        );
        c.batch_execute("ROLLBACK").unwrap();
        // And with the forged write attempted inside a savepoint, A's transaction goes on
        // seeing A only.
        enter(&mut c, A);
        c.batch_execute("SAVEPOINT s").unwrap();
        assert!(c.batch_execute(&forge).is_err());
        c.batch_execute("ROLLBACK TO s").unwrap();
        assert_eq!(visible(&mut c), (A_ROWS, 0, A_ROWS), "{forge}");
        c.batch_execute("COMMIT").unwrap();
    }
    // Outside any transaction too.
    assert_eq!(
        sqlstate(c.batch_execute(&format!("SET app.current_org_id = '{B}'"))),
        "42501"
    );
}

#[test]
fn test_c2_second_tenant_in_one_transaction_raises() {
    let mut c = app();
    enter(&mut c, A);
    c.batch_execute(&format!("SELECT tenancy.set_org('{A}')"))
        .unwrap(); // same tenant: no-op
    let err = db_error(c.batch_execute(&format!("SELECT tenancy.set_org('{B}')")));
    assert_eq!(err.code().code(), "42501");
    assert!(err.hint().unwrap().contains("new transaction"));
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_c3_set_org_outside_a_transaction_block_raises() {
    let mut c = app();
    let err = db_error(c.query_one(&format!("SELECT tenancy.set_org('{A}')"), &[]));
    assert_eq!(err.code().code(), "25P01");
    assert!(err.hint().unwrap().contains("BEGIN"));
    assert_eq!(visible(&mut c), (0, 0, 0));
}

#[test]
fn test_c4_no_context_survives_its_transaction() {
    let mut c = app();
    for end in ["COMMIT", "ROLLBACK"] {
        enter(&mut c, A);
        assert_eq!(visible(&mut c), (A_ROWS, 0, A_ROWS));
        c.batch_execute(end).unwrap();
        // Autocommit statement and a fresh transaction: nothing.
        assert_eq!(visible(&mut c), (0, 0, 0), "after {end}");
        let row = c
            .query_one(
                "SELECT tenancy.current_org_id()::text, current_setting('app.current_org_id')",
                &[],
            )
            .unwrap();
        assert_eq!(row.get::<_, Option<String>>(0), None);
        assert_eq!(row.get::<_, String>(1), "");
        c.batch_execute("BEGIN").unwrap();
        assert_eq!(visible(&mut c), (0, 0, 0));
        assert_eq!(c.execute("UPDATE notes SET body = body", &[]).unwrap(), 0);
        assert_eq!(c.execute("DELETE FROM notes", &[]).unwrap(), 0);
        // The tenant column's default requires a context: an insert without one raises.
        assert_eq!(
            sqlstate(c.execute("INSERT INTO notes (body) VALUES ('x')", &[])),
            "42501"
        );
        c.batch_execute("ROLLBACK").unwrap();
    }
}

#[test]
fn test_c5_startup_packet_and_role_or_database_defaults_are_refused() {
    let cluster = cluster();
    let err = cluster
        .try_connect("app", "app", Some(&format!("-c app.current_org_id={B}")))
        .err()
        .expect("a forged context in the startup packet must refuse the connection");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "42501");
    assert_eq!(
        db.message(),
        "app.current_org_id can only be set by tenancy.set_org()"
    );
    // Even a superuser cannot make it a role or database default.
    let mut su = cluster.connect("postgres", "app");
    for stmt in [
        format!("ALTER ROLE app SET app.current_org_id = '{B}'"),
        format!("ALTER DATABASE app SET app.current_org_id = '{B}'"),
        format!("ALTER ROLE app IN DATABASE app SET app.current_org_id = '{B}'"),
    ] {
        assert_eq!(sqlstate(su.batch_execute(&stmt)), "42501", "{stmt}");
    }
    let defaults = count(&mut su, "SELECT count(*) FROM pg_db_role_setting WHERE array_to_string(setconfig, ',') LIKE '%current_org_id%'");
    assert_eq!(defaults, 0);
    // A fresh login sees nothing.
    assert_eq!(visible(&mut app()), (0, 0, 0));
}

#[test]
fn test_c6_placeholders_under_the_tenancy_prefix() {
    let mut c = app();
    let r = c.batch_execute("SET tenancy.typo = 'x'");
    if pg_major() >= 15 {
        let err = db_error(r);
        assert_eq!(
            err.code().code(),
            "42602",
            "reserved prefix: {}",
            err.message()
        );
    } else {
        // PG 13/14 have no MarkGUCPrefixReserved: the placeholder is accepted but nothing
        // in pg_tenancy reads it, so the context is unaffected.
        r.unwrap();
        assert_eq!(visible(&mut c), (0, 0, 0));
    }
}

#[test]
fn test_c7_injection_and_bad_values_through_the_setter() {
    let mut c = app();
    c.batch_execute("SET application_name = 'marker'").unwrap();
    for (arg, code) in [
        ("'x''; RESET ALL; --'", "22023"),
        ("'not-a-uuid'", "22023"),
        ("''", "22023"),
        ("NULL::text", "22004"),
        (&format!("'{A}; SELECT 1'") as &str, "22023"),
    ] {
        c.batch_execute("BEGIN").unwrap();
        let err = db_error(c.batch_execute(&format!("SELECT tenancy.set_org({arg})")));
        assert_eq!(err.code().code(), code, "{arg}");
        assert!(
            !err.message().contains("RESET"),
            "the message does not echo input"
        );
        c.batch_execute("ROLLBACK").unwrap();
    }
    // Nothing else ran: the session setting survived, and no context exists.
    let name: String = c.query_one("SHOW application_name", &[]).unwrap().get(0);
    assert_eq!(name, "marker");
    assert_eq!(visible(&mut c), (0, 0, 0));
}

#[test]
fn test_c8_prepared_statements_follow_the_tenant_across_transactions() {
    let mut c = app();
    c.batch_execute("PREPARE q AS SELECT count(*) FROM notes")
        .unwrap();
    let protocol = c.prepare("SELECT count(*) FROM notes").unwrap();
    for mode in ["auto", "force_generic_plan"] {
        c.batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .unwrap();
        for i in 0..8 {
            let (org, want) = if i % 2 == 0 { (A, A_ROWS) } else { (B, B_ROWS) };
            enter(&mut c, org);
            let sql = count(&mut c, "EXECUTE q");
            let bound: i64 = c.query_one(&protocol, &[]).unwrap().get(0);
            assert_eq!((sql, bound), (want, want), "{mode} execution {i} as {org}");
            c.batch_execute("COMMIT").unwrap();
            let none = count(&mut c, "EXECUTE q");
            assert_eq!(none, 0);
        }
    }
}

#[test]
fn test_c9_parallel_workers_see_the_leaders_tenant() {
    let mut c = app();
    let force = if pg_major() >= 16 {
        "debug_parallel_query"
    } else {
        "force_parallel_mode"
    };
    let query =
        "SELECT count(*), min(organization_id::text), max(organization_id::text) FROM notes";
    for org in [A, B] {
        enter(&mut c, org);
        let serial = c.query_one(query, &[]).unwrap();
        c.batch_execute(&format!(
            "SET LOCAL {force} = on; SET LOCAL parallel_setup_cost = 0; SET LOCAL parallel_tuple_cost = 0;
             SET LOCAL min_parallel_table_scan_size = 0; SET LOCAL max_parallel_workers_per_gather = 2;"
        ))
        .unwrap();
        let plan: Vec<String> = c
            .query(
                &format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {query}"),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let launched = plan.iter().any(|l| {
            l.trim()
                .strip_prefix("Workers Launched: ")
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n > 0)
        });
        assert!(
            launched,
            "a parallel worker ran the scan:\n{}",
            plan.join("\n")
        );
        let parallel = c.query_one(query, &[]).unwrap();
        let tuple = |r: &postgres::Row| {
            (
                r.get::<_, i64>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, Option<String>>(2),
            )
        };
        assert_eq!(
            tuple(&serial),
            tuple(&parallel),
            "serial and parallel plans agree"
        );
        let want = if org == A { A_ROWS } else { B_ROWS };
        assert_eq!(parallel.get::<_, i64>(0), want);
        assert_eq!(parallel.get::<_, Option<String>>(1).as_deref(), Some(org));
        assert_eq!(parallel.get::<_, Option<String>>(2).as_deref(), Some(org));
        c.batch_execute("COMMIT").unwrap();
    }
}

#[test]
fn test_c10_reset_role_from_a_pooled_authenticator_gains_nothing() {
    let mut c = cluster().connect("authenticator", "app");
    c.batch_execute("SET ROLE app").unwrap();
    enter(&mut c, A);
    assert_eq!(visible(&mut c), (A_ROWS, 0, A_ROWS));
    c.batch_execute("RESET ROLE").unwrap();
    // The login role has no rights of its own (NOINHERIT): nothing to read at all.
    assert_eq!(
        sqlstate(c.query_one("SELECT count(*) FROM notes", &[])),
        "42501"
    );
    c.batch_execute("ROLLBACK").unwrap();
    // Back as app in a new transaction without a context: nothing.
    c.batch_execute("SET ROLE app").unwrap();
    assert_eq!(visible(&mut c), (0, 0, 0));
}

#[test]
fn test_c11_context_follows_savepoint_rollback() {
    let mut c = app();
    c.batch_execute("BEGIN; SAVEPOINT s").unwrap();
    c.batch_execute(&format!("SELECT tenancy.set_org('{A}')"))
        .unwrap();
    assert_eq!(visible(&mut c), (A_ROWS, 0, A_ROWS));
    c.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(
        visible(&mut c),
        (0, 0, 0),
        "the context rolled back with its savepoint"
    );
    let org: Option<String> = c
        .query_one("SELECT tenancy.current_org_id()::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(org, None);
    // Rolled back means gone: another tenant may now be entered in the same transaction.
    c.batch_execute(&format!(
        "SAVEPOINT t; SELECT tenancy.set_org('{B}'); RELEASE SAVEPOINT t"
    ))
    .unwrap();
    assert_eq!(
        visible(&mut c),
        (0, B_ROWS, B_ROWS),
        "a released savepoint keeps the context"
    );
    assert_eq!(
        sqlstate(c.batch_execute(&format!("SELECT tenancy.set_org('{A}')"))),
        "42501"
    );
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_c12_with_hold_cursors_cannot_carry_rows_out_of_a_tenant_transaction() {
    let mut c = app();
    enter(&mut c, B);
    let err = db_error(c.batch_execute("DECLARE cur CURSOR WITH HOLD FOR SELECT * FROM notes"));
    assert_eq!(err.code().code(), "0A000");
    c.batch_execute("ROLLBACK").unwrap();
    // Declared first, tenant entered afterwards: refused too.
    c.batch_execute("BEGIN; DECLARE cur CURSOR WITH HOLD FOR SELECT * FROM notes")
        .unwrap();
    assert_eq!(
        sqlstate(c.batch_execute(&format!("SELECT tenancy.set_org('{B}')"))),
        "0A000"
    );
    c.batch_execute("ROLLBACK").unwrap();
    // Without a context the cursor is allowed, and holds nothing.
    c.batch_execute("BEGIN; DECLARE cur CURSOR WITH HOLD FOR SELECT * FROM notes; COMMIT")
        .unwrap();
    enter(&mut c, B);
    assert_eq!(c.query("FETCH ALL FROM cur", &[]).unwrap().len(), 0);
    c.batch_execute("COMMIT; CLOSE cur").unwrap();
    // An ordinary cursor inside the transaction works as usual.
    enter(&mut c, B);
    c.batch_execute("DECLARE plain CURSOR FOR SELECT * FROM notes")
        .unwrap();
    assert_eq!(
        c.query("FETCH ALL FROM plain", &[]).unwrap().len() as i64,
        B_ROWS
    );
    c.batch_execute("COMMIT").unwrap();
}

#[test]
fn test_actor_lives_one_transaction() {
    let mut c = app();
    c.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{A}', 'user-42')"))
        .unwrap();
    let row = c
        .query_one(
            "SELECT tenancy.current_actor(), tenancy.context_is_signed()",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("user-42"));
    assert!(!row.get::<_, bool>(1));
    assert_eq!(
        sqlstate(c.batch_execute(&format!("SELECT tenancy.set_org('{A}', 'user-43')"))),
        "42501"
    );
    c.batch_execute("ROLLBACK").unwrap();
    let actor: Option<String> = c
        .query_one("SELECT tenancy.current_actor()", &[])
        .unwrap()
        .get(0);
    assert_eq!(actor, None);
    c.batch_execute("BEGIN").unwrap();
    assert_eq!(
        sqlstate(c.batch_execute(&format!("SELECT tenancy.set_org('{A}', 'bad actor')"))),
        "22023"
    );
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_text_tenant_ids_when_configured() {
    let cluster = cluster();
    // A role of its own, so the other tests' `app` sessions keep the uuid format.
    cluster
        .connect("postgres", "app")
        .batch_execute(
            "CREATE ROLE app_text LOGIN;
             GRANT SELECT ON notes TO app_text;
             ALTER ROLE app_text SET tenancy.tenant_id_format = 'text';",
        )
        .unwrap();
    let mut c = cluster.connect("app_text", "app");
    c.batch_execute("BEGIN; SELECT tenancy.set_org('org_2Xk9-better.auth')")
        .unwrap();
    let row = c
        .query_one("SELECT tenancy.current_org_id_text(), tenancy.current_org_id()::text, count(*) FROM notes", &[])
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("org_2Xk9-better.auth")
    );
    assert_eq!(
        row.get::<_, Option<String>>(1),
        None,
        "a text id is never a uuid context"
    );
    assert_eq!(row.get::<_, i64>(2), 0);
    c.batch_execute("ROLLBACK").unwrap();
    // The application cannot switch the format itself.
    assert_eq!(
        sqlstate(c.batch_execute("SET tenancy.tenant_id_format = 'uuid'")),
        "42501"
    );
}
