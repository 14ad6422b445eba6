// Runs against a real server started by pg_test/client/node.rs (PGHOST, PGPORT, PGUSER,
// PGDATABASE and PG_TENANCY_CONTEXT_KEY in the environment), as the ordinary role `app`.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import pg from "pg";
import { ClinicService, mintToken } from "./service.js";

const SHERWOOD = "5e000000-0000-4000-8000-000000000001";
const CONWAY = "c0000000-0000-4000-8000-000000000002";
const key = Buffer.from(process.env.PG_TENANCY_CONTEXT_KEY ?? "", "hex");
const pool = new pg.Pool({ max: 4 });
const service = new ClinicService(pool, key);
const sherwood = { org: SHERWOOD, actor: "dr-hood" };
const conway = { org: CONWAY, actor: "dr-conway" };

after(() => pool.end());

function sqlstate(err: unknown): string | undefined {
  return (err as { code?: string }).code;
}

test("a clinic reads back the PHI it wrote, through bind parameters", async () => {
  const id = await service.addPatient(sherwood, { firstName: "Marian", lastName: "Fitzwalter", phone: "555-0199" });
  const patients = await service.listPatients(sherwood);
  const marian = patients.find((p) => p.id === id);
  assert.deepEqual(marian, { id, firstName: "Marian", lastName: "Fitzwalter", phone: "555-0199" });
});

test("another clinic sees none of it", async () => {
  await service.addPatient(sherwood, { firstName: "Will", lastName: "Scarlet", phone: null });
  const seen = await service.listPatients(conway);
  assert.equal(seen.filter((p) => p.lastName === "Scarlet" || p.lastName === "Fitzwalter").length, 0);
});

test("a query outside a tenant transaction sees no rows", async () => {
  const r = await pool.query("SELECT count(*)::int AS n FROM clinic.patients");
  assert.equal(r.rows[0].n, 0);
});

test("a token minted for another clinic is refused", async () => {
  const db = await pool.connect();
  try {
    await db.query("BEGIN");
    await assert.rejects(
      db.query("SELECT tenancy.set_org($1::uuid, $2, $3)", [SHERWOOD, "dr-conway", mintToken(key, CONWAY, "dr-conway")]),
      (err) => sqlstate(err) === "28000",
    );
  } finally {
    await db.query("ROLLBACK");
    db.release();
  }
});

test("an error half way rolls the whole request back", async () => {
  await assert.rejects(
    service.withTenant(sherwood, async (db) => {
      await db.query(
        "INSERT INTO clinic.patients (first_name, last_name) VALUES (tenancy.phi_encrypt($1, 'patients.first_name'), tenancy.phi_encrypt($2, 'patients.last_name'))",
        ["Much", "Miller"],
      );
      await db.query("SELECT 1/0");
    }),
    (err) => sqlstate(err) === "22012",
  );
  const patients = await service.listPatients(sherwood);
  assert.equal(patients.filter((p) => p.firstName === "Much").length, 0);
});

test("the clinic's audit trail names the verified actor", async () => {
  const trail = await service.auditTrail(sherwood);
  const inserts = trail.filter((e) => e.action === "INSERT" && e.table_name === "clinic.patients");
  assert.ok(inserts.length >= 2, JSON.stringify(trail));
  for (const e of inserts) {
    assert.equal(e.actor, "dr-hood");
    assert.equal(e.actor_verified, true);
  }
});
