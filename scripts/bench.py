#!/usr/bin/env python3
"""pg_tenancy benchmarks (issue 7/8): every comparison runs its variants interleaved, on the
same data, in one run, and reports medians and ratios. Writes bench/RESULTS.md.

Run it through scripts/bench.sh (which builds and installs a release build first):

  scripts/bench.sh            full size: 1,000 clinics, 1,000,000 patients, 2,000,000 bookings
  scripts/bench.sh --quick    smoke size: 50 clinics, 20,000 patients, 40,000 bookings

It starts its own PostgreSQL 15 cluster (127.0.0.1, port 54339, data under
/tmp/pg_tenancy-bench) and stops it at the end.
"""
import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# The server binaries (scripts/bench.sh installs the release build into PostgreSQL 15).
BIN = os.environ.get("PG_TENANCY_BENCH_BIN", "/usr/lib/postgresql/15/bin")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AS_PG = ["sudo", "-n", "-u", "postgres"] if os.geteuid() == 0 else []


def org(n):
    return "00000000-0000-4000-8000-%012d" % n


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Cluster:
    def __init__(self, port, dir_):
        self.port, self.dir = port, dir_
        self.data = os.path.join(dir_, "data")

    def start(self):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(AS_PG + [f"{BIN}/pg_ctl", "stop", "-m", "fast", "-D", self.data],
                           capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        if AS_PG:
            shutil.chown(self.dir, "postgres")
        subprocess.run(AS_PG + [f"{BIN}/initdb", "-A", "trust", "-U", "postgres", "--locale=C",
                                "-E", "UTF8", "-D", self.data], check=True, capture_output=True)
        ring = os.path.join(self.dir, "phi.keyring")
        owner = ["--owner", "postgres"] if AS_PG else []
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts/phi_keyring.py"), "new", ring]
                       + owner, check=True, capture_output=True)
        conf = f"""
port = {self.port}
listen_addresses = '127.0.0.1'
unix_socket_directories = '{self.dir}'
shared_preload_libraries = 'pg_tenancy'
tenancy.phi_key_file = '{ring}'
tenancy.audit_database = 'bench'
shared_buffers = '8GB'
work_mem = '16MB'
maintenance_work_mem = '512MB'
max_wal_size = '16GB'
checkpoint_timeout = '30min'
synchronous_commit = off
max_connections = 50
"""
        subprocess.run(AS_PG + ["sh", "-c", f"cat >> '{self.data}/postgresql.conf'"],
                       input=conf.encode(), check=True)
        subprocess.run(AS_PG + [f"{BIN}/pg_ctl", "start", "-w", "-D", self.data, "-l",
                                os.path.join(self.dir, "server.log")], check=True,
                       capture_output=True)

    def stop(self):
        subprocess.run(AS_PG + [f"{BIN}/pg_ctl", "stop", "-m", "fast", "-D", self.data],
                       capture_output=True)

    def reload(self):
        subprocess.run(AS_PG + [f"{BIN}/pg_ctl", "reload", "-D", self.data], check=True,
                       capture_output=True)
        time.sleep(1)

    def psql(self, sql, user="postgres", db="bench", timing=False):
        """Runs SQL through psql; with timing, returns the list of statement times in ms."""
        script = ("\\timing on\n" if timing else "") + sql
        r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
                            f"host=127.0.0.1 port={self.port} user={user} dbname={db}"],
                           input=script.encode(), capture_output=True)
        out = r.stdout.decode()
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr.decode()[-2000:]}\nSQL: {sql[:500]}")
        if timing:
            return [float(m) for m in re.findall(r"^Time: ([0-9.]+) ms", out, re.M)]
        return out.strip()

    def pgbench(self, scripts, clients, secs, user="app", protocol="simple"):
        """One pgbench run of weighted scripts (interleaved per transaction); returns
        {script name: average latency in ms}. Pipelined scripts need protocol "extended"."""
        args = ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-M", protocol,
                "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(secs)]
        for path in scripts:
            args += ["-f", f"{path}@1"]
        r = subprocess.run(args + ["bench"], capture_output=True)
        out = r.stdout.decode() + r.stderr.decode()
        if r.returncode != 0:
            raise RuntimeError(f"pgbench failed: {out[-3000:]}")
        result = {}
        for block in out.split("SQL script ")[1:]:
            name = os.path.basename(re.search(r": (\S+)", block).group(1))
            lat = re.search(r"latency average = ([0-9.]+) ms", block)
            result[name] = float(lat.group(1))
        return result


def median(xs):
    return statistics.median(xs)


def interleaved(c, scripts, clients, secs, rounds, protocol="simple"):
    """`rounds` pgbench runs of `scripts` together (interleaved per transaction); returns
    {script file name: median of the rounds' average latencies in ms}."""
    lat = {}
    for _ in range(rounds):
        for name, ms in c.pgbench(scripts, clients, secs, protocol=protocol).items():
            lat.setdefault(name, []).append(ms)
    return {name: median(v) for name, v in lat.items()}


class Report:
    def __init__(self):
        self.lines = []

    def section(self, title, text=""):
        self.lines += ["", f"## {title}", ""] + ([text, ""] if text else [])

    def table(self, header, rows):
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        for r in rows:
            self.lines.append("| " + " | ".join(str(c) for c in r) + " |")
        self.lines.append("")

    def text(self, t):
        self.lines += [t, ""]


