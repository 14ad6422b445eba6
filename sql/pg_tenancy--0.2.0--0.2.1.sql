-- pg_tenancy 0.2.0 -> 0.2.1: security fixes (II-2/9).
--
-- * Every function of the extension that runs SQL pins search_path = pg_catalog, pg_temp.
--   0.2.0 pinned `pg_catalog` alone, and a session's temporary schema is then searched
--   *first* for relations: a temp view named pg_trigger, pg_class or pg_roles was read by the
--   drift guards (SECURITY DEFINER), the report and the TRUNCATE guard. The C functions that
--   run SQL (protect, protect_all, unprotect, audit_purge, ...) ran under the caller's
--   search_path, where an owner-controlled schema could shadow operators.
-- * phi_rotate_all (a procedure, which cannot have a SET clause) qualifies its operators.
-- * The registry is keyed by the table (column rel, a regclass): protection follows RENAME
--   and SET SCHEMA; pg_tenancy's policies are verified by definition, not by name; renaming
--   the tenant column is refused.
-- * The report finds INCLUDE-only unique indexes, EXCLUDE constraints without the tenant
--   column, roles that can read server files, nondeterministic tenant collations.
-- * The audit trigger pins the output settings its comparison and rendering depend on.
-- * II-6/9: audit events are written without a chain-head lock and sealed after commit into
--   per-tenant blocks (tenancy.audit_seals); payloads are committed to by a salted digest so
--   they can be re-encrypted (tenancy.audit_rekey); v1 chains are kept and linked to.
-- * Library changes (no SQL here): protect() quotes literals with PostgreSQL's quote_literal
--   and refuses nondeterministic tenant collations; the reveal worker pins its settings;
--   log_action refuses the trail's own event names.

-- The drift guards stand aside while the registry changes: 0.2.0's guard_ddl would find
-- its variable `rel` ambiguous with the new column, and the new one needs the column.
ALTER EVENT TRIGGER tenancy_guard_ddl DISABLE;
ALTER EVENT TRIGGER tenancy_guard_drop DISABLE;

-- New C functions: whether the running statement creates a temporary table ON COMMIT DROP;
-- refusing code of non-superusers for the rest of a transaction (key rotation).
CREATE FUNCTION tenancy.refuse_foreign_code_in_transaction() RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'refuse_foreign_code_in_transaction_wrapper';
REVOKE EXECUTE ON FUNCTION tenancy.refuse_foreign_code_in_transaction() FROM PUBLIC;

CREATE FUNCTION tenancy.confined_ddl() RETURNS bool
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'confined_ddl_wrapper';

-- The registry, keyed by the table. Rows of tables that no longer exist are dropped.
ALTER TABLE tenancy.protected_tables ADD COLUMN rel regclass;
UPDATE tenancy.protected_tables p SET rel = c.oid
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = p.schema_name AND c.relname = p.table_name;
DELETE FROM tenancy.protected_tables WHERE rel IS NULL;
ALTER TABLE tenancy.protected_tables ALTER COLUMN rel SET NOT NULL;
ALTER TABLE tenancy.protected_tables ADD CONSTRAINT protected_tables_rel_key UNIQUE (rel);

-- II-6/9: a schema protected with audit => true stays audited: tables created, moved or
-- attached there later get the audit triggers. 0.2.0 did not record it; a schema counts as
-- audited when any of its protected tables is (the report then flags the others, which 0.2.0
-- left unaudited when they were created after protect_all).
ALTER TABLE tenancy.protected_schemas ADD COLUMN audited boolean NOT NULL DEFAULT false;
UPDATE tenancy.protected_schemas s SET audited = true
 WHERE EXISTS (SELECT 1 FROM tenancy.protected_tables p
                WHERE p.schema_name OPERATOR(pg_catalog.=) s.schema_name AND p.audited);
COMMENT ON TABLE tenancy.protected_schemas IS
  'Schemas protected by tenancy.protect_all(): new tables with the tenant column are protected (and, when audited, audited) at creation.';

-- Catalog text of an object the caller found in its snapshot, or NULL if it has been dropped
-- since. pg_describe_object and pg_get_expr look objects up in the catalog caches, which see
-- drops committed after the snapshot: on PostgreSQL 13 pg_describe_object fails with "cache
-- lookup failed", and pg_get_expr, whose relation is dropped while it waits for its lock,
-- fails with "could not open relation". A report or guard reading the catalogs while
-- migrations run must not fail because an object it looked at went away.
CREATE FUNCTION tenancy.object_text(classid oid, objid oid, objsubid int4) RETURNS text
LANGUAGE plpgsql STABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN pg_describe_object(classid, objid, objsubid);
EXCEPTION WHEN internal_error OR undefined_object OR undefined_table THEN
  RETURN NULL;
END $$;

CREATE FUNCTION tenancy.expression_text(expr pg_node_tree, rel oid) RETURNS text
LANGUAGE plpgsql STABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN pg_get_expr(expr, rel);
EXCEPTION WHEN internal_error OR undefined_object OR undefined_table THEN
  RETURN NULL;
END $$;

-- Code that a protected table's own objects would run over its rows and that belongs to a
-- role other than a superuser: CHECK and EXCLUDE constraints, index expressions and
-- predicates, column defaults and generation expressions, extended statistics expressions
-- (ANALYZE by a superuser or autovacuum evaluates them), policies, domain constraints of its
-- column types, each through a function or an operator; and any rule on it (a DO ALSO rule copies
-- every tenant's new rows). NULL when there is none. The drift guard refuses DDL by a role
-- that is not a superuser which leaves such code behind; the report flags it.
CREATE OR REPLACE FUNCTION tenancy.foreign_code_problem(rel regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH RECURSIVE types(oid) AS (
    SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
    UNION
    SELECT nxt.oid FROM types ty JOIN pg_type t ON t.oid = ty.oid
      CROSS JOIN LATERAL (
        SELECT t.typbasetype WHERE t.typtype = 'd'
        UNION ALL SELECT t.typelem WHERE t.typelem <> 0
        UNION ALL SELECT ca.atttypid FROM pg_attribute ca
                   WHERE t.typtype = 'c' AND ca.attrelid = t.typrelid AND ca.attnum > 0 AND NOT ca.attisdropped
      ) nxt(oid)
  ),
  objects AS (
    SELECT 'pg_constraint'::regclass AS classid, k.oid AS objid FROM pg_constraint k WHERE k.conrelid = $1
    UNION ALL
    SELECT 'pg_class'::regclass, i.indexrelid FROM pg_index i WHERE i.indrelid = $1
    UNION ALL
    SELECT 'pg_attrdef'::regclass, d.oid FROM pg_attrdef d WHERE d.adrelid = $1
    UNION ALL
    SELECT 'pg_statistic_ext'::regclass, x.oid FROM pg_statistic_ext x WHERE x.stxrelid = $1
    UNION ALL
    SELECT 'pg_policy'::regclass, y.oid FROM pg_policy y WHERE y.polrelid = $1
    UNION ALL
    -- Triggers (constraint triggers too) see every row written, by whichever tenant writes
    -- it, and run with the writer's rights (a superuser's, in maintenance).
    SELECT 'pg_trigger'::regclass, g.oid FROM pg_trigger g WHERE g.tgrelid = $1 AND NOT g.tgisinternal
    UNION ALL
    -- Domain constraints of every type a column holds: its domain, that domain's base
    -- domains, and domains inside composite and array types, at any depth.
    SELECT 'pg_constraint'::regclass, k.oid
      FROM types ty JOIN pg_constraint k ON k.contypid = ty.oid
  ),
  calls AS (
    SELECT d.classid, d.objid, d.objsubid,
           CASE d.refclassid WHEN 'pg_proc'::regclass THEN d.refobjid
                             ELSE (SELECT o.oprcode::oid FROM pg_operator o WHERE o.oid = d.refobjid) END AS fn
      FROM objects x JOIN pg_depend d ON d.classid = x.classid AND d.objid = x.objid
     WHERE d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass)
  )
  SELECT coalesce(
    (SELECT format('rule %I runs on every change of every tenant''s rows', r.rulename)
       FROM pg_rewrite r WHERE r.ev_class = $1 ORDER BY r.rulename LIMIT 1),
    -- CHECK constraints (the table's and its domains') may call only IMMUTABLE functions:
    -- others run SQL (query_to_xml), keep state (set_config) or reach files and large
    -- objects while every tenant's rows are validated, by whoever validates them.
    -- Read from the stored expression: calls of built-in functions leave no pg_depend row.
    (SELECT format('%s calls %s, which is not IMMUTABLE, over every tenant''s rows',
                   d.text, f.oid::regprocedure)
       FROM pg_constraint k
       CROSS JOIN LATERAL regexp_matches(k.conbin::text, ':(?:funcid|opfuncid) ([0-9]+)', 'g') m
       JOIN pg_proc f ON f.oid = m[1]::oid
       CROSS JOIN LATERAL (SELECT tenancy.object_text('pg_constraint'::regclass, k.oid, 0)) d(text)
      WHERE d.text IS NOT NULL AND k.contype = 'c' AND (k.conrelid = $1 OR k.contypid IN (SELECT ty.oid FROM types ty))
        AND f.provolatile <> 'i'
      ORDER BY 1 LIMIT 1),
    (SELECT format('%s runs %s of role %I over every tenant''s rows',
                   d.text, f.oid::regprocedure, r.rolname)
       FROM calls c JOIN pg_proc f ON f.oid = c.fn JOIN pg_roles r ON r.oid = f.proowner
       CROSS JOIN LATERAL (SELECT tenancy.object_text(c.classid, c.objid, c.objsubid)) d(text)
      WHERE NOT r.rolsuper AND d.text IS NOT NULL
      ORDER BY 1 LIMIT 1))
