-- The audit trail: tenant-scoped, append-only, hash-chained, payloads encrypted.

CREATE SEQUENCE tenancy.audit_event_id;

CREATE TABLE tenancy.audit_events (
  organization_id text COLLATE "C" NOT NULL,
  seq             bigint NOT NULL,
  event_id        bigint NOT NULL,
  occurred_at     timestamptz NOT NULL,
  txid            bigint NOT NULL,
  actor           text,
  actor_verified  boolean NOT NULL,
  session_role    name NOT NULL,
  outer_role      name NOT NULL,
  action          text NOT NULL,
  table_name      text,
  row_key         text,
  changed_columns text[],
  payload         bytea,
  prev_hash       bytea NOT NULL,
  hash            bytea NOT NULL,
  PRIMARY KEY (organization_id, seq)
);
COMMENT ON TABLE tenancy.audit_events IS
  'Append-only audit trail: one row per audited change, operator action and PHI reveal; scoped to its tenant by RLS; payload AES-256-GCM encrypted; hash-chained per tenant (tenancy.audit_verify).';
COMMENT ON COLUMN tenancy.audit_events.organization_id IS 'Tenant of the event: taken from the row written, never from the context.';
COMMENT ON COLUMN tenancy.audit_events.seq IS 'Position in the tenant''s hash chain, from 1.';
COMMENT ON COLUMN tenancy.audit_events.actor IS 'Application actor given to tenancy.set_org, if any.';
COMMENT ON COLUMN tenancy.audit_events.actor_verified IS 'True when the actor was proven by a signed context token.';
COMMENT ON COLUMN tenancy.audit_events.session_role IS 'Login role of the session.';
COMMENT ON COLUMN tenancy.audit_events.outer_role IS 'Role in effect (after SET ROLE) when the event was written.';
COMMENT ON COLUMN tenancy.audit_events.changed_columns IS 'Names of the changed columns, in clear.';
COMMENT ON COLUMN tenancy.audit_events.payload IS 'Encrypted jsonb: INSERT the new row, DELETE the old row, UPDATE old and new values of changed columns; bound to the tenant and the event id.';
COMMENT ON COLUMN tenancy.audit_events.hash IS 'SHA-256 over prev_hash and the event''s content (docs/audit.md).';

CREATE TABLE tenancy.audit_chain_heads (
  organization_id text COLLATE "C" PRIMARY KEY,
  purged_through_seq bigint NOT NULL DEFAULT 0,
  purged_anchor   bytea
);
COMMENT ON TABLE tenancy.audit_chain_heads IS
  'One row per tenant chain: its lock orders one tenant''s concurrent writers; the purge anchor (hash of the last purged event).';

SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_events', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_chain_heads', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_event_id', '');

ALTER TABLE tenancy.audit_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenancy.audit_events FORCE ROW LEVEL SECURITY;
CREATE POLICY tenancy_tenant_floor ON tenancy.audit_events AS RESTRICTIVE FOR ALL TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text())
  WITH CHECK (organization_id = tenancy.current_org_id_text());
CREATE POLICY tenancy_tenant_rows ON tenancy.audit_events AS PERMISSIVE FOR SELECT TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text());

REVOKE ALL ON tenancy.audit_events, tenancy.audit_chain_heads, tenancy.audit_event_id FROM PUBLIC;
GRANT SELECT ON tenancy.audit_events TO PUBLIC;

CREATE FUNCTION tenancy.audit_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- tenancy.audit_purge() (superuser, itself recorded) is the one way to delete events.
  IF TG_OP = 'DELETE' AND tenancy.in_maintenance() THEN
    RETURN OLD;
  END IF;
  RAISE EXCEPTION '% on tenancy.audit_events is not allowed: the audit trail is append-only', TG_OP
    USING ERRCODE = '42501',
          HINT = 'Events are written by pg_tenancy only; retention is tenancy.audit_purge() (superuser, recorded).';
END $$;
COMMENT ON FUNCTION tenancy.audit_append_only() IS 'Trigger: refuses UPDATE, DELETE and TRUNCATE of the audit trail.';
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON tenancy.audit_events
  FOR EACH ROW EXECUTE FUNCTION tenancy.audit_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON tenancy.audit_events
  FOR EACH STATEMENT EXECUTE FUNCTION tenancy.audit_append_only();
ALTER TABLE tenancy.audit_events ENABLE ALWAYS TRIGGER audit_events_append_only;
ALTER TABLE tenancy.audit_events ENABLE ALWAYS TRIGGER audit_events_no_truncate;

-- A tenant's own events, payloads decrypted (requires its context; RLS scopes the rows).
CREATE VIEW tenancy.my_audit_events WITH (security_barrier) AS
  SELECT seq, event_id, occurred_at, txid, actor, actor_verified, session_role, outer_role, action,
         table_name, row_key, changed_columns, tenancy.audit_payload(payload, event_id) AS changes
    FROM tenancy.audit_events
   WHERE organization_id = (SELECT tenancy.require_org_text());
COMMENT ON VIEW tenancy.my_audit_events IS
  'The current tenant''s audit events with decrypted change payloads (requires a tenant context).';
GRANT SELECT ON tenancy.my_audit_events TO PUBLIC;
