#!/usr/bin/env bash
# Tries the four pipelining recipes of docs/operations.md against a running server with
# pg_tenancy: each must print Sherwood's note for the good tenant and refuse the bad one.
#
#   clients/pipelining/try.sh HOST PORT DB     (needs python3 -m venv, npm, and psql 18 for libpq)
#
# It creates public.notes (protected) in DB as the superuser postgres and grants it to app,
# installs psycopg 3 and postgres.js/pg into a temporary directory, runs the recipes as app,
# and drops the table again.
set -euo pipefail
HOST=$1 PORT=$2 DB=$3
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; psql -X -q -h "$HOST" -p "$PORT" -U postgres -d "$DB" -c "DROP TABLE IF EXISTS public.notes" >/dev/null' EXIT
psql -X -q -h "$HOST" -p "$PORT" -U postgres -d "$DB" >/dev/null <<'SQL'
CREATE TABLE public.notes (organization_id uuid NOT NULL, id int, body text, PRIMARY KEY (organization_id, id));
SELECT count(*) FROM tenancy.protect('public.notes');
GRANT SELECT, INSERT ON public.notes TO app;
INSERT INTO public.notes VALUES ('5e000000-0000-4000-8000-000000000001', 1, 'sherwood note'),
                                ('c0000000-0000-4000-8000-000000000002', 1, 'conway note');
SQL
python3 -m venv "$WORK/py" && "$WORK/py/bin/pip" install -q "psycopg[binary]==3.2.3"
"$WORK/py/bin/python" "$HERE/psycopg_pipeline.py" "host=$HOST port=$PORT user=app dbname=$DB"
(cd "$WORK" && npm init -y >/dev/null && npm install --silent postgres@3.4.5 pg@8.13.1 && cp "$HERE"/*.mjs .)
node "$WORK/postgres_js.mjs" "postgres://app@$HOST:$PORT/$DB"
node "$WORK/node_pg.mjs" "postgres://app@$HOST:$PORT/$DB"
PSQL18=${PSQL18:-/var/cache/pg_tenancy/pg18/bin/psql}
if [ -x "$PSQL18" ]; then
  "$PSQL18" -X "host=$HOST port=$PORT user=app dbname=$DB" -f "$HERE/libpq_pipeline.sql" || true
else
  echo "libpq: no psql 18 at $PSQL18 (scripts/provision.sh 18 installs one); skipped"
fi
