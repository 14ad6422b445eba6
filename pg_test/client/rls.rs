//! Rows P1-P21 of ATTACKS.md on the family-practice reference schema, protected with one
//! `protect_all` call, with two clinics loaded: Sherwood (A) and Conway (B). Every attack
//! runs as `app` unless the row is about another role.

use crate::harness::{count, db_error, pg_major, sqlstate, strings, upgrade_from, Cluster};
use postgres::Client;
use std::sync::{Arc, Mutex, OnceLock};

pub const SHERWOOD: &str = "5e000000-0000-4000-8000-000000000001";
pub const CONWAY: &str = "c0000000-0000-4000-8000-000000000002";

/// The fifteen reference tables (the sixteenth, audit_events, belongs to the extension).
pub const TABLES: [&str; 15] = [
    "organizations",
    "members",
    "invitations",
    "locations",
    "business_hours",
    "providers",
    "services",
    "patients",
    "bookings",
    "appointments",
    "treatments",
    "medical_records",
    "clinical_notes",
    "reviews",
    "consent_records",
];

/// One clinic's rows: one per table, ids derived from the clinic so tests can name them.
fn seed(org: &str) -> String {
    let p = &org[..8];
    format!(
        "BEGIN; SELECT tenancy.set_org('{org}');
         INSERT INTO clinic.organizations (id, name, slug) VALUES ('{org}', 'Clinic {p}', 'clinic-{p}');
         INSERT INTO clinic.members (user_id, role) VALUES ('user-{p}', 'owner');
         INSERT INTO clinic.invitations (email, expires_at) VALUES ('new-{p}@example.org', now() + interval '7 days');
         INSERT INTO clinic.locations (id, name) VALUES ('{p}-0000-4000-8000-00000000000a', 'Main street');
         INSERT INTO clinic.business_hours (location_id, weekday, opens, closes) VALUES ('{p}-0000-4000-8000-00000000000a', 1, '08:00', '17:00');
         INSERT INTO clinic.providers (id, display_name) VALUES ('{p}-0000-4000-8000-00000000000b', 'Dr. {p}');
         INSERT INTO clinic.services (id, name) VALUES ('{p}-0000-4000-8000-00000000000c', 'Checkup');
         INSERT INTO clinic.patients (id, first_name, last_name) VALUES ('{p}-0000-4000-8000-00000000000d', tenancy.phi_encrypt('First {p}'), tenancy.phi_encrypt('Last {p}'));
         INSERT INTO clinic.bookings (id, patient_id, service_id, location_id, starts_at)
              VALUES ('{p}-0000-4000-8000-00000000000e', '{p}-0000-4000-8000-00000000000d', '{p}-0000-4000-8000-00000000000c',
                      '{p}-0000-4000-8000-00000000000a', now());
         INSERT INTO clinic.appointments (id, booking_id, provider_id) VALUES ('{p}-0000-4000-8000-00000000000f', '{p}-0000-4000-8000-00000000000e', '{p}-0000-4000-8000-00000000000b');
         INSERT INTO clinic.treatments (appointment_id, code) VALUES ('{p}-0000-4000-8000-00000000000f', 'D0120');
         INSERT INTO clinic.medical_records (patient_id, kind, body) VALUES ('{p}-0000-4000-8000-00000000000d', 'allergy', tenancy.phi_encrypt('penicillin'));
         INSERT INTO clinic.clinical_notes (appointment_id, body) VALUES ('{p}-0000-4000-8000-00000000000f', tenancy.phi_encrypt('note'));
         INSERT INTO clinic.reviews (rating, body) VALUES (5, 'great');
         INSERT INTO clinic.consent_records (patient_id, kind) VALUES ('{p}-0000-4000-8000-00000000000d', 'treatment');
         COMMIT;"
    )
}

