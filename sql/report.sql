-- tenancy.isolation_report(): every place one tenant might see or touch another's rows.
-- One row per finding: severity (critical, high, warning), object, finding, fix.
-- "Tenant tables" are tables with a column named like a registered tenant column (or
-- organization_id), outside the system schemas.

-- Citus: every shard placement of every protected Citus table, checked on the node that holds
-- it against its table on this node (the coordinator). Citus re-creates policies on shards
-- from its own deparser, which drops AS RESTRICTIVE (Citus 14.0.1), and a node's own DDL
-- reaches its shards without passing the coordinator's guards. Nothing without Citus.
-- The shard names travel as one quoted array literal; the command is catalog-only and
-- schema-qualified, whatever the node's search_path.
CREATE FUNCTION tenancy.shard_findings()
RETURNS TABLE (severity text, object text, finding text, fix text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  expected jsonb;
  cmd text;
  node record;
  sh jsonb;
  want jsonb;
  seen text[] := '{}';
  obj text;
  pol record;
  trg text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
    RETURN;
  END IF;
  -- shard name -> its table, the table's policies (name -> permissive) and the triggers
  -- pg_tenancy put on it.
  EXECUTE $q$
    SELECT jsonb_object_agg(shard_name(sh.logicalrelid, sh.shardid), jsonb_build_object(
             'table', p.rel::text, 'shardid', sh.shardid,
             'policies', (SELECT coalesce(jsonb_object_agg(y.polname, y.polpermissive), '{}') FROM pg_policy y WHERE y.polrelid = p.rel),
             -- command, roles, USING and WITH CHECK as text, to compare with the shard's
             'definitions', (SELECT coalesce(jsonb_object_agg(y.polname, jsonb_build_array(y.polcmd,
                               (SELECT coalesce(jsonb_agg(x.n ORDER BY x.n), '[]') FROM (SELECT CASE r WHEN 0 THEN 'public' ELSE r::regrole::text END AS n FROM unnest(y.polroles) r) x),
                               pg_get_expr(y.polqual, y.polrelid), pg_get_expr(y.polwithcheck, y.polrelid))), '{}')
                             FROM pg_policy y WHERE y.polrelid = p.rel),
             'triggers', (SELECT coalesce(jsonb_agg(g.tgname ORDER BY g.tgname), '[]') FROM pg_trigger g
                           WHERE g.tgrelid = p.rel AND NOT g.tgisinternal AND g.tgname LIKE 'tenancy\_%'
                             -- Citus runs TRUNCATE's triggers on the distributed table only.
                             AND g.tgname <> 'tenancy_no_truncate')))
      FROM pg_dist_shard sh JOIN tenancy.protected_tables p ON p.rel = sh.logicalrelid$q$
    INTO expected;
  IF expected IS NULL THEN
    RETURN;
  END IF;
  cmd := format($c$SELECT pg_catalog.json_agg(pg_catalog.json_build_object('shard', s.name, 'rls', c.relrowsecurity, 'force', c.relforcerowsecurity,
      'policies', (SELECT pg_catalog.json_object_agg(y.polname, y.polpermissive) FROM pg_catalog.pg_policy y WHERE y.polrelid OPERATOR(pg_catalog.=) c.oid),
      'definitions', (SELECT pg_catalog.json_object_agg(y.polname, pg_catalog.json_build_array(y.polcmd,
          (SELECT pg_catalog.json_agg(x.n ORDER BY x.n) FROM (SELECT CASE r WHEN 0 THEN 'public' ELSE r::pg_catalog.regrole::pg_catalog.text END AS n FROM pg_catalog.unnest(y.polroles) r) x),
          pg_catalog.pg_get_expr(y.polqual, y.polrelid), pg_catalog.pg_get_expr(y.polwithcheck, y.polrelid)))
        FROM pg_catalog.pg_policy y WHERE y.polrelid OPERATOR(pg_catalog.=) c.oid),
      'triggers', (SELECT pg_catalog.json_object_agg(g.tgname, g.tgenabled) FROM pg_catalog.pg_trigger g WHERE g.tgrelid OPERATOR(pg_catalog.=) c.oid AND NOT g.tgisinternal)))
    FROM pg_catalog.unnest(%L::pg_catalog.text[]) s(name)
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(s.name)$c$,
    ARRAY(SELECT jsonb_object_keys(expected)));
  FOR node IN EXECUTE $q$
      SELECT r.success, r.result, coalesce(n.nodename || ':' || n.nodeport, 'node ' || r.nodeid) AS name
        FROM run_command_on_all_nodes($1) r LEFT JOIN pg_dist_node n ON n.nodeid = r.nodeid$q$ USING cmd LOOP
    IF NOT node.success THEN
      RETURN QUERY SELECT 'high', node.name, 'shards on this node could not be checked: ' || left(node.result, 200),
                          'Bring the node back and run the report again.';
      CONTINUE;
    END IF;
    CONTINUE WHEN coalesce(node.result, '') = '';
    FOR sh IN SELECT * FROM jsonb_array_elements(node.result::jsonb) LOOP
      want := expected -> (sh ->> 'shard');
      CONTINUE WHEN want IS NULL;
      seen := seen || (sh ->> 'shard');
      obj := format('shard %s of %s on %s', sh ->> 'shard', want ->> 'table', node.name);
      IF NOT (sh ->> 'rls')::boolean THEN
        RETURN QUERY SELECT 'critical', obj, 'row level security is disabled on the shard', format('SELECT tenancy.protect(%L);', want ->> 'table');
      ELSIF NOT (sh ->> 'force')::boolean THEN
        RETURN QUERY SELECT 'critical', obj, 'row level security is not forced on the shard', format('SELECT tenancy.protect(%L);', want ->> 'table');
      END IF;
      FOR pol IN SELECT e.key, e.value::boolean AS permissive, (sh -> 'policies' ->> e.key)::boolean AS on_shard
                   FROM jsonb_each_text(want -> 'policies') e LOOP
        IF pol.on_shard IS NULL THEN
          RETURN QUERY SELECT CASE WHEN pol.permissive THEN 'warning' ELSE 'critical' END, obj,
                              format('policy %I of the table is missing on the shard', pol.key),
                              format('SELECT tenancy.protect(%L);', want ->> 'table');
        ELSIF pol.on_shard AND NOT pol.permissive THEN
          RETURN QUERY SELECT 'critical', obj,
                              format('policy %I is PERMISSIVE on the shard but RESTRICTIVE on the table: any permissive policy widens access there', pol.key),
                              CASE WHEN pol.key = 'tenancy_tenant_floor' THEN format('SELECT tenancy.protect(%L);', want ->> 'table')
                                   ELSE format('On the node: DROP POLICY %I ON %s and CREATE it again AS RESTRICTIVE (Citus drops AS RESTRICTIVE when it copies policies).', pol.key, sh ->> 'shard') END;
        ELSIF NOT pol.on_shard AND pol.permissive THEN
          RETURN QUERY SELECT 'warning', obj, format('policy %I is RESTRICTIVE on the shard but PERMISSIVE on the table', pol.key),
                              format('SELECT tenancy.protect(%L);', want ->> 'table');
        END IF;
        IF pol.on_shard IS NOT NULL
           AND (sh -> 'definitions' -> pol.key) IS DISTINCT FROM (want -> 'definitions' -> pol.key) THEN
          RETURN QUERY SELECT 'critical', obj,
                              format('policy %I on the shard differs from the table''s (command, roles, USING or WITH CHECK)', pol.key),
                              CASE WHEN pol.key LIKE 'tenancy\_%' THEN format('SELECT tenancy.protect(%L);', want ->> 'table')
                                   ELSE format('On the node: DROP POLICY %I ON %s and create it again as on the table.', pol.key, sh ->> 'shard') END;
        END IF;
      END LOOP;
      -- A shard without policies has JSON null there (json_object_agg of no rows).
      FOR pol IN SELECT e.key, e.value::boolean AS permissive
                   FROM jsonb_each_text(CASE WHEN jsonb_typeof(sh -> 'policies') = 'object' THEN sh -> 'policies' ELSE '{}' END) e
                  WHERE NOT (want -> 'policies') ? e.key LOOP
        RETURN QUERY SELECT CASE WHEN pol.permissive THEN 'critical' ELSE 'warning' END, obj,
                            format('policy %I exists on the shard only', pol.key),
                            format('On the node: DROP POLICY %I ON %s;', pol.key, sh ->> 'shard');
      END LOOP;
      FOR trg IN SELECT jsonb_array_elements_text(want -> 'triggers') LOOP
        -- Citus names a shard's copy of a trigger <name>_<shard id>.
        IF coalesce(sh -> 'triggers' ->> (trg || '_' || (want ->> 'shardid')), '') <> 'A' THEN
          RETURN QUERY SELECT 'high', obj, format('trigger %I is missing or not enabled ALWAYS on the shard', trg),
                              format('SELECT tenancy.protect(%L);', want ->> 'table');
        END IF;
      END LOOP;
    END LOOP;
  END LOOP;
  RETURN QUERY SELECT 'high', format('shard %s of %s', k.key, k.value ->> 'table'), 'the shard was found on no node',
                      'Check pg_dist_placement and the nodes (citus_check_cluster_node_health()).'
    FROM jsonb_each(expected) k WHERE NOT k.key = ANY (seen);
END $$;
REVOKE EXECUTE ON FUNCTION tenancy.shard_findings() FROM PUBLIC;

CREATE FUNCTION tenancy.isolation_findings()
RETURNS TABLE (severity text, object text, finding text, fix text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
WITH registered AS (
  SELECT c.oid, p.tenant_column
    FROM tenancy.protected_tables p
    JOIN pg_class c ON c.oid = p.rel
),
-- Column names that make an unregistered table a tenant table.
tenant_cols AS (
  SELECT 'organization_id'::name AS col
  UNION SELECT tenant_column FROM tenancy.protected_schemas
),
tenant_tables AS (
  SELECT c.oid, c.oid::regclass::text AS name, a.attnum AS tenant_attnum, a.attname AS tenant_col,
         c.relrowsecurity, c.relforcerowsecurity, c.relowner
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND NOT a.attisdropped
    JOIN tenant_cols t ON t.col = a.attname
   WHERE c.relkind IN ('r', 'p')
     AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy') AND n.nspname NOT LIKE 'pg_toast%'
     AND c.oid NOT IN (SELECT oid FROM registered)
  UNION ALL
  SELECT c.oid, c.oid::regclass::text, a.attnum, a.attname, c.relrowsecurity, c.relforcerowsecurity, c.relowner
    FROM registered r
    JOIN pg_class c ON c.oid = r.oid
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = r.tenant_column
),
findings AS (
  SELECT 'critical' AS severity, t.name AS object,
         'tenant table without row level security' AS finding,
         format('SELECT tenancy.protect(%L);', t.name) AS fix
    FROM tenant_tables t WHERE NOT t.relrowsecurity
  UNION ALL
  SELECT 'critical', t.name, 'row level security is not forced: the owner bypasses it',
         format('SELECT tenancy.protect(%L);', t.name)
    FROM tenant_tables t WHERE t.relrowsecurity AND NOT t.relforcerowsecurity
  UNION ALL
  SELECT 'critical', t.name, 'no RESTRICTIVE tenant policy: any permissive policy widens access',
         format('SELECT tenancy.protect(%L);', t.name)
    FROM tenant_tables t
   WHERE t.relrowsecurity
     AND NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = t.oid AND NOT p.polpermissive)
  UNION ALL
  SELECT 'critical', format('policy %I on %s', p.polname, t.name),
         'policy may fail open (OR / IS NULL in its expression)',
         'Drop it, or rewrite it without OR and IS NULL branches.'
    FROM tenant_tables t JOIN pg_policy p ON p.polrelid = t.oid
   WHERE coalesce(tenancy.expression_text(p.polqual, p.polrelid), '') || ' ' || coalesce(tenancy.expression_text(p.polwithcheck, p.polrelid), '')
         ~* '(\mis\s+null\M|\mor\M)'
  UNION ALL
  SELECT 'warning', format('policy %I on %s', p.polname, t.name),
         'no WITH CHECK: new rows are checked only by USING',
         'State WITH CHECK explicitly (tenancy.protect does).'
    FROM tenant_tables t JOIN pg_policy p ON p.polrelid = t.oid
   WHERE p.polcmd IN ('*', 'w') AND p.polwithcheck IS NULL
  UNION ALL
  SELECT 'high', format('constraint %I on %s', k.conname, t.name),
         CASE k.contype WHEN 'f' THEN 'foreign key without the tenant column: a cross-tenant reference'
                        WHEN 'x' THEN 'EXCLUDE constraint without the tenant column: other tenants'' rows conflict, an oracle across tenants'
                        ELSE 'UNIQUE/PRIMARY KEY without the tenant column: an existence oracle across tenants' END,
         'Include the tenant column in the key (composite keys).'
    FROM tenant_tables t JOIN pg_constraint k ON k.conrelid = t.oid
   WHERE k.contype IN ('u', 'p', 'f', 'x') AND NOT (t.tenant_attnum = ANY (k.conkey))
  UNION ALL
  SELECT 'high', format('index %s on %s', i.indexrelid::regclass, t.name),
         'unique index without the tenant column: an existence oracle across tenants',
         'Include the tenant column in the index.'
    FROM tenant_tables t JOIN pg_index i ON i.indrelid = t.oid
   -- Key columns only: a tenant column in INCLUDE does not make the uniqueness per tenant.
   WHERE i.indisunique
     AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) WITH ORDINALITY u(attnum, n)
                      WHERE u.n <= i.indnkeyatts AND u.attnum = t.tenant_attnum)
     AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
  UNION ALL
  SELECT 'warning', t.name, 'no index led by the tenant column: every tenant query scans the table',
         format('CREATE INDEX ON %s (%I);', t.name, t.tenant_col)
    FROM tenant_tables t
   WHERE NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = t.oid AND i.indkey[0] = t.tenant_attnum)
  UNION ALL
  -- A foreign key (organization_id, x_id) that no index leads with: the primary key
  -- (organization_id, id) covers only the tenant column, so deleting a parent row and every
  -- join on x_id scan all of the tenant's child rows (Supabase's unindexed_foreign_keys).
  SELECT 'warning', t.name,
         format('foreign key %I (%s) has no index led by its columns: joins on it and deletes of its parent rows scan the tenant''s rows', k.conname, c.cols),
         format('CREATE INDEX ON %s (%s);', t.name, c.cols)
    FROM tenant_tables t
    JOIN pg_constraint k ON k.conrelid = t.oid AND k.contype = 'f'
    CROSS JOIN LATERAL (
      SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY u.ord) AS cols
        FROM unnest(k.conkey) WITH ORDINALITY u(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum) c
   WHERE NOT EXISTS (
           SELECT 1 FROM pg_index i
            WHERE i.indrelid = k.conrelid AND i.indnkeyatts >= cardinality(k.conkey)
              AND (SELECT array_agg(x ORDER BY x) FROM unnest((i.indkey::int2[])[0:cardinality(k.conkey) - 1]) x)
                  = (SELECT array_agg(y ORDER BY y) FROM unnest(k.conkey) y))
  UNION ALL
  SELECT DISTINCT CASE v.relkind WHEN 'm' THEN 'critical' ELSE 'high' END, v.oid::regclass::text,
         CASE v.relkind WHEN 'm' THEN format('materialized view over tenant table %s holds every tenant''s rows', t.name)
                        ELSE format('view over tenant table %s runs with its owner''s rights (no security_invoker)', t.name) END,
         CASE v.relkind WHEN 'm' THEN 'Drop it, or replace it with a security_invoker view.'
                        ELSE format('ALTER VIEW %s SET (security_invoker = true);  -- PG 15+', v.oid::regclass) END
    FROM tenant_tables t
    JOIN pg_depend d ON d.refobjid = t.oid AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite r ON r.oid = d.objid
    JOIN pg_class v ON v.oid = r.ev_class AND v.oid <> t.oid
   WHERE v.relkind = 'm'
      OR (v.relkind = 'v' AND NOT coalesce(v.reloptions, '{}') && ARRAY['security_invoker=true', 'security_invoker=on', 'security_invoker=1'])
  UNION ALL
  SELECT DISTINCT 'high', p.oid::regprocedure::text,
         format('SECURITY DEFINER function mentions tenant table %s: it reads with its owner''s rights', t.name),
         'Make it SECURITY INVOKER, or make sure its owner is subject to FORCE RLS and the context.'
    FROM pg_proc p
    JOIN pg_namespace pn ON pn.oid = p.pronamespace
    JOIN tenant_tables t ON strpos(lower(p.prosrc), lower((SELECT relname FROM pg_class WHERE oid = t.oid)::text)) > 0
   WHERE p.prosecdef AND pn.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy')
  UNION ALL
  SELECT DISTINCT 'high', format('trigger %I on %s', tg.tgname, tg.tgrelid::regclass),
         'trigger runs a SECURITY DEFINER function on a tenant table',
         'Make the trigger function SECURITY INVOKER.'
    FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid JOIN tenant_tables t ON t.oid = tg.tgrelid
   WHERE p.prosecdef AND NOT tg.tgisinternal
     AND p.pronamespace <> 'tenancy'::regnamespace
  UNION ALL
  SELECT 'high', r.rolname::text,
         CASE WHEN r.rolsuper THEN 'login role is a superuser: it bypasses row level security'
              ELSE 'login role has BYPASSRLS' END,
         format('ALTER ROLE %I NOSUPERUSER NOBYPASSRLS;  -- or NOLOGIN', r.rolname)
    FROM pg_roles r
   WHERE r.rolcanlogin AND (r.rolsuper OR r.rolbypassrls)
     AND r.oid <> 10  -- the bootstrap superuser that installs extensions
     AND has_database_privilege(r.oid, current_database(), 'CONNECT')
  UNION ALL
  SELECT 'high', format('%s on %s', g.grantee, t.name),
         format('role holds %s on a tenant table', g.privilege_type),
         format('REVOKE %s ON %s FROM %I;', g.privilege_type, t.name, g.grantee)
    FROM tenant_tables t
    JOIN LATERAL (SELECT (aclexplode(c.relacl)).* FROM pg_class c WHERE c.oid = t.oid) a ON true
    JOIN LATERAL (SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,
                         a.privilege_type) g ON true
   WHERE a.privilege_type IN ('TRUNCATE', 'REFERENCES') AND a.grantee <> t.relowner
  UNION ALL
  SELECT 'critical', p.oid::regprocedure::text,
         'IMMUTABLE function reads the tenant context or reveals PHI: its result can be frozen into plans, indexes and statistics',
         'Declare it STABLE.'
    FROM pg_proc p JOIN pg_namespace pn ON pn.oid = p.pronamespace
   WHERE p.provolatile = 'i' AND pn.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy')
     AND (p.prosrc ILIKE '%current_org_id%' OR p.prosrc ILIKE '%require_org%' OR p.prosrc ILIKE '%phi_reveal%')
  UNION ALL
  SELECT 'high', r.rolname::text,
         format('login role is a member of %s: it can read or write server files, the PHI key ring included (COPY ... FROM ''<key file>'')', g.rolname),
         format('REVOKE %I FROM %I;', g.rolname, r.rolname)
    FROM pg_roles r
    CROSS JOIN (VALUES ('pg_read_server_files'::name), ('pg_write_server_files'), ('pg_execute_server_program')) g(rolname)
   WHERE r.rolcanlogin AND NOT r.rolsuper AND r.oid <> 10
     AND pg_has_role(r.oid, g.rolname, 'MEMBER')
  UNION ALL
  SELECT 'critical', format('%s.%I', t.name, t.tenant_col),
         format('tenant column has the nondeterministic collation %I: tenants whose ids differ only in case or accents are merged', co.collname),
         format('ALTER TABLE %s ALTER COLUMN %I TYPE text COLLATE "C";', t.name, t.tenant_col)
    FROM tenant_tables t
    JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = t.tenant_attnum
    JOIN pg_collation co ON co.oid = a.attcollation
   WHERE NOT co.collisdeterministic
  UNION ALL
  -- O5: an index, constraint or default/generated expression that reads a PHI column through a
  -- function that is not built in (a wrapper may reveal, and the result is stored).
  SELECT DISTINCT 'high', od.text || ' on ' || t.name,
         format('expression over PHI column %I calls %s: if it reveals, plaintext is stored', a.attname, f.oid::regprocedure),
         'Drop it: index or check only the ciphertext (tenancy.phi_key_id) or a keyed hash computed by the application.'
    FROM tenant_tables t
    JOIN (SELECT 'pg_class'::regclass AS classid, i.indexrelid AS objid, i.indrelid AS rel FROM pg_index i
          UNION ALL SELECT 'pg_constraint'::regclass, k.oid, k.conrelid FROM pg_constraint k WHERE k.conrelid <> 0
          UNION ALL SELECT 'pg_attrdef'::regclass, ad.oid, ad.adrelid FROM pg_attrdef ad) o ON o.rel = t.oid
    JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid
    JOIN pg_depend dc ON dc.classid = o.classid AND dc.objid = o.objid AND dc.refclassid = 'pg_class'::regclass
                     AND dc.refobjid = t.oid AND dc.refobjsubid > 0
    JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = dc.refobjsubid AND a.atttypid = 'tenancy.phi'::regtype
    JOIN pg_proc f ON d.refclassid = 'pg_proc'::regclass AND f.oid = d.refobjid
    CROSS JOIN LATERAL (SELECT tenancy.object_text(d.classid, d.objid, d.objsubid)) od(text)
   WHERE f.oid >= 16384
     AND od.text IS NOT NULL
     AND f.oid NOT IN ('tenancy.phi_key_id(bytea)'::regprocedure, 'tenancy.phi_is_envelope(bytea)'::regprocedure)
  UNION ALL
  SELECT 'high', t.name, fc.problem,
         'Drop it, or have a superuser own the function (review it first): it sees every tenant''s rows.'
    FROM tenant_tables t
    CROSS JOIN LATERAL (SELECT tenancy.foreign_code_problem(t.oid::regclass)) fc(problem)
   WHERE fc.problem IS NOT NULL
  UNION ALL
  SELECT 'critical', t.name,
         format('child of %s, which is not protected: reads through the parent skip this table''s row level security', i.inhparent::regclass),
         format('SELECT tenancy.protect(%L);', i.inhparent::regclass::text)
    FROM tenant_tables t JOIN tenancy.protected_tables p ON p.rel = t.oid
    JOIN pg_inherits i ON i.inhrelid = t.oid
   WHERE NOT EXISTS (SELECT 1 FROM tenancy.protected_tables q WHERE q.rel = i.inhparent)
  UNION ALL
  SELECT 'high', coalesce('database ' || d.datname, 'all databases') || coalesce(', role ' || r.rolname, ''),
         format('setting %s makes sessions (superusers'' included) start as another role', cfg),
         format('ALTER %s RESET %s;', CASE WHEN s.setrole = 0 THEN 'DATABASE ' || quote_ident(d.datname) ELSE 'ROLE ' || quote_ident(r.rolname) END,
                split_part(cfg, '=', 1))
    FROM pg_db_role_setting s
    LEFT JOIN pg_database d ON d.oid = s.setdatabase
    LEFT JOIN pg_roles r ON r.oid = s.setrole
    CROSS JOIN LATERAL unnest(s.setconfig) cfg
   WHERE split_part(cfg, '=', 1) IN ('role', 'session_authorization')
     AND (s.setdatabase = 0 OR d.datname = current_database())
  UNION ALL
  -- A search_path setting that lists another schema before pg_catalog: every session's
  -- unqualified operators and functions (a superuser's `WHERE severity = 'critical'` on this
  -- very report) resolve there first, to the code of that schema's owner.
  SELECT 'critical', coalesce('database ' || d.datname, 'all databases') || coalesce(', role ' || r.rolname, ''),
         format('setting %s puts schemas before pg_catalog: every session runs their operators and functions first', cfg),
         format('ALTER %s RESET search_path;', CASE WHEN s.setrole = 0 THEN 'DATABASE ' || quote_ident(d.datname) ELSE 'ROLE ' || quote_ident(r.rolname) END)
    FROM pg_db_role_setting s
    LEFT JOIN pg_database d ON d.oid = s.setdatabase
    LEFT JOIN pg_roles r ON r.oid = s.setrole
    CROSS JOIN LATERAL unnest(s.setconfig) cfg
   WHERE split_part(cfg, '=', 1) = 'search_path'
     AND (s.setdatabase = 0 OR d.datname = current_database())
     AND position('pg_catalog' IN cfg) > 0
     AND btrim(split_part(substr(cfg, length('search_path=') + 1), ',', 1), ' "') <> 'pg_catalog'
  UNION ALL
  -- Foreign keys between a protected table and one that is not: referential actions and
  -- checks run without row level security (a cascade from the other table rewrites or
  -- deletes any tenant's rows; a key from it tests whether any tenant's value exists).
  SELECT 'high', format('foreign key %I on %s', k.conname, k.conrelid::regclass),
         format('references %s across the protection boundary: its checks and actions run without row level security', k.confrelid::regclass),
         format('ALTER TABLE %s DROP CONSTRAINT %I;', k.conrelid::regclass, k.conname)
    FROM pg_constraint k
   WHERE k.contype = 'f'
     AND EXISTS (SELECT 1 FROM tenancy.protected_tables p WHERE p.rel = k.conrelid)
         <> EXISTS (SELECT 1 FROM tenancy.protected_tables p WHERE p.rel = k.confrelid)
  UNION ALL
  SELECT 'high', format('publication %I', pub.pubname),
         format('publishes tenant table %s: subscribers receive every tenant''s rows', t.name),
         'Publish to subscribers that enforce the same isolation, or drop the table from the publication.'
    FROM pg_publication pub JOIN tenant_tables t
      ON pub.puballtables OR EXISTS (SELECT 1 FROM pg_publication_rel pr WHERE pr.prpubid = pub.oid AND pr.prrelid = t.oid)
  UNION ALL
  SELECT 'critical', format('event trigger %I', e.evtname),
         'pg_tenancy drift guard is not enabled ALWAYS: protected tables can be weakened unnoticed',
         format('ALTER EVENT TRIGGER %I ENABLE ALWAYS;', e.evtname)
    FROM pg_event_trigger e
   WHERE e.evtname IN ('tenancy_guard_ddl', 'tenancy_guard_drop') AND e.evtenabled <> 'A'
  UNION ALL
  -- A schema protected with audit => true: each of its protected tables is audited.
  SELECT 'high', p.rel::text,
         format('not audited, in schema %I, which is protected with audit => true', s.schema_name),
         format('SELECT tenancy.protect(%L, %L, audit => true);', p.rel::text, p.tenant_column)
    FROM tenancy.protected_tables p
    JOIN pg_class c ON c.oid = p.rel
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN tenancy.protected_schemas s ON s.schema_name = n.nspname AND s.audited
   WHERE NOT p.audited
  UNION ALL
  SELECT 'critical', p.rel::text,
         'registered as protected but ' || pp.problem,
         format('SELECT tenancy.protect(%L);', p.rel::text)
    FROM tenancy.protected_tables p
    CROSS JOIN LATERAL (SELECT tenancy.protection_problem(p.rel)) pp(problem)
   WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.rel)
     AND pp.problem IS NOT NULL
  UNION ALL
  -- A column named like a tenant id under another name (Better Auth's organizationId, org_id,
  -- tenant_id, ...) in a table that is neither protected nor named by a protected schema.
  SELECT 'high', c.oid::regclass::text,
         format('column %I looks like a tenant id, but the table is not protected: its rows are every tenant''s', a.attname),
         format('SELECT tenancy.protect(%L, %L);  -- or, if intended: SELECT tenancy.acknowledge(%L, <this finding>, <reason>);',
                c.oid::regclass::text, a.attname, c.oid::regclass::text)
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
   WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
     AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy') AND n.nspname NOT LIKE 'pg_toast%'
     AND lower(replace(a.attname, '_', '')) IN ('orgid', 'organizationid', 'organisationid', 'tenantid', 'tenant', 'accountid', 'workspaceid', 'teamid', 'clinicid', 'practiceid')
     AND a.attname NOT IN (SELECT col FROM tenant_cols)
     AND c.oid NOT IN (SELECT oid FROM registered)
  UNION ALL
  SELECT * FROM tenancy.shard_findings()
)
SELECT severity, object, finding, fix FROM findings
ORDER BY CASE severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 ELSE 2 END, object, finding
$$;
REVOKE EXECUTE ON FUNCTION tenancy.isolation_findings() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.isolation_findings() IS
  'Every finding of the report, acknowledged or not. Superuser by default.';

