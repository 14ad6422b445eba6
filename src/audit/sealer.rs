//! The sealer: links committed events into per-tenant blocks of the hash chain, after the
//! writing transactions committed, so that writers never wait for one another.
//!
//! A round (one transaction) takes the sealers' lock (`LOCK tenancy.audit_seals IN EXCLUSIVE
//! MODE`: only sealers and `audit_purge` take it; readers are not blocked, and the
//! application, which may only read the table, cannot take a conflicting lock), deletes up to
//! [`GROUPS_PER_ROUND`] (tenant, transaction) groups from `tenancy.audit_pending`, and seals
//! their events tenant by tenant in event-id order, at most [`BLOCK_EVENTS`] per block. A
//! crash rolls the round back: its pending rows come back and the next round seals them.
//!
//! Events are matched to the pending rows the round took by (tenant, transaction id, event id
//! from the row's first). An event of the same tenant and transaction id that still has a
//! pending row of its own is left for that row: transaction ids of a restored dump can repeat
//! the new cluster's, and two rows must never seal one event twice.

use super::chain::BlockHasher;
use crate::error::TenancyError;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use std::collections::BTreeMap;

/// Pending (tenant, transaction) groups one round takes: a round is short, so the worker
/// gets back to the reveal queue quickly.
pub(crate) const GROUPS_PER_ROUND: i64 = 256;
/// Events per block (and per read): a bulk statement's events become several blocks.
const BLOCK_EVENTS: i64 = 10_000;
/// Events one round seals at most (the rest of a large transaction waits for the next).
const ROUND_EVENTS: i64 = 20_000;

/// What one round did.
pub(crate) struct Round {
    pub groups: i64,
    /// Whether more is pending than this round took (the next one should follow at once).
    pub more: bool,
    pub blocks: i64,
    pub events: i64,
}

/// The tip of one tenant's chain: the last block's number and position, the last hash.
#[derive(Clone)]
struct Tip {
    block: i64,
    seq: i64,
    hash: Vec<u8>,
}

/// A block being built, then written.
struct Block {
    org: String,
    block_no: i64,
    first_seq: i64,
    prev: Vec<u8>,
    hasher: BlockHasher,
    ids: Vec<i64>,
    newest: i64,
}

