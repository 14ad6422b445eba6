//! The error table: every variant has a hint, and docs/reference.md lists exactly the
//! SQLSTATEs the code raises.

use super::*;

/// Every variant (listed by `every_error`, which cannot miss one) has a hint, and its
/// message, detail and hint read as sentences: no Debug rendering of a Rust value
/// (`FromUtf8Error { bytes: [...] }` once put plaintext bytes in a message), no doubled
/// call parentheses (a garbled "audit_verify (for another tenant)()").
#[test]
fn test_every_error_has_a_hint_and_reads_as_a_sentence() {
    for e in every_error() {
        let hint = e
            .hint()
            .unwrap_or_else(|| panic!("{} has no hint", variant(&e)));
        let text = format!("{e} | {:?} | {hint}", e.detail());
        assert!(!e.to_string().is_empty());
        for artifact in ["{", "}", "Error", "()(", "bytes: ["] {
            assert!(
                !text.contains(artifact),
                "{}: {artifact:?} in {text}",
                variant(&e)
            );
        }
    }
}

/// The values an error shows come from pg_tenancy's own words or from identifiers (table,
/// column, role, function, path, setting names): variants that can carry anything else (a
/// tenant id, a token, plaintext) must not exist. Fields of type `String` are where input
/// could enter; this pins which variants have them, so a new one is reviewed here.
#[test]
fn test_only_identifier_fields_carry_input() {
    let marker = "SECRET-INPUT";
    let carrying: Vec<&str> = every_error_with(marker)
        .iter()
        .filter(|e| format!("{e} {:?}", e.detail()).contains(marker))
        .map(variant)
        .collect();
    assert_eq!(
        carrying,
        [
            "MalformedTenant",         // reason: made by ids.rs, never the value (tested there)
            "MalformedActor",          // reason: as above
            "KeyFile",                 // path and a reason naming lines and ids, never key bytes
            "NotATable",               // relation name
            "NoTenantColumn",          // relation and column names
            "TenantColumnType",        // names and a type name
            "TenantColumnCollation",   // names and a collation name
            "NotProtected",            // relation name
            "PhiKeyFile",              // as KeyFile
            "ForeignCodeInDdl",        // function and role names
            "SessionObject",           // what kind of object
            "ReservedAction",          // the application's action name
            "RevealNotAudited",        // a database name
            "RevealNotRecorded",       // pg_tenancy's own words
            "UndefinedTable",          // relation name
            "BadDigest",               // reason: made by digest.rs, never the digest's text
            "EventOfOtherTenant",      // table and column names, never the row's values
            "SessionSettingForOthers", // a setting's name
            "Spi",                     // SPI's own error about pg_tenancy's query
        ]
    );
}

/// One value of every variant. `variant` has no wildcard: a new variant does not compile
/// until it is listed here, and the test below checks that every one is.
fn every_error() -> Vec<TenancyError> {
    every_error_with("x")
}

fn every_error_with(text: &str) -> Vec<TenancyError> {
    use TenancyError::*;
    let s = || String::from(text);
    vec![
        NotPreloaded,
        OutsideTransaction,
        NullTenant,
        EmptyTenant,
        MalformedTenant { reason: s() },
        MalformedActor { reason: s() },
        TenantAlreadySet,
        ActorAlreadySet,
        NoTenant,
        TokenRequired,
        TokenMalformed { reason: "r" },
        TokenExpired,
        TokenInvalid,
        TokenReplayed,
        TokenMemoryFull,
        KeyFile {
            path: s(),
            reason: s(),
        },
        HoldableCursor,
        NotATable { relation: s() },
        NoTenantColumn {
            relation: s(),
            column: s(),
        },
        TenantColumnType {
            relation: s(),
            column: s(),
            found: s(),
        },
        TenantColumnCollation {
            relation: s(),
            column: s(),
            collation: s(),
        },
        NotProtected { relation: s() },
        SuperuserOnly { what: "w" },
        PhiNotConfigured,
        PhiKeyFile {
            path: s(),
            reason: s(),
        },
        PhiMalformed { reason: "r" },
        PhiUnknownKey { key_id: 3 },
        PhiAuthentication,
        PhiWrongType {
            found: "text",
            want: "bytea",
        },
        PhiBadLabel,
        PhiWhileStoring,
        BadAction,
        ForeignCodeInDdl {
            function: s(),
            owner: s(),
        },
        RewriteInDdl,
        SessionObject { what: s() },
        ReservedAction { action: s() },
        RevealNotAudited { reason: s() },
        RevealNotRecorded { reason: s() },
        AuditTriggerMisdefined { reason: "r" },
        OtherTenant { what: "w" },
        NullArgument {
            function: "f",
            argument: "a",
        },
        UndefinedTable { name: s() },
        PhiInvalidText { reason: "r" },
        PhiInvalidJson,
        DetailsTooDeep,
        BadDigest { reason: s() },
        TrailMaintenance { command: "VACUUM" },
        ClusterKeyMissing,
        ClusterContextRefused { reason: "r" },
        NotACitusWorker { what: "w" },
        BadTenantIdFormat,
        ShardCopyRefused { function: "f" },
        EventOfOtherTenant {
            table: s(),
            column: s(),
        },
        BadOutboxRequest { reason: "r" },
        ShardWeakening {
            command: "CREATE POLICY",
        },
        SessionSettingForOthers { setting: s() },
        Spi {
            what: "w",
            reason: s(),
        },
    ]
}