$$;
-- Whether a table or any of its children or partitions holds a row (every tenant's, RLS
-- aside: it runs as the extension's owner from the drift guard). Rows kept in a child of the
-- table count: an "empty" table with a filled child would graft them in.
CREATE OR REPLACE FUNCTION tenancy.has_rows(rel regclass) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  found boolean;
BEGIN
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', rel) INTO found;
  RETURN found;
END $$;
-- Problems with one protected table's protection, or NULL when intact. Policies are checked by
-- definition (command, roles, RESTRICTIVE/PERMISSIVE, USING and WITH CHECK), not by name: a
-- policy dropped and re-created as USING (true) under pg_tenancy's name is a problem.
CREATE OR REPLACE FUNCTION tenancy.protection_problem(rel regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH t AS (
    SELECT c.oid, c.relrowsecurity, c.relforcerowsecurity, p.audited, p.tenant_column,
           -- As pg_get_expr renders protect()'s `col = (SELECT tenancy.current_org_id())`
           -- (the same on PostgreSQL 13 to 18).
           format('(%I = ( SELECT %s AS %s))', p.tenant_column,
                  CASE p.tenant_type WHEN 'uuid' THEN 'tenancy.current_org_id()' ELSE 'tenancy.current_org_id_text()' END,
                  CASE p.tenant_type WHEN 'uuid' THEN 'current_org_id' ELSE 'current_org_id_text' END) AS pred,
           -- and its form in a database with Citus (no subquery: Citus refuses them).
           format('(%I = %s)', p.tenant_column,
                  CASE p.tenant_type WHEN 'uuid' THEN 'tenancy.current_org_id()' ELSE 'tenancy.current_org_id_text()' END) AS pred_citus
      FROM pg_class c
      LEFT JOIN tenancy.protected_tables p ON p.rel = c.oid
     WHERE c.oid = $1
  ),
  problem AS MATERIALIZED (
  SELECT CASE
    WHEN NOT t.relrowsecurity THEN 'row level security is disabled'
    WHEN NOT t.relforcerowsecurity THEN 'row level security is not forced'
    WHEN t.tenant_column IS NOT NULL AND NOT EXISTS (
           SELECT 1 FROM pg_attribute a WHERE a.attrelid = t.oid AND a.attname = t.tenant_column AND NOT a.attisdropped)
      THEN format('the tenant column %I was renamed or dropped', t.tenant_column)
    WHEN NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t.oid AND polname = 'tenancy_tenant_floor')
      THEN 'the tenant floor policy is missing'
    WHEN NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t.oid AND polname = 'tenancy_tenant_floor'
                       AND NOT polpermissive AND polcmd = '*' AND polroles = '{0}'
                       AND (t.pred IS NULL OR (tenancy.expression_text(polqual, polrelid) IN (t.pred, t.pred_citus)
                                               AND tenancy.expression_text(polwithcheck, polrelid) IN (t.pred, t.pred_citus))))
      THEN 'the tenant floor policy is not as pg_tenancy defines it'
    WHEN NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t.oid AND polname = 'tenancy_tenant_rows')
      THEN 'the tenant policy is missing'
    WHEN NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t.oid AND polname = 'tenancy_tenant_rows'
                       AND polpermissive AND polcmd = '*' AND polroles = '{0}'
                       AND (t.pred IS NULL OR (tenancy.expression_text(polqual, polrelid) IN (t.pred, t.pred_citus)
                                               AND tenancy.expression_text(polwithcheck, polrelid) IN (t.pred, t.pred_citus))))
      THEN 'the tenant policy is not as pg_tenancy defines it'
    WHEN (SELECT count(*) FROM pg_trigger WHERE tgrelid = t.oid AND tgenabled = 'A'
            AND tgname IN ('tenancy_tenant_immutable', 'tenancy_no_truncate')) < 2
      THEN 'a tenancy trigger is missing or not enabled ALWAYS'
    WHEN t.audited AND (SELECT count(*) FROM pg_trigger WHERE tgrelid = t.oid AND tgenabled = 'A'
            AND tgname IN ('tenancy_audit_insert', 'tenancy_audit_update', 'tenancy_audit_delete')) < 3
      THEN 'an audit trigger is missing or not enabled ALWAYS'
  END AS text
  FROM t
  )
  -- Checked after the problem was looked for (the CTE is materialized first): a table
  -- dropped meanwhile has no problem, whatever its half-read policies looked like.
  -- has_table_privilege looks the table up in the catalog cache, which sees the drop.
  SELECT CASE WHEN has_table_privilege($1::oid, 'SELECT') IS NULL THEN NULL ELSE problem.text END
  FROM problem
$$;
-- The audit trail's own append-only triggers and RLS must stay as installed.
CREATE OR REPLACE FUNCTION tenancy.check_audit_trail_guards() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF to_regclass('tenancy.audit_events') IS NULL THEN
    RETURN;  -- during CREATE EXTENSION, before the table exists
  END IF;
  IF (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tenancy.audit_events'::regclass AND tgenabled = 'A'
        AND tgname IN ('audit_events_append_only', 'audit_events_no_truncate')) < 2
     OR NOT (SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE oid = 'tenancy.audit_events'::regclass)
     OR (to_regclass('tenancy.audit_seals') IS NOT NULL AND (
           (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tenancy.audit_seals'::regclass AND tgenabled = 'A'
              AND tgname IN ('audit_seals_append_only', 'audit_seals_no_truncate')) < 2
           OR NOT (SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE oid = 'tenancy.audit_seals'::regclass))) THEN
    RAISE EXCEPTION 'the audit trail''s append-only guards and row level security cannot be removed'
      USING ERRCODE = '42501', HINT = 'tenancy.audit_events is append-only by design.';
  END IF;
END $$;
CREATE OR REPLACE FUNCTION tenancy.guard_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  cmd record;
  parent_col name;
  schema_col name;
  schema_audited boolean;
  touched_rels oid[];
  problem text;
  target regclass;
  t record;
  su boolean;
  graft record;
