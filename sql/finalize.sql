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

-- Protection is a DBA's act: superuser only (the functions check too).
REVOKE EXECUTE ON FUNCTION tenancy.protect(text, text, boolean, boolean, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenancy.protect_all(text, text, text, boolean, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenancy.unprotect(text) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.protect(text, text, boolean, boolean, boolean) IS
  'Protect a table (and its partitions) on its tenant column: RLS enabled+forced, RESTRICTIVE and permissive tenant policies, tenant default, immutable tenant column, no TRUNCATE, tenant index, registry row; with audit => true also the audit trigger. Idempotent; dry_run returns the SQL.';
COMMENT ON FUNCTION tenancy.protect_all(text, text, text, boolean, boolean) IS
  'Protect every table of a schema that has the tenant column, plus the tenant root table (on id); new tables in the schema are protected at creation.';
COMMENT ON FUNCTION tenancy.unprotect(text) IS
  'Remove pg_tenancy''s protection from a table and its children: the only sanctioned way back. Superuser; recorded in tenancy.protection_log.';
COMMENT ON FUNCTION tenancy.in_maintenance() IS
  'True while protect/unprotect run their own DDL (the drift guards stand aside).';

-- PHI encryption.
REVOKE EXECUTE ON FUNCTION tenancy.phi_rotate_for_tenant(bytea, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenancy.phi_key_status() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenancy.refuse_foreign_code_in_transaction() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.phi_encrypt(text, text) IS
  'Encrypt a text value with AES-256-GCM under the active key, bound to the current tenant (and the optional label). Requires a tenant context.';
COMMENT ON FUNCTION tenancy.phi_encrypt(bytea, text) IS 'phi_encrypt for bytea values.';
COMMENT ON FUNCTION tenancy.phi_encrypt(jsonb, text) IS 'phi_encrypt for jsonb values.';
COMMENT ON FUNCTION tenancy.phi_reveal(bytea, text) IS
  'Decrypt a text PHI envelope of the current tenant (same label as at encryption). Audited.';
COMMENT ON FUNCTION tenancy.phi_reveal_bytea(bytea, text) IS 'phi_reveal for bytea envelopes.';
COMMENT ON FUNCTION tenancy.phi_reveal_jsonb(bytea, text) IS 'phi_reveal for jsonb envelopes.';
COMMENT ON FUNCTION tenancy.phi_rotate(bytea, text) IS
  'Re-encrypt a PHI envelope of the current tenant under the active key.';
COMMENT ON FUNCTION tenancy.phi_rotate_for_tenant(bytea, text, text) IS
  'Re-encrypt an envelope for an explicitly named tenant (batched rotation). Superuser.';
COMMENT ON FUNCTION tenancy.phi_key_id(bytea) IS 'Key id in a PHI envelope header.';
COMMENT ON FUNCTION tenancy.phi_is_envelope(bytea) IS 'Whether a value has a valid PHI envelope header.';
COMMENT ON FUNCTION tenancy.phi_key_status() IS
  'Loaded PHI key ids, the active one, and the key ring state; never key bytes. Superuser by default.';

-- Audit trail. The trigger and the writers run as the extension owner: the application role
-- has no INSERT on tenancy.audit_events, and events must be written whatever it may do.
ALTER FUNCTION tenancy.audit_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- Values are compared and rendered by their output functions: pin the settings those depend
-- on, so a session cannot hide an UPDATE (extra_float_digits = -15 rendered 37 and 39.4 alike)
-- or change how the trail spells a value. TimeZone stays the session's: the text carries the
-- offset, so an instant is never lost.
ALTER FUNCTION tenancy.audit_trigger() SET extra_float_digits = 1;
ALTER FUNCTION tenancy.audit_trigger() SET DateStyle = 'ISO, MDY';
ALTER FUNCTION tenancy.audit_trigger() SET IntervalStyle = 'postgres';
ALTER FUNCTION tenancy.audit_trigger() SET bytea_output = 'hex';
ALTER FUNCTION tenancy.log_action(text, jsonb) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION tenancy.audit_verify(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION tenancy.audit_trigger() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_trigger() IS
  'Audit trigger attached by tenancy.protect(..., audit => true) as statement triggers over the transition tables (it also works as a row trigger): writes one encrypted, hash-chained audit event per changed row.';
COMMENT ON FUNCTION tenancy.log_action(text, jsonb) IS
  'Record an operator action (with optional details, encrypted) in the current tenant''s audit trail.';
COMMENT ON FUNCTION tenancy.audit_verify(text) IS
  'Verify a tenant''s audit trail (v1 chain, sealed blocks, payload commitments, nothing unaccounted for): ok, events checked, first broken position and why, the unsealed tail. Superuser, or the tenant itself.';
COMMENT ON FUNCTION tenancy.audit_payload(bytea, bigint) IS
  'Decrypt an audit event payload of the current tenant.';
ALTER FUNCTION tenancy.audit_history(text, timestamptz, timestamptz) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION tenancy.audit_history(text, timestamptz, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tenancy.audit_purge(text, timestamptz) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_history(text, timestamptz, timestamptz) IS
  'One clinic''s audit history in a time range with decrypted payloads, for a support role the DBA grants EXECUTE to; records a SUPPORT_READ event in that clinic''s trail first.';
COMMENT ON FUNCTION tenancy.audit_purge(text, timestamptz) IS
  'Retention: delete a tenant''s events older than a time (a prefix of its trail: v1 events, whole sealed blocks), keep the trail verifiable from an anchor, record the purge. Superuser.';
REVOKE EXECUTE ON FUNCTION tenancy.audit_seal() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_seal() IS
  'Seal every committed audit event still pending into its tenant''s chain, now (the audit worker does it continuously in tenancy.audit_database). Returns the number sealed. Superuser.';
REVOKE EXECUTE ON FUNCTION tenancy.audit_rekey(text, integer) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_rekey(text, integer) IS
  'Re-encrypt up to batch_size audit payloads (of one tenant, or all when NULL) under the active PHI key, keeping the chain verifiable; 0 when none is left. Superuser.';

-- Every function of the extension that runs SQL pins search_path = pg_catalog, pg_temp: the
-- catalogs first, the session's temporary schema last (listed, so it is not searched first for
-- relations: a temp view named pg_class must not shadow the catalog), and no schema a role
-- other than a superuser can create objects in. The SQL functions say so in their definitions;
-- this pins the C ones (protect, audit_purge, ...) and any function added later. The only
-- exceptions are C functions on the hot path that run no SQL at all (a SET clause costs a GUC
-- save and restore per call, and would confine set_org's own settings to the call);
-- pg_test/client/privileged.rs checks this list against the catalog. The procedure
-- phi_rotate_all cannot have a SET clause (it COMMITs) and qualifies every name instead.
DO $pin$
DECLARE
  f record;
BEGIN
  FOR f IN
    SELECT p.oid::pg_catalog.regprocedure AS sig, p.prokind
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace OPERATOR(pg_catalog.=) 'tenancy'::pg_catalog.regnamespace
       AND p.prokind OPERATOR(pg_catalog.<>) 'p'
       AND (p.proname::text || '(' || pg_catalog.oidvectortypes(p.proargtypes) || ')') NOT IN (
         'current_org_id()', 'current_org_id_text()', 'require_org()', 'require_org_text()',
         'current_actor()', 'context_is_signed()', 'set_org(text, text, text)', 'set_org(uuid, text, text)',
         'phi_encrypt(text, text)', 'phi_encrypt(bytea, text)', 'phi_encrypt(jsonb, text)',
         'phi_reveal(bytea, text)', 'phi_reveal_bytea(bytea, text)', 'phi_reveal_jsonb(bytea, text)',
         'phi_rotate(bytea, text)', 'phi_rotate_for_tenant(bytea, text, text)', 'phi_key_id(bytea)',
         'phi_is_envelope(bytea)', 'audit_payload(bytea, bigint)', 'in_maintenance()',
         'is_loaded_by_preload()', 'assert_preloaded()', 'confined_ddl()',
         'refuse_foreign_code_in_transaction()',
         -- These resolve the caller's table names in the caller's search_path, then pin
         -- search_path = pg_catalog, pg_temp themselves for everything they run (policy.rs).
         'protect(text, text, boolean, boolean, boolean)',
         'protect_all(text, text, text, boolean, boolean)', 'unprotect(text)')
  LOOP
    EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f.sig);
  END LOOP;
END
$pin$;

-- II-7/9: one view a monitoring system polls (superusers and pg_monitor).
CREATE VIEW tenancy.audit_status AS
  SELECT w.reveal_queue_records, w.refused_records,
         (SELECT coalesce(pg_catalog.sum(pg_catalog.cardinality(p.event_ids)), 0)::bigint
            FROM tenancy.audit_pending p) AS unsealed_events,
         (SELECT pg_catalog.min(p.occurred_at) FROM tenancy.audit_pending p) AS oldest_unsealed,
         w.reveal_worker_pid IS NOT NULL
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = w.reveal_worker_pid) AS reveal_worker_running,
         w.sealer_pid IS NOT NULL
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = w.sealer_pid) AS sealer_running,
         w.last_digest_at
    FROM tenancy.audit_worker_status() w;
REVOKE ALL ON tenancy.audit_status FROM PUBLIC;
GRANT SELECT ON tenancy.audit_status TO pg_monitor;
REVOKE EXECUTE ON FUNCTION tenancy.audit_worker_status() FROM PUBLIC;
COMMENT ON VIEW tenancy.audit_status IS
  'Health of the audit trail: reveal records in flight, records the reveal worker could not write (their reveals refused), unsealed events and the oldest, whether the reveal worker and the sealer run, when the digest file was last written. Superusers and pg_monitor.';
COMMENT ON FUNCTION tenancy.audit_worker_status() IS
  'The audit workers'' shared counters behind tenancy.audit_status. Superuser.';

-- II-7/9: digests to keep outside the database, and verification against one.
ALTER FUNCTION tenancy.audit_verify(text, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION tenancy.audit_verify(text, text) IS
  'Verify a tenant''s audit trail as audit_verify(org) does, and that it extends a digest kept from tenancy.audit_digest(): truncation, rewriting and reordering since that digest are reported. Superuser, or the tenant itself.';
ALTER FUNCTION tenancy.audit_digest() SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION tenancy.audit_digest() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_digest() IS
  'Every tenant''s newest sealed position and hash, with a digest line to store outside the database (docs/audit.md). Superuser.';

-- II-8/9: on Citus, one audit trail on the coordinator, gathered from the workers.
REVOKE EXECUTE ON FUNCTION tenancy.audit_outbox(text[], bigint[], integer) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.audit_outbox(text[], bigint[], integer) IS
  'On a Citus worker: drops the audit events its coordinator holds (tenants and ids given), returns up to max_rows pending rows and their events as jsonb for the coordinator''s sealer (docs/scale-out.md). Superuser.';

-- II-9/9: the tenant id format, once per database.
REVOKE EXECUTE ON FUNCTION tenancy.set_tenant_id_format(text) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.set_tenant_id_format(text) IS
  'Set this database''s tenant id format (''uuid'' or ''text''; NULL: tenancy.tenant_id_format decides) for every session at its next set_org, pooled connections included. Superuser; recorded in tenancy.protection_log.';
