-- The audit trail: tenant-scoped, append-only, hash-chained, payloads encrypted.

CREATE SEQUENCE tenancy.audit_event_id;

CREATE TABLE tenancy.audit_events (
  organization_id text COLLATE "C" NOT NULL,
  seq             bigint,
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
  prev_hash       bytea,
  hash            bytea NOT NULL,
  payload_digest  bytea,
  PRIMARY KEY (organization_id, event_id)
);
-- The 0.1.0/0.2.0 chain (v1), still verified by position.
CREATE UNIQUE INDEX audit_events_v1_seq ON tenancy.audit_events (organization_id, seq) WHERE seq IS NOT NULL;
COMMENT ON TABLE tenancy.audit_events IS
  'Append-only audit trail: one row per audited change, operator action and PHI reveal; scoped to its tenant by RLS; payload AES-256-GCM encrypted; each event hashed when written, sealed into per-tenant hash-chained blocks after commit (tenancy.audit_seals, tenancy.audit_verify).';
COMMENT ON COLUMN tenancy.audit_events.organization_id IS 'Tenant of the event: taken from the row written, never from the context.';
COMMENT ON COLUMN tenancy.audit_events.seq IS 'Position in the tenant''s v1 hash chain (events written by 0.1.0 and 0.2.0); NULL for v2 events, whose position is their place in tenancy.audit_seals.';
COMMENT ON COLUMN tenancy.audit_events.event_id IS 'Identity of the event (tenancy.audit_event_id), increasing in the order events were written.';
COMMENT ON COLUMN tenancy.audit_events.actor IS 'Application actor given to tenancy.set_org, if any.';
COMMENT ON COLUMN tenancy.audit_events.actor_verified IS 'True when the actor was proven by a signed context token.';
COMMENT ON COLUMN tenancy.audit_events.session_role IS 'Login role of the session.';
COMMENT ON COLUMN tenancy.audit_events.outer_role IS 'Role in effect (after SET ROLE) when the event was written.';
COMMENT ON COLUMN tenancy.audit_events.changed_columns IS 'Names of the changed columns, in clear.';
COMMENT ON COLUMN tenancy.audit_events.payload IS 'Encrypted jsonb: INSERT the new row, DELETE the old row, UPDATE old and new values of changed columns; bound to the tenant and the event id.';
COMMENT ON COLUMN tenancy.audit_events.prev_hash IS 'v1 events: the previous event''s hash. NULL for v2 events (linked by their block).';
COMMENT ON COLUMN tenancy.audit_events.hash IS 'SHA-256 over the event''s content (v1: and prev_hash) (docs/audit.md).';
COMMENT ON COLUMN tenancy.audit_events.payload_digest IS 'v2 events: SHA-256 commitment to the payload''s plaintext and a secret salt inside the ciphertext; the payload can be re-encrypted under a new key without changing it.';

-- The sealer's work list: per writing statement and tenant, the ids and hashes of up to 40
-- of its events, written with them (so it commits, or vanishes, with them, subtransactions
-- included). The sealer deletes rows and builds blocks from them without reading the
-- events; audit_verify checks every sealed event against its hash. Small (drained
-- continuously), read whole: no index.
CREATE TABLE tenancy.audit_pending (
  organization_id text COLLATE "C" NOT NULL,
  event_ids       bigint[] NOT NULL,
  hashes          bytea NOT NULL,
  occurred_at     timestamptz NOT NULL
);
COMMENT ON TABLE tenancy.audit_pending IS
  'Audit events waiting for the sealer: tenant, event ids, their hashes (32 bytes each, in order), time written.';

-- The seals: per tenant, blocks of events in chain order, each hashing the previous block.
CREATE TABLE tenancy.audit_seals (
  organization_id text COLLATE "C" NOT NULL,
  block_no        bigint NOT NULL,
  first_seq       bigint NOT NULL,
  event_count     integer NOT NULL,
  event_ids       bigint[] NOT NULL,
  newest_event_at timestamptz NOT NULL,
  sealed_at       timestamptz NOT NULL,
  prev_hash       bytea NOT NULL,
  hash            bytea NOT NULL,
  PRIMARY KEY (organization_id, block_no)
);
COMMENT ON TABLE tenancy.audit_seals IS
  'Sealed blocks of each tenant''s audit trail: its events (ids, in chain order, ascending) and a SHA-256 over the previous block''s hash and the events'' hashes (docs/audit.md). Written by the sealer only.';
