#!/usr/bin/env bash
# The benchmark command (not part of the tests): builds and installs a release build of
# pg_tenancy into PostgreSQL 15, then runs scripts/bench.py, which starts its own cluster,
# loads the reference schema and writes bench/RESULTS.md.
#
#   scripts/bench.sh            full size (1,000 clinics, 1M patients, 2M bookings; ~25 min)
#   scripts/bench.sh --quick    smoke size (a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/provision.sh 15 >/tmp/pg_tenancy-bench-provision.log 2>&1 \
    || { tail -n 30 /tmp/pg_tenancy-bench-provision.log; exit 1; }
fi
echo "[bench] building and installing a release build into PostgreSQL 15"
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config 2>&1 | grep -E "error|Finished installing" || true
exec python3 scripts/bench.py "$@"
