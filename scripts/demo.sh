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

# Never replace pg_tenancy.so under a running server (its background worker dies with SIGBUS):
# stop the previous demo cluster first.
if [ -f "$DIR/data/postmaster.pid" ]; then as_pg "$BIN/pg_ctl" stop -m fast -D "$DIR/data" >/dev/null || true; fi

say "Building and installing pg_tenancy into PostgreSQL 15"
cargo pgrx install --pg-config "$BIN/pg_config" 2>&1 | grep -E "Finished|Installing|error" || true
[ -f /usr/share/postgresql/15/extension/pg_tenancy.control ] || { echo "install failed" >&2; exit 1; }

say "Starting a throwaway cluster in $DIR on 127.0.0.1:$PORT"
if [ -f "$DIR/data/postmaster.pid" ]; then as_pg "$BIN/pg_ctl" stop -m fast -D "$DIR/data" >/dev/null || true; fi
rm -rf "$DIR" && mkdir -p "$DIR"
[ "$(id -u)" -ne 0 ] || chown postgres "$DIR"
as_pg "$BIN/initdb" -A trust -U postgres --locale=C -E UTF8 -D "$DIR/data" >/dev/null
# A fresh PHI key ring: random AES-256 key, mode 0600, owned by the server's OS user.
if [ "$(id -u)" -eq 0 ]; then OWNER=(--owner postgres); else OWNER=(); fi
python3 scripts/phi_keyring.py new "$DIR/phi.keyring" "${OWNER[@]}" >/dev/null
as_pg sh -c "cat >> '$DIR/data/postgresql.conf'" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_tenancy'
tenancy.phi_key_file = '$DIR/phi.keyring'
tenancy.audit_database = 'clinic'
CONF
as_pg "$BIN/pg_ctl" start -w -D "$DIR/data" -l "$DIR/server.log" >/dev/null

