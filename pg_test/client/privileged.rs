//! Privileged code cannot be steered by the roles it serves (ATTACKS.md O1, O2, O7; II-2/9
//! findings 0-2): the application role and the schema owner must never run their own code
//! with the rights of the extension's superuser-owned functions, its event triggers, its
//! background worker, or a DBA running a maintenance function.
//!
//! Each attack below is played as the role the finding names, and each ends by checking that
//! no role became superuser and that the attacker's code never ran with rights it lacked.

use crate::harness::{count, sqlstate, strings, Cluster};
use crate::rls::{reference_cluster, CONWAY, SHERWOOD};
use postgres::Client;
use std::sync::OnceLock;

/// A reference cluster for the tests that leave no lasting change behind (temp objects die
/// with their session); the hostile-search_path test makes its own.
fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(reference_cluster)
}

fn is_superuser(c: &mut Client, role: &str) -> bool {
    c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .unwrap()
        .get(0)
}

/// The C functions that stay without a SET clause: hot-path ones that run no SQL, and three that
/// pin search_path themselves after resolving their arguments (see sql/finalize.sql).
const UNPINNED: &[&str] = &[
    "current_org_id()",
    "current_org_id_text()",
    "require_org()",
    "require_org_text()",
    "current_actor()",
    "context_is_signed()",
    "set_org(text, text, text)",
    "set_org(uuid, text, text)",
    "phi_encrypt(text, text)",
    "phi_encrypt(bytea, text)",
    "phi_encrypt(jsonb, text)",
    "phi_reveal(bytea, text)",
    "phi_reveal_bytea(bytea, text)",
    "phi_reveal_jsonb(bytea, text)",
    "phi_rotate(bytea, text)",
    "phi_rotate_for_tenant(bytea, text, text)",
    "phi_key_id(bytea)",
    "phi_is_envelope(bytea)",
    "audit_payload(bytea, bigint)",
    "in_maintenance()",
    "is_loaded_by_preload()",
    "assert_preloaded()",
    "confined_ddl()",
    "refuse_foreign_code_in_transaction()",
    // Resolve the caller's table names in the caller's search_path, then pin it themselves
    // for everything they run (policy.rs, with_pinned_search_path; the hostile search_path
    // test below runs all three with an owner's shadowing operators first in the path).
    "protect(text, text, boolean, boolean, boolean)",
    "protect_all(text, text, text, boolean, boolean)",
    "unprotect(text)",
];

