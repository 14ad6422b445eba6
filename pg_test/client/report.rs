//! `tenancy.isolation_report()`: zero findings on the protected reference schema, and the
//! expected finding for each deliberately broken variant (P7, P12, P13, P19, P20, drift).

use crate::harness::{sqlstate, Cluster};
use crate::rls::{reference_cluster, CONWAY, SHERWOOD};
use postgres::Client;

fn findings(su: &mut Client) -> Vec<(String, String, String)> {
    su.query(
        "SELECT severity, object, finding FROM tenancy.isolation_report()",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Applies `break_sql`, expects a finding of `severity` on `object` whose text contains
/// `finding`, then applies `mend_sql` and expects a clean report again.
fn expect_finding(
    su: &mut Client,
    break_sql: &str,
    severity: &str,
    object: &str,
    finding: &str,
    mend_sql: &str,
) {
    su.batch_execute(break_sql)
        .unwrap_or_else(|e| panic!("{break_sql}: {e:?}"));
    let got = findings(su);
    assert!(
        got.iter()
            .any(|(s, o, f)| s == severity && o == object && f.contains(finding)),
        "expected [{severity}] {object}: {finding}\ngot: {got:#?}"
    );
    su.batch_execute(mend_sql)
        .unwrap_or_else(|e| panic!("{mend_sql}: {e:?}"));
    assert_eq!(findings(su), Vec::new(), "clean again after: {mend_sql}");
}

#[test]
fn test_isolation_report_is_clean_on_the_reference_schema_and_finds_each_hole() {
    let cluster: Cluster = reference_cluster();
    let mut su = cluster.connect("postgres", "app");
    assert_eq!(
        findings(&mut su),
        Vec::new(),
        "the protected reference schema has no findings"
    );
    // The application role may not read the report.
    assert_eq!(
        sqlstate(
            cluster
                .connect("app", "app")
                .query("SELECT * FROM tenancy.isolation_report()", &[])
        ),
        "42501"
    );

    expect_finding(
        &mut su,
        "CREATE TABLE public.leaky (organization_id uuid)",
        "critical",
        "public.leaky",
        "without row level security",
        "DROP TABLE public.leaky",
    );
    expect_finding(&mut su,
        "CREATE TABLE public.soft (organization_id uuid); CREATE INDEX ON public.soft (organization_id);
         ALTER TABLE public.soft ENABLE ROW LEVEL SECURITY;
         CREATE POLICY p ON public.soft AS RESTRICTIVE USING (organization_id = tenancy.current_org_id());",
        "critical", "public.soft", "not forced", "DROP TABLE public.soft");
    expect_finding(&mut su,
        "CREATE TABLE public.open (organization_id uuid); CREATE INDEX ON public.open (organization_id);
         ALTER TABLE public.open ENABLE ROW LEVEL SECURITY; ALTER TABLE public.open FORCE ROW LEVEL SECURITY;
         CREATE POLICY p ON public.open AS RESTRICTIVE
           USING (organization_id = tenancy.current_org_id() OR tenancy.current_org_id() IS NULL)
           WITH CHECK (organization_id = tenancy.current_org_id());",
        "critical", "policy p on public.open", "fail open", "DROP TABLE public.open");
    expect_finding(&mut su,
        "CREATE TABLE public.perm (organization_id uuid); CREATE INDEX ON public.perm (organization_id);
         ALTER TABLE public.perm ENABLE ROW LEVEL SECURITY; ALTER TABLE public.perm FORCE ROW LEVEL SECURITY;
         CREATE POLICY p ON public.perm USING (organization_id = tenancy.current_org_id());",
        "critical", "public.perm", "no RESTRICTIVE", "DROP TABLE public.perm");
    expect_finding(
        &mut su,
        "CREATE POLICY upd ON clinic.reviews FOR UPDATE USING (published)",
        "warning",
        "policy upd on clinic.reviews",
        "no WITH CHECK",
        "DROP POLICY upd ON clinic.reviews",
    );
    // P7: a global UNIQUE is an existence oracle across tenants.
    expect_finding(
        &mut su,
        "ALTER TABLE clinic.invitations ADD CONSTRAINT invitations_email_key UNIQUE (email)",
        "high",
        "constraint invitations_email_key on clinic.invitations",
        "UNIQUE/PRIMARY KEY without the tenant column",
        "ALTER TABLE clinic.invitations DROP CONSTRAINT invitations_email_key",
    );
    expect_finding(
        &mut su,
        "CREATE UNIQUE INDEX members_user_global ON clinic.members (user_id)",
        "high",
        "index clinic.members_user_global on clinic.members",
        "unique index without the tenant column",
        "DROP INDEX clinic.members_user_global",
    );
    expect_finding(&mut su,
        "ALTER TABLE clinic.reviews ADD COLUMN patient_id uuid;
         ALTER TABLE clinic.patients ADD CONSTRAINT patients_id_key UNIQUE (id);
         ALTER TABLE clinic.reviews ADD CONSTRAINT reviews_patient_fk FOREIGN KEY (patient_id) REFERENCES clinic.patients (id);",
        "high", "constraint reviews_patient_fk on clinic.reviews", "foreign key without the tenant column",
        "ALTER TABLE clinic.reviews DROP COLUMN patient_id; ALTER TABLE clinic.patients DROP CONSTRAINT patients_id_key;");
    expect_finding(&mut su,
        "CREATE TABLE public.noindex (organization_id uuid); SELECT tenancy.protect('public.noindex');
         DROP INDEX public.noindex_organization_id_idx;",
        "warning", "public.noindex", "no index led by the tenant column",
        "SELECT tenancy.unprotect('public.noindex'); DROP TABLE public.noindex;");
    // P12: views without security_invoker and materialized views.
    expect_finding(
        &mut su,
        "CREATE VIEW clinic.patient_list AS SELECT id FROM clinic.patients",
        "high",
        "clinic.patient_list",
        "no security_invoker",
        "DROP VIEW clinic.patient_list",
    );
    expect_finding(&mut su, "CREATE MATERIALIZED VIEW clinic.review_stats AS SELECT organization_id, avg(rating) FROM clinic.reviews GROUP BY 1",
        "critical", "clinic.review_stats", "materialized view", "DROP MATERIALIZED VIEW clinic.review_stats");
    // P13: SECURITY DEFINER code reading protected tables.
    expect_finding(&mut su,
        "CREATE FUNCTION public.count_patients() RETURNS bigint LANGUAGE sql SECURITY DEFINER AS 'SELECT count(*) FROM clinic.patients'",
        "high", "public.count_patients()", "SECURITY DEFINER function", "DROP FUNCTION public.count_patients()");
    expect_finding(&mut su,
        "CREATE FUNCTION public.tg() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS 'BEGIN RETURN NEW; END';
         CREATE TRIGGER sd BEFORE INSERT ON clinic.reviews FOR EACH ROW EXECUTE FUNCTION public.tg();",
        "high", "trigger sd on clinic.reviews", "SECURITY DEFINER", "DROP TRIGGER sd ON clinic.reviews; DROP FUNCTION public.tg();");
    // P19: roles that bypass RLS and can log in.
    expect_finding(
        &mut su,
        "CREATE ROLE reporting LOGIN BYPASSRLS",
        "high",
        "reporting",
        "BYPASSRLS",
        "DROP ROLE reporting",
    );
    expect_finding(
        &mut su,
        "CREATE ROLE ops LOGIN SUPERUSER",
        "high",
        "ops",
        "superuser",
        "DROP ROLE ops",
    );
    // The application role holding TRUNCATE or REFERENCES.
    expect_finding(
        &mut su,
        "GRANT TRUNCATE ON clinic.reviews TO app",
        "high",
        "app on clinic.reviews",
        "TRUNCATE",
        "REVOKE TRUNCATE ON clinic.reviews FROM app",
    );
    // An IMMUTABLE function reading the context.
    expect_finding(&mut su,
        "CREATE FUNCTION public.frozen_org() RETURNS uuid LANGUAGE sql IMMUTABLE AS 'SELECT tenancy.current_org_id()'",
        "critical", "public.frozen_org()", "IMMUTABLE", "DROP FUNCTION public.frozen_org()");
    // P20: publications.
    expect_finding(
        &mut su,
        "SET client_min_messages = error; CREATE PUBLICATION pub_reviews FOR TABLE clinic.reviews",
        "high",
        "publication pub_reviews",
        "publishes tenant table clinic.reviews",
        "DROP PUBLICATION pub_reviews",
    );
    // Drift past disabled guards.
    expect_finding(&mut su,
        "ALTER EVENT TRIGGER tenancy_guard_ddl DISABLE; ALTER TABLE clinic.reviews NO FORCE ROW LEVEL SECURITY;",
        "critical", "clinic.reviews", "not forced",
        "ALTER TABLE clinic.reviews FORCE ROW LEVEL SECURITY; ALTER EVENT TRIGGER tenancy_guard_ddl ENABLE ALWAYS;");
}

/// II-2/9 findings 6, 10, 11 (ATTACKS.md S4, O6): oracles through INCLUDE-only unique
/// indexes and EXCLUDE constraints, roles that can read the key ring through server-file
/// privileges, and a nondeterministic collation on a text tenant column.
#[test]
fn test_report_finds_include_and_exclude_oracles_file_roles_and_merging_collations() {
    let cluster: Cluster = reference_cluster();
    let mut su = cluster.connect("postgres", "app");
    assert_eq!(findings(&mut su), Vec::new());
    expect_finding(
        &mut su,
        "CREATE UNIQUE INDEX invitations_email_incl ON clinic.invitations (email) INCLUDE (organization_id)",
        "high",
        "index clinic.invitations_email_incl on clinic.invitations",
        "unique index without the tenant column",
        "DROP INDEX clinic.invitations_email_incl",
    );
    // (No btree_gist: PostgreSQL 13 here is built without contrib.)
    expect_finding(
        &mut su,
        "ALTER TABLE clinic.bookings ADD CONSTRAINT bookings_no_overlap
           EXCLUDE USING gist (tstzrange(starts_at, starts_at, '[]') WITH &&)",
        "high",
        "constraint bookings_no_overlap on clinic.bookings",
        "EXCLUDE constraint without the tenant column",
        "ALTER TABLE clinic.bookings DROP CONSTRAINT bookings_no_overlap",
    );
    // An EXCLUDE constraint that includes the tenant column is no finding.
    su.batch_execute(
        "ALTER TABLE clinic.bookings ADD CONSTRAINT bookings_one_per_slot
           EXCLUDE USING btree (organization_id WITH =, location_id WITH =, starts_at WITH =)",
    )
    .unwrap();
    assert_eq!(findings(&mut su), Vec::new());
    su.batch_execute("ALTER TABLE clinic.bookings DROP CONSTRAINT bookings_one_per_slot")
        .unwrap();
    for role in [
        "pg_read_server_files",
        "pg_write_server_files",
        "pg_execute_server_program",
    ] {
        expect_finding(
            &mut su,
            &format!("GRANT {role} TO app"),
            "high",
            "app",
            &format!("member of {role}"),
            &format!("REVOKE {role} FROM app"),
        );
    }
    // Through another role too.
    expect_finding(
        &mut su,
        "CREATE ROLE files NOLOGIN; GRANT pg_read_server_files TO files; GRANT files TO app",
        "high",
        "app",
        "member of pg_read_server_files",
        "REVOKE files FROM app; DROP ROLE files",
    );
    // A nondeterministic collation needs ICU; builds without it cannot make one at all.
    let icu = su.batch_execute(
        "CREATE COLLATION public.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
    );
    match icu {
        Err(e) => {
            let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
            assert_eq!(code, "0A000", "only a server without ICU refuses: {e}");
        }
        Ok(()) => {
            su.batch_execute(
                "CREATE TABLE public.ci_tenants (id int, org text COLLATE public.ci NOT NULL);",
            )
            .unwrap();
            let err = crate::harness::db_error(
                su.query("SELECT tenancy.protect('public.ci_tenants', 'org')", &[]),
            );
            assert_eq!(err.code().code(), "42P22", "{}", err.message());
            assert!(err.hint().is_some_and(|h| h.contains("deterministic")));
            expect_finding(
                &mut su,
                "CREATE TABLE public.ci_orgs (organization_id text COLLATE public.ci)",
                "critical",
                "public.ci_orgs.organization_id",
                "nondeterministic collation",
                "DROP TABLE public.ci_orgs; DROP TABLE public.ci_tenants; DROP COLLATION public.ci",
            );
        }
    }
}

/// II-2/9 finding 12 (ATTACKS.md S5): EXPLAIN estimates reveal another tenant's frequent
/// values through the column's statistics; statistics target 0 on the column takes them away.
#[test]
fn test_s5_statistics_target_zero_ends_the_estimate_oracle() {
    let cluster: Cluster = reference_cluster();
    let mut owner = cluster.connect("owner", "app");
    owner
        .batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{CONWAY}');
             INSERT INTO clinic.treatments (appointment_id, code)
             SELECT 'c0000000-0000-4000-8000-00000000000f', 'C-SECRET' FROM generate_series(1, 400);
             COMMIT;
             BEGIN; SELECT tenancy.set_org('{SHERWOOD}');
             INSERT INTO clinic.treatments (appointment_id, code)
             SELECT '5e000000-0000-4000-8000-00000000000f', 'S-OWN' FROM generate_series(1, 400);
             COMMIT; ANALYZE clinic.treatments;"
        ))
        .unwrap();
    let estimate = |code: &str| -> f64 {
        let mut app = cluster.connect("app", "app");
        app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{SHERWOOD}')"))
            .unwrap();
        let top: String = app
            .query(
                &format!("EXPLAIN SELECT * FROM clinic.treatments WHERE code = '{code}'"),
                &[],
            )
            .unwrap()[0]
            .get(0);
        // "Seq Scan on treatments  (cost=0.00..1.05 rows=400 width=84)"
        let rows = top
            .split(" rows=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        rows.parse().unwrap()
    };
    // Sherwood sees none of Conway's rows, yet the estimate tells the secret code from a guess
    // (the planner multiplies the code's frequency over all tenants by Sherwood's share).
    let (secret, guess) = (estimate("C-SECRET"), estimate("C-GUESS"));
    assert!(
        secret > 10.0 * guess,
        "the oracle exists: {secret} vs {guess}"
    );
    owner
        .batch_execute(
            "ALTER TABLE clinic.treatments ALTER COLUMN code SET STATISTICS 0;
             -- ANALYZE skips the column from now on but keeps what it gathered before; a
             -- no-op type change drops the column's statistics (no rewrite: same type).
             ALTER TABLE clinic.treatments ALTER COLUMN code TYPE text;
             ANALYZE clinic.treatments;",
        )
        .unwrap();
    let (secret, guess) = (estimate("C-SECRET"), estimate("C-GUESS"));
    assert_eq!(secret, guess, "no value is told apart by its estimate");
}

/// A monitoring job runs the report while migrations create and drop tables, views, policies
/// and functions: the report reads the catalogs through functions that look objects up by
/// OID (pg_get_expr, regclass, protection_problem), which see a drop committed after the
/// report's snapshot. It must never fail because an object it was looking at went away.
#[test]
fn test_isolation_report_survives_concurrent_ddl() {
    let cluster: Cluster = reference_cluster();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut owner = cluster.connect("owner", "app");
    let mut su_ddl = cluster.connect("postgres", "app");
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for i in 0..300 {
                owner
                    .batch_execute(&format!(
                        "CREATE TABLE clinic.churn_{i} (
                           organization_id uuid NOT NULL REFERENCES clinic.organizations (id),
                           id bigint NOT NULL, note text, PRIMARY KEY (organization_id, id));
                         CREATE INDEX ON clinic.churn_{i} (organization_id, note);
                         CREATE VIEW clinic.churn_view_{i} AS SELECT * FROM clinic.churn_{i};
                         CREATE FUNCTION clinic.churn_fn_{i}() RETURNS bigint LANGUAGE sql
                           SECURITY DEFINER AS 'SELECT count(*) FROM clinic.churn_{i}';
                         CREATE MATERIALIZED VIEW clinic.churn_mv_{i} AS SELECT id FROM clinic.churn_{i};"
                    ))
                    .unwrap_or_else(|e| panic!("create churn_{i}: {e:?}"));
                // A superuser's trigger, a hand-written extra policy and a CHECK calling a
                // volatile function, so each branch of the report has something to look up.
                su_ddl
                    .batch_execute(&format!(
                        "CREATE TRIGGER churn_t BEFORE UPDATE ON clinic.churn_{i}
                           FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger();
                         CREATE POLICY churn_p ON clinic.churn_{i} AS RESTRICTIVE FOR SELECT
                           USING (note IS NULL OR note <> '');
                         ALTER TABLE clinic.churn_{i} ADD CONSTRAINT churn_c CHECK (note <> timeofday());"
                    ))
                    .unwrap_or_else(|e| panic!("trigger churn_{i}: {e:?}"));
                owner
                    .batch_execute(&format!(
                        "DROP MATERIALIZED VIEW clinic.churn_mv_{i}; DROP FUNCTION clinic.churn_fn_{i}();
                         DROP TABLE clinic.churn_{i} CASCADE;"
                    ))
                    .unwrap_or_else(|e| panic!("drop churn_{i}: {e:?}"));
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut su = cluster.connect("postgres", "app");
    let mut runs = 0;
    let mut failures = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        if let Err(e) = su.query("SELECT * FROM tenancy.isolation_report()", &[]) {
            failures.push(format!("{e:?}"));
        }
        runs += 1;
    }
    churn.join().unwrap();
    assert!(runs > 10, "the report ran while the DDL ran ({runs} runs)");
    assert_eq!(failures, Vec::<String>::new(), "{runs} runs");
    assert_eq!(
        findings(&mut su),
        Vec::new(),
        "clean once the churn is gone"
    );
}