SU=(psql -X -q -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$PORT user=postgres dbname=postgres")
"${SU[@]}" -c "CREATE ROLE clinic_owner LOGIN" -c "CREATE ROLE app LOGIN" -c "CREATE DATABASE clinic OWNER clinic_owner"
psql -X -q -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$PORT user=postgres dbname=clinic" -c "CREATE EXTENSION pg_tenancy"
# The family-practice reference schema, owned by the migrations role, protected with one call.
psql -X -q -o /dev/null -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$PORT user=clinic_owner dbname=clinic" -f scripts/family_practice.sql
psql -X -q -o /dev/null -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$PORT user=postgres dbname=clinic" \
  -c "SELECT tenancy.protect_all('clinic', root => 'clinic.organizations', audit => true)"
psql -X -q -o /dev/null -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$PORT user=clinic_owner dbname=clinic" <<SQL
GRANT USAGE ON SCHEMA clinic TO app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA clinic TO app;
BEGIN; SELECT tenancy.set_org('$SHERWOOD');
INSERT INTO clinic.organizations (id, name, slug) VALUES ('$SHERWOOD', 'Sherwood Family Practice', 'sherwood');
INSERT INTO clinic.patients (id, first_name, last_name, phone)
VALUES ('5e000000-0000-4000-8000-0000000000a1', tenancy.phi_encrypt('Ada', 'patients.first_name'),
        tenancy.phi_encrypt('Lovelace', 'patients.last_name'), tenancy.phi_encrypt('555-0101', 'patients.phone')),
       ('5e000000-0000-4000-8000-0000000000a2', tenancy.phi_encrypt('Ben', 'patients.first_name'),
        tenancy.phi_encrypt('Okri', 'patients.last_name'), tenancy.phi_encrypt('555-0102', 'patients.phone'));
-- A visit: location, service, provider, a booking (reason encrypted), the appointment, a note.
INSERT INTO clinic.locations (id, name) VALUES ('5e000000-0000-4000-8000-0000000000b1', 'Sherwood high street');
INSERT INTO clinic.services (id, name) VALUES ('5e000000-0000-4000-8000-0000000000b2', 'Check-up');
INSERT INTO clinic.providers (id, display_name) VALUES ('5e000000-0000-4000-8000-0000000000b3', 'Dr. Jones');
INSERT INTO clinic.bookings (id, patient_id, service_id, location_id, starts_at, status, reason_for_visit)
VALUES ('5e000000-0000-4000-8000-0000000000b4', '5e000000-0000-4000-8000-0000000000a1', '5e000000-0000-4000-8000-0000000000b2',
        '5e000000-0000-4000-8000-0000000000b1', '2026-12-01 09:00+00', 'confirmed',
        tenancy.phi_encrypt('persistent cough', 'bookings.reason_for_visit'));
INSERT INTO clinic.appointments (id, booking_id, provider_id)
VALUES ('5e000000-0000-4000-8000-0000000000b5', '5e000000-0000-4000-8000-0000000000b4', '5e000000-0000-4000-8000-0000000000b3');
INSERT INTO clinic.clinical_notes (appointment_id, body)
VALUES ('5e000000-0000-4000-8000-0000000000b5', tenancy.phi_encrypt('Chest clear; review in two weeks.', 'clinical_notes.body'));
COMMIT;
BEGIN; SELECT tenancy.set_org('$CONWAY');
INSERT INTO clinic.organizations (id, name, slug) VALUES ('$CONWAY', 'Conway Family Clinic', 'conway');
INSERT INTO clinic.patients (first_name, last_name, phone)
VALUES (tenancy.phi_encrypt('Cy', 'patients.first_name'), tenancy.phi_encrypt('Twombly', 'patients.last_name'),
        tenancy.phi_encrypt('555-0199', 'patients.phone'));
INSERT INTO clinic.locations (id, name) VALUES ('c0000000-0000-4000-8000-0000000000b1', 'Conway old mill');
INSERT INTO clinic.services (id, name) VALUES ('c0000000-0000-4000-8000-0000000000b2', 'Vaccination');
INSERT INTO clinic.bookings (patient_id, service_id, location_id, starts_at, reason_for_visit)
SELECT id, 'c0000000-0000-4000-8000-0000000000b2', 'c0000000-0000-4000-8000-0000000000b1', '2026-12-02 10:30+00',
       tenancy.phi_encrypt('flu shot', 'bookings.reason_for_visit')
  FROM clinic.patients;
COMMIT;
SQL

APP="host=127.0.0.1 port=$PORT user=app dbname=clinic"
step() {
  say "$1"
  printf '%s\n' "$2" | sed 's/^/  sql> /'
  psql -X -q "${3:-$APP}" -v VERBOSITY=default -c "$2" 2>&1 | sed 's/^/  /' || true
}

step "The extension is installed (\\dx)" "\\dx pg_tenancy"
step "Sherwood's transaction sees Sherwood's patients only" \
  "BEGIN; SELECT tenancy.set_org('$SHERWOOD'); SELECT o.name AS clinic, count(p.*) AS patients FROM clinic.organizations o LEFT JOIN clinic.patients p ON p.organization_id = o.id GROUP BY 1; SELECT count(*) AS visible_patients FROM clinic.patients; COMMIT;"
step "No context: zero rows (fails closed)" "SELECT (SELECT count(*) FROM clinic.patients) AS patients, (SELECT count(*) FROM clinic.organizations) AS clinics;"
step "Forging the context variable with SET LOCAL is refused" \
  "BEGIN; SELECT tenancy.set_org('$CONWAY'); SET LOCAL app.current_org_id = '$SHERWOOD'; COMMIT;"
step "Switching tenant inside a transaction is refused" \
  "BEGIN; SELECT tenancy.set_org('$CONWAY'); SELECT tenancy.set_org('$SHERWOOD'); COMMIT;"
step "Conway cannot write a row into Sherwood" \
  "BEGIN; SELECT tenancy.set_org('$CONWAY'); INSERT INTO clinic.patients (organization_id, first_name, last_name) VALUES ('$SHERWOOD', tenancy.phi_encrypt('Eve', 'patients.first_name'), tenancy.phi_encrypt('Mallory', 'patients.last_name')); COMMIT;"
step "Sherwood's visit: booking reason and clinical note, revealed for Sherwood" \
  "BEGIN; SELECT tenancy.set_org('$SHERWOOD'); SELECT b.starts_at, tenancy.phi_reveal(b.reason_for_visit, 'bookings.reason_for_visit') AS reason, tenancy.phi_reveal(n.body, 'clinical_notes.body') AS note FROM clinic.bookings b JOIN clinic.appointments a ON a.booking_id = b.id JOIN clinic.clinical_notes n ON n.appointment_id = a.id; COMMIT;"
step "PHI is stored encrypted: what a dump or a superuser sees" \
  "SELECT organization_id, substring(phone FROM 1 FOR 12) AS phone_envelope_start, length(phone) AS bytes FROM clinic.patients ORDER BY 1, 2;" \
  "host=127.0.0.1 port=$PORT user=postgres dbname=clinic"
step "Sherwood reveals its patient's phone" \
  "BEGIN; SELECT tenancy.set_org('$SHERWOOD'); SELECT tenancy.phi_reveal(first_name, 'patients.first_name') AS first_name, tenancy.phi_reveal(phone, 'patients.phone') AS phone FROM clinic.patients ORDER BY 1; COMMIT;"
ENVELOPE=$(psql -X -qAt "host=127.0.0.1 port=$PORT user=postgres dbname=clinic" \
  -c "SELECT encode(phone, 'hex') FROM clinic.patients WHERE id = '5e000000-0000-4000-8000-0000000000a1'")
step "Ada's phone ciphertext, copied into Conway's transaction, is refused" \
  "BEGIN; SELECT tenancy.set_org('$CONWAY'); SELECT tenancy.phi_reveal('\\x$ENVELOPE'::bytea, 'patients.phone'); COMMIT;"
step "Disabling row level security is refused, even for the table owner" \
  "ALTER TABLE clinic.patients DISABLE ROW LEVEL SECURITY;" "host=127.0.0.1 port=$PORT user=clinic_owner dbname=clinic"
step "Sherwood's audit trail of what just happened (payloads decrypted for Sherwood only)" \
  "BEGIN; SELECT tenancy.set_org('$SHERWOOD', 'dr-jones'); SELECT tenancy.log_action('demo.viewed_trail'); SELECT event_id, action, table_name, changed_columns, left(changes::text, 60) AS changes FROM tenancy.my_audit_events ORDER BY event_id; COMMIT;"
step "The trail, sealed into hash-chained blocks after commit, verifies (as the DBA)" \
  "SELECT tenancy.audit_seal() AS sealed_now; SELECT organization_id, v.* FROM (VALUES ('$SHERWOOD'), ('$CONWAY')) o(organization_id), tenancy.audit_verify(organization_id) v;" \
  "host=127.0.0.1 port=$PORT user=postgres dbname=clinic"
say "The isolation report (as the DBA): no findings"
psql -X "host=127.0.0.1 port=$PORT user=postgres dbname=clinic" -c "SELECT severity, object, finding FROM tenancy.isolation_report();" | sed 's/^/  /'

say "The cluster is still running. Explore it:"
echo "  psql \"$APP\""
echo "Stop it with:"
if [ "$(id -u)" -eq 0 ]; then
  echo "  sudo -u postgres $BIN/pg_ctl stop -D $DIR/data"
else
  echo "  $BIN/pg_ctl stop -D $DIR/data"
fi
