//! II-3/9: data comes back exactly as it went in, and bad input gets a clear error: a
//! documented SQLSTATE, never XX000, a panic, a Rust backtrace or a secret in a message or in
//! the server log. Every test cluster runs with `RUST_BACKTRACE=1 RUST_LIB_BACKTRACE=1` in the
//! server's environment (harness), so backtraces would show if the library let them.

use crate::harness::{count, db_error, strings, Cluster};
use crate::rls::{reference_cluster, CONWAY, SHERWOOD};
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use postgres::Client;
use std::sync::OnceLock;

fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| {
        let c = reference_cluster();
        c.connect("owner", "app")
            .batch_execute(
                "CREATE TABLE public.vault (organization_id uuid NOT NULL DEFAULT tenancy.current_org_id(),
                                            note text, secret bytea);
                 GRANT SELECT, INSERT ON public.vault TO app;",
            )
            .unwrap();
        c
    })
}

fn enter(c: &mut Client, org: &str) {
    c.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{org}')"))
        .unwrap();
}

/// The active key (id, bytes) of the cluster's key ring file.
fn active_key(c: &Cluster) -> (u32, Vec<u8>) {
    let text = std::fs::read_to_string(c.phi_key_file.as_ref().unwrap()).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_end().ends_with(" active"))
        .expect("an active key");
    let f: Vec<&str> = line.split_whitespace().collect();
    let key = (0..f[1].len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&f[1][i..i + 2], 16).unwrap())
        .collect();
    (f[0].parse().unwrap(), key)
}

/// An authentic envelope sealed the way docs/phi.md describes, by code other than
/// phi_encrypt: it may hold bytes phi_encrypt would never have sealed.
fn app_side_envelope(c: &Cluster, content: u8, tenant: &str, plain: &[u8]) -> Vec<u8> {
    let (key_id, key) = active_key(c);
    let nonce = [7u8; 12];
    let mut env = b"PH".to_vec();
    env.push(1);
    env.push(content);
    env.extend_from_slice(&key_id.to_be_bytes());
    env.extend_from_slice(&nonce);
    let mut aad = b"pg_tenancy.phi.v1\0".to_vec();
    aad.extend_from_slice(&env[..8]);
    aad.extend_from_slice(&(tenant.len() as u16).to_be_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(&0u16.to_be_bytes());
    let mut body = plain.to_vec();
    let tag = Aes256Gcm::new_from_slice(&key)
        .unwrap()
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut body)
        .unwrap();
    env.extend_from_slice(&body);
    env.extend_from_slice(&tag);
    env
}

/// Everything an error shows a client.
fn shown(e: &postgres::error::DbError) -> String {
    format!(
        "{} | {} | {:?} | {:?} | {:?}",
        e.code().code(),
        e.message(),
        e.detail(),
        e.hint(),
        e.where_()
    )
}

