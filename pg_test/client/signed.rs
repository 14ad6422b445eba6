//! Signed mode: with `tenancy.context_key_file` set, `set_org` demands an HMAC token that
//! only the application tier (holding the key) can mint.

use crate::context::{A, B};
use crate::harness::{db_error, sqlstate, Cluster};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::{SystemTime, UNIX_EPOCH};

pub const KEY_HEX: &str = "8f2a1c9d4e7b3a6f0c5d8e1b2a4f7c9e3d6b0a8f1e4c7d2b5a9e0f3c6d1b4a7e";

/// What a Node or Python service does, per docs/context.md: a v2 token with a random nonce.
pub fn mint(key_hex: &str, org: &str, actor: &str, expiry: u64) -> String {
    let key = hex::decode(key_hex).unwrap();
    let mut raw = [0u8; 16];
    getrandom::getrandom(&mut raw).unwrap();
    let nonce = URL_SAFE_NO_PAD.encode(raw);
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("pg_tenancy.context.v2\n{org}\n{actor}\n{expiry}\n{nonce}").as_bytes());
    format!(
        "v2.{expiry}.{nonce}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// A 0.2.0 token (v1, no nonce), still accepted.
pub fn mint_v1(key_hex: &str, org: &str, actor: &str, expiry: u64) -> String {
    let key = hex::decode(key_hex).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("pg_tenancy.context.v1\n{org}\n{actor}\n{expiry}").as_bytes());
    format!(
        "v1.{expiry}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn test_signed_mode_requires_a_valid_token() {
    let secrets = crate::harness::server_private_dir();
    let key = secrets.path().join("context.key");
    std::fs::write(&key, format!("{KEY_HEX}\n")).unwrap();
    crate::harness::set_server_file_mode(&key, 0o600);
    let cluster = Cluster::start(&[
        "shared_preload_libraries = 'pg_tenancy'",
        &format!("tenancy.context_key_file = '{}'", key.display()),
    ]);
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute("CREATE EXTENSION pg_tenancy").unwrap();
    let mut c = cluster.connect("app", "app");
    let later = now() + 300;

    // No token, a token for another tenant or actor, a tampered or expired one: refused.
    let cases = [
        (
            format!("'{A}', 'u1'"),
            "28000",
            "a signed context token is required",
        ),
        (
            format!("'{A}', 'u1', '{}'", mint(KEY_HEX, B, "u1", later)),
            "28000",
            "context token does not match the tenant and actor",
        ),
        (
            format!("'{A}', 'u1', '{}'", mint(KEY_HEX, A, "u2", later)),
            "28000",
            "context token does not match the tenant and actor",
        ),
        (
            format!(
                "'{A}', 'u1', '{}'",
                mint(&KEY_HEX.replace('8', "9"), A, "u1", later)
            ),
            "28000",
            "context token does not match the tenant and actor",
        ),
        (
            format!("'{A}', 'u1', '{}'", mint(KEY_HEX, A, "u1", now() - 1)),
            "28000",
            "context token has expired",
        ),
        (
            format!("'{A}', 'u1', 'v1.{later}.forged'"),
            "28000",
            "malformed context token",
        ),
    ];
    for (args, code, message) in &cases {
        c.batch_execute("BEGIN").unwrap();
        let err = db_error(c.batch_execute(&format!("SELECT tenancy.set_org({args})")));
        assert_eq!(
            (err.code().code(), err.message()),
            (*code, *message),
            "{args}"
        );
        c.batch_execute("ROLLBACK").unwrap();
    }
    // The right token works and marks the context as signed.
    let token = mint(KEY_HEX, A, "u1", later);
    c.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{A}', 'u1', '{token}')"
    ))
    .unwrap();
    let row = c.query_one("SELECT tenancy.current_org_id()::text, tenancy.current_actor(), tenancy.context_is_signed()", &[]).unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(A));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("u1"));
    assert!(row.get::<_, bool>(2));
    c.batch_execute("COMMIT").unwrap();

    // S2: a token is single-use, cluster-wide: the same token again, in another transaction
    // or another session, is refused.
    let mut other = cluster.connect("app", "app");
    for replayer in [&mut c, &mut other] {
        replayer.batch_execute("BEGIN").unwrap();
        let err = db_error(
            replayer.batch_execute(&format!("SELECT tenancy.set_org('{A}', 'u1', '{token}')")),
        );
        assert_eq!(
            (err.code().code(), err.message()),
            ("28000", "this context token was already used")
        );
        assert!(err.hint().unwrap().contains("single-use"));
        replayer.batch_execute("ROLLBACK").unwrap();
    }
    // A token sent as a literal shows in pg_stat_activity while its transaction is open;
    // another session of the role reads it there, and cannot use it.
    let mut victim = cluster.connect("app", "app");
    let literal = mint(KEY_HEX, B, "u9", later);
    victim
        .batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{B}', 'u9', '{literal}')"
        ))
        .unwrap();
    let seen: String = c
        .query_one(
            "SELECT query FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
            &[&literal[..12].to_string()],
        )
        .unwrap()
        .get(0);
    let stolen = seen
        .split('\'')
        .find(|p| p.starts_with("v2."))
        .expect("the token is visible")
        .to_string();
    assert_eq!(stolen, literal);
    c.batch_execute("BEGIN").unwrap();
    assert_eq!(
        sqlstate(c.batch_execute(&format!("SELECT tenancy.set_org('{B}', 'u9', '{stolen}')"))),
        "28000",
        "a token read from pg_stat_activity does not replay"
    );
    c.batch_execute("ROLLBACK").unwrap();
    victim.batch_execute("COMMIT").unwrap();
    // 0.2.0's v1 tokens still work, once; two fresh v2 tokens for the same second both work.
    for token in [
        mint_v1(KEY_HEX, A, "u1", later + 1),
        mint(KEY_HEX, A, "u1", later + 2),
        mint(KEY_HEX, A, "u1", later + 2),
    ] {
        c.batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{A}', 'u1', '{token}'); COMMIT;"
        ))
        .unwrap();
    }
    let token = mint(KEY_HEX, A, "u1", later);

    // A key file others can read is refused after reload, with a clear error; the key never
    // appears in the message or the server log.
    // Every new backend reads the file afresh, so no reload is needed to see the change.
    crate::harness::set_server_file_mode(&key, 0o644);
    let mut c2 = cluster.connect("app", "app");
    c2.batch_execute("BEGIN").unwrap();
    let err =
        db_error(c2.batch_execute(&format!("SELECT tenancy.set_org('{A}', 'u1', '{token}')")));
    assert_eq!(err.code().code(), "F0000");
    assert!(
        err.detail().unwrap().contains("group or other"),
        "{:?}",
        err.detail()
    );
    assert!(!format!("{err:?}").contains(KEY_HEX));
    c2.batch_execute("ROLLBACK").unwrap();
    assert!(
        !cluster.log().contains(KEY_HEX),
        "the key is not in the server log"
    );
    assert_eq!(sqlstate(c2.query_one("SELECT 1/0", &[])), "22012"); // connection still healthy
}

