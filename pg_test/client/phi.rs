//! Rows K1-K9 of ATTACKS.md, PHI round trips, errors and key rotation under a concurrent
//! writer, against a server whose key ring is a real file made by scripts/phi_keyring.py.

use crate::harness::{
    connect_port, count, db_error, keyring_tool, pg_major, set_server_file_mode, sqlstate, Cluster,
};
use postgres::Client;
use std::sync::OnceLock;

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| {
        let c = Cluster::start_with_phi(&[]);
        c.connect("postgres", "app")
            .batch_execute(
                "CREATE EXTENSION pg_tenancy;
                 CREATE ROLE settings_reader LOGIN IN ROLE pg_read_all_settings;",
            )
            .unwrap();
        let mut owner = c.connect("owner", "app");
        owner
            .batch_execute(
                "CREATE TABLE vault (organization_id uuid NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY,
                                     plain text, secret tenancy.phi, PRIMARY KEY (organization_id, id));
                 GRANT SELECT, INSERT, UPDATE, DELETE ON vault TO app;",
            )
            .unwrap();
        c.connect("postgres", "app").query("SELECT tenancy.protect('public.vault')", &[]).unwrap();
        c
    })
}

fn app() -> Client {
    cluster().connect("app", "app")
}

fn enter(c: &mut Client, org: &str) {
    c.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{org}')"))
        .unwrap();
}

/// The key ring's key material (hex), to search for in places it must never appear.
fn key_hexes(cluster: &Cluster) -> Vec<String> {
    let text = std::fs::read_to_string(cluster.phi_key_file.as_ref().unwrap()).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect()
}

fn encrypt(c: &mut Client, value: &str, label: Option<&str>) -> Vec<u8> {
    c.query_one(
        "SELECT tenancy.phi_encrypt($1::text, $2)",
        &[&value, &label],
    )
    .unwrap()
    .get(0)
}

#[test]
fn test_round_trips_of_every_flavour() {
    let mut c = app();
    enter(&mut c, A);
    let big = "x".repeat(1024 * 1024);
    for value in ["555-0100", "", "Zoë ✓ 日本", big.as_str()] {
        let env = encrypt(&mut c, value, None);
        assert_eq!(env.len(), value.len() + 36);
        let back: String = c
            .query_one("SELECT tenancy.phi_reveal($1)", &[&env])
            .unwrap()
            .get(0);
        assert_eq!(back, value);
    }
    let env = encrypt(&mut c, "555-0100", Some("patients.phone"));
    let back: String = c
        .query_one("SELECT tenancy.phi_reveal($1, 'patients.phone')", &[&env])
        .unwrap()
        .get(0);
    assert_eq!(back, "555-0100");
    let row = c
        .query_one(
            "SELECT tenancy.phi_reveal(NULL), tenancy.phi_encrypt(NULL::text) IS NULL,
                    tenancy.phi_reveal_bytea(tenancy.phi_encrypt('\\x00ff'::bytea)),
                    tenancy.phi_reveal_jsonb(tenancy.phi_encrypt('{\"dob\": \"2001-02-03\"}'::jsonb))::text",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, Vec<u8>>(2), vec![0x00, 0xff]);
    assert_eq!(row.get::<_, String>(3), "{\"dob\": \"2001-02-03\"}");
    c.batch_execute("COMMIT").unwrap();
    let mut su = cluster().connect("postgres", "app");
    let status: Vec<(Option<i64>, bool)> = su
        .query(
            "SELECT key_id, active FROM tenancy.phi_key_status() ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        status.contains(&(Some(1), status.iter().all(|s| s.0 == Some(1)))),
        "{status:?}"
    );
}

#[test]
fn test_errors_have_their_own_sqlstates() {
    let mut c = app();
    // No context.
    assert_eq!(
        sqlstate(c.query_one("SELECT tenancy.phi_encrypt('x')", &[])),
        "42501"
    );
    enter(&mut c, A);
    let env = encrypt(&mut c, "v", Some("patients.phone"));
    let bytea_env: Vec<u8> = c
        .query_one("SELECT tenancy.phi_encrypt('\\x01'::bytea)", &[])
        .unwrap()
        .get(0);
    c.batch_execute("COMMIT").unwrap();
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        (
            "SELECT tenancy.phi_reveal($1, $2)",
            env.clone(),
            Some("patients.email"),
            "28000",
        ),
        (
            "SELECT tenancy.phi_reveal($1, $2)",
            env.clone(),
            None,
            "28000",
        ),
        (
            "SELECT tenancy.phi_reveal($1, $2)",
            bytea_env.clone(),
            None,
            "42804",
        ),
        (
            "SELECT tenancy.phi_reveal($1, $2)",
            b"plain text".to_vec(),
            None,
            "22P03",
        ),
        (
            "SELECT tenancy.phi_reveal($1, $2)",
            Vec::new(),
            None,
            "22P03",
        ),
        (
            "SELECT tenancy.phi_reveal($1, $2)",
            env.clone(),
            Some(""),
            "22023",
        ),
    ];
    for (sql, value, label, code) in cases {
        enter(&mut c, A);
        let err = db_error(c.query_one(sql, &[&value, &label]));
        assert_eq!(err.code().code(), code, "{label:?}: {}", err.message());
        assert!(err.hint().is_some(), "{code} has a hint");
        c.batch_execute("ROLLBACK").unwrap();
    }
}