BEGIN
  -- protect()/unprotect() at work, or a superuser restoring a dump (tenancy.restore_mode).
  IF tenancy.in_maintenance() OR coalesce(current_setting('tenancy.restore_mode', true), 'off') = 'on' THEN
    RETURN;
  END IF;
  PERFORM tenancy.check_audit_trail_guards();
  su := (SELECT rolsuper FROM pg_roles WHERE rolname = session_user);
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    -- S1: in a tenant transaction nothing is made or changed that outlives it: temporary
    -- functions, views, types, comments, defaults and tables that keep their definition would
    -- carry this tenant's data into the next transaction on the connection. Only a temporary
    -- table made ON COMMIT DROP (gone at commit) may be created there.
    IF tenancy.current_org_id_text() IS NOT NULL AND NOT su AND NOT tenancy.confined_ddl() THEN
      RAISE EXCEPTION '% cannot run in a tenant transaction: what it makes or changes outlives the transaction', cmd.command_tag
        USING ERRCODE = '0A000',
              HINT = 'Run DDL outside tenant transactions; for scratch space use CREATE TEMP TABLE ... ON COMMIT DROP.';
    END IF;
    IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO') THEN
      target := cmd.objid::regclass;
      -- A partition or inheritance child of a protected table.
      SELECT p.tenant_column INTO parent_col
        FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhparent
       WHERE i.inhrelid = cmd.objid;
      IF parent_col IS NOT NULL THEN
        -- Audited like its parent: writes straight into a partition are changes too.
        PERFORM tenancy.protect(target::text, parent_col,
                                audit => EXISTS (SELECT 1 FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhparent
                                                  WHERE i.inhrelid = cmd.objid AND p.audited));
        INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('auto_protect', target::text, 'child of a protected table');
        CONTINUE;
      END IF;
      -- A new table with the tenant column in a protected schema.
      SELECT s.tenant_column, s.audited INTO schema_col, schema_audited
        FROM tenancy.protected_schemas s
       WHERE s.schema_name = cmd.schema_name
         AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = cmd.objid AND a.attname = s.tenant_column AND NOT a.attisdropped);
      IF schema_col IS NOT NULL THEN
        -- CREATE TABLE AS / SELECT INTO come with rows: they would be adopted into the
        -- tenants they name.
        IF NOT su AND cmd.command_tag IN ('CREATE TABLE AS', 'SELECT INTO') AND tenancy.has_rows(target) THEN
          RAISE EXCEPTION '% refused: new table % in protected schema "%" holds rows', cmd.command_tag, target, cmd.schema_name
            USING ERRCODE = '42501', HINT = 'Create the table empty; tenants'' rows go in through tenant transactions.';
        END IF;
        IF coalesce(current_setting('tenancy.new_table_action', true), 'protect') = 'refuse' THEN
          RAISE EXCEPTION 'new table % has tenant column "%" in protected schema "%"', target, schema_col, cmd.schema_name
            USING ERRCODE = '42501', HINT = 'tenancy.new_table_action is ''refuse'': ask a superuser to create it and run tenancy.protect().';
        END IF;
        PERFORM tenancy.protect(target::text, schema_col, audit => schema_audited);
        INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('auto_protect', target::text, 'new table in a protected schema');
      END IF;
    ELSIF cmd.command_tag IN ('ALTER DOMAIN', 'CREATE DOMAIN') AND NOT su THEN
      -- ALTER DOMAIN ... ADD CONSTRAINT: the constraint runs on every write of every protected
      -- table with a column of the domain.
      FOR t IN SELECT p.rel FROM tenancy.protected_tables p LOOP
        problem := tenancy.foreign_code_problem(t.rel);
        IF problem IS NOT NULL THEN
          RAISE EXCEPTION '% refused on protected table %: %', cmd.command_tag, t.rel, problem
            USING ERRCODE = '42501', HINT = 'Ask a superuser to review the function and own it.';
        END IF;
      END LOOP;
    ELSIF cmd.object_type = 'type' AND cmd.command_tag = 'ALTER TYPE' AND NOT su
          AND EXISTS (SELECT 1 FROM tenancy.protected_tables p
                        JOIN pg_attribute a ON a.attrelid = p.rel AND NOT a.attisdropped
                        JOIN pg_type ty ON ty.oid = a.atttypid
                       WHERE a.atttypid = cmd.objid OR ty.typelem = cmd.objid OR ty.typbasetype = cmd.objid) THEN
      -- Renaming an enum's values relabels every tenant's rows at once (the event does not
      -- tell RENAME VALUE from ADD VALUE, so both are a superuser's).
      RAISE EXCEPTION 'ALTER TYPE refused: % is used by a protected table, and changing it can change every tenant''s values', cmd.object_identity
        USING ERRCODE = '42501', HINT = 'Ask a superuser to run it.';
    ELSIF cmd.object_type = 'schema' AND cmd.command_tag = 'ALTER SCHEMA' THEN
      -- RENAME: the registry follows the schema (a protected schema keeps protecting new
      -- tables under its new name), and its tables' names are kept current.
      UPDATE tenancy.protected_schemas s SET schema_name = n.nspname
        FROM pg_namespace n
       WHERE n.oid = cmd.objid
         AND NOT EXISTS (SELECT 1 FROM pg_namespace o WHERE o.nspname = s.schema_name);
      IF FOUND THEN
        INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('renamed', cmd.object_identity, 'ALTER SCHEMA');
      END IF;
      UPDATE tenancy.protected_tables p SET schema_name = n.nspname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE p.rel = c.oid AND n.oid = cmd.objid AND p.schema_name <> n.nspname;
    ELSIF cmd.object_type IN ('table', 'table column', 'table constraint', 'policy', 'trigger', 'index', 'rule', 'statistics object') THEN
      -- ALTER TABLE, ALTER POLICY, CREATE INDEX, CREATE RULE ...: re-check every protected
      -- table touched.
      target := CASE cmd.object_type
               WHEN 'table' THEN cmd.objid::regclass
               WHEN 'table column' THEN cmd.objid::regclass
               WHEN 'table constraint' THEN (SELECT conrelid FROM pg_constraint WHERE oid = cmd.objid)::regclass
               WHEN 'policy' THEN (SELECT polrelid FROM pg_policy WHERE oid = cmd.objid)::regclass
               WHEN 'trigger' THEN (SELECT tgrelid FROM pg_trigger WHERE oid = cmd.objid)::regclass
               WHEN 'index' THEN (SELECT indrelid FROM pg_index WHERE indexrelid = cmd.objid)::regclass
               WHEN 'rule' THEN (SELECT ev_class FROM pg_rewrite WHERE oid = cmd.objid)::regclass
               WHEN 'statistics object' THEN (SELECT stxrelid FROM pg_statistic_ext WHERE oid = cmd.objid)::regclass
             END;
      -- A protected table must not become a child of a table that is not protected (a query
      -- on the parent reads the child's rows without the child's row level security), whoever
      -- asks: ALTER TABLE protected INHERIT other, ATTACH PARTITION protected into another.
      SELECT i.inhrelid::regclass AS child, i.inhparent::regclass AS parent INTO graft
        FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhrelid
       WHERE (i.inhrelid = target OR i.inhparent = target)
         AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables q WHERE q.rel = i.inhparent)
       LIMIT 1;
      IF graft.child IS NOT NULL THEN
        RAISE EXCEPTION '% refused: protected table % cannot become a child of %, which is not protected', cmd.command_tag, graft.child, graft.parent
          USING ERRCODE = '42501',
                HINT = 'Reads through the parent would skip the child''s row level security. Protect the parent first (tenancy.protect), as a superuser.';
      END IF;
      -- ALTER TABLE child INHERIT parent: the command names the child. Rows of a table that
      -- was not protected would appear in the parent's tenants' reads: only an empty table
      -- may join (it is protected at once below), unless a superuser does it.
      -- ALTER TABLE ... SET SCHEMA into a protected schema, or ADD COLUMN of the tenant column
      -- there: the table becomes a tenant table like one created there, and it may not bring
      -- rows of its own (they would be adopted into the tenants they name).
      IF target IS NOT NULL AND cmd.object_type IN ('table', 'table column')
         AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables p WHERE p.rel = target)
         AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = target) THEN
        SELECT s.tenant_column, s.audited INTO schema_col, schema_audited
          FROM tenancy.protected_schemas s JOIN pg_class c ON c.oid = target
          JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schema_name
         WHERE c.relkind IN ('r', 'p')
           AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = target AND a.attname = s.tenant_column AND NOT a.attisdropped);
        IF schema_col IS NOT NULL THEN
          IF NOT su AND tenancy.has_rows(target) THEN
            RAISE EXCEPTION '% refused: % holds rows and would become a tenant table of a protected schema', cmd.command_tag, target
              USING ERRCODE = '42501', HINT = 'Only an empty table can join a protected schema; move its rows in through tenant transactions afterwards.';
          END IF;
          PERFORM tenancy.protect(target::text, schema_col, audit => schema_audited);
          INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('auto_protect', target::text, 'moved into a protected schema');
        END IF;
      END IF;
      IF target IS NOT NULL AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables p WHERE p.rel = target)
         AND EXISTS (SELECT 1 FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhparent
                      WHERE i.inhrelid = target) THEN
        IF NOT su AND tenancy.has_rows(target) THEN
          RAISE EXCEPTION '% refused: % holds rows and would join protected table % unprotected', cmd.command_tag, target,
                (SELECT i.inhparent::regclass FROM pg_inherits i WHERE i.inhrelid = target LIMIT 1)
            USING ERRCODE = '42501', HINT = 'Only an empty table can become a child of a protected table; move its rows in through tenant transactions afterwards.';
        END IF;
        PERFORM tenancy.protect(target::text, (SELECT p.tenant_column FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhparent
                                                WHERE i.inhrelid = target LIMIT 1),
                                audit => EXISTS (SELECT 1 FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhparent
                                                  WHERE i.inhrelid = target AND p.audited));
        INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('auto_protect', target::text, 'inherits from a protected table');
      END IF;
      IF target IS NOT NULL AND EXISTS (SELECT 1 FROM tenancy.protected_tables p WHERE p.rel = target) THEN
        problem := tenancy.protection_problem(target);
        IF problem IS NULL AND cmd.object_type = 'policy' AND EXISTS (
             SELECT 1 FROM pg_policy WHERE oid = cmd.objid AND polname IN ('tenancy_tenant_floor', 'tenancy_tenant_rows'))
           AND cmd.command_tag = 'ALTER POLICY' AND NOT cmd.in_extension THEN
          -- (An extension script, run by CREATE/ALTER EXTENSION, may: pg_tenancy's own update
          -- rewrites its policies, and protection_problem above checked the result.)
          problem := 'pg_tenancy''s policies cannot be altered';
        END IF;
        -- Policies run over every row, before the tenant floor when the planner finds them
        -- cheaper (a RESTRICTIVE policy calling a COST 0.0001 function saw every tenant's
        -- rows): only a superuser may add or change one on a protected table.
        IF problem IS NULL AND NOT su AND cmd.object_type = 'policy'
           AND cmd.command_tag IN ('CREATE POLICY', 'ALTER POLICY') THEN
          problem := 'only a superuser may add or change its policies (they run over every tenant''s rows)';
        END IF;
        -- Code of a role that is not a superuser left to run over every tenant's rows.
        IF problem IS NULL AND NOT su THEN
          problem := tenancy.foreign_code_problem(target);
        END IF;
        IF problem IS NOT NULL THEN
          RAISE EXCEPTION '% refused on protected table %: %', cmd.command_tag, target, problem
            USING ERRCODE = '42501', HINT = format('Use SELECT tenancy.unprotect(%L) as a superuser; it is recorded. Restoring a dump? Run pg_restore as a superuser with PGOPTIONS=''-c tenancy.restore_mode=on''.', target::text);
        END IF;
        -- RENAME / SET SCHEMA: the registry follows the table (it is keyed by the table, the
        -- names are kept current for people reading it).
        UPDATE tenancy.protected_tables p SET schema_name = n.nspname, table_name = c.relname
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE p.rel = target AND c.oid = target
           AND (p.schema_name, p.table_name) IS DISTINCT FROM (n.nspname, c.relname);
        IF FOUND THEN
          INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('renamed', target::text, cmd.command_tag);
        END IF;
        -- ATTACH PARTITION / INHERIT: a new child of a protected table is protected too.
        FOR t IN SELECT i.inhrelid::regclass AS child FROM pg_inherits i
                  WHERE i.inhparent = target
                    AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables p WHERE p.rel = i.inhrelid) LOOP
          IF NOT su AND tenancy.has_rows(t.child) THEN
            RAISE EXCEPTION '% refused: % holds rows and would join protected table % unprotected', cmd.command_tag, t.child, target
              USING ERRCODE = '42501', HINT = 'Only an empty table can become a partition or child of a protected table; move its rows in through tenant transactions afterwards.';
          END IF;
          PERFORM tenancy.protect(t.child::text, (SELECT p.tenant_column FROM tenancy.protected_tables p WHERE p.rel = target),
                                  audit => (SELECT p.audited FROM tenancy.protected_tables p WHERE p.rel = target));
          INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('auto_protect', t.child::text, 'attached to a protected table');
        END LOOP;
      END IF;
    END IF;
  END LOOP;
  -- Every relation the statement reached: the objects it names, typed tables of a type
  -- (ALTER TYPE reports the type or its composite relation), and their children and
  -- partitions at any depth (ATTACH PARTITION names the parent).
  touched_rels := ARRAY(
    WITH RECURSIVE touched(oid) AS (
      SELECT c.oid FROM pg_event_trigger_ddl_commands() d
        JOIN pg_class c ON c.oid = d.objid OR c.reloftype = d.objid
                        OR c.reloftype = (SELECT r.reltype FROM pg_class r WHERE r.oid = d.objid)
      UNION
      SELECT i.inhrelid FROM touched x JOIN pg_inherits i ON i.inhparent = x.oid
    )
    SELECT oid FROM touched);
  -- A table in a protected schema can gain the tenant column by a command that names
  -- another object: ALTER TYPE ... RENAME ATTRIBUTE ... CASCADE (its typed tables), ALTER
  -- TABLE parent RENAME COLUMN (the parent's children). Every table such a command reaches
  -- is looked at: it is protected like one created there, and may not bring rows or an
  -- unprotected parent along.
  FOR t IN
    SELECT c.oid::regclass AS rel, s.tenant_column, s.audited
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN tenancy.protected_schemas s ON s.schema_name = n.nspname
     WHERE c.oid = ANY (touched_rels) AND c.relkind IN ('r', 'p')
       AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = s.tenant_column AND NOT a.attisdropped)
       AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables p WHERE p.rel = c.oid)
  LOOP
    IF NOT su AND (tenancy.has_rows(t.rel)
                   OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = t.rel
                               AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables q WHERE q.rel = i.inhparent))) THEN
      RAISE EXCEPTION '% would give % the tenant column "%" of its protected schema, with rows or under a parent that is not protected', tg_tag, t.rel, t.tenant_column
        USING ERRCODE = '42501', HINT = 'Only an empty table can become a tenant table of a protected schema; move its rows in through tenant transactions afterwards.';
    END IF;
    PERFORM tenancy.protect(t.rel::text, t.tenant_column, audit => t.audited);
    INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('auto_protect', t.rel::text, 'gained the tenant column (' || tg_tag || ')');
  END LOOP;
  -- Foreign keys between a protected table and a table that is not: PostgreSQL runs
  -- referential checks and actions as the table owner with row level security off, so an
  -- ON UPDATE / ON DELETE CASCADE from the owner's table rewrote or deleted another tenant's
  -- rows, and a foreign key from the owner's table to a protected one answered, row by row,
  -- whether another tenant's value exists. Both ends protected, or neither (a superuser may).
  -- Between two protected tables, the key must pair the two tenant columns: a key on
  -- (body) alone let an ON UPDATE CASCADE from the owner's own tenant rewrite another
  -- tenant's review, ON DELETE SET NULL erase it, and a plain key probe its values.
  IF NOT su THEN
    SELECT CASE WHEN f.ref_protected <> f.from_protected
                THEN format('foreign key %I from %s to %s joins a protected table to one that is not', f.conname, f.conrelid::regclass, f.confrelid::regclass)
                ELSE format('foreign key %I from %s to %s does not pair their tenant columns (%I, %I)', f.conname, f.conrelid::regclass, f.confrelid::regclass, f.from_col, f.ref_col)
           END INTO problem
      FROM (
        SELECT k.conname, k.conrelid, k.confrelid, k.conkey, k.confkey,
               pf.rel IS NOT NULL AS from_protected, pr.rel IS NOT NULL AS ref_protected,
               pf.tenant_column AS from_col, pr.tenant_column AS ref_col,
               (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = k.conrelid AND a.attname = pf.tenant_column) AS from_att,
               (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = k.confrelid AND a.attname = pr.tenant_column) AS ref_att
          FROM pg_constraint k
          LEFT JOIN tenancy.protected_tables pf ON pf.rel = k.conrelid
          LEFT JOIN tenancy.protected_tables pr ON pr.rel = k.confrelid
         WHERE k.contype = 'f'
           AND (k.oid IN (SELECT d.objid FROM pg_event_trigger_ddl_commands() d)
                OR k.conrelid = ANY (touched_rels) OR k.confrelid = ANY (touched_rels))
      ) f
     WHERE f.ref_protected <> f.from_protected
        OR (f.ref_protected AND f.from_protected
            AND NOT EXISTS (SELECT 1 FROM unnest(f.conkey, f.confkey) u(a, b) WHERE u.a = f.from_att AND u.b = f.ref_att))
     LIMIT 1;
    IF problem IS NOT NULL THEN
      RAISE EXCEPTION '% refused: %', tg_tag, problem
        USING ERRCODE = '42501',
              HINT = 'Referential actions and checks run without row level security: reference protected tables only from protected tables, with the tenant columns paired in the key (FOREIGN KEY (organization_id, x_id) REFERENCES t (organization_id, id)).';
    END IF;
  END IF;
  -- DETACH PARTITION drops the triggers the partition had from its parent: the table stays
  -- registered (and under row level security) but its guards are gone, and every later DDL
  -- was refused until a DBA ran protect(). Restore them at once.
  IF tg_tag = 'ALTER TABLE' THEN
    -- (Counted in pg_trigger: no relation is opened, so no lock is taken on the others.)
    FOR t IN SELECT p.rel, p.tenant_column, p.audited FROM tenancy.protected_tables p
              WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.rel)
                AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = p.rel)
                AND (SELECT count(*) FROM pg_trigger g WHERE g.tgrelid = p.rel
                        AND g.tgname IN ('tenancy_tenant_immutable', 'tenancy_no_truncate')) < 2 LOOP
      PERFORM tenancy.protect(t.rel::text, t.tenant_column, audit => t.audited);
      INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('repaired', t.rel::text, 'triggers restored after ' || tg_tag);
    END LOOP;
  END IF;
END $$;
CREATE OR REPLACE FUNCTION tenancy.guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  t record;
  problem text;
