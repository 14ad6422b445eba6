//! The TypeScript package in clients/node (node-postgres and Drizzle) against a real server in
//! signed mode, directly and through PgBouncer in transaction mode (one server connection):
//! its own `node --test` suite must pass (drizzle-kit generate and push on a protected schema,
//! tokens the server accepts, PHI columns, typed errors, tenants interleaved through the
//! pooler), and the server log must hold none of the PHI it wrote through bind parameters.
//! Runs on PostgreSQL 15, as the example service does.

use crate::harness::{server_private_dir, set_server_file_mode, Cluster};
use crate::hostile::Bouncer;
use crate::signed::KEY_HEX;
use std::path::Path;
use std::process::Command;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/node");

#[test]
fn test_the_typescript_package_passes_its_tests_directly_and_through_pgbouncer() {
    let secrets = server_private_dir();
    let key = secrets.path().join("context.key");
    std::fs::write(&key, format!("{KEY_HEX}\n")).unwrap();
    set_server_file_mode(&key, 0o600);
    let cluster =
        Cluster::start_with_phi(&[&format!("tenancy.context_key_file = '{}'", key.display())]);
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute(
        "CREATE EXTENSION pg_tenancy;
         CREATE SCHEMA clinic AUTHORIZATION owner;
         GRANT USAGE ON SCHEMA clinic TO app;",
    )
    .unwrap();
    let bouncer = Bouncer::start(cluster.port, 1);

    // The package's own dependencies, pinned by package-lock.json.
    if !Path::new(DIR).join("node_modules").exists() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(DIR)
            .output()
            .unwrap_or_else(|e| panic!("npm ci: {e} (Node 20 and npm must be installed)"));
        assert!(
            out.status.success(),
            "npm ci: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new("npm")
        .args(["test"])
        .current_dir(DIR)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", cluster.port.to_string())
        .env("PGBOUNCER_PORT", bouncer.port.to_string())
        .env("PG_TENANCY_CONTEXT_KEY", KEY_HEX)
        .output()
        .expect("npm test");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "node --test failed:\n{report}");
    assert!(report.contains("# pass 6"), "all six tests ran:\n{report}");
    assert!(report.contains("# fail 0"), "{report}");
    let log = cluster.log();
    for plaintext in ["Fitzwalter", "555-0199", "555-0100", "Miller", "Leaford"] {
        assert!(!log.contains(plaintext), "{plaintext} in the server log");
    }
}
