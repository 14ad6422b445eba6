// Drizzle ORM (drizzle-orm/pg-core) declarations for pg_tenancy's objects, so that the
// schema a team writes in TypeScript says what tenancy.protect() made, and drizzle-kit
// generate and push leave it alone (push otherwise wants to DISABLE ROW LEVEL SECURITY and
// DROP POLICY, which pg_tenancy's guards refuse):
//
//   export const patients = pgTable("patients", {
//     organizationId: tenantId("organization_id"),
//     id: uuid("id").primaryKey().defaultRandom(),
//     lastName: phi("last_name", "patients.last_name"),
//   }, (t) => tenancyProtection(t.organizationId)).enableRLS();
import { getTableName, sql, type SQL, type SQLWrapper } from "drizzle-orm";
import { customType, index, pgPolicy, uuid, text, type AnyPgColumn } from "drizzle-orm/pg-core";

/**
 * A PHI column: `bytea` in the database, a string in TypeScript. Every value written is
 * encrypted by the database for the current tenant (`tenancy.phi_encrypt(value, label)` in
 * the INSERT or UPDATE itself: the plaintext travels as a bind parameter only). Selected as
 * is, it is the envelope (a Buffer); select `reveal(column, label)` for the plaintext.
 */
export const phi = (name: string, label: string) =>
  customType<{ data: string; driverData: Buffer | SQL }>({
    dataType() {
      return "bytea";
    },
    toDriver(value: string): SQL {
      return sql`tenancy.phi_encrypt(${value}::text, ${label}::text)`;
    },
  })(name);

/** The plaintext of a PHI column in a select (each reveal is recorded in the audit trail). */
export function reveal(column: SQLWrapper, label: string): SQL<string | null> {
  return sql<string | null>`tenancy.phi_reveal(${column}, ${label}::text)`;
}

/** The tenant column of a protected table, with the default protect() gives it. */
export function tenantId(name = "organization_id", type: "uuid" | "text" = "uuid") {
  return type === "uuid"
    ? uuid(name).notNull().default(sql`tenancy.require_org()`)
    : text(name).notNull().default(sql`tenancy.require_org_text()`);
}

/**
 * The two policies tenancy.protect() creates on a table (a RESTRICTIVE floor and the
 * permissive rows policy, for all commands, to PUBLIC), for the third argument of pgTable:
 * declared, drizzle-kit finds nothing to change. `citus`: the form protect() writes where
 * Citus is installed (no subquery).
 */
export function tenantPolicies(column: AnyPgColumn, options: { citus?: boolean } = {}) {
  // columnType, not getSQLType(): in pgTable's third argument a column's getSQLType() calls
  // itself forever (drizzle-orm 0.45's ExtraConfigColumn).
  const fn = column.columnType === "PgUUID" ? "current_org_id" : "current_org_id_text";
  // Quoted only where PostgreSQL would print it quoted (a lower-case identifier is bare).
  const name = /^[a-z_][a-z0-9_]*$/.test(column.name) ? column.name : `"${column.name.replace(/"/g, '""')}"`;
  // As pg_get_expr prints protect()'s predicate (drizzle-kit compares the text); a new SQL
  // object for every place (drizzle-kit's serializer must not meet one object twice).
  const predicate = () =>
    options.citus
      ? sql.raw(`(${name} = tenancy.${fn}())`)
      : sql.raw(`(${name} = ( SELECT tenancy.${fn}() AS ${fn}))`);
  return [
    pgPolicy("tenancy_tenant_floor", { as: "restrictive", for: "all", to: "public", using: predicate(), withCheck: predicate() }),
    pgPolicy("tenancy_tenant_rows", { as: "permissive", for: "all", to: "public", using: predicate(), withCheck: predicate() }),
  ];
}

/**
 * Everything tenancy.protect() adds that drizzle-kit compares: the two policies and the index
 * on the tenant column protect() creates when none leads with it (PostgreSQL names it
 * `<table>_<column>_idx`). For pgTable's third argument, with `.enableRLS()` on the table.
 */
export function tenancyProtection(column: AnyPgColumn, options: { citus?: boolean } = {}) {
  const table = getTableName(column.table);
  return [index(`${table}_${column.name}_idx`).on(column), ...tenantPolicies(column, options)];
}
