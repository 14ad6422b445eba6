#!/usr/bin/env python3
"""Create and edit pg_tenancy PHI key ring files (format: docs/phi.md).

  phi_keyring.py new FILE [--owner USER]        a ring with key 1, active
  phi_keyring.py add FILE [--activate]          a new random key with the next id
  phi_keyring.py activate FILE ID               make key ID the active one
  phi_keyring.py retire FILE ID                 remove key ID (never the active one); first
                                                re-encrypt what it protects (docs/operations.md)

Keys come from the OS CSPRNG. The file is written atomically with mode 0600 (and, with
--owner, handed to the server's OS user). Reload the server after a change.
"""
import argparse, hashlib, hmac, os, pwd, secrets, sys, tempfile


def check_value(key: bytes) -> str:
    return hmac.new(key, b"pg_tenancy key check v1", hashlib.sha256).digest()[:8].hex()


def read(path):
    keys, active = [], None
    with open(path) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            keys.append((int(fields[0]), fields[1], fields[2]))
            if len(fields) == 4 and fields[3] == "active":
                active = int(fields[0])
    return keys, active


def write(path, keys, active, owner=None):
    st = os.stat(path) if os.path.exists(path) else None
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".keyring-")
    with os.fdopen(fd, "w") as f:
        f.write("# pg_tenancy PHI key ring: <id> <key hex> <check hex> [active]\n")
        for kid, key, kcv in keys:
            f.write(f"{kid} {key} {kcv}{' active' if kid == active else ''}\n")
    os.chmod(tmp, 0o600)
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    elif st is not None:
        os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, path)


def new_key(kid):
    key = secrets.token_bytes(32)
    return (kid, key.hex(), check_value(key))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("new"); n.add_argument("file"); n.add_argument("--owner")
    a = sub.add_parser("add"); a.add_argument("file"); a.add_argument("--activate", action="store_true")
    s = sub.add_parser("activate"); s.add_argument("file"); s.add_argument("id", type=int)
    r = sub.add_parser("retire"); r.add_argument("file"); r.add_argument("id", type=int)
    args = ap.parse_args()
    if args.cmd == "new":
        if os.path.exists(args.file):
            sys.exit(f"{args.file} exists; use 'add'")
        write(args.file, [new_key(1)], 1, args.owner)
        print(f"wrote {args.file}: key 1 (active)")
    elif args.cmd == "add":
        keys, active = read(args.file)
        kid = max(k[0] for k in keys) + 1
        keys.append(new_key(kid))
        write(args.file, keys, kid if args.activate else active)
        print(f"added key {kid}{' (active)' if args.activate else ''} to {args.file}")
    elif args.cmd == "retire":
        keys, active = read(args.file)
        if args.id not in [k[0] for k in keys]:
            sys.exit(f"no key {args.id} in {args.file}")
        if args.id == active:
            sys.exit(f"key {args.id} is the active key; activate another first")
        write(args.file, [k for k in keys if k[0] != args.id], active)
        print(f"removed key {args.id} from {args.file}")
    else:
        keys, _ = read(args.file)
        if args.id not in [k[0] for k in keys]:
            sys.exit(f"no key {args.id} in {args.file}")
        write(args.file, keys, args.id)
        print(f"key {args.id} is now active in {args.file}")


if __name__ == "__main__":
    main()