#[test]
fn test_every_privileged_function_pins_search_path_with_pg_temp_last() {
    let mut su = cluster().connect("postgres", "app");
    let rows = su
        .query(
            "SELECT p.proname::text || '(' || pg_catalog.oidvectortypes(p.proargtypes) || ')',
                    l.lanname::text, p.prosecdef, p.prokind::text,
                    coalesce(p.proconfig, '{}'),
                    EXISTS (SELECT 1 FROM pg_event_trigger e WHERE e.evtfoid = p.oid),
                    EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)
                      OR p.prorettype = 'trigger'::regtype
               FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
              WHERE p.pronamespace = 'tenancy'::regnamespace
              ORDER BY 1",
            &[],
        )
        .unwrap();
    assert!(rows.len() > 30, "the extension's functions are listed");
    let mut problems = Vec::new();
    let mut checked = 0;
    for r in &rows {
        let (sig, lang, definer, kind): (String, String, bool, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let config: Vec<String> = r.get(4);
        let (event_trigger, trigger): (bool, bool) = (r.get(5), r.get(6));
        let pinned = config
            .iter()
            .any(|c| c == "search_path=pg_catalog, pg_temp");
        if kind == "p" {
            // A procedure that COMMITs cannot have a SET clause: checked by the hostile
            // search_path test instead (phi_rotate_all).
            assert_eq!(sig, "phi_rotate_all(text, text, text, text, integer)");
            continue;
        }
        checked += 1;
        if pinned {
            continue;
        }
        let allowed = UNPINNED.contains(&sig.as_str());
        if !allowed || lang != "c" || definer || event_trigger || trigger {
            problems.push(format!(
                "{sig} ({lang}{}{}{}) does not pin search_path = pg_catalog, pg_temp (config {config:?})",
                if definer { ", SECURITY DEFINER" } else { "" },
                if event_trigger { ", event trigger" } else { "" },
                if trigger { ", trigger" } else { "" },
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(checked > 30);
    // The unpinned list names only functions that exist (a renamed one must not linger).
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for f in UNPINNED {
        assert!(names.iter().any(|n| n == f), "{f} is not a function");
    }
}

/// A temp function that records the role it runs as, and temp views named like catalogs
/// that call it on every row: what O7's attacker plants in its own session.
fn plant_shadow_catalogs(c: &mut Client, catalogs: &[(&str, &str)]) {
    c.batch_execute(
        "CREATE TEMP TABLE ran_as (who name, superuser boolean);
         CREATE FUNCTION pg_temp.spy() RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO ran_as SELECT current_user, (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user);
           BEGIN
             EXECUTE 'ALTER ROLE ' || pg_catalog.quote_ident(session_user) || ' SUPERUSER';
           EXCEPTION WHEN OTHERS THEN NULL;
           END;
           RETURN true;
         END $$;",
    )
    .unwrap();
    for (name, select) in catalogs {
        c.batch_execute(&format!("CREATE TEMP VIEW {name} AS {select}"))
            .unwrap();
    }
    c.batch_execute("DISCARD PLANS").unwrap();
}

/// What the spy recorded: roles other than the attacker its code ran as.
fn foreign_runs(c: &mut Client, me: &str) -> Vec<String> {
    strings(
        c,
        &format!("SELECT who::text FROM ran_as WHERE who <> '{me}' OR superuser"),
    )
}

#[test]
fn test_o7_app_temp_pg_trigger_view_is_not_read_by_the_event_triggers() {
    let c = cluster();
    let mut app = c.connect("app", "app");
    plant_shadow_catalogs(
        &mut app,
        &[(
            "pg_trigger",
            "SELECT t.*, pg_temp.spy() AS spied FROM pg_catalog.pg_trigger t",
        )],
    );
    // Any DDL fires the drift guard, which reads pg_trigger as its superuser owner.
    app.batch_execute("CREATE TEMP TABLE anything (x int)")
        .unwrap();
    app.batch_execute("DROP TABLE anything").unwrap();
    assert_eq!(foreign_runs(&mut app, "app"), Vec::<String>::new());
    let mut su = c.connect("postgres", "app");
    assert!(!is_superuser(&mut su, "app"), "app became superuser");
}

#[test]
fn test_o7_owner_temp_pg_class_view_does_not_hide_disabled_rls() {
    let c = cluster();
    let mut owner = c.connect("owner", "app");
    plant_shadow_catalogs(
        &mut owner,
        &[(
            "pg_class",
            "SELECT k.oid, k.relname, k.relnamespace, k.relkind, true AS relrowsecurity,
                    true AS relforcerowsecurity, k.relowner, k.reloptions, k.relispartition, pg_temp.spy() AS spied
               FROM pg_catalog.pg_class k",
        )],
    );
    for stmt in [
        "ALTER TABLE clinic.patients DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE clinic.patients NO FORCE ROW LEVEL SECURITY",
    ] {
        assert_eq!(
            sqlstate(owner.batch_execute(stmt)),
            "42501",
            "{stmt} is refused"
        );
    }
    assert_eq!(foreign_runs(&mut owner, "owner"), Vec::<String>::new());
    // Still zero rows for the owner without a context.
    assert_eq!(count(&mut owner, "SELECT count(*) FROM clinic.patients"), 0);
    let mut su = c.connect("postgres", "app");
    assert!(!is_superuser(&mut su, "owner"));
}

#[test]
fn test_o7_owner_temp_pg_roles_view_does_not_allow_truncate() {
    let c = cluster();
    let mut owner = c.connect("owner", "app");
    plant_shadow_catalogs(
        &mut owner,
        &[(
            "pg_roles",
            "SELECT r.rolname, true AS rolsuper, r.oid, pg_temp.spy() AS spied FROM pg_catalog.pg_roles r",
        )],
    );
    assert_eq!(
        sqlstate(owner.batch_execute("TRUNCATE clinic.reviews")),
        "42501"
    );
    assert_eq!(foreign_runs(&mut owner, "owner"), Vec::<String>::new());
    let mut su = c.connect("postgres", "app");
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM clinic.reviews WHERE organization_id IN ('5e000000-0000-4000-8000-000000000001', 'c0000000-0000-4000-8000-000000000002')"
        ),
        2,
        "both clinics' reviews are still there"
    );
}

#[test]
fn test_o7_shadow_catalogs_do_not_reach_the_report_or_protect() {
    // A cluster of its own: it compares two reports, which other tests' DDL would change.
    let c = &reference_cluster();
    let mut su = c.connect("postgres", "app");
    let before = strings(
        &mut su,
        "SELECT severity || ' ' || object || ' ' || finding FROM tenancy.isolation_report()",
    );
    // Temp objects in the caller's session (here a superuser's, standing for any role granted
    // EXECUTE on the report) are never read by the report or by protect(): the spy stays silent.
    plant_shadow_catalogs(
        &mut su,
        &[(
            "pg_policy",
            "SELECT p.*, pg_temp.spy() AS spied FROM pg_catalog.pg_policy p",
        )],
    );
    let after = strings(
        &mut su,
        "SELECT severity || ' ' || object || ' ' || finding FROM tenancy.isolation_report()",
    );
    assert_eq!(before, after);
    su.query(
        "SELECT tenancy.protect('clinic.reviews', audit => true)",
        &[],
    )
    .unwrap();
    assert_eq!(count(&mut su, "SELECT count(*) FROM ran_as"), 0);
}

/// Table names that break naive quoting, created by the owner in the protected schema with
/// `standard_conforming_strings` off and on: the drift guard (as superuser) protects each
/// one under exactly its name, and nothing else runs.
#[test]
fn test_o1_object_names_cannot_inject_sql_into_protect() {
    let c = cluster();
    let mut owner = c.connect("owner", "app");
    let names = [
        r#"\',$$a$$,$$uuid$$,false);ALTER ROLE owner SUPERUSER;--"#.to_string(),
        r#"back\slash"#.to_string(),
        r#"it's \' "quoted""#.to_string(),
        "$$dollar$$ $x$".to_string(),
        "ünïcødé 表 \u{1F4A9}".to_string(),
        // 63 bytes, the identifier limit.
        format!("{}\\'", "n".repeat(61)),
    ];
    for scs in ["off", "on"] {
        for (i, base) in names.iter().enumerate() {
            let name = if scs == "on" && base.len() < 60 {
                format!("{base}{i}")
            } else if scs == "on" {
                format!("{}{i}", &base[..base.len() - 2])
            } else {
                base.clone()
            };
            let quoted = format!("\"{}\"", name.replace('"', "\"\""));
            owner
                .batch_execute(&format!(
                    "SET standard_conforming_strings = {scs};
                     CREATE TABLE clinic.{quoted} (id bigint, organization_id uuid NOT NULL);
                     RESET standard_conforming_strings;"
                ))
                .unwrap_or_else(|e| panic!("create {name:?} (scs {scs}): {e}"));
            let mut su = c.connect("postgres", "app");
            let registered = count(
                &mut su,
                &format!(
                    "SELECT count(*) FROM tenancy.protected_tables WHERE schema_name = 'clinic' AND table_name = {}",
                    pg_literal(&name)
                ),
            );
            assert_eq!(
                registered, 1,
                "{name:?} protected under its own name (scs {scs})"
            );
            let forced: bool = su
                .query_one(
                    &format!(
                        "SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE oid = 'clinic.{}'::regclass",
                        quoted.replace('\'', "''")
                    ),
                    &[],
                )
                .unwrap()
                .get(0);
            assert!(forced);
            assert!(!is_superuser(&mut su, "owner"), "after {name:?}");
        }
    }
}

/// A literal with quotes doubled and backslashes escaped (E'' form), for the test's own SQL.
fn pg_literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// O2: the owner puts a schema with shadowing operators first in the database's search_path.
/// The operators escalate to superuser whenever a superuser evaluates them. Then a DBA runs
/// every maintenance function, the event triggers fire, and the reveal worker (restarted, so
/// it reads the database's settings) records reveals: the owner stays NOSUPERUSER and its
/// code never runs as anyone else.
#[test]
fn test_o2_hostile_search_path_and_shadowing_operators_reach_no_privileged_code() {
    let c = reference_cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(
            "CREATE SCHEMA evil;
             CREATE TABLE evil.ran_as (who name, op text);
             GRANT INSERT ON evil.ran_as TO PUBLIC;
             GRANT USAGE ON SCHEMA evil TO PUBLIC;
             CREATE FUNCTION evil.note(op text) RETURNS void LANGUAGE plpgsql
             SET search_path = pg_catalog AS $$
             BEGIN
               -- Only runs with rights the owner lacks count (the application's own SQL
               -- in this database is the application's business).
               IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
                 INSERT INTO evil.ran_as VALUES (current_user, op);
                 BEGIN
                   EXECUTE 'ALTER ROLE owner SUPERUSER';
                 EXCEPTION WHEN OTHERS THEN NULL;
                 END;
               END IF;
             END $$;",
        )
        .unwrap();
    // Shadow the operators privileged SQL uses, for the types it uses them on.
    for (op, ty, builtin) in [
        ("=", "text", "texteq"),
        ("=", "uuid", "uuid_eq"),
        ("=", "bigint", "int8eq"),
        ("=", "integer", "int4eq"),
        ("=", "name", "nameeq"),
        ("=", "oid", "oideq"),
        ("=", "\"char\"", "chareq"),
        ("<>", "bigint", "int8ne"),
        ("<>", "text", "textne"),
        ("<=", "bigint", "int8le"),
        ("<", "bigint", "int8lt"),
        (">", "bigint", "int8gt"),
        ("+", "bigint", "int8pl"),
        ("||", "text", "textcat"),
    ] {
        let ret = match op {
            "+" => "bigint",
            "||" => "text",
            _ => "boolean",
        };
        let fname = format!("op_{}_{}", builtin, ty.replace('"', ""));
        owner
            .batch_execute(&format!(
                "CREATE FUNCTION evil.{fname}(a {ty}, b {ty}) RETURNS {ret} LANGUAGE plpgsql AS $$
                 BEGIN PERFORM evil.note('{op} {ty}'); RETURN pg_catalog.{builtin}(a, b); END $$;
                 CREATE OPERATOR evil.{op} (LEFTARG = {ty}, RIGHTARG = {ty}, FUNCTION = evil.{fname});"
            ))
            .unwrap_or_else(|e| panic!("operator {op} {ty}: {e}"));
    }
    // The owner may no longer set it (fourth attacker pass); a superuser can, and the
    // privileged code must hold even then.
    assert_eq!(
        sqlstate(
            owner.batch_execute("ALTER DATABASE app SET search_path = evil, pg_catalog, public")
        ),
        "42501"
    );
    c.connect("postgres", "app")
        .batch_execute("ALTER DATABASE app SET search_path = evil, pg_catalog, public")
        .unwrap();
    // The owner's own session: its operators work (for it, that is its right).
    let mut check = c.connect("owner", "app");
    assert_eq!(
        strings(&mut check, "SHOW search_path"),
        ["evil, pg_catalog, public"]
    );

    // The background worker reads the database's settings when it connects: restart.
    c.restart();
    let mut su = c.connect("postgres", "app");
    assert_eq!(
        strings(&mut su, "SHOW search_path"),
        ["evil, pg_catalog, public"]
    );
    // The trap works: a superuser's own unqualified `=` on text runs the owner's operator and
    // is recorded (and escalates). Undo both, then play the real cases.
    su.batch_execute("SELECT 'x'::text = 'x'::text").unwrap();
    assert!(
        is_superuser(&mut c.connect("postgres", "postgres"), "owner"),
        "the trap is armed"
    );
    c.connect("postgres", "postgres")
        .batch_execute("ALTER ROLE owner NOSUPERUSER")
        .unwrap();
    c.connect("owner", "app")
        .batch_execute("DELETE FROM evil.ran_as")
        .unwrap();
    // A DBA's maintenance, in a session with the hostile search_path.
    for stmt in [
        "SELECT tenancy.protect('clinic.reviews', audit => true)".to_string(),
        "SELECT tenancy.protect_all('clinic', root => 'clinic.organizations', audit => true)".into(),
        "SELECT * FROM tenancy.isolation_report()".into(),
        format!("SELECT * FROM tenancy.audit_verify('{SHERWOOD}')"),
        format!("SELECT * FROM tenancy.audit_history('{CONWAY}', now() - interval '1 day', now())"),
        "SELECT * FROM tenancy.phi_key_usage('clinic.patients', 'first_name')".into(),
        "CALL tenancy.phi_rotate_all('clinic.patients', 'first_name', label => NULL, batch_size => 10)".into(),
        "SELECT tenancy.phi_rotate_column('clinic.patients', 'last_name')".into(),
        format!("SELECT tenancy.audit_purge('{CONWAY}', now() - interval '1 year')"),
        "CREATE TABLE clinic.later (id bigint, organization_id uuid NOT NULL)".into(),
        "SELECT tenancy.unprotect('clinic.later')".into(),
        "SELECT tenancy.protect('clinic.later')".into(),
        "ALTER TABLE clinic.later ADD COLUMN note text".into(),
        "DROP TABLE clinic.later".into(),
    ] {
        su.batch_execute(&stmt)
            .unwrap_or_else(|e| panic!("{stmt}: {e:?}"));
    }
    // The application's writes (audit trigger) and reveals (the worker), with the same path.
    let mut app = c.connect("app", "app");
    app.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}');
         UPDATE clinic.reviews SET rating = rating;
         INSERT INTO clinic.reviews (rating, body) VALUES (4, 'fine');
         SELECT tenancy.phi_reveal(first_name) FROM clinic.patients;
         SELECT tenancy.log_action('o2.check');
         COMMIT;"
    ))
    .unwrap();
    // The test's own checks run in a session with a clean search_path (a superuser's own
    // unqualified `=` would otherwise run the owner's operator: that is the superuser's SQL,
    // not the extension's).
    let mut clean = c.connect("postgres", "app");
    clean
        .batch_execute("SET search_path = pg_catalog, pg_temp")
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while count(
        &mut clean,
        "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL'",
    ) == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker recorded the reveal"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ran = strings(&mut clean, "SELECT who || ': ' || op FROM evil.ran_as");
    assert_eq!(ran, Vec::<String>::new(), "the owner's operators ran as");
    assert!(!is_superuser(&mut clean, "owner"), "owner became superuser");
    assert!(!c.log().contains("PANIC"));
}

