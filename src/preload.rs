//! Whether the library was loaded through `shared_preload_libraries`.
//!
//! The tenant context refuses forged values from the startup packet and reserves its setting
//! prefix, and later the key ring is read by the postmaster: all of that only works when the
//! postmaster loads the library. Loaded any other way, every entry point refuses to run.

use crate::error::TenancyError;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set in the postmaster during `_PG_init`; forked backends inherit it.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Records how the library is being loaded. Called first thing in `_PG_init`.
pub(crate) fn init() {
    // SAFETY: a plain read of a postmaster global, on the main thread during library load.
    let in_preload = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    PRELOADED.store(in_preload, Ordering::Relaxed);
}

/// True when the postmaster loaded the library from `shared_preload_libraries`.
pub(crate) fn is_preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Raises the documented error unless the library was preloaded.
pub(crate) fn require_preload() {
    if !is_preloaded() {
        TenancyError::NotPreloaded.report();
    }
}

/// Fails unless `pg_tenancy` is in `shared_preload_libraries`. CREATE EXTENSION calls it, so
/// the extension cannot be installed into a server that would run it half-protected.
#[pg_extern(volatile, parallel_safe)]
fn assert_preloaded() -> bool {
    require_preload();
    true
}

/// Whether `pg_tenancy` was loaded through `shared_preload_libraries` in this server.
#[pg_extern(stable, strict, parallel_safe)]
fn is_loaded_by_preload() -> bool {
    is_preloaded()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn test_preloaded_in_test_cluster() {
        assert!(super::is_preloaded());
        let via_sql = Spi::get_one::<bool>("SELECT tenancy.is_loaded_by_preload()").unwrap();
        assert_eq!(via_sql, Some(true));
    }
}
