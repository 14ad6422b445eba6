-- pg_tenancy finalize: runs last in CREATE EXTENSION. Grants, function properties pgrx
-- cannot spell, comments, and the preload check.

-- Refuse to install into a server that did not preload the library: without it the tenant
-- context could be forged from the startup packet and keys could not be loaded safely.
SELECT tenancy.assert_preloaded();

-- Policies call these once per query; LEAKPROOF lets the planner use them below
-- security-barrier views. They take no arguments, so they cannot leak any.
ALTER FUNCTION tenancy.current_org_id() LEAKPROOF;
ALTER FUNCTION tenancy.current_org_id_text() LEAKPROOF;

GRANT USAGE ON SCHEMA tenancy TO PUBLIC;

COMMENT ON FUNCTION tenancy.set_org(text, text, text) IS
  'Enter a tenant for the current transaction (once per transaction; BEGIN first). Args: tenant id, optional actor id, token (required in signed mode).';
COMMENT ON FUNCTION tenancy.set_org(uuid, text, text) IS
  'Enter a tenant given as uuid for the current transaction; see set_org(text, text, text).';
COMMENT ON FUNCTION tenancy.current_org_id() IS
  'Tenant of the current transaction as uuid, or NULL when none: what RLS policies on uuid tenant columns call.';
COMMENT ON FUNCTION tenancy.current_org_id_text() IS
  'Tenant of the current transaction as text, or NULL when none: what RLS policies on text tenant columns call.';
COMMENT ON FUNCTION tenancy.require_org() IS
  'Tenant of the current transaction as uuid; raises 42501 when none is set.';
COMMENT ON FUNCTION tenancy.require_org_text() IS
  'Tenant of the current transaction as text; raises 42501 when none is set.';
COMMENT ON FUNCTION tenancy.current_actor() IS
  'Application actor given to set_org in this transaction, or NULL.';
COMMENT ON FUNCTION tenancy.context_is_signed() IS
  'Whether this transaction''s tenant and actor were proven by a signed token.';
COMMENT ON FUNCTION tenancy.assert_preloaded() IS
  'Raises unless pg_tenancy is loaded through shared_preload_libraries.';
COMMENT ON FUNCTION tenancy.is_loaded_by_preload() IS
  'Whether pg_tenancy was loaded through shared_preload_libraries.';