/// Seals what is pending, in the current transaction (one round): take the groups, read
/// the tenants' tips (one statement), read each tenant's events along its primary key (one
/// statement per tenant and page of [`BLOCK_EVENTS`]), write the blocks (one INSERT per 256),
/// move the tips (one statement).
pub(crate) fn seal_round() -> Round {
    Spi::connect_mut(|client| -> SpiResult<Round> {
        client.update("LOCK TABLE tenancy.audit_seals IN EXCLUSIVE MODE", None, &[])?;
        let taken = client.update(
            "WITH g AS (SELECT organization_id, txid FROM tenancy.audit_pending GROUP BY 1, 2 LIMIT $1)
             DELETE FROM tenancy.audit_pending p USING g
              WHERE p.organization_id = g.organization_id AND p.txid = g.txid
             RETURNING p.organization_id, p.txid, p.first_event_id",
            None,
            &[GROUPS_PER_ROUND.into()],
        )?;
        // (tenant, transaction) -> the smallest first event id of its rows.
        let mut pairs: BTreeMap<(String, i64), i64> = BTreeMap::new();
        for row in taken {
            let org = row.get::<String>(1)?.unwrap_or_default();
            let txid = row.get::<i64>(2)?.unwrap_or(0);
            let first = row.get::<i64>(3)?.unwrap_or(0);
            pairs
                .entry((org, txid))
                .and_modify(|f| *f = (*f).min(first))
                .or_insert(first);
        }
        let mut round = Round {
            groups: pairs.len() as i64,
            more: false,
            blocks: 0,
            events: 0,
        };
        if pairs.is_empty() {
            return Ok(round);
        }
        // Per tenant: its transactions taken and the smallest first event id.
        let mut groups: BTreeMap<String, (Vec<i64>, i64)> = BTreeMap::new();
        for ((org, txid), first) in pairs {
            let g = groups.entry(org).or_insert_with(|| (Vec::new(), first));
            g.0.push(txid);
            g.1 = g.1.min(first);
        }
        let orgs: Vec<String> = groups.keys().cloned().collect();
        let mut tips = tips(client, &orgs)?;
        let start = tips.clone();
        let mut done: Vec<Sealed> = Vec::new();
        // Work left for the next round, filed again as pending rows: a round seals at most
        // ROUND_EVENTS events, so the worker is back to the reveal queue in a fraction of a
        // second however large a transaction was.
        let mut carry: Vec<(String, i64, i64)> = Vec::new();
        let mut budget = ROUND_EVENTS;
        // Every tenant's first page in one statement (an OLTP round is hundreds of tenants
        // with a few events each); a tenant with more continues page by page.
        let mut first = first_pages(client, &groups)?;
        for (org, (txids, from)) in groups {
            if budget <= 0 {
                carry.extend(txids.iter().map(|t| (org.clone(), *t, from)));
                continue;
            }
            let mut after = from - 1;
            let mut block: Option<Block> = None;
            let mut rows = first.remove(&org).unwrap_or_default();
            let mut page = FIRST_PAGE;
            loop {
                let n = rows.len() as i64;
                budget -= n;
                for (id, hash, at) in rows {
                    let b = block.get_or_insert_with(|| {
                        let tip = tips.get(&org).cloned().expect("every tip was read");
                        Block {
                            org: org.clone(),
                            block_no: tip.block + 1,
                            first_seq: tip.seq + 1,
                            hasher: BlockHasher::new(&org, tip.block + 1, tip.seq + 1, &tip.hash),
                            prev: tip.hash,
                            ids: Vec::new(),
                            newest: i64::MIN,
                        }
                    });
                    b.hasher.add(id, &hash);
                    b.ids.push(id);
                    b.newest = b.newest.max(at);
                    if b.ids.len() as i64 >= BLOCK_EVENTS {
                        done.push(finish(block.take().expect("just filled"), &mut tips));
                    }
                    after = id;
                }
                if done.len() >= 256 {
                    round.blocks += done.len() as i64;
                    write_blocks(client, std::mem::take(&mut done))?;
                }
                if n < page {
                    break; // the tenant's events of these transactions are all sealed
                }
                if budget <= 0 {
                    carry.extend(txids.iter().map(|t| (org.clone(), *t, after + 1)));
                    break;
                }
                // The next page along the tenant's primary key.
                page = BLOCK_EVENTS.min(budget);
                rows = events_page(client, &org, after, &txids, page)?;
            }
            if let Some(b) = block.take() {
                done.push(finish(b, &mut tips));
            }
        }
        round.blocks += done.len() as i64;
        write_blocks(client, done)?;
        round.more = !carry.is_empty() || round.groups >= GROUPS_PER_ROUND;
        if !carry.is_empty() {
            client.update(
                "INSERT INTO tenancy.audit_pending (organization_id, txid, first_event_id)
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])",
                None,
                &[
                    carry.iter().map(|c| c.0.clone()).collect::<Vec<_>>().into(),
                    carry.iter().map(|c| c.1).collect::<Vec<_>>().into(),
                    carry.iter().map(|c| c.2).collect::<Vec<_>>().into(),
                ],
            )?;
        }
        round.events = tips
            .iter()
            .map(|(org, t)| t.seq - start.get(org).map_or(t.seq, |s| s.seq))
            .sum();
        move_tips(client, &start, &tips)?;
        Ok(round)
    })
    .unwrap_or_else(|e| TenancyError::spi("sealing the audit trail", e).report())
}

/// Events of the round's groups still to seal: (event id, hash, time).
type Page = Vec<(i64, Vec<u8>, i64)>;

/// Events each tenant's first page holds (all of an OLTP transaction's).
const FIRST_PAGE: i64 = 64;

/// The condition an event of the round's groups meets: one of the tenant's transactions
/// taken, written by 0.2.1 (no v1 position), and not waiting for a pending row of its own.
const UNSEALED: &str = "e.seq IS NULL
    AND NOT EXISTS (SELECT 1 FROM tenancy.audit_pending p
                     WHERE p.organization_id = e.organization_id AND p.txid = e.txid
                       AND p.first_event_id <= e.event_id)";