#[test]
fn test_k1_k2_the_key_is_readable_nowhere() {
    let cluster = cluster();
    let keys = key_hexes(cluster);
    let probes = [
        "SELECT string_agg(coalesce(setting,'') || coalesce(reset_val,'') || coalesce(boot_val,''), '|') FROM pg_settings",
        "SELECT current_setting('tenancy.phi_key_file', true)",
        "SELECT string_agg(coalesce(setting, ''), '|') FROM pg_file_settings",
    ];
    for role in ["app", "settings_reader"] {
        let mut c = cluster.connect(role, "app");
        for probe in probes {
            let seen: Option<String> = c.query_one(probe, &[]).ok().and_then(|r| r.get(0));
            let seen = seen.unwrap_or_default();
            for k in &keys {
                assert!(
                    !seen.contains(k.as_str()),
                    "{role}: key visible through {probe}"
                );
            }
        }
        let show = c.query_one("SHOW tenancy.phi_key_file", &[]);
        match role {
            // The application role cannot even see where the ring is.
            "app" => assert_eq!(sqlstate(show), "42501"),
            // A settings reader sees a path, never key bytes.
            _ => {
                let v: String = show.unwrap().get(0);
                assert!(v.starts_with('/') && keys.iter().all(|k| !v.contains(k.as_str())));
            }
        }
    }
    // K2: without the library loaded, the setting is just an unknown placeholder: nothing
    // secret exists in the backend to read.
    let bare = Cluster::start(&[]);
    let mut c = bare.connect("app", "postgres");
    assert_eq!(
        sqlstate(c.query_one("SHOW tenancy.phi_key_file", &[])),
        "42704"
    );
}

#[test]
fn test_k3_no_key_or_plaintext_in_the_server_log() {
    let cluster = cluster();
    let keys = key_hexes(cluster);
    let plaintext = "PHI-PLAINTEXT-7f3a9c";
    let mut c = app();
    // Failed encrypt (no context), failed reveal (other tenant), with bind parameters.
    assert!(c
        .query_one("SELECT tenancy.phi_encrypt($1::text)", &[&plaintext])
        .is_err());
    enter(&mut c, A);
    let env = encrypt(&mut c, plaintext, None);
    c.batch_execute("COMMIT").unwrap();
    enter(&mut c, B);
    assert!(c
        .query_one("SELECT tenancy.phi_reveal($1)", &[&env])
        .is_err());
    c.batch_execute("ROLLBACK").unwrap();
    cluster.reload();
    // The reload is logged by the postmaster; wait for that line rather than sleeping blind.
    let log = wait_for_log(cluster, "received SIGHUP");
    for k in &keys {
        assert!(!log.contains(k.as_str()), "a key is in the server log");
    }
    assert!(!log.contains(plaintext), "plaintext is in the server log");
    assert!(
        !log.contains(&hex::encode(&env)),
        "a whole ciphertext is in the server log"
    );
}

fn wait_for_log(cluster: &Cluster, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = cluster.log();
        if log.contains(needle) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::yield_now();
    }
}