/// O3: protection follows the table through RENAME and SET SCHEMA (the registry is keyed by
/// the table, not its name), and the tenant column cannot be renamed away.
#[test]
fn test_o3_renamed_or_moved_tables_stay_protected() {
    let c = cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(
            "CREATE TABLE clinic.rename_me (id bigint, organization_id uuid NOT NULL);
             CREATE SCHEMA stash;",
        )
        .unwrap();
    let mut su = c.connect("postgres", "app");
    let registered = |su: &mut Client| {
        strings(
            su,
            "SELECT schema_name || '.' || table_name FROM tenancy.protected_tables WHERE rel::text LIKE '%rename_me%' OR table_name LIKE 'rename_me%'",
        )
    };
    assert_eq!(registered(&mut su), ["clinic.rename_me"]);
    owner
        .batch_execute("ALTER TABLE clinic.rename_me RENAME TO rename_me2")
        .unwrap();
    assert_eq!(
        registered(&mut su),
        ["clinic.rename_me2"],
        "the registry follows"
    );
    for stmt in [
        "ALTER TABLE clinic.rename_me2 NO FORCE ROW LEVEL SECURITY",
        "ALTER TABLE clinic.rename_me2 DISABLE ROW LEVEL SECURITY",
        "DROP POLICY tenancy_tenant_floor ON clinic.rename_me2",
        "ALTER TABLE clinic.rename_me2 DISABLE TRIGGER tenancy_no_truncate",
        "ALTER TABLE clinic.rename_me2 RENAME COLUMN organization_id TO org",
    ] {
        assert_eq!(
            sqlstate(owner.batch_execute(stmt)),
            "42501",
            "{stmt} is refused"
        );
    }
    owner
        .batch_execute("ALTER TABLE clinic.rename_me2 SET SCHEMA stash")
        .unwrap();
    assert_eq!(registered(&mut su), ["stash.rename_me2"]);
    for stmt in [
        "ALTER TABLE stash.rename_me2 NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY tenancy_tenant_rows ON stash.rename_me2",
    ] {
        assert_eq!(sqlstate(owner.batch_execute(stmt)), "42501", "{stmt}");
    }
    let log = strings(
        &mut su,
        "SELECT action FROM tenancy.protection_log WHERE action = 'renamed'",
    );
    assert!(log.len() >= 2, "renames are recorded: {log:?}");
    // Dropping it is the owner's right; the registry forgets it.
    owner.batch_execute("DROP TABLE stash.rename_me2").unwrap();
    assert_eq!(registered(&mut su), Vec::<String>::new());
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.isolation_report() WHERE object LIKE '%rename_me%'"
        ),
        0
    );
}

/// O3: pg_tenancy's policies are verified by definition, not by name. A floor re-created as
/// USING (true) under its own name (here by a superuser with the guards off, the only way
/// left) is reported, and the guards refuse further DDL on the table until it is repaired.
#[test]
fn test_o3_swapped_policy_definitions_are_found_by_definition() {
    let c = cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute("CREATE TABLE clinic.swap_me (id bigint, organization_id uuid NOT NULL)")
        .unwrap();
    let mut su = c.connect("postgres", "app");
    for (policy, kind, command) in [
        ("tenancy_tenant_floor", "AS RESTRICTIVE", "FOR ALL"),
        ("tenancy_tenant_rows", "AS PERMISSIVE", "FOR ALL"),
        ("tenancy_tenant_floor", "AS PERMISSIVE", "FOR ALL"),
        ("tenancy_tenant_rows", "AS PERMISSIVE", "FOR SELECT"),
    ] {
        let using = if command == "FOR SELECT" {
            "USING (organization_id = tenancy.current_org_id())".to_string()
        } else {
            "USING (true) WITH CHECK (true)".to_string()
        };
        su.batch_execute(&format!(
            "ALTER EVENT TRIGGER tenancy_guard_ddl DISABLE; ALTER EVENT TRIGGER tenancy_guard_drop DISABLE;
             DROP POLICY {policy} ON clinic.swap_me;
             CREATE POLICY {policy} ON clinic.swap_me {kind} {command} TO PUBLIC {using};
             ALTER EVENT TRIGGER tenancy_guard_ddl ENABLE ALWAYS; ALTER EVENT TRIGGER tenancy_guard_drop ENABLE ALWAYS;"
        ))
        .unwrap();
        let found = strings(
            &mut su,
            "SELECT finding FROM tenancy.isolation_report() WHERE object = 'clinic.swap_me'",
        );
        assert!(
            found
                .iter()
                .any(|f| f.contains("not as pg_tenancy defines it")),
            "{policy} {kind} {command}: {found:?}"
        );
        assert_eq!(
            sqlstate(owner.batch_execute("ALTER TABLE clinic.swap_me ADD COLUMN x int")),
            "42501",
            "DDL on a table whose protection drifted is refused"
        );
        su.query("SELECT tenancy.protect('clinic.swap_me')", &[])
            .unwrap();
        assert_eq!(
            count(
                &mut su,
                "SELECT count(*) FROM tenancy.isolation_report() WHERE object = 'clinic.swap_me'"
            ),
            0,
            "protect() repairs it"
        );
    }
    owner.batch_execute("DROP TABLE clinic.swap_me").unwrap();
}

