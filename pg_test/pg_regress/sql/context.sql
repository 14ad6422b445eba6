-- The tenant context as an application sees it: errors, SQLSTATEs and hints are part of the
-- contract, so they are golden here.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT extname, extversion, n.nspname AS schema
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE extname = 'pg_tenancy';

-- Outside a transaction block.
SELECT tenancy.set_org('aaaaaaaa-0000-4000-8000-000000000001');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- No context: NULL, and require_org refuses.
SELECT tenancy.current_org_id() IS NULL AS no_context;
SELECT tenancy.require_org();
\echo SQLSTATE :LAST_ERROR_SQLSTATE

BEGIN;
SELECT tenancy.set_org('AAAAAAAA-0000-4000-8000-000000000001', 'user-1');
SELECT tenancy.current_org_id(), tenancy.current_actor(), current_setting('app.current_org_id');
SELECT tenancy.set_org('bbbbbbbb-0000-4000-8000-000000000002');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

BEGIN;
SET LOCAL app.current_org_id = 'bbbbbbbb-0000-4000-8000-000000000002';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

BEGIN;
SELECT tenancy.set_org('x''; RESET ALL; --');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

BEGIN;
SELECT tenancy.set_org(NULL::text);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

-- The SQL surface and its properties.
SELECT p.oid::regprocedure AS function,
       p.provolatile AS volatility, p.proparallel AS parallel, p.proleakproof AS leakproof,
       p.proisstrict AS strict
  FROM pg_proc p
 WHERE p.pronamespace = 'tenancy'::regnamespace
 ORDER BY p.oid::regprocedure::text;
