//! One audit event before it is written, who writes it, and the identities both chain
//! formats share (event ids, payload labels). A leaf of the audit module.

use super::chain::Body;
use crate::error::TenancyError;
use pgrx::prelude::*;

/// `n` values of `tenancy.audit_event_id`, without a query: the sequence is looked up once,
/// then the builtin nextval(regclass) is called per value.
pub(super) fn next_event_ids(n: usize) -> Vec<i64> {
    // SAFETY: catalog lookups by name (the namespace lookup raises if the schema is missing).
    let seq = unsafe {
        let ns = pg_sys::get_namespace_oid(c"tenancy".as_ptr(), false);
        pg_sys::get_relname_relid(c"audit_event_id".as_ptr(), ns)
    };
    if seq == pg_sys::InvalidOid {
        TenancyError::UndefinedTable {
            name: "tenancy.audit_event_id".into(),
        }
        .report();
    }
    // On a Citus worker, ids of its own range (its group in the top bits, as Citus does for
    // sequences): its events join the coordinator's trail (super::cluster) under their ids.
    let base = super::cluster::event_id_base();
    (0..n)
        .map(|_| {
            // SAFETY: nextval(regclass) on the sequence found above.
            unsafe { pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[seq.into_datum()]) }
                .expect("nextval returns a value")
                + base
        })
        .collect()
}

/// One event to append.
pub(crate) struct NewEvent {
    pub org: String,
    pub action: String,
    pub table_name: Option<String>,
    pub row_key: Option<String>,
    pub changed_columns: Option<Vec<String>>,
    pub payload: Option<serde_json::Value>,
}

/// A text[] literal of `items` (every element quoted), for one cell of a batch.
pub(super) fn array_literal(items: &[String]) -> String {
    let mut s = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('"');
        for ch in item.chars() {
            if ch == '"' || ch == '\\' {
                s.push('\\');
            }
            s.push(ch);
        }
        s.push('"');
    }
    s.push('}');
    s
}

impl NewEvent {
    /// What both hash formats cover of this event and its writer.
    pub(super) fn body<'a>(&'a self, who: &'a Who) -> Body<'a> {
        Body {
            actor: who.actor.as_deref(),
            actor_verified: who.actor_verified,
            session_role: &who.session_role,
            outer_role: &who.outer_role,
            action: &self.action,
            table_name: self.table_name.as_deref(),
            row_key: self.row_key.as_deref(),
            changed_columns: self.changed_columns.as_deref(),
        }
    }
}

/// Who wrote an event, and when.
pub(crate) struct Who {
    pub actor: Option<String>,
    pub actor_verified: bool,
    pub session_role: String,
    pub outer_role: String,
    pub occurred_at: i64,
}

impl Who {
    /// The current session's actor, roles and clock.
    pub(crate) fn current() -> Who {
        let (actor, actor_verified) = crate::context::current_actor_and_verified();
        // SAFETY: plain reads of the current roles and clock.
        unsafe {
            Who {
                actor,
                actor_verified,
                session_role: role_name(pg_sys::GetSessionUserId()),
                outer_role: role_name(pg_sys::GetOuterUserId()),
                occurred_at: pg_sys::GetCurrentTimestamp(),
            }
        }
    }
}

/// A role's name (or its oid when it was dropped).
pub(crate) fn role_name(oid: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId with noerr=true returns NULL for a dropped role.
    unsafe {
        let p = pg_sys::GetUserNameFromId(oid, true);
        if p.is_null() {
            format!("oid {}", u32::from(oid))
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// The label an event's payload is bound to.
pub(crate) fn payload_label(event_id: i64) -> String {
    format!("tenancy.audit_events:{event_id}")
}