#[test]
fn test_k4_an_envelope_copied_to_another_tenant_does_not_reveal() {
    let mut c = app();
    enter(&mut c, B);
    c.batch_execute(
        "INSERT INTO vault (plain, secret) VALUES ('b', tenancy.phi_encrypt('B secret'))",
    )
    .unwrap();
    c.batch_execute("COMMIT").unwrap();
    // The attacker (with write access to raw bytes) copies B's ciphertext into A's row.
    let mut su = cluster().connect("postgres", "app");
    su.batch_execute(&format!(
        "INSERT INTO vault (organization_id, plain, secret)
         SELECT '{A}', 'stolen', secret FROM vault WHERE organization_id = '{B}' AND plain = 'b'"
    ))
    .unwrap();
    enter(&mut c, A);
    let err = db_error(c.query_one(
        "SELECT tenancy.phi_reveal(secret) FROM vault WHERE plain = 'stolen'",
        &[],
    ));
    assert_eq!(err.code().code(), "28000");
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_k5_every_bit_flip_truncation_and_extension_is_refused() {
    let mut c = app();
    enter(&mut c, A);
    let env = encrypt(&mut c, "hello", None);
    let stmt = c.prepare("SELECT tenancy.phi_reveal($1)").unwrap();
    let documented = ["22P03", "28000", "42704", "42804"];
    let mut tried = 0;
    let mut variants: Vec<Vec<u8>> = Vec::new();
    for i in 0..env.len() * 8 {
        let mut bad = env.clone();
        bad[i / 8] ^= 1 << (i % 8);
        variants.push(bad);
    }
    for len in 0..env.len() {
        variants.push(env[..len].to_vec());
    }
    let mut longer = env.clone();
    longer.push(0);
    variants.push(longer);
    for bad in variants {
        c.batch_execute("SAVEPOINT s").unwrap();
        let code = sqlstate(c.query_one(&stmt, &[&bad]));
        assert!(
            documented.contains(&code.as_str()),
            "undocumented error {code}"
        );
        c.batch_execute("ROLLBACK TO s").unwrap();
        tried += 1;
    }
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(tried, env.len() * 9 + 1);
}

#[test]
fn test_k6_unknown_key_id_and_a_wrong_key_file() {
    let mut c = app();
    enter(&mut c, A);
    let mut env = encrypt(&mut c, "v", None);
    env[4..8].copy_from_slice(&99u32.to_be_bytes());
    let err = db_error(c.query_one("SELECT tenancy.phi_reveal($1)", &[&env]));
    assert_eq!(err.code().code(), "42704");
    assert_eq!(err.message(), "PHI key 99 is not in the key ring");
    c.batch_execute("ROLLBACK").unwrap();
    // A corrupted key file is detected at load, on its own server so the others keep going.
    let broken = Cluster::start_with_phi(&[]);
    let path = broken.phi_key_file.clone().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().find(|l| !l.starts_with('#')).unwrap();
    let key = line.split_whitespace().nth(1).unwrap();
    let flipped = format!(
        "{}{}",
        if key.starts_with('0') { '1' } else { '0' },
        &key[1..]
    );
    std::fs::write(&path, text.replace(key, &flipped)).unwrap();
    set_server_file_mode(&path, 0o600);
    broken.reload();
    broken
        .connect("postgres", "postgres")
        .batch_execute("CREATE EXTENSION pg_tenancy")
        .unwrap();
    let mut su = broken.connect("postgres", "postgres");
    let status = wait_for_status(&broken, "failed");
    assert!(status.contains("check value"), "{status}");
    assert!(!status.contains(key) && !status.contains(&flipped));
    su.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{A}')"))
        .unwrap();
    let err = db_error(su.query_one("SELECT tenancy.phi_encrypt('x')", &[]));
    assert_eq!(err.code().code(), "F0000");
    assert!(err.detail().unwrap().contains("wrong or corrupted key"));
    su.batch_execute("ROLLBACK").unwrap();
    // World-readable: refused as Postgres refuses ssl_key_file.
    std::fs::write(&path, text).unwrap();
    set_server_file_mode(&path, 0o644);
    broken.reload();
    let status = wait_for_status(&broken, "group or other");
    assert!(status.contains("0644"), "{status}");
    // Fixed: loads again.
    set_server_file_mode(&path, 0o600);
    broken.reload();
    assert!(wait_for_status(&broken, "verified").contains("verified"));
}

/// Polls `tenancy.phi_key_status()` from fresh connections until the reload has reached
/// them (the postmaster handles SIGHUP asynchronously); bounded.
fn wait_for_status(cluster: &Cluster, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut su = cluster.connect("postgres", "postgres");
        let status: String = su
            .query_one(
                "SELECT string_agg(status, '; ') FROM tenancy.phi_key_status()",
                &[],
            )
            .unwrap()
            .get(0);
        if status.contains(needle) || std::time::Instant::now() > deadline {
            return status;
        }
    }
}

