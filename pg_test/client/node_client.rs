//! The TypeScript package in clients/node (node-postgres and Drizzle) against a real server in
//! signed mode, directly and through PgBouncer in transaction mode (one server connection):
//! its own `node --test` suite must pass (drizzle-kit generate and push on a protected schema,
//! tokens the server accepts, PHI columns, typed errors, tenants interleaved through the
//! pooler), and the server log must hold none of the PHI it wrote through bind parameters.
//! Runs on PostgreSQL 15, as the example service does.

use crate::hostile::Bouncer;
use crate::node::{npm_test, signed_cluster_with_phi};
use crate::signed::KEY_HEX;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/node");

#[test]
fn test_the_typescript_package_passes_its_tests_directly_and_through_pgbouncer() {
    let (_secrets, cluster) = signed_cluster_with_phi();
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute(
        "CREATE EXTENSION pg_tenancy;
         CREATE SCHEMA clinic AUTHORIZATION owner;
         GRANT USAGE ON SCHEMA clinic TO app;",
    )
    .unwrap();
    let bouncer = Bouncer::start(cluster.port, 1);

    let (passed, report) = npm_test(
        DIR,
        &[
            ("PGHOST", "127.0.0.1".to_string()),
            ("PGPORT", cluster.port.to_string()),
            ("PGBOUNCER_PORT", bouncer.port.to_string()),
            ("PG_TENANCY_CONTEXT_KEY", KEY_HEX.to_string()),
        ],
    );
    assert!(passed, "node --test failed:\n{report}");
    assert!(report.contains("# pass 6"), "all six tests ran:\n{report}");
    assert!(report.contains("# fail 0"), "{report}");
    let log = cluster.log();
    for plaintext in ["Fitzwalter", "555-0199", "555-0100", "Miller", "Leaford"] {
        assert!(!log.contains(plaintext), "{plaintext} in the server log");
    }
}