/// The first [`FIRST_PAGE`] events of every tenant's groups, in one statement.
fn first_pages(
    client: &SpiClient<'_>,
    groups: &BTreeMap<String, (Vec<i64>, i64)>,
) -> SpiResult<BTreeMap<String, Page>> {
    let orgs: Vec<String> = groups.keys().cloned().collect();
    let afters: Vec<i64> = groups.values().map(|g| g.1 - 1).collect();
    let txids: Vec<String> = groups
        .values()
        .map(|g| {
            let list: Vec<String> = g.0.iter().map(i64::to_string).collect();
            format!("{{{}}}", list.join(","))
        })
        .collect();
    let rows = client.select(
        &format!(
            "SELECT g.o, e.event_id, e.hash, e.occurred_at
               FROM unnest($1::text[], $2::bigint[], $3::text[]) AS g(o, after, txids)
               CROSS JOIN LATERAL (
                 SELECT e.event_id, e.hash, e.occurred_at FROM tenancy.audit_events e
                  WHERE e.organization_id = g.o COLLATE \"C\" AND e.event_id > g.after
                    AND e.txid = ANY (g.txids::bigint[]) AND {UNSEALED}
                  ORDER BY e.event_id LIMIT $4) e
              ORDER BY g.o COLLATE \"C\", e.event_id"
        ),
        None,
        &[orgs.into(), afters.into(), txids.into(), FIRST_PAGE.into()],
    )?;
    let mut out: BTreeMap<String, Page> = BTreeMap::new();
    for r in rows {
        let org = r.get::<String>(1)?.unwrap_or_default();
        out.entry(org).or_default().push(page_row(&r, 2)?);
    }
    Ok(out)
}

/// Up to `page` events of one tenant's groups after event id `after`.
fn events_page(
    client: &SpiClient<'_>,
    org: &str,
    after: i64,
    txids: &[i64],
    page: i64,
) -> SpiResult<Page> {
    let rows = client.select(
        &format!(
            "SELECT e.event_id, e.hash, e.occurred_at FROM tenancy.audit_events e
              WHERE e.organization_id = $1 AND e.event_id > $2 AND e.txid = ANY ($3) AND {UNSEALED}
              ORDER BY e.event_id LIMIT $4"
        ),
        None,
        &[org.into(), after.into(), txids.to_vec().into(), page.into()],
    )?;
    rows.map(|r| page_row(&r, 1)).collect()
}

/// (event id, hash, time) from columns `at`, `at + 1`, `at + 2` of a row.
fn page_row(r: &pgrx::spi::SpiHeapTupleData<'_>, at: usize) -> SpiResult<(i64, Vec<u8>, i64)> {
    Ok((
        r.get::<i64>(at)?.unwrap_or(0),
        r.get::<Vec<u8>>(at + 1)?.unwrap_or_default(),
        r.get::<pgrx::datum::TimestampWithTimeZone>(at + 2)?
            .map(|t| t.into_inner())
            .unwrap_or(0),
    ))
}

/// The tips of `orgs` (sorted): each one's head row, or (first seal) the end of its v1
/// chain, the purge anchor, or the start.
fn tips(client: &SpiClient<'_>, orgs: &[String]) -> SpiResult<BTreeMap<String, Tip>> {
    let rows = client.select(
        "SELECT o.org, h.last_block, h.last_seq, h.last_hash, h.purged_through_seq, h.purged_anchor, v1.seq, v1.hash
           FROM unnest($1::text[]) AS o(org)
           LEFT JOIN tenancy.audit_chain_heads h ON h.organization_id = o.org
           LEFT JOIN LATERAL (SELECT e.seq, e.hash FROM tenancy.audit_events e
                               WHERE e.organization_id = o.org AND e.seq IS NOT NULL
                               ORDER BY e.seq DESC LIMIT 1) v1 ON h.last_seq IS NULL",
        None,
        &[orgs.to_vec().into()],
    )?;
    let mut out = BTreeMap::new();
    for r in rows {
        let org = r.get::<String>(1)?.unwrap_or_default();
        let block = r.get::<i64>(2)?.unwrap_or(0);
        let tip = match (r.get::<i64>(3)?, r.get::<Vec<u8>>(4)?, r.get::<i64>(7)?) {
            (Some(seq), Some(hash), _) => Tip { block, seq, hash },
            (_, _, Some(seq)) => Tip {
                block,
                seq,
                hash: r.get::<Vec<u8>>(8)?.unwrap_or_default(),
            },
            _ => Tip {
                block,
                seq: r.get::<i64>(5)?.unwrap_or(0),
                hash: r.get::<Vec<u8>>(6)?.unwrap_or_else(|| vec![0u8; 32]),
            },
        };
        out.insert(org, tip);
    }
    Ok(out)
}

/// A finished block, ready to be written.
struct Sealed {
    org: String,
    block_no: i64,
    first_seq: i64,
    count: i32,
    ids: String,
    newest: pgrx::datum::TimestampWithTimeZone,
    prev: Vec<u8>,
    hash: Vec<u8>,
}

