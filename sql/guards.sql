-- Drift guards: event triggers that keep protected tables protected.
--  * a new table (or partition) with the tenant column in a protected schema, or a partition
--    of a protected table, is protected at creation (or refused: tenancy.new_table_action);
--  * DISABLE/NO FORCE ROW LEVEL SECURITY, DROP/ALTER of pg_tenancy's policies, disabling or
--    dropping its triggers on a protected table are refused, unless tenancy.unprotect() (or
--    protect()) is the one doing it.

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

-- Problems with one protected table's protection, or NULL when intact. Policies are checked by
-- definition (command, roles, RESTRICTIVE/PERMISSIVE, USING and WITH CHECK), not by name: a
-- policy dropped and re-created as USING (true) under pg_tenancy's name is a problem.
CREATE FUNCTION tenancy.protection_problem(rel regclass) RETURNS text
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

-- Code that a protected table's own objects would run over its rows and that belongs to a
-- role other than a superuser: CHECK and EXCLUDE constraints, index expressions and
-- predicates, column defaults and generation expressions, extended statistics expressions
-- (ANALYZE by a superuser or autovacuum evaluates them), policies, domain constraints of its
-- column types, each through a function or an operator; and any rule on it (a DO ALSO rule copies
-- every tenant's new rows). NULL when there is none. The drift guard refuses DDL by a role
-- that is not a superuser which leaves such code behind; the report flags it.
CREATE FUNCTION tenancy.foreign_code_problem(rel regclass) RETURNS text
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
CREATE FUNCTION tenancy.has_rows(rel regclass) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  found boolean;
BEGIN
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', rel) INTO found;
  RETURN found;
END $$;

-- The audit trail's own append-only triggers and RLS must stay as installed.
CREATE FUNCTION tenancy.check_audit_trail_guards() RETURNS void
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

CREATE FUNCTION tenancy.guard_ddl() RETURNS event_trigger
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

CREATE FUNCTION tenancy.guard_drop() RETURNS event_trigger
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

CREATE EVENT TRIGGER tenancy_guard_ddl ON ddl_command_end EXECUTE FUNCTION tenancy.guard_ddl();
CREATE EVENT TRIGGER tenancy_guard_drop ON sql_drop EXECUTE FUNCTION tenancy.guard_drop();

REVOKE EXECUTE ON FUNCTION tenancy.guard_ddl(), tenancy.guard_drop() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenancy.has_rows(regclass) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.foreign_code_problem(regclass) IS
  'Code of a role that is not a superuser which a table''s constraints, indexes, defaults, domains, triggers or rules run over its rows, or NULL.';
COMMENT ON FUNCTION tenancy.has_rows(regclass) IS 'Whether a table holds rows of its own (for the drift guard).';
COMMENT ON FUNCTION tenancy.object_text(oid, oid, int4) IS
  'pg_describe_object of an object, or NULL when it was dropped after the caller''s snapshot.';
COMMENT ON FUNCTION tenancy.expression_text(pg_node_tree, oid) IS
  'pg_get_expr of a stored expression, or NULL when its table was dropped after the caller''s snapshot.';
COMMENT ON FUNCTION tenancy.protection_problem(regclass) IS
  'What is wrong with a protected table''s protection, or NULL when intact.';
COMMENT ON FUNCTION tenancy.guard_ddl() IS
  'Event trigger: protects new tenant tables and partitions, refuses weakening protected ones.';
COMMENT ON FUNCTION tenancy.guard_drop() IS
  'Event trigger: refuses dropping pg_tenancy''s policies or triggers on protected tables.';

-- Fire in replica mode too: session_replication_role = replica must not switch the guards off.
ALTER EVENT TRIGGER tenancy_guard_ddl ENABLE ALWAYS;
ALTER EVENT TRIGGER tenancy_guard_drop ENABLE ALWAYS;
