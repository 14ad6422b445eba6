-- PHI columns: the domain that refuses plaintext, and batched key rotation.

CREATE DOMAIN tenancy.phi AS bytea CHECK (tenancy.phi_is_envelope(VALUE));
COMMENT ON DOMAIN tenancy.phi IS
  'A PHI column: bytea that must be a pg_tenancy envelope (tenancy.phi_encrypt output); plaintext is refused.';

-- One batch of key rotation for a column (superuser: RLS does not apply), one tenant at a time.
-- Audit events are written without any lock of their own, so rotation waits for no writer but
-- the rows it rewrites. Rows already under the active key are skipped, so it is resumable and
-- safe to repeat; locked rows are skipped and picked up by a later batch.
CREATE FUNCTION tenancy.phi_rotate_column(
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
COMMENT ON FUNCTION tenancy.phi_rotate_column(text, text, text, text, integer) IS
  'Re-encrypt up to batch_size values of a PHI column under the active key (one short transaction). Returns how many; 0 when done. Superuser.';

-- The whole column, committing after each batch; CALL it outside a transaction block. A batch
-- of 0 with values still under an old key means their rows were locked: wait and go on.
CREATE PROCEDURE tenancy.phi_rotate_all(
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
COMMENT ON PROCEDURE tenancy.phi_rotate_all(text, text, text, text, integer) IS
  'Re-encrypt a whole PHI column under the active key in short transactions, reporting progress; resumable. Superuser; CALL outside BEGIN.';

-- Remaining values per key id, for watching a rotation (header only, no decryption).
CREATE FUNCTION tenancy.phi_key_usage(table_name text, column_name text)
RETURNS TABLE (key_id bigint, values_count bigint)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN QUERY EXECUTE format(
    'SELECT tenancy.phi_key_id(%2$I), count(*) FROM %1$s WHERE %2$I IS NOT NULL GROUP BY 1 ORDER BY 1',
    table_name::regclass, column_name);
END $$;
COMMENT ON FUNCTION tenancy.phi_key_usage(text, text) IS
  'How many values of a PHI column each key id encrypts (reads headers only). Run as superuser to see every tenant.';

REVOKE EXECUTE ON FUNCTION tenancy.phi_rotate_column(text, text, text, text, integer) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE tenancy.phi_rotate_all(text, text, text, text, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenancy.phi_key_usage(text, text) FROM PUBLIC;