/// A preloaded server with the reference schema owned by `owner`, protected with one call
/// plus the root, and both clinics seeded.
pub fn reference_cluster() -> Cluster {
    let from = upgrade_from();
    let c = Cluster::start_with_phi(&[]);
    let schema = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/family_practice.sql"
    ))
    .unwrap();
    let create = match &from {
        Some(v) => format!("CREATE EXTENSION pg_tenancy VERSION '{v}'"),
        None => "CREATE EXTENSION pg_tenancy".into(),
    };
    c.connect("postgres", "app").batch_execute(&create).unwrap();
    let mut owner = c.connect("owner", "app");
    owner.batch_execute(&schema).unwrap();
    let mut su = c.connect("postgres", "app");
    su.query(
        "SELECT tenancy.protect_all('clinic', root => 'clinic.organizations', audit => true)",
        &[],
    )
    .unwrap();
    if from.as_deref() == Some("0.1.0") {
        crate::upgrade::make_0_1_0_audit_triggers(&mut su);
    }
    owner
        .batch_execute(
            "GRANT USAGE ON SCHEMA clinic TO app;
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA clinic TO app;",
        )
        .unwrap();
    owner.batch_execute(&seed(SHERWOOD)).unwrap();
    owner.batch_execute(&seed(CONWAY)).unwrap();
    if from.is_some() {
        // Filled under the old version, then updated: the tests run against the result.
        su.batch_execute("ALTER EXTENSION pg_tenancy UPDATE")
            .unwrap();
    }
    owner.batch_execute("ANALYZE").unwrap();
    c
}

fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(reference_cluster)
}

fn app() -> Client {
    cluster().connect("app", "app")
}

fn enter(c: &mut Client, org: &str) {
    c.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{org}')"))
        .unwrap();
}

/// (rows of Sherwood, rows of Conway) visible in `table`.
fn visible(c: &mut Client, table: &str) -> (i64, i64) {
    let col = if table == "organizations" {
        "id"
    } else {
        "organization_id"
    };
    let r = c
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE {col} = '{SHERWOOD}'), count(*) FILTER (WHERE {col} = '{CONWAY}') FROM clinic.{table}"
            ),
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