#[test]
fn test_k7_plaintext_in_a_phi_column_is_refused() {
    let mut c = app();
    enter(&mut c, A);
    let err = db_error(c.execute(
        "INSERT INTO vault (plain, secret) VALUES ('x', 'my plaintext'::bytea)",
        &[],
    ));
    assert_eq!(err.code().code(), "23514");
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_k8_ten_thousand_encryptions_of_one_value_are_all_distinct() {
    let mut c = app();
    enter(&mut c, A);
    let row = c
        .query_one(
            "SELECT count(DISTINCT e), count(DISTINCT substring(e FROM 9 FOR 12))
               FROM (SELECT tenancy.phi_encrypt('same value') AS e FROM generate_series(1, 10000)) s",
            &[],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (10_000, 10_000)
    );
    c.batch_execute("COMMIT").unwrap();
}

#[test]
fn test_k9_decryption_cannot_enter_indexes_generated_columns_or_statistics() {
    let mut owner = cluster().connect("owner", "app");
    for stmt in [
        "CREATE INDEX ON vault (tenancy.phi_reveal(secret))",
        "ALTER TABLE vault ADD COLUMN revealed text GENERATED ALWAYS AS (tenancy.phi_reveal(secret)) STORED",
    ] {
        assert_eq!(sqlstate(owner.batch_execute(stmt)), "42P17", "{stmt}");
    }
    // Postgres accepts STABLE functions in statistics expressions (PG 14+) and IMMUTABLE
    // wrappers anywhere: the reveal itself refuses inside ANALYZE and CREATE INDEX.
    owner
        .batch_execute(
            "CREATE TABLE k9 (organization_id uuid NOT NULL, secret tenancy.phi);
             CREATE FUNCTION k9_wrapper(bytea) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT tenancy.phi_reveal($1)';",
        )
        .unwrap();
    owner
        .batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{A}');
             INSERT INTO k9 VALUES ('{A}', tenancy.phi_encrypt('dob 2001-02-03')); COMMIT;"
        ))
        .unwrap();
    owner
        .batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{A}')"))
        .unwrap();
    assert_eq!(
        sqlstate(owner.batch_execute("CREATE INDEX ON k9 (k9_wrapper(secret))")),
        "0A000"
    );
    owner.batch_execute("ROLLBACK").unwrap();
    if pg_major() >= 14 {
        owner
            .batch_execute("CREATE STATISTICS k9_stats ON (tenancy.phi_reveal(secret)) FROM k9")
            .unwrap();
        owner
            .batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{A}')"))
            .unwrap();
        let err = db_error(owner.batch_execute("ANALYZE k9"));
        assert_eq!(err.code().code(), "0A000");
        owner.batch_execute("ROLLBACK").unwrap();
        let mut su = cluster().connect("postgres", "app");
        // PostgreSQL 14 keeps an empty data row from CREATE STATISTICS on; what counts is
        // whether ANALYZE stored anything in it.
        let stored = count(
            &mut su,
            "SELECT count(*) FROM pg_statistic_ext_data d JOIN pg_statistic_ext s ON s.oid = d.stxoid
              WHERE s.stxname = 'k9_stats'
                AND (d.stxdndistinct IS NOT NULL OR d.stxddependencies IS NOT NULL
                     OR d.stxdmcv IS NOT NULL OR d.stxdexpr IS NOT NULL)",
        );
        assert_eq!(stored, 0, "no revealed value reached the statistics");
    }
}

