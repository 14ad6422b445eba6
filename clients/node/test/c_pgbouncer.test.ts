// Through PgBouncer in transaction mode, one server connection for all clients: withTenant's
// context lives one transaction, so tenants interleaved on that connection never see each
// other's rows, and a statement outside withTenant sees none.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { drizzle } from "drizzle-orm/node-postgres";
import { withTenant, NoTenantError, tenancyError } from "pg-tenancy";
import { reveal } from "pg-tenancy/drizzle";
import { patients } from "./schema.js";
import { CONWAY, SHERWOOD, bouncerPort, key, pool } from "./env.js";

const bounced = pool("app", bouncerPort, 8);
const db = drizzle(bounced);
after(() => bounced.end());

test("tenants interleaved on one pooled server connection see only their own rows", async () => {
  await withTenant(db, CONWAY, (tx) => tx.insert(patients).values({ lastName: "Miller", phone: null }), { key });
  const rounds = await Promise.all(
    Array.from({ length: 40 }, (_, i) => {
      const org = i % 2 === 0 ? SHERWOOD : CONWAY;
      return withTenant(db, org, async (tx) => {
        const rows = await tx
          .select({ org: patients.organizationId, lastName: reveal(patients.lastName, "patients.last_name") })
          .from(patients);
        return { org, rows };
      }, { key, actor: `user-${i}` });
    }),
  );
  for (const { org, rows } of rounds) {
    assert.ok(rows.length > 0, org);
    assert.ok(rows.every((r) => r.org === org), JSON.stringify(rows));
    assert.ok(rows.every((r) => (org === CONWAY ? r.lastName === "Miller" : r.lastName !== "Miller")));
  }
  // Between transactions the pooled connection holds no tenant.
  const outside = await db.select({ id: patients.id }).from(patients);
  assert.deepEqual(outside, []);
  const err = await db.execute("SELECT tenancy.require_org()" as never).catch((e: unknown) => e);
  assert.ok(tenancyError(err) instanceof NoTenantError, String(err));
});
