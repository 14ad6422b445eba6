#!/usr/bin/env bash
# Builds installable packages for servers without Rust: `cargo pgrx package` per PostgreSQL
# major, tarred as dist/pg_tenancy-<version>-pg<major>.tar.gz (paths as on the build machine's
# PostgreSQL; for Debian's PG 15 that is /usr/lib/postgresql/15/..., see docs/install.md).
#
# Usage: scripts/package.sh [MAJOR ...]      (default: 13 14 15 16 17 18)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(13 14 15 16 17 18)
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p dist
for v in "${VERSIONS[@]}"; do
  if [ "$v" = 15 ]; then PGC=/usr/lib/postgresql/15/bin/pg_config; else PGC=/var/cache/pg_tenancy/pg$v/bin/pg_config; fi
  echo "==> [package] PostgreSQL $v ($PGC)"
  cargo pgrx package --pg-config "$PGC" --features "pg$v" --no-default-features >/dev/null
  tree="target/release/pg_tenancy-pg$v"
  tar -C "$tree" -czf "dist/pg_tenancy-$VERSION-pg$v.tar.gz" .
  echo "dist/pg_tenancy-$VERSION-pg$v.tar.gz:"
  tar -tzf "dist/pg_tenancy-$VERSION-pg$v.tar.gz" | grep -E '\.(so|control|sql)$' | sed 's/^/  /'
done
