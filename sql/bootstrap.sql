-- pg_tenancy bootstrap: runs first in CREATE EXTENSION, inside schema tenancy.
COMMENT ON SCHEMA tenancy IS 'pg_tenancy: tenant context, generated row level security, PHI encryption and audit';