/// O4/O5: DDL by the owner on a protected table runs none of the owner's code over the rows
/// (checked while the command runs, so not even a NOTICE gets out), and leaves none behind to
/// run on later writes; grafting a filled table in by INHERIT or ATTACH PARTITION is refused.
/// Built-in expressions stay allowed, and a superuser (trusted) may do all of it.
#[test]
fn test_o4_o5_owner_ddl_runs_no_owner_code_over_tenant_rows() {
    let c = cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(&format!(
            "CREATE TABLE clinic.ddl_target (id bigint, organization_id uuid NOT NULL, body text,
                                             secret bytea);
             BEGIN; SELECT tenancy.set_org('{SHERWOOD}');
             INSERT INTO clinic.ddl_target (id, body, secret) VALUES (1, 'sherwood row', tenancy.phi_encrypt('s-phi', 'ddl.secret'));
             COMMIT;
             BEGIN; SELECT tenancy.set_org('{CONWAY}');
             INSERT INTO clinic.ddl_target (id, body, secret) VALUES (2, 'conway row', tenancy.phi_encrypt('c-phi', 'ddl.secret'));
             COMMIT;
             CREATE SCHEMA owner_code;
             CREATE FUNCTION owner_code.peek(t text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
             BEGIN RAISE NOTICE 'peeked: %', t; RETURN true; END $$;
             CREATE FUNCTION owner_code.peek_text(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
             BEGIN RAISE NOTICE 'peeked: %', t; RETURN t; END $$;
             -- O5: an IMMUTABLE wrapper over a STABLE helper that reveals, errors swallowed.
             CREATE FUNCTION owner_code.helper(b bytea) RETURNS text LANGUAGE plpgsql STABLE AS $$
             BEGIN RETURN tenancy.phi_reveal(b, 'ddl.secret'); EXCEPTION WHEN OTHERS THEN RETURN NULL; END $$;
             CREATE FUNCTION owner_code.wrap(b bytea) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT owner_code.helper(b)';
             CREATE TABLE owner_code.filled (id bigint, organization_id uuid NOT NULL, body text, secret bytea);
             INSERT INTO owner_code.filled VALUES (9, '{CONWAY}', 'forged for conway', NULL);
             CREATE TABLE owner_code.empty (id bigint, organization_id uuid NOT NULL, body text, secret bytea);"
        ))
        .unwrap();
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = notices.clone();
    let mut cfg = postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(c.port)
        .user("owner")
        .dbname("app")
        .notice_callback(move |n| seen.lock().unwrap().push(n.message().to_string()));
    let mut watched = cfg.connect(postgres::NoTls).unwrap();
    for stmt in [
        "ALTER TABLE clinic.ddl_target ADD CONSTRAINT peek CHECK (owner_code.peek(body))",
        "ALTER TABLE clinic.ddl_target ADD CONSTRAINT peek CHECK (owner_code.peek(body)) NOT VALID",
        "CREATE INDEX ddl_peek ON clinic.ddl_target (owner_code.peek_text(body))",
        "CREATE INDEX ddl_peek ON clinic.ddl_target (id) WHERE owner_code.peek(body)",
        "CREATE INDEX ddl_reveal ON clinic.ddl_target (owner_code.wrap(secret))",
        "ALTER TABLE clinic.ddl_target ALTER COLUMN body TYPE text USING owner_code.peek_text(body)",
        "ALTER TABLE clinic.ddl_target ADD COLUMN copy text GENERATED ALWAYS AS (owner_code.peek_text(body)) STORED",
        "ALTER TABLE clinic.ddl_target ADD COLUMN copy text DEFAULT owner_code.peek_text('x')",
        "CREATE RULE stash AS ON INSERT TO clinic.ddl_target DO ALSO INSERT INTO owner_code.empty VALUES (NEW.*)",
        "ALTER TABLE owner_code.filled INHERIT clinic.ddl_target",
    ] {
        assert_eq!(
            sqlstate(watched.batch_execute(stmt)),
            "42501",
            "refused: {stmt}"
        );
    }
    let got = notices.lock().unwrap().clone();
    assert!(
        got.iter().all(|n| !n.contains("peeked")),
        "no row reached the owner's code: {got:?}"
    );
    // The same code on the owner's own, unprotected table runs (it is the owner's right).
    watched
        .batch_execute("SELECT count(*) FROM owner_code.filled WHERE owner_code.peek(body)")
        .unwrap();
    assert!(
        notices.lock().unwrap().iter().any(|n| n.contains("peeked")),
        "the probe reports what it sees"
    );
    // An empty table may join, and is protected at once.
    owner
        .batch_execute("ALTER TABLE owner_code.empty INHERIT clinic.ddl_target")
        .unwrap();
    let mut su = c.connect("postgres", "app");
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.protected_tables WHERE rel = 'owner_code.empty'::regclass"
        ),
        1
    );
    // Built-in expressions are ordinary DDL and stay allowed.
    owner
        .batch_execute(
            "ALTER TABLE clinic.ddl_target ADD CONSTRAINT short CHECK (length(body) < 100);
             CREATE INDEX ddl_lower ON clinic.ddl_target (lower(body));
             ALTER TABLE clinic.ddl_target ALTER COLUMN id TYPE numeric;",
        )
        .unwrap();
    // The report flags such code wherever a superuser let it in.
    su.batch_execute(
        "ALTER TABLE clinic.ddl_target ADD CONSTRAINT peek CHECK (owner_code.peek(body)) NOT VALID",
    )
    .unwrap();
    let found = strings(
        &mut su,
        "SELECT finding FROM tenancy.isolation_report() WHERE object = 'clinic.ddl_target'",
    );
    assert!(
        found.iter().any(|f| f.contains("owner_code.peek")),
        "{found:?}"
    );
    su.batch_execute("ALTER TABLE clinic.ddl_target DROP CONSTRAINT peek")
        .unwrap();
    // A superuser (trusted) can still make an index over a PHI column through a wrapper of its
    // own: the report names it (here one that indexes no row yet, WHERE false).
    su.batch_execute(
        "CREATE FUNCTION public.su_helper(b bytea) RETURNS text LANGUAGE plpgsql STABLE AS $$
         BEGIN RETURN tenancy.phi_reveal(b); EXCEPTION WHEN OTHERS THEN RETURN NULL; END $$;
         CREATE FUNCTION public.su_wrap(b bytea) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT public.su_helper(b)';
         CREATE INDEX patients_plain ON clinic.patients (public.su_wrap(first_name)) WHERE false;",
    )
    .unwrap();
    let found = strings(
        &mut su,
        "SELECT object || ': ' || finding FROM tenancy.isolation_report() WHERE object LIKE '%patients_plain%'",
    );
    assert!(
        found
            .iter()
            .any(|f| f.contains("PHI column first_name") && f.contains("su_wrap")),
        "{found:?}"
    );
    su.batch_execute(
        "DROP INDEX clinic.patients_plain; DROP FUNCTION public.su_wrap(bytea); DROP FUNCTION public.su_helper(bytea);",
    )
    .unwrap();
    assert!(!is_superuser(&mut su, "owner"));
}

/// O4: a filled table cannot become a partition of a protected table.
#[test]
fn test_o4_filled_tables_cannot_be_attached_as_partitions() {
    let c = cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(&format!(
            "CREATE TABLE clinic.parted (id bigint, organization_id uuid NOT NULL, v text) PARTITION BY LIST (id);
             CREATE TABLE clinic.parted_1 PARTITION OF clinic.parted FOR VALUES IN (1);
             CREATE TABLE public.parted_forged (id bigint, organization_id uuid NOT NULL, v text);
             INSERT INTO public.parted_forged VALUES (2, '{CONWAY}', 'forged');
             CREATE TABLE public.parted_empty (id bigint, organization_id uuid NOT NULL, v text);"
        ))
        .unwrap();
    assert_eq!(
        sqlstate(owner.batch_execute(
            "ALTER TABLE clinic.parted ATTACH PARTITION public.parted_forged FOR VALUES IN (2)"
        )),
        "42501"
    );
    owner
        .batch_execute(
            "ALTER TABLE clinic.parted ATTACH PARTITION public.parted_empty FOR VALUES IN (3)",
        )
        .unwrap();
    let mut su = c.connect("postgres", "app");
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.protected_tables WHERE rel = 'public.parted_empty'::regclass"
        ),
        1,
        "the attached partition is protected"
    );
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM clinic.parted WHERE v = 'forged'"
        ),
        0,
        "no forged row joined the protected table"
    );
}

