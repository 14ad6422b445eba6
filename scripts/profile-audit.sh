#!/bin/bash
# The profile behind bench/PROFILE.md's audit section: the OLTP transaction of bench.py's
# section 4 (enter a tenant, insert a row, update it) on an audited table, 4 clients
# (synchronous_commit off, as in the benchmark), with the
# audit worker sealing, then perf (system-wide, 15 s): where the audited transaction's time
# goes, by object and by symbol. Needs the release build installed into PostgreSQL 15
# (scripts/bench.sh does that) and perf. Writes the reports into /tmp/pg_tenancy-profile-audit.
set -euo pipefail
B=/usr/lib/postgresql/15/bin; D=/tmp/pg_tenancy-profile-audit; PORT=56011
sudo -u postgres $B/pg_ctl -D $D/d stop -m fast >/dev/null 2>&1 || true
rm -rf $D; mkdir -p $D; chown postgres $D
sudo -u postgres python3 "$(dirname "$0")/phi_keyring.py" new $D/phi.keyring >/dev/null
sudo -u postgres $B/initdb -D $D/d -U postgres -A trust --locale=C -E UTF8 >/dev/null
sudo -u postgres bash -c "printf \"shared_preload_libraries='pg_tenancy'\nport=$PORT\nlisten_addresses='127.0.0.1'\nunix_socket_directories='$D'\nshared_buffers='1GB'\nsynchronous_commit=off\ntenancy.phi_key_file='$D/phi.keyring'\ntenancy.audit_database='postgres'\n\" >> $D/d/postgresql.conf"
sudo -u postgres $B/pg_ctl -D $D/d -l $D/log start -w >/dev/null
P="psql -X -q -h 127.0.0.1 -p $PORT -U postgres"
$P -c "CREATE ROLE app LOGIN" -c "CREATE EXTENSION pg_tenancy" >/dev/null
$P >/dev/null <<'SQL'
CREATE TABLE a (organization_id uuid NOT NULL, id bigint NOT NULL, patient text, note text, status text DEFAULT 'new',
                PRIMARY KEY (organization_id, id));
SELECT count(*) FROM tenancy.protect('public.a', audit => true);
CREATE SEQUENCE a_id;
GRANT SELECT, INSERT, UPDATE ON a TO app;
GRANT USAGE ON SEQUENCE a_id TO app;
SQL
cat > $D/oltp.sql <<'S'
\set n random(1, 1000)
BEGIN;
SELECT tenancy.set_org(('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid);
INSERT INTO a (organization_id, id, patient, note) VALUES (tenancy.current_org_id(), nextval('a_id'), 'patient ' || :n, 'first visit') RETURNING id \gset
UPDATE a SET status = 'confirmed' WHERE id = :id;
COMMIT;
S
pgbench -n -h 127.0.0.1 -p $PORT -U app -c 4 -j 2 -T 25 -f $D/oltp.sql postgres > $D/pgbench.out 2>&1 &
sleep 5
ps -eo pid,args | grep "postgres:" > $D/processes.txt
perf record -q -g -o $D/oltp.perf -a -- sleep 15 >/dev/null 2>&1
wait
grep -E "latency average|tps" $D/pgbench.out
sudo -u postgres $B/pg_ctl -D $D/d stop -m fast >/dev/null
echo "== shares of all samples by process, by object, then pg_tenancy.so's symbols and the hottest overall"
perf report -i $D/oltp.perf --no-children --sort comm --stdio -g none 2>/dev/null | grep "%" | head -4 || true
perf report -i $D/oltp.perf --no-children --comm postgres --sort dso --stdio -g none 2>/dev/null | grep "%" | head -6 || true
echo "== postgres samples by process kind (backends, the sealer, the reveal worker, others)"
perf report -i $D/oltp.perf --no-children --comm postgres --sort pid --stdio -g none 2>/dev/null | grep "%" \
  | awk -v procs="$D/processes.txt" 'BEGIN { while ((getline l < procs) > 0) { split(l, f, " "); p = f[1];
        k = "other"; if (l ~ /audit sealer/) k = "sealer"; else if (l ~ /reveal audit/) k = "reveal worker";
        else if (l ~ /postgres: app /) k = "backends"; kind[p] = k } }
      { split($2, a, ":"); k = (a[1] in kind) ? kind[a[1]] : "other"; sub("%", "", $1); share[k] += $1 }
      END { for (k in share) printf "%6.2f%%  %s\n", share[k], k }' || true
perf report -i $D/oltp.perf --no-children --comm postgres --dso pg_tenancy.so --sort sym --stdio -g none 2>/dev/null | grep "%" | head -12 || true
perf report -i $D/oltp.perf --no-children --comm postgres --sort sym --stdio -g none 2>/dev/null | grep "%" | head -20 || true
