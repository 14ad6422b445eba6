// A small clinic service as an application team would write it with `pg` (the driver
// Drizzle sits on) and pg_tenancy: every request is one transaction that enters its tenant
// with a signed context token, PHI goes in and out only through bind parameters, and
// nothing in the SQL names a tenant: row level security does that.
import { createHmac, randomBytes } from "node:crypto";
import pg from "pg";

/**
 * Mints a pg_tenancy context token (docs/context.md): HMAC-SHA256 over org, actor, expiry and
 * a random nonce. Tokens are single-use: mint one per transaction.
 */
export function mintToken(key: Buffer, org: string, actor: string | null, ttlSeconds = 60): string {
  const expiry = Math.floor(Date.now() / 1000) + ttlSeconds;
  const nonce = randomBytes(16).toString("base64url");
  const message = `pg_tenancy.context.v2\n${org}\n${actor ?? ""}\n${expiry}\n${nonce}`;
  const mac = createHmac("sha256", key).update(message).digest("base64url");
  return `v2.${expiry}.${nonce}.${mac}`;
}

export interface Patient {
  id: string;
  firstName: string;
  lastName: string;
  phone: string | null;
}

/** A request's identity, as the web tier has authenticated it. */
export interface RequestContext {
  org: string;
  actor: string;
}

export class ClinicService {
  constructor(
    private readonly pool: pg.Pool,
    private readonly contextKey: Buffer,
  ) {}

  /** Runs `work` in one transaction entered into the request's tenant. */
  async withTenant<T>(ctx: RequestContext, work: (db: pg.PoolClient) => Promise<T>): Promise<T> {
    const db = await this.pool.connect();
    try {
      await db.query("BEGIN");
      await db.query("SELECT tenancy.set_org($1::uuid, $2, $3)", [
        ctx.org,
        ctx.actor,
        mintToken(this.contextKey, ctx.org, ctx.actor),
      ]);
      const result = await work(db);
      await db.query("COMMIT");
      return result;
    } catch (err) {
      await db.query("ROLLBACK");
      throw err;
    } finally {
      db.release();
    }
  }

  /** Registers a patient; names and phone are encrypted by the database for this clinic. */
  addPatient(ctx: RequestContext, p: Omit<Patient, "id">): Promise<string> {
    return this.withTenant(ctx, async (db) => {
      const r = await db.query<{ id: string }>(
        `INSERT INTO clinic.patients (first_name, last_name, phone)
         VALUES (tenancy.phi_encrypt($1, 'patients.first_name'),
                 tenancy.phi_encrypt($2, 'patients.last_name'),
                 tenancy.phi_encrypt($3, 'patients.phone'))
         RETURNING id`,
        [p.firstName, p.lastName, p.phone],
      );
      return r.rows[0].id;
    });
  }

  /** The clinic's patients, PHI revealed (each reveal is audited by the extension). */
  listPatients(ctx: RequestContext): Promise<Patient[]> {
    return this.withTenant(ctx, async (db) => {
      const r = await db.query<Patient>(
        `SELECT id,
                tenancy.phi_reveal(first_name, 'patients.first_name') AS "firstName",
                tenancy.phi_reveal(last_name, 'patients.last_name') AS "lastName",
                tenancy.phi_reveal(phone, 'patients.phone') AS phone
           FROM clinic.patients ORDER BY 2, 3`,
      );
      return r.rows;
    });
  }

  /** The clinic's own audit trail (decrypted for this clinic only). */
  auditTrail(ctx: RequestContext): Promise<{ action: string; actor: string; actor_verified: boolean; table_name: string }[]> {
    return this.withTenant(ctx, async (db) => {
      const r = await db.query(
        "SELECT action, actor, actor_verified, table_name FROM tenancy.my_audit_events ORDER BY seq",
      );
      return r.rows;
    });
  }
}