/// pg_tenancy's hooks chain to hooks installed before them (here pg_stat_statements'): an
/// ERROR raised while a chained hook runs (the owner-DDL refusal, a failed CREATE INDEX)
/// unwinds through pg_tenancy's guards, so nothing is left set after it: the owner's own
/// functions run again, and reveals work after a failed index build rolled back to a
/// savepoint.
#[test]
fn test_chained_hooks_leave_no_state_behind_after_an_error() {
    let c =
        Cluster::start_with_phi(&["shared_preload_libraries = 'pg_stat_statements,pg_tenancy'"]);
    let mut su = c.connect("postgres", "app");
    su.batch_execute(
        "CREATE EXTENSION pg_tenancy;
         CREATE TABLE public.t (id int, organization_id uuid NOT NULL, secret bytea);
         GRANT SELECT, INSERT ON public.t TO app;
         ALTER TABLE public.t OWNER TO owner;
         SELECT tenancy.protect('public.t');",
    )
    .unwrap();
    assert_eq!(
        strings(&mut su, "SHOW shared_preload_libraries"),
        ["pg_stat_statements,pg_tenancy"]
    );
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(&format!(
            "CREATE FUNCTION public.mine(t int) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';
             BEGIN; SELECT tenancy.set_org('{SHERWOOD}'); INSERT INTO public.t (id) VALUES (1); COMMIT;"
        ))
        .unwrap();
    assert_eq!(
        sqlstate(
            owner.batch_execute("ALTER TABLE public.t ADD CONSTRAINT c CHECK (public.mine(id))")
        ),
        "42501"
    );
    // The refusal did not leave the guard set: the owner's function runs in its own queries.
    let ok: bool = owner
        .query_one("SELECT public.mine(1)", &[])
        .unwrap()
        .get(0);
    assert!(ok);
    // A failed CREATE INDEX (a storing command) rolled back to a savepoint: reveals work.
    let mut app = c.connect("app", "app");
    app.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}'); SAVEPOINT s;"
    ))
    .unwrap();
    assert_ne!(
        sqlstate(app.batch_execute("CREATE INDEX ON public.t (no_such_column)")),
        "ok"
    );
    app.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    let revealed: String = app
        .query_one(
            "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('after'))",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(revealed, "after");
    app.batch_execute("COMMIT").unwrap();
    assert!(!c.log().contains("PANIC"));
}

/// Found by an attacker pass on 0.2.1 (II-2/9 follow-up), each as the owner:
/// a RESTRICTIVE policy with a cheap function ran before the tenant floor over every row;
/// a protected table made a child of the owner's unprotected parent was read and written
/// through the parent; an "empty" table whose child held forged rows joined a protected table;
/// a CREATE STATISTICS expression ran the owner's code in a superuser's (or autovacuum's)
/// ANALYZE; a schema rename left new tables unprotected.
#[test]
fn test_attacker_pass_owner_variants_are_refused() {
    let c = cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS owner_code2;
             CREATE FUNCTION owner_code2.peek(r clinic.reviews) RETURNS boolean LANGUAGE plpgsql COST 0.0001
               AS $$ BEGIN RAISE NOTICE 'peek: %', r; RETURN true; END $$;
             CREATE FUNCTION owner_code2.lk(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN RETURN t; END $$;
             CREATE TABLE owner_code2.p (body text);
             CREATE TABLE owner_code2.pp (id bigint, organization_id uuid NOT NULL, v text) PARTITION BY LIST (id);
             CREATE TABLE owner_code2.c1 (LIKE clinic.locations);
             CREATE TABLE owner_code2.g1 () INHERITS (owner_code2.c1);",
        )
        .unwrap();
    owner
        .batch_execute(&format!(
            "INSERT INTO owner_code2.g1 (organization_id, id, name) VALUES ('{CONWAY}', gen_random_uuid(), 'forged by owner')"
        ))
        .unwrap();
    owner
        .batch_execute(
            "CREATE TABLE clinic.parts (id bigint, organization_id uuid NOT NULL, v text) PARTITION BY LIST (id);
             CREATE TABLE clinic.parts_1 (id bigint, organization_id uuid NOT NULL, v text);",
        )
        .unwrap();
    for stmt in [
        "CREATE POLICY aaa_helper ON clinic.reviews AS RESTRICTIVE FOR SELECT TO PUBLIC USING (owner_code2.peek(reviews))",
        "CREATE POLICY aaa_plain ON clinic.reviews AS PERMISSIVE FOR SELECT TO PUBLIC USING (true)",
        "ALTER POLICY tenancy_tenant_rows ON clinic.reviews RENAME TO x",
        "ALTER TABLE clinic.reviews INHERIT owner_code2.p",
        "ALTER TABLE owner_code2.c1 INHERIT clinic.locations",
        "CREATE STATISTICS clinic.st3 ON (owner_code2.lk(body)), rating FROM clinic.reviews",
    ] {
        let err = crate::harness::db_error(owner.batch_execute(stmt));
        // PostgreSQL 13 refuses two of these itself (0A000) before pg_tenancy's guard sees
        // them: an audited table (transition-table triggers) as an inheritance child, and
        // expressions in CREATE STATISTICS (PostgreSQL 14+).
        let postgres_refused = crate::harness::pg_major() == 13
            && err.code().code() == "0A000"
            && (err.message().contains("prevents table")
                || err.message().contains("only simple column references"));
        assert!(
            err.code().code() == "42501" || postgres_refused,
            "refused: {stmt}: {} {}",
            err.code().code(),
            err.message()
        );
    }
    // A domain constraint added later runs over every row of every table using the domain.
    owner
        .batch_execute(
            "CREATE DOMAIN owner_code2.note AS text;
             ALTER TABLE clinic.reviews ADD COLUMN note owner_code2.note;",
        )
        .unwrap();
    assert_eq!(
        sqlstate(owner.batch_execute(
            "ALTER DOMAIN owner_code2.note ADD CONSTRAINT peek CHECK (owner_code2.lk(VALUE) IS NOT NULL OR VALUE IS NULL)"
        )),
        "42501",
        "ALTER DOMAIN ADD CONSTRAINT with owner code"
    );
    owner
        .batch_execute("ALTER TABLE clinic.reviews DROP COLUMN note")
        .unwrap();
    // Third pass: built-ins that keep state, run SQL or fail with a row's value in the message.
    owner
        .batch_execute("SELECT set_config('x.leak', '', false)")
        .unwrap();
    assert_eq!(
        sqlstate(owner.batch_execute(
            "ALTER TABLE clinic.reviews ADD CONSTRAINT leak_chk CHECK (set_config('x.leak', current_setting('x.leak') || body, false) IS NOT NULL)"
        )),
        "42501"
    );
    assert_eq!(
        strings(&mut owner, "SELECT current_setting('x.leak')"),
        [""],
        "rolled back with the refusal"
    );
    let err = crate::harness::db_error(owner.batch_execute(
        "ALTER TABLE clinic.reviews ADD CONSTRAINT e4 CHECK (current_setting(body) IS NOT NULL)",
    ));
    assert!(
        err.message().contains("withheld") && !err.message().contains("secret"),
        "{}",
        err.message()
    );
    assert_eq!(
        sqlstate(owner.batch_execute(&format!(
            "CREATE TABLE clinic.forged AS SELECT '{CONWAY}'::uuid AS organization_id, 'FORGED'::text AS body"
        ))),
        "42501",
        "CREATE TABLE AS with rows into the protected schema"
    );
    // A superuser validating a constraint runs no owner code, even behind query_to_xml.
    let mut dba = c.connect("postgres", "app");
    dba.batch_execute(
        "CREATE FUNCTION owner_code2.pwn() RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN 1; END';
         ALTER FUNCTION owner_code2.pwn() OWNER TO owner;
         ALTER TABLE clinic.reviews ADD CONSTRAINT su_pwn CHECK (query_to_xml('SELECT owner_code2.pwn()', false, false, '') IS NOT NULL) NOT VALID;",
    )
    .unwrap();
    assert_eq!(
        sqlstate(dba.batch_execute("ALTER TABLE clinic.reviews VALIDATE CONSTRAINT su_pwn")),
        "42501"
    );
    dba.batch_execute("ALTER TABLE clinic.reviews DROP CONSTRAINT su_pwn")
        .unwrap();
    // ATTACH PARTITION of a protected table into the owner's unprotected partitioned table.
    let mut su = c.connect("postgres", "app");
    // PostgreSQL 13 refuses it itself (0A000): the partition, audited like every table of
    // the audited schema, has transition-table triggers, which PG 13 does not allow there.
    let code = sqlstate(su.batch_execute(
        "ALTER TABLE owner_code2.pp ATTACH PARTITION clinic.parts_1 FOR VALUES IN (1)",
    ));
    assert!(
        code == "42501" || (crate::harness::pg_major() == 13 && code == "0A000"),
        "not even a superuser makes a protected table a child of an unprotected one: {code}"
    );
    // Nothing forged reached Conway's locations.
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM clinic.locations WHERE name = 'forged by owner'"
        ),
        0
    );
    // A schema rename: the protected schema keeps protecting new tables under its new name.
    owner.batch_execute("CREATE SCHEMA moving; ").unwrap();
    su.batch_execute(
        "CREATE TABLE moving.first (id int, organization_id uuid NOT NULL);
         SELECT tenancy.protect_all('moving');",
    )
    .unwrap();
    owner
        .batch_execute(
            "ALTER SCHEMA moving RENAME TO moved;
             CREATE TABLE moved.later (id int, organization_id uuid NOT NULL, secret text);",
        )
        .unwrap();
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.protected_tables WHERE rel = 'moved.later'::regclass"
        ),
        1,
        "new table in the renamed schema is protected"
    );
    assert_eq!(
        strings(
            &mut su,
            "SELECT schema_name::text FROM tenancy.protected_schemas WHERE schema_name IN ('moving', 'moved')"
        ),
        ["moved"]
    );
    assert!(!is_superuser(&mut su, "owner"));
}