def load(c, clinics, patients_per, bookings_per):
    log(f"loading {clinics} clinics, {clinics * patients_per} patients, "
        f"{clinics * bookings_per} bookings")
    c.psql("CREATE ROLE app LOGIN; CREATE DATABASE bench", db="postgres")
    c.psql("CREATE EXTENSION pg_tenancy; CREATE EXTENSION pgcrypto")
    with open(os.path.join(ROOT, "scripts/family_practice.sql")) as f:
        c.psql(f.read())
    parts = []
    for n in range(1, clinics + 1):
        o = org(n)
        parts.append(f"""BEGIN; SELECT tenancy.set_org('{o}');
INSERT INTO clinic.organizations (id, name, slug) VALUES ('{o}', 'Clinic {n}', 'clinic-{n}');
INSERT INTO clinic.locations (organization_id, id, name) VALUES ('{o}', '{o}', 'Main street');
INSERT INTO clinic.services (organization_id, id, name) VALUES ('{o}', '{o}', 'Check-up');
INSERT INTO clinic.patients (organization_id, id, first_name, last_name, phone)
  SELECT '{o}', ('10000000-0000-4000-8000-' || lpad(({n - 1} * {patients_per} + g)::text, 12, '0'))::uuid,
         tenancy.phi_encrypt('First' || g, 'patients.first_name'),
         tenancy.phi_encrypt('Last' || g, 'patients.last_name'),
         tenancy.phi_encrypt('555-' || lpad(g::text, 4, '0'), 'patients.phone')
    FROM generate_series(1, {patients_per}) g;
INSERT INTO clinic.bookings (organization_id, id, patient_id, service_id, location_id, starts_at, status, reason_for_visit)
  SELECT '{o}', ('20000000-0000-4000-8000-' || lpad(({n - 1} * {bookings_per} + g)::text, 12, '0'))::uuid,
         ('10000000-0000-4000-8000-' || lpad(({n - 1} * {patients_per} + 1 + g % {patients_per})::text, 12, '0'))::uuid,
         '{o}', '{o}', timestamptz '2026-01-01 08:00+00' + (g % 365) * interval '1 day' + (g % 20) * interval '30 min',
         'confirmed', tenancy.phi_encrypt('visit ' || g, 'bookings.reason_for_visit')
    FROM generate_series(1, {bookings_per}) g;
COMMIT;
""")
        if len(parts) == 50 or n == clinics:
            c.psql("".join(parts))
            parts = []
    log("protecting the reference schema (audit => true)")
    c.psql("SELECT count(*) FROM tenancy.protect_all('clinic', root => 'clinic.organizations', audit => true)")
    c.psql("""GRANT USAGE ON SCHEMA clinic TO app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA clinic TO app;
CREATE SCHEMA bench; GRANT USAGE ON SCHEMA bench TO app;""")
    # Copies of bookings and patients: protected by pg_tenancy without audit (RLS cost only),
    # unprotected (the floor), and with the seeds' own hand-written policy.
    for t in ("patients", "bookings"):
        for v in ("tenancy", "floor", "seeds"):
            c.psql(f"""CREATE TABLE bench.{t}_{v} (LIKE clinic.{t} INCLUDING DEFAULTS INCLUDING INDEXES);
INSERT INTO bench.{t}_{v} SELECT * FROM clinic.{t};
GRANT SELECT, INSERT, UPDATE, DELETE ON bench.{t}_{v} TO app;""")
        c.psql(f"SELECT count(*) FROM tenancy.protect('bench.{t}_tenancy')")
        c.psql(f"""ALTER TABLE bench.{t}_seeds ENABLE ROW LEVEL SECURITY;
ALTER TABLE bench.{t}_seeds FORCE ROW LEVEL SECURITY;
CREATE POLICY seeds_tenant ON bench.{t}_seeds FOR ALL TO PUBLIC
  USING (organization_id = current_setting('app.current_organization_id')::uuid)
  WITH CHECK (organization_id = current_setting('app.current_organization_id')::uuid);""")
    c.psql("VACUUM ANALYZE")


def write_script(dir_, name, body):
    path = os.path.join(dir_, name)
    with open(path, "w") as f:
        f.write(body)
    return path


PICK = """\\set n random(1, {clinics})
\\set p random(1, {patients_per})
\\set day random(0, 364)
"""
ORG = "('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))"
PID = "('10000000-0000-4000-8000-' || lpad(((:n - 1) * {patients_per} + :p)::text, 12, '0'))::uuid"
DAY = "(timestamptz '2026-01-01 00:00+00' + :day * interval '1 day')"


def enter(variant):
    return {
        "tenancy": f"SELECT tenancy.set_org({ORG}::uuid);\n",
        "floor": "",
        # The floor with the same number of statements (round trips) as the other two.
        "floorrt": f"SELECT {ORG}::uuid;\n",
        "seeds": f"SELECT set_config('app.current_organization_id', {ORG}, true);\n",
    }[variant]


def where(variant):
    return f" AND organization_id = {ORG}::uuid" if variant.startswith("floor") else ""


def table(variant):
    return "floor" if variant.startswith("floor") else variant


# Planner settings that pin a shape (the same in every variant): the report over one tenant
# as a sequential scan, the join as a hash join. No parallel workers (measured separately).
SHAPE_SETTINGS = {
    "scan": "SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL max_parallel_workers_per_gather = 0;\n",
    "join": "SET LOCAL enable_nestloop = off; SET LOCAL enable_mergejoin = off; SET LOCAL max_parallel_workers_per_gather = 0;\n",
}


def shape_sql(q, v, cfg):
    """The query of shape `q` for variant `v` (floor variants name the tenant themselves)."""
    t, w = table(v), where(v)
    pid = PID.format(**cfg)
    return {
        "point": f"SELECT id, created_at FROM bench.patients_{t} WHERE id = {pid}{w}",
        "day": f"SELECT id, starts_at, status FROM bench.bookings_{t} WHERE starts_at >= {DAY} AND starts_at < {DAY} + interval '1 day'{w}",
        "scan": f"SELECT count(*), sum(extract(epoch FROM starts_at)) FROM bench.bookings_{t} WHERE status = 'confirmed'{w}",
        "join": f"SELECT count(*) FROM bench.bookings_{t} b JOIN bench.patients_{t} p ON p.organization_id = b.organization_id AND p.id = b.patient_id WHERE b.starts_at >= {DAY} AND b.starts_at < {DAY} + interval '30 days'"
                + (f" AND b.organization_id = {ORG}::uuid AND p.organization_id = {ORG}::uuid" if v.startswith("floor") else ""),
        "report": f"SELECT date_trunc('month', starts_at) AS month, status, count(*) FROM bench.bookings_{t} WHERE starts_at >= timestamptz '2026-01-01 00:00+00' AND starts_at < timestamptz '2026-04-01 00:00+00'{w} GROUP BY 1, 2",
        "update": f"UPDATE bench.bookings_{t} SET status = 'rescheduled' WHERE true{w}",
        "delete": f"DELETE FROM bench.bookings_{t} WHERE true{w}",
        "insert": f"INSERT INTO bench.bookings_{t} (organization_id, patient_id, service_id, location_id, starts_at) VALUES ({ORG}::uuid, {pid}, {ORG}::uuid, {ORG}::uuid, {DAY})",
    }[q]


