// drizzle-kit for the tests' schema (test/schema.ts); the database from DATABASE_URL.
import { defineConfig } from "drizzle-kit";

export default defineConfig({
  dialect: "postgresql",
  schema: process.env.DRIZZLE_SCHEMA ?? "./test/schema.ts",
  out: process.env.DRIZZLE_OUT ?? "./drizzle",
  schemaFilter: ["clinic"],
  dbCredentials: { url: process.env.DATABASE_URL ?? "" },
});
