//! Row level security generated, not hand-written: `protect`, `protect_all`, `unprotect`.
//!
//! `protect` turns a table with a tenant column into a tenant table: RLS enabled and forced,
//! a RESTRICTIVE tenant floor plus a permissive tenant policy (USING and WITH CHECK, every
//! command), the tenant column defaulting to the current tenant and immutable, TRUNCATE
//! refused, an index led by the tenant column, partitions and inheritance children covered,
//! and a row in `tenancy.protected_tables`. The predicate is
//! `tenant_col = (SELECT tenancy.current_org_id())`: the uncorrelated subquery becomes an
//! InitPlan, evaluated once per execution of the query, so every plan shape pays for the
//! tenant once: index scans (the value is an index key), sequential scans, hash joins and
//! reports (the bare function call, STABLE but not constant, ran once per row there).
//! `bench/RESULTS.md` has both forms side by side.
//!
//! The drift guards (sql/guards.sql) refuse every other way of weakening a protected table;
//! they let these functions through while [`in_maintenance`] is true.

use crate::error::{Raise, TenancyError};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use std::cell::Cell;

thread_local! {
    /// True while protect/unprotect run their DDL, so the drift guards let it through.
    static MAINTENANCE: Cell<bool> = const { Cell::new(false) };
}

/// Quotes an SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What `protect` needs to know about one table.
struct Target {
    schema: String,
    name: String,
    tenant_type: &'static str,
    has_tenant_index: bool,
    /// A partition inherits the parent's row triggers as clones, which cannot be dropped.
    is_partition: bool,
    /// pg_tenancy's policies and triggers already on the table (re-created by protect).
    existing: Vec<String>,
    children: Vec<pg_sys::Oid>,
    /// The database has Citus: policies without subqueries (Citus refuses them on
    /// distributed tables).
    citus: bool,
    /// A Citus table: its distribution column's default cannot change.
    distributed: bool,
}

fn require_superuser(what: &'static str) {
    // SAFETY: superuser() only reads the current role.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::SuperuserOnly { what }.report();
    }
}

fn load_target(rel: pg_sys::Oid, column: &str) -> Target {
    let row = Spi::connect(|client| -> SpiResult<_> {
        let t = client.select(
            "SELECT n.nspname::text, c.relname::text, c.relkind::text,
                    (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attname = $2 AND NOT a.attisdropped),
                    EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a
                              ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                             WHERE i.indrelid = c.oid AND a.attname = $2),
                    ARRAY(SELECT inhrelid FROM pg_inherits WHERE inhparent = c.oid ORDER BY inhrelid),
                    c.relispartition,
                    (SELECT co.collname::text FROM pg_attribute a JOIN pg_collation co ON co.oid = a.attcollation
                      WHERE a.attrelid = c.oid AND a.attname = $2 AND NOT a.attisdropped AND NOT co.collisdeterministic),
                    ARRAY(SELECT polname::text FROM pg_policy WHERE polrelid = c.oid AND polname IN ('tenancy_tenant_floor', 'tenancy_tenant_rows')
                          UNION ALL
                          SELECT tgname::text FROM pg_trigger WHERE tgrelid = c.oid AND tgname IN ('tenancy_tenant_immutable', 'tenancy_no_truncate', 'tenancy_audit', 'tenancy_audit_lock', 'tenancy_audit_insert', 'tenancy_audit_update', 'tenancy_audit_delete') AND tgparentid = 0)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            None,
            &[rel.into(), column.into()],
        )?;
        let r = t.first();
        Ok((
            r.get::<String>(1)?,
            r.get::<String>(2)?,
            r.get::<String>(3)?,
            r.get::<String>(4)?,
            r.get::<bool>(5)?,
            r.get::<Vec<pg_sys::Oid>>(6)?,
            r.get::<bool>(7)?,
            r.get::<Vec<String>>(9)?,
            r.get::<String>(8)?,
        ))
    })
    .unwrap_or_else(|e| TenancyError::spi("reading the catalog", e).report());
    let (Some(schema), Some(name), Some(kind)) = (row.0, row.1, row.2) else {
        TenancyError::UndefinedTable {
            name: format!("with oid {}", rel.to_u32()),
        }
        .report()
    };
    if kind != "r" && kind != "p" {
        TenancyError::NotATable {
            relation: format!("{schema}.{name}"),
        }
        .report();
    }
    let tenant_type = match row.3.as_deref() {
        Some("uuid") => "uuid",
        Some("text") => "text",
        Some(other) => TenancyError::TenantColumnType {
            relation: format!("{schema}.{name}"),
            column: column.to_string(),
            found: other.to_string(),
        }
        .report(),
        None => TenancyError::NoTenantColumn {
            relation: format!("{schema}.{name}"),
            column: column.to_string(),
        }
        .report(),
    };
    // A case-insensitive (nondeterministic) collation makes `=` merge tenants whose ids differ
    // only in case or accents: `ACME-Health` would read `acme-health`'s rows.
    if let Some(collation) = row.8 {
        TenancyError::TenantColumnCollation {
            relation: format!("{schema}.{name}"),
            column: column.to_string(),
            collation,
        }
        .report();
    }
    let citus = crate::citus::installed();
    Target {
        distributed: citus && crate::citus::is_citus_table(rel),
        citus,
        schema,
        name,
        tenant_type,
        has_tenant_index: row.4.unwrap_or(false),
        children: row.5.unwrap_or_default(),
        is_partition: row.6.unwrap_or(false),
        existing: row.7.unwrap_or_default(),
    }
}

