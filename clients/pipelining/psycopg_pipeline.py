"""psycopg 3: the tenant entry in the same round trip as the query (pipeline mode).

    python3 psycopg_pipeline.py "host=127.0.0.1 port=5432 user=app dbname=app"

In a pipeline psycopg sends BEGIN, set_org, the query and COMMIT without waiting for each
answer. If set_org fails, PostgreSQL aborts the transaction and skips the rest of the
pipeline: the query never runs, psycopg raises, and nothing is committed.
"""
import sys

import psycopg

SHERWOOD = "5e000000-0000-4000-8000-000000000001"


def notes(conn, org):
    with conn.transaction():  # BEGIN ... COMMIT, sent in the same pipeline
        with conn.pipeline():
            conn.execute("SELECT tenancy.set_org(%s)", [org])  # a bind parameter: never in pg_stat_activity
            cur = conn.execute("SELECT body FROM public.notes ORDER BY id")
        return [r[0] for r in cur.fetchall()]


with psycopg.connect(sys.argv[1]) as conn:
    print("psycopg pipeline:", notes(conn, SHERWOOD))
    try:
        notes(conn, "not-a-tenant")
        print("psycopg pipeline: BAD, the query ran after a failed set_org")
        sys.exit(1)
    except psycopg.Error as e:
        print("psycopg pipeline: failed set_org failed the transaction:", e.sqlstate, str(e).splitlines()[0])
