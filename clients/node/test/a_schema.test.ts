// A Drizzle schema with phi() columns through drizzle-kit generate and push, on a schema
// pg_tenancy protects: generate writes bytea columns, RLS and protect()'s policies; push
// creates the tables; after tenancy.protect_all() a second push finds nothing to change
// (without the declarations it would DROP protect()'s index, and want RLS and the policies
// gone, which the guards refuse).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { drizzleKit, pool } from "./env.js";

test("drizzle-kit generate writes bytea PHI columns, RLS and protect()'s policies", () => {
  const out = mkdtempSync(join(tmpdir(), "pg-tenancy-drizzle-"));
  const r = drizzleKit(["generate"], "owner", { DRIZZLE_OUT: out });
  assert.equal(r.status, 0, r.out);
  const files = readdirSync(out).filter((f) => f.endsWith(".sql"));
  assert.equal(files.length, 1, r.out);
  const ddl = readFileSync(join(out, files[0]), "utf8");
  assert.match(ddl, /"last_name" "bytea"/);
  assert.match(ddl, /"organization_id" uuid DEFAULT tenancy\.require_org\(\) NOT NULL/);
  assert.match(ddl, /ALTER TABLE "clinic"\."patients" ENABLE ROW LEVEL SECURITY/);
  assert.match(
    ddl,
    /CREATE POLICY "tenancy_tenant_floor" ON "clinic"\."patients" AS RESTRICTIVE FOR ALL TO public USING \(\(organization_id = \( SELECT tenancy\.current_org_id\(\) AS current_org_id\)\)\)/,
  );
  assert.match(ddl, /CREATE INDEX "patients_organization_id_idx" ON "clinic"\."patients"/);
});

test("drizzle-kit push creates the schema, and after protect_all() finds nothing to change", async () => {
  const first = drizzleKit(["push", "--force", "--verbose"]);
  assert.equal(first.status, 0, first.out);
  assert.match(first.out, /CREATE TABLE "clinic"\."patients"/, first.out);
  const su = pool("postgres");
  try {
    await su.query("SELECT tenancy.protect_all('clinic', audit => true)");
    await su.query("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA clinic TO app");
    const second = drizzleKit(["push", "--force", "--verbose"]);
    assert.equal(second.status, 0, second.out);
    assert.match(second.out, /No changes detected/, second.out);
    assert.doesNotMatch(second.out, /DISABLE ROW LEVEL SECURITY|DROP POLICY|DROP INDEX/, second.out);
    const findings = await su.query(
      "SELECT severity, object, finding FROM tenancy.isolation_report() WHERE object LIKE 'clinic.%' AND severity IN ('critical', 'high')",
    );
    assert.deepEqual(findings.rows, []);
  } finally {
    await su.end();
  }
});