/// The audit triggers, all FOR EACH STATEMENT: (name, timing and events, transition tables).
/// One per event type because PostgreSQL allows transition tables only on single-event
/// triggers. Statement triggers are not cloned to partitions, so every table gets its own.
const AUDIT_TRIGGERS: [(&str, &str, &str); 3] = [
    (
        "tenancy_audit_insert",
        "AFTER INSERT",
        "REFERENCING NEW TABLE AS tenancy_new ",
    ),
    (
        "tenancy_audit_update",
        "AFTER UPDATE",
        "REFERENCING OLD TABLE AS tenancy_old NEW TABLE AS tenancy_new ",
    ),
    (
        "tenancy_audit_delete",
        "AFTER DELETE",
        "REFERENCING OLD TABLE AS tenancy_old ",
    ),
];

/// Audit triggers of earlier versions, dropped when a table is protected again: 0.1.0's row
/// trigger, 0.2.0's BEFORE STATEMENT trigger that took the chain head lock.
const OLD_AUDIT_TRIGGERS: [&str; 2] = ["tenancy_audit", "tenancy_audit_lock"];

/// The statements that protect one table (not its children).
fn protect_statements(t: &Target, column: &str, set_default: bool, audit: bool) -> Vec<String> {
    let table = format!("{}.{}", ident(&t.schema), ident(&t.name));
    let col = ident(column);
    let (current, require) = match t.tenant_type {
        "uuid" => ("tenancy.current_org_id()", "tenancy.require_org()"),
        _ => (
            "tenancy.current_org_id_text()",
            "tenancy.require_org_text()",
        ),
    };
    // An InitPlan: the tenant is read once per execution of the query, never per row (a
    // sequential scan called the bare function for every row: 17x the floor on a report).
    // sql/guards.sql (protection_problem) expects exactly this form.
    // Citus refuses subqueries in the policies of distributed tables: there the bare call
    // (STABLE, evaluated per row in a sequential scan; an index key in an index scan).
    let pred = if t.citus {
        format!("{col} = {current}")
    } else {
        format!("{col} = (SELECT {current})")
    };
    let mut s = vec![
        format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"),
        format!("ALTER TABLE {table} FORCE ROW LEVEL SECURITY"),
    ];
    // Re-running protect re-creates its own objects, so a drifted definition is repaired.
    let recreate = |s: &mut Vec<String>, kind: &str, name: &str, create: String| {
        if t.existing.iter().any(|e| e == name) {
            s.push(format!("DROP {kind} {name} ON {table}"));
        }
        s.push(create);
    };
    recreate(
        &mut s,
        "POLICY",
        "tenancy_tenant_floor",
        format!(
            "CREATE POLICY tenancy_tenant_floor ON {table} AS RESTRICTIVE FOR ALL TO PUBLIC USING ({pred}) WITH CHECK ({pred})"
        ),
    );
    recreate(
        &mut s,
        "POLICY",
        "tenancy_tenant_rows",
        format!(
            "CREATE POLICY tenancy_tenant_rows ON {table} AS PERMISSIVE FOR ALL TO PUBLIC USING ({pred}) WITH CHECK ({pred})"
        ),
    );
    // Citus refuses ALTER TABLE on a distribution column (a table protected before
    // create_distributed_table keeps the default it got then).
    if set_default && !t.distributed {
        s.push(format!(
            "ALTER TABLE {table} ALTER COLUMN {col} SET DEFAULT {require}"
        ));
    }
    // A partition already carries the parent's row trigger as a clone.
    if !t.is_partition {
        recreate(
            &mut s,
            "TRIGGER",
            "tenancy_tenant_immutable",
            format!(
                "CREATE TRIGGER tenancy_tenant_immutable BEFORE UPDATE OF {col} ON {table} FOR EACH ROW EXECUTE FUNCTION tenancy.tenant_column_immutable({})",
                quote_literal(column)
            ),
        );
    }
    s.push(format!(
        "ALTER TABLE {table} ENABLE ALWAYS TRIGGER tenancy_tenant_immutable"
    ));
    recreate(
        &mut s,
        "TRIGGER",
        "tenancy_no_truncate",
        format!(
            "CREATE TRIGGER tenancy_no_truncate BEFORE TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION tenancy.refuse_truncate()"
        ),
    );
    s.push(format!(
        "ALTER TABLE {table} ENABLE ALWAYS TRIGGER tenancy_no_truncate"
    ));
    if !t.has_tenant_index {
        s.push(format!("CREATE INDEX ON {table} ({col})"));
    }
    for old in OLD_AUDIT_TRIGGERS {
        if t.existing.iter().any(|e| e == old) {
            s.push(format!("DROP TRIGGER {old} ON {table}"));
        }
    }
    if audit {
        // Every change becomes an audit event, filed under the row's tenant column.
        for (name, when, referencing) in AUDIT_TRIGGERS {
            recreate(
                &mut s,
                "TRIGGER",
                name,
                format!(
                    "CREATE TRIGGER {name} {when} ON {table} {referencing}FOR EACH STATEMENT EXECUTE FUNCTION tenancy.audit_trigger({})",
                    quote_literal(column)
                ),
            );
            s.push(format!("ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name}"));
        }
    }
    s.push(if registry_has_rel() {
        format!(
            "INSERT INTO tenancy.protected_tables (rel, schema_name, table_name, tenant_column, tenant_type, audited) VALUES ({}::pg_catalog.regclass, {}, {}, {}, {}, {audit}) ON CONFLICT (rel) DO UPDATE SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name, tenant_column = EXCLUDED.tenant_column, tenant_type = EXCLUDED.tenant_type, audited = tenancy.protected_tables.audited OR EXCLUDED.audited, protected_at = pg_catalog.now(), protected_by = session_user",
            // The qualified, quoted name (stable in dry-run output, unlike the OID), resolved
            // in the same transaction as the DDL before it.
            quote_literal(format!("{}.{}", ident(&t.schema), ident(&t.name))),
            quote_literal(&t.schema),
            quote_literal(&t.name),
            quote_literal(column),
            quote_literal(t.tenant_type)
        )
    } else {
        // A 0.2.0 registry (keyed by name), between the library update and ALTER EXTENSION
        // UPDATE: the 0.1.0--0.2.0 update script and 0.2.0's guards call protect() there.
        format!(
            "INSERT INTO tenancy.protected_tables (schema_name, table_name, tenant_column, tenant_type, audited) VALUES ({}, {}, {}, {}, {audit}) ON CONFLICT (schema_name, table_name) DO UPDATE SET tenant_column = EXCLUDED.tenant_column, tenant_type = EXCLUDED.tenant_type, audited = tenancy.protected_tables.audited OR EXCLUDED.audited, protected_at = pg_catalog.now(), protected_by = session_user",
            quote_literal(&t.schema),
            quote_literal(&t.name),
            quote_literal(column),
            quote_literal(t.tenant_type)
        )
    });
    s
}