BEGIN
  -- protect()/unprotect() at work, or a superuser restoring a dump (tenancy.restore_mode).
  IF tenancy.in_maintenance() OR coalesce(current_setting('tenancy.restore_mode', true), 'off') = 'on' THEN
    RETURN;
  END IF;
  PERFORM tenancy.check_audit_trail_guards();
  -- The protected tables this drop touched (their own objects: policies, triggers,
  -- constraints, columns), and those that are gone. Only these: a problem on another table
  -- must not make every DROP in the database fail (the owner could otherwise stop all DDL).
  FOR t IN SELECT p.schema_name, p.table_name, p.rel,
                  EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.rel) AS present
             FROM tenancy.protected_tables p
            WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.rel)
               OR EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d
                           WHERE d.objid = p.rel::oid
                              OR (d.address_names[1] = p.schema_name AND d.address_names[2] = p.table_name)) LOOP
    IF NOT t.present THEN
      -- The table itself was dropped: nothing left to protect.
      DELETE FROM tenancy.protected_tables p WHERE p.rel = t.rel;
      INSERT INTO tenancy.protection_log (action, object) VALUES ('dropped', format('%I.%I', t.schema_name, t.table_name));
      CONTINUE;
    END IF;
    -- ALTER TABLE ... DROP COLUMN destroys every tenant's values in it: no tenant's audit
    -- trail can hold that event, so the registry's log records who did it.
    INSERT INTO tenancy.protection_log (action, object, detail)
      SELECT 'column_dropped', t.rel::text, d.object_identity
        FROM pg_event_trigger_dropped_objects() d
       WHERE d.object_type = 'table column' AND d.objid = t.rel::oid;
    problem := tenancy.protection_problem(t.rel);
    IF problem IS NOT NULL THEN
      RAISE EXCEPTION 'DROP refused on protected table %: %', t.rel, problem
        USING ERRCODE = '42501', HINT = format('Use SELECT tenancy.unprotect(%L) as a superuser; it is recorded. Restoring a dump? Run pg_restore as a superuser with PGOPTIONS=''-c tenancy.restore_mode=on''.', t.rel::text);
    END IF;
  END LOOP;
END $$;
-- Findings of tenancy.isolation_report() a superuser recorded as intended (a global user
-- table, sign-in tables): shown in tenancy.acknowledged_findings instead of the report.
CREATE TABLE tenancy.acknowledgements (
  object          text NOT NULL,
  finding         text NOT NULL,
  reason          text NOT NULL CHECK (pg_catalog.length(pg_catalog.btrim(reason)) OPERATOR(pg_catalog.>) 0),
  acknowledged_by name NOT NULL DEFAULT session_user,
  acknowledged_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (object, finding)
);
COMMENT ON TABLE tenancy.acknowledgements IS
  'Report findings a superuser recorded as intended, with the reason, who and when (tenancy.acknowledge).';
SELECT pg_catalog.pg_extension_config_dump('tenancy.acknowledgements', '');
REVOKE ALL ON tenancy.acknowledgements FROM PUBLIC;

