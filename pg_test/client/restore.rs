//! Dump and restore: `pg_dump` of a protected, audited database and `pg_restore` into a new
//! server that shares the key ring give back the same protection, PHI that reveals, and an
//! audit trail that verifies, with nothing encrypted twice and no trigger fired by the load.

use crate::harness::{bindir, count, strings, Cluster};
use crate::rls::{reference_cluster, CONWAY, SHERWOOD};
use postgres::Client;
use std::process::{Command, Output};

/// What must survive a dump and restore, read as the DBA and as each clinic.
fn fingerprint(c: &Cluster) -> Vec<String> {
    let mut su = c.connect("postgres", "app");
    let mut out = strings(
        &mut su,
        "SELECT format('%s.%s rls=%s force=%s', n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity)
           FROM tenancy.protected_tables p
           JOIN pg_namespace n ON n.nspname = p.schema_name
           JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.table_name
          ORDER BY 1",
    );
    out.extend(strings(
        &mut su,
        "SELECT format('%s %s %s', polrelid::regclass, polname, pg_get_expr(polqual, polrelid))
           FROM pg_policy ORDER BY 1",
    ));
    out.extend(strings(
        &mut su,
        "SELECT format('%s %s %s', tgrelid::regclass, tgname, tgenabled) FROM pg_trigger
          WHERE tgname LIKE 'tenancy%' ORDER BY 1",
    ));
    out.extend(strings(
        &mut su,
        "SELECT format('%s %s %s', schema_name, table_name, audited) FROM tenancy.protected_tables ORDER BY 1",
    ));
    out.extend(strings(
        &mut su,
        "SELECT format('%s %s', evtname, evtenabled) FROM pg_event_trigger ORDER BY 1",
    ));
    // Whatever was pending (before the dump, or restored pending) is sealed first.
    su.batch_execute("SELECT tenancy.audit_seal()").unwrap();
    for org in [SHERWOOD, CONWAY] {
        out.extend(strings(
            &mut su,
            &format!(
                "SELECT format('%s ok=%s events=%s unsealed=%s', '{org}', ok, events, unsealed) FROM tenancy.audit_verify('{org}')"
            ),
        ));
        let mut app = c.connect("app", "app");
        app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{org}')"))
            .unwrap();
        out.extend(strings(
            &mut app,
            "SELECT format('%s %s %s', id, tenancy.phi_reveal(first_name), tenancy.phi_reveal(last_name))
               FROM clinic.patients ORDER BY id",
        ));
        out.extend(strings(
            &mut app,
            "SELECT format('%s %s', seq, action) FROM tenancy.my_audit_events ORDER BY event_id",
        ));
        app.batch_execute("COMMIT").unwrap();
    }
    out
}

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bindir().join(program));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn dump(src: &Cluster, file: &str) {
    let out = run(
        "pg_dump",
        &[
            "-Fc",
            "-h",
            "127.0.0.1",
            "-p",
            &src.port.to_string(),
            "-U",
            "postgres",
            "-f",
            file,
            "app",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn restore(dst: &Cluster, db: &str, file: &str, restore_mode: bool) -> Output {
    let env: &[(&str, &str)] = if restore_mode {
        &[("PGOPTIONS", "-c tenancy.restore_mode=on")]
    } else {
        &[]
    };
    run(
        "pg_restore",
        &[
            "--exit-on-error",
            "-h",
            "127.0.0.1",
            "-p",
            &dst.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            file,
        ],
        env,
    )
}

/// Events other than reveals (which the background worker writes a moment after each
/// revealing transaction, here those of `fingerprint`).
fn total_events(c: &mut Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM tenancy.audit_events WHERE action NOT IN ('REVEAL', 'REVEAL_END')",
    )
}

#[test]
fn test_dump_and_restore_keep_protection_phi_and_the_audit_chain() {
    let src = reference_cluster();
    // A change and a purge-free history of some length on both clinics.
    let mut app = src.connect("app", "app");
    app.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{SHERWOOD}', 'dr-a');
         UPDATE clinic.reviews SET rating = 4; SELECT tenancy.log_action('before.dump'); COMMIT"
    ))
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("app.dump");
    let file = file.to_str().unwrap();
    dump(&src, file);

    // The restoring server shares the key ring, as a replica or a rebuilt host would.
    let dst = Cluster::start_with_keyring(src.phi_key_file.as_ref().unwrap(), &[]);
    // Without restore mode the drift guards stop pg_restore half-way, and say what to do.
    dst.connect("postgres", "postgres")
        .batch_execute("CREATE DATABASE halfway")
        .unwrap();
    let refused = restore(&dst, "halfway", file, false);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("tenancy.restore_mode=on"), "{stderr}");

    let out = restore(&dst, "app", file, true);
    assert!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (before, after) = (fingerprint(&src), fingerprint(&dst));
    assert!(
        before.iter().any(|l| l.contains("First 5e000000")),
        "PHI reveals in the source: {before:?}"
    );
    assert_eq!(before, after, "the restored database is the same");
    // Loading the data fired no audit trigger: the same number of events.
    let mut su_src = src.connect("postgres", "app");
    let mut su_dst = dst.connect("postgres", "app");
    assert_eq!(total_events(&mut su_src), total_events(&mut su_dst));
    // The isolation report of the restored database is clean.
    assert_eq!(
        count(
            &mut su_dst,
            "SELECT count(*) FROM tenancy.isolation_report()"
        ),
        0,
        "{:?}",
        strings(
            &mut su_dst,
            "SELECT format('%s', r) FROM tenancy.isolation_report() r"
        )
    );
    // The guards are back for everyone else, and the chain goes on from where it was.
    let mut owner = dst.connect("owner", "app");
    assert!(owner
        .batch_execute("ALTER TABLE clinic.patients DISABLE ROW LEVEL SECURITY")
        .is_err());
    let mut app = dst.connect("app", "app");
    app.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{CONWAY}'); UPDATE clinic.reviews SET rating = 3; COMMIT"
    ))
    .unwrap();
    assert_eq!(total_events(&mut su_dst), total_events(&mut su_src) + 1);
    let ok: bool = su_dst
        .query_one(
            &format!("SELECT ok FROM tenancy.audit_verify('{CONWAY}')"),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ok, "the chain continues across the restore");
}