/// Quotes a string literal with PostgreSQL's own `quote_literal`: a value with a backslash
/// becomes an `E'...'` literal with the backslash doubled, so the literal means the same
/// whatever `standard_conforming_strings` the session has (doubling quotes alone does not:
/// with it off, a backslash in a table name ended the literal).
fn quote_literal(s: impl AsRef<str>) -> String {
    pgrx::spi::quote_literal(s)
}

/// Whether the registry is keyed by the table itself (0.2.1 and later: column `rel`).
fn registry_has_rel() -> bool {
    registry_has_column("protected_tables", "rel")
}

/// Whether registry table `table` (of schema tenancy) has `column`: the library may run over
/// an older extension version's registry until ALTER EXTENSION UPDATE.
fn registry_has_column(table: &str, column: &str) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                         WHERE attrelid = pg_catalog.to_regclass('tenancy.' OPERATOR(pg_catalog.||) $1)
                           AND attname OPERATOR(pg_catalog.=) $2 AND NOT attisdropped)",
        &[table.into(), column.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Runs `f` with `search_path = pg_catalog, pg_temp`, as a function's SET clause would: the
/// statements protect() builds and runs (and the guards they fire) then see the catalogs
/// only, whatever the caller's search_path puts first. protect, protect_all and unprotect have
/// no SET clause because they first resolve the caller's table names in the caller's
/// search_path ([`resolve`]); everything after that runs in here.
fn with_pinned_search_path<R>(f: impl FnOnce() -> R) -> R {
    /// Pops the GUC nesting level on the way out; on ERROR the (sub)transaction's abort
    /// restores the setting instead.
    struct Restore(i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                // SAFETY: the level this frame opened with NewGUCNestLevel, still the innermost.
                unsafe { pg_sys::AtEOXact_GUC(true, self.0) };
            }
        }
    }
    /// Sets `name` for the level opened below; GUC_ACTION_SAVE reverts it at the level's end.
    fn save(name: &std::ffi::CStr, value: &std::ffi::CStr) {
        // SAFETY: NUL-terminated strings that outlive the call.
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                pgrx::PgLogLevel::ERROR as i32,
                false,
            );
        }
    }
    // SAFETY: opens a GUC nesting level, as fmgr does for a function's SET clause.
    let restore = Restore(unsafe { pg_sys::NewGUCNestLevel() });
    save(c"search_path", c"pg_catalog, pg_temp");
    // Citus creates a distributed table's triggers on its shards only with this setting
    // (pg_tenancy's triggers touch nothing but their own row or statement); it exists while
    // Citus is loaded, which it is wherever the extension is installed (preloaded).
    if crate::citus::installed() {
        save(c"citus.enable_unsafe_triggers", c"on");
    }
    let r = f();
    drop(restore);
    r
}

