#!/usr/bin/env bash
# README command 2: every test on PostgreSQL 13, 14, 15, 16, 17 and 18 (or the majors given).
#
# Per version: `cargo pgrx test pgNN` runs the unit tests, the in-database #[pg_test]s and the
# client tests of pg_test/ (real servers, the application role, the golden pg_regress files);
# then the reference-schema client tests run again on a database made at 0.1.0 and updated.
# As root, Postgres itself runs as the `postgres` OS user (--runas).
# Usage: scripts/test.sh [MAJOR ...]
set -uo pipefail
cd "$(dirname "$0")/.."
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(13 14 15 16 17 18)

if [ "$(id -u)" -eq 0 ]; then
  bash scripts/provision.sh "${VERSIONS[@]}" || { echo "provisioning failed" >&2; exit 1; }
  PGDATA_BASE="${PG_TENANCY_TEST_PGDATA:-/tmp/pg_tenancy-pgdata}"
  mkdir -p "$PGDATA_BASE" && chown postgres "$PGDATA_BASE"
  RUNAS=(--runas postgres --pgdata "$PGDATA_BASE")
else
  echo "not root: using the cargo-pgrx and PostgreSQL versions already set up (scripts/provision.sh needs root)"
  RUNAS=()
fi

declare -A RESULT
total_pass=0 total_fail=0 failed_versions=()
for v in "${VERSIONS[@]}"; do
  printf '\n==> [test] PostgreSQL %s\n' "$v"
  log=$(mktemp)
  start=$(date +%s)
  cargo pgrx test "pg$v" "${RUNAS[@]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  # Again, the reference-schema tests on a database filled under the released 0.1.0 and
  # updated with ALTER EXTENSION pg_tenancy UPDATE.
  printf '\n==> [test] PostgreSQL %s, reference schema updated from 0.1.0\n' "$v"
  PG_TENANCY_TEST_UPGRADE_FROM=0.1.0 PGRX_FEATURES="pg$v pg_test" \
    cargo test --test client --no-default-features --features "pg$v pg_test" -- rls:: audit:: sealing:: restore:: 2>&1 | tee -a "$log"
  rc2=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] || rc=$rc2
  secs=$(( $(date +%s) - start ))
  pass=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
  fail=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
  pass=${pass:-0} fail=${fail:-0}
  rm -f "$log"
  if [ "$rc" -ne 0 ] || [ "$pass" -eq 0 ]; then
    failed_versions+=("$v")
    # A build or harness failure counts as a failure even when no test line was printed.
    [ "$fail" -gt 0 ] || fail=1
    RESULT[$v]="FAILED  $pass passed, $fail failed (${secs}s, exit $rc)"
  else
    RESULT[$v]="ok      $pass passed, $fail failed (${secs}s)"
  fi
  total_pass=$((total_pass + pass)) total_fail=$((total_fail + fail))
done

# The scale-out tests (pg_test/client/citus.rs: a coordinator and two workers) on PostgreSQL
# 18 when Citus is installed there; otherwise a line saying they were skipped and why. A skip
# adds no pass; Citus asked for (PG_TENANCY_CITUS_SOURCE) but missing is a failure.
CITUS_LINE=""
if [[ " ${VERSIONS[*]} " == *" 18 "* ]]; then
  pg18=$(sed -nE 's/^pg18 = "(.*)"/\1/p' "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null)
  if [ -n "$pg18" ] && [ -f "$("$pg18" --pkglibdir)/citus.so" ]; then
    printf '\n==> [test] PostgreSQL 18 with Citus (coordinator and two workers)\n'
    log=$(mktemp)
    start=$(date +%s)
    PGRX_FEATURES="pg18 pg_test" \
      cargo test --test client --no-default-features --features "pg18 pg_test" -- --ignored citus:: 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    secs=$(( $(date +%s) - start ))
    pass=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
    fail=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
    rm -f "$log"
    if [ "$rc" -ne 0 ] || [ "$pass" -eq 0 ]; then
      [ "$fail" -gt 0 ] || fail=1
      failed_versions+=("18+citus")
      CITUS_LINE="FAILED  $pass passed, $fail failed (${secs}s, exit $rc)"
    else
      CITUS_LINE="ok      $pass passed, $fail failed (${secs}s)"
    fi
    total_pass=$((total_pass + pass)) total_fail=$((total_fail + fail))
  elif [ -n "${PG_TENANCY_CITUS_SOURCE:-}" ]; then
    failed_versions+=("18+citus")
    total_fail=$((total_fail + 1))
    CITUS_LINE="FAILED  PG_TENANCY_CITUS_SOURCE is set but PostgreSQL 18 has no citus.so"
  else
    CITUS_LINE="skipped (not counted): Citus is not installed in PostgreSQL 18; set PG_TENANCY_CITUS_SOURCE to a Citus source tarball (scripts/provision.sh builds it)"
  fi
fi

printf '\n==> [test] summary\n'
for v in "${VERSIONS[@]}"; do
  printf 'PostgreSQL %-3s %s\n' "$v" "${RESULT[$v]}"
done
[ -z "$CITUS_LINE" ] || printf 'Citus (PG 18)  %s\n' "$CITUS_LINE"
echo "total: $total_pass passed, $total_fail failed"
[ ${#failed_versions[@]} -eq 0 ]