fn variant(e: &TenancyError) -> &'static str {
    use TenancyError::*;
    match e {
        NotPreloaded => "NotPreloaded",
        OutsideTransaction => "OutsideTransaction",
        NullTenant => "NullTenant",
        EmptyTenant => "EmptyTenant",
        MalformedTenant { .. } => "MalformedTenant",
        MalformedActor { .. } => "MalformedActor",
        TenantAlreadySet => "TenantAlreadySet",
        ActorAlreadySet => "ActorAlreadySet",
        NoTenant => "NoTenant",
        TokenRequired => "TokenRequired",
        TokenMalformed { .. } => "TokenMalformed",
        TokenExpired => "TokenExpired",
        TokenInvalid => "TokenInvalid",
        TokenReplayed => "TokenReplayed",
        TokenMemoryFull => "TokenMemoryFull",
        KeyFile { .. } => "KeyFile",
        HoldableCursor => "HoldableCursor",
        NotATable { .. } => "NotATable",
        NoTenantColumn { .. } => "NoTenantColumn",
        TenantColumnType { .. } => "TenantColumnType",
        TenantColumnCollation { .. } => "TenantColumnCollation",
        NotProtected { .. } => "NotProtected",
        SuperuserOnly { .. } => "SuperuserOnly",
        PhiNotConfigured => "PhiNotConfigured",
        PhiKeyFile { .. } => "PhiKeyFile",
        PhiMalformed { .. } => "PhiMalformed",
        PhiUnknownKey { .. } => "PhiUnknownKey",
        PhiAuthentication => "PhiAuthentication",
        PhiWrongType { .. } => "PhiWrongType",
        PhiBadLabel => "PhiBadLabel",
        PhiWhileStoring => "PhiWhileStoring",
        BadAction => "BadAction",
        ForeignCodeInDdl { .. } => "ForeignCodeInDdl",
        RewriteInDdl => "RewriteInDdl",
        SessionObject { .. } => "SessionObject",
        ReservedAction { .. } => "ReservedAction",
        RevealNotAudited { .. } => "RevealNotAudited",
        RevealNotRecorded { .. } => "RevealNotRecorded",
        AuditTriggerMisdefined { .. } => "AuditTriggerMisdefined",
        OtherTenant { .. } => "OtherTenant",
        NullArgument { .. } => "NullArgument",
        UndefinedTable { .. } => "UndefinedTable",
        PhiInvalidText { .. } => "PhiInvalidText",
        PhiInvalidJson => "PhiInvalidJson",
        DetailsTooDeep => "DetailsTooDeep",
        BadDigest { .. } => "BadDigest",
        ClusterKeyMissing => "ClusterKeyMissing",
        ClusterContextRefused { .. } => "ClusterContextRefused",
        ShardWeakening { .. } => "ShardWeakening",
        NotACitusWorker { .. } => "NotACitusWorker",
        BadTenantIdFormat => "BadTenantIdFormat",
        ShardCopyRefused { .. } => "ShardCopyRefused",
        EventOfOtherTenant { .. } => "EventOfOtherTenant",
        BadOutboxRequest { .. } => "BadOutboxRequest",
        TrailMaintenance { .. } => "TrailMaintenance",
        SessionSettingForOthers { .. } => "SessionSettingForOthers",
        Spi { .. } => "Spi",
    }
}

/// The five characters of a SQLSTATE packed by MAKE_SQLSTATE.
fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let n = code as i32;
    (0..5)
        .map(|i| (((n >> (6 * i)) & 0x3f) as u8 + b'0') as char)
        .collect()
}

/// The SQLSTATEs of docs/reference.md's error table.
fn documented() -> std::collections::BTreeSet<String> {
    let doc = include_str!("../../docs/reference.md");
    let table = &doc[doc.find("## Errors").expect("an Errors section")..];
    table
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(" |").next())
        .flat_map(|cell| cell.split(", "))
        .filter(|c| c.len() == 5 && c.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(str::to_string)
        .collect()
}

/// Every SQLSTATE the code raises (the error enum's and the SQL files' RAISE ...
/// ERRCODE) is in docs/reference.md's table, and the table lists no other, but the
/// domain check PostgreSQL raises for `tenancy.phi` (23514).
#[test]
fn test_reference_sqlstate_table_matches_the_code() {
    let all = every_error();
    let names: std::collections::BTreeSet<_> = all.iter().map(variant).collect();
    assert_eq!(
        names.len(),
        all.len(),
        "every_error() lists each variant once"
    );
    let mut raised: std::collections::BTreeSet<String> =
        all.iter().map(|e| sqlstate_text(e.sqlstate())).collect();
    for sql in [
        include_str!("../../sql/bootstrap.sql"),
        include_str!("../../sql/registry.sql"),
        include_str!("../../sql/guards.sql"),
        include_str!("../../sql/report.sql"),
        include_str!("../../sql/phi.sql"),
        include_str!("../../sql/audit.sql"),
        include_str!("../../sql/finalize.sql"),
    ] {
        for part in sql.split("ERRCODE = '").skip(1) {
            raised.insert(part[..5].to_string());
        }
    }
    assert!(raised.contains("55000") && raised.contains("0A000"));
    assert_eq!(
        sqlstate_text(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR),
        "XX000"
    );
    assert!(!raised.contains("XX000"), "no error of pg_tenancy is XX000");
    let docs = documented();
    let missing: Vec<_> = raised.difference(&docs).collect();
    assert!(
        missing.is_empty(),
        "raised, not in docs/reference.md: {missing:?}"
    );
    let mut extra: Vec<_> = docs.difference(&raised).collect();
    extra.retain(|c| c.as_str() != "23514");
    assert!(
        extra.is_empty(),
        "in docs/reference.md, never raised: {extra:?}"
    );
}