/// F6 of the attacker pass: `ALTER DATABASE ... SET role = <owner>` by the database owner made
/// the reveal worker (and every superuser session) start as the owner: the worker failed and
/// reveals went unrecorded. The worker now runs as itself; the report names the setting.
#[test]
fn test_a_database_role_setting_does_not_take_over_the_reveal_worker() {
    let c = reference_cluster();
    let mut owner = c.connect("owner", "app");
    // The owner may no longer set it (fourth attacker pass); set by a superuser, the worker
    // must still run as itself.
    assert_eq!(
        sqlstate(owner.batch_execute("ALTER DATABASE app SET role = 'owner'")),
        "42501"
    );
    c.connect("postgres", "app")
        .batch_execute("ALTER DATABASE app SET role = 'owner'")
        .unwrap();
    c.restart();
    let mut app = c.connect("app", "app");
    app.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{CONWAY}');
         SELECT tenancy.phi_reveal(last_name) FROM clinic.patients; COMMIT;"
    ))
    .unwrap();
    let mut su = c.connect("postgres", "postgres");
    let mut clean = c.connect("postgres", "app");
    clean.batch_execute("SET ROLE NONE").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while count(
        &mut clean,
        "SELECT count(*) FROM tenancy.audit_events WHERE action = 'REVEAL'",
    ) == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker recorded the reveal: {}",
            c.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let found = strings(
        &mut clean,
        "SELECT object || ': ' || finding FROM tenancy.isolation_report() WHERE finding LIKE 'setting role%'",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(!is_superuser(&mut su, "owner"));
}

/// Second attacker pass on 0.2.1: the owner's code running with a superuser's rights in the
/// key-rotation runbook (a trigger, a domain check two domains deep), other tenants' values in
/// error messages of owner DDL, rewrites through ALTER COLUMN ... TYPE ... USING and enum
/// relabelling, a filled table moved into the protected schema, an index left behind by a
/// refused CREATE INDEX CONCURRENTLY run by a superuser's REINDEX, and partitions of audited
/// tables created later without audit triggers.
#[test]
fn test_second_attacker_pass_variants_are_refused() {
    let c = reference_cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(&format!(
            "CREATE SCHEMA spy;
             CREATE TABLE spy.loot (v text);
             GRANT INSERT ON spy.loot TO PUBLIC; GRANT USAGE ON SCHEMA spy TO PUBLIC;
             CREATE FUNCTION spy.esc() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
               EXECUTE 'ALTER ROLE owner SUPERUSER'; END IF; RETURN NEW; END $$;
             CREATE FUNCTION spy.d_esc(v bytea) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
               EXECUTE 'ALTER ROLE owner SUPERUSER'; END IF; RETURN true; END $$;
             CREATE FUNCTION spy.leaki(t text) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
             BEGIN INSERT INTO spy.loot VALUES (current_user || ': ' || t); RETURN 1; END $$;
             BEGIN; SELECT tenancy.set_org('{CONWAY}');
             INSERT INTO clinic.reviews (rating, body) VALUES (3, 'conway secret value'); COMMIT;"
        ))
        .unwrap();
    // The owner may not attach its trigger to a protected table (it would see every row
    // written); one a superuser attached (below, before the rotation) is what the rotation
    // must not run with superuser rights.
    assert_eq!(
        sqlstate(owner.batch_execute(
            "CREATE TRIGGER zz_esc BEFORE UPDATE ON clinic.patients FOR EACH ROW EXECUTE FUNCTION spy.esc()"
        )),
        "42501"
    );
    // Two domains deep: a constraint on the base domain of the column's domain.
    owner
        .batch_execute(
            "CREATE DOMAIN clinic.phi_base AS tenancy.phi;
             CREATE DOMAIN clinic.phi_col AS clinic.phi_base;
             ALTER TABLE clinic.patients ALTER COLUMN phone TYPE clinic.phi_col;
             CREATE DOMAIN clinic.d3 AS text; CREATE TYPE clinic.comp AS (a clinic.d3);
             ALTER TABLE clinic.members ADD COLUMN x clinic.comp;",
        )
        .unwrap();
    for stmt in [
        "ALTER DOMAIN clinic.phi_base ADD CONSTRAINT esc CHECK (spy.d_esc(VALUE)) NOT VALID",
        "ALTER DOMAIN clinic.d3 ADD CONSTRAINT esc CHECK (spy.leaki(VALUE) = 1) NOT VALID",
        // Rewrites of every tenant's values with an expression the owner chose.
        "ALTER TABLE clinic.reviews ALTER COLUMN body TYPE text USING 'defaced by owner'",
        "ALTER TABLE clinic.reviews ALTER COLUMN rating TYPE int USING (CASE WHEN organization_id = 'c0000000-0000-4000-8000-000000000002' THEN 5 ELSE rating END)",
    ] {
        let r = owner.batch_execute(stmt);
        assert!(r.is_err(), "refused: {stmt}");
        assert_eq!(sqlstate(r), "42501", "refused: {stmt}");
    }
    owner
        .batch_execute(
            "CREATE TYPE clinic.verdict AS ENUM ('approved', 'rejected');
             ALTER TABLE clinic.reviews ADD COLUMN verdict clinic.verdict NOT NULL DEFAULT 'approved';",
        )
        .unwrap();
    assert_eq!(
        sqlstate(owner.batch_execute("ALTER TYPE clinic.verdict RENAME VALUE 'approved' TO 'tmp'")),
        "42501"
    );
    c.connect("postgres", "app")
        .batch_execute("ALTER TYPE clinic.verdict ADD VALUE 'pending'")
        .unwrap();
    // Error messages of owner DDL show no row's value.
    let err = crate::harness::db_error(owner.batch_execute(&format!(
        "ALTER TABLE clinic.reviews ADD CONSTRAINT x CHECK (organization_id <> '{CONWAY}' OR body::text::int > 0)"
    )));
    let text = format!("{} {:?} {:?}", err.message(), err.detail(), err.hint());
    assert!(!text.contains("conway secret value"), "{text}");
    assert!(err.message().contains("withheld"), "{text}");
    let err = crate::harness::db_error(
        owner.batch_execute("CREATE UNIQUE INDEX ON clinic.reviews (rating)"),
    );
    assert!(
        err.detail().is_none(),
        "no Key (...)=(...) detail: {:?}",
        err.detail()
    );
    assert!(
        !c.log().contains("conway secret value"),
        "nor in the server log"
    );
    // A filled table moved into the protected schema, or given the tenant column there.
    owner
        .batch_execute(&format!(
            "CREATE TABLE public.smuggle (organization_id uuid NOT NULL, v text);
             INSERT INTO public.smuggle VALUES ('{CONWAY}', 'forged conway row');
             CREATE TABLE clinic.plain (v text); INSERT INTO clinic.plain VALUES ('x');"
        ))
        .unwrap();
    for stmt in [
        "ALTER TABLE public.smuggle SET SCHEMA clinic",
        "ALTER TABLE clinic.plain ADD COLUMN organization_id uuid DEFAULT 'c0000000-0000-4000-8000-000000000002'",
    ] {
        assert_eq!(sqlstate(owner.batch_execute(stmt)), "42501", "refused: {stmt}");
    }
    // A refused CREATE INDEX CONCURRENTLY may leave an invalid index behind; a superuser's
    // REINDEX does not run the owner's code.
    let _ = owner
        .batch_execute("CREATE INDEX CONCURRENTLY ri ON clinic.reviews (spy.leaki(body::text))");
    let mut su = c.connect("postgres", "app");
    if count(
        &mut su,
        "SELECT count(*) FROM pg_class WHERE relname = 'ri'",
    ) == 1
    {
        assert_eq!(
            sqlstate(su.batch_execute("REINDEX TABLE clinic.reviews")),
            "42501"
        );
        su.batch_execute("DROP INDEX clinic.ri").unwrap();
    }
    assert_eq!(
        count(&mut su, "SELECT count(*) FROM spy.loot"),
        0,
        "no value reached the owner"
    );
    // The runbook: a new active key, then the batched rotation as a superuser. The owner's
    // trigger is refused (the rotation stops with a clear error) and runs with nobody's rights.
    su.batch_execute(
        "CREATE TRIGGER zz_esc BEFORE UPDATE ON clinic.patients FOR EACH ROW EXECUTE FUNCTION spy.esc()",
    )
    .unwrap();
    let path = c.phi_key_file.clone().unwrap();
    crate::harness::keyring_tool(&["add", path.to_str().unwrap(), "--activate"]);
    c.reload();
    c.wait_for_active_key(2);
    let mut dba = c.connect("postgres", "app");
    let r = dba.batch_execute(
        "CALL tenancy.phi_rotate_all('clinic.patients', 'first_name', label => NULL, batch_size => 100)",
    );
    assert_eq!(
        sqlstate(r),
        "42501",
        "the owner's trigger does not run in the rotation"
    );
    assert!(!is_superuser(&mut su, "owner"), "owner became superuser");
    // Partitions created later under an audited table are audited too.
    owner
        .batch_execute(
            "CREATE TABLE clinic.ap (organization_id uuid NOT NULL, k int, v text) PARTITION BY LIST (k);",
        )
        .unwrap();
    su.query("SELECT tenancy.protect('clinic.ap', audit => true)", &[])
        .unwrap();
    owner
        .batch_execute("CREATE TABLE clinic.ap2 PARTITION OF clinic.ap FOR VALUES IN (2)")
        .unwrap();
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'clinic.ap2'::regclass AND tgname LIKE 'tenancy_audit%'"
        ),
        3,
        "the new partition has the audit triggers"
    );
}

