//! The sealer: links committed events into per-tenant blocks of the hash chain, after the
//! writing transactions committed, so that writers never wait for one another.
//!
//! A round (one transaction) takes the sealers' lock (`LOCK tenancy.audit_seals IN EXCLUSIVE
//! MODE`: only sealers and `audit_purge` take it; readers are not blocked, and the
//! application, which may only read the table, cannot take a conflicting lock), deletes up to
//! [`GROUPS_PER_ROUND`] (tenant, transaction) groups from `tenancy.audit_pending`, and seals
//! their events in a fixed number of statements (tenant by tenant in event-id order, at most
//! [`BLOCK_EVENTS`] per block, all blocks of a page in one INSERT). A
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

/// What one round did.
pub(crate) struct Round {
    pub groups: i64,
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

/// Seals what is pending, in the current transaction (one round). The same few statements
/// whatever the number of tenants: take the groups, read the tenants' tips, read the events
/// (in pages of [`BLOCK_EVENTS`]), write the blocks, move the tips.
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
            blocks: 0,
            events: 0,
        };
        if pairs.is_empty() {
            return Ok(round);
        }
        let mut orgs: Vec<String> = pairs.keys().map(|k| k.0.clone()).collect();
        orgs.dedup();
        let mut tips = tips(client, &orgs)?;
        let start = tips.clone();
        let p_org: Vec<String> = pairs.keys().map(|k| k.0.clone()).collect();
        let p_txid: Vec<i64> = pairs.keys().map(|k| k.1).collect();
        let p_from: Vec<i64> = pairs.values().copied().collect();
        let mut current: Option<Block> = None;
        let mut done: Vec<Block> = Vec::new();
        let (mut after_org, mut after_id) = (String::new(), i64::MIN);
        loop {
            let rows = client.select(
                "SELECT e.organization_id, e.event_id, e.hash, e.occurred_at
                   FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS g(org, txid, from_id)
                   JOIN tenancy.audit_events e
                     ON e.organization_id = g.org AND e.txid = g.txid AND e.event_id >= g.from_id AND e.seq IS NULL
                  WHERE (e.organization_id, e.event_id) > ($4, $5)
                    AND NOT EXISTS (SELECT 1 FROM tenancy.audit_pending p
                                     WHERE p.organization_id = e.organization_id AND p.txid = e.txid
                                       AND p.first_event_id <= e.event_id)
                  ORDER BY e.organization_id, e.event_id LIMIT $6",
                None,
                &[
                    p_org.clone().into(),
                    p_txid.clone().into(),
                    p_from.clone().into(),
                    after_org.clone().into(),
                    after_id.into(),
                    BLOCK_EVENTS.into(),
                ],
            )?;
            let n = rows.len() as i64;
            for r in rows {
                let org = r.get::<String>(1)?.unwrap_or_default();
                let id = r.get::<i64>(2)?.unwrap_or(0);
                let hash = r.get::<Vec<u8>>(3)?.unwrap_or_default();
                let at = r
                    .get::<pgrx::datum::TimestampWithTimeZone>(4)?
                    .map(|t| t.into_inner())
                    .unwrap_or(0);
                if current.as_ref().is_some_and(|b| b.org != org) {
                    done.push(current.take().expect("checked just above"));
                }
                let block = current.get_or_insert_with(|| {
                    // Rows come tenant by tenant, and a full block is written (its tip
                    // moved) before the tenant's next one begins: the tip is current.
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
                block.hasher.add(id, &hash);
                block.ids.push(id);
                block.newest = block.newest.max(at);
                if block.ids.len() as i64 >= BLOCK_EVENTS {
                    // Full: written now, so the tenant's next block links to its hash.
                    done.push(current.take().expect("just filled"));
                    let written = write_blocks(client, std::mem::take(&mut done), &mut tips)?;
                    round.blocks += written.0;
                    round.events += written.1;
                }
                (after_org, after_id) = (org, id);
            }
            if !done.is_empty() {
                let written = write_blocks(client, std::mem::take(&mut done), &mut tips)?;
                round.blocks += written.0;
                round.events += written.1;
            }
            if n < BLOCK_EVENTS {
                break;
            }
        }
        if let Some(b) = current.take() {
            let written = write_blocks(client, vec![b], &mut tips)?;
            round.blocks += written.0;
            round.events += written.1;
        }
        move_tips(client, &start, &tips)?;
        Ok(round)
    })
    .unwrap_or_else(|e| TenancyError::spi("sealing the audit trail", e).report())
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

/// Writes finished blocks in one INSERT and moves their tenants' tips past them; returns
/// (blocks, events).
fn write_blocks(
    client: &mut SpiClient<'_>,
    blocks: Vec<Block>,
    tips: &mut BTreeMap<String, Tip>,
) -> SpiResult<(i64, i64)> {
    let mut orgs = Vec::with_capacity(blocks.len());
    let mut nos = Vec::with_capacity(blocks.len());
    let mut firsts = Vec::with_capacity(blocks.len());
    let mut counts = Vec::with_capacity(blocks.len());
    let mut ids = Vec::with_capacity(blocks.len());
    let mut newest = Vec::with_capacity(blocks.len());
    let mut prevs = Vec::with_capacity(blocks.len());
    let mut hashes = Vec::with_capacity(blocks.len());
    let mut events = 0;
    for b in blocks {
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
        events += n;
        let list: Vec<String> = b.ids.iter().map(i64::to_string).collect();
        orgs.push(b.org);
        nos.push(b.block_no);
        firsts.push(b.first_seq);
        counts.push(n as i32);
        ids.push(format!("{{{}}}", list.join(",")));
        newest.push(
            pgrx::datum::TimestampWithTimeZone::try_from(b.newest)
                .expect("an event's time is a valid timestamp"),
        );
        prevs.push(b.prev);
        hashes.push(hash);
    }
    let count = orgs.len() as i64;
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
    Ok((count, events))
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
        if round.groups < GROUPS_PER_ROUND {
            return total;
        }
    }
}