/// A key rotation without a window of refused tokens: the key file holds the new key and the
/// old one, tokens under either are accepted; once the file holds the new key alone (and the
/// server reloaded), the old key's tokens are refused. More than two keys is a clear error.
#[test]
fn test_a_rotation_accepts_tokens_under_either_of_two_keys() {
    const NEW_KEY: &str = "1b4a7e8f2a1c9d4e7b3a6f0c5d8e1b2a4f7c9e3d6b0a8f1e4c7d2b5a9e0f3c6d";
    let secrets = crate::harness::server_private_dir();
    let key = secrets.path().join("context.key");
    let write = |contents: String| {
        std::fs::write(&key, contents).unwrap();
        crate::harness::set_server_file_mode(&key, 0o600);
    };
    write(format!("# new, then the old one until every application mints with the new\n{NEW_KEY}\n{KEY_HEX}\n"));
    let cluster = Cluster::start(&[
        "shared_preload_libraries = 'pg_tenancy'",
        &format!("tenancy.context_key_file = '{}'", key.display()),
    ]);
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute("CREATE EXTENSION pg_tenancy").unwrap();
    let org = "5e000000-0000-4000-8000-000000000001";
    let enter = |key_hex: &str| {
        let mut c = cluster.connect("app", "app");
        let token = mint(key_hex, org, "", now() + 60);
        c.batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{org}', NULL, '{token}'); COMMIT"
        ))
        .map_err(|e| {
            e.as_db_error()
                .map(|d| d.code().code().to_string())
                .unwrap_or_default()
        })
    };
    assert_eq!(enter(NEW_KEY), Ok(()));
    assert_eq!(enter(KEY_HEX), Ok(()));
    // The rotation ends: the old key leaves the file.
    write(format!("{NEW_KEY}\n"));
    cluster.reload();
    assert_eq!(enter(NEW_KEY), Ok(()));
    assert_eq!(enter(KEY_HEX), Err("28000".to_string()));
    // Three keys: refused, saying why (and nothing is accepted meanwhile).
    write(format!("{NEW_KEY}\n{KEY_HEX}\n{NEW_KEY}\n"));
    cluster.reload();
    let mut c = cluster.connect("app", "app");
    let token = mint(NEW_KEY, org, "", now() + 60);
    let e = crate::harness::db_error(c.batch_execute(&format!(
        "BEGIN; SELECT tenancy.set_org('{org}', NULL, '{token}')"
    )));
    assert!(e.detail().unwrap_or("").contains("at most 2"), "{e:?}");
}
