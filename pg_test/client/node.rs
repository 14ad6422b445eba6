//! The example service in pg_test/node (TypeScript on Node with `pg`) against a real server
//! in signed mode with the protected, audited reference schema: its own `node --test` suite
//! must pass, and the server log must hold none of the PHI it wrote through bind parameters.
//! Runs on PostgreSQL 15 (the issue asks for the client test on at least one version).

use crate::harness::Cluster;
use crate::rls::{CONWAY, SHERWOOD};
use crate::signed::{mint, now, KEY_HEX};
use std::path::Path;
use std::process::Command;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/pg_test/node");

#[test]
fn test_the_node_example_service_passes_its_tests_against_a_real_server() {
    let (_secrets, cluster) = signed_cluster_with_phi();
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute("CREATE EXTENSION pg_tenancy").unwrap();
    let schema = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/family_practice.sql"
    ))
    .unwrap();
    let mut owner = cluster.connect("owner", "app");
    owner.batch_execute(&schema).unwrap();
    su.query(
        "SELECT tenancy.protect_all('clinic', root => 'clinic.organizations', audit => true)",
        &[],
    )
    .unwrap();
    owner
        .batch_execute(
            "GRANT USAGE ON SCHEMA clinic TO app;
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA clinic TO app;",
        )
        .unwrap();
    for (org, name) in [(SHERWOOD, "Sherwood"), (CONWAY, "Conway")] {
        let token = mint(KEY_HEX, org, "", now() + 60);
        owner
            .batch_execute(&format!(
                "BEGIN; SELECT tenancy.set_org('{org}', NULL, '{token}');
                 INSERT INTO clinic.organizations (id, name, slug) VALUES ('{org}', '{name}', lower('{name}'));
                 COMMIT;"
            ))
            .unwrap();
    }

    let (passed, report) = npm_test(
        DIR,
        &[
            ("PGHOST", "127.0.0.1".to_string()),
            ("PGPORT", cluster.port.to_string()),
            ("PGUSER", "app".to_string()),
            ("PGDATABASE", "app".to_string()),
            ("PG_TENANCY_CONTEXT_KEY", KEY_HEX.to_string()),
        ],
    );
    assert!(passed, "node --test failed:\n{report}");
    assert!(
        report.contains("# pass 6"),
        "all six Node tests ran:\n{report}"
    );
    // One request failed half way (division by zero): its statement is logged, the PHI
    // bound as parameters is not.
    let log = cluster.log();
    assert!(log.contains("division by zero"), "{log}");
    for plaintext in ["Marian", "Fitzwalter", "555-0199", "Much", "Miller"] {
        assert!(!log.contains(plaintext), "{plaintext} in the server log");
    }
}

/// A server with a PHI key ring in signed mode under [`KEY_HEX`] (the key file in a private
/// directory, kept while the returned directory lives).
pub(crate) fn signed_cluster_with_phi() -> (tempfile::TempDir, Cluster) {
    let secrets = crate::harness::server_private_dir();
    let key = secrets.path().join("context.key");
    std::fs::write(&key, format!("{KEY_HEX}\n")).unwrap();
    crate::harness::set_server_file_mode(&key, 0o600);
    let cluster =
        Cluster::start_with_phi(&[&format!("tenancy.context_key_file = '{}'", key.display())]);
    (secrets, cluster)
}

/// Runs `npm test` in the Node project `dir` with `env`, after `npm ci` when its
/// dependencies (pinned by its package-lock.json) are not installed yet: whether it passed,
/// and its output.
pub(crate) fn npm_test(dir: &str, env: &[(&str, String)]) -> (bool, String) {
    if !Path::new(dir).join("node_modules").exists() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("npm ci: {e} (Node 20 and npm must be installed)"));
        assert!(
            out.status.success(),
            "npm ci in {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new("npm")
        .args(["test"])
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("npm test");
    (
        out.status.success(),
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