/// Runs `f` with the drift guards standing aside, restoring them even on ERROR.
pub(crate) fn with_maintenance<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            MAINTENANCE.with(|m| m.set(self.0));
        }
    }
    let _restore = Restore(MAINTENANCE.with(|m| m.replace(true)));
    f()
}

fn collect_protect(
    rel: pg_sys::Oid,
    column: &str,
    set_default: bool,
    audit: bool,
    out: &mut Vec<String>,
) {
    let t = load_target(rel, column);
    out.extend(protect_statements(&t, column, set_default, audit));
    for child in &t.children {
        collect_protect(*child, column, set_default, audit, out);
    }
}

fn run_all(stmts: &[String]) {
    with_maintenance(|| {
        for (i, s) in stmts.iter().enumerate() {
            run_naming_statement(s, i + 1, stmts.len());
        }
    });
}

/// Runs one statement protect() built; an error it raises says which one in its DETAIL.
/// (Not in CONTEXT: errors that cross Rust frames lose their CONTEXT in pgrx 0.18, SPI's own
/// "SQL statement ..." line included.)
fn run_naming_statement(stmt: &str, n: usize, of: usize) {
    use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
    pgrx::PgTryBuilder::new(|| {
        Spi::run(stmt).unwrap_or_else(|e| TenancyError::spi("running a statement", e).report())
    })
    .catch_others(|caught| match caught {
        CaughtError::PostgresError(e) | CaughtError::ErrorReport(e) => {
            let mut detail = format!("pg_tenancy statement {n} of {of}: {stmt}");
            if let Some(d) = e.detail() {
                detail = format!("{d}\n{detail}");
            }
            let mut report =
                ErrorReport::new(e.sql_error_code(), e.message().to_string(), "protect")
                    .set_detail(detail);
            if let Some(h) = e.hint() {
                report = report.set_hint(h.to_string());
            }
            report.report(PgLogLevel::ERROR);
            unreachable!("ereport(ERROR) returned")
        }
        other => other.rethrow(),
    })
    .execute()
}