CREATE FUNCTION tenancy.isolation_report()
RETURNS TABLE (severity text, object text, finding text, fix text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT f.severity, f.object, f.finding, f.fix
    FROM tenancy.isolation_findings() f
   WHERE NOT EXISTS (SELECT 1 FROM tenancy.acknowledgements a WHERE a.object = f.object AND a.finding = f.finding)
   ORDER BY CASE f.severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 ELSE 2 END, f.object, f.finding
$$;
REVOKE EXECUTE ON FUNCTION tenancy.isolation_report() FROM PUBLIC;
COMMENT ON FUNCTION tenancy.isolation_report() IS
  'Every isolation hole found in this database that no superuser acknowledged as intended: one row per finding with severity, object, finding and fix. Superuser by default.';

-- Records a finding as intended. Superuser; the finding must be one the report shows now
-- (object and finding as it prints them); the reason is kept with who and when.
CREATE FUNCTION tenancy.acknowledge(object text, finding text, reason text)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION 'only a superuser may call tenancy.acknowledge()' USING ERRCODE = '42501';
  END IF;
  IF object IS NULL OR finding IS NULL OR coalesce(btrim(reason), '') = '' THEN
    RAISE EXCEPTION 'tenancy.acknowledge() needs an object, a finding and a reason' USING ERRCODE = '22023',
      HINT = 'Copy object and finding from tenancy.isolation_report(); say why it is intended.';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM tenancy.isolation_findings() f WHERE f.object = acknowledge.object AND f.finding = acknowledge.finding) THEN
    RAISE EXCEPTION 'the report has no finding % on %', finding, object USING ERRCODE = '22023',
      HINT = 'Copy object and finding exactly as tenancy.isolation_report() prints them.';
  END IF;
  INSERT INTO tenancy.acknowledgements (object, finding, reason) VALUES (object, finding, reason)
    ON CONFLICT ON CONSTRAINT acknowledgements_pkey DO UPDATE
      SET reason = EXCLUDED.reason, acknowledged_by = session_user, acknowledged_at = now();
  INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('acknowledged', object, finding || ': ' || reason);
