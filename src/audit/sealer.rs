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
pub(crate) const GROUPS_PER_ROUND: i64 = 64;
/// Events per block (and per read): a bulk statement's events become several blocks.
const BLOCK_EVENTS: i64 = 10_000;

/// What one round did.
pub(crate) struct Round {
    pub groups: i64,
    pub blocks: i64,
    pub events: i64,
}

/// The tip of one tenant's chain: the next block's number and position, the last hash.
struct Tip {
    block: i64,
    seq: i64,
    hash: Vec<u8>,
}

/// Seals what is pending, in the current transaction (one round).
pub(crate) fn seal_round() -> Round {
    Spi::connect_mut(|client| -> SpiResult<Round> {
        client.update(
            "LOCK TABLE tenancy.audit_seals IN EXCLUSIVE MODE",
            None,
            &[],
        )?;
        let taken = client.update(
            "WITH g AS (SELECT organization_id, txid FROM tenancy.audit_pending GROUP BY 1, 2 LIMIT $1)
             DELETE FROM tenancy.audit_pending p USING g
              WHERE p.organization_id = g.organization_id AND p.txid = g.txid
             RETURNING p.organization_id, p.txid, p.first_event_id",
            None,
            &[GROUPS_PER_ROUND.into()],
        )?;
        // Per tenant: the transactions taken and the smallest first event id.
        let mut groups: BTreeMap<String, (Vec<i64>, i64)> = BTreeMap::new();
        let mut taken_groups = 0;
        for row in taken {
            let org = row.get::<String>(1)?.unwrap_or_default();
            let txid = row.get::<i64>(2)?.unwrap_or(0);
            let first = row.get::<i64>(3)?.unwrap_or(0);
            let g = groups.entry(org).or_insert_with(|| (Vec::new(), first));
            if !g.0.contains(&txid) {
                g.0.push(txid);
                taken_groups += 1;
            }
            g.1 = g.1.min(first);
        }
        let mut round = Round {
            groups: taken_groups,
            blocks: 0,
            events: 0,
        };
        for (org, (txids, from)) in groups {
            seal_tenant(client, &org, &txids, from, &mut round)?;
        }
        Ok(round)
    })
    .unwrap_or_else(|e| TenancyError::spi("sealing the audit trail", e).report())
}

/// The tip of `org`'s chain: its head row, or (first seal) the end of its v1 chain, the purge
/// anchor, or the start.
fn tip(client: &SpiClient<'_>, org: &str) -> SpiResult<Tip> {
    let head = client.select(
        "SELECT last_block, last_seq, last_hash, purged_through_seq, purged_anchor
           FROM tenancy.audit_chain_heads WHERE organization_id = $1",
        None,
        &[org.into()],
    )?;
    let (mut block, mut seq, mut hash) = (0, None, None);
    let (mut purged_seq, mut anchor) = (0, None);
    if let Some(r) = head.into_iter().next() {
        block = r.get::<i64>(1)?.unwrap_or(0);
        seq = r.get::<i64>(2)?;
        hash = r.get::<Vec<u8>>(3)?;
        purged_seq = r.get::<i64>(4)?.unwrap_or(0);
        anchor = r.get::<Vec<u8>>(5)?;
    }
    if let (Some(seq), Some(hash)) = (seq, hash) {
        return Ok(Tip { block, seq, hash });
    }
    let v1 = client.select(
        "SELECT seq, hash FROM tenancy.audit_events
          WHERE organization_id = $1 AND seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
        None,
        &[org.into()],
    )?;
    if let Some(r) = v1.into_iter().next() {
        return Ok(Tip {
            block,
            seq: r.get::<i64>(1)?.unwrap_or(0),
            hash: r.get::<Vec<u8>>(2)?.unwrap_or_default(),
        });
    }
    Ok(Tip {
        block,
        seq: purged_seq,
        hash: anchor.unwrap_or_else(|| vec![0u8; 32]),
    })
}

fn seal_tenant(
    client: &mut SpiClient<'_>,
    org: &str,
    txids: &[i64],
    from: i64,
    round: &mut Round,
) -> SpiResult<()> {
    let mut tip = tip(client, org)?;
    let start_block = tip.block;
    let mut after = from - 1;
    loop {
        let rows = client.select(
            "SELECT e.event_id, e.hash, e.occurred_at FROM tenancy.audit_events e
              WHERE e.organization_id = $1 AND e.event_id > $2 AND e.txid = ANY ($3) AND e.seq IS NULL
                AND NOT EXISTS (SELECT 1 FROM tenancy.audit_pending p
                                 WHERE p.organization_id = e.organization_id AND p.txid = e.txid
                                   AND p.first_event_id <= e.event_id)
              ORDER BY e.event_id LIMIT $4",
            None,
            &[org.into(), after.into(), txids.into(), BLOCK_EVENTS.into()],
        )?;
        if rows.is_empty() {
            break;
        }
        let block_no = tip.block + 1;
        let mut hasher = BlockHasher::new(org, block_no, tip.seq + 1, &tip.hash);
        let mut ids = Vec::with_capacity(rows.len());
        let mut newest = None::<pgrx::datum::TimestampWithTimeZone>;
        for r in rows {
            let id = r.get::<i64>(1)?.unwrap_or(0);
            let hash = r.get::<Vec<u8>>(2)?.unwrap_or_default();
            let at = r.get::<pgrx::datum::TimestampWithTimeZone>(3)?;
            hasher.add(id, &hash);
            ids.push(id);
            newest = match (newest, at) {
                (Some(n), Some(a)) if a.into_inner() > n.into_inner() => Some(a),
                (None, a) => a,
                (n, _) => n,
            };
        }
        let n = hasher.count();
        let hash = hasher.finish().to_vec();
        after = *ids.last().expect("rows is not empty");
        client.update(
            "INSERT INTO tenancy.audit_seals (organization_id, block_no, first_seq, event_count, event_ids,
                                              newest_event_at, sealed_at, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, pg_catalog.clock_timestamp(), $7, $8)",
            None,
            &[
                org.into(),
                block_no.into(),
                (tip.seq + 1).into(),
                (n as i32).into(),
                ids.into(),
                newest.into(),
                tip.hash.clone().into(),
                hash.clone().into(),
            ],
        )?;
        tip = Tip {
            block: block_no,
            seq: tip.seq + n,
            hash,
        };
        round.blocks += 1;
        round.events += n;
    }
    if tip.block == start_block {
        return Ok(());
    }
    client.update(
        "INSERT INTO tenancy.audit_chain_heads AS h (organization_id, last_block, last_seq, last_hash)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (organization_id) DO UPDATE
           SET last_block = EXCLUDED.last_block, last_seq = EXCLUDED.last_seq, last_hash = EXCLUDED.last_hash",
        None,
        &[
            org.into(),
            tip.block.into(),
            tip.seq.into(),
            tip.hash.into(),
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