#[test]
fn test_protect_all_needs_one_call_plus_the_root() {
    let mut su = cluster().connect("postgres", "app");
    let registered = strings(&mut su, "SELECT table_name::text FROM tenancy.protected_tables WHERE schema_name = 'clinic' ORDER BY 1");
    // Other tests add tables to the schema later; the fifteen are all there from one call.
    for t in TABLES {
        assert!(
            registered.iter().any(|r| r == t),
            "{t} not registered: {registered:?}"
        );
    }
    for t in TABLES {
        let problem: Option<String> = su
            .query_one(
                &format!("SELECT tenancy.protection_problem('clinic.{t}')"),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(problem, None, "{t}");
    }
}

#[test]
fn test_p1_no_context_sees_nothing_and_cannot_write() {
    let mut c = app();
    for t in TABLES {
        assert_eq!(visible(&mut c, t), (0, 0), "{t}");
        assert_eq!(
            c.execute(&format!("UPDATE clinic.{t} SET id = id"), &[])
                .unwrap(),
            0,
            "{t}"
        );
        assert_eq!(
            c.execute(&format!("DELETE FROM clinic.{t}"), &[]).unwrap(),
            0,
            "{t}"
        );
        assert_eq!(
            sqlstate(c.execute(&format!("INSERT INTO clinic.{t} DEFAULT VALUES"), &[])),
            "42501",
            "{t}"
        );
    }
}

#[test]
fn test_each_clinic_sees_only_its_own_rows_in_every_table() {
    let mut c = app();
    for (org, want) in [(SHERWOOD, (1, 0)), (CONWAY, (0, 1))] {
        enter(&mut c, org);
        for t in TABLES {
            assert_eq!(visible(&mut c, t), want, "{t} as {org}");
        }
        c.batch_execute("COMMIT").unwrap();
    }
}

#[test]
fn test_p2_table_owner_is_subject_to_forced_rls() {
    let mut owner = cluster().connect("owner", "app");
    for t in TABLES {
        assert_eq!(visible(&mut owner, t), (0, 0), "{t} without context");
    }
    enter(&mut owner, SHERWOOD);
    for t in TABLES {
        assert_eq!(visible(&mut owner, t), (1, 0), "{t} as Sherwood");
    }
    owner.batch_execute("COMMIT").unwrap();
}

#[test]
fn test_p3_a_later_permissive_policy_does_not_widen_access() {
    // The owner may not add one at all (its policies would run over every tenant's rows);
    // one a superuser adds does not widen access either.
    let mut owner = cluster().connect("owner", "app");
    assert_eq!(
        sqlstate(owner.batch_execute(
            "CREATE POLICY debug_share ON clinic.reviews USING (true) WITH CHECK (true)"
        )),
        "42501"
    );
    let mut owner = cluster().connect("postgres", "app");
    owner
        .batch_execute("CREATE POLICY debug_share ON clinic.reviews USING (true) WITH CHECK (true)")
        .unwrap();
    let mut c = app();
    enter(&mut c, SHERWOOD);
    assert_eq!(visible(&mut c, "reviews"), (1, 0));
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(visible(&mut c, "reviews"), (0, 0));
    owner
        .batch_execute("DROP POLICY debug_share ON clinic.reviews")
        .unwrap();
}

#[test]
fn test_p4_rows_cannot_be_moved_or_inserted_into_another_clinic() {
    let mut c = app();
    enter(&mut c, SHERWOOD);
    let err = db_error(c.execute(
        &format!("UPDATE clinic.reviews SET organization_id = '{CONWAY}'"),
        &[],
    ));
    assert_eq!(err.code().code(), "42501");
    c.batch_execute("ROLLBACK").unwrap();
    enter(&mut c, SHERWOOD);
    let err = db_error(c.execute(
        &format!("INSERT INTO clinic.reviews (organization_id, rating) VALUES ('{CONWAY}', 1)"),
        &[],
    ));
    assert_eq!(err.code().code(), "42501");
    assert!(
        err.message().contains("row-level security"),
        "{}",
        err.message()
    );
    c.batch_execute("ROLLBACK").unwrap();
    // The tenant column itself is immutable, even for a superuser and in replica mode (P21).
    let mut su = cluster().connect("postgres", "app");
    su.batch_execute(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica; SELECT tenancy.set_org('{SHERWOOD}')"
    ))
    .unwrap();
    let err = db_error(su.execute(
        &format!("UPDATE clinic.reviews SET organization_id = '{CONWAY}'"),
        &[],
    ));
    assert!(
        err.message().contains("cannot be changed"),
        "{}",
        err.message()
    );
    su.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_p5_returning_gives_back_own_rows_only() {
    let mut c = app();
    enter(&mut c, SHERWOOD);
    for t in TABLES {
        let col = if t == "organizations" {
            "id"
        } else {
            "organization_id"
        };
        let rows = c
            .query(
                &format!("UPDATE clinic.{t} SET id = id RETURNING {col}::text"),
                &[],
            )
            .unwrap();
        assert_eq!(rows.len(), 1, "{t}");
        assert_eq!(rows[0].get::<_, String>(0), SHERWOOD, "{t}");
    }
    c.batch_execute("SAVEPOINT s").unwrap();
    let rows = c
        .query(
            "DELETE FROM clinic.reviews RETURNING organization_id::text",
            &[],
        )
        .unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>(),
        [SHERWOOD]
    );
    c.batch_execute("ROLLBACK TO s; ROLLBACK").unwrap();
}

