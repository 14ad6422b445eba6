// One transaction per unit of work, entered into its tenant first: what every request of a
// multi-tenant application does. Works with a pg Pool, a pg Client, or a Drizzle database
// (node-postgres driver); with a pooler in transaction mode (PgBouncer) too, since the
// context lives exactly one transaction.
import { mintContextToken, type ContextKey } from "./token.js";
import { toTenancyError } from "./errors.js";

/** What withTenant needs to know besides the tenant. */
export interface TenantOptions {
  /** The application user acting (recorded in the audit trail). */
  actor?: string | null;
  /** A context token minted elsewhere (signed mode)... */
  token?: string | null;
  /** ...or the context key, to mint one here for this transaction (signed mode). */
  key?: ContextKey;
  /** How the server stores tenant ids (see mintContextToken). */
  format?: "auto" | "uuid" | "text";
}

/** A pg Pool or Client: anything with query(); a Pool is asked for a client of its own. */
interface PgQueryable {
  query(text: string, values?: unknown[]): Promise<unknown>;
}
interface PgPoolLike extends PgQueryable {
  connect(): Promise<PgQueryable & { release(err?: Error | boolean): void }>;
  totalCount?: number;
}
/** A Drizzle database or transaction (drizzle-orm/node-postgres). */
interface DrizzleLike {
  transaction<T>(fn: (tx: DrizzleLike & { execute(q: unknown): Promise<unknown> }) => Promise<T>): Promise<T>;
  execute(q: unknown): Promise<unknown>;
  _?: unknown;
}

function isDrizzle(db: unknown): db is DrizzleLike {
  return typeof db === "object" && db !== null && "transaction" in db && "execute" in db && "_" in db;
}
function isPool(db: unknown): db is PgPoolLike {
  return typeof db === "object" && db !== null && "connect" in db && "totalCount" in db;
}

function tokenFor(org: string, options: TenantOptions): string | null {
  if (options.token) return options.token;
  if (options.key) return mintContextToken(options.key, org, options.actor ?? null, { format: options.format });
  return null;
}

// set_org's text form takes uuid and text ids alike (the server decides by its format).
const SET_ORG = "SELECT tenancy.set_org($1::text, $2::text, $3::text)";

/**
 * Runs `fn` in one transaction entered into tenant `org`, and commits it (rolls back if
 * `fn` throws). `db` is a pg Pool, a pg Client (not in a transaction) or a Drizzle database;
 * `fn` gets the pg client or the Drizzle transaction. Server errors come out as typed
 * TenancyErrors (errors.ts), without the query's parameters.
 */
export async function withTenant<T, D>(
  db: D,
  org: string,
  fn: (tx: D extends DrizzleLike ? Parameters<Parameters<D["transaction"]>[0]>[0] : PgQueryable) => Promise<T>,
  options: TenantOptions = {},
): Promise<T> {
  const token = tokenFor(org, options);
  const params = [org, options.actor ?? null, token];
  try {
    if (isDrizzle(db)) {
      const { sql } = await import("drizzle-orm");
      return await db.transaction(async (tx) => {
        await tx.execute(sql`SELECT tenancy.set_org(${params[0]}::text, ${params[1]}::text, ${params[2]}::text)`);
        return fn(tx as never);
      });
    }
    const pool = isPool(db) ? db : undefined;
    const client = pool ? await pool.connect() : (db as unknown as PgQueryable);
    let failed: Error | undefined;
    try {
      await client.query("BEGIN");
      await client.query(SET_ORG, params);
      const result = await fn(client as never);
      await client.query("COMMIT");
      return result;
    } catch (err) {
      failed = err as Error;
      await client.query("ROLLBACK").catch(() => undefined);
      throw err;
    } finally {
      if (pool) (client as PgQueryable & { release(e?: Error | boolean): void }).release(failed && !(failed as { code?: string }).code ? failed : undefined);
    }
  } catch (err) {
    throw toTenancyError(err);
  }
}
