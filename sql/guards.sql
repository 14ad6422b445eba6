-- Drift guards: event triggers that keep protected tables protected.
--  * a new table (or partition) with the tenant column in a protected schema, or a partition
--    of a protected table, is protected at creation (or refused: tenancy.new_table_action);
--  * DISABLE/NO FORCE ROW LEVEL SECURITY, DROP/ALTER of pg_tenancy's policies, disabling or
--    dropping its triggers on a protected table are refused, unless tenancy.unprotect() (or
--    protect()) is the one doing it.

-- Problems with one protected table's protection, or NULL when intact.
CREATE FUNCTION tenancy.protection_problem(rel regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
  SELECT CASE
    WHEN NOT c.relrowsecurity THEN 'row level security is disabled'
    WHEN NOT c.relforcerowsecurity THEN 'row level security is not forced'
    WHEN NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = c.oid AND polname = 'tenancy_tenant_floor' AND NOT polpermissive)
      THEN 'the tenant floor policy is missing'
    WHEN NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = c.oid AND polname = 'tenancy_tenant_rows')
      THEN 'the tenant policy is missing'
    WHEN (SELECT count(*) FROM pg_trigger WHERE tgrelid = c.oid AND tgenabled = 'A'
            AND tgname IN ('tenancy_tenant_immutable', 'tenancy_no_truncate')) < 2
      THEN 'a tenancy trigger is missing or not enabled ALWAYS'
    WHEN p.audited AND (SELECT count(*) FROM pg_trigger WHERE tgrelid = c.oid AND tgenabled = 'A'
            AND tgname IN ('tenancy_audit_lock', 'tenancy_audit_insert', 'tenancy_audit_update', 'tenancy_audit_delete')) < 4
      THEN 'an audit trigger is missing or not enabled ALWAYS'
  END
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN tenancy.protected_tables p ON p.schema_name = n.nspname AND p.table_name = c.relname
  WHERE c.oid = rel
$$;

-- The audit trail's own append-only triggers and RLS must stay as installed.
CREATE FUNCTION tenancy.check_audit_trail_guards() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
  IF to_regclass('tenancy.audit_events') IS NULL THEN
    RETURN;  -- during CREATE EXTENSION, before the table exists
  END IF;
  IF (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tenancy.audit_events'::regclass AND tgenabled = 'A'
        AND tgname IN ('audit_events_append_only', 'audit_events_no_truncate')) < 2
     OR NOT (SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE oid = 'tenancy.audit_events'::regclass) THEN
    RAISE EXCEPTION 'the audit trail''s append-only guards and row level security cannot be removed'
      USING ERRCODE = '42501', HINT = 'tenancy.audit_events is append-only by design.';
  END IF;
END $$;

CREATE FUNCTION tenancy.guard_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  cmd record;
  parent_col name;
  schema_col name;
  problem text;
  rel regclass;
  t record;