#[test]
fn test_rotation_under_a_concurrent_writer_loses_nothing() {
    // A server of its own: rotation changes the active key.
    let cluster = Cluster::start_with_phi(&[]);
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute("CREATE EXTENSION pg_tenancy").unwrap();
    cluster
        .connect("owner", "app")
        .batch_execute(
            "CREATE TABLE vault (organization_id uuid NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY,
                                 plain text, secret tenancy.phi, PRIMARY KEY (organization_id, id));
             GRANT SELECT, INSERT, UPDATE ON vault TO app;",
        )
        .unwrap();
    su.query("SELECT tenancy.protect('public.vault')", &[])
        .unwrap();
    let mut c = cluster.connect("app", "app");
    for org in [A, B] {
        enter(&mut c, org);
        c.batch_execute(
            "INSERT INTO vault (plain, secret)
             SELECT 'v' || g, tenancy.phi_encrypt('v' || g, 'vault.secret') FROM generate_series(1, 3000) g",
        )
        .unwrap();
        c.batch_execute("COMMIT").unwrap();
    }
    // New active key, old one kept for decryption.
    let path = cluster.phi_key_file.clone().unwrap();
    keyring_tool(&["add", path.to_str().unwrap(), "--activate"]);
    cluster.reload();
    cluster.wait_for_active_key(2);
    // The application keeps writing (and updating) while the rotation runs.
    let port = cluster.port;
    let writer = std::thread::spawn(move || {
        let mut w = connect_port(port, "app", "app");
        for i in 0..200 {
            let org = if i % 2 == 0 { A } else { B };
            w.batch_execute(&format!(
                "BEGIN; SELECT tenancy.set_org('{org}');
                 INSERT INTO vault (plain, secret) VALUES ('w{i}', tenancy.phi_encrypt('w{i}', 'vault.secret'));
                 UPDATE vault SET secret = tenancy.phi_encrypt(plain, 'vault.secret') WHERE id = (SELECT min(id) + {i} FROM vault);
                 COMMIT;"
            ))
            .unwrap();
        }
    });
    let mut rot = cluster.connect("postgres", "app");
    rot.batch_execute("CALL tenancy.phi_rotate_all('public.vault', 'secret', label => 'vault.secret', batch_size => 500)")
        .unwrap();
    writer.join().unwrap();
    // A final pass catches rows a locked batch skipped.
    rot.batch_execute("CALL tenancy.phi_rotate_all('public.vault', 'secret', label => 'vault.secret', batch_size => 500)")
        .unwrap();
    let usage: Vec<(i64, i64)> = rot
        .query(
            "SELECT key_id, values_count FROM tenancy.phi_key_usage('public.vault', 'secret')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        usage,
        [(2, 6200)],
        "every value is under the new key, none lost"
    );
    for org in [A, B] {
        enter(&mut c, org);
        let wrong = count(
            &mut c,
            "SELECT count(*) FROM vault WHERE tenancy.phi_reveal(secret, 'vault.secret') <> plain",
        );
        assert_eq!(wrong, 0, "every value of {org} reveals to what was written");
        c.batch_execute("COMMIT").unwrap();
    }
}

/// II-2/9 low findings, as documented in docs/phi.md ("What an envelope does not hide"): the
/// PHI domain checks the header only (plaintext behind a forged header is stored but never
/// revealed as PHI), an envelope's length is the plaintext's plus 36 bytes, and an envelope
/// is bound to its tenant and label, not to its row: a label that names the row binds it.
#[test]
fn test_envelope_limits_are_as_documented() {
    let mut c = app();
    enter(&mut c, A);
    // A forged 8-byte header in front of plaintext passes the domain check...
    let forged =
        "'\\x5048010000000001'::bytea || convert_to('555-0101 in clear, padding padding', 'UTF8')";
    c.batch_execute(&format!(
        "INSERT INTO vault (plain, secret) VALUES ('forged', {forged})"
    ))
    .unwrap();
    // ...and is refused as soon as anyone reveals it.
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT tenancy.phi_reveal(secret) FROM vault WHERE plain = 'forged'",
            &[]
        )),
        "28000"
    );
    c.batch_execute("ROLLBACK").unwrap();
    enter(&mut c, A);
    // Length: plaintext + 36 (8 header, 12 nonce, 16 tag), for every length.
    for n in [0usize, 1, 15, 16, 17, 1000] {
        let len: i32 = c
            .query_one(
                "SELECT octet_length(tenancy.phi_encrypt(repeat('x', $1)))",
                &[&(n as i32)],
            )
            .unwrap()
            .get(0);
        assert_eq!(len as usize, n + 36, "plaintext of {n} bytes");
    }
    // Row binding: with a per-column label two rows' envelopes swap unnoticed; a label that
    // names the row refuses the swap.
    let swapped: String = c
        .query_one(
            "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('row 1 phone', 'vault.secret'), 'vault.secret')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(swapped, "row 1 phone");
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT tenancy.phi_reveal(tenancy.phi_encrypt('row 1 phone', 'vault.secret:1'), 'vault.secret:2')",
            &[],
        )),
        "28000"
    );
    c.batch_execute("ROLLBACK").unwrap();
}