/// Protects `rel` (and its partitions or inheritance children) on `tenant_column` (uuid or
/// text). Idempotent. With `dry_run` returns the SQL without running it. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn protect(
    rel: &str,
    tenant_column: default!(&str, "'organization_id'"),
    dry_run: default!(bool, false),
    set_default: default!(bool, true),
    audit: default!(bool, false),
) -> SetOfIterator<'static, String> {
    require_superuser("protect");
    let rel = resolve(rel);
    let stmts = with_pinned_search_path(|| {
        let mut stmts = Vec::new();
        collect_protect(rel, tenant_column, set_default, audit, &mut stmts);
        if !dry_run {
            run_all(&stmts);
            log_action("protect", rel, tenant_column);
        }
        stmts
    });
    SetOfIterator::new(stmts)
}

/// Protects every table of `schema` that has `tenant_column` (partitions through their
/// parent), plus the tenant root table `root` on its `id`, and records the schema so that
/// tables created in it later are protected at creation. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn protect_all(
    schema: Option<&str>,
    root: default!(Option<&str>, "NULL"),
    tenant_column: default!(Option<&str>, "'organization_id'"),
    dry_run: default!(Option<bool>, false),
    audit: default!(Option<bool>, false),
) -> SetOfIterator<'static, String> {
    require_superuser("protect_all");
    // Not STRICT (root may be NULL): every other argument is checked here.
    let required = |argument| TenancyError::NullArgument {
        function: "protect_all",
        argument,
    };
    let schema = schema.ok_or_else(|| required("schema")).or_raise();
    let tenant_column = tenant_column
        .ok_or_else(|| required("tenant_column"))
        .or_raise();
    let dry_run = dry_run.ok_or_else(|| required("dry_run")).or_raise();
    let audit = audit.ok_or_else(|| required("audit")).or_raise();
    let root = root.map(resolve);
    with_pinned_search_path(|| protect_all_resolved(schema, root, tenant_column, dry_run, audit))
}

fn protect_all_resolved(
    schema: &str,
    root: Option<pg_sys::Oid>,
    tenant_column: &str,
    dry_run: bool,
    audit: bool,
) -> SetOfIterator<'static, String> {
    let tables: Vec<pg_sys::Oid> = Spi::connect(|client| -> SpiResult<_> {
        let t = client.select(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)
                AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                              AND a.attname = $2 AND NOT a.attisdropped)
              ORDER BY c.relname",
            None,
            &[schema.into(), tenant_column.into()],
        )?;
        t.map(|r| {
            r.get::<pg_sys::Oid>(1)
                .map(|o| o.unwrap_or(pg_sys::InvalidOid))
        })
        .collect()
    })
    .unwrap_or_else(|e| TenancyError::spi("reading the catalog", e).report());
    let mut stmts = Vec::new();
    if let Some(root) = root {
        collect_protect(root, "id", false, audit, &mut stmts);
    }
    for t in tables.into_iter().filter(|t| Some(*t) != root) {
        collect_protect(t, tenant_column, true, audit, &mut stmts);
    }
    stmts.push(if registry_has_column("protected_schemas", "audited") {
        // Audited once, audited for good: a later protect_all without audit does not turn
        // auditing of new tables off (tenancy.unprotect is the way out, table by table).
        format!(
            "INSERT INTO tenancy.protected_schemas (schema_name, tenant_column, audited) VALUES ({}, {}, {audit}) ON CONFLICT (schema_name) DO UPDATE SET tenant_column = EXCLUDED.tenant_column, audited = tenancy.protected_schemas.audited OR EXCLUDED.audited",
            quote_literal(schema),
            quote_literal(tenant_column)
        )
    } else {
        // A 0.2.0 registry, between the library update and ALTER EXTENSION UPDATE.
        format!(
            "INSERT INTO tenancy.protected_schemas (schema_name, tenant_column) VALUES ({}, {}) ON CONFLICT (schema_name) DO UPDATE SET tenant_column = EXCLUDED.tenant_column",
            quote_literal(schema),
            quote_literal(tenant_column)
        )
    });
    if !dry_run {
        run_all(&stmts);
        Spi::run_with_args(
            "INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('protect_all', $1, $2)",
            &[schema.into(), tenant_column.into()],
        )
        .unwrap_or_else(|e| TenancyError::spi("recording the protection", e).report());
    }
    SetOfIterator::new(stmts)
}