SHAPES = ("point", "day", "scan", "join", "report", "update", "delete", "insert")
# Bulk writes touch all of one tenant's bookings and roll back, so the table stays the same.
ROLLED_BACK = ("update", "delete")


def rls_scripts(tmp, cfg, variants=("tenancy", "floor", "floorrt", "seeds")):
    out = {}
    for q in SHAPES:
        for v in variants:
            end = "ROLLBACK;\n" if q in ROLLED_BACK else "COMMIT;\n"
            out[(q, v)] = write_script(tmp, f"{q}_{v}.sql", PICK.format(**cfg) + "BEGIN;\n" + enter(v)
                                       + SHAPE_SETTINGS.get(q, "") + shape_sql(q, v, cfg) + ";\n" + end)
    return out


def pipelined_scripts(tmp, cfg):
    """Point lookup and insert with the whole transaction in one pipeline (one round trip):
    pg_tenancy (set_org inside the pipeline) against the floor with a constant statement."""
    out = {}
    for q in ("point", "insert"):
        for v in ("tenancy", "floorrt"):
            out[(q, v)] = write_script(tmp, f"pipe_{q}_{v}.sql", PICK.format(**cfg) + "\\startpipeline\nBEGIN;\n"
                                       + enter(v) + shape_sql(q, v, cfg) + ";\nCOMMIT;\n\\endpipeline\n")
    return out


def bench_rls(c, rep, cfg, tmp, rounds, secs, clients):
    log("1. RLS cost")
    scripts = rls_scripts(tmp, cfg)
    rows, plans = [], []
    variants = ("tenancy", "floor", "floorrt", "seeds")
    for q in SHAPES:
        log(f"   {q}")
        res = interleaved(c, [scripts[(q, v)] for v in variants], clients, secs, rounds)
        m = {v: res[f"{q}_{v}.sql"] for v in variants}
        rows.append([q, f"{m['floor']:.3f}", f"{m['floorrt']:.3f}", f"{m['seeds']:.3f}", f"{m['tenancy']:.3f}",
                     f"**{m['floor'] / m['tenancy']:.3f}x**", f"**{m['floorrt'] / m['tenancy']:.3f}x**", ">= 0.95x",
                     f"**{m['seeds'] / m['tenancy']:.3f}x**", ">= 1.0x"])
        sql = shape_sql(q, "tenancy", cfg).replace(":n", "1").replace(":p", "1").replace(":day", "59")
        plan = c.psql(f"BEGIN; SELECT tenancy.set_org('{org(1)}');\n{SHAPE_SETTINGS.get(q, '')}EXPLAIN (COSTS OFF) {sql};\nROLLBACK;",
                      user="app")
        plans.append(f"{q}:\n" + "\n".join(l for l in plan.splitlines()[1:] if l and l != "SET"))
    log("   pipelined")
    pipes = pipelined_scripts(tmp, cfg)
    for q in ("point", "insert"):
        res = interleaved(c, [pipes[(q, v)] for v in ("tenancy", "floorrt")], clients, secs, rounds, protocol="extended")
        t, f = res[f"pipe_{q}_tenancy.sql"], res[f"pipe_{q}_floorrt.sql"]
        rows.append([f"{q}, pipelined (one round trip)", "", f"{f:.3f}", "", f"{t:.3f}", "", f"**{f / t:.3f}x**", ">= 0.97x", "", ""])
    rep.section("1. RLS cost, every query shape", f"pgbench, {clients} clients, {rounds} rounds of {secs} s; the variants of "
                "each query run as weighted scripts of ONE pgbench run, so they interleave per transaction. "
                "Every transaction is BEGIN; enter the tenant (pg_tenancy: `tenancy.set_org`; seeds: "
                "`set_config('app.current_organization_id', ...)`; floor: nothing, the query names the tenant; "
                "'floor + one constant statement': `SELECT '<org>'::uuid` in place of set_org, so it makes the same "
                "number of round trips as the other two); "
                "the query; COMMIT (bulk update and delete: all of one tenant's bookings, then ROLLBACK). "
                "Shapes: point = patient by id; day = a day of bookings (tenant index); scan = count and sum over one tenant's "
                "bookings by sequential scan (the monthly-report shape); join = a month of bookings joined to patients by hash join; "
                "report = GROUP BY month and status over a quarter; update / delete = every booking of one tenant (2,000 rows at full size); "
                "insert = one booking. scan and join pin their plan with SET LOCAL in every variant. "
                "Pipelined rows: the whole transaction in one pgbench pipeline (`\\startpipeline` ... `\\endpipeline`, extended protocol). "
                "Median latency per transaction (ms); TPS ratio = inverse latency ratio. "
                "Tables: copies of `clinic.patients` / `clinic.bookings` without audit, so only RLS differs. "
                "Where the remaining gap on the small shapes goes: bench/PROFILE.md (scripts/profile.sh).")
    rep.table(["query", "floor: WHERE organization_id = $1, no RLS", "floor + one constant statement",
               "seeds' policy (current_setting)", "pg_tenancy policies", "TPS vs floor",
               "TPS vs floor, same round trips", "target", "TPS vs seeds", "target"], rows)
    rep.text("Plans as the application role (pg_tenancy variant, tenant 1; `$0` / `(InitPlan 1).col1` is the tenant, read once):\n\n```\n" + "\n\n".join(plans) + "\n```")
    # Parallel: workers allowed, every worker sees the leader's tenant.
    par = c.psql(f"""BEGIN; SELECT tenancy.set_org('{org(1)}');
SET LOCAL max_parallel_workers_per_gather = 2; SET LOCAL parallel_setup_cost = 0; SET LOCAL parallel_tuple_cost = 0;
SET LOCAL min_parallel_table_scan_size = 0; SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off;
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT count(*) FROM bench.bookings_tenancy;
SELECT count(*) FROM bench.bookings_tenancy;
ROLLBACK;""", user="app")
    want = c.psql(f"SELECT count(*) FROM bench.bookings_tenancy WHERE organization_id = '{org(1)}'")  # superuser: no RLS
    lines = [l for l in par.splitlines()[1:] if l and l != "SET"]
    rep.text("Parallel scan as the application role (workers allowed): the plan runs in parallel and the "
             f"count is the tenant's own ({lines[-1]} rows; a superuser's WHERE organization_id = tenant 1 counts {want}):\n\n```\n"
             + "\n".join(lines[:-1]) + "\n```")