END $$;
REVOKE EXECUTE ON FUNCTION tenancy.acknowledge(text, text, text) FROM PUBLIC;
COMMENT ON FUNCTION tenancy.acknowledge(text, text, text) IS
  'Records a report finding as intended, with its reason (superuser; recorded in tenancy.protection_log). It then shows in tenancy.acknowledged_findings, not in the report.';

CREATE FUNCTION tenancy.unacknowledge(object text, finding text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION 'only a superuser may call tenancy.unacknowledge()' USING ERRCODE = '42501';
  END IF;
  DELETE FROM tenancy.acknowledgements a WHERE a.object = unacknowledge.object AND a.finding = unacknowledge.finding;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  INSERT INTO tenancy.protection_log (action, object, detail) VALUES ('unacknowledged', object, finding);
  RETURN true;
END $$;
REVOKE EXECUTE ON FUNCTION tenancy.unacknowledge(text, text) FROM PUBLIC;

-- Acknowledged findings that the report still finds (an acknowledgement whose finding went
-- away stays in tenancy.acknowledgements, shown here no more).
CREATE VIEW tenancy.acknowledged_findings AS
  SELECT f.severity, f.object, f.finding, a.reason, a.acknowledged_by, a.acknowledged_at
    FROM tenancy.isolation_findings() f
    JOIN tenancy.acknowledgements a ON a.object = f.object AND a.finding = f.finding;
REVOKE ALL ON tenancy.acknowledged_findings FROM PUBLIC;
