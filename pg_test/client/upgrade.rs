//! Upgrades: the released 0.1.0 install script is frozen (sql/released/SHA256SUMS), and
//! `ALTER EXTENSION pg_tenancy UPDATE` from it gives exactly what a fresh install of the
//! current version gives, protected tables included. (scripts/test.sh also runs the
//! reference-schema tests against a database filled under 0.1.0 and updated.)

use crate::harness::{strings, Cluster};
use crate::rls::{CONWAY, SHERWOOD};
use postgres::Client;
use sha2::{Digest, Sha256};

/// Puts the audit triggers of a database created at 0.1.0 in the shape 0.1.0's protect()
/// made them (one row trigger `tenancy_audit`). The test server runs the current library,
/// whose protect() makes the 0.2.0 triggers; a real 0.1.0 installation had the 0.1.0 ones
/// when its server was restarted with the new library, before ALTER EXTENSION UPDATE.
pub fn make_0_1_0_audit_triggers(su: &mut Client) {
    su.batch_execute(
        "ALTER EVENT TRIGGER tenancy_guard_ddl DISABLE;
         ALTER EVENT TRIGGER tenancy_guard_drop DISABLE;
         DO $$
         DECLARE t record;
         BEGIN
           FOR t IN SELECT format('%I.%I', schema_name, table_name) AS rel, tenant_column
                      FROM tenancy.protected_tables WHERE audited LOOP
             EXECUTE format('DROP TRIGGER tenancy_audit_insert ON %s', t.rel);
             EXECUTE format('DROP TRIGGER tenancy_audit_update ON %s', t.rel);
             EXECUTE format('DROP TRIGGER tenancy_audit_delete ON %s', t.rel);
             EXECUTE format('CREATE TRIGGER tenancy_audit AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION tenancy.audit_trigger(%L)', t.rel, t.tenant_column);
             EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER tenancy_audit', t.rel);
           END LOOP;
         END $$;
         ALTER EVENT TRIGGER tenancy_guard_ddl ENABLE ALWAYS;
         ALTER EVENT TRIGGER tenancy_guard_drop ENABLE ALWAYS;",
    )
    .unwrap();
}

const RELEASED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/released");

#[test]
fn test_released_scripts_are_never_edited() {
    let sums = std::fs::read_to_string(format!("{RELEASED}/SHA256SUMS")).unwrap();
    let mut checked = 0;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (sum, file) = line.split_once("  ").expect("sha256sum format");
        let body = std::fs::read(format!("{RELEASED}/{file}")).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&body)),
            sum,
            "{file} was edited after its release: add a new upgrade script instead"
        );
        checked += 1;
    }
    assert!(checked >= 1, "SHA256SUMS lists the released scripts");
    // Every released version has an upgrade path to the current one: a chain of scripts
    // pg_tenancy--A--B.sql, as ALTER EXTENSION UPDATE follows them.
    let current = env!("CARGO_PKG_VERSION");
    for v in released_versions() {
        let mut at = v.clone();
        let mut steps = 0;
        while at != current {
            let next = upgrade_scripts()
                .into_iter()
                .find(|(from, _)| *from == at)
                .map(|(_, to)| to)
                .unwrap_or_else(|| {
                    panic!("no upgrade script from {at} (on the way from {v} to {current})")
                });
            at = next;
            steps += 1;
            assert!(steps < 20, "upgrade scripts from {v} go round in a circle");
        }
    }
}

/// The released versions, from sql/released/SHA256SUMS, oldest first.
fn released_versions() -> Vec<String> {
    let sums = std::fs::read_to_string(format!("{RELEASED}/SHA256SUMS")).unwrap();
    sums.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(_, f)| {
            f.trim_start_matches("pg_tenancy--")
                .trim_end_matches(".sql")
                .to_string()
        })
        .collect()
}

/// (from, to) of every upgrade script in sql/.
fn upgrade_scripts() -> Vec<(String, String)> {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            let versions = name.strip_prefix("pg_tenancy--")?.strip_suffix(".sql")?;
            let (from, to) = versions.split_once("--")?;
            Some((from.to_string(), to.to_string()))
        })
        .collect()
}