#[test]
fn test_p6_on_conflict_is_no_existence_oracle() {
    let mut c = app();
    enter(&mut c, SHERWOOD);
    // Conway has a service 'Checkup' with id c0000000-...0c; uniqueness is per tenant, so
    // Sherwood inserting the same key neither conflicts with nor touches Conway's row.
    let conway_service = "c0000000-0000-4000-8000-00000000000c";
    let n = c
        .execute(
            &format!("INSERT INTO clinic.services (id, name) VALUES ('{conway_service}', 'Probe') ON CONFLICT DO NOTHING"),
            &[],
        )
        .unwrap();
    assert_eq!(n, 1, "no conflict: the key space is per clinic");
    let n = c
        .execute(
            &format!(
                "INSERT INTO clinic.services (id, name) VALUES ('{conway_service}', 'Probe 2')
                      ON CONFLICT (organization_id, id) DO UPDATE SET name = 'overwritten'"
            ),
            &[],
        )
        .unwrap();
    assert_eq!(n, 1);
    c.batch_execute("ROLLBACK").unwrap();
    enter(&mut c, CONWAY);
    let name: String = c
        .query_one("SELECT name FROM clinic.services", &[])
        .unwrap()
        .get(0);
    assert_eq!(name, "Checkup", "Conway's row untouched");
    c.batch_execute("COMMIT").unwrap();
}

