#!/usr/bin/env bash
# README command 1: a throwaway PostgreSQL 15 cluster with pg_tenancy preloaded, two clinics,
# and a short narrated walk through what the extension does. Leaves the cluster running.
#
# Env: PG_TENANCY_DEMO_DIR (default /tmp/pg_tenancy-demo), PG_TENANCY_DEMO_PORT (default 54329)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${PG_TENANCY_DEMO_DIR:-/tmp/pg_tenancy-demo}"
PORT="${PG_TENANCY_DEMO_PORT:-54329}"
BIN=/usr/lib/postgresql/15/bin
SHERWOOD=5e000000-0000-4000-8000-000000000001
CONWAY=c0000000-0000-4000-8000-000000000002

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
as_pg() { if [ "$(id -u)" -eq 0 ]; then sudo -n -u postgres -- "$@"; else "$@"; fi; }

say "Provisioning (Debian packages, cargo-pgrx; skipped when present)"
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/provision.sh 15 >/tmp/pg_tenancy-demo-provision.log 2>&1 \
    || { tail -n 30 /tmp/pg_tenancy-demo-provision.log; echo "provisioning failed (log: /tmp/pg_tenancy-demo-provision.log)" >&2; exit 1; }
fi

say "Building and installing pg_tenancy into PostgreSQL 15"
cargo pgrx install --pg-config "$BIN/pg_config" 2>&1 | grep -E "Finished|Installing|error" || true
[ -f /usr/share/postgresql/15/extension/pg_tenancy.control ] || { echo "install failed" >&2; exit 1; }

say "Starting a throwaway cluster in $DIR on 127.0.0.1:$PORT"
if [ -f "$DIR/data/postmaster.pid" ]; then as_pg "$BIN/pg_ctl" stop -m fast -D "$DIR/data" >/dev/null || true; fi
rm -rf "$DIR" && mkdir -p "$DIR"
[ "$(id -u)" -ne 0 ] || chown postgres "$DIR"
as_pg "$BIN/initdb" -A trust -U postgres --locale=C -E UTF8 -D "$DIR/data" >/dev/null
as_pg sh -c "cat >> '$DIR/data/postgresql.conf'" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_tenancy'
CONF
as_pg "$BIN/pg_ctl" start -w -D "$DIR/data" -l "$DIR/server.log" >/dev/null

SU=(psql -X -q -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$PORT user=postgres dbname=postgres")
"${SU[@]}" -c "CREATE ROLE clinic_owner LOGIN" -c "CREATE ROLE app LOGIN" -c "CREATE DATABASE clinic OWNER clinic_owner"
psql -X -q -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$PORT user=postgres dbname=clinic" -c "CREATE EXTENSION pg_tenancy"
# Until issue 3/8 generates policies, the demo table is protected by hand with the same shape.
psql -X -q -o /dev/null -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$PORT user=clinic_owner dbname=clinic" <<SQL
CREATE TABLE patients (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id uuid NOT NULL DEFAULT tenancy.require_org(),
  display_name text NOT NULL);
CREATE INDEX ON patients (organization_id);
ALTER TABLE patients ENABLE ROW LEVEL SECURITY;
ALTER TABLE patients FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_floor ON patients AS RESTRICTIVE
  USING (organization_id = tenancy.current_org_id())
  WITH CHECK (organization_id = tenancy.current_org_id());
CREATE POLICY tenant_rows ON patients USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON patients TO app;
BEGIN; SELECT tenancy.set_org('$SHERWOOD');
INSERT INTO patients (display_name) VALUES ('Sherwood patient 1'), ('Sherwood patient 2'); COMMIT;
BEGIN; SELECT tenancy.set_org('$CONWAY');
INSERT INTO patients (display_name) VALUES ('Conway patient 1'); COMMIT;
SQL

APP="host=127.0.0.1 port=$PORT user=app dbname=clinic"
step() {
  say "$1"
  printf '%s\n' "$2" | sed 's/^/  sql> /'
  psql -X -q "$APP" -v VERBOSITY=default -c "$2" 2>&1 | sed 's/^/  /' || true
}

step "The extension is installed (\\dx)" "\\dx pg_tenancy"
step "Sherwood's transaction sees Sherwood's patients only" \
  "BEGIN; SELECT tenancy.set_org('$SHERWOOD'); SELECT display_name FROM patients ORDER BY 1; COMMIT;"
step "No context: zero rows (fails closed)" "SELECT count(*) AS visible_rows FROM patients;"
step "Forging the context variable with SET LOCAL is refused" \
  "BEGIN; SELECT tenancy.set_org('$CONWAY'); SET LOCAL app.current_org_id = '$SHERWOOD'; COMMIT;"
step "Switching tenant inside a transaction is refused" \
  "BEGIN; SELECT tenancy.set_org('$CONWAY'); SELECT tenancy.set_org('$SHERWOOD'); COMMIT;"
step "Conway cannot write a row into Sherwood" \
  "BEGIN; SELECT tenancy.set_org('$CONWAY'); INSERT INTO patients (organization_id, display_name) VALUES ('$SHERWOOD', 'smuggled'); COMMIT;"

say "The cluster is still running. Explore it:"
echo "  psql \"$APP\""
echo "Stop it with:"
if [ "$(id -u)" -eq 0 ]; then
  echo "  sudo -u postgres $BIN/pg_ctl stop -D $DIR/data"
else
  echo "  $BIN/pg_ctl stop -D $DIR/data"
fi
