-- What tenancy.protect generates, and what the isolation report says about a small schema
-- before and after protection. Golden: the generated SQL is part of the contract.
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE SCHEMA shop;
CREATE TABLE shop.orgs (id uuid PRIMARY KEY, name text NOT NULL);
CREATE TABLE shop.orders (
  organization_id uuid NOT NULL REFERENCES shop.orgs (id),
  id uuid NOT NULL,
  total numeric NOT NULL,
  PRIMARY KEY (organization_id, id)
);
CREATE TABLE shop.notes (organization_id text NOT NULL, body text);

-- Before: every tenant table is a finding.
SELECT severity, object, finding FROM tenancy.isolation_report() ORDER BY 1, 2, 3;

-- The SQL protect would run, for a uuid and a text tenant column.
SELECT * FROM tenancy.protect('shop.orders', dry_run => true);
SELECT * FROM tenancy.protect('shop.notes', dry_run => true);

-- One call for the schema plus its root.
SELECT count(*) AS statements FROM tenancy.protect_all('shop', root => 'shop.orgs');
SELECT schema_name, table_name, tenant_column, tenant_type
  FROM tenancy.protected_tables ORDER BY 1, 2;
SELECT polrelid::regclass AS table_name, polname, polpermissive, polcmd
  FROM pg_policy WHERE polrelid::regclass::text LIKE 'shop.%' ORDER BY 1, 2;

-- After: clean.
SELECT severity, object, finding FROM tenancy.isolation_report() ORDER BY 1, 2, 3;

-- Drift is refused.
ALTER TABLE shop.orders NO FORCE ROW LEVEL SECURITY;
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- The way back is explicit and recorded.
SELECT * FROM tenancy.unprotect('shop.notes');
SELECT action, object FROM tenancy.protection_log WHERE object LIKE 'shop%' ORDER BY id;
DROP SCHEMA shop CASCADE;
