//! Ends of transactions and subtransactions, for every module that keeps per-transaction
//! state. The one place that registers PostgreSQL's callbacks: the owners of that state hand
//! in their handlers once, from `_PG_init`, and they run in the order given there (lib.rs).
//! A leaf: it names no other module.

use pgrx::prelude::*;
use std::ffi::c_void;
use std::sync::OnceLock;

/// How a top-level transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// COMMIT.
    Commit,
    /// PREPARE TRANSACTION.
    Prepare,
    /// ROLLBACK or an error.
    Abort,
    /// A parallel worker's share of the transaction ended (commit or abort).
    ParallelWorker,
}

/// How a subtransaction (savepoint, exception block) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubEnd {
    Commit,
    Abort,
}

/// What one owner of per-transaction state does at the ends.
pub(crate) struct Handler {
    pub at_end: Option<fn(End)>,
    /// Called with the nesting level of the ending subtransaction (2 = first savepoint).
    pub at_sub_end: Option<fn(SubEnd, i32)>,
}

static HANDLERS: OnceLock<&'static [Handler]> = OnceLock::new();

/// Registers the callbacks; `handlers` run in this order at every end. Called once.
pub(crate) fn init(handlers: &'static [Handler]) {
    if HANDLERS.set(handlers).is_err() {
        return; // loaded twice into one process: the first registration stands
    }
    // SAFETY: registered once, at library load, on the backend's (or postmaster's) only thread.
    unsafe {
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
    }
}

fn handlers() -> &'static [Handler] {
    HANDLERS.get().copied().unwrap_or(&[])
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    let end = match event {
        XACT_EVENT_COMMIT => End::Commit,
        XACT_EVENT_PREPARE => End::Prepare,
        XACT_EVENT_ABORT => End::Abort,
        XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PARALLEL_ABORT => End::ParallelWorker,
        _ => return,
    };
    for h in handlers() {
        if let Some(f) = h.at_end {
            f(end);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    _my_subid: pg_sys::SubTransactionId,
    _parent_subid: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    let end = match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => SubEnd::Abort,
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => SubEnd::Commit,
        _ => return,
    };
    // During the callback the ending subtransaction is still the current one.
    let level = pg_sys::GetCurrentTransactionNestLevel();
    for h in handlers() {
        if let Some(f) = h.at_sub_end {
            f(end, level);
        }
    }
}