COMMENT ON COLUMN tenancy.audit_seals.first_seq IS 'Position of the block''s first event in the tenant''s trail (after the v1 chain, from 1).';

CREATE TABLE tenancy.audit_chain_heads (
  organization_id text COLLATE "C" PRIMARY KEY,
  purged_through_seq bigint NOT NULL DEFAULT 0,
  purged_anchor   bytea,
  last_block      bigint NOT NULL DEFAULT 0,
  last_seq        bigint,
  last_hash       bytea
);
COMMENT ON TABLE tenancy.audit_chain_heads IS
  'One row per tenant chain: the sealer''s tip (last block, position, hash) and the purge anchor (position and hash of the last purged event or block).';

SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_events', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_chain_heads', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_pending', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_seals', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_event_id', '');

ALTER TABLE tenancy.audit_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenancy.audit_events FORCE ROW LEVEL SECURITY;
CREATE POLICY tenancy_tenant_floor ON tenancy.audit_events AS RESTRICTIVE FOR ALL TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text())
  WITH CHECK (organization_id = tenancy.current_org_id_text());
CREATE POLICY tenancy_tenant_rows ON tenancy.audit_events AS PERMISSIVE FOR SELECT TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text());

ALTER TABLE tenancy.audit_seals ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenancy.audit_seals FORCE ROW LEVEL SECURITY;
CREATE POLICY tenancy_tenant_floor ON tenancy.audit_seals AS RESTRICTIVE FOR ALL TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text())
  WITH CHECK (organization_id = tenancy.current_org_id_text());
CREATE POLICY tenancy_tenant_rows ON tenancy.audit_seals AS PERMISSIVE FOR SELECT TO PUBLIC
  USING (organization_id = tenancy.current_org_id_text());

REVOKE ALL ON tenancy.audit_events, tenancy.audit_chain_heads, tenancy.audit_event_id,
              tenancy.audit_pending, tenancy.audit_seals FROM PUBLIC;
GRANT SELECT ON tenancy.audit_events, tenancy.audit_seals TO PUBLIC;

CREATE FUNCTION tenancy.audit_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- tenancy.audit_purge() (superuser, itself recorded) is the one way to delete events.
  IF TG_OP = 'DELETE' AND tenancy.in_maintenance() THEN
    RETURN OLD;
  END IF;
  -- tenancy.audit_rekey() (superuser) re-encrypts v2 payloads under the active key: the
  -- payload only, whose commitment (payload_digest) the chain covers and which it keeps.
  IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_events' AND tenancy.in_maintenance()
     AND OLD.seq IS NULL AND OLD.payload_digest IS NOT NULL
     AND (to_jsonb(OLD) OPERATOR(pg_catalog.-) 'payload') OPERATOR(pg_catalog.=) (to_jsonb(NEW) OPERATOR(pg_catalog.-) 'payload') THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION '% on tenancy.% is not allowed: the audit trail is append-only', TG_OP, TG_TABLE_NAME
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
CREATE TRIGGER audit_seals_append_only BEFORE UPDATE OR DELETE ON tenancy.audit_seals
  FOR EACH ROW EXECUTE FUNCTION tenancy.audit_append_only();
CREATE TRIGGER audit_seals_no_truncate BEFORE TRUNCATE ON tenancy.audit_seals
  FOR EACH STATEMENT EXECUTE FUNCTION tenancy.audit_append_only();
ALTER TABLE tenancy.audit_seals ENABLE ALWAYS TRIGGER audit_seals_append_only;
ALTER TABLE tenancy.audit_seals ENABLE ALWAYS TRIGGER audit_seals_no_truncate;

-- A tenant's own events, payloads decrypted (requires its context; RLS scopes the rows).
CREATE VIEW tenancy.my_audit_events WITH (security_barrier) AS
  SELECT seq, event_id, occurred_at, txid, actor, actor_verified, session_role, outer_role, action,
         table_name, row_key, changed_columns, tenancy.audit_payload(payload, event_id) AS changes
    FROM tenancy.audit_events
   WHERE organization_id = (SELECT tenancy.require_org_text());
COMMENT ON VIEW tenancy.my_audit_events IS
  'The current tenant''s audit events with decrypted change payloads (requires a tenant context).';
GRANT SELECT ON tenancy.my_audit_events TO PUBLIC;