def bench_set_org(c, rep, cfg, tmp, rounds, secs, clients):
    log("2. tenant context per transaction")
    body = "SELECT id, created_at FROM bench.patients_floor WHERE id = {pid} AND organization_id = {org}::uuid;\nCOMMIT;\n".format(
        pid=PID.format(**cfg), org=ORG)
    pick = PICK.format(**cfg)
    with_ = write_script(tmp, "ctx_set_org.sql", pick + "BEGIN;\n" + enter("tenancy") + body)
    without = write_script(tmp, "ctx_none.sql", pick + "BEGIN;\n" + body)
    same_rt = write_script(tmp, "ctx_set_config.sql", pick + "BEGIN;\n" + enter("seeds") + body)
    m = interleaved(c, [with_, without, same_rt], clients, secs, rounds)
    rows = [["set_org (unsigned) vs no statement", f"{m['ctx_none.sql']:.3f}", f"{m['ctx_set_org.sql']:.3f}",
             f"**{m['ctx_none.sql'] / m['ctx_set_org.sql']:.3f}x**", "(a round trip)"],
            ["set_org (unsigned) vs set_config, same round trips", f"{m['ctx_set_config.sql']:.3f}", f"{m['ctx_set_org.sql']:.3f}",
             f"**{m['ctx_set_config.sql'] / m['ctx_set_org.sql']:.3f}x**", ">= 0.98x"]]
    # Signed mode: a context key file, tokens minted as the application tier would.
    key = os.urandom(32)
    keyfile = os.path.join(c.dir, "context.key")
    with open(keyfile, "w") as f:
        f.write(key.hex() + "\n")
    os.chmod(keyfile, 0o600)
    if AS_PG:
        shutil.chown(keyfile, "postgres")
    c.psql(f"ALTER SYSTEM SET tenancy.context_key_file = '{keyfile}'")
    c.reload()
    o = org(1)
    # Tokens are single-use, so every transaction mints its own, as the application tier
    # does: a bench-only SQL function (pgcrypto's hmac) with the key in its body. Both variants
    # mint, so the ratio is the cost of verifying (and remembering) the token. They expire
    # after 5 s: used tokens are remembered until they expire, 65,536 at once, so a 10-minute
    # expiry filled the memory after 14 s at this rate (53400, docs/context.md).
    c.psql(f"""CREATE FUNCTION bench.mint(org text) RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT 'v2.' || e || '.' || n || '.' ||
         rtrim(translate(encode(hmac(convert_to('pg_tenancy.context.v2' || chr(10) || org || chr(10) || chr(10) || e || chr(10) || n, 'UTF8'),
                                     decode('{key.hex()}', 'hex'), 'sha256'), 'base64'), '+/', '-_'), '=')
    FROM (SELECT (extract(epoch FROM now())::bigint + 5)::text AS e,
                 rtrim(translate(encode(gen_random_bytes(16), 'base64'), '+/', '-_'), '=') AS n) s
$$;""")
    fixed = "SELECT id, created_at FROM bench.patients_floor WHERE id = '10000000-0000-4000-8000-000000000001' AND organization_id = '{o}';\nCOMMIT;\n".format(o=o)
    signed = write_script(tmp, "ctx_signed.sql", f"BEGIN;\nSELECT tenancy.set_org('{o}'::uuid, NULL, bench.mint('{o}'));\n" + fixed)
    none1 = write_script(tmp, "ctx_none1.sql", f"BEGIN;\nSELECT bench.mint('{o}');\n" + fixed)
    s = interleaved(c, [signed, none1], clients, secs, rounds)
    rows.append(["set_org with a signed token", f"{s['ctx_none1.sql']:.3f}", f"{s['ctx_signed.sql']:.3f}",
                 f"**{s['ctx_none1.sql'] / s['ctx_signed.sql']:.3f}x**", "(reported)"])
    c.psql("ALTER SYSTEM RESET tenancy.context_key_file")
    c.reload()
    rep.section("2. Tenant context per transaction", f"pgbench, {clients} clients, {rounds} rounds of {secs} s, "
                "the variants interleaved in one run: BEGIN; [set_org | set_config('app.current_organization_id', ...) | nothing;] "
                "point lookup on the unprotected copy; COMMIT. The first row is the price of the statement itself "
                "(a round trip: send it in the same pipeline as the query, section 1 and docs/operations.md); "
                "the second is the server-side cost against the seeds' set_config.")
    rep.table(["variant", "compared (ms)", "with set_org (ms)", "TPS ratio", "target"], rows)


