// withTenant, signed tokens, PHI columns and typed errors, against the real server (signed
// mode: set_org accepts a tenant only with a token minted from the same key).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { drizzle } from "drizzle-orm/node-postgres";
import { eq, sql } from "drizzle-orm";
import {
  withTenant,
  mintContextToken,
  tenancyError,
  AuthenticationError,
  NoTenantError,
  AccessDeniedError,
  TenancyError,
} from "pg-tenancy";
import { reveal } from "pg-tenancy/drizzle";
import { patients } from "./schema.js";
import { CONWAY, SHERWOOD, key, pool } from "./env.js";

const app = pool("app");
const db = drizzle(app);
after(() => app.end());

test("a token minted here is the server's, byte for byte: set_org accepts it once", async () => {
  const token = mintContextToken(key, SHERWOOD, "user-7");
  const org = await withTenant(app, SHERWOOD, async (c) => {
    const r = (await c.query("SELECT tenancy.current_org_id()::text AS org, tenancy.current_actor() AS actor")) as {
      rows: { org: string; actor: string }[];
    };
    return r.rows[0];
  }, { actor: "user-7", token });
  assert.deepEqual(org, { org: SHERWOOD, actor: "user-7" });
  // Single-use: the same token again is refused, as a typed error.
  await assert.rejects(withTenant(app, SHERWOOD, async () => 1, { actor: "user-7", token }), AuthenticationError);
  // A token for another actor, or a tampered one, too.
  const other = mintContextToken(key, SHERWOOD, "user-8");
  await assert.rejects(withTenant(app, SHERWOOD, async () => 1, { actor: "user-7", token: other }), AuthenticationError);
  // An upper-case UUID is the same tenant (the token signs the canonical form).
  const upper = await withTenant(app, SHERWOOD.toUpperCase(), async (c) => {
    const r = (await c.query("SELECT tenancy.current_org_id()::text AS org")) as { rows: { org: string }[] };
    return r.rows[0].org;
  }, { key });
  assert.equal(upper, SHERWOOD);
});

test("phi() encrypts every write in the database; reveal() reads it back for its tenant only", async () => {
  const id = await withTenant(db, SHERWOOD, async (tx) => {
    const [row] = await tx.insert(patients).values({ lastName: "Fitzwalter", phone: "555-0199" }).returning({ id: patients.id });
    return row.id;
  }, { key, actor: "user-7" });
  const seen = await withTenant(db, SHERWOOD, async (tx) => {
    const [row] = await tx
      .select({ raw: patients.lastName, lastName: reveal(patients.lastName, "patients.last_name"), phone: reveal(patients.phone, "patients.phone") })
      .from(patients)
      .where(eq(patients.id, id));
    return row;
  }, { key, actor: "user-7" });
  assert.equal(seen.lastName, "Fitzwalter");
  assert.equal(seen.phone, "555-0199");
  // Stored as an envelope: bytes that do not contain the plaintext.
  const raw = seen.raw as unknown as Buffer;
  assert.ok(Buffer.isBuffer(raw), typeof raw);
  assert.ok(!raw.includes(Buffer.from("Fitzwalter")));
  // Updates are encrypted too.
  await withTenant(db, SHERWOOD, (tx) => tx.update(patients).set({ phone: "555-0100" }).where(eq(patients.id, id)), { key });
  const phone = await withTenant(db, SHERWOOD, async (tx) => {
    const [row] = await tx.select({ phone: reveal(patients.phone, "patients.phone") }).from(patients).where(eq(patients.id, id));
    return row.phone;
  }, { key });
  assert.equal(phone, "555-0100");
  // Another clinic sees no such row, and cannot reveal the envelope either.
  const theirs = await withTenant(db, CONWAY, (tx) => tx.select({ id: patients.id }).from(patients), { key });
  assert.deepEqual(theirs, []);
  await assert.rejects(
    withTenant(db, CONWAY, (tx) => tx.execute(sql`SELECT tenancy.phi_reveal(${raw}::bytea, 'patients.last_name')`), { key }),
    AuthenticationError,
  );
});

test("errors are typed from SQLSTATE under Drizzle's wrapper, and never carry bind parameters", async () => {
  const secret = "Marian of Leaford, 555-0142";
  let caught: unknown;
  try {
    await db.execute(sql`SELECT tenancy.phi_encrypt(${secret}::text, 'patients.phone')`);
  } catch (err) {
    caught = err;
  }
  assert.ok(caught, "no context: refused");
  // Drizzle's own error prints the parameters: the reason for tenancyError().
  assert.ok(String((caught as Error).message).includes(secret), "Drizzle's message shows the parameter");
  const typed = tenancyError(caught);
  assert.ok(typed instanceof NoTenantError, String(typed));
  assert.ok(typed instanceof AccessDeniedError && typed instanceof TenancyError);
  assert.equal(typed.code, "42501");
  const shown = `${typed.message} ${JSON.stringify(typed)} ${typed.stack ?? ""}`;
  assert.ok(!shown.includes(secret), shown);
  // withTenant throws typed errors itself (its own parameters include the token).
  const token = mintContextToken(key, SHERWOOD, null);
  await withTenant(app, SHERWOOD, async () => 1, { token });
  const again = await withTenant(app, SHERWOOD, async () => 1, { token }).catch((e: unknown) => e);
  assert.ok(again instanceof AuthenticationError, String(again));
  assert.ok(!`${(again as Error).message} ${JSON.stringify(again)}`.includes(token));
  // Not a server error: passed through untouched.
  assert.equal(tenancyError(new Error("x")), undefined);
});