#[test]
fn test_p8_foreign_keys_cannot_point_at_a_hidden_parent() {
    let mut c = app();
    enter(&mut c, SHERWOOD);
    let err = db_error(c.execute(
        "INSERT INTO clinic.consent_records (patient_id, kind) VALUES ('c0000000-0000-4000-8000-00000000000d', 'x')",
        &[],
    ));
    assert_eq!(err.code().code(), "23503");
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_p9_merge_neither_updates_nor_inserts_foreign_rows() {
    if pg_major() < 15 {
        return; // MERGE exists from PG 15 on; on older servers the attack does not exist.
    }
    let mut c = app();
    enter(&mut c, SHERWOOD);
    let n = c
        .execute(
            &format!(
                "MERGE INTO clinic.reviews r USING (SELECT '{CONWAY}'::uuid AS org) s ON r.organization_id = s.org
                 WHEN MATCHED THEN UPDATE SET body = 'merged'"
            ),
            &[],
        )
        .unwrap();
    assert_eq!(n, 0, "Conway's rows are invisible to MERGE");
    let err = db_error(c.execute(
        &format!(
            "MERGE INTO clinic.reviews r USING (SELECT '{CONWAY}'::uuid AS org) s ON false
             WHEN NOT MATCHED THEN INSERT (organization_id, rating) VALUES (s.org, 1)"
        ),
        &[],
    ));
    assert_eq!(err.code().code(), "42501");
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_p10_copy_out_gives_own_rows_only() {
    use std::io::Read;
    let mut c = app();
    enter(&mut c, SHERWOOD);
    for sql in [
        "COPY clinic.reviews TO STDOUT",
        "COPY (SELECT organization_id FROM clinic.reviews) TO STDOUT",
    ] {
        let mut out = String::new();
        c.copy_out(sql).unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out.lines().count(), 1, "{sql}");
        assert!(
            out.contains(SHERWOOD) && !out.contains(CONWAY),
            "{sql}: {out}"
        );
    }
    c.batch_execute("COMMIT").unwrap();
}

#[test]
fn test_p11_truncate_is_refused_even_when_granted() {
    let mut owner = cluster().connect("owner", "app");
    owner
        .batch_execute("GRANT TRUNCATE ON clinic.invitations TO app")
        .unwrap();
    let mut c = app();
    let err = db_error(c.batch_execute("TRUNCATE clinic.invitations"));
    assert_eq!(err.code().code(), "42501");
    assert!(
        err.message().contains("TRUNCATE of protected table"),
        "{}",
        err.message()
    );
    assert_eq!(
        sqlstate(owner.batch_execute("TRUNCATE clinic.invitations")),
        "42501"
    );
    owner
        .batch_execute("REVOKE TRUNCATE ON clinic.invitations FROM app")
        .unwrap();
    // The superuser bypasses RLS: it sees both clinics' rows, so nothing was truncated.
    let mut su = cluster().connect("postgres", "app");
    assert_eq!(
        visible(&mut su, "invitations"),
        (1, 1),
        "nothing was truncated"
    );
}

#[test]
fn test_p12_views_over_protected_tables_leak_nothing_here() {
    let mut owner = cluster().connect("owner", "app");
    owner
        .batch_execute(
            "CREATE VIEW clinic.all_reviews AS SELECT organization_id, rating FROM clinic.reviews;
             GRANT SELECT ON clinic.all_reviews TO app;",
        )
        .unwrap();
    let mut c = app();
    // The view runs as its owner, but FORCE RLS applies to the owner too.
    let n = count(&mut c, "SELECT count(*) FROM clinic.all_reviews");
    assert_eq!(n, 0);
    enter(&mut c, CONWAY);
    let orgs = strings(
        &mut c,
        "SELECT organization_id::text FROM clinic.all_reviews",
    );
    assert_eq!(orgs, [CONWAY]);
    c.batch_execute("COMMIT").unwrap();
    owner.batch_execute("DROP VIEW clinic.all_reviews").unwrap();
}

#[test]
fn test_p14_partitions_are_protected_present_and_future() {
    let mut owner = cluster().connect("owner", "app");
    owner
        .batch_execute(
            "CREATE TABLE clinic.visits (organization_id uuid NOT NULL, id uuid NOT NULL DEFAULT gen_random_uuid(),
                                         day date NOT NULL, PRIMARY KEY (organization_id, id, day)) PARTITION BY RANGE (day);
             CREATE TABLE clinic.visits_2026 PARTITION OF clinic.visits FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
             GRANT SELECT, INSERT ON clinic.visits, clinic.visits_2026 TO app;",
        )
        .unwrap();
    let mut c = app();
    for org in [SHERWOOD, CONWAY] {
        enter(&mut c, org);
        c.batch_execute("INSERT INTO clinic.visits (day) VALUES ('2026-05-01')")
            .unwrap();
        c.batch_execute("COMMIT").unwrap();
    }
    // Read directly, the partition shows nothing without a context and one clinic with one.
    let n = count(&mut c, "SELECT count(*) FROM clinic.visits_2026");
    assert_eq!(n, 0);
    enter(&mut c, SHERWOOD);
    let orgs = strings(
        &mut c,
        "SELECT organization_id::text FROM clinic.visits_2026",
    );
    assert_eq!(orgs, [SHERWOOD]);
    c.batch_execute("COMMIT").unwrap();
    // A partition created later is protected at creation.
    owner
        .batch_execute("CREATE TABLE clinic.visits_2027 PARTITION OF clinic.visits FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')")
        .unwrap();
    let mut su = cluster().connect("postgres", "app");
    for t in ["visits", "visits_2026", "visits_2027"] {
        let problem: Option<String> = su
            .query_one(
                &format!("SELECT tenancy.protection_problem('clinic.{t}')"),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(problem, None, "{t}");
        let registered: i64 = su
            .query_one(
                &format!("SELECT count(*) FROM tenancy.protected_tables WHERE table_name = '{t}'"),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(registered, 1, "{t}");
    }
}

#[test]
fn test_p15_new_tenant_tables_are_protected_or_refused() {
    let mut owner = cluster().connect("owner", "app");
    owner
        .batch_execute("CREATE TABLE clinic.referrals (organization_id uuid NOT NULL, id uuid PRIMARY KEY DEFAULT gen_random_uuid(), note text)")
        .unwrap();
    let mut su = cluster().connect("postgres", "app");
    let problem: Option<String> = su
        .query_one("SELECT tenancy.protection_problem('clinic.referrals')", &[])
        .unwrap()
        .get(0);
    assert_eq!(problem, None);
    let logged = count(&mut su, "SELECT count(*) FROM tenancy.protection_log WHERE action = 'auto_protect' AND object = 'clinic.referrals'");
    assert_eq!(logged, 1);
    // With tenancy.new_table_action = refuse, creation fails instead. Set for this session
    // only (superusers are refused too), so concurrent tests keep the default.
    su.batch_execute("SET tenancy.new_table_action = 'refuse'")
        .unwrap();
    let err =
        db_error(su.batch_execute("CREATE TABLE clinic.refused (organization_id uuid NOT NULL)"));
    assert_eq!(err.code().code(), "42501");
    su.batch_execute("RESET tenancy.new_table_action").unwrap();
    // The application role cannot change the setting.
    assert_eq!(
        sqlstate(app().batch_execute("SET tenancy.new_table_action = 'protect'")),
        "42501"
    );
    // A table without the tenant column is left alone.
    owner
        .batch_execute("CREATE TABLE clinic.lookup_codes (code text PRIMARY KEY)")
        .unwrap();
    let n = count(&mut su, "SELECT count(*) FROM tenancy.protected_tables WHERE table_name IN ('lookup_codes', 'refused')");
    assert_eq!(n, 0);
}

#[test]
fn test_p16_weakening_a_protected_table_is_refused_except_through_unprotect() {
    let mut owner = cluster().connect("owner", "app");
    for stmt in [
        "ALTER TABLE clinic.locations DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE clinic.locations NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY tenancy_tenant_floor ON clinic.locations",
        "DROP POLICY tenancy_tenant_rows ON clinic.locations",
        "ALTER POLICY tenancy_tenant_floor ON clinic.locations USING (true)",
        "ALTER TABLE clinic.locations DISABLE TRIGGER tenancy_no_truncate",
        "ALTER TABLE clinic.locations DISABLE TRIGGER USER",
        "DROP TRIGGER tenancy_tenant_immutable ON clinic.locations",
    ] {
        let err = db_error(owner.batch_execute(stmt));
        assert_eq!(err.code().code(), "42501", "{stmt}: {}", err.message());
        assert!(
            err.hint().unwrap_or_default().contains("tenancy.unprotect"),
            "{stmt}"
        );
    }
    // Even a superuser goes through unprotect, which is recorded.
    let mut su = cluster().connect("postgres", "app");
    assert_eq!(
        sqlstate(su.batch_execute("ALTER TABLE clinic.locations DISABLE ROW LEVEL SECURITY")),
        "42501"
    );
    // The app role cannot call it at all.
    assert_eq!(
        sqlstate(app().query("SELECT tenancy.unprotect('clinic.locations')", &[])),
        "42501"
    );
    // Unprotect a table of this test's own, so no other test sees a window without RLS.
    owner
        .batch_execute("CREATE TABLE clinic.scratch (organization_id uuid NOT NULL, n int); GRANT SELECT ON clinic.scratch TO app")
        .unwrap();
    su.query("SELECT tenancy.unprotect('clinic.scratch')", &[])
        .unwrap();
    let rls: bool = su
        .query_one(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'clinic.scratch'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!rls);
    let logged = count(&mut su, "SELECT count(*) FROM tenancy.protection_log WHERE action = 'unprotect' AND object = 'clinic.scratch'");
    assert_eq!(logged, 1);
    su.query("SELECT tenancy.protect('clinic.scratch')", &[])
        .unwrap();
    let mut c = app();
    assert_eq!(visible(&mut c, "scratch"), (0, 0), "protected again");
}

#[test]
fn test_p17_leaky_functions_see_own_rows_only() {
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut cfg = postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(cluster().port)
        .user("app")
        .dbname("app");
    cfg.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
    let mut owner = cluster().connect("owner", "app");
    owner
        .batch_execute(
            "CREATE OR REPLACE FUNCTION clinic.leak(text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS
               $$ BEGIN RAISE NOTICE 'leak %', $1; RETURN true; END $$;",
        )
        .unwrap();
    let mut c = cfg.connect(postgres::NoTls).unwrap();
    enter(&mut c, SHERWOOD);
    c.query(
        "SELECT * FROM clinic.patients WHERE clinic.leak(organization_id::text)",
        &[],
    )
    .unwrap();
    c.batch_execute("COMMIT").unwrap();
    let seen = notices.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the function ran");
    assert!(seen.iter().all(|n| n.contains(SHERWOOD)), "{seen:?}");
}

#[test]
fn test_p18_pg_stats_hides_protected_tables() {
    let mut c = app();
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'clinic'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let mut su = cluster().connect("postgres", "app");
    let stats: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'clinic'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        stats > 0,
        "statistics exist; they are hidden from the application role"
    );
}

#[test]
fn test_p21_app_cannot_switch_to_replica_mode() {
    let mut c = app();
    assert_eq!(
        sqlstate(c.batch_execute("SET session_replication_role = replica")),
        "42501"
    );
}

/// The tenant is read once per execution (an InitPlan), and its value still drives the
/// tenant index; in a sequential scan or a hash join no row calls the function (II-5/9: the
/// bare call in a policy ran once per row, 17x the floor on a report).
#[test]
fn test_tenant_predicate_is_an_initplan_feeding_the_tenant_index() {
    let mut c = app();
    enter(&mut c, SHERWOOD);
    c.batch_execute("SET LOCAL enable_seqscan = off").unwrap();
    let plan = strings(&mut c, "EXPLAIN (COSTS OFF) SELECT * FROM clinic.bookings WHERE starts_at > now() - interval '1 day'");
    let text = plan.join("\n");
    assert!(
        text.contains("InitPlan"),
        "the tenant is an InitPlan:\n{text}"
    );
    let cond = plan
        .iter()
        .find(|l| l.contains("Index Cond:"))
        .unwrap_or_else(|| panic!("an index scan:\n{text}"));
    assert!(
        cond.contains("Index Cond: (organization_id = ") && !cond.contains("current_org_id"),
        "the tenant index is searched for the InitPlan's value:\n{text}"
    );
    c.batch_execute("COMMIT").unwrap();
    // Sequential scan and hash join: the filter compares with the InitPlan's value.
    enter(&mut c, SHERWOOD);
    c.batch_execute(
        "SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_indexonlyscan = off",
    )
    .unwrap();
    for q in [
        "SELECT count(*) FROM clinic.bookings",
        "SELECT count(*) FROM clinic.bookings b JOIN clinic.patients p ON p.organization_id = b.organization_id AND p.id = b.patient_id",
    ] {
        let plan = strings(&mut c, &format!("EXPLAIN (COSTS OFF) {q}"));
        let text = plan.join("\n");
        for l in plan.iter().filter(|l| l.contains("Filter:")) {
            assert!(
                !l.contains("current_org_id"),
                "no per-row call of the tenant function:\n{text}"
            );
        }
        assert!(text.contains("InitPlan"), "{text}");
    }
    c.batch_execute("COMMIT").unwrap();
}

#[test]
fn test_protect_dry_run_changes_nothing_and_bad_input_is_clear() {
    let mut su = cluster().connect("postgres", "app");
    su.batch_execute("CREATE TABLE public.dry (organization_id text NOT NULL, v int)")
        .unwrap();
    let stmts: Vec<String> = su
        .query(
            "SELECT * FROM tenancy.protect('public.dry', dry_run => true)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        stmts.iter().any(|s| s.contains("current_org_id_text()")),
        "text tenant column: {stmts:?}"
    );
    assert!(
        stmts.iter().any(|s| s.starts_with("CREATE INDEX")),
        "{stmts:?}"
    );
    let rls: bool = su
        .query_one(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.dry'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!rls, "dry run changed nothing");
    su.batch_execute("CREATE TABLE public.bad (organization_id int)")
        .unwrap();
    assert_eq!(
        sqlstate(su.query("SELECT tenancy.protect('public.bad')", &[])),
        "42804"
    );
    assert_eq!(
        sqlstate(su.query("SELECT tenancy.protect('public.dry', 'nope')", &[])),
        "42703"
    );
    assert_eq!(
        sqlstate(su.query("SELECT tenancy.protect('public.missing')", &[])),
        "42P01"
    );
    assert_eq!(
        sqlstate(su.query("SELECT tenancy.unprotect('public.dry')", &[])),
        "55000"
    );
    // protect is idempotent.
    for _ in 0..2 {
        su.query("SELECT tenancy.protect('public.dry')", &[])
            .unwrap();
    }
    let indexes: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'public.dry'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(indexes, 1, "the tenant index is created once");
}
