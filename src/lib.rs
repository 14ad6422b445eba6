//! pg_tenancy: multi-tenancy enforced inside PostgreSQL.
//!
//! The front door: module magic, the module list and `_PG_init`. Modules form one-way
//! layers (no module reaches back up):
//!
//! * leaves: [`error`], [`keyfile`], [`crypto::envelope`], [`crypto::keyring`],
//!   [`audit::chain`], [`xact`] (transaction ends), [`gucs`] (settings), [`preload`],
//!   [`jsonb`] (jsonb datums as exact text);
//! * rules: [`ids`] (tenant, actor, label), [`token`] (signed mode);
//! * state: [`context`] (the tenant of the transaction), [`crypto`] (key ring, seal/open);
//! * SQL surface: [`phi`], [`audit`] (writer, trigger, admin functions), [`reveal_log`]
//!   (reveal queue) and [`reveal_worker`], [`policy`] (protect/unprotect);
//! * hooks: [`utility`] (ProcessUtility, ExecutorStart, object access), [`owner_ddl`],
//!   [`session_objects`].

use pgrx::prelude::*;

pub(crate) mod audit;
pub(crate) mod citus;
pub(crate) mod context;
pub(crate) mod crypto;
pub(crate) mod error;
#[cfg(test)]
mod fuzz;
pub(crate) mod gucs;
pub(crate) mod ids;
pub(crate) mod jsonb;
pub(crate) mod keyfile;
pub(crate) mod owner_ddl;
pub(crate) mod phi;
pub(crate) mod policy;
pub(crate) mod preload;
#[cfg(test)]
mod props;
pub(crate) mod reveal_log;
pub(crate) mod reveal_worker;
pub(crate) mod session_objects;
pub(crate) mod tenant_format;
pub(crate) mod token;
pub(crate) mod utility;
pub(crate) mod xact;

::pgrx::pg_module_magic!(name, version);

// The schema `tenancy` is created by CREATE EXTENSION from the control file; this names it
// for pgrx so every function below lands there.
extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!(
    "../sql/registry.sql",
    name = "registry",
    requires = ["bootstrap"]
);
extension_sql_file!(
    "../sql/guards.sql",
    name = "guards",
    requires = ["registry", "audit", policy::protect, policy::in_maintenance]
);
extension_sql_file!("../sql/report.sql", name = "report", requires = ["guards"]);
extension_sql_file!(
    "../sql/phi.sql",
    name = "phi",
    requires = [
        "bootstrap",
        phi::phi_is_envelope,
        phi::phi_key_id,
        phi::phi_rotate_for_tenant
    ]
);
extension_sql_file!(
    "../sql/audit.sql",
    name = "audit",
    requires = [
        "bootstrap",
        audit::admin::audit_payload,
        context::require_org_text,
        context::current_org_id_text
    ]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// Called once when the library is loaded: by the postmaster when `pg_tenancy` is in
/// `shared_preload_libraries` (the supported way), or lazily by a backend otherwise.
///
/// Order: backtraces off before anything can fail; whether we are preloaded (settings and
/// shared memory depend on it); settings, with their owners' assign hooks; the tenant
/// context's mirror setting; the executor hooks; the reveal queue (shared memory) and its
/// worker; the DDL guard's hooks; the used-token memory; the transaction-end handlers. Hooks
/// chain to whatever was installed before, so their order among themselves does not matter.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    no_backtraces();
    preload::init();
    // Before gucs::init, which reserves the tenancy. prefix (a placeholder of a setting not
    // defined yet would be removed, with a WARNING, and its value lost).
    citus::define_gucs();
    gucs::init(
        preload::is_preloaded(),
        gucs::AssignHooks {
            context_key_file: token::context_key_file_assigned,
            phi_key_file: crypto::phi_key_file_assigned,
        },
    );
    context::define_mirror_guc();
    citus::init_log_redaction();
    citus::restrict_remote_command_logging();
    utility::init();
    reveal_log::init();
    tenant_format::init();
    reveal_worker::init();
    owner_ddl::init();
    token::init();
    // Per-transaction state of each owner, cleared at every end in this order: the reveal
    // records leave for the shared queue first (they name the tenant, but need no context),
    // then the context, the audit chain tips, and the statement-scoped flags.
    static AT_END: &[xact::Handler] = &[
        xact::Handler {
            at_end: Some(reveal_log::at_xact_end),
            at_sub_end: None,
        },
        xact::Handler {
            at_end: Some(context::at_xact_end),
            at_sub_end: Some(context::at_sub_end),
        },
        xact::Handler {
            at_end: Some(audit::at_xact_end),
            at_sub_end: Some(audit::at_sub_end),
        },
        xact::Handler {
            at_end: Some(phi::at_xact_end),
            at_sub_end: None,
        },
        xact::Handler {
            at_end: Some(owner_ddl::at_xact_end),
            at_sub_end: None,
        },
        xact::Handler {
            at_end: Some(tenant_format::at_xact_end),
            at_sub_end: None,
        },
    ];
    xact::init(AT_END);
}

/// pgrx's panic hook captures a Rust backtrace for every error that crosses Rust frames, and
/// reports it in the error's DETAIL when `RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` is set in
/// the server's environment: 4 KB of build paths to any client, for any failed statement that
/// passed through a hook. `RUST_LIB_BACKTRACE=0` takes precedence over both and switches
/// capturing off; this library's std reads it on its first capture, which has not happened
/// yet. Set in the postmaster (preloaded), it is inherited by every backend it forks.
fn no_backtraces() {
    // SAFETY: _PG_init runs on Postgres's only thread (postmaster or backend), before any
    // thread of this library could read the environment.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
}

/// Required by `cargo pgrx test`: cluster settings for the in-database test cluster.
#[cfg(test)]
pub(crate) mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_tenancy'"]
    }
}