#[test]
fn test_jsonb_text_and_bytea_come_back_exactly() {
    let mut c = cluster().connect("app", "app");
    enter(&mut c, SHERWOOD);
    for json in [
        r#"{"mrn": 123456789012345678901234567890, "ratio": 1.000000000000000000001}"#,
        r#"{"b": 1, "a": [1e400, -0.0, 0.10, 12345678901234567890.123456789012345678901]}"#,
        r#"{"name": "Zoë \u00e9 \ud83d\ude00 \"quoted\" \\ back", "nested": {"z": null, "y": [true, false, {}]}}"#,
        r#"[]"#,
        r#""just a string""#,
        r#"-0.000000000000000000000000000001"#,
    ] {
        let row = c
            .query_one(
                "SELECT tenancy.phi_reveal_jsonb(tenancy.phi_encrypt($1::text::jsonb)) = $1::text::jsonb,
                        tenancy.phi_reveal_jsonb(tenancy.phi_encrypt($1::text::jsonb))::text, $1::text::jsonb::text",
                &[&json],
            )
            .unwrap_or_else(|e| panic!("{json}: {e}"));
        let (same, back, want): (bool, String, String) = (row.get(0), row.get(1), row.get(2));
        assert!(same, "{json}");
        assert_eq!(back, want, "{json}");
    }
    for text in [
        "",
        "a\tb\r\nc",
        "Zoë, 山田, عربى, 🙂, e\u{301}",
        "'; DROP TABLE x; --",
        "\\x00",
    ] {
        let back: String = c
            .query_one(
                "SELECT tenancy.phi_reveal(tenancy.phi_encrypt($1::text))",
                &[&text],
            )
            .unwrap()
            .get(0);
        assert_eq!(back, text);
    }
    let big: String = "mrn 0123456789 ".repeat(70_000);
    let back: String = c
        .query_one(
            "SELECT tenancy.phi_reveal(tenancy.phi_encrypt($1::text))",
            &[&big],
        )
        .unwrap()
        .get(0);
    assert_eq!(back, big);
    let every_byte: Vec<u8> = (0..=255u8).collect();
    let back: Vec<u8> = c
        .query_one(
            "SELECT tenancy.phi_reveal_bytea(tenancy.phi_encrypt($1::bytea))",
            &[&every_byte],
        )
        .unwrap()
        .get(0);
    assert_eq!(back, every_byte);
    c.batch_execute("ROLLBACK").unwrap();
}

