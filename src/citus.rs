//! Citus: what pg_tenancy does differently when the database is a Citus cluster's.
//!
//! * **Shard floors stay RESTRICTIVE.** Citus re-creates a distributed table's policies on its
//!   shards from its own deparser, which never writes `AS RESTRICTIVE` (Citus 14.0.1): on the
//!   shards the tenant floor became PERMISSIVE, and one unrelated permissive policy opened every
//!   tenant's rows. Every node refuses that outcome at the statement: a `CREATE POLICY` of
//!   pg_tenancy's floor is always made RESTRICTIVE ([`force_floor_restrictive`]), whoever sends
//!   it (Citus creating, moving or splitting a shard, or anyone else).
//! * **Policies Citus accepts.** Citus refuses subqueries in policies of distributed tables, so
//!   in a database with Citus `protect` writes `tenant_col = tenancy.current_org_id()` instead
//!   of the InitPlan form; both are pg_tenancy's definitions for the guards and the report.
//! * `isolation_report()` on the coordinator checks every shard placement (sql/citus.sql).
//!
//! Everything here is by name and catalog: nothing links against Citus.

use pgrx::prelude::*;
use std::ffi::CStr;

/// The tenant floor policy's name (policy.rs creates it).
pub(crate) const FLOOR_POLICY: &CStr = c"tenancy_tenant_floor";

/// A `CREATE POLICY` of the tenant floor is made RESTRICTIVE before it runs.
///
/// SAFETY: `stmt` is a parse tree node (or NULL) the caller is about to execute.
pub(crate) unsafe fn force_floor_restrictive(stmt: *mut pg_sys::Node) {
    if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_CreatePolicyStmt {
        return;
    }
    let create = stmt.cast::<pg_sys::CreatePolicyStmt>();
    if (*create).permissive
        && !(*create).policy_name.is_null()
        && CStr::from_ptr((*create).policy_name) == FLOOR_POLICY
    {
        (*create).permissive = false;
    }
}

/// Whether the Citus extension is installed in the current database.
pub(crate) fn installed() -> bool {
    Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'citus')",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Whether `rel` is a Citus table (distributed, reference or in Citus's metadata). Only asked
/// when [`installed`] is true (pg_dist_partition exists then).
pub(crate) fn is_citus_table(rel: pg_sys::Oid) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid OPERATOR(pg_catalog.=) $1)",
        &[rel.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}
