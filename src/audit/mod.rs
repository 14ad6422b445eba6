//! The audit trail: every audited change and operator action becomes one
//! `tenancy.audit_events` row, filed under the tenant of the row written (never the context),
//! with the change payload encrypted under the PHI key ring (bound to the tenant and the
//! event id) and a per-tenant SHA-256 hash chain that `tenancy.audit_verify` checks.
//!
//! Writers never wait for each other: each event is hashed alone when written, and the
//! sealer links committed events into per-tenant blocks afterwards. The statements are
//! prepared once per backend.
//!
//! * [`chain`]: what an event's and a block's hash cover (a leaf).
//! * [`writer`]: appending events and their pending rows, who wrote them.
//! * `event`: an event before it is written, who writes it (a leaf).
//! * `legacy`: the 0.2.0 writer, for objects not updated yet.
//! * [`sealer`]: sealing committed events into blocks (the background worker, `audit_seal`).
//! * `cluster`: one trail on a Citus cluster's coordinator, gathered from its workers.
//! * `trigger`: the audit trigger over audited tables.
//! * `admin`: `log_action`, `audit_payload`, `audit_verify`, `audit_purge`, `audit_history`.

pub(crate) mod admin;
pub(crate) mod chain;
mod cluster;
pub(crate) mod digest;

mod direct;
mod event;
mod legacy;
pub(crate) mod sealer;
mod trigger;
pub(crate) mod writer;

pub(crate) use writer::{at_sub_end, at_xact_end};
