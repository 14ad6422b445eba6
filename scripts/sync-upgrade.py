#!/usr/bin/env python3
"""Keep the function bodies of an upgrade script equal to the sources in sql/*.sql.

Every `CREATE OR REPLACE FUNCTION|PROCEDURE tenancy.<name>(` block of the upgrade script
(body in `$$ ... $$`) is replaced by the definition of the same name in sql/*.sql (its
`CREATE FUNCTION` turned into `CREATE OR REPLACE FUNCTION`). The rest of the script (comments,
ALTERs, new objects) is kept as written. The test `upgrade::` compares an updated database
with a fresh install object by object, so drift is caught either way; this makes the copy
produced, not kept by hand.

    python3 scripts/sync-upgrade.py sql/pg_tenancy--0.2.0--0.2.1.sql          # rewrite
    python3 scripts/sync-upgrade.py --check sql/pg_tenancy--0.2.0--0.2.1.sql  # exit 1 if stale
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ["bootstrap.sql", "registry.sql", "guards.sql", "report.sql", "phi.sql", "audit.sql", "finalize.sql"]
HEAD = re.compile(r"^CREATE (?:OR REPLACE )?(FUNCTION|PROCEDURE) (tenancy\.[a-z_0-9]+)\(")


def blocks(lines):
    """(kind, name, start, end) of every definition; end is exclusive. A definition ends at the
    first `;` that ends a line outside its `$$ ... $$` body (C functions have no body)."""
    out, i = [], 0
    while i < len(lines):
        m = HEAD.match(lines[i])
        if not m:
            i += 1
            continue
        quotes, j = 0, i
        while j < len(lines):
            quotes += lines[j].count("$$")
            if quotes % 2 == 0 and lines[j].rstrip().endswith(";"):
                break
            j += 1
        out.append((m.group(1), m.group(2), i, j + 1))
        i = j + 1
    return out


def main():
    args = sys.argv[1:]
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    if len(args) != 1:
        sys.exit(__doc__)
    target = pathlib.Path(args[0])
    source = {}
    for name in SOURCES:
        path = ROOT / "sql" / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines(keepends=True)
        for kind, fn, a, b in blocks(lines):
            text = "".join(lines[a:b])
            source[fn] = re.sub(r"^CREATE (FUNCTION|PROCEDURE)", r"CREATE OR REPLACE \1", text, count=1)
    lines = target.read_text().splitlines(keepends=True)
    out, pos, stale = [], 0, []
    for kind, fn, a, b in blocks(lines):
        if not lines[a].startswith("CREATE OR REPLACE"):
            continue
        if fn not in source:
            sys.exit(f"{target}: {fn} has no definition in sql/*.sql")
        old = "".join(lines[a:b])
        out.append("".join(lines[pos:a]))
        out.append(source[fn])
        if old != source[fn]:
            stale.append(fn)
        pos = b
    out.append("".join(lines[pos:]))
    if check:
        if stale:
            sys.exit(f"{target} is stale for: {', '.join(stale)} (run scripts/sync-upgrade.py {target})")
        return
    target.write_text("".join(out))
    print(f"{target}: {len(stale)} definition(s) updated{': ' + ', '.join(stale) if stale else ''}")


if __name__ == "__main__":
    main()
