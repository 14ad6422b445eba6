// node-postgres (pg, under Drizzle) has no pipeline mode: each query waits for the previous
// answer. The tenant entry can still ride on BEGIN's round trip: one simple-protocol message
// holding both statements. The tenant id (and token) are then literals, quoted with the
// driver's escapeLiteral; signed tokens are single-use, so one read from pg_stat_activity
// cannot be replayed. The query itself keeps its bind parameters.
//
//   node node_pg.mjs postgres://app@127.0.0.1:5432/app
//
// If set_org fails, the message's transaction block is aborted: the next query fails with
// 25P02 and nothing is committed.
import pg from 'pg';

const SHERWOOD = '5e000000-0000-4000-8000-000000000001';
const client = new pg.Client({ connectionString: process.argv[2] });
await client.connect();

async function notes(org) {
  // One round trip: BEGIN and set_org together (the same number as BEGIN alone).
  try {
    await client.query(`BEGIN; SELECT tenancy.set_org(${client.escapeLiteral(org)})`);
    const { rows } = await client.query('SELECT body FROM public.notes WHERE id > $1 ORDER BY id', [0]);
    await client.query('COMMIT');
    return rows.map((r) => r.body);
  } catch (e) {
    await client.query('ROLLBACK');
    throw e;
  }
}

console.log('node-postgres, BEGIN + set_org in one message:', await notes(SHERWOOD));
try {
  await notes('not-a-tenant');
  console.log('node-postgres: BAD, the query ran after a failed set_org');
  process.exitCode = 1;
} catch (e) {
  console.log('node-postgres: failed set_org failed the transaction:', e.code, e.message);
}
await client.end();
