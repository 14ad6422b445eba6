-- pg_tenancy 0.1.0 -> 0.2.0. Released scripts are never edited (sql/released/SHA256SUMS).
\echo Use "ALTER EXTENSION pg_tenancy UPDATE TO '0.2.0'" to load this file. \quit

-- The audit trail: the tenant column in "C" collation (cheaper comparisons in the chain's
-- primary key) and no second unique index. The policies and the view that name the column
-- are dropped around the change and re-created as 0.2.0 installs them.
DROP VIEW tenancy.my_audit_events;
DROP POLICY tenancy_tenant_floor ON tenancy.audit_events;
DROP POLICY tenancy_tenant_rows ON tenancy.audit_events;
ALTER TABLE tenancy.audit_events DROP CONSTRAINT audit_events_organization_id_event_id_key;
ALTER TABLE tenancy.audit_events ALTER COLUMN organization_id TYPE text COLLATE "C";
ALTER TABLE tenancy.audit_chain_heads ALTER COLUMN organization_id TYPE text COLLATE "C";
CREATE POLICY tenancy_tenant_floor ON tenancy.audit_events AS RESTRICTIVE FOR ALL TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text())
  WITH CHECK (organization_id = tenancy.current_org_id_text());
CREATE POLICY tenancy_tenant_rows ON tenancy.audit_events AS PERMISSIVE FOR SELECT TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text());


-- A tenant's own events, payloads decrypted (requires its context; RLS scopes the rows).
CREATE VIEW tenancy.my_audit_events WITH (security_barrier) AS
  SELECT seq, event_id, occurred_at, txid, actor, actor_verified, session_role, outer_role, action,
         table_name, row_key, changed_columns, tenancy.audit_payload(payload, event_id) AS changes
    FROM tenancy.audit_events
   WHERE organization_id = (SELECT tenancy.require_org_text());
COMMENT ON VIEW tenancy.my_audit_events IS
  'The current tenant''s audit events with decrypted change payloads (requires a tenant context).';
GRANT SELECT ON tenancy.my_audit_events TO PUBLIC;

-- The drift guards: three audit trigger names; tenancy.restore_mode for pg_restore.
CREATE OR REPLACE FUNCTION tenancy.protection_problem(rel regclass) RETURNS text
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

CREATE OR REPLACE FUNCTION tenancy.guard_ddl() RETURNS event_trigger
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

CREATE OR REPLACE FUNCTION tenancy.guard_drop() RETURNS event_trigger
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

-- One batch of key rotation for a column (superuser: RLS does not apply), one tenant at a time.
-- The tenant's audit chain head is locked before any of its rows, the order every writer of the
-- tenant uses, so rotation cannot deadlock with the application (it did when a batch spanned
-- tenants and locked rows first). Rows already under the active key are skipped, so it is
-- resumable and safe to repeat; locked rows are skipped and picked up by a later batch.
CREATE OR REPLACE FUNCTION tenancy.phi_rotate_column(
  table_name text, column_name text, tenant_column text DEFAULT 'organization_id',
  label text DEFAULT NULL, batch_size integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog AS $$
DECLARE
  active bigint;
  done bigint;
  org text;
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION 'only a superuser may call tenancy.phi_rotate_column()' USING ERRCODE = '42501';
  END IF;
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
  INSERT INTO tenancy.audit_chain_heads (organization_id) VALUES (org) ON CONFLICT DO NOTHING;
  PERFORM 1 FROM tenancy.audit_chain_heads h WHERE h.organization_id = org FOR UPDATE;
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
-- No SET clause: a procedure with one cannot COMMIT. Every name below is qualified.
LANGUAGE plpgsql AS $$
DECLARE
  n bigint;
  total bigint := 0;
  remaining boolean;
BEGIN
  LOOP
    n := tenancy.phi_rotate_column(table_name, column_name, tenant_column, label, batch_size);
    total := total + n;
    COMMIT;
    IF n = 0 THEN
      EXECUTE pg_catalog.format(
        'SELECT EXISTS (SELECT 1 FROM %1$s s WHERE s.%2$I IS NOT NULL AND tenancy.phi_key_id(s.%2$I) <>
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

-- Every protected table again through protect(), which re-creates its objects as 0.2.0
-- makes them: the policies call tenancy.current_org_id() directly (no InitPlan), and the
-- 0.1.0 row audit trigger (tenancy_audit) becomes the three statement triggers. protect()
-- records itself in tenancy.protection_log.
SELECT count(*)
  FROM tenancy.protected_tables p,
       LATERAL tenancy.protect(format('%I.%I', p.schema_name, p.table_name), p.tenant_column::text,
                               set_default => false, audit => p.audited) s;