def bench_crypto(c, rep, cfg, rounds, short_n, long_n, pgp_n):
    log("3. encryption")
    key = "'0123456789abcdef0123456789abcdef'::bytea"
    c.psql(f"""CREATE TABLE bench.short_plain AS SELECT 'value-' || g AS v FROM generate_series(1, {short_n}) g;
CREATE TABLE bench.long_plain AS
  SELECT translate(encode(gen_random_bytes(1024) || gen_random_bytes(1024) || gen_random_bytes(1024), 'base64'), E'\\n', '') AS v
    FROM generate_series(1, {long_n}) g;""")
    o = org(1)
    # Ciphertexts to decrypt, made once.
    c.psql(f"""BEGIN; SELECT tenancy.set_org('{o}');
CREATE TABLE bench.short_phi AS SELECT tenancy.phi_encrypt(v, 'bench') AS c FROM bench.short_plain;
CREATE TABLE bench.long_phi AS SELECT tenancy.phi_encrypt(v, 'bench') AS c FROM bench.long_plain;
COMMIT;
CREATE TABLE bench.short_raw AS SELECT encrypt(convert_to(v, 'UTF8'), {key}, 'aes') AS c FROM bench.short_plain;
CREATE TABLE bench.long_raw AS SELECT encrypt(convert_to(v, 'UTF8'), {key}, 'aes') AS c FROM bench.long_plain;
CREATE TABLE bench.short_pgp AS SELECT pgp_sym_encrypt(v, 'secret') AS c FROM bench.short_plain LIMIT {pgp_n};
CREATE TABLE bench.long_pgp AS SELECT pgp_sym_encrypt(v, 'secret') AS c FROM bench.long_plain LIMIT {min(pgp_n, long_n)};
VACUUM ANALYZE bench.short_plain, bench.long_plain, bench.short_phi, bench.long_phi, bench.short_raw, bench.long_raw, bench.short_pgp, bench.long_pgp;""")
    cases = []
    for size, n, pn in (("short", short_n, pgp_n), ("long", long_n, min(pgp_n, long_n))):
        cases += [
            (size, "bare loop", n, f"SELECT count(v || '') FROM bench.{size}_plain"),
            (size, "phi_encrypt", n, f"SELECT count(tenancy.phi_encrypt(v, 'bench')) FROM bench.{size}_plain"),
            (size, "raw encrypt aes", n, f"SELECT count(encrypt(convert_to(v, 'UTF8'), {key}, 'aes')) FROM bench.{size}_plain"),
            (size, "pgp_sym_encrypt", pn, f"SELECT count(pgp_sym_encrypt(v, 'secret')) FROM (SELECT v FROM bench.{size}_plain LIMIT {pn}) s"),
            (size, "bare loop (ciphertext)", n, f"SELECT count(c || ''::bytea) FROM bench.{size}_phi"),
            (size, "phi_reveal", n, f"SELECT count(tenancy.phi_reveal(c, 'bench')) FROM bench.{size}_phi"),
            (size, "raw decrypt aes", n, f"SELECT count(decrypt(c, {key}, 'aes')) FROM bench.{size}_raw"),
            (size, "pgp_sym_decrypt", pn, f"SELECT count(pgp_sym_decrypt(c, 'secret')) FROM bench.{size}_pgp"),
        ]
    times = {(s, name): [] for s, name, _, _ in cases}
    for i in range(rounds + 1):
        # One session per round, all variants in it: BEGIN/set_org so phi_* have their tenant.
        # Round 0 warms the caches and is not counted.
        sql = f"BEGIN; SELECT tenancy.set_org('{o}');\n" + "".join(q + ";\n" for _, _, _, q in cases) + "COMMIT;\n"
        t = c.psql(sql, user="postgres", timing=True)[2:-1]  # drop BEGIN, set_org, COMMIT
        for (s, name, _, _), ms in zip(cases, t):
            if i > 0:
                times[(s, name)].append(ms)
    bytes_per = {"short": len("value-500000"), "long": 4096}
    rows = []
    for s, name, n, _ in cases:
        ms = median(times[(s, name)])
        loop = median(times[(s, "bare loop" if "encrypt" in name or name == "bare loop" else "bare loop (ciphertext)")])
        ns = ms * 1e6 / n
        net = max(ms - (loop if "loop" not in name else 0), 1e-9) * 1e6 / n
        mbs = (bytes_per[s] / (net / 1e9)) / 1e6 if "loop" not in name else None
        rows.append([s, name, n, f"{ns:,.0f}", f"{net:,.0f}" if "loop" not in name else "", f"{mbs:,.1f}" if mbs else ""])
    per = {(r[0], r[1]): float(r[3].replace(",", "")) for r in rows}
    ratios = []
    for s in ("short", "long"):
        ratios.append([s, "phi_encrypt vs pgp_sym_encrypt", f"**{per[(s, 'pgp_sym_encrypt')] / per[(s, 'phi_encrypt')]:,.0f}x** faster", ">= 100x"])
        ratios.append([s, "phi_reveal vs pgp_sym_decrypt", f"**{per[(s, 'pgp_sym_decrypt')] / per[(s, 'phi_reveal')]:,.0f}x** faster", ">= 100x"])
        ratios.append([s, "phi_encrypt vs raw encrypt aes", f"**{per[(s, 'raw encrypt aes')] / per[(s, 'phi_encrypt')]:.2f}x**", ">= 1.0x"])
        ratios.append([s, "phi_reveal vs raw decrypt aes", f"**{per[(s, 'raw decrypt aes')] / per[(s, 'phi_reveal')]:.2f}x**", ">= 1.0x"])
    rep.section("3. Encryption", f"One backend, {rounds} rounds; every round runs all variants in one session, "
                f"in turn (median of rounds). Short values are 'value-N' (about 12 bytes), long ones 4 KB. "
                f"pgp_sym_* run on {pgp_n:,} values (their per-value time is what is compared). "
                "Net = minus the bare loop over the same rows (reading and copying each value); "
                "ratios compare the gross per-value times, loop included.")
    rep.table(["size", "function", "values", "ns/value", "net ns/value", "net MB/s"], rows)
    rep.table(["size", "comparison", "measured", "target"], ratios)