/// Authentic envelopes written by other code with contents that are not valid text or JSON:
/// refused with their own SQLSTATE, the plaintext nowhere in the error or the log.
#[test]
fn test_authentic_envelopes_with_invalid_contents_are_refused_cleanly() {
    let cl = cluster();
    let mut c = cl.connect("app", "app");
    let mut not_utf8 = vec![0xff, 0xfe];
    not_utf8.extend_from_slice(b" MRN 99-SECRET-TEXT");
    let cases: Vec<(u8, Vec<u8>, &str, &str)> = vec![
        (0, not_utf8, "tenancy.phi_reveal($1)", "22021"),
        (
            0,
            b"a\0b SECRET-WITH-NUL".to_vec(),
            "tenancy.phi_reveal($1)",
            "22021",
        ),
        (
            2,
            b"{\"mrn\": SECRET-NOT-JSON".to_vec(),
            "tenancy.phi_reveal_jsonb($1)",
            "22P02",
        ),
        (
            2,
            b"[1, 2] SECRET-TRAILING".to_vec(),
            "tenancy.phi_reveal_jsonb($1)",
            "22P02",
        ),
        (
            2,
            vec![b'"', 0xc3, 0x28, b'"'],
            "tenancy.phi_reveal_jsonb($1)",
            "22P02",
        ),
        (
            2,
            b"\"\\u0000 SECRET-ESCAPED-NUL\"".to_vec(),
            "tenancy.phi_reveal_jsonb($1)",
            "22P02",
        ),
    ];
    for (content, plain, call, want) in &cases {
        let env = app_side_envelope(cl, *content, SHERWOOD, plain);
        enter(&mut c, SHERWOOD);
        let err = db_error(c.query_one(&format!("SELECT {call}"), &[&env]));
        let text = shown(&err);
        assert_eq!(err.code().code(), *want, "{text}");
        assert!(!text.contains("SECRET"), "{text}");
        assert!(!text.contains("255, 254"), "no byte list: {text}");
        c.batch_execute("ROLLBACK").unwrap();
    }
    assert!(!cl.log().contains("SECRET"), "no plaintext in the log");
    // A valid text envelope from other code is returned exactly.
    let env = app_side_envelope(cl, 0, SHERWOOD, "from the app tier".as_bytes());
    enter(&mut c, SHERWOOD);
    let back: String = c
        .query_one("SELECT tenancy.phi_reveal($1)", &[&env])
        .unwrap()
        .get(0);
    assert_eq!(back, "from the app tier");
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn test_null_arguments_and_trigger_errors_have_their_sqlstates() {
    let cl = cluster();
    let mut app = cl.connect("app", "app");
    enter(&mut app, SHERWOOD);
    let e = db_error(app.batch_execute("SELECT tenancy.log_action(NULL)"));
    assert_eq!(e.code().code(), "22004", "{}", shown(&e));
    assert!(e.message().contains("\"action\""), "{}", e.message());
    app.batch_execute("ROLLBACK").unwrap();
    enter(&mut app, SHERWOOD);
    let e = db_error(
        app.batch_execute("SELECT tenancy.audit_payload(tenancy.phi_encrypt('{}'::jsonb), NULL)"),
    );
    assert_eq!(e.code().code(), "22004", "{}", shown(&e));
    app.batch_execute("ROLLBACK").unwrap();
    // Another tenant's chain: a readable message.
    enter(&mut app, SHERWOOD);
    let e = db_error(app.query(
        "SELECT * FROM tenancy.audit_verify($1)",
        &[&CONWAY.to_string()],
    ));
    assert_eq!(e.code().code(), "42501");
    assert_eq!(
        e.message(),
        "only a superuser may call tenancy.audit_verify() for another tenant"
    );
    app.batch_execute("ROLLBACK").unwrap();
    let mut su = cl.connect("postgres", "app");
    let e =
        db_error(su.batch_execute("SELECT tenancy.phi_rotate_for_tenant('\\x00'::bytea, NULL)"));
    assert_eq!(e.code().code(), "22004", "{}", shown(&e));
    // The audit trigger attached by hand without transition tables: 39P01, as documented.
    su.batch_execute(
        "CREATE TABLE public.misaudited (organization_id uuid, v int);
         CREATE TRIGGER bad AFTER INSERT ON public.misaudited FOR EACH STATEMENT EXECUTE FUNCTION tenancy.audit_trigger();",
    )
    .unwrap();
    let e = db_error(su.batch_execute("INSERT INTO public.misaudited VALUES (NULL, 1)"));
    assert_eq!(e.code().code(), "39P01", "{}", shown(&e));
    su.batch_execute("DROP TABLE public.misaudited").unwrap();
}

/// A statement protect() runs that fails is named in the error's CONTEXT.
#[test]
fn test_protect_names_the_statement_that_failed() {
    let mut su = cluster().connect("postgres", "app");
    su.batch_execute(
        "CREATE TABLE public.gen (id int, organization_id uuid GENERATED ALWAYS AS ('5e000000-0000-4000-8000-000000000001'::uuid) STORED)",
    )
    .unwrap();
    let e = db_error(su.query("SELECT tenancy.protect('public.gen')", &[]));
    let detail = e.detail().unwrap_or_default().to_string();
    assert!(
        detail.contains("pg_tenancy statement") && detail.contains("SET DEFAULT"),
        "{}",
        shown(&e)
    );
    assert!(e.message().contains("generated column"), "{}", shown(&e));
    assert_eq!(
        e.code().code(),
        "42601",
        "PostgreSQL's own SQLSTATE is kept"
    );
    su.batch_execute("DROP TABLE public.gen").unwrap();
}

#[test]
fn test_no_rust_backtrace_reaches_a_client_or_the_log() {
    let cl = cluster();
    let mut app = cl.connect("app", "app");
    for stmt in [
        "DROP TABLE no_such_table",
        "CREATE INDEX ON no_such_table (x)",
        "SELECT tenancy.set_org('not a uuid')",
        "SELECT tenancy.phi_reveal('\\x00'::bytea)",
    ] {
        let e = db_error(app.batch_execute(stmt));
        let text = shown(&e);
        assert!(
            !text.contains("backtrace")
                && !text.contains(".rs:")
                && e.detail().is_none_or(|d| d.len() < 300),
            "{stmt}: {text}"
        );
        let _ = app.batch_execute("ROLLBACK");
    }
    let log = cl.log();
    for needle in ["stack backtrace", "rust_begin_unwind", ".rs:", "panicked"] {
        assert!(!log.contains(needle), "{needle} in the server log");
    }
}

/// Other server encodings are refused at CREATE EXTENSION, with a clear error; UTF8 works.
#[test]
fn test_non_utf8_databases_are_refused() {
    let cl = cluster();
    let mut su = cl.connect("postgres", "postgres");
    for (db, enc) in [("latin", "LATIN1"), ("ascii", "SQL_ASCII")] {
        su.batch_execute(&format!(
            "CREATE DATABASE {db} TEMPLATE template0 ENCODING '{enc}' LC_COLLATE 'C' LC_CTYPE 'C'"
        ))
        .unwrap();
        let mut c = cl.connect("postgres", db);
        let e = db_error(c.batch_execute("CREATE EXTENSION pg_tenancy"));
        assert_eq!(e.code().code(), "0A000", "{}", shown(&e));
        assert!(
            e.message().contains("UTF8") && e.message().contains(enc),
            "{}",
            e.message()
        );
        assert!(e.hint().is_some());
        assert_eq!(
            count(
                &mut c,
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenancy'"
            ),
            0
        );
    }
}

/// Values each argument type is tried with, besides NULL: ordinary, empty, huge, boundary
/// and hostile ones.
fn values(ty: &str) -> Vec<String> {
    let v: &[&str] = match ty {
        "text" => &[
            "'clinic.patients'",
            "''",
            "'organization_id'",
            "'5e000000-0000-4000-8000-000000000001'",
            "repeat('é', 70000)",
            "E'\\\\'' || chr(39) || '$$ \"x'",
            "'v2.1.AAAAAAAAAAAAAAAAAAAAAA.AAAA'",
            "'pg_catalog.pg_class'",
        ],
        "uuid" => &[
            "'5e000000-0000-4000-8000-000000000001'",
            "'00000000-0000-0000-0000-000000000000'",
        ],
        "bytea" => &[
            "tenancy.phi_encrypt('x'::text)",
            "'\\x'::bytea",
            "'\\x00'::bytea",
            "decode(repeat('00', 36), 'hex')",
            "'\\x5048010000000001'::bytea || decode(repeat('ff', 40), 'hex')",
            "'\\x5048010200000001'::bytea || decode(repeat('ab', 100000), 'hex')",
        ],
        "jsonb" => &[
            "'{\"a\": 1}'::jsonb",
            "'null'::jsonb",
            "(repeat('[', 500) || repeat(']', 500))::jsonb",
        ],
        "bigint" => &[
            "1",
            "0",
            "-1",
            "9223372036854775807",
            "-9223372036854775808",
        ],
        "integer" => &["1", "0", "-1", "2147483647"],
        "boolean" => &["true", "false"],
        "timestamp with time zone" => &["now()", "'infinity'", "'-infinity'"],
        "regclass" => &["'clinic.patients'", "'pg_class'", "'tenancy.audit_events'"],
        "name" => &["'app'", "''"],
        "text[]" => &["'{}'::text[]", "'{x,NULL}'::text[]"],
        _ => &[],
    };
    v.iter().map(|s| format!("{s}::{ty}")).collect()
}

/// Every function and procedure of schema tenancy, with NULL in each argument and with the
/// values above in each, as the application (without and with a tenant) and as a superuser
/// (without and with a tenant), plus once with every argument an untyped literal. Fails on
/// any XX000, panic text, Rust backtrace, source path or lost connection, and on a panic or
/// crash in the server log.
#[test]
fn test_sweep_every_function_with_null_and_hostile_arguments() {
    // Its own cluster: the report at the end must see only what the sweep did.
    let cl = &reference_cluster();
    let mut su = cl.connect("postgres", "app");
    let functions: Vec<(String, String, bool, Vec<String>)> = su
        .query(
            "SELECT p.proname::text, p.oid::regprocedure::text, p.prokind = 'p',
                    coalesce(array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t), '{}')
               FROM pg_proc p
              WHERE p.pronamespace = 'tenancy'::regnamespace
                AND p.prorettype NOT IN ('trigger'::regtype, 'event_trigger'::regtype)
              ORDER BY 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(functions.len() > 30, "{} functions", functions.len());
    let mut calls: Vec<(String, bool)> = Vec::new();
    for (name, _, is_proc, types) in &functions {
        let base: Vec<String> = types
            .iter()
            .map(|t| values(t).into_iter().next().unwrap_or(format!("NULL::{t}")))
            .collect();
        let call = |args: &[String]| {
            if *is_proc {
                format!("CALL tenancy.{name}({})", args.join(", "))
            } else {
                format!("SELECT * FROM tenancy.{name}({})", args.join(", "))
            }
        };
        calls.push((call(&base), *is_proc));
        for (i, t) in types.iter().enumerate() {
            let mut tried = vec![format!("NULL::{t}")];
            tried.extend(values(t));
            for v in tried {
                let mut args = base.clone();
                args[i] = v;
                calls.push((call(&args), *is_proc));
            }
        }
        if !types.is_empty() {
            calls.push((call(&vec!["'x'".to_string(); types.len()]), *is_proc));
        }
    }
    let mut failures = Vec::new();
    let mut errors = 0usize;
    for (role, tenant) in [
        ("app", None),
        ("app", Some(SHERWOOD)),
        ("postgres", None),
        ("postgres", Some(CONWAY)),
    ] {
        let mut c = cl.connect(role, "app");
        c.batch_execute("SET statement_timeout = '60s'").unwrap();
        for (sql, _) in &calls {
            c.batch_execute("BEGIN").unwrap();
            if let Some(t) = tenant {
                c.batch_execute(&format!("SELECT tenancy.set_org('{t}')"))
                    .unwrap();
            }
            if let Err(e) = c.batch_execute(sql) {
                errors += 1;
                match e.as_db_error() {
                    Some(d) => {
                        let text = shown(d);
                        let lower = text.to_lowercase();
                        if d.code().code() == "XX000"
                            || lower.contains("panic")
                            || lower.contains("backtrace")
                            || text.contains(".rs:")
                        {
                            failures.push(format!("{role} {tenant:?}: {sql}: {text}"));
                        }
                    }
                    None => failures.push(format!("{role} {tenant:?}: {sql}: {e}")),
                }
            }
            if c.is_closed() || c.batch_execute("ROLLBACK").is_err() {
                failures.push(format!("{role} {tenant:?}: {sql}: connection lost"));
                c = cl.connect(role, "app");
                c.batch_execute("SET statement_timeout = '60s'").unwrap();
            }
        }
    }
    let log = cl.log();
    for needle in [
        "panicked",
        "stack backtrace",
        "terminated by signal",
        "PANIC:",
        "XX000",
    ] {
        if log.contains(needle) {
            failures.push(format!("server log has {needle}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} calls ({} errors):\n{}",
        failures.len(),
        calls.len() * 4,
        errors,
        failures.join("\n")
    );
    // The sweep left the reference schema as it was.
    assert_eq!(
        strings(
            &mut su,
            "SELECT severity || ' ' || object FROM tenancy.isolation_report() WHERE severity = 'critical'"
        ),
        Vec::<String>::new()
    );
}

/// No secret in any message: plaintext, key bytes, tokens and whole envelopes never appear in
/// a client error or in the server log, for every PHI error path, with Rust's backtrace
/// switches on in the server's environment.
#[test]
fn test_no_secret_in_any_error_or_the_log() {
    let cl = cluster();
    let (_, key) = active_key(cl);
    let key_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut c = cl.connect("app", "app");
    let plaintext = "PLAINTEXT-555-0199-ADA";
    enter(&mut c, SHERWOOD);
    let env: Vec<u8> = c
        .query_one(
            "SELECT tenancy.phi_encrypt($1::text, 'vault.secret')",
            &[&plaintext],
        )
        .unwrap()
        .get(0);
    let jenv: Vec<u8> = c
        .query_one(
            "SELECT tenancy.phi_encrypt(jsonb_build_object('k', $1::text))",
            &[&plaintext],
        )
        .unwrap()
        .get(0);
    c.batch_execute("COMMIT").unwrap();
    let env_hex: String = env.iter().map(|b| format!("{b:02x}")).collect();
    let mut tampered = env.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let mut shown_all = String::new();
    let attempts: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
        ("SELECT tenancy.phi_reveal($1, 'vault.secret')", Some(CONWAY), env.clone()),
        ("SELECT tenancy.phi_reveal($1, 'other.label')", Some(SHERWOOD), env.clone()),
        ("SELECT tenancy.phi_reveal($1)", Some(SHERWOOD), env.clone()),
        ("SELECT tenancy.phi_reveal($1, 'vault.secret')", Some(SHERWOOD), tampered.clone()),
        ("SELECT tenancy.phi_reveal_bytea($1, 'vault.secret')", Some(SHERWOOD), env.clone()),
        ("SELECT tenancy.phi_reveal_jsonb($1, 'vault.secret')", Some(SHERWOOD), env.clone()),
        ("SELECT tenancy.phi_reveal($1)", Some(SHERWOOD), jenv.clone()),
        ("SELECT tenancy.phi_reveal_jsonb($1)", Some(CONWAY), jenv.clone()),
        ("SELECT tenancy.phi_reveal($1, 'vault.secret')", None, env.clone()),
        ("SELECT tenancy.phi_rotate($1)", Some(SHERWOOD), env.clone()),
        ("SELECT tenancy.phi_key_id($1)", None, env[..20].to_vec()),
        ("INSERT INTO clinic.patients (first_name, last_name) VALUES ($1::bytea::tenancy.phi, $1::bytea::tenancy.phi)", Some(SHERWOOD), plaintext.as_bytes().to_vec()),
    ];
    for (sql, tenant, arg) in &attempts {
        if let Some(t) = tenant {
            enter(&mut c, t);
        } else {
            c.batch_execute("BEGIN").unwrap();
        }
        let r = c.query(*sql, &[arg]);
        let e = db_error(r);
        shown_all.push_str(&shown(&e));
        shown_all.push('\n');
        assert_ne!(e.code().code(), "XX000", "{sql}");
        c.batch_execute("ROLLBACK").unwrap();
    }
    // A token that is refused (unsigned mode ignores none: it is checked only when signed;
    // the malformed-token path is exercised in signed.rs) and a malformed tenant id.
    let token = "v2.4000000000.SECRETNONCE0123456789.SECRETSIGNATUREAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    c.batch_execute("BEGIN").unwrap();
    let e = db_error(c.query(
        "SELECT tenancy.set_org($1, NULL, $2)",
        &[&"PLAINTEXT not a uuid", &token],
    ));
    shown_all.push_str(&shown(&e));
    c.batch_execute("ROLLBACK").unwrap();
    let log = cl.log();
    for (what, secret) in [
        ("plaintext", plaintext),
        ("key", key_hex.as_str()),
        ("envelope", env_hex.as_str()),
        ("token", token),
        ("token nonce", "SECRETNONCE"),
        ("tenant id", "PLAINTEXT not a uuid"),
    ] {
        assert!(
            !shown_all.contains(secret),
            "{what} in an error:\n{shown_all}"
        );
        assert!(!log.contains(secret), "{what} in the server log");
    }
    for needle in ["backtrace", ".rs:"] {
        assert!(!shown_all.contains(needle), "{needle}:\n{shown_all}");
    }
}
