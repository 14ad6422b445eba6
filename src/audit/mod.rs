//! The audit trail: every audited change and operator action becomes one
//! `tenancy.audit_events` row, filed under the tenant of the row written (never the context),
//! with the change payload encrypted under the PHI key ring (bound to the tenant and the
//! event id) and a per-tenant SHA-256 hash chain that `tenancy.audit_verify` checks.
//!
//! Writers of one tenant serialise on that tenant's row in `tenancy.audit_chain_heads`;
//! different tenants never wait on each other. The statements are prepared once per backend.
//!
//! * [`chain`]: what an event's hash covers (a leaf).
//! * [`writer`]: appending events, chain heads and tips, who wrote them.
//! * `trigger`: the audit trigger over audited tables.
//! * `admin`: `log_action`, `audit_payload`, `audit_verify`, `audit_purge`, `audit_history`.

pub(crate) mod admin;
pub(crate) mod chain;
mod trigger;
pub(crate) mod writer;

pub(crate) use writer::{at_sub_end, at_xact_end};