/// Better Auth's tables: a tenant id under another name (`organizationId`) in an unprotected
/// table is a finding; a superuser can acknowledge an intended one (a reason is required, the
/// finding must exist, it is recorded), after which it shows in
/// `tenancy.acknowledged_findings` instead of the report, until unacknowledged.
#[test]
fn test_tenant_looking_columns_and_acknowledgements() {
    let cluster: Cluster = reference_cluster();
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute(
        r#"CREATE SCHEMA auth;
           CREATE TABLE auth."user" (id text PRIMARY KEY, email text);
           CREATE TABLE auth.member (id text PRIMARY KEY, "organizationId" text NOT NULL, "userId" text REFERENCES auth."user");
           CREATE TABLE auth.invitation (id text PRIMARY KEY, org_id text NOT NULL, email text);"#,
    )
    .unwrap();
    let got = findings(&mut su);
    let member = got
        .iter()
        .find(|(s, o, f)| {
            s == "high"
                && o == "auth.member"
                && f.contains("\"organizationId\" looks like a tenant id")
        })
        .unwrap_or_else(|| panic!("{got:#?}"))
        .clone();
    assert!(
        got.iter().any(|(s, o, f)| s == "high"
            && o == "auth.invitation"
            && f.contains("org_id looks like a tenant id")),
        "{got:#?}"
    );
    assert!(
        !got.iter().any(|(_, o, _)| o == "auth.\"user\""),
        "{got:#?}"
    );

    // Only a superuser, only with a reason, only a finding the report has.
    let mut owner = cluster.connect("owner", "app");
    assert_eq!(
        sqlstate(owner.execute(
            "SELECT tenancy.acknowledge($1, $2, 'mine')",
            &[&member.1, &member.2]
        )),
        "42501"
    );
    assert_eq!(
        sqlstate(su.execute(
            "SELECT tenancy.acknowledge($1, $2, '  ')",
            &[&member.1, &member.2]
        )),
        "22023"
    );
    assert_eq!(
        sqlstate(su.execute(
            "SELECT tenancy.acknowledge($1, 'no such finding', 'why')",
            &[&member.1]
        )),
        "22023"
    );
    su.execute(
        "SELECT tenancy.acknowledge($1, $2, 'sign-in runs without a tenant: Better Auth reads member rows of every organization')",
        &[&member.1, &member.2],
    )
    .unwrap();
    let after = findings(&mut su);
    assert!(!after.contains(&member), "{after:#?}");
    assert!(
        after.iter().any(|(_, o, _)| o == "auth.invitation"),
        "still found: {after:#?}"
    );
    let row = su
        .query_one(
            "SELECT severity, reason, acknowledged_by::text FROM tenancy.acknowledged_findings WHERE object = $1",
            &[&member.1],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "high");
    assert!(row
        .get::<_, String>(1)
        .starts_with("sign-in runs without a tenant"));
    assert_eq!(row.get::<_, String>(2), "postgres");
    assert_eq!(
        crate::harness::count(
            &mut su,
            "SELECT count(*) FROM tenancy.protection_log WHERE action = 'acknowledged' AND object = 'auth.member'"
        ),
        1
    );
    // The application role reads neither the acknowledgements nor the view.
    let mut app = cluster.connect("app", "app");
    assert_eq!(
        sqlstate(app.query("SELECT * FROM tenancy.acknowledged_findings", &[])),
        "42501"
    );
    assert_eq!(
        sqlstate(app.query("SELECT * FROM tenancy.acknowledgements", &[])),
        "42501"
    );
    // Protecting the table makes the finding go; unacknowledging brings an open one back.
    let back: bool = su
        .query_one(
            "SELECT tenancy.unacknowledge($1, $2)",
            &[&member.1, &member.2],
        )
        .unwrap()
        .get(0);
    assert!(back);
    assert!(findings(&mut su).contains(&member));
    su.batch_execute(r#"SELECT tenancy.protect('auth.member', 'organizationId')"#)
        .unwrap();
    let protected = findings(&mut su);
    assert!(
        !protected
            .iter()
            .any(|(_, o, f)| o == "auth.member" && f.contains("looks like a tenant id")),
        "{protected:#?}"
    );
}
