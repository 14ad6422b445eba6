//! The format of a database's tenant ids (`uuid` or `text`), stored once per database in
//! `tenancy.database_settings` by `tenancy.set_tenant_id_format()` and taking effect in every
//! backend at its next `set_org`, pooled ones included: each backend keeps the value with the
//! generation it read it at, and a change moves a generation counter in shared memory (one
//! atomic read per `set_org`; the table is read again only when it moved). Without a row the
//! setting `tenancy.tenant_id_format` decides, as before (read when the backend starts: a
//! pooler's open connections keep an old value, which is why the table exists).

use crate::error::TenancyError;
use crate::gucs::TenantIdFormat;
use pgrx::prelude::*;
use pgrx::PgAtomic;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

// SAFETY: the name is unique to this library; pg_shmem_init! in init() sets it up.
static GENERATION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_tenancy_tenant_id_format") };

thread_local! {
    /// (generation read at, the database's stored format or None for no row).
    static CACHED: Cell<Option<(u64, Option<TenantIdFormat>)>> = const { Cell::new(None) };
    /// This transaction changed the stored format: move the generation at its commit too.
    static CHANGED: Cell<bool> = const { Cell::new(false) };
}

/// Sets up the shared counter; only from `_PG_init` under preload.
pub(crate) fn init() {
    if !crate::preload::is_preloaded() {
        return;
    }
    pgrx::pg_shmem_init!(GENERATION);
}

fn generation() -> u64 {
    if !crate::preload::is_preloaded() {
        return 0;
    }
    GENERATION.get().load(Ordering::Acquire)
}

fn bump() {
    if crate::preload::is_preloaded() {
        GENERATION.get().fetch_add(1, Ordering::AcqRel);
    }
}

/// The format `set_org` validates tenant ids by now.
pub(crate) fn current() -> TenantIdFormat {
    let now = generation();
    let stored = match CACHED.with(Cell::get) {
        Some((at, stored)) if at == now => stored,
        _ => {
            let stored = read_stored();
            CACHED.with(|c| c.set(Some((now, stored))));
            stored
        }
    };
    stored.unwrap_or_else(crate::gucs::tenant_id_format)
}

/// The database's row, if any (None too where the table does not exist yet: the extension's
/// objects older than the library).
fn read_stored() -> Option<TenantIdFormat> {
    let exists = Spi::get_one::<bool>(
        "SELECT pg_catalog.to_regclass('tenancy.database_settings') IS NOT NULL",
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !exists {
        return None;
    }
    match Spi::get_one::<String>("SELECT tenant_id_format FROM tenancy.database_settings")
        .ok()
        .flatten()
        .as_deref()
    {
        Some("text") => Some(TenantIdFormat::Text),
        Some("uuid") => Some(TenantIdFormat::Uuid),
        _ => None,
    }
}

/// End of the transaction: a committed change reaches every backend.
pub(crate) fn at_xact_end(end: crate::xact::End) {
    if CHANGED.with(|c| c.replace(false)) && matches!(end, crate::xact::End::Commit) {
        bump();
    }
    if !matches!(end, crate::xact::End::Commit) {
        CACHED.with(|c| c.set(None));
    }
}

/// Sets this database's tenant id format, `'uuid'` or `'text'`, for every session at its next
/// `set_org` (pooled connections included); NULL goes back to `tenancy.tenant_id_format`.
/// Superuser; recorded in `tenancy.protection_log`.
#[pg_extern(volatile, parallel_unsafe)]
fn set_tenant_id_format(format: Option<&str>) -> Option<String> {
    // SAFETY: superuser() only reads the current role.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::SuperuserOnly {
            what: "set_tenant_id_format",
        }
        .report();
    }
    if !matches!(format, None | Some("uuid") | Some("text")) {
        TenancyError::BadTenantIdFormat.report();
    }
    Spi::connect_mut(|client| -> pgrx::spi::SpiResult<()> {
        client.update("DELETE FROM tenancy.database_settings", None, &[])?;
        if let Some(f) = format {
            client.update(
                "INSERT INTO tenancy.database_settings (tenant_id_format) VALUES ($1)",
                None,
                &[f.into()],
            )?;
        }
        client.update(
            "INSERT INTO tenancy.protection_log (action, object, detail)
             VALUES ('tenant_id_format', pg_catalog.current_database(), coalesce($1, 'tenancy.tenant_id_format decides'))",
            None,
            &[format.into()],
        )?;
        Ok(())
    })
    .unwrap_or_else(|e| TenancyError::spi("setting the tenant id format", e).report());
    CHANGED.with(|c| c.set(true));
    bump();
    format.map(str::to_string)
}
