-- PHI encryption as an application sees it. Ciphertexts are random, so only their shape,
-- round trips and the documented errors are golden.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT key_id, active FROM tenancy.phi_key_status() ORDER BY key_id;

-- No tenant context: refused.
SELECT tenancy.phi_encrypt('555-0100');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

BEGIN;
SELECT tenancy.set_org('aaaaaaaa-0000-4000-8000-000000000001');
-- Scratch tables in a tenant transaction are ON COMMIT DROP (others keep rows past it: refused).
CREATE TEMP TABLE env ON COMMIT DROP AS SELECT tenancy.phi_encrypt('555-0100', 'patients.phone') AS e;
SELECT length(e) AS bytes, substring(e FROM 1 FOR 8) AS header, tenancy.phi_key_id(e) AS key_id,
       tenancy.phi_is_envelope(e) AS is_envelope FROM env;
SELECT tenancy.phi_reveal(e, 'patients.phone') AS revealed FROM env;
-- Another label: refused.
SELECT tenancy.phi_reveal(e, 'patients.email') FROM env;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

BEGIN;
SELECT tenancy.set_org('aaaaaaaa-0000-4000-8000-000000000001');
-- Not an envelope.
SELECT tenancy.phi_reveal('plain text'::bytea);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

BEGIN;
SELECT tenancy.set_org('aaaaaaaa-0000-4000-8000-000000000001');
-- Unknown key id (a well-formed header naming key 99).
SELECT tenancy.phi_reveal('\x504801000000006300000000000000000000000000000000000000000000000000000000'::bytea);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

-- The PHI domain refuses plaintext.
SELECT 'plain'::bytea::tenancy.phi;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