/// Finishes a block: its hash, and the tenant's tip moved past it.
fn finish(b: Block, tips: &mut BTreeMap<String, Tip>) -> Sealed {
    let n = b.hasher.count();
    let hash = b.hasher.finish().to_vec();
    tips.insert(
        b.org.clone(),
        Tip {
            block: b.block_no,
            seq: b.first_seq + n - 1,
            hash: hash.clone(),
        },
    );
    let list: Vec<String> = b.ids.iter().map(i64::to_string).collect();
    Sealed {
        org: b.org,
        block_no: b.block_no,
        first_seq: b.first_seq,
        count: n as i32,
        ids: format!("{{{}}}", list.join(",")),
        newest: pgrx::datum::TimestampWithTimeZone::try_from(b.newest)
            .expect("an event's time is a valid timestamp"),
        prev: b.prev,
        hash,
    }
}

/// Writes finished blocks in one INSERT.
fn write_blocks(client: &mut SpiClient<'_>, blocks: Vec<Sealed>) -> SpiResult<()> {
    if blocks.is_empty() {
        return Ok(());
    }
    let mut orgs = Vec::with_capacity(blocks.len());
    let mut nos = Vec::with_capacity(blocks.len());
    let mut firsts = Vec::with_capacity(blocks.len());
    let mut counts = Vec::with_capacity(blocks.len());
    let mut ids = Vec::with_capacity(blocks.len());
    let mut newest = Vec::with_capacity(blocks.len());
    let mut prevs = Vec::with_capacity(blocks.len());
    let mut hashes = Vec::with_capacity(blocks.len());
    for b in blocks {
        orgs.push(b.org);
        nos.push(b.block_no);
        firsts.push(b.first_seq);
        counts.push(b.count);
        ids.push(b.ids);
        newest.push(b.newest);
        prevs.push(b.prev);
        hashes.push(b.hash);
    }
    client.update(
        "INSERT INTO tenancy.audit_seals (organization_id, block_no, first_seq, event_count, event_ids,
                                          newest_event_at, sealed_at, prev_hash, hash)
         SELECT u.o, u.b, u.f, u.n, u.ids::bigint[], u.t, pg_catalog.clock_timestamp(), u.p, u.h
           FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int4[], $5::text[], $6::timestamptz[],
                       $7::bytea[], $8::bytea[]) AS u(o, b, f, n, ids, t, p, h)",
        None,
        &[
            orgs.into(),
            nos.into(),
            firsts.into(),
            counts.into(),
            ids.into(),
            newest.into(),
            prevs.into(),
            hashes.into(),
        ],
    )?;
    Ok(())
}

/// Records the tips that moved in `tenancy.audit_chain_heads`, in one statement.
fn move_tips(
    client: &mut SpiClient<'_>,
    start: &BTreeMap<String, Tip>,
    tips: &BTreeMap<String, Tip>,
) -> SpiResult<()> {
    let moved: Vec<(&String, &Tip)> = tips
        .iter()
        .filter(|(org, t)| start.get(*org).is_none_or(|s| s.block != t.block))
        .collect();
    if moved.is_empty() {
        return Ok(());
    }
    client.update(
        "INSERT INTO tenancy.audit_chain_heads AS h (organization_id, last_block, last_seq, last_hash)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[])
         ON CONFLICT (organization_id) DO UPDATE
           SET last_block = EXCLUDED.last_block, last_seq = EXCLUDED.last_seq, last_hash = EXCLUDED.last_hash",
        None,
        &[
            moved.iter().map(|m| m.0.clone()).collect::<Vec<_>>().into(),
            moved.iter().map(|m| m.1.block).collect::<Vec<_>>().into(),
            moved.iter().map(|m| m.1.seq).collect::<Vec<_>>().into(),
            moved.iter().map(|m| m.1.hash.clone()).collect::<Vec<_>>().into(),
        ],
    )?;
    Ok(())
}

/// Seals everything pending now, in the current transaction: `SELECT tenancy.audit_seal()`
/// (superuser), for databases the background worker does not serve (it seals
/// `tenancy.audit_database` continuously). Returns the number of events sealed.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_seal() -> i64 {
    // SAFETY: superuser() only reads the current role.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::SuperuserOnly { what: "audit_seal" }.report();
    }
    let mut total = 0;
    loop {
        let round = seal_round();
        total += round.events;
        if !round.more {
            return total;
        }
    }
}
