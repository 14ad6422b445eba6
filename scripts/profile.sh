#!/bin/bash
# The profile behind bench/PROFILE.md: point lookups in one tenant transaction, pg_tenancy
# (set_org + RLS) against the floor with a constant statement, set_config against set_org,
# interleaved (1 client, 3 rounds of 10 s), then perf (system-wide, 15 s) of the pg_tenancy
# and floor variants alone. Needs the release build installed into PostgreSQL 15
# (scripts/bench.sh does that) and perf. Prints the latencies and writes the perf reports
# into /tmp/pg_tenancy-profile.
set -euo pipefail
B=/usr/lib/postgresql/15/bin; D=/tmp/pg_tenancy-profile; PORT=56010
sudo -u postgres $B/pg_ctl -D $D/d stop -m fast >/dev/null 2>&1 || true
rm -rf $D; mkdir -p $D; chown postgres $D
sudo -u postgres $B/initdb -D $D/d -U postgres -A trust --locale=C -E UTF8 >/dev/null
sudo -u postgres bash -c "printf \"shared_preload_libraries='pg_tenancy'\nport=$PORT\nlisten_addresses='127.0.0.1'\nunix_socket_directories='$D'\nshared_buffers='1GB'\nsynchronous_commit=off\n\" >> $D/d/postgresql.conf"
sudo -u postgres $B/pg_ctl -D $D/d -l $D/log start -w >/dev/null
P="psql -X -q -h 127.0.0.1 -p $PORT -U postgres"
$P -c "CREATE ROLE app LOGIN" -c "CREATE EXTENSION pg_tenancy" >/dev/null
$P >/dev/null <<'SQL'
CREATE TABLE t_ten (organization_id uuid NOT NULL, id uuid NOT NULL, v text, PRIMARY KEY (organization_id, id));
CREATE TABLE t_floor (LIKE t_ten INCLUDING ALL);
INSERT INTO t_ten SELECT ('00000000-0000-4000-8000-' || lpad((g % 100)::text, 12, '0'))::uuid, ('10000000-0000-4000-8000-' || lpad(g::text, 12, '0'))::uuid, 'x' FROM generate_series(1, 100000) g;
INSERT INTO t_floor SELECT * FROM t_ten;
SELECT count(*) FROM tenancy.protect('public.t_ten');
GRANT SELECT ON t_ten, t_floor TO app;
VACUUM ANALYZE;
SQL
cat > $D/ten.sql <<'S'
\set g random(1, 100000)
BEGIN;
SELECT tenancy.set_org(('00000000-0000-4000-8000-' || lpad((:g % 100)::text, 12, '0'))::uuid);
SELECT v FROM t_ten WHERE id = ('10000000-0000-4000-8000-' || lpad(:g::text, 12, '0'))::uuid;
COMMIT;
S
cat > $D/floor.sql <<'S'
\set g random(1, 100000)
BEGIN;
SELECT ('00000000-0000-4000-8000-' || lpad((:g % 100)::text, 12, '0'))::uuid;
SELECT v FROM t_floor WHERE id = ('10000000-0000-4000-8000-' || lpad(:g::text, 12, '0'))::uuid AND organization_id = ('00000000-0000-4000-8000-' || lpad((:g % 100)::text, 12, '0'))::uuid;
COMMIT;
S
cat > $D/cfg.sql <<'S'
\set g random(1, 100000)
BEGIN;
SELECT set_config('app.x', ('00000000-0000-4000-8000-' || lpad((:g % 100)::text, 12, '0')), true);
SELECT v FROM t_floor WHERE id = ('10000000-0000-4000-8000-' || lpad(:g::text, 12, '0'))::uuid AND organization_id = ('00000000-0000-4000-8000-' || lpad((:g % 100)::text, 12, '0'))::uuid;
COMMIT;
S
cat > $D/org.sql <<'S'
\set g random(1, 100000)
BEGIN;
SELECT tenancy.set_org(('00000000-0000-4000-8000-' || lpad((:g % 100)::text, 12, '0'))::uuid);
SELECT v FROM t_floor WHERE id = ('10000000-0000-4000-8000-' || lpad(:g::text, 12, '0'))::uuid AND organization_id = ('00000000-0000-4000-8000-' || lpad((:g % 100)::text, 12, '0'))::uuid;
COMMIT;
S
echo "interleaved, 1 client, 3 x 10 s:"
for r in 1 2 3; do pgbench -n -h 127.0.0.1 -p $PORT -U app -c 1 -T 10 -f $D/ten.sql@1 -f $D/floor.sql@1 -f $D/cfg.sql@1 -f $D/org.sql@1 postgres 2>&1 | awk '/^SQL script/ {name=$4} /^ - latency average/ {n=split(name, a, "/"); printf "%s %s ms  ", a[n], $5} END {print ""}'; done
if [ "${PROFILE:-1}" = 1 ]; then
  for s in ten floor; do
    pgbench -n -h 127.0.0.1 -p $PORT -U app -c 1 -T 25 -f $D/$s.sql postgres >/dev/null 2>&1 &
    sleep 3
    perf record -q -g -o $D/$s.perf -a -- sleep 15 >/dev/null 2>&1
    wait


  done
fi
sudo -u postgres $B/pg_ctl -D $D/d stop -m fast >/dev/null
for s in ten floor; do
  echo "== $s: shares of all samples by object, then pg_tenancy.so's symbols"
  perf report -i $D/$s.perf --no-children --comm postgres --sort dso --stdio -g none 2>/dev/null | grep "%" | head -4
  perf report -i $D/$s.perf --no-children --comm postgres --dso pg_tenancy.so --sort sym --stdio -g none 2>/dev/null | grep "%" | head -8
  perf report -i $D/$s.perf --no-children --comm postgres --sort sym --stdio -g none 2>/dev/null | grep -E " (AtEOXact_GUC|get_row_security_policies|ExecInitSubPlan|SS_process_sublinks|set_config_option)$" | head -6
done