AUDIT_TABLE = """CREATE TABLE bench.{name} (organization_id uuid NOT NULL, id bigint NOT NULL, patient text,
  starts_at timestamptz NOT NULL DEFAULT now(), status text NOT NULL DEFAULT 'requested', note text,
  PRIMARY KEY (organization_id, id));
GRANT SELECT, INSERT, UPDATE, DELETE ON bench.{name} TO app;
"""


def bench_audit(c, rep, cfg, tmp, rounds, secs, clients, bulk_n):
    log("4. audit")
    sql = "".join(AUDIT_TABLE.format(name=n) for n in ("audit_none", "audit_tenancy", "audit_plpgsql", "audit_row"))
    sql += """SELECT count(*) FROM tenancy.protect('bench.audit_none');
SELECT count(*) FROM tenancy.protect('bench.audit_tenancy', audit => true);
SELECT count(*) FROM tenancy.protect('bench.audit_plpgsql');
SELECT count(*) FROM tenancy.protect('bench.audit_row');
CREATE TRIGGER audit_row AFTER INSERT OR UPDATE OR DELETE ON bench.audit_row FOR EACH ROW EXECUTE FUNCTION tenancy.audit_trigger('organization_id');
-- The conventional trigger (supa_audit style): the whole row as jsonb, unencrypted.
CREATE TABLE bench.plpgsql_log (id bigserial PRIMARY KEY, ts timestamptz NOT NULL DEFAULT now(), op text NOT NULL,
  table_name name NOT NULL, record jsonb, old_record jsonb);
CREATE FUNCTION bench.plpgsql_audit() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  INSERT INTO bench.plpgsql_log (op, table_name, record, old_record)
  VALUES (TG_OP, TG_TABLE_NAME, CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
          CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END);
  RETURN NULL;
END $$;
CREATE TRIGGER plpgsql_audit AFTER INSERT OR UPDATE OR DELETE ON bench.audit_plpgsql FOR EACH ROW EXECUTE FUNCTION bench.plpgsql_audit();
CREATE SEQUENCE bench.oltp_id;
GRANT USAGE ON SEQUENCE bench.oltp_id TO app;
"""
    c.psql(sql)
    variants = ("none", "tenancy", "plpgsql")
    pick = PICK.format(**cfg)
    scripts = [write_script(tmp, f"oltp_{v}.sql", pick + "BEGIN;\n" + enter("tenancy")
                            + f"INSERT INTO bench.audit_{v} (organization_id, id, patient, note) VALUES ({ORG}::uuid, nextval('bench.oltp_id'), 'patient ' || :p, 'first visit') RETURNING id \\gset\n"
                            + f"UPDATE bench.audit_{v} SET status = 'confirmed' WHERE id = :id;\nCOMMIT;\n")
               for v in variants]
    res = interleaved(c, scripts, clients, secs, rounds)
    m = {v: res[f"oltp_{v}.sql"] for v in variants}
    # Worst case for the per-tenant chain lock: every client in the same tenant.
    one = [write_script(tmp, f"oltp1_{v}.sql", open(path).read().replace(f"\\set n random(1, {cfg['clinics']})", "\\set n 1"))
           for v, path in zip(variants, scripts)]
    res = interleaved(c, one, clients, secs, rounds)
    m1 = {v: res[f"oltp1_{v}.sql"] for v in variants}
    rep.section("4. Audit", f"OLTP: pgbench, {clients} clients, {rounds} rounds of {secs} s, the three variants "
                "interleaved in one run; each transaction enters a tenant, inserts one row and updates it. "
                "All tables are protected by pg_tenancy (RLS), so only the audit differs.")
    def added(mm):
        # The time pg_tenancy's audit adds over no audit, as a share of what the PL/pgSQL trigger adds.
        return (mm['tenancy'] - mm['none']) / (mm['plpgsql'] - mm['none']) if mm['plpgsql'] > mm['none'] else float('nan')
    rep.table(["", "no audit (ms)", "PL/pgSQL to_jsonb trigger (ms)", "pg_tenancy audit (ms)",
               "TPS vs no audit", "target", "TPS vs PL/pgSQL", "added time / PL/pgSQL's (target <= 0.77)"],
              [["OLTP insert + update, tenant drawn at random", f"{m['none']:.3f}", f"{m['plpgsql']:.3f}", f"{m['tenancy']:.3f}",
                f"**{m['none'] / m['tenancy']:.3f}x**", ">= 0.85x", f"**{m['plpgsql'] / m['tenancy']:.3f}x**", f"**{added(m):.2f}**"],
               ["the same, every client in one tenant", f"{m1['none']:.3f}", f"{m1['plpgsql']:.3f}", f"{m1['tenancy']:.3f}",
                f"**{m1['none'] / m1['tenancy']:.3f}x**", ">= 0.85x", f"**{m1['plpgsql'] / m1['tenancy']:.3f}x**", f"**{added(m1):.2f}**"]])
    rep.text(f"One tenant vs tenant at random (pg_tenancy audit TPS): **{m['tenancy'] / m1['tenancy']:.3f}x** "
             "(target >= 0.95x: no per-tenant serialisation). The audit worker seals committed events every "
             "100 ms on the same 2 cores during these runs.")
    # Durable reveals (II-7): the first reveal of a transaction waits until the reveal worker's
    # REVEAL event is committed durably (the worker commits with synchronous_commit = on).
    log("4. audit, reveals")
    pid = PID.format(**cfg)
    reveal_scripts = []
    for sync in ("off", "on"):
        for v, expr in (("reveal", "tenancy.phi_reveal(first_name, 'patients.first_name')"), ("plain", "first_name")):
            reveal_scripts.append(write_script(
                tmp, f"reveal_{v}_{sync}.sql",
                pick + "BEGIN;\n" + enter("tenancy") + f"SET LOCAL synchronous_commit = {sync};\n"
                + f"SELECT {expr} FROM clinic.patients WHERE id = {pid};\nCOMMIT;\n"))
    res = interleaved(c, reveal_scripts, clients, secs, rounds)
    rows = []
    for sync in ("off", "on"):
        r, p = res[f"reveal_reveal_{sync}.sql"], res[f"reveal_plain_{sync}.sql"]
        rows.append([f"read one patient's name, the session's synchronous_commit = {sync}", f"{p:.3f}", f"{r:.3f}",
                     f"{r - p:.3f}", f"**{p / r:.3f}x**"])
    rep.text("Reveals on record before their plaintext returns (II-7): each transaction enters a tenant and reads "
             "one patient's encrypted first name, either as the envelope or revealed with phi_reveal; the four "
             "scripts interleaved in one run. A revealing transaction waits until the reveal worker's REVEAL "
             "event is committed (the worker always commits with synchronous_commit = on, sharing one flush "
             "among the revealers waiting at that moment); the server's default here is synchronous_commit off.")
    rep.table(["transaction", "reading the envelope (ms)", "revealing it (ms)", "added per revealing transaction (ms)",
               "TPS revealing vs reading"], rows)
    # Bulk: 100k-row INSERT, UPDATE, DELETE per variant, interleaved, VACUUM between rounds.
    log("4. audit, bulk")
    bulk = {(op, v): [] for op in ("INSERT", "UPDATE", "DELETE") for v in ("none", "tenancy", "plpgsql", "row")}
    floor, seal_lag = [], []
    o = org(2)
    # The physical floor of one row per change: the same event rows COPYed into an unindexed
    # copy of tenancy.audit_events (table AM multi-insert, no index, no trigger).
    c.psql("CREATE TABLE bench.audit_floor (LIKE tenancy.audit_events)")
    events_file = "/tmp/pg_tenancy-bench-events.copy"
    for _ in range(rounds):
        c.psql("VACUUM bench.audit_none, bench.audit_tenancy, bench.audit_plpgsql, bench.audit_row, bench.plpgsql_log, tenancy.audit_events")
        stmts = []
        for op in ("INSERT", "UPDATE", "DELETE"):
            for v in ("none", "tenancy", "plpgsql", "row"):
                stmts.append({
                    "INSERT": f"INSERT INTO bench.audit_{v} (organization_id, id, patient, note) SELECT '{o}', 1000000000 + g, 'patient ' || g, 'note ' || g FROM generate_series(1, {bulk_n}) g",
                    "UPDATE": f"UPDATE bench.audit_{v} SET status = 'confirmed' WHERE organization_id = '{o}'",
                    "DELETE": f"DELETE FROM bench.audit_{v} WHERE organization_id = '{o}'",
                }[op])
        t = c.psql(f"BEGIN; SELECT tenancy.set_org('{o}');\n" + ";\n".join(stmts) + ";\nCOMMIT;\n", user="app", timing=True)[2:-1]
        i = 0
        for op in ("INSERT", "UPDATE", "DELETE"):
            for v in ("none", "tenancy", "plpgsql", "row"):
                bulk[(op, v)].append(t[i])
                i += 1
        # How long the worker takes to seal what the round committed.
        start = time.time()
        while int(c.psql("SELECT count(*) FROM tenancy.audit_pending").strip() or 0) > 0 and time.time() - start < 600:
            time.sleep(0.05)
        seal_lag.append((time.time() - start) * 1000)
        # Written by psql (this user), read by the server (COPY FROM a file: the table AM's
        # multi-insert path, as COPY-speed as PostgreSQL gets).
        if os.path.exists(events_file):
            os.remove(events_file)
        c.psql(f"\\copy (SELECT * FROM tenancy.audit_events WHERE table_name = 'bench.audit_tenancy' AND action = 'INSERT' "
               f"ORDER BY event_id DESC LIMIT {bulk_n}) TO '{events_file}'")
        os.chmod(events_file, 0o644)
        c.psql("TRUNCATE bench.audit_floor")
        floor.append(c.psql(f"COPY bench.audit_floor FROM '{events_file}'", timing=True)[0])
    rows = []
    for op in ("INSERT", "UPDATE", "DELETE"):
        b = {v: median(bulk[(op, v)]) for v in ("none", "tenancy", "plpgsql", "row")}
        rows.append([f"{bulk_n:,}-row {op}", f"{b['none']:.0f}", f"{b['plpgsql']:.0f}", f"{b['tenancy']:.0f}",
                     f"{b['row']:.0f}", f"**{b['tenancy'] / b['none']:.2f}x**", "<= 2x",
                     f"**{b['plpgsql'] / b['tenancy']:.2f}x**", f"{b['row'] / b['tenancy']:.2f}x"])
    rep.text(f"Bulk: one transaction per round (committed), the statements of all variants in turn; "
             f"VACUUM between rounds; median of {rounds} rounds (ms).")
    fl = median(floor)
    extra = {op: (median(bulk[(op, 'tenancy')]) - median(bulk[(op, 'none')])) for op in ("INSERT", "UPDATE", "DELETE")}
    rep.text(f"Floor: COPY of {bulk_n:,} of those event rows into an unindexed copy of tenancy.audit_events: "
             f"{fl:.0f} ms (median). Time pg_tenancy adds per audited row / floor per row (target <= 1.5): "
             + ", ".join(f"{op} **{extra[op] / fl:.2f}**" for op in ("INSERT", "UPDATE", "DELETE"))
             + f". Sealing after each round's commit (worker, all three statements' events): median {median(seal_lag):.0f} ms.")
    rep.table(["statement", "no audit", "PL/pgSQL trigger", "pg_tenancy (statement triggers)",
               "pg_tenancy as a row trigger", "pg_tenancy / no audit", "target", "PL/pgSQL / pg_tenancy",
               "row form / statement form"], rows)


