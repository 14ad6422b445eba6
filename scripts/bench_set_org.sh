#!/usr/bin/env bash
# Cost of tenancy.set_org per transaction, measured with pgbench against the demo cluster
# (run scripts/demo.sh first). Both variants run interleaved in ONE pgbench run (two weighted
# scripts), so machine noise hits both alike; the figure that matters is the TPS ratio.
#
# Usage: scripts/bench_set_org.sh [seconds=30] [clients=4]
set -euo pipefail
SECS="${1:-30}" CLIENTS="${2:-4}"
PORT="${PG_TENANCY_DEMO_PORT:-54329}"
DIR="${PG_TENANCY_DEMO_DIR:-/tmp/pg_tenancy-demo}"
# The demo installs a debug build; measure an optimised one.
cd "$(dirname "$0")/.."
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null 2>&1
if [ "$(id -u)" -eq 0 ]; then PGCTL=(sudo -n -u postgres /usr/lib/postgresql/15/bin/pg_ctl); else PGCTL=(/usr/lib/postgresql/15/bin/pg_ctl); fi
"${PGCTL[@]}" restart -w -D "$DIR/data" -l "$DIR/server.log" >/dev/null
CONN="host=127.0.0.1 port=$PORT dbname=clinic"
TMP=$(mktemp -d)
psql -X -q "$CONN user=postgres" -c "DROP TABLE IF EXISTS bench_plain" \
  -c "CREATE TABLE bench_plain AS SELECT * FROM patients" -c "GRANT SELECT ON bench_plain TO app"
ID=$(psql -X -qAt "$CONN user=postgres" -c "SELECT id FROM patients ORDER BY id LIMIT 1")
ORG=$(psql -X -qAt "$CONN user=postgres" -c "SELECT organization_id FROM patients ORDER BY id LIMIT 1")
# The same transaction with and without entering the tenant; the lookup reads an unprotected
# copy so that only set_org differs.
cat >"$TMP/with_set_org.sql" <<SQL
BEGIN;
SELECT tenancy.set_org('$ORG');
SELECT display_name FROM bench_plain WHERE id = '$ID';
COMMIT;
SQL
cat >"$TMP/extra_stmt.sql" <<SQL
BEGIN;
SELECT '$ORG'::text;
SELECT display_name FROM bench_plain WHERE id = '$ID';
COMMIT;
SQL
cat >"$TMP/without.sql" <<SQL
BEGIN;
SELECT display_name FROM bench_plain WHERE id = '$ID';
COMMIT;
SQL
out=$(pgbench -n -h 127.0.0.1 -p "$PORT" -U app -c "$CLIENTS" -j 2 -T "$SECS" \
  -f "$TMP/with_set_org.sql@1" -f "$TMP/extra_stmt.sql@1" -f "$TMP/without.sql@1" clinic 2>&1)
echo "$out" | grep -E "SQL script|latency average|number of transactions actually" || true
lat() { echo "$out" | grep -A5 "$1" | grep -oE 'latency average = [0-9.]+' | grep -oE '[0-9.]+'; }
with=$(lat with_set_org.sql) extra=$(lat extra_stmt.sql) without=$(lat without.sql)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a/b}'; }
echo "TPS ratio, set_org vs a same-round-trip constant statement: $(ratio "$extra" "$with")x"
echo "TPS ratio, set_org transaction vs no extra statement:       $(ratio "$without" "$with")x"
rm -rf "$TMP"
