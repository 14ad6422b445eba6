//! Installing, dropping and re-creating the extension; the preload requirement.

use crate::harness::{db_error, strings, Cluster};

#[test]
fn test_create_drop_recreate_and_settings() {
    let cluster = Cluster::start(&["shared_preload_libraries = 'pg_tenancy'"]);
    let mut su = cluster.connect("postgres", "app");
    for _ in 0..2 {
        su.batch_execute("CREATE EXTENSION pg_tenancy").unwrap();
        let row = su
            .query_one(
                "SELECT e.extversion, n.nspname, e.extrelocatable
                   FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                  WHERE e.extname = 'pg_tenancy'",
                &[],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>(0), env!("CARGO_PKG_VERSION"));
        assert_eq!(row.get::<_, String>(1), "tenancy");
        assert!(!row.get::<_, bool>(2));
        su.batch_execute("DROP EXTENSION pg_tenancy").unwrap();
        // Postgres keeps the control file's schema (it is not an extension member), but
        // nothing of ours is left in it.
        let left: i64 = su
            .query_one(
                "SELECT (SELECT count(*) FROM pg_proc WHERE pronamespace = 'tenancy'::regnamespace)
                      + (SELECT count(*) FROM pg_class WHERE relnamespace = 'tenancy'::regnamespace)
                      + (SELECT count(*) FROM pg_type WHERE typnamespace = 'tenancy'::regnamespace)",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "DROP EXTENSION leaves nothing behind");
    }
    su.batch_execute("CREATE EXTENSION pg_tenancy").unwrap();
    // The settings exist.
    let names = strings(&mut su, "SELECT name FROM pg_settings WHERE name LIKE 'tenancy.%' OR name = 'app.current_org_id' ORDER BY name");
    // The key path is NO_SHOW_ALL: absent from pg_settings and SHOW ALL even for superusers,
    // who can still SHOW it by name.
    assert_eq!(
        names,
        [
            "app.current_org_id",
            "tenancy.audit_database",
            "tenancy.audit_digest_file",
            "tenancy.audit_digest_interval",
            "tenancy.new_table_action",
            "tenancy.restore_mode",
            "tenancy.tenant_id_format"
        ]
    );
    let path: String = su
        .query_one("SHOW tenancy.context_key_file", &[])
        .unwrap()
        .get(0);
    assert_eq!(path, "");
    let mut app = cluster.connect("app", "app");
    let visible: i64 = app
        .query_one(
            "SELECT count(*) FROM pg_settings WHERE name = 'tenancy.context_key_file'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        visible, 0,
        "the key path is hidden from the application role"
    );
    let err = db_error(app.query_one("SHOW tenancy.context_key_file", &[]));
    assert_eq!(err.code().code(), "42501");
}

#[test]
fn test_create_extension_without_preload_is_refused_with_hint() {
    let cluster = Cluster::start(&[]);
    let mut su = cluster.connect("postgres", "app");
    let err = db_error(su.batch_execute("CREATE EXTENSION pg_tenancy"));
    assert_eq!(err.code().code(), "55000");
    assert_eq!(
        err.message(),
        "pg_tenancy must be loaded through shared_preload_libraries"
    );
    assert!(
        err.hint().unwrap().contains("shared_preload_libraries"),
        "{:?}",
        err.hint()
    );
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_extension WHERE extname = 'pg_tenancy'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "nothing is left half-installed");
}