-- Citus: every shard placement of every protected Citus table, checked on the node that holds
-- it against its table on this node (the coordinator). Citus re-creates policies on shards
-- from its own deparser, which drops AS RESTRICTIVE (Citus 14.0.1), and a node's own DDL
-- reaches its shards without passing the coordinator's guards. Nothing without Citus.
-- The shard names travel as one quoted array literal; the command is catalog-only and
-- schema-qualified, whatever the node's search_path.
CREATE OR REPLACE FUNCTION tenancy.shard_findings()
RETURNS TABLE (severity text, object text, finding text, fix text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  expected jsonb;
  cmd text;
  node record;
  sh jsonb;
  want jsonb;
  seen text[] := '{}';
  obj text;
  pol record;
  trg text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
    RETURN;
  END IF;
  -- shard name -> its table, the table's policies (name -> permissive) and the triggers
  -- pg_tenancy put on it.
  EXECUTE $q$
    SELECT jsonb_object_agg(shard_name(sh.logicalrelid, sh.shardid), jsonb_build_object(
             'table', p.rel::text, 'shardid', sh.shardid,
             'policies', (SELECT coalesce(jsonb_object_agg(y.polname, y.polpermissive), '{}') FROM pg_policy y WHERE y.polrelid = p.rel),
             -- command, roles, USING and WITH CHECK as text, to compare with the shard's
             'definitions', (SELECT coalesce(jsonb_object_agg(y.polname, jsonb_build_array(y.polcmd,
                               (SELECT coalesce(jsonb_agg(x.n ORDER BY x.n), '[]') FROM (SELECT CASE r WHEN 0 THEN 'public' ELSE r::regrole::text END AS n FROM unnest(y.polroles) r) x),
                               pg_get_expr(y.polqual, y.polrelid), pg_get_expr(y.polwithcheck, y.polrelid))), '{}')
                             FROM pg_policy y WHERE y.polrelid = p.rel),
             'triggers', (SELECT coalesce(jsonb_agg(g.tgname ORDER BY g.tgname), '[]') FROM pg_trigger g
                           WHERE g.tgrelid = p.rel AND NOT g.tgisinternal AND g.tgname LIKE 'tenancy\_%'
                             -- Citus runs TRUNCATE's triggers on the distributed table only.
                             AND g.tgname <> 'tenancy_no_truncate')))
      FROM pg_dist_shard sh JOIN tenancy.protected_tables p ON p.rel = sh.logicalrelid$q$
    INTO expected;
  IF expected IS NULL THEN
    RETURN;
  END IF;
  cmd := format($c$SELECT pg_catalog.json_agg(pg_catalog.json_build_object('shard', s.name, 'rls', c.relrowsecurity, 'force', c.relforcerowsecurity,
      'policies', (SELECT pg_catalog.json_object_agg(y.polname, y.polpermissive) FROM pg_catalog.pg_policy y WHERE y.polrelid OPERATOR(pg_catalog.=) c.oid),
      'definitions', (SELECT pg_catalog.json_object_agg(y.polname, pg_catalog.json_build_array(y.polcmd,
          (SELECT pg_catalog.json_agg(x.n ORDER BY x.n) FROM (SELECT CASE r WHEN 0 THEN 'public' ELSE r::pg_catalog.regrole::pg_catalog.text END AS n FROM pg_catalog.unnest(y.polroles) r) x),
          pg_catalog.pg_get_expr(y.polqual, y.polrelid), pg_catalog.pg_get_expr(y.polwithcheck, y.polrelid)))
        FROM pg_catalog.pg_policy y WHERE y.polrelid OPERATOR(pg_catalog.=) c.oid),
      'triggers', (SELECT pg_catalog.json_object_agg(g.tgname, g.tgenabled) FROM pg_catalog.pg_trigger g WHERE g.tgrelid OPERATOR(pg_catalog.=) c.oid AND NOT g.tgisinternal)))
    FROM pg_catalog.unnest(%L::pg_catalog.text[]) s(name)
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(s.name)$c$,
    ARRAY(SELECT jsonb_object_keys(expected)));
  FOR node IN EXECUTE $q$
      SELECT r.success, r.result, coalesce(n.nodename || ':' || n.nodeport, 'node ' || r.nodeid) AS name
        FROM run_command_on_all_nodes($1) r LEFT JOIN pg_dist_node n ON n.nodeid = r.nodeid$q$ USING cmd LOOP
    IF NOT node.success THEN
      RETURN QUERY SELECT 'high', node.name, 'shards on this node could not be checked: ' || left(node.result, 200),
                          'Bring the node back and run the report again.';
      CONTINUE;
    END IF;
    CONTINUE WHEN coalesce(node.result, '') = '';
    FOR sh IN SELECT * FROM jsonb_array_elements(node.result::jsonb) LOOP
      want := expected -> (sh ->> 'shard');
      CONTINUE WHEN want IS NULL;
      seen := seen || (sh ->> 'shard');
      obj := format('shard %s of %s on %s', sh ->> 'shard', want ->> 'table', node.name);
      IF NOT (sh ->> 'rls')::boolean THEN
        RETURN QUERY SELECT 'critical', obj, 'row level security is disabled on the shard', format('SELECT tenancy.protect(%L);', want ->> 'table');
      ELSIF NOT (sh ->> 'force')::boolean THEN
        RETURN QUERY SELECT 'critical', obj, 'row level security is not forced on the shard', format('SELECT tenancy.protect(%L);', want ->> 'table');
      END IF;
      FOR pol IN SELECT e.key, e.value::boolean AS permissive, (sh -> 'policies' ->> e.key)::boolean AS on_shard
                   FROM jsonb_each_text(want -> 'policies') e LOOP
        IF pol.on_shard IS NULL THEN
          RETURN QUERY SELECT CASE WHEN pol.permissive THEN 'warning' ELSE 'critical' END, obj,
                              format('policy %I of the table is missing on the shard', pol.key),
                              format('SELECT tenancy.protect(%L);', want ->> 'table');
        ELSIF pol.on_shard AND NOT pol.permissive THEN
          RETURN QUERY SELECT 'critical', obj,
                              format('policy %I is PERMISSIVE on the shard but RESTRICTIVE on the table: any permissive policy widens access there', pol.key),
                              CASE WHEN pol.key = 'tenancy_tenant_floor' THEN format('SELECT tenancy.protect(%L);', want ->> 'table')
                                   ELSE format('On the node: DROP POLICY %I ON %s and CREATE it again AS RESTRICTIVE (Citus drops AS RESTRICTIVE when it copies policies).', pol.key, sh ->> 'shard') END;
        ELSIF NOT pol.on_shard AND pol.permissive THEN
          RETURN QUERY SELECT 'warning', obj, format('policy %I is RESTRICTIVE on the shard but PERMISSIVE on the table', pol.key),
                              format('SELECT tenancy.protect(%L);', want ->> 'table');
        END IF;
        IF pol.on_shard IS NOT NULL
           AND (sh -> 'definitions' -> pol.key) IS DISTINCT FROM (want -> 'definitions' -> pol.key) THEN
          RETURN QUERY SELECT 'critical', obj,
                              format('policy %I on the shard differs from the table''s (command, roles, USING or WITH CHECK)', pol.key),
                              CASE WHEN pol.key LIKE 'tenancy\_%' THEN format('SELECT tenancy.protect(%L);', want ->> 'table')
                                   ELSE format('On the node: DROP POLICY %I ON %s and create it again as on the table.', pol.key, sh ->> 'shard') END;
        END IF;
      END LOOP;
      -- A shard without policies has JSON null there (json_object_agg of no rows).
      FOR pol IN SELECT e.key, e.value::boolean AS permissive
                   FROM jsonb_each_text(CASE WHEN jsonb_typeof(sh -> 'policies') = 'object' THEN sh -> 'policies' ELSE '{}' END) e
                  WHERE NOT (want -> 'policies') ? e.key LOOP
        RETURN QUERY SELECT CASE WHEN pol.permissive THEN 'critical' ELSE 'warning' END, obj,
                            format('policy %I exists on the shard only', pol.key),
                            format('On the node: DROP POLICY %I ON %s;', pol.key, sh ->> 'shard');
      END LOOP;
      FOR trg IN SELECT jsonb_array_elements_text(want -> 'triggers') LOOP
        -- Citus names a shard's copy of a trigger <name>_<shard id>.
        IF coalesce(sh -> 'triggers' ->> (trg || '_' || (want ->> 'shardid')), '') <> 'A' THEN
          RETURN QUERY SELECT 'high', obj, format('trigger %I is missing or not enabled ALWAYS on the shard', trg),
                              format('SELECT tenancy.protect(%L);', want ->> 'table');
        END IF;
      END LOOP;
    END LOOP;
  END LOOP;
  RETURN QUERY SELECT 'high', format('shard %s of %s', k.key, k.value ->> 'table'), 'the shard was found on no node',
                      'Check pg_dist_placement and the nodes (citus_check_cluster_node_health()).'
    FROM jsonb_each(expected) k WHERE NOT k.key = ANY (seen);
END $$;
REVOKE EXECUTE ON FUNCTION tenancy.shard_findings() FROM PUBLIC;

CREATE OR REPLACE FUNCTION tenancy.isolation_findings()
RETURNS TABLE (severity text, object text, finding text, fix text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
WITH registered AS (
  SELECT c.oid, p.tenant_column
    FROM tenancy.protected_tables p
    JOIN pg_class c ON c.oid = p.rel
),
-- Column names that make an unregistered table a tenant table.
tenant_cols AS (
  SELECT 'organization_id'::name AS col
  UNION SELECT tenant_column FROM tenancy.protected_schemas
),
tenant_tables AS (
  SELECT c.oid, c.oid::regclass::text AS name, a.attnum AS tenant_attnum, a.attname AS tenant_col,
         c.relrowsecurity, c.relforcerowsecurity, c.relowner
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND NOT a.attisdropped
    JOIN tenant_cols t ON t.col = a.attname
   WHERE c.relkind IN ('r', 'p')
     AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy') AND n.nspname NOT LIKE 'pg_toast%'
     AND c.oid NOT IN (SELECT oid FROM registered)
  UNION ALL
  SELECT c.oid, c.oid::regclass::text, a.attnum, a.attname, c.relrowsecurity, c.relforcerowsecurity, c.relowner
    FROM registered r
    JOIN pg_class c ON c.oid = r.oid
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = r.tenant_column
),
findings AS (
  SELECT 'critical' AS severity, t.name AS object,
         'tenant table without row level security' AS finding,
         format('SELECT tenancy.protect(%L);', t.name) AS fix
    FROM tenant_tables t WHERE NOT t.relrowsecurity
  UNION ALL
  SELECT 'critical', t.name, 'row level security is not forced: the owner bypasses it',
         format('SELECT tenancy.protect(%L);', t.name)
    FROM tenant_tables t WHERE t.relrowsecurity AND NOT t.relforcerowsecurity
  UNION ALL
  SELECT 'critical', t.name, 'no RESTRICTIVE tenant policy: any permissive policy widens access',
         format('SELECT tenancy.protect(%L);', t.name)
    FROM tenant_tables t
   WHERE t.relrowsecurity
     AND NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = t.oid AND NOT p.polpermissive)
  UNION ALL
  SELECT 'critical', format('policy %I on %s', p.polname, t.name),
         'policy may fail open (OR / IS NULL in its expression)',
         'Drop it, or rewrite it without OR and IS NULL branches.'
    FROM tenant_tables t JOIN pg_policy p ON p.polrelid = t.oid
   WHERE coalesce(tenancy.expression_text(p.polqual, p.polrelid), '') || ' ' || coalesce(tenancy.expression_text(p.polwithcheck, p.polrelid), '')
         ~* '(\mis\s+null\M|\mor\M)'
  UNION ALL
  SELECT 'warning', format('policy %I on %s', p.polname, t.name),
         'no WITH CHECK: new rows are checked only by USING',
         'State WITH CHECK explicitly (tenancy.protect does).'
    FROM tenant_tables t JOIN pg_policy p ON p.polrelid = t.oid
   WHERE p.polcmd IN ('*', 'w') AND p.polwithcheck IS NULL
  UNION ALL
  SELECT 'high', format('constraint %I on %s', k.conname, t.name),
         CASE k.contype WHEN 'f' THEN 'foreign key without the tenant column: a cross-tenant reference'
                        WHEN 'x' THEN 'EXCLUDE constraint without the tenant column: other tenants'' rows conflict, an oracle across tenants'
                        ELSE 'UNIQUE/PRIMARY KEY without the tenant column: an existence oracle across tenants' END,
         'Include the tenant column in the key (composite keys).'
    FROM tenant_tables t JOIN pg_constraint k ON k.conrelid = t.oid
   WHERE k.contype IN ('u', 'p', 'f', 'x') AND NOT (t.tenant_attnum = ANY (k.conkey))
  UNION ALL
  SELECT 'high', format('index %s on %s', i.indexrelid::regclass, t.name),
         'unique index without the tenant column: an existence oracle across tenants',
         'Include the tenant column in the index.'
    FROM tenant_tables t JOIN pg_index i ON i.indrelid = t.oid
   -- Key columns only: a tenant column in INCLUDE does not make the uniqueness per tenant.
   WHERE i.indisunique
     AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) WITH ORDINALITY u(attnum, n)
                      WHERE u.n <= i.indnkeyatts AND u.attnum = t.tenant_attnum)
     AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
  UNION ALL
  SELECT 'warning', t.name, 'no index led by the tenant column: every tenant query scans the table',
         format('CREATE INDEX ON %s (%I);', t.name, t.tenant_col)
    FROM tenant_tables t
   WHERE NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = t.oid AND i.indkey[0] = t.tenant_attnum)
  UNION ALL
  -- A foreign key (organization_id, x_id) that no index leads with: the primary key
  -- (organization_id, id) covers only the tenant column, so deleting a parent row and every
  -- join on x_id scan all of the tenant's child rows (Supabase's unindexed_foreign_keys).
  SELECT 'warning', t.name,
         format('foreign key %I (%s) has no index led by its columns: joins on it and deletes of its parent rows scan the tenant''s rows', k.conname, c.cols),
         format('CREATE INDEX ON %s (%s);', t.name, c.cols)
    FROM tenant_tables t
    JOIN pg_constraint k ON k.conrelid = t.oid AND k.contype = 'f'
    CROSS JOIN LATERAL (
      SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY u.ord) AS cols
        FROM unnest(k.conkey) WITH ORDINALITY u(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum) c
   WHERE NOT EXISTS (
           SELECT 1 FROM pg_index i
            WHERE i.indrelid = k.conrelid AND i.indnkeyatts >= cardinality(k.conkey)
              AND (SELECT array_agg(x ORDER BY x) FROM unnest((i.indkey::int2[])[0:cardinality(k.conkey) - 1]) x)
                  = (SELECT array_agg(y ORDER BY y) FROM unnest(k.conkey) y))
  UNION ALL
  SELECT DISTINCT CASE v.relkind WHEN 'm' THEN 'critical' ELSE 'high' END, v.oid::regclass::text,
         CASE v.relkind WHEN 'm' THEN format('materialized view over tenant table %s holds every tenant''s rows', t.name)
                        ELSE format('view over tenant table %s runs with its owner''s rights (no security_invoker)', t.name) END,
         CASE v.relkind WHEN 'm' THEN 'Drop it, or replace it with a security_invoker view.'
                        ELSE format('ALTER VIEW %s SET (security_invoker = true);  -- PG 15+', v.oid::regclass) END
    FROM tenant_tables t
    JOIN pg_depend d ON d.refobjid = t.oid AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite r ON r.oid = d.objid
    JOIN pg_class v ON v.oid = r.ev_class AND v.oid <> t.oid
   WHERE v.relkind = 'm'
      OR (v.relkind = 'v' AND NOT coalesce(v.reloptions, '{}') && ARRAY['security_invoker=true', 'security_invoker=on', 'security_invoker=1'])
  UNION ALL
  SELECT DISTINCT 'high', p.oid::regprocedure::text,
         format('SECURITY DEFINER function mentions tenant table %s: it reads with its owner''s rights', t.name),
         'Make it SECURITY INVOKER, or make sure its owner is subject to FORCE RLS and the context.'
    FROM pg_proc p
    JOIN pg_namespace pn ON pn.oid = p.pronamespace
    JOIN tenant_tables t ON strpos(lower(p.prosrc), lower((SELECT relname FROM pg_class WHERE oid = t.oid)::text)) > 0
   WHERE p.prosecdef AND pn.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy')
  UNION ALL
  SELECT DISTINCT 'high', format('trigger %I on %s', tg.tgname, tg.tgrelid::regclass),
         'trigger runs a SECURITY DEFINER function on a tenant table',
         'Make the trigger function SECURITY INVOKER.'
    FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid JOIN tenant_tables t ON t.oid = tg.tgrelid
   WHERE p.prosecdef AND NOT tg.tgisinternal
     AND p.pronamespace <> 'tenancy'::regnamespace
  UNION ALL
  SELECT 'high', r.rolname::text,
         CASE WHEN r.rolsuper THEN 'login role is a superuser: it bypasses row level security'
              ELSE 'login role has BYPASSRLS' END,
         format('ALTER ROLE %I NOSUPERUSER NOBYPASSRLS;  -- or NOLOGIN', r.rolname)
    FROM pg_roles r
   WHERE r.rolcanlogin AND (r.rolsuper OR r.rolbypassrls)
     AND r.oid <> 10  -- the bootstrap superuser that installs extensions
     AND has_database_privilege(r.oid, current_database(), 'CONNECT')
  UNION ALL
  SELECT 'high', format('%s on %s', g.grantee, t.name),
         format('role holds %s on a tenant table', g.privilege_type),
         format('REVOKE %s ON %s FROM %I;', g.privilege_type, t.name, g.grantee)
    FROM tenant_tables t
    JOIN LATERAL (SELECT (aclexplode(c.relacl)).* FROM pg_class c WHERE c.oid = t.oid) a ON true
    JOIN LATERAL (SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,
                         a.privilege_type) g ON true
   WHERE a.privilege_type IN ('TRUNCATE', 'REFERENCES') AND a.grantee <> t.relowner
  UNION ALL
  SELECT 'critical', p.oid::regprocedure::text,
         'IMMUTABLE function reads the tenant context or reveals PHI: its result can be frozen into plans, indexes and statistics',
         'Declare it STABLE.'
    FROM pg_proc p JOIN pg_namespace pn ON pn.oid = p.pronamespace
   WHERE p.provolatile = 'i' AND pn.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy')
     AND (p.prosrc ILIKE '%current_org_id%' OR p.prosrc ILIKE '%require_org%' OR p.prosrc ILIKE '%phi_reveal%')
  UNION ALL
  SELECT 'high', r.rolname::text,
         format('login role is a member of %s: it can read or write server files, the PHI key ring included (COPY ... FROM ''<key file>'')', g.rolname),
         format('REVOKE %I FROM %I;', g.rolname, r.rolname)
    FROM pg_roles r
    CROSS JOIN (VALUES ('pg_read_server_files'::name), ('pg_write_server_files'), ('pg_execute_server_program')) g(rolname)
   WHERE r.rolcanlogin AND NOT r.rolsuper AND r.oid <> 10
     AND pg_has_role(r.oid, g.rolname, 'MEMBER')
  UNION ALL
  SELECT 'critical', format('%s.%I', t.name, t.tenant_col),
         format('tenant column has the nondeterministic collation %I: tenants whose ids differ only in case or accents are merged', co.collname),
         format('ALTER TABLE %s ALTER COLUMN %I TYPE text COLLATE "C";', t.name, t.tenant_col)
    FROM tenant_tables t
    JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = t.tenant_attnum
    JOIN pg_collation co ON co.oid = a.attcollation
   WHERE NOT co.collisdeterministic
  UNION ALL
  -- O5: an index, constraint or default/generated expression that reads a PHI column through a
  -- function that is not built in (a wrapper may reveal, and the result is stored).
  SELECT DISTINCT 'high', od.text || ' on ' || t.name,
         format('expression over PHI column %I calls %s: if it reveals, plaintext is stored', a.attname, f.oid::regprocedure),
         'Drop it: index or check only the ciphertext (tenancy.phi_key_id) or a keyed hash computed by the application.'
    FROM tenant_tables t
    JOIN (SELECT 'pg_class'::regclass AS classid, i.indexrelid AS objid, i.indrelid AS rel FROM pg_index i
          UNION ALL SELECT 'pg_constraint'::regclass, k.oid, k.conrelid FROM pg_constraint k WHERE k.conrelid <> 0
          UNION ALL SELECT 'pg_attrdef'::regclass, ad.oid, ad.adrelid FROM pg_attrdef ad) o ON o.rel = t.oid
    JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid
    JOIN pg_depend dc ON dc.classid = o.classid AND dc.objid = o.objid AND dc.refclassid = 'pg_class'::regclass
                     AND dc.refobjid = t.oid AND dc.refobjsubid > 0
    JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = dc.refobjsubid AND a.atttypid = 'tenancy.phi'::regtype
    JOIN pg_proc f ON d.refclassid = 'pg_proc'::regclass AND f.oid = d.refobjid
    CROSS JOIN LATERAL (SELECT tenancy.object_text(d.classid, d.objid, d.objsubid)) od(text)
   WHERE f.oid >= 16384
     AND od.text IS NOT NULL
     AND f.oid NOT IN ('tenancy.phi_key_id(bytea)'::regprocedure, 'tenancy.phi_is_envelope(bytea)'::regprocedure)
  UNION ALL
  SELECT 'high', t.name, fc.problem,
         'Drop it, or have a superuser own the function (review it first): it sees every tenant''s rows.'
    FROM tenant_tables t
    CROSS JOIN LATERAL (SELECT tenancy.foreign_code_problem(t.oid::regclass)) fc(problem)
   WHERE fc.problem IS NOT NULL
  UNION ALL
  SELECT 'critical', t.name,
         format('child of %s, which is not protected: reads through the parent skip this table''s row level security', i.inhparent::regclass),
         format('SELECT tenancy.protect(%L);', i.inhparent::regclass::text)
    FROM tenant_tables t JOIN tenancy.protected_tables p ON p.rel = t.oid
    JOIN pg_inherits i ON i.inhrelid = t.oid
   WHERE NOT EXISTS (SELECT 1 FROM tenancy.protected_tables q WHERE q.rel = i.inhparent)
  UNION ALL
  SELECT 'high', coalesce('database ' || d.datname, 'all databases') || coalesce(', role ' || r.rolname, ''),
         format('setting %s makes sessions (superusers'' included) start as another role', cfg),
         format('ALTER %s RESET %s;', CASE WHEN s.setrole = 0 THEN 'DATABASE ' || quote_ident(d.datname) ELSE 'ROLE ' || quote_ident(r.rolname) END,
                split_part(cfg, '=', 1))
    FROM pg_db_role_setting s
    LEFT JOIN pg_database d ON d.oid = s.setdatabase
    LEFT JOIN pg_roles r ON r.oid = s.setrole
    CROSS JOIN LATERAL unnest(s.setconfig) cfg
   WHERE split_part(cfg, '=', 1) IN ('role', 'session_authorization')
     AND (s.setdatabase = 0 OR d.datname = current_database())
  UNION ALL
  -- A search_path setting that lists another schema before pg_catalog: every session's
  -- unqualified operators and functions (a superuser's `WHERE severity = 'critical'` on this
  -- very report) resolve there first, to the code of that schema's owner.
  SELECT 'critical', coalesce('database ' || d.datname, 'all databases') || coalesce(', role ' || r.rolname, ''),
         format('setting %s puts schemas before pg_catalog: every session runs their operators and functions first', cfg),
         format('ALTER %s RESET search_path;', CASE WHEN s.setrole = 0 THEN 'DATABASE ' || quote_ident(d.datname) ELSE 'ROLE ' || quote_ident(r.rolname) END)
    FROM pg_db_role_setting s
    LEFT JOIN pg_database d ON d.oid = s.setdatabase
    LEFT JOIN pg_roles r ON r.oid = s.setrole
    CROSS JOIN LATERAL unnest(s.setconfig) cfg
   WHERE split_part(cfg, '=', 1) = 'search_path'
     AND (s.setdatabase = 0 OR d.datname = current_database())
     AND position('pg_catalog' IN cfg) > 0
     AND btrim(split_part(substr(cfg, length('search_path=') + 1), ',', 1), ' "') <> 'pg_catalog'
  UNION ALL
  -- Foreign keys between a protected table and one that is not: referential actions and
  -- checks run without row level security (a cascade from the other table rewrites or
  -- deletes any tenant's rows; a key from it tests whether any tenant's value exists).
  SELECT 'high', format('foreign key %I on %s', k.conname, k.conrelid::regclass),
         format('references %s across the protection boundary: its checks and actions run without row level security', k.confrelid::regclass),
         format('ALTER TABLE %s DROP CONSTRAINT %I;', k.conrelid::regclass, k.conname)
    FROM pg_constraint k
   WHERE k.contype = 'f'
     AND EXISTS (SELECT 1 FROM tenancy.protected_tables p WHERE p.rel = k.conrelid)
         <> EXISTS (SELECT 1 FROM tenancy.protected_tables p WHERE p.rel = k.confrelid)
  UNION ALL
  SELECT 'high', format('publication %I', pub.pubname),
         format('publishes tenant table %s: subscribers receive every tenant''s rows', t.name),
         'Publish to subscribers that enforce the same isolation, or drop the table from the publication.'
    FROM pg_publication pub JOIN tenant_tables t
      ON pub.puballtables OR EXISTS (SELECT 1 FROM pg_publication_rel pr WHERE pr.prpubid = pub.oid AND pr.prrelid = t.oid)
  UNION ALL
  SELECT 'critical', format('event trigger %I', e.evtname),
         'pg_tenancy drift guard is not enabled ALWAYS: protected tables can be weakened unnoticed',
         format('ALTER EVENT TRIGGER %I ENABLE ALWAYS;', e.evtname)
    FROM pg_event_trigger e
   WHERE e.evtname IN ('tenancy_guard_ddl', 'tenancy_guard_drop') AND e.evtenabled <> 'A'
  UNION ALL
  -- A schema protected with audit => true: each of its protected tables is audited.
  SELECT 'high', p.rel::text,
         format('not audited, in schema %I, which is protected with audit => true', s.schema_name),
         format('SELECT tenancy.protect(%L, %L, audit => true);', p.rel::text, p.tenant_column)
    FROM tenancy.protected_tables p
    JOIN pg_class c ON c.oid = p.rel
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN tenancy.protected_schemas s ON s.schema_name = n.nspname AND s.audited
   WHERE NOT p.audited
  UNION ALL
  SELECT 'critical', p.rel::text,
         'registered as protected but ' || pp.problem,
         format('SELECT tenancy.protect(%L);', p.rel::text)
    FROM tenancy.protected_tables p
    CROSS JOIN LATERAL (SELECT tenancy.protection_problem(p.rel)) pp(problem)
   WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.rel)
     AND pp.problem IS NOT NULL
  UNION ALL
  -- A column named like a tenant id under another name (Better Auth's organizationId, org_id,
  -- tenant_id, ...) in a table that is neither protected nor named by a protected schema.
  SELECT 'high', c.oid::regclass::text,
         format('column %I looks like a tenant id, but the table is not protected: its rows are every tenant''s', a.attname),
         format('SELECT tenancy.protect(%L, %L);  -- or, if intended: SELECT tenancy.acknowledge(%L, <this finding>, <reason>);',
                c.oid::regclass::text, a.attname, c.oid::regclass::text)
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
   WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
     AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy') AND n.nspname NOT LIKE 'pg_toast%'
     AND lower(replace(a.attname, '_', '')) IN ('orgid', 'organizationid', 'organisationid', 'tenantid', 'tenant', 'accountid', 'workspaceid', 'teamid', 'clinicid', 'practiceid')
     AND a.attname NOT IN (SELECT col FROM tenant_cols)
     AND c.oid NOT IN (SELECT oid FROM registered)
  UNION ALL
  SELECT * FROM tenancy.shard_findings()
)
SELECT severity, object, finding, fix FROM findings
ORDER BY CASE severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 ELSE 2 END, object, finding
$$;
REVOKE EXECUTE ON FUNCTION tenancy.isolation_findings() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.isolation_findings() IS
  'Every finding of the report, acknowledged or not. Superuser by default.';

