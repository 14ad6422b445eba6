//! One error type for the extension, mapped to SQLSTATE, DETAIL and HINT in one place.
//!
//! Messages name what went wrong in words a DBA understands. They never carry key material,
//! tokens, plaintext or ciphertext: only ids, paths and lengths where those help.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// Everything pg_tenancy reports to a client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TenancyError {
    #[error("pg_tenancy must be loaded through shared_preload_libraries")]
    NotPreloaded,
    #[error("tenancy.set_org() must be called inside a transaction block")]
    OutsideTransaction,
    #[error("tenant id must not be NULL")]
    NullTenant,
    #[error("tenant id must not be empty")]
    EmptyTenant,
    #[error("invalid tenant id")]
    MalformedTenant { reason: String },
    #[error("invalid actor id")]
    MalformedActor { reason: String },
    #[error("a different tenant context is already set in this transaction")]
    TenantAlreadySet,
    #[error("the actor of this transaction is already set")]
    ActorAlreadySet,
    #[error("no tenant context is set")]
    NoTenant,
    #[error("a signed context token is required")]
    TokenRequired,
    #[error("malformed context token")]
    TokenMalformed { reason: &'static str },
    #[error("context token has expired")]
    TokenExpired,
    #[error("context token does not match the tenant and actor")]
    TokenInvalid,
    #[error("this context token was already used")]
    TokenReplayed,
    #[error("too many unexpired context tokens are in use")]
    TokenMemoryFull,
    #[error("context key file is not usable")]
    KeyFile { path: String, reason: String },
    #[error("WITH HOLD cursors cannot be used in a tenant transaction")]
    HoldableCursor,
    #[error("\"{relation}\" is not a table")]
    NotATable { relation: String },
    #[error("table \"{relation}\" has no column \"{column}\"")]
    NoTenantColumn { relation: String, column: String },
    #[error("tenant column \"{relation}\".\"{column}\" must be uuid or text, not {found}")]
    TenantColumnType {
        relation: String,
        column: String,
        found: String,
    },
    #[error("tenant column \"{relation}\".\"{column}\" has the nondeterministic collation \"{collation}\"")]
    TenantColumnCollation {
        relation: String,
        column: String,
        collation: String,
    },
    #[error("table \"{relation}\" is not protected by pg_tenancy")]
    NotProtected { relation: String },
    #[error("only a superuser may call tenancy.{what}()")]
    SuperuserOnly { what: &'static str },
    #[error("no PHI key ring is configured")]
    PhiNotConfigured,
    #[error("the PHI key ring is not usable")]
    PhiKeyFile { path: String, reason: String },
    #[error("value is not a valid PHI envelope")]
    PhiMalformed { reason: &'static str },
    #[error("PHI key {key_id} is not in the key ring")]
    PhiUnknownKey { key_id: u32 },
    #[error("PHI value cannot be revealed: authentication failed")]
    PhiAuthentication,
    #[error("PHI envelope holds {found}, not {want}")]
    PhiWrongType {
        found: &'static str,
        want: &'static str,
    },
    #[error("PHI context label must be 1 to 255 bytes")]
    PhiBadLabel,
    #[error("PHI cannot be revealed while building statistics or indexes")]
    PhiWhileStoring,
    #[error("invalid audit action name")]
    BadAction,
    #[error(
        "{function} of role {owner} cannot run in DDL on a table with forced row level security"
    )]
    ForeignCodeInDdl { function: String, owner: String },
    #[error(
        "ALTER COLUMN ... TYPE ... USING cannot run on a table with forced row level security"
    )]
    RewriteInDdl,
    #[error("{what} is not allowed in a tenant transaction")]
    SessionObject { what: String },
    #[error("audit action name \"{action}\" is reserved for pg_tenancy's own events")]
    ReservedAction { action: String },
    #[error("PHI cannot be revealed here: reveals could not be audited")]
    RevealNotAudited { reason: String },
    #[error("PHI cannot be revealed now: the reveal could not be recorded")]
    RevealNotRecorded { reason: String },
    #[error("tenancy.audit_trigger() is attached the wrong way")]
    AuditTriggerMisdefined { reason: &'static str },
    #[error("only a superuser may call tenancy.{what}() for another tenant")]
    OtherTenant { what: &'static str },
    #[error("argument \"{argument}\" of tenancy.{function}() must not be NULL")]
    NullArgument {
        function: &'static str,
        argument: &'static str,
    },
    #[error("relation \"{name}\" does not exist")]
    UndefinedTable { name: String },
    #[error("PHI text envelope does not hold valid text")]
    PhiInvalidText { reason: &'static str },
    #[error("PHI jsonb envelope does not hold valid JSON")]
    PhiInvalidJson,
    #[error("only a superuser may set {setting} for a database or role with pg_tenancy installed")]
    SessionSettingForOthers { setting: String },
    #[error("audit details nest more than 127 levels deep")]
    DetailsTooDeep,
    #[error("malformed audit digest")]
    BadDigest { reason: String },
    #[error("only a superuser may run {command} over pg_tenancy's own tables")]
    TrailMaintenance { command: &'static str },
    #[error("tenancy.cluster_key_file is not set: this Citus coordinator cannot hand the tenant context to its workers")]
    ClusterKeyMissing,
    #[error(
        "only a superuser may run {command} on a table protected by pg_tenancy on a Citus node"
    )]
    ShardWeakening { command: &'static str },
    #[error("tenancy.cluster_context refused: {reason}")]
    ClusterContextRefused { reason: &'static str },
    #[error("audit event refused: a row of another tenant than the writer's context was written to \"{table}\"")]
    EventOfOtherTenant { table: String, column: String },
    #[error("only a superuser may run {function}() in a database with pg_tenancy")]
    ShardCopyRefused { function: &'static str },
    #[error("a tenant id format is 'uuid' or 'text'")]
    BadTenantIdFormat,
    #[error("{what} runs on a Citus worker only")]
    NotACitusWorker { what: &'static str },
    #[error("invalid audit outbox request: {reason}")]
    BadOutboxRequest { reason: &'static str },
    #[error("pg_tenancy: {what} failed")]
    Spi { what: &'static str, reason: String },
}

impl TenancyError {
    /// The SQLSTATE for each error. Class 42 (access rule violation) and 28 (invalid
    /// authorization) are the ones applications already treat as "not allowed".
    pub(crate) fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Self::NotPreloaded => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Self::OutsideTransaction => ERRCODE_NO_ACTIVE_SQL_TRANSACTION,
            Self::NullTenant => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            Self::EmptyTenant | Self::MalformedTenant { .. } | Self::MalformedActor { .. } => {
                ERRCODE_INVALID_PARAMETER_VALUE
            }
            Self::TenantAlreadySet | Self::ActorAlreadySet => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::NoTenant => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::TokenRequired
            | Self::TokenMalformed { .. }
            | Self::TokenExpired
            | Self::TokenInvalid
            | Self::TokenReplayed => ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            Self::TokenMemoryFull => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            Self::KeyFile { .. } => ERRCODE_CONFIG_FILE_ERROR,
            Self::HoldableCursor => ERRCODE_FEATURE_NOT_SUPPORTED,
            Self::NotATable { .. } => ERRCODE_WRONG_OBJECT_TYPE,
            Self::NoTenantColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
            Self::TenantColumnType { .. } => ERRCODE_DATATYPE_MISMATCH,
            Self::TenantColumnCollation { .. } => ERRCODE_INDETERMINATE_COLLATION,
            Self::NotProtected { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Self::SuperuserOnly { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::PhiNotConfigured => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Self::PhiKeyFile { .. } => ERRCODE_CONFIG_FILE_ERROR,
            Self::PhiMalformed { .. } => ERRCODE_INVALID_BINARY_REPRESENTATION,
            Self::PhiUnknownKey { .. } => ERRCODE_UNDEFINED_OBJECT,
            Self::PhiAuthentication => ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            Self::PhiWrongType { .. } => ERRCODE_DATATYPE_MISMATCH,
            Self::PhiBadLabel => ERRCODE_INVALID_PARAMETER_VALUE,
            Self::PhiWhileStoring => ERRCODE_FEATURE_NOT_SUPPORTED,
            Self::BadAction => ERRCODE_INVALID_PARAMETER_VALUE,
            Self::BadDigest { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            Self::TrailMaintenance { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::ClusterKeyMissing => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Self::ClusterContextRefused { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::ShardWeakening { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::NotACitusWorker { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Self::BadTenantIdFormat => ERRCODE_INVALID_PARAMETER_VALUE,
            Self::ShardCopyRefused { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::EventOfOtherTenant { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::BadOutboxRequest { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            Self::ReservedAction { .. } => ERRCODE_RESERVED_NAME,
            Self::SessionObject { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            Self::ForeignCodeInDdl { .. } | Self::RewriteInDdl => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::RevealNotAudited { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Self::RevealNotRecorded { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Self::AuditTriggerMisdefined { .. } => ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            Self::OtherTenant { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Self::NullArgument { .. } => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            Self::UndefinedTable { .. } => ERRCODE_UNDEFINED_TABLE,
            Self::PhiInvalidText { .. } => ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            Self::PhiInvalidJson => ERRCODE_INVALID_TEXT_REPRESENTATION,
            Self::Spi { .. } => ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
            Self::DetailsTooDeep => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            Self::SessionSettingForOthers { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
        }
    }

    /// Internals a DBA may need; never secrets.
    pub(crate) fn detail(&self) -> Option<String> {
        match self {
            Self::MalformedTenant { reason } | Self::MalformedActor { reason } => {
                Some(reason.clone())
            }
            Self::TokenMalformed { reason } => Some((*reason).to_string()),
            Self::EventOfOtherTenant { column, .. } => Some(format!(
                "the audit trigger files events under column \"{column}\", which is not the writer's tenant in this row"
            )),
            Self::KeyFile { path, reason } | Self::PhiKeyFile { path, reason } => {
                Some(format!("file \"{path}\": {reason}"))
            }
            Self::PhiMalformed { reason } => Some((*reason).to_string()),
            Self::RevealNotAudited { reason } | Self::RevealNotRecorded { reason } => {
                Some(reason.clone())
            }
            Self::BadDigest { reason } => Some(reason.clone()),
            Self::AuditTriggerMisdefined { reason } => Some((*reason).to_string()),
            Self::PhiInvalidText { reason } => Some((*reason).to_string()),
            Self::Spi { reason, .. } => Some(reason.clone()),
            Self::PhiAuthentication => Some(
                "The envelope was altered, belongs to another tenant or column label, or was sealed with a different key."
                    .into(),
            ),
            Self::HoldableCursor => Some(
                "A WITH HOLD cursor keeps rows read under one tenant after its transaction ends."
                    .into(),
            ),
            _ => None,
        }
    }

    /// What the reader can do about it.
    pub(crate) fn hint(&self) -> Option<&'static str> {
        match self {
            Self::NotPreloaded => Some(
                "Add pg_tenancy to shared_preload_libraries in postgresql.conf and restart the server.",
            ),
            Self::OutsideTransaction => Some(
                "Run BEGIN first: the tenant context lasts exactly one transaction.",
            ),
            Self::RevealNotRecorded { .. } => Some(
                "Nothing was revealed. Retry; if it keeps failing, see tenancy.audit_status and the server log.",
            ),
            Self::BadDigest { .. } => Some(
                "Pass the digest column of a row tenancy.audit_digest() returned, unchanged.",
            ),
            Self::ShardWeakening { .. } => Some(
                "Change the distributed table on the coordinator, where pg_tenancy's guards check the change; shards follow it.",
            ),
            Self::ClusterContextRefused { .. } => Some(
                "Only tenancy.set_org() on the Citus coordinator hands a tenant context to a worker.",
            ),
            Self::EventOfOtherTenant { .. } => Some(
                "The audit trigger files each event under its column's value, which row level security must check: compare the trigger's argument with the tenant floor policy's column (SELECT * FROM tenancy.isolation_report()).",
            ),
            Self::ShardCopyRefused { .. } => Some(
                "It copies rows as the calling role, and row level security would let it copy none of a protected table's (their shard then dropped): run it as a superuser.",
            ),
            Self::BadTenantIdFormat => Some(
                "SELECT tenancy.set_tenant_id_format('text'), or 'uuid', or NULL to leave it to tenancy.tenant_id_format.",
            ),
            Self::BadOutboxRequest { .. } => Some(
                "It is called by the coordinator's audit sealer; nothing was changed.",
            ),
            Self::NotACitusWorker { .. } => Some(
                "The coordinator's audit sealer calls it on its workers; on a coordinator, events are sealed where they are.",
            ),
            Self::ClusterKeyMissing => Some(
                "Set tenancy.cluster_key_file to the same key file on every node of the cluster (see docs/scale-out.md) and reload.",
            ),
            Self::TrailMaintenance { .. } => Some(
                "Autovacuum maintains them; name your own tables, or ask a superuser (their locks hold up every audited write and the audit workers).",
            ),
            Self::NullTenant | Self::EmptyTenant | Self::NoTenant => Some(
                "Call tenancy.set_org('<tenant id>') at the start of the transaction.",
            ),
            Self::MalformedTenant { .. } => Some(
                "Tenant ids are UUIDs unless tenancy.tenant_id_format is 'text'.",
            ),
            Self::MalformedActor { .. } => {
                Some("Actor ids are 1 to 128 printable characters without quotes or spaces.")
            }
            Self::TenantAlreadySet | Self::ActorAlreadySet => Some(
                "Commit or roll back, then enter the other tenant in a new transaction.",
            ),
            Self::TokenRequired | Self::TokenMalformed { .. } | Self::TokenInvalid => Some(
                "Signed mode is on (tenancy.context_key_file): pass the token minted by the application tier.",
            ),
            Self::TokenExpired => Some("Mint a fresh token for this transaction."),
            Self::TokenReplayed => Some(
                "Tokens are single-use: mint one per transaction (and send it as a bind parameter, so it never shows in pg_stat_activity).",
            ),
            Self::TokenMemoryFull => Some(
                "Used tokens are remembered until they expire (65,536 at once, shared memory; signed mode needs pg_tenancy in shared_preload_libraries): mint tokens with shorter expiries.",
            ),
            Self::KeyFile { .. } => Some(
                "The file must hold the key in hex, belong to the server's OS user and have mode 0600 or 0400; then reload the configuration.",
            ),
            Self::HoldableCursor => Some("Declare the cursor WITHOUT HOLD and fetch it before COMMIT."),
            Self::NotATable { .. } => Some("Protect the table the view or index belongs to."),
            Self::NoTenantColumn { .. } => Some(
                "Name the tenant column: tenancy.protect('t', tenant_column => 'org_id').",
            ),
            Self::TenantColumnType { .. } => {
                Some("Tenant columns are uuid (tenancy.current_org_id()) or text.")
            }
            Self::TenantColumnCollation { .. } => Some(
                "Ids that differ only in case or accents would be one tenant: give the column a deterministic collation (COLLATE \"C\").",
            ),
            Self::NotProtected { .. } => Some("See tenancy.protected_tables for what is protected."),
            Self::AuditTriggerMisdefined { .. } => {
                Some("Let tenancy.protect('<table>', audit => true) attach the audit triggers.")
            }
            Self::SuperuserOnly { .. } => Some("Run it as the superuser that installed pg_tenancy."),
            Self::PhiNotConfigured => Some(
                "Set tenancy.phi_key_file in postgresql.conf to the key ring file and reload.",
            ),
            Self::PhiKeyFile { .. } => Some(
                "Fix the file (owner: the server's OS user, mode 0600 or 0400, format in docs/phi.md), then reload; SELECT * FROM tenancy.phi_key_status() shows the state.",
            ),
            Self::PhiMalformed { .. } => Some("PHI columns hold what tenancy.phi_encrypt() returned."),
            Self::PhiUnknownKey { .. } => Some(
                "Add the retired key back to the key ring file (without marking it active) and reload.",
            ),
            Self::PhiAuthentication => Some(
                "Reveal values only in the tenant (and with the label) they were encrypted for.",
            ),
            Self::PhiWrongType { .. } => {
                Some("Use tenancy.phi_reveal, phi_reveal_bytea or phi_reveal_jsonb to match.")
            }
            Self::PhiBadLabel => Some("Use a short label such as 'patients.phone', or NULL."),
            Self::PhiWhileStoring => Some(
                "ANALYZE, CREATE INDEX, REINDEX and CLUSTER would store plaintext at rest; drop statistics or indexes on decrypted values.",
            ),
            Self::BadAction => Some("Action names are 1 to 64 letters, digits, '_', '.', ':' or '-'."),
            Self::RewriteInDdl => Some(
                "It rewrites every tenant's values with an expression of your choice: ask a superuser, or change the type without USING.",
            ),
            Self::ForeignCodeInDdl { .. } => Some(
                "Utility commands read every tenant's rows: on protected tables they run only built-in functions and functions a superuser owns. Ask a superuser to run it, or to own the function after review.",
            ),
            Self::SessionObject { .. } => Some(
                "Session-lived state would carry this tenant's rows into the next transaction on the connection: create temporary tables inside the tenant transaction with ON COMMIT DROP, and keep large objects out of tenant transactions.",
            ),
            Self::ReservedAction { .. } => Some(
                "Names of only capital letters and '_' (INSERT, REVEAL, SUPPORT_READ, ...) are the trail's own; name application actions like 'export.csv'.",
            ),
            Self::RevealNotAudited { .. } => Some(
                "Set tenancy.audit_database to this database in postgresql.conf and restart; every reveal is recorded there.",
            ),
            Self::OtherTenant { .. } => Some(
                "Call it in a transaction of that tenant (tenancy.set_org), or as a superuser.",
            ),
            Self::NullArgument { .. } => Some("See docs/reference.md for the function's arguments."),
            Self::UndefinedTable { .. } => Some("Name the table as schema.table; check search_path."),
            Self::PhiInvalidText { .. } | Self::PhiInvalidJson => Some(
                "The envelope is authentic but was not sealed by tenancy.phi_encrypt from a value of this type: fix the application code that wrote it (docs/phi.md, content types).",
            ),
            Self::SessionSettingForOthers { .. } => Some(
                "It decides which code every session of the database runs, superusers' included: ask a superuser (set search_path in the application's connection instead).",
            ),
            Self::DetailsTooDeep => Some("Flatten the details object: it is stored as JSON in the audit trail."),
            Self::Spi { .. } => Some("This is a bug in pg_tenancy: please report it with the statement that failed."),
        }
    }

    /// An SPI call of pg_tenancy's own that failed (a bug, not bad input).
    pub(crate) fn spi(what: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Spi {
            what,
            reason: e.to_string(),
        }
    }

    /// Raises this error as a Postgres ERROR (the current transaction aborts).
    pub(crate) fn report(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "pg_tenancy");
        if let Some(detail) = self.detail() {
            report = report.set_detail(detail);
        }
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        // ERROR never returns: Postgres longjmps (pgrx unwinds) out of the call.
        unreachable!("ereport(ERROR) returned")
    }
}

/// `Result` for fallible pg_tenancy code; raise with [`Raise::or_raise`].
pub(crate) type Result<T> = std::result::Result<T, TenancyError>;

/// Turns a `Result` into the value or a Postgres ERROR.
pub(crate) trait Raise<T> {
    fn or_raise(self) -> T;
}

impl<T> Raise<T> for Result<T> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.report())
    }
}

#[cfg(test)]
mod tests;