/// II-2/9 finding 4's class, for triggers: the owner's trigger function on a protected table
/// runs on every write of every tenant and sees each row (a SECURITY DEFINER one copied them
/// into the owner's table). The owner cannot attach one (row, statement with transition
/// tables, constraint trigger); built-in trigger functions stay allowed; a trigger a superuser
/// attached with the owner's function is flagged by the report. The owner's DROP COLUMN, which
/// destroys every tenant's values at once, is recorded in the registry's log.
#[test]
fn test_owner_triggers_on_protected_tables_are_refused() {
    let c = reference_cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(
            "CREATE SCHEMA spy;
             CREATE TABLE spy.loot (v text);
             CREATE FUNCTION spy.copy() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN INSERT INTO spy.loot VALUES (NEW::text); RETURN NEW; END $$;
             CREATE FUNCTION spy.copy_all() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN INSERT INTO spy.loot SELECT n::text FROM new_rows n; RETURN NULL; END $$;",
        )
        .unwrap();
    for stmt in [
        "CREATE TRIGGER zz_copy BEFORE INSERT ON clinic.reviews FOR EACH ROW EXECUTE FUNCTION spy.copy()",
        "CREATE TRIGGER zz_copy AFTER INSERT ON clinic.reviews REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION spy.copy_all()",
        "CREATE CONSTRAINT TRIGGER zz_copy AFTER INSERT ON clinic.reviews DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION spy.copy()",
        "CREATE TRIGGER zz_copy BEFORE INSERT ON clinic.patients FOR EACH ROW EXECUTE FUNCTION spy.copy()",
    ] {
        let err = crate::harness::db_error(owner.batch_execute(stmt));
        assert_eq!(err.code().code(), "42501", "refused: {stmt}");
        assert!(
            err.message().contains("trigger zz_copy") && err.message().contains("spy.copy"),
            "names the trigger and its function: {}",
            err.message()
        );
    }
    // A built-in trigger function is not the owner's code.
    owner
        .batch_execute(
            "CREATE TRIGGER zz_same BEFORE UPDATE ON clinic.reviews FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        )
        .unwrap();
    // The application writes as both tenants: nothing reaches the owner.
    let mut app = c.connect("app", "app");
    for org in [SHERWOOD, CONWAY] {
        app.batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{org}');
             INSERT INTO clinic.reviews (rating, body) VALUES (4, 'review of {org}'); COMMIT;"
        ))
        .unwrap();
    }
    let mut su = c.connect("postgres", "app");
    assert_eq!(count(&mut su, "SELECT count(*) FROM spy.loot"), 0);
    // A superuser may attach one (trusted); the report then names it.
    su.batch_execute(
        "CREATE TRIGGER zz_copy BEFORE INSERT ON clinic.reviews FOR EACH ROW EXECUTE FUNCTION spy.copy()",
    )
    .unwrap();
    let findings = strings(
        &mut su,
        "SELECT object || ': ' || finding FROM tenancy.isolation_report() WHERE object = 'clinic.reviews'",
    );
    assert!(
        findings
            .iter()
            .any(|f| f.contains("trigger zz_copy") && f.contains("role owner")),
        "{findings:?}"
    );
    // ... and blocks the owner's further DDL on that table until a superuser reviews it.
    assert_eq!(
        sqlstate(owner.batch_execute("ALTER TABLE clinic.reviews ADD COLUMN note text")),
        "42501"
    );
    su.batch_execute("DROP TRIGGER zz_copy ON clinic.reviews")
        .unwrap();
    // DROP COLUMN by the owner: allowed (a migration), and recorded with who did it.
    owner
        .batch_execute("ALTER TABLE clinic.reviews ADD COLUMN note text; ALTER TABLE clinic.reviews DROP COLUMN note")
        .unwrap();
    assert_eq!(
        strings(
            &mut su,
            "SELECT by || ' ' || object || ' ' || detail FROM tenancy.protection_log WHERE action = 'column_dropped'",
        ),
        vec!["owner clinic.reviews clinic.reviews.note".to_string()]
    );
}

/// protect, protect_all and unprotect resolve an unqualified table name in the caller's
/// search_path (they pin search_path themselves only after that), and leave the caller's
/// search_path as it was.
#[test]
fn test_protect_resolves_names_in_the_callers_search_path() {
    // Its own cluster: its CREATE and DROP raced with the shared cluster's isolation_report
    // calls (which can fail while a table is being dropped: see the note on II-2/9).
    let c = reference_cluster();
    let mut su = c.connect("postgres", "app");
    su.batch_execute(
        "CREATE TABLE public.unqualified (organization_id uuid NOT NULL, v int);
         SET search_path = public;",
    )
    .unwrap();
    su.batch_execute("SELECT tenancy.protect('unqualified')")
        .unwrap();
    assert_eq!(
        strings(
            &mut su,
            "SELECT rel::text FROM tenancy.protected_tables WHERE table_name = 'unqualified'"
        ),
        vec!["unqualified".to_string()],
        "public.unqualified, named as the caller's search_path shows it"
    );
    assert_eq!(
        strings(&mut su, "SHOW search_path"),
        vec!["public".to_string()]
    );
    su.batch_execute("SELECT tenancy.unprotect('unqualified')")
        .unwrap();
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.protected_tables WHERE table_name = 'unqualified'"
        ),
        0
    );
    assert_eq!(
        sqlstate(su.batch_execute("SELECT tenancy.protect('no_such_table')")),
        "42P01"
    );
    su.batch_execute("RESET search_path; DROP TABLE public.unqualified")
        .unwrap();
}

