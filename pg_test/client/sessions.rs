//! Session and pool side channels (ATTACKS.md S1, II-2/9 finding 7): nothing created from one
//! tenant's rows outlives its transaction on a pooled connection. Played as `app`, the way a
//! pooled connection serves Sherwood's request and then Conway's.

use crate::harness::{count, sqlstate, Cluster};
use crate::rls::{reference_cluster, CONWAY, SHERWOOD};
use std::sync::OnceLock;

fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(reference_cluster)
}

fn enter(c: &mut postgres::Client, org: &str) {
    c.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{org}')"))
        .unwrap();
}

#[test]
fn test_s1_temp_tables_keep_no_tenant_rows_past_the_transaction() {
    let mut app = cluster().connect("app", "app");
    // Temporary tables that would keep rows are refused in a tenant transaction.
    for stmt in [
        "CREATE TEMP TABLE carry AS SELECT * FROM clinic.patients",
        "CREATE TEMP TABLE carry ON COMMIT PRESERVE ROWS AS SELECT * FROM clinic.patients",
        "SELECT * INTO TEMP carry FROM clinic.patients",
        "CREATE TEMP TABLE carry (first_name bytea)",
    ] {
        enter(&mut app, SHERWOOD);
        assert_eq!(sqlstate(app.batch_execute(stmt)), "0A000", "{stmt}");
        app.batch_execute("ROLLBACK").unwrap();
    }
    // A temporary table made before (outside any tenant transaction) takes no tenant rows.
    app.batch_execute("CREATE TEMP TABLE earlier (first_name bytea)")
        .unwrap();
    for stmt in [
        "INSERT INTO earlier SELECT first_name FROM clinic.patients",
        "WITH moved AS (INSERT INTO earlier SELECT first_name FROM clinic.patients RETURNING 1) SELECT count(*) FROM moved",
        "UPDATE earlier SET first_name = (SELECT first_name FROM clinic.patients LIMIT 1)",
        "DO $$ BEGIN INSERT INTO earlier SELECT first_name FROM clinic.patients; END $$",
    ] {
        enter(&mut app, SHERWOOD);
        assert_eq!(sqlstate(app.batch_execute(stmt)), "0A000", "{stmt}");
        app.batch_execute("ROLLBACK").unwrap();
    }
    {
        // COPY FROM too (on a connection of its own: a refused COPY ends the protocol state).
        let mut copier = cluster().connect("app", "app");
        copier
            .batch_execute("CREATE TEMP TABLE earlier (first_name bytea)")
            .unwrap();
        enter(&mut copier, SHERWOOD);
        assert_eq!(
            sqlstate(copier.copy_in("COPY earlier FROM STDIN").map(|_| ())),
            "0A000"
        );
    }
    // Made in the same transaction just before the context was entered: still refused.
    app.batch_execute(&format!(
        "BEGIN; CREATE TEMP TABLE just_before (first_name bytea); SELECT tenancy.set_org('{SHERWOOD}')"
    ))
    .unwrap();
    assert_eq!(
        sqlstate(
            app.batch_execute("INSERT INTO just_before SELECT first_name FROM clinic.patients")
        ),
        "0A000"
    );
    app.batch_execute("ROLLBACK").unwrap();
    // A table made ON COMMIT DELETE ROWS in an earlier transaction empties at every commit.
    app.batch_execute("CREATE TEMP TABLE per_tx (first_name bytea) ON COMMIT DELETE ROWS")
        .unwrap();
    enter(&mut app, SHERWOOD);
    app.batch_execute("INSERT INTO per_tx SELECT first_name FROM clinic.patients; COMMIT;")
        .unwrap();
    assert_eq!(count(&mut app, "SELECT count(*) FROM per_tx"), 0);
    // Confined to the transaction: allowed, and gone at commit.
    enter(&mut app, SHERWOOD);
    app.batch_execute(
        "CREATE TEMP TABLE scratch ON COMMIT DROP AS SELECT * FROM clinic.patients;
         INSERT INTO scratch SELECT * FROM clinic.patients;
         CREATE TEMP TABLE scratch3 (first_name bytea) ON COMMIT DROP;
         INSERT INTO scratch3 SELECT first_name FROM clinic.patients;
         COMMIT;",
    )
    .unwrap();
    // Everything else that would outlive the transaction with this tenant's data in its
    // definition is refused: temporary functions, views, types, comments, defaults, a table
    // ON COMMIT DELETE ROWS (rows go, its definition stays).
    for stmt in [
        "DO $$ BEGIN EXECUTE format('CREATE FUNCTION pg_temp.leak() RETURNS text LANGUAGE sql AS %L',
            'SELECT ' || quote_literal((SELECT body FROM clinic.reviews LIMIT 1))); END $$",
        "DO $$ BEGIN EXECUTE format('CREATE TEMP VIEW leak AS SELECT %L AS v', (SELECT body FROM clinic.reviews LIMIT 1)); END $$",
        "DO $$ BEGIN EXECUTE format('COMMENT ON TABLE earlier IS %L', (SELECT body FROM clinic.reviews LIMIT 1)); END $$",
        "DO $$ BEGIN EXECUTE format('ALTER TABLE earlier ADD COLUMN leak text DEFAULT %L', (SELECT body FROM clinic.reviews LIMIT 1)); END $$",
        "DO $$ BEGIN EXECUTE format('CREATE TYPE pg_temp.leakt AS ENUM (%L)', (SELECT body FROM clinic.reviews LIMIT 1)); END $$",
        "CREATE TEMP TABLE scratch2 (first_name bytea) ON COMMIT DELETE ROWS",
        "CREATE TEMP SEQUENCE leak_seq",
    ] {
        enter(&mut app, SHERWOOD);
        assert_eq!(sqlstate(app.batch_execute(stmt)), "0A000", "{stmt}");
        app.batch_execute("ROLLBACK").unwrap();
    }
    // The next tenant on the connection finds nothing of Sherwood's.
    enter(&mut app, CONWAY);
    assert_eq!(count(&mut app, "SELECT count(*) FROM earlier"), 0);
    assert_eq!(
        sqlstate(app.query("SELECT * FROM scratch", &[])),
        "42P01",
        "ON COMMIT DROP dropped it"
    );
    app.batch_execute("ROLLBACK").unwrap();
    // Outside tenant transactions temporary tables are the session's own business.
    app.batch_execute("INSERT INTO earlier VALUES ('\\x00')")
        .unwrap();
}

#[test]
fn test_s1_large_objects_cannot_be_made_in_a_tenant_transaction() {
    let mut app = cluster().connect("app", "app");
    for stmt in [
        "SELECT lo_create(0)",
        "SELECT lo_creat(-1)",
        "SELECT lo_from_bytea(0, (SELECT first_name FROM clinic.patients LIMIT 1))",
    ] {
        enter(&mut app, SHERWOOD);
        assert_eq!(sqlstate(app.batch_execute(stmt)), "0A000", "{stmt}");
        app.batch_execute("ROLLBACK").unwrap();
    }
    let mut su = cluster().connect("postgres", "app");
    assert_eq!(
        count(&mut su, "SELECT count(*) FROM pg_largeobject_metadata"),
        0
    );
}
