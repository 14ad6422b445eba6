// The Drizzle schema of the tests (it imports the package by its name, so that drizzle-kit,
// which loads it as CommonJS, gets the CommonJS build and one drizzle-orm): two clinic tables as a team would declare them, with the
// tenant column, PHI columns and the policies tenancy.protect() creates.
import { pgSchema, uuid, text, integer } from "drizzle-orm/pg-core";
import { phi, tenantId, tenancyProtection } from "pg-tenancy/drizzle";

export const clinic = pgSchema("clinic");

export const patients = clinic
  .table(
    "patients",
    {
      organizationId: tenantId("organization_id"),
      id: uuid("id").primaryKey().defaultRandom(),
      lastName: phi("last_name", "patients.last_name"),
      phone: phi("phone", "patients.phone"),
    },
    (t) => tenancyProtection(t.organizationId),
  )
  .enableRLS();

export const visits = clinic
  .table(
    "visits",
    {
      organizationId: tenantId("organization_id"),
      id: uuid("id").primaryKey().defaultRandom(),
      patientId: uuid("patient_id").notNull(),
      minutes: integer("minutes").notNull(),
      note: text("note"),
    },
    (t) => tenancyProtection(t.organizationId),
  )
  .enableRLS();
