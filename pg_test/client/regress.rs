//! Golden tests: the SQL files in pg_test/pg_regress/sql run through Postgres's own
//! `pg_regress` against a preloaded server, and must match pg_test/pg_regress/expected.
//!
//! (`cargo pgrx regress` 0.18 starts its server as the invoking user even with `--runas`,
//! which Postgres refuses as root, so the suite drives `pg_regress` itself.)
//!
//! Expected files are generated, never hand-edited: after checking the output, run
//! `PG_TENANCY_REGRESS_ACCEPT=1 scripts/test.sh 15` to promote `results/` to `expected/`.

use crate::harness::{bindir, pg_regress_path, Cluster};
use std::path::Path;
use std::process::Command;

/// The schedule, in order: `setup` creates the extension.
const TESTS: &[&str] = &["setup", "context", "policy", "phi"];

#[test]
fn test_golden_sql_output() {
    let cluster = Cluster::start_with_phi(&[]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pg_test/pg_regress");
    let out = tempfile::Builder::new()
        .prefix("pg_tenancy-regress-")
        .tempdir()
        .unwrap();
    let accept = std::env::var("PG_TENANCY_REGRESS_ACCEPT").is_ok_and(|v| v == "1");
    if accept {
        // pg_regress stops at a missing expected file; start a new test from an empty one.
        std::fs::create_dir_all(root.join("expected")).unwrap();
        for t in TESTS {
            let expected = root.join("expected").join(format!("{t}.out"));
            if !expected.exists() {
                std::fs::write(expected, "").unwrap();
            }
        }
    }
    let status = Command::new(pg_regress_path())
        .arg("--use-existing")
        // pg_regress runs psql from its compiled-in bindir unless told; the relocatable
        // builds (14, 16, 17, 18) were configured for /opt/postgresql.
        .arg(format!("--bindir={}", bindir().display()))
        .args(["--host", "127.0.0.1", "--port", &cluster.port.to_string()])
        .args(["--user", "postgres", "--dbname", "app"])
        .arg(format!("--inputdir={}", root.display()))
        .arg(format!("--outputdir={}", out.path().display()))
        .args(TESTS)
        .output()
        .expect("run pg_regress");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    if accept {
        for t in TESTS {
            let result = out.path().join("results").join(format!("{t}.out"));
            std::fs::copy(&result, root.join("expected").join(format!("{t}.out")))
                .unwrap_or_else(|e| panic!("{t}: {e}\n{report}"));
        }
        println!("accepted {} golden files", TESTS.len());
        return;
    }
    let diffs = std::fs::read_to_string(out.path().join("regression.diffs")).unwrap_or_default();
    assert!(
        status.status.success(),
        "pg_regress failed:\n{report}\n{diffs}"
    );
}
