-- What pg_tenancy protects, and the trigger functions protect() attaches.

CREATE TABLE tenancy.protected_tables (
  schema_name   name NOT NULL,
  table_name    name NOT NULL,
  tenant_column name NOT NULL,
  tenant_type   text NOT NULL CHECK (tenant_type IN ('uuid', 'text')),
  audited       boolean NOT NULL DEFAULT false,
  protected_at  timestamptz NOT NULL DEFAULT now(),
  protected_by  name NOT NULL DEFAULT session_user,
  -- The table itself: a regclass follows RENAME and SET SCHEMA (the guards match on it, never
  -- on the names, which they keep current), and pg_dump writes it as a qualified name that a
  -- restore resolves again.
  rel           regclass NOT NULL,
  PRIMARY KEY (schema_name, table_name),
  CONSTRAINT protected_tables_rel_key UNIQUE (rel)
);
COMMENT ON TABLE tenancy.protected_tables IS
  'Tables protected by tenancy.protect(): RLS enabled and forced, tenant policies, guards. Dumped by pg_dump.';

CREATE TABLE tenancy.protected_schemas (
  schema_name   name PRIMARY KEY,
  tenant_column name NOT NULL,
  -- protect_all(..., audit => true): tables created, moved or attached there later are
  -- audited too.
  audited       boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE tenancy.protected_schemas IS
  'Schemas protected by tenancy.protect_all(): new tables with the tenant column are protected (and, when audited, audited) at creation.';

CREATE TABLE tenancy.protection_log (
  id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at     timestamptz NOT NULL DEFAULT now(),
  by     name NOT NULL DEFAULT session_user,
  action text NOT NULL,
  object text NOT NULL,
  detail text NOT NULL DEFAULT ''
);
COMMENT ON TABLE tenancy.protection_log IS
  'Every protect, protect_all, unprotect and automatic protection of a new table: who, when, what.';

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

-- Registry rows are configuration: pg_dump dumps them with the extension.
SELECT pg_catalog.pg_extension_config_dump('tenancy.protected_tables', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.protected_schemas', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.protection_log', '');

REVOKE ALL ON tenancy.protected_tables, tenancy.protected_schemas, tenancy.protection_log FROM PUBLIC;

CREATE FUNCTION tenancy.tenant_column_immutable() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF to_jsonb(NEW) -> TG_ARGV[0] IS DISTINCT FROM to_jsonb(OLD) -> TG_ARGV[0] THEN
    RAISE EXCEPTION 'the tenant column "%" of "%"."%" cannot be changed', TG_ARGV[0], TG_TABLE_SCHEMA, TG_TABLE_NAME
      USING ERRCODE = '42501',
            HINT = 'A row belongs to its tenant for life: copy it into the other tenant and delete it here.';
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION tenancy.tenant_column_immutable() IS
  'Trigger: refuses UPDATEs that change a protected table''s tenant column.';

CREATE FUNCTION tenancy.refuse_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION 'TRUNCATE of protected table "%"."%" is not allowed', TG_TABLE_SCHEMA, TG_TABLE_NAME
      USING ERRCODE = '42501',
            HINT = 'TRUNCATE ignores row level security and would empty every tenant; DELETE inside a tenant transaction instead.';
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION tenancy.refuse_truncate() IS
  'Trigger: refuses TRUNCATE of a protected table (it bypasses row level security) except by superusers.';