BEGIN
  -- protect()/unprotect() at work, or a superuser restoring a dump (tenancy.restore_mode).
  IF tenancy.in_maintenance() OR coalesce(current_setting('tenancy.restore_mode', true), 'off') = 'on' THEN
    RETURN;
  END IF;
  PERFORM tenancy.check_audit_trail_guards();
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO') THEN
      rel := cmd.objid::regclass;
      -- A partition or inheritance child of a protected table.
      SELECT p.tenant_column INTO parent_col
        FROM pg_inherits i JOIN pg_class pc ON pc.oid = i.inhparent
        JOIN pg_namespace pn ON pn.oid = pc.relnamespace
        JOIN tenancy.protected_tables p ON p.schema_name = pn.nspname AND p.table_name = pc.relname
       WHERE i.inhrelid = cmd.objid;
      IF parent_col IS NOT NULL THEN
        PERFORM tenancy.protect(rel::text, parent_col);
        INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('auto_protect', rel::text, 'child of a protected table');
        CONTINUE;
      END IF;
      -- A new table with the tenant column in a protected schema.
      SELECT s.tenant_column INTO schema_col
        FROM tenancy.protected_schemas s
       WHERE s.schema_name = cmd.schema_name
         AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = cmd.objid AND a.attname = s.tenant_column AND NOT a.attisdropped);
      IF schema_col IS NOT NULL THEN
        IF coalesce(current_setting('tenancy.new_table_action', true), 'protect') = 'refuse' THEN
          RAISE EXCEPTION 'new table % has tenant column "%" in protected schema "%"', rel, schema_col, cmd.schema_name
            USING ERRCODE = '42501', HINT = 'tenancy.new_table_action is ''refuse'': ask a superuser to create it and run tenancy.protect().';
        END IF;
        PERFORM tenancy.protect(rel::text, schema_col);
        INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('auto_protect', rel::text, 'new table in a protected schema');
      END IF;
    ELSIF cmd.object_type IN ('table', 'policy', 'trigger') THEN
      -- ALTER TABLE, ALTER POLICY, ALTER TRIGGER ...: re-check every protected table touched.
      rel := CASE cmd.object_type
               WHEN 'table' THEN cmd.objid::regclass
               WHEN 'policy' THEN (SELECT polrelid FROM pg_policy WHERE oid = cmd.objid)::regclass
               WHEN 'trigger' THEN (SELECT tgrelid FROM pg_trigger WHERE oid = cmd.objid)::regclass
             END;
      IF rel IS NOT NULL AND EXISTS (
           SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN tenancy.protected_tables p ON p.schema_name = n.nspname AND p.table_name = c.relname
            WHERE c.oid = rel) THEN
        problem := tenancy.protection_problem(rel);
        IF problem IS NULL AND cmd.object_type = 'policy' AND EXISTS (
             SELECT 1 FROM pg_policy WHERE oid = cmd.objid AND polname IN ('tenancy_tenant_floor', 'tenancy_tenant_rows'))
           AND cmd.command_tag = 'ALTER POLICY' THEN
          problem := 'pg_tenancy''s policies cannot be altered';
        END IF;
        IF problem IS NOT NULL THEN
          RAISE EXCEPTION '% refused on protected table %: %', cmd.command_tag, rel, problem
            USING ERRCODE = '42501', HINT = format('Use SELECT tenancy.unprotect(%L) as a superuser; it is recorded. Restoring a dump? Run pg_restore as a superuser with PGOPTIONS=''-c tenancy.restore_mode=on''.', rel::text);
        END IF;
        -- ATTACH PARTITION / INHERIT: a new child of a protected table is protected too.
        FOR t IN SELECT i.inhrelid::regclass AS child FROM pg_inherits i
                  WHERE i.inhparent = rel
                    AND NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                      JOIN tenancy.protected_tables p ON p.schema_name = n.nspname AND p.table_name = c.relname
                                     WHERE c.oid = i.inhrelid) LOOP
          PERFORM tenancy.protect(t.child::text, (SELECT p.tenant_column FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                              JOIN tenancy.protected_tables p ON p.schema_name = n.nspname AND p.table_name = c.relname
                                             WHERE c.oid = rel));
          INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('auto_protect', t.child::text, 'attached to a protected table');
        END LOOP;
      END IF;
    END IF;
  END LOOP;
END $$;

CREATE FUNCTION tenancy.guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  t record;
  problem text;
BEGIN
  -- protect()/unprotect() at work, or a superuser restoring a dump (tenancy.restore_mode).
  IF tenancy.in_maintenance() OR coalesce(current_setting('tenancy.restore_mode', true), 'off') = 'on' THEN
    RETURN;
  END IF;
  PERFORM tenancy.check_audit_trail_guards();
  FOR t IN SELECT p.schema_name, p.table_name, to_regclass(format('%I.%I', p.schema_name, p.table_name)) AS rel
             FROM tenancy.protected_tables p LOOP
    IF t.rel IS NULL THEN
      -- The table itself was dropped: nothing left to protect.
      DELETE FROM tenancy.protected_tables WHERE schema_name = t.schema_name AND table_name = t.table_name;
      INSERT INTO tenancy.protection_log (action, object) VALUES ('dropped', format('%I.%I', t.schema_name, t.table_name));
      CONTINUE;
    END IF;
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
COMMENT ON FUNCTION tenancy.protection_problem(regclass) IS
  'What is wrong with a protected table''s protection, or NULL when intact.';
COMMENT ON FUNCTION tenancy.guard_ddl() IS
  'Event trigger: protects new tenant tables and partitions, refuses weakening protected ones.';
COMMENT ON FUNCTION tenancy.guard_drop() IS
  'Event trigger: refuses dropping pg_tenancy''s policies or triggers on protected tables.';

-- Fire in replica mode too: session_replication_role = replica must not switch the guards off.
ALTER EVENT TRIGGER tenancy_guard_ddl ENABLE ALWAYS;
ALTER EVENT TRIGGER tenancy_guard_drop ENABLE ALWAYS;
