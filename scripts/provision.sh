#!/usr/bin/env bash
# Provision a fresh Debian 12 machine for pg_tenancy development and CI.
#
# Idempotent: every step checks what is already there and skips it.  Run as root.
#   - Debian packages (headers for PostgreSQL 15, libclang for bindgen, bison/flex, pgbouncer, ...)
#   - cargo-pgrx 0.18.0 (only when missing or another version)
#   - PostgreSQL 13, 17 and 18 built from Debian's source packages into $PG_TENANCY_PG_CACHE,
#     fetched through a private apt configuration so the system's apt sources stay untouched
#   - `cargo pgrx init` for 13, 15 (Debian's own), 17 and 18
set -euo pipefail

CACHE="${PG_TENANCY_PG_CACHE:-/var/cache/pg_tenancy}"
PGRX_VERSION="0.18.0"
# major -> Debian suite whose source package we build
declare -A SUITE=([13]=bullseye [17]=trixie [18]=sid)

step() { printf '\n==> [provision] %s\n' "$*"; }
fail() { printf '\n!!! [provision] FAILED at step: %s\n' "$CURRENT_STEP" >&2; }
trap fail ERR
CURRENT_STEP="start"

if [ "$(id -u)" -ne 0 ]; then
  echo "provision.sh must run as root (it installs Debian packages)" >&2
  exit 1
fi

CURRENT_STEP="apt packages"
step "$CURRENT_STEP"
PKGS=(sudo postgresql-15 postgresql-contrib postgresql-server-dev-15 libclang-dev clang bison flex
      zlib1g-dev libreadline-dev libicu-dev pkg-config pgbouncer make gcc xz-utils bzip2 ca-certificates
      python3)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "all present"
fi
# Node and npm for the example service's test (pg_test/node); machines that already have a
# Node (20 here) keep it, others get Debian's.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing: nodejs npm"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm
fi
# Debian's postgresql-15 package starts a cluster on 5432; we never use it, and it would only
# compete for the two cores.
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
  pg_ctlcluster 15 main stop 2>/dev/null || true
fi

CURRENT_STEP="cargo-pgrx ${PGRX_VERSION}"
step "$CURRENT_STEP"
if cargo pgrx --version 2>/dev/null | grep -q " ${PGRX_VERSION}\$"; then
  echo "cargo-pgrx ${PGRX_VERSION} present"
else
  cargo install cargo-pgrx --version "=${PGRX_VERSION}" --locked
fi

# A private apt configuration: its own sources list (deb-src only), its own lists and cache.
APTDIR="$CACHE/apt"
APT_OPTS=(-o "Dir::Etc::SourceList=$APTDIR/sources.list" -o "Dir::Etc::SourceParts=$APTDIR/sources.list.d"
          -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache"
          -o "Acquire::Check-Valid-Until=false" -o "APT::Sandbox::User=root")
apt_private() { apt-get -q "${APT_OPTS[@]}" "$@"; }

build_pg() {
  local major=$1 suite=${SUITE[$1]} prefix="$CACHE/pg$1"
  if [ -x "$prefix/bin/pg_config" ] && [ -x "$prefix/bin/postgres" ]; then
    echo "PostgreSQL $major present in $prefix ($("$prefix/bin/pg_config" --version))"
    return
  fi
  mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/sources.list.d"
  if [ ! -s "$APTDIR/sources.list" ] || [ -z "$(ls "$APTDIR/lists" | grep -v partial || true)" ]; then
    {
      for s in bullseye trixie sid; do
        echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $s main"
      done
    } >"$APTDIR/sources.list"
    apt_private update
  fi
  local src="$CACHE/src/pg$major"
  rm -rf "$src" && mkdir -p "$src"
  (cd "$src" && apt_private source --download-only "postgresql-$major/$suite")
  local orig
  orig=$(ls "$src"/postgresql-"$major"_*.orig.tar.* | head -n1)
  tar -xf "$orig" -C "$src"
  local dir
  dir=$(find "$src" -mindepth 1 -maxdepth 1 -type d -name 'postgresql-*' | head -n1)
  (cd "$dir" && ./configure --prefix="$prefix" --with-readline --with-zlib >"$src/configure.log" 2>&1 \
     || { tail -n 30 "$src/configure.log"; exit 1; })
  (cd "$dir" && make -j"$(nproc)" -s >"$src/make.log" 2>&1 || { tail -n 40 "$src/make.log"; exit 1; })
  (cd "$dir" && make -s install >"$src/install.log" 2>&1 || { tail -n 40 "$src/install.log"; exit 1; })
  # pgcrypto and friends are not needed on these versions; the benchmarks use Debian's PG 15.
  rm -rf "$dir"
  echo "PostgreSQL $major built into $prefix ($("$prefix/bin/pg_config" --version))"
}

for major in 13 17 18; do
  CURRENT_STEP="PostgreSQL $major from Debian source (${SUITE[$major]})"
  step "$CURRENT_STEP"
  build_pg "$major"
done
# The test cluster runs as `postgres`, which must reach the binaries and install directories.
chmod 755 "$CACHE"

CURRENT_STEP="cargo pgrx init"
step "$CURRENT_STEP"
cargo pgrx init \
  --pg13 "$CACHE/pg13/bin/pg_config" \
  --pg15 /usr/lib/postgresql/15/bin/pg_config \
  --pg17 "$CACHE/pg17/bin/pg_config" \
  --pg18 "$CACHE/pg18/bin/pg_config"

step "done"