/// Removes pg_tenancy's protection from `rel` and its children: the only sanctioned way to
/// disable RLS on a protected table. Superuser only; recorded in `tenancy.protection_log`.
#[pg_extern(volatile, parallel_unsafe)]
fn unprotect(rel: &str) -> SetOfIterator<'static, String> {
    require_superuser("unprotect");
    let rel = resolve(rel);
    let stmts = with_pinned_search_path(|| {
        let mut stmts = Vec::new();
        if !unprotect_one(rel, &mut stmts) {
            TenancyError::NotProtected {
                relation: relation_name(rel),
            }
            .report();
        }
        stmts
    });
    SetOfIterator::new(stmts)
}

/// Resolves a table name as `regclass` does, in the caller's search_path (an unqualified
/// `protect('orders')` means the caller's `orders`); unknown names raise Postgres's own 42P01.
/// The types are qualified: the caller's search_path may put another schema before
/// pg_catalog, and only the name itself is to be looked up there.
fn resolve(name: &str) -> pg_sys::Oid {
    Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT $1::pg_catalog.regclass::pg_catalog.oid",
        &[name.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        TenancyError::UndefinedTable {
            name: name.to_string(),
        }
        .report()
    })
}

fn relation_name(rel: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[rel.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("{rel:?}"))
}

/// Unprotects one registered table and then its registered children; false when `rel` is
/// not registered.
fn unprotect_one(rel: pg_sys::Oid, stmts: &mut Vec<String>) -> bool {
    let found = Spi::connect(|client| -> SpiResult<_> {
        let t = client.select(
            "SELECT n.nspname::text, c.relname::text,
                    ARRAY(SELECT inhrelid FROM pg_inherits WHERE inhparent = c.oid ORDER BY 1),
                    p.audited
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN tenancy.protected_tables p ON p.schema_name = n.nspname AND p.table_name = c.relname
              WHERE c.oid = $1",
            None,
            &[rel.into()],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let r = t.first();
        Ok(Some((
            r.get::<String>(1)?.unwrap_or_default(),
            r.get::<String>(2)?.unwrap_or_default(),
            r.get::<Vec<pg_sys::Oid>>(3)?.unwrap_or_default(),
            r.get::<bool>(4)?.unwrap_or(false),
        )))
    })
    .unwrap_or_else(|e| TenancyError::spi("recording the protection", e).report());
    let Some((schema, name, children, audited)) = found else {
        return false;
    };
    let table = format!("{}.{}", ident(&schema), ident(&name));
    let mut mine = vec![
        format!("DROP POLICY IF EXISTS tenancy_tenant_floor ON {table}"),
        format!("DROP POLICY IF EXISTS tenancy_tenant_rows ON {table}"),
        format!("ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY"),
        format!("ALTER TABLE {table} DISABLE ROW LEVEL SECURITY"),
        format!("DROP TRIGGER IF EXISTS tenancy_tenant_immutable ON {table}"),
        format!("DROP TRIGGER IF EXISTS tenancy_no_truncate ON {table}"),
        // By name: the guards keep the names current (0.2.1), and 0.2.0's registry has no rel.
        format!(
            "DELETE FROM tenancy.protected_tables WHERE schema_name = {} AND table_name = {}",
            quote_literal(&schema),
            quote_literal(&name)
        ),
    ];
    if audited {
        let names = AUDIT_TRIGGERS.iter().map(|t| t.0).chain(OLD_AUDIT_TRIGGERS);
        for name in names {
            mine.insert(6, format!("DROP TRIGGER IF EXISTS {name} ON {table}"));
        }
    }
    run_all(&mine);
    log_action("unprotect", rel, "");
    stmts.extend(mine);
    for child in children {
        unprotect_one(child, stmts);
    }
    true
}

fn log_action(action: &str, rel: pg_sys::Oid, detail: &str) {
    Spi::run_with_args(
        "INSERT INTO tenancy.protection_log (action, object, detail) VALUES ($1, $2::regclass::text, $3)",
        &[action.into(), rel.into(), detail.into()],
    )
    .unwrap_or_else(|e| TenancyError::spi("recording the protection", e).report());
}

/// True while pg_tenancy itself changes a protected table: the drift guards stand aside.
#[pg_extern(stable, parallel_restricted)]
fn in_maintenance() -> bool {
    MAINTENANCE.with(Cell::get)
}