/// Fourth attacker pass (0.2.1 with owner triggers refused), as the owner: a foreign key with
/// ON UPDATE CASCADE from the owner's table rewrote another tenant's review (referential
/// actions run without row level security) and a key from the owner's table probed other
/// tenants' values; `ALTER DATABASE ... SET search_path = evil, pg_catalog` made the
/// application's and a superuser's unqualified `=` the owner's; a typed table or an
/// inheritance child with forged rows gained the tenant column through ALTER TYPE ... RENAME
/// ATTRIBUTE ... CASCADE or a parent's RENAME COLUMN, unprotected.
#[test]
fn test_fourth_attacker_pass_variants_are_refused() {
    let c = reference_cluster();
    let mut owner = c.connect("owner", "app");
    owner
        .batch_execute(&format!(
            "CREATE SCHEMA evil;
             CREATE TABLE evil.p (org uuid, body text, PRIMARY KEY (org, body));
             INSERT INTO evil.p VALUES ('{CONWAY}', 'conway secret value');
             CREATE TABLE evil.p1 (org uuid PRIMARY KEY);
             INSERT INTO evil.p1 VALUES ('{CONWAY}');
             CREATE UNIQUE INDEX reviews_org_body ON clinic.reviews (organization_id, body);
             CREATE TABLE evil.probe (org uuid, body text);"
        ))
        .unwrap();
    for stmt in [
        "ALTER TABLE clinic.reviews ADD CONSTRAINT evil_fk FOREIGN KEY (organization_id, body) REFERENCES evil.p (org, body) ON UPDATE CASCADE NOT VALID",
        "ALTER TABLE clinic.reviews ADD CONSTRAINT evil_fk2 FOREIGN KEY (organization_id) REFERENCES evil.p1 (org) ON DELETE CASCADE NOT VALID",
        "ALTER TABLE evil.probe ADD CONSTRAINT probe_fk FOREIGN KEY (org, body) REFERENCES clinic.reviews (organization_id, body)",
        "CREATE TABLE evil.probe2 (org uuid, body text, FOREIGN KEY (org, body) REFERENCES clinic.reviews (organization_id, body))",
        "ALTER DATABASE app SET search_path = evil, pg_catalog, clinic, public",
        "ALTER ROLE owner SET search_path = evil, pg_catalog",
        "ALTER DATABASE app SET role = owner",
    ] {
        let e = crate::harness::db_error(owner.batch_execute(stmt));
        assert_eq!(e.code().code(), "42501", "refused: {stmt}: {}", e.message());
    }
    // Fifth pass: a key between two protected tables that does not pair the tenant columns
    // (ON UPDATE CASCADE from the owner's own tenant rewrote Conway's review).
    owner
        .batch_execute(
            "CREATE TABLE clinic.zz_lk (organization_id uuid NOT NULL, k text PRIMARY KEY)",
        )
        .unwrap();
    for stmt in [
        "ALTER TABLE clinic.reviews ADD CONSTRAINT zz_fk FOREIGN KEY (body) REFERENCES clinic.zz_lk (k) ON UPDATE CASCADE ON DELETE SET NULL NOT VALID",
        "CREATE TABLE clinic.zz_ref (organization_id uuid NOT NULL, k text REFERENCES clinic.zz_lk (k))",
    ] {
        let e = crate::harness::db_error(owner.batch_execute(stmt));
        assert_eq!(e.code().code(), "42501", "refused: {stmt}: {}", e.message());
        assert!(e.message().contains("tenant columns"), "{}", e.message());
    }
    // DETACH PARTITION: the detached table gets its guards back, and DDL goes on.
    owner
        .batch_execute(
            "CREATE TABLE clinic.zz_rp (organization_id uuid NOT NULL, body text) PARTITION BY LIST (organization_id);
             CREATE TABLE clinic.zz_rp1 PARTITION OF clinic.zz_rp DEFAULT;
             ALTER TABLE clinic.zz_rp DETACH PARTITION clinic.zz_rp1;",
        )
        .unwrap();
    assert_eq!(
        strings(
            &mut c.connect("postgres", "app"),
            "SELECT coalesce(tenancy.protection_problem('clinic.zz_rp1'), 'intact')"
        ),
        vec!["intact".to_string()]
    );
    owner
        .batch_execute("ALTER TABLE clinic.zz_lk ADD COLUMN note text; DROP TABLE clinic.zz_rp1")
        .unwrap();
    // A partition that brings such a key along (ATTACH names the parent).
    owner
        .batch_execute(
            "CREATE TABLE clinic.pt (organization_id uuid NOT NULL, k int, body text) PARTITION BY LIST (k);
             CREATE TABLE evil.pt1 (organization_id uuid NOT NULL, k int, body text,
               FOREIGN KEY (organization_id) REFERENCES evil.p1 (org) ON DELETE CASCADE);",
        )
        .unwrap();
    let code = sqlstate(
        owner.batch_execute("ALTER TABLE clinic.pt ATTACH PARTITION evil.pt1 FOR VALUES IN (1)"),
    );
    assert!(
        code == "42501" || (crate::harness::pg_major() == 13 && code == "0A000"),
        "a partition with a key to an unprotected table: {code}"
    );
    // Between protected tables, and RESET, stay allowed.
    owner
        .batch_execute(
            "CREATE TABLE clinic.child_ok (organization_id uuid NOT NULL, patient_id uuid,
               FOREIGN KEY (organization_id, patient_id) REFERENCES clinic.patients (organization_id, id));
             ALTER DATABASE app RESET search_path;",
        )
        .unwrap();
    // A superuser's database search_path with a schema before pg_catalog is reported.
    let mut su = c.connect("postgres", "app");
    su.batch_execute("ALTER DATABASE app SET search_path = evil, pg_catalog")
        .unwrap();
    let found = strings(
        &mut su,
        "SELECT severity || ' ' || object FROM tenancy.isolation_report() WHERE finding LIKE '%before pg_catalog%'",
    );
    assert_eq!(found, vec!["critical database app".to_string()]);
    su.batch_execute("ALTER DATABASE app RESET search_path")
        .unwrap();
    // The tenant column gained through the type or the parent.
    owner
        .batch_execute(&format!(
            "CREATE TYPE evil.ct AS (org uuid, note text);
             CREATE TABLE clinic.typed OF evil.ct;
             INSERT INTO clinic.typed VALUES ('{CONWAY}', 'forged note');
             CREATE TABLE evil.par (org uuid, note text);
             CREATE TABLE clinic.kid () INHERITS (evil.par);
             INSERT INTO clinic.kid VALUES ('{CONWAY}', 'forged kid');
             CREATE TYPE evil.ct2 AS (org uuid, note text);
             CREATE TABLE clinic.typed2 OF evil.ct2;"
        ))
        .unwrap();
    for stmt in [
        "ALTER TYPE evil.ct RENAME ATTRIBUTE org TO organization_id CASCADE",
        "ALTER TABLE evil.par RENAME COLUMN org TO organization_id",
    ] {
        let e = crate::harness::db_error(owner.batch_execute(stmt));
        assert_eq!(e.code().code(), "42501", "refused: {stmt}: {}", e.message());
    }
    // Empty: it becomes a tenant table like one created there.
    owner
        .batch_execute("ALTER TYPE evil.ct2 RENAME ATTRIBUTE org TO organization_id CASCADE")
        .unwrap();
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.protected_tables WHERE rel = 'clinic.typed2'::regclass"
        ),
        1
    );
    assert!(!is_superuser(&mut su, "owner"));
    assert_eq!(
        strings(
            &mut su,
            &format!(
                "SELECT body FROM clinic.reviews WHERE organization_id = '{CONWAY}' ORDER BY 1"
            )
        ),
        vec!["great".to_string()],
        "Conway's review is untouched"
    );
}
