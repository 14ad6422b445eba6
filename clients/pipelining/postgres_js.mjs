// postgres.js: queries returned together from sql.begin() are pipelined, so BEGIN, set_org,
// the query and COMMIT go out in one round trip.
//
//   node postgres_js.mjs postgres://app@127.0.0.1:5432/app
//
// If set_org fails the transaction is rolled back and the promise rejects: the query's rows
// are never returned.
import postgres from 'postgres';

const SHERWOOD = '5e000000-0000-4000-8000-000000000001';
const sql = postgres(process.argv[2], { max: 1 });

async function notes(org) {
  const [, rows] = await sql.begin((sql) => [
    sql`SELECT tenancy.set_org(${org})`, // a bind parameter
    sql`SELECT body FROM public.notes ORDER BY id`,
  ]);
  return rows.map((r) => r.body);
}

console.log('postgres.js pipeline:', await notes(SHERWOOD));
try {
  await notes('not-a-tenant');
  console.log('postgres.js pipeline: BAD, the query ran after a failed set_org');
  process.exitCode = 1;
} catch (e) {
  console.log('postgres.js pipeline: failed set_org failed the transaction:', e.code, e.message);
}
await sql.end();
