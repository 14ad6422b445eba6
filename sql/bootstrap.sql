-- pg_tenancy bootstrap: runs first in CREATE EXTENSION, inside schema tenancy.
COMMENT ON SCHEMA tenancy IS 'pg_tenancy: tenant context, generated row level security, PHI encryption and audit';

-- Text is handled as UTF-8 throughout (tenant ids, PHI labels and text envelopes, audit
-- values). In another server encoding non-ASCII values would fail or be misread, so the
-- extension refuses to be installed there.
DO $encoding$
BEGIN
  IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
    RAISE EXCEPTION 'pg_tenancy needs a database with encoding UTF8, not %', pg_catalog.getdatabaseencoding()
      USING ERRCODE = '0A000',
            HINT = 'Create the database with ENCODING ''UTF8'' TEMPLATE template0 (and LC_COLLATE/LC_CTYPE of a UTF-8 locale, or the C locale), then install pg_tenancy there.';
  END IF;
END
$encoding$;
