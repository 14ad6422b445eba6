// The servers the tests run against, from the environment pg_test/client/node_client.rs sets:
// PostgreSQL with pg_tenancy in signed mode, and PgBouncer in transaction mode in front of it.
import pg from "pg";
import { spawnSync } from "node:child_process";

export const SHERWOOD = "5e000000-0000-4000-8000-000000000001";
export const CONWAY = "c0000000-0000-4000-8000-000000000002";

function need(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run these tests through the README's test command`);
  return v;
}

export const host = process.env.PGHOST ?? "127.0.0.1";
export const port = Number(need("PGPORT"));
export const bouncerPort = Number(need("PGBOUNCER_PORT"));
export const key = need("PG_TENANCY_CONTEXT_KEY");

export function url(user: string, p = port): string {
  return `postgres://${user}@${host}:${p}/app`;
}

export function pool(user: string, p = port, max = 4): pg.Pool {
  return new pg.Pool({ connectionString: url(user, p), max });
}

/** drizzle-kit with this package's config (drizzle.config.ts, test/schema.ts). */
export function drizzleKit(args: string[], user = "owner", extraEnv: Record<string, string> = {}) {
  const r = spawnSync("npx", ["drizzle-kit", ...args], {
    cwd: new URL("../..", import.meta.url).pathname,
    env: { ...process.env, DATABASE_URL: url(user), ...extraEnv },
    encoding: "utf8",
    timeout: 120_000,
  });
  return { status: r.status, out: `${r.stdout}\n${r.stderr}` };
}