def bench_scale(c, rep, cfg, tmp, rounds, secs, clinic_counts, client_counts, rows_n):
    log("5. scale")
    lines = []
    # 1 at 10 .. 10,000 clinics: the same number of rows split over more tenants.
    for k in clinic_counts:
        per = max(rows_n // k, 1)
        for v in ("tenancy", "floor"):
            c.psql(f"""CREATE TABLE bench.scale_{k}_{v} (organization_id uuid NOT NULL, id bigint NOT NULL, payload text, PRIMARY KEY (organization_id, id));
INSERT INTO bench.scale_{k}_{v} SELECT ('00000000-0000-4000-8000-' || lpad((1 + g % {k})::text, 12, '0'))::uuid, g, md5(g::text) FROM generate_series(0, {per * k - 1}) g;
GRANT SELECT ON bench.scale_{k}_{v} TO app;""")
        c.psql(f"SELECT count(*) FROM tenancy.protect('bench.scale_{k}_tenancy'); VACUUM ANALYZE bench.scale_{k}_tenancy, bench.scale_{k}_floor")
        sc = []
        for v in ("tenancy", "floor"):
            sc.append(write_script(tmp, f"scale_{k}_{v}.sql", f"\\set n random(1, {k})\n\\set i random(0, {per - 1})\nBEGIN;\n" + enter(v)
                                   + f"SELECT payload FROM bench.scale_{k}_{v} WHERE id = :i * {k} + :n - 1{where(v)};\nCOMMIT;\n"))
        res = interleaved(c, sc, 2, secs, rounds)
        lines.append([f"{k:,} clinics ({per:,} rows each), 2 clients",
                      f"{res[f'scale_{k}_floor.sql'] / res[f'scale_{k}_tenancy.sql']:.3f}x"])
    # 1 and 8 clients on the point lookup.
    scripts = rls_scripts(tmp, cfg, ("tenancy", "floor"))  # the point lookup only
    for n in client_counts:
        res = interleaved(c, [scripts[("point", v)] for v in ("tenancy", "floor")], n, secs, rounds)
        lines.append([f"point lookup, {cfg['clinics']:,} clinics, {n} client(s)",
                      f"{res['point_floor.sql'] / res['point_tenancy.sql']:.3f}x"])
    # Encryption across tenants: set_org + 10 phi_encrypt per transaction, 10 vs 10,000 tenants.
    enc = []
    for k in clinic_counts:
        enc.append(write_script(tmp, f"enc_{k}.sql", f"\\set n random(1, {k})\nBEGIN;\nSELECT tenancy.set_org({ORG}::uuid);\n"
                                "SELECT count(tenancy.phi_encrypt('value-' || g, 'bench')) FROM generate_series(1, 10) g;\nCOMMIT;\n"))
    res = interleaved(c, enc, 2, secs, rounds)
    base = res[f"enc_{clinic_counts[0]}.sql"]
    for k in clinic_counts:
        lines.append([f"set_org + 10 x phi_encrypt, tenant drawn from {k:,}",
                      f"{base / res[f'enc_{k}.sql']:.3f}x of the {clinic_counts[0]}-tenant rate"])
    rep.section("5. Scale", f"pgbench, {rounds} rounds of {secs} s. RLS: TPS ratio pg_tenancy / floor (point lookup) as tenants and clients grow. "
                "Flat is the goal.")
    rep.table(["case", "ratio"], lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke size (about 5 minutes)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    ap.add_argument("--port", type=int, default=54339)
    ap.add_argument("--dir", default="/tmp/pg_tenancy-bench")
    ap.add_argument("--only", default="rls,context,crypto,audit,scale",
                    help="comma-separated sections to run (default: all)")
    a = ap.parse_args()
    if a.quick:
        cfg = dict(clinics=50, patients_per=400, bookings_per=800)
        rounds, secs, short_n, long_n, pgp_n, bulk_n = 3, 3, 100_000, 2_000, 2_000, 20_000
        clinic_counts, rows_n = (10, 1000), 100_000
    else:
        cfg = dict(clinics=1000, patients_per=1000, bookings_per=2000)
        rounds, secs, short_n, long_n, pgp_n, bulk_n = 3, 10, 1_000_000, 10_000, 10_000, 100_000
        clinic_counts, rows_n = (10, 10_000), 1_000_000
    started = time.time()
    c = Cluster(a.port, a.dir)
    c.start()
    tmp = tempfile.mkdtemp(prefix="pg_tenancy-bench-")
    rep = Report()
    try:
        load(c, **cfg)
        only = a.only.split(",")
        if "rls" in only:
            bench_rls(c, rep, cfg, tmp, rounds, secs, 4)
        if "context" in only:
            bench_set_org(c, rep, cfg, tmp, rounds, secs, 4)
        if "crypto" in only:
            bench_crypto(c, rep, cfg, rounds, short_n, long_n, pgp_n)
        if "audit" in only:
            bench_audit(c, rep, cfg, tmp, rounds, secs, 4, bulk_n)
        if "scale" in only:
            bench_scale(c, rep, cfg, tmp, rounds, secs, clinic_counts, (1, 8), rows_n)
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    head = [
        "# pg_tenancy benchmark results",
        "",
        f"Command: `scripts/bench.sh{' --quick' if a.quick else ''}` "
        f"({cfg['clinics']:,} clinics, {cfg['clinics'] * cfg['patients_per']:,} patients, "
        f"{cfg['clinics'] * cfg['bookings_per']:,} bookings); took {(time.time() - started) / 60:.1f} min.",
        f"Machine: {os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB, "
        f"{platform.system()} {platform.release()}. PostgreSQL: "
        + subprocess.run([f"{BIN}/postgres", "--version"], capture_output=True).stdout.decode().strip()
        + "; pg_tenancy release build; pgbench "
        + subprocess.run(["pgbench", "--version"], capture_output=True).stdout.decode().split()[-1]
        + f". Server settings: shared_buffers 8GB (the whole data set stays cached), synchronous_commit off (so commit flushes do not hide CPU cost), "
        f"run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Ratios are what to read: absolute times on a shared 2-core machine move from run to run. "
        "A TPS ratio above 1 means pg_tenancy is faster than the compared variant.",
    ]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(head + rep.lines) + "\n")
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