CREATE OR REPLACE FUNCTION tenancy.isolation_report()
RETURNS TABLE (severity text, object text, finding text, fix text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT f.severity, f.object, f.finding, f.fix
    FROM tenancy.isolation_findings() f
   WHERE NOT EXISTS (SELECT 1 FROM tenancy.acknowledgements a WHERE a.object = f.object AND a.finding = f.finding)
   ORDER BY CASE f.severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 ELSE 2 END, f.object, f.finding
$$;
REVOKE EXECUTE ON FUNCTION tenancy.isolation_report() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.isolation_report() IS
  'Every isolation hole found in this database that no superuser acknowledged as intended: one row per finding with severity, object, finding and fix. Superuser by default.';

-- Records a finding as intended. Superuser; the finding must be one the report shows now
-- (object and finding as it prints them); the reason is kept with who and when.
CREATE OR REPLACE FUNCTION tenancy.acknowledge(object text, finding text, reason text)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION 'only a superuser may call tenancy.acknowledge()' USING ERRCODE = '42501';
  END IF;
  IF object IS NULL OR finding IS NULL OR coalesce(btrim(reason), '') = '' THEN
    RAISE EXCEPTION 'tenancy.acknowledge() needs an object, a finding and a reason' USING ERRCODE = '22023',
      HINT = 'Copy object and finding from tenancy.isolation_report(); say why it is intended.';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM tenancy.isolation_findings() f WHERE f.object = acknowledge.object AND f.finding = acknowledge.finding) THEN
    RAISE EXCEPTION 'the report has no finding % on %', finding, object USING ERRCODE = '22023',
      HINT = 'Copy object and finding exactly as tenancy.isolation_report() prints them.';
  END IF;
  INSERT INTO tenancy.acknowledgements (object, finding, reason) VALUES (object, finding, reason)
    ON CONFLICT ON CONSTRAINT acknowledgements_pkey DO UPDATE
      SET reason = EXCLUDED.reason, acknowledged_by = session_user, acknowledged_at = now();
  INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('acknowledged', object, finding || ': ' || reason);
END $$;
REVOKE EXECUTE ON FUNCTION tenancy.acknowledge(text, text, text) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.acknowledge(text, text, text) IS
  'Records a report finding as intended, with its reason (superuser; recorded in tenancy.protection_log). It then shows in tenancy.acknowledged_findings, not in the report.';