/// Everything pg_tenancy owns or puts on protected tables, as definitions.
fn catalog(c: &mut Client) -> Vec<String> {
    let queries = [
        // Member objects of the extension (but the #[pg_test] functions of a test build).
        "SELECT d FROM (SELECT pg_describe_object(classid, objid, objsubid) AS d FROM pg_depend
          WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
            AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_tenancy')) m
          WHERE d <> 'schema tests' AND d NOT LIKE 'function tests.%'",
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_tenancy'",
        // Functions: definitions, privileges, comments.
        "SELECT pg_get_functiondef(p.oid) || coalesce(p.proacl::text, '') || coalesce(obj_description(p.oid, 'pg_proc'), '')
           FROM pg_proc p WHERE p.pronamespace = 'tenancy'::regnamespace AND p.prokind <> 'a'",
        // Tables, views, sequences: columns, constraints, indexes, privileges, RLS.
        "SELECT format('%s %s %s %s %s %s', c.relname, c.relkind, c.relacl, c.relrowsecurity, c.relforcerowsecurity,
                       coalesce(obj_description(c.oid, 'pg_class'), ''))
           FROM pg_class c WHERE c.relnamespace = 'tenancy'::regnamespace",
        "SELECT format('%s.%s %s %s %s %s', a.attrelid::regclass, a.attname, format_type(a.atttypid, a.atttypmod),
                       a.attnotnull, (SELECT collname FROM pg_collation WHERE oid = a.attcollation),
                       pg_get_expr(d.adbin, d.adrelid))
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE c.relnamespace IN ('tenancy'::regnamespace, 'clinic'::regnamespace) AND a.attnum > 0 AND NOT a.attisdropped",
        "SELECT format('%s %s', conrelid::regclass, pg_get_constraintdef(oid)) FROM pg_constraint
          WHERE connamespace IN ('tenancy'::regnamespace, 'clinic'::regnamespace)",
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
          WHERE c.relnamespace IN ('tenancy'::regnamespace, 'clinic'::regnamespace)",
        "SELECT format('%s %s', c.relname, pg_get_viewdef(c.oid)) FROM pg_class c
          WHERE c.relnamespace = 'tenancy'::regnamespace AND c.relkind = 'v'",
        // Policies and triggers, on the audit trail and on the protected tables.
        "SELECT format('%s %s %s %s %s %s', polrelid::regclass, polname, polpermissive, polcmd,
                       pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)) FROM pg_policy",
        "SELECT format('%s %s', pg_get_triggerdef(oid), tgenabled) FROM pg_trigger WHERE NOT tgisinternal",
        "SELECT format('%s %s %s %s', evtname, evtevent, evtfoid::regproc, evtenabled) FROM pg_event_trigger",
        "SELECT format('%s %s', relname, relrowsecurity AND relforcerowsecurity) FROM pg_class
          WHERE relnamespace = 'clinic'::regnamespace AND relkind IN ('r', 'p')",
        "SELECT format('%s %s %s %s', schema_name, table_name, tenant_column, audited) FROM tenancy.protected_tables",
    ];
    let mut out = Vec::new();
    for q in queries {
        let mut rows = strings(c, q);
        rows.sort();
        out.extend(rows);
    }
    out
}

fn load_reference_schema(cluster: &Cluster, db: &str, version: Option<&str>) {
    let mut su = cluster.connect("postgres", db);
    match version {
        Some(v) => su.batch_execute(&format!("CREATE EXTENSION pg_tenancy VERSION '{v}'")),
        None => su.batch_execute("CREATE EXTENSION pg_tenancy"),
    }
    .unwrap();
    let schema = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/family_practice.sql"
    ))
    .unwrap();
    cluster.connect("owner", db).batch_execute(&schema).unwrap();
    su.query(
        "SELECT tenancy.protect_all('clinic', root => 'clinic.organizations', audit => true)",
        &[],
    )
    .unwrap();
    if version == Some("0.1.0") {
        make_0_1_0_audit_triggers(&mut su);
    }
}

#[test]
fn test_updating_from_0_1_0_gives_what_a_fresh_install_gives() {
    updating_gives_what_a_fresh_install_gives("0.1.0");
}

#[test]
fn test_updating_from_0_2_0_gives_what_a_fresh_install_gives() {
    updating_gives_what_a_fresh_install_gives("0.2.0");
}

#[test]
fn test_every_released_version_has_an_update_test() {
    let tested = ["0.1.0", "0.2.0"];
    for v in released_versions() {
        assert!(tested.contains(&v.as_str()), "no update test from {v}");
    }
}

fn updating_gives_what_a_fresh_install_gives(from: &str) {
    let cluster = Cluster::start_with_phi(&[]);
    cluster
        .connect("postgres", "postgres")
        .batch_execute("CREATE DATABASE fresh OWNER owner")
        .unwrap();
    load_reference_schema(&cluster, "fresh", None);
    load_reference_schema(&cluster, "app", Some(from));
    // History written under the old version, then the update.
    let mut owner = cluster.connect("owner", "app");
    owner
        .batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{SHERWOOD}');
             INSERT INTO clinic.organizations (id, name, slug) VALUES ('{SHERWOOD}', 'Sherwood', 'sherwood');
             INSERT INTO clinic.reviews (rating, body) VALUES (5, 'before the update');
             COMMIT;"
        ))
        .unwrap();
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute("ALTER EXTENSION pg_tenancy UPDATE")
        .unwrap();
    let (fresh, updated) = (
        catalog(&mut cluster.connect("postgres", "fresh")),
        catalog(&mut su),
    );
    let only_fresh: Vec<_> = fresh.iter().filter(|l| !updated.contains(l)).collect();
    let only_updated: Vec<_> = updated.iter().filter(|l| !fresh.contains(l)).collect();
    assert!(
        only_fresh.is_empty() && only_updated.is_empty(),
        "fresh install only: {only_fresh:#?}\nupdated only: {only_updated:#?}"
    );
    // The chain spans the update: events of the old version's triggers, then of the new.
    owner
        .batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{SHERWOOD}');
             UPDATE clinic.reviews SET rating = 4; COMMIT;
             BEGIN; SELECT tenancy.set_org('{CONWAY}');
             INSERT INTO clinic.organizations (id, name, slug) VALUES ('{CONWAY}', 'Conway', 'conway'); COMMIT;"
        ))
        .unwrap();
    su.batch_execute("SELECT tenancy.audit_seal()").unwrap();
    let row = su
        .query_one(
            &format!("SELECT ok, events FROM tenancy.audit_verify('{SHERWOOD}')"),
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(
        row.get::<_, i64>(1),
        3,
        "two events before the update, one after"
    );
    let actions = strings(
        &mut su,
        &format!("SELECT action FROM tenancy.audit_events WHERE organization_id = '{SHERWOOD}' ORDER BY event_id"),
    );
    assert_eq!(actions, ["INSERT", "INSERT", "UPDATE"]);
}