CREATE OR REPLACE FUNCTION tenancy.unacknowledge(object text, finding text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION 'only a superuser may call tenancy.unacknowledge()' USING ERRCODE = '42501';
  END IF;
  DELETE FROM tenancy.acknowledgements a WHERE a.object = unacknowledge.object AND a.finding = unacknowledge.finding;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('unacknowledged', object, finding);
  RETURN true;
END $$;
REVOKE EXECUTE ON FUNCTION tenancy.unacknowledge(text, text) FROM PUBLIC;

-- Acknowledged findings that the report still finds (an acknowledgement whose finding went
-- away stays in tenancy.acknowledgements, shown here no more).
CREATE VIEW tenancy.acknowledged_findings AS
  SELECT f.severity, f.object, f.finding, a.reason, a.acknowledged_by, a.acknowledged_at
    FROM tenancy.isolation_findings() f
    JOIN tenancy.acknowledgements a ON a.object = f.object AND a.finding = f.finding;
REVOKE ALL ON tenancy.acknowledged_findings FROM PUBLIC;
-- One batch of key rotation for a column (superuser: RLS does not apply), one tenant at a time.
-- The tenant's audit chain head is locked before any of its rows, the order every writer of the
-- tenant uses, so rotation cannot deadlock with the application (it did when a batch spanned
-- tenants and locked rows first). Rows already under the active key are skipped, so it is
-- resumable and safe to repeat; locked rows are skipped and picked up by a later batch.
CREATE OR REPLACE FUNCTION tenancy.phi_rotate_column(
  table_name text, column_name text, tenant_column text DEFAULT 'organization_id',
  label text DEFAULT NULL, batch_size integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  active bigint;
  done bigint;
  org text;
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION 'only a superuser may call tenancy.phi_rotate_column()' USING ERRCODE = '42501';
  END IF;
  -- The UPDATE below fires the table's triggers and domain checks as this superuser: code
  -- of any other role (the schema owner's triggers) is refused for the rest of the batch.
  PERFORM tenancy.refuse_foreign_code_in_transaction();
  SELECT key_id INTO active FROM tenancy.phi_key_status() WHERE phi_key_status.active;
  IF active IS NULL THEN
    RAISE EXCEPTION 'no active PHI key is loaded' USING ERRCODE = '55000',
      HINT = 'SELECT * FROM tenancy.phi_key_status() shows the key ring state.';
  END IF;
  EXECUTE format(
    'SELECT s.%2$I::text FROM %1$s s WHERE s.%3$I IS NOT NULL AND tenancy.phi_key_id(s.%3$I) <> $1 LIMIT 1',
    table_name::regclass, tenant_column, column_name)
  INTO org USING active;
  IF org IS NULL THEN
    RETURN 0;
  END IF;
  EXECUTE format(
    'UPDATE %1$s t SET %2$I = tenancy.phi_rotate_for_tenant(t.%2$I, t.%3$I::text, $1)
      WHERE t.ctid = ANY (ARRAY(SELECT s.ctid FROM %1$s s
                                 WHERE s.%3$I::text = $4 AND s.%2$I IS NOT NULL AND tenancy.phi_key_id(s.%2$I) <> $2
                                 LIMIT $3 FOR UPDATE SKIP LOCKED))',
    table_name::regclass, column_name, tenant_column)
  USING label, active, batch_size, org;
  GET DIAGNOSTICS done = ROW_COUNT;
  RETURN done;
END $$;
-- The whole column, committing after each batch; CALL it outside a transaction block. A batch
-- of 0 with values still under an old key means their rows were locked: wait and go on.
CREATE OR REPLACE PROCEDURE tenancy.phi_rotate_all(
  table_name text, column_name text, tenant_column text DEFAULT 'organization_id',
  label text DEFAULT NULL, batch_size integer DEFAULT 1000)
-- No SET clause: a procedure with one cannot COMMIT. So it runs under the caller's search_path,
-- and every function and operator below is qualified (a superuser runs it; an owner-controlled
-- schema early in the database's search_path must not shadow anything).
LANGUAGE plpgsql AS $$
DECLARE
  n bigint;
  total bigint := 0;
  remaining boolean;
BEGIN
  LOOP
    n := tenancy.phi_rotate_column(table_name, column_name, tenant_column, label, batch_size);
    total := total OPERATOR(pg_catalog.+) n;
    COMMIT;
    IF n OPERATOR(pg_catalog.=) 0 THEN
      EXECUTE pg_catalog.format(
        'SELECT EXISTS (SELECT 1 FROM %1$s s WHERE s.%2$I IS NOT NULL AND tenancy.phi_key_id(s.%2$I) OPERATOR(pg_catalog.<>)
                          (SELECT k.key_id FROM tenancy.phi_key_status() k WHERE k.active))',
        table_name::pg_catalog.regclass, column_name) INTO remaining;
      EXIT WHEN NOT remaining;
      PERFORM pg_catalog.pg_sleep(0.1);
    ELSE
      RAISE NOTICE 'pg_tenancy: % rotated % values so far', column_name, total;
    END IF;
  END LOOP;
  RAISE NOTICE 'pg_tenancy: % rotated, % values in all', column_name, total;
END $$;
REVOKE EXECUTE ON FUNCTION tenancy.has_rows(regclass) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.foreign_code_problem(regclass) IS
  'Code of a role that is not a superuser which a table''s constraints, indexes, defaults, domains, triggers or rules run over its rows, or NULL.';
COMMENT ON FUNCTION tenancy.has_rows(regclass) IS 'Whether a table holds rows of its own (for the drift guard).';

-- II-5/9: pg_tenancy's policies read the tenant through an InitPlan, once per query
-- execution (`col = (SELECT tenancy.current_org_id())`), not once per row of a scan.
DO $policies$
DECLARE
  t record;
  pred text;
BEGIN
  FOR t IN SELECT p.rel, p.tenant_column, p.tenant_type FROM tenancy.protected_tables p
            WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) p.rel) LOOP
    pred := pg_catalog.format('%I = (SELECT %s)', t.tenant_column,
              CASE t.tenant_type WHEN 'uuid' THEN 'tenancy.current_org_id()' ELSE 'tenancy.current_org_id_text()' END);
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_policy WHERE polrelid OPERATOR(pg_catalog.=) t.rel AND polname OPERATOR(pg_catalog.=) 'tenancy_tenant_floor') THEN
      EXECUTE pg_catalog.format('ALTER POLICY tenancy_tenant_floor ON %s USING (%s) WITH CHECK (%s)', t.rel, pred, pred);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_policy WHERE polrelid OPERATOR(pg_catalog.=) t.rel AND polname OPERATOR(pg_catalog.=) 'tenancy_tenant_rows') THEN
      EXECUTE pg_catalog.format('ALTER POLICY tenancy_tenant_rows ON %s USING (%s) WITH CHECK (%s)', t.rel, pred, pred);
    END IF;
  END LOOP;
END
$policies$;

-- II-6/9: audit events are written without a chain-head lock (writers of one tenant no longer
-- run one at a time; REPEATABLE READ and SERIALIZABLE writers no longer collide on the tip)
-- and sealed into per-tenant blocks after commit. Events written so far keep their v1 chain,
-- which the first block of each tenant links to.
ALTER TABLE tenancy.audit_events DROP CONSTRAINT audit_events_pkey;
ALTER TABLE tenancy.audit_events ALTER COLUMN seq DROP NOT NULL, ALTER COLUMN prev_hash DROP NOT NULL,
  ADD COLUMN payload_digest bytea;
ALTER TABLE tenancy.audit_events ADD PRIMARY KEY (organization_id, event_id);
CREATE UNIQUE INDEX audit_events_v1_seq ON tenancy.audit_events (organization_id, seq) WHERE seq IS NOT NULL;
COMMENT ON TABLE tenancy.audit_events IS
  'Append-only audit trail: one row per audited change, operator action and PHI reveal; scoped to its tenant by RLS; payload AES-256-GCM encrypted; each event hashed when written, sealed into per-tenant hash-chained blocks after commit (tenancy.audit_seals, tenancy.audit_verify).';
COMMENT ON COLUMN tenancy.audit_events.seq IS 'Position in the tenant''s v1 hash chain (events written by 0.1.0 and 0.2.0); NULL for v2 events, whose position is their place in tenancy.audit_seals.';
COMMENT ON COLUMN tenancy.audit_events.event_id IS 'Identity of the event (tenancy.audit_event_id), increasing in the order events were written.';
COMMENT ON COLUMN tenancy.audit_events.prev_hash IS 'v1 events: the previous event''s hash. NULL for v2 events (linked by their block).';
COMMENT ON COLUMN tenancy.audit_events.hash IS 'SHA-256 over the event''s content (v1: and prev_hash) (docs/audit.md).';
COMMENT ON COLUMN tenancy.audit_events.payload_digest IS 'v2 events: SHA-256 commitment to the payload''s plaintext and a secret salt inside the ciphertext; the payload can be re-encrypted under a new key without changing it.';

-- The sealer's work list: per writing statement and tenant, the ids and hashes of up to 40
-- of its events, written with them (so it commits, or vanishes, with them, subtransactions
-- included). The sealer deletes rows and builds blocks from them without reading the
-- events; audit_verify checks every sealed event against its hash. Small (drained
-- continuously), read whole: no index.
CREATE TABLE tenancy.audit_pending (
  organization_id text COLLATE "C" NOT NULL,
  event_ids       bigint[] NOT NULL,
  hashes          bytea NOT NULL,
  occurred_at     timestamptz NOT NULL
);
COMMENT ON TABLE tenancy.audit_pending IS
  'Audit events waiting for the sealer: tenant, event ids, their hashes (32 bytes each, in order), time written.';

-- The seals: per tenant, blocks of events in chain order, each hashing the previous block.
CREATE TABLE tenancy.audit_seals (
  organization_id text COLLATE "C" NOT NULL,
  block_no        bigint NOT NULL,
  first_seq       bigint NOT NULL,
  event_count     integer NOT NULL,
  event_ids       bigint[] NOT NULL,
  newest_event_at timestamptz NOT NULL,
  sealed_at       timestamptz NOT NULL,
  prev_hash       bytea NOT NULL,
  hash            bytea NOT NULL,
  PRIMARY KEY (organization_id, block_no)
);
COMMENT ON TABLE tenancy.audit_seals IS
  'Sealed blocks of each tenant''s audit trail: its events (ids, in chain order, ascending) and a SHA-256 over the previous block''s hash and the events'' hashes (docs/audit.md). Written by the sealer only.';
COMMENT ON COLUMN tenancy.audit_seals.first_seq IS 'Position of the block''s first event in the tenant''s trail (after the v1 chain, from 1).';

ALTER TABLE tenancy.audit_chain_heads ADD COLUMN last_block bigint NOT NULL DEFAULT 0,
  ADD COLUMN last_seq bigint, ADD COLUMN last_hash bytea;
COMMENT ON TABLE tenancy.audit_chain_heads IS
  'One row per tenant chain: the sealer''s tip (last block, position, hash) and the purge anchor (position and hash of the last purged event or block).';
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_pending', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_seals', '');
ALTER TABLE tenancy.audit_seals ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenancy.audit_seals FORCE ROW LEVEL SECURITY;
CREATE POLICY tenancy_tenant_floor ON tenancy.audit_seals AS RESTRICTIVE FOR ALL TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text())
  WITH CHECK (organization_id = tenancy.current_org_id_text());
CREATE POLICY tenancy_tenant_rows ON tenancy.audit_seals AS PERMISSIVE FOR SELECT TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text());

REVOKE ALL ON tenancy.audit_events, tenancy.audit_chain_heads, tenancy.audit_event_id,
              tenancy.audit_pending, tenancy.audit_seals FROM PUBLIC;
GRANT SELECT ON tenancy.audit_events, tenancy.audit_seals TO PUBLIC;

CREATE OR REPLACE FUNCTION tenancy.audit_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- tenancy.audit_purge() (superuser, itself recorded) is the one way to delete events.
  IF TG_OP = 'DELETE' AND tenancy.in_maintenance() THEN
    RETURN OLD;
  END IF;
  -- tenancy.audit_rekey() (superuser) re-encrypts v2 payloads under the active key: the
  -- payload only, whose commitment (payload_digest) the chain covers and which it keeps.
  IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_events' AND tenancy.in_maintenance()
     AND OLD.seq IS NULL AND OLD.payload_digest IS NOT NULL
     AND (to_jsonb(OLD) OPERATOR(pg_catalog.-) 'payload') OPERATOR(pg_catalog.=) (to_jsonb(NEW) OPERATOR(pg_catalog.-) 'payload') THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION '% on tenancy.% is not allowed: the audit trail is append-only', TG_OP, TG_TABLE_NAME
    USING ERRCODE = '42501',
          HINT = 'Events are written by pg_tenancy only; retention is tenancy.audit_purge() (superuser, recorded).';
END $$;
CREATE TRIGGER audit_seals_append_only BEFORE UPDATE OR DELETE ON tenancy.audit_seals
  FOR EACH ROW EXECUTE FUNCTION tenancy.audit_append_only();
CREATE TRIGGER audit_seals_no_truncate BEFORE TRUNCATE ON tenancy.audit_seals
  FOR EACH STATEMENT EXECUTE FUNCTION tenancy.audit_append_only();
ALTER TABLE tenancy.audit_seals ENABLE ALWAYS TRIGGER audit_seals_append_only;
ALTER TABLE tenancy.audit_seals ENABLE ALWAYS TRIGGER audit_seals_no_truncate;

-- audit_verify reports the unsealed tail; audit_seal and audit_rekey are new.
DROP FUNCTION tenancy.audit_verify(text);
CREATE FUNCTION tenancy."audit_verify"(
	"org" TEXT
) RETURNS TABLE (
	"ok" bool,
	"events" bigint,
	"first_broken_seq" bigint,
	"problem" TEXT,
	"unsealed" bigint,
	"oldest_unsealed" timestamp with time zone
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_verify_wrapper';
ALTER FUNCTION tenancy.audit_verify(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
CREATE FUNCTION tenancy."audit_seal"() RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_seal_wrapper';
CREATE FUNCTION tenancy."audit_rekey"(
	"org" TEXT,
	"batch_size" INT DEFAULT 1000
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_rekey_wrapper';
COMMENT ON FUNCTION tenancy.audit_verify(text) IS
  'Verify a tenant''s audit trail (v1 chain, sealed blocks, payload commitments, nothing unaccounted for): ok, events checked, first broken position and why, the unsealed tail. Superuser, or the tenant itself.';
REVOKE EXECUTE ON FUNCTION tenancy.audit_seal() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_seal() IS
  'Seal every committed audit event still pending into its tenant''s chain, now (the audit worker does it continuously in tenancy.audit_database). Returns the number sealed. Superuser.';
REVOKE EXECUTE ON FUNCTION tenancy.audit_rekey(text, integer) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_rekey(text, integer) IS
  'Re-encrypt up to batch_size audit payloads (of one tenant, or all when NULL) under the active PHI key, keeping the chain verifiable; 0 when none is left. Superuser.';
COMMENT ON FUNCTION tenancy.audit_purge(text, timestamptz) IS
  'Retention: delete a tenant''s events older than a time (a prefix of its trail: v1 events, whole sealed blocks), keep the trail verifiable from an anchor, record the purge. Superuser.';

-- 0.2.0's BEFORE STATEMENT trigger that took the chain head lock.
DO $lock$
DECLARE
  t record;
BEGIN
  FOR t IN SELECT tgrelid::pg_catalog.regclass AS rel FROM pg_catalog.pg_trigger
            WHERE tgname OPERATOR(pg_catalog.=) 'tenancy_audit_lock' AND tgparentid OPERATOR(pg_catalog.=) 0 LOOP
    EXECUTE pg_catalog.format('DROP TRIGGER tenancy_audit_lock ON %s', t.rel);
  END LOOP;
END
$lock$;

ALTER EVENT TRIGGER tenancy_guard_ddl ENABLE ALWAYS;
ALTER EVENT TRIGGER tenancy_guard_drop ENABLE ALWAYS;

-- The same loop as finalize.sql: it pins every function (the SQL ones' new definitions say
-- `SET search_path = pg_catalog, pg_temp`; ALTER FUNCTION gives the identical catalog entry).
DO $pin$
DECLARE
  f record;
BEGIN
  FOR f IN
    SELECT p.oid::pg_catalog.regprocedure AS sig, p.prokind
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace OPERATOR(pg_catalog.=) 'tenancy'::pg_catalog.regnamespace
       AND p.prokind OPERATOR(pg_catalog.<>) 'p'
       AND (p.proname::text || '(' || pg_catalog.oidvectortypes(p.proargtypes) || ')') NOT IN (
         'current_org_id()', 'current_org_id_text()', 'require_org()', 'require_org_text()',
         'current_actor()', 'context_is_signed()', 'set_org(text, text, text)', 'set_org(uuid, text, text)',
         'phi_encrypt(text, text)', 'phi_encrypt(bytea, text)', 'phi_encrypt(jsonb, text)',
         'phi_reveal(bytea, text)', 'phi_reveal_bytea(bytea, text)', 'phi_reveal_jsonb(bytea, text)',
         'phi_rotate(bytea, text)', 'phi_rotate_for_tenant(bytea, text, text)', 'phi_key_id(bytea)',
         'phi_is_envelope(bytea)', 'audit_payload(bytea, bigint)', 'in_maintenance()',
         'is_loaded_by_preload()', 'assert_preloaded()', 'confined_ddl()',
         'refuse_foreign_code_in_transaction()',
         -- These resolve the caller's table names in the caller's search_path, then pin
         -- search_path = pg_catalog, pg_temp themselves for everything they run (policy.rs).
         'protect(text, text, boolean, boolean, boolean)',
         'protect_all(text, text, text, boolean, boolean)', 'unprotect(text)')
  LOOP
    EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f.sig);
  END LOOP;
END
$pin$;

-- Values are compared and rendered by their output functions: pin the settings those depend
-- on, so a session cannot hide an UPDATE (extra_float_digits = -15 rendered 37 and 39.4 alike)
-- or change how the trail spells a value. TimeZone stays the session's: the text carries the
-- offset, so an instant is never lost.
ALTER FUNCTION tenancy.audit_trigger() SET extra_float_digits = 1;
ALTER FUNCTION tenancy.audit_trigger() SET DateStyle = 'ISO, MDY';
ALTER FUNCTION tenancy.audit_trigger() SET IntervalStyle = 'postgres';
ALTER FUNCTION tenancy.audit_trigger() SET bytea_output = 'hex';

-- The audit trigger's comment said "Row trigger" since 0.1.0; 0.2.0 attaches statement triggers.
COMMENT ON FUNCTION tenancy.audit_trigger() IS
  'Audit trigger attached by tenancy.protect(..., audit => true) as statement triggers over the transition tables (it also works as a row trigger): writes one encrypted, hash-chained audit event per changed row.';

COMMENT ON FUNCTION tenancy.object_text(oid, oid, int4) IS
  'pg_describe_object of an object, or NULL when it was dropped after the caller''s snapshot.';
COMMENT ON FUNCTION tenancy.expression_text(pg_node_tree, oid) IS
  'pg_get_expr of a stored expression, or NULL when its table was dropped after the caller''s snapshot.';

CREATE FUNCTION tenancy."audit_worker_status"() RETURNS TABLE (
	"reveal_queue_records" bigint,
	"refused_records" bigint,
	"reveal_worker_pid" INT,
	"sealer_pid" INT,
	"last_digest_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_worker_status_wrapper';
ALTER FUNCTION tenancy.audit_worker_status() SET search_path = pg_catalog, pg_temp;

-- II-7/9: one view a monitoring system polls (superusers and pg_monitor).
CREATE VIEW tenancy.audit_status AS
  SELECT w.reveal_queue_records, w.refused_records,
         (SELECT coalesce(pg_catalog.sum(pg_catalog.cardinality(p.event_ids)), 0)::bigint
            FROM tenancy.audit_pending p) AS unsealed_events,
         (SELECT pg_catalog.min(p.occurred_at) FROM tenancy.audit_pending p) AS oldest_unsealed,
         w.reveal_worker_pid IS NOT NULL
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = w.reveal_worker_pid) AS reveal_worker_running,
         w.sealer_pid IS NOT NULL
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = w.sealer_pid) AS sealer_running,
         w.last_digest_at
    FROM tenancy.audit_worker_status() w;
REVOKE ALL ON tenancy.audit_status FROM PUBLIC;
GRANT SELECT ON tenancy.audit_status TO pg_monitor;
REVOKE EXECUTE ON FUNCTION tenancy.audit_worker_status() FROM PUBLIC;
COMMENT ON VIEW tenancy.audit_status IS
  'Health of the audit trail: reveal records in flight, records the reveal worker could not write (their reveals refused), unsealed events and the oldest, whether the reveal worker and the sealer run, when the digest file was last written. Superusers and pg_monitor.';
COMMENT ON FUNCTION tenancy.audit_worker_status() IS
  'The audit workers'' shared counters behind tenancy.audit_status. Superuser.';

CREATE FUNCTION tenancy."audit_digest"() RETURNS TABLE (
	"organization_id" TEXT,
	"block_no" bigint,
	"seq" bigint,
	"hash" TEXT,
	"digest" TEXT
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_digest_wrapper';
CREATE FUNCTION tenancy."audit_verify"(
	"org" TEXT,
	"digest" TEXT
) RETURNS TABLE (
	"ok" bool,
	"events" bigint,
	"first_broken_seq" bigint,
	"problem" TEXT,
	"unsealed" bigint,
	"oldest_unsealed" timestamp with time zone
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_verify_digest_wrapper';

-- II-7/9: digests to keep outside the database, and verification against one.
ALTER FUNCTION tenancy.audit_verify(text, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION tenancy.audit_verify(text, text) IS
  'Verify a tenant''s audit trail as audit_verify(org) does, and that it extends a digest kept from tenancy.audit_digest(): truncation, rewriting and reordering since that digest are reported. Superuser, or the tenant itself.';
ALTER FUNCTION tenancy.audit_digest() SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION tenancy.audit_digest() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_digest() IS
  'Every tenant''s newest sealed position and hash, with a digest line to store outside the database (docs/audit.md). Superuser.';

CREATE FUNCTION tenancy."audit_outbox"(
	"acked_orgs" TEXT[],
	"acked_ids" bigint[],
	"max_rows" INT
) RETURNS jsonb
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_outbox_wrapper';
ALTER FUNCTION tenancy.audit_outbox(text[], bigint[], integer) SET search_path = pg_catalog, pg_temp;
-- II-8/9: on Citus, one audit trail on the coordinator, gathered from the workers.
REVOKE EXECUTE ON FUNCTION tenancy.audit_outbox(text[], bigint[], integer) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_outbox(text[], bigint[], integer) IS
  'On a Citus worker: drops the audit events its coordinator holds (tenants and ids given), returns up to max_rows pending rows and their events as jsonb for the coordinator''s sealer (docs/scale-out.md). Superuser.';

-- The database's tenant id format, set by tenancy.set_tenant_id_format() (one row, or none:
-- then tenancy.tenant_id_format decides). set_org reads it again in every backend after a
-- change (a counter in shared memory), pooled ones included.
CREATE TABLE tenancy.database_settings (
  singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  tenant_id_format text NOT NULL CHECK (tenant_id_format IN ('uuid', 'text')),
  set_at           timestamptz NOT NULL DEFAULT now(),
  set_by           name NOT NULL DEFAULT session_user
);
COMMENT ON TABLE tenancy.database_settings IS
  'This database''s tenant id format (uuid or text), for every session at its next set_org: set by tenancy.set_tenant_id_format() (superuser).';
SELECT pg_catalog.pg_extension_config_dump('tenancy.database_settings', '');
REVOKE ALL ON tenancy.database_settings FROM PUBLIC;
GRANT SELECT ON tenancy.database_settings TO PUBLIC;
CREATE FUNCTION tenancy."set_tenant_id_format"(
	"format" TEXT
) RETURNS TEXT
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'set_tenant_id_format_wrapper';
ALTER FUNCTION tenancy.set_tenant_id_format(text) SET search_path = pg_catalog, pg_temp;
-- II-9/9: the tenant id format, once per database.
REVOKE EXECUTE ON FUNCTION tenancy.set_tenant_id_format(text) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.set_tenant_id_format(text) IS
  'Set this database''s tenant id format (''uuid'' or ''text''; NULL: tenancy.tenant_id_format decides) for every session at its next set_org, pooled connections included. Superuser; recorded in tenancy.protection_log.';
